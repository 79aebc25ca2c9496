//! A member PKCS#11 library loaded at run time: its function table and
//! whether we initialised it, the one way into that table
//! ([`MemberLibrary::call`]), the classification of a member's answers
//! ([`classify`]) and each member token's call counts ([`CallCounts`]).
//! Owns the `dlopen` handle; never holds a lock while calling into the
//! library.

use crate::config::is_p11_kit_client;
use crate::error::{check, luna, rv_name, Error, Result};
use cryptoki_sys::*;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub mod round_trips;
use round_trips::RoundTrips;

/// Calls one entry of a member's function table through
/// [`MemberLibrary::call`]; a missing entry is `CKR_FUNCTION_NOT_SUPPORTED`,
/// as the specification says of a NULL slot.
macro_rules! member_call {
    ($lib:expr, $func:ident ( $($arg:expr),* $(,)? )) => {{
        let library: &$crate::member::MemberLibrary = &$lib;
        library.call(
            stringify!($func),
            |table| table.$func,
            // SAFETY: the table came from the member's own C_GetFunctionList
            // or C_GetInterface and the library stays loaded while `$lib`
            // lives; the arguments follow the PKCS#11 signature.
            |f| unsafe { f($($arg),*) },
        )
    }};
}
pub(crate) use member_call;

/// How SoftHSM names itself in a token's `manufacturerID`.
const SOFTHSM_MANUFACTURER: &[u8] = b"SoftHSM";

/// What a call that makes or destroys objects does to a token's object
/// list ([`MemberLibrary::call_writing`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Makes a token object, reading no token object of SoftHSM's first
    /// (the object it copies, unwraps with or derives from may be a
    /// session object, whose refresh reads nothing of the token).
    Token,
    /// Makes session objects only: the token's list is not touched.
    Session,
    /// Destroys the object it names: SoftHSM refreshes that object first,
    /// and a token object's refresh re-reads the token's object list when
    /// another process changed it (a session object's destruction leaves
    /// the list alone).
    Destroy,
}

/// A token object an instance made on a SoftHSM token (or found there:
/// the group's domain key, [`MemberLibrary::offer_index_probe`]), read to
/// have SoftHSM read the token's object list again
/// ([`MemberLibrary::call_writing`]).
#[derive(Clone, Copy)]
struct IndexProbe {
    slot: CK_SLOT_ID,
    /// The instance's connection it was made on: object handles are a
    /// server process's own.
    connection: u64,
    object: CK_OBJECT_HANDLE,
}

/// The slot of `session`, asked with the library's own
/// `C_GetSessionInfo`.
fn session_slot(
    info: unsafe extern "C" fn(CK_SESSION_HANDLE, *mut CK_SESSION_INFO) -> CK_RV,
    session: CK_SESSION_HANDLE,
) -> Option<CK_SLOT_ID> {
    let mut found = CK_SESSION_INFO {
        slotID: 0,
        state: 0,
        flags: 0,
        ulDeviceError: 0,
    };
    // SAFETY: the library's own function, writing into a local of the
    // right type.
    (unsafe { info(session, &mut found) } == CKR_OK).then_some(found.slotID)
}

/// Whether the token in `slot` answers its token info with
/// `CKR_GENERAL_ERROR`: SoftHSM's answer once the process lost sight of
/// the token for good.
fn token_lost(
    info: unsafe extern "C" fn(CK_SLOT_ID, *mut CK_TOKEN_INFO) -> CK_RV,
    slot: CK_SLOT_ID,
) -> bool {
    // SAFETY: CK_TOKEN_INFO is plain data (all-zero is a valid value);
    // the library's own function writes into it.
    let mut token: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    (unsafe { info(slot, &mut token) }) == CKR_GENERAL_ERROR
}

/// What a member's answer says about the member: the one place that tells
/// a member fault (take the member out, carry the call elsewhere) from a
/// request error (the application's answer; the member stays in service).
/// A request error must never take a member out, or one malformed request
/// sent to each member in turn would take the group down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `CKR_OK`.
    Served,
    /// The request's own answer: the application gets it.
    Request,
    /// A request error unless the member lost its login behind our back
    /// (it restarted, or was logged out): then it is logged in again and
    /// asked again (`virtual_session.rs`, `check_login`).
    LoginLost,
    /// The member is busy for now (Luna's `CKR_AGAIN`, `CKR_BUSY`): asked
    /// again a few times ([`crate::group::retry_while_busy`]), then taken
    /// for down.
    Busy,
    /// The member is down: it leaves the rotation and the call goes to
    /// another member.
    Down,
}

impl Answer {
    /// Whether the answer takes the member out of service: it is down, or
    /// it stayed busy however often it was asked.
    pub fn is_member_fault(self) -> bool {
        matches!(self, Answer::Down | Answer::Busy)
    }
}

/// Classifies `function`'s answer `rv` from a member. Applied by
/// [`MemberLibrary::call`] to every call (an answer that is a member fault
/// is not counted as served), and by the group to decide what to do next.
/// A closed session is never the member's fault when the call was the
/// close itself: the session is gone either way (closing a virtual
/// session, the group still takes a member that no longer knew a session
/// of its current epoch for restarted, `Group::lost_sessions`). A
/// session pkcs11-ha closed or never had is refused before any member is
/// called (`session.rs`, `CallGate`), so a member that says a session it
/// was given is invalid lost it: it restarted. A login that fails with
/// `CKR_GENERAL_ERROR` however often it is asked means the member's view
/// of its token is broken in this process (SoftHSM's, see
/// `group::log_in_member`).
pub fn classify(function: &str, rv: CK_RV) -> Answer {
    match rv {
        CKR_OK => Answer::Served,
        CKR_SESSION_CLOSED | CKR_SESSION_HANDLE_INVALID if function == "C_CloseSession" => {
            Answer::Request
        }
        // Asked again for seconds first (`group::log_in_member`): a member
        // still answering it cannot log this process in, and no PIN was
        // checked -- SoftHSM answers it before it looks at the PIN.
        CKR_GENERAL_ERROR if function == "C_Login" => Answer::Down,
        CKR_DEVICE_ERROR
        | CKR_DEVICE_REMOVED
        | CKR_DEVICE_MEMORY
        | CKR_TOKEN_NOT_PRESENT
        | CKR_TOKEN_NOT_RECOGNIZED
        | CKR_SESSION_CLOSED
        | CKR_SESSION_HANDLE_INVALID
        | CKR_CRYPTOKI_NOT_INITIALIZED
        | luna::CKR_UNABLE_TO_CONNECT
        | luna::CKR_TIMEOUT
        | luna::CKR_DEVICE_TIMEOUT
        | luna::CKR_PARTITION_DISABLED
        | luna::CKR_CONTAINER_HANDLE_INVALID
        | luna::CKR_HSM_TAMPERED => Answer::Down,
        rv if luna::SECURE_CHANNEL_ERRORS.contains(&rv) => Answer::Down,
        luna::CKR_AGAIN | luna::CKR_BUSY => Answer::Busy,
        CKR_USER_NOT_LOGGED_IN | CKR_OBJECT_HANDLE_INVALID | CKR_KEY_HANDLE_INVALID => {
            Answer::LoginLost
        }
        _ => Answer::Request,
    }
}

/// The calls of one member token: in flight (low [`IN_FLIGHT_BITS`] bits)
/// and served (the rest) in one word, so that a call costs two atomic
/// updates, not three. Kept by the group's member and by its library for
/// the token's slot, so that calls through the pass-through slot count too;
/// updated only by [`MemberLibrary::call`], for the calls made while a
/// [`Counting`] scope names them.
#[derive(Default)]
pub struct CallCounts {
    calls: AtomicU64,
}

/// Room for a million calls in flight at once; the served count above it
/// wraps after 2^44 calls.
const IN_FLIGHT_BITS: u32 = 20;
const IN_FLIGHT_MASK: u64 = (1 << IN_FLIGHT_BITS) - 1;
/// Added when a call ends served: one fewer in flight, one more served.
const CALL_SERVED: u64 = (1 << IN_FLIGHT_BITS) - 1;

impl CallCounts {
    pub fn in_flight(&self) -> usize {
        (self.calls.load(Ordering::Relaxed) & IN_FLIGHT_MASK) as usize
    }

    pub fn calls_served(&self) -> u64 {
        self.calls.load(Ordering::Relaxed) >> IN_FLIGHT_BITS
    }

    /// Counts a call in flight until the guard is dropped, as served.
    #[inline(always)]
    pub fn enter(&self) -> InFlight<'_> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }
}

/// A call counted in flight on a [`CallCounts`].
pub struct InFlight<'a>(&'a CallCounts);

impl InFlight<'_> {
    /// Ends the call `function` answered `rv`: served unless the answer
    /// is a member fault.
    #[inline(always)]
    fn answered(self, function: &'static str, rv: CK_RV) {
        let counts = self.0;
        std::mem::forget(self);
        let served = rv == CKR_OK || served_despite(function, rv);
        let change = if served { CALL_SERVED } else { u64::MAX };
        counts.calls.fetch_add(change, Ordering::Relaxed);
    }
}

/// Whether an answer other than `CKR_OK` still counts as served; out of
/// line, so that the classification is not copied into every call site.
#[cold]
#[inline(never)]
fn served_despite(function: &str, rv: CK_RV) -> bool {
    !classify(function, rv).is_member_fault()
}

impl Drop for InFlight<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.0.calls.fetch_add(CALL_SERVED, Ordering::Relaxed);
    }
}

thread_local! {
    /// The counts of the member token this thread is calling on (null: the
    /// call is no token's, such as a slot listing); set by [`Counting`].
    static COUNTED_ON: Cell<*const CallCounts> = const { Cell::new(ptr::null()) };
}

/// Runs `call`, the member function `function`, counted on the token the
/// thread's [`Counting`] names: in flight while it runs, then served unless
/// [`classify`] finds its answer a member fault. Every member
/// implementation counts its calls through here ([`MemberLibrary::call`]
/// for a loaded library), so that the load balancer and the watchdog see
/// any member alike.
#[inline(always)]
pub fn counted(function: &'static str, call: impl FnOnce() -> CK_RV) -> CK_RV {
    // SAFETY: set only by a `Counting` of this thread, which borrows the
    // counts for as long as it names them.
    let in_flight = unsafe { COUNTED_ON.get().as_ref() }.map(CallCounts::enter);
    let rv = call();
    if let Some(in_flight) = in_flight {
        in_flight.answered(function, rv);
    }
    rv
}

/// Names the member token whose counts the member calls this thread makes
/// go to, until dropped (the name before comes back then). Set for every
/// call on a group member (`Member::begin_call`) and for every call on a
/// pass-through session (`Session::call`, `SessionRef`); not `Send`, since
/// it restores this thread's name.
pub struct Counting<'a> {
    outer: *const CallCounts,
    _counts: std::marker::PhantomData<&'a CallCounts>,
}

impl<'a> Counting<'a> {
    #[inline(always)]
    pub fn on(counts: &'a CallCounts) -> Self {
        Counting {
            outer: COUNTED_ON.replace(counts),
            _counts: std::marker::PhantomData,
        }
    }

    /// [`Self::on`] for a holder that keeps `counts` alive itself.
    ///
    /// # Safety
    /// `counts` must outlive the returned guard.
    #[inline(always)]
    pub unsafe fn on_kept(counts: &CallCounts) -> Counting<'static> {
        Counting {
            outer: COUNTED_ON.replace(counts),
            _counts: std::marker::PhantomData,
        }
    }
}

impl Drop for Counting<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        COUNTED_ON.set(self.outer);
    }
}

/// Who a library instance is: its config name, file, environment and, for
/// p11-kit's client, the server it reaches.
struct Instance {
    name: String,
    path: PathBuf,
    environment: Vec<(String, String)>,
    server: Option<PathBuf>,
}

