//! Every member call of a virtual session, and the one judgement of its
//! answer: [`VirtualSession::attempt`] acts on
//! [`crate::member::classify`]'s verdict -- a member fault takes the member
//! out and the caller chooses again; a request error is the application's
//! answer -- and logs a member that lost its login in again.

use super::VirtualSession;
use crate::group::is_member_fault;
use crate::member::{classify, Answer};
use crate::member_api::MemberBackend;
use crate::member_api::MemberSession;
use crate::object::Era;
use cryptoki_sys::*;

/// What [`VirtualSession::search_missed_for_login`]'s look at a member
/// session answers where the session shows that its token lost the
/// group's login unseen: the answer of a token that logged out to a
/// private object's handle -- SoftHSM forgets those handles at a logout --
/// so that [`VirtualSession::check_login`] logs the member in again and
/// has its handles looked up afresh.
const LOGIN_LOST_UNSEEN: CK_RV = CKR_OBJECT_HANDLE_INVALID;

/// What [`VirtualSession::attempt`] does after a login check.
enum Relogin {
    /// Logged in again: repeat the call.
    Retry,
    /// Logged in again, but the member's handles changed: choose again.
    LookUpAgain,
    /// The group is logged in and the member refused to be logged in
    /// again with this answer.
    Refused(CK_RV),
    NotNeeded,
}

/// What [`VirtualSession::judge`] makes of a member's answer besides the
/// answer itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterCall {
    /// The answer alone decides.
    Judge,
    /// The member's handles were looked up afresh (or it was taken out
    /// under the call): the caller chooses again.
    LookUpAgain,
    /// The answer is that of the member's login, refused while the group
    /// is logged in: the member cannot serve this process's calls.
    LoginRefused,
}

/// How a member answered a call.
pub(crate) enum Attempt {
    /// An answer for the application, success or request error.
    Answered(CK_RV),
    /// The member is at fault and has been taken out of service.
    Faulted,
}

/// What a member's answer to a call making an object was, in the order a
/// caller asking members at once takes such answers
/// (`VirtualSession::answers_of`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MakingAnswer {
    Made,
    Failed,
    Refused,
}

impl MakingAnswer {
    /// What `attempt` says.
    pub(crate) fn of(attempt: &Attempt) -> MakingAnswer {
        match attempt {
            Attempt::Answered(CKR_OK) => MakingAnswer::Made,
            Attempt::Faulted => MakingAnswer::Failed,
            Attempt::Answered(_) => MakingAnswer::Refused,
        }
    }
}

