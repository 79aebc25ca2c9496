//! Failover of a virtual slot, proved against simulated members. Each
//! member is a copy of the test-only faulty member (tests/faulty-member)
//! that forwards to one SoftHSM token, so a test can make any member fail
//! with `CKR_DEVICE_ERROR` -- at once, or after a number of calls -- and count
//! the calls each member received.
//!
//! Every test holds the serial guard (through [`Ha`]) and synchronises on
//! conditions only: joins, a barrier, channels and call counts, never on the
//! clock. A test named for a behaviour asserts exactly that behaviour.

mod common;

use std::env;
use std::fmt::Debug;
use std::fs;
use std::ptr;
use std::sync::mpsc;
use std::sync::{Barrier, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::faulty::FaultyMember;
use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::{
    CKA_CLASS, CKA_ID, CKA_LABEL, CKA_MODULUS, CKA_PRIVATE_EXPONENT, CKA_VALUE, CKM_ECDSA,
    CKM_SHA256, CKM_VENDOR_DEFINED, CKR_ATTRIBUTE_SENSITIVE, CKR_BUFFER_TOO_SMALL,
    CKR_DEVICE_ERROR, CKR_GENERAL_ERROR, CKR_MECHANISM_INVALID, CKR_OK, CKR_OPERATION_ACTIVE,
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_TYPE,
    CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_ULONG, CK_UNAVAILABLE_INFORMATION,
};

/// A bound for waits that only end early when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);
/// How often a test re-reads what it polls for (the HA log).
const POLL: Duration = Duration::from_millis(10);
/// DER of the prime256v1 OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const IV: [u8; 16] = [7; 16];
const MESSAGE: &[u8] = b"pkcs11-ha: a message every member must treat alike";

// ---------------------------------------------------------------------------
// A group of faulty members
// ---------------------------------------------------------------------------

/// One SoftHSM token per member, each behind its own faulty-member copy
/// (library `m<i>` in the config, token `member<i>`), grouped into virtual
/// slot 0 with the first `active` members active (member 0 primary) and
/// the rest standby. Holds the serial guard; finalises on drop.
struct Ha {
    pkcs11: Pkcs11,
    /// Dropped after `C_Finalize`, which they must see.
    members: Vec<FaultyMember>,
    hsm: SoftHsm,
    // Last: released only after everything above is gone.
    _guard: MutexGuard<'static, ()>,
}

impl Ha {
    fn new(active: usize) -> Ha {
        Ha::with(active, 0, "")
    }

    /// `ha_settings` is appended to the `[HAConfiguration]` section.
    fn with(active: usize, standby: usize, ha_settings: &str) -> Ha {
        Ha::prepared(active, standby, ha_settings, |_| {})
    }

    /// As [`Ha::with`], with `prepare` given the members before the
    /// library under test initialises them.
    fn prepared(
        active: usize,
        standby: usize,
        ha_settings: &str,
        prepare: impl FnOnce(&[FaultyMember]),
    ) -> Ha {
        let guard = serial_guard();
        let labels: Vec<String> = (0..active + standby)
            .map(|i| format!("member{i}"))
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let hsm = SoftHsm::new(&labels);
        // Before anything initialises SoftHSM through the members.
        provision_domain(&hsm, &DOMAIN_VALUE);
        let members: Vec<FaultyMember> =
            FaultyMember::one_per_token(hsm.dir.path(), SOFTHSM_LIB, &hsm.serials());
        prepare(&members);
        let names: Vec<String> = (0..members.len()).map(|i| format!("m{i}")).collect();
        let paths: Vec<String> = members
            .iter()
            .map(|m| m.path.display().to_string())
            .collect();
        let libraries: Vec<(&str, &str)> = names
            .iter()
            .map(String::as_str)
            .zip(paths.iter().map(String::as_str))
            .collect();
        let serials = hsm.serials();
        let group =
            GroupSpec::new(GROUP_LABEL, &serials[..active]).with_standby(&serials[active..]);
        let mut text = config_text(&libraries, &[group], false);
        text.push_str(ha_settings);
        let config = hsm.dir.path().join("pkcs11-ha.conf");
        fs::write(&config, text).expect("write pkcs11-ha.conf");
        hsm.activate();
        activate_config(&config);
        Ha {
            pkcs11: start_ha(),
            members,
            hsm,
            _guard: guard,
        }
    }

    /// `C_Finalize` and `C_Initialize` again with every fault cleared: a
    /// fresh library state over the same tokens (token objects stay).
    fn restart(&mut self) {
        for member in &self.members {
            member.clear_fault();
        }
        self.pkcs11.clone().finalize().expect("C_Finalize");
        self.pkcs11 = start_ha();
    }

    /// An RW session on the virtual slot, user logged in.
    fn session(&self) -> Session {
        user_session(&self.pkcs11, virtual_slot())
    }

    /// The pass-through slot of member `i` (library `m<i>`).
    fn member_slot(&self, i: usize) -> Slot {
        let id = passthrough_slot_id(&format!("m{i}"), self.hsm.tokens[i].slot_id);
        Slot::try_from(id).expect("slot id")
    }

    /// Makes member `i` answer every call with `CKR_DEVICE_ERROR`.
    fn fault(&self, i: usize) {
        self.members[i].set_fault(CKR_DEVICE_ERROR);
    }

    /// How often each member received the entry point `name`.
    fn counts(&self, name: &str) -> Vec<u64> {
        self.members.iter().map(|m| m.call_count(name)).collect()
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        // An error here would only hide the test's own result.
        let _ = self.pkcs11.clone().finalize();
        env::remove_var(CONF_ENV);
        env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn start_ha() -> Pkcs11 {
    let pkcs11 = load_ha();
    initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
    pkcs11
}

/// Slot 0: the group is `VirtualToken00`.
fn virtual_slot() -> Slot {
    Slot::try_from(0u64).expect("slot 0")
}

/// Per member, how much `after` grew over `before`.
fn grown(before: &[u64], after: &[u64]) -> Vec<u64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

/// The one member whose count grew; panics unless exactly one did.
fn only_one_grew(before: &[u64], after: &[u64], what: &str) -> usize {
    let grew: Vec<usize> = grown(before, after)
        .iter()
        .enumerate()
        .filter(|(_, d)| **d > 0)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(grew.len(), 1, "{what}: counts went {before:?} -> {after:?}");
    grew[0]
}

/// Asserts that `result` failed with exactly `want`.
#[track_caller]
fn expect_rv<T: Debug>(result: cryptoki::error::Result<T>, want: RvError, what: &str) {
    match result {
        Err(Error::Pkcs11(got, _)) if got == want => {}
        other => panic!("{what}: expected {want:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

fn ec_pair(s: &Session, id: &str, token: bool, extractable: bool) -> (ObjectHandle, ObjectHandle) {
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::EcParams(P256.to_vec()),
            Attribute::Token(token),
            Attribute::Id(id.into()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(token),
            Attribute::Id(id.into()),
            Attribute::Private(true),
            Attribute::Sign(true),
            Attribute::Sensitive(!extractable),
            Attribute::Extractable(extractable),
        ],
    )
    .unwrap_or_else(|e| panic!("EC key pair {id}: {e}"))
}

fn rsa_pair(
    s: &Session,
    id: &str,
    extractable: bool,
    allowed: Option<Vec<MechanismType>>,
) -> (ObjectHandle, ObjectHandle) {
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Id(id.into()),
        Attribute::Private(true),
        Attribute::Sign(true),
        Attribute::Sensitive(!extractable),
        Attribute::Extractable(extractable),
    ];
    if let Some(allowed) = allowed {
        private.push(Attribute::AllowedMechanisms(allowed));
    }
    s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Verify(true),
        ],
        &private,
    )
    .unwrap_or_else(|e| panic!("RSA key pair {id}: {e}"))
}

fn aes_key(s: &Session, id: &str, token: bool, extractable: bool) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::ValueLen(32.into()),
            Attribute::Token(token),
            Attribute::Id(id.into()),
            Attribute::Private(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Sensitive(!extractable),
            Attribute::Extractable(extractable),
        ],
    )
    .unwrap_or_else(|e| panic!("AES key {id}: {e}"))
}

/// The one object of `class` with `CKA_ID = id` the session sees.
#[track_caller]
fn find_one(s: &Session, class: ObjectClass, id: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.into())])
        .unwrap_or_else(|e| panic!("find {class} {id}: {e}"));
    assert_eq!(found.len(), 1, "objects of class {class} with id {id}");
    found[0]
}

fn label_of(s: &Session, object: ObjectHandle) -> Option<String> {
    let attributes = s
        .get_attributes(object, &[AttributeType::Label])
        .expect("read CKA_LABEL");
    attributes.into_iter().find_map(|a| match a {
        Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
        _ => None,
    })
}

fn bool_of(s: &Session, object: ObjectHandle, attribute: AttributeType) -> bool {
    let attributes = s.get_attributes(object, &[attribute]).expect("read a flag");
    match attributes.as_slice() {
        [Attribute::Extractable(b)]
        | [Attribute::Sensitive(b)]
        | [Attribute::NeverExtractable(b)] => *b,
        other => panic!("{attribute:?} read as {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Raw calls, for what `cryptoki` never sends
// ---------------------------------------------------------------------------

/// The built library's own function table: short output buffers, a
/// vendor-defined mechanism, a raw attribute read. Same `dlopen` handle as
/// `cryptoki`'s, so the same library state.
struct Raw {
    list: CK_FUNCTION_LIST,
    _library: libloading::Library,
}

fn raw() -> &'static Raw {
    static RAW: OnceLock<Raw> = OnceLock::new();
    RAW.get_or_init(|| {
        let path = library_path();
        // SAFETY: loading a PKCS#11 module runs only its constructors, and
        // C_GetFunctionList has the signature PKCS#11 gives it.
        unsafe {
            let library = libloading::Library::new(&path)
                .unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
            let get = *library
                .get::<cryptoki_sys::CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .expect("C_GetFunctionList");
            let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
            assert_eq!(get.expect("C_GetFunctionList")(&mut list), CKR_OK);
            Raw {
                list: *list,
                _library: library,
            }
        }
    })
}

macro_rules! raw {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        let f = raw().list.$f.expect(stringify!($f));
        // SAFETY: every pointer passed points to a live local of the type
        // the PKCS#11 signature names, with its true length.
        unsafe { f($($arg),*) }
    }};
}

fn raw_sign_init(session: &Session, mechanism: CK_MECHANISM_TYPE, key: ObjectHandle) -> CK_RV {
    let mut mechanism = CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    raw!(C_SignInit(session.handle(), &mut mechanism, key.handle()))
}

/// `C_Sign` into `out` (NULL for a length query): the answer and the length.
fn raw_sign(session: CK_SESSION_HANDLE, data: &[u8], out: Option<&mut [u8]>) -> (CK_RV, usize) {
    let (ptr, mut len) = match out {
        Some(buf) => (buf.as_mut_ptr(), buf.len() as CK_ULONG),
        None => (ptr::null_mut(), 0),
    };
    let rv = raw!(C_Sign(
        session,
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        ptr,
        &mut len
    ));
    (rv, len as usize)
}

fn raw_digest_init(session: &Session, mechanism: CK_MECHANISM_TYPE) -> CK_RV {
    let mut mechanism = CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    raw!(C_DigestInit(session.handle(), &mut mechanism))
}

