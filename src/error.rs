//! The error type every inner entry point returns: a CK_RV, and for the
//! two-call convention the length the caller must provide.

use cryptoki_sys::*;

/// A PKCS#11 failure on its way back to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    pub rv: CK_RV,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub const fn new(rv: CK_RV) -> Self {
        Error { rv }
    }
}

impl Error {
    /// For calls that take a key: an object handle they could not use is
    /// reported as the handle of the key in that role (PKCS#11 2.40 names
    /// `CKR_KEY_HANDLE_INVALID`, `CKR_WRAPPING_KEY_HANDLE_INVALID` and
    /// `CKR_UNWRAPPING_KEY_HANDLE_INVALID`), never as a bare object handle.
    pub fn as_key(self, role: CK_RV) -> Self {
        if self.rv == CKR_OBJECT_HANDLE_INVALID {
            Error::new(role)
        } else {
            self
        }
    }
}

impl Error {
    /// For object calls (`C_GetAttributeValue`, `C_GetObjectSize`, ...):
    /// PKCS#11 2.40 gives them `CKR_OBJECT_HANDLE_INVALID` only, while a
    /// member looked up as a key answers `CKR_KEY_HANDLE_INVALID`.
    pub fn as_object(self) -> Self {
        if self.rv == CKR_KEY_HANDLE_INVALID {
            Error::new(CKR_OBJECT_HANDLE_INVALID)
        } else {
            self
        }
    }
}

impl From<CK_RV> for Error {
    fn from(rv: CK_RV) -> Self {
        Error { rv }
    }
}

/// Turns a member's return value into a `Result`.
pub fn check(rv: CK_RV) -> Result<()> {
    if rv == CKR_OK {
        Ok(())
    } else {
        Err(Error::new(rv))
    }
}

/// Thales Luna's vendor return codes (`CKR_VENDOR_DEFINED` and up), as
/// its client library returns them; `member::classify` says what each means
/// for a group.
pub mod luna {
    use cryptoki_sys::CK_RV;

    pub const CKR_CONTAINER_HANDLE_INVALID: CK_RV = 0x8000_0005;
    pub const CKR_UNABLE_TO_CONNECT: CK_RV = 0x8000_001F;
    pub const CKR_PARTITION_DISABLED: CK_RV = 0x8000_0020;
    pub const CKR_TIMEOUT: CK_RV = 0x8000_0024;
    pub const CKR_HSM_STORAGE_FULL: CK_RV = 0x8000_002A;
    pub const CKR_DEVICE_TIMEOUT: CK_RV = 0x8000_002B;
    pub const CKR_OPERATION_NOT_ALLOWED: CK_RV = 0x8000_0030;
    pub const CKR_AGAIN: CK_RV = 0x8000_0041;
    /// The secure-channel (NTLS/STC) errors: the link to the partition broke.
    pub const SECURE_CHANNEL_ERRORS: std::ops::RangeInclusive<CK_RV> = 0x8000_0045..=0x8000_0066;
    pub const CKR_OBJECT_ALREADY_EXISTS: CK_RV = 0x8000_006F;
    pub const CKR_HSM_TAMPERED: CK_RV = 0x8000_0076;
    pub const CKR_KEY_EXTRACTABLE: CK_RV = 0x8000_0101;
    pub const CKR_FAILED_TO_CLONE_AN_OBJECT: CK_RV = 0x8000_0106;
    pub const CKR_CLONE_NOT_ATTEMPTED: CK_RV = 0x8000_0107;
    pub const CKR_BUSY: CK_RV = 0x8000_1604;
}

