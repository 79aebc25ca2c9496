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
//! - **Latency-bound** (every relay holds each chunk 1 ms from when it
//!   came, each way, as a network path's latency):
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
//! - **Object-making with one slow member**: as above, but each operation
//!   makes objects -- `C_GenerateKey` (an AES-256 session key, which the
//!   group makes on one member and copies to the others before it
//!   returns) or `C_CreateObject` (a data object, made on every member) --
//!   measured while the slow member is still in rotation (until the HA log
//!   says it is degraded), then net-3 against net-2 once it is. No target:
//!   every object reaches the slow member before its call returns, so its
//!   latency bounds each call either way; the table shows what choosing
//!   the member that makes a key saves.
//!
//! - **Object-making, latency-bound** (1 ms one way): `C_CreateObject` of
//!   a data session object, then of a data token object, from T = 1 and 8
//!   threads. No target: each object is made on every member before its
//!   call returns; the ratio shows what that costs against one member.
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
//! (`random`, `digest`, `mixed`, `capacity`, `slow`, `create`,
//! `making`), for a short run on a shared machine.

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

use common::faulty::FaultyMember;
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
/// In-process members of the key-making groups (SoftHSM behind the faulty
/// member's latency): `gen-2` over the first two, `gen-3` over the other
/// three, the first of those (its primary) the slow one.
const GEN_MEMBERS: usize = 5;
const GEN_SLOW: usize = 2;
const SERVICE: Duration = Duration::from_millis(1);
const LATENCY_THREADS: [usize; 3] = [1, 8, 32];
const CAPACITY_THREADS: [usize; 2] = [8, 32];
const DIGEST_THREADS: [usize; 3] = [1, 8, 32];
const MIXED_THREADS: [usize; 3] = [1, 8, 32];
const CREATE_THREADS: [usize; 2] = [1, 8];
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
    /// Read-write sessions beside them, for the ops that make token
    /// objects (the others run on read-only sessions, as they always did).
    rw_sessions: Vec<CK_SESSION_HANDLE>,
    /// Members it spreads over (1: the direct member).
    size: usize,
}

impl Target {
    /// This target with its read-write sessions where `rw`.
    fn for_op(&self, rw: bool) -> Target {
        Target {
            name: self.name,
            fns: self.fns,
            sessions: if rw {
                self.rw_sessions.clone()
            } else {
                self.sessions.clone()
            },
            rw_sessions: self.rw_sessions.clone(),
            size: self.size,
        }
    }
}

