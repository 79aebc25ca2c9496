//! Object handles inside mechanism parameters. On a virtual slot the
//! application passes virtual handles there too, and each must become the
//! chosen member's handle before the mechanism reaches that member.

use crate::error::{Error, Result};
use cryptoki_sys::*;
use std::mem::size_of;

/// A mechanism whose parameter may have been rewritten for one member; it
/// owns the rewritten parameter so the pointer it hands out stays valid.
pub struct MemberMechanism {
    mechanism: CK_MECHANISM,
    _parameter: Option<Box<[u8]>>,
}

impl MemberMechanism {
    pub fn as_ptr(&mut self) -> CK_MECHANISM_PTR {
        &mut self.mechanism
    }
}

/// Where the handles sit in a parameter, as byte offsets.
fn handle_offsets(mechanism: &CK_MECHANISM) -> Result<&'static [usize]> {
    const CONCATENATE: &[usize] = &[0];
    const ECMQV: &[usize] = &[
        std::mem::offset_of!(CK_ECMQV_DERIVE_PARAMS, hPrivateData),
        std::mem::offset_of!(CK_ECMQV_DERIVE_PARAMS, publicKey),
    ];
    const X942_DH2: &[usize] = &[std::mem::offset_of!(
        CK_X9_42_DH2_DERIVE_PARAMS,
        hPrivateData
    )];
    const X942_MQV: &[usize] = &[
        std::mem::offset_of!(CK_X9_42_MQV_DERIVE_PARAMS, hPrivateData),
        std::mem::offset_of!(CK_X9_42_MQV_DERIVE_PARAMS, publicKey),
    ];
    let (offsets, size) = match mechanism.mechanism {
        CKM_CONCATENATE_BASE_AND_KEY => (CONCATENATE, size_of::<CK_OBJECT_HANDLE>()),
        CKM_ECMQV_DERIVE => (ECMQV, size_of::<CK_ECMQV_DERIVE_PARAMS>()),
        CKM_X9_42_DH_HYBRID_DERIVE => (X942_DH2, size_of::<CK_X9_42_DH2_DERIVE_PARAMS>()),
        CKM_X9_42_MQV_DERIVE => (X942_MQV, size_of::<CK_X9_42_MQV_DERIVE_PARAMS>()),
        _ => return Ok(&[]),
    };
    if mechanism.pParameter.is_null() || mechanism.ulParameterLen as usize != size {
        return Err(Error::new(CKR_MECHANISM_PARAM_INVALID));
    }
    Ok(offsets)
}

/// The virtual object handles inside the mechanism's parameter.
///
/// # Safety
/// `mechanism.pParameter` must point to `ulParameterLen` readable bytes.
pub unsafe fn parameter_handles(mechanism: &CK_MECHANISM) -> Result<Vec<CK_OBJECT_HANDLE>> {
    let offsets = handle_offsets(mechanism)?;
    let base = mechanism.pParameter as *const u8;
    Ok(offsets
        .iter()
        // SAFETY: offsets lie inside a parameter whose size was checked.
        .map(|&o| unsafe { std::ptr::read_unaligned(base.add(o) as *const CK_OBJECT_HANDLE) })
        .collect())
}

