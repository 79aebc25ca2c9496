//! An HA group: its member tokens, their health, which member serves the
//! next operation (by expected completion: recent latency and calls in
//! flight), which members are too slow to be in rotation, and how the
//! members' token and mechanism facts combine into the virtual slot's.

use crate::error::{Error, Result};
use crate::identity::{self, Fingerprint};
use crate::index::{MemberIndex, SEARCHES_BEFORE_INDEX};
use crate::mechanism::OwnedTemplate;
use crate::member::{classify, padded_to_string, string_to_padded, Answer, CallCounts, Counting};
use crate::member_api::{
    open_member_session, same_library, MemberApi, MemberBackend, MemberSession,
};
use crate::object::{ObjectTable, Presence};
use crate::strategy::Capabilities;
use cryptoki_sys::*;
use parking_lot::{Mutex, RwLock};
use smallvec::{smallvec, SmallVec};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Where a member token was found.
#[derive(Clone)]
pub struct Location {
    pub library: Arc<dyn MemberBackend>,
    pub slot: CK_SLOT_ID,
}

/// The health of a member, as the group sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemberState {
    /// Serving calls.
    Up = 0,
    /// Its token was not found, or it faulted; it serves nothing.
    Down = 1,
    /// Coming back: receiving what it missed before it serves again.
    Recovering = 2,
}

/// Milliseconds since the library was first used, for "time since the last
/// state change" without a clock that jumps.
pub fn now_ms() -> u64 {
    static START: once_cell::sync::Lazy<std::time::Instant> =
        once_cell::sync::Lazy::new(crate::clock::now);
    crate::clock::since(*START).as_millis() as u64
}

/// One member token of a group.
pub struct Member {
    pub serial: String,
    pub position: usize,
    pub standby: bool,
    location: RwLock<Option<Location>>,
    state: AtomicU8,
    /// Its calls in flight and served, counted by the member library's call
    /// path ([`crate::member::MemberLibrary::call`]) while
    /// [`Self::begin_call`] names the member, and shared with its library
    /// for its slot, so that calls on the token's pass-through sessions
    /// count too.
    pub(crate) counts: Arc<CallCounts>,
    /// Bumped each time the member fails: member sessions opened in an
    /// earlier epoch are never used again, since a restarted member may
    /// hand the same session numbers to someone else.
    epoch: AtomicU64,
    consecutive_failures: AtomicU64,
    last_fault: AtomicU64,
    state_changed_ms: AtomicU64,
    /// Recovery attempts since the member last failed.
    pub recovery_attempts: AtomicU64,
    /// How many marks say that a recovery attempt for it is under way,
    /// from before its token is looked for until the member serves or the
    /// attempt gives up -- or, once its token answered, that another
    /// follows in the same run (see [`Member::expected_back`]).
    attempt_under_way: AtomicUsize,
    /// Whether it is to be tried at once: set for every failed member when
    /// its group's last serving member fails ([`Group::review_serving`]),
    /// cleared when an attempt for it begins.
    attempt_due: AtomicBool,
    /// Searches for its token since it was last found that had a library
    /// not answer: each next search waits longer (see recovery.rs).
    pub silent_searches: AtomicU64,
    /// The era its handles were last forgotten in as stale
    /// ([`Group::handles_went_stale`]).
    stale_handles_forgotten: Mutex<Option<crate::object::Era>>,
    /// One more than the epoch in which the member's library refused the
    /// key-wrap mechanism (0: not refused), so that the group neither asks
    /// again nor says so again until the member has been reconnected.
    wrap_refused: AtomicU64,
    /// One more than the generation of the group's credential that the
    /// member's token refused at recovery (0: none refused), so that it is
    /// not tried there again ([`Group::refused_cached_pin`]).
    pin_refused: AtomicU64,
    /// Whether its library refused the key-wrap mechanism at any time in
    /// this process (and has carried no key since): kept while the member
    /// is down, so that no key it cannot receive is made meanwhile.
    known_to_refuse_keys: AtomicBool,
    /// A session of the group's own on the member, in the epoch it was
    /// opened in. It is opened before any of the member's object handles
    /// is cached and stays open while the member serves, because SoftHSM
    /// numbers a token's objects anew once its last session closes; and the
    /// group's own searches run on it, so that they never collide with an
    /// operation the application has active on its member session.
    utility: Mutex<Option<MemberSession>>,
    /// Member sessions that closed virtual sessions made no call on, with
    /// the flags they were opened with, for the next virtual sessions
    /// ([`Member::keep_unused`]).
    unused_sessions: Mutex<SmallVec<[(CK_FLAGS, MemberSession); UNUSED_SESSIONS_KEPT]>>,
    /// How it can move keys, read where its token was found.
    capabilities: RwLock<Capabilities>,
    /// Recent latency of its calls, in ns, per lane: a moving average, 0
    /// while unknown.
    latency: [AtomicU64; LANES],
    /// Latency samples taken per lane, and how many of them the last
    /// review saw: only lanes with new ones are judged (the others'
    /// figures are old).
    samples: [AtomicU64; LANES],
    reviewed_samples: Mutex<[u64; LANES]>,
    /// Whether every call is timed (its library talks to a server, whose
    /// round trip dwarfs reading the clock), not one in [`SAMPLE_EVERY`].
    timed: std::sync::atomic::AtomicBool,
    /// In rotation, or degraded.
    rotation: AtomicU8,
    /// Whether a probe of the degraded member is under way.
    probing: std::sync::atomic::AtomicBool,
    /// Since when it has been far slower than the others, and the lane
    /// it was last found so in (see [`Group::review_latency`]); only the
    /// watchdog touches it.
    slow_since: Mutex<Option<(Instant, usize)>>,
    /// How long it stays degraded at least ([`DegradedHold`]); only the
    /// watchdog touches it.
    degraded_hold: Mutex<DegradedHold>,
}

/// How long a degraded member stays out of rotation at least: nothing the
/// first time, and [`DEGRADED_AFTER`], doubled each time in a row, at most
/// [`LONGEST_DEGRADED_HOLD`], when it is degraded again within
/// [`DEGRADED_AGAIN_WITHIN`] of returning. A member slow only under load
/// -- one catching up on thousands of kept changes -- answers a probe
/// quickly and is slow again once back in rotation: without the hold it
/// went in and out every few seconds (the long chaos run: 24 HA log lines
/// in 100 s for two members catching up).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DegradedHold {
    /// Not back in rotation before then.
    out_until: Option<Instant>,
    /// When it last returned to rotation.
    returned: Option<Instant>,
    /// How many times in a row it was degraded again soon after returning.
    again: u32,
}

/// See [`DegradedHold`].
pub(crate) const DEGRADED_AGAIN_WITHIN: Duration = Duration::from_secs(60);
pub(crate) const LONGEST_DEGRADED_HOLD: Duration = Duration::from_secs(60);

impl DegradedHold {
    /// Degraded at `now`: how long it stays out at least.
    pub fn degrade(&mut self, now: Instant) -> Duration {
        let soon_after_return = self
            .returned
            .is_some_and(|r| now.saturating_duration_since(r) < DEGRADED_AGAIN_WITHIN);
        self.again = if soon_after_return { self.again + 1 } else { 0 };
        let hold = match self.again {
            0 => Duration::ZERO,
            n => DEGRADED_AFTER
                .saturating_mul(1 << (n - 1).min(16))
                .min(LONGEST_DEGRADED_HOLD),
        };
        self.out_until = Some(now + hold);
        hold
    }

    /// Whether it may return to rotation at `now`.
    pub fn may_return(&self, now: Instant) -> bool {
        self.out_until.is_none_or(|until| now >= until)
    }

    /// Back in rotation at `now`.
    pub fn returned(&mut self, now: Instant) {
        self.out_until = None;
        self.returned = Some(now);
    }
}

/// Whether the chooser sends a member calls (see [`Group::review_latency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rotation {
    /// Chosen by expected completion like any member.
    In = 0,
    /// Far slower than the others for a sustained period: chosen only
    /// when no other member serves; probed by the watchdog.
    Degraded = 1,
}

/// In-process members have one call in this many timed, so that the clock
/// costs the call path next to nothing.
const SAMPLE_EVERY: u64 = 16;

/// Weight of a new sample in the moving average: one in eight when it is
/// slower (a member is taken for slow only once it has been slow for a
/// while), one in two when it is faster (a member that hiccuped once gets
/// its share back at its next calls).
const LATENCY_SMOOTHING: u64 = 8;

/// A member is comparable to the fastest when its latency is within this
/// factor (x/2) or this margin of the fastest's: comparable members are
/// chosen by calls in flight alone, ties rotating, so that jitter -- and
/// the microseconds by which in-process members differ -- does not pin
/// calls to one of them.
const COMPARABLE_HALVES: u64 = 4;

/// One choice in this many per lane goes to the members in rotation in
/// turn, whatever their expected completion, if the member's turn finds it
/// idle: a member whose latency was high once (a hiccup, a busy answer
/// asked again) must be measured again, or it would never be chosen while
/// the others keep up.
const EXPLORE_EVERY: usize = 16;
const COMPARABLE_MARGIN_NS: u64 = 2_000_000;

/// The most serving members [`Group::least_busy`] chooses among on its
/// fast path, without listing them.
const FAST_CHOICE: usize = 4;

/// How much slower than the fastest other member a member must be, and for
/// how long, to leave the rotation as degraded, and how close it must come
/// again (on a probe) to return. The absolute margin keeps in-process
/// members, whose calls take microseconds, from being degraded by noise.
const DEGRADED_RATIO: u64 = 8;
const DEGRADED_MARGIN_NS: u64 = 5_000_000;
pub(crate) const DEGRADED_AFTER: Duration = Duration::from_secs(2);
const RECOVERED_RATIO: u64 = 4;

/// How many unused member sessions a member keeps ([`Member::keep_unused`]):
/// enough for a few threads opening and closing sessions at once, few
/// against a token's session limit.
const UNUSED_SESSIONS_KEPT: usize = 4;

/// The member functions that make or destroy objects: a SoftHSM member
/// asked one of them answers `CKR_DEVICE_ERROR` once its process has lost
/// sight of the token ([`crate::member::last_write_lost_sight`]).
const WRITES: [&str; 7] = [
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_UnwrapKey",
    "C_DeriveKey",
];

thread_local! {
    /// The lane this thread last chose a member for: the calls it makes
    /// until it chooses again are that kind's, for their latency.
    static LANE: Cell<u8> = const { Cell::new(0) };
}

impl Member {
    fn new(serial: &str, position: usize, standby: bool) -> Self {
        Member {
            serial: serial.to_string(),
            position,
            standby,
            location: RwLock::new(None),
            state: AtomicU8::new(MemberState::Down as u8),
            counts: Arc::default(),
            epoch: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            last_fault: AtomicU64::new(CKR_OK),
            state_changed_ms: AtomicU64::new(now_ms()),
            recovery_attempts: AtomicU64::new(0),
            attempt_under_way: AtomicUsize::new(0),
            attempt_due: AtomicBool::new(false),
            silent_searches: AtomicU64::new(0),
            stale_handles_forgotten: Mutex::new(None),
            wrap_refused: AtomicU64::new(0),
            pin_refused: AtomicU64::new(0),
            known_to_refuse_keys: AtomicBool::new(false),
            utility: Mutex::new(None),
            unused_sessions: Mutex::new(SmallVec::new()),
            capabilities: RwLock::new(Capabilities::default()),
            latency: Default::default(),
            samples: Default::default(),
            reviewed_samples: Mutex::new([0; LANES]),
            timed: Default::default(),
            rotation: AtomicU8::new(Rotation::In as u8),
            probing: Default::default(),
            slow_since: Mutex::new(None),
            degraded_hold: Mutex::new(DegradedHold::default()),
        }
    }

    /// Keeps `session`, which a virtual session with `flags` opened and
    /// closed without making a call on it, for the next virtual session
    /// with the same flags: nothing tells it from a new one (a member's
    /// login is its token's, not a session's), and opening and closing
    /// member sessions would otherwise be most of what opening and closing
    /// a virtual session costs. Gives it back when enough are kept
    /// already, for the caller to close.
    pub fn keep_unused(
        &self,
        flags: CK_FLAGS,
        session: MemberSession,
    ) -> std::result::Result<(), MemberSession> {
        let mut kept = self.unused_sessions.lock();
        if kept.len() >= UNUSED_SESSIONS_KEPT || session.epoch != self.epoch() {
            return Err(session);
        }
        kept.push((flags, session));
        Ok(())
    }

    /// A session kept by [`Self::keep_unused`] with `flags`, opened in
    /// `epoch` on its library's current connection. Those of an earlier
    /// epoch or connection are dropped unclosed: their numbers may be
    /// another session's by now, and the member's recovery closes them.
    pub fn take_unused(&self, flags: CK_FLAGS, epoch: u64) -> Option<MemberSession> {
        let mut kept = self.unused_sessions.lock();
        kept.retain(|(_, s)| s.epoch == epoch && s.connection == s.library.connection());
        let at = kept.iter().rposition(|(f, _)| *f == flags)?;
        Some(kept.swap_remove(at).1)
    }

    /// How many sessions [`Self::keep_unused`] holds now: open on the
    /// member, and closed with the slot's last session.
    pub fn unused_sessions_kept(&self) -> usize {
        self.unused_sessions.lock().len()
    }

    /// Closes the sessions [`Self::keep_unused`] kept: before an SO login,
    /// which a token refuses while a read-only session is open, and when
    /// the slot's last session closes; and, while the member serves, those
    /// lanes left unfinished on its idle spares
    /// ([`MemberBackend::close_forgotten_lanes`]).
    pub fn close_unused(&self) {
        let kept = std::mem::take(&mut *self.unused_sessions.lock());
        let epoch = self.epoch();
        for (_, s) in kept.into_iter().filter(|(_, s)| s.epoch == epoch) {
            let _in_flight = self.begin_call();
            crate::member::on_connection(s.connection, || s.library.close_session(s.handle));
        }
        if let Some(location) = self.location().filter(|_| self.is_up()) {
            let _in_flight = self.begin_setup_call();
            location.library.close_forgotten_lanes();
        }
    }

    /// Whether the chooser sends the member calls now.
    pub fn rotation(&self) -> Rotation {
        match self.rotation.load(Ordering::Relaxed) {
            0 => Rotation::In,
            _ => Rotation::Degraded,
        }
    }

    /// The member's recent latency in `lane` (ns, 0: unknown). Kinds of
    /// call differ too much (a key generation against a random number) for
    /// one lane's figure to stand for another's.
    pub fn latency(&self, lane: usize) -> u64 {
        self.latency[lane % LANES].load(Ordering::Relaxed)
    }

    /// Adds one call's latency to the lane's average. A degraded member's
    /// sample (a probe) replaces it: whether it has recovered is a question
    /// about now.
    pub fn record_latency(&self, lane: usize, nanos: u64) {
        let slot = &self.latency[lane % LANES];
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 || self.rotation() != Rotation::In {
            nanos
        } else if nanos < old {
            (old + nanos) / 2
        } else {
            (old * (LATENCY_SMOOTHING - 1) + nanos) / LATENCY_SMOOTHING
        };
        slot.store(new.max(1), Ordering::Relaxed);
        self.samples[lane % LANES].fetch_add(1, Ordering::Relaxed);
    }

    /// How the member can move keys (see [`crate::strategy`]).
    pub fn capabilities(&self) -> Capabilities {
        *self.capabilities.read()
    }

    pub fn location(&self) -> Option<Location> {
        self.location.read().clone()
    }

    pub fn state(&self) -> MemberState {
        match self.state.load(Ordering::Acquire) {
            0 => MemberState::Up,
            2 => MemberState::Recovering,
            _ => MemberState::Down,
        }
    }

