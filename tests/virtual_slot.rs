//! The virtual slot of an HA group, driven through the `cryptoki` crate
//! against real SoftHSM members: slots, sessions, login, objects on every
//! member, and every kind of crypto call.

mod common;

use common::*;
use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::collections::HashSet;

/// DER of the prime256v1 OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn ec_key_pair(session: &Session, id: &[u8], token: bool) -> (ObjectHandle, ObjectHandle) {
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(P256.to_vec()),
                Attribute::Token(token),
                Attribute::Id(id.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(token),
                Attribute::Id(id.to_vec()),
                Attribute::Sign(true),
                Attribute::Private(true),
            ],
        )
        .expect("EC key pair")
}

fn aes_key(session: &Session, label: &str, extractable: bool) -> ObjectHandle {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Label(label.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Extractable(extractable),
                Attribute::Sensitive(!extractable),
            ],
        )
        .expect("AES key")
}

fn data_object(session: &Session, label: &str, value: &[u8]) -> ObjectHandle {
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(label.into()),
            Attribute::Value(value.to_vec()),
        ])
        .expect("data object")
}

fn labelled(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Label(label.into())])
        .expect("find")
}

fn value_of(session: &Session, object: ObjectHandle) -> Vec<u8> {
    match session
        .get_attributes(object, &[AttributeType::Value])
        .expect("read value")
        .pop()
    {
        Some(Attribute::Value(v)) => v,
        other => panic!("no CKA_VALUE: {other:?}"),
    }
}

/// How many objects with `label` each member holds, seen through its own
/// pass-through slot.
fn count_on_members(f: &Fixture, label: &str) -> Vec<usize> {
    (0..f.hsm.tokens.len())
        .map(|i| labelled(&user_session(&f.pkcs11, f.member_slot(i)), label).len())
        .collect()
}

fn rv(error: Error) -> RvError {
    match error {
        Error::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 error: {other}"),
    }
}

#[test]
fn virtual_token_carries_group_label_and_luna_serial() {
    let f = Fixture::group(2);
    let info = f.pkcs11.get_token_info(f.virtual_slot()).unwrap();
    assert_eq!(info.label(), GROUP_LABEL);
    assert_eq!(info.serial_number(), group_serial(&f.hsm.serials()));
    assert_eq!(info.manufacturer_id(), "pkcs11-ha");
    assert_eq!(info.model(), "HA virtual slot");
    assert!(info.token_initialized() && info.user_pin_initialized() && info.login_required());
    let slot_info = f.pkcs11.get_slot_info(f.virtual_slot()).unwrap();
    assert!(slot_info.token_present());
}

#[test]
fn slot_ids_are_stable_across_restarts_and_pass_through_every_token() {
    let mut f = Fixture::group(2);
    let first: Vec<Slot> = f.pkcs11.get_all_slots().unwrap();
    let ids: Vec<u64> = first.iter().map(|s| s.id()).collect();
    assert_eq!(ids[0], 0, "group 00 is slot 0");
    // SoftHSM's own slot IDs come from serials and reach 2^32; tools that
    // read a slot ID as a signed 32-bit int (Java SunPKCS11) need less.
    assert!(ids.iter().all(|id| *id < 1 << 31), "slot IDs {ids:#x?}");
    for token in &f.hsm.tokens {
        assert!(
            ids.contains(&passthrough_slot_id(SOFTHSM_LIB_NAME, token.slot_id)),
            "{ids:?} lacks {}",
            token.label
        );
    }
    f.finalize().unwrap();
    let again = load_ha();
    initialize(&again).unwrap();
    let second: Vec<u64> = again
        .get_all_slots()
        .unwrap()
        .iter()
        .map(|s| s.id())
        .collect();
    assert_eq!(ids, second);
    again.finalize().unwrap();
}

