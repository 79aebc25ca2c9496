//! A test-only PKCS#11 member that stands in for a Thales Luna client
//! library (`libCryptoki2_64.so`), because no Luna partition is reachable
//! where pkcs11-ha is tested. It keeps to what Thales documents and no
//! further; the cryptography is SoftHSM's.
//!
//! One loaded copy is one Luna client library instance with several
//! partitions: each partition is a real SoftHSM token, shown as its own
//! slot. The sidecar file `<this .so>.conf` (`key = value` lines, `#`
//! comments) says which, read again at every `C_Initialize`:
//! - `library = /usr/lib/softhsm/libsofthsm2.so`: the real library;
//! - `partition = <token serial> <cloning|key-export> <cloning domain>`,
//!   one line per partition: its mode (Luna's partition policies 0 "Allow
//!   private key cloning" and 1 "Allow private key wrapping", which are
//!   never both on) and its cloning domain;
//! - `ha_slot = yes`: every slot describes itself as Luna's HA virtual slot
//!   ("HA Virtual Card Slot"); partitions are "Net Token Slot";
//! - `policy_api = no`: `CA_GetContainerPolicySetting` answers
//!   `CKR_FUNCTION_NOT_SUPPORTED`, so the caller cannot read the policies;
//! - `migrate_keys = no`: `CA_MigrateKeys` answers
//!   `CKR_FUNCTION_NOT_SUPPORTED`, as partitions before firmware 7.8 do.
//!
//! What it does as Luna does:
//! - `C_WrapKey` of a private key on a partition in Cloning mode answers
//!   `CKR_OPERATION_NOT_ALLOWED` (0x80000030; Thales does not document
//!   which code a real partition answers).
//! - The AES key wrap with padding is Luna's vendor `CKM_AES_KWP`
//!   (0x80000171): it is listed, and the standard `CKM_AES_KEY_WRAP_PAD`
//!   is not (whether Luna takes it is undocumented).
//! - `CA_CloneObject(hTargetSession, hSourceSession, ulObjectType, hObject,
//!   phClonedObject)` and `CA_MigrateKeys(hSource, hTarget, flags, count,
//!   CK_OBJECT_MIGRATION_DATA*)` (flag 0x01: continue on error) copy an
//!   object between two sessions of this instance, both logged in. A
//!   private key clones only between partitions in Cloning mode
//!   (`CKR_OPERATION_NOT_ALLOWED` otherwise), and any key only between
//!   partitions of one cloning domain (`CKR_FAILED_TO_CLONE_AN_OBJECT`).
//!   Keys move wrapped under the domain's key, a token object labelled
//!   `luna-member-cloning-domain:<domain>` that the test's SO provisions on
//!   each token (trusted, so that keys marked `CKA_WRAP_WITH_TRUSTED` move
//!   too) and that this library hides from every search: it never leaves
//!   the member, as Luna's cloning domain never leaves the HSM. Unlike
//!   Luna, a key SoftHSM cannot wrap at all (`CKA_EXTRACTABLE` FALSE without
//!   `CKA_WRAP_WITH_TRUSTED`) does not clone, and a clone reads
//!   `CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE` and `CKA_NEVER_EXTRACTABLE` as an
//!   unwrapped key does.
//! - `CA_GetContainerPolicySetting(slot, container, policy, *value)`
//!   answers policies 0 and 1 from the partition's mode.
//! - `CA_GetFunctionList` is exported, as the mark of a Luna library; its
//!   table (hundreds of entries) is not reproduced, so it answers
//!   `CKR_FUNCTION_NOT_SUPPORTED`.
//!
//! Test controls (for a test that `dlopen`s the same copy):
//! `luna_set_fault(CK_RV)` (every call but `C_Initialize`/`C_Finalize`
//! answers it; `CKR_OK` clears), `luna_fail_next(u64, CK_RV)` (the next n
//! calls answer it, then calls are forwarded again),
//! `luna_set_partition_fault(const char *serial, CK_RV)` (forwarded calls on
//! one partition answer it), `luna_faults_returned()
//! -> u64`, `luna_call_count(const char *) -> u64` and `luna_reset_counts()`.
//! Copies in one process share one count of initialised copies with the
//! faulty member library's (`../faulty-member/src/shared.rs`): the real
//! library is finalised only when the last copy stops, so two copies (two
//! "Luna library instances") may start and stop concurrently.
#![deny(unsafe_op_in_unsafe_fn)]
// The entry points keep their PKCS#11 names.
#![allow(non_snake_case)]

