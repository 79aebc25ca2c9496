//! A spare instance of an in-memory member as the core calls it (a lane's
//! library, [`pkcs11_ha::member_api::SpareLane::library`]): its own
//! client instance of the token, as each p11-kit client instance is
//! (`C_GetFunctionList` makes an independent one), numbering its sessions
//! on its own from 1, so that its handles and those of the member's own
//! instance, or of another spare, coincide. A session handle used on the
//! wrong instance names another session there, or none
//! (`CKR_SESSION_HANDLE_INVALID`). The model keeps every instance's
//! sessions in one table: a spare's handle `h` is `(spare + 1) << 32 | h`
//! there ([`spare_session`]).

use super::SimMember;
use cryptoki_sys::*;
use pkcs11_ha::member_api::{MemberApi, MemberBackend};
use std::ops::Deref;

/// The model's handle of spare `spare`'s session `session`.
pub fn spare_session(spare: usize, session: CK_SESSION_HANDLE) -> CK_SESSION_HANDLE {
    ((spare as CK_SESSION_HANDLE + 1) << 32) | (session & 0xffff_ffff)
}

/// A spare's own handle of the model's session `session`.
pub fn instance_session(session: CK_SESSION_HANDLE) -> CK_SESSION_HANDLE {
    session & 0xffff_ffff
}

/// Forwards calls of one shape to the member, the spare's session as
/// the model knows it.
macro_rules! forward {
    (session_only: $($name:ident),*) => {$(
        fn $name(&self, session: CK_SESSION_HANDLE) -> CK_RV {
            self.member.$name(self.internal(session))
        }
    )*};
    (keyed_init: $($name:ident),*) => {$(
        fn $name(
            &self,
            session: CK_SESSION_HANDLE,
            mechanism: &CK_MECHANISM,
            key: CK_OBJECT_HANDLE,
        ) -> CK_RV {
            self.member.$name(self.internal(session), mechanism, key)
        }
    )*};
    (in_out: $($name:ident),*) => {$(
        fn $name(
            &self,
            session: CK_SESSION_HANDLE,
            input: Option<&[u8]>,
            output: Option<&mut [u8]>,
            output_len: &mut CK_ULONG,
        ) -> CK_RV {
            self.member.$name(self.internal(session), input, output, output_len)
        }
    )*};
    (input_only: $($name:ident),*) => {$(
        fn $name(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
            self.member.$name(self.internal(session), input)
        }
    )*};
    (output_final: $($name:ident),*) => {$(
        fn $name(
            &self,
            session: CK_SESSION_HANDLE,
            output: Option<&mut [u8]>,
            output_len: &mut CK_ULONG,
        ) -> CK_RV {
            self.member.$name(self.internal(session), output, output_len)
        }
    )*};
}

/// Spare `spare` of `member`, as its lane's library.
pub struct SpareInstance<M> {
    pub member: M,
    pub spare: usize,
}

impl<M: Deref<Target = SimMember>> SpareInstance<M> {
    fn internal(&self, session: CK_SESSION_HANDLE) -> CK_SESSION_HANDLE {
        spare_session(self.spare, session)
    }
}

