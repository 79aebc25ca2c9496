//! The built library as a C library: it exports exactly the PKCS#11
//! functions and the HA state API (build.rs lists them), and reports the
//! version Cargo.toml gives it.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn dynamic_symbols_are_exactly_the_c_api() {
    let library = library_path();
    let output = Command::new("nm")
        .args(["-D", "--defined-only", "--format=posix"])
        .arg(&library)
        .output()
        .expect("nm (binutils) runs; install binutils");
    assert!(
        output.status.success(),
        "nm {}: {output:?}",
        library.display()
    );
    let exported: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect();
    let expected: BTreeSet<String> = env!("PKCS11_HA_EXPORTS")
        .split(',')
        .map(String::from)
        .collect();
    assert!(expected.contains("C_GetFunctionList") && expected.contains("CA_GetHAState"));
    assert_eq!(
        exported,
        expected,
        "exported but not in the C API: {:?}; in the C API but not exported: {:?}",
        exported.difference(&expected).collect::<Vec<_>>(),
        expected.difference(&exported).collect::<Vec<_>>()
    );
}

#[test]
fn c_get_info_reports_the_cargo_version() {
    let fixture = Fixture::group(1);
    let info = fixture.pkcs11.get_library_info().expect("C_GetInfo");
    let version = info.library_version();
    assert_eq!(
        (version.major(), version.minor()),
        (
            env!("CARGO_PKG_VERSION_MAJOR").parse::<u8>().unwrap(),
            env!("CARGO_PKG_VERSION_MINOR").parse::<u8>().unwrap()
        )
    );
}
