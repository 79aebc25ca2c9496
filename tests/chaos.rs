//! Chaos scenarios: SoftHSM members, each exported by a `p11-kit server`
//! and reached through p11-kit's client and a fault relay
//! (tests/common/relay.rs), the way a network HSM is reached over a path
//! that can stall, drop and reset.
//!
//! Start-up bounds are correctness deadlines, not performance targets:
//! `memberTimeout` plus a margin generous enough for a loaded machine.
//! The times measured are printed (`--nocapture` shows them).

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;
#[path = "common/relay.rs"]
mod relay;

use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::slot::Slot;
use p11kit::P11KitServer;
use pkcs11_ha::state_api::{PKCS11HA_GROUP_STATUS, PKCS11HA_STATE_RECOVERING, PKCS11HA_STATE_UP};
use relay::Relay;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

/// `memberTimeout` of the scenarios, in ms.
const MEMBER_TIMEOUT_MS: u64 = 1500;
/// What a start-up may take beyond `memberTimeout` before the test calls
/// it wrong. The target is 0.5 s; the rest is room for a loaded machine.
const MARGIN: Duration = Duration::from_millis(2500);
/// SHA-256 of "abc".
const SHA256_ABC: [u8; 32] = [
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
    0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
];

fn member_timeout() -> Duration {
    Duration::from_millis(MEMBER_TIMEOUT_MS)
}

/// One member: its token, its server, and the relay in front of it.
/// Fields drop in order: the relay's connections close before the server
/// dies, and the token directory goes last.
struct Member {
    relay: Relay,
    /// `None` while killed.
    server: Option<P11KitServer>,
    hsm: SoftHsm,
}

impl Member {
    fn socket(&self) -> PathBuf {
        self.hsm.dir.path().join("server.sock")
    }

    fn server(&self) -> &P11KitServer {
        self.server.as_ref().expect("the member's server runs")
    }

    /// Kills the server and its workers (`kill -9` of the whole member).
    fn kill_server(&mut self) {
        self.server.take();
    }

    /// Starts the server again on its socket.
    fn restart_server(&mut self) {
        // Gone before the new one starts: a live old server's socket would
        // pass for the new one's (`p11kit::listening`).
        self.server.take();
        let _ = std::fs::remove_file(self.socket());
        let label = &self.hsm.tokens[0].label;
        self.server = Some(P11KitServer::start(
            SOFTHSM_LIB,
            &self.hsm.conf,
            label,
            &self.socket(),
        ));
    }
}

/// A group of members reached only through their relays, with the HA log
/// on. Not initialised until [`Chaos::start`].
struct Chaos {
    members: Vec<Member>,
    config: PathBuf,
    log_dir: PathBuf,
    /// Finalised on drop if a test ended early, so that the next test can
    /// initialise.
    started: Option<Pkcs11>,
    _guard: MutexGuard<'static, ()>,
}

impl Chaos {
    fn new(n: usize) -> Chaos {
        Chaos::with_settings(n, MEMBER_TIMEOUT_MS, "")
    }

