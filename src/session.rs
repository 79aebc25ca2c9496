//! Application sessions: the table of session handles the application
//! holds, and for each session where its calls go -- one member session for
//! a pass-through slot, or a [`VirtualSession`] for a virtual slot.

use crate::error::{check, Error, Result};
use crate::member::member_call;
use crate::member::MemberLibrary;
pub use crate::virtual_session::VirtualSession;
use cryptoki_sys::*;
use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A session on one member token, opened in the member's `epoch` on the
/// library's `connection`.
#[derive(Clone)]
pub struct MemberSession {
    pub library: Arc<MemberLibrary>,
    pub handle: CK_SESSION_HANDLE,
    pub epoch: u64,
    pub connection: u64,
}

pub struct PassThroughSession {
    pub library: Arc<MemberLibrary>,
    pub slot: CK_SLOT_ID,
    pub handle: CK_SESSION_HANDLE,
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
    epoch: u64,
) -> Result<MemberSession> {
    // Read first: a reconnect in between makes the session look older,
    // never newer, than it is.
    let connection = library.connection();
    let mut handle: CK_SESSION_HANDLE = 0;
    check(member_call!(
        library,
        C_OpenSession(slot, flags, std::ptr::null_mut(), None, &mut handle)
    ))?;
    Ok(MemberSession {
        library: Arc::clone(library),
        handle,
        epoch,
        connection,
    })
}

impl SessionTable {
    /// Every open session, for checks across a slot.
    pub fn snapshot(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }
}
