//! Application sessions: the table of session handles the application
//! holds, and for each session where its calls go -- one member session for
//! a pass-through slot, or a [`VirtualSession`] for a virtual slot -- and
//! the calls under way on each ([`CallGate`]), which a close waits for and
//! a logout pauses.

use crate::arguments::{OutArray, Template};
use crate::error::{check, Error, Result};
use crate::member::{CallCounts, Counting, MemberLibrary};
use crate::member_api::MemberApi;
pub use crate::member_api::{open_member_session, MemberSession};
pub use crate::virtual_session::VirtualSession;
use cryptoki_sys::*;
use parking_lot::{Condvar, Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct PassThroughSession {
    pub library: Arc<MemberLibrary>,
    pub slot: CK_SLOT_ID,
    pub handle: CK_SESSION_HANDLE,
    /// Objects of this token the application must not reach: the domain
    /// keys of HA groups (see [`HiddenObjects`]).
    pub hidden: Arc<HiddenObjects>,
    /// The token's call counts ([`MemberLibrary::slot_counts`]): a group
    /// member's when the token is one, so that its calls served include
    /// the application's calls through this slot.
    pub counts: Arc<CallCounts>,
}

/// The domain keys in one library, hidden from its pass-through slots: a
/// search never returns them and every call naming one is refused as if it
/// did not exist, so no application can use, change or destroy the key
/// that carries a group's key material. A session of our own stays open on
/// each token (`_keepers`), so that the handles found stay valid: SoftHSM
/// numbers a token's objects anew when its last session closes.
pub struct HiddenObjects {
    pub handles: Vec<CK_OBJECT_HANDLE>,
    pub labels: Vec<String>,
    pub _keepers: Vec<MemberSession>,
}

impl PassThroughSession {
    /// `role` (the spec's error for that handle) if `object` is hidden.
    pub fn reachable(&self, object: CK_OBJECT_HANDLE, role: CK_RV) -> Result<()> {
        if self.hidden.handles.contains(&object) {
            Err(Error::new(role))
        } else {
            Ok(())
        }
    }

    /// `C_FindObjects` without the hidden objects, the batch filled as the
    /// member would have filled it (see [`crate::object::fill_batch`]).
    pub fn find(&self, found: &mut OutArray<CK_OBJECT_HANDLE>, count: &mut CK_ULONG) -> Result<()> {
        if self.hidden.handles.is_empty() {
            return check(
                self.library
                    .find_objects(self.handle, found.as_mut_slice(), count),
            );
        }
        let fetch = |at: &mut [CK_OBJECT_HANDLE]| {
            let mut returned: CK_ULONG = 0;
            check(
                self.library
                    .find_objects(self.handle, Some(&mut *at), &mut returned),
            )?;
            Ok(returned as usize)
        };
        let keep = |batch: &mut [CK_OBJECT_HANDLE]| {
            let mut shown = 0;
            for i in 0..batch.len() {
                if !self.hidden.handles.contains(&batch[i]) {
                    batch[shown] = batch[i];
                    shown += 1;
                }
            }
            Ok(shown)
        };
        let kept = crate::object::fill_batch(found.items(), fetch, keep)?;
        *count = kept as CK_ULONG;
        Ok(())
    }

    /// Refuses a template that would make or rename a key with a domain
    /// key's label: a second key of that label would stop its group from
    /// replicating.
    pub fn refuse_reserved_label(&self, template: &Template) -> Result<()> {
        let reserved = template.iter().any(|a| {
            a.kind() == CKA_LABEL
                && a.value()
                    .is_some_and(|value| self.hidden.labels.iter().any(|l| l.as_bytes() == value))
        });
        if reserved {
            Err(Error::new(CKR_ATTRIBUTE_VALUE_INVALID))
        } else {
            Ok(())
        }
    }
}

pub enum Target {
    PassThrough(PassThroughSession),
    Virtual(Box<VirtualSession>),
}

pub struct Session {
    pub handle: CK_SESSION_HANDLE,
    pub slot_id: CK_SLOT_ID,
    pub flags: CK_FLAGS,
    pub target: Target,
    pub gate: CallGate,
}

impl Session {
    /// Counts a call in on the session's gate (refused once it closed),
    /// and for a pass-through session names its token's counts for the
    /// member calls the call makes ([`Counting`]).
    pub fn call(&self) -> Result<SessionCall<'_>> {
        let gate = self.gate.call()?;
        Ok(SessionCall {
            _counting: self.counting(),
            _gate: gate,
        })
    }

    /// The counting scope of a pass-through session's token; a virtual
    /// session's calls are counted per member (`Member::begin_call`).
    #[inline(always)]
    fn counting(&self) -> Option<Counting<'_>> {
        match &self.target {
            Target::PassThrough(p) => Some(Counting::on(&p.counts)),
            Target::Virtual(_) => None,
        }
    }
}