    /// Whether member sessions may be opened: it serves, or it is being
    /// brought back.
    pub fn reachable(&self) -> bool {
        self.state() != MemberState::Down
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn last_fault(&self) -> CK_RV {
        self.last_fault.load(Ordering::Relaxed)
    }

    /// Milliseconds since the member last changed state.
    pub fn ms_since_state_change(&self) -> u64 {
        now_ms().saturating_sub(self.state_changed_ms.load(Ordering::Relaxed))
    }

    pub fn is_up(&self) -> bool {
        self.state() == MemberState::Up
    }

    pub fn set_state(&self, state: MemberState) {
        if self.state.swap(state as u8, Ordering::AcqRel) != state as u8 {
            self.state_changed_ms.store(now_ms(), Ordering::Relaxed);
        }
        if state == MemberState::Up {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.recovery_attempts.store(0, Ordering::Relaxed);
            self.attempt_due.store(false, Ordering::Release);
        }
    }

    /// Whether the member is being brought back: an attempt for it is due
    /// at once or under way (looking for its token, or catching it up).
    pub fn expected_back(&self) -> bool {
        self.attempt_due.load(Ordering::Acquire)
            || self.attempt_under_way.load(Ordering::Acquire) > 0
            || self.state() == MemberState::Recovering
    }

    /// Marks a recovery attempt for the member as under way (`true`), or
    /// takes one such mark away: marks nest, so that a run of attempts
    /// one after another can count as under way across a gap. An attempt
    /// that begins takes the member's due mark away, after marking it
    /// under way, so that it never looks neither due nor under way.
    pub fn set_attempt_under_way(&self, under_way: bool) {
        if under_way {
            self.attempt_under_way.fetch_add(1, Ordering::AcqRel);
            self.attempt_due.store(false, Ordering::Release);
        } else {
            self.attempt_under_way.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether an attempt for the member is due at once (see
    /// [`Group::review_serving`]).
    pub fn attempt_due(&self) -> bool {
        self.attempt_due.load(Ordering::Acquire)
    }

    /// Takes the member's due mark away where no attempt can begin (its
    /// thread could not be started, or it is no longer down).
    pub fn drop_attempt_due(&self) {
        self.attempt_due.store(false, Ordering::Release);
    }

    /// Starts a recovery attempt in a new epoch, so that nothing opened or
    /// looked up over an earlier connection -- member sessions, handles --
    /// is taken for current: an attempt may reconnect the library, and a
    /// reconnected library hands out the same numbers again.
    pub fn begin_recovery(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.set_state(MemberState::Recovering);
    }

    /// Recovering -> up; false if the member failed meanwhile.
    fn rejoin(&self) -> bool {
        let rejoined = self
            .state
            .compare_exchange(
                MemberState::Recovering as u8,
                MemberState::Up as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if rejoined {
            self.state_changed_ms.store(now_ms(), Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.recovery_attempts.store(0, Ordering::Relaxed);
            self.attempt_due.store(false, Ordering::Release);
        }
        rejoined
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Takes the member out of service after a fault; true if it was up
    /// (or coming back) until now.
    pub fn fail(&self, rv: CK_RV) -> bool {
        let previous = self.state.swap(MemberState::Down as u8, Ordering::AcqRel);
        let was_reachable = previous != MemberState::Down as u8;
        if was_reachable {
            // It comes back as a new member: in rotation, latency unknown.
            for slot in &self.latency {
                slot.store(0, Ordering::Relaxed);
            }
            self.fresh_lanes();
            self.rotation.store(Rotation::In as u8, Ordering::Relaxed);
            *self.slow_since.lock() = None;
            *self.degraded_hold.lock() = DegradedHold::default();
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.last_fault.store(rv, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            self.state_changed_ms.store(now_ms(), Ordering::Relaxed);
        }
        was_reachable
    }

    /// Whether the member can carry key material: its library has not
    /// refused the key-wrap mechanism in this epoch.
    pub fn carries_keys(&self) -> bool {
        self.wrap_refused.load(Ordering::Relaxed) != self.epoch() + 1
    }

    /// Records that the library refused the key-wrap mechanism; true the
    /// first time in this epoch.
    pub fn refuses_keys(&self) -> bool {
        self.known_to_refuse_keys.store(true, Ordering::Relaxed);
        let marker = self.epoch() + 1;
        self.wrap_refused.swap(marker, Ordering::Relaxed) != marker
    }

    /// Whether its library refuses the key-wrap mechanism as far as known:
    /// it refused in this epoch, or was found refusing when attached.
    pub fn refuses_wrapping(&self) -> bool {
        !self.carries_keys() || self.capabilities().refuses_wrapping()
    }

    /// Whether its library has refused the key-wrap mechanism in this
    /// process and carried no key since, up or down.
    pub fn known_to_refuse_keys(&self) -> bool {
        self.known_to_refuse_keys.load(Ordering::Relaxed)
    }

    /// Its library wrapped or unwrapped a key, or takes the key-wrap
    /// mechanism again: whatever it refused before, it carries keys now.
    pub fn carried_a_key(&self) {
        if self.known_to_refuse_keys() {
            self.known_to_refuse_keys.store(false, Ordering::Relaxed);
        }
        if !self.carries_keys() {
            self.wrap_refused.store(0, Ordering::Relaxed);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.counts.in_flight()
    }

    pub fn calls_served(&self) -> u64 {
        self.counts.calls_served()
    }

    /// The lanes with latency samples since the last call, which were
    /// fresh.
    fn fresh_lanes(&self) -> SmallVec<[usize; LANES]> {
        let mut reviewed = self.reviewed_samples.lock();
        let mut fresh = SmallVec::new();
        for (lane, seen) in reviewed.iter_mut().enumerate() {
            let taken = self.samples[lane].load(Ordering::Relaxed);
            if std::mem::replace(seen, taken) != taken {
                fresh.push(lane);
            }
        }
        fresh
    }

    /// Counts the member calls this thread makes for as long as the guard
    /// lives on this member ([`Counting`]), timing them together for the
    /// member's latency: every time for a member whose library talks to a
    /// server or that is degraded, else one in [`SAMPLE_EVERY`].
    #[inline(always)]
    pub fn begin_call(&self) -> CallGuard<'_> {
        let sampled = self.calls_served() % SAMPLE_EVERY == 0;
        let started = (sampled
            || self.timed.load(Ordering::Relaxed)
            || self.rotation.load(Ordering::Relaxed) != Rotation::In as u8)
            .then(crate::clock::now);
        CallGuard {
            member: self,
            _counting: Counting::on(&self.counts),
            started,
        }
    }
}

impl Member {
    /// [`Self::begin_call`] for what sets an operation up on a lane (a
    /// spare's session, its login, finding a key there): counted in
    /// flight, never timed. A spare's first login
    /// (SoftHSM derives a key from the PIN) takes hundreds of times a
    /// signature; timed in the signatures' lane, it made the member look
    /// slow at signing, so the chooser sent it one signature at a time and
    /// its other spares were never logged in (`network_members`: one spare
    /// served every signature of its member).
    #[inline(always)]
    pub fn begin_setup_call(&self) -> CallGuard<'_> {
        CallGuard {
            member: self,
            _counting: Counting::on(&self.counts),
            started: None,
        }
    }
}

pub struct CallGuard<'a> {
    member: &'a Member,
    _counting: Counting<'a>,
    started: Option<Instant>,
}

impl Drop for CallGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(started) = self.started {
            record_timed_call(self.member, started);
        }
    }
}

/// Records a timed call's latency in the lane this thread chose for; out
/// of line, so that the calls not timed (most in-process ones) do not
/// carry the clock read and the lane's thread-local access.
#[inline(never)]
fn record_timed_call(member: &Member, started: Instant) {
    let nanos = u64::try_from(crate::clock::since(started).as_nanos()).unwrap_or(u64::MAX);
    member.record_latency(usize::from(LANE.get()), nanos);
}

/// The credential the group logged in with, kept to log members in again.
pub struct Login {
    pub user_type: CK_USER_TYPE,
    pub pin: Option<Zeroizing<Vec<u8>>>,
    /// Which credential this is: a new one at each login and PIN change
    /// ([`Group::refused_cached_pin`]).
    generation: u64,
}

/// Per-group settings from the config.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Label of the AES key members share to move key material.
    pub domain_label: String,
    /// Bytes of multi-part input kept to replay an operation elsewhere.
    pub replay_limit: usize,
    /// Members an object must be on before the call that makes it
    /// succeeds (`VirtualTokenNNMinReplicas`).
    pub min_replicas: usize,
    /// `memberTimeout`: how long an application call that finds no member
    /// serving waits for a returning one (see [`Group::wait_for_serving`]).
    pub member_timeout: Duration,
}

/// Each member's domain key handle, and the check value all must share.
#[derive(Default)]
pub struct DomainKeys {
    state: Mutex<DomainState>,
}

#[derive(Default)]
struct DomainState {
    reference: Option<Vec<u8>>,
    /// Per member: (epoch, handle) of its domain key, once its check value
    /// was found to agree with the group's.
    keys: Vec<Option<(u64, CK_OBJECT_HANDLE)>>,
    /// Per member: (epoch, every handle a search by class and label
    /// found). Each is hidden from searches; only a single one is used.
    found: Vec<Option<(u64, Vec<CK_OBJECT_HANDLE>)>>,
}

impl DomainKeys {
    fn new(members: usize) -> Self {
        DomainKeys {
            state: Mutex::new(DomainState {
                reference: None,
                keys: vec![None; members],
                found: vec![None; members],
            }),
        }
    }

    pub fn cached(&self, position: usize, epoch: u64) -> Option<CK_OBJECT_HANDLE> {
        match self.state.lock().keys[position] {
            Some((e, handle)) if e == epoch => Some(handle),
            _ => None,
        }
    }

    /// Records a member's domain key if its check value matches the
    /// group's (the first one seen sets it); false if it does not.
    pub fn agree(
        &self,
        position: usize,
        epoch: u64,
        handle: CK_OBJECT_HANDLE,
        check: Vec<u8>,
    ) -> bool {
        let mut state = self.state.lock();
        match &state.reference {
            Some(reference) if *reference != check => return false,
            Some(_) => {}
            None => state.reference = Some(check),
        }
        state.keys[position] = Some((epoch, handle));
        true
    }

    /// What a search for the domain key on a member found in this epoch,
    /// if it was searched for: the single key, or `None` where there is
    /// not exactly one.
    pub fn found(&self, position: usize, epoch: u64) -> Option<Option<CK_OBJECT_HANDLE>> {
        match &self.state.lock().found[position] {
            Some((e, handles)) if *e == epoch => Some(match handles[..] {
                [one] => Some(one),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Forgets a member's domain key handles (see [`Group::forget_handles`]).
    fn forget(&self, position: usize) {
        let mut state = self.state.lock();
        state.keys[position] = None;
        state.found[position] = None;
    }

    pub fn record_found(&self, position: usize, epoch: u64, handles: Vec<CK_OBJECT_HANDLE>) {
        self.state.lock().found[position] = Some((epoch, handles));
    }

    /// Whether a member handle is, in the member's `epoch`, a key labelled
    /// as that member's domain key, which the application must never see
    /// through the virtual slot.
    pub fn is_domain_key(&self, position: usize, epoch: u64, handle: CK_OBJECT_HANDLE) -> bool {
        matches!(&self.state.lock().found[position],
            Some((e, handles)) if *e == epoch && handles.contains(&handle))
    }
}

/// Member positions in order of preference; inline, since this is on the
/// path of every operation and groups are small.
pub type Positions = SmallVec<[usize; 4]>;

pub struct Group {
    pub index: u32,
    pub label: String,
    pub settings: GroupSettings,
    /// The virtual token's serial number.
    pub serial: String,
    pub slot_id: CK_SLOT_ID,
    pub members: Vec<Arc<Member>>,
    pub objects: ObjectTable,
    pub login: Mutex<Option<Login>>,
    pub domain: DomainKeys,
    /// Whether Luna partitions of unknown policy clone private keys.
    pub probes: crate::strategy::Probes,
    /// Per member: changes it missed while down, in order.
    pending: Mutex<Vec<Vec<Pending>>>,
    /// How many times a call logged a member in again after it lost its
    /// login (see [`Group::note_login_again`]).
    logins_again: AtomicU64,
    /// Credentials cached so far ([`Login::generation`]).
    logins_cached: AtomicU64,
    /// While no member serves: since when, and when the HA log last said
    /// so (see [`Group::review_serving`]).
    outage: Mutex<Option<Outage>>,
    /// Per member: objects a call is making on it (`None`), or whose
    /// making was cut off on the wire (`Some(when)`). The member may still
    /// make those when it resumes, so they are not made again on it until
    /// it has or can no longer, and it does not rejoin meanwhile.
    in_doubt: Mutex<Vec<Vec<InDoubt>>>,
    /// Fingerprints of objects whose making call failed, or that were
    /// destroyed, while a member had them in doubt: recovery looks for
    /// those copies by these, and removes them. Kept while a member has the
    /// object in doubt.
    abandoned: Mutex<rustc_hash::FxHashMap<CK_OBJECT_HANDLE, Fingerprint>>,
    /// Per member: copies it missed that no serving member could give it
    /// when it returned (the members holding the object were down, or
    /// failed during the copy), and the objects it missed when it returned
    /// to a group with no member serving. It serves without them, and they
    /// are tried again each time a member returns, until made or the
    /// object is gone.
    deferred: Mutex<Vec<Vec<Pending>>>,
    /// Per member: kept changes taken to be made now and not made yet, so
    /// that the status counts them while they are made.
    deferred_underway: Vec<AtomicUsize>,
    /// Per member: keys synchronisation skipped because they cannot reach
    /// it (see [`Group::skip_unreceivable`]), so that the HA log says so
    /// once per key; forgotten when what the member can do changes.
    unreceivable: Mutex<Vec<rustc_hash::FxHashSet<CK_OBJECT_HANDLE>>>,
    /// Per member: objects a change or copy failed to give it while it
    /// answered -- most often for good, a library judging their templates
    /// otherwise than the others' do (see [`Group::note_refused`]). It
    /// serves without them, ranked for searches as lacking objects; an
    /// entry lapses once the object is gone or the member holds it.
    refused: Mutex<Vec<rustc_hash::FxHashSet<CK_OBJECT_HANDLE>>>,
    /// Per member: it serves without having been compared with the group
    /// since it returned -- its synchronisation was skipped or cut short
    /// -- so it may lack objects no change queued for it names (made by
    /// another process, or by calls whose copies there were in doubt),
    /// until a reconciliation pass compares it ([`Group::set_compared`]).
    uncompared: Vec<AtomicBool>,
    /// Held while kept changes are made ([`Group::replaying_deferred`]).
    replaying_deferred: Mutex<()>,
    /// That replay as calls naming a kept object see it (see
    /// [`Group::wait_for_kept`]). Lock order: deferred, then this.
    kept_replay: Mutex<KeptReplay>,
    /// A library that refused the key-wrap mechanism was found taking it
    /// again by a copy (`VirtualSession::carries_keys_now`) since the last
    /// [`Group::wrapping_resumed`]: the copies kept meanwhile are due.
    wrapping_resumed_unseen: AtomicBool,
    /// A change was kept for a serving member, to be made at the next
    /// recovery round, since the last [`Group::kept_replay_asked`].
    kept_replay_asked: AtomicBool,
    /// Whether a recovery thread makes the kept changes a call asks for
    /// ([`Group::wait_for_kept`]); without one (no threads allowed, or a
    /// test driving recovery itself) nothing would.
    replays_on_request: AtomicBool,
    /// Whether work on several members runs each member's part in a thread
    /// of its own ([`Group::set_members_in_threads`]).
    members_in_threads: AtomicBool,
    /// See [`Group::set_at_once_in_turn`].
    at_once_in_turn: AtomicBool,
    round_robin: [AtomicUsize; LANES],
    /// The write barrier: calls that make, change or destroy objects hold
    /// it shared; a returning member's recovery holds it exclusively while
    /// it copies the last few changes it missed, so that under continuous
    /// writes it catches up instead of chasing the write rate.
    writes: RwLock<()>,
    /// Per member: what it holds (see `index.rs`).
    indexes: Vec<Mutex<IndexState>>,
    /// Per member: the group's objects it was seen to hold whenever its
    /// handles were forgotten (see [`Group::held_before`]).
    held_before: Vec<Mutex<rustc_hash::FxHashSet<CK_OBJECT_HANDLE>>>,
    /// Per member: objects made elsewhere after an attempt on it lost its
    /// answer (see [`Group::made_after_orphans`]).
    made_after_orphans: Vec<Mutex<rustc_hash::FxHashSet<CK_OBJECT_HANDLE>>>,
    /// Where deletions a member missed are recorded for later processes
    /// (`state_dir.rs`); unset without a usable state directory.
    pub state: std::sync::OnceLock<Arc<crate::state_dir::StateDir>>,
    /// Calls making objects under way (see [`Group::making_objects`]).
    making: AtomicUsize,
    /// The objects those calls are making, known to the group before the
    /// calls have succeeded (see [`Group::making_object`]).
    unfinished: Mutex<SmallVec<[CK_OBJECT_HANDLE; 4]>>,
    /// Token objects calls are importing while changes are kept for a
    /// member, by their templates' prints ([`Group::importing`]).
    importing: Mutex<Vec<(CK_OBJECT_HANDLE, Fingerprint)>>,
    /// Application calls waiting for a member to serve, and whether the
    /// group is closing (see [`Group::wait_for_serving`]). The standard
    /// library's futex-based primitives, not parking_lot's, for the reason
    /// `recovery.rs` gives: an application may fork while a call waits.
    serving_wait: std::sync::Mutex<ServingWait>,
    /// Woken whenever a member may have started or stopped serving or
    /// being brought back, and when the group closes.
    serving_changed: std::sync::Condvar,
    /// Wakes the recovery thread to start the attempts due at once; unset
    /// where no recovery thread runs (see [`Group::review_serving`]).
    wake_recovery: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// One application call's waits for a returning member
/// ([`Group::wait_for_serving`]): as many as the call needs -- a member
/// that serves after a wait may fail under the call too -- together at
/// most one `memberTimeout`: what is left of it.
#[derive(Default)]
pub struct Waits(Option<Duration>);

impl Waits {
    /// Waits for a call that waits no more.
    pub fn spent() -> Waits {
        Waits(Some(Duration::ZERO))
    }
}

/// Who waits in [`Group::wait_for_serving`] and [`Group::wait_for_kept`].
#[derive(Default)]
struct ServingWait {
    waiting: usize,
    waiting_for_kept: usize,
    /// `C_Finalize` began: no call waits any more.
    closed: bool,
}

/// The replay of the changes kept for the serving members
/// ([`Group::replaying_deferred`]), as calls naming a kept object see it.
struct KeptReplay {
    /// Per member: it serves with changes kept for it, and the replay
    /// that makes them -- right after every return -- has not begun.
    due: Vec<bool>,
    /// A replay is under way.
    running: bool,
    /// Per member: the objects the kept changes being made now make (one,
    /// or a run of imports made on spares: [`Group::next_kept_imports`]).
    making: Vec<Vec<CK_OBJECT_HANDLE>>,
    /// Objects calls wait for, by member: made before the other kept
    /// changes ([`Group::next_deferred`]).
    wanted: Vec<(usize, CK_OBJECT_HANDLE)>,
    /// When the changes kept for serving members are tried again though
    /// no return or login asked for it ([`Group::kept_retry_due`]).
    retry_at: Option<Instant>,
    /// The wait before that retry: doubled after each retry, back to
    /// [`KEPT_RETRY_FIRST`] once a replay makes a kept change.
    retry_after: Duration,
}

/// The first wait before changes kept for serving members are tried again
/// unasked ([`Group::kept_retry_due`]).
const KEPT_RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest such wait: a change that stays kept for a real cause (its
/// source is down for hours) is tried, and costs its member calls, at
/// most twice a minute.
const KEPT_RETRY_LONGEST: Duration = Duration::from_secs(30);

/// Held while kept changes are made (see [`Group::replaying_deferred`]).
pub struct ReplayingDeferred<'a> {
    group: &'a Group,
    _one_at_a_time: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for ReplayingDeferred<'_> {
    fn drop(&mut self) {
        let mut replay = self.group.kept_replay.lock();
        replay.running = false;
        replay.making.iter_mut().for_each(Vec::clear);
        drop(replay);
        self.group.wake_waiting_calls();
    }
}

/// Counts a call making objects while it lives.
pub struct Making<'a>(&'a AtomicUsize);

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks an object its call is still making while it lives.
pub struct Unfinished<'a> {
    objects: &'a Mutex<SmallVec<[CK_OBJECT_HANDLE; 4]>>,
    object: CK_OBJECT_HANDLE,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        let mut objects = self.objects.lock();
        if let Some(i) = objects.iter().position(|o| *o == self.object) {
            objects.swap_remove(i);
        }
    }
}

/// An import under way ([`Group::importing`]), until dropped.
pub struct Importing<'a> {
    prints: &'a Mutex<Vec<(CK_OBJECT_HANDLE, Fingerprint)>>,
    object: CK_OBJECT_HANDLE,
}

impl Drop for Importing<'_> {
    fn drop(&mut self) {
        let mut prints = self.prints.lock();
        if let Some(i) = prints.iter().position(|(o, _)| *o == self.object) {
            prints.swap_remove(i);
        }
    }
}

/// A member's object index, for the member epoch it was read in.
#[derive(Default)]
struct IndexState {
    epoch: u64,
    /// Objects looked for one by one on the member in this epoch.
    searches: u32,
    index: Option<MemberIndex>,
    /// Counts what made an index read earlier out of date (objects removed
    /// from the member, its handles forgotten); never goes back.
    changes: u64,
}

impl IndexState {
    /// Starts afresh for `epoch`: nothing known, and any index read before
    /// out of date.
    fn reset(&mut self, epoch: u64) {
        *self = IndexState {
            epoch,
            changes: self.changes + 1,
            ..IndexState::default()
        };
    }
}

/// Taken before a member's objects are read into an index elsewhere (by
/// reconciliation): [`Group::adopt_index`] takes that index only if
/// nothing made it out of date meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct IndexTicket {
    position: usize,
    epoch: u64,
    changes: u64,
}

/// An object being made on a member (`None`), or in doubt there since its
/// making call ended (`Some`).
pub type InDoubt = (CK_OBJECT_HANDLE, Option<DoubtSince>);

/// When a call making an object on a member ended leaving it in doubt
/// there, and how ([`Doubt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoubtSince {
    pub at: Instant,
    /// Cut off on the wire ([`Doubt::CutOff`]), not merely faulted.
    pub cut_off: bool,
    /// When the member has had its time to make the object, where it
    /// came to serve before then ([`Group::carry_in_doubt`]).
    pub carried_until: Option<Instant>,
}

/// What a call making an object on a member leaves of it there
/// ([`Group::end_making`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doubt {
    /// Nothing in doubt: it answered, or its library carries out nothing
    /// after a fault.
    None,
    /// It faulted on a library whose server may have received the request
    /// ([`MemberBackend::may_carry_out_after_fault`]): a server still
    /// answering carries it out at its own pace though the answer is lost
    /// (p11-kit's worker, its connection reset under it).
    Faulted,
    /// Its request was cut off on the wire, or a recovery of the member
    /// began while it was inside: a stalled server may carry it out much
    /// later.
    CutOff,
}

