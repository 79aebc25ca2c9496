//! Application sessions: the table of virtual session handles, and for each
//! session where its calls go -- one member session for a pass-through
//! slot, one member session per member for a virtual slot, with the member
//! each active operation is bound to.

use crate::error::{check, Error, Result};
use crate::group::Group;
use crate::identity;
use crate::member::member_call;
use crate::member::MemberLibrary;
use crate::object::Presence;
use cryptoki_sys::*;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A session on one member token.
#[derive(Clone)]
pub struct MemberSession {
    pub library: Arc<MemberLibrary>,
    pub handle: CK_SESSION_HANDLE,
}

/// The kinds of operation a session can have active at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Encrypt = 0,
    Decrypt,
    Digest,
    Sign,
    Verify,
    SignRecover,
    VerifyRecover,
    Find,
}
const OP_KINDS: usize = 8;

/// Which serving member a call would rather run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// Spread load: crypto goes to the least busy member.
    LeastBusy,
    /// Searches and object-making calls go to the primary while it is up,
    /// where objects made on one member live first.
    Primary,
}

/// Where a call stands in its operation, to know when the member ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An update: an error other than `CKR_BUFFER_TOO_SMALL` ends the
    /// operation.
    Update,
    /// A final or single-part call: it ends the operation unless it was a
    /// length query or answered `CKR_BUFFER_TOO_SMALL`.
    Finish { length_query: bool },
}

impl Step {
    fn ends_operation(self, rv: CK_RV) -> bool {
        match self {
            Step::Update => rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL,
            Step::Finish { length_query } => {
                rv != CKR_BUFFER_TOO_SMALL && !(rv == CKR_OK && length_query)
            }
        }
    }
}

/// The member each active operation runs on. All operations of a session
/// run on one member, so dual functions find both halves together.
#[derive(Default)]
struct Bindings {
    ops: [bool; OP_KINDS],
    member: Option<usize>,
    /// Set by `C_SetOperationState`: the member whose state was restored.
    restored: bool,
}

impl Bindings {
    fn any_active(&self) -> bool {
        self.restored || self.ops.iter().any(|a| *a)
    }
}

pub struct VirtualSession {
    pub group: Arc<Group>,
    flags: CK_FLAGS,
    members: Mutex<Vec<Option<MemberSession>>>,
    bindings: Mutex<Bindings>,
}

pub struct PassThroughSession {
    pub library: Arc<MemberLibrary>,
    pub slot: CK_SLOT_ID,
    pub handle: CK_SESSION_HANDLE,
}

pub enum Target {
    PassThrough(PassThroughSession),
    Virtual(VirtualSession),
}

pub struct Session {
    pub handle: CK_SESSION_HANDLE,
    pub slot_id: CK_SLOT_ID,
    pub flags: CK_FLAGS,
    pub target: Target,
}

/// Every open session, by the handle the application holds.
pub struct SessionTable {
    sessions: RwLock<HashMap<CK_SESSION_HANDLE, Arc<Session>>>,
}

