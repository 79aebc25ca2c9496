//! Virtual object handles of a group: which member handle each one stands
//! for on each member, and the reverse maps. Owns no member calls; the
//! group resolves unknown entries and records the result here.

use cryptoki_sys::*;
use parking_lot::RwLock;
use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// What is known of an object on one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Not yet looked for on that member.
    Unknown,
    Present(CK_OBJECT_HANDLE),
    /// Looked for and not found (or not identified uniquely).
    Absent,
}

#[derive(Debug, Clone)]
pub struct VirtualObject {
    /// Indexed by member position in the group.
    pub on: Vec<Presence>,
    /// The virtual session that owns a session object; `None` for token
    /// objects and for objects we found rather than created.
    pub owner: Option<CK_SESSION_HANDLE>,
    /// How to recognise it on other members, read while a member that holds
    /// it was alive, so that it can be found again when that member is not.
    pub fingerprint: Option<std::sync::Arc<crate::identity::Fingerprint>>,
    /// Known to be a key the application made non-extractable (the members
    /// keep it extractable under trusted keys only). Never goes back: a
    /// key cannot become extractable again.
    pub protected: bool,
    /// Generated non-extractable in this process, so that it reads
    /// `CKA_NEVER_EXTRACTABLE = TRUE`; the members' copies cannot record it.
    pub never_extractable: bool,
}

impl VirtualObject {
    /// Its copies: (member position, member handle).
    pub fn copies(&self) -> impl Iterator<Item = (usize, CK_OBJECT_HANDLE)> + '_ {
        self.on.iter().enumerate().filter_map(|(m, p)| match p {
            Presence::Present(h) => Some((m, *h)),
            _ => None,
        })
    }
}

/// Fills a `C_FindObjects` batch as the member would have filled it,
/// where some of what the member returns is left out (a hidden domain key,
/// objects a search returned before it moved, objects a filter rejects):
/// many clients (the `cryptoki` crate among them) take a short batch for
/// the end of the search. `fetch(room)` has the member write handles into
/// `room` and says how many it wrote; `keep(batch)` moves the handles to
/// show (translated as needed) to the front of `batch` and says how many.
/// Returns how many handles the batch holds.
pub fn fill_batch(
    found: &mut [CK_OBJECT_HANDLE],
    mut fetch: impl FnMut(&mut [CK_OBJECT_HANDLE]) -> crate::error::Result<usize>,
    mut keep: impl FnMut(&mut [CK_OBJECT_HANDLE]) -> crate::error::Result<usize>,
) -> crate::error::Result<usize> {
    let max = found.len();
    let mut kept = 0;
    while kept < max {
        let room = max - kept;
        let returned = fetch(&mut found[kept..])?.min(room);
        kept += keep(&mut found[kept..kept + returned])?;
        if returned < room {
            break;
        }
    }
    Ok(kept)
}

/// Virtual handles are process-wide, non-zero and never reused, so a stale
/// handle from a destroyed object can never name another object.
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

fn allocate_handle() -> CK_OBJECT_HANDLE {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_OBJECT_HANDLE
}

#[derive(Default)]
struct Maps {
    objects: HashMap<CK_OBJECT_HANDLE, VirtualObject>,
    by_member: Vec<HashMap<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>,
}

pub struct ObjectTable {
    maps: RwLock<Maps>,
    members: usize,
}

impl ObjectTable {
    pub fn new(members: usize) -> Self {
        ObjectTable {
            maps: RwLock::new(Maps {
                objects: HashMap::default(),
                by_member: vec![HashMap::default(); members],
            }),
            members,
        }
    }

    /// Records a new object with its member handles.
    pub fn insert(&self, on: Vec<Presence>, owner: Option<CK_SESSION_HANDLE>) -> CK_OBJECT_HANDLE {
        debug_assert_eq!(on.len(), self.members);
        let handle = allocate_handle();
        let mut maps = self.maps.write();
        for (m, p) in on.iter().enumerate() {
            if let Presence::Present(h) = p {
                maps.by_member[m].insert(*h, handle);
            }
        }
        maps.objects.insert(
            handle,
            VirtualObject {
                on,
                owner,
                fingerprint: None,
                protected: false,
                never_extractable: false,
            },
        );
        handle
    }

    /// The virtual handle of a member's object, if it has one.
    pub fn known(
        &self,
        member: usize,
        member_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        self.maps.read().by_member[member]
            .get(&member_handle)
            .copied()
    }

    /// The objects known to be on `member` now.
    pub fn held_by(&self, member: usize) -> Vec<CK_OBJECT_HANDLE> {
        self.maps.read().by_member[member]
            .values()
            .copied()
            .collect()
    }

