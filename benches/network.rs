//! Network members at full speed: pkcs11-ha over SoftHSM tokens each
//! exported by `p11-kit server` and reached through p11-kit's client and
//! the in-repo fault relay (tests/common/relay.rs, shared with the chaos
//! suite), against one such member reached directly through a client
//! instance of its own -- all in one process and one run, so that every
//! ratio compares figures taken minutes apart at most.
//!
//! Six tokens, six servers, six relays: group `net-2` (virtual slot 0) over
//! members 0 and 1, group `net-3` (slot 1) over members 2, 3 and 4 (2 is
//! its primary), and member 5 driven directly.
//!
//! - **Latency-bound** (every relay holds each chunk 1 ms each way):
//!   `C_GenerateRandom(32)` from T = 1, 8, 32 threads, a session each;
//!   target: each group >= 0.9 x the direct member at the same T.
//! - **An operation, latency-bound**: a 1 KiB SHA-256 (`C_DigestInit` +
//!   `C_Digest`) from T = 1, 8, 32 threads, same target: operations spread
//!   over the client's instances (`[LibraryInstances]`).
//! - **Mixed, latency-bound**: random, a 1 KiB SHA-256 and a search (six
//!   member calls) from T = 1, 8, 32 threads, same target: searches run on
//!   spare instances too, of whichever member is expected to finish first.
//! - **Limited capacity** (each relay serves a connection one request at a
//!   time, 1 ms each): T = 8 and 32; target: a group of N >= 0.9 x N x the
//!   direct member.
//! - **One slow member**: relays back to 1 ms, member 2 (net-3's primary)
//!   at 200 ms each way; a mixed operation (random, a 1 KiB SHA-256, a
//!   search: six member calls) from 8 threads on net-3, once the HA log
//!   says the slow member is degraded (how long that took under this load
//!   is reported, and net-3's figures meanwhile, the slow member still in
//!   rotation; if it is not within 30 s, the table is taken anyway and
//!   says so), against net-2 (the two healthy members alone); target:
//!   >= 0.9.
//!
//! Each table runs its targets in slices that alternate, the order
//! rotating every cycle, after one unmeasured cycle at each T; ops/s is
//! over all slices, p50 and p99 over every operation's own time.
//!
//! Owns: the token dirs, servers and relays (temp dirs), and the
//! process-global env (`PKCS11_HA_CONF`, `P11_KIT_SERVER_ADDRESS` while
//! the direct instance is made). Must never: touch the system's tokens.
//!
//! Run: `cargo build --release && cargo bench --bench network` (about a
//! minute). `-- --test` runs each benchmark once and the tables briefly.
//! `PKCS11_HA_NETWORK_TABLES=mixed,slow` takes only the tables named
//! (`random`, `digest`, `mixed`, `capacity`, `slow`), for a short run on a
//! shared machine.

// Only some of the shared helpers are used here.
#[allow(dead_code)]
#[macro_use]
mod support;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/p11kit.rs"]
mod p11kit;
#[path = "../tests/common/relay.rs"]
mod relay;

use common::{SoftHsm, SOFTHSM_LIB};
use criterion::{black_box, Criterion};
use cryptoki_sys::*;
use libloading::Library;
use p11kit::P11KitServer;
use relay::{Mode, Relay};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};
use std::{env, fs, ptr, thread};

const MEMBERS: usize = 6;
const DIRECT: usize = 5;
/// The slow member of the third table: net-3's primary.
const SLOW: usize = 2;
const ONE_WAY: Duration = Duration::from_millis(1);
const SLOW_ONE_WAY: Duration = Duration::from_millis(200);
const SERVICE: Duration = Duration::from_millis(1);
const LATENCY_THREADS: [usize; 3] = [1, 8, 32];
const CAPACITY_THREADS: [usize; 2] = [8, 32];
const DIGEST_THREADS: [usize; 3] = [1, 8, 32];
const MIXED_THREADS: [usize; 3] = [1, 8, 32];
const SLOW_THREADS: usize = 8;
const MAX_THREADS: usize = 32;
const TARGET_RATIO: f64 = 0.9;
const SLICE: Duration = Duration::from_millis(400);
const CYCLES: usize = 2;
const SLOW_SLICE: Duration = Duration::from_millis(1500);
const TEST_SLICE: Duration = Duration::from_millis(30);
/// How long the slow member may take to be taken out as degraded.
const DEGRADE_PATIENCE: Duration = Duration::from_secs(30);
const DATA_LEN: usize = 1024;
/// Client instances per member (`[LibraryInstances]`).
const INSTANCES: usize = 16;
/// The tables to take, by name, comma-separated; all when unset.
const TABLES_ENV: &str = "PKCS11_HA_NETWORK_TABLES";

