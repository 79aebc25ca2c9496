//! Luna partitions as members, proved against the Luna-like test member
//! (tests/luna-member): one Luna client library instance whose partitions
//! are SoftHSM tokens, with Luna's cloning extensions, its partition
//! policies (Cloning vs Key Export mode), cloning domains and vendor codes.
//!
//! Every test holds the serial guard (through [`Luna`]), counts calls in
//! the member to prove which way keys moved, and reads the HA log for the
//! one line a refusal must leave.

mod common;

use std::env;
use std::fs;
use std::sync::MutexGuard;

use common::luna::{provision_partitions, LunaMember, PartitionSpec, CLONING, KEY_EXPORT};
use common::*;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki_sys::{CKR_OK, CK_RV};
use pkcs11_ha::error::luna::*;
use pkcs11_ha::state_api::{
    CK_HA_STATUS, PKCS11HA_GROUP_STATUS, PKCS11HA_STATE_DOWN, PKCS11HA_STATE_UP,
};

/// DER of the prime256v1 OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const DIGEST: [u8; 32] = [0x11; 32];

/// A group of two partitions of Luna-like libraries over SoftHSM tokens
/// `p0` and `p1`, HA log on, recovery off. Holds the serial guard;
/// finalises on drop.
struct Luna {
    pkcs11: Pkcs11,
    /// Dropped after `C_Finalize`, which they must see.
    libraries: Vec<LunaMember>,
    hsm: SoftHsm,
    _guard: MutexGuard<'static, ()>,
}

/// How the two partitions are laid out.
struct Layout<'a> {
    /// Per partition: mode and cloning domain.
    partitions: [(&'a str, &'a str); 2],
    /// One library instance for both partitions (else one each).
    one_instance: bool,
    /// Provision pkcs11-ha's domain key (only wrapping needs it).
    domain_key: bool,
    ha_slot: bool,
    /// `CA_GetContainerPolicySetting` answers (else it is not supported).
    policy_api: bool,
    /// Recovery every second (else off).
    recovery: bool,
    /// Extra sidecar lines for the member libraries.
    extra: &'a str,
}

impl Luna {
    fn new(layout: Layout) -> Luna {
        let guard = serial_guard();
        let hsm = SoftHsm::new(&["p0", "p1"]);
        let domains: Vec<&str> = layout.partitions.iter().map(|p| p.1).collect();
        provision_partitions(&hsm, &domains, layout.domain_key);
        let specs: Vec<PartitionSpec> = hsm
            .tokens
            .iter()
            .zip(layout.partitions)
            .map(|(token, (mode, domain))| PartitionSpec {
                serial: &token.serial,
                mode,
                domain,
            })
            .collect();
        let dir = hsm.dir.path();
        let mut extra = layout.extra.to_string();
        if layout.ha_slot {
            extra.push_str("ha_slot = yes\n");
        }
        if !layout.policy_api {
            extra.push_str("policy_api = no\n");
        }
        let libraries = if layout.one_instance {
            vec![LunaMember::with(dir, "luna", &specs, &extra)]
        } else {
            specs
                .chunks(1)
                .enumerate()
                .map(|(i, one)| LunaMember::with(dir, &format!("luna{i}"), one, &extra))
                .collect()
        };
        let names: Vec<String> = (0..libraries.len()).map(|i| format!("luna{i}")).collect();
        let paths: Vec<String> = libraries
            .iter()
            .map(|l| l.path.display().to_string())
            .collect();
        let entries: Vec<(&str, &str)> = names
            .iter()
            .map(String::as_str)
            .zip(paths.iter().map(String::as_str))
            .collect();
        let group = GroupSpec::new(GROUP_LABEL, &hsm.serials());
        let mut text = config_text(&entries, &[group], false);
        text.push_str(if layout.recovery {
            "AutoReconnectInterval = 1\n"
        } else {
            "reconnAtt = 0\n"
        });
        text.push_str(&format!(
            "haLogStatus = enabled\nhaLogPath = {}\n",
            dir.display()
        ));
        let config = dir.join("pkcs11-ha.conf");
        fs::write(&config, text).expect("write pkcs11-ha.conf");
        hsm.activate();
        activate_config(&config);
        let pkcs11 = load_ha();
        initialize(&pkcs11).expect("C_Initialize of pkcs11-ha");
        Luna {
            pkcs11,
            libraries,
            hsm,
            _guard: guard,
        }
    }

