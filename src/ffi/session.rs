//! Session management: open, close, session info, login and PINs, and
//! saved operation state.

use super::{buffer, cryptoki_fn, required, session};
use crate::arguments::{two_call_output, Output};
use crate::error::{check, Error};
use crate::member_api::MemberApi;
use crate::provider;
use crate::session::Target;
use cryptoki_sys::*;

/// Tags a virtual slot's saved operation state with the member it came
/// from, since only that member can restore it.
const STATE_MAGIC: &[u8; 4] = b"pkha";
const STATE_HEADER: usize = 8;

/// The PIN an application passed, if any.
///
/// # Safety
/// `pin`, when not null, must point to `len` readable bytes that outlive
/// the returned slice.
unsafe fn pin<'a>(pin: *const CK_UTF8CHAR, len: CK_ULONG) -> Option<&'a [u8]> {
    if pin.is_null() {
        None
    } else {
        // SAFETY: not null; the caller vouches for `len` bytes.
        Some(unsafe { std::slice::from_raw_parts(pin, len as usize) })
    }
}

cryptoki_fn! {
    fn C_OpenSession(
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        _application: *mut std::ffi::c_void,
        _notify: CK_NOTIFY,
        handle: CK_SESSION_HANDLE_PTR,
    ) {
        required(handle)?;
        let opened = provider::with(|p| p.open_session(slot, flags))?;
        // SAFETY: `handle` is not null (checked above) and writable.
        unsafe { *handle = opened };
        Ok(())
    }

    fn C_CloseSession(handle: CK_SESSION_HANDLE) {
        provider::with(|p| p.close_session(handle))
    }

    fn C_CloseAllSessions(slot: CK_SLOT_ID) {
        provider::with(|p| p.close_all_sessions(slot))
    }

    fn C_GetSessionInfo(handle: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) {
        required(info)?;
        let session_info = provider::with(|p| p.session_info(handle))?;
        // SAFETY: `info` is not null (checked above) and writable.
        unsafe { *info = session_info };
        Ok(())
    }

    fn C_Login(handle: CK_SESSION_HANDLE, user_type: CK_USER_TYPE, pin_ptr: *mut CK_UTF8CHAR, pin_len: CK_ULONG) {
        buffer(pin_ptr, pin_len)?;
        // SAFETY: `pin_ptr` is null only with a zero length (checked
        // above); the application vouches for `pin_len` bytes.
        let pin = unsafe { pin(pin_ptr, pin_len) };
        {
            // Released before the provider's lock is taken: a close waiting
            // for this session's calls may hold that lock.
            let s = session(handle)?;
            if let (Target::Virtual(v), CKU_CONTEXT_SPECIFIC) = (&s.target, user_type) {
                v.settle_operations();
                let position = v.bound_member().ok_or(Error::new(CKR_OPERATION_NOT_INITIALIZED))?;
                let m = v.member_session(position)?;
                return check(m.library.login(m.handle, user_type, pin));
            }
        }
        provider::with(|p| p.login(handle, user_type, pin))
    }

    fn C_Logout(handle: CK_SESSION_HANDLE) {
        provider::with(|p| p.logout(handle))
    }

    fn C_InitPIN(handle: CK_SESSION_HANDLE, pin_ptr: *mut CK_UTF8CHAR, pin_len: CK_ULONG) {
        buffer(pin_ptr, pin_len)?;
        // SAFETY: `pin_ptr` is null only with a zero length (checked
        // above); the application vouches for `pin_len` bytes.
        let pin = unsafe { pin(pin_ptr, pin_len) };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.init_pin(p.handle, pin)),
            Target::Virtual(v) => v.change_pin("C_InitPIN", |l, m| l.init_pin(m, pin)),
        }
    }

    fn C_SetPIN(
        handle: CK_SESSION_HANDLE,
        old: *mut CK_UTF8CHAR,
        old_len: CK_ULONG,
        new: *mut CK_UTF8CHAR,
        new_len: CK_ULONG,
    ) {
        buffer(old, old_len)?;
        buffer(new, new_len)?;
        // SAFETY: each is null only with a zero length (checked above); the
        // application vouches for the lengths.
        let (old_pin, new_pin) = unsafe { (pin(old, old_len), pin(new, new_len)) };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.set_pin(p.handle, old_pin, new_pin)),
            Target::Virtual(v) => {
                v.change_pin("C_SetPIN", |l, m| l.set_pin(m, old_pin, new_pin))?;
                if let Some(new_pin) = new_pin {
                    v.group.cache_new_pin(new_pin);
                }
                Ok(())
            }
        }
    }

    fn C_GetOperationState(handle: CK_SESSION_HANDLE, state: *mut CK_BYTE, state_len: CK_ULONG_PTR) {
        required(state_len)?;
        let s = session(handle)?;
        let v = match &s.target {
            Target::PassThrough(p) => {
                // SAFETY: `state_len` is not null (checked above); the
                // application vouches for room for `*state_len` bytes.
                let (state, state_len) = unsafe { two_call_output(state, state_len) };
                return check(p.library.get_operation_state(p.handle, state, state_len));
            }
            Target::Virtual(v) => v,
        };
        v.settle_operations();
        v.start_pending_digest()?;
        let position = v.bound_member().ok_or(Error::new(CKR_OPERATION_NOT_INITIALIZED))?;
        let m = v.member_session(position)?;
        let mut member_len: CK_ULONG = 0;
        check(m.library.get_operation_state(m.handle, None, &mut member_len))?;
        let needed = member_len + STATE_HEADER as CK_ULONG;
        // SAFETY: `state_len` is not null (checked above) and read-write;
        // the application vouches that `state`, when not null, has room for
        // `*state_len` bytes.
        let out = unsafe { Output::new(state, state_len) }?;
        out.fill_with(needed, |room| {
            let (header, member_state) = room.split_at_mut(STATE_HEADER);
            header[..4].copy_from_slice(STATE_MAGIC);
            header[4..].copy_from_slice(&(position as u32).to_le_bytes());
            let rv = m.library.get_operation_state(m.handle, Some(member_state), &mut member_len);
            (member_len + STATE_HEADER as CK_ULONG, check(rv))
        })
    }

    fn C_SetOperationState(
        handle: CK_SESSION_HANDLE,
        state: *mut CK_BYTE,
        state_len: CK_ULONG,
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) {
        required(state)?;
        // SAFETY: `state` is not null (checked above); the application
        // vouches for `state_len` readable bytes.
        let blob = unsafe { std::slice::from_raw_parts(state, state_len as usize) };
        let s = session(handle)?;
        let v = match &s.target {
            Target::PassThrough(p) => {
                return check(p.library.set_operation_state(p.handle, Some(blob), encryption_key, authentication_key));
            }
            Target::Virtual(v) => v,
        };
        if blob.len() < STATE_HEADER || &blob[..4] != STATE_MAGIC {
            return Err(Error::new(CKR_SAVED_STATE_INVALID));
        }
        let position = u32::from_le_bytes([blob[4], blob[5], blob[6], blob[7]]) as usize;
        if position >= v.group.members.len() {
            return Err(Error::new(CKR_SAVED_STATE_INVALID));
        }
        v.set_operation_state(position, &blob[STATE_HEADER..], encryption_key, authentication_key)
    }
}
