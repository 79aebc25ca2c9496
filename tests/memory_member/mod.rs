//! A simulated member library in this process: the token model
//! (`token.rs`: tokens, sessions, logins, operations and the faults a test
//! plants) answering through the core's member traits ([`MemberApi`],
//! [`MemberBackend`]), with no shared library and no C pointer but the
//! attribute values the traits hand over. The deterministic simulation
//! (`tests/simulation.rs`) and the member-boundary tests
//! (`tests/member_api.rs`) share it.
#![allow(dead_code)]

pub mod host;
pub mod instance;
pub mod spares;
/// Parts of the model that only some tests use are unused in others.
#[allow(dead_code)]
pub mod token;

use cryptoki_sys::*;
use parking_lot::Mutex;
use pkcs11_ha::error::Error;
use pkcs11_ha::member::{counted, string_to_padded, Silent, Unanswered};
use pkcs11_ha::member_api::{Hedge, Held, MemberApi, MemberBackend, SpareLane, TokenSearch};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use token::{Attributes, Sim, FIRST_SLOT, MECHANISMS};

/// What a call that met a planted stall ([`token::Fault::Stall`]) does
/// once it was carried out, inside the member as a library that hangs for
/// a while, before it returns: given the token's index.
pub type StallHook = Arc<dyn Fn(usize) + Send + Sync>;

/// What a call does before it reaches the model ([`SimMember::on_call`]).
pub type CallHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// What a search does with its template before it reaches the model
/// ([`SimMember::on_search`]).
pub type SearchHook = Arc<dyn Fn(&Attributes) + Send + Sync>;

/// A member library of in-memory tokens. It answers as a loaded library
/// of the same tokens would: `CKR_CRYPTOKI_NOT_INITIALIZED` until
/// initialised, every call counted through [`counted`], functions the
/// model lacks `CKR_FUNCTION_NOT_SUPPORTED`. A networked one
/// ([`SimMember::new`]) loses its connection when a token restarts or a
/// reset is planted, and only finalising and initialising it again (the
/// reconnect recovery makes, [`MemberBackend::reinitialize`]) brings it
/// back, on a connection of a new number.
pub struct SimMember {
    name: String,
    pub sim: Mutex<Sim>,
    stall: Mutex<Option<StallHook>>,
    /// What a call that changed a token on the own instance does before it
    /// returns, where the model reports changes ([`SimMember::on_change`]).
    change: Mutex<Option<StallHook>>,
    /// What each call does first, given the function's name
    /// ([`SimMember::on_call`]).
    call_hook: Mutex<Option<CallHook>>,
    /// What each search on the own instance does first, given its
    /// template ([`SimMember::on_search`]).
    search_hook: Mutex<Option<SearchHook>>,
    /// The connection's number, one more at each initialisation.
    connection: AtomicU64,
    /// Initialised by the core (not already initialised when it asked).
    ours: AtomicBool,
    /// Spare instances ([`SimMember::with_spares`]); none by default.
    pub spares: spares::Spares,
    /// The spares whose calls are stalled now ([`token::Fault::Stall`]
    /// and its kin met on a spare's session): those the watchdog's
    /// [`MemberBackend::sever`] cuts.
    stalled_spares: Mutex<Vec<usize>>,
    /// Hedged token searches still to end as on a dead connection
    /// ([`SimMember::answer_dead_connections`]).
    dead_connections: AtomicUsize,
    /// The patience each hedged token search was given, in order.
    pub search_patience: Mutex<Vec<Duration>>,
    /// Whether the core takes it for a library that talks to a server
    /// ([`SimMember::talking_to_a_server`]).
    remote: bool,
}

impl SimMember {
    /// `tokens` fresh tokens, serials numbered from `first`, each holding
    /// the domain key; not initialised yet. `seed` seeds generated key
    /// values and random bytes.
    pub fn new(name: &str, tokens: usize, first: usize, networked: bool, seed: u64) -> SimMember {
        let mut sim = Sim::default();
        sim.reset(tokens, first, networked, seed);
        SimMember {
            name: name.to_string(),
            sim: Mutex::new(sim),
            stall: Mutex::new(None),
            change: Mutex::new(None),
            call_hook: Mutex::new(None),
            search_hook: Mutex::new(None),
            connection: AtomicU64::new(0),
            ours: AtomicBool::new(false),
            spares: spares::Spares::default(),
            stalled_spares: Mutex::new(Vec::new()),
            dead_connections: AtomicUsize::new(0),
            search_patience: Mutex::new(Vec::new()),
            remote: false,
        }
    }

