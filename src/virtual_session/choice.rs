//! Which member runs a call: the one the session's operations are bound
//! to, else the first serving member, in the call's order of preference,
//! that holds every key the call names.

use super::{VirtualSession, STATELESS_LANE};
use crate::error::{Error, Result};
use crate::group::Positions;
use crate::object::{Era, Presence};
use cryptoki_sys::*;
use smallvec::{smallvec, SmallVec};

/// Member handles of the keys a call names; inline, being on every
/// operation's path.
pub type Handles = SmallVec<[CK_OBJECT_HANDLE; 4]>;

/// Which serving member a call would rather run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// Spread load: crypto goes to the least busy member; ties rotate
    /// within the given lane.
    LeastBusy(usize),
    /// Object-making calls where the members are not alike as makers go
    /// to the primary while it is up and not degraded.
    Primary,
    /// Searches not every member answers alike: as [`Preference::Primary`],
    /// but members lacking objects of the group last.
    Complete,
    /// Searches every serving member answers alike: as
    /// [`Preference::LeastBusy`], but not on a member lacking objects of
    /// the group by the time it is chosen -- one that came to serve first
    /// since the search found every member alike, which would miss what it
    /// is owed -- while another lacks none.
    Spread(usize),
    /// A search that waited on this member for the kept objects it may
    /// find ([`VirtualSession::wait_for_kept_matches`]): it runs there
    /// unless a member lacking nothing serves now, else as
    /// [`Preference::Complete`]. Chosen again after the wait, a
    /// member that came to serve meanwhile, owing the same objects, ran
    /// it (the soak's "found 0 objects, expected 2").
    WaitedOn(usize),
}

impl VirtualSession {
    /// Chooses the member for a new operation or a stateless call: the
    /// member already bound to this session's operations, else a serving
    /// member on which every key in `keys` exists, in order of
    /// `preference`. Returns the member, the member handles of `keys`, and
    /// the era of the member's handles they were found in, taken before
    /// ([`VirtualSession::attempt_keyed`]).
    ///
    /// The first choice is made without listing every candidate: it
    /// almost always holds the keys.
    #[inline(always)]
    pub fn choose(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
    ) -> Result<(usize, Handles, Era)> {
        let (first, bound) = match self.bound_member() {
            Some(m) if self.group.members[m].is_up() => (Some(m), true),
            Some(m) => return self.choose_after_moving(m, keys, preference),
            None => (self.first_candidate(preference), false),
        };
        let Some(first) = first else {
            return Err(Error::new(CKR_DEVICE_ERROR));
        };
        let era = self.group.objects.era(first);
        if keys.is_empty() {
            return Ok((first, Handles::new(), era));
        }
        if let Some(handles) = self.known_on(keys, first) {
            return Ok((first, handles, era));
        }
        if !bound && preference == Preference::LeastBusy(STATELESS_LANE) {
            if let Some(known) = self.known_elsewhere(keys) {
                return Ok(known);
            }
        }
        if let Some(handles) = self.resolve_all(keys, first)? {
            return Ok((first, handles, era));
        }
        if bound {
            return Err(Error::new(CKR_KEY_HANDLE_INVALID));
        }
        self.choose_among(keys, self.candidates(preference))
    }

    /// [`Self::choose`] for a call that names no key (random numbers, a
    /// digest): the member alone, without a list of handles to carry back
    /// on the path of every such call.
    #[inline(always)]
    pub fn choose_keyless(&self, preference: Preference) -> Result<usize> {
        let first = match self.bound_member() {
            Some(m) if self.group.members[m].is_up() => Some(m),
            Some(m) => {
                return self
                    .choose_after_moving(m, &[], preference)
                    .map(|(m, ..)| m)
            }
            None => self.first_candidate(preference),
        };
        first.ok_or(Error::new(CKR_DEVICE_ERROR))
    }

