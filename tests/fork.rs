//! A child process after `fork()` gets a working library from its own
//! `C_Initialize`, and the parent's members and sessions are left alone --
//! also when other parent threads were inside member calls at the fork.

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;

use common::*;
use cryptoki_sys::*;
use p11kit::P11KitServer;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// `PKCS11HA_GetGroupStatus` of group 0.
fn group_status(library: &libloading::Library) -> pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS {
    // SAFETY: the symbol has this signature; the library stays loaded.
    unsafe {
        let get: libloading::Symbol<
            unsafe extern "C" fn(
                CK_SLOT_ID,
                *mut pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS,
            ) -> CK_RV,
        > = library.get(b"PKCS11HA_GetGroupStatus\0").unwrap();
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), CKR_OK);
        status
    }
}

/// Waits up to `patience` for `child` to exit; kills it if it does not.
/// Its exit status, or `None` if it hung.
fn wait_for(child: libc::pid_t, patience: Duration) -> Option<i32> {
    let deadline = Instant::now() + patience;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        match unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            0 => {
                // SAFETY: our own child, hung.
                unsafe {
                    libc::kill(child, libc::SIGKILL);
                    libc::waitpid(child, &mut status, 0);
                }
                return None;
            }
            pid => {
                assert_eq!(pid, child, "waitpid failed");
                return Some(status);
            }
        }
    }
}

/// A fork while one parent thread waits inside a call on a stalled network
/// member (holding that member's call lock) and another keeps calling the
/// other member: the child's `C_Initialize` takes none of the parent's
/// locks and reuses none of its member objects -- it gets new connections
/// of its own -- so it works, and the parent carries on when the member
/// resumes.
#[test]
fn child_starts_clean_while_parent_threads_are_inside_member_calls() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["alpha", "beta"]);
    let dir = hsm.dir.path();
    let servers: Vec<P11KitServer> = ["alpha", "beta"]
        .iter()
        .map(|label| {
            P11KitServer::start(
                SOFTHSM_LIB,
                &hsm.conf,
                label,
                &dir.join(format!("{label}.sock")),
            )
        })
        .collect();
    let client = p11kit::client_module();
    let config = dir.join("fork.conf");
    std::fs::write(
        &config,
        format!(
            "[Libraries]\nhsmA = {client}\nhsmB = {client}\n\n\
             [LibraryEnvironment]\nhsmA.P11_KIT_SERVER_ADDRESS = {}\n\
             hsmB.P11_KIT_SERVER_ADDRESS = {}\n\n\
             [VirtualToken]\nVirtualToken00Label = {GROUP_LABEL}\nVirtualToken00Members = {}\n\n\
             [HAConfiguration]\nmemberTimeout = 600000\nreconnAtt = 0\n",
            servers[0].address(),
            servers[1].address(),
            hsm.serials().join(",")
        ),
    )
    .unwrap();
    activate_config(&config);
    // SAFETY: loading our own library.
    let library = unsafe { libloading::Library::new(library_path()).unwrap() };
    let f = function_list(&library);
    // SAFETY: C calls with valid arguments throughout.
    unsafe {
        assert_eq!(
            f.C_Initialize.unwrap()(&mut init_args(CKF_OS_LOCKING_OK) as *mut _ as *mut _),
            CKR_OK
        );
    }
    // Sessions open on both members before alpha stalls (opening one
    // needs every member).
    let sessions: Vec<CK_SESSION_HANDLE> = (0..3)
        .map(|_| {
            let mut session = 0;
            // SAFETY: a valid out-pointer.
            let rv = unsafe {
                f.C_OpenSession.unwrap()(0, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut session)
            };
            assert_eq!(rv, CKR_OK);
            session
        })
        .collect();
    let stalled = servers[0].workers();
    assert_eq!(stalled.len(), 1, "one connection to alpha");
    // SAFETY: kill(2) on the server's worker.
    unsafe { libc::kill(stalled[0] as libc::pid_t, libc::SIGSTOP) };

    // Callers on the virtual slot until one waits on alpha; then (alpha
    // being the busier) the others' calls all go to beta.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = sessions
        .iter()
        .map(|&session| {
            let (stop, calls) = (Arc::clone(&stop), Arc::clone(&calls));
            std::thread::spawn(move || {
                let mut random = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: a valid buffer of the length given.
                    let rv = unsafe {
                        f.C_GenerateRandom.unwrap()(
                            session,
                            random.as_mut_ptr(),
                            random.len() as CK_ULONG,
                        )
                    };
                    assert_eq!(rv, CKR_OK);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while group_status(&library).members[0].callsInFlight == 0 {
        assert!(
            Instant::now() < deadline,
            "no call reached the stalled member"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before_fork = calls.load(Ordering::Relaxed);
    while calls.load(Ordering::Relaxed) < before_fork + 20 {
        assert!(Instant::now() < deadline, "beta serves no calls");
        std::thread::yield_now();
    }

    // SAFETY: the child calls only the library and _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: C calls with valid arguments; the child ends with _exit.
        unsafe {
            let before = use_virtual_slot(f);
            let init =
                f.C_Initialize.unwrap()(&mut init_args(CKF_OS_LOCKING_OK) as *mut _ as *mut _);
            let after = use_virtual_slot(f);
            let finalize = f.C_Finalize.unwrap()(ptr::null_mut());
            let ok = before == CKR_CRYPTOKI_NOT_INITIALIZED
                && init == CKR_OK
                && after == CKR_OK
                && finalize == CKR_OK;
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    assert!(child > 0, "fork failed");
    let status = wait_for(child, Duration::from_secs(30));

    // SAFETY: kill(2) on the server's worker.
    unsafe { libc::kill(stalled[0] as libc::pid_t, libc::SIGCONT) };
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.join().expect("a parent caller failed");
    }
    let status = status.expect("the child hung in the library after fork");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    // SAFETY: C calls with valid arguments.
    unsafe {
        assert_eq!(use_virtual_slot(f), CKR_OK);
        assert_eq!(f.C_Finalize.unwrap()(ptr::null_mut()), CKR_OK);
    }
}