    /// `n` members under `memberTimeout = member_timeout_ms`, with `more`
    /// lines in `[HAConfiguration]` (`AutoReconnectInterval` is 1 s unless
    /// they set it).
    fn with_settings(n: usize, member_timeout_ms: u64, more: &str) -> Chaos {
        let guard = serial_guard();
        // Library entries are loaded once per process, and p11-kit's client
        // reads its server's address when loaded: a name of their own per
        // group makes this group's entries new instances.
        static GROUPS: AtomicUsize = AtomicUsize::new(0);
        let group = GROUPS.fetch_add(1, Ordering::Relaxed);
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let label = format!("chaos{i}");
                let hsm = SoftHsm::new(&[&label]);
                provision_domain(&hsm, &DOMAIN_VALUE);
                let dir = hsm.dir.path();
                let server =
                    P11KitServer::start(SOFTHSM_LIB, &hsm.conf, &label, &dir.join("server.sock"));
                let relay = Relay::start(&dir.join("relay.sock"), &server.socket);
                Member {
                    relay,
                    server: Some(server),
                    hsm,
                }
            })
            .collect();
        let dir = members[0].hsm.dir.path().to_path_buf();
        let log_dir = dir.join("halog");
        std::fs::create_dir(&log_dir).unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("g{group}m{i}")).collect();
        let client_module = p11kit::client_module();
        let mut text = String::from("[Libraries]\n");
        for name in &names {
            text += &format!("{name} = {client_module}\n");
        }
        text += "\n[LibraryEnvironment]\n";
        for (name, member) in names.iter().zip(&members) {
            text += &format!(
                "{name}.P11_KIT_SERVER_ADDRESS = {}\n",
                member.relay.address()
            );
        }
        let serials: Vec<String> = members
            .iter()
            .map(|m| m.hsm.tokens[0].serial.clone())
            .collect();
        let interval = if more.contains("AutoReconnectInterval") {
            ""
        } else {
            "AutoReconnectInterval = 1\n"
        };
        text += &format!(
            "\n[VirtualToken]\nVirtualToken00Label = {GROUP_LABEL}\nVirtualToken00Members = {}\n\
             \n[HAConfiguration]\nmemberTimeout = {member_timeout_ms}\n{interval}\
             haLogStatus = enabled\nhaLogPath = {}\n{more}",
            serials.join(","),
            log_dir.display()
        );
        let config = dir.join("chaos.conf");
        std::fs::write(&config, text).unwrap();
        Chaos {
            members,
            config,
            log_dir,
            started: None,
            _guard: guard,
        }
    }

    /// Loads and initialises pkcs11-ha; returns it and how long
    /// `C_Initialize` took.
    fn start(&mut self) -> (Pkcs11, Duration) {
        activate_config(&self.config);
        let pkcs11 = load_ha();
        let started = Instant::now();
        initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
        let took = started.elapsed();
        self.started = Some(pkcs11.clone());
        (pkcs11, took)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.join("haErrorLog.txt")).unwrap_or_default()
    }

    /// What SoftHSM itself shows of each member's token directory, to tell
    /// a token a crash left uninitialised from a member that does not
    /// return.
    fn tokens(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let out = show_slots(m);
                let labels: Vec<&str> = out
                    .lines()
                    .filter(|l| l.contains("Label:") || l.contains("Initialized:"))
                    .map(str::trim)
                    .collect();
                format!("{}: {}", m.hsm.tokens[0].label, labels.join("; "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether SoftHSM, read directly, no longer shows member `i`'s token
    /// (its slot's token is uninitialised): SoftHSM can leave a token so
    /// when it is killed while writing a token object
    /// (`testing-notes.md`), and no HA layer can bring such a member back.
    fn token_lost(&self, i: usize) -> bool {
        let member = &self.members[i];
        let label = member.hsm.tokens[0].label.as_str();
        !show_slots(member).lines().any(|line| {
            line.trim()
                .strip_prefix("Label:")
                .is_some_and(|l| l.trim() == label)
        })
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        if let Some(pkcs11) = self.started.take() {
            // Already finalised when the test ran to its end.
            let _ = pkcs11.finalize();
        }
        std::env::remove_var(CONF_ENV);
    }
}

/// What the application does first: list the slots, read the virtual
/// token, open a session, log in, and digest. Returns how long each step
/// had taken since `started`, by name.
fn first_operation(pkcs11: &Pkcs11, started: Instant) -> Vec<(&'static str, Duration)> {
    let mut times = Vec::new();
    let slots = pkcs11.get_slots_with_token().expect("C_GetSlotList");
    times.push(("C_GetSlotList", started.elapsed()));
    let slot = Slot::try_from(0u64).unwrap();
    assert!(
        slots.contains(&slot),
        "the virtual slot is listed: {slots:?}"
    );
    pkcs11.get_slot_info(slot).expect("C_GetSlotInfo");
    let token = pkcs11.get_token_info(slot).expect("C_GetTokenInfo");
    assert_eq!(token.label(), GROUP_LABEL);
    times.push(("C_GetTokenInfo", started.elapsed()));
    let session = user_session(pkcs11, slot);
    times.push(("C_OpenSession+C_Login", started.elapsed()));
    let digest = session
        .digest(&Mechanism::Sha256, b"abc")
        .expect("C_Digest");
    assert_eq!(digest, SHA256_ABC);
    times.push(("first C_Digest", started.elapsed()));
    times
}

/// Starts the group with the members in `silent` black-holed (their relays
/// accept and never answer) and checks that the first operation completes
/// within one `memberTimeout` plus the margin.
fn start_with_silent_members(n: usize, silent: &[usize]) {
    let mut chaos = Chaos::new(n);
    for &i in silent {
        chaos.members[i].relay.blackhole();
    }
    let started = Instant::now();
    let (pkcs11, init) = chaos.start();
    let mut times = vec![("C_Initialize", init)];
    times.extend(first_operation(&pkcs11, started));
    eprintln!("{n} members, {} silent: {times:?}", silent.len());
    let bound = member_timeout() + MARGIN;
    for (step, took) in &times {
        assert!(
            *took < bound,
            "{step} done {took:?} after start, beyond memberTimeout + margin ({bound:?})"
        );
    }
    let log = chaos.log();
    for &i in silent {
        assert!(
            chaos.members[i].relay.accepted() > 0,
            "member {i} was asked at all"
        );
        let serial = &chaos.members[i].hsm.tokens[0].serial;
        assert!(
            log.lines()
                .any(|l| l.contains(serial.as_str()) && l.contains("not found at start")),
            "the HA log names the silent member {serial}: {log}"
        );
    }
    pkcs11.finalize().unwrap();
}

#[test]
fn starts_and_serves_with_one_member_silent() {
    start_with_silent_members(3, &[1]);
}

/// Two silent members cost one `memberTimeout`, not two: members are
/// initialised at once, each under its own deadline.
#[test]
fn starts_and_serves_with_all_but_one_member_silent() {
    start_with_silent_members(3, &[0, 2]);
}

/// A C application that keeps `SIGPIPE` at its default disposition starts
/// while a member's path accepts, greets and closes, so that the member
/// library's first `C_Initialize` writes to a closed connection: the
/// application lives, and the group starts without that member.
#[test]
fn a_member_closing_during_its_first_initialize_does_not_kill_a_c_application() {
    let mut chaos = Chaos::new(2);
    chaos.members[1].relay.accept_and_close();
    let dir = chaos.members[0].hsm.dir.path().to_path_buf();
    let program = build_c_program("startup_sigpipe", &dir);
    let output = Command::new(&program)
        .arg(library_path())
        .env(CONF_ENV, &chaos.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the application ended with {}; it printed {stdout:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["initialize rv=0x0", "slots rv=0x0", "alive"]
    );
    assert!(
        chaos.members[1].relay.accepted() > 0,
        "the closing member was reached"
    );
}

/// The CLI with one member silent: `slots`, `group list` and `status`
/// answer within their `--timeout` plus the margin and show that library
/// as not answering and the member as down because of it; `status` calls
/// the group degraded (exit status 1).
#[test]
fn cli_answers_within_its_timeout_with_one_member_silent() {
    let mut chaos = Chaos::new(2);
    chaos.members[1].relay.blackhole();
    let silent_serial = chaos.members[1].hsm.tokens[0].serial.clone();
    let healthy_serial = chaos.members[0].hsm.tokens[0].serial.clone();
    let timeout = MEMBER_TIMEOUT_MS.to_string();
    let verbs: [(&[&str], i32); 3] = [
        (&["slots"], 0),
        (&["group", "list", "--no-login"], 0),
        (&["status"], 1),
    ];
    for (verb, exit_status) in verbs {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_pkcs11-ha"))
            .args(verb)
            .args(["--timeout", &timeout, "--config"])
            .arg(&chaos.config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("pkcs11-ha {verb:?} with one member silent: {took:?}");
        assert_eq!(
            output.status.code(),
            Some(exit_status),
            "{verb:?}: {stdout}{stderr}"
        );
        assert!(
            took < member_timeout() + MARGIN,
            "{verb:?} took {took:?}, beyond --timeout + margin"
        );
        assert!(stdout.contains(&healthy_serial), "{verb:?}: {stdout}");
        if verb[0] == "slots" {
            assert!(
                stderr.contains("not answering"),
                "{verb:?} says which library is not answering: {stderr}"
            );
            assert!(!stdout.contains(&silent_serial), "{stdout}");
        } else {
            let row = stdout
                .lines()
                .find(|l| l.contains(&silent_serial) && !l.starts_with("Group"))
                .unwrap_or_else(|| panic!("{verb:?}: no row for the silent member: {stdout}"));
            assert!(
                row.contains("down") && row.contains("not answering"),
                "{verb:?}: {row}"
            );
        }
        if verb[0] == "status" {
            assert!(stdout.contains("degraded"), "{stdout}");
        }
    }
}

/// `PKCS11HA_GetGroupStatus` of group 0, through the exported symbol.
fn group_status() -> PKCS11HA_GROUP_STATUS {
    // SAFETY: the symbol has this signature; the library is loaded.
    unsafe {
        let library = libloading::Library::new(library_path()).unwrap();
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64> =
            library.get(b"PKCS11HA_GetGroupStatus\0").unwrap();
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), 0);
        status
    }
}

/// `softhsm2-util --show-slots` on a member's token directory.
fn show_slots(member: &Member) -> String {
    Command::new("softhsm2-util")
        .arg("--show-slots")
        .env(SOFTHSM_CONF_ENV, &member.hsm.conf)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("softhsm2-util: {e}"))
}

/// Whether member `i` of group 0 serves (state 0).
fn serves(i: usize) -> bool {
    group_status().members[i].state == 0
}

/// Polls `condition` until it holds, failing with `what` after `limit`;
/// returns how long it took.
fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Digests on the virtual slot, each answered by the other members, until
/// member `i` is taken out (`what`), for `limit` at most.
fn digest_until_out(session: &cryptoki::session::Session, i: usize, what: &str, limit: Duration) {
    wait_for(what, limit, || {
        session
            .digest(&Mechanism::Sha256, b"abc")
            .expect("C_Digest on the other members");
        !serves(i)
    });
}

/// Digests on the virtual slot until member `i` has served `calls` more.
fn digest_until_served(session: &cryptoki::session::Session, i: usize, calls: u64) {
    let before = group_status().members[i].callsServed;
    wait_for("the member serves calls", Duration::from_secs(10), || {
        let digest = session
            .digest(&Mechanism::Sha256, b"abc")
            .expect("C_Digest");
        assert_eq!(digest, SHA256_ABC);
        group_status().members[i].callsServed >= before + calls
    });
}

/// A member silent at start joins once its path answers again: the
/// initialisation that never answered was cut off, and recovery
/// initialises the library afresh.
#[test]
fn a_member_silent_at_start_joins_once_its_path_answers() {
    joins_once_its_path_answers("silent", Relay::blackhole);
}

/// A member whose path refuses connections at start (its host gone from
/// the network) joins once it accepts again: p11-kit's client initialises
/// with no slot then, and recovery initialises it again until its token
/// is listed.
#[test]
fn a_member_refusing_at_start_joins_once_its_path_accepts() {
    joins_once_its_path_answers("refusing", Relay::refuse);
}

/// Starts two members, member 1's path set by `fault`; once the group
/// serves without it, the path passes again and member 1 joins and serves.
fn joins_once_its_path_answers(what: &str, fault: fn(&mut Relay)) {
    let mut chaos = Chaos::new(2);
    fault(&mut chaos.members[1].relay);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    assert!(!serves(1));
    chaos.members[1].relay.pass();
    let took = wait_for(
        &format!("the member {what} at start rejoins"),
        Duration::from_secs(15),
        || serves(1),
    );
    eprintln!("{what} at start: serving {took:?} after its path answered");
    digest_until_served(&session, 1, 3);
    drop(session);
    pkcs11.finalize().unwrap();
}

/// Starts `chaos` (two members), opens a session on the virtual slot and
/// kills member 0's server once it has served; returns once it is taken
/// out, the other member serving.
fn started_with_member_0_killed(chaos: &mut Chaos) -> (Pkcs11, cryptoki::session::Session) {
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    digest_until_served(&session, 0, 1);
    chaos.members[0].kill_server();
    digest_until_out(
        &session,
        0,
        "the killed member is taken out",
        Duration::from_secs(10),
    );
    (pkcs11, session)
}

/// A member whose token SoftHSM lost while its server was down -- its
/// token object truncated, as a kill while SoftHSM writes it can leave it
/// (`testing-notes.md`) -- stays out when its server returns: its library
/// answers with an uninitialised token where the member's was, and
/// recovery finds no token by the member's serial. The other member serves
/// the calls meanwhile (a key made, a digest).
#[test]
fn a_member_whose_token_softhsm_lost_stays_out_while_the_other_serves() {
    let mut chaos = Chaos::new(2);
    let (pkcs11, session) = started_with_member_0_killed(&mut chaos);
    let tokens = chaos.members[0].hsm.dir.path().join("tokens");
    let token_objects: Vec<PathBuf> = std::fs::read_dir(&tokens)
        .expect("the token directory")
        .map(|entry| entry.expect("an entry").path().join("token.object"))
        .filter(|path| path.exists())
        .collect();
    assert_eq!(token_objects.len(), 1, "one token in {}", tokens.display());
    std::fs::write(&token_objects[0], b"").expect("the token object is truncated");
    assert!(chaos.token_lost(0), "SoftHSM no longer shows the token");
    let failed_before = chaos.log().matches("not found").count();
    chaos.members[0].restart_server();
    wait_for(
        "recovery looks for the lost token twice",
        Duration::from_secs(15),
        || chaos.log().matches("not found").count() >= failed_before + 2,
    );
    assert!(!serves(0), "a member whose token is lost stays out");
    import_key(&session, b"lost-0").expect("a key is made on the other member");
    assert_eq!(
        session
            .digest(&Mechanism::Sha256, b"abc")
            .expect("C_Digest on the other member")
            .len(),
        32
    );
    assert!(!serves(0), "still out after the group's calls");
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A member whose server is killed and restarted through the relay rejoins
/// and serves: the relay accepts while the server is down, so the member
/// library's `C_Initialize` fails in between, and a failed initialisation
/// is only "not yet".
#[test]
fn a_member_killed_and_restarted_through_the_relay_rejoins() {
    let mut chaos = Chaos::new(2);
    let (pkcs11, session) = started_with_member_0_killed(&mut chaos);
    wait_for(
        "recovery tries the member while its server is down",
        Duration::from_secs(10),
        || chaos.log().matches("recovery failed").count() >= 2,
    );
    chaos.members[0].restart_server();
    let took = wait_for(
        "the restarted member rejoins",
        Duration::from_secs(15),
        || serves(0),
    );
    eprintln!("killed and restarted: serving {took:?} after the server returned");
    digest_until_served(&session, 0, 3);
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A member whose connections are reset and whose path then answers every
/// recovery attempt with an error -- each new connection accepted, greeted
/// and closed, as a load balancer whose backend is gone does -- rejoins
/// once the path passes again: the failed attempts (at least two, each
/// an error, not a silence) leave nothing that keeps it out.
#[test]
fn a_member_whose_path_closed_each_new_connection_rejoins_once_it_passes() {
    let mut chaos = Chaos::new(2);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    digest_until_served(&session, 0, 3);
    chaos.members[0].relay.accept_and_close();
    chaos.members[0].relay.reset();
    wait_for(
        "recovery meets the closing path",
        Duration::from_secs(10),
        || {
            let digest = session
                .digest(&Mechanism::Sha256, b"abc")
                .expect("C_Digest while member 0 is out");
            assert_eq!(digest, SHA256_ABC);
            !serves(0) && chaos.log().matches("recovery failed").count() >= 2
        },
    );
    chaos.members[0].relay.pass();
    let took = wait_for(
        "the member rejoins through the path",
        Duration::from_secs(15),
        || serves(0),
    );
    eprintln!("path closing each connection: serving {took:?} after it passed again");
    let log = chaos.log();
    assert!(
        !log.contains("not answering"),
        "each attempt had an answer: {log}"
    );
    digest_until_served(&session, 0, 3);
    drop(session);
    pkcs11.finalize().unwrap();
}

/// One member black-holed (its path accepts and never answers, so each of
/// its recovery attempts hangs until cut off) does not hold up the
/// recovery of another member that failed meanwhile.
#[test]
fn a_blackholed_member_does_not_hold_up_another_members_recovery() {
    let mut chaos = Chaos::new(3);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    digest_until_served(&session, 0, 1);
    chaos.members[0].relay.blackhole();
    digest_until_out(
        &session,
        0,
        "the black-holed member is taken out",
        Duration::from_secs(20),
    );
    wait_for(
        "a recovery attempt hangs on the black-holed member",
        Duration::from_secs(10),
        || chaos.members[0].relay.accepted() >= 2,
    );
    chaos.members[1].server().kill_workers();
    digest_until_out(
        &session,
        1,
        "the second member is taken out",
        Duration::from_secs(10),
    );
    let out = Instant::now();
    // One interval until the next attempt, and one more in case that
    // attempt came too early for the member's server.
    let bound = Duration::from_secs(2) + MARGIN;
    wait_for("the second failed member rejoins", bound, || serves(1));
    let took = out.elapsed();
    eprintln!("second member beside a black hole: serving {took:?} after it was taken out");
    assert!(!serves(0), "the black-holed member stays out");
    digest_until_served(&session, 1, 3);
    chaos.members[0].relay.pass();
    wait_for(
        "the black-holed member rejoins",
        Duration::from_secs(15),
        || serves(0),
    );
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A member whose token search waited as long as `AutoReconnectInterval`
/// for its paused path is tried again at once, not an interval after:
/// that wait stands for it, and a path that healed meanwhile answers
/// (here: the next attempt, held by the paused path, goes through as it
/// resumes). The long chaos run's slowest return (3.8 s) waited a second
/// so. Here the interval is `memberTimeout`, 8 s, the patience of the
/// first search.
#[test]
fn a_search_that_waited_the_interval_for_a_silent_path_is_followed_at_once() {
    let mut chaos = Chaos::with_settings(2, 8000, "AutoReconnectInterval = 8\n");
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    digest_until_served(&session, 1, 1);
    chaos.members[1].relay.pause();
    digest_until_out(
        &session,
        1,
        "the paused member is taken out",
        Duration::from_secs(30),
    );
    wait_for(
        "recovery gives up a search on the paused path",
        Duration::from_secs(30),
        || chaos.log().contains("no answer within"),
    );
    chaos.members[1].relay.resume();
    // By the clock alone, the next attempt would begin 8 s from now.
    let took = wait_for("the member serves again", Duration::from_secs(4), || {
        serves(1)
    });
    eprintln!("search waited the interval, path resumed: serving {took:?} after");
    digest_until_served(&session, 1, 3);
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A library that reconnected while its path dropped everything holds a
/// dead connection once the path heals: the relay keeps what it
/// swallowed, as a balancer that lost the flow does. A search on it is not
/// waited out to its deadline: a fresh instance of the library, on a
/// connection of its own, answers, so the search ends at once as a dead
/// connection (the long chaos run's outages with a healthy server were
/// such waits, the patience growing with each silent search to seconds).
/// The library's reconnect then takes over the fresh instance's
/// connection instead of making one more (p11-kit's server loads the
/// whole token for each); one whose connection was reset before it was
/// taken over fails its calls, and the next reconnect connects anew.
/// Without a fresh instance to ask, the search ends only at its deadline.
#[test]
fn a_search_on_a_connection_made_into_a_black_hole_ends_once_a_fresh_connection_answers() {
    use pkcs11_ha::member::{FreshCheck, MemberLibrary, Unanswered};
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["fresh"]);
    let dir = hsm.dir.path();
    let server = P11KitServer::start(SOFTHSM_LIB, &hsm.conf, "fresh", &dir.join("server.sock"));
    let mut relay = Relay::start(&dir.join("relay.sock"), &server.socket);
    let library = std::sync::Arc::new(
        MemberLibrary::load(
            "fresh",
            std::path::Path::new(&p11kit::client_module()),
            &[(p11kit::ADDRESS_ENV.to_string(), relay.address())],
        )
        .expect("p11-kit's client loads")
        .with_instances(std::num::NonZeroUsize::new(1))
        .expect("its instances"),
    );
    let finds_token = || -> FreshCheck {
        std::sync::Arc::new(|library: &MemberLibrary| {
            library.token_slots().is_ok_and(|slots| !slots.is_empty())
        })
    };
    let connect_into_black_hole = |relay: &mut Relay| {
        relay.blackhole();
        let before = relay.accepted();
        let search = finds_token();
        let job = library
            .start_bounded(move |library: &MemberLibrary| {
                library.initialize_in_this_environment().is_ok() && search(library)
            })
            .expect("no job under way");
        wait_for(
            "the library connects into the black hole",
            Duration::from_secs(10),
            || relay.accepted() > before,
        );
        relay.pass();
        job
    };

    // The job was blocked reading for seconds when it was given up, so
    // the cut then found its socket.
    let returns_once_cut = || {
        wait_for(
            "the given-up job returns once cut",
            Duration::from_secs(10),
            || !library.job_running(),
        )
    };

    let job = connect_into_black_hole(&mut relay);
    let check = finds_token();
    let far = Instant::now() + Duration::from_secs(120);
    let asked = Instant::now();
    let answer = job.finish_hedged(
        far,
        Duration::from_secs(120),
        Some((member_timeout(), &check)),
    );
    eprintln!("dead connection told after {:?}", asked.elapsed());
    assert!(
        matches!(answer, Err(Unanswered::DeadConnection)),
        "the search on the dead connection ends as such, not at its deadline: {answer:?}"
    );
    returns_once_cut();
    let connections = relay.accepted();
    library.reinitialize().expect("the library reconnects");
    assert_eq!(
        relay.accepted(),
        connections,
        "the reconnect took over the fresh instance's connection"
    );
    assert!(
        library.token_slots().is_ok_and(|slots| !slots.is_empty()),
        "and finds the token on it"
    );

    // The job the probe tells dead is itself a reconnect, waiting in its
    // `C_Finalize` on the connection that died under it: once cut, it
    // takes over the probe's connection rather than release it and
    // connect anew (p11-kit's server loads the whole token for each
    // connection; in the long chaos run the next reconnect found the
    // probe released, 3 times in 4).
    relay.blackhole();
    let swallowed = relay.swallowed();
    let search = finds_token();
    let reconnect = library
        .start_bounded(move |library: &MemberLibrary| {
            library.reinitialize().is_ok() && search(library)
        })
        .expect("no job under way");
    wait_for(
        "the reconnect's C_Finalize goes into the black hole",
        Duration::from_secs(10),
        || relay.swallowed() > swallowed,
    );
    relay.pass();
    let before_probe = relay.accepted();
    let answer = reconnect.finish_hedged(
        far,
        Duration::from_secs(120),
        Some((member_timeout(), &check)),
    );
    assert!(
        matches!(answer, Err(Unanswered::DeadConnection)),
        "the reconnect on the dead connection ends as such: {answer:?}"
    );
    returns_once_cut();
    assert_eq!(
        relay.accepted(),
        before_probe + 1,
        "the probe's connection alone was made: the reconnect took it over"
    );
    assert!(
        library.token_slots().is_ok_and(|slots| !slots.is_empty()),
        "and finds the token on it"
    );
    library.finalize();

    // The fresh instance's connection reset between telling the search's
    // dead and being taken over: taken over dead, its calls fail, and the
    // next reconnect, with nothing to take over, connects anew.
    let job = connect_into_black_hole(&mut relay);
    let answer = job.finish_hedged(
        far,
        Duration::from_secs(120),
        Some((member_timeout(), &check)),
    );
    assert!(
        matches!(answer, Err(Unanswered::DeadConnection)),
        "the second search on a dead connection ends as such: {answer:?}"
    );
    returns_once_cut();
    relay.reset();
    library
        .reinitialize()
        .expect("the library takes over the reset connection");
    assert!(
        !library.token_slots().is_ok_and(|slots| !slots.is_empty()),
        "a reset connection taken over finds no token"
    );
    let connections = relay.accepted();
    library.reinitialize().expect("the library reconnects");
    assert!(
        relay.accepted() > connections,
        "with nothing to take over, the reconnect connects anew"
    );
    assert!(
        library.token_slots().is_ok_and(|slots| !slots.is_empty()),
        "and finds the token there"
    );
    library.finalize();

    let job = connect_into_black_hole(&mut relay);
    let soon = Instant::now() + member_timeout() * 2;
    let answer = job.finish_hedged(soon, Duration::ZERO, None);
    assert!(
        matches!(answer, Err(Unanswered::Silent)),
        "unhedged, the search on the dead connection waits out its deadline: {answer:?}"
    );
    returns_once_cut();
    library.finalize();
}

/// A search that answers while the fresh instance it asked is still
/// waiting on a stalled path leaves that instance cut off, not stuck:
/// stuck, it would answer no later hedge of the library. Here the search
/// is a job that answers when the test says, the path is paused once the
/// fresh instance has connected, and the instance is free to be asked
/// again once the search has ended.
#[test]
fn a_search_that_answers_while_its_fresh_instance_waits_leaves_that_instance_free() {
    use pkcs11_ha::member::{FreshCheck, MemberLibrary};
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["probe"]);
    let dir = hsm.dir.path();
    let server = P11KitServer::start(SOFTHSM_LIB, &hsm.conf, "probe", &dir.join("server.sock"));
    let mut relay = Relay::start(&dir.join("relay.sock"), &server.socket);
    let library = std::sync::Arc::new(
        MemberLibrary::load(
            "probe",
            std::path::Path::new(&p11kit::client_module()),
            &[(p11kit::ADDRESS_ENV.to_string(), relay.address())],
        )
        .expect("p11-kit's client loads")
        .with_instances(std::num::NonZeroUsize::new(1))
        .expect("its instances"),
    );
    let check: FreshCheck = std::sync::Arc::new(|library: &MemberLibrary| {
        library.token_slots().is_ok_and(|slots| !slots.is_empty())
    });
    let (answer, answered) = std::sync::mpsc::channel::<()>();
    let job = library
        .start_bounded(move |_: &MemberLibrary| answered.recv().is_ok())
        .expect("no job under way");
    relay.pause();
    let before = relay.accepted();
    let ends = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            job.finish_hedged(
                Instant::now() + Duration::from_secs(120),
                Duration::from_secs(120),
                Some((member_timeout(), &check)),
            )
        });
        wait_for(
            "the fresh instance connects into the paused path",
            Duration::from_secs(10),
            || relay.accepted() > before,
        );
        answer.send(()).expect("the job listens");
        waiting.join().expect("the search")
    });
    assert_eq!(ends.ok(), Some(true), "the search's own answer is taken");
    wait_for(
        "the fresh instance is free to be asked again",
        Duration::from_secs(10),
        || library.fresh_instance(&check).is_some(),
    );
    relay.pass();
}

