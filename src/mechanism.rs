//! Mechanism parameters: checked before any member sees them (an
//! application's mechanism that passed is a [`Mechanism`]), copied for
//! failover (templates too: [`OwnedTemplate`]), and the object handles
//! inside them. On a virtual slot the
//! application passes virtual handles there too, and each must become the
//! chosen member's handle before the mechanism reaches that member.

use crate::arguments::{required, Template, TemplateBuilder};
use crate::error::{Error, Result};
use cryptoki_sys::*;
use smallvec::SmallVec;
use std::mem::size_of;

/// A mechanism whose parameter may have been rewritten for one member; it
/// owns the rewritten parameter so the pointer it hands out stays valid.
pub struct MemberMechanism {
    mechanism: CK_MECHANISM,
    _parameter: Option<Box<[u8]>>,
}

impl MemberMechanism {
    /// The mechanism as a member call takes it.
    pub fn as_raw(&self) -> &CK_MECHANISM {
        &self.mechanism
    }
}

/// A mechanism without a parameter, made by the core itself: a digest it
/// starts for the application, replication's key wrap and key-pair
/// generation.
pub struct BareMechanism(CK_MECHANISM);

impl BareMechanism {
    #[inline(always)]
    pub fn new(mechanism: CK_MECHANISM_TYPE) -> Self {
        BareMechanism(CK_MECHANISM {
            mechanism,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        })
    }

    /// As an application's mechanism of this type without a parameter:
    /// refused as [`check_parameter`] refuses such a one.
    pub fn checked(&self) -> Result<Mechanism<'_>> {
        // SAFETY: no parameter, so nothing is read.
        unsafe { Mechanism::new(&self.0 as *const _ as *mut _) }
    }

    /// The mechanism as a member call takes it.
    #[inline(always)]
    pub fn as_raw(&self) -> &CK_MECHANISM {
        &self.0
    }
}

/// An application's mechanism, checked once where `ffi/` takes it
/// ([`check_parameter`]) and borrowed for the call: the core reads its type
/// and parameter through it, and a member call gets it back as the
/// application's pointer.
#[derive(Clone, Copy)]
pub struct Mechanism<'a> {
    mechanism: &'a CK_MECHANISM,
}

impl<'a> Mechanism<'a> {
    /// `CKR_ARGUMENTS_BAD` for a null mechanism; a malformed parameter is
    /// refused as [`check_parameter`] says.
    ///
    /// # Safety
    /// `mechanism`, when not null, must point to a mechanism whose
    /// parameter, and the buffers a standard parameter points to, are
    /// readable for their stated lengths during `'a`.
    #[inline(always)]
    pub unsafe fn new(mechanism: CK_MECHANISM_PTR) -> Result<Self> {
        required(mechanism)?;
        // SAFETY: not null; the caller vouches for the rest.
        let mechanism = unsafe { &*mechanism };
        // SAFETY: as the caller vouches.
        unsafe { check_parameter(mechanism) }?;
        Ok(Mechanism { mechanism })
    }

    /// The parameter's bytes; empty for none.
    pub fn parameter(&self) -> &'a [u8] {
        let len = self.mechanism.ulParameterLen as usize;
        if self.mechanism.pParameter.is_null() || len == 0 {
            return &[];
        }
        // SAFETY: readable for its length during `'a`, as the caller of
        // `new` vouched.
        unsafe { std::slice::from_raw_parts(self.mechanism.pParameter as *const u8, len) }
    }

    /// The mechanism as a member call takes it.
    pub fn as_raw(&self) -> &'a CK_MECHANISM {
        self.mechanism
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
pub fn parameter_handles(mechanism: &Mechanism) -> Result<Vec<CK_OBJECT_HANDLE>> {
    const SIZE: usize = size_of::<CK_OBJECT_HANDLE>();
    let offsets = handle_offsets(mechanism.mechanism)?;
    let parameter = mechanism.parameter();
    Ok(offsets
        .iter()
        .map(|&o| {
            let mut handle = [0u8; SIZE];
            // Offsets lie inside a parameter whose size was checked.
            handle.copy_from_slice(&parameter[o..o + SIZE]);
            CK_OBJECT_HANDLE::from_ne_bytes(handle)
        })
        .collect())
}

/// A copy of the mechanism with the member's handles, in the order
/// `parameter_handles` returned the virtual ones, written into its
/// parameter.
pub fn for_member(
    mechanism: &Mechanism,
    member_handles: &[CK_OBJECT_HANDLE],
) -> Result<MemberMechanism> {
    let offsets = handle_offsets(mechanism.mechanism)?;
    if offsets.is_empty() {
        return Ok(MemberMechanism {
            mechanism: *mechanism.mechanism,
            _parameter: None,
        });
    }
    let mut parameter: Box<[u8]> = mechanism.parameter().into();
    for (offset, handle) in offsets.iter().zip(member_handles) {
        parameter[*offset..*offset + size_of::<CK_OBJECT_HANDLE>()]
            .copy_from_slice(&handle.to_ne_bytes());
    }
    let mut copy = *mechanism.mechanism;
    copy.pParameter = parameter.as_mut_ptr() as *mut _;
    Ok(MemberMechanism {
        mechanism: copy,
        _parameter: Some(parameter),
    })
}

/// A template the core holds past the call that gave it, its values
/// zeroized when dropped: an application's `C_CreateObject` template, kept
/// until every member that was down has the object (the application
/// handed us the values, and a member behind a client library that
/// carries no key-wrap mechanism can receive them no other way), a
/// search's for failover, or one read from a member for a copy on
/// another. Nested templates are copied as templates, not as the C array
/// that pointed into the application's memory.
#[derive(Default)]
pub struct OwnedTemplate {
    attributes: Vec<(CK_ATTRIBUTE_TYPE, OwnedValue)>,
}

