//! A seeded, reproducible randomised driver of the C ABI: random call
//! sequences with invalid arguments (NULL pointers with lengths, absurd
//! lengths, malformed mechanism parameters and templates), stale and junk
//! session and object handles, and sessions closed or logged out by another
//! thread (and the library finalised and initialised again under running
//! calls), against a two-member virtual slot and a pass-through slot. Each
//! block of calls runs in a forked child, so that a crash or a hang is
//! counted, not fatal; the figures are printed, and a crash, a hang or an
//! answer PKCS#11 2.40 does not list for the function fails the test.
//!
//! `FUZZ_ABI_CALLS` (default 20000) sets the number of calls,
//! `FUZZ_ABI_SEED` (default 1) the seed; the same seed makes the same
//! choices, though where another thread disturbs a block, the moment it
//! does (and so the answers that follow) varies from run to run.
//! `FUZZ_ABI_SOFTHSM=1` also runs the driver against SoftHSM alone (its
//! slot only), for comparison: its crashes are printed, not asserted.
//! `scripts/fuzz` runs 10^7 calls.

mod common;

use common::*;
use cryptoki_sys::*;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Calls per forked child.
const BLOCK: u64 = 2_000;
/// A child still running after this has hung.
const BLOCK_PATIENCE: Duration = Duration::from_secs(120);
/// DER OID of prime256v1.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// Out-of-spec answers kept as examples.
const EXAMPLES: usize = 16;

/// What the children report, in memory shared with the parent, so that the
/// calls a crashed child made still count.
#[repr(C)]
struct Tally {
    calls: AtomicU64,
    /// Calls answered `CKR_OK`: the driver does real work, not only errors.
    succeeded: AtomicU64,
    out_of_spec: AtomicU64,
    /// `function index << 32 | rv` of the first distinct out-of-spec
    /// answers (function index 0 is never out of spec with rv 0).
    examples: [AtomicU64; EXAMPLES],
}

impl Tally {
    /// A zeroed tally in an anonymous shared mapping (never unmapped: one
    /// per test run).
    fn shared() -> &'static Tally {
        // SAFETY: a fresh anonymous shared mapping, zero-filled, of the
        // tally's size; all-zero atomics are valid.
        unsafe {
            let p = libc::mmap(
                ptr::null_mut(),
                std::mem::size_of::<Tally>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap for the tally");
            &*(p as *const Tally)
        }
    }

