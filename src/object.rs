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
    /// The fingerprints it had before each change of its attributes in
    /// this process, oldest first: a member that missed a change may hold
    /// a copy with one of them.
    pub former_prints: Vec<std::sync::Arc<crate::identity::Fingerprint>>,
    /// The table's count of such changes when its last one was made (0:
    /// none), so that a reading of the members taken before it is known
    /// not to say what the object is ([`ObjectTable::changes_so_far`]).
    pub changed_at: u64,
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
    /// Per member: every object holding each member handle as its copy
    /// there (`on[member] == Present(handle)`). Usually one; more where a
    /// search made an alias for a copy the group knew (see
    /// [`ObjectTable::remove`]), which is found here rather than by
    /// scanning every object under the write lock (0.65 ms a removal at
    /// 100,000 objects, `benches/object_table.rs`).
    holders: Vec<HashMap<CK_OBJECT_HANDLE, Vec<CK_OBJECT_HANDLE>>>,
    /// The session objects of each virtual session, so that closing one
    /// reads only its own.
    owned: HashMap<CK_SESSION_HANDLE, Vec<CK_OBJECT_HANDLE>>,
}

/// Which numbering of one member's handles a handle was learned in: one
/// more each time the table forgets the member's handles (it restarted,
/// reconnected, or logged out). A member handle is recorded only in the
/// era it was learned in, taken before the member call that returned it:
/// `p11-kit server` numbers a token's objects per connection, so a handle
/// from before a reconnect names another object after it, and one
/// recorded after the table forgot the member's handles (a lookup that
/// finished as recovery reconnected) made every later call with that key
/// use another key (the soak's `CKR_KEY_FUNCTION_NOT_PERMITTED` on a
/// public key, `CKR_SIGNATURE_LEN_RANGE` and AES decryptions to the
/// wrong plaintext).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Era {
    member: usize,
    count: u64,
}

impl Era {
    pub fn member(self) -> usize {
        self.member
    }
}

impl Maps {
    /// Notes that `object` holds `member_handle` as its copy on `member`.
    fn hold(&mut self, member: usize, member_handle: CK_OBJECT_HANDLE, object: CK_OBJECT_HANDLE) {
        self.holders[member]
            .entry(member_handle)
            .or_default()
            .push(object);
    }

    /// Notes that `object` no longer holds `member_handle` on `member`.
    fn release(
        &mut self,
        member: usize,
        member_handle: CK_OBJECT_HANDLE,
        object: CK_OBJECT_HANDLE,
    ) {
        if let Some(holding) = self.holders[member].get_mut(&member_handle) {
            holding.retain(|o| *o != object);
            if holding.is_empty() {
                self.holders[member].remove(&member_handle);
            }
        }
    }

    /// Records a new object: its copies and its owner.
    fn add(&mut self, handle: CK_OBJECT_HANDLE, object: VirtualObject) {
        for (m, h) in object.copies() {
            self.by_member[m].insert(h, handle);
            self.hold(m, h, handle);
        }
        if let Some(session) = object.owner {
            self.owned.entry(session).or_default().push(handle);
        }
        self.objects.insert(handle, object);
    }
}

pub struct ObjectTable {
    maps: RwLock<Maps>,
    /// Per member: how many times its handles were forgotten ([`Era`]);
    /// changed only under the maps' write lock, so that a write checked
    /// under it cannot meet a forgetting half done.
    eras: Box<[AtomicU64]>,
    /// Changes of objects' attributes made in this process so far
    /// ([`VirtualObject::changed_at`]).
    changes: AtomicU64,
    members: usize,
}

impl ObjectTable {
    pub fn new(members: usize) -> Self {
        ObjectTable {
            maps: RwLock::new(Maps {
                objects: HashMap::default(),
                by_member: vec![HashMap::default(); members],
                holders: vec![HashMap::default(); members],
                owned: HashMap::default(),
            }),
            eras: (0..members).map(|_| AtomicU64::new(0)).collect(),
            changes: AtomicU64::new(0),
            members,
        }
    }

