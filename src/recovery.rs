//! Bringing failed members back, and noticing members that hang.
//!
//! The recovery thread looks at failed members every
//! `AutoReconnectInterval` seconds -- and at once for each when its
//! group's last serving member fails -- and starts an attempt for each, at
//! most `reconnAtt` times each (-1: forever), each member in a thread of its
//! own, so that one member's reconnect never delays another's. Recovering
//! a member means: find its token again -- initialising its library again
//! if it is not initialised (a failed `C_Initialize` is only "not yet"), or
//! reconnecting it if its connection is gone and no healthy member shares
//! that library -- within one `memberTimeout` more for each search since
//! it was last found that its library did not answer (up to 10), then log
//! it in, replay the changes it missed, copy what it lacks
//! (`[HASynchronize]`), reopen member sessions behind open virtual
//! sessions (`activeEnhanced`), and only then -- with nothing left queued
//! for it -- put it back in the rotation. That second part too runs for
//! each member on its own, beside the other members' catch-ups (waiting
//! for one that hangs on a stalled source kept every other returning member
//! out); the watchdog cuts off any of its calls that hangs. A member that
//! may still make an object it was cut off making is left out until it
//! has, or has had time to.
//!
//! The watchdog thread takes out a member that has calls in flight but
//! completes none for `memberTimeout`, or whose library has had one call on
//! the wire that long, and severs its library's connection so that the
//! stuck calls return and fail over. It also has each group review
//! whether it serves ([`Group::review_serving`]: the HA log's lines for the
//! group as a whole, which members failing and rejoining trigger too). It
//! never calls a member.
//!
//! Recovery sits beside the group core: it reaches the provider that runs
//! it only through [`Host`]. Every time it reads is [`crate::clock`]'s, so
//! a test can run the watchdog and the retry and in-doubt rules on a
//! manual clock.

use crate::clock;
use crate::config::RecoveryMode;
use crate::error::rv_name;
use crate::error::Error;
use crate::group::Pending;
use crate::group::{
    now_ms, DoubtSince, Group, Location, Member, MemberState, Positions, ReplayingDeferred,
};
use crate::identity;
use crate::member::Unanswered;
use crate::member_api::{Hedge, MemberBackend, TokenSearch};
use crate::object::Era;
use crate::replication::{Holdings, IMPORTS_ON_SPARES};
use crate::virtual_session::VirtualSession;
use cryptoki_sys::*;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `reconnAtt`, `AutoReconnectInterval` and `VirtualTokenActiveRecovery`.
pub struct RecoverySettings {
    /// -1: forever; 0: never.
    pub attempts: i64,
    pub interval: Duration,
    pub mode: RecoveryMode,
}

/// What recovery needs of the provider that runs it. The provider
/// implements it, so that recovery sits beside the group core and never
/// reaches up into the provider.
pub trait Host: Send + Sync {
    fn groups(&self) -> &[Arc<Group>];
    fn libraries(&self) -> &[Arc<dyn MemberBackend>];
    fn recovery(&self) -> &RecoverySettings;
    /// How long a member may hold calls without completing any.
    fn member_timeout(&self) -> Duration;
    /// Whether a network member's call silent far longer than usual is cut
    /// before `member_timeout` ([`cut_silent_calls`]): `earlyHangDetection`,
    /// on unless the configuration turns it off.
    fn early_hang_detection(&self) -> bool {
        true
    }
    /// False when no call into a member may run in a thread of ours.
    fn threads_allowed(&self) -> bool;
    /// Whether `group`'s returning members are given what they lack.
    fn synchronize(&self, group: &Group) -> bool;
    /// Asks for a reconciliation pass soon (a member has returned).
    fn reconcile_soon(&self);
    /// Whether this process holds sessions of its own on a member slot
    /// outside the group: the application's pass-through sessions, or the
    /// sessions that keep the domain keys hidden behind pass-through slots.
    fn uses_member_slot(&self, library: &Arc<dyn MemberBackend>, slot: CK_SLOT_ID) -> bool;
    /// Runs `reopen` on every open virtual session of `group`, stopping at
    /// the first error.
    fn each_virtual_session(
        &self,
        group: &Arc<Group>,
        reopen: &mut dyn FnMut(&VirtualSession) -> Result<(), Error>,
    ) -> Result<(), Error>;
}

/// Background threads of one initialised provider.
pub struct Workers {
    shared: Arc<Shared>,
    recovery: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
}

/// The threads' flags and wake-ups. The standard library's futex-based
/// primitives, not parking_lot's: those keep parked threads in a
/// process-wide table, and a child after `fork` inherits the table's entries
/// for these threads, which do not exist there, and can crash on them when
/// its own workers wake each other.
#[derive(Default)]
struct Shared {
    flags: Mutex<Flags>,
    wake: Condvar,
}

impl Shared {
    fn flags(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a wake-up or `timeout`; true if it timed out.
    fn sleep<'a>(
        &self,
        flags: MutexGuard<'a, Flags>,
        timeout: Duration,
    ) -> (MutexGuard<'a, Flags>, bool) {
        let (flags, result) = self
            .wake
            .wait_timeout(flags, timeout)
            .unwrap_or_else(PoisonError::into_inner);
        (flags, result.timed_out())
    }
}

#[derive(Default)]
struct Flags {
    stop_recovery: bool,
    stop_watchdog: bool,
    /// Attempts are due at once ([`Group::review_serving`]): the recovery
    /// thread looks now, not at its next tick.
    prompt: bool,
    recovery_done: bool,
    /// Members (group, position) with an attempt under way.
    attempts: HashSet<(usize, usize)>,
    /// Threads making, after a member's return or in a retry, the changes
    /// kept for the serving members (see [`after_return`] and
    /// [`retry_kept_changes_beside`]).
    handing_over: usize,
    /// A retry of kept changes runs ([`retry_kept_changes_beside`]).
    retrying_kept: bool,
    /// When each member's last attempt ended ([`now_ms`]).
    last_ended: HashMap<(usize, usize), u64>,
}

impl Workers {
    /// Starts the watchdog, and the recovery thread unless recovery is off.
    pub fn start(provider: Weak<dyn Host>, recovery_on: bool) -> std::io::Result<Workers> {
        let shared = Arc::new(Shared::default());
        if let (true, Some(host)) = (recovery_on, provider.upgrade()) {
            for group in host.groups() {
                let shared = Arc::downgrade(&shared);
                group.set_recovery_wake(Box::new(move || {
                    if let Some(shared) = shared.upgrade() {
                        shared.flags().prompt = true;
                        shared.wake.notify_all();
                    }
                }));
            }
        }
        let recovery = if recovery_on {
            let (p, s) = (provider.clone(), Arc::clone(&shared));
            Some(
                std::thread::Builder::new()
                    .name("pkcs11-ha-recovery".into())
                    .spawn(move || recovery_loop(p, s))?,
            )
        } else {
            shared.flags().recovery_done = true;
            None
        };
        let (p, s) = (provider, Arc::clone(&shared));
        let watchdog = Some(
            std::thread::Builder::new()
                .name("pkcs11-ha-watchdog".into())
                .spawn(move || watchdog_loop(p, s))?,
        );
        Ok(Workers {
            shared,
            recovery,
            watchdog,
        })
    }

    /// Stops the recovery thread, waiting at most `limit` for the attempts
    /// under way; a thread still stuck on a member after that is left to
    /// finish on its own.
    pub fn stop_recovery(&mut self, limit: Duration) {
        let mut flags = self.shared.flags();
        flags.stop_recovery = true;
        self.shared.wake.notify_all();
        let deadline = clock::now() + limit;
        while !flags.recovery_done || !flags.attempts.is_empty() || flags.handing_over > 0 {
            let left = clock::block_for(deadline);
            if left.is_zero() {
                break;
            }
            flags = self.shared.sleep(flags, left).0;
        }
        let done = flags.recovery_done;
        drop(flags);
        if let Some(thread) = self.recovery.take() {
            if done {
                let _ = thread.join();
            }
        }
    }

    /// Stops and joins the watchdog.
    pub fn stop_watchdog(&mut self) {
        self.shared.flags().stop_watchdog = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.watchdog.take() {
            let _ = thread.join();
        }
    }
}

/// How often the recovery thread looks for members due an attempt: a
/// member that has just failed is tried within this, not a whole
/// `AutoReconnectInterval` later.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

fn recovery_loop(provider: Weak<dyn Host>, shared: Arc<Shared>) {
    loop {
        let interval = match provider.upgrade() {
            Some(p) => p.recovery().interval,
            None => break,
        };
        {
            // Woken early by every attempt that ends (for `stop_recovery`):
            // the next look still waits out the tick, unless attempts are
            // due at once.
            let next_round = clock::now() + interval.min(RECOVERY_TICK);
            let mut flags = shared.flags();
            while !flags.stop_recovery && !flags.prompt && clock::now() < next_round {
                flags = shared.sleep(flags, clock::block_for(next_round)).0;
            }
            if flags.stop_recovery {
                break;
            }
            flags.prompt = false;
        }
        let Some(p) = provider.upgrade() else { break };
        start_attempts(&*p, &provider, &shared, interval);
        retry_kept_changes_beside(&*p, &shared);
    }
    shared.flags().recovery_done = true;
    shared.wake.notify_all();
}

/// Starts an attempt, in a thread of its own, for every failed member that
/// has none under way and is due one: it is due at once (its group's last
/// serving member failed: [`Group::review_serving`]), it failed since its
/// last attempt ended (or never had one), or that attempt ended `interval`
/// ago. A member that fails is tried at once -- a reset connection is
/// usually back by then -- and from then on every `interval`.
fn start_attempts(
    provider: &dyn Host,
    weak: &Weak<dyn Host>,
    shared: &Arc<Shared>,
    interval: Duration,
) {
    for (g, group) in provider.groups().iter().enumerate() {
        for member in &group.members {
            let key = (g, member.position);
            if !still_down(group, member) {
                continue;
            }
            {
                let mut flags = shared.flags();
                let due = attempt_is_due(member, flags.last_ended.get(&key).copied(), interval);
                // One under way already tries again at once if due
                // (`attempts_while_none_serves`), or has this thread look
                // again as it ends.
                if !due || !flags.attempts.insert(key) {
                    continue;
                }
            }
            let (weak, shared_for_thread) = (weak.clone(), Arc::clone(shared));
            let spawned = std::thread::Builder::new()
                .name(format!("pkcs11-ha-recover-{}", member.serial))
                .spawn(move || {
                    let provider = weak.upgrade();
                    let returned = provider.as_ref().is_some_and(|p| {
                        attempts_while_none_serves(
                            &**p,
                            &p.groups()[key.0],
                            key.1,
                            &shared_for_thread,
                            interval,
                        )
                    });
                    // The attempt ends before the kept changes are made: a
                    // backlog of a thousand took this thread two minutes,
                    // and a member that failed again meanwhile had no
                    // attempt until then (the long chaos run's settling).
                    let mut flags = shared_for_thread.flags();
                    flags.attempts.remove(&key);
                    flags.last_ended.insert(key, now_ms());
                    if returned {
                        flags.handing_over += 1;
                    }
                    if provider
                        .as_ref()
                        .is_some_and(|p| p.groups()[key.0].members[key.1].attempt_due())
                    {
                        flags.prompt = true;
                    }
                    drop(flags);
                    shared_for_thread.wake.notify_all();
                    if let (true, Some(p)) = (returned, provider) {
                        after_return(&*p, &p.groups()[key.0]);
                        shared_for_thread.flags().handing_over -= 1;
                        shared_for_thread.wake.notify_all();
                    }
                });
            if spawned.is_err() {
                shared.flags().attempts.remove(&key);
                member.drop_attempt_due();
                group.wake_waiting_calls();
            }
        }
    }
}

/// Whether a failed member is due an attempt at `now` (all three in
/// [`now_ms`]): it failed after its last attempt ended, or never had one,
/// or that attempt ended `interval` ago.
fn due_for_attempt(failed_at: u64, last_ended: Option<u64>, now: u64, interval: Duration) -> bool {
    last_ended.is_none_or(|ended| {
        failed_at > ended || now.saturating_sub(ended) >= interval.as_millis() as u64
    })
}

/// The recovery thread's decision for a failed member with no attempt
/// under way: whether to start one now -- it is due at once
/// ([`Group::review_serving`]), or by [`due_for_attempt`] on the clock.
fn attempt_is_due(member: &Member, last_ended: Option<u64>, interval: Duration) -> bool {
    let now = now_ms();
    let failed_at = now.saturating_sub(member.ms_since_state_change());
    member.attempt_due() || due_for_attempt(failed_at, last_ended, now, interval)
}

/// Whether a member is still down; one that is not loses its due mark
/// (no attempt begins for it), and calls waiting for it look again.
fn still_down(group: &Group, member: &Member) -> bool {
    if member.state() == MemberState::Down {
        return true;
    }
    if member.attempt_due() {
        member.drop_attempt_due();
        group.wake_waiting_calls();
    }
    false
}

/// The recovery thread's rounds, run by hand in the caller's thread where
/// no thread of pkcs11-ha runs: the deterministic simulation
/// (`tests/simulation.rs`) runs one between the application's calls, and
/// while a call waits for a member to serve ([`Group::wait_for_serving`]).
/// Each round makes the decisions [`start_attempts`] and
/// [`attempts_while_none_serves`] make -- which failed member is due an
/// attempt, which run of attempts goes on while no member serves, which
/// mark a waiting call sees across a run's gap -- and runs each attempt it
/// starts to its end before the next.
pub struct Stepped {
    interval: Duration,
    /// When each member's last run of attempts ended ([`now_ms`]).
    last_ended: HashMap<(usize, usize), u64>,
    /// Members in a run of attempts while no member of their group serves.
    runs: HashMap<(usize, usize), Run>,
}

/// A run of attempts under way ([`attempts_while_none_serves`]).
struct Run {
    /// When the next attempt of the run begins, unless one is due sooner.
    next: Instant,
    /// Whether the run holds the member's under-way mark across the gap:
    /// its last attempt found the token.
    across_gap: bool,
}

impl Stepped {
    /// Starts stepping recovery for `provider`'s groups, as
    /// [`Workers::start`] starts the thread: failed members become due at
    /// once when their group's last serving member fails.
    /// Its wake-up does nothing: each round reads the due marks itself.
    pub fn start(provider: &dyn Host) -> Stepped {
        for group in provider.groups() {
            group.set_recovery_wake(Box::new(|| {}));
        }
        Stepped {
            interval: provider.recovery().interval,
            last_ended: HashMap::new(),
            runs: HashMap::new(),
        }
    }

    /// Whether a round now would begin an attempt.
    pub fn due(&self, provider: &dyn Host) -> bool {
        self.each_due(provider).next().is_some()
    }

