//! A session on a virtual slot: its member sessions (a
//! [`MemberSessions`] set), the member each active operation is bound to,
//! and failover. Every member call goes
//! through [`VirtualSession::attempt`], which acts on the verdict of
//! [`crate::member::classify`] on the member's answer: a member fault takes
//! the member out and the call carries on elsewhere; a request error is the
//! application's answer and the member stays healthy.

use crate::bindings::{
    ActiveOp, BindingsCell, BindingsGuard, Replay, Search, Summary, ALL_KINDS, OP_KINDS,
};
pub use crate::bindings::{Input, OpKind, SearchFilter};
use crate::error::{check, Error, Result};
use crate::group::{is_member_fault, Group, Positions, Waits};
use crate::identity;
use crate::mechanism::Mechanism;
use crate::member::{classify, Answer};
use crate::member_api::{MemberApi, MemberBackend, MemberSession};
use crate::member_sessions::{LentSession, MemberSessions};
use crate::object::Presence;
use cryptoki_sys::*;
use smallvec::{smallvec, SmallVec};
use std::sync::Arc;

mod lanes;

/// The load-balancing lane of calls outside operations.
const STATELESS_LANE: usize = crate::group::STATELESS_LANE;
const _: () = assert!(
    STATELESS_LANE == OP_KINDS,
    "one lane per kind, then stateless"
);

/// Member handles of the keys a call names; inline, being on every
/// operation's path.
pub type Handles = SmallVec<[CK_OBJECT_HANDLE; 4]>;

/// Which serving member a call would rather run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// Spread load: crypto goes to the least busy member; ties rotate
    /// within the given lane.
    LeastBusy(usize),
    /// Object-making calls, and searches not every member answers alike,
    /// go to the primary while it is up and not degraded, where objects
    /// made on one member live first.
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

/// What [`VirtualSession::attempt`] does after a login check.
enum Relogin {
    /// Logged in again: repeat the call.
    Retry,
    /// Logged in again, but the member's handles changed: choose again.
    LookUpAgain,
    NotNeeded,
}

/// How a member answered a call.
pub(crate) enum Attempt {
    /// An answer for the application, success or request error.
    Answered(CK_RV),
    /// The member is at fault and has been taken out of service.
    Faulted,
}

thread_local! {
    /// Set while this thread runs a call that makes, changes or destroys
    /// objects (see [`VirtualSession::wait_before_writing`]).
    static WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A call that makes, changes or destroys objects is under way on this
/// thread; holds what was set before it.
pub(crate) struct Writing(bool);

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.set(self.0);
    }
}

pub struct VirtualSession {
    pub group: Arc<Group>,
    /// The session on each member, by position.
    members: MemberSessions,
    bindings: BindingsCell,
    /// The lane this session holds (`lanes.rs`).
    lane: lanes::LaneCell,
    /// Whether its calls wait for a returning member when none serves (see
    /// [`VirtualSession::wait_for_a_member`]): the application's sessions
    /// do; the library's own (recovery's, reconciliation's) never, since
    /// that member's return may wait on them.
    waits_for_members: bool,
}

/// Starts an operation of `kind` on a member; `None` if no mechanism was
/// saved for it.
fn member_init(
    kind: OpKind,
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    mechanism: Option<&CK_MECHANISM>,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let Some(mechanism) = mechanism else {
        return CKR_OPERATION_NOT_INITIALIZED;
    };
    match kind {
        OpKind::Encrypt => library.encrypt_init(session, mechanism, key),
        OpKind::Decrypt => library.decrypt_init(session, mechanism, key),
        OpKind::Digest => library.digest_init(session, mechanism),
        OpKind::Sign => library.sign_init(session, mechanism, key),
        OpKind::Verify => library.verify_init(session, mechanism, key),
        OpKind::SignRecover => library.sign_recover_init(session, mechanism, key),
        OpKind::VerifyRecover => library.verify_recover_init(session, mechanism, key),
        // A search starts again from its kept template (`restart`).
        OpKind::Find => CKR_OPERATION_NOT_INITIALIZED,
    }
}

