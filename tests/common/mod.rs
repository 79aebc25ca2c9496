//! Shared helpers for the integration tests (`mod common;` in each test).
//!
//! Owns: throw-away SoftHSM token directories, pkcs11-ha config files, and
//! loading the freshly built `libpkcs11_ha.so` through the `cryptoki` crate.
//! Must never: touch the system's real SoftHSM tokens (every token lives in a
//! temp dir with its own `SOFTHSM2_CONF`), or change process-global state
//! (environment, `C_Initialize`) without holding [`serial_guard`].
//!
//! Typical use:
//! ```ignore
//! let fx = common::Fixture::group(2);          // takes the serial guard
//! let session = fx.user_session();            // RW + logged in on "hagroup"
//! ```
#![allow(dead_code)]

pub mod faulty;
pub mod luna;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

/// User PIN of every token the helpers create. Tests search output for it to
/// prove it never leaks, so it must not be digits a serial or a count can hold
/// (a random serial `5e5678103d95f6b7` once "leaked" the SO PIN 5678).
pub const USER_PIN: &str = "ha-user-pin";
/// Security-officer PIN of every token the helpers create; see [`USER_PIN`].
pub const SO_PIN: &str = "ha-so-pin";
/// The SoftHSMv2 module (Debian package `libsofthsm2`).
pub const SOFTHSM_LIB: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Name of the SoftHSM library entry in configs written by [`Fixture`].
pub const SOFTHSM_LIB_NAME: &str = "softhsm";
/// Label of the HA group made by [`Fixture::group`].
pub const GROUP_LABEL: &str = "hagroup";
/// Env var naming the pkcs11-ha config file.
pub const CONF_ENV: &str = "PKCS11_HA_CONF";
/// Env var naming the SoftHSM config file (read at `C_Initialize`).
pub const SOFTHSM_CONF_ENV: &str = "SOFTHSM2_CONF";
/// Optional override of [`library_path`], e.g. to test an installed build.
pub const LIB_OVERRIDE_ENV: &str = "PKCS11_HA_TEST_LIB";
/// File name of the cdylib.
pub const LIB_FILE: &str = "libpkcs11_ha.so";

static SERIAL: Mutex<()> = Mutex::new(());

/// Process-wide lock. Hold it in every test that sets env vars or
/// initialises a PKCS#11 library: both are process-global. A test that
/// panicked while holding it does not poison it for the others.
/// Not re-entrant: [`Fixture`] constructors take it themselves.
pub fn serial_guard() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Where the built library is
// ---------------------------------------------------------------------------

/// The profile dir (`target/<profile>` or `target/<triple>/<profile>`) of the
/// running test binary. Test binaries live in `<profile>/deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test binary has a parent dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Where `cargo build`/`cargo test` may have put the cdylib, best first.
///
/// `cargo test` (re)builds `<profile>/deps/libpkcs11_ha.so` but does NOT
/// refresh the uplifted `<profile>/libpkcs11_ha.so`, which may be stale from
/// an older `cargo build`; so `deps/` comes first.
pub fn library_candidates() -> Vec<PathBuf> {
    let profile = profile_dir();
    vec![profile.join("deps").join(LIB_FILE), profile.join(LIB_FILE)]
}

/// The `libpkcs11_ha.so` of the current cargo build (or `$PKCS11_HA_TEST_LIB`).
pub fn library_path() -> PathBuf {
    if let Some(p) = env::var_os(LIB_OVERRIDE_ENV) {
        return PathBuf::from(p);
    }
    let candidates = library_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("{LIB_FILE} not found; looked at {candidates:?}"))
}

/// `target/release/libpkcs11_ha.so` (as built by `cargo build --release`,
/// which scripts/test runs before `cargo test`), for tests that drive the
/// library from child processes such as `pkcs11-tool`.
pub fn release_library_path() -> PathBuf {
    let profile = profile_dir();
    let target = profile.parent().expect("profile dir has a parent");
    let path = target.join("release").join(LIB_FILE);
    assert!(
        path.is_file(),
        "{} missing: run `cargo build --release` first",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// SoftHSM tokens
// ---------------------------------------------------------------------------

/// One initialised SoftHSM token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub label: String,
    /// 16 hex digits, random, chosen by SoftHSM.
    pub serial: String,
    /// SoftHSM's slot ID for this token (derived from the serial).
    pub slot_id: u64,
}

/// A private SoftHSM token directory with its own `softhsm2.conf`.
/// Removed (with its tokens) on drop.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    /// In the order the labels were given.
    pub tokens: Vec<Token>,
}

