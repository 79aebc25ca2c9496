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
