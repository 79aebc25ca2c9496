//! The faulty member itself, driven directly through `cryptoki`: it forwards
//! to SoftHSM, filters by serial, and injects faults, hangs and capacity
//! limits as asked; the real library is finalised only by the last copy,
//! also when copies start and stop concurrently.

#[path = "common/faulty.rs"]
mod faulty;

use std::env;
use std::fs;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::{CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED};
use faulty::FaultyMember;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Long enough never to fire unless something is broken.
const PATIENCE: Duration = Duration::from_secs(10);

/// `SOFTHSM2_CONF` and SoftHSM's initialisation are process-global.
static SERIAL: Mutex<()> = Mutex::new(());

/// One SoftHSM token in a temp dir (activated in this process) and a faulty
/// member showing only it. Fields drop in order: the guard goes last.
struct Setup {
    member: FaultyMember,
    serial: String,
    dir: tempfile::TempDir,
    _guard: MutexGuard<'static, ()>,
}

impl Setup {
    fn new() -> Setup {
        let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        );
        fs::write(&conf, text).expect("write softhsm2.conf");
        env::set_var("SOFTHSM2_CONF", &conf);
        let serial = init_token();
        let member = FaultyMember::new(dir.path(), "member", SOFTHSM, Some(&serial));
        Setup {
            member,
            serial,
            dir,
            _guard: guard,
        }
    }
}

fn softhsm_util(args: &[&str]) -> String {
    let out = Command::new("softhsm2-util")
        .args(args)
        .output()
        .expect("run softhsm2-util");
    assert!(out.status.success(), "softhsm2-util {args:?} failed");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Initialise one more SoftHSM token (user PIN 1234) under the current
/// `SOFTHSM2_CONF`; its serial.
fn init_token() -> String {
    let serials = |text: String| -> Vec<String> {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("Serial number:"))
            .map(|serial| serial.trim().to_owned())
            .filter(|serial| !serial.is_empty())
            .collect()
    };
    let before = serials(softhsm_util(&["--show-slots"]));
    softhsm_util(&[
        "--init-token",
        "--free",
        "--label",
        "t",
        "--so-pin",
        "5678",
        "--pin",
        "1234",
    ]);
    serials(softhsm_util(&["--show-slots"]))
        .into_iter()
        .find(|serial| !before.contains(serial))
        .expect("a new serial in --show-slots")
}

fn start(path: &std::path::Path) -> Pkcs11 {
    let pkcs11 = Pkcs11::new(path).expect("load");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    pkcs11
}

fn only_slot(pkcs11: &Pkcs11) -> Slot {
    let slots = pkcs11.get_slots_with_token().expect("C_GetSlotList");
    assert_eq!(slots.len(), 1, "{slots:?}");
    slots[0]
}

fn user_session(pkcs11: &Pkcs11, slot: Slot) -> Session {
    let session = pkcs11.open_ro_session(slot).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("C_Login");
    session
}

fn is_rv(result: cryptoki::error::Result<impl std::fmt::Debug>, rv: RvError) -> bool {
    matches!(result, Err(Error::Pkcs11(got, _)) if got == rv)
}

