//! What the benches share: raw calls into a PKCS#11 function table, and
//! finding and loading the built library.

use cryptoki_sys::*;
use libloading::Library;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use std::{env, fs, ptr};

const HA_LIB_FILE: &str = "libpkcs11_ha.so";
/// Overrides where the built pkcs11-ha is (as in the integration tests).
const HA_LIB_ENV: &str = "PKCS11_HA_TEST_LIB";

/// Calls one entry of a function table, panicking on anything but `CKR_OK`.
macro_rules! ck {
    ($fns:expr, $func:ident ( $($arg:expr),* $(,)? )) => {{
        let rv = ck_raw!($fns, $func($($arg),*));
        assert_eq!(rv, CKR_OK, "{} returned {:#x}", stringify!($func), rv);
    }};
}

/// Calls one entry of a function table and returns its `CK_RV`.
macro_rules! ck_raw {
    ($fns:expr, $func:ident ( $($arg:expr),* $(,)? )) => {{
        let f = $fns.$func.expect(concat!(stringify!($func), " is NULL"));
        // SAFETY: the table came from the library's C_GetFunctionList, the
        // library stays loaded for the whole run, and every caller passes
        // arguments that follow the PKCS#11 signature.
        unsafe { f($($arg),*) }
    }};
}

/// The built cdylib: `$PKCS11_HA_TEST_LIB`, else
/// `target/release/libpkcs11_ha.so` under the crate.
pub fn ha_library_path() -> PathBuf {
    if let Some(p) = env::var_os(HA_LIB_ENV) {
        return PathBuf::from(p);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("release")
        .join(HA_LIB_FILE);
    if !path.is_file() {
        eprintln!(
            "error: {} not found: run `cargo build --release` first (the bench \
             dlopens the release cdylib), or set {HA_LIB_ENV}",
            path.display()
        );
        std::process::exit(2);
    }
    warn_if_stale(&path);
    path
}

/// Warns when a file under src/ is newer than the cdylib: the figures would
/// then be those of an older build.
fn warn_if_stale(lib: &Path) {
    fn newest(dir: &Path) -> Option<SystemTime> {
        let mut best = None;
        for entry in fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            let time = if path.is_dir() {
                newest(&path)
            } else {
                entry.metadata().and_then(|m| m.modified()).ok()
            };
            best = best.max(time);
        }
        best
    }
    let built = fs::metadata(lib).and_then(|m| m.modified()).ok();
    let src = newest(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    if let (Some(built), Some(src)) = (built, src) {
        if src > built {
            eprintln!(
                "warning: src/ changed after {} was built; run `cargo build --release` \
                 to measure the current code",
                lib.display()
            );
        }
    }
}

/// `dlopen`s `path` and copies its 2.40 function table.
pub fn load(path: &Path) -> (Library, CK_FUNCTION_LIST) {
    // SAFETY: loading a PKCS#11 module runs its constructors; both are the
    // modules under test.
    let lib =
        unsafe { Library::new(path) }.unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
    // SAFETY: C_GetFunctionList has the PKCS#11 signature; the table it
    // returns is at least the 2.40 one, of which we copy exactly that much.
    let fns = unsafe {
        let get = lib
            .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
            .unwrap_or_else(|e| panic!("{}: no C_GetFunctionList: {e}", path.display()));
        let get = (*get).expect("C_GetFunctionList is NULL");
        let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
        let rv = get(&mut list);
        assert!(
            rv == CKR_OK && !list.is_null(),
            "C_GetFunctionList: {rv:#x}"
        );
        ptr::read(list)
    };
    (lib, fns)
}

/// `C_Initialize` with `CKF_OS_LOCKING_OK` (pkcs11-ha reads the config
/// named in the environment).
pub fn initialize(fns: &CK_FUNCTION_LIST) -> CK_RV {
    let mut args = crate::common::init_args(CKF_OS_LOCKING_OK);
    ck_raw!(
        fns,
        C_Initialize(&mut args as *mut _ as *mut std::ffi::c_void)
    )
}

/// An RW session on `slot` with the user logged in with `pin` (or already
/// logged in through another session of the same token).
pub fn user_session(fns: &CK_FUNCTION_LIST, slot: CK_SLOT_ID, pin: &str) -> CK_SESSION_HANDLE {
    let mut session = 0;
    ck!(
        fns,
        C_OpenSession(
            slot,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            ptr::null_mut(),
            None,
            &mut session
        )
    );
    let mut pin = pin.as_bytes().to_vec();
    let rv = ck_raw!(
        fns,
        C_Login(session, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG)
    );
    assert!(
        rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN,
        "C_Login on slot {slot:#x}: {rv:#x}"
    );
    session
}

/// A `CK_ATTRIBUTE` over a value that outlives the call.
pub fn attr<T: ?Sized>(kind: CK_ATTRIBUTE_TYPE, value: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: kind,
        pValue: value as *const T as *mut std::ffi::c_void,
        ulValueLen: std::mem::size_of_val(value) as CK_ULONG,
    }
}
