//! The soak test (issue 4): mixed load from 8 threads on a group of three
//! `p11-kit server` members while a chaos thread kills, stalls and restarts
//! members at random. It passes when no application operation failed (the
//! chaos never touches a member unless another one is surely up), every
//! member is back with nothing pending at the end, and every key created
//! during the run is on every member exactly once.
//!
//! `PKCS11_HA_SOAK_SECS` sets the duration (default 60: the suite runs it
//! so); `scripts/soak` runs the 30-minute version by hand.
//! `PKCS11_HA_SOAK_SEED` repeats a run's choices (the timing of real
//! processes still varies).
//!
//! The load: sign and verify (ECDSA over a 32-byte digest), SHA-256
//! (single- and multi-part, checked), random bytes, AES-ECB round trips,
//! searches by `CKA_ID` that must find exactly the key's objects, and every
//! 50 iterations an imported key. Keys are imported (`C_CreateObject` with
//! their values), not generated: p11-kit 0.24 carries no AES key-wrap
//! mechanism, so a key generated in a group of remote members cannot
//! replicate (README, "Known limits"); and since it forwards no AES
//! mechanism parameters, AES runs as ECB.
//!
//! Each member is reached through a fault relay (tests/common/relay.rs),
//! as a network HSM is reached over a path. The chaos, every 1.5-4 s:
//! SIGKILL of a member's `p11-kit` worker (a crash), SIGSTOP of it for
//! 1-3 s (a hang: `memberTimeout` is 1 s), the whole server killed and
//! restarted 1-3 s later (the relay still accepting meanwhile), a reset of
//! the member's connections, or its path black-holed (accepting and never
//! answering) or paused for 1-3 s; always to a member that serves, and
//! only while another member is surely up. The summary gives the time from
//! the end of each disturbance to the member serving again (p50, p99), and
//! the time the group had no member serving.
//!
//! SoftHSM's file store rewrites `token.object` in place at every login,
//! so a SIGKILL in that window empties it and SoftHSM never shows the token
//! again (about 4% of kills while clients log in:
//! `scripts/kill9-token-survival`). An HSM's storage survives a crash, and
//! this test is about our library, so after each kill the chaos puts back
//! an emptied `token.object` from the copy taken at setup, and says so
//! among the chaos events.
//!
//! Owns: three token directories, their servers (through
//! `tests/common/p11kit.rs`), the config, the HA log and the state
//! directory (`haStateDir`, so that no other process's lock files or
//! deletion records meet the run's), all in a temp dir that is kept when
//! the test fails. Holds the serial guard throughout.

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;
#[path = "common/relay.rs"]
mod relay;

use std::collections::HashMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use p11kit::P11KitServer;
use pkcs11_ha::state_api::{PKCS11HA_GROUP_STATUS, PKCS11HA_STATE_UP};
use relay::Relay;
use sha2::{Digest as _, Sha256};

/// Seconds of load and chaos.
const SECS_ENV: &str = "PKCS11_HA_SOAK_SECS";
const DEFAULT_SECS: u64 = 60;
/// Seed of every random choice (printed, so a run can be repeated).
const SEED_ENV: &str = "PKCS11_HA_SOAK_SEED";
const THREADS: usize = 8;
/// Library names, token labels and socket names of the three members.
const MEMBERS: [&str; 3] = ["hsmA", "hsmB", "hsmC"];
const MEMBER_TIMEOUT_MS: u64 = 1000;
/// Each load thread imports a key every this many iterations.
const IMPORT_EVERY: u64 = 50;
/// Chaos events come this far apart (ms), at random.
const CHAOS_GAP_MS: (u64, u64) = (1500, 4000);
/// A stall (SIGSTOP of the worker) or a server's absence lasts this long.
const OUTAGE_MS: (u64, u64) = (1000, 3000);
/// How often the chaos thread looks at its timers and the state API.
const CHAOS_TICK: Duration = Duration::from_millis(20);
/// An event with no member to disturb tries again this much later.
const CHAOS_RETRY: Duration = Duration::from_millis(100);
/// Calls a member must have completed since its last disturbance, while
/// staying up, before it counts as the member that is surely up: the first
/// call on a dead connection takes a member down, so a member still up
/// after that many calls is serving.
const PROVEN_CALLS: u64 = 20;
/// Bound on waiting for every member to be back at the end: this plus
/// half the run, since a recovery copies what the member lacks and grows
/// with the number of keys.
const SETTLE_BASE: Duration = Duration::from_secs(120);
/// The summary shows this many stretches with no member serving, each
/// with the chaos events and HA log lines of this long before it.
const OUTAGES_SHOWN: usize = 5;
const OUTAGE_CONTEXT: Duration = Duration::from_secs(5);
/// The summary shows this many failures of each kind in detail.
const FAILURES_SHOWN: usize = 3;
/// The summary lists this many member failures the chaos did not cause.
const UNPROVOKED_SHOWN: usize = 10;
/// A member failure with no chaos event on that member this long before
/// it is reported as one the chaos did not cause: the longest disturbance,
/// `memberTimeout` and a second for the first call to meet it.
const PROVOKED_WITHIN: Duration = Duration::from_millis(OUTAGE_MS.1 + MEMBER_TIMEOUT_MS + 1000);
/// A chaos event's time is taken once its action is done (a kill waits
/// for the workers to die), up to this long after the failure it caused.
const EVENT_LAG: Duration = Duration::from_millis(500);
/// The heartbeat thread's sleep, and how late a wake must be to be
/// recorded.
const HEARTBEAT: Duration = Duration::from_millis(10);
const LATE: Duration = Duration::from_millis(100);
/// An operation slower than this counts as slow in the summary.
const SLOW: Duration = Duration::from_millis(250);
/// DER of the prime256v1 OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// The P-256 key pair of RFC 6979, appendix A.2.5: the first of the pool.
const RFC6979_D: &str = "C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721";
const RFC6979_UX: &str = "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6";
const RFC6979_UY: &str = "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299";
/// Distinct EC key values to import (each import gets its own CKA_ID).
const EC_POOL: usize = 12;

// ---------------------------------------------------------------------------
// Randomness without a dependency
// ---------------------------------------------------------------------------

/// SplitMix64: enough for choosing operations, members and delays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, (low, high): (u64, u64)) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seed() -> u64 {
    match env::var(SEED_ENV) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{SEED_ENV}={text:?} is not a number"))
        }
        Err(_) => {
            let mut bytes = [0u8; 8];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .expect("read /dev/urandom");
            u64::from_le_bytes(bytes)
        }
    }
}

// ---------------------------------------------------------------------------
// Key material
// ---------------------------------------------------------------------------

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// An EC P-256 key pair's values: the private scalar and the DER of the
/// uncompressed point (`CKA_EC_POINT`).
#[derive(Clone)]
struct EcValues {
    scalar: Vec<u8>,
    point: Vec<u8>,
}

/// The RFC 6979 key and `EC_POOL - 1` fresh ones from `openssl ecparam`
/// (its SEC1 DER has the scalar at bytes 7..39 and the point at 56..121).
fn ec_pool() -> Vec<EcValues> {
    let mut point = vec![0x04, 0x41, 0x04];
    point.extend(hex(RFC6979_UX));
    point.extend(hex(RFC6979_UY));
    let mut pool = vec![EcValues {
        scalar: hex(RFC6979_D),
        point,
    }];
    while pool.len() < EC_POOL {
        let out = Command::new("openssl")
            .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
            .args(["-outform", "DER"])
            .output()
            .expect("run openssl ecparam (is openssl installed?)");
        let der = out.stdout;
        assert!(
            out.status.success()
                && der.len() == 121
                && der[..7] == [0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]
                && der[51..57] == [0xa1, 0x44, 0x03, 0x42, 0x00, 0x04],
            "unexpected openssl output: {der:02x?}"
        );
        let mut point = vec![0x04, 0x41];
        point.extend_from_slice(&der[56..121]);
        pool.push(EcValues {
            scalar: der[7..39].to_vec(),
            point,
        });
    }
    pool
}

