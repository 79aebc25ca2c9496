//! Operation binding: starting an operation on a member, continuing it
//! there, and keeping what it takes to move it (its saved mechanism and
//! key, its input, a search's state) in the session's bindings.

use super::{Attempt, Preference, VirtualSession};
use crate::bindings::{Input, OpKind, Replay, Search, SearchFilter};
use crate::error::{check, Error, Result};
use crate::group::Waits;
use crate::mechanism::Mechanism;
use crate::member_api::MemberBackend;
use cryptoki_sys::*;

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
    pub(super) fn ends_operation(self, rv: CK_RV) -> bool {
        match self {
            Step::Update => rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL,
            Step::Finish { length_query } => {
                rv != CKR_BUFFER_TOO_SMALL && !(rv == CKR_OK && length_query)
            }
        }
    }
}

impl VirtualSession {
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
            Preference::Complete
        } else {
            Preference::LeastBusy(kind as usize)
        };
        self.init_where(
            kind,
            || preference,
            mechanism,
            key,
            function,
            on_spare,
            call,
        )
    }

    /// [`Self::init`] on the member `preference` picks, asked again at each
    /// try: a member failing under the first changes what the others
    /// lack. `on_spare` says whether the operation may run on a lane
    /// (`lanes.rs`): a search only where it cannot miss a session object
    /// ([`crate::virtual_objects`], `find_init`, which also picks its
    /// preference).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn init_where(
        &self,
        kind: OpKind,
        mut preference: impl FnMut() -> Preference,
        mechanism: Option<&Mechanism>,
        key: Option<CK_OBJECT_HANDLE>,
        function: &str,
        on_spare: bool,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let keys = key.as_slice();
        let mut waits = Waits::default();
        loop {
            let preference = preference();
            let (position, handles, era) = match self.choose(keys, preference) {
                Ok(chosen) => chosen,
                Err(e) if self.wait_to_choose_again(&e, keys, &mut waits) => continue,
                Err(e) => return Err(e),
            };
            let on_lane = if on_spare && self.lane.possible(&self.group) {
                self.init_on_lane(kind, position, keys, &handles, function, &mut call)
            } else {
                None
            };
            let answer = on_lane.unwrap_or_else(|| {
                let member_key = handles.first().copied().unwrap_or(CK_INVALID_HANDLE);
                self.attempt_keyed(position, era, function, &mut |l, s| call(l, s, member_key))
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
                    self.move_operations_waiting(position, &mut waits, false);
                }
            }
        }
    }

    /// Makes the active search movable: keeps its template, and from now on
    /// the objects it returns; `logins_again` as read before it started.
    pub fn keep_search(
        &self,
        template: crate::mechanism::OwnedTemplate,
        filter: SearchFilter,
        logins_again: u64,
    ) {
        if let Some(op) = self.bindings().active(OpKind::Find) {
            op.history.get_or_insert_with(Default::default).search = Some(Search {
                template,
                returned: Default::default(),
                filter,
                logins_again,
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

    /// The active search's template as a fingerprint (what an object it
    /// finds agrees with, [`crate::identity::agree`]: the attributes a
    /// fingerprint may hold, no value that could be key material), and the
    /// objects it has returned; `None` without a search that can move.
    pub fn search_print_and_returned(
        &self,
    ) -> Option<(
        crate::identity::Fingerprint,
        rustc_hash::FxHashSet<CK_OBJECT_HANDLE>,
    )> {
        let mut bindings = self.bindings();
        let search = bindings
            .active(OpKind::Find)?
            .history
            .as_ref()?
            .search
            .as_ref()?;
        let print = search
            .template
            .template()
            .iter()
            .filter(|a| crate::identity::in_fingerprint(a.kind()))
            .filter_map(|a| Some((a.kind(), a.value()?.to_vec())))
            .collect();
        Some((print, search.returned.clone()))
    }

    /// Whether a member was logged in again after it lost its login since
    /// the active search last started ([`crate::group::Group::note_login_again`]);
    /// notes the count, so that one such login starts it again once.
    pub fn search_outlived_a_login(&self) -> bool {
        let now = self.group.logins_again();
        let mut bindings = self.bindings();
        let search = bindings
            .active(OpKind::Find)
            .and_then(|op| op.history.as_mut())
            .and_then(|h| h.search.as_mut());
        search.is_some_and(|s| std::mem::replace(&mut s.logins_again, now) != now)
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
            let era = self.group.objects.era(position);
            let Some(member_key) = self.resolve(key, position)? else {
                return Err(Error::new(CKR_KEY_HANDLE_INVALID));
            };
            let mut call = |l: &dyn MemberBackend, s| l.digest_key(s, member_key);
            match self.attempt_keyed(position, era, "C_DigestKey", &mut call) {
                Attempt::Answered(rv) => {
                    self.record(OpKind::Digest, Step::Update, &Input::Key(key), rv);
                    return check(rv);
                }
                // Its handles were forgotten under the lookup: again.
                Attempt::Faulted if self.group.objects.moved_on(era) => {}
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

    /// The member whose operation state `C_GetOperationState` should save.
    #[inline(always)]
    pub fn bound_member(&self) -> Option<usize> {
        let summary = self.summary();
        summary.member().filter(|_| summary.any_active())
    }

    /// `C_SetOperationState` of `state`, saved by member `position`, with
    /// the application's keys (`CK_INVALID_HANDLE`: none): a keyed call
    /// like the others ([`Self::attempt_keyed`]), its keys' member handles
    /// looked up in the era taken before, and looked up again when the
    /// member's handles were forgotten before its session was taken --
    /// otherwise a handle of the connection before a reconnect, or of the
    /// numbering before a login, named another key there, or none. Later
    /// operation calls go to that member.
    pub fn set_operation_state(
        &self,
        position: usize,
        state: &[u8],
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let member_key = |key: CK_OBJECT_HANDLE| -> Result<CK_OBJECT_HANDLE> {
            if key == CK_INVALID_HANDLE {
                return Ok(CK_INVALID_HANDLE);
            }
            self.resolve(key, position)?
                .ok_or(Error::new(CKR_KEY_HANDLE_INVALID))
        };
        loop {
            let era = self.group.objects.era(position);
            let encryption = member_key(encryption_key)?;
            let authentication = member_key(authentication_key)?;
            let answer = self.attempt_keyed(position, era, "C_SetOperationState", &mut |l, s| {
                l.set_operation_state(s, Some(state), encryption, authentication)
            });
            match answer {
                Attempt::Answered(rv) => check(rv)?,
                // The saved state is this member's alone.
                Attempt::Faulted if !self.group.members[position].is_up() => {
                    return Err(Error::new(CKR_DEVICE_ERROR))
                }
                Attempt::Faulted => continue,
            }
            self.forget_pending_digest();
            self.restore_binding(position);
            return Ok(());
        }
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
}