impl SoftHsm {
    /// Make a temp token dir and one token per label (labels must be unique),
    /// with [`USER_PIN`] and [`SO_PIN`]. Does not touch this process's env.
    pub fn new(labels: &[&str]) -> SoftHsm {
        let dir = tempfile::Builder::new()
            .prefix("pkcs11-ha-test-")
            .tempdir()
            .expect("create temp dir");
        let token_dir = dir.path().join("tokens");
        fs::create_dir(&token_dir).expect("create token dir");
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                token_dir.display()
            ),
        )
        .expect("write softhsm2.conf");
        let mut hsm = SoftHsm {
            dir,
            conf,
            tokens: Vec::new(),
        };
        for label in labels {
            hsm.add_token(label);
        }
        hsm
    }

    /// Initialise one more token in this directory and return it.
    pub fn add_token(&mut self, label: &str) -> Token {
        assert!(
            self.tokens.iter().all(|t| t.label != label),
            "duplicate token label {label:?}"
        );
        let out = self
            .util()
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .expect("run softhsm2-util (is softhsm2 installed?)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token {label:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let token = self
            .show_slots()
            .into_iter()
            .find(|t| t.label == label)
            .unwrap_or_else(|| panic!("token {label:?} not in softhsm2-util --show-slots"));
        self.tokens.push(token.clone());
        token
    }

    /// Every initialised token in the directory, as `softhsm2-util
    /// --show-slots` reports it (sorted by slot ID, not creation order).
    pub fn show_slots(&self) -> Vec<Token> {
        let out = self
            .util()
            .arg("--show-slots")
            .output()
            .expect("run softhsm2-util --show-slots");
        assert!(out.status.success(), "softhsm2-util --show-slots failed");
        parse_show_slots(&String::from_utf8_lossy(&out.stdout))
    }

    /// A `softhsm2-util` command with `SOFTHSM2_CONF` set on the child only.
    pub fn util(&self) -> Command {
        let mut cmd = Command::new("softhsm2-util");
        cmd.env(SOFTHSM_CONF_ENV, &self.conf);
        cmd
    }

    /// Set `SOFTHSM2_CONF` in this process (caller holds [`serial_guard`]).
    pub fn activate(&self) {
        env::set_var(SOFTHSM_CONF_ENV, &self.conf);
    }

    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    pub fn serials(&self) -> Vec<String> {
        self.tokens.iter().map(|t| t.serial.clone()).collect()
    }

    pub fn token(&self, label: &str) -> &Token {
        self.tokens
            .iter()
            .find(|t| t.label == label)
            .unwrap_or_else(|| panic!("no token {label:?}"))
    }
}

/// Parse `softhsm2-util --show-slots`: initialised tokens only.
pub fn parse_show_slots(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut slot: Option<u64> = None;
    let mut serial = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Slot ") {
            slot = rest.trim().parse().ok();
            serial.clear();
        } else if let Some((key, value)) = line.trim_start().split_once(':') {
            let value = value.trim();
            match key {
                "Serial number" => serial = value.to_string(),
                "Label" if !serial.is_empty() => {
                    if let Some(slot_id) = slot {
                        tokens.push(Token {
                            label: value.to_string(),
                            serial: serial.clone(),
                            slot_id,
                        });
                    }
                }
                _ => {}
            }
        }
    }
    tokens
}