impl VirtualSession {
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
        self.attempt_maybe_on_spare(position, None, function, false, call)
    }

    /// [`Self::attempt`] of a call naming member handles looked up in
    /// `era` (taken before they were): `Faulted`, with no call made, once
    /// the member's handles were forgotten since -- the caller looks them
    /// up again. Otherwise a session opened after a reconnect could meet
    /// a handle of the connection before it, whose number names another
    /// object there.
    #[inline(always)]
    pub(crate) fn attempt_keyed<F>(
        &self,
        position: usize,
        era: Era,
        function: &str,
        call: &mut F,
    ) -> Attempt
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        self.attempt_maybe_on_spare(position, Some(era), function, false, call)
    }

    /// [`Self::attempt`], with member handles of `era` if any (see
    /// [`Self::attempt_keyed`]), on a spare instance of the member's
    /// library when `spare` (the call names no object and starts no
    /// operation) and one is idle.
    #[inline(always)]
    pub(super) fn attempt_maybe_on_spare<F>(
        &self,
        position: usize,
        era: Option<Era>,
        function: &str,
        spare: bool,
        call: &mut F,
    ) -> Attempt
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let MemberSession {
            library,
            handle,
            connection,
            networked,
            spares,
            ..
        } = match self.members.held(position, epoch) {
            Some(s) => s,
            None => match self.members.open_and_get(&self.group, position, epoch) {
                Ok(s) => s,
                Err(e) => return self.not_opened(position, e.rv),
            },
        };
        // After the session is taken: one opened on a new connection was
        // opened after the handles of the old one were forgotten.
        if era.is_some_and(|era| self.group.objects.moved_on(era)) {
            return Attempt::Faulted;
        }
        if spare && spares {
            let mut call = |l: &dyn MemberBackend, s| call(l, s);
            if let Some(answer) = self.attempt_on_spare(position, &*library, function, &mut call) {
                return answer;
            }
        }
        let guard = member.begin_call();
        // Only a networked library can have reconnected under the session.
        let (rv, after) = if networked {
            self.run_on_connection(position, era, function, &*library, handle, connection, call)
        } else {
            self.run(position, era, function, &*library, handle, call)
        };
        drop(guard);
        // Success first and inline: most calls succeed, and no other check
        // applies to them.
        if rv == CKR_OK && member.epoch() == epoch {
            return Attempt::Answered(CKR_OK);
        }
        self.judge(position, function, epoch, rv, after)
    }

    /// [`Self::judge`] of an answer that alone decides (no login was
    /// checked and no handle looked up again).
    pub(super) fn judge_answer(
        &self,
        position: usize,
        function: &str,
        epoch: u64,
        rv: CK_RV,
    ) -> Attempt {
        self.judge(position, function, epoch, rv, AfterCall::Judge)
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
        after: AfterCall,
    ) -> Attempt {
        // Taken out while the call was inside it (the watchdog's cut of a
        // member that hangs in process): its late answer is taken as lost,
        // as if it had never come -- what it made is removed, what it
        // missed replayed, when it returns.
        if after == AfterCall::LookUpAgain || rv == CKR_OK {
            return Attempt::Faulted;
        }
        if after == AfterCall::Judge && !is_member_fault(function, rv) {
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
            let function = match after {
                AfterCall::LoginRefused => "C_Login",
                _ => function,
            };
            self.group.member_failed(position, function, rv);
        }
        Attempt::Faulted
    }

    /// Makes one call for [`Self::attempt`]: asks a busy member again a
    /// few times, and logs the member in again and repeats the call when its
    /// answer says it lost its login; what [`Self::judge`] makes of the
    /// answer besides.
    #[inline(always)]
    fn run<F>(
        &self,
        position: usize,
        era: Option<Era>,
        function: &str,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        call: &mut F,
    ) -> (CK_RV, AfterCall)
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        let mut rv = call(library, handle);
        if rv == CKR_OK {
            return (rv, AfterCall::Judge);
        }
        let mut verdict = classify(function, rv);
        if verdict == Answer::Busy {
            rv = crate::group::retry_while_busy(function, rv, || call(library, handle));
            verdict = classify(function, rv);
        }
        if verdict != Answer::LoginLost {
            return (rv, AfterCall::Judge);
        }
        match self.check_login(position, era, library, handle, rv) {
            Relogin::Retry => (call(library, handle), AfterCall::Judge),
            Relogin::LookUpAgain => (rv, AfterCall::LookUpAgain),
            Relogin::Refused(login) => (login, AfterCall::LoginRefused),
            Relogin::NotNeeded => (rv, AfterCall::Judge),
        }
    }

    /// [`Self::run`] on a networked member's session from `connection`,
    /// out of the inlined path that in-process members take.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn run_on_connection<F>(
        &self,
        position: usize,
        era: Option<Era>,
        function: &str,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        connection: u64,
        call: &mut F,
    ) -> (CK_RV, AfterCall)
    where
        F: FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV + ?Sized,
    {
        crate::member::on_connection(connection, || {
            self.run(position, era, function, &*library, handle, call)
        })
    }

    /// As [`VirtualSession::attempt`], for a call that must reach this
    /// member: asked once more when the member only had to be logged in
    /// again (it is still in service then, in the same epoch). A member
    /// that failed, or failed and began to return, during the call is not
    /// asked again even if it is reachable by now: the request may have
    /// been carried out, and a second one would make its object twice
    /// (`tests/member_api.rs`: a member whose recovery began before the
    /// maker saw its answer lost). A call naming member handles gives the
    /// `era` they were looked up in ([`Self::attempt_keyed`]).
    pub(crate) fn attempt_on(
        &self,
        position: usize,
        era: Option<Era>,
        function: &str,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Attempt {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let answer = self.attempt_maybe_on_spare(position, era, function, false, call);
        if matches!(answer, Attempt::Faulted) && member.epoch() == epoch && member.reachable() {
            return self.attempt_maybe_on_spare(position, era, function, false, call);
        }
        answer
    }

    /// As [`VirtualSession::attempt_on`], for a call that makes `object` on
    /// the member. The object is recorded as being made before the request
    /// goes out, and stays in doubt there if the request was cut off on
    /// the wire, since the member may still carry it out -- as it may
    /// after any fault of a networked library ([`crate::group::Group::doubt_after`]) -- or if a
    /// recovery of the member began while the call was inside it (the
    /// epoch moved twice: failed, then returning): that recovery may have
    /// read the member's objects before the member carried the request
    /// out, and would make the object again from the queue rather than
    /// look it up.
    pub(crate) fn attempt_making(
        &self,
        position: usize,
        era: Option<Era>,
        function: &str,
        object: CK_OBJECT_HANDLE,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Attempt {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let handles = self.group.objects.era(position);
        self.group.begin_making(position, object);
        crate::member::forget_cut_off();
        let answer = self.attempt_on(position, era, function, call);
        let returning_meanwhile = member.epoch() >= epoch + 2;
        let cut_off = crate::member::last_call_cut_off();
        // Not a fault where the member serves on in the same epoch and its
        // handles were forgotten under the call: it answered, and the
        // caller looks them up again (it had lost its login, or its
        // handles went stale). Taken for one, the object stayed in doubt
        // on a member no recovery would read (simulation seeds 89, 2027).
        let looked_up_again = member.epoch() == epoch
            && member.is_up()
            && !cut_off
            && self.group.objects.moved_on(handles);
        let doubt = self.group.doubt_after(
            position,
            matches!(answer, Attempt::Faulted) && !looked_up_again,
            cut_off || returning_meanwhile,
        );
        self.group.end_making(position, object, doubt);
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

    /// At the end of a search on member `position` while the application
    /// is logged in, where the member holds an object of the group that the
    /// search may find and did not return: whether the member had lost its
    /// login unseen. A token that lost it answers a search without its
    /// private objects and no error, and only the session's state tells;
    /// asked only on such a miss, a complete search costs no member call
    /// more, only a walk of the record of the member's objects (a
    /// check before every search cost a round trip each: the network
    /// bench's mixed operation, logged in, 14.4 -> 17.5 ms at p50). Where
    /// it had, it is logged in again and its handles forgotten
    /// ([`Self::check_login`]), and the search starts again -- there or
    /// elsewhere -- showing what it has not shown yet: true.
    pub(crate) fn search_missed_for_login(&self, era: Option<Era>) -> bool {
        let Some(era) = era else {
            return false;
        };
        let position = era.member();
        if !self.group.holds_login() || self.group.objects.moved_on(era) {
            return false;
        }
        let Some((searched, returned)) = self.search_print_and_returned() else {
            return false;
        };
        let held_before = self.group.held_before_as_recorded(position);
        if !(self.group.objects).holds_unreturned(position, &held_before, &searched, &returned) {
            return false;
        }
        // Logged in again since the search started (another call met the
        // lost login): the member answered it as a public session, and its
        // state no longer says so. Its state is asked all the same: it may
        // have lost the login once more, and the search must not start
        // again as a public session's (simulation seed 22419).
        let outlived_a_login = self.search_outlived_a_login();
        // The spare a search ran on logs in apart from the member's own
        // instance; either may have lost it.
        let lane_lost = self.lane_lost_login(position);
        let answer = self.attempt(position, "C_GetSessionInfo", &mut |library, session| {
            if crate::member_api::session_is_public(library, session) {
                LOGIN_LOST_UNSEEN
            } else {
                CKR_OK
            }
        });
        if !outlived_a_login && !lane_lost && matches!(answer, Attempt::Answered(_)) {
            return false;
        }
        self.restart_search_from(position);
        true
    }

    /// After an answer that may mean the member lost its login: logs it in
    /// again with the cached credential and says what the caller does next.
    /// A handle of `era` answered invalid with the login standing may have
    /// gone stale ([`crate::group::Group::handles_went_stale`]).
    #[cold]
    fn check_login(
        &self,
        position: usize,
        era: Option<Era>,
        library: &dyn MemberBackend,
        handle: CK_SESSION_HANDLE,
        rv: CK_RV,
    ) -> Relogin {
        if rv == CKR_USER_NOT_LOGGED_IN {
            return match self.log_in_again(library, handle) {
                None => Relogin::NotNeeded,
                Some(CKR_OK) => Relogin::Retry,
                Some(refused) => Relogin::Refused(refused),
            };
        }
        if self.lost_login(library, handle) {
            match self.log_in_again(library, handle) {
                None => return Relogin::NotNeeded,
                Some(CKR_OK) => {}
                Some(refused) => return Relogin::Refused(refused),
            }
            // A token logged out behind our back (SoftHSM then drops its
            // private objects' handles): in again, and look the handles up
            // afresh before the caller tries again.
            self.group.forget_handles(position);
            self.group
                .log(Some(position), "member had lost its login; logged in again");
            return Relogin::LookUpAgain;
        }
        match era {
            Some(era) if self.group.handles_went_stale(position, era) => Relogin::LookUpAgain,
            _ => Relogin::NotNeeded,
        }
    }

    /// Whether the group is logged in but this member session is not.
    fn lost_login(&self, library: &dyn MemberBackend, session: CK_SESSION_HANDLE) -> bool {
        self.group.holds_login() && crate::member_api::session_is_public(library, session)
    }

    /// Logs a member that restarted in again with the cached credential:
    /// `CKR_OK` once it is logged in, its refusal otherwise; `None` when
    /// the group is not logged in.
    fn log_in_again(
        &self,
        library: &dyn MemberBackend,
        session: CK_SESSION_HANDLE,
    ) -> Option<CK_RV> {
        let (user_type, pin) = self.group.cached_login()?;
        let rv = crate::group::log_in_member(
            library,
            session,
            user_type,
            pin.as_deref().map(|p| p.as_slice()),
        );
        if rv == CKR_OK {
            self.group.note_login_again();
        }
        Some(match rv {
            CKR_USER_ALREADY_LOGGED_IN => CKR_OK,
            rv => rv,
        })
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
        Some(self.judge_answer(position, function, epoch, rv))
    }
}
