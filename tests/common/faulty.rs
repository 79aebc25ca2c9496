//! Simulated members: copies of the test-only `faulty-member` library
//! (tests/faulty-member), each forwarding to a real PKCS#11 library, with
//! wrappers for the latency, capacity and fault controls it exports.
//!
//! Owns: building that crate once per test process, the copies and their
//! sidecar files. Must never: write a copy over a path that is still loaded
//! (each member gets a fresh path in its test's temp dir).

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cryptoki_sys::{CKR_OK, CK_RV};
use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
use once_cell::sync::OnceCell;

/// `libfaulty_member.so`, built (release) on first use in this process.
/// Panics with cargo's output if the build fails.
pub fn faulty_member_library() -> PathBuf {
    static BUILT: OnceCell<PathBuf> = OnceCell::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            // Its own target dir: the cargo running these tests holds the
            // lock on the main one.
            let target = root.join("target").join("faulty-member");
            let out = Command::new(env!("CARGO"))
                .current_dir(root)
                .args(["build", "--release", "-p", "faulty-member", "--target-dir"])
                .arg(&target)
                .output()
                .unwrap_or_else(|e| panic!("run cargo build -p faulty-member: {e}"));
            assert!(
                out.status.success(),
                "cargo build -p faulty-member failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let lib = target.join("release").join("libfaulty_member.so");
            assert!(lib.is_file(), "{} missing after the build", lib.display());
            lib
        })
        .clone()
}

/// One simulated member: its own copy of the library (so its own state),
/// loaded here to reach the controls. Hung calls are released on drop, so a
/// failed test leaves no thread blocked.
pub struct FaultyMember {
    /// The copy: give this path to the loader under test.
    pub path: PathBuf,
    lib: libloading::Library,
}

impl FaultyMember {
    /// One copy per serial, named `m0`, `m1`, ... in that order, each
    /// forwarding to `target_library` and showing only its own token: the
    /// members of a test group.
    pub fn one_per_token(
        dir: &Path,
        target_library: &str,
        serials: &[String],
    ) -> Vec<FaultyMember> {
        serials
            .iter()
            .enumerate()
            .map(|(i, serial)| {
                FaultyMember::new(dir, &format!("m{i}"), target_library, Some(serial))
            })
            .collect()
    }

    /// Copy the library to `dir/<name>.so`, forwarding to `target_library`
    /// and, with `serial`, showing only the token with that serial.
    pub fn new(dir: &Path, name: &str, target_library: &str, serial: Option<&str>) -> FaultyMember {
        let path = dir.join(format!("{name}.so"));
        fs::copy(faulty_member_library(), &path)
            .unwrap_or_else(|e| panic!("copy faulty member to {}: {e}", path.display()));
        let mut sidecar = format!("library = {target_library}\n");
        if let Some(serial) = serial {
            writeln!(sidecar, "serial = {serial}").unwrap();
        }
        let mut sidecar_path = path.clone().into_os_string();
        sidecar_path.push(".target");
        fs::write(&sidecar_path, sidecar)
            .unwrap_or_else(|e| panic!("write {}: {e}", sidecar_path.to_string_lossy()));
        // SAFETY: the faulty member has no load-time side effects.
        let lib = unsafe { UnixLibrary::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }
            .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        FaultyMember {
            path,
            lib: lib.into(),
        }
    }

    /// Refuse the AES key-wrap mechanisms from the first `C_Initialize`
    /// on (call before it): see the faulty member's crate doc.
    pub fn refuse_key_wrap(&self) {
        let mut sidecar_path = self.path.clone().into_os_string();
        sidecar_path.push(".target");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&sidecar_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", sidecar_path.to_string_lossy()));
        std::io::Write::write_all(&mut file, b"refuse_key_wrap = true\n").unwrap();
    }

    /// The export `name`, as a function pointer of type `F`.
    fn control<F: Copy>(&self, name: &str) -> F {
        // SAFETY: every caller names a `faulty_*` export with signature `F`.
        unsafe { self.lib.get::<F>(name).map(|f| *f) }
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", self.path.display()))
    }

