//! Spare instances of an in-memory member, as p11-kit's client gives
//! them (`[LibraryInstances]`): each a session of its own per slot on the
//! member's tokens, taken whole as a lane ([`SpareLane`]) or for one call,
//! and what the core keeps on each (its login, the handles found there),
//! forgotten with its session or the member's connection. Each spare is an
//! application of its own to the token, as each `p11-kit server` worker
//! is (`token::Session::instance`): it logs in on its own, its sessions
//! outlive the member's own `C_CloseAllSessions`, and it numbers the
//! token's objects its own way, anew at each connection
//! (`token::spare_handle`): a handle of the member's own connection names
//! another object, or none, on a spare, and the reverse.

use super::instance::{instance_session, spare_session, SpareInstance};
use super::SimMember;
use cryptoki_sys::*;
use parking_lot::Mutex;
use pkcs11_ha::member_api::{Held, MemberApi, MemberBackend, SpareLane};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::ThreadId;

/// The spare instances of one [`SimMember`].
#[derive(Default)]
pub struct Spares {
    state: Mutex<State>,
    /// Held while a spare logs in or the group's logout reaches the
    /// spares, as [`MemberBackend::log_out_spares`] requires.
    logins: Mutex<()>,
    /// One lane at a time for threads other than the one that made the
    /// member ([`Spares::one_lane`]): its thread and whether such a lane
    /// was lent since that thread last called.
    one_lane: Option<(ThreadId, Mutex<bool>)>,
    /// Lanes lent to a replay's threads so far.
    replay_lanes: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Each spare's sessions, by index.
    sessions: Vec<Vec<SpareSession>>,
    idle: Vec<usize>,
    /// Each spare's connection failed while opening a session: it connects
    /// again at its next lending, as `member.rs`'s spares do.
    stale: Vec<bool>,
    /// Lanes taken from each spare so far, for tests to read.
    taken: Vec<usize>,
    /// Each spare's sessions of lanes given up unfinished, with their
    /// connection: closed by its next holder, as `member.rs`'s
    /// `Spare::close_forgotten` closes them.
    forgotten: Vec<Vec<(CK_SESSION_HANDLE, u64)>>,
}

struct SpareSession {
    slot: CK_SLOT_ID,
    handle: CK_SESSION_HANDLE,
    connection: u64,
    logged_in: bool,
    keys: HashMap<CK_OBJECT_HANDLE, (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    found: HashMap<CK_OBJECT_HANDLE, Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>>,
}

impl Spares {
    pub fn new(count: usize) -> Spares {
        Spares {
            state: Mutex::new(State {
                sessions: (0..count).map(|_| Vec::new()).collect(),
                idle: (0..count).rev().collect(),
                stale: vec![false; count],
                taken: vec![0; count],
                forgotten: vec![Vec::new(); count],
            }),
            logins: Mutex::new(()),
            one_lane: None,
            replay_lanes: Default::default(),
        }
    }

    /// `count` spares as the deterministic simulation has them: the lanes
    /// a replay takes from threads of its own
    /// (`replication::spares::import_on_spares`) run in an order the
    /// schedule cannot choose, so only the first thread to ask gets one,
    /// until the member's own thread (this one) calls again; the others
    /// find no spare idle, as when every spare is busy. A replay on spares
    /// then makes the same calls in the same order at each run of a seed.
    pub fn one_lane(count: usize) -> Spares {
        Spares {
            one_lane: Some((std::thread::current().id(), Mutex::new(false))),
            ..Spares::new(count)
        }
    }

    /// The member's own thread calls: a replay after this may take a lane.
    pub fn owner_called(&self) {
        if let Some((owner, lent)) = &self.one_lane {
            if *owner == std::thread::current().id() {
                *lent.lock() = false;
            }
        }
    }

