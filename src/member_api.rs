//! The safe boundary between the HA core and a member token: [`MemberApi`],
//! one method for each PKCS#11 function the core calls on a member, taking
//! Rust values instead of C pointers, and its implementation over a loaded
//! library ([`MemberLibrary`]), the one place that turns those values back
//! into C arguments. A simulated member implements the same trait in
//! memory, so the core can be driven without `dlopen`.
//!
//! The conventions, the same for every method:
//! - The answer is the member's own `CK_RV`, unchanged: the group
//!   classifies it ([`crate::member::classify`]), and some answers carry
//!   data beside a failure (the length needed with `CKR_BUFFER_TOO_SMALL`,
//!   attribute lengths with `CKR_ATTRIBUTE_SENSITIVE`), so outputs go
//!   through `&mut` whatever the answer.
//! - `None` for an array or a buffer is C's NULL (a length query, or the
//!   application's own NULL passed on, which a member may answer
//!   differently from an empty array); `Some` of an empty slice is not.
//! - An output buffer's room is the smaller of its length and `*len`, so a
//!   member can never be told of more room than the slice has.
//! - Attributes and mechanisms keep the C layout the member reads: each
//!   `pValue` and `pParameter` must point at as many bytes as its length
//!   says for the call (those the core holds come from
//!   [`crate::arguments`] and [`crate::mechanism`], which check that).

