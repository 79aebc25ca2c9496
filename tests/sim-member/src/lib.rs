//! A test-only PKCS#11 library of in-memory tokens with faults the test
//! plants: the simulated members of `tests/simulation.rs`. pkcs11-ha loads
//! it through its ordinary `dlopen` path, so the member code under test is
//! the real one.
//!
//! Deterministic: no threads, no clock, no randomness but a seeded
//! counter; one lock around the whole state. Tokens keep their objects
//! across `C_Finalize`/`C_Initialize` (as a real token does) until
//! `sim_reset`. What the tokens compute is in `token.rs`.
//!
//! Control API, for the test after it `dlopen`s the same path:
//! - `sim_reset(tokens: u32, first: u32, networked: bool, seed: u64)`:
//!   that many fresh tokens, each holding the domain key
//!   (`pkcs11-ha-domain`, 32 bytes of 0x42), user PIN `1234`, serial
//!   `51500000000000NN` with NN from `first`, slot ID `10 +` its index
//!   here; `networked`: the library stands for a client of a server,
//!   whose connection a restarted token loses;
//! - `sim_fault(token: u32, fault: u32) -> CK_RV` plants a fault (codes in
//!   `token::Fault::from_code`), `sim_heal(token: u32) -> CK_RV` ends them;
//! - `sim_objects(token: u32, buffer: *mut u8, len: usize) -> usize`: the
//!   token objects, one line each, `class label id value` (hex), into the
//!   buffer if it is large enough; returns the length needed;
//! - `sim_sessions(token: u32) -> u32`: sessions open on the token;
//! - `sim_on_stall(hook)`: `hook(token)` runs when a call that met a stall
//!   (`token::Fault::Stall`) has been carried out, outside the library's
//!   lock, before the call returns: the driver lets time pass in it.
#![deny(unsafe_op_in_unsafe_fn)]
// The entry points keep their PKCS#11 names.
#![allow(non_snake_case)]

mod token;

use cryptoki_sys::*;
use parking_lot::Mutex;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use token::{Attributes, Fault, Result, Sim, FIRST_SLOT, MECHANISMS};

static SIM: Mutex<Option<Sim>> = Mutex::new(None);

/// What runs while a call is stalled (`sim_on_stall`).
type StallHook = extern "C" fn(u32);

static STALL_HOOK: Mutex<Option<StallHook>> = Mutex::new(None);