    /// The member as the core sees a library that talks to a server
    /// (`MemberBackend::is_networked`: every call timed, an object made on
    /// several such members asked of them at once); its calls still
    /// answer at once.
    pub fn talking_to_a_server(mut self) -> SimMember {
        self.remote = true;
        self
    }

    /// The next `count` hedged token searches (recovery's) end as on a
    /// connection that answered nothing while a fresh instance of the
    /// library found the token ([`Unanswered::DeadConnection`]).
    pub fn answer_dead_connections(&self, count: usize) {
        self.dead_connections.store(count, Ordering::SeqCst);
    }

    /// The member with `count` spare instances, as p11-kit's client has
    /// them: operations, searches and attribute reads of token objects may
    /// run on their sessions (lanes).
    pub fn with_spares(mut self, count: usize) -> SimMember {
        self.spares = spares::Spares::new(count);
        self
    }

    /// [`SimMember::with_spares`] as the deterministic simulation has them
    /// ([`spares::Spares::one_lane`]); made in the thread that will call
    /// it.
    pub fn with_one_lane_spares(mut self, count: usize) -> SimMember {
        self.spares = spares::Spares::one_lane(count);
        self
    }

    /// Opens a session for spare instance `spare`, which numbers objects
    /// its own way ([`token::spare_handle`]): the spare faults meet it.
    fn open_spare_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        spare: usize,
        session: &mut CK_SESSION_HANDLE,
    ) -> CK_RV {
        self.call("C_OpenSession", |sim| {
            *session = sim.open_spare_session(sim.token_index(slot)?, flags, spare)?;
            Ok(())
        })
    }

    /// Ends spare instance `spare`'s sessions on `slot`'s token
    /// ([`instance::SpareInstance`]'s `C_CloseAllSessions`).
    fn close_all_spare_sessions(&self, slot: CK_SLOT_ID, spare: usize) -> CK_RV {
        self.call("C_CloseAllSessions", |sim| {
            sim.close_spare_sessions(sim.token_index(slot)?, spare)
        })
    }

    /// [`SimMember::new`] of one in-process library, initialised.
    pub fn initialized(tokens: usize, seed: u64) -> SimMember {
        let member = SimMember::new("simulated", tokens, 0, false, seed);
        member
            .initialize()
            .expect("an in-memory library initialises");
        member
    }

    /// Sets what a stalled call does before it returns.
    pub fn on_stall(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        *self.stall.lock() = Some(Arc::new(hook));
    }

    /// Reports each change carried out on the library's own instance to
    /// `hook`, given the token's index, before the call returns (outside
    /// the model's lock: the hook may call in).
    pub fn on_change(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        self.sim.lock().report_changes = true;
        *self.change.lock() = Some(Arc::new(hook));
    }

    /// Runs `hook`, given the function's name, as each call begins, before
    /// the model's lock (the hook may call in).
    pub fn on_call(&self, hook: impl Fn(&'static str) + Send + Sync + 'static) {
        *self.call_hook.lock() = Some(Arc::new(hook));
    }

    /// Runs `hook`, given the template, as each `C_FindObjectsInit` on
    /// the library's own instance begins, before the model's lock.
    pub fn on_search(&self, hook: impl Fn(&Attributes) + Send + Sync + 'static) {
        *self.search_hook.lock() = Some(Arc::new(hook));
    }

    /// Runs `f` on the model, counted on the member the thread calls for,
    /// as a loaded library's calls are; a call that met a stall then runs
    /// the stall hook, and one that changed a token the change hook,
    /// outside the model's lock (the hooks may call in).
    fn call(&self, function: &'static str, f: impl FnOnce(&mut Sim) -> token::Result<()>) -> CK_RV {
        self.spares.owner_called();
        let hook = self.call_hook.lock().clone();
        if let Some(hook) = hook {
            hook(function);
        }
        counted(function, || {
            let (answer, stalled, changed) = {
                let mut sim = self.sim.lock();
                if !sim.initialized {
                    return CKR_CRYPTOKI_NOT_INITIALIZED;
                }
                let answer = f(&mut sim);
                let on_spare = sim.on_spare;
                let changed = sim.changed.take();
                (
                    answer,
                    sim.stalled.take().map(|token| (token, on_spare)),
                    changed,
                )
            };
            if let Some(token) = changed {
                let hook = self.change.lock().clone();
                if let Some(hook) = hook {
                    hook(token);
                }
            }
            if let Some((token, on_spare)) = stalled {
                let hook = self.stall.lock().clone();
                if let Some(hook) = hook {
                    self.stalled_spares.lock().extend(on_spare);
                    hook(token);
                    if let Some(spare) = on_spare {
                        let mut stalled = self.stalled_spares.lock();
                        if let Some(at) = stalled.iter().rposition(|s| *s == spare) {
                            stalled.remove(at);
                        }
                    }
                }
            }
            match answer {
                Ok(()) => CKR_OK,
                Err(rv) => rv,
            }
        })
    }

    /// The token objects of token `token`: (class, label, id, value), each
    /// hex-encoded ("x" and the bytes; "-" for none). The value of either
    /// key of an EC pair is the pair's point ([`token::point_of`]), so that
    /// both halves of a pair show the same.
    pub fn token_objects(&self, token: usize) -> Vec<[String; 4]> {
        let sim = self.sim.lock();
        sim.tokens[token]
            .token_objects()
            .map(|o| {
                let [class, label, id, value] = [CKA_CLASS, CKA_LABEL, CKA_ID, CKA_VALUE]
                    .map(|t| o.attributes.get(&t).map(Vec::as_slice));
                let value = match class {
                    Some(c) if c == CKO_PUBLIC_KEY.to_ne_bytes() => {
                        o.attributes.get(&CKA_EC_POINT).cloned()
                    }
                    Some(c) if c == CKO_PRIVATE_KEY.to_ne_bytes() => value.map(token::point_of),
                    _ => value.map(<[u8]>::to_vec),
                };
                [class, label, id, value.as_deref()].map(|v| v.map_or("-".to_string(), hex))
            })
            .collect()
    }

    /// The protection of each key on token `token`: its class, label,
    /// `CKA_SENSITIVE`, `CKA_EXTRACTABLE` and `CKA_WRAP_WITH_TRUSTED`, the
    /// first two hex-encoded as in [`SimMember::token_objects`].
    pub fn token_key_flags(&self, token: usize) -> Vec<(String, String, [bool; 3])> {
        let sim = self.sim.lock();
        sim.tokens[token]
            .token_objects()
            .map(|o| {
                let [class, label] = [CKA_CLASS, CKA_LABEL]
                    .map(|t| o.attributes.get(&t).map_or("-".to_string(), |v| hex(v)));
                let flags =
                    [CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED].map(|t| o.flag(t));
                (class, label, flags)
            })
            .collect()
    }

    /// Sessions open on token `token`.
    pub fn sessions(&self, token: usize) -> usize {
        let sim = self.sim.lock();
        sim.sessions.values().filter(|s| s.token == token).count()
    }

    /// Sessions open on token `token` that no spare instance opened: the
    /// spares keep theirs open between calls, one per spare.
    pub fn own_sessions(&self, token: usize) -> usize {
        let sim = self.sim.lock();
        sim.sessions
            .values()
            .filter(|s| s.token == token && !s.spare())
            .count()
    }

    /// A single-part call: the result under the two-call convention; the
    /// operation ends with the answer, not with a length query or too
    /// little room.
    fn single(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call(function, |sim| {
            let result = sim
                .operation_single(session, input.unwrap_or_default())
                .inspect_err(|_| sim.operation_end(session))?;
            if two_call(&result, output, output_len)? {
                sim.operation_end(session);
            }
            Ok(())
        })
    }

    /// An update that takes input only.
    fn update(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
    ) -> CK_RV {
        self.call(function, |sim| {
            sim.operation_update(session, input.unwrap_or_default())
                .inspect_err(|_| sim.operation_end(session))
                .map(|_| ())
        })
    }

    /// An encryption or decryption update: as much output as input, asked
    /// for or written under the two-call convention.
    fn crypt_update(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call(function, |sim| {
            let data = input.unwrap_or_default();
            let room = output
                .as_ref()
                .map_or(0, |o| (*output_len as usize).min(o.len()));
            if output.is_none() || room < data.len() {
                sim.enter_session(session)?;
                *output_len = data.len() as CK_ULONG;
                return match output {
                    None => Ok(()),
                    Some(_) => Err(CKR_BUFFER_TOO_SMALL),
                };
            }
            let produced = sim
                .operation_update(session, data)
                .inspect_err(|_| sim.operation_end(session))?;
            two_call(&produced, output, output_len).map(|_| ())
        })
    }

    /// A final that writes the result under the two-call convention.
    fn finish(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call(function, |sim| {
            let result = sim
                .operation_result(session, None)
                .inspect_err(|_| sim.operation_end(session))?;
            if two_call(&result, output, output_len)? {
                sim.operation_end(session);
            }
            Ok(())
        })
    }

    /// An operation's start: `kind` is the model's (`D`igest, `S`ign,
    /// `V`erify, `E`ncrypt, de`C`rypt).
    fn init(
        &self,
        function: &'static str,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: Option<CK_OBJECT_HANDLE>,
        kind: u8,
    ) -> CK_RV {
        self.call(function, |sim| {
            sim.operation_init(session, mechanism.mechanism, key, kind)
        })
    }
}

