//! Waiting for a returning member when none serves: at most once per call,
//! only in the application's sessions, and for a call that makes, changes
//! or destroys objects only at its start.

use super::VirtualSession;

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

impl VirtualSession {
    /// For a call that found no member serving: waits for a returning
    /// member to serve ([`crate::group::Group::wait_for_serving`]), at most once per call
    /// (`waited`), and only in the application's sessions; true if one
    /// serves now, and the call chooses again. Callers hold no lock of the
    /// session; a call making, changing or destroying objects waits only
    /// at its start ([`Self::wait_before_writing`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn wait_for_a_member(&self, waited: &mut bool) -> bool {
        self.waits_for_members
            && !WRITING.get()
            && !std::mem::replace(waited, true)
            && self.group.up_members().next().is_none()
            && self.group.wait_for_serving()
    }

    /// At the start of a call that makes, changes or destroys objects:
    /// with no member serving, waits for a returning one
    /// ([`Self::wait_for_a_member`]) -- here, before the write barrier and
    /// the objects being made, which that member's recovery waits for.
    /// Until the guard drops, the call waits no more: a member that fails
    /// later in it fails it as before.
    pub(crate) fn wait_before_writing(&self) -> Writing {
        self.wait_for_a_member(&mut false);
        Writing(WRITING.replace(true))
    }
}
