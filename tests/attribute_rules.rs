//! The attribute rules of PKCS#11 2.40 for keys, as a table run against
//! the virtual slot of a two-member group and, with the same expectations,
//! against SoftHSM itself (the pass-through slot of a token outside the
//! group forwards every call to SoftHSM unchanged). Where the virtual slot
//! emulates a property (non-extractable keys are kept extractable under
//! trusted keys only on the members), each path that could reveal or
//! weaken it must answer as the real token does.
//!
//! Not in the table, because a member computes them and copies made by
//! unwrapping differ from the original (docs/security-model.md):
//! `CKA_LOCAL` and `CKA_ALWAYS_SENSITIVE`.

mod common;

use common::*;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// How the key of a row is made (AES-256, generated).
#[derive(Clone, Copy)]
struct Key {
    sensitive: bool,
    extractable: bool,
    modifiable: bool,
    copyable: bool,
    destroyable: bool,
    trusted_only: bool,
}

const PLAIN: Key = Key {
    sensitive: false,
    extractable: true,
    modifiable: true,
    copyable: true,
    destroyable: true,
    trusted_only: false,
};

/// What a row does with its key.
#[derive(Clone, Copy)]
enum Action {
    Read(AttributeType),
    ReadValue,
    Set(fn() -> Attribute),
    Copy(fn() -> Attribute),
    Destroy,
    /// `C_WrapKey` of the key under an extractable key without
    /// `CKA_TRUSTED`.
    WrapUnderUntrusted,
}

/// What the spec says the row gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    Bool(bool),
    /// `CKA_VALUE` is unavailable (the key is sensitive or unextractable).
    Withheld,
    /// The value is revealed.
    Revealed,
    Rv(RvError),
    /// One of these codes: the spec lets the token choose.
    OneOf(RvError, RvError),
}

struct Row {
    name: &'static str,
    key: Key,
    action: Action,
    expect: Expect,
}

fn rows() -> Vec<Row> {
    use Action::*;
    use Expect::*;
    let sensitive = Key {
        sensitive: true,
        ..PLAIN
    };
    let unextractable = Key {
        extractable: false,
        ..PLAIN
    };
    vec![
        Row {
            name: "sensitive: value withheld",
            key: sensitive,
            action: ReadValue,
            expect: Withheld,
        },
        Row {
            name: "unextractable, not sensitive: value withheld",
            key: unextractable,
            action: ReadValue,
            expect: Withheld,
        },
        Row {
            name: "extractable, not sensitive: value revealed",
            key: PLAIN,
            action: ReadValue,
            expect: Revealed,
        },
        Row {
            name: "unextractable reads CKA_EXTRACTABLE false",
            key: unextractable,
            action: Read(AttributeType::Extractable),
            expect: Bool(false),
        },
        Row {
            name: "generated unextractable reads CKA_NEVER_EXTRACTABLE true",
            key: unextractable,
            action: Read(AttributeType::NeverExtractable),
            expect: Bool(true),
        },
        Row {
            name: "extractable reads CKA_NEVER_EXTRACTABLE false",
            key: PLAIN,
            action: Read(AttributeType::NeverExtractable),
            expect: Bool(false),
        },
        Row {
            name: "sensitive reads CKA_SENSITIVE true",
            key: sensitive,
            action: Read(AttributeType::Sensitive),
            expect: Bool(true),
        },
        Row {
            name: "sensitive cannot become non-sensitive",
            key: sensitive,
            action: Set(|| Attribute::Sensitive(false)),
            expect: Rv(RvError::AttributeReadOnly),
        },
        Row {
            name: "non-sensitive can become sensitive",
            key: PLAIN,
            action: Set(|| Attribute::Sensitive(true)),
            expect: Ok,
        },
        Row {
            name: "unextractable cannot become extractable",
            key: unextractable,
            action: Set(|| Attribute::Extractable(true)),
            expect: Rv(RvError::AttributeReadOnly),
        },
        Row {
            name: "extractable can become unextractable",
            key: PLAIN,
            action: Set(|| Attribute::Extractable(false)),
            expect: Ok,
        },
        Row {
            name: "a copy cannot be more extractable",
            key: unextractable,
            action: Copy(|| Attribute::Extractable(true)),
            expect: Rv(RvError::AttributeReadOnly),
        },
        Row {
            name: "a copy may be less extractable",
            key: PLAIN,
            action: Copy(|| Attribute::Extractable(false)),
            expect: Ok,
        },
        Row {
            name: "a copy cannot be less sensitive",
            key: sensitive,
            action: Copy(|| Attribute::Sensitive(false)),
            expect: Rv(RvError::AttributeReadOnly),
        },
        Row {
            name: "unmodifiable refuses a new label",
            key: Key {
                modifiable: false,
                ..PLAIN
            },
            action: Set(|| Attribute::Label(b"renamed".to_vec())),
            expect: OneOf(RvError::AttributeReadOnly, RvError::ActionProhibited),
        },
        Row {
            name: "modifiable takes a new label",
            key: PLAIN,
            action: Set(|| Attribute::Label(b"renamed".to_vec())),
            expect: Ok,
        },
        Row {
            name: "uncopyable refuses C_CopyObject",
            key: Key {
                copyable: false,
                ..PLAIN
            },
            action: Copy(|| Attribute::Label(b"copy".to_vec())),
            expect: Rv(RvError::ActionProhibited),
        },
        Row {
            name: "indestructible refuses C_DestroyObject",
            key: Key {
                destroyable: false,
                ..PLAIN
            },
            action: Destroy,
            expect: Rv(RvError::ActionProhibited),
        },
        Row {
            name: "destroyable goes",
            key: PLAIN,
            action: Destroy,
            expect: Ok,
        },
        Row {
            name: "unextractable is never wrapped",
            key: unextractable,
            action: WrapUnderUntrusted,
            expect: Rv(RvError::KeyUnextractable),
        },
        Row {
            // The virtual slot reads such a key as unextractable (see
            // security-model.md), so it refuses with that code.
            name: "wrap-with-trusted is not wrapped under an untrusted key",
            key: Key {
                trusted_only: true,
                ..PLAIN
            },
            action: WrapUnderUntrusted,
            expect: OneOf(RvError::KeyNotWrappable, RvError::KeyUnextractable),
        },
        Row {
            name: "extractable is wrapped",
            key: PLAIN,
            action: WrapUnderUntrusted,
            expect: Ok,
        },
    ]
}

