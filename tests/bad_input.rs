//! Bad input at the C level: NULL pointers, short and empty buffers, invalid
//! session, object and slot handles, calls out of order, and bad
//! `C_Initialize` arguments -- what the `cryptoki` crate never sends. The
//! built library is loaded with `libloading` and driven through its raw
//! `CK_FUNCTION_LIST`.
//!
//! Each expectation is the CK_RV PKCS#11 2.40 requires. Where the
//! specification leaves the answer to the token, SoftHSM is asked the same
//! question directly first (before pkcs11-ha is initialised: both share one
//! SoftHSM instance) and pkcs11-ha must give the same answer.
//!
//! Every test runs on a virtual slot (a two-member group) and, where it
//! makes sense, on a pass-through slot of a third token outside the group,
//! so logins on the two do not interfere.

mod common;

use std::ffi::{c_void, CStr};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{MutexGuard, OnceLock};

use common::*;
use cryptoki_sys::*;
use libloading::Library;

// ---------------------------------------------------------------------------
// Loading a module and calling it
// ---------------------------------------------------------------------------

/// A loaded PKCS#11 module: its 2.40 function table and the 3.0 discovery
/// functions it exports. Kept for the life of the test process.
struct Api {
    list: CK_FUNCTION_LIST,
    /// Where `C_GetFunctionList` said the table is.
    list_address: usize,
    get_interface_list: CK_C_GetInterfaceList,
    get_interface: CK_C_GetInterface,
    library: Library,
}

impl Api {
    fn load(path: &Path) -> Api {
        // SAFETY: loading a PKCS#11 module runs its constructors only; the
        // symbols are read with their PKCS#11 signatures.
        unsafe {
            let library =
                Library::new(path).unwrap_or_else(|e| panic!("dlopen {}: {e}", path.display()));
            let get_list = *library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .expect("C_GetFunctionList exported");
            let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
            let rv = get_list.expect("C_GetFunctionList not NULL")(&mut list);
            expect(rv, CKR_OK, "C_GetFunctionList");
            assert!(!list.is_null(), "C_GetFunctionList gave a NULL table");
            let get_interface_list = library
                .get::<CK_C_GetInterfaceList>(b"C_GetInterfaceList\0")
                .map(|s| *s)
                .unwrap_or(None);
            let get_interface = library
                .get::<CK_C_GetInterface>(b"C_GetInterface\0")
                .map(|s| *s)
                .unwrap_or(None);
            Api {
                list: *list,
                list_address: list as usize,
                get_interface_list,
                get_interface,
                library,
            }
        }
    }
}

/// The pkcs11-ha library under test.
fn ha() -> &'static Api {
    static HA: OnceLock<Api> = OnceLock::new();
    HA.get_or_init(|| Api::load(&library_path()))
}

/// SoftHSM, for asking it directly (the same instance pkcs11-ha loads).
fn softhsm() -> &'static Api {
    static SOFTHSM: OnceLock<Api> = OnceLock::new();
    SOFTHSM.get_or_init(|| Api::load(Path::new(SOFTHSM_LIB)))
}

/// Calls one entry of a module's function table.
macro_rules! ck {
    ($api:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let f = $api.list.$f.expect(concat!(stringify!($f), " is NULL in the table"));
        // SAFETY: every pointer handed over is NULL on purpose or points to
        // a live local of the type the PKCS#11 signature names.
        #[allow(unused_unsafe)]
        unsafe {
            f($($arg),*)
        }
    }};
}

macro_rules! rv_names {
    ($($name:ident),* $(,)?) => {
        /// The name of a return value, for assertion messages.
        fn rv_name(rv: CK_RV) -> String {
            match rv {
                $($name => stringify!($name).to_string(),)*
                other => format!("CKR_0x{other:08X}"),
            }
        }
    };
}

rv_names!(
    CKR_OK,
    CKR_SLOT_ID_INVALID,
    CKR_GENERAL_ERROR,
    CKR_FUNCTION_FAILED,
    CKR_ARGUMENTS_BAD,
    CKR_NO_EVENT,
    CKR_CANT_LOCK,
    CKR_DATA_LEN_RANGE,
    CKR_DEVICE_ERROR,
    CKR_FUNCTION_NOT_SUPPORTED,
    CKR_KEY_HANDLE_INVALID,
    CKR_MECHANISM_INVALID,
    CKR_MECHANISM_PARAM_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_OBJECT_HANDLE_INVALID,
    CKR_OPERATION_ACTIVE,
    CKR_OPERATION_NOT_INITIALIZED,
    CKR_SESSION_HANDLE_INVALID,
    CKR_SIGNATURE_INVALID,
    CKR_TOKEN_NOT_PRESENT,
    CKR_USER_ALREADY_LOGGED_IN,
    CKR_USER_NOT_LOGGED_IN,
    CKR_BUFFER_TOO_SMALL,
    CKR_CRYPTOKI_NOT_INITIALIZED,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
);

#[track_caller]
fn expect(got: CK_RV, want: CK_RV, what: &str) {
    assert!(
        got == want,
        "{what}: got {}, want {}",
        rv_name(got),
        rv_name(want)
    );
}

#[track_caller]
fn expect_one_of(got: CK_RV, allowed: &[CK_RV], what: &str) {
    let names: Vec<String> = allowed.iter().map(|rv| rv_name(*rv)).collect();
    assert!(
        allowed.contains(&got),
        "{what}: got {}, want one of {names:?}",
        rv_name(got)
    );
}

fn len(n: usize) -> CK_ULONG {
    n as CK_ULONG
}

// ---------------------------------------------------------------------------
// Test environment
// ---------------------------------------------------------------------------

/// Slot ID of the group `VirtualToken00` (slot ID = group index).
const VIRTUAL_SLOT: CK_SLOT_ID = 0;
/// A token outside the group, reached through its pass-through slot.
const PLAIN: &str = "plain";

/// Tokens member0, member1 (group [`GROUP_LABEL`]) and [`PLAIN`], the config
/// and env activated, the serial guard held. On drop: `C_Finalize` (its
/// result ignored, so a failed assertion still finalises) and env cleanup.
struct Ctx {
    hsm: SoftHsm,
    _config: PathBuf,
    // Last: released only after the tokens are gone.
    _guard: MutexGuard<'static, ()>,
}

impl Ctx {
    /// Tokens and config ready, pkcs11-ha NOT initialised.
    fn new() -> Ctx {
        let guard = serial_guard();
        let hsm = SoftHsm::new(&["member0", "member1", PLAIN]);
        // Keys made on a virtual slot move to the other member under it.
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
        Ctx {
            hsm,
            _config: config,
            _guard: guard,
        }
    }

    /// As [`Ctx::new`], then `C_Initialize` with `CKF_OS_LOCKING_OK`.
    fn started() -> Ctx {
        let ctx = Ctx::new();
        ctx.initialize();
        ctx
    }

    fn initialize(&self) {
        let mut args = init_args(CKF_OS_LOCKING_OK);
        expect(
            ck!(ha(), C_Initialize(&mut args as *mut _ as *mut c_void)),
            CKR_OK,
            "C_Initialize",
        );
    }

    /// The pass-through slot of [`PLAIN`] (SoftHSM is library 0).
    fn passthrough_slot(&self) -> CK_SLOT_ID {
        passthrough_slot_id(SOFTHSM_LIB_NAME, self.hsm.token(PLAIN).slot_id)
    }

    /// The slots each test runs on, named for messages.
    fn slots(&self) -> [(&'static str, CK_SLOT_ID); 2] {
        [
            ("virtual", VIRTUAL_SLOT),
            ("pass-through", self.passthrough_slot()),
        ]
    }

    /// Asks SoftHSM directly, on [`PLAIN`]'s own slot, with a logged-in RW
    /// session; SoftHSM is finalised again before this returns. Call it
    /// before pkcs11-ha is initialised.
    fn ask_softhsm<R>(&self, ask: impl FnOnce(&Api, CK_SESSION_HANDLE) -> R) -> R {
        struct Finalize;
        impl Drop for Finalize {
            fn drop(&mut self) {
                ck!(softhsm(), C_Finalize(ptr::null_mut()));
            }
        }
        let api = softhsm();
        let mut args = init_args(CKF_OS_LOCKING_OK);
        expect(
            ck!(api, C_Initialize(&mut args as *mut _ as *mut c_void)),
            CKR_OK,
            "SoftHSM C_Initialize (is pkcs11-ha still initialised?)",
        );
        let _finalize = Finalize;
        let session = user_session(api, self.hsm.token(PLAIN).slot_id);
        ask(api, session)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // CKR_CRYPTOKI_NOT_INITIALIZED here is fine: the test finalised.
        ck!(ha(), C_Finalize(ptr::null_mut()));
        std::env::remove_var(CONF_ENV);
        std::env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn open_session(api: &Api, slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
    let mut session = CK_INVALID_HANDLE;
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    let rv = ck!(
        api,
        C_OpenSession(slot, flags, ptr::null_mut(), None, &mut session)
    );
    expect(rv, CKR_OK, &format!("C_OpenSession on slot {slot:#x}"));
    assert_ne!(session, CK_INVALID_HANDLE, "C_OpenSession gave handle 0");
    session
}

/// An RW session on `slot` with the user logged in.
fn user_session(api: &Api, slot: CK_SLOT_ID) -> CK_SESSION_HANDLE {
    let session = open_session(api, slot);
    let pin = USER_PIN.as_bytes();
    let rv = ck!(
        api,
        C_Login(session, CKU_USER, pin.as_ptr() as *mut _, len(pin.len()))
    );
    expect_one_of(
        rv,
        &[CKR_OK, CKR_USER_ALREADY_LOGGED_IN],
        &format!("C_Login on slot {slot:#x}"),
    );
    session
}

// ---------------------------------------------------------------------------
// Templates, mechanisms and keys
// ---------------------------------------------------------------------------

const YES: CK_BBOOL = CK_TRUE;
const NO: CK_BBOOL = CK_FALSE;
/// DER OID of prime256v1.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn attr<T>(type_: CK_ATTRIBUTE_TYPE, value: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value as *const T as *mut c_void,
        ulValueLen: len(std::mem::size_of::<T>()),
    }
}

fn attr_bytes(type_: CK_ATTRIBUTE_TYPE, value: &[u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_,
        pValue: value.as_ptr() as *mut c_void,
        ulValueLen: len(value.len()),
    }
}

fn mechanism(mechanism: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    }
}