/// `C_Digest` into `out` (NULL for a length query): the answer and the
/// length.
fn raw_digest(session: &Session, data: &[u8], out: Option<&mut [u8]>) -> (CK_RV, usize) {
    let (ptr, mut len) = match out {
        Some(buf) => (buf.as_mut_ptr(), buf.len() as CK_ULONG),
        None => (ptr::null_mut(), 0),
    };
    let rv = raw!(C_Digest(
        session.handle(),
        data.as_ptr() as *mut u8,
        data.len() as CK_ULONG,
        ptr,
        &mut len
    ));
    (rv, len as usize)
}

/// Reads the secret component `attribute` of `key` into a zeroed buffer:
/// the answer, the length reported, and the buffer.
fn raw_secret(
    session: &Session,
    key: ObjectHandle,
    attribute: CK_ATTRIBUTE_TYPE,
) -> (CK_RV, CK_ULONG, [u8; 64]) {
    let mut buffer = [0u8; 64];
    let mut template = CK_ATTRIBUTE {
        type_: attribute,
        pValue: buffer.as_mut_ptr().cast(),
        ulValueLen: buffer.len() as CK_ULONG,
    };
    let handle: CK_OBJECT_HANDLE = key.handle();
    let rv = raw!(C_GetAttributeValue(
        session.handle(),
        handle,
        &mut template,
        1
    ));
    (rv, template.ulValueLen, buffer)
}

/// Makes data objects labelled `label` through `s`, on the token or not.
fn data_objects(s: &Session, label: &str, token: bool, count: usize) {
    for i in 0..count {
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(token),
            Attribute::Label(label.into()),
            Attribute::Value(vec![i as u8]),
        ])
        .expect("data object");
    }
}

/// Before each token object it makes on a SoftHSM member, the group has the
/// member read an object it made or found there before, which has SoftHSM read the
/// token's object list again (`MemberLibrary::call_writing`; its effect:
/// `tests/virtual_slot.rs`, `what_another_process_made_stays_in_view_...`)
/// -- never the token info, which re-reads `token.object` too: SoftHSM
/// 2.6.1 writes that file after unlocking it, and member processes that
/// read it empty lost their token for good in the soak. With one SoftHSM
/// token on the library and its probe known, the session's slot is not
/// asked either, nor for session objects, which leave the list alone. The
/// first token object after the login has the domain key the login looked
/// up to read (with neither, it writes unprobed: see the next test).
#[test]
fn a_softhsm_member_asks_neither_token_nor_session_info_for_the_objects_it_makes() {
    let ha = Ha::new(2);
    let s = ha.session();
    let searches = ha.counts("C_FindObjectsInit");
    data_objects(&s, "probe", true, 1);
    assert_eq!(
        ha.counts("C_FindObjectsInit"),
        searches,
        "the first token object read the domain key found at the login, not a search"
    );
    let (infos, sessions) = (ha.counts("C_GetTokenInfo"), ha.counts("C_GetSessionInfo"));
    data_objects(&s, "token", true, 3);
    data_objects(&s, "session", false, 3);
    assert_eq!(ha.counts("C_GetTokenInfo"), infos, "token info asked");
    assert_eq!(
        ha.counts("C_GetSessionInfo"),
        sessions,
        "session info asked"
    );
}

/// A public object made through the virtual slot is identified by one
/// attribute read on one member, its value read with the rest
/// (`identity::fingerprint_of_public`): on a network member each read is a
/// round trip, and the value read apart (its length, then itself) made a
/// data object's making five round trips on a group of two instead of
/// three.
#[test]
fn a_public_object_made_is_identified_by_one_attribute_read() {
    let ha = Ha::new(2);
    let s = ha.session();
    let reads = |ha: &Ha| ha.counts("C_GetAttributeValue").iter().sum::<u64>();
    let before = reads(&ha);
    data_objects(&s, "session", false, 3);
    assert_eq!(reads(&ha) - before, 3, "attribute reads for three objects");
}

/// A member connection with nothing to read before its first token write
/// -- no object made there, and no domain key found, as in a public
/// session before any login (or a spare's first replay import) -- writes
/// unprobed rather than search the token first: a search reads every
/// object's files, and on the long chaos run's tokens (8,700 objects,
/// under load) took a spare's first import past `memberTimeout`, taking
/// healthy members out 1-4 times a run.
#[test]
fn a_first_token_write_with_nothing_to_read_searches_no_member() {
    let ha = Ha::new(2);
    let s = ha
        .pkcs11
        .open_rw_session(virtual_slot())
        .expect("a public session");
    let searches = ha.counts("C_FindObjectsInit");
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label("public".into()),
        Attribute::Value(vec![1]),
    ])
    .expect("a public token object");
    assert_eq!(
        ha.counts("C_FindObjectsInit"),
        searches,
        "no member searched its token for the write"
    );
}

// ---------------------------------------------------------------------------
// 1. Replicated keys work on every member alone
// ---------------------------------------------------------------------------

/// Keys generated through the virtual slot -- AES-256 token and session
/// keys, RSA-2048 and EC P-256 pairs, extractable and not -- exist on every
/// member and work there alone: first through each member's own
/// pass-through slot (encrypting with one member and decrypting with
/// another, signing with one and verifying with every other), then through
/// the virtual slot with every member but one failing, for each member in
/// turn; signatures made by one survivor verify under the next.
#[test]
fn keys_made_on_the_virtual_slot_exist_and_work_on_every_member_alone() {
    let mut ha = Ha::new(3);
    let aes_ids = ["aes-token-x", "aes-token-n", "aes-session"];
    let ec_ids = ["ec-x", "ec-n"];
    let rsa_ids = ["rsa-x", "rsa-n"];
    // What every member must reproduce: AES-CBC with a fixed IV and
    // RSA PKCS#1 v1.5 are deterministic, so equal outputs mean equal keys.
    let mut ciphertexts: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut rsa_signatures: Vec<(&str, Vec<u8>)> = Vec::new();
    // (key id, signature) made by some member, for the others to verify.
    let mut ec_signatures: Vec<(&str, Vec<u8>)> = Vec::new();
    let digest;
    {
        let s = ha.session();
        aes_key(&s, "aes-token-x", true, true);
        aes_key(&s, "aes-token-n", true, false);
        // Lives as long as `s`.
        aes_key(&s, "aes-session", false, false);
        ec_pair(&s, "ec-x", true, true);
        ec_pair(&s, "ec-n", true, false);
        rsa_pair(&s, "rsa-x", true, None);
        rsa_pair(&s, "rsa-n", false, None);
        digest = s.digest(&Mechanism::Sha256, MESSAGE).expect("digest");

        let alone: Vec<Session> = (0..3)
            .map(|i| user_session(&ha.pkcs11, ha.member_slot(i)))
            .collect();
        let cbc = Mechanism::AesCbcPad(IV);
        for id in aes_ids {
            let outputs: Vec<Vec<u8>> = alone
                .iter()
                .map(|m| {
                    let key = find_one(m, ObjectClass::SECRET_KEY, id);
                    m.encrypt(&cbc, key, MESSAGE)
                        .unwrap_or_else(|e| panic!("{id}: encrypt: {e}"))
                })
                .collect();
            assert!(
                outputs.iter().all(|c| *c == outputs[0]),
                "{id}: members hold different key values"
            );
            for (i, ciphertext) in outputs.iter().enumerate() {
                let other = &alone[(i + 1) % 3];
                let key = find_one(other, ObjectClass::SECRET_KEY, id);
                let plain = other
                    .decrypt(&cbc, key, ciphertext)
                    .unwrap_or_else(|e| panic!("{id}: decrypt: {e}"));
                assert_eq!(plain, MESSAGE, "{id}: member {i} -> {}", (i + 1) % 3);
            }
            if id != "aes-session" {
                ciphertexts.push((id, outputs[0].clone()));
            }
        }
        for id in ec_ids {
            for (i, signer) in alone.iter().enumerate() {
                let private = find_one(signer, ObjectClass::PRIVATE_KEY, id);
                let signature = signer
                    .sign(&Mechanism::Ecdsa, private, &digest)
                    .unwrap_or_else(|e| panic!("{id}: sign on member {i}: {e}"));
                for (j, verifier) in alone.iter().enumerate() {
                    let public = find_one(verifier, ObjectClass::PUBLIC_KEY, id);
                    verifier
                        .verify(&Mechanism::Ecdsa, public, &digest, &signature)
                        .unwrap_or_else(|e| panic!("{id}: signed on {i}, verified on {j}: {e}"));
                }
                ec_signatures.push((id, signature));
            }
        }
        for id in rsa_ids {
            let signatures: Vec<Vec<u8>> = alone
                .iter()
                .map(|m| {
                    let private = find_one(m, ObjectClass::PRIVATE_KEY, id);
                    m.sign(&Mechanism::Sha256RsaPkcs, private, MESSAGE)
                        .unwrap_or_else(|e| panic!("{id}: sign: {e}"))
                })
                .collect();
            assert!(
                signatures.iter().all(|s| *s == signatures[0]),
                "{id}: members hold different private keys"
            );
            for (j, verifier) in alone.iter().enumerate() {
                let public = find_one(verifier, ObjectClass::PUBLIC_KEY, id);
                verifier
                    .verify(&Mechanism::Sha256RsaPkcs, public, MESSAGE, &signatures[0])
                    .unwrap_or_else(|e| panic!("{id}: verify on member {j}: {e}"));
            }
            rsa_signatures.push((id, signatures[0].clone()));
        }
    }

    for survivor in 0..3 {
        ha.restart();
        let s = ha.session();
        for other in (0..3).filter(|m| *m != survivor) {
            ha.fault(other);
        }
        let signs_before = ha.counts("C_Sign");
        let mut signs = 0;
        let cbc = Mechanism::AesCbcPad(IV);
        for (id, expected) in &ciphertexts {
            let key = find_one(&s, ObjectClass::SECRET_KEY, id);
            let ciphertext = s
                .encrypt(&cbc, key, MESSAGE)
                .unwrap_or_else(|e| panic!("{id}: encrypt on member {survivor} alone: {e}"));
            assert_eq!(&ciphertext, expected, "{id} on member {survivor} alone");
            let plain = s
                .decrypt(&cbc, key, expected)
                .unwrap_or_else(|e| panic!("{id}: decrypt on member {survivor} alone: {e}"));
            assert_eq!(plain, MESSAGE);
        }
        for (id, expected) in &rsa_signatures {
            let private = find_one(&s, ObjectClass::PRIVATE_KEY, id);
            let public = find_one(&s, ObjectClass::PUBLIC_KEY, id);
            let signature = s
                .sign(&Mechanism::Sha256RsaPkcs, private, MESSAGE)
                .unwrap_or_else(|e| panic!("{id}: sign on member {survivor} alone: {e}"));
            signs += 1;
            assert_eq!(&signature, expected, "{id} on member {survivor} alone");
            s.verify(&Mechanism::Sha256RsaPkcs, public, MESSAGE, &signature)
                .unwrap_or_else(|e| panic!("{id}: verify on member {survivor} alone: {e}"));
        }
        let mut made = Vec::new();
        for id in ec_ids {
            let private = find_one(&s, ObjectClass::PRIVATE_KEY, id);
            let public = find_one(&s, ObjectClass::PUBLIC_KEY, id);
            let signature = s
                .sign(&Mechanism::Ecdsa, private, &digest)
                .unwrap_or_else(|e| panic!("{id}: sign on member {survivor} alone: {e}"));
            signs += 1;
            made.push((id, signature));
            // Every signature made so far, by every member, verifies here.
            for (signed_id, signature) in ec_signatures.iter().filter(|(i, _)| *i == id) {
                s.verify(&Mechanism::Ecdsa, public, &digest, signature)
                    .unwrap_or_else(|e| {
                        panic!("{signed_id}: verify on member {survivor} alone: {e}")
                    });
            }
        }
        ec_signatures.extend(made);
        // Each signature is a length query and the real call, and both ran
        // on the survivor: nothing else could have made them.
        let signed = grown(&signs_before, &ha.counts("C_Sign"));
        let mut expected = vec![0; 3];
        expected[survivor] = 2 * signs;
        assert_eq!(
            signed, expected,
            "C_Sign calls per member, survivor {survivor}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Non-extractable keys, and the domain key
// ---------------------------------------------------------------------------

/// A member whose library refuses the key-wrap mechanism it lists can
/// never receive a generated key. That is found when it is attached and
/// remembered while it is down: a generated key is refused the same way
/// whether that member is up or down (`CKR_FUNCTION_FAILED`, nothing left
/// on any member), never reported made while it lives on one member only.
/// Imported keys still reach it when it returns.
#[test]
fn generated_keys_are_refused_alike_while_a_member_that_cannot_receive_them_is_up_or_down() {
    let log_dir = tempfile::tempdir().expect("HA log dir");
    let settings = format!(
        "haLogStatus = enabled\nhaLogPath = {}\n",
        log_dir.path().display()
    );
    let ha = Ha::prepared(2, 0, &settings, |members| members[1].refuse_key_wrap());
    let s = ha.session();
    let generate = |id: &str| {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Id(id.into()),
                Attribute::Encrypt(true),
            ],
        )
    };
    expect_rv(generate("up"), RvError::FunctionFailed, "member 1 up");
    ha.fault(1);
    // A call reaches member 1 and takes it out (fewest calls in flight,
    // ties rotated: two digests reach both members).
    for _ in 0..2 {
        s.digest(&Mechanism::Sha256, b"x").expect("C_Digest");
    }
    assert!(!member_serves(0, 1), "member 1 is down");
    let before = ha.counts("C_GenerateKey");
    expect_rv(generate("down"), RvError::FunctionFailed, "member 1 down");
    assert_eq!(
        grown(&before, &ha.counts("C_GenerateKey")),
        [1, 0],
        "the key was made on member 0 while member 1 was down"
    );
    let alone = user_session(&ha.pkcs11, ha.member_slot(0));
    let log = fs::read_to_string(log_dir.path().join("haErrorLog.txt")).expect("the HA log");
    assert!(
        log.lines()
            .any(|l| l.contains("could never receive the new secret key (no label, ID 646f776e)")),
        "the HA log names the key refused by class, label and ID: {log}"
    );
    for id in ["up", "down"] {
        let left = alone
            .find_objects(&[Attribute::Id(id.into())])
            .expect("C_FindObjects");
        assert!(left.is_empty(), "member 0 kept key {id}");
    }
    let imported = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Id(b"imported".to_vec()),
            Attribute::Value(vec![7; 32]),
            Attribute::Encrypt(true),
        ])
        .expect("an imported key is made while member 1 is down");
    s.destroy_object(imported).expect("C_DestroyObject");
}