fn generate(session: &Session, key: &Key, label: &str) -> ObjectHandle {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Label(label.into()),
                Attribute::Encrypt(true),
                Attribute::Sensitive(key.sensitive),
                Attribute::Extractable(key.extractable),
                Attribute::Modifiable(key.modifiable),
                Attribute::Copyable(key.copyable),
                Attribute::Destroyable(key.destroyable),
                Attribute::WrapWithTrusted(key.trusted_only),
            ],
        )
        .unwrap_or_else(|e| panic!("generate {label}: {e:?}"))
}

fn outcome<T>(result: cryptoki::error::Result<T>) -> Result<T, RvError> {
    result.map_err(|e| match e {
        Error::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 answer: {other:?}"),
    })
}

fn run(session: &Session, wrapper: ObjectHandle, row: &Row, label: &str) -> Expect {
    let key = generate(session, &row.key, label);
    let answer = match row.action {
        Action::Read(which) => {
            outcome(session.get_attributes(key, &[which])).map(|a| match a.first() {
                Some(
                    Attribute::Extractable(b)
                    | Attribute::NeverExtractable(b)
                    | Attribute::Sensitive(b),
                ) => Expect::Bool(*b),
                other => panic!("{}: read {other:?}", row.name),
            })
        }
        // The crate leaves out what the token calls unavailable.
        Action::ReadValue => {
            outcome(session.get_attributes(key, &[AttributeType::Value])).map(|a| {
                if a.is_empty() {
                    Expect::Withheld
                } else {
                    Expect::Revealed
                }
            })
        }
        Action::Set(attribute) => {
            outcome(session.update_attributes(key, &[attribute()])).map(|_| Expect::Ok)
        }
        Action::Copy(attribute) => {
            outcome(session.copy_object(key, &[attribute()])).map(|_| Expect::Ok)
        }
        Action::Destroy => outcome(session.destroy_object(key)).map(|_| Expect::Ok),
        Action::WrapUnderUntrusted => {
            outcome(session.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, key)).map(|_| Expect::Ok)
        }
    };
    answer.unwrap_or_else(Expect::Rv)
}

fn meets(got: Expect, want: Expect) -> bool {
    match (got, want) {
        (Expect::Rv(rv), Expect::OneOf(a, b)) => rv == a || rv == b,
        _ => got == want,
    }
}

#[test]
fn key_attribute_rules_hold_on_the_virtual_slot_as_on_softhsm() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["member0", "member1", "direct"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let members = vec![hsm.tokens[0].serial.clone(), hsm.tokens[1].serial.clone()];
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    );
    let fixture = Fixture::start_with_guard(_guard, hsm, config);
    let targets = [
        ("virtual slot", fixture.virtual_slot()),
        ("SoftHSM", fixture.member_slot(2)),
    ];
    let mut wrong = Vec::new();
    for (target, slot) in targets {
        let session = user_session(&fixture.pkcs11, slot);
        let wrapper = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                ],
            )
            .expect("an untrusted wrapping key");
        for (i, row) in rows().iter().enumerate() {
            let got = run(&session, wrapper, row, &format!("row{i}"));
            if !meets(got, row.expect) {
                wrong.push(format!(
                    "{target}: {}: got {got:?}, the spec says {:?}",
                    row.name, row.expect
                ));
            }
        }
        // Searches see what reads see.
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Extractable(false),
                Attribute::NeverExtractable(true),
            ])
            .unwrap();
        for object in &found {
            let read = session
                .get_attributes(
                    *object,
                    &[AttributeType::Extractable, AttributeType::NeverExtractable],
                )
                .unwrap();
            if read
                != [
                    Attribute::Extractable(false),
                    Attribute::NeverExtractable(true),
                ]
            {
                wrong.push(format!(
                    "{target}: a search for never-extractable keys found {read:?}"
                ));
            }
        }
        // The wrapping key too: made without CKA_EXTRACTABLE, which a
        // generated key then is not.
        let expected = 1 + rows().iter().filter(|r| !r.key.extractable).count();
        if found.len() != expected {
            wrong.push(format!(
                "{target}: {} never-extractable keys found, {expected} made",
                found.len()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
