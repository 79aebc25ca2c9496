//! A session on a virtual slot: its member sessions (a
//! [`MemberSessions`] set) and the calls that need no operation. Its other
//! jobs are parts of its own: every member call and the judgement of its
//! answer (`attempt`), choosing a member (`choice`), finding an object on
//! a member (`resolve`), operations (`operations`) and their failover
//! (`moving`), spare instances (`lanes`), waiting for a returning member
//! (`waiting`).

use crate::bindings::{BindingsCell, BindingsGuard, Summary, OP_KINDS};
pub use crate::bindings::{Input, OpKind, SearchFilter};
use crate::error::{check, Error, Result};
use crate::group::{is_member_fault, Group, Positions, Waits};
use crate::member_api::{MemberBackend, MemberSession};
use crate::member_sessions::MemberSessions;
use cryptoki_sys::*;
use std::sync::Arc;

mod attempt;
mod choice;
mod digest;
mod lanes;
mod moving;
mod operations;
mod resolve;
pub(crate) mod waiting;

pub(crate) use attempt::{Attempt, MakingAnswer};
pub use choice::{Handles, Preference};
pub use operations::Step;

/// The load-balancing lane of calls outside operations.
const STATELESS_LANE: usize = crate::group::STATELESS_LANE;
const _: () = assert!(
    STATELESS_LANE == OP_KINDS,
    "one lane per kind, then stateless"
);

pub struct VirtualSession {
    pub group: Arc<Group>,
    /// The session on each member, by position.
    members: MemberSessions,
    bindings: BindingsCell,
    /// The lane this session holds (`lanes.rs`).
    lane: lanes::LaneCell,
    /// A digest `C_DigestInit` noted and no member has yet (`digest.rs`).
    pending_digest: digest::PendingDigest,
    /// Whether its calls wait for a returning member when none serves (see
    /// [`VirtualSession::wait_for_a_member`]): the application's sessions
    /// do; the library's own (recovery's, reconciliation's) never, since
    /// that member's return may wait on them.
    waits_for_members: bool,
}

impl VirtualSession {
    /// Opens a member session on every member that is up (a member's
    /// unused sessions are taken first, so this stays cheap). Opening them
    /// at each member's first call instead lost and resurrected objects in
    /// the simulation (seeds 102057, 122459, 133269, 141690, 148478,
    /// 149728), so every member gets its session here. Fails only when no
    /// member could open one (after waiting for a returning member, if
    /// none served).
    pub fn open(group: Arc<Group>, flags: CK_FLAGS) -> Result<Self> {
        group.open_utility_sessions();
        let mut session = Self::new(group, flags);
        session.waits_for_members = true;
        let mut last_error = Error::new(CKR_TOKEN_NOT_PRESENT);
        let mut waits = Waits::default();
        loop {
            let mut opened = 0;
            for position in 0..session.group.members.len() {
                if !session.group.members[position].is_up() {
                    continue;
                }
                match session.member_session(position) {
                    Ok(_) => opened += 1,
                    Err(e) => {
                        if is_member_fault("C_OpenSession", e.rv) {
                            session.group.member_failed(position, "C_OpenSession", e.rv);
                        }
                        last_error = e;
                    }
                }
            }
            if opened > 0 {
                return Ok(session);
            }
            if !session.wait_for_a_member(&mut waits) {
                return Err(last_error);
            }
        }
    }

    /// The first member session opened (opening one on an up member if
    /// none is), for what any member session can answer
    /// (`C_GetSessionInfo`).
    pub fn any_member_session(&self) -> Option<(usize, MemberSession)> {
        self.members
            .opened(&self.group)
            .or_else(|| self.up_member_sessions().into_iter().next())
    }

    /// A session for the library's own work (recovery), with member
    /// sessions opened as they are needed, also on members coming back.
    pub fn internal(group: Arc<Group>) -> Self {
        Self::new(group, CKF_SERIAL_SESSION | CKF_RW_SESSION)
    }

    fn new(group: Arc<Group>, flags: CK_FLAGS) -> Self {
        VirtualSession {
            members: MemberSessions::new(&group, flags),
            group,
            bindings: BindingsCell::default(),
            lane: lanes::LaneCell::default(),
            pending_digest: digest::PendingDigest::default(),
            waits_for_members: false,
        }
    }