/// A key the application made non-extractable (and sensitive) cannot leave
/// the group through the application: `C_WrapKey` under the application's
/// own AES key fails with `CKR_KEY_UNEXTRACTABLE` on the virtual slot (and
/// is refused on each member's own slot too), its `CKA_VALUE` is sensitive,
/// and it reads `CKA_EXTRACTABLE = FALSE`, `CKA_NEVER_EXTRACTABLE = TRUE`
/// through the virtual slot, though the members keep it extractable under
/// trusted keys to replicate it.
#[test]
fn non_extractable_keys_cannot_be_exported_by_the_application() {
    let ha = Ha::new(2);
    let s = ha.session();
    let wrapper = aes_key(&s, "app-wrapper", true, true);
    let secret = aes_key(&s, "secret-aes", true, false);
    let (_, ec_private) = ec_pair(&s, "secret-ec", true, false);
    let (_, rsa_private) = rsa_pair(&s, "secret-rsa", false, None);
    // The attribute holding each key's secret (RSA keys have no CKA_VALUE).
    let keys = [
        (secret, ObjectClass::SECRET_KEY, "secret-aes", CKA_VALUE),
        (ec_private, ObjectClass::PRIVATE_KEY, "secret-ec", CKA_VALUE),
        (
            rsa_private,
            ObjectClass::PRIVATE_KEY,
            "secret-rsa",
            CKA_PRIVATE_EXPONENT,
        ),
    ];
    for (key, _, id, secret_attribute) in keys {
        expect_rv(
            s.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, key),
            RvError::KeyUnextractable,
            &format!("{id}: C_WrapKey under the application's key"),
        );
        let (rv, len, buffer) = raw_secret(&s, key, secret_attribute);
        assert_eq!(rv, CKR_ATTRIBUTE_SENSITIVE, "{id}: read its secret");
        assert_eq!(
            len, CK_UNAVAILABLE_INFORMATION,
            "{id}: length of its secret"
        );
        assert_eq!(buffer, [0u8; 64], "{id}: nothing written");
        assert!(!bool_of(&s, key, AttributeType::Extractable), "{id}");
        assert!(bool_of(&s, key, AttributeType::NeverExtractable), "{id}");
        assert!(bool_of(&s, key, AttributeType::Sensitive), "{id}");
    }
    // The extractable wrapping key itself can be wrapped: the refusal above
    // is about the keys, not the mechanism.
    let other = aes_key(&s, "app-other", true, true);
    s.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, other)
        .expect("wrap an extractable key");

    for i in 0..2 {
        let alone = user_session(&ha.pkcs11, ha.member_slot(i));
        let wrapper = find_one(&alone, ObjectClass::SECRET_KEY, "app-wrapper");
        for (_, class, id, secret_attribute) in keys {
            let key = find_one(&alone, class, id);
            let wrapped = alone.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, key);
            assert!(
                wrapped.is_err(),
                "{id}: member {i} wrapped it under an untrusted key"
            );
            let (rv, _, buffer) = raw_secret(&alone, key, secret_attribute);
            assert_eq!(rv, CKR_ATTRIBUTE_SENSITIVE, "{id} on member {i}");
            assert_eq!(buffer, [0u8; 64]);
        }
    }
}

/// The domain key never reaches the application through the virtual slot:
/// `C_FindObjects` leaves it out -- in a search for everything, by its
/// label, by its class -- on a fresh start before any key was replicated,
/// after replication, and when another member serves the search because the
/// primary failed. (Each member holds it: keys replicate through it. The
/// member's pass-through slot hides it too.)
#[test]
fn the_domain_key_is_never_found_through_the_virtual_slot() {
    let ha = Ha::new(3);
    let s = ha.session();
    let alone = user_session(&ha.pkcs11, ha.member_slot(1));
    let on_member = alone
        .find_objects(&[Attribute::Label(DOMAIN_LABEL.into())])
        .expect("find on the pass-through slot");
    assert!(
        on_member.is_empty(),
        "the member's pass-through slot hides its domain key"
    );
    drop(alone);

    // Every search that returned it, so one run shows each case.
    let mut leaks: Vec<String> = Vec::new();
    let mut check = |when: &str| {
        let searches: [(&str, Vec<Attribute>); 3] = [
            ("everything", vec![]),
            ("by label", vec![Attribute::Label(DOMAIN_LABEL.into())]),
            (
                "secret keys",
                vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                ],
            ),
        ];
        for (name, template) in searches {
            let found = s
                .find_objects(&template)
                .unwrap_or_else(|e| panic!("{when}: find {name}: {e}"));
            if found
                .iter()
                .any(|o| label_of(&s, *o).as_deref() == Some(DOMAIN_LABEL))
            {
                leaks.push(format!("{when}: the search for {name}"));
            }
        }
    };
    check("fresh start, nothing replicated yet");
    aes_key(&s, "replicated", true, true);
    ec_pair(&s, "replicated-ec", true, false);
    check("after replication");
    ha.fault(0);
    check("primary failed");
    assert!(
        leaks.is_empty(),
        "C_FindObjects on the virtual slot returned the domain key: {leaks:#?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Session keys
// ---------------------------------------------------------------------------

/// A session key (`CKA_TOKEN = FALSE`) is on every member: encrypt with
/// it, fail the member that did, decrypt with the same handle on another;
/// fail that one too, and the last member still decrypts.
#[test]
fn session_keys_survive_failover() {
    let ha = Ha::new(3);
    let s = ha.session();
    let key = aes_key(&s, "session-aes", false, false);
    let cbc = Mechanism::AesCbcPad(IV);

    let before = ha.counts("C_Encrypt");
    let ciphertext = s.encrypt(&cbc, key, MESSAGE).expect("encrypt");
    let encrypted_on = only_one_grew(&before, &ha.counts("C_Encrypt"), "C_Encrypt");
    ha.fault(encrypted_on);

    let mut served = vec![encrypted_on];
    for round in 0..2 {
        let before = ha.counts("C_Decrypt");
        let plain = s
            .decrypt(&cbc, key, &ciphertext)
            .unwrap_or_else(|e| panic!("decrypt after {} members failed: {e}", round + 1));
        assert_eq!(plain, MESSAGE);
        let decrypted_on = only_one_grew(&before, &ha.counts("C_Decrypt"), "C_Decrypt");
        assert!(
            !served.contains(&decrypted_on),
            "a failed member ({decrypted_on}) served"
        );
        ha.fault(decrypted_on);
        served.push(decrypted_on);
    }
}

// ---------------------------------------------------------------------------
// 4. Failover under load
// ---------------------------------------------------------------------------

const THREADS: usize = 4;
const ROUNDS: usize = 300;
/// Each thread reports in after this many rounds...
const WARM_UP: usize = 20;
/// ...and waits here until the fault is in, so at least
/// `ROUNDS - HOLD` of its rounds run after it.
const HOLD: usize = 100;

/// `THREADS` threads, each on its own session, sign a digest with ECDSA and
/// verify it, `ROUNDS` times. `inject` runs once every thread has done
/// `WARM_UP` rounds, while they keep going. Returns every failure.
fn sign_and_verify_under_load(
    ha: &Ha,
    (public, private): (ObjectHandle, ObjectHandle),
    inject: impl FnOnce(),
) -> Vec<String> {
    let (started, warm) = mpsc::channel::<()>();
    let barrier = Barrier::new(THREADS + 1);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (started, barrier, pkcs11) = (started.clone(), &barrier, &ha.pkcs11);
                // Never panics: a panic before the barrier would strand the
                // others; failures are returned instead.
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    let session = pkcs11.open_rw_session(virtual_slot());
                    for round in 0..ROUNDS {
                        if round == WARM_UP {
                            let _ = started.send(());
                        }
                        if round == HOLD {
                            barrier.wait();
                        }
                        let Ok(session) = &session else {
                            failures.push(format!("thread {t}: C_OpenSession: {session:?}"));
                            continue;
                        };
                        let digest = [(round % 251) as u8 ^ t as u8; 32];
                        let result =
                            session
                                .sign(&Mechanism::Ecdsa, private, &digest)
                                .and_then(|sig| {
                                    session.verify(&Mechanism::Ecdsa, public, &digest, &sig)
                                });
                        if let Err(e) = result {
                            failures.push(format!("thread {t} round {round}: {e}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        for _ in 0..THREADS {
            // Bounded: a thread that cannot report is caught by the
            // failures it returns.
            let _ = warm.recv_timeout(PATIENCE);
        }
        inject();
        barrier.wait();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|_| vec!["a thread panicked".into()])
            })
            .collect()
    })
}

/// Signs `count` digests on this thread and verifies each signature.
fn sign_and_verify(s: &Session, (public, private): (ObjectHandle, ObjectHandle), count: usize) {
    for round in 0..count {
        let digest = [round as u8; 32];
        let signature = s
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_or_else(|e| panic!("sign {round}: {e}"));
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .unwrap_or_else(|e| panic!("verify {round}: {e}"));
    }
}