    /// Both partitions of one instance, in these modes and domains.
    fn partitions(first: (&str, &str), second: (&str, &str), domain_key: bool) -> Luna {
        Luna::new(Layout {
            partitions: [first, second],
            one_instance: true,
            domain_key,
            ha_slot: false,
            policy_api: true,
            recovery: false,
            extra: "",
        })
    }

    fn session(&self) -> Session {
        user_session(&self.pkcs11, Slot::try_from(0u64).expect("slot 0"))
    }

    /// The pass-through slot of partition `i`.
    fn partition_slot(&self, i: usize) -> Slot {
        let library = format!("luna{}", if self.libraries.len() == 1 { 0 } else { i });
        let id = passthrough_slot_id(&library, self.hsm.tokens[i].slot_id);
        Slot::try_from(id).expect("slot id")
    }

    /// A call count summed over the libraries.
    fn count(&self, name: &str) -> u64 {
        self.libraries.iter().map(|l| l.call_count(name)).sum()
    }

    /// Objects with this `CKA_ID` on partition `i`, seen through its own slot.
    fn on_partition(&self, i: usize, id: &str) -> Vec<ObjectHandle> {
        let alone = user_session(&self.pkcs11, self.partition_slot(i));
        alone
            .find_objects(&[Attribute::Id(id.into())])
            .expect("find on the partition")
    }

    /// The HA log so far.
    fn ha_log(&self) -> String {
        fs::read_to_string(self.hsm.dir.path().join("haErrorLog.txt")).unwrap_or_default()
    }

    /// `C_Finalize` and `C_Initialize` again with every fault cleared.
    fn restart(&mut self) {
        for library in &self.libraries {
            library.clear_fault();
        }
        self.pkcs11.clone().finalize().expect("C_Finalize");
        self.pkcs11 = load_ha();
        initialize(&self.pkcs11).expect("C_Initialize of pkcs11-ha");
    }
}

impl Drop for Luna {
    fn drop(&mut self) {
        // An error here would only hide the test's own result.
        let _ = self.pkcs11.clone().finalize();
        env::remove_var(CONF_ENV);
        env::remove_var(SOFTHSM_CONF_ENV);
    }
}

fn ec_pair(s: &Session, id: &str) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::EcParams(P256.to_vec()),
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::Private(true),
            Attribute::Sign(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ],
    )
}

fn rsa_pair(s: &Session, id: &str) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::ModulusBits(2048.into()),
            Attribute::PublicExponent(vec![1, 0, 1]),
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::Private(true),
            Attribute::Sign(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ],
    )
}

fn aes_key(s: &Session, id: &str) -> cryptoki::error::Result<ObjectHandle> {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Id(id.into()),
            Attribute::Private(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ],
    )
}

/// Each partition alone holds the key pair `id` and signs with it.
fn assert_pair_works_on_each_partition(luna: &Luna, id: &str, mechanism: &Mechanism) {
    for i in 0..2 {
        let alone = user_session(&luna.pkcs11, luna.partition_slot(i));
        let find = |class| {
            let found = alone
                .find_objects(&[Attribute::Class(class), Attribute::Id(id.into())])
                .expect("find");
            assert_eq!(found.len(), 1, "{id} {class:?} on partition {i}");
            found[0]
        };
        let (private, public) = (
            find(ObjectClass::PRIVATE_KEY),
            find(ObjectClass::PUBLIC_KEY),
        );
        let signature = alone
            .sign(mechanism, private, &DIGEST)
            .unwrap_or_else(|e| panic!("{id} signs on partition {i}: {e}"));
        alone
            .verify(mechanism, public, &DIGEST, &signature)
            .unwrap_or_else(|e| panic!("{id} verifies on partition {i}: {e}"));
    }
}

fn rv_of<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> Option<CK_RV> {
    match result {
        Ok(_) => None,
        Err(Error::Pkcs11(RvError::VendorDefined(rv), _)) => Some(rv),
        Err(Error::Pkcs11(RvError::FunctionFailed, _)) => Some(cryptoki_sys::CKR_FUNCTION_FAILED),
        Err(other) => panic!("neither a vendor code nor CKR_FUNCTION_FAILED: {other:?}"),
    }
}

