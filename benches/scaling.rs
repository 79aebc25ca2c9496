//! How pkcs11-ha's throughput grows with the members of a group, and how
//! long a call that meets a dead member takes to succeed elsewhere.
//!
//! Members are copies of the test-only faulty member (tests/faulty-member),
//! each forwarding to its own SoftHSM token, with [`LATENCY`] per call and
//! capacity 1 (one call at a time, the rest queue): a slow HSM, so that the
//! members, not this 2-core machine, bound the throughput.
//!
//! - **Scaling**: groups of N = 1, 2 and 4 members, all configured at once
//!   (virtual slots 0, 1, 2), driven by 4N threads with a session each,
//!   signing with ECDSA P-256 (`C_SignInit` + `C_Sign` of a 32-byte
//!   digest: two member calls, each paying the latency, so at most
//!   `N / (2 * LATENCY)` ops/s); and, as the reference, the first group's
//!   member driven directly through its own library by 4 threads.
//!   Criterion times batches of operations per target; then a table of
//!   ops/s and the scaling ratio `ops/s(N) / (N * ops/s(N = 1))`, target
//!   at least 0.9 (also over N times the direct member's ops/s), measured
//!   in slices that alternate between the targets, ratios taken within a
//!   cycle.
//! - **Failover**: a group of two, one thread (with more, the calls would
//!   mostly measure the queue on the one member left). Just before a call
//!   that the round-robin sends to member B (known from the members' call
//!   counts), B dies: it answers `CKR_DEVICE_ERROR` at once from then on.
//!   The time from that moment to the call's success, with the fault at
//!   `C_SignInit` (retried on A) and between `C_SignInit` and `C_Sign` (the
//!   operation moved to A: init again, then sign), against "5 ms + the
//!   member calls the retry needs". pkcs11-ha is initialised afresh (its
//!   own config: that group alone) for every trial.
//!
//! Owns: a throw-away SoftHSM token dir, member copies and configs (temp
//! dir), and the process-global env (`SOFTHSM2_CONF`, `PKCS11_HA_CONF`).
//! Must never: touch the system's SoftHSM tokens, or use the `cryptoki`
//! high-level API in the timed paths (its `sign` adds a length query, a
//! third member call).
//!
//! Run: `cargo build --release && cargo bench --bench scaling` (about a
//! minute and a half). `-- --test` runs each benchmark once, the table and
//! the failover trials briefly; a filter that matches no benchmark
//! (`-- table`) runs only the table and the failover trials. The library's
//! own stderr lines about failed members are expected in the failover part.

#[path = "../tests/common/mod.rs"]
mod common;

#[macro_use]
mod support;
use support::{attr, ha_library_path, initialize, load, user_session};

use common::faulty::FaultyMember;
use common::{config_text, provision_domain, GroupSpec, SoftHsm, DOMAIN_VALUE, SOFTHSM_LIB};
use criterion::{black_box, BenchmarkId, Criterion, SamplingMode, Throughput};
use cryptoki_sys::*;
use libloading::Library;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};
use std::{env, fs, ptr};

/// Group sizes measured; group `i` is `VirtualToken0i`, slot `i`.
const SIZES: [usize; 3] = [1, 2, 4];
const THREADS_PER_MEMBER: usize = 4;
/// Every member call sleeps this long inside the member's capacity of 1.
const LATENCY: Duration = Duration::from_millis(1);
/// Member calls per operation (`C_SignInit`, `C_Sign`).
const CALLS_PER_OP: u32 = 2;
const TARGET_RATIO: f64 = 0.9;
/// Failover target: this plus the member calls the retried call needs.
const FAILOVER_ALLOWANCE: Duration = Duration::from_millis(5);
/// The scaling table: cycles of one slice per target, each slice this long.
const SLICE: Duration = Duration::from_millis(300);
const CYCLES: usize = 12;
const TEST_SLICE: Duration = Duration::from_millis(20);
const TEST_CYCLES: usize = 1;
/// Failover trials per case.
const TRIALS: usize = 20;
const TEST_TRIALS: usize = 2;
/// Healthy operations before each failover, for the cost of a member call.
const HEALTHY_OPS: usize = 4;
/// DER OID of prime256v1 (P-256).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