/// A session ECDSA P-256 key pair: (public, private).
fn ec_key_pair(api: &Api, session: CK_SESSION_HANDLE) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
    let mut mech = mechanism(CKM_EC_KEY_PAIR_GEN);
    let public = [
        attr_bytes(CKA_EC_PARAMS, &P256),
        attr(CKA_VERIFY, &YES),
        attr(CKA_TOKEN, &NO),
    ];
    let private = [
        attr(CKA_SIGN, &YES),
        attr(CKA_TOKEN, &NO),
        attr(CKA_PRIVATE, &YES),
        attr(CKA_SENSITIVE, &YES),
        attr(CKA_EXTRACTABLE, &NO),
    ];
    let (mut public_key, mut private_key) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
    let rv = ck!(
        api,
        C_GenerateKeyPair(
            session,
            &mut mech,
            public.as_ptr() as *mut _,
            len(public.len()),
            private.as_ptr() as *mut _,
            len(private.len()),
            &mut public_key,
            &mut private_key,
        )
    );
    expect(rv, CKR_OK, "C_GenerateKeyPair(EC P-256)");
    (public_key, private_key)
}

/// A session AES-256 key for encryption and decryption.
fn aes_key(api: &Api, session: CK_SESSION_HANDLE) -> CK_OBJECT_HANDLE {
    let mut mech = mechanism(CKM_AES_KEY_GEN);
    let value_len: CK_ULONG = 32;
    let template = [
        attr(CKA_VALUE_LEN, &value_len),
        attr(CKA_ENCRYPT, &YES),
        attr(CKA_DECRYPT, &YES),
        attr(CKA_TOKEN, &NO),
        attr(CKA_EXTRACTABLE, &NO),
    ];
    let mut key = CK_INVALID_HANDLE;
    let rv = ck!(
        api,
        C_GenerateKey(
            session,
            &mut mech,
            template.as_ptr() as *mut _,
            len(template.len()),
            &mut key
        )
    );
    expect(rv, CKR_OK, "C_GenerateKey(AES-256)");
    key
}

/// A session data object labelled `label`.
fn data_object(api: &Api, session: CK_SESSION_HANDLE, label: &str) -> CK_OBJECT_HANDLE {
    let class: CK_OBJECT_CLASS = CKO_DATA;
    let template = [
        attr(CKA_CLASS, &class),
        attr(CKA_TOKEN, &NO),
        attr_bytes(CKA_LABEL, label.as_bytes()),
        attr_bytes(CKA_VALUE, b"bad input"),
    ];
    let mut object = CK_INVALID_HANDLE;
    let rv = ck!(
        api,
        C_CreateObject(
            session,
            template.as_ptr() as *mut _,
            len(template.len()),
            &mut object
        )
    );
    expect(rv, CKR_OK, "C_CreateObject(data)");
    object
}

/// Handles of the objects labelled `label` visible to `session`.
fn find_by_label(api: &Api, session: CK_SESSION_HANDLE, label: &str) -> Vec<CK_OBJECT_HANDLE> {
    let template = [attr_bytes(CKA_LABEL, label.as_bytes())];
    let rv = ck!(
        api,
        C_FindObjectsInit(session, template.as_ptr() as *mut _, 1)
    );
    expect(rv, CKR_OK, "C_FindObjectsInit");
    let mut found = [CK_INVALID_HANDLE; 16];
    let mut count: CK_ULONG = 0;
    let rv = ck!(
        api,
        C_FindObjects(session, found.as_mut_ptr(), len(found.len()), &mut count)
    );
    expect(rv, CKR_OK, "C_FindObjects");
    expect(
        ck!(api, C_FindObjectsFinal(session)),
        CKR_OK,
        "C_FindObjectsFinal",
    );
    found[..count as usize].to_vec()
}

// ---------------------------------------------------------------------------
// The two-call convention
// ---------------------------------------------------------------------------

/// Checks the two-call convention of a list function (`call(buffer, count)`)
/// and returns the list: a NULL buffer gives the count; a buffer one short,
/// and a non-NULL buffer of length 0, get `CKR_BUFFER_TOO_SMALL` and the
/// count; an exact and a larger buffer get the list.
fn two_call_list<T: Copy + Default + PartialEq + std::fmt::Debug>(
    what: &str,
    call: impl Fn(*mut T, &mut CK_ULONG) -> CK_RV,
) -> Vec<T> {
    let mut needed: CK_ULONG = 0;
    expect(
        call(ptr::null_mut(), &mut needed),
        CKR_OK,
        &format!("{what}: NULL buffer"),
    );
    assert!(needed > 0, "{what}: the list is empty");
    let n = needed as usize;
    let mut buffer = vec![T::default(); n + 3];

    let mut count = needed - 1;
    expect(
        call(buffer.as_mut_ptr(), &mut count),
        CKR_BUFFER_TOO_SMALL,
        &format!("{what}: buffer one short"),
    );
    assert_eq!(count, needed, "{what}: count after a short buffer");

    let mut count = 0;
    expect(
        call(buffer.as_mut_ptr(), &mut count),
        CKR_BUFFER_TOO_SMALL,
        &format!("{what}: zero-length buffer"),
    );
    assert_eq!(count, needed, "{what}: count after a zero-length buffer");

    let mut count = needed;
    expect(
        call(buffer.as_mut_ptr(), &mut count),
        CKR_OK,
        &format!("{what}: exact buffer"),
    );
    assert_eq!(count, needed, "{what}: count after an exact buffer");
    let list = buffer[..n].to_vec();

    let mut count = len(buffer.len());
    expect(
        call(buffer.as_mut_ptr(), &mut count),
        CKR_OK,
        &format!("{what}: larger buffer"),
    );
    assert_eq!(count, needed, "{what}: count after a larger buffer");
    assert_eq!(buffer[..n], list[..], "{what}: the two answers differ");
    list
}