/// `true` for a SoftHSM-style serial: exactly 16 hex digits.
pub fn is_hex16(serial: &str) -> bool {
    serial.len() == 16 && serial.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------
// pkcs11-ha configuration
// ---------------------------------------------------------------------------

/// One `[VirtualToken]` group: members in order, primary first.
#[derive(Clone, Debug, Default)]
pub struct GroupSpec {
    pub label: String,
    pub members: Vec<String>,
    pub standby: Vec<String>,
}

impl GroupSpec {
    pub fn new(label: &str, members: &[String]) -> GroupSpec {
        GroupSpec {
            label: label.to_string(),
            members: members.to_vec(),
            standby: Vec::new(),
        }
    }

    pub fn with_standby(mut self, standby: &[String]) -> GroupSpec {
        self.standby = standby.to_vec();
        self
    }
}

/// The config text: `libraries` are `(name, path)` in library-index order;
/// group `i` becomes `VirtualTokenNN` with NN = i (so its slot ID is i).
pub fn config_text(libraries: &[(&str, &str)], groups: &[GroupSpec], ha_only: bool) -> String {
    let mut s = String::from("[Libraries]\n");
    for (name, path) in libraries {
        writeln!(s, "{name} = {path}").unwrap();
    }
    s.push_str("\n[VirtualToken]\n");
    for (i, g) in groups.iter().enumerate() {
        writeln!(s, "VirtualToken{i:02}Label = {}", g.label).unwrap();
        writeln!(s, "VirtualToken{i:02}Members = {}", g.members.join(",")).unwrap();
        if !g.standby.is_empty() {
            writeln!(s, "VirtualToken{i:02}Standby = {}", g.standby.join(",")).unwrap();
        }
    }
    writeln!(s, "\n[HAConfiguration]\nHAOnly = {}", u8::from(ha_only)).unwrap();
    s
}

/// Write `dir/pkcs11-ha.conf` (see [`config_text`]), with the state
/// directory `dir/state` (so that no test shares lock files or deletion
/// records with another), and return its path.
pub fn write_config(
    dir: &Path,
    libraries: &[(&str, &str)],
    groups: &[GroupSpec],
    ha_only: bool,
) -> PathBuf {
    let path = dir.join("pkcs11-ha.conf");
    let mut text = config_text(libraries, groups, ha_only);
    writeln!(text, "haStateDir = {}", dir.join("state").display()).unwrap();
    fs::write(&path, text).expect("write pkcs11-ha.conf");
    path
}

/// This machine's multiarch library directory, `/usr/lib/<triplet>` (as
/// the C compiler names it), where Debian puts p11-kit's proxy and
/// OpenSSL's engines.
pub fn multiarch_dir() -> PathBuf {
    let output = Command::new("cc")
        .arg("-print-multiarch")
        .output()
        .expect("run cc -print-multiarch (install gcc)");
    let triplet = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success() && !triplet.is_empty(),
        "cc -print-multiarch names no triplet: {output:?}"
    );
    Path::new("/usr/lib").join(triplet)
}

/// The status of group `group`, through the exported
/// `PKCS11HA_GetGroupStatus` of the loaded library.
pub fn group_status(group: u64) -> pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS {
    // SAFETY: the symbol has this signature; the library is loaded.
    unsafe {
        let library = libloading::Library::new(library_path()).expect("load pkcs11-ha");
        let get: libloading::Symbol<
            unsafe extern "C" fn(u64, *mut pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS) -> u64,
        > = library
            .get(b"PKCS11HA_GetGroupStatus\0")
            .expect("PKCS11HA_GetGroupStatus");
        let mut status = std::mem::zeroed();
        assert_eq!(get(group, &mut status), 0, "PKCS11HA_GetGroupStatus");
        status
    }
}

/// Whether member `i` of group `group` serves now.
pub fn member_serves(group: u64, i: usize) -> bool {
    group_status(group).members[i].state == pkcs11_ha::state_api::PKCS11HA_STATE_UP
}

/// Set `PKCS11_HA_CONF` in this process (caller holds [`serial_guard`]).
pub fn activate_config(path: &Path) {
    env::set_var(CONF_ENV, path);
}

/// Slot ID of a pass-through slot: FNV-1a (32 bits) of
/// `"<library name, lower case>/<member slot ID>"`, brought into
/// `[0x1000, 2^31)` (no two slots of these tests collide).
pub fn passthrough_slot_id(library_name: &str, member_slot_id: u64) -> u64 {
    let key = format!("{}/{member_slot_id}", library_name.to_lowercase());
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    0x1000 + u64::from(hash) % ((1 << 31) - 0x1000)
}

/// Serial of a virtual token: "1" + the last 15 characters of the primary's.
pub fn virtual_serial(primary_serial: &str) -> String {
    let skip = primary_serial.len().saturating_sub(15);
    format!("1{}", &primary_serial[skip..])
}

