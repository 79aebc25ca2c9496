//! Calls made while a group has no member serving (issue 12): while a
//! member is being brought back, an application call waits for it, at most
//! `memberTimeout`, instead of failing at once; with no member coming back,
//! when the returning one fails again, or once `C_Finalize` has begun, it
//! fails as before. A group of in-memory members (`memory_member`) on the
//! manual clock: the returning member's recovery is held by a planted
//! stall (in the search for its token, or in its login, the first thing it
//! is given once it is catching up) while the test acts, so that
//! nothing depends on how fast the machine is. A member returning to a
//! group with no member serving serves without reading its objects first.
//! Each test holds [`SERIAL`]: one of them moves the process's clock.

mod memory_member;

use cryptoki_sys::*;
use memory_member::host::{group_over, MemoryHost, MEMBER_TIMEOUT};
use memory_member::token::USER_PIN;
use memory_member::token::{Fault, FIRST_SLOT};
use memory_member::{hex, SimMember};
use pkcs11_ha::clock::Clock as _;
use pkcs11_ha::group::{Group, MemberState, Pending};
use pkcs11_ha::member_api::MemberApi;
use pkcs11_ha::recovery;
use pkcs11_ha::virtual_session::{Input, OpKind, Step, VirtualSession};
use sha2::{Digest as _, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Two in-memory members, both taken out by a crash while the application
/// is logged in. Member 1's token holds two objects made outside the group
/// ([`REMOVED`], [`KEPT`]), and member 1 missed the removal of the first:
/// its recovery logs it in, makes that removal, and it serves.
struct Outage {
    library: Arc<SimMember>,
    group: Arc<Group>,
    host: MemoryHost,
    session: VirtualSession,
}

impl Outage {
    fn new(seed: u64) -> Outage {
        pkcs11_ha::clock::install_manual();
        let library = Arc::new(SimMember::initialized(2, seed));
        make_token_object(&library, 1, REMOVED);
        make_token_object(&library, 1, KEPT);
        let group = group_over(&library, 2, "outage");
        let host = MemoryHost::new(&group, &library);
        let session =
            VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION).expect("a session");
        digest(&session).expect("a digest with both members serving");
        {
            let mut sim = library.sim.lock();
            sim.set_fault(0, Fault::Crash);
            sim.set_fault(1, Fault::Crash);
        }
        // Each call fails over to the other member: two take both out.
        for _ in 0..2 {
            let _ = digest(&session);
        }
        assert!(
            group.members.iter().all(|m| m.state() == MemberState::Down),
            "both members are out"
        );
        // What the application's C_Login leaves: the credential recovery
        // logs a returning member in with.
        group.cache_login(CKU_USER, Some(USER_PIN));
        // A removal member 1 missed while it was out.
        let removal = Pending::Destroy {
            print: vec![(CKA_LABEL, REMOVED.to_vec())],
            object: None,
        };
        assert!(
            group.queue_unless_up(1, removal).is_ok(),
            "the removal is queued for member 1"
        );
        Outage {
            library,
            group,
            host,
            session,
        }
    }

    /// Brings member 1 back, its recovery held at `phase`; there runs
    /// `held` (given the outage and the application's call, made on a
    /// thread of its own); then the recovery goes on. Returns what `held`
    /// returned and the call's answer.
    fn while_member_1_returns<T>(
        &self,
        phase: Phase,
        held: impl FnOnce(&Outage, &std::thread::ScopedJoinHandle<'_, CallAnswer>) -> T,
    ) -> (T, CallAnswer) {
        self.library.sim.lock().heal(1);
        let (stalled_tx, stalled) = mpsc::sync_channel(1);
        let (resume, resume_rx) = mpsc::channel::<()>();
        let gate = parking_lot::Mutex::new(Some((stalled_tx, resume_rx)));
        self.library.on_stall(move |_| {
            if let Some((stalled, resume)) = gate.lock().take() {
                stalled.send(()).expect("the test waits for the stall");
                let _ = resume.recv();
            }
        });
        let stall = match phase {
            // The first calls that reach its token are the search for it.
            Phase::LookingForToken => Fault::Stall,
            Phase::CatchingUp => Fault::StallOnLogin,
        };
        self.library.sim.lock().set_fault(1, stall);
        std::thread::scope(|scope| {
            let recovering = scope.spawn(|| recovery::recover_failed_members(&self.host));
            stalled
                .recv_timeout(Duration::from_secs(60))
                .expect("member 1's recovery is held");
            let state = match phase {
                Phase::LookingForToken => MemberState::Down,
                Phase::CatchingUp => MemberState::Recovering,
            };
            assert_eq!(self.group.members[1].state(), state, "{phase:?}");
            assert!(self.group.members[1].expected_back(), "{phase:?}");
            assert!(self.group.serving_members().is_empty(), "no member serves");
            let call = scope.spawn(|| digest(&self.session));
            poll("the call waits for a member", || {
                self.group.calls_waiting_for_a_member() == 1
            });
            let outcome = held(self, &call);
            resume.send(()).expect("the recovery is held");
            recovering.join().expect("the recovery returns");
            let answer = call.join().expect("the call returns");
            (outcome, answer)
        })
    }
}

type CallAnswer = pkcs11_ha::error::Result<Vec<u8>>;

/// Where member 1's recovery is held.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Its token is being looked for: the member is still down.
    LookingForToken,
    /// Inside its login, before the removal it missed: the member is
    /// recovering.
    CatchingUp,
}