    /// Whether a replay thread may take a spare now: the first since the
    /// member's own thread last called.
    fn replay_may_take(&self) -> bool {
        match &self.one_lane {
            Some((owner, lent)) if *owner != std::thread::current().id() => {
                let first = !std::mem::replace(&mut *lent.lock(), true);
                if first {
                    self.replay_lanes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                first
            }
            _ => true,
        }
    }

    pub fn count(&self) -> usize {
        self.state.lock().sessions.len()
    }

    /// Lanes lent to a replay's threads so far ([`Spares::one_lane`]).
    pub fn replay_lanes(&self) -> usize {
        self.replay_lanes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lanes taken from each spare so far.
    pub fn taken(&self) -> Vec<usize> {
        self.state.lock().taken.clone()
    }

    fn has_forgotten(&self, index: usize) -> bool {
        !self.state.lock().forgotten[index].is_empty()
    }

    /// Spare `index` connects again at its next lending: its connection
    /// was cut.
    pub fn mark_stale(&self, index: usize) {
        self.state.lock().stale[index] = true;
    }
}

impl SimMember {
    /// An idle spare's session on `slot` on the current connection (opened
    /// now if it has none), with `begin` held around the opening; `None`
    /// when no spare is idle or its connection failed opening the session
    /// (it connects again at its next lending), `Some(Err)` with the
    /// member's answer when the session could not be opened otherwise (the
    /// spare handed back). Without `connect`, only a spare connected
    /// already is lent: one that is not stale and holds a session on
    /// `slot` on the member's current connection (a reconnect of the
    /// member's library ends its spares' connections, as `member.rs`'s
    /// finalises them).
    fn borrow_spare<'g>(
        &self,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        connect: bool,
    ) -> Option<Result<(usize, CK_SESSION_HANDLE, u64), CK_RV>> {
        if !self.spares.replay_may_take() {
            return None;
        }
        let connection = self.connection();
        let index = {
            let mut state = self.spares.state.lock();
            let at = if connect {
                state.idle.len().checked_sub(1)?
            } else {
                let connected = |i: usize| {
                    !state.stale[i]
                        && state.sessions[i]
                            .iter()
                            .any(|s| s.slot == slot && s.connection == connection)
                };
                state.idle.iter().rposition(|&i| connected(i))?
            };
            state.idle.remove(at)
        };
        let known = {
            let mut state = self.spares.state.lock();
            if std::mem::take(&mut state.stale[index]) {
                state.sessions[index].clear();
                let mut sim = self.sim.lock();
                sim.reconnect_spares();
                sim.reconnect_spare(index);
            }
            state.sessions[index].retain(|s| s.connection == connection);
            state.sessions[index]
                .iter()
                .find(|s| s.slot == slot)
                .map(|s| s.handle)
        };
        if self.spares.has_forgotten(index) {
            let _begun = begin();
            self.close_forgotten(index);
        }
        if let Some(handle) = known {
            return Some(Ok((index, handle, connection)));
        }
        let _begun = begin();
        let mut handle = 0;
        let rv = self.open_spare_session(slot, CKF_SERIAL_SESSION, index, &mut handle);
        let handle = instance_session(handle);
        let mut state = self.spares.state.lock();
        if rv != CKR_OK {
            state.idle.push(index);
            // A spare whose connection failed is no answer of the
            // member's: the call goes to the member's own session, as
            // `member.rs`'s spares send it.
            if rv == CKR_DEVICE_ERROR {
                state.stale[index] = true;
                return None;
            }
            return Some(Err(rv));
        }
        state.sessions[index].push(SpareSession {
            slot,
            handle,
            connection,
            logged_in: false,
            keys: HashMap::new(),
            found: HashMap::new(),
        });
        Some(Ok((index, handle, connection)))
    }

    /// Closes spare `index`'s sessions of lanes given up unfinished that
    /// are on the member's current connection, unless a call is stalled
    /// inside the spare; called by its holder.
    fn close_forgotten(&self, index: usize) {
        if self.stalled_spares.lock().contains(&index) {
            return;
        }
        let connection = self.connection();
        let forgotten = {
            let mut state = self.spares.state.lock();
            let forgotten = std::mem::take(&mut state.forgotten[index]);
            let live = &state.sessions[index];
            forgotten
                .into_iter()
                .filter(|(handle, on)| {
                    *on == connection && !live.iter().any(|s| s.handle == *handle)
                })
                .collect::<Vec<_>>()
        };
        for (handle, _) in forgotten {
            self.close_session(spare_session(index, handle));
        }
    }

    /// [`MemberBackend::close_forgotten_lanes`]: each idle spare's, taken
    /// off the idle list meanwhile.
    pub(super) fn close_forgotten_lanes_of_spares(&self) {
        for index in 0..self.spares.count() {
            let at = {
                let mut state = self.spares.state.lock();
                if state.forgotten[index].is_empty() {
                    continue;
                }
                let Some(at) = state.idle.iter().position(|&i| i == index) else {
                    continue;
                };
                state.idle.remove(at);
                at
            };
            if !self.spares.state.lock().stale[index] {
                self.close_forgotten(index);
            }
            let mut state = self.spares.state.lock();
            let at = at.min(state.idle.len());
            state.idle.insert(at, index);
        }
    }

    pub(super) fn on_spare_call<'g>(
        &self,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<CK_RV> {
        let (index, session, ..) = match self.borrow_spare(slot, begin, true)? {
            Ok(borrowed) => borrowed,
            Err(rv) => return Some(rv),
        };
        let spare = SpareInstance {
            member: self,
            spare: index,
        };
        let rv = call(&spare, session);
        self.spares.state.lock().idle.push(index);
        Some(rv)
    }

    /// A spare taken as a lane; without `connect`, only one connected
    /// already (see [`SimMember::borrow_spare`]).
    pub(super) fn take_spare_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        connect: bool,
    ) -> Option<Result<Box<dyn SpareLane>, CK_RV>> {
        let (index, session, connection) = match self.borrow_spare(slot, begin, connect)? {
            Ok(borrowed) => borrowed,
            Err(rv) => return Some(Err(rv)),
        };
        self.spares.state.lock().taken[index] += 1;
        Some(Ok(Box::new(SimLane {
            view: SpareInstance {
                member: self,
                spare: index,
            },
            index,
            session,
            connection,
            finished: false,
        })))
    }