    /// When an attempt falls due next on the clock, if no member's
    /// becomes due at once before.
    pub fn next_due(&self, provider: &dyn Host) -> Option<Instant> {
        let now = clock::now();
        let mut next = self.runs.values().map(|run| run.next).min();
        for (g, group) in provider.groups().iter().enumerate() {
            for member in &group.members {
                let key = (g, member.position);
                if member.state() != MemberState::Down || self.runs.contains_key(&key) {
                    continue;
                }
                let at = match self.last_ended.get(&key) {
                    Some(ended) => {
                        let since = now_ms().saturating_sub(*ended);
                        now + self.interval.saturating_sub(Duration::from_millis(since))
                    }
                    None => now,
                };
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// The members a round now would begin an attempt for: runs whose next
    /// attempt has come or is due at once, and members due one.
    fn each_due<'a>(&'a self, provider: &'a dyn Host) -> impl Iterator<Item = (usize, usize)> + 'a {
        let now = clock::now();
        provider
            .groups()
            .iter()
            .enumerate()
            .flat_map(|(g, group)| group.members.iter().map(move |m| ((g, m.position), m)))
            .filter(move |(key, member)| match self.runs.get(key) {
                Some(run) => member.attempt_due() || now >= run.next,
                None => {
                    member.state() == MemberState::Down
                        && attempt_is_due(member, self.last_ended.get(key).copied(), self.interval)
                }
            })
            .map(|(key, _)| key)
    }

    /// One round of the recovery thread: every attempt due now, each run
    /// to its end; then the copies waiting for a library to take the
    /// key-wrap mechanism again. Returns the members tried, with whether
    /// each serves again.
    pub fn round(&mut self, provider: &dyn Host) -> Vec<((usize, usize), bool)> {
        for group in provider.groups() {
            for member in &group.members {
                still_down(group, member);
            }
        }
        let due: Vec<(usize, usize)> = self.each_due(provider).collect();
        let mut tried = Vec::new();
        for key in due {
            let group = &provider.groups()[key.0];
            group.members[key.1].set_attempt_under_way(true);
            if self.runs.get(&key).is_some_and(|run| run.across_gap) {
                group.members[key.1].set_attempt_under_way(false);
            }
            let attempted = attempt(provider, group, key.1);
            let goes_on =
                attempted != Attempted::Serves && tries_again_in_the_run(provider, group, key.1);
            // Only an attempt that fell short holds its mark across the gap.
            let across_gap = goes_on && attempted == Attempted::FellShort;
            if !across_gap {
                group.members[key.1].set_attempt_under_way(false);
            }
            if goes_on {
                let next = clock::now() + self.interval;
                self.runs.insert(key, Run { next, across_gap });
            } else {
                self.runs.remove(&key);
                self.last_ended.insert(key, now_ms());
            }
            group.wake_waiting_calls();
            let serves = attempted == Attempted::Serves;
            if serves {
                after_return(provider, group);
            }
            tried.push((key, serves));
        }
        retry_kept_changes(provider);
        tried
    }
}

fn watchdog_loop(provider: Weak<dyn Host>, shared: Arc<Shared>) {
    let mut watchdog = Watchdog::default();
    let mut next_look = clock::now();
    loop {
        let Some(p) = provider.upgrade() else { break };
        let tick = watchdog_tick(p.member_timeout());
        let now = clock::now();
        if now >= next_look {
            watchdog.look(&*p, now);
            next_look = now + tick;
        } else {
            watchdog.look_for_silent_calls(&*p, now);
        }
        drop(p);
        let mut flags = shared.flags();
        if !flags.stop_watchdog {
            flags = shared.sleep(flags, tick.min(SILENT_CALL_TICK)).0;
        }
        if flags.stop_watchdog {
            break;
        }
    }
}

/// How often the watchdog looks: a quarter of `memberTimeout`, between
/// 10 ms and 1 s.
pub fn watchdog_tick(member_timeout: Duration) -> Duration {
    (member_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// What the watchdog remembers from one look to the next: for each member,
/// its count of completed calls and since when it has not moved; for each
/// library, the call on the wire and since when. Its thread looks every
/// [`watchdog_tick`]; the simulation looks as its clock moves.
#[derive(Default)]
pub struct Watchdog {
    progress: HashMap<(usize, usize), (u64, Instant)>,
    on_wire: HashMap<usize, (u64, Instant)>,
    /// When it last looked for silent calls: a look that comes late finds
    /// this host stalled, and a call silent meanwhile proves nothing of
    /// its member.
    looked_for_silent_calls: Option<Instant>,
}

impl Watchdog {
    /// One look at `now`: takes out members that hang, cuts stalled
    /// connections, and has each group review whether it serves and which
    /// members are degraded.
    pub fn look(&mut self, provider: &dyn Host, now: Instant) {
        let timeout = provider.member_timeout();
        self.look_for_silent_calls(provider, now);
        check_for_stalls(provider, timeout, now, &mut self.progress);
        check_for_stalled_connections(provider, timeout, now, &mut self.on_wire);
        for group in provider.groups() {
            group.review_serving(now);
            group.review_latency(now);
        }
        crate::halog::summarize();
    }
}

impl Watchdog {
    /// Cuts the connections silent far longer than their calls usually
    /// take ([`cut_silent_calls`]), looked for every [`SILENT_CALL_TICK`]
    /// between two looks, unless this look comes late.
    pub fn look_for_silent_calls(&mut self, provider: &dyn Host, now: Instant) {
        let last = self.looked_for_silent_calls.replace(now);
        let on_time =
            last.is_none_or(|last| now.saturating_duration_since(last) <= SILENT_CALL_LATE);
        if on_time && provider.early_hang_detection() {
            cut_silent_calls(provider, provider.member_timeout(), now);
        }
    }
}

/// How often the watchdog looks for silent calls ([`cut_silent_calls`]),
/// a quarter of [`crate::member::round_trips::SILENT_FLOOR`].
const SILENT_CALL_TICK: Duration = Duration::from_millis(250);

/// A look for silent calls this long after the last finds the host
/// stalled: its own thread did not run when it should have.
const SILENT_CALL_LATE: Duration = Duration::from_millis(750);

/// Cuts the connection of a networked library on which a call has been
/// silent for many times its function's usual round trip
/// ([`MemberBackend::silent_call`]; [`crate::member::round_trips`]), and
/// takes out its members -- where each of their groups has another member
/// serving, so that the last is left to `memberTimeout` (a call slower than
/// usual is no reason for a group to stop serving). Waiting for
/// `memberTimeout` instead (Luna's 20 s by default), every call in flight
/// on a black-holed or paused path waited all of it, though the same calls
/// usually answered in milliseconds.
fn cut_silent_calls(provider: &dyn Host, timeout: Duration, now: Instant) {
    for library in provider.libraries() {
        let Some(call) = library.silent_call(now, timeout) else {
            continue;
        };
        let members = reachable_members_on(provider, library);
        let others_serve = members.iter().all(|(group, position)| {
            group.up_members().any(|m| {
                m.position != *position
                    && !m
                        .location()
                        .is_some_and(|l| Arc::ptr_eq(&l.library, library))
            })
        });
        if members.is_empty() || !others_serve {
            continue;
        }
        library.sever();
        let instance = call.spare.map_or("its first instance".to_string(), |i| {
            format!("its instance {i} (a spare)")
        });
        let event = format!(
            "library {} was silent for {} ms on {} on {instance}, which lately took at most \
             {:.1} ms; connection cut before memberTimeout ({} ms)",
            library.name(),
            call.waited.as_millis(),
            call.function,
            call.usual.as_secs_f64() * 1000.0,
            timeout.as_millis()
        );
        for (group, position) in members {
            group.member_failed(position, call.function, CKR_DEVICE_ERROR);
            group.log(Some(position), &event);
        }
    }
}

/// Takes out members that have had calls in flight and completed none for
/// `timeout`, and cuts their connection so that those calls return.
fn check_for_stalls(
    provider: &dyn Host,
    timeout: Duration,
    now: Instant,
    progress: &mut HashMap<(usize, usize), (u64, Instant)>,
) {
    for (g, group) in provider.groups().iter().enumerate() {
        for member in &group.members {
            let served = member.calls_served();
            let seen = progress
                .entry((g, member.position))
                .or_insert((served, now));
            if seen.0 != served || member.in_flight() == 0 {
                *seen = (served, now);
                continue;
            }
            if now.duration_since(seen.1) < timeout || !member.reachable() {
                continue;
            }
            *seen = (served, now);
            // Which call waits says whose the silence is: none on the wire
            // means the calls in flight wait inside this library.
            let waiting = member
                .location()
                .filter(|l| l.library.is_networked())
                .map_or(String::new(), |l| {
                    l.library
                        .stalled_call()
                        .map_or(" (no call of it on the wire)".to_string(), |call| {
                            format!(" (the oldest on the wire: {call})")
                        })
                });
            group.member_failed(member.position, "memberTimeout", CKR_DEVICE_ERROR);
            group.log(
                Some(member.position),
                &format!(
                    "member answered nothing for {} ms{waiting}; connection cut",
                    timeout.as_millis()
                ),
            );
            if let Some(location) = member.location() {
                location.library.sever();
            }
        }
    }
}

/// Cuts the connection of a networked library that has had one call on the
/// wire for `timeout`, and takes out the members on it: calls outside any
/// member's count (slot and token listings, pass-through calls) must not
/// wait on a silent server either.
fn check_for_stalled_connections(
    provider: &dyn Host,
    timeout: Duration,
    now: Instant,
    seen: &mut HashMap<usize, (u64, Instant)>,
) {
    for (i, library) in provider.libraries().iter().enumerate() {
        let call = library.call_on_wire();
        let first = seen.entry(i).or_insert((call, now));
        if call == 0 || first.0 != call {
            *first = (call, now);
            continue;
        }
        if now.duration_since(first.1) < timeout {
            continue;
        }
        *first = (call, now);
        if let Some(instance) = library.cut_stalled_spare_setup() {
            log_on_library(
                provider,
                library,
                &format!(
                    "library {} connected its instance {instance} (a spare) for {} ms; \
                     that connection cut, the member serves on without it",
                    library.name(),
                    timeout.as_millis()
                ),
            );
            continue;
        }
        let stalled = library
            .stalled_call()
            .map_or(String::new(), |call| format!(" to {call}"));
        library.sever();
        let event = format!(
            "library {} answered nothing for {} ms{stalled}; connection cut",
            library.name(),
            timeout.as_millis()
        );
        for_reachable_members_on(provider, library, |group, position| {
            group.member_failed(position, "memberTimeout", CKR_DEVICE_ERROR);
            group.log(Some(position), &event);
        });
    }
}

/// Says `event` in the HA log of each reachable member on `library`.
fn log_on_library(provider: &dyn Host, library: &Arc<dyn MemberBackend>, event: &str) {
    for_reachable_members_on(provider, library, |group, position| {
        group.log(Some(position), event)
    });
}

/// Runs `act` with the group and position of each reachable member whose
/// token is reached through `library`.
fn for_reachable_members_on(
    provider: &dyn Host,
    library: &Arc<dyn MemberBackend>,
    mut act: impl FnMut(&Group, usize),
) {
    for (group, position) in reachable_members_on(provider, library) {
        act(group, position);
    }
}

/// The group and position of each reachable member whose token is reached
/// through `library`.
fn reachable_members_on<'a>(
    provider: &'a dyn Host,
    library: &Arc<dyn MemberBackend>,
) -> Vec<(&'a Group, usize)> {
    let mut members = Vec::new();
    for group in provider.groups() {
        for member in &group.members {
            let on_library = member
                .location()
                .is_some_and(|l| Arc::ptr_eq(&l.library, library));
            if on_library && member.reachable() {
                members.push((&**group, member.position));
            }
        }
    }
    members
}

/// One recovery pass over every failed member of every group, one after
/// another: recovery during calls, for applications that forbid threads.
pub fn recover_failed_members(provider: &dyn Host) {
    for group in provider.groups() {
        for member in &group.members {
            if member.state() == MemberState::Down
                && attempt(provider, group, member.position) == Attempted::Serves
            {
                after_return(provider, group);
            }
        }
    }
    retry_kept_changes(provider);
}

/// Why the changes kept for serving members are tried now
/// ([`kept_retry`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeptRetry {
    /// What held them back may have ended: a library takes the key-wrap
    /// mechanism again, a member refused an object, changes were kept for
    /// a member catching up, or found queued for a serving member.
    Asked,
    /// Nothing asked for it ([`Group::kept_retry_due`]).
    Unasked,
}

/// Whether the changes kept for serving members that no member's return
/// would try again are due now, asked each recovery round while changes
/// are kept: the copies kept while a library refused the key-wrap
/// mechanism (see [`VirtualSession::waits_for_wrapping`]) once one has
/// stopped refusing -- a library that came to refuse mid-run may stop with
/// every member serving (simulation seeds 129, 499, 804) -- objects a
/// member refused while another took them, tried once more (one refused
/// again is dropped with a line in the HA log; reconciliation compares the
/// members), and changes found queued for a serving member. Whatever else
/// is kept is tried again unasked, less and less often.
fn kept_retry(group: &Group) -> Option<KeptRetry> {
    let stranded = group.keep_queued_of_serving();
    // Changes waiting for a doubt that has had its time are made now.
    let doubt_over = group.settle_carried(clock::now());
    if !group.has_deferred() {
        return None;
    }
    // Asked whatever else asks for the retry: skipped when a replay was
    // asked anyway, a member whose library stopped refusing was not read
    // again, and the replay kept its copies again, for good (simulation
    // seed 15032245).
    let resumed = group.wrapping_resumed();
    if stranded || doubt_over || group.kept_replay_asked() || resumed {
        Some(KeptRetry::Asked)
    } else {
        group
            .kept_retry_due(clock::now())
            .then_some(KeptRetry::Unasked)
    }
}

/// Makes the kept changes [`kept_retry`] found due; a retry nothing asked
/// for that makes any says so in the HA log, since some event should have.
fn retry_kept(group: &Arc<Group>, why: KeptRetry) {
    if why == KeptRetry::Asked {
        replay_deferred(group);
        return;
    }
    let Some(replaying) = group.replaying_deferred_if_idle() else {
        return;
    };
    let made = replay_kept(group, replaying);
    if made > 0 {
        group.log(
            None,
            &format!(
                "{made} kept changes made when tried again unasked: no return or login had \
                 made them since they were kept"
            ),
        );
    }
}

/// [`kept_retry`] and [`retry_kept`] for every group, in the caller's
/// thread (recovery during calls, and the simulation's stepped rounds).
fn retry_kept_changes(provider: &dyn Host) {
    for group in provider.groups() {
        if let Some(why) = kept_retry(group) {
            retry_kept(group, why);
        }
    }
}

/// [`retry_kept_changes`] for the recovery thread: the changes are made in
/// a thread of their own, one such thread at a time, since a replay of a
/// few hundred takes seconds and the attempts of members that fail
/// meanwhile must not wait for it.
fn retry_kept_changes_beside(provider: &dyn Host, shared: &Arc<Shared>) {
    if shared.flags().retrying_kept {
        return;
    }
    let due: Vec<(Arc<Group>, KeptRetry)> = provider
        .groups()
        .iter()
        .filter_map(|group| Some((Arc::clone(group), kept_retry(group)?)))
        .collect();
    if due.is_empty() {
        return;
    }
    {
        let mut flags = shared.flags();
        flags.retrying_kept = true;
        flags.handing_over += 1;
    }
    fn ended(shared: &Shared) {
        let mut flags = shared.flags();
        flags.retrying_kept = false;
        flags.handing_over -= 1;
        drop(flags);
        shared.wake.notify_all();
    }
    let shared_for_thread = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("pkcs11-ha-kept".into())
        .spawn(move || {
            for (group, why) in &due {
                retry_kept(group, *why);
            }
            ended(&shared_for_thread);
        });
    if spawned.is_err() {
        ended(shared);
    }
}

/// How a recovery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempted {
    /// The member serves again.
    Serves,
    /// Its token answered -- found, so its server is up -- but the member
    /// does not serve: it failed again while catching up, or may still make
    /// an object it was cut off making.
    FellShort,
    /// Its token was not found (its library answered without it, or did not
    /// answer), or `reconnAtt` allows no more attempts.
    NotFound,
}

/// One recovery attempt for a failed member, if `reconnAtt` allows one
/// more.
fn attempt(provider: &dyn Host, group: &Arc<Group>, position: usize) -> Attempted {
    let member = &group.members[position];
    if member.state() != MemberState::Down || group.refused_cached_pin(position) {
        return Attempted::NotFound;
    }
    let attempts = provider.recovery().attempts;
    let made = member
        .recovery_attempts
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if attempts >= 0 && made >= attempts as u64 {
        return Attempted::NotFound;
    }
    group.log(Some(position), &format!("recovery attempt {}", made + 1));
    let _under_way = AttemptUnderWay::start(group, position);
    let mut phases = Phases::start();
    match recover(provider, group, position, &mut phases) {
        Ok(copied) => {
            group.log_change(
                Some(position),
                &format!("member recovered; {copied} objects replicated or synchronised {phases}"),
            );
            Attempted::Serves
        }
        Err(setback) => {
            if member.state() == MemberState::Recovering {
                member.set_state(MemberState::Down);
            }
            // Where an attempt that found the token spent its time, up to
            // the setback: what held a member out that did not come back.
            phases.end("until then");
            let (event, attempted) = match setback {
                Setback::NotFound(why) => (format!("recovery failed: {why}"), Attempted::NotFound),
                Setback::Failed(why) => (
                    format!("recovery failed: {why}; {phases}"),
                    Attempted::FellShort,
                ),
                Setback::Waiting(why) => {
                    member
                        .recovery_attempts
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    (
                        format!("recovery waits: {why}; {phases}"),
                        Attempted::FellShort,
                    )
                }
            };
            group.log(Some(position), &event);
            attempted
        }
    }
}

/// One recovery attempt for a failed member ([`attempt`]) -- and, while
/// the group has no member serving and `reconnAtt` is -1, another every
/// `interval` (`AutoReconnectInterval`, as the recovery thread would
/// start it), or at once when the member is due one
/// ([`Group::review_serving`]), until the member serves, another member
/// does, or recovery stops. Calls finding no member serving wait for the
/// member during each attempt, and across the gap after one that found
/// its token ([`Attempted::FellShort`]: its server answers, and it failed
/// again while catching up or waits for an object in doubt), but not
/// after one that did not: with every member gone, a call answers once
/// each member's attempt has failed to find its token, instead of
/// waiting out `memberTimeout` across the gaps (`tests/failover.rs`). The
/// schedule stays that of `interval`: each attempt on a p11-kit member
/// has its server start a worker that loads the whole token, and in the
/// one chaos run that retried every 0.1 s two members did not serve again
/// within two minutes of its end (load 13; not shown to be the cause).
/// True if the member serves again.
fn attempts_while_none_serves(
    provider: &dyn Host,
    group: &Arc<Group>,
    position: usize,
    shared: &Shared,
    interval: Duration,
) -> bool {
    let member = &group.members[position];
    // The mark held across the gap, if any: taken away only once the next
    // attempt's is set, so that a waiting call never finds neither.
    let mut across_gap = None;
    loop {
        let under_way = AttemptUnderWay::start(group, position);
        drop(across_gap.take());
        let attempted = attempt(provider, group, position);
        if attempted == Attempted::Serves {
            return true;
        }
        if !tries_again_in_the_run(provider, group, position) {
            return false;
        }
        if attempted == Attempted::FellShort {
            across_gap = Some(under_way);
        } else {
            drop(under_way);
        }
        let next = clock::now() + interval;
        let mut flags = shared.flags();
        while !flags.stop_recovery && !member.attempt_due() && clock::now() < next {
            flags = shared.sleep(flags, clock::block_for(next)).0;
        }
        if flags.stop_recovery {
            return false;
        }
    }
}

/// Whether a member whose attempt just failed is tried again in the same
/// run (see [`attempts_while_none_serves`]): no member of its group
/// serves, it is still out, and `reconnAtt` is -1.
fn tries_again_in_the_run(provider: &dyn Host, group: &Group, position: usize) -> bool {
    provider.recovery().attempts < 0
        && group.up_members().next().is_none()
        && group.members[position].state() == MemberState::Down
}

/// Marks a member's recovery attempt as under way while it lives: calls
/// finding no member serving wait for the member meanwhile
/// ([`Group::wait_for_serving`]), and are woken when it ends.
struct AttemptUnderWay<'a> {
    group: &'a Group,
    position: usize,
}

impl<'a> AttemptUnderWay<'a> {
    fn start(group: &'a Group, position: usize) -> AttemptUnderWay<'a> {
        group.members[position].set_attempt_under_way(true);
        AttemptUnderWay { group, position }
    }
}

impl Drop for AttemptUnderWay<'_> {
    fn drop(&mut self) {
        self.group.members[self.position].set_attempt_under_way(false);
        self.group.wake_waiting_calls();
    }
}

/// What a member's return allows: objects it was not found to hold are
/// looked for again, the changes kept for the serving members are made
/// (the returned member may be the source they waited for), and a
/// reconciliation pass compares the members for what other processes
/// changed while it was away.
fn after_return(provider: &dyn Host, group: &Arc<Group>) {
    group.retry_absent();
    replay_deferred(group);
    provider.reconcile_soon();
}

/// How long, in `memberTimeout`s from the cut, a member that stays silent
/// is given to carry out a request that making an object was cut off in.
/// A stalled member that resumes carries out what it had received
/// (p11-kit's server does, after its client gave up on it); one silent
/// this much longer is taken to have dropped it.
const IN_DOUBT_TIMEOUTS: u32 = 4;

/// How many times its usual time to make an object a member is given to
/// carry out a request whose call faulted ([`InDoubtWait::with_usual_making`]).
const FAULT_WAIT_RATIO: u32 = 8;

/// The shortest wait for such a request.
const FAULT_WAIT_FLOOR: Duration = Duration::from_millis(250);

/// How long a member that may still make an object it was cut off making
/// is kept out: [`IN_DOUBT_TIMEOUTS`] from the cut, even once it answers
/// again. p11-kit's server answers a reconnect through a new worker
/// process while the worker that received the request may still be
/// stopped, and carries the request out only when that one resumes: a
/// wait that ended one `memberTimeout` after the member answered again
/// gave a soak run's key to a member whose worker, stopped for 2.4 s,
/// then made it a second time.
#[derive(Clone, Copy)]
struct InDoubtWait {
    after_cut: Duration,
    /// For a request whose call merely faulted ([`crate::group::Doubt::Faulted`]): one
    /// `memberTimeout`, the time any call is given to answer. Its server
    /// was answering (a silent one's calls are cut off, and wait
    /// `after_cut`) and carries out what it received at its own pace; a
    /// server killed with it never does, and the member waits for nothing
    /// -- for the whole `after_cut`, each return after a killed p11-kit
    /// worker would have waited 4 s.
    after_fault: Duration,
    /// How long [`settle_in_doubt`] may wait in place: none where the
    /// recovery runs inside an application's call.
    in_place: Duration,
}

impl InDoubtWait {
    fn new(provider: &dyn Host) -> InDoubtWait {
        let mut wait = InDoubtWait::for_timeout(provider.member_timeout());
        if !provider.threads_allowed() {
            wait.in_place = Duration::ZERO;
        }
        wait
    }