enum OwnedValue {
    Bytes(zeroize::Zeroizing<Vec<u8>>),
    Nested(OwnedTemplate),
}

impl OwnedTemplate {
    pub fn copy(template: &Template) -> OwnedTemplate {
        let mut copy = OwnedTemplate::default();
        for a in template.iter() {
            match a.nested() {
                Some(inner) => copy.push_nested(a.kind(), OwnedTemplate::copy(&inner)),
                None => copy.push(a.kind(), a.value().unwrap_or_default().to_vec()),
            }
        }
        copy
    }

    /// Adds an attribute of `value`.
    pub fn push(&mut self, kind: CK_ATTRIBUTE_TYPE, value: Vec<u8>) {
        let value = OwnedValue::Bytes(zeroize::Zeroizing::new(value));
        self.attributes.push((kind, value));
    }

    /// Adds a nested-template attribute of `inner`.
    pub fn push_nested(&mut self, kind: CK_ATTRIBUTE_TYPE, inner: OwnedTemplate) {
        self.attributes.push((kind, OwnedValue::Nested(inner)));
    }

    /// The fingerprint of the object this template makes, where it
    /// identifies one (see [`crate::identity::print_of_template`]).
    pub fn print(&self) -> Option<crate::identity::Fingerprint> {
        crate::identity::print_of_template(self.values())
    }

    /// The template's attributes with their values, nested templates left
    /// out.
    pub fn values(&self) -> impl Iterator<Item = (CK_ATTRIBUTE_TYPE, &[u8])> + Clone {
        self.attributes.iter().filter_map(|(t, v)| match v {
            OwnedValue::Bytes(bytes) => Some((*t, bytes.as_slice())),
            OwnedValue::Nested(_) => None,
        })
    }

    /// The template borrowed, as a member call takes it.
    pub fn template(&self) -> Template<'_> {
        let mut built = TemplateBuilder::with_capacity(self.attributes.len());
        for (t, v) in &self.attributes {
            match v {
                OwnedValue::Bytes(bytes) => built.push_value(*t, bytes),
                OwnedValue::Nested(inner) => built.push_nested(*t, inner.template()),
            }
        }
        built.build()
    }
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
        let checked = unsafe { Mechanism::new(&mechanism as *const _ as *mut _) }.unwrap();
        assert_eq!(parameter_handles(&checked).unwrap(), vec![42]);
        let mapped = for_member(&checked, &[7]).unwrap();
        // SAFETY: the mapped copy owns its parameter, one handle.
        unsafe {
            let param = mapped.as_raw().pParameter as *const CK_OBJECT_HANDLE;
            assert_eq!(*param, 7);
        }
        assert_eq!(
            virtual_handle, 42,
            "the application's parameter is untouched"
        );
    }

    #[test]
    fn an_owned_template_keeps_its_nested_values_past_the_call() {
        let mut label = *b"app";
        let mut inner = [CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: label.as_mut_ptr().cast(),
            ulValueLen: 3,
        }];
        let raw = [CK_ATTRIBUTE {
            type_: CKA_UNWRAP_TEMPLATE,
            pValue: inner.as_mut_ptr().cast(),
            ulValueLen: size_of::<CK_ATTRIBUTE>() as CK_ULONG,
        }];
        // SAFETY: a live local template.
        let given = unsafe { Template::giving_values(raw.as_ptr() as *mut _, 1) }.unwrap();
        let kept = OwnedTemplate::copy(&given);
        label.copy_from_slice(b"new");
        let lent = kept.template();
        let nested = lent.iter().next().and_then(|a| a.nested()).unwrap();
        let values: Vec<_> = nested.values().collect();
        assert_eq!(
            values,
            [(CKA_LABEL, &b"app"[..])],
            "a copy, not the application's memory"
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
        let got = unsafe { Mechanism::new(&mechanism as *const _ as *mut _) };
        assert_eq!(got.err(), Some(Error::new(CKR_MECHANISM_PARAM_INVALID)));
    }
}

/// A mechanism copied deep enough to be sent again after the application's
/// call has returned (and its parameter memory may be gone): what failover
/// needs to start an operation again on another member.
///
/// Small parameters are held inline, with no allocation: every operation
/// start saves one, and an allocation that lives across the member's own
/// allocations measurably slows the member's allocator. Pointers inside
/// the parameter are therefore set when the mechanism is used
/// ([`SavedMechanism::as_ptr`]), not when it is saved.
pub struct SavedMechanism {
    mechanism: CK_MECHANISM,
    /// The parameter at offset 0, then the buffers it points to.
    storage: SmallVec<[u64; INLINE_WORDS]>,
    layout: Layout,
}

/// Room for a GCM parameter with a 16-byte IV and 56 bytes of AAD.
const INLINE_WORDS: usize = 16;

/// Where the parameter's pointers point: offsets into the storage.
#[derive(Clone, Copy)]
enum Layout {
    /// No mechanism (a search), or one whose parameter could not be saved.
    Absent,
    /// A mechanism without a parameter.
    Empty,
    Flat,
    Gcm {
        iv: Option<usize>,
        aad: Option<usize>,
    },
    Oaep {
        source: Option<usize>,
    },
}

impl Default for SavedMechanism {
    fn default() -> Self {
        SavedMechanism {
            mechanism: CK_MECHANISM {
                mechanism: 0,
                pParameter: std::ptr::null_mut(),
                ulParameterLen: 0,
            },
            storage: SmallVec::new(),
            layout: Layout::Absent,
        }
    }
}