    pub(super) fn log_out_spare_sessions(&self, slot: CK_SLOT_ID) {
        let _logins = self.spares.logins.lock();
        let connection = self.connection();
        let logged_in: Vec<CK_SESSION_HANDLE> = {
            let mut state = self.spares.state.lock();
            let sessions = (state.sessions.iter_mut().enumerate())
                .flat_map(|(spare, sessions)| sessions.iter_mut().map(move |s| (spare, s)));
            sessions
                .filter(|(_, s)| s.slot == slot)
                .filter_map(|(spare, s)| {
                    s.keys.clear();
                    s.found.clear();
                    (std::mem::take(&mut s.logged_in) && s.connection == connection)
                        .then_some(spare_session(spare, s.handle))
                })
                .collect()
        };
        for session in logged_in {
            self.logout(session);
        }
    }
}

/// A spare of a [`SimMember`] taken as a lane.
struct SimLane {
    /// The spare as the lane's library: its own instance.
    view: SpareInstance<Arc<SimMember>>,
    index: usize,
    session: CK_SESSION_HANDLE,
    connection: u64,
    finished: bool,
}

impl SimLane {
    fn with_session<T>(&self, with: impl FnOnce(&mut SpareSession) -> T) -> Option<T> {
        let mut state = self.view.member.spares.state.lock();
        state.sessions[self.index]
            .iter_mut()
            .find(|s| s.handle == self.session && s.connection == self.connection)
            .map(with)
    }
}

impl SpareLane for SimLane {
    fn library(&self) -> &dyn MemberBackend {
        &self.view
    }

    fn session(&self) -> CK_SESSION_HANDLE {
        self.session
    }

    fn connection(&self) -> u64 {
        self.connection
    }

    fn known_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        self.with_session(|s| {
            s.keys
                .get(&object)
                .filter(|(first, _)| *first == first_handle)
                .map(|(_, here)| *here)
        })
        .flatten()
    }

    fn remember_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
        here: CK_OBJECT_HANDLE,
    ) {
        self.with_session(|s| s.keys.insert(object, (first_handle, here)));
    }

    fn known_found(
        &self,
        here: CK_OBJECT_HANDLE,
    ) -> Option<Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>> {
        self.with_session(|s| s.found.get(&here).copied()).flatten()
    }

    fn remember_found(
        &self,
        here: CK_OBJECT_HANDLE,
        stands_for: Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    ) {
        self.with_session(|s| s.found.insert(here, stands_for));
    }

    fn logged_in(&self) -> bool {
        self.with_session(|s| s.logged_in).unwrap_or(false)
    }

    fn forget_login(&self) {
        self.with_session(|s| s.logged_in = false);
    }

    fn log_in(
        &self,
        log_in: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> Option<CK_RV>,
    ) -> bool {
        let _logins = self.view.member.spares.logins.lock();
        if self.logged_in() {
            return true;
        }
        let logged_in = matches!(
            log_in(&self.view, self.session),
            Some(CKR_OK | CKR_USER_ALREADY_LOGGED_IN)
        );
        if logged_in {
            self.with_session(|s| s.logged_in = true);
        }
        logged_in
    }

    fn leave_session(&self, session: CK_SESSION_HANDLE) {
        let mut state = self.view.member.spares.state.lock();
        state.forgotten[self.index].push((session, self.connection));
    }

    fn finish(mut self: Box<Self>) {
        self.finished = true;
    }

    fn close(self: Box<Self>) {
        self.view.close_session(self.session);
    }
}

impl Drop for SimLane {
    fn drop(&mut self) {
        let mut state = self.view.member.spares.state.lock();
        if !self.finished {
            let (session, connection) = (self.session, self.connection);
            state.sessions[self.index]
                .retain(|s| (s.handle, s.connection) != (session, connection));
            state.forgotten[self.index].push((session, connection));
        }
        state.idle.push(self.index);
    }
}
