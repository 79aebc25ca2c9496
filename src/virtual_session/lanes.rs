//! A virtual session's operations on a *lane*: a spare instance of a
//! member's library (p11-kit's client, `[LibraryInstances]`) taken from an
//! operation's `*Init` to its end -- searches included -- or for one
//! attribute read, so that a network member serves as many of them at
//! once as it has instances. Owns which lane a session holds, finding
//! token keys on it and identifying what its searches find (by
//! fingerprint, as on another member), and its login. Only the member's
//! own session (the first instance) holds session objects, object-making
//! and the object map; what needs them runs there.

use super::{Attempt, VirtualSession};
use crate::bindings::OpKind;
use crate::group::{is_member_fault, Group};
use crate::identity;
use crate::member::{classify, on_connection, Answer};
use crate::member_api::{MemberBackend, SpareLane};
use crate::object::Presence;
use cryptoki_sys::*;
use parking_lot::Mutex;

/// A call given the member, its session and the handles of its keys there.
pub(super) type KeyedCall<'a> =
    dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, &[CK_OBJECT_HANDLE]) -> CK_RV + 'a;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The lane a virtual session holds, if any.
#[derive(Default)]
pub(super) struct LaneCell {
    held: Mutex<Option<HeldLane>>,
    /// Whether a lane is held: read without the lock on every step.
    on: AtomicBool,
    /// Whether a member of the group has spare instances, found at the
    /// session's first operation rather than at its opening, which must
    /// stay cheap.
    possible: OnceLock<bool>,
}

/// A lane with the session's operations on it: every active operation of
/// the session runs there (an operation stays on the session it started
/// on, and a dual-function call needs both on one session).
struct HeldLane {
    position: usize,
    /// The member's epoch when the lane was taken: a lane from an earlier
    /// epoch lost its operations with the member's failure.
    epoch: u64,
    lane: Box<dyn SpareLane>,
    /// The kinds of operation active on it, one bit each.
    kinds: u16,
}

fn bit(kind: OpKind) -> u16 {
    1 << kind as u16
}

impl LaneCell {
    /// Whether any member of `group` has spare instances to take lanes on.
    #[inline(always)]
    pub(super) fn possible(&self, group: &Group) -> bool {
        *self.possible.get_or_init(|| {
            group
                .members
                .iter()
                .any(|m| m.location().is_some_and(|l| l.library.has_spares()))
        })
    }

    #[inline(always)]
    pub(super) fn on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
}

/// The answers a lane's key may have gone stale by (or the spare's login
/// with it): the call is made again on the member's own session.
fn key_refused(rv: CK_RV) -> bool {
    classify("C_SignInit", rv) == Answer::LoginLost
}

