//! The library's process-wide state between `C_Initialize` and
//! `C_Finalize`: loaded member libraries, groups, slots and sessions.
//! Owns slot numbering, which never changes while the process runs and is
//! the same on every start with the same config.

use crate::config::{Config, ConfigError, LibraryConfig};
use crate::config_warnings;
use crate::error::{check, Error, Result};
use crate::fork::PerGeneration;
use crate::group::now_ms;
use crate::group::{virtual_serial, Group, GroupSettings, Location};
use crate::halog;
use crate::member::{
    initialize_each, padded_to_string, string_to_padded, Counting, LeftBusy, MemberLibrary, Silent,
};
use crate::member_api::{same_library, MemberApi, MemberBackend};
use crate::published::Publisher;
use crate::reconcile::Reconciler;
use crate::recovery::{self, Workers};
use crate::recovery::{Host, RecoverySettings};
use crate::session::{
    open_member_session, HiddenObjects, PassThroughSession, Session, SessionRef, SessionTable,
    Target, VirtualSession,
};
use crate::slot_ids::{PassThroughSlots, FIRST_PASSTHROUGH_SLOT};
use crate::state_dir::{self, StateDir};
use cryptoki_sys::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

pub struct Provider {
    pub ha_only: bool,
    /// The libraries loaded from `[Libraries]`: they also serve the
    /// pass-through slots.
    pub libraries: Vec<Arc<MemberLibrary>>,
    /// Every member library as the group core and recovery hold them: the
    /// loaded ones, and any given in memory ([`initialize_with_members`]).
    backends: Vec<Arc<dyn MemberBackend>>,
    pub groups: Vec<Arc<Group>>,
    pub sessions: SessionTable,
    /// Held by `C_Logout` for its whole run.
    logouts: Mutex<()>,
    passthrough_slots: PassThroughSlots,
    pub recovery: RecoverySettings,
    /// How long a member may hold calls without completing any.
    pub member_timeout: Duration,
    /// `earlyHangDetection` ([`recovery::Host::early_hang_detection`]).
    early_hang_detection: bool,
    /// False when the application set `CKF_LIBRARY_CANT_CREATE_OS_THREADS`:
    /// then no call into a member runs in a thread of ours, nor has a
    /// deadline.
    pub threads_allowed: bool,
    /// Groups (by index in `groups`) whose returning members are compared
    /// with the group and given what they lack.
    synchronized: Vec<bool>,
    workers: Mutex<Option<Workers>>,
    /// Compares the members of every group across processes
    /// (`reconcile.rs`); none without threads or a state directory.
    reconciler: Mutex<Option<Reconciler>>,
    /// Writes this process's member counters for `pkcs11-ha status`.
    publisher: Mutex<Option<Publisher>>,
    /// The domain keys hidden in each library reached through a
    /// pass-through slot, by library (address), found once.
    hidden: Mutex<HashMap<usize, Arc<HiddenObjects>>>,
    /// Labels of the groups' domain keys (the default one when no group
    /// names its own).
    domain_labels: Vec<String>,
    /// Without threads (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`), recovery
    /// runs during calls, at most once per interval: when it is next due.
    inline_recovery_due_ms: Option<AtomicU64>,
}

/// What a slot ID names.
pub enum Slot {
    Virtual(Arc<Group>),
    PassThrough(Arc<MemberLibrary>, CK_SLOT_ID),
}

/// What `C_Initialize` and `C_Finalize` look after, per fork generation: a
/// child after `fork` starts with its own (see [`crate::fork`]). The
/// standard library's futex-based locks, which keep no process-wide table
/// of waiters that a child could inherit.
#[derive(Default)]
struct Lifecycle {
    /// Serialises `C_Initialize` and `C_Finalize` against each other.
    serialised: std::sync::Mutex<()>,
    provider: std::sync::RwLock<Option<Arc<Provider>>>,
    /// Libraries stay loaded for the life of the generation: unloading and
    /// reloading a module between `C_Finalize` and `C_Initialize` gains
    /// nothing and some modules do not survive it. Each is kept with the
    /// `[Libraries]` entry it was loaded for, and serves only that entry
    /// again: the generation outlives the application's `dlclose` (see
    /// `stay_loaded`), and a configuration read later may give the same
    /// library another environment -- p11-kit's client another server --
    /// or other limits.
    loaded: std::sync::Mutex<Vec<(LibraryConfig, Arc<MemberLibrary>)>>,
}

static LIFECYCLE: PerGeneration<Lifecycle> = PerGeneration::new(Lifecycle::default);