/// Feeds one buffered update to a member.
fn member_update(
    kind: OpKind,
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    data: &[u8],
) -> CK_RV {
    match kind {
        OpKind::Digest => library.digest_update(session, Some(data)),
        OpKind::Sign => library.sign_update(session, Some(data)),
        OpKind::Verify => library.verify_update(session, Some(data)),
        _ => CKR_OPERATION_NOT_INITIALIZED,
    }
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

    /// For a call that found no member serving: waits for a returning
    /// member to serve ([`Group::wait_for_serving`]), within the call's
    /// `waits` (one `memberTimeout` for all its waits), and only in the
    /// application's sessions; true if one serves now, and the call
    /// chooses again. Callers hold no lock of the
    /// session; a call making, changing or destroying objects waits only
    /// outside its write ([`Self::wait_before_writing`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_for_a_member(&self, waits: &mut Waits) -> bool {
        self.group.up_members().next().is_none() && self.serving_again(waits)
    }

    /// After a try that found no member serving: true if one serves now,
    /// or once one returns within the call's `waits` (as
    /// [`Self::wait_for_a_member`]), and the call tries again.
    #[cold]
    #[inline(never)]
    pub(crate) fn serving_again(&self, waits: &mut Waits) -> bool {
        self.waits_for_members && !WRITING.get() && self.group.wait_for_serving(waits)
    }

    /// At the start of a call that makes, changes or destroys objects (or
    /// of its next try, `waits` shared between them): with no member
    /// serving, waits for a returning one ([`Self::wait_for_a_member`]) --
    /// here, before the write barrier and the objects being made, which
    /// that member's recovery waits for. Until the guard drops, the call
    /// waits no more.
    pub(crate) fn wait_before_writing(&self, waits: &mut Waits) -> Writing {
        self.wait_for_a_member(waits);
        Writing(WRITING.replace(true))
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

    /// [`Self::member_session`] without a reference count, as (library,
    /// session, connection): the path of every member call.
    #[inline(always)]
    fn session_on(&self, position: usize, epoch: u64) -> Result<LentSession<'_>> {
        self.members.session_on(&self.group, position, epoch)
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

    /// Runs `call` on member `position`: logs the member in again if it
    /// lost its login, and takes it out of service if it faults.
    /// `Faulted` tells the caller to choose again: the member is out, or
    /// its object handles had to be looked up afresh.
    ///
    /// Inlined, with the rare branches out of line: every member call of a
    /// virtual slot runs through here, and each frame between the
    /// application and the member costs on the way back from deep member
    /// call chains.
    #[inline(always)]
    pub(crate) fn attempt<F>(&self, position: usize, function: &str, call: &mut F) -> Attempt
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        self.attempt_maybe_on_spare(position, function, false, call)
    }

    /// [`Self::attempt`], on a spare instance of the member's library when
    /// `spare` (the call names no object and starts no operation) and one
    /// is idle.
    #[inline(always)]
    fn attempt_maybe_on_spare<F>(
        &self,
        position: usize,
        function: &str,
        spare: bool,
        call: &mut F,
    ) -> Attempt
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let LentSession {
            library,
            handle,
            connection,
            networked,
        } = match self.session_on(position, epoch) {
            Ok(s) => s,
            Err(e) => return self.not_opened(position, e.rv),
        };
        if spare && library.has_spares() {
            let mut call = |l: &dyn MemberBackend, s| call(l, s);
            if let Some(answer) = self.attempt_on_spare(position, library, function, &mut call) {
                return answer;
            }
        }
        let guard = member.begin_call();
        // Only a networked library can have reconnected under the session.
        let (rv, look_up_again) = if networked {
            self.run_on_connection(position, function, library, handle, connection, call)
        } else {
            self.run(position, function, library, handle, call)
        };
        drop(guard);
        // Success first and inline: most calls succeed, and no other check
        // applies to them.
        if rv == CKR_OK && member.epoch() == epoch {
            return Attempt::Answered(CKR_OK);
        }
        self.judge(position, function, epoch, rv, look_up_again)
    }

    /// [`Self::attempt`]'s verdict on an answer other than `CKR_OK`, out of
    /// line.
    #[cold]
    #[inline(never)]
    fn judge(
        &self,
        position: usize,
        function: &str,
        epoch: u64,
        rv: CK_RV,
        look_up_again: bool,
    ) -> Attempt {
        // Taken out while the call was inside it (the watchdog's cut of a
        // member that hangs in process): its late answer is taken as lost,
        // as if it had never come -- what it made is removed, what it
        // missed replayed, when it returns.
        if look_up_again || rv == CKR_OK {
            return Attempt::Faulted;
        }
        if !is_member_fault(function, rv) {
            return Attempt::Answered(rv);
        }
        // Its member sessions were closed under the call (it outlived the
        // close's wait): the session is gone, not the member.
        if self.members.closed() {
            return Attempt::Answered(CKR_SESSION_HANDLE_INVALID);
        }
        // A fault on a session from an earlier epoch belongs to a failure
        // already recorded: the member may be back by now.
        if epoch == self.group.members[position].epoch() {
            self.group.member_failed(position, function, rv);
        }
        Attempt::Faulted
    }

    /// Makes one call for [`Self::attempt`]: asks a busy member again a
    /// few times, and logs the member in again and repeats the call when its
    /// answer says it lost its login. True as the second value when the
    /// caller must choose again.
    #[inline(always)]
    fn run<F>(
        &self,
        position: usize,
        function: &str,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        call: &mut F,
    ) -> (CK_RV, bool)
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        let mut rv = call(library, handle);
        if rv == CKR_OK {
            return (rv, false);
        }
        let mut verdict = classify(function, rv);
        if verdict == Answer::Busy {
            rv = crate::group::retry_while_busy(function, rv, || call(library, handle));
            verdict = classify(function, rv);
        }
        if verdict != Answer::LoginLost {
            return (rv, false);
        }
        match self.check_login(position, library, handle, rv) {
            Relogin::Retry => (call(library, handle), false),
            Relogin::LookUpAgain => (rv, true),
            Relogin::NotNeeded => (rv, false),
        }
    }

    /// [`Self::run`] on a networked member's session from `connection`,
    /// out of the inlined path that in-process members take.
    #[cold]
    #[inline(never)]
    fn run_on_connection<F>(
        &self,
        position: usize,
        function: &str,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        connection: u64,
        call: &mut F,
    ) -> (CK_RV, bool)
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        crate::member::on_connection(connection, || {
            self.run(position, function, library, handle, call)
        })
    }

    /// As [`VirtualSession::attempt`], for a call that must reach this
    /// member: asked once more when the member only had to be logged in
    /// again (it is still in service then, in the same epoch). A member
    /// that failed, or failed and began to return, during the call is not
    /// asked again even if it is reachable by now: the request may have
    /// been carried out, and a second one would make its object twice
    /// (`tests/member_api.rs`: a member whose recovery began before the
    /// maker saw its answer lost).
    pub(crate) fn attempt_on(
        &self,
        position: usize,
        function: &str,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Attempt {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let answer = self.attempt(position, function, call);
        if matches!(answer, Attempt::Faulted) && member.epoch() == epoch && member.reachable() {
            return self.attempt(position, function, call);
        }
        answer
    }

    /// As [`VirtualSession::attempt_on`], for a call that makes `object` on
    /// the member. The object is recorded as being made before the request
    /// goes out, and stays in doubt there if the request was cut off on
    /// the wire, since the member may still carry it out -- or if a
    /// recovery of the member began while the call was inside it (the
    /// epoch moved twice: failed, then returning): that recovery may have
    /// read the member's objects before the member carried the request
    /// out, and would make the object again from the queue rather than
    /// look it up.
    pub(crate) fn attempt_making(
        &self,
        position: usize,
        function: &str,
        object: CK_OBJECT_HANDLE,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Attempt {
        let epoch = self.group.members[position].epoch();
        self.group.begin_making(position, object);
        crate::member::forget_cut_off();
        let answer = self.attempt_on(position, function, call);
        let returning_meanwhile = self.group.members[position].epoch() >= epoch + 2;
        let in_doubt = matches!(answer, Attempt::Faulted)
            && (crate::member::last_call_cut_off() || returning_meanwhile);
        self.group.end_making(position, object, in_doubt);
        answer
    }

    /// Whether the member still answers on this session; one that does not
    /// is taken out of service.
    pub fn answers(&self, position: usize) -> bool {
        let mut info = CK_SESSION_INFO {
            slotID: 0,
            state: 0,
            flags: 0,
            ulDeviceError: 0,
        };
        let mut call = |l: &dyn MemberBackend, s| l.get_session_info(s, &mut info);
        matches!(
            self.attempt(position, "C_GetSessionInfo", &mut call),
            Attempt::Answered(_)
        )
    }

    #[cold]
    fn not_opened(&self, position: usize, rv: CK_RV) -> Attempt {
        if is_member_fault("C_OpenSession", rv) && !self.members.closed() {
            crate::member::forget_cut_off();
            self.group.member_failed(position, "C_OpenSession", rv);
            Attempt::Faulted
        } else {
            Attempt::Answered(rv)
        }
    }

    /// After an answer that may mean the member lost its login: logs it in
    /// again with the cached credential and says what the caller does next.
    #[cold]
    fn check_login(
        &self,
        position: usize,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        rv: CK_RV,
    ) -> Relogin {
        if rv == CKR_USER_NOT_LOGGED_IN {
            return if self.log_in_again(library, handle) {
                Relogin::Retry
            } else {
                Relogin::NotNeeded
            };
        }
        if self.lost_login(library, handle) && self.log_in_again(library, handle) {
            // A token logged out behind our back (SoftHSM then drops its
            // private objects' handles): in again, and look the handles up
            // afresh before the caller tries again.
            self.group.forget_handles(position);
            self.group
                .log(Some(position), "member had lost its login; logged in again");
            return Relogin::LookUpAgain;
        }
        Relogin::NotNeeded
    }

    /// Whether the group is logged in but this member session is not.
    fn lost_login(&self, library: &dyn MemberBackend, session: CK_SESSION_HANDLE) -> bool {
        self.group.cached_login().is_some()
            && crate::member_api::session_is_public(library, session)
    }

    /// Logs a member that restarted in again with the cached credential.
    fn log_in_again(&self, library: &dyn MemberBackend, session: CK_SESSION_HANDLE) -> bool {
        let Some((user_type, pin)) = self.group.cached_login() else {
            return false;
        };
        let rv = crate::group::log_in_member(
            library,
            session,
            user_type,
            pin.as_deref().map(|p| p.as_slice()),
        );
        rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN
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
                let Some(print) = self.fingerprint_of(object) else {
                    return Ok(None);
                };
                let Ok(mut found) = self.group.look_up(position, &print) else {
                    return Ok(None);
                };
                if found.len() > 1 && !identity::has_check_value(&print) {
                    // A light fingerprint named more than one object: the
                    // check value may tell them apart.
                    if let Some(full) = self.full_fingerprint(object) {
                        found = self.group.look_up(position, &full).unwrap_or_default();
                    }
                }
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

    /// The object's fingerprint: kept, or read now from a member that is up
    /// and holds it (and then kept).
    pub fn fingerprint_of(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Option<std::sync::Arc<identity::Fingerprint>> {
        if let Some(print) = self.group.objects.get(object)?.fingerprint {
            return Some(print);
        }
        let print = self.read_fingerprint(object)?;
        self.group.objects.set_fingerprint(object, print);
        self.group.objects.get(object)?.fingerprint
    }

    /// The object's full fingerprint, read from the first serving member
    /// that knows the object.
    fn read_fingerprint(&self, object: CK_OBJECT_HANDLE) -> Option<identity::Fingerprint> {
        let entry = self.group.objects.get(object)?;
        let sources = entry.on.iter().enumerate().filter_map(|(m, p)| match p {
            Presence::Present(h) if self.group.members[m].is_up() => Some((m, *h)),
            _ => None,
        });
        for (source, handle) in sources {
            let read = self.on_member(source, |s| {
                identity::fingerprint(&*s.library, s.handle, handle)
            });
            if let Ok(Some(print)) = read {
                return Some(print);
            }
        }
        None
    }

    /// The object's full fingerprint (with its check value), read from a
    /// serving member that knows the object, and kept.
    fn full_fingerprint(&self, object: CK_OBJECT_HANDLE) -> Option<identity::Fingerprint> {
        let print = self.read_fingerprint(object)?;
        self.group
            .objects
            .replace_fingerprint(object, print.clone());
        Some(print)
    }

    /// Reads and keeps the fingerprint of an object first seen on member
    /// `position`, while that member is known to be alive.
    pub fn remember_fingerprint(
        &self,
        object: CK_OBJECT_HANDLE,
        position: usize,
        handle: CK_OBJECT_HANDLE,
    ) {
        if self.group.objects.has_fingerprint(object) {
            return;
        }
        let read = self.on_member(position, |s| {
            identity::fingerprint(&*s.library, s.handle, handle)
        });
        if let Ok(Some(print)) = read {
            self.group.objects.set_fingerprint(object, print);
        }
    }

    /// Chooses the member for a new operation or a stateless call: the
    /// member already bound to this session's operations, else a serving
    /// member on which every key in `keys` exists, in order of
    /// `preference`. Returns the member and the member handles of `keys`.
    ///
    /// The first choice is made without listing every candidate: it
    /// almost always holds the keys.
    #[inline(always)]
    pub fn choose(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
    ) -> Result<(usize, Handles)> {
        let (first, bound) = match self.bound_member() {
            Some(m) if self.group.members[m].is_up() => (Some(m), true),
            Some(m) => return self.choose_after_moving(m, keys, preference),
            None => (self.first_candidate(preference), false),
        };
        let Some(first) = first else {
            return Err(Error::new(CKR_DEVICE_ERROR));
        };
        if keys.is_empty() {
            return Ok((first, Handles::new()));
        }
        if let Some(handles) = self.known_on(keys, first) {
            return Ok((first, handles));
        }
        if !bound && preference == Preference::LeastBusy(STATELESS_LANE) {
            if let Some(known) = self.known_elsewhere(keys) {
                return Ok(known);
            }
        }
        if let Some(handles) = self.resolve_all(keys, first)? {
            return Ok((first, handles));
        }
        if bound {
            return Err(Error::new(CKR_KEY_HANDLE_INVALID));
        }
        self.choose_among(keys, self.candidates(preference))
    }

    /// The member handles of `keys` on `position` where every one is
    /// known there already (no lookup): the path of almost every call.
    #[inline(always)]
    fn known_on(&self, keys: &[CK_OBJECT_HANDLE], position: usize) -> Option<Handles> {
        keys.iter()
            .map(|k| match self.group.objects.presence(*k, position) {
                Some(Presence::Present(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// For a stateless call whose first choice would have to look an
    /// object up: a serving member where every object is known already.
    /// Any member answers such a call alike, and an application reading
    /// the objects it just found (a keystore load) then costs no lookup
    /// on the other members at all.
    #[cold]
    fn known_elsewhere(&self, keys: &[CK_OBJECT_HANDLE]) -> Option<(usize, Handles)> {
        self.group
            .serving_members()
            .into_iter()
            .find_map(|m| Some((m.position, self.known_on(keys, m.position)?)))
    }

    /// [`Self::choose`] for a session whose operations were bound to the
    /// failed member `from`: they move first.
    #[cold]
    fn choose_after_moving(
        &self,
        from: usize,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
    ) -> Result<(usize, Handles)> {
        self.move_operations(from);
        let candidates = match self.bound_member() {
            Some(moved) => smallvec![moved],
            None => self.candidates(preference),
        };
        self.choose_among(keys, candidates)
    }

    /// The first of `candidates` on which every key in `keys` exists.
    fn choose_among(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        candidates: Positions,
    ) -> Result<(usize, Handles)> {
        let Some(&first) = candidates.first() else {
            return Err(Error::new(CKR_DEVICE_ERROR));
        };
        if keys.is_empty() {
            return Ok((first, Handles::new()));
        }
        for position in candidates {
            if let Some(handles) = self.resolve_all(keys, position)? {
                return Ok((position, handles));
            }
        }
        Err(Error::new(CKR_KEY_HANDLE_INVALID))
    }

    /// The member handles of `keys` on member `position`; `None` if one
    /// of them is not there.
    #[inline(always)]
    fn resolve_all(&self, keys: &[CK_OBJECT_HANDLE], position: usize) -> Result<Option<Handles>> {
        let mut handles = Handles::new();
        for key in keys {
            match self.resolve(*key, position)? {
                Some(h) => handles.push(h),
                None => return Ok(None),
            }
        }
        Ok(Some(handles))
    }

    /// The member [`Self::candidates`] would list first.
    #[inline(always)]
    fn first_candidate(&self, preference: Preference) -> Option<usize> {
        match preference {
            Preference::LeastBusy(lane) => self.group.least_busy(lane),
            Preference::Primary => self.group.by_position().first().copied(),
        }
    }

    fn candidates(&self, preference: Preference) -> Positions {
        match preference {
            Preference::LeastBusy(lane) => self.group.by_preference(lane),
            Preference::Primary => self.group.by_position(),
        }
    }

    /// Starts an operation of `kind` with the application's `mechanism`
    /// and `key`, on the chosen member, failing over until one answers.
    /// `call` receives the member's key handle (0 without a key).
    #[inline(always)]
    pub fn init(
        &self,
        kind: OpKind,
        mechanism: Option<&Mechanism>,
        key: Option<CK_OBJECT_HANDLE>,
        function: &str,
        call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let on_spare = kind != OpKind::Find;
        let preference = if kind == OpKind::Find {
            Preference::Primary
        } else {
            Preference::LeastBusy(kind as usize)
        };
        self.init_where(kind, preference, mechanism, key, function, on_spare, call)
    }

    /// [`Self::init`] on the member `preference` picks; `on_spare` says
    /// whether the operation may run on a lane (`lanes.rs`): a search
    /// only where it cannot miss a session object
    /// ([`crate::virtual_objects`], `find_init`, which also picks its
    /// preference).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn init_where(
        &self,
        kind: OpKind,
        preference: Preference,
        mechanism: Option<&Mechanism>,
        key: Option<CK_OBJECT_HANDLE>,
        function: &str,
        on_spare: bool,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let keys = key.as_slice();
        let mut waits = Waits::default();
        loop {
            let (position, handles) = match self.choose(keys, preference) {
                Ok(chosen) => chosen,
                Err(_) if self.wait_for_a_member(&mut waits) => continue,
                Err(e) => return Err(e),
            };
            let on_lane = if on_spare && self.lane.possible(&self.group) {
                self.init_on_lane(kind, position, keys, &handles, function, &mut call)
            } else {
                None
            };
            let answer = on_lane.unwrap_or_else(|| {
                let member_key = handles.first().copied().unwrap_or(CK_INVALID_HANDLE);
                self.attempt(position, function, &mut |l, s| call(l, s, member_key))
            });
            let Attempt::Answered(rv) = answer else {
                continue;
            };
            if rv != CKR_OK {
                return Err(self.refused_init(kind, rv));
            }
            self.bindings().start(kind, mechanism, key, position);
            return Ok(());
        }
    }

    /// An `*Init` the member refused: it ended any operation of its kind,
    /// unless that one was still active.
    #[cold]
    #[inline(never)]
    fn refused_init(&self, kind: OpKind, rv: CK_RV) -> Error {
        if rv != CKR_OPERATION_ACTIVE {
            self.bindings().end(kind);
        }
        Error::new(rv)
    }

    /// The member an operation of `kind` runs on.
    #[inline(always)]
    fn bound_for(&self, kind: OpKind) -> Result<usize> {
        let summary = self.summary();
        if !summary.lost(kind) {
            return match (summary.active(kind), summary.member()) {
                (true, Some(m)) => Ok(m),
                (false, Some(m)) if summary.restored() => Ok(m),
                _ => Err(Error::new(CKR_OPERATION_NOT_INITIALIZED)),
            };
        }
        self.bound_for_lost(kind)
    }

    /// [`Self::bound_for`] when the summary says the operation was lost.
    #[cold]
    #[inline(never)]
    fn bound_for_lost(&self, kind: OpKind) -> Result<usize> {
        let mut b = self.bindings();
        if b.is_lost(kind) {
            b.end(kind);
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        match (b.active(kind).is_some(), b.member()) {
            (true, Some(m)) => Ok(m),
            (false, Some(m)) if b.restored() => Ok(m),
            _ => Err(Error::new(CKR_OPERATION_NOT_INITIALIZED)),
        }
    }

    /// Continues the active operation of `kind` on its member; when the
    /// member faults, moves the operation and tries again.
    #[inline(always)]
    pub fn step(
        &self,
        kind: OpKind,
        step: Step,
        input: Input<'_>,
        function: &str,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let mut waits = Waits::default();
        loop {
            let position = self.bound_for(kind)?;
            let on_lane = if self.lane.on() {
                self.step_on_lane(kind, position, function, &mut call)
            } else {
                None
            };
            let answer = on_lane.unwrap_or_else(|| self.attempt(position, function, &mut call));
            match answer {
                Attempt::Answered(rv) => {
                    self.record(kind, step, &input, rv);
                    if self.lane.on() {
                        self.after_lane_step(kind);
                    }
                    return check(rv);
                }
                Attempt::Faulted => {
                    // Its member failed under the operation: it moves to
                    // another, or, when none serves, to a returning one
                    // rather than being lost.
                    self.move_operations_waiting(position, &mut waits);
                }
            }
        }
    }

    /// Makes the active search movable: keeps its template, and from now on
    /// the objects it returns.
    pub fn keep_search(&self, template: crate::mechanism::OwnedTemplate, filter: SearchFilter) {
        if let Some(op) = self.bindings().active(OpKind::Find) {
            op.history.get_or_insert_with(Default::default).search = Some(Search {
                template,
                returned: Default::default(),
                filter,
            });
            op.movable = true;
        }
    }

    /// Whether the active search returns `object` for the first time (a
    /// search moved to another member meets objects it returned before).
    pub fn first_time_found(&self, object: CK_OBJECT_HANDLE) -> bool {
        match self.bindings().active(OpKind::Find) {
            Some(op) => op
                .history
                .as_mut()
                .and_then(|h| h.search.as_mut())
                .is_none_or(|s| s.returned.insert(object)),
            None => true,
        }
    }

    /// How many objects the active search has returned.
    pub fn returned_so_far(&self) -> usize {
        match self.bindings().active(OpKind::Find) {
            Some(op) => op
                .history
                .as_ref()
                .and_then(|h| h.search.as_ref())
                .map_or(0, |s| s.returned.len()),
            None => 0,
        }
    }

    /// A dual-function call (`C_DigestEncryptUpdate`, ...) fed the active
    /// operation of `kind` through the other half's call: its input is not
    /// kept, so if its member fails it is lost (`CKR_DEVICE_ERROR` next)
    /// rather than moved and finished with part of its data missing.
    pub fn stop_replaying(&self, kind: OpKind) {
        self.bindings().stop_replaying(kind);
    }

    /// What the active search checks itself (see [`Search`]).
    pub fn search_filter(&self) -> SearchFilter {
        match self.bindings().active(OpKind::Find) {
            Some(op) => op
                .history
                .as_ref()
                .and_then(|h| h.search.as_ref())
                .map(|s| s.filter.clone())
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// `C_DigestKey`: like an update, with the key looked up on whichever
    /// member the digest runs on.
    pub fn digest_key(&self, key: CK_OBJECT_HANDLE) -> Result<()> {
        self.settle_operations();
        loop {
            let position = self.bound_for(OpKind::Digest)?;
            let Some(member_key) = self.resolve(key, position)? else {
                return Err(Error::new(CKR_KEY_HANDLE_INVALID));
            };
            let mut call = |l: &dyn MemberBackend, s| l.digest_key(s, member_key);
            match self.attempt(position, "C_DigestKey", &mut call) {
                Attempt::Answered(rv) => {
                    self.record(OpKind::Digest, Step::Update, &Input::Key(key), rv);
                    return check(rv);
                }
                Attempt::Faulted => self.move_operations(position),
            }
        }
    }

    /// Keeps what a step fed in, or forgets the operation it ended.
    #[inline(always)]
    fn record(&self, kind: OpKind, step: Step, input: &Input<'_>, rv: CK_RV) {
        if step.ends_operation(rv) {
            let mut b = self.bindings();
            b.end(kind);
            b.set_restored(false);
            return;
        }
        if rv != CKR_OK || step != Step::Update {
            return;
        }
        let mut b = self.bindings();
        let limit = self.group.settings.replay_limit;
        let Some(op) = b.active(kind) else {
            return;
        };
        if kind == OpKind::Find {
            // A search restarts from its template; what it returned is kept
            // by `first_time_found`.
            return;
        }
        if !kind.replays_updates() || !op.movable {
            op.movable = false;
            return;
        }
        let item = match input {
            Input::None => return,
            Input::Data(data) => Replay::Data(data.to_vec()),
            Input::Key(key) => Replay::Key(*key),
        };
        let size = match &item {
            Replay::Data(d) => d.len(),
            Replay::Key(_) => 0,
        };
        let history = op.history.get_or_insert_with(Default::default);
        if history.replay_bytes + size > limit {
            op.movable = false;
            op.history = None;
        } else {
            history.replay_bytes += size;
            history.replay.push(item);
        }
    }

    /// Moves every operation bound to the failed member `from` to another
    /// member: starts each again with its saved mechanism and key and
    /// replays its buffered updates. What cannot be moved is marked lost.
    fn move_operations(&self, from: usize) {
        self.move_operations_waiting(from, &mut Waits::spent());
    }

    /// [`Self::move_operations`] for a call that may wait within `waits`:
    /// when each member tried failed under the move and none serves, it
    /// waits for a returning one and tries again rather than lose them.
    fn move_operations_waiting(&self, from: usize, waits: &mut Waits) {
        if self.lane.on() {
            self.drop_lane();
        }
        let mut ops = {
            let mut b = self.bindings();
            if b.member() != Some(from) {
                return;
            }
            let restored = b.restored();
            b.set_restored(false);
            let mut ops = b.take_all();
            if restored {
                for op in ops.iter_mut().flatten() {
                    op.movable = false;
                }
            }
            b.set_member(None);
            ops
        };
        let keys: Vec<CK_OBJECT_HANDLE> = ops
            .iter()
            .flatten()
            .filter(|op| op.movable)
            .flat_map(|op| {
                let replay = op.history.iter().flat_map(|h| &h.replay);
                op.key.into_iter().chain(replay.filter_map(replay_key))
            })
            .collect();
        let mut moved_to = None;
        'waiting: loop {
            'members: for position in self.group.by_preference(STATELESS_LANE) {
                let Ok(handles) = keys
                    .iter()
                    .map(|k| {
                        self.resolve(*k, position)?
                            .ok_or(Error::new(CKR_KEY_HANDLE_INVALID))
                    })
                    .collect::<Result<Vec<_>>>()
                else {
                    continue;
                };
                let member_key = |virtual_key: CK_OBJECT_HANDLE| {
                    keys.iter()
                        .position(|k| *k == virtual_key)
                        .map_or(CK_INVALID_HANDLE, |i| handles[i])
                };
                for kind in ALL_KINDS {
                    let Some(op) = ops[kind as usize].as_mut().filter(|op| op.movable) else {
                        continue;
                    };
                    match self.restart(position, kind, op, &member_key) {
                        Attempt::Faulted => continue 'members,
                        Attempt::Answered(CKR_OK) => {}
                        Attempt::Answered(_) => op.movable = false,
                    }
                }
                moved_to = Some(position);
                break 'waiting;
            }
            if !self.wait_for_a_member(waits) {
                break;
            }
        }
        let mut lost = 0;
        for (kind, op) in ops.iter().enumerate() {
            if op
                .as_ref()
                .is_some_and(|op| !op.movable || moved_to.is_none())
            {
                lost |= 1 << kind;
            }
        }
        let mut b = self.bindings();
        b.replace_all(ops, lost);
        b.set_member(moved_to.or(Some(from)));
    }

    /// Starts one operation again on `position` and replays its updates.
    fn restart(
        &self,
        position: usize,
        kind: OpKind,
        op: &mut ActiveOp,
        member_key: &dyn Fn(CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE,
    ) -> Attempt {
        let function = "operation failover";
        if let Some(search) = op.history.as_ref().and_then(|h| h.search.as_ref()) {
            // Known before the search starts there, as in find_init, so that
            // the search can leave it out.
            self.domain_handle(position);
            let template = search.template.attributes();
            return self.attempt(position, function, &mut |l, s| {
                l.find_objects_init(s, Some(&template))
            });
        }
        let key = op.key.map_or(CK_INVALID_HANDLE, member_key);
        let mechanism = op.mechanism.as_raw();
        let init = self.attempt(position, function, &mut |l, s| {
            member_init(kind, l, s, mechanism, key)
        });
        if !matches!(init, Attempt::Answered(CKR_OK)) {
            return init;
        }
        for item in op.history.iter().flat_map(|h| &h.replay) {
            let answer = self.attempt(position, function, &mut |l, s| match item {
                Replay::Data(data) => member_update(kind, l, s, data),
                Replay::Key(key) => l.digest_key(s, member_key(*key)),
            });
            if !matches!(answer, Attempt::Answered(CKR_OK)) {
                return answer;
            }
        }
        Attempt::Answered(CKR_OK)
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
        let mut waits = Waits::default();
        loop {
            let (position, handles) = match self.choose(keys, Preference::LeastBusy(STATELESS_LANE))
            {
                Ok(chosen) => chosen,
                Err(_) if self.wait_for_a_member(&mut waits) => continue,
                Err(e) => return Err(e),
            };
            let spare = keys.is_empty();
            let on_lane = if !spare && self.lane.possible(&self.group) {
                self.stateless_on_lane(position, keys, &handles, function, &mut call)
            } else {
                None
            };
            let answer = on_lane.unwrap_or_else(|| {
                self.attempt_maybe_on_spare(position, function, spare, &mut |l, s| {
                    call(l, s, &handles)
                })
            });
            if let Attempt::Answered(rv) = answer {
                return check(rv);
            }
        }
    }

    /// [`Self::attempt`] on an idle spare instance of the member's
    /// library ([`MemberBackend::on_spare`]), for a call that names no
    /// object; `None` when the library has none idle.
    #[cold]
    #[inline(never)]
    fn attempt_on_spare(
        &self,
        position: usize,
        library: &dyn MemberBackend,
        function: &str,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<Attempt> {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let slot = member.location()?.slot;
        let rv = library.on_spare(slot, &mut || Box::new(member.begin_call()), call)?;
        if rv == CKR_OK {
            return Some(Attempt::Answered(CKR_OK));
        }
        Some(self.judge(position, function, epoch, rv, false))
    }

    /// The member whose operation state `C_GetOperationState` should save.
    #[inline(always)]
    pub fn bound_member(&self) -> Option<usize> {
        let summary = self.summary();
        summary.member().filter(|_| summary.any_active())
    }

    /// Binds every later operation call to `position`, whose state the
    /// application restored.
    pub fn restore_binding(&self, position: usize) {
        if self.lane.on() {
            self.drop_lane();
        }
        let mut b = self.bindings();
        b.take_all();
        b.set_member(Some(position));
        b.set_restored(true);
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
}

fn replay_key(item: &Replay) -> Option<CK_OBJECT_HANDLE> {
    match item {
        Replay::Key(k) => Some(*k),
        Replay::Data(_) => None,
    }
}