/// The name of a return value, for logs and messages.
pub fn rv_name(rv: CK_RV) -> String {
    if luna::SECURE_CHANNEL_ERRORS.contains(&rv) {
        return format!("CKR_0x{rv:08X} (Luna secure-channel error)");
    }
    let name = match rv {
        CKR_OK => "CKR_OK",
        CKR_CANCEL => "CKR_CANCEL",
        CKR_HOST_MEMORY => "CKR_HOST_MEMORY",
        CKR_SLOT_ID_INVALID => "CKR_SLOT_ID_INVALID",
        CKR_GENERAL_ERROR => "CKR_GENERAL_ERROR",
        CKR_FUNCTION_FAILED => "CKR_FUNCTION_FAILED",
        CKR_ARGUMENTS_BAD => "CKR_ARGUMENTS_BAD",
        CKR_NO_EVENT => "CKR_NO_EVENT",
        CKR_CANT_LOCK => "CKR_CANT_LOCK",
        CKR_ATTRIBUTE_READ_ONLY => "CKR_ATTRIBUTE_READ_ONLY",
        CKR_ATTRIBUTE_SENSITIVE => "CKR_ATTRIBUTE_SENSITIVE",
        CKR_ATTRIBUTE_TYPE_INVALID => "CKR_ATTRIBUTE_TYPE_INVALID",
        CKR_ATTRIBUTE_VALUE_INVALID => "CKR_ATTRIBUTE_VALUE_INVALID",
        CKR_DATA_INVALID => "CKR_DATA_INVALID",
        CKR_DATA_LEN_RANGE => "CKR_DATA_LEN_RANGE",
        CKR_DEVICE_ERROR => "CKR_DEVICE_ERROR",
        CKR_DEVICE_MEMORY => "CKR_DEVICE_MEMORY",
        CKR_DEVICE_REMOVED => "CKR_DEVICE_REMOVED",
        CKR_ENCRYPTED_DATA_INVALID => "CKR_ENCRYPTED_DATA_INVALID",
        CKR_ENCRYPTED_DATA_LEN_RANGE => "CKR_ENCRYPTED_DATA_LEN_RANGE",
        CKR_FUNCTION_CANCELED => "CKR_FUNCTION_CANCELED",
        CKR_FUNCTION_NOT_PARALLEL => "CKR_FUNCTION_NOT_PARALLEL",
        CKR_FUNCTION_NOT_SUPPORTED => "CKR_FUNCTION_NOT_SUPPORTED",
        CKR_KEY_HANDLE_INVALID => "CKR_KEY_HANDLE_INVALID",
        CKR_KEY_SIZE_RANGE => "CKR_KEY_SIZE_RANGE",
        CKR_KEY_TYPE_INCONSISTENT => "CKR_KEY_TYPE_INCONSISTENT",
        CKR_KEY_NOT_NEEDED => "CKR_KEY_NOT_NEEDED",
        CKR_KEY_CHANGED => "CKR_KEY_CHANGED",
        CKR_KEY_NEEDED => "CKR_KEY_NEEDED",
        CKR_KEY_INDIGESTIBLE => "CKR_KEY_INDIGESTIBLE",
        CKR_KEY_FUNCTION_NOT_PERMITTED => "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_NOT_WRAPPABLE => "CKR_KEY_NOT_WRAPPABLE",
        CKR_KEY_UNEXTRACTABLE => "CKR_KEY_UNEXTRACTABLE",
        CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        CKR_MECHANISM_PARAM_INVALID => "CKR_MECHANISM_PARAM_INVALID",
        CKR_OBJECT_HANDLE_INVALID => "CKR_OBJECT_HANDLE_INVALID",
        CKR_OPERATION_ACTIVE => "CKR_OPERATION_ACTIVE",
        CKR_OPERATION_NOT_INITIALIZED => "CKR_OPERATION_NOT_INITIALIZED",
        CKR_PIN_INCORRECT => "CKR_PIN_INCORRECT",
        CKR_PIN_INVALID => "CKR_PIN_INVALID",
        CKR_PIN_LEN_RANGE => "CKR_PIN_LEN_RANGE",
        CKR_PIN_EXPIRED => "CKR_PIN_EXPIRED",
        CKR_PIN_LOCKED => "CKR_PIN_LOCKED",
        CKR_SESSION_CLOSED => "CKR_SESSION_CLOSED",
        CKR_SESSION_COUNT => "CKR_SESSION_COUNT",
        CKR_SESSION_HANDLE_INVALID => "CKR_SESSION_HANDLE_INVALID",
        CKR_SESSION_PARALLEL_NOT_SUPPORTED => "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
        CKR_SESSION_READ_ONLY => "CKR_SESSION_READ_ONLY",
        CKR_SESSION_EXISTS => "CKR_SESSION_EXISTS",
        CKR_SESSION_READ_ONLY_EXISTS => "CKR_SESSION_READ_ONLY_EXISTS",
        CKR_SESSION_READ_WRITE_SO_EXISTS => "CKR_SESSION_READ_WRITE_SO_EXISTS",
        CKR_SIGNATURE_INVALID => "CKR_SIGNATURE_INVALID",
        CKR_SIGNATURE_LEN_RANGE => "CKR_SIGNATURE_LEN_RANGE",
        CKR_TEMPLATE_INCOMPLETE => "CKR_TEMPLATE_INCOMPLETE",
        CKR_TEMPLATE_INCONSISTENT => "CKR_TEMPLATE_INCONSISTENT",
        CKR_TOKEN_NOT_PRESENT => "CKR_TOKEN_NOT_PRESENT",
        CKR_TOKEN_NOT_RECOGNIZED => "CKR_TOKEN_NOT_RECOGNIZED",
        CKR_TOKEN_WRITE_PROTECTED => "CKR_TOKEN_WRITE_PROTECTED",
        CKR_UNWRAPPING_KEY_HANDLE_INVALID => "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
        CKR_UNWRAPPING_KEY_SIZE_RANGE => "CKR_UNWRAPPING_KEY_SIZE_RANGE",
        CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT => "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
        CKR_USER_ALREADY_LOGGED_IN => "CKR_USER_ALREADY_LOGGED_IN",
        CKR_USER_NOT_LOGGED_IN => "CKR_USER_NOT_LOGGED_IN",
        CKR_USER_PIN_NOT_INITIALIZED => "CKR_USER_PIN_NOT_INITIALIZED",
        CKR_USER_TYPE_INVALID => "CKR_USER_TYPE_INVALID",
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN => "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
        CKR_USER_TOO_MANY_TYPES => "CKR_USER_TOO_MANY_TYPES",
        CKR_WRAPPED_KEY_INVALID => "CKR_WRAPPED_KEY_INVALID",
        CKR_WRAPPED_KEY_LEN_RANGE => "CKR_WRAPPED_KEY_LEN_RANGE",
        CKR_WRAPPING_KEY_HANDLE_INVALID => "CKR_WRAPPING_KEY_HANDLE_INVALID",
        CKR_WRAPPING_KEY_SIZE_RANGE => "CKR_WRAPPING_KEY_SIZE_RANGE",
        CKR_WRAPPING_KEY_TYPE_INCONSISTENT => "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
        CKR_RANDOM_SEED_NOT_SUPPORTED => "CKR_RANDOM_SEED_NOT_SUPPORTED",
        CKR_RANDOM_NO_RNG => "CKR_RANDOM_NO_RNG",
        CKR_DOMAIN_PARAMS_INVALID => "CKR_DOMAIN_PARAMS_INVALID",
        CKR_CURVE_NOT_SUPPORTED => "CKR_CURVE_NOT_SUPPORTED",
        CKR_BUFFER_TOO_SMALL => "CKR_BUFFER_TOO_SMALL",
        CKR_SAVED_STATE_INVALID => "CKR_SAVED_STATE_INVALID",
        CKR_INFORMATION_SENSITIVE => "CKR_INFORMATION_SENSITIVE",
        CKR_STATE_UNSAVEABLE => "CKR_STATE_UNSAVEABLE",
        CKR_CRYPTOKI_NOT_INITIALIZED => "CKR_CRYPTOKI_NOT_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_MUTEX_BAD => "CKR_MUTEX_BAD",
        CKR_MUTEX_NOT_LOCKED => "CKR_MUTEX_NOT_LOCKED",
        CKR_FUNCTION_REJECTED => "CKR_FUNCTION_REJECTED",
        luna::CKR_CONTAINER_HANDLE_INVALID => "CKR_CONTAINER_HANDLE_INVALID",
        luna::CKR_UNABLE_TO_CONNECT => "CKR_UNABLE_TO_CONNECT",
        luna::CKR_PARTITION_DISABLED => "CKR_PARTITION_DISABLED",
        luna::CKR_TIMEOUT => "CKR_TIMEOUT",
        luna::CKR_HSM_STORAGE_FULL => "CKR_HSM_STORAGE_FULL",
        luna::CKR_DEVICE_TIMEOUT => "CKR_DEVICE_TIMEOUT",
        luna::CKR_OPERATION_NOT_ALLOWED => "CKR_OPERATION_NOT_ALLOWED",
        luna::CKR_AGAIN => "CKR_AGAIN",
        luna::CKR_OBJECT_ALREADY_EXISTS => "CKR_OBJECT_ALREADY_EXISTS",
        luna::CKR_HSM_TAMPERED => "CKR_HSM_TAMPERED",
        luna::CKR_KEY_EXTRACTABLE => "CKR_KEY_EXTRACTABLE",
        luna::CKR_FAILED_TO_CLONE_AN_OBJECT => "CKR_FAILED_TO_CLONE_AN_OBJECT",
        luna::CKR_CLONE_NOT_ATTEMPTED => "CKR_CLONE_NOT_ATTEMPTED",
        luna::CKR_BUSY => "CKR_BUSY",
        _ => return format!("CKR_0x{rv:08X}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luna_codes_have_names() {
        assert_eq!(rv_name(luna::CKR_BUSY), "CKR_BUSY");
        assert_eq!(
            rv_name(luna::CKR_UNABLE_TO_CONNECT),
            "CKR_UNABLE_TO_CONNECT"
        );
        assert_eq!(
            rv_name(luna::CKR_FAILED_TO_CLONE_AN_OBJECT),
            "CKR_FAILED_TO_CLONE_AN_OBJECT"
        );
        assert_eq!(
            rv_name(0x8000_0050),
            "CKR_0x80000050 (Luna secure-channel error)"
        );
        assert_eq!(rv_name(0x8000_0999), "CKR_0x80000999");
    }
}