/// Whether the table `name` is to be taken ([`TABLES_ENV`]).
fn wanted(name: &str) -> bool {
    env::var(TABLES_ENV).map_or(true, |tables| tables.split(',').any(|t| t.trim() == name))
}

/// One member: token, server and relay. Fields drop in order: the relay's
/// connections close before the server dies, the token dir goes last.
struct Member {
    relay: Relay,
    _server: P11KitServer,
    _hsm: SoftHsm,
}

/// What runs under load: a function table and sessions on one slot.
struct Target {
    name: &'static str,
    fns: CK_FUNCTION_LIST,
    sessions: Vec<CK_SESSION_HANDLE>,
    /// Members it spreads over (1: the direct member).
    size: usize,
}

struct Bench {
    ha_fns: CK_FUNCTION_LIST,
    direct_fns: CK_FUNCTION_LIST,
    /// direct, net-2, net-3.
    targets: Vec<Target>,
    members: Vec<Member>,
    log: PathBuf,
    _ha_lib: Library,
    _client_lib: Library,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.relay.pass();
        }
        for fns in [self.direct_fns, self.ha_fns] {
            let rv = ck_raw!(fns, C_Finalize(ptr::null_mut()));
            if rv != CKR_OK {
                eprintln!("C_Finalize returned {rv:#x}");
            }
        }
    }
}

fn open_sessions(fns: &CK_FUNCTION_LIST, slot: CK_SLOT_ID) -> Vec<CK_SESSION_HANDLE> {
    (0..MAX_THREADS)
        .map(|_| {
            let mut session = 0;
            ck!(
                fns,
                C_OpenSession(
                    slot,
                    CKF_SERIAL_SESSION,
                    ptr::null_mut(),
                    None,
                    &mut session
                )
            );
            session
        })
        .collect()
}