// SAFETY: the raw pointers point into `storage`, owned by this value.
unsafe impl Send for SavedMechanism {}

impl SavedMechanism {
    /// The mechanism, its pointers aimed at this value's storage where it
    /// is now (null if none was saved). Valid until the value moves or is
    /// dropped.
    pub fn as_ptr(&mut self) -> CK_MECHANISM_PTR {
        if matches!(self.layout, Layout::Absent) {
            return std::ptr::null_mut();
        }
        let base = self.storage.as_mut_ptr() as *mut u8;
        let at = |offset: Option<usize>| {
            // SAFETY: offsets were recorded within the storage.
            offset.map_or(std::ptr::null_mut(), |o| unsafe { base.add(o) })
        };
        // SAFETY: offset 0 holds a parameter struct of the recorded kind,
        // word-aligned.
        unsafe {
            match self.layout {
                Layout::Absent | Layout::Empty | Layout::Flat => {}
                Layout::Gcm { iv, aad } => {
                    let gcm = base as *mut CK_GCM_PARAMS;
                    (*gcm).pIv = at(iv);
                    (*gcm).pAAD = at(aad);
                }
                Layout::Oaep { source } => {
                    let oaep = base as *mut CK_RSA_PKCS_OAEP_PARAMS;
                    (*oaep).pSourceData = at(source) as *mut _;
                }
            }
        }
        self.mechanism.pParameter = match self.layout {
            Layout::Absent | Layout::Empty => std::ptr::null_mut(),
            _ => base as *mut _,
        };
        &mut self.mechanism
    }

    /// [`Self::as_ptr`] as a member call takes it: `None` if no mechanism
    /// was saved.
    pub fn as_raw(&mut self) -> Option<&CK_MECHANISM> {
        if self.as_ptr().is_null() {
            return None;
        }
        Some(&self.mechanism)
    }

    /// Appends `len` bytes at `pointer`, word-aligned; returns their offset,
    /// or `None` for an empty buffer.
    ///
    /// # Safety
    /// `pointer` must be readable for `len` bytes, or null with `len` 0.
    unsafe fn append(&mut self, pointer: *const u8, len: CK_ULONG) -> Option<usize> {
        if pointer.is_null() || len == 0 {
            return None;
        }
        let offset = self.storage.len() * size_of::<u64>();
        let words = (len as usize).div_ceil(size_of::<u64>());
        self.storage.resize(self.storage.len() + words, 0);
        // SAFETY: the storage now has room at `offset` for `len` bytes; the
        // caller vouches for the source.
        unsafe {
            let target = (self.storage.as_mut_ptr() as *mut u8).add(offset);
            std::ptr::copy_nonoverlapping(pointer, target, len as usize);
        }
        Some(offset)
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

impl SavedMechanism {
    /// Copies `mechanism` in, reusing the room of the mechanism saved
    /// before: every operation start saves one. False, with nothing kept,
    /// where the parameter holds pointers we do not know how to follow; an
    /// operation with such a mechanism cannot be moved to another member
    /// after its `*Init`. No mechanism (a search) is kept as null.
    ///
    /// Inlined up to the parameter, which most operations lack.
    #[inline(always)]
    pub fn save(&mut self, mechanism: Option<&Mechanism>) -> bool {
        self.storage.clear();
        self.layout = Layout::Absent;
        let Some(mechanism) = mechanism else {
            return true;
        };
        self.mechanism = *mechanism.mechanism;
        if self.mechanism.pParameter.is_null() || self.mechanism.ulParameterLen == 0 {
            self.mechanism.ulParameterLen = 0;
            self.layout = Layout::Empty;
            return true;
        }
        // SAFETY: the parameter of a `Mechanism`, readable for its stated
        // length, the buffers of a standard one checked and readable too.
        unsafe { self.save_parameter() }
    }

    /// # Safety
    /// `self.mechanism`'s parameter must be valid for its stated length.
    unsafe fn save_parameter(&mut self) -> bool {
        let mechanism = self.mechanism;
        let len = mechanism.ulParameterLen;
        let param = mechanism.pParameter as *const u8;
        // SAFETY (all blocks): the parameter is valid for its stated length,
        // and the structs are read only after their size was checked.
        self.layout = if parameter_is_flat(mechanism.mechanism) {
            unsafe { self.append(param, len) };
            Layout::Flat
        } else if mechanism.mechanism == CKM_AES_GCM && len as usize == size_of::<CK_GCM_PARAMS>() {
            let gcm = unsafe { std::ptr::read_unaligned(param as *const CK_GCM_PARAMS) };
            unsafe { self.append(param, len) };
            let iv = unsafe { self.append(gcm.pIv, gcm.ulIvLen) };
            let aad = unsafe { self.append(gcm.pAAD, gcm.ulAADLen) };
            Layout::Gcm { iv, aad }
        } else if mechanism.mechanism == CKM_RSA_PKCS_OAEP
            && len as usize == size_of::<CK_RSA_PKCS_OAEP_PARAMS>()
        {
            let oaep = unsafe { std::ptr::read_unaligned(param as *const CK_RSA_PKCS_OAEP_PARAMS) };
            unsafe { self.append(param, len) };
            let source =
                unsafe { self.append(oaep.pSourceData as *const u8, oaep.ulSourceDataLen) };
            Layout::Oaep { source }
        } else {
            self.storage.clear();
            return false;
        };
        true
    }
}

#[cfg(test)]
mod saved_tests {
    use super::*;

    /// `mechanism` saved into a fresh value, or `None` if it cannot be.
    fn saved(mechanism: &CK_MECHANISM) -> Option<SavedMechanism> {
        let mut saved = SavedMechanism::default();
        let kept = saved.save(Some(&checked(mechanism)));
        kept.then_some(saved)
    }

    fn checked(mechanism: &CK_MECHANISM) -> Mechanism<'_> {
        // SAFETY: the tests pass valid mechanisms.
        unsafe { Mechanism::new(mechanism as *const _ as CK_MECHANISM_PTR) }.unwrap()
    }

    /// GCM parameters pointing at `iv` and `aad`.
    fn gcm_params(iv: &mut [u8], aad: &mut [u8], tag_bits: CK_ULONG) -> CK_GCM_PARAMS {
        CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: iv.len() as CK_ULONG,
            ulIvBits: 8 * iv.len() as CK_ULONG,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: aad.len() as CK_ULONG,
            ulTagBits: tag_bits,
        }
    }