/// Checks the two-call convention of a single-part call that ends an
/// operation `init` started, and returns its output. The length query and
/// both too-small answers must leave the operation active: the call with a
/// buffer of exactly the announced length then succeeds, and ends it.
fn two_call_output(
    what: &str,
    mut init: impl FnMut() -> CK_RV,
    mut call: impl FnMut(*mut u8, &mut CK_ULONG) -> CK_RV,
) -> Vec<u8> {
    expect(init(), CKR_OK, &format!("{what}: init"));
    let mut needed: CK_ULONG = 0;
    expect(
        call(ptr::null_mut(), &mut needed),
        CKR_OK,
        &format!("{what}: NULL output (length query)"),
    );
    assert!(needed > 0, "{what}: length query gave 0");
    let mut buffer = vec![0u8; needed as usize];

    let mut length = needed - 1;
    expect(
        call(buffer.as_mut_ptr(), &mut length),
        CKR_BUFFER_TOO_SMALL,
        &format!("{what}: output one byte short"),
    );
    assert_eq!(length, needed, "{what}: length after a short buffer");

    let mut length = 0;
    expect(
        call(buffer.as_mut_ptr(), &mut length),
        CKR_BUFFER_TOO_SMALL,
        &format!("{what}: zero-length output"),
    );
    assert_eq!(length, needed, "{what}: length after a zero-length buffer");

    let mut length = needed;
    expect(
        call(buffer.as_mut_ptr(), &mut length),
        CKR_OK,
        &format!("{what}: output of the announced length (operation still active?)"),
    );
    assert!(length <= needed, "{what}: wrote {length} > {needed} bytes");
    buffer.truncate(length as usize);

    let mut again = vec![0u8; needed as usize];
    let mut length = needed;
    expect(
        call(again.as_mut_ptr(), &mut length),
        CKR_OPERATION_NOT_INITIALIZED,
        &format!("{what}: after the operation ended"),
    );
    buffer
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// C_Initialize, C_Finalize and discovery
// ---------------------------------------------------------------------------

/// Calls that need an initialised library, each with otherwise good
/// arguments, and what they returned.
fn calls_needing_initialize(api: &Api) -> Vec<(&'static str, CK_RV)> {
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    let mut slot_info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    let mut token_info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    let mut session_info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    let mut count: CK_ULONG = 0;
    let mut session = CK_INVALID_HANDLE;
    let mut sign = mechanism(CKM_ECDSA);
    let mut digest = mechanism(CKM_SHA256);
    let mut random = [0u8; 16];
    let mut slot: CK_SLOT_ID = 0;
    let pin = USER_PIN.as_bytes();
    vec![
        ("C_GetInfo", ck!(api, C_GetInfo(&mut info))),
        (
            "C_GetSlotList",
            ck!(api, C_GetSlotList(CK_FALSE, ptr::null_mut(), &mut count)),
        ),
        ("C_GetSlotInfo", ck!(api, C_GetSlotInfo(0, &mut slot_info))),
        (
            "C_GetTokenInfo",
            ck!(api, C_GetTokenInfo(0, &mut token_info)),
        ),
        (
            "C_GetMechanismList",
            ck!(api, C_GetMechanismList(0, ptr::null_mut(), &mut count)),
        ),
        (
            "C_OpenSession",
            ck!(
                api,
                C_OpenSession(0, CKF_SERIAL_SESSION, ptr::null_mut(), None, &mut session)
            ),
        ),
        ("C_CloseSession", ck!(api, C_CloseSession(1))),
        ("C_CloseAllSessions", ck!(api, C_CloseAllSessions(0))),
        (
            "C_GetSessionInfo",
            ck!(api, C_GetSessionInfo(1, &mut session_info)),
        ),
        (
            "C_Login",
            ck!(
                api,
                C_Login(1, CKU_USER, pin.as_ptr() as *mut _, len(pin.len()))
            ),
        ),
        ("C_Logout", ck!(api, C_Logout(1))),
        (
            "C_FindObjectsInit",
            ck!(api, C_FindObjectsInit(1, ptr::null_mut(), 0)),
        ),
        ("C_SignInit", ck!(api, C_SignInit(1, &mut sign, 1))),
        ("C_DigestInit", ck!(api, C_DigestInit(1, &mut digest))),
        (
            "C_GenerateRandom",
            ck!(
                api,
                C_GenerateRandom(1, random.as_mut_ptr(), len(random.len()))
            ),
        ),
        (
            "C_WaitForSlotEvent",
            ck!(
                api,
                C_WaitForSlotEvent(CKF_DONT_BLOCK, &mut slot, ptr::null_mut())
            ),
        ),
        ("C_Finalize", ck!(api, C_Finalize(ptr::null_mut()))),
    ]
}

#[test]
fn calls_before_initialize_and_after_finalize_are_not_initialized() {
    let ctx = Ctx::new();
    for (name, rv) in calls_needing_initialize(ha()) {
        expect(
            rv,
            CKR_CRYPTOKI_NOT_INITIALIZED,
            &format!("{name} before C_Initialize"),
        );
    }
    ctx.initialize();
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    expect(
        ck!(ha(), C_GetInfo(&mut info)),
        CKR_OK,
        "C_GetInfo once initialised",
    );
    expect(ck!(ha(), C_Finalize(ptr::null_mut())), CKR_OK, "C_Finalize");
    for (name, rv) in calls_needing_initialize(ha()) {
        expect(
            rv,
            CKR_CRYPTOKI_NOT_INITIALIZED,
            &format!("{name} after C_Finalize"),
        );
    }
    // And the library starts again after all that.
    ctx.initialize();
    expect(
        ck!(ha(), C_GetInfo(&mut info)),
        CKR_OK,
        "C_GetInfo after restart",
    );
}

#[test]
fn discovery_functions_work_before_initialize() {
    let _ctx = Ctx::new();
    let api = ha();

    // C_GetFunctionList: the same table every time; NULL is refused.
    let get_list = *unsafe {
        api.library
            .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
    }
    .expect("C_GetFunctionList");
    let get_list = get_list.expect("C_GetFunctionList not NULL");
    let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
    expect(unsafe { get_list(&mut list) }, CKR_OK, "C_GetFunctionList");
    assert_eq!(
        list as usize, api.list_address,
        "C_GetFunctionList changed table"
    );
    let version = unsafe { (*list).version };
    assert_eq!(
        (version.major, version.minor),
        (2, 40),
        "function list version"
    );
    expect(
        unsafe { get_list(ptr::null_mut()) },
        CKR_ARGUMENTS_BAD,
        "C_GetFunctionList(NULL)",
    );

    // C_GetInterfaceList: count query, short buffer, NULL count, real list.
    let get_interface_list = api.get_interface_list.expect("C_GetInterfaceList exported");
    let mut count: CK_ULONG = 0;
    expect(
        unsafe { get_interface_list(ptr::null_mut(), &mut count) },
        CKR_OK,
        "C_GetInterfaceList(NULL, &count)",
    );
    assert_eq!(count, 1, "interface count");
    let mut interfaces: [CK_INTERFACE; 2] = unsafe { std::mem::zeroed() };
    let mut count: CK_ULONG = 0;
    expect(
        unsafe { get_interface_list(interfaces.as_mut_ptr(), &mut count) },
        CKR_BUFFER_TOO_SMALL,
        "C_GetInterfaceList with room for 0",
    );
    assert_eq!(count, 1, "interface count after a short buffer");
    expect(
        unsafe { get_interface_list(interfaces.as_mut_ptr(), ptr::null_mut()) },
        CKR_ARGUMENTS_BAD,
        "C_GetInterfaceList(.., NULL count)",
    );
    let mut count: CK_ULONG = 2;
    expect(
        unsafe { get_interface_list(interfaces.as_mut_ptr(), &mut count) },
        CKR_OK,
        "C_GetInterfaceList",
    );
    assert_eq!(count, 1);
    let interface = interfaces[0];
    let name = unsafe { CStr::from_ptr(interface.pInterfaceName as *const _) };
    assert_eq!(name.to_bytes(), b"PKCS 11", "interface name");
    let table = interface.pFunctionList as *const CK_FUNCTION_LIST;
    let version = unsafe { (*table).version };
    assert_eq!(
        (version.major, version.minor),
        (2, 40),
        "interface table version"
    );
    assert_eq!(table as usize, api.list_address, "interface table");

    // C_GetInterface: by name, default, unknown name, NULL output.
    let get_interface = api.get_interface.expect("C_GetInterface exported");
    let mut found: *mut CK_INTERFACE = ptr::null_mut();
    let mut pkcs11 = *b"PKCS 11\0";
    expect(
        unsafe { get_interface(pkcs11.as_mut_ptr(), ptr::null_mut(), &mut found, 0) },
        CKR_OK,
        "C_GetInterface(\"PKCS 11\")",
    );
    assert!(!found.is_null());
    let table = unsafe { (*found).pFunctionList } as *const CK_FUNCTION_LIST;
    let version = unsafe { (*table).version };
    assert_eq!(
        (version.major, version.minor),
        (2, 40),
        "C_GetInterface table version"
    );
    let name = unsafe { CStr::from_ptr((*found).pInterfaceName as *const _) };
    assert_eq!(name.to_bytes(), b"PKCS 11");
    // The table works: it is the real one, not yet initialised.
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    let get_info = unsafe { (*table).C_GetInfo }.expect("C_GetInfo in the interface table");
    expect(
        unsafe { get_info(&mut info) },
        CKR_CRYPTOKI_NOT_INITIALIZED,
        "C_GetInfo through the interface table",
    );

    let mut default: *mut CK_INTERFACE = ptr::null_mut();
    expect(
        unsafe { get_interface(ptr::null_mut(), ptr::null_mut(), &mut default, 0) },
        CKR_OK,
        "C_GetInterface(NULL name)",
    );
    assert_eq!(default, found, "the default interface is \"PKCS 11\"");

    let mut unknown = *b"PKCS 12\0";
    let mut none: *mut CK_INTERFACE = ptr::null_mut();
    expect(
        unsafe { get_interface(unknown.as_mut_ptr(), ptr::null_mut(), &mut none, 0) },
        CKR_ARGUMENTS_BAD,
        "C_GetInterface(\"PKCS 12\")",
    );
    let mut vendor = *b"Vendor pkcs11-ha\0";
    expect(
        unsafe { get_interface(vendor.as_mut_ptr(), ptr::null_mut(), &mut none, 0) },
        CKR_ARGUMENTS_BAD,
        "C_GetInterface(\"Vendor pkcs11-ha\")",
    );
    expect(
        unsafe { get_interface(pkcs11.as_mut_ptr(), ptr::null_mut(), ptr::null_mut(), 0) },
        CKR_ARGUMENTS_BAD,
        "C_GetInterface(.., NULL ppInterface)",
    );
}

#[test]
fn initialize_twice_and_finalize_with_reserved_pointer() {
    let ctx = Ctx::started();
    let mut args = init_args(CKF_OS_LOCKING_OK);
    expect(
        ck!(ha(), C_Initialize(&mut args as *mut _ as *mut c_void)),
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
        "second C_Initialize",
    );
    expect(
        ck!(ha(), C_Initialize(ptr::null_mut())),
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
        "second C_Initialize(NULL)",
    );
    let mut reserved = 0u8;
    expect(
        ck!(ha(), C_Finalize(&mut reserved as *mut u8 as *mut c_void)),
        CKR_ARGUMENTS_BAD,
        "C_Finalize(non-NULL)",
    );
    // The refused calls changed nothing: still initialised, slots intact.
    let mut info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    expect(
        ck!(ha(), C_GetSlotInfo(VIRTUAL_SLOT, &mut info)),
        CKR_OK,
        "C_GetSlotInfo after the refused calls",
    );
    assert_ne!(info.flags & CKF_TOKEN_PRESENT, 0, "virtual token present");
    expect(
        ck!(ha(), C_Finalize(ptr::null_mut())),
        CKR_OK,
        "C_Finalize(NULL)",
    );
    expect(
        ck!(ha(), C_Finalize(ptr::null_mut())),
        CKR_CRYPTOKI_NOT_INITIALIZED,
        "second C_Finalize",
    );
    drop(ctx);
}

unsafe extern "C" fn create_mutex(mutex: *mut *mut c_void) -> CK_RV {
    static DUMMY: u8 = 0;
    // SAFETY: the library passes a writable pointer.
    unsafe { *mutex = &DUMMY as *const u8 as *mut c_void };
    CKR_OK
}

unsafe extern "C" fn mutex_op(_mutex: *mut c_void) -> CK_RV {
    CKR_OK
}

fn all_callbacks(flags: CK_FLAGS) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create_mutex),
        DestroyMutex: Some(mutex_op),
        LockMutex: Some(mutex_op),
        UnlockMutex: Some(mutex_op),
        flags,
        pReserved: ptr::null_mut(),
    }
}

