//! The member boundary ([`MemberApi`]) implemented in memory over the
//! simulation's token model (`tests/sim-member/src/token.rs`, the same
//! model the C-ABI simulated member serves), with no shared library: the
//! core code that depends only on the trait -- object fingerprints and
//! searches, the login retry, the classification of answers -- runs on
//! the simulated member and on SoftHSM loaded as a real member, and
//! answers alike.

mod common;

/// The token model, shared with `sim-member` (which has no MSRV of its
/// own); parts of it that only the C library uses are unused here.
#[path = "sim-member/src/token.rs"]
#[allow(dead_code, clippy::incompatible_msrv)]
mod token;

use common::{SoftHsm, SOFTHSM_CONF_ENV, SOFTHSM_LIB};
use cryptoki_sys::*;
use parking_lot::Mutex;
use pkcs11_ha::group::log_in_member;
use pkcs11_ha::identity;
use pkcs11_ha::index::MemberIndex;
use pkcs11_ha::member::{classify, Answer, MemberLibrary};
use pkcs11_ha::member_api::MemberApi;
use sha2::{Digest, Sha256};
use std::path::Path;
use token::{Attributes, Fault, Sim, FIRST_SLOT};

/// A simulated member library in this process: the token model behind a
/// lock, answering through [`MemberApi`] as `sim-member` answers through
/// its C function list. Functions the model lacks keep the trait's
/// `CKR_FUNCTION_NOT_SUPPORTED`.
struct SimMember(Mutex<Sim>);

impl SimMember {
    fn new(tokens: usize, seed: u64) -> SimMember {
        let mut sim = Sim::default();
        sim.reset(tokens, 0, false, seed);
        sim.initialized = true;
        SimMember(Mutex::new(sim))
    }

    fn call(&self, f: impl FnOnce(&mut Sim) -> token::Result<()>) -> CK_RV {
        match f(&mut self.0.lock()) {
            Ok(()) => CKR_OK,
            Err(rv) => rv,
        }
    }
}

/// A template's attributes, each value readable for its length as
/// [`MemberApi`] requires of its callers.
fn attributes(template: Option<&[CK_ATTRIBUTE]>) -> Attributes {
    template
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let value = if a.pValue.is_null() {
                Vec::new()
            } else {
                // SAFETY: the trait's contract: a value points at as many
                // bytes as its length says.
                unsafe { std::slice::from_raw_parts(a.pValue as *const u8, a.ulValueLen as usize) }
                    .to_vec()
            };
            (a.type_, value)
        })
        .collect()
}

