//! Auto-recovery and the watchdog, on fault-injecting members over real
//! SoftHSM tokens: a failed member rejoins within one interval with what it
//! missed, even when the application calls nothing; the HA log and the
//! state API tell what happened; a member that hangs is taken out after
//! `memberTimeout`.

mod common;

use common::faulty::FaultyMember;
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki_sys::CKR_DEVICE_ERROR;
use pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a member may take to be taken out or to rejoin, to make a
/// call reach a hung member, or to fail its recovery attempts: a
/// correctness bound, not a target (these take about one
/// `AutoReconnectInterval` here, idle), with room for a loaded two-core
/// machine.
const PATIENCE: Duration = Duration::from_secs(30);

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A group of two faulty-member copies over two SoftHSM tokens.
struct Group {
    hsm: SoftHsm,
    members: Vec<FaultyMember>,
    log_dir: PathBuf,
    pkcs11: Pkcs11,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl Group {
    fn start(settings: &str, flags: CInitializeFlags) -> Group {
        let guard = serial_guard();
        let hsm = SoftHsm::new(&["m0", "m1"]);
        provision_domain(&hsm, &DOMAIN_VALUE);
        let dir = hsm.dir.path().to_path_buf();
        let members = FaultyMember::one_per_token(hsm.dir.path(), SOFTHSM_LIB, &hsm.serials());
        let log_dir = dir.join("halog");
        std::fs::create_dir_all(&log_dir).unwrap();
        let text = format!(
            "[Libraries]\nm0 = {}\nm1 = {}\n\n[VirtualToken]\nVirtualToken00Label = {GROUP_LABEL}\n\
             VirtualToken00Members = {}\n\n[HAConfiguration]\nhaLogStatus = enabled\nhaLogPath = {}\n{settings}\n",
            members[0].path.display(),
            members[1].path.display(),
            hsm.serials().join(","),
            log_dir.display()
        );
        let config = dir.join("recovery.conf");
        std::fs::write(&config, text).unwrap();
        hsm.activate();
        activate_config(&config);
        let pkcs11 = load_ha();
        pkcs11
            .initialize(CInitializeArgs::new(flags))
            .expect("C_Initialize");
        Group {
            hsm,
            members,
            log_dir,
            pkcs11,
            _guard: guard,
        }
    }

    fn session(&self) -> Session {
        user_session(&self.pkcs11, Slot::try_from(0u64).unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.join("haErrorLog.txt")).unwrap_or_default()
    }

    /// Waits, within `limit`, for member `i` to reach `state` (0 up, 1 down).
    fn wait_for_state(&self, i: usize, state: u64, limit: Duration) -> PKCS11HA_GROUP_STATUS {
        let deadline = Instant::now() + limit;
        loop {
            let status = group_status();
            if status.members[i].state == state {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "member {i} never reached state {state}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits, within `limit`, until member `i` has no change left to
    /// receive.
    fn wait_for_no_pending(&self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while group_status().members[i].pendingChanges != 0 {
            assert!(
                Instant::now() < deadline,
                "member {i} still had changes to receive after {limit:?}; HA log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many objects with `id` member `i` holds, through its own slot.
    fn count_on_member(&self, i: usize, id: &[u8]) -> usize {
        let slot = Slot::try_from(passthrough_slot_id(
            &format!("m{i}"),
            self.hsm.tokens[i].slot_id,
        ))
        .unwrap();
        let session = user_session(&self.pkcs11, slot);
        session
            .find_objects(&[Attribute::Id(id.to_vec())])
            .unwrap()
            .len()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for m in &self.members {
            m.clear_fault();
            m.release();
        }
        let _ = self.pkcs11.clone().finalize();
        std::env::remove_var(CONF_ENV);
        std::env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn group_status() -> PKCS11HA_GROUP_STATUS {
    // SAFETY: the export has this signature; the library stays loaded.
    unsafe {
        let library = libloading::Library::new(library_path()).unwrap();
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64> =
            library.get(b"PKCS11HA_GetGroupStatus\0").unwrap();
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), 0);
        status
    }
}

fn ec_key(session: &Session, id: &[u8]) -> (ObjectHandle, ObjectHandle) {
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(P256.to_vec()),
                Attribute::Token(true),
                Attribute::Id(id.to_vec()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(true),
                Attribute::Id(id.to_vec()),
                Attribute::Sign(true),
                Attribute::Private(true),
            ],
        )
        .unwrap()
}

fn sign_verify(session: &Session, keys: (ObjectHandle, ObjectHandle)) {
    let digest = [3u8; 32];
    let signature = session.sign(&Mechanism::Ecdsa, keys.1, &digest).unwrap();
    session
        .verify(&Mechanism::Ecdsa, keys.0, &digest, &signature)
        .unwrap();
}

/// Takes member `i` out: it faults, and the next call that reaches it
/// fails over.
fn fail_member(group: &Group, session: &Session, keys: (ObjectHandle, ObjectHandle), i: usize) {
    group.members[i].set_fault(CKR_DEVICE_ERROR);
    for _ in 0..4 {
        sign_verify(session, keys);
    }
    group.wait_for_state(i, 1, PATIENCE);
}

#[test]
fn failed_member_rejoins_with_keys_made_while_away_and_serves() {
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let before = ec_key(&session, b"before");
    fail_member(&group, &session, before, 1);
    let during = ec_key(&session, b"during");
    assert_eq!(
        group_status().members[1].pendingChanges,
        2,
        "the new key pair waits for member 1"
    );
    group.members[1].clear_fault();
    let status = group.wait_for_state(1, 0, PATIENCE);
    assert_eq!(status.members[1].pendingChanges, 0);
    assert_eq!(status.members[1].consecutiveFailures, 0);
    assert_eq!(
        group.count_on_member(1, b"during"),
        2,
        "the key pair made while it was away"
    );
    let served = group.members[1].call_count("C_Sign");
    for _ in 0..10 {
        sign_verify(&session, during);
    }
    assert!(
        group.members[1].call_count("C_Sign") > served,
        "the member serves again"
    );

    // Written once the member serves and what was kept for it is made:
    // under load the signatures above can come first.
    recovered_line(&group, 0, Duration::from_secs(30));
    let log = group.log();
    let failed = log.find("member failed in").expect(&log);
    let attempt = log.find("recovery attempt").expect(&log);
    let recovered = log.find("member recovered; 2 objects").expect(&log);
    assert!(
        failed < attempt && attempt < recovered,
        "events in order:\n{log}"
    );
    for line in log.lines() {
        assert!(line.contains(&format!("group={GROUP_LABEL}")), "{line}");
        assert!(!line.contains(USER_PIN), "no PIN in the log: {line}");
    }
}

/// A returning member whose synchronisation source fails while listing
/// its objects rejoins in that attempt: the source failed, not the member.
/// In the long chaos run such attempts were given up ("cannot list the
/// objects of member ...") and the member, its token answering, stayed out
/// another interval while no member served.
#[test]
fn a_returning_member_rejoins_though_its_synchronisation_source_fails() {
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let keys = ec_key(&session, b"before");
    fail_member(&group, &session, keys, 1);
    // Nothing is queued for member 1, so nothing calls member 0 before
    // member 1's synchronisation lists its objects there, and that fails.
    group.members[0].set_fault(CKR_DEVICE_ERROR);
    group.members[1].clear_fault();
    group.wait_for_state(1, 0, Duration::from_secs(20));
    let log = group.log();
    assert!(
        !log.contains("cannot list the objects of member"),
        "the attempt was given up for its source's failure:\n{log}"
    );
    assert!(log.contains("synchronisation from member"), "{log}");
    group.wait_for_state(0, 1, PATIENCE);
    sign_verify(&session, keys);
}

/// Waits, within `limit`, for the `n`th `member recovered` line of the HA
/// log, and returns it.
fn recovered_line(group: &Group, n: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let log = group.log();
        if let Some(line) = log
            .lines()
            .filter(|l| l.contains("member recovered"))
            .nth(n)
        {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no recovery {n} in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A member that returns with its token as it was is not read object by
/// object again (its objects are counted, and those the group saw there
/// taken as held); one whose token lost objects while it was away -- here
/// another program removed one -- is read in full and given back what it
/// lacks.
#[test]
fn a_member_whose_token_lost_objects_while_away_is_read_and_given_them_back() {
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let keys = ec_key(&session, b"kept");
    fail_member(&group, &session, keys, 1);
    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    let unchanged = recovered_line(&group, 0, PATIENCE);
    assert!(
        unchanged.contains("objects counted") && !unchanged.contains("objects read"),
        "a token that kept its objects is not read again: {unchanged}"
    );
    assert_eq!(group.count_on_member(1, b"kept"), 2);

    fail_member(&group, &session, keys, 1);
    let removed = std::process::Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_LIB, "--token-label", "m1", "--login"])
        .args(["--pin", USER_PIN, "--delete-object", "--type", "pubkey"])
        .args(["--id", "6b657074"])
        .output()
        .expect("pkcs11-tool runs");
    assert!(removed.status.success(), "{removed:?}");
    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    let changed = recovered_line(&group, 1, PATIENCE);
    assert!(
        changed.contains("objects read"),
        "a token with fewer objects than the group saw there is read: {changed}"
    );
    assert_eq!(
        group.count_on_member(1, b"kept"),
        2,
        "the public key removed while it was away is back"
    );
    sign_verify(&session, keys);
}

/// A member that returns while the application is logged out cannot be
/// given the private keys it missed -- pkcs11-ha holds no credential then
/// -- so they wait, and the group status counts them as changes the member
/// has yet to receive (it said 0 while they waited, so a member could pass
/// for complete that lacked keys the application was given); the
/// application's next login delivers them -- at once, or right after a
/// replay of kept changes under way then (`C_Login` does not wait for
/// one: asserted at once, this failed 1 run in 15 beside a simulation).
#[test]
fn private_keys_a_member_missed_while_logged_out_are_counted_until_the_next_login() {
    use cryptoki::object::{KeyType, ObjectClass};
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let keys = ec_key(&session, b"before");
    fail_member(&group, &session, keys, 1);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Id(b"while-away".to_vec()),
            Attribute::Value(vec![7; 16]),
            Attribute::Encrypt(true),
        ])
        .expect("import while member 1 is down");
    drop(session);
    group.members[1].clear_fault();
    let status = group.wait_for_state(1, 0, PATIENCE);
    assert_eq!(
        status.members[1].pendingChanges,
        1,
        "the imported key waits for a login; HA log:\n{}",
        group.log()
    );
    assert!(
        group
            .log()
            .contains("changes it missed wait for the application's next login: 1 "),
        "the HA log says what the member lacks; HA log:\n{}",
        group.log()
    );
    let _session = group.session();
    group.wait_for_no_pending(1, PATIENCE);
    assert_eq!(group.count_on_member(1, b"while-away"), 1);
}

#[test]
fn an_idle_application_still_gets_its_members_back() {
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let keys = ec_key(&session, b"idle");
    fail_member(&group, &session, keys, 0);
    group.members[0].clear_fault();
    let calls = group.members[0].call_count("C_Sign");
    group.wait_for_state(0, 0, PATIENCE);
    assert_eq!(
        group.members[0].call_count("C_Sign"),
        calls,
        "no application call was needed"
    );
}

/// Without threads, members are initialised in the application's own
/// thread and recovered during its calls.
#[test]
fn without_threads_recovery_runs_during_calls() {
    let flags = CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS;
    let group = Group::start("AutoReconnectInterval = 1", flags);
    // SAFETY: gettid has no preconditions.
    let this_thread = unsafe { libc::gettid() };
    for member in &group.members {
        assert_eq!(member.initializing_thread(), this_thread);
    }
    let session = group.session();
    let keys = ec_key(&session, b"inline");
    fail_member(&group, &session, keys, 1);
    group.members[1].clear_fault();
    let deadline = Instant::now() + PATIENCE;
    while group_status().members[1].state != 0 {
        assert!(Instant::now() < deadline, "no inline recovery");
        sign_verify(&session, keys);
    }
}

/// After `reconnAtt` failed attempts, recovery leaves a member alone even
/// once it could come back. Member 0 failing afterwards shows that later
/// recovery passes ran: each pass tries member 0 before member 1, so once
/// member 0's second attempt has failed, a whole pass has gone by in which
/// member 1 -- no longer faulty -- would have been tried a third time, and
/// brought back, had `reconnAtt` been ignored.
#[test]
fn recovery_gives_up_after_reconn_att_attempts() {
    let group = Group::start(
        "AutoReconnectInterval = 1\nreconnAtt = 2",
        CInitializeFlags::OS_LOCKING_OK,
    );
    let session = group.session();
    let keys = ec_key(&session, b"give-up");
    fail_member(&group, &session, keys, 1);
    let failed_attempts = |i: usize| {
        let member = format!("member={}", group.hsm.tokens[i].serial);
        group
            .log()
            .lines()
            .filter(|line| line.contains(&member) && line.contains("recovery failed"))
            .count()
    };
    let wait_for_failed_attempts = |i: usize| {
        let deadline = Instant::now() + PATIENCE;
        while failed_attempts(i) < 2 {
            assert!(
                Instant::now() < deadline,
                "member {i}: two failed attempts expected:\n{}",
                group.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_failed_attempts(1);
    group.members[1].clear_fault();
    group.members[0].set_fault(CKR_DEVICE_ERROR);
    assert!(
        session.generate_random_vec(16).is_err(),
        "no member is left to serve"
    );
    group.wait_for_state(0, 1, PATIENCE);
    wait_for_failed_attempts(0);
    let log = group.log();
    assert!(!log.contains("recovery attempt 3"), "{log}");
    assert_eq!(failed_attempts(1), 2, "{log}");
    assert_eq!(group_status().members[1].state, 1, "member 1 stays down");
}

#[test]
fn a_hung_member_is_taken_out_after_member_timeout() {
    let group = Group::start(
        "memberTimeout = 300\nAutoReconnectInterval = 3600",
        CInitializeFlags::OS_LOCKING_OK,
    );
    let session = group.session();
    let keys = ec_key(&session, b"hang");
    group.members[0].hang();
    /// Releases the hung member even when an assertion fails, so the
    /// scoped thread can be joined.
    struct Release<'a>(&'a FaultyMember);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let stuck = std::thread::scope(|scope| {
        let _release = Release(&group.members[0]);
        let worker = scope.spawn(|| {
            let other = group.session();
            for _ in 0..6 {
                sign_verify(&other, keys);
            }
        });
        assert!(
            group.members[0].wait_for_blocked(1, PATIENCE),
            "a call reached the hung member"
        );
        let status = group.wait_for_state(0, 1, PATIENCE);
        group.members[0].release();
        worker.join().unwrap();
        status
    });
    assert_eq!(stuck.members[0].lastFault, CKR_DEVICE_ERROR);
    assert!(
        group.log().contains("member answered nothing for 300 ms"),
        "{}",
        group.log()
    );
    for _ in 0..5 {
        sign_verify(&session, keys);
    }
}

/// A boolean attribute of the objects labelled `label` on member `i`,
/// read through its own slot.
fn flag_on_member(group: &Group, i: usize, label: &str, which: AttributeType) -> Vec<bool> {
    let slot = Slot::try_from(passthrough_slot_id(
        &format!("m{i}"),
        group.hsm.tokens[i].slot_id,
    ))
    .unwrap();
    let session = user_session(&group.pkcs11, slot);
    session
        .find_objects(&[Attribute::Label(label.into())])
        .unwrap()
        .into_iter()
        .map(
            |object| match session.get_attributes(object, &[which]).unwrap()[..] {
                [Attribute::Copyable(b)
                | Attribute::Destroyable(b)
                | Attribute::Modifiable(b)
                | Attribute::Sensitive(b)
                | Attribute::Extractable(b)] => b,
                ref other => panic!("{which:?} read as {other:?}"),
            },
        )
        .collect()
}

/// Takes member 1 out and makes an extractable AES key labelled `label`
/// (its ID too) with the attributes `extra`: a key member 1 is owed. Also
/// the key pair whose use took the member out, to take it out again.
fn key_made_while_member_1_is_away(
    group: &Group,
    session: &Session,
    label: &str,
    extra: &[Attribute],
) -> (ObjectHandle, (ObjectHandle, ObjectHandle)) {
    let before = ec_key(session, b"before");
    fail_member(group, session, before, 1);
    let mut template = vec![
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Id(label.as_bytes().to_vec()),
        Attribute::ValueLen(32.into()),
        Attribute::Encrypt(true),
        Attribute::Extractable(true),
    ];
    template.extend_from_slice(extra);
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .expect("a key made while member 1 is away");
    (key, before)
}

/// What a member missed reaches it by the copy paths (attributes read from
/// another member), not by the application's template: the restrictions
/// must travel with it.
#[test]
fn a_member_that_was_away_gets_objects_as_restricted_as_the_application_made_them() {
    use cryptoki::mechanism::MechanismType;
    use cryptoki::object::{KeyType, ObjectClass};
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let before = ec_key(&session, b"before");
    fail_member(&group, &session, before, 1);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label("data".into()),
            Attribute::Value(b"payload".to_vec()),
            Attribute::Destroyable(false),
        ])
        .unwrap();
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Label("imported".into()),
            Attribute::Value(vec![0x42; 32]),
            Attribute::Encrypt(true),
            Attribute::Copyable(false),
        ])
        .unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Label("generated".into()),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
                Attribute::Modifiable(false),
                Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC_PAD]),
            ],
        )
        .unwrap();
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(P256.to_vec()),
                Attribute::Token(true),
                Attribute::Label("pair".into()),
                Attribute::Verify(true),
                Attribute::Destroyable(false),
            ],
            &[
                Attribute::Token(true),
                Attribute::Label("pair".into()),
                Attribute::Sign(true),
                Attribute::Private(true),
                Attribute::Destroyable(false),
            ],
        )
        .unwrap();
    group.members[1].clear_fault();
    let status = group.wait_for_state(1, 0, PATIENCE);
    assert_eq!(status.members[1].pendingChanges, 0);
    let expected = [
        ("data", AttributeType::Destroyable, 1),
        ("imported", AttributeType::Copyable, 1),
        ("generated", AttributeType::Modifiable, 1),
        ("pair", AttributeType::Destroyable, 2),
    ];
    for member in 0..2 {
        for (label, which, count) in expected {
            assert_eq!(
                flag_on_member(&group, member, label, which),
                vec![false; count],
                "member {member}: {which:?} of {label}"
            );
        }
    }
}