/// Four threads sign and verify on a three-member group; one member starts
/// answering `CKR_DEVICE_ERROR` while they run. No operation fails; the
/// failed member gets at most one call per thread after its fault (the one
/// that discovers it) and then none, while the other two serve.
#[test]
fn signing_under_load_survives_a_member_fault() {
    let ha = Ha::new(3);
    let s = ha.session();
    let keys = ec_pair(&s, "load", true, false);
    let faulted = 1;
    let mut at_fault = Vec::new();
    let failures = sign_and_verify_under_load(&ha, keys, || {
        ha.fault(faulted);
        at_fault = ha.counts("C_Sign");
    });
    let after_load = ha.counts("C_Sign");
    assert!(failures.is_empty(), "failed operations: {failures:#?}");
    assert!(
        at_fault[faulted] > 0,
        "member {faulted} served before its fault"
    );
    assert!(
        after_load[faulted] - at_fault[faulted] <= THREADS as u64,
        "member {faulted} kept receiving C_Sign after its fault: {at_fault:?} -> {after_load:?}"
    );
    for other in (0..3).filter(|m| *m != faulted) {
        assert!(
            after_load[other] > at_fault[other],
            "member {other} served after the fault: {at_fault:?} -> {after_load:?}"
        );
    }
    sign_and_verify(&s, keys, 30);
    assert_eq!(
        ha.counts("C_Sign")[faulted],
        after_load[faulted],
        "the failed member stays out of service"
    );
}

/// As above, but the member fails only after three more calls, so the
/// fault lands inside operations in flight (between a `C_SignInit` and its
/// `C_Sign`, or between the length query and the signature): still no
/// operation fails, and the member stops receiving calls.
#[test]
fn signing_under_load_survives_a_fault_inside_operations() {
    let ha = Ha::new(3);
    let s = ha.session();
    let keys = ec_pair(&s, "load", true, false);
    let faulted = 0;
    const FORWARDED: u64 = 3;
    let mut at_fault = Vec::new();
    let failures = sign_and_verify_under_load(&ha, keys, || {
        at_fault = ha.counts("C_Sign");
        ha.members[faulted].fail_after(FORWARDED, CKR_DEVICE_ERROR);
    });
    let after_load = ha.counts("C_Sign");
    assert!(failures.is_empty(), "failed operations: {failures:#?}");
    let later = after_load[faulted] - at_fault[faulted];
    assert!(
        later <= FORWARDED + THREADS as u64,
        "member {faulted} kept receiving C_Sign after its fault: {at_fault:?} -> {after_load:?}"
    );
    for other in (0..3).filter(|m| *m != faulted) {
        assert!(after_load[other] > at_fault[other], "member {other} served");
    }
    sign_and_verify(&s, keys, 30);
    assert_eq!(
        ha.counts("C_Sign")[faulted],
        after_load[faulted],
        "the failed member stays out of service"
    );
}

/// The same, one step at a time: the member bound by `C_SignInit` fails
/// before the `C_Sign` length query; then the next bound member answers the
/// length query and fails before the signature. Both signatures are made
/// (on another member) and verify.
#[test]
fn a_fault_between_sign_init_and_sign_is_absorbed() {
    let ha = Ha::new(3);
    let s = ha.session();
    let (public, private) = ec_pair(&s, "ec", true, false);
    let digest = [0x5e; 32];

    // Fails before the length query.
    let inits = ha.counts("C_SignInit");
    assert_eq!(raw_sign_init(&s, CKM_ECDSA, private), CKR_OK);
    let first = only_one_grew(&inits, &ha.counts("C_SignInit"), "C_SignInit");
    ha.members[first].fail_after(0, CKR_DEVICE_ERROR);
    let (rv, len) = raw_sign(s.handle(), &digest, None);
    assert_eq!((rv, len), (CKR_OK, 64), "length query after the fault");
    let mut signature = vec![0u8; len];
    let (rv, len) = raw_sign(s.handle(), &digest, Some(&mut signature));
    assert_eq!((rv, len), (CKR_OK, 64), "signature after the fault");
    s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .expect("the signature made after failover verifies");

    // Answers the length query, then fails.
    let inits = ha.counts("C_SignInit");
    let signs = ha.counts("C_Sign");
    assert_eq!(raw_sign_init(&s, CKM_ECDSA, private), CKR_OK);
    let second = only_one_grew(&inits, &ha.counts("C_SignInit"), "C_SignInit");
    assert_ne!(second, first, "a failed member was bound");
    ha.members[second].fail_after(1, CKR_DEVICE_ERROR);
    let (rv, len) = raw_sign(s.handle(), &digest, None);
    assert_eq!((rv, len), (CKR_OK, 64), "length query");
    let mut signature = vec![0u8; len];
    let (rv, len) = raw_sign(s.handle(), &digest, Some(&mut signature));
    assert_eq!(
        (rv, len),
        (CKR_OK, 64),
        "signature after the fault between query and signature"
    );
    s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .expect("the signature made after failover verifies");
    let third = 3 - first - second;
    let signed = grown(&signs, &ha.counts("C_Sign"));
    assert_eq!(signed[second], 2, "query and the faulted call: {signed:?}");
    assert_eq!(
        signed[third], 1,
        "the signature came from member {third}: {signed:?}"
    );
}

/// Once a member has accepted a mechanism without a parameter at
/// `C_DigestInit` on a session, the session's later digests with it start
/// lazily: `C_DigestInit` reaches no member (a second one is still
/// refused), and `C_Digest` starts and finishes the digest on one member --
/// on another if that one faults first. An update starts it on a member as
/// `C_DigestInit` would have; a length query leaves it bound to the member
/// that answered, and it moves when that member fails. Every digest is the
/// one a single eager digest gave.
#[test]
fn a_digest_started_lazily_reaches_a_member_with_its_data() {
    let ha = Ha::new(3);
    let s = ha.session();
    let data = b"started lazily";
    let expected = s.digest(&Mechanism::Sha256, data).expect("digest");
    let mut out = [0u8; 32];

    let (inits, digests) = (ha.counts("C_DigestInit"), ha.counts("C_Digest"));
    assert_eq!(raw_digest_init(&s, CKM_SHA256), CKR_OK);
    assert_eq!(
        ha.counts("C_DigestInit"),
        inits,
        "C_DigestInit reached a member"
    );
    assert_eq!(
        raw_digest_init(&s, CKM_SHA256),
        CKR_OPERATION_ACTIVE,
        "a second C_DigestInit"
    );
    assert_eq!(raw_digest(&s, data, Some(&mut out)), (CKR_OK, 32));
    assert_eq!(out.as_slice(), expected.as_slice());
    let member = only_one_grew(&inits, &ha.counts("C_DigestInit"), "C_DigestInit");
    let digested = only_one_grew(&digests, &ha.counts("C_Digest"), "C_Digest");
    assert_eq!(member, digested, "init and digest on one member");

    let inits = ha.counts("C_DigestInit");
    assert_eq!(raw_digest_init(&s, CKM_SHA256), CKR_OK);
    s.digest_update(data)
        .expect("C_DigestUpdate of a lazy digest");
    only_one_grew(
        &inits,
        &ha.counts("C_DigestInit"),
        "C_DigestInit at the update",
    );
    assert_eq!(s.digest_final().expect("C_DigestFinal"), expected);

    let inits = ha.counts("C_DigestInit");
    assert_eq!(raw_digest_init(&s, CKM_SHA256), CKR_OK);
    assert_eq!(raw_digest(&s, data, None), (CKR_OK, 32), "length query");
    let queried = only_one_grew(&inits, &ha.counts("C_DigestInit"), "C_DigestInit");
    ha.fault(queried);
    out.fill(0);
    assert_eq!(
        raw_digest(&s, data, Some(&mut out)),
        (CKR_OK, 32),
        "the digest after its member failed"
    );
    assert_eq!(out.as_slice(), expected.as_slice());

    let other = (queried + 1) % 3;
    let last = 3 - queried - other;
    assert_eq!(raw_digest_init(&s, CKM_SHA256), CKR_OK);
    ha.fault(other);
    let digests = ha.counts("C_Digest");
    out.fill(0);
    assert_eq!(
        raw_digest(&s, data, Some(&mut out)),
        (CKR_OK, 32),
        "the digest with one serving member left"
    );
    assert_eq!(out.as_slice(), expected.as_slice());
    assert_eq!(
        only_one_grew(&digests, &ha.counts("C_Digest"), "C_Digest"),
        last
    );
}

// ---------------------------------------------------------------------------
// 5. Multi-part operations in flight
// ---------------------------------------------------------------------------

const PARTS: [&[u8]; 6] = [
    b"alpha ",
    b"bravo ",
    b"charlie ",
    b"delta ",
    b"echo ",
    b"foxtrot",
];

/// A multi-part digest and a multi-part RSA signature, each in its own
/// session and half fed, lose their member(s); the rest of their updates
/// and their finals succeed elsewhere, with the very digest and signature a
/// single-part call gives.
#[test]
fn multipart_digest_and_sign_in_flight_finish_on_another_member() {
    let ha = Ha::new(3);
    let s = ha.session();
    let (public, private) = rsa_pair(&s, "rsa", false, None);
    let whole = PARTS.concat();
    let expected_digest = s.digest(&Mechanism::Sha256, &whole).expect("digest");
    let expected_signature = s
        .sign(&Mechanism::Sha256RsaPkcs, private, &whole)
        .expect("single-part signature");

    let digesting = ha.session();
    let signing = ha.session();
    digesting
        .digest_init(&Mechanism::Sha256)
        .expect("C_DigestInit");
    let before = ha.counts("C_DigestUpdate");
    for part in &PARTS[..3] {
        digesting.digest_update(part).expect("C_DigestUpdate");
    }
    let digest_member = only_one_grew(&before, &ha.counts("C_DigestUpdate"), "C_DigestUpdate");
    signing
        .sign_init(&Mechanism::Sha256RsaPkcs, private)
        .expect("C_SignInit");
    let before = ha.counts("C_SignUpdate");
    for part in &PARTS[..3] {
        signing.sign_update(part).expect("C_SignUpdate");
    }
    let sign_member = only_one_grew(&before, &ha.counts("C_SignUpdate"), "C_SignUpdate");

    ha.fault(digest_member);
    ha.fault(sign_member);
    for part in &PARTS[3..] {
        digesting
            .digest_update(part)
            .expect("C_DigestUpdate after the fault");
        signing
            .sign_update(part)
            .expect("C_SignUpdate after the fault");
    }
    assert_eq!(
        digesting.digest_final().expect("C_DigestFinal"),
        expected_digest
    );
    let signature = signing.sign_final().expect("C_SignFinal");
    assert_eq!(signature, expected_signature);
    s.verify(&Mechanism::Sha256RsaPkcs, public, &whole, &signature)
        .expect("verify");
}

