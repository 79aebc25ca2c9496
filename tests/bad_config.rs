//! A bad configuration must not crash the library: `C_Initialize` returns
//! `CKR_GENERAL_ERROR` and one line on stderr names the file, the section,
//! the key and the problem. Settings that are accepted but do not do what
//! they say (a member no library has, a domain key no member holds, an HA
//! log directory that cannot be written) get one warning line each, and
//! `C_Initialize` succeeds. stderr is captured by running `pkcs11-tool
//! --list-slots` on the built library in a child process. A member token
//! that is simply absent is not a configuration error: that case, and
//! recovery after a bad configuration, are checked in-process through the
//! raw C function table.

mod common;

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::OnceLock;

use common::*;
use cryptoki_sys::*;
use libloading::Library;

// ---------------------------------------------------------------------------
// Child process: pkcs11-tool
// ---------------------------------------------------------------------------

/// A member serial no token has.
const ABSENT_SERIAL: &str = "feedfacefeedface";

/// A valid configuration: SoftHSM and one group of an (absent) member.
fn good_config() -> String {
    config_text(
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &[ABSENT_SERIAL.to_string()])],
        false,
    )
}

/// Runs `pkcs11-tool --list-slots` with `PKCS11_HA_CONF` = `config` (which
/// need not exist) and checks that `C_Initialize` failed cleanly with
/// `CKR_GENERAL_ERROR` and exactly one pkcs11-ha line on stderr, naming the
/// file and containing every one of `parts`.
#[track_caller]
fn assert_rejected(case: &str, config: &Path, parts: &[&str]) {
    // A private, empty SoftHSM directory, so nothing real is touched.
    let hsm = SoftHsm::new(&[]);
    let out = pkcs11_tool(&library_path(), &hsm, config)
        .arg("--list-slots")
        .output()
        .expect("run pkcs11-tool (is opensc installed?)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!("{case}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    match out.status.code() {
        Some(0) => panic!("{case}: pkcs11-tool succeeded on a bad config\n{context}"),
        Some(_) => {}
        None => panic!(
            "{case}: pkcs11-tool died of a signal: {}\n{context}",
            out.status
        ),
    }
    assert!(
        stderr.contains("C_Initialize") && stderr.contains("CKR_GENERAL_ERROR"),
        "{case}: pkcs11-tool did not report C_Initialize -> CKR_GENERAL_ERROR\n{context}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pkcs11-ha:"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{case}: want exactly one pkcs11-ha line on stderr\n{context}"
    );
    let line = lines[0];
    let file = config.display().to_string();
    for part in std::iter::once(file.as_str()).chain(parts.iter().copied()) {
        assert!(
            line.contains(part),
            "{case}: the message does not name {part:?}: {line}\n{context}"
        );
    }
}

/// Runs `pkcs11-tool --list-slots` on the tokens of `hsm` with
/// `PKCS11_HA_CONF` = `config`, checks that it succeeded and that stderr
/// holds exactly one pkcs11-ha line, a warning naming the file and every
/// one of `parts` (none at all when `parts` is empty).
#[track_caller]
fn assert_warned(case: &str, hsm: &SoftHsm, config: &Path, parts: &[&str]) {
    let out = pkcs11_tool(&library_path(), hsm, config)
        .arg("--list-slots")
        .output()
        .expect("run pkcs11-tool (is opensc installed?)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!(
        "{case}\n--- stdout ---\n{}--- stderr ---\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "{case}: pkcs11-tool failed\n{context}"
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pkcs11-ha:"))
        .collect();
    if parts.is_empty() {
        assert!(
            lines.is_empty(),
            "{case}: want no pkcs11-ha line\n{context}"
        );
        return;
    }
    assert_eq!(
        lines.len(),
        1,
        "{case}: want exactly one pkcs11-ha line\n{context}"
    );
    let line = lines[0];
    assert!(line.starts_with("pkcs11-ha: warning: "), "{case}: {line}");
    let file = config.display().to_string();
    for part in std::iter::once(file.as_str()).chain(parts.iter().copied()) {
        assert!(
            line.contains(part),
            "{case}: the warning does not name {part:?}: {line}\n{context}"
        );
    }
}

/// Writes `text` to `name` in a fresh temp dir (returned to keep it alive).
fn write_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("pkcs11-ha-bad-config-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// `[Libraries]` with SoftHSM, then `rest`.
fn with_softhsm(rest: &str) -> String {
    format!("[Libraries]\n{SOFTHSM_LIB_NAME} = {SOFTHSM_LIB}\n\n{rest}")
}

#[test]
fn good_config_is_accepted_by_the_child() {
    // The harness itself: the same run with a good config succeeds, so the
    // failures below are the bad configs' doing.
    let hsm = SoftHsm::new(&[]);
    let (_dir, config) = write_file("good.conf", &good_config());
    let out = pkcs11_tool(&library_path(), &hsm, &config)
        .arg("--list-slots")
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool --list-slots with a good config: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("does-not-exist.conf");
    assert_rejected("missing file", &config, &["No such file"]);
}

#[test]
fn unknown_section() {
    let text = format!("{}\n[Bogus]\nsomething = 1\n", good_config());
    let (_dir, config) = write_file("unknown-section.conf", &text);
    assert_rejected("unknown section", &config, &["[Bogus]", "unknown section"]);
}

#[test]
fn unknown_key() {
    let text = good_config().replace("VirtualToken00Label", "VirtualToken00Lable");
    assert!(text.contains("VirtualToken00Lable"));
    let (_dir, config) = write_file("unknown-key.conf", &text);
    assert_rejected(
        "unknown key VirtualToken00Lable",
        &config,
        &["[VirtualToken]", "VirtualToken00Lable", "unknown key"],
    );
}

#[test]
fn line_that_is_not_key_value() {
    // In the middle of a section, and as the last line of the file: either
    // way the message must quote the offending line.
    let bad = "this line has no equals sign";
    let middle = with_softhsm(&format!(
        "[VirtualToken]\nVirtualToken00Label = g\n{bad}\nVirtualToken00Members = 1\n"
    ));
    let (_dir, config) = write_file("no-equals-middle.conf", &middle);
    assert_rejected(
        "a line without = in the middle",
        &config,
        &["[VirtualToken]", bad],
    );
    let last = with_softhsm(&format!("[VirtualToken]\nVirtualToken00Label = g\n{bad}\n"));
    let (_dir, config) = write_file("no-equals-last.conf", &last);
    assert_rejected("a line without = as the last line", &config, &[bad]);
}

#[test]
fn duplicate_label() {
    for (first, second) in [("same", "same"), ("same", "SAME")] {
        let text = with_softhsm(&format!(
            "[VirtualToken]\n\
             VirtualToken00Label = {first}\n\
             VirtualToken00Members = 1111111111111111\n\
             VirtualToken01Label = {second}\n\
             VirtualToken01Members = 2222222222222222\n"
        ));
        let (_dir, config) = write_file("duplicate-label.conf", &text);
        assert_rejected(
            &format!("duplicate label {first:?} / {second:?}"),
            &config,
            &[
                "[VirtualToken]",
                "VirtualToken01Label",
                second,
                "already used",
            ],
        );
    }
}

#[test]
fn reserved_label() {
    for label in ["HA", "ha"] {
        let text = with_softhsm(&format!(
            "[VirtualToken]\n\
             VirtualToken00Label = {label}\n\
             VirtualToken00Members = 1111111111111111\n"
        ));
        let (_dir, config) = write_file("reserved-label.conf", &text);
        assert_rejected(
            &format!("label {label:?}"),
            &config,
            &["[VirtualToken]", "VirtualToken00Label", label, "reserved"],
        );
    }
}

#[test]
fn empty_member_list() {
    let text = with_softhsm(
        "[VirtualToken]\n\
         VirtualToken00Label = g\n\
         VirtualToken00Members =\n",
    );
    let (_dir, config) = write_file("empty-members.conf", &text);
    assert_rejected(
        "empty member list",
        &config,
        &["[VirtualToken]", "VirtualToken00Members", "no serial"],
    );

    let text = with_softhsm(
        "[VirtualToken]\n\
         VirtualToken00Label = g\n\
         VirtualToken00Members = 1111111111111111,,2222222222222222\n",
    );
    let (_dir, config) = write_file("empty-member-item.conf", &text);
    assert_rejected(
        "empty item in the member list",
        &config,
        &["[VirtualToken]", "VirtualToken00Members", "empty item"],
    );

    let text = with_softhsm("[VirtualToken]\nVirtualToken00Label = g\n");
    let (_dir, config) = write_file("no-members.conf", &text);
    assert_rejected(
        "no member key at all",
        &config,
        &[
            "[VirtualToken]",
            "VirtualToken00Members",
            "no active members",
        ],
    );
}

#[test]
fn library_that_does_not_exist() {
    let missing = "/nonexistent/pkcs11-ha-test/libghost.so";
    let text = format!(
        "[Libraries]\n\
         {SOFTHSM_LIB_NAME} = {SOFTHSM_LIB}\n\
         ghost = {missing}\n\n\
         [VirtualToken]\n\
         VirtualToken00Label = g\n\
         VirtualToken00Members = {ABSENT_SERIAL}\n"
    );
    let (_dir, config) = write_file("missing-library.conf", &text);
    assert_rejected(
        "library path that does not exist",
        &config,
        &[
            "[Libraries]",
            "ghost",
            missing,
            "cannot open shared object file",
        ],
    );
}

#[test]
fn library_the_loader_refuses_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not a shared object\n".repeat(20)).unwrap();
    let text = format!(
        "[Libraries]\nfake = {}\n\n[VirtualToken]\nVirtualToken00Label = g\n\
         VirtualToken00Members = {ABSENT_SERIAL}\n",
        fake.display()
    );
    let (_dir, config) = write_file("fake-library.conf", &text);
    assert_rejected(
        "a file that is not a shared object",
        &config,
        &["[Libraries]", "fake", "invalid ELF header"],
    );
}

#[test]
fn pkcs11_ha_as_its_own_member_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("libcopy-of-ha.so");
    std::fs::copy(library_path(), &copy).expect("copy the built library");
    let itself = library_path();
    for (case, path) in [
        ("the same file", itself.as_path()),
        ("a copy", copy.as_path()),
    ] {
        let text = format!(
            "[Libraries]\n\
             {SOFTHSM_LIB_NAME} = {SOFTHSM_LIB}\n\
             myself = {}\n\n\
             [VirtualToken]\n\
             VirtualToken00Label = g\n\
             VirtualToken00Members = {ABSENT_SERIAL}\n",
            path.display()
        );
        let (_dir, config) = write_file("self-member.conf", &text);
        assert_rejected(
            &format!("pkcs11-ha named as a member library: {case}"),
            &config,
            &[
                "[Libraries]",
                "myself",
                &path.display().to_string(),
                "is pkcs11-ha itself",
            ],
        );
    }
}

#[test]
fn more_members_than_ca_get_ha_state_reports() {
    let serials: Vec<String> = (0..33).map(|i| format!("{i:016x}")).collect();
    let text = with_softhsm(&format!(
        "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = {}\n",
        serials[..30].join(",")
    ));
    let (_dir, config) = write_file("thirty.conf", &text);
    let hsm = SoftHsm::new(&[]);
    assert!(
        pkcs11_tool(&library_path(), &hsm, &config)
            .arg("--list-slots")
            .output()
            .unwrap()
            .status
            .success(),
        "30 members are accepted"
    );
    let text = with_softhsm(&format!(
        "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = {}\n\
         VirtualToken00Standby = {}\n",
        serials[..30].join(","),
        serials[30..].join(",")
    ));
    let (_dir, config) = write_file("thirty-three.conf", &text);
    assert_rejected(
        "33 members and standbys",
        &config,
        &["[VirtualToken]", "VirtualToken00Standby", "33", "32"],
    );
}

#[test]
fn member_serial_no_library_has_is_a_warning() {
    let hsm = SoftHsm::new(&[]);
    let (_dir, config) = write_file("absent-member.conf", &good_config());
    assert_warned(
        "a member serial no library has",
        &hsm,
        &config,
        &[
            "[VirtualToken]",
            "VirtualToken00Members",
            ABSENT_SERIAL,
            SOFTHSM_LIB_NAME,
        ],
    );
}

#[test]
fn ha_log_directory_that_cannot_be_written_is_a_warning() {
    let hsm = SoftHsm::new(&[]);
    let a_file = hsm.dir.path().join("a-file");
    std::fs::write(&a_file, "").unwrap();
    let missing = hsm.dir.path().join("missing");
    // Not writable even by root.
    let unwritable = Path::new("/proc/self");
    for (case, directory) in [
        ("missing", missing.as_path()),
        ("a file", a_file.as_path()),
        ("unwritable", unwritable),
    ] {
        let text = with_softhsm(&format!(
            "[HAConfiguration]\nhaLogStatus = enabled\nhaLogPath = {}\n",
            directory.display()
        ));
        let (_dir, config) = write_file("ha-log.conf", &text);
        let path = directory.display().to_string();
        assert_warned(
            &format!("haLogPath {case}"),
            &hsm,
            &config,
            &["[HAConfiguration]", "haLogPath", &path],
        );
    }
}

#[test]
fn domain_label_no_member_holds_is_a_warning() {
    // Provisioning initialises SoftHSM in this process and sets its
    // configuration variable: beside a test initialising pkcs11-ha here,
    // one of the two C_Initialize calls failed (CKR_CRYPTOKI_ALREADY_INITIALIZED).
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["a", "b"]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    let log_dir = hsm.dir.path().join("halog");
    std::fs::create_dir(&log_dir).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "haLogStatus = enabled\nhaLogPath = {}\n",
        log_dir.display()
    ));
    assert!(text.contains("[HAConfiguration]"), "{text}");
    std::fs::write(&config, text).unwrap();
    assert_warned(
        "no domain key",
        &hsm,
        &config,
        &["[VirtualToken]", "VirtualToken00DomainLabel", DOMAIN_LABEL],
    );
    let log = std::fs::read_to_string(log_dir.join("haErrorLog.txt")).unwrap();
    assert!(
        log.contains("config warning") && log.contains(DOMAIN_LABEL),
        "{log}"
    );
    provision_domain(&hsm, &DOMAIN_VALUE);
    assert_warned("domain key provisioned", &hsm, &config, &[]);
}