/// `PKCS11HA_GetGroupStatus` of group 0.
fn group_status() -> PKCS11HA_GROUP_STATUS {
    // SAFETY: the symbol has this signature; the library is loaded.
    unsafe {
        let library = libloading::Library::new(library_path()).unwrap();
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64> =
            library.get(b"PKCS11HA_GetGroupStatus\0").unwrap();
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), 0);
        status
    }
}

/// A group of two partitions in Cloning mode (Luna's default) replicates
/// generated RSA, EC and AES keys by cloning: wrapping is never attempted,
/// and pkcs11-ha's domain key is not even provisioned.
#[test]
fn cloning_mode_replicates_generated_keys_by_cloning_and_never_wraps() {
    let luna = Luna::partitions((CLONING, "d"), (CLONING, "d"), false);
    let s = luna.session();
    luna.libraries[0].reset_counts();
    rsa_pair(&s, "rsa").expect("RSA pair on the group");
    ec_pair(&s, "ec").expect("EC pair on the group");
    aes_key(&s, "aes").expect("AES key on the group");
    assert_eq!(luna.count("C_WrapKey"), 0, "no key was wrapped");
    assert_eq!(luna.count("C_UnwrapKey"), 0, "no key was unwrapped");
    assert_eq!(
        luna.count("CA_MigrateKeys"),
        3,
        "the RSA and EC private keys and the AES key were cloned"
    );
    assert_pair_works_on_each_partition(&luna, "rsa", &Mechanism::Sha256RsaPkcs);
    assert_pair_works_on_each_partition(&luna, "ec", &Mechanism::Ecdsa);
    for i in 0..2 {
        assert_eq!(
            luna.on_partition(i, "aes").len(),
            1,
            "AES key on partition {i}"
        );
    }
    let log = luna.ha_log();
    assert!(
        log.contains("Luna partition in Cloning mode; clones with CA_MigrateKeys"),
        "the strategy found at C_Initialize is logged: {log}"
    );
    assert!(
        !log.contains("config warning"),
        "partitions that clone need no domain key: {log}"
    );
}

/// In Key Export mode private keys cannot be cloned: they move wrapped
/// under the domain key, with Luna's vendor `CKM_AES_KWP` (the member does
/// not list the standard mechanism). Secret keys still clone.
#[test]
fn key_export_mode_moves_private_keys_by_wrapping() {
    let luna = Luna::partitions((KEY_EXPORT, "d"), (KEY_EXPORT, "d"), true);
    let s = luna.session();
    luna.libraries[0].reset_counts();
    ec_pair(&s, "ec").expect("EC pair on the group");
    rsa_pair(&s, "rsa").expect("RSA pair on the group");
    assert_eq!(
        luna.count("C_UnwrapKey"),
        2,
        "each private key was unwrapped once"
    );
    assert!(luna.count("C_WrapKey") >= 2, "each private key was wrapped");
    assert_eq!(luna.count("CA_MigrateKeys"), 0, "no private key was cloned");
    assert_pair_works_on_each_partition(&luna, "ec", &Mechanism::Ecdsa);
    assert_pair_works_on_each_partition(&luna, "rsa", &Mechanism::Sha256RsaPkcs);
    aes_key(&s, "aes").expect("AES key on the group");
    assert_eq!(luna.count("CA_MigrateKeys"), 1, "the AES key was cloned");
    assert_eq!(luna.on_partition(1, "aes").len(), 1);
}