#[test]
fn initialize_arguments_are_checked() {
    let _ctx = Ctx::new();
    let api = ha();
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    let still_uninitialized = |what: &str| {
        let mut info: CK_INFO = unsafe { std::mem::zeroed() };
        expect(
            ck!(api, C_GetInfo(&mut info)),
            CKR_CRYPTOKI_NOT_INITIALIZED,
            &format!("C_GetInfo after {what}"),
        );
    };

    let mut reserved = 0u8;
    let mut args = init_args(CKF_OS_LOCKING_OK);
    args.pReserved = &mut reserved as *mut u8 as *mut c_void;
    expect(
        ck!(api, C_Initialize(&mut args as *mut _ as *mut c_void)),
        CKR_ARGUMENTS_BAD,
        "C_Initialize with pReserved set",
    );
    still_uninitialized("pReserved set");

    // Some but not all of the four callbacks, with and without the flag.
    for flags in [0, CKF_OS_LOCKING_OK] {
        for missing in 0..4 {
            let mut args = all_callbacks(flags);
            match missing {
                0 => args.CreateMutex = None,
                1 => args.DestroyMutex = None,
                2 => args.LockMutex = None,
                _ => args.UnlockMutex = None,
            }
            let what = format!("C_Initialize without callback #{missing}, flags {flags:#x}");
            expect(
                ck!(api, C_Initialize(&mut args as *mut _ as *mut c_void)),
                CKR_ARGUMENTS_BAD,
                &what,
            );
            still_uninitialized(&what);
        }
        let mut args = init_args(flags);
        args.LockMutex = Some(mutex_op);
        let what = format!("C_Initialize with LockMutex only, flags {flags:#x}");
        expect(
            ck!(api, C_Initialize(&mut args as *mut _ as *mut c_void)),
            CKR_ARGUMENTS_BAD,
            &what,
        );
        still_uninitialized(&what);
    }

    // All callbacks but no CKF_OS_LOCKING_OK: the library would have to use
    // the application's mutexes, which it cannot.
    let mut args = all_callbacks(0);
    expect(
        ck!(api, C_Initialize(&mut args as *mut _ as *mut c_void)),
        CKR_CANT_LOCK,
        "C_Initialize with callbacks, without CKF_OS_LOCKING_OK",
    );
    still_uninitialized("CKR_CANT_LOCK");

    // The accepted forms.
    let accepted: [(&str, Option<CK_C_INITIALIZE_ARGS>); 4] = [
        (
            "all callbacks + CKF_OS_LOCKING_OK",
            Some(all_callbacks(CKF_OS_LOCKING_OK)),
        ),
        ("CKF_OS_LOCKING_OK only", Some(init_args(CKF_OS_LOCKING_OK))),
        ("no callbacks, no flags", Some(init_args(0))),
        ("NULL", None),
    ];
    for (what, args) in accepted {
        let mut args = args;
        let pointer = args
            .as_mut()
            .map_or(ptr::null_mut(), |a| a as *mut _ as *mut c_void);
        expect(
            ck!(api, C_Initialize(pointer)),
            CKR_OK,
            &format!("C_Initialize({what})"),
        );
        expect(
            ck!(api, C_GetInfo(&mut info)),
            CKR_OK,
            &format!("C_GetInfo after {what}"),
        );
        expect(
            ck!(api, C_Finalize(ptr::null_mut())),
            CKR_OK,
            &format!("C_Finalize after {what}"),
        );
    }
}

// ---------------------------------------------------------------------------
// NULL pointers
// ---------------------------------------------------------------------------

