//! Reconciliation across processes: what a member missed is known to no
//! process once the one that made the change has exited, so every process
//! compares the members itself -- when it starts using the groups, when it
//! logs in (private objects become visible), when one of its members
//! returns, and every `ReconcileInterval` -- and gives each serving member
//! what it lacks, by the group's way of moving objects (`replication.rs`).
//!
//! A pass reads each serving member once (a [`MemberIndex`]: one
//! enumeration per member, never a search per object) and decides per
//! object: copy it where it is missing, unless a deletion of it is recorded
//! in the state directory (`state_dir.rs`) -- then remove it from the
//! members that still hold it. An object that more than one object on a
//! member matches is left alone (we never guess) -- unless they are copies
//! of one object, identical, and another member holds it once: then the
//! extra copies go, which is how doubles that hosts sharing no lock made at
//! once end. Passes of one group on one host take turns under the group's
//! lock file, so the index each reads is current and no object is copied
//! twice. Copies wait while this process is making objects (its own calls
//! copy or undo those), and where a member lacks few objects each copy is
//! checked first with a search of the member; where a process on another
//! host copies the same object at once, each removes its own copy if the
//! member then holds two, and the next pass copies it once.
//!
//! It runs in a thread of its own, at the lowest priority, and never holds
//! a lock the application's calls take across a member call, nor the
//! members' utility sessions: the application's calls go on beside it.
//! `C_Finalize` stops it between two objects.

use crate::error::rv_name;
use crate::group::Pending;
use crate::group::{is_member_fault, Group};
use crate::identity::{self, Fingerprint};
use crate::index::MemberIndex;
use crate::object::{Era, Presence};
use crate::recovery::Host;
use crate::replication::Copying;
use crate::state_dir::{Deletion, GroupLock, StateDir};
use crate::virtual_session::VirtualSession;
use cryptoki_sys::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a pass waiting for another process's pass of the group asks
/// for the lock again.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// How long a pass lets the application's calls on a member go first
/// before each of its own (see [`yield_to_application`]), at most.
const YIELD_LIMIT: Duration = Duration::from_millis(20);
/// How often it looks whether they have.
const YIELD_POLL: Duration = Duration::from_millis(1);

/// Up to how many objects a member may lack for each copy to it to be
/// checked first with a search of the member.
const CHECKED_COPIES: usize = 64;

/// How often a copy waiting for this process's calls making objects to
/// end looks again.
const MAKING_POLL: Duration = Duration::from_millis(2);

/// How long a pass waits after it is asked for: an application's first
/// calls (often `C_Login` right after `C_Initialize`, which asks for a
/// second pass) run before it, and the two asks make one pass.
const SETTLE: Duration = Duration::from_millis(250);

/// How long the application's calls must have left the members alone
/// before a pass begins: beside a pass, its first calls on a 10,000-object
/// SoftHSM token took two to three times as long.
const QUIET: Duration = Duration::from_millis(200);
/// How long a pass waits for that at most, so that an application that is
/// never idle is still reconciled.
const QUIET_LIMIT: Duration = Duration::from_secs(10);
/// How often it looks.
const QUIET_POLL: Duration = Duration::from_millis(5);

/// The reconciliation thread of one initialised provider.
pub struct Reconciler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    flags: Mutex<Flags>,
    wake: Condvar,
}

#[derive(Default)]
struct Flags {
    stop: bool,
    /// A pass is wanted now.
    due: bool,
    /// The thread has ended.
    done: bool,
}

impl Shared {
    fn flags(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.flags().stop
    }