    /// The virtual handle of a member's object, made on first sight.
    pub fn from_member(&self, member: usize, member_handle: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        if let Some(h) = self.maps.read().by_member[member].get(&member_handle) {
            return *h;
        }
        let mut maps = self.maps.write();
        if let Some(h) = maps.by_member[member].get(&member_handle) {
            return *h;
        }
        let handle = allocate_handle();
        let mut on = vec![Presence::Unknown; self.members];
        on[member] = Presence::Present(member_handle);
        maps.by_member[member].insert(member_handle, handle);
        maps.objects.insert(
            handle,
            VirtualObject {
                on,
                owner: None,
                fingerprint: None,
                protected: false,
                never_extractable: false,
            },
        );
        handle
    }

    pub fn get(&self, handle: CK_OBJECT_HANDLE) -> Option<VirtualObject> {
        self.maps.read().objects.get(&handle).cloned()
    }

    /// What is known of `handle` on `member`; `None` for an unknown handle.
    pub fn presence(&self, handle: CK_OBJECT_HANDLE, member: usize) -> Option<Presence> {
        self.maps.read().objects.get(&handle).map(|o| o.on[member])
    }

    /// Records what resolving `handle` on `member` found.
    pub fn set_presence(&self, handle: CK_OBJECT_HANDLE, member: usize, presence: Presence) {
        let mut maps = self.maps.write();
        let Some(object) = maps.objects.get_mut(&handle) else {
            return;
        };
        let old = std::mem::replace(&mut object.on[member], presence);
        if let Presence::Present(h) = old {
            maps.by_member[member].remove(&h);
        }
        if let Presence::Present(h) = presence {
            maps.by_member[member].insert(h, handle);
        }
    }

    /// Keeps the fingerprint of an object, unless one is kept already.
    pub fn set_fingerprint(&self, handle: CK_OBJECT_HANDLE, print: crate::identity::Fingerprint) {
        if let Some(object) = self.maps.write().objects.get_mut(&handle) {
            object
                .fingerprint
                .get_or_insert_with(|| std::sync::Arc::new(print));
        }
    }

    /// Records that a key is one the application made non-extractable.
    pub fn mark_protected(&self, handle: CK_OBJECT_HANDLE, never_extractable: bool) {
        if let Some(object) = self.maps.write().objects.get_mut(&handle) {
            object.protected = true;
            object.never_extractable |= never_extractable;
        }
    }

    /// Keeps a fuller fingerprint of an object in place of the one kept.
    pub fn replace_fingerprint(
        &self,
        handle: CK_OBJECT_HANDLE,
        print: crate::identity::Fingerprint,
    ) {
        if let Some(object) = self.maps.write().objects.get_mut(&handle) {
            object.fingerprint = Some(std::sync::Arc::new(print));
        }
    }

    /// Whether an object of the group has a kept fingerprint that a member
    /// object whose own fingerprint is `candidate` matches.
    pub fn any_matched_by(&self, candidate: &crate::identity::Fingerprint) -> bool {
        self.maps.read().objects.values().any(|o| {
            o.fingerprint
                .as_ref()
                .is_some_and(|p| crate::identity::matches(p, candidate))
        })
    }

    /// The objects of the group whose kept fingerprint a member object
    /// with fingerprint `candidate` matches, with that fingerprint.
    pub fn matched_by(
        &self,
        candidate: &crate::identity::Fingerprint,
    ) -> Vec<(
        CK_OBJECT_HANDLE,
        std::sync::Arc<crate::identity::Fingerprint>,
    )> {
        self.maps
            .read()
            .objects
            .iter()
            .filter_map(|(handle, o)| {
                let print = o.fingerprint.as_ref()?;
                crate::identity::matches(print, candidate).then(|| (*handle, print.clone()))
            })
            .collect()
    }

    /// Whether an object's fingerprint is kept.
    pub fn has_fingerprint(&self, handle: CK_OBJECT_HANDLE) -> bool {
        self.maps
            .read()
            .objects
            .get(&handle)
            .is_some_and(|o| o.fingerprint.is_some())
    }