fn urandom(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

// ---------------------------------------------------------------------------
// The state API
// ---------------------------------------------------------------------------

type GetGroupStatus = unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64;

/// `PKCS11HA_GetGroupStatus` of the loaded library, found with dlsym.
struct StateApi {
    get: GetGroupStatus,
    _library: libloading::Library,
}

impl StateApi {
    fn new() -> StateApi {
        // SAFETY: the library is already loaded (same path, same handle);
        // the symbol has this signature (include/pkcs11_ha.h).
        unsafe {
            let library = libloading::Library::new(library_path()).expect("dlopen");
            let get = *library
                .get::<GetGroupStatus>(b"PKCS11HA_GetGroupStatus\0")
                .expect("PKCS11HA_GetGroupStatus");
            StateApi {
                get,
                _library: library,
            }
        }
    }

    fn group(&self) -> PKCS11HA_GROUP_STATUS {
        // SAFETY: a plain-data struct the function fills.
        unsafe {
            let mut status = std::mem::zeroed();
            assert_eq!((self.get)(0, &mut status), 0, "PKCS11HA_GetGroupStatus");
            status
        }
    }
}

/// One line per member: state, failures, last fault, pending changes.
fn describe(status: &PKCS11HA_GROUP_STATUS) -> String {
    (0..MEMBERS.len())
        .map(|i| {
            let m = &status.members[i];
            let state = match m.state {
                0 => "up",
                1 => "down",
                2 => "recovering",
                _ => "?",
            };
            format!(
                "{}: {state} failures={} lastFault={:#x} pending={} served={} inFlight={}",
                MEMBERS[i],
                m.consecutiveFailures,
                m.lastFault,
                m.pendingChanges,
                m.callsServed,
                m.callsInFlight
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------
// Members
// ---------------------------------------------------------------------------

/// One member: its token directory, the relay in front of it and, while
/// it is up, its server.
struct Member {
    name: &'static str,
    hsm: SoftHsm,
    socket: PathBuf,
    relay: Relay,
    server: Option<P11KitServer>,
    /// Each token's `token.object` as set up, to mend a kill's damage.
    token_files: Vec<(PathBuf, Vec<u8>)>,
}

/// The `token.object` files under a SoftHSM token directory.
fn token_objects(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("read the token directory")
        .filter_map(|entry| Some(entry.ok()?.path().join("token.object")))
        .filter(|path| path.is_file())
        .collect()
}

impl Member {
    fn new(name: &'static str, dir: &Path) -> Member {
        let hsm = SoftHsm::new(&[name]);
        // Before the server (or anything else) opens the token.
        provision_domain(&hsm, &DOMAIN_VALUE);
        let socket = dir.join(format!("{name}.sock"));
        let relay = Relay::start(&dir.join(format!("{name}-relay.sock")), &socket);
        let token_files = token_objects(&hsm.token_dir())
            .into_iter()
            .map(|path| {
                let bytes = fs::read(&path).expect("read token.object");
                (path, bytes)
            })
            .collect();
        Member {
            name,
            hsm,
            socket,
            relay,
            server: None,
            token_files,
        }
    }

    /// Puts back each `token.object` a kill left empty (see the module
    /// doc); whether there was one.
    fn mend_token(&self) -> bool {
        let mut mended = false;
        for (path, bytes) in &self.token_files {
            if fs::metadata(path).is_ok_and(|m| m.len() == 0) {
                fs::write(path, bytes).expect("restore token.object");
                mended = true;
            }
        }
        mended
    }

    fn serial(&self) -> &str {
        &self.hsm.tokens[0].serial
    }

    /// Starts the server; the socket a killed one left is removed first.
    fn start(&mut self) {
        let _ = fs::remove_file(&self.socket);
        self.server = Some(P11KitServer::start(
            SOFTHSM_LIB,
            &self.hsm.conf,
            self.name,
            &self.socket,
        ));
    }

    /// Kills the server and its workers (dropping it kills its group).
    fn stop(&mut self) {
        self.server = None;
    }
}

fn config_text(members: &[Member], log_dir: &Path) -> String {
    let client_module = p11kit::client_module();
    let mut s = String::from("[Libraries]\n");
    for m in members {
        writeln!(s, "{} = {client_module}", m.name).unwrap();
    }
    s.push_str("\n[LibraryEnvironment]\n");
    for m in members {
        writeln!(
            s,
            "{}.P11_KIT_SERVER_ADDRESS = {}",
            m.name,
            m.relay.address()
        )
        .unwrap();
    }
    let serials: Vec<&str> = members.iter().map(Member::serial).collect();
    // `logRepeats = 0`: every HA log line, for a failure's report.
    write!(
        s,
        "\n[VirtualToken]\nVirtualToken00Label = {GROUP_LABEL}\n\
         VirtualToken00Members = {}\n\n\
         [HAConfiguration]\nAutoReconnectInterval = 1\nmemberTimeout = {MEMBER_TIMEOUT_MS}\n\
         haLogStatus = enabled\nhaLogPath = {}\nlogRepeats = 0\nhaStateDir = {}\n",
        serials.join(","),
        log_dir.display(),
        log_dir.with_file_name("state").display()
    )
    .unwrap();
    s
}

// ---------------------------------------------------------------------------
// What the run records
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Sign,
    Verify,
    Digest,
    DigestMultipart,
    Random,
    Encrypt,
    Decrypt,
    Find,
    ImportEc,
    ImportAes,
    OpenSession,
    /// `C_GenerateRandom` while waiting for the members at the end.
    Settle,
}

const OPS: [Op; 12] = [
    Op::Sign,
    Op::Verify,
    Op::Digest,
    Op::DigestMultipart,
    Op::Random,
    Op::Encrypt,
    Op::Decrypt,
    Op::Find,
    Op::ImportEc,
    Op::ImportAes,
    Op::OpenSession,
    Op::Settle,
];

#[derive(Default)]
struct OpStats {
    count: AtomicU64,
    failed: AtomicU64,
    slow: AtomicU64,
    max_us: AtomicU64,
}

struct Failure {
    at: Duration,
    thread: usize,
    op: Op,
    error: String,
    latency: Duration,
    state: String,
}

#[derive(Clone)]
struct ChaosEvent {
    at: Duration,
    member: usize,
    what: String,
}

/// A key imported through the virtual slot: its CKA_ID and the classes
/// of the objects made with it.
#[derive(Clone)]
struct KeyRecord {
    id: Vec<u8>,
    classes: Vec<ObjectClass>,
    /// When its last object was made, from the start of the run.
    made: Duration,
}

struct Run {
    start: Instant,
    /// `start` on the wall clock, to place the HA log's lines in the run.
    wall_start: SystemTime,
    stop: AtomicBool,
    state: StateApi,
    stats: [OpStats; OPS.len()],
    slowest: Mutex<(Duration, Option<(Op, Duration)>)>,
    failures: Mutex<Vec<Failure>>,
    chaos: Mutex<Vec<ChaosEvent>>,
    keys: Mutex<Vec<KeyRecord>>,
    ec_keys: RwLock<Vec<(ObjectHandle, ObjectHandle)>>,
    aes_keys: RwLock<Vec<ObjectHandle>>,
    next_id: AtomicU64,
    ec_pool: Vec<EcValues>,
    /// Each time the heartbeat thread woke late: when (run time), by how
    /// much.
    late_wakes: Mutex<Vec<(Duration, Duration)>>,
    /// Each member's name, `softhsm2.conf` and token label, for looking
    /// at its token from a process of its own ([`on_tokens`]).
    tokens: Vec<(&'static str, PathBuf, String)>,
}

impl Run {
    /// Runs one application operation, timing it and recording a failure
    /// with the error, the time and the group's state.
    fn op<T>(&self, thread: usize, op: Op, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        let stats = &self.stats[op as usize];
        stats.count.fetch_add(1, Ordering::Relaxed);
        stats
            .max_us
            .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        if took > SLOW {
            stats.slow.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut slowest = self.slowest.lock().unwrap();
            if took > slowest.0 {
                *slowest = (took, Some((op, started - self.start)));
            }
        }
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let state = describe(&self.state.group());
                self.failures.lock().unwrap().push(Failure {
                    at: started - self.start,
                    thread,
                    op,
                    error,
                    latency: took,
                    state,
                });
                None
            }
        }
    }

    fn chaos_event(&self, member: usize, what: String) {
        let at = self.start.elapsed();
        self.chaos
            .lock()
            .unwrap()
            .push(ChaosEvent { at, member, what });
    }

    fn total_ops(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }

    fn total_failures(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.failed.load(Ordering::Relaxed))
            .sum()
    }

    fn new_id(&self, kind: &str) -> Vec<u8> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("soak-{kind}-{n:07}").into_bytes()
    }

    /// Imports an EC key pair with a new CKA_ID (values from the pool).
    fn import_ec(&self, session: &Session, thread: usize, rng: &mut Rng) {
        let values = &self.ec_pool[rng.below(self.ec_pool.len() as u64) as usize];
        let id = self.new_id("ec");
        let public = self.op(thread, Op::ImportEc, || {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Token(true),
                    Attribute::Id(id.clone()),
                    Attribute::EcParams(P256.to_vec()),
                    Attribute::EcPoint(values.point.clone()),
                    Attribute::Verify(true),
                ])
                .map_err(|e| format!("C_CreateObject (EC public key): {e:?}"))
        });
        let Some(public) = public else { return };
        let mut record = KeyRecord {
            id: id.clone(),
            classes: vec![ObjectClass::PUBLIC_KEY],
            made: self.start.elapsed(),
        };
        let private = self.op(thread, Op::ImportEc, || {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Id(id.clone()),
                    Attribute::EcParams(P256.to_vec()),
                    Attribute::Value(values.scalar.clone()),
                    Attribute::Sign(true),
                ])
                .map_err(|e| format!("C_CreateObject (EC private key): {e:?}"))
        });
        if let Some(private) = private {
            record.classes.push(ObjectClass::PRIVATE_KEY);
            record.made = self.start.elapsed();
            self.ec_keys.write().unwrap().push((public, private));
        }
        self.keys.lock().unwrap().push(record);
    }

    /// Imports an AES-256 key with a new CKA_ID and a random value.
    fn import_aes(&self, session: &Session, thread: usize) {
        let id = self.new_id("aes");
        let value = urandom(32);
        let key = self.op(thread, Op::ImportAes, || {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Id(id.clone()),
                    Attribute::Value(value),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ])
                .map_err(|e| format!("C_CreateObject (AES key): {e:?}"))
        });
        if let Some(key) = key {
            self.aes_keys.write().unwrap().push(key);
            self.keys.lock().unwrap().push(KeyRecord {
                id,
                classes: vec![ObjectClass::SECRET_KEY],
                made: self.start.elapsed(),
            });
        }
    }
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

