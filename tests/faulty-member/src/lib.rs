//! A test-only PKCS#11 member that forwards every 2.40 call to a real
//! library and lets a test inject latency, limited capacity and faults.
//!
//! Tests make one copy of the `.so` per simulated member: different paths
//! give independent state under `dlopen`. Each copy reads the sidecar file
//! `<its own path>.target` (`key = value` lines, `#` comments) at its first
//! `C_Initialize`:
//! - `library = /usr/lib/softhsm/libsofthsm2.so` (required): the real library;
//! - `serial = <token serial>` (optional): only that token's slot is
//!   visible; `C_GetSlotList` hides the others and calls naming them return
//!   `CKR_SLOT_ID_INVALID`;
//! - `refuse_key_wrap = true` (optional): `C_WrapKey` and `C_UnwrapKey`
//!   refuse the AES key-wrap mechanisms with `CKR_MECHANISM_INVALID`,
//!   though the mechanism list still names them (as a client library that
//!   cannot carry a mechanism does).
//!
//! Only `C_GetFunctionList` is exported (no `C_GetInterface`, so loaders take
//! the 2.40 path). Every other entry point runs the gate, in this order:
//! count the call; `CKR_CRYPTOKI_NOT_INITIALIZED` unless this copy is
//! initialised; take a capacity slot; wait out a hang; sleep the latency;
//! return the fault, if one is planned; forward. `C_Initialize` and
//! `C_Finalize` are counted but bypass the rest, so a test can always start
//! and stop a member.
//!
//! Control API, for the test after it `dlopen`s the same copy (see
//! `plan.rs`): `faulty_set_latency_us(u64)`, `faulty_set_capacity(u32)`,
//! `faulty_set_fault(CK_RV)`, `faulty_set_call_fault(const char *, CK_RV)`,
//! `faulty_fail_after(u64, CK_RV)`, `faulty_die_after_call(const char *)`,
//! `faulty_hang()`, `faulty_release()`,
//! `faulty_wait_for_blocked(u32, timeout_ms: u64) -> bool`,
//! `faulty_call_count(const char *) -> u64`, `faulty_max_concurrent() -> u32`,
//! `faulty_reset_counts()`; and `faulty_initialized_copies()` for the
//! other copies (see `shared.rs`).
//!
//! The real library is shared by all copies in a process (same path, same
//! handle), so all copies share one count of initialised copies and one lock
//! held across every copy's `C_Initialize` and `C_Finalize` (see
//! `shared.rs`): copies may start and stop concurrently from any threads.
//! `C_Initialize` treats the real library's `CKR_CRYPTOKI_ALREADY_INITIALIZED`
//! as success. `C_Finalize` finalises it only when it stops the last
//! initialised copy, so the next test can point `SOFTHSM2_CONF` elsewhere,
//! and restarting one member never breaks the others. A copy that stops
//! while others run closes the sessions on its token instead (with a serial
//! filter), so a restart ends its sessions and login as a reconnect would. A
//! direct load of the real library in the same process does not take part
//! in this count.
#![deny(unsafe_op_in_unsafe_fn)]
// The entry points keep their PKCS#11 names.
#![allow(non_snake_case)]

mod plan;
mod real;
mod shared;

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use cryptoki_sys::*;

use crate::real::{real, Real};

/// Whether this copy is between a successful `C_Initialize` and `C_Finalize`.
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// The only PKCS#11 export: a 2.40 table with every entry forwarding.
///
/// # Safety
/// `list` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    plan::count("C_GetFunctionList");
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: checked non-NULL; callers only read the table.
    unsafe { *list = ptr::addr_of!(FUNCTION_LIST).cast_mut() };
    CKR_OK
}