#[test]
fn malformed_ha_only() {
    for value in ["maybe", "2", "on"] {
        let text = good_config().replace("HAOnly = 0", &format!("HAOnly = {value}"));
        assert!(text.contains(&format!("HAOnly = {value}")));
        let (_dir, config) = write_file("ha-only.conf", &text);
        assert_rejected(
            &format!("HAOnly = {value}"),
            &config,
            &["[HAConfiguration]", "HAOnly", &format!("\"{value}\"")],
        );
    }
}

// ---------------------------------------------------------------------------
// In-process: the raw C table
// ---------------------------------------------------------------------------

/// The built library's 2.40 function table; the library stays loaded for
/// the life of the test process.
fn ha() -> &'static CK_FUNCTION_LIST {
    struct Loaded {
        list: CK_FUNCTION_LIST,
        _library: Library,
    }
    static HA: OnceLock<Loaded> = OnceLock::new();
    &HA.get_or_init(|| {
        let path = library_path();
        // SAFETY: loading a PKCS#11 module; the symbol has its PKCS#11 type.
        unsafe {
            let library =
                Library::new(&path).unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
            let get_list = library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .expect("C_GetFunctionList exported")
                .expect("C_GetFunctionList not NULL");
            let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
            assert_eq!(get_list(&mut list), CKR_OK, "C_GetFunctionList");
            Loaded {
                list: *list,
                _library: library,
            }
        }
    })
    .list
}

