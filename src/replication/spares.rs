//! A returning member's replay of the imports it missed, made on its
//! library's spare instances at once (p11-kit's client: each instance a
//! connection and a server process of its own). One by one on the
//! member's own session, each `C_CreateObject` took 56 ms under the long
//! chaos run's load, and a member owed 294 objects spent 16.5 s replaying
//! them while the group went on without it.

use super::Holdings;
use crate::group::{Group, Location, Pending};
use crate::identity::{self, Fingerprint};
use crate::member_api::SpareLane;
use crate::virtual_session::{Attempt, VirtualSession};
use cryptoki_sys::*;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Imports in a row from which a replay makes them on spares: below it,
/// taking the lanes and reading the copies' handles afterwards cost more
/// than the calls saved.
pub const IMPORTS_ON_SPARES: usize = 8;

/// Spare instances one replay makes imports on at once.
const REPLAY_LANES: usize = 4;

/// What [`VirtualSession::import_on_spares`] did.
pub struct SpareImports {
    /// Copies made.
    pub made: usize,
    /// The changes left to the one-by-one replay, in their order: those no
    /// spare took, and those a spare refused or failed on.
    pub left: Vec<Pending>,
    /// Whether the holdings still list everything the member holds: false
    /// when its objects could not be listed after the copies were made
    /// (each later change then looks the member up).
    pub holdings_current: bool,
    /// The longest a lane took to be ready for its first import (taking
    /// the spare, initialising it, logging it in, opening its session),
    /// and the time the listing of the copies afterwards took: the HA
    /// log's recovery line shows what a run spent beside the imports.
    pub set_up: Duration,
    pub listing: Duration,
}

impl VirtualSession {
    /// Makes on member `position` the imports of `run` it lacks, on up to
    /// [`REPLAY_LANES`] of its library's spare instances at once, each on a
    /// read-write session of its own beside the spare's (which is
    /// read-only). `run` holds imports only, each object once: none depends
    /// on another, so their order does not matter; a change that must
    /// come before or after one of them (a removal) ends the run
    /// (`recovery::replay_pending`). Each copy is recorded as being made
    /// and left in doubt when cut off, as on the member's own session
    /// ([`VirtualSession::attempt_making`]); a spare's fault is the
    /// member's, which takes it out, and the copies not made are left to
    /// the caller. A spare's handle means nothing on the member's own
    /// session, so the copies made are found there afterwards in one
    /// listing, reading only the objects `holdings` does not list.
    pub fn import_on_spares(
        &self,
        position: usize,
        run: Vec<Pending>,
        holdings: &mut Holdings,
    ) -> SpareImports {
        let todo: Vec<Pending> = run
            .into_iter()
            .filter(|change| match change {
                Pending::Import(object, _) => {
                    self.group.objects.get(*object).is_some()
                        && !self.holds(*object, position, Some(holdings))
                }
                _ => true,
            })
            .collect();
        let member = &self.group.members[position];
        let Some(location) = member.location() else {
            return SpareImports {
                made: 0,
                left: todo,
                holdings_current: true,
                set_up: Duration::ZERO,
                listing: Duration::ZERO,
            };
        };
        let lanes = Lanes {
            group: &self.group,
            position,
            epoch: member.epoch(),
            location: &location,
            todo: &todo,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            answers: todo.iter().map(|_| Mutex::new(None)).collect(),
            started: Instant::now(),
            set_up: Mutex::new(Duration::ZERO),
        };
        std::thread::scope(|scope| {
            for _ in 0..REPLAY_LANES.min(todo.len()) {
                scope.spawn(|| lanes.import_on_a_lane());
            }
        });
        let set_up = *lanes.set_up.lock();
        let answers: Vec<Option<Attempt>> =
            lanes.answers.into_iter().map(Mutex::into_inner).collect();
        let made = answers
            .iter()
            .filter(|a| matches!(a, Some(Attempt::Answered(CKR_OK))))
            .count();
        // Copies a faulted call may have made are found as well, so that
        // the one-by-one replay does not make them again.
        let tried: Vec<CK_OBJECT_HANDLE> = todo
            .iter()
            .zip(&answers)
            .filter_map(|(change, answer)| match (change, answer) {
                (Pending::Import(object, _), Some(_)) => Some(*object),
                _ => None,
            })
            .collect();
        let listing = Instant::now();
        let holdings_current = tried.is_empty() || self.note_new_holdings(position, holdings);
        let listing = listing.elapsed();
        if holdings_current {
            for object in tried {
                self.holds(object, position, Some(holdings));
            }
        }
        let left = todo
            .into_iter()
            .zip(answers)
            .filter(|(_, answer)| !matches!(answer, Some(Attempt::Answered(CKR_OK))))
            .map(|(change, _)| change)
            .collect();
        SpareImports {
            made,
            left,
            holdings_current,
            set_up,
            listing,
        }
    }

