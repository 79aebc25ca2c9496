//! What a group of two in-process members costs per call, against SoftHSM
//! directly and against p11-kit's proxy (no HA), in one process and one
//! run: ECDSA P-256 sign, AES-256-GCM of 1 KiB, SHA-256 of 1 KiB and 32
//! random bytes on a **two-member** group (a group of one takes short
//! cuts), and opening and closing a session on a one- and a two-member
//! virtual slot.
//!
//! Tokens `a` and `b` form group `two` (virtual slot 0), token `c` group
//! `one` (slot 1); SoftHSM is driven directly on token `a`, and through
//! `p11-kit-proxy.so`, which loads the same SoftHSM instance (same file,
//! same `dlopen` handle) from its module file. Targets: the two-member
//! group >= 0.95 x direct on the four operations; opening and closing a
//! session on a virtual slot at least the proxy's ratio.
//!
//! Each operation runs on every target in slices that alternate, the order
//! rotating every cycle; ops/s over all slices, p50 and p99 over every
//! call's own time, ratios from the same run. Each operation's table also
//! gives the ratio of p50s: a machine busy with other work moves the ops/s
//! ratio by 10% and more from run to run, the p50 ratio by about 1%.
//! A second table runs SHA-256, random and open+close from 8 and 32
//! threads, each on a session of its own, on the group and on SoftHSM
//! directly: what shared counters and locks cost when calls overlap.
//!
//! Owns: a throw-away token dir and config (temp dir) and the process
//! environment (`SOFTHSM2_CONF`, `PKCS11_HA_CONF`). Must never: touch the
//! system's tokens.
//!
//! Run: `cargo build --release && cargo bench --bench two_members` (about
//! a minute). `-- --test` runs each benchmark once, the table briefly.
//! Instructions per call, which a busy machine does not move:
//! `PKCS11_HA_BENCH_LOOP=sha256_1k/two/1000 valgrind --tool=callgrind
//! --toggle-collect='*counted_calls*' target/release/deps/two_members-*`
//! (targets `direct`, `two`, `proxy`, `one`), total `Ir` / 1000. SoftHSM's
//! own count moves by up to 90 a call from run to run, and the chooser
//! acts on latencies measured under valgrind (a member may be degraded):
//! to compare builds, read pkcs11-ha's share per object
//! (`callgrind_annotate`) and check which choice path the runs took.

// Only some of the shared helpers are used here.
#[allow(dead_code)]
#[macro_use]
mod support;
#[path = "../tests/common/mod.rs"]
mod common;

use common::{SoftHsm, SOFTHSM_LIB, USER_PIN};
use criterion::{black_box, Criterion};
use cryptoki_sys::*;
use libloading::Library;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use std::{env, ptr};
use support::attr;

const DATA_LEN: usize = 1024;
const EC_ID: &[u8] = b"two-ec";
const AES_ID: &[u8] = b"two-aes";
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const TARGET_RATIO: f64 = 0.95;
const SLICE: Duration = Duration::from_millis(20);
const PER_TARGET: Duration = Duration::from_millis(1500);
const TEST_PER_TARGET: Duration = Duration::from_millis(60);
/// Application threads of the many-thread table, each on a session of its
/// own; a slice of that table, and the time per target.
const THREADS: [usize; 2] = [8, 32];
const THREAD_SLICE: Duration = Duration::from_millis(250);
const THREAD_PER_TARGET: Duration = Duration::from_millis(1500);
/// Runs one operation on one target only (see [`counted_run`]).
const LOOP_ENV: &str = "PKCS11_HA_BENCH_LOOP";

/// One way of reaching token `a` (or a group's slot): a function table, a
/// logged-in session, the keys as it sees them, and the slot.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    fns: CK_FUNCTION_LIST,
    slot: CK_SLOT_ID,
    session: CK_SESSION_HANDLE,
    ec_key: CK_OBJECT_HANDLE,
    aes_key: CK_OBJECT_HANDLE,
}

