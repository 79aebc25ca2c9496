//! The HA state API for applications: Luna's `CA_GetHAState` layout, so
//! applications written for Luna work unchanged, and a richer
//! `PKCS11HA_GetGroupStatus`. The C declarations are in
//! `include/pkcs11_ha.h`; the structs here must match them field for field
//! (build.rs compares names, fields and constants; a test compiles the
//! header and compares sizes and offsets).
#![allow(non_camel_case_types, non_snake_case)]

use crate::group::{Group, MemberState};
use cryptoki_sys::*;

pub const CK_HA_MAX_MEMBERS: usize = 32;
// A group reports every member: the config accepts no more than this.
const _: () = assert!(CK_HA_MAX_MEMBERS == crate::config::MAX_GROUP_MEMBERS);
/// `CK_TOKEN_SERIAL_NUMBER_SIZE + 4`, as in Luna's header.
pub const CK_HA_SERIAL_SIZE: usize = 20;
pub const PKCS11HA_LABEL_SIZE: usize = 33;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct CK_HA_MEMBER {
    pub memberSerial: [CK_CHAR; CK_HA_SERIAL_SIZE],
    pub memberStatus: CK_RV,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct CK_HA_STATUS {
    pub groupSerial: [CK_CHAR; CK_HA_SERIAL_SIZE],
    pub memberList: [CK_HA_MEMBER; CK_HA_MAX_MEMBERS],
    pub listSize: CK_ULONG,
}

pub const PKCS11HA_ROLE_ACTIVE: CK_ULONG = 0;
pub const PKCS11HA_ROLE_STANDBY: CK_ULONG = 1;
pub const PKCS11HA_STATE_UP: CK_ULONG = 0;
pub const PKCS11HA_STATE_DOWN: CK_ULONG = 1;
pub const PKCS11HA_STATE_RECOVERING: CK_ULONG = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PKCS11HA_MEMBER_STATUS {
    pub serial: [CK_CHAR; CK_HA_SERIAL_SIZE],
    pub role: CK_ULONG,
    pub state: CK_ULONG,
    pub consecutiveFailures: CK_ULONG,
    pub callsServed: CK_ULONG,
    pub callsInFlight: CK_ULONG,
    pub lastFault: CK_RV,
    pub msSinceStateChange: CK_ULONG,
    pub pendingChanges: CK_ULONG,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PKCS11HA_GROUP_STATUS {
    pub label: [CK_CHAR; PKCS11HA_LABEL_SIZE],
    pub serial: [CK_CHAR; CK_HA_SERIAL_SIZE],
    pub slotID: CK_SLOT_ID,
    pub memberCount: CK_ULONG,
    pub members: [PKCS11HA_MEMBER_STATUS; CK_HA_MAX_MEMBERS],
}

/// A NUL-terminated copy of `text` in a fixed C field.
fn c_string<const N: usize>(text: &str) -> [CK_CHAR; N] {
    let mut field = [0; N];
    let n = text.len().min(N - 1);
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
    field
}

/// A member's status as Luna reports it: `CKR_OK` while it serves, else
/// the fault that took it out (`CKR_TOKEN_NOT_PRESENT` if never found).
fn luna_status(state: MemberState, last_fault: CK_RV) -> CK_RV {
    match (state, last_fault) {
        (MemberState::Up, _) => CKR_OK,
        (_, CKR_OK) => CKR_TOKEN_NOT_PRESENT,
        (_, fault) => fault,
    }
}

pub fn ha_state(group: &Group) -> CK_HA_STATUS {
    let mut status = CK_HA_STATUS {
        groupSerial: c_string(&group.serial),
        memberList: [CK_HA_MEMBER {
            memberSerial: [0; CK_HA_SERIAL_SIZE],
            memberStatus: CKR_OK,
        }; CK_HA_MAX_MEMBERS],
        listSize: 0,
    };
    for (slot, member) in status.memberList.iter_mut().zip(&group.members) {
        *slot = CK_HA_MEMBER {
            memberSerial: c_string(&member.serial),
            memberStatus: luna_status(member.state(), member.last_fault()),
        };
        status.listSize += 1;
    }
    status
}

pub fn group_status(group: &Group) -> PKCS11HA_GROUP_STATUS {
    let empty = PKCS11HA_MEMBER_STATUS {
        serial: [0; CK_HA_SERIAL_SIZE],
        role: 0,
        state: 0,
        consecutiveFailures: 0,
        callsServed: 0,
        callsInFlight: 0,
        lastFault: CKR_OK,
        msSinceStateChange: 0,
        pendingChanges: 0,
    };
    let mut status = PKCS11HA_GROUP_STATUS {
        label: c_string(&group.label),
        serial: c_string(&group.serial),
        slotID: group.slot_id,
        memberCount: 0,
        members: [empty; CK_HA_MAX_MEMBERS],
    };
    for (slot, member) in status.members.iter_mut().zip(&group.members) {
        *slot = PKCS11HA_MEMBER_STATUS {
            serial: c_string(&member.serial),
            role: if member.standby {
                PKCS11HA_ROLE_STANDBY
            } else {
                PKCS11HA_ROLE_ACTIVE
            },
            state: match member.state() {
                MemberState::Up => PKCS11HA_STATE_UP,
                MemberState::Down => PKCS11HA_STATE_DOWN,
                MemberState::Recovering => PKCS11HA_STATE_RECOVERING,
            },
            consecutiveFailures: member.consecutive_failures(),
            callsServed: member.calls_served(),
            callsInFlight: member.in_flight() as CK_ULONG,
            lastFault: member.last_fault(),
            msSinceStateChange: member.ms_since_state_change(),
            pendingChanges: group.undelivered_count(member.position) as CK_ULONG,
        };
        status.memberCount += 1;
    }
    status
}