    fn for_timeout(member_timeout: Duration) -> InDoubtWait {
        InDoubtWait {
            after_cut: member_timeout * IN_DOUBT_TIMEOUTS,
            after_fault: member_timeout,
            in_place: member_timeout,
        }
    }

    /// The wait for member `position`: after a fault, many times what its
    /// library took lately to make an object ([`Self::with_usual_making`]).
    fn for_member(self, group: &Group, position: usize) -> InDoubtWait {
        let usual = (group.members[position].location())
            .and_then(|l| l.library.usual_round_trip("C_CreateObject"));
        self.with_usual_making(usual)
    }

    /// After a fault, at most [`FAULT_WAIT_RATIO`] times `usual_making`, the
    /// longest the member's server took lately to make an object, and at
    /// least [`FAULT_WAIT_FLOOR`]: a server that received the request
    /// carries it out at that pace. Waiting a whole `memberTimeout` each
    /// time, every return after a reset with an import in flight waited
    /// 1.3-1.5 s in doubt for a copy that never came (the request was lost
    /// with the connection), which turned a reset under writes into a
    /// return serving first with its backlog.
    fn with_usual_making(mut self, usual_making: Option<Duration>) -> InDoubtWait {
        if let Some(usual) = usual_making {
            let pace = (usual * FAULT_WAIT_RATIO).max(FAULT_WAIT_FLOOR);
            self.after_fault = self.after_fault.min(pace);
        }
        self
    }

    /// Whether, at `now`, a request in doubt `since` has had its time.
    fn over(&self, since: DoubtSince, now: Instant) -> bool {
        now >= self.until(since)
    }

