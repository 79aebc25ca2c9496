//! Reconciliation across processes (issue 20): what one process made or
//! deleted while a member was down reaches that member from a later
//! process, after the first has exited.
//!
//! Each application is a child process (`tests/c/reconcile_user.c`) on
//! `target/release/libpkcs11_ha.so`. Member B is "down" for a process while
//! its SoftHSM token directory is moved out of the token directory: B's
//! library then has no token with B's serial, as a library whose HSM cannot
//! be reached has none. What B holds is read directly with SoftHSM, never
//! through the group.
mod common;
#[path = "common/p11kit.rs"]
mod p11kit;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

/// How long a member may go without receiving any of what it lacks: a
/// correctness bound, far above what a pass takes here (see docs/design.md
/// for figures). A pass runs at the lowest priority, so it takes what the
/// machine leaves, however long: beside two busy loops on two cores, B
/// received 337 of 500 objects from eight processes in 180 s and the test
/// failed while the copies went on. The waits below therefore count from
/// B's last change, within [`OVERALL`] patiences in all.
const PATIENCE: Duration = Duration::from_secs(180);

/// The same for two hosts copying at once: each copies every object (too
/// many to search for each first), then removes the doubles, and a pass
/// runs at the lowest priority -- on a busy two-core machine one such pass
/// took a minute.
const HOSTS_PATIENCE: Duration = Duration::from_secs(240);

/// How many patiences a wait may take in all while B keeps changing: an end
/// for copies and removals that undo each other forever.
const OVERALL: u32 = 3;