// ---------------------------------------------------------------------------
// The operation
// ---------------------------------------------------------------------------

/// `C_SignInit(CKM_ECDSA)` with `key`.
fn sign_init(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_ECDSA,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    ck!(fns, C_SignInit(session, &mut mechanism, key));
}

/// `C_Sign` of a 32-byte digest into a buffer that fits (no length query).
fn sign_final(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) {
    let mut digest = [0x5a_u8; 32];
    let mut signature = [0_u8; 64];
    let mut len = signature.len() as CK_ULONG;
    ck!(
        fns,
        C_Sign(
            session,
            digest.as_mut_ptr(),
            digest.len() as CK_ULONG,
            signature.as_mut_ptr(),
            &mut len
        )
    );
    debug_assert_eq!(len, 64);
    black_box(&signature);
}

/// One measured operation: an ECDSA P-256 signature, two member calls.
fn sign(fns: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
    sign_init(fns, session, key);
    sign_final(fns, session);
}

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

/// What runs under load: an HA group's virtual slot (slot = its index in
/// [`SIZES`]), or one member driven directly. A logged-in session per
/// thread, the signing key as those sessions see it, and which of
/// [`Bench::members`] serve it.
struct Target {
    /// `"direct"` or `"ha"`.
    kind: &'static str,
    size: usize,
    fns: CK_FUNCTION_LIST,
    sessions: Vec<CK_SESSION_HANDLE>,
    key: CK_OBJECT_HANDLE,
    members: Range<usize>,
}

/// Everything the run needs. Dropping it finalises pkcs11-ha, then the
/// member copies and the token dir go.
struct Bench {
    fns: CK_FUNCTION_LIST,
    /// The direct member first, then the groups in the order of [`SIZES`].
    targets: Vec<Target>,
    /// Copy `m<i>` over token `t<i>`; groups take consecutive runs.
    members: Vec<FaultyMember>,
    // Unloaded only after C_Finalize (see Drop), then the token dir goes.
    _direct_lib: Library,
    _ha_lib: Library,
    hsm: SoftHsm,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let rv = ck_raw!(self.fns, C_Finalize(ptr::null_mut()));
        if rv != CKR_OK {
            eprintln!("pkcs11-ha C_Finalize returned {rv:#x}");
        }
    }
}

/// `CKA_ID` of group `index`'s signing key.
fn key_id(index: usize) -> Vec<u8> {
    format!("scaling-ec-{index}").into_bytes()
}

/// Makes an EC P-256 key pair (token objects) through the virtual slot,
/// which replicates it to every member; returns the private key.
fn generate_ec_key(
    fns: &CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    id: &[u8],
) -> CK_OBJECT_HANDLE {
    let yes: CK_BBOOL = CK_TRUE;
    let public_class: CK_OBJECT_CLASS = CKO_PUBLIC_KEY;
    let private_class: CK_OBJECT_CLASS = CKO_PRIVATE_KEY;
    let ec_type: CK_KEY_TYPE = CKK_EC;
    let mut public = [
        attr(CKA_CLASS, &public_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_VERIFY, &yes),
        attr(CKA_EC_PARAMS, P256_OID),
        attr(CKA_ID, id),
    ];
    let mut private = [
        attr(CKA_CLASS, &private_class),
        attr(CKA_KEY_TYPE, &ec_type),
        attr(CKA_TOKEN, &yes),
        attr(CKA_PRIVATE, &yes),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_SIGN, &yes),
        attr(CKA_ID, id),
    ];
    let mut mechanism = CK_MECHANISM {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let (mut public_key, mut private_key) = (0, 0);
    ck!(
        fns,
        C_GenerateKeyPair(
            session,
            &mut mechanism,
            public.as_mut_ptr(),
            public.len() as CK_ULONG,
            private.as_mut_ptr(),
            private.len() as CK_ULONG,
            &mut public_key,
            &mut private_key
        )
    );
    private_key
}

