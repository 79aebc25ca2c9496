//! pkcs11-ha: a PKCS#11 provider that presents each configured HA group of
//! member tokens as one virtual slot, and every member token as a
//! pass-through slot.
//!
//! Data flows one way: C call -> [`ffi`] -> [`provider`] / [`session`] ->
//! [`group`] -> [`member`]. Lock order, where more than one is taken:
//! provider state, then the session table, then a session's own state, then
//! a group's object table. No lock is ever held across a call into a
//! member library.
#![deny(unsafe_op_in_unsafe_fn)]
// The API documentation is for this crate's developers, read with
// `cargo doc --document-private-items`: docs link the private items that
// carry each rule.
#![allow(rustdoc::private_intra_doc_links)]

pub mod arguments;
pub mod bindings;
pub mod clock;
pub mod config;
pub mod config_warnings;
pub mod error;
pub mod ffi;
pub mod fork;
pub mod group;
pub mod halog;
pub mod identity;
pub mod index;
pub mod mechanism;
pub mod member;
pub mod member_api;
pub mod member_sessions;
pub mod object;
pub mod provider;
pub mod published;
pub mod reconcile;
pub mod recovery;
pub mod replication;
pub mod session;
pub mod slot_ids;
pub mod state_api;
pub mod state_dir;
pub mod strategy;
pub mod virtual_objects;
pub mod virtual_session;
