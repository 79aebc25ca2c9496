//! What reconciliation across processes costs: the time of one pass over a
//! two-member group of SoftHSM tokens holding N AES keys (N = 1,000 and
//! 10,000) where member B lacks M of them, as the library reports it in the
//! HA log ("reconciled ... in X ms"); and the delay it adds to an
//! application's first calls, against the same process with reconciliation
//! off (`[HASynchronize] scale = 0`).
//!
//! Each run is a fresh child process (this binary again, told what to do by
//! `RECONCILE_CHILD`) on a fresh copy of the tokens of
//! `benches/object_scale.rs` (`target/object-scale/N`; run that bench once
//! to build them), with B's missing keys removed directly through SoftHSM.
//! The child reports:
//! - `init_ms`: `C_Initialize` (which starts the reconciliation thread);
//! - `first_calls_ms`: right after `C_Login` (which asks for a pass over
//!   the private keys): find one key by label, read its label, encrypt a
//!   block;
//! - `busy_calls_ms`: the same calls 0.4 s later, once the pass has begun;
//! - `pass_ms`: the pass's own time, read from the HA log.
//!
//! Run: `cargo build --release && cargo bench --bench reconcile`; it prints
//! a table (median of three children each). `-- 10000:1` runs only that
//! scenario (objects:missing).

#[macro_use]
mod support;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/tokens.rs"]
mod tokens;
use common::{SOFTHSM_LIB, USER_PIN};
use support::{attr, ha_library_path, initialize, load, user_session};
use tokens::{find, find_slot};

use cryptoki_sys::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use std::{env, fs, ptr};

const CHILD_ENV: &str = "RECONCILE_CHILD";
const GROUP_LABEL: &str = "scale";
const RUNS: usize = 3;