/// One loaded member library.
pub struct MemberLibrary {
    pub name: String,
    pub path: PathBuf,
    /// Variables set while the library reads its environment (when its
    /// function list is obtained and when the application's `C_Initialize`
    /// initialises it, never when recovery reconnects it), so that two
    /// entries of one client library can reach two servers.
    environment: Vec<(String, String)>,
    /// The instance's function table ([`Self::table`]): p11-kit's client
    /// gives each instance a table of its own, and a library takes over
    /// its probe's where that found the server well while its own
    /// connection was dead ([`Self::reinitialize`]). Each table is made
    /// once per instance and leaked, so that a call that read one just
    /// before such a swap still calls through a live table (552
    /// bytes per instance, made once as the library is loaded: a loaded
    /// library is kept for the life of the process, see `_library`).
    table: AtomicPtr<CK_FUNCTION_LIST>,
    /// True when our `C_Initialize` succeeded, so ours is the `C_Finalize`.
    initialized_by_us: Mutex<bool>,
    /// Set by the application's `C_Finalize` until its next `C_Initialize`:
    /// a recovery thread still running after `C_Finalize` gave up waiting
    /// for it must not initialise a library again behind the application.
    retired: AtomicBool,
    /// Initialised (by us or before us) and not finalised since: only then
    /// is the library called outside its initialisation.
    usable: AtomicBool,
    /// The thread of a [`Bounded`] job still in the library (0: none).
    /// Nothing else starts a job on it, or initialises it, until that
    /// thread has returned -- it may never.
    job_thread: AtomicI32,
    /// The job under way was given up ([`Silent`]): only then does asking
    /// for another cut its socket again. A job merely running (another
    /// member's recovery looking for its token on this library) is no
    /// stuck one, and its connection may be the one a healthy member on
    /// this library serves on.
    job_given_up: AtomicBool,
    /// A client of a remote server ([`is_network_client`]): its calls are
    /// tracked on the wire, so that a stalled server's connection can be
    /// cut under them and the library reconnected.
    networked: bool,
    /// The socket path of p11-kit's client's server, as it read its address
    /// when its function list was obtained: a socket is cut only if it is
    /// connected there ([`cut_blocked_socket`]). `None` for other libraries.
    server: Option<PathBuf>,
    /// The most calls in flight at once (`[LibraryConcurrency]`); `None`:
    /// as many as the application makes, since we initialise every library
    /// with `CKF_OS_LOCKING_OK`.
    call_limit: Option<CallLimit>,
    /// Held for reading by every call into a networked library and for
    /// writing while it is reconnected, so that no call slips onto the new
    /// connection with a session number from the old one.
    reconnecting: RwLock<()>,
    /// Calls into a networked library are numbered as each goes on the
    /// wire (one count for a library and its spare instances, so that the
    /// lowest number on any of their wires is the oldest call); `wire`
    /// holds those there now.
    calls_sent: Arc<AtomicU64>,
    wire: Mutex<Vec<OnWire>>,
    /// How long the calls of this library and its spares usually take on
    /// the wire (shared as `calls_sent` is): the watchdog cuts a connection
    /// silent for many times that ([`Self::silent_call`]).
    round_trips: Arc<RoundTrips>,
    /// Counts `C_Initialize` calls: a session belongs to the connection it
    /// was opened on, and a reconnected library reuses session numbers.
    connection: AtomicU64,
    /// The call counts of each slot's token, shared with the group member
    /// on it (see [`Self::count_slot_as`]).
    slot_counts: Mutex<Vec<(CK_SLOT_ID, Arc<CallCounts>)>>,
    /// Further instances of p11-kit's client ([`Spares`]); none elsewhere.
    spares: Spares,
    /// The slots of the SoftHSM tokens this library (and its further
    /// instances, which share the list) has shown ([`Self::token_info`]),
    /// whose object list is read again before each write
    /// ([`Self::call_writing`]).
    softhsm_slots: Arc<Mutex<SmallVec<[CK_SLOT_ID; 2]>>>,
    /// For each such slot, a token object this instance made there, on the
    /// connection it was made on: reading one of its attributes has SoftHSM
    /// read the token's object list again ([`Self::call_writing`]).
    index_probes: Mutex<SmallVec<[IndexProbe; 2]>>,
    /// The calls inside the library now, and the application's
    /// `C_Finalize`s it has seen ([`Inside`]).
    inside: Inside,
    /// Never dropped while the process may still call into the library:
    /// every `MemberLibrary` of `[Libraries]` stays in the provider's list
    /// of loaded libraries for the life of the process (its fork
    /// generation), so `dlclose` never pulls code from under a thread that
    /// a call left inside it.
    _library: Library,
}

/// The calls inside one library instance (every call through
/// [`MemberLibrary::call`]: low 32 bits) and the application's
/// `C_Finalize`s the instance has seen (the rest) in one word, on a cache
/// line of its own: a call costs two atomic updates, and one that was
/// inside when `C_Finalize` gave up waiting for it sees the count above
/// change between them.
#[derive(Default)]
#[repr(align(64))]
struct Inside {
    word: AtomicU64,
}

const CALLS_INSIDE: u64 = (1 << 32) - 1;
/// How long after its probe told the library's own connection dead the
/// library may take over the probe's connection
/// ([`MemberLibrary::reinitialize`]): the reconnect follows at once, and
/// an older connection may have died since.
const TAKE_OVER_WITHIN: Duration = Duration::from_secs(2);

/// Added by each `C_Finalize` of the application.
const FINALIZED: u64 = 1 << 32;

/// A call counted inside its library until it answers (or unwinds).
struct CallInside<'a> {
    inside: &'a Inside,
    /// The word as the call entered.
    entered: u64,
}

impl Inside {
    #[inline(always)]
    fn enter(&self) -> CallInside<'_> {
        CallInside {
            inside: self,
            entered: self.word.fetch_add(1, Ordering::AcqRel),
        }
    }

    fn calls(&self) -> usize {
        (self.word.load(Ordering::Acquire) & CALLS_INSIDE) as usize
    }

    fn finalized(&self) {
        self.word.fetch_add(FINALIZED, Ordering::AcqRel);
    }
}

impl CallInside<'_> {
    /// The call leaves with `rv`, or with `CKR_CRYPTOKI_NOT_INITIALIZED`
    /// if the application's `C_Finalize` gave up waiting for it (see
    /// [`MemberLibrary::finalize_for_application`]): its answer belongs to
    /// a finalised provider.
    #[inline(always)]
    fn answer(self, rv: CK_RV) -> CK_RV {
        let left = self.inside.word.fetch_sub(1, Ordering::AcqRel);
        let entered = self.entered;
        std::mem::forget(self);
        if (left ^ entered) & !CALLS_INSIDE == 0 {
            rv
        } else {
            CKR_CRYPTOKI_NOT_INITIALIZED
        }
    }
}

impl Drop for CallInside<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.inside.word.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A library that the application's `C_Finalize` left initialised: calls
/// were still inside it, or its own `C_Finalize` had not returned, when
/// `memberTimeout` ran out.
#[derive(Debug)]
pub struct LeftBusy {
    /// The calls still inside it (0: its `C_Finalize` is the one stuck).
    pub calls: usize,
}

thread_local! {
    /// Whether this thread's last call into a member library was on the
    /// wire when its connection was severed.
    static CUT_OFF: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread's last call that makes or destroys objects
    /// found its SoftHSM token lost from sight
    /// ([`MemberLibrary::call_writing`]).
    static LOST_SIGHT: Cell<bool> = const { Cell::new(false) };
    /// The connection the session this thread is calling on belongs to
    /// (0: the call names no session).
    static SESSION_CONNECTION: Cell<u64> = const { Cell::new(0) };
}

/// Runs member calls on a session opened on `connection`. A call into a
/// networked library that has since been reconnected answers
/// `CKR_SESSION_HANDLE_INVALID` without reaching it: its session number
/// may now be another session's. Decided under the library's call lock, so
/// a thread held up between choosing a session and calling cannot slip a
/// call onto the new connection.
pub fn on_connection<T>(connection: u64, calls: impl FnOnce() -> T) -> T {
    let outer = SESSION_CONNECTION.replace(connection);
    let result = calls();
    SESSION_CONNECTION.set(outer);
    result
}

/// Whether the calling thread's last call into a networked member (since
/// [`forget_cut_off`]) was on the wire when the watchdog severed its
/// connection. Its request reached the server, which
/// may still carry it out if it was only stalled: an object it made is
/// then in doubt until the server has resumed or given it up.
pub fn last_call_cut_off() -> bool {
    CUT_OFF.get()
}

/// Forgets the last call's cut-off, for a call that never reached the
/// member, and that a write found its token lost from sight.
pub fn forget_cut_off() {
    CUT_OFF.set(false);
    LOST_SIGHT.set(false);
}

/// Whether the calling thread's last call that makes or destroys objects
/// (since [`forget_cut_off`]) failed because its SoftHSM process has lost
/// sight of the token ([`MemberLibrary::call_writing`]): answered `CKR_DEVICE_ERROR`, a
/// fault, but one whose request was refused whole -- nothing it was making
/// can land later.
pub fn last_write_lost_sight() -> bool {
    LOST_SIGHT.get()
}

/// Notes what [`last_write_lost_sight`] answers.
fn note_lost_sight(lost: bool) {
    LOST_SIGHT.set(lost);
}

/// Runs `call` with `SIGPIPE` blocked in this thread, consuming one it
/// raised, so that a write to a dead connection cannot end an application
/// that keeps the default disposition.
pub fn with_sigpipe_blocked<T>(call: impl FnOnce() -> T) -> T {
    // SAFETY: signal-set manipulation on local values and this thread's
    // mask only.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut previous);
        let already_blocked = libc::sigismember(&previous, libc::SIGPIPE) == 1;
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        let already_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let result = call();
        if !already_blocked {
            if !already_pending {
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                while libc::sigtimedwait(&pipe, std::ptr::null_mut(), &zero) == libc::SIGPIPE {}
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        }
        result
    }
}

/// A call silent on the wire past its limit ([`MemberLibrary::silent_call`]).
pub struct SilentCall {
    number: u64,
    pub function: &'static str,
    /// The spare instance it is on (1 is the first spare); `None`: the
    /// library's first instance.
    pub spare: Option<usize>,
    pub waited: Duration,
    /// The longest round trip of its function lately.
    pub usual: Duration,
}

/// A call on the wire of a networked library: its number, the thread
/// making it (whose blocked socket severing shuts down), the function (for
/// the HA log when it stalls), and whether the connection was severed
/// under it.
struct OnWire {
    number: u64,
    thread: i32,
    function: &'static str,
    since: Instant,
    cut_off: Option<Instant>,
}

/// How often a reconnect waiting for calls to leave the library cuts
/// again the sockets of those that were cut off: a thread that was not
/// yet waiting on its socket when it was cut (it was running, or waiting
/// for the CPU) may wait there now.
const CUT_AGAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How often the application's `C_Finalize` looks whether the calls
/// inside a library have left it: a few ms of its bounded wait.
const FINALIZE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a new job waits for one given up earlier to return, its
/// socket cut again ([`MemberLibrary::start_bounded_after_cut`]), and how
/// often it looks and cuts meanwhile.
const GIVEN_UP_JOB_RETURN: Duration = Duration::from_millis(300);
const GIVEN_UP_JOB_POLL: Duration = Duration::from_millis(10);

/// How often a job hedged with a fresh instance looks whether that
/// instance answered ([`Bounded::finish_hedged`]).
const FRESH_INSTANCE_POLL: Duration = Duration::from_millis(10);

/// Whether a library talks to a server, by what it is rather than by what
/// it does: p11-kit's remoting client (`p11-kit-client.so`, which serves
/// every token through one connection to `p11-kit server`), or a library
/// exporting Luna's `CA_GetFunctionList` (Luna's network client). Only
/// such a library is reconnected under a session, or has its connection
/// cut by the watchdog.
fn is_network_client(path: &Path, library: &Library) -> bool {
    // SAFETY: only the symbol's presence is asked; it is never called.
    is_p11_kit_client(path)
        || unsafe { library.get::<unsafe extern "C" fn()>(b"CA_GetFunctionList\0") }.is_ok()
}

/// The calls in flight at once into p11-kit's client unless
/// `[LibraryConcurrency]` says otherwise: one. With several, a server that
/// dies between one caller's reply header and its body leaves the other
/// callers of 0.24's client waiting forever on the dead connection's lock,
/// where no cut socket reaches them (the soak test hung so, every
/// application thread inside the client).
const P11_KIT_CLIENT_CALLS: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN;

/// The client instances of p11-kit's client unless `[LibraryInstances]`
/// says otherwise. Each `C_GetFunctionList` of p11-kit's client makes an
/// independent instance with a connection of its own, which
/// `p11-kit server` serves in a process of its own (sessions, login and
/// object handle numbers of its own); each instance takes one call at a
/// time, so the member takes this many at once without the client's flaw
/// under concurrent callers.
const P11_KIT_CLIENT_INSTANCES: usize = 8;

/// The instances of a library beyond its first: p11-kit's client only.
/// The first instance holds every session of the application, its
/// logins and the object map's handles; a spare serves, one call at a
/// time, calls that need none of them -- random numbers -- and whole
/// operations on *lanes* ([`Lane`]), each on a session of its own per
/// slot. A spare is initialised at its first use after the first
/// instance was (so that a slow server's start-up costs one instance's),
/// finalised with the first, and watched and cut off with it.
#[derive(Default)]
struct Spares {
    instances: Box<[Spare]>,
    /// The instances no call or lane is using, by index, lent from the
    /// back ([`lend_from`], [`hand_back`]).
    idle: Mutex<Vec<usize>>,
    /// Held while a spare is logged in or out, so that a lane's login
    /// (which first asks whether the group is logged in) and the group's
    /// logout of the spares cannot interleave: a spare logged in after
    /// the group logged out would serve private keys without a login.
    logins: Mutex<()>,
    /// An instance initialised only to tell a dead connection from a slow
    /// server ([`MemberLibrary::fresh_instance`]); its calls are
    /// counted apart, so that they never pass for the first instance's.
    probe: Option<Arc<MemberLibrary>>,
    /// When the probe, left initialised, last told the library's own
    /// connection dead ([`Bounded::finish_hedged`]): its connection may be
    /// taken over ([`MemberLibrary::reinitialize`]).
    told_dead_at: Mutex<Option<Instant>>,
}

struct Spare {
    library: MemberLibrary,
    /// The first instance's connection when this one's initialisation was
    /// last tried: one that failed is tried again only after the first
    /// instance reconnects.
    tried_on: AtomicU64,
    /// Its connection failed while the member's may not have (a reset, a
    /// restarted server the first instance has reconnected to): it is
    /// finalised and initialised again at its next use, and calls go to
    /// the member's own session meanwhile. Without this, a member recovered
    /// on its first instance was taken out again by each call a dead spare
    /// failed, several times a second. Also set when it did not know the
    /// member's slot ([`Spare::missed_slot`]).
    stale: AtomicBool,
    /// How many times in a row it did not know the member's slot, and
    /// until when it is not lent after the last ([`spare_rest`]).
    slot_misses: AtomicU32,
    rests_until: Mutex<Option<Instant>>,
    /// Its sessions, one per slot.
    sessions: Mutex<SmallVec<[SpareSession; 1]>>,
    /// Sessions of lanes given up unfinished ([`Lane`]'s drop), each with
    /// the connection it is on: closed by whoever next holds the spare
    /// ([`Spare::close_forgotten`]). Its server process keeps them, and the
    /// operations active on them, for as long as the connection lives: a
    /// member whose recovery reconnects nothing (its first instance
    /// outlived the fault) kept one session per lane it lost, for good.
    forgotten: Mutex<SmallVec<[(CK_SESSION_HANDLE, u64); 1]>>,
}

