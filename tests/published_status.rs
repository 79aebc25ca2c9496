//! `pkcs11-ha status` reports what running applications publish: calls
//! served per member while an application runs, nothing once it has
//! finalised, and a member out of rotation in an application although it
//! answers the probe.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pkcs11-ha");

fn status(config: &Path) -> (Option<i32>, Value) {
    let out = Command::new(BIN)
        .args([
            "--config",
            &config.display().to_string(),
            "status",
            "--json",
        ])
        .output()
        .expect("run pkcs11-ha status");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (out.status.code(), value)
}

fn members(status: &Value) -> Vec<Value> {
    status["groups"][0]["members"].as_array().unwrap().clone()
}

#[test]
fn status_shows_calls_served_by_running_applications() {
    let guard = serial_guard();
    let hsm = SoftHsm::new(&["member0", "member1"]);
    provision_domain(&hsm, &DOMAIN_VALUE);
    let config = write_config(
        hsm.dir.path(),
        &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
        &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
        false,
    );
    // write_config gives each test a state directory of its own.
    let state = hsm.dir.path().join("state");
    let mut fixture = Fixture::start_with_guard(guard, hsm, config.clone());

    let session = fixture.user_session();
    const DIGESTS: u64 = 40;
    for i in 0..DIGESTS {
        session
            .digest(&Mechanism::Sha256, format!("call {i}").as_bytes())
            .unwrap();
    }

    // The application rewrites its file every few seconds: wait for one
    // that has the digests in it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, seen) = loop {
        let (code, seen) = status(&config);
        let served: u64 = members(&seen)
            .iter()
            .filter_map(|m| m["calls_served"].as_u64())
            .sum();
        if served >= DIGESTS {
            break (code, seen);
        }
        assert!(
            Instant::now() < deadline,
            "calls served never reached {DIGESTS}: {seen:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, Some(0), "{seen:#}");
    for member in members(&seen) {
        assert_eq!(member["applications"], 1, "{seen:#}");
        assert_eq!(member["out_of_rotation_in_applications"], 0, "{seen:#}");
        assert_eq!(member["serving"], true, "{seen:#}");
    }
    let processes = state.join("processes");
    let mode = fs::metadata(&processes).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "the status files are private to their owner"
    );

    // Finalised: the application's file is gone, and with it its figures.
    drop(session);
    fixture.finalize().unwrap();
    assert_eq!(fs::read_dir(&processes).unwrap().count(), 0);
    let (code, seen) = status(&config);
    assert_eq!(code, Some(0), "{seen:#}");
    for member in members(&seen) {
        assert_eq!(member["applications"], 0, "{seen:#}");
        assert_eq!(member["calls_served"], Value::Null, "{seen:#}");
    }

    // A running application (this test process) that has one member out of
    // rotation although the member answers: the group is degraded.
    let serials = fixture.hsm.serials();
    let group_serial = group_serial(&serials);
    let published = pkcs11_ha::published::ProcessStatus {
        pid: std::process::id(),
        config: config.clone(),
        written_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        groups: vec![pkcs11_ha::published::GroupStatus {
            label: GROUP_LABEL.into(),
            serial: group_serial,
            members: serials
                .iter()
                .enumerate()
                .map(|(i, serial)| pkcs11_ha::published::MemberStatus {
                    serial: serial.clone(),
                    standby: false,
                    state: if i == 1 { "down" } else { "up" }.into(),
                    calls_served: 5,
                    consecutive_failures: u64::from(i == 1),
                    last_fault: "CKR_DEVICE_ERROR".into(),
                    ms_since_state_change: 10,
                    pending_changes: 0,
                })
                .collect(),
        }],
    };
    pkcs11_ha::published::write(&state, &published).unwrap();
    let (code, seen) = status(&config);
    assert_eq!(code, Some(1), "{seen:#}");
    let reasons = seen["groups"][0]["reasons"].to_string();
    assert!(
        reasons.contains(&format!(
            "member {} answers but is out of rotation in 1 of 1 running application(s)",
            serials[1]
        )),
        "{seen:#}"
    );
    assert_eq!(members(&seen)[1]["out_of_rotation_in_applications"], 1);
    assert_eq!(members(&seen)[0]["calls_served"], 5);
}