/// One load thread: its own session on the virtual slot, a mixed loop
/// until the run stops.
fn load(run: &Run, pkcs11: &Pkcs11, thread: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed ^ (thread as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let virtual_slot = Slot::try_from(0u64).unwrap();
    let mut session = None;
    let mut iterations = 0u64;
    let mut imports = 0u64;
    while !run.stop.load(Ordering::Relaxed) {
        let Some(s) = session.as_ref() else {
            session = run.op(thread, Op::OpenSession, || {
                pkcs11
                    .open_rw_session(virtual_slot)
                    .map_err(|e| format!("C_OpenSession: {e:?}"))
            });
            if session.is_none() {
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        };
        iterations += 1;
        if iterations % IMPORT_EVERY == (thread as u64 * 7) % IMPORT_EVERY {
            imports += 1;
            if imports % 2 == 0 {
                run.import_ec(s, thread, &mut rng);
            } else {
                run.import_aes(s, thread);
            }
        }
        match rng.below(100) {
            0..=39 => sign_and_verify(run, s, thread, &mut rng),
            40..=59 => digest(run, s, thread, &mut rng),
            60..=74 => {
                run.op(thread, Op::Random, || {
                    let bytes = s
                        .generate_random_vec(32)
                        .map_err(|e| format!("C_GenerateRandom: {e:?}"))?;
                    if bytes.len() == 32 {
                        Ok(())
                    } else {
                        Err(format!("C_GenerateRandom gave {} bytes", bytes.len()))
                    }
                });
            }
            75..=94 => encrypt_and_decrypt(run, s, thread, &mut rng),
            _ => find(run, s, thread, &mut rng),
        }
    }
    iterations
}

fn pick<T: Copy>(keys: &RwLock<Vec<T>>, rng: &mut Rng) -> T {
    let keys = keys.read().unwrap();
    keys[rng.below(keys.len() as u64) as usize]
}

fn sign_and_verify(run: &Run, s: &Session, thread: usize, rng: &mut Rng) {
    let (public, private) = pick(&run.ec_keys, rng);
    let digest = rng.bytes(32);
    let Some(signature) = run.op(thread, Op::Sign, || {
        s.sign(&Mechanism::Ecdsa, private, &digest)
            .map_err(|e| format!("C_Sign (ECDSA): {e:?}"))
    }) else {
        return;
    };
    run.op(thread, Op::Verify, || {
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .map_err(|e| {
                format!(
                    "C_Verify (ECDSA, a {}-byte signature by key {private}, with key {public}): {e:?}",
                    signature.len()
                )
            })
    });
}

/// SHA-256 of 1 KiB, single-part or (one in four) in three updates,
/// checked against the `sha2` crate.
fn digest(run: &Run, s: &Session, thread: usize, rng: &mut Rng) {
    let data = rng.bytes(1024);
    let expected = Sha256::digest(&data).to_vec();
    let check = |got: Vec<u8>| {
        if got == expected {
            Ok(())
        } else {
            Err(format!("wrong SHA-256: {got:02x?}"))
        }
    };
    if rng.below(4) == 0 {
        run.op(thread, Op::DigestMultipart, || {
            s.digest_init(&Mechanism::Sha256)
                .map_err(|e| format!("C_DigestInit: {e:?}"))?;
            for part in data.chunks(400) {
                s.digest_update(part)
                    .map_err(|e| format!("C_DigestUpdate: {e:?}"))?;
            }
            check(
                s.digest_final()
                    .map_err(|e| format!("C_DigestFinal: {e:?}"))?,
            )
        });
    } else {
        run.op(thread, Op::Digest, || {
            check(
                s.digest(&Mechanism::Sha256, &data)
                    .map_err(|e| format!("C_Digest: {e:?}"))?,
            )
        });
    }
}

fn encrypt_and_decrypt(run: &Run, s: &Session, thread: usize, rng: &mut Rng) {
    let key = pick(&run.aes_keys, rng);
    let plain = rng.bytes(64);
    let Some(cipher) = run.op(thread, Op::Encrypt, || {
        s.encrypt(&Mechanism::AesEcb, key, &plain)
            .map_err(|e| format!("C_Encrypt (AES-ECB): {e:?}"))
    }) else {
        return;
    };
    run.op(thread, Op::Decrypt, || {
        let back = s
            .decrypt(&Mechanism::AesEcb, key, &cipher)
            .map_err(|e| format!("C_Decrypt (AES-ECB): {e:?}"))?;
        if back == plain {
            Ok(())
        } else {
            Err(format!(
                "AES-ECB with key {key} decrypted {} bytes of {} to something else \
                 ({} bytes, {} of them right)",
                cipher.len(),
                plain.len(),
                back.len(),
                back.iter().zip(&plain).filter(|(a, b)| a == b).count()
            ))
        }
    });
}

/// Finds a recorded key by CKA_ID through the virtual slot: exactly its
/// objects, no more, no fewer. A wrong count says when the key was made
/// and what a second search right after finds, which tells a search that
/// missed objects from objects missing.
fn find(run: &Run, s: &Session, thread: usize, rng: &mut Rng) {
    let record = {
        let keys = run.keys.lock().unwrap();
        keys[rng.below(keys.len() as u64) as usize].clone()
    };
    let search = || {
        s.find_objects(&[Attribute::Id(record.id.clone())])
            .map_err(|e| format!("C_FindObjects: {e:?}"))
    };
    run.op(thread, Op::Find, || {
        let found = search()?;
        if found.len() == record.classes.len() {
            return Ok(());
        }
        let again = match search() {
            Ok(found) => found.len().to_string(),
            Err(e) => e,
        };
        Err(format!(
            "C_FindObjects of {} found {} objects, expected {} (made at {}; a second search \
             found {again}; on the tokens, each read by a process of its own: {})",
            String::from_utf8_lossy(&record.id),
            found.len(),
            record.classes.len(),
            secs(record.made),
            on_tokens(run, &record.id)
        ))
    });
}

/// How many objects with CKA_ID `id` each member's token holds, as a
/// SoftHSM process of its own reads the token directory (`pkcs11-tool`
/// on SoftHSM, no server): tells a key missing from a token from one a
/// member's server process does not show.
fn on_tokens(run: &Run, id: &[u8]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let counts: Vec<String> = (run.tokens.iter())
        .map(|(name, conf, label)| {
            // This pkcs11-tool lists every object whatever `--id` says: each
            // object's lines start with "... Object; ...", its ID among them.
            let listed = Command::new("pkcs11-tool")
                .args(["--module", SOFTHSM_LIB, "--token-label", label])
                .args(["--login", "--pin", USER_PIN, "--list-objects"])
                .env(SOFTHSM_CONF_ENV, conf)
                .output();
            let count = match listed {
                Ok(out) if out.status.success() => {
                    objects_with_id(&String::from_utf8_lossy(&out.stdout), &hex).to_string()
                }
                Ok(out) => format!("? ({})", String::from_utf8_lossy(&out.stderr).trim()),
                Err(e) => format!("? ({e})"),
            };
            format!("{name} {count}")
        })
        .collect();
    counts.join(", ")
}

/// How many objects of a `pkcs11-tool --list-objects` listing have the
/// CKA_ID `hex`: each object's lines start with "... Object; ...", its
/// "ID:" line among them.
fn objects_with_id(listing: &str, hex: &str) -> usize {
    let mut count = 0;
    let mut in_object = false;
    for line in listing.lines() {
        if line.contains(" Object;") {
            in_object = true;
        } else if let Some(id) = line.trim_start().strip_prefix("ID:") {
            if in_object && id.trim() == hex {
                count += 1;
            }
            in_object = false;
        }
    }
    count
}

/// A failed search's count of the key on each token reads pkcs11-tool's
/// listing: objects by their ID line, whatever else they show.
#[test]
fn a_listing_is_counted_by_id() {
    let listing = "Public Key Object; EC  EC_POINT 256 bits\n  label:      ec1\n  ID:         01\n\
                   Secret Key Object; AES length 32\n  ID:         02\n\
                   Private Key Object; EC\n  label:      ec1\n  ID:         01\n  Usage: sign\n";
    assert_eq!(objects_with_id(listing, "01"), 2);
    assert_eq!(objects_with_id(listing, "02"), 1);
    assert_eq!(objects_with_id(listing, "03"), 0);
}

/// Sleeps [`HEARTBEAT`] at a time until the run stops, recording each
/// wake more than [`LATE`] late: the times this process was not scheduled,
/// during which no member call of it could make progress either (a member
/// the watchdog cut then was starved, not hung).
fn heartbeat(run: &Run) {
    while !run.stop.load(Ordering::Relaxed) {
        let before = Instant::now();
        thread::sleep(HEARTBEAT);
        let late = before.elapsed().saturating_sub(HEARTBEAT);
        if late > LATE {
            run.late_wakes
                .lock()
                .unwrap()
                .push((run.start.elapsed(), late));
        }
    }
}

// ---------------------------------------------------------------------------
// The chaos
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    KillWorker,
    Stall,
    RestartServer,
    Reset,
    Blackhole,
    Pause,
}

/// What the chaos is doing to one member.
#[derive(Default)]
struct Disturbance {
    /// Workers stopped with SIGSTOP, and when they get SIGCONT.
    stalled: Option<(Instant, Vec<u32>)>,
    /// The server is down until then.
    down_until: Option<Instant>,
    /// The relay is black-holed or paused until then.
    path_until: Option<Instant>,
    /// When the last disturbance ended, until the member serves again.
    ended: Option<Instant>,
    /// `callsServed` when the last disturbance ended; `None` if never
    /// disturbed.
    served_at_end: Option<u64>,
}

impl Disturbance {
    fn active(&self) -> bool {
        self.stalled.is_some() || self.down_until.is_some() || self.path_until.is_some()
    }
}

#[derive(Default)]
struct ChaosCounts {
    kills: u64,
    stalls: u64,
    restarts: u64,
    /// Events that found no worker to kill or stop (the member had no
    /// connection at that moment).
    no_worker: u64,
    resets: u64,
    blackholes: u64,
    pauses: u64,
    /// How long events waited for a member they may disturb.
    waited: Duration,
    /// From the end of each disturbance to the member serving again.
    returns: Vec<Duration>,
    /// Time with no member serving.
    outage: Duration,
    /// Each stretch of it: from when (run time), how long.
    outages: Vec<(Duration, Duration)>,
    /// Up -> not up transitions seen through the state API, per member.
    failovers: [u64; 3],
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a worker of a server this test started.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Kills, stalls and restarts members at random until the run stops; then
/// ends every disturbance (SIGCONT, restart). Only a member that serves
/// (up, as the state API says) is disturbed, and only while another one is
/// surely up: a member still recovering is left to finish, so that each
/// event is a failover of a member the load was using.
fn chaos(run: &Run, members: &mut [Member], seed: u64) -> ChaosCounts {
    let mut rng = Rng::new(seed);
    let mut counts = ChaosCounts::default();
    let mut dist: Vec<Disturbance> = (0..members.len()).map(|_| Disturbance::default()).collect();
    let mut was_up = [true; 3];
    let mut next_event = Instant::now() + rng.millis(CHAOS_GAP_MS);
    let mut last_tick = Instant::now();
    let mut outage_since: Option<Instant> = None;
    while !run.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let status = run.state.group();
        for (i, up) in was_up.iter_mut().enumerate() {
            let is_up = status.members[i].state == PKCS11HA_STATE_UP;
            if *up && !is_up {
                counts.failovers[i] += 1;
            }
            *up = is_up;
            if is_up && !dist[i].active() {
                if let Some(ended) = dist[i].ended.take() {
                    counts.returns.push(now.duration_since(ended));
                }
            }
        }
        if !was_up.iter().any(|up| *up) {
            counts.outage += now.duration_since(last_tick);
            outage_since.get_or_insert(last_tick);
        } else if let Some(since) = outage_since.take() {
            counts.outages.push((since - run.start, now - since));
        }
        last_tick = now;
        for (i, d) in dist.iter_mut().enumerate() {
            let served = status.members[i].callsServed;
            if let Some((until, pids)) = &d.stalled {
                if *until <= now {
                    pids.iter().for_each(|pid| signal(*pid, libc::SIGCONT));
                    d.stalled = None;
                    d.served_at_end = Some(served);
                    run.chaos_event(i, "SIGCONT".into());
                }
            }
            if d.down_until.is_some_and(|until| until <= now) {
                if members[i].mend_token() {
                    run.chaos_event(i, "token.object emptied by the kill; restored".into());
                }
                members[i].start();
                d.down_until = None;
                d.served_at_end = Some(served);
                d.ended = Some(now);
                run.chaos_event(i, "server restarted".into());
            }
            if d.path_until.is_some_and(|until| until <= now) {
                members[i].relay.pass();
                d.path_until = None;
                d.served_at_end = Some(served);
                d.ended = Some(now);
                run.chaos_event(i, "path answers again".into());
            }
        }
        if now >= next_event {
            let surely_up = |i: usize, d: &Disturbance| {
                let m = &status.members[i];
                !d.active()
                    && m.state == PKCS11HA_STATE_UP
                    && d.served_at_end
                        .is_none_or(|then| m.callsServed >= then + PROVEN_CALLS)
            };
            let action = match rng.below(6) {
                0 => Action::KillWorker,
                1 => Action::Stall,
                2 => Action::RestartServer,
                3 => Action::Reset,
                4 => Action::Blackhole,
                _ => Action::Pause,
            };
            let first = rng.below(members.len() as u64) as usize;
            let target = (0..members.len())
                .map(|k| (first + k) % members.len())
                .filter(|t| !dist[*t].active() && status.members[*t].state == PKCS11HA_STATE_UP)
                .find(|t| {
                    (0..members.len()).any(|other| other != *t && surely_up(other, &dist[other]))
                });
            match target {
                Some(t) => {
                    disturb(
                        run,
                        &mut members[t],
                        t,
                        &mut dist[t],
                        action,
                        &mut rng,
                        &mut counts,
                    );
                    if !dist[t].active() {
                        dist[t].served_at_end = Some(run.state.group().members[t].callsServed);
                        dist[t].ended = Some(Instant::now());
                    }
                    next_event = now + rng.millis(CHAOS_GAP_MS);
                }
                None => {
                    counts.waited += CHAOS_RETRY;
                    next_event = now + CHAOS_RETRY;
                }
            }
        }
        thread::sleep(CHAOS_TICK);
    }
    if let Some(since) = outage_since {
        counts.outages.push((since - run.start, last_tick - since));
    }
    for (i, d) in dist.iter_mut().enumerate() {
        if let Some((_, pids)) = d.stalled.take() {
            pids.iter().for_each(|pid| signal(*pid, libc::SIGCONT));
            run.chaos_event(i, "SIGCONT (end of run)".into());
        }
        if d.down_until.take().is_some() {
            if members[i].mend_token() {
                run.chaos_event(i, "token.object emptied by the kill; restored".into());
            }
            members[i].start();
            run.chaos_event(i, "server restarted (end of run)".into());
        }
        if d.path_until.take().is_some() {
            members[i].relay.pass();
            run.chaos_event(i, "path answers again (end of run)".into());
        }
    }
    counts
}

fn disturb(
    run: &Run,
    member: &mut Member,
    i: usize,
    d: &mut Disturbance,
    action: Action,
    rng: &mut Rng,
    counts: &mut ChaosCounts,
) {
    let server = member.server.as_ref().expect("an undisturbed member runs");
    match action {
        Action::Reset => {
            member.relay.reset();
            counts.resets += 1;
            run.chaos_event(i, "connections reset".into());
        }
        Action::Blackhole | Action::Pause => {
            let outage = rng.millis(OUTAGE_MS);
            let what = if action == Action::Blackhole {
                member.relay.blackhole();
                counts.blackholes += 1;
                "black-holed"
            } else {
                member.relay.pause();
                counts.pauses += 1;
                "paused"
            };
            run.chaos_event(i, format!("path {what} for {} ms", outage.as_millis()));
            d.path_until = Some(Instant::now() + outage);
        }
        Action::KillWorker => {
            let killed = server.kill_workers();
            if killed.is_empty() {
                counts.no_worker += 1;
                run.chaos_event(i, "kill: no worker".into());
            } else {
                counts.kills += 1;
                run.chaos_event(i, format!("SIGKILL worker {killed:?}"));
                if member.mend_token() {
                    run.chaos_event(i, "token.object emptied by the kill; restored".into());
                }
            }
        }
        Action::Stall => {
            let pids = server.workers();
            if pids.is_empty() {
                counts.no_worker += 1;
                run.chaos_event(i, "stall: no worker".into());
                return;
            }
            let outage = rng.millis(OUTAGE_MS);
            pids.iter().for_each(|pid| signal(*pid, libc::SIGSTOP));
            counts.stalls += 1;
            run.chaos_event(
                i,
                format!("SIGSTOP worker {pids:?} for {} ms", outage.as_millis()),
            );
            d.stalled = Some((Instant::now() + outage, pids));
        }
        Action::RestartServer => {
            let outage = rng.millis(OUTAGE_MS);
            member.stop();
            counts.restarts += 1;
            run.chaos_event(
                i,
                format!("server killed, back in {} ms", outage.as_millis()),
            );
            d.down_until = Some(Instant::now() + outage);
        }
    }
}

// ---------------------------------------------------------------------------
// The end: settle and check
// ---------------------------------------------------------------------------

/// Waits (bounded) until every member is up with nothing pending and
/// serving, driving a few calls so that a dead connection is noticed.
/// Returns how long it took, or `None` on timeout.
fn settle(run: &Run, session: &Session, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut last_served = [0u64; 3];
    let mut good_polls = 0;
    let mut report = started + Duration::from_secs(10);
    while started.elapsed() < limit {
        if Instant::now() >= report {
            report += Duration::from_secs(10);
            println!(
                "soak: settling for {} s; {}",
                started.elapsed().as_secs(),
                describe(&run.state.group())
            );
        }
        for _ in 0..30 {
            run.op(usize::MAX, Op::Settle, || {
                session
                    .generate_random_vec(32)
                    .map(|_| ())
                    .map_err(|e| format!("C_GenerateRandom (settling): {e:?}"))
            });
        }
        let status = run.state.group();
        let all_good = (0..3).all(|i| {
            let m = &status.members[i];
            m.state == PKCS11HA_STATE_UP && m.pendingChanges == 0 && m.callsServed > last_served[i]
        });
        for (i, served) in last_served.iter_mut().enumerate() {
            *served = status.members[i].callsServed;
        }
        good_polls = if all_good { good_polls + 1 } else { 0 };
        if good_polls >= 3 {
            return Some(started.elapsed());
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Per member, through its own pass-through slot: CKA_ID -> the classes of
/// the objects with that ID.
fn member_contents(
    pkcs11: &Pkcs11,
    serial: &str,
) -> Result<HashMap<Vec<u8>, Vec<ObjectClass>>, String> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| format!("C_GetSlotList: {e:?}"))?;
    let slot = slots
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|t| t.serial_number() == serial)
        })
        .ok_or_else(|| format!("no slot shows token {serial}"))?;
    let session = user_session(pkcs11, slot);
    // A reconciliation pass may remove a copy a member held twice between
    // the search and the read (it did in a run); the listing is then
    // taken again, at most LISTINGS times.
    let mut listing = 1;
    loop {
        match list_contents(&session) {
            Err(ListingError::Gone(why)) if listing < LISTINGS => {
                println!("listing {serial} again: {why}");
                listing += 1;
            }
            Err(ListingError::Gone(why) | ListingError::Failed(why)) => return Err(why),
            Ok(contents) => return Ok(contents),
        }
    }
}