/// A spare's session on one slot, with what is known on it: whether the
/// spare is logged in there, and the handles of the token objects found on
/// it. Both end with the session: closing a slot's last session logs the
/// token out and may renumber its objects (SoftHSM).
struct SpareSession {
    slot: CK_SLOT_ID,
    handle: CK_SESSION_HANDLE,
    /// The spare's connection it was opened on.
    connection: u64,
    logged_in: bool,
    /// Virtual object handle -> (its handle on the first instance when it
    /// was found here, its handle here). A first-instance handle that has
    /// changed since (the object was made again there) is looked up again.
    keys: rustc_hash::FxHashMap<CK_OBJECT_HANDLE, (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    /// The other way, for searches on the spare: its handle -> (the
    /// virtual handle, its handle on the first instance), or `None` for an
    /// object the application never sees (the domain key).
    found: rustc_hash::FxHashMap<CK_OBJECT_HANDLE, Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>>,
}

/// A spare instance taken by one call, handed back on drop: behind every
/// other idle spare if it `failed` (could not be initialised or open its
/// session).
struct Borrowed<'a> {
    spares: &'a Spares,
    index: usize,
    failed: bool,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        hand_back(&mut self.spares.idle.lock(), self.index, self.failed);
    }
}

/// Takes from `idle` the spare to lend: the last that `first_choice`
/// accepts, else the last that `second_choice` accepts. Lent from the
/// back, a spare that just served is lent again first (last in, first
/// out): its session is open, logged in and knows the keys, and a member
/// serving fewer calls at once than it has spares logs in and searches on
/// fewer of them.
fn lend_from(
    idle: &mut Vec<usize>,
    first_choice: impl Fn(usize) -> bool,
    second_choice: impl Fn(usize) -> bool,
) -> Option<usize> {
    let at = idle
        .iter()
        .rposition(|&i| first_choice(i))
        .or_else(|| idle.iter().rposition(|&i| second_choice(i)))?;
    Some(idle.remove(at))
}

/// Hands spare `index` back to `idle`: one that served on top, lent next;
/// one that `failed` at the bottom, lent after every other idle spare, so
/// that a broken spare is not tried again ahead of healthy ones. Handed
/// back on top, two spares whose server processes had no slot served
/// first every call of a member for a whole minute, each only to fail
/// and send the call to the member's first instance: one spare of three
/// served (the third, only while both broken ones were taken).
fn hand_back(idle: &mut Vec<usize>, index: usize, failed: bool) {
    if failed {
        idle.insert(0, index);
    } else {
        idle.push(index);
    }
}

/// How long a spare that did not know the member's slot `misses` times in
/// a row is not lent: [`SPARE_REST_FIRST`], doubled at each further miss
/// up to [`SPARE_REST_MAX`]. Each lending after a miss connects the spare
/// again (a new server process), which costs far more than a call; a
/// server that never lists the slot to new connections costs one
/// reconnection per [`SPARE_REST_MAX`].
fn spare_rest(misses: u32) -> Duration {
    let doublings = misses.saturating_sub(1).min(16);
    SPARE_REST_FIRST
        .saturating_mul(1 << doublings)
        .min(SPARE_REST_MAX)
}

const SPARE_REST_FIRST: Duration = Duration::from_millis(100);
const SPARE_REST_MAX: Duration = Duration::from_secs(5);

impl Borrowed<'_> {
    /// Keeps the spare from being handed back on drop (a [`Lane`] owns it).
    fn keep(self) -> usize {
        let index = self.index;
        std::mem::forget(self);
        index
    }
}

impl Spares {
    /// An idle spare that is not resting after missing the slot: an
    /// initialised one if any, else, where it may `connect` one, one not
    /// yet tried on the first instance's `connection`. Without `connect`,
    /// only a spare that is initialised and not stale: one that needs no
    /// new connection before its first call.
    fn borrow(&self, connection: u64, connect: bool) -> Option<Borrowed<'_>> {
        let mut idle = self.idle.lock();
        let spare = |i: usize| &self.instances[i];
        let connected = |i: usize| spare(i).library.usable() && !spare(i).resting();
        let index = if connect {
            lend_from(&mut idle, connected, |i| {
                spare(i).tried_on.load(Ordering::Relaxed) != connection && !spare(i).resting()
            })
        } else {
            lend_from(
                &mut idle,
                |i| connected(i) && !spare(i).stale.load(Ordering::Acquire),
                |_| false,
            )
        }?;
        Some(Borrowed {
            spares: self,
            index,
            failed: false,
        })
    }
}

/// What a spare's connection setup is called on the wire ([`Spare::ready`]),
/// for [`MemberLibrary::cut_stalled_spare_setup`].
const SPARE_CONNECT: &str = "C_Initialize";
const SPARE_RECONNECT: &str = "C_Finalize and C_Initialize";

/// Whether `function`, on the wire, is a spare's connection set-up: no
/// call of any member (nothing counts it in flight), and cut on its own.
fn is_spare_setup(function: &str) -> bool {
    [SPARE_CONNECT, SPARE_RECONNECT].contains(&function)
}

/// How many times a list that grew between its two calls is read again.
const LIST_READS: usize = 8;

/// Reads a list by the two-call convention: `call(NULL, count)` for its
/// length, then `call(buffer, count)`. An empty list takes no second call:
/// p11-kit's client answers a buffer of length 0 with
/// `CKR_BUFFER_TOO_SMALL` and a count of 0, and a server listing no slot
/// (a restarted one, before it finds its token) kept recovery asking again
/// forever, 500 calls a second, so that the member never rejoined. A list
/// still growing after [`LIST_READS`] reads is that answer.
fn read_list(mut call: impl FnMut(*mut CK_ULONG, &mut CK_ULONG) -> CK_RV) -> Result<Vec<CK_ULONG>> {
    let mut rv = CKR_BUFFER_TOO_SMALL;
    for _ in 0..LIST_READS {
        let mut count: CK_ULONG = 0;
        check(call(ptr::null_mut(), &mut count))?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut list = vec![0; count as usize];
        rv = call(list.as_mut_ptr(), &mut count);
        if rv == CKR_BUFFER_TOO_SMALL {
            continue;
        }
        check(rv)?;
        list.truncate(count as usize);
        return Ok(list);
    }
    check(rv).map(|()| Vec::new())
}

/// A spare that does not know the member's slot (its server restarted
/// and has not found the token yet, or the server's process for the
/// spare's connection never listed it): not the application's error, and
/// not proof the member is down; the call runs on the member's own
/// session, whose answer decides, and the spare connects again later
/// ([`Spare::missed_slot`]).
fn slot_unknown_to_spare(rv: CK_RV) -> bool {
    matches!(rv, CKR_SLOT_ID_INVALID | CKR_TOKEN_NOT_PRESENT)
}

impl Spare {
    /// Initialises the spare if it is not yet usable (on the wire like a
    /// call, so the watchdog covers it); false if it stays unusable.
    fn ready(&self, first_connection: u64) -> bool {
        let library = &self.library;
        if self.stale.swap(false, Ordering::AcqRel) {
            self.tried_on.store(first_connection, Ordering::Relaxed);
            library.on_wire(SPARE_RECONNECT, &mut || {
                library
                    .reinitialize()
                    .map_or(CKR_GENERAL_ERROR, |()| CKR_OK)
            });
        } else if !library.usable() {
            self.tried_on.store(first_connection, Ordering::Relaxed);
            library.on_wire(SPARE_CONNECT, &mut || {
                library
                    .initialize_with(&[])
                    .map_or(CKR_GENERAL_ERROR, |()| CKR_OK)
            });
        }
        library.usable()
    }

    /// The spare's session on `slot` on its current connection, opened now
    /// if it has none; its sessions from an earlier connection are
    /// forgotten (their numbers may be another's now).
    fn session_on(&self, slot: CK_SLOT_ID) -> std::result::Result<(CK_SESSION_HANDLE, u64), CK_RV> {
        let library = &self.library;
        let connection = library.connection();
        let mut sessions = self.sessions.lock();
        sessions.retain(|s| s.connection == connection);
        if let Some(s) = sessions.iter().find(|s| s.slot == slot) {
            return Ok((s.handle, connection));
        }
        let mut handle: CK_SESSION_HANDLE = 0;
        let rv = on_connection(connection, || {
            member_call!(
                library,
                C_OpenSession(slot, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut handle)
            )
        });
        if rv != CKR_OK {
            if slot_unknown_to_spare(rv) {
                self.missed_slot();
            } else if classify("C_OpenSession", rv).is_member_fault() {
                self.stale.store(true, Ordering::Release);
            }
            return Err(rv);
        }
        if self.slot_misses.load(Ordering::Relaxed) != 0 {
            self.slot_misses.store(0, Ordering::Relaxed);
        }
        sessions.push(SpareSession {
            slot,
            handle,
            connection,
            logged_in: false,
            keys: Default::default(),
            found: Default::default(),
        });
        Ok((handle, connection))
    }

    /// The spare did not know the member's slot, which the first instance
    /// serves: the server's process for this connection may never list
    /// it (one whose SoftHSM was initialised while another instance's
    /// `C_Login` rewrote the token file answered `CKR_SLOT_ID_INVALID` to
    /// every `C_OpenSession` for its life), so the spare is connected
    /// again at its next use, after a rest ([`spare_rest`]).
    fn missed_slot(&self) {
        let misses = self.slot_misses.fetch_add(1, Ordering::Relaxed) + 1;
        *self.rests_until.lock() = Some(crate::clock::now() + spare_rest(misses));
        self.stale.store(true, Ordering::Release);
    }

    /// Whether the spare rests after missing the slot.
    fn resting(&self) -> bool {
        self.slot_misses.load(Ordering::Relaxed) != 0
            && self
                .rests_until
                .lock()
                .is_some_and(|until| crate::clock::now() < until)
    }

    /// Forgets the session `handle` opened on `connection` (closed, or
    /// left with an operation active), and with it its login and handles.
    fn forget_session(&self, handle: CK_SESSION_HANDLE, connection: u64) {
        self.sessions
            .lock()
            .retain(|s| (s.handle, s.connection) != (handle, connection));
    }

    /// Closes the sessions of lanes given up unfinished on this spare that
    /// are on its current connection (those of an earlier one went with
    /// it), unless a call is inside it (one cut off and not yet returned
    /// may be on one of them: they wait for the next holder). Called by
    /// the holder of the spare, before it opens a session: no lane is on
    /// them, and none of their numbers is a live session's.
    fn close_forgotten(&self) {
        let library = &self.library;
        let forgotten = {
            let mut forgotten = self.forgotten.lock();
            if forgotten.is_empty() || library.calls_inside() != 0 {
                return;
            }
            std::mem::take(&mut *forgotten)
        };
        let connection = library.connection();
        for (handle, on) in forgotten {
            let live = self.sessions.lock().iter().any(|s| s.handle == handle);
            if on == connection && !live {
                on_connection(on, || member_call!(library, C_CloseSession(handle)));
            }
        }
    }

    /// Runs `with` on the session `handle` still held on this connection.
    fn with_session<T>(
        &self,
        handle: CK_SESSION_HANDLE,
        connection: u64,
        with: impl FnOnce(&mut SpareSession) -> T,
    ) -> Option<T> {
        let mut sessions = self.sessions.lock();
        sessions
            .iter_mut()
            .find(|s| s.handle == handle && s.connection == connection)
            .map(with)
    }
}

/// A spare instance taken for a virtual session's operations, from their
/// `*Init` to their end, on the spare's session on the member's slot (an
/// operation stays on the session it started on). Handed back idle, its
/// session kept, by [`Lane::finish`]; dropped otherwise (an operation may
/// still be active on its session), the session is forgotten, so that no
/// later lane meets that operation, and closed by the spare's next holder
/// if its connection still lives ([`Spare::close_forgotten`]).
pub struct Lane {
    first: Arc<MemberLibrary>,
    index: usize,
    pub session: CK_SESSION_HANDLE,
    pub connection: u64,
    finished: bool,
}

impl Lane {
    fn spare(&self) -> &Spare {
        &self.first.spares.instances[self.index]
    }

    /// The spare instance's library, for member calls on [`Self::session`].
    pub fn library(&self) -> &MemberLibrary {
        &self.spare().library
    }

    /// Which spare instance this is (0 is the first spare).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The handle here of virtual object `object`, whose handle on the
    /// first instance is `first_handle`, if it was found here before.
    pub fn known_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        self.spare()
            .with_session(self.session, self.connection, |s| {
                s.keys
                    .get(&object)
                    .filter(|(first, _)| *first == first_handle)
                    .map(|(_, here)| *here)
            })
            .flatten()
    }

    /// Records that `object` (`first_handle` on the first instance) is
    /// `here` on this spare.
    pub fn remember_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
        here: CK_OBJECT_HANDLE,
    ) {
        self.spare()
            .with_session(self.session, self.connection, |s| {
                s.keys.insert(object, (first_handle, here));
            });
    }

    /// What a search on this spare found as `here` stands for, if it was
    /// identified before: `Some(None)` for an object hidden from the
    /// application.
    pub fn known_found(
        &self,
        here: CK_OBJECT_HANDLE,
    ) -> Option<Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>> {
        self.spare()
            .with_session(self.session, self.connection, |s| {
                s.found.get(&here).copied()
            })
            .flatten()
    }

    /// Records what the object `here` on this spare stands for: (virtual
    /// handle, handle on the first instance), or `None` if hidden.
    pub fn remember_found(
        &self,
        here: CK_OBJECT_HANDLE,
        stands_for: Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    ) {
        self.spare()
            .with_session(self.session, self.connection, |s| {
                s.found.insert(here, stands_for);
            });
    }

    /// Whether the spare is logged in on the lane's slot.
    pub fn logged_in(&self) -> bool {
        self.spare()
            .with_session(self.session, self.connection, |s| s.logged_in)
            .unwrap_or(false)
    }

    /// Forgets that the spare is logged in on the lane's slot: it answered
    /// that it is not (it was logged out behind our back).
    pub fn forget_login(&self) {
        self.spare()
            .with_session(self.session, self.connection, |s| s.logged_in = false);
    }

    /// Logs the spare in on the lane's slot with `log_in`, which answers
    /// `None` when the group is not logged in (asked under the spares'
    /// login lock, see [`Spares::logins`]). True when the spare is logged
    /// in afterwards.
    pub fn log_in(
        &self,
        log_in: impl FnOnce(&MemberLibrary, CK_SESSION_HANDLE) -> Option<CK_RV>,
    ) -> bool {
        let _logins = self.first.spares.logins.lock();
        if self.logged_in() {
            return true;
        }
        let rv = on_connection(self.connection, || log_in(self.library(), self.session));
        let logged_in = matches!(rv, Some(CKR_OK | CKR_USER_ALREADY_LOGGED_IN));
        if logged_in {
            self.spare()
                .with_session(self.session, self.connection, |s| s.logged_in = true);
        }
        logged_in
    }

    /// Leaves `session`, opened on this spare beside the lane's and given
    /// up unclosed, to the spare's next holder to close
    /// ([`Spare::close_forgotten`]).
    pub fn leave_session(&self, session: CK_SESSION_HANDLE) {
        self.spare()
            .forgotten
            .lock()
            .push((session, self.connection));
    }

    /// Hands the spare back with its session, no operation being active
    /// on it any more.
    pub fn finish(mut self) {
        self.finished = true;
    }

    /// Closes the lane's session (an operation may be active on it) and
    /// hands the spare back: for a member in service.
    pub fn close(self) {
        let library = self.library();
        on_connection(self.connection, || {
            member_call!(library, C_CloseSession(self.session))
        });
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if !self.finished {
            let spare = self.spare();
            spare.forget_session(self.session, self.connection);
            spare.forgotten.lock().push((self.session, self.connection));
        }
        hand_back(&mut self.first.spares.idle.lock(), self.index, false);
    }
}