struct Bench {
    ha_fns: CK_FUNCTION_LIST,
    direct_fns: CK_FUNCTION_LIST,
    /// direct, net-2, net-3, gen-2, gen-3.
    targets: Vec<Target>,
    members: Vec<Member>,
    log: PathBuf,
    /// The key-making groups' members, to set their latency.
    gen: Vec<FaultyMember>,
    _gen_hsm: SoftHsm,
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

fn open_sessions(
    fns: &CK_FUNCTION_LIST,
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
) -> Vec<CK_SESSION_HANDLE> {
    (0..MAX_THREADS)
        .map(|_| {
            let mut session = 0;
            ck!(
                fns,
                C_OpenSession(
                    slot,
                    CKF_SERIAL_SESSION | flags,
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
        // Key-making groups: p11-kit 0.24's client carries no key-wrap
        // mechanism, so keys generated on p11-kit members cannot
        // replicate; these members are SoftHSM tokens in this process,
        // each behind a faulty member that adds the network's latency.
        let gen_labels: Vec<String> = (0..GEN_MEMBERS).map(|i| format!("gen{i}")).collect();
        let gen_labels: Vec<&str> = gen_labels.iter().map(String::as_str).collect();
        let gen_hsm = SoftHsm::new(&gen_labels);
        common::provision_domain(&gen_hsm, &common::DOMAIN_VALUE);
        let gen = FaultyMember::one_per_token(gen_hsm.dir.path(), SOFTHSM_LIB, &gen_hsm.serials());
        let gen_serials = gen_hsm.serials();
        let mut text = String::from("[Libraries]\n");
        for i in 0..DIRECT {
            writeln!(text, "m{i} = {client}").unwrap();
        }
        for (i, member) in gen.iter().enumerate() {
            writeln!(text, "g{i} = {}", member.path.display()).unwrap();
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
             VirtualToken02Label = gen-2\nVirtualToken02Members = {}\n\
             VirtualToken03Label = gen-3\nVirtualToken03Members = {}\n\
             \n[HAConfiguration]\nmemberTimeout = 4000\nhaLogStatus = enabled\nhaLogPath = {}",
            serial(0),
            serial(1),
            serial(2),
            serial(3),
            serial(4),
            gen_serials[..GEN_SLOW].join(","),
            gen_serials[GEN_SLOW..].join(","),
            log_dir.display()
        )
        .unwrap();
        env::set_var(common::SOFTHSM_CONF_ENV, &gen_hsm.conf);
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
                sessions: open_sessions(&direct_fns, slot, 0),
                rw_sessions: open_sessions(&direct_fns, slot, CKF_RW_SESSION),
                size: 1,
            },
            Target {
                name: "net-2",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 0, 0),
                rw_sessions: open_sessions(&ha_fns, 0, CKF_RW_SESSION),
                size: 2,
            },
            Target {
                name: "net-3",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 1, 0),
                rw_sessions: open_sessions(&ha_fns, 1, CKF_RW_SESSION),
                size: 3,
            },
            Target {
                name: "gen-2",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 2, 0),
                rw_sessions: open_sessions(&ha_fns, 2, CKF_RW_SESSION),
                size: 2,
            },
            Target {
                name: "gen-3",
                fns: ha_fns,
                sessions: open_sessions(&ha_fns, 3, 0),
                rw_sessions: open_sessions(&ha_fns, 3, CKF_RW_SESSION),
                size: 3,
            },
        ];
        Bench {
            ha_fns,
            direct_fns,
            targets,
            members,
            log: log_dir.join("haErrorLog.txt"),
            gen,
            _gen_hsm: gen_hsm,
            _ha_lib: ha_lib,
            _client_lib: client_lib,
        }
    }

    fn set_all(&mut self, mode: Mode) {
        for member in &mut self.members {
            member.relay.set(mode);
        }
        let latency = match mode {
            Mode::Delay(one_way) => 2 * one_way,
            _ => Duration::ZERO,
        };
        for member in &self.gen {
            member.set_latency(latency);
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

/// `C_GenerateKey` of an AES-256 session key: made on one member, copied
/// to the others (wrapped under the domain key) before the call returns.
/// Kept until the session closes: a destroy would time every member too.
fn generate(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let len: CK_ULONG = 32;
    let yes: CK_BBOOL = CK_TRUE;
    let mut template = [
        support::attr(CKA_VALUE_LEN, &len),
        support::attr(CKA_ENCRYPT, &yes),
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
    black_box(key);
}

/// `C_CreateObject` of a small data session object: made on every member.
fn create(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    create_data(fns, session, CK_FALSE);
}

/// `C_CreateObject` of a small data token object: made on every member,
/// each a file SoftHSM writes (and, on a SoftHSM member, preceded by a read
/// of an object made before: `MemberLibrary::call_writing`). Kept: the
/// tokens grow by the objects one table makes.
fn create_token(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    create_data(fns, session, CK_TRUE);
}

/// `C_CreateObject` of a small data object, on the token or not.
fn create_data(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, token: CK_BBOOL) {
    let class: CK_OBJECT_CLASS = CKO_DATA;
    let value = [0x5au8; 32];
    let mut template = [
        support::attr(CKA_CLASS, &class),
        support::attr(CKA_TOKEN, &token),
        support::attr(CKA_VALUE, &value),
    ];
    let mut object = 0;
    ck!(
        fns,
        C_CreateObject(
            session,
            template.as_mut_ptr(),
            template.len() as CK_ULONG,
            &mut object
        )
    );
    black_box(object);
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

/// Whether a table's ratios have a target, and on which sessions the
/// untargeted ones run.
#[derive(Clone, Copy)]
enum Judge {
    Target {
        test_mode: bool,
    },
    /// Read-write sessions where `rw` (for token objects).
    Unjudged {
        rw: bool,
    },
}

/// Latency-bound, limited-capacity and object-making tables: per T, each
/// target's ops/s of `op`, p50 and p99, and each group's ratio to
/// `expected(size) x direct`.
#[allow(clippy::too_many_arguments)]
fn throughput_table(
    out: &mut String,
    bench: &Bench,
    op: fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE),
    threads: &[usize],
    slice: Duration,
    cycles: usize,
    expected: fn(usize) -> f64,
    judge: Judge,
) {
    writeln!(
        out,
        "{:>3} {:<7} {:>9} {:>8} {:>8} {:>7} {:>7}",
        "T", "target", "ops/s", "p50 ms", "p99 ms", "ratio", ""
    )
    .unwrap();
    // direct, net-2, net-3.
    let targets: Vec<Target> = bench.targets[..3]
        .iter()
        .map(|t| t.for_op(matches!(judge, Judge::Unjudged { rw: true })))
        .collect();
    let targets: Vec<&Target> = targets.iter().collect();
    for &t in threads {
        // Unmeasured first: the sessions and lanes T threads need (a spare
        // instance's session, opened and logged in on first use) are made
        // before the clock runs, as in an application's steady state.
        measure(&targets, t, op, slice, 1);
        let mut samples = measure(&targets, t, op, slice, cycles);
        let direct = samples[0].ops_per_s();
        for (target, sample) in targets.iter().zip(samples.iter_mut()) {
            let ratio = sample.ops_per_s() / (expected(target.size) * direct);
            let judged = match judge {
                _ if target.size == 1 => "",
                Judge::Target { test_mode } => verdict(ratio, test_mode),
                Judge::Unjudged { .. } => "",
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
fn load_until_degraded(
    bench: &Bench,
    target: &Target,
    op: fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE),
) -> (Option<Duration>, Sample) {
    let started = Instant::now();
    let mut meanwhile = Sample::default();
    let before = log_count(bench, DEGRADED_LINE, target.name);
    loop {
        if log_count(bench, DEGRADED_LINE, target.name) > before {
            return (Some(started.elapsed()), meanwhile);
        }
        if started.elapsed() >= DEGRADE_PATIENCE {
            return (None, meanwhile);
        }
        run_slice(
            target,
            SLOW_THREADS,
            op,
            Duration::from_millis(500),
            &mut meanwhile,
        );
    }
}

/// What the HA log says when a member is taken out of rotation, and when
/// it returns.
const DEGRADED_LINE: &str = "member degraded";
const RECOVERED_LINE: &str = "member no longer degraded";

/// How many lines of the HA log about group `group` contain `what`.
fn log_count(bench: &Bench, what: &str, group: &str) -> usize {
    let log = fs::read_to_string(&bench.log).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(what) && l.contains(group))
        .count()
}

/// Waits, every member back at full speed, until each member of `group`
/// degraded so far is back in rotation (a table after `slow` starts as it
/// would alone); false if not within [`DEGRADE_PATIENCE`].
fn wait_until_recovered(bench: &Bench, group: &str) -> bool {
    let deadline = Instant::now() + DEGRADE_PATIENCE;
    while log_count(bench, RECOVERED_LINE, group) < log_count(bench, DEGRADED_LINE, group) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Logs every target in, so that keys can be made (and wrapped under the
/// domain key) on the members, and private objects on every target.
fn log_in(bench: &Bench) {
    let pin = common::USER_PIN;
    for target in &bench.targets {
        let rv = ck_raw!(
            target.fns,
            C_Login(
                target.sessions[0],
                CKU_USER,
                pin.as_ptr() as *mut _,
                pin.len() as CK_ULONG
            )
        );
        assert!(
            rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN,
            "C_Login on {}: {rv:#x}",
            target.name
        );
    }
}

/// One line of a slow-member table: ops/s, p50, p99 and the ratio to
/// `healthy` ops/s.
fn slow_line(out: &mut String, name: &str, sample: &mut Sample, healthy: f64, judged: &str) {
    let ratio = sample.ops_per_s() / healthy;
    writeln!(
        out,
        "{name:<16} {:>9.1} ops/s  p50 {:>8.2} ms  p99 {:>8.2} ms  ratio {ratio:.3} {judged}",
        sample.ops_per_s(),
        ms(sample.percentile(0.5)),
        ms(sample.percentile(0.99)),
    )
    .unwrap();
}

/// A workload: one operation on one session.
type Op = fn(&CK_FUNCTION_LIST, CK_SESSION_HANDLE);

/// One object-making table: `ops` on `pair` and `trio` (`trio`'s slow
/// member slowed by `slow`), while the slow member is still in rotation,
/// then once the HA log says it is degraded (a mixed load on `trio` gets it
/// there: object-making is not compared), each against `pair`.
#[allow(clippy::too_many_arguments)]
fn making_rows(
    out: &mut String,
    bench: &mut Bench,
    (pair, trio): (usize, usize),
    slow: fn(&mut Bench),
    ops: &[(&str, Op, bool)],
    slice: Duration,
    cycles: usize,
) {
    bench.set_all(Mode::Delay(ONE_WAY));
    if !wait_until_recovered(bench, bench.targets[trio].name) {
        writeln!(out, "a member is still degraded: not taken").unwrap();
        return;
    }
    // Sessions, lanes and the domain keys' handles exist before the clock
    // runs.
    for (_, op, rw) in ops {
        let targets = [&bench.targets[pair], &bench.targets[trio]].map(|t| t.for_op(*rw));
        measure(
            &[&targets[0], &targets[1]],
            SLOW_THREADS,
            *op,
            TEST_SLICE,
            1,
        );
    }
    slow(bench);
    let degraded_before = log_count(bench, DEGRADED_LINE, bench.targets[trio].name);
    for (name, op, rw) in ops {
        let targets = [&bench.targets[pair], &bench.targets[trio]].map(|t| t.for_op(*rw));
        let targets = [&targets[0], &targets[1]];
        let mut samples = measure(&targets, SLOW_THREADS, *op, slice, cycles + 1);
        let healthy = samples[0].ops_per_s();
        for (target, sample) in targets.iter().zip(samples.iter_mut()) {
            let label = format!("{} {name} in rot.", target.name);
            slow_line(out, &label, sample, healthy, "");
        }
    }
    if log_count(bench, DEGRADED_LINE, bench.targets[trio].name) > degraded_before {
        writeln!(out, "(degraded while those were taken: they mix both)").unwrap();
    } else {
        let (degraded, _) = load_until_degraded(bench, &bench.targets[trio], mixed);
        match degraded {
            Some(after) => writeln!(out, "degraded after {after:.1?} of a mixed load").unwrap(),
            None => writeln!(out, "NOT degraded within {DEGRADE_PATIENCE:?}: in rotation").unwrap(),
        }
    }
    for (name, op, rw) in ops {
        let targets = [&bench.targets[pair], &bench.targets[trio]].map(|t| t.for_op(*rw));
        let targets = [&targets[0], &targets[1]];
        let mut samples = measure(&targets, SLOW_THREADS, *op, slice, cycles + 1);
        let healthy = samples[0].ops_per_s();
        for (target, sample) in targets.iter().zip(samples.iter_mut()) {
            let label = format!("{} {name} degr.", target.name);
            slow_line(out, &label, sample, healthy, "");
        }
    }
    bench.set_all(Mode::Delay(ONE_WAY));
}

/// The object-making tables ([`generate`], [`create`]): a group of three
/// whose primary is slow against the two healthy members alone.
fn making_table(out: &mut String, bench: &mut Bench, slice: Duration, cycles: usize) {
    log_in(bench);
    writeln!(
        out,
        "\nObject-making, one slow member: the primary of a group of three at \
         {SLOW_ONE_WAY:?} each way, the others at {ONE_WAY:?}; {SLOW_THREADS} threads; \
         ratio = group of three / the healthy two (no target: every object reaches the \
         slow member before its call returns)\n\
         SoftHSM members in process, latency added by the faulty member:"
    )
    .unwrap();
    making_rows(
        out,
        bench,
        (3, 4),
        |b| b.gen[GEN_SLOW].set_latency(2 * SLOW_ONE_WAY),
        &[("generate", generate, false), ("create", create, false)],
        slice,
        cycles,
    );
    writeln!(out, "p11-kit members behind the relay (imports: data session objects, then data token objects):").unwrap();
    making_rows(
        out,
        bench,
        (1, 2),
        |b| b.members[SLOW].relay.set(Mode::Delay(SLOW_ONE_WAY)),
        &[("create", create, false), ("token", create_token, true)],
        slice,
        cycles,
    );
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
            "\nLatency-bound: {ONE_WAY:?} each way on every path; C_GenerateRandom(32); \
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
            Judge::Target { test_mode },
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
            Judge::Target { test_mode },
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
            Judge::Target { test_mode },
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
            Judge::Target { test_mode },
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
        let (degraded, mut meanwhile) = load_until_degraded(bench, &bench.targets[2], mixed);
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
    if wanted("create") {
        log_in(bench);
        bench.set_all(Mode::Delay(ONE_WAY));
        for (what, op, rw) in [
            ("a data session object", create as Op, false),
            ("a data token object", create_token, true),
        ] {
            writeln!(
                out,
                "\nObject-making, latency-bound: {ONE_WAY:?} each way; C_CreateObject of {what} \
                 (made on every member before the call returns); ratio = group / direct at \
                 the same T (no target)"
            )
            .unwrap();
            throughput_table(
                &mut out,
                bench,
                op,
                &CREATE_THREADS,
                slice,
                cycles,
                |_| 1.0,
                Judge::Unjudged { rw },
            );
        }
    }
    if wanted("making") {
        making_table(&mut out, bench, slow_slice, cycles);
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