    /// Sleep this long in every call (inside the capacity limit).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.control::<extern "C" fn(u64)>("faulty_set_latency_us")(us);
    }

    /// Serve at most `n` calls at once (0 = unlimited).
    pub fn set_capacity(&self, n: u32) {
        self.control::<extern "C" fn(u32)>("faulty_set_capacity")(n);
    }

    /// Every call but `C_Initialize`/`C_Finalize` returns `rv` unforwarded.
    pub fn set_fault(&self, rv: CK_RV) {
        self.control::<extern "C" fn(CK_RV)>("faulty_set_fault")(rv);
    }

    /// The next call of entry point `name` is carried out, then it and
    /// every call after it fail with `CKR_DEVICE_ERROR` (until
    /// [`FaultyMember::clear_fault`]): the member dies with that answer
    /// lost.
    pub fn die_after_call(&self, name: &str) {
        let name = CString::new(name).expect("function name without NUL");
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe {
            self.control::<unsafe extern "C" fn(*const std::ffi::c_char)>("faulty_die_after_call")(
                name.as_ptr(),
            )
        }
    }

    /// Only the entry point `name` (e.g. `"C_Login"`) returns `rv`
    /// unforwarded; the others answer. [`FaultyMember::clear_fault`] clears it.
    pub fn fail_call(&self, name: &str, rv: CK_RV) {
        let name = CString::new(name).expect("function name without NUL");
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe {
            self.control::<unsafe extern "C" fn(*const std::ffi::c_char, CK_RV)>(
                "faulty_set_call_fault",
            )(name.as_ptr(), rv)
        }
    }

    /// Forward calls again (clears [`FaultyMember::fail_after`] and
    /// [`FaultyMember::fail_call`] too).
    pub fn clear_fault(&self) {
        self.set_fault(CKR_OK);
    }

    /// Forward the next `n` calls, then fail every call with `rv`.
    pub fn fail_after(&self, n: u64, rv: CK_RV) {
        self.control::<extern "C" fn(u64, CK_RV)>("faulty_fail_after")(n, rv);
    }

    /// Block calls that arrive from now on until [`FaultyMember::release`].
    pub fn hang(&self) {
        self.control::<extern "C" fn()>("faulty_hang")();
    }

    /// Let the blocked calls continue and stop blocking new ones.
    pub fn release(&self) {
        self.control::<extern "C" fn()>("faulty_release")();
    }

    /// Wait until at least `n` calls are blocked by [`FaultyMember::hang`];
    /// `false` if they are not within `timeout`.
    pub fn wait_for_blocked(&self, n: u32, timeout: Duration) -> bool {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.control::<extern "C" fn(u32, u64) -> bool>("faulty_wait_for_blocked")(n, ms)
    }

    /// Calls of the entry point `name` (e.g. `"C_Login"`) since the last
    /// reset, faulted ones included.
    pub fn call_count(&self, name: &str) -> u64 {
        let name = CString::new(name).expect("function name without NUL");
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe {
            self.control::<unsafe extern "C" fn(*const std::ffi::c_char) -> u64>(
                "faulty_call_count",
            )(name.as_ptr())
        }
    }

    /// The thread id of the last caller of `C_Initialize` (0: none yet).
    pub fn initializing_thread(&self) -> i32 {
        self.control::<extern "C" fn() -> i32>("faulty_initializing_thread")()
    }

    /// The most calls served at once since the last reset.
    pub fn max_concurrent(&self) -> u32 {
        self.control::<extern "C" fn() -> u32>("faulty_max_concurrent")()
    }

    /// Zero the call counts and [`FaultyMember::max_concurrent`].
    pub fn reset_counts(&self) {
        self.control::<extern "C" fn()>("faulty_reset_counts")();
    }
}

impl Drop for FaultyMember {
    fn drop(&mut self) {
        self.release();
    }
}