/// Session handles are process-wide and never reused, so a handle from a
/// closed session can never reach another one.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            sessions: RwLock::new(HashMap::new()),
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
        self.sessions
            .write()
            .remove(&handle)
            .ok_or(Error::new(CKR_SESSION_HANDLE_INVALID))
    }

    /// Removes and returns every session on `slot_id`.
    pub fn remove_slot(&self, slot_id: CK_SLOT_ID) -> Vec<Arc<Session>> {
        let mut sessions = self.sessions.write();
        let handles: Vec<_> = sessions
            .values()
            .filter(|s| s.slot_id == slot_id)
            .map(|s| s.handle)
            .collect();
        handles.iter().filter_map(|h| sessions.remove(h)).collect()
    }

    pub fn drain(&self) -> Vec<Arc<Session>> {
        self.sessions.write().drain().map(|(_, s)| s).collect()
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

/// Opens a session on one member token.
pub fn open_member_session(
    library: &Arc<MemberLibrary>,
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
) -> Result<MemberSession> {
    let mut handle: CK_SESSION_HANDLE = 0;
    check(member_call!(
        library,
        C_OpenSession(slot, flags, std::ptr::null_mut(), None, &mut handle)
    ))?;
    Ok(MemberSession {
        library: Arc::clone(library),
        handle,
    })
}

impl VirtualSession {
    /// Opens a member session on every member that is up. Fails only when
    /// no member could open one.
    pub fn open(group: Arc<Group>, flags: CK_FLAGS) -> Result<Self> {
        let mut last_error = Error::new(CKR_TOKEN_NOT_PRESENT);
        let mut members = Vec::with_capacity(group.members.len());
        for member in &group.members {
            let opened = match member.location() {
                Some(loc) if member.is_up() => {
                    match open_member_session(&loc.library, loc.slot, flags) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            last_error = e;
                            None
                        }
                    }
                }
                _ => None,
            };
            members.push(opened);
        }
        if members.iter().all(Option::is_none) {
            return Err(last_error);
        }
        Ok(VirtualSession {
            group,
            flags,
            members: Mutex::new(members),
            bindings: Mutex::new(Bindings::default()),
        })
    }

    /// Closes every member session.
    pub fn close(&self) {
        let members = std::mem::take(&mut *self.members.lock());
        for s in members.into_iter().flatten() {
            member_call!(s.library, C_CloseSession(s.handle));
        }
    }

    /// The session on member `position`, opened now if the member came up
    /// after this session was opened.
    pub fn member_session(&self, position: usize) -> Result<MemberSession> {
        if let Some(s) = self.members.lock().get(position).cloned().flatten() {
            return Ok(s);
        }
        let member = &self.group.members[position];
        let loc = member
            .location()
            .filter(|_| member.is_up())
            .ok_or(Error::new(CKR_DEVICE_ERROR))?;
        let opened = open_member_session(&loc.library, loc.slot, self.flags)?;
        let mut members = self.members.lock();
        match members.get(position).cloned().flatten() {
            Some(raced) => {
                member_call!(opened.library, C_CloseSession(opened.handle));
                Ok(raced)
            }
            None => {
                members[position] = Some(opened.clone());
                Ok(opened)
            }
        }
    }

    /// Member sessions of every member that is up, opening any missing.
    pub fn up_member_sessions(&self) -> Vec<(usize, MemberSession)> {
        self.group
            .up_members()
            .filter_map(|m| {
                self.member_session(m.position)
                    .ok()
                    .map(|s| (m.position, s))
            })
            .collect()
    }

    /// The member handle of virtual object `object` on member `position`,
    /// found by fingerprint the first time it is asked for.
    pub fn resolve(
        &self,
        object: CK_OBJECT_HANDLE,
        position: usize,
    ) -> Result<Option<CK_OBJECT_HANDLE>> {
        let objects = &self.group.objects;
        match objects.presence(object, position) {
            None => Err(Error::new(CKR_OBJECT_HANDLE_INVALID)),
            Some(Presence::Present(h)) => Ok(Some(h)),
            Some(Presence::Absent) => Ok(None),
            Some(Presence::Unknown) => {
                let entry = objects
                    .get(object)
                    .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
                let Some((source, source_handle)) = entry.any_present() else {
                    return Ok(None);
                };
                let from = self.member_session(source)?;
                let to = self.member_session(position)?;
                let print = identity::fingerprint(&from.library, from.handle, source_handle);
                let found = identity::find(&to.library, to.handle, &print).map_err(Error::new)?;
                let presence = match found.as_slice() {
                    [one] => Presence::Present(*one),
                    _ => Presence::Absent,
                };
                objects.set_presence(object, position, presence);
                Ok(match presence {
                    Presence::Present(h) => Some(h),
                    _ => None,
                })
            }
        }
    }

    /// Chooses the member for a new operation or a stateless call: the
    /// member already bound to this session's operations, else the least
    /// busy serving member on which every key in `keys` exists. Returns the
    /// member, its session and the member handles of `keys`.
    pub fn choose(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
    ) -> Result<(usize, MemberSession, Vec<CK_OBJECT_HANDLE>)> {
        let bound = {
            let b = self.bindings.lock();
            b.member.filter(|_| b.any_active())
        };
        let candidates = match (bound, preference) {
            (Some(m), _) => vec![m],
            (None, Preference::LeastBusy) => self.group.by_preference(),
            (None, Preference::Primary) => self.group.by_position(),
        };
        if candidates.is_empty() {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        let mut missing_key = false;
        'members: for position in candidates {
            let mut handles = Vec::with_capacity(keys.len());
            for key in keys {
                match self.resolve(*key, position)? {
                    Some(h) => handles.push(h),
                    None => {
                        missing_key = true;
                        continue 'members;
                    }
                }
            }
            let session = self.member_session(position)?;
            return Ok((position, session, handles));
        }
        debug_assert!(missing_key);
        Err(Error::new(CKR_KEY_HANDLE_INVALID))
    }

    /// Starts an operation of `kind` on the chosen member and binds it there.
    pub fn init(
        &self,
        kind: OpKind,
        keys: &[CK_OBJECT_HANDLE],
        call: impl FnOnce(&MemberLibrary, CK_SESSION_HANDLE, &[CK_OBJECT_HANDLE]) -> CK_RV,
    ) -> Result<()> {
        let preference = if kind == OpKind::Find {
            Preference::Primary
        } else {
            Preference::LeastBusy
        };
        let (position, session, handles) = self.choose(keys, preference)?;
        let guard = self.group.members[position].begin_call();
        let rv = call(&session.library, session.handle, &handles);
        drop(guard);
        let mut b = self.bindings.lock();
        if rv == CKR_OK {
            b.ops[kind as usize] = true;
            b.member = Some(position);
        } else if rv != CKR_OPERATION_ACTIVE {
            b.ops[kind as usize] = false;
        }
        check(rv)
    }

    /// Continues the active operation of `kind` on its member.
    pub fn step(
        &self,
        kind: OpKind,
        step: Step,
        call: impl FnOnce(&MemberLibrary, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let position = {
            let b = self.bindings.lock();
            match b.member {
                Some(m) if b.ops[kind as usize] || b.restored => m,
                _ => return Err(Error::new(CKR_OPERATION_NOT_INITIALIZED)),
            }
        };
        let session = self.member_session(position)?;
        let guard = self.group.members[position].begin_call();
        let rv = call(&session.library, session.handle);
        drop(guard);
        if step.ends_operation(rv) {
            let mut b = self.bindings.lock();
            b.ops[kind as usize] = false;
            b.restored = false;
        }
        check(rv)
    }

    /// Runs a call that needs no operation (random numbers, attribute
    /// reads) on the chosen member.
    pub fn stateless(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        call: impl FnOnce(&MemberLibrary, CK_SESSION_HANDLE, &[CK_OBJECT_HANDLE]) -> CK_RV,
    ) -> Result<()> {
        let (position, session, handles) = self.choose(keys, Preference::LeastBusy)?;
        let _guard = self.group.members[position].begin_call();
        check(call(&session.library, session.handle, &handles))
    }

    /// The member whose operation state `C_GetOperationState` should save.
    pub fn bound_member(&self) -> Option<usize> {
        let b = self.bindings.lock();
        b.member.filter(|_| b.any_active())
    }

    /// Binds every later operation call to `position`, whose state the
    /// application restored.
    pub fn restore_binding(&self, position: usize) {
        let mut b = self.bindings.lock();
        b.ops = [false; OP_KINDS];
        b.member = Some(position);
        b.restored = true;
    }
}

impl SessionTable {
    /// Every open session, for checks across a slot.
    pub fn snapshot(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }
}

impl VirtualSession {
    /// Runs a credential call on every member that is up. The first member
    /// decides: if it refuses, no other member is asked, so a wrong PIN
    /// costs one try on one token.
    pub fn first_decides(
        &self,
        call: impl Fn(&MemberLibrary, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let mut members = self.up_member_sessions().into_iter();
        let (_, first) = members.next().ok_or(Error::new(CKR_DEVICE_ERROR))?;
        check(call(&first.library, first.handle))?;
        for (position, s) in members {
            let rv = call(&s.library, s.handle);
            if rv != CKR_OK {
                eprintln!(
                    "pkcs11-ha: group {}: member {} refused a credential change the first member accepted ({}); it is taken out of service",
                    self.group.label,
                    self.group.members[position].serial,
                    crate::error::rv_name(rv)
                );
                self.group.members[position].set_state(crate::group::MemberState::Down);
            }
        }
        Ok(())
    }
}