    /// When a request in doubt `since` has had its time.
    fn until(&self, since: DoubtSince) -> Instant {
        since.at
            + if since.cut_off {
                self.after_cut
            } else {
                self.after_fault
            }
    }
}

/// Why a recovery attempt did not bring the member back.
enum Setback {
    /// Its token was not found; the attempt counts against `reconnAtt`.
    NotFound(String),
    /// It failed; the attempt counts against `reconnAtt`.
    Failed(String),
    /// The member may still make an object it was cut off making: it is
    /// tried again at the next interval, and the attempt does not count.
    Waiting(String),
}

impl From<String> for Setback {
    fn from(why: String) -> Setback {
        Setback::Failed(why)
    }
}

/// Where a recovery spent its time, phase by phase, for the HA log: what
/// an operator needs to see why a member took long to serve again.
struct Phases {
    started: Instant,
    last: Instant,
    spent: Vec<(&'static str, Duration)>,
    notes: Vec<String>,
    /// Imports made on spare instances ([`VirtualSession::import_on_spares`]).
    on_spares: OnSpares,
}

/// Imports made on spare instances, in how many runs, the time those runs
/// took, and of it the time lanes took to be ready and the listings of
/// the copies (see [`crate::replication::SpareImports`]).
#[derive(Default)]
struct OnSpares {
    made: usize,
    runs: usize,
    spent: Duration,
    set_up: Duration,
    listing: Duration,
}

impl Phases {
    fn start() -> Phases {
        let now = Instant::now();
        Phases {
            started: now,
            last: now,
            spent: Vec::new(),
            notes: Vec::new(),
            on_spares: OnSpares::default(),
        }
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Ends the phase under way, named `phase`.
    fn end(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.spent.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let each: Vec<String> = self
            .spent
            .iter()
            .map(|(phase, spent)| format!("{phase} {} ms", spent.as_millis()))
            .chain(self.notes.iter().cloned())
            .chain((self.on_spares.runs > 0).then(|| {
                let s = &self.on_spares;
                format!(
                    "{} imports made on spares in {} runs, {} ms ({} ms setting up lanes, {} ms \
                     listing the copies)",
                    s.made,
                    s.runs,
                    s.spent.as_millis(),
                    s.set_up.as_millis(),
                    s.listing.as_millis()
                )
            }))
            .collect();
        write!(
            f,
            "in {} ms ({})",
            (self.last - self.started).as_millis(),
            each.join(", ")
        )
    }
}

/// Changes left to copy that a member copies with writes held back.
const SHORT_TAIL: usize = 64;

/// Changes queued for a returning member beyond which it serves first
/// while another member serves, at its return ([`Known::of`]) or when its
/// tail grows past it ([`recover`]): one to two seconds of replay one by
/// one under the long chaos run's load (40-80 ms a change).
const SERVES_FIRST_BACKLOG: usize = 24;

/// Token objects seen on a returning member beyond which it serves first
/// rather than have them read, where counting them does not pay
/// ([`Known::of`]) or more changes came during its replay than counting
/// allows ([`replay_pending`]): reading costs about 0.2-0.36 ms an object
/// under the long chaos run's load (2.2 s for 6,027, 1.2 s for 6,568),
/// against an interval of 1 s.
const SERVES_FIRST_HOLDING: usize = 2_000;

/// How long a returning member catches up -- its objects read or
/// counted, its doubts waited for, what it missed replayed -- while
/// another member serves, before it serves first with the imports left
/// kept for right after ([`replay_pending`]) and its synchronisation left
/// to the reconciliation pass ([`bring_up_to_date`]): a backlog under the
/// bound above took 1.4 s to replay and 2.2 s more for its tail in a long
/// chaos run at load 10 (60-100 ms a change), past the issue's 2 s for a
/// return; counted from the replay's start only, a member reset in another
/// spent 0.5 s counting, 0.4 s replaying and 1.4 s synchronising (3.8 s
/// in all after the reset, its token found in 1.6 s).
const SLOW_REPLAY: Duration = Duration::from_millis(500);

/// Rounds of a tail a member serving first replays without holding
/// writes back: each defers what came meanwhile, in microseconds, so the
/// barrier (whose wait for the writes under way took up to 1.6 s in the
/// long chaos run) only guards against a tail of removals that never ends.
const SERVES_FIRST_UNHELD_ROUNDS: usize = 4;

/// Brings one member back; returns how many objects it received, and
/// notes in `phases` where its time went.
fn recover(
    provider: &dyn Host,
    group: &Arc<Group>,
    position: usize,
    phases: &mut Phases,
) -> Result<usize, Setback> {
    let location = find_token(provider, group, position).map_err(Setback::NotFound)?;
    phases.end("token found");
    group.forget_handles(position);
    // Sessions it held when it was taken out (the group's, and those of
    // virtual sessions, which never use them again) are all stale; where
    // the token kept them they would leak, with the session objects made in
    // them showing through the slot. No session of the new epoch is open
    // yet, so none is closed that is in use -- unless the process uses the
    // slot outside the group too: closing the application's pass-through
    // sessions, or those keeping the domain keys hidden there, would cost
    // more than the stale sessions, which the token drops when it restarts.
    if !provider.uses_member_slot(&location.library, location.slot) {
        let _ = location.library.close_all_sessions(location.slot);
    }
    group.relocate(position, location);
    group.members[position].begin_recovery();

    let worker = VirtualSession::internal(Arc::clone(group));
    let in_doubt_wait = InDoubtWait::new(provider);
    let outcome = bring_up_to_date(group, provider, position, &worker, in_doubt_wait, phases).and_then(
        |(mut copied, mut known, backlog)| {
            // Changes made while it was coming back were queued for it; it
            // serves again once none is left, which `rejoin` decides under
            // the lock that queues them. Under continuous writes the queue
            // never empties by itself: once it is short, or a round of
            // replay -- the first one included -- no longer halves it, new
            // writes wait at the barrier while the tail is copied, so the
            // rejoin takes the backlog's time, not forever. (Counted from
            // the second round, a member replaying as fast as the writes
            // came spent one more whole round chasing them.) Only while
            // another member serves: with none serving no write is made to
            // refill the queue (a change a call under way queues after the
            // rejoin is made on the member at once, `Group::queue_unless_up`),
            // and waiting for those calls kept a long chaos run's group out
            // 1.5 s longer.
            let mut barrier = None;
            let mut before = backlog;
            let (mut rounds, mut tail, mut at_barrier) = (0, 0, Duration::ZERO);
            let (mut settle_time, mut replay_time) = (Duration::ZERO, Duration::ZERO);
            while !group.rejoin(position) {
                if !group.members[position].reachable() {
                    return Err("the member failed again".to_string().into());
                }
                let left = group.pending_count(position);
                let others_serve = group.up_members().next().is_some();
                if !known.serves_first && others_serve && left > SERVES_FIRST_BACKLOG {
                    // Owed little at first, it met writes faster than its
                    // replay: a tail of 33 changes replayed behind the
                    // barrier held one out 5 s in the long chaos run.
                    known.serves_first = true;
                    phases.note(format!("tail of {left} changes: it serves first"));
                }
                let holds_back = !known.serves_first || rounds >= SERVES_FIRST_UNHELD_ROUNDS;
                if barrier.is_none()
                    && others_serve
                    && holds_back
                    && (left <= SHORT_TAIL || left > before / 2)
                {
                    let asked = Instant::now();
                    barrier = group.hold_writes(provider.member_timeout());
                    at_barrier += asked.elapsed();
                }
                before = left;
                rounds += 1;
                tail += left;
                let settling = Instant::now();
                settle_in_doubt(group, position, &worker, in_doubt_wait, phases)?;
                settle_time += settling.elapsed();
                let replaying = Instant::now();
                copied += replay_pending(group, position, &worker, &mut known, phases)?;
                replay_time += replaying.elapsed();
            }
            phases.end("tail");
            phases.note(format!(
                "tail: {tail} changes in {rounds} rounds, {} ms getting the write barrier, {} ms settling, {} ms replaying",
                at_barrier.as_millis(), settle_time.as_millis(), replay_time.as_millis()
            ));
            let writes_ended = barrier.is_some();
            drop(barrier);
            report_unsynchronised(
                group,
                position,
                &worker,
                std::mem::take(&mut known.unsynchronised),
                writes_ended,
                provider.member_timeout(),
            );
            Ok(copied)
        },
    );
    worker.close();
    outcome
}

/// Logs the member in, replays what it missed, copies what it lacks and
/// reopens sessions; returns how many objects it received, what is known
/// of what it now holds, and how many changes the replay found queued.
fn bring_up_to_date(
    group: &Arc<Group>,
    provider: &dyn Host,
    position: usize,
    worker: &VirtualSession,
    in_doubt_wait: InDoubtWait,
    phases: &mut Phases,
) -> Result<(usize, Known, usize), Setback> {
    let session = worker
        .member_session(position)
        .map_err(|e| format!("cannot open a session: {}", rv_name(e.rv)))?;
    // Read before the credential: a login meanwhile makes it older, never
    // newer, than the PIN tried, so a refusal never marks an untried one.
    let generation = group.login_generation();
    if let Some((user_type, pin)) = group.cached_login() {
        let guard = group.members[position].begin_call();
        let rv = crate::group::log_in_member(
            &*session.library,
            session.handle,
            user_type,
            pin.as_deref().map(|p| p.as_slice()),
        );
        drop(guard);
        if matches!(
            rv,
            CKR_PIN_INCORRECT
                | CKR_PIN_INVALID
                | CKR_PIN_LEN_RANGE
                | CKR_PIN_EXPIRED
                | CKR_PIN_LOCKED
        ) {
            group.note_pin_refused(position, generation);
            return Err(format!(
                "the member refused the group's PIN with {}: it is not tried there again until \
                 the application logs in again or changes its PIN through the group (a token may \
                 lock its user after a few wrong PINs); give the member the group's PIN first",
                rv_name(rv)
            )
            .into());
        }
        if rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN {
            return Err(format!("login refused with {}", rv_name(rv)).into());
        }
    }
    // Opened before any of its handles is cached, so that they stay valid
    // while it serves: with only the application's sessions open there,
    // closing them all had a SoftHSM token number its objects anew unseen,
    // and a synchronisation then named each copy a second object
    // (simulation seed 31534170).
    group
        .on_utility(position, |_| ())
        .map_err(|e| format!("cannot open the group's session: {}", rv_name(e.rv)))?;
    phases.end("login");
    // Known first: the objects in doubt have part of their time meanwhile.
    // One that lands after the reading is found by its own search below,
    // which the replay then knows of.
    let catching_up_since = clock::now();
    let mut known = Known::of(group, worker, position, phases)?;
    known.catching_up_since = Some(catching_up_since);
    phases.end(if known.complete {
        "objects read"
    } else if known.held_before.is_empty() {
        "objects not read"
    } else {
        "objects counted"
    });
    settle_in_doubt(group, position, worker, in_doubt_wait, phases)?;
    phases.end("in doubt");
    let backlog = group.pending_count(position);
    let mut copied = replay_pending(group, position, worker, &mut known, phases)?;
    phases.end("replay");
    if !known.serves_first
        && clock::since(catching_up_since) >= SLOW_REPLAY
        && group.up_members().next().is_some()
    {
        // Synchronising too would keep it out longer still, and a source
        // that fails meanwhile costs `memberTimeout`s more (3 s in a long
        // chaos run, after a 0.6 s replay): the reconciliation its return
        // asks for compares it instead.
        known.serves_first = true;
        phases.note(format!(
            "a slow catch-up ({} ms): it serves first",
            clock::since(catching_up_since).as_millis()
        ));
    }
    if provider.synchronize(group) && known.serves_first && !known.replay_failed {
        // Its objects were not read to compare: until the reconciliation
        // its return asks for has compared it, searches do not spread there.
        group.set_compared(position, false);
        phases.note("synchronisation left to the reconciliation pass: it serves first".to_string());
    } else if provider.synchronize(group) {
        match reconciliation_turn(group) {
            Some(_one_process_at_a_time) => {
                copied += synchronize(group, position, worker, &mut known, phases)?;
                phases.end("synchronisation");
            }
            None => {
                group.set_compared(position, false);
                phases.note(
                    "synchronisation left to the reconciliation pass another process is making"
                        .to_string(),
                );
            }
        }
    }
    if provider.recovery().mode == RecoveryMode::ActiveEnhanced {
        provider
            .each_virtual_session(group, &mut |v| v.member_session(position).map(|_| ()))
            .map_err(|e| format!("cannot reopen sessions: {}", rv_name(e.rv)))?;
        phases.end("sessions");
    }
    Ok((copied, known, backlog))
}

/// Names in the HA log the objects synchronisation could not give the
/// member, now that it serves -- except those it holds by now.
/// Synchronisation lists objects a call may still be making; that call
/// queues the object for the member (the tail replays it) or, once the
/// member serves, makes it there, and the long chaos run's HA log named
/// such keys as not synchronised although the member got them. So the
/// writes under way are waited for first (at the write barrier, at most
/// `wait`; already, where the tail raised it: `writes_ended`), and an
/// object is named only if the member holds no copy of it then, nor is
/// it gone from the group (its call failed and undid it).
fn report_unsynchronised(
    group: &Group,
    position: usize,
    worker: &VirtualSession,
    unsynchronised: Vec<Unsynchronised>,
    writes_ended: bool,
    wait: Duration,
) {
    if unsynchronised.is_empty() {
        return;
    }
    if !writes_ended {
        drop(group.hold_writes(wait));
    }
    let lacks = |object: CK_OBJECT_HANDLE| {
        let Some(entry) = group.objects.get(object) else {
            return false;
        };
        if matches!(entry.on[position], crate::object::Presence::Present(_)) {
            return false;
        }
        // Looked up without recording the copy: synchronisation may have
        // named the object under a handle of its own before its call
        // recorded it, and the copy is that call's object.
        !worker.fingerprint_of(object).is_some_and(|print| {
            group
                .find_on_utility(position, &print)
                .is_ok_and(|found| !found.is_empty())
        })
    };
    for item in unsynchronised {
        match item {
            Unsynchronised::Failed(object, why) if lacks(object) => {
                if group.members[position].reachable() {
                    group.note_refused(position, object);
                }
                group.log(
                    Some(position),
                    &format!(
                        "{} could not be synchronised: {why}",
                        worker.name_object(object)
                    ),
                );
            }
            Unsynchronised::Unreceivable { object, why, waits } if lacks(object) => group
                .skip_unreceivable(position, object, || worker.name_object(object), &why, waits),
            _ => {}
        }
    }
}

/// Synchronisation copies what other processes made, as a reconciliation
/// pass does (`reconcile.rs`), so it takes the group's lock file too: where
/// a recovery copied beside another process's pass, both copied every
/// missing object, and the member was left holding each twice (a rare
/// failure of `tests/reconcile.rs`, one process of eight having found the
/// member late). `Some` holds the lock; `None` while another process holds
/// it -- its pass copies what the member lacks, and this process's own,
/// asked for once the member serves, copies what is left. Without a state
/// directory, or where its lock file cannot be opened, no process can take
/// turns, and the recovery synchronises unlocked as before.
fn reconciliation_turn(group: &Group) -> Option<Option<crate::state_dir::GroupLock>> {
    let Some(state) = group.state.get() else {
        return Some(None);
    };
    match state.lock_group(&group.serial, Duration::ZERO, |_| true) {
        Ok(Some(lock)) => Some(Some(lock)),
        Ok(None) => None,
        Err(_) => Some(None),
    }
}

/// Objects the group saw on a member and not elsewhere, beyond which
/// [`synchronize`] reads the member's objects rather than look each up.
const LOOK_UPS_INSTEAD_OF_READING: usize = 64;

/// What a recovery knows of the member's objects: what it holds, to make
/// nothing there twice.
struct Known {
    holdings: Holdings,
    /// `holdings` were read from the member. Otherwise they list only what
    /// synchronisation copied there, and `held_before` what the group saw
    /// there before; the replay looks the member up for each change (a
    /// call that failed with the member may have made its object there).
    complete: bool,
    /// The fingerprints of those objects: an object the group has under
    /// two handles (one made when a member listed its copy before the
    /// group had mapped it) counts, and is known, once.
    held_before: rustc_hash::FxHashSet<Arc<identity::Fingerprint>>,
    /// Objects synchronisation could not give the member, named in the HA
    /// log only once it serves ([`report_unsynchronised`]).
    unsynchronised: Vec<Unsynchronised>,
    /// They were read after the recovery began ([`Known::read_now`]).
    read_late: bool,
    /// A change of its replay failed while it answered (a copy kept for
    /// its source included): synchronisation runs after all, also for a
    /// member serving first. In simulation seed
    /// 5724 a copy's source answered `CKR_OBJECT_HANDLE_INVALID` (its
    /// handle had gone stale with a reset) and, without the pass that
    /// names the source's objects afresh, two members ended without the
    /// key.
    replay_failed: bool,
    /// It serves first while another member serves: owed more than
    /// [`SERVES_FIRST_BACKLOG`] changes at its return or in its tail, it
    /// makes the removals and copies
    /// it missed and serves, and is given the imports it missed right
    /// after, while it serves ([`Known::of`]); or its replay has taken
    /// [`SLOW_REPLAY`] ([`replay_pending`]).
    serves_first: bool,
    /// When it began to catch up, logged in (the clock's), for
    /// [`SLOW_REPLAY`].
    catching_up_since: Option<Instant>,
}

/// An object synchronisation listed on a serving member and could not
/// give the returning one.
enum Unsynchronised {
    /// Its copy failed, for this reason.
    Failed(CK_OBJECT_HANDLE, String),
    /// A key no serving member can give it (see
    /// [`Group::skip_unreceivable`]).
    Unreceivable {
        object: CK_OBJECT_HANDLE,
        why: String,
        waits: bool,
    },
}

impl Known {
    /// Reads the member's objects -- not at all while no member serves
    /// (it serves first: nothing is made on it before it does but the
    /// removals it missed, each a search of its own), nor where it still
    /// holds as many token objects as the group saw on it before its
    /// handles were forgotten (its token kept them: a reset connection, a
    /// restarted server) and at most [`QUEUED_FOR_COUNTING`] changes are
    /// queued for it. Then those are taken as held, and counting them
    /// costs one search where reading them costs a call per object:
    /// 0.1-2.3 s for the few thousand objects of the long chaos run under
    /// load, at every attempt. Nor where it is owed more than
    /// [`SERVES_FIRST_BACKLOG`] changes, or would be read for more than
    /// [`SERVES_FIRST_HOLDING`] objects: it serves first, and what it
    /// missed is made right after. Reconciliation, which runs once
    /// the member is back, compares every member object by object as
    /// before.
    /// Notes in `phases` why the member was read rather than counted: the
    /// HA log shows how often the count applies.
    fn of(
        group: &Group,
        worker: &VirtualSession,
        position: usize,
        phases: &mut Phases,
    ) -> Result<Known, String> {
        if group.up_members().next().is_none() {
            // It serves first and is given the objects it missed right
            // after (see `replay_pending`), each looked up as it is made;
            // reading a few thousand objects here kept the whole group out
            // 0.2-2.8 s longer in the long chaos run. A member that serves
            // by the time synchronisation compares reads the objects there.
            phases.note("not read: no member serving".to_string());
            return Ok(Known::not_read(group.objects.era(position)));
        }
        let queued = group.pending_count(position);
        let held_before: rustc_hash::FxHashSet<_> = group
            .held_before(position)
            .into_iter()
            .filter_map(|object| group.objects.get(object)?.fingerprint)
            .collect();
        let reading_costs =
            !counting_pays(queued, held_before.len()) && held_before.len() > SERVES_FIRST_HOLDING;
        if queued > SERVES_FIRST_BACKLOG || reading_costs {
            // Made here one by one, a backlog of a few hundred changes (40-80
            // ms each under the long chaos run's load) held members out 9-16
            // s after their servers answered again; read and compared first,
            // 0.3-2.4 s more. So did reading a large token for a few changes
            // (2.2 s for 6,027 objects, a reset's return taking 4.5 s in the
            // long chaos run). Another member serves every object meanwhile.
            phases.note(if queued <= SERVES_FIRST_BACKLOG {
                format!(
                    "not read: {queued} changes queued, {} objects to read, it serves first",
                    held_before.len()
                )
            } else {
                format!("not read: {queued} changes queued, it serves first")
            });
            return Ok(Known {
                serves_first: true,
                ..Known::not_read(group.objects.era(position))
            });
        }
        if counting_pays(queued, held_before.len()) {
            let domain = worker.group.domain_handle(position);
            let everything: identity::Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
            let held_now = group
                .find_on_utility(position, &everything)
                .map_err(|e| format!("cannot list its objects: {}", rv_name(e.rv)))?
                .into_iter()
                .filter(|h| Some(*h) != domain)
                .count();
            if held_now >= held_before.len() {
                return Ok(Known {
                    held_before,
                    ..Known::not_read(group.objects.era(position))
                });
            }
            phases.note(format!(
                "read: it holds {held_now} token objects, {} seen there before",
                held_before.len()
            ));
        } else {
            phases.note(format!(
                "read: {} token objects seen there before, {queued} changes queued",
                held_before.len()
            ));
        }
        // The group's last serving member may fail while the objects are
        // read (0.1-2.7 s for the chaos run's tokens under load): the
        // reading stops, as if none had served at the start, so that the
        // member serves first instead of holding the group out meanwhile.
        let none_serves = || group.up_members().next().is_none();
        match Known::read_unless(worker, position, &none_serves)? {
            Some(known) => Ok(known),
            None => {
                phases.note("not read: no member serving since the reading began".to_string());
                Ok(Known::not_read(group.objects.era(position)))
            }
        }
    }