#[test]
fn forwards_and_shows_only_its_token() {
    let setup = Setup::new();
    assert_eq!(setup.member.initializing_thread(), 0, "not initialised yet");
    let pkcs11 = start(&setup.member.path);
    // SAFETY: gettid has no preconditions.
    let this_thread = unsafe { libc::gettid() };
    assert_eq!(setup.member.initializing_thread(), this_thread);
    let slot = only_slot(&pkcs11);
    let info = pkcs11.get_token_info(slot).expect("C_GetTokenInfo");
    assert_eq!(info.serial_number(), setup.serial);

    // Without a filter SoftHSM's free slot shows too; through the filtered
    // copy it does not exist.
    let open = FaultyMember::new(setup.dir.path(), "open", SOFTHSM, None);
    let unfiltered = start(&open.path);
    let all = unfiltered.get_slots_with_token().expect("C_GetSlotList");
    assert_eq!(all.len(), 2, "{all:?}");
    let other = *all.iter().find(|s| **s != slot).unwrap();
    assert!(is_rv(pkcs11.get_token_info(other), RvError::SlotIdInvalid));

    setup.member.reset_counts();
    let session = pkcs11.open_ro_session(slot).expect("C_OpenSession");
    session.generate_random_vec(16).expect("C_GenerateRandom");
    session.generate_random_vec(16).expect("C_GenerateRandom");
    assert_eq!(setup.member.call_count("C_OpenSession"), 1);
    assert_eq!(setup.member.call_count("C_GenerateRandom"), 2);
    assert_eq!(open.call_count("C_GenerateRandom"), 0);
    drop(session);
    unfiltered.finalize().expect("C_Finalize");
    pkcs11.finalize().expect("C_Finalize");
}

/// `refuse_key_wrap`: the AES key wraps are refused as a mechanism,
/// though still listed (SoftHSM itself wraps with them: `failover.rs`).
#[test]
fn refuses_the_aes_key_wrap_it_still_lists() {
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, ObjectHandle};
    let setup = Setup::new();
    setup.member.refuse_key_wrap();
    let pkcs11 = start(&setup.member.path);
    let slot = only_slot(&pkcs11);
    let listed = pkcs11.get_mechanism_list(slot).expect("C_GetMechanismList");
    assert!(listed.contains(&MechanismType::AES_KEY_WRAP_PAD));
    let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("C_Login");
    let key = |extractable: bool| -> ObjectHandle {
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                    Attribute::Extractable(extractable),
                ],
            )
            .expect("C_GenerateKey")
    };
    let (wrapping, wrapped) = (key(false), key(true));
    assert!(is_rv(
        session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, wrapped),
        RvError::MechanismInvalid
    ));
    assert!(is_rv(
        session.wrap_key(&Mechanism::AesKeyWrap, wrapping, wrapped),
        RvError::MechanismInvalid
    ));
    drop(session);
    pkcs11.finalize().expect("C_Finalize");
}

#[test]
fn faults_replace_answers_until_cleared() {
    let setup = Setup::new();
    let member = &setup.member;
    let pkcs11 = start(&member.path);
    let session = pkcs11.open_ro_session(only_slot(&pkcs11)).expect("session");

    member.reset_counts();
    member.set_fault(CKR_DEVICE_ERROR);
    assert!(is_rv(session.generate_random_vec(8), RvError::DeviceError));
    assert_eq!(member.call_count("C_GenerateRandom"), 1);
    member.clear_fault();
    session.generate_random_vec(8).expect("forwarded again");

    member.fail_after(2, CKR_DEVICE_REMOVED);
    session.generate_random_vec(8).expect("first of two");
    session.generate_random_vec(8).expect("second of two");
    assert!(is_rv(
        session.generate_random_vec(8),
        RvError::DeviceRemoved
    ));
    assert!(is_rv(
        session.generate_random_vec(8),
        RvError::DeviceRemoved
    ));
    member.clear_fault();
    session.generate_random_vec(8).expect("forwarded again");
    drop(session);

    // A member can always be stopped.
    member.set_fault(CKR_DEVICE_ERROR);
    pkcs11.finalize().expect("C_Finalize is exempt from faults");
}

#[test]
fn a_call_fault_fails_only_that_entry_point() {
    let setup = Setup::new();
    let member = &setup.member;
    let pkcs11 = start(&member.path);
    let slot = only_slot(&pkcs11);
    member.fail_call("C_Login", CKR_DEVICE_ERROR);
    let session = pkcs11.open_ro_session(slot).expect("C_OpenSession answers");
    let pin = AuthPin::new("1234".into());
    assert!(is_rv(
        session.login(UserType::User, Some(&pin)),
        RvError::DeviceError
    ));
    session
        .generate_random_vec(8)
        .expect("C_GenerateRandom answers");
    member.clear_fault();
    session
        .login(UserType::User, Some(&pin))
        .expect("C_Login forwarded again");
    drop(session);
    pkcs11.finalize().expect("C_Finalize");
}

