//! The member boundary ([`MemberApi`], [`MemberBackend`]) implemented in
//! memory over the simulation's token model
//! (`tests/sim-member/src/token.rs`, the same model the C-ABI simulated
//! member serves), with no shared library: the core code that depends only
//! on the trait -- object fingerprints and searches, the login retry, the
//! classification of answers -- runs on the simulated member and on
//! SoftHSM loaded as a real member, and answers alike; and a group of
//! in-memory members runs the HA core itself: failover of an operation,
//! replication of a key, recovery's replay to a member that returns.

mod common;

/// The token model, shared with `sim-member` (which has no MSRV of its
/// own); parts of it that only the C library uses are unused here.
#[path = "sim-member/src/token.rs"]
#[allow(dead_code, clippy::incompatible_msrv)]
mod token;

use common::{SoftHsm, SOFTHSM_CONF_ENV, SOFTHSM_LIB};
use cryptoki_sys::*;
use parking_lot::Mutex;
use pkcs11_ha::arguments::Template;
use pkcs11_ha::clock::Clock;
use pkcs11_ha::config::{RecoveryMode, DEFAULT_MULTIPART_REPLAY_LIMIT};
use pkcs11_ha::error::Error;
use pkcs11_ha::group::{log_in_member, Group, GroupSettings, Location, Login, MemberState};
use pkcs11_ha::identity;
use pkcs11_ha::index::MemberIndex;
use pkcs11_ha::mechanism::Mechanism;
use pkcs11_ha::member::{classify, counted, string_to_padded, Answer, MemberLibrary, Silent};
use pkcs11_ha::member_api::{MemberApi, MemberBackend, TokenSearch};
use pkcs11_ha::recovery::{self, Host, RecoverySettings, Watchdog};
use pkcs11_ha::virtual_objects::{made_print, MemberTemplate};
use pkcs11_ha::virtual_session::{Input, OpKind, Step, VirtualSession};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use token::{Attributes, Fault, Sim, FIRST_SLOT, MECHANISMS};
use zeroize::Zeroizing;

/// A simulated member library in this process: the token model behind a
/// lock, answering through [`MemberApi`] as `sim-member` answers through
/// its C function list. Functions the model lacks keep the trait's
/// `CKR_FUNCTION_NOT_SUPPORTED`.
struct SimMember(Mutex<Sim>, StallGate);

/// Where a call that meets a planted stall ([`Fault::Stall`]) waits, after
/// it was carried out, inside the member as a library that hangs for a
/// while: it says so on the first channel and returns when told on the
/// second, so that a test can move the clock and look meanwhile.
type StallGate = Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>;

impl SimMember {
    fn new(tokens: usize, seed: u64) -> SimMember {
        let mut sim = Sim::default();
        sim.reset(tokens, 0, false, seed);
        sim.initialized = true;
        SimMember(Mutex::new(sim), Mutex::new(None))
    }

    /// Runs `function` on the model, counted on the member the thread
    /// calls for, as a loaded library's calls are.
    fn call(&self, function: &'static str, f: impl FnOnce(&mut Sim) -> token::Result<()>) -> CK_RV {
        counted(function, || {
            let (answer, stalled) = {
                let mut sim = self.0.lock();
                let answer = f(&mut sim);
                (answer, sim.stalled.take())
            };
            if let (Some(_), Some((stalled, resume))) = (stalled, self.1.lock().take()) {
                stalled.send(()).expect("the test waits for the stall");
                resume.recv().expect("the test ends the stall");
            }
            match answer {
                Ok(()) => CKR_OK,
                Err(rv) => rv,
            }
        })
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
        self.call("C_OpenSession", |sim| {
            *session = sim.open_session(sim.token_index(slot)?, flags)?;
            Ok(())
        })
    }

    fn close_session(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call("C_CloseSession", |sim| sim.close_session(session))
    }

    fn login(
        &self,
        session: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: Option<&[u8]>,
    ) -> CK_RV {
        self.call("C_Login", |sim| {
            sim.login(session, user_type, pin.unwrap_or_default())
        })
    }

    fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call("C_CreateObject", |sim| {
            *object = sim.create_object(session, attributes(template))?;
            Ok(())
        })
    }

    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        self.call("C_DestroyObject", |sim| sim.destroy_object(session, object))
    }

    fn get_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&mut [CK_ATTRIBUTE]>,
    ) -> CK_RV {
        let template = template.unwrap_or_default();
        let types: Vec<CK_ATTRIBUTE_TYPE> = template.iter().map(|a| a.type_).collect();
        self.call("C_GetAttributeValue", |sim| {
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
        self.call("C_FindObjectsInit", |sim| {
            sim.find_init(session, attributes(template))
        })
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
        self.call("C_FindObjects", |sim| {
            let handles = sim.find(session, found.len())?;
            found[..handles.len()].copy_from_slice(&handles);
            *count = handles.len() as CK_ULONG;
            Ok(())
        })
    }

    fn find_objects_final(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call("C_FindObjectsFinal", |sim| sim.find_final(session))
    }

    fn digest_init(&self, session: CK_SESSION_HANDLE, mechanism: &CK_MECHANISM) -> CK_RV {
        self.call("C_DigestInit", |sim| {
            sim.operation_init(session, mechanism.mechanism, None, b'D')
        })
    }

    fn digest(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call("C_Digest", |sim| {
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

    fn digest_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        self.call("C_DigestUpdate", |sim| {
            sim.operation_update(session, input.unwrap_or_default())
                .inspect_err(|_| sim.operation_end(session))
                .map(|_| ())
        })
    }

    fn digest_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call("C_DigestFinal", |sim| {
            let result = sim
                .operation_result(session, None)
                .inspect_err(|_| sim.operation_end(session))?;
            if two_call(&result, output, output_len)? {
                sim.operation_end(session);
            }
            Ok(())
        })
    }

    fn close_all_sessions(&self, slot: CK_SLOT_ID) -> CK_RV {
        self.call("C_CloseAllSessions", |sim| {
            let token = sim.token_index(slot)?;
            sim.close_all_sessions(token)
        })
    }

    fn get_session_info(&self, session: CK_SESSION_HANDLE, info: &mut CK_SESSION_INFO) -> CK_RV {
        self.call("C_GetSessionInfo", |sim| {
            let (token, rw, user) = sim.session_state(session)?;
            *info = CK_SESSION_INFO {
                slotID: FIRST_SLOT + token as CK_SLOT_ID,
                state: match (rw, user) {
                    (true, true) => CKS_RW_USER_FUNCTIONS,
                    (true, false) => CKS_RW_PUBLIC_SESSION,
                    (false, true) => CKS_RO_USER_FUNCTIONS,
                    (false, false) => CKS_RO_PUBLIC_SESSION,
                },
                flags: CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 },
                ulDeviceError: 0,
            };
            Ok(())
        })
    }

    fn logout(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call("C_Logout", |sim| sim.logout(session))
    }

    fn generate_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        template: Option<&[CK_ATTRIBUTE]>,
        key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call("C_GenerateKey", |sim| {
            *key = sim.generate_key(session, mechanism.mechanism, attributes(template))?;
            Ok(())
        })
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
        self.call("C_WrapKey", |sim| {
            let blob = sim.wrap_key(session, mechanism.mechanism, wrapping_key, key)?;
            two_call(&blob, wrapped, wrapped_len).map(|_| ())
        })
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
        self.call("C_UnwrapKey", |sim| {
            *key = sim.unwrap_key(
                session,
                mechanism.mechanism,
                unwrapping_key,
                wrapped.unwrap_or_default(),
                attributes(template),
            )?;
            Ok(())
        })
    }

    fn generate_random(&self, session: CK_SESSION_HANDLE, random: Option<&mut [u8]>) -> CK_RV {
        let Some(random) = random else {
            return CKR_ARGUMENTS_BAD;
        };
        self.call("C_GenerateRandom", |sim| {
            random.copy_from_slice(&sim.random(session, random.len())?);
            Ok(())
        })
    }

    fn slot_list(&self, _token_present: CK_BBOOL) -> pkcs11_ha::error::Result<Vec<CK_SLOT_ID>> {
        Ok(self.0.lock().present_tokens()?)
    }

    fn slot_info(&self, _slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_SLOT_INFO> {
        Err(CKR_FUNCTION_NOT_SUPPORTED.into())
    }

    /// As `sim-member`'s `C_GetTokenInfo`: recovery finds a member's token
    /// by its serial.
    fn token_info(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_TOKEN_INFO> {
        let mut sim = self.0.lock();
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
        let version = CK_VERSION { major: 0, minor: 1 };
        let mut info = CK_TOKEN_INFO {
            label: [b' '; 32],
            manufacturerID: [b' '; 32],
            model: [b' '; 16],
            serialNumber: [b' '; 16],
            flags: CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: CK_UNAVAILABLE_INFORMATION,
            ulMaxPinLen: 64,
            ulMinPinLen: 4,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version,
            firmwareVersion: version,
            utcTime: [b' '; 16],
        };
        string_to_padded(&format!("sim-{token}"), &mut info.label);
        string_to_padded(&sim.tokens[token].serial, &mut info.serialNumber);
        Ok(info)
    }

    fn mechanisms(&self, _slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<Vec<CK_MECHANISM_TYPE>> {
        Ok(MECHANISMS.iter().map(|(m, _)| *m).collect())
    }

    fn mechanism_info(
        &self,
        _slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> pkcs11_ha::error::Result<CK_MECHANISM_INFO> {
        let (_, flags) = MECHANISMS
            .iter()
            .find(|(m, _)| *m == mechanism)
            .ok_or(Error::new(CKR_MECHANISM_INVALID))?;
        Ok(CK_MECHANISM_INFO {
            ulMinKeySize: 16,
            ulMaxKeySize: 32,
            flags: *flags,
        })
    }

    fn initialize(&self) -> pkcs11_ha::error::Result<()> {
        self.0.lock().initialized = true;
        Ok(())
    }

    fn finalize(&self) {
        self.0.lock().initialized = false;
    }
}

/// A library in this process that never hangs: the trait's defaults (one
/// connection, no instance pool, no Luna extensions) hold, and a token
/// search runs in the caller's thread.
impl MemberBackend for SimMember {
    fn name(&self) -> &str {
        "simulated"
    }

    fn search_bounded(
        self: Arc<Self>,
        search: TokenSearch,
        _deadline: Instant,
        _patience: Duration,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Silent>> {
        Some(Ok(search(&*self)))
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
    let unsupported = member.seed_random(sessions[1], Some(&[0u8; 4]));
    assert_eq!(unsupported, CKR_FUNCTION_NOT_SUPPORTED);
    assert!(!classify("C_SeedRandom", unsupported).is_member_fault());
}

/// A group over the tokens of one in-memory library, each member attached
/// where the provider would attach it; the whole process on simulated
/// time, so that nothing below depends on how fast the machine is.
fn memory_group(tokens: usize, seed: u64) -> (Arc<SimMember>, Arc<Group>) {
    pkcs11_ha::clock::install_manual();
    let member = Arc::new(SimMember::new(tokens, seed));
    let serials: Vec<String> = member
        .0
        .lock()
        .tokens
        .iter()
        .map(|t| t.serial.clone())
        .collect();
    let settings = GroupSettings {
        domain_label: String::from_utf8(token::DOMAIN_LABEL.to_vec()).unwrap(),
        replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
        min_replicas: 1,
    };
    let group = Group::new(0, "memory", "memory".into(), 0, &serials, &[], settings);
    for position in 0..tokens {
        let location = Location {
            library: Arc::clone(&member) as Arc<dyn MemberBackend>,
            slot: FIRST_SLOT + position as CK_SLOT_ID,
        };
        group.attach(position, location);
    }
    (member, Arc::new(group))
}

/// A virtual session on `group`, logged in as the provider's `C_Login`
/// does it.
fn logged_in_session(group: &Arc<Group>) -> VirtualSession {
    let v = VirtualSession::open(Arc::clone(group), CKF_SERIAL_SESSION | CKF_RW_SESSION)
        .expect("a virtual session opens");
    v.first_decides("C_Login", |l, s| {
        log_in_member(l, s, CKU_USER, Some(token::USER_PIN))
    })
    .expect("the group logs in");
    *group.login.lock() = Some(Login {
        user_type: CKU_USER,
        pin: Some(Zeroizing::new(token::USER_PIN.to_vec())),
    });
    v.look_up_domain_keys();
    v
}

fn mechanism(raw: &mut CK_MECHANISM) -> Mechanism<'_> {
    // SAFETY: a mechanism without a parameter, alive for the call.
    unsafe { Mechanism::new(raw) }.expect("a valid mechanism")
}

fn no_parameter(mechanism: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// Generates an AES token key labelled `label` through the group, as the
/// provider's `C_GenerateKey` on a virtual slot does.
fn generate_token_key(
    v: &VirtualSession,
    label: &[u8],
) -> pkcs11_ha::error::Result<CK_OBJECT_HANDLE> {
    let yes: CK_BBOOL = CK_TRUE;
    let length: CK_ULONG = 32;
    let attribute = |type_, value: *const std::ffi::c_void, len: usize| CK_ATTRIBUTE {
        type_,
        pValue: value as *mut _,
        ulValueLen: len as CK_ULONG,
    };
    let mut attributes = [
        attribute(CKA_TOKEN, &yes as *const _ as *const _, 1),
        attribute(CKA_ENCRYPT, &yes as *const _ as *const _, 1),
        attribute(
            CKA_VALUE_LEN,
            &length as *const _ as *const _,
            std::mem::size_of::<CK_ULONG>(),
        ),
        attribute(CKA_LABEL, label.as_ptr() as *const _, label.len()),
    ];
    // SAFETY: four attributes whose values live until the call returns.
    let template =
        unsafe { Template::giving_values(attributes.as_mut_ptr(), attributes.len() as CK_ULONG) }?;
    let mut raw = no_parameter(CKM_AES_KEY_GEN);
    let mechanism = mechanism(&mut raw);
    let member_template = MemberTemplate::for_new_key(&template);
    let prints = [made_print(&template, CKO_SECRET_KEY)];
    let made = v.make_on_one(
        1,
        &mechanism,
        &[],
        &[template.bool(CKA_TOKEN)],
        &prints,
        "C_GenerateKey",
        |l, m, mech, _, out| {
            l.generate_key(m, mech, member_template.template().as_slice(), &mut out[0])
        },
    )?;
    Ok(made[0])
}

/// The values of the token keys labelled `label` on each token, read from
/// the model itself (a crashed token's too).
fn key_values(member: &SimMember, label: &[u8]) -> Vec<Vec<Vec<u8>>> {
    let sim = member.0.lock();
    sim.tokens
        .iter()
        .map(|t| {
            t.token_objects()
                .filter(|o| o.attributes.get(&CKA_LABEL).map(Vec::as_slice) == Some(label))
                .map(|o| o.attributes[&CKA_VALUE].clone())
                .collect()
        })
        .collect()
}

/// What recovery asks of the provider, for one group over in-memory
/// members: replay only (no synchronisation, so that what the returning
/// member gets comes from the queue of what it missed).
struct MemoryHost {
    groups: Vec<Arc<Group>>,
    libraries: Vec<Arc<dyn MemberBackend>>,
    recovery: RecoverySettings,
}

impl MemoryHost {
    fn new(group: &Arc<Group>, member: &Arc<SimMember>) -> MemoryHost {
        MemoryHost {
            groups: vec![Arc::clone(group)],
            libraries: vec![Arc::clone(member) as Arc<dyn MemberBackend>],
            recovery: RecoverySettings {
                attempts: -1,
                interval: Duration::from_secs(1),
                mode: RecoveryMode::ActiveBasic,
            },
        }
    }
}

impl Host for MemoryHost {
    fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }
    fn libraries(&self) -> &[Arc<dyn MemberBackend>] {
        &self.libraries
    }
    fn recovery(&self) -> &RecoverySettings {
        &self.recovery
    }
    fn member_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn threads_allowed(&self) -> bool {
        false
    }
    fn synchronize(&self, _: &Group) -> bool {
        false
    }
    fn reconcile_soon(&self) {}
    fn uses_member_slot(&self, _: &Arc<dyn MemberBackend>, _: CK_SLOT_ID) -> bool {
        false
    }
    fn each_virtual_session(
        &self,
        _: &Arc<Group>,
        _: &mut dyn FnMut(&VirtualSession) -> pkcs11_ha::error::Result<()>,
    ) -> pkcs11_ha::error::Result<()> {
        Ok(())
    }
}

#[test]
fn a_digest_moves_to_another_in_memory_member_when_its_member_crashes_mid_operation() {
    let (member, group) = memory_group(3, 21);
    let v = VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION).expect("a session");
    let mut raw = no_parameter(CKM_SHA256);
    let sha256 = mechanism(&mut raw);
    v.init(
        OpKind::Digest,
        Some(&sha256),
        None,
        "C_DigestInit",
        |l, s, _| l.digest_init(s, sha256.as_raw()),
    )
    .expect("C_DigestInit");
    let first = v.bound_member().expect("the digest is bound to a member");
    let (one, two) = (
        &b"fed to the first member, "[..],
        &b"then to the next one"[..],
    );
    v.step(
        OpKind::Digest,
        Step::Update,
        Input::Data(one),
        "C_DigestUpdate",
        |l, s| l.digest_update(s, Some(one)),
    )
    .expect("the first update");

    member.0.lock().set_fault(first, Fault::Crash);
    v.step(
        OpKind::Digest,
        Step::Update,
        Input::Data(two),
        "C_DigestUpdate",
        |l, s| l.digest_update(s, Some(two)),
    )
    .expect("the second update, on another member");
    let moved_to = v.bound_member().expect("still bound");
    assert_ne!(
        moved_to, first,
        "the operation moved off the crashed member"
    );
    assert_eq!(group.members[first].state(), MemberState::Down);

    let (mut digest, mut len) = ([0u8; 32], 32 as CK_ULONG);
    v.step(
        OpKind::Digest,
        Step::Finish {
            length_query: false,
        },
        Input::None,
        "C_DigestFinal",
        |l, s| l.digest_final(s, Some(&mut digest), &mut len),
    )
    .expect("C_DigestFinal");
    assert_eq!(len, 32);
    assert_eq!(
        digest[..],
        Sha256::digest([one, two].concat())[..],
        "the digest covers both parts, the first replayed on the new member"
    );
    v.close();
}

#[test]
fn in_a_group_a_crash_takes_a_member_out_and_a_request_error_does_not() {
    let (member, group) = memory_group(3, 22);
    let v = VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION).expect("a session");

    let mut raw = no_parameter(CKM_MD5);
    let md5 = mechanism(&mut raw);
    let refused = v
        .init(
            OpKind::Digest,
            Some(&md5),
            None,
            "C_DigestInit",
            |l, s, _| l.digest_init(s, md5.as_raw()),
        )
        .expect_err("no member knows MD5");
    assert_eq!(refused.rv, CKR_MECHANISM_INVALID, "the member's own answer");
    assert!(
        group.members.iter().all(|m| m.state() == MemberState::Up),
        "a request error takes no member out"
    );

    member.0.lock().set_fault(0, Fault::Crash);
    // Calls spread over the members: within a few, one meets the crash.
    for call in 0..64 {
        let mut random = [0u8; 16];
        v.stateless(&[], "C_GenerateRandom", |l, s, _| {
            l.generate_random(s, Some(&mut random))
        })
        .unwrap_or_else(|e| panic!("call {call} failed with {:#x}", e.rv));
        assert_ne!(random, [0u8; 16], "call {call} was answered with bytes");
        if group.members[0].state() == MemberState::Down {
            break;
        }
    }
    assert_eq!(
        group.members[0].state(),
        MemberState::Down,
        "the crashed member is out"
    );
    assert!(
        group.members[1..]
            .iter()
            .all(|m| m.state() == MemberState::Up),
        "the others serve on"
    );
    v.close();
}

#[test]
fn a_key_made_through_an_in_memory_group_is_on_every_member_and_replayed_to_one_that_returns() {
    let (member, group) = memory_group(3, 23);
    let v = logged_in_session(&group);

    generate_token_key(&v, b"everywhere").expect("a key made with every member up");
    let everywhere = key_values(&member, b"everywhere");
    assert!(
        everywhere
            .iter()
            .all(|on| on.len() == 1 && on[0] == everywhere[0][0]),
        "the same key once on each member: {everywhere:?}"
    );

    member.0.lock().set_fault(2, Fault::Crash);
    generate_token_key(&v, b"missed").expect("a key made while member 2 crashed");
    assert_eq!(group.members[2].state(), MemberState::Down);
    let missed = key_values(&member, b"missed");
    assert!(missed[2].is_empty(), "member 2 missed it");
    assert!(group.pending_count(2) > 0, "the key waits for member 2");

    member.0.lock().heal(2);
    recovery::recover_failed_members(&MemoryHost::new(&group, &member));
    assert_eq!(
        group.members[2].state(),
        MemberState::Up,
        "member 2 is back"
    );
    assert_eq!(group.pending_count(2), 0, "nothing waits for it any more");
    for (label, values) in [
        (&b"missed"[..], key_values(&member, b"missed")),
        (b"everywhere", key_values(&member, b"everywhere")),
    ] {
        assert!(
            values
                .iter()
                .all(|on| on.len() == 1 && on[0] == values[0][0]),
            "{}: the same key once on each member after the replay: {values:?}",
            String::from_utf8_lossy(label)
        );
    }
    v.close();
}

#[test]
fn the_watchdog_takes_out_an_in_memory_member_whose_call_stalls_for_member_timeout() {
    let (member, group) = memory_group(2, 24);
    let host = MemoryHost::new(&group, &member);
    let clock = pkcs11_ha::clock::install_manual();
    let v = VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION).expect("a session");
    let (stalled_tx, stalled) = mpsc::sync_channel(1);
    let (resume, resume_rx) = mpsc::channel();
    *member.1.lock() = Some((stalled_tx, resume_rx));
    member.0.lock().set_fault(0, Fault::Stall);

    std::thread::scope(|scope| {
        // Asked on member 0 first, where it stalls.
        let caller = scope.spawn(|| {
            let sha256 = no_parameter(CKM_SHA256);
            v.first_decides("C_DigestInit", |l, s| l.digest_init(s, &sha256))
        });
        stalled
            .recv_timeout(Duration::from_secs(60))
            .expect("the call reaches the stalled member");
        assert_eq!(group.members[0].in_flight(), 1, "counted in flight");
        let mut watchdog = Watchdog::default();
        watchdog.look(&host, clock.now());
        clock.advance(host.member_timeout() - Duration::from_millis(1));
        watchdog.look(&host, clock.now());
        assert_eq!(
            group.members[0].state(),
            MemberState::Up,
            "1 ms short of memberTimeout"
        );
        clock.advance(Duration::from_millis(1));
        watchdog.look(&host, clock.now());
        assert_eq!(
            group.members[0].state(),
            MemberState::Down,
            "taken out once its call has stalled for memberTimeout"
        );
        resume.send(()).expect("the stalled call waits");
        let answer = caller.join().expect("the caller returns");
        assert!(
            answer.is_ok(),
            "the late answer counts as lost and member 1 decides: {answer:?}"
        );
    });
    assert_eq!(group.members[1].state(), MemberState::Up);
    v.close();
}
