//! Keys behave as PKCS#11 promises through a virtual slot of two SoftHSM
//! members: the emulation of non-extractable keys says exactly what a real
//! token says, the domain key can never be reached, and cached member
//! handles survive everything that makes SoftHSM hand out new ones.

mod common;

use common::*;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use std::ptr;

fn rv_of<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> RvError {
    match result {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn aes_template(label: &str, extractable: Option<bool>, sensitive: bool) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Id(label.as_bytes().to_vec()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sensitive(sensitive),
    ];
    if let Some(e) = extractable {
        template.push(Attribute::Extractable(e));
    }
    template
}

fn generate_aes(
    session: &Session,
    label: &str,
    extractable: bool,
    sensitive: bool,
) -> ObjectHandle {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &aes_template(label, Some(extractable), sensitive),
        )
        .expect("C_GenerateKey")
}

/// An object handle the application made up.
fn raw_handle(value: CK_OBJECT_HANDLE) -> ObjectHandle {
    // SAFETY: an arbitrary handle is what these tests send on purpose.
    unsafe { ObjectHandle::new_from_raw(value) }
}

fn find_label(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Label(label.into())])
        .expect("C_FindObjects")
}

fn labels_of_everything(session: &Session) -> Vec<String> {
    let all = session.find_objects(&[]).expect("C_FindObjects");
    all.into_iter()
        .filter_map(|h| {
            session
                .get_attributes(h, &[AttributeType::Label])
                .ok()
                .and_then(|a| match a.first() {
                    Some(Attribute::Label(l)) => Some(String::from_utf8_lossy(l).into_owned()),
                    _ => None,
                })
        })
        .collect()
}

fn bool_attribute(session: &Session, object: ObjectHandle, which: AttributeType) -> bool {
    let attributes = session
        .get_attributes(object, &[which])
        .expect("C_GetAttributeValue");
    match attributes.first() {
        Some(
            Attribute::Extractable(b)
            | Attribute::NeverExtractable(b)
            | Attribute::Sensitive(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::WrapWithTrusted(b),
        ) => *b,
        other => panic!("{which:?} read as {other:?}"),
    }
}

/// The raw function table of the library under test, for calls the
/// `cryptoki` crate does not make (nested templates, raw lengths).
fn raw() -> &'static CK_FUNCTION_LIST {
    static LIST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let address = *LIST.get_or_init(|| {
        // SAFETY: the library under test is a PKCS#11 module; the symbol has
        // the standard signature, and the table it returns lives as long as
        // the (never unloaded) library.
        unsafe {
            let library = libloading::Library::new(library_path()).expect("dlopen pkcs11-ha");
            let get = *library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .expect("C_GetFunctionList");
            let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
            assert_eq!(get.expect("not NULL")(&mut list), CKR_OK);
            std::mem::forget(library);
            list as usize
        }
    });
    // SAFETY: as above, the table is never freed.
    unsafe { &*(address as *const CK_FUNCTION_LIST) }
}

fn close_all_sessions(slot: cryptoki::slot::Slot) {
    // SAFETY: a plain call with a slot ID.
    let rv = unsafe { raw().C_CloseAllSessions.unwrap()(slot.id()) };
    assert_eq!(rv, CKR_OK, "C_CloseAllSessions");
}

#[test]
fn key_generation_survives_closing_every_session() {
    let fixture = Fixture::group(2);
    let slot = fixture.virtual_slot();
    for round in 0..3 {
        let session = fixture.user_session();
        let key = generate_aes(&session, &format!("round{round}"), true, false);
        assert_eq!(find_label(&session, &format!("round{round}")), vec![key]);
        close_all_sessions(slot);
        std::mem::forget(session);
    }
    // With a pass-through session open meanwhile, as in the report.
    let passthrough = fixture
        .pkcs11
        .open_ro_session(fixture.member_slot(1))
        .unwrap();
    let session = fixture.user_session();
    generate_aes(&session, "after-cycles", true, false);
    session.close().unwrap();
    let session = fixture.user_session();
    generate_aes(&session, "after-close", true, false);
    for label in ["round0", "round1", "round2", "after-cycles", "after-close"] {
        assert_eq!(find_label(&session, label).len(), 1, "{label} once");
    }
    drop(passthrough);
}