    /// Counts an out-of-spec answer; keeps it as an example unless the
    /// same function gave the same answer before. Only a child's main
    /// thread records.
    fn out_of_spec(&self, function: usize, rv: CK_RV) {
        self.out_of_spec.fetch_add(1, Ordering::Relaxed);
        let example = (function as u64) << 32 | rv;
        for slot in &self.examples {
            match slot.load(Ordering::Relaxed) {
                0 => {
                    slot.store(example, Ordering::Relaxed);
                    return;
                }
                seen if seen == example => return,
                _ => {}
            }
        }
    }
}

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Return values every function may give (PKCS#11 2.40, section 5.1).
const UNIVERSAL: &[CK_RV] = &[
    CKR_OK,
    CKR_GENERAL_ERROR,
    CKR_HOST_MEMORY,
    CKR_FUNCTION_FAILED,
    CKR_CRYPTOKI_NOT_INITIALIZED,
    CKR_ARGUMENTS_BAD,
];
/// Those of every function that reaches a token.
const DEVICE: &[CK_RV] = &[
    CKR_DEVICE_ERROR,
    CKR_DEVICE_MEMORY,
    CKR_DEVICE_REMOVED,
    CKR_TOKEN_NOT_PRESENT,
];
/// Those of every function that takes a session.
const SESSION: &[CK_RV] = &[CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED];
/// Those of cryptographic operations.
const OPERATION: &[CK_RV] = &[
    CKR_OPERATION_ACTIVE,
    CKR_OPERATION_NOT_INITIALIZED,
    CKR_USER_NOT_LOGGED_IN,
    CKR_BUFFER_TOO_SMALL,
    CKR_DATA_INVALID,
    CKR_DATA_LEN_RANGE,
    CKR_ENCRYPTED_DATA_INVALID,
    CKR_ENCRYPTED_DATA_LEN_RANGE,
    CKR_FUNCTION_CANCELED,
    CKR_FUNCTION_REJECTED,
    CKR_TOKEN_RESOURCE_EXCEEDED,
];
/// Those of `*Init` calls and key management.
const KEYED: &[CK_RV] = &[
    CKR_KEY_HANDLE_INVALID,
    CKR_KEY_SIZE_RANGE,
    CKR_KEY_TYPE_INCONSISTENT,
    CKR_KEY_FUNCTION_NOT_PERMITTED,
    CKR_MECHANISM_INVALID,
    CKR_MECHANISM_PARAM_INVALID,
    CKR_OPERATION_ACTIVE,
    CKR_PIN_EXPIRED,
    CKR_USER_NOT_LOGGED_IN,
    CKR_KEY_NOT_WRAPPABLE,
    CKR_KEY_UNEXTRACTABLE,
    CKR_WRAPPING_KEY_HANDLE_INVALID,
    CKR_WRAPPING_KEY_SIZE_RANGE,
    CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_UNWRAPPING_KEY_HANDLE_INVALID,
    CKR_UNWRAPPING_KEY_SIZE_RANGE,
    CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_WRAPPED_KEY_INVALID,
    CKR_WRAPPED_KEY_LEN_RANGE,
    CKR_BUFFER_TOO_SMALL,
    CKR_DOMAIN_PARAMS_INVALID,
    CKR_CURVE_NOT_SUPPORTED,
    CKR_SESSION_READ_ONLY,
    CKR_TEMPLATE_INCOMPLETE,
    CKR_TEMPLATE_INCONSISTENT,
    CKR_ATTRIBUTE_READ_ONLY,
    CKR_ATTRIBUTE_TYPE_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_FUNCTION_CANCELED,
    CKR_FUNCTION_REJECTED,
    CKR_TOKEN_WRITE_PROTECTED,
];
/// Those of object management.
const OBJECTS: &[CK_RV] = &[
    CKR_OBJECT_HANDLE_INVALID,
    CKR_ATTRIBUTE_READ_ONLY,
    CKR_ATTRIBUTE_SENSITIVE,
    CKR_ATTRIBUTE_TYPE_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_ACTION_PROHIBITED,
    CKR_BUFFER_TOO_SMALL,
    CKR_CURVE_NOT_SUPPORTED,
    CKR_DOMAIN_PARAMS_INVALID,
    CKR_INFORMATION_SENSITIVE,
    CKR_OPERATION_ACTIVE,
    CKR_OPERATION_NOT_INITIALIZED,
    CKR_SESSION_READ_ONLY,
    CKR_TEMPLATE_INCOMPLETE,
    CKR_TEMPLATE_INCONSISTENT,
    CKR_TOKEN_WRITE_PROTECTED,
    CKR_USER_NOT_LOGGED_IN,
];

/// The functions the driver calls, by index, with the return values
/// PKCS#11 2.40 allows each beyond [`UNIVERSAL`].
const FUNCTIONS: &[(&str, &[&[CK_RV]])] = &[
    ("C_GetSlotList", &[&[CKR_BUFFER_TOO_SMALL]]),
    ("C_GetSlotInfo", &[DEVICE, &[CKR_SLOT_ID_INVALID]]),
    (
        "C_GetTokenInfo",
        &[DEVICE, &[CKR_SLOT_ID_INVALID, CKR_TOKEN_NOT_RECOGNIZED]],
    ),
    (
        "C_GetMechanismList",
        &[
            DEVICE,
            &[
                CKR_SLOT_ID_INVALID,
                CKR_TOKEN_NOT_RECOGNIZED,
                CKR_BUFFER_TOO_SMALL,
            ],
        ],
    ),
    (
        "C_GetMechanismInfo",
        &[
            DEVICE,
            &[
                CKR_SLOT_ID_INVALID,
                CKR_TOKEN_NOT_RECOGNIZED,
                CKR_MECHANISM_INVALID,
            ],
        ],
    ),
    (
        "C_OpenSession",
        &[
            DEVICE,
            &[
                CKR_SLOT_ID_INVALID,
                CKR_TOKEN_NOT_RECOGNIZED,
                CKR_SESSION_COUNT,
                CKR_SESSION_PARALLEL_NOT_SUPPORTED,
                CKR_SESSION_READ_WRITE_SO_EXISTS,
                CKR_TOKEN_WRITE_PROTECTED,
            ],
        ],
    ),
    ("C_CloseSession", &[DEVICE, SESSION]),
    ("C_CloseAllSessions", &[DEVICE, &[CKR_SLOT_ID_INVALID]]),
    ("C_GetSessionInfo", &[DEVICE, SESSION]),
    (
        "C_Login",
        &[
            DEVICE,
            SESSION,
            &[
                CKR_OPERATION_NOT_INITIALIZED,
                CKR_PIN_INCORRECT,
                CKR_PIN_LOCKED,
                CKR_SESSION_READ_ONLY_EXISTS,
                CKR_USER_ALREADY_LOGGED_IN,
                CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
                CKR_USER_PIN_NOT_INITIALIZED,
                CKR_USER_TOO_MANY_TYPES,
                CKR_USER_TYPE_INVALID,
                CKR_FUNCTION_CANCELED,
            ],
        ],
    ),
    ("C_Logout", &[DEVICE, SESSION, &[CKR_USER_NOT_LOGGED_IN]]),
    ("C_CreateObject", &[DEVICE, SESSION, OBJECTS]),
    ("C_CopyObject", &[DEVICE, SESSION, OBJECTS]),
    ("C_DestroyObject", &[DEVICE, SESSION, OBJECTS]),
    ("C_GetObjectSize", &[DEVICE, SESSION, OBJECTS]),
    ("C_GetAttributeValue", &[DEVICE, SESSION, OBJECTS]),
    ("C_SetAttributeValue", &[DEVICE, SESSION, OBJECTS]),
    ("C_FindObjectsInit", &[DEVICE, SESSION, OBJECTS]),
    ("C_FindObjects", &[DEVICE, SESSION, OBJECTS]),
    ("C_FindObjectsFinal", &[DEVICE, SESSION, OBJECTS]),
    ("C_EncryptInit", &[DEVICE, SESSION, KEYED]),
    ("C_Encrypt", &[DEVICE, SESSION, OPERATION]),
    ("C_DecryptInit", &[DEVICE, SESSION, KEYED]),
    ("C_Decrypt", &[DEVICE, SESSION, OPERATION]),
    ("C_DigestInit", &[DEVICE, SESSION, KEYED]),
    ("C_Digest", &[DEVICE, SESSION, OPERATION]),
    ("C_DigestUpdate", &[DEVICE, SESSION, OPERATION]),
    ("C_SignInit", &[DEVICE, SESSION, KEYED]),
    ("C_Sign", &[DEVICE, SESSION, OPERATION]),
    ("C_VerifyInit", &[DEVICE, SESSION, KEYED]),
    (
        "C_Verify",
        &[
            DEVICE,
            SESSION,
            OPERATION,
            &[CKR_SIGNATURE_INVALID, CKR_SIGNATURE_LEN_RANGE],
        ],
    ),
    ("C_GenerateKey", &[DEVICE, SESSION, KEYED]),
    ("C_GenerateKeyPair", &[DEVICE, SESSION, KEYED]),
    ("C_WrapKey", &[DEVICE, SESSION, KEYED]),
    ("C_UnwrapKey", &[DEVICE, SESSION, KEYED]),
    ("C_DeriveKey", &[DEVICE, SESSION, KEYED]),
    (
        "C_GenerateRandom",
        &[DEVICE, SESSION, &[CKR_RANDOM_NO_RNG, CKR_OPERATION_ACTIVE]],
    ),
];

fn allowed(function: usize, rv: CK_RV) -> bool {
    UNIVERSAL.contains(&rv) || FUNCTIONS[function].1.iter().any(|set| set.contains(&rv))
}

/// The module under test, loaded in the parent before any fork.
struct Module {
    list: &'static CK_FUNCTION_LIST,
    _library: libloading::Library,
}

impl Module {
    fn load(path: &std::path::Path) -> Module {
        // SAFETY: loading a PKCS#11 module runs its constructors only;
        // C_GetFunctionList has this signature and its table is static in
        // a library kept loaded beside it.
        unsafe {
            let library = libloading::Library::new(path).expect("load the module");
            let get = *library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .expect("C_GetFunctionList exported");
            let mut list = ptr::null_mut();
            assert_eq!(get.expect("not NULL")(&mut list), CKR_OK);
            Module {
                list: &*list,
                _library: library,
            }
        }
    }
}

/// Everything one block's calls point into: valid buffers of known size,
/// mechanism parameters, templates. Pointers handed to the module always
/// point here with a length that fits, or are NULL, or come with an absurd
/// length the module must refuse before reading.
struct Arena {
    bytes: Vec<u8>,
    /// Words, so that arrays of `CK_ULONG` written here are aligned.
    out: Vec<u64>,
    out_len: CK_ULONG,
    iv: [u8; 16],
    aad: [u8; 64],
    gcm: CK_GCM_PARAMS,
    ctr: CK_AES_CTR_PARAMS,
    oaep: CK_RSA_PKCS_OAEP_PARAMS,
    ecdh: CK_ECDH1_DERIVE_PARAMS,
    point: [u8; 65],
    mechanism: CK_MECHANISM,
    values: [u64; 4],
    label: [u8; 8],
    ec_params: [u8; 10],
    template: Vec<CK_ATTRIBUTE>,
    template2: Vec<CK_ATTRIBUTE>,
    handles: [CK_OBJECT_HANDLE; 8],
    count: CK_ULONG,
    /// Room for any of the info structs.
    info: [u64; 64],
}

const ABSURD: CK_ULONG = 1 << 40;
const OUT_SIZE: usize = 4096;

impl Arena {
    fn new() -> Box<Arena> {
        Box::new(Arena {
            bytes: (0..OUT_SIZE).map(|i| i as u8).collect(),
            out: vec![0; OUT_SIZE / 8],
            out_len: 0,
            iv: [7; 16],
            aad: [9; 64],
            gcm: Default::default(),
            ctr: Default::default(),
            oaep: Default::default(),
            ecdh: Default::default(),
            point: [0; 65],
            mechanism: Default::default(),
            values: [0; 4],
            label: [0; 8],
            ec_params: P256,
            template: Vec::with_capacity(8),
            template2: Vec::with_capacity(8),
            handles: [0; 8],
            count: 0,
            info: [0; 64],
        })
    }

    /// A length for a buffer of `OUT_SIZE`: mostly fitting, sometimes 0.
    fn fitting_len(rng: &mut Rng) -> CK_ULONG {
        rng.pick(&[0, 1, 16, 32, 64, 100, 256, OUT_SIZE as CK_ULONG])
    }

    /// An input buffer: valid, empty, or NULL with a length.
    fn input(&mut self, rng: &mut Rng) -> (*mut u8, CK_ULONG) {
        match rng.below(10) {
            0 => (ptr::null_mut(), 0),
            1 => (ptr::null_mut(), Self::fitting_len(rng).max(1)),
            _ => (self.bytes.as_mut_ptr(), Self::fitting_len(rng)),
        }
    }

    /// An output buffer and its length pointer under the two-call rules:
    /// NULL (a length query), a buffer of the stated room, or no length
    /// pointer at all.
    fn output(&mut self, rng: &mut Rng) -> (*mut u8, *mut CK_ULONG) {
        self.out_len = Self::fitting_len(rng);
        let len_ptr = if rng.chance(5) {
            ptr::null_mut()
        } else {
            &mut self.out_len as *mut _
        };
        let buffer = if rng.chance(25) {
            ptr::null_mut()
        } else {
            self.out.as_mut_ptr() as *mut u8
        };
        (buffer, len_ptr)
    }

    /// A mechanism, well-formed or broken in one of the ways that crash
    /// members.
    fn mechanism(&mut self, rng: &mut Rng) -> *mut CK_MECHANISM {
        if rng.chance(3) {
            return ptr::null_mut();
        }
        let broken = rng.chance(40);
        let (mechanism, parameter, len): (CK_MECHANISM_TYPE, *mut c_void, usize) =
            match rng.below(13) {
                0 => {
                    self.gcm = CK_GCM_PARAMS {
                        pIv: self.iv.as_mut_ptr(),
                        ulIvLen: 12,
                        ulIvBits: 96,
                        pAAD: self.aad.as_mut_ptr(),
                        ulAADLen: rng.below(64) as CK_ULONG,
                        ulTagBits: 128,
                    };
                    if broken {
                        match rng.below(4) {
                            0 => self.gcm.pIv = ptr::null_mut(),
                            1 => self.gcm.pAAD = ptr::null_mut(),
                            2 => self.gcm.ulIvLen = ABSURD,
                            _ => self.gcm.ulAADLen = ABSURD,
                        }
                        if self.gcm.pAAD.is_null() {
                            self.gcm.ulAADLen = 16;
                        }
                    }
                    let p = &mut self.gcm as *mut _ as *mut c_void;
                    (CKM_AES_GCM, p, std::mem::size_of::<CK_GCM_PARAMS>())
                }
                1 => (CKM_AES_CBC_PAD, self.iv.as_mut_ptr() as *mut c_void, 16),
                2 => (CKM_AES_CBC, self.iv.as_mut_ptr() as *mut c_void, 16),
                3 => {
                    self.ctr.ulCounterBits = if broken { 0 } else { 32 };
                    let p = &mut self.ctr as *mut _ as *mut c_void;
                    (CKM_AES_CTR, p, std::mem::size_of::<CK_AES_CTR_PARAMS>())
                }
                4 => (CKM_ECDSA, ptr::null_mut(), 0),
                5 => (CKM_SHA256, ptr::null_mut(), 0),
                6 => {
                    self.oaep = CK_RSA_PKCS_OAEP_PARAMS {
                        hashAlg: CKM_SHA256,
                        mgf: CKG_MGF1_SHA256,
                        source: CKZ_DATA_SPECIFIED,
                        pSourceData: ptr::null_mut(),
                        ulSourceDataLen: if broken { 8 } else { 0 },
                    };
                    let p = &mut self.oaep as *mut _ as *mut c_void;
                    (
                        CKM_RSA_PKCS_OAEP,
                        p,
                        std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>(),
                    )
                }
                7 => {
                    self.point[0] = 4;
                    self.ecdh = CK_ECDH1_DERIVE_PARAMS {
                        kdf: CKD_NULL,
                        ulSharedDataLen: 0,
                        pSharedData: ptr::null_mut(),
                        ulPublicDataLen: 65,
                        pPublicData: if broken {
                            ptr::null_mut()
                        } else {
                            self.point.as_mut_ptr()
                        },
                    };
                    let p = &mut self.ecdh as *mut _ as *mut c_void;
                    (
                        CKM_ECDH1_DERIVE,
                        p,
                        std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>(),
                    )
                }
                8 => (CKM_AES_KEY_WRAP_PAD, ptr::null_mut(), 0),
                9 => (CKM_EC_KEY_PAIR_GEN, ptr::null_mut(), 0),
                10 => (CKM_AES_KEY_GEN, ptr::null_mut(), 0),
                11 => (CKM_SHA256_HMAC, ptr::null_mut(), 0),
                _ => (rng.next() % 0x2000, ptr::null_mut(), 0),
            };
        let mut len = len as CK_ULONG;
        let mut parameter = parameter;
        if broken && rng.chance(50) {
            match rng.below(3) {
                0 => parameter = ptr::null_mut(),
                1 => len = len.saturating_sub(4),
                _ => len = ABSURD,
            }
            if parameter.is_null() && len == 0 {
                len = 16;
            }
        }
        self.mechanism = CK_MECHANISM {
            mechanism,
            pParameter: parameter,
            ulParameterLen: len,
        };
        &mut self.mechanism
    }

    /// A template in `which` (0 or 1): plausible attributes, sometimes
    /// with a NULL value that claims a length or an absurd length.
    fn template(&mut self, rng: &mut Rng, which: usize) -> (*mut CK_ATTRIBUTE, CK_ULONG) {
        if rng.chance(5) {
            return (ptr::null_mut(), rng.pick(&[0, 2]));
        }
        self.values = [
            rng.pick(&[CKO_DATA, CKO_SECRET_KEY, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY]),
            rng.pick(&[CKK_AES, CKK_EC, CKK_GENERIC_SECRET]),
            rng.pick(&[16, 32]),
            CK_TRUE as u64 | (CK_FALSE as u64) << 8,
        ];
        self.label.copy_from_slice(b"fuzzabi!");
        let base = self.values.as_mut_ptr() as *mut u8;
        let attr = |type_, p: *mut u8, len: usize| CK_ATTRIBUTE {
            type_,
            pValue: p as *mut c_void,
            ulValueLen: len as CK_ULONG,
        };
        let word = std::mem::size_of::<u64>();
        // SAFETY (the `add`s): offsets within `values`.
        let choices = unsafe {
            [
                attr(CKA_CLASS, base, word),
                attr(CKA_KEY_TYPE, base.add(word), word),
                attr(CKA_VALUE_LEN, base.add(2 * word), word),
                attr(CKA_TOKEN, base.add(3 * word + 1), 1),
                attr(CKA_SIGN, base.add(3 * word), 1),
                attr(CKA_ENCRYPT, base.add(3 * word), 1),
                attr(CKA_EXTRACTABLE, base.add(3 * word), 1),
                attr(CKA_LABEL, self.label.as_mut_ptr(), 8),
                attr(CKA_VALUE, self.bytes.as_mut_ptr(), 32),
                attr(CKA_EC_PARAMS, self.ec_params.as_mut_ptr(), P256.len()),
            ]
        };
        let list = if which == 0 {
            &mut self.template
        } else {
            &mut self.template2
        };
        list.clear();
        for _ in 0..rng.below(6) {
            let mut a = choices[rng.below(choices.len())];
            if rng.chance(8) {
                match rng.below(2) {
                    0 => a.pValue = ptr::null_mut(),
                    _ => a.ulValueLen = ABSURD,
                }
            }
            list.push(a);
        }
        (list.as_mut_ptr(), list.len() as CK_ULONG)
    }
}

impl Arena {
    /// A `C_GetAttributeValue` template: each value NULL (a length query)
    /// or a buffer of the room it states, since the module writes there.
    fn query_template(&mut self, rng: &mut Rng) -> (*mut CK_ATTRIBUTE, CK_ULONG) {
        const ROOM: usize = 256;
        self.template.clear();
        for i in 0..rng.below(5) {
            let type_ = rng.pick(&[
                CKA_CLASS,
                CKA_LABEL,
                CKA_VALUE,
                CKA_EC_POINT,
                CKA_KEY_TYPE,
                CKA_VALUE_LEN,
                0x7fff_0000,
            ]);
            let (value, len) = if rng.chance(40) {
                (ptr::null_mut(), 0)
            } else {
                // SAFETY: `i` < 5, so the slice lies within `bytes`.
                let at = unsafe { self.bytes.as_mut_ptr().add(i * ROOM) };
                (at as *mut c_void, rng.below(ROOM + 1) as CK_ULONG)
            };
            self.template.push(CK_ATTRIBUTE {
                type_,
                pValue: value,
                ulValueLen: len,
            });
        }
        (self.template.as_mut_ptr(), self.template.len() as CK_ULONG)
    }
}

/// Handles the block knows: live, stale (closed or destroyed) and junk.
struct Handles {
    slots: Vec<CK_SLOT_ID>,
    sessions: Arc<Mutex<Vec<CK_SESSION_HANDLE>>>,
    /// Keys made at the start, on every slot.
    keys: Vec<CK_OBJECT_HANDLE>,
    objects: Vec<CK_OBJECT_HANDLE>,
}

impl Handles {
    fn slot(&self, rng: &mut Rng) -> CK_SLOT_ID {
        if rng.chance(10) {
            rng.pick(&[0x7fff_ffff, CK_SLOT_ID::MAX, 0x1000, 12345])
        } else {
            rng.pick(&self.slots)
        }
    }
    fn session(&self, rng: &mut Rng) -> CK_SESSION_HANDLE {
        if rng.chance(8) {
            return rng.pick(&[0, CK_SESSION_HANDLE::MAX, 0xdead_beef]);
        }
        let sessions = self.sessions.lock().unwrap();
        sessions[rng.below(sessions.len())]
    }
    fn object(&self, rng: &mut Rng) -> CK_OBJECT_HANDLE {
        if rng.chance(8) {
            return rng.pick(&[0, CK_OBJECT_HANDLE::MAX, 0x7777_7777, 3]);
        }
        if rng.chance(50) || self.objects.is_empty() {
            return rng.pick(&self.keys);
        }
        self.objects[rng.below(self.objects.len())]
    }
    fn add_object(&mut self, handle: CK_OBJECT_HANDLE) {
        if self.objects.len() < 64 {
            self.objects.push(handle);
        } else {
            let i = handle as usize % self.objects.len();
            self.objects[i] = handle;
        }
    }
}

/// One random call; its function index and answer.
fn one_call(
    f: &CK_FUNCTION_LIST,
    rng: &mut Rng,
    arena: &mut Arena,
    handles: &mut Handles,
) -> (usize, CK_RV) {
    let function = rng.below(FUNCTIONS.len());
    let s = handles.session(rng);
    let o = handles.object(rng);
    let pin = USER_PIN.as_bytes();
    let mut made: CK_OBJECT_HANDLE = 0;
    let mut made2: CK_OBJECT_HANDLE = 0;
    // SAFETY: every pointer is NULL, or points into `arena` or a local
    // with room for the length it is given, except absurd lengths, which
    // the module must refuse before reading.
    let rv = unsafe {
        match function {
            0 => {
                let (out, len) = arena.output(rng);
                f.C_GetSlotList.unwrap()(
                    CK_TRUE,
                    out as *mut CK_SLOT_ID,
                    len_for::<CK_SLOT_ID>(len),
                )
            }
            1 => f.C_GetSlotInfo.unwrap()(handles.slot(rng), arena.info.as_mut_ptr() as *mut _),
            2 => f.C_GetTokenInfo.unwrap()(handles.slot(rng), arena.info.as_mut_ptr() as *mut _),
            3 => {
                let (out, len) = arena.output(rng);
                f.C_GetMechanismList.unwrap()(
                    handles.slot(rng),
                    out as *mut CK_MECHANISM_TYPE,
                    len_for::<CK_MECHANISM_TYPE>(len),
                )
            }
            4 => f.C_GetMechanismInfo.unwrap()(
                handles.slot(rng),
                rng.pick(&[CKM_AES_GCM, CKM_ECDSA, CKM_SHA256, 0x7fff_0000]),
                arena.info.as_mut_ptr() as *mut _,
            ),
            5 => {
                let mut session = 0;
                let flags = rng.pick(&[CKF_SERIAL_SESSION | CKF_RW_SESSION, CKF_SERIAL_SESSION, 0]);
                let rv = f.C_OpenSession.unwrap()(
                    handles.slot(rng),
                    flags,
                    ptr::null_mut(),
                    None,
                    &mut session,
                );
                if rv == CKR_OK {
                    let mut sessions = handles.sessions.lock().unwrap();
                    if sessions.len() < 32 {
                        sessions.push(session);
                    } else {
                        let i = rng.below(sessions.len());
                        sessions[i] = session;
                    }
                }
                rv
            }
            6 => f.C_CloseSession.unwrap()(s),
            7 => f.C_CloseAllSessions.unwrap()(handles.slot(rng)),
            8 => f.C_GetSessionInfo.unwrap()(s, arena.info.as_mut_ptr() as *mut _),
            9 => {
                let (p, l) = match rng.below(4) {
                    0 => (ptr::null_mut(), 4),
                    1 => (b"0000".as_ptr() as *mut u8, 4),
                    _ => (pin.as_ptr() as *mut u8, pin.len() as CK_ULONG),
                };
                f.C_Login.unwrap()(s, rng.pick(&[CKU_USER, CKU_USER, 7]), p, l)
            }
            10 => f.C_Logout.unwrap()(s),
            11 => {
                let (t, n) = arena.template(rng, 0);
                let rv = f.C_CreateObject.unwrap()(s, t, n, &mut made);
                if rv == CKR_OK {
                    handles.add_object(made);
                }
                rv
            }
            12 => {
                let (t, n) = arena.template(rng, 0);
                f.C_CopyObject.unwrap()(s, o, t, n, &mut made)
            }
            13 => f.C_DestroyObject.unwrap()(s, o),
            14 => {
                let mut size = 0;
                f.C_GetObjectSize.unwrap()(s, o, &mut size)
            }
            15 => {
                let (t, n) = arena.query_template(rng);
                f.C_GetAttributeValue.unwrap()(s, o, t, n)
            }
            16 => {
                let (t, n) = arena.template(rng, 0);
                f.C_SetAttributeValue.unwrap()(s, o, t, n)
            }
            17 => {
                let (t, n) = arena.template(rng, 0);
                f.C_FindObjectsInit.unwrap()(s, t, n)
            }
            18 => {
                let max = rng.pick(&[0, 1, 8]);
                let found = if max == 0 && rng.chance(50) {
                    ptr::null_mut()
                } else {
                    arena.handles.as_mut_ptr()
                };
                let rv = f.C_FindObjects.unwrap()(s, found, max, &mut arena.count);
                if rv == CKR_OK {
                    for i in 0..(arena.count as usize).min(max as usize) {
                        handles.add_object(arena.handles[i]);
                    }
                }
                rv
            }
            19 => f.C_FindObjectsFinal.unwrap()(s),
            20 => f.C_EncryptInit.unwrap()(s, arena.mechanism(rng), o),
            21 => {
                let (i, il) = arena.input(rng);
                let (out, ol) = arena.output(rng);
                f.C_Encrypt.unwrap()(s, i, il, out, ol)
            }
            22 => f.C_DecryptInit.unwrap()(s, arena.mechanism(rng), o),
            23 => {
                let (i, il) = arena.input(rng);
                let (out, ol) = arena.output(rng);
                f.C_Decrypt.unwrap()(s, i, il, out, ol)
            }
            24 => f.C_DigestInit.unwrap()(s, arena.mechanism(rng)),
            25 => {
                let (i, il) = arena.input(rng);
                let (out, ol) = arena.output(rng);
                f.C_Digest.unwrap()(s, i, il, out, ol)
            }
            26 => {
                let (i, il) = arena.input(rng);
                f.C_DigestUpdate.unwrap()(s, i, il)
            }
            27 => f.C_SignInit.unwrap()(s, arena.mechanism(rng), o),
            28 => {
                let (i, il) = arena.input(rng);
                let (out, ol) = arena.output(rng);
                f.C_Sign.unwrap()(s, i, il, out, ol)
            }
            29 => f.C_VerifyInit.unwrap()(s, arena.mechanism(rng), o),
            30 => {
                let (i, il) = arena.input(rng);
                let (sig, sl) = arena.input(rng);
                f.C_Verify.unwrap()(s, i, il, sig, sl)
            }
            31 => {
                let m = arena.mechanism(rng);
                let (t, n) = arena.template(rng, 0);
                let rv = f.C_GenerateKey.unwrap()(s, m, t, n, &mut made);
                if rv == CKR_OK {
                    handles.add_object(made);
                }
                rv
            }
            32 => {
                let m = arena.mechanism(rng);
                let (t, n) = arena.template(rng, 0);
                let (t2, n2) = arena.template(rng, 1);
                let rv = f.C_GenerateKeyPair.unwrap()(s, m, t, n, t2, n2, &mut made, &mut made2);
                if rv == CKR_OK {
                    handles.add_object(made);
                    handles.add_object(made2);
                }
                rv
            }
            33 => {
                let m = arena.mechanism(rng);
                let (out, ol) = arena.output(rng);
                f.C_WrapKey.unwrap()(s, m, handles.object(rng), o, out, ol)
            }
            34 => {
                let m = arena.mechanism(rng);
                let (i, il) = arena.input(rng);
                let (t, n) = arena.template(rng, 0);
                f.C_UnwrapKey.unwrap()(s, m, handles.object(rng), i, il, t, n, &mut made)
            }
            35 => {
                let m = arena.mechanism(rng);
                let (t, n) = arena.template(rng, 0);
                f.C_DeriveKey.unwrap()(s, m, o, t, n, &mut made)
            }
            _ => {
                let (out, ol) = arena.input(rng);
                f.C_GenerateRandom.unwrap()(s, out, ol)
            }
        }
    };
    (function, rv)
}

/// An output length pointer for an array of `T` in the `OUT_SIZE` buffer:
/// the byte room given as an element count.
fn len_for<T>(len: *mut CK_ULONG) -> *mut CK_ULONG {
    if !len.is_null() {
        // SAFETY: points to the arena's length.
        unsafe { *len /= std::mem::size_of::<T>() as CK_ULONG };
    }
    len
}

/// An AES key and an EC key pair, session objects: the keys that let
/// broken mechanism parameters get past the key checks to the mechanism.
fn make_keys(f: &CK_FUNCTION_LIST, session: CK_SESSION_HANDLE) -> Option<[CK_OBJECT_HANDLE; 3]> {
    let yes: CK_BBOOL = CK_TRUE;
    let no: CK_BBOOL = CK_FALSE;
    let value_len: CK_ULONG = 32;
    let attr = |type_, value: *const c_void, len: usize| CK_ATTRIBUTE {
        type_,
        pValue: value as *mut c_void,
        ulValueLen: len as CK_ULONG,
    };
    let flag = |type_, value: &CK_BBOOL| attr(type_, value as *const _ as *const c_void, 1);
    let aes = [
        attr(CKA_VALUE_LEN, &value_len as *const _ as *const c_void, 8),
        flag(CKA_TOKEN, &no),
        flag(CKA_ENCRYPT, &yes),
        flag(CKA_DECRYPT, &yes),
        flag(CKA_DERIVE, &yes),
    ];
    let public = [
        attr(CKA_EC_PARAMS, P256.as_ptr() as *const c_void, P256.len()),
        flag(CKA_TOKEN, &no),
        flag(CKA_VERIFY, &yes),
    ];
    let private = [
        flag(CKA_TOKEN, &no),
        flag(CKA_SIGN, &yes),
        flag(CKA_DERIVE, &yes),
    ];
    let mut keys = [0; 3];
    let [key, public_key, private_key] = &mut keys;
    let mut aes_gen = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut ec_gen = CK_MECHANISM {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        ..aes_gen
    };
    // SAFETY: the templates and outputs are live locals of the stated
    // sizes; the module only reads the templates.
    unsafe {
        let rv = f.C_GenerateKey.unwrap()(session, &mut aes_gen, aes.as_ptr() as *mut _, 5, key);
        let rv2 = f.C_GenerateKeyPair.unwrap()(
            session,
            &mut ec_gen,
            public.as_ptr() as *mut _,
            3,
            private.as_ptr() as *mut _,
            3,
            public_key,
            private_key,
        );
        (rv == CKR_OK && rv2 == CKR_OK).then_some(keys)
    }
}

/// Exit codes of a child that could not do its work (not a crash).
const CHILD_SETUP_FAILED: i32 = 98;
const CHILD_PANICKED: i32 = 99;

/// A forked child's work: initialise, log in, make keys, run `calls`
/// random calls (with a second thread closing and logging out now and
/// then), finalise. Never returns.
fn child(module: &Module, slots: &[CK_SLOT_ID], seed: u64, calls: u64, tally: &Tally) -> ! {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let f = module.list;
        let mut rng = Rng(seed);
        let mut args = init_args(CKF_OS_LOCKING_OK);
        // SAFETY: valid arguments; the calls below pass live locals.
        unsafe {
            if f.C_Initialize.unwrap()(&mut args as *mut _ as *mut c_void) != CKR_OK {
                return CHILD_SETUP_FAILED;
            }
        }
        let mut handles = Handles {
            slots: slots.to_vec(),
            sessions: Arc::new(Mutex::new(Vec::new())),
            keys: Vec::new(),
            objects: Vec::new(),
        };
        for &slot in slots {
            let mut session = 0;
            let pin = USER_PIN.as_bytes();
            // SAFETY: as above.
            unsafe {
                let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
                if f.C_OpenSession.unwrap()(slot, flags, ptr::null_mut(), None, &mut session)
                    != CKR_OK
                {
                    return CHILD_SETUP_FAILED;
                }
                let rv = f.C_Login.unwrap()(
                    session,
                    CKU_USER,
                    pin.as_ptr() as *mut _,
                    pin.len() as CK_ULONG,
                );
                if rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN {
                    return CHILD_SETUP_FAILED;
                }
            }
            handles.sessions.lock().unwrap().push(session);
            match make_keys(f, session) {
                Some(keys) => handles.keys.extend(keys),
                None => return CHILD_SETUP_FAILED,
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let disturber = rng.chance(50).then(|| {
            let sessions = Arc::clone(&handles.sessions);
            let done = Arc::clone(&done);
            let mut rng = Rng(seed ^ 0x5eed);
            let f: &'static CK_FUNCTION_LIST = module.list;
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(rng.below(2_000) as u64));
                    let s = {
                        let sessions = sessions.lock().unwrap();
                        sessions[rng.below(sessions.len())]
                    };
                    // SAFETY: calls with no pointers, or valid arguments.
                    unsafe {
                        match rng.below(100) {
                            0..=74 => {
                                f.C_CloseSession.unwrap()(s);
                            }
                            75..=94 => {
                                f.C_Logout.unwrap()(s);
                            }
                            _ => {
                                f.C_Finalize.unwrap()(ptr::null_mut());
                                let mut args = init_args(CKF_OS_LOCKING_OK);
                                f.C_Initialize.unwrap()(&mut args as *mut _ as *mut c_void);
                            }
                        }
                    }
                }
            })
        });
        let mut arena = Arena::new();
        for _ in 0..calls {
            let (function, rv) = one_call(f, &mut rng, &mut arena, &mut handles);
            tally.calls.fetch_add(1, Ordering::Relaxed);
            if rv == CKR_OK {
                tally.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            if !allowed(function, rv) {
                tally.out_of_spec(function, rv);
            }
        }
        done.store(true, Ordering::Relaxed);
        if let Some(d) = disturber {
            let _ = d.join();
        }
        // SAFETY: no argument.
        unsafe { f.C_Finalize.unwrap()(ptr::null_mut()) };
        0
    }));
    let code = outcome.unwrap_or(CHILD_PANICKED);
    // SAFETY: ends the child at once, running nothing of the parent's.
    unsafe { libc::_exit(code) }
}

