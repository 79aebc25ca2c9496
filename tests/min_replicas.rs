//! `VirtualTokenNNMinReplicas`: a call that makes an object returns OK only
//! once the object is on that many members; otherwise it is removed from
//! every member and the call fails. Here one of three members is missing
//! (its token does not exist), so two copies can be made, never three.

mod common;

use common::*;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use std::fs;

/// A serial no token has: the third member is down from the start.
const ABSENT: &str = "0123456789abcdef";

fn start(min_replicas: usize) -> Fixture {
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["member0", "member1"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let mut members = hsm.serials();
    members.push(ABSENT.to_string());
    let text = config_text(
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    )
    .replace(
        "[VirtualToken]\n",
        &format!("[VirtualToken]\nVirtualToken00MinReplicas = {min_replicas}\n"),
    );
    let config = hsm.dir.path().join("pkcs11-ha.conf");
    fs::write(&config, text).unwrap();
    Fixture::start_with_guard(guard, hsm, config)
}

fn rv<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> RvError {
    match result {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn data(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Value(b"payload".to_vec()),
    ]
}

fn aes(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Encrypt(true),
    ]
}

/// How many objects labelled `label` each present member holds.
fn copies(fixture: &Fixture, label: &str) -> Vec<usize> {
    (0..2)
        .map(|member| {
            let session = user_session(&fixture.pkcs11, fixture.member_slot(member));
            session
                .find_objects(&[Attribute::Label(label.into())])
                .unwrap()
                .len()
        })
        .collect()
}

#[test]
fn an_object_on_fewer_members_than_asked_is_undone_everywhere() {
    let fixture = start(3);
    let session = fixture.user_session();
    assert_eq!(
        rv(session.create_object(&data("imported"))),
        RvError::FunctionFailed
    );
    assert_eq!(
        rv(session.generate_key(&Mechanism::AesKeyGen, &aes("generated"))),
        RvError::FunctionFailed
    );
    drop(session);
    assert_eq!(copies(&fixture, "imported"), [0, 0]);
    assert_eq!(copies(&fixture, "generated"), [0, 0]);
}

#[test]
fn an_object_on_enough_members_is_made() {
    let fixture = start(2);
    let session = fixture.user_session();
    session.create_object(&data("imported")).unwrap();
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &aes("generated"))
        .unwrap();
    session
        .copy_object(key, &[Attribute::Label("copied".into())])
        .unwrap();
    drop(session);
    for label in ["imported", "generated", "copied"] {
        assert_eq!(copies(&fixture, label), [1, 1], "{label}");
    }
}
