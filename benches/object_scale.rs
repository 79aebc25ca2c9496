//! How pkcs11-ha scales with the number of objects on its members: a
//! two-member group of SoftHSM tokens holding N AES keys (N = 100, 1,000,
//! 10,000), against SoftHSM directly on the first member's token, in the
//! same run.
//!
//! What is measured is what applications do first, so every measurement
//! runs in a fresh child process (this binary again, told what to do by
//! `OBJECT_SCALE_CHILD`), which reports its own timings:
//! - `init`: `C_Initialize` + open a session + `C_Login`;
//! - `enumerate`: find every object, then read `CKA_CLASS`, `CKA_LABEL` and
//!   `CKA_ID` of each (a Java KeyStore load, NSS listing a token);
//! - `first_use`: for 50 keys, find it by label and encrypt one block with
//!   it (an OpenSSL engine resolving a `pkcs11:` URI);
//! - `create`: generate 100 token keys, timed, then destroy them (untimed),
//!   so the tokens keep N objects.
//!
//! The child also reports its resident memory after `enumerate`, the CPU
//! time its own thread spent enumerating, and the key creation rate per
//! second of CPU time it used (on a machine shared with other builds and
//! disk writers, wall time mostly measures them).
//!
//! The tokens are built once per N (directly on SoftHSM: the same key value,
//! label and ID on both members, as replication leaves them) under
//! `target/object-scale/N` and reused by later runs.
//!
//! Run: `cargo build --release && cargo bench --bench object_scale`; after
//! the criterion groups it prints a table of ratios (median of five child
//! runs each). `-- table` prints only the table; `-- --test` runs N = 100
//! once; `-- table 1000` (any object counts) only those.

#[macro_use]
mod support;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/tokens.rs"]
mod tokens;
use common::{
    config_text, GroupSpec, SoftHsm, DOMAIN_VALUE, SOFTHSM_LIB, SOFTHSM_LIB_NAME, USER_PIN,
};
use support::{attr, ha_library_path, initialize, load, user_session};
use tokens::{find, find_slot};

use criterion::Criterion;
use cryptoki_sys::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use std::{env, fs, ptr};

const CHILD_ENV: &str = "OBJECT_SCALE_CHILD";
const GROUP_LABEL: &str = "scale";
const FIRST_USE_KEYS: usize = 50;
const CREATED_KEYS: usize = 100;
const RUNS: usize = 5;

/// Which library a child drives.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Group,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Group => "group",
        }
    }
}

/// The tokens for one N: their SoftHSM config, the pkcs11-ha config, and
/// the first member's slot (for the direct target).
struct Tokens {
    dir: PathBuf,
    objects: usize,
}

impl Tokens {
    fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    fn ha_conf(&self) -> PathBuf {
        self.dir.join("pkcs11-ha.conf")
    }

    /// Builds the tokens for `objects` keys, or reuses those of an earlier
    /// run. The config files are written afresh each time, naming this
    /// directory: a copied `target/` (another worktree's) would otherwise
    /// drive the tokens -- and the reconciliation lock -- of the original.
    fn prepare(objects: usize) -> Tokens {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/object-scale")
            .join(objects.to_string());
        let tokens = Tokens { dir, objects };
        if !tokens.dir.join("ready").is_file() {
            tokens.build();
        }
        tokens.write_configs();
        tokens
    }