impl Lifecycle {
    fn serialise(&self) -> std::sync::MutexGuard<'_, ()> {
        self.serialised
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn provider(&self) -> std::sync::RwLockReadGuard<'_, Option<Arc<Provider>>> {
        self.provider.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn provider_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Provider>>> {
        self.provider
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why calls must not take the session cache's shortcut, as bits: one
/// word, so that the shortcut costs every call one test.
static NO_SHORTCUT: AtomicU8 = AtomicU8::new(0);
/// Set in a child after `fork`, until it calls `C_Initialize`: a session
/// this thread cached is the parent's.
const FORKED: u8 = 1;
/// Recovery runs during calls, which then all go through [`with`].
const INLINE_RECOVERY: u8 = 2;

extern "C" fn after_fork_in_child() {
    crate::fork::new_generation();
    NO_SHORTCUT.fetch_or(FORKED, Ordering::Relaxed);
}

/// The initialised provider, or `CKR_CRYPTOKI_NOT_INITIALIZED`.
pub fn get() -> Result<Arc<Provider>> {
    // A child after `fork` sees a generation of its own, without a
    // provider until it calls `C_Initialize`, as the specification requires.
    let provider = LIFECYCLE
        .get()
        .provider()
        .as_ref()
        .map(Arc::clone)
        .ok_or(Error::new(CKR_CRYPTOKI_NOT_INITIALIZED))?;
    if provider.inline_recovery_due_ms.is_some() {
        run_inline_recovery_if_due(&provider);
    }
    Ok(provider)
}

/// The session named by `handle`: from this thread's cache when it is the
/// session the thread used last (unless recovery must run during calls).
#[inline(always)]
pub fn session(handle: CK_SESSION_HANDLE) -> Result<SessionRef> {
    if NO_SHORTCUT.load(Ordering::Relaxed) == 0 {
        if let Some(session) = SessionRef::cached(handle) {
            return Ok(session);
        }
    }
    session_from_table(handle)
}

/// Runs `f` on the session named by `handle` if this thread's cache holds
/// it (and calls may take the shortcut), without counting a call in on
/// its gate ([`crate::session::with_cached`]); `None` otherwise.
#[inline(always)]
pub fn with_cached_session<R>(
    handle: CK_SESSION_HANDLE,
    f: impl FnOnce(&Session) -> R,
) -> Option<R> {
    if NO_SHORTCUT.load(Ordering::Relaxed) != 0 {
        return None;
    }
    crate::session::with_cached(handle, f)
}

/// [`session`] when the thread's cache cannot answer (or must not: see
/// [`NO_SHORTCUT`]), out of line, so that the cached path inlined into
/// every entry point stays short.
#[cold]
#[inline(never)]
fn session_from_table(handle: CK_SESSION_HANDLE) -> Result<SessionRef> {
    let removals = crate::session::removals();
    with(|p| p.session(handle)).and_then(|s| SessionRef::new(s, removals))
}

/// Runs `f` on the initialised provider: the path of every call that needs
/// the provider, and of session lookups the thread's cache cannot answer.
/// `f` runs on a reference of its own, the lifecycle lock released: a
/// call that hangs in a member (a `C_Login`, a `C_GetTokenInfo`) must not
/// hold `C_Finalize` off the lock for ever. `C_Finalize` waits for the
/// calls inside each member library instead, for `memberTimeout` at most
/// ([`MemberLibrary::finalize_for_application`]).
pub fn with<T>(f: impl FnOnce(&Arc<Provider>) -> Result<T>) -> Result<T> {
    f(&get()?)
}

/// Without threads, recovery runs during calls when it is due.
fn run_inline_recovery_if_due(provider: &Provider) {
    if let Some(due) = &provider.inline_recovery_due_ms {
        let now = now_ms();
        let next = now + provider.recovery.interval.as_millis() as u64;
        let current = due.load(Ordering::Relaxed);
        if now >= current
            && due
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            recovery::recover_failed_members(provider);
        }
    }
}

/// Keeps this library mapped after the application's `dlclose`: threads
/// of ours may outlive `C_Finalize` -- a call left inside a hung member
/// ([`MemberLibrary::finalize_for_application`]), a recovery step given
/// up after `memberTimeout` -- and return into our code later, which must
/// still be there.
fn stay_loaded() {
    // SAFETY: `dladdr` reads the loader's tables for an address of this
    // library; `dlopen` with `RTLD_NOLOAD` only takes one more reference
    // to an object already loaded (never released: that is the point).
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(stay_loaded as *const libc::c_void, &mut info) != 0
            && !info.dli_fname.is_null()
        {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
        }
    }
}

/// Initialises the library; `threads_allowed` is false when the
/// application set `CKF_LIBRARY_CANT_CREATE_OS_THREADS`.
pub fn initialize(threads_allowed: bool) -> Result<()> {
    initialize_with_members(threads_allowed, Vec::new())
}

/// [`initialize`] with `members` in place of the `[Libraries]` entries
/// named as they are ([`MemberBackend::name`]): member libraries
/// implemented in memory, as the deterministic simulation's are, which
/// serve the groups and no pass-through slot.
pub fn initialize_with_members(
    threads_allowed: bool,
    members: Vec<Arc<dyn MemberBackend>>,
) -> Result<()> {
    initialize_as(threads_allowed, threads_allowed, members)
}

/// [`initialize_with_members`] as for an application that allows threads,
/// with none started: the caller runs the recovery thread's rounds
/// (the [`recovery::Stepped`] returned) and the watchdog's looks
/// ([`recovery::Watchdog`]) itself, as the deterministic simulation does;
/// no reconciliation thread runs.
pub fn initialize_stepped(members: Vec<Arc<dyn MemberBackend>>) -> Result<recovery::Stepped> {
    initialize_as(true, false, members)?;
    Ok(recovery::Stepped::start(&*get()?))
}

