//! Application sessions: the table of session handles the application
//! holds, and for each session where its calls go -- one member session for
//! a pass-through slot, or a [`VirtualSession`] for a virtual slot.

use crate::error::{check, Error, Result};
use crate::member::member_call;
use crate::member::MemberLibrary;
pub use crate::member::{open_member_session, MemberSession};
pub use crate::virtual_session::VirtualSession;
use cryptoki_sys::*;
use parking_lot::{Condvar, Mutex, RwLock};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::cell::UnsafeCell;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The member session a virtual session holds on one member.
#[derive(Default)]
pub struct MemberSessionCell {
    held: RwLock<Option<MemberSession>>,
    /// Every library a session here was opened on, kept for as long as the
    /// cell, so that a library [`Self::get`] lends out outlives the session.
    retained: Mutex<SmallVec<[Arc<MemberLibrary>; 1]>>,
}

impl MemberSessionCell {
    /// The session held, if it was opened in `epoch`: its library, handle
    /// and connection. The library is lent, not counted: every call reads
    /// it, and a reference count shared by all threads would be contended.
    #[inline(always)]
    pub fn get(&self, epoch: u64) -> Option<(&MemberLibrary, CK_SESSION_HANDLE, u64)> {
        let held = self.held.read();
        let session = held.as_ref().filter(|s| s.epoch == epoch)?;
        let library = Arc::as_ptr(&session.library);
        let found = (session.handle, session.connection);
        drop(held);
        // SAFETY: `retained` holds an Arc of every library a session here
        // was opened on for as long as `self` lives.
        Some((unsafe { &*library }, found.0, found.1))
    }

    /// The session held, whatever its epoch, as an owned value.
    pub fn get_owned(&self) -> Option<MemberSession> {
        self.held.read().clone()
    }

    /// Holds `session` unless one of its epoch is already held; returns the
    /// session held afterwards and, if it lost that race, `session` back.
    pub fn put(&self, session: MemberSession) -> (MemberSession, Option<MemberSession>) {
        let mut held = self.held.write();
        if let Some(same_epoch) = held.as_ref().filter(|h| h.epoch == session.epoch) {
            return (same_epoch.clone(), Some(session));
        }
        let mut retained = self.retained.lock();
        if !retained.iter().any(|l| Arc::ptr_eq(l, &session.library)) {
            retained.push(Arc::clone(&session.library));
        }
        *held = Some(session.clone());
        (session, None)
    }

    /// Empties the cell, returning the session it held.
    pub fn take(&self) -> Option<MemberSession> {
        self.held.write().take()
    }
}