/// SoftHSM takes no `CKA_WRAP_WITH_TRUSTED` on a key that exists, so a key
/// made non-extractable after it was made is non-extractable on the
/// members, and no copy of it can leave them. While a member is owed the
/// key (away since it was made), the change is refused
/// (`CKR_FUNCTION_FAILED`, one HA log line naming the key) and changes
/// nothing; once the member holds it, the change is made and the key is
/// non-extractable on both. A copy of such a key made while a member is
/// away is refused the same way and leaves nothing. On the code before,
/// the change succeeded while the member was away (in the simulation,
/// such a member never got the key: its copy failed with
/// `CKR_KEY_UNEXTRACTABLE` at every return).
#[test]
fn a_key_is_made_non_extractable_only_once_every_member_holds_it() {
    use cryptoki::error::{Error, RvError};
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let (key, before) = key_made_while_member_1_is_away(&group, &session, "late", &[]);
    let refused = session.update_attributes(key, &[Attribute::Extractable(false)]);
    assert!(
        matches!(refused, Err(Error::Pkcs11(RvError::FunctionFailed, _))),
        "{refused:?}"
    );
    let log = group.log();
    assert!(
        log.contains("(label \"late\"") && log.contains("is not made non-extractable"),
        "{log}"
    );
    assert_eq!(
        flag_on_member(&group, 0, "late", AttributeType::Extractable),
        [true]
    );

    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    group.wait_for_no_pending(1, PATIENCE);
    session
        .update_attributes(key, &[Attribute::Extractable(false)])
        .expect("made non-extractable once both members hold the key");
    for member in 0..2 {
        assert_eq!(
            flag_on_member(&group, member, "late", AttributeType::Extractable),
            [false],
            "member {member}"
        );
    }

    fail_member(&group, &session, before, 1);
    let copy = session.copy_object(key, &[Attribute::Label("late-copy".into())]);
    assert!(
        matches!(copy, Err(Error::Pkcs11(RvError::FunctionFailed, _))),
        "{copy:?}"
    );
    assert!(flag_on_member(&group, 0, "late-copy", AttributeType::Extractable).is_empty());
}