struct Bench {
    ha_fns: CK_FUNCTION_LIST,
    proxy_fns: CK_FUNCTION_LIST,
    /// direct, two, proxy, one.
    targets: Vec<Target>,
    _ha_lib: Library,
    _softhsm_lib: Library,
    _proxy_lib: Library,
    _hsm: SoftHsm,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for fns in [self.proxy_fns, self.ha_fns] {
            let rv = ck_raw!(fns, C_Finalize(ptr::null_mut()));
            if rv != CKR_OK && rv != CKR_CRYPTOKI_NOT_INITIALIZED {
                eprintln!("C_Finalize returned {rv:#x}");
            }
        }
    }
}

fn slot_with_label(fns: &CK_FUNCTION_LIST, label: &str) -> CK_SLOT_ID {
    let mut count = 0;
    ck!(fns, C_GetSlotList(CK_TRUE, ptr::null_mut(), &mut count));
    let mut slots = vec![0; count as usize];
    ck!(fns, C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut count));
    slots
        .into_iter()
        .find(|&slot| {
            // SAFETY: CK_TOKEN_INFO is plain data.
            let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
            ck_raw!(fns, C_GetTokenInfo(slot, &mut info)) == CKR_OK
                && String::from_utf8_lossy(&info.label).trim_end() == label
        })
        .unwrap_or_else(|| panic!("no slot shows token {label:?}"))
}

fn find_key(t: &Target, class: CK_OBJECT_CLASS, id: &[u8]) -> CK_OBJECT_HANDLE {
    let mut template = [attr(CKA_CLASS, &class), attr(CKA_ID, id)];
    let mut found = [0; 2];
    let mut count = 0;
    ck!(
        t.fns,
        C_FindObjectsInit(t.session, template.as_mut_ptr(), 2)
    );
    ck!(
        t.fns,
        C_FindObjects(t.session, found.as_mut_ptr(), 2, &mut count)
    );
    ck!(t.fns, C_FindObjectsFinal(t.session));
    assert_eq!(count, 1, "{}: keys with CKA_ID {id:?}", t.name);
    found[0]
}

/// The EC P-256 pair and the AES-256 key, made through the two-member
/// group (which replicates them to both members).
fn generate_keys(t: &Target) {
    let yes: CK_BBOOL = CK_TRUE;
    let (public_class, private_class, secret_class) =
        (CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKO_SECRET_KEY);
    let (ec_type, aes_type) = (CKK_EC, CKK_AES);
    let value_len: CK_ULONG = 32;
    let mut public = [
        attr(CKA_CLASS, &public_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_VERIFY, &yes),
        attr(CKA_EC_PARAMS, P256_OID),
        attr(CKA_ID, EC_ID),
    ];
    let mut private = [
        attr(CKA_CLASS, &private_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_PRIVATE, &yes),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_SIGN, &yes),
        attr(CKA_ID, EC_ID),
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let (mut public_key, mut private_key) = (0, 0);
    ck!(
        t.fns,
        C_GenerateKeyPair(
            t.session,
            &mut mechanism,
            public.as_mut_ptr(),
            public.len() as CK_ULONG,
            private.as_mut_ptr(),
            private.len() as CK_ULONG,
            &mut public_key,
            &mut private_key
        )
    );
    let mut secret = [
        attr(CKA_CLASS, &secret_class),
        attr(CKA_KEY_TYPE, &aes_type),
        attr(CKA_VALUE_LEN, &value_len),
        attr(CKA_TOKEN, &yes),
        attr(CKA_PRIVATE, &yes),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_ENCRYPT, &yes),
        attr(CKA_ID, AES_ID),
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut key = 0;
    ck!(
        t.fns,
        C_GenerateKey(
            t.session,
            &mut mechanism,
            secret.as_mut_ptr(),
            secret.len() as CK_ULONG,
            &mut key
        )
    );
}