/// Polls `read` until what it reads satisfies `done`; fails once `patience`
/// has passed without a change in what it reads (or `OVERALL` patiences in
/// all) with `what`, what it read last and `log`.
fn wait_while_changing<T: PartialEq + std::fmt::Debug>(
    what: &str,
    patience: Duration,
    read: impl Fn() -> Option<T>,
    done: impl Fn(&T) -> bool,
    log: impl Fn() -> String,
) {
    let started = Instant::now();
    let mut changed = started;
    let mut last = None;
    loop {
        let held = read();
        if held.as_ref().is_some_and(&done) {
            return;
        }
        if held.is_some() && held != last {
            changed = Instant::now();
            last = held;
        }
        assert!(
            changed.elapsed() < patience && started.elapsed() < patience * OVERALL,
            "{what}: not within {patience:?} of its last change ({:?} in all); last read {last:?}; HA log:\n{}",
            started.elapsed(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    hsm: SoftHsm,
    config: PathBuf,
    state: PathBuf,
    program: PathBuf,
    /// B's token directory, inside the token directory or parked outside.
    b_dir: OsString,
    parked: PathBuf,
}

fn subdirs(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

impl Setup {
    /// Two members, "member0" (A, primary) and "member1" (B), sharing the
    /// domain key, and a state directory of their own. The caller holds the
    /// serial guard.
    fn new() -> Setup {
        let mut hsm = SoftHsm::new(&["member0"]);
        let before = subdirs(&hsm.token_dir());
        hsm.add_token("member1");
        let b_dir = subdirs(&hsm.token_dir())
            .difference(&before)
            .next()
            .expect("member1's token directory")
            .clone();
        provision_domain(&hsm, &DOMAIN_VALUE);
        let config = write_config(
            hsm.dir.path(),
            &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
            false,
        );
        let state = hsm.dir.path().join("state");
        assert!(fs::read_to_string(&config).unwrap().contains("haStateDir"));
        let log_dir = hsm.dir.path().join("halog");
        fs::create_dir_all(&log_dir).unwrap();
        let mut text = fs::read_to_string(&config).unwrap();
        text += &format!("haLogStatus = enabled\nhaLogPath = {}\n", log_dir.display());
        fs::write(&config, text).unwrap();
        let program = build_c_program("reconcile_user", hsm.dir.path());
        let parked = hsm.dir.path().join("parked");
        Setup {
            hsm,
            config,
            state,
            program,
            b_dir,
            parked,
        }
    }

    fn take_b_down(&self) {
        fs::rename(self.hsm.token_dir().join(&self.b_dir), &self.parked).unwrap();
    }

    fn bring_b_back(&self) {
        fs::rename(&self.parked, self.hsm.token_dir().join(&self.b_dir)).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .arg(release_library_path())
            .args(args)
            .env(SOFTHSM_CONF_ENV, &self.hsm.conf)
            .env(CONF_ENV, &self.config)
            .env("RECONCILE_USER_PIN", USER_PIN);
        command
    }

    /// Runs one application process to its end; it must succeed.
    fn run(&self, args: &[&str]) {
        let out = self.command(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.ends_with("ok\n"),
            "reconcile_user {args:?}: {}; stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Moves B's token to a token directory of its own, which only a
    /// `p11-kit server` (not yet running) exports, and makes the group
    /// reach B through p11-kit's client: the processes' own SoftHSM no
    /// longer sees B. Recovery also tries every second.
    fn serve_b_remotely(&self) -> RemoteB {
        let dir = self.hsm.dir.path().join("remote-tokens");
        fs::create_dir(&dir).unwrap();
        fs::rename(
            self.hsm.token_dir().join(&self.b_dir),
            dir.join(&self.b_dir),
        )
        .unwrap();
        let conf = self.hsm.dir.path().join("remote-softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.display()
            ),
        )
        .unwrap();
        let socket = self.hsm.dir.path().join("b.sock");
        let client = p11kit::client_module();
        let text = fs::read_to_string(&self.config).unwrap().replace(
            "[Libraries]\n",
            &format!("[Libraries]\nremote = {client}\n"),
        );
        let text = format!(
            "{text}AutoReconnectInterval = 1\n\n[LibraryEnvironment]\n\
             remote.P11_KIT_SERVER_ADDRESS = unix:path={}\n",
            socket.display()
        );
        fs::write(&self.config, text).unwrap();
        RemoteB { conf, socket }
    }

    /// A second "host": the same members and configuration, but a state
    /// directory (so a lock file) of its own, as on another machine.
    fn second_host_config(&self) -> PathBuf {
        let text = fs::read_to_string(&self.config).unwrap();
        let other = self.hsm.dir.path().join("state-of-the-other-host");
        let changed = text.replace(
            &format!("haStateDir = {}", self.state.display()),
            &format!("haStateDir = {}", other.display()),
        );
        assert_ne!(changed, text, "the configuration names haStateDir");
        let path = self.hsm.dir.path().join("other-host.conf");
        fs::write(&path, changed).unwrap();
        path
    }

    /// Makes, directly on B, one more data object as `reconcile_user`
    /// makes it: a copy identical to the one B holds, as two hosts copying
    /// at once leave behind.
    fn copy_again_on_b(&self, labels: &[String]) {
        self.hsm.activate();
        let softhsm = load_softhsm();
        initialize(&softhsm).expect("C_Initialize of SoftHSM");
        let slot = slot_by_label(&softhsm, "member1").expect("member1");
        let session = user_session(&softhsm, slot);
        for label in labels {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Value(label.as_bytes().to_vec()),
                ])
                .expect("C_CreateObject on member1");
        }
        drop(session);
        softhsm.finalize().unwrap();
    }

    /// Starts an application process that uses the group until its stdin
    /// closes, once it says it is logged in.
    fn start_user(&self) -> Child {
        self.start_user_with(&self.config)
    }

    /// [`Setup::start_user`] with the configuration `config`.
    fn start_user_with(&self, config: &Path) -> Child {
        let mut child = self
            .command(&["stay"])
            .env(CONF_ENV, config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self::expect_ready(&mut child);
        child
    }

    /// Waits for an application process to say it is logged in.
    fn expect_ready(child: &mut Child) {
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready, "ready\n", "the application did not start");
    }

    /// Ends an application started by [`Setup::start_user`]; it must
    /// finalise cleanly.
    fn end_user(mut child: Child) {
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the application ended with {}",
            out.status
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    }

    /// How many objects with each label `token` holds, read directly.
    /// Asserts that both members hold each of `labels` exactly once.
    fn assert_both_hold_each_once(&self, labels: &[impl AsRef<str>]) {
        for member in ["member0", "member1"] {
            let held = self.labels_on(member);
            let wrong: Vec<(&str, usize)> = labels
                .iter()
                .map(|l| (l.as_ref(), count(&held, l.as_ref())))
                .filter(|(_, n)| *n != 1)
                .collect();
            assert!(
                wrong.is_empty(),
                "{member} holds these not exactly once: {wrong:?}; HA log:\n{}",
                self.ha_log()
            );
        }
    }

    /// What the processes wrote to the HA log, for failure messages.
    fn ha_log(&self) -> String {
        fs::read_to_string(self.hsm.dir.path().join("halog/haErrorLog.txt")).unwrap_or_default()
    }

    fn labels_on(&self, token: &str) -> HashMap<String, usize> {
        self.try_labels_on(token)
            .unwrap_or_else(|| panic!("token {token} could not be read whole"))
    }

    /// [`Setup::labels_on`], or `None` while SoftHSM shows no such token.
    fn try_labels_on(&self, token: &str) -> Option<HashMap<String, usize>> {
        labels_on(&self.hsm.conf, token, Reading::LoggedIn)
    }

    /// Waits until B's objects (read as `reading` says) satisfy `done`, or
    /// fails once B has not changed for [`PATIENCE`], with what it held last.
    fn wait_for_b(
        &self,
        what: &str,
        reading: Reading,
        done: impl Fn(&HashMap<String, usize>) -> bool,
    ) {
        self.wait_for_b_read_by(what, || labels_on(&self.hsm.conf, "member1", reading), done)
    }

    /// [`Setup::wait_for_b`] with B's objects read by `read`.
    fn wait_for_b_read_by(
        &self,
        what: &str,
        read: impl Fn() -> Option<HashMap<String, usize>>,
        done: impl Fn(&HashMap<String, usize>) -> bool,
    ) {
        wait_while_changing(
            &format!("member B never came to {what}"),
            PATIENCE,
            read,
            done,
            || self.ha_log(),
        );
    }
}

/// Member B in a token directory of its own (see
/// [`Setup::serve_b_remotely`]).
struct RemoteB {
    conf: PathBuf,
    socket: PathBuf,
}

impl RemoteB {
    fn start(&self) -> p11kit::P11KitServer {
        p11kit::P11KitServer::start(SOFTHSM_LIB, &self.conf, "member1", &self.socket)
    }

    /// B's objects by label, read directly (see [`labels_on`]).
    fn labels(&self) -> Option<HashMap<String, usize>> {
        labels_on(&self.conf, "member1", Reading::Public)
    }
}

/// Whether a direct reading of a token logs in. SoftHSM 2.6.1 rewrites
/// its token file at every login, and a process that reads that file
/// meanwhile loses the token: one starting then has no slot for it, one
/// running no longer sees objects others make. So readings beside running
/// applications log in only to see private objects.
#[derive(Clone, Copy)]
enum Reading {
    Public,
    LoggedIn,
}

/// How many objects with each label the token `token` of the SoftHSM
/// configured by `softhsm_conf` holds, read directly; `None` while SoftHSM
/// shows no such token (it skips a token whose file another process is
/// writing) or an object found cannot be read. The caller holds the
/// serial guard.
fn labels_on(softhsm_conf: &Path, token: &str, reading: Reading) -> Option<HashMap<String, usize>> {
    std::env::set_var(SOFTHSM_CONF_ENV, softhsm_conf);
    let softhsm = load_softhsm();
    initialize(&softhsm).expect("C_Initialize of SoftHSM");
    let mut labels = HashMap::new();
    let mut complete = true;
    let slot = slot_by_label(&softhsm, token);
    if let Some(slot) = slot {
        let session = match reading {
            Reading::LoggedIn => user_session(&softhsm, slot),
            Reading::Public => softhsm.open_ro_session(slot).expect("C_OpenSession"),
        };
        for object in session.find_objects(&[Attribute::Token(true)]).unwrap() {
            // An object removed since the search makes the reading unsure.
            let attributes = session.get_attributes(object, &[AttributeType::Label]);
            match attributes.ok().and_then(|a| a.first().cloned()) {
                Some(Attribute::Label(label)) => {
                    *labels
                        .entry(String::from_utf8_lossy(&label).into_owned())
                        .or_insert(0) += 1
                }
                _ => complete = false,
            }
        }
    }
    softhsm.finalize().unwrap();
    slot.filter(|_| complete).map(|_| labels)
}

/// How many data objects with each label token `token` holds, as
/// `pkcs11-tool --list-objects` run on SoftHSM directly shows them without
/// a login (see [`Reading`]); `None` when it fails.
fn data_labels_by_pkcs11_tool(hsm: &SoftHsm, token: &str) -> Option<HashMap<String, usize>> {
    let out = Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_LIB, "--token-label", token])
        .args(["--list-objects", "--type", "data"])
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut labels = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(label) = line.trim().strip_prefix("label:") {
            let label = label.trim().trim_matches('\'');
            *labels.entry(label.to_owned()).or_insert(0) += 1;
        }
    }
    Some(labels)
}