#[test]
fn the_domain_key_never_shows_through_the_virtual_slot() {
    let fixture = Fixture::group(2);
    let slot = fixture.virtual_slot();
    for round in 0..3 {
        let session = fixture.user_session();
        generate_aes(&session, &format!("k{round}"), true, false);
        let labels = labels_of_everything(&session);
        assert!(
            !labels.iter().any(|l| l == DOMAIN_LABEL),
            "round {round}: the domain key is listed: {labels:?}"
        );
        assert!(find_label(&session, DOMAIN_LABEL).is_empty());
        let secret = session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .unwrap();
        assert_eq!(secret.len(), round + 1, "only the application's keys");
        close_all_sessions(slot);
        std::mem::forget(session);
    }
    // Guessing virtual handles reaches nothing but the application's keys.
    let session = fixture.user_session();
    for guess in 1..=64u64 {
        let handle = raw_handle(guess);
        if let Ok(attributes) = session.get_attributes(handle, &[AttributeType::Label]) {
            assert!(
                !matches!(attributes.first(), Some(Attribute::Label(l)) if l == DOMAIN_LABEL.as_bytes()),
                "virtual handle {guess} is the domain key"
            );
        }
    }
}

#[test]
fn the_domain_key_is_hidden_and_untouchable_through_pass_through_slots() {
    let fixture = Fixture::group(2);
    // The virtual slot is used first, so the members hold open sessions.
    let virtual_session = fixture.user_session();
    generate_aes(&virtual_session, "app-key", true, false);
    for member in 0..2 {
        let session = user_session(&fixture.pkcs11, fixture.member_slot(member));
        assert!(find_label(&session, DOMAIN_LABEL).is_empty());
        assert!(!labels_of_everything(&session)
            .iter()
            .any(|l| l == DOMAIN_LABEL));
        // Member handles are small numbers: try them all.
        for guess in 1..=64u64 {
            let handle = raw_handle(guess);
            if let Ok(attributes) = session.get_attributes(handle, &[AttributeType::Label]) {
                assert!(
                    !matches!(attributes.first(), Some(Attribute::Label(l)) if l == DOMAIN_LABEL.as_bytes()),
                    "member {member}: handle {guess} is the domain key"
                );
            }
        }
        drop(session);
    }
    // Replication still works: the domain key is intact on both members.
    generate_aes(&virtual_session, "still-replicates", true, false);
    assert_eq!(find_label(&virtual_session, "still-replicates").len(), 1);
}

#[test]
fn a_non_extractable_key_never_reveals_its_value() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let generated = generate_aes(&session, "gen-nx", false, false);
    let imported = session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Label("imp-nx".into()),
            Attribute::Value(vec![7; 32]),
            Attribute::Sensitive(false),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
        ])
        .expect("C_CreateObject");
    for key in [generated, imported] {
        // The crate leaves out what the token calls unavailable.
        let read = session
            .get_attributes(key, &[AttributeType::Value])
            .unwrap();
        assert!(read.is_empty(), "the value was revealed");
        // The raw call: the value's length says unavailable, and other
        // attributes in the same template are still filled.
        let mut value = [0u8; 64];
        let mut class: CK_ULONG = 0;
        let mut template = [
            CK_ATTRIBUTE {
                type_: CKA_VALUE,
                pValue: value.as_mut_ptr().cast(),
                ulValueLen: value.len() as CK_ULONG,
            },
            CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: (&mut class as *mut CK_ULONG).cast(),
                ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
            },
        ];
        // SAFETY: a live session and a template of live buffers.
        let rv = unsafe {
            raw().C_GetAttributeValue.unwrap()(
                session.handle(),
                key.handle(),
                template.as_mut_ptr(),
                2,
            )
        };
        assert_eq!(rv, CKR_ATTRIBUTE_SENSITIVE);
        assert_eq!(template[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
        assert!(
            value.iter().all(|b| *b == 0),
            "no key byte reached the buffer"
        );
        assert_eq!(class, CKO_SECRET_KEY);
        assert!(!bool_attribute(&session, key, AttributeType::Extractable));
    }
}

