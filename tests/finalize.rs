//! `C_Finalize` with a call hung inside a member library: it returns after
//! `memberTimeout`, leaves that library initialised and loaded (never
//! finalised or unloaded under the call), the hung call answers
//! `CKR_CRYPTOKI_NOT_INITIALIZED` once the library lets it go, and
//! `C_Initialize` works again meanwhile. The members are faulty-member
//! copies (tests/faulty-member) over SoftHSM tokens, whose hang holds a
//! call inside the library as a hung HSM does.

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;
#[path = "common/relay.rs"]
mod relay;

use std::env;
use std::fs;
use std::sync::mpsc;
use std::sync::MutexGuard;
use std::thread;
use std::time::{Duration, Instant};

use common::faulty::FaultyMember;
use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use p11kit::P11KitServer;
use pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS;
use relay::Relay;

/// A bound for waits that only end early when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);
/// `memberTimeout` of these tests, in ms.
const MEMBER_TIMEOUT_MS: u64 = 1000;

/// Two members, `m0` and `m1`, each one SoftHSM token behind a faulty-member
/// copy, grouped into virtual slot 0. Holds the serial guard.
struct Ha {
    /// `None` while the application has unloaded the library.
    pkcs11: Option<Pkcs11>,
    members: Vec<FaultyMember>,
    hsm: SoftHsm,
    _guard: MutexGuard<'static, ()>,
}

impl Ha {
    fn new() -> Ha {
        let mut ha = Ha::unstarted();
        ha.pkcs11 = Some(start_ha());
        ha
    }

    /// [`Ha::new`] before the library under test is loaded.
    fn unstarted() -> Ha {
        let guard = serial_guard();
        let hsm = SoftHsm::new(&["member0", "member1"]);
        provision_domain(&hsm, &DOMAIN_VALUE);
        let members: Vec<FaultyMember> =
            FaultyMember::one_per_token(hsm.dir.path(), SOFTHSM_LIB, &hsm.serials());
        let paths: Vec<String> = members
            .iter()
            .map(|m| m.path.display().to_string())
            .collect();
        let libraries = [("m0", paths[0].as_str()), ("m1", paths[1].as_str())];
        let group = GroupSpec::new(GROUP_LABEL, &hsm.serials());
        let mut text = config_text(&libraries, &[group], false);
        text.push_str(&format!(
            "memberTimeout = {MEMBER_TIMEOUT_MS}\nAutoReconnectInterval = 1\n\
             haStateDir = {}\n",
            hsm.dir.path().join("state").display()
        ));
        let config = hsm.dir.path().join("pkcs11-ha.conf");
        fs::write(&config, text).expect("write pkcs11-ha.conf");
        hsm.activate();
        activate_config(&config);
        Ha {
            pkcs11: None,
            members,
            hsm,
            _guard: guard,
        }
    }

    /// The library under test, initialised.
    fn pkcs11(&self) -> &Pkcs11 {
        self.pkcs11
            .as_ref()
            .expect("the library under test is loaded")
    }

    /// The pass-through slot of member `i`: its calls reach that member
    /// only.
    fn member_slot(&self, i: usize) -> Slot {
        let id = passthrough_slot_id(&format!("m{i}"), self.hsm.tokens[i].slot_id);
        Slot::try_from(id).expect("slot id")
    }

