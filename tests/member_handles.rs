//! A member handle is used only on the connection it was learned on.
//! `p11-kit server` runs a worker (its own SoftHSM) per client
//! connection, and each numbers the token's objects in the order it meets
//! them: two connections to one server name different objects by the same
//! number, and so does a connection made again after a reconnect
//! (checked with real p11-kit 0.24 and SoftHSM 2.6.1, docs/design.md
//! "Handles"). The in-memory member numbers its objects afresh at each
//! connection ([`Fault::RenumberOnReconnect`]), so a handle from before a
//! reconnect names another key after it: each test below makes a member
//! reconnect at the one point of a call where the old code went on with
//! such a handle, and checks that an AES-ECB encryption with the key gives
//! the key's own ciphertext (the model's keystream of the key's value).
//!
//! Owns: in-memory members, their groups and hosts; nothing on disk.

mod common;
mod memory_member;

use cryptoki_sys::*;
use memory_member::host::MemoryHost;
use memory_member::token::{self, Fault, FIRST_SLOT};
use memory_member::SimMember;
use parking_lot::Mutex;
use pkcs11_ha::arguments::{OutArray, Template};
use pkcs11_ha::config::DEFAULT_MULTIPART_REPLAY_LIMIT;
use pkcs11_ha::group::{log_in_member, Group, GroupSettings, Location, MemberState};
use pkcs11_ha::mechanism::Mechanism;
use pkcs11_ha::member_api::{MemberApi, MemberBackend};
use pkcs11_ha::recovery;
use pkcs11_ha::virtual_session::{Input, OpKind, Step, VirtualSession};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The keys each token holds, made outside the group in this order, so
/// that a new connection (numbering newest first) gives the first one's
/// old number to another.
const KEYS: [&[u8]; 3] = [b"key one", b"key two", b"key three"];
const DATA: &[u8] = b"thirty-two bytes of plaintext!!!";
/// How long a test waits for a condition another thread brings about.
const PATIENCE: Duration = Duration::from_secs(60);

fn key_value(label: &[u8]) -> Vec<u8> {
    let mut value = label.to_vec();
    value.resize(32, b'.');
    value
}

/// What AES-ECB with the key labelled `label` makes of [`DATA`] in the
/// model.
fn expected_ciphertext(label: &[u8]) -> Vec<u8> {
    let mut data = DATA.to_vec();
    token::keystream_xor(&key_value(label), 0, &mut data);
    data
}

/// A networked in-memory library of one token holding [`KEYS`].
fn networked_member(index: usize, seed: u64) -> SimMember {
    let library = SimMember::new(&format!("net{index}"), 1, index, true, seed);
    library
        .initialize()
        .expect("an in-memory library initialises");
    let mut session = CK_INVALID_HANDLE;
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    assert_eq!(
        library.open_session(FIRST_SLOT, flags, &mut session),
        CKR_OK
    );
    for label in KEYS {
        let class: CK_OBJECT_CLASS = CKO_SECRET_KEY;
        let key_type: CK_KEY_TYPE = CKK_AES;
        let yes: CK_BBOOL = CK_TRUE;
        let no: CK_BBOOL = CK_FALSE;
        let value = key_value(label);
        let attribute = |type_, value: *const std::ffi::c_void, len: usize| CK_ATTRIBUTE {
            type_,
            pValue: value as *mut _,
            ulValueLen: len as CK_ULONG,
        };
        let ulong = std::mem::size_of::<CK_ULONG>();
        let template = [
            attribute(CKA_CLASS, &class as *const _ as *const _, ulong),
            attribute(CKA_KEY_TYPE, &key_type as *const _ as *const _, ulong),
            attribute(CKA_TOKEN, &yes as *const _ as *const _, 1),
            attribute(CKA_PRIVATE, &no as *const _ as *const _, 1),
            attribute(CKA_ENCRYPT, &yes as *const _ as *const _, 1),
            attribute(CKA_LABEL, label.as_ptr() as *const _, label.len()),
            attribute(CKA_VALUE, value.as_ptr() as *const _, value.len()),
        ];
        let mut handle = CK_INVALID_HANDLE;
        assert_eq!(
            library.create_object(session, Some(&template), &mut handle),
            CKR_OK
        );
    }
    assert_eq!(library.close_session(session), CKR_OK);
    library
}