fn main() {
    if let Ok(spec) = env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    if env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    println!(
        "| objects | B lacks | pass (ms) | C_Initialize on/off (ms) | first calls on/off (ms) \
         | calls 0.4 s later on/off (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    let asked: Vec<(usize, usize)> = env::args()
        .filter_map(|a| {
            let (objects, missing) = a.split_once(':')?;
            Some((objects.parse().ok()?, missing.parse().ok()?))
        })
        .collect();
    let all = [(1_000, 1), (10_000, 1), (1_000, 1_000), (10_000, 1_000)];
    let scenarios = if asked.is_empty() {
        &all[..]
    } else {
        &asked[..]
    };
    for &(objects, missing) in scenarios {
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..RUNS {
            on.push(run(objects, missing, true));
            off.push(run(objects, missing, false));
        }
        let figure =
            |runs: &[Figures], f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {objects} | {missing} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
            figure(&on, |f| f.pass_ms),
            figure(&on, |f| f.init_ms),
            figure(&off, |f| f.init_ms),
            figure(&on, |f| f.first_calls_ms),
            figure(&off, |f| f.first_calls_ms),
            figure(&on, |f| f.busy_calls_ms),
            figure(&off, |f| f.busy_calls_ms),
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

struct Figures {
    init_ms: f64,
    first_calls_ms: f64,
    busy_calls_ms: f64,
    pass_ms: f64,
}

/// One child on a fresh copy of the tokens for `objects` keys, with
/// `missing` of them removed from member B.
fn run(objects: usize, missing: usize, reconcile: bool) -> Figures {
    let cached = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/object-scale")
        .join(objects.to_string());
    if !cached.join("ready").is_file() {
        eprintln!(
            "error: {} missing: run `cargo bench --bench object_scale` once to build the tokens",
            cached.display()
        );
        std::process::exit(2);
    }
    let dir = tempfile::tempdir().unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(cached.join("tokens"))
        .arg(dir.path().join("tokens"))
        .status()
        .unwrap();
    assert!(copied.success(), "copy the tokens");
    let softhsm_conf = dir.path().join("softhsm2.conf");
    fs::write(
        &softhsm_conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().join("tokens").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    fs::create_dir(&log).unwrap();
    let mut config = fs::read_to_string(cached.join("pkcs11-ha.conf")).unwrap();
    config += &format!(
        "haLogStatus = enabled\nhaLogPath = {}\nhaStateDir = {}\nReconcileInterval = 0\n",
        log.display(),
        dir.path().join("state").display()
    );
    if !reconcile {
        config += &format!("\n[HASynchronize]\n{GROUP_LABEL} = 0\n");
    }
    let ha_conf = dir.path().join("pkcs11-ha.conf");
    fs::write(&ha_conf, config).unwrap();
    remove_from_b(&softhsm_conf, missing);

    let out = Command::new(env::current_exe().unwrap())
        .env(CHILD_ENV, if reconcile { "wait" } else { "no-wait" })
        .env("RECONCILE_LAST_KEY", format!("key-{:05}", objects - 1))
        .env(common::SOFTHSM_CONF_ENV, &softhsm_conf)
        .env(common::CONF_ENV, &ha_conf)
        .env("RECONCILE_LOG", log.join("haErrorLog.txt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Figures {
        init_ms: value("init_ms"),
        first_calls_ms: value("first_calls_ms"),
        busy_calls_ms: value("busy_calls_ms"),
        pass_ms: value("pass_ms"),
    }
}

/// Removes the first `count` keys of member B ("memberB") directly.
fn remove_from_b(softhsm_conf: &Path, count: usize) {
    let out = Command::new(env::current_exe().unwrap())
        .env(CHILD_ENV, format!("remove {count}"))
        .env(common::SOFTHSM_CONF_ENV, softhsm_conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn child(spec: &str) {
    if let Some(count) = spec.strip_prefix("remove ") {
        let (_lib, fns) = load(Path::new(SOFTHSM_LIB));
        assert_eq!(initialize(&fns), CKR_OK);
        let session = user_session(&fns, find_slot(&fns, "memberB"), USER_PIN);
        let doomed: Vec<String> = (0..count.parse::<usize>().unwrap())
            .map(|i| format!("key-{i:05}"))
            .collect();
        let mut removed = 0;
        // One search of the whole token: a search per key costs N each.
        for object in find(&fns, session, &mut []) {
            let mut label = [0u8; 64];
            let mut template = [attr(CKA_LABEL, &label[..])];
            template[0].pValue = label.as_mut_ptr() as *mut _;
            ck!(
                fns,
                C_GetAttributeValue(session, object, template.as_mut_ptr(), 1)
            );
            let label = String::from_utf8_lossy(&label[..template[0].ulValueLen as usize]);
            if doomed.iter().any(|d| *d == label) {
                ck!(fns, C_DestroyObject(session, object));
                removed += 1;
            }
        }
        assert_eq!(removed, doomed.len(), "keys removed from memberB");
        ck!(fns, C_Finalize(ptr::null_mut()));
        return;
    }
    let (_lib, fns) = load(&ha_library_path());
    let started = Instant::now();
    assert_eq!(initialize(&fns), CKR_OK);
    println!("init_ms {}", started.elapsed().as_secs_f64() * 1e3);
    let session = user_session(&fns, find_slot(&fns, GROUP_LABEL), USER_PIN);
    let started = Instant::now();
    // The last key: B lacks only the first ones, so every member has it.
    let label = env::var("RECONCILE_LAST_KEY").unwrap();
    let key = find(&fns, session, &mut [attr(CKA_LABEL, label.as_bytes())])[0];
    read_and_encrypt(&fns, session, key);
    println!("first_calls_ms {}", started.elapsed().as_secs_f64() * 1e3);
    // Once the pass has begun (it waits 250 ms after it is asked for), the
    // same calls again: what an application's calls see beside a pass.
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    let again = find(&fns, session, &mut [attr(CKA_LABEL, label.as_bytes())])[0];
    read_and_encrypt(&fns, session, again);
    println!("busy_calls_ms {}", started.elapsed().as_secs_f64() * 1e3);
    if spec == "wait" {
        let log = PathBuf::from(env::var_os("RECONCILE_LOG").unwrap());
        let deadline = Instant::now() + Duration::from_secs(600);
        let pass = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let reported = text.lines().find_map(|l| {
                let (_, rest) = l.split_once("reconciled ")?;
                let (_, ms) = rest.split_once(" members in ")?;
                ms.split_once(" ms")?.0.parse::<f64>().ok()
            });
            if let Some(ms) = reported {
                break ms;
            }
            assert!(
                Instant::now() < deadline,
                "no pass reported in {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        println!("pass_ms {pass}");
    }
    ck!(fns, C_Finalize(ptr::null_mut()));
}

fn read_and_encrypt(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
    let mut read = [0u8; 16];
    let mut template = [attr(CKA_LABEL, &read[..])];
    template[0].pValue = read.as_mut_ptr() as *mut _;
    ck!(
        fns,
        C_GetAttributeValue(session, key, template.as_mut_ptr(), 1)
    );
    encrypt_block(fns, session, key);
}

fn encrypt_block(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_ECB,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    ck!(fns, C_EncryptInit(session, &mut mechanism, key));
    let mut block = [0u8; 16];
    let mut out = [0u8; 16];
    let mut out_len = out.len() as CK_ULONG;
    ck!(
        fns,
        C_Encrypt(
            session,
            block.as_mut_ptr(),
            16,
            out.as_mut_ptr(),
            &mut out_len
        )
    );
}
