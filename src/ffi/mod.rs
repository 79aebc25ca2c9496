//! The C entry points. Each is thin: check the application's pointers and
//! lengths, convert, call the provider, map the result to a `CK_RV`. One
//! macro generates every export so none can miss the panic guard.
#![deny(clippy::undocumented_unsafe_blocks)]

use crate::arguments::{buffer, required};
use crate::error::Result;
use crate::provider;
use crate::session::SessionRef;
use cryptoki_sys::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

mod crypto;
mod general;
mod object;
mod session;
mod state;

/// Generates `#[no_mangle] extern "C"` exports. A body returns
/// `Result<()>`; each dereference of an application pointer in it is its
/// own `unsafe` block saying why it holds. An unwind never crosses into C
/// but becomes `CKR_GENERAL_ERROR`.
macro_rules! cryptoki_fn {
    ($(fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block)*) => {
        $(
            #[no_mangle]
            #[allow(clippy::missing_safety_doc)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                $crate::ffi::guard(|| -> $crate::error::Result<()> { $body })
            }
        )*
    };
}
pub(crate) use cryptoki_fn;

/// Inlined into each export: one frame less between the application and
/// the member on every call.
#[inline(always)]
pub fn guard(body: impl FnOnce() -> Result<()>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(e)) => e.rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// The session named by `handle`; inlined, as the first step of most
/// calls.
#[inline(always)]
fn session(handle: CK_SESSION_HANDLE) -> Result<SessionRef> {
    provider::session(handle)
}

macro_rules! function_list {
    ($($name:ident),* $(,)?) => {
        /// The 2.40 function table we hand to applications.
        pub static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            $($name: Some($name),)*
        };
    };
}

use crypto::*;
use general::*;
use object::*;
use session::*;

function_list!(
    C_Initialize,
    C_Finalize,
    C_GetInfo,
    C_GetFunctionList,
    C_GetSlotList,
    C_GetSlotInfo,
    C_GetTokenInfo,
    C_GetMechanismList,
    C_GetMechanismInfo,
    C_InitToken,
    C_InitPIN,
    C_SetPIN,
    C_OpenSession,
    C_CloseSession,
    C_CloseAllSessions,
    C_GetSessionInfo,
    C_GetOperationState,
    C_SetOperationState,
    C_Login,
    C_Logout,
    C_CreateObject,
    C_CopyObject,
    C_DestroyObject,
    C_GetObjectSize,
    C_GetAttributeValue,
    C_SetAttributeValue,
    C_FindObjectsInit,
    C_FindObjects,
    C_FindObjectsFinal,
    C_EncryptInit,
    C_Encrypt,
    C_EncryptUpdate,
    C_EncryptFinal,
    C_DecryptInit,
    C_Decrypt,
    C_DecryptUpdate,
    C_DecryptFinal,
    C_DigestInit,
    C_Digest,
    C_DigestUpdate,
    C_DigestKey,
    C_DigestFinal,
    C_SignInit,
    C_Sign,
    C_SignUpdate,
    C_SignFinal,
    C_SignRecoverInit,
    C_SignRecover,
    C_VerifyInit,
    C_Verify,
    C_VerifyUpdate,
    C_VerifyFinal,
    C_VerifyRecoverInit,
    C_VerifyRecover,
    C_DigestEncryptUpdate,
    C_DecryptDigestUpdate,
    C_SignEncryptUpdate,
    C_DecryptVerifyUpdate,
    C_GenerateKey,
    C_GenerateKeyPair,
    C_WrapKey,
    C_UnwrapKey,
    C_DeriveKey,
    C_SeedRandom,
    C_GenerateRandom,
    C_GetFunctionStatus,
    C_CancelFunction,
    C_WaitForSlotEvent,
);
