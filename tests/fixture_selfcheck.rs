//! Checks the test helpers in `tests/common` themselves, without pkcs11-ha:
//! SoftHSM token creation, config writing, and slot/serial arithmetic.

mod common;

use common::*;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

#[test]
fn softhsm_tokens_have_distinct_hex16_serials() {
    let hsm = SoftHsm::new(&["a", "b", "c"]);
    assert_eq!(hsm.tokens.len(), 3);
    let labels: Vec<&str> = hsm.tokens.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels, ["a", "b", "c"]);
    let mut serials = hsm.serials();
    for s in &serials {
        assert!(is_hex16(s), "serial {s:?} is not 16 hex digits");
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 3, "serials not distinct: {:?}", hsm.tokens);
    // The directory holds exactly these tokens.
    let mut shown = hsm.show_slots();
    shown.sort_by(|a, b| a.label.cmp(&b.label));
    assert_eq!(shown, hsm.tokens);
    let conf = std::fs::read_to_string(&hsm.conf).unwrap();
    assert!(conf.contains(&format!(
        "directories.tokendir = {}",
        hsm.token_dir().display()
    )));
}

#[test]
fn softhsm_tokens_work_directly_with_the_pins() {
    let _guard = serial_guard();
    let hsm = SoftHsm::new(&["direct0", "direct1"]);
    hsm.activate();
    let pkcs11 = load_softhsm();
    initialize(&pkcs11).unwrap();
    for token in &hsm.tokens {
        let slot = slot_by_label(&pkcs11, &token.label).expect("token visible");
        assert_eq!(slot.id(), token.slot_id);
        let info = pkcs11.get_token_info(slot).unwrap();
        assert_eq!(info.serial_number(), token.serial);
        let session = user_session(&pkcs11, slot);
        session.logout().unwrap();
        session
            .login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
            .unwrap();
    }
    pkcs11.finalize().unwrap();
    std::env::remove_var(SOFTHSM_CONF_ENV);
}

#[test]
fn config_text_lists_libraries_groups_and_standby() {
    let members = vec!["aaaa".to_string(), "bbbb".to_string()];
    let groups = [
        GroupSpec::new("g0", &members),
        GroupSpec::new("g1", &members[1..]).with_standby(&members[..1]),
    ];
    let text = config_text(
        &[("softhsm", SOFTHSM_LIB), ("other", "/x.so")],
        &groups,
        true,
    );
    let expected = format!(
        "[Libraries]\nsofthsm = {SOFTHSM_LIB}\nother = /x.so\n\n[VirtualToken]\n\
         VirtualToken00Label = g0\nVirtualToken00Members = aaaa,bbbb\n\
         VirtualToken01Label = g1\nVirtualToken01Members = bbbb\nVirtualToken01Standby = aaaa\n\
         \n[HAConfiguration]\nHAOnly = 1\n"
    );
    assert_eq!(text, expected);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &[("softhsm", SOFTHSM_LIB)], &[], false);
    let state = format!(
        "HAOnly = 0\nhaStateDir = {}\n",
        dir.path().join("state").display()
    );
    assert!(std::fs::read_to_string(path).unwrap().ends_with(&state));
}

#[test]
fn slot_and_serial_arithmetic() {
    // FNV-1a-32("softhsm/1234") = 0x858c2698.
    assert_eq!(passthrough_slot_id("softhsm", 1234), 93_079_192);
    assert_eq!(passthrough_slot_id("SoftHSM", 1234), 93_079_192);
    let from_serial = passthrough_slot_id("softhsm", 0x12db_d55c8);
    assert!((0x1000..1 << 31).contains(&from_serial));
    assert_eq!(virtual_serial("5d128f393eb43bad"), "1d128f393eb43bad");
    assert_eq!(virtual_serial("abc"), "1abc");
}

#[test]
fn parse_show_slots_skips_uninitialised_tokens() {
    let text = "Available slots:\nSlot 1051999149\n    Slot info:\n        Token present:    yes\n\
                \x20   Token info:\n        Serial number:    5d128f393eb43bad\n\
                \x20       Initialized:      yes\n        Label:            a b                 \n\
                Slot 2\n    Token info:\n        Serial number:                    \n\
                \x20       Label:                                            \n";
    let tokens = parse_show_slots(text);
    assert_eq!(
        tokens,
        [Token {
            label: "a b".into(),
            serial: "5d128f393eb43bad".into(),
            slot_id: 1_051_999_149,
        }]
    );
}

#[test]
fn library_candidates_prefer_deps() {
    let c = library_candidates();
    assert!(c[0].ends_with("deps/libpkcs11_ha.so"), "{c:?}");
    assert_eq!(c[1].parent(), c[0].parent().unwrap().parent());
}