#[test]
fn ha_only_hides_member_slots() {
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["a", "b"]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        true,
    );
    let f = Fixture::start_with_guard(guard, hsm, config);
    let slots = f.pkcs11.get_all_slots().unwrap();
    assert_eq!(slots.iter().map(|s| s.id()).collect::<Vec<_>>(), vec![0]);
    let hidden = Slot::try_from(passthrough_slot_id(
        SOFTHSM_LIB_NAME,
        f.hsm.tokens[0].slot_id,
    ))
    .unwrap();
    assert_eq!(
        rv(f.pkcs11.get_token_info(hidden).unwrap_err()),
        RvError::SlotIdInvalid
    );
}

#[test]
fn mechanisms_are_those_every_member_offers() {
    let f = Fixture::group(2);
    let virtual_list = f.pkcs11.get_mechanism_list(f.virtual_slot()).unwrap();
    let member_list = f.pkcs11.get_mechanism_list(f.member_slot(0)).unwrap();
    assert_eq!(
        virtual_list.len(),
        member_list.len(),
        "identical members: identical lists"
    );
    let info = f
        .pkcs11
        .get_mechanism_info(f.virtual_slot(), cryptoki::mechanism::MechanismType::ECDSA)
        .unwrap();
    assert!(info.sign());
}

#[test]
fn wrong_pin_is_refused_and_right_pin_logs_in_every_member() {
    let f = Fixture::group(2);
    let session = f.pkcs11.open_rw_session(f.virtual_slot()).unwrap();
    let wrong = session
        .login(UserType::User, Some(&AuthPin::new("0000".into())))
        .unwrap_err();
    assert_eq!(rv(wrong), RvError::PinIncorrect);
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap();
    let info = session.get_session_info().unwrap();
    assert_eq!(
        info.slot_id().id(),
        f.virtual_slot().id(),
        "session info names the virtual slot"
    );
    assert_eq!(
        info.session_state(),
        cryptoki::session::SessionState::RwUser
    );
    for i in 0..2 {
        let member = f.pkcs11.open_ro_session(f.member_slot(i)).unwrap();
        let state = member.get_session_info().unwrap().session_state();
        assert_eq!(
            state,
            cryptoki::session::SessionState::RoUser,
            "member {i} is logged in"
        );
    }
    let again = session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap_err();
    assert_eq!(rv(again), RvError::UserAlreadyLoggedIn);
    session.logout().unwrap();
    assert_eq!(rv(session.logout().unwrap_err()), RvError::UserNotLoggedIn);
}

#[test]
fn created_objects_exist_on_every_member_and_are_found_once() {
    let f = Fixture::group(3);
    let session = f.user_session();
    let made: HashSet<u64> = (0..3)
        .map(|i| data_object(&session, "doc", &[i]).handle())
        .collect();
    assert_eq!(made.len(), 3);
    assert_eq!(count_on_members(&f, "doc"), vec![3, 3, 3]);
    let found: Vec<ObjectHandle> = labelled(&session, "doc");
    assert_eq!(
        found.iter().map(|h| h.handle()).collect::<HashSet<_>>(),
        made,
        "each object found once, same handles"
    );
    assert_eq!(found.len(), 3);
}

/// SoftHSM counts changes of a token's object list in a file all processes
/// share, and a process re-reads the list only when the count moved since
/// it last looked -- but making or destroying an object takes the new
/// count as seen without re-reading, so an object another process made
/// just before stays out of that process's view (its searches, its
/// handles) until some other process changes the list again. The group
/// has each SoftHSM member read its list again before it makes a token
/// object there (by reading an attribute of an object it made there
/// before: "ours-before"): without that, "theirs" was found on no member.
/// A destroy has SoftHSM read the object it destroys first, and with it
/// the list.
#[test]
fn what_another_process_made_stays_in_view_after_the_group_makes_an_object() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let before = data_object(&session, "ours-before", b"1");
    for token in &f.hsm.tokens {
        data_object_by_another_process(&f.hsm, &token.label, "theirs");
    }
    data_object(&session, "ours-after", b"2");
    assert_eq!(count_on_members(&f, "theirs"), vec![1, 1]);
    assert_eq!(labelled(&session, "theirs").len(), 1);
    for token in &f.hsm.tokens {
        data_object_by_another_process(&f.hsm, &token.label, "theirs-later");
    }
    session.destroy_object(before).expect("destroy");
    assert_eq!(count_on_members(&f, "theirs-later"), vec![1, 1]);
    assert_eq!(count_on_members(&f, "ours-before"), vec![0, 0]);
}