/// The labels of the objects made on member 1's token outside the group.
const REMOVED: &[u8] = b"removed while away";
const KEPT: &[u8] = b"kept";

/// Makes a token data object labelled `label` on token `token`, outside
/// the group.
fn make_token_object(library: &SimMember, token: usize, label: &[u8]) {
    let mut session = CK_INVALID_HANDLE;
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    let slot = FIRST_SLOT + token as CK_SLOT_ID;
    assert_eq!(library.open_session(slot, flags, &mut session), CKR_OK);
    let (class, yes, no) = (CKO_DATA, CK_TRUE, CK_FALSE);
    let attribute = |type_, value: *const u8, len: usize| CK_ATTRIBUTE {
        type_,
        pValue: value as *mut _,
        ulValueLen: len as CK_ULONG,
    };
    let template = [
        attribute(
            CKA_CLASS,
            &class as *const _ as *const u8,
            std::mem::size_of::<CK_OBJECT_CLASS>(),
        ),
        attribute(CKA_TOKEN, &yes, 1),
        attribute(CKA_PRIVATE, &no, 1),
        attribute(CKA_LABEL, label.as_ptr(), label.len()),
    ];
    let mut handle = CK_INVALID_HANDLE;
    assert_eq!(
        library.create_object(session, Some(&template), &mut handle),
        CKR_OK
    );
    assert_eq!(library.close_session(session), CKR_OK);
}

/// The handle of the object labelled `label` on token `token`.
fn token_object(library: &SimMember, token: usize, label: &[u8]) -> CK_OBJECT_HANDLE {
    let mut session = CK_INVALID_HANDLE;
    let slot = FIRST_SLOT + token as CK_SLOT_ID;
    assert_eq!(
        library.open_session(slot, CKF_SERIAL_SESSION, &mut session),
        CKR_OK
    );
    let print = vec![(CKA_LABEL, label.to_vec())];
    let found = pkcs11_ha::identity::find(library, session, &print).expect("a search");
    assert_eq!(library.close_session(session), CKR_OK);
    assert_eq!(found.len(), 1, "the object is on the token once");
    found[0]
}

/// `C_DigestInit` and `C_Digest` of "abc" through the group, as the
/// provider runs them on a virtual slot.
fn digest(v: &VirtualSession) -> CallAnswer {
    let mut sha256 = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    // SAFETY: a mechanism without a parameter, alive for the call.
    let mechanism = unsafe { pkcs11_ha::mechanism::Mechanism::new(&mut sha256) }?;
    v.init(
        OpKind::Digest,
        Some(&mechanism),
        None,
        "C_DigestInit",
        |l, s, _| l.digest_init(s, mechanism.as_raw()),
    )?;
    let (mut out, mut len) = ([0u8; 32], 32 as CK_ULONG);
    v.step(
        OpKind::Digest,
        Step::Finish {
            length_query: false,
        },
        Input::None,
        "C_Digest",
        |l, s| l.digest(s, Some(b"abc"), Some(&mut out), &mut len),
    )?;
    Ok(out[..len as usize].to_vec())
}

/// Waits for `condition`, looking again every millisecond, for at most a
/// minute of real time.
fn poll(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within a minute");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn error_of(answer: &CallAnswer) -> CK_RV {
    match answer {
        Ok(digest) => panic!("the call succeeded: {digest:02x?}"),
        Err(e) => e.rv,
    }
}

/// With no member serving and none being brought back, a call fails at
/// once, as before: it never waits (the clock does not move here, so a
/// call that waited would not return).
#[test]
fn with_no_member_coming_back_a_call_fails_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(61);
    let answer = digest(&outage.session);
    assert_eq!(error_of(&answer), CKR_DEVICE_ERROR);
    assert_eq!(outage.group.calls_waiting_for_a_member(), 0);
}

/// A call made while no member serves and member 1 is being brought back
/// -- its token being looked for, or the member catching up -- waits, and
/// runs on member 1 once it serves.
#[test]
fn a_call_made_while_a_member_is_coming_back_runs_on_it_once_it_serves() {
    for (seed, phase) in [(62, Phase::LookingForToken), (66, Phase::CatchingUp)] {
        runs_once_the_member_serves(seed, phase);
    }
}