/// A group of two networked members, the second as `second` makes it,
/// with a host for recovery and a virtual session logged in as the
/// provider's `C_Login` does it.
fn two_members(
    second: SimMember,
) -> (
    Vec<Arc<SimMember>>,
    Arc<Group>,
    Arc<MemoryHost>,
    VirtualSession,
) {
    pkcs11_ha::clock::install_manual();
    let libraries = vec![Arc::new(networked_member(0, 61)), Arc::new(second)];
    let serials: Vec<String> = libraries
        .iter()
        .map(|l| l.sim.lock().tokens[0].serial.clone())
        .collect();
    let settings = GroupSettings {
        domain_label: String::from_utf8(token::DOMAIN_LABEL.to_vec()).unwrap(),
        replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
        min_replicas: 1,
        member_timeout: Duration::from_secs(1),
    };
    let group = Group::new(0, "handles", "handles".into(), 0, &serials, &[], settings);
    for (position, library) in libraries.iter().enumerate() {
        let location = Location {
            library: Arc::clone(library) as Arc<dyn MemberBackend>,
            slot: FIRST_SLOT,
        };
        group.attach(position, location);
    }
    let group = Arc::new(group);
    let host = Arc::new(MemoryHost::of(&group, &libraries));
    let v = VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION | CKF_RW_SESSION)
        .expect("a virtual session opens");
    v.first_decides("C_Login", |l, s| {
        log_in_member(l, s, CKU_USER, Some(token::USER_PIN))
    })
    .expect("the group logs in");
    group.cache_login(CKU_USER, Some(token::USER_PIN));
    v.look_up_domain_keys();
    (libraries, group, host, v)
}

/// The virtual handle of the key labelled `label`, found through the
/// group (on member 0, the search's first choice).
fn find_key(v: &VirtualSession, label: &[u8]) -> CK_OBJECT_HANDLE {
    let mut attributes = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: label.as_ptr() as *mut _,
        ulValueLen: label.len() as CK_ULONG,
    }];
    // SAFETY: one attribute whose value lives until the search starts.
    let template =
        unsafe { Template::giving_values(attributes.as_mut_ptr(), 1) }.expect("template");
    v.find_init(&template).expect("C_FindObjectsInit");
    let mut found = [0; 4];
    let mut count = 0;
    // SAFETY: room for four handles, alive for the call.
    let mut out = unsafe { OutArray::new(found.as_mut_ptr(), 4) }.expect("out array");
    v.find(&mut out, &mut count).expect("C_FindObjects");
    v.step(
        OpKind::Find,
        Step::Finish {
            length_query: false,
        },
        Input::None,
        "C_FindObjectsFinal",
        |l, m| l.find_objects_final(m),
    )
    .expect("C_FindObjectsFinal");
    assert_eq!(count, 1, "one key labelled {label:?}");
    found[0]
}

