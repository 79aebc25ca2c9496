//! Objects a process finds on a group's members (made earlier, by another
//! process or before a restart) are located on each member through that
//! member's object index once a few have been looked for, not by a search
//! of the whole token each: the answers must be the same either way.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::Session;

const KEYS: usize = 48;

fn make_keys(session: &Session) {
    for i in 0..KEYS {
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::ValueLen(16.into()),
                    Attribute::Token(true),
                    Attribute::Label(format!("k{i}").into()),
                    Attribute::Id(vec![i as u8]),
                    Attribute::Encrypt(true),
                ],
            )
            .expect("C_GenerateKey");
    }
}

#[test]
fn keys_found_after_a_restart_serve_from_every_member() {
    let mut fixture = Fixture::group(2);
    {
        let session = fixture.user_session();
        make_keys(&session);
    }
    fixture.finalize().unwrap();
    initialize(&fixture.pkcs11).expect("C_Initialize again");
    check_after_restart(&fixture);
    fixture.finalize().unwrap();
}

fn check_after_restart(fixture: &Fixture) {
    let session = fixture.user_session();
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert_eq!(keys.len(), KEYS);
    // Encrypting with each key several times spreads the calls over both
    // members, so each key is looked for on the member that did not find
    // it -- past the point where that member's index is read.
    for key in &keys {
        let first = session
            .encrypt(&Mechanism::AesEcb, *key, &[0u8; 16])
            .expect("C_Encrypt");
        for _ in 0..3 {
            let again = session
                .encrypt(&Mechanism::AesEcb, *key, &[0u8; 16])
                .unwrap();
            assert_eq!(again, first, "the same key on every member");
        }
    }
    // A key removed and made again with the same label and ID is found
    // anew, not as the handle the index knew.
    let victim = session
        .find_objects(&[Attribute::Label(b"k7".to_vec())])
        .unwrap();
    session.destroy_object(victim[0]).unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(16.into()),
                Attribute::Token(true),
                Attribute::Label(b"k7".to_vec()),
                Attribute::Id(vec![7]),
                Attribute::Encrypt(true),
            ],
        )
        .unwrap();
    let remade = session
        .find_objects(&[Attribute::Label(b"k7".to_vec())])
        .unwrap();
    assert_eq!(remade.len(), 1);
    let first = session
        .encrypt(&Mechanism::AesEcb, remade[0], &[0u8; 16])
        .unwrap();
    for _ in 0..4 {
        assert_eq!(
            session
                .encrypt(&Mechanism::AesEcb, remade[0], &[0u8; 16])
                .unwrap(),
            first
        );
    }
}

#[test]
fn keys_that_share_label_and_id_are_never_confused() {
    let mut fixture = Fixture::group(2);
    {
        let session = fixture.user_session();
        for _ in 0..2 {
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::ValueLen(16.into()),
                        Attribute::Token(true),
                        Attribute::Label(b"twin".to_vec()),
                        Attribute::Id(vec![2]),
                        Attribute::Encrypt(true),
                    ],
                )
                .unwrap();
        }
    }
    fixture.finalize().unwrap();
    initialize(&fixture.pkcs11).expect("C_Initialize again");
    check_twins(&fixture);
    fixture.finalize().unwrap();
}

fn check_twins(fixture: &Fixture) {
    let session = fixture.user_session();
    let twins = session
        .find_objects(&[Attribute::Label(b"twin".to_vec())])
        .unwrap();
    assert_eq!(twins.len(), 2);
    let results: Vec<Vec<u8>> = twins
        .iter()
        .map(|key| {
            let first = session
                .encrypt(&Mechanism::AesEcb, *key, &[0u8; 16])
                .unwrap();
            for _ in 0..6 {
                let again = session
                    .encrypt(&Mechanism::AesEcb, *key, &[0u8; 16])
                    .unwrap();
                assert_eq!(again, first, "a handle always names the same key");
            }
            first
        })
        .collect();
    assert_ne!(results[0], results[1], "two keys, two answers");
}
