//! The simulated tokens: objects, sessions, logins and operations in
//! memory, and the faults the simulation driver plants on them. No raw
//! pointer reaches this module; `mod.rs` answers the member traits with it.
//!
//! The "cryptography" is just enough to check results: a signature is
//! SHA-256(key value || data), a digest is real SHA-256, encryption XORs
//! the data with a keystream of SHA-256(key value || block number), and a
//! wrapped key is its value under that keystream followed by an 8-byte tag.

use cryptoki_sys::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The Crypto Officer PIN of every simulated token.
pub const USER_PIN: &[u8] = b"1234";
/// Label and value of the domain key every token starts with.
pub const DOMAIN_LABEL: &[u8] = b"pkcs11-ha-domain";
pub const DOMAIN_VALUE: [u8; 32] = [0x42; 32];
/// Slot IDs start here, so that a slot number mistaken for a token index shows.
pub const FIRST_SLOT: CK_SLOT_ID = 10;

/// What the driver can do to a token (`Sim::set_fault`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// Every call fails with `CKR_DEVICE_ERROR` and the token leaves the
    /// slot list; healing restarts it: sessions, logins and session
    /// objects are gone and object handles renumbered, and a networked
    /// library has lost its connection.
    Crash,
    /// Every call reports that it ran past its deadline
    /// (`CKR_DEVICE_ERROR`) and the token leaves the slot list; healing
    /// resumes it with its sessions intact, but a networked library has
    /// lost its connection (pkcs11-ha's watchdog cut it).
    Hang,
    /// The next call fails with `CKR_DEVICE_ERROR` before it is carried
    /// out, and the library's connection is lost (see [`Sim::disconnected`]).
    Reset,
    /// The next call that makes or destroys an object is carried out, but
    /// its answer is lost: it returns `CKR_DEVICE_ERROR`.
    LoseAnswer,
    /// `C_WrapKey` and `C_UnwrapKey` fail with `CKR_MECHANISM_INVALID`.
    RefuseWrap,
    /// As [`Fault::RefuseWrap`], for good: healing does not end it (a
    /// library that cannot carry the mechanism it lists, as p11-kit 0.24's
    /// client, refuses it from the start).
    RefuseWrapAlways,
    /// Closing the token's last session renumbers its object handles, as
    /// SoftHSM does.
    RenumberOnLastClose,
    /// The next call that reaches the token takes long to answer, as an
    /// in-process library that hangs for a while: it is carried out, and
    /// then the caller stays inside the library while the driver lets
    /// time pass (`SimMember::on_stall`).
    Stall,
    /// As [`Fault::Stall`], met by the first read of the attributes of
    /// the object with this handle: a driver can act at a chosen point of
    /// an enumeration.
    StallOnReading(CK_OBJECT_HANDLE),
    /// As [`Fault::Stall`], met by the next call that makes or destroys
    /// an object, once it is carried out and before its answer returns: a
    /// driver can act while the object is on the token and the call that
    /// made it has yet to say so.
    StallAfterChange,
    /// As [`Fault::Stall`], met by the next `C_Login` on the token: a
    /// driver can hold a recovery once the member is catching up (its
    /// login is the first thing it is given).
    StallOnLogin,
    /// Each new connection numbers the token's objects afresh, from 1 and
    /// newest first, as a p11-kit server does per connection: a handle of
    /// the old connection names another object on the new one.
    RenumberOnReconnect,
    /// The connections of the library's spare instances are lost while the
    /// member's own is not: every call on a spare's session, and each
    /// spare session opened, fails with `CKR_DEVICE_ERROR` until the
    /// library connects again (or healing).
    SpareCrash,
    /// As [`Fault::Stall`], met by the next call on a spare's session (or
    /// the next spare session opened): a spare that hangs while the
    /// member's own connection answers.
    SpareStall,
    /// As [`Fault::LoseAnswer`], met by the next change made on a spare's
    /// session.
    SpareLoseAnswer,
    /// The next `C_CreateObject` of a token object is cut by a reset once
    /// its request reached the server: it fails with `CKR_DEVICE_ERROR`
    /// and the library's connection is lost, and the token makes the
    /// object only when the driver carries the request out
    /// ([`Sim::carry_out_late`]) -- as a `p11-kit server` worker that
    /// received a request carries it out after its connection closed.
    LateChange,
    /// As [`Fault::Stall`], met by the next `C_CloseSession` on the token
    /// (once the session is closed): a driver can act as a worker that is
    /// done with the member closes its session.
    StallOnClose,
    /// The next `C_CreateObject` on the token answers `CKR_GENERAL_ERROR`,
    /// having made the object (`true`: as SoftHSM can when setting a new
    /// key's `CKA_LOCAL` fails) or not (as when writing a new object's
    /// first attributes fails).
    TroubledCreate(bool),
    /// The next `C_CreateObject` on the token answers
    /// `CKR_TEMPLATE_INCONSISTENT` without making anything: a member whose
    /// library judges a template otherwise than the others do.
    RefuseCreate,
    /// The next `C_GetMechanismList` of the token fails with
    /// `CKR_DEVICE_ERROR`, and nothing else does: a networked library whose
    /// request timed out once while its connection stayed.
    FailListing,
    /// Every `C_Login` on the token answers `CKR_GENERAL_ERROR` before it
    /// looks at the PIN, and nothing else fails: a SoftHSM process whose
    /// view of its token file stays broken until another process writes
    /// the file. Healing leaves it (a restart of the token is not such a
    /// write); [`Sim::mend_login`] ends it.
    BrokenLogin,
    /// The token logs every instance out at once, its sessions left open:
    /// an HSM whose login expired, or a token logged out behind the group
    /// through a pass-through slot. Private objects and keys are out of
    /// reach until the member is logged in again.
    LoseLogin,
}

pub type Attributes = BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>;

pub struct Object {
    pub attributes: Attributes,
    /// The session a session object belongs to.
    pub session: Option<CK_SESSION_HANDLE>,
}

impl Object {
    /// Whether `attributes` sets a one-way attribute the object holds at
    /// its final value, which SoftHSM refuses in `C_SetAttributeValue` and
    /// `C_CopyObject`.
    fn at_final(&self, attributes: &Attributes) -> bool {
        attributes
            .keys()
            .any(|t| (ONE_WAY.iter()).any(|(one_way, last)| one_way == t && self.flag(*t) == *last))
    }

    pub fn flag(&self, attribute: CK_ATTRIBUTE_TYPE) -> bool {
        self.attributes
            .get(&attribute)
            .is_some_and(|v| v.first() == Some(&1))
    }

    fn value(&self) -> &[u8] {
        self.attributes.get(&CKA_VALUE).map_or(&[], Vec::as_slice)
    }
}

pub enum Operation {
    Digest(Vec<u8>),
    Sign { key: Vec<u8>, data: Vec<u8> },
    Verify { key: Vec<u8>, data: Vec<u8> },
    Encrypt { key: Vec<u8>, offset: usize },
    Decrypt { key: Vec<u8>, offset: usize },
}

pub struct Session {
    pub token: usize,
    pub read_write: bool,
    pub operation: Option<Operation>,
    pub find: Option<Vec<CK_OBJECT_HANDLE>>,
    /// The client instance that opened it: 0 for the library's own
    /// connection, `i + 1` for spare `i` ([`Sim::open_spare_session`]),
    /// which the spare faults meet. Each instance is an application of its
    /// own to the token, as each `p11-kit server` worker is: its own
    /// login, its own object handles, and `C_CloseAllSessions` on one
    /// leaves the others' sessions open.
    pub instance: usize,
    /// How the instance that opened it numbers the token's objects: 0 for
    /// the library's own connection (the token's handles), otherwise the
    /// key of [`spare_handle`].
    pub numbering: CK_OBJECT_HANDLE,
}

impl Session {
    /// Opened by a spare instance.
    pub fn spare(&self) -> bool {
        self.instance != 0
    }
}

/// The handle of the object numbered `id` on the token on a spare
/// instance numbering objects by `key`, and the number back: a spare
/// instance, a `p11-kit server` worker of its own, numbers the token's
/// objects its own way, so the same object has another handle there, and
/// a handle of one instance names another object, or none, on the other.
/// Handles stay near the token's own (which start at the number plus one),
/// so that a handle used on the wrong instance mostly names another object
/// rather than none. Drawn from the object's number, not the library's own
/// handle: the own connection numbering its objects anew leaves a spare's
/// handles as they were.
pub fn spare_handle(key: CK_OBJECT_HANDLE, id: u64) -> CK_OBJECT_HANDLE {
    (id as CK_OBJECT_HANDLE ^ key) + 1
}