/// The serial a group of `members` (primary first) reports: as
/// [`virtual_serial`], with the leading digit raised to the first of 2-9
/// that no member's serial already has.
pub fn group_serial(members: &[String]) -> String {
    let base = virtual_serial(&members[0]);
    ('1'..='9')
        .map(|digit| format!("{digit}{}", &base[1..]))
        .find(|candidate| !members.contains(candidate))
        .expect("a free leading digit")
}

// ---------------------------------------------------------------------------
// Loading libraries
// ---------------------------------------------------------------------------

/// Load the built pkcs11-ha library (not initialised).
pub fn load_ha() -> Pkcs11 {
    let path = library_path();
    Pkcs11::new(&path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

/// Label of the domain key the fixtures provision (the library's default).
pub const DOMAIN_LABEL: &str = "pkcs11-ha-domain";

/// The domain secret the fixtures provision: the same AES-256 value on
/// every member, so key material wrapped on one unwraps on another.
pub const DOMAIN_VALUE: [u8; 32] = [0x42; 32];

/// Provisions the group's domain key on every token of `hsm`, as the
/// management CLI does: a trusted AES-256 key that only wraps and unwraps,
/// created by the token's SO. Call before the HA library is initialised
/// (SoftHSM is initialised directly here, then finalised).
pub fn provision_domain(hsm: &SoftHsm, value: &[u8; 32]) {
    hsm.activate();
    let softhsm = load_softhsm();
    initialize(&softhsm).expect("C_Initialize of SoftHSM");
    let slots = softhsm.get_slots_with_token().expect("slots");
    let initialized = slots.into_iter().filter(|s| {
        softhsm
            .get_token_info(*s)
            .is_ok_and(|info| info.token_initialized())
    });
    for slot in initialized {
        let session = softhsm.open_rw_session(slot).expect("C_OpenSession");
        session
            .login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
            .expect("SO login");
        session
            .create_object(&trusted_wrapping_key(DOMAIN_LABEL, value))
            .expect("create the domain key");
    }
    softhsm.finalize().expect("C_Finalize of SoftHSM");
}

/// The template of a key only an SO can make: AES, trusted, that only
/// wraps and unwraps and never leaves the token -- a group's domain key,
/// or a stand-in Luna partition's cloning key.
pub fn trusted_wrapping_key(label: &str, value: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(label.into()),
        Attribute::Value(value.to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ]
}

/// Load SoftHSM directly (not initialised). Do not initialise it while the
/// HA library is initialised in this process: both share one SoftHSM
/// instance (same dlopen handle).
pub fn load_softhsm() -> Pkcs11 {
    Pkcs11::new(SOFTHSM_LIB).unwrap_or_else(|e| panic!("load {SOFTHSM_LIB}: {e}"))
}

/// `C_Initialize` with `CKF_OS_LOCKING_OK`.
pub fn initialize(pkcs11: &Pkcs11) -> cryptoki::error::Result<()> {
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
}

/// The first slot with a token whose label is `label`.
pub fn slot_by_label(pkcs11: &Pkcs11, label: &str) -> Option<Slot> {
    let slots = pkcs11.get_slots_with_token().expect("C_GetSlotList");
    slots.into_iter().find(|s| {
        pkcs11
            .get_token_info(*s)
            .map(|t| t.label() == label)
            .unwrap_or(false)
    })
}

/// Open an RW session on `slot` and log the user in with [`USER_PIN`];
/// the login is per token and application, so a later session finds it
/// already done.
pub fn user_session(pkcs11: &Pkcs11, slot: Slot) -> Session {
    let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
    match session.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login: {e:?}"),
    }
    session
}

/// `pkcs11-tool --module MODULE` with `SOFTHSM2_CONF` and `PKCS11_HA_CONF`
/// set on the child only (a separate process: no serial guard needed).
pub fn pkcs11_tool(module: &Path, hsm: &SoftHsm, config: &Path) -> Command {
    let mut cmd = Command::new("pkcs11-tool");
    cmd.arg("--module")
        .arg(module)
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .env(CONF_ENV, config);
    cmd
}

/// Makes a token data object labelled `label` on `token` of `hsm` from
/// another process: `pkcs11-tool` on SoftHSM directly.
pub fn data_object_by_another_process(hsm: &SoftHsm, token: &str, label: &str) {
    let value = hsm.dir.path().join(format!("{label}.value"));
    std::fs::write(&value, label).expect("write the object's value");
    let out = std::process::Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_LIB, "--token-label", token])
        .args(["--login", "--pin", USER_PIN, "--write-object"])
        .arg(&value)
        .args(["--type", "data", "--label", label])
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool --write-object on {token}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// SoftHSM tokens + config + the HA library, initialised with OS locking.
/// Holds [`serial_guard`] for its whole life; `C_Finalize` on drop.
/// Declare sessions after the fixture so they are dropped before it.
pub struct Fixture {
    pub hsm: SoftHsm,
    pub config: PathBuf,
    pub pkcs11: Pkcs11,
    finalized: bool,
    // Last field: released only after everything above is dropped.
    _guard: MutexGuard<'static, ()>,
}