    fn build(&self) {
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).unwrap();
        let hsm = SoftHsm::new(&["memberA", "memberB"]);
        common::provision_domain(&hsm, &DOMAIN_VALUE);
        eprintln!(
            "object_scale: making {} keys on each member (once)",
            self.objects
        );
        fill(&hsm, self.objects);
        let copied = Command::new("cp")
            .arg("-a")
            .arg(hsm.token_dir())
            .arg(self.dir.join("tokens"))
            .status()
            .expect("run cp");
        assert!(copied.success(), "copy the token directory");
        fs::write(self.dir.join("serials"), hsm.serials().join(",")).unwrap();
        fs::write(self.dir.join("ready"), b"").unwrap();
    }

    /// The SoftHSM config naming this directory's tokens, and the
    /// pkcs11-ha config grouping them with a state directory of its own.
    fn write_configs(&self) {
        fs::write(
            self.softhsm_conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                self.dir.join("tokens").display()
            ),
        )
        .unwrap();
        let serials: Vec<String> = fs::read_to_string(self.dir.join("serials"))
            .expect("the tokens' serials (remove target/object-scale to build them again)")
            .split(',')
            .map(str::to_string)
            .collect();
        let mut text = config_text(
            &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[GroupSpec::new(GROUP_LABEL, &serials)],
            true,
        );
        text.push_str(&format!(
            "haStateDir = {}\n",
            self.dir.join("state").display()
        ));
        fs::write(self.ha_conf(), text).unwrap();
    }

    /// Runs one child and returns what it printed: `name value` lines.
    fn child(&self, target: Target, op: &str) -> Vec<(String, f64)> {
        let out = Command::new(env::current_exe().unwrap())
            .env(CHILD_ENV, format!("{} {op}", target.name()))
            .env(common::SOFTHSM_CONF_ENV, self.softhsm_conf())
            .env(common::CONF_ENV, self.ha_conf())
            .output()
            .expect("run a child");
        assert!(
            out.status.success(),
            "child {} {op} for {} objects: {}",
            target.name(),
            self.objects,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    fn figure(&self, target: Target, op: &str, name: &str) -> f64 {
        self.child(target, op)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("child {op} reported no {name}"))
            .1
    }
}

/// `objects` AES keys on every token of `hsm`, the same on each.
fn fill(hsm: &SoftHsm, objects: usize) {
    hsm.activate();
    let (_lib, fns) = load(Path::new(SOFTHSM_LIB));
    assert_eq!(initialize(&fns), CKR_OK);
    for token in &hsm.tokens {
        let session = user_session(&fns, token.slot_id, USER_PIN);
        let (class, key_type): (CK_ULONG, CK_ULONG) = (CKO_SECRET_KEY, CKK_AES);
        let (yes, no): (CK_BBOOL, CK_BBOOL) = (CK_TRUE, CK_FALSE);
        for i in 0..objects {
            let label = format!("key-{i:05}");
            let id = (i as u32).to_be_bytes();
            let mut value = [0u8; 32];
            value[..4].copy_from_slice(&id);
            let mut template = [
                attr(CKA_CLASS, &class),
                attr(CKA_KEY_TYPE, &key_type),
                attr(CKA_TOKEN, &yes),
                attr(CKA_PRIVATE, &yes),
                attr(CKA_SENSITIVE, &yes),
                attr(CKA_EXTRACTABLE, &yes),
                attr(CKA_ENCRYPT, &yes),
                attr(CKA_DECRYPT, &no),
                attr(CKA_LABEL, label.as_bytes()),
                attr(CKA_ID, &id[..]),
                attr(CKA_VALUE, &value[..]),
            ];
            let mut handle = 0;
            ck!(
                fns,
                C_CreateObject(
                    session,
                    template.as_mut_ptr(),
                    template.len() as CK_ULONG,
                    &mut handle
                )
            );
        }
        ck!(fns, C_CloseSession(session));
    }
    ck!(fns, C_Finalize(ptr::null_mut()));
}

// ---------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------