/// Calls one entry of the function table.
macro_rules! ck {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        let f = ha().$f.expect(concat!(stringify!($f), " is NULL in the table"));
        // SAFETY: the pointers handed over point to live locals of the types
        // the PKCS#11 signature names, or are NULL where that is allowed.
        #[allow(unused_unsafe)]
        unsafe {
            f($($arg),*)
        }
    }};
}

/// `C_Finalize` and env cleanup on drop, so a failed assertion still
/// leaves the process clean for the next test.
struct Finalize;

impl Drop for Finalize {
    fn drop(&mut self) {
        // CKR_CRYPTOKI_NOT_INITIALIZED is fine: nothing to finalise.
        ck!(C_Finalize(ptr::null_mut()));
        std::env::remove_var(CONF_ENV);
        std::env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn initialize() -> CK_RV {
    let mut args = init_args(CKF_OS_LOCKING_OK);
    ck!(C_Initialize(&mut args as *mut _ as *mut c_void))
}

fn slot_list(token_present: CK_BBOOL) -> Vec<CK_SLOT_ID> {
    let mut count: CK_ULONG = 0;
    let rv = ck!(C_GetSlotList(token_present, ptr::null_mut(), &mut count));
    assert_eq!(rv, CKR_OK, "C_GetSlotList(NULL)");
    let mut slots = vec![0; count as usize];
    let rv = ck!(C_GetSlotList(token_present, slots.as_mut_ptr(), &mut count));
    assert_eq!(rv, CKR_OK, "C_GetSlotList");
    slots.truncate(count as usize);
    slots
}

#[test]
fn absent_member_token_is_not_a_config_error() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["present"]);
    let present = hsm.token("present").serial.clone();
    // Group 00: only an absent member. Group 01: the real token.
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[
            GroupSpec::new("absent", &[ABSENT_SERIAL.to_string()]),
            GroupSpec::new("present", &[present]),
        ],
        false,
    );
    hsm.activate();
    activate_config(&config);
    let _finalize = Finalize;

    assert_eq!(initialize(), CKR_OK, "C_Initialize with an absent member");

    let all = slot_list(CK_FALSE);
    assert!(
        all.contains(&0),
        "the absent group's slot 0 is listed: {all:x?}"
    );
    assert!(all.contains(&1), "group 01's slot is listed: {all:x?}");
    let with_token = slot_list(CK_TRUE);
    assert!(
        !with_token.contains(&0),
        "slot 0 listed as having a token: {with_token:x?}"
    );
    assert!(
        with_token.contains(&1),
        "slot 1 has a token: {with_token:x?}"
    );

    let mut slot_info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(
        ck!(C_GetSlotInfo(0, &mut slot_info)),
        CKR_OK,
        "C_GetSlotInfo(0)"
    );
    assert_eq!(
        slot_info.flags & CKF_TOKEN_PRESENT,
        0,
        "slot 0 says CKF_TOKEN_PRESENT"
    );

    let mut token_info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(
        ck!(C_GetTokenInfo(0, &mut token_info)),
        CKR_TOKEN_NOT_PRESENT,
        "C_GetTokenInfo(0)"
    );
    let mut count: CK_ULONG = 0;
    assert_eq!(
        ck!(C_GetMechanismList(0, ptr::null_mut(), &mut count)),
        CKR_TOKEN_NOT_PRESENT,
        "C_GetMechanismList(0)"
    );
    let mut session = CK_INVALID_HANDLE;
    assert_eq!(
        ck!(C_OpenSession(
            0,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            ptr::null_mut(),
            None,
            &mut session
        )),
        CKR_TOKEN_NOT_PRESENT,
        "C_OpenSession(0)"
    );

    // The group whose member is there works as usual.
    assert_eq!(
        ck!(C_GetTokenInfo(1, &mut token_info)),
        CKR_OK,
        "C_GetTokenInfo(1)"
    );
    let label = String::from_utf8_lossy(&token_info.label);
    assert_eq!(label.trim_end(), "present", "group 01's token label");
    assert_eq!(
        ck!(C_GetSlotInfo(1, &mut slot_info)),
        CKR_OK,
        "C_GetSlotInfo(1)"
    );
    assert_ne!(
        slot_info.flags & CKF_TOKEN_PRESENT,
        0,
        "slot 1 has its token"
    );
}