/// Writes `result` under the two-call convention into a room of the
/// smaller of the buffer and `*len`; true when written.
fn two_call(result: &[u8], output: Option<&mut [u8]>, len: &mut CK_ULONG) -> token::Result<bool> {
    let Some(output) = output else {
        *len = result.len() as CK_ULONG;
        return Ok(false);
    };
    let room = (*len as usize).min(output.len());
    *len = result.len() as CK_ULONG;
    if room < result.len() {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    output[..result.len()].copy_from_slice(result);
    Ok(true)
}

impl MemberApi for SimMember {
    fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        session: &mut CK_SESSION_HANDLE,
    ) -> CK_RV {
        self.call(|sim| {
            *session = sim.open_session(sim.token_index(slot)?, flags)?;
            Ok(())
        })
    }

    fn close_session(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call(|sim| sim.close_session(session))
    }

    fn login(
        &self,
        session: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> CK_RV {
        self.call(|sim| sim.login(session, user_type, pin.unwrap_or_default()))
    }

    fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call(|sim| {
            *object = sim.create_object(session, attributes(template))?;
            Ok(())
        })
    }

    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        self.call(|sim| sim.destroy_object(session, object))
    }

    fn get_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&mut [CK_ATTRIBUTE]>,
    ) -> CK_RV {
        let template = template.unwrap_or_default();
        let types: Vec<CK_ATTRIBUTE_TYPE> = template.iter().map(|a| a.type_).collect();
        self.call(|sim| {
            let mut rv = CKR_OK;
            for (a, value) in template
                .iter_mut()
                .zip(sim.attributes(session, object, &types)?)
            {
                match value {
                    Err(e) => (a.ulValueLen, rv) = (CK_UNAVAILABLE_INFORMATION, e),
                    Ok(None) => {
                        (a.ulValueLen, rv) =
                            (CK_UNAVAILABLE_INFORMATION, CKR_ATTRIBUTE_TYPE_INVALID)
                    }
                    Ok(Some(bytes)) if a.pValue.is_null() => a.ulValueLen = bytes.len() as CK_ULONG,
                    Ok(Some(bytes)) if (a.ulValueLen as usize) < bytes.len() => {
                        (a.ulValueLen, rv) = (CK_UNAVAILABLE_INFORMATION, CKR_BUFFER_TOO_SMALL)
                    }
                    Ok(Some(bytes)) => {
                        // SAFETY: the trait's contract: the buffer holds
                        // `ulValueLen` bytes, at least `bytes.len()`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                bytes.as_ptr(),
                                a.pValue as *mut u8,
                                bytes.len(),
                            )
                        };
                        a.ulValueLen = bytes.len() as CK_ULONG;
                    }
                }
            }
            if rv == CKR_OK {
                Ok(())
            } else {
                Err(rv)
            }
        })
    }

    fn find_objects_init(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        self.call(|sim| sim.find_init(session, attributes(template)))
    }

    fn find_objects(
        &self,
        session: CK_SESSION_HANDLE,
        found: Option<&mut [CK_OBJECT_HANDLE]>,
        count: &mut CK_ULONG,
    ) -> CK_RV {
        let Some(found) = found else {
            return CKR_ARGUMENTS_BAD;
        };
        self.call(|sim| {
            let handles = sim.find(session, found.len())?;
            found[..handles.len()].copy_from_slice(&handles);
            *count = handles.len() as CK_ULONG;
            Ok(())
        })
    }

    fn find_objects_final(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call(|sim| sim.find_final(session))
    }

    fn digest_init(&self, session: CK_SESSION_HANDLE, mechanism: &CK_MECHANISM) -> CK_RV {
        self.call(|sim| sim.operation_init(session, mechanism.mechanism, None, b'D'))
    }

    fn digest(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call(|sim| {
            let result = sim
                .operation_single(session, input.unwrap_or_default())
                .inspect_err(|_| sim.operation_end(session))?;
            // Ends with the answer, not with a length query or too little room.
            if two_call(&result, output, output_len)? {
                sim.operation_end(session);
            }
            Ok(())
        })
    }

    fn slot_list(&self, _token_present: CK_BBOOL) -> pkcs11_ha::error::Result<Vec<CK_SLOT_ID>> {
        Ok(self.0.lock().present_tokens()?)
    }

    fn slot_info(&self, _slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_SLOT_INFO> {
        Err(CKR_FUNCTION_NOT_SUPPORTED.into())
    }

    fn token_info(&self, _slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_TOKEN_INFO> {
        Err(CKR_FUNCTION_NOT_SUPPORTED.into())
    }

    fn mechanisms(&self, _slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<Vec<CK_MECHANISM_TYPE>> {
        Ok(vec![CKM_SHA256])
    }

    fn mechanism_info(
        &self,
        _slot: CK_SLOT_ID,
        _mechanism: CK_MECHANISM_TYPE,
    ) -> pkcs11_ha::error::Result<CK_MECHANISM_INFO> {
        Err(CKR_FUNCTION_NOT_SUPPORTED.into())
    }

    fn initialize(&self) -> pkcs11_ha::error::Result<()> {
        self.0.lock().initialized = true;
        Ok(())
    }

    fn finalize(&self) {
        self.0.lock().initialized = false;
    }
}

/// A data object's template: class, label and value.
fn data_object(label: &[u8], value: &[u8]) -> Vec<CK_ATTRIBUTE> {
    let class: &'static CK_OBJECT_CLASS = &CKO_DATA;
    let no: &'static CK_BBOOL = &CK_FALSE;
    let attribute = |type_, bytes: &[u8]| CK_ATTRIBUTE {
        type_,
        pValue: bytes.as_ptr() as *mut _,
        ulValueLen: bytes.len() as CK_ULONG,
    };
    vec![
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: class as *const _ as *mut _,
            ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
        },
        CK_ATTRIBUTE {
            type_: CKA_TOKEN,
            pValue: no as *const _ as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_PRIVATE,
            pValue: no as *const _ as *mut _,
            ulValueLen: 1,
        },
        attribute(CKA_LABEL, label),
        attribute(CKA_VALUE, value),
    ]
}

/// The same core code on any member: a wrong PIN is a request error (the
/// member stays in), the group's login retry logs in, two data objects are
/// told apart by fingerprint and each found by its own, the member's
/// object index holds its token objects but the session ones, and a digest
/// follows the two-call convention.
fn exercise(member: &dyn MemberApi, slot: CK_SLOT_ID, pin: &[u8]) {
    let mut session = CK_INVALID_HANDLE;
    assert_eq!(
        member.open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, &mut session),
        CKR_OK
    );
    let wrong = log_in_member(member, session, CKU_USER, Some(b"not the pin"));
    assert_eq!(wrong, CKR_PIN_INCORRECT);
    assert_eq!(classify("C_Login", wrong), Answer::Request);
    assert_eq!(log_in_member(member, session, CKU_USER, Some(pin)), CKR_OK);

    let mut made = Vec::new();
    for (label, value) in [(&b"first"[..], &b"one"[..]), (b"second", b"two")] {
        let mut handle = CK_INVALID_HANDLE;
        let template = data_object(label, value);
        assert_eq!(
            member.create_object(session, Some(&template), &mut handle),
            CKR_OK
        );
        made.push(handle);
    }
    let prints: Vec<identity::Fingerprint> = made
        .iter()
        .map(|h| identity::fingerprint(member, session, *h).expect("a fingerprint"))
        .collect();
    assert_ne!(prints[0], prints[1], "two objects, two fingerprints");
    let token_objects = identity::find(member, session, &vec![(CKA_TOKEN, vec![CK_TRUE])])
        .expect("a search for token objects");
    let index = MemberIndex::read(member, session, None).expect("an index");
    assert_eq!(index.len(), token_objects.len());
    for handle in token_objects {
        let print = identity::fingerprint(member, session, handle).expect("a fingerprint");
        assert_eq!(index.matching(&print), vec![handle]);
    }
    for (print, handle) in prints.iter().zip(&made) {
        assert!(
            index.matching(print).is_empty(),
            "a session object is not indexed"
        );
        assert_eq!(identity::find(member, session, print), Ok(vec![*handle]));
        assert_eq!(
            identity::read_attribute(member, session, *handle, CKA_LABEL).as_deref(),
            print
                .iter()
                .find(|(t, _)| *t == CKA_LABEL)
                .map(|(_, v)| &v[..])
        );
    }

    let sha256 = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(member.digest_init(session, &sha256), CKR_OK);
    let mut len: CK_ULONG = 0;
    assert_eq!(member.digest(session, Some(b"abc"), None, &mut len), CKR_OK);
    assert_eq!(len, 32, "the length query names the digest's length");
    let mut short = [0u8; 16];
    assert_eq!(
        member.digest(session, Some(b"abc"), Some(&mut short), &mut len),
        CKR_BUFFER_TOO_SMALL
    );
    let mut digest = [0u8; 32];
    assert_eq!(
        member.digest(session, Some(b"abc"), Some(&mut digest), &mut len),
        CKR_OK
    );
    assert_eq!(&digest[..len as usize], &Sha256::digest(b"abc")[..]);

    for handle in made {
        assert_eq!(member.destroy_object(session, handle), CKR_OK);
    }
    assert_eq!(member.close_session(session), CKR_OK);
}