    /// Waits all of `wait` (asks for passes meanwhile included) unless told
    /// to stop first; true if told to stop.
    fn sleep_unless_stopped(&self, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        let mut flags = self.flags();
        while !flags.stop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            flags = self
                .wake
                .wait_timeout(flags, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        flags.stop
    }

    /// Waits at most `wait`, less if woken, unless told to stop first; true
    /// if told to stop.
    fn wait_unless_stopped(&self, wait: Duration) -> bool {
        let flags = self.flags();
        if flags.stop {
            return true;
        }
        let (flags, _) = self
            .wake
            .wait_timeout(flags, wait)
            .unwrap_or_else(PoisonError::into_inner);
        flags.stop
    }
}

impl Reconciler {
    /// Starts the thread, which makes a first pass at once; `interval`
    /// `None`: no periodic passes.
    pub fn start(
        provider: Weak<dyn Host>,
        state: Arc<StateDir>,
        interval: Option<Duration>,
    ) -> std::io::Result<Reconciler> {
        let shared = Arc::new(Shared::default());
        shared.flags().due = true;
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pkcs11-ha-reconcile".into())
            .spawn(move || {
                lower_priority();
                run(provider, state, interval, for_thread)
            })?;
        Ok(Reconciler {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for a pass as soon as the one under way (if any) ends.
    pub fn soon(&self) {
        self.shared.flags().due = true;
        self.shared.wake.notify_all();
    }

    /// Stops the thread, waiting at most `limit` for the object it is
    /// copying; a thread still inside a member call after that is left to
    /// end on its own.
    pub fn stop(&mut self, limit: Duration) {
        let mut flags = self.shared.flags();
        flags.stop = true;
        self.shared.wake.notify_all();
        let deadline = std::time::Instant::now() + limit;
        while !flags.done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            flags = self
                .shared
                .wake
                .wait_timeout(flags, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let done = flags.done;
        drop(flags);
        if let Some(thread) = self.thread.take() {
            if done {
                let _ = thread.join();
            }
        }
    }
}

/// A pass competes with the application for the processor, not for a
/// lock: beside a pass's enumeration of a 10,000-object SoftHSM token, the
/// application's own search of it took twice as long on two busy cores,
/// and as much with the enumeration in another process. At the lowest
/// priority the thread takes only what the application leaves (the same
/// search then took as long as alone). On Linux a nice value is the
/// thread's own; elsewhere the thread keeps the process's. Where the
/// system refuses, passes run at the application's priority, as before.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
}

fn run(
    provider: Weak<dyn Host>,
    state: Arc<StateDir>,
    interval: Option<Duration>,
    shared: Arc<Shared>,
) {
    loop {
        {
            let mut flags = shared.flags();
            while !flags.stop && !flags.due {
                match interval {
                    Some(interval) => {
                        let (next, waited) = shared
                            .wake
                            .wait_timeout(flags, interval)
                            .unwrap_or_else(PoisonError::into_inner);
                        flags = next;
                        flags.due |= waited.timed_out();
                    }
                    None => {
                        flags = shared
                            .wake
                            .wait(flags)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                }
            }
            if flags.stop {
                break;
            }
        }
        if shared.sleep_unless_stopped(SETTLE) {
            break;
        }
        shared.flags().due = false;
        let Some(provider) = provider.upgrade() else {
            break;
        };
        if wait_for_quiet(&*provider, &shared) {
            break;
        }
        for group in provider.groups() {
            if shared.stopping() {
                break;
            }
            report(
                group,
                &shared,
                reconcile(&*provider, group, &state, &shared),
            );
        }
    }
    shared.flags().done = true;
    shared.wake.notify_all();
}

/// One pass over every group, in the calling thread, for a provider
/// without threads of its own: the deterministic simulation
/// (`tests/simulation.rs`) makes its passes so, at the steps its schedule
/// draws.
pub fn reconcile_now(provider: &dyn Host, state: &StateDir) {
    let shared = Arc::default();
    for group in provider.groups() {
        report(group, &shared, reconcile(provider, group, state, &shared));
    }
}

/// Logs what a pass over `group` did, or why it could not be made.
fn report(group: &Group, shared: &Shared, outcome: Result<Option<Summary>, String>) {
    match outcome {
        Ok(Some(summary)) => summary.report(group, shared),
        Ok(None) => {}
        Err(why) => group.log(None, &format!("reconciliation failed: {why}")),
    }
}

/// Waits until the application has left every member alone for [`QUIET`]
/// (no call in flight, none served meanwhile), at most [`QUIET_LIMIT`], so
/// that a pass does not begin beside an application's first calls; true if
/// told to stop.
fn wait_for_quiet(provider: &dyn Host, shared: &Shared) -> bool {
    let activity = || {
        provider
            .groups()
            .iter()
            .flat_map(|g| g.members.iter())
            .fold((0, 0), |(flying, served), m| {
                (flying + m.in_flight(), served + m.calls_served())
            })
    };
    let started = std::time::Instant::now();
    let mut last = activity();
    let mut quiet_since = started;
    while started.elapsed() < QUIET_LIMIT {
        if shared.wait_unless_stopped(QUIET_POLL) {
            return true;
        }
        let now = activity();
        if now != last || now.0 > 0 {
            last = now;
            quiet_since = std::time::Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            break;
        }
    }
    false
}

/// What one pass did to a group.
#[derive(Default)]
struct Summary {
    /// From taking the lock to the end of the pass.
    took: Duration,
    /// Objects read, over all members.
    objects: usize,
    members: usize,
    copied: usize,
    removed: usize,
    /// Copies removed because a member held the object more than once.
    doubled: usize,
    failed: usize,
    first_failure: Option<String>,
    /// Objects that match more than one object on some member.
    ambiguous: usize,
}

impl Summary {
    fn fail(&mut self, why: String) {
        self.failed += 1;
        self.first_failure.get_or_insert(why);
    }

    fn report(&self, group: &Group, shared: &Shared) {
        if self.copied + self.removed + self.doubled + self.failed == 0 {
            return;
        }
        let mut event = format!(
            "reconciled {} objects on {} members in {} ms: {} objects copied to members that \
             lacked them, {} deleted objects removed from members that still held them",
            self.objects,
            self.members,
            self.took.as_millis(),
            self.copied,
            self.removed
        );
        if self.doubled > 0 {
            event += &format!(
                ", {} copies removed from members that held the object twice (copied at the \
                 same moment by another process, another host or this one's replication; the \
                 next pass copies any still missing)",
                self.doubled
            );
            // Soon, so that no member lacks them for a whole interval.
            shared.flags().due = true;
        }
        if self.ambiguous > 0 {
            event += &format!(
                ", {} objects left alone (more than one object on a member matches them)",
                self.ambiguous
            );
        }
        if let Some(why) = &self.first_failure {
            event += &format!(", {} could not be copied ({why})", self.failed);
        }
        group.log(None, &event);
    }
}

/// One pass over a group, if it has two members serving and
/// `[HASynchronize]` asks for it; `None` when it did not run.
fn reconcile(
    provider: &dyn Host,
    group: &Arc<Group>,
    state: &StateDir,
    shared: &Arc<Shared>,
) -> Result<Option<Summary>, String> {
    let Some(mut pass) = Pass::begin(provider, group, state, shared)? else {
        return Ok(None);
    };
    while pass.read_next() {}
    pass.finish(state)
}

/// A pass over one group under way: it reads each serving member once,
/// one at a time, then copies and removes. The reconciliation thread makes
/// it in one go, while the application's calls, members failing and
/// recoveries go on beside it (a pass over a few hundred objects under
/// load takes seconds); the simulation makes its steps one by one, with
/// the application's calls, faults and recoveries of its schedule between
/// them ([`Pass::begin_now`]).
pub struct Pass {
    group: Arc<Group>,
    shared: Arc<Shared>,
    worker: VirtualSession,
    _one_process_at_a_time: GroupLock,
    started: std::time::Instant,
    logged_in: bool,
    /// The era of each member's handles before it was read: a copy's
    /// source handle is recorded only in that era.
    eras: Vec<Era>,
    /// The epoch each member was read in.
    epochs: Vec<u64>,
    /// The next member position to read, if it serves by then.
    next: usize,
    held: Vec<(usize, MemberIndex)>,
    /// See [`Pass::check_copies_up_to`].
    checked_copies: usize,
    /// This process's changes of objects' attributes before the first
    /// member was read ([`crate::object::ObjectTable::changes_so_far`]).
    changes_before: u64,
}

impl Pass {
    /// Takes the group's turn (waiting for another process's pass) unless
    /// the group has fewer than two members serving or
    /// `[HASynchronize]` does not ask for passes: `None` then.
    fn begin(
        provider: &dyn Host,
        group: &Arc<Group>,
        state: &StateDir,
        shared: &Arc<Shared>,
    ) -> Result<Option<Pass>, String> {
        if !provider.synchronize(group) || group.up_members().nth(1).is_none() {
            return Ok(None);
        }
        let lock = state
            .lock_group(&group.serial, LOCK_POLL, |wait| {
                shared.wait_unless_stopped(wait)
            })
            .map_err(|e| {
                format!(
                    "cannot take the lock file in {}: {e}",
                    state.path().display()
                )
            })?;
        let Some(lock) = lock else {
            return Ok(None);
        };
        let members = group.members.len();
        Ok(Some(Pass {
            group: Arc::clone(group),
            shared: Arc::clone(shared),
            worker: VirtualSession::internal(Arc::clone(group)),
            _one_process_at_a_time: lock,
            started: std::time::Instant::now(),
            logged_in: group.holds_login(),
            eras: (0..members).map(|m| group.objects.era(m)).collect(),
            epochs: vec![0; members],
            next: 0,
            held: Vec::new(),
            checked_copies: CHECKED_COPIES,
            changes_before: group.objects.changes_so_far(),
        }))
    }

    /// A pass over the provider's first group whose steps the caller makes
    /// ([`Pass::read_next`], [`Pass::finish_and_report`]): the
    /// deterministic simulation (`tests/simulation.rs`), whose schedules
    /// run the application's calls and faults between them. `None` where
    /// [`reconcile_now`] would make no pass.
    pub fn begin_now(provider: &dyn Host, state: &StateDir) -> Option<Pass> {
        let group = provider.groups().first()?;
        let shared = Arc::default();
        match Pass::begin(provider, group, state, &shared) {
            Ok(pass) => pass,
            Err(why) => {
                report(group, &shared, Err(why));
                None
            }
        }
    }

    /// Up to how many objects a member may lack for each copy to it to be
    /// checked first with a search ([`CHECKED_COPIES`] unless set): the
    /// simulation, whose members lack a few objects at most, sets 0 in
    /// some schedules, so that the copies a large backlog makes unchecked
    /// are made there too.
    pub fn check_copies_up_to(&mut self, objects: usize) {
        self.checked_copies = objects;
    }

    /// Reads the next member serving now; false once every member has had
    /// its turn (or the provider is being finalised).
    pub fn read_next(&mut self) -> bool {
        while self.next < self.group.members.len() {
            let position = self.next;
            self.next += 1;
            if self.shared.stopping() {
                return false;
            }
            if !self.group.members[position].is_up() {
                continue;
            }
            if let Some((index, epoch)) = read_index(&self.worker, position, &self.shared) {
                self.held.push((position, index));
                self.epochs[position] = epoch;
            }
            return true;
        }
        false
    }

    /// Copies and removes what the members read call for, and logs what
    /// it did.
    pub fn finish_and_report(self, state: &StateDir) {
        let group = Arc::clone(&self.group);
        let shared = Arc::clone(&self.shared);
        report(&group, &shared, self.finish(state));
    }

    /// Copies and removes what the members read call for; `None` where
    /// fewer than two members were read, or a login or logout meanwhile
    /// changed which objects a member shows.
    fn finish(self, state: &StateDir) -> Result<Option<Summary>, String> {
        let (group, shared, worker) = (&self.group, &*self.shared, &self.worker);
        let held = &self.held;
        if held.len() < 2 || group.holds_login() != self.logged_in {
            return Ok(None);
        }
        let deletions = state
            .deletions(&group.serial)
            .map_err(|e| format!("cannot read the deletion record: {e}"))?;
        let plan = Plan::make(held, &deletions);
        // A deletion can be forgotten once every member is known rid of the
        // object -- which only a logged-in pass over all of them can tell --
        // or once the object was made again.
        let everyone = held.len() == group.members.len() && self.logged_in;
        let forget: Vec<&Deletion> = deletions
            .iter()
            .enumerate()
            .filter(|(i, _)| plan.made_again.contains(i) || (everyone && !plan.seen.contains(i)))
            .map(|(_, d)| d)
            .collect();
        if !forget.is_empty() {
            state
                .forget_deletions(&group.serial, |d| forget.contains(&d))
                .map_err(|e| format!("cannot rewrite the deletion record: {e}"))?;
        }
        let mut summary = Summary {
            ambiguous: plan.ambiguous,
            objects: held.iter().map(|(_, index)| index.len()).sum(),
            members: held.len(),
            ..Summary::default()
        };
        for (print, holders) in &plan.removals {
            for position in holders {
                if shared.stopping() {
                    return Ok(Some(summary));
                }
                let removal = Pending::Destroy {
                    print: print.clone(),
                    object: None,
                };
                match worker.apply(*position, &removal, None) {
                    Ok(removed) => summary.removed += usize::from(removed),
                    Err(why) => summary.fail(why),
                }
            }
        }
        for (position, handles) in &plan.extras {
            for handle in handles {
                if shared.stopping() {
                    return Ok(Some(summary));
                }
                summary.doubled += usize::from(remove_copy(
                    group,
                    worker,
                    *position,
                    (*handle, self.epochs[*position]),
                ));
            }
        }
        let copied = copy_missing(
            group,
            shared,
            worker,
            (&plan.copies, self.checked_copies),
            (&self.epochs, &self.eras, self.changes_before),
            &mut summary,
        );
        remove_doubles(group, shared, worker, &copied, &mut summary);
        // Each member read has now been given what the others hold, unless a
        // copy failed or it came back meanwhile.
        if summary.failed == 0 {
            for (position, _) in held {
                if group.members[*position].epoch() == self.epochs[*position] {
                    group.set_compared(*position, true);
                }
            }
        }
        Ok(Some(Summary {
            took: self.started.elapsed(),
            ..summary
        }))
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.worker.close();
    }
}

/// Reads every token object of the member but its domain key, as
/// [`MemberIndex::read`] does, but gives up (`None`) as soon as the
/// provider is finalised -- a large token takes seconds to read, and
/// `C_Finalize` must not wait for that -- and counts each object's read as
/// a call of its own, so that the watchdog sees the member answer.
/// Returns the member epoch its handles belong to; `None` also where the
/// member came back meanwhile: a reconnected p11-kit server numbers the
/// objects afresh, and handles searched on the old connection then name
/// other objects on the new one -- a soak run removed twelve keys as
/// "copies" of others so.
fn read_index(
    worker: &VirtualSession,
    position: usize,
    shared: &Shared,
) -> Option<(MemberIndex, u64)> {
    let member = &worker.group.members[position];
    if yield_to_application(member, shared) {
        return None;
    }
    // The handles read stay valid only while a session of the group's own
    // is open on the member: SoftHSM numbers a token's objects anew when
    // its last session closes, which this pass's own session may be (before
    // the application's first login the group has none open) -- the domain
    // key's handle recorded so went stale, and the key then showed through
    // the virtual slot and was copied as an object (seeds 271, 3527).
    worker.group.on_utility(position, |_| ()).ok()?;
    // Not `domain_handle`: it searches on the member's utility session,
    // whose lock the application's lookups wait for, and this thread runs
    // at the lowest priority -- the application's first calls at 10,000
    // objects took three times as long. The domain key is told from the
    // index's own fingerprints instead, and recorded for the group.
    let epoch = member.epoch();
    let known = worker.group.domain.found(position, epoch);
    let domain_print: Fingerprint = vec![
        (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
        (
            CKA_LABEL,
            worker.group.settings.domain_label.as_bytes().to_vec(),
        ),
    ];
    let mut domain_keys = Vec::new();
    let ticket = worker.group.index_ticket(position);
    let everything: Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
    let handles = worker
        .on_member(position, |s| worker.group.find_on(position, s, &everything))
        .ok()?
        .ok()?;
    let mut index = MemberIndex::default();
    let mut unread = false;
    for handle in handles {
        if yield_to_application(member, shared) {
            return None;
        }
        match worker.on_member(position, |s| {
            identity::fingerprint(&*s.library, s.handle, handle)
        }) {
            Ok(Some(print)) if identity::matches(&domain_print, &print) => domain_keys.push(handle),
            Ok(Some(print)) => index.insert(handle, print),
            Ok(None) => unread = true,
            Err(_) => return None,
        }
    }
    // An object removed since the search is simply not held; a member that
    // stopped answering must not pass for one that lacks objects.
    if unread && !worker.answers(position) {
        return None;
    }
    if member.epoch() != epoch {
        return None;
    }
    if known.is_none() && domain_keys.len() == 1 {
        worker
            .group
            .domain
            .record_found(position, epoch, domain_keys);
    }
    // The application's look-ups on this member need no search from now.
    worker.group.adopt_index(ticket, index.clone());
    Some((index, epoch))
}

/// A pass is background work: before each of its calls on a member it waits
/// while the application has calls in flight there, up to [`YIELD_LIMIT`]
/// (so that it still advances under constant load). True if told to stop.
fn yield_to_application(member: &crate::group::Member, shared: &Shared) -> bool {
    let deadline = std::time::Instant::now() + YIELD_LIMIT;
    while member.in_flight() > 0 && std::time::Instant::now() < deadline {
        if shared.wait_unless_stopped(YIELD_POLL) {
            return true;
        }
    }
    shared.stopping()
}

/// An object some members lack: where it is, and who lacks it.
struct Copy {
    print: Fingerprint,
    source: usize,
    handle: CK_OBJECT_HANDLE,
    targets: Vec<usize>,
}

/// What a pass will do, decided from the members' indexes alone.
#[derive(Default)]
struct Plan {
    copies: Vec<Copy>,
    /// Deleted objects, and the members that still hold them.
    removals: Vec<(Fingerprint, Vec<usize>)>,
    /// Recorded deletions (by position) that some object matched.
    seen: FxHashSet<usize>,
    /// Recorded deletions of objects every member read holds: made again.
    made_again: FxHashSet<usize>,
    /// Copies of one object that a member holds more than once: (member
    /// position, the handles to remove there).
    extras: Vec<(usize, Vec<CK_OBJECT_HANDLE>)>,
    ambiguous: usize,
}

/// The copies to remove where some members hold `print` more than once and
/// they are extra copies of one object: every object that matches has the
/// same fingerprint, another member holds it exactly once (so the object
/// survives wherever hosts disagree on which copy to keep), and no deletion
/// of it is recorded. Two hosts copying the same object at once leave such
/// doubles, which no lock they share could have prevented. `None`: the
/// object stays ambiguous -- two objects that differ are never merged.
fn extra_copies(
    held: &[(usize, MemberIndex)],
    found: &[Vec<CK_OBJECT_HANDLE>],
    print: &Fingerprint,
    deletions: &[Deletion],
) -> Option<Vec<(usize, Vec<CK_OBJECT_HANDLE>)>> {
    if !found.iter().any(|f| f.len() == 1) || deletions.iter().any(|d| d.matches(print)) {
        return None;
    }
    let mut extras = Vec::new();
    for ((position, index), handles) in held.iter().zip(found) {
        if handles.len() < 2 {
            continue;
        }
        let prints: Vec<Arc<Fingerprint>> = handles
            .iter()
            .map(|h| index.fingerprint(*h))
            .collect::<Option<_>>()?;
        if prints.iter().any(|p| p != &prints[0]) {
            return None;
        }
        let mut doomed = handles.clone();
        doomed.sort_unstable();
        doomed.remove(0);
        extras.push((*position, doomed));
    }
    Some(extras)
}

impl Plan {
    /// `held`: (member position, its index) for each member read.
    fn make(held: &[(usize, MemberIndex)], deletions: &[Deletion]) -> Plan {
        let mut plan = Plan::default();
        let mut done: Vec<FxHashSet<CK_OBJECT_HANDLE>> = vec![FxHashSet::default(); held.len()];
        for (i, (source, index)) in held.iter().enumerate() {
            for (handle, print) in index.objects() {
                if done[i].contains(&handle) {
                    continue;
                }
                let found: Vec<Vec<CK_OBJECT_HANDLE>> = held
                    .iter()
                    .map(|(_, other)| other.matching(print))
                    .collect();
                done[i].insert(handle);
                for (j, handles) in found.iter().enumerate() {
                    done[j].extend(handles.iter().copied());
                }
                if found.iter().any(|f| f.len() > 1) {
                    match extra_copies(held, &found, print, deletions) {
                        Some(extras) => plan.extras.extend(extras),
                        None => plan.ambiguous += 1,
                    }
                    continue;
                }
                let holders: Vec<usize> = held
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| !f.is_empty())
                    .map(|((p, _), _)| *p)
                    .collect();
                let lacking: Vec<usize> = held
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_empty())
                    .map(|((p, _), _)| *p)
                    .collect();
                let deleted = deletions.iter().position(|d| d.matches(print));
                if let Some(d) = deleted {
                    plan.seen.insert(d);
                    if lacking.is_empty() {
                        plan.made_again.insert(d);
                    } else {
                        plan.removals.push((print.clone(), holders));
                    }
                    continue;
                }
                if !lacking.is_empty() {
                    plan.copies.push(Copy {
                        print: print.clone(),
                        source: *source,
                        handle,
                        targets: lacking,
                    });
                }
            }
        }
        plan
    }
}

/// A copy a pass made.
struct Made {
    target: usize,
    /// The copy's handle on the target, and the target's epoch it belongs to.
    handle: (CK_OBJECT_HANDLE, u64),
    print: Fingerprint,
}

/// Copies each planned object to the members that lack it, one member at a
/// time; returns the copies made. A source that came back since it was
/// read (its epoch is no longer the one in `epochs`, or the group forgot
/// its handles since the era in `eras`) gives nothing: its handles may name
/// other objects now.
fn copy_missing(
    group: &Group,
    shared: &Shared,
    worker: &VirtualSession,
    (copies, checked_copies): (&[Copy], usize),
    (epochs, eras, changes_before): (&[u64], &[Era], u64),
    summary: &mut Summary,
) -> Vec<Made> {
    let mut made = Vec::new();
    // Pairs of members a key could not move between in this pass: the
    // reason was said once, and holds for every other key.
    let mut no_way: FxHashSet<(usize, usize)> = FxHashSet::default();
    let mut lacking: FxHashMap<usize, usize> = FxHashMap::default();
    for target in copies.iter().flat_map(|c| &c.targets) {
        *lacking.entry(*target).or_default() += 1;
    }
    let checked: FxHashSet<usize> = lacking
        .into_iter()
        .filter(|(_, n)| *n <= checked_copies)
        .map(|(target, _)| target)
        .collect();
    for copy in copies {
        if group.members[copy.source].epoch() != epochs[copy.source] {
            continue;
        }
        // What the group does not know on such a source may be unsettled
        // (`Group::holds_unsettled`): a later pass compares it -- the next
        // return's, or `ReconcileInterval`'s.
        if group.holds_unsettled(copy.source)
            && group
                .objects
                .known_in(eras[copy.source], copy.handle)
                .is_none()
            && !group.objects.any_matched_by(&copy.print)
        {
            continue;
        }
        // By fingerprint: a source whose handles the group forgot (a
        // restart, a logout, a return counted rather than read) holds the
        // group's own objects under unmapped handles, and named anew each
        // was a second virtual handle for one key (the soak's "found 3
        // objects, expected 2").
        let Some(object) = group.objects.from_member_identified(
            eras[copy.source],
            copy.handle,
            copy.print.clone(),
        ) else {
            continue;
        };
        // Its attributes changed since the members were read: the readings
        // taken before the change name it by its former fingerprint, so a
        // member read before holds it under a print the others no longer
        // have, and each looks as if it lacked the other's -- copied, the
        // object was made a second time there (simulation seed 28074978:
        // its `CKA_ID` set between two members' readings). The next pass
        // reads them again.
        if group.objects.changed_after(object, changes_before) {
            continue;
        }
        let key = identity::names_a_key(&copy.print);
        for &target in &copy.targets {
            if shared.stopping() {
                return made;
            }
            // A member that came back since it was read is left to the
            // pass its return asked for: what was made there meanwhile
            // has handles its new connection may number afresh, so the
            // group no longer knows it is there, and this pass's reading
            // says it is not (a soak run's pass, 10.7 s long, made 18
            // public keys a second time on such a member). So is one whose
            // handles the group forgot since (a handle it answered was
            // invalid): the objects made there meanwhile are no longer
            // known there either (simulation seed 29959242).
            let returned = || {
                group.members[target].epoch() != epochs[target]
                    || group.objects.moved_on(eras[target])
            };
            if !group.members[target].is_up() || returned() {
                continue;
            }
            // Until this process makes no object: one being made may be
            // about to be copied by its own call, or undone everywhere.
            while group.objects_being_made() {
                if shared.wait_unless_stopped(MAKING_POLL) {
                    return made;
                }
            }
            if yield_to_application(&group.members[target], shared) {
                return made;
            }
            // Copied meanwhile by this process's own replication, or on
            // its way there: a member that served first is given its
            // backlog while it serves, and a long chaos run's pass tried
            // 487 such keys by wrapping, which its members cannot, and
            // named each as not copied.
            if let Some(Presence::Present(_)) = group.objects.presence(object, target) {
                continue;
            }
            if group.on_its_way(target, object) {
                continue;
            }
            if key && no_way.contains(&(copy.source, target)) {
                summary.failed += 1;
                continue;
            }
            // Made there since the member was read (by a process on another
            // host): not again. A search costs time in proportion to the
            // member's size, so a member that lacks many objects (back from
            // a long outage) is only read again after its copies.
            if checked.contains(&target) {
                let present =
                    worker.on_member(target, |s| worker.group.find_on(target, s, &copy.print));
                if !matches!(present, Ok(Ok(ref found)) if found.is_empty()) {
                    continue;
                }
            }
            // As it may have while this pass waited and searched.
            if returned() {
                continue;
            }
            let target_epoch = epochs[target];
            match worker.copy_to(object, copy.source, &[target], Copying::Missed) {
                Ok(faulted) if faulted.is_empty() => {
                    summary.copied += 1;
                    if let Some(Presence::Present(ours)) = group.objects.presence(object, target) {
                        made.push(Made {
                            target,
                            handle: (ours, target_epoch),
                            print: copy.print.clone(),
                        });
                    }
                }
                Ok(_) => summary.fail("the member failed meanwhile".into()),
                Err(e) => {
                    summary.fail(format!(
                        "copying to member {} returned {}",
                        group.members[target].serial,
                        rv_name(e.rv)
                    ));
                    // The source may have failed since it was read, unseen
                    // (its connection lost while no call went there), as in
                    // `copy_missed`: asked once, it is taken out if it does
                    // not answer, and gives no more copies in this pass;
                    // recovery brings it back, and the next pass copies.
                    // Left serving, it failed each pass's copies. A failed
                    // read of the source's object answers
                    // CKR_OBJECT_HANDLE_INVALID whatever the member said.
                    let source_may_have_failed =
                        e.rv == CKR_OBJECT_HANDLE_INVALID || is_member_fault("C_WrapKey", e.rv);
                    if source_may_have_failed && !worker.answers(copy.source) {
                        break;
                    }
                    // Refused by a member that answers: it serves without
                    // the object, and searches go first to members that
                    // lack nothing.
                    if !source_may_have_failed && group.members[target].reachable() {
                        group.note_refused(target, object);
                    }
                    if key {
                        no_way.insert((copy.source, target));
                    }
                }
            }
        }
    }
    made
}

/// Reads each member that received copies once more and removes any copy
/// of ours that the member now holds twice: a process on another host,
/// which shares no lock with this one, copied it at the same time.
fn remove_doubles(
    group: &Group,
    shared: &Shared,
    worker: &VirtualSession,
    made: &[Made],
    summary: &mut Summary,
) {
    let mut by_member: FxHashMap<usize, Vec<&Made>> = FxHashMap::default();
    for copy in made {
        by_member.entry(copy.target).or_default().push(copy);
    }
    for (target, copies) in by_member {
        let Some((index, epoch)) = read_index(worker, target, shared) else {
            continue;
        };
        for copy in copies {
            if copy.handle.1 != epoch || index.matching(&copy.print).len() < 2 {
                continue;
            }
            summary.doubled += usize::from(remove_copy(group, worker, target, copy.handle));
        }
    }
}

/// Removes `handle`, one copy too many of an object, from member `target`,
/// and forgets it; true if the member removed it. Only in the member epoch
/// the handle was found in: after a reconnect its number may name another
/// object, which would be destroyed in its place.
fn remove_copy(
    group: &Group,
    worker: &VirtualSession,
    target: usize,
    (handle, epoch): (CK_OBJECT_HANDLE, u64),
) -> bool {
    let answer = worker.on_member(target, |s| {
        (s.epoch == epoch).then(|| s.library.destroy_object(s.handle, handle))
    });
    if !matches!(answer, Ok(Some(CKR_OK))) {
        return false;
    }
    group.objects.forget_copy(target, handle);
    group.forget_object(target, handle);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(label: &str) -> Fingerprint {
        vec![
            (CKA_CLASS, CKO_DATA.to_ne_bytes().to_vec()),
            (CKA_LABEL, label.as_bytes().to_vec()),
        ]
    }

    fn index(objects: &[(CK_OBJECT_HANDLE, &str)]) -> MemberIndex {
        let mut index = MemberIndex::default();
        for (handle, label) in objects {
            index.insert(*handle, data(label));
        }
        index
    }

    #[test]
    fn copies_what_is_missing_and_removes_what_was_deleted() {
        let held = vec![
            (
                0,
                index(&[
                    (1, "both"),
                    (2, "only-a"),
                    (3, "deleted"),
                    (4, "twice"),
                    (5, "twice"),
                ]),
            ),
            (1, index(&[(7, "both"), (8, "only-b"), (9, "deleted")])),
            (
                2,
                index(&[(11, "both"), (12, "only-b"), (13, "deleted-too")]),
            ),
        ];
        let deletions = vec![
            Deletion::of(&data("deleted"), 1),
            Deletion::of(&data("deleted-too"), 1),
            Deletion::of(&data("gone-everywhere"), 1),
        ];
        let plan = Plan::make(&held, &deletions);
        let mut copies: Vec<(String, usize, Vec<usize>)> = plan
            .copies
            .iter()
            .map(|c| {
                (
                    String::from_utf8_lossy(&c.print[1].1).into_owned(),
                    c.source,
                    c.targets.clone(),
                )
            })
            .collect();
        copies.sort();
        assert_eq!(
            copies,
            vec![
                ("only-a".into(), 0, vec![1, 2]),
                ("only-b".into(), 1, vec![0])
            ]
        );
        let mut removals = plan.removals.clone();
        removals.sort();
        assert_eq!(
            removals,
            vec![
                (data("deleted"), vec![0, 1]),
                (data("deleted-too"), vec![2])
            ]
        );
        assert_eq!(plan.ambiguous, 1, "\"twice\" is never copied");
        assert_eq!(plan.seen, [0, 1].into_iter().collect());
        assert!(plan.made_again.is_empty());
    }

    #[test]
    fn an_object_a_member_holds_twice_loses_its_extra_copy_unless_the_two_differ() {
        let key = |label: &str, check: &[u8]| -> Fingerprint {
            vec![
                (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
                (CKA_LABEL, label.as_bytes().to_vec()),
                (CKA_CHECK_VALUE, check.to_vec()),
            ]
        };
        let mut a = index(&[(1, "copied-twice")]);
        a.insert(2, key("two-keys", b""));
        let mut b = index(&[(9, "copied-twice"), (7, "copied-twice")]);
        b.insert(5, key("two-keys", b"abc"));
        b.insert(6, key("two-keys", b"xyz"));
        let plan = Plan::make(&[(0, a), (1, b)], &[]);
        assert_eq!(plan.extras, vec![(1, vec![9])], "the lowest handle stays");
        assert_eq!(plan.ambiguous, 1, "two different keys are never merged");
        assert!(plan.copies.is_empty());

        let held = vec![
            (0, index(&[(1, "deleted")])),
            (1, index(&[(2, "deleted"), (3, "deleted")])),
        ];
        let plan = Plan::make(&held, &[Deletion::of(&data("deleted"), 1)]);
        assert!(plan.extras.is_empty(), "a deleted object is not tidied");
    }

    #[test]
    fn a_deleted_object_every_member_holds_was_made_again() {
        let held = vec![(0, index(&[(1, "k")])), (1, index(&[(2, "k")]))];
        let plan = Plan::make(&held, &[Deletion::of(&data("k"), 1)]);
        assert!(plan.copies.is_empty() && plan.removals.is_empty());
        assert_eq!(plan.made_again, [0].into_iter().collect());
    }
}
