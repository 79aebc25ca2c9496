//! Direct access to the member tokens for the management CLI: loads every
//! configured library in this process (a separate process from the
//! applications), finds tokens by serial or slot, and wraps the few
//! PKCS#11 calls the CLI makes. Never logs a PIN or key material.

use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cryptoki_sys::*;
use pkcs11_ha::config::Config;
use pkcs11_ha::error::rv_name;
use pkcs11_ha::identity::{self, Fingerprint};
use pkcs11_ha::member::{initialize_each, padded_to_string, MemberLibrary, Silent};
use zeroize::Zeroizing;

/// Calls one entry of a member's function table through
/// [`MemberLibrary::call`]; a missing entry is `CKR_FUNCTION_NOT_SUPPORTED`.
macro_rules! call {
    ($lib:expr, $func:ident ( $($arg:expr),* $(,)? )) => {{
        let library: &MemberLibrary = &$lib;
        library.call(
            stringify!($func),
            |table| table.$func,
            // SAFETY: the table came from the member's own C_GetFunctionList
            // or C_GetInterface and the library stays loaded while `$lib`
            // lives; the arguments follow the PKCS#11 signature.
            |f| unsafe { f($($arg),*) },
        )
    }};
}

/// A CK_RV as a `Result`.
pub fn ck(rv: CK_RV) -> Result<(), CK_RV> {
    if rv == CKR_OK {
        Ok(())
    } else {
        Err(rv)
    }
}

/// How long the CLI waits for a member library to initialise and list its
/// tokens before it counts that library as not answering.
static TIMEOUT: Mutex<Duration> = Mutex::new(Duration::from_secs(10));

/// Sets the bound of [`Members::open`] (`--timeout`).
pub fn set_timeout(timeout: Duration) {
    *TIMEOUT.lock().unwrap_or_else(|p| p.into_inner()) = timeout;
}

/// One configured library, loaded and initialised, or why not.
pub struct Loaded {
    pub name: String,
    pub library: Result<Arc<MemberLibrary>, String>,
    /// Its tokens, read once within the bound.
    tokens: Vec<TokenRef>,
}

/// Every configured library. Finalises the ones it initialised on drop.
pub struct Members {
    pub libraries: Vec<Loaded>,
    /// The state directory applications share (`haStateDir`), where they
    /// record deletions a member missed.
    pub state_dir: Option<std::path::PathBuf>,
}

/// A token found in one of the libraries.
#[derive(Debug, Clone)]
pub struct TokenRef {
    /// Position of its library in `[Libraries]`.
    pub library: usize,
    pub library_name: String,
    pub slot: CK_SLOT_ID,
    pub serial: String,
    pub label: String,
    pub model: String,
    pub manufacturer: String,
    pub flags: CK_FLAGS,
}

impl TokenRef {
    /// The slot ID pkcs11-ha gives this token's pass-through slot.
    pub fn passthrough_slot(&self) -> u64 {
        pkcs11_ha::slot_ids::hashed_slot_id(&self.library_name, self.slot)
    }
}

impl Members {
    /// Loads every library of `config`, then initialises them all at once
    /// and reads their tokens, waiting at most the `--timeout` bound: a
    /// library that fails, or has not answered by then, is kept with its
    /// reason, so its tokens show as down, and is not called again.
    pub fn open(config: &Config) -> Members {
        let timeout = *TIMEOUT.lock().unwrap_or_else(|p| p.into_inner());
        // Each library applies its [LibraryEnvironment] settings while its
        // function list is obtained.
        let loaded: Vec<Result<Arc<MemberLibrary>, String>> = config
            .libraries
            .iter()
            .map(|entry| {
                MemberLibrary::load(&entry.name, &entry.path, &entry.environment).map(Arc::new)
            })
            .collect();
        let usable: Vec<Arc<MemberLibrary>> = loaded.iter().flatten().cloned().collect();
        let mut answers = initialize_each(&usable, timeout, true, tokens_of).into_iter();
        let answers: Vec<_> = loaded
            .iter()
            .map(|library| library.as_ref().ok().and(answers.next()))
            .collect();
        let libraries = config
            .libraries
            .iter()
            .zip(loaded)
            .zip(answers)
            .enumerate()
            .map(|(index, ((entry, library), answer))| {
                let (library, tokens) = match (library, answer) {
                    (Err(why), _) => (Err(why), Vec::new()),
                    (Ok(library), Some(Ok(Ok(tokens)))) => (Ok(library), tokens),
                    (Ok(_), Some(Ok(Err(e)))) => (
                        Err(format!(
                            "C_Initialize of {} returned {}",
                            entry.path.display(),
                            rv_name(e.rv)
                        )),
                        Vec::new(),
                    ),
                    (Ok(_), Some(Err(Silent)) | None) => (
                        Err(format!(
                            "not answering: no answer from {} within {} ms (--timeout)",
                            entry.path.display(),
                            timeout.as_millis()
                        )),
                        Vec::new(),
                    ),
                };
                let mut tokens = tokens;
                for token in &mut tokens {
                    token.library = index;
                    token.library_name = entry.name.clone();
                }
                Loaded {
                    name: entry.name.clone(),
                    library,
                    tokens,
                }
            })
            .collect();
        Members {
            libraries,
            state_dir: config
                .state_dir
                .clone()
                .or_else(pkcs11_ha::state_dir::default_path),
        }
    }

