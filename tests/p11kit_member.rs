//! A real out-of-process member: one SoftHSM token exported by a
//! `p11-kit server` child process and reached through p11-kit's client
//! module, grouped with a SoftHSM token this process loads directly. The
//! server's per-connection worker is killed while signatures run, which is
//! how a network HSM crashes (testing-notes.md, "p11-kit remoting").
//!
//! Holds the serial guard (environment and `C_Initialize` are process
//! state) and synchronises on conditions only: a barrier, a channel, joins,
//! the socket appearing and the killed worker being gone.

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;

use std::env;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Barrier, MutexGuard};
use std::thread;
use std::time::Duration;

use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use p11kit::{P11KitServer, ADDRESS_ENV};

/// DER of the prime256v1 OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const THREADS: usize = 4;
const ROUNDS: usize = 300;
/// Each thread reports in after this many rounds...
const WARM_UP: usize = 20;
/// ...and waits here until the worker is dead, so at least
/// `ROUNDS - HOLD` of its rounds run after the crash.
const HOLD: usize = 100;
/// A bound for waits that only end early when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);

/// A group of two members: token "remote" of one SoftHSM dir exported by
/// a `p11-kit server` child (member 0, the primary) and token "local" of
/// another dir loaded directly. Fields drop in order: the library is
/// finalised (and the environment cleared) before the server is killed and
/// the token dirs go; the serial guard is released last.
struct Group {
    pkcs11: Pkcs11,
    server: P11KitServer,
    /// Kept for their token dirs.
    _remote: SoftHsm,
    _local: SoftHsm,
    _guard: MutexGuard<'static, ()>,
}

impl Group {
    fn start() -> Group {
        let guard = serial_guard();
        let remote = SoftHsm::new(&["remote"]);
        // Before the server (or anything else) opens the token.
        provision_domain(&remote, &DOMAIN_VALUE);
        let local = SoftHsm::new(&["local"]);
        provision_domain(&local, &DOMAIN_VALUE);
        let server = P11KitServer::start(
            SOFTHSM_LIB,
            &remote.conf,
            "remote",
            &remote.dir.path().join("p11-kit.sock"),
        );
        let members = [
            remote.tokens[0].serial.clone(),
            local.tokens[0].serial.clone(),
        ];
        // The library keeps a member library it loaded once, function list
        // and all, across C_Finalize; p11-kit's client reads the server
        // address only in C_GetFunctionList. A name of its own per group
        // makes the library ask for a new list -- a new client instance
        // that connects to this test's server.
        static GROUPS: AtomicUsize = AtomicUsize::new(0);
        let remote_name = format!("remote{}", GROUPS.fetch_add(1, Ordering::Relaxed));
        let client_module = p11kit::client_module();
        let config = write_config(
            local.dir.path(),
            &[
                (&remote_name, &client_module),
                (SOFTHSM_LIB_NAME, SOFTHSM_LIB),
            ],
            &[GroupSpec::new(GROUP_LABEL, &members)],
            false,
        );
        local.activate();
        activate_config(&config);
        env::set_var(ADDRESS_ENV, server.address());
        let pkcs11 = load_ha();
        initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
        Group {
            pkcs11,
            server,
            _remote: remote,
            _local: local,
            _guard: guard,
        }
    }

    /// The slot whose token is labelled `label`: the group's, or a
    /// member's own (pass-through) slot.
    fn slot(&self, label: &str) -> Slot {
        slot_by_label(&self.pkcs11, label)
            .unwrap_or_else(|| panic!("no slot shows token {label:?}"))
    }