    #[inline(always)]
    fn bindings(&self) -> BindingsGuard<'_> {
        self.bindings.lock()
    }

    #[inline(always)]
    fn summary(&self) -> Summary {
        self.bindings.summary()
    }

    /// Closes every member session (see [`MemberSessions::close`]).
    pub fn close(&self) {
        if self.lane.on() {
            self.drop_lane();
        }
        self.members.close(&self.group);
    }

    /// The session on member `position` in its current epoch, opened now if
    /// the member came up (or came back) after this session was opened.
    pub fn member_session(&self, position: usize) -> Result<MemberSession> {
        self.members.member_session(&self.group, position)
    }

    /// Runs member calls made outside [`VirtualSession::attempt`] (lookups,
    /// attribute reads) on the member's session, counted in flight like any
    /// call, so that the watchdog sees the member if it hangs under them.
    pub fn on_member<T>(
        &self,
        position: usize,
        calls: impl FnOnce(&MemberSession) -> T,
    ) -> Result<T> {
        let s = self.member_session(position)?;
        let _in_flight = self.group.members[position].begin_call();
        Ok(crate::member::on_connection(s.connection, || calls(&s)))
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

    /// Runs a call that needs no operation (random numbers, attribute
    /// reads) on the chosen member, failing over until one answers.
    #[inline(always)]
    pub fn stateless(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        function: &str,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, &[CK_OBJECT_HANDLE]) -> CK_RV,
    ) -> Result<()> {
        if keys.is_empty() {
            return self.keyless(function, |l, s| call(l, s, &[]));
        }
        let mut waits = Waits::default();
        let mut refused = Positions::new();
        loop {
            let preference = Preference::LeastBusy(STATELESS_LANE);
            let chosen = if refused.is_empty() {
                self.choose(keys, preference)
            } else {
                self.choose_besides(keys, preference, &refused)
            };
            let (position, handles, era) = match chosen {
                Ok(chosen) => chosen,
                Err(e) if refused.is_empty() && self.wait_to_choose_again(&e, keys, &mut waits) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let on_lane = if self.lane.possible(&self.group) {
                self.stateless_on_lane(position, keys, &handles, function, &mut call)
            } else {
                None
            };
            let answer = on_lane.unwrap_or_else(|| {
                self.attempt_keyed(position, era, function, &mut |l, s| call(l, s, &handles))
            });
            match answer {
                Attempt::Answered(CKR_MECHANISM_INVALID) => refused.push(position),
                Attempt::Answered(rv) => return check(rv),
                Attempt::Faulted => {}
            }
        }
    }

    /// [`Self::stateless`] of a call that names no object, on a spare
    /// instance of the member's library if one is idle. With no member
    /// handles there is no era to check them against.
    #[inline(always)]
    fn keyless(
        &self,
        function: &str,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let mut waits = Waits::default();
        loop {
            let position = match self.choose_keyless(Preference::LeastBusy(STATELESS_LANE)) {
                Ok(position) => position,
                Err(e) if self.wait_to_choose_again(&e, &[], &mut waits) => continue,
                Err(e) => return Err(e),
            };
            let answer = self.attempt_maybe_on_spare(position, None, function, true, &mut call);
            if let Attempt::Answered(rv) = answer {
                return check(rv);
            }
        }
    }

    /// Runs a credential call on every member that is up. The first member
    /// to answer decides: if it refuses, no other member is asked, so a
    /// wrong PIN costs one try on one token.
    pub fn first_decides(
        &self,
        function: &str,
        call: impl Fn(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let mut call = call;
        let mut decided = false;
        for position in self.group.by_position() {
            match self.attempt(position, function, &mut call) {
                Attempt::Faulted => continue,
                Attempt::Answered(rv) if !decided => {
                    check(rv)?;
                    decided = true;
                }
                Attempt::Answered(CKR_OK) => {}
                // It refused what the first member accepted (a different
                // credential): it cannot serve this group's logins.
                Attempt::Answered(rv) => self.group.member_failed(position, function, rv),
            }
        }
        if decided {
            Ok(())
        } else {
            Err(Error::new(CKR_DEVICE_ERROR))
        }
    }

    /// Changes a PIN on every member (`C_SetPIN`, `C_InitPIN`) as
    /// [`Self::first_decides`] runs it -- only while every member serves:
    /// a member away would keep the old PIN, and its return would be
    /// refused the group's login, so the change is refused with one HA log
    /// line, changing nothing.
    pub fn change_pin(
        &self,
        function: &str,
        call: impl Fn(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        if let Some(away) = self.group.members.iter().find(|m| !m.is_up()) {
            let event = format!(
                "{function}: the PIN is not changed: member {} does not serve and would keep \
                 the old one; change it once every member serves",
                away.serial
            );
            eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
            self.group.log(Some(away.position), &event);
            return Err(Error::new(CKR_FUNCTION_FAILED));
        }
        self.first_decides(function, call)
    }
}