mod cloning;
mod partition;
#[path = "../../faulty-member/src/shared.rs"]
mod shared;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use cryptoki_sys::*;
use parking_lot::Mutex;

use crate::partition::{real, Mode, Real};

/// Luna's vendor AES key wrap with padding (RFC 5649).
pub(crate) const CKM_AES_KWP: CK_MECHANISM_TYPE = 0x8000_0171;
/// Luna's answer when a partition policy forbids the call.
pub(crate) const CKR_OPERATION_NOT_ALLOWED: CK_RV = 0x8000_0030;

static INITIALIZED: AtomicBool = AtomicBool::new(false);

struct Plan {
    /// Every call answers this (`None`: forwarded).
    fault: Option<CK_RV>,
    /// The next `.0` calls answer `.1`.
    next: (u64, CK_RV),
    faults_returned: u64,
    /// Forwarded calls naming a slot of this partition (by token serial),
    /// or a session on it, answer `.1`.
    partition_fault: Option<(String, CK_RV)>,
    calls: BTreeMap<&'static str, u64>,
}

static PLAN: Mutex<Plan> = Mutex::new(Plan {
    fault: None,
    next: (0, CKR_OK),
    faults_returned: 0,
    partition_fault: None,
    calls: BTreeMap::new(),
});

pub(crate) fn count(name: &'static str) {
    *PLAN.lock().calls.entry(name).or_default() += 1;
}

/// The gate every call but `C_Initialize`/`C_Finalize` passes: counted,
/// refused before `C_Initialize`, and answered with the planned fault.
pub(crate) fn enter(name: &'static str) -> Result<&'static Real, CK_RV> {
    count(name);
    if !INITIALIZED.load(Ordering::SeqCst) {
        return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
    }
    let mut plan = PLAN.lock();
    let fault = if plan.next.0 > 0 {
        plan.next.0 -= 1;
        Some(plan.next.1)
    } else {
        plan.fault
    };
    if let Some(rv) = fault {
        plan.faults_returned += 1;
        return Err(rv);
    }
    drop(plan);
    real()
}

/// Runs `f`, turning a panic into `CKR_GENERAL_ERROR`: an unwind out of
/// `extern "C"` would abort the test process.
pub(crate) fn guard(f: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(rv) | Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// Every call but `C_Initialize`/`C_Finalize` answers `rv` unforwarded;
/// `CKR_OK` forwards again.
#[no_mangle]
pub extern "C" fn luna_set_fault(rv: CK_RV) {
    PLAN.lock().fault = (rv != CKR_OK).then_some(rv);
}

/// Forwarded calls on the partition of token `serial` (naming its slot or
/// a session on it) answer `rv`, as if that partition alone had failed;
/// `CKR_OK` or a NULL `serial` forwards them again.
///
/// # Safety
/// `serial` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn luna_set_partition_fault(serial: *const c_char, rv: CK_RV) {
    let serial = (!serial.is_null() && rv != CKR_OK)
        // SAFETY: the caller passes a NUL-terminated string.
        .then(|| {
            unsafe { CStr::from_ptr(serial) }
                .to_string_lossy()
                .into_owned()
        });
    PLAN.lock().partition_fault = serial.map(|s| (s, rv));
}

/// The partition fault for a forwarded call whose first argument is
/// `first` (a slot or a session, by its name), if it names that partition.
fn partition_fault(real: &Real, name: &str, first: CK_ULONG) -> Result<(), CK_RV> {
    let Some((serial, rv)) = PLAN.lock().partition_fault.clone() else {
        return Ok(());
    };
    let partition = match name {
        "slot" => real.partition(first),
        "session" => real.session_partition(first).ok().map(|(_, p, _)| p),
        _ => None,
    };
    match partition {
        Some(p) if p.serial == serial => {
            PLAN.lock().faults_returned += 1;
            Err(rv)
        }
        _ => Ok(()),
    }
}

/// The next `n` calls answer `rv`; then calls are forwarded again.
#[no_mangle]
pub extern "C" fn luna_fail_next(n: u64, rv: CK_RV) {
    PLAN.lock().next = (n, rv);
}

/// How many calls were answered with a planned fault since the last reset.
#[no_mangle]
pub extern "C" fn luna_faults_returned() -> u64 {
    PLAN.lock().faults_returned
}

/// Calls of the entry point `name` (e.g. `"C_WrapKey"`, `"CA_CloneObject"`)
/// since the last [`luna_reset_counts`], refused ones included.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn luna_call_count(name: *const c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) };
    name.to_str()
        .ok()
        .and_then(|name| PLAN.lock().calls.get(name).copied())
        .unwrap_or(0)
}