    /// Signs with the key `id` on each member alone, through its own slot,
    /// and verifies each signature with `public` through the virtual slot.
    fn check_each_member_signs_alone(&self, s: &Session, public: ObjectHandle, id: &[u8]) {
        let digest = [0x24; 32];
        for label in ["remote", "local"] {
            let alone = user_session(&self.pkcs11, self.slot(label));
            let key = find_one(&alone, ObjectClass::PRIVATE_KEY, id);
            let signature = alone
                .sign(&Mechanism::Ecdsa, key, &digest)
                .unwrap_or_else(|e| panic!("sign on the {label} member alone: {e}"));
            s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
                .unwrap_or_else(|e| panic!("verify what the {label} member signed: {e}"));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // An error here would only hide the test's own result.
        let _ = self.pkcs11.clone().finalize();
        env::remove_var(CONF_ENV);
        env::remove_var(SOFTHSM_CONF_ENV);
        env::remove_var(ADDRESS_ENV);
    }
}

fn find_one(s: &Session, class: ObjectClass, id: &[u8]) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "objects of class {class} with id {id:?}");
    found[0]
}

/// p11-kit 0.24's client carries no AES key-wrap mechanism, so a key
/// generated in a group with a remote member cannot replicate: the call
/// fails with `CKR_FUNCTION_FAILED` (not a mechanism error the application
/// did not cause) and leaves no key on any member -- never a key on some
/// members that the application was told failed.
#[test]
fn generated_keys_that_cannot_replicate_fail_cleanly() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    let id = b"generated".to_vec();
    let refused = s
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(P256.to_vec()),
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Private(true),
                Attribute::Sign(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
            ],
        )
        .expect_err("a generated key cannot cross p11-kit 0.24");
    assert!(
        matches!(refused, Error::Pkcs11(RvError::FunctionFailed, _)),
        "{refused:?}"
    );
    for label in ["remote", "local"] {
        let member = user_session(&group.pkcs11, group.slot(label));
        let left = member.find_objects(&[Attribute::Id(id.clone())]).unwrap();
        assert!(
            left.is_empty(),
            "member {label} kept {} objects",
            left.len()
        );
    }
}

/// A member whose library cannot receive generated keys (p11-kit 0.24's
/// client refuses the key-wrap mechanism; found when the member was
/// attached) is remembered while it is down: with it down, a key
/// generated on the other member is refused the same way as while it is
/// up (`CKR_FUNCTION_FAILED`, nothing left on the member that made it),
/// never reported made and left on one member for good.
#[test]
fn generated_keys_are_refused_while_a_member_that_cannot_receive_them_is_down() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    // Recovery tries a failed member at once: with the server still
    // listening it could be back before the key is asked for.
    group.server.stop_listening();
    group.server.kill_workers();
    let id = b"while-down".to_vec();
    let refused = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::ValueLen(32.into()),
                Attribute::Encrypt(true),
            ],
        )
        .expect_err("a generated key the remote member can never receive");
    assert!(
        matches!(refused, Error::Pkcs11(RvError::FunctionFailed, _)),
        "{refused:?}"
    );
    assert!(!member_serves(0, 0), "the remote member was down meanwhile");
    let local = user_session(&group.pkcs11, group.slot("local"));
    let left = local.find_objects(&[Attribute::Id(id.clone())]).unwrap();
    assert!(
        left.is_empty(),
        "the local member kept {} objects",
        left.len()
    );
    // Imported keys still reach it when it returns.
    import_ec_key(&group, &s, b"imported-while-down");
}