    /// Adds to `holdings` the member's token objects it does not list yet,
    /// each read once; false if the member could not be listed.
    fn note_new_holdings(&self, position: usize, holdings: &mut Holdings) -> bool {
        let domain = self.group.domain_handle(position);
        let everything: Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
        let Ok(handles) = self.group.find_on_utility(position, &everything) else {
            return false;
        };
        let listed: rustc_hash::FxHashSet<CK_OBJECT_HANDLE> =
            holdings.objects.iter().map(|(h, _)| *h).collect();
        for handle in handles
            .into_iter()
            .filter(|h| Some(*h) != domain && !listed.contains(h))
        {
            let read = self.on_member(position, |s| {
                identity::fingerprint(&*s.library, s.handle, handle)
            });
            match read {
                Ok(Some(print)) => holdings.objects.push((handle, print)),
                Ok(None) => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// The work [`VirtualSession::import_on_spares`] shares among its lanes.
struct Lanes<'a> {
    group: &'a Arc<Group>,
    position: usize,
    /// The member's epoch when the run began: a lane's call in a later one
    /// is not made.
    epoch: u64,
    location: &'a Location,
    todo: &'a [Pending],
    /// The next change of `todo` a lane takes.
    next: AtomicUsize,
    /// Set at a fault: no lane takes another change.
    stop: AtomicBool,
    answers: Vec<Mutex<Option<Attempt>>>,
    /// When the run began, and the longest any lane took from then to be
    /// ready for its first import.
    started: Instant,
    set_up: Mutex<Duration>,
}

impl Lanes<'_> {
    /// Takes a spare and makes changes of `todo` on it, one after another,
    /// until none is left or a call faulted.
    fn import_on_a_lane(&self) {
        let member = &self.group.members[self.position];
        let worker = VirtualSession::internal(Arc::clone(self.group));
        // Only a spare connected already: connecting one here held the
        // member out for as long as its server took to start a process
        // for it (see `MemberLibrary::take_connected_lane`). One whose
        // session could not be opened is passed over; one more is tried.
        let lane = (0..2).find_map(|_| {
            Arc::clone(&self.location.library)
                .take_connected_lane(self.location.slot, &mut || {
                    Box::new(member.begin_setup_call())
                })?
                .ok()
        });
        if let Some(lane) = lane {
            if worker.log_lane_in(self.position, &*lane) {
                self.import_with(&worker, lane);
            } else {
                lane.finish();
            }
        }
        worker.close();
    }

    fn import_with(&self, worker: &VirtualSession, lane: Box<dyn SpareLane>) {
        let member = &self.group.members[self.position];
        let (position, epoch) = (self.position, self.epoch);
        let mut session = CK_INVALID_HANDLE;
        let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
        let slot = self.location.slot;
        let opened =
            worker.attempt_on_lane(position, epoch, "C_OpenSession", &*lane, &mut |l, _| {
                l.open_session(slot, flags, &mut session)
            });
        {
            let mut set_up = self.set_up.lock();
            *set_up = (*set_up).max(self.started.elapsed());
        }
        match opened {
            Attempt::Answered(CKR_OK) => {}
            Attempt::Answered(_) => return lane.finish(),
            Attempt::Faulted => return self.stop.store(true, Ordering::Relaxed),
        }
        while !self.stop.load(Ordering::Relaxed) {
            // With no member serving, the member serves first and is given
            // the objects it missed right after (`recovery::replay_pending`
            // defers them): a run begun while another member served takes
            // no further import once none does. Going on, a run of 61
            // imports kept the group out 1.9 s of the long chaos run.
            if self.group.up_members().next().is_none() {
                break;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(Pending::Import(object, template)) = self.todo.get(i) else {
                break;
            };
            let attributes = template.template();
            let mut handle = CK_INVALID_HANDLE;
            self.group.begin_making(position, *object);
            crate::member::forget_cut_off();
            let answer =
                worker.attempt_on_lane(position, epoch, "C_CreateObject", &*lane, &mut |l, _| {
                    l.create_object(session, attributes.as_slice(), &mut handle)
                });
            let faulted = matches!(answer, Attempt::Faulted);
            let returning_meanwhile = member.epoch() >= epoch + 2;
            let cut_off = crate::member::last_call_cut_off() || returning_meanwhile;
            let doubt = self.group.doubt_after(position, faulted, cut_off);
            self.group.end_making(position, *object, doubt);
            *self.answers[i].lock() = Some(answer);
            if faulted {
                // No call to a member that failed: the read-write session
                // is closed with the lane's, by the spare's next holder
                // while its connection lives. Left open, the server kept
                // it for good where recovery reconnected nothing.
                lane.leave_session(session);
                return self.stop.store(true, Ordering::Relaxed);
            }
        }
        worker.attempt_on_lane(position, epoch, "C_CloseSession", &*lane, &mut |l, _| {
            l.close_session(session)
        });
        lane.finish();
    }
}