/// A cipher stream cannot move (its output already reached the
/// application): an encryption and then a decryption in flight each answer
/// `CKR_DEVICE_ERROR` on the next call after their member fails, the
/// operation is over (`CKR_OPERATION_NOT_INITIALIZED` after), and the same
/// session then runs a new operation on another member.
#[test]
fn cipher_streams_in_flight_fail_once_and_the_session_stays_usable() {
    let ha = Ha::new(3);
    let s = ha.session();
    let key = aes_key(&s, "aes", true, false);
    let cbc = Mechanism::AesCbcPad(IV);
    let plain = [0x5a; 64];

    s.encrypt_init(&cbc, key).expect("C_EncryptInit");
    let before = ha.counts("C_EncryptUpdate");
    let first_part = s.encrypt_update(&plain[..32]).expect("C_EncryptUpdate");
    let encrypting = only_one_grew(&before, &ha.counts("C_EncryptUpdate"), "C_EncryptUpdate");
    ha.fault(encrypting);
    expect_rv(
        s.encrypt_update(&plain[32..]),
        RvError::DeviceError,
        "C_EncryptUpdate after its member failed",
    );
    expect_rv(
        s.encrypt_final(),
        RvError::OperationNotInitialized,
        "C_EncryptFinal of the lost operation",
    );
    let ciphertext = s
        .encrypt(&cbc, key, &plain)
        .expect("a new encryption on the same session");
    assert_eq!(&ciphertext[..32], &first_part[..], "same key, same IV");

    s.decrypt_init(&cbc, key).expect("C_DecryptInit");
    let before = ha.counts("C_DecryptUpdate");
    s.decrypt_update(&ciphertext[..48])
        .expect("C_DecryptUpdate");
    let decrypting = only_one_grew(&before, &ha.counts("C_DecryptUpdate"), "C_DecryptUpdate");
    assert_ne!(decrypting, encrypting, "a failed member was bound");
    ha.fault(decrypting);
    expect_rv(
        s.decrypt_update(&ciphertext[48..]),
        RvError::DeviceError,
        "C_DecryptUpdate after its member failed",
    );
    expect_rv(
        s.decrypt_final(),
        RvError::OperationNotInitialized,
        "C_DecryptFinal of the lost operation",
    );
    assert_eq!(
        s.decrypt(&cbc, key, &ciphertext)
            .expect("a new decryption on the same session"),
        plain
    );
}

/// With `MultipartReplayLimit = 16`, a digest fed exactly 16 bytes moves
/// when its member fails and gives the right digest; one fed 17 bytes
/// cannot, and answers `CKR_DEVICE_ERROR`; the session stays usable.
#[test]
fn multipart_replay_limit_bounds_what_can_move() {
    let ha = Ha::with(3, 0, "MultipartReplayLimit = 16\n");
    let s = ha.session();
    let at_limit = [0x11u8; 16];
    let over = [0x22u8; 17];
    let at_limit_digest = s.digest(&Mechanism::Sha256, &at_limit).expect("digest");
    let over_digest = s.digest(&Mechanism::Sha256, &over).expect("digest");

    s.digest_init(&Mechanism::Sha256).expect("C_DigestInit");
    let before = ha.counts("C_DigestUpdate");
    s.digest_update(&at_limit[..8]).expect("C_DigestUpdate");
    s.digest_update(&at_limit[8..]).expect("C_DigestUpdate");
    let first = only_one_grew(&before, &ha.counts("C_DigestUpdate"), "C_DigestUpdate");
    ha.fault(first);
    assert_eq!(
        s.digest_final().expect("16 bytes of updates move"),
        at_limit_digest
    );

    s.digest_init(&Mechanism::Sha256).expect("C_DigestInit");
    let before = ha.counts("C_DigestUpdate");
    s.digest_update(&over[..8]).expect("C_DigestUpdate");
    s.digest_update(&over[8..]).expect("C_DigestUpdate");
    let second = only_one_grew(&before, &ha.counts("C_DigestUpdate"), "C_DigestUpdate");
    assert_ne!(second, first);
    ha.fault(second);
    expect_rv(
        s.digest_final(),
        RvError::DeviceError,
        "a digest over the replay limit whose member failed",
    );
    assert_eq!(
        s.digest(&Mechanism::Sha256, &over)
            .expect("the session stays usable"),
        over_digest
    );
}

// ---------------------------------------------------------------------------
// 6-8. Request errors, PINs and lost logins
// ---------------------------------------------------------------------------

/// Request errors are the application's, never a member fault: 3000 of
/// them -- verifications of a bad signature (`CKR_SIGNATURE_INVALID`),
/// `C_SignInit` with a mechanism the key does not allow or a vendor-defined
/// one (`CKR_MECHANISM_INVALID`), and `C_Sign` into a short buffer
/// (`CKR_BUFFER_TOO_SMALL`) -- spread over every member, and afterwards
/// every member still serves signatures.
#[test]
fn request_errors_never_take_a_member_out() {
    let ha = Ha::new(3);
    let s = ha.session();
    let (public, private) = ec_pair(&s, "ec", true, false);
    let (_, restricted) = rsa_pair(&s, "rsa", false, Some(vec![MechanismType::SHA256_RSA_PKCS]));
    let digest = [0x3c; 32];
    let mut bad = s.sign(&Mechanism::Ecdsa, private, &digest).expect("sign");
    bad[10] ^= 0x01;
    let vendor_defined = CKM_VENDOR_DEFINED | 0x4841;

    // Each kind in its own run of 1000, so the rotation over members
    // spreads each kind over all of them; the counts prove it did.
    let reached = |name: &str, before: &[u64]| {
        let reached = grown(before, &ha.counts(name));
        assert!(
            reached.iter().all(|n| *n > 0),
            "{name}: the bad requests reached every member: {reached:?}"
        );
    };
    let before = ha.counts("C_Verify");
    for _ in 0..1000 {
        expect_rv(
            s.verify(&Mechanism::Ecdsa, public, &digest, &bad),
            RvError::SignatureInvalid,
            "verify a bad signature",
        );
    }
    reached("C_Verify", &before);
    let before = ha.counts("C_SignInit");
    for round in 0..1000 {
        if round % 2 == 0 {
            expect_rv(
                s.sign(&Mechanism::Sha1RsaPkcs, restricted, MESSAGE),
                RvError::MechanismInvalid,
                "C_SignInit with a mechanism the key does not allow",
            );
        } else {
            assert_eq!(
                raw_sign_init(&s, vendor_defined, private),
                CKR_MECHANISM_INVALID,
                "C_SignInit with a vendor-defined mechanism"
            );
        }
    }
    reached("C_SignInit", &before);
    let before = ha.counts("C_Sign");
    for _ in 0..1000 {
        assert_eq!(raw_sign_init(&s, CKM_ECDSA, private), CKR_OK);
        let mut short = [0u8; 10];
        let (rv, needed) = raw_sign(s.handle(), &digest, Some(&mut short));
        assert_eq!(
            (rv, needed),
            (CKR_BUFFER_TOO_SMALL, 64),
            "C_Sign, short buffer"
        );
        let mut signature = [0u8; 64];
        let (rv, _) = raw_sign(s.handle(), &digest, Some(&mut signature));
        assert_eq!(rv, CKR_OK, "C_Sign after CKR_BUFFER_TOO_SMALL");
    }
    reached("C_Sign", &before);

    // Which member signs next is the balancer's choice (by latency, and
    // a sign followed by a verify can leave every exploring turn to the
    // verify), so the group's own state says whether each still serves.
    for i in 0..3 {
        assert!(
            member_serves(0, i),
            "member {i} still serves after 3000 request errors"
        );
    }
    sign_and_verify(&s, (public, private), 30);
}

/// Whether each member's token counted a failed login
/// (`CKF_USER_PIN_COUNT_LOW`), read through its pass-through slot.
fn failed_logins_counted(ha: &Ha) -> Vec<bool> {
    (0..ha.members.len())
        .map(|i| {
            ha.pkcs11
                .get_token_info(ha.member_slot(i))
                .expect("C_GetTokenInfo")
                .user_pin_count_low()
        })
        .collect()
}

/// A wrong PIN costs one try on one token: `C_Login` through the virtual
/// slot answers `CKR_PIN_INCORRECT` after exactly one member `C_Login` (and
/// only that token counts a failed login), and no token is logged in; the
/// right PIN then logs in every member.
#[test]
fn a_wrong_pin_is_tried_on_exactly_one_member() {
    let ha = Ha::new(3);
    let s = ha
        .pkcs11
        .open_rw_session(virtual_slot())
        .expect("C_OpenSession");
    let observers: Vec<Session> = (0..3)
        .map(|i| {
            ha.pkcs11
                .open_ro_session(ha.member_slot(i))
                .expect("C_OpenSession")
        })
        .collect();
    let state = |i: usize| {
        observers[i]
            .get_session_info()
            .expect("C_GetSessionInfo")
            .session_state()
    };

    let before = ha.counts("C_Login");
    expect_rv(
        s.login(UserType::User, Some(&AuthPin::new("0000".into()))),
        RvError::PinIncorrect,
        "C_Login with a wrong PIN",
    );
    let tried = grown(&before, &ha.counts("C_Login"));
    assert_eq!(
        tried.iter().sum::<u64>(),
        1,
        "member C_Login calls: {tried:?}"
    );
    let count_low = failed_logins_counted(&ha);
    assert_eq!(
        count_low.iter().filter(|low| **low).count(),
        1,
        "tokens that counted a failed login: {count_low:?}"
    );
    for i in 0..3 {
        assert_eq!(state(i), SessionState::RoPublic, "member {i} logged in");
    }

    let before = ha.counts("C_Login");
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("C_Login with the right PIN");
    let logged = grown(&before, &ha.counts("C_Login"));
    assert!(
        logged.iter().all(|n| *n >= 1),
        "member C_Login calls: {logged:?}"
    );
    for i in 0..3 {
        assert_eq!(state(i), SessionState::RoUser, "member {i} is logged in");
    }
}

/// A member whose `C_Login` answers `CKR_GENERAL_ERROR` however often it
/// is asked -- a SoftHSM process whose view of its token file stays broken
/// until another process writes it (`group::log_in_member`) -- is taken
/// out and the login moves to the next member: a wrong PIN is counted
/// there only (the first checked none), the right one logs the group in,
/// and once the member's login answers again recovery logs it in and it
/// serves.
#[test]
fn a_login_that_fails_with_a_general_error_for_good_moves_to_the_next_member() {
    let ha = Ha::with(2, 0, "AutoReconnectInterval = 1\n");
    let s = ha
        .pkcs11
        .open_rw_session(virtual_slot())
        .expect("C_OpenSession");
    ha.members[0].fail_call("C_Login", CKR_GENERAL_ERROR);

    expect_rv(
        s.login(UserType::User, Some(&AuthPin::new("0000".into()))),
        RvError::PinIncorrect,
        "C_Login with a wrong PIN",
    );
    let count_low = failed_logins_counted(&ha);
    assert_eq!(
        count_low,
        [false, true],
        "tokens that counted a failed login (member 0, member 1)"
    );
    let status = group_status(0);
    assert!(!member_serves(0, 0), "member 0 still serves");
    assert_eq!(status.members[0].lastFault, CKR_GENERAL_ERROR);

    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("C_Login with the right PIN, on member 1");
    s.generate_random_vec(8)
        .expect("C_GenerateRandom on member 1");
    ha.members[0].clear_fault();
    let deadline = Instant::now() + PATIENCE;
    while !member_serves(0, 0) {
        assert!(Instant::now() < deadline, "member 0 never served again");
        thread::sleep(POLL);
    }
    let observer = ha
        .pkcs11
        .open_ro_session(ha.member_slot(0))
        .expect("C_OpenSession on member 0's own slot");
    assert_eq!(
        observer.get_session_info().expect("info").session_state(),
        SessionState::RoUser,
        "recovery logged member 0 in"
    );
}

/// Logs every member token out through its own slot: the login is per
/// token and process, so the group's member sessions lose it too, as when
/// a member restarts. Returns those sessions (they stay open).
fn log_every_member_out(ha: &Ha) -> Vec<Session> {
    (0..ha.members.len())
        .map(|i| {
            let member = ha
                .pkcs11
                .open_rw_session(ha.member_slot(i))
                .expect("C_OpenSession");
            member.logout().expect("C_Logout on the member's own slot");
            let state = member.get_session_info().expect("info").session_state();
            assert_eq!(state, SessionState::RwPublic, "member {i} logged out");
            member
        })
        .collect()
}