/// Every member down and back in one process, without `C_Finalize`: the
/// HA log says when the group has no member serving and when it serves
/// again, and after how long.
#[test]
fn the_ha_log_says_when_the_group_has_no_member_serving_and_when_it_serves_again() {
    let mut chaos = Chaos::new(2);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    // Refused as well as cut: recovery tries a failed member at once, and
    // a server that still listens could have one member back before the
    // other is out.
    for member in &mut chaos.members {
        member.relay.refuse();
        member.relay.reset();
    }
    wait_for("every member is taken out", Duration::from_secs(10), || {
        let _ = session.digest(&Mechanism::Sha256, b"abc");
        !serves(0) && !serves(1)
    });
    for member in &mut chaos.members {
        member.relay.pass();
    }
    wait_for("a member serves again", Duration::from_secs(15), || {
        serves(0) || serves(1)
    });
    let log = wait_for("the HA log says so", Duration::from_secs(5), || {
        chaos.log().contains("serving again after")
    });
    let text = chaos.log();
    let down = text
        .find("no member serving")
        .unwrap_or_else(|| panic!("no outage line: {text}"));
    let up = text.find("serving again after").unwrap();
    assert!(down < up, "{text}");
    eprintln!("outage logged; the return line came {log:?} after a member served");
    let digest = session
        .digest(&Mechanism::Sha256, b"abc")
        .expect("C_Digest");
    assert_eq!(digest, SHA256_ABC);
    drop(session);
    pkcs11.finalize().unwrap();
}