/// A counting limit on calls in flight into one library.
struct CallLimit {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One call's place under a [`CallLimit`], given back on drop.
struct CallPermit<'a>(&'a CallLimit);

impl CallLimit {
    fn new(limit: std::num::NonZeroUsize) -> Self {
        CallLimit {
            free: std::sync::Mutex::new(limit.get()),
            freed: std::sync::Condvar::new(),
        }
    }

    fn enter(&self) -> CallPermit<'_> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut free = self
            .freed
            .wait_while(free, |free| *free == 0)
            .unwrap_or_else(|p| p.into_inner());
        *free -= 1;
        CallPermit(self)
    }
}

impl Drop for CallPermit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

fn socket_inode(fd: i32) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let text = target.to_str()?;
    text.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Runs `f` with the variables of `libraries`' environments on which they
/// agree set in the process, then restores them: the environment in
/// effect while several libraries initialise at once. A variable two
/// libraries set differently is left as it is (each library had its own
/// value while its function list was obtained, which is when p11-kit's
/// client reads its server address). Callers hold the provider's
/// lifecycle lock.
pub fn with_common_environment<T>(libraries: &[Arc<MemberLibrary>], f: impl FnOnce() -> T) -> T {
    let mut common: Vec<(String, String)> = Vec::new();
    let mut conflicting: Vec<String> = Vec::new();
    for (key, value) in libraries.iter().flat_map(|l| l.environment.iter()) {
        match common.iter().find(|(k, _)| k == key) {
            Some((_, v)) if v != value => conflicting.push(key.clone()),
            Some(_) => {}
            None => common.push((key.clone(), value.clone())),
        }
    }
    common.retain(|(k, _)| !conflicting.contains(k));
    with_environment(&common, f)
}

/// Runs `f` with `environment` set in the process, then restores it.
/// Only for the application's own `C_Initialize` (callers hold the
/// provider's lifecycle lock) and the CLI: `setenv` while another thread
/// reads the environment is undefined behaviour, and at other times the
/// application's threads may be reading it.
fn with_environment<T>(environment: &[(String, String)], f: impl FnOnce() -> T) -> T {
    let saved: Vec<(String, Option<std::ffi::OsString>)> = environment
        .iter()
        .map(|(k, _)| (k.clone(), std::env::var_os(k)))
        .collect();
    for (k, v) in environment {
        std::env::set_var(k, v);
    }
    let result = f();
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(&k, v),
            None => std::env::remove_var(&k),
        }
    }
    result
}

