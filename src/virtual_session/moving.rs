//! Failover of operations: an operation bound to a failed member starts
//! again on another with its saved mechanism and key, and its kept input
//! is replayed; what cannot move is marked lost.

use super::{Attempt, VirtualSession, STATELESS_LANE};
use crate::bindings::{ActiveOp, OpKind, Replay, ALL_KINDS};
use crate::error::{Error, Result};
use crate::group::Waits;
use crate::member_api::MemberApi;
use crate::object::Era;
use cryptoki_sys::*;

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

fn replay_key(item: &Replay) -> Option<CK_OBJECT_HANDLE> {
    match item {
        Replay::Key(k) => Some(*k),
        Replay::Data(_) => None,
    }
}

impl VirtualSession {
    /// Moves the active search, with the session's other operations, off
    /// member `from`, which failed while what the search found there was
    /// named: started again elsewhere, it finds there what it has not
    /// shown yet.
    pub(crate) fn move_search_from(&self, from: usize) {
        self.move_operations(from);
    }

    /// Starts the active search again from member `from`, which serves on
    /// (it had lost its login unseen): ended there -- on the lane it runs on,
    /// which the move closes, or on the member's own session -- and moved
    /// as from a failed member, it shows what it has not shown yet.
    pub(crate) fn restart_search_from(&self, from: usize) {
        if !self.lane.on() {
            self.attempt(from, "C_FindObjectsFinal", &mut |l, s| {
                l.find_objects_final(s)
            });
        }
        self.move_search_from(from);
    }

    /// Moves every operation bound to the failed member `from` to another
    /// member: starts each again with its saved mechanism and key and
    /// replays its buffered updates. What cannot be moved is marked lost.
    pub(super) fn move_operations(&self, from: usize) {
        self.move_operations_waiting(from, &mut Waits::spent(), false);
    }

    /// [`Self::move_operations`] for a call of another kind, which cannot
    /// wait on their behalf: where no member can take them now and none
    /// was begun anywhere, they stay bound to `from`, not lost, and move
    /// once their own call comes, which waits for a returning member or
    /// their keys (lost here, an encryption whose key was on its way to the
    /// only member serving failed at once at its next update while a member
    /// was being brought back: simulation seed 18167287).
    pub(super) fn move_operations_unless_stuck(&self, from: usize) {
        self.move_operations_waiting(from, &mut Waits::spent(), true);
    }

    /// [`Self::move_operations`] for a call that may wait within `waits`:
    /// when each member tried failed under the move and none serves, it
    /// waits for a returning one and tries again rather than lose them --
    /// and where their keys are on no serving member but on their way to
    /// one serving first, it waits for those keys there (lost instead, a
    /// signature failed in the soak as its member was killed while the
    /// only other serving member had just returned owing the key).
    pub(super) fn move_operations_waiting(
        &self,
        from: usize,
        waits: &mut Waits,
        keep_if_stuck: bool,
    ) {
        if self.lane.on() {
            self.drop_lane();
        }
        let mut ops = {
            let mut b = self.bindings();
            if b.member() != Some(from) {
                return;
            }
            let restored = b.restored();
            if restored && keep_if_stuck {
                return;
            }
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
        // A search goes where it is answered in full, if a member can.
        let searching = ops[OpKind::Find as usize]
            .as_ref()
            .is_some_and(|op| op.movable);
        let mut moved_to = None;
        // Whether an operation was begun again on a member the move then
        // left: kept bound to `from`, it would meet that one there later.
        let mut begun = false;
        'waiting: loop {
            // A search goes in the order a search starts in, and waits on
            // each member it is tried on for the kept objects it may find
            // there. Ranked from the least busy instead, a moved search
            // waited on one member serving first and ran on another,
            // finding 0 of its objects (the soak); so did one that waited
            // on the first member and then ran on a member that came to
            // serve first meanwhile, owing the same objects.
            let order = if searching {
                self.group.complete_first(self.group.by_position())
            } else {
                self.group.by_preference(STATELESS_LANE)
            };
            'members: for position in order {
                if searching {
                    self.wait_for_kept_to_search(position, &ops);
                }
                let era = self.group.objects.era(position);
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
                    match self.restart(position, era, kind, op, &member_key) {
                        Attempt::Faulted => continue 'members,
                        Attempt::Answered(CKR_OK) => begun = true,
                        Attempt::Answered(_) => op.movable = false,
                    }
                }
                moved_to = Some(position);
                break 'waiting;
            }
            if !self.wait_for_a_member(waits) && !self.wait_for_kept_keys(&keys, waits) {
                break;
            }
        }
        let stuck = moved_to.is_none() && keep_if_stuck && !begun;
        let mut lost = 0;
        for (kind, op) in ops.iter().enumerate() {
            if op
                .as_ref()
                .is_some_and(|op| !op.movable || (moved_to.is_none() && !stuck))
            {
                lost |= 1 << kind;
            }
        }
        let mut b = self.bindings();
        b.replace_all(ops, lost);
        b.set_member(moved_to.or(Some(from)));
    }

    /// Before a search in `ops` starts again on member `position`: where it
    /// is owed changes (it serves first after an outage), waits for the
    /// kept objects the search may find there, as a search starting there
    /// does ([`Self::wait_for_kept_matches_on`]). Moved at once, a search
    /// whose member failed under it found none of them on the member
    /// serving first (the soak's "found 0 objects, expected 2", a second
    /// search finding 2).
    fn wait_for_kept_to_search(&self, position: usize, ops: &[Option<ActiveOp>]) {
        let search = ops[OpKind::Find as usize]
            .as_ref()
            .and_then(|op| op.history.as_ref())
            .and_then(|h| h.search.as_ref());
        if let Some(search) = search {
            self.wait_for_kept_matches_on(position, &search.template.template());
        }
    }

    /// Starts one operation again on `position` and replays its updates,
    /// with keys looked up there in `era`.
    fn restart(
        &self,
        position: usize,
        era: Era,
        kind: OpKind,
        op: &mut ActiveOp,
        member_key: &dyn Fn(CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE,
    ) -> Attempt {
        let function = "operation failover";
        if let Some(search) = op.history.as_mut().and_then(|h| h.search.as_mut()) {
            search.logins_again = self.group.logins_again();
            // Known before the search starts there, as in find_init, so that
            // the search can leave it out.
            self.group.domain_handle(position);
            let template = search.template.template();
            return self.attempt(position, function, &mut |l, s| {
                l.find_objects_init(s, template.as_slice())
            });
        }
        let key = op.key.map_or(CK_INVALID_HANDLE, member_key);
        let mechanism = op.mechanism.as_raw();
        let init = self.attempt_keyed(position, era, function, &mut |l, s| {
            member_init(kind, l, s, mechanism, key)
        });
        if !matches!(init, Attempt::Answered(CKR_OK)) {
            return init;
        }
        for item in op.history.iter().flat_map(|h| &h.replay) {
            let answer = self.attempt_keyed(position, era, function, &mut |l, s| match item {
                Replay::Data(data) => member_update(kind, l, s, data),
                Replay::Key(key) => l.digest_key(s, member_key(*key)),
            });
            if !matches!(answer, Attempt::Answered(CKR_OK)) {
                return answer;
            }
        }
        Attempt::Answered(CKR_OK)
    }
}