    /// `C_Finalize`, from a thread of its own so that a hang fails the test
    /// instead of holding it; how long it took.
    fn finalize(&self) -> Duration {
        let pkcs11 = self.pkcs11().clone();
        let (done, finalized) = mpsc::channel();
        thread::spawn(move || {
            let started = Instant::now();
            let result = pkcs11.finalize();
            let _ = done.send((result, started.elapsed()));
        });
        let (result, took) = finalized
            .recv_timeout(PATIENCE)
            .expect("C_Finalize did not return with a call hung in a member");
        result.expect("C_Finalize");
        took
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        for member in &self.members {
            member.release();
        }
        // An error here would only hide the test's own result.
        if let Some(pkcs11) = self.pkcs11.take() {
            let _ = pkcs11.finalize();
        }
        env::remove_var(CONF_ENV);
        env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn start_ha() -> Pkcs11 {
    let pkcs11 = load_ha();
    initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
    pkcs11
}

/// Runs `call` in a thread of its own, its answer sent when it returns;
/// whatever it owns of the application (a session) is forgotten there,
/// never closed: its handle belongs to the provider `C_Finalize` ended.
fn in_thread<T: Send + 'static, K: Send + 'static>(
    kept: K,
    call: impl FnOnce(&K) -> T + Send + 'static,
) -> mpsc::Receiver<T> {
    let (answer, answered) = mpsc::channel();
    thread::spawn(move || {
        let result = call(&kept);
        std::mem::forget(kept);
        let _ = answer.send(result);
    });
    answered
}

fn rv<T>(result: cryptoki::error::Result<T>) -> Option<RvError> {
    match result {
        Ok(_) => None,
        Err(Error::Pkcs11(rv, _)) => Some(rv),
        Err(e) => panic!("not a PKCS#11 answer: {e:?}"),
    }
}

/// A call on a session hangs inside member 0 (in process: no socket to
/// cut). `C_Finalize` returns, without finalising member 0 while the call
/// is inside it; `C_Initialize` serves again from member 1; the hung call,
/// let go, answers `CKR_CRYPTOKI_NOT_INITIALIZED`, and member 0 then serves
/// the new provider.
#[test]
fn c_finalize_leaves_a_library_with_a_hung_session_call_and_that_call_answers_later() {
    let mut ha = Ha::new();
    let passthrough: Session = ha
        .pkcs11()
        .open_ro_session(ha.member_slot(0))
        .expect("C_OpenSession on member 0's pass-through slot");
    let m0 = &ha.members[0];
    m0.hang();
    let hung = in_thread(passthrough, |s: &Session| rv(s.generate_random_vec(16)));
    assert!(
        m0.wait_for_blocked(1, PATIENCE),
        "C_GenerateRandom did not reach member 0"
    );
    m0.reset_counts();

    let took = ha.finalize();
    eprintln!("C_Finalize with a call hung in member 0 took {took:?}");
    assert_eq!(
        m0.call_count("C_Finalize"),
        0,
        "member 0 was finalised under the hung call"
    );
    assert_eq!(
        ha.members[1].call_count("C_Finalize"),
        1,
        "member 1, with no call inside, is finalised"
    );

    ha.pkcs11 = Some(start_ha());
    let s = user_session(ha.pkcs11(), Slot::try_from(0u64).expect("slot 0"));
    s.digest(&Mechanism::Sha256, b"served by member 1")
        .expect("C_Digest after C_Initialize again, member 0 still hung");

    m0.release();
    let answer = hung
        .recv_timeout(PATIENCE)
        .expect("the hung call did not return once released");
    assert_eq!(answer, Some(RvError::CryptokiNotInitialized));
    let again = ha
        .pkcs11()
        .open_ro_session(ha.member_slot(0))
        .expect("C_OpenSession on member 0 once it answers again");
    again
        .generate_random_vec(16)
        .expect("C_GenerateRandom on member 0, left initialised, for the new provider");
}

/// A call without a session (`C_GetTokenInfo` on member 0's pass-through
/// slot, which used to hold the provider's lock for its whole run) hangs
/// inside member 0: `C_Finalize` still returns, and the call answers when
/// let go.
#[test]
fn c_finalize_returns_with_a_slot_call_hung_in_a_member() {
    let mut ha = Ha::new();
    let slot = ha.member_slot(0);
    ha.pkcs11()
        .get_token_info(slot)
        .expect("C_GetTokenInfo on member 0's pass-through slot");
    let m0 = &ha.members[0];
    m0.hang();
    let hung = in_thread(ha.pkcs11().clone(), move |p: &Pkcs11| {
        rv(p.get_token_info(slot))
    });
    assert!(
        m0.wait_for_blocked(1, PATIENCE),
        "C_GetTokenInfo did not reach member 0"
    );
    m0.reset_counts();

    let took = ha.finalize();
    eprintln!("C_Finalize with C_GetTokenInfo hung in member 0 took {took:?}");
    assert_eq!(
        m0.call_count("C_Finalize"),
        0,
        "member 0 was finalised under the hung call"
    );
    m0.release();
    let answer = hung
        .recv_timeout(PATIENCE)
        .expect("the hung call did not return once released");
    assert_eq!(answer, Some(RvError::CryptokiNotInitialized));

    // Left initialised, member 0 serves the next provider and is
    // finalised by the next C_Finalize, which finds it empty.
    ha.pkcs11 = Some(start_ha());
    ha.pkcs11()
        .get_token_info(slot)
        .expect("C_GetTokenInfo on member 0 after C_Initialize again");
    ha.finalize();
    assert_eq!(m0.call_count("C_Finalize"), 1, "member 0 finalised");
}

/// Whether the library under test is mapped in this process.
fn ha_mapped() -> bool {
    let maps = fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let name = library_path();
    let name = name.file_name().expect("a file name").to_string_lossy();
    maps.lines().any(|line| line.ends_with(&*name))
}

/// A thread of ours outlives `C_Finalize` and the application's `dlclose`
/// of the library: `C_Initialize`'s look for member 0's token, given up
/// after `memberTimeout` while member 0 hangs. The library stays mapped,
/// and when member 0 lets the thread go it returns into our code (the
/// process would die of `SIGSEGV` were it unmapped) and leaves. Every application call is made from a
/// thread that has ended before the `dlclose`, so no thread-local of the
/// application's threads keeps the library loaded.
#[test]
fn a_thread_of_ours_returns_safely_after_c_finalize_and_dlclose() {
    let mut ha = Ha::unstarted();
    // The application's calls, each from a thread that ends with it.
    let start = || thread::spawn(start_ha).join().expect("C_Initialize");
    ha.pkcs11 = Some(start());
    ha.finalize();
    ha.members[0].hang();
    ha.members[0].reset_counts();
    ha.pkcs11 = Some(start());
    assert!(
        ha.members[0].wait_for_blocked(1, PATIENCE),
        "C_Initialize did not ask member 0 for its slots"
    );
    ha.finalize();
    // The application unloads the library: the last reference goes.
    ha.pkcs11 = None;
    assert!(
        ha_mapped(),
        "the library was unmapped with a thread of ours in it"
    );
    ha.members[0].release();
    // The thread returns into our code; once it has left member 0, a
    // C_Finalize finds member 0 empty and finalises it.
    let deadline = Instant::now() + PATIENCE;
    while ha.members[0].call_count("C_Finalize") == 0 {
        assert!(
            Instant::now() < deadline,
            "the thread left in member 0 did not leave it once released"
        );
        ha.pkcs11 = Some(start());
        ha.finalize();
    }
}

/// `PKCS11HA_GetGroupStatus` of group 0, through the exported symbol.
fn group_status() -> PKCS11HA_GROUP_STATUS {
    // SAFETY: the symbol has this signature; the library is loaded.
    unsafe {
        let library = libloading::Library::new(library_path()).expect("load pkcs11-ha");
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64> =
            library
                .get(b"PKCS11HA_GetGroupStatus\0")
                .expect("PKCS11HA_GetGroupStatus");
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), 0, "PKCS11HA_GetGroupStatus");
        status
    }
}