use crate::error::{check, Result};
use crate::member::{
    member_call, CallCounts, FreshCheck, Lane, MemberLibrary, Silent, Unanswered, Write,
};
use cryptoki_sys::*;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A member token library as the HA core calls it. Every call is counted
/// and its answer classified by the implementation (for a loaded library,
/// [`MemberLibrary::call`]). A function a member does not implement
/// answers `CKR_FUNCTION_NOT_SUPPORTED`, as a library whose function list
/// has no entry for it does.
#[allow(unused_variables)]
pub trait MemberApi {
    fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        session: &mut CK_SESSION_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn close_session(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn close_all_sessions(&self, slot: CK_SLOT_ID) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn get_session_info(&self, session: CK_SESSION_HANDLE, info: &mut CK_SESSION_INFO) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn login(
        &self,
        session: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn logout(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn init_pin(&self, session: CK_SESSION_HANDLE, pin: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn set_pin(&self, session: CK_SESSION_HANDLE, old: Option<&[u8]>, new: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn init_token(&self, slot: CK_SLOT_ID, pin: Option<&[u8]>, label: &[u8; 32]) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn get_object_size(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        size: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    /// Each attribute's buffer (its `pValue`, or none for a length query)
    /// receives its value and each length its answer.
    fn get_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&mut [CK_ATTRIBUTE]>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn set_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn find_objects_init(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn find_objects(
        &self,
        session: CK_SESSION_HANDLE,
        found: Option<&mut [CK_OBJECT_HANDLE]>,
        count: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn find_objects_final(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn encrypt_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn digest_init(&self, session: CK_SESSION_HANDLE, mechanism: &CK_MECHANISM) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn verify_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_recover_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn verify_recover_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn encrypt(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn digest(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_recover(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn verify_recover(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn encrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn digest_encrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt_digest_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_encrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt_verify_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn digest_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn verify_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn digest_key(&self, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    /// `C_DigestInit` with `mechanism` unless `*started`, which its
    /// success sets, then `C_Digest`: a digest started and finished in one
    /// member call where the library can (a loaded library counts the pair
    /// once). Its answer is the init's failure or the digest's.
    #[allow(clippy::too_many_arguments)]
    fn digest_init_and_digest(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        started: &mut bool,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        if !*started {
            let rv = self.digest_init(session, mechanism);
            if rv != CKR_OK {
                return rv;
            }
            *started = true;
        }
        self.digest(session, input, output, output_len)
    }

    fn encrypt_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn decrypt_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn digest_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn sign_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn verify(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn verify_final(&self, session: CK_SESSION_HANDLE, signature: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    #[allow(clippy::too_many_arguments)]
    fn generate_key_pair(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        public_template: Option<&[CK_ATTRIBUTE]>,
        private_template: Option<&[CK_ATTRIBUTE]>,
        public_key: &mut CK_OBJECT_HANDLE,
        private_key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        wrapped: Option<&mut [u8]>,
        wrapped_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    #[allow(clippy::too_many_arguments)]
    fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: Option<&[u8]>,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    /// `key` is `None` for mechanisms that return their keys inside the
    /// parameter (TLS key-and-MAC derivation).
    fn derive_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        base_key: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        key: Option<&mut CK_OBJECT_HANDLE>,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn seed_random(&self, session: CK_SESSION_HANDLE, seed: Option<&[u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn generate_random(&self, session: CK_SESSION_HANDLE, random: Option<&mut [u8]>) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    fn get_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&mut [u8]>,
        state_len: &mut CK_ULONG,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    fn set_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&[u8]>,
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    /// The slots, with a token present only when `token_present`.
    fn slot_list(&self, token_present: CK_BBOOL) -> Result<Vec<CK_SLOT_ID>>;
    fn slot_info(&self, slot: CK_SLOT_ID) -> Result<CK_SLOT_INFO>;
    fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO>;
    fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>>;
    fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO>;
    /// Initialises the library for OS locking (see
    /// [`MemberLibrary::initialize`]).
    fn initialize(&self) -> Result<()>;
    /// Finalises the library if we initialised it.
    fn finalize(&self);
}

/// Anything a caller holds around the calls a backend makes for it (the
/// group's count of the member's calls in flight), dropped when they end.
pub trait Held {}
impl<T: ?Sized> Held for T {}

/// A spare instance of a member's library taken for a virtual session's
/// operations (a *lane*), from their `*Init` to their end, on the spare's
/// own session on the member's slot; what the core needs of it. Handed
/// back idle with its session by [`SpareLane::finish`]; dropped otherwise
/// (an operation may still be active on its session), its session is
/// forgotten, so no later lane meets that operation, and closed by the
/// spare's next holder while its connection lives.
/// What the spare knows (its login, the handles found there) lives as long
/// as its session: closing a token's last session logs it out and may
/// renumber its objects.
pub trait SpareLane: Send {
    /// The spare instance, for member calls on [`Self::session`].
    fn library(&self) -> &dyn MemberBackend;
    /// The spare's session on the member's slot.
    fn session(&self) -> CK_SESSION_HANDLE;
    /// The spare's connection the session was opened on
    /// ([`crate::member::on_connection`]).
    fn connection(&self) -> u64;
    /// The handle here of virtual object `object`, whose handle on the
    /// member's own session is `first_handle`, if it was found here for
    /// that handle before.
    fn known_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE>;
    /// Records that `object` (`first_handle` on the member's own session)
    /// is `here` on this spare.
    fn remember_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
        here: CK_OBJECT_HANDLE,
    );
    /// What a search on this spare found as `here` stands for, if it was
    /// identified before: (virtual handle, handle on the member's own
    /// session), or `Some(None)` for an object hidden from the application.
    fn known_found(
        &self,
        here: CK_OBJECT_HANDLE,
    ) -> Option<Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>>;
    /// Records what the object `here` on this spare stands for.
    fn remember_found(
        &self,
        here: CK_OBJECT_HANDLE,
        stands_for: Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    );
    /// Whether the spare is logged in on the lane's slot.
    fn logged_in(&self) -> bool;
    /// Forgets that the spare is logged in: it answered that it is not.
    fn forget_login(&self);
    /// Logs the spare in with `log_in`, which answers `None` when the group
    /// is not logged in. It is asked under a lock the group's logout of the
    /// spares ([`MemberBackend::log_out_spares`]) takes too, so that no
    /// spare is left logged in after the group logged out. True when the
    /// spare is logged in afterwards.
    fn log_in(
        &self,
        log_in: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> Option<CK_RV>,
    ) -> bool;
    /// Leaves `session`, another session opened on the lane's spare (a
    /// replay's read-write one) that its holder gives up without closing,
    /// to be closed as the lane's own is when the lane is dropped.
    fn leave_session(&self, session: CK_SESSION_HANDLE);
    /// Hands the spare back with its session, no operation being active
    /// on it any more.
    fn finish(self: Box<Self>);
    /// Closes the lane's session (an operation may be active on it) and
    /// hands the spare back: for a member in service.
    fn close(self: Box<Self>);
}

impl SpareLane for Lane {
    fn library(&self) -> &dyn MemberBackend {
        Lane::library(self)
    }

    fn session(&self) -> CK_SESSION_HANDLE {
        self.session
    }

    fn connection(&self) -> u64 {
        self.connection
    }

    fn known_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
    ) -> Option<CK_OBJECT_HANDLE> {
        Lane::known_key(self, object, first_handle)
    }

    fn remember_key(
        &self,
        object: CK_OBJECT_HANDLE,
        first_handle: CK_OBJECT_HANDLE,
        here: CK_OBJECT_HANDLE,
    ) {
        Lane::remember_key(self, object, first_handle, here)
    }

    fn known_found(
        &self,
        here: CK_OBJECT_HANDLE,
    ) -> Option<Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>> {
        Lane::known_found(self, here)
    }

    fn remember_found(
        &self,
        here: CK_OBJECT_HANDLE,
        stands_for: Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>,
    ) {
        Lane::remember_found(self, here, stands_for)
    }

    fn logged_in(&self) -> bool {
        Lane::logged_in(self)
    }

    fn forget_login(&self) {
        Lane::forget_login(self)
    }

    fn log_in(
        &self,
        log_in: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> Option<CK_RV>,
    ) -> bool {
        Lane::log_in(self, |library, session| log_in(library, session))
    }

    fn leave_session(&self, session: CK_SESSION_HANDLE) {
        Lane::leave_session(self, session)
    }

    fn finish(self: Box<Self>) {
        Lane::finish(*self)
    }

    fn close(self: Box<Self>) {
        Lane::close(*self)
    }
}

/// A search for a token run where a hung library cannot stall the caller.
pub type TokenSearch = Box<dyn FnOnce(&dyn MemberBackend) -> Option<CK_SLOT_ID> + Send>;

/// Which of Luna's extension functions a library exports beside PKCS#11:
/// none for any other library.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LunaExtensions {
    /// `CA_GetFunctionList`: the library is Luna's.
    pub luna: bool,
    /// `CA_MigrateKeys`.
    pub migrate_keys: bool,
    /// `CA_CloneObject`.
    pub clone_object: bool,
    /// `CA_GetContainerPolicySetting`.
    pub container_policy: bool,
}

/// A member library as the HA core holds it: its PKCS#11 functions
/// ([`MemberApi`]) and the library-level facts and calls the group,
/// replication and recovery need. Each default is what a library in this
/// process that never disconnects answers: one connection, no network, no
/// instance pool, no Luna extensions.
#[allow(unused_variables)]
pub trait MemberBackend: MemberApi + Send + Sync {
    /// The library's name in the config, for the operator.
    fn name(&self) -> &str;

    /// The current connection's number: a session belongs to the
    /// connection it was opened on ([`crate::member::on_connection`]).
    fn connection(&self) -> u64 {
        0
    }
    /// Whether the library talks to a server (its calls are timed).
    fn is_networked(&self) -> bool {
        false
    }
    /// Whether a request whose call faulted may still be carried out after
    /// the fault: a server that received it before its connection failed
    /// carries it out though its answer cannot come back (p11-kit's worker
    /// does). An object such a call was making is in doubt on the member
    /// for a while ([`crate::group::Doubt::Faulted`]).
    fn may_carry_out_after_fault(&self) -> bool {
        self.is_networked()
    }
    /// The longest `function` took on the wire lately, where the library
    /// keeps that ([`crate::member::round_trips`]; network libraries).
    fn usual_round_trip(&self, _function: &str) -> Option<std::time::Duration> {
        None
    }
    /// Makes `counts` (a group member's) the counts of the token in `slot`
    /// for calls outside the group (pass-through sessions).
    fn count_slot_as(&self, slot: CK_SLOT_ID, counts: &Arc<CallCounts>) {}

    /// Whether the library has spare instances (p11-kit's client); fixed
    /// for the library's life ([`MemberSession::spares`]).
    fn has_spares(&self) -> bool {
        false
    }
    /// Runs `call` on an idle spare instance's session on `slot`, with what
    /// `begin` returns held around it; `None`: no spare, the caller uses
    /// its own session (see [`MemberLibrary::on_spare`]).
    fn on_spare<'g>(
        &self,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<CK_RV> {
        None
    }
    /// Takes an idle spare instance as a [`SpareLane`] on `slot` (see
    /// [`MemberLibrary::take_lane`]); `None`: no spare.
    fn take_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        None
    }
    /// [`MemberBackend::take_lane`] from the spares connected already (see
    /// [`MemberLibrary::take_connected_lane`]); `None`: none is.
    fn take_connected_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        None
    }
    /// Logs every spare instance out of `slot`: the group logged out.
    fn log_out_spares(&self, slot: CK_SLOT_ID) {}
    /// Closes the sessions lanes left unfinished on idle spares (see
    /// [`MemberLibrary::close_forgotten_lanes`]).
    fn close_forgotten_lanes(&self) {}

    /// The Luna extensions the library exports.
    fn luna_extensions(&self) -> LunaExtensions {
        LunaExtensions::default()
    }
    /// `CA_MigrateKeys` of one `object` from `source` to `target` (two
    /// sessions of this library): the call's answer, the handle made and
    /// the object's own answer in `migrated` and `object_rv`.
    fn migrate_key(
        &self,
        source: CK_SESSION_HANDLE,
        target: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        migrated: &mut CK_OBJECT_HANDLE,
        object_rv: &mut CK_RV,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    /// `CA_CloneObject` of `object` from `source` to `target`.
    fn clone_object(
        &self,
        target: CK_SESSION_HANDLE,
        source: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        cloned: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }
    /// `CA_GetContainerPolicySetting` of the partition in `slot`.
    fn container_policy(&self, slot: CK_SLOT_ID, policy: CK_ULONG, value: &mut CK_ULONG) -> CK_RV {
        CKR_FUNCTION_NOT_SUPPORTED
    }

    /// Whether the library may be called now (initialised, no
    /// initialisation of ours stuck).
    fn usable(&self) -> bool {
        true
    }
    /// Whether we initialised it, and so may finalise and initialise it
    /// again to reconnect it.
    fn initialized_by_us(&self) -> bool {
        false
    }
    /// Reconnects the library: finalises and initialises it again.
    fn reinitialize(&self) -> Result<()> {
        self.finalize();
        self.initialize()
    }
    /// Cuts the connection under calls stuck on a stalled server; how many
    /// sockets were shut down.
    fn sever(&self) -> usize {
        0
    }
    /// The number of the oldest call on the wire now (0: none).
    fn call_on_wire(&self) -> u64 {
        0
    }
    /// The oldest call on the wire now, said for the HA log.
    fn stalled_call(&self) -> Option<String> {
        None
    }
    /// Cuts off the oldest call on the wire if it sets up a spare
    /// instance's connection; that instance's number if it did.
    fn cut_stalled_spare_setup(&self) -> Option<usize> {
        None
    }
    /// Offers `object`, a token object on `slot` just found through the
    /// library's own instance, as what that instance reads before its
    /// first token write there ([`crate::member::MemberLibrary::offer_index_probe`]).
    fn offer_index_probe(&self, _slot: CK_SLOT_ID, _object: CK_OBJECT_HANDLE) {}
    /// The oldest call on the wire silent past many times its function's
    /// usual round trip at `now`, where that is less than `member_timeout`
    /// (see [`crate::member::round_trips`]).
    fn silent_call(
        &self,
        _now: std::time::Instant,
        _member_timeout: std::time::Duration,
    ) -> Option<crate::member::SilentCall> {
        None
    }
    /// The slots with a token present.
    fn token_slots(&self) -> Result<Vec<CK_SLOT_ID>> {
        self.slot_list(CK_TRUE)
    }
    /// Runs `search` on the library, giving up once it has not answered
    /// by `deadline` and answers no call for `patience` ([`Silent`]);
    /// `None` while an earlier such job has not returned. A library that
    /// cannot hang may run it in this thread.
    fn search_bounded(
        self: Arc<Self>,
        search: TokenSearch,
        deadline: Instant,
        patience: Duration,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Silent>>;
    /// [`Self::search_bounded`], asking meanwhile whether a fresh instance
    /// of the library passes `hedge`'s check, where it has such instances
    /// (p11-kit's client: [`MemberLibrary::fresh_instance`]): one
    /// that does while the search has answered nothing ends the search at
    /// once ([`Unanswered::DeadConnection`]). A job given up earlier is
    /// cut again and given a moment to return first. Others search as
    /// [`Self::search_bounded`] does.
    fn search_hedged(
        self: Arc<Self>,
        search: TokenSearch,
        deadline: Instant,
        patience: Duration,
        _hedge: Hedge,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Unanswered>> {
        self.search_bounded(search, deadline, patience)
            .map(|answer| answer.map_err(|Silent| Unanswered::Silent))
    }
}

/// What [`MemberBackend::search_hedged`] asks of a fresh instance, and
/// after how long a silence it first does.
pub struct Hedge {
    pub after: Duration,
    pub check: BackendCheck,
}

/// A question put to a library instance.
pub type BackendCheck = Arc<dyn Fn(&dyn MemberBackend) -> bool + Send + Sync>;

/// Whether `session` answers that it is not logged in (a public session):
/// on a token the group is logged in to, its login was lost unseen. An
/// error answer says nothing of the login, and counts as no.
pub fn session_is_public(library: &dyn MemberBackend, session: CK_SESSION_HANDLE) -> bool {
    let mut info = CK_SESSION_INFO {
        slotID: 0,
        state: 0,
        flags: 0,
        ulDeviceError: 0,
    };
    library.get_session_info(session, &mut info) == CKR_OK
        && matches!(info.state, CKS_RO_PUBLIC_SESSION | CKS_RW_PUBLIC_SESSION)
}

/// Whether `a` and `b` are one library instance.
#[inline]
pub fn same_library(a: &dyn MemberBackend, b: &dyn MemberBackend) -> bool {
    std::ptr::addr_eq(a, b)
}

/// `CA_CloneObject(hTargetSession, hSourceSession, ulObjectType, hObject,
/// phClonedObject)`.
type CloneObject = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    CK_SESSION_HANDLE,
    CK_ULONG,
    CK_OBJECT_HANDLE,
    *mut CK_OBJECT_HANDLE,
) -> CK_RV;

/// `CA_MigrateKeys(hSourceSession, hTargetSession, flags, count, data)`.
type MigrateKeys = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    CK_SESSION_HANDLE,
    CK_ULONG,
    CK_ULONG,
    *mut MigrationData,
) -> CK_RV;

/// `CA_GetContainerPolicySetting(slotID, container, policy, pValue)`.
type PolicySetting = unsafe extern "C" fn(CK_SLOT_ID, CK_ULONG, CK_ULONG, *mut CK_ULONG) -> CK_RV;

/// `CK_OBJECT_MIGRATION_DATA`: one object for `CA_MigrateKeys`.
#[repr(C)]
struct MigrationData {
    object_type: CK_ULONG,
    source_handle: CK_OBJECT_HANDLE,
    target_handle: CK_OBJECT_HANDLE,
    rv: CK_RV,
}

/// `ulObjectType` of a PKCS#11 object.
const OBJECT_TYPE_CRYPTOKI: CK_ULONG = 0;

/// The container a slot's partition is addressed by.
const SLOT_CONTAINER: CK_ULONG = 0;

/// A session on one member token, opened in the member's `epoch` on the
/// library's `connection`.
#[derive(Clone)]
pub struct MemberSession {
    pub library: Arc<dyn MemberBackend>,
    pub handle: CK_SESSION_HANDLE,
    pub epoch: u64,
    pub connection: u64,
    /// Whether `library` talks to a server, asked once when the session
    /// was opened (it never changes for a library), so that a call on the
    /// session does not ask through the trait object each time.
    pub networked: bool,
    /// Whether `library` has spare instances, asked once as `networked`
    /// is: a library's instances are fixed when it is loaded.
    pub spares: bool,
}

/// Opens a session on one member token.
pub fn open_member_session(
    library: Arc<dyn MemberBackend>,
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    epoch: u64,
) -> Result<MemberSession> {
    // Read first: a reconnect in between makes the session look older,
    // never newer, than it is.
    let connection = library.connection();
    let mut handle: CK_SESSION_HANDLE = 0;
    check(library.open_session(slot, flags, &mut handle))?;
    Ok(MemberSession {
        networked: library.is_networked(),
        spares: library.has_spares(),
        library,
        handle,
        epoch,
        connection,
    })
}

/// `CKA_TOKEN` as `template` gives it, if it does.
fn token_attribute(template: Option<&[CK_ATTRIBUTE]>) -> Option<bool> {
    template.unwrap_or_default().iter().find_map(|a| {
        (a.type_ == CKA_TOKEN
            && a.ulValueLen as usize == std::mem::size_of::<CK_BBOOL>()
            && !a.pValue.is_null())
        // SAFETY: the module's convention: `pValue` points at as many
        // bytes as `ulValueLen` says, here one.
        .then(|| unsafe { *a.pValue.cast::<CK_BBOOL>() } == CK_TRUE)
    })
}

/// Whether `template` makes a token object: `CKA_TOKEN` true (false is
/// its default).
fn makes_token_object(template: Option<&[CK_ATTRIBUTE]>) -> bool {
    token_attribute(template) == Some(true)
}

/// The kind of write that makes a token object (`token`) or session
/// objects only ([`MemberLibrary::call_writing`]).
fn written(token: bool) -> Write {
    if token {
        Write::Token
    } else {
        Write::Session
    }
}

/// A read-only array as C takes it: NULL for `None`.
#[inline(always)]
fn array<T>(items: Option<&[T]>) -> (*mut T, CK_ULONG) {
    items.map_or((ptr::null_mut(), 0), |items| {
        (items.as_ptr() as *mut T, items.len() as CK_ULONG)
    })
}

/// A writable array as C takes it: NULL for `None`.
#[inline(always)]
fn array_mut<T>(items: Option<&mut [T]>) -> (*mut T, CK_ULONG) {
    items.map_or((ptr::null_mut(), 0), |items| {
        (items.as_mut_ptr(), items.len() as CK_ULONG)
    })
}

/// An output buffer under the two-call convention: NULL for `None` (a
/// length query); otherwise `len` becomes at most the buffer's room.
#[inline(always)]
fn room<T>(buffer: Option<&mut [T]>, len: &mut CK_ULONG) -> *mut T {
    match buffer {
        Some(buffer) => {
            *len = (*len).min(buffer.len() as CK_ULONG);
            buffer.as_mut_ptr()
        }
        None => ptr::null_mut(),
    }
}

/// A mechanism as C takes it. Members read it; what a mechanism returns
/// (TLS derivation's keys) goes where its parameter points.
#[inline(always)]
fn mechanism(mechanism: &CK_MECHANISM) -> CK_MECHANISM_PTR {
    mechanism as *const CK_MECHANISM as CK_MECHANISM_PTR
}

/// Single-part and update calls with input and two-call output.
macro_rules! in_out {
    ($($method:ident => $function:ident),* $(,)?) => {$(
        #[inline]
        fn $method(
            &self,
            session: CK_SESSION_HANDLE,
            input: Option<&[u8]>,
            output: Option<&mut [u8]>,
            output_len: &mut CK_ULONG,
        ) -> CK_RV {
            let (input, input_len) = array(input);
            let output = room(output, output_len);
            member_call!(self, $function(session, input, input_len, output, output_len))
        }
    )*};
}

/// Updates that take input only.
macro_rules! input_only {
    ($($method:ident => $function:ident),* $(,)?) => {$(
        #[inline]
        fn $method(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
            let (input, input_len) = array(input);
            member_call!(self, $function(session, input, input_len))
        }
    )*};
}

/// Finals that write two-call output.
macro_rules! output_final {
    ($($method:ident => $function:ident),* $(,)?) => {$(
        #[inline]
        fn $method(
            &self,
            session: CK_SESSION_HANDLE,
            output: Option<&mut [u8]>,
            output_len: &mut CK_ULONG,
        ) -> CK_RV {
            let output = room(output, output_len);
            member_call!(self, $function(session, output, output_len))
        }
    )*};
}

/// `*Init` calls that take a mechanism and a key.
macro_rules! keyed_init {
    ($($method:ident => $function:ident),* $(,)?) => {$(
        #[inline]
        fn $method(
            &self,
            session: CK_SESSION_HANDLE,
            mechanism: &CK_MECHANISM,
            key: CK_OBJECT_HANDLE,
        ) -> CK_RV {
            member_call!(self, $function(session, self::mechanism(mechanism), key))
        }
    )*};
}

impl MemberApi for MemberLibrary {
    fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        session: &mut CK_SESSION_HANDLE,
    ) -> CK_RV {
        member_call!(
            self,
            C_OpenSession(slot, flags, ptr::null_mut(), None, session)
        )
    }

    fn close_session(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        member_call!(self, C_CloseSession(session))
    }

    fn close_all_sessions(&self, slot: CK_SLOT_ID) -> CK_RV {
        member_call!(self, C_CloseAllSessions(slot))
    }

    fn get_session_info(&self, session: CK_SESSION_HANDLE, info: &mut CK_SESSION_INFO) -> CK_RV {
        member_call!(self, C_GetSessionInfo(session, info))
    }

    fn login(
        &self,
        session: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> CK_RV {
        let (pin, pin_len) = array(pin);
        member_call!(self, C_Login(session, user_type, pin, pin_len))
    }

    fn logout(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        member_call!(self, C_Logout(session))
    }

    fn init_pin(&self, session: CK_SESSION_HANDLE, pin: Option<&[u8]>) -> CK_RV {
        let (pin, pin_len) = array(pin);
        member_call!(self, C_InitPIN(session, pin, pin_len))
    }

    fn set_pin(&self, session: CK_SESSION_HANDLE, old: Option<&[u8]>, new: Option<&[u8]>) -> CK_RV {
        let ((old, old_len), (new, new_len)) = (array(old), array(new));
        member_call!(self, C_SetPIN(session, old, old_len, new, new_len))
    }

    fn init_token(&self, slot: CK_SLOT_ID, pin: Option<&[u8]>, label: &[u8; 32]) -> CK_RV {
        let (pin, pin_len) = array(pin);
        let label = label.as_ptr() as *mut CK_UTF8CHAR;
        member_call!(self, C_InitToken(slot, pin, pin_len, label))
    }

    fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let write = written(makes_token_object(template));
        let (template, count) = array(template);
        self.call_writing(
            "C_CreateObject",
            session,
            write,
            |table| table.C_CreateObject,
            // SAFETY: as in `member_call!`.
            |create| unsafe {
                let rv = create(session, template, count, object);
                (rv, Some(*object))
            },
        )
    }

    fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let write = written(makes_token_object(template));
        let (template, count) = array(template);
        self.call_writing(
            "C_CopyObject",
            session,
            write,
            |table| table.C_CopyObject,
            // SAFETY: as in `member_call!`.
            |copy| unsafe {
                let rv = copy(session, source, template, count, object);
                (rv, Some(*object))
            },
        )
    }

    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        self.call_writing(
            "C_DestroyObject",
            session,
            Write::Destroy,
            |table| table.C_DestroyObject,
            // SAFETY: as in `member_call!`.
            |destroy| unsafe { (destroy(session, object), None) },
        )
    }

    fn get_object_size(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        size: &mut CK_ULONG,
    ) -> CK_RV {
        member_call!(self, C_GetObjectSize(session, object, size))
    }

    fn get_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&mut [CK_ATTRIBUTE]>,
    ) -> CK_RV {
        let (template, count) = array_mut(template);
        member_call!(self, C_GetAttributeValue(session, object, template, count))
    }

    fn set_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        let (template, count) = array(template);
        member_call!(self, C_SetAttributeValue(session, object, template, count))
    }

    fn find_objects_init(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        let (template, count) = array(template);
        member_call!(self, C_FindObjectsInit(session, template, count))
    }

    fn find_objects(
        &self,
        session: CK_SESSION_HANDLE,
        found: Option<&mut [CK_OBJECT_HANDLE]>,
        count: &mut CK_ULONG,
    ) -> CK_RV {
        let (found, room) = array_mut(found);
        member_call!(self, C_FindObjects(session, found, room, count))
    }

    fn find_objects_final(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        member_call!(self, C_FindObjectsFinal(session))
    }

    keyed_init!(
        encrypt_init => C_EncryptInit,
        decrypt_init => C_DecryptInit,
        sign_init => C_SignInit,
        verify_init => C_VerifyInit,
        sign_recover_init => C_SignRecoverInit,
        verify_recover_init => C_VerifyRecoverInit,
    );

    #[inline]
    fn digest_init(&self, session: CK_SESSION_HANDLE, mechanism: &CK_MECHANISM) -> CK_RV {
        member_call!(self, C_DigestInit(session, self::mechanism(mechanism)))
    }

    in_out!(
        encrypt => C_Encrypt,
        decrypt => C_Decrypt,
        digest => C_Digest,
        sign => C_Sign,
        sign_recover => C_SignRecover,
        verify_recover => C_VerifyRecover,
        encrypt_update => C_EncryptUpdate,
        decrypt_update => C_DecryptUpdate,
        digest_encrypt_update => C_DigestEncryptUpdate,
        decrypt_digest_update => C_DecryptDigestUpdate,
        sign_encrypt_update => C_SignEncryptUpdate,
        decrypt_verify_update => C_DecryptVerifyUpdate,
    );

    input_only!(
        digest_update => C_DigestUpdate,
        sign_update => C_SignUpdate,
        verify_update => C_VerifyUpdate,
    );

    #[inline]
    fn digest_key(&self, session: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
        member_call!(self, C_DigestKey(session, key))
    }

    #[inline]
    fn digest_init_and_digest(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        started: &mut bool,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        let (input, input_len) = array(input);
        let output = room(output, output_len);
        self.call(
            "C_Digest",
            |table| table.C_DigestInit.zip(table.C_Digest),
            // SAFETY: as in `member_call!`: the table is the library's own
            // and the arguments follow the PKCS#11 signatures.
            |(init, digest)| unsafe {
                if !*started {
                    let rv = init(session, self::mechanism(mechanism));
                    if rv != CKR_OK {
                        return rv;
                    }
                    *started = true;
                }
                digest(session, input, input_len, output, output_len)
            },
        )
    }

    output_final!(
        encrypt_final => C_EncryptFinal,
        decrypt_final => C_DecryptFinal,
        digest_final => C_DigestFinal,
        sign_final => C_SignFinal,
    );

    fn verify(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> CK_RV {
        let ((data, data_len), (signature, signature_len)) = (array(data), array(signature));
        member_call!(
            self,
            C_Verify(session, data, data_len, signature, signature_len)
        )
    }

    fn verify_final(&self, session: CK_SESSION_HANDLE, signature: Option<&[u8]>) -> CK_RV {
        let (signature, signature_len) = array(signature);
        member_call!(self, C_VerifyFinal(session, signature, signature_len))
    }

    fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let write = written(makes_token_object(template));
        let (template, count) = array(template);
        self.call_writing(
            "C_GenerateKey",
            session,
            write,
            |table| table.C_GenerateKey,
            // SAFETY: as in `member_call!`.
            |generate| unsafe {
                let rv = generate(session, self::mechanism(mechanism), template, count, key);
                (rv, Some(*key))
            },
        )
    }

    fn generate_key_pair(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        public_template: Option<&[CK_ATTRIBUTE]>,
        private_template: Option<&[CK_ATTRIBUTE]>,
        public_key: &mut CK_OBJECT_HANDLE,
        private_key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let made = (
            makes_token_object(public_template),
            makes_token_object(private_template),
        );
        let write = written(made.0 || made.1);
        let (public, public_count) = array(public_template);
        let (private, private_count) = array(private_template);
        self.call_writing(
            "C_GenerateKeyPair",
            session,
            write,
            |table| table.C_GenerateKeyPair,
            // SAFETY: as in `member_call!`.
            |generate| unsafe {
                let rv = generate(
                    session,
                    self::mechanism(mechanism),
                    public,
                    public_count,
                    private,
                    private_count,
                    public_key,
                    private_key,
                );
                // A token object of the pair: the public key if it is one.
                (rv, Some(if made.0 { *public_key } else { *private_key }))
            },
        )
    }

    fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        wrapped: Option<&mut [u8]>,
        wrapped_len: &mut CK_ULONG,
    ) -> CK_RV {
        let wrapped = room(wrapped, wrapped_len);
        member_call!(
            self,
            C_WrapKey(
                session,
                self::mechanism(mechanism),
                wrapping_key,
                key,
                wrapped,
                wrapped_len
            )
        )
    }

    fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: Option<&[u8]>,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let write = written(makes_token_object(template));
        let (wrapped, wrapped_len) = array(wrapped);
        let (template, count) = array(template);
        self.call_writing(
            "C_UnwrapKey",
            session,
            write,
            |table| table.C_UnwrapKey,
            // SAFETY: as in `member_call!`.
            |unwrap| unsafe {
                let rv = unwrap(
                    session,
                    self::mechanism(mechanism),
                    unwrapping_key,
                    wrapped,
                    wrapped_len,
                    template,
                    count,
                    key,
                );
                (rv, Some(*key))
            },
        )
    }

    fn derive_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        base_key: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        key: Option<&mut CK_OBJECT_HANDLE>,
    ) -> CK_RV {
        let write = written(makes_token_object(template));
        let (template, count) = array(template);
        let key = key.map_or(ptr::null_mut(), |key| key as *mut CK_OBJECT_HANDLE);
        self.call_writing(
            "C_DeriveKey",
            session,
            write,
            |table| table.C_DeriveKey,
            // SAFETY: as in `member_call!`; `key` is read only where the
            // caller gave room for it.
            |derive| unsafe {
                let rv = derive(
                    session,
                    self::mechanism(mechanism),
                    base_key,
                    template,
                    count,
                    key,
                );
                (rv, (!key.is_null()).then(|| *key))
            },
        )
    }

    fn seed_random(&self, session: CK_SESSION_HANDLE, seed: Option<&[u8]>) -> CK_RV {
        let (seed, seed_len) = array(seed);
        member_call!(self, C_SeedRandom(session, seed, seed_len))
    }

    #[inline]
    fn generate_random(&self, session: CK_SESSION_HANDLE, random: Option<&mut [u8]>) -> CK_RV {
        let (random, random_len) = array_mut(random);
        member_call!(self, C_GenerateRandom(session, random, random_len))
    }

    fn get_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&mut [u8]>,
        state_len: &mut CK_ULONG,
    ) -> CK_RV {
        let state = room(state, state_len);
        member_call!(self, C_GetOperationState(session, state, state_len))
    }

    fn set_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&[u8]>,
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        let (state, state_len) = array(state);
        member_call!(
            self,
            C_SetOperationState(
                session,
                state,
                state_len,
                encryption_key,
                authentication_key
            )
        )
    }

    fn slot_list(&self, token_present: CK_BBOOL) -> Result<Vec<CK_SLOT_ID>> {
        MemberLibrary::slot_list(self, token_present)
    }

    fn slot_info(&self, slot: CK_SLOT_ID) -> Result<CK_SLOT_INFO> {
        MemberLibrary::slot_info(self, slot)
    }

    fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        MemberLibrary::token_info(self, slot)
    }

    fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        MemberLibrary::mechanisms(self, slot)
    }

    fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        MemberLibrary::mechanism_info(self, slot, mechanism)
    }

    fn initialize(&self) -> Result<()> {
        MemberLibrary::initialize(self)
    }

    fn finalize(&self) {
        MemberLibrary::finalize(self)
    }
}

impl MemberBackend for MemberLibrary {
    fn name(&self) -> &str {
        &self.name
    }

    #[inline(always)]
    fn connection(&self) -> u64 {
        MemberLibrary::connection(self)
    }

    fn is_networked(&self) -> bool {
        MemberLibrary::is_networked(self)
    }

    fn count_slot_as(&self, slot: CK_SLOT_ID, counts: &Arc<CallCounts>) {
        MemberLibrary::count_slot_as(self, slot, counts)
    }

    #[inline(always)]
    fn has_spares(&self) -> bool {
        MemberLibrary::has_spares(self)
    }

    fn on_spare<'g>(
        &self,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<CK_RV> {
        MemberLibrary::on_spare(
            self,
            slot,
            begin,
            &mut |library: &MemberLibrary, session| call(library, session),
        )
    }

    fn take_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        MemberLibrary::take_lane(&self, slot, begin)
            .map(|taken| taken.map(|lane| Box::new(lane) as Box<dyn SpareLane>))
    }

    fn take_connected_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        MemberLibrary::take_connected_lane(&self, slot, begin)
            .map(|taken| taken.map(|lane| Box::new(lane) as Box<dyn SpareLane>))
    }