    /// Nothing known: each change looks the member up.
    fn not_read(era: Era) -> Known {
        Known {
            holdings: Holdings::none_read(era),
            complete: false,
            held_before: Default::default(),
            unsynchronised: Vec::new(),
            read_late: false,
            replay_failed: false,
            serves_first: false,
            catching_up_since: None,
        }
    }

    fn read(worker: &VirtualSession, position: usize) -> Result<Known, String> {
        Ok(Known::read_unless(worker, position, &|| false)?
            .expect("a reading that nothing stops ends"))
    }

    /// The member's objects read, or `None` if `stop` ended the reading.
    fn read_unless(
        worker: &VirtualSession,
        position: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Known>, String> {
        let holdings = Holdings::read_unless(worker, position, stop)
            .map_err(|e| format!("cannot list its objects: {}", rv_name(e.rv)))?;
        Ok(holdings.map(|holdings| Known {
            holdings,
            complete: true,
            held_before: Default::default(),
            unsynchronised: Vec::new(),
            read_late: false,
            replay_failed: false,
            serves_first: false,
            catching_up_since: None,
        }))
    }

    /// Whether to read the member's objects now, with `waiting` changes
    /// left to make on it: where they were not read (none served when the
    /// member returned, or they were counted) and more than
    /// [`QUEUED_FOR_COUNTING`] changes wait -- the tail, or those a member
    /// that began serving meanwhile lets it make -- while another member
    /// serves and the application is logged in (logged out, private
    /// objects would be missing from the reading). Each change looks the
    /// member up otherwise, a search SoftHSM answers by going through
    /// every object of the token: in the long chaos run replays giving
    /// 22-44 objects so took 3.2-8.3 s, where a reading in the replay took
    /// 22-223 ms in the run after. Once per recovery.
    fn reading_pays(&self, group: &Group, waiting: usize) -> bool {
        !self.complete
            && !self.read_late
            && !self.serves_first
            && waiting > QUEUED_FOR_COUNTING
            && group.holds_login()
            && group.up_members().next().is_some()
    }

    /// Reads the member's objects in place of what was taken as held (see
    /// [`Known::reading_pays`]), noting it in `phases`. The reading stops
    /// once no member serves, what was taken as held staying so: in a
    /// long chaos run one such reading in a tail took 2.1 s (677 objects),
    /// and the group's last serving member failed during it, leaving the
    /// group out until it ended.
    fn read_now(
        &mut self,
        group: &Group,
        worker: &VirtualSession,
        position: usize,
        waiting: usize,
        phases: &mut Phases,
    ) -> Result<(), String> {
        let started = Instant::now();
        self.read_late = true;
        let none_serves = || group.up_members().next().is_none();
        let Some(holdings) = Holdings::read_unless(worker, position, &none_serves)
            .map_err(|e| format!("cannot list its objects: {}", rv_name(e.rv)))?
        else {
            phases.note(format!(
                "read in the replay stopped after {} ms: no member serving",
                started.elapsed().as_millis()
            ));
            return Ok(());
        };
        self.holdings = holdings;
        self.complete = true;
        self.held_before.clear();
        phases.note(format!(
            "read in the replay, {waiting} changes waiting: {} objects in {} ms",
            self.holdings.count(),
            started.elapsed().as_millis()
        ));
        Ok(())
    }

    /// Whether the group saw `object` on the member before (by its kept
    /// fingerprint: without one it is looked up).
    fn held_before(&self, group: &Group, object: CK_OBJECT_HANDLE) -> bool {
        group
            .objects
            .get(object)
            .and_then(|o| o.fingerprint)
            .is_some_and(|print| self.held_before.contains(&print))
    }
}

/// Changes queued for a returning member up to which counting its objects
/// instead of reading them pays (see [`Known::of`]).
const QUEUED_FOR_COUNTING: usize = 4;

/// Whether to count a returning member's objects rather than read them:
/// only with a handful of changes queued, since each is then looked up,
/// and a look-up is a search that SoftHSM answers by going through every
/// object of the token. In the long chaos run (1,800 objects, load 10) a
/// replay of 272 changes so took 139 ms a change, 38 s in all, against
/// 26-54 ms a change after reading the objects (0.5 s); counted whenever
/// four calls per change came to fewer than the objects, it was.
fn counting_pays(queued: usize, held_before: usize) -> bool {
    held_before > 0 && queued <= QUEUED_FOR_COUNTING
}

/// How often a recovery looks again whether the member has made an object
/// in doubt, while it has its time.
const IN_DOUBT_POLL: Duration = Duration::from_millis(50);

/// How many of the objects a member serves with in doubt the HA log names.
const NAMED_IN_DOUBT: usize = 3;

/// Settles the objects whose making the member was cut off in, or faulted
/// in on a library whose server may still carry it out: each once
/// the member holds it, once the member has had its time to carry the
/// request out ([`InDoubtWait`]), or once it is gone from the group --
/// unless the call that made it failed (it was abandoned): then the copy
/// the member may still make is waited for like any other, and removed by
/// the removal queued for the member. Until then the member is not given
/// them again -- it would end with two when it resumes -- and so does not
/// come back; nor while a call making an object on it has yet to return
/// and say whether it was cut off. Where recovery has threads of its
/// own, the member serves at once if each object in doubt is one the
/// group holds, made by a call that returned -- without looking for its
/// copy first: the changes of those objects then wait on it for their
/// doubt ([`Group::carry_in_doubt`]), settled by the replay of kept
/// changes, which looks once the member serves. Otherwise the wait is
/// spent here, looking for the copies of the doubts it cannot serve with
/// (an object the group no longer holds, or whose call has not
/// returned) again every [`IN_DOUBT_POLL`], for at most one
/// `memberTimeout` (by then every request cut off before the member
/// answered again has had its time), and one look more where a doubt's
/// time ran out during the last: giving the attempt up instead cost
/// the next `AutoReconnectInterval`, and finding the token and logging in
/// again. An object whose call failed, or that was destroyed, is not
/// carried: a late copy of it landing on a member that serves would show
/// in searches there until its removal.
fn settle_in_doubt(
    group: &Group,
    position: usize,
    worker: &VirtualSession,
    wait: InDoubtWait,
    phases: &mut Phases,
) -> Result<(), Setback> {
    let wait = wait.for_member(group, position);
    let give_up = clock::now() + wait.in_place;
    loop {
        let mut waiting = None;
        let mut carriable = !wait.in_place.is_zero();
        let mut uncarried = Vec::new();
        for (object, since) in group.in_doubt(position) {
            let Some(since) = since else {
                waiting = Some("a call making an object on it is still under way".to_string());
                carriable = false;
                continue;
            };
            if wait.over(since, clock::now()) {
                group.settle_in_doubt(position, object);
                continue;
            }
            // A doubt the member could serve with is not looked for: a
            // look is a search of its token, which on SoftHSM reads every
            // object's files (in the long chaos runs the in-doubt phase of
            // returns took up to 1.7 s while the member, its server
            // healthy, was kept from serving, at times with no other
            // member serving); the replay of kept changes looks once it
            // serves.
            if since.carried_until.is_some() {
                continue;
            }
            let can_carry = !wait.in_place.is_zero()
                && group.objects.get(object).is_some()
                && !group.unfinished(object);
            if !can_carry && holds_in_doubt(group, worker, position, object) {
                group.settle_in_doubt(position, object);
                continue;
            }
            uncarried.push(object);
            carriable &= can_carry;
            waiting = Some(doubt_reason(since));
        }
        let Some(why) = waiting else {
            return Ok(());
        };
        if !group.members[position].reachable() {
            return Err("the member failed again".to_string().into());
        }
        if carriable {
            group.carry_in_doubt(position, |since| wait.until(since));
            note_carried(worker, &uncarried, &why, phases);
            return Ok(());
        }
        let now = clock::now();
        if now >= give_up {
            // A doubt whose time ran out during this look (its search for
            // the member's copy is slow under load) settles at the next
            // one: given up instead, the member waited for its next
            // attempt (the long chaos run: 2 s more after a reset).
            let ran_out = (group.in_doubt(position).into_iter()).any(|(o, since)| {
                uncarried.contains(&o) && since.is_some_and(|s| wait.over(s, now))
            });
            if !ran_out {
                return Err(Setback::Waiting(why));
            }
            continue;
        }
        clock::sleep(IN_DOUBT_POLL);
    }
}

/// Why a member waits for an object in doubt since `since`, for the HA log.
fn doubt_reason(since: DoubtSince) -> String {
    format!(
        "it may still make an object {} making {} ms ago",
        if since.cut_off {
            "it was cut off"
        } else {
            "a call faulted"
        },
        clock::since(since.at).as_millis()
    )
}

/// Notes in the recovery's phases the objects in doubt the member serves
/// with ([`Group::carry_in_doubt`]), naming a few.
fn note_carried(
    worker: &VirtualSession,
    carried: &[CK_OBJECT_HANDLE],
    why: &str,
    phases: &mut Phases,
) {
    let named: Vec<String> = (carried.iter().take(NAMED_IN_DOUBT))
        .map(|object| worker.name_object(*object))
        .collect();
    phases.note(format!(
        "{} objects in doubt ({why}; {}): it serves, their changes wait for the doubt",
        carried.len(),
        named.join(", ")
    ));
}

/// Whether member `position` holds `object`, in doubt there: its copy of
/// the group's object, or of the one a failed call abandoned (by the
/// fingerprint kept of it); an object neither is counted as held, since
/// nothing could find its copy.
fn holds_in_doubt(
    group: &Group,
    worker: &VirtualSession,
    position: usize,
    object: CK_OBJECT_HANDLE,
) -> bool {
    if group.objects.get(object).is_some() {
        return worker.holds(object, position, None);
    }
    match group.abandoned_print(object) {
        Some(print) => group
            .on_utility(position, |s| group.find_on(position, s, &print))
            .is_ok_and(|found| found.is_ok_and(|f| !f.is_empty())),
        None => true,
    }
}

/// Finds the member's token: on its library, or, for a member never
/// found, on another (one serving healthy members, or one no other failed
/// member is on), each given [`find_patience`] (where the application
/// allows threads) --
/// initialised first if it is not (its last
/// `C_Initialize` failed or never answered), or reconnected if its
/// connection is gone and no healthy member depends on it. A library whose
/// last call has not returned is not called.
fn find_token(provider: &dyn Host, group: &Group, position: usize) -> Result<Location, String> {
    let serial = &group.members[position].serial;
    let known = group.members[position].location();
    // A member found before is looked for on its own library only: a
    // library serving healthy members may be one whose path has just gone
    // silent, unseen yet, and a search there held the attempt until the
    // watchdog cut it (2.4 s of a long chaos run's return, its own path
    // refusing).
    let libraries: Vec<_> = match &known {
        Some(loc) => vec![Arc::clone(&loc.library)],
        None => provider.libraries().to_vec(),
    };
    let this_member = &group.members[position];
    let mut silent = Vec::new();
    for library in libraries {
        let on_library = |m: &Arc<crate::group::Member>| {
            m.location()
                .is_some_and(|l| Arc::ptr_eq(&l.library, &library))
        };
        let members = || provider.groups().iter().flat_map(|g| g.members.iter());
        let shared_with_healthy = members().any(|m| m.reachable() && on_library(m));
        let anothers_recovery =
            members().any(|m| !Arc::ptr_eq(m, this_member) && !m.reachable() && on_library(m));
        // A member never found asks any library serving healthy members,
        // or one no other failed member is on (that member's recovery may
        // be using it).
        if known.is_none() && !shared_with_healthy && anothers_recovery {
            continue;
        }
        let may_reconnect =
            !library.usable() || (library.initialized_by_us() && !shared_with_healthy);
        let job = || -> TokenSearch {
            let wanted = serial.clone();
            Box::new(move |library: &dyn MemberBackend| {
                if library.usable() {
                    if let Some(slot) = token_slot(library, &wanted) {
                        return Some(slot);
                    }
                }
                if !may_reconnect || library.reinitialize().is_err() {
                    return None;
                }
                token_slot(library, &wanted)
            })
        };
        let mut waited = Duration::ZERO;
        let answer = if provider.threads_allowed() {
            let patience = find_patience(provider.member_timeout(), this_member);
            waited = patience;
            let search = |patience: Duration| {
                let wanted = serial.clone();
                let hedge = Hedge {
                    after: provider.member_timeout(),
                    check: Arc::new(move |fresh: &dyn MemberBackend| {
                        token_slot(fresh, &wanted).is_some()
                    }),
                };
                Arc::clone(&library).search_hedged(job(), clock::now() + patience, patience, hedge)
            };
            let mut searched = search(patience);
            if matches!(searched, Some(Err(Unanswered::DeadConnection))) {
                // Its connection is dead and the server well: once more at
                // once, the dead job cut off, reconnecting, with twice the
                // patience -- the server answered a fresh connection, so
                // the reconnect fails only if it is cut off while the
                // server loads the token (7 of 74 such reconnects in seven
                // long chaos runs, each costing an attempt more).
                group.log(
                    Some(position),
                    &format!(
                        "{} answered nothing on its connection while a fresh connection found the token: reconnecting",
                        library.name()
                    ),
                );
                waited = patience * 2;
                searched = search(waited);
            }
            let Some(answer) = searched else {
                silent.push(format!(
                    "{} (its last call has not returned)",
                    library.name()
                ));
                continue;
            };
            answer
        } else {
            Ok(job()(&*library))
        };
        match answer {
            Ok(Some(slot)) => {
                this_member
                    .silent_searches
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                return Ok(Location { library, slot });
            }
            Ok(None) => {}
            Err(Unanswered::DeadConnection) => silent.push(format!(
                "{} (its connection answered nothing while a fresh one did)",
                library.name()
            )),
            Err(Unanswered::Silent) => {
                // A wait as long as the interval stands for it: a path
                // that heals while the search waits answers the next
                // attempt, which a whole `AutoReconnectInterval` more
                // only delayed (the long chaos run's slowest return,
                // 3.8 s, waited a second so).
                if waited >= provider.recovery().interval {
                    group.attempt_at_once(position);
                }
                silent.push(format!(
                    "{} (no answer within {} ms)",
                    library.name(),
                    waited.as_millis()
                ));
            }
        }
    }
    if silent.is_empty() {
        Err(format!("token {serial} not found"))
    } else {
        this_member
            .silent_searches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(format!(
            "token {serial} not found; not answering: {}",
            silent.join(", ")
        ))
    }
}

/// Silent searches after which looking for a member's token is given no
/// more patience: [`find_patience`] grows to this many `memberTimeout`s.
const FIND_PATIENCE_TIMEOUTS: u32 = 10;

/// How long one attempt waits for the member's library to find its token:
/// one `memberTimeout` more for each search since the token was last found
/// that a library did not answer, up to [`FIND_PATIENCE_TIMEOUTS`] (a
/// quick "not found" does not start it over: after a cut-off the next
/// reconnect may fail at once). Reconnecting can take one call longer than
/// `memberTimeout` (p11-kit's client initialises: its server loads the
/// whole token, 0.35 s for 8,000 objects on an idle SoftHSM), and a job
/// cut off at a flat deadline started that call over at every attempt, so
/// such a member never came back; a hung library is still abandoned and
/// reported at each attempt.
fn find_patience(member_timeout: Duration, member: &crate::group::Member) -> Duration {
    let silent = member
        .silent_searches
        .load(std::sync::atomic::Ordering::Relaxed);
    let timeouts = (silent + 1).min(u64::from(FIND_PATIENCE_TIMEOUTS)) as u32;
    member_timeout * timeouts
}

fn token_slot(library: &dyn MemberBackend, serial: &str) -> Option<CK_SLOT_ID> {
    library.token_slots().ok()?.into_iter().find(|slot| {
        library
            .token_info(*slot)
            .is_ok_and(|info| Group::member_serial(&info) == *serial)
            && crate::strategy::refusal(library, *slot).is_none()
    })
}

/// Applies the changes the member missed, in order. On a failure the rest
/// stay queued for the next attempt. While the group has no member
/// serving, the objects it missed are kept for right after it rejoins
/// ([`replay_deferred`]) instead of made first: every call on the group
/// fails until a member serves, and making a backlog of a few hundred
/// objects took 5-20 s (the long chaos run's outages while a returning
/// member's server was healthy). Removals are made in place, so that no
/// object the application destroyed shows on it.
fn replay_pending(
    group: &Group,
    position: usize,
    worker: &VirtualSession,
    known: &mut Known,
    phases: &mut Phases,
) -> Result<usize, String> {
    let mut pending: VecDeque<Pending> = group.take_pending(position).into();
    // Removals kept for later: what could match them waits behind them.
    let mut removals = group.deferred_removals(position);
    let mut applied = 0;
    let mut kept = 0;
    let mut after_rejoining = 0;
    // Changes at the front of `pending` to make one by one: what a run on
    // spares left, or a run too short for them.
    let mut one_by_one: usize = 0;
    let began = *known.catching_up_since.get_or_insert_with(clock::now);
    let mut slow = false;
    while let Some(mut change) = pending.pop_front() {
        if !known.serves_first
            && clock::since(began) >= SLOW_REPLAY
            && group.up_members().next().is_some()
        {
            known.serves_first = true;
            slow = true;
            phases.note(format!(
                "a slow catch-up: {} changes left after {} ms, it serves first",
                pending.len() + 1,
                clock::since(began).as_millis()
            ));
        }
        if known.reading_pays(group, pending.len() + 1) {
            if known.held_before.len() > SERVES_FIRST_HOLDING {
                // As for a member that would be read before its replay
                // (`Known::of`): read here, 6,568 objects took 1.2 s in a
                // long chaos run, and the member served first anyway as
                // the replay had passed `SLOW_REPLAY` (a reset's return in
                // 4.1 s, for 7 changes).
                known.serves_first = true;
                phases.note(format!(
                    "not read in the replay: {} changes waiting, {} objects to read, it \
                     serves first",
                    pending.len() + 1,
                    known.held_before.len()
                ));
            } else if let Err(why) =
                known.read_now(group, worker, position, pending.len() + 1, phases)
            {
                group.requeue(position, std::iter::once(change).chain(pending).collect());
                return Err(why);
            }
        }
        let on_its_own = one_by_one > 0;
        one_by_one = one_by_one.saturating_sub(1);
        let makes_object = matches!(change, Pending::Create(_) | Pending::Import(..));
        // Serving first for its backlog, it still takes its copies here,
        // from a serving member: a copy that fails is then given to it by
        // synchronisation before it serves (see `Known::replay_failed`).
        let after_serving = group.up_members().next().is_none()
            || (known.serves_first && matches!(change, Pending::Import(..)));
        if makes_object && after_serving {
            group.defer(position, change);
            after_rejoining += 1;
            continue;
        }
        // The member may still make the object it names: the change waits
        // on it for that (`Group::carry_in_doubt`).
        if group.doubt_ahead(position, &change, None).is_some() {
            removals.extend(change.destroyed().cloned());
            group.defer(position, change);
            continue;
        }
        // Behind an earlier change of the same object kept above, as it
        // was made: ahead of it, a change of attributes copied the object
        // under its new ID, which the kept import then found and left
        // (simulation seed 4208).
        if (change.made_object()).is_some_and(|object| group.change_kept(position, object)) {
            group.defer(position, change);
            continue;
        }
        if worker.behind_a_removal(&removals, &change) {
            group.defer(position, change);
            kept += 1;
            continue;
        }
        if (change.removal()).is_some_and(|print| group.removal_behind_kept_set(position, print)) {
            removals.extend(change.destroyed().cloned());
            group.defer(position, change);
            kept += 1;
            continue;
        }
        let logged_out = !group.holds_login();
        if !on_its_own
            && removals.is_empty()
            && known.complete
            && !logged_out
            && matches!(change, Pending::Import(..))
            && has_spares(group, position)
        {
            let mut run = import_run(change, &mut pending, |next| {
                group.doubt_ahead(position, next, None).is_none()
            });
            if run.len() >= IMPORTS_ON_SPARES {
                let started = Instant::now();
                let done = worker.import_on_spares(position, run, &mut known.holdings);
                let on_spares = &mut phases.on_spares;
                on_spares.made += done.made;
                on_spares.runs += 1;
                on_spares.spent += started.elapsed();
                on_spares.set_up += done.set_up;
                on_spares.listing += done.listing;
                applied += done.made;
                known.complete = done.holdings_current;
                one_by_one = done.left.len();
                for change in done.left.into_iter().rev() {
                    pending.push_front(change);
                }
                continue;
            }
            let rest = run.split_off(1);
            one_by_one = rest.len();
            for later in rest.into_iter().rev() {
                pending.push_front(later);
            }
            change = run.pop().expect("a run holds its first change");
        }
        // Not read: each change looks the member up itself.
        let holdings = known.complete.then_some(&mut known.holdings);
        let outcome = worker.apply(position, &change, holdings);
        let source_failed = change_copies(&change) && outcome.is_err();
        if group.members[position].reachable()
            && (source_failed || must_wait(group, logged_out, worker, position, &change, &outcome))
        {
            // A copy's source may have been down or failed during it, or
            // the application is logged out: kept for when a member
            // returns or it logs in, rather than dropped for good.
            known.replay_failed |= source_failed;
            removals.extend(change.destroyed().cloned());
            group.defer(position, change);
            kept += 1;
            continue;
        }
        match outcome {
            Ok(made) => applied += usize::from(made),
            Err(why) if group.members[position].reachable() => {
                // The member answered but cannot take this object: say so and
                // go on; operations on it run on the members that have it.
                known.replay_failed = true;
                group.log(
                    Some(position),
                    &format!(
                        "{} could not be replayed: {why}",
                        worker.name_change(&change)
                    ),
                );
            }
            Err(why) => {
                group.requeue(position, std::iter::once(change).chain(pending).collect());
                return Err(why);
            }
        }
    }
    if after_rejoining > 0 {
        let why = if slow {
            "a slow catch-up"
        } else if known.serves_first {
            "a long backlog"
        } else {
            "no member serving"
        };
        group.log(
            Some(position),
            &format!(
                "{why}: it serves first, and the {after_rejoining} objects it missed are made \
                 on it right after"
            ),
        );
    }
    if kept > 0 && !group.holds_login() {
        // The member serves without them: an operator must know that it
        // lacks objects until the application logs in.
        group.log(
            Some(position),
            &format!(
                "changes it missed wait for the application's next login: {kept} \
                 (private objects cannot be made or found while it is logged out)"
            ),
        );
    }
    Ok(applied)
}

/// Whether member `position`'s library has spare instances to replay on.
fn has_spares(group: &Group, position: usize) -> bool {
    group.members[position]
        .location()
        .is_some_and(|l| l.library.has_spares())
}

/// `first`, an import, and the imports right after it in `pending`, each
/// object once: a run whose changes depend on none of each other, made on
/// spares at once ([`VirtualSession::import_on_spares`]). Any other change
/// ends it -- a removal must come after the import it removes, and before
/// any import after it, as they were made -- and so does an object met
/// twice, whose second import the first decides, or one `may_join` turns
/// away (its object in doubt on the member).
fn import_run(
    first: Pending,
    pending: &mut VecDeque<Pending>,
    may_join: impl Fn(&Pending) -> bool,
) -> Vec<Pending> {
    let mut objects = HashSet::new();
    if let Pending::Import(object, _) = &first {
        objects.insert(*object);
    }
    let mut run = vec![first];
    while let Some(next @ Pending::Import(object, _)) = pending.front() {
        if !may_join(next) || !objects.insert(*object) {
            break;
        }
        run.extend(pending.pop_front());
    }
    run
}

/// Makes on the serving members the changes they returned without (see
/// [`Group::defer`]), now that a member returned or the application logged
/// in; those that still cannot be made stay kept. Returns how many were
/// made.
pub fn replay_deferred(group: &Arc<Group>) -> usize {
    replay_kept(group, group.replaying_deferred())
}

/// [`replay_deferred`] for an application's login, which does not wait
/// for a replay under way: where a recovery thread runs, it is asked for
/// one after it ([`Group::ask_for_kept_replay`]). A member catching up
/// under continuous writes replays share after share for as long as it
/// catches up, and `C_Login` waited for all of it.
pub fn replay_deferred_after_login(group: &Arc<Group>) {
    if !group.replays_on_request() {
        replay_deferred(group);
    } else if let Some(replaying) = group.replaying_deferred_if_idle() {
        replay_kept(group, replaying);
    } else {
        group.ask_for_kept_replay();
    }
}

/// [`replay_deferred`], its turn taken: the kept changes of each serving
/// member made beside the others' ([`replay_kept_beside`]) where the
/// provider runs threads, else in turns in this thread
/// ([`replay_kept_in_turns`], the deterministic simulation's way).
fn replay_kept(group: &Arc<Group>, _one_at_a_time: ReplayingDeferred) -> usize {
    let made = if group.members_in_threads() {
        replay_kept_beside(group)
    } else {
        replay_kept_in_turns(group)
    };
    if made > 0 {
        group.kept_changes_made();
    }
    made
}

/// How often [`replay_kept_beside`] looks for a member that came to serve
/// with changes kept for it while the replay runs: a call waiting for one
/// of them is made to wait this much longer at most.
const KEPT_REPLAY_LOOK: Duration = Duration::from_millis(100);

/// [`replay_kept`] with each serving member's changes made in a thread of
/// its own ([`replay_member_kept`]); a member that comes to serve while it
/// runs is taken in within [`KEPT_REPLAY_LOOK`], and so is one whose part
/// ended once more is kept for it than it left (what the application
/// writes meanwhile joins its kept changes, `Group::catching_up`, and a
/// call waiting for such an object waited for the whole replay). In one thread, in
/// turns, the members were served one after another: in a long chaos run
/// three members owed 1,958, 3,397 and 2,705 changes when the writers
/// stopped; the first drained at 36-40 a second while the others waited,
/// one for 90 s, the last past the 120 s the run allows for settling --
/// and a change stuck on a stopped member held every member's turns until
/// the watchdog cut it. Imports made at once wait together on the
/// members' disks (11 a second from one thread on SoftHSM, 24 from two),
/// so members served at once drain nearly as fast each as one alone.
fn replay_kept_beside(group: &Arc<Group>) -> usize {
    let made = std::sync::atomic::AtomicUsize::new(0);
    let (ended, end) = std::sync::mpsc::channel::<(usize, Option<usize>)>();
    std::thread::scope(|scope| {
        let mut running: Vec<usize> = Vec::new();
        // Per member whose part ended: how many changes it left kept, as
        // its last look counted them (read once the end was heard, a
        // change kept in between counted as left, and the member was not
        // taken in again for it: `tests/member_api.rs`, 2 runs in 26
        // beside a simulation).
        let mut left_kept: HashMap<usize, usize> = HashMap::new();
        let heard = |(position, left): (usize, Option<usize>),
                     running: &mut Vec<usize>,
                     left_kept: &mut HashMap<usize, usize>| {
            running.retain(|p| *p != position);
            let left = left.unwrap_or_else(|| group.kept_count(position));
            left_kept.insert(position, left);
        };
        loop {
            // Parts that ended since, one run in this thread among them.
            while let Ok(part) = end.try_recv() {
                heard(part, &mut running, &mut left_kept);
            }
            let due: Vec<usize> = (group.up_members())
                .map(|m| m.position)
                .filter(|p| !running.contains(p))
                .filter(|p| group.kept_count(*p) > left_kept.get(p).copied().unwrap_or(0))
                .collect();
            for position in due {
                let (made, ended) = (&made, ended.clone());
                let member = move || {
                    let mut part = PartEnded {
                        position,
                        left: None,
                        tell: ended,
                    };
                    let (count, left) = replay_member_kept(group, position);
                    part.left = Some(left);
                    made.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                };
                let spawned = std::thread::Builder::new()
                    .name("pkcs11-ha-kept".into())
                    .spawn_scoped(scope, member.clone());
                running.push(position);
                if spawned.is_err() {
                    member();
                }
            }
            if running.is_empty() {
                break;
            }
            if let Ok(part) = end.recv_timeout(KEPT_REPLAY_LOOK) {
                heard(part, &mut running, &mut left_kept);
            }
        }
    });
    made.into_inner()
}

/// Tells [`replay_kept_beside`] that a member's part ended, however it
/// ended, and how many changes it left kept (unknown if it panicked): a
/// part that panicked and said nothing would hold the replay, and every
/// replay and login after it, for good.
struct PartEnded {
    position: usize,
    left: Option<usize>,
    tell: std::sync::mpsc::Sender<(usize, Option<usize>)>,
}

impl Drop for PartEnded {
    fn drop(&mut self) {
        let _ = self.tell.send((self.position, self.left));
    }
}

/// Makes the changes kept for serving member `position` in this thread,
/// share after share ([`KeptReplay::take_next_share`]): its part of
/// [`replay_kept_beside`]. Returns how many it made, and how many it left
/// kept as its last look counted them.
fn replay_member_kept(group: &Arc<Group>, position: usize) -> (usize, usize) {
    let worker = VirtualSession::internal(Arc::clone(group));
    let mut replay = KeptReplay::new(group, position, false);
    let mut made = 0;
    let left = loop {
        let wanted = group.kept_object_wanted(position, &replay.kept_again);
        if !wanted && replay.left == 0 {
            if let Err(left) = replay.take_next_share(group) {
                break left;
            }
        }
        let kept_again = replay.kept_again.clone();
        let call_waits = || group.kept_object_wanted(position, &kept_again);
        made += take_kept_turn(group, &worker, &mut replay, wanted, &call_waits);
    };
    worker.close();
    (made, left)
}

/// [`replay_kept`] in this thread: the members take turns, one change
/// each, and a member a call waits for an object on
/// ([`Group::wait_for_kept`]) goes next: one member's replay after
/// another's, a call waiting for a key on the second waited behind the
/// whole backlog of the first, and failed (the soak: two members serving
/// first with 98 and 41 changes kept, the keys only on the third, which
/// failed). A member that comes to serve first while it runs joins it
/// ([`take_in_serving`]).
fn replay_kept_in_turns(group: &Arc<Group>) -> usize {
    let worker = VirtualSession::internal(Arc::clone(group));
    let mut replays: Vec<KeptReplay> = Vec::new();
    let mut made = 0;
    let mut turn = 0;
    let mut late = false;
    loop {
        take_in_serving(group, &mut replays, late);
        late = true;
        let Some((i, wanted)) = next_kept_turn(group, &mut replays, &mut turn) else {
            break;
        };
        let members: Vec<(usize, Vec<CK_OBJECT_HANDLE>)> = (replays.iter())
            .map(|r| (r.position, r.kept_again.clone()))
            .collect();
        // On a member of the replay, but for an object it kept again;
        // on one that came to serve since, any: it joins for it.
        let call_waits = || {
            (members.iter()).any(|(p, again)| group.kept_object_wanted(*p, again))
                || (group.up_members())
                    .filter(|m| members.iter().all(|(p, _)| *p != m.position))
                    .any(|m| group.kept_object_wanted(m.position, &[]))
        };
        made += take_kept_turn(group, &worker, &mut replays[i], wanted, &call_waits);
    }
    worker.close();
    made
}

/// One turn of `replay`'s member: the next change kept for it made
/// ([`replay_one_kept`]), its holdings read first where that pays --
/// unless a call waits for the change (`wanted`): it is made looking the
/// member up, not after reading all the member holds (1.4 s for 4,500
/// objects in a long chaos run, 1.9 s for fewer under heavier load,
/// against a wait of one memberTimeout); a call that comes to wait during
/// a reading (`call_waits`) stops it, and the turn makes nothing.
fn take_kept_turn(
    group: &Group,
    worker: &VirtualSession,
    replay: &mut KeptReplay,
    wanted: bool,
    call_waits: &dyn Fn() -> bool,
) -> usize {
    // Its handles were forgotten since its reading (it returned, or lost
    // its login): a removal by them faulted without reaching it and was
    // dropped, the object the application destroyed left there.
    if (replay.holdings.as_ref()).is_some_and(|h| h.outdated(&group.objects)) {
        (replay.holdings, replay.read) = (None, false);
    }
    if !replay.read && !wanted {
        match read_for_kept(group, worker, replay.position, replay.left, call_waits) {
            Some(holdings) => (replay.holdings, replay.read) = (holdings, true),
            None => return 0,
        }
    }
    replay_one_kept(group, worker, replay)
}

/// One serving member's part of [`replay_kept`].
struct KeptReplay {
    position: usize,
    /// How many of the changes kept when the member joined the replay (or
    /// took its next share, [`KeptReplay::take_next_share`]) are still to
    /// be taken in turn (its share); those kept since, kept again among
    /// them, go behind them.
    left: usize,
    holdings: Option<Holdings>,
    /// Whether `holdings` was read (on the member's first turn).
    read: bool,
    /// Removals of destroyed objects kept again ([`Pending::destroyed`]): a
    /// change they could match waits behind them.
    removals: Vec<identity::Fingerprint>,
    /// Objects whose change this share kept again: not taken again in it,
    /// even for a call waiting for them -- tried again and again, each
    /// would be kept again and again while the call waits.
    kept_again: Vec<CK_OBJECT_HANDLE>,
    /// How many changes this share kept again.
    kept_again_count: usize,
    /// Whether the member joined after the replay began ([`take_in_serving`]),
    /// or is on a share after its first.
    late: bool,
    /// How many changes at the front of the share a run on spares left, to
    /// be made one by one before another run ([`replay_kept_imports_on_spares`]).
    one_by_one: usize,
}

impl KeptReplay {
    /// Member `position`'s part, its share the changes kept for it now.
    fn new(group: &Group, position: usize, late: bool) -> KeptReplay {
        KeptReplay {
            position,
            left: group.kept_count(position),
            holdings: None,
            read: false,
            removals: Vec::new(),
            kept_again: Vec::new(),
            kept_again_count: 0,
            late,
            one_by_one: 0,
        }
    }