/// A call under way on a session (see [`Session::call`]).
pub struct SessionCall<'a> {
    _counting: Option<Counting<'a>>,
    _gate: CallGuard<'a>,
}

/// The calls under way on a session. Its member sessions are closed only
/// once none is left (SoftHSM crashes when a session is closed under a
/// running `C_Sign`), and a call that arrives after the close is refused
/// with `CKR_SESSION_HANDLE_INVALID` before it reaches a member. A logout
/// pauses the gate instead: calls that arrive meanwhile wait outside until
/// it resumes.
#[derive(Default)]
pub struct CallGate {
    /// The calls under way, and [`CLOSED`] and [`PAUSED`].
    inner: Mutex<GateState>,
    /// Signalled when a call leaves a closed or paused gate, and when a
    /// paused gate resumes or closes.
    went_idle: Condvar,
}

#[derive(Default)]
struct GateState {
    calls: u32,
    state: u8,
}

const CLOSED: u8 = 1;
const PAUSED: u8 = 2;

impl CallGate {
    /// Counts a call in; false if the session is closed (the call must
    /// still [`Self::leave`]). While the gate is paused, waits outside for
    /// it to resume or close.
    #[inline(always)]
    fn enter(&self) -> bool {
        let mut inner = self.inner.lock();
        while inner.state == PAUSED {
            self.went_idle.wait(&mut inner);
        }
        inner.calls += 1;
        inner.state & CLOSED == 0
    }

    #[inline(always)]
    fn leave(&self) {
        let mut inner = self.inner.lock();
        inner.calls -= 1;
        if inner.state != 0 {
            self.went_idle.notify_all();
        }
    }

    /// Sets or clears `bit`, and wakes the waiters.
    fn set_state(&self, bit: u8, on: bool) {
        let mut inner = self.inner.lock();
        if on {
            inner.state |= bit;
        } else {
            inner.state &= !bit;
        }
        self.went_idle.notify_all();
    }

    /// The calls under way now.
    #[cfg(test)]
    fn calls(&self) -> u32 {
        self.inner.lock().calls
    }

    /// A call counted in for as long as the guard lives, or
    /// `CKR_SESSION_HANDLE_INVALID` if the session is closed.
    pub fn call(&self) -> Result<CallGuard<'_>> {
        let guard = CallGuard(self);
        if guard.0.enter() {
            Ok(guard)
        } else {
            Err(Error::new(CKR_SESSION_HANDLE_INVALID))
        }
    }

    /// Refuses new calls from now on.
    pub fn close(&self) {
        self.set_state(CLOSED, true);
    }

    /// Holds new calls outside until [`Paused`] is dropped.
    pub fn pause(&self) -> Paused<'_> {
        self.set_state(PAUSED, true);
        Paused(self)
    }

    /// Waits until `deadline` for the calls under way after
    /// [`Self::close`]; false if some are still inside a member then.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        self.wait_calls(0, deadline)
    }

    /// Waits until `deadline` for at most `calls` to be under way (a
    /// logout's own call among them); false if more are then.
    pub fn wait_calls(&self, calls: u32, deadline: Instant) -> bool {
        let mut inner = self.inner.lock();
        while inner.calls > calls {
            let left = crate::clock::block_for(deadline);
            if left.is_zero() {
                return false;
            }
            self.went_idle.wait_for(&mut inner, left);
        }
        true
    }
}

