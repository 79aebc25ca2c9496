//! A child process after `fork()` gets a working library from its own
//! `C_Initialize`, and the parent's members and sessions are left alone.

mod common;

use common::*;
use cryptoki_sys::*;
use std::ptr;

fn function_list(library: &libloading::Library) -> &'static CK_FUNCTION_LIST {
    // SAFETY: C_GetFunctionList has this signature; the table is static in
    // a library that stays loaded for the whole test.
    unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            library.get(b"C_GetFunctionList\0").unwrap();
        let mut list = ptr::null_mut();
        assert_eq!(get(&mut list), CKR_OK);
        &*list
    }
}

/// Opens a session on slot 0 (the group) and draws random bytes.
fn use_virtual_slot(f: &CK_FUNCTION_LIST) -> CK_RV {
    let mut session = 0;
    // SAFETY: valid out-pointers and buffer sizes.
    unsafe {
        let rv =
            f.C_OpenSession.unwrap()(0, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut session);
        if rv != CKR_OK {
            return rv;
        }
        let mut random = [0u8; 16];
        let rv =
            f.C_GenerateRandom.unwrap()(session, random.as_mut_ptr(), random.len() as CK_ULONG);
        if rv != CKR_OK {
            return rv;
        }
        f.C_CloseSession.unwrap()(session)
    }
}

#[test]
fn child_initializes_and_parent_keeps_working() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["a", "b"]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    hsm.activate();
    activate_config(&config);
    // SAFETY: loading our own library.
    let library = unsafe { libloading::Library::new(library_path()).unwrap() };
    let f = function_list(&library);
    // SAFETY: C calls with valid arguments throughout.
    unsafe {
        assert_eq!(f.C_Initialize.unwrap()(ptr::null_mut()), CKR_OK);
        let mut parent_session = 0;
        assert_eq!(
            f.C_OpenSession.unwrap()(
                0,
                CKF_SERIAL_SESSION,
                ptr::null_mut(),
                None,
                &mut parent_session
            ),
            CKR_OK
        );
        match libc::fork() {
            0 => {
                // Child: the parent's state is not ours until C_Initialize.
                let before = use_virtual_slot(f);
                let init = f.C_Initialize.unwrap()(ptr::null_mut());
                let after = use_virtual_slot(f);
                let finalize = f.C_Finalize.unwrap()(ptr::null_mut());
                let ok = before == CKR_CRYPTOKI_NOT_INITIALIZED
                    && init == CKR_OK
                    && after == CKR_OK
                    && finalize == CKR_OK;
                libc::_exit(if ok { 0 } else { 1 });
            }
            child => {
                assert!(child > 0, "fork failed");
                let mut status = 0;
                assert_eq!(libc::waitpid(child, &mut status, 0), child);
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "child status {status:#x}"
                );
            }
        }
        let mut random = [0u8; 16];
        assert_eq!(
            f.C_GenerateRandom.unwrap()(
                parent_session,
                random.as_mut_ptr(),
                random.len() as CK_ULONG
            ),
            CKR_OK,
            "the parent's session survives the child"
        );
        assert_eq!(use_virtual_slot(f), CKR_OK);
        assert_eq!(f.C_Finalize.unwrap()(ptr::null_mut()), CKR_OK);
    }
}