impl MemberLibrary {
    /// Loads the library (`RTLD_LOCAL`) and copies its 2.40 function table.
    ///
    /// `C_GetInterface` is asked first; whatever version a member reports,
    /// only the 2.40 entries are copied, because those are the only ones we
    /// call and SoftHSM reports 3.x while filling only those.
    pub fn load(
        name: &str,
        path: &Path,
        environment: &[(String, String)],
    ) -> std::result::Result<Self, String> {
        // SAFETY: loading a PKCS#11 module runs its constructors; that is
        // what the operator configured us to do.
        let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
            // libloading says only "dlopen failed"; the loader's own
            // reason (dlerror) is the error's source.
            let reason =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            format!("cannot load {}: {reason}", path.display())
        })?;
        // Its own entry points would take the locks its caller holds:
        // `C_Initialize` would wait forever. A copy at another path is
        // caught too, by the export only pkcs11-ha has.
        // SAFETY: only the symbol's presence is asked; it is never called.
        if unsafe { library.get::<unsafe extern "C" fn()>(b"PKCS11HA_GetGroupStatus\0") }.is_ok() {
            return Err(format!(
                "{} is pkcs11-ha itself, which cannot be its own member; name the member's own library (SoftHSM, Luna, ...)",
                path.display()
            ));
        }
        let table = with_environment(environment, || {
            with_sigpipe_blocked(|| Self::function_table(&library))
        })
        .map_err(|why| format!("{} is not a usable PKCS#11 library: {why}", path.display()))?;
        let networked = is_network_client(path, &library);
        let p11_kit_client = is_p11_kit_client(path);
        Ok(MemberLibrary::with_table(
            Instance {
                name: name.to_string(),
                path: path.to_path_buf(),
                environment: environment.to_vec(),
                server: p11_kit_client
                    .then(|| p11_kit_server_path(environment))
                    .flatten(),
            },
            (library, table),
            networked,
            p11_kit_client.then(|| CallLimit::new(P11_KIT_CLIENT_CALLS)),
            Arc::new(AtomicU64::new(0)),
            Arc::default(),
        ))
    }

    /// A library instance in its starting state: not initialised, not
    /// usable, on its first connection, with no spares.
    fn with_table(
        instance: Instance,
        (library, functions): (Library, CK_FUNCTION_LIST),
        networked: bool,
        call_limit: Option<CallLimit>,
        calls_sent: Arc<AtomicU64>,
        round_trips: Arc<RoundTrips>,
    ) -> MemberLibrary {
        MemberLibrary {
            name: instance.name,
            path: instance.path,
            environment: instance.environment,
            server: instance.server,
            table: AtomicPtr::new(Box::leak(Box::new(functions))),
            initialized_by_us: Mutex::new(false),
            retired: AtomicBool::new(false),
            usable: AtomicBool::new(false),
            job_thread: AtomicI32::new(0),
            job_given_up: AtomicBool::new(false),
            networked,
            call_limit,
            reconnecting: RwLock::new(()),
            calls_sent,
            wire: Mutex::new(Vec::new()),
            round_trips,
            connection: AtomicU64::new(1),
            slot_counts: Mutex::new(Vec::new()),
            spares: Spares::default(),
            softhsm_slots: Arc::default(),
            index_probes: Mutex::new(SmallVec::new()),
            inside: Inside::default(),
            _library: library,
        }
    }

    /// Gives p11-kit's client `instances` instances in all
    /// (`[LibraryInstances]`; its default without), the first being this
    /// one. Each further instance's function list is obtained with the
    /// library's environment set, as the first's was: p11-kit's client
    /// reads its server's address then; so is that of the instance
    /// recovery probes the server with ([`Self::fresh_instance`]).
    /// Other libraries have one instance.
    pub fn with_instances(
        mut self,
        instances: Option<std::num::NonZeroUsize>,
    ) -> std::result::Result<Self, String> {
        if !is_p11_kit_client(&self.path) {
            return Ok(self);
        }
        let count = instances.map_or(P11_KIT_CLIENT_INSTANCES, std::num::NonZeroUsize::get);
        let spares = (1..count)
            .map(|_| self.spare())
            .collect::<std::result::Result<Box<[Spare]>, String>>()?;
        let probe = self.instance(Arc::new(AtomicU64::new(0)), Arc::default())?;
        self.spares = Spares {
            idle: Mutex::new((0..spares.len()).collect()),
            instances: spares,
            logins: Mutex::new(()),
            probe: Some(Arc::new(probe)),
            told_dead_at: Mutex::new(None),
        };
        Ok(self)
    }

    /// A further instance of this library, from a function list of its own,
    /// numbering its calls on the wire with `calls_sent` and noting their
    /// round trips in `round_trips`.
    fn instance(
        &self,
        calls_sent: Arc<AtomicU64>,
        round_trips: Arc<RoundTrips>,
    ) -> std::result::Result<MemberLibrary, String> {
        // SAFETY: as in `load`; the library is loaded already, so this only
        // counts one more reference to it.
        let library = unsafe { Library::open(Some(&self.path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| format!("cannot load {} again: {e}", self.path.display()))?;
        let table = with_environment(&self.environment, || {
            with_sigpipe_blocked(|| Self::function_table(&library))
        })
        .map_err(|why| format!("{} gave no further instance: {why}", self.path.display()))?;
        let mut instance = MemberLibrary::with_table(
            Instance {
                name: self.name.clone(),
                path: self.path.clone(),
                environment: self.environment.clone(),
                server: self.server.clone(),
            },
            (library, table),
            true,
            // One call at a time, also when a logout reaches a spare
            // that a lane holds.
            Some(CallLimit::new(P11_KIT_CLIENT_CALLS)),
            calls_sent,
            round_trips,
        );
        instance.softhsm_slots = Arc::clone(&self.softhsm_slots);
        Ok(instance)
    }

    /// A spare instance ([`Spares`]): its calls are numbered, and their
    /// round trips noted, with the first instance's.
    fn spare(&self) -> std::result::Result<Spare, String> {
        Ok(Spare {
            library: self.instance(Arc::clone(&self.calls_sent), Arc::clone(&self.round_trips))?,
            tried_on: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            slot_misses: AtomicU32::new(0),
            rests_until: Mutex::new(None),
            sessions: Mutex::new(SmallVec::new()),
            forgotten: Mutex::new(SmallVec::new()),
        })
    }

    /// Whether the library has spare instances ([`Spares`]).
    #[inline]
    pub fn has_spares(&self) -> bool {
        !self.spares.instances.is_empty()
    }

    /// Runs `call`, which names no object and starts no operation, on an
    /// idle spare instance (initialised now if it is not yet, on the wire
    /// like a call), on that instance's session on `slot` (opened now if
    /// it has none on its current connection), with what `begin` returns
    /// held around it; `None` when no spare is idle and initialised or
    /// initialisable, and the caller uses its own session. A spare's answer
    /// is the member's: its server is the member's.
    pub fn on_spare<G>(
        &self,
        slot: CK_SLOT_ID,
        begin: impl FnOnce() -> G,
        call: &mut dyn FnMut(&MemberLibrary, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<CK_RV> {
        let first_connection = self.connection();
        let mut borrowed = self.spares.borrow(first_connection, true)?;
        let spare = &self.spares.instances[borrowed.index];
        if !spare.ready(first_connection) {
            borrowed.failed = true;
            return None;
        }
        let _begun = begin();
        spare.close_forgotten();
        let (session, connection) = match spare.session_on(slot) {
            Ok(opened) => opened,
            Err(rv) => {
                borrowed.failed = true;
                if slot_unknown_to_spare(rv) || spare.stale.load(Ordering::Acquire) {
                    return None;
                }
                return Some(rv);
            }
        };
        let rv = on_connection(connection, || call(&spare.library, session));
        if matches!(rv, CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED) {
            spare.forget_session(session, connection);
        }
        Some(rv)
    }

    /// Takes an idle spare instance as a [`Lane`] for a virtual session's
    /// operations on `slot` (initialising the spare and opening its session
    /// there as needed, with what `begin` returns held around those calls);
    /// `None` when no spare is idle and usable. `Some(Err)` is the member's
    /// answer when the spare could not open its session.
    pub fn take_lane<G>(
        self: &Arc<Self>,
        slot: CK_SLOT_ID,
        begin: impl FnOnce() -> G,
    ) -> Option<std::result::Result<Lane, CK_RV>> {
        self.lend_lane(slot, begin, true)
    }

    /// [`Self::take_lane`], from the spares that are connected already
    /// (initialised and not stale): none is connected for it. A returning
    /// member's replay takes its lanes so. Connecting a spare has its
    /// server start a process that loads the whole token, which under the
    /// long chaos run's load outlasted `memberTimeout` and was cut off: in
    /// one run, replays spent 3.2-5.9 s setting up lanes and made no import
    /// on them, their members held out meanwhile while no other served.
    pub fn take_connected_lane<G>(
        self: &Arc<Self>,
        slot: CK_SLOT_ID,
        begin: impl FnOnce() -> G,
    ) -> Option<std::result::Result<Lane, CK_RV>> {
        self.lend_lane(slot, begin, false)
    }

    fn lend_lane<G>(
        self: &Arc<Self>,
        slot: CK_SLOT_ID,
        begin: impl FnOnce() -> G,
        connect: bool,
    ) -> Option<std::result::Result<Lane, CK_RV>> {
        let first_connection = self.connection();
        let mut borrowed = self.spares.borrow(first_connection, connect)?;
        let spare = &self.spares.instances[borrowed.index];
        let _begun = begin();
        if !spare.ready(first_connection) {
            borrowed.failed = true;
            return None;
        }
        spare.close_forgotten();
        let (session, connection) = match spare.session_on(slot) {
            Ok(opened) => opened,
            Err(rv) => {
                borrowed.failed = true;
                if slot_unknown_to_spare(rv) || spare.stale.load(Ordering::Acquire) {
                    return None;
                }
                return Some(Err(rv));
            }
        };
        Some(Ok(Lane {
            first: Arc::clone(self),
            index: borrowed.keep(),
            session,
            connection,
            finished: false,
        }))
    }

    /// Closes the sessions lanes left unfinished on idle spares
    /// ([`Spare::close_forgotten`]), each spare off the idle list
    /// meanwhile and back in its place after: for when the application's
    /// last session on the member's slot closed, since a spare lent to no
    /// call after that keeps them.
    pub fn close_forgotten_lanes(&self) {
        for (index, spare) in self.spares.instances.iter().enumerate() {
            if spare.forgotten.lock().is_empty() {
                continue;
            }
            let at = {
                let mut idle = self.spares.idle.lock();
                let Some(at) = idle.iter().position(|&i| i == index) else {
                    continue;
                };
                idle.remove(at);
                at
            };
            if spare.library.usable() && !spare.stale.load(Ordering::Acquire) {
                spare.close_forgotten();
            }
            let mut idle = self.spares.idle.lock();
            let at = at.min(idle.len());
            idle.insert(at, index);
        }
    }

    /// Logs every spare instance out of `slot` where a lane logged it in,
    /// and forgets the handles found there (a token drops its private
    /// objects' handles at logout): when the group logs out.
    pub fn log_out_spares(&self, slot: CK_SLOT_ID) {
        let _logins = self.spares.logins.lock();
        for spare in self.spares.instances.iter() {
            let mut sessions = spare.sessions.lock();
            let connection = spare.library.connection();
            for s in sessions.iter_mut().filter(|s| s.slot == slot) {
                s.keys.clear();
                s.found.clear();
                if std::mem::take(&mut s.logged_in) && s.connection == connection {
                    let library = &spare.library;
                    on_connection(s.connection, || member_call!(library, C_Logout(s.handle)));
                }
            }
        }
    }

    fn function_table(library: &Library) -> std::result::Result<CK_FUNCTION_LIST, String> {
        // SAFETY: symbol types are the PKCS#11 signatures of these names.
        unsafe {
            if let Ok(get_interface) = library.get::<CK_C_GetInterface>(b"C_GetInterface\0") {
                if let Some(get_interface) = *get_interface {
                    let mut interface: *mut CK_INTERFACE = ptr::null_mut();
                    let rv = get_interface(ptr::null_mut(), ptr::null_mut(), &mut interface, 0);
                    if rv == CKR_OK && !interface.is_null() && !(*interface).pFunctionList.is_null()
                    {
                        let list = (*interface).pFunctionList as *const CK_FUNCTION_LIST;
                        return Ok(ptr::read(list));
                    }
                }
            }
            let get_list = library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .map_err(|_| {
                    "it exports neither C_GetInterface nor C_GetFunctionList".to_string()
                })?;
            let get_list = (*get_list).ok_or("C_GetFunctionList is NULL")?;
            let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
            let rv = get_list(&mut list);
            if rv != CKR_OK || list.is_null() {
                return Err(format!("C_GetFunctionList returned {}", rv_name(rv)));
            }
            Ok(ptr::read(list))
        }
    }

    /// The one way into the library's function table: `select` picks
    /// `function`'s entry, `invoke` calls it, and the call runs
    /// [`Self::shielded`], counted on the token the thread's [`Counting`]
    /// names: in flight while inside the library, then served unless
    /// [`classify`] finds the answer a member fault. The table itself never
    /// leaves this module, so no member call can skip the connection check,
    /// the numbering the watchdog reads, the classification or the counts.
    ///
    /// A networked library's entry is picked again under its reconnect
    /// lock, where a swap of its table ([`Self::reinitialize`]) cannot
    /// come between the pick and the call.
    #[inline(always)]
    pub fn call<F: Copy>(
        &self,
        function: &'static str,
        select: impl Fn(&CK_FUNCTION_LIST) -> Option<F>,
        invoke: impl FnOnce(F) -> CK_RV,
    ) -> CK_RV {
        let Some(f) = select(self.table()) else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        let inside = self.inside.enter();
        let rv = counted(function, || {
            self.shielded(function, || {
                let f = if self.networked {
                    select(self.table()).unwrap_or(f)
                } else {
                    f
                };
                invoke(f)
            })
        });
        inside.answer(rv)
    }

    /// The function table calls go through now (see `table`).
    #[inline(always)]
    fn table(&self) -> &'static CK_FUNCTION_LIST {
        // SAFETY: every pointer stored there comes from `Box::leak` of a
        // table no one writes to.
        unsafe { &*self.table.load(Ordering::Acquire) }
    }

    /// The call counts of the token in `slot`: those of the group member
    /// there once the group has found it ([`Self::count_slot_as`]), so that
    /// calls on a pass-through session count for the member too.
    pub fn slot_counts(&self, slot: CK_SLOT_ID) -> Arc<CallCounts> {
        let mut counts = self.slot_counts.lock();
        if let Some((_, found)) = counts.iter().find(|(s, _)| *s == slot) {
            return Arc::clone(found);
        }
        let fresh = Arc::new(CallCounts::default());
        counts.push((slot, Arc::clone(&fresh)));
        fresh
    }

    /// Makes `counts` (a group member's) the counts of the token in `slot`
    /// for the pass-through sessions opened from now on.
    pub fn count_slot_as(&self, slot: CK_SLOT_ID, counts: &Arc<CallCounts>) {
        let mut all = self.slot_counts.lock();
        all.retain(|(s, c)| *s != slot && !Arc::ptr_eq(c, counts));
        all.push((slot, Arc::clone(counts)));
    }

    /// The PKCS#11 version the library's function table reports.
    pub fn version(&self) -> CK_VERSION {
        self.table().version
    }

    /// A function the library exports beside its PKCS#11 table (Luna's
    /// `CA_*` extensions), where it does.
    ///
    /// # Safety
    /// `T` must be the function pointer type of the export `name`.
    pub unsafe fn extension<T: Copy>(&self, name: &[u8]) -> Option<T> {
        // SAFETY: the caller vouches for the type.
        unsafe { self._library.get::<T>(name).ok().map(|symbol| *symbol) }
    }

    /// Limits the calls in flight at once into the library to `limit`
    /// (`[LibraryConcurrency]`), for a library that cannot take as many
    /// concurrent calls as the application makes.
    /// Without a limit in the config, the library keeps its default (one
    /// call at a time for p11-kit's client, none otherwise).
    pub fn limit_calls(mut self, limit: Option<std::num::NonZeroUsize>) -> Self {
        if let Some(limit) = limit {
            self.call_limit = Some(CallLimit::new(limit));
        }
        self
    }

    /// Runs a call into the library. Calls run concurrently, as the library
    /// agreed to when it accepted `CKF_OS_LOCKING_OK`, up to its
    /// `[LibraryConcurrency]` limit where one is set. A call into a network
    /// client ([`is_network_client`]) is numbered and recorded with its
    /// thread while it is on the wire, so that the watchdog can cut the
    /// socket each such call waits on and the call knows it was cut off
    /// ([`last_call_cut_off`]); and it runs with `SIGPIPE` blocked in this
    /// thread, a `SIGPIPE` it raises being consumed, so a server that died
    /// while idle cannot kill an application that does not ignore the
    /// signal (the process-wide disposition is never touched). In-process
    /// members without a limit pay nothing.
    #[inline(always)]
    pub fn shielded(&self, function: &'static str, call: impl FnOnce() -> CK_RV) -> CK_RV {
        if self.networked || self.call_limit.is_some() {
            let mut call = Some(call);
            self.shielded_on_wire(function, &mut || {
                call.take().map_or(CKR_GENERAL_ERROR, |c| c())
            })
        } else {
            call()
        }
    }

    /// The networked or limited half of [`Self::shielded`], out of line so
    /// that the in-process call path stays a few cache lines long.
    #[cold]
    #[inline(never)]
    fn shielded_on_wire(&self, function: &'static str, call: &mut dyn FnMut() -> CK_RV) -> CK_RV {
        let _permit = self.call_limit.as_ref().map(CallLimit::enter);
        if !self.networked {
            return call();
        }
        let _connection = self.reconnecting.read();
        let expected = SESSION_CONNECTION.get();
        if expected != 0 && expected != self.connection.load(Ordering::Acquire) {
            CUT_OFF.set(false);
            return CKR_SESSION_HANDLE_INVALID;
        }
        self.on_wire(function, call)
    }

    /// Runs `call` numbered and recorded on the wire (see
    /// [`Self::shielded`]).
    fn on_wire(&self, function: &'static str, call: &mut dyn FnMut() -> CK_RV) -> CK_RV {
        let number = self.calls_sent.fetch_add(1, Ordering::Relaxed) + 1;
        let since = crate::clock::now();
        self.wire.lock().push(OnWire {
            number,
            thread: this_thread(),
            function,
            since,
            cut_off: None,
        });
        let result = with_sigpipe_blocked(call);
        let mut wire = self.wire.lock();
        let cut_off = wire
            .iter()
            .position(|c| c.number == number)
            .is_some_and(|i| wire.swap_remove(i).cut_off.is_some());
        drop(wire);
        CUT_OFF.set(cut_off);
        if !cut_off {
            let now = crate::clock::now();
            self.round_trips.answered(now);
            if result == CKR_OK {
                let took = now.saturating_duration_since(since);
                self.round_trips.record(function, took, now);
            }
        }
        result
    }

    /// The number of the oldest call on the wire now (0: none), for the
    /// watchdog: the same number there too long is a stalled connection,
    /// whichever call it is (a slot listing as much as an operation).
    pub fn call_on_wire(&self) -> u64 {
        let own = self.wire.lock().iter().map(|c| c.number).min();
        let spares = self
            .spares
            .instances
            .iter()
            .filter_map(|s| s.library.wire.lock().iter().map(|c| c.number).min());
        own.into_iter().chain(spares).min().unwrap_or(0)
    }

    /// Cuts off the oldest call on the wire if it is a spare's connection
    /// setup, and marks the spare stale: its instance number (1 is the
    /// first spare), or `None` (nothing cut) for any other call. A new
    /// connection costs a server process that loads the whole token, which
    /// on a loaded host outlasted `memberTimeout`; cut as a silent member,
    /// it took out a member that served from its first instance, one
    /// second after it returned (the soak: the last serving member). The
    /// call that took the spare runs on the member's own session instead,
    /// and a server that does not answer there is cut as ever.
    pub fn cut_stalled_spare_setup(&self) -> Option<usize> {
        let oldest = |instance: &MemberLibrary| {
            let wire = instance.wire.lock();
            wire.iter()
                .min_by_key(|c| c.number)
                .map(|c| (c.number, c.function))
        };
        let own = oldest(self).map_or(u64::MAX, |(number, _)| number);
        let (index, number) = self
            .spares
            .instances
            .iter()
            .enumerate()
            .filter_map(|(i, s)| oldest(&s.library).map(|(n, f)| (i, n, f)))
            .filter(|(_, n, _)| *n < own)
            .min_by_key(|(_, n, _)| *n)
            .filter(|(_, _, f)| is_spare_setup(f))
            .map(|(i, n, _)| (i, n))?;
        let spare = &self.spares.instances[index];
        spare.stale.store(true, Ordering::Release);
        spare.library.cut_calls(|call| call.number == number);
        Some(index + 1)
    }

    /// The longest `function` took on the wire lately, with enough round
    /// trips known ([`RoundTrips::usual`]).
    pub fn usual_round_trip(&self, function: &str) -> Option<Duration> {
        self.round_trips.usual(function, crate::clock::now())
    }

    /// The oldest call on the wire, of this instance or a spare, that has
    /// been silent past its limit at `now` ([`round_trips::silent_limit`]:
    /// many times its function's usual round trip, and less than
    /// `member_timeout`) with no call of the library answering since it
    /// went out (nor a read inside a write: [`Self::call_writing`]), if
    /// any.
    pub fn silent_call(&self, now: Instant, member_timeout: Duration) -> Option<SilentCall> {
        let instances = std::iter::once((self, None)).chain(
            (self.spares.instances.iter())
                .enumerate()
                .map(|(i, s)| (&s.library, Some(i + 1))),
        );
        let mut oldest: Option<SilentCall> = None;
        for (instance, spare) in instances {
            for call in instance.wire.lock().iter() {
                if call.cut_off.is_some()
                    || !round_trips::judged_by_round_trip(call.function)
                    || oldest.as_ref().is_some_and(|o| o.number < call.number)
                {
                    continue;
                }
                let usual = self.round_trips.usual(call.function, now);
                let Some(limit) = round_trips::silent_limit(usual, member_timeout) else {
                    continue;
                };
                let waited = now.saturating_duration_since(call.since);
                if waited >= limit && !self.round_trips.answered_since(call.since) {
                    oldest = Some(SilentCall {
                        number: call.number,
                        function: call.function,
                        spare,
                        waited,
                        usual: usual.unwrap_or_default(),
                    });
                }
            }
        }
        oldest
    }

    /// The oldest call on the wire now, for the HA log: its function, and
    /// on which instance (see [`Spares`]). A spare's connection set-up is
    /// left out: the watchdog cuts it on its own, before it names a
    /// call here, and named for a member that completed nothing it
    /// pointed at a spare the member's calls did not wait for (the chaos
    /// suite: "the oldest on the wire: C_Initialize on its instance 7",
    /// while the member's own calls waited in a black hole).
    pub fn stalled_call(&self) -> Option<String> {
        let oldest = |instance: &MemberLibrary| {
            let wire = instance.wire.lock();
            wire.iter()
                .filter(|c| !is_spare_setup(c.function))
                .min_by_key(|c| c.number)
                .map(|c| (c.number, c.function, c.since))
        };
        let own = oldest(self).map(|(number, function, since)| (number, function, since, None));
        let spares = self
            .spares
            .instances
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                oldest(&s.library).map(|(n, f, since)| (n, f, since, Some(i + 1)))
            });
        let (_, function, since, instance) = own.into_iter().chain(spares).min_by_key(|c| c.0)?;
        let waited = crate::clock::now()
            .saturating_duration_since(since)
            .as_millis();
        Some(match instance {
            None => format!("{function} on its first instance, {waited} ms on the wire"),
            Some(i) => format!("{function} on its instance {i} (a spare), {waited} ms on the wire"),
        })
    }

    /// Whether the library talks to a server ([`is_network_client`]); only
    /// such a library can be reconnected under a session or cut off.
    #[inline]
    pub fn is_networked(&self) -> bool {
        self.networked
    }

    /// Initialises the library for OS locking, with its
    /// `[LibraryEnvironment]` set: only within the application's
    /// `C_Initialize` (see [`with_environment`]). A library the application
    /// (or a parent process before `fork`) already initialised is usable
    /// as it is, and is then not ours to finalise.
    pub fn initialize(&self) -> Result<()> {
        self.reinstate();
        self.initialize_with(&self.environment)
    }

    /// [`Self::initialize`] in the process environment as it is (see
    /// [`with_common_environment`]).
    pub fn initialize_in_this_environment(&self) -> Result<()> {
        self.reinstate();
        self.initialize_with(&[])
    }

    /// Marks the library and its spares finalised by the application
    /// (see `retired`); done before they are finalised, so that nothing
    /// initialises them again once that has begun.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        for spare in self.spares.instances.iter() {
            spare.library.retire();
        }
        if let Some(probe) = &self.spares.probe {
            probe.retire();
        }
    }

    /// Undoes [`Self::retire`]: the application initialises again.
    fn reinstate(&self) {
        self.retired.store(false, Ordering::Release);
        for spare in self.spares.instances.iter() {
            spare.library.reinstate();
        }
        if let Some(probe) = &self.spares.probe {
            probe.reinstate();
        }
    }

    /// `SIGPIPE` is blocked around the call whatever the library is. Holds
    /// the reconnect lock for writing: a call made on the last connection
    /// must not reach the next one.
    fn initialize_with(&self, environment: &[(String, String)]) -> Result<()> {
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: ptr::null_mut(),
        };
        let _reconnecting = self.exclusive();
        if self.retired.load(Ordering::Acquire) {
            return Err(Error::new(CKR_CRYPTOKI_NOT_INITIALIZED));
        }
        self.usable.store(false, Ordering::Release);
        self.connection.fetch_add(1, Ordering::AcqRel);
        let rv = with_environment(environment, || {
            with_sigpipe_blocked(|| match self.table().C_Initialize {
                // SAFETY: the library's own C_Initialize, with arguments that
                // live across the call.
                Some(f) => unsafe { f(&mut args as *mut _ as *mut std::ffi::c_void) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            })
        });
        let mut ours = self.initialized_by_us.lock();
        let outcome = match rv {
            CKR_OK => {
                *ours = true;
                Ok(())
            }
            CKR_CRYPTOKI_ALREADY_INITIALIZED => Ok(()),
            rv => Err(Error::new(rv)),
        };
        self.usable.store(outcome.is_ok(), Ordering::Release);
        outcome
    }

    /// Finalises the library if, and only if, we initialised it, once every
    /// call inside it has returned (see [`Self::exclusive`]; severing ends
    /// those a stalled server holds).
    pub fn finalize(&self) {
        let _reconnecting = self.exclusive();
        self.finalize_with_spares();
        self.release_probe();
    }

    /// Finalises this instance, if we initialised it, and its spares, but
    /// not its probe; the caller holds its reconnect lock
    /// ([`Self::exclusive`]).
    fn finalize_with_spares(&self) {
        self.finalize_own();
        for spare in self.spares.instances.iter() {
            spare.library.finalize();
        }
    }

    /// Finalises the probe, left initialised if it found the server well
    /// ([`Self::fresh_instance`]): its connection is a server process of
    /// its own. Not while a probe job runs (it may be stuck connecting):
    /// that job's next successor finalises it first.
    fn release_probe(&self) {
        *self.spares.told_dead_at.lock() = None;
        if let Some(probe) = &self.spares.probe {
            if !probe.job_running() {
                probe.finalize();
            }
        }
    }

    /// Finalises this instance alone if we initialised it; the caller holds
    /// its reconnect lock ([`Self::exclusive`]).
    fn finalize_own(&self) {
        let mut ours = self.initialized_by_us.lock();
        if std::mem::take(&mut *ours) {
            self.usable.store(false, Ordering::Release);
            with_sigpipe_blocked(|| match self.table().C_Finalize {
                // SAFETY: the library's own C_Finalize; NULL is its only
                // valid argument.
                Some(f) => unsafe { f(ptr::null_mut()) },
                None => CKR_FUNCTION_NOT_SUPPORTED,
            });
        }
    }

    /// Holds off calls while the library is initialised or finalised, once
    /// every call inside it has returned, cutting again every
    /// [`CUT_AGAIN_EVERY`] the sockets of those that were cut off. Never
    /// sooner: `C_Finalize` closes the library's socket, and the next
    /// socket opened anywhere in the process (another member's reconnect,
    /// a spare's first connection) takes its number while a thread of ours
    /// may still use it -- its client reads or writes another member's
    /// connection, and a cut that finds it blocked on that number shuts
    /// that member down (suspected, not shown, in an issue 12 soak run: a
    /// member with no fault of its own failed twice, 1 ms and 251 ms after
    /// another member's cut, leaving none serving).
    fn exclusive(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        loop {
            if let Some(guard) = self.reconnecting.try_write_for(CUT_AGAIN_EVERY) {
                return guard;
            }
            self.cut_calls(|call| call.cut_off.is_some());
        }
    }

    /// The calls inside the library and its spare instances now.
    pub fn calls_inside(&self) -> usize {
        std::iter::once(self)
            .chain(self.spares.instances.iter().map(|s| &s.library))
            .map(|instance| instance.inside.calls())
            .sum()
    }

    /// Whether nothing is inside the library: no call, no [`Bounded`]
    /// job, no initialisation or finalisation.
    fn quiet(&self) -> bool {
        self.calls_inside() == 0 && !self.job_running() && self.reconnecting.try_write().is_some()
    }

    /// The application's `C_Finalize` of the library. Waits until nothing
    /// is inside it ([`Self::quiet`]), until `deadline` at most, cutting
    /// again every [`CUT_AGAIN_EVERY`] the sockets of calls that were cut
    /// off, and at `deadline` those of every call on the wire (one more
    /// [`CUT_AGAIN_EVERY`] for them to return); then finalises it as
    /// [`Self::finalize`] does, in a thread of
    /// its own given `patience` where `threads` are allowed (a stalled
    /// server or a hung library can hold its `C_Finalize` too).
    ///
    /// A library still busy at `deadline`, or whose `C_Finalize` has not
    /// returned after `patience`, is left initialised and loaded: a call
    /// still running in a library that is finalised uses freed state
    /// (SoftHSM's), and one in a library that is unloaded runs in unmapped
    /// code. Each call that was inside answers
    /// `CKR_CRYPTOKI_NOT_INITIALIZED` when it returns ([`CallInside`]),
    /// and the next `C_Initialize` finds the library initialised and
    /// serves from it. A call that enters after the wait (the application
    /// calling while it finalises, which the standard leaves undefined) is
    /// not waited for.
    pub fn finalize_for_application(
        self: &Arc<Self>,
        deadline: Instant,
        patience: Duration,
        threads: bool,
    ) -> std::result::Result<(), LeftBusy> {
        let (mut deadline, mut severed) = (deadline, false);
        let quiet = loop {
            if self.quiet() {
                break true;
            }
            let mut left = crate::clock::block_for(deadline);
            if left.is_zero() && !severed && self.networked {
                // What still waits on the server is cut off, and given a
                // moment to return.
                severed = true;
                self.sever();
                deadline = crate::clock::now() + CUT_AGAIN_EVERY;
                left = CUT_AGAIN_EVERY;
            } else if left.is_zero() {
                break false;
            }
            for instance in
                std::iter::once(&**self).chain(self.spares.instances.iter().map(|s| &s.library))
            {
                instance.cut_calls(|call| call.cut_off.is_some());
            }
            crate::clock::sleep(left.min(FINALIZE_POLL));
        };
        for instance in
            std::iter::once(&**self).chain(self.spares.instances.iter().map(|s| &s.library))
        {
            instance.inside.finalized();
        }
        if !quiet {
            return Err(LeftBusy {
                calls: self.calls_inside(),
            });
        }
        if !threads {
            self.finalize();
            return Ok(());
        }
        let finished = self
            .start_bounded(MemberLibrary::finalize)
            .map(|job| job.finish(crate::clock::now() + patience, patience));
        match finished {
            Some(Ok(())) => Ok(()),
            _ => Err(LeftBusy { calls: 0 }),
        }
    }

    /// Whether the library may be called: it is initialised and no
    /// initialisation of ours is under way or stuck.
    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Whether a [`Bounded`] job has yet to return from the library.
    pub fn job_running(&self) -> bool {
        self.job_thread.load(Ordering::Acquire) != 0
    }

    /// Starts `job` on the library in a thread of its own (with `SIGPIPE`
    /// blocked), to be waited for with a deadline ([`Bounded::finish`]);
    /// `None` while an earlier job has not returned. A job that misses its
    /// deadline is abandoned, never joined: the library is not called
    /// again until it returns. Each `None` for an abandoned job cuts again
    /// the socket that job waits on: the cut at its deadline finds none
    /// while the job waits on a lock or between calls, and a job that then
    /// reads from a connection whose requests were dropped never returns
    /// (in the long chaos run a member stayed out 23 s so, its server
    /// healthy, no member serving).
    pub fn start_bounded<T: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&MemberLibrary) -> T + Send + 'static,
    ) -> Option<Bounded<T>> {
        // A placeholder until the thread knows its own id.
        const STARTING: i32 = -1;
        if self
            .job_thread
            .compare_exchange(0, STARTING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            if self.job_given_up.load(Ordering::Acquire) {
                self.sever_job();
            }
            return None;
        }
        self.job_given_up.store(false, Ordering::Release);
        let (answer, answered) = mpsc::sync_channel(1);
        let calls_sent = self.calls_sent.load(Ordering::Relaxed);
        let library = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("pkcs11-ha-{}", self.name))
            .spawn(move || {
                library.job_thread.store(this_thread(), Ordering::Release);
                let result = with_sigpipe_blocked(|| job(&library));
                library.job_thread.store(0, Ordering::Release);
                let _ = answer.send(result);
            });
        if spawned.is_err() {
            self.job_thread.store(0, Ordering::Release);
            return None;
        }
        Some(Bounded {
            library: Arc::clone(self),
            answered,
            answer: Cell::new(None),
            calls_sent,
        })
    }

    /// Shuts down the socket a stuck job's thread is blocked on, if it is
    /// this library's ([`cut_blocked_socket`]), so that its call returns
    /// with an error instead of never (a library that hangs in process has
    /// none, and its thread stays where it is).
    fn sever_job(&self) -> bool {
        let tid = self.job_thread.load(Ordering::Acquire);
        tid > 0 && cut_blocked_socket(tid, self.server.as_deref()).is_some()
    }

    /// [`Self::start_bounded`], where a job given up earlier has not
    /// returned yet: it is given up to [`GIVEN_UP_JOB_RETURN`] to return,
    /// its socket cut again at each look -- a job blocked on its socket
    /// returns within milliseconds of the cut, and without the wait the
    /// attempt that cut it found the library busy and the member waited
    /// for the next (a second with no member serving in the long chaos
    /// run).
    pub fn start_bounded_after_cut<T: Send + 'static>(
        self: &Arc<Self>,
        job: impl FnOnce(&MemberLibrary) -> T + Send + 'static,
    ) -> Option<Bounded<T>> {
        let given_up = self.job_running() && self.job_given_up.load(Ordering::Acquire);
        // In process, nothing cuts a job: it returns when it returns.
        if given_up && self.networked {
            // Cut at each look: a cut finds no socket while the job is
            // between calls, and the job may go on to read another (traced
            // in the long chaos run: a job cut once read on, a handshake).
            let until = crate::clock::now() + GIVEN_UP_JOB_RETURN;
            while self.job_running() && crate::clock::now() < until {
                self.sever_job();
                crate::clock::sleep(GIVEN_UP_JOB_POLL);
            }
        }
        self.start_bounded(job)
    }

    /// Starts asking a fresh instance of p11-kit's client -- initialised
    /// now, on a connection of its own -- whether it passes `check`;
    /// `None` for other libraries, and while the last such instance has
    /// not returned. One that passes is left initialised, for the library
    /// to take over if it reconnects soon ([`Self::reinitialize`]); one
    /// that does not is finalised again, as is one left from before.
    /// p11-kit's server loads the token for each connection before it
    /// answers its first byte (its source: `p11_kit_remote_serve_tokens`
    /// initialises the module, then serves; read, not timed here), so a
    /// fresh instance that answers says the server and the path to it are
    /// well now: a connection of the library's that answers nothing
    /// meanwhile is dead (a relay or balancer took it while the path
    /// dropped everything, and drops it still).
    pub fn fresh_instance(&self, check: &FreshCheck) -> Option<Bounded<bool>> {
        let probe = self.spares.probe.as_ref()?;
        let check = Arc::clone(check);
        probe.start_bounded(move |instance: &MemberLibrary| {
            instance.finalize();
            let answers = instance.initialize_with(&[]).is_ok() && check(instance);
            if !answers {
                instance.finalize();
            }
            answers
        })
    }

    /// The current connection's number (see [`on_connection`]).
    pub fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    /// Whether we initialised the library (and may therefore finalise and
    /// initialise it again to reconnect it).
    pub fn initialized_by_us(&self) -> bool {
        *self.initialized_by_us.lock()
    }

    /// Reconnects a library whose connection is gone: a remote client
    /// never reconnects by itself, but `C_Finalize` + `C_Initialize` does.
    /// Runs on the recovery thread, so the environment is left alone: a
    /// p11-kit client read its server's address when its function list
    /// was obtained and reconnects to it without.
    ///
    /// Not while a call is inside an in-process library: no socket cut
    /// brings it back, and finalising a library under a call frees state
    /// that call uses; `CKR_DEVICE_ERROR`, the member staying down until
    /// a later attempt finds the library empty.
    ///
    /// The calls on the old connection's wire are cut off first: their
    /// requests went out on a connection that answered nothing, and a
    /// path that held them (a black-holed relay) delivers them when it
    /// answers again, so an object such a call was making is in doubt for
    /// as long as after any cut (`Doubt::CutOff`). Taken for a mere fault,
    /// its short wait (at most `memberTimeout`) can end first: the likely
    /// course of a soak run's EC public key held twice by a member whose
    /// connection, black-holed for 2.2 s, was replaced, and which served
    /// 112 ms later with an object in doubt after a fault.
    ///
    /// Where its probe told the library's own connection dead within the
    /// last [`TAKE_OVER_WITHIN`] (a hedge, [`Bounded::finish_hedged`]),
    /// having found the server well on a connection of its own, the
    /// library takes over that connection instead of making another:
    /// p11-kit's server loads the whole token for each connection before
    /// it answers (0.6-1.4 s for the long chaos run's tokens under load),
    /// and a dead connection's reconnect so loaded it twice, the member out
    /// all the while (4.3 s in all in that run).
    pub fn reinitialize(&self) -> Result<()> {
        if !self.networked && self.calls_inside() != 0 {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        if self.networked {
            self.cut_calls(|_| true);
        }
        if self.take_over_probe() {
            return Ok(());
        }
        {
            let _reconnecting = self.exclusive();
            self.finalize_with_spares();
        }
        // Finalising waits on a dead connection until its probe tells it
        // dead and the wait is cut: the probe's connection, found well
        // meanwhile, is taken over then. Released instead (`finalize`), it
        // was gone when the reconnect that follows came to take it over,
        // and that one loaded the token on a connection of its own: 3 of
        // the 4 dead connections of one long chaos run, 0.06-0.8 s each,
        // growing with the token.
        if self.take_over_probe() {
            return Ok(());
        }
        self.release_probe();
        self.initialize_with(&[])
    }

    /// Finalises this instance and takes over its probe's function table,
    /// initialised on the connection that told this one's dead within the
    /// last [`TAKE_OVER_WITHIN`], handing the probe the finalised one; false
    /// (nothing changed) where the probe told no such thing. Under
    /// both instances' reconnect locks: no call is inside either, and each
    /// call picks its entry again under its instance's lock
    /// ([`Self::call`]).
    fn take_over_probe(&self) -> bool {
        let Some(probe) = &self.spares.probe else {
            return false;
        };
        let told = self.spares.told_dead_at.lock().take();
        if told.is_none_or(|at| crate::clock::since(at) >= TAKE_OVER_WITHIN) || probe.job_running()
        {
            return false;
        }
        let _own = self.exclusive();
        let _probes = probe.exclusive();
        if self.retired.load(Ordering::Acquire) || !probe.usable.load(Ordering::Acquire) {
            return false;
        }
        self.finalize_with_spares();
        let taken = probe
            .table
            .swap(self.table.load(Ordering::Acquire), Ordering::AcqRel);
        self.table.store(taken, Ordering::Release);
        *probe.initialized_by_us.lock() = false;
        probe.usable.store(false, Ordering::Release);
        self.connection.fetch_add(1, Ordering::AcqRel);
        *self.initialized_by_us.lock() = true;
        self.usable.store(true, Ordering::Release);
        true
    }

    /// Shuts down the library's connection, so that calls stuck on a
    /// stalled server return with an error instead of never: the socket
    /// each call on the wire of each instance waits on, if it is that
    /// instance's ([`cut_blocked_socket`]; none for a call that is not
    /// waiting on a socket: it is running, and returns by itself). Each of
    /// those calls knows it was cut off. The number of sockets shut down.
    ///
    /// A spare with a call on the wire is marked stale: its connection is
    /// shut down (or left owing an answer), and recovery, finding the token
    /// on a first instance that outlived the stall, does not reconnect the
    /// library. It kept its session there, and its next call -- seconds
    /// later, on a member back in service -- failed and took the member
    /// out again (the soak: the last serving member, so that none served).
    pub fn sever(&self) -> usize {
        let spares = self.spares.instances.iter().map(|spare| {
            let (calls, sockets) = spare.library.cut_calls_counted(|_| true);
            if calls > 0 {
                spare.stale.store(true, Ordering::Release);
            }
            sockets
        });
        self.cut_calls(|_| true) + spares.sum::<usize>()
    }

    /// Cuts off the calls on this instance's wire that `which` picks, and
    /// shuts down the sockets they are blocked on; how many. The wire stays
    /// locked until then: a call that returns meanwhile waits to leave it,
    /// so its thread cannot be read blocked on another member's socket.
    fn cut_calls(&self, which: impl Fn(&OnWire) -> bool) -> usize {
        self.cut_calls_counted(which).1
    }

    /// [`Self::cut_calls`], and how many calls it cut off first.
    fn cut_calls_counted(&self, which: impl Fn(&OnWire) -> bool) -> (usize, usize) {
        let mut calls = self.wire.lock();
        let mut cut = 0;
        let mut sockets: Vec<u64> = calls
            .iter_mut()
            .filter(|call| which(call))
            .filter_map(|call| {
                cut += 1;
                call.cut_off.get_or_insert_with(crate::clock::now);
                cut_blocked_socket(call.thread, self.server.as_deref())
            })
            .collect();
        drop(calls);
        sockets.sort_unstable();
        sockets.dedup();
        (cut, sockets.len())
    }

    /// The library's current slots with a token present.
    pub fn token_slots(&self) -> Result<Vec<CK_SLOT_ID>> {
        self.slot_list(CK_TRUE)
    }

    /// The library's current slots, with or without a token.
    pub fn slot_list(&self, token_present: CK_BBOOL) -> Result<Vec<CK_SLOT_ID>> {
        read_list(|list, count| member_call!(self, C_GetSlotList(token_present, list, count)))
    }

    /// The token info of `slot`; a SoftHSM token's slot is noted for
    /// [`Self::call_writing`].
    pub fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        // SAFETY: CK_TOKEN_INFO is plain data; all-zero is a valid value.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        check(member_call!(self, C_GetTokenInfo(slot, &mut info)))?;
        if info.manufacturerID.starts_with(SOFTHSM_MANUFACTURER) {
            let mut slots = self.softhsm_slots.lock();
            if !slots.contains(&slot) {
                slots.push(slot);
            }
        }
        Ok(info)
    }

    /// Runs `call`, a `write` that makes or destroys objects on `session`,
    /// as [`Self::call`] does; `call` answers with the object it made, if
    /// any, kept as the slot's probe after a [`Write::Token`]. On a SoftHSM
    /// token, SoftHSM is
    /// made to read the token's object list again, in the same call, before
    /// a [`Write::Token`] (a [`Write::Destroy`] has SoftHSM do so itself,
    /// and a [`Write::Session`] leaves the list alone).
    ///
    /// Why: SoftHSM keeps, in each process, the count of changes to a
    /// token's object list it has read (the token's `generation` file),
    /// and reads the list again when the count on disk differs -- but a
    /// process making or destroying an object writes the next count and
    /// takes it as read without reading the list (`Generation::commit`).
    /// An object another process made just before (another member
    /// connection's server process, a request finished after it was cut
    /// off, another application) then stays out of this one's view -- its
    /// searches miss it, and the group made it a second time -- until some
    /// other process changes the list again. Reading an attribute of a
    /// token object of this instance (the slot's [`IndexProbe`]: one it
    /// made, or the domain key the group found through it) has SoftHSM
    /// read the list first (`ObjectFile::refresh` re-indexes the token)
    /// without reading `token.object`: SoftHSM 2.6.1 writes that file
    /// after unlocking it, and a process that reads it empty marks the
    /// token lost for good (asked for the token info before each write
    /// instead, soak runs met such processes within a minute). A
    /// connection with neither (a spare's first replay import) writes
    /// unprobed: the one other way to have the list read, a search, reads
    /// every object's files, and on the long chaos run's tokens (8,700
    /// objects, under load) took the spare's first import past
    /// `memberTimeout`, taking healthy members out 1-4 times a run.
    ///
    /// A write answering `CKR_GENERAL_ERROR` on a token whose info then
    /// answers `CKR_GENERAL_ERROR` too answers `CKR_DEVICE_ERROR`: the
    /// process has lost sight of the token for good (it re-listed the
    /// token while `token.object` could not be read, `OSToken::index`) and
    /// refuses every write, so the member's connection is unusable, not
    /// the request wrong; the member is taken out and recovery connects it
    /// afresh (a new process) rather than leave it serving a frozen list
    /// with every write refused ([`last_write_lost_sight`]).
    pub fn call_writing<F: Copy>(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        write: Write,
        select: impl Fn(&CK_FUNCTION_LIST) -> Option<F>,
        call: impl FnOnce(F) -> (CK_RV, Option<CK_OBJECT_HANDLE>),
    ) -> CK_RV {
        if self.softhsm_slots.lock().is_empty() {
            return self.call(function, select, |f| call(f).0);
        }
        self.call(
            function,
            |table| {
                let reads = (
                    table.C_GetSessionInfo,
                    table.C_GetAttributeValue,
                    table.C_GetTokenInfo,
                );
                select(table).map(|f| (reads, f))
            },
            |((session_info, attribute_value, token_info), f)| {
                let softhsm_slot = || {
                    self.sole_probed_slot().or_else(|| {
                        let asked = session_info.and_then(|info| {
                            let slot = session_slot(info, session);
                            self.round_trips.answered(crate::clock::now());
                            slot
                        });
                        asked.filter(|slot| self.softhsm_slots.lock().contains(slot))
                    })
                };
                let mut slot = None;
                if write == Write::Token {
                    slot = softhsm_slot();
                    if let (Some(slot), Some(read)) = (slot, attribute_value) {
                        self.read_list_again(slot, session, read);
                    }
                }
                let (rv, made) = call(f);
                let lost_sight = rv == CKR_GENERAL_ERROR
                    && token_info.is_some_and(|info| {
                        slot.or_else(softhsm_slot)
                            .is_some_and(|s| token_lost(info, s))
                    });
                note_lost_sight(lost_sight);
                if lost_sight {
                    return CKR_DEVICE_ERROR;
                }
                if let (CKR_OK, Some(made), Some(slot)) = (rv, made, slot) {
                    self.keep_probe(slot, made);
                }
                rv
            },
        )
    }

    /// The library's one SoftHSM slot, where this instance has a probe
    /// there on its connection: a write is then taken to be on it without
    /// asking the session's slot (a round trip on a network client). A
    /// write on another token of the library reads that probe for nothing,
    /// and keeps no probe (the slot has one).
    fn sole_probed_slot(&self) -> Option<CK_SLOT_ID> {
        let slots = self.softhsm_slots.lock();
        let [slot] = slots[..] else {
            return None;
        };
        let connection = self.connection();
        (self.index_probes.lock().iter())
            .any(|p| p.slot == slot && p.connection == connection)
            .then_some(slot)
    }

    /// Reads an attribute of the slot's probe object on `session`, so
    /// that SoftHSM reads the token's object list again, where this
    /// connection has a probe there; forgets a probe that is gone.
    fn read_list_again(
        &self,
        slot: CK_SLOT_ID,
        session: CK_SESSION_HANDLE,
        read: unsafe extern "C" fn(
            CK_SESSION_HANDLE,
            CK_OBJECT_HANDLE,
            CK_ATTRIBUTE_PTR,
            CK_ULONG,
        ) -> CK_RV,
    ) {
        let connection = self.connection();
        let probe = (self.index_probes.lock().iter())
            .find(|p| p.slot == slot && p.connection == connection)
            .map(|p| p.object);
        let Some(object) = probe else {
            return;
        };
        let mut class: CK_OBJECT_CLASS = 0;
        let mut attribute = CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: (&mut class as *mut CK_OBJECT_CLASS).cast(),
            ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
        };
        // SAFETY: the library's own function; one attribute with room for
        // the value it names.
        let rv = unsafe { read(session, object, &mut attribute, 1) };
        // An answer on the connection, as any call's: the write after it
        // is one round trip more in the same call on the wire, and under
        // a slow path (300 ms each way) the two together passed for a
        // silent connection and were cut ([`Self::silent_call`]).
        self.round_trips.answered(crate::clock::now());
        if rv == CKR_OBJECT_HANDLE_INVALID {
            (self.index_probes.lock()).retain(|p| p.slot != slot || p.object != object);
        }
    }

    /// Keeps `object`, a token object of a SoftHSM `slot` just found
    /// through this instance (the group's domain key, looked up at each
    /// login and return), as the slot's probe where it has none on this
    /// connection: the connection's first token write then reads it too.
    /// Without, that write took the token's new count as read, and an
    /// object another process had made just before stayed out of this
    /// connection's view (`tests/p11kit_member.rs`: found 0 times of 1).
    pub fn offer_index_probe(&self, slot: CK_SLOT_ID, object: CK_OBJECT_HANDLE) {
        if self.softhsm_slots.lock().contains(&slot) {
            self.keep_probe(slot, object);
        }
    }

    /// Keeps `object`, a token object just made on `slot`, as the slot's
    /// probe where it has none on this connection.
    fn keep_probe(&self, slot: CK_SLOT_ID, object: CK_OBJECT_HANDLE) {
        let connection = self.connection();
        let mut probes = self.index_probes.lock();
        probes.retain(|p| p.slot != slot || p.connection == connection);
        if !probes.iter().any(|p| p.slot == slot) {
            probes.push(IndexProbe {
                slot,
                connection,
                object,
            });
        }
    }

    pub fn slot_info(&self, slot: CK_SLOT_ID) -> Result<CK_SLOT_INFO> {
        // SAFETY: CK_SLOT_INFO is plain data; all-zero is a valid value.
        let mut info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
        check(member_call!(self, C_GetSlotInfo(slot, &mut info)))?;
        Ok(info)
    }

    pub fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        read_list(|list, count| member_call!(self, C_GetMechanismList(slot, list, count)))
    }

    pub fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        let mut info = CK_MECHANISM_INFO {
            ulMinKeySize: 0,
            ulMaxKeySize: 0,
            flags: 0,
        };
        check(member_call!(
            self,
            C_GetMechanismInfo(slot, mechanism, &mut info)
        ))?;
        Ok(info)
    }
}

