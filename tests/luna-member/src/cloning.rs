//! Luna's cloning extensions over SoftHSM: `CA_CloneObject`,
//! `CA_MigrateKeys` and `CA_GetContainerPolicySetting` (signatures as
//! Thales documents them and pycryptoki binds them).
//!
//! A key moves wrapped under its cloning domain's key, found on an own
//! session of this library and hidden from every search (see the crate
//! doc); the wrapped blob lives in this library's memory for one call.

use std::ptr;

use cryptoki_sys::*;

use crate::partition::{Mode, Real};
use crate::{enter, guard, CKR_OPERATION_NOT_ALLOWED};

/// Luna's answer when cloning an object failed on the way.
const CKR_FAILED_TO_CLONE_AN_OBJECT: CK_RV = 0x8000_0106;
/// `ulObjectType` of a PKCS#11 object.
const OBJECT_TYPE_CRYPTOKI: CK_ULONG = 0;
/// `CA_MigrateKeys` flag: go on with the next object after a failure.
const CKF_CONTINUE_ON_ERR: CK_ULONG = 0x01;
/// The two partition policies the modes are made of.
const POLICY_PRIVATE_KEY_CLONING: CK_ULONG = 0;
const POLICY_PRIVATE_KEY_WRAPPING: CK_ULONG = 1;
/// Label prefix of the hidden cloning-domain keys.
pub(crate) const DOMAIN_LABEL_PREFIX: &str = "luna-member-cloning-domain:";

/// What a copy of a key carries over (the values a token computes itself
/// are left to it).
const KEY_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_SUBJECT,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_SIGN_RECOVER,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_MODIFIABLE,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_ALLOWED_MECHANISMS,
];

/// What a copy of a public object carries over.
const PUBLIC_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_SUBJECT,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_ENCRYPT,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_DERIVE,
    CKA_MODIFIABLE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_VALUE,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
    CKA_ALLOWED_MECHANISMS,
];

/// One attribute's value, `None` where the object has none or it cannot
/// be read.
fn read(
    real: &Real,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    type_: CK_ATTRIBUTE_TYPE,
) -> Option<Vec<u8>> {
    let get = real.list.C_GetAttributeValue?;
    let mut attribute = CK_ATTRIBUTE {
        type_,
        pValue: ptr::null_mut(),
        ulValueLen: 0,
    };
    // SAFETY: a NULL value asks for the length.
    if unsafe { get(session, object, &mut attribute, 1) } != CKR_OK
        || attribute.ulValueLen == CK_UNAVAILABLE_INFORMATION
    {
        return None;
    }
    let mut value = vec![0u8; attribute.ulValueLen as usize];
    attribute.pValue = value.as_mut_ptr().cast();
    // SAFETY: `value` holds the length just reported.
    if unsafe { get(session, object, &mut attribute, 1) } != CKR_OK {
        return None;
    }
    value.truncate(attribute.ulValueLen as usize);
    Some(value)
}

pub(crate) fn read_ulong(
    real: &Real,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    type_: CK_ATTRIBUTE_TYPE,
) -> Option<CK_ULONG> {
    let bytes = read(real, session, object, type_)?;
    Some(CK_ULONG::from_ne_bytes(bytes.try_into().ok()?))
}

/// Whether `object` is one of the hidden cloning-domain keys.
pub(crate) fn is_domain_key(
    real: &Real,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> bool {
    read(real, session, object, CKA_LABEL)
        .is_some_and(|label| label.starts_with(DOMAIN_LABEL_PREFIX.as_bytes()))
}

/// The cloning domain's key on a slot, looked up on a session of this
/// library's own (the caller's sessions may have a search active).
fn domain_key(real: &Real, slot: CK_SLOT_ID, domain: &str) -> Option<CK_OBJECT_HANDLE> {
    let l = &real.list;
    let (open, close) = (l.C_OpenSession?, l.C_CloseSession?);
    let (init, find, fin) = (
        l.C_FindObjectsInit?,
        l.C_FindObjects?,
        l.C_FindObjectsFinal?,
    );
    let mut session = 0;
    // SAFETY: a read-only session without callbacks.
    if unsafe {
        open(
            slot,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            &mut session,
        )
    } != CKR_OK
    {
        return None;
    }
    let mut label = format!("{DOMAIN_LABEL_PREFIX}{domain}").into_bytes();
    let mut class = CKO_SECRET_KEY.to_ne_bytes();
    let mut template = [
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: class.as_mut_ptr().cast(),
            ulValueLen: class.len() as CK_ULONG,
        },
        CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: label.as_mut_ptr().cast(),
            ulValueLen: label.len() as CK_ULONG,
        },
    ];
    let mut found = [0; 2];
    let mut n: CK_ULONG = 0;
    // SAFETY: live local buffers of the sizes given.
    unsafe {
        if init(session, template.as_mut_ptr(), 2) == CKR_OK {
            find(session, found.as_mut_ptr(), 2, &mut n);
            fin(session);
        }
        close(session);
    }
    (n == 1).then_some(found[0])
}