fn initialize_as(
    threads_allowed: bool,
    start_threads: bool,
    members: Vec<Arc<dyn MemberBackend>>,
) -> Result<()> {
    let lifecycle = LIFECYCLE.get();
    let _serialised = lifecycle.serialise();
    if NO_SHORTCUT.fetch_and(!FORKED, Ordering::Relaxed) & FORKED != 0 {
        // The parent's provider, sessions, logins and member libraries
        // belong to the parent's generation, which this one never touches;
        // only this thread's cached session has to be forgotten.
        crate::session::forget_cached_sessions();
    }
    if lifecycle.provider().is_some() {
        return Err(Error::new(CKR_CRYPTOKI_ALREADY_INITIALIZED));
    }
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        stay_loaded();
    });
    let config = Config::load(&Config::locate()).map_err(report_config_error)?;
    if let (true, Some(directory)) = (config.ha_log.enabled, &config.ha_log.path) {
        if let Err(why) = halog::open(directory, config.ha_log.max_len, config.ha_log.repeats) {
            config_warnings::ha_log_unwritable(&config, directory, &why);
        }
    }
    let mut provider =
        Provider::start(&config, threads_allowed, members).map_err(report_config_error)?;
    config_warnings::check_members(&config, &provider.groups, &provider.libraries);
    let recovery_on = config.recovery.attempts != 0;
    if !threads_allowed && recovery_on {
        provider.inline_recovery_due_ms = Some(AtomicU64::new(
            now_ms() + provider.recovery.interval.as_millis() as u64,
        ));
    }
    if provider.inline_recovery_due_ms.is_some() {
        NO_SHORTCUT.fetch_or(INLINE_RECOVERY, Ordering::Relaxed);
    } else {
        NO_SHORTCUT.fetch_and(!INLINE_RECOVERY, Ordering::Relaxed);
    }
    let provider = Arc::new(provider);
    if start_threads {
        let host: Arc<dyn Host> = provider.clone();
        let workers = Workers::start(Arc::downgrade(&host), recovery_on).map_err(|e| {
            eprintln!("pkcs11-ha: cannot start the recovery threads: {e}");
            Error::new(CKR_GENERAL_ERROR)
        })?;
        *provider.workers.lock() = Some(workers);
        for group in &provider.groups {
            group.set_replays_on_request(recovery_on);
            group.set_members_in_threads(true);
        }
        start_reconciler(&config, &provider)?;
        start_publisher(&config, &provider);
    }
    *lifecycle.provider_mut() = Some(provider);
    Ok(())
}

/// Opens the state directory and starts reconciling the groups that ask
/// for it (`[HASynchronize]`); without a usable directory, says so and
/// leaves them to this process's recovery.
fn start_reconciler(config: &Config, provider: &Arc<Provider>) -> Result<()> {
    if !provider.synchronized.iter().any(|on| *on) {
        return Ok(());
    }
    let path = config.state_dir.clone().or_else(state_dir::default_path);
    let state = match path.as_deref().map(StateDir::open) {
        Some(Ok(state)) => Arc::new(state),
        Some(Err(why)) => {
            config_warnings::state_dir_unusable(config, path.as_deref(), &why);
            return Ok(());
        }
        None => {
            config_warnings::state_dir_unusable(config, None, "");
            return Ok(());
        }
    };
    for group in &provider.groups {
        let _ = group.state.set(Arc::clone(&state));
    }
    let interval =
        Some(Duration::from_secs(config.reconcile_interval_secs)).filter(|i| !i.is_zero());
    let host: Arc<dyn recovery::Host> = provider.clone();
    let reconciler = Reconciler::start(Arc::downgrade(&host), state, interval).map_err(|e| {
        eprintln!("pkcs11-ha: cannot start the reconciliation thread: {e}");
        Error::new(CKR_GENERAL_ERROR)
    })?;
    *provider.reconciler.lock() = Some(reconciler);
    Ok(())
}

/// Publishes this process's member counters for `pkcs11-ha status`
/// (`published.rs`) where the state directory is usable; where it is not,
/// the application is not held up for it (the reconciler's warning, or the
/// publisher's own, says so).
fn start_publisher(config: &Config, provider: &Provider) {
    let path = config.state_dir.clone().or_else(state_dir::default_path);
    if let Some(Ok(state)) = path.as_deref().map(StateDir::open) {
        *provider.publisher.lock() = Some(Publisher::start(
            state.path(),
            &config.path,
            provider.groups.clone(),
        ));
    }
}

fn report_config_error(error: ConfigError) -> Error {
    eprintln!("pkcs11-ha: {error}");
    Error::new(CKR_GENERAL_ERROR)
}

pub fn finalize() -> Result<()> {
    let lifecycle = LIFECYCLE.get();
    let _serialised = lifecycle.serialise();
    let provider = get()?;
    // Before anything waits for the calls under way: a call waiting for a
    // member to serve would hold this up for up to memberTimeout.
    for group in &provider.groups {
        group.stop_waiting();
    }
    lifecycle.provider_mut().take();
    for library in &provider.libraries {
        library.retire();
    }
    if let Some(mut reconciler) = provider.reconciler.lock().take() {
        reconciler.stop(provider.member_timeout);
    }
    if let Some(publisher) = provider.publisher.lock().take() {
        publisher.stop();
    }
    let mut workers = provider.workers.lock().take();
    if let Some(w) = workers.as_mut() {
        w.stop_recovery(provider.member_timeout);
    }
    // One wait for the calls inside members to leave, for the sessions'
    // sake and then for the libraries', however many there are: they
    // wait for the same calls.
    let deadline = crate::clock::now() + provider.member_timeout;
    close_session_members_by(
        &provider.sessions.drain(),
        deadline,
        provider.member_timeout,
    );
    for group in &provider.groups {
        group.login.lock().take();
        // Imported key values waiting for members that were down are
        // zeroized now, not when the last reference to the group goes
        // (a thread's session cache may hold one long after).
        group.drop_pending();
    }
    for member in &provider.backends {
        if !provider
            .libraries
            .iter()
            .any(|l| same_library(&**l, &**member))
        {
            member.finalize();
        }
    }
    for library in &provider.libraries {
        let failed = provider.groups.iter().any(|g| {
            g.members.iter().any(|m| {
                !m.reachable()
                    && m.location()
                        .is_some_and(|l| same_library(&*l.library, &**library))
            })
        });
        // A stalled server would hold its calls until the deadline: cut
        // them off now.
        if failed {
            library.sever();
        }
        let finalized = library.finalize_for_application(
            deadline,
            provider.member_timeout,
            provider.threads_allowed,
        );
        if let Err(left) = finalized {
            report_left_initialised(&provider, library, &left);
        }
    }
    if let Some(w) = workers.as_mut() {
        w.stop_watchdog();
    }
    halog::close();
    Ok(())
}