/// Initialises each of `libraries` in a thread of its own and then runs
/// `then` on each that initialised, waiting for each at most `timeout` from
/// its start. They start one after another while each answers within a
/// head start (a tenth of `timeout`, between 20 ms and 0.5 s), and at once
/// past that: a library that does not answer delays the next by that head
/// start only, while libraries that answer are never initialised at the
/// same time (SoftHSM, which several entries may reach, can crash when
/// initialised from several threads at once). Runs with the variables the
/// libraries' environments agree on set ([`with_common_environment`]);
/// callers hold the provider's lifecycle lock, or are the CLI. Without
/// `threads` (the application forbade them), each is initialised in this
/// thread, one after another, with no deadline.
pub fn initialize_each<T: Send + 'static>(
    libraries: &[Arc<MemberLibrary>],
    timeout: std::time::Duration,
    threads: bool,
    then: impl Fn(&MemberLibrary) -> T + Send + Sync + 'static,
) -> Vec<std::result::Result<Result<T>, Silent>> {
    if !threads {
        return libraries
            .iter()
            .map(|library| {
                Ok(library
                    .initialize()
                    .map(|()| with_sigpipe_blocked(|| then(library))))
            })
            .collect();
    }
    let head_start = (timeout / 10).clamp(
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(500),
    );
    let then = Arc::new(then);
    with_common_environment(libraries, || {
        let mut jobs = Vec::with_capacity(libraries.len());
        for library in libraries {
            let then = Arc::clone(&then);
            let started = crate::clock::now();
            let job = library.start_bounded(move |library| {
                library.initialize_in_this_environment()?;
                Ok(then(library))
            });
            if let Some(job) = &job {
                job.wait_until(started + head_start);
            }
            jobs.push((job, started + timeout));
        }
        // The environment stays until every library has answered or its
        // deadline passed: a library reads it during its C_Initialize.
        jobs.into_iter()
            .map(|(job, deadline)| job.ok_or(Silent)?.finish(deadline, timeout))
            .collect()
    })
}