/// `bytes` as the simulation compares values: "x" and two hex digits each.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::from("x"), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
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

    fn logout(&self, session: CK_SESSION_HANDLE) -> CK_RV {
        self.call("C_Logout", |sim| sim.logout(session))
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

    fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        object: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call("C_CopyObject", |sim| {
            *object = sim.copy_object(session, source, attributes(template))?;
            Ok(())
        })
    }

    fn destroy_object(&self, session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
        self.call("C_DestroyObject", |sim| sim.destroy_object(session, object))
    }

    fn set_attribute_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
    ) -> CK_RV {
        self.call("C_SetAttributeValue", |sim| {
            sim.set_attributes(session, object, attributes(template))
        })
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
            if types.is_empty() {
                return Ok(());
            }
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
        let template = attributes(template);
        let hook = self.search_hook.lock().clone();
        if let Some(hook) = hook {
            hook(&template);
        }
        self.call("C_FindObjectsInit", |sim| sim.find_init(session, template))
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
        self.init("C_DigestInit", session, mechanism, None, b'D')
    }

    fn sign_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.init("C_SignInit", session, mechanism, Some(key), b'S')
    }

    fn verify_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.init("C_VerifyInit", session, mechanism, Some(key), b'V')
    }

    fn encrypt_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.init("C_EncryptInit", session, mechanism, Some(key), b'E')
    }

    fn decrypt_init(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.init("C_DecryptInit", session, mechanism, Some(key), b'C')
    }

    fn digest(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.single("C_Digest", session, input, output, output_len)
    }

    fn sign(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.single("C_Sign", session, input, output, output_len)
    }

    fn encrypt(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.single("C_Encrypt", session, input, output, output_len)
    }

    fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.single("C_Decrypt", session, input, output, output_len)
    }

    fn encrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.crypt_update("C_EncryptUpdate", session, input, output, output_len)
    }

    fn decrypt_update(
        &self,
        session: CK_SESSION_HANDLE,
        input: Option<&[u8]>,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.crypt_update("C_DecryptUpdate", session, input, output, output_len)
    }

    fn digest_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        self.update("C_DigestUpdate", session, input)
    }

    fn sign_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        self.update("C_SignUpdate", session, input)
    }

    fn verify_update(&self, session: CK_SESSION_HANDLE, input: Option<&[u8]>) -> CK_RV {
        self.update("C_VerifyUpdate", session, input)
    }

    fn encrypt_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.finish("C_EncryptFinal", session, output, output_len)
    }

    fn decrypt_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.finish("C_DecryptFinal", session, output, output_len)
    }

    fn digest_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.finish("C_DigestFinal", session, output, output_len)
    }

    fn sign_final(
        &self,
        session: CK_SESSION_HANDLE,
        output: Option<&mut [u8]>,
        output_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.finish("C_SignFinal", session, output, output_len)
    }

    fn verify(
        &self,
        session: CK_SESSION_HANDLE,
        data: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> CK_RV {
        self.call("C_Verify", |sim| {
            sim.operation_update(session, data.unwrap_or_default())?;
            sim.operation_result(session, Some(signature.unwrap_or_default()))
                .map(|_| ())
        })
    }

    fn verify_final(&self, session: CK_SESSION_HANDLE, signature: Option<&[u8]>) -> CK_RV {
        self.call("C_VerifyFinal", |sim| {
            sim.operation_result(session, Some(signature.unwrap_or_default()))
                .map(|_| ())
        })
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

    fn generate_key_pair(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        public_template: Option<&[CK_ATTRIBUTE]>,
        private_template: Option<&[CK_ATTRIBUTE]>,
        public_key: &mut CK_OBJECT_HANDLE,
        private_key: &mut CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call("C_GenerateKeyPair", |sim| {
            (*public_key, *private_key) = sim.generate_key_pair(
                session,
                mechanism.mechanism,
                attributes(public_template),
                attributes(private_template),
            )?;
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

    fn derive_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        base_key: CK_OBJECT_HANDLE,
        template: Option<&[CK_ATTRIBUTE]>,
        key: Option<&mut CK_OBJECT_HANDLE>,
    ) -> CK_RV {
        let Some(key) = key else {
            return CKR_ARGUMENTS_BAD;
        };
        self.call("C_DeriveKey", |sim| {
            *key = sim.derive_key(session, mechanism.mechanism, base_key, attributes(template))?;
            Ok(())
        })
    }

    fn get_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&mut [u8]>,
        state_len: &mut CK_ULONG,
    ) -> CK_RV {
        self.call("C_GetOperationState", |sim| {
            let saved = sim.operation_state(session)?;
            two_call(&saved, state, state_len).map(|_| ())
        })
    }

    fn set_operation_state(
        &self,
        session: CK_SESSION_HANDLE,
        state: Option<&[u8]>,
        encryption_key: CK_OBJECT_HANDLE,
        authentication_key: CK_OBJECT_HANDLE,
    ) -> CK_RV {
        self.call("C_SetOperationState", |sim| {
            sim.restore_operation(
                session,
                state.unwrap_or_default(),
                encryption_key,
                authentication_key,
            )
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

    /// Every slot, or those with a token present; a library that lost its
    /// connection knows of none.
    fn slot_list(&self, token_present: CK_BBOOL) -> pkcs11_ha::error::Result<Vec<CK_SLOT_ID>> {
        let sim = self.sim.lock();
        if !sim.initialized {
            return Err(CKR_CRYPTOKI_NOT_INITIALIZED.into());
        }
        if token_present == CK_TRUE || sim.disconnected {
            return Ok(sim.present_tokens()?);
        }
        Ok((0..sim.tokens.len() as CK_SLOT_ID)
            .map(|i| FIRST_SLOT + i)
            .collect())
    }

    fn slot_info(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_SLOT_INFO> {
        let sim = self.sim.lock();
        let token = sim.token_index(slot)?;
        let present = sim.present_tokens()?.contains(&slot);
        let version = CK_VERSION {
            major: 2,
            minor: 40,
        };
        let mut info = CK_SLOT_INFO {
            slotDescription: [b' '; 64],
            manufacturerID: [b' '; 32],
            flags: if present { CKF_TOKEN_PRESENT } else { 0 },
            hardwareVersion: version,
            firmwareVersion: version,
        };
        string_to_padded(
            &format!("simulated slot {token}"),
            &mut info.slotDescription,
        );
        string_to_padded("pkcs11-ha simulation", &mut info.manufacturerID);
        Ok(info)
    }

    /// Recovery finds a member's token by its serial.
    fn token_info(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<CK_TOKEN_INFO> {
        let mut sim = self.sim.lock();
        if !sim.initialized {
            return Err(CKR_CRYPTOKI_NOT_INITIALIZED.into());
        }
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

    fn mechanisms(&self, slot: CK_SLOT_ID) -> pkcs11_ha::error::Result<Vec<CK_MECHANISM_TYPE>> {
        let mut sim = self.sim.lock();
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
        if std::mem::take(&mut sim.tokens[token].fail_next_listing) {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        Ok(MECHANISMS.iter().map(|(m, _)| *m).collect())
    }

    fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> pkcs11_ha::error::Result<CK_MECHANISM_INFO> {
        let mut sim = self.sim.lock();
        let token = sim.token_index(slot)?;
        sim.enter(token)?;
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

    /// Connects anew (a lost connection comes back) on a connection of a
    /// new number; already initialised, it is not ours to finalise.
    fn initialize(&self) -> pkcs11_ha::error::Result<()> {
        let mut sim = self.sim.lock();
        self.connection.fetch_add(1, Ordering::AcqRel);
        if std::mem::replace(&mut sim.initialized, true) {
            return Ok(());
        }
        sim.connect();
        self.ours.store(true, Ordering::Release);
        Ok(())
    }

    /// Ends every session, as a library's `C_Finalize` does; the tokens
    /// keep their objects.
    fn finalize(&self) {
        let mut sim = self.sim.lock();
        if !self.ours.swap(false, Ordering::AcqRel) {
            return;
        }
        for token in 0..sim.tokens.len() {
            sim.drop_sessions(token);
        }
        sim.initialized = false;
    }
}

/// A library in this process that never hangs: spares only where a test
/// gives them ([`SimMember::with_spares`]), no Luna
/// extensions, and a token search runs in the caller's thread. Recovery
/// reconnects it as a loaded library that it initialised
/// ([`MemberBackend::reinitialize`]: finalise, then initialise).
impl MemberBackend for SimMember {
    fn name(&self) -> &str {
        &self.name
    }

    fn connection(&self) -> u64 {
        self.connection.load(Ordering::Acquire)
    }

    fn usable(&self) -> bool {
        self.sim.lock().initialized
    }

    fn is_networked(&self) -> bool {
        self.remote
    }

    /// A networked one's server carries out what it received
    /// ([`token::Fault::LateChange`]); its timing stays an in-process
    /// library's unless it is [`SimMember::talking_to_a_server`].
    fn may_carry_out_after_fault(&self) -> bool {
        self.sim.lock().networked()
    }

    fn initialized_by_us(&self) -> bool {
        self.ours.load(Ordering::Acquire)
    }

    fn has_spares(&self) -> bool {
        self.spares.count() > 0
    }

    fn on_spare<'g>(
        &self,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
        call: &mut dyn FnMut(&dyn MemberBackend, CK_SESSION_HANDLE) -> CK_RV,
    ) -> Option<CK_RV> {
        self.on_spare_call(slot, begin, call)
    }

    fn take_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        self.take_spare_lane(slot, begin, true)
    }

    fn take_connected_lane<'g>(
        self: Arc<Self>,
        slot: CK_SLOT_ID,
        begin: &mut dyn FnMut() -> Box<dyn Held + 'g>,
    ) -> Option<std::result::Result<Box<dyn SpareLane>, CK_RV>> {
        self.take_spare_lane(slot, begin, false)
    }

    fn log_out_spares(&self, slot: CK_SLOT_ID) {
        self.log_out_spare_sessions(slot)
    }

    fn close_forgotten_lanes(&self) {
        self.close_forgotten_lanes_of_spares()
    }

    /// Cuts the connection of each spare whose call is stalled, as
    /// `member.rs` shuts its socket down and marks it stale; the member's
    /// own connection is the faults' to lose ([`token::Fault::Hang`]).
    fn sever(&self) -> usize {
        let stalled: Vec<usize> = self.stalled_spares.lock().clone();
        for spare in &stalled {
            self.sim.lock().cut_spare(*spare);
            self.spares.mark_stale(*spare);
        }
        stalled.len()
    }

    fn search_bounded(
        self: Arc<Self>,
        search: TokenSearch,
        _deadline: Instant,
        _patience: Duration,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Silent>> {
        Some(Ok(search(&*self)))
    }

    /// Each search's patience is noted; the first
    /// [`SimMember::answer_dead_connections`] searches end as on a dead
    /// connection whose fresh instance answered, without running.
    fn search_hedged(
        self: Arc<Self>,
        search: TokenSearch,
        _deadline: Instant,
        patience: Duration,
        _hedge: Hedge,
    ) -> Option<std::result::Result<Option<CK_SLOT_ID>, Unanswered>> {
        self.search_patience.lock().push(patience);
        let dead = self
            .dead_connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if dead.is_ok() {
            return Some(Err(Unanswered::DeadConnection));
        }
        Some(Ok(search(&*self)))
    }
}