#[test]
fn extractable_can_only_go_from_true_to_false() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let protected = generate_aes(&session, "nx", false, true);
    assert_eq!(
        rv_of(session.update_attributes(protected, &[Attribute::Extractable(true)])),
        RvError::AttributeReadOnly
    );
    assert_eq!(
        rv_of(session.copy_object(protected, &[Attribute::Extractable(true)])),
        RvError::AttributeReadOnly
    );
    assert!(!bool_attribute(
        &session,
        protected,
        AttributeType::Extractable
    ));

    let open = generate_aes(&session, "x", true, true);
    session
        .update_attributes(open, &[Attribute::Extractable(false)])
        .expect("TRUE to FALSE is allowed");
    assert!(!bool_attribute(&session, open, AttributeType::Extractable));
    assert!(
        !bool_attribute(&session, open, AttributeType::NeverExtractable),
        "it was extractable once"
    );
    assert_eq!(
        rv_of(session.update_attributes(open, &[Attribute::Extractable(true)])),
        RvError::AttributeReadOnly
    );
    // Now it cannot be wrapped by the application either.
    let wrapper = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
            ],
        )
        .unwrap();
    assert_eq!(
        rv_of(session.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, open)),
        RvError::KeyUnextractable
    );
    // A copy of it is still non-extractable, and so are its copies
    // everywhere.
    let copy = session
        .copy_object(open, &[Attribute::Label("x-copy".into())])
        .expect("C_CopyObject");
    assert!(!bool_attribute(&session, copy, AttributeType::Extractable));
}

#[test]
fn searches_see_the_application_view_of_extractability() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let protected = generate_aes(&session, "s-nx", false, true);
    let open = generate_aes(&session, "s-x", true, true);
    let secret = Attribute::Class(ObjectClass::SECRET_KEY);
    let found = session
        .find_objects(&[secret.clone(), Attribute::Extractable(false)])
        .unwrap();
    assert_eq!(found, vec![protected]);
    let found = session
        .find_objects(&[secret.clone(), Attribute::Extractable(true)])
        .unwrap();
    assert_eq!(found, vec![open]);
    let found = session
        .find_objects(&[secret.clone(), Attribute::NeverExtractable(true)])
        .unwrap();
    assert_eq!(found, vec![protected]);
    let found = session
        .find_objects(&[secret, Attribute::NeverExtractable(false)])
        .unwrap();
    assert_eq!(found, vec![open]);
}

#[test]
fn imported_private_keys_stay_replicable() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    // An EC P-256 private key as pkcs11-tool --write-object imports one:
    // no CKA_EXTRACTABLE in the template.
    let key = session
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label("imported-ec".into()),
            Attribute::Id(vec![0xec]),
            Attribute::EcParams(vec![
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ]),
            Attribute::Value(vec![0x11; 32]),
            Attribute::Sign(true),
        ])
        .expect("C_CreateObject of a private key");
    assert!(!bool_attribute(&session, key, AttributeType::Extractable));
    assert!(!bool_attribute(
        &session,
        key,
        AttributeType::NeverExtractable
    ));
    // On each member it is kept so that the domain key can carry it.
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        let on_member = find_label(&direct, "imported-ec");
        assert_eq!(on_member.len(), 1, "member {member} holds it once");
        // As the member keeps it: movable under the trusted domain key
        // only, which is what `group sync` and recovery wrap it with.
        assert!(bool_attribute(
            &direct,
            on_member[0],
            AttributeType::Extractable
        ));
        assert!(bool_attribute(
            &direct,
            on_member[0],
            AttributeType::WrapWithTrusted
        ));
        drop(direct);
    }
    // And a key copied from it by the group is made from the member copy.
    let copy = session
        .copy_object(key, &[Attribute::Label("imported-ec-copy".into())])
        .expect("C_CopyObject replicates through the domain key");
    assert!(!bool_attribute(&session, copy, AttributeType::Extractable));
}

