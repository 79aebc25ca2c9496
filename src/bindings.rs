//! What a virtual session's operations are bound to: for each kind of
//! operation (sign, digest, a search...) whether one is active, the member
//! it runs on, and what it takes to start it again elsewhere (the saved
//! mechanism and key, the input to replay, a search's template and the
//! objects it returned). `virtual_session` starts, continues and moves
//! operations with these.

use crate::mechanism::{Mechanism, SavedMechanism};
use cryptoki_sys::*;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of operation a session can have active at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Encrypt = 0,
    Decrypt,
    Digest,
    Sign,
    Verify,
    SignRecover,
    VerifyRecover,
    Find,
}
pub(crate) const OP_KINDS: usize = 8;
pub(crate) const ALL_KINDS: [OpKind; OP_KINDS] = [
    OpKind::Encrypt,
    OpKind::Decrypt,
    OpKind::Digest,
    OpKind::Sign,
    OpKind::Verify,
    OpKind::SignRecover,
    OpKind::VerifyRecover,
    OpKind::Find,
];

impl OpKind {
    /// Whether updates of this kind can be replayed exactly on another
    /// member: digests and signatures yes; cipher streams have already
    /// handed output to the application, so no.
    pub(crate) fn replays_updates(self) -> bool {
        matches!(self, OpKind::Digest | OpKind::Sign | OpKind::Verify)
    }
}

/// What an update fed into its operation, kept to replay it elsewhere.
pub enum Input<'a> {
    None,
    Data(&'a [u8]),
    /// `C_DigestKey`'s key, as a virtual handle.
    Key(CK_OBJECT_HANDLE),
}

pub(crate) enum Replay {
    Data(Vec<u8>),
    Key(CK_OBJECT_HANDLE),
}

/// An active operation and what it takes to start it again elsewhere.
#[derive(Default)]
pub(crate) struct ActiveOp {
    pub(crate) mechanism: SavedMechanism,
    pub(crate) key: Option<CK_OBJECT_HANDLE>,
    /// False once the operation's history can no longer be replayed.
    pub(crate) movable: bool,
    /// Only operations that had updates or are searches have one.
    pub(crate) history: Option<Box<History>>,
}

/// What a multi-part operation or a search went through, to repeat it on
/// another member.
#[derive(Default)]
pub(crate) struct History {
    pub(crate) replay: Vec<Replay>,
    pub(crate) replay_bytes: usize,
    /// A search: its template, to start it again elsewhere, and the objects
    /// already returned, so that none is returned twice.
    pub(crate) search: Option<Search>,
}

pub(crate) struct Search {
    pub(crate) template: crate::mechanism::OwnedTemplate,
    pub(crate) returned: rustc_hash::FxHashSet<CK_OBJECT_HANDLE>,
    /// Attributes the members cannot be asked (they would answer for their
    /// own copies, not for the application's view): checked here.
    pub(crate) filter: SearchFilter,
    /// [`crate::group::Group::logins_again`] as it last started on a member.
    pub(crate) logins_again: u64,
}

/// Attribute values a search wants that are checked against the
/// application's view of each object found, not by the members.
pub type SearchFilter = Vec<(CK_ATTRIBUTE_TYPE, bool)>;

/// Which operations of a session are active and where, in one word that
/// every call can read without the bindings' lock: bit `k` = an operation
/// of kind `k` is active; bit `LOST_SHIFT + k` = its member failed and it
/// could not be moved (the next call on it says `CKR_DEVICE_ERROR` and ends
/// it, leaving the session usable); [`RESTORED`]; and the bound member + 1
/// from [`MEMBER_SHIFT`] up (0 = none).
#[derive(Clone, Copy)]
pub(crate) struct Summary(u64);

const LOST_SHIFT: u32 = 8;
/// The active and lost bits.
const KINDS_MASK: u64 = (1 << (LOST_SHIFT + OP_KINDS as u32)) - 1;
/// Set by `C_SetOperationState`: that member's state was restored, and
/// only that member can continue it.
const RESTORED: u64 = 1 << 16;
const MEMBER_SHIFT: u32 = 32;
/// The bound member's bits.
const MEMBER_MASK: u64 = (u32::MAX as u64 >> 1) << MEMBER_SHIFT;