/// Says on stderr and in the HA log (for each member token the library
/// serves) that `C_Finalize` left `library` initialised.
fn report_left_initialised(provider: &Provider, library: &Arc<MemberLibrary>, left: &LeftBusy) {
    let why = match left.calls {
        0 => "its C_Finalize had not returned".to_string(),
        n => format!("{n} call(s) were still inside it"),
    };
    let event = format!(
        "C_Finalize left library {} initialised and loaded: {why} after memberTimeout ({} ms); \
         such a call answers CKR_CRYPTOKI_NOT_INITIALIZED when it returns",
        library.name,
        provider.member_timeout.as_millis()
    );
    eprintln!("pkcs11-ha: {event}");
    for group in &provider.groups {
        for (position, member) in group.members.iter().enumerate() {
            if member
                .location()
                .is_some_and(|l| same_library(&*l.library, &**library))
            {
                group.log(Some(position), &event);
            }
        }
    }
}

fn load_library(entry: &LibraryConfig) -> std::result::Result<Arc<MemberLibrary>, String> {
    let mut loaded = LIFECYCLE
        .get()
        .loaded
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((_, library)) = loaded.iter().find(|(loaded_for, _)| loaded_for == entry) {
        return Ok(Arc::clone(library));
    }
    let library = Arc::new(
        MemberLibrary::load(&entry.name, &entry.path, &entry.environment)?
            .limit_calls(entry.concurrency)
            .with_instances(entry.instances)?,
    );
    loaded.push((entry.clone(), Arc::clone(&library)));
    Ok(library)
}

/// Initialises the libraries, each in a thread of its own, and finds their
/// tokens (serial -> where), each within one `memberTimeout` (see
/// [`initialize_each`]): a library that has not answered by then is left to
/// background recovery with its tokens down, so N silent members cost one
/// `memberTimeout` (and a head start each), not N, and the healthy ones
/// serve at once.
fn find_tokens(
    libraries: &[Arc<MemberLibrary>],
    member_timeout: Duration,
    threads_allowed: bool,
) -> HashMap<String, Location> {
    let answers = initialize_each(libraries, member_timeout, threads_allowed, |library| {
        tokens_of(library)
    });
    let mut found: HashMap<String, Location> = HashMap::new();
    for (library, answer) in libraries.iter().zip(answers) {
        match answer {
            Ok(Ok(tokens)) => {
                for (serial, slot) in tokens {
                    found.entry(serial).or_insert(Location {
                        library: library.clone(),
                        slot,
                    });
                }
            }
            Ok(Err(e)) => eprintln!(
                "pkcs11-ha: library {} ({}) failed C_Initialize with {}; its tokens are down",
                library.name,
                library.path.display(),
                crate::error::rv_name(e.rv)
            ),
            Err(Silent) => eprintln!(
                "pkcs11-ha: library {} ({}) did not answer within memberTimeout ({} ms); \
                 its tokens are down until recovery reaches it",
                library.name,
                library.path.display(),
                member_timeout.as_millis()
            ),
        }
    }
    found
}

/// The serials of a library's tokens and their slots.
fn tokens_of(library: &dyn MemberBackend) -> Vec<(String, CK_SLOT_ID)> {
    library
        .token_slots()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|slot| {
            let info = library.token_info(slot).ok()?;
            Some((padded_to_string(&info.serialNumber), slot))
        })
        .collect()
}

impl Host for Provider {
    fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }

    fn libraries(&self) -> &[Arc<dyn MemberBackend>] {
        &self.backends
    }

    fn recovery(&self) -> &RecoverySettings {
        &self.recovery
    }

    fn member_timeout(&self) -> Duration {
        self.member_timeout
    }

    fn early_hang_detection(&self) -> bool {
        self.early_hang_detection
    }

    fn threads_allowed(&self) -> bool {
        self.threads_allowed
    }

    fn synchronize(&self, group: &Group) -> bool {
        Provider::synchronize(self, group)
    }

    fn reconcile_soon(&self) {
        Provider::reconcile_soon(self)
    }

    fn uses_member_slot(&self, library: &Arc<dyn MemberBackend>, slot: CK_SLOT_ID) -> bool {
        self.hidden
            .lock()
            .contains_key(&(Arc::as_ptr(library).cast::<()>() as usize))
            || self.sessions.snapshot().iter().any(|s| {
                matches!(&s.target, Target::PassThrough(p)
                    if same_library(&*p.library, &**library) && p.slot == slot)
            })
    }

    fn each_virtual_session(
        &self,
        group: &Arc<Group>,
        reopen: &mut dyn FnMut(&VirtualSession) -> Result<()>,
    ) -> Result<()> {
        for s in self.sessions.snapshot() {
            if let Target::Virtual(v) = &s.target {
                if Arc::ptr_eq(&v.group, group) {
                    reopen(v)?;
                }
            }
        }
        Ok(())
    }
}