/// AES-ECB of [`DATA`] with `key` through the group.
fn encrypt(v: &VirtualSession, key: CK_OBJECT_HANDLE) -> Vec<u8> {
    let mut raw = CK_MECHANISM {
        mechanism: CKM_AES_ECB,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    // SAFETY: a mechanism without a parameter, alive for the call.
    let ecb = unsafe { Mechanism::new(&mut raw) }.expect("a valid mechanism");
    v.init(
        OpKind::Encrypt,
        Some(&ecb),
        Some(key),
        "C_EncryptInit",
        |l, s, k| l.encrypt_init(s, ecb.as_raw(), k),
    )
    .expect("C_EncryptInit");
    let mut out = vec![0u8; DATA.len()];
    let mut len = out.len() as CK_ULONG;
    v.step(
        OpKind::Encrypt,
        Step::Finish {
            length_query: false,
        },
        Input::Data(DATA),
        "C_Encrypt",
        |l, s| l.encrypt(s, Some(DATA), Some(&mut out[..]), &mut len),
    )
    .expect("C_Encrypt");
    out.truncate(len as usize);
    out
}

/// Takes member 1 out as a reset connection does and starts its recovery
/// in a thread of its own (the stalled call holds what recovery may take
/// later), returning once recovery has reconnected the member and
/// forgotten its handles -- from then on the stalled call's handle names
/// another key -- and the member is recovering, or back with `back`.
fn reconnect_member_1(
    group: &Arc<Group>,
    host: &Arc<MemoryHost>,
    library: &Arc<SimMember>,
    back: bool,
) -> std::thread::JoinHandle<()> {
    let connection = library.connection();
    group.members[1].fail(CKR_DEVICE_ERROR);
    library.sim.lock().disconnect();
    let recovering = Arc::clone(host);
    let recovery = std::thread::spawn(move || recovery::recover_failed_members(&*recovering));
    let deadline = Instant::now() + PATIENCE;
    // Recovery forgets the member's handles right before it marks the
    // member recovering.
    let state = || group.members[1].state();
    while library.connection() == connection
        || state() == MemberState::Down
        || (back && state() != MemberState::Up)
    {
        assert!(
            Instant::now() < deadline,
            "recovery reconnects member 1 and forgets its handles"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    recovery
}

/// A lookup of a key on a member that finished as recovery reconnected
/// the member (the search was done; the thread had yet to record what it
/// found) recorded a handle of the old connection. On the new one that
/// number names another key, and every later call with the key there used
/// it. Now the lookup is made again on the new connection.
#[test]
fn a_lookup_finishing_as_its_member_reconnects_records_no_old_handle() {
    let (libraries, group, host, v) = two_members(networked_member(1, 62));
    let key = find_key(&v, KEYS[0]);
    group.open_utility_sessions();
    libraries[1]
        .sim
        .lock()
        .set_fault(0, Fault::RenumberOnReconnect);

    // The lookup on member 1 searches its utility session: init, two
    // fetches (the key, then none), final. The final is held while the
    // member reconnects.
    let calls = Mutex::new(0);
    let (held_tx, held) = mpsc::sync_channel(1);
    let held_tx = Mutex::new(Some(held_tx));
    let (weak_group, weak_host, weak_library) = (
        Arc::downgrade(&group),
        Arc::downgrade(&host),
        Arc::downgrade(&libraries[1]),
    );
    libraries[1].on_stall(move |token| {
        let (Some(group), Some(host), Some(library)) = (
            weak_group.upgrade(),
            weak_host.upgrade(),
            weak_library.upgrade(),
        ) else {
            return;
        };
        let mut calls = calls.lock();
        *calls += 1;
        if *calls < 4 {
            library.sim.lock().set_fault(token, Fault::Stall);
            return;
        }
        if let Some(held) = held_tx.lock().take() {
            // Not back yet: recovery waits for the session the lookup holds.
            let recovery = reconnect_member_1(&group, &host, &library, false);
            held.send(recovery)
                .expect("the test waits for the reconnect");
        }
    });
    libraries[1].sim.lock().set_fault(0, Fault::Stall);
    let found = v.resolve(key, 1).expect("the key is looked up on member 1");
    held.recv_timeout(PATIENCE)
        .expect("the lookup's final call was held")
        .join()
        .expect("recovery runs");
    assert_eq!(
        group.members[1].state(),
        MemberState::Up,
        "member 1 is back"
    );

    // Member 1 alone serves the key from now on.
    group.member_failed(0, "C_Encrypt", CKR_DEVICE_ERROR);
    assert!(found.is_some(), "member 1 holds the key");
    assert_eq!(
        encrypt(&v, key),
        expected_ciphertext(KEYS[0]),
        "member 1 encrypted with the key itself"
    );
    v.close();
}

/// An operation whose member was chosen, its key's handle looked up, and
/// which then waited for a spare instance of the member (a spare's
/// connection is set up, and logged in, at its first use: a new server
/// process, hundreds of times a signature) went to the member's own
/// session when the spare could not serve -- with the handle looked up
/// before, though the member had reconnected meanwhile. Now a call whose
/// handles were looked up before the member's handles were forgotten is
/// not made, and the key is looked up again.
#[test]
fn an_operation_back_from_a_spare_after_a_reconnect_looks_its_key_up_again() {
    let (libraries, group, host, v) = two_members(networked_member(1, 63).with_spares(1));
    let key = find_key(&v, KEYS[0]);
    // Member 0 out for good: member 1 serves the key alone.
    libraries[0].sim.lock().set_fault(0, Fault::Crash);
    group.member_failed(0, "C_Encrypt", CKR_DEVICE_ERROR);
    assert!(
        v.resolve(key, 1).expect("the key is looked up").is_some(),
        "member 1 holds the key"
    );
    libraries[1]
        .sim
        .lock()
        .set_fault(0, Fault::RenumberOnReconnect);

    // The spare's session is opened, and the member reconnects before
    // the spare is logged in there: its session went with the connection.
    let (held_tx, held) = mpsc::sync_channel(1);
    let held_tx = Mutex::new(Some(held_tx));
    let (weak_group, weak_host, weak_library) = (
        Arc::downgrade(&group),
        Arc::downgrade(&host),
        Arc::downgrade(&libraries[1]),
    );
    libraries[1].on_stall(move |_| {
        let (Some(group), Some(host), Some(library)) = (
            weak_group.upgrade(),
            weak_host.upgrade(),
            weak_library.upgrade(),
        ) else {
            return;
        };
        if let Some(held) = held_tx.lock().take() {
            let recovery = reconnect_member_1(&group, &host, &library, true);
            held.send(recovery)
                .expect("the test waits for the reconnect");
        }
    });
    libraries[1].sim.lock().set_fault(0, Fault::SpareStall);
    let ciphertext = encrypt(&v, key);
    held.recv_timeout(PATIENCE)
        .expect("the spare's session was held")
        .join()
        .expect("recovery runs");
    assert_eq!(
        group.members[1].state(),
        MemberState::Up,
        "member 1 is back"
    );
    assert_eq!(
        ciphertext,
        expected_ciphertext(KEYS[0]),
        "member 1 encrypted with the key itself"
    );
    v.close();
}
