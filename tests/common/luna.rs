//! Luna-like members: copies of the test-only `luna-member` library
//! (tests/luna-member), one Luna client library instance each, whose
//! partitions are SoftHSM tokens; and the provisioning a Luna partition
//! would have had from its SO (the cloning domain).
//!
//! Owns: building that crate once per test process, the copies and their
//! sidecar files. Must never: write a copy over a path that is still loaded
//! (each copy gets a fresh path in its test's temp dir).

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::trusted_wrapping_key;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use cryptoki_sys::{CKR_OK, CK_RV};
use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
use once_cell::sync::OnceCell;

use super::{initialize, load_softhsm, SoftHsm, DOMAIN_LABEL, DOMAIN_VALUE, SO_PIN};

/// Luna's partition modes, as the sidecar spells them.
pub const CLONING: &str = "cloning";
pub const KEY_EXPORT: &str = "key-export";

/// `libluna_member.so`, built (release) on first use in this process.
pub fn luna_member_library() -> PathBuf {
    static BUILT: OnceCell<PathBuf> = OnceCell::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            // Its own target dir: the cargo running these tests holds the
            // lock on the main one.
            let target = root.join("target").join("luna-member");
            let out = Command::new(env!("CARGO"))
                .current_dir(root)
                .args(["build", "--release", "-p", "luna-member", "--target-dir"])
                .arg(&target)
                .output()
                .unwrap_or_else(|e| panic!("run cargo build -p luna-member: {e}"));
            assert!(
                out.status.success(),
                "cargo build -p luna-member failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let lib = target.join("release").join("libluna_member.so");
            assert!(lib.is_file(), "{} missing after the build", lib.display());
            lib
        })
        .clone()
}

/// One partition of a Luna-like library: a token serial, its mode and its
/// cloning domain.
pub struct PartitionSpec<'a> {
    pub serial: &'a str,
    pub mode: &'a str,
    pub domain: &'a str,
}

/// One Luna client library instance: its own copy of the library, loaded
/// here too to reach the controls.
pub struct LunaMember {
    /// The copy: give this path to the loader under test.
    pub path: PathBuf,
    lib: libloading::Library,
}

impl LunaMember {
    /// Copies the library to `dir/<name>.so` with these partitions;
    /// `ha_slot` makes every slot describe itself as Luna's HA virtual slot.
    pub fn new(dir: &Path, name: &str, partitions: &[PartitionSpec], ha_slot: bool) -> LunaMember {
        LunaMember::with(
            dir,
            name,
            partitions,
            if ha_slot { "ha_slot = yes\n" } else { "" },
        )
    }

    /// As [`LunaMember::new`], with `extra` sidecar lines.
    pub fn with(dir: &Path, name: &str, partitions: &[PartitionSpec], extra: &str) -> LunaMember {
        let path = dir.join(format!("{name}.so"));
        fs::copy(luna_member_library(), &path)
            .unwrap_or_else(|e| panic!("copy luna member to {}: {e}", path.display()));
        let mut sidecar = format!("library = {}\n", super::SOFTHSM_LIB);
        for p in partitions {
            writeln!(sidecar, "partition = {} {} {}", p.serial, p.mode, p.domain).unwrap();
        }
        sidecar.push_str(extra);
        let mut sidecar_path = path.clone().into_os_string();
        sidecar_path.push(".conf");
        fs::write(&sidecar_path, sidecar)
            .unwrap_or_else(|e| panic!("write {}: {e}", sidecar_path.to_string_lossy()));
        // SAFETY: the luna member has no load-time side effects.
        let lib = unsafe { UnixLibrary::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }
            .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
        LunaMember {
            path,
            lib: lib.into(),
        }
    }

    fn control<F: Copy>(&self, name: &str) -> F {
        // SAFETY: every caller names a `luna_*` export with signature `F`.
        unsafe { self.lib.get::<F>(name).map(|f| *f) }
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", self.path.display()))
    }

    /// Every call but `C_Initialize`/`C_Finalize` answers `rv`.
    pub fn set_fault(&self, rv: CK_RV) {
        self.control::<extern "C" fn(CK_RV)>("luna_set_fault")(rv);
    }

    pub fn clear_fault(&self) {
        self.set_fault(CKR_OK);
    }

    /// The next `n` calls answer `rv`.
    pub fn fail_next(&self, n: u64, rv: CK_RV) {
        self.control::<extern "C" fn(u64, CK_RV)>("luna_fail_next")(n, rv);
    }

    /// Forwarded calls on the partition of token `serial` answer `rv`
    /// (`CKR_OK` clears), as if that partition alone had failed.
    pub fn set_partition_fault(&self, serial: &str, rv: CK_RV) {
        let serial = CString::new(serial).expect("serial without NUL");
        // SAFETY: `serial` is NUL-terminated and outlives the call.
        unsafe {
            self.control::<unsafe extern "C" fn(*const std::ffi::c_char, CK_RV)>(
                "luna_set_partition_fault",
            )(serial.as_ptr(), rv)
        }
    }

    /// Calls answered with a planned fault since the last reset.
    pub fn faults_returned(&self) -> u64 {
        self.control::<extern "C" fn() -> u64>("luna_faults_returned")()
    }

    /// Calls of the entry point `name` since the last reset.
    pub fn call_count(&self, name: &str) -> u64 {
        let name = CString::new(name).expect("function name without NUL");
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe {
            self.control::<unsafe extern "C" fn(*const std::ffi::c_char) -> u64>("luna_call_count")(
                name.as_ptr(),
            )
        }
    }

    pub fn reset_counts(&self) {
        self.control::<extern "C" fn()>("luna_reset_counts")();
    }
}

/// The value of a cloning domain's key: the same for every partition of
/// the domain, different between domains.
fn domain_secret(domain: &str) -> Vec<u8> {
    let mut value = [0x5au8; 32];
    for (i, b) in domain.bytes().enumerate() {
        value[i % 32] ^= b.wrapping_add(i as u8);
    }
    value.to_vec()
}

/// Provisions each token of `hsm` as its partition's SO would: the key of
/// the token's cloning domain (`domains[i]` for token `i`), and with
/// `domain_key` also pkcs11-ha's domain key, which only wrapping needs.
/// Call before anything initialises SoftHSM through a member.
pub fn provision_partitions(hsm: &SoftHsm, domains: &[&str], domain_key: bool) {
    hsm.activate();
    let softhsm = load_softhsm();
    initialize(&softhsm).expect("C_Initialize of SoftHSM");
    let slots = softhsm.get_slots_with_token().expect("slots");
    for (token, domain) in hsm.tokens.iter().zip(domains) {
        let slot = slots
            .iter()
            .copied()
            .find(|s| softhsm.get_token_info(*s).unwrap().serial_number() == token.serial)
            .expect("the token's slot");
        let session = softhsm.open_rw_session(slot).expect("C_OpenSession");
        session
            .login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
            .expect("SO login");
        let key = |label: String, value: Vec<u8>| {
            session
                .create_object(&trusted_wrapping_key(&label, &value))
                .expect("create a domain key")
        };
        key(
            format!("luna-member-cloning-domain:{domain}"),
            domain_secret(domain),
        );
        if domain_key {
            key(DOMAIN_LABEL.to_string(), DOMAIN_VALUE.to_vec());
        }
    }
    softhsm.finalize().expect("C_Finalize of SoftHSM");
}