#[test]
fn bad_config_leaves_the_library_uninitialized_and_restartable() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["member0"]);
    let serial = hsm.token("member0").serial.clone();
    let good = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &[serial])],
        false,
    );
    let bad = hsm.dir.path().join("bad.conf");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("VirtualToken00Label", "VirtualToken00Lable"),
    )
    .unwrap();
    hsm.activate();
    let _finalize = Finalize;

    for attempt in 0..2 {
        activate_config(&bad);
        assert_eq!(
            initialize(),
            CKR_GENERAL_ERROR,
            "C_Initialize with a bad config (attempt {attempt})"
        );
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        assert_eq!(
            ck!(C_GetInfo(&mut info)),
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "C_GetInfo after the refused C_Initialize"
        );
        assert_eq!(
            ck!(C_Finalize(ptr::null_mut())),
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "C_Finalize after the refused C_Initialize"
        );
    }

    // Fixing the file is all it takes.
    activate_config(&good);
    assert_eq!(initialize(), CKR_OK, "C_Initialize with the fixed config");
    let mut token_info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(
        ck!(C_GetTokenInfo(0, &mut token_info)),
        CKR_OK,
        "C_GetTokenInfo(0) after the fix"
    );
    let label = String::from_utf8_lossy(&token_info.label);
    assert_eq!(label.trim_end(), GROUP_LABEL);
}
