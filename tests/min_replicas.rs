//! `VirtualTokenNNMinReplicas`: a call that makes an object returns OK only
//! once the object is on that many members; otherwise it is removed from
//! every member and the call fails. Here one of three members is missing
//! (its token does not exist), so two copies can be made, never three; and,
//! on in-memory members (`memory_member`), a member that returns while such
//! a call is under way is left no copy either.

mod common;
mod memory_member;

use common::*;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki_sys::*;
use memory_member::host::{MemoryHost, MEMBER_TIMEOUT};
use memory_member::token::{Fault, DOMAIN_LABEL, FIRST_SLOT, USER_PIN};
use memory_member::SimMember;
use pkcs11_ha::arguments::Template;
use pkcs11_ha::config::DEFAULT_MULTIPART_REPLAY_LIMIT;
use pkcs11_ha::group::{log_in_member, Group, GroupSettings, Location, MemberState};
use pkcs11_ha::member_api::MemberBackend;
use pkcs11_ha::recovery;
use pkcs11_ha::virtual_session::VirtualSession;
use std::fs;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A serial no token has: the third member is down from the start.
const ABSENT: &str = "0123456789abcdef";

fn start(min_replicas: usize) -> Fixture {
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["member0", "member1"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let mut members = hsm.serials();
    members.push(ABSENT.to_string());
    let text = config_text(
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    )
    .replace(
        "[VirtualToken]\n",
        &format!("[VirtualToken]\nVirtualToken00MinReplicas = {min_replicas}\n"),
    );
    let config = hsm.dir.path().join("pkcs11-ha.conf");
    fs::write(&config, text).unwrap();
    Fixture::start_with_guard(guard, hsm, config)
}

fn rv<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> RvError {
    match result {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn data(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Value(b"payload".to_vec()),
    ]
}

fn aes(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Encrypt(true),
    ]
}

/// How many objects labelled `label` each present member holds.
fn copies(fixture: &Fixture, label: &str) -> Vec<usize> {
    (0..2)
        .map(|member| {
            let session = user_session(&fixture.pkcs11, fixture.member_slot(member));
            session
                .find_objects(&[Attribute::Label(label.into())])
                .unwrap()
                .len()
        })
        .collect()
}

#[test]
fn an_object_on_fewer_members_than_asked_is_undone_everywhere() {
    let fixture = start(3);
    let session = fixture.user_session();
    assert_eq!(
        rv(session.create_object(&data("imported"))),
        RvError::FunctionFailed
    );
    assert_eq!(
        rv(session.generate_key(&Mechanism::AesKeyGen, &aes("generated"))),
        RvError::FunctionFailed
    );
    drop(session);
    assert_eq!(copies(&fixture, "imported"), [0, 0]);
    assert_eq!(copies(&fixture, "generated"), [0, 0]);
}

#[test]
fn an_object_on_enough_members_is_made() {
    let fixture = start(2);
    let session = fixture.user_session();
    session.create_object(&data("imported")).unwrap();
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &aes("generated"))
        .unwrap();
    session
        .copy_object(key, &[Attribute::Label("copied".into())])
        .unwrap();
    drop(session);
    for label in ["imported", "generated", "copied"] {
        assert_eq!(copies(&fixture, label), [1, 1], "{label}");
    }
}

/// A group of the `count` tokens of `library` that wants each object on
/// `min_replicas` members, each attached as at start-up, and a virtual
/// session on it, logged in.
fn memory_group(
    library: &Arc<SimMember>,
    count: usize,
    min_replicas: usize,
) -> (Arc<Group>, VirtualSession) {
    pkcs11_ha::clock::install_manual();
    let serials: Vec<String> = (0..count)
        .map(|token| library.sim.lock().tokens[token].serial.clone())
        .collect();
    let settings = GroupSettings {
        domain_label: String::from_utf8(DOMAIN_LABEL.to_vec()).unwrap(),
        replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
        min_replicas,
        member_timeout: MEMBER_TIMEOUT,
    };
    let group = Group::new(0, "replicas", "replicas".into(), 0, &serials, &[], settings);
    for position in 0..count {
        let location = Location {
            library: Arc::clone(library) as Arc<dyn MemberBackend>,
            slot: FIRST_SLOT + position as CK_SLOT_ID,
        };
        group.attach(position, location);
    }
    let group = Arc::new(group);
    let v = VirtualSession::open(Arc::clone(&group), CKF_SERIAL_SESSION | CKF_RW_SESSION)
        .expect("a virtual session opens");
    v.first_decides("C_Login", |l, s| {
        log_in_member(l, s, CKU_USER, Some(USER_PIN))
    })
    .expect("the group logs in");
    group.cache_login(CKU_USER, Some(USER_PIN));
    v.look_up_domain_keys();
    (group, v)
}

/// How many token objects labelled `label` each token of `library` holds,
/// read from the model itself.
fn memory_copies(library: &SimMember, label: &[u8]) -> Vec<usize> {
    let sim = library.sim.lock();
    sim.tokens
        .iter()
        .map(|t| {
            t.token_objects()
                .filter(|o| o.attributes.get(&CKA_LABEL).map(Vec::as_slice) == Some(label))
                .count()
        })
        .collect()
}