/// Four threads sign and verify through the virtual slot with an EC key
/// both members hold (created through the virtual slot from its
/// attributes, so on every member without wrapping); while they run, the
/// server's workers for our connections are killed -- the remote member
/// crashes, and its own slot answers `CKR_DEVICE_ERROR` until recovery
/// reconnects. No operation fails, and signing goes on afterwards.
#[test]
fn signing_continues_when_the_remote_members_worker_is_killed() {
    let group = Group::start();
    let pkcs11 = &group.pkcs11;
    let virtual_slot = group.slot(GROUP_LABEL);
    let remote_slot = group.slot("remote");
    let s = user_session(pkcs11, virtual_slot);
    let id = b"imported".to_vec();
    let (public, private) = import_ec_key(&group, &s, &id);
    group.check_each_member_signs_alone(&s, public, &id);
    // One worker per client instance (a connection each); operations run
    // on several of them, spares connecting at their first use.
    let workers = group.server.workers();
    assert!(
        !workers.is_empty(),
        "no worker serves our connections; {}",
        group.server.log_text()
    );
    let read_by_workers = || {
        let workers = group.server.workers();
        workers.into_iter().map(p11kit::bytes_read).sum::<u64>()
    };

    let (started, warm) = mpsc::channel::<()>();
    let barrier = Barrier::new(THREADS + 1);
    let mut served_before_kill = 0;
    let failures: Vec<String> = thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (started, barrier) = (started.clone(), &barrier);
                // Never panics: a panic before the barrier would strand
                // the others; failures are returned instead.
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    let session = pkcs11.open_rw_session(virtual_slot);
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
        let read_at_start = read_by_workers();
        for _ in 0..THREADS {
            // Bounded: a thread that cannot report is caught by the
            // failures it returns.
            let _ = warm.recv_timeout(PATIENCE);
        }
        served_before_kill = read_by_workers().saturating_sub(read_at_start);
        let killed = group.server.kill_workers();
        barrier.wait();
        let mut failures: Vec<String> = threads
            .into_iter()
            .flat_map(|t| {
                t.join()
                    .unwrap_or_else(|_| vec!["a thread panicked".into()])
            })
            .collect();
        if !workers.iter().all(|w| killed.contains(w)) {
            failures.push(format!(
                "killed {killed:?}, expected {workers:?} among them"
            ));
        }
        failures
    });
    assert!(failures.is_empty(), "failed operations: {failures:#?}");
    assert!(
        served_before_kill > 0,
        "the remote member was serving the threads when its worker died"
    );
    // The member's connection really died: its own slot answers
    // `CKR_DEVICE_ERROR` (testing-notes.md) until recovery, which tries a
    // failed member at once, has reconnected -- through a worker the
    // server started anew, not one of those killed. Such a worker may
    // miss the token (`CKR_SLOT_ID_INVALID`: its SoftHSM started while
    // another worker's login rewrote the token file, docs/design.md,
    // "spares"; seen once in a suite run), and recovery connects again.
    match pkcs11.get_token_info(remote_slot) {
        Err(Error::Pkcs11(RvError::DeviceError, _)) => {}
        Ok(_) | Err(Error::Pkcs11(RvError::SlotIdInvalid, _)) => {
            let now = group.server.workers();
            assert!(
                !now.is_empty() && now.iter().all(|w| !workers.contains(w)),
                "the crashed member's slot answered through workers {now:?}, killed {workers:?}"
            );
        }
        other => panic!("the crashed member's own slot answered {other:?}"),
    }

    // Signing goes on, on the member that is left.
    for round in 0..20u8 {
        let digest = [round; 32];
        let signature = s
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_or_else(|e| panic!("sign {round} after the crash: {e}"));
        s.verify(&Mechanism::Ecdsa, public, &digest, &signature)
            .unwrap_or_else(|e| panic!("verify {round} after the crash: {e}"));
    }
    let token = pkcs11
        .get_token_info(virtual_slot)
        .expect("the virtual token is still there");
    assert_eq!(token.label(), GROUP_LABEL);
}