/// What one run found.
#[derive(Debug, Default)]
struct Figures {
    calls: u64,
    succeeded: u64,
    blocks: u64,
    crashes: u64,
    hangs: u64,
    driver_failures: u64,
    out_of_spec: u64,
    examples: Vec<String>,
}

/// Runs `calls` calls in blocks of [`BLOCK`], each in a forked child.
fn run(module: &Module, slots: &[CK_SLOT_ID], seed: u64, calls: u64) -> Figures {
    let tally = Tally::shared();
    let mut figures = Figures::default();
    let blocks = calls.div_ceil(BLOCK);
    for block in 0..blocks {
        let block_seed = seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let n = BLOCK.min(calls - block * BLOCK);
        // SAFETY: the child only runs `child`, which ends in `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            child(module, slots, block_seed, n, tally);
        }
        figures.blocks += 1;
        let deadline = Instant::now() + BLOCK_PATIENCE;
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child without blocking.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got == pid {
                break;
            }
            if Instant::now() >= deadline {
                // SAFETY: our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                figures.hangs += 1;
                eprintln!("fuzz_abi: block {block} (seed {block_seed:#x}) hung");
                status = 0;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if libc::WIFSIGNALED(status) {
            figures.crashes += 1;
            eprintln!(
                "fuzz_abi: block {block} (seed {block_seed:#x}) died of signal {}",
                libc::WTERMSIG(status)
            );
        } else if libc::WIFEXITED(status) {
            match libc::WEXITSTATUS(status) {
                0 => {}
                CHILD_SETUP_FAILED | CHILD_PANICKED => {
                    figures.driver_failures += 1;
                    eprintln!(
                        "fuzz_abi: block {block} (seed {block_seed:#x}) driver failure {}",
                        libc::WEXITSTATUS(status)
                    );
                }
                code => {
                    figures.crashes += 1;
                    eprintln!("fuzz_abi: block {block} (seed {block_seed:#x}) exited with {code}");
                }
            }
        }
    }
    figures.calls = tally.calls.load(Ordering::Relaxed);
    figures.succeeded = tally.succeeded.load(Ordering::Relaxed);
    figures.out_of_spec = tally.out_of_spec.load(Ordering::Relaxed);
    figures.examples = tally
        .examples
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        .filter(|&e| e != 0)
        .map(|e| {
            format!(
                "{} -> {:#x}",
                FUNCTIONS[(e >> 32) as usize].0,
                e & 0xffff_ffff
            )
        })
        .collect();
    figures
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_c_calls_crash_nothing_hang_nothing_and_answer_within_the_spec() {
    let _guard = serial_guard();
    let calls = env_u64("FUZZ_ABI_CALLS", 20_000);
    let seed = env_u64("FUZZ_ABI_SEED", 1);
    let hsm = SoftHsm::new(&["member0", "member1", "plain"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let members = [
        hsm.token("member0").serial.clone(),
        hsm.token("member1").serial.clone(),
    ];
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    );
    hsm.activate();
    activate_config(&config);
    let plain = hsm.token("plain").slot_id;
    let ha = Module::load(&library_path());
    let slots = [0, passthrough_slot_id(SOFTHSM_LIB_NAME, plain)];
    let started = Instant::now();
    let figures = run(&ha, &slots, seed, calls);
    eprintln!(
        "fuzz_abi pkcs11-ha (seed {seed}): {figures:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if std::env::var_os("FUZZ_ABI_SOFTHSM").is_some() {
        let softhsm = Module::load(std::path::Path::new(SOFTHSM_LIB));
        let started = Instant::now();
        let alone = run(&softhsm, &[plain], seed, calls);
        eprintln!(
            "fuzz_abi SoftHSM alone (seed {seed}): {alone:?} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    assert_eq!(figures.calls, calls, "every call was made: {figures:?}");
    assert_eq!(figures.driver_failures, 0, "{figures:?}");
    assert_eq!(figures.crashes, 0, "{figures:?}");
    assert_eq!(figures.hangs, 0, "{figures:?}");
    assert_eq!(
        figures.out_of_spec, 0,
        "answers PKCS#11 2.40 does not list for the function: {figures:?}"
    );
}