    /// Keeps `change` for the member again, behind what is kept for it,
    /// with the later changes of its object ([`Group::defer_again`]).
    fn keep_again(&mut self, group: &Group, change: Pending) {
        self.kept_again.extend(change.made_object());
        self.kept_again_count += group.defer_again(self.position, change, &mut self.left);
    }

    /// Its share done, takes the changes kept for the member since as its
    /// next share -- if any is not one this share kept again, so that a
    /// share of changes that all stay kept ends the replay. Left to the
    /// next replay, they waited for every other member's share, and then
    /// for a retry nothing asked for (a long chaos run's member drained
    /// its share of 2,771 and stopped with 626 kept since). The holdings
    /// stay: what the application makes meanwhile joins the kept changes
    /// (`Group::catching_up`) rather than reach the member. `Err` with the
    /// count of changes kept for the member now, where there is no next
    /// share.
    fn take_next_share(&mut self, group: &Group) -> Result<(), usize> {
        let kept = group.kept_count(self.position);
        if kept <= self.kept_again_count {
            return Err(kept);
        }
        self.left = kept;
        self.late = true;
        self.kept_again.clear();
        self.kept_again_count = 0;
        self.removals.clear();
        Ok(())
    }
}

/// Takes the serving members not in `replays` yet into [`replay_kept_in_turns`],
/// each with the changes kept for it now: at its start, every one; `late`,
/// one that came to serve since (serving first). A late member goes out
/// of turn for an object a call waits for, and takes turns only once the
/// members the replay began with are done with their first shares: left
/// to the next replay, which
/// waits for this one, a call waiting for a key on its way to it waited
/// behind the whole backlog of the member that returned before it after
/// every member was out; in the turns at once, it held back that member,
/// the group's first to serve again, from lacking nothing
/// (`tests/member_api.rs`). Once in, a member is not taken in again: the
/// changes kept for it meanwhile are its next share
/// ([`KeptReplay::take_next_share`]).
fn take_in_serving(group: &Group, replays: &mut Vec<KeptReplay>, late: bool) {
    for member in group.up_members() {
        if replays.iter().all(|r| r.position != member.position) {
            replays.push(KeptReplay::new(group, member.position, late));
        }
    }
}

/// The member whose turn it is in [`replay_kept_in_turns`], and whether a
/// call waits for an object on it: one a call waits on for an object kept
/// for it -- in its share or kept since, written while it catches up and
/// made on the members that do not, but not one this share kept again --
/// else the next in turn after `turn` (a late one once no other has
/// changes left in its first share); `None` once none has, nor a next
/// share ([`KeptReplay::take_next_share`]). Where the object comes after a
/// removal, the member goes first until the removal is made.
fn next_kept_turn(
    group: &Group,
    replays: &mut [KeptReplay],
    turn: &mut usize,
) -> Option<(usize, bool)> {
    for replay in replays.iter_mut().filter(|r| r.left == 0) {
        let _ = replay.take_next_share(group);
    }
    let count = replays.len();
    let wanted = (replays.iter()).position(|r| group.kept_object_wanted(r.position, &r.kept_again));
    let in_turn = |late: bool| {
        (0..count)
            .map(|k| (*turn + k) % count)
            .find(|i| replays[*i].left > 0 && replays[*i].late == late)
    };
    let next = wanted
        .or_else(|| in_turn(false))
        .or_else(|| in_turn(true))?;
    *turn = next + 1;
    Some((next, wanted.is_some()))
}

/// Takes and makes the next change kept for `replay`'s member, or the run
/// of imports at the front of its share on spares
/// ([`replay_kept_imports_on_spares`]); returns how many were made. A
/// member that failed gets the rest replayed when it returns, before it
/// serves.
fn replay_one_kept(group: &Group, worker: &VirtualSession, replay: &mut KeptReplay) -> usize {
    if let Some(made) = replay_kept_imports_on_spares(group, worker, replay) {
        return made;
    }
    let position = replay.position;
    let Some(change) = group.next_deferred(position, &mut replay.left, &replay.kept_again) else {
        return 0;
    };
    replay.one_by_one = replay.one_by_one.saturating_sub(1);
    // A change waiting for the doubt of its object on the member
    // (`Group::carry_in_doubt`) is made once that is settled, the member
    // looked up afresh: holdings read before its late copy landed would
    // have it make the object a second time.
    if let Some(object) = group.doubt_ahead(position, &change, None) {
        if group.carried_over(position, object, clock::now())
            || holds_in_doubt(group, worker, position, object)
        {
            group.settle_in_doubt(position, object);
            (replay.holdings, replay.read) = (None, false);
        } else {
            replay.removals.extend(change.destroyed().cloned());
            replay.keep_again(group, change);
            group.deferred_handled(position, 1);
            return 0;
        }
    }
    let behind_a_set =
        (change.removal()).is_some_and(|p| group.removal_behind_kept_set(position, p));
    // A removal while a call imports a like object waits for it: that
    // call's copy, on the member and not yet recorded, would pass for the
    // removed one (`Group::importing_like`).
    let beside_an_import = (change.destroyed()).is_some_and(|p| group.importing_like(p));
    if behind_a_set || beside_an_import || worker.behind_a_removal(&replay.removals, &change) {
        replay.removals.extend(change.destroyed().cloned());
        replay.keep_again(group, change);
        group.deferred_handled(position, 1);
        return 0;
    }
    // A copy waiting for a library to take the key-wrap mechanism
    // again, which it does not yet: kept without being tried, unless
    // the member has the object by now (then it is dropped below).
    if let Pending::Create(object) = change {
        if worker.waits_for_wrapping(position, &change)
            && worker.unreceivable(object, position).is_some()
            && !worker.holds(object, position, None)
        {
            replay.keep_again(group, change);
            group.deferred_handled(position, 1);
            return 0;
        }
    }
    let logged_out = !group.holds_login();
    let outcome = worker.apply(position, &change, replay.holdings.as_mut());
    // As in the replay: a copy that failed while the member answers
    // is kept (its source may have failed during it; another may
    // serve by the next return). Dropped, a copy kept for a member
    // that returned to a group with no member serving left it
    // without the object for good (simulation seed 368).
    let source_failed = change_copies(&change) && outcome.is_err();
    let mut made = 0;
    if (source_failed && group.members[position].reachable())
        || must_wait(group, logged_out, worker, position, &change, &outcome)
    {
        replay.removals.extend(change.destroyed().cloned());
        replay.keep_again(group, change);
    } else if outcome.is_err() && !group.members[position].reachable() {
        // It failed again (its token restarted unseen, for one):
        // this change and the rest are replayed when it returns,
        // before it serves, rather than dropped.
        let taken = group.take_kept(position, std::slice::from_ref(&change), replay.left);
        let rest = std::iter::once(change).chain(taken);
        group.requeue(position, rest.collect());
        replay.left = 0;
    } else {
        match outcome {
            Ok(needed) => made = usize::from(needed),
            Err(why) => group.log(
                Some(position),
                &format!(
                    "{} could not be made after all: {why}",
                    worker.name_change(&change)
                ),
            ),
        }
    }
    group.deferred_handled(position, 1);
    made
}

/// The most imports kept for one member made in one run on its spares
/// ([`replay_kept_imports_on_spares`]): two rounds of its lanes, so that a
/// call waiting for a kept object on another member waits for about two
/// imports' time before its member's turn, as for two changes made one by
/// one -- under load an import is slow (an application's, made on each
/// member, took 476 ms on average in a long chaos run at load 16), and the
/// soak's `memberTimeout` is 1 s.
const KEPT_RUN_LONGEST: usize = 8;

/// Makes the run of imports at the front of `replay`'s share on its
/// member's spare instances at once, as a returning member's replay does
/// ([`VirtualSession::import_on_spares`]); `None` (nothing taken) where the
/// member has no spares, its holdings were not read (each change then looks
/// the member up), a removal was kept again, the application is logged
/// out, the run is shorter than [`IMPORTS_ON_SPARES`], a call waits for an
/// object of the share (it goes first), or the changes a run left are still
/// being made one by one. One at a time, an import costs about 90 ms on
/// this machine's disk (measured on SoftHSM directly, not through a kept
/// replay: 11 a second, against 24 with two at once and 110 with four), so
/// two members
/// serving first with their backlogs fell further behind while the soak's
/// writes (8 objects a second) joined them, and a call waiting for a key
/// only the third member had, which failed, failed with it.
fn replay_kept_imports_on_spares(
    group: &Group,
    worker: &VirtualSession,
    replay: &mut KeptReplay,
) -> Option<usize> {
    let position = replay.position;
    if replay.one_by_one > 0
        || !replay.removals.is_empty()
        || !group.holds_login()
        || !has_spares(group, position)
    {
        return None;
    }
    let holdings = replay.holdings.as_mut()?;
    let run = group.next_kept_imports(
        position,
        &mut replay.left,
        &replay.kept_again,
        (IMPORTS_ON_SPARES, KEPT_RUN_LONGEST),
    )?;
    let taken = run.len();
    let done = worker.import_on_spares(position, run, holdings);
    if !done.holdings_current {
        replay.holdings = None;
    }
    if group.members[position].reachable() {
        // Refused, faulted or taken by no spare: made one by one next,
        // ahead of the changes that came after them.
        replay.one_by_one = done.left.len();
        replay.left += done.left.len();
        group.return_kept(position, done.left);
    } else {
        let taken = group.take_kept(position, &done.left, replay.left);
        group.requeue(position, done.left.into_iter().chain(taken).collect());
        replay.left = 0;
    }
    group.deferred_handled(position, taken);
    Some(done.made)
}

/// What serving member `position` holds, read once for a replay of more
/// than [`QUEUED_FOR_COUNTING`] changes kept for it while the application
/// is logged in (logged out, private objects would be missing from the
/// reading), as [`Known::reading_pays`] says for a returning member's:
/// otherwise each change looks the member up, a search SoftHSM answers by
/// going through every object of the token. A member that served first
/// with a backlog of 1,069 imports still had 872 kept 145 s later so, in
/// a long chaos run that then did not settle. While the member catches up,
/// what the application makes joins the kept changes rather than reach it
/// (`Group::catching_up`), so the reading stays current; `Some(None)`
/// where it fails (each change looks the member up then). `None` where
/// `stop` ended it: a call came to wait for an object of a share, made
/// first, and the reading is taken again on a later turn.
fn read_for_kept(
    group: &Group,
    worker: &VirtualSession,
    position: usize,
    kept: usize,
    stop: &dyn Fn() -> bool,
) -> Option<Option<Holdings>> {
    if kept <= QUEUED_FOR_COUNTING || !group.holds_login() {
        return Some(None);
    }
    match Holdings::read_unless(worker, position, stop) {
        Ok(Some(holdings)) => Some(Some(holdings)),
        Ok(None) => None,
        Err(_) => Some(None),
    }
}

/// Whether `change` may copy an object from another member: a copy, or
/// a change of attributes that finds no copy to change (see
/// [`Pending::Set`]). One that fails may have met its source failing.
fn change_copies(change: &Pending) -> bool {
    matches!(change, Pending::Create(_) | Pending::Set { .. })
}

/// Whether a change a member answered for must be kept rather than
/// dropped: a copy whose source was down or failed during it (kept until a
/// member holding the object returns), and, while the application is
/// logged out, any change that was not made -- private objects can be
/// neither copied nor seen then (kept until it logs in). `was_logged_out`
/// is whether it was logged out when the change was tried: one that
/// failed for it and was judged after a login came meanwhile was dropped.
/// A change of attributes that found no copy counts as not made: for an
/// object destroyed since, the removal behind it looks the copy up by the
/// fingerprint the change gives it (dropped, the copy stayed, simulation
/// seed 49891).
fn must_wait(
    group: &Group,
    was_logged_out: bool,
    worker: &VirtualSession,
    position: usize,
    change: &Pending,
    outcome: &Result<bool, String>,
) -> bool {
    let logged_out = was_logged_out || !group.holds_login();
    match outcome {
        Ok(true) => false,
        Ok(false) => {
            logged_out
                && matches!(
                    change,
                    Pending::Destroy { .. } | Pending::Orphans(_) | Pending::Set { .. }
                )
        }
        Err(_) => {
            logged_out
                || worker.lacks_source(position, change)
                || worker.waits_for_wrapping(position, change)
        }
    }
}

/// Whether an object on member `reference` may be an orphan its removal
/// there could not yet tell from the group's copy (see
/// [`Group::undecided_orphans`]): it is not spread to other members
/// meanwhile (simulation seed 256398).
fn may_be_orphan(
    group: &Group,
    worker: &VirtualSession,
    reference: usize,
    object: CK_OBJECT_HANDLE,
) -> bool {
    let prints = group.undecided_orphans(reference);
    !prints.is_empty()
        && worker
            .fingerprint_of(object)
            .is_some_and(|own| prints.iter().any(|p| identity::matches(p, &own)))
}

/// The group's object for `handle`, a token object synchronisation listed
/// on member `reference`, identified by its fingerprint: an unmapped handle
/// of a source whose return counted its objects is most often an object
/// the group has, and named anew it was a second virtual handle for the
/// same key, which the source's next return then counted as seen there
/// twice. `None` where its fingerprint cannot be read (the source failed:
/// reconciliation has it), and for one that a call making objects
/// (`making`: one was under way during the listing) may have made there
/// and not recorded yet: one the group knows by no handle there and no
/// kept fingerprint. That call gives it to the returning member itself,
/// queued or made there once the member serves, or removes it everywhere
/// if it fails; a copy made here as well left the member holding it twice
/// (an import whose answer from the only other serving member was lost
/// made the object again on the member just back: most likely the soak's
/// "hsmB: soak-ec-0000286 has [CKO_PUBLIC_KEY, CKO_PUBLIC_KEY,
/// CKO_PRIVATE_KEY]"). An
/// object of another process's left out here is copied by the
/// reconciliation pass the member's return asks for, which waits for
/// this process's calls making objects.
fn listed_object(
    group: &Group,
    worker: &VirtualSession,
    era: Era,
    handle: CK_OBJECT_HANDLE,
    making: bool,
) -> Option<CK_OBJECT_HANDLE> {
    let reference = era.member();
    if let Some(object) = group.objects.known_in(era, handle) {
        return Some(object);
    }
    let print = worker
        .on_member(reference, |s| {
            identity::fingerprint(&*s.library, s.handle, handle)
        })
        .ok()??;
    // None from the table: read after the source's handles were
    // forgotten, `handle` may have named another object.
    (!making || group.objects.any_matched_by(&print))
        .then(|| group.objects.from_member_identified(era, handle, print))
        .flatten()
}

/// The group's objects that source member `reference` held before its
/// handles were last forgotten and that are not mapped there again, taken
/// for the unmapped `handles` listed there without reading them, with how
/// many more the listing holds (left to reconciliation) -- where more than
/// [`LOOK_UPS_INSTEAD_OF_READING`] handles are unmapped and they are at
/// least as many as those objects: the rule a returning member's count
/// follows ([`Known::of`]). A source whose own return counted its objects
/// rather than read them has none mapped, and reading each (one call,
/// queued on a serving member behind the application's calls) took 20 ms
/// under load: 25 s of one long chaos run's rejoins. The surplus -- 7-14%
/// in a long chaos run with many failed calls: objects calls under way
/// made there unrecorded, copies a failed call left that wait for removal,
/// another process's objects -- is what [`listed_object`] leaves to
/// reconciliation too while calls make objects, and the reconciliation
/// the rejoin asks for compares every object. `Err` holds how many handles
/// are unmapped and how many objects were seen there before, for the
/// recovery line.
fn unmapped_taken_as_held(
    group: &Group,
    reference: usize,
    handles: &[CK_OBJECT_HANDLE],
) -> Result<(Vec<CK_OBJECT_HANDLE>, usize), (usize, usize)> {
    let unmapped = handles
        .iter()
        .filter(|h| group.objects.known(reference, **h).is_none())
        .count();
    if unmapped <= LOOK_UPS_INSTEAD_OF_READING {
        return Err((unmapped, 0));
    }
    let held: Vec<CK_OBJECT_HANDLE> = group
        .held_before(reference)
        .into_iter()
        .filter(|object| {
            group.objects.presence(*object, reference) == Some(crate::object::Presence::Unknown)
                && group.objects.has_fingerprint(*object)
        })
        .collect();
    match unmapped.checked_sub(held.len()) {
        Some(surplus) if !held.is_empty() => Ok((held, surplus)),
        _ => Err((unmapped, held.len())),
    }
}

/// Copies to the member every token object a serving member has and it
/// lacks. Both members are read once and compared here -- or, where the
/// member was not read (see [`Known::of`]), the objects the group did not
/// see there are looked up on it one by one, unless there are more than
/// [`LOOK_UPS_INSTEAD_OF_READING`] -- and objects still queued for the
/// member are left to the replay. A source that fails ends the pass, not
/// the attempt: reconciliation finishes it once the member serves.
fn synchronize(
    group: &Group,
    position: usize,
    worker: &VirtualSession,
    known: &mut Known,
    phases: &mut Phases,
) -> Result<usize, String> {
    // Until the pass has run to its end, searches do not spread there.
    group.set_compared(position, false);
    // From a member lacking nothing where one serves.
    let serving: Positions = (group.up_members())
        .map(|m| m.position)
        .filter(|p| *p != position)
        .collect();
    let Some(&reference) = group.complete_first(serving).first() else {
        group.set_compared(position, true);
        return Ok(0);
    };
    // A source still owed changes (it serves first after an outage) may
    // hold what they remove -- an object destroyed while it was out --
    // among what the group does not know there: that is left to the
    // reconciliation, which compares once the changes are made. Copied,
    // a destroyed object came back on every other member (simulation
    // seed 5063969). So is one with objects in doubt: what the group does
    // not know there may be a late copy under a fingerprint from before a
    // change of its attributes.
    let source_owed = group.holds_unsettled(reference);
    let domain = worker.group.domain_handle(reference);
    let everything: identity::Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
    let making = group.objects_being_made();
    let listing = Instant::now();
    let era = group.objects.era(reference);
    let handles = match group.find_on_utility(reference, &everything) {
        Ok(handles) => handles,
        Err(e) => {
            // The source failed, not the member: it rejoins without this
            // pass, and the reconciliation its rejoining asks for compares
            // it with every member that serves. Failing the attempt for it
            // kept a member whose token answered out for another interval,
            // at times with no member serving (the long chaos run).
            group.log(
                Some(position),
                &format!(
                    "synchronisation from member {} skipped: listing its objects failed \
                     with {}; reconciliation compares the members once it serves",
                    group.members[reference].serial,
                    rv_name(e.rv)
                ),
            );
            return Ok(0);
        }
    };
    // A call under way during the listing may have made an object there
    // that it has not recorded yet: taken to be, unless a kept fingerprint
    // of the group's names it.
    let making = making || group.objects_being_made();
    let queued = group.queued_objects(position);
    let mut unsettled = 0;
    let mut unsettled_why = "calls making objects were under way, and these may be theirs";
    let handles: Vec<CK_OBJECT_HANDLE> =
        handles.into_iter().filter(|h| Some(*h) != domain).collect();
    let listed_in = listing.elapsed();
    let listed_count = handles.len();
    let listed: Vec<CK_OBJECT_HANDLE> = match unmapped_taken_as_held(group, reference, &handles) {
        Ok((mut objects, surplus)) => {
            phases.note(format!(
                "{} objects of member {} taken by count as those seen there before",
                objects.len(),
                group.members[reference].serial
            ));
            unsettled = surplus;
            unsettled_why = "they outnumber the objects seen there before and were not read";
            objects.extend(
                handles
                    .iter()
                    .filter_map(|h| group.objects.known_in(era, *h)),
            );
            objects
        }
        Err((unmapped, held)) => {
            if source_owed {
                unsettled_why = "its source is owed changes, which may remove them";
            }
            if unmapped > 0 {
                phases.note(format!(
                    "{unmapped} unmapped objects of member {} read one by one ({held} seen there \
                     before)",
                    group.members[reference].serial
                ));
            }
            handles
                .into_iter()
                .filter_map(|handle| {
                    // A source that failed answers no more: what is left
                    // goes to reconciliation, without a call each.
                    let object = match group.objects.known_in(era, handle) {
                        Some(object) => Some(object),
                        None if !group.members[reference].is_up() || source_owed => None,
                        None => listed_object(group, worker, era, handle, making),
                    };
                    unsettled += usize::from(object.is_none());
                    object
                })
                .collect()
        }
    };
    let candidates: Vec<CK_OBJECT_HANDLE> = listed
        .into_iter()
        .filter(|object| !queued.contains(object))
        .filter(|object| !may_be_orphan(group, worker, reference, *object))
        .collect();
    let unseen = candidates
        .iter()
        .filter(|object| !known.held_before(group, **object))
        .count();
    if !known.complete && unseen > LOOK_UPS_INSTEAD_OF_READING {
        *known = Known::read(worker, position)?;
    }
    if unsettled > 0 {
        group.log(
            Some(position),
            &format!(
                "synchronisation left {unsettled} objects of member {} to reconciliation: \
                 {unsettled_why}",
                group.members[reference].serial
            ),
        );
    }
    let named_in = listing.elapsed() - listed_in;
    let comparing = Instant::now();
    let compared = candidates.len();
    let mut copied = 0;
    let mut complete = unsettled == 0;
    for object in candidates {
        if !group.members[reference].is_up() {
            complete = false;
            // The member it copies from failed: reconciliation, which its
            // rejoining asks for, compares it with every member that serves.
            // Going on, each copy failed on its own ("no member that serves
            // holds the object"): 4,454 of them took 78 s of one recovery in
            // the long chaos run, and the member did not serve within the
            // run's two minutes of settling.
            group.log(
                Some(position),
                &format!(
                    "synchronisation from member {} stopped: it failed; reconciliation compares \
                     the members once this one serves",
                    group.members[reference].serial
                ),
            );
            break;
        }
        // Not read: looked up on the member first, then copied with the
        // holdings, which note the copy.
        let looked_up = || worker.holds(object, position, None);
        if !known.complete && (known.held_before(group, object) || looked_up()) {
            continue;
        }
        // A key it lacks that no serving member can give it: not tried,
        // in this pass or the next.
        if let Some(why) = worker.unreceivable(object, position) {
            if known.complete && worker.holds(object, position, Some(&known.holdings)) {
                continue;
            }
            let waits = worker.waits_for_wrapping(position, &Pending::Create(object));
            known
                .unsynchronised
                .push(Unsynchronised::Unreceivable { object, why, waits });
            continue;
        }
        let change = Pending::Create(object);
        match worker.apply(position, &change, Some(&mut known.holdings)) {
            Ok(made) => copied += usize::from(made),
            Err(why) if group.members[position].reachable() => {
                if worker.waits_for_wrapping(position, &change) {
                    group.defer(position, change);
                }
                // A source that failed meanwhile is said once, by the
                // line that stops the pass, not for this object.
                complete = false;
                if group.members[reference].is_up() {
                    known
                        .unsynchronised
                        .push(Unsynchronised::Failed(object, why));
                }
            }
            Err(why) => return Err(format!("synchronising failed: {why}")),
        }
    }
    // Where a synchronisation's time went: the source's listing, naming
    // its objects (those read one by one), and comparing and copying.
    phases.note(format!(
        "synchronisation: {} objects listed on member {} in {} ms, named in {} ms, {compared} \
         compared and {copied} copied in {} ms",
        listed_count,
        group.members[reference].serial,
        listed_in.as_millis(),
        named_in.as_millis(),
        comparing.elapsed().as_millis()
    ));
    group.set_compared(position, complete);
    Ok(copied)
}

#[cfg(test)]
mod tests;