/// Zeroes the call counts and the faults returned.
#[no_mangle]
pub extern "C" fn luna_reset_counts() {
    let mut plan = PLAN.lock();
    plan.calls.clear();
    plan.faults_returned = 0;
}

/// # Safety
/// `list` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    count("C_GetFunctionList");
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: checked non-NULL; callers only read the table.
    unsafe { *list = ptr::addr_of!(FUNCTION_LIST).cast_mut() };
    CKR_OK
}

/// Luna's extension table is not reproduced (see the crate doc).
#[no_mangle]
pub extern "C" fn CA_GetFunctionList(_list: *mut *mut c_void) -> CK_RV {
    count("CA_GetFunctionList");
    CKR_FUNCTION_NOT_SUPPORTED
}

unsafe extern "C" fn C_Initialize(args: *mut c_void) -> CK_RV {
    count("C_Initialize");
    guard(|| {
        let mut copies = shared::copies()?;
        if INITIALIZED.load(Ordering::SeqCst) {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        partition::reload()?;
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
    count("C_Finalize");
    guard(|| {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let mut copies = shared::copies()?;
        if !INITIALIZED.swap(false, Ordering::SeqCst) {
            return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
        }
        *copies -= 1;
        if *copies > 0 {
            return Ok(CKR_OK);
        }
        let finalize = real()?.list.C_Finalize.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: `reserved` is NULL, as checked.
        match unsafe { finalize(reserved) } {
            CKR_OK | CKR_CRYPTOKI_NOT_INITIALIZED => Ok(CKR_OK),
            rv => Err(rv),
        }
    })
}

/// Writes `items` under the two-call convention.
///
/// # Safety
/// `count` is non-NULL; a non-NULL `list` holds `*count` entries.
unsafe fn two_call<T: Copy>(items: &[T], list: *mut T, count: *mut CK_ULONG) -> CK_RV {
    // SAFETY: as the caller vouches.
    unsafe {
        let room = *count;
        *count = items.len() as CK_ULONG;
        if list.is_null() {
            return CKR_OK;
        }
        if room < items.len() as CK_ULONG {
            return CKR_BUFFER_TOO_SMALL;
        }
        ptr::copy_nonoverlapping(items.as_ptr(), list, items.len());
    }
    CKR_OK
}

unsafe extern "C" fn C_GetSlotList(
    _token_present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let real = enter("C_GetSlotList")?;
        if count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let slots = real.visible_slots()?;
        // SAFETY: `count` is non-NULL; the caller vouches for `list`.
        Ok(unsafe { two_call(&slots, list, count) })
    })
}

fn padded(text: &str, field: &mut [u8]) {
    field.fill(b' ');
    field[..text.len()].copy_from_slice(text.as_bytes());
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard(|| {
        let real = enter("C_GetSlotInfo")?;
        real.partition(slot).ok_or(CKR_SLOT_ID_INVALID)?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let get_slot_info = real.list.C_GetSlotInfo.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: `info` is non-NULL and the caller's.
        let rv = unsafe { get_slot_info(slot, info) };
        if rv == CKR_OK {
            // SAFETY: as above.
            let info = unsafe { &mut *info };
            let description = if partition::ha_slot() {
                "HA Virtual Card Slot"
            } else {
                "Net Token Slot"
            };
            padded(description, &mut info.slotDescription);
            padded("Safenet, Inc.", &mut info.manufacturerID);
        }
        Ok(rv)
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let real = enter("C_GetMechanismList")?;
        real.partition(slot).ok_or(CKR_SLOT_ID_INVALID)?;
        if count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let get = real.list.C_GetMechanismList.ok_or(CKR_GENERAL_ERROR)?;
        let mut n: CK_ULONG = 0;
        // SAFETY: a NULL list asks only for the count.
        let rv = unsafe { get(slot, ptr::null_mut(), &mut n) };
        if rv != CKR_OK {
            return Ok(rv);
        }
        let mut mechanisms = vec![0; n as usize];
        // SAFETY: `mechanisms` holds `n` entries.
        let rv = unsafe { get(slot, mechanisms.as_mut_ptr(), &mut n) };
        if rv != CKR_OK {
            return Ok(rv);
        }
        mechanisms.truncate(n as usize);
        for m in &mut mechanisms {
            if *m == CKM_AES_KEY_WRAP_PAD {
                *m = CKM_AES_KWP;
            }
        }
        // SAFETY: `count` is non-NULL; the caller vouches for `list`.
        Ok(unsafe { two_call(&mechanisms, list, count) })
    })
}

/// The real library's name for a mechanism this member lists: Luna's
/// `CKM_AES_KWP` is SoftHSM's `CKM_AES_KEY_WRAP_PAD`, which this member
/// does not list.
fn real_mechanism(mechanism: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_TYPE, CK_RV> {
    match mechanism {
        CKM_AES_KWP => Ok(CKM_AES_KEY_WRAP_PAD),
        CKM_AES_KEY_WRAP_PAD => Err(CKR_MECHANISM_INVALID),
        other => Ok(other),
    }
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        let real = enter("C_GetMechanismInfo")?;
        real.partition(slot).ok_or(CKR_SLOT_ID_INVALID)?;
        let f = real.list.C_GetMechanismInfo.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: the caller's arguments, with the mechanism renamed.
        Ok(unsafe { f(slot, real_mechanism(mechanism)?, info) })
    })
}