impl Provider {
    fn start(
        config: &Config,
        threads_allowed: bool,
        in_memory: Vec<Arc<dyn MemberBackend>>,
    ) -> std::result::Result<Provider, ConfigError> {
        let mut libraries = Vec::with_capacity(config.libraries.len());
        let mut backends = Vec::with_capacity(config.libraries.len());
        for entry in &config.libraries {
            if let Some(member) = in_memory.iter().find(|m| m.name() == entry.name) {
                backends.push(Arc::clone(member));
                continue;
            }
            let library = load_library(entry).map_err(|problem| ConfigError {
                file: config.path.clone(),
                section: Some("Libraries".into()),
                key: Some(entry.name.clone()),
                problem: format!("{problem}; check the path, or remove the entry"),
            })?;
            backends.push(Arc::clone(&library) as Arc<dyn MemberBackend>);
            libraries.push(library);
        }
        let member_timeout = Duration::from_millis(config.member_timeout_ms);
        let mut found = find_tokens(&libraries, member_timeout, threads_allowed);
        let mut some_library_unanswered = libraries.iter().any(|l| !l.usable());
        // In memory: nothing to wait for, nothing that can hang.
        for member in backends
            .iter()
            .filter(|b| !libraries.iter().any(|l| same_library(&**l, &***b)))
        {
            if member.initialize().is_err() {
                some_library_unanswered = true;
                continue;
            }
            for (serial, slot) in tokens_of(&**member) {
                found.entry(serial).or_insert(Location {
                    library: Arc::clone(member),
                    slot,
                });
            }
        }
        let groups = config
            .groups
            .iter()
            .map(|g| {
                let serial = virtual_serial(
                    g.serial.as_deref(),
                    &[g.members.clone(), g.standby.clone()].concat(),
                );
                let group = Group::new(
                    g.index,
                    &g.label,
                    serial,
                    CK_SLOT_ID::from(g.index),
                    &g.members,
                    &g.standby,
                    GroupSettings {
                        domain_label: g.domain_label.clone(),
                        replay_limit: config.multipart_replay_limit,
                        min_replicas: g.min_replicas,
                        member_timeout,
                    },
                );
                for member in &group.members {
                    match found.get(&member.serial) {
                        Some(location) => group.attach(member.position, location.clone()),
                        // Where every library answered, the configuration
                        // warnings say the serial is nowhere.
                        None if some_library_unanswered => group.log(
                            Some(member.position),
                            "not found at start (a library failed or did not answer); \
                             recovery looks for it",
                        ),
                        None => {}
                    }
                }
                Arc::new(group)
            })
            .collect();
        Ok(Provider {
            ha_only: config.ha_only,
            libraries,
            backends,
            groups,
            sessions: SessionTable::default(),
            logouts: Mutex::new(()),
            passthrough_slots: PassThroughSlots::default(),
            recovery: RecoverySettings {
                attempts: config.recovery.attempts,
                interval: Duration::from_secs(config.recovery.interval_secs),
                mode: config.recovery.mode,
            },
            member_timeout,
            early_hang_detection: config.early_hang_detection,
            threads_allowed,
            synchronized: config.groups.iter().map(|g| g.synchronize).collect(),
            workers: Mutex::new(None),
            reconciler: Mutex::new(None),
            publisher: Mutex::new(None),
            inline_recovery_due_ms: None,
            hidden: Mutex::new(HashMap::new()),
            domain_labels: domain_labels(config),
        })
    }

    /// Asks for the groups' members to be compared and given what they
    /// lack, in the background, as soon as a pass under way ends.
    pub fn reconcile_soon(&self) {
        if let Some(reconciler) = self.reconciler.lock().as_ref() {
            reconciler.soon();
        }
    }

    /// Whether `[HASynchronize]` asks for this group's returning members to
    /// be given what they lack.
    pub fn synchronize(&self, group: &Group) -> bool {
        self.groups
            .iter()
            .position(|g| std::ptr::eq(g.as_ref(), group))
            .is_some_and(|i| self.synchronized[i])
    }

    pub fn slot(&self, slot_id: CK_SLOT_ID) -> Result<Slot> {
        if slot_id < FIRST_PASSTHROUGH_SLOT {
            return self
                .groups
                .iter()
                .find(|g| g.slot_id == slot_id)
                .map(|g| Slot::Virtual(Arc::clone(g)))
                .ok_or(Error::new(CKR_SLOT_ID_INVALID));
        }
        if self.ha_only {
            return Err(Error::new(CKR_SLOT_ID_INVALID));
        }
        // An ID from another process or an earlier run names a slot this
        // process has not numbered yet: number them all, then look again.
        let (library, member_slot) = match self.passthrough_slots.member(slot_id) {
            Some(member) => member,
            None => {
                self.passthrough_slot_list(false);
                self.passthrough_slots
                    .member(slot_id)
                    .ok_or(Error::new(CKR_SLOT_ID_INVALID))?
            }
        };
        let library = &self.libraries[library];
        // A library that has not answered its initialisation is not called.
        if !library.usable() {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        Ok(Slot::PassThrough(Arc::clone(library), member_slot))
    }

    /// Every library's slots, as pass-through slot IDs.
    fn passthrough_slot_list(&self, token_present: bool) -> Vec<CK_SLOT_ID> {
        let member_slots: Vec<(&str, (usize, CK_SLOT_ID))> = self
            .libraries
            .iter()
            .enumerate()
            .filter(|(_, library)| library.usable())
            .flat_map(|(position, library)| {
                library
                    .slot_list(CK_BBOOL::from(token_present))
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |slot| (library.name.as_str(), (position, slot)))
            })
            .collect();
        // Slots are numbered in the order of all of them, with or without a
        // token, so that colliding slots get the same IDs on every start.
        if token_present && !self.passthrough_slots.all_numbered(&member_slots) {
            self.passthrough_slot_list(false);
        }
        self.passthrough_slots.ids(member_slots)
    }