impl Bench {
    fn start() -> Bench {
        let hsm = SoftHsm::new(&["a", "b", "c"]);
        common::provision_domain(&hsm, &common::DOMAIN_VALUE);
        let serial = |label: &str| hsm.token(label).serial.clone();
        let config = common::write_config(
            hsm.dir.path(),
            &[(common::SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[
                common::GroupSpec::new("two", &[serial("a"), serial("b")]),
                common::GroupSpec::new("one", &[serial("c")]),
            ],
            false,
        );
        // Single-threaded here: nothing else reads the environment yet.
        hsm.activate();
        common::activate_config(&config);
        let (ha_lib, ha_fns) = support::load(&support::ha_library_path());
        assert_eq!(
            support::initialize(&ha_fns),
            CKR_OK,
            "C_Initialize of pkcs11-ha"
        );
        let (softhsm_lib, softhsm_fns) = support::load(Path::new(SOFTHSM_LIB));
        assert_eq!(
            support::initialize(&softhsm_fns),
            CKR_CRYPTOKI_ALREADY_INITIALIZED,
            "SoftHSM should be the instance pkcs11-ha initialised"
        );
        let proxy = common::multiarch_dir().join("p11-kit-proxy.so");
        let (proxy_lib, proxy_fns) = support::load(&proxy);
        assert_eq!(
            support::initialize(&proxy_fns),
            CKR_OK,
            "C_Initialize of the proxy"
        );

        let target = |name, fns: CK_FUNCTION_LIST, slot| Target {
            name,
            fns,
            slot,
            session: support::user_session(&fns, slot, USER_PIN),
            ec_key: 0,
            aes_key: 0,
        };
        let two = target("two", ha_fns, 0);
        generate_keys(&two);
        let direct_slot = hsm.token("a").slot_id as CK_SLOT_ID;
        let proxy_slot = slot_with_label(&proxy_fns, "a");
        let mut targets = vec![
            target("direct", softhsm_fns, direct_slot),
            two,
            target("proxy", proxy_fns, proxy_slot),
            target("one", ha_fns, 1),
        ];
        for t in &mut targets {
            if t.name != "one" {
                t.ec_key = find_key(t, CKO_PRIVATE_KEY, EC_ID);
                t.aes_key = find_key(t, CKO_SECRET_KEY, AES_ID);
            }
        }
        Bench {
            ha_fns,
            proxy_fns,
            targets,
            _ha_lib: ha_lib,
            _softhsm_lib: softhsm_lib,
            _proxy_lib: proxy_lib,
            _hsm: hsm,
        }
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

struct Buffers {
    digest: [u8; 32],
    data: Vec<u8>,
    iv: [u8; 12],
    out: Vec<u8>,
}

fn sign(t: &Target, b: &mut Buffers) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_SignInit(t.session, &mut mechanism, t.ec_key));
    ck!(
        t.fns,
        C_Sign(
            t.session,
            b.digest.as_mut_ptr(),
            32,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    black_box(&b.out);
}

fn encrypt(t: &Target, b: &mut Buffers) {
    let mut params = CK_GCM_PARAMS {
        pIv: b.iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: ptr::null_mut(),
        ulAADLen: 0,
        ulTagBits: 128,
    };
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: &mut params as *mut CK_GCM_PARAMS as *mut c_void,
        ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_EncryptInit(t.session, &mut mechanism, t.aes_key));
    ck!(
        t.fns,
        C_Encrypt(
            t.session,
            b.data.as_mut_ptr(),
            DATA_LEN as CK_ULONG,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    black_box(&b.out);
}

fn digest(t: &Target, b: &mut Buffers) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut len = b.out.len() as CK_ULONG;
    ck!(t.fns, C_DigestInit(t.session, &mut mechanism));
    ck!(
        t.fns,
        C_Digest(
            t.session,
            b.data.as_mut_ptr(),
            DATA_LEN as CK_ULONG,
            b.out.as_mut_ptr(),
            &mut len
        )
    );
    black_box(&b.out);
}

fn random(t: &Target, b: &mut Buffers) {
    ck!(t.fns, C_GenerateRandom(t.session, b.out.as_mut_ptr(), 32));
    black_box(&b.out);
}

fn open_close(t: &Target, _: &mut Buffers) {
    let mut session = 0;
    ck!(
        t.fns,
        C_OpenSession(
            t.slot,
            CKF_SERIAL_SESSION,
            ptr::null_mut(),
            None,
            &mut session
        )
    );
    ck!(t.fns, C_CloseSession(session));
}

type Op = fn(&Target, &mut Buffers);

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Sample {
    calls: u64,
    elapsed: Duration,
    times: Vec<Duration>,
}

impl Sample {
    fn ops_per_s(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&mut self, p: f64) -> f64 {
        self.times.sort_unstable();
        let i = ((self.times.len() as f64 * p) as usize).min(self.times.len().saturating_sub(1));
        self.times.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }
}

/// `op` on each of `targets` for about `per_target`, in slices of
/// [`SLICE`] that alternate, the order rotating every cycle.
fn measure(op: Op, targets: &[&Target], b: &mut Buffers, per_target: Duration) -> Vec<Sample> {
    let mut samples: Vec<Sample> = targets.iter().map(|_| Sample::default()).collect();
    let cycles = (per_target.as_nanos() / SLICE.as_nanos()).max(1) as usize;
    for cycle in 0..cycles {
        for i in 0..targets.len() {
            let k = (i + cycle) % targets.len();
            let end = Instant::now() + SLICE;
            let started = Instant::now();
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                op(targets[k], b);
                samples[k].times.push(began.elapsed());
                samples[k].calls += 1;
            }
            samples[k].elapsed += started.elapsed();
        }
    }
    samples
}

fn table(bench: &Bench, per_target: Duration, test_mode: bool) -> String {
    let mut b = Buffers {
        digest: [0x5a; 32],
        data: (0..DATA_LEN).map(|i| i as u8).collect(),
        iv: [7; 12],
        out: vec![0; DATA_LEN + 64],
    };
    let judge = |ratio: f64, target: f64| match (test_mode, ratio >= target) {
        (true, _) => "(test mode: not judged)".to_string(),
        (false, true) => "met".to_string(),
        (false, false) => format!("MISSED (target {target:.3})"),
    };
    let mut out = String::new();
    writeln!(
        out,
        "\nOne thread; ops/s over {per_target:?} per target in {SLICE:?} slices; p50/p99 in us; \
         ratio = target ops/s / direct ops/s, same run (judged); p50 ratio = direct p50 / target \
         p50, which a loaded machine moves far less"
    )
    .unwrap();
    let [direct, two, proxy, one] = &bench.targets[..] else {
        unreachable!("four targets")
    };
    let operations: [(&str, Op); 4] = [
        ("ecdsa_p256_sign", sign),
        ("aes256_gcm_1k", encrypt),
        ("sha256_1k", digest),
        ("random_32", random),
    ];
    for (name, op) in operations {
        let targets = [direct, two, proxy];
        let mut samples = measure(op, &targets, &mut b, per_target);
        let base = samples[0].ops_per_s();
        let base_p50 = samples[0].percentile_us(0.5);
        for (t, s) in targets.iter().zip(samples.iter_mut()) {
            let ratio = s.ops_per_s() / base;
            let verdict = if t.name == "two" {
                judge(ratio, TARGET_RATIO)
            } else {
                String::new()
            };
            let p50 = s.percentile_us(0.5);
            writeln!(
                out,
                "{name:<16} {:<7} {:>9.0} ops/s  p50 {p50:>7.2}  p99 {:>7.2}  p50 ratio {:.3}  ratio {ratio:.3} {verdict}",
                t.name,
                s.ops_per_s(),
                s.percentile_us(0.99),
                base_p50 / p50
            )
            .unwrap();
        }
    }
    let targets = [direct, one, two, proxy];
    let mut samples = measure(open_close, &targets, &mut b, per_target);
    let base = samples[0].ops_per_s();
    let proxy_ratio = samples[3].ops_per_s() / base;
    for (t, s) in targets.iter().zip(samples.iter_mut()) {
        let ratio = s.ops_per_s() / base;
        let verdict = if t.name == "one" || t.name == "two" {
            judge(ratio, proxy_ratio)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:<16} {:<7} {:>9.0} ops/s  p50 {:>7.2}  p99 {:>7.2}  ratio {ratio:.3} {verdict}",
            "open_close",
            t.name,
            s.ops_per_s(),
            s.percentile_us(0.5),
            s.percentile_us(0.99)
        )
        .unwrap();
    }
    out
}

/// CPU time (user + system) of the whole process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// What one target's slices of the many-thread table added up to.
#[derive(Default, Clone, Copy)]
struct Threaded {
    calls: u64,
    elapsed: Duration,
    cpu: Duration,
}

/// `op` from `threads` threads, each on a session of its own (opened
/// before the clock starts), on `target` for `slice`: the calls made, the
/// time they took and the process's CPU time meanwhile.
fn threaded_slice(op: Op, target: &Target, threads: usize, slice: Duration) -> Threaded {
    let start = std::sync::Barrier::new(threads + 1);
    let calls = std::sync::atomic::AtomicU64::new(0);
    let (began, cpu) = std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut own = *target;
                ck!(
                    own.fns,
                    C_OpenSession(
                        own.slot,
                        CKF_SERIAL_SESSION,
                        ptr::null_mut(),
                        None,
                        &mut own.session
                    )
                );
                let mut b = Buffers {
                    digest: [0x5a; 32],
                    data: vec![1; DATA_LEN],
                    iv: [7; 12],
                    out: vec![0; DATA_LEN + 64],
                };
                start.wait();
                let end = Instant::now() + slice;
                let mut made = 0;
                while Instant::now() < end {
                    op(&own, &mut b);
                    made += 1;
                }
                calls.fetch_add(made, std::sync::atomic::Ordering::Relaxed);
                ck!(own.fns, C_CloseSession(own.session));
            });
        }
        start.wait();
        (Instant::now(), process_cpu())
    });
    Threaded {
        calls: calls.into_inner(),
        elapsed: began.elapsed(),
        cpu: process_cpu() - cpu,
    }
}