/// The one private key with `CKA_ID = id` that `session` sees.
fn find_private_key(
    fns: &CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    id: &[u8],
) -> CK_OBJECT_HANDLE {
    let class: CK_OBJECT_CLASS = CKO_PRIVATE_KEY;
    let mut template = [attr(CKA_CLASS, &class), attr(CKA_ID, id)];
    let mut found = [0; 2];
    let mut count = 0;
    ck!(
        fns,
        C_FindObjectsInit(session, template.as_mut_ptr(), template.len() as CK_ULONG)
    );
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
    assert_eq!(
        count,
        1,
        "private keys with CKA_ID {:?}",
        String::from_utf8_lossy(id)
    );
    found[0]
}

/// Library name of member copy `i` in the configs.
fn member_name(i: usize) -> String {
    format!("m{i}")
}

/// Writes `dir/<file>` with `members` as libraries and `groups` (member
/// indices) as groups 00, 01, ...; returns its path.
fn write_config(
    bench_dir: &Path,
    file: &str,
    members: &[FaultyMember],
    serials: &[String],
    libraries: Range<usize>,
    groups: &[(String, Range<usize>)],
) -> PathBuf {
    let names: Vec<String> = libraries.clone().map(member_name).collect();
    let paths: Vec<String> = libraries
        .map(|i| members[i].path.display().to_string())
        .collect();
    let libraries: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(paths.iter().map(String::as_str))
        .collect();
    let groups: Vec<GroupSpec> = groups
        .iter()
        .map(|(label, range)| GroupSpec::new(label, &serials[range.clone()]))
        .collect();
    let path = bench_dir.join(file);
    fs::write(&path, config_text(&libraries, &groups, false)).expect("write pkcs11-ha config");
    path
}

impl Bench {
    /// Tokens `t0`.. (one per member of every group), the domain key on
    /// each, a member copy per token, one config with a group per size,
    /// pkcs11-ha initialised, per group a key and a session per thread, and
    /// the first group's member opened directly with sessions of its own.
    fn start() -> Bench {
        let ha_path = ha_library_path();
        let total: usize = SIZES.iter().sum();
        let labels: Vec<String> = (0..total).map(|i| format!("t{i}")).collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let hsm = SoftHsm::new(&labels);
        // Before anything initialises SoftHSM through the members.
        provision_domain(&hsm, &DOMAIN_VALUE);
        let serials = hsm.serials();
        let members: Vec<FaultyMember> = serials
            .iter()
            .enumerate()
            .map(|(i, serial)| {
                FaultyMember::new(hsm.dir.path(), &member_name(i), SOFTHSM_LIB, Some(serial))
            })
            .collect();
        for m in &members {
            m.set_capacity(1);
            // No latency while setting up: it only slows logins and keys.
            m.set_latency(Duration::ZERO);
        }
        let mut ranges = Vec::new();
        let mut first = 0;
        for size in SIZES {
            ranges.push(first..first + size);
            first += size;
        }
        let group_specs: Vec<(String, Range<usize>)> = SIZES
            .iter()
            .zip(&ranges)
            .map(|(size, range)| (format!("scale-{size}"), range.clone()))
            .collect();
        let config = write_config(
            hsm.dir.path(),
            "scaling.conf",
            &members,
            &serials,
            0..total,
            &group_specs,
        );
        hsm.activate();
        common::activate_config(&config);
        let (ha_lib, fns) = load(&ha_path);
        assert_eq!(initialize(&fns), CKR_OK, "C_Initialize of pkcs11-ha");

        let groups: Vec<Target> = SIZES
            .iter()
            .zip(ranges)
            .enumerate()
            .map(|(index, (&size, members))| {
                let slot = index as CK_SLOT_ID;
                let sessions: Vec<CK_SESSION_HANDLE> = (0..THREADS_PER_MEMBER * size)
                    .map(|_| user_session(&fns, slot, common::USER_PIN))
                    .collect();
                let key = generate_ec_key(&fns, sessions[0], &key_id(index));
                Target {
                    kind: "ha",
                    size,
                    fns,
                    sessions,
                    key,
                    members,
                }
            })
            .collect();

        // Member m0 directly, 4 threads: one member's own throughput. Same
        // dlopen handle as pkcs11-ha's, so the instance pkcs11-ha
        // initialised (and logged in: the login is per token).
        let (direct_lib, direct_fns) = load(&members[0].path);
        assert_eq!(
            initialize(&direct_fns),
            CKR_CRYPTOKI_ALREADY_INITIALIZED,
            "the member copy should be the instance pkcs11-ha initialised"
        );
        let slot = hsm.tokens[0].slot_id as CK_SLOT_ID;
        let sessions: Vec<CK_SESSION_HANDLE> = (0..THREADS_PER_MEMBER)
            .map(|_| user_session(&direct_fns, slot, common::USER_PIN))
            .collect();
        let key = find_private_key(&direct_fns, sessions[0], &key_id(0));
        let direct = Target {
            kind: "direct",
            size: 1,
            fns: direct_fns,
            sessions,
            key,
            members: 0..1,
        };
        assert_eq!(
            groups[0].members, direct.members,
            "direct = group 1's member"
        );

        let bench = Bench {
            fns,
            targets: std::iter::once(direct).chain(groups).collect(),
            members,
            _direct_lib: direct_lib,
            _ha_lib: ha_lib,
            hsm,
        };
        // Every session signs once on every member it may meet.
        for g in &bench.targets {
            for &session in &g.sessions {
                for _ in 0..g.size {
                    sign(&g.fns, session, g.key);
                }
            }
        }
        for m in &bench.members {
            m.set_latency(LATENCY);
        }
        bench
    }