/// How many times [`member_contents`] lists a member whose objects go
/// while it lists them.
const LISTINGS: usize = 3;

/// Why a member's objects could not be listed.
enum ListingError {
    /// An object found went before it was read.
    Gone(String),
    /// Any other failure.
    Failed(String),
}

/// CKA_ID -> the classes of the objects with that ID, through `session`.
fn list_contents(session: &Session) -> Result<HashMap<Vec<u8>, Vec<ObjectClass>>, ListingError> {
    let objects = session
        .find_objects(&[Attribute::Token(true)])
        .map_err(|e| ListingError::Failed(format!("C_FindObjects: {e:?}")))?;
    let mut contents: HashMap<Vec<u8>, Vec<ObjectClass>> = HashMap::new();
    for object in objects {
        let attributes = session
            .get_attributes(object, &[AttributeType::Id, AttributeType::Class])
            .map_err(|e| {
                let why = format!("C_GetAttributeValue: {e:?}");
                match e {
                    cryptoki::error::Error::Pkcs11(RvError::ObjectHandleInvalid, _) => {
                        ListingError::Gone(why)
                    }
                    _ => ListingError::Failed(why),
                }
            })?;
        let (mut id, mut class) = (None, None);
        for a in attributes {
            match a {
                Attribute::Id(v) => id = Some(v),
                Attribute::Class(c) => class = Some(c),
                _ => {}
            }
        }
        if let (Some(id), Some(class)) = (id, class) {
            contents.entry(id).or_default().push(class);
        }
    }
    Ok(contents)
}