/// A copy of the mechanism with the member's handles, in the order
/// `parameter_handles` returned the virtual ones, written into its
/// parameter.
///
/// # Safety
/// As for [`parameter_handles`].
pub unsafe fn for_member(
    mechanism: &CK_MECHANISM,
    member_handles: &[CK_OBJECT_HANDLE],
) -> Result<MemberMechanism> {
    let offsets = handle_offsets(mechanism)?;
    if offsets.is_empty() {
        return Ok(MemberMechanism {
            mechanism: *mechanism,
            _parameter: None,
        });
    }
    let len = mechanism.ulParameterLen as usize;
    // SAFETY: the caller vouches for `len` readable bytes.
    let original = unsafe { std::slice::from_raw_parts(mechanism.pParameter as *const u8, len) };
    let mut parameter: Box<[u8]> = original.into();
    for (offset, handle) in offsets.iter().zip(member_handles) {
        parameter[*offset..*offset + size_of::<CK_OBJECT_HANDLE>()]
            .copy_from_slice(&handle.to_ne_bytes());
    }
    let mut copy = *mechanism;
    copy.pParameter = parameter.as_mut_ptr() as *mut _;
    Ok(MemberMechanism {
        mechanism: copy,
        _parameter: Some(parameter),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenate_base_and_key_handle_is_rewritten() {
        let mut virtual_handle: CK_OBJECT_HANDLE = 42;
        let mechanism = CK_MECHANISM {
            mechanism: CKM_CONCATENATE_BASE_AND_KEY,
            pParameter: &mut virtual_handle as *mut _ as *mut _,
            ulParameterLen: size_of::<CK_OBJECT_HANDLE>() as CK_ULONG,
        };
        // SAFETY: the parameter points to a live handle of the stated size.
        unsafe {
            assert_eq!(parameter_handles(&mechanism).unwrap(), vec![42]);
            let mut mapped = for_member(&mechanism, &[7]).unwrap();
            let param = (*mapped.as_ptr()).pParameter as *const CK_OBJECT_HANDLE;
            assert_eq!(*param, 7);
        }
        assert_eq!(
            virtual_handle, 42,
            "the application's parameter is untouched"
        );
    }

    #[test]
    fn wrong_parameter_size_is_rejected() {
        let mut handle: CK_OBJECT_HANDLE = 1;
        let mechanism = CK_MECHANISM {
            mechanism: CKM_CONCATENATE_BASE_AND_KEY,
            pParameter: &mut handle as *mut _ as *mut _,
            ulParameterLen: 3,
        };
        // SAFETY: the size is wrong on purpose; nothing is read.
        let got = unsafe { parameter_handles(&mechanism) };
        assert_eq!(got, Err(Error::new(CKR_MECHANISM_PARAM_INVALID)));
    }
}

/// A mechanism copied deep enough to be sent again after the application's
/// call has returned (and its parameter memory may be gone): what failover
/// needs to start an operation again on another member.
pub struct SavedMechanism {
    mechanism: CK_MECHANISM,
    _storage: Storage,
}

// SAFETY: the raw pointers point into `_storage`, owned by this value.
unsafe impl Send for SavedMechanism {}

impl SavedMechanism {
    pub fn as_ptr(&mut self) -> CK_MECHANISM_PTR {
        &mut self.mechanism
    }
}

/// Mechanisms whose parameter is plain bytes (an IV, a counter block, PSS
/// settings): a byte copy is a faithful copy.
fn parameter_is_flat(mechanism: CK_MECHANISM_TYPE) -> bool {
    matches!(
        mechanism,
        CKM_AES_CBC
            | CKM_AES_CBC_PAD
            | CKM_AES_CTR
            | CKM_AES_CTS
            | CKM_AES_OFB
            | CKM_AES_CFB8
            | CKM_AES_CFB64
            | CKM_AES_CFB128
            | CKM_DES3_CBC
            | CKM_DES3_CBC_PAD
            | CKM_RSA_PKCS_PSS
            | CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA224_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS
            | CKM_AES_CMAC_GENERAL
            | CKM_SHA_1_HMAC_GENERAL
            | CKM_SHA256_HMAC_GENERAL
            | CKM_SHA384_HMAC_GENERAL
            | CKM_SHA512_HMAC_GENERAL
    )
}

/// A saved parameter and the buffers it points to, in one allocation (one
/// per operation start, on the path of every operation) whose address
/// stays put when the [`SavedMechanism`] moves. Word-aligned, as the
/// parameter structs need.
struct Storage {
    words: Box<[u64]>,
    used_bytes: usize,
}

impl Storage {
    /// Room for buffers of these lengths.
    fn for_lengths(lengths: &[CK_ULONG]) -> Self {
        let words = lengths.iter().map(|l| words_for(*l)).sum();
        Storage {
            words: vec![0; words].into_boxed_slice(),
            used_bytes: 0,
        }
    }

    /// Copies `len` bytes at `pointer` in; null for an empty buffer, or
    /// if there is no room (never, with the lengths given up front).
    ///
    /// # Safety
    /// `pointer` must be readable for `len` bytes, or null with `len` 0.
    unsafe fn own(&mut self, pointer: *const u8, len: CK_ULONG) -> *mut u8 {
        let capacity = self.words.len() * size_of::<u64>();
        let room = words_for(len) * size_of::<u64>();
        if pointer.is_null() || len == 0 || self.used_bytes + room > capacity {
            return std::ptr::null_mut();
        }
        // SAFETY: within the allocation (checked above); the caller vouches
        // for the source.
        unsafe {
            let target = (self.words.as_mut_ptr() as *mut u8).add(self.used_bytes);
            std::ptr::copy_nonoverlapping(pointer, target, len as usize);
            self.used_bytes += room;
            target
        }
    }
}

fn words_for(len: CK_ULONG) -> usize {
    (len as usize).div_ceil(size_of::<u64>())
}

/// A deep copy of `mechanism`, or `None` where its parameter holds pointers
/// we do not know how to follow; an operation with such a mechanism cannot
/// be moved to another member after its `*Init`.
///
/// # Safety
/// `mechanism` and its parameter must be valid, as in an `*Init` call.
pub unsafe fn save(mechanism: &CK_MECHANISM) -> Option<SavedMechanism> {
    let mut storage = Storage::for_lengths(&[]);
    let mut copy = *mechanism;
    let len = mechanism.ulParameterLen;
    let param = mechanism.pParameter as *const u8;
    // SAFETY (all blocks): the parameter is valid for its stated length, and
    // the structs are read only after their size was checked.
    if param.is_null() || len == 0 {
        copy.pParameter = std::ptr::null_mut();
        copy.ulParameterLen = 0;
    } else if parameter_is_flat(mechanism.mechanism) {
        storage = Storage::for_lengths(&[len]);
        copy.pParameter = unsafe { storage.own(param, len) } as *mut _;
    } else if mechanism.mechanism == CKM_AES_GCM && len as usize == size_of::<CK_GCM_PARAMS>() {
        let mut gcm = unsafe { std::ptr::read_unaligned(param as *const CK_GCM_PARAMS) };
        storage = Storage::for_lengths(&[len, gcm.ulIvLen, gcm.ulAADLen]);
        gcm.pIv = unsafe { storage.own(gcm.pIv, gcm.ulIvLen) };
        gcm.pAAD = unsafe { storage.own(gcm.pAAD, gcm.ulAADLen) };
        copy.pParameter = unsafe { storage.own(&gcm as *const _ as *const u8, len) } as *mut _;
    } else if mechanism.mechanism == CKM_RSA_PKCS_OAEP
        && len as usize == size_of::<CK_RSA_PKCS_OAEP_PARAMS>()
    {
        let mut oaep = unsafe { std::ptr::read_unaligned(param as *const CK_RSA_PKCS_OAEP_PARAMS) };
        storage = Storage::for_lengths(&[len, oaep.ulSourceDataLen]);
        oaep.pSourceData =
            unsafe { storage.own(oaep.pSourceData as *const u8, oaep.ulSourceDataLen) } as *mut _;
        copy.pParameter = unsafe { storage.own(&oaep as *const _ as *const u8, len) } as *mut _;
    } else {
        return None;
    }
    Some(SavedMechanism {
        mechanism: copy,
        _storage: storage,
    })
}

#[cfg(test)]
mod saved_tests {
    use super::*;

    #[test]
    fn gcm_parameters_survive_the_application_freeing_them() {
        let mut iv = vec![1u8; 12];
        let mut aad = vec![2u8; 5];
        let mut params = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: 5,
            ulTagBits: 128,
        };
        let mechanism = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: &mut params as *mut _ as *mut _,
            ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        };
        // SAFETY: a valid GCM mechanism.
        let saved = unsafe { save(&mechanism) }.expect("GCM is replayable");
        iv.fill(0);
        aad.fill(0);
        drop((iv, aad));
        // Moved, as an operation's saved mechanism is: the copy must not
        // point into the old place.
        let mut saved = Box::new(saved);
        // SAFETY: the saved copy owns everything it points to.
        unsafe {
            let copy = &*((*saved.as_ptr()).pParameter as *const CK_GCM_PARAMS);
            assert_eq!(std::slice::from_raw_parts(copy.pIv, 12), &[1u8; 12]);
            assert_eq!(std::slice::from_raw_parts(copy.pAAD, 5), &[2u8; 5]);
            assert_eq!(copy.ulTagBits, 128);
        }
    }

    #[test]
    fn unknown_pointer_parameters_are_not_replayable() {
        let mut opaque = [0u8; 16];
        let mechanism = CK_MECHANISM {
            mechanism: CKM_ECDH1_DERIVE,
            pParameter: opaque.as_mut_ptr() as *mut _,
            ulParameterLen: 16,
        };
        // SAFETY: a readable parameter of the stated length.
        assert!(unsafe { save(&mechanism) }.is_none());
    }
}