#[test]
fn null_pointers_are_arguments_bad() {
    let ctx = Ctx::started();
    let api = ha();
    expect(
        ck!(api, C_GetInfo(ptr::null_mut())),
        CKR_ARGUMENTS_BAD,
        "C_GetInfo(NULL)",
    );
    let mut slots = [0 as CK_SLOT_ID; 8];
    for present in [CK_FALSE, CK_TRUE] {
        expect(
            ck!(
                api,
                C_GetSlotList(present, ptr::null_mut(), ptr::null_mut())
            ),
            CKR_ARGUMENTS_BAD,
            "C_GetSlotList(NULL, NULL)",
        );
        expect(
            ck!(
                api,
                C_GetSlotList(present, slots.as_mut_ptr(), ptr::null_mut())
            ),
            CKR_ARGUMENTS_BAD,
            "C_GetSlotList(buffer, NULL count)",
        );
    }

    for (kind, slot) in ctx.slots() {
        let what = |call: &str| format!("{call} on the {kind} slot");
        expect(
            ck!(api, C_GetSlotInfo(slot, ptr::null_mut())),
            CKR_ARGUMENTS_BAD,
            &what("C_GetSlotInfo(NULL)"),
        );
        expect(
            ck!(api, C_GetTokenInfo(slot, ptr::null_mut())),
            CKR_ARGUMENTS_BAD,
            &what("C_GetTokenInfo(NULL)"),
        );
        expect(
            ck!(
                api,
                C_GetMechanismList(slot, ptr::null_mut(), ptr::null_mut())
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_GetMechanismList(NULL, NULL count)"),
        );
        expect(
            ck!(api, C_GetMechanismInfo(slot, CKM_SHA256, ptr::null_mut())),
            CKR_ARGUMENTS_BAD,
            &what("C_GetMechanismInfo(NULL)"),
        );
        expect(
            ck!(
                api,
                C_OpenSession(
                    slot,
                    CKF_SERIAL_SESSION,
                    ptr::null_mut(),
                    None,
                    ptr::null_mut()
                )
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_OpenSession(NULL phSession)"),
        );

        let session = user_session(api, slot);
        expect(
            ck!(api, C_GetSessionInfo(session, ptr::null_mut())),
            CKR_ARGUMENTS_BAD,
            &what("C_GetSessionInfo(NULL)"),
        );
        expect(
            ck!(api, C_Login(session, CKU_USER, ptr::null_mut(), 4)),
            CKR_ARGUMENTS_BAD,
            &what("C_Login(NULL PIN, length 4)"),
        );

        expect(
            ck!(api, C_FindObjectsInit(session, ptr::null_mut(), 0)),
            CKR_OK,
            &what("C_FindObjectsInit(all)"),
        );
        let mut found = [CK_INVALID_HANDLE; 4];
        expect(
            ck!(
                api,
                C_FindObjects(session, found.as_mut_ptr(), 4, ptr::null_mut())
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_FindObjects(NULL count)"),
        );
        expect(
            ck!(api, C_FindObjectsFinal(session)),
            CKR_OK,
            &what("C_FindObjectsFinal"),
        );

        let mut random = [0u8; 16];
        expect(
            ck!(api, C_GenerateRandom(session, ptr::null_mut(), 16)),
            CKR_ARGUMENTS_BAD,
            &what("C_GenerateRandom(NULL, 16)"),
        );
        expect(
            ck!(api, C_GenerateRandom(session, random.as_mut_ptr(), 16)),
            CKR_OK,
            &what("C_GenerateRandom after the refused call"),
        );

        let label = "null-phObject";
        let class: CK_OBJECT_CLASS = CKO_DATA;
        let template = [
            attr(CKA_CLASS, &class),
            attr(CKA_TOKEN, &NO),
            attr_bytes(CKA_LABEL, label.as_bytes()),
        ];
        expect(
            ck!(
                api,
                C_CreateObject(
                    session,
                    template.as_ptr() as *mut _,
                    len(template.len()),
                    ptr::null_mut()
                )
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_CreateObject(NULL phObject)"),
        );
        expect(
            ck!(
                api,
                C_CreateObject(session, ptr::null_mut(), 3, &mut found[0])
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_CreateObject(NULL template, count 3)"),
        );
        assert_eq!(
            find_by_label(api, session, label),
            [0; 0],
            "{}",
            what("a refused C_CreateObject left an object")
        );
        // Last: whether a refused C_Sign ends the operation is left open
        // (SoftHSM keeps it), and closing the session ends it anyway.
        let (_, private_key) = ec_key_pair(api, session);
        let mut ecdsa = mechanism(CKM_ECDSA);
        expect(
            ck!(api, C_SignInit(session, &mut ecdsa, private_key)),
            CKR_OK,
            &what("C_SignInit"),
        );
        let mut digest = [7u8; 32];
        let mut signature = [0u8; 64];
        expect(
            ck!(
                api,
                C_Sign(
                    session,
                    digest.as_mut_ptr(),
                    32,
                    signature.as_mut_ptr(),
                    ptr::null_mut()
                )
            ),
            CKR_ARGUMENTS_BAD,
            &what("C_Sign(NULL pulSignatureLen)"),
        );

        expect(
            ck!(api, C_CloseSession(session)),
            CKR_OK,
            &what("C_CloseSession"),
        );
    }
}

// ---------------------------------------------------------------------------
// Zero lengths
// ---------------------------------------------------------------------------

/// What SoftHSM answers to `C_GenerateRandom` of 0 bytes: (NULL buffer,
/// real buffer).
fn softhsm_zero_random(ctx: &Ctx) -> (CK_RV, CK_RV) {
    ctx.ask_softhsm(|api, session| {
        let mut buffer = [0u8; 1];
        (
            ck!(api, C_GenerateRandom(session, ptr::null_mut(), 0)),
            ck!(api, C_GenerateRandom(session, buffer.as_mut_ptr(), 0)),
        )
    })
}

#[test]
fn zero_length_random_and_empty_digest() {
    let ctx = Ctx::new();
    let (null_zero, buffer_zero) = softhsm_zero_random(&ctx);
    expect(buffer_zero, CKR_OK, "SoftHSM C_GenerateRandom(buffer, 0)");
    ctx.initialize();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = open_session(api, slot);
        let mut buffer = [0xA5u8; 8];
        expect(
            ck!(api, C_GenerateRandom(session, buffer.as_mut_ptr(), 0)),
            buffer_zero,
            &format!("C_GenerateRandom(buffer, 0) on the {kind} slot, as SoftHSM"),
        );
        assert_eq!(buffer, [0xA5; 8], "{kind}: 0 random bytes wrote something");
        expect(
            ck!(api, C_GenerateRandom(session, ptr::null_mut(), 0)),
            null_zero,
            &format!("C_GenerateRandom(NULL, 0) on the {kind} slot, as SoftHSM"),
        );

        // SHA-256 of the empty string (a non-NULL pointer with length 0).
        let mut sha256 = mechanism(CKM_SHA256);
        let mut empty = [0u8; 1];
        let mut digest = [0u8; 32];
        let mut length: CK_ULONG = 32;
        expect(
            ck!(api, C_DigestInit(session, &mut sha256)),
            CKR_OK,
            &format!("C_DigestInit on the {kind} slot"),
        );
        expect(
            ck!(
                api,
                C_Digest(
                    session,
                    empty.as_mut_ptr(),
                    0,
                    digest.as_mut_ptr(),
                    &mut length
                )
            ),
            CKR_OK,
            &format!("C_Digest of empty data on the {kind} slot"),
        );
        assert_eq!(length, 32);
        assert_eq!(
            hex(&digest),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "{kind}: SHA-256 of \"\""
        );

        // Multi-part with no update at all is the same digest.
        expect(
            ck!(api, C_DigestInit(session, &mut sha256)),
            CKR_OK,
            &format!("C_DigestInit on the {kind} slot"),
        );
        let mut length: CK_ULONG = 32;
        expect(
            ck!(
                api,
                C_DigestFinal(session, digest.as_mut_ptr(), &mut length)
            ),
            CKR_OK,
            &format!("C_DigestFinal with no update on the {kind} slot"),
        );
        assert_eq!(
            hex(&digest[..length as usize]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "{kind}: SHA-256 of \"\" (multi-part)"
        );
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
    }
}

// ---------------------------------------------------------------------------
// Two-call convention
// ---------------------------------------------------------------------------

#[test]
fn slot_and_mechanism_lists_follow_the_two_call_convention() {
    let ctx = Ctx::started();
    let api = ha();
    for present in [CK_FALSE, CK_TRUE] {
        let slots: Vec<CK_SLOT_ID> = two_call_list(
            &format!("C_GetSlotList(tokenPresent={present})"),
            |buf, count| ck!(api, C_GetSlotList(present, buf, count)),
        );
        assert!(
            slots.contains(&VIRTUAL_SLOT),
            "virtual slot listed: {slots:x?}"
        );
        for token in &ctx.hsm.tokens {
            let id = passthrough_slot_id(SOFTHSM_LIB_NAME, token.slot_id);
            assert!(
                slots.contains(&id),
                "pass-through slot {id:#x} listed: {slots:x?}"
            );
        }
    }
    for (kind, slot) in ctx.slots() {
        let mechanisms: Vec<CK_MECHANISM_TYPE> = two_call_list(
            &format!("C_GetMechanismList on the {kind} slot"),
            |buf, count| ck!(api, C_GetMechanismList(slot, buf, count)),
        );
        for needed in [CKM_SHA256, CKM_ECDSA, CKM_AES_CBC_PAD] {
            assert!(
                mechanisms.contains(&needed),
                "{kind}: mechanism {needed:#x} listed"
            );
        }
    }
}

#[test]
fn sign_follows_the_two_call_convention() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = user_session(api, slot);
        let (public_key, private_key) = ec_key_pair(api, session);
        let mut digest: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut ecdsa = mechanism(CKM_ECDSA);
        let signature = two_call_output(
            &format!("C_Sign(CKM_ECDSA) on the {kind} slot"),
            || ck!(api, C_SignInit(session, &mut ecdsa, private_key)),
            |out, out_len| ck!(api, C_Sign(session, digest.as_mut_ptr(), 32, out, out_len)),
        );
        assert_eq!(signature.len(), 64, "{kind}: P-256 signature length");

        let mut signature = signature;
        let mut ecdsa = mechanism(CKM_ECDSA);
        expect(
            ck!(api, C_VerifyInit(session, &mut ecdsa, public_key)),
            CKR_OK,
            &format!("C_VerifyInit on the {kind} slot"),
        );
        expect(
            ck!(
                api,
                C_Verify(
                    session,
                    digest.as_mut_ptr(),
                    32,
                    signature.as_mut_ptr(),
                    len(signature.len())
                )
            ),
            CKR_OK,
            &format!("C_Verify of the two-call signature on the {kind} slot"),
        );
        signature[10] ^= 0x01;
        expect(
            ck!(api, C_VerifyInit(session, &mut ecdsa, public_key)),
            CKR_OK,
            &format!("C_VerifyInit on the {kind} slot"),
        );
        expect(
            ck!(
                api,
                C_Verify(
                    session,
                    digest.as_mut_ptr(),
                    32,
                    signature.as_mut_ptr(),
                    len(signature.len())
                )
            ),
            CKR_SIGNATURE_INVALID,
            &format!("C_Verify of a changed signature on the {kind} slot"),
        );
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
    }
}

#[test]
fn encrypt_follows_the_two_call_convention() {
    let ctx = Ctx::started();
    let api = ha();
    let plaintext: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    for (kind, slot) in ctx.slots() {
        let session = user_session(api, slot);
        let key = aes_key(api, session);

        let mut iv = [0x42u8; 16];
        let mut gcm_iv = [0x24u8; 12];
        let mut gcm = CK_GCM_PARAMS {
            pIv: gcm_iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: ptr::null_mut(),
            ulAADLen: 0,
            ulTagBits: 128,
        };
        let mechanisms = [
            (
                "CKM_AES_CBC_PAD",
                CK_MECHANISM {
                    mechanism: CKM_AES_CBC_PAD,
                    pParameter: iv.as_mut_ptr() as *mut c_void,
                    ulParameterLen: 16,
                },
                1040,
            ),
            (
                "CKM_AES_GCM",
                CK_MECHANISM {
                    mechanism: CKM_AES_GCM,
                    pParameter: &mut gcm as *mut CK_GCM_PARAMS as *mut c_void,
                    ulParameterLen: len(std::mem::size_of::<CK_GCM_PARAMS>()),
                },
                1040,
            ),
        ];
        for (name, mech, expected_len) in mechanisms {
            let mut mech = mech;
            let mut input = plaintext.clone();
            let ciphertext = two_call_output(
                &format!("C_Encrypt({name}, 1 KiB) on the {kind} slot"),
                || ck!(api, C_EncryptInit(session, &mut mech, key)),
                |out, out_len| {
                    ck!(
                        api,
                        C_Encrypt(session, input.as_mut_ptr(), 1024, out, out_len)
                    )
                },
            );
            assert_eq!(
                ciphertext.len(),
                expected_len,
                "{kind}: {name} ciphertext length"
            );
            assert_ne!(
                ciphertext[..1024],
                plaintext[..],
                "{kind}: {name} encrypted nothing"
            );

            let mut ciphertext = ciphertext;
            let mut decrypted = vec![0u8; ciphertext.len()];
            let mut decrypted_len = len(decrypted.len());
            expect(
                ck!(api, C_DecryptInit(session, &mut mech, key)),
                CKR_OK,
                &format!("C_DecryptInit({name}) on the {kind} slot"),
            );
            expect(
                ck!(
                    api,
                    C_Decrypt(
                        session,
                        ciphertext.as_mut_ptr(),
                        len(ciphertext.len()),
                        decrypted.as_mut_ptr(),
                        &mut decrypted_len
                    )
                ),
                CKR_OK,
                &format!("C_Decrypt({name}) on the {kind} slot"),
            );
            decrypted.truncate(decrypted_len as usize);
            assert!(decrypted == plaintext, "{kind}: {name} round trip differs");
        }
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
    }
}

#[test]
fn digest_follows_the_two_call_convention() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = open_session(api, slot);
        let mut sha256 = mechanism(CKM_SHA256);
        let mut data = *b"abc";
        let digest = two_call_output(
            &format!("C_Digest(CKM_SHA256) on the {kind} slot"),
            || ck!(api, C_DigestInit(session, &mut sha256)),
            |out, out_len| ck!(api, C_Digest(session, data.as_mut_ptr(), 3, out, out_len)),
        );
        assert_eq!(
            hex(&digest),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "{kind}: SHA-256 of \"abc\""
        );

        // And C_DigestFinal, after an update.
        let digest = two_call_output(
            &format!("C_DigestFinal(CKM_SHA256) on the {kind} slot"),
            || {
                let rv = ck!(api, C_DigestInit(session, &mut sha256));
                if rv != CKR_OK {
                    return rv;
                }
                ck!(api, C_DigestUpdate(session, data.as_mut_ptr(), 3))
            },
            |out, out_len| ck!(api, C_DigestFinal(session, out, out_len)),
        );
        assert_eq!(
            hex(&digest),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "{kind}: SHA-256 of \"abc\" (multi-part)"
        );
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
    }
}

// ---------------------------------------------------------------------------
// Invalid handles and slot IDs
// ---------------------------------------------------------------------------

/// Calls that take a session handle, with otherwise good arguments.
fn calls_with_session(api: &Api, session: CK_SESSION_HANDLE) -> Vec<(&'static str, CK_RV)> {
    let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
    let mut random = [0u8; 16];
    let mut ecdsa = mechanism(CKM_ECDSA);
    let mut sha256 = mechanism(CKM_SHA256);
    let mut data = [1u8; 32];
    let mut out = [0u8; 64];
    let mut out_len: CK_ULONG = 64;
    let mut object = CK_INVALID_HANDLE;
    let class: CK_OBJECT_CLASS = CKO_DATA;
    let template = [attr(CKA_CLASS, &class), attr(CKA_TOKEN, &NO)];
    let pin = USER_PIN.as_bytes();
    vec![
        (
            "C_GetSessionInfo",
            ck!(api, C_GetSessionInfo(session, &mut info)),
        ),
        (
            "C_Login",
            ck!(
                api,
                C_Login(session, CKU_USER, pin.as_ptr() as *mut _, len(pin.len()))
            ),
        ),
        ("C_Logout", ck!(api, C_Logout(session))),
        (
            "C_GenerateRandom",
            ck!(api, C_GenerateRandom(session, random.as_mut_ptr(), 16)),
        ),
        (
            "C_FindObjectsInit",
            ck!(api, C_FindObjectsInit(session, ptr::null_mut(), 0)),
        ),
        ("C_SignInit", ck!(api, C_SignInit(session, &mut ecdsa, 1))),
        ("C_DigestInit", ck!(api, C_DigestInit(session, &mut sha256))),
        (
            "C_Digest",
            ck!(
                api,
                C_Digest(
                    session,
                    data.as_mut_ptr(),
                    32,
                    out.as_mut_ptr(),
                    &mut out_len
                )
            ),
        ),
        (
            "C_SignUpdate",
            ck!(api, C_SignUpdate(session, data.as_mut_ptr(), 32)),
        ),
        (
            "C_CreateObject",
            ck!(
                api,
                C_CreateObject(
                    session,
                    template.as_ptr() as *mut _,
                    len(template.len()),
                    &mut object
                )
            ),
        ),
        ("C_DestroyObject", ck!(api, C_DestroyObject(session, 1))),
        ("C_CloseSession", ck!(api, C_CloseSession(session))),
    ]
}

#[test]
fn invalid_session_handles() {
    let ctx = Ctx::started();
    let api = ha();
    for (name, rv) in calls_with_session(api, CK_INVALID_HANDLE) {
        expect(
            rv,
            CKR_SESSION_HANDLE_INVALID,
            &format!("{name}(session 0)"),
        );
    }
    for (kind, slot) in ctx.slots() {
        // Closed with C_CloseSession.
        let session = user_session(api, slot);
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
        for (name, rv) in calls_with_session(api, session) {
            expect(
                rv,
                CKR_SESSION_HANDLE_INVALID,
                &format!("{name} on a closed session of the {kind} slot"),
            );
        }
        // Closed with C_CloseAllSessions; a session on another slot lives on.
        let (_, other_slot) = ctx.slots().into_iter().find(|(_, s)| *s != slot).unwrap();
        let other = open_session(api, other_slot);
        let first = open_session(api, slot);
        let second = open_session(api, slot);
        expect(
            ck!(api, C_CloseAllSessions(slot)),
            CKR_OK,
            &format!("C_CloseAllSessions on the {kind} slot"),
        );
        for session in [first, second] {
            for (name, rv) in calls_with_session(api, session) {
                expect(
                    rv,
                    CKR_SESSION_HANDLE_INVALID,
                    &format!("{name} after C_CloseAllSessions on the {kind} slot"),
                );
            }
        }
        let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        expect(
            ck!(api, C_GetSessionInfo(other, &mut info)),
            CKR_OK,
            &format!("a session on another slot than the {kind} slot survives"),
        );
        expect(
            ck!(api, C_CloseSession(other)),
            CKR_OK,
            "C_CloseSession(other)",
        );
    }
}

/// A thread's calls find their session without the session table while no
/// session has been closed since; a session closed by another thread must
/// still be refused here.
#[test]
fn a_session_closed_by_another_thread_is_refused() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = open_session(api, slot);
        let mut random = [0u8; 16];
        let draw = |random: &mut [u8; 16]| {
            ck!(
                api,
                C_GenerateRandom(session, random.as_mut_ptr(), len(random.len()))
            )
        };
        expect(
            draw(&mut random),
            CKR_OK,
            &format!("random on the {kind} slot"),
        );
        let closed = std::thread::spawn(move || ck!(api, C_CloseSession(session)))
            .join()
            .unwrap();
        expect(closed, CKR_OK, "C_CloseSession on another thread");
        expect(
            draw(&mut random),
            CKR_SESSION_HANDLE_INVALID,
            &format!("random on the {kind} slot after another thread closed it"),
        );
    }
}