/// A member that lost its login (see [`log_every_member_out`]) is logged
/// in again transparently: a signature with a private key made before
/// through the virtual slot still succeeds, whichever member serves it,
/// and the member that served it got a new `C_Login`.
#[test]
fn a_member_that_lost_its_login_is_logged_in_again() {
    let ha = Ha::new(3);
    let s = ha.session();
    let (public, private) = ec_pair(&s, "ec", true, false);
    let digest = [0x42; 32];
    s.sign(&Mechanism::Ecdsa, private, &digest)
        .expect("sign before the logout");
    let _members = log_every_member_out(&ha);

    let logins = ha.counts("C_Login");
    let signs = ha.counts("C_Sign");
    for round in 0..12 {
        let signature = s
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_or_else(|e| panic!("sign {round} after the members lost their login: {e}"));
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .unwrap_or_else(|e| panic!("verify {round}: {e}"));
    }
    let signed = grown(&signs, &ha.counts("C_Sign"));
    let logged = grown(&logins, &ha.counts("C_Login"));
    for i in 0..3 {
        if signed[i] > 0 {
            assert!(logged[i] >= 1, "member {i} signed without a new login");
        }
    }
}

/// A member that lost its login answers a search without its private
/// objects and no error: a search through the virtual slot that ends
/// missing an object the group knows its member holds asks that member's
/// session state, logs it in again and searches again, so the application
/// finds its private key whichever member the search ran on, and each
/// member the searches ran on got a new `C_Login`.
#[test]
fn a_search_on_members_that_lost_their_login_finds_the_private_objects() {
    let ha = Ha::new(3);
    let s = ha.session();
    let (public, private) = ec_pair(&s, "kept", true, false);
    let by_id = [Attribute::Id(b"kept".to_vec())];
    let mut before = s.find_objects(&by_id).expect("search before the logout");
    before.sort_by_key(|h| h.handle());
    assert_eq!(before.len(), 2, "both halves before the logout");
    let _members = log_every_member_out(&ha);

    let logins = ha.counts("C_Login");
    let searches = ha.counts("C_FindObjectsInit");
    for round in 0..6 {
        let mut found = s
            .find_objects(&by_id)
            .unwrap_or_else(|e| panic!("search {round} after the members lost their login: {e}"));
        found.sort_by_key(|h| h.handle());
        assert_eq!(
            found, before,
            "search {round}: the pair ({public:?}, {private:?}) after the logout"
        );
    }
    let searched = grown(&searches, &ha.counts("C_FindObjectsInit"));
    let logged = grown(&logins, &ha.counts("C_Login"));
    assert!(searched.iter().any(|n| *n > 0), "no member searched");
    for i in 0..3 {
        if searched[i] > 0 {
            assert!(logged[i] >= 1, "member {i} searched without a new login");
        }
    }
}

/// A search started while its member had lost its login is answered as a
/// public session's, its matches fixed as it starts; another session's
/// call then meets the lost login and the group logs the member in again,
/// after which the search's session reads logged in. Fetched one object
/// at a time, as `pkcs11-tool` fetches, the search must still return the
/// private key (simulation seeds 1589, 1665).
#[test]
fn a_search_begun_before_its_member_was_logged_in_again_finds_the_private_objects() {
    let ha = Ha::new(1);
    let s = ha.session();
    let other = ha.session();
    let (public, private) = ec_pair(&s, "kept", true, false);
    let by_id = [Attribute::Id(b"kept".to_vec())];
    let _members = log_every_member_out(&ha);
    let one = std::num::NonZeroUsize::new(1).expect("one");
    let search = s
        .iter_objects_with_cache_size(&by_id, one)
        .expect("C_FindObjectsInit after the logout");
    let logins = ha.counts("C_Login");
    aes_key(&other, "made-meanwhile", true, false);
    assert!(
        grown(&logins, &ha.counts("C_Login"))[0] >= 1,
        "making a private key logged the member in again"
    );
    let mut found: Vec<ObjectHandle> = search.map(|h| h.expect("C_FindObjects")).collect();
    found.sort_by_key(|h| h.handle());
    let mut pair = vec![public, private];
    pair.sort_by_key(|h| h.handle());
    assert_eq!(found, pair, "the pair, found one object at a time");
}

/// The same loss of login on a member that cannot be logged in again (its
/// `C_Login` answers `CKR_GENERAL_ERROR` however often it is asked): the
/// application, logged in, never hears that a member is not -- the member
/// is taken out at the first call that finds it, with that fault (its
/// login's), and the call and every one after it run on the others.
#[test]
fn a_member_that_lost_its_login_and_cannot_log_in_again_goes_out() {
    // No reconciliation pass: one opening sessions beside the calls would
    // meet the loss first (`Group::unless_login_lost`).
    let ha = Ha::with(3, 0, &format!("\n[HASynchronize]\n{GROUP_LABEL} = 0\n"));
    let s = ha.session();
    let (public, private) = ec_pair(&s, "ec", true, false);
    let digest = [0x42; 32];
    // Every member holds a session of the application's by now, so that
    // the calls after the logout meet the loss there (a session opened
    // afterwards shows it first: `Group::unless_login_lost`).
    let signs = ha.counts("C_Sign");
    let mut round = 0;
    while grown(&signs, &ha.counts("C_Sign")).contains(&0) {
        assert!(round < 30, "not every member signed in {round} signatures");
        s.sign(&Mechanism::Ecdsa, private, &digest)
            .expect("sign before the logout");
        round += 1;
    }
    let _members = log_every_member_out(&ha);
    ha.members[0].fail_call("C_Login", CKR_GENERAL_ERROR);

    let logins = ha.counts("C_Login");
    let mut round = 0;
    while grown(&logins, &ha.counts("C_Login"))[0] == 0 {
        assert!(round < 30, "member 0 was not tried in {round} signatures");
        let signature = s
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_or_else(|e| panic!("sign {round} after the members lost their login: {e}"));
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .unwrap_or_else(|e| panic!("verify {round}: {e}"));
        round += 1;
    }
    assert!(!member_serves(0, 0), "member 0 still serves");
    assert_eq!(group_status(0).members[0].lastFault, CKR_GENERAL_ERROR);
    for round in 0..6 {
        let signature = s
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_or_else(|e| panic!("sign {round} with member 0 out: {e}"));
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .unwrap_or_else(|e| panic!("verify {round} with member 0 out: {e}"));
    }
}

/// The same loss of login, met by a call the members refuse with
/// `CKR_USER_NOT_LOGGED_IN` (generating a private key: made on one member,
/// unwrapped on the others): every member is logged in again with the
/// cached PIN, and the key is made and works.
#[test]
fn a_member_that_lost_its_login_is_logged_in_again_to_make_a_key() {
    let ha = Ha::new(3);
    let s = ha.session();
    let members = log_every_member_out(&ha);
    let logins = ha.counts("C_Login");
    let key = aes_key(&s, "after-logout", true, false);
    let logged = grown(&logins, &ha.counts("C_Login"));
    assert!(
        logged.iter().all(|n| *n >= 1),
        "member C_Login calls: {logged:?}"
    );
    for (i, member) in members.iter().enumerate() {
        let state = member.get_session_info().expect("info").session_state();
        assert_eq!(state, SessionState::RwUser, "member {i} logged in again");
    }
    let cbc = Mechanism::AesCbcPad(IV);
    let ciphertext = s.encrypt(&cbc, key, MESSAGE).expect("encrypt");
    assert_eq!(s.decrypt(&cbc, key, &ciphertext).expect("decrypt"), MESSAGE);
}

// ---------------------------------------------------------------------------
// 9-10. Load balancing, standby members, the end of the group
// ---------------------------------------------------------------------------

/// Sixty sequential signatures spread over every active member; the standby
/// member serves nothing -- not even with only one active member left --
/// and takes over once every active member has failed.
#[test]
fn load_is_balanced_and_standby_serves_only_when_every_active_member_failed() {
    let ha = Ha::with(3, 1, "");
    let standby = 3;
    let s = ha.session();
    let keys = ec_pair(&s, "ec", true, false);
    let crypto_calls = |ha: &Ha| -> Vec<u64> {
        let names = ["C_SignInit", "C_Sign", "C_VerifyInit", "C_Verify"];
        (0..4)
            .map(|i| names.iter().map(|n| ha.members[i].call_count(n)).sum())
            .collect()
    };

    let signs = ha.counts("C_Sign");
    let calls = crypto_calls(&ha);
    for round in 0..60u8 {
        s.sign(&Mechanism::Ecdsa, keys.1, &[round; 32])
            .unwrap_or_else(|e| panic!("sign {round}: {e}"));
    }
    let signed = grown(&signs, &ha.counts("C_Sign"));
    for (i, n) in signed.iter().take(3).enumerate() {
        assert!(*n > 0, "active member {i} served none of 60: {signed:?}");
    }
    assert_eq!(
        grown(&calls, &crypto_calls(&ha))[standby],
        0,
        "standby served"
    );

    ha.fault(0);
    ha.fault(1);
    let signs = ha.counts("C_Sign");
    let calls = crypto_calls(&ha);
    sign_and_verify(&s, keys, 20);
    let signed = grown(&signs, &ha.counts("C_Sign"));
    assert_eq!(
        signed,
        [0, 0, 40, 0],
        "C_Sign per member, member 2 the last active"
    );
    assert_eq!(
        grown(&calls, &crypto_calls(&ha))[standby],
        0,
        "standby served"
    );

    ha.fault(2);
    let signs = ha.counts("C_Sign");
    sign_and_verify(&s, keys, 20);
    let signed = grown(&signs, &ha.counts("C_Sign"));
    assert_eq!(
        signed,
        [0, 0, 0, 40],
        "C_Sign per member, every active one failed"
    );
}

/// Load balancing does not depend on what else the application calls:
/// rounds of sign, verify and random numbers -- a common request pattern --
/// on a three-member group still spread the signatures over every member,
/// and so do rounds of sign and verify on a group with a standby member.
#[test]
fn signatures_spread_over_every_member_whatever_else_is_called() {
    let mut unbalanced = Vec::new();
    for (standby, with_random) in [(0, true), (1, false)] {
        let ha = Ha::with(3, standby, "");
        let s = ha.session();
        let (public, private) = ec_pair(&s, "ec", true, false);
        let before = ha.counts("C_Sign");
        for round in 0..60u8 {
            let digest = [round; 32];
            let signature = s.sign(&Mechanism::Ecdsa, private, &digest).expect("sign");
            s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
                .expect("verify");
            if with_random {
                s.generate_random_vec(16).expect("C_GenerateRandom");
            }
        }
        let signed = grown(&before, &ha.counts("C_Sign"));
        if signed.iter().take(3).any(|n| *n == 0) {
            unbalanced.push(format!(
                "3 active + {standby} standby, sign + verify{}: C_Sign per member {signed:?}",
                if with_random { " + random" } else { "" }
            ));
        }
    }
    assert!(
        unbalanced.is_empty(),
        "an active member served none of 60 signatures: {unbalanced:#?}"
    );
}