    /// Every slot: virtual slots first, then each library's slots.
    pub fn slot_list(&self, token_present: bool) -> Vec<CK_SLOT_ID> {
        let mut slots: Vec<CK_SLOT_ID> = self
            .groups
            .iter()
            .filter(|g| !token_present || g.up_members().next().is_some())
            .map(|g| g.slot_id)
            .collect();
        if !self.ha_only {
            slots.extend(self.passthrough_slot_list(token_present));
        }
        slots
    }

    pub fn slot_info(&self, slot_id: CK_SLOT_ID) -> Result<CK_SLOT_INFO> {
        match self.slot(slot_id)? {
            Slot::PassThrough(library, slot) => {
                counted_on(&library, slot, || library.slot_info(slot))
            }
            Slot::Virtual(group) => {
                let mut info = CK_SLOT_INFO {
                    slotDescription: [0; 64],
                    manufacturerID: [0; 32],
                    flags: if group.up_members().next().is_some() {
                        CKF_TOKEN_PRESENT
                    } else {
                        0
                    },
                    hardwareVersion: library_version(),
                    firmwareVersion: library_version(),
                };
                string_to_padded(
                    &format!("pkcs11-ha virtual slot {}", group.label),
                    &mut info.slotDescription,
                );
                string_to_padded("pkcs11-ha", &mut info.manufacturerID);
                Ok(info)
            }
        }
    }

    pub fn token_info(&self, slot_id: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        match self.slot(slot_id)? {
            Slot::PassThrough(library, slot) => {
                counted_on(&library, slot, || library.token_info(slot))
            }
            Slot::Virtual(group) => group.token_info(self.sessions.count(slot_id)),
        }
    }

    pub fn mechanisms(&self, slot_id: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        match self.slot(slot_id)? {
            Slot::PassThrough(library, slot) => {
                counted_on(&library, slot, || library.mechanisms(slot))
            }
            Slot::Virtual(group) => group.mechanisms(),
        }
    }

    pub fn mechanism_info(
        &self,
        slot_id: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        match self.slot(slot_id)? {
            Slot::PassThrough(library, slot) => {
                counted_on(&library, slot, || library.mechanism_info(slot, mechanism))
            }
            Slot::Virtual(group) => group.mechanism_info(mechanism),
        }
    }