/// One partition in Cloning mode and one in Key Export mode: a private key
/// made on the primary (Cloning mode) can be neither cloned nor wrapped to
/// the other, so none is made, and one line says which member refuses
/// what -- whichever member is expected to finish first: one made on the
/// Key Export partition could be wrapped to the other, so the members are
/// not alike as makers and every key pair is made on the primary. Secret
/// keys still move.
#[test]
fn mixed_modes_refuse_private_keys_with_one_line() {
    let luna = Luna::partitions((CLONING, "d"), (KEY_EXPORT, "d"), true);
    let s = luna.session();
    for id in ["ec", "ec-again", "ec-third"] {
        let refused = rv_of(ec_pair(&s, id));
        assert_eq!(refused, Some(cryptoki_sys::CKR_FUNCTION_FAILED), "{id}");
        for i in 0..2 {
            assert!(
                luna.on_partition(i, id).is_empty(),
                "{id}: nothing left on partition {i}"
            );
        }
    }
    let serials = luna.hsm.serials();
    let log = luna.ha_log();
    let line = log
        .lines()
        .find(|l| l.contains("no way to move private keys"))
        .unwrap_or_else(|| panic!("no refusal line in the HA log: {log}"));
    assert!(
        line.contains(&format!(
            "member {}'s partition does not allow private key cloning (Key Export mode)",
            serials[1]
        )) && line.contains(&format!(
            "member {}'s partition does not allow private key wrapping (Cloning mode)",
            serials[0]
        )) && line.contains("the key was not created"),
        "{line}"
    );
    assert_eq!(luna.count("C_WrapKey"), 0, "a refused way is not tried");
    aes_key(&s, "aes").expect("a secret key still clones");
    assert_eq!(luna.on_partition(1, "aes").len(), 1);
}

/// Two partitions in Cloning mode whose cloning domains differ: the clone
/// fails, the key is not made, and one line says why.
#[test]
fn mismatched_cloning_domains_refuse_key_creation() {
    let luna = Luna::partitions((CLONING, "east"), (CLONING, "west"), false);
    let s = luna.session();
    assert_eq!(
        rv_of(ec_pair(&s, "ec")),
        Some(cryptoki_sys::CKR_FUNCTION_FAILED)
    );
    assert_eq!(
        rv_of(aes_key(&s, "aes")),
        Some(cryptoki_sys::CKR_FUNCTION_FAILED)
    );
    for i in 0..2 {
        assert!(
            luna.on_partition(i, "ec").is_empty(),
            "no EC key left on {i}"
        );
        assert!(
            luna.on_partition(i, "aes").is_empty(),
            "no AES key left on {i}"
        );
    }
    let log = luna.ha_log();
    assert!(
        log.lines()
            .any(|l| l.contains("failed with CKR_FAILED_TO_CLONE_AN_OBJECT")
                && l.contains("both partitions must share a cloning domain")),
        "{log}"
    );
    assert_eq!(
        group_status().members[1].state,
        PKCS11HA_STATE_UP,
        "a request error"
    );
}

/// Partitions behind two library instances cannot clone to each other:
/// private keys in Cloning mode are refused, naming the reason.
#[test]
fn partitions_of_two_library_instances_do_not_clone() {
    let luna = Luna::new(Layout {
        partitions: [(CLONING, "d"), (CLONING, "d")],
        one_instance: false,
        domain_key: true,
        ha_slot: false,
        policy_api: true,
        recovery: false,
        extra: "",
    });
    let s = luna.session();
    assert_eq!(
        rv_of(ec_pair(&s, "ec")),
        Some(cryptoki_sys::CKR_FUNCTION_FAILED)
    );
    assert!(luna.ha_log().contains("different Luna library instances"));
}