/// A library may list a mechanism and refuse it: p11-kit 0.24's client
/// lists the AES key-wrap mechanisms and cannot send them. The refusal is
/// the member's, not the application's: every `C_WrapKey` of a key both
/// members hold runs where the mechanism is taken, whichever member the
/// group tries first, and gives what the local member's own slot gives;
/// a `C_UnwrapKey` fails as a generated key does here
/// (`CKR_FUNCTION_FAILED`: the key could never reach the remote member)
/// and leaves nothing on either member, never a mechanism error the
/// application did not cause.
#[test]
fn a_wrap_the_remote_member_cannot_send_runs_on_the_member_that_can() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    let import = |id: &[u8], value: u8| {
        s.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(vec![value; 32]),
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ])
        .expect("import an AES key through the virtual slot")
    };
    let (wrapping, key) = (import(b"wrapping", 7), import(b"wrapped", 9));
    // Calls that name keys rotate over the members when none is busier:
    // eight reach each member several times over.
    let blobs: Vec<Vec<u8>> = (0..8)
        .map(|round| {
            s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key)
                .unwrap_or_else(|e| panic!("wrap {round} through the virtual slot: {e}"))
        })
        .collect();
    let local = user_session(&group.pkcs11, group.slot("local"));
    let on_local = |id: &[u8]| find_one(&local, ObjectClass::SECRET_KEY, id);
    let expected = local
        .wrap_key(
            &Mechanism::AesKeyWrapPad,
            on_local(b"wrapping"),
            on_local(b"wrapped"),
        )
        .expect("wrap on the local member's own slot");
    for (round, blob) in blobs.iter().enumerate() {
        assert_eq!(*blob, expected, "wrap {round} gave another blob");
    }
    let refused = s
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            wrapping,
            &expected,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Id(b"unwrapped".to_vec()),
                Attribute::Encrypt(true),
            ],
        )
        .expect_err("an unwrapped key cannot cross p11-kit 0.24");
    assert!(
        matches!(refused, Error::Pkcs11(RvError::FunctionFailed, _)),
        "{refused:?}"
    );
    for label in ["remote", "local"] {
        let member = user_session(&group.pkcs11, group.slot(label));
        let left = member
            .find_objects(&[Attribute::Id(b"unwrapped".to_vec())])
            .unwrap();
        assert!(
            left.is_empty(),
            "member {label} kept {} objects",
            left.len()
        );
    }
}

/// An EC P-256 key pair created through the virtual slot from its
/// attributes (`C_CreateObject` makes it on every member); the values come
/// from a throw-away session key pair on the local member's own slot.
fn import_ec_key(group: &Group, s: &Session, id: &[u8]) -> (ObjectHandle, ObjectHandle) {
    let scratch = user_session(&group.pkcs11, group.slot("local"));
    let (scratch_public, scratch_private) = scratch
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(P256.to_vec()), Attribute::Token(false)],
            &[
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Sign(true),
            ],
        )
        .expect("scratch key pair");
    let value = |object, kind| {
        let read = scratch
            .get_attributes(object, &[kind])
            .expect("read the scratch key");
        match read.as_slice() {
            [Attribute::Value(v)] | [Attribute::EcPoint(v)] => v.clone(),
            other => panic!("{kind:?} read as {other:?}"),
        }
    };
    let point = value(scratch_public, AttributeType::EcPoint);
    let secret = value(scratch_private, AttributeType::Value);
    let public = s
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256.to_vec()),
            Attribute::EcPoint(point),
            Attribute::Token(true),
            Attribute::Id(id.to_vec()),
            Attribute::Verify(true),
        ])
        .expect("create the public key through the virtual slot");
    let private = s
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Value(secret),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Id(id.to_vec()),
            Attribute::Sign(true),
            Attribute::Sensitive(true),
        ])
        .expect("create the private key through the virtual slot");
    (public, private)
}

/// The virtual slot advertises what every member supports: the remote
/// member (p11-kit forwards fewer mechanisms) narrows the local one's list,
/// and `C_GetMechanismInfo` takes the common key-size range.
#[test]
fn the_group_advertises_the_intersection_of_its_members_mechanisms() {
    use cryptoki::mechanism::MechanismType;
    let group = Group::start();
    let list = |label: &str| group.pkcs11.get_mechanism_list(group.slot(label)).unwrap();
    let (remote, local, virtual_list) = (list("remote"), list("local"), list(GROUP_LABEL));
    assert!(local.contains(&MechanismType::AES_GCM) && !remote.contains(&MechanismType::AES_GCM));
    let expected: Vec<_> = local
        .iter()
        .filter(|m| remote.contains(m))
        .copied()
        .collect();
    assert_eq!(virtual_list.len(), expected.len(), "{virtual_list:?}");
    assert!(
        virtual_list.iter().all(|m| expected.contains(m)),
        "{virtual_list:?}"
    );
    let ecdsa = group
        .pkcs11
        .get_mechanism_info(group.slot(GROUP_LABEL), MechanismType::ECDSA)
        .unwrap();
    let remote_ecdsa = group
        .pkcs11
        .get_mechanism_info(group.slot("remote"), MechanismType::ECDSA)
        .unwrap();
    assert_eq!(ecdsa.min_key_size(), remote_ecdsa.min_key_size());
    assert_eq!(ecdsa.max_key_size(), remote_ecdsa.max_key_size());
    assert!(ecdsa.sign() && ecdsa.verify());
}