    pub fn open_session(&self, slot_id: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(Error::new(CKR_SESSION_PARALLEL_NOT_SUPPORTED));
        }
        let target = match self.slot(slot_id)? {
            Slot::PassThrough(library, slot) => {
                let hidden = self.hidden_on(&library);
                let counts = library.slot_counts(slot);
                let s = {
                    let _counting = Counting::on(&counts);
                    open_member_session(library.clone(), slot, flags, 0)?
                };
                Target::PassThrough(PassThroughSession {
                    library,
                    slot,
                    handle: s.handle,
                    hidden,
                    counts,
                })
            }
            Slot::Virtual(group) => {
                let login = group.login.lock().as_ref().map(|l| l.user_type);
                if login == Some(CKU_SO) && flags & CKF_RW_SESSION == 0 {
                    return Err(Error::new(CKR_SESSION_READ_WRITE_SO_EXISTS));
                }
                Target::Virtual(Box::new(VirtualSession::open(group, flags)?))
            }
        };
        Ok(self.sessions.insert(slot_id, flags, target))
    }

    /// The domain keys a library holds, on any of its tokens: a library
    /// may take an object handle of one token on a session of another
    /// (SoftHSM does). Looked up on sessions of our own that then stay
    /// open, so that the handles stay valid; a library whose tokens cannot
    /// all be searched now is looked up again at its next session.
    fn hidden_on(&self, library: &Arc<MemberLibrary>) -> Arc<HiddenObjects> {
        let key = Arc::as_ptr(library) as usize;
        if let Some(found) = self.hidden.lock().get(&key) {
            return Arc::clone(found);
        }
        // Looked up without the lock: a library that does not answer holds
        // up only its own sessions. Two threads may look up at once; the
        // first one kept wins.
        let mut handles = Vec::new();
        let mut keepers = Vec::new();
        let slots = library.token_slots();
        let mut complete = slots.is_ok();
        for slot in slots.unwrap_or_default() {
            let Ok(keeper) = open_member_session(
                library.clone(),
                slot,
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                0,
            ) else {
                complete = false;
                continue;
            };
            for label in &self.domain_labels {
                let print: crate::identity::Fingerprint = vec![
                    (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
                    (CKA_LABEL, label.as_bytes().to_vec()),
                ];
                match crate::identity::find(&*keeper.library, keeper.handle, &print) {
                    Ok(found) => handles.extend(found),
                    Err(_) => complete = false,
                }
            }
            keepers.push(keeper);
        }
        let found = Arc::new(HiddenObjects {
            handles,
            labels: self.domain_labels.clone(),
            _keepers: keepers,
        });
        if complete {
            return Arc::clone(self.hidden.lock().entry(key).or_insert(found));
        }
        found
    }

    pub fn close_session(&self, handle: CK_SESSION_HANDLE) -> Result<()> {
        let session = self.sessions.remove(handle)?;
        close_session_members(std::slice::from_ref(&session), self.member_timeout);
        self.after_session_closed(&session);
        Ok(())
    }

    pub fn close_all_sessions(&self, slot_id: CK_SLOT_ID) -> Result<()> {
        if let Slot::PassThrough(library, slot) = self.slot(slot_id)? {
            // The member knows whether it has this slot; our sessions on it
            // are closed one by one, so member sessions behind virtual slots
            // on the same token are left alone.
            library.slot_info(slot)?;
        }
        let sessions = self.sessions.remove_slot(slot_id);
        close_session_members(&sessions, self.member_timeout);
        for session in &sessions {
            self.after_session_closed(session);
        }
        Ok(())
    }

    /// The last session on a virtual slot logs the group out, as on any token.
    ///
    /// The members stay open through their utility sessions, so they are
    /// logged out here -- except a member this application also uses
    /// through its pass-through slot, whose login belongs to those sessions
    /// too.
    fn after_session_closed(&self, session: &Session) {
        if let Target::Virtual(v) = &session.target {
            v.group.objects.remove_owned_by(session.handle);
            if self.sessions.count(session.slot_id).0 == 0 {
                // No member session is left open for the slot but the
                // group's own.
                for member in &v.group.members {
                    member.close_unused();
                }
                let was_logged_in = v.group.login.lock().take().is_some();
                v.group.objects.remove_all_session_objects();
                if was_logged_in {
                    self.log_members_out(&v.group);
                }
            }
        }
    }

    /// Logs out every member of `group` that no pass-through session of
    /// this application shares, and forgets the members' object handles:
    /// SoftHSM drops the handles of private objects at logout and numbers
    /// them anew at the next login.
    fn log_members_out(&self, group: &Group) {
        let shared: Vec<(usize, CK_SLOT_ID)> = self
            .sessions
            .snapshot()
            .iter()
            .filter_map(|s| match &s.target {
                Target::PassThrough(p) => Some((Arc::as_ptr(&p.library) as usize, p.slot)),
                Target::Virtual(_) => None,
            })
            .collect();
        for member in &group.members {
            let Some(location) = member.location() else {
                continue;
            };
            let key = (
                Arc::as_ptr(&location.library).cast::<()>() as usize,
                location.slot,
            );
            if member.reachable() && !shared.contains(&key) {
                let _ = group.on_utility(member.position, |s| s.library.logout(s.handle));
            }
            log_spares_out(member);
            group.forget_handles(member.position);
        }
    }

    pub fn session(&self, handle: CK_SESSION_HANDLE) -> Result<Arc<Session>> {
        self.sessions.get(handle)
    }

    pub fn session_info(&self, handle: CK_SESSION_HANDLE) -> Result<CK_SESSION_INFO> {
        let session = self.session(handle)?;
        let _call = session.call()?;
        let mut info = CK_SESSION_INFO {
            slotID: session.slot_id,
            state: 0,
            flags: session.flags,
            ulDeviceError: 0,
        };
        let (library, member_handle) = match &session.target {
            Target::PassThrough(p) => (Arc::clone(&p.library) as Arc<dyn MemberBackend>, p.handle),
            Target::Virtual(v) => {
                let (_, s) = v.any_member_session().ok_or(Error::new(CKR_DEVICE_ERROR))?;
                (s.library, s.handle)
            }
        };
        let mut member_info = info;
        check(library.get_session_info(member_handle, &mut member_info))?;
        info.state = member_info.state;
        info.ulDeviceError = member_info.ulDeviceError;
        Ok(info)
    }

    /// Logs in on a virtual slot: the credential is tried on one member
    /// only, so a wrong PIN costs one retry on one token, never one on each;
    /// only once it is accepted is it used on the others.
    pub fn login(
        &self,
        handle: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> Result<()> {
        let session = self.session(handle)?;
        let _call = session.call()?;
        let v = match &session.target {
            Target::PassThrough(p) => {
                return check(p.library.login(p.handle, user_type, pin));
            }
            Target::Virtual(v) => v,
        };
        if let Some(current) = v.group.login.lock().as_ref() {
            return Err(Error::new(if current.user_type == user_type {
                CKR_USER_ALREADY_LOGGED_IN
            } else {
                CKR_USER_ANOTHER_ALREADY_LOGGED_IN
            }));
        }
        if user_type == CKU_SO
            && self
                .sessions_on(session.slot_id)
                .any(|s| s.flags & CKF_RW_SESSION == 0)
        {
            return Err(Error::new(CKR_SESSION_READ_ONLY_EXISTS));
        }
        if user_type == CKU_SO {
            for member in &v.group.members {
                member.close_unused();
            }
        }
        // A member already logged in (through a pass-through slot of this
        // process) has accepted this application's login before.
        v.first_decides("C_Login", |l, s| {
            match crate::group::log_in_member(l, s, user_type, pin) {
                CKR_USER_ALREADY_LOGGED_IN => CKR_OK,
                rv => rv,
            }
        })?;
        v.group.cache_login(user_type, pin);
        // Private objects looked for while logged out were not visible.
        v.group.retry_absent();
        v.look_up_domain_keys();
        // Nor could a returning member be given or rid of them.
        recovery::replay_deferred_after_login(&v.group);
        // Nor could the members' private objects be compared.
        self.reconcile_soon();
        Ok(())
    }

    /// Logs the slot's token out once no call is inside any session on the
    /// slot (SoftHSM crashes when a login goes under a running `C_Sign`):
    /// calls arriving meanwhile wait outside their session until it is
    /// done. Those still inside after `memberTimeout` keep their member
    /// logged in (it is hung: the watchdog takes it out), and one line says
    /// so.
    pub fn logout(&self, handle: CK_SESSION_HANDLE) -> Result<()> {
        // One logout at a time, taken before this call counts in on its
        // session, so that two logouts never wait for each other's call.
        let _one_at_a_time = self.logouts.lock();
        let session = self.session(handle)?;
        let _call = session.call()?;
        let on_slot: Vec<Arc<Session>> = self.sessions_on(session.slot_id).collect();
        let _paused: Vec<_> = on_slot.iter().map(|s| s.gate.pause()).collect();
        let deadline = crate::clock::now() + self.member_timeout;
        let idle = on_slot.iter().all(|s| {
            let own = u32::from(s.handle == session.handle);
            s.gate.wait_calls(own, deadline)
        });
        match &session.target {
            Target::PassThrough(p) if idle => check(p.library.logout(p.handle)),
            Target::PassThrough(_) => {
                self.report_logout_under_calls(session.slot_id, "its token");
                Err(Error::new(CKR_FUNCTION_FAILED))
            }
            Target::Virtual(v) => {
                if v.group.login.lock().take().is_none() {
                    return Err(Error::new(CKR_USER_NOT_LOGGED_IN));
                }
                for (position, member) in v.up_member_sessions() {
                    let in_use = &v.group.members[position];
                    if !idle && in_use.in_flight() != 0 {
                        self.report_logout_under_calls(session.slot_id, &in_use.serial);
                        continue;
                    }
                    let _in_flight = in_use.begin_call();
                    crate::member::on_connection(member.connection, || {
                        member.library.logout(member.handle)
                    });
                }
                for member in &v.group.members {
                    log_spares_out(member);
                    v.group.forget_handles(member.position);
                }
                Ok(())
            }
        }
    }

    fn report_logout_under_calls(&self, slot_id: CK_SLOT_ID, what: &str) {
        eprintln!(
            "pkcs11-ha: C_Logout on slot {slot_id}: calls were still inside a member after {} ms; {what} is left logged in",
            self.member_timeout.as_millis()
        );
    }

    fn sessions_on(&self, slot_id: CK_SLOT_ID) -> impl Iterator<Item = Arc<Session>> + '_ {
        self.sessions
            .snapshot()
            .into_iter()
            .filter(move |s| s.slot_id == slot_id)
    }
}