impl<M: Deref<Target = SimMember> + Send + Sync> MemberApi for SpareInstance<M> {
    fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        session: &mut CK_SESSION_HANDLE,
    ) -> CK_RV {
        let rv = self
            .member
            .open_spare_session(slot, flags, self.spare, session);
        *session = instance_session(*session);
        rv
    }

    /// Ends this instance's sessions on the slot's token, not the
    /// member's own nor another spare's.
    fn close_all_sessions(&self, slot: CK_SLOT_ID) -> CK_RV {
        self.member.close_all_spare_sessions(slot, self.spare)
    }

    forward!(session_only: close_session, logout, find_objects_final);
    forward!(keyed_init: sign_init, verify_init, encrypt_init, decrypt_init);
    forward!(in_out: digest, sign, encrypt, decrypt, encrypt_update, decrypt_update);
    forward!(input_only: digest_update, sign_update, verify_update);
    forward!(output_final: encrypt_final, decrypt_final, digest_final, sign_final);

    fn get_session_info(&self, session: CK_SESSION_HANDLE, info: &mut CK_SESSION_INFO) -> CK_RV {
        self.member.get_session_info(self.internal(session), info)
    }

    fn login(
        &self,
        session: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> CK_RV {
        self.member.login(self.internal(session), user_type, pin)
    }

    fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.member
            .create_object(self.internal(session), template, object)
    }

    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        self.member.destroy_object(self.internal(session), object)
    }

    fn get_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&mut [CK_ATTRIBUTE]>,
    ) -> CK_RV {
        self.member
            .get_attribute_value(self.internal(session), object, template)
    }

    fn set_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        self.member
            .set_attribute_value(self.internal(session), object, template)
    }

    fn find_objects_init(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        self.member
            .find_objects_init(self.internal(session), template)
    }

    fn find_objects(
        &self,
        session: CK_SESSION_HANDLE,
        found: Option<&mut [CK_OBJECT_HANDLE]>,
        count: &mut CK_ULONG,
    ) -> CK_RV {
        self.member
            .find_objects(self.internal(session), found, count)
    }

    fn digest_init(&self, session: CK_SESSION_HANDLE, mechanism: &CK_MECHANISM) -> CK_RV {
        self.member.digest_init(self.internal(session), mechanism)
    }

    fn verify(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> CK_RV {
        self.member.verify(self.internal(session), data, signature)
    }

    fn verify_final(&self, session: CK_SESSION_HANDLE, signature: Option<&[u8]>) -> CK_RV {
        self.member.verify_final(self.internal(session), signature)
    }

    fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.member
            .generate_key(self.internal(session), mechanism, template, key)
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
        self.member.generate_key_pair(
            self.internal(session),
            mechanism,
            public_template,
            private_template,
            public_key,
            private_key,
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
        self.member.wrap_key(
            self.internal(session),
            mechanism,
            wrapping_key,
            key,
            wrapped,
            wrapped_len,
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
        self.member.unwrap_key(
            self.internal(session),
            mechanism,
            unwrapping_key,
            wrapped,
            template,
            key,
        )
    }

    fn get_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&mut [u8]>,
        state_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.member
            .get_operation_state(self.internal(session), state, state_len)
    }

    fn set_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&[u8]>,
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.member.set_operation_state(
            self.internal(session),
            state,
            encryption_key,
            authentication_key,
        )
    }

    fn generate_random(&self, session: CK_SESSION_HANDLE, random: Option<&mut [u8]>) -> CK_RV {
        self.member.generate_random(self.internal(session), random)
    }

    fn slot_list(&self, token_present: CK_BBOOL) -> pkcs11_ha::error::Result<Vec<CK_SLOT_ID>> {
        self.member.slot_list(token_present)
    }

    fn slot_info(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_SLOT_INFO> {
        self.member.slot_info(slot)
    }

    fn token_info(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_TOKEN_INFO> {
        self.member.token_info(slot)
    }

    fn mechanisms(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<Vec<CK_MECHANISM_TYPE>> {
        self.member.mechanisms(slot)
    }

    fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> pkcs11_ha::error::Result<CK_MECHANISM_INFO> {
        self.member.mechanism_info(slot, mechanism)
    }

    /// The spare's connection is made and ended with the member's
    /// (`Spares`): nothing of its own to initialise.
    fn initialize(&self) -> pkcs11_ha::error::Result<()> {
        Ok(())
    }

    fn finalize(&self) {}
}

impl<M: Deref<Target = SimMember> + Send + Sync> MemberBackend for SpareInstance<M> {
    fn name(&self) -> &str {
        self.member.name()
    }

    fn connection(&self) -> u64 {
        self.member.connection()
    }

    fn usable(&self) -> bool {
        self.member.usable()
    }

    fn initialized_by_us(&self) -> bool {
        self.member.initialized_by_us()
    }

    /// Runs in the caller's thread, as the member's own instance does.
    fn search_bounded(
        self: std::sync::Arc<Self>,
        search: pkcs11_ha::member_api::TokenSearch,
        _deadline: std::time::Instant,
        _patience: std::time::Duration,
    ) -> Option<Result<Option<CK_SLOT_ID>, pkcs11_ha::member::Silent>> {
        Some(Ok(search(&*self)))
    }
}
