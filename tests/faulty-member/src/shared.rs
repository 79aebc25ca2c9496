//! The count of initialised copies, shared by every copy in the process --
//! of this library and of `luna-member`, which includes this file: both
//! forward to the one loaded SoftHSM.
//!
//! All copies forward to one loaded real library, so its `C_Initialize` and
//! `C_Finalize` must be serialised and counted across copies; each copy's
//! own statics cannot do that. The copy first in the loader's list (load
//! order) holds the count: the first copy to ask pins it with
//! `RTLD_NODELETE`, and new objects are only ever appended to that list, so
//! every copy finds the same one for the life of the process.

use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::{Mutex, MutexGuard};

use cryptoki_sys::{CKR_GENERAL_ERROR, CK_RV};
use once_cell::sync::OnceCell;

/// How many copies are initialised; locked across every copy's
/// `C_Initialize` and `C_Finalize`, real call included. Only the pinned
/// copy's count is used. A std mutex, not parking_lot's: its waiters park
/// on the lock word itself, while parking_lot parks them in a table of the
/// copy that waits, where another copy's unlock would never wake them.
static COPIES: Mutex<usize> = Mutex::new(0);

/// This copy's [`COPIES`], for the copies that find this one first.
#[no_mangle]
pub extern "C" fn faulty_initialized_copies() -> *const c_void {
    ptr::addr_of!(COPIES).cast()
}

/// The count every copy in this process shares, locked; `CKR_GENERAL_ERROR`
/// if the loader lists no copy (the reason goes to stderr, as in `real.rs`).
pub(crate) fn copies() -> Result<MutexGuard<'static, usize>, CK_RV> {
    static FOUND: OnceCell<&'static Mutex<usize>> = OnceCell::new();
    let copies = FOUND.get_or_try_init(first_copy).map_err(|e| {
        eprintln!("test member library: {e}");
        CKR_GENERAL_ERROR
    })?;
    // A holder that panicked (turned into `CKR_GENERAL_ERROR`) left the
    // count as an error return would.
    Ok(copies
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// The count of the first copy in load order, pinned so it outlives every
/// `dlclose`. A copy unloaded since the walk was never pinned (a pinned
/// copy stays), so no copy can have chosen it.
fn first_copy() -> Result<&'static Mutex<usize>, String> {
    for path in loaded_objects() {
        // SAFETY: RTLD_NOLOAD only takes another reference to an object that
        // is already loaded, and the references are dropped below;
        // `faulty_initialized_copies` has the signature above, and a pinned
        // copy's static lives as long as the process.
        unsafe {
            let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if handle.is_null() {
                continue;
            }
            let symbol = libc::dlsym(handle, c"faulty_initialized_copies".as_ptr());
            if symbol.is_null() {
                libc::dlclose(handle);
                continue;
            }
            let pin = libc::dlopen(
                path.as_ptr(),
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
            libc::dlclose(handle);
            if pin.is_null() {
                return Err(format!("cannot pin {}", path.to_string_lossy()));
            }
            libc::dlclose(pin);
            let get = std::mem::transmute::<*mut c_void, extern "C" fn() -> *const c_void>(symbol);
            return Ok(&*get().cast::<Mutex<usize>>());
        }
    }
    Err("no copy of this library among the loaded objects".into())
}

/// The paths of the loaded objects, in load order.
fn loaded_objects() -> Vec<CString> {
    unsafe extern "C" fn collect(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        paths: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader passes a valid entry, and `paths` is the Vec below.
        unsafe {
            let name = (*info).dlpi_name;
            if !name.is_null() && *name != 0 {
                (*paths.cast::<Vec<CString>>()).push(CStr::from_ptr(name).to_owned());
            }
        }
        0
    }
    // Collect first: dlopen must not run inside dl_iterate_phdr's callback,
    // which holds the loader's lock.
    let mut paths: Vec<CString> = Vec::new();
    // SAFETY: `collect` only appends to `paths`.
    unsafe { libc::dl_iterate_phdr(Some(collect), ptr::addr_of_mut!(paths).cast()) };
    paths
}
