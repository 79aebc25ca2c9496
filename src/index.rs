//! What one member token holds: its token objects by handle and by
//! fingerprint, read in one enumeration and then kept current with what
//! the group finds, changes and removes there (objects the group makes are
//! known by handle already and need no lookup). An object is then found on a member
//! by a lookup in memory instead of a search of the whole token -- a
//! search costs time in proportion to the token's size, so enumerating N
//! objects of a member by searches would cost N^2.
//!
//! Reconciliation reads one of each member when a process starts and at
//! login, and the group takes it (`Group::adopt_index`) unless objects left
//! the member or its handles changed meanwhile; before that, the group
//! reads its own after a few searches.
//!
//! The index is an optimisation, never the authority: an object it does
//! not know (made by another process since it was read) is looked for on
//! the member as before, and added.

use crate::identity::{self, Fingerprint};
use crate::member_api::MemberApi;
use cryptoki_sys::*;
use rustc_hash::FxHashMap;
use std::sync::Arc;

/// How many objects a member is searched for one by one before its index
/// is read: a short-lived process that touches a few objects of a large
/// token is cheaper served by searches than by reading every object. A
/// search costs about a fifth of a reading on SoftHSM at any size (it
/// compares every object; 0.4 s against 1.8 s at 10,000 keys), so after
/// four the searches have cost about what the reading would have: never
/// much more than twice the cheaper way.
pub const SEARCHES_BEFORE_INDEX: u32 = 4;

#[derive(Default, Clone)]
pub struct MemberIndex {
    by_handle: FxHashMap<CK_OBJECT_HANDLE, Arc<Fingerprint>>,
    /// Keyed by the fingerprint without `CKA_CHECK_VALUE`, which a member
    /// may not compute for a key it unwrapped.
    by_print: FxHashMap<Fingerprint, Vec<CK_OBJECT_HANDLE>>,
}

/// The fingerprint without its check value: what identifies an object
/// across members (see [`identity::matches`]).
fn key_of(print: &Fingerprint) -> Fingerprint {
    print
        .iter()
        .filter(|(t, _)| *t != CKA_CHECK_VALUE)
        .cloned()
        .collect()
}

impl MemberIndex {
    /// Reads every token object of the member but `hidden` (the domain
    /// key). `None` when the member cannot be enumerated or stops
    /// answering meanwhile: a partial index would pass objects off as
    /// absent.
    pub fn read(
        library: &(impl MemberApi + ?Sized),
        session: CK_SESSION_HANDLE,
        hidden: Option<CK_OBJECT_HANDLE>,
    ) -> Option<MemberIndex> {
        let everything: Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
        let handles = identity::find(library, session, &everything).ok()?;
        let mut index = MemberIndex::default();
        for handle in handles.into_iter().filter(|h| Some(*h) != hidden) {
            // An object removed since the search is simply not held.
            if let Some(print) = identity::fingerprint(library, session, handle) {
                index.insert(handle, print);
            }
        }
        Some(index)
    }

    pub fn len(&self) -> usize {
        self.by_handle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_handle.is_empty()
    }

    /// The member's objects a search for `print` finds (see
    /// [`identity::find`]).
    pub fn matching(&self, print: &Fingerprint) -> Vec<CK_OBJECT_HANDLE> {
        let Some(candidates) = self.by_print.get(&key_of(print)) else {
            return Vec::new();
        };
        candidates
            .iter()
            .copied()
            .filter(|h| {
                self.by_handle
                    .get(h)
                    .is_some_and(|candidate| identity::matches(print, candidate))
            })
            .collect()
    }

    /// Every object known, with its fingerprint.
    pub fn objects(&self) -> impl Iterator<Item = (CK_OBJECT_HANDLE, &Fingerprint)> {
        self.by_handle.iter().map(|(h, print)| (*h, print.as_ref()))
    }

    /// The fingerprint of one of the member's objects, if known.
    pub fn fingerprint(&self, handle: CK_OBJECT_HANDLE) -> Option<Arc<Fingerprint>> {
        self.by_handle.get(&handle).cloned()
    }

    /// Records an object the member holds (made by the group, or found).
    pub fn insert(&mut self, handle: CK_OBJECT_HANDLE, print: Fingerprint) {
        self.remove(handle);
        let key = key_of(&print);
        self.by_handle.insert(handle, Arc::new(print));
        self.by_print.entry(key).or_default().push(handle);
    }

    /// Forgets an object the member no longer holds.
    pub fn remove(&mut self, handle: CK_OBJECT_HANDLE) {
        let Some(print) = self.by_handle.remove(&handle) else {
            return;
        };
        let key = key_of(&print);
        if let Some(handles) = self.by_print.get_mut(&key) {
            handles.retain(|h| *h != handle);
            if handles.is_empty() {
                self.by_print.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(label: &str, check: &[u8]) -> Fingerprint {
        vec![
            (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
            (CKA_LABEL, label.as_bytes().to_vec()),
            (CKA_CHECK_VALUE, check.to_vec()),
        ]
    }

    #[test]
    fn lookups_follow_what_a_search_would_find() {
        let mut index = MemberIndex::default();
        index.insert(1, print("a", b"abc"));
        index.insert(2, print("b", b""));
        assert_eq!(index.matching(&print("a", b"abc")), vec![1]);
        assert_eq!(
            index.matching(&print("a", b"")),
            vec![1],
            "no check value: any"
        );
        assert!(
            index.matching(&print("a", b"xyz")).is_empty(),
            "two check values differ"
        );
        assert_eq!(
            index.matching(&print("b", b"abc")),
            vec![2],
            "an unwrapped copy"
        );
        index.insert(3, print("a", b"abc"));
        assert_eq!(
            index.matching(&print("a", b"abc")).len(),
            2,
            "a collision shows"
        );
        index.remove(1);
        index.remove(3);
        assert!(index.matching(&print("a", b"abc")).is_empty());
        assert_eq!(index.len(), 1);
        assert!(index.fingerprint(2).is_some());
    }
}
