//! General-purpose, slot and token functions, and the interface discovery
//! functions modern clients call first.

use super::{cryptoki_fn, required, session, FUNCTION_LIST};
use crate::arguments::{input, Output};
use crate::error::{check, Error};
use crate::member::string_to_padded;
use crate::member_api::MemberApi;
use crate::provider::{self, library_version, Slot};
use cryptoki_sys::*;

const INTERFACE_NAME: &[u8] = b"PKCS 11\0";

/// `CK_INTERFACE` holds raw pointers; ours point at statics only.
struct StaticInterface(CK_INTERFACE);
// SAFETY: the pointers refer to immutable statics.
unsafe impl Sync for StaticInterface {}

static INTERFACE: StaticInterface = StaticInterface(CK_INTERFACE {
    pInterfaceName: INTERFACE_NAME.as_ptr() as *mut _,
    pFunctionList: &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut _,
    flags: 0,
});

cryptoki_fn! {
    fn C_Initialize(init_args: *mut std::ffi::c_void) {
        let mut threads_allowed = true;
        if !init_args.is_null() {
            // SAFETY: not null; the specification makes a non-null argument
            // a `CK_C_INITIALIZE_ARGS`.
            let args = unsafe { &*(init_args as *const CK_C_INITIALIZE_ARGS) };
            if !args.pReserved.is_null() {
                return Err(Error::new(CKR_ARGUMENTS_BAD));
            }
            let callbacks = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            let given = callbacks.iter().filter(|c| **c).count();
            if given != 0 && given != callbacks.len() {
                return Err(Error::new(CKR_ARGUMENTS_BAD));
            }
            // We lock with the OS's primitives; application mutexes alone
            // are something we cannot use.
            if given != 0 && args.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(Error::new(CKR_CANT_LOCK));
            }
            threads_allowed = args.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS == 0;
        }
        provider::initialize(threads_allowed)
    }

    fn C_Finalize(reserved: *mut std::ffi::c_void) {
        if !reserved.is_null() {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        provider::finalize()
    }

    fn C_GetInfo(info: *mut CK_INFO) {
        required(info)?;
        provider::get()?;
        // SAFETY: CK_INFO is plain data; all-zero is a valid value.
        let mut out: CK_INFO = unsafe { std::mem::zeroed() };
        out.cryptokiVersion = CK_VERSION { major: 2, minor: 40 };
        string_to_padded("pkcs11-ha", &mut out.manufacturerID);
        string_to_padded("pkcs11-ha high-availability provider", &mut out.libraryDescription);
        out.libraryVersion = library_version();
        // SAFETY: `info` is not null (checked above) and writable.
        unsafe { *info = out };
        Ok(())
    }

    fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) {
        required(list)?;
        // SAFETY: `list` is not null (checked above) and writable.
        unsafe { *list = &FUNCTION_LIST as *const _ as *mut _ };
        Ok(())
    }

    fn C_GetInterfaceList(interfaces: *mut CK_INTERFACE, count: *mut CK_ULONG) {
        // SAFETY: the application vouches that `count` is writable and that
        // `interfaces`, when not null, has room for `*count` interfaces.
        unsafe { Output::new(interfaces, count) }?.fill(std::slice::from_ref(&INTERFACE.0))
    }

    fn C_GetInterface(
        name: *mut CK_UTF8CHAR,
        version: *mut CK_VERSION,
        interface: *mut *mut CK_INTERFACE,
        flags: CK_FLAGS,
    ) {
        required(interface)?;
        // SAFETY: not null; the specification makes `name` a
        // NUL-terminated string.
        if !name.is_null() && unsafe { std::ffi::CStr::from_ptr(name as *const _) }.to_bytes_with_nul() != INTERFACE_NAME {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        // SAFETY: not null; the application passes a readable version.
        if !version.is_null() && unsafe { ((*version).major, (*version).minor) } != (2, 40) {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        if flags & !INTERFACE.0.flags != 0 {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        // SAFETY: `interface` is not null (checked above) and writable.
        unsafe { *interface = &INTERFACE.0 as *const _ as *mut _ };
        Ok(())
    }

    fn C_GetSlotList(token_present: CK_BBOOL, slots: CK_SLOT_ID_PTR, count: CK_ULONG_PTR) {
        required(count)?;
        let slot_list = provider::with(|p| Ok(p.slot_list(token_present != CK_FALSE)))?;
        // SAFETY: the application vouches that `count` is writable and that
        // `slots`, when not null, has room for `*count` IDs.
        unsafe { Output::new(slots, count) }?.fill(&slot_list)
    }

    fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) {
        required(info)?;
        let slot_info = provider::with(|p| p.slot_info(slot))?;
        // SAFETY: `info` is not null (checked above) and writable.
        unsafe { *info = slot_info };
        Ok(())
    }

    fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) {
        required(info)?;
        let token_info = provider::with(|p| p.token_info(slot))?;
        // SAFETY: `info` is not null (checked above) and writable.
        unsafe { *info = token_info };
        Ok(())
    }

    fn C_GetMechanismList(slot: CK_SLOT_ID, mechanisms: CK_MECHANISM_TYPE_PTR, count: CK_ULONG_PTR) {
        required(count)?;
        let mechanism_list = provider::with(|p| p.mechanisms(slot))?;
        // SAFETY: the application vouches that `count` is writable and that
        // `mechanisms`, when not null, has room for `*count`.
        unsafe { Output::new(mechanisms, count) }?.fill(&mechanism_list)
    }

    fn C_GetMechanismInfo(slot: CK_SLOT_ID, mechanism: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO) {
        required(info)?;
        let mechanism_info = provider::with(|p| p.mechanism_info(slot, mechanism))?;
        // SAFETY: `info` is not null (checked above) and writable.
        unsafe { *info = mechanism_info };
        Ok(())
    }

    fn C_InitToken(slot: CK_SLOT_ID, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG, label: *mut CK_UTF8CHAR) {
        super::buffer(pin, pin_len)?;
        required(label)?;
        provider::with(|p| match p.slot(slot)? {
            Slot::PassThrough(library, member_slot) => {
                // SAFETY: `pin` is null only with a zero length and `label`
                // is not null (both checked above); the application vouches
                // for `pin_len` bytes and a 32-byte label.
                let (pin, label) = unsafe { (input(pin, pin_len), &*(label as *const [u8; 32])) };
                check(library.init_token(member_slot, pin, label))
            }
            // Members are initialised one by one, through their own slots;
            // erasing a whole group in one call is not something to offer.
            Slot::Virtual(_) => Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED)),
        })
    }

    fn C_WaitForSlotEvent(flags: CK_FLAGS, slot: CK_SLOT_ID_PTR, reserved: *mut std::ffi::c_void) {
        required(slot)?;
        if !reserved.is_null() {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        provider::get()?;
        if flags & CKF_DONT_BLOCK != 0 {
            Err(Error::new(CKR_NO_EVENT))
        } else {
            Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED))
        }
    }

    fn C_GetFunctionStatus(handle: CK_SESSION_HANDLE) {
        session(handle)?;
        Err(Error::new(CKR_FUNCTION_NOT_PARALLEL))
    }

    fn C_CancelFunction(handle: CK_SESSION_HANDLE) {
        session(handle)?;
        Err(Error::new(CKR_FUNCTION_NOT_PARALLEL))
    }
}