fn active_bit(kind: OpKind) -> u64 {
    1 << kind as u32
}

fn lost_bit(kind: OpKind) -> u64 {
    1 << (LOST_SHIFT + kind as u32)
}

impl Summary {
    pub(crate) fn active(self, kind: OpKind) -> bool {
        self.0 & active_bit(kind) != 0
    }

    pub(crate) fn lost(self, kind: OpKind) -> bool {
        self.0 & lost_bit(kind) != 0
    }

    pub(crate) fn restored(self) -> bool {
        self.0 & RESTORED != 0
    }

    pub(crate) fn any_active(self) -> bool {
        self.0 & ((1 << OP_KINDS) - 1) != 0 || self.restored()
    }

    pub(crate) fn member(self) -> Option<usize> {
        (((self.0 & MEMBER_MASK) >> MEMBER_SHIFT) as usize).checked_sub(1)
    }
}

/// A session's operations, by kind, behind a lock, with their [`Summary`]
/// published in one word that every call reads without the lock. All of
/// them run on one member, so the dual functions find both halves
/// together. The lock is never held across a member call, and for no more
/// than copying one update for replay; only an application calling into
/// one session from two threads at once waits for it.
#[derive(Default)]
pub(crate) struct BindingsCell {
    /// The summary the last guard published; written only under `ops`.
    pub(crate) word: AtomicU64,
    /// Slot `k` holds the operation of kind `k` while the summary says it
    /// is active. Any other slot is stale, and the next start of its kind
    /// overwrites it in place: ending an operation frees nothing, and
    /// starting one reuses the room of the last. Made at the session's
    /// first operation: inline, its 1.7 KB were zeroed and copied five
    /// times at each `C_OpenSession` (a fifth of an open and close's
    /// instructions, callgrind).
    pub(crate) ops: Mutex<Option<Box<[ActiveOp; OP_KINDS]>>>,
}

impl BindingsCell {
    #[inline(always)]
    pub(crate) fn lock(&self) -> BindingsGuard<'_> {
        let ops = self.ops.lock();
        BindingsGuard {
            cell: self,
            summary: Summary(self.word.load(Ordering::Relaxed)),
            ops,
        }
    }

    /// The summary last published; readable while another thread holds
    /// the lock.
    #[inline(always)]
    pub(crate) fn summary(&self) -> Summary {
        Summary(self.word.load(Ordering::Acquire))
    }
}

/// The bindings, locked, with a working copy of their summary; releasing
/// them publishes it.
pub(crate) struct BindingsGuard<'a> {
    pub(crate) cell: &'a BindingsCell,
    pub(crate) summary: Summary,
    pub(crate) ops: MutexGuard<'a, Option<Box<[ActiveOp; OP_KINDS]>>>,
}