fn child(spec: &str) {
    let (target, op) = spec.split_once(' ').expect("TARGET OP");
    let path = match target {
        "direct" => PathBuf::from(SOFTHSM_LIB),
        _ => ha_library_path(),
    };
    let (_lib, fns) = load(&path);
    let started = Instant::now();
    assert_eq!(initialize(&fns), CKR_OK);
    let slot = find_slot(
        &fns,
        if target == "direct" {
            "memberA"
        } else {
            GROUP_LABEL
        },
    );
    let session = user_session(&fns, slot, USER_PIN);
    let init = started.elapsed();
    match op {
        "init" => println!("seconds {}", init.as_secs_f64()),
        "enumerate" => {
            let rss_before = resident_kib();
            let cpu = thread_cpu_seconds();
            let started = Instant::now();
            let all = find(&fns, session, &mut []);
            let found = started.elapsed();
            let find_cpu = thread_cpu_seconds() - cpu;
            for object in &all {
                read_class_label_id(&fns, session, *object);
            }
            println!("seconds {}", started.elapsed().as_secs_f64());
            println!("cpu_seconds {}", thread_cpu_seconds() - cpu);
            println!("find_seconds {}", found.as_secs_f64());
            println!("find_cpu_seconds {find_cpu}");
            println!("objects {}", all.len());
            println!(
                "kib_per_1000 {}",
                (resident_kib() - rss_before) * 1000.0 / all.len().max(1) as f64
            );
        }
        "first_use" => {
            // Counting the objects is the same for both targets and is
            // left out: what is measured is each key's first use.
            let count = find(&fns, session, &mut []).len();
            let step = (count / FIRST_USE_KEYS).max(1);
            let started = Instant::now();
            for i in (0..count).step_by(step).take(FIRST_USE_KEYS) {
                let label = format!("key-{i:05}");
                let mut template = [attr(CKA_LABEL, label.as_bytes())];
                let found = find(&fns, session, &mut template);
                assert_eq!(found.len(), 1, "{label}");
                encrypt_block(&fns, session, found[0]);
            }
            let per_key = started.elapsed().as_secs_f64() / FIRST_USE_KEYS as f64;
            println!("seconds_per_key {per_key}");
        }
        "create" => {
            let cpu = cpu_seconds();
            let started = Instant::now();
            let made: Vec<CK_OBJECT_HANDLE> = (0..CREATED_KEYS)
                .map(|i| generate(&fns, session, i))
                .collect();
            let seconds = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu;
            for object in made {
                ck!(fns, C_DestroyObject(session, object));
            }
            println!("keys_per_second {}", CREATED_KEYS as f64 / seconds);
            println!("cpu_keys_per_second {}", CREATED_KEYS as f64 / cpu);
        }
        other => panic!("unknown child operation {other}"),
    }
    ck!(fns, C_Finalize(ptr::null_mut()));
}

fn read_class_label_id(
    fns: &CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) {
    let mut class: CK_ULONG = 0;
    let mut label = [0u8; 64];
    let mut id = [0u8; 64];
    let mut template = [
        attr(CKA_CLASS, &class),
        attr(CKA_LABEL, &label[..]),
        attr(CKA_ID, &id[..]),
    ];
    template[0].pValue = &mut class as *mut _ as *mut _;
    template[1].pValue = label.as_mut_ptr() as *mut _;
    template[2].pValue = id.as_mut_ptr() as *mut _;
    let rv = ck_raw!(
        fns,
        C_GetAttributeValue(session, object, template.as_mut_ptr(), 3)
    );
    // The domain key (direct target) has no ID of this size: any answer
    // that filled CKA_CLASS counts.
    assert!(
        rv == CKR_OK || rv == CKR_ATTRIBUTE_TYPE_INVALID,
        "C_GetAttributeValue: {rv:#x}"
    );
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

fn generate(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, i: usize) -> CK_OBJECT_HANDLE {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let length: CK_ULONG = 32;
    let yes: CK_BBOOL = CK_TRUE;
    let label = format!("new-{i}");
    let mut template = [
        attr(CKA_VALUE_LEN, &length),
        attr(CKA_TOKEN, &yes),
        attr(CKA_EXTRACTABLE, &yes),
        attr(CKA_ENCRYPT, &yes),
        attr(CKA_LABEL, label.as_bytes()),
    ];
    let mut key = 0;
    ck!(
        fns,
        C_GenerateKey(
            session,
            &mut mechanism,
            template.as_mut_ptr(),
            template.len() as CK_ULONG,
            &mut key
        )
    );
    key
}

/// CPU time this process has used (all threads, user and system): key
/// creation on a shared machine waits on other writers' disk traffic, which
/// wall time counts and CPU time does not.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data, and getrusage fills the one it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// CPU time the calling thread has used: the application's calls alone,
/// without the provider's background threads, and without the time a busy
/// machine keeps it waiting for a core.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: timespec is plain data, and clock_gettime fills the one given.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

fn resident_kib() -> f64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Median over `RUNS` children of each target, interleaved.
fn figures(tokens: &Tokens, op: &str, name: &str) -> (f64, f64) {
    figures_of(tokens, op, &[name])[0]
}

/// [`figures`] of several figures each child reports, from the same runs.
fn figures_of(tokens: &Tokens, op: &str, names: &[&str]) -> Vec<(f64, f64)> {
    let mut direct = vec![Vec::new(); names.len()];
    let mut group = vec![Vec::new(); names.len()];
    for _ in 0..RUNS {
        for (target, runs) in [(Target::Direct, &mut direct), (Target::Group, &mut group)] {
            let reported = tokens.child(target, op);
            for (name, run) in names.iter().zip(runs.iter_mut()) {
                let value = reported
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("child {op} reported no {name}"))
                    .1;
                run.push(value);
            }
        }
    }
    direct
        .into_iter()
        .zip(group)
        .map(|(d, g)| (median(d), median(g)))
        .collect()
}