#[derive(Default)]
pub struct Token {
    pub serial: String,
    /// Objects by a number of their own; handles map onto these.
    objects: BTreeMap<u64, Object>,
    handles: BTreeMap<CK_OBJECT_HANDLE, u64>,
    next_object: u64,
    next_handle: CK_OBJECT_HANDLE,
    /// The client instances logged in ([`Session::instance`]): each logs
    /// in on its own, and is logged out when its last session closes.
    pub logins: std::collections::BTreeSet<usize>,
    pub crashed: bool,
    pub hung: bool,
    pub reset_next: bool,
    pub lose_next_answer: bool,
    pub refuse_wrap: bool,
    pub refuse_wrap_always: bool,
    pub renumber_on_last_close: bool,
    pub stall_next: bool,
    pub stall_on_reading: Option<CK_OBJECT_HANDLE>,
    pub stall_after_change: bool,
    pub stall_on_login: bool,
    pub login_broken: bool,
    pub stall_on_close: bool,
    pub renumber_on_reconnect: bool,
    pub spare_crashed: bool,
    pub spare_stall_next: bool,
    pub spare_lose_next_answer: bool,
    pub late_change: bool,
    pub fail_next_listing: bool,
    pub troubled_create: Option<bool>,
    pub refuse_create: bool,
    /// Labels of objects the token refuses to hold, whichever call would
    /// make one (`CKR_TEMPLATE_INCONSISTENT`): a library that judges those
    /// templates otherwise than the others do, for good -- no heal or
    /// restart ends it ([`Sim::refuse_label`]).
    pub refused_labels: std::collections::BTreeSet<Vec<u8>>,
    /// Searches begun on it (`C_FindObjectsInit`): what a test counts to
    /// tell a recovery that looks the token up per object from one that
    /// reads its objects once.
    pub searches: usize,
    /// Objects made on it by `C_CreateObject`: what the simulation counts
    /// to see where an application's writes went.
    pub creates: usize,
    /// Logins it refused with its login broken ([`Fault::BrokenLogin`]):
    /// what the simulation counts to see that schedules meet them.
    pub refused_logins: usize,
}

/// The whole simulated library.
#[derive(Default)]
pub struct Sim {
    pub initialized: bool,
    /// The library stands for a client of a server (as p11-kit's is): a
    /// token restart loses its connection.
    networked: bool,
    /// The connection is lost: every call fails with `CKR_DEVICE_ERROR`
    /// until `C_Finalize` and `C_Initialize` reconnect, as with p11-kit.
    pub disconnected: bool,
    pub tokens: Vec<Token>,
    pub sessions: BTreeMap<CK_SESSION_HANDLE, Session>,
    next_session: CK_SESSION_HANDLE,
    /// Each spare's next session number: each numbers its own from 1, as
    /// an independent client instance does ([`super::instance`]).
    next_spare_session: BTreeMap<usize, CK_SESSION_HANDLE>,
    /// Seeds generated key values and random bytes.
    seed: u64,
    generated: u64,
    /// The token whose stall the call under way met ([`Fault::Stall`]).
    pub stalled: Option<usize>,
    /// Changes carried out on the library's own instance are reported
    /// ([`Sim::changed`]): the simulation runs application calls there, as
    /// its threads run beside a recovery making changes.
    pub report_changes: bool,
    /// The token the call under way changed, where changes are reported.
    pub changed: Option<usize>,
    /// The spare whose session the call under way is on, if any.
    pub on_spare: Option<usize>,
    /// How each spare numbers each token's objects, by (spare, token),
    /// while it holds a session there on its connection: drawn anew once
    /// its connection ended, or its last session there closed on a token
    /// that renumbers then ([`Sim::spare_numbering`]).
    spare_keys: BTreeMap<(usize, usize), CK_OBJECT_HANDLE>,
    /// Keys drawn so far.
    spare_draws: u64,
    /// Spares whose connection pkcs11-ha's watchdog cut under a stalled
    /// call ([`Sim::cut_spare`]), until they connect again.
    cut_spares: std::collections::BTreeSet<usize>,
    /// The sessions that went with those connections: a call on one
    /// fails as on a connection shut down.
    cut_sessions: std::collections::BTreeSet<CK_SESSION_HANDLE>,
    /// Requests [`Fault::LateChange`] cut off, by token: each makes its
    /// object when the driver carries it out ([`Sim::carry_out_late`]).
    late: Vec<(usize, Attributes)>,
}

pub type Result<T> = std::result::Result<T, CK_RV>;

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    hash.finalize().into()
}

/// The simulated signature: SHA-256(key value || data).
pub fn sign(key: &[u8], data: &[u8]) -> Vec<u8> {
    sha256(&[key, data]).to_vec()
}

/// The simulated public point of an EC private key's value. A `CKM_ECDSA`
/// signature is [`sign`] keyed with the point: the private key makes it
/// from its value, the public key checks it with its point, so that a
/// signature verifies only under its own pair's public key.
pub fn point_of(private_value: &[u8]) -> Vec<u8> {
    sha256(&[b"point", private_value]).to_vec()
}

/// A private key as `C_WrapKey` seals it: its curve and its value, as
/// PKCS#8 carries both (the curve's length in one byte first).
fn private_key_blob(object: &Object) -> Vec<u8> {
    let params = object
        .attributes
        .get(&CKA_EC_PARAMS)
        .map_or(&[][..], Vec::as_slice);
    let mut blob = vec![params.len() as u8];
    blob.extend_from_slice(params);
    blob.extend_from_slice(object.value());
    blob
}

/// [`private_key_blob`] read back: the curve and the value.
fn private_key_of_blob(blob: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (&len, rest) = blob.split_first()?;
    let len = usize::from(len);
    (rest.len() > len).then(|| (rest[..len].to_vec(), rest[len..].to_vec()))
}

/// XORs `data` in place with the keystream of `key` from byte `offset`.
/// Each 32 bytes of keystream are SHA-256(key value || block number),
/// computed once per block.
pub fn keystream_xor(key: &[u8], offset: usize, data: &mut [u8]) {
    let mut block = (u64::MAX, [0u8; 32]);
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset + i;
        let number = at as u64 / 32;
        if block.0 != number {
            block = (number, sha256(&[key, &number.to_le_bytes()]));
        }
        *byte ^= block.1[at % 32];
    }
}

fn wrap_tag(wrapping_key: &[u8], value: &[u8]) -> [u8; 8] {
    let tag = sha256(&[b"wrap", wrapping_key, value]);
    tag[..8].try_into().expect("8 of 32 bytes")
}

/// What `C_WrapKey` (`CKM_AES_KEY_WRAP_PAD`) gives for key material
/// `value` under a wrapping key of value `wrapping_key`: the material
/// under the wrapping key's keystream, then an 8-byte tag.
pub fn wrapped(wrapping_key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut blob = value.to_vec();
    keystream_xor(wrapping_key, 0, &mut blob);
    blob.extend_from_slice(&wrap_tag(wrapping_key, value));
    blob
}

fn check_value(value: &[u8]) -> Vec<u8> {
    sha256(&[value])[..3].to_vec()
}

/// Attributes changed one way only, to the value given (PKCS#11 3.1, the
/// private and secret key attribute tables, footnote 11), after which
/// SoftHSM refuses to set them at all, even to the value they hold.
const ONE_WAY: [(CK_ATTRIBUTE_TYPE, bool); 3] = [
    (CKA_SENSITIVE, true),
    (CKA_EXTRACTABLE, false),
    (CKA_WRAP_WITH_TRUSTED, true),
];

fn boolean(on: bool) -> Vec<u8> {
    vec![u8::from(on)]
}

