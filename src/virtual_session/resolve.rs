//! A virtual object's handle on one member, found by fingerprint the first
//! time a member is asked for it, and the fingerprints that finding needs.

use super::VirtualSession;
use crate::error::{Error, Result};
use crate::identity;
use crate::object::Presence;
use cryptoki_sys::*;

/// How many times [`VirtualSession::resolve`] looks an object up while the
/// member's handles keep being forgotten under it (a member failing and
/// returning again and again) before it takes the object for absent there.
const LOOKUPS_ACROSS_ERAS: usize = 3;

impl VirtualSession {
    /// The member handle of virtual object `object` on member `position`,
    /// found by fingerprint the first time it is asked for. A lookup that
    /// finished as the member's handles were forgotten (recovery
    /// reconnected it: its handles are numbered anew) is made again, as
    /// its answer may name another object now ([`crate::object::Era`]).
    pub fn resolve(
        &self,
        object: CK_OBJECT_HANDLE,
        position: usize,
    ) -> Result<Option<CK_OBJECT_HANDLE>> {
        let objects = &self.group.objects;
        for _ in 0..LOOKUPS_ACROSS_ERAS {
            let era = objects.era(position);
            match objects.presence(object, position) {
                None => return Err(Error::new(CKR_OBJECT_HANDLE_INVALID)),
                Some(Presence::Present(h)) => return Ok(Some(h)),
                Some(Presence::Absent) => return Ok(None),
                Some(Presence::Unknown) => {}
            }
            let Some(print) = self.fingerprint_of(object) else {
                return Ok(None);
            };
            let Ok(mut found) = self.group.look_up(position, &print) else {
                return Ok(None);
            };
            if found.len() > 1 && !identity::has_check_value(&print) {
                // A light fingerprint named more than one object: the
                // check value may tell them apart.
                if let Some(full) = self.full_fingerprint(object) {
                    found = self.group.look_up(position, &full).unwrap_or_default();
                }
            }
            let presence = match found.as_slice() {
                [one] => Presence::Present(*one),
                _ => Presence::Absent,
            };
            if objects.set_presence(object, era, presence) {
                return Ok(match presence {
                    Presence::Present(h) => Some(h),
                    _ => None,
                });
            }
        }
        Ok(None)
    }

    /// The object's fingerprint: kept, or read now from a member that is up
    /// and holds it (and then kept).
    pub fn fingerprint_of(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Option<std::sync::Arc<identity::Fingerprint>> {
        if let Some(print) = self.group.objects.get(object)?.fingerprint {
            return Some(print);
        }
        let print = self.read_fingerprint(object)?;
        self.group.objects.set_fingerprint(object, print);
        self.group.objects.get(object)?.fingerprint
    }

    /// The object's full fingerprint, read from the first serving member
    /// that knows the object.
    fn read_fingerprint(&self, object: CK_OBJECT_HANDLE) -> Option<identity::Fingerprint> {
        let objects = &self.group.objects;
        // Taken before the handles are: a read after a member's handles
        // were forgotten read whatever holds the number now.
        let eras: Vec<_> = (0..self.group.members.len())
            .map(|m| objects.era(m))
            .collect();
        let entry = objects.get(object)?;
        let sources = entry.on.iter().enumerate().filter_map(|(m, p)| match p {
            Presence::Present(h) if self.group.members[m].is_up() => Some((m, *h)),
            _ => None,
        });
        for (source, handle) in sources {
            let read = self.on_member(source, |s| {
                identity::fingerprint(&*s.library, s.handle, handle)
            });
            if let Ok(Some(print)) = read {
                if !objects.moved_on(eras[source]) {
                    return Some(print);
                }
            }
        }
        None
    }

    /// The object's full fingerprint (with its check value), read from a
    /// serving member that knows the object, and kept.
    pub(super) fn full_fingerprint(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Option<identity::Fingerprint> {
        let print = self.read_fingerprint(object)?;
        self.group
            .objects
            .replace_fingerprint(object, print.clone());
        Some(print)
    }

    /// Reads and keeps the fingerprint of an object first seen on member
    /// `position`, while that member is known to be alive; `public_value`,
    /// the length of the `CKA_VALUE` the object was made with where its
    /// template named a public class ([`identity::fingerprint_of_public`]).
    pub fn remember_fingerprint(
        &self,
        object: CK_OBJECT_HANDLE,
        position: usize,
        handle: CK_OBJECT_HANDLE,
        public_value: Option<usize>,
    ) {
        if self.group.objects.has_fingerprint(object) {
            return;
        }
        let read = self.on_member(position, |s| match public_value {
            Some(len) => identity::fingerprint_of_public(&*s.library, s.handle, handle, len),
            None => identity::fingerprint(&*s.library, s.handle, handle),
        });
        // Unless the member's handles were forgotten meanwhile (then
        // `handle` may have named another object when read).
        let current =
            self.group.objects.presence(object, position) == Some(Presence::Present(handle));
        if let (Ok(Some(print)), true) = (read, current) {
            self.group.objects.set_fingerprint(object, print);
        }
    }
}