/// Each Luna vendor code is classified as documented: down conditions take
/// the member out and the call succeeds on the other; busy answers are
/// asked again on the same member and only a member busy every time goes
/// out; request errors reach the application and the member stays.
#[test]
fn vendor_codes_are_classified_as_documented() {
    let mut luna = Luna::new(Layout {
        partitions: [(CLONING, "d"), (CLONING, "d")],
        one_instance: false,
        domain_key: false,
        ha_slot: false,
        policy_api: true,
        recovery: false,
        extra: "",
    });
    let random = |s: &Session| rv_of(s.generate_random_vec(16));
    let down = [
        CKR_UNABLE_TO_CONNECT,
        CKR_TIMEOUT,
        CKR_DEVICE_TIMEOUT,
        CKR_PARTITION_DISABLED,
        CKR_CONTAINER_HANDLE_INVALID,
        CKR_HSM_TAMPERED,
        0x8000_0045,
        0x8000_0066,
    ];
    for rv in down {
        let s = luna.session();
        luna.libraries[0].set_fault(rv);
        for _ in 0..4 {
            assert_eq!(random(&s), None, "0x{rv:08X}: the call moved on");
        }
        let member = group_status().members[0];
        assert_eq!(member.state, PKCS11HA_STATE_DOWN, "0x{rv:08X} is down");
        assert_eq!(member.lastFault, rv);
        drop(s);
        luna.restart();
    }
    for rv in [CKR_AGAIN, CKR_BUSY] {
        let s = luna.session();
        luna.libraries[0].reset_counts();
        luna.libraries[0].fail_next(2, rv);
        let mut calls = 0;
        while luna.libraries[0].faults_returned() < 2 {
            assert_eq!(random(&s), None, "0x{rv:08X}: a busy member is asked again");
            calls += 1;
            assert!(calls < 50, "member 0 never received a call");
        }
        assert_eq!(
            group_status().members[0].state,
            PKCS11HA_STATE_UP,
            "0x{rv:08X}: busy twice, then served"
        );
        luna.libraries[0].set_fault(rv);
        // A member that answered busy took its retries' pauses, so the
        // choice by latency sends it calls again only in its turn.
        let mut calls = 0;
        while group_status().members[0].state != PKCS11HA_STATE_DOWN {
            assert_eq!(random(&s), None, "0x{rv:08X}: the call moved on");
            calls += 1;
            assert!(calls < 100, "0x{rv:08X}: member 0 never received a call");
        }
        let member = group_status().members[0];
        assert_eq!(
            member.state, PKCS11HA_STATE_DOWN,
            "0x{rv:08X}: busy every time"
        );
        assert_eq!(member.lastFault, rv);
        drop(s);
        luna.restart();
    }
    let request = [
        CKR_OPERATION_NOT_ALLOWED,
        CKR_OBJECT_ALREADY_EXISTS,
        CKR_KEY_EXTRACTABLE,
        CKR_HSM_STORAGE_FULL,
        CKR_FAILED_TO_CLONE_AN_OBJECT,
        CKR_CLONE_NOT_ATTEMPTED,
    ];
    for rv in request {
        let s = luna.session();
        luna.libraries[0].reset_counts();
        luna.libraries[0].set_fault(rv);
        let answers: Vec<Option<CK_RV>> = (0..4).map(|_| random(&s)).collect();
        assert!(
            answers.contains(&Some(rv)),
            "0x{rv:08X} reaches the application: {answers:?}"
        );
        assert!(
            answers.contains(&None),
            "the other member served: {answers:?}"
        );
        assert_eq!(
            group_status().members[0].state,
            PKCS11HA_STATE_UP,
            "0x{rv:08X} is the request's answer"
        );
        luna.libraries[0].clear_fault();
    }
    assert_eq!(rv_of(luna.session().generate_random_vec(1)), None);
}

/// A slot that describes itself as Luna's HA virtual slot is refused as a
/// member, with a message saying why; the group serves without it.
#[test]
fn a_luna_ha_virtual_slot_is_refused_as_a_member() {
    let luna = Luna::new(Layout {
        partitions: [(CLONING, "d"), (CLONING, "d")],
        one_instance: true,
        domain_key: false,
        ha_slot: true,
        policy_api: true,
        recovery: false,
        extra: "",
    });
    let status = group_status();
    assert_eq!(status.members[0].state, PKCS11HA_STATE_DOWN);
    assert_eq!(status.members[1].state, PKCS11HA_STATE_DOWN);
    let log = luna.ha_log();
    assert!(
        log.contains("is a Luna HA virtual slot (\"HA Virtual Card Slot\"); an HA slot cannot be a member of another HA group"),
        "{log}"
    );
    let opened = luna
        .pkcs11
        .open_rw_session(Slot::try_from(0u64).expect("slot 0"));
    assert!(
        matches!(
            opened,
            Err(Error::Pkcs11(
                RvError::TokenNotPresent | RvError::DeviceError,
                _
            ))
        ),
        "no member serves: {opened:?}"
    );
}