    pub fn library(&self, index: usize) -> &MemberLibrary {
        self.libraries[index]
            .library
            .as_ref()
            .expect("a TokenRef names a loaded library")
    }

    /// Libraries that could not be loaded or initialised, or did not
    /// answer: (name, reason).
    pub fn failures(&self) -> Vec<(&str, &str)> {
        self.libraries
            .iter()
            .filter_map(|l| {
                l.library
                    .as_ref()
                    .err()
                    .map(|e| (l.name.as_str(), e.as_str()))
            })
            .collect()
    }

    /// Why a member token was found in no library: where libraries failed
    /// or did not answer, it may be in one of them.
    pub fn not_found_note(&self) -> String {
        let failed: Vec<&str> = self.failures().iter().map(|(name, _)| *name).collect();
        if failed.is_empty() {
            "not found in any configured library".into()
        } else {
            format!(
                "not found; not answering or failed: library {}",
                failed.join(", ")
            )
        }
    }

    /// Every token present in every library, in library then slot order.
    pub fn tokens(&self) -> Vec<TokenRef> {
        self.libraries
            .iter()
            .flat_map(|l| l.tokens.iter().cloned())
            .collect()
    }

    /// The token with `serial` (the first library that shows it).
    pub fn by_serial(&self, serial: &str) -> Option<TokenRef> {
        self.tokens().into_iter().find(|t| t.serial == serial)
    }