/// Makes a token data object labelled (and valued) `label` through `s`.
fn data_object(s: &Session, label: &str) -> ObjectHandle {
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(label.into()),
        Attribute::Value(label.as_bytes().to_vec()),
    ])
    .expect("data object through the group")
}

fn labelled(s: &Session, label: &str) -> usize {
    s.find_objects(&[Attribute::Label(label.into())])
        .expect("search by label")
        .len()
}

/// The remote member's server process for our connection keeps its own
/// view of the token (SoftHSM's count of changes read, `call_writing` in
/// `src/member.rs`): an object another process makes there, followed by
/// one the group makes, must still be found through that connection --
/// it was not, and a replay of changes then made such an object twice.
#[test]
fn the_remote_members_connection_sees_what_another_process_made_before_the_group_wrote() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    data_object(&s, "ours-before");
    theirs_stays_in_view_after_ours(&group, &s);
}

/// `pkcs11-tool` makes an object on the remote member's token, then the
/// group one through `s`: the member's connection must find both.
fn theirs_stays_in_view_after_ours(group: &Group, s: &Session) {
    data_object_by_another_process(&group._remote, "remote", "theirs");
    data_object(s, "ours");
    let remote = user_session(&group.pkcs11, group.slot("remote"));
    assert_eq!(labelled(&remote, "theirs"), 1);
    assert_eq!(labelled(&remote, "ours"), 1);
}

/// As [`the_remote_members_connection_sees_what_another_process_made_before_the_group_wrote`],
/// for the first object the group makes on its connection, which has
/// made nothing there yet to read first: the member's domain key, looked
/// up there at the login, is read instead (`tests/failover.rs` pins that
/// no search stands in for it).
#[test]
fn the_remote_members_first_write_on_its_connection_sees_what_another_process_made() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    theirs_stays_in_view_after_ours(&group, &s);
}

/// The directory of the only token of `hsm`.
fn only_token_dir(hsm: &SoftHsm) -> std::path::PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(hsm.token_dir())
        .expect("list the token directory")
        .map(|entry| entry.expect("token directory entry").path())
        .filter(|path| path.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "tokens in {}", hsm.token_dir().display());
    dirs.remove(0)
}

/// Adds `by` to the 8-byte big-endian counter SoftHSM keeps at the start
/// of `file` (a token's `generation`, an object file's own count).
fn bump_counter(file: &std::path::Path, by: u64, bytes: &mut [u8]) {
    let count = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    bytes[..8].copy_from_slice(&(count + by).to_be_bytes());
    std::fs::write(file, &*bytes).expect("write the counter");
}

/// How many data objects labelled `label` the only token of `hsm` holds,
/// as a fresh process (`pkcs11-tool` on SoftHSM directly, logged in)
/// lists them; `None` where it could not list them.
fn labelled_on_disk(hsm: &SoftHsm, label: &str) -> Option<usize> {
    let out = std::process::Command::new("pkcs11-tool")
        .args(["--module", SOFTHSM_LIB, "--login", "--pin", USER_PIN])
        .args(["--list-objects", "--type", "data"])
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| {
                line.trim()
                    .strip_prefix("label:")
                    .map(|l| l.trim().trim_matches('\''))
                    == Some(label)
            })
            .count()
    })
}