/// Calls that wait inside p11-kit's client, up to `[LibraryConcurrency]`
/// of them at once, on a server that has stalled (the relay in front of
/// it holds what it is sent): `C_Finalize` returns, each call answers with
/// an error, and once the path is back `C_Initialize` serves again.
#[test]
fn c_finalize_returns_with_calls_stalled_inside_p11_kits_client() {
    const CALLERS: usize = 3;
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["stalled"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let dir = hsm.dir.path();
    let server = P11KitServer::start(SOFTHSM_LIB, &hsm.conf, "stalled", &dir.join("server.sock"));
    let mut relay = Relay::start(&dir.join("relay.sock"), &server.socket);
    let text = format!(
        "[Libraries]\nremote = {}\n\n[LibraryEnvironment]\nremote.P11_KIT_SERVER_ADDRESS = {}\n\
         \n[LibraryConcurrency]\nremote = {CALLERS}\n\n[LibraryInstances]\nremote = 1\n\
         \n[VirtualToken]\nVirtualToken00Label = {GROUP_LABEL}\nVirtualToken00Members = {}\n\
         \n[HAConfiguration]\nmemberTimeout = {MEMBER_TIMEOUT_MS}\nAutoReconnectInterval = 1\n\
         haStateDir = {}\n",
        p11kit::client_module(),
        relay.address(),
        hsm.tokens[0].serial,
        dir.join("state").display()
    );
    let config = dir.join("pkcs11-ha.conf");
    fs::write(&config, text).expect("write pkcs11-ha.conf");
    activate_config(&config);
    let pkcs11 = start_ha();
    let slot = Slot::try_from(0u64).expect("slot 0");
    let sessions: Vec<Session> = (0..CALLERS).map(|_| user_session(&pkcs11, slot)).collect();
    for s in &sessions {
        s.digest(&Mechanism::Sha256, b"before")
            .expect("C_Digest before the stall");
    }

    relay.pause();
    let callers: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            in_thread(
                s,
                |s: &Session| rv(s.digest(&Mechanism::Sha256, b"stalled")),
            )
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while group_status().members[0].callsInFlight < CALLERS as u64 {
        assert!(
            Instant::now() < deadline,
            "the digests did not all reach the member"
        );
        thread::yield_now();
    }

    let (done, finalized) = mpsc::channel();
    let finalizing = pkcs11.clone();
    thread::spawn(move || {
        let started = Instant::now();
        let result = finalizing.finalize();
        let _ = done.send((result, started.elapsed()));
    });
    let (result, took) = finalized
        .recv_timeout(PATIENCE)
        .expect("C_Finalize did not return with calls stalled in p11-kit's client");
    result.expect("C_Finalize");
    eprintln!("C_Finalize with {CALLERS} calls stalled in p11-kit's client took {took:?}");
    for caller in callers {
        let answer = caller
            .recv_timeout(PATIENCE)
            .expect("a stalled call did not return after C_Finalize");
        assert!(
            matches!(
                answer,
                Some(RvError::CryptokiNotInitialized | RvError::DeviceError)
            ),
            "a stalled call answered {answer:?}"
        );
    }

    relay.resume();
    initialize(&pkcs11).expect("C_Initialize again");
    let deadline = Instant::now() + PATIENCE;
    let session = user_session(&pkcs11, slot);
    while session.digest(&Mechanism::Sha256, b"after").is_err() {
        assert!(
            Instant::now() < deadline,
            "the member did not serve again after C_Initialize"
        );
        thread::yield_now();
    }
    drop(session);
    pkcs11.finalize().expect("C_Finalize");
    env::remove_var(CONF_ENV);
    drop((relay, server, hsm, guard));
}