/// A paused [`CallGate`]; dropping it lets the calls held outside in.
pub struct Paused<'a>(&'a CallGate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.set_state(PAUSED, false);
    }
}

/// A call counted in on a session's [`CallGate`].
pub struct CallGuard<'a>(&'a CallGate);

impl Drop for CallGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Every open session, by the handle the application holds. The handles
/// come from our own counter and applications can only look them up, so a
/// fast non-cryptographic hash is safe here; it is on every call's path.
pub struct SessionTable {
    sessions: RwLock<FxHashMap<CK_SESSION_HANDLE, Arc<Session>>>,
}

/// Session handles are process-wide and never reused, so a handle from a
/// closed session can never reach another one.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Counts sessions leaving any table, so that a session a thread keeps
/// from its last call ([`SessionRef`]) is never used after it was closed.
static REMOVALS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The session this thread used last, with [`removals`] when it was
    /// looked up: most applications use one session per thread, and then a
    /// call finds its session with one thread-local access, without the
    /// table's lock or a reference count. A [`SessionRef`] takes it out
    /// for its call and puts it back when dropped, so a call nested in it
    /// finds the cache empty and goes to the table.
    static LAST_USED: Cell<Option<(Arc<Session>, u64)>> = const { Cell::new(None) };
}

/// An application session held for one call, counted in on its gate;
/// dropping it counts the call out and makes it the thread's cached
/// session.
pub struct SessionRef {
    /// The pass-through token's counting scope ([`Session::call`]), ended
    /// before the session is let go.
    counting: Option<Counting<'static>>,
    /// Moved into the thread's cache by `drop`, the only place it is taken.
    session: ManuallyDrop<Arc<Session>>,
    removals: u64,
}

impl SessionRef {
    /// The session this thread used last, if it is `handle` and no session
    /// was closed since.
    #[inline(always)]
    pub fn cached(handle: CK_SESSION_HANDLE) -> Option<SessionRef> {
        let (session, looked_up) = LAST_USED.try_with(Cell::take).ok().flatten()?;
        if session.handle != handle || looked_up != removals() {
            let _kept = LAST_USED.try_with(|cell| cell.set(Some((session, looked_up))));
            return None;
        }
        SessionRef::admitted(session, looked_up)
    }

    /// Counts the call in on the session's gate; `None` if the session was
    /// closed meanwhile.
    #[inline(always)]
    fn admitted(session: Arc<Session>, removals: u64) -> Option<Self> {
        let entered = session.gate.enter();
        let counting = match &session.target {
            // SAFETY: the counts live as long as the session, which the
            // SessionRef holds until it has ended the scope.
            Target::PassThrough(p) => Some(unsafe { Counting::on_kept(&p.counts) }),
            Target::Virtual(_) => None,
        };
        let held = SessionRef {
            counting,
            session: ManuallyDrop::new(session),
            removals,
        };
        // A refused call still leaves: dropping `held` does that.
        entered.then_some(held)
    }

    /// `session`, looked up after [`removals`] read `removals`.
    /// `CKR_SESSION_HANDLE_INVALID` if it was closed since the lookup.
    pub fn new(session: Arc<Session>, removals: u64) -> Result<Self> {
        SessionRef::admitted(session, removals).ok_or(Error::new(CKR_SESSION_HANDLE_INVALID))
    }
}

/// Runs `f` on the session this thread used last, if it is `handle` and
/// no session was closed since, without counting a call in on its gate:
/// for a call that reaches no member and waits for nothing, such as
/// noting a digest ([`VirtualSession::digest_init_lazily`]). `None` when
/// the cache cannot answer.
#[inline(always)]
pub fn with_cached<R>(handle: CK_SESSION_HANDLE, f: impl FnOnce(&Session) -> R) -> Option<R> {
    LAST_USED
        .try_with(|cell| {
            let (session, looked_up) = cell.take()?;
            let answer = (session.handle == handle && looked_up == removals()).then(|| f(&session));
            cell.set(Some((session, looked_up)));
            answer
        })
        .ok()
        .flatten()
}