fn ulong(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn ulong_of(bytes: &[u8]) -> Option<CK_ULONG> {
    Some(CK_ULONG::from_ne_bytes(bytes.try_into().ok()?))
}

impl Token {
    fn new(serial: String) -> Token {
        let mut token = Token {
            serial,
            next_handle: 1,
            ..Token::default()
        };
        let mut domain = Attributes::new();
        for (t, v) in [
            (CKA_CLASS, ulong(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, ulong(CKK_AES)),
            (CKA_TOKEN, boolean(true)),
            (CKA_PRIVATE, boolean(false)),
            (CKA_LABEL, DOMAIN_LABEL.to_vec()),
            (CKA_VALUE, DOMAIN_VALUE.to_vec()),
            (CKA_SENSITIVE, boolean(true)),
            (CKA_EXTRACTABLE, boolean(false)),
            (CKA_TRUSTED, boolean(true)),
            (CKA_WRAP, boolean(true)),
            (CKA_UNWRAP, boolean(true)),
        ] {
            domain.insert(t, v);
        }
        complete_secret_key(&mut domain, false);
        token.insert(Object {
            attributes: domain,
            session: None,
        });
        token
    }

    fn insert(&mut self, object: Object) -> CK_OBJECT_HANDLE {
        let id = self.next_object;
        self.next_object += 1;
        self.objects.insert(id, object);
        self.new_handle(id)
    }

    fn new_handle(&mut self, id: u64) -> CK_OBJECT_HANDLE {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(handle, id);
        handle
    }

    /// Every object gets a new handle; the old ones are invalid.
    pub fn renumber(&mut self) {
        self.handles.clear();
        let ids: Vec<u64> = self.objects.keys().copied().collect();
        for id in ids {
            self.new_handle(id);
        }
    }

    /// Handles from 1 again, newest object first, as a new connection to a
    /// p11-kit server hands them out.
    pub fn renumber_afresh(&mut self) {
        self.handles.clear();
        self.next_handle = 1;
        let ids: Vec<u64> = self.objects.keys().rev().copied().collect();
        for id in ids {
            self.new_handle(id);
        }
    }

    fn visible(object: &Object, logged_in: bool) -> bool {
        logged_in || !object.flag(CKA_PRIVATE)
    }

    /// The object of (own) handle `handle`, as an instance `logged_in` or
    /// not sees it.
    pub fn object(&self, handle: CK_OBJECT_HANDLE, logged_in: bool) -> Result<&Object> {
        let object = self
            .handles
            .get(&handle)
            .and_then(|id| self.objects.get(id))
            .ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        if Token::visible(object, logged_in) {
            Ok(object)
        } else {
            Err(CKR_OBJECT_HANDLE_INVALID)
        }
    }

    /// The library's own handle of the object numbered `id`.
    fn handle_of(&self, id: u64) -> Option<CK_OBJECT_HANDLE> {
        self.handles
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(handle, _)| *handle)
    }

    /// A secret key's value, for `usage`.
    fn key(
        &self,
        handle: CK_OBJECT_HANDLE,
        usage: CK_ATTRIBUTE_TYPE,
        logged_in: bool,
    ) -> Result<Vec<u8>> {
        let key = self.key_for(handle, usage, CKO_SECRET_KEY, logged_in)?;
        Ok(key.value().to_vec())
    }

    /// An EC key's material for `usage`: a private key's value (to sign),
    /// a public key's point (to verify).
    fn ec_key(
        &self,
        handle: CK_OBJECT_HANDLE,
        usage: CK_ATTRIBUTE_TYPE,
        logged_in: bool,
    ) -> Result<Vec<u8>> {
        let (class, material) = if usage == CKA_SIGN {
            (CKO_PRIVATE_KEY, CKA_VALUE)
        } else {
            (CKO_PUBLIC_KEY, CKA_EC_POINT)
        };
        let key = self.key_for(handle, usage, class, logged_in)?;
        Ok(key.attributes.get(&material).cloned().unwrap_or_default())
    }

    /// The key `handle` names, if it is of `class` and allows `usage`.
    fn key_for(
        &self,
        handle: CK_OBJECT_HANDLE,
        usage: CK_ATTRIBUTE_TYPE,
        class: CK_OBJECT_CLASS,
        logged_in: bool,
    ) -> Result<&Object> {
        let key = self
            .object(handle, logged_in)
            .map_err(|_| CKR_KEY_HANDLE_INVALID)?;
        if key.attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v)) != Some(class) {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        if !key.flag(usage) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        Ok(key)
    }

    fn destroy_session_objects(&mut self, session: CK_SESSION_HANDLE) {
        self.objects.retain(|_, o| o.session != Some(session));
        let objects = &self.objects;
        self.handles.retain(|_, id| objects.contains_key(id));
    }

    /// The handles of the token objects on the current connection, for a
    /// driver to plant [`Fault::StallOnReading`] on one.
    pub fn token_object_handles(&self) -> Vec<CK_OBJECT_HANDLE> {
        self.handles
            .iter()
            .filter(|(_, id)| self.objects.get(id).is_some_and(|o| o.session.is_none()))
            .map(|(handle, _)| *handle)
            .collect()
    }

    /// Token objects, for the driver to compare: (handle-independent) attributes.
    pub fn token_objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().filter(|o| o.session.is_none())
    }

    fn down(&self) -> bool {
        self.crashed || self.hung
    }
}

/// Fills in what a token sets on a secret key it makes.
fn complete_secret_key(attributes: &mut Attributes, local: bool) {
    let value = attributes.get(&CKA_VALUE).cloned().unwrap_or_default();
    let defaults = [
        (CKA_TOKEN, boolean(false)),
        (CKA_PRIVATE, boolean(true)),
        (CKA_MODIFIABLE, boolean(true)),
        (CKA_LABEL, Vec::new()),
        (CKA_ID, Vec::new()),
        (CKA_SENSITIVE, boolean(false)),
        (CKA_EXTRACTABLE, boolean(true)),
        (CKA_ENCRYPT, boolean(false)),
        (CKA_DECRYPT, boolean(false)),
        (CKA_SIGN, boolean(false)),
        (CKA_VERIFY, boolean(false)),
        (CKA_WRAP, boolean(false)),
        (CKA_UNWRAP, boolean(false)),
        (CKA_DERIVE, boolean(false)),
        (CKA_WRAP_WITH_TRUSTED, boolean(false)),
        (CKA_TRUSTED, boolean(false)),
    ];
    with_defaults(attributes, defaults);
    mark_origin(attributes, local);
    attributes.insert(CKA_VALUE_LEN, ulong(value.len() as CK_ULONG));
    attributes.insert(CKA_CHECK_VALUE, check_value(&value));
}

/// Sets each of `defaults` the template left out.
fn with_defaults<const N: usize>(
    attributes: &mut Attributes,
    defaults: [(CK_ATTRIBUTE_TYPE, Vec<u8>); N],
) {
    for (t, v) in defaults {
        attributes.entry(t).or_insert(v);
    }
}

/// Sets what a token records of a secret or private key's origin: made
/// there (`local`), and if so, whether always sensitive and never
/// extractable.
fn mark_origin(attributes: &mut Attributes, local: bool) {
    let sensitive = attributes[&CKA_SENSITIVE] == [1];
    let extractable = attributes[&CKA_EXTRACTABLE] == [1];
    attributes.insert(CKA_LOCAL, boolean(local));
    attributes.insert(CKA_ALWAYS_SENSITIVE, boolean(local && sensitive));
    attributes.insert(CKA_NEVER_EXTRACTABLE, boolean(local && !extractable));
}

/// Fills in what a token sets on an EC public key.
fn complete_public_key(attributes: &mut Attributes, local: bool) {
    let defaults = [
        (CKA_TOKEN, boolean(false)),
        (CKA_PRIVATE, boolean(false)),
        (CKA_MODIFIABLE, boolean(true)),
        (CKA_LABEL, Vec::new()),
        (CKA_ID, Vec::new()),
        (CKA_ENCRYPT, boolean(false)),
        (CKA_VERIFY, boolean(false)),
        (CKA_WRAP, boolean(false)),
        (CKA_DERIVE, boolean(false)),
        (CKA_TRUSTED, boolean(false)),
    ];
    with_defaults(attributes, defaults);
    attributes.insert(CKA_LOCAL, boolean(local));
}

/// Fills in what a token sets on an EC private key.
fn complete_private_key(attributes: &mut Attributes, local: bool) {
    let defaults = [
        (CKA_TOKEN, boolean(false)),
        (CKA_PRIVATE, boolean(true)),
        (CKA_MODIFIABLE, boolean(true)),
        (CKA_LABEL, Vec::new()),
        (CKA_ID, Vec::new()),
        (CKA_SENSITIVE, boolean(false)),
        (CKA_EXTRACTABLE, boolean(true)),
        (CKA_DECRYPT, boolean(false)),
        (CKA_SIGN, boolean(false)),
        (CKA_UNWRAP, boolean(false)),
        (CKA_DERIVE, boolean(false)),
        (CKA_WRAP_WITH_TRUSTED, boolean(false)),
        (CKA_ALWAYS_AUTHENTICATE, boolean(false)),
    ];
    with_defaults(attributes, defaults);
    mark_origin(attributes, local);
}

fn complete_data_object(attributes: &mut Attributes) {
    let defaults = [
        (CKA_TOKEN, boolean(false)),
        (CKA_PRIVATE, boolean(false)),
        (CKA_MODIFIABLE, boolean(true)),
        (CKA_LABEL, Vec::new()),
        (CKA_APPLICATION, Vec::new()),
        (CKA_VALUE, Vec::new()),
    ];
    with_defaults(attributes, defaults);
}