impl Bench {
    fn start() -> Bench {
        let ha_path = support::ha_library_path();
        let client = p11kit::client_module();
        let members: Vec<Member> = (0..MEMBERS)
            .map(|i| {
                let label = format!("net{i}");
                let hsm = SoftHsm::new(&[&label]);
                common::provision_domain(&hsm, &common::DOMAIN_VALUE);
                let dir = hsm.dir.path();
                let server =
                    P11KitServer::start(SOFTHSM_LIB, &hsm.conf, &label, &dir.join("server.sock"));
                let relay = Relay::start(&dir.join("relay.sock"), &server.socket);
                Member {
                    relay,
                    _server: server,
                    _hsm: hsm,
                }
            })
            .collect();
        let serial = |i: usize| members[i]._hsm.tokens[0].serial.clone();
        let dir = members[0]._hsm.dir.path().to_path_buf();
        let log_dir = dir.join("halog");
        fs::create_dir(&log_dir).expect("HA log dir");
        let mut text = String::from("[Libraries]\n");
        for i in 0..DIRECT {
            writeln!(text, "m{i} = {client}").unwrap();
        }
        text += "\n[LibraryEnvironment]\n";
        for (i, member) in members.iter().enumerate().take(DIRECT) {
            writeln!(
                text,
                "m{i}.{} = {}",
                p11kit::ADDRESS_ENV,
                member.relay.address()
            )
            .unwrap();
        }
        // Each client one call at a time (its default), over as many
        // instances, each a connection of its own, as `[LibraryInstances]`
        // gives it (`docs/design.md`, "Concurrent calls").
        text += "\n[LibraryInstances]\n";
        for i in 0..DIRECT {
            writeln!(text, "m{i} = {INSTANCES}").unwrap();
        }
        writeln!(
            text,
            "\n[VirtualToken]\nVirtualToken00Label = net-2\nVirtualToken00Members = {},{}\n\
             VirtualToken01Label = net-3\nVirtualToken01Members = {},{},{}\n\
             \n[HAConfiguration]\nmemberTimeout = 4000\nhaLogStatus = enabled\nhaLogPath = {}",
            serial(0),
            serial(1),
            serial(2),
            serial(3),
            serial(4),
            log_dir.display()
        )
        .unwrap();
        let config = dir.join("network.conf");
        fs::write(&config, text).expect("write the config");
        common::activate_config(&config);
        let (ha_lib, ha_fns) = support::load(&ha_path);
        assert_eq!(
            support::initialize(&ha_fns),
            CKR_OK,
            "C_Initialize of pkcs11-ha"
        );

        // The direct member: a client instance of its own (p11-kit's client
        // reads its server's address in C_GetFunctionList).
        env::set_var(p11kit::ADDRESS_ENV, members[DIRECT].relay.address());
        let (client_lib, direct_fns) = support::load(std::path::Path::new(&client));
        env::remove_var(p11kit::ADDRESS_ENV);
        assert_eq!(
            support::initialize(&direct_fns),
            CKR_OK,
            "C_Initialize of the client"
        );
        let mut slot = 0;
        let mut count = 1;
        ck!(direct_fns, C_GetSlotList(CK_TRUE, &mut slot, &mut count));
        assert_eq!(count, 1, "the direct member's server exports one token");

        let targets = vec![
            Target {
                name: "direct",
                fns: direct_fns,
                sessions: open_sessions(&direct_fns, slot),
                size: 1,
            },
            Target {
                name: "net-2",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 0),
                size: 2,
            },
            Target {
                name: "net-3",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 1),
                size: 3,
            },
        ];
        Bench {
            ha_fns,
            direct_fns,
            targets,
            members,
            log: log_dir.join("haErrorLog.txt"),
            _ha_lib: ha_lib,
            _client_lib: client_lib,
        }
    }

    fn set_all(&mut self, mode: Mode) {
        for member in &mut self.members {
            member.relay.set(mode);
        }
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// `C_GenerateRandom` of 32 bytes: one member call.
fn random(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    let mut out = [0u8; 32];
    ck!(
        fns,
        C_GenerateRandom(session, out.as_mut_ptr(), out.len() as CK_ULONG)
    );
    black_box(&out);
}

/// A SHA-256 of 1 KiB: two member calls, an operation.
fn digest(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut data = [0x5au8; DATA_LEN];
    let mut digest = [0u8; 32];
    let mut len = digest.len() as CK_ULONG;
    ck!(fns, C_DigestInit(session, &mut mechanism));
    ck!(
        fns,
        C_Digest(
            session,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            digest.as_mut_ptr(),
            &mut len
        )
    );
    black_box(&digest);
}

/// Random, a 1 KiB SHA-256 and a search for data objects: six member
/// calls of three kinds, one of them a search.
fn mixed(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    random(fns, session);
    digest(fns, session);
    let class: CK_OBJECT_CLASS = CKO_DATA;
    let mut template = [support::attr(CKA_CLASS, &class)];
    let mut found = [0; 4];
    let mut count = 0;
    ck!(fns, C_FindObjectsInit(session, template.as_mut_ptr(), 1));
    ck!(
        fns,
        C_FindObjects(
            session,
            found.as_mut_ptr(),
            found.len() as CK_ULONG,
            &mut count
        )
    );
    ck!(fns, C_FindObjectsFinal(session));
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

/// Operations done and the time each took, over one or more slices.
#[derive(Default)]
struct Sample {
    ops: u64,
    elapsed: Duration,
    times: Vec<Duration>,
}

impl Sample {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.times.sort_unstable();
        let i = ((self.times.len() as f64 * p) as usize).min(self.times.len().saturating_sub(1));
        self.times.get(i).copied().unwrap_or_default()
    }
}

/// Runs `op` on `threads` of the target's sessions, one thread each, for
/// `slice`; adds what was done to `sample`.
fn run_slice(
    t: &Target,
    threads: usize,
    op: fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE),
    slice: Duration,
    sample: &mut Sample,
) {
    let start_line = Barrier::new(threads + 1);
    let (start, per_thread) = thread::scope(|scope| {
        let workers: Vec<_> = t.sessions[..threads]
            .iter()
            .map(|&session| {
                let start_line = &start_line;
                scope.spawn(move || {
                    start_line.wait();
                    let end = Instant::now() + slice;
                    let mut times = Vec::new();
                    loop {
                        let began = Instant::now();
                        if began >= end {
                            break;
                        }
                        op(&t.fns, session);
                        times.push(began.elapsed());
                    }
                    times
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let per_thread: Vec<Vec<Duration>> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        (start, per_thread)
    });
    sample.elapsed += start.elapsed();
    for times in per_thread {
        sample.ops += times.len() as u64;
        sample.times.extend(times);
    }
}

/// Measures `op` on `targets` at `threads`, in `cycles` cycles of one
/// `slice` each, the order rotating every cycle.
fn measure(
    targets: &[&Target],
    threads: usize,
    op: fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE),
    slice: Duration,
    cycles: usize,
) -> Vec<Sample> {
    let mut samples: Vec<Sample> = targets.iter().map(|_| Sample::default()).collect();
    for cycle in 0..cycles {
        for i in 0..targets.len() {
            let k = (i + cycle) % targets.len();
            run_slice(targets[k], threads, op, slice, &mut samples[k]);
        }
    }
    samples
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn verdict(ratio: f64, test_mode: bool) -> &'static str {
    match (test_mode, ratio >= TARGET_RATIO) {
        (true, _) => "(test mode: not judged)",
        (false, true) => "met",
        (false, false) => "MISSED",
    }
}

/// Latency-bound and limited-capacity tables: per T, each target's ops/s
/// of `op`, p50 and p99, and each group's ratio to `expected(size) x
/// direct`.
#[allow(clippy::too_many_arguments)]
fn throughput_table(
    out: &mut String,
    bench: &Bench,
    op: fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE),
    threads: &[usize],
    slice: Duration,
    cycles: usize,
    expected: fn(usize) -> f64,
    test_mode: bool,
) {
    writeln!(
        out,
        "{:>3} {:<7} {:>9} {:>8} {:>8} {:>7} {:>7}",
        "T", "target", "ops/s", "p50 ms", "p99 ms", "ratio", ""
    )
    .unwrap();
    let targets: Vec<&Target> = bench.targets.iter().collect();
    for &t in threads {
        // Unmeasured first: the sessions and lanes T threads need (a spare
        // instance's session, opened and logged in on first use) are made
        // before the clock runs, as in an application's steady state.
        measure(&targets, t, op, slice, 1);
        let mut samples = measure(&targets, t, op, slice, cycles);
        let direct = samples[0].ops_per_s();
        for (target, sample) in targets.iter().zip(samples.iter_mut()) {
            let ratio = sample.ops_per_s() / (expected(target.size) * direct);
            let judged = if target.size == 1 {
                ""
            } else {
                verdict(ratio, test_mode)
            };
            writeln!(
                out,
                "{t:>3} {:<7} {:>9.0} {:>8.2} {:>8.2} {:>7.3} {judged}",
                target.name,
                sample.ops_per_s(),
                ms(sample.percentile(0.5)),
                ms(sample.percentile(0.99)),
                ratio
            )
            .unwrap();
        }
    }
}

/// Waits, under load on `target`, until the HA log says a member is
/// degraded; how long that took, `None` if not within
/// [`DEGRADE_PATIENCE`], and what the load did meanwhile (the slow member
/// in rotation).
fn load_until_degraded(bench: &Bench, target: &Target) -> (Option<Duration>, Sample) {
    let started = Instant::now();
    let mut meanwhile = Sample::default();
    loop {
        let log = fs::read_to_string(&bench.log).unwrap_or_default();
        if log.contains("member degraded") {
            return (Some(started.elapsed()), meanwhile);
        }
        if started.elapsed() >= DEGRADE_PATIENCE {
            return (None, meanwhile);
        }
        run_slice(
            target,
            SLOW_THREADS,
            mixed,
            Duration::from_millis(500),
            &mut meanwhile,
        );
    }
}

fn tables(bench: &mut Bench, test_mode: bool) -> String {
    let (slice, cycles, slow_slice) = if test_mode {
        (TEST_SLICE, 1, TEST_SLICE)
    } else {
        (SLICE, CYCLES, SLOW_SLICE)
    };
    let mut out = String::new();
    if wanted("random") {
        bench.set_all(Mode::Delay(ONE_WAY));
        writeln!(
            out,
            "\nLatency-bound: {ONE_WAY:?} each way per chunk on every path; C_GenerateRandom(32); \
             ratio = group / direct at the same T (target {TARGET_RATIO})"
        )
        .unwrap();
        throughput_table(
            &mut out,
            bench,
            random,
            &LATENCY_THREADS,
            slice,
            cycles,
            |_| 1.0,
            test_mode,
        );
    }
    if wanted("digest") {
        bench.set_all(Mode::Delay(ONE_WAY));
        writeln!(
            out,
            "\nLatency-bound, an operation: {ONE_WAY:?} each way; SHA-256 of {DATA_LEN} bytes \
             (C_DigestInit + C_Digest); ratio = group / direct at the same T"
        )
        .unwrap();
        throughput_table(
            &mut out,
            bench,
            digest,
            &DIGEST_THREADS,
            slice,
            cycles,
            |_| 1.0,
            test_mode,
        );
    }
    if wanted("mixed") {
        bench.set_all(Mode::Delay(ONE_WAY));
        writeln!(
            out,
            "\nMixed, latency-bound: {ONE_WAY:?} each way; random, SHA-256 of {DATA_LEN} bytes \
             and a search; ratio = group / direct at the same T"
        )
        .unwrap();
        throughput_table(
            &mut out,
            bench,
            mixed,
            &MIXED_THREADS,
            slice,
            cycles,
            |_| 1.0,
            test_mode,
        );
    }
    if wanted("capacity") {
        writeln!(
            out,
            "\nLimited capacity: each connection served one request at a time, {SERVICE:?} each; \
             ratio = group / (N x direct) (target {TARGET_RATIO})"
        )
        .unwrap();
        bench.set_all(Mode::OneAtATime(SERVICE));
        throughput_table(
            &mut out,
            bench,
            random,
            &CAPACITY_THREADS,
            slice,
            cycles,
            |n| n as f64,
            test_mode,
        );
    }
    if wanted("slow") {
        bench.set_all(Mode::Delay(ONE_WAY));
        bench.members[SLOW].relay.set(Mode::Delay(SLOW_ONE_WAY));
        writeln!(
            out,
            "\nOne slow member: net-3's primary at {SLOW_ONE_WAY:?} each way, the others at \
             {ONE_WAY:?}; mixed operation (random, SHA-256 1 KiB, search) from {SLOW_THREADS} \
             threads; ratio = net-3 / net-2, the healthy two alone (target {TARGET_RATIO})"
        )
        .unwrap();
        print!("{out}");
        out.clear();
        let (degraded, mut meanwhile) = load_until_degraded(bench, &bench.targets[2]);
        match degraded {
            Some(after) => writeln!(out, "degraded after {after:.1?} under load").unwrap(),
            None => writeln!(
                out,
                "NOT degraded within {DEGRADE_PATIENCE:?} under load: measured in rotation"
            )
            .unwrap(),
        }
        if meanwhile.ops > 0 {
            writeln!(
                out,
                "net-3 meanwhile (slow member in rotation): {:.0} ops/s  p50 {:.2} ms  p99 {:.2} ms",
                meanwhile.ops_per_s(),
                ms(meanwhile.percentile(0.5)),
                ms(meanwhile.percentile(0.99)),
            )
            .unwrap();
        }
        let targets = [&bench.targets[1], &bench.targets[2]];
        let mut samples = measure(&targets, SLOW_THREADS, mixed, slow_slice, cycles + 1);
        let healthy = samples[0].ops_per_s();
        for (target, sample) in targets.iter().zip(samples.iter_mut()) {
            let ratio = sample.ops_per_s() / healthy;
            writeln!(
                out,
                "{:<7} {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>8.2} ms  ratio {ratio:.3} {}",
                target.name,
                sample.ops_per_s(),
                ms(sample.percentile(0.5)),
                ms(sample.percentile(0.99)),
                if target.size == 3 {
                    verdict(ratio, test_mode)
                } else {
                    ""
                }
            )
            .unwrap();
        }
    }
    bench.set_all(Mode::Pass);
    out
}

fn main() {
    let args: Vec<String> = env::args().collect();
    let test_mode = args.iter().any(|a| a == "--test");
    let list_mode = args.iter().any(|a| a == "--list");
    let mut bench = Bench::start();
    bench.set_all(Mode::Delay(ONE_WAY));
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    {
        let mut group = c.benchmark_group("random_1ms_one_thread");
        for t in &bench.targets {
            let session = t.sessions[0];
            group.bench_function(t.name, |b| b.iter(|| random(&t.fns, session)));
        }
        group.finish();
    }
    c.final_summary();
    if !list_mode {
        print!("{}", tables(&mut bench, test_mode));
    }
}