impl BindingsGuard<'_> {
    #[inline(always)]
    pub(crate) fn ops(&mut self) -> &mut [ActiveOp; OP_KINDS] {
        self.ops.get_or_insert_with(Default::default)
    }

    /// Starts an operation of `kind` on `member`, with the mechanism saved
    /// in its slot; one whose parameter could not be saved cannot move.
    #[inline(always)]
    pub(crate) fn start(
        &mut self,
        kind: OpKind,
        mechanism: Option<&Mechanism>,
        key: Option<CK_OBJECT_HANDLE>,
        member: usize,
    ) {
        let op = &mut self.ops()[kind as usize];
        let saved = op.mechanism.save(mechanism);
        op.key = key;
        op.movable = saved && kind != OpKind::Find;
        if op.history.is_some() {
            op.history = None;
        }
        self.summary.0 = (self.summary.0 & !lost_bit(kind)) | active_bit(kind);
        self.set_member(Some(member));
    }

    /// Makes the active operation of `kind` stay on its member: it was fed
    /// input that is not kept for replay.
    pub(crate) fn stop_replaying(&mut self, kind: OpKind) {
        if let Some(op) = self.active(kind) {
            op.movable = false;
            op.history = None;
        }
    }

    pub(crate) fn end(&mut self, kind: OpKind) {
        self.summary.0 &= !(active_bit(kind) | lost_bit(kind));
    }

    pub(crate) fn active(&mut self, kind: OpKind) -> Option<&mut ActiveOp> {
        let active = self.summary.active(kind);
        active.then(|| &mut self.ops()[kind as usize])
    }

    pub(crate) fn is_lost(&self, kind: OpKind) -> bool {
        self.summary.lost(kind)
    }

    pub(crate) fn member(&self) -> Option<usize> {
        self.summary.member()
    }

    pub(crate) fn set_member(&mut self, member: Option<usize>) {
        let bound = member.map_or(0, |m| m as u64 + 1) << MEMBER_SHIFT;
        self.summary.0 = (self.summary.0 & !MEMBER_MASK) | bound;
    }

    pub(crate) fn restored(&self) -> bool {
        self.summary.restored()
    }

    pub(crate) fn set_restored(&mut self, restored: bool) {
        let bit = if restored { RESTORED } else { 0 };
        self.summary.0 = (self.summary.0 & !RESTORED) | bit;
    }

    /// Takes every active operation out; none is active afterwards.
    pub(crate) fn take_all(&mut self) -> [Option<ActiveOp>; OP_KINDS] {
        let before = self.summary;
        self.summary.0 &= !KINDS_MASK;
        let ops = self.ops();
        std::array::from_fn(|k| {
            let active = before.0 & 1 << k != 0;
            active.then(|| std::mem::take(&mut ops[k]))
        })
    }

    /// Puts operations back as the active ones; `lost` names those that
    /// could not move.
    pub(crate) fn replace_all(&mut self, ops: [Option<ActiveOp>; OP_KINDS], lost: u64) {
        let mut active = 0;
        let slots = self.ops();
        for (kind, op) in ops.into_iter().enumerate() {
            if let Some(op) = op {
                slots[kind] = op;
                active |= 1 << kind;
            }
        }
        let kinds = active | (lost & active) << LOST_SHIFT;
        self.summary.0 = (self.summary.0 & !KINDS_MASK) | kinds;
    }
}

impl Drop for BindingsGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.cell.word.store(self.summary.0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_keeps_two_threads_out_of_each_others_bindings() {
        let cell = BindingsCell::default();
        const ROUNDS: u64 = 20_000;
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..ROUNDS {
                        let mut b = cell.lock();
                        // A read-modify-write that loses counts if two
                        // guards ever overlap.
                        let slot = &mut b.ops()[0];
                        slot.key = Some(slot.key.unwrap_or(0) + 1);
                    }
                });
            }
        });
        assert_eq!(cell.lock().ops()[0].key, Some(2 * ROUNDS));
    }

    #[test]
    fn a_dual_function_half_is_not_moved() {
        let cell = BindingsCell::default();
        let sha256 = crate::mechanism::BareMechanism::new(CKM_SHA256);
        let mut b = cell.lock();
        let sha256 = sha256.checked().unwrap();
        b.start(OpKind::Digest, Some(&sha256), None, 1);
        assert!(b.active(OpKind::Digest).is_some_and(|op| op.movable));
        b.stop_replaying(OpKind::Digest);
        assert!(b.active(OpKind::Digest).is_some_and(|op| !op.movable));
    }

    #[test]
    fn the_summary_follows_starts_ends_and_moves() {
        let cell = BindingsCell::default();
        {
            let mut b = cell.lock();
            b.start(OpKind::Find, None, None, 2);
            b.start(OpKind::Digest, None, Some(7), 2);
        }
        let summary = cell.summary();
        assert!(summary.active(OpKind::Digest) && summary.active(OpKind::Find));
        assert_eq!(summary.member(), Some(2));
        cell.lock().end(OpKind::Digest);
        assert!(!cell.summary().active(OpKind::Digest));
        assert!(cell.summary().active(OpKind::Find), "other kinds stay");
        {
            let mut b = cell.lock();
            let ops = b.take_all();
            assert!(ops[OpKind::Find as usize].is_some());
            assert!(ops[OpKind::Digest as usize].is_none(), "ended before");
            b.replace_all(ops, 1 << OpKind::Find as u32);
            b.set_member(Some(0));
        }
        let summary = cell.summary();
        assert!(summary.active(OpKind::Find) && summary.lost(OpKind::Find));
        assert_eq!(summary.member(), Some(0));
        cell.lock().end(OpKind::Find);
        assert!(!cell.summary().any_active());
    }
}