/// Runs `f` on the state, turning a panic into `CKR_GENERAL_ERROR`; a call
/// that met a stall then waits in the stall hook.
fn with_sim(f: impl FnOnce(&mut Sim) -> Result<()>) -> CK_RV {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut guard = SIM.lock();
        let sim = guard.get_or_insert_with(Sim::default);
        let result = f(sim);
        (result, sim.stalled.take())
    }))
    .map(|(result, stalled)| {
        let hook = *STALL_HOOK.lock();
        if let (Some(token), Some(hook)) = (stalled, hook) {
            hook(token as u32);
        }
        result
    });
    match outcome {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// [`with_sim`] for an entry point other than `C_Initialize`.
fn entry(f: impl FnOnce(&mut Sim) -> Result<()>) -> CK_RV {
    with_sim(|sim| {
        if !sim.initialized {
            return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
        }
        f(sim)
    })
}

/// The application's buffer as a slice (empty for NULL with length 0).
///
/// # Safety
/// `data` must be NULL or readable for `len` bytes.
unsafe fn input<'a>(data: *const u8, len: CK_ULONG) -> Result<&'a [u8]> {
    if data.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: the caller vouches for `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(data, len as usize) })
}

/// Two-call convention: reports the length with a NULL `out`, fails with
/// `CKR_BUFFER_TOO_SMALL` on too little room, else copies. True when copied.
///
/// # Safety
/// `out_len` must be valid; `out`, when not NULL, writable for `*out_len`.
unsafe fn output(bytes: &[u8], out: *mut u8, out_len: *mut CK_ULONG) -> Result<bool> {
    if out_len.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: checked non-NULL; the caller vouches for the rest.
    unsafe {
        let room = *out_len as usize;
        *out_len = bytes.len() as CK_ULONG;
        if out.is_null() {
            return Ok(false);
        }
        if room < bytes.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len());
    }
    Ok(true)
}

/// A template's attributes.
///
/// # Safety
/// `template` must be NULL or readable for `count` attributes whose values
/// are readable for their lengths.
unsafe fn template(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<Attributes> {
    if template.is_null() {
        return if count == 0 {
            Ok(Attributes::new())
        } else {
            Err(CKR_ARGUMENTS_BAD)
        };
    }
    // SAFETY: the caller vouches for `count` attributes.
    let entries = unsafe { std::slice::from_raw_parts(template, count as usize) };
    let mut attributes = Attributes::new();
    for a in entries {
        if a.pValue.is_null() && a.ulValueLen != 0 {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        // SAFETY: the caller vouches for the value's length.
        let value = unsafe { input(a.pValue as *const u8, a.ulValueLen) }?;
        attributes.insert(a.type_, value.to_vec());
    }
    Ok(attributes)
}

/// The mechanism's type; parameters are not used by any simulated mechanism.
///
/// # Safety
/// `mechanism` must be NULL or valid for reading.
unsafe fn mechanism_type(mechanism: CK_MECHANISM_PTR) -> Result<CK_MECHANISM_TYPE> {
    if mechanism.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: checked non-NULL.
    Ok(unsafe { (*mechanism).mechanism })
}

/// Writes `value` through `out`, `CKR_ARGUMENTS_BAD` for NULL.
///
/// # Safety
/// `out` must be NULL or valid for one write.
unsafe fn put<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: checked non-NULL.
    unsafe { out.write(value) };
    Ok(())
}

fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut field = [b' '; N];
    field[..text.len().min(N)].copy_from_slice(&text.as_bytes()[..text.len().min(N)]);
    field
}

const VERSION: CK_VERSION = CK_VERSION {
    major: 2,
    minor: 40,
};

/// The only PKCS#11 export: a 2.40 table.
///
/// # Safety
/// `list` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: checked non-NULL; callers only read the table.
    unsafe { *list = ptr::addr_of!(FUNCTION_LIST).cast_mut() };
    CKR_OK
}

unsafe extern "C" fn C_Initialize(_args: *mut c_void) -> CK_RV {
    with_sim(|sim| {
        if std::mem::replace(&mut sim.initialized, true) {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        sim.disconnected = false;
        Ok(())
    })
}

unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    entry(|sim| {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        for token in 0..sim.tokens.len() {
            sim.drop_sessions(token);
        }
        sim.initialized = false;
        Ok(())
    })
}

unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    entry(|_| {
        let value = CK_INFO {
            cryptokiVersion: VERSION,
            manufacturerID: padded("pkcs11-ha simulation"),
            flags: 0,
            libraryDescription: padded("simulated member"),
            libraryVersion: CK_VERSION { major: 1, minor: 0 },
        };
        // SAFETY: the caller's pointer, checked by `put`.
        unsafe { put(info, value) }
    })
}

unsafe extern "C" fn C_GetSlotList(
    present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        let present_only = present == CK_TRUE;
        let slots: Vec<CK_SLOT_ID> = if present_only || sim.disconnected {
            sim.present_tokens()?
        } else {
            (0..sim.tokens.len() as CK_SLOT_ID)
                .map(|i| FIRST_SLOT + i)
                .collect()
        };
        if count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: `count` is non-NULL; a non-NULL `list` holds `*count` entries.
        unsafe {
            let room = *count as usize;
            *count = slots.len() as CK_ULONG;
            if !list.is_null() {
                if room < slots.len() {
                    return Err(CKR_BUFFER_TOO_SMALL);
                }
                ptr::copy_nonoverlapping(slots.as_ptr(), list, slots.len());
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    entry(|sim| {
        let token = sim.token_index(slot)?;
        let present = sim.present_tokens()?.contains(&slot);
        let value = CK_SLOT_INFO {
            slotDescription: padded(&format!("simulated slot {token}")),
            manufacturerID: padded("pkcs11-ha simulation"),
            flags: if present { CKF_TOKEN_PRESENT } else { 0 },
            hardwareVersion: VERSION,
            firmwareVersion: VERSION,
        };
        // SAFETY: the caller's pointer, checked by `put`.
        unsafe { put(info, value) }
    })
}

unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    entry(|sim| {
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
        let value = CK_TOKEN_INFO {
            label: padded(&format!("sim-{token}")),
            manufacturerID: padded("pkcs11-ha simulation"),
            model: padded("sim"),
            serialNumber: padded(&sim.tokens[token].serial),
            flags: CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxPinLen: 64,
            ulMinPinLen: 4,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: VERSION,
            firmwareVersion: VERSION,
            utcTime: padded(""),
        };
        // SAFETY: the caller's pointer, checked by `put`.
        unsafe { put(info, value) }
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
        if count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: `count` is non-NULL; a non-NULL `list` holds `*count` entries.
        unsafe {
            let room = *count as usize;
            *count = MECHANISMS.len() as CK_ULONG;
            if !list.is_null() {
                if room < MECHANISMS.len() {
                    return Err(CKR_BUFFER_TOO_SMALL);
                }
                for (i, (mechanism, _)) in MECHANISMS.iter().enumerate() {
                    *list.add(i) = *mechanism;
                }
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    entry(|sim| {
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
        let (_, flags) = MECHANISMS
            .iter()
            .find(|(m, _)| *m == mechanism)
            .ok_or(CKR_MECHANISM_INVALID)?;
        let value = CK_MECHANISM_INFO {
            ulMinKeySize: 16,
            ulMaxKeySize: 32,
            flags: *flags,
        };
        // SAFETY: the caller's pointer, checked by `put`.
        unsafe { put(info, value) }
    })
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    entry(|sim| {
        if session.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let token = sim.token_index(slot)?;
        let handle = sim.open_session(token, flags)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(session, handle) }
    })
}

unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    entry(|sim| sim.close_session(session))
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    entry(|sim| {
        let token = sim.token_index(slot)?;
        sim.close_all_sessions(token)
    })
}

unsafe extern "C" fn C_GetSessionInfo(
    session: CK_SESSION_HANDLE,
    info: *mut CK_SESSION_INFO,
) -> CK_RV {
    entry(|sim| {
        let (token, rw, user) = sim.session_state(session)?;
        let state = match (rw, user) {
            (true, true) => CKS_RW_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (false, false) => CKS_RO_PUBLIC_SESSION,
        };
        let value = CK_SESSION_INFO {
            slotID: FIRST_SLOT + token as CK_SLOT_ID,
            state,
            flags: CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 },
            ulDeviceError: 0,
        };
        // SAFETY: the caller's pointer, checked by `put`.
        unsafe { put(info, value) }
    })
}

unsafe extern "C" fn C_Login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's PIN buffer of `pin_len` bytes.
        let pin = unsafe { input(pin, pin_len) }?;
        sim.login(session, user, pin)
    })
}

unsafe extern "C" fn C_Logout(session: CK_SESSION_HANDLE) -> CK_RV {
    entry(|sim| sim.logout(session))
}

unsafe extern "C" fn C_CreateObject(
    session: CK_SESSION_HANDLE,
    attributes: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry(|sim| {
        if object.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's template of `count` attributes.
        let attributes = unsafe { template(attributes, count) }?;
        let handle = sim.create_object(session, attributes)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(object, handle) }
    })
}

unsafe extern "C" fn C_DestroyObject(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry(|sim| sim.destroy_object(session, object))
}

unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    attributes: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        if attributes.is_null() && count != 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        if count == 0 {
            return Ok(());
        }
        // SAFETY: the caller's template of `count` attributes, non-NULL.
        let entries = unsafe { std::slice::from_raw_parts_mut(attributes, count as usize) };
        let types: Vec<CK_ATTRIBUTE_TYPE> = entries.iter().map(|a| a.type_).collect();
        let values = sim.attributes(session, object, &types)?;
        let mut rv = CKR_OK;
        for (entry, value) in entries.iter_mut().zip(values) {
            match value {
                Err(e) => {
                    entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = e;
                }
                Ok(None) => {
                    entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = CKR_ATTRIBUTE_TYPE_INVALID;
                }
                Ok(Some(bytes)) => {
                    if entry.pValue.is_null() {
                        entry.ulValueLen = bytes.len() as CK_ULONG;
                    } else if (entry.ulValueLen as usize) < bytes.len() {
                        entry.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        rv = CKR_BUFFER_TOO_SMALL;
                    } else {
                        // SAFETY: the caller's buffer holds `ulValueLen` bytes.
                        unsafe {
                            ptr::copy_nonoverlapping(
                                bytes.as_ptr(),
                                entry.pValue as *mut u8,
                                bytes.len(),
                            )
                        };
                        entry.ulValueLen = bytes.len() as CK_ULONG;
                    }
                }
            }
        }
        if rv == CKR_OK {
            Ok(())
        } else {
            Err(rv)
        }
    })
}

unsafe extern "C" fn C_FindObjectsInit(
    session: CK_SESSION_HANDLE,
    attributes: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's template of `count` attributes.
        let attributes = unsafe { template(attributes, count) }?;
        sim.find_init(session, attributes)
    })
}

unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    room: CK_ULONG,
    found: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        if objects.is_null() || found.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let handles = sim.find(session, room as usize)?;
        // SAFETY: `objects` holds `room` entries, `handles` has at most that many.
        unsafe {
            ptr::copy_nonoverlapping(handles.as_ptr(), objects, handles.len());
            put(found, handles.len() as CK_ULONG)
        }
    })
}

unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    entry(|sim| sim.find_final(session))
}

/// `C_DigestInit`, `C_SignInit`, ...: `kind` names the operation.
///
/// # Safety
/// `mechanism` must be NULL or valid for reading.
unsafe fn operation_init(
    kind: u8,
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: Option<CK_OBJECT_HANDLE>,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's mechanism.
        let mechanism = unsafe { mechanism_type(mechanism) }?;
        sim.operation_init(session, mechanism, key, kind)
    })
}

/// `C_Digest`, `C_Sign`, `C_Encrypt`, `C_Decrypt`.
///
/// # Safety
/// The caller's buffers, as the two-call convention has them.
unsafe fn single(
    session: CK_SESSION_HANDLE,
    data: *const u8,
    data_len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's input buffer.
        let data = unsafe { input(data, data_len) }?;
        let result = sim.operation_single(session, data);
        let result = result.inspect_err(|_| sim.operation_end(session))?;
        // SAFETY: the caller's output buffer.
        match unsafe { output(&result, out, out_len) } {
            Ok(true) => {
                sim.operation_end(session);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(CKR_BUFFER_TOO_SMALL) => Err(CKR_BUFFER_TOO_SMALL),
            Err(e) => {
                sim.operation_end(session);
                Err(e)
            }
        }
    })
}

/// `C_DigestUpdate`, `C_SignUpdate`, `C_VerifyUpdate`.
///
/// # Safety
/// `data` must be NULL or readable for `len` bytes.
unsafe fn update(session: CK_SESSION_HANDLE, data: *const u8, len: CK_ULONG) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's input buffer.
        let data = unsafe { input(data, len) }?;
        sim.operation_update(session, data)
            .inspect_err(|_| sim.operation_end(session))
            .map(|_| ())
    })
}

/// `C_EncryptUpdate`, `C_DecryptUpdate`: output as long as the input.
///
/// # Safety
/// The caller's buffers, as the two-call convention has them.
unsafe fn crypt_update(
    session: CK_SESSION_HANDLE,
    data: *const u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's input buffer.
        let data = unsafe { input(data, len) }?;
        if out_len.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: checked non-NULL.
        let room = unsafe { *out_len } as usize;
        if out.is_null() || room < data.len() {
            sim.enter_session(session)?;
            // SAFETY: checked non-NULL.
            unsafe { *out_len = data.len() as CK_ULONG };
            return if out.is_null() {
                Ok(())
            } else {
                Err(CKR_BUFFER_TOO_SMALL)
            };
        }
        let produced = sim
            .operation_update(session, data)
            .inspect_err(|_| sim.operation_end(session))?;
        // SAFETY: the caller's output buffer, large enough (checked).
        unsafe { output(&produced, out, out_len) }.map(|_| ())
    })
}

/// `C_DigestFinal`, `C_SignFinal`, `C_EncryptFinal`, `C_DecryptFinal`.
///
/// # Safety
/// The caller's buffers, as the two-call convention has them.
unsafe fn finish(session: CK_SESSION_HANDLE, out: *mut u8, out_len: *mut CK_ULONG) -> CK_RV {
    entry(|sim| {
        let result = sim
            .operation_result(session, None)
            .inspect_err(|_| sim.operation_end(session))?;
        // SAFETY: the caller's output buffer.
        if unsafe { output(&result, out, out_len) }? {
            sim.operation_end(session);
        }
        Ok(())
    })
}

unsafe extern "C" fn C_DigestInit(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { operation_init(b'D', session, mechanism, None) }
}

unsafe extern "C" fn C_Digest(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { single(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_DigestUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffer.
    unsafe { update(session, data, len) }
}

unsafe extern "C" fn C_DigestFinal(
    session: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { finish(session, out, out_len) }
}

unsafe extern "C" fn C_SignInit(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { operation_init(b'S', session, mechanism, Some(key)) }
}

unsafe extern "C" fn C_Sign(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { single(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_SignUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffer.
    unsafe { update(session, data, len) }
}

unsafe extern "C" fn C_SignFinal(
    session: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { finish(session, out, out_len) }
}

unsafe extern "C" fn C_VerifyInit(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { operation_init(b'V', session, mechanism, Some(key)) }
}

unsafe extern "C" fn C_Verify(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    signature: *mut u8,
    signature_len: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's buffers.
        let (data, signature) = unsafe { (input(data, len)?, input(signature, signature_len)?) };
        sim.operation_update(session, data)?;
        sim.operation_result(session, Some(signature)).map(|_| ())
    })
}

unsafe extern "C" fn C_VerifyUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffer.
    unsafe { update(session, data, len) }
}

unsafe extern "C" fn C_VerifyFinal(
    session: CK_SESSION_HANDLE,
    signature: *mut u8,
    signature_len: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's buffer.
        let signature = unsafe { input(signature, signature_len) }?;
        sim.operation_result(session, Some(signature)).map(|_| ())
    })
}

unsafe extern "C" fn C_EncryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { operation_init(b'E', session, mechanism, Some(key)) }
}

unsafe extern "C" fn C_Encrypt(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { single(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_EncryptUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { crypt_update(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_EncryptFinal(
    session: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { finish(session, out, out_len) }
}

unsafe extern "C" fn C_DecryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism.
    unsafe { operation_init(b'C', session, mechanism, Some(key)) }
}

unsafe extern "C" fn C_Decrypt(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { single(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_DecryptUpdate(
    session: CK_SESSION_HANDLE,
    data: *mut u8,
    len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { crypt_update(session, data, len, out, out_len) }
}

unsafe extern "C" fn C_DecryptFinal(
    session: CK_SESSION_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { finish(session, out, out_len) }
}

unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    attributes: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry(|sim| {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's mechanism and template.
        let (mechanism, attributes) =
            unsafe { (mechanism_type(mechanism)?, template(attributes, count)?) };
        let handle = sim.generate_key(session, mechanism, attributes)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(key, handle) }
    })
}

unsafe extern "C" fn C_WrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        // SAFETY: the caller's mechanism.
        let mechanism = unsafe { mechanism_type(mechanism) }?;
        let blob = sim.wrap_key(session, mechanism, wrapping, key)?;
        // SAFETY: the caller's output buffer.
        unsafe { output(&blob, out, out_len) }.map(|_| ())
    })
}

unsafe extern "C" fn C_UnwrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: *mut u8,
    wrapped_len: CK_ULONG,
    attributes: CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    entry(|sim| {
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's mechanism, blob and template.
        let (mechanism, blob, attributes) = unsafe {
            (
                mechanism_type(mechanism)?,
                input(wrapped, wrapped_len)?,
                template(attributes, count)?,
            )
        };
        let handle = sim.unwrap_key(session, mechanism, unwrapping, blob, attributes)?;
        // SAFETY: checked non-NULL above.
        unsafe { put(key, handle) }
    })
}

unsafe extern "C" fn C_GenerateRandom(
    session: CK_SESSION_HANDLE,
    out: *mut u8,
    len: CK_ULONG,
) -> CK_RV {
    entry(|sim| {
        if out.is_null() && len != 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let bytes = sim.random(session, len as usize)?;
        // SAFETY: the caller's buffer of `len` bytes.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
        Ok(())
    })
}

static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: VERSION,
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: None,
    C_InitPIN: None,
    C_SetPIN: None,
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: None,
    C_SetOperationState: None,
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: None,
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: None,
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: None,
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: None,
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: None,
    C_SignRecover: None,
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: None,
    C_VerifyRecover: None,
    C_DigestEncryptUpdate: None,
    C_DecryptDigestUpdate: None,
    C_SignEncryptUpdate: None,
    C_DecryptVerifyUpdate: None,
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: None,
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: None,
    C_SeedRandom: None,
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: None,
    C_CancelFunction: None,
    C_WaitForSlotEvent: None,
};

/// Starts over with `tokens` fresh tokens (see the crate doc).
#[no_mangle]
pub extern "C" fn sim_reset(tokens: u32, first: u32, networked: bool, seed: u64) {
    with_sim(|sim| {
        sim.reset(tokens as usize, first as usize, networked, seed);
        Ok(())
    });
}

/// Plants fault `fault` (see `token::Fault::from_code`) on token `token`.
#[no_mangle]
pub extern "C" fn sim_fault(token: u32, fault: u32) -> CK_RV {
    with_sim(|sim| {
        let fault = Fault::from_code(fault).ok_or(CKR_ARGUMENTS_BAD)?;
        let token = token as usize;
        if token >= sim.tokens.len() {
            return Err(CKR_SLOT_ID_INVALID);
        }
        sim.set_fault(token, fault);
        Ok(())
    })
}

/// Ends the faults on token `token`; a crashed token restarts.
#[no_mangle]
pub extern "C" fn sim_heal(token: u32) -> CK_RV {
    with_sim(|sim| {
        let token = token as usize;
        if token >= sim.tokens.len() {
            return Err(CKR_SLOT_ID_INVALID);
        }
        sim.heal(token);
        Ok(())
    })
}

/// The token objects of token `token` as text (see the crate doc).
///
/// # Safety
/// `buffer` must be NULL or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sim_objects(token: u32, buffer: *mut u8, len: usize) -> usize {
    let mut text = String::new();
    with_sim(|sim| {
        let t = sim.tokens.get(token as usize).ok_or(CKR_SLOT_ID_INVALID)?;
        let hex = |v: Option<&Vec<u8>>| {
            v.map_or(String::from("-"), |v| {
                v.iter().fold(String::from("x"), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                })
            })
        };
        for object in t.token_objects() {
            let a = &object.attributes;
            let _ = writeln!(
                text,
                "{} {} {} {}",
                hex(a.get(&CKA_CLASS)),
                hex(a.get(&CKA_LABEL)),
                hex(a.get(&CKA_ID)),
                hex(a.get(&CKA_VALUE)),
            );
        }
        Ok(())
    });
    if !buffer.is_null() && len >= text.len() {
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe { ptr::copy_nonoverlapping(text.as_ptr(), buffer, text.len()) };
    }
    text.len()
}

/// Sets the hook a stalled call waits in (see the crate doc).
#[no_mangle]
pub extern "C" fn sim_on_stall(hook: Option<StallHook>) {
    *STALL_HOOK.lock() = hook;
}

/// Sessions open on token `token`.
#[no_mangle]
pub extern "C" fn sim_sessions(token: u32) -> u32 {
    let mut open = 0;
    with_sim(|sim| {
        open = sim
            .sessions
            .values()
            .filter(|s| s.token == token as usize)
            .count() as u32;
        Ok(())
    });
    open
}