/// Makes every thread's cached session stale: for state dropped without
/// going through a table, such as a parent's after `fork`.
pub fn forget_cached_sessions() {
    REMOVALS.fetch_add(1, Ordering::AcqRel);
}

/// How many sessions have left the table so far; read before a lookup whose
/// result [`SessionRef`] caches.
pub fn removals() -> u64 {
    REMOVALS.load(Ordering::Acquire)
}

impl Deref for SessionRef {
    type Target = Session;
    #[inline(always)]
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl SessionRef {
    /// Ends the call as dropping does, inlined where the hot entry points
    /// call it (the compiler keeps the drop out of line in some): its
    /// access to [`LAST_USED`] then shares the one the lookup made.
    #[inline(always)]
    pub fn release(mut self) {
        self.end();
        std::mem::forget(self);
    }

    /// Counts the call out and makes the session the thread's cached one;
    /// once only (`release` or the drop).
    #[inline(always)]
    fn end(&mut self) {
        self.counting = None;
        self.gate.leave();
        // SAFETY: `end` runs once, from `release` (which forgets `self`)
        // or from the drop.
        let session = unsafe { ManuallyDrop::take(&mut self.session) };
        let cached = Some((session, self.removals));
        if let Ok(Some(replaced)) = LAST_USED.try_with(|cell| cell.replace(cached)) {
            drop_outside_cache(replaced);
        }
    }
}

impl Drop for SessionRef {
    fn drop(&mut self) {
        self.end();
    }
}

/// Drops the session a [`SessionRef`] found in the thread's cache (a
/// nested call's), outside the cell: its drop may close member sessions.
#[cold]
#[inline(never)]
fn drop_outside_cache(replaced: (Arc<Session>, u64)) {
    drop(replaced);
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            sessions: RwLock::new(FxHashMap::default()),
        }
    }
}

impl SessionTable {
    pub fn insert(
        &self,
        slot_id: CK_SLOT_ID,
        flags: CK_FLAGS,
        target: Target,
    ) -> CK_SESSION_HANDLE {
        let handle = NEXT_SESSION.fetch_add(1, Ordering::Relaxed) as CK_SESSION_HANDLE;
        let session = Arc::new(Session {
            handle,
            slot_id,
            flags,
            target,
            gate: CallGate::default(),
        });
        self.sessions.write().insert(handle, session);
        handle
    }

    pub fn get(&self, handle: CK_SESSION_HANDLE) -> Result<Arc<Session>> {
        self.sessions
            .read()
            .get(&handle)
            .cloned()
            .ok_or(Error::new(CKR_SESSION_HANDLE_INVALID))
    }

    pub fn remove(&self, handle: CK_SESSION_HANDLE) -> Result<Arc<Session>> {
        let removed = self.sessions.write().remove(&handle);
        forget_cached_sessions();
        removed.ok_or(Error::new(CKR_SESSION_HANDLE_INVALID))
    }

    /// Removes and returns every session on `slot_id`.
    pub fn remove_slot(&self, slot_id: CK_SLOT_ID) -> Vec<Arc<Session>> {
        let mut sessions = self.sessions.write();
        forget_cached_sessions();
        let handles: Vec<_> = sessions
            .values()
            .filter(|s| s.slot_id == slot_id)
            .map(|s| s.handle)
            .collect();
        handles.iter().filter_map(|h| sessions.remove(h)).collect()
    }

    pub fn drain(&self) -> Vec<Arc<Session>> {
        let drained = self.sessions.write().drain().map(|(_, s)| s).collect();
        forget_cached_sessions();
        drained
    }

