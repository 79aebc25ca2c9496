//! Conformance as OpenSC's `pkcs11-tool` sees it: its self-test on a
//! virtual slot and on a pass-through slot, and its fork test.

mod common;

use common::*;
use std::process::Output;

/// RSA mechanisms SoftHSM accepts as `pkcs11-tool --test` uses them: its
/// OAEP test sends a label, which SoftHSM refuses.
const RSA_MECHANISMS: &str = "RSA-PKCS,SHA1-RSA-PKCS,SHA256-RSA-PKCS,RSA-X-509,MD5-RSA-PKCS";

fn run(output: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "pkcs11-tool failed ({}):\n{text}",
        output.status
    );
    text
}

/// A one-member group over one token; returns the token set and config.
fn one_member_group() -> (SoftHsm, std::path::PathBuf) {
    let hsm = SoftHsm::new(&["solo"]);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    (hsm, config)
}

fn self_test(slot: u64) -> String {
    let (hsm, config) = one_member_group();
    let module = library_path();
    let slot = slot_arg(slot, &hsm);
    run(pkcs11_tool(&module, &hsm, &config)
        .args(["--slot", &slot, "--login", "--pin", USER_PIN])
        .args([
            "--keypairgen",
            "--key-type",
            "rsa:2048",
            "--id",
            "01",
            "--label",
            "rsa",
        ])
        .args(["--allowed-mechanisms", RSA_MECHANISMS])
        .output()
        .unwrap());
    run(pkcs11_tool(&module, &hsm, &config)
        .args([
            "--slot",
            &slot,
            "--login",
            "--pin",
            USER_PIN,
            "--test",
            "--allow-sw",
        ])
        .output()
        .unwrap())
}

/// `u64::MAX` stands for the pass-through slot of the only token.
fn slot_arg(slot: u64, hsm: &SoftHsm) -> String {
    if slot == u64::MAX {
        passthrough_slot_id(SOFTHSM_LIB_NAME, hsm.tokens[0].slot_id).to_string()
    } else {
        slot.to_string()
    }
}

fn assert_self_test_passed(text: &str) {
    assert!(text.contains("No errors"), "{text}");
    assert!(
        text.contains("all 4 digest functions seem to work"),
        "{text}"
    );
    assert!(
        text.contains("all 4 signature functions seem to work"),
        "{text}"
    );
    assert!(text.contains("SHA256-RSA-PKCS: OK"), "{text}");
    assert!(!text.contains("ERR"), "{text}");
}

#[test]
fn self_test_passes_on_a_virtual_slot() {
    assert_self_test_passed(&self_test(0));
}

#[test]
fn self_test_passes_on_a_pass_through_slot() {
    assert_self_test_passed(&self_test(u64::MAX));
}

#[test]
fn a_forked_child_can_initialize_again() {
    let (hsm, config) = one_member_group();
    let text = run(pkcs11_tool(&library_path(), &hsm, &config)
        .arg("--test-fork")
        .output()
        .unwrap());
    assert!(
        text.contains("Calling C_Initialize in forked child process"),
        "{text}"
    );
    assert!(text.contains("Using slot 0 with a present token"), "{text}");
}

/// pkcs11-tool searches one object at a time: in a new process, where the
/// group's domain key is among the first objects a member returns, the
/// listing must still show every object (and never the domain key).
#[test]
fn list_objects_in_a_new_process_shows_every_object_but_the_domain_key() {
    let hsm = SoftHsm::new(&["a", "b"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    let module = library_path();
    let data = hsm.dir.path().join("data.txt");
    std::fs::write(&data, b"listed").unwrap();
    run(pkcs11_tool(&module, &hsm, &config)
        .args([
            "--slot",
            "0",
            "--login",
            "--pin",
            USER_PIN,
            "--write-object",
        ])
        .arg(&data)
        .args(["--type", "data", "--label", "listed-data"])
        .output()
        .unwrap());
    let listing = run(pkcs11_tool(&module, &hsm, &config)
        .args([
            "--slot",
            "0",
            "--login",
            "--pin",
            USER_PIN,
            "--list-objects",
        ])
        .output()
        .unwrap());
    assert!(listing.contains("listed-data"), "{listing}");
    assert!(!listing.contains(DOMAIN_LABEL), "{listing}");
}