/// Every recorded key on every member, exactly once per object; and the
/// members whose objects could not be listed.
fn check_keys(
    pkcs11: &Pkcs11,
    members: &[Member],
    keys: &[KeyRecord],
) -> (Vec<String>, Vec<usize>) {
    let mut problems = Vec::new();
    let mut unlisted = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let contents = match member_contents(pkcs11, m.serial()) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{}: cannot list objects: {e}", m.name));
                unlisted.push(i);
                continue;
            }
        };
        for key in keys {
            let mut found = contents.get(&key.id).cloned().unwrap_or_default();
            let mut expected = key.classes.clone();
            found.sort_by_key(|c| u64::from(*c));
            expected.sort_by_key(|c| u64::from(*c));
            if found != expected {
                let names = |classes: &[ObjectClass]| {
                    let names: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
                    format!("[{}]", names.join(", "))
                };
                problems.push(format!(
                    "{}: {} has {}, expected {}",
                    m.name,
                    String::from_utf8_lossy(&key.id),
                    names(&found),
                    names(&expected)
                ));
            }
        }
    }
    (problems, unlisted)
}

/// A member's token as seen from outside the HA library.
struct Outside {
    /// A fresh p11-kit client of the member's server lists the token.
    fresh_client: bool,
    /// SoftHSM itself (`softhsm2-util`, no server) shows the token.
    softhsm: bool,
    /// The token directory's files, without the empty `.lock` files.
    files: Vec<(String, u64)>,
    /// What `pkcs11-tool -L` and `softhsm2-util --show-slots` printed.
    output: String,
}

