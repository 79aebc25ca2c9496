//! The group's domain key: finding it on a member, deriving its value from
//! the domain secret, and provisioning it exactly as the test fixtures and
//! `docs/security-model.md` describe.

use cryptoki_sys::*;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::p11::{bool_bytes, ulong_bytes, Session, Template};

/// HKDF-SHA256 salt of the domain key derivation.
pub const KDF_SALT: &[u8] = b"pkcs11-ha domain";
/// Fewest bytes accepted as a domain secret: it is key material, not a
/// password, and HKDF does not stretch it.
pub const MIN_SECRET_LEN: usize = 16;

/// The AES-256 domain key value: HKDF-SHA256 of `secret` with salt
/// [`KDF_SALT`] and the domain label as info, so every member provisioned
/// from the same secret gets the same key, and different domains differ.
pub fn derive(secret: &[u8], domain_label: &str) -> Zeroizing<[u8; 32]> {
    let mut value = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(KDF_SALT), secret)
        .expand(domain_label.as_bytes(), value.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    value
}

/// A domain key found on a member.
pub struct Found {
    pub handle: CK_OBJECT_HANDLE,
    /// `CKA_CHECK_VALUE`, empty when the token does not give one.
    pub check_value: Vec<u8>,
}

/// The member's domain key: `Ok(None)` if it has none, an error message if
/// it has several (a group's domain key must be unambiguous).
pub fn find(session: &Session, label: &str) -> Result<Option<Found>, String> {
    let print = vec![
        (CKA_CLASS, ulong_bytes(CKO_SECRET_KEY)),
        (CKA_LABEL, label.as_bytes().to_vec()),
    ];
    let found = session.find(&print).map_err(|rv| {
        format!(
            "cannot search for the domain key: C_FindObjects returned {}",
            pkcs11_ha::error::rv_name(rv)
        )
    })?;
    match found[..] {
        [] => Ok(None),
        [handle] => Ok(Some(Found {
            handle,
            check_value: session
                .attribute(handle, CKA_CHECK_VALUE)
                .unwrap_or_default(),
        })),
        _ => Err(format!(
            "the token holds {} secret keys labelled \"{label}\" where the group needs exactly \
             one domain key; remove the extra ones",
            found.len()
        )),
    }
}

/// The domain key template, attribute for attribute as the fixtures'
/// `provision_domain` makes it: a trusted AES key that only wraps and
/// unwraps, public (the SO creates it), sensitive and never extractable.
pub fn template(label: &str, value: &[u8; 32], token: bool) -> Zeroizing<Template> {
    Zeroizing::new(vec![
        (CKA_CLASS, ulong_bytes(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, ulong_bytes(CKK_AES)),
        (CKA_TOKEN, bool_bytes(token)),
        (CKA_PRIVATE, bool_bytes(false)),
        (CKA_LABEL, label.as_bytes().to_vec()),
        (CKA_VALUE, value.to_vec()),
        (CKA_SENSITIVE, bool_bytes(true)),
        (CKA_EXTRACTABLE, bool_bytes(false)),
        (CKA_TRUSTED, bool_bytes(true)),
        (CKA_WRAP, bool_bytes(true)),
        (CKA_UNWRAP, bool_bytes(true)),
        (CKA_ENCRYPT, bool_bytes(false)),
        (CKA_DECRYPT, bool_bytes(false)),
    ])
}

/// The check value the token computes for `value`, found by creating it as
/// a session object (not trusted: a user session may make that) and
/// destroying it at once; nothing stays on the token. `None` when the token
/// gives no `CKA_CHECK_VALUE`.
pub fn trial_check_value(
    session: &Session,
    label: &str,
    value: &[u8; 32],
) -> Result<Option<Vec<u8>>, CK_RV> {
    let mut trial = template(label, value, false);
    trial.retain(|(t, _)| *t != CKA_TRUSTED);
    let handle = session.create(&mut trial)?;
    let check = session.attribute(handle, CKA_CHECK_VALUE);
    // A session object goes with the session anyway.
    let _ = session.destroy(handle);
    Ok(check.filter(|c| !c.is_empty()))
}

/// Creates the domain key on the token; `session` must be logged in as SO.
pub fn provision(session: &Session, label: &str, value: &[u8; 32]) -> Result<Found, CK_RV> {
    let mut template = template(label, value, true);
    let handle = session.create(&mut template)?;
    Ok(Found {
        handle,
        check_value: session
            .attribute(handle, CKA_CHECK_VALUE)
            .unwrap_or_default(),
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_hkdf_sha256_bound_to_the_label() {
        // RFC 5869 test case 1, with this crate's salt and a label as info:
        // checks the parameters are wired as documented.
        let a = derive(b"0123456789abcdef0123", "pkcs11-ha-domain");
        let b = derive(b"0123456789abcdef0123", "pkcs11-ha-domain");
        let c = derive(b"0123456789abcdef0123", "other-domain");
        let d = derive(b"0123456789abcdef0124", "pkcs11-ha-domain");
        assert_eq!(*a, *b);
        assert_ne!(*a, *c);
        assert_ne!(*a, *d);
        let mut expected = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"pkcs11-ha domain"), b"0123456789abcdef0123")
            .expand(b"pkcs11-ha-domain", &mut expected)
            .unwrap();
        assert_eq!(*a, expected);
    }

    #[test]
    fn rfc5869_case_1() {
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&salt), &ikm)
            .expand(&info, &mut okm)
            .unwrap();
        assert_eq!(
            hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn template_matches_the_security_model() {
        let t = template("d", &[7; 32], true);
        let get = |a| {
            t.iter()
                .find(|(t, _)| *t == a)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(CKA_TRUSTED), [CK_TRUE]);
        assert_eq!(get(CKA_EXTRACTABLE), [CK_FALSE]);
        assert_eq!(get(CKA_ENCRYPT), [CK_FALSE]);
        assert_eq!(get(CKA_PRIVATE), [CK_FALSE]);
        assert_eq!(get(CKA_LABEL), b"d");
        assert_eq!(t.len(), 13);
    }
}