/// Answers to calls on object handles that name nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ObjectAnswers {
    get_attribute: CK_RV,
    destroy: CK_RV,
    sign_init: CK_RV,
    encrypt_init: CK_RV,
}

/// Calls on `object` (a handle that names nothing) in `session`.
fn object_answers(
    api: &Api,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> ObjectAnswers {
    let mut class: CK_OBJECT_CLASS = 0;
    let mut template = [CK_ATTRIBUTE {
        type_: CKA_CLASS,
        pValue: &mut class as *mut CK_OBJECT_CLASS as *mut c_void,
        ulValueLen: len(std::mem::size_of::<CK_OBJECT_CLASS>()),
    }];
    let mut ecdsa = mechanism(CKM_ECDSA);
    let mut iv = [0u8; 16];
    let mut cbc = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: iv.as_mut_ptr() as *mut c_void,
        ulParameterLen: 16,
    };
    ObjectAnswers {
        get_attribute: ck!(
            api,
            C_GetAttributeValue(session, object, template.as_mut_ptr(), 1)
        ),
        destroy: ck!(api, C_DestroyObject(session, object)),
        sign_init: ck!(api, C_SignInit(session, &mut ecdsa, object)),
        encrypt_init: ck!(api, C_EncryptInit(session, &mut cbc, object)),
    }
}

/// (handle 0, a destroyed data object, a destroyed private key) in `session`.
fn invalid_object_answers(api: &Api, session: CK_SESSION_HANDLE) -> [ObjectAnswers; 3] {
    let zero = object_answers(api, session, CK_INVALID_HANDLE);
    let data = data_object(api, session, "destroyed");
    expect(
        ck!(api, C_DestroyObject(session, data)),
        CKR_OK,
        "C_DestroyObject(data)",
    );
    let destroyed_data = object_answers(api, session, data);
    let (public_key, private_key) = ec_key_pair(api, session);
    expect(
        ck!(api, C_DestroyObject(session, private_key)),
        CKR_OK,
        "C_DestroyObject(private key)",
    );
    let destroyed_key = object_answers(api, session, private_key);
    expect(
        ck!(api, C_DestroyObject(session, public_key)),
        CKR_OK,
        "C_DestroyObject(public key)",
    );
    [zero, destroyed_data, destroyed_key]
}

#[test]
fn invalid_object_handles() {
    let ctx = Ctx::new();
    let softhsm_answers = ctx.ask_softhsm(invalid_object_answers);
    ctx.initialize();
    let api = ha();
    let cases = [
        "object handle 0",
        "a destroyed data object",
        "a destroyed private key",
    ];

    // Pass-through: what SoftHSM says, except that a key the *Init calls
    // cannot use is CKR_KEY_HANDLE_INVALID, as the specification requires
    // (SoftHSM says CKR_OBJECT_HANDLE_INVALID).
    let as_key = |rv| {
        if rv == CKR_OBJECT_HANDLE_INVALID {
            CKR_KEY_HANDLE_INVALID
        } else {
            rv
        }
    };
    let session = user_session(api, ctx.passthrough_slot());
    let answers = invalid_object_answers(api, session);
    for ((case, ours), theirs) in cases.iter().zip(answers).zip(softhsm_answers) {
        let spec = ObjectAnswers {
            sign_init: as_key(theirs.sign_init),
            encrypt_init: as_key(theirs.encrypt_init),
            ..theirs
        };
        assert_eq!(
            ours, spec,
            "pass-through slot, {case}: ours vs SoftHSM directly"
        );
    }

    // Virtual: the specification's answers; for *Init the specification
    // says CKR_KEY_HANDLE_INVALID, and SoftHSM's own answer is accepted too.
    let session = user_session(api, VIRTUAL_SLOT);
    let answers = invalid_object_answers(api, session);
    for ((case, ours), theirs) in cases.iter().zip(answers).zip(softhsm_answers) {
        let what = |call: &str| format!("{call} on the virtual slot with {case}");
        expect(
            ours.get_attribute,
            CKR_OBJECT_HANDLE_INVALID,
            &what("C_GetAttributeValue"),
        );
        expect(
            ours.destroy,
            CKR_OBJECT_HANDLE_INVALID,
            &what("C_DestroyObject"),
        );
        expect_one_of(
            ours.sign_init,
            &[CKR_KEY_HANDLE_INVALID, theirs.sign_init],
            &what("C_SignInit"),
        );
        expect_one_of(
            ours.encrypt_init,
            &[CKR_KEY_HANDLE_INVALID, theirs.encrypt_init],
            &what("C_EncryptInit"),
        );
    }
    // The refused *Init calls left no operation behind.
    let mut data = [0u8; 4];
    expect(
        ck!(api, C_SignUpdate(session, data.as_mut_ptr(), 4)),
        CKR_OPERATION_NOT_INITIALIZED,
        "C_SignUpdate after a refused C_SignInit on the virtual slot",
    );
}

/// Calls that take a slot ID, with otherwise good arguments.
fn calls_with_slot(api: &Api, slot: CK_SLOT_ID) -> Vec<(&'static str, CK_RV)> {
    let mut slot_info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    let mut token_info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    let mut mechanism_info: CK_MECHANISM_INFO = unsafe { std::mem::zeroed() };
    let mut count: CK_ULONG = 0;
    let mut session = CK_INVALID_HANDLE;
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    vec![
        (
            "C_GetSlotInfo",
            ck!(api, C_GetSlotInfo(slot, &mut slot_info)),
        ),
        (
            "C_GetTokenInfo",
            ck!(api, C_GetTokenInfo(slot, &mut token_info)),
        ),
        (
            "C_GetMechanismList",
            ck!(api, C_GetMechanismList(slot, ptr::null_mut(), &mut count)),
        ),
        (
            "C_GetMechanismInfo",
            ck!(
                api,
                C_GetMechanismInfo(slot, CKM_SHA256, &mut mechanism_info)
            ),
        ),
        (
            "C_OpenSession",
            ck!(
                api,
                C_OpenSession(slot, flags, ptr::null_mut(), None, &mut session)
            ),
        ),
        ("C_CloseAllSessions", ck!(api, C_CloseAllSessions(slot))),
    ]
}