    fn log_out_spares(&self, slot: CK_SLOT_ID) {
        MemberLibrary::log_out_spares(self, slot)
    }

    fn close_forgotten_lanes(&self) {
        MemberLibrary::close_forgotten_lanes(self)
    }

    fn luna_extensions(&self) -> LunaExtensions {
        // SAFETY: each name is paired with its documented signature; only
        // presence is read.
        unsafe {
            LunaExtensions {
                luna: self
                    .extension::<unsafe extern "C" fn(*mut *mut std::ffi::c_void) -> CK_RV>(
                        b"CA_GetFunctionList\0",
                    )
                    .is_some(),
                migrate_keys: self.extension::<MigrateKeys>(b"CA_MigrateKeys\0").is_some(),
                clone_object: self.extension::<CloneObject>(b"CA_CloneObject\0").is_some(),
                container_policy: self
                    .extension::<PolicySetting>(b"CA_GetContainerPolicySetting\0")
                    .is_some(),
            }
        }
    }

    fn migrate_key(
        &self,
        source: CK_SESSION_HANDLE,
        target: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        migrated: &mut CK_OBJECT_HANDLE,
        object_rv: &mut CK_RV,
    ) -> CK_RV {
        // SAFETY: the documented signature of the export.
        let Some(migrate) = (unsafe { self.extension::<MigrateKeys>(b"CA_MigrateKeys\0") }) else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        let mut entry = MigrationData {
            object_type: OBJECT_TYPE_CRYPTOKI,
            source_handle: object,
            target_handle: CK_INVALID_HANDLE,
            rv: CKR_OK,
        };
        // SAFETY: the documented signature; one live entry.
        let rv = self.shielded("CA_MigrateKeys", || unsafe {
            migrate(source, target, 0, 1, &mut entry)
        });
        *migrated = entry.target_handle;
        *object_rv = entry.rv;
        rv
    }