    /// Forgets an object (destroyed) and returns what it was, with any
    /// other handle of the group for one of its copies: once the members'
    /// handles were forgotten (a logout), a search makes a second object
    /// for a copy the group knows, and that alias must not outlive it --
    /// it would pass an orphan with the same label for the group's key.
    pub fn remove(&self, handle: CK_OBJECT_HANDLE) -> Option<VirtualObject> {
        let mut maps = self.maps.write();
        let object = maps.objects.remove(&handle)?;
        let copies: Vec<(usize, CK_OBJECT_HANDLE)> = object.copies().collect();
        let aliases: Vec<CK_OBJECT_HANDLE> = maps
            .objects
            .iter()
            .filter(|(_, o)| {
                copies
                    .iter()
                    .any(|(m, h)| o.on[*m] == Presence::Present(*h))
            })
            .map(|(alias, _)| *alias)
            .collect();
        let mut gone = vec![object.clone()];
        gone.extend(aliases.iter().filter_map(|a| maps.objects.remove(a)));
        for (m, p) in gone.iter().flat_map(|o| o.on.iter().enumerate()) {
            if let Presence::Present(h) = p {
                if maps.by_member[m]
                    .get(h)
                    .is_some_and(|v| *v == handle || aliases.contains(v))
                {
                    maps.by_member[m].remove(h);
                }
            }
        }
        Some(object)
    }

    /// Forgets the session objects of a closed virtual session: the
    /// members destroyed them when their sessions closed.
    pub fn remove_owned_by(&self, session: CK_SESSION_HANDLE) {
        let owned: Vec<CK_OBJECT_HANDLE> = self
            .maps
            .read()
            .objects
            .iter()
            .filter(|(_, o)| o.owner == Some(session))
            .map(|(h, _)| *h)
            .collect();
        for handle in owned {
            self.remove(handle);
        }
    }

    /// Forgets every session object: all sessions are gone.
    pub fn remove_all_session_objects(&self) {
        let owned: Vec<CK_OBJECT_HANDLE> = self
            .maps
            .read()
            .objects
            .iter()
            .filter(|(_, o)| o.owner.is_some())
            .map(|(h, _)| *h)
            .collect();
        for handle in owned {
            self.remove(handle);
        }
    }

    /// Forgets everything known of one member's handles, whose numbers mean
    /// nothing after that member restarts.
    pub fn forget_member(&self, member: usize) {
        let mut maps = self.maps.write();
        maps.by_member[member].clear();
        for object in maps.objects.values_mut() {
            object.on[member] = Presence::Unknown;
        }
    }

    /// Forgets which object a member handle stood for (that copy was
    /// removed), so that the object is looked for afresh on that member.
    pub fn forget_copy(&self, member: usize, member_handle: CK_OBJECT_HANDLE) {
        let mut maps = self.maps.write();
        if let Some(handle) = maps.by_member[member].remove(&member_handle) {
            if let Some(object) = maps.objects.get_mut(&handle) {
                object.on[member] = Presence::Unknown;
            }
        }
    }

    /// Marks every `Absent` entry `Unknown` again, after objects were added
    /// to members and an earlier search may now succeed.
    pub fn retry_absent(&self) {
        let mut maps = self.maps.write();
        for object in maps.objects.values_mut() {
            for p in object.on.iter_mut() {
                if *p == Presence::Absent {
                    *p = Presence::Unknown;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unique_and_map_both_ways() {
        let table = ObjectTable::new(2);
        let a = table.insert(vec![Presence::Present(7), Presence::Present(9)], None);
        let b = table.from_member(1, 10);
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(table.from_member(0, 7), a);
        assert_eq!(table.from_member(1, 9), a);
        assert_eq!(table.from_member(1, 10), b);
        assert_eq!(table.presence(b, 0), Some(Presence::Unknown));
        table.set_presence(b, 0, Presence::Present(3));
        assert_eq!(table.from_member(0, 3), b);
        assert_eq!(
            table.remove(a).map(|o| o.on),
            Some(vec![Presence::Present(7), Presence::Present(9)])
        );
        assert_eq!(table.get(a).map(|o| o.owner), None);
        assert_ne!(
            table.from_member(0, 7),
            a,
            "a destroyed handle is never reused"
        );
    }

    #[test]
    fn an_alias_a_search_made_after_a_logout_goes_with_its_object() {
        let table = ObjectTable::new(2);
        let made = table.insert(vec![Presence::Present(7), Presence::Present(9)], None);
        let other = table.from_member(1, 4);
        table.forget_member(1);
        let alias = table.from_member(1, 12);
        table.set_presence(made, 1, Presence::Present(12));
        table.remove(made);
        assert!(table.get(alias).is_none(), "the alias outlived the object");
        assert!(table.get(other).is_some(), "another object went too");
        assert_ne!(table.from_member(1, 12), alias);
    }

    #[test]
    fn session_objects_go_with_their_session() {
        let table = ObjectTable::new(1);
        let mine = table.insert(vec![Presence::Present(1)], Some(5));
        let other = table.insert(vec![Presence::Present(2)], Some(6));
        table.remove_owned_by(5);
        assert!(table.get(mine).is_none());
        assert!(table.get(other).is_some());
    }
}