/// Asks a fresh p11-kit client of the member's own server socket (not the
/// relay, not the HA library's client) and SoftHSM directly whether the
/// member's token is there, and lists its token directory, copying it to
/// `keep`. Tells apart a member the HA library fails to find on a healthy
/// server (its bug) from a token the chaos damaged: a SIGKILL while
/// SoftHSM rewrites `token.object` (every `C_Login` does) leaves it empty,
/// and then no one sees the token (`scripts/kill9-token-survival`).
fn token_from_outside(m: &Member, keep: &Path) -> Outside {
    let run = |command: &mut Command| {
        command.output().map_or_else(
            |e| format!("cannot run: {e}"),
            |o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            },
        )
    };
    let listed = run(Command::new("pkcs11-tool")
        .args(["--module", &p11kit::client_module(), "-L"])
        .env(
            p11kit::ADDRESS_ENV,
            format!("unix:path={}", m.socket.display()),
        ));
    let shown = run(m.hsm.util().arg("--show-slots"));
    let mut files = Vec::new();
    let token_dir = m.hsm.token_dir();
    for dir in fs::read_dir(&token_dir).into_iter().flatten().flatten() {
        let target = keep
            .join(format!("{}-tokens", m.name))
            .join(dir.file_name());
        let _ = fs::create_dir_all(&target);
        for file in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let _ = fs::copy(file.path(), target.join(&name));
            let size = file.metadata().map_or(0, |md| md.len());
            if !name.ends_with(".lock") {
                files.push((name, size));
            }
        }
    }
    files.sort();
    Outside {
        fresh_client: listed
            .lines()
            .any(|l| l.starts_with("  serial num") && l.trim_end().ends_with(m.serial())),
        softhsm: parse_show_slots(&shown)
            .iter()
            .any(|t| t.serial == m.serial()),
        files,
        output: format!("pkcs11-tool -L:\n{listed}softhsm2-util --show-slots:\n{shown}"),
    }
}

/// Lines of the HA log (every file under `dir`), and counts by event.
fn ha_log_counts(dir: &Path) -> (usize, Vec<(&'static str, usize)>) {
    let mut text = String::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            text.push_str(&fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    let kinds = [
        ("member failed", "member failed in"),
        ("memberTimeout", "answered nothing"),
        ("recovery attempts", "recovery attempt"),
        ("recovered", "member recovered"),
        ("recovery failed", "recovery failed"),
        ("not replayed", "could not be replayed"),
        ("not synchronised", "could not be synchronised"),
        (
            "left to reconciliation",
            "to reconciliation: calls making objects",
        ),
        ("login lost", "lost its login"),
    ];
    let counts = kinds
        .iter()
        .map(|(name, needle)| (*name, text.lines().filter(|l| l.contains(needle)).count()))
        .collect();
    (text.lines().count(), counts)
}

/// When an HA log line was written: its leading `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn log_line_time(line: &str) -> Option<SystemTime> {
    let field = |range: std::ops::Range<usize>| -> Option<u64> { line.get(range)?.parse().ok() };
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second, milli) = (
        field(11..13)?,
        field(14..16)?,
        field(17..19)?,
        field(20..23)?,
    );
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    // days_from_civil), for years after 1970.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let secs = ((days * 24 + hour) * 60 + minute) * 60 + second;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(milli))
}

/// The HA log's lines (every file under `dir`) written between `from` and
/// `to` of run time, each with its run time in front and the group's
/// label and serial left out, in order.
fn ha_log_between(dir: &Path, wall_start: SystemTime, from: Duration, to: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        for line in fs::read_to_string(entry.path()).unwrap_or_default().lines() {
            let Some(at) = log_line_time(line).and_then(|t| t.duration_since(wall_start).ok())
            else {
                continue;
            };
            if (from..=to).contains(&at) {
                let rest = line.get(24..).unwrap_or_default();
                let rest = rest.split_once(" member=").map_or(rest, |(_, r)| r);
                lines.push((at, format!("{} member={rest}", secs(at))));
            }
        }
    }
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

/// The HA log's "member failed" lines that no chaos event on that member
/// in the [`PROVOKED_WITHIN`] before explains: a member that failed by
/// itself, which the chaos takes for surely up. Each with its run time,
/// member and the last chaos event on it.
fn unprovoked_failures(
    dir: &Path,
    wall_start: SystemTime,
    serials: &[&str],
    chaos: &[ChaosEvent],
    late_wakes: &[(Duration, Duration)],
) -> Vec<String> {
    let lines = ha_log_between(dir, wall_start, Duration::ZERO, Duration::MAX);
    let mut unprovoked = Vec::new();
    // Every member failure so far: when, whose, in what.
    let mut failed: Vec<(Duration, usize, String)> = Vec::new();
    for line in lines {
        let Some((at, rest)) = line.split_once(" s member=") else {
            continue;
        };
        let (Ok(at), Some((serial, what))) = (at.parse::<f64>(), rest.split_once(' ')) else {
            continue;
        };
        let Some(i) = serials.iter().position(|s| *s == serial) else {
            continue;
        };
        if !what.starts_with("member failed in ") {
            continue;
        }
        let at = Duration::from_secs_f64(at);
        let function = what.trim_start_matches("member failed in ");
        let function = function.split(' ').next().unwrap_or_default().to_string();
        let other = failed
            .iter()
            .rev()
            .find(|(_, m, _)| *m != i)
            .map(|(then, m, f)| {
                format!(
                    "; {} ms after {} failed in {f}",
                    (at - *then).as_millis(),
                    MEMBERS[*m]
                )
            });
        failed.push((at, i, function));
        let last = chaos
            .iter()
            .rev()
            .find(|e| e.member == i && e.at <= at + EVENT_LAG);
        if last.is_some_and(|e| e.at + PROVOKED_WITHIN >= at) {
            continue;
        }
        // The process asleep in the memberTimeout before: its calls could
        // not complete then.
        let window = at.saturating_sub(Duration::from_millis(MEMBER_TIMEOUT_MS))..at + LATE;
        let starved = late_wakes
            .iter()
            .filter(|(woke, late)| woke.saturating_sub(*late) < window.end && *woke > window.start)
            .map(|(_, late)| *late)
            .max()
            .unwrap_or_default();
        unprovoked.push(format!(
            "{} {}: {what}; the last chaos on it: {}{}; the heartbeat woke {} ms late at most in the {} ms before",
            secs(at),
            MEMBERS[i],
            last.map_or("none".into(), |e| format!("{} at {}", e.what, secs(e.at))),
            other.unwrap_or_default(),
            starved.as_millis(),
            MEMBER_TIMEOUT_MS
        ));
    }
    unprovoked
}