/// The many-thread table: SHA-256, random and open+close from each of
/// [`THREADS`] threads on the two-member group against SoftHSM directly,
/// the targets alternating in slices of [`THREAD_SLICE`].
fn threaded_table(bench: &Bench, per_target: Duration, slice: Duration) -> String {
    let mut out = String::new();
    writeln!(
        out,
        "\nT threads, a session each; ops/s over {per_target:?} per target in {slice:?} slices \
         (a slice includes the threads' last calls and their session close); CPU = the process's \
         user + system time per call, which other processes' load moves less; ratio = two / direct \
         ops/s, CPU ratio = direct CPU / two CPU"
    )
    .unwrap();
    let [direct, two, ..] = &bench.targets[..] else {
        unreachable!("four targets")
    };
    let operations: [(&str, Op); 3] = [
        ("sha256_1k", digest),
        ("random_32", random),
        ("open_close", open_close),
    ];
    for threads in THREADS {
        for (name, op) in operations {
            let targets = [direct, two];
            let mut totals = [Threaded::default(); 2];
            let cycles = (per_target.as_nanos() / slice.as_nanos()).max(1) as usize;
            for cycle in 0..cycles {
                for i in 0..targets.len() {
                    let k = (i + cycle) % targets.len();
                    let slice = threaded_slice(op, targets[k], threads, slice);
                    totals[k].calls += slice.calls;
                    totals[k].elapsed += slice.elapsed;
                    totals[k].cpu += slice.cpu;
                }
            }
            let rate = |t: Threaded| t.calls as f64 / t.elapsed.as_secs_f64();
            let cpu_us = |t: Threaded| t.cpu.as_secs_f64() * 1e6 / t.calls.max(1) as f64;
            writeln!(
                out,
                "{name:<16} T={threads:<3} direct {:>9.0} ops/s {:>6.3} us CPU  two {:>9.0} ops/s {:>6.3} us CPU  \
                 ratio {:.3}  CPU ratio {:.3}",
                rate(totals[0]),
                cpu_us(totals[0]),
                rate(totals[1]),
                cpu_us(totals[1]),
                rate(totals[1]) / rate(totals[0]),
                cpu_us(totals[0]) / cpu_us(totals[1])
            )
            .unwrap();
        }
    }
    out
}