#[test]
fn making_keys_while_an_operation_is_active_on_the_session() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    session.digest_init(&Mechanism::Sha256).unwrap();
    generate_aes(&session, "during-digest", true, false);
    session.digest_update(b"abc").unwrap();
    let digest = session.digest_final().unwrap();
    assert_eq!(
        hex(&digest),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(find_label(&session, "during-digest").len(), 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn key_taking_calls_name_the_key_handle() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let bogus = raw_handle(0x7fff_0001);
    let key = generate_aes(&session, "real", true, false);
    session.digest_init(&Mechanism::Sha256).unwrap();
    assert_eq!(rv_of(session.digest_key(bogus)), RvError::KeyHandleInvalid);
    session.digest_final().ok();
    assert_eq!(
        rv_of(session.encrypt_init(&Mechanism::AesEcb, bogus)),
        RvError::KeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.decrypt_init(&Mechanism::AesEcb, bogus)),
        RvError::KeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.sign_init(&Mechanism::Sha256Hmac, bogus)),
        RvError::KeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.verify_init(&Mechanism::Sha256Hmac, bogus)),
        RvError::KeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.wrap_key(&Mechanism::AesKeyWrapPad, bogus, key)),
        RvError::WrappingKeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.wrap_key(&Mechanism::AesKeyWrapPad, key, bogus)),
        RvError::KeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.unwrap_key(
            &Mechanism::AesKeyWrapPad,
            bogus,
            &[0u8; 40],
            &aes_template("u", Some(true), false)[1..],
        )),
        RvError::UnwrappingKeyHandleInvalid
    );
    assert_eq!(
        rv_of(session.get_attributes(bogus, &[AttributeType::Label])),
        RvError::ObjectHandleInvalid
    );
}

#[test]
fn a_wrong_answer_is_never_hidden_behind_logging_out_and_in() {
    // SoftHSM forgets the handles of private objects at logout: cached
    // member handles must not outlive that.
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let mut template = aes_template("private-key", Some(true), true);
    template.push(Attribute::Private(true));
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .unwrap();
    let encrypt = |s: &Session| s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();
    let before = encrypt(&session);
    for _ in 0..2 {
        session.logout().unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
            .unwrap();
        for _ in 0..4 {
            assert_eq!(encrypt(&session), before);
        }
    }
}

#[test]
fn closing_the_last_session_logs_the_group_out_for_real() {
    // The members stay open behind the virtual slot (the group's utility
    // sessions): a wrong PIN must still be refused after the application
    // closed every session, and private objects must be hidden again.
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let mut template = aes_template("private-again", Some(true), true);
    template.push(Attribute::Private(true));
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .unwrap();
    session.close().unwrap();
    let session = fixture
        .pkcs11
        .open_rw_session(fixture.virtual_slot())
        .unwrap();
    assert!(find_label(&session, "private-again").is_empty());
    assert_eq!(
        rv_of(session.login(UserType::User, Some(&AuthPin::new("0000".into())))),
        RvError::PinIncorrect
    );
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap();
    assert_eq!(find_label(&session, "private-again").len(), 1);
}

#[test]
fn a_key_type_the_members_cannot_wrap_is_refused_and_leaves_nothing() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    // DER of the Ed25519 curve name, as PKCS#11 3.0 writes it.
    let ed25519 = [
        0x13, 0x0c, b'e', b'd', b'w', b'a', b'r', b'd', b's', b'2', b'5', b'5', b'1', b'9',
    ];
    let made = session.generate_key_pair(
        &Mechanism::EccEdwardsKeyPairGen,
        &[
            Attribute::EcParams(ed25519.to_vec()),
            Attribute::Token(true),
            Attribute::Label("ed".into()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sign(true),
            Attribute::Label("ed".into()),
        ],
    );
    assert_eq!(rv_of(made), RvError::KeyNotWrappable);
    assert!(find_label(&session, "ed").is_empty());
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        assert!(find_label(&direct, "ed").is_empty(), "member {member}");
    }
}

#[test]
fn a_non_extractable_copy_of_an_extractable_key_is_on_every_member() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let open = generate_aes(&session, "to-copy", true, true);
    let copy = session
        .copy_object(
            open,
            &[
                Attribute::Label("copied-nx".into()),
                Attribute::Extractable(false),
            ],
        )
        .expect("C_CopyObject");
    assert!(!bool_attribute(&session, copy, AttributeType::Extractable));
    assert!(bool_attribute(&session, open, AttributeType::Extractable));
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        assert_eq!(find_label(&direct, "copied-nx").len(), 1, "member {member}");
    }
}

fn bool_attr(type_: CK_ATTRIBUTE_TYPE, value: &CK_BBOOL) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value as *const CK_BBOOL as *mut _,
        ulValueLen: 1,
    }
}

fn ulong_attr(type_: CK_ATTRIBUTE_TYPE, value: &CK_ULONG) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value as *const CK_ULONG as *mut _,
        ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
    }
}

fn nested_attr(type_: CK_ATTRIBUTE_TYPE, inner: &[CK_ATTRIBUTE]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: inner.as_ptr() as *mut _,
        ulValueLen: std::mem::size_of_val(inner) as CK_ULONG,
    }
}