/// SoftHSM loses sight of a token for good, in one process, once that
/// process re-lists the token while its `token.object` cannot be read
/// (`OSToken::index`; softhsm/SoftHSMv2#757 under `p11-kit remote`): it
/// answers `C_GetTokenInfo` and `C_CreateObject` with `CKR_GENERAL_ERROR`
/// and sees no object made since. Here the remote member's connection is
/// brought there on purpose -- its server process reads `token.object`
/// cut short, then the token's change count moves -- and `token.object`
/// is put back whole. An object made through the group must still reach
/// the remote token: the member is taken out and connected afresh (a new
/// server process), not left serving with every import refused.
#[test]
fn a_remote_member_whose_softhsm_lost_sight_of_its_token_is_connected_afresh() {
    let group = Group::start();
    let s = user_session(&group.pkcs11, group.slot(GROUP_LABEL));
    data_object(&s, "before");
    let remote_slot = group.slot("remote");
    let dir = only_token_dir(&group._remote);
    let token_object = dir.join("token.object");
    let whole = std::fs::read(&token_object).expect("read token.object");
    // Cut short, with a newer count so that the server process reads it.
    let mut cut = whole[..whole.len() / 2].to_vec();
    bump_counter(&token_object, 1, &mut cut);
    assert!(group.pkcs11.get_token_info(remote_slot).is_err());
    let generation = dir.join("generation");
    let mut count = std::fs::read(&generation).expect("read generation");
    bump_counter(&generation, 1, &mut count);
    assert!(group.pkcs11.get_token_info(remote_slot).is_err());
    std::fs::write(&token_object, &whole).expect("put token.object back");
    assert!(
        group.pkcs11.get_token_info(remote_slot).is_err(),
        "the connection's SoftHSM still refuses with token.object whole"
    );
    assert_eq!(labelled_on_disk(&group._remote, "before"), Some(1));
    data_object(&s, "after");
    let deadline = std::time::Instant::now() + PATIENCE;
    while labelled_on_disk(&group._remote, "after") != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the remote token never got the object made after its connection lost sight of it"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let remote = user_session(&group.pkcs11, remote_slot);
    assert_eq!(labelled(&remote, "after"), 1);
    assert_eq!(labelled(&remote, "before"), 1);
}

/// Object files the slow member's token holds, copies of one data object:
/// enough that its server's `C_Initialize` (which loads the whole token)
/// takes several times the `memberTimeout` below (0.35 s on an idle
/// machine), as a large production token does under load.
const LARGE_TOKEN_OBJECTS: usize = 8_000;
/// The least `memberTimeout` of the slow-member test; it is raised to a
/// third of the large token's listing as measured in the same run.
const SHORT_MEMBER_TIMEOUT_MS: u64 = 100;

/// Gives the only token of `hsm` [`LARGE_TOKEN_OBJECTS`] more objects:
/// one data object made by pkcs11-tool, its file copied under new names.
fn fill_token(hsm: &SoftHsm) {
    let before = object_files(hsm.dir.path());
    let data = hsm.dir.path().join("data.bin");
    std::fs::write(&data, [0x5a; 32]).expect("write data.bin");
    let made = std::process::Command::new("pkcs11-tool")
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .args(["--module", SOFTHSM_LIB, "--login", "--pin", USER_PIN])
        .arg("--write-object")
        .arg(&data)
        .args(["--type", "data", "--label", "filler"])
        .output()
        .expect("run pkcs11-tool");
    assert!(made.status.success(), "pkcs11-tool: {made:?}");
    let made: Vec<_> = object_files(hsm.dir.path())
        .difference(&before)
        .cloned()
        .collect();
    assert_eq!(made.len(), 1, "one object file made: {made:?}");
    let dir = made[0].parent().expect("token dir");
    for i in 0..LARGE_TOKEN_OBJECTS {
        std::fs::copy(
            &made[0],
            dir.join(format!("{i:08x}-f111-4000-8000-000000000000.object")),
        )
        .expect("copy an object file");
    }
}