#[test]
fn destroy_and_set_attribute_reach_every_member() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let object = data_object(&session, "before", b"v");
    session
        .update_attributes(object, &[Attribute::Label("after".into())])
        .unwrap();
    assert_eq!(count_on_members(&f, "before"), vec![0, 0]);
    assert_eq!(count_on_members(&f, "after"), vec![1, 1]);
    session.destroy_object(object).unwrap();
    assert_eq!(count_on_members(&f, "after"), vec![0, 0]);
    let gone = session
        .get_attributes(object, &[AttributeType::Label])
        .unwrap_err();
    assert_eq!(rv(gone), RvError::ObjectHandleInvalid);
}

#[test]
fn copy_object_copies_on_every_member() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let original = data_object(&session, "original", b"payload");
    let copy = session
        .copy_object(original, &[Attribute::Label("copy".into())])
        .unwrap();
    assert_ne!(copy, original);
    assert_eq!(value_of(&session, copy), b"payload");
    assert_eq!(count_on_members(&f, "copy"), vec![1, 1]);
}

#[test]
fn ecdsa_sign_and_verify_single_and_multi_part() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let (public, private) = ec_key_pair(&session, b"ec", true);
    let digest = session.digest(&Mechanism::Sha256, b"message").unwrap();
    let signature = session.sign(&Mechanism::Ecdsa, private, &digest).unwrap();
    assert_eq!(signature.len(), 64);
    session
        .verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .unwrap();
    let mut bad = signature.clone();
    bad[0] ^= 1;
    let refused = session
        .verify(&Mechanism::Ecdsa, public, &digest, &bad)
        .unwrap_err();
    assert_eq!(rv(refused), RvError::SignatureInvalid);
    // The group still serves after a request error.
    session
        .verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .unwrap();
}

#[test]
fn rsa_multi_part_sign_verify_and_digest() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::ModulusBits(2048.into()),
                Attribute::Token(true),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(true),
                Attribute::Sign(true),
                Attribute::Private(true),
            ],
        )
        .unwrap();
    session
        .sign_init(&Mechanism::Sha256RsaPkcs, private)
        .unwrap();
    session.sign_update(b"part one, ").unwrap();
    session.sign_update(b"part two").unwrap();
    let signature = session.sign_final().unwrap();
    session
        .verify(
            &Mechanism::Sha256RsaPkcs,
            public,
            b"part one, part two",
            &signature,
        )
        .unwrap();
    session
        .verify_init(&Mechanism::Sha256RsaPkcs, public)
        .unwrap();
    session.verify_update(b"part one, part two").unwrap();
    session.verify_final(&signature).unwrap();

    session.digest_init(&Mechanism::Sha256).unwrap();
    session.digest_update(b"a").unwrap();
    session.digest_update(b"bc").unwrap();
    let multi = session.digest_final().unwrap();
    assert_eq!(multi, session.digest(&Mechanism::Sha256, b"abc").unwrap());
    assert_eq!(&multi[..4], &[0xba, 0x78, 0x16, 0xbf], "SHA-256(abc)");
}

#[test]
fn aes_gcm_round_trip_and_random() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let key = aes_key(&session, "aes", false);
    let mut iv = [7u8; 12];
    let plaintext = vec![0x5a; 1024];
    let ciphertext = session
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            key,
            &plaintext,
        )
        .unwrap();
    assert_eq!(ciphertext.len(), plaintext.len() + 16);
    let decrypted = session
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            key,
            &ciphertext,
        )
        .unwrap();
    assert_eq!(decrypted, plaintext);
    let a = session.generate_random_vec(32).unwrap();
    let b = session.generate_random_vec(32).unwrap();
    assert_ne!(a, b);
    session.seed_random(b"extra entropy").unwrap();
}