/// When every member has failed, calls on the virtual slot answer
/// `CKR_DEVICE_ERROR` -- an operation in flight, new operations, searches,
/// random numbers, key generation, attribute reads -- and the slot shows no
/// token. A call waits only for the attempts begun when the last member
/// failed, and answers once each has failed to find its member's token:
/// never across the gap to a member's next attempt, nor for
/// `memberTimeout` -- here ten minutes, so a call that waited for either
/// would not answer within [`PATIENCE`]. Run on another thread with that
/// bounded wait, so a hang fails the test instead of blocking it.
#[test]
fn when_every_member_has_failed_calls_answer_device_error_promptly() {
    let log_dir = tempfile::tempdir().expect("HA log dir");
    let ha = Ha::with(
        3,
        0,
        &format!(
            "memberTimeout = 600000
haLogStatus = enabled
haLogPath = {}
",
            log_dir.path().display()
        ),
    );
    let s = ha.session();
    let (public, private) = ec_pair(&s, "ec", true, false);
    s.digest_init(&Mechanism::Sha256).expect("C_DigestInit");
    s.digest_update(b"in flight").expect("C_DigestUpdate");
    for i in 0..3 {
        ha.fault(i);
    }

    let (answers, answered) = mpsc::channel();
    let pkcs11 = ha.pkcs11.clone();
    let caller = thread::spawn(move || {
        let digest = [1u8; 32];
        let rv = |r: cryptoki::error::Result<()>| match r {
            Err(Error::Pkcs11(rv, _)) => Some(rv),
            _ => None,
        };
        let results: Vec<(&str, Option<RvError>)> = vec![
            ("C_DigestUpdate in flight", rv(s.digest_update(b"more"))),
            (
                "C_Sign",
                rv(s.sign(&Mechanism::Ecdsa, private, &digest).map(drop)),
            ),
            (
                "C_Verify",
                rv(s.verify(&Mechanism::Ecdsa, public, &digest, &[0; 64])),
            ),
            ("C_Digest", rv(s.digest(&Mechanism::Sha256, b"x").map(drop))),
            ("C_GenerateRandom", rv(s.generate_random_vec(16).map(drop))),
            ("C_FindObjects", rv(s.find_objects(&[]).map(drop))),
            (
                "C_GetAttributeValue",
                rv(s.get_attributes(private, &[AttributeType::Label]).map(drop)),
            ),
            (
                "C_GenerateKey",
                rv(s.generate_key(
                    &Mechanism::AesKeyGen,
                    &[Attribute::ValueLen(32.into()), Attribute::Token(false)],
                )
                .map(drop)),
            ),
            (
                "C_CreateObject",
                rv(s.create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(false),
                    Attribute::Value(vec![1, 2, 3]),
                ])
                .map(drop)),
            ),
        ];
        let opened = rv(pkcs11.open_rw_session(virtual_slot()).map(drop));
        let present = pkcs11
            .get_slot_info(virtual_slot())
            .map(|info| info.token_present());
        let _ = answers.send((results, opened, present));
    });
    let (results, opened, present) = answered
        .recv_timeout(PATIENCE)
        .expect("calls on a group whose members all failed did not return");
    // It has answered; let it close its session before the library goes.
    caller.join().expect("the calling thread");
    for (call, rv) in results {
        assert_eq!(rv, Some(RvError::DeviceError), "{call}");
    }
    assert!(
        matches!(
            opened,
            Some(RvError::DeviceError | RvError::TokenNotPresent)
        ),
        "C_OpenSession: {opened:?}"
    );
    assert!(
        matches!(present, Ok(false)),
        "C_GetSlotInfo: token present: {present:?}"
    );
    let log = fs::read_to_string(log_dir.path().join("haErrorLog.txt")).expect("the HA log");
    for token in &ha.hsm.tokens {
        assert!(
            log.lines().any(|l| l.contains(&token.serial)
                && l.contains(&format!(
                    "recovery failed: token {} not found",
                    token.serial
                ))),
            "the calls answered once member {} had been tried: {log}",
            token.serial
        );
    }
}

/// With no member serving, a call waits across the gap between two attempts
/// of a member whose last attempt found its token (it answers, but its login
/// fails while it catches up), and runs once that member serves: it neither
/// fails at once nor waits for `memberTimeout` (ten minutes here).
#[test]
fn with_no_member_serving_a_call_waits_for_a_member_whose_token_answers() {
    let log_dir = tempfile::tempdir().expect("HA log dir");
    let ha = Ha::with(
        3,
        0,
        &format!(
            "memberTimeout = 600000
AutoReconnectInterval = 1
haLogStatus = enabled
haLogPath = {}
",
            log_dir.path().display()
        ),
    );
    let s = ha.session();
    for i in 0..3 {
        ha.fault(i);
    }
    expect_rv(
        s.generate_random_vec(8),
        RvError::DeviceError,
        "C_GenerateRandom with every member out",
    );
    // Member 0's token answers again, but logging in to it fails.
    ha.members[0].clear_fault();
    ha.members[0].fail_call("C_Login", CKR_DEVICE_ERROR);
    let log = || fs::read_to_string(log_dir.path().join("haErrorLog.txt")).unwrap_or_default();
    let refused = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&ha.hsm.tokens[0].serial)
                    && l.contains("recovery failed: login refused with CKR_DEVICE_ERROR")
            })
            .count()
    };
    let deadline = Instant::now() + PATIENCE;
    while refused(&log()) == 0 {
        assert!(
            Instant::now() < deadline,
            "member 0 was never tried: {}",
            log()
        );
        thread::sleep(POLL);
    }

    let (answers, answered) = mpsc::channel();
    let (started, began) = mpsc::channel();
    let caller = thread::spawn(move || {
        started.send(()).expect("the test waits");
        let _ = answers.send(s.generate_random_vec(8).map(drop));
    });
    began.recv().expect("the caller started");
    // Two more refused attempts: the second began a whole interval after the
    // call was made, which still waits.
    let before = refused(&log());
    while refused(&log()) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "member 0 was not tried again: {}",
            log()
        );
        thread::sleep(POLL);
    }
    assert!(
        answered.try_recv().is_err(),
        "the call answered before member 0 served"
    );
    ha.members[0].clear_fault();
    answered
        .recv_timeout(PATIENCE)
        .expect("the call did not answer once member 0 served")
        .expect("C_GenerateRandom once member 0 serves");
    caller.join().expect("the calling thread");
    assert!(member_serves(0, 0), "member 0 serves");
}

/// A group of three members, given to `prepare` with a session while every
/// member serves; then members 1 and 2 fail, are tried and not found, and
/// are healthy again but an hour (`AutoReconnectInterval`) from their next
/// attempt: member 0 serves alone. With the session, what `prepare` gave,
/// and the HA log's directory (kept alive by the caller).
fn only_member_0_serves_and_the_others_wait_an_hour<T>(
    prepare: impl FnOnce(&Session) -> T,
) -> (Ha, Session, T, tempfile::TempDir) {
    let log_dir = tempfile::tempdir().expect("HA log dir");
    let ha = Ha::with(
        3,
        0,
        &format!(
            "AutoReconnectInterval = 3600
haLogStatus = enabled
haLogPath = {}
",
            log_dir.path().display()
        ),
    );
    let s = ha.session();
    let prepared = prepare(&s);
    let log = || fs::read_to_string(log_dir.path().join("haErrorLog.txt")).unwrap_or_default();
    let deadline = Instant::now() + PATIENCE;
    for i in [1, 2] {
        ha.fault(i);
        let failed = format!(
            "recovery failed: token {} not found",
            ha.hsm.tokens[i].serial
        );
        // Calls reach member i and take it out; its attempt fails.
        while !log().contains(&failed) {
            assert!(Instant::now() < deadline, "member {i} was never tried");
            s.generate_random_vec(8).expect("the other members serve");
        }
    }
    assert!(!member_serves(0, 1) && !member_serves(0, 2));
    ha.members[1].clear_fault();
    ha.members[2].clear_fault();
    (ha, s, prepared, log_dir)
}

/// The last serving member fails while the others are healthy again but
/// between recovery attempts (their last attempt failed while it served,
/// and the next is `AutoReconnectInterval`, an hour, away): every failed
/// member is tried at once, and calls wait for those attempts instead of
/// failing -- a burst of instant failures, in the long chaos run 22,184
/// calls in 62 ms. No call fails, a key made right after included.
#[test]
fn when_the_last_serving_member_fails_the_others_are_tried_at_once_and_no_call_fails() {
    let (ha, s, (public, private), _log_dir) =
        only_member_0_serves_and_the_others_wait_an_hour(|s| ec_pair(s, "burst", true, false));

    ha.fault(0);
    let digest = [1u8; 32];
    let signature = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("C_Sign: member 0 fails, and the others are tried at once");
    s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .expect("C_Verify");
    s.digest(&Mechanism::Sha256, MESSAGE).expect("C_Digest");
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(b"after the burst".to_vec()),
        Attribute::Value(vec![1, 2, 3]),
    ])
    .expect("C_CreateObject");
    assert!(
        !member_serves(0, 0) && (member_serves(0, 1) || member_serves(0, 2)),
        "the calls ran on a returned member"
    );
}

/// The last serving member fails inside `C_CreateObject` while the others
/// are healthy again but between attempts (as above): the import has
/// spent its wait for a member at its start (none was needed), yet it
/// does not fail -- it waits for the members tried at once and is made on
/// one of them (in the long chaos run, such imports failed while a member
/// was healthy). The member that failed never made it (the fault is
/// answered before the call reaches its token), and the object ends on
/// each member that serves once.
#[test]
fn an_import_whose_last_serving_member_fails_under_it_is_made_on_a_returning_member() {
    let (ha, s, (), _log_dir) = only_member_0_serves_and_the_others_wait_an_hour(|_| ());
    let deadline = Instant::now() + PATIENCE;
    let label = b"made after its member failed under it".to_vec();
    ha.members[0].fail_call("C_CreateObject", CKR_DEVICE_ERROR);
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(label.clone()),
        Attribute::Value(vec![4, 5, 6]),
    ])
    .expect("C_CreateObject: member 0 fails under it, and it waits for the others");
    let copies = |i: usize| {
        user_session(&ha.pkcs11, ha.member_slot(i))
            .find_objects(&[Attribute::Label(label.clone())])
            .expect("a search on the member alone")
            .len()
    };
    assert_eq!(copies(0), 0, "member 0 never made it");
    while !(member_serves(0, 1) && member_serves(0, 2) && copies(1) == 1 && copies(2) == 1) {
        assert!(
            Instant::now() < deadline,
            "the object once on members 1 and 2: {} and {}",
            copies(1),
            copies(2)
        );
        thread::sleep(POLL);
    }
}