/// A member away is given a key made meanwhile as it is now, sensitive,
/// and then the changes of it it missed. SoftHSM refuses `CKA_SENSITIVE`
/// set at all once true: `FALSE` (a change of nothing when the application
/// made it) and `TRUE` (which the copy holds already) were refused at every
/// try, and the key's later `CKA_ID` never reached the member.
#[test]
fn a_member_given_a_key_as_it_is_now_still_gets_its_later_changes() {
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let (key, _) =
        key_made_while_member_1_is_away(&group, &session, "loose", &[Attribute::Sensitive(false)]);
    for change in [
        Attribute::Sensitive(false),
        Attribute::Sensitive(true),
        Attribute::Id(b"second".to_vec()),
    ] {
        session
            .update_attributes(key, std::slice::from_ref(&change))
            .unwrap_or_else(|e| panic!("{change:?}: {e}"));
    }

    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    group.wait_for_no_pending(1, PATIENCE);
    for member in 0..2 {
        assert_eq!(
            flag_on_member(&group, member, "loose", AttributeType::Sensitive),
            [true],
            "member {member}"
        );
        assert_eq!(
            group.count_on_member(member, b"second"),
            1,
            "member {member}"
        );
    }
    assert!(!group.log().contains("refused with"), "{}", group.log());
}