#[test]
fn a_member_dying_after_a_call_carries_it_out_and_fails_from_then_on() {
    let setup = Setup::new();
    let member = &setup.member;
    let pkcs11 = start(&member.path);
    let slot = only_slot(&pkcs11);
    let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("C_Login");
    member.die_after_call("C_CreateObject");
    let label = "carried out, answer lost";
    let template = [
        cryptoki::object::Attribute::Token(true),
        cryptoki::object::Attribute::Label(label.into()),
        cryptoki::object::Attribute::Application("faulty".into()),
        cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::DATA),
    ];
    assert!(is_rv(
        session.create_object(&template),
        RvError::DeviceError
    ));
    assert!(is_rv(session.generate_random_vec(8), RvError::DeviceError));
    member.clear_fault();
    let found = session
        .find_objects(&[cryptoki::object::Attribute::Label(label.into())])
        .expect("C_FindObjects forwarded again");
    assert_eq!(found.len(), 1, "the create was carried out");
    drop(session);
    pkcs11.finalize().expect("C_Finalize");
}

#[test]
fn hang_blocks_calls_until_release() {
    let setup = Setup::new();
    let member = &setup.member;
    let pkcs11 = start(&member.path);
    let session = pkcs11.open_ro_session(only_slot(&pkcs11)).expect("session");

    member.reset_counts();
    member.hang();
    let call = thread::spawn(move || session.generate_random_vec(8).map(|_| session));
    assert!(member.wait_for_blocked(1, PATIENCE), "call never arrived");
    assert_eq!(member.call_count("C_GenerateRandom"), 1);
    assert!(!call.is_finished());
    member.release();
    let session = call.join().unwrap().expect("forwarded after release");
    drop(session);
    pkcs11.finalize().expect("C_Finalize");
}