/// Whether an EC key's template has its type, curve and `material` (its
/// point or its value), as `C_CreateObject` needs.
fn ec_key_complete(attributes: &Attributes, material: CK_ATTRIBUTE_TYPE) -> Result<()> {
    if attributes.get(&CKA_KEY_TYPE).and_then(|v| ulong_of(v)) != Some(CKK_EC) {
        return Err(CKR_TEMPLATE_INCONSISTENT);
    }
    if !attributes.contains_key(&CKA_EC_PARAMS) || !attributes.contains_key(&material) {
        return Err(CKR_TEMPLATE_INCOMPLETE);
    }
    Ok(())
}

/// Mechanisms the tokens list, with their flags.
pub const MECHANISMS: [(CK_MECHANISM_TYPE, CK_FLAGS); 8] = [
    (CKM_SHA256, CKF_DIGEST),
    (CKM_SHA256_HMAC, CKF_SIGN | CKF_VERIFY),
    (CKM_AES_ECB, CKF_ENCRYPT | CKF_DECRYPT),
    (CKM_AES_KEY_GEN, CKF_GENERATE),
    (CKM_AES_KEY_WRAP_PAD, CKF_WRAP | CKF_UNWRAP),
    (CKM_SHA256_KEY_DERIVATION, CKF_DERIVE),
    (CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR),
    (CKM_ECDSA, CKF_SIGN | CKF_VERIFY),
];