/// `CA_GetHAState` keeps Luna's layout over Luna members: the group serial
/// is "1" + the primary's serial, then each member's serial and status.
#[test]
fn ca_get_ha_state_keeps_lunas_layout() {
    let luna = Luna::partitions((CLONING, "d"), (CLONING, "d"), false);
    let serials = luna.hsm.serials();
    // SAFETY: the symbol has this signature; the library is loaded.
    let status = unsafe {
        let library = libloading::Library::new(library_path()).unwrap();
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut CK_HA_STATUS) -> CK_RV> =
            library.get(b"CA_GetHAState\0").unwrap();
        let mut status: CK_HA_STATUS = std::mem::zeroed();
        assert_eq!(get(0, &mut status), CKR_OK);
        status
    };
    let text = |field: &[u8]| {
        let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    };
    assert_eq!(text(&status.groupSerial), group_serial(&serials));
    assert_eq!(status.listSize, 2);
    for (i, serial) in serials.iter().enumerate() {
        assert_eq!(&text(&status.memberList[i].memberSerial), serial);
        assert_eq!(status.memberList[i].memberStatus, CKR_OK);
    }
    assert_eq!(
        std::mem::size_of::<CK_HA_STATUS>(),
        std::mem::offset_of!(CK_HA_STATUS, listSize) + std::mem::size_of::<u64>(),
        "listSize ends the struct, as in Luna's header"
    );
}

/// `pkcs11-ha` (the CLI) run with this config and SoftHSM directory; its
/// output, and whether it succeeded.
fn cli(hsm: &SoftHsm, config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pkcs11-ha"))
        .args(args)
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .env(CONF_ENV, config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run pkcs11-ha");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The CLI's `group create` and `add-member` check how keys would move: a
/// Cloning-mode partition joins a group as such; a Key-Export-mode
/// partition beside it is refused (private keys could move neither way);
/// an HA virtual slot is refused outright.
#[test]
fn the_cli_checks_key_transport_and_refuses_an_ha_slot() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["p0", "p1"]);
    provision_partitions(&hsm, &["d", "d"], true);
    let serials = hsm.serials();
    let dir = hsm.dir.path();
    let pin = dir.join("pin");
    fs::write(&pin, format!("{USER_PIN}\n")).unwrap();
    fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pin = pin.display().to_string();
    let specs = [
        PartitionSpec {
            serial: &serials[0],
            mode: CLONING,
            domain: "d",
        },
        PartitionSpec {
            serial: &serials[1],
            mode: KEY_EXPORT,
            domain: "d",
        },
    ];
    let luna = LunaMember::new(dir, "luna", &specs, false);
    let path = luna.path.display().to_string();
    let config = write_config(dir, &[("luna", &path)], &[], false);

    let create = [
        "group",
        "create",
        "--label",
        "g",
        "--serial",
        &serials[0],
        "--pin-file",
        &pin,
        // The tokens carry a domain key already ("other group"); the HA
        // slot and key transport checks are not skipped by it.
        "--force",
    ];
    let (ok, text) = cli(&hsm, &config, &create);
    assert!(ok, "{text}");
    assert!(text.contains("[pass] not an HA slot"), "{text}");
    assert!(
        text.contains("[WARN] replication: the token wraps with Luna's CKM_AES_KWP only"),
        "{text}"
    );
    assert!(
        text.contains("[pass] key transport: Luna partition in Cloning mode; clones with CA_MigrateKeys; wraps with CKM_AES_KWP"),
        "{text}"
    );
    let add = [
        "group",
        "add-member",
        "--group",
        "g",
        "--serial",
        &serials[1],
        "--pin-file",
        &pin,
    ];
    let (ok, text) = cli(&hsm, &config, &add);
    assert!(!ok, "{text}");
    assert!(
        text.contains("[FAIL] key transport: no way to move private keys")
            && text.contains("such keys could not be created in the group"),
        "{text}"
    );

    let ha = LunaMember::new(dir, "luna-ha", &specs[..1], true);
    let path = ha.path.display().to_string();
    let config = write_config(dir, &[("luna", &path)], &[], false);
    let (ok, text) = cli(&hsm, &config, &create);
    assert!(!ok, "{text}");
    assert!(
        text.contains("[FAIL] not an HA slot: slot")
            && text.contains("an HA slot cannot be a member of another HA group"),
        "{text}"
    );
}