/// Failed searches whose HA log lines are printed.
const FINDS_DETAILED: usize = 10;
/// How far before a failed search its HA log lines start.
const LOG_BEFORE_FIND: Duration = Duration::from_secs(2);

/// The HA log lines from [`LOG_BEFORE_FIND`] before failure `f` to its end.
fn ha_log_near(dir: &Path, wall_start: SystemTime, f: &Failure) -> Vec<String> {
    let to = f.at + f.latency + Duration::from_millis(1);
    ha_log_between(dir, wall_start, f.at.saturating_sub(LOG_BEFORE_FIND), to)
}

/// A failure with the numbers (key IDs, handles) taken out, to group by.
fn failure_kind(f: &Failure) -> String {
    let error: String = f
        .error
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    format!("{:?}: {error}", f.op)
}

/// One failure with the group's state then and the chaos events before it.
fn failure_detail(f: &Failure, chaos: &[ChaosEvent]) -> String {
    let before: Vec<String> = chaos
        .iter()
        .filter(|e| e.at <= f.at + f.latency)
        .rev()
        .take(3)
        .map(|e| format!("{} {}: {}", secs(e.at), MEMBERS[e.member], e.what))
        .collect();
    let thread = if f.thread == usize::MAX {
        "main".to_string()
    } else {
        f.thread.to_string()
    };
    format!(
        "  at {} thread {thread} {:?} after {}: {}\n    state: {}\n    chaos before: {before:?}",
        secs(f.at),
        f.op,
        secs(f.latency),
        f.error,
        f.state,
    )
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn soak_mixed_load_while_members_are_killed_stalled_and_restarted() {
    let duration = Duration::from_secs(
        env::var(SECS_ENV)
            .ok()
            .map(|v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{SECS_ENV}={v:?}"))
            })
            .unwrap_or(DEFAULT_SECS),
    );
    let seed = seed();
    println!(
        "soak: {} s, seed {seed:#x} ({SEED_ENV} repeats it), {THREADS} threads, \
         {} p11-kit members, memberTimeout {MEMBER_TIMEOUT_MS} ms",
        duration.as_secs(),
        MEMBERS.len()
    );
    let _guard = serial_guard();
    let work = tempfile::Builder::new()
        .prefix("pkcs11-ha-soak-")
        .tempdir()
        .expect("temp dir");
    let mut members: Vec<Member> = MEMBERS
        .iter()
        .map(|n| Member::new(n, work.path()))
        .collect();
    env::remove_var(SOFTHSM_CONF_ENV);
    for m in &mut members {
        m.start();
    }
    let log_dir = work.path().join("halog");
    fs::create_dir(&log_dir).unwrap();
    let config = work.path().join("soak.conf");
    fs::write(&config, config_text(&members, &log_dir)).unwrap();
    activate_config(&config);
    let pkcs11 = load_ha();
    initialize(&pkcs11).expect("C_Initialize over three p11-kit servers");

    let run = Run {
        start: Instant::now(),
        wall_start: SystemTime::now(),
        stop: AtomicBool::new(false),
        state: StateApi::new(),
        stats: Default::default(),
        slowest: Mutex::new((Duration::ZERO, None)),
        failures: Mutex::new(Vec::new()),
        chaos: Mutex::new(Vec::new()),
        keys: Mutex::new(Vec::new()),
        ec_keys: RwLock::new(Vec::new()),
        aes_keys: RwLock::new(Vec::new()),
        next_id: AtomicU64::new(0),
        ec_pool: ec_pool(),
        late_wakes: Mutex::new(Vec::new()),
        tokens: members
            .iter()
            .map(|m| (m.name, m.hsm.conf.clone(), m.hsm.tokens[0].label.clone()))
            .collect(),
    };
    let status = run.state.group();
    assert!(
        (0..3).all(|i| status.members[i].state == PKCS11HA_STATE_UP),
        "every member up at the start: {}",
        describe(&status)
    );
    // Held for the whole run: the group stays logged in while it lives.
    let main = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    let mut rng = Rng::new(seed);
    for _ in 0..2 {
        run.import_ec(&main, usize::MAX, &mut rng);
        run.import_aes(&main, usize::MAX);
    }
    assert_eq!(run.total_failures(), 0, "the first keys imported");

    let (iterations, counts) = thread::scope(|scope| {
        let loaders: Vec<_> = (0..THREADS)
            .map(|t| {
                let (run, pkcs11) = (&run, &pkcs11);
                scope.spawn(move || load(run, pkcs11, t, seed))
            })
            .collect();
        let controller = {
            let (run, members) = (&run, &mut members);
            scope.spawn(move || chaos(run, members, seed.rotate_left(17)))
        };
        let run_ref = &run;
        scope.spawn(move || heartbeat(run_ref));
        let end = run.start + duration;
        let mut report = run.start + Duration::from_secs(10);
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(200).min(end - Instant::now().min(end)));
            if Instant::now() >= report && Instant::now() < end {
                report += Duration::from_secs(10);
                println!(
                    "soak: {:>5} s: {} ops, {} failed, {} keys, chaos events {}; {}",
                    run.start.elapsed().as_secs(),
                    run.total_ops(),
                    run.total_failures(),
                    run.keys.lock().unwrap().len(),
                    run.chaos.lock().unwrap().len(),
                    describe(&run.state.group())
                );
            }
        }
        run.stop.store(true, Ordering::Relaxed);
        let iterations: u64 = loaders.into_iter().map(|l| l.join().unwrap()).sum();
        (iterations, controller.join().unwrap())
    });
    let elapsed = run.start.elapsed();
    let load_ops = run.total_ops();

    let settled = settle(&run, &main, SETTLE_BASE + duration / 2);
    let status = run.state.group();
    let keys = run.keys.lock().unwrap().clone();
    let (key_problems, unlisted) = check_keys(&pkcs11, &members, &keys);
    // Members the HA library does not have back, seen from outside it.
    let outside: Vec<(usize, Outside)> = (0..MEMBERS.len())
        .filter(|i| unlisted.contains(i) || status.members[*i].state != PKCS11HA_STATE_UP)
        .map(|i| (i, token_from_outside(&members[i], work.path())))
        .collect();
    let (log_lines, log_counts) = ha_log_counts(&log_dir);

    // The summary.
    println!("\n==== soak summary ====");
    println!("seed                {seed:#x}");
    let started = run
        .wall_start
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "started             {:02}:{:02}:{:02}.{:03} UTC (the HA log's times)",
        started.as_secs() / 3600 % 24,
        started.as_secs() / 60 % 60,
        started.as_secs() % 60,
        started.subsec_millis()
    );
    println!(
        "load                {} ({THREADS} threads, {iterations} iterations)",
        secs(elapsed)
    );
    println!(
        "operations          {load_ops} ({:.0}/s), failed {}",
        load_ops as f64 / elapsed.as_secs_f64(),
        run.total_failures()
    );
    for op in OPS {
        let s = &run.stats[op as usize];
        println!(
            "  {:<16}  {:>9}  failed {:>3}  >250ms {:>4}  max {:>9.1} ms",
            format!("{op:?}"),
            s.count.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.slow.load(Ordering::Relaxed),
            s.max_us.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
    let (slowest, which) = *run.slowest.lock().unwrap();
    println!(
        "max latency         {} ({})",
        secs(slowest),
        which.map_or("-".into(), |(op, at)| format!("{op:?} at {}", secs(at)))
    );
    println!(
        "chaos               {} worker kills, {} stalls, {} server restarts, {} resets, \
         {} black holes, {} pauses, {} without a worker; events waited {} for a member to disturb",
        counts.kills,
        counts.stalls,
        counts.restarts,
        counts.resets,
        counts.blackholes,
        counts.pauses,
        counts.no_worker,
        secs(counts.waited)
    );
    let mut returns = counts.returns.clone();
    returns.sort();
    let percentile = |p: usize| {
        returns
            .get((returns.len() * p / 100).min(returns.len().saturating_sub(1)))
            .map_or("-".into(), |d| secs(*d))
    };
    println!(
        "back in service     {} returns: p50 {}, p99 {}, max {}",
        returns.len(),
        percentile(50),
        percentile(99),
        returns.last().map_or("-".into(), |d| secs(*d))
    );
    println!(
        "no member serving   {} in {} stretches",
        secs(counts.outage),
        counts.outages.len()
    );
    println!(
        "failovers           {} (state API, up -> down per member: {:?})",
        counts.failovers.iter().sum::<u64>(),
        counts.failovers
    );
    println!("HA log              {log_lines} lines: {log_counts:?}");
    let serials: Vec<&str> = members.iter().map(Member::serial).collect();
    let late_wakes = run.late_wakes.lock().unwrap().clone();
    let unprovoked = unprovoked_failures(
        &log_dir,
        run.wall_start,
        &serials,
        &run.chaos.lock().unwrap(),
        &late_wakes,
    );
    let longest = late_wakes.iter().max_by_key(|(_, late)| *late);
    println!(
        "heartbeat           {} wakes more than {} ms late (of {} ms sleeps){}",
        late_wakes.len(),
        LATE.as_millis(),
        HEARTBEAT.as_millis(),
        longest.map_or(String::new(), |(at, late)| format!(
            ", the longest {} ms late at {}",
            late.as_millis(),
            secs(*at)
        ))
    );
    println!(
        "member failures the chaos did not cause (none on that member in the {} before): {}",
        secs(PROVOKED_WITHIN),
        unprovoked.len()
    );
    for line in unprovoked.iter().take(UNPROVOKED_SHOWN) {
        println!("  {line}");
    }
    let ec = keys.iter().filter(|k| k.classes.len() == 2).count();
    println!(
        "keys                {} imported ({ec} EC pairs, {} AES)",
        keys.len(),
        keys.len() - ec
    );
    println!(
        "settled             {}",
        settled.map_or("NO (timed out)".into(), secs)
    );
    println!("final state         {}", describe(&status));
    println!(
        "keys on members     {}",
        if key_problems.is_empty() {
            "all present, once each, on every member".to_string()
        } else {
            format!("{} problems", key_problems.len())
        }
    );
    let failures = run.failures.lock().unwrap();
    let chaos_log = run.chaos.lock().unwrap();
    if !failures.is_empty() {
        println!("failures ({}), by kind:", failures.len());
        let mut kinds: Vec<(String, Vec<&Failure>)> = Vec::new();
        for f in failures.iter() {
            let kind = failure_kind(f);
            match kinds.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, list)) => list.push(f),
                None => kinds.push((kind, vec![f])),
            }
        }
        for (kind, list) in &kinds {
            let first = list.iter().map(|f| f.at).min().unwrap_or_default();
            let last = list.iter().map(|f| f.at).max().unwrap_or_default();
            println!(
                "  {:>5} x {kind} (from {} to {})",
                list.len(),
                secs(first),
                secs(last)
            );
        }
        println!("the first {FAILURES_SHOWN} of each kind:");
        for (_, list) in &kinds {
            for f in list.iter().take(FAILURES_SHOWN) {
                println!("{}", failure_detail(f, &chaos_log));
            }
        }
        let finds: Vec<&Failure> = failures.iter().filter(|f| f.op == Op::Find).collect();
        for f in finds.iter().take(FINDS_DETAILED) {
            println!(
                "HA log around the failed search at {} (thread {}: {}):",
                secs(f.at),
                f.thread,
                f.error
            );
            for line in ha_log_near(&log_dir, run.wall_start, f) {
                println!("  {line}");
            }
        }
    }
    if !key_problems.is_empty() {
        println!("key problems (first 40):");
        for p in key_problems.iter().take(40) {
            println!("  {p}");
        }
    }
    if !failures.is_empty()
        || !key_problems.is_empty()
        || settled.is_none()
        || !counts.outages.is_empty()
    {
        println!("chaos events:");
        for e in chaos_log.iter() {
            println!("  {} {}: {}", secs(e.at), MEMBERS[e.member], e.what);
        }
    }
    // Each stretch with no member serving, with what led to it.
    for (from, length) in counts.outages.iter().take(OUTAGES_SHOWN) {
        println!(
            "no member serving from {} for {}; chaos events in the {} before:",
            secs(*from),
            secs(*length),
            secs(OUTAGE_CONTEXT)
        );
        for e in chaos_log
            .iter()
            .filter(|e| e.at + OUTAGE_CONTEXT >= *from && e.at <= *from + *length)
        {
            println!("  {} {}: {}", secs(e.at), MEMBERS[e.member], e.what);
        }
        println!("  HA log:");
        let window = from.saturating_sub(OUTAGE_CONTEXT)..=*from + *length + CHAOS_TICK * 5;
        for line in ha_log_between(&log_dir, run.wall_start, *window.start(), *window.end()) {
            println!("  | {line}");
        }
    }
    for (i, o) in &outside {
        println!(
            "{} from outside the HA library: fresh p11-kit client sees its token: {}; SoftHSM itself: {}",
            MEMBERS[*i], o.fresh_client, o.softhsm
        );
        let empty: Vec<&str> = o
            .files
            .iter()
            .filter(|(_, size)| *size == 0)
            .map(|(name, _)| name.as_str())
            .collect();
        println!(
            "  token directory (copied to {}-tokens in the work dir): {} files, empty: {empty:?}",
            MEMBERS[*i],
            o.files.len()
        );
        // The token's own files; each object has a <uuid>.object.
        for (name, size) in o
            .files
            .iter()
            .filter(|(name, _)| name == "token.object" || !name.ends_with(".object"))
        {
            println!("    {name} {size} bytes");
        }
        for line in o.output.lines() {
            println!("  | {line}");
        }
    }
    let mut verdict = Vec::new();
    for (i, o) in &outside {
        verdict.push(match (o.fresh_client, o.softhsm) {
            (true, _) => format!(
                "{}: a fresh client sees its token on its server, the HA library does not have it back (the HA library's fault)",
                MEMBERS[*i]
            ),
            (false, true) => format!(
                "{}: SoftHSM shows its token but a fresh client of its server does not (the server's fault)",
                MEMBERS[*i]
            ),
            (false, false) => format!(
                "{}: SoftHSM itself no longer shows its token (token.object: {}): a SIGKILL of the chaos while SoftHSM rewrote it (at each C_Login) damaged it; a harness limit, not the HA library's fault, and the member cannot come back",
                MEMBERS[*i],
                o.files
                    .iter()
                    .find(|(name, _)| name == "token.object")
                    .map_or("missing".into(), |(_, size)| format!("{size} bytes"))
            ),
        });
    }
    if !failures.is_empty() {
        verdict.push(format!("{} failed application operations", failures.len()));
    }
    if settled.is_none() {
        verdict.push(format!(
            "the members were not all up with nothing pending in time: {}",
            describe(&status)
        ));
    }
    if !key_problems.is_empty() {
        verdict.push(format!(
            "{} keys missing or duplicated on members",
            key_problems.len()
        ));
    }
    if counts.outage > Duration::ZERO {
        verdict.push(format!(
            "no member served for {} although the chaos always left one alone",
            secs(counts.outage)
        ));
    }
    let events = counts.kills
        + counts.stalls
        + counts.restarts
        + counts.resets
        + counts.blackholes
        + counts.pauses;
    if events == 0 && duration >= Duration::from_secs(10) {
        verdict.push("the chaos did nothing".into());
    }
    drop((failures, chaos_log));

    drop(main);
    pkcs11.finalize().expect("C_Finalize");
    env::remove_var(CONF_ENV);
    drop(members);
    if !verdict.is_empty() {
        // The evidence: tokens, server logs, the HA log.
        println!("work dir kept in {}", work.keep().display());
    }
    assert!(
        verdict.is_empty(),
        "soak failed (details above): {verdict:#?}"
    );
}