    /// A GCM mechanism with `params` as its parameter.
    fn gcm(params: &mut CK_GCM_PARAMS) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: params as *mut _ as *mut _,
            ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        }
    }

    #[test]
    fn gcm_parameters_survive_the_application_freeing_them() {
        let mut iv = vec![1u8; 12];
        let mut aad = vec![2u8; 5];
        let mut params = gcm_params(&mut iv, &mut aad, 128);
        let mechanism = gcm(&mut params);
        let saved = saved(&mechanism).expect("GCM is replayable");
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
    fn parameters_larger_than_the_inline_room_are_copied_too() {
        let mut iv = [3u8; 16];
        let mut aad = vec![4u8; 300];
        let mut params = gcm_params(&mut iv, &mut aad, 96);
        let mechanism = gcm(&mut params);
        let saved = saved(&mechanism).expect("GCM is replayable");
        aad.fill(0);
        let mut saved = Box::new(saved);
        // SAFETY: the saved copy owns everything it points to.
        unsafe {
            let copy = &*((*saved.as_ptr()).pParameter as *const CK_GCM_PARAMS);
            assert_eq!(std::slice::from_raw_parts(copy.pIv, 16), &[3u8; 16]);
            assert_eq!(std::slice::from_raw_parts(copy.pAAD, 300), &[4u8; 300][..]);
            assert_eq!(copy.ulTagBits, 96);
        }
    }

    #[test]
    fn unknown_pointer_parameters_are_not_replayable() {
        let mut public = [4u8; 65];
        let mut params = CK_ECDH1_DERIVE_PARAMS {
            kdf: CKD_NULL,
            ulSharedDataLen: 0,
            pSharedData: std::ptr::null_mut(),
            ulPublicDataLen: public.len() as CK_ULONG,
            pPublicData: public.as_mut_ptr(),
        };
        let mechanism = CK_MECHANISM {
            mechanism: CKM_ECDH1_DERIVE,
            pParameter: &mut params as *mut _ as *mut _,
            ulParameterLen: size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
        };
        assert!(saved(&mechanism).is_none());
    }

    #[test]
    fn a_reused_value_keeps_nothing_of_the_mechanism_before() {
        let mut iv = [5u8; 16];
        let cbc = CK_MECHANISM {
            mechanism: CKM_AES_CBC,
            pParameter: iv.as_mut_ptr() as *mut _,
            ulParameterLen: 16,
        };
        let digest = CK_MECHANISM {
            mechanism: CKM_SHA256,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut slot = SavedMechanism::default();
        assert!(slot.save(Some(&checked(&cbc))));
        assert!(slot.save(Some(&checked(&digest))));
        // SAFETY: the saved copy is read while `slot` stays in place.
        let copy = unsafe { &*slot.as_ptr() };
        assert_eq!(copy.mechanism, CKM_SHA256);
        assert!(copy.pParameter.is_null());
        assert_eq!(copy.ulParameterLen, 0);
        assert!(slot.save(None));
        assert!(slot.as_ptr().is_null(), "a search has no mechanism");
    }
}

/// The longest IV or nonce any standard mechanism takes (GCM allows more in
/// theory; no token does).
const MAX_IV_LEN: CK_ULONG = 256;
/// The longest data buffer (AAD, KDF data, OAEP label) accepted: beyond
/// this a length is a corrupt value, and SoftHSM `exit`s on allocating it.
pub const MAX_BUFFER_LEN: CK_ULONG = 1 << 31;
/// The longest public value in a key-agreement parameter (an uncompressed
/// P-521 point is 133 bytes; a DH public value 1 KiB).
const MAX_PUBLIC_LEN: CK_ULONG = 1 << 16;

/// Checks a mechanism's parameter before any member sees it: structure
/// size, pointer/length pairs and bounds for every mechanism whose
/// parameter layout pkcs11-ha knows, so that a malformed parameter is
/// answered here instead of crashing a member (SoftHSM dereferences a NULL
/// IV with a length, and `exit`s on a 2^40-byte one). Vendor mechanisms
/// pass untouched: only their token knows their layout.
///
/// # Safety
/// `mechanism.pParameter`, when not null, must point to
/// `ulParameterLen` readable bytes.
pub unsafe fn check_parameter(mechanism: &CK_MECHANISM) -> Result<()> {
    if mechanism.mechanism >= CKM_VENDOR_DEFINED {
        return Ok(());
    }
    let param = mechanism.pParameter as *const u8;
    let len = mechanism.ulParameterLen;
    if param.is_null() && len != 0 {
        return Err(Error::new(CKR_ARGUMENTS_BAD));
    }
    let invalid = || Error::new(CKR_MECHANISM_PARAM_INVALID);
    let valid = |ok: bool| if ok { Ok(()) } else { Err(invalid()) };
    /// The parameter as a `T`, if it is exactly one.
    ///
    /// # Safety
    /// As for [`check_parameter`].
    unsafe fn read<T: Copy>(param: *const u8, len: CK_ULONG) -> Result<T> {
        if param.is_null() || len as usize != size_of::<T>() {
            return Err(Error::new(CKR_MECHANISM_PARAM_INVALID));
        }
        // SAFETY: `len` readable bytes, the size of a `T`.
        Ok(unsafe { std::ptr::read_unaligned(param as *const T) })
    }
    /// A buffer inside the parameter: NULL only when empty, at most `max`.
    fn pair(pointer: *const u8, len: CK_ULONG, max: CK_ULONG) -> Result<()> {
        if (pointer.is_null() && len != 0) || len > max {
            Err(Error::new(CKR_MECHANISM_PARAM_INVALID))
        } else {
            Ok(())
        }
    }
    // SAFETY (every `read`): the caller vouches for the parameter.
    match mechanism.mechanism {
        CKM_AES_GCM => {
            let gcm: CK_GCM_PARAMS = unsafe { read(param, len) }?;
            pair(gcm.pIv, gcm.ulIvLen, MAX_IV_LEN)?;
            valid(gcm.ulIvLen > 0)?;
            pair(gcm.pAAD, gcm.ulAADLen, MAX_BUFFER_LEN)?;
            valid(gcm.ulTagBits <= 128)
        }
        CKM_AES_CCM => {
            let ccm: CK_CCM_PARAMS = unsafe { read(param, len) }?;
            pair(ccm.pNonce, ccm.ulNonceLen, 13)?;
            valid(ccm.ulNonceLen >= 7)?;
            pair(ccm.pAAD, ccm.ulAADLen, MAX_BUFFER_LEN)?;
            valid((4..=16).contains(&ccm.ulMACLen) && ccm.ulMACLen % 2 == 0)?;
            valid(ccm.ulDataLen <= MAX_BUFFER_LEN)
        }
        CKM_AES_CBC | CKM_AES_CBC_PAD | CKM_AES_CTS | CKM_AES_OFB | CKM_AES_CFB8
        | CKM_AES_CFB64 | CKM_AES_CFB128 => valid(!param.is_null() && len == 16),
        CKM_DES_CBC | CKM_DES_CBC_PAD | CKM_DES3_CBC | CKM_DES3_CBC_PAD => {
            valid(!param.is_null() && len == 8)
        }
        CKM_AES_CTR => {
            let ctr: CK_AES_CTR_PARAMS = unsafe { read(param, len) }?;
            valid((1..=128).contains(&ctr.ulCounterBits))
        }
        CKM_AES_KEY_WRAP => valid(len == 0 || len == 8),
        CKM_AES_KEY_WRAP_PAD => valid(len == 0 || len == 4 || len == 8),
        CKM_RSA_PKCS_OAEP => {
            let oaep: CK_RSA_PKCS_OAEP_PARAMS = unsafe { read(param, len) }?;
            pair(
                oaep.pSourceData as *const u8,
                oaep.ulSourceDataLen,
                MAX_BUFFER_LEN,
            )
        }
        CKM_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => {
            let pss: CK_RSA_PKCS_PSS_PARAMS = unsafe { read(param, len) }?;
            valid(pss.sLen <= MAX_PUBLIC_LEN)
        }
        CKM_ECDH1_DERIVE | CKM_ECDH1_COFACTOR_DERIVE => {
            let ecdh: CK_ECDH1_DERIVE_PARAMS = unsafe { read(param, len) }?;
            pair(ecdh.pSharedData, ecdh.ulSharedDataLen, MAX_BUFFER_LEN)?;
            pair(ecdh.pPublicData, ecdh.ulPublicDataLen, MAX_PUBLIC_LEN)?;
            valid(ecdh.ulPublicDataLen > 0)
        }
        CKM_ECMQV_DERIVE => {
            let mqv: CK_ECMQV_DERIVE_PARAMS = unsafe { read(param, len) }?;
            pair(mqv.pSharedData, mqv.ulSharedDataLen, MAX_BUFFER_LEN)?;
            pair(mqv.pPublicData, mqv.ulPublicDataLen, MAX_PUBLIC_LEN)?;
            pair(mqv.pPublicData2, mqv.ulPublicDataLen2, MAX_PUBLIC_LEN)
        }
        CKM_CONCATENATE_BASE_AND_DATA
        | CKM_CONCATENATE_DATA_AND_BASE
        | CKM_XOR_BASE_AND_DATA
        | CKM_AES_ECB_ENCRYPT_DATA
        | CKM_DES_ECB_ENCRYPT_DATA
        | CKM_DES3_ECB_ENCRYPT_DATA => {
            let data: CK_KEY_DERIVATION_STRING_DATA = unsafe { read(param, len) }?;
            pair(data.pData, data.ulLen, MAX_BUFFER_LEN)
        }
        CKM_AES_CBC_ENCRYPT_DATA => {
            let data: CK_AES_CBC_ENCRYPT_DATA_PARAMS = unsafe { read(param, len) }?;
            pair(data.pData, data.length, MAX_BUFFER_LEN)
        }
        CKM_DES_CBC_ENCRYPT_DATA | CKM_DES3_CBC_ENCRYPT_DATA => {
            let data: CK_DES_CBC_ENCRYPT_DATA_PARAMS = unsafe { read(param, len) }?;
            pair(data.pData, data.length, MAX_BUFFER_LEN)
        }
        // The parameter is optional; the context is at most 255 bytes.
        CKM_EDDSA if len == 0 => Ok(()),
        CKM_EDDSA => {
            let eddsa: CK_EDDSA_PARAMS = unsafe { read(param, len) }?;
            pair(eddsa.pContextData, eddsa.ulContextDataLen, 255)
        }
        CKM_HKDF_DERIVE | CKM_HKDF_DATA => {
            let hkdf: CK_HKDF_PARAMS = unsafe { read(param, len) }?;
            if hkdf.ulSaltType == CKF_HKDF_SALT_DATA {
                pair(hkdf.pSalt, hkdf.ulSaltLen, MAX_BUFFER_LEN)?;
            }
            pair(hkdf.pInfo, hkdf.ulInfoLen, MAX_BUFFER_LEN)
        }
        // Their handles are read at fixed offsets: the size must be right.
        CKM_CONCATENATE_BASE_AND_KEY | CKM_X9_42_DH_HYBRID_DERIVE | CKM_X9_42_MQV_DERIVE => {
            handle_offsets(mechanism).map(|_| ())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod parameter_tests {
    use super::*;

    fn gcm_mechanism(params: &mut CK_GCM_PARAMS) -> CK_MECHANISM {
        CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: params as *mut _ as *mut _,
            ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        }
    }

    fn checked(mechanism: &CK_MECHANISM) -> CK_RV {
        // SAFETY: the tests' parameters are live locals of the stated size.
        match unsafe { check_parameter(mechanism) } {
            Ok(()) => CKR_OK,
            Err(e) => e.rv,
        }
    }

    #[test]
    fn gcm_pointer_length_pairs_and_bounds() {
        let mut iv = [0u8; 12];
        let mut aad = [0u8; 16];
        let good = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: 16,
            ulTagBits: 128,
        };
        let cases: [(CK_GCM_PARAMS, CK_RV); 6] = [
            (good, CKR_OK),
            (
                CK_GCM_PARAMS {
                    pIv: std::ptr::null_mut(),
                    ..good
                },
                CKR_MECHANISM_PARAM_INVALID,
            ),
            (
                CK_GCM_PARAMS {
                    pAAD: std::ptr::null_mut(),
                    ..good
                },
                CKR_MECHANISM_PARAM_INVALID,
            ),
            (
                CK_GCM_PARAMS {
                    ulIvLen: 1 << 40,
                    ..good
                },
                CKR_MECHANISM_PARAM_INVALID,
            ),
            (
                CK_GCM_PARAMS {
                    ulTagBits: 129,
                    ..good
                },
                CKR_MECHANISM_PARAM_INVALID,
            ),
            (
                CK_GCM_PARAMS {
                    pAAD: std::ptr::null_mut(),
                    ulAADLen: 0,
                    ..good
                },
                CKR_OK,
            ),
        ];
        for (mut params, want) in cases {
            assert_eq!(checked(&gcm_mechanism(&mut params)), want);
        }
        let mut params = good;
        let mut short = gcm_mechanism(&mut params);
        short.ulParameterLen -= 8;
        assert_eq!(checked(&short), CKR_MECHANISM_PARAM_INVALID);
    }

    #[test]
    fn a_null_parameter_with_a_length_is_arguments_bad() {
        let mechanism = CK_MECHANISM {
            mechanism: CKM_SHA256,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 4,
        };
        assert_eq!(checked(&mechanism), CKR_ARGUMENTS_BAD);
    }

    #[test]
    fn vendor_mechanisms_pass_untouched() {
        let mechanism = CK_MECHANISM {
            mechanism: CKM_VENDOR_DEFINED + 7,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 4,
        };
        assert_eq!(checked(&mechanism), CKR_OK);
    }

    /// `mechanism` with `param` as its parameter, checked.
    fn checked_with<T>(mechanism: CK_MECHANISM_TYPE, param: &mut T) -> CK_RV {
        checked(&CK_MECHANISM {
            mechanism,
            pParameter: param as *mut T as *mut _,
            ulParameterLen: size_of::<T>() as CK_ULONG,
        })
    }

    /// Each family the issue names (beyond GCM and CBC above): a good
    /// parameter passes, each malformed one is answered
    /// `CKR_MECHANISM_PARAM_INVALID` before any member sees it.
    #[test]
    fn every_listed_family_checks_structure_size_pointer_pairs_and_bounds() {
        let mut bytes = [0x5au8; 64];
        let data = bytes.as_mut_ptr();
        let null = std::ptr::null_mut::<u8>();
        let absurd: CK_ULONG = 1 << 40;
        let invalid = CKR_MECHANISM_PARAM_INVALID;

        let ccm = CK_CCM_PARAMS {
            ulDataLen: 32,
            pNonce: data,
            ulNonceLen: 12,
            pAAD: data,
            ulAADLen: 16,
            ulMACLen: 16,
        };
        for (what, mut params, want) in [
            ("good", ccm, CKR_OK),
            (
                "nonce NULL",
                CK_CCM_PARAMS {
                    pNonce: null,
                    ..ccm
                },
                invalid,
            ),
            (
                "nonce 14 bytes",
                CK_CCM_PARAMS {
                    ulNonceLen: 14,
                    ..ccm
                },
                invalid,
            ),
            ("AAD NULL", CK_CCM_PARAMS { pAAD: null, ..ccm }, invalid),
            (
                "AAD 2^40",
                CK_CCM_PARAMS {
                    ulAADLen: absurd,
                    ..ccm
                },
                invalid,
            ),
            ("MAC 5 bytes", CK_CCM_PARAMS { ulMACLen: 5, ..ccm }, invalid),
            (
                "data 2^40",
                CK_CCM_PARAMS {
                    ulDataLen: absurd,
                    ..ccm
                },
                invalid,
            ),
        ] {
            assert_eq!(checked_with(CKM_AES_CCM, &mut params), want, "CCM {what}");
        }

        let ctr = CK_AES_CTR_PARAMS {
            ulCounterBits: 32,
            cb: [0; 16],
        };
        for (what, mut params, want) in [
            ("good", ctr, CKR_OK),
            (
                "0 counter bits",
                CK_AES_CTR_PARAMS {
                    ulCounterBits: 0,
                    ..ctr
                },
                invalid,
            ),
            (
                "129 counter bits",
                CK_AES_CTR_PARAMS {
                    ulCounterBits: 129,
                    ..ctr
                },
                invalid,
            ),
        ] {
            assert_eq!(checked_with(CKM_AES_CTR, &mut params), want, "CTR {what}");
        }

        let oaep = CK_RSA_PKCS_OAEP_PARAMS {
            hashAlg: CKM_SHA256,
            mgf: CKG_MGF1_SHA256,
            source: CKZ_DATA_SPECIFIED,
            pSourceData: data as *mut _,
            ulSourceDataLen: 8,
        };
        for (what, mut params, want) in [
            ("good", oaep, CKR_OK),
            (
                "source NULL with a length",
                CK_RSA_PKCS_OAEP_PARAMS {
                    pSourceData: std::ptr::null_mut(),
                    ..oaep
                },
                invalid,
            ),
            (
                "source 2^40",
                CK_RSA_PKCS_OAEP_PARAMS {
                    ulSourceDataLen: absurd,
                    ..oaep
                },
                invalid,
            ),
        ] {
            assert_eq!(
                checked_with(CKM_RSA_PKCS_OAEP, &mut params),
                want,
                "OAEP {what}"
            );
        }

        let pss = CK_RSA_PKCS_PSS_PARAMS {
            hashAlg: CKM_SHA256,
            mgf: CKG_MGF1_SHA256,
            sLen: 32,
        };
        for mechanism in [
            CKM_RSA_PKCS_PSS,
            CKM_SHA1_RSA_PKCS_PSS,
            CKM_SHA224_RSA_PKCS_PSS,
            CKM_SHA256_RSA_PKCS_PSS,
            CKM_SHA384_RSA_PKCS_PSS,
            CKM_SHA512_RSA_PKCS_PSS,
        ] {
            assert_eq!(checked_with(mechanism, &mut { pss }), CKR_OK, "PSS good");
            let mut huge = CK_RSA_PKCS_PSS_PARAMS {
                sLen: absurd,
                ..pss
            };
            assert_eq!(checked_with(mechanism, &mut huge), invalid, "PSS sLen 2^40");
            let mut short = [0u8; 8];
            assert_eq!(checked_with(mechanism, &mut short), invalid, "PSS 8 bytes");
        }

        let ecdh = CK_ECDH1_DERIVE_PARAMS {
            kdf: CKD_NULL,
            ulSharedDataLen: 0,
            pSharedData: null,
            ulPublicDataLen: 65,
            pPublicData: data,
        };
        for mechanism in [CKM_ECDH1_DERIVE, CKM_ECDH1_COFACTOR_DERIVE] {
            for (what, mut params, want) in [
                ("good", ecdh, CKR_OK),
                (
                    "public NULL",
                    CK_ECDH1_DERIVE_PARAMS {
                        pPublicData: null,
                        ..ecdh
                    },
                    invalid,
                ),
                (
                    "public empty",
                    CK_ECDH1_DERIVE_PARAMS {
                        ulPublicDataLen: 0,
                        ..ecdh
                    },
                    invalid,
                ),
                (
                    "public 2^40",
                    CK_ECDH1_DERIVE_PARAMS {
                        ulPublicDataLen: absurd,
                        ..ecdh
                    },
                    invalid,
                ),
                (
                    "shared NULL with a length",
                    CK_ECDH1_DERIVE_PARAMS {
                        ulSharedDataLen: 8,
                        ..ecdh
                    },
                    invalid,
                ),
            ] {
                assert_eq!(checked_with(mechanism, &mut params), want, "ECDH {what}");
            }
        }

        let mqv = CK_ECMQV_DERIVE_PARAMS {
            kdf: CKD_NULL,
            ulSharedDataLen: 0,
            pSharedData: null,
            ulPublicDataLen: 65,
            pPublicData: data,
            ulPrivateDataLen: 0,
            hPrivateData: 0,
            ulPublicDataLen2: 65,
            pPublicData2: data,
            publicKey: 0,
        };
        for (what, mut params, want) in [
            ("good", mqv, CKR_OK),
            (
                "public NULL",
                CK_ECMQV_DERIVE_PARAMS {
                    pPublicData: null,
                    ..mqv
                },
                invalid,
            ),
            (
                "second public NULL",
                CK_ECMQV_DERIVE_PARAMS {
                    pPublicData2: null,
                    ..mqv
                },
                invalid,
            ),
        ] {
            assert_eq!(
                checked_with(CKM_ECMQV_DERIVE, &mut params),
                want,
                "ECMQV {what}"
            );
        }

        let string = CK_KEY_DERIVATION_STRING_DATA {
            pData: data,
            ulLen: 16,
        };
        for mechanism in [
            CKM_CONCATENATE_BASE_AND_DATA,
            CKM_CONCATENATE_DATA_AND_BASE,
            CKM_XOR_BASE_AND_DATA,
            CKM_AES_ECB_ENCRYPT_DATA,
            CKM_DES3_ECB_ENCRYPT_DATA,
        ] {
            assert_eq!(
                checked_with(mechanism, &mut { string }),
                CKR_OK,
                "KDF data good"
            );
            let mut bad = CK_KEY_DERIVATION_STRING_DATA {
                pData: null,
                ..string
            };
            assert_eq!(checked_with(mechanism, &mut bad), invalid, "KDF data NULL");
            let mut bad = CK_KEY_DERIVATION_STRING_DATA {
                ulLen: absurd,
                ..string
            };
            assert_eq!(checked_with(mechanism, &mut bad), invalid, "KDF data 2^40");
        }
        let cbc_data = CK_AES_CBC_ENCRYPT_DATA_PARAMS {
            iv: [0; 16],
            pData: data,
            length: 16,
        };
        assert_eq!(
            checked_with(CKM_AES_CBC_ENCRYPT_DATA, &mut { cbc_data }),
            CKR_OK
        );
        let mut bad = CK_AES_CBC_ENCRYPT_DATA_PARAMS {
            pData: null,
            ..cbc_data
        };
        assert_eq!(checked_with(CKM_AES_CBC_ENCRYPT_DATA, &mut bad), invalid);
        let des_data = CK_DES_CBC_ENCRYPT_DATA_PARAMS {
            iv: [0; 8],
            pData: data,
            length: 16,
        };
        for mechanism in [CKM_DES_CBC_ENCRYPT_DATA, CKM_DES3_CBC_ENCRYPT_DATA] {
            assert_eq!(checked_with(mechanism, &mut { des_data }), CKR_OK);
            let mut bad = CK_DES_CBC_ENCRYPT_DATA_PARAMS {
                pData: null,
                ..des_data
            };
            assert_eq!(
                checked_with(mechanism, &mut bad),
                invalid,
                "DES CBC data NULL"
            );
        }
        let mut des_data = CK_KEY_DERIVATION_STRING_DATA {
            pData: null,
            ..string
        };
        assert_eq!(
            checked_with(CKM_DES_ECB_ENCRYPT_DATA, &mut des_data),
            invalid,
            "DES ECB data NULL"
        );

        let eddsa = CK_EDDSA_PARAMS {
            phFlag: CK_FALSE,
            ulContextDataLen: 8,
            pContextData: data,
        };
        assert_eq!(
            checked_with(CKM_EDDSA, &mut { eddsa }),
            CKR_OK,
            "EdDSA context"
        );
        let mut bad = CK_EDDSA_PARAMS {
            pContextData: null,
            ..eddsa
        };
        assert_eq!(
            checked_with(CKM_EDDSA, &mut bad),
            invalid,
            "EdDSA context NULL"
        );
        let mut bad = CK_EDDSA_PARAMS {
            ulContextDataLen: 256,
            ..eddsa
        };
        assert_eq!(
            checked_with(CKM_EDDSA, &mut bad),
            invalid,
            "EdDSA context 256 bytes"
        );
        let no_parameter = CK_MECHANISM {
            mechanism: CKM_EDDSA,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        assert_eq!(checked(&no_parameter), CKR_OK, "EdDSA without a parameter");
        let mut iv = [0u8; 8];
        let mut des_cbc = CK_MECHANISM {
            mechanism: CKM_DES_CBC_PAD,
            pParameter: iv.as_mut_ptr() as *mut _,
            ulParameterLen: 8,
        };
        assert_eq!(checked(&des_cbc), CKR_OK, "DES CBC, 8-byte IV");
        des_cbc.ulParameterLen = 4;
        assert_eq!(checked(&des_cbc), invalid, "DES CBC, 4-byte IV");

        let hkdf = CK_HKDF_PARAMS {
            bExtract: CK_TRUE,
            bExpand: CK_TRUE,
            prfHashMechanism: CKM_SHA256,
            ulSaltType: CKF_HKDF_SALT_DATA,
            pSalt: data,
            ulSaltLen: 16,
            hSaltKey: 0,
            pInfo: data,
            ulInfoLen: 16,
        };
        for mechanism in [CKM_HKDF_DERIVE, CKM_HKDF_DATA] {
            for (what, mut params, want) in [
                ("good", hkdf, CKR_OK),
                (
                    "salt NULL",
                    CK_HKDF_PARAMS {
                        pSalt: null,
                        ..hkdf
                    },
                    invalid,
                ),
                (
                    "info NULL",
                    CK_HKDF_PARAMS {
                        pInfo: null,
                        ..hkdf
                    },
                    invalid,
                ),
                (
                    "info 2^40",
                    CK_HKDF_PARAMS {
                        ulInfoLen: absurd,
                        ..hkdf
                    },
                    invalid,
                ),
            ] {
                assert_eq!(checked_with(mechanism, &mut params), want, "HKDF {what}");
            }
        }

        let mut iv = [0u8; 8];
        let mut wrap = |mechanism, len| {
            checked(&CK_MECHANISM {
                mechanism,
                pParameter: iv.as_mut_ptr() as *mut _,
                ulParameterLen: len,
            })
        };
        assert_eq!(wrap(CKM_AES_KEY_WRAP, 8), CKR_OK, "key wrap, 8-byte IV");
        assert_eq!(wrap(CKM_AES_KEY_WRAP, 7), invalid, "key wrap, 7-byte IV");
        assert_eq!(
            wrap(CKM_AES_KEY_WRAP_PAD, 4),
            CKR_OK,
            "key wrap pad, 4-byte IV"
        );
        assert_eq!(
            wrap(CKM_AES_KEY_WRAP_PAD, 6),
            invalid,
            "key wrap pad, 6-byte IV"
        );
    }

    #[test]
    fn cbc_needs_a_sixteen_byte_iv() {
        let mut iv = [0u8; 16];
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_CBC_PAD,
            pParameter: iv.as_mut_ptr() as *mut _,
            ulParameterLen: 16,
        };
        assert_eq!(checked(&mechanism), CKR_OK);
        mechanism.ulParameterLen = 8;
        assert_eq!(checked(&mechanism), CKR_MECHANISM_PARAM_INVALID);
    }
}