/// A copy of the caller's mechanism under the real library's name.
///
/// # Safety
/// `mechanism` is NULL or points to a valid `CK_MECHANISM`.
unsafe fn renamed(mechanism: *mut CK_MECHANISM) -> Result<CK_MECHANISM, CK_RV> {
    if mechanism.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL, and valid as the caller vouches.
    let mut copy = unsafe { *mechanism };
    copy.mechanism = real_mechanism(copy.mechanism)?;
    Ok(copy)
}

unsafe extern "C" fn C_WrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    wrapping_key: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let real = enter("C_WrapKey")?;
        let (_, partition, _) = real.session_partition(session)?;
        if partition.mode == Mode::Cloning
            && cloning::read_ulong(real, session, key, CKA_CLASS) == Some(CKO_PRIVATE_KEY)
        {
            return Err(CKR_OPERATION_NOT_ALLOWED);
        }
        // SAFETY: the caller vouches for `mechanism`.
        let mut mechanism = unsafe { renamed(mechanism) }?;
        let f = real.list.C_WrapKey.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: the caller's arguments, with the mechanism renamed.
        Ok(unsafe { f(session, &mut mechanism, wrapping_key, key, out, out_len) })
    })
}

unsafe extern "C" fn C_UnwrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    unwrapping_key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let real = enter("C_UnwrapKey")?;
        // SAFETY: the caller vouches for `mechanism`.
        let mut mechanism = unsafe { renamed(mechanism) }?;
        let f = real.list.C_UnwrapKey.ok_or(CKR_GENERAL_ERROR)?;
        // SAFETY: the caller's arguments, with the mechanism renamed.
        Ok(unsafe {
            f(
                session,
                &mut mechanism,
                unwrapping_key,
                wrapped,
                wrapped_len,
                template,
                count,
                key,
            )
        })
    })
}

unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let real = enter("C_FindObjects")?;
        if objects.is_null() || count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let f = real.list.C_FindObjects.ok_or(CKR_GENERAL_ERROR)?;
        // Found objects but the hidden cloning-domain keys, refilled until
        // `max` are found or the search is over.
        let mut kept = Vec::with_capacity(max as usize);
        while (kept.len() as CK_ULONG) < max {
            let mut batch = vec![0; (max - kept.len() as CK_ULONG) as usize];
            let mut n: CK_ULONG = 0;
            // SAFETY: `batch` holds as many entries as asked for.
            let rv = unsafe { f(session, batch.as_mut_ptr(), batch.len() as CK_ULONG, &mut n) };
            if rv != CKR_OK {
                return Ok(rv);
            }
            if n == 0 {
                break;
            }
            batch.truncate(n as usize);
            kept.extend(
                batch
                    .into_iter()
                    .filter(|h| !cloning::is_domain_key(real, session, *h)),
            );
        }
        // SAFETY: `objects` holds `max` entries and `kept` no more.
        unsafe {
            ptr::copy_nonoverlapping(kept.as_ptr(), objects, kept.len());
            *count = kept.len() as CK_ULONG;
        }
        Ok(CKR_OK)
    })
}

/// Generates the forwarding entry points and the function table.
/// `#[slot]` marks an entry whose argument `slot` must be a partition.
macro_rules! forward {
    ($($(#[$slot:ident])? $name:ident($first:ident: $first_ty:ty $(, $arg:ident: $ty:ty)* $(,)?);)*) => {
        $(
            unsafe extern "C" fn $name($first: $first_ty $(, $arg: $ty)*) -> CK_RV {
                guard(|| {
                    let real = enter(stringify!($name))?;
                    $(if real.partition($slot).is_none() {
                        return Err(CKR_SLOT_ID_INVALID);
                    })?
                    partition_fault(real, stringify!($first), $first as CK_ULONG)?;
                    let f = real.list.$name.ok_or(CKR_FUNCTION_NOT_SUPPORTED)?;
                    // SAFETY: the caller's arguments, passed on unchanged.
                    Ok(unsafe { f($first $(, $arg)*) })
                })
            }
        )*

        static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 20 },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_FindObjects: Some(C_FindObjects),
            $($name: Some($name),)*
        };
    };
}

forward! {
    C_GetInfo(info: *mut CK_INFO);
    #[slot] C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO);
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
    C_DeriveKey(session: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, base_key: CK_OBJECT_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG, key: *mut CK_OBJECT_HANDLE);
    C_SeedRandom(session: CK_SESSION_HANDLE, seed: *mut CK_BYTE, seed_len: CK_ULONG);
    C_GenerateRandom(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: CK_ULONG);
    C_GetFunctionStatus(session: CK_SESSION_HANDLE);
    C_CancelFunction(session: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(flags: CK_FLAGS, slot: *mut CK_SLOT_ID, reserved: *mut c_void);
}