#[test]
fn wrap_and_unwrap_keys() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let wrapping = aes_key(&session, "kek", false);
    let secret = aes_key(&session, "secret", true);
    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrap, wrapping, secret)
        .unwrap();
    assert_eq!(wrapped.len(), 40);
    let unwrapped = session
        .unwrap_key(
            &Mechanism::AesKeyWrap,
            wrapping,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
            ],
        )
        .unwrap();
    assert_eq!(value_of(&session, unwrapped), value_of(&session, secret));
}

fn ecdh_secret(session: &Session, private: ObjectHandle, peer_public: ObjectHandle) -> Vec<u8> {
    let point = match session
        .get_attributes(peer_public, &[AttributeType::EcPoint])
        .unwrap()
        .pop()
    {
        Some(Attribute::EcPoint(p)) => p,
        other => panic!("no EC point: {other:?}"),
    };
    let params = Ecdh1DeriveParams::new(EcKdf::null(), &point);
    let secret = session
        .derive_key(
            &Mechanism::Ecdh1Derive(params),
            private,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
            ],
        )
        .unwrap();
    value_of(session, secret)
}

#[test]
fn ecdh_derive_agrees_on_both_sides() {
    let f = Fixture::group(2);
    let session = f.user_session();
    let (alice_public, alice_private) = ec_key_pair(&session, b"alice", false);
    let (bob_public, bob_private) = ec_key_pair(&session, b"bob", false);
    for private in [alice_private, bob_private] {
        session
            .update_attributes(private, &[Attribute::Derive(true)])
            .unwrap();
    }
    let one = ecdh_secret(&session, alice_private, bob_public);
    let other = ecdh_secret(&session, bob_private, alice_public);
    assert_eq!(one.len(), 32);
    assert_eq!(one, other);
}

#[test]
fn session_objects_end_with_their_session() {
    let f = Fixture::group(2);
    let keeper = f.user_session();
    let session = f.user_session();
    let object = session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Label("temp".into()),
        ])
        .unwrap();
    assert_eq!(
        labelled(&keeper, "temp"),
        vec![object],
        "visible to the application's other sessions"
    );
    drop(session);
    assert!(labelled(&keeper, "temp").is_empty());
    let gone = keeper
        .get_attributes(object, &[AttributeType::Label])
        .unwrap_err();
    assert_eq!(rv(gone), RvError::ObjectHandleInvalid);
}

#[test]
fn concurrent_sessions_sign_from_many_threads() {
    let f = Fixture::group(2);
    let setup = f.user_session();
    let (public, private) = ec_key_pair(&setup, b"mt", true);
    let digest = [9u8; 32];
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let session = f.pkcs11.open_ro_session(f.virtual_slot()).unwrap();
                for _ in 0..50 {
                    let signature = session.sign(&Mechanism::Ecdsa, private, &digest).unwrap();
                    session
                        .verify(&Mechanism::Ecdsa, public, &digest, &signature)
                        .unwrap();
                }
            });
        }
    });
}

#[test]
fn application_that_also_loads_softhsm_keeps_its_own_sessions() {
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["solo"]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    hsm.activate();
    let direct = load_softhsm();
    initialize(&direct).unwrap();
    let direct_slot = direct.get_slots_with_token().unwrap()[0];
    let direct_session = direct.open_ro_session(direct_slot).unwrap();

    let mut f = Fixture::start_with_guard(guard, hsm, config);
    let session = f.user_session();
    data_object(&session, "shared", b"x");
    drop(session);
    f.finalize().unwrap();

    // Our C_Finalize must not have finalised the application's SoftHSM.
    direct_session
        .generate_random_vec(8)
        .expect("the application's own session still works");
    drop(direct_session);
    direct.finalize().unwrap();
}

#[test]
fn calls_after_finalize_say_not_initialized() {
    let mut f = Fixture::group(1);
    let slot = f.virtual_slot();
    f.finalize().unwrap();
    match f.pkcs11.get_token_info(slot) {
        Err(Error::Pkcs11(RvError::CryptokiNotInitialized, Function::GetTokenInfo)) => {}
        other => panic!("expected CKR_CRYPTOKI_NOT_INITIALIZED, got {other:?}"),
    }
}