    /// `C_Sign` calls each member of `g` received since the last reset.
    fn sign_counts(&self, g: &Target) -> Vec<u64> {
        self.members[g.members.clone()]
            .iter()
            .map(|m| m.call_count("C_Sign"))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------

/// Wall time for `ops` signatures on `g`, spread over its sessions, one
/// thread each; every thread takes the next operation while any is left,
/// so all finish within about one operation of each other.
fn run_batch(g: &Target, ops: u64) -> Duration {
    let remaining = AtomicI64::new(i64::try_from(ops).expect("batch size"));
    let start_line = Barrier::new(g.sessions.len() + 1);
    let start = thread::scope(|scope| {
        for &session in &g.sessions {
            let (remaining, start_line) = (&remaining, &start_line);
            scope.spawn(move || {
                start_line.wait();
                while remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                    sign(&g.fns, session, g.key);
                }
            });
        }
        start_line.wait();
        Instant::now()
    });
    start.elapsed()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Per cycle, `rates[j] / (size_j * base)`: the scaling ratio of target
/// `j` over the base target's ops/s in the same cycle.
fn paired_ratios(rates: &[f64], base: &[f64], size: usize) -> Vec<f64> {
    rates
        .iter()
        .zip(base)
        .map(|(r, b)| r / (size as f64 * b))
        .collect()
}

/// The ops/s and scaling table: `cycles` cycles of one `slice` per target,
/// the order rotating every cycle; per cycle the ratio of each group's
/// ops/s to N times that of the one-member group (the ratio) and
/// to N times that of the member driven directly, taken within that
/// cycle. Neighbours on the machine come and go over seconds; comparing
/// within a cycle lets such drift hit all targets alike.
fn scaling_table(bench: &Bench, slice: Duration, cycles: usize, test_mode: bool) -> String {
    let targets = &bench.targets;
    // Batch sizes for about one slice each, from one short batch per target.
    let batch: Vec<u64> = targets
        .iter()
        .map(|g| {
            let probe = 3 * g.sessions.len() as u64;
            let rate = probe as f64 / run_batch(g, probe).as_secs_f64();
            ((rate * slice.as_secs_f64()) as u64).max(2 * g.sessions.len() as u64)
        })
        .collect();
    for m in &bench.members {
        m.reset_counts();
    }
    let k = targets.len();
    let mut rates = vec![Vec::with_capacity(cycles); k];
    for cycle in 0..cycles {
        for i in 0..k {
            let j = (i + cycle) % k;
            let time = run_batch(&targets[j], batch[j]);
            rates[j].push(batch[j] as f64 / time.as_secs_f64());
        }
    }
    let direct = targets
        .iter()
        .position(|t| t.kind == "direct")
        .expect("direct");
    let one = targets
        .iter()
        .position(|t| t.kind == "ha" && t.size == 1)
        .expect("a group of 1");

    let mut out = String::new();
    let ideal = |size: usize| size as f64 / (f64::from(CALLS_PER_OP) * LATENCY.as_secs_f64());
    writeln!(
        out,
        "\nscaling: ECDSA P-256 sign (C_SignInit + C_Sign = {CALLS_PER_OP} member calls), \
         members with {LATENCY:?} latency and capacity 1, {THREADS_PER_MEMBER} threads per \
         member; ha = through pkcs11-ha's virtual slot, direct = member m0's own library;\n\
         ops/s = median over {cycles} cycles of one ~{slice:?} slice per target (order \
         rotating); ideal = N / ({CALLS_PER_OP} * latency);\n\
         ratio = median of same-cycle ops/s(N) / (N * ops/s(ha, N=1)), [min..max] over \
         cycles; vs direct = the same over N * ops/s(direct);\n\
         balance = C_Sign calls per member, least / most; max conc = most calls a member \
         served at once (the capacity is 1)"
    )
    .unwrap();
    writeln!(
        out,
        "{:<6} {:>2} {:>7} {:>8} {:>8} {:>6} | {:>6} {:>15} | {:>9} | {:>7} {:>8} | {:>6}",
        "target",
        "N",
        "threads",
        "ops/s",
        "ideal",
        "%ideal",
        "ratio",
        "[min..max]",
        "vs direct",
        "balance",
        "max conc",
        "target"
    )
    .unwrap();
    for (j, g) in targets.iter().enumerate() {
        let ops = median(rates[j].clone());
        let ratios = paired_ratios(&rates[j], &rates[one], g.size);
        let (lo, hi) = min_max(&ratios);
        let ratio = median(ratios);
        let vs_direct = median(paired_ratios(&rates[j], &rates[direct], g.size));
        let counts = bench.sign_counts(g);
        let (least, most) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        let concurrency = bench.members[g.members.clone()]
            .iter()
            .map(FaultyMember::max_concurrent)
            .max()
            .unwrap_or(0);
        let verdict = if g.kind == "direct" {
            "(reference)".to_string()
        } else if test_mode {
            "(test mode: not judged)".to_string()
        } else {
            let judge = |r: f64| if r >= TARGET_RATIO { "met" } else { "MISSED" };
            format!("{} (vs direct: {})", judge(ratio), judge(vs_direct))
        };
        writeln!(
            out,
            "{:<6} {:>2} {:>7} {:>8.0} {:>8.0} {:>5.1}% | {:>6.3} {:>15} | {:>9.3} | {:>7.3} {:>8} | {:>6.2} {verdict}",
            g.kind,
            g.size,
            g.sessions.len(),
            ops,
            ideal(g.size),
            100.0 * ops / ideal(g.size),
            ratio,
            format!("[{lo:.3}..{hi:.3}]"),
            vs_direct,
            least as f64 / most.max(1) as f64,
            concurrency,
            TARGET_RATIO,
        )
        .unwrap();
    }
    out
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

/// Where the member dies relative to the timed call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// Before `C_SignInit`: the call is retried on the other member.
    AtInit,
    /// Between `C_SignInit` and `C_Sign`: the operation is moved (init
    /// again on the other member), then `C_Sign` runs there.
    MidOperation,
}

impl Case {
    fn describe(self) -> &'static str {
        match self {
            Case::AtInit => "dies before C_SignInit",
            Case::MidOperation => "dies before C_Sign",
        }
    }

    /// Member calls the retried call needs on the surviving member.
    fn calls(self) -> u32 {
        match self {
            Case::AtInit => 1,
            Case::MidOperation => 2,
        }
    }
}

/// One failover trial, in milliseconds: the timed call, and the median
/// healthy `C_SignInit` and `C_Sign` just before.
struct Trial {
    failover: f64,
    healthy_init: f64,
    healthy_sign: f64,
}

impl Trial {
    /// The healthy member calls the retry needs in `case`.
    fn work(&self, case: Case) -> f64 {
        match case {
            Case::AtInit => self.healthy_init,
            Case::MidOperation => self.healthy_init + self.healthy_sign,
        }
    }
}

/// The failover part: its own config with the N = 2 group's members as
/// group 00, pkcs11-ha initialised afresh for every trial.
struct Failover<'a> {
    bench: &'a Bench,
    /// Indices into `bench.members`: the pair.
    pair: [usize; 2],
    id: Vec<u8>,
}

