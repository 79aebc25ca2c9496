//! The member-session set of a virtual session: one member session per
//! member of its group, opened on demand in the member's current epoch
//! (again after the member comes back: handles from an earlier epoch are
//! never used), and closed together. Once closed, it opens none.

use crate::error::{Error, Result};
use crate::group::Group;
use crate::member_api::{open_member_session, MemberSession};
use cryptoki_sys::*;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The member session a virtual session holds on one member.
#[derive(Default)]
struct MemberSessionCell {
    held: RwLock<Option<MemberSession>>,
    /// Whether the session held was lent out for a call: one never lent is
    /// as good as new when the virtual session closes.
    used: AtomicBool,
}

impl MemberSessionCell {
    /// The session held, if it was opened in `epoch`, for one call. Marked
    /// used first, so that the clone is made where the caller takes it,
    /// not copied out after the mark.
    #[inline(always)]
    fn get(&self, epoch: u64) -> Option<MemberSession> {
        let held = self.held.read();
        let session = held.as_ref().filter(|s| s.epoch == epoch)?;
        self.mark_used();
        Some(session.clone())
    }

    /// The session held, whatever its epoch, as an owned value.
    fn get_owned(&self) -> Option<MemberSession> {
        let session = self.held.read().clone();
        if session.is_some() {
            self.mark_used();
        }
        session
    }

    #[inline(always)]
    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Holds `session` unless one of its epoch is already held; returns the
    /// session held afterwards and, if it lost that race, `session` back.
    fn put(&self, session: MemberSession) -> (MemberSession, Option<MemberSession>) {
        let mut held = self.held.write();
        if let Some(same_epoch) = held.as_ref().filter(|h| h.epoch == session.epoch) {
            return (same_epoch.clone(), Some(session));
        }
        *held = Some(session.clone());
        (session, None)
    }

    /// Empties the cell, returning the session it held and whether it was
    /// ever lent out for a call.
    fn take(&self) -> Option<(MemberSession, bool)> {
        let session = self.held.write().take()?;
        Some((session, self.used.swap(false, Ordering::Relaxed)))
    }
}

/// The member sessions of one virtual session, by member position.
pub struct MemberSessions {
    cells: Box<[MemberSessionCell]>,
    /// The virtual session's flags, for each member session opened.
    flags: CK_FLAGS,
    /// Set by [`Self::close`]: no member session is opened after it, and a
    /// member's `CKR_SESSION_HANDLE_INVALID` for a session we closed is not
    /// the member's fault.
    closed: AtomicBool,
}

impl MemberSessions {
    pub fn new(group: &Group, flags: CK_FLAGS) -> Self {
        MemberSessions {
            cells: group.members.iter().map(|_| Default::default()).collect(),
            flags,
            closed: AtomicBool::new(false),
        }
    }

    /// Whether [`Self::close`] has run.
    #[inline]
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes every member session. One from an earlier epoch of its member
    /// is left alone: after a reconnect its number may belong to another
    /// session. One no call was made on is kept by its member for the next
    /// virtual session instead ([`crate::group::Member::keep_unused`]).
    pub fn close(&self, group: &Group) {
        self.closed.store(true, Ordering::SeqCst);
        for (member, cell) in group.members.iter().zip(self.cells.iter()) {
            let Some((s, used)) = cell.take().filter(|(s, _)| s.epoch == member.epoch()) else {
                continue;
            };
            let unused_kept = if used {
                Err(s)
            } else {
                member.keep_unused(self.flags, s)
            };
            if let Err(s) = unused_kept {
                let in_flight = member.begin_call();
                let rv = crate::member::on_connection(s.connection, || {
                    s.library.close_session(s.handle)
                });
                drop(in_flight);
                // A member that failed under the close may keep the session
                // open: taken out, its recovery closes what it kept.
                if crate::group::is_member_fault("C_CloseSession", rv) {
                    group.member_failed(member.position, "C_CloseSession", rv);
                } else if rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED {
                    group.lost_sessions(member.position);
                }
            }
        }
    }

    /// The session on member `position` in its current epoch, opened now if
    /// the member came up (or came back) after this session was opened.
    pub fn member_session(&self, group: &Group, position: usize) -> Result<MemberSession> {
        let epoch = group.members[position].epoch();
        match self.cells[position].get_owned() {
            Some(s) if s.epoch == epoch => Ok(s),
            _ => self.open_member_session(group, position, epoch),
        }
    }

    /// The first session held that is of its member's current epoch.
    pub fn opened(&self, group: &Group) -> Option<(usize, MemberSession)> {
        group
            .members
            .iter()
            .zip(self.cells.iter())
            .find_map(|(member, cell)| {
                let session = cell.get_owned().filter(|s| s.epoch == member.epoch())?;
                Some((member.position, session))
            })
    }

    /// The member session of `epoch` if one is held: the path of every
    /// member call; [`Self::open_and_get`] when it is `None`.
    #[inline(always)]
    pub fn held(&self, position: usize, epoch: u64) -> Option<MemberSession> {
        self.cells[position].get(epoch)
    }

    /// The member session of `epoch`, opened now: none was held.
    #[cold]
    pub fn open_and_get(
        &self,
        group: &Group,
        position: usize,
        epoch: u64,
    ) -> Result<MemberSession> {
        self.open_member_session(group, position, epoch)?;
        // Absent only if the member failed again meanwhile.
        self.cells[position]
            .get(epoch)
            .ok_or(Error::new(CKR_DEVICE_ERROR))
    }

    fn open_member_session(
        &self,
        group: &Group,
        position: usize,
        epoch: u64,
    ) -> Result<MemberSession> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(CKR_SESSION_HANDLE_INVALID));
        }
        let member = &group.members[position];
        let location = member
            .location()
            .filter(|_| member.reachable())
            .ok_or(Error::new(CKR_DEVICE_ERROR))?;
        let opened = match member.take_unused(self.flags, epoch) {
            Some(kept) => kept,
            None => {
                let in_flight = member.begin_call();
                let opened = crate::group::retry_result_while_busy("C_OpenSession", || {
                    open_member_session(
                        Arc::clone(&location.library),
                        location.slot,
                        self.flags,
                        epoch,
                    )
                })?;
                drop(in_flight);
                // A search there would find none of the private objects.
                group.unless_login_lost(position, opened)?
            }
        };
        let (held, raced) = self.cells[position].put(opened);
        if let Some(raced) = raced {
            crate::member::on_connection(raced.connection, || {
                raced.library.close_session(raced.handle)
            });
        }
        // Closed while this one was being opened: `close` may have missed it.
        if self.closed.load(Ordering::SeqCst) {
            if let Some((late, _)) = self.cells[position].take() {
                crate::member::on_connection(late.connection, || {
                    late.library.close_session(late.handle)
                });
            }
            return Err(Error::new(CKR_SESSION_HANDLE_INVALID));
        }
        Ok(held)
    }
}