    /// The token in slot `slot`: a library's own slot ID (with `library`
    /// naming the library when several have that slot) or a pkcs11-ha
    /// pass-through slot ID.
    pub fn by_slot(&self, slot: u64, library: Option<&str>) -> Result<TokenRef, String> {
        let tokens = self.tokens();
        let library_matches =
            |t: &TokenRef| library.is_none_or(|l| t.library_name.eq_ignore_ascii_case(l));
        let mut found: Vec<&TokenRef> = tokens
            .iter()
            .filter(|t| t.slot == slot && library_matches(t))
            .collect();
        if found.is_empty() {
            found = tokens
                .iter()
                .filter(|t| t.passthrough_slot() == slot && library_matches(t))
                .collect();
        }
        match found[..] {
            [token] => Ok(token.clone()),
            [] => Err(format!(
                "no token in slot {slot}{}; `pkcs11-ha slots` lists the tokens",
                library
                    .map(|l| format!(" of library {l}"))
                    .unwrap_or_default()
            )),
            _ => Err(format!(
                "slot {slot} has a token in more than one library ({}); name one with --library",
                found
                    .iter()
                    .map(|t| t.library_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        for loaded in &self.libraries {
            if let Ok(library) = &loaded.library {
                library.finalize();
            }
        }
    }
}

/// A library's tokens (their library's position and name are filled in by
/// the caller).
fn tokens_of(library: &MemberLibrary) -> Vec<TokenRef> {
    let Ok(slots) = library.token_slots() else {
        return Vec::new();
    };
    slots
        .into_iter()
        .filter_map(|slot| {
            let info = library.token_info(slot).ok()?;
            Some(TokenRef {
                library: 0,
                library_name: String::new(),
                slot,
                serial: padded_to_string(&info.serialNumber),
                label: padded_to_string(&info.label),
                model: padded_to_string(&info.model),
                manufacturer: padded_to_string(&info.manufacturerID),
                flags: info.flags,
            })
        })
        .collect()
}

/// A session on one member token; closed on drop (logging out first if
/// this session logged in).
pub struct Session<'a> {
    pub library: &'a MemberLibrary,
    pub handle: CK_SESSION_HANDLE,
    logged_in: bool,
}

/// An attribute template: (type, value bytes).
pub type Template = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

pub fn ulong_bytes(value: CK_ULONG) -> Vec<u8> {
    value.to_ne_bytes().to_vec()
}

pub fn bool_bytes(value: bool) -> Vec<u8> {
    vec![if value { CK_TRUE } else { CK_FALSE }]
}

fn raw_template(template: &mut Template) -> Vec<CK_ATTRIBUTE> {
    template
        .iter_mut()
        .map(|(t, v)| CK_ATTRIBUTE {
            type_: *t,
            pValue: v.as_mut_ptr() as *mut _,
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect()
}

impl<'a> Session<'a> {
    /// A read-write session on `slot`.
    pub fn open(library: &'a MemberLibrary, slot: CK_SLOT_ID) -> Result<Session<'a>, CK_RV> {
        let mut handle: CK_SESSION_HANDLE = CK_INVALID_HANDLE;
        ck(call!(
            library,
            C_OpenSession(
                slot,
                CKF_SERIAL_SESSION | CKF_RW_SESSION,
                ptr::null_mut(),
                None,
                &mut handle
            )
        ))?;
        Ok(Session {
            library,
            handle,
            logged_in: false,
        })
    }

    /// One `C_Login`; never retried.
    pub fn login(&mut self, user: CK_USER_TYPE, pin: &[u8]) -> Result<(), CK_RV> {
        let rv = call!(
            self.library,
            C_Login(
                self.handle,
                user,
                pin.as_ptr() as *mut _,
                pin.len() as CK_ULONG
            )
        );
        match rv {
            CKR_OK => {
                self.logged_in = true;
                Ok(())
            }
            rv => Err(rv),
        }
    }

    pub fn logout(&mut self) {
        if std::mem::take(&mut self.logged_in) {
            call!(self.library, C_Logout(self.handle));
        }
    }

    /// Every object this session can see.
    pub fn objects(&self) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        identity::find(self.library, self.handle, &Vec::new())
    }

    /// Objects matching every attribute of `print`.
    pub fn find(&self, print: &Fingerprint) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        identity::find(self.library, self.handle, print)
    }

    /// The object's fingerprint; `None` if the member cannot read it.
    pub fn fingerprint(&self, object: CK_OBJECT_HANDLE) -> Option<Fingerprint> {
        identity::fingerprint(self.library, self.handle, object)
    }

    pub fn attribute(&self, object: CK_OBJECT_HANDLE, t: CK_ATTRIBUTE_TYPE) -> Option<Vec<u8>> {
        identity::read_attribute(self.library, self.handle, object, t)
    }

    pub fn ulong_attribute(
        &self,
        object: CK_OBJECT_HANDLE,
        t: CK_ATTRIBUTE_TYPE,
    ) -> Option<CK_ULONG> {
        self.attribute(object, t).map(|v| identity::ulong_of(&v))
    }

    /// The attributes of `types` the object has, leaving out empty values
    /// (members' defaults, which some members refuse spelled out).
    pub fn template(&self, object: CK_OBJECT_HANDLE, types: &[CK_ATTRIBUTE_TYPE]) -> Template {
        types
            .iter()
            .filter_map(|t| self.attribute(object, *t).map(|v| (*t, v)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    pub fn create(&self, template: &mut Template) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut raw = raw_template(template);
        let mut handle = CK_INVALID_HANDLE;
        ck(call!(
            self.library,
            C_CreateObject(
                self.handle,
                raw.as_mut_ptr(),
                raw.len() as CK_ULONG,
                &mut handle
            )
        ))?;
        Ok(handle)
    }

    pub fn destroy(&self, object: CK_OBJECT_HANDLE) -> Result<(), CK_RV> {
        ck(call!(self.library, C_DestroyObject(self.handle, object)))
    }

    /// `key` wrapped under `wrapping` with `mechanism` (no parameter).
    pub fn wrap(
        &self,
        mechanism: CK_MECHANISM_TYPE,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<Zeroizing<Vec<u8>>, CK_RV> {
        let mut mech = CK_MECHANISM {
            mechanism,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut len: CK_ULONG = 0;
        ck(call!(
            self.library,
            C_WrapKey(
                self.handle,
                &mut mech,
                wrapping,
                key,
                ptr::null_mut(),
                &mut len
            )
        ))?;
        let mut blob = Zeroizing::new(vec![0u8; len as usize]);
        ck(call!(
            self.library,
            C_WrapKey(
                self.handle,
                &mut mech,
                wrapping,
                key,
                blob.as_mut_ptr(),
                &mut len
            )
        ))?;
        blob.truncate(len as usize);
        Ok(blob)
    }

    /// Whether the token can wrap the private key of a pair it generates
    /// with `mechanism` (and `params` as `CKA_EC_PARAMS`) under an AES key
    /// with `CKM_AES_KEY_WRAP_PAD`, as the group moves keys. Everything it
    /// makes for the probe is a session object, destroyed at once.
    pub fn probe_wrap(&self, mechanism: CK_MECHANISM_TYPE, params: &[u8]) -> Result<(), CK_RV> {
        let mut made = Vec::new();
        let answer = self.probe_wrap_into(mechanism, params, &mut made);
        for object in made {
            let _ = self.destroy(object);
        }
        answer
    }

    fn probe_wrap_into(
        &self,
        mechanism: CK_MECHANISM_TYPE,
        params: &[u8],
        made: &mut Vec<CK_OBJECT_HANDLE>,
    ) -> Result<(), CK_RV> {
        let mut aes: Template = vec![
            (CKA_TOKEN, bool_bytes(false)),
            (CKA_WRAP, bool_bytes(true)),
            (CKA_VALUE_LEN, ulong_bytes(32)),
        ];
        let mut public: Template = vec![
            (CKA_TOKEN, bool_bytes(false)),
            (CKA_EC_PARAMS, params.to_vec()),
        ];
        let mut private: Template = vec![
            (CKA_TOKEN, bool_bytes(false)),
            (CKA_EXTRACTABLE, bool_bytes(true)),
        ];
        let (mut aes, mut public, mut private) = (
            raw_template(&mut aes),
            raw_template(&mut public),
            raw_template(&mut private),
        );
        let mut mech = CK_MECHANISM {
            mechanism: CKM_AES_KEY_GEN,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut wrapping = CK_INVALID_HANDLE;
        ck(call!(
            self.library,
            C_GenerateKey(
                self.handle,
                &mut mech,
                aes.as_mut_ptr(),
                aes.len() as CK_ULONG,
                &mut wrapping
            )
        ))?;
        made.push(wrapping);
        mech.mechanism = mechanism;
        let (mut public_key, mut private_key) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
        ck(call!(
            self.library,
            C_GenerateKeyPair(
                self.handle,
                &mut mech,
                public.as_mut_ptr(),
                public.len() as CK_ULONG,
                private.as_mut_ptr(),
                private.len() as CK_ULONG,
                &mut public_key,
                &mut private_key
            )
        ))?;
        made.extend([public_key, private_key]);
        self.wrap(CKM_AES_KEY_WRAP_PAD, wrapping, private_key)
            .map(|_| ())
    }

    pub fn unwrap_key(
        &self,
        mechanism: CK_MECHANISM_TYPE,
        unwrapping: CK_OBJECT_HANDLE,
        blob: &[u8],
        template: &mut Template,
    ) -> Result<CK_OBJECT_HANDLE, CK_RV> {
        let mut mech = CK_MECHANISM {
            mechanism,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut raw = raw_template(template);
        let mut handle = CK_INVALID_HANDLE;
        ck(call!(
            self.library,
            C_UnwrapKey(
                self.handle,
                &mut mech,
                unwrapping,
                blob.as_ptr() as *mut _,
                blob.len() as CK_ULONG,
                raw.as_mut_ptr(),
                raw.len() as CK_ULONG,
                &mut handle
            )
        ))?;
        Ok(handle)
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.logout();
        call!(self.library, C_CloseSession(self.handle));
    }
}

/// The mechanisms of a token's slot, sorted.
pub fn mechanisms(
    library: &MemberLibrary,
    slot: CK_SLOT_ID,
) -> Result<Vec<CK_MECHANISM_TYPE>, CK_RV> {
    let mut list = library.mechanisms(slot).map_err(|e| e.rv)?;
    list.sort_unstable();
    list.dedup();
    Ok(list)
}