/// Logs out the spare instances of a member's library that lanes logged
/// in (`virtual_session/lanes.rs`), as the group logs out.
fn log_spares_out(member: &crate::group::Member) {
    if let Some(location) = member.location().filter(|l| l.library.has_spares()) {
        let _in_flight = member.begin_call();
        location.library.log_out_spares(location.slot);
    }
}

/// The labels of the domain keys the groups of `config` use, and the
/// default one, which the CLI provisions when a group names none.
fn domain_labels(config: &Config) -> Vec<String> {
    let mut labels = vec![crate::config::DEFAULT_DOMAIN_LABEL.to_string()];
    for group in &config.groups {
        if !labels.contains(&group.domain_label) {
            labels.push(group.domain_label.clone());
        }
    }
    labels
}

/// Closes the member sessions behind application sessions, once no call
/// is inside any of them any more (a call on one may use a session object
/// another owns). New calls are refused on all of them first, then all are
/// waited for within one `bound`; calls still inside a member after it (a
/// member that hangs) keep that session's member sessions open, since
/// closing a session under a running call crashes SoftHSM.
fn close_session_members(sessions: &[Arc<Session>], bound: Duration) {
    close_session_members_by(sessions, crate::clock::now() + bound, bound);
}

/// [`close_session_members`] waiting until `deadline`, `bound` after the
/// wait began.
fn close_session_members_by(sessions: &[Arc<Session>], deadline: Instant, bound: Duration) {
    for session in sessions {
        session.gate.close();
    }
    let idle: Vec<bool> = sessions
        .iter()
        .map(|s| s.gate.wait_idle(deadline))
        .collect();
    for (session, idle) in sessions.iter().zip(idle) {
        if !idle {
            eprintln!(
                "pkcs11-ha: session {} closed while calls were still inside a member after {} ms; its member sessions are left open",
                session.handle,
                bound.as_millis()
            );
            continue;
        }
        match &session.target {
            Target::PassThrough(p) => {
                let _counting = Counting::on(&p.counts);
                p.library.close_session(p.handle);
            }
            Target::Virtual(v) => v.close(),
        }
    }
}

/// Runs `calls` on a pass-through slot's token, counted for it (see
/// [`MemberLibrary::slot_counts`]).
fn counted_on<T>(library: &MemberLibrary, slot: CK_SLOT_ID, calls: impl FnOnce() -> T) -> T {
    let counts = library.slot_counts(slot);
    let _counting = Counting::on(&counts);
    calls()
}

/// This crate's version as a `CK_VERSION`.
pub fn library_version() -> CK_VERSION {
    CK_VERSION {
        major: env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0),
        minor: env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0),
    }
}
