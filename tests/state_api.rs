//! The HA state API as a C application sees it: a program compiled against
//! `include/pkcs11_ha.h` finds the exports, reads both calls, and the
//! header's struct layout matches the library's field for field; and the
//! calls it counts per member include the application's calls through the
//! member's pass-through slot.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use pkcs11_ha::state_api::{
    CK_HA_MEMBER, CK_HA_STATUS, PKCS11HA_GROUP_STATUS, PKCS11HA_MEMBER_STATUS,
};
use std::mem::{offset_of, size_of};
use std::process::Command;

fn layout_line(name: &str, values: &[usize]) -> String {
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    format!("layout {name} {}", values.join(" "))
}

#[test]
fn c_program_reads_both_calls_and_the_header_matches_the_library() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["first", "second", "spare"]);
    let serials = hsm.serials();
    let absent = "feedfeedfeedfeed".to_string();
    let active = [serials[0].clone(), serials[1].clone(), absent.clone()];
    let group = GroupSpec::new(GROUP_LABEL, &active).with_standby(&serials[2..]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[group],
        false,
    );
    let program = build_c_program("state_api", hsm.dir.path());
    let output = Command::new(&program)
        .arg(library_path())
        .env(SOFTHSM_CONF_ENV, &hsm.conf)
        .env(CONF_ENV, &config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    for expected in [
        layout_line(
            "CK_HA_MEMBER",
            &[
                size_of::<CK_HA_MEMBER>(),
                offset_of!(CK_HA_MEMBER, memberStatus),
            ],
        ),
        layout_line(
            "CK_HA_STATUS",
            &[
                size_of::<CK_HA_STATUS>(),
                offset_of!(CK_HA_STATUS, memberList),
                offset_of!(CK_HA_STATUS, listSize),
            ],
        ),
        layout_line(
            "PKCS11HA_MEMBER_STATUS",
            &[
                size_of::<PKCS11HA_MEMBER_STATUS>(),
                offset_of!(PKCS11HA_MEMBER_STATUS, role),
                offset_of!(PKCS11HA_MEMBER_STATUS, pendingChanges),
            ],
        ),
        layout_line(
            "PKCS11HA_GROUP_STATUS",
            &[
                size_of::<PKCS11HA_GROUP_STATUS>(),
                offset_of!(PKCS11HA_GROUP_STATUS, serial),
                offset_of!(PKCS11HA_GROUP_STATUS, slotID),
                offset_of!(PKCS11HA_GROUP_STATUS, members),
            ],
        ),
    ] {
        assert!(
            text.contains(&expected),
            "header and library disagree: want {expected:?} in\n{text}"
        );
    }

    let group_serial = group_serial(&[active.to_vec(), serials[2..].to_vec()].concat());
    assert!(
        text.contains(&format!(
            "CA_GetHAState rv=0x0 group={group_serial} members=4"
        )),
        "{text}"
    );
    for serial in &serials {
        assert!(
            text.contains(&format!("  member {serial} status=0x0")),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!("  member {absent} status=0xe0")),
        "a member whose token is absent reads CKR_TOKEN_NOT_PRESENT: {text}"
    );
    assert!(
        text.contains("CA_GetHAState(NULL) rv=0x7"),
        "a NULL pointer is CKR_ARGUMENTS_BAD: {text}"
    );
    assert!(
        text.contains(&format!(
            "PKCS11HA_GetGroupStatus rv=0x0 label={GROUP_LABEL} serial={group_serial} slot=0 members=4"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("  member {} role=0 state=0", serials[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("  member {} role=1 state=0", serials[2])),
        "standby role: {text}"
    );
    assert!(
        text.contains(&format!("  member {absent} role=0 state=1")),
        "absent is down: {text}"
    );
}

/// The calls served of each member of group 0, by serial, through the
/// exported `PKCS11HA_GetGroupStatus` of the loaded library.
fn calls_served() -> Vec<(String, u64)> {
    // SAFETY: the symbol has this signature; the library is loaded, and the
    // status is plain data for which all-zero is valid.
    let status: PKCS11HA_GROUP_STATUS = unsafe {
        let library = libloading::Library::new(library_path()).expect("load pkcs11-ha");
        let get: libloading::Symbol<unsafe extern "C" fn(u64, *mut PKCS11HA_GROUP_STATUS) -> u64> =
            library
                .get(b"PKCS11HA_GetGroupStatus\0")
                .expect("PKCS11HA_GetGroupStatus");
        let mut status = std::mem::zeroed();
        assert_eq!(get(0, &mut status), 0, "PKCS11HA_GetGroupStatus");
        status
    };
    status.members[..status.memberCount as usize]
        .iter()
        .map(|m| {
            let serial = m.serial.iter().take_while(|&&c| c != 0).map(|&c| c as char);
            (serial.collect(), m.callsServed)
        })
        .collect()
}

#[test]
fn calls_through_a_members_pass_through_slot_count_as_served_by_it() {
    let fixture = Fixture::group(2);
    let serials = fixture.hsm.serials();
    let session = fixture
        .pkcs11
        .open_rw_session(fixture.member_slot(1))
        .expect("C_OpenSession on member 1's pass-through slot");
    let before = calls_served();
    assert_eq!(
        before.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        serials.iter().collect::<Vec<_>>(),
        "the group's members, in order"
    );
    const DIGESTS: u64 = 50;
    for i in 0..DIGESTS {
        let digest = session
            .digest(&Mechanism::Sha256, format!("call {i}").as_bytes())
            .expect("C_Digest on the pass-through slot");
        assert_eq!(digest.len(), 32);
    }
    let after = calls_served();
    let served = |i: usize| after[i].1 - before[i].1;
    assert!(
        served(1) >= 2 * DIGESTS,
        "each digest is C_DigestInit and C_Digest on member 1: {before:?} -> {after:?}"
    );
    assert!(
        served(0) < DIGESTS,
        "member 0 is not credited with member 1's calls: {before:?} -> {after:?}"
    );
}