/// The (type, value) pairs of a nested template attribute, read raw in
/// the three calls PKCS#11 prescribes.
fn read_nested(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    type_: CK_ATTRIBUTE_TYPE,
) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let get = raw().C_GetAttributeValue.unwrap();
    let mut outer = CK_ATTRIBUTE {
        type_,
        pValue: ptr::null_mut(),
        ulValueLen: 0,
    };
    // SAFETY: a template of one attribute with live buffers, each call.
    unsafe {
        assert_eq!(
            get(session, object, &mut outer, 1),
            CKR_OK,
            "length of {type_:#x}"
        );
        let n = outer.ulValueLen as usize / std::mem::size_of::<CK_ATTRIBUTE>();
        let mut inner = vec![
            CK_ATTRIBUTE {
                type_: 0,
                pValue: ptr::null_mut(),
                ulValueLen: 0
            };
            n
        ];
        outer.pValue = inner.as_mut_ptr().cast();
        assert_eq!(
            get(session, object, &mut outer, 1),
            CKR_OK,
            "lengths inside"
        );
        let mut values: Vec<Vec<u8>> = inner
            .iter()
            .map(|a| vec![0; a.ulValueLen as usize])
            .collect();
        for (a, v) in inner.iter_mut().zip(values.iter_mut()) {
            a.pValue = v.as_mut_ptr().cast();
        }
        assert_eq!(get(session, object, &mut outer, 1), CKR_OK, "values inside");
        inner.iter().map(|a| a.type_).zip(values).collect()
    }
}

#[test]
fn copies_carry_the_templates_a_key_imposes_and_unwrapping_under_them_works() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let (yes, no): (CK_BBOOL, CK_BBOOL) = (CK_TRUE, CK_FALSE);
    let (secret, length): (CK_ULONG, CK_ULONG) = (CKO_SECRET_KEY, 32);
    let unwrap_template = [bool_attr(CKA_EXTRACTABLE, &no)];
    let wrap_template = [ulong_attr(CKA_CLASS, &secret)];
    let label = b"kek";
    let mut template = vec![
        ulong_attr(CKA_VALUE_LEN, &length),
        bool_attr(CKA_TOKEN, &yes),
        bool_attr(CKA_WRAP, &yes),
        bool_attr(CKA_UNWRAP, &yes),
        bool_attr(CKA_EXTRACTABLE, &yes),
        nested_attr(CKA_UNWRAP_TEMPLATE, &unwrap_template),
        nested_attr(CKA_WRAP_TEMPLATE, &wrap_template),
        CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: label.as_ptr() as *mut _,
            ulValueLen: label.len() as CK_ULONG,
        },
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut kek: CK_OBJECT_HANDLE = 0;
    // SAFETY: live templates and out-pointer.
    let rv = unsafe {
        raw().C_GenerateKey.unwrap()(
            session.handle(),
            &mut mechanism,
            template.as_mut_ptr(),
            template.len() as CK_ULONG,
            &mut kek,
        )
    };
    assert_eq!(rv, CKR_OK, "C_GenerateKey with nested templates");
    // The copy on each member carries both templates.
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        let found = find_label(&direct, "kek");
        assert_eq!(found.len(), 1, "member {member}");
        let wrap = read_nested(direct.handle(), found[0].handle(), CKA_WRAP_TEMPLATE);
        assert_eq!(
            wrap,
            vec![(CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec())],
            "member {member}"
        );
        let unwrap = read_nested(direct.handle(), found[0].handle(), CKA_UNWRAP_TEMPLATE);
        assert!(
            unwrap.contains(&(CKA_WRAP_WITH_TRUSTED, vec![CK_TRUE])),
            "member {member}: unwrapped keys stay replicable: {unwrap:?}"
        );
    }
    // Unwrapping under it: the key comes out non-extractable to the
    // application, and imported material is not "never extractable".
    let kek = raw_handle(kek);
    let payload = generate_aes(&session, "payload", true, false);
    let wrapped = session
        .wrap_key(&Mechanism::AesKeyWrapPad, kek, payload)
        .expect("C_WrapKey under the wrap template");
    let unwrapped = session
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            &wrapped,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Label("unwrapped".into()),
                Attribute::Encrypt(true),
            ],
        )
        .expect("C_UnwrapKey under the unwrap template");
    assert!(!bool_attribute(
        &session,
        unwrapped,
        AttributeType::Extractable
    ));
    assert!(!bool_attribute(
        &session,
        unwrapped,
        AttributeType::NeverExtractable
    ));
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        assert_eq!(find_label(&direct, "unwrapped").len(), 1, "member {member}");
    }
}

