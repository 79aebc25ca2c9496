//! The HA state API as a C application sees it: a program compiled against
//! `include/pkcs11_ha.h` finds the exports, reads both calls, and the
//! header's struct layout matches the library's field for field.

mod common;

use common::*;
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