    fn clone_object(
        &self,
        target: CK_SESSION_HANDLE,
        source: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        cloned: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        // SAFETY: the documented signature of the export.
        let Some(clone) = (unsafe { self.extension::<CloneObject>(b"CA_CloneObject\0") }) else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        // SAFETY: the documented signature; a live out-parameter.
        self.shielded("CA_CloneObject", || unsafe {
            clone(target, source, OBJECT_TYPE_CRYPTOKI, object, cloned)
        })
    }

    fn container_policy(&self, slot: CK_SLOT_ID, policy: CK_ULONG, value: &mut CK_ULONG) -> CK_RV {
        // SAFETY: the documented signature of the export.
        let Some(read) =
            (unsafe { self.extension::<PolicySetting>(b"CA_GetContainerPolicySetting\0") })
        else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        // SAFETY: the documented signature, a live out-parameter.
        self.shielded("CA_GetContainerPolicySetting", || unsafe {
            read(slot, SLOT_CONTAINER, policy, value)
        })
    }

    fn usable(&self) -> bool {
        MemberLibrary::usable(self)
    }

    fn initialized_by_us(&self) -> bool {
        MemberLibrary::initialized_by_us(self)
    }

    fn reinitialize(&self) -> Result<()> {
        MemberLibrary::reinitialize(self)
    }