/// How often the HA log repeats that a group still has no member serving.
const OUTAGE_SUMMARY: Duration = Duration::from_secs(60);

/// A group without a serving member: since when, and when the HA log last
/// said so.
struct Outage {
    since: Instant,
    reported: Instant,
}

/// The longest a call that makes an object waits at the write barrier.
pub const WRITE_BARRIER_WAIT: Duration = Duration::from_secs(1);

/// Round-robin and latency lanes: one per kind of operation, one for
/// stateless calls, one for object-making calls.
pub const LANES: usize = 10;

/// The lane of calls that make objects (create, copy, generate, unwrap,
/// derive) and of searches' starts, which any serving member can serve.
pub const MAKING_LANE: usize = 9;

/// The lane of calls outside operations (`C_GenerateRandom`, attribute
/// reads), where a probe's one round trip is counted too.
pub const STATELESS_LANE: usize = 8;
const PROBE_LANE: usize = STATELESS_LANE;

/// Length of `CK_TOKEN_INFO::serialNumber`.
const SERIAL_FIELD: usize = 16;

/// The group serial Luna users expect: "1" + the primary's serial, cut to
/// the last 15 characters of that serial when it would not fit. Where that
/// would equal a member's own serial (a 16-character serial that starts
/// with "1"), the leading digit is the first of 2-9 that is free, so that
/// applications choosing a token by serial never confuse the two.
pub fn virtual_serial(explicit: Option<&str>, members: &[String]) -> String {
    if let Some(serial) = explicit {
        return serial.to_string();
    }
    let primary = members.first().map_or("", String::as_str);
    let keep = SERIAL_FIELD - 1;
    let tail = if primary.len() > keep {
        &primary[primary.len() - keep..]
    } else {
        primary
    };
    ('1'..='9')
        .map(|digit| format!("{digit}{tail}"))
        .find(|candidate| !members.contains(candidate))
        .unwrap_or_else(|| format!("1{tail}"))
}

/// A change a member that was down has yet to receive.
#[derive(Clone)]
pub enum Pending {
    /// Copy this virtual object to it.
    Create(CK_OBJECT_HANDLE),
    /// Create this virtual object on it from the application's template.
    Import(CK_OBJECT_HANDLE, Arc<OwnedTemplate>),
    /// Remove the object with this fingerprint from it: the group's
    /// `object` where this process had one (a removal recorded by another
    /// process names none). A copy alike in every attribute the print
    /// reads may be another live object's, made after it by a call's
    /// retry: that copy stays (`VirtualSession::may_be_a_live_copy`).
    Destroy {
        print: Fingerprint,
        object: Option<CK_OBJECT_HANDLE>,
    },
    /// Remove every object matching this template's fingerprint that is no
    /// object of the group: what a call making objects may have left on a
    /// member that failed while asked (its answer lost), another key under
    /// the same template, which must never pass for the group's copy.
    Orphans(Fingerprint),
    /// Set these attributes (the application's `C_SetAttributeValue`, as
    /// the members got it) on its copy of this virtual object, found by
    /// the fingerprint the object had before the change: the copy is
    /// changed in place, never removed and made again -- a key the
    /// member cannot be given again (no way to move it there, or made
    /// non-extractable by the change) would be lost to it.
    Set {
        object: CK_OBJECT_HANDLE,
        before: Fingerprint,
        changes: Arc<OwnedTemplate>,
    },
}

impl Pending {
    /// The object the change makes or changes, if it makes or changes one:
    /// on its way to the member until the change is made.
    pub fn made_object(&self) -> Option<CK_OBJECT_HANDLE> {
        match self {
            Pending::Create(object) | Pending::Import(object, _) | Pending::Set { object, .. } => {
                Some(*object)
            }
            Pending::Destroy { .. } | Pending::Orphans(_) => None,
        }
    }

    /// The fingerprint a removal removes; `None` for a change that makes
    /// an object.
    pub fn removal(&self) -> Option<&crate::identity::Fingerprint> {
        match self {
            Pending::Destroy { print, .. } | Pending::Orphans(print) => Some(print),
            Pending::Create(_) | Pending::Import(..) | Pending::Set { .. } => None,
        }
    }

    /// The fingerprint of the group's object a removal destroys: a change
    /// making an object it could match waits behind it
    /// ([`crate::virtual_session::VirtualSession::behind_a_removal`]). Not
    /// a removal of orphans, which spares the group's objects: the group's
    /// copy made before it is safe, and one waiting behind it waited for
    /// good where the orphans' removal itself waited behind a change of
    /// that object's attributes (simulation seed 70505).
    pub fn destroyed(&self) -> Option<&crate::identity::Fingerprint> {
        match self {
            Pending::Destroy { print, .. } => Some(print),
            _ => None,
        }
    }
}

impl Group {
    pub fn new(
        index: u32,
        label: &str,
        serial: String,
        slot_id: CK_SLOT_ID,
        active: &[String],
        standby: &[String],
        settings: GroupSettings,
    ) -> Self {
        let members: Vec<Arc<Member>> = active
            .iter()
            .map(|s| (s, false))
            .chain(standby.iter().map(|s| (s, true)))
            .enumerate()
            .map(|(position, (serial, standby))| Arc::new(Member::new(serial, position, standby)))
            .collect();
        let count = members.len();
        Group {
            index,
            label: label.to_string(),
            settings,
            serial,
            slot_id,
            members,
            objects: ObjectTable::new(count),
            login: Mutex::new(None),
            domain: DomainKeys::new(count),
            probes: Default::default(),
            pending: Mutex::new(vec![Vec::new(); count]),
            logins_again: AtomicU64::new(0),
            logins_cached: AtomicU64::new(0),
            in_doubt: Mutex::new(vec![Vec::new(); count]),
            abandoned: Mutex::default(),
            deferred: Mutex::new(vec![Vec::new(); count]),
            deferred_underway: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            unreceivable: Mutex::new(vec![Default::default(); count]),
            refused: Mutex::new(vec![Default::default(); count]),
            uncompared: (0..count).map(|_| AtomicBool::new(false)).collect(),
            replaying_deferred: Mutex::new(()),
            kept_replay: Mutex::new(KeptReplay {
                due: vec![false; count],
                running: false,
                making: vec![Vec::new(); count],
                wanted: Vec::new(),
                retry_at: None,
                retry_after: KEPT_RETRY_FIRST,
            }),
            wrapping_resumed_unseen: AtomicBool::new(false),
            kept_replay_asked: AtomicBool::new(false),
            replays_on_request: AtomicBool::new(false),
            members_in_threads: AtomicBool::new(false),
            at_once_in_turn: AtomicBool::new(false),
            round_robin: Default::default(),
            writes: RwLock::new(()),
            outage: Mutex::new(None),
            indexes: (0..count).map(|_| Mutex::default()).collect(),
            held_before: (0..count).map(|_| Mutex::default()).collect(),
            made_after_orphans: (0..count).map(|_| Mutex::default()).collect(),
            state: std::sync::OnceLock::new(),
            making: AtomicUsize::new(0),
            unfinished: Mutex::new(SmallVec::new()),
            importing: Mutex::new(Vec::new()),
            serving_wait: std::sync::Mutex::default(),
            serving_changed: std::sync::Condvar::new(),
            wake_recovery: std::sync::OnceLock::new(),
        }
    }

    /// Records where a member token lives and brings it up, unless the
    /// slot cannot be a member (a Luna HA virtual slot): then it stays
    /// down and the operator is told why, once.
    pub fn attach(&self, position: usize, location: Location) {
        if let Some(why) = crate::strategy::refusal(&*location.library, location.slot) {
            let event = format!("is refused as a member: {why}");
            eprintln!(
                "pkcs11-ha: group {} ({}): member {} {event}",
                self.label, self.serial, self.members[position].serial
            );
            self.log(Some(position), &event);
            return;
        }
        self.relocate(position, location);
        self.members[position].set_state(MemberState::Up);
        self.wake_waiting_calls();
    }

    /// Notes that a library that refused the key-wrap mechanism takes it
    /// again (see [`Group::wrapping_resumed`]).
    pub fn note_wrapping_resumed(&self) {
        self.wrapping_resumed_unseen.store(true, Ordering::Relaxed);
    }

    /// Asks the libraries of serving members known to refuse the key-wrap
    /// mechanism whether they still do (what a member found refusing when
    /// attached can do is read again; one that refused since is asked with
    /// a wrap without a key), and lists the mechanisms of those whose
    /// listing failed when attached ([`Group::list_again`]); true if one
    /// has stopped refusing or been listed, here or in a copy since the
    /// last call.
    pub fn wrapping_resumed(&self) -> bool {
        let mut resumed = self.wrapping_resumed_unseen.swap(false, Ordering::Relaxed);
        for member in self.up_members() {
            let Some(location) = member.location() else {
                continue;
            };
            if member.capabilities().unlisted {
                resumed |= self.list_again(member.position);
            } else if member.capabilities().refuses_wrapping() {
                let read = self.detect_serving(member.position);
                if let Some(capabilities) = read.filter(|c| !c.refuses_wrapping()) {
                    self.log(Some(member.position), &capabilities.describe());
                    *member.capabilities.write() = capabilities;
                    resumed = true;
                }
            } else if !member.carries_keys()
                && !crate::strategy::refuses_wrapping(
                    &*location.library,
                    location.slot,
                    &member.capabilities(),
                )
            {
                member.carried_a_key();
                resumed = true;
            }
        }
        resumed
    }

    /// Records where a member token lives now (it may have moved slots
    /// after its library reconnected), without changing its state, and
    /// what it can do to move keys there. Where its mechanisms cannot be
    /// listed ([`Capabilities::detect`]), what it was found able to do
    /// before stands (a refusal among it is asked again by
    /// [`Group::wrapping_resumed`]); a member never found before joins
    /// with what it can do unknown ([`Capabilities::unlisted`], read again
    /// by [`Group::list_again`]), and the HA log says so.
    /// (Failing the recovery attempt instead costs another reconnect, each
    /// as slow as the one whose listing failed: the suite's slow-reconnect
    /// test failed 1 time in 4 beside a loaded simulation, as against 4
    /// passes before.)
    pub fn relocate(&self, position: usize, location: Location) {
        let member = &self.members[position];
        let capabilities = match Capabilities::detect(&*location.library, location.slot) {
            Ok(capabilities) => capabilities,
            Err(_) if member.location().is_some() => member.capabilities(),
            Err(e) => {
                self.log(
                    Some(position),
                    &format!(
                        "its mechanisms could not be listed ({}): read again before a key \
                         moves to or from it",
                        crate::error::rv_name(e.rv)
                    ),
                );
                Capabilities::unlisted(&*location.library, location.slot)
            }
        };
        let described = capabilities.describe();
        if member.capabilities().describe() != described || member.location().is_none() {
            self.log(Some(position), &described);
            self.unreceivable.lock()[position].clear();
        }
        *member.capabilities.write() = capabilities;
        member
            .timed
            .store(location.library.is_networked(), Ordering::Relaxed);
        location
            .library
            .count_slot_as(location.slot, &member.counts);
        *member.location.write() = Some(location);
    }

    /// Reads again what a serving member whose mechanisms could not be
    /// listed when it was attached ([`Capabilities::unlisted`]) can do;
    /// true once that is known (at once for any other member). A listing
    /// that faults takes the member out: its recovery reads it again.
    /// (Taken to move no key until its next return, such a member had
    /// every generated key refused meanwhile.)
    pub fn list_again(&self, position: usize) -> bool {
        let member = &self.members[position];
        if !member.capabilities().unlisted {
            return true;
        }
        let Some(capabilities) = self.detect_serving(position) else {
            return false;
        };
        self.log(Some(position), &capabilities.describe());
        self.unreceivable.lock()[position].clear();
        *member.capabilities.write() = capabilities;
        true
    }

    /// What a serving member can do, read again from its mechanism list;
    /// `None` where the list cannot be read. A listing that faults takes
    /// the member out: its connection may be lost unseen, and recovery
    /// brings it back and reads it again (left serving, its kept copies
    /// waited until an application call happened to reach it: simulation
    /// seed 31548).
    fn detect_serving(&self, position: usize) -> Option<Capabilities> {
        let location = self.members[position].location()?;
        match Capabilities::detect(&*location.library, location.slot) {
            Ok(capabilities) => Some(capabilities),
            Err(e) => {
                if is_member_fault("C_GetMechanismList", e.rv) {
                    self.member_failed(position, "C_GetMechanismList", e.rv);
                }
                None
            }
        }
    }

    /// Records a member fault: the member leaves the rotation and the
    /// operator hears of it once.
    pub fn member_failed(&self, position: usize, function: &str, rv: CK_RV) {
        let event = if rv == CKR_DEVICE_ERROR
            && WRITES.contains(&function)
            && crate::member::last_write_lost_sight()
        {
            format!(
                "member's SoftHSM process lost sight of its token ({function} and \
                 C_GetTokenInfo answered CKR_GENERAL_ERROR there): taken out, recovery \
                 connects it afresh; calls go to the other members"
            )
        } else {
            format!(
                "member failed in {function} with {}; calls go to the other members",
                crate::error::rv_name(rv)
            )
        };
        self.take_out(position, rv, &event);
    }

    /// Member `position` no longer knew a session of the group's of its
    /// current epoch (closing it answered that the handle is invalid):
    /// its token, or the server in front of it, restarted between two
    /// calls of ours. The member's object handles, its login and the
    /// group's own session there went with it: it is taken out, and
    /// recovery brings it back in a new epoch. Left serving after a
    /// restart no call had met, a search there named every object it
    /// found anew (simulation seed 32124356). (The application's
    /// `C_CloseAllSessions` on a member's own slot closes only its own
    /// sessions there, one by one: `Provider::close_all_sessions`.)
    pub fn lost_sessions(&self, position: usize) {
        self.take_out(
            position,
            CKR_SESSION_HANDLE_INVALID,
            "member no longer knew a session of the group's (its token or its server restarted): \
             taken out until recovery opens them again",
        );
    }

    /// Takes a member out of service for `rv`, saying `event` once.
    fn take_out(&self, position: usize, rv: CK_RV, event: &str) {
        let member = &self.members[position];
        // Where a recovery thread runs, the last member serving is due an
        // attempt before it stops: a call finding no member serving waits
        // only while one is being brought back, and until `review_serving`
        // marks the failed members due, after the lines below, it found
        // none (the long chaos run, seed 42: 1,245 calls failed in the
        // 3.4 ms those lines took).
        if self.wake_recovery.get().is_some()
            && member.is_up()
            && self.up_members().all(|m| m.position == position)
        {
            member.attempt_due.store(true, Ordering::Release);
        }
        if member.fail(rv) {
            eprintln!(
                "pkcs11-ha: group {} ({}): member {} {event}",
                self.label, self.serial, member.serial
            );
            self.log_change(Some(position), event);
            self.review_serving(crate::clock::now());
        }
    }

    /// Whether `session`, just opened on a serving member, shows that its
    /// token lost the login the group holds: it restarted (or was logged
    /// out) since recovery logged it in, and no call met it meanwhile. A
    /// search on such a session finds none of the private objects, so
    /// every look-up there would take the group's private objects for
    /// absent: a copy owed to another member found no source, and the
    /// member served on without them (simulation seed 135188); and an
    /// application's search there answers without them (seeds 3063, 9207,
    /// 17574: a token restarted between two calls). A standby
    /// member is left out: it is logged in only while it serves.
    fn lost_login(&self, member: &Member, session: &MemberSession) -> bool {
        if !member.is_up() || member.standby || !self.holds_login() {
            return false;
        }
        let _in_flight = member.begin_call();
        crate::member::on_connection(session.connection, || {
            crate::member_api::session_is_public(&*session.library, session.handle)
        })
    }

    /// `session`, just opened on member `position`, unless it shows that
    /// the member lost its login unseen ([`Self::lost_login`]): then it is
    /// closed and the member taken out -- its handles are stale too, and
    /// recovery, as after any failure, logs it in again in a new epoch and
    /// gives it what it missed -- and the open fails as on a member fault.
    pub fn unless_login_lost(
        &self,
        position: usize,
        session: MemberSession,
    ) -> Result<MemberSession> {
        let member = &self.members[position];
        if !self.lost_login(member, &session) {
            return Ok(session);
        }
        let _in_flight = member.begin_call();
        crate::member::on_connection(session.connection, || {
            session.library.close_session(session.handle)
        });
        self.take_out_for_lost_login(position);
        Err(Error::new(CKR_DEVICE_ERROR))
    }

    fn take_out_for_lost_login(&self, position: usize) {
        self.take_out(
            position,
            CKR_USER_NOT_LOGGED_IN,
            "member lost its login unseen (its token restarted, or was logged \
             out): taken out until recovery logs it in again",
        );
    }

    /// Whether the group may search `session`, a session of member
    /// `position`: not where it shows that its token lost the group's
    /// login unseen ([`Self::lost_login`]) -- a search there answers
    /// without the private objects and no error, and the group would take
    /// them for absent on the member. Such a member is taken out, as
    /// [`Self::unless_login_lost`] takes one out.
    pub fn may_search(&self, position: usize, session: &MemberSession) -> bool {
        if self.lost_login(&self.members[position], session) {
            self.take_out_for_lost_login(position);
            return false;
        }
        true
    }