#[test]
fn invalid_slot_ids() {
    let ctx = Ctx::new();
    // SoftHSM itself refuses a slot it does not have in every one of these
    // calls, so a pass-through slot naming that slot must too.
    let softhsm_answers = ctx.ask_softhsm(|api, _| calls_with_slot(api, 999_999));
    for (name, rv) in softhsm_answers {
        expect(
            rv,
            CKR_SLOT_ID_INVALID,
            &format!("SoftHSM {name}(slot 999999)"),
        );
    }
    ctx.initialize();
    let api = ha();
    let bad_slots = [
        999_999,
        (7 << 32) | 1,
        0x1000,
        1, // no group 01
        passthrough_slot_id(SOFTHSM_LIB_NAME, 999_999),
        CK_SLOT_ID::MAX,
    ];
    let mut wrong = Vec::new();
    for slot in bad_slots {
        for (name, rv) in calls_with_slot(api, slot) {
            if rv != CKR_SLOT_ID_INVALID {
                wrong.push(format!("{name}(slot {slot:#x}) gave {}", rv_name(rv)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "want CKR_SLOT_ID_INVALID, but: {wrong:#?}"
    );
}

#[test]
fn operations_without_init_are_not_initialized() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = user_session(api, slot);
        let mut data = [3u8; 32];
        let mut out = [0u8; 128];
        assert_eq!(out.len(), 128);
        let mut found = [CK_INVALID_HANDLE; 4];
        let mut count: CK_ULONG = 0;
        let out_len = || len(128);
        let answers = [
            (
                "C_SignUpdate",
                ck!(api, C_SignUpdate(session, data.as_mut_ptr(), 32)),
            ),
            (
                "C_Sign",
                ck!(
                    api,
                    C_Sign(
                        session,
                        data.as_mut_ptr(),
                        32,
                        out.as_mut_ptr(),
                        &mut out_len()
                    )
                ),
            ),
            (
                "C_SignFinal",
                ck!(api, C_SignFinal(session, out.as_mut_ptr(), &mut out_len())),
            ),
            (
                "C_Verify",
                ck!(
                    api,
                    C_Verify(session, data.as_mut_ptr(), 32, out.as_mut_ptr(), 64)
                ),
            ),
            (
                "C_EncryptUpdate",
                ck!(
                    api,
                    C_EncryptUpdate(
                        session,
                        data.as_mut_ptr(),
                        32,
                        out.as_mut_ptr(),
                        &mut out_len()
                    )
                ),
            ),
            (
                "C_Decrypt",
                ck!(
                    api,
                    C_Decrypt(
                        session,
                        data.as_mut_ptr(),
                        32,
                        out.as_mut_ptr(),
                        &mut out_len()
                    )
                ),
            ),
            (
                "C_DigestUpdate",
                ck!(api, C_DigestUpdate(session, data.as_mut_ptr(), 32)),
            ),
            (
                "C_Digest",
                ck!(
                    api,
                    C_Digest(
                        session,
                        data.as_mut_ptr(),
                        32,
                        out.as_mut_ptr(),
                        &mut out_len()
                    )
                ),
            ),
            (
                "C_FindObjects",
                ck!(
                    api,
                    C_FindObjects(session, found.as_mut_ptr(), 4, &mut count)
                ),
            ),
            ("C_FindObjectsFinal", ck!(api, C_FindObjectsFinal(session))),
        ];
        for (name, rv) in answers {
            expect(
                rv,
                CKR_OPERATION_NOT_INITIALIZED,
                &format!("{name} without init on the {kind} slot"),
            );
        }
        expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
    }
}

// ---------------------------------------------------------------------------
// Malformed mechanism parameters and templates (SoftHSM crashes or `exit`s
// on each of these; pkcs11-ha must answer them itself)
// ---------------------------------------------------------------------------

#[test]
fn malformed_mechanism_parameters_are_answered_without_reaching_a_member() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = user_session(api, slot);
        let key = aes_key(api, session);
        let mut iv = [0x24u8; 12];
        let mut aad = [0x11u8; 16];
        let good = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: 16,
            ulTagBits: 128,
        };
        let bad = [
            (
                "GCM pIv NULL, ulIvLen 12",
                CK_GCM_PARAMS {
                    pIv: ptr::null_mut(),
                    ..good
                },
            ),
            (
                "GCM pAAD NULL, ulAADLen 16",
                CK_GCM_PARAMS {
                    pAAD: ptr::null_mut(),
                    ..good
                },
            ),
            (
                "GCM ulIvLen 2^40",
                CK_GCM_PARAMS {
                    ulIvLen: 1 << 40,
                    ..good
                },
            ),
            (
                "GCM ulTagBits 1024",
                CK_GCM_PARAMS {
                    ulTagBits: 1024,
                    ..good
                },
            ),
        ];
        for (what, mut params) in bad {
            let mut mech = CK_MECHANISM {
                mechanism: CKM_AES_GCM,
                pParameter: &mut params as *mut CK_GCM_PARAMS as *mut c_void,
                ulParameterLen: len(std::mem::size_of::<CK_GCM_PARAMS>()),
            };
            expect(
                ck!(api, C_EncryptInit(session, &mut mech, key)),
                CKR_MECHANISM_PARAM_INVALID,
                &format!("C_EncryptInit with {what} on the {kind} slot"),
            );
            expect(
                ck!(api, C_DecryptInit(session, &mut mech, key)),
                CKR_MECHANISM_PARAM_INVALID,
                &format!("C_DecryptInit with {what} on the {kind} slot"),
            );
        }
        let mut null_with_length = CK_MECHANISM {
            mechanism: CKM_AES_CBC_PAD,
            pParameter: ptr::null_mut(),
            ulParameterLen: 16,
        };
        expect(
            ck!(api, C_EncryptInit(session, &mut null_with_length, key)),
            CKR_ARGUMENTS_BAD,
            &format!("C_EncryptInit with a NULL parameter of length 16 on the {kind} slot"),
        );
        let (_, private_key) = ec_key_pair(api, session);
        let mut ecdh = CK_ECDH1_DERIVE_PARAMS {
            kdf: CKD_NULL,
            ulSharedDataLen: 0,
            pSharedData: ptr::null_mut(),
            ulPublicDataLen: 65,
            pPublicData: ptr::null_mut(),
        };
        let mut derive = CK_MECHANISM {
            mechanism: CKM_ECDH1_DERIVE,
            pParameter: &mut ecdh as *mut CK_ECDH1_DERIVE_PARAMS as *mut c_void,
            ulParameterLen: len(std::mem::size_of::<CK_ECDH1_DERIVE_PARAMS>()),
        };
        let mut derived = CK_INVALID_HANDLE;
        expect(
            ck!(
                api,
                C_DeriveKey(
                    session,
                    &mut derive,
                    private_key,
                    ptr::null_mut(),
                    0,
                    &mut derived
                )
            ),
            CKR_MECHANISM_PARAM_INVALID,
            &format!("C_DeriveKey(ECDH1) with pPublicData NULL on the {kind} slot"),
        );

        // The member is still there: the well-formed parameter works.
        let mut params = good;
        let mut mech = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: &mut params as *mut CK_GCM_PARAMS as *mut c_void,
            ulParameterLen: len(std::mem::size_of::<CK_GCM_PARAMS>()),
        };
        expect(
            ck!(api, C_EncryptInit(session, &mut mech, key)),
            CKR_OK,
            &format!("C_EncryptInit with good GCM parameters on the {kind} slot"),
        );
    }
}

#[test]
fn malformed_template_values_are_answered_without_reaching_a_member() {
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        let session = user_session(api, slot);
        let ec_params_null = CK_ATTRIBUTE {
            type_: CKA_EC_PARAMS,
            pValue: ptr::null_mut(),
            ulValueLen: 5,
        };
        let ec_params_huge = CK_ATTRIBUTE {
            ulValueLen: 1 << 40,
            ..attr_bytes(CKA_EC_PARAMS, &P256)
        };
        let private = [attr(CKA_SIGN, &YES), attr(CKA_TOKEN, &NO)];
        for (what, ec_params) in [
            ("{NULL, 5}", ec_params_null),
            ("{P256, 2^40}", ec_params_huge),
        ] {
            let mut mech = mechanism(CKM_EC_KEY_PAIR_GEN);
            let public = [ec_params, attr(CKA_VERIFY, &YES), attr(CKA_TOKEN, &NO)];
            let (mut public_key, mut private_key) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
            let rv = ck!(
                api,
                C_GenerateKeyPair(
                    session,
                    &mut mech,
                    public.as_ptr() as *mut _,
                    len(public.len()),
                    private.as_ptr() as *mut _,
                    len(private.len()),
                    &mut public_key,
                    &mut private_key,
                )
            );
            expect(
                rv,
                CKR_ATTRIBUTE_VALUE_INVALID,
                &format!("C_GenerateKeyPair(EC) with CKA_EC_PARAMS {what} on the {kind} slot"),
            );
        }
        let class: CK_OBJECT_CLASS = CKO_DATA;
        let null_value = [
            attr(CKA_CLASS, &class),
            attr(CKA_TOKEN, &NO),
            CK_ATTRIBUTE {
                type_: CKA_VALUE,
                pValue: ptr::null_mut(),
                ulValueLen: 9,
            },
        ];
        let mut object = CK_INVALID_HANDLE;
        expect(
            ck!(
                api,
                C_CreateObject(session, null_value.as_ptr() as *mut _, 3, &mut object)
            ),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_CreateObject with a NULL CKA_VALUE of length 9 on the {kind} slot"),
        );
        expect(
            ck!(
                api,
                C_FindObjectsInit(session, null_value.as_ptr() as *mut _, 3)
            ),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_FindObjectsInit with a NULL CKA_VALUE of length 9 on the {kind} slot"),
        );
        let nested = [CK_ATTRIBUTE {
            type_: CKA_WRAP_TEMPLATE,
            pValue: null_value.as_ptr() as *mut c_void,
            ulValueLen: len(std::mem::size_of_val(&null_value)),
        }];
        let data = data_object(api, session, "nested");
        expect(
            ck!(
                api,
                C_SetAttributeValue(session, data, nested.as_ptr() as *mut _, 1)
            ),
            CKR_ATTRIBUTE_VALUE_INVALID,
            &format!("C_SetAttributeValue with a bad nested template on the {kind} slot"),
        );
        // A NULL value still asks for a length where that is the rule.
        let mut ask = [CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        }];
        expect(
            ck!(api, C_GetAttributeValue(session, data, ask.as_mut_ptr(), 1)),
            CKR_OK,
            &format!("C_GetAttributeValue length query on the {kind} slot"),
        );
        assert_eq!(ask[0].ulValueLen, len(b"bad input".len()));
        // The member is still there.
        ec_key_pair(api, session);
    }
}