fn table(counts: &[usize]) {
    println!();
    println!(
        "object scale: two-member group / SoftHSM direct, median of {RUNS} fresh processes each"
    );
    println!(
        "{:>7}  {:>26}  {:>26}  {:>24}  {:>26}  {:>10}",
        "objects",
        "init+login s (ratio)",
        "enumerate s (ratio)",
        "first use ms/key (ratio)",
        "create keys/s (ratio)",
        "KiB/1000"
    );
    let mut cpu_rows = Vec::new();
    for &n in counts {
        let tokens = Tokens::prepare(n);
        let (init_d, init_g) = figures(&tokens, "init", "seconds");
        let enumerated = figures_of(&tokens, "enumerate", &["seconds", "cpu_seconds"]);
        let ((en_d, en_g), (en_cpu_d, en_cpu_g)) = (enumerated[0], enumerated[1]);
        let (fu_d, fu_g) = figures(&tokens, "first_use", "seconds_per_key");
        let created = figures_of(
            &tokens,
            "create",
            &["keys_per_second", "cpu_keys_per_second"],
        );
        let ((cr_d, cr_g), (cpu_d, cpu_g)) = (created[0], created[1]);
        cpu_rows.push(format!(
            "{n:>7}  enumerate {:.1} / {:.1} ms ({:.2}x), create {cpu_d:.0} / {cpu_g:.0} keys/s ({:.2}x)",
            en_cpu_d * 1e3,
            en_cpu_g * 1e3,
            en_cpu_g / en_cpu_d,
            cpu_g / cpu_d
        ));
        let memory = tokens.figure(Target::Group, "enumerate", "kib_per_1000");
        println!(
            "{n:>7}  {:>26}  {:>26}  {:>24}  {:>26}  {memory:>10.0}",
            format!("{init_d:.3} / {init_g:.3} ({:.2}x)", init_g / init_d),
            format!("{en_d:.3} / {en_g:.3} ({:.2}x)", en_g / en_d),
            format!(
                "{:.3} / {:.3} ({:.2}x)",
                fu_d * 1e3,
                fu_g * 1e3,
                fu_g / fu_d
            ),
            format!("{cr_d:.0} / {cr_g:.0} ({:.2}x)", cr_g / cr_d),
        );
    }
    println!(
        "CPU time (steadier than wall time on a busy machine): the application thread's for \
         the enumeration, the process's per key created:"
    );
    for row in cpu_rows {
        println!("{row}");
    }
}

fn main() {
    if let Ok(spec) = env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let args: Vec<String> = env::args().collect();
    let test_mode = args.iter().any(|a| a == "--test");
    let table_only = args.iter().any(|a| a == "table");
    let chosen: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let counts: &[usize] = if test_mode {
        &[100]
    } else if !chosen.is_empty() {
        &chosen
    } else {
        &[100, 1_000, 10_000]
    };
    if !table_only {
        let mut criterion = Criterion::default()
            .configure_from_args()
            .sample_size(10)
            .measurement_time(Duration::from_secs(20));
        for &n in counts {
            let tokens = Tokens::prepare(n);
            let mut group = criterion.benchmark_group(format!("object_scale/{n}"));
            for target in [Target::Direct, Target::Group] {
                for op in ["init", "enumerate"] {
                    group.bench_function(format!("{op}/{}", target.name()), |b| {
                        b.iter_custom(|iterations| {
                            (0..iterations)
                                .map(|_| {
                                    Duration::from_secs_f64(tokens.figure(target, op, "seconds"))
                                })
                                .sum()
                        })
                    });
                }
            }
            group.finish();
        }
    }
    table(counts);
}