impl VirtualSession {
    /// Starts an operation of `kind` on a lane of member `position`: the
    /// lane the session's operations are on, or a new one when none is
    /// active. `keys` are the virtual keys, `first_handles` their handles
    /// on the member's own session. `None`: the operation runs on the
    /// member's own session (no spare is idle, a key is a session object
    /// or cannot be found on the spare, the member has no spares).
    #[cold]
    #[inline(never)]
    pub(super) fn init_on_lane(
        &self,
        kind: OpKind,
        position: usize,
        keys: &[CK_OBJECT_HANDLE],
        first_handles: &[CK_OBJECT_HANDLE],
        function: &str,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Option<Attempt> {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let mut held = self.lane.held.lock();
        let mut current = match held.take() {
            Some(h) if h.position == position && h.epoch == epoch => h,
            Some(h) => {
                // Not where the session's operations are bound: leave them.
                *held = Some(h);
                return None;
            }
            None if self.bound_member().is_some() => return None,
            None if !keys.iter().all(|k| self.token_print(*k).is_some()) => return None,
            None => {
                let location = member.location()?;
                match location
                    .library
                    .take_lane(location.slot, &mut || Box::new(member.begin_setup_call()))?
                {
                    Ok(lane) => HeldLane {
                        position,
                        epoch,
                        lane,
                        kinds: 0,
                    },
                    Err(rv) if is_member_fault("C_OpenSession", rv) => {
                        drop(held);
                        return Some(self.judge_answer(position, "C_OpenSession", epoch, rv));
                    }
                    Err(_) => return None,
                }
            }
        };
        // A search sees private objects only where the spare is logged in.
        if kind == OpKind::Find && !self.log_lane_in(position, &*current.lane) {
            return self.leave_lane(held, current);
        }
        let member_key = match self.lane_keys(position, &*current.lane, keys, first_handles) {
            Ok(Some(handles)) => handles.first().copied().unwrap_or(CK_INVALID_HANDLE),
            Ok(None) => return self.leave_lane(held, current),
            Err(rv) if is_member_fault("C_FindObjectsInit", rv) => {
                drop((held, current));
                return Some(self.judge_answer(position, "C_FindObjectsInit", epoch, rv));
            }
            Err(_) => return self.leave_lane(held, current),
        };
        let answer =
            self.attempt_on_lane(position, epoch, function, &*current.lane, &mut |l, s| {
                call(l, s, member_key)
            });
        match answer {
            Attempt::Answered(CKR_OK) => current.kinds |= bit(kind),
            Attempt::Answered(rv) if key_refused(rv) => return self.refused_on_lane(held, current),
            // A refused start ends an operation of its kind, as the
            // session's bindings record (`refused_init`).
            Attempt::Answered(CKR_OPERATION_ACTIVE) => {}
            Attempt::Answered(_) => current.kinds &= !bit(kind),
            Attempt::Faulted => {
                self.hold(&mut held, None);
                return Some(Attempt::Faulted);
            }
        }
        self.hold(&mut held, current);
        Some(answer)
    }

    /// A lane whose spare refused a key it was given (its handle went
    /// stale, or the spare its login): the lane's session is closed, and
    /// with it what the spare session knew, and the operation runs on the
    /// member's own session.
    fn refused_on_lane(
        &self,
        held: parking_lot::MutexGuard<'_, Option<HeldLane>>,
        current: HeldLane,
    ) -> Option<Attempt> {
        if current.kinds != 0 {
            return self.leave_lane(held, current);
        }
        drop(held);
        let _in_flight = self.group.members[current.position].begin_setup_call();
        current.lane.close();
        None
    }

    /// Gives `current` up for an operation that must run on the member's
    /// own session: with no operation on the lane it goes back idle (and
    /// the operation goes to the member's session); with some, they move
    /// to a member's own session first and the caller chooses again.
    fn leave_lane(
        &self,
        mut held: parking_lot::MutexGuard<'_, Option<HeldLane>>,
        current: HeldLane,
    ) -> Option<Attempt> {
        if current.kinds == 0 {
            self.hold(&mut held, current);
            return None;
        }
        let position = current.position;
        self.hold(&mut held, current);
        drop(held);
        self.settle_operations_from(position);
        Some(Attempt::Faulted)
    }

    /// Holds `lane` (or none), keeping [`LaneCell::on`] in step; a lane
    /// with no operation active goes back idle with its session.
    fn hold(
        &self,
        held: &mut parking_lot::MutexGuard<'_, Option<HeldLane>>,
        lane: impl Into<Option<HeldLane>>,
    ) {
        **held = match lane.into() {
            Some(h) if h.kinds == 0 => {
                h.lane.finish();
                None
            }
            lane => lane,
        };
        self.lane.on.store(held.is_some(), Ordering::Release);
    }

    /// The handles on `lane` of token keys `keys`, logging the spare in
    /// first while the group is logged in; `None` when one is a session
    /// object, or not found there exactly once, or the spare cannot be
    /// logged in; `Err` with a member's answer to the search.
    fn lane_keys(
        &self,
        position: usize,
        lane: &dyn SpareLane,
        keys: &[CK_OBJECT_HANDLE],
        first_handles: &[CK_OBJECT_HANDLE],
    ) -> std::result::Result<Option<super::Handles>, CK_RV> {
        if keys.is_empty() {
            return Ok(Some(super::Handles::new()));
        }
        if !self.log_lane_in(position, lane) {
            return Ok(None);
        }
        let mut handles = super::Handles::new();
        for (&key, &first) in keys.iter().zip(first_handles) {
            let here = match lane.known_key(key, first) {
                Some(here) => here,
                None => match self.find_on_lane(position, lane, key)? {
                    Some(here) => {
                        lane.remember_key(key, first, here);
                        here
                    }
                    None => return Ok(None),
                },
            };
            handles.push(here);
        }
        Ok(Some(handles))
    }

    /// Runs a call outside operations that names token objects `keys`
    /// (an attribute read, a wrap; `first_handles` their handles on the
    /// member's own session) on an idle spare of member `position`, taken
    /// as a lane for this call only and handed back with what it learned.
    /// `None`: the call runs on the member's own session (the session's
    /// operations hold a lane, a key is a session object or not found on
    /// the spare, none is idle).
    #[cold]
    #[inline(never)]
    pub(super) fn stateless_on_lane(
        &self,
        position: usize,
        keys: &[CK_OBJECT_HANDLE],
        first_handles: &[CK_OBJECT_HANDLE],
        function: &str,
        call: &mut KeyedCall<'_>,
    ) -> Option<Attempt> {
        if self.lane.on() || !keys.iter().all(|k| self.token_print(*k).is_some()) {
            return None;
        }
        let member = &self.group.members[position];
        let epoch = member.epoch();
        let location = member.location()?;
        let lane = match location
            .library
            .take_lane(location.slot, &mut || Box::new(member.begin_setup_call()))?
        {
            Ok(lane) => lane,
            Err(rv) if is_member_fault("C_OpenSession", rv) => {
                return Some(self.judge_answer(position, "C_OpenSession", epoch, rv));
            }
            Err(_) => return None,
        };
        let handles = match self.lane_keys(position, &*lane, keys, first_handles) {
            Ok(Some(handles)) => handles,
            Err(rv) if is_member_fault("C_FindObjectsInit", rv) => {
                drop(lane);
                return Some(self.judge_answer(position, "C_FindObjectsInit", epoch, rv));
            }
            Ok(None) | Err(_) => {
                lane.finish();
                return None;
            }
        };
        let answer = self.attempt_on_lane(position, epoch, function, &*lane, &mut |l, s| {
            call(l, s, &handles)
        });
        match answer {
            Attempt::Answered(rv) if key_refused(rv) => {
                let _in_flight = member.begin_setup_call();
                lane.close();
                None
            }
            Attempt::Answered(_) => {
                lane.finish();
                Some(answer)
            }
            Attempt::Faulted => Some(answer),
        }
    }

    /// Turns what the search on the session's lane just fetched (the
    /// spare's handles, in place) into the virtual handles to show, for
    /// member `position`: each identified by its fingerprint on the spare
    /// and looked up on the member's own session the first time the spare
    /// session meets it, the domain key left out; `show` says whether to
    /// show an object. `None` when the search is not on a lane. Returns
    /// how many were kept, and whether the search had to move to a
    /// member's own session (started again there; the handles not yet
    /// shown are found there again): an object that cannot be identified,
    /// or an enumeration (`enumerating`), which must not cost a read per
    /// object there.
    pub(crate) fn keep_found_on_lane(
        &self,
        position: usize,
        handles: &mut [CK_OBJECT_HANDLE],
        enumerating: bool,
        show: &mut dyn FnMut(CK_OBJECT_HANDLE) -> crate::error::Result<bool>,
    ) -> crate::error::Result<Option<(usize, bool)>> {
        if !self.lane.on() {
            return Ok(None);
        }
        let held = self.lane.held.lock();
        let Some(current) = held
            .as_ref()
            .filter(|h| h.position == position && h.kinds & bit(OpKind::Find) != 0)
        else {
            return Ok(None);
        };
        let mut shown = 0;
        let mut unidentified = false;
        for i in 0..handles.len() {
            let here = handles[i];
            let object = match current.lane.known_found(here) {
                Some(Some((object, first)))
                    if self.group.objects.presence(object, position)
                        == Some(Presence::Present(first)) =>
                {
                    Some(object)
                }
                Some(None) => None,
                _ if enumerating => {
                    unidentified = true;
                    break;
                }
                _ => match self.identify_on_lane(position, &*current.lane, here) {
                    Some(object) => object,
                    None => {
                        unidentified = true;
                        break;
                    }
                },
            };
            let Some(object) = object else {
                continue;
            };
            if show(object)? {
                handles[shown] = object;
                shown += 1;
            }
        }
        drop(held);
        if unidentified {
            self.settle_operations_from(position);
        }
        Ok(Some((shown, unidentified)))
    }

    /// Identifies the object a search on `lane` found as `here`: its
    /// virtual handle (made now if the member's own session had not met
    /// it), `Some(None)` for the domain key; `None` when it cannot be told
    /// (no fingerprint, or not exactly one match on the member's own
    /// session).
    fn identify_on_lane(
        &self,
        position: usize,
        lane: &dyn SpareLane,
        here: CK_OBJECT_HANDLE,
    ) -> Option<Option<CK_OBJECT_HANDLE>> {
        let read = |full: bool| {
            let _in_flight = self.group.members[position].begin_setup_call();
            on_connection(lane.connection(), || {
                if full {
                    identity::fingerprint(lane.library(), lane.session(), here)
                } else {
                    identity::light_fingerprint(lane.library(), lane.session(), here)
                }
            })
        };
        let mut print = read(false)?;
        if self.group.is_domain_print(&print) {
            lane.remember_found(here, None);
            return Some(None);
        }
        let era = self.group.objects.era(position);
        let mut found = self.group.look_up(position, &print).ok()?;
        if found.len() > 1 {
            print = read(true)?;
            found = self.group.look_up(position, &print).ok()?;
        }
        let [first] = found[..] else {
            return None;
        };
        let objects = &self.group.objects;
        if objects.known(position, first).is_none() {
            if self.group.off_search_home(position) {
                // Named as the primary names it, on the member's own session.
                return None;
            }
            // Left out as on the member's own session: a copy of a
            // destroyed object waiting for its removal there showed through
            // a search on a spare (simulation seed 31624135).
            if !self.names_an_object(era, &print).ok()? {
                return Some(None);
            }
            if self.renumbered_unseen(era, &print) {
                return None;
            }
        }
        // None: the member's handles were forgotten under the lookup.
        let object = objects.from_member_identified(era, first, print)?;
        lane.remember_found(here, Some((object, first)));
        lane.remember_key(object, first, here);
        Some(Some(object))
    }

    /// Finds token object `object` on the lane's spare by its fingerprint.
    /// A session object exists only on the member session that made it.
    fn find_on_lane(
        &self,
        position: usize,
        lane: &dyn SpareLane,
        object: CK_OBJECT_HANDLE,
    ) -> std::result::Result<Option<CK_OBJECT_HANDLE>, CK_RV> {
        let Some(mut print) = self.token_print(object) else {
            return Ok(None);
        };
        let find = |print: &identity::Fingerprint| {
            let _in_flight = self.group.members[position].begin_setup_call();
            on_connection(lane.connection(), || {
                identity::find(lane.library(), lane.session(), print)
            })
        };
        let mut found = find(print.as_ref())?;
        if found.len() > 1 && !identity::has_check_value(&print) {
            if let Some(full) = self.full_fingerprint(object) {
                print = std::sync::Arc::new(full);
                found = find(print.as_ref())?;
            }
        }
        Ok(match found[..] {
            [one] => Some(one),
            _ => None,
        })
    }

    /// The fingerprint of `object` if it is a token object, which every
    /// instance sees; `None` for a session object, which exists only on
    /// the member session that made it (the member's own).
    fn token_print(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Option<std::sync::Arc<identity::Fingerprint>> {
        if self.group.objects.get(object)?.owner.is_some() {
            return None;
        }
        let print = self.fingerprint_of(object)?;
        print
            .iter()
            .any(|(t, v)| *t == CKA_TOKEN && v.first() == Some(&CK_TRUE))
            .then_some(print)
    }

    /// Logs the lane's spare in with the group's cached user login if the
    /// group is logged in and the spare is not yet; true when it may serve
    /// keys (logged in as needed). A login other than the user's (the SO)
    /// is not carried to spares: their sessions are read-only.
    pub(crate) fn log_lane_in(&self, position: usize, lane: &dyn SpareLane) -> bool {
        match self.group.logged_in_as() {
            None => return true,
            Some(user_type) if user_type != CKU_USER => return false,
            Some(_) => {}
        }
        if lane.logged_in() {
            return true;
        }
        let _in_flight = self.group.members[position].begin_setup_call();
        lane.log_in(&mut |library, session| {
            let (user_type, pin) = self.group.cached_login()?;
            Some(crate::group::log_in_member(
                library,
                session,
                user_type,
                pin.as_deref().map(|p| p.as_slice()),
            ))
        })
    }

    /// Whether the session's lane on member `position` shows that its spare
    /// lost the group's login unseen: its login is then forgotten, so that
    /// its next use logs it in again. False without such a lane.
    pub(super) fn lane_lost_login(&self, position: usize) -> bool {
        let held = self.lane.held.lock();
        let Some(current) = held.as_ref().filter(|h| h.position == position) else {
            return false;
        };
        let lane = &*current.lane;
        let _in_flight = self.group.members[position].begin_setup_call();
        let public = on_connection(lane.connection(), || {
            crate::member_api::session_is_public(lane.library(), lane.session())
        });
        if public {
            lane.forget_login();
        }
        public
    }

    /// Runs `call` on the lane's session, as [`VirtualSession::attempt`]
    /// does on the member's own: counted on the member, asked again while
    /// busy, the spare logged in again if it lost its login, and a member
    /// fault taking the whole member out (the spare's server is the
    /// member's).
    pub(crate) fn attempt_on_lane(
        &self,
        position: usize,
        epoch: u64,
        function: &str,
        lane: &dyn SpareLane,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Attempt {
        let member = &self.group.members[position];
        if member.epoch() != epoch {
            return Attempt::Faulted;
        }
        let library = lane.library();
        let mut run = || on_connection(lane.connection(), || call(library, lane.session()));
        let guard = member.begin_call();
        let mut rv = run();
        if rv != CKR_OK && classify(function, rv) == Answer::Busy {
            rv = crate::group::retry_while_busy(function, rv, &mut run);
        }
        if rv == CKR_USER_NOT_LOGGED_IN && self.group.holds_login() {
            lane.forget_login();
            drop(guard);
            if self.log_lane_in(position, lane) {
                let _guard = member.begin_call();
                rv = run();
            }
        } else {
            drop(guard);
        }
        if rv == CKR_OK {
            return Attempt::Answered(CKR_OK);
        }
        self.judge_answer(position, function, epoch, rv)
    }

    /// Continues the operation of `kind` on the lane when it runs there;
    /// `None` when it runs on the member's own session. A fault drops the
    /// lane (the caller moves the operations).
    #[cold]
    #[inline(never)]
    pub(super) fn step_on_lane(
        &self,
        kind: OpKind,
        position: usize,
        function: &str,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<Attempt> {
        let mut held = self.lane.held.lock();
        let current = held
            .as_ref()
            .filter(|h| h.position == position && h.kinds & bit(kind) != 0)?;
        let answer = self.attempt_on_lane(position, current.epoch, function, &*current.lane, call);
        if matches!(answer, Attempt::Faulted) {
            self.hold(&mut held, None);
        }
        Some(answer)
    }

    /// After a step of `kind` was recorded: a lane with no operation left
    /// active goes back idle, its session kept.
    #[cold]
    #[inline(never)]
    pub(super) fn after_lane_step(&self, kind: OpKind) {
        if self.summary().active(kind) {
            return;
        }
        let mut held = self.lane.held.lock();
        let Some(mut current) = held.take() else {
            return;
        };
        current.kinds &= !bit(kind);
        self.hold(&mut held, current);
    }

    /// Gives the lane up, its operations left behind: its session is
    /// closed while the member is in service (ending them there), else
    /// forgotten with the member's connection.
    pub(super) fn drop_lane(&self) {
        let mut held = self.lane.held.lock();
        let Some(current) = held.take() else {
            return;
        };
        self.hold(&mut held, None);
        drop(held);
        let member = &self.group.members[current.position];
        if member.is_up() && member.epoch() == current.epoch {
            let _in_flight = member.begin_setup_call();
            current.lane.close();
        }
    }

    /// The member whose lane the session's operations are on, if any.
    fn lane_position(&self) -> Option<usize> {
        if !self.lane.on() {
            return None;
        }
        self.lane.held.lock().as_ref().map(|h| h.position)
    }

    /// Brings the session's operations from a lane to a member's own
    /// session (started again and their input replayed, as after a member
    /// fault), for a call that must reach them there: the operation state,
    /// a context-specific login, `C_DigestKey` with a key the lane lacks.
    pub fn settle_operations(&self) {
        if let Some(position) = self.lane_position() {
            self.settle_operations_from(position);
        }
    }

    fn settle_operations_from(&self, position: usize) {
        self.move_operations(position);
    }
}