#[test]
fn the_core_runs_alike_on_a_simulated_member_and_on_softhsm() {
    let _serial = common::serial_guard();
    let hsm = SoftHsm::new(&["api"]);
    let environment = [(SOFTHSM_CONF_ENV.to_string(), hsm.conf.display().to_string())];
    let softhsm = MemberLibrary::load("softhsm", Path::new(SOFTHSM_LIB), &environment)
        .expect("SoftHSM loads");
    softhsm.initialize().expect("SoftHSM initialises");
    let simulated = SimMember::new(1, 7);
    let members: [(&dyn MemberApi, CK_SLOT_ID, &[u8]); 2] = [
        (&simulated, FIRST_SLOT, token::USER_PIN),
        (&softhsm, hsm.tokens[0].slot_id, common::USER_PIN.as_bytes()),
    ];
    for (member, slot, pin) in members {
        exercise(member, slot, pin);
    }
    softhsm.finalize();
}

#[test]
fn a_simulated_fault_is_a_member_fault_and_a_bad_request_is_not() {
    let member = SimMember::new(2, 11);
    let mut sessions = [CK_INVALID_HANDLE; 2];
    for (token, session) in sessions.iter_mut().enumerate() {
        assert_eq!(
            member.open_session(
                FIRST_SLOT + token as CK_SLOT_ID,
                CKF_SERIAL_SESSION,
                session
            ),
            CKR_OK
        );
    }
    member.0.lock().set_fault(0, Fault::Crash);
    let sha256 = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    let crashed = member.digest_init(sessions[0], &sha256);
    assert_eq!(classify("C_DigestInit", crashed), Answer::Down);
    assert_eq!(member.slot_list(CK_TRUE).unwrap(), vec![FIRST_SLOT + 1]);

    let unknown = CK_MECHANISM {
        mechanism: CKM_MD5,
        ..sha256
    };
    let refused = member.digest_init(sessions[1], &unknown);
    assert_eq!(refused, CKR_MECHANISM_INVALID);
    assert!(!classify("C_DigestInit", refused).is_member_fault());
    let unsupported = member.generate_random(sessions[1], Some(&mut [0u8; 4]));
    assert_eq!(unsupported, CKR_FUNCTION_NOT_SUPPORTED);
    assert!(!classify("C_GenerateRandom", unsupported).is_member_fault());
}