/// `count` calls of `op` on `target`, nothing else: the function
/// `--toggle-collect` names to count a call's instructions with callgrind.
#[inline(never)]
fn counted_calls(op: Op, target: &Target, b: &mut Buffers, count: u64) {
    for _ in 0..count {
        op(target, b);
    }
}

/// With `LOOP_ENV` = `OPERATION/TARGET/COUNT` (`sha256_1k/two/1000`), the
/// bench makes its tokens, runs that many calls in [`counted_calls`] and
/// ends, for `valgrind --tool=callgrind --toggle-collect='*counted_calls*'`.
fn counted_run(bench: &Bench, spec: &str) {
    let parts: Vec<&str> = spec.split('/').collect();
    let [operation, target, count] = parts[..] else {
        panic!("{LOOP_ENV}={spec:?}: expected OPERATION/TARGET/COUNT");
    };
    let op: Op = match operation {
        "ecdsa_p256_sign" => sign,
        "aes256_gcm_1k" => encrypt,
        "sha256_1k" => digest,
        "random_32" => random,
        "open_close" => open_close,
        _ => panic!("{LOOP_ENV}: no operation {operation:?}"),
    };
    let target = bench
        .targets
        .iter()
        .find(|t| t.name == target)
        .unwrap_or_else(|| panic!("{LOOP_ENV}: no target {target:?}"));
    let count = count
        .parse()
        .unwrap_or_else(|_| panic!("{LOOP_ENV}: count {count:?} is not a number"));
    let mut b = Buffers {
        digest: [0x5a; 32],
        data: vec![1; DATA_LEN],
        iv: [7; 12],
        out: vec![0; DATA_LEN + 64],
    };
    // The first calls set up what later calls reuse (member sessions,
    // lookups); counted calls are the steady state.
    for _ in 0..10 {
        op(target, &mut b);
    }
    counted_calls(op, target, &mut b, count);
}