/// A member whose token refuses imports with `CKR_GENERAL_ERROR` while
/// the other takes them (the soak: a member's SoftHSM refused every import
/// for 2 s, and 10 of the application's imports failed although another
/// member had made each) does not fail the application's import, whether
/// it is asked first or after the other made the object: the object is on
/// the member that took it, and the application finds it; the refusal --
/// an answer, not a fault -- takes no member out. The member that refused
/// is given the objects at the next recovery round once it takes them,
/// with no member's return (the long chaos run, every member serving at
/// its end, waited for such objects for good). With both refusing, the
/// import fails with the refusal.
#[test]
fn an_import_one_member_refuses_while_another_takes_it_succeeds() {
    let ha = Ha::new(2);
    let s = ha.session();
    let copies = |i: usize, label: &[u8]| {
        user_session(&ha.pkcs11, ha.member_slot(i))
            .find_objects(&[Attribute::Label(label.to_vec())])
            .expect("a search on the member alone")
            .len()
    };
    let mut labels = Vec::new();
    for n in 0..3 {
        ha.members[0].fail_call("C_CreateObject", CKR_GENERAL_ERROR);
        let label = format!("refused by member 0, {n}").into_bytes();
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(label.clone()),
            Attribute::Value(vec![7, 8, 9]),
        ])
        .unwrap_or_else(|e| panic!("C_CreateObject {n} while member 0 refuses: {e}"));
        ha.members[0].clear_fault();
        assert_eq!(copies(0, &label), 0, "member 0 refused {n}");
        assert_eq!(copies(1, &label), 1, "member 1 took {n}");
        assert_eq!(
            s.find_objects(&[Attribute::Label(label.clone())])
                .expect("a search on the virtual slot")
                .len(),
            1,
            "the application finds object {n}"
        );
        assert!(
            member_serves(0, 0) && member_serves(0, 1),
            "a refusal takes no member out"
        );
        labels.push(label);
    }
    let deadline = Instant::now() + PATIENCE;
    let kept_for_0 = || group_status(0).members[0].pendingChanges;
    while !(labels.iter().all(|l| copies(0, l) == 1) && kept_for_0() == 0) {
        assert!(
            Instant::now() < deadline,
            "member 0 given the objects it refused: {:?}, {} changes kept for it",
            labels.iter().map(|l| copies(0, l)).collect::<Vec<_>>(),
            kept_for_0()
        );
        thread::sleep(POLL);
    }
    assert!(
        member_serves(0, 0) && member_serves(0, 1),
        "both members served throughout"
    );
    for member in &ha.members {
        member.fail_call("C_CreateObject", CKR_GENERAL_ERROR);
    }
    expect_rv(
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"refused by both".to_vec()),
        ]),
        RvError::GeneralError,
        "C_CreateObject both members refuse",
    );
}

// ---------------------------------------------------------------------------
// Handles found before a failure
// ---------------------------------------------------------------------------

/// Key handles an application found (rather than created) before a member
/// failed keep working after it failed: keys made earlier are found through
/// the virtual slot on a fresh start -- the search runs on the primary --
/// and then the primary fails before the keys were ever used. A signature
/// with the found handles must come from another member.
#[test]
fn key_handles_found_before_the_primary_fails_keep_working() {
    let mut ha = Ha::new(3);
    {
        let s = ha.session();
        ec_pair(&s, "found", true, false);
    }
    ha.restart();
    let s = ha.session();
    let private = find_one(&s, ObjectClass::PRIVATE_KEY, "found");
    let public = find_one(&s, ObjectClass::PUBLIC_KEY, "found");
    ha.fault(0);
    let digest = [0x77; 32];
    let signature = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("sign with a handle found before the primary failed");
    s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
        .expect("verify with a handle found before the primary failed");
}

/// More keys than a search identifies as it returns them (16).
const MANY: usize = 40;

/// Makes [`MANY`] AES token keys with IDs `many-NN`, then restarts, so that
/// a search finds them rather than knowing them from their making.
fn many_found_keys(ha: &mut Ha) {
    {
        let s = ha.session();
        for i in 0..MANY {
            aes_key(&s, &format!("many-{i:02}"), true, false);
        }
    }
    ha.restart();
}

/// A keystore load: the application finds more keys than a search
/// identifies as it returns them and reads each one's label; then the
/// primary, which served the search and the reads, fails. Every key it read
/// still works, served by the other member, and still reads the same label
/// there.
#[test]
fn keys_read_after_a_large_search_keep_working_when_the_primary_fails() {
    let mut ha = Ha::new(2);
    many_found_keys(&mut ha);
    let s = ha.session();
    let keys = s
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert_eq!(keys.len(), MANY);
    let ids: Vec<Vec<u8>> = keys
        .iter()
        .map(
            |k| match s.get_attributes(*k, &[AttributeType::Id]).unwrap()[..] {
                [Attribute::Id(ref id)] => id.clone(),
                ref other => panic!("CKA_ID read as {other:?}"),
            },
        )
        .collect();
    let before = ha.counts("C_EncryptInit");
    ha.fault(0);
    for (key, id) in keys.iter().zip(&ids) {
        let id = String::from_utf8_lossy(id);
        let sealed = s
            .encrypt(&Mechanism::AesEcb, *key, &[0x5a; 16])
            .unwrap_or_else(|e| panic!("{id}: encrypt after the primary failed: {e}"));
        let opened = s
            .decrypt(&Mechanism::AesEcb, *key, &sealed)
            .unwrap_or_else(|e| panic!("{id}: decrypt after the primary failed: {e}"));
        assert_eq!(opened, [0x5a; 16], "{id}");
        match s.get_attributes(*key, &[AttributeType::Id]).unwrap()[..] {
            [Attribute::Id(ref again)] => assert_eq!(*again, id.as_bytes(), "{id}"),
            ref other => panic!("{id}: CKA_ID read as {other:?}"),
        }
    }
    let grown = grown(&before, &ha.counts("C_EncryptInit"));
    assert_eq!(grown[1], MANY as u64, "every key encrypted on member 1");
}

/// An attribute read that identifies a found object in the same member call
/// answers the application exactly as the member answers its own read:
/// every answer code, length and value, compared with the member's
/// pass-through slot, each on a key past those a search identifies as it
/// returns them.
#[test]
fn reads_that_identify_a_found_object_answer_as_the_member_does() {
    let mut ha = Ha::new(2);
    many_found_keys(&mut ha);
    let s = ha.session();
    let keys = s
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert_eq!(keys.len(), MANY);
    let alone = user_session(&ha.pkcs11, ha.member_slot(0));
    // What is asked, and the room per attribute (`None` asks the lengths).
    let reads: [(&[CK_ATTRIBUTE_TYPE], Option<usize>); 6] = [
        (&[CKA_LABEL, CKA_ID, CKA_CLASS], Some(64)),
        (&[CKA_ID], None),
        (&[CKA_ID], Some(1)),
        (&[CKA_ID, CKA_MODULUS], Some(64)),
        (&[CKA_ID, CKA_MODULUS], None),
        (&[CKA_ID, CKA_VALUE], Some(64)),
    ];
    for (n, (types, room)) in reads.iter().enumerate() {
        let key = keys[MANY - 1 - n];
        let through_group = raw_read(s.handle(), key.handle(), types, *room);
        let id = match s.get_attributes(key, &[AttributeType::Id]).unwrap()[..] {
            [Attribute::Id(ref id)] => id.clone(),
            ref other => panic!("CKA_ID read as {other:?}"),
        };
        let found = alone
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Id(id)])
            .unwrap();
        assert_eq!(found.len(), 1);
        let on_member = raw_read(alone.handle(), found[0].handle(), types, *room);
        assert_eq!(
            through_group, on_member,
            "read {n}: {types:?}, room {room:?}"
        );
    }
}

/// One raw `C_GetAttributeValue` of `types` into zeroed rooms of `room`
/// bytes each (or NULL, asking the lengths): the answer, and each
/// attribute's length and room afterwards.
fn raw_read(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
    room: Option<usize>,
) -> (CK_RV, Vec<(CK_ULONG, Vec<u8>)>) {
    let mut rooms: Vec<Vec<u8>> = types.iter().map(|_| vec![0; room.unwrap_or(0)]).collect();
    let mut template: Vec<CK_ATTRIBUTE> = types
        .iter()
        .zip(&mut rooms)
        .map(|(t, r)| CK_ATTRIBUTE {
            type_: *t,
            pValue: if room.is_some() {
                r.as_mut_ptr().cast()
            } else {
                ptr::null_mut()
            },
            ulValueLen: r.len() as CK_ULONG,
        })
        .collect();
    let rv = raw!(C_GetAttributeValue(
        session,
        object,
        template.as_mut_ptr(),
        template.len() as CK_ULONG
    ));
    let lengths = template.iter().map(|a| a.ulValueLen);
    (rv, lengths.zip(rooms).collect())
}

/// A search whose member dies moves to another member: it goes on where it
/// was, returning every object once.
#[test]
fn a_search_in_flight_moves_and_returns_each_object_once() {
    let ha = Ha::new(2);
    let s = ha.session();
    for i in 0..4u8 {
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label("moved-search".into()),
            Attribute::Value(vec![i]),
        ])
        .unwrap();
    }
    let mut search = s
        .iter_objects_with_cache_size(
            &[Attribute::Label("moved-search".into())],
            std::num::NonZeroUsize::new(1).unwrap(),
        )
        .unwrap();
    let first = search.next().unwrap().unwrap();
    // Searches run on the primary while it is up.
    ha.fault(0);
    let mut found: Vec<u64> = vec![first.handle()];
    for object in search {
        found.push(
            object
                .expect("the search goes on on the other member")
                .handle(),
        );
    }
    found.sort_unstable();
    found.dedup();
    assert_eq!(found.len(), 4, "every object once: {found:?}");
}

/// A returning member is rid of the member sessions it held when it was
/// taken out, but the application's own session on its pass-through slot
/// (the same token, the same library) stays open: recovery closes nothing
/// on a slot the process uses outside the group.
#[test]
fn recovery_leaves_the_applications_passthrough_session_open() {
    let ha = Ha::with(2, 0, "reconnAtt = -1\nAutoReconnectInterval = 1\n");
    let s = ha.session();
    let direct = ha
        .pkcs11
        .open_ro_session(ha.member_slot(1))
        .expect("a session on member 1's pass-through slot");
    ha.fault(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while member_serves(0, 1) {
        assert!(Instant::now() < deadline, "member 1 was never taken out");
        s.generate_random_vec(8)
            .expect("the virtual slot serves from member 0");
    }
    ha.members[1].clear_fault();
    while !member_serves(0, 1) {
        assert!(Instant::now() < deadline, "member 1 never came back");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        ha.counts("C_CloseAllSessions")[1],
        0,
        "recovery closed every session on member 1's slot"
    );
    let info = direct
        .get_session_info()
        .expect("the pass-through session outlived the member's recovery");
    assert_eq!(info.slot_id(), ha.member_slot(1));
}

/// A virtual session opens a member session on every member at
/// `C_OpenSession`; a member session no call was made on is kept by its
/// member for the next virtual session instead of being closed, and one
/// that served calls is closed with its virtual session.
#[test]
fn unused_member_sessions_are_kept_for_the_next_virtual_session() {
    // No reconciliation: its sessions would count too.
    let ha = Ha::with(2, 0, &format!("\n[HASynchronize]\n{GROUP_LABEL} = 0\n"));
    let _logged_in = ha.session();
    let opens = ha.counts("C_OpenSession");
    let closes = ha.counts("C_CloseSession");
    for _ in 0..10 {
        drop(
            ha.pkcs11
                .open_ro_session(virtual_slot())
                .expect("C_OpenSession"),
        );
    }
    let opened = grown(&opens, &ha.counts("C_OpenSession"));
    assert_eq!(
        opened,
        [1, 1],
        "ten unused virtual sessions, one member session on each member"
    );
    assert_eq!(
        grown(&closes, &ha.counts("C_CloseSession")),
        [0, 0],
        "the unused member session was kept"
    );

    let opens = ha.counts("C_OpenSession");
    let randoms = ha.counts("C_GenerateRandom");
    let session = ha
        .pkcs11
        .open_ro_session(virtual_slot())
        .expect("C_OpenSession");
    for _ in 0..10 {
        session.generate_random_vec(16).expect("C_GenerateRandom");
    }
    let served = grown(&randoms, &ha.counts("C_GenerateRandom"));
    let opened = grown(&opens, &ha.counts("C_OpenSession"));
    // Each member's kept session serves the new virtual session.
    assert_eq!(opened, [0, 0], "served {served:?}");
    let closes = ha.counts("C_CloseSession");
    drop(session);
    let closed = grown(&closes, &ha.counts("C_CloseSession"));
    let used: Vec<u64> = served.iter().map(|n| u64::from(*n > 0)).collect();
    assert_eq!(
        closed, used,
        "the member sessions that served calls are closed"
    );
}