pub struct PassThroughSession {
    pub library: Arc<MemberLibrary>,
    pub slot: CK_SLOT_ID,
    pub handle: CK_SESSION_HANDLE,
    /// Objects of this token the application must not reach: the domain
    /// keys of HA groups (see [`HiddenObjects`]).
    pub hidden: Arc<HiddenObjects>,
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
    ///
    /// # Safety
    /// `found` must have room for `max` handles; `count` must be writable.
    pub unsafe fn find(
        &self,
        found: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) -> Result<()> {
        if self.hidden.handles.is_empty() {
            return check(member_call!(
                self.library,
                C_FindObjects(self.handle, found, max, count)
            ));
        }
        let fetch = |at, room: usize| {
            let mut returned: CK_ULONG = 0;
            check(member_call!(
                self.library,
                C_FindObjects(self.handle, at, room as CK_ULONG, &mut returned)
            ))?;
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
        // SAFETY: forwarded from the caller.
        let kept = unsafe { crate::object::fill_batch(found, max as usize, fetch, keep) }?;
        // SAFETY: `count` is writable, as the caller vouches.
        unsafe { *count = kept as CK_ULONG };
        Ok(())
    }

    /// Refuses a template that would make or rename a key with a domain
    /// key's label: a second key of that label would stop its group from
    /// replicating.
    ///
    /// # Safety
    /// `template` must point to `count` readable attributes (or be null).
    pub unsafe fn refuse_reserved_label(
        &self,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<()> {
        if template.is_null() {
            return Ok(());
        }
        // SAFETY: the caller vouches for the template.
        let attributes = unsafe { std::slice::from_raw_parts(template, count as usize) };
        let reserved = attributes.iter().any(|a| {
            a.type_ == CKA_LABEL
                && !a.pValue.is_null()
                && self.hidden.labels.iter().any(|l| {
                    l.len() == a.ulValueLen as usize
                        // SAFETY: a value of that length, as the caller vouches.
                        && unsafe { std::slice::from_raw_parts(a.pValue as *const u8, l.len()) }
                            == l.as_bytes()
                })
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

/// The calls under way on a session. Its member sessions are closed only
/// once none is left (SoftHSM crashes when a session is closed under a
/// running `C_Sign`), and a call that arrives after the close is refused
/// with `CKR_SESSION_HANDLE_INVALID` before it reaches a member.
#[derive(Default)]
pub struct CallGate {
    calls: AtomicU32,
    closed: AtomicBool,
    idle: Mutex<()>,
    went_idle: Condvar,
}

impl CallGate {
    /// Counts a call in; false if the session is closed (the call must
    /// still [`Self::leave`]). With `close`, a Dekker pair: sequentially
    /// consistent, so either the call sees the close or the close sees
    /// the call.
    #[inline(always)]
    fn enter(&self) -> bool {
        self.calls.fetch_add(1, Ordering::SeqCst);
        !self.closed.load(Ordering::SeqCst)
    }

    #[inline(always)]
    fn leave(&self) {
        if self.calls.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            self.wake_closer();
        }
    }

    #[cold]
    fn wake_closer(&self) {
        let _idle = self.idle.lock();
        self.went_idle.notify_all();
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
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Waits until `deadline` for the calls under way after
    /// [`Self::close`]; false if some are still inside a member then.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut idle = self.idle.lock();
        while self.calls.load(Ordering::SeqCst) != 0 {
            if self.went_idle.wait_until(&mut idle, deadline).timed_out() {
                return self.calls.load(Ordering::SeqCst) == 0;
            }
        }
        true
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

/// A thread's cached session. `in_use` is set while a [`SessionRef`]
/// borrows `session`: a lookup meanwhile (a nested call) must not replace
/// it, and gets a reference of its own instead.
struct LastUsed {
    session: Option<Arc<Session>>,
    removals: u64,
    in_use: bool,
}

thread_local! {
    /// The session this thread used last: most applications use one
    /// session per thread, and then a call finds its session with one
    /// thread-local access, without the table's lock or a reference count.
    static LAST_USED: UnsafeCell<LastUsed> = const {
        UnsafeCell::new(LastUsed { session: None, removals: 0, in_use: false })
    };
}

/// An application session held for one call: borrowed from the thread's
/// cache, or, where the cache could not take it, a reference of its own.
pub struct SessionRef {
    session: NonNull<Session>,
    /// The cache entry `session` is borrowed from, released on drop.
    cache: Option<NonNull<LastUsed>>,
    _owned: Option<Arc<Session>>,
}

impl SessionRef {
    /// The session this thread used last, if it is `handle` and no session
    /// was closed since.
    #[inline(always)]
    pub fn cached(handle: CK_SESSION_HANDLE) -> Option<SessionRef> {
        LAST_USED
            .try_with(|cell| {
                let entry = cell.get();
                // SAFETY: the entry is this thread's and is reached only
                // through raw pointers from `cell.get()`, field by field,
                // never through a reference that outlives the access.
                unsafe {
                    let session = (*entry).session.as_deref()?;
                    if (*entry).in_use
                        || session.handle != handle
                        || (*entry).removals != removals()
                    {
                        return None;
                    }
                    (*entry).in_use = true;
                    Some(SessionRef {
                        session: NonNull::from(session),
                        cache: NonNull::new(entry),
                        _owned: None,
                    })
                }
            })
            .ok()
            .flatten()
            .and_then(SessionRef::admitted)
    }

    /// Counts the call in on the session's gate; `None` if the session was
    /// closed meanwhile (the drop counts the call out again).
    #[inline(always)]
    fn admitted(self) -> Option<Self> {
        self.gate.enter().then_some(self)
    }

    /// `session`, looked up after [`removals`] read `removals`; it becomes
    /// the thread's cached session unless that one is in use.
    /// `CKR_SESSION_HANDLE_INVALID` if it was closed since the lookup.
    pub fn new(session: Arc<Session>, removals: u64) -> Result<Self> {
        let pointer = NonNull::from(&*session);
        let cached = LAST_USED.try_with(|cell| {
            let entry = cell.get();
            // SAFETY: as in `cached`.
            unsafe {
                if (*entry).in_use {
                    return None;
                }
                (*entry).in_use = true;
                (*entry).removals = removals;
                let replaced = (*entry).session.replace(Arc::clone(&session));
                Some((replaced, NonNull::new(entry)))
            }
        });
        let held = match cached {
            // The replaced session is dropped only now, outside the entry's
            // borrow: its drop may close member sessions.
            Ok(Some((_replaced, entry))) => SessionRef {
                session: pointer,
                cache: entry,
                _owned: None,
            },
            _ => SessionRef {
                session: pointer,
                cache: None,
                _owned: Some(session),
            },
        };
        held.admitted()
            .ok_or(Error::new(CKR_SESSION_HANDLE_INVALID))
    }
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
        // SAFETY: the cache entry (marked in use, so never replaced
        // meanwhile) or `_owned` holds a reference for as long as `self`.
        unsafe { self.session.as_ref() }
    }
}

impl Drop for SessionRef {
    #[inline(always)]
    fn drop(&mut self) {
        self.gate.leave();
        if let Some(entry) = self.cache {
            // SAFETY: the entry belongs to this thread (a `SessionRef` is
            // neither `Send` nor outlives the call), which is still alive.
            unsafe { (*entry.as_ptr()).in_use = false };
        }
    }
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