impl Fixture {
    /// `n` tokens "member0".."member{n-1}" and one group [`GROUP_LABEL`] of
    /// all of them (member0 primary), HAOnly = 0.
    pub fn group(n_members: usize) -> Fixture {
        let guard = serial_guard();
        let labels: Vec<String> = (0..n_members).map(|i| format!("member{i}")).collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let hsm = SoftHsm::new(&labels);
        provision_domain(&hsm, &DOMAIN_VALUE);
        let config = write_config(
            hsm.dir.path(),
            &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
            false,
        );
        Fixture::start_with_guard(guard, hsm, config)
    }

    /// Take the serial guard, then as [`Fixture::start_with_guard`].
    pub fn start(hsm: SoftHsm, config: PathBuf) -> Fixture {
        Fixture::start_with_guard(serial_guard(), hsm, config)
    }

    /// Activate `hsm` and `config`, load the HA library and initialise it.
    /// Panics if `C_Initialize` fails.
    pub fn start_with_guard(
        guard: MutexGuard<'static, ()>,
        hsm: SoftHsm,
        config: PathBuf,
    ) -> Fixture {
        hsm.activate();
        activate_config(&config);
        let pkcs11 = load_ha();
        initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
        Fixture {
            hsm,
            config,
            pkcs11,
            finalized: false,
            _guard: guard,
        }
    }

    /// The virtual slot of group [`GROUP_LABEL`].
    pub fn virtual_slot(&self) -> Slot {
        self.slot_by_label(GROUP_LABEL)
    }

    /// The slot whose token has `label`; panics if none.
    pub fn slot_by_label(&self, label: &str) -> Slot {
        slot_by_label(&self.pkcs11, label).unwrap_or_else(|| panic!("no slot with token {label:?}"))
    }

    /// The pass-through slot of `hsm.tokens[i]` (SoftHSM is library 0).
    pub fn member_slot(&self, i: usize) -> Slot {
        let id = passthrough_slot_id(SOFTHSM_LIB_NAME, self.hsm.tokens[i].slot_id);
        Slot::try_from(id).expect("slot id")
    }

    /// RW session on the virtual slot, user logged in.
    pub fn user_session(&self) -> Session {
        user_session(&self.pkcs11, self.virtual_slot())
    }

    /// `C_Finalize` now (drop then does nothing more).
    pub fn finalize(&mut self) -> cryptoki::error::Result<()> {
        self.finalized = true;
        self.pkcs11.clone().finalize()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !self.finalized {
            // Errors here would only mask the test's own result.
            let _ = self.finalize();
        }
        env::remove_var(CONF_ENV);
        env::remove_var(SOFTHSM_CONF_ENV);
    }
}

/// Compiles `tests/c/<name>.c` into `dir/<name>` with the system compiler
/// (strict C99, warnings as errors) and returns the program's path.
pub fn build_c_program(name: &str, dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let program = dir.join(name);
    let output = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Werror", "-o"])
        .arg(&program)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run the C compiler");
    assert!(
        output.status.success(),
        "cc {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    program
}

/// `C_Initialize` arguments with no mutex callbacks and `flags`
/// (`CKF_OS_LOCKING_OK` for the usual start).
pub fn init_args(flags: cryptoki_sys::CK_FLAGS) -> cryptoki_sys::CK_C_INITIALIZE_ARGS {
    cryptoki_sys::CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags,
        pReserved: std::ptr::null_mut(),
    }
}