    /// The member handles of `keys` on `position` where every one is
    /// known there already (no lookup): the path of almost every call.
    #[inline(always)]
    fn known_on(&self, keys: &[CK_OBJECT_HANDLE], position: usize) -> Option<Handles> {
        keys.iter()
            .map(|k| match self.group.objects.presence(*k, position) {
                Some(Presence::Present(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// For a stateless call whose first choice would have to look an
    /// object up: a serving member where every object is known already.
    /// Any member answers such a call alike, and an application reading
    /// the objects it just found (a keystore load) then costs no lookup
    /// on the other members at all.
    #[cold]
    fn known_elsewhere(&self, keys: &[CK_OBJECT_HANDLE]) -> Option<(usize, Handles, Era)> {
        self.group.serving_members().into_iter().find_map(|m| {
            let era = self.group.objects.era(m.position);
            Some((m.position, self.known_on(keys, m.position)?, era))
        })
    }

    /// [`Self::choose`] for a session whose operations were bound to the
    /// failed member `from`: they move first.
    #[cold]
    fn choose_after_moving(
        &self,
        from: usize,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
    ) -> Result<(usize, Handles, Era)> {
        // With no member serving they could not move, and this call cannot
        // wait for one on their behalf: they stay bound to `from`, as when
        // it failed, and move once a member serves -- this call's next
        // choice, after it waited, or their own next call. Moved here, a
        // buffered digest was lost to a call of another kind made while
        // every member was out, and its `C_DigestFinal` failed at once
        // (simulation seed 12094270).
        if self.group.up_members().next().is_none() {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        self.move_operations_unless_stuck(from);
        // Operations that could not move stay bound to `from` (lost only
        // where one was begun elsewhere): a call of another kind goes
        // where it can (chosen there, a key
        // generated on a session whose signature was lost went to the failed
        // member again and again, simulation seed 6182).
        let candidates = match self.bound_member() {
            Some(moved) if self.group.members[moved].is_up() => smallvec![moved],
            _ => self.candidates(preference),
        };
        self.choose_among(keys, candidates)
    }

    /// [`Self::choose`] after the members in `refused` answered the call
    /// `CKR_MECHANISM_INVALID`: the next candidate holding every key,
    /// whatever the session's operations are bound to. A library may list
    /// a mechanism and refuse it (p11-kit 0.24's client lists the AES
    /// key-wrap mechanisms and cannot send them), so the refusal is the
    /// member's while another member may take the mechanism, and the
    /// application's once none is left to ask.
    #[cold]
    pub fn choose_besides(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        preference: Preference,
        refused: &[usize],
    ) -> Result<(usize, Handles, Era)> {
        let candidates: Positions = (self.candidates(preference).into_iter())
            .filter(|p| !refused.contains(p))
            .collect();
        if candidates.is_empty() {
            return Err(Error::new(CKR_MECHANISM_INVALID));
        }
        self.choose_among(keys, candidates).map_err(|e| match e.rv {
            CKR_KEY_HANDLE_INVALID => Error::new(CKR_MECHANISM_INVALID),
            _ => e,
        })
    }

    /// The first of `candidates` on which every key in `keys` exists.
    fn choose_among(
        &self,
        keys: &[CK_OBJECT_HANDLE],
        candidates: Positions,
    ) -> Result<(usize, Handles, Era)> {
        let Some(&first) = candidates.first() else {
            return Err(Error::new(CKR_DEVICE_ERROR));
        };
        if keys.is_empty() {
            return Ok((first, Handles::new(), self.group.objects.era(first)));
        }
        for position in candidates {
            let era = self.group.objects.era(position);
            if let Some(handles) = self.resolve_all(keys, position)? {
                return Ok((position, handles, era));
            }
        }
        Err(Error::new(CKR_KEY_HANDLE_INVALID))
    }

    /// The member handles of `keys` on member `position`; `None` if one
    /// of them is not there.
    #[inline(always)]
    fn resolve_all(&self, keys: &[CK_OBJECT_HANDLE], position: usize) -> Result<Option<Handles>> {
        let mut handles = Handles::new();
        for key in keys {
            match self.resolve(*key, position)? {
                Some(h) => handles.push(h),
                None => return Ok(None),
            }
        }
        Ok(Some(handles))
    }

    /// The member [`Self::candidates`] would list first.
    #[inline(always)]
    fn first_candidate(&self, preference: Preference) -> Option<usize> {
        match preference {
            Preference::LeastBusy(lane) => self.group.least_busy(lane),
            Preference::Primary => self.group.by_position().first().copied(),
            Preference::Complete => self
                .group
                .complete_first(self.group.by_position())
                .first()
                .copied(),
            Preference::Spread(lane) => match self.group.least_busy(lane) {
                Some(p) if !self.group.lacks_objects(p) => Some(p),
                _ => self.candidates(preference).first().copied(),
            },
            Preference::WaitedOn(_) => self.candidates(preference).first().copied(),
        }
    }

    fn candidates(&self, preference: Preference) -> Positions {
        match preference {
            Preference::LeastBusy(lane) => self.group.by_preference(lane),
            Preference::Primary => self.group.by_position(),
            Preference::Complete => self.group.complete_first(self.group.by_position()),
            Preference::Spread(lane) => self.group.complete_first(self.group.by_preference(lane)),
            Preference::WaitedOn(member) => {
                let mut order = self.group.complete_first(self.group.by_position());
                // A member lacking nothing, come to serve meanwhile, beats
                // the one waited on, which may lack more than it waited for.
                if order.first().is_some_and(|p| !self.group.lacks_objects(*p)) {
                    return order;
                }
                if let Some(at) = order.iter().position(|p| *p == member) {
                    order[..=at].rotate_right(1);
                }
                order
            }
        }
    }
}