/// Every `*.object` file under `dir` but the tokens' own.
fn object_files(dir: &std::path::Path) -> std::collections::HashSet<std::path::PathBuf> {
    let mut found = std::collections::HashSet::new();
    for entry in std::fs::read_dir(dir).expect("read token dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(object_files(&path));
        } else if path.extension().is_some_and(|e| e == "object")
            && path.file_name().is_some_and(|n| n != "token.object")
        {
            found.insert(path);
        }
    }
    found
}

#[test]
fn a_member_whose_reconnect_outlasts_member_timeout_still_joins() {
    let guard = serial_guard();
    let remote = SoftHsm::new(&["remote"]);
    provision_domain(&remote, &DOMAIN_VALUE);
    fill_token(&remote);
    let local = SoftHsm::new(&["local"]);
    provision_domain(&local, &DOMAIN_VALUE);
    let server = P11KitServer::start(
        SOFTHSM_LIB,
        &remote.conf,
        "remote",
        &remote.dir.path().join("p11-kit.sock"),
    );
    let client_module = p11kit::client_module();
    // What the test is about: each connection's worker loads the whole
    // token, so listing it through p11-kit's client outlasts memberTimeout.
    let started = std::time::Instant::now();
    let listed = std::process::Command::new("pkcs11-tool")
        .env(ADDRESS_ENV, server.address())
        .args(["--module", &client_module, "--list-token-slots"])
        .output()
        .expect("run pkcs11-tool");
    let listing = started.elapsed();
    assert!(listed.status.success(), "pkcs11-tool: {listed:?}");
    // A third of the listing as it ran now, so that it outlasts
    // memberTimeout even on a machine three times quieter, and stays
    // within the ten memberTimeouts the search waits at most on one
    // three times busier.
    let member_timeout_ms = SHORT_MEMBER_TIMEOUT_MS.max(listing.as_millis() as u64 / 3);
    assert!(
        listing > Duration::from_millis(member_timeout_ms),
        "listing the large token took only {listing:?}: raise LARGE_TOKEN_OBJECTS"
    );
    let members = [
        remote.tokens[0].serial.clone(),
        local.tokens[0].serial.clone(),
    ];
    let config = write_config(
        local.dir.path(),
        &[
            ("slowremote", &client_module),
            (SOFTHSM_LIB_NAME, SOFTHSM_LIB),
        ],
        &[GroupSpec::new(GROUP_LABEL, &members)],
        false,
    );
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(&format!(
        "memberTimeout = {member_timeout_ms}\nAutoReconnectInterval = 1\n"
    ));
    std::fs::write(&config, text).expect("write config");
    local.activate();
    activate_config(&config);
    env::set_var(ADDRESS_ENV, server.address());
    let pkcs11 = load_ha();
    initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
    // Its first C_Initialize outlasts memberTimeout at start-up; recovery
    // must wait for a reconnect that answers, not cut it off every time.
    // Attempt k waits k memberTimeouts (up to ten), one interval apart:
    // with a listing up to three times the one measured, the tenth waits
    // long enough, after 45 memberTimeouts (15 listings) and 9 intervals
    // of attempts cut off. At a load of 19 the deadline of 20 s alone
    // passed with four attempts cut off.
    let patience = PATIENCE + listing * 20;
    let deadline = std::time::Instant::now() + patience;
    while !member_serves(0, 0) && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let joined = member_serves(0, 0);
    let _ = pkcs11.finalize();
    env::remove_var(CONF_ENV);
    env::remove_var(SOFTHSM_CONF_ENV);
    env::remove_var(ADDRESS_ENV);
    assert!(
        joined,
        "the member behind the slow server never joined within {patience:?} (listing \
         took {listing:?}, memberTimeout {member_timeout_ms} ms); server log: {}",
        server.log_text()
    );
    drop(guard);
}