/// Waits, within `limit`, until the HA log holds `count` lines with `text`.
fn wait_for_lines(group: &Group, text: &str, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while group.log().matches(text).count() < count {
        assert!(
            Instant::now() < deadline,
            "{count} lines with {text:?} never came; HA log:\n{}",
            group.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PIN changed through the group is changed on every member or on none:
/// refused while a member is away, which would keep the old PIN. A member
/// whose token refuses the group's PIN at its return is not tried with it
/// again -- a token may lock its user after a few wrong PINs -- until the
/// application logs in again.
#[test]
fn a_pin_changes_on_every_member_or_none_and_a_refused_pin_is_not_tried_again() {
    use cryptoki::error::{Error, RvError};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let pin = |p: &str| AuthPin::new(p.into());
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    let keys = ec_key(&session, b"pin");
    fail_member(&group, &session, keys, 1);
    let refused = session.set_pin(&pin(USER_PIN), &pin("group-pin"));
    assert!(
        matches!(refused, Err(Error::Pkcs11(RvError::FunctionFailed, _))),
        "{refused:?}"
    );
    assert!(
        group.log().contains("C_SetPIN: the PIN is not changed"),
        "{}",
        group.log()
    );

    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    session
        .set_pin(&pin(USER_PIN), &pin("group-pin"))
        .expect("changed while both members serve");
    session.logout().unwrap();
    let old = session.login(UserType::User, Some(&pin(USER_PIN)));
    assert!(
        matches!(old, Err(Error::Pkcs11(RvError::PinIncorrect, _))),
        "{old:?}"
    );
    // A login through the group asks both members: one that refused the
    // new PIN would be taken out.
    session
        .login(UserType::User, Some(&pin("group-pin")))
        .unwrap();
    let status = group_status();
    assert_eq!([status.members[0].state, status.members[1].state], [0, 0]);

    // Member 1's PIN changed behind the group's back and its token logged
    // out (a restart would do both), then it fails.
    let member_slot =
        Slot::try_from(passthrough_slot_id("m1", group.hsm.tokens[1].slot_id)).unwrap();
    let direct = group.pkcs11.open_rw_session(member_slot).unwrap();
    direct
        .set_pin(&pin("group-pin"), &pin("member-pin"))
        .unwrap();
    direct.logout().unwrap();
    drop(direct);
    fail_member(&group, &session, keys, 1);
    group.members[1].reset_counts();
    group.members[1].clear_fault();
    let refusal = "refused the group's PIN with CKR_PIN_INCORRECT";
    wait_for_lines(&group, refusal, 1, PATIENCE);
    // Three more intervals pass with no other try.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(group.members[1].call_count("C_Login"), 1);
    assert_eq!(group_status().members[1].state, 1);

    // Each login of the application's gets one try.
    session.logout().unwrap();
    session
        .login(UserType::User, Some(&pin("group-pin")))
        .unwrap();
    wait_for_lines(&group, refusal, 2, PATIENCE);
    assert_eq!(group.members[1].call_count("C_Login"), 2);

    // Given the group's PIN, the member returns at the next login.
    let direct = group.pkcs11.open_rw_session(member_slot).unwrap();
    direct
        .login(UserType::User, Some(&pin("member-pin")))
        .unwrap();
    direct
        .set_pin(&pin("member-pin"), &pin("group-pin"))
        .unwrap();
    direct.logout().unwrap();
    drop(direct);
    session.logout().unwrap();
    session
        .login(UserType::User, Some(&pin("group-pin")))
        .unwrap();
    group.wait_for_state(1, 0, PATIENCE);
    sign_verify(&session, keys);
}

/// A key pair whose generate a member carried out and died before
/// answering, made on the other member instead: the dead member holds an
/// orphan pair alike in every attribute a private key's print reads. It
/// returns while the application is logged out (its private objects'
/// changes wait for the login), and after the login it must hold the
/// group's private key, not the orphan. (In simulation seed 2226665 the
/// orphan passed for the group's key at the login; this path, on SoftHSM,
/// passes on the code before that fix too.)
#[test]
fn an_orphan_private_key_is_replaced_when_the_member_returns_logged_out() {
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let group = Group::start("AutoReconnectInterval = 1", CInitializeFlags::OS_LOCKING_OK);
    let session = group.session();
    group.members[1].die_after_call("C_GenerateKeyPair");
    let mut made = Vec::new();
    for n in 0..8 {
        made.push(ec_key(&session, format!("pair-{n}").as_bytes()));
        if group.members[1].call_count("C_GenerateKeyPair") > 0 {
            break;
        }
    }
    assert_eq!(
        group.members[1].call_count("C_GenerateKeyPair"),
        1,
        "no generate reached member 1"
    );
    let orphaned = *made.last().unwrap();
    group.wait_for_state(1, 1, PATIENCE);
    session.logout().unwrap();
    group.members[1].clear_fault();
    group.wait_for_state(1, 0, PATIENCE);
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .unwrap();
    group.wait_for_no_pending(1, PATIENCE);

    // Member 1's private key of the pair signs what the group's public key
    // verifies: the group's, not the orphan.
    let id = session
        .get_attributes(orphaned.1, &[AttributeType::Id])
        .unwrap();
    let [Attribute::Id(id)] = &id[..] else {
        panic!("{id:?}")
    };
    let slot = Slot::try_from(passthrough_slot_id("m1", group.hsm.tokens[1].slot_id)).unwrap();
    let direct = user_session(&group.pkcs11, slot);
    let keys = direct
        .find_objects(&[
            Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.clone()),
        ])
        .unwrap();
    assert_eq!(
        keys.len(),
        1,
        "member 1 holds one private key of the pair; HA log:\n{}",
        group.log()
    );
    let data = [7u8; 32];
    let signature = direct.sign(&Mechanism::Ecdsa, keys[0], &data).unwrap();
    session
        .verify(&Mechanism::Ecdsa, orphaned.0, &data, &signature)
        .expect("member 1's private key is the group's");
}