/// Where the partitions' policies cannot be read, a probe (a throw-away
/// session key pair cloned and destroyed) decides, once, how private keys
/// move: refused by Key Export partitions, they are wrapped; accepted by
/// Cloning partitions, they are cloned.
#[test]
fn without_the_policy_api_a_probe_decides_how_private_keys_move() {
    for (mode, cloned) in [(KEY_EXPORT, false), (CLONING, true)] {
        let luna = Luna::new(Layout {
            partitions: [(mode, "d"), (mode, "d")],
            one_instance: true,
            domain_key: true,
            ha_slot: false,
            policy_api: false,
            recovery: false,
            extra: "",
        });
        let s = luna.session();
        luna.libraries[0].reset_counts();
        ec_pair(&s, "first").expect("EC pair on the group");
        let probe_and_key = if cloned { 2 } else { 1 };
        assert_eq!(luna.count("CA_MigrateKeys"), probe_and_key, "{mode}");
        assert_eq!(luna.count("C_UnwrapKey"), u64::from(!cloned), "{mode}");
        assert_eq!(
            luna.count("C_DestroyObject"),
            2 + u64::from(cloned),
            "{mode}: the probe's pair (and its clone) are gone"
        );
        ec_pair(&s, "second").expect("a second EC pair");
        assert_eq!(
            luna.count("CA_MigrateKeys"),
            probe_and_key + u64::from(cloned),
            "{mode}: probed once"
        );
        assert_pair_works_on_each_partition(&luna, "first", &Mechanism::Ecdsa);
        assert_pair_works_on_each_partition(&luna, "second", &Mechanism::Ecdsa);
        let log = luna.ha_log();
        let expected = if cloned {
            "answered CKR_OK; private keys move by cloning"
        } else {
            "answered CKR_OPERATION_NOT_ALLOWED; the partitions are taken for Key Export mode"
        };
        assert!(log.contains(expected), "{mode}: {log}");
    }
}

/// A partition that was down while a key was made receives it by cloning
/// when it comes back: recovery takes the same way as replication.
#[test]
fn a_returning_partition_receives_missed_keys_by_cloning() {
    let luna = Luna::new(Layout {
        partitions: [(CLONING, "d"), (CLONING, "d")],
        one_instance: true,
        domain_key: false,
        ha_slot: false,
        policy_api: true,
        recovery: true,
        extra: "",
    });
    let serials = luna.hsm.serials();
    let s = luna.session();
    luna.libraries[0].set_partition_fault(&serials[1], cryptoki_sys::CKR_DEVICE_ERROR);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while group_status().members[1].state != PKCS11HA_STATE_DOWN {
        assert!(
            std::time::Instant::now() < deadline,
            "partition 1 never failed"
        );
        assert_eq!(rv_of(s.generate_random_vec(8)), None, "the call moved on");
    }
    luna.libraries[0].reset_counts();
    ec_pair(&s, "missed").expect("EC pair while partition 1 is down");
    assert_eq!(luna.count("CA_MigrateKeys"), 0, "nothing to clone to yet");
    luna.libraries[0].set_partition_fault(&serials[1], CKR_OK);
    while group_status().members[1].state != PKCS11HA_STATE_UP {
        assert!(
            std::time::Instant::now() < deadline,
            "partition 1 never came back: {}",
            luna.ha_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        luna.count("CA_MigrateKeys"),
        1,
        "the private key was cloned"
    );
    assert_eq!(luna.count("C_WrapKey"), 0, "and not wrapped");
    assert_pair_works_on_each_partition(&luna, "missed", &Mechanism::Ecdsa);
}

/// Where the partitions do not take `CA_MigrateKeys` (firmware before
/// 7.8), keys clone with `CA_CloneObject`.
#[test]
fn without_migrate_keys_keys_clone_with_ca_clone_object() {
    let luna = Luna::new(Layout {
        partitions: [(CLONING, "d"), (CLONING, "d")],
        one_instance: true,
        domain_key: false,
        ha_slot: false,
        policy_api: true,
        recovery: false,
        extra: "migrate_keys = no\n",
    });
    let s = luna.session();
    luna.libraries[0].reset_counts();
    ec_pair(&s, "ec").expect("EC pair on the group");
    aes_key(&s, "aes").expect("AES key on the group");
    assert_eq!(luna.count("CA_CloneObject"), 2, "both keys were cloned");
    assert_eq!(luna.count("C_WrapKey"), 0);
    assert_pair_works_on_each_partition(&luna, "ec", &Mechanism::Ecdsa);
    assert_eq!(luna.on_partition(1, "aes").len(), 1);
}