    /// (all, read-write) sessions open on `slot_id`.
    pub fn count(&self, slot_id: CK_SLOT_ID) -> (CK_ULONG, CK_ULONG) {
        let sessions = self.sessions.read();
        let on_slot = sessions.values().filter(|s| s.slot_id == slot_id);
        on_slot.fold((0, 0), |(all, rw), s| {
            (all + 1, rw + CK_ULONG::from(s.flags & CKF_RW_SESSION != 0))
        })
    }
}

impl SessionTable {
    /// Every open session, for checks across a slot.
    pub fn snapshot(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{Group, GroupSettings};

    /// A session on a group without members: enough for the table, the
    /// thread's cache and the gate, which never reach a member.
    fn table_with_session() -> (SessionTable, CK_SESSION_HANDLE) {
        let settings = GroupSettings {
            domain_label: "d".into(),
            replay_limit: 0,
            min_replicas: 1,
            member_timeout: std::time::Duration::from_secs(1),
        };
        let group = Arc::new(Group::new(0, "g", "1".into(), 0, &[], &[], settings));
        let target = Target::Virtual(Box::new(VirtualSession::internal(group)));
        let table = SessionTable::default();
        let handle = table.insert(0, CKF_SERIAL_SESSION, target);
        (table, handle)
    }

    fn look_up(table: &SessionTable, handle: CK_SESSION_HANDLE) -> Result<SessionRef> {
        if let Some(cached) = SessionRef::cached(handle) {
            return Ok(cached);
        }
        let seen = removals();
        SessionRef::new(table.get(handle)?, seen)
    }

    #[test]
    fn the_cache_serves_the_last_session_and_a_nested_call_goes_to_the_table() {
        let (table, handle) = table_with_session();
        drop(look_up(&table, handle).unwrap());
        let outer = SessionRef::cached(handle).expect("cached after its first call");
        assert!(
            SessionRef::cached(handle).is_none(),
            "the cache is lent out for the outer call"
        );
        let inner = look_up(&table, handle).unwrap();
        assert_eq!(inner.handle, outer.handle);
        assert_eq!(outer.gate.calls(), 2);
        drop(inner);
        drop(outer);
        assert_eq!(table.get(handle).unwrap().gate.calls(), 0);
        assert!(SessionRef::cached(handle).is_some());
    }

    #[test]
    fn a_closed_session_is_never_served_from_the_cache() {
        let (table, handle) = table_with_session();
        drop(look_up(&table, handle).unwrap());
        let closed = table.remove(handle).unwrap();
        closed.gate.close();
        assert!(
            SessionRef::cached(handle).is_none(),
            "stale after a removal"
        );
        assert!(look_up(&table, handle).is_err());
        assert!(closed.gate.wait_idle(Instant::now()), "a refused call left");
    }

    #[test]
    fn a_paused_gate_holds_new_calls_outside_until_it_resumes() {
        let gate = CallGate::default();
        let own = gate.call().unwrap();
        let paused = gate.pause();
        assert!(gate.wait_calls(1, Instant::now()), "only the pauser's call");
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| gate.call().map(|_| ()).is_ok());
            // Whenever the waiter comes, it steps back out of the pause.
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            assert!(gate.wait_calls(1, deadline), "the waiter is outside");
            assert!(!waiting.is_finished(), "held while paused");
            drop(paused);
            assert!(waiting.join().unwrap(), "let in once resumed");
        });
        drop(own);
        assert!(gate.wait_idle(Instant::now()));
        let _paused = gate.pause();
        gate.close();
        assert!(gate.call().is_err(), "a close ends the wait with a refusal");
    }

    #[test]
    fn threads_calling_while_another_closes_all_leave_the_gate_idle() {
        let (table, handle) = table_with_session();
        let session = table.get(handle).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        if look_up(&table, handle).is_err() {
                            break;
                        }
                    }
                });
            }
            scope.spawn(|| {
                for drained in table.drain() {
                    drained.gate.close();
                }
            });
        });
        assert!(session.gate.wait_idle(Instant::now()));
        assert!(look_up(&table, handle).is_err());
    }
}