/// A member that goes silent while the application runs (its path stops
/// answering, connections stay open) holds no call of the application
/// longer than `memberTimeout` and the margin: neither its operations, cut
/// off and failed over, nor the slot and token listings that reach its
/// library outside any operation.
#[test]
fn a_member_silent_mid_run_holds_no_call_longer_than_member_timeout() {
    let mut chaos = Chaos::new(3);
    let (pkcs11, _) = chaos.start();
    let slot = Slot::try_from(0u64).unwrap();
    let session = user_session(&pkcs11, slot);
    digest_until_served(&session, 1, 1);
    chaos.members[1].relay.blackhole();
    let bound = member_timeout() + MARGIN;
    let mut slowest = Duration::ZERO;
    // Long enough for the member to be cut off, and for recovery attempts
    // on it to hang and be cut off too.
    let until = Instant::now() + member_timeout() * 2;
    while Instant::now() < until {
        let started = Instant::now();
        let slots = pkcs11.get_slots_with_token().expect("C_GetSlotList");
        assert!(slots.contains(&slot));
        pkcs11.get_token_info(slot).expect("C_GetTokenInfo");
        let took = started.elapsed();
        let started = Instant::now();
        let digest = session
            .digest(&Mechanism::Sha256, b"abc")
            .expect("C_Digest");
        assert_eq!(digest, SHA256_ABC);
        slowest = slowest.max(took).max(started.elapsed());
        assert!(slowest < bound, "a call took {slowest:?}");
    }
    assert!(!serves(1), "the silent member is out");
    eprintln!("member silent mid-run: slowest call {slowest:?}");
    drop(session);
    pkcs11.finalize().unwrap();
}

/// How long one SHA-256 digest of "abc" takes; it must be right.
fn timed_digest(session: &cryptoki::session::Session) -> Duration {
    let started = Instant::now();
    let digest = session
        .digest(&Mechanism::Sha256, b"abc")
        .expect("C_Digest");
    assert_eq!(digest, SHA256_ABC);
    started.elapsed()
}

/// Two members under `memberTimeout = timeout` and `more` settings,
/// started, with a logged-in session that has made enough digests on each
/// for its usual round trip to be known.
fn two_members_with_round_trips(
    timeout: Duration,
    more: &str,
) -> (Chaos, Pkcs11, cryptoki::session::Session) {
    let mut chaos = Chaos::with_settings(2, timeout.as_millis() as u64, more);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    for i in 0..2 {
        digest_until_served(&session, i, 40);
    }
    (chaos, pkcs11, session)
}

/// Under Luna's default `memberTimeout` of 20 s, a member whose path goes
/// silent mid-run is cut once a call has been silent for a second that its
/// function usually answers in milliseconds (a `C_Digest` here): no call
/// waits anywhere near `memberTimeout`, every digest is right, and the HA
/// log says why the member was cut. Waiting for `memberTimeout` instead,
/// each call in flight on the path waited 20 s.
#[test]
fn a_member_gone_silent_is_cut_long_before_a_long_member_timeout() {
    let timeout = Duration::from_secs(20);
    let (mut chaos, pkcs11, session) = two_members_with_round_trips(timeout, "");
    chaos.members[1].relay.blackhole();
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    while serves(1) || calls < 20 {
        slowest = slowest.max(timed_digest(&session));
        calls += 1;
        assert!(slowest < timeout / 4, "a call took {slowest:?}");
    }
    eprintln!(
        "member silent under memberTimeout {timeout:?}: slowest of {calls} calls {slowest:?}"
    );
    let log = chaos.log();
    assert!(
        log.contains("was silent for") && log.contains("connection cut before memberTimeout"),
        "{log}"
    );
    drop(session);
    pkcs11.finalize().unwrap();
}

/// With `earlyHangDetection = 0` a silent call waits for `memberTimeout`,
/// as before the rule: the member is cut by the watchdog's stall check
/// alone, and the call on it took `memberTimeout`.
#[test]
fn without_early_hang_detection_a_silent_call_waits_member_timeout() {
    let timeout = Duration::from_secs(4);
    let (mut chaos, pkcs11, session) =
        two_members_with_round_trips(timeout, "earlyHangDetection = 0\n");
    chaos.members[1].relay.blackhole();
    let mut slowest = Duration::ZERO;
    while serves(1) {
        slowest = slowest.max(timed_digest(&session));
    }
    assert!(
        slowest >= timeout,
        "a call waited memberTimeout: {slowest:?}"
    );
    let log = chaos.log();
    assert!(!log.contains("was silent for"), "{log}");
    assert!(log.contains("answered nothing for 4000 ms"), "{log}");
    drop(session);
    pkcs11.finalize().unwrap();
}

/// The last serving member is not cut for a silent call before
/// `memberTimeout`: with no other member to go to, slower than usual is no
/// reason to serve nothing. Member 1 goes silent and is cut after about a
/// second; then member 0, the only one left, goes silent too and is cut by
/// `memberTimeout` alone.
#[test]
fn the_last_serving_member_is_left_to_member_timeout() {
    let timeout = Duration::from_secs(4);
    let (mut chaos, pkcs11, session) = two_members_with_round_trips(timeout, "");
    chaos.members[1].relay.blackhole();
    wait_for("member 1 is cut", timeout, || {
        let digest = session
            .digest(&Mechanism::Sha256, b"abc")
            .expect("C_Digest");
        assert_eq!(digest, SHA256_ABC);
        !serves(1)
    });
    chaos.members[0].relay.blackhole();
    let started = Instant::now();
    let last = session.digest(&Mechanism::Sha256, b"abc");
    let took = started.elapsed();
    assert!(last.is_err(), "no member answers: {last:?}");
    assert!(
        took >= timeout,
        "the call was given memberTimeout: {took:?}"
    );
    let log = chaos.log();
    assert_eq!(log.matches("was silent for").count(), 1, "{log}");
    assert!(log.contains("answered nothing for 4000 ms"), "{log}");
    drop(session);
    pkcs11.finalize().unwrap();
}

/// `pkcs11-tool`, as a new user would run it, with one member silent:
/// listing the slots and hashing through the virtual slot each finish
/// within `memberTimeout` and the margin.
#[test]
fn pkcs11_tool_lists_and_hashes_with_a_member_silent() {
    use std::io::Write;
    let mut chaos = Chaos::new(3);
    chaos.members[2].relay.blackhole();
    let module = library_path();
    let hsm = &chaos.members[0].hsm;
    let started = Instant::now();
    let listing = pkcs11_tool(&module, hsm, &chaos.config)
        .arg("-L")
        .output()
        .unwrap();
    let list_took = started.elapsed();
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success(), "{text}");
    assert!(text.contains(GROUP_LABEL), "{text}");
    let started = Instant::now();
    let mut hashing = pkcs11_tool(&module, hsm, &chaos.config)
        .args(["--slot", "0", "--login", "--pin", USER_PIN])
        .args(["--hash", "-m", "SHA256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hashing.stdin.take().unwrap().write_all(b"abc").unwrap();
    let hashed = hashing.wait_with_output().unwrap();
    let hash_took = started.elapsed();
    assert!(
        hashed.status.success(),
        "{}",
        String::from_utf8_lossy(&hashed.stderr)
    );
    assert_eq!(hashed.stdout, SHA256_ABC);
    eprintln!("pkcs11-tool with a member silent: -L {list_took:?}, --hash {hash_took:?}");
    for took in [list_took, hash_took] {
        assert!(took < member_timeout() + MARGIN, "{took:?}");
    }
}

/// A slow member (150 ms added each way on its path: each call takes some
/// 300 ms, inside `memberTimeout`, but its start-up more than
/// `memberTimeout` in all) is not taken for a failed one: it starts with
/// the group, stays in service, every call succeeds, and the least-busy
/// choice sends most calls to the fast members.
#[test]
fn a_slow_member_stays_in_service_and_gets_fewer_calls() {
    let mut chaos = Chaos::new(3);
    chaos.members[2].relay.delay(Duration::from_millis(150));
    let (pkcs11, init) = chaos.start();
    eprintln!("C_Initialize with a slow member: {init:?}");
    assert!(serves(2), "the slow member starts with the group");
    let slot = Slot::try_from(0u64).unwrap();
    let before: Vec<u64> = (0..3)
        .map(|i| group_status().members[i].callsServed)
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let session = pkcs11.open_ro_session(slot).expect("C_OpenSession");
                for _ in 0..40 {
                    let digest = session
                        .digest(&Mechanism::Sha256, b"abc")
                        .expect("C_Digest");
                    assert_eq!(digest, SHA256_ABC);
                }
            });
        }
    });
    let served: Vec<u64> = (0..3)
        .map(|i| group_status().members[i].callsServed - before[i])
        .collect();
    eprintln!("calls served with member 2 slow: {served:?}");
    assert!(serves(2), "the slow member stays in service");
    assert!(
        served[2] < served[0].min(served[1]),
        "the slow member got fewer calls: {served:?}"
    );
    assert!(!chaos.log().contains("answered nothing"), "{}", chaos.log());
    pkcs11.finalize().unwrap();
}