#[test]
fn capacity_limits_concurrent_calls() {
    let setup = Setup::new();
    let member = &setup.member;
    let pkcs11 = start(&member.path);
    let slot = only_slot(&pkcs11);
    let sessions: Vec<Session> = (0..2)
        .map(|_| pkcs11.open_ro_session(slot).expect("session"))
        .collect();

    let run = |sessions: Vec<Session>, calls: usize| -> Vec<Session> {
        let threads: Vec<_> = sessions
            .into_iter()
            .map(|session| {
                thread::spawn(move || {
                    for _ in 0..calls {
                        session.generate_random_vec(8).expect("C_GenerateRandom");
                    }
                    session
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };

    // Unlimited: both calls are inside the member at once.
    member.reset_counts();
    member.hang();
    let both = thread::scope(|scope| {
        let both = scope.spawn(|| run(sessions, 1));
        assert!(member.wait_for_blocked(2, PATIENCE), "both calls admitted");
        member.release();
        both.join().unwrap()
    });
    assert_eq!(member.max_concurrent(), 2);

    // One connection: a hung call holds it and the next one queues behind.
    member.set_capacity(1);
    member.reset_counts();
    member.hang();
    let both = thread::scope(|scope| {
        let both = scope.spawn(|| run(both, 1));
        assert!(member.wait_for_blocked(1, PATIENCE), "first call admitted");
        assert!(!member.wait_for_blocked(2, Duration::from_millis(200)));
        member.release();
        both.join().unwrap()
    });

    // And with latency the two threads' calls are served one at a time.
    member.set_latency(Duration::from_millis(5));
    let both = run(both, 5);
    assert_eq!(member.max_concurrent(), 1);
    assert_eq!(member.call_count("C_GenerateRandom"), 12);
    drop(both);
    pkcs11.finalize().expect("C_Finalize");
}

#[test]
fn real_library_is_finalized_by_the_last_copy_only() {
    let setup = Setup::new();
    let first = start(&setup.member.path);
    let second_member = FaultyMember::new(setup.dir.path(), "second", SOFTHSM, None);
    let second = start(&second_member.path);
    let slot = only_slot(&first);
    let session = first.open_ro_session_no_drop(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new("1234".into())))
        .expect("C_Login");

    // Stopping the first copy leaves SoftHSM up for the second...
    first
        .clone()
        .finalize()
        .expect("C_Finalize of the first copy");
    let direct = Pkcs11::new(SOFTHSM).expect("load SoftHSM");
    let init = || direct.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    assert!(is_rv(init(), RvError::CryptokiAlreadyInitialized));
    assert!(is_rv(
        first.get_slots_with_token(),
        RvError::CryptokiNotInitialized
    ));
    let other = second
        .open_ro_session(slot)
        .expect("session via the second copy");
    other
        .generate_random_vec(8)
        .expect("the second copy still works");
    drop(other);

    // ...but ends the first copy's sessions on its token, as a restart would.
    first
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize again");
    assert!(is_rv(
        session.generate_random_vec(8),
        RvError::SessionHandleInvalid
    ));
    let session = user_session(&first, slot);
    session.generate_random_vec(8).expect("new session");
    drop(session);

    // The last copy out finalises SoftHSM.
    first.finalize().expect("C_Finalize of the first copy");
    second.finalize().expect("C_Finalize of the second copy");
    init().expect("SoftHSM was finalised");
    direct.finalize().expect("C_Finalize of SoftHSM");
}

/// Copies start and stop concurrently, each while the others serve calls:
/// they share one SoftHSM, so only the last copy out may finalise it and no
/// copy may initialise while another finalises. Every call on a started copy
/// must succeed.
#[test]
fn copies_start_and_stop_concurrently_while_the_others_serve() {
    const ROUNDS: usize = 150;
    let setup = Setup::new();
    let mut members = vec![(setup.member.path.clone(), setup.serial.clone())];
    let serials = [init_token(), init_token()];
    let extra = FaultyMember::one_per_token(setup.dir.path(), SOFTHSM, &serials);
    members.extend(extra.iter().map(|m| m.path.clone()).zip(serials));
    thread::scope(|scope| {
        for (path, serial) in &members {
            scope.spawn(move || {
                let pkcs11 = Pkcs11::new(path).expect("load");
                for round in 0..ROUNDS {
                    let context = format!("{} round {round}", path.display());
                    pkcs11
                        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                        .unwrap_or_else(|e| panic!("{context}: C_Initialize: {e}"));
                    let slot = only_slot(&pkcs11);
                    let token = pkcs11
                        .get_token_info(slot)
                        .unwrap_or_else(|e| panic!("{context}: C_GetTokenInfo: {e}"));
                    assert_eq!(token.serial_number(), serial, "{context}");
                    let session = pkcs11
                        .open_ro_session(slot)
                        .unwrap_or_else(|e| panic!("{context}: C_OpenSession: {e}"));
                    session
                        .login(UserType::User, Some(&AuthPin::new("1234".into())))
                        .unwrap_or_else(|e| panic!("{context}: C_Login: {e}"));
                    for _ in 0..3 {
                        session
                            .generate_random_vec(16)
                            .unwrap_or_else(|e| panic!("{context}: C_GenerateRandom: {e}"));
                    }
                    drop(session);
                    pkcs11
                        .clone()
                        .finalize()
                        .unwrap_or_else(|e| panic!("{context}: C_Finalize: {e}"));
                }
            });
        }
    });
    let direct = Pkcs11::new(SOFTHSM).expect("load SoftHSM");
    direct
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("the last copy out finalised SoftHSM");
    direct.finalize().expect("C_Finalize of SoftHSM");
}