fn count(held: &HashMap<String, usize>, label: &str) -> usize {
    held.get(label).copied().unwrap_or(0)
}

/// Process A makes a data object and a key while member B is down and
/// exits; B returns; process C starts: B comes to hold both, exactly once.
#[test]
fn what_an_exited_process_made_while_a_member_was_down_reaches_it() {
    let _guard = serial_guard();
    let setup = Setup::new();
    setup.take_b_down();
    setup.run(&["make", "while-b-down"]);
    setup.bring_b_back();
    let before = setup.labels_on("member1");
    assert_eq!(count(&before, "while-b-down"), 0, "B was down: {before:?}");
    assert_eq!(count(&before, "while-b-down-key"), 0);

    let c = setup.start_user();
    setup.wait_for_b("hold the object and the key", Reading::LoggedIn, |held| {
        count(held, "while-b-down") > 0 && count(held, "while-b-down-key") > 0
    });
    Setup::end_user(c);

    for member in ["member0", "member1"] {
        let held = setup.labels_on(member);
        assert_eq!(count(&held, "while-b-down"), 1, "{member}: {held:?}");
        assert_eq!(count(&held, "while-b-down-key"), 1, "{member}: {held:?}");
    }
}

/// A process whose member B returns while another process holds the
/// group's reconciliation lock (here: the test) leaves the copying to that
/// process's pass: its recovery copies nothing beside it, and its own pass,
/// once the lock is free, copies what B lacks exactly once. (A recovery
/// that copied beside a pass could leave each object twice on B.) B is
/// reached through `p11-kit server`, so that a process can lose it and
/// find it again, as it cannot an in-process SoftHSM token; the data
/// object is what is checked, since p11-kit 0.24 forwards no wrapping
/// mechanism, so no key can reach B that way.
#[test]
fn a_member_returning_while_another_process_reconciles_is_not_copied_to_twice() {
    let _guard = serial_guard();
    let setup = Setup::new();
    let remote = setup.serve_b_remotely();
    setup.run(&["make", "while-b-down"]);
    let user = setup.start_user();

    let state = pkcs11_ha::state_dir::StateDir::open(&setup.state).unwrap();
    let group_serial = pkcs11_ha::group::virtual_serial(None, &setup.hsm.serials());
    let lock = state
        .lock_group(&group_serial, Duration::ZERO, |_| true)
        .unwrap()
        .expect("no process reconciles yet: B is down");
    let server = remote.start();
    let b_serial = &setup.hsm.token("member1").serial;
    let deadline = Instant::now() + PATIENCE;
    while !setup
        .ha_log()
        .lines()
        .any(|l| l.contains(b_serial.as_str()) && l.contains("member recovered"))
    {
        assert!(
            Instant::now() < deadline,
            "B never recovered in the process; HA log:\n{}",
            setup.ha_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = remote.labels().expect("B can be read");
    assert_eq!(
        count(&held, "while-b-down"),
        0,
        "the recovery copied beside the lock's holder: {held:?}"
    );

    drop(lock);
    setup.wait_for_b_read_by(
        "hold the object it missed",
        || remote.labels(),
        |held| count(held, "while-b-down") > 0,
    );
    Setup::end_user(user);
    let held = remote.labels().expect("B can be read");
    assert_eq!(count(&held, "while-b-down"), 1, "B: {held:?}");
    drop(server);
}

/// Eight processes start at once against a group whose member B lacks 500
/// objects: B ends with each exactly once.
#[test]
fn eight_processes_at_once_copy_each_missing_object_once() {
    let _guard = serial_guard();
    let setup = Setup::new();
    setup.take_b_down();
    setup.run(&["many", "bulk", "500"]);
    setup.bring_b_back();
    let labels: Vec<String> = (0..500).map(|i| format!("bulk-{i}")).collect();
    let before = setup.labels_on("member1");
    assert!(labels.iter().all(|l| count(&before, l) == 0), "{before:?}");

    // Each logged in before the next starts (a SoftHSM starting while
    // another process logs in may lose a token, see [`Reading`]); all
    // eight run, and reconcile, at once.
    let children: Vec<Child> = (0..8).map(|_| setup.start_user()).collect();
    setup.wait_for_b("hold all 500 objects", Reading::Public, |held| {
        labels.iter().all(|l| count(held, l) > 0)
    });
    for child in children {
        Setup::end_user(child);
    }

    // Every process has ended: nothing can copy any more.
    setup.assert_both_hold_each_once(&labels);
}

/// Two hosts share no lock (here: each its own state directory, so its own
/// lock file). Member B lacks 80 objects (too many to search for each
/// before its copy, so both hosts copy them) and holds 5 others twice, as two
/// hosts copying one object at once leave it; two processes of each host
/// start at once. B comes to hold every object exactly once; the members
/// still do after one more process, once every process of both hosts has
/// ended (a process that ends between a copy and its check leaves what the
/// next pass tidies).
#[test]
fn two_hosts_reconciling_at_once_leave_each_object_exactly_once() {
    let _guard = serial_guard();
    let setup = Setup::new();
    let doubled: Vec<String> = (0..5).map(|i| format!("doubled-{i}")).collect();
    setup.run(&["many", "doubled", "5"]);
    setup.copy_again_on_b(&doubled);
    setup.take_b_down();
    setup.run(&["many", "bulk", "80"]);
    setup.bring_b_back();
    let missing: Vec<String> = (0..80).map(|i| format!("bulk-{i}")).collect();
    let before = setup.labels_on("member1");
    assert!(doubled.iter().all(|l| count(&before, l) == 2), "{before:?}");
    assert!(missing.iter().all(|l| count(&before, l) == 0), "{before:?}");
    let other_host = setup.second_host_config();
    let every_label: Vec<&String> = doubled.iter().chain(&missing).collect();
    let each_once = |held: &HashMap<String, usize>| every_label.iter().all(|l| count(held, l) == 1);

    // Started one after another, as in the test of eight processes.
    let children: Vec<Child> = [&setup.config, &other_host, &setup.config, &other_host]
        .into_iter()
        .map(|config| setup.start_user_with(config))
        .collect();
    // Read from a process of its own while the hosts' processes run: a
    // SoftHSM that starts while others rewrite both token files may abort
    // (`SlotManager::insertToken` asserts), and then only that read is lost.
    wait_while_changing(
        "member B never came to hold every object exactly once",
        HOSTS_PATIENCE,
        || data_labels_by_pkcs11_tool(&setup.hsm, "member1"),
        each_once,
        || setup.ha_log(),
    );
    for child in children {
        Setup::end_user(child);
    }

    let last = setup.start_user();
    setup.wait_for_b("hold every object exactly once", Reading::Public, each_once);
    Setup::end_user(last);
    setup.assert_both_hold_each_once(&every_label);
}

/// An object deleted while member B was down is removed from B when B
/// returns, not copied back to A; what was not deleted stays.
#[test]
fn a_deletion_made_while_a_member_was_down_is_not_undone() {
    let _guard = serial_guard();
    let setup = Setup::new();
    setup.run(&["make", "doomed"]);
    setup.take_b_down();
    setup.run(&["destroy", "doomed"]);
    let records: Vec<String> = fs::read_dir(&setup.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deleted"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "one group, one deletion record");
    assert_eq!(records[0].lines().count(), 1, "{records:?}");
    assert!(
        !records[0].contains("doomed"),
        "no attribute values: {records:?}"
    );
    setup.bring_b_back();
    assert_eq!(
        count(&setup.labels_on("member1"), "doomed"),
        1,
        "B missed it"
    );

    // The operator's `group sync` reads the record too.
    let pin = setup.hsm.dir.path().join("pin");
    fs::write(&pin, format!("{USER_PIN}\n")).unwrap();
    fs::set_permissions(&pin, fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pkcs11-ha"))
        .args(["group", "sync", "--group", GROUP_LABEL, "--pin-file"])
        .arg(&pin)
        .env(SOFTHSM_CONF_ENV, &setup.hsm.conf)
        .env(CONF_ENV, &setup.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "group sync: {said}");
    assert!(
        said.contains("Not copied: data object \"doomed\""),
        "{said}"
    );
    assert_eq!(count(&setup.labels_on("member0"), "doomed"), 0, "{said}");

    let c = setup.start_user();
    setup.wait_for_b("be rid of the deleted object", Reading::LoggedIn, |held| {
        count(held, "doomed") == 0
    });
    Setup::end_user(c);

    for member in ["member0", "member1"] {
        let held = setup.labels_on(member);
        assert_eq!(count(&held, "doomed"), 0, "{member}: {held:?}");
        assert_eq!(count(&held, "doomed-key"), 1, "{member}: {held:?}");
    }
}

/// The issue's own reproduction: member B behind `p11-kit server`, its
/// server stopped; `pkcs11-tool --write-object` through the virtual slot
/// returns and exits; B's server starts again; another process uses the
/// group: B comes to hold the object, once.
#[test]
fn an_object_written_by_pkcs11_tool_while_a_remote_member_was_down_reaches_it() {
    let _guard = serial_guard();
    let local = SoftHsm::new(&["local"]);
    provision_domain(&local, &DOMAIN_VALUE);
    let remote = SoftHsm::new(&["remote"]);
    provision_domain(&remote, &DOMAIN_VALUE);
    let members = [
        local.tokens[0].serial.clone(),
        remote.tokens[0].serial.clone(),
    ];
    let config = write_config(
        local.dir.path(),
        &[
            (SOFTHSM_LIB_NAME, SOFTHSM_LIB),
            ("remote", &p11kit::client_module()),
        ],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    );
    let library = release_library_path();
    let socket = |n: usize| remote.dir.path().join(format!("p11-kit-{n}.sock"));
    // Down: nothing listens at the address.
    let object = local.dir.path().join("object.bin");
    fs::write(&object, b"written while B was down").unwrap();
    let out = pkcs11_tool(&library, &local, &config)
        .env(
            p11kit::ADDRESS_ENV,
            format!("unix:path={}", socket(0).display()),
        )
        .args(["--token-label", GROUP_LABEL, "--login", "--pin", USER_PIN])
        .arg("--write-object")
        .arg(&object)
        .args(["--type", "data", "--label", "while-b-down"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-tool --write-object: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(
            &labels_on(&remote.conf, "remote", Reading::Public).unwrap(),
            "while-b-down"
        ),
        0
    );

    let server = p11kit::P11KitServer::start(SOFTHSM_LIB, &remote.conf, "remote", &socket(1));
    let program = build_c_program("reconcile_user", local.dir.path());
    let mut c = Command::new(&program)
        .arg(&library)
        .arg("stay")
        .env(SOFTHSM_CONF_ENV, &local.conf)
        .env(CONF_ENV, &config)
        .env(p11kit::ADDRESS_ENV, server.address())
        .env("RECONCILE_USER_PIN", USER_PIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let held = labels_on(&remote.conf, "remote", Reading::Public);
        if held.as_ref().is_some_and(|h| count(h, "while-b-down") > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never got the object: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Setup::end_user(c);
    for (hsm, token) in [(&local, "local"), (&remote, "remote")] {
        let held = labels_on(&hsm.conf, token, Reading::LoggedIn).unwrap();
        assert_eq!(count(&held, "while-b-down"), 1, "{token}: {held:?}");
    }
}
