//! Waiting for a returning member when none serves: at most
//! `memberTimeout` in all per call (`Waits`), only in the application's
//! sessions, and for a call that makes, changes or destroys objects only
//! outside its write.

use super::VirtualSession;
use crate::error::Error;
use crate::group::Waits;
use cryptoki_sys::{CKR_KEY_HANDLE_INVALID, CK_OBJECT_HANDLE};

thread_local! {
    /// Set while this thread runs a call that makes, changes or destroys
    /// objects (see [`VirtualSession::wait_before_writing`]).
    static WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A call that makes, changes or destroys objects is under way on this
/// thread; holds what was set before it.
pub(crate) struct Writing(bool);

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.set(self.0);
    }
}

/// Marks this thread, until the guard drops, as running a member's part of
/// another thread's call that makes objects ([`Writing`]): inside that
/// call's write, it waits for no returning member either.
pub(crate) fn part_of_a_write() -> Writing {
    Writing(WRITING.replace(true))
}

impl VirtualSession {
    /// For a call that found no member serving: waits for a returning
    /// member to serve ([`crate::group::Group::wait_for_serving`]), within
    /// the call's `waits` (one `memberTimeout` for all its waits), and only
    /// in the application's sessions; true if one serves now, and the call
    /// chooses again. Callers hold no lock of the session; a call making,
    /// changing or destroying objects waits only outside its write
    /// ([`Self::wait_before_writing`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_for_a_member(&self, waits: &mut Waits) -> bool {
        self.group.up_members().next().is_none() && self.serving_again(waits)
    }

    /// After [`Self::choose`] failed with `error`: waits for a member to
    /// serve ([`Self::wait_for_a_member`]) or, for a key on no serving
    /// member, for the keys the call names to be made on the one serving
    /// first ([`Self::wait_for_kept_keys`]); true if the call chooses again.
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_to_choose_again(
        &self,
        error: &Error,
        keys: &[CK_OBJECT_HANDLE],
        waits: &mut Waits,
    ) -> bool {
        self.wait_for_a_member(waits)
            || (error.rv == CKR_KEY_HANDLE_INVALID && self.wait_for_kept_keys(keys, waits))
    }

    /// After a try that found no member serving: true if one serves now,
    /// or once one returns within the call's `waits` (as
    /// [`Self::wait_for_a_member`]), and the call tries again.
    #[cold]
    #[inline(never)]
    pub(crate) fn serving_again(&self, waits: &mut Waits) -> bool {
        self.waits_for_members && !WRITING.get() && self.group.wait_for_serving(waits)
    }

    /// For a call that found a key it names on no serving member: where a
    /// member serves first after an outage and is given the objects it
    /// missed right after, waits for the keys to be made there
    /// ([`crate::group::Group::wait_for_kept`]), within the call's
    /// `waits`, and only in the application's sessions, outside a write;
    /// true if it waited, and the call chooses again.
    #[cold]
    #[inline(never)]
    pub(super) fn wait_for_kept_keys(&self, keys: &[CK_OBJECT_HANDLE], waits: &mut Waits) -> bool {
        self.waits_for_members
            && !WRITING.get()
            && !keys.is_empty()
            && self
                .group
                .serving_members()
                .into_iter()
                .any(|m| self.group.wait_for_kept(m.position, keys, waits))
    }

    /// For a search while every serving member is owed changes: waits on
    /// the member it will run on, the first in [`Group::complete_first`]'s
    /// order, for the kept objects it may find there
    /// ([`Self::wait_for_kept_matches_on`]), and returns that member, where
    /// the search then runs ([`super::Preference::WaitedOn`]).
    ///
    /// [`Group::complete_first`]: crate::group::Group::complete_first
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_for_kept_matches(
        &self,
        searched: &crate::arguments::Template,
    ) -> Option<usize> {
        let home = *self
            .group
            .complete_first(self.group.by_position())
            .first()?;
        self.wait_for_kept_matches_on(home, searched);
        Some(home)
    }

    /// For a search about to run on member `home`: waits, as
    /// [`Self::wait_for_kept_keys`], for the objects on their way there that
    /// the search may find -- those whose fingerprint does not rule it out
    /// -- made first. Searching at once, the soak's searches right after
    /// such a return found 0 of their 1 or 2 objects.
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_for_kept_matches_on(
        &self,
        home: usize,
        searched: &crate::arguments::Template,
    ) {
        if !self.waits_for_members || WRITING.get() {
            return;
        }
        let may_be_found: Vec<_> = (self.group.kept_on_the_way(home))
            .into_iter()
            .filter(|o| self.may_be_found(searched, *o))
            .collect();
        if !may_be_found.is_empty() {
            self.group
                .wait_for_kept(home, &may_be_found, &mut Waits::default());
        }
    }

    /// Whether a search for `searched` may find `object`: its kept
    /// fingerprint, if any, has no other value for an attribute searched.
    fn may_be_found(
        &self,
        searched: &crate::arguments::Template,
        object: CK_OBJECT_HANDLE,
    ) -> bool {
        let Some(print) = self.group.objects.get(object).and_then(|e| e.fingerprint) else {
            return true;
        };
        searched.values().all(|(kind, value)| {
            print
                .iter()
                .find(|(t, _)| *t == kind)
                .is_none_or(|(_, v)| v.as_slice() == value)
        })
    }

    /// At the start of a call that makes, changes or destroys objects (or
    /// of its next try, `waits` shared between them): with no member
    /// serving, waits for a returning one ([`Self::wait_for_a_member`]) --
    /// here, before the write barrier and the objects being made, which
    /// that member's recovery waits for. Until the guard drops, the call
    /// waits no more.
    pub(crate) fn wait_before_writing(&self, waits: &mut Waits) -> Writing {
        self.wait_for_a_member(waits);
        Writing(WRITING.replace(true))
    }
}
