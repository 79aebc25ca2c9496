//! How one object is recognised on another member: member handles differ,
//! so an object is found again by a fingerprint of attributes that are
//! public and bound to its content.
//!
//! Collisions: a fingerprint that matches more than one object on a member
//! identifies none of them; the object is then treated as absent there, and
//! that member does not serve operations on it. We never guess.

use crate::member::member_call;
use crate::member::MemberLibrary;
use cryptoki_sys::*;
use std::ptr;

/// Attributes that make up the fingerprint, where the object has them and
/// lets them be read. Secret values are never read: a sensitive
/// `CKA_VALUE` is simply unavailable and left out.
const FINGERPRINT: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_TOKEN,
    CKA_ID,
    CKA_LABEL,
    CKA_CHECK_VALUE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_POINT,
    CKA_EC_PARAMS,
    CKA_SERIAL_NUMBER,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
];

/// Attributes whose value may be read for the fingerprint only when the
/// object is not sensitive (certificates, data objects, public keys).
const PUBLIC_VALUE: CK_ATTRIBUTE_TYPE = CKA_VALUE;

pub type Fingerprint = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

/// Reads the fingerprint of `object` through a member session; `None` when
/// the member cannot tell (it failed, or the handle is gone), since an
/// empty fingerprint would match every object.
pub fn fingerprint(
    library: &MemberLibrary,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> Option<Fingerprint> {
    let mut types: Vec<CK_ATTRIBUTE_TYPE> = FINGERPRINT.to_vec();
    let class = read_attribute(library, session, object, CKA_CLASS);
    class.as_ref()?;
    let is_public_data = class
        .as_deref()
        .map(ulong_of)
        .is_some_and(|c| c == CKO_CERTIFICATE || c == CKO_DATA || c == CKO_PUBLIC_KEY);
    if is_public_data {
        types.push(PUBLIC_VALUE);
    }
    Some(
        types
            .into_iter()
            .filter_map(|t| read_attribute(library, session, object, t).map(|v| (t, v)))
            .collect(),
    )
}

/// The objects on a member whose attributes match `fingerprint`. A check
/// value matches where both sides have one: SoftHSM computes none for a
/// key it unwrapped, so a copy may lack what its original has.
pub fn find(
    library: &MemberLibrary,
    session: CK_SESSION_HANDLE,
    fingerprint: &Fingerprint,
) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
    let check_value = fingerprint
        .iter()
        .find(|(t, v)| *t == CKA_CHECK_VALUE && !v.is_empty())
        .map(|(_, v)| v);
    let found = find_matching(library, session, fingerprint)?;
    Ok(match check_value {
        None => found,
        Some(expected) => found
            .into_iter()
            .filter(|h| {
                read_attribute(library, session, *h, CKA_CHECK_VALUE)
                    .is_none_or(|v| v.is_empty() || v == *expected)
            })
            .collect(),
    })
}

fn find_matching(
    library: &MemberLibrary,
    session: CK_SESSION_HANDLE,
    fingerprint: &Fingerprint,
) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
    let mut template: Vec<CK_ATTRIBUTE> = fingerprint
        .iter()
        .filter(|(t, _)| *t != CKA_CHECK_VALUE)
        .map(|(t, v)| CK_ATTRIBUTE {
            type_: *t,
            pValue: v.as_ptr() as *mut _,
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect();
    let rv = member_call!(
        library,
        C_FindObjectsInit(session, template.as_mut_ptr(), template.len() as CK_ULONG)
    );
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut found = Vec::new();
    let mut batch = [0 as CK_OBJECT_HANDLE; 16];
    let outcome = loop {
        let mut count: CK_ULONG = 0;
        let rv = member_call!(
            library,
            C_FindObjects(
                session,
                batch.as_mut_ptr(),
                batch.len() as CK_ULONG,
                &mut count
            )
        );
        if rv != CKR_OK {
            break Err(rv);
        }
        if count == 0 {
            break Ok(());
        }
        found.extend_from_slice(&batch[..count as usize]);
    };
    member_call!(library, C_FindObjectsFinal(session));
    outcome.map(|()| found)
}

/// One attribute's value, or `None` where the object lacks it or hides it.
pub fn read_attribute(
    library: &MemberLibrary,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    attribute: CK_ATTRIBUTE_TYPE,
) -> Option<Vec<u8>> {
    let mut query = CK_ATTRIBUTE {
        type_: attribute,
        pValue: ptr::null_mut(),
        ulValueLen: 0,
    };
    let rv = member_call!(library, C_GetAttributeValue(session, object, &mut query, 1));
    if rv != CKR_OK || query.ulValueLen == CK_UNAVAILABLE_INFORMATION {
        return None;
    }
    let mut value = vec![0u8; query.ulValueLen as usize];
    query.pValue = value.as_mut_ptr() as *mut _;
    let rv = member_call!(library, C_GetAttributeValue(session, object, &mut query, 1));
    if rv != CKR_OK || query.ulValueLen == CK_UNAVAILABLE_INFORMATION {
        return None;
    }
    value.truncate(query.ulValueLen as usize);
    Some(value)
}

/// A `CK_ULONG` attribute value from its bytes.
pub fn ulong_of(bytes: &[u8]) -> CK_ULONG {
    let mut raw = [0u8; std::mem::size_of::<CK_ULONG>()];
    let n = bytes.len().min(raw.len());
    raw[..n].copy_from_slice(&bytes[..n]);
    CK_ULONG::from_ne_bytes(raw)
}