// ---------------------------------------------------------------------------
// Sessions closed under running calls (SoftHSM crashes when a session is
// closed while another thread is inside `C_Sign` on it)
// ---------------------------------------------------------------------------

/// `PKCS11HA_GetGroupStatus` of the virtual slot.
fn group_status() -> pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS {
    type GetGroupStatus =
        unsafe extern "C" fn(CK_SLOT_ID, *mut pkcs11_ha::state_api::PKCS11HA_GROUP_STATUS) -> CK_RV;
    // SAFETY: the symbol has this signature; the library stays loaded, and
    // the status is plain data for which all-zero is valid.
    unsafe {
        let get = ha()
            .library
            .get::<GetGroupStatus>(b"PKCS11HA_GetGroupStatus\0")
            .expect("PKCS11HA_GetGroupStatus exported");
        let mut status = std::mem::zeroed();
        expect(
            get(VIRTUAL_SLOT, &mut status),
            CKR_OK,
            "PKCS11HA_GetGroupStatus",
        );
        status
    }
}

#[test]
fn sessions_closed_under_running_signatures_crash_nothing_and_fault_no_member() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    const ROUNDS: usize = 15;
    const SIGNERS: usize = 3;
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        // Keeps the login and the key for the whole test.
        let keeper = user_session(api, slot);
        let (_, key) = ec_key_pair(api, keeper);
        for round in 0..ROUNDS {
            let sessions: Vec<CK_SESSION_HANDLE> =
                (0..SIGNERS).map(|_| open_session(api, slot)).collect();
            let signed = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for &session in &sessions {
                    let signed = &signed;
                    scope.spawn(move || {
                        let digest = [0x5au8; 32];
                        loop {
                            let mut mech = mechanism(CKM_ECDSA);
                            let rv = ck!(api, C_SignInit(session, &mut mech, key));
                            if rv == CKR_SESSION_HANDLE_INVALID {
                                return;
                            }
                            expect(rv, CKR_OK, &format!("C_SignInit on the {kind} slot"));
                            let mut signature = [0u8; 64];
                            let mut signature_len = len(signature.len());
                            let rv = ck!(
                                api,
                                C_Sign(
                                    session,
                                    digest.as_ptr() as *mut _,
                                    len(digest.len()),
                                    signature.as_mut_ptr(),
                                    &mut signature_len
                                )
                            );
                            if rv == CKR_SESSION_HANDLE_INVALID {
                                return;
                            }
                            expect(rv, CKR_OK, &format!("C_Sign on the {kind} slot"));
                            signed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                // Close only once every signer is well under way.
                let deadline = Instant::now() + Duration::from_secs(30);
                while signed.load(Ordering::Relaxed) < 4 * SIGNERS {
                    assert!(Instant::now() < deadline, "the signers never got going");
                    std::thread::yield_now();
                }
                for &session in &sessions {
                    expect(
                        ck!(api, C_CloseSession(session)),
                        CKR_OK,
                        &format!(
                            "C_CloseSession under a running C_Sign, {kind} slot, round {round}"
                        ),
                    );
                }
            });
        }
        if slot == VIRTUAL_SLOT {
            let status = group_status();
            for member in &status.members[..status.memberCount as usize] {
                assert_eq!(
                    (member.state, member.lastFault, member.consecutiveFailures),
                    (pkcs11_ha::state_api::PKCS11HA_STATE_UP, CKR_OK, 0),
                    "a member was taken for faulty after sessions were closed under its calls"
                );
            }
        }
        // The keeper still works: nothing else was closed with them.
        let mut mech = mechanism(CKM_ECDSA);
        expect(
            ck!(api, C_SignInit(keeper, &mut mech, key)),
            CKR_OK,
            &format!("C_SignInit on the keeper session, {kind} slot"),
        );
    }
}

#[test]
fn all_sessions_closed_under_running_signatures_crash_nothing_and_fault_no_member() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    const ROUNDS: usize = 10;
    const SIGNERS: usize = 4;
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        for round in 0..ROUNDS {
            // Closed with the others: the login and the key go with it.
            let keeper = user_session(api, slot);
            let (_, key) = ec_key_pair(api, keeper);
            let sessions: Vec<CK_SESSION_HANDLE> =
                (0..SIGNERS).map(|_| open_session(api, slot)).collect();
            let signed = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for &session in &sessions {
                    let signed = &signed;
                    scope.spawn(move || {
                        let digest = [0x5au8; 32];
                        // Until its own session is gone, every call works:
                        // the key and the login go only once no call is
                        // inside any of the sessions closed together.
                        let check = |rv: CK_RV, what: &str| {
                            expect(rv, CKR_OK, &format!("{what} on the {kind} slot"))
                        };
                        loop {
                            let mut mech = mechanism(CKM_ECDSA);
                            let rv = ck!(api, C_SignInit(session, &mut mech, key));
                            if rv == CKR_SESSION_HANDLE_INVALID {
                                return;
                            }
                            check(rv, "C_SignInit");
                            let mut signature = [0u8; 64];
                            let mut signature_len = len(signature.len());
                            let rv = ck!(
                                api,
                                C_Sign(
                                    session,
                                    digest.as_ptr() as *mut _,
                                    len(digest.len()),
                                    signature.as_mut_ptr(),
                                    &mut signature_len
                                )
                            );
                            if rv == CKR_SESSION_HANDLE_INVALID {
                                return;
                            }
                            check(rv, "C_Sign");
                            signed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while signed.load(Ordering::Relaxed) < 4 * SIGNERS {
                    assert!(Instant::now() < deadline, "the signers never got going");
                    std::thread::yield_now();
                }
                expect(
                    ck!(api, C_CloseAllSessions(slot)),
                    CKR_OK,
                    &format!("C_CloseAllSessions under running C_Sign, {kind} slot, round {round}"),
                );
            });
        }
        if slot == VIRTUAL_SLOT {
            let status = group_status();
            for member in &status.members[..status.memberCount as usize] {
                assert_eq!(
                    (member.state, member.lastFault, member.consecutiveFailures),
                    (pkcs11_ha::state_api::PKCS11HA_STATE_UP, CKR_OK, 0),
                    "a member was taken for faulty after C_CloseAllSessions under its calls"
                );
            }
        }
        // The slot still serves.
        let session = user_session(api, slot);
        ec_key_pair(api, session);
    }
}

#[test]
fn logout_under_running_signatures_crashes_nothing_and_faults_no_member() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    const ROUNDS: usize = 5;
    const SIGNERS: usize = 4;
    let ctx = Ctx::started();
    let api = ha();
    for (kind, slot) in ctx.slots() {
        for round in 0..ROUNDS {
            // A private session key: the logout takes it away (the
            // specification destroys private session objects at logout).
            let keeper = user_session(api, slot);
            let (_, key) = ec_key_pair(api, keeper);
            let sessions: Vec<CK_SESSION_HANDLE> =
                (0..SIGNERS).map(|_| open_session(api, slot)).collect();
            let signed = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for &session in &sessions {
                    let signed = &signed;
                    scope.spawn(move || {
                        let digest = [0x5au8; 32];
                        // Every answer is OK until the logout, then the
                        // specification's answer for a key gone with it.
                        let gone = [
                            CKR_USER_NOT_LOGGED_IN,
                            CKR_KEY_HANDLE_INVALID,
                            CKR_OBJECT_HANDLE_INVALID,
                        ];
                        loop {
                            let mut mech = mechanism(CKM_ECDSA);
                            let rv = ck!(api, C_SignInit(session, &mut mech, key));
                            if rv != CKR_OK {
                                expect_one_of(rv, &gone, &format!("C_SignInit, {kind} slot"));
                                return;
                            }
                            let mut signature = [0u8; 64];
                            let mut signature_len = len(signature.len());
                            let rv = ck!(
                                api,
                                C_Sign(
                                    session,
                                    digest.as_ptr() as *mut _,
                                    len(digest.len()),
                                    signature.as_mut_ptr(),
                                    &mut signature_len
                                )
                            );
                            if rv != CKR_OK {
                                let ended = [&gone[..], &[CKR_OPERATION_NOT_INITIALIZED]].concat();
                                expect_one_of(rv, &ended, &format!("C_Sign, {kind} slot"));
                                return;
                            }
                            signed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                while signed.load(Ordering::Relaxed) < 4 * SIGNERS {
                    assert!(Instant::now() < deadline, "the signers never got going");
                    std::thread::yield_now();
                }
                expect(
                    ck!(api, C_Logout(keeper)),
                    CKR_OK,
                    &format!("C_Logout under running C_Sign, {kind} slot, round {round}"),
                );
            });
            for session in sessions.into_iter().chain([keeper]) {
                expect(ck!(api, C_CloseSession(session)), CKR_OK, "C_CloseSession");
            }
        }
        if slot == VIRTUAL_SLOT {
            let status = group_status();
            for member in &status.members[..status.memberCount as usize] {
                assert_eq!(
                    (member.state, member.lastFault, member.consecutiveFailures),
                    (pkcs11_ha::state_api::PKCS11HA_STATE_UP, CKR_OK, 0),
                    "a member was taken for faulty after C_Logout under its calls"
                );
            }
        }
        // The slot still serves a new login.
        let session = user_session(api, slot);
        ec_key_pair(api, session);
    }
}