/// Run `f`, turning a panic into `CKR_GENERAL_ERROR`: an unwind out of
/// `extern "C"` would abort the test process.
fn guard(f: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(rv) | Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// The gate every forwarded call passes (see the crate doc); the admission
/// holds a capacity slot until the real call returns.
fn enter(name: &'static str) -> Result<(&'static Real, plan::Admission), CK_RV> {
    plan::count(name);
    if !INITIALIZED.load(Ordering::SeqCst) {
        return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
    }
    let admission = plan::admit(name)?;
    Ok((real()?, admission))
}

/// The thread that called `C_Initialize` last (0: none yet), so a test can
/// tell whether the library under test initialised its members in the
/// application's thread.
static INITIALIZING_THREAD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[no_mangle]
pub extern "C" fn faulty_initializing_thread() -> i32 {
    INITIALIZING_THREAD.load(Ordering::SeqCst)
}

unsafe extern "C" fn C_Initialize(args: *mut c_void) -> CK_RV {
    plan::count("C_Initialize");
    // SAFETY: gettid has no preconditions.
    INITIALIZING_THREAD.store(unsafe { libc::gettid() }, Ordering::SeqCst);
    guard(|| {
        let mut copies = shared::copies()?;
        if INITIALIZED.load(Ordering::SeqCst) {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let initialize = real()?.list.C_Initialize.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: the caller's arguments, passed on unchanged.
        match unsafe { initialize(args) } {
            CKR_OK | CKR_CRYPTOKI_ALREADY_INITIALIZED => {
                *copies += 1;
                INITIALIZED.store(true, Ordering::SeqCst);
                Ok(CKR_OK)
            }
            rv => Err(rv),
        }
    })
}

unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    plan::count("C_Finalize");
    guard(|| {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let mut copies = shared::copies()?;
        if !INITIALIZED.swap(false, Ordering::SeqCst) {
            return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
        }
        *copies -= 1;
        let real = real()?;
        if *copies > 0 {
            if real.filtered() {
                let close_all = real.list.C_CloseAllSessions.ok_or(CKR_GENERAL_ERROR)?;
                for slot in real.visible_slots()? {
                    // SAFETY: a slot ID the real library just listed.
                    unsafe { close_all(slot) };
                }
            }
            return Ok(CKR_OK);
        }
        let finalize = real.list.C_Finalize.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: `reserved` is NULL, as checked.
        match unsafe { finalize(reserved) } {
            CKR_OK | CKR_CRYPTOKI_NOT_INITIALIZED => Ok(CKR_OK),
            rv => Err(rv),
        }
    })
}

unsafe extern "C" fn C_GetSlotList(
    token_present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let (real, _admission) = enter("C_GetSlotList")?;
        if !real.filtered() {
            let get_slot_list = real.list.C_GetSlotList.ok_or(CKR_GENERAL_ERROR)?;
            // SAFETY: the caller's arguments, passed on unchanged.
            return Ok(unsafe { get_slot_list(token_present, list, count) });
        }
        if count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let slots = real.visible_slots()?;
        let needed = slots.len() as CK_ULONG;
        // SAFETY: `count` is non-NULL; a non-NULL `list` holds `*count` entries.
        unsafe {
            let room = *count;
            *count = needed;
            if !list.is_null() {
                if room < needed {
                    return Err(CKR_BUFFER_TOO_SMALL);
                }
                ptr::copy_nonoverlapping(slots.as_ptr(), list, slots.len());
            }
        }
        Ok(CKR_OK)
    })
}

/// Generates the forwarding entry points and the function table.
/// `#[slot]` marks an entry whose argument `slot` must be visible,
/// `#[mechanism]` one whose `mechanism` this copy may refuse (see
/// `real.rs`).
macro_rules! forward {
    ($($(#[$check:ident])? $name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        $(
            unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                guard(|| {
                    let (real, _admission) = enter(stringify!($name))?;
                    $(real.$check($check)?;)?
                    let f = real.list.$name.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
                    // SAFETY: the caller's arguments, passed on unchanged.
                    let rv = unsafe { f($($arg),*) };
                    Ok(plan::answer(stringify!($name), rv))
                })
            }
        )*

        static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            $($name: Some($name),)*
        };
    };
}