    fn sever(&self) -> usize {
        MemberLibrary::sever(self)
    }

    fn call_on_wire(&self) -> u64 {
        MemberLibrary::call_on_wire(self)
    }

    fn stalled_call(&self) -> Option<String> {
        MemberLibrary::stalled_call(self)
    }

    fn cut_stalled_spare_setup(&self) -> Option<usize> {
        MemberLibrary::cut_stalled_spare_setup(self)
    }

    fn offer_index_probe(&self, slot: CK_SLOT_ID, object: CK_OBJECT_HANDLE) {
        MemberLibrary::offer_index_probe(self, slot, object)
    }

    fn silent_call(
        &self,
        now: std::time::Instant,
        member_timeout: std::time::Duration,
    ) -> Option<crate::member::SilentCall> {
        MemberLibrary::silent_call(self, now, member_timeout)
    }

    fn usual_round_trip(&self, function: &str) -> Option<std::time::Duration> {
        MemberLibrary::usual_round_trip(self, function)
    }

    fn token_slots(&self) -> Result<Vec<CK_SLOT_ID>> {
        MemberLibrary::token_slots(self)
    }

    fn search_bounded(
        self: Arc<Self>,
        search: TokenSearch,
        deadline: Instant,
        patience: Duration,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Silent>> {
        let job = self.start_bounded(move |library: &MemberLibrary| search(library))?;
        Some(job.finish(deadline, patience))
    }

    fn search_hedged(
        self: Arc<Self>,
        search: TokenSearch,
        deadline: Instant,
        patience: Duration,
        hedge: Hedge,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Unanswered>> {
        let job = self.start_bounded_after_cut(move |library: &MemberLibrary| search(library))?;
        let check = hedge.check;
        let check: FreshCheck = Arc::new(move |fresh: &MemberLibrary| check(fresh));
        Some(job.finish_hedged(deadline, patience, Some((hedge.after, &check))))
    }
}