#[test]
fn filtered_searches_fill_their_batches() {
    // The cryptoki crate asks for batches of 10 and stops at a short one:
    // what the virtual slot leaves out must be made up from the member.
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    for i in 0..12 {
        generate_aes(&session, &format!("nx{i}"), false, true);
        generate_aes(&session, &format!("x{i}"), true, true);
    }
    let secret = Attribute::Class(ObjectClass::SECRET_KEY);
    for extractable in [false, true] {
        let found = session
            .find_objects(&[secret.clone(), Attribute::Extractable(extractable)])
            .unwrap();
        assert_eq!(found.len(), 12, "extractable = {extractable}");
    }
    assert_eq!(session.find_objects(&[secret]).unwrap().len(), 24);
    // And a member's pass-through slot, which hides the domain key.
    let direct = user_session(&fixture.pkcs11, fixture.member_slot(1));
    let on_member = direct
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert_eq!(on_member.len(), 24);
}

/// A boolean attribute as a member or the virtual slot reports it.
fn flag(session: &Session, object: ObjectHandle, which: AttributeType) -> bool {
    match session
        .get_attributes(object, &[which])
        .expect("C_GetAttributeValue")
        .first()
    {
        Some(Attribute::Copyable(b) | Attribute::Destroyable(b) | Attribute::Modifiable(b)) => *b,
        other => panic!("{which:?} read as {other:?}"),
    }
}

#[test]
fn copies_on_every_member_keep_what_the_application_restricted() {
    let fixture = Fixture::group(2);
    let session = fixture.user_session();
    let restrictions = [
        (
            "destroyable",
            AttributeType::Destroyable,
            Attribute::Destroyable(false),
        ),
        (
            "copyable",
            AttributeType::Copyable,
            Attribute::Copyable(false),
        ),
        (
            "modifiable",
            AttributeType::Modifiable,
            Attribute::Modifiable(false),
        ),
    ];
    let mut made = Vec::new();
    for (name, which, restriction) in &restrictions {
        let data = format!("data-{name}");
        session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Label(data.as_str().into()),
                Attribute::Value(b"payload".to_vec()),
                restriction.clone(),
            ])
            .expect("C_CreateObject of a data object");
        let imported = format!("imported-{name}");
        session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Label(imported.as_str().into()),
                Attribute::Value(vec![0x42; 32]),
                Attribute::Encrypt(true),
                restriction.clone(),
            ])
            .expect("C_CreateObject of a secret key");
        let generated = format!("generated-{name}");
        let mut template = aes_template(&generated, Some(true), false);
        template.push(restriction.clone());
        template.push(Attribute::AllowedMechanisms(vec![
            MechanismType::AES_CBC_PAD,
        ]));
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .expect("C_GenerateKey");
        let pair = format!("pair-{name}");
        session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[
                    Attribute::Token(true),
                    Attribute::Label(pair.as_str().into()),
                    Attribute::EcParams(vec![
                        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
                    ]),
                    Attribute::Verify(true),
                    restriction.clone(),
                ],
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(pair.as_str().into()),
                    Attribute::Sign(true),
                    restriction.clone(),
                ],
            )
            .expect("C_GenerateKeyPair");
        made.extend([data, imported, generated].map(|label| (label, *which, 1)));
        made.push((pair, *which, 2));
    }
    for (label, which, count) in &made {
        let found = find_label(&session, label);
        assert_eq!(found.len(), *count, "{label} through the virtual slot");
        for object in found {
            assert!(
                !flag(&session, object, *which),
                "{label} through the virtual slot"
            );
        }
    }
    for member in 0..2 {
        let direct = user_session(&fixture.pkcs11, fixture.member_slot(member));
        for (label, which, count) in &made {
            let found = find_label(&direct, label);
            assert_eq!(found.len(), *count, "member {member} holds {label}");
            for object in found {
                assert!(
                    !flag(&direct, object, *which),
                    "member {member}: {label} reads {which:?} TRUE"
                );
            }
        }
    }
}