/// A latency spike on every member's path at once (a congested network
/// they share: 300 ms added each way, some 20 times their usual round
/// trip) is slowness, not silence: two threads importing keys through it,
/// on sessions opened and used before it, keep every call succeeding, no
/// member is cut for a silent call or taken out, and every key is on both
/// members. A SoftHSM member's token write reads the token's list first,
/// in the same call on the wire (`MemberLibrary::call_writing`): two round
/// trips, 1.2 s here, with no other answer between them while the other
/// thread's write waits for the connection; counted as one silence, it
/// was cut as a silent connection after a second.
#[test]
fn a_latency_spike_on_every_path_takes_no_member_out() {
    const THREADS: usize = 2;
    const CALLS: usize = 2;
    // Imports each thread makes before the spike: enough for the usual
    // round trip of `C_CreateObject` to be known.
    const WARM_UP: usize = pkcs11_ha::member::round_trips::SAMPLES as usize;
    // Each member finishes a write about every 1.2 s during the spike,
    // the other thread's waiting behind it: a `memberTimeout` well above
    // that keeps the stall rule out of what this scenario asks, while the
    // silent-call rule, which this one tests, starts at a second.
    let timeout = Duration::from_secs(3);
    let (mut chaos, pkcs11, session) = two_members_with_round_trips(timeout, "");
    let slot = Slot::try_from(0u64).unwrap();
    let ready = std::sync::Barrier::new(THREADS + 1);
    let spiked = std::sync::Barrier::new(THREADS + 1);
    let call = |session: &cryptoki::session::Session, thread: usize, call: usize| {
        let id = format!("spike-{thread}-{call}");
        import_key(session, id.as_bytes()).expect("C_CreateObject");
    };
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (pkcs11, ready, spiked) = (&pkcs11, &ready, &spiked);
            scope.spawn(move || {
                let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
                for n in 0..WARM_UP {
                    call(&session, thread, n);
                }
                ready.wait();
                spiked.wait();
                for n in WARM_UP..WARM_UP + CALLS {
                    call(&session, thread, n);
                }
            });
        }
        ready.wait();
        for member in &mut chaos.members {
            member.relay.delay(Duration::from_millis(300));
        }
        spiked.wait();
    });
    for member in &mut chaos.members {
        member.relay.pass();
    }
    let log = chaos.log();
    assert!(serves(0) && serves(1), "{log}");
    assert!(!log.contains("was silent for"), "{log}");
    assert!(!log.contains("member failed"), "{log}");
    for member in &chaos.members {
        let held = ids_on_member(&pkcs11, member);
        let spiked = held.keys().filter(|id| id.starts_with(b"spike-")).count();
        assert_eq!(spiked, THREADS * (WARM_UP + CALLS), "{log}");
    }
    drop(session);
    pkcs11.finalize().unwrap();
}

/// Several calls in flight at once on a network member whose path goes
/// silent (calls into one client library run concurrently): the watchdog
/// cuts the connection under all of them, and every call of every thread
/// still succeeds within `memberTimeout` and the margin.
#[test]
fn concurrent_calls_on_a_member_gone_silent_all_return() {
    let mut chaos = Chaos::new(2);
    let (pkcs11, _) = chaos.start();
    let slot = Slot::try_from(0u64).unwrap();
    let session = user_session(&pkcs11, slot);
    digest_until_served(&session, 1, 1);
    let bound = member_timeout() + MARGIN;
    let until = Instant::now() + member_timeout() * 2;
    let silenced = std::sync::Barrier::new(5);
    let slowest = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (pkcs11, silenced) = (&pkcs11, &silenced);
                scope.spawn(move || {
                    let session = pkcs11.open_ro_session(slot).expect("C_OpenSession");
                    silenced.wait();
                    let mut slowest = Duration::ZERO;
                    while Instant::now() < until {
                        slowest = slowest.max(timed_digest(&session));
                    }
                    slowest
                })
            })
            .collect();
        chaos.members[1].relay.blackhole();
        silenced.wait();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .max()
            .unwrap()
    });
    eprintln!("4 threads, member silent mid-run: slowest call {slowest:?}");
    assert!(slowest < bound, "a call took {slowest:?}");
    assert!(!serves(1), "the silent member is out");
    assert!(chaos.log().contains("connection cut"), "{}", chaos.log());
    drop(session);
    pkcs11.finalize().unwrap();
}

/// While the group has no member serving, the first member whose token
/// answers again serves at once, and the objects it missed are made on it
/// right after: every call on the group failed while it replayed them
/// first (5-20 s for a few hundred in the long chaos run, with its server
/// healthy). Member 0 misses 40 keys; then member 1 is taken out too, and
/// member 0's path is slowed so that making them takes seconds. Member 0
/// serves with keys still owed to it, serves digests and new keys then,
/// and ends with every key once, as member 1 does once it is back.
#[test]
fn with_no_member_serving_a_returning_member_serves_before_it_is_given_what_it_missed() {
    const MISSED: usize = 40;
    let mut chaos = Chaos::new(2);
    let (pkcs11, _) = chaos.start();
    let session = user_session(&pkcs11, Slot::try_from(0u64).unwrap());
    chaos.members[0].relay.refuse();
    chaos.members[0].relay.reset();
    wait_for("member 0 is taken out", Duration::from_secs(30), || {
        let _ = session.digest(&Mechanism::Sha256, b"abc");
        !serves(0)
    });
    let mut ids: Vec<Vec<u8>> = (0..MISSED)
        .map(|n| format!("missed-{n}").into_bytes())
        .collect();
    for id in &ids {
        import_key(&session, id).expect("a key made on member 1");
    }
    chaos.members[1].relay.refuse();
    chaos.members[1].relay.reset();
    wait_for("member 1 is taken out", Duration::from_secs(30), || {
        let _ = session.digest(&Mechanism::Sha256, b"abc");
        !serves(1)
    });
    assert!(!serves(0), "member 0 stays out while its path refuses");
    // 25 ms each way: each key owed costs a look-up and a creation,
    // several 50 ms round trips, so the 40 take seconds after it serves.
    chaos.members[0].relay.delay(Duration::from_millis(25));
    let mut owed_when_serving = 0;
    wait_for("member 0 serves again", Duration::from_secs(60), || {
        let status = group_status();
        let member = &status.members[0];
        owed_when_serving = member.pendingChanges;
        member.state == PKCS11HA_STATE_UP
    });
    assert!(
        owed_when_serving > 0,
        "member 0 served only once it had been given all {MISSED} keys it missed; HA log:\n{}",
        chaos.log()
    );
    // Nor did it read its objects first: nothing is made on it before it
    // serves, and each key owed is looked up as it is made.
    let serial = &chaos.members[0].hsm.tokens[0].serial;
    wait_for(
        "member 0's recovery is logged",
        Duration::from_secs(30),
        || {
            chaos
                .log()
                .lines()
                .any(|l| l.contains(serial.as_str()) && l.contains("member recovered"))
        },
    );
    let log = chaos.log();
    let recovered = log
        .lines()
        .find(|l| l.contains(serial.as_str()) && l.contains("member recovered"))
        .unwrap();
    assert!(
        recovered.contains("not read: no member serving"),
        "member 0 read its objects before serving with no member serving: {recovered}"
    );
    let digest = session
        .digest(&Mechanism::Sha256, b"abc")
        .expect("C_Digest on the member back");
    assert_eq!(digest, SHA256_ABC);
    let made_meanwhile = b"made-while-owed".to_vec();
    import_key(&session, &made_meanwhile).expect("a key made while member 0 is owed keys");
    ids.push(made_meanwhile);
    chaos.members[0].relay.pass();
    chaos.members[1].relay.pass();
    wait_for(
        "both members serve with nothing owed",
        Duration::from_secs(120),
        || {
            let status = group_status();
            (0..2).all(|i| status.members[i].state == 0 && status.members[i].pendingChanges == 0)
        },
    );
    for (i, member) in chaos.members.iter().enumerate() {
        let held = ids_on_member(&pkcs11, member);
        let wrong: Vec<String> = ids
            .iter()
            .filter(|id| held.get(*id) != Some(&1))
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .collect();
        assert!(
            wrong.is_empty(),
            "member {i} holds these keys other than once: {wrong:?}; HA log:\n{}",
            chaos.log()
        );
    }
    eprintln!("member 0 served with {owed_when_serving} of {MISSED} keys still owed");
    drop(session);
    pkcs11.finalize().unwrap();
}

/// Stops the writers of a scenario when dropped, also when the scenario
/// fails, so that its scope can end.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Imports an AES key with `id` through the virtual slot.
fn import_key(session: &cryptoki::session::Session, id: &[u8]) -> cryptoki::error::Result<()> {
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    let mut value = [0u8; 16];
    value[..id.len().min(16)].copy_from_slice(&id[..id.len().min(16)]);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Value(value.to_vec()),
            Attribute::Encrypt(true),
        ])
        .map(|_| ())
}

/// Per member, through its own pass-through slot: how many of its token
/// objects carry each `CKA_ID`.
fn ids_on_member(pkcs11: &Pkcs11, member: &Member) -> std::collections::HashMap<Vec<u8>, usize> {
    use cryptoki::object::{Attribute, AttributeType};
    let slot = slot_by_label(pkcs11, &member.hsm.tokens[0].label).expect("the member's own slot");
    let session = user_session(pkcs11, slot);
    let mut counts = std::collections::HashMap::new();
    for object in session
        .find_objects(&[Attribute::Token(true)])
        .expect("C_FindObjects")
    {
        for attribute in session
            .get_attributes(object, &[AttributeType::Id])
            .expect("C_GetAttributeValue")
        {
            if let Attribute::Id(id) = attribute {
                *counts.entry(id).or_default() += 1;
            }
        }
    }
    counts
}