forward! {
    C_GetInfo(info: *mut CK_INFO);
    #[slot] C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO);
    #[slot] C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO);
    #[slot] C_GetMechanismList(slot: CK_SLOT_ID, list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG);
    #[slot] C_GetMechanismInfo(slot: CK_SLOT_ID, mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO);
    #[slot] C_InitToken(slot: CK_SLOT_ID, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG, label: *mut CK_UTF8CHAR);
    C_InitPIN(session: CK_SESSION_HANDLE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    C_SetPIN(session: CK_SESSION_HANDLE, old: *mut CK_UTF8CHAR, old_len: CK_ULONG, new: *mut CK_UTF8CHAR, new_len: CK_ULONG);
    #[slot] C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, app: *mut c_void, notify: CK_NOTIFY, session: *mut CK_SESSION_HANDLE);
    C_CloseSession(session: CK_SESSION_HANDLE);
    #[slot] C_CloseAllSessions(slot: CK_SLOT_ID);
    C_GetSessionInfo(session: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO);
    C_GetOperationState(session: CK_SESSION_HANDLE, state: *mut CK_BYTE, state_len: *mut CK_ULONG);
    C_SetOperationState(session: CK_SESSION_HANDLE, state: *mut CK_BYTE, state_len: CK_ULONG, encryption_key: CK_OBJECT_HANDLE, authentication_key: CK_OBJECT_HANDLE);
    C_Login(session: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG);
    C_Logout(session: CK_SESSION_HANDLE);
    C_CreateObject(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG, object: *mut CK_OBJECT_HANDLE);
    C_CopyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG, new_object: *mut CK_OBJECT_HANDLE);
    C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE);
    C_GetObjectSize(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, size: *mut CK_ULONG);
    C_GetAttributeValue(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_SetAttributeValue(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_FindObjectsInit(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG);
    C_FindObjects(session: CK_SESSION_HANDLE, objects: *mut CK_OBJECT_HANDLE, max: CK_ULONG, count: *mut CK_ULONG);
    C_FindObjectsFinal(session: CK_SESSION_HANDLE);
    C_EncryptInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_Encrypt(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_EncryptUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_EncryptFinal(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_Decrypt(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptFinal(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DigestInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM);
    C_Digest(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DigestUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_DigestKey(session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE);
    C_DigestFinal(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_Sign(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_SignFinal(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignRecoverInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_SignRecover(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_VerifyInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_Verify(session: CK_SESSION_HANDLE, data: *mut CK_BYTE, data_len: CK_ULONG, signature: *mut CK_BYTE, signature_len: CK_ULONG);
    C_VerifyUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG);
    C_VerifyFinal(session: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG);
    C_VerifyRecoverInit(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE);
    C_VerifyRecover(session: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DigestEncryptUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptDigestUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_SignEncryptUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_DecryptVerifyUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    C_GenerateKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, public_template: *mut CK_ATTRIBUTE, public_count: CK_ULONG, private_template: *mut CK_ATTRIBUTE, private_count: CK_ULONG, public_key: *mut CK_OBJECT_HANDLE, private_key: *mut CK_OBJECT_HANDLE);
    #[mechanism] C_WrapKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, wrapping_key: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG);
    #[mechanism] C_UnwrapKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, unwrapping_key: CK_OBJECT_HANDLE, wrapped: *mut CK_BYTE, wrapped_len: CK_ULONG, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    C_DeriveKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, base_key: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    C_SeedRandom(session: CK_SESSION_HANDLE, seed: *mut CK_BYTE, seed_len: CK_ULONG);
    C_GenerateRandom(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: CK_ULONG);
    C_GetFunctionStatus(session: CK_SESSION_HANDLE);
    C_CancelFunction(session: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(flags: CK_FLAGS, slot: *mut CK_SLOT_ID, reserved: *mut c_void);
}