    /// [`identity::find`] of `print` on `session`, a session of member
    /// `position`; a member fault's answer where it found nothing and
    /// [`Self::may_search`] says the member lost its login (asked only
    /// then: a look-up that finds costs no call more), or where the member
    /// served when the look-up began and was taken out before it ended --
    /// taken for an answer, a stalled look-up on a member whose login had
    /// gone said a key was not there, and a search on another member left
    /// the key out (simulation seed 583426).
    pub fn find_on(
        &self,
        position: usize,
        session: &MemberSession,
        print: &Fingerprint,
    ) -> std::result::Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let member = &self.members[position];
        let (serving, epoch) = (member.is_up(), member.epoch());
        let found = identity::find(&*session.library, session.handle, print)?;
        let taken_out = serving && member.epoch() != epoch;
        if found.is_empty() && (taken_out || !self.may_search(position, session)) {
            return Err(CKR_DEVICE_ERROR);
        }
        Ok(found)
    }

    /// The handle of the member's domain key, looked up by class and label
    /// once per member epoch (so that searches can leave it out); `None`
    /// where the member does not hold exactly one.
    pub fn domain_handle(&self, position: usize) -> Option<CK_OBJECT_HANDLE> {
        let member = &self.members[position];
        let epoch = member.epoch();
        if let Some(found) = self.domain.found(position, epoch) {
            return found;
        }
        let label = self.settings.domain_label.as_bytes().to_vec();
        let print: Fingerprint = vec![
            (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
            (CKA_LABEL, label),
        ];
        let found = self.find_on_utility(position, &print).ok()?;
        let handle = match found[..] {
            [one] => Some(one),
            _ => None,
        };
        if let (Some(one), Some(location)) = (handle, member.location()) {
            location.library.offer_index_probe(location.slot, one);
        }
        self.domain.record_found(position, epoch, found);
        handle
    }

    /// Whether a fingerprint is that of the group's domain key.
    pub fn is_domain_print(&self, print: &Fingerprint) -> bool {
        let value = |t: CK_ATTRIBUTE_TYPE| {
            print
                .iter()
                .find(|(pt, _)| *pt == t)
                .map(|(_, v)| v.as_slice())
        };
        value(CKA_CLASS).map(identity::ulong_of) == Some(CKO_SECRET_KEY)
            && value(CKA_LABEL) == Some(self.settings.domain_label.as_bytes())
    }

    /// Has `wake` called when attempts are due at once: the recovery
    /// thread's wake-up, given it as it starts.
    pub fn set_recovery_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake_recovery.set(wake);
    }

    /// Says in the HA log when the group has no member serving, every
    /// [`OUTAGE_SUMMARY`] while that lasts, and when it serves again and
    /// after how long: the operator's view of the group as a whole. Called
    /// as members fail and rejoin, so that an outage shorter than the
    /// watchdog's tick is told too, and by the watchdog, for the summary
    /// and for members that start serving by other paths.
    ///
    /// When an outage begins, every failed member is due an attempt at
    /// once, where a recovery thread runs (which this wakes): its last
    /// attempt may have ended just before, while another member served,
    /// and until the next -- up to `AutoReconnectInterval` later -- no
    /// member was being brought back, so every call failed at once (in
    /// the long chaos run, seed 42, 22,184 calls in 62 ms, before the
    /// next recovery tick). Calls wait for those attempts
    /// ([`Group::wait_for_serving`]).
    pub fn review_serving(&self, now: Instant) {
        self.wake_waiting_calls();
        let serving = self.up_members().next().is_some();
        let mut outage = self.outage.lock();
        match (serving, outage.as_mut()) {
            (false, None) => {
                *outage = Some(Outage {
                    since: now,
                    reported: now,
                });
                drop(outage);
                if let Some(wake) = self.wake_recovery.get() {
                    for member in &self.members {
                        if member.state() == MemberState::Down {
                            member.attempt_due.store(true, Ordering::Release);
                        }
                    }
                    wake();
                }
                self.log_change(
                    None,
                    "no member serving: calls on the group fail until a member returns",
                );
            }
            (false, Some(o)) if now.saturating_duration_since(o.reported) >= OUTAGE_SUMMARY => {
                o.reported = now;
                let lasted = now.saturating_duration_since(o.since).as_secs();
                drop(outage);
                self.log(None, &format!("still no member serving after {lasted} s"));
            }
            (true, Some(o)) => {
                let lasted = now.saturating_duration_since(o.since).as_secs_f64();
                *outage = None;
                drop(outage);
                self.log_change(
                    None,
                    &format!("serving again after {lasted:.1} s without a serving member"),
                );
            }
            _ => {}
        }
    }

    /// For an application call that found no member serving: while a
    /// member is being brought back ([`Member::expected_back`]: an attempt
    /// for it is due at once, as every failed member's is when the outage
    /// begins, or under way -- its token being looked for, or the member
    /// catching up -- or, once its token answered, between the attempts of
    /// its run, the next of which the call makes due at once:
    /// [`Group::hurry_attempts_between`]), waits for a member to serve, for
    /// what is left of the
    /// call's [`Waits`] (one `memberTimeout` for all its waits); true if
    /// one serves, at once if one does now. It stops waiting, and answers
    /// false, as soon as no member is being brought back any more (each
    /// attempt failed: with every member gone, calls fail once each
    /// member's attempt in the outage has failed to find its token), the
    /// call has waited its `memberTimeout`, or the group closes
    /// ([`Group::stop_waiting`]), so the call fails as it would have. Most
    /// outages are a returning member's last second of catching up, or a
    /// failed member's next attempt; failing at once, each cost the
    /// application a burst of failed calls.
    ///
    /// The caller holds nothing recovery waits for: no write barrier
    /// ([`Group::enter_write`]), no object being made, no session lock.
    pub fn wait_for_serving(&self, waits: &mut Waits) -> bool {
        if self.up_members().next().is_some() {
            return true;
        }
        if waits.0.is_none() {
            self.hurry_attempts_between();
        }
        let left = *waits.0.get_or_insert(self.settings.member_timeout);
        if left.is_zero() {
            return false;
        }
        let deadline = crate::clock::now() + left;
        self.serving_wait().waiting += 1;
        let served = loop {
            // Outside the lock, which recovery takes to wake this call: on
            // the simulation's clock, the recovery thread's rounds run in
            // here ([`crate::clock::ManualClock::on_block`]).
            let left = crate::clock::block_for(deadline);
            let wait = self.serving_wait();
            if self.up_members().next().is_some() {
                break true;
            }
            let returning = self.members.iter().any(|m| m.expected_back());
            if wait.closed || !returning || left.is_zero() {
                break false;
            }
            drop(
                self.serving_changed
                    .wait_timeout(wait, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        };
        self.serving_wait().waiting -= 1;
        waits.0 = Some(deadline.saturating_duration_since(crate::clock::now()));
        served
    }

    /// For a call about to wait for a member to serve, the first time:
    /// the next attempt of each member between the attempts of its run
    /// (its token answered, the member fell short) is made due at once,
    /// where a recovery thread runs. The gap is `AutoReconnectInterval`,
    /// which may outlast the call's wait (one `memberTimeout`): a call
    /// then waited its whole `memberTimeout` for an attempt it could
    /// never see -- with every token crashed since (simulation seed
    /// 12002973). Each call hurries them once, so attempts come no more
    /// often than calls that wait for them.
    fn hurry_attempts_between(&self) {
        let Some(wake) = self.wake_recovery.get() else {
            return;
        };
        let mut hurried = false;
        for member in &self.members {
            if member.state() == MemberState::Down
                && member.attempt_under_way.load(Ordering::Acquire) > 0
                && !member.attempt_due()
            {
                member.attempt_due.store(true, Ordering::Release);
                hurried = true;
            }
        }
        if hurried {
            wake();
        }
    }

    /// Makes the next attempt for a failed member due at once, where a
    /// recovery thread runs: its attempt has waited at least
    /// `AutoReconnectInterval` for a library that did not answer
    /// ([`crate::recovery`]'s `find_token`).
    pub fn attempt_at_once(&self, position: usize) {
        let member = &self.members[position];
        let Some(wake) = self.wake_recovery.get() else {
            return;
        };
        if member.state() == MemberState::Down {
            member.attempt_due.store(true, Ordering::Release);
            wake();
        }
    }

    /// How many application calls wait for a member to serve now.
    pub fn calls_waiting_for_a_member(&self) -> usize {
        self.serving_wait().waiting
    }

    /// Wakes the calls waiting for a member to serve, to look again: a
    /// member started or stopped serving or being brought back.
    pub fn wake_waiting_calls(&self) {
        // Taken, so that a call between its look and its wait is not missed.
        drop(self.serving_wait());
        self.serving_changed.notify_all();
    }

    /// `C_Finalize`: calls waiting for a member to serve fail now, and no
    /// call waits from now on.
    pub fn stop_waiting(&self) {
        self.serving_wait().closed = true;
        self.serving_changed.notify_all();
    }

    fn serving_wait(&self) -> std::sync::MutexGuard<'_, ServingWait> {
        self.serving_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether every member found is a Luna partition of one library
    /// instance that clones private keys: keys then move by cloning alone,
    /// and the group needs no domain key.
    pub fn all_members_clone(&self) -> bool {
        let found: Vec<(Location, Capabilities)> = self
            .members
            .iter()
            .filter_map(|m| m.location().map(|l| (l, m.capabilities())))
            .collect();
        found.iter().all(|(location, capabilities)| {
            capabilities.cloning.is_some()
                && capabilities.private_key_cloning
                && same_library(&*location.library, &*found[0].0.library)
        })
    }

    /// Runs `calls` on the member's utility session (see [`Member`]), opened
    /// now if the member has none in its current epoch. One caller at a
    /// time: a search holds the session until it ends. A member that faults
    /// while it opens is taken out of service.
    pub fn on_utility<T>(
        &self,
        position: usize,
        calls: impl FnOnce(&MemberSession) -> T,
    ) -> Result<T> {
        let member = &self.members[position];
        let mut utility = member.utility.lock();
        let epoch = member.epoch();
        if utility.as_ref().is_none_or(|s| s.epoch != epoch) {
            let location = member
                .location()
                .filter(|_| member.reachable())
                .ok_or(Error::new(CKR_DEVICE_ERROR))?;
            let guard = member.begin_call();
            let opened = retry_result_while_busy("C_OpenSession", || {
                open_member_session(
                    Arc::clone(&location.library),
                    location.slot,
                    CKF_SERIAL_SESSION | CKF_RW_SESSION,
                    epoch,
                )
            });
            drop(guard);
            match opened {
                Ok(session) => *utility = Some(self.unless_login_lost(position, session)?),
                Err(e) => {
                    if is_member_fault("C_OpenSession", e.rv) {
                        self.member_failed(position, "C_OpenSession", e.rv);
                    }
                    return Err(e);
                }
            }
        }
        let session = utility.as_ref().ok_or(Error::new(CKR_DEVICE_ERROR))?;
        let _in_flight = member.begin_call();
        Ok(crate::member::on_connection(session.connection, || {
            calls(session)
        }))
    }

    /// Searches member `position` for `print` on its utility session. A
    /// member fault in the search takes the member out of service, as on any
    /// other session: a utility session its token dropped unseen (it
    /// restarted between two calls) would otherwise fail every search, and
    /// every recovery that reads the member, for good.
    pub fn find_on_utility(
        &self,
        position: usize,
        print: &Fingerprint,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        self.on_utility(position, |s| self.find_on(position, s, print))?
            .map_err(|rv| {
                if is_member_fault("C_FindObjects", rv) {
                    self.member_failed(position, "C_FindObjects", rv);
                }
                Error::new(rv)
            })
    }

    /// The objects on member `position` that a search for `print` would
    /// find: from the member's index once it has one, else by a search of
    /// the member. After [`SEARCHES_BEFORE_INDEX`] searches the index is
    /// read, so enumerating a large token costs one read of each object,
    /// not a search of the whole token per object.
    pub fn look_up(&self, position: usize, print: &Fingerprint) -> Result<Vec<CK_OBJECT_HANDLE>> {
        let epoch = self.members[position].epoch();
        {
            let mut state = self.index_state(position, epoch);
            if state.index.is_none() && state.searches >= SEARCHES_BEFORE_INDEX {
                let hidden = self.domain.found(position, epoch).flatten();
                state.index = self.on_utility(position, |s| {
                    self.may_search(position, s)
                        .then(|| MemberIndex::read(&*s.library, s.handle, hidden))
                        .flatten()
                })?;
            }
            match &state.index {
                Some(index) => {
                    let found = index.matching(print);
                    if !found.is_empty() {
                        return Ok(found);
                    }
                }
                None => state.searches += 1,
            }
        }
        let found = self.find_on_utility(position, print)?;
        if let [one] = found[..] {
            let mut state = self.index_state(position, epoch);
            if let Some(index) = state.index.as_mut() {
                index.insert(one, print.clone());
            }
        }
        Ok(found)
    }

    /// The fingerprint of a member's object, where its index knows it.
    pub fn indexed_fingerprint(
        &self,
        position: usize,
        handle: CK_OBJECT_HANDLE,
    ) -> Option<Arc<Fingerprint>> {
        let epoch = self.members[position].epoch();
        self.index_state(position, epoch)
            .index
            .as_ref()?
            .fingerprint(handle)
    }

    /// Forgets an object removed from a member.
    pub fn forget_object(&self, position: usize, handle: CK_OBJECT_HANDLE) {
        let epoch = self.members[position].epoch();
        let mut state = self.index_state(position, epoch);
        state.changes += 1;
        if let Some(index) = state.index.as_mut() {
            index.remove(handle);
        }
    }

    /// Forgets every object handle of a member (it restarted, or logged
    /// out: SoftHSM numbers private objects anew at the next login) -- its
    /// domain key's too: kept, a token that restarted unseen after a
    /// logout showed its domain key under its new handle through the
    /// virtual slot, the key's old handle taken for it (simulation seed
    /// 20293617).
    pub fn forget_handles(&self, position: usize) {
        self.held_before[position]
            .lock()
            .extend(self.objects.held_by(position));
        self.objects.forget_member(position);
        self.domain.forget(position);
        let epoch = self.members[position].epoch();
        self.indexes[position].lock().reset(epoch);
    }

    /// For member `position`'s answer that a handle the group holds there,
    /// looked up in `era`, is invalid while its login stands: whether its
    /// handles went stale unseen -- its token numbered its objects anew
    /// with no session of ours open to notice (a restart between the
    /// application's sessions) -- and are forgotten, to be looked up
    /// afresh. Taken at its word, an operation with a key every member
    /// holds failed with `CKR_KEY_HANDLE_INVALID`. Once per era: handles
    /// looked up since the last such forgetting are the token's own, and
    /// its answer stands; handles forgotten since `era` are looked up
    /// afresh anyway.
    pub fn handles_went_stale(&self, position: usize, era: crate::object::Era) -> bool {
        let mut forgotten = self.members[position].stale_handles_forgotten.lock();
        if self.objects.moved_on(era) {
            return true;
        }
        if *forgotten == Some(era) {
            return false;
        }
        self.forget_handles(position);
        *forgotten = Some(self.objects.era(position));
        drop(forgotten);
        self.log(
            Some(position),
            "member answered that a handle the group holds there is invalid: its object \
             handles are looked up afresh (its token may have restarted unseen)",
        );
        true
    }

    /// The group's token objects that member `position` was seen to hold
    /// before its handles were last forgotten, less those since gone from
    /// the group or looked for there and not found: what a returning member
    /// whose token kept its objects still holds, without reading them all.
    /// (Session objects end with their sessions.)
    pub fn held_before(&self, position: usize) -> rustc_hash::FxHashSet<CK_OBJECT_HANDLE> {
        let mut held = self.held_before[position].lock();
        held.retain(|object| {
            self.objects.get(*object).is_some_and(|o| {
                o.owner.is_none()
                    && matches!(o.on[position], Presence::Unknown | Presence::Present(_))
            })
        });
        held.clone()
    }

    /// Every object member `position` was seen to hold before its handles
    /// were last forgotten, as recorded: unlike [`Self::held_before`],
    /// which drops session objects for good, a reading that leaves the set
    /// as it is -- a member that lost its login keeps its sessions, and
    /// their objects ([`Self::holds_unrecorded`] needs them: dropped by an
    /// earlier reading, a session object found there after the login
    /// came back was named anew, simulation seed 140005).
    pub fn held_before_as_recorded(
        &self,
        position: usize,
    ) -> rustc_hash::FxHashSet<CK_OBJECT_HANDLE> {
        self.held_before[position].lock().clone()
    }

    /// Whether member `position` may hold objects of the group under
    /// handles not recorded since its handles were forgotten: those it was
    /// seen to hold before, still not found there. A recovery that counted
    /// its objects instead of reading them leaves them so, and a search
    /// there that named what it found without identifying it made a second
    /// virtual object for each (an object twice in one search, seed
    /// 1027641). Those found since leave the set, so a member whose
    /// objects are all found again costs nothing more.
    pub fn holds_unrecorded(&self, position: usize) -> bool {
        let mut held = self.held_before[position].lock();
        if held.is_empty() {
            return false;
        }
        self.objects.keep_unknown_on(position, &mut held);
        !held.is_empty()
    }

    /// `objects` were made on another member by a call whose earlier
    /// attempt on member `position` lost its answer: a like object there is
    /// what that attempt may have made ([`Pending::Orphans`]), never their
    /// copy -- they came after it ([`Group::made_after_orphans`]).
    pub fn note_made_after_orphans(&self, position: usize, objects: &[CK_OBJECT_HANDLE]) {
        self.made_after_orphans[position]
            .lock()
            .extend(objects.iter().copied());
    }

    /// Whether `object` was made after an attempt on member `position` left
    /// orphans there ([`Group::note_made_after_orphans`]) and the member
    /// was never seen to hold a copy of it (recorded now, or before its
    /// handles were forgotten): a like object on it does not make that
    /// object's removal spare it. A generated EC private key's print holds
    /// nothing of its value, so the first attempt's key passed for the
    /// group's there -- the key of another pair (simulation seed 39013).
    /// A copy the group gave it and lost the answer of goes too; the copy
    /// queued behind makes it again (read from the queue's order, not
    /// shown by a schedule).
    pub fn made_after_orphans(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        {
            let mut made_after = self.made_after_orphans[position].lock();
            made_after.retain(|o| self.objects.get(*o).is_some());
            if !made_after.contains(&object) {
                return false;
            }
        }
        let held_now = (self.objects.get(object))
            .is_some_and(|o| matches!(o.on[position], Presence::Present(_)));
        !held_now && !self.held_before[position].lock().contains(&object)
    }

    /// Object `object` was made on member `position` under a handle
    /// forgotten since: it counts among the objects the member may hold
    /// under handles not recorded ([`Self::holds_unrecorded`]) until found
    /// there by its fingerprint.
    pub fn made_under_forgotten_handle(&self, position: usize, object: CK_OBJECT_HANDLE) {
        self.held_before[position].lock().insert(object);
    }

    /// Every object not found on a member is looked for there again
    /// ([`ObjectTable::retry_absent`]; after a login, a private one was not
    /// visible while logged out; after a return, a copy may have landed)
    /// and, until found, counts among those the member may hold under
    /// handles not recorded ([`Self::holds_unrecorded`]): an enumeration
    /// after the login named a private key it found unidentified, a second
    /// object (simulation seed 31688468). Not one made after an attempt
    /// left orphans there and never seen there: a like object there is the
    /// orphan ([`Self::made_after_orphans`]), and counted as maybe held,
    /// it passed for the group's copy -- a generated private key's print
    /// holds nothing of its value -- and the member kept the other pair's
    /// key (simulation seed 2226665, the application logged out at the
    /// member's return and in again).
    pub fn retry_absent(&self) {
        for (position, object) in self.objects.retry_absent() {
            if !self.made_after_orphans(position, object) {
                self.held_before[position].lock().insert(object);
            }
        }
    }

    /// To take before reading member `position`'s objects into an index
    /// for [`Group::adopt_index`].
    pub fn index_ticket(&self, position: usize) -> IndexTicket {
        let epoch = self.members[position].epoch();
        let state = self.index_state(position, epoch);
        IndexTicket {
            position,
            epoch,
            changes: state.changes,
        }
    }

    /// Takes an index of a member read elsewhere (reconciliation reads
    /// every member), so that its look-ups need no search of its token and
    /// no second reading of it -- unless the member's handles changed or
    /// objects left it since `ticket` was taken. An object made meanwhile
    /// is not in it and is searched for, as any object the index lacks.
    /// Only while the group's utility session keeps the member's handles as
    /// they were read (in use now, it is open). True if taken.
    pub fn adopt_index(&self, ticket: IndexTicket, index: MemberIndex) -> bool {
        let member = &self.members[ticket.position];
        let epoch = member.epoch();
        let held_open = member
            .utility
            .try_lock()
            .is_none_or(|utility| utility.as_ref().is_some_and(|s| s.epoch == epoch));
        let mut state = self.index_state(ticket.position, epoch);
        let current = held_open && ticket.epoch == epoch && ticket.changes == state.changes;
        if current {
            state.index = Some(index);
        }
        current
    }

    fn index_state(&self, position: usize, epoch: u64) -> parking_lot::MutexGuard<'_, IndexState> {
        let mut state = self.indexes[position].lock();
        if state.epoch != epoch {
            state.reset(epoch);
        }
        state
    }

    /// Opens the utility session of every member that serves and has none
    /// yet, before anything of theirs is cached.
    pub fn open_utility_sessions(&self) {
        for member in self.up_members() {
            let _ = self.on_utility(member.position, |_| ());
        }
    }

    /// Marks `object`, which the group knows already, as still being made
    /// by the call under way until the guard drops: that call gives it to
    /// the members that lack it, or removes it from every member it knows
    /// of if it fails (`VirtualTokenNNMinReplicas`), so synchronisation
    /// leaves it alone ([`Group::queued_objects`]). A copy synchronisation
    /// made meanwhile was no copy that call knew of, and stayed behind on
    /// a returning member when it failed.
    pub fn making_object(&self, object: CK_OBJECT_HANDLE) -> Unfinished<'_> {
        self.unfinished.lock().push(object);
        Unfinished {
            objects: &self.unfinished,
            object,
        }
    }

    /// Records, until the guard drops, that a call imports `object`, made
    /// from a template with `print`: a kept removal of a like object waits
    /// for it ([`Group::importing_like`]).
    pub fn importing(&self, object: CK_OBJECT_HANDLE, print: Fingerprint) -> Importing<'_> {
        self.importing.lock().push((object, print));
        Importing {
            prints: &self.importing,
            object,
        }
    }

    /// Whether a call imports an object like the one `print` removes
    /// ([`Group::importing`]). Its copy, made on a member before the call
    /// records it or keeps its fingerprint, would pass there for the
    /// removed object: the removal of an abandoned first try's copy,
    /// replayed beside the retry, removed the retry's, and the
    /// application was told of an object no member held (simulation seed
    /// 1574769).
    pub fn importing_like(&self, print: &Fingerprint) -> bool {
        (self.importing.lock().iter()).any(|(_, template)| identity::matches(print, template))
    }

    /// Whether a call is still making `object` ([`Group::making_object`]).
    pub fn unfinished(&self, object: CK_OBJECT_HANDLE) -> bool {
        self.unfinished.lock().contains(&object)
    }

    /// Marks a call that makes objects (and replicates them, or undoes them
    /// everywhere) as under way until the guard drops: reconciliation copies
    /// nothing meanwhile, since it could copy an object such a call is
    /// about to copy itself or to undo.
    pub fn making_objects(&self) -> Making<'_> {
        self.making.fetch_add(1, Ordering::SeqCst);
        Making(&self.making)
    }

    /// Whether a call making objects is under way.
    pub fn objects_being_made(&self) -> bool {
        self.making.load(Ordering::SeqCst) > 0
    }

    /// Records, for processes that come later, that the object with `print`
    /// was deleted while some member could not be told: they remove it from
    /// that member rather than copy it back (see `reconcile.rs`).
    pub fn record_deletion(&self, print: &Fingerprint) {
        let Some(state) = self.state.get() else {
            return;
        };
        if let Err(e) = state.record_deletion(&self.serial, print) {
            let event = format!(
                "a deletion that a member missed could not be recorded in {} ({e}); a later \
                 process may copy the object back to that member",
                state.path().display()
            );
            eprintln!("pkcs11-ha: group {}: {event}", self.label);
            self.log(None, &event);
        }
    }

    /// Records a group event in the HA log.
    pub fn log(&self, position: Option<usize>, event: &str) {
        let member = position.map(|p| self.members[p].serial.as_str());
        crate::halog::record(&self.label, &self.serial, member, event);
    }

    /// Records a change of the group's or a member's state in the HA log,
    /// never left out as a repeat.
    pub fn log_change(&self, position: Option<usize>, event: &str) {
        let member = position.map(|p| self.members[p].serial.as_str());
        crate::halog::record_change(&self.label, &self.serial, member, event);
    }

    /// Queues a change for a member that is down or coming back. A member
    /// that serves gets nothing queued, since nothing replays the queue of a
    /// member that serves: the change is handed back, to be made on it now.
    /// Decided under the same lock as [`Group::rejoin`].
    pub fn queue_unless_up(
        &self,
        position: usize,
        change: Pending,
    ) -> std::result::Result<(), Pending> {
        let mut pending = self.pending.lock();
        if self.members[position].is_up() {
            return Err(change);
        }
        pending[position].push(change);
        Ok(())
    }

    /// Drops every queued and kept change, zeroizing the imported key values they
    /// hold (`OwnedTemplate` zeroizes on drop): at `C_Finalize` nothing
    /// will replay them.
    pub fn drop_pending(&self) {
        for queue in self.pending.lock().iter_mut() {
            queue.clear();
        }
        for kept in self.deferred.lock().iter_mut() {
            kept.clear();
        }
    }

    /// Takes the changes a member missed, to replay them in order.
    pub fn take_pending(&self, position: usize) -> Vec<Pending> {
        std::mem::take(&mut self.pending.lock()[position])
    }

    /// Keeps a change the member missed for after it serves (see
    /// `deferred`).
    pub fn defer(&self, position: usize, change: Pending) {
        self.deferred.lock()[position].push(change);
    }

    /// Keeps `change`, taken from those kept for member `position` and not
    /// made, again, behind what is kept for the member -- with every later
    /// change of its object, in their order, taken out of the replay's
    /// share (`left` is what is still to be taken of it) -- so that a
    /// member's changes of one object stay in the order they were made:
    /// moved alone behind a newer change of attributes, an older one
    /// undid it (simulation seeds 1016443, 2011372). Returns how many
    /// changes went behind.
    pub fn defer_again(&self, position: usize, change: Pending, left: &mut usize) -> usize {
        let mut deferred = self.deferred.lock();
        let kept = &mut deferred[position];
        let Some(object) = change.made_object() else {
            kept.push(change);
            return 1;
        };
        let (later, others): (Vec<_>, Vec<_>) = (std::mem::take(kept).into_iter().enumerate())
            .partition(|(_, c)| c.made_object() == Some(object));
        *left -= later.iter().filter(|(at, _)| at < left).count();
        *kept = others.into_iter().map(|(_, c)| c).collect();
        let count = 1 + later.len();
        kept.push(change);
        kept.extend(later.into_iter().map(|(_, c)| c));
        count
    }

    /// Whether a removal kept for member `position` finds a copy with
    /// fingerprint `print` there -- by the removal's print, or by the print
    /// from before a change of attributes of that object kept ahead of it
    /// (the copy has not had the change): the copy of an object destroyed
    /// while the member was owed its removal.
    pub fn kept_removal_finds(&self, position: usize, print: &Fingerprint) -> bool {
        let deferred = self.deferred.lock();
        let kept = &deferred[position];
        let removed_by_kept_removal = |object: &CK_OBJECT_HANDLE| {
            kept.iter().any(
                |change| matches!(change, Pending::Destroy { object: Some(o), .. } if o == object),
            )
        };
        kept.iter().any(|change| match change {
            Pending::Destroy { print: removed, .. } => identity::matches(removed, print),
            Pending::Set { object, before, .. } => {
                identity::matches(before, print) && removed_by_kept_removal(object)
            }
            _ => false,
        })
    }

    /// The fingerprints of the removals of destroyed objects kept for
    /// member `position` ([`Pending::destroyed`]): a change making an
    /// object they could match waits behind them
    /// ([`crate::virtual_session::VirtualSession::behind_a_removal`]).
    pub fn deferred_removals(&self, position: usize) -> Vec<crate::identity::Fingerprint> {
        self.deferred.lock()[position]
            .iter()
            .filter_map(Pending::destroyed)
            .cloned()
            .collect()
    }

    /// Synchronisation skips key `object`, which cannot reach member
    /// `position` (`why`, from [`crate::virtual_session::VirtualSession::unreceivable`]):
    /// the HA log names the key the first time, and a copy that waits only
    /// for a library to take the key-wrap mechanism again (`waits`) is
    /// kept, once, for when it does.
    pub fn skip_unreceivable(
        &self,
        position: usize,
        object: CK_OBJECT_HANDLE,
        name: impl FnOnce() -> String,
        why: &str,
        waits: bool,
    ) {
        if waits {
            let mut deferred = self.deferred.lock();
            let kept = &mut deferred[position];
            if !kept
                .iter()
                .any(|c| matches!(c, Pending::Create(o) if *o == object))
            {
                kept.push(Pending::Create(object));
            }
        }
        if self.unreceivable.lock()[position].insert(object) {
            let event = format!(
                "{} is not synchronised to it: {why}; the member serves without it",
                name()
            );
            self.log(Some(position), &event);
        }
    }

    /// The template prints of removals of orphans kept for a member, which
    /// could not tell an object there from the group's copy: objects there
    /// matching them may be orphans.
    pub fn undecided_orphans(&self, position: usize) -> Vec<Fingerprint> {
        self.deferred.lock()[position]
            .iter()
            .filter_map(|change| match change {
                Pending::Orphans(print) => Some(print.clone()),
                _ => None,
            })
            .collect()
    }

    /// Keeps `change` for serving member `position`, to be made at the
    /// next recovery round: an object it refused while another took it
    /// (tried again then), or a change for a member catching up
    /// ([`Group::catching_up`]).
    pub fn keep_for_next_round(&self, position: usize, change: Pending) {
        self.defer(position, change);
        self.ask_for_kept_replay();
    }

    /// Has the recovery thread replay the kept changes at its next round.
    pub fn ask_for_kept_replay(&self) {
        self.kept_replay_asked.store(true, Ordering::Release);
    }

    /// Whether [`Group::keep_for_next_round`] or [`Group::ask_for_kept_replay`]
    /// was called since the last call.
    pub fn kept_replay_asked(&self) -> bool {
        self.kept_replay_asked.swap(false, Ordering::AcqRel)
    }

    /// Whether serving member `position` is being given the changes kept
    /// for it (a member that served first, or a backlog kept while no
    /// member served): changes meant for it now join them, behind, rather
    /// than wait on its connection behind the replay -- made there in
    /// place, each write of the application waited for one of the replay's
    /// changes on every such member, which halved the writers' rate in the
    /// long chaos run (946 keys against 1,977 at the same load).
    pub fn catching_up(&self, position: usize) -> bool {
        let deferred = self.deferred.lock();
        let replay = self.kept_replay.lock();
        self.members[position].is_up()
            && (replay.due[position] || replay.running)
            && (!deferred[position].is_empty() || !replay.making[position].is_empty())
    }

    /// Whether changes are kept for any member (see `deferred`).
    pub fn has_deferred(&self) -> bool {
        self.deferred.lock().iter().any(|kept| !kept.is_empty())
    }

    /// Whether the changes kept for serving members are due a try that
    /// nothing asked for: each is tried again at every return and login,
    /// and one that waited for something else (an object in doubt decided,
    /// a source's copy found) would stay kept for good in a group with
    /// every member serving and the application logged in. So while any
    /// is kept and the application is logged in (logged out, its next
    /// login replays them), they are tried again after
    /// [`KEPT_RETRY_FIRST`], then after twice as long each time, up to
    /// [`KEPT_RETRY_LONGEST`]: a backstop, which in the long chaos runs
    /// since has made nothing (the HA log would say).
    pub fn kept_retry_due(&self, now: Instant) -> bool {
        let logged_in = self.login.lock().is_some();
        let kept_for_serving = {
            let deferred = self.deferred.lock();
            self.up_members().any(|m| !deferred[m.position].is_empty())
        };
        let mut replay = self.kept_replay.lock();
        if !logged_in || !kept_for_serving {
            replay.retry_at = None;
            replay.retry_after = KEPT_RETRY_FIRST;
            return false;
        }
        let wait = replay.retry_after;
        if replay.running || replay.due.iter().any(|due| *due) {
            // A return's replay is under way or about to begin: the wait
            // counts from its end.
            replay.retry_at = Some(now + wait);
            return false;
        }
        let at = *replay.retry_at.get_or_insert(now + wait);
        if now < at {
            return false;
        }
        replay.retry_at = None;
        replay.retry_after = (replay.retry_after * 2).min(KEPT_RETRY_LONGEST);
        true
    }

    /// A replay made kept changes: the unasked retries start again from
    /// the shortest wait.
    pub fn kept_changes_made(&self) {
        let mut replay = self.kept_replay.lock();
        replay.retry_at = None;
        replay.retry_after = KEPT_RETRY_FIRST;
    }

    /// Keeps, for the replay of kept changes, changes found queued for a
    /// member that serves -- which nothing replays: a member rejoins only
    /// with its queue empty, and nothing is queued for one that serves
    /// ([`Group::queue_unless_up`]), so each is a change a replay put back
    /// as its member failed that the member's return did not see. The HA
    /// log names them; true if there were any.
    pub fn keep_queued_of_serving(&self) -> bool {
        let mut found = Vec::new();
        {
            let mut pending = self.pending.lock();
            for member in self.members.iter().filter(|m| m.is_up()) {
                let queue = std::mem::take(&mut pending[member.position]);
                if !queue.is_empty() {
                    found.push((member.position, queue.len()));
                    self.deferred.lock()[member.position].extend(queue);
                }
            }
        }
        for (position, count) in &found {
            self.log(
                Some(*position),
                &format!(
                    "{count} changes were queued for it while it served, where no replay \
                     takes them: kept, to be made now"
                ),
            );
        }
        !found.is_empty()
    }

    /// Held while the changes kept for the members are made, one replay at
    /// a time: a login's replay waits for a returning member's, whose
    /// changes, tried while logged out, are kept again -- beside it, the
    /// login's replay found none and they waited for the next login.
    pub fn replaying_deferred(&self) -> ReplayingDeferred<'_> {
        self.begin_replaying_deferred(self.replaying_deferred.lock())
    }

    /// [`Group::replaying_deferred`] unless another replay runs: a retry
    /// nobody asked for ([`Group::kept_retry_due`]) does not queue behind
    /// a return's replay, which makes what it would.
    pub fn replaying_deferred_if_idle(&self) -> Option<ReplayingDeferred<'_>> {
        let one_at_a_time = self.replaying_deferred.try_lock()?;
        Some(self.begin_replaying_deferred(one_at_a_time))
    }

    fn begin_replaying_deferred<'a>(
        &'a self,
        one_at_a_time: parking_lot::MutexGuard<'a, ()>,
    ) -> ReplayingDeferred<'a> {
        let mut replay = self.kept_replay.lock();
        replay.running = true;
        replay.due.iter_mut().for_each(|d| *d = false);
        ReplayingDeferred {
            group: self,
            _one_at_a_time: one_at_a_time,
        }
    }

    /// How many changes are kept for member `position`: those a replay
    /// takes ([`Group::next_deferred`]) before any it keeps again.
    pub fn kept_count(&self, position: usize) -> usize {
        self.deferred.lock()[position].len()
    }

    /// The next change kept for member `position`, to be made now, counted
    /// as undelivered until [`Group::deferred_handled`]: one making an
    /// object a call waits for ([`Group::wait_for_kept`]) -- among all kept
    /// for the member, its share of the replay or not, but for the objects
    /// in `kept_again`; of the call that has waited longest, whose wait
    /// ends first -- if no removal comes before it, else the first;
    /// with no such object, the first of the first `left` (the member's
    /// share, counted down as it is taken). Changes making objects depend
    /// on none of each other; a removal must come before an object made
    /// after it.
    pub fn next_deferred(
        &self,
        position: usize,
        left: &mut usize,
        kept_again: &[CK_OBJECT_HANDLE],
    ) -> Option<Pending> {
        let mut deferred = self.deferred.lock();
        let kept = &mut deferred[position];
        let window = (*left).min(kept.len());
        let mut replay = self.kept_replay.lock();
        let wanted = |c: &Pending| wanted_change(&replay.wanted, position, kept_again, c);
        // `wanted` in the order the calls began to wait.
        let waited_since = |c: &Pending| {
            let object = c.made_object();
            (replay.wanted.iter()).position(|(p, o)| *p == position && Some(*o) == object)
        };
        let at = if kept.iter().any(wanted) {
            (kept.iter().enumerate())
                .take_while(|(_, c)| c.removal().is_none())
                .filter(|(_, c)| wanted(c))
                .min_by_key(|(_, c)| waited_since(c))
                .map_or(0, |(at, _)| at)
        } else if window > 0 {
            0
        } else {
            *left = 0;
            return None;
        };
        let change = kept.remove(at);
        *left = if at < window { window - 1 } else { window };
        replay.making[position] = change.made_object().into_iter().collect();
        self.deferred_underway[position].fetch_add(1, Ordering::Relaxed);
        Some(change)
    }

    /// The imports at the front of the first `left` changes kept for member
    /// `position`, each object once, at most `longest`, taken as one run
    /// (made at once on spares, counted as undelivered until
    /// [`Group::deferred_handled`]) -- if they are `shortest` or more and
    /// no call waits for an object kept for the member but for those of
    /// `kept_again` (that object goes first: [`Group::next_deferred`]);
    /// else `None`, nothing taken. Imports depend on none of each other; a
    /// change of any other kind ends the run, as it must come after the
    /// imports before it and before those after it.
    pub fn next_kept_imports(
        &self,
        position: usize,
        left: &mut usize,
        kept_again: &[CK_OBJECT_HANDLE],
        (shortest, longest): (usize, usize),
    ) -> Option<Vec<Pending>> {
        // Read first: lock order in-doubt, then deferred.
        let doubts = self.doubted(position);
        let mut deferred = self.deferred.lock();
        let kept = &mut deferred[position];
        let window = (*left).min(kept.len());
        let mut replay = self.kept_replay.lock();
        let wanted = |c: &Pending| wanted_change(&replay.wanted, position, kept_again, c);
        if kept.iter().any(wanted) {
            return None;
        }
        // An import of an object in doubt there is made on its own, once
        // the doubt is settled ([`Group::doubt_ahead`]).
        let mut objects = Vec::new();
        for change in kept[..window.min(longest)].iter() {
            match change {
                Pending::Import(object, _)
                    if !objects.contains(object) && !doubts.contains(object) =>
                {
                    objects.push(*object)
                }
                _ => break,
            }
        }
        if objects.len() < shortest {
            return None;
        }
        let run: Vec<Pending> = kept.drain(..objects.len()).collect();
        *left = window - run.len();
        self.deferred_underway[position].fetch_add(run.len(), Ordering::Relaxed);
        replay.making[position] = objects;
        Some(run)
    }

    /// Puts `changes` taken by [`Group::next_kept_imports`] and not made
    /// back at the front of those kept for member `position`, in their
    /// order: ahead of the changes that came after them.
    pub fn return_kept(&self, position: usize, changes: Vec<Pending>) {
        let mut deferred = self.deferred.lock();
        deferred[position].splice(0..0, changes);
    }

    /// The first `count` changes kept for member `position`, taken, with
    /// every later change of an object they or those of `failed` make or
    /// change, and every later removal:
    /// the rest of a replay that the member failed in, to be replayed
    /// before it serves again. Left kept, such a later change came ahead
    /// of them, which the member's replay then kept behind it (simulation
    /// seed 18656: an older change of attributes undid a newer one); a
    /// removal, which names no object, only a fingerprint, was made before
    /// the changes of ID taken back ahead of it, looked the copy up under
    /// the ID they had yet to give it, and left the copy of a destroyed
    /// object (seed 25852752).
    pub fn take_kept(&self, position: usize, failed: &[Pending], count: usize) -> Vec<Pending> {
        let mut deferred = self.deferred.lock();
        let kept = &mut deferred[position];
        let mut taken: Vec<Pending> = kept.drain(..count.min(kept.len())).collect();
        let objects: Vec<CK_OBJECT_HANDLE> = (failed.iter())
            .chain(&taken)
            .filter_map(Pending::made_object)
            .collect();
        let (later, left): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(kept).into_iter().partition(|c| {
                c.removal().is_some() || c.made_object().is_some_and(|o| objects.contains(&o))
            });
        *kept = left;
        taken.extend(later);
        taken
    }

    /// `count` changes taken by [`Group::next_deferred`] are handled: made,
    /// kept again or queued. Calls waiting for an object look again.
    pub fn deferred_handled(&self, position: usize, count: usize) {
        self.deferred_underway[position].fetch_sub(count, Ordering::Relaxed);
        self.kept_replay.lock().making[position].clear();
        self.wake_waiting_calls();
    }

    /// Whether a change kept for member `position` makes `object`, or a
    /// replay is making it now, while a replay is due or under way -- or
    /// will come when asked ([`Group::set_replays_on_request`]), as a call
    /// waiting for the object does ([`Group::wait_for_kept`]).
    fn kept_for(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        let deferred = self.deferred.lock();
        let replay = self.kept_replay.lock();
        let coming = replay.running
            || replay.due[position]
            || self.replays_on_request.load(Ordering::Relaxed);
        coming
            && (replay.making[position].contains(&object)
                || deferred[position]
                    .iter()
                    .any(|c| c.made_object() == Some(object)))
    }

    /// Says whether a recovery thread makes the kept changes calls ask for.
    pub fn set_replays_on_request(&self, on: bool) {
        self.replays_on_request.store(on, Ordering::Relaxed);
    }

    /// See [`Group::set_replays_on_request`].
    pub fn replays_on_request(&self) -> bool {
        self.replays_on_request.load(Ordering::Relaxed)
    }

    /// Says whether work on several members -- a replay of kept changes, an
    /// object made on members that talk to servers -- may run each
    /// member's part in a thread of its own (the provider runs threads),
    /// or takes the members in turns in its caller's thread (the
    /// deterministic simulation, and tests that order the turns).
    pub fn set_members_in_threads(&self, on: bool) {
        self.members_in_threads.store(on, Ordering::Relaxed);
    }

    /// See [`Group::set_members_in_threads`].
    pub fn members_in_threads(&self) -> bool {
        self.members_in_threads.load(Ordering::Relaxed)
    }

    /// Has a call that asks several members for the same thing ask them
    /// at once whatever their libraries, each in turn in the caller's
    /// thread where members do not run in threads: the deterministic
    /// simulation's way to take the answers as they are taken from members
    /// asked at once ([`Group::asks_at_once`]).
    pub fn set_at_once_in_turn(&self, on: bool) {
        self.at_once_in_turn.store(on, Ordering::Relaxed);
    }

    /// Whether a call asking each of `positions` for the same thing asks
    /// them at once ([`Group::on_each_at_once`]): where members may run in
    /// threads, there are several, and one talks to a server -- its round
    /// trip dwarfs starting a thread, which an in-process call does not
    /// (or where [`Group::set_at_once_in_turn`] says so).
    pub fn asks_at_once(&self, positions: &[usize]) -> bool {
        positions.len() > 1
            && (self.at_once_in_turn.load(Ordering::Relaxed)
                || (self.members_in_threads()
                    && positions
                        .iter()
                        .any(|p| self.members[*p].timed.load(Ordering::Relaxed))))
    }

    /// `ask` of each of `positions` at once, each but the first in a
    /// thread of its own (one that cannot be started asks in this thread
    /// after the first) -- in turn in this thread where members do not
    /// run in threads; the answers in the order of `positions`.
    pub fn on_each_at_once<T: Send>(
        &self,
        positions: &[usize],
        ask: impl Fn(usize) -> T + Sync,
    ) -> Vec<T> {
        if !self.members_in_threads() {
            return positions.iter().map(|p| ask(*p)).collect();
        }
        let Some((&first, others)) = positions.split_first() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let ask = &ask;
            let others: Vec<_> = others
                .iter()
                .map(|&p| {
                    std::thread::Builder::new()
                        .spawn_scoped(scope, move || ask(p))
                        .map_err(|_| p)
                })
                .collect();
            let mut answers = vec![ask(first)];
            answers.extend(others.into_iter().map(|other| {
                match other {
                    Ok(thread) => thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(position) => ask(position),
                }
            }));
            answers
        })
    }

    /// For an application call naming `objects`, one of which serving
    /// member `position` lacks: while the member serves first after an
    /// outage and the objects it missed are made on it right after
    /// ([`Group::rejoin`]), waits until those the call names are -- made
    /// before the other kept changes ([`Group::next_deferred`]) -- for
    /// what is left of the call's [`Waits`]. True if it waited and the
    /// call chooses again; false at once if none of `objects` is on its
    /// way to the member. Failing instead, a signature with a key the
    /// member was about to be given failed with `CKR_KEY_HANDLE_INVALID`
    /// (the soak, four runs). Where no replay is due or under way (the
    /// object joined the kept changes after the last one took its share),
    /// it asks for one, which the recovery thread makes at its next look:
    /// failing at once instead, calls failed in the soak with the key kept
    /// for the only serving member and no replay due. A call whose wait
    /// has run out still waits while one of `objects` is being made on the
    /// member -- one member call, or two on each spare of a run of imports
    /// (`Group::next_kept_imports`), each cut by the watchdog within
    /// `memberTimeout` -- rather than be told its key is invalid as the
    /// key arrives (the soak under load, each kept change 0.2-1.5 s: four
    /// of eight waits that ran out did so while their key was being made). The
    /// caller holds nothing the replay waits for (as
    /// [`Group::wait_for_serving`]).
    pub fn wait_for_kept(
        &self,
        position: usize,
        objects: &[CK_OBJECT_HANDLE],
        waits: &mut Waits,
    ) -> bool {
        let on_the_way = || objects.iter().any(|o| self.kept_for(position, *o));
        let being_made = || {
            let replay = self.kept_replay.lock();
            replay.making[position].iter().any(|m| objects.contains(m))
        };
        let left = *waits.0.get_or_insert(self.settings.member_timeout);
        if !on_the_way() || (left.is_zero() && !being_made()) {
            return false;
        }
        let deadline = crate::clock::now() + left;
        // The making under way is one call on the member (a run's calls
        // end at its first fault), which the watchdog cuts within
        // memberTimeout.
        let made_by = deadline + self.settings.member_timeout;
        {
            let mut replay = self.kept_replay.lock();
            replay.wanted.extend(objects.iter().map(|o| (position, *o)));
            if !replay.running && !replay.due[position] {
                self.kept_replay_asked.store(true, Ordering::Release);
            }
        }
        self.serving_wait().waiting_for_kept += 1;
        loop {
            let mut left = crate::clock::block_for(deadline);
            let run_out = left.is_zero();
            if run_out && being_made() {
                left = crate::clock::block_for(made_by);
            }
            let wait = self.serving_wait();
            if wait.closed
                || left.is_zero()
                || (run_out && !being_made())
                || !on_the_way()
                || !self.members[position].is_up()
            {
                break;
            }
            drop(
                self.serving_changed
                    .wait_timeout(wait, left)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
        self.serving_wait().waiting_for_kept -= 1;
        let mut replay = self.kept_replay.lock();
        for object in objects {
            if let Some(i) = replay.wanted.iter().position(|w| *w == (position, *object)) {
                replay.wanted.remove(i);
            }
        }
        drop(replay);
        waits.0 = Some(deadline.saturating_duration_since(crate::clock::now()));
        true
    }

    /// Whether a call waits for an object ([`Group::wait_for_kept`]) that a
    /// change kept for member `position` makes, but for the objects in
    /// `kept_again` ([`Group::next_deferred`]).
    pub fn kept_object_wanted(&self, position: usize, kept_again: &[CK_OBJECT_HANDLE]) -> bool {
        let deferred = self.deferred.lock();
        let replay = self.kept_replay.lock();
        (deferred[position].iter()).any(|c| wanted_change(&replay.wanted, position, kept_again, c))
    }

    /// The objects on their way to member `position`, as
    /// [`Group::wait_for_kept`] counts them.
    pub fn kept_on_the_way(&self, position: usize) -> Vec<CK_OBJECT_HANDLE> {
        let deferred = self.deferred.lock();
        let replay = self.kept_replay.lock();
        if !replay.due[position]
            && !replay.running
            && !self.replays_on_request.load(Ordering::Relaxed)
        {
            return Vec::new();
        }
        deferred[position]
            .iter()
            .filter_map(Pending::made_object)
            .chain(replay.making[position].iter().copied())
            .collect()
    }

    /// How many application calls wait for a kept object
    /// ([`Group::wait_for_kept`]) now.
    pub fn calls_waiting_for_kept_objects(&self) -> usize {
        self.serving_wait().waiting_for_kept
    }

    /// Puts changes a replay could not make back in front of any queued
    /// since, keeping their order.
    pub fn requeue(&self, position: usize, mut changes: Vec<Pending>) {
        let mut pending = self.pending.lock();
        changes.append(&mut pending[position]);
        pending[position] = changes;
    }

    /// Puts a recovering member back in service if, and only if, it has
    /// nothing left to receive and no object in doubt. Under the lock
    /// [`Group::queue_unless_up`] takes, so a change is either queued
    /// before the member serves (and this refuses) or made on it directly:
    /// a member never serves while lacking an object the application was
    /// given -- unless the group had no member serving when it returned
    /// (`recovery::replay_pending` kept the objects for right after; that
    /// replay is due from before the member serves, so that a call naming
    /// one of them waits for it, [`Group::wait_for_kept`]). Lock order:
    /// pending, then in-doubt; pending, then deferred, then the kept
    /// replay's state.
    pub fn rejoin(&self, position: usize) -> bool {
        let rejoined = {
            let pending = self.pending.lock();
            pending[position].is_empty()
                && (self.in_doubt.lock()[position].iter())
                    .all(|(_, since)| since.is_some_and(|s| s.carried_until.is_some()))
                && self.rejoin_with_kept(position)
        };
        if rejoined {
            self.review_serving(crate::clock::now());
        }
        rejoined
    }

    /// [`Member::rejoin`], the kept changes' replay due if it serves.
    fn rejoin_with_kept(&self, position: usize) -> bool {
        let deferred = self.deferred.lock();
        let kept = !deferred[position].is_empty();
        let mut replay = self.kept_replay.lock();
        let due_before = replay.due[position];
        replay.due[position] = due_before || kept;
        let rejoined = self.members[position].rejoin();
        if !rejoined {
            replay.due[position] = due_before;
        }
        rejoined
    }

    /// Enters a call that makes, changes or destroys objects: waits while
    /// a returning member copies its last changes, at most
    /// [`WRITE_BARRIER_WAIT`]; past that the call goes ahead, and its
    /// change is queued for the member as any other.
    pub fn enter_write(&self) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
        self.writes.try_read_for(WRITE_BARRIER_WAIT)
    }

    /// Holds new writes back (see [`Group::enter_write`]) once the writes
    /// under way have ended, waiting for them at most `wait`.
    pub fn hold_writes(&self, wait: Duration) -> Option<parking_lot::RwLockWriteGuard<'_, ()>> {
        self.writes.try_write_for(wait)
    }

    /// Whether new writes are held back now ([`Group::hold_writes`]): a
    /// write entering waits.
    pub fn writes_held(&self) -> bool {
        self.writes.is_locked_exclusive()
    }

    /// Records, before the request goes out, that a call is making
    /// `object` on a member: no recovery can then miss a request that is
    /// cut off.
    pub fn begin_making(&self, position: usize, object: CK_OBJECT_HANDLE) {
        self.in_doubt.lock()[position].push((object, None));
    }

    /// The call making `object` on a member returned: forgotten, unless it
    /// left the object in doubt there (`doubt`) -- then from now on.
    pub fn end_making(&self, position: usize, object: CK_OBJECT_HANDLE, doubt: Doubt) {
        let mut in_doubt = self.in_doubt.lock();
        let entries = &mut in_doubt[position];
        if let Some(i) = entries.iter().position(|e| *e == (object, None)) {
            if doubt == Doubt::None {
                entries.remove(i);
            } else {
                entries[i].1 = Some(DoubtSince {
                    at: crate::clock::now(),
                    cut_off: doubt == Doubt::CutOff,
                    carried_until: None,
                });
            }
        }
    }

    /// What a call making an object on member `position` leaves of it
    /// there: it `faulted`, and was `cut_off` on the wire (or the member
    /// began to return while it was inside). A fault alone leaves it in
    /// doubt where the library's server may carry the request out after
    /// it: the soak's relay reset hsmC's connection under a kept import,
    /// p11-kit's worker made the key afterwards, and the member's replay,
    /// which had just looked it up and not found it, made it a second time.
    /// A write refused because the member's SoftHSM process lost sight of
    /// its token leaves nothing ([`crate::member::last_write_lost_sight`]).
    pub fn doubt_after(&self, position: usize, faulted: bool, cut_off: bool) -> Doubt {
        if !faulted || crate::member::last_write_lost_sight() {
            Doubt::None
        } else if cut_off {
            Doubt::CutOff
        } else if self.members[position]
            .location()
            .is_some_and(|l| l.library.may_carry_out_after_fault())
        {
            Doubt::Faulted
        } else {
            Doubt::None
        }
    }

    /// Objects being made on a member (`None`) or in doubt there (since
    /// when).
    pub fn in_doubt(&self, position: usize) -> Vec<InDoubt> {
        self.in_doubt.lock()[position].clone()
    }

    /// The objects in doubt on a member: its server may still make them.
    pub fn doubted(&self, position: usize) -> SmallVec<[CK_OBJECT_HANDLE; 4]> {
        (self.in_doubt.lock()[position].iter())
            .filter(|(_, since)| since.is_some())
            .map(|(o, _)| *o)
            .collect()
    }

    /// Forgets that `object` was in doubt on a member (and its fingerprint
    /// as an abandoned object, once no member has it in doubt). Lock
    /// order: in-doubt, then abandoned.
    pub fn settle_in_doubt(&self, position: usize, object: CK_OBJECT_HANDLE) {
        let mut in_doubt = self.in_doubt.lock();
        in_doubt[position].retain(|(o, since)| *o != object || since.is_none());
        if !in_doubt.iter().flatten().any(|(o, _)| *o == object) {
            self.abandoned.lock().remove(&object);
        }
    }

    /// Lets member `position` serve while it may still make the objects
    /// in doubt there, each until `until` says it has had its time: the
    /// changes that make, change or remove them wait for that on the
    /// member ([`Group::doubt_ahead`]), and the member serves the rest at
    /// once. Waited for before it served, the doubt kept a long chaos
    /// run's group with no member serving for up to 0.8 s while a member
    /// whose server answered again waited for a key its stopped worker
    /// had most likely dropped.
    pub fn carry_in_doubt(&self, position: usize, until: impl Fn(DoubtSince) -> Instant) {
        let mut in_doubt = self.in_doubt.lock();
        for since in in_doubt[position]
            .iter_mut()
            .filter_map(|(_, s)| s.as_mut())
        {
            since.carried_until = Some(until(*since));
        }
    }

    /// Whether member `position` serves with objects in doubt there
    /// ([`Group::carry_in_doubt`]): an object on it that the group does
    /// not know may be a late copy of one of them, made from a template
    /// whose fingerprint the object has changed since -- named as an
    /// object of its own, it was copied to the other members as one
    /// (simulation seed 20095979).
    pub fn carries_doubt(&self, position: usize) -> bool {
        (self.in_doubt.lock()[position].iter())
            .any(|(_, since)| since.is_some_and(|s| s.carried_until.is_some()))
    }

    /// Whether what the group does not know on member `position` may be
    /// unsettled rather than new: the member is still owed changes (it
    /// serves first after an outage), which may remove an object destroyed
    /// while it was out, or it carries objects in doubt, whose late copies
    /// may hold a fingerprint from before a change. Copied from such a
    /// member, a destroyed object came back on every other member
    /// (simulation seeds 5063969 and 21342226), and a late copy was made
    /// an object of its own (20095979); synchronisation and reconciliation
    /// copy nothing unknown from it.
    pub fn holds_unsettled(&self, position: usize) -> bool {
        self.undelivered_count(position) > 0 || self.carries_doubt(position)
    }

    /// The object in doubt on member `position` that `change` (of
    /// `object`, where the change names none itself) must wait for there,
    /// if any: it makes, changes or removes that object ([`Group::carry_in_doubt`]).
    /// Made first, an import made the object a second time once the
    /// member's late copy landed, and a removal found nothing and left
    /// the late copy of a destroyed object. Lock order: in-doubt, then
    /// abandoned.
    pub fn doubt_ahead(
        &self,
        position: usize,
        change: &Pending,
        object: Option<CK_OBJECT_HANDLE>,
    ) -> Option<CK_OBJECT_HANDLE> {
        let in_doubt = self.in_doubt.lock();
        let mut doubts = in_doubt[position]
            .iter()
            .filter(|(_, since)| since.is_some())
            .map(|(o, _)| *o)
            .peekable();
        doubts.peek()?;
        let named = change.made_object().or(object);
        let print = change.removal();
        let abandoned = print.map(|_| self.abandoned.lock());
        // A removal names the object by a fingerprint read from one copy
        // or another: any that may be of the object waits.
        doubts.find(|o| {
            named == Some(*o)
                || (abandoned.as_ref())
                    .zip(print)
                    .is_some_and(|(a, print)| a.get(o).is_some_and(|p| identity::agree(p, print)))
        })
    }

    /// Whether the doubt of `object` on member `position` was carried
    /// ([`Group::carry_in_doubt`]) and has had its time at `now`.
    pub fn carried_over(&self, position: usize, object: CK_OBJECT_HANDLE, now: Instant) -> bool {
        self.in_doubt.lock()[position].iter().any(|(o, since)| {
            *o == object && since.is_some_and(|s| s.carried_until.is_some_and(|u| u <= now))
        })
    }

    /// Settles the carried doubts ([`Group::carry_in_doubt`]) that have
    /// had their time and that no kept change waits for (the replay of
    /// kept changes settles those as it makes the change, looking the
    /// member up afresh); true if any doubt has had its time, settled or
    /// not, so that the replay runs for the changes waiting. Lock order:
    /// each of in-doubt, abandoned and deferred alone.
    pub fn settle_carried(&self, now: Instant) -> bool {
        let over: Vec<(usize, CK_OBJECT_HANDLE)> = (self.in_doubt.lock().iter().enumerate())
            .flat_map(|(position, entries)| {
                entries
                    .iter()
                    .filter(|(_, since)| {
                        since.is_some_and(|s| s.carried_until.is_some_and(|until| until <= now))
                    })
                    .map(move |(object, _)| (position, *object))
            })
            .collect();
        for (position, object) in &over {
            let print = self.abandoned_print(*object);
            let waited_for = self.deferred.lock()[*position].iter().any(|change| {
                change.made_object() == Some(*object)
                    || (change.removal())
                        .zip(print.as_ref())
                        .is_some_and(|(removal, print)| identity::agree(print, removal))
            });
            if !waited_for {
                self.settle_in_doubt(*position, *object);
            }
        }
        !over.is_empty()
    }

    /// Takes a destroyed object out of the group. A member that may still
    /// make a copy of it (it is in doubt there) is waited for as for an
    /// abandoned object's copy, by the fingerprint kept here, so that the
    /// removal queued for the member meets the copy: settled at once as
    /// gone from the group, the removal found nothing, and the copy the
    /// member's server made late stayed, a destroyed object back
    /// (`tests/member_api.rs`). Lock order: in-doubt, then abandoned.
    pub fn forget_destroyed(&self, object: CK_OBJECT_HANDLE) {
        let print = self.objects.get(object).and_then(|o| o.fingerprint);
        self.objects.remove(object);
        let Some(print) = print else {
            return;
        };
        let in_doubt = self.in_doubt.lock();
        if (in_doubt.iter().flatten()).any(|(o, since)| *o == object && since.is_some()) {
            self.abandoned.lock().insert(object, (*print).clone());
        }
    }

    /// Keeps the fingerprint of `object`, whose making call failed while a
    /// member had it in doubt (see [`Group::abandoned_print`]).
    pub fn record_abandoned(&self, object: CK_OBJECT_HANDLE, print: Fingerprint) {
        self.abandoned.lock().insert(object, print);
    }

    /// The fingerprint of an object whose making call failed while a
    /// member had it in doubt: what finds the copy it may still make.
    pub fn abandoned_print(&self, object: CK_OBJECT_HANDLE) -> Option<Fingerprint> {
        self.abandoned.lock().get(&object).cloned()
    }

    /// The objects queued or kept to be created or changed on a member,
    /// those calls under way are still making ([`Group::making_object`]),
    /// and those in doubt there: each comes to the member by its queue,
    /// the replay of kept changes, its call or its late copy, not by
    /// synchronisation. Kept ones left out, a member that
    /// served first and failed again before they were made had each key
    /// among them named "not synchronised" at its next return where its
    /// library takes no wrapped key, though it got every one.
    pub fn queued_objects(&self, position: usize) -> rustc_hash::FxHashSet<CK_OBJECT_HANDLE> {
        let mut queued: rustc_hash::FxHashSet<CK_OBJECT_HANDLE> = self.pending.lock()[position]
            .iter()
            .filter_map(Pending::made_object)
            .collect();
        queued.extend(
            self.deferred.lock()[position]
                .iter()
                .filter_map(Pending::made_object),
        );
        queued.extend(self.unfinished.lock().iter().copied());
        // Its late copy may still land ([`Group::carry_in_doubt`]).
        queued.extend(self.doubted(position));
        queued
    }

    /// Whether `object` is on its way to member `position`: a change
    /// making or changing it is ([`Group::change_on_its_way`]), it is
    /// still being made by its call, or its late copy may still land
    /// there (see [`Group::queued_objects`]).
    pub fn on_its_way(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        self.change_on_its_way(position, object)
            || self.unfinished.lock().contains(&object)
            || self.doubted(position).contains(&object)
    }

    /// Whether a change making or changing `object` is still on its way to
    /// member `position`: queued or kept for it, or being made by the
    /// replay of kept changes. A later change of the object must reach the
    /// member behind it: made there at once, it was undone by the earlier
    /// one (simulation seed 808).
    pub fn change_on_its_way(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        let queued = self.pending.lock()[position]
            .iter()
            .any(|change| change.made_object() == Some(object));
        queued || self.change_kept(position, object)
    }

    /// Whether a removal of `object` must wait behind a change of it on its
    /// way to member `position`: a change of its attributes queued or kept
    /// for it (its copy there is still found by the fingerprint from before,
    /// a removal by the one now would miss it, simulation seed 11729), or
    /// any change of it the replay of kept changes is making (its copy may
    /// land after the removal). A copy or import still to come needs no
    /// wait: it finds the object gone and makes nothing.
    pub fn removal_waits(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        let sets =
            |change: &Pending| matches!(change, Pending::Set { object: o, .. } if *o == object);
        if self.pending.lock()[position].iter().any(sets) {
            return true;
        }
        let deferred = self.deferred.lock();
        deferred[position].iter().any(sets)
            || self.kept_replay.lock().making[position].contains(&object)
    }

    /// Whether removal `print` must wait behind a change of attributes
    /// kept for member `position` that gives the copy that fingerprint:
    /// made first, the removal looks the copy up by a fingerprint it does
    /// not have yet and finds nothing, and the change kept then leaves the
    /// copy of a destroyed object under it (simulation seed 16263: a
    /// returning member's replay kept the change, behind a removal it could
    /// not yet tell apart, and made the object's removal in place) --
    /// unless the removal finds the copy as it is before the change too:
    /// then the change makes nothing findable, and waited for, the removal
    /// of a try a call abandoned before making the object again (its
    /// print naming no `CKA_ID`) waited behind a change of the object's
    /// ID, the object's copy behind the removal, and the change behind the
    /// copy, for good (simulation seed 5005977).
    pub fn removal_behind_kept_set(&self, position: usize, print: &Fingerprint) -> bool {
        self.deferred.lock()[position]
            .iter()
            .any(|change| match change {
                Pending::Set {
                    before, changes, ..
                } => {
                    identity::matches(print, &identity::changed(before, changes.values()))
                        && !identity::matches(print, before)
                }
                _ => false,
            })
    }

    /// Whether a change making or changing `object` is kept for member
    /// `position`, or being made by the replay of kept changes: a change
    /// of the object that a returning member's replay takes from its queue
    /// is kept behind it (`recovery::replay_pending`). Lock order:
    /// deferred, then the kept replay's state.
    pub fn change_kept(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        let deferred = self.deferred.lock();
        deferred[position]
            .iter()
            .any(|change| change.made_object() == Some(object))
            || self.kept_replay.lock().making[position].contains(&object)
    }

    /// How many changes a member has yet to receive.
    pub fn pending_count(&self, position: usize) -> usize {
        self.pending.lock()[position].len()
    }

    /// Whether member `position` serves without some object of the group:
    /// changes queued or kept for it, keys that cannot reach it, or a
    /// return not yet compared with the group.
    pub fn lacks_objects(&self, position: usize) -> bool {
        self.lack_rank(position) > 0
    }

    /// How surely member `position` lacks objects of the group: 0, it lacks
    /// none; 1, it is owed no change but may lack some (keys that cannot
    /// reach it, objects it refused, a return not yet compared with the
    /// group, objects in doubt there); 2, it is owed changes
    /// ([`Group::complete_first`]).
    fn lack_rank(&self, position: usize) -> u8 {
        if self.undelivered_count(position) > 0 {
            2
        } else {
            u8::from(
                !self.unreceivable.lock()[position].is_empty()
                    || self.refuses_some(position)
                    || self.uncompared[position].load(Ordering::Relaxed)
                    || self.carries_doubt(position),
            )
        }
    }

    /// Member `position` answered and did not take `object` (a change
    /// replayed or delivered to it, `VirtualSession::apply`; a copy of
    /// synchronisation or of a reconciliation pass): it serves without
    /// it, and searches go first to members that lack nothing. Taken for
    /// complete once its refusal was logged, it answered searches without
    /// the object (simulation, lasting refusals).
    pub fn note_refused(&self, position: usize, object: CK_OBJECT_HANDLE) {
        let mut refused = self.refused.lock();
        let lacking = &mut refused[position];
        lacking.retain(|o| self.still_lacks(position, *o));
        lacking.insert(object);
    }

    /// Whether member `position` still lacks an object it refused.
    fn refuses_some(&self, position: usize) -> bool {
        let refused = self.refused.lock();
        refused[position]
            .iter()
            .any(|o| self.still_lacks(position, *o))
    }

    /// Whether `object` is still the group's and not known on `position`.
    fn still_lacks(&self, position: usize, object: CK_OBJECT_HANDLE) -> bool {
        !matches!(
            self.objects.presence(object, position),
            None | Some(Presence::Present(_))
        )
    }

    /// Records whether member `position` has been compared with the group
    /// since it returned: by a synchronisation that ran to its end, or by a
    /// reconciliation pass. A search does not spread to a member that has
    /// not (the soak's "found 0 objects, expected 2", right after a return
    /// whose synchronisation was skipped: its source's listing failed).
    pub fn set_compared(&self, position: usize, compared: bool) {
        self.uncompared[position].store(!compared, Ordering::Relaxed);
    }

    /// Serving members in `order`, those that lack no object of the group
    /// first, then those owed no change (only not yet compared with the
    /// group, or unable to receive some key), then those still owed
    /// changes: where a search runs, and what names what it finds, when
    /// not every member answers it alike. A member owed changes surely
    /// lacks objects this process made; one only not yet compared lacks
    /// at most what other processes made. Ranked alike, a search with
    /// every member lacking something went to a primary still owed its
    /// kept objects while another member held them all (the soak's "found
    /// 1 objects, expected 2", a second search finding 2).
    pub fn complete_first(&self, order: Positions) -> Positions {
        let mut ranked = order;
        ranked.sort_by_cached_key(|p| self.lack_rank(*p));
        ranked
    }

    /// The member a search runs on when it is not spread
    /// (`VirtualSession::find_init`): the first serving member in
    /// configured order that is not degraded -- the primary, as
    /// `Group::by_position` lists it -- among those that lack no object of
    /// the group, if any does.
    pub fn search_home(&self) -> Option<usize> {
        let mut order: Positions = self.serving_members().iter().map(|m| m.position).collect();
        // Stable: configured order within each.
        order.sort_by_key(|p| self.members[*p].rotation() != Rotation::In);
        self.complete_first(order).first().copied()
    }

    /// Whether a search on `position` answers off the primary, where an
    /// object the group has not met there is named as the primary names
    /// it (`VirtualSession::found_off_home`): a search on a lane there that finds
    /// one moves to the member's own session, which does that.
    pub fn off_search_home(&self, position: usize) -> bool {
        self.search_home().is_some_and(|home| home != position)
    }

    /// How many changes a member has yet to receive, those kept for when a
    /// source serves or the application logs in (see [`Group::defer`])
    /// included: what the group status reports.
    pub fn undelivered_count(&self, position: usize) -> usize {
        self.pending_count(position)
            + self.deferred.lock()[position].len()
            + self.deferred_underway[position].load(Ordering::Relaxed)
    }

    /// Whether the application is logged in through the virtual slot (the
    /// group holds a login for its members), without copying the PIN.
    pub fn holds_login(&self) -> bool {
        self.login.lock().is_some()
    }

    /// Whom the group is logged in as, without copying the PIN.
    pub fn logged_in_as(&self) -> Option<CK_USER_TYPE> {
        self.login.lock().as_ref().map(|l| l.user_type)
    }

    /// A call logged a member in again after it lost its login. A search
    /// begun there before was answered as for a public session -- its
    /// matches are fixed when it starts, and its session's state now says
    /// nothing of them -- so each search notes [`Group::logins_again`] as
    /// it starts and, ending short of objects, starts again if the count
    /// moved since.
    pub fn note_login_again(&self) {
        self.logins_again.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Group::note_login_again`] was called.
    pub fn logins_again(&self) -> u64 {
        self.logins_again.load(Ordering::Relaxed)
    }

    /// Keeps the application's login, to log members in again.
    pub fn cache_login(&self, user_type: CK_USER_TYPE, pin: Option<&[u8]>) {
        *self.login.lock() = Some(Login {
            user_type,
            pin: pin.map(|p| Zeroizing::new(p.to_vec())),
            generation: self.logins_cached.fetch_add(1, Ordering::Relaxed),
        });
    }

    /// Keeps the PIN the application changed its login's to.
    pub fn cache_new_pin(&self, pin: &[u8]) {
        if let Some(login) = self.login.lock().as_mut() {
            if login.user_type == CKU_USER || login.user_type == CKU_SO {
                login.pin = Some(Zeroizing::new(pin.to_vec()));
                login.generation = self.logins_cached.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Which credential the group holds now ([`Login::generation`]).
    pub fn login_generation(&self) -> Option<u64> {
        self.login.lock().as_ref().map(|l| l.generation)
    }

    /// Notes that member `position`'s token refused the cached credential
    /// of `generation` at recovery (a wrong PIN there).
    pub fn note_pin_refused(&self, position: usize, generation: Option<u64>) {
        if let Some(generation) = generation {
            (self.members[position].pin_refused).store(generation + 1, Ordering::Relaxed);
        }
    }

    /// Whether member `position`'s token refused the credential the group
    /// holds now: recovery does not try it there again, since a token may
    /// lock its user after a few wrong PINs (Luna partitions do), until the
    /// application logs in again or changes the PIN through the group.
    pub fn refused_cached_pin(&self, position: usize) -> bool {
        let refused = self.members[position].pin_refused.load(Ordering::Relaxed);
        (self.login.lock().as_ref()).is_some_and(|l| refused == l.generation + 1)
    }

    /// The cached credential, to log a member in again after it lost its
    /// login; `None` when the group is not logged in.
    pub fn cached_login(&self) -> Option<(CK_USER_TYPE, Option<Zeroizing<Vec<u8>>>)> {
        self.login
            .lock()
            .as_ref()
            .map(|l| (l.user_type, l.pin.clone()))
    }

    pub fn up_members(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.members.iter().filter(|m| m.is_up())
    }

    /// Members that may serve crypto now: the active ones that are up, or
    /// the standby ones when no active member is up.
    pub fn serving_members(&self) -> Vec<&Arc<Member>> {
        let standby_serves = self.standby_serves();
        self.members
            .iter()
            .filter(|m| serves(m, standby_serves))
            .collect()
    }

    /// Standby members serve only while no active member is up.
    fn standby_serves(&self) -> bool {
        !self.members.iter().any(|m| m.is_up() && !m.standby)
    }

    /// Serving members by expected completion in `lane`: calls in flight
    /// plus this one, times the member's recent latency for that kind of
    /// call, so that a member twice as slow gets about half the calls.
    /// Members within a factor of 2, or 2 ms, of the fastest count as
    /// equally fast (jitter must not pin calls to one of them), so among them the
    /// least busy comes first and ties rotate round-robin, each `lane`
    /// on its own, so that calls of different kinds interleaved in a
    /// fixed pattern cannot pin one kind to one member. Degraded members
    /// come last (only when no other serves do they serve); and one choice in
    /// [`EXPLORE_EVERY`] puts the members in rotation first in turn. The
    /// calls this thread makes until it chooses again count as `lane`'s.
    pub fn by_preference(&self, lane: usize) -> Positions {
        LANE.set(lane as u8);
        if let [only] = &self.members[..] {
            return if only.is_up() {
                smallvec![0]
            } else {
                Positions::new()
            };
        }
        let standby_serves = self.standby_serves();
        // (latency, calls in flight, position)
        let mut serving: SmallVec<[(u64, u64, usize); 8]> = SmallVec::new();
        let mut degraded: SmallVec<[(u64, u64, usize); 4]> = SmallVec::new();
        for m in &self.members {
            if !serves(m, standby_serves) {
                continue;
            }
            let entry = (m.latency(lane), m.in_flight() as u64, m.position);
            match m.rotation.load(Ordering::Relaxed) {
                0 => serving.push(entry),
                _ => degraded.push(entry),
            }
        }
        let mut order = Positions::new();
        if serving.is_empty() {
            serving = degraded.drain(..).collect();
        }
        let start = self.round_robin[lane % LANES].fetch_add(1, Ordering::Relaxed);
        if (start + 1) % EXPLORE_EVERY == 0 && serving.len() > 1 {
            let turn = (start / EXPLORE_EVERY) % serving.len();
            // A member with calls in flight is being measured already (and
            // may be stalled, its calls never to return).
            if serving[turn].1 == 0 {
                order.push(serving.remove(turn).2);
            }
        }
        by_expected_completion(&serving, start, &mut order);
        if !degraded.is_empty() {
            by_expected_completion(&degraded, start, &mut order);
        }
        order
    }

    /// The member [`Self::by_preference`] would list first.
    #[inline(always)]
    pub fn least_busy(&self, lane: usize) -> Option<usize> {
        match &self.members[..] {
            [only] => only.is_up().then_some(0),
            _ => self.first_by_preference(lane),
        }
    }

    /// [`Self::by_preference`]'s first member without listing the rest:
    /// on the path of every operation's start and every stateless call, so
    /// one pass reads each member once, and when none has calls in flight
    /// and all are about as fast (one application thread) the rotation
    /// alone decides. The same choice, exploring turns included, as long as
    /// an active member serves, none of the serving is degraded and there
    /// are at most [`FAST_CHOICE`] of them; otherwise it asks
    /// [`Self::by_preference`]. Inlined into the entry points that choose:
    /// a call, a frame and six saved registers less on every choice.
    #[inline(always)]
    fn first_by_preference(&self, lane: usize) -> Option<usize> {
        // Every caller names a lane below LANES: a compare, not a division.
        let lane = if lane < LANES { lane } else { lane % LANES };
        // (latency, calls in flight, position) of the serving members.
        let mut serving = [(0u64, 0u64, 0usize); FAST_CHOICE];
        let mut count = 0;
        let (mut fastest, mut slowest) = (u64::MAX, 0);
        let mut any_in_flight = false;
        for m in &self.members {
            // Standby members serve only when no active one is up: then
            // `count` stays 0 and `by_preference` decides.
            if m.standby || !m.is_up() {
                continue;
            }
            if count == FAST_CHOICE || m.rotation.load(Ordering::Relaxed) != Rotation::In as u8 {
                return self.by_preference(lane).first().copied();
            }
            let latency = m.latency(lane);
            if latency != 0 {
                fastest = fastest.min(latency);
                slowest = slowest.max(latency);
            }
            let in_flight = m.in_flight() as u64;
            any_in_flight |= in_flight != 0;
            serving[count] = (latency, in_flight, m.position);
            count += 1;
        }
        if count == 0 {
            return self.by_preference(lane).first().copied();
        }
        LANE.set(lane as u8);
        let turn = self.round_robin[lane].fetch_add(1, Ordering::Relaxed);
        if (turn + 1) % EXPLORE_EVERY == 0 && count > 1 {
            // As in `by_preference`: a member with calls in flight is
            // being measured already.
            let (_, in_flight, position) = serving[(turn / EXPLORE_EVERY) % count];
            if in_flight == 0 {
                return Some(position);
            }
        }
        let start = rotated(turn, count);
        let fastest = if fastest == u64::MAX { 1 } else { fastest };
        if !any_in_flight && comparable(slowest, fastest) {
            // Every expected completion is the same: the rotation decides.
            return Some(serving[start].2);
        }
        Some(least_expected_completion(&serving[..count], fastest, start))
    }

    /// Takes members far slower than the others for a sustained period out
    /// of the rotation as *degraded*, probes each degraded member, and puts
    /// one back once a probe finds it close to the others again; each
    /// change in the HA log. Called by the
    /// watchdog on every tick (see [`judge_latency`] for the rule).
    pub fn review_latency(&self, now: Instant) {
        let standby_serves = self.standby_serves();
        let serving: Vec<&Arc<Member>> = self
            .members
            .iter()
            .filter(|m| serves(m, standby_serves))
            .collect();
        for member in &serving {
            let fresh = member.fresh_lanes();
            if fresh.is_empty() {
                continue;
            }
            let others = serving
                .iter()
                .any(|o| o.position != member.position && o.rotation() == Rotation::In);
            let (mut latency, mut reference, mut lane) = compared_latency(member, &fresh, &serving);
            let mut slow_since = member.slow_since.lock();
            if others && reference.is_none() {
                // Busy only at what is not compared (searches and
                // object-making, pinned to it as the primary): while those
                // calls are in flight the chooser sends it nothing else,
                // not even in turn, so a probe measures it for the next
                // review (a network member's: an in-process member's
                // probe would be timed one time in SAMPLE_EVERY). Once
                // found slow, its latest figure in the lane it was found
                // slow in stands meanwhile; otherwise nothing new: no
                // change.
                if member.timed.load(Ordering::Relaxed) {
                    probe(member);
                }
                let Some((_, slow_lane)) = *slow_since else {
                    continue;
                };
                (latency, reference, lane) = compared_latency(member, &[slow_lane], &serving);
                if reference.is_none() {
                    continue;
                }
            }
            let degraded = member.rotation() != Rotation::In;
            let since = slow_since.map(|(since, _)| since);
            let verdict = judge_latency(latency, reference, degraded, since, now);
            let ms = |nanos: u64| nanos as f64 / 1e6;
            let mut hold = member.degraded_hold.lock();
            match verdict {
                Verdict::Serve => *slow_since = None,
                Verdict::SlowSince(since) => *slow_since = Some((since, lane)),
                Verdict::Degrade => {
                    *slow_since = None;
                    member
                        .rotation
                        .store(Rotation::Degraded as u8, Ordering::Relaxed);
                    let held = hold.degrade(now);
                    let at_least = if held.is_zero() {
                        String::new()
                    } else {
                        format!(
                            " (degraded again soon after its return: out for {} s at least)",
                            held.as_secs()
                        )
                    };
                    self.log_change(
                        Some(member.position),
                        &format!(
                            "member degraded: its calls take {:.1} ms against {:.1} ms on the \
                             fastest other member; out of rotation, probed, until it is close \
                             to the others again{at_least}",
                            ms(latency),
                            ms(reference.unwrap_or(0))
                        ),
                    );
                }
                // Held out still: probed on, so that a figure is fresh
                // when it may return.
                Verdict::Recover if reference.is_some() && !hold.may_return(now) => probe(member),
                Verdict::Probe => probe(member),
                Verdict::Recover => {
                    hold.returned(now);
                    // Its other figures are from before: measured afresh.
                    for slot in &member.latency {
                        slot.store(0, Ordering::Relaxed);
                    }
                    member.rotation.store(Rotation::In as u8, Ordering::Relaxed);
                    self.log_change(
                        Some(member.position),
                        &format!(
                            "member no longer degraded: a probe took {:.1} ms against {:.1} ms \
                             on the fastest other member; back in rotation",
                            ms(latency),
                            ms(reference.unwrap_or(0))
                        ),
                    );
                }
            }
        }
    }

    /// Serving members in configured order, primary first, degraded
    /// members last: searches and object-making are not held up by a slow
    /// primary. Calls made this way count as [`MAKING_LANE`]'s.
    pub fn by_position(&self) -> Positions {
        LANE.set(MAKING_LANE as u8);
        let serving = self.serving_members();
        let (fast, slow): (Vec<_>, Vec<_>) = serving
            .into_iter()
            .partition(|m| m.rotation() == Rotation::In);
        fast.into_iter().chain(slow).map(|m| m.position).collect()
    }

    /// The virtual token's info: label and serial are the group's, the rest
    /// a combination under which every advertised capability holds on
    /// every member that is up.
    pub fn token_info(&self, sessions: (CK_ULONG, CK_ULONG)) -> Result<CK_TOKEN_INFO> {
        let infos: Vec<CK_TOKEN_INFO> = self
            .up_members()
            .filter_map(|m| m.location())
            .filter_map(|loc| loc.library.token_info(loc.slot).ok())
            .collect();
        let first = *infos.first().ok_or(Error::new(CKR_TOKEN_NOT_PRESENT))?;
        let mut info = first;
        string_to_padded(&self.label, &mut info.label);
        string_to_padded("pkcs11-ha", &mut info.manufacturerID);
        string_to_padded("HA virtual slot", &mut info.model);
        string_to_padded(&self.serial, &mut info.serialNumber);
        const ALL_MUST_HAVE: CK_FLAGS = CKF_RNG
            | CKF_USER_PIN_INITIALIZED
            | CKF_TOKEN_INITIALIZED
            | CKF_RESTORE_KEY_NOT_NEEDED
            | CKF_CLOCK_ON_TOKEN
            | CKF_DUAL_CRYPTO_OPERATIONS
            | CKF_PROTECTED_AUTHENTICATION_PATH;
        const ANY_MAY_HAVE: CK_FLAGS = CKF_LOGIN_REQUIRED
            | CKF_WRITE_PROTECTED
            | CKF_USER_PIN_COUNT_LOW
            | CKF_USER_PIN_FINAL_TRY
            | CKF_USER_PIN_LOCKED
            | CKF_USER_PIN_TO_BE_CHANGED
            | CKF_SO_PIN_COUNT_LOW
            | CKF_SO_PIN_FINAL_TRY
            | CKF_SO_PIN_LOCKED
            | CKF_SO_PIN_TO_BE_CHANGED;
        let all = infos.iter().fold(ALL_MUST_HAVE, |acc, i| acc & i.flags);
        let any = infos
            .iter()
            .fold(0, |acc, i| acc | (i.flags & ANY_MAY_HAVE));
        info.flags = all | any;
        info.ulMaxSessionCount = combine_limit(infos.iter().map(|i| i.ulMaxSessionCount));
        info.ulMaxRwSessionCount = combine_limit(infos.iter().map(|i| i.ulMaxRwSessionCount));
        info.ulSessionCount = sessions.0;
        info.ulRwSessionCount = sessions.1;
        info.ulMaxPinLen = infos.iter().map(|i| i.ulMaxPinLen).min().unwrap_or(0);
        info.ulMinPinLen = infos.iter().map(|i| i.ulMinPinLen).max().unwrap_or(0);
        info.ulTotalPublicMemory = combine_amount(infos.iter().map(|i| i.ulTotalPublicMemory));
        info.ulFreePublicMemory = combine_amount(infos.iter().map(|i| i.ulFreePublicMemory));
        info.ulTotalPrivateMemory = combine_amount(infos.iter().map(|i| i.ulTotalPrivateMemory));
        info.ulFreePrivateMemory = combine_amount(infos.iter().map(|i| i.ulFreePrivateMemory));
        Ok(info)
    }

    /// Mechanisms every serving member offers, in the first member's order.
    pub fn mechanisms(&self) -> Result<Vec<CK_MECHANISM_TYPE>> {
        let lists: Vec<Vec<CK_MECHANISM_TYPE>> = self
            .serving_locations()
            .iter()
            .filter_map(|loc| loc.library.mechanisms(loc.slot).ok())
            .collect();
        let (first, rest) = lists
            .split_first()
            .ok_or(Error::new(CKR_TOKEN_NOT_PRESENT))?;
        Ok(first
            .iter()
            .copied()
            .filter(|m| rest.iter().all(|l| l.contains(m)))
            .collect())
    }

    /// A mechanism's info as every serving member supports it: the common
    /// flags and the key-size range all of them accept.
    pub fn mechanism_info(&self, mechanism: CK_MECHANISM_TYPE) -> Result<CK_MECHANISM_INFO> {
        let locations = self.serving_locations();
        if locations.is_empty() {
            return Err(Error::new(CKR_TOKEN_NOT_PRESENT));
        }
        let mut combined: Option<CK_MECHANISM_INFO> = None;
        for loc in locations {
            let info = loc.library.mechanism_info(loc.slot, mechanism)?;
            combined = Some(match combined {
                None => info,
                Some(c) => CK_MECHANISM_INFO {
                    ulMinKeySize: c.ulMinKeySize.max(info.ulMinKeySize),
                    ulMaxKeySize: c.ulMaxKeySize.min(info.ulMaxKeySize),
                    flags: c.flags & info.flags,
                },
            });
        }
        combined.ok_or(Error::new(CKR_MECHANISM_INVALID))
    }

    fn serving_locations(&self) -> Vec<Location> {
        self.serving_members()
            .into_iter()
            .filter_map(|m| m.location())
            .collect()
    }

    /// The serial numbers of members, as the token reports them.
    pub fn member_serial(info: &CK_TOKEN_INFO) -> String {
        padded_to_string(&info.serialNumber)
    }
}

/// Whether a call waits for the object `change` makes on member `position`
/// (`wanted`, [`Group::wait_for_kept`]) and the replay did not keep a
/// change of that object again (`kept_again`).
fn wanted_change(
    wanted: &[(usize, CK_OBJECT_HANDLE)],
    position: usize,
    kept_again: &[CK_OBJECT_HANDLE],
    change: &Pending,
) -> bool {
    change
        .made_object()
        .is_some_and(|o| wanted.contains(&(position, o)) && !kept_again.contains(&o))
}

/// Asks a member for its token info in a thread of its own (one probe at
/// a time), timed as a stateless call: a degraded member, to see whether
/// it recovered, or one busy only at what is not compared. No application
/// call waits on it, and a probe that hangs is a call in flight the
/// watchdog sees like any other.
fn probe(member: &Arc<Member>) {
    let Some(location) = member.location() else {
        return;
    };
    if member.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    let probed = Arc::clone(member);
    let spawned = std::thread::Builder::new()
        .name(format!("pkcs11-ha-probe-{}", member.serial))
        .spawn(move || {
            LANE.set(PROBE_LANE as u8);
            let started = crate::clock::now();
            {
                let _call = probed.begin_call();
                let _ = crate::member::with_sigpipe_blocked(|| {
                    location.library.token_info(location.slot)
                });
            }
            // Its figure replaces the lane's, as any sample of a degraded
            // member does: whether the member is slow is a question about
            // now, and averaged in at 1/8 a slow probe took several
            // reviews to count.
            let nanos = u64::try_from(crate::clock::since(started).as_nanos()).unwrap_or(u64::MAX);
            probed.latency[PROBE_LANE].store(nanos.max(1), Ordering::Relaxed);
            probed.probing.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        member.probing.store(false, Ordering::Release);
    }
}

/// Orders `members` (latency, calls in flight, position) by expected
/// completion, as [`Group::by_preference`] describes; `start` rotates the
/// ties.
fn by_expected_completion(members: &[(u64, u64, usize)], start: usize, order: &mut Positions) {
    let fastest = members
        .iter()
        .map(|&(latency, _, _)| latency)
        .filter(|&l| l != 0)
        .min()
        .unwrap_or(1);
    let n = members.len().max(1);
    let start = start % n;
    // Expected completion, then the rotated rank, in one word: costs stay
    // far below 2^58 (a million calls in flight of a minute each).
    let mut keyed: SmallVec<[(u64, usize); 8]> = SmallVec::new();
    for (rank, &(latency, in_flight, position)) in members.iter().enumerate() {
        let key = completion_key(latency, in_flight, fastest, (rank, start, n));
        keyed.push((key, position));
    }
    keyed.sort_unstable();
    order.extend(keyed.into_iter().map(|(_, position)| position));
}

/// Expected completion, then the rank rotated to start at `start` of `n`,
/// in one word: the order [`by_expected_completion`] sorts by and
/// [`least_expected_completion`] takes the least of.
#[inline(always)]
fn completion_key(
    latency: u64,
    in_flight: u64,
    fastest: u64,
    (rank, start, n): (usize, usize, usize),
) -> u64 {
    let latency = if comparable(latency, fastest) {
        fastest
    } else {
        latency
    };
    let rotated = if rank >= start {
        rank - start
    } else {
        rank + n - start
    };
    let cost = (in_flight + 1).saturating_mul(latency);
    cost.saturating_mul(n as u64) + rotated as u64
}

/// Whether a member of `latency` counts as fast as the fastest, `fastest`
/// (see [`Group::by_preference`]); an unmeasured member (0) does.
#[inline(always)]
fn comparable(latency: u64, fastest: u64) -> bool {
    latency == 0
        || latency * 2 <= fastest * COMPARABLE_HALVES
        || latency <= fastest + COMPARABLE_MARGIN_NS
}

/// `turn % count` without a division where `count` is a power of two
/// (two or four members): the division's latency is on the path of every
/// choice.
#[inline(always)]
fn rotated(turn: usize, count: usize) -> usize {
    if count.is_power_of_two() {
        turn & (count - 1)
    } else {
        turn % count
    }
}

/// The position [`by_expected_completion`] would list first among
/// `serving` (latency, calls in flight, position), without sorting.
#[inline(never)]
fn least_expected_completion(serving: &[(u64, u64, usize)], fastest: u64, start: usize) -> usize {
    let n = serving.len();
    let mut best = (u64::MAX, 0);
    for (rank, &(latency, in_flight, position)) in serving.iter().enumerate() {
        let key = completion_key(latency, in_flight, fastest, (rank, start, n));
        if rank == 0 || key < best.0 {
            best = (key, position);
        }
    }
    best.1
}

/// A member's latency and the fastest other in-rotation member's, and
/// the lane, of the lanes `fresh` (sampled since the last review, or the
/// one it was found slow in: [`Group::review_latency`]) both have figures
/// for, the one where the member compares best; object-making is left
/// out, its calls differing too much by key type. A member is judged slow
/// only if it is slow at everything it has done lately.
fn compared_latency(
    member: &Member,
    fresh: &[usize],
    serving: &[&Arc<Member>],
) -> (u64, Option<u64>, usize) {
    let mut best: (u64, Option<u64>, usize) = (0, None, 0);
    for &lane in fresh.iter().filter(|&&l| l != MAKING_LANE) {
        let latency = member.latency(lane);
        let reference = serving
            .iter()
            .filter(|o| o.position != member.position && o.rotation() == Rotation::In)
            .map(|o| o.latency(lane))
            .filter(|&l| l != 0)
            .min();
        let (Some(reference), true) = (reference, latency != 0) else {
            continue;
        };
        let better = match best {
            (_, None, _) => true,
            (l, Some(r), _) => {
                u128::from(latency) * u128::from(r) < u128::from(l) * u128::from(reference)
            }
        };
        if better {
            best = (latency, Some(reference), lane);
        }
    }
    best
}

/// What [`judge_latency`] decides for one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In rotation, not slow.
    Serve,
    /// In rotation, slow since then: not for long enough yet.
    SlowSince(Instant),
    /// Out of rotation from now.
    Degrade,
    /// Degraded still: probe it again.
    Probe,
    /// Back in rotation from now.
    Recover,
}

/// The degraded rule: a member in rotation whose recent latency (see
/// [`compared_latency`]) has been more than [`DEGRADED_RATIO`] times, and
/// [`DEGRADED_MARGIN_NS`] more than, the fastest other member's in rotation
/// (`reference`) for [`DEGRADED_AFTER`] is degraded; a degraded member
/// whose latest probe took at most [`RECOVERED_RATIO`] times the
/// reference, or at most the margin more, returns. With no other member
/// to compare with, nobody is degraded and a degraded member returns.
pub fn judge_latency(
    latency: u64,
    reference: Option<u64>,
    degraded: bool,
    slow_since: Option<Instant>,
    now: Instant,
) -> Verdict {
    let Some(reference) = reference.filter(|_| latency != 0) else {
        return if degraded {
            Verdict::Recover
        } else {
            Verdict::Serve
        };
    };
    let excess = latency.saturating_sub(reference);
    if degraded {
        return if latency <= reference * RECOVERED_RATIO || excess <= DEGRADED_MARGIN_NS {
            Verdict::Recover
        } else {
            Verdict::Probe
        };
    }
    if latency <= reference * DEGRADED_RATIO || excess <= DEGRADED_MARGIN_NS {
        return Verdict::Serve;
    }
    let since = slow_since.unwrap_or(now);
    if now.saturating_duration_since(since) >= DEGRADED_AFTER {
        Verdict::Degrade
    } else {
        Verdict::SlowSince(since)
    }
}

/// Whether a member serves crypto now: it is up, and active, or standby
/// while standby members serve.
fn serves(member: &Member, standby_serves: bool) -> bool {
    member.is_up() && (!member.standby || standby_serves)
}

/// Session-count limits: the smallest finite one; "infinite" (0) and
/// "unavailable" only where every member says so.
fn combine_limit(values: impl Iterator<Item = CK_ULONG>) -> CK_ULONG {
    let values: Vec<CK_ULONG> = values.collect();
    let finite = values
        .iter()
        .copied()
        .filter(|&v| v != CK_EFFECTIVELY_INFINITE && v != CK_UNAVAILABLE_INFORMATION)
        .min();
    finite.unwrap_or_else(|| {
        values
            .first()
            .copied()
            .unwrap_or(CK_UNAVAILABLE_INFORMATION)
    })
}

/// Memory amounts: the smallest known one, since an object must fit on all.
fn combine_amount(values: impl Iterator<Item = CK_ULONG>) -> CK_ULONG {
    values
        .filter(|&v| v != CK_UNAVAILABLE_INFORMATION)
        .min()
        .unwrap_or(CK_UNAVAILABLE_INFORMATION)
}

/// Whether a member's answer takes it out of service (see
/// [`crate::member::classify`], where that is decided).
pub fn is_member_fault(function: &str, rv: CK_RV) -> bool {
    classify(function, rv).is_member_fault()
}

/// How often a busy member is asked again, and the first pause: each pause
/// is four times the one before (2, 8, 32 ms), so a member busy for longer
/// than about 40 ms is taken for down and the call moves on.
const BUSY_RETRIES: u32 = 3;
const FIRST_BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Asks a member that answered `rv` (busy) again, a bounded number of
/// times with a short growing pause; the answer of the last try.
#[cold]
pub fn retry_while_busy(function: &str, mut rv: CK_RV, mut call: impl FnMut() -> CK_RV) -> CK_RV {
    let mut pause = FIRST_BUSY_PAUSE;
    for _ in 0..BUSY_RETRIES {
        if classify(function, rv) != Answer::Busy {
            break;
        }
        crate::clock::sleep(pause);
        pause *= 4;
        rv = call();
    }
    rv
}

/// How often a member that answered `C_Login` with `CKR_GENERAL_ERROR` is
/// asked again, the first pause and the longest: pauses double from 5 ms
/// up to 250 ms, so a login gives up after about 1.8 s. Eight SoftHSM
/// processes logging in at once, in over 1,300 rounds (60 of them beside
/// two busy loops), needed at most four more tries (75 ms) whenever a try
/// could succeed at all; the logins that failed for longer were
/// SoftHSM views that stay broken until the token file is written again
/// (see [`log_in_member`]).
const LOGIN_RETRIES: u32 = 12;
const FIRST_LOGIN_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_LOGIN_PAUSE: Duration = Duration::from_millis(250);

/// Logs a member session in, asking again a bounded number of times while
/// the member answers `CKR_GENERAL_ERROR` or `CKR_USER_PIN_NOT_INITIALIZED`.
/// SoftHSM answers one or the other, before it looks at the PIN, when it
/// reads its token file while another process rewrites it (every login
/// rewrites it): a file cut short, or one whose flags say no user PIN yet.
/// Many processes logging in together get them; asking the same member
/// again spends no PIN try, and no other member is asked.
///
/// A SoftHSM process that read the file cut short can keep answering
/// `CKR_GENERAL_ERROR` until the file is written again: it rereads the
/// file only when the generation number in it changed, and a writer that
/// found it cut short numbers it afresh, so the number can come back to
/// the one that process holds (SoftHSM 2.6.1: 1 in 200 to 1 in 1,600 of
/// the processes logging in eight at once, each unstuck at its next try by
/// a login of another process). Still refused after the bound, the answer
/// is a member fault ([`classify`]): the member goes out, the next one is
/// asked, and recovery logs it in once it can.
pub fn log_in_member(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    pin: Option<&[u8]>,
) -> CK_RV {
    let mut rv = library.login(session, user_type, pin);
    let mut pause = FIRST_LOGIN_PAUSE;
    for _ in 0..LOGIN_RETRIES {
        if rv != CKR_GENERAL_ERROR && rv != CKR_USER_PIN_NOT_INITIALIZED {
            break;
        }
        crate::clock::sleep(pause);
        pause = (pause * 2).min(LONGEST_LOGIN_PAUSE);
        rv = library.login(session, user_type, pin);
    }
    rv
}

/// [`retry_while_busy`] for a call that returns a value: asked once, and
/// again while the member answers busy.
pub fn retry_result_while_busy<T>(
    function: &str,
    mut call: impl FnMut() -> Result<T>,
) -> Result<T> {
    let result = call();
    match &result {
        Err(e) if classify(function, e.rv) == Answer::Busy => {
            let mut value = None;
            let rv = retry_while_busy(function, e.rv, || match call() {
                Ok(v) => {
                    value = Some(v);
                    CKR_OK
                }
                Err(e) => e.rv,
            });
            value.ok_or(Error::new(rv))
        }
        _ => result,
    }
}

#[cfg(test)]
mod tests;