fn main() {
    let args: Vec<String> = env::args().collect();
    let test_mode = args.iter().any(|a| a == "--test");
    let list_mode = args.iter().any(|a| a == "--list");
    let bench = Bench::start();
    if let Some(spec) = env::var_os(LOOP_ENV) {
        counted_run(&bench, &spec.to_string_lossy());
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .configure_from_args();
    let mut b = Buffers {
        digest: [0x5a; 32],
        data: vec![1; DATA_LEN],
        iv: [7; 12],
        out: vec![0; DATA_LEN + 64],
    };
    for (name, op) in [("sha256_1k", digest as Op), ("open_close", open_close)] {
        let mut group = c.benchmark_group(name);
        for t in &bench.targets[..3] {
            group.bench_function(t.name, |bencher| bencher.iter(|| op(t, &mut b)));
        }
        group.finish();
    }
    c.final_summary();
    if !list_mode {
        let time = if test_mode {
            TEST_PER_TARGET
        } else {
            PER_TARGET
        };
        print!("{}", table(&bench, time, test_mode));
        let (per_target, slice) = if test_mode {
            (TEST_PER_TARGET, TEST_PER_TARGET)
        } else {
            (THREAD_PER_TARGET, THREAD_SLICE)
        };
        print!("{}", threaded_table(&bench, per_target, slice));
    }
}