/// Clones `object` from the source session to the target session.
fn clone_one(
    real: &Real,
    target: CK_SESSION_HANDLE,
    source: CK_SESSION_HANDLE,
    object_type: CK_ULONG,
    object: CK_OBJECT_HANDLE,
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    if object_type != OBJECT_TYPE_CRYPTOKI {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let (source_slot, from, source_state) = real.session_partition(source)?;
    let (target_slot, to, target_state) = real.session_partition(target)?;
    let logged_in = |state| matches!(state, CKS_RO_USER_FUNCTIONS | CKS_RW_USER_FUNCTIONS);
    if !logged_in(source_state) || !logged_in(target_state) {
        return Err(CKR_USER_NOT_LOGGED_IN);
    }
    let class = read_ulong(real, source, object, CKA_CLASS).ok_or(CKR_OBJECT_HANDLE_INVALID)?;
    if class == CKO_PRIVATE_KEY && (from.mode != Mode::Cloning || to.mode != Mode::Cloning) {
        return Err(CKR_OPERATION_NOT_ALLOWED);
    }
    if from.domain != to.domain {
        return Err(CKR_FAILED_TO_CLONE_AN_OBJECT);
    }
    let secret = class == CKO_SECRET_KEY || class == CKO_PRIVATE_KEY;
    let types = if secret {
        KEY_ATTRIBUTES
    } else {
        PUBLIC_ATTRIBUTES
    };
    let mut values: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> = types
        .iter()
        .filter_map(|t| read(real, source, object, *t).map(|v| (*t, v)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let mut template: Vec<CK_ATTRIBUTE> = values
        .iter_mut()
        .map(|(t, v)| CK_ATTRIBUTE {
            type_: *t,
            pValue: v.as_mut_ptr().cast(),
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect();
    let mut cloned = CK_INVALID_HANDLE;
    if !secret {
        let create = real.list.C_CreateObject.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: a template of live local values.
        let rv = unsafe {
            create(
                target,
                template.as_mut_ptr(),
                template.len() as CK_ULONG,
                &mut cloned,
            )
        };
        return if rv == CKR_OK { Ok(cloned) } else { Err(rv) };
    }
    let (Some(wrapping), Some(unwrapping)) = (
        domain_key(real, source_slot, &from.domain),
        domain_key(real, target_slot, &to.domain),
    ) else {
        eprintln!(
            "luna-member: a partition lacks the key of cloning domain {:?}",
            from.domain
        );
        return Err(CKR_FAILED_TO_CLONE_AN_OBJECT);
    };
    let wrap = real.list.C_WrapKey.ok_or(CKR_GENERAL_ERROR)?;
    let unwrap = real.list.C_UnwrapKey.ok_or(CKR_GENERAL_ERROR)?;
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_WRAP_PAD,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut len: CK_ULONG = 0;
    // SAFETY: a NULL buffer asks for the length.
    if unsafe {
        wrap(
            source,
            &mut mechanism,
            wrapping,
            object,
            ptr::null_mut(),
            &mut len,
        )
    } != CKR_OK
    {
        return Err(CKR_FAILED_TO_CLONE_AN_OBJECT);
    }
    let mut blob = vec![0u8; len as usize];
    // SAFETY: `blob` holds the length just reported.
    let rv = unsafe {
        wrap(
            source,
            &mut mechanism,
            wrapping,
            object,
            blob.as_mut_ptr(),
            &mut len,
        )
    };
    let rv = if rv == CKR_OK {
        // SAFETY: the wrapped blob and a template of live local values.
        unsafe {
            unwrap(
                target,
                &mut mechanism,
                unwrapping,
                blob.as_mut_ptr(),
                len,
                template.as_mut_ptr(),
                template.len() as CK_ULONG,
                &mut cloned,
            )
        }
    } else {
        CKR_FAILED_TO_CLONE_AN_OBJECT
    };
    blob.fill(0);
    match rv {
        CKR_OK => Ok(cloned),
        _ => Err(CKR_FAILED_TO_CLONE_AN_OBJECT),
    }
}

/// # Safety
/// `cloned` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn CA_CloneObject(
    target: CK_SESSION_HANDLE,
    source: CK_SESSION_HANDLE,
    object_type: CK_ULONG,
    object: CK_OBJECT_HANDLE,
    cloned: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let real = enter("CA_CloneObject")?;
        if cloned.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let handle = clone_one(real, target, source, object_type, object)?;
        // SAFETY: checked non-NULL.
        unsafe { *cloned = handle };
        Ok(CKR_OK)
    })
}

/// One entry of `CA_MigrateKeys`' array.
#[repr(C)]
pub struct CK_OBJECT_MIGRATION_DATA {
    pub object_type: CK_ULONG,
    pub source_handle: CK_OBJECT_HANDLE,
    pub target_handle: CK_OBJECT_HANDLE,
    pub rv: CK_RV,
}

/// Clones each object of `data`; stops at the first failure unless
/// `CKF_CONTINUE_ON_ERR`. Each entry gets its own answer; the call
/// answers the first failure's.
///
/// # Safety
/// `data` is NULL or holds `count` entries.
#[no_mangle]
pub unsafe extern "C" fn CA_MigrateKeys(
    source: CK_SESSION_HANDLE,
    target: CK_SESSION_HANDLE,
    flags: CK_ULONG,
    count: CK_ULONG,
    data: *mut CK_OBJECT_MIGRATION_DATA,
) -> CK_RV {
    guard(|| {
        let real = enter("CA_MigrateKeys")?;
        if !crate::partition::migrate_keys() {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        }
        if data.is_null() || count == 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller vouches for `count` entries.
        let entries = unsafe { std::slice::from_raw_parts_mut(data, count as usize) };
        let mut first_failure = CKR_OK;
        for entry in entries {
            match clone_one(real, target, source, entry.object_type, entry.source_handle) {
                Ok(handle) => {
                    entry.target_handle = handle;
                    entry.rv = CKR_OK;
                }
                Err(rv) => {
                    entry.target_handle = CK_INVALID_HANDLE;
                    entry.rv = rv;
                    if first_failure == CKR_OK {
                        first_failure = rv;
                    }
                    if flags & CKF_CONTINUE_ON_ERR == 0 {
                        break;
                    }
                }
            }
        }
        Ok(first_failure)
    })
}

/// A partition policy's value: policies 0 and 1 from the partition's mode
/// (the container number is not used: one slot is one partition here).
///
/// # Safety
/// `value` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn CA_GetContainerPolicySetting(
    slot: CK_SLOT_ID,
    _container: CK_ULONG,
    policy: CK_ULONG,
    value: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let real = enter("CA_GetContainerPolicySetting")?;
        if !crate::partition::policy_api() {
            return Err(CKR_FUNCTION_NOT_SUPPORTED);
        }
        let partition = real.partition(slot).ok_or(CKR_SLOT_ID_INVALID)?;
        if value.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let on = match policy {
            POLICY_PRIVATE_KEY_CLONING => partition.mode == Mode::Cloning,
            POLICY_PRIVATE_KEY_WRAPPING => partition.mode == Mode::KeyExport,
            _ => return Err(CKR_ARGUMENTS_BAD),
        };
        // SAFETY: checked non-NULL.
        unsafe { *value = CK_ULONG::from(on) };
        Ok(CKR_OK)
    })
}