/// The length a template asks of a new AES key (`CKA_VALUE_LEN`, else
/// `default` where the mechanism has one), which must not carry its value.
fn aes_key_length(attributes: &Attributes, default: Option<usize>) -> Result<usize> {
    let len = match attributes.get(&CKA_VALUE_LEN) {
        Some(v) => ulong_of(v).ok_or(CKR_ATTRIBUTE_VALUE_INVALID)? as usize,
        None => default.ok_or(CKR_TEMPLATE_INCOMPLETE)?,
    };
    if ![16, 24, 32].contains(&len) {
        return Err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    if attributes.contains_key(&CKA_VALUE) {
        return Err(CKR_TEMPLATE_INCONSISTENT);
    }
    Ok(len)
}

/// The value `CKM_SHA256_KEY_DERIVATION` derives from a base key's value
/// (PKCS#11 2.40, 2.15.8: the digest of the base key's value, its first
/// `len` bytes).
pub fn derived_value(base: &[u8], len: usize) -> Vec<u8> {
    sha256(&[base])[..len].to_vec()
}

impl Sim {
    /// Starts over with `tokens` fresh tokens, each holding the domain key.
    /// Tokens are numbered from `first` in their serials.
    pub fn reset(&mut self, tokens: usize, first: usize, networked: bool, seed: u64) {
        *self = Sim {
            initialized: self.initialized,
            networked,
            tokens: (first..first + tokens)
                .map(|i| Token::new(format!("51500000000000{i:02}")))
                .collect(),
            next_session: 1,
            seed,
            ..Sim::default()
        };
    }

    /// Whether the library stands for a client of a server.
    pub fn networked(&self) -> bool {
        self.networked
    }

    fn generate(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            self.generated += 1;
            let block = sha256(&[&self.seed.to_le_bytes(), &self.generated.to_le_bytes()]);
            out.extend_from_slice(&block);
        }
        out.truncate(len);
        out
    }

    pub fn token_index(&self, slot: CK_SLOT_ID) -> Result<usize> {
        let index = slot
            .checked_sub(FIRST_SLOT)
            .map(|i| i as usize)
            .filter(|i| *i < self.tokens.len())
            .ok_or(CKR_SLOT_ID_INVALID)?;
        Ok(index)
    }

    /// The gate of every call on a token: its faults, in order.
    pub fn enter(&mut self, token: usize) -> Result<()> {
        self.on_spare = None;
        if self.disconnected || self.tokens[token].down() {
            return Err(CKR_DEVICE_ERROR);
        }
        if std::mem::take(&mut self.tokens[token].stall_next) {
            self.stalled = Some(token);
        }
        if std::mem::take(&mut self.tokens[token].reset_next) {
            self.disconnect();
            return Err(CKR_DEVICE_ERROR);
        }
        Ok(())
    }

    /// A new connection: tokens that number their objects per connection
    /// do so afresh ([`Fault::RenumberOnReconnect`]).
    pub fn connect(&mut self) {
        self.disconnected = false;
        self.cut_spares.clear();
        for token in &mut self.tokens {
            token.spare_crashed = false;
            if token.renumber_on_reconnect {
                token.renumber_afresh();
            }
        }
    }

    /// How spare `spare` numbers the objects of token `token`: a key of
    /// [`spare_handle`] drawn from the seed, never 0, the same while it
    /// holds a session there on one connection (see [`Sim::spare_keys`]).
    fn spare_numbering(&mut self, spare: usize, token: usize) -> CK_OBJECT_HANDLE {
        if let Some(key) = self.spare_keys.get(&(spare, token)) {
            return *key;
        }
        self.spare_draws += 1;
        let drawn = sha256(&[
            b"numbering",
            &self.seed.to_le_bytes(),
            &(spare as u64).to_le_bytes(),
            &(token as u64).to_le_bytes(),
            &self.spare_draws.to_le_bytes(),
        ]);
        let key = 1 + CK_OBJECT_HANDLE::from(drawn[0] % 31);
        self.spare_keys.insert((spare, token), key);
        key
    }

    /// The library's own handle of what session `session`'s instance
    /// names `handle` (see [`spare_handle`]): unchanged for a session of
    /// the library's own connection, or none; `CK_INVALID_HANDLE` for a
    /// spare's handle that names no object.
    fn own_handle(&self, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> CK_OBJECT_HANDLE {
        match self.sessions.get(&session) {
            Some(s) if s.numbering != 0 && handle != CK_INVALID_HANDLE => {
                let id = (handle - 1) ^ s.numbering;
                self.tokens[s.token]
                    .handle_of(id)
                    .unwrap_or(CK_INVALID_HANDLE)
            }
            _ => handle,
        }
    }

    /// The library's own handle `handle` as session `session`'s instance
    /// names the object: the reverse of [`Sim::own_handle`].
    fn instance_handle(
        &self,
        session: CK_SESSION_HANDLE,
        handle: CK_OBJECT_HANDLE,
    ) -> CK_OBJECT_HANDLE {
        match self.sessions.get(&session) {
            Some(s) if s.numbering != 0 => self.tokens[s.token]
                .handles
                .get(&handle)
                .map_or(CK_INVALID_HANDLE, |id| spare_handle(s.numbering, *id)),
            _ => handle,
        }
    }

    /// Whether session `session`'s instance is logged in to its token.
    fn logged_in(&self, session: CK_SESSION_HANDLE) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| self.tokens[s.token].logins.contains(&s.instance))
    }

    /// The watchdog shut spare `spare`'s connection down under a stalled
    /// call: its `p11-kit server` worker ends, and its sessions with it;
    /// calls on them, and sessions it opens, fail with `CKR_DEVICE_ERROR`
    /// until it connects again ([`Sim::reconnect_spare`]).
    pub fn cut_spare(&mut self, spare: usize) {
        self.cut_spares.insert(spare);
        let gone: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.instance == spare + 1)
            .map(|(h, _)| *h)
            .collect();
        for handle in gone {
            self.cut_sessions.insert(handle);
            self.end_session(handle);
        }
        self.spare_keys.retain(|(s, _), _| *s != spare);
    }

    /// Spare `spare` connects again after a cut.
    pub fn reconnect_spare(&mut self, spare: usize) {
        self.cut_spares.remove(&spare);
    }

    /// The spares connect again ([`Fault::SpareCrash`] ends).
    pub fn reconnect_spares(&mut self) {
        for token in 0..self.tokens.len() {
            self.end_spare_connection(token);
        }
    }

    /// A lost spare connection is replaced: the sessions it held on
    /// `token` went with it.
    fn end_spare_connection(&mut self, token: usize) {
        if !std::mem::take(&mut self.tokens[token].spare_crashed) {
            return;
        }
        let gone: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.token == token && s.spare())
            .map(|(h, _)| *h)
            .collect();
        for handle in gone {
            self.end_session(handle);
        }
        self.spare_keys.retain(|(_, t), _| *t != token);
    }

    /// The connection is lost: every session and login with it.
    pub fn disconnect(&mut self) {
        for token in 0..self.tokens.len() {
            self.drop_sessions(token);
        }
        self.disconnected = true;
    }

    /// The gate of a call on a session: the token's faults, then the session.
    pub fn enter_session(&mut self, session: CK_SESSION_HANDLE) -> Result<usize> {
        if self.cut_sessions.contains(&session) {
            return Err(CKR_DEVICE_ERROR);
        }
        let (token, instance) = self
            .sessions
            .get(&session)
            .map(|s| (s.token, s.instance))
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        self.enter(token)?;
        if let Some(spare) = instance.checked_sub(1) {
            self.enter_spare(token, spare)?;
        }
        self.sessions
            .get(&session)
            .map(|s| s.token)
            .ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    /// The spare faults, for a call on a spare's session, after the
    /// token's own.
    fn enter_spare(&mut self, token: usize, spare: usize) -> Result<()> {
        self.on_spare = Some(spare);
        if self.tokens[token].spare_crashed || self.cut_spares.contains(&spare) {
            return Err(CKR_DEVICE_ERROR);
        }
        if std::mem::take(&mut self.tokens[token].spare_stall_next) {
            self.stalled = Some(token);
        }
        Ok(())
    }

    /// Answers `rv` for a call that changed the token, unless its answer
    /// is to be lost.
    fn answer(&mut self, token: usize, rv: CK_RV) -> Result<()> {
        if std::mem::take(&mut self.tokens[token].stall_after_change) {
            self.stalled = Some(token);
        }
        if self.report_changes && self.on_spare.is_none() {
            self.changed = Some(token);
        }
        if rv == CKR_OK && std::mem::take(&mut self.tokens[token].lose_next_answer) {
            return Err(CKR_DEVICE_ERROR);
        }
        if rv == CKR_OK
            && self.on_spare.is_some()
            && std::mem::take(&mut self.tokens[token].spare_lose_next_answer)
        {
            return Err(CKR_DEVICE_ERROR);
        }
        if rv == CKR_OK {
            Ok(())
        } else {
            Err(rv)
        }
    }

    pub fn session(&mut self, session: CK_SESSION_HANDLE) -> &mut Session {
        self.sessions.get_mut(&session).expect("entered session")
    }

    /// Ends every session on `token`, of every instance, as a lost
    /// connection or a restart does.
    pub fn drop_sessions(&mut self, token: usize) {
        let gone: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.token == token)
            .map(|(h, _)| *h)
            .collect();
        for handle in gone {
            self.end_session(handle);
        }
        self.tokens[token].logins.clear();
        self.spare_keys.retain(|(_, t), _| *t != token);
    }

    /// Ends a session. Its instance's last on the token logs that instance
    /// out, and on a token that renumbers then, has it number the token's
    /// objects anew: the library's own connection the token's handles, a
    /// spare by a key drawn anew.
    fn end_session(&mut self, handle: CK_SESSION_HANDLE) {
        let Some(session) = self.sessions.remove(&handle) else {
            return;
        };
        let (token, instance) = (session.token, session.instance);
        self.tokens[token].destroy_session_objects(handle);
        if !self
            .sessions
            .values()
            .any(|s| s.token == token && s.instance == instance)
        {
            self.tokens[token].logins.remove(&instance);
            if self.tokens[token].renumber_on_last_close {
                match instance.checked_sub(1) {
                    None => self.tokens[token].renumber(),
                    Some(spare) => {
                        self.spare_keys.remove(&(spare, token));
                    }
                }
            }
        }
    }

    pub fn set_fault(&mut self, token: usize, fault: Fault) {
        let t = &mut self.tokens[token];
        match fault {
            Fault::Crash => t.crashed = true,
            Fault::Hang => t.hung = true,
            Fault::Reset => t.reset_next = true,
            Fault::LoseAnswer => t.lose_next_answer = true,
            Fault::RefuseWrap => t.refuse_wrap = true,
            Fault::RefuseWrapAlways => t.refuse_wrap_always = true,
            Fault::RenumberOnLastClose => t.renumber_on_last_close = true,
            Fault::Stall => t.stall_next = true,
            Fault::StallOnReading(handle) => t.stall_on_reading = Some(handle),
            Fault::StallAfterChange => t.stall_after_change = true,
            Fault::StallOnLogin => t.stall_on_login = true,
            Fault::BrokenLogin => t.login_broken = true,
            Fault::LoseLogin => t.logins.clear(),
            Fault::StallOnClose => t.stall_on_close = true,
            Fault::RenumberOnReconnect => t.renumber_on_reconnect = true,
            Fault::SpareCrash => t.spare_crashed = true,
            Fault::SpareStall => t.spare_stall_next = true,
            Fault::SpareLoseAnswer => t.spare_lose_next_answer = true,
            Fault::LateChange => t.late_change = true,
            Fault::FailListing => t.fail_next_listing = true,
            Fault::TroubledCreate(made) => t.troubled_create = Some(made),
            Fault::RefuseCreate => t.refuse_create = true,
        }
    }

    /// Has `token` refuse, from now on, every object labelled `label`
    /// ([`Token::refused_labels`]).
    pub fn refuse_label(&mut self, token: usize, label: &[u8]) {
        self.tokens[token].refused_labels.insert(label.to_vec());
    }

    /// Ends [`Fault::BrokenLogin`] on `token`: another process wrote its
    /// token file.
    pub fn mend_login(&mut self, token: usize) {
        self.tokens[token].login_broken = false;
    }

    /// Ends every fault on `token` but a broken login
    /// ([`Fault::BrokenLogin`]); a crashed token restarts.
    pub fn heal(&mut self, token: usize) {
        if self.tokens[token].crashed {
            self.drop_sessions(token);
            self.tokens[token].renumber();
            if self.networked {
                self.disconnect();
            }
        }
        if self.tokens[token].hung && self.networked {
            // The deadline passed: pkcs11-ha's watchdog cut the connection.
            self.disconnect();
        }
        self.end_spare_connection(token);
        let t = &mut self.tokens[token];
        t.crashed = false;
        t.hung = false;
        t.reset_next = false;
        t.lose_next_answer = false;
        t.refuse_wrap = false;
        t.stall_next = false;
        t.stall_on_reading = None;
        t.stall_after_change = false;
        t.stall_on_login = false;
        t.stall_on_close = false;
        t.spare_crashed = false;
        t.spare_stall_next = false;
        t.spare_lose_next_answer = false;
        t.late_change = false;
        t.fail_next_listing = false;
        t.troubled_create = None;
        t.refuse_create = false;
    }

    /// Tokens that are present: not crashed or hung.
    pub fn present_tokens(&self) -> Result<Vec<CK_SLOT_ID>> {
        if self.disconnected {
            return Err(CKR_DEVICE_ERROR);
        }
        Ok((0..self.tokens.len())
            .filter(|i| !self.tokens[*i].down())
            .map(|i| FIRST_SLOT + i as CK_SLOT_ID)
            .collect())
    }

    pub fn open_session(&mut self, token: usize, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        self.enter(token)?;
        self.new_session(token, flags)
    }

    fn new_session(&mut self, token: usize, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let handle = self.next_session;
        self.next_session += 1;
        self.add_session(token, flags, handle);
        Ok(handle)
    }

    fn add_session(&mut self, token: usize, flags: CK_FLAGS, handle: CK_SESSION_HANDLE) {
        self.sessions.insert(
            handle,
            Session {
                token,
                read_write: flags & CKF_RW_SESSION != 0,
                operation: None,
                find: None,
                instance: 0,
                numbering: 0,
            },
        );
    }

    /// [`Sim::open_session`] for spare instance `spare`, which the spare
    /// faults meet, numbering objects its own way (see [`spare_handle`]).
    pub fn open_spare_session(
        &mut self,
        token: usize,
        flags: CK_FLAGS,
        spare: usize,
    ) -> Result<CK_SESSION_HANDLE> {
        self.enter(token)?;
        self.enter_spare(token, spare)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let next = self.next_spare_session.entry(spare).or_insert(1);
        let handle = super::instance::spare_session(spare, *next);
        *next += 1;
        self.add_session(token, flags, handle);
        let numbering = self.spare_numbering(spare, token);
        let session = self.session(handle);
        session.instance = spare + 1;
        session.numbering = numbering;
        Ok(handle)
    }

    pub fn close_session(&mut self, session: CK_SESSION_HANDLE) -> Result<()> {
        let token = self.enter_session(session)?;
        if std::mem::take(&mut self.tokens[token].stall_on_close) {
            self.stalled = Some(token);
        }
        self.end_session(session);
        Ok(())
    }

    /// Spare `spare`'s sessions on `token` end; the member's own and
    /// other spares' stay open.
    pub fn close_spare_sessions(&mut self, token: usize, spare: usize) -> Result<()> {
        self.enter(token)?;
        self.enter_spare(token, spare)?;
        let own: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.token == token && s.instance == spare + 1)
            .map(|(h, _)| *h)
            .collect();
        for handle in own {
            self.end_session(handle);
        }
        Ok(())
    }

    /// The library's own sessions on `token` end; the spares' stay open,
    /// as another `p11-kit server` worker's sessions do.
    pub fn close_all_sessions(&mut self, token: usize) -> Result<()> {
        self.enter(token)?;
        let own: Vec<CK_SESSION_HANDLE> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.token == token && !s.spare())
            .map(|(h, _)| *h)
            .collect();
        for handle in own {
            self.end_session(handle);
        }
        Ok(())
    }

    pub fn session_state(&mut self, session: CK_SESSION_HANDLE) -> Result<(usize, bool, bool)> {
        let token = self.enter_session(session)?;
        let rw = self.session(session).read_write;
        Ok((token, rw, self.logged_in(session)))
    }

    pub fn login(
        &mut self,
        session: CK_SESSION_HANDLE,
        user: CK_USER_TYPE,
        pin: &[u8],
    ) -> Result<()> {
        let token = self.enter_session(session)?;
        if std::mem::take(&mut self.tokens[token].stall_on_login) {
            self.stalled = Some(token);
        }
        if self.tokens[token].login_broken {
            self.tokens[token].refused_logins += 1;
            return Err(CKR_GENERAL_ERROR);
        }
        if user != CKU_USER {
            return Err(CKR_USER_TYPE_INVALID);
        }
        if self.logged_in(session) {
            return Err(CKR_USER_ALREADY_LOGGED_IN);
        }
        if pin != USER_PIN {
            return Err(CKR_PIN_INCORRECT);
        }
        let instance = self.session(session).instance;
        self.tokens[token].logins.insert(instance);
        Ok(())
    }

    pub fn logout(&mut self, session: CK_SESSION_HANDLE) -> Result<()> {
        let token = self.enter_session(session)?;
        let instance = self.session(session).instance;
        if !self.tokens[token].logins.remove(&instance) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        Ok(())
    }

    fn check_writable(
        &mut self,
        session: CK_SESSION_HANDLE,
        attributes: &Attributes,
    ) -> Result<usize> {
        let token = self.enter_session(session)?;
        self.may_make(session, attributes)?;
        Ok(token)
    }

    /// Whether the session may make an object of `attributes`.
    fn may_make(&mut self, session: CK_SESSION_HANDLE, attributes: &Attributes) -> Result<()> {
        let on_token = attributes.get(&CKA_TOKEN).is_some_and(|v| v == &[1]);
        if on_token && !self.session(session).read_write {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let private = attributes.get(&CKA_PRIVATE).is_none_or(|v| v == &[1]);
        let class = attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v));
        if private && class != Some(CKO_DATA) && !self.logged_in(session) {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        if attributes.get(&CKA_TRUSTED).is_some_and(|v| v == &[1]) {
            return Err(CKR_ATTRIBUTE_READ_ONLY);
        }
        Ok(())
    }

    fn store(
        &mut self,
        token: usize,
        session: CK_SESSION_HANDLE,
        attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        let label = attributes.get(&CKA_LABEL);
        if label.is_some_and(|l| self.tokens[token].refused_labels.contains(l)) {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        let on_token = attributes.get(&CKA_TOKEN).is_some_and(|v| v == &[1]);
        let handle = self.tokens[token].insert(Object {
            attributes,
            session: (!on_token).then_some(session),
        });
        Ok(self.instance_handle(session, handle))
    }

    /// `C_CopyObject`: a new object holding the source's attributes with
    /// `attributes` over them, on the token or in the session as the
    /// result's `CKA_TOKEN` says; the class, key type and value stay the
    /// source's.
    pub fn copy_object(
        &mut self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        const KEPT: [CK_ATTRIBUTE_TYPE; 3] = [CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE];
        if attributes.keys().any(|t| KEPT.contains(t)) {
            return Err(CKR_ATTRIBUTE_READ_ONLY);
        }
        let token = self.enter_session(session)?;
        let source = self.own_handle(session, source);
        let logged_in = self.logged_in(session);
        let original = self.tokens[token].object(source, logged_in)?;
        if original.at_final(&attributes) {
            return Err(CKR_ATTRIBUTE_READ_ONLY);
        }
        let mut copied = original.attributes.clone();
        copied.extend(attributes);
        let token = self.check_writable(session, &copied)?;
        let handle = self.store(token, session, copied)?;
        self.answer(token, CKR_OK)?;
        Ok(handle)
    }

    pub fn create_object(
        &mut self,
        session: CK_SESSION_HANDLE,
        mut attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        let token = self.check_writable(session, &attributes)?;
        match attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v)) {
            Some(CKO_DATA) => complete_data_object(&mut attributes),
            Some(CKO_SECRET_KEY) => {
                let Some(value) = attributes.get(&CKA_VALUE) else {
                    return Err(CKR_TEMPLATE_INCOMPLETE);
                };
                if value.is_empty() {
                    return Err(CKR_ATTRIBUTE_VALUE_INVALID);
                }
                complete_secret_key(&mut attributes, false);
            }
            Some(CKO_PUBLIC_KEY) => {
                ec_key_complete(&attributes, CKA_EC_POINT)?;
                complete_public_key(&mut attributes, false);
            }
            Some(CKO_PRIVATE_KEY) => {
                ec_key_complete(&attributes, CKA_VALUE)?;
                complete_private_key(&mut attributes, false);
            }
            Some(_) => return Err(CKR_ATTRIBUTE_VALUE_INVALID),
            None => return Err(CKR_TEMPLATE_INCOMPLETE),
        }
        let on_token = attributes.get(&CKA_TOKEN).is_some_and(|v| v == &[1]);
        if on_token && std::mem::take(&mut self.tokens[token].late_change) {
            self.late.push((token, attributes));
            self.disconnect();
            return Err(CKR_DEVICE_ERROR);
        }
        if std::mem::take(&mut self.tokens[token].refuse_create) {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        let troubled = self.tokens[token].troubled_create.take();
        if troubled == Some(false) {
            return Err(CKR_GENERAL_ERROR);
        }
        let handle = self.store(token, session, attributes)?;
        self.tokens[token].creates += 1;
        if troubled == Some(true) {
            return Err(CKR_GENERAL_ERROR);
        }
        self.answer(token, CKR_OK)?;
        Ok(handle)
    }

    /// Drops the requests [`Fault::LateChange`] cut off: never carried
    /// out. How many were.
    pub fn forget_late(&mut self) -> usize {
        std::mem::take(&mut self.late).len()
    }

    /// Carries out the requests [`Fault::LateChange`] cut off: each
    /// object is made on its token now. How many were.
    pub fn carry_out_late(&mut self) -> usize {
        let late = std::mem::take(&mut self.late);
        for (token, attributes) in &late {
            let label = attributes.get(&CKA_LABEL);
            if label.is_some_and(|l| self.tokens[*token].refused_labels.contains(l)) {
                continue;
            }
            self.tokens[*token].insert(Object {
                attributes: attributes.clone(),
                session: None,
            });
            self.tokens[*token].creates += 1;
        }
        late.len()
    }

    pub fn generate_key(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        if mechanism != CKM_AES_KEY_GEN {
            return Err(CKR_MECHANISM_INVALID);
        }
        let token = self.check_writable(session, &attributes)?;
        let len = aes_key_length(&attributes, None)?;
        let value = self.generate(len);
        self.store_aes_key(token, session, attributes, value, true)
    }

    /// `C_GenerateKeyPair` with `CKM_EC_KEY_PAIR_GEN`: a private key of a
    /// random value and its public key, of [`point_of`] that value, on the
    /// curve the public template names. Both or neither are made.
    pub fn generate_key_pair(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        mut public: Attributes,
        mut private: Attributes,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        if mechanism != CKM_EC_KEY_PAIR_GEN {
            return Err(CKR_MECHANISM_INVALID);
        }
        let token = self.check_writable(session, &public)?;
        self.may_make(session, &private)?;
        let params = public
            .get(&CKA_EC_PARAMS)
            .cloned()
            .ok_or(CKR_TEMPLATE_INCOMPLETE)?;
        let refused = &self.tokens[token].refused_labels;
        if [&public, &private]
            .iter()
            .any(|a| a.get(&CKA_LABEL).is_some_and(|l| refused.contains(l)))
        {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        let value = self.generate(32);
        for (attributes, class) in [
            (&mut public, CKO_PUBLIC_KEY),
            (&mut private, CKO_PRIVATE_KEY),
        ] {
            attributes.insert(CKA_CLASS, ulong(class));
            attributes.insert(CKA_KEY_TYPE, ulong(CKK_EC));
            attributes.insert(CKA_EC_PARAMS, params.clone());
        }
        public.insert(CKA_EC_POINT, point_of(&value));
        private.insert(CKA_VALUE, value);
        complete_public_key(&mut public, true);
        complete_private_key(&mut private, true);
        let public = self.store(token, session, public)?;
        let private = self.store(token, session, private)?;
        self.answer(token, CKR_OK)?;
        Ok((public, private))
    }

    /// Stores a new AES key of `value` from `attributes` (its class, type
    /// and value set here); `local` where the token made the value itself.
    fn store_aes_key(
        &mut self,
        token: usize,
        session: CK_SESSION_HANDLE,
        mut attributes: Attributes,
        value: Vec<u8>,
        local: bool,
    ) -> Result<CK_OBJECT_HANDLE> {
        attributes.insert(CKA_CLASS, ulong(CKO_SECRET_KEY));
        attributes.insert(CKA_KEY_TYPE, ulong(CKK_AES));
        attributes.insert(CKA_VALUE, value);
        complete_secret_key(&mut attributes, local);
        let handle = self.store(token, session, attributes)?;
        self.answer(token, CKR_OK)?;
        Ok(handle)
    }

    pub fn destroy_object(
        &mut self,
        session: CK_SESSION_HANDLE,
        handle: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let token = self.enter_session(session)?;
        let handle = self.own_handle(session, handle);
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        let object = t.object(handle, logged_in)?;
        if object.session.is_none() && !self.session(session).read_write {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let t = &mut self.tokens[token];
        if let Some(id) = t.handles.remove(&handle) {
            t.objects.remove(&id);
        }
        self.answer(token, CKR_OK)
    }

    /// `C_SetAttributeValue`: what decides an object's kind, its value and
    /// what may leave the token are read-only here
    /// (`CKR_ATTRIBUTE_READ_ONLY`); anything else is set.
    pub fn set_attributes(
        &mut self,
        session: CK_SESSION_HANDLE,
        handle: CK_OBJECT_HANDLE,
        attributes: Attributes,
    ) -> Result<()> {
        const READ_ONLY: [CK_ATTRIBUTE_TYPE; 7] = [
            CKA_CLASS,
            CKA_KEY_TYPE,
            CKA_VALUE,
            CKA_VALUE_LEN,
            CKA_TOKEN,
            CKA_PRIVATE,
            CKA_TRUSTED,
        ];
        let token = self.enter_session(session)?;
        let handle = self.own_handle(session, handle);
        let logged_in = self.logged_in(session);
        let object = self.tokens[token].object(handle, logged_in)?;
        let at_final = object.at_final(&attributes);
        if object.session.is_none() && !self.session(session).read_write {
            return Err(CKR_SESSION_READ_ONLY);
        }
        if at_final || attributes.keys().any(|t| READ_ONLY.contains(t)) {
            return Err(CKR_ATTRIBUTE_READ_ONLY);
        }
        let t = &mut self.tokens[token];
        let id = t.handles[&handle];
        t.objects
            .get_mut(&id)
            .expect("a handle names an object")
            .attributes
            .extend(attributes);
        self.answer(token, CKR_OK)
    }

    /// The attribute values asked for: `None` for one the object lacks,
    /// `Err(CKR_ATTRIBUTE_SENSITIVE)` for a value it keeps secret.
    pub fn attributes(
        &mut self,
        session: CK_SESSION_HANDLE,
        handle: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<Result<Option<Vec<u8>>>>> {
        let token = self.enter_session(session)?;
        let handle = self.own_handle(session, handle);
        if self.tokens[token].stall_on_reading == Some(handle) {
            self.tokens[token].stall_on_reading = None;
            self.stalled = Some(token);
        }
        let object = self.tokens[token].object(handle, self.logged_in(session))?;
        let secret = object.flag(CKA_SENSITIVE) || !object.flag(CKA_EXTRACTABLE);
        let class = object.attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v));
        Ok(types
            .iter()
            .map(|t| {
                if *t == CKA_VALUE
                    && matches!(class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY))
                    && secret
                {
                    Err(CKR_ATTRIBUTE_SENSITIVE)
                } else {
                    Ok(object.attributes.get(t).cloned())
                }
            })
            .collect())
    }

    pub fn find_init(&mut self, session: CK_SESSION_HANDLE, template: Attributes) -> Result<()> {
        let token = self.enter_session(session)?;
        if self.session(session).find.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        self.tokens[token].searches += 1;
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        let found: Vec<CK_OBJECT_HANDLE> = t
            .handles
            .iter()
            .filter(|(_, id)| {
                let o = &t.objects[id];
                Token::visible(o, logged_in)
                    && template.iter().all(|(k, v)| o.attributes.get(k) == Some(v))
            })
            .map(|(h, _)| self.instance_handle(session, *h))
            .collect();
        self.session(session).find = Some(found);
        Ok(())
    }

    pub fn find(
        &mut self,
        session: CK_SESSION_HANDLE,
        room: usize,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        self.enter_session(session)?;
        let found = self
            .session(session)
            .find
            .as_mut()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let n = room.min(found.len());
        Ok(found.drain(..n).collect())
    }

    pub fn find_final(&mut self, session: CK_SESSION_HANDLE) -> Result<()> {
        self.enter_session(session)?;
        self.session(session)
            .find
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    pub fn operation_init(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        key: Option<CK_OBJECT_HANDLE>,
        kind: u8,
    ) -> Result<()> {
        let token = self.enter_session(session)?;
        if self.session(session).operation.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let key = key.map(|k| self.own_handle(session, k));
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        let operation = match (kind, mechanism) {
            (b'D', CKM_SHA256) => Operation::Digest(Vec::new()),
            (b'S', CKM_SHA256_HMAC) => Operation::Sign {
                key: t.key(key.unwrap_or(0), CKA_SIGN, logged_in)?,
                data: Vec::new(),
            },
            (b'V', CKM_SHA256_HMAC) => Operation::Verify {
                key: t.key(key.unwrap_or(0), CKA_VERIFY, logged_in)?,
                data: Vec::new(),
            },
            (b'S', CKM_ECDSA) => Operation::Sign {
                key: point_of(&t.ec_key(key.unwrap_or(0), CKA_SIGN, logged_in)?),
                data: Vec::new(),
            },
            (b'V', CKM_ECDSA) => Operation::Verify {
                key: t.ec_key(key.unwrap_or(0), CKA_VERIFY, logged_in)?,
                data: Vec::new(),
            },
            (b'E', CKM_AES_ECB) => Operation::Encrypt {
                key: t.key(key.unwrap_or(0), CKA_ENCRYPT, logged_in)?,
                offset: 0,
            },
            (b'C', CKM_AES_ECB) => Operation::Decrypt {
                key: t.key(key.unwrap_or(0), CKA_DECRYPT, logged_in)?,
                offset: 0,
            },
            _ => return Err(CKR_MECHANISM_INVALID),
        };
        self.session(session).operation = Some(operation);
        Ok(())
    }

    /// Feeds `data` to the session's operation; returns output produced now.
    pub fn operation_update(&mut self, session: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>> {
        self.enter_session(session)?;
        let s = self.session(session);
        match s.operation.as_mut() {
            Some(Operation::Digest(buffer))
            | Some(Operation::Sign { data: buffer, .. })
            | Some(Operation::Verify { data: buffer, .. }) => {
                buffer.extend_from_slice(data);
                Ok(Vec::new())
            }
            Some(Operation::Encrypt { key, offset }) | Some(Operation::Decrypt { key, offset }) => {
                if data.len() % 16 != 0 {
                    s.operation = None;
                    return Err(CKR_DATA_LEN_RANGE);
                }
                let mut out = data.to_vec();
                keystream_xor(key, *offset, &mut out);
                *offset += data.len();
                Ok(out)
            }
            None => Err(CKR_OPERATION_NOT_INITIALIZED),
        }
    }

    /// The operation's result, without ending it (two-call convention: the
    /// caller ends it with [`Sim::operation_end`] once the result fits).
    pub fn operation_result(
        &mut self,
        session: CK_SESSION_HANDLE,
        signature: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        self.enter_session(session)?;
        let s = self.session(session);
        let result = match s.operation.as_ref() {
            Some(Operation::Digest(data)) => sha256(&[data]).to_vec(),
            Some(Operation::Sign { key, data }) => sign(key, data),
            Some(Operation::Verify { key, data }) => {
                let rv = if signature == Some(&sign(key, data)[..]) {
                    CKR_OK
                } else {
                    CKR_SIGNATURE_INVALID
                };
                s.operation = None;
                return if rv == CKR_OK {
                    Ok(Vec::new())
                } else {
                    Err(rv)
                };
            }
            Some(Operation::Encrypt { .. }) | Some(Operation::Decrypt { .. }) => Vec::new(),
            None => return Err(CKR_OPERATION_NOT_INITIALIZED),
        };
        Ok(result)
    }

    /// A single-part call's result over what was fed so far plus `data`,
    /// without changing the operation (the two-call convention may ask
    /// again); [`Sim::operation_end`] ends it once the result was taken.
    pub fn operation_single(&mut self, session: CK_SESSION_HANDLE, data: &[u8]) -> Result<Vec<u8>> {
        self.enter_session(session)?;
        let s = self.session(session);
        match s.operation.as_ref() {
            Some(Operation::Digest(fed)) => Ok(sha256(&[fed, data]).to_vec()),
            Some(Operation::Sign { key, data: fed }) => Ok(sign(key, &[&fed[..], data].concat())),
            Some(Operation::Encrypt { key, offset }) | Some(Operation::Decrypt { key, offset }) => {
                if data.len() % 16 != 0 {
                    s.operation = None;
                    return Err(CKR_DATA_LEN_RANGE);
                }
                let mut out = data.to_vec();
                keystream_xor(key, *offset, &mut out);
                Ok(out)
            }
            Some(Operation::Verify { .. }) | None => Err(CKR_OPERATION_NOT_INITIALIZED),
        }
    }

    /// The session's operation as `C_GetOperationState` saves it: its
    /// kind and what was fed so far (the data of a digest, signature or
    /// verification, the offset of an encryption or decryption), without
    /// its key, which `C_SetOperationState` is given again.
    pub fn operation_state(&mut self, session: CK_SESSION_HANDLE) -> Result<Vec<u8>> {
        self.enter_session(session)?;
        let (kind, fed) = match self.session(session).operation.as_ref() {
            Some(Operation::Digest(data)) => (b'D', data.clone()),
            Some(Operation::Sign { data, .. }) => (b'S', data.clone()),
            Some(Operation::Verify { data, .. }) => (b'V', data.clone()),
            Some(Operation::Encrypt { offset, .. }) => (b'E', offset.to_le_bytes().to_vec()),
            Some(Operation::Decrypt { offset, .. }) => (b'C', offset.to_le_bytes().to_vec()),
            None => return Err(CKR_OPERATION_NOT_INITIALIZED),
        };
        Ok([&[kind][..], &fed].concat())
    }

    /// Restores a state [`Sim::operation_state`] saved, with the key it
    /// needs as `C_SetOperationState` names it: the encryption key of an
    /// encryption or decryption, the authentication key of a signature or
    /// verification, none for a digest (`CKR_KEY_NEEDED`,
    /// `CKR_KEY_NOT_NEEDED` otherwise).
    pub fn restore_operation(
        &mut self,
        session: CK_SESSION_HANDLE,
        state: &[u8],
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let token = self.enter_session(session)?;
        let (&kind, fed) = state.split_first().ok_or(CKR_SAVED_STATE_INVALID)?;
        let offset = || {
            fed.try_into()
                .map(usize::from_le_bytes)
                .map_err(|_| CKR_SAVED_STATE_INVALID)
        };
        let (needed, unneeded) = match kind {
            b'D' => (CK_INVALID_HANDLE, encryption_key | authentication_key),
            b'S' | b'V' => (authentication_key, encryption_key),
            b'E' | b'C' => (encryption_key, authentication_key),
            _ => return Err(CKR_SAVED_STATE_INVALID),
        };
        if unneeded != CK_INVALID_HANDLE {
            return Err(CKR_KEY_NOT_NEEDED);
        }
        if kind != b'D' && needed == CK_INVALID_HANDLE {
            return Err(CKR_KEY_NEEDED);
        }
        let key = self.own_handle(session, needed);
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        let operation = match kind {
            b'D' => Operation::Digest(fed.to_vec()),
            b'S' => Operation::Sign {
                key: t.key(key, CKA_SIGN, logged_in)?,
                data: fed.to_vec(),
            },
            b'V' => Operation::Verify {
                key: t.key(key, CKA_VERIFY, logged_in)?,
                data: fed.to_vec(),
            },
            b'E' => Operation::Encrypt {
                key: t.key(key, CKA_ENCRYPT, logged_in)?,
                offset: offset()?,
            },
            _ => Operation::Decrypt {
                key: t.key(key, CKA_DECRYPT, logged_in)?,
                offset: offset()?,
            },
        };
        self.session(session).operation = Some(operation);
        Ok(())
    }

    pub fn operation_end(&mut self, session: CK_SESSION_HANDLE) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.operation = None;
        }
    }

    pub fn wrap_key(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Vec<u8>> {
        let token = self.enter_session(session)?;
        let (wrapping, key) = (
            self.own_handle(session, wrapping),
            self.own_handle(session, key),
        );
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        if mechanism != CKM_AES_KEY_WRAP_PAD || t.refuse_wrap || t.refuse_wrap_always {
            return Err(CKR_MECHANISM_INVALID);
        }
        let wrapping_key = t
            .object(wrapping, logged_in)
            .map_err(|_| CKR_WRAPPING_KEY_HANDLE_INVALID)?;
        if !wrapping_key.flag(CKA_WRAP) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let object = t
            .object(key, logged_in)
            .map_err(|_| CKR_KEY_HANDLE_INVALID)?;
        if !object.flag(CKA_EXTRACTABLE) {
            return Err(CKR_KEY_UNEXTRACTABLE);
        }
        if object.flag(CKA_WRAP_WITH_TRUSTED) && !wrapping_key.flag(CKA_TRUSTED) {
            return Err(CKR_KEY_NOT_WRAPPABLE);
        }
        let class = object.attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v));
        let material = if class == Some(CKO_PRIVATE_KEY) {
            private_key_blob(object)
        } else {
            object.value().to_vec()
        };
        Ok(wrapped(wrapping_key.value(), &material))
    }

    pub fn unwrap_key(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        unwrapping: CK_OBJECT_HANDLE,
        blob: &[u8],
        mut attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        let token = self.check_writable(session, &attributes)?;
        let unwrapping = self.own_handle(session, unwrapping);
        let logged_in = self.logged_in(session);
        let t = &self.tokens[token];
        if mechanism != CKM_AES_KEY_WRAP_PAD || t.refuse_wrap || t.refuse_wrap_always {
            return Err(CKR_MECHANISM_INVALID);
        }
        let unwrapping_key = t
            .object(unwrapping, logged_in)
            .map_err(|_| CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
        if !unwrapping_key.flag(CKA_UNWRAP) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        if blob.len() <= 8 {
            return Err(CKR_WRAPPED_KEY_LEN_RANGE);
        }
        let (sealed, tag) = blob.split_at(blob.len() - 8);
        let mut value = sealed.to_vec();
        keystream_xor(unwrapping_key.value(), 0, &mut value);
        if wrap_tag(unwrapping_key.value(), &value) != tag {
            return Err(CKR_WRAPPED_KEY_INVALID);
        }
        match attributes.get(&CKA_CLASS).and_then(|v| ulong_of(v)) {
            Some(CKO_SECRET_KEY) => {
                attributes.insert(CKA_VALUE, value);
                attributes.entry(CKA_KEY_TYPE).or_insert(ulong(CKK_AES));
                complete_secret_key(&mut attributes, false);
            }
            Some(CKO_PRIVATE_KEY) => {
                let (params, value) = private_key_of_blob(&value).ok_or(CKR_WRAPPED_KEY_INVALID)?;
                if attributes
                    .insert(CKA_KEY_TYPE, ulong(CKK_EC))
                    .is_some_and(|t| t != ulong(CKK_EC))
                {
                    return Err(CKR_TEMPLATE_INCONSISTENT);
                }
                attributes.insert(CKA_EC_PARAMS, params);
                attributes.insert(CKA_VALUE, value);
                complete_private_key(&mut attributes, false);
            }
            _ => return Err(CKR_TEMPLATE_INCONSISTENT),
        }
        let handle = self.store(token, session, attributes)?;
        self.answer(token, CKR_OK)?;
        Ok(handle)
    }

    /// `C_DeriveKey` with `CKM_SHA256_KEY_DERIVATION`: an AES key from a
    /// secret key that allows derivation (`CKA_DERIVE`), its value
    /// [`derived_value`] of the base's.
    pub fn derive_key(
        &mut self,
        session: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        base: CK_OBJECT_HANDLE,
        attributes: Attributes,
    ) -> Result<CK_OBJECT_HANDLE> {
        if mechanism != CKM_SHA256_KEY_DERIVATION {
            return Err(CKR_MECHANISM_INVALID);
        }
        let token = self.check_writable(session, &attributes)?;
        let base = self.own_handle(session, base);
        let logged_in = self.logged_in(session);
        let base_key = self.tokens[token]
            .object(base, logged_in)
            .map_err(|_| CKR_KEY_HANDLE_INVALID)?;
        if !base_key.flag(CKA_DERIVE) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let len = aes_key_length(&attributes, Some(32))?;
        let value = derived_value(base_key.value(), len);
        self.store_aes_key(token, session, attributes, value, false)
    }

    pub fn random(&mut self, session: CK_SESSION_HANDLE, len: usize) -> Result<Vec<u8>> {
        self.enter_session(session)?;
        Ok(self.generate(len))
    }
}