/// A job started by [`MemberLibrary::start_bounded`].
pub struct Bounded<T> {
    library: Arc<MemberLibrary>,
    answered: mpsc::Receiver<T>,
    answer: Cell<Option<T>>,
    /// The library's count of calls sent when the job started: a job whose
    /// calls keep being answered is slow, not silent.
    calls_sent: u64,
}

/// A library that did not answer by its deadline.
#[derive(Debug)]
pub struct Silent;

/// Why a job hedged with a fresh instance ([`Bounded::finish_hedged`]) has
/// no result.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The library did not answer by the deadline ([`Silent`]).
    Silent,
    /// The job's connection answered nothing while a fresh instance of the
    /// library, on a connection of its own made later, answered.
    DeadConnection,
}

/// What a fresh instance is asked ([`MemberLibrary::fresh_instance`]).
pub type FreshCheck = Arc<dyn Fn(&MemberLibrary) -> bool + Send + Sync>;

impl<T> Bounded<T> {
    /// Waits for the job's result until `deadline` at most, keeping it for
    /// [`Self::finish`].
    pub fn wait_until(&self, deadline: Instant) {
        loop {
            let left = crate::clock::block_for(deadline);
            match self.answered.recv_timeout(left) {
                Ok(result) => return self.answer.set(Some(result)),
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => return,
            }
        }
    }

