//! Digests started lazily. A digest whose mechanism takes no key and no
//! parameter has no state on a member until its first input, so
//! `C_DigestInit` only notes the mechanism ([`PendingDigest`]) and a
//! single-part `C_Digest` starts and finishes it on the chosen member in
//! one attempt: no member choice, member call or binding at `C_DigestInit`,
//! and nothing to move when a member fails in between. Any other call on
//! the digest (an update, `C_DigestKey`, a final, `C_GetOperationState`)
//! first starts it on a member as `C_DigestInit` would have
//! ([`VirtualSession::start_pending_digest`]).

use super::{Attempt, Preference, Step, VirtualSession};
use crate::bindings::OpKind;
use crate::error::{check, Error, Result};
use crate::group::Waits;
use crate::mechanism::{BareMechanism, Mechanism};
use crate::member_api::MemberBackend;
use cryptoki_sys::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A session's digest noted by `C_DigestInit` and not yet on any member.
#[derive(Default)]
pub(crate) struct PendingDigest {
    /// Its mechanism + 1; 0: none.
    mechanism: AtomicU64,
    /// The last mechanism without a parameter that a member accepted at an
    /// eager `C_DigestInit` on this session, + 1; 0: none. Only it is
    /// started lazily, so a mechanism no member takes is still refused by
    /// `C_DigestInit` itself.
    accepted: AtomicU64,
}

impl VirtualSession {
    /// `C_DigestInit` without a member call when `raw` was accepted before
    /// on this session and no digest is active; `None`: start it on a
    /// member ([`Self::digest_accepted`] after it succeeds). Reads the
    /// mechanism's type and parameter fields only: one with a parameter is
    /// never started lazily.
    #[inline(always)]
    pub fn digest_init_lazily(&self, raw: &CK_MECHANISM) -> Option<Result<()>> {
        let pending = &self.pending_digest;
        let noted = raw.mechanism.wrapping_add(1);
        let summary = self.summary();
        if pending.accepted.load(Ordering::Relaxed) != noted
            || !raw.pParameter.is_null()
            || raw.ulParameterLen != 0
            || summary.active(OpKind::Digest)
            || summary.lost(OpKind::Digest)
            || summary.restored()
        {
            return self
                .digest_pending()
                .then(|| Err(Error::new(CKR_OPERATION_ACTIVE)));
        }
        Some(
            match pending
                .mechanism
                .compare_exchange(0, noted, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => Ok(()),
                Err(_) => Err(Error::new(CKR_OPERATION_ACTIVE)),
            },
        )
    }

    /// Whether a digest is noted and not yet on a member.
    #[inline(always)]
    fn digest_pending(&self) -> bool {
        self.pending_digest.mechanism.load(Ordering::Relaxed) != 0
    }

    /// Notes that a member accepted `mechanism` at `C_DigestInit`: the
    /// session's next digests with it start lazily, if it has no parameter.
    #[inline(always)]
    pub fn digest_accepted(&self, mechanism: &Mechanism) {
        let raw = mechanism.as_raw();
        if raw.pParameter.is_null() && raw.ulParameterLen == 0 {
            let noted = raw.mechanism.wrapping_add(1);
            let accepted = &self.pending_digest.accepted;
            if accepted.load(Ordering::Relaxed) != noted {
                accepted.store(noted, Ordering::Relaxed);
            }
        }
    }

    /// The pending digest's mechanism, taken: it is the caller's to start.
    #[inline(always)]
    pub fn take_pending_digest(&self) -> Option<CK_MECHANISM_TYPE> {
        if !self.digest_pending() {
            return None;
        }
        let noted = self.pending_digest.mechanism.swap(0, Ordering::Relaxed);
        noted.checked_sub(1)
    }

    /// Starts a pending digest on a member, as `C_DigestInit` would have,
    /// before a call that continues it; nothing when none is pending.
    #[inline(always)]
    pub fn start_pending_digest(&self) -> Result<()> {
        match self.take_pending_digest() {
            Some(type_) => self.start_digest(type_),
            None => Ok(()),
        }
    }

    #[cold]
    #[inline(never)]
    fn start_digest(&self, type_: CK_MECHANISM_TYPE) -> Result<()> {
        let bare = BareMechanism::new(type_);
        let mechanism = bare.checked()?;
        self.init(
            OpKind::Digest,
            Some(&mechanism),
            None,
            "C_DigestInit",
            |l, s, _| l.digest_init(s, mechanism.as_raw()),
        )
    }

    /// `C_Digest` of the pending digest `type_`: the member's
    /// `C_DigestInit` and `C_Digest` (`call`, which gets the mechanism and
    /// whether the init succeeded on this session already) on the chosen
    /// member in one attempt, again on another member if it faults. A
    /// length query or too small a buffer leaves the digest active on that
    /// member, bound as if started there.
    #[inline(always)]
    pub fn digest_at_once(
        &self,
        type_: CK_MECHANISM_TYPE,
        length_query: bool,
        mut call: impl FnMut(&dyn MemberBackend, CK_SESSION_HANDLE, &CK_MECHANISM, &mut bool) -> CK_RV,
    ) -> Result<()> {
        let step = Step::Finish { length_query };
        if self.lane.possible(&self.group) {
            self.start_digest(type_)?;
            let mut started = true;
            let bare = BareMechanism::new(type_);
            return self.step(
                OpKind::Digest,
                step,
                super::Input::None,
                "C_Digest",
                |l, s| call(l, s, bare.as_raw(), &mut started),
            );
        }
        let bare = BareMechanism::new(type_);
        let mut waits = Waits::default();
        loop {
            let position = match self.choose_keyless(Preference::LeastBusy(OpKind::Digest as usize))
            {
                Ok(position) => position,
                Err(_) if self.wait_for_a_member(&mut waits) => continue,
                Err(e) => return Err(e),
            };
            // Whether the member's `C_DigestInit` succeeded on this
            // attempt's session: a retry of the pair (a busy member, a
            // login restored) then repeats only `C_Digest`.
            let mut started = false;
            let answer = self.attempt(position, "C_Digest", &mut |l, s| {
                call(l, s, bare.as_raw(), &mut started)
            });
            let Attempt::Answered(rv) = answer else {
                continue;
            };
            if started && !step.ends_operation(rv) {
                self.bind_started_digest(type_, position);
            }
            return check(rv);
        }
    }

    /// Binds a digest `C_Digest` started on `position` and left active.
    #[cold]
    #[inline(never)]
    fn bind_started_digest(&self, type_: CK_MECHANISM_TYPE, position: usize) {
        let bare = BareMechanism::new(type_);
        if let Ok(mechanism) = bare.checked() {
            self.bindings()
                .start(OpKind::Digest, Some(&mechanism), None, position);
        }
    }

    /// Forgets a pending digest: `C_SetOperationState` replaces every
    /// operation of the session.
    pub fn forget_pending_digest(&self) {
        self.pending_digest.mechanism.store(0, Ordering::Relaxed);
    }
}