impl Failover<'_> {
    fn new(bench: &Bench) -> Failover<'_> {
        let index = SIZES.iter().position(|&n| n == 2).expect("a group of 2");
        let range = bench
            .targets
            .iter()
            .find(|t| t.kind == "ha" && t.size == 2)
            .expect("a group of 2")
            .members
            .clone();
        let config = write_config(
            bench.hsm.dir.path(),
            "failover.conf",
            &bench.members,
            &bench.hsm.serials(),
            range.clone(),
            &[("failover".to_string(), range.clone())],
        );
        common::activate_config(&config);
        Failover {
            bench,
            pair: [range.start, range.start + 1],
            id: key_id(index),
        }
    }

    fn member(&self, i: usize) -> &FaultyMember {
        &self.bench.members[self.pair[i]]
    }

    fn counts(&self, function: &str) -> [u64; 2] {
        [0, 1].map(|i| self.member(i).call_count(function))
    }

    /// Runs one trial of `case`; `None` if the round-robin did not send the
    /// timed call to the member that died (not counted).
    fn trial(&self, case: Case) -> Option<Trial> {
        let fns = &self.bench.fns;
        for i in 0..2 {
            self.member(i).clear_fault();
            self.member(i).set_latency(Duration::ZERO);
        }
        // Start afresh: both members up, nothing bound.
        ck!(fns, C_Finalize(ptr::null_mut()));
        assert_eq!(initialize(fns), CKR_OK, "C_Initialize of pkcs11-ha");
        let session = user_session(fns, 0, common::USER_PIN);
        let key = find_private_key(fns, session, &self.id);
        for _ in 0..2 {
            sign(fns, session, key);
        }
        for i in 0..2 {
            self.member(i).set_latency(LATENCY);
        }

        // Healthy operations show what the member calls cost here and now
        // (medians), and the last one which member is next: the other one,
        // as with nothing in flight ties rotate.
        let mut init_times = Vec::with_capacity(HEALTHY_OPS);
        let mut sign_times = Vec::with_capacity(HEALTHY_OPS);
        let mut survivor = 0;
        for _ in 0..HEALTHY_OPS {
            let before = self.counts("C_SignInit");
            let t = Instant::now();
            sign_init(fns, session, key);
            init_times.push(ms(t.elapsed()));
            let t = Instant::now();
            sign_final(fns, session);
            sign_times.push(ms(t.elapsed()));
            let after = self.counts("C_SignInit");
            survivor = if after[0] > before[0] { 0 } else { 1 };
        }
        let dying = 1 - survivor;
        let dies = || {
            // A dead member: every call fails at once, as a crashed
            // p11-kit worker's connection does.
            self.member(dying).set_latency(Duration::ZERO);
            let t0 = Instant::now();
            self.member(dying).set_fault(CKR_DEVICE_ERROR);
            t0
        };

        let init_before = self.counts("C_SignInit");
        let sign_before = self.counts("C_Sign");
        let failover = match case {
            Case::AtInit => {
                let t0 = dies();
                sign_init(fns, session, key);
                let failover = t0.elapsed();
                sign_final(fns, session);
                failover
            }
            Case::MidOperation => {
                sign_init(fns, session, key);
                if self.counts("C_SignInit")[dying] == init_before[dying] {
                    sign_final(fns, session);
                    return None;
                }
                let t0 = dies();
                sign_final(fns, session);
                t0.elapsed()
            }
        };
        let init_after = self.counts("C_SignInit");
        let sign_after = self.counts("C_Sign");
        let grew = |after: [u64; 2], before: [u64; 2], i: usize| after[i] - before[i];
        // The dead member was called (and failed), the survivor signed.
        let hit = grew(init_after, init_before, dying) == 1
            && grew(init_after, init_before, survivor) == 1
            && grew(sign_after, sign_before, survivor) == 1
            && grew(sign_after, sign_before, dying) == u64::from(case == Case::MidOperation);
        ck!(fns, C_CloseSession(session));
        hit.then_some(Trial {
            failover: ms(failover),
            healthy_init: median(init_times),
            healthy_sign: median(sign_times),
        })
    }
}