fn runs_once_the_member_serves(seed: u64, phase: Phase) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(seed);
    let clock = pkcs11_ha::clock::install_manual();
    let started = clock.now();
    let (finished_while_held, answer) =
        outage.while_member_1_returns(phase, |_, call| call.is_finished());
    assert!(
        !finished_while_held,
        "the call waited while member 1 came back ({phase:?})"
    );
    assert_eq!(
        answer.unwrap_or_else(|e| panic!("{phase:?}: the call failed with {:#x}", e.rv)),
        Sha256::digest(b"abc").to_vec()
    );
    assert_eq!(outage.group.members[1].state(), MemberState::Up);
    assert!(
        made_the_removal(&outage.library),
        "member 1 made the removal it missed ({phase:?})"
    );
    assert_eq!(outage.group.calls_waiting_for_a_member(), 0);
    assert_eq!(clock.now(), started, "no timeout was needed");
}

/// Whether member 1's token lost [`REMOVED`] and kept [`KEPT`].
fn made_the_removal(library: &SimMember) -> bool {
    let labels: Vec<String> = library
        .token_objects(1)
        .into_iter()
        .map(|[_, label, _, _]| label)
        .collect();
    !labels.contains(&hex(REMOVED)) && labels.contains(&hex(KEPT))
}

/// The first member back in a group with no member serving serves without
/// reading its objects first (a call each: 0.2-2.8 s of each such outage
/// in the long chaos run): it is logged in and makes the removal it
/// missed, and nothing reads the object it keeps. The objects it missed
/// would be made on it right after it serves, each looked up then.
#[test]
fn a_member_returning_to_a_group_with_no_member_serving_serves_without_reading_its_objects() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(67);
    outage.library.sim.lock().heal(1);
    let read = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&read);
    outage
        .library
        .on_stall(move |_| seen.store(true, Ordering::SeqCst));
    // Its handle as the restarted token numbers it.
    let kept = token_object(&outage.library, 1, KEPT);
    outage
        .library
        .sim
        .lock()
        .set_fault(1, Fault::StallOnReading(kept));
    recovery::recover_failed_members(&outage.host);
    assert_eq!(outage.group.members[1].state(), MemberState::Up);
    assert!(
        !read.load(Ordering::SeqCst),
        "member 1's objects were read before it served"
    );
    assert!(
        made_the_removal(&outage.library),
        "member 1 made the removal it missed"
    );
    assert_eq!(
        digest(&outage.session).expect("a call runs on member 1"),
        Sha256::digest(b"abc").to_vec()
    );
}

/// A call waiting for a returning member fails once `memberTimeout` has
/// passed without one serving, while that member is still catching up; the
/// member serves once its recovery ends, and the next call runs on it.
#[test]
fn a_call_waits_at_most_member_timeout_for_a_returning_member() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(63);
    let clock = pkcs11_ha::clock::install_manual();
    let (still_recovering, answer) =
        outage.while_member_1_returns(Phase::CatchingUp, |outage, call| {
            clock.advance(MEMBER_TIMEOUT);
            poll("the call gives up at memberTimeout", || call.is_finished());
            outage.group.members[1].state()
        });
    assert_eq!(
        still_recovering,
        MemberState::Recovering,
        "the call ended while member 1 was still catching up"
    );
    assert_eq!(error_of(&answer), CKR_DEVICE_ERROR);
    assert_eq!(outage.group.members[1].state(), MemberState::Up);
    assert_eq!(
        digest(&outage.session).expect("the next call runs on member 1"),
        Sha256::digest(b"abc").to_vec()
    );
}

/// When the returning member fails again during its recovery, the waiting
/// call fails then, without waiting out `memberTimeout` (the clock does not
/// move).
#[test]
fn a_waiting_call_fails_when_the_returning_member_fails_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(64);
    let ((), answer) = outage.while_member_1_returns(Phase::CatchingUp, |outage, _| {
        outage.library.sim.lock().set_fault(1, Fault::Crash);
    });
    assert_eq!(error_of(&answer), CKR_DEVICE_ERROR);
    assert_eq!(outage.group.members[1].state(), MemberState::Down);
    assert_eq!(outage.group.calls_waiting_for_a_member(), 0);
}

/// `C_Finalize` ends the wait: the waiting call fails at once, and no call
/// waits after it.
#[test]
fn finalize_ends_the_wait_of_a_call_for_a_returning_member() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outage = Outage::new(65);
    let (after, answer) = outage.while_member_1_returns(Phase::CatchingUp, |outage, call| {
        outage.group.stop_waiting();
        poll("the waiting call returns", || call.is_finished());
        // Still no member serves: another call fails at once.
        digest(&outage.session)
    });
    assert_eq!(error_of(&answer), CKR_DEVICE_ERROR);
    assert_eq!(error_of(&after), CKR_DEVICE_ERROR);
}