    /// The job's result, or [`Silent`] if it has none by `deadline` and
    /// the library has answered none of its calls for `patience` (a
    /// networked library's calls are counted; one answering each call in
    /// time is slow, not silent, and is waited for). Then the socket the
    /// job's thread waits on, if any, is shut down so that it returns soon,
    /// and it is left to finish on its own.
    pub fn finish(
        self,
        deadline: Instant,
        patience: std::time::Duration,
    ) -> std::result::Result<T, Silent> {
        self.finish_hedged(deadline, patience, None)
            .map_err(|_| Silent)
    }

    /// [`Self::finish`], asking meanwhile, after `hedge`'s first wait and
    /// then after twice as long each time, whether a fresh instance of the
    /// library answers ([`MemberLibrary::fresh_instance`]), each asked for
    /// one such wait at most. If one does while the job's own connection
    /// has answered nothing, that connection is dead -- a slow server
    /// would keep the fresh one waiting too -- and the job is given up at
    /// once ([`Unanswered::DeadConnection`]).
    pub fn finish_hedged(
        self,
        deadline: Instant,
        patience: std::time::Duration,
        hedge: Option<(Duration, &FreshCheck)>,
    ) -> std::result::Result<T, Unanswered> {
        // The fresh instance asked now, the job's calls sent when it was
        // asked, and until when it may answer.
        let mut probe: Option<(Bounded<bool>, u64, Instant)> = None;
        let outcome = self.wait_hedged(deadline, patience, hedge, &mut probe);
        // One still asking when the job ends is cut off too: never given
        // up, a probe stuck on a dead path would keep the instance busy,
        // and every later hedge of the library would find none to ask.
        if let Some((fresh, _, _)) = &probe {
            fresh.give_up();
        }
        // Kept only for the reconnect that follows a dead connection at
        // once ([`MemberLibrary::reinitialize`]).
        if !matches!(outcome, Err(Unanswered::DeadConnection)) {
            self.library.release_probe();
        }
        outcome
    }

    /// The loop of [`Self::finish_hedged`], with the fresh instance it is
    /// asking in `probe`.
    fn wait_hedged(
        &self,
        deadline: Instant,
        patience: std::time::Duration,
        hedge: Option<(Duration, &FreshCheck)>,
        probe: &mut Option<(Bounded<bool>, u64, Instant)>,
    ) -> std::result::Result<T, Unanswered> {
        let (mut deadline, mut seen) = (deadline, self.calls_sent);
        let mut gap = hedge.map(|(first, _)| first);
        let mut probe_at = gap.map(|gap| crate::clock::now() + gap);
        loop {
            if let Some(result) = self.answer.take() {
                return Ok(result);
            }
            let now = crate::clock::now();
            if let (Some(at), Some(wait), Some((_, check))) = (probe_at, gap, hedge) {
                if probe.is_none() && now >= at {
                    let sent = self.library.calls_sent.load(Ordering::Relaxed);
                    *probe = self
                        .library
                        .fresh_instance(check)
                        .map(|fresh| (fresh, sent, now + wait));
                    gap = Some(wait * 2);
                    probe_at = Some(now + wait * 2);
                }
            }
            if let Some((fresh, sent, until)) = probe.as_ref() {
                fresh.wait_until(now);
                match fresh.answer.take() {
                    Some(true) if self.library.calls_sent.load(Ordering::Relaxed) == *sent => {
                        *probe = None;
                        // Told before the job is cut: a job that was
                        // reconnecting goes on at once, and takes the
                        // probe's connection over only if told.
                        *self.library.spares.told_dead_at.lock() = Some(now);
                        self.give_up();
                        return Err(Unanswered::DeadConnection);
                    }
                    Some(_) => *probe = None,
                    None if now >= *until => {
                        fresh.give_up();
                        *probe = None;
                    }
                    None => {}
                }
            }
            let mut wake = probe_at.map_or(deadline, |at| at.min(deadline));
            if probe.is_some() {
                wake = wake.min(now + FRESH_INSTANCE_POLL);
            }
            self.wait_until(wake);
            if let Some(result) = self.answer.take() {
                return Ok(result);
            }
            if crate::clock::now() < deadline {
                continue;
            }
            let sent = self.library.calls_sent.load(Ordering::Relaxed);
            if sent == seen {
                self.give_up();
                return Err(Unanswered::Silent);
            }
            (deadline, seen) = (crate::clock::now() + patience, sent);
        }
    }

    /// Leaves the job to finish on its own, its socket shut down.
    fn give_up(&self) {
        self.library.job_given_up.store(true, Ordering::Release);
        self.library.sever_job();
    }
}

/// This thread's id (never cached: a child after `fork` has new ones).
fn this_thread() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The socket a thread of this process is blocked on, from the system call
/// it is in (`/proc/self/task/TID/syscall`: its number, then its arguments
/// in hex): the descriptor of a read, write, send, receive or connect, or
/// of a `poll` on one descriptor.
fn blocked_socket(tid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    let mut fields = text.split_whitespace();
    let number: libc::c_long = fields.next()?.parse().ok()?;
    let mut argument = || u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok();
    let first = argument()?;
    let fd = match number {
        libc::SYS_read
        | libc::SYS_readv
        | libc::SYS_recvfrom
        | libc::SYS_recvmsg
        | libc::SYS_write
        | libc::SYS_writev
        | libc::SYS_sendto
        | libc::SYS_sendmsg
        | libc::SYS_connect => first as i32,
        number if is_poll(number) && argument()? == 1 => polled_descriptor(first)?,
        _ => return None,
    };
    socket_inode(fd).map(|_| fd)
}

/// Shuts down the socket thread `tid` is blocked on if it is the
/// library's own -- connected to `server`, where that is known -- and
/// returns its inode. The number read from `/proc` is a number only: the
/// socket is copied first and checked as the copy, and the thread must
/// still be blocked on that number after the copy was made, so that what
/// is shut down is what was checked, whoever closes or reuses the number
/// meanwhile. A socket connected elsewhere is another member's (or the
/// application's) and is left alone.
fn cut_blocked_socket(tid: i32, server: Option<&Path>) -> Option<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = blocked_socket(tid)?;
    // SAFETY: duplicating a descriptor number has no preconditions; an
    // unused number is an error.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return None;
    }
    // SAFETY: `copy` was just made here and nothing else owns it.
    let copy = unsafe { OwnedFd::from_raw_fd(copy) };
    let inode = socket_inode(copy.as_raw_fd())?;
    let still_blocked = blocked_socket(tid) == Some(fd);
    let connected_there = server.is_none_or(|server| {
        peer_path(copy.as_raw_fd()).is_some_and(|peer| same_path(&peer, server))
    });
    // SAFETY: shutdown on a socket this function holds a descriptor of; it
    // neither closes nor frees anything.
    (still_blocked
        && connected_there
        && unsafe { libc::shutdown(copy.as_raw_fd(), libc::SHUT_RDWR) } == 0)
        .then_some(inode)
}

/// Whether two paths name one file: the same text, or the same file
/// (a link, a relative path) now.
fn same_path(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    a == b
        || matches!(
            (std::fs::metadata(a), std::fs::metadata(b)),
            (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino())
        )
}

/// The path of the unix socket `fd` is connected to (`None` for another
/// kind of socket, an unnamed or abstract peer, or an error).
fn peer_path(fd: i32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; getpeername writes at most `len`
    // bytes into it.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: as above, with a live address and length.
    let rv =
        unsafe { libc::getpeername(fd, &mut address as *mut _ as *mut libc::sockaddr, &mut len) };
    if rv != 0 || address.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path: Vec<u8> = address
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    (!path.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&path)))
}

/// The socket path p11-kit's client connects to, as it finds it when its
/// function list is obtained (each variable from `environment`, else from
/// the process; an empty one is unset): `P11_KIT_SERVER_ADDRESS` when it
/// is `unix:path=` (percent-encoded), else `$XDG_RUNTIME_DIR/p11-kit/pkcs11`.
/// `None` for any other address or default: then any socket the
/// instance's thread is blocked on is taken for its own.
fn p11_kit_server_path(environment: &[(String, String)]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let variable = |name: &str| {
        environment
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
            .filter(|v| !v.is_empty())
    };
    let Some(address) = variable("P11_KIT_SERVER_ADDRESS") else {
        return variable("XDG_RUNTIME_DIR")
            .map(|directory| Path::new(&directory).join("p11-kit").join("pkcs11"));
    };
    let encoded = address.strip_prefix("unix:path=")?.as_bytes();
    let mut path = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let escaped = (encoded[i] == b'%')
            .then(|| encoded.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                path.push(byte);
                i += 3;
            }
            None => {
                path.push(encoded[i]);
                i += 1;
            }
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(path)))
}

/// Whether a system call number is `poll` or `ppoll` (`poll` exists only
/// on some architectures).
fn is_poll(number: libc::c_long) -> bool {
    #[cfg(target_arch = "x86_64")]
    if number == libc::SYS_poll {
        return true;
    }
    number == libc::SYS_ppoll
}

/// The descriptor of the one `pollfd` at `address`, read through
/// `/proc/self/mem` so that an address no longer mapped is an error, not a
/// crash.
fn polled_descriptor(address: u64) -> Option<i32> {
    use std::os::unix::fs::FileExt;
    let memory = std::fs::File::open("/proc/self/mem").ok()?;
    let mut fd = [0u8; 4];
    memory.read_exact_at(&mut fd, address).ok()?;
    Some(i32::from_ne_bytes(fd))
}

/// A token's serial number as text, without the padding blanks.
pub fn padded_to_string(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// Writes `text` into a fixed-width blank-padded PKCS#11 field.
pub fn string_to_padded(text: &str, field: &mut [u8]) {
    field.fill(b' ');
    let bytes = text.as_bytes();
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}

#[cfg(test)]
mod tests;