/// The first three fields of /proc/loadavg, to judge how busy the machine
/// was (figures taken on a loaded 2-core machine are noisier).
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The failover table: `trials` trials of each case.
fn failover_table(bench: &Bench, trials: usize, test_mode: bool) -> String {
    let failover = Failover::new(bench);
    let mut out = String::new();
    writeln!(
        out,
        "\nfailover: group of 2, member latency {LATENCY:?}, capacity 1, 1 thread, \
         {trials} trials per case; at t0 member B dies (CKR_DEVICE_ERROR at once from \
         then on) just before a call the round-robin sends to it;\n\
         time = t0 to the call's success on member A; healthy work = the member calls the \
         retry needs, (n) of them, at their median in {HEALTHY_OPS} healthy operations \
         just before;\nextra = time - healthy work, per trial; target = \
         {FAILOVER_ALLOWANCE:?} + healthy work; strict = {FAILOVER_ALLOWANCE:?} + one \
         member call"
    )
    .unwrap();
    writeln!(
        out,
        "{:<24} {:>8} {:>8} | {:>12} {:>8} {:>8} | {:>8} {:>8} | {:>7}",
        "case", "median", "max", "healthy work", "extra", "max", "target", "strict", "verdict"
    )
    .unwrap();
    for case in [Case::AtInit, Case::MidOperation] {
        let mut results = Vec::new();
        let mut misses = 0;
        while results.len() < trials {
            match failover.trial(case) {
                Some(t) => results.push(t),
                None => {
                    misses += 1;
                    assert!(misses < 5, "the timed call kept missing the dying member");
                }
            }
        }
        let times: Vec<f64> = results.iter().map(|t| t.failover).collect();
        let extras: Vec<f64> = results.iter().map(|t| t.failover - t.work(case)).collect();
        let work = median(results.iter().map(|t| t.work(case)).collect());
        let one_call = median(
            results
                .iter()
                .map(|t| t.healthy_init.max(t.healthy_sign))
                .collect(),
        );
        let (_, max) = min_max(&times);
        let (_, max_extra) = min_max(&extras);
        let med = median(times.clone());
        let target = ms(FAILOVER_ALLOWANCE) + work;
        let strict = ms(FAILOVER_ALLOWANCE) + one_call;
        let over = times.iter().filter(|&&t| t >= target).count();
        let verdict = if test_mode {
            "(test mode: not judged)".to_string()
        } else if over == 0 && max < strict {
            "met (strict too)".to_string()
        } else if over == 0 {
            "met".to_string()
        } else {
            format!("MISSED in {over} of {trials}")
        };
        writeln!(
            out,
            "{:<24} {:>5.2} ms {:>5.2} ms | {:>6.2} ms ({}) {:>5.2} ms {:>5.2} ms | {:>5.2} ms {:>5.2} ms | {verdict}",
            case.describe(),
            med,
            max,
            work,
            case.calls(),
            median(extras),
            max_extra,
            target,
            strict,
        )
        .unwrap();
    }
    out
}

fn main() {
    let args: Vec<String> = env::args().collect();
    // As criterion decides: without `--bench` (cargo test), test mode.
    let test_mode = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    let list_mode = args.iter().any(|a| a == "--list");

    let bench = Bench::start();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut group = c.benchmark_group("scaling_ecdsa_sign");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(1));
    for g in &bench.targets {
        group.bench_function(BenchmarkId::new(g.kind, g.size), |b| {
            b.iter_custom(|ops| run_batch(g, ops))
        });
    }
    group.finish();
    c.final_summary();

    if !list_mode {
        let (slice, cycles, trials) = if test_mode {
            (TEST_SLICE, TEST_CYCLES, TEST_TRIALS)
        } else {
            (SLICE, CYCLES, TRIALS)
        };
        let load = load_average();
        print!("{}", scaling_table(&bench, slice, cycles, test_mode));
        print!("{}", failover_table(&bench, trials, test_mode));
        println!(
            "\nload average before the tables: {load}; after: {} ({} CPUs)",
            load_average(),
            thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
}