/// Four members, member 3 down for good; member 2 returns while an import
/// is under way -- made on member 0, inside member 1 -- and its
/// synchronisation (`[HASynchronize]` on) lists member 0, where the group
/// already knows the object. Returns the import's answer and the copies on
/// each member while it was under way and afterwards.
fn import_while_a_member_returns(min_replicas: usize, seed: u64) -> Imported {
    let label = b"imported while member 2 returned";
    let library = Arc::new(SimMember::initialized(4, seed));
    let (group, v) = memory_group(&library, 4, min_replicas);
    let host = MemoryHost::synchronizing(&group, &library);
    library.sim.lock().set_fault(3, Fault::Crash);
    group.member_failed(3, "C_Sign", CKR_DEVICE_ERROR);
    group.member_failed(2, "C_Sign", CKR_DEVICE_ERROR);
    // The import is carried out on member 1 and stays inside it, its
    // answer not yet back, until the test lets it go.
    let (stalled_tx, stalled) = mpsc::sync_channel(1);
    let (resume, resume_rx) = mpsc::channel::<()>();
    let gate = parking_lot::Mutex::new(Some((stalled_tx, resume_rx)));
    library.on_stall(move |_| {
        if let Some((stalled, resume)) = gate.lock().take() {
            stalled.send(()).expect("the test waits for the stall");
            resume.recv().expect("the test ends the stall");
        }
    });
    library.sim.lock().set_fault(1, Fault::StallAfterChange);

    let import = || {
        let (token, no): (CK_BBOOL, CK_BBOOL) = (CK_TRUE, CK_FALSE);
        let class: CK_OBJECT_CLASS = CKO_DATA;
        let value = b"made on every member or none";
        let attribute = |type_, value: *const std::ffi::c_void, len: usize| CK_ATTRIBUTE {
            type_,
            pValue: value as *mut _,
            ulValueLen: len as CK_ULONG,
        };
        let mut attributes = [
            attribute(
                CKA_CLASS,
                &class as *const _ as *const _,
                std::mem::size_of::<CK_OBJECT_CLASS>(),
            ),
            attribute(CKA_TOKEN, &token as *const _ as *const _, 1),
            attribute(CKA_PRIVATE, &no as *const _ as *const _, 1),
            attribute(CKA_LABEL, label.as_ptr() as *const _, label.len()),
            attribute(CKA_VALUE, value.as_ptr() as *const _, value.len()),
        ];
        // SAFETY: attributes whose values live until the call returns.
        let template = unsafe {
            Template::giving_values(attributes.as_mut_ptr(), attributes.len() as CK_ULONG)
        }
        .expect("a valid template");
        v.create_object(CK_INVALID_HANDLE, &template)
    };
    // Asserted once the call is let go: a failure inside the scope would
    // wait for the stalled call for ever.
    let (back, copies_meanwhile, answer) = std::thread::scope(|scope| {
        let caller = scope.spawn(import);
        stalled
            .recv_timeout(Duration::from_secs(60))
            .expect("the import is carried out on member 1 and stays inside it");
        recovery::recover_failed_members(&host);
        let back = group.members[2].state();
        let copies_meanwhile = memory_copies(&library, label);
        resume.send(()).expect("the import waits");
        let answer = caller.join().expect("the caller returns");
        (back, copies_meanwhile, answer)
    });
    assert_eq!(
        back,
        MemberState::Up,
        "member 2 is back while the import is under way"
    );
    let copies = memory_copies(&library, label);
    v.close();
    Imported {
        answer: answer.map(drop).map_err(|e| e.rv),
        copies_meanwhile,
        copies,
    }
}

struct Imported {
    answer: Result<(), CK_RV>,
    copies_meanwhile: Vec<usize>,
    copies: Vec<usize>,
}

/// `VirtualToken00MinReplicas = 4`: the import cannot be on enough
/// members, fails its check and is undone; no member, the returned one
/// included, keeps a copy (synchronisation gave member 2 one, which the
/// undo did not know of, before it left objects still being made alone).
#[test]
fn a_member_returning_during_an_import_that_fails_min_replicas_keeps_no_copy() {
    let imported = import_while_a_member_returns(4, 41);
    assert_eq!(
        imported.copies_meanwhile,
        [1, 1, 0, 0],
        "synchronisation leaves the object being made alone"
    );
    assert_eq!(
        imported.answer,
        Err(CKR_FUNCTION_FAILED),
        "the import fails its check"
    );
    assert_eq!(imported.copies, [0, 0, 0, 0], "copies left on each member");
}

/// `VirtualToken00MinReplicas = 2`: the import succeeds, and the member
/// that returned meanwhile gets the object once, from the import itself.
#[test]
fn a_member_returning_during_an_import_that_succeeds_gets_it_once() {
    let imported = import_while_a_member_returns(2, 42);
    assert_eq!(
        imported.copies_meanwhile,
        [1, 1, 0, 0],
        "synchronisation leaves the object being made alone"
    );
    assert_eq!(imported.answer, Ok(()), "the import succeeds");
    assert_eq!(imported.copies, [1, 1, 1, 0], "copies on each member");
}