    /// Records a new object with its member handles.
    pub fn insert(&self, on: Vec<Presence>, owner: Option<CK_SESSION_HANDLE>) -> CK_OBJECT_HANDLE {
        debug_assert_eq!(on.len(), self.members);
        let handle = allocate_handle();
        self.maps.write().add(
            handle,
            VirtualObject {
                on,
                owner,
                fingerprint: None,
                protected: false,
                never_extractable: false,
                former_prints: Vec::new(),
                changed_at: 0,
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

    /// [`Self::known`] for a handle learned in `era`: `None` once the
    /// member's handles were forgotten since, when the number may name
    /// another object.
    pub fn known_in(&self, era: Era, member_handle: CK_OBJECT_HANDLE) -> Option<CK_OBJECT_HANDLE> {
        let maps = self.maps.read();
        if self.moved_on(era) {
            return None;
        }
        maps.by_member[era.member].get(&member_handle).copied()
    }

    /// The objects known to be on `member` now.
    pub fn held_by(&self, member: usize) -> Vec<CK_OBJECT_HANDLE> {
        self.maps.read().by_member[member]
            .values()
            .copied()
            .collect()
    }

    /// The member's current [`Era`], to take before a member call whose
    /// handles are to be recorded.
    pub fn era(&self, member: usize) -> Era {
        Era {
            member,
            count: self.eras[member].load(Ordering::Acquire),
        }
    }

    /// Whether the member's handles were forgotten since `era`.
    pub fn moved_on(&self, era: Era) -> bool {
        self.era(era.member) != era
    }

    /// The virtual handle of a member's object learned in `era`, made on
    /// first sight; `None` once the member's handles were forgotten since.
    pub fn from_member(
        &self,
        era: Era,
        member_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        let member = era.member;
        {
            let maps = self.maps.read();
            if self.moved_on(era) {
                return None;
            }
            if let Some(h) = maps.by_member[member].get(&member_handle) {
                return Some(*h);
            }
        }
        let mut maps = self.maps.write();
        if self.moved_on(era) {
            return None;
        }
        if let Some(h) = maps.by_member[member].get(&member_handle) {
            return Some(*h);
        }
        let handle = allocate_handle();
        let mut on = vec![Presence::Unknown; self.members];
        on[member] = Presence::Present(member_handle);
        maps.add(
            handle,
            VirtualObject {
                on,
                owner: None,
                fingerprint: None,
                protected: false,
                never_extractable: false,
                former_prints: Vec::new(),
                changed_at: 0,
            },
        );
        Some(handle)
    }

    /// The virtual handle of a member's object identified by `print` (kept
    /// as its fingerprint if it has none): the one it has, else the one
    /// object of the group it matches whose copy on `member` is not known
    /// yet, else one made now. Without this, once the members'
    /// handles were forgotten (a logout), searches answered by different
    /// members (spares of whichever member is primary at the time) named
    /// one key by two handles. It matches by a former fingerprint too: a
    /// member that missed a change of the object's attributes holds a
    /// copy as it was (simulation seed 29468965: a late copy, made before
    /// its `CKA_ID` was set, found by a search while its member was in
    /// doubt about it, named a second object, which the settled doubt
    /// then gave the same copy).
    pub fn from_member_identified(
        &self,
        era: Era,
        member_handle: CK_OBJECT_HANDLE,
        print: crate::identity::Fingerprint,
    ) -> Option<CK_OBJECT_HANDLE> {
        let member = era.member;
        let mut maps = self.maps.write();
        if self.moved_on(era) {
            return None;
        }
        if let Some(&h) = maps.by_member[member].get(&member_handle) {
            if let Some(object) = maps.objects.get_mut(&h) {
                object
                    .fingerprint
                    .get_or_insert_with(|| std::sync::Arc::new(print));
            }
            return Some(h);
        }
        let mut matching = maps.objects.iter().filter(|(_, o)| {
            o.on[member] == Presence::Unknown
                && (o.fingerprint.iter().chain(&o.former_prints))
                    .any(|p| crate::identity::matches(p, &print))
        });
        if let (Some((&handle, _)), None) = (matching.next(), matching.next()) {
            if let Some(object) = maps.objects.get_mut(&handle) {
                object.on[member] = Presence::Present(member_handle);
            }
            maps.by_member[member].insert(member_handle, handle);
            maps.hold(member, member_handle, handle);
            return Some(handle);
        }
        let handle = allocate_handle();
        let mut on = vec![Presence::Unknown; self.members];
        on[member] = Presence::Present(member_handle);
        maps.add(
            handle,
            VirtualObject {
                on,
                owner: None,
                fingerprint: Some(std::sync::Arc::new(print)),
                protected: false,
                never_extractable: false,
                former_prints: Vec::new(),
                changed_at: 0,
            },
        );
        Some(handle)
    }

    /// Keeps in `objects` the objects whose copy on `member` is not known
    /// yet.
    pub fn keep_unknown_on(
        &self,
        member: usize,
        objects: &mut rustc_hash::FxHashSet<CK_OBJECT_HANDLE>,
    ) {
        let maps = self.maps.read();
        objects.retain(|handle| {
            maps.objects
                .get(handle)
                .is_some_and(|o| o.on[member] == Presence::Unknown)
        });
    }

    pub fn get(&self, handle: CK_OBJECT_HANDLE) -> Option<VirtualObject> {
        self.maps.read().objects.get(&handle).cloned()
    }

    /// The copies of `handle`, each with the era its member handle belongs
    /// to (read together, so a copy is never paired with a later era).
    pub fn copies(&self, handle: CK_OBJECT_HANDLE) -> Vec<(Era, CK_OBJECT_HANDLE)> {
        let maps = self.maps.read();
        let Some(object) = maps.objects.get(&handle) else {
            return Vec::new();
        };
        object
            .copies()
            .map(|(member, h)| (self.era(member), h))
            .collect()
    }

    /// What is known of `handle` on `member`; `None` for an unknown handle.
    pub fn presence(&self, handle: CK_OBJECT_HANDLE, member: usize) -> Option<Presence> {
        self.maps.read().objects.get(&handle).map(|o| o.on[member])
    }

    /// Records what a member call begun in `era` found of `handle` on that
    /// member; false (nothing recorded) once the member's handles were
    /// forgotten since.
    pub fn set_presence(&self, handle: CK_OBJECT_HANDLE, era: Era, presence: Presence) -> bool {
        let member = era.member;
        let mut maps = self.maps.write();
        if self.moved_on(era) {
            return false;
        }
        let Some(object) = maps.objects.get_mut(&handle) else {
            return true;
        };
        let old = std::mem::replace(&mut object.on[member], presence);
        if let Presence::Present(h) = old {
            maps.by_member[member].remove(&h);
            maps.release(member, h, handle);
        }
        if let Presence::Present(h) = presence {
            maps.by_member[member].insert(h, handle);
            maps.hold(member, h, handle);
        }
        true
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

    /// Keeps `after` as the fingerprint of an object whose attributes
    /// changed, and `before` among its former ones.
    pub fn change_fingerprint(
        &self,
        handle: CK_OBJECT_HANDLE,
        before: crate::identity::Fingerprint,
        after: crate::identity::Fingerprint,
    ) {
        if let Some(object) = self.maps.write().objects.get_mut(&handle) {
            object.former_prints.push(std::sync::Arc::new(before));
            object.fingerprint = Some(std::sync::Arc::new(after));
            object.changed_at = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
        }
    }

    /// How many changes of objects' attributes this process has made
    /// ([`VirtualObject::changed_at`]).
    pub fn changes_so_far(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether the attributes of `handle` changed after the first
    /// `changes` of them ([`Self::changes_so_far`]).
    pub fn changed_after(&self, handle: CK_OBJECT_HANDLE, changes: u64) -> bool {
        (self.maps.read().objects.get(&handle)).is_some_and(|o| o.changed_at > changes)
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
        self.kept_prints(|kept| crate::identity::matches(kept, candidate))
    }

    /// The handles on `member`, in `era`, of the group's objects recorded
    /// there whose kept fingerprint a member object with fingerprint
    /// `candidate` matches, each with that fingerprint; empty once the
    /// member's handles were forgotten since.
    pub fn recorded_matched_by(
        &self,
        era: Era,
        candidate: &crate::identity::Fingerprint,
    ) -> Vec<(
        CK_OBJECT_HANDLE,
        std::sync::Arc<crate::identity::Fingerprint>,
    )> {
        let maps = self.maps.read();
        if self.moved_on(era) {
            return Vec::new();
        }
        (maps.objects.values())
            .filter_map(|o| match (o.on[era.member], &o.fingerprint) {
                (Presence::Present(h), Some(kept)) if crate::identity::matches(kept, candidate) => {
                    Some((h, kept.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// The objects of the group whose kept fingerprint has every attribute
    /// of `print`, as it has them: those a member object found by `print`
    /// may be a copy of, with that fingerprint.
    pub fn including(
        &self,
        print: &crate::identity::Fingerprint,
    ) -> Vec<(
        CK_OBJECT_HANDLE,
        std::sync::Arc<crate::identity::Fingerprint>,
    )> {
        self.kept_prints(|kept| crate::identity::matches(print, kept))
    }

    /// The objects of the group whose kept fingerprint `wanted` takes,
    /// with that fingerprint.
    fn kept_prints(
        &self,
        wanted: impl Fn(&crate::identity::Fingerprint) -> bool,
    ) -> Vec<(
        CK_OBJECT_HANDLE,
        std::sync::Arc<crate::identity::Fingerprint>,
    )> {
        self.maps
            .read()
            .objects
            .iter()
            .filter_map(|(handle, o)| {
                let kept = o.fingerprint.as_ref()?;
                wanted(kept).then(|| (*handle, kept.clone()))
            })
            .collect()
    }

    /// Whether `member` holds, by a handle recorded now, or held before its
    /// handles were forgotten (`held_before`), an object of the group that
    /// `returned` lacks and a search for `searched` may find: its kept
    /// fingerprint agrees with every attribute both name, or it has none.
    pub fn holds_unreturned(
        &self,
        member: usize,
        held_before: &rustc_hash::FxHashSet<CK_OBJECT_HANDLE>,
        searched: &crate::identity::Fingerprint,
        returned: &rustc_hash::FxHashSet<CK_OBJECT_HANDLE>,
    ) -> bool {
        let maps = self.maps.read();
        (maps.by_member[member].values())
            .chain(held_before)
            .any(|object| {
                !returned.contains(object)
                    && maps.objects.get(object).is_some_and(|o| {
                        (o.fingerprint.as_ref()).is_none_or(|p| crate::identity::agree(searched, p))
                    })
            })
    }

    /// Whether the group holds a session object: one made in this process
    /// that no longer lives is removed with its session.
    pub fn has_session_objects(&self) -> bool {
        !self.maps.read().owned.is_empty()
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
        let mut aliases: Vec<CK_OBJECT_HANDLE> = object
            .copies()
            .flat_map(|(m, h)| maps.holders[m].get(&h).into_iter().flatten())
            .copied()
            .filter(|alias| *alias != handle)
            .collect();
        aliases.sort_unstable();
        aliases.dedup();
        let mut gone = vec![(handle, object.clone())];
        gone.extend(
            aliases
                .iter()
                .filter_map(|a| maps.objects.remove(a).map(|o| (*a, o))),
        );
        for (gone_handle, o) in &gone {
            for (m, h) in o.copies() {
                maps.release(m, h, *gone_handle);
                if maps.by_member[m]
                    .get(&h)
                    .is_some_and(|v| *v == handle || aliases.contains(v))
                {
                    maps.by_member[m].remove(&h);
                }
            }
            if let Some(session) = o.owner {
                if let Some(owned) = maps.owned.get_mut(&session) {
                    owned.retain(|x| x != gone_handle);
                    if owned.is_empty() {
                        maps.owned.remove(&session);
                    }
                }
            }
        }
        Some(object)
    }

    /// Forgets the session objects of a closed virtual session: the
    /// members destroyed them when their sessions closed.
    pub fn remove_owned_by(&self, session: CK_SESSION_HANDLE) {
        let owned = self.maps.read().owned.get(&session).cloned();
        for handle in owned.into_iter().flatten() {
            self.remove(handle);
        }
    }

    /// Forgets every session object: all sessions are gone.
    pub fn remove_all_session_objects(&self) {
        let owned: Vec<CK_OBJECT_HANDLE> =
            self.maps.read().owned.values().flatten().copied().collect();
        for handle in owned {
            self.remove(handle);
        }
    }

    /// Forgets everything known of one member's handles, whose numbers mean
    /// nothing after that member restarts, and begins its next [`Era`].
    pub fn forget_member(&self, member: usize) {
        let mut maps = self.maps.write();
        self.eras[member].fetch_add(1, Ordering::AcqRel);
        maps.by_member[member].clear();
        maps.holders[member].clear();
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
                let held = std::mem::replace(&mut object.on[member], Presence::Unknown);
                if let Presence::Present(h) = held {
                    maps.release(member, h, handle);
                }
            }
        }
    }

    /// Marks every `Absent` entry `Unknown` again, after objects were added
    /// to members and an earlier search may now succeed; returns each
    /// (member, object) marked.
    pub fn retry_absent(&self) -> Vec<(usize, CK_OBJECT_HANDLE)> {
        let mut maps = self.maps.write();
        let mut marked = Vec::new();
        for (handle, object) in maps.objects.iter_mut() {
            for (member, p) in object.on.iter_mut().enumerate() {
                if *p == Presence::Absent {
                    *p = Presence::Unknown;
                    marked.push((member, *handle));
                }
            }
        }
        marked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ObjectTable {
        /// Fails unless the indexes say what a scan of every object says.
        fn assert_indexes_agree(&self) {
            let maps = self.maps.read();
            let mut holders =
                vec![HashMap::<CK_OBJECT_HANDLE, Vec<CK_OBJECT_HANDLE>>::default(); self.members];
            let mut owned = HashMap::<CK_SESSION_HANDLE, Vec<CK_OBJECT_HANDLE>>::default();
            for (handle, object) in &maps.objects {
                for (m, h) in object.copies() {
                    holders[m].entry(h).or_default().push(*handle);
                }
                if let Some(session) = object.owner {
                    owned.entry(session).or_default().push(*handle);
                }
            }
            let sorted = |map: &HashMap<CK_OBJECT_HANDLE, Vec<CK_OBJECT_HANDLE>>| {
                let mut all: Vec<(CK_OBJECT_HANDLE, Vec<CK_OBJECT_HANDLE>)> = map
                    .iter()
                    .map(|(k, v)| {
                        let mut v = v.clone();
                        v.sort_unstable();
                        (*k, v)
                    })
                    .collect();
                all.sort_unstable();
                all
            };
            for (m, scanned) in holders.iter().enumerate() {
                assert_eq!(sorted(&maps.holders[m]), sorted(scanned), "member {m}");
            }
            assert_eq!(sorted(&maps.owned), sorted(&owned));
        }
    }

    /// Every change of the table, in a seeded order over few member
    /// handles (so that aliases are frequent): the alias and session
    /// indexes agree with a scan of every object after each.
    #[test]
    fn the_indexes_agree_with_a_scan_after_every_change() {
        let table = ObjectTable::new(2);
        let mut state: u64 = 0x5eed;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut handles: Vec<CK_OBJECT_HANDLE> = Vec::new();
        for _ in 0..5_000 {
            let member = next(2) as usize;
            let member_handle = 1 + next(12);
            let pick = |handles: &Vec<CK_OBJECT_HANDLE>, i: u64| {
                handles.get(i as usize % handles.len().max(1)).copied()
            };
            match next(8) {
                0 => {
                    let owner = (next(2) == 0).then(|| 1 + next(3));
                    let mut on = vec![Presence::Unknown; 2];
                    on[member] = Presence::Present(member_handle);
                    handles.push(table.insert(on, owner));
                }
                1 => handles.extend(table.from_member(table.era(member), member_handle)),
                2 => {
                    if let Some(h) = pick(&handles, next(1_000)) {
                        let presence = match next(3) {
                            0 => Presence::Absent,
                            1 => Presence::Unknown,
                            _ => Presence::Present(member_handle),
                        };
                        table.set_presence(h, table.era(member), presence);
                    }
                }
                3 => table.forget_copy(member, member_handle),
                4 if next(20) == 0 => table.forget_member(member),
                5 => {
                    if let Some(h) = pick(&handles, next(1_000)) {
                        table.remove(h);
                    }
                }
                6 => table.remove_owned_by(1 + next(3)),
                7 if next(50) == 0 => table.remove_all_session_objects(),
                _ => {
                    table.retry_absent();
                }
            }
            table.assert_indexes_agree();
        }
    }

    #[test]
    fn handles_are_unique_and_map_both_ways() {
        let table = ObjectTable::new(2);
        let a = table.insert(vec![Presence::Present(7), Presence::Present(9)], None);
        let b = table.from_member(table.era(1), 10).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(table.from_member(table.era(0), 7).unwrap(), a);
        assert_eq!(table.from_member(table.era(1), 9).unwrap(), a);
        assert_eq!(table.from_member(table.era(1), 10).unwrap(), b);
        assert_eq!(table.presence(b, 0), Some(Presence::Unknown));
        assert!(table.set_presence(b, table.era(0), Presence::Present(3)));
        assert_eq!(table.from_member(table.era(0), 3).unwrap(), b);
        assert_eq!(
            table.remove(a).map(|o| o.on),
            Some(vec![Presence::Present(7), Presence::Present(9)])
        );
        assert_eq!(table.get(a).map(|o| o.owner), None);
        assert_ne!(
            table.from_member(table.era(0), 7).unwrap(),
            a,
            "a destroyed handle is never reused"
        );
    }

    #[test]
    fn an_alias_a_search_made_after_a_logout_goes_with_its_object() {
        let table = ObjectTable::new(2);
        let made = table.insert(vec![Presence::Present(7), Presence::Present(9)], None);
        let other = table.from_member(table.era(1), 4).unwrap();
        table.forget_member(1);
        let alias = table.from_member(table.era(1), 12).unwrap();
        assert!(table.set_presence(made, table.era(1), Presence::Present(12)));
        table.remove(made);
        assert!(table.get(alias).is_none(), "the alias outlived the object");
        assert!(table.get(other).is_some(), "another object went too");
        assert_ne!(table.from_member(table.era(1), 12).unwrap(), alias);
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

    #[test]
    fn an_identified_copy_joins_the_one_object_it_matches_after_a_logout() {
        let print = |label: &[u8]| vec![(CKA_LABEL, label.to_vec())];
        let table = ObjectTable::new(2);
        let key = table.insert(vec![Presence::Present(10), Presence::Present(20)], None);
        table.set_fingerprint(key, print(b"key"));
        let twin = table.insert(vec![Presence::Present(11), Presence::Present(21)], None);
        table.set_fingerprint(twin, print(b"twin"));
        let other_twin = table.insert(vec![Presence::Present(12), Presence::Present(22)], None);
        table.set_fingerprint(other_twin, print(b"twin"));
        table.forget_member(0);
        table.forget_member(1);
        // Found again on each member, under new numbers: one handle still.
        assert_eq!(
            table.from_member_identified(table.era(0), 30, print(b"key")),
            Some(key)
        );
        assert_eq!(
            table.from_member_identified(table.era(1), 40, print(b"key")),
            Some(key)
        );
        assert_eq!(
            table.from_member_identified(table.era(0), 30, print(b"key")),
            Some(key)
        );
        // Two objects it could be: a handle of its own, never a guess.
        let found = table.from_member_identified(table.era(0), 31, print(b"twin"));
        assert!(found.is_some_and(|f| ![key, twin, other_twin].contains(&f)));
        table.assert_indexes_agree();
    }

    /// A copy on a member that missed a change of the object's attributes
    /// is the object's, found by the print it had before the change.
    #[test]
    fn an_identified_copy_as_it_was_before_a_change_joins_its_object() {
        let print = |id: &[u8]| vec![(CKA_LABEL, b"key".to_vec()), (CKA_ID, id.to_vec())];
        let table = ObjectTable::new(2);
        let key = table.insert(vec![Presence::Present(10), Presence::Unknown], None);
        table.set_fingerprint(key, print(b""));
        table.change_fingerprint(key, print(b""), print(b"id-1"));
        assert_eq!(
            table.from_member_identified(table.era(1), 20, print(b"")),
            Some(key)
        );
        assert_eq!(table.presence(key, 1), Some(Presence::Present(20)));
        table.assert_indexes_agree();
    }

    /// A handle learned before the member's handles were forgotten (a
    /// lookup that finished while recovery reconnected the member) is not
    /// recorded: on the new connection its number names another object.
    #[test]
    fn a_handle_from_an_earlier_era_is_never_recorded() {
        let table = ObjectTable::new(2);
        let key = table.insert(vec![Presence::Present(10), Presence::Unknown], None);
        table.set_fingerprint(key, vec![(CKA_LABEL, b"key".to_vec())]);
        let before = table.era(1);
        table.forget_member(1);
        assert!(!table.set_presence(key, before, Presence::Present(7)));
        assert_eq!(table.presence(key, 1), Some(Presence::Unknown));
        assert_eq!(table.from_member(before, 7), None);
        let print = vec![(CKA_LABEL, b"key".to_vec())];
        assert_eq!(table.from_member_identified(before, 7, print.clone()), None);
        assert_eq!(table.known(1, 7), None, "nothing names member 1's handle 7");
        let now = table.era(1);
        assert_eq!(table.from_member_identified(now, 8, print), Some(key));
        assert_eq!(table.presence(key, 1), Some(Presence::Present(8)));
        table.assert_indexes_agree();
    }
}