/// Four threads import keys without pause while one member's connections
/// are reset, [`RESETS_ENV`] times in turn on the members (2 unless set):
/// each time the member is taken out, recovery replays what it missed,
/// then copies the tail with writes held back at the barrier -- or, where
/// its replay is slow, serves first and is given the rest right after --
/// and it serves again while the writes go on: it does not chase the write
/// rate forever. No write fails (two members serve throughout), and once
/// nothing is owed every member holds every key the application was given
/// exactly once.
/// Prints the time from each reset to serving again (p50, p99) and where
/// each recovery spent it.
#[test]
fn a_member_reset_under_continuous_writes_rejoins_and_holds_every_object_once() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    const WRITERS: usize = 4;
    let resets: usize = std::env::var(RESETS_ENV)
        .map(|s| s.parse().expect("PKCS11_HA_RESETS is a number"))
        .unwrap_or(2);
    let mut chaos = Chaos::new(3);
    let (pkcs11, _) = chaos.start();
    let slot = Slot::try_from(0u64).unwrap();
    // The application stays logged in after its writers stop: what a
    // member was still owed is made with its login.
    let logged_in = user_session(&pkcs11, slot);
    let stop = AtomicBool::new(false);
    let made: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let failed: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let count = || made.lock().unwrap().len();
    let mut rejoins = Vec::new();
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        for writer in 0..WRITERS {
            let (pkcs11, stop, made, failed) = (&pkcs11, &stop, &made, &failed);
            scope.spawn(move || {
                let session = user_session(pkcs11, slot);
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("w{writer}-{n}").into_bytes();
                    n += 1;
                    match import_key(&session, &id) {
                        Ok(()) => made.lock().unwrap().push(id),
                        Err(e) => failed.lock().unwrap().push(format!("{e}")),
                    }
                }
            });
        }
        wait_for("the writers write", Duration::from_secs(20), || {
            count() >= 40
        });
        for round in 0..resets {
            let i = 1 + round % 2;
            chaos.members[i].relay.reset();
            let reset = Instant::now();
            wait_for(
                "the reset member is taken out",
                Duration::from_secs(10),
                || !serves(i),
            );
            let written = count();
            wait_for(
                "the reset member rejoins under continuous writes",
                Duration::from_secs(30),
                || serves(i),
            );
            let took = reset.elapsed();
            rejoins.push(took);
            eprintln!(
                "reset {round} under {WRITERS} writers: member {i} serving {took:?} after the \
                 reset, {} keys written meanwhile",
                count() - written
            );
            let rejoined = count();
            wait_for(
                "writes go on after the rejoin",
                Duration::from_secs(20),
                || count() >= rejoined + 40,
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    rejoins.sort();
    eprintln!(
        "after a reset under {WRITERS} writers, serving again: p50 {:?}, p99 {:?} (n = {})",
        percentile(&rejoins, 0.5),
        percentile(&rejoins, 0.99),
        rejoins.len()
    );
    for line in chaos
        .log()
        .lines()
        .filter(|l| l.contains("member recovered"))
    {
        eprintln!("{line}");
    }
    let failed = failed.into_inner().unwrap();
    assert!(failed.is_empty(), "writes failed: {failed:?}");
    // A member whose replay was slow (an import in doubt after the reset
    // waits up to memberTimeout) serves first and is given the rest right
    // after: nothing is owed once that is done.
    let owed = || {
        let status = group_status();
        (0..3)
            .map(|i| (status.members[i].state, status.members[i].pendingChanges))
            .collect::<Vec<_>>()
    };
    let settling = Instant::now();
    while owed().iter().any(|&(state, kept)| state != 0 || kept != 0) {
        assert!(
            settling.elapsed() < Duration::from_secs(60),
            "every member serves with nothing owed: not within 60 s; (state, changes kept): \
             {:?}",
            owed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let made = made.into_inner().unwrap();
    for (i, member) in chaos.members.iter().enumerate() {
        let counts = ids_on_member(&pkcs11, member);
        let wrong: Vec<String> = made
            .iter()
            .filter(|id| counts.get(*id) != Some(&1))
            .map(|id| format!("{}: {:?}", String::from_utf8_lossy(id), counts.get(id)))
            .collect();
        assert!(
            wrong.is_empty(),
            "member {i} holds {} of {} keys other than once: {wrong:?}",
            wrong.len(),
            made.len()
        );
    }
    drop(logged_in);
    pkcs11.finalize().unwrap();
}

/// Keys the application was told failed are on no member, not even those
/// whose making was on the wire when the last member dropped: both paths
/// stall (the relays hold what they were sent) while four threads import
/// keys, the watchdog cuts both members off, every call fails until they
/// return, and the stalled requests reach the servers once the paths
/// resume. Recovery waits for those copies and removes them; every key
/// reported made is on every member exactly once.
#[test]
fn keys_reported_failed_are_left_on_no_member_even_when_in_flight_as_the_last_member_dropped() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    const WRITERS: usize = 4;
    let mut chaos = Chaos::new(2);
    let (pkcs11, _) = chaos.start();
    let slot = Slot::try_from(0u64).unwrap();
    // The application stays logged in after its writers stop and close
    // their sessions, as in the long run: logged out, the imports on their
    // way to a member that serves first would wait for the next login.
    let _logged_in = user_session(&pkcs11, slot);
    let stop = AtomicBool::new(false);
    let made: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let failed: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let count = |list: &Mutex<Vec<Vec<u8>>>| list.lock().unwrap().len();
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let (pkcs11, stop, made, failed) = (&pkcs11, &stop, &made, &failed);
            scope.spawn(move || {
                let session = user_session(pkcs11, slot);
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("f{writer}-{n}").into_bytes();
                    n += 1;
                    match import_key(&session, &id) {
                        Ok(()) => made.lock().unwrap().push(id),
                        Err(_) => failed.lock().unwrap().push(id),
                    }
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        wait_for("the writers write", Duration::from_secs(20), || {
            count(&made) >= 40
        });
        for member in &mut chaos.members {
            member.relay.pause();
        }
        wait_for("both members are cut off", Duration::from_secs(20), || {
            !serves(0) && !serves(1)
        });
        wait_for(
            "calls fail while no member serves",
            Duration::from_secs(10),
            || count(&failed) >= WRITERS,
        );
        for member in &mut chaos.members {
            member.relay.resume();
        }
        // Both wait up to 4 x memberTimeout for the requests cut off, and
        // replay what the other made meanwhile, on a loaded machine: beside
        // two busy loops at a load of 19, the member back second read the
        // first's ~500 new keys one lookup at a time (53 s) and replayed
        // 529 more changes (38 s) while the writers went on.
        let limit = Instant::now() + Duration::from_secs(240);
        while !(serves(0) && serves(1)) {
            assert!(
                Instant::now() < limit,
                "both members serve again: not within 240 s; HA log:\n{}",
                chaos.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let back = count(&made);
        wait_for("writes go on", Duration::from_secs(20), || {
            count(&made) >= back + 40
        });
        stop.store(true, Ordering::Relaxed);
    });
    let (made, failed) = (made.into_inner().unwrap(), failed.into_inner().unwrap());
    // A member back while the other serves may serve before the keys it
    // missed are made on it (`pendingChanges` counts them until then).
    let limit = Instant::now() + Duration::from_secs(120);
    loop {
        let status = group_status();
        let owed: Vec<_> = (0..2)
            .map(|i| (status.members[i].state, status.members[i].pendingChanges))
            .collect();
        if owed
            .iter()
            .all(|(state, pending)| *state == 0 && *pending == 0)
        {
            break;
        }
        assert!(
            Instant::now() < limit,
            "both members serve with nothing owed: not within 120 s ((state, pendingChanges): \
             {owed:?}); HA log:\n{}",
            chaos.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_doubt = chaos.log().matches("cut").count();
    eprintln!(
        "{} keys made, {} failed; {in_doubt} HA log lines about cut connections",
        made.len(),
        failed.len()
    );
    for (i, member) in chaos.members.iter().enumerate() {
        let counts = ids_on_member(&pkcs11, member);
        let left: Vec<String> = failed
            .iter()
            .filter(|id| counts.contains_key(*id))
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .collect();
        assert!(
            left.is_empty(),
            "member {i} holds keys reported failed: {left:?}"
        );
        let wrong: Vec<String> = made
            .iter()
            .filter(|id| counts.get(*id) != Some(&1))
            .map(|id| format!("{}: {:?}", String::from_utf8_lossy(id), counts.get(id)))
            .collect();
        assert!(
            wrong.is_empty(),
            "member {i} holds keys other than once: {wrong:?}; HA log:\n{}",
            chaos.log()
        );
    }
    pkcs11.finalize().unwrap();
}

/// How many resets the reset-under-writes scenario makes (for figures).
const RESETS_ENV: &str = "PKCS11_HA_RESETS";

/// Seconds of the chaos run; `scripts/chaos` runs it longer.
const CHAOS_SECS_ENV: &str = "PKCS11_HA_CHAOS_SECS";
const CHAOS_DEFAULT_SECS: u64 = 20;
/// Seed of the run's choices (printed, so that a run can be repeated).
const CHAOS_SEED_ENV: &str = "PKCS11_HA_CHAOS_SEED";
/// Where to keep the run's HA log, to study what the figures came from;
/// the faults and when they were lifted go beside it (`.faults`).
const CHAOS_LOG_ENV: &str = "PKCS11_HA_CHAOS_LOG";

/// SplitMix64: enough for choosing members, faults and delays.
struct Rng(u64);

impl Rng {
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

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
}

/// What the chaos does to one member's server or path.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `kill -9` of the server and its workers, restarted later.
    Kill,
    /// Every connection reset at once (instant).
    Reset,
    /// The path accepts and never answers, until it passes again.
    Blackhole,
    /// The path holds every byte, until it forwards them again.
    Pause,
    /// The path is slowed, each chunk held this long each way (a latency
    /// spike), until it passes again.
    Slow(Duration),
    /// Every connection reset, and new ones refused until the path passes
    /// again (a host gone from the network).
    Refuse,
    /// Every connection reset, and new ones accepted and closed after their
    /// first exchange until the path passes again (a load balancer whose
    /// backend is gone).
    AcceptAndClose,
}

/// Per member: when its server or path was disturbed, `[from, until)`
/// (`until` is `None` while it lasts).
type Disturbances = Vec<Vec<(Instant, Option<Instant>)>>;

fn disturbed_between(d: &Disturbances, member: usize, from: Instant, to: Instant) -> bool {
    d[member]
        .iter()
        .any(|(start, end)| *start <= to && end.is_none_or(|e| e >= from))
}

/// One application call: when it ran and whether it succeeded.
struct Call {
    from: Instant,
    to: Instant,
    ok: bool,
    /// The call (`C_CreateObject` or `C_Digest`) and, when it failed, why:
    /// the chaos run names each failure while a member was healthy.
    what: &'static str,
    failure: Option<String>,
    /// The wall clock at `to`, to line a failure up with the HA log.
    at: String,
}

/// Why a call failed, as its return value's name.
fn failure_of<T>(result: &cryptoki::error::Result<T>) -> Option<String> {
    match result {
        Ok(_) => None,
        Err(cryptoki::error::Error::Pkcs11(rv, _)) => Some(format!("{rv:?}")),
        Err(other) => Some(format!("{other}")),
    }
}

/// The members' states as letters (U up, R recovering, D down).
fn states_named(states: &[u64]) -> String {
    states
        .iter()
        .map(|s| match *s {
            PKCS11HA_STATE_UP => 'U',
            PKCS11HA_STATE_RECOVERING => 'R',
            _ => 'D',
        })
        .collect()
}

/// Now as the HA log writes it (UTC, ms), to line faults up with its
/// lines.
fn wall_clock() -> String {
    wall_at(Instant::now())
}

/// A key the long chaos run's writers imported: its ID, whether the
/// call reported it made, and when the call ran.
struct KeyCall {
    id: Vec<u8>,
    ok: bool,
    from: Instant,
    to: Instant,
}

/// `at` as the HA log writes it (UTC, ms).
fn wall_at(at: Instant) -> String {
    let now = (std::time::SystemTime::now() - Instant::now().saturating_duration_since(at))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let secs = now.as_secs();
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The chaos run (issue 12): three members behind fault relays, four
/// threads importing keys and digesting, and a fault every 1-3 s on a
/// member chosen at random -- its server killed and restarted 1-3 s
/// later, its connections reset, its path black-holed, paused or slowed
/// by 50-500 ms each way for 1-3 s, or its connections reset and new
/// ones refused, or accepted and closed, for 1-3 s -- faults on
/// different members overlapping, so that at times every member is out.
/// Afterwards, with every fault lifted and the group settled, every
/// member serves and holds every key the application was given exactly
/// once, and no key it was told failed. The figures of the issue are
/// printed: failed calls while a member was healthy, keys
/// missing or left behind, seconds without a serving member while a server
/// was healthy, and the time from a member's return to serving.
#[test]
#[ignore = "long: 20 s of chaos and the settling after it; run by scripts/chaos"]
fn chaos_run_with_faults_on_different_members_keeps_every_key_consistent() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    const WRITERS: usize = 4;
    const MEMBERS: usize = 3;
    let secs: u64 = std::env::var(CHAOS_SECS_ENV)
        .map(|s| {
            s.parse()
                .expect("PKCS11_HA_CHAOS_SECS is a number of seconds")
        })
        .unwrap_or(CHAOS_DEFAULT_SECS);
    let seed: u64 = match std::env::var(CHAOS_SEED_ENV) {
        Ok(s) => s.parse().expect("PKCS11_HA_CHAOS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("chaos run: {secs} s, {CHAOS_SEED_ENV}={seed}");
    let mut rng = Rng(seed);
    // Every HA log line written, each failed recovery attempt's reason
    // among them: what an outlier is traced from.
    let mut chaos = Chaos::with_settings(MEMBERS, MEMBER_TIMEOUT_MS, "logRepeats = 0\n");
    let (pkcs11, _) = chaos.start();
    let slot = Slot::try_from(0u64).unwrap();
    // The application stays logged in after its writers stop, as a running
    // one does: what a member missed is replayed with its login. Logged
    // out, pkcs11-ha holds no credential, and a member's missed private
    // objects wait for the next login (`pendingChanges` counts them).
    let logged_in = user_session(&pkcs11, slot);
    let (stop, settled) = (AtomicBool::new(false), AtomicBool::new(false));
    let disturbances: Mutex<Disturbances> = Mutex::new(vec![Vec::new(); MEMBERS]);
    let keys: Mutex<Vec<KeyCall>> = Mutex::new(Vec::new());
    let mut calls: Vec<Call> = Vec::new();
    let mut samples: Vec<(Instant, [u64; MEMBERS])> = Vec::new();
    let mut faults: Vec<(usize, Fault)> = Vec::new();
    let serials: Vec<String> = (0..MEMBERS)
        .map(|i| format!("member {i} is {}", chaos.members[i].hsm.tokens[0].serial))
        .collect();
    let mut timeline: Vec<String> = serials;
    // Members whose token SoftHSM lost during the run (`Chaos::token_lost`).
    let mut lost = [false; MEMBERS];
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (pkcs11, stop, keys) = (&pkcs11, &stop, &keys);
                scope.spawn(move || {
                    let session = user_session(pkcs11, slot);
                    let mut calls = Vec::new();
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("c{writer}-{n}").into_bytes();
                        n += 1;
                        let from = Instant::now();
                        let failure = failure_of(&import_key(&session, &id));
                        let ok = failure.is_none();
                        let to = Instant::now();
                        calls.push(Call {
                            from,
                            to,
                            ok,
                            what: "C_CreateObject",
                            failure,
                            at: wall_clock(),
                        });
                        keys.lock().unwrap().push(KeyCall { id, ok, from, to });
                        let from = Instant::now();
                        let digest = session.digest(&Mechanism::Sha256, b"abc");
                        let failure = match &digest {
                            Ok(d) if *d != SHA256_ABC => Some("a wrong digest".to_string()),
                            _ => failure_of(&digest),
                        };
                        calls.push(Call {
                            from,
                            to: Instant::now(),
                            ok: failure.is_none(),
                            what: "C_Digest",
                            failure,
                            at: wall_clock(),
                        });
                    }
                    calls
                })
            })
            .collect();
        let _stop_sampling = StopOnDrop(&settled);
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !settled.load(Ordering::Relaxed) {
                let status = group_status();
                let states: [u64; MEMBERS] = std::array::from_fn(|i| status.members[i].state);
                samples.push((Instant::now(), states));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        let end = Instant::now() + Duration::from_secs(secs);
        let mut restores: Vec<(Instant, usize, Fault)> = Vec::new();
        let mut next_fault = Instant::now() + rng.millis(1000, 3000);
        loop {
            let now = Instant::now();
            let mut due: Vec<(Instant, usize, Fault)> = Vec::new();
            restores.retain(|r| {
                let ready = r.0 <= now || now >= end;
                if ready {
                    due.push(*r);
                }
                !ready
            });
            for (_, i, fault) in due {
                match fault {
                    Fault::Kill => chaos.members[i].restart_server(),
                    _ => chaos.members[i].relay.pass(),
                }
                timeline.push(format!("{} lifted {fault:?} on member {i}", wall_clock()));
                if let Some(last) = disturbances.lock().unwrap()[i].last_mut() {
                    last.1 = Some(Instant::now());
                }
            }
            if now >= end {
                break;
            }
            if now >= next_fault {
                next_fault = now + rng.millis(1000, 3000);
                let i = rng.below(MEMBERS as u64) as usize;
                let busy = restores.iter().any(|r| r.1 == i);
                if !busy {
                    let fault = match rng.below(7) {
                        0 => Fault::Kill,
                        1 => Fault::Reset,
                        2 => Fault::Blackhole,
                        3 => Fault::Pause,
                        4 => Fault::Slow(rng.millis(50, 500)),
                        5 => Fault::Refuse,
                        _ => Fault::AcceptAndClose,
                    };
                    let started = Instant::now();
                    let relay = &mut chaos.members[i].relay;
                    match fault {
                        Fault::Kill => chaos.members[i].kill_server(),
                        Fault::Reset => relay.reset(),
                        Fault::Blackhole => relay.blackhole(),
                        Fault::Pause => relay.pause(),
                        Fault::Slow(delay) => relay.delay(delay),
                        Fault::Refuse => {
                            relay.refuse();
                            relay.reset();
                        }
                        Fault::AcceptAndClose => {
                            relay.accept_and_close();
                            relay.reset();
                        }
                    }
                    let lasts = match fault {
                        Fault::Reset => Some(started),
                        _ => {
                            restores.push((started + rng.millis(1000, 3000), i, fault));
                            None
                        }
                    };
                    disturbances.lock().unwrap()[i].push((started, lasts));
                    timeline.push(format!("{} {fault:?} on member {i}", wall_clock()));
                    faults.push((i, fault));
                }
            }
            let wake = restores
                .iter()
                .map(|r| r.0)
                .chain([next_fault, end])
                .min()
                .unwrap();
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        // The faults are over: writes stop, and the group settles.
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            calls.extend(writer.join().unwrap());
        }
        let settle = Instant::now();
        let limit = Duration::from_secs(120);
        while !(0..MEMBERS).all(|i| lost[i] || serves(i)) {
            if settle.elapsed() >= limit {
                // Only a member whose token SoftHSM lost may stay out.
                for (i, lost) in lost.iter_mut().enumerate() {
                    *lost = !serves(i) && chaos.token_lost(i);
                }
                assert!(
                    (0..MEMBERS).all(|i| lost[i] || serves(i)),
                    "every member whose token SoftHSM still shows serves again after the \
                     chaos; tokens:\n{}\nHA log:\n{}",
                    chaos.tokens(),
                    chaos.log()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        settled.store(true, Ordering::Relaxed);
        samples = sampler.join().unwrap();
    });
    let settling = Instant::now();
    let owed = || {
        let status = group_status();
        (0..MEMBERS)
            .map(|i| (status.members[i].state, status.members[i].pendingChanges))
            .collect::<Vec<_>>()
    };
    // What each member is owed every 10 s of the settling: how fast the
    // replays drain it.
    let mut drain = vec![owed()];
    loop {
        let members = owed();
        if (members.iter().zip(lost))
            .all(|(&(state, kept), lost)| lost || (state == 0 && kept == 0))
        {
            break;
        }
        if settling.elapsed() >= Duration::from_secs(10) * drain.len() as u32 {
            drain.push(members.clone());
        }
        assert!(
            settling.elapsed() < Duration::from_secs(120),
            "every member serves with nothing left to replay: not within 120 s; \
             (state, changes kept) per member: {members:?}; every 10 s from the writers' \
             stop: {drain:?}; HA log:\n{}",
            chaos.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "settled in {:?}; (state, changes kept) per member every 10 s from then: {drain:?}",
        settling.elapsed()
    );
    let mut disturbances = disturbances.into_inner().unwrap();
    let keys = keys.into_inner().unwrap();
    // A member whose token was lost is out of the figures from its last
    // sample serving: out for good from then on, whatever the faults did.
    for i in (0..MEMBERS).filter(|i| lost[*i]) {
        let last_served = samples
            .iter()
            .rev()
            .find(|(_, states)| states[i] == PKCS11HA_STATE_UP)
            .map_or_else(|| samples[0].0, |(at, _)| *at);
        disturbances[i].push((last_served, None));
        eprintln!(
            "member {i}'s token was lost: SoftHSM shows it uninitialised (killed while it \
             wrote its token object, as SoftHSM can be); the group kept it out, and it is out \
             of the figures and the key checks from its last sample serving, {}",
            wall_at(last_served)
        );
    }

    let healthy_during = |from: Instant, to: Instant| {
        (0..MEMBERS).any(|i| !disturbed_between(&disturbances, i, from, to))
    };
    let failed: Vec<&Call> = calls.iter().filter(|c| !c.ok).collect();
    // Where the writers' time went: calls that took a second or more
    // (they waited for a member, or at the write barrier) against all,
    // to tell the keys made fewer by load from fewer by waiting.
    let spent = |f: &dyn Fn(&Call) -> bool| -> Duration {
        calls
            .iter()
            .filter(|c| f(c))
            .map(|c| c.to.duration_since(c.from))
            .sum()
    };
    let (all_time, long_time) = (
        spent(&|_| true),
        spent(&|c| c.to.duration_since(c.from) >= Duration::from_secs(1)),
    );
    eprintln!(
        "writers' time in calls: {:.1} s, {:.1} s of it in calls of 1 s or more ({} calls; {} creates took {:.1} ms on average)",
        all_time.as_secs_f64(),
        long_time.as_secs_f64(),
        calls
            .iter()
            .filter(|c| c.to.duration_since(c.from) >= Duration::from_secs(1))
            .count(),
        calls.iter().filter(|c| c.what == "C_CreateObject").count(),
        spent(&|c| c.what == "C_CreateObject").as_secs_f64() * 1000.0
            / calls.iter().filter(|c| c.what == "C_CreateObject").count().max(1) as f64
    );
    let failed_healthy: Vec<&&Call> = failed
        .iter()
        .filter(|c| healthy_during(c.from, c.to))
        .collect();
    let failed_while_healthy = failed_healthy.len();
    // Each such failure by call, return value and the members' states
    // when it returned (the last sample before), and the first few with
    // their times, to line up with the HA log.
    let states_at = |t: Instant| {
        samples
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or("?".to_string(), |(_, states)| states_named(states))
    };
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for call in &failed_healthy {
        let kind = format!(
            "{} {} with members {}",
            call.what,
            call.failure.as_deref().unwrap_or("?"),
            states_at(call.to)
        );
        *kinds.entry(kind).or_default() += 1;
    }
    for (kind, count) in &kinds {
        eprintln!("failed while a member was healthy: {count} x {kind}");
    }
    for call in failed_healthy.iter().take(20) {
        eprintln!(
            "  {} {} {} after {:?}",
            call.at,
            call.what,
            call.failure.as_deref().unwrap_or("?"),
            call.to.duration_since(call.from)
        );
    }
    // Bursts: failures less than 200 ms apart, the largest ten, with the
    // members' states at their start.
    let mut by_end: Vec<&Call> = failed_healthy.iter().map(|c| **c).collect();
    by_end.sort_by_key(|c| c.to);
    let mut bursts: Vec<(&Call, &Call, usize)> = Vec::new();
    for call in by_end {
        match bursts.last_mut() {
            Some((_, last, count)) if call.from <= last.to + Duration::from_millis(200) => {
                *last = call;
                *count += 1;
            }
            _ => bursts.push((call, call, 1)),
        }
    }
    bursts.sort_by_key(|b| std::cmp::Reverse(b.2));
    for (first, last, count) in bursts.iter().take(10) {
        eprintln!(
            "  burst from {} for {:?}: {count} failed calls, members {} at its start",
            first.at,
            last.to.duration_since(first.to),
            states_at(first.to)
        );
    }
    // The outage while a server was healthy, split by what the healthy
    // members were doing: catching up (recovering) or out (down).
    let mut outage_while_healthy = Duration::ZERO;
    let mut outage_recovering = Duration::ZERO;
    for pair in samples.windows(2) {
        let ((at, states), (next, _)) = (pair[0], pair[1]);
        if states.contains(&PKCS11HA_STATE_UP) || !healthy_during(at, at) {
            continue;
        }
        outage_while_healthy += next.duration_since(at);
        let healthy_recovering = (0..MEMBERS).any(|i| {
            states[i] == PKCS11HA_STATE_RECOVERING && !disturbed_between(&disturbances, i, at, at)
        });
        if healthy_recovering {
            outage_recovering += next.duration_since(at);
        }
    }
    let samples: Vec<(Instant, [bool; MEMBERS])> = samples
        .into_iter()
        .map(|(at, states)| (at, states.map(|s| s == PKCS11HA_STATE_UP)))
        .collect();
    let mut returns: Vec<Duration> = Vec::new();
    let mut reset_returns: Vec<Duration> = Vec::new();
    let mut slowest: Vec<(Duration, usize, Instant)> = Vec::new();
    for (i, spans) in disturbances.iter().enumerate() {
        for (k, (start, end)) in spans.iter().enumerate() {
            let Some(end) = end else { continue };
            let next_start = spans.get(k + 1).map(|s| s.0);
            // Taken out by this fault (before the next one on it), and
            // serving again after it was lifted.
            let Some(out) = samples
                .iter()
                .find(|(t, serving)| t >= start && !serving[i])
                .map(|(t, _)| *t)
                .filter(|out| next_start.is_none_or(|n| *out < n))
            else {
                continue;
            };
            let Some(back) = samples
                .iter()
                .find(|(t, serving)| *t >= out.max(*end) && serving[i])
                .map(|(t, _)| *t)
            else {
                continue;
            };
            if next_start.is_none_or(|n| n > back) {
                slowest.push((back.duration_since(*end), i, *end));
                returns.push(back.duration_since(*end));
                if start == end {
                    reset_returns.push(back.duration_since(*end));
                }
            }
        }
    }
    returns.sort();
    reset_returns.sort();
    // The slowest returns, with when their fault was lifted (the fault
    // timeline names it), to line up with the HA log's recovery lines.
    slowest.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (took, i, lifted) in slowest.iter().take(5) {
        eprintln!(
            "slow return: member {i} serving {took:?} after its fault was lifted at {}",
            wall_at(*lifted)
        );
    }

    let contents: Vec<_> = (chaos.members.iter().zip(lost))
        .filter(|(_, lost)| !lost)
        .map(|(m, _)| ids_on_member(&pkcs11, m))
        .collect();
    let ok_keys: Vec<&Vec<u8>> = keys.iter().filter(|k| k.ok).map(|k| &k.id).collect();
    let failed_keys: Vec<&Vec<u8>> = keys.iter().filter(|k| !k.ok).map(|k| &k.id).collect();
    let missing: Vec<String> = ok_keys
        .iter()
        .filter(|id| contents.iter().any(|c| !c.contains_key(**id)))
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .collect();
    let left_behind: Vec<String> = failed_keys
        .iter()
        .filter(|id| contents.iter().any(|c| c.contains_key(**id)))
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .collect();
    // Named with the members holding more than one copy and when the call
    // ran, to line up with the HA log and the fault timeline.
    let members_kept: Vec<usize> = (0..MEMBERS).filter(|i| !lost[*i]).collect();
    let doubled: Vec<String> = (keys.iter().filter(|k| k.ok))
        .filter_map(|key| {
            let on: Vec<String> = (contents.iter().zip(&members_kept))
                .filter_map(|(c, i)| {
                    (c.get(&key.id))
                        .filter(|n| **n > 1)
                        .map(|n| format!("{n} on member {i}"))
                })
                .collect();
            (!on.is_empty()).then(|| {
                format!(
                    "{} ({}; made {}-{})",
                    String::from_utf8_lossy(&key.id),
                    on.join(", "),
                    wall_at(key.from),
                    wall_at(key.to)
                )
            })
        })
        .collect();
    // What any client pays to reach each member afresh, as recovery does
    // after a reset: p11-kit's server starts a worker per connection, and
    // SoftHSM reads every object of the token before the worker answers.
    let fresh_clients: Vec<String> = (chaos.members.iter().zip(lost))
        .filter(|(_, lost)| !lost)
        .map(|(member, _)| member)
        .zip(&contents)
        .map(|(member, held)| {
            let started = Instant::now();
            let listed = Command::new("pkcs11-tool")
                .args(["--module", &p11kit::client_module(), "--list-token-slots"])
                .env("P11_KIT_SERVER_ADDRESS", member.relay.address())
                .output()
                .expect("pkcs11-tool runs");
            assert!(listed.status.success(), "a fresh client reaches the member");
            format!("{} ms ({} keys)", started.elapsed().as_millis(), held.len())
        })
        .collect();
    let count = |f: fn(&Fault) -> bool| faults.iter().filter(|(_, x)| f(x)).count();
    eprintln!(
        "a fresh client reaching each member's token after the run, writers stopped: {}",
        fresh_clients.join(", ")
    );
    eprintln!(
        "chaos run figures ({secs} s, seed {seed}):\n\
         faults: {} ({} kills, {} resets, {} black holes, {} pauses, {} slowed paths, \
         {} refusing, {} accepting and closing)\n\
         application calls: {}, failed: {}, failed while at least one member was healthy: {}\n\
         keys reported made: {}, reported failed: {}\n\
         keys reported made but missing from a member after settling: {}\n\
         keys reported failed but present on a member: {}\n\
         keys on a member more than once: {}\n\
         seconds with no member serving while a server was healthy: {:.1} \
         ({:.1} with a healthy member recovering, the rest with every healthy member down)\n\
         time from a member's return to serving: p50 {:?}, p99 {:?} (n = {}); \
         after a connection reset: p50 {:?}, p99 {:?} (n = {})",
        faults.len(),
        count(|f| matches!(f, Fault::Kill)),
        count(|f| matches!(f, Fault::Reset)),
        count(|f| matches!(f, Fault::Blackhole)),
        count(|f| matches!(f, Fault::Pause)),
        count(|f| matches!(f, Fault::Slow(_))),
        count(|f| matches!(f, Fault::Refuse)),
        count(|f| matches!(f, Fault::AcceptAndClose)),
        calls.len(),
        failed.len(),
        failed_while_healthy,
        ok_keys.len(),
        failed_keys.len(),
        missing.len(),
        left_behind.len(),
        doubled.len(),
        outage_while_healthy.as_secs_f64(),
        outage_recovering.as_secs_f64(),
        percentile(&returns, 0.5),
        percentile(&returns, 0.99),
        returns.len(),
        percentile(&reset_returns, 0.5),
        percentile(&reset_returns, 0.99),
        reset_returns.len(),
    );
    if let Ok(path) = std::env::var(CHAOS_LOG_ENV) {
        std::fs::write(&path, chaos.log()).expect("the HA log is copied where asked");
        std::fs::write(format!("{path}.faults"), timeline.join("\n"))
            .expect("the fault timeline is written beside it");
    }
    let missing_per_member: Vec<usize> = contents
        .iter()
        .map(|c| ok_keys.iter().filter(|id| !c.contains_key(**id)).count())
        .collect();
    assert!(
        missing.is_empty(),
        "keys reported made but missing (per member: {missing_per_member:?}): {missing:?}; \
         HA log:\n{}",
        chaos.log()
    );
    assert!(
        left_behind.is_empty(),
        "keys reported failed but present: {left_behind:?}; HA log:\n{}",
        chaos.log()
    );
    assert!(
        doubled.is_empty(),
        "keys on a member more than once: {doubled:?}"
    );
    drop(logged_in);
    pkcs11.finalize().unwrap();
}
