//! The management CLI (`pkcs11-ha`), driven as a child process against real
//! SoftHSM tokens, each test in its own token directory and configuration.
//! PINs go through `--pin-file` / `--pin-env`, never on the command line.

mod common;
#[path = "common/p11kit.rs"]
mod p11kit;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use p11kit::P11KitServer;
use pkcs11_ha::config::{Config, RecoveryMode};

const BIN: &str = env!("CARGO_BIN_EXE_pkcs11-ha");
const SECRET: &str = "a domain secret for the tests, 32+ bytes";
/// p11-kit's client module: a library that loads without a server.
const P11KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// Tokens, a configuration with SoftHSM and no group, and credential files.
struct Setup {
    hsm: SoftHsm,
    conf: PathBuf,
}

impl Setup {
    fn new(labels: &[&str]) -> Setup {
        let hsm = SoftHsm::new(labels);
        let conf = write_config(
            hsm.dir.path(),
            &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[],
            false,
        );
        let dir = hsm.dir.path();
        fs::write(dir.join("pin"), format!("{USER_PIN}\n")).unwrap();
        fs::write(dir.join("wrong-pin"), "9999\n").unwrap();
        fs::write(dir.join("so-pin"), format!("{SO_PIN}\n")).unwrap();
        fs::write(dir.join("secret"), SECRET).unwrap();
        fs::write(dir.join("other-secret"), "another domain secret, 32+ bytes").unwrap();
        for name in ["pin", "wrong-pin", "so-pin", "secret", "other-secret"] {
            private(&dir.join(name));
        }
        Setup { hsm, conf }
    }

    fn file(&self, name: &str) -> String {
        self.hsm.dir.path().join(name).display().to_string()
    }

    fn serial(&self, label: &str) -> String {
        self.hsm.token(label).serial.clone()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env(SOFTHSM_CONF_ENV, &self.hsm.conf)
            .env(CONF_ENV, &self.conf)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run pkcs11-ha")
    }

    /// Runs with `input` on standard input.
    fn run_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pkcs11-ha");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Succeeds; returns stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        check_ok(args, self.run(args))
    }

    /// Fails with exit status 1 and `part` in stderr; returns stderr + stdout.
    #[track_caller]
    fn fails(&self, args: &[&str], part: &str) -> String {
        check_fails(args, self.run(args), part)
    }

    fn config(&self) -> Config {
        Config::load(&self.conf).expect("the CLI leaves a valid configuration")
    }

    /// The credential flags of a create or add-member that provisions.
    fn provisioning(&self) -> Vec<String> {
        [
            "--pin-file",
            &self.file("pin"),
            "--provision-domain",
            "--so-pin-file",
            &self.file("so-pin"),
            "--domain-secret-file",
            &self.file("secret"),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `group create --label L --serial <token>` with provisioning.
    fn create(&self, label: &str, token: &str) -> String {
        let serial = self.serial(token);
        let mut args = vec!["group", "create", "--label", label, "--serial", &serial];
        let creds = self.provisioning();
        args.extend(creds.iter().map(String::as_str));
        self.ok(&args)
    }

    fn pkcs11_tool(&self, token: &str, args: &[&str]) -> String {
        let out = Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM_LIB, "--token-label", token])
            .args(["--login", "--pin", USER_PIN])
            .args(args)
            .env(SOFTHSM_CONF_ENV, &self.hsm.conf)
            .output()
            .expect("run pkcs11-tool");
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Labels of the objects on `token` (user logged in), sorted.
    fn labels(&self, token: &str) -> Vec<String> {
        let listing = self.pkcs11_tool(token, &["--list-objects"]);
        let mut labels: Vec<String> = listing
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().trim_matches('\'').to_owned())
            .collect();
        labels.sort();
        labels
    }

    /// An extractable AES key and a data object on `token`.
    fn add_objects(&self, token: &str, prefix: &str) {
        self.pkcs11_tool(
            token,
            &[
                "--keygen",
                "--key-type",
                "AES:32",
                "--extractable",
                "--id",
                "0a",
                "--label",
                &format!("{prefix}-aes"),
            ],
        );
        let data = self.hsm.dir.path().join(format!("{prefix}.txt"));
        fs::write(&data, prefix).unwrap();
        self.pkcs11_tool(
            token,
            &[
                "--write-object",
                &data.display().to_string(),
                "--type",
                "data",
                "--label",
                &format!("{prefix}-data"),
            ],
        );
    }

    fn list_json(&self) -> serde_json::Value {
        let out = self.ok(&["--json", "group", "list", "--pin-file", &self.file("pin")]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

/// Mode 0600: the CLI refuses credential files others may read.
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[track_caller]
fn check_ok(args: &[&str], out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pkcs11-ha {args:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[track_caller]
fn check_fails(args: &[&str], out: Output, part: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "pkcs11-ha {args:?} should fail with status 1:\n{text}"
    );
    assert!(
        text.contains(part),
        "pkcs11-ha {args:?}: the output does not contain {part:?}:\n{text}"
    );
    assert!(
        !text.contains(USER_PIN) && !text.contains(SO_PIN),
        "a PIN leaked:\n{text}"
    );
    text
}

#[test]
fn create_checks_and_refusals() {
    let s = Setup::new(&["memberA", "memberB"]);
    let a = s.serial("memberA");
    let pin = s.file("pin");
    let base = ["group", "create", "--label", "myHAgroup", "--serial", &a];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    // No domain key, and no --provision-domain.
    let args = with(&["--pin-file", &pin]);
    let text = s.fails(&strs(&args), "no domain key labelled \"pkcs11-ha-domain\"");
    assert!(text.contains("[pass] login"), "{text}");
    // SoftHSM generates Ed25519 keys it cannot wrap: said before anything
    // is made, without refusing the token.
    assert!(
        text.contains(
            "[WARN] replication: the token generates Ed25519 and Ed448 keys but cannot wrap them"
        ),
        "{text}"
    );
    assert!(text.contains("nothing was changed"), "{text}");
    assert!(s.config().groups.is_empty());

    // A wrong PIN is tried once; the right one still logs in afterwards.
    let args = with(&["--pin-file", &s.file("wrong-pin")]);
    let text = s.fails(&strs(&args), "PIN is incorrect (tried once");
    assert!(text.contains("[----] domain key"), "{text}");

    // The label "HA", an unknown serial, a plain PIN argument.
    s.fails(
        &[
            "group",
            "create",
            "--label",
            "HA",
            "--serial",
            &a,
            "--pin-file",
            &pin,
        ],
        "reserved",
    );
    s.fails(
        &[
            "group",
            "create",
            "--label",
            "g",
            "--serial",
            "feedfacefeedface",
            "--pin-file",
            &pin,
        ],
        "no token with serial feedfacefeedface",
    );
    let out = s.run(&[
        "group", "create", "--label", "g", "--serial", &a, "--pin", USER_PIN,
    ]);
    assert_eq!(out.status.code(), Some(2), "a plain --pin is a usage error");

    // Now it works: the domain key is provisioned and the group written.
    let text = s.create("myHAgroup", "memberA");
    assert!(text.contains("[pass] login"), "{text}");
    assert!(text.contains("will be provisioned"), "{text}");
    assert!(text.contains("[pass] SO login"), "{text}");
    assert!(text.contains("created with group number"), "{text}");
    let config = s.config();
    let group = &config.groups[0];
    assert_eq!(group.label, "myHAgroup");
    assert_eq!(group.members, std::slice::from_ref(&a));
    let number = group.serial.clone().unwrap();
    assert_eq!(number.len(), a.len().min(16), "{number}");
    assert_eq!(number[1..], virtual_serial(&a)[1..], "{number}");
    assert_ne!(number, a);
    assert_eq!(s.labels("memberA"), ["pkcs11-ha-domain"]);
    let mode = fs::metadata(&s.conf).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Duplicates: the label, and the member in a second group.
    s.fails(
        &[
            "group",
            "create",
            "--label",
            "MYHAGROUP",
            "--serial",
            &a,
            "--pin-file",
            &pin,
        ],
        "exists already",
    );
    s.fails(
        &[
            "group",
            "create",
            "--label",
            "other",
            "--serial",
            &a,
            "--pin-file",
            &pin,
        ],
        "already a member of group \"myHAgroup\"",
    );
    assert_eq!(s.config().groups.len(), 1);

    // JSON listing.
    let list = s.list_json();
    let group = &list["groups"][0];
    assert_eq!(group["label"], "myHAgroup");
    assert_eq!(group["needs_sync"], false);
    assert_eq!(group["status"][0]["status"], "alive");
    assert_eq!(group["status"][0]["serial"], a.as_str());

    // slots shows the membership.
    let slots: serde_json::Value = serde_json::from_str(&s.ok(&["slots", "--json"])).unwrap();
    let tokens = slots["tokens"].as_array().unwrap();
    let token_a = tokens.iter().find(|t| t["serial"] == a.as_str()).unwrap();
    assert_eq!(token_a["group"], "myHAgroup");
    assert_eq!(token_a["role"], "active");
}

#[test]
fn add_member_with_and_without_objects_and_sync() {
    let s = Setup::new(&["memberA", "memberB", "memberC", "memberD"]);
    s.create("myHAgroup", "memberA");
    s.add_objects("memberA", "a");
    let creds = s.provisioning();
    let add = |token: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["group", "add-member", "--group", "myHAgroup", "--serial"]
            .map(str::to_owned)
            .to_vec();
        args.push(s.serial(token));
        args.extend(creds.iter().cloned());
        args.extend(extra.iter().map(|e| e.to_string()));
        args
    };

    // B holds objects; the operator answers "quit": nothing changes.
    s.add_objects("memberB", "b");
    let args = add("memberB", &[]);
    let out = s.run_with_input(&strs(&args), "maybe\nquit\n");
    let text = check_fails(&strs(&args), out, "(quit); nothing was changed");
    assert!(text.contains("Type 'copy' to keep"), "{text}");
    assert!(text.contains("\"maybe\" is not an answer"), "{text}");
    assert_eq!(s.labels("memberB"), ["b-aes", "b-data"]);
    assert_eq!(s.config().groups[0].members.len(), 1);

    // Without an answer (standard input closed) it refuses.
    s.fails(&strs(&args), "--objects copy|remove|quit");

    // --objects remove: B's objects are destroyed, B joins.
    let text = s.ok(&strs(&add("memberB", &["--objects", "remove"])));
    assert!(text.contains("Removed 2 object(s)"), "{text}");
    assert!(text.contains("successfully added"), "{text}");
    assert_eq!(s.labels("memberB"), ["pkcs11-ha-domain"]);
    // The group has objects B lacks.
    assert_eq!(s.list_json()["groups"][0]["needs_sync"], true);

    // C holds objects; answered interactively with "copy": kept.
    s.add_objects("memberC", "c");
    let args = add("memberC", &[]);
    let out = s.run_with_input(&strs(&args), "copy\n");
    let text = check_ok(&strs(&args), out);
    assert!(text.contains("Needs sync:       yes"), "{text}");
    assert!(text.contains("group sync --group myHAgroup"), "{text}");
    assert_eq!(s.labels("memberC"), ["c-aes", "c-data", "pkcs11-ha-domain"]);

    // D holds nothing: no question asked, even with standard input closed.
    let text = s.ok(&strs(&add("memberD", &[])));
    assert!(text.contains("holds 0 object(s)"), "{text}");
    assert_eq!(s.config().groups[0].members.len(), 4);

    // sync --dry-run shows the copies and copies nothing.
    let pin = s.file("pin");
    let text = s.ok(&[
        "group",
        "sync",
        "--group",
        "myHAgroup",
        "--pin-file",
        &pin,
        "--dry-run",
    ]);
    assert!(text.contains("Would copy secret key \"a-aes\""), "{text}");
    assert!(text.contains("Would copy data object \"c-data\""), "{text}");
    // a's two objects to B, C, D; c's two to A, B, D.
    assert_eq!(text.matches("Would copy").count(), 12, "{text}");
    assert!(
        text.contains("Summary: would copy 12, already present 0, would fail 0."),
        "{text}"
    );
    assert_eq!(s.labels("memberD"), ["pkcs11-ha-domain"]);

    // sync copies; a second sync finds nothing to do.
    let out = s
        .command(&[
            "group",
            "sync",
            "--group",
            "myHAgroup",
            "--pin-env",
            "TEST_PIN",
        ])
        .env("TEST_PIN", USER_PIN)
        .output()
        .unwrap();
    let text = check_ok(&["group", "sync"], out);
    assert_eq!(text.matches("Copied").count(), 12, "{text}");
    assert!(
        text.contains("Summary: copied 12, already present 0, failed 0."),
        "{text}"
    );
    let all = ["a-aes", "a-data", "c-aes", "c-data", "pkcs11-ha-domain"];
    for token in ["memberA", "memberB", "memberC", "memberD"] {
        assert_eq!(s.labels(token), all, "{token}");
    }
    let text = s.ok(&["group", "sync", "--group", "myHAgroup", "--pin-file", &pin]);
    assert!(text.contains("Nothing to copy"), "{text}");
    // Four objects, each on three members besides the one it came from.
    assert!(
        text.contains("Summary: copied 0, already present 12, failed 0."),
        "{text}"
    );
    let list = s.list_json();
    assert_eq!(list["groups"][0]["needs_sync"], false);
    assert_eq!(list["groups"][0]["compared"], "all objects");

    // The copied key works on the member it was copied to.
    let key = s.pkcs11_tool(
        "memberD",
        &["--list-objects", "--type", "secrkey", "--label", "a-aes"],
    );
    assert!(key.contains("a-aes"), "{key}");

    // Recover: every member reachable, nothing to copy.
    let text = s.ok(&[
        "group",
        "recover",
        "--group",
        "myHAgroup",
        "--pin-file",
        &pin,
    ]);
    assert!(text.contains("Nothing to copy"), "{text}");
}

#[test]
fn domain_key_mismatch_is_refused() {
    let s = Setup::new(&["memberA", "memberB", "memberC"]);
    s.create("myHAgroup", "memberA");
    let pin = s.file("pin");
    let b = s.serial("memberB");

    // The wrong secret: refused before anything is created.
    let text = s.fails(
        &[
            "group",
            "add-member",
            "--group",
            "myHAgroup",
            "--serial",
            &b,
            "--pin-file",
            &pin,
            "--provision-domain",
            "--so-pin-file",
            &s.file("so-pin"),
            "--domain-secret-file",
            &s.file("other-secret"),
        ],
        "the domain secret gives check value",
    );
    assert!(text.contains("check the secret"), "{text}");
    assert_eq!(s.labels("memberB"), Vec::<String>::new());

    // A wrong SO PIN is refused too.
    s.fails(
        &[
            "group",
            "add-member",
            "--group",
            "myHAgroup",
            "--serial",
            &b,
            "--pin-file",
            &pin,
            "--provision-domain",
            "--so-pin-file",
            &s.file("wrong-pin"),
            "--domain-secret-file",
            &s.file("secret"),
        ],
        "the SO PIN is incorrect (tried once",
    );
    assert_eq!(s.labels("memberB"), Vec::<String>::new());
}

#[test]
fn existing_different_domain_key_is_refused() {
    let s = Setup::new(&["memberA"]);
    s.create("myHAgroup", "memberA");
    // B is made after the fact with the fixtures' domain value.
    let mut hsm_b = SoftHsm::new(&["memberB"]);
    {
        let _guard = serial_guard();
        provision_domain(&hsm_b, &DOMAIN_VALUE);
        std::env::remove_var(SOFTHSM_CONF_ENV);
    }
    let b = hsm_b.tokens.remove(0);
    // Move B's token directory into A's, so one SoftHSM sees both.
    for entry in fs::read_dir(hsm_b.token_dir()).unwrap() {
        let entry = entry.unwrap();
        let to = s.hsm.token_dir().join(entry.file_name());
        copy_dir(&entry.path(), &to);
    }
    let pin = s.file("pin");
    let text = s.fails(
        &[
            "group",
            "add-member",
            "--group",
            "myHAgroup",
            "--serial",
            &b.serial,
            "--pin-file",
            &pin,
        ],
        "differs from the group's",
    );
    assert!(text.contains("[FAIL] domain key"), "{text}");
    // --force does not skip it.
    s.fails(
        &[
            "group",
            "add-member",
            "--group",
            "myHAgroup",
            "--serial",
            &b.serial,
            "--pin-file",
            &pin,
            "--force",
        ],
        "differs from the group's",
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn standby_remove_member_and_delete() {
    let s = Setup::new(&["memberA", "memberB", "memberC"]);
    s.create("myHAgroup", "memberA");
    let creds = s.provisioning();
    for token in ["memberB", "memberC"] {
        let serial = s.serial(token);
        let mut args = vec![
            "group",
            "add-member",
            "--group",
            "myHAgroup",
            "--serial",
            &serial,
        ];
        args.extend(creds.iter().map(String::as_str));
        s.ok(&args);
    }
    let [a, b, c] = ["memberA", "memberB", "memberC"].map(|t| s.serial(t));
    let group = |s: &Setup| s.config().groups[0].clone();

    s.ok(&[
        "group",
        "standby",
        "add",
        "--group",
        "myHAgroup",
        "--serial",
        &c,
    ]);
    assert_eq!(group(&s).members, [a.clone(), b.clone()]);
    assert_eq!(group(&s).standby, std::slice::from_ref(&c));
    s.fails(
        &[
            "group",
            "standby",
            "add",
            "--group",
            "myHAgroup",
            "--serial",
            &c,
        ],
        "already a standby member",
    );
    let list = s.list_json();
    let roles: Vec<_> = list["groups"][0]["status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["active", "active", "standby"]);
    s.ok(&[
        "group",
        "standby",
        "remove",
        "--group",
        "myHAgroup",
        "--serial",
        &c,
    ]);
    assert_eq!(group(&s).members, [a.clone(), b.clone(), c.clone()]);
    s.fails(
        &[
            "group",
            "standby",
            "remove",
            "--group",
            "myHAgroup",
            "--serial",
            &c,
        ],
        "not a standby member",
    );

    // Removing the primary keeps the group number; objects stay.
    let number = group(&s).serial;
    let text = s.ok(&[
        "group",
        "remove-member",
        "--group",
        "myHAgroup",
        "--serial",
        &a,
    ]);
    assert!(text.contains("The primary is now"), "{text}");
    assert_eq!(group(&s).members, [b.clone(), c.clone()]);
    assert_eq!(group(&s).serial, number);
    assert_eq!(s.labels("memberA"), ["pkcs11-ha-domain"]);
    s.fails(
        &[
            "group",
            "remove-member",
            "--group",
            "myHAgroup",
            "--serial",
            &a,
        ],
        "is not a member of group",
    );
    s.ok(&[
        "group",
        "remove-member",
        "--group",
        "myHAgroup",
        "--serial",
        &c,
    ]);
    s.fails(
        &[
            "group",
            "remove-member",
            "--group",
            "myHAgroup",
            "--serial",
            &b,
        ],
        "only active member",
    );
    s.fails(
        &["group", "delete", "--group", "nosuch"],
        "no group is labelled \"nosuch\"",
    );

    // HAOnly: refused without a group, and blocks deleting the last group.
    s.ok(&["ha-only", "enable"]);
    assert!(s.config().ha_only);
    s.fails(
        &["group", "delete", "--group", "myHAgroup"],
        "ha-only disable",
    );
    s.ok(&["ha-only", "disable"]);
    s.ok(&["group", "delete", "--group", "myHAgroup"]);
    assert!(s.config().groups.is_empty());
    assert_eq!(s.labels("memberB"), ["pkcs11-ha-domain"]);
    s.fails(&["ha-only", "enable"], "no group is configured");
    let show: serde_json::Value =
        serde_json::from_str(&s.ok(&["ha-only", "show", "--json"])).unwrap();
    assert_eq!(show["ha_only"], false);
}

#[test]
fn recovery_and_log_settings() {
    let s = Setup::new(&[]);
    s.ok(&[
        "recovery",
        "--retries",
        "-1",
        "--interval",
        "5",
        "--mode",
        "activeBasic",
    ]);
    let config = s.config();
    assert_eq!(config.recovery.attempts, -1);
    assert_eq!(config.recovery.interval_secs, 5);
    assert_eq!(config.recovery.mode, RecoveryMode::ActiveBasic);
    s.ok(&["recovery", "--retries", "3", "--mode", "activeEnhanced"]);
    let shown: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "recovery"])).unwrap();
    assert_eq!(shown["retries"], 3);
    assert_eq!(shown["interval"], 5);
    assert_eq!(shown["mode"], "activeEnhanced");
    s.fails(&["recovery", "--interval", "0"], "AutoReconnectInterval");
    s.fails(
        &["recovery", "--retries", "-2"],
        "--retries -2 is not accepted",
    );
    let out = s.run(&["recovery", "--mode", "basic"]);
    assert_eq!(out.status.code(), Some(2));

    s.fails(&["log", "--enable"], "give --path DIR");
    let missing = s.hsm.dir.path().join("absent");
    s.fails(
        &["log", "--enable", "--path", &missing.display().to_string()],
        "is not a directory",
    );
    let logs = s.hsm.dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    s.ok(&[
        "log",
        "--enable",
        "--path",
        &logs.display().to_string(),
        "--max-size",
        "4096",
    ]);
    let log = s.config().ha_log;
    assert!(log.enabled);
    assert_eq!(log.path.as_deref(), Some(logs.as_path()));
    assert_eq!(log.max_len, 4096);
    assert_eq!(log.repeats, 3, "three repeats a minute unless set");
    s.ok(&["log", "--disable", "--repeats", "0"]);
    let log = s.config().ha_log;
    assert!(!log.enabled);
    assert_eq!(log.path.as_deref(), Some(logs.as_path()));
    assert_eq!(log.repeats, 0);
    let text = s.ok(&["log", "--settings"]);
    assert!(text.contains("disabled"), "{text}");
    assert!(text.contains("every one written"), "{text}");
}

#[test]
fn import_luna_sample() {
    let s = Setup::new(&[]);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/Chrystoki.conf");
    let sample = sample.display().to_string();
    s.fails(&["import-luna", &sample], "exists; pass --force");
    let out = s.ok(&["--json", "import-luna", &sample, "--force"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["format"], "Chrystoki.conf");
    // Neither Luna's log directory nor its library exists on this machine.
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("haLogPath /var/log/lunaha does not exist here"),
        "{warnings}"
    );
    assert!(
        warnings
            .contains("library luna: cannot load /usr/safenet/lunaclient/lib/libCryptoki2_64.so"),
        "{warnings}"
    );
    assert!(
        warnings.contains("--library-path PATH --force"),
        "{warnings}"
    );
    let ignored: Vec<&str> = report["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for key in [
        "Chrystoki2.LibUNIX",
        "Luna.DefaultTimeOut",
        "LunaSA Client.ServerName00",
    ] {
        assert!(ignored.contains(&key), "{key} not in {ignored:?}");
    }
    let config = s.config();
    assert_eq!(
        config.libraries[0].path,
        Path::new("/usr/safenet/lunaclient/lib/libCryptoki2_64.so")
    );
    let group = &config.groups[0];
    assert_eq!(group.label, "myHAgroup");
    assert_eq!(group.serial.as_deref(), Some("1154438865287"));
    assert_eq!(group.members, ["154438865287", "1238700701509"]);
    assert!(group.synchronize);
    assert!(config.ha_only);
    assert_eq!(config.recovery.attempts, -1);
    assert_eq!(config.recovery.interval_secs, 60);
    assert_eq!(config.recovery.mode, RecoveryMode::ActiveEnhanced);
    assert!(config.ha_log.enabled);
    assert_eq!(
        config.ha_log.path.as_deref(),
        Some(Path::new("/var/log/lunaha"))
    );
    assert_eq!(config.ha_log.max_len, 1_000_000);
    assert_eq!(config.member_timeout_ms, 20_000);

    let bad = s.hsm.dir.path().join("bad.conf");
    fs::write(&bad, "Chrystoki2 = {\n LibUNIX64 = /x.so;\n").unwrap();
    s.fails(
        &["import-luna", &bad.display().to_string(), "--force"],
        "is not closed",
    );
}

#[test]
fn json_errors_and_help() {
    let s = Setup::new(&[]);
    let out = s.run(&[
        "--json",
        "group",
        "sync",
        "--group",
        "nosuch",
        "--pin-file",
        "/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["ok"], false);
    assert!(value["error"].as_str().unwrap().contains("nosuch"));
    for verb in [
        &["group", "create", "--help"][..],
        &["group", "add-member", "--help"],
        &["group", "sync", "--help"],
        &["recovery", "--help"],
        &["import-luna", "--help"],
    ] {
        let text = s.ok(verb);
        assert!(text.contains("Usage: pkcs11-ha"), "{verb:?}: {text}");
    }
    let help = s.ok(&["group", "add-member", "--help"]);
    assert!(
        help.contains("--pin-file") && help.contains("--objects"),
        "{help}"
    );
    let out = s
        .command(&["slots"])
        .env(CONF_ENV, s.hsm.dir.path().join("missing.conf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.conf"));
}

/// A member reached through p11-kit's remoting offers fewer mechanisms (no
/// parameterised ones): the check lists what it lacks; --force skips it.
#[test]
fn mechanism_mismatch_through_p11kit() {
    let client = p11kit::client_module();
    let s = Setup::new(&["memberA", "memberB"]);
    s.create("myHAgroup", "memberA");
    // B gets its domain key directly, then is exported by a p11-kit server.
    let b = s.serial("memberB");
    let server = P11KitServer::start(
        SOFTHSM_LIB,
        &s.hsm.conf,
        "memberB",
        &s.hsm.dir.path().join("p11.sock"),
    );
    let mut text = fs::read_to_string(&s.conf).unwrap();
    text = text.replace(
        "[VirtualToken]",
        &format!(
            "remote = {client}\n\n[LibraryEnvironment]\nremote.P11_KIT_SERVER_ADDRESS = {}\n\n[VirtualToken]",
            server.address()
        ),
    );
    fs::write(&s.conf, text).unwrap();
    let slots: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "slots"])).unwrap();
    let remote = slots["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["library"] == "remote" && t["serial"] == b.as_str())
        .cloned();
    let remote = remote.expect("memberB through the p11-kit client");
    let slot = remote["slot"].to_string();
    let creds = s.provisioning();
    let mut args = vec![
        "group",
        "add-member",
        "--group",
        "myHAgroup",
        "--slot",
        &slot,
        "--library",
        "remote",
    ];
    args.extend(creds.iter().map(String::as_str));
    let text = s.fails(&args, "[FAIL] mechanisms: lacks");
    assert!(text.contains("CKM_AES_GCM"), "{text}");
    assert!(s.config().groups[0].members.len() == 1);
    args.push("--force");
    let text = s.ok(&args);
    assert!(text.contains("[SKIP] mechanisms"), "{text}");
    assert!(
        text.contains("[SKIP] key transport: no way to move secret keys"),
        "p11-kit 0.24 lists no key-wrap mechanism: {text}"
    );
    assert!(
        text.contains("--force skipped: key transport, mechanisms"),
        "{text}"
    );
    assert_eq!(
        s.config().groups[0].members,
        [s.serial("memberA"), b.clone()]
    );
}

/// The HA log writer is one per process: tests that write with it take turns.
static HA_LOG_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `args` and returns its exit code and standard output.
fn code_and_stdout(s: &Setup, args: &[&str]) -> (Option<i32>, String) {
    let out = s.run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn init_and_library_verbs() {
    let s = Setup::new(&["memberA"]);
    let conf = s.hsm.dir.path().join("new.conf");
    let conf_arg = conf.display().to_string();
    let with = |args: &[&str]| -> Vec<String> {
        ["--config", conf_arg.as_str()]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect()
    };

    // From nothing: a file without a library, which says what to add.
    let text = s.ok(&strs(&with(&["init"])));
    assert!(text.contains("pkcs11-ha library add NAME PATH"), "{text}");
    s.fails(&strs(&with(&["slots"])), "no PKCS#11 library is configured");
    s.fails(&strs(&with(&["init"])), "exists; pass --force");

    // library add checks the path before writing it.
    s.fails(
        &strs(&with(&["library", "add", "bad", "/nonexistent/libnone.so"])),
        "cannot load /nonexistent/libnone.so",
    );
    s.fails(
        &strs(&with(&["library", "add", "rel", "libsofthsm2.so"])),
        "not an absolute path",
    );
    s.fails(
        &strs(&with(&["library", "add", "a.b", SOFTHSM_LIB])),
        "cannot be used",
    );
    let text = s.ok(&strs(&with(&["library", "add", "softhsm", SOFTHSM_LIB])));
    assert!(text.contains("Library softhsm loads and shows"), "{text}");
    s.fails(
        &strs(&with(&["library", "add", "SoftHSM", SOFTHSM_LIB])),
        "exists already",
    );
    let remote = "unix:path=/nonexistent/p11-kit.sock";
    s.ok(&strs(&with(&[
        "library",
        "add",
        "remote",
        P11KIT_CLIENT,
        "--env",
        &format!("P11_KIT_SERVER_ADDRESS={remote}"),
    ])));
    let config = Config::load(&conf).unwrap();
    assert_eq!(config.libraries.len(), 2);
    assert_eq!(config.libraries[0].path, Path::new(SOFTHSM_LIB));
    assert_eq!(
        config.libraries[1].environment,
        [("P11_KIT_SERVER_ADDRESS".to_owned(), remote.to_owned())]
    );

    // library list: each library loads, its version and its tokens.
    let out = s.ok(&strs(&with(&["--json", "library", "list"])));
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let softhsm = &list["libraries"][0];
    assert_eq!(softhsm["loads"], true);
    assert_eq!(softhsm["cryptoki_version"], "2.40");
    let serials: Vec<&str> = softhsm["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["serial"].as_str().unwrap())
        .collect();
    assert!(serials.contains(&s.serial("memberA").as_str()), "{out}");
    assert_eq!(list["libraries"][1]["loads"], true, "{out}");

    // remove refuses a library that holds a group member.
    s.ok(&strs(&with(&["library", "remove", "remote"])));
    s.fails(
        &strs(&with(&["library", "remove", "softhsm"])),
        "the only library",
    );
    s.fails(
        &strs(&with(&["library", "remove", "nosuch"])),
        "no library is named nosuch",
    );
    s.ok(&strs(&with(&["library", "add", "remote", P11KIT_CLIENT])));
    let serial = s.serial("memberA");
    let mut create = with(&["group", "create", "--label", "g", "--serial", &serial]);
    create.extend(s.provisioning());
    s.ok(&strs(&create));
    s.fails(
        &strs(&with(&["library", "remove", "softhsm"])),
        "holds group members",
    );

    // init --force replaces the file; several libraries at once.
    s.ok(&strs(&with(&[
        "init",
        "--force",
        "--library",
        &format!("softhsm={SOFTHSM_LIB}"),
    ])));
    let config = Config::load(&conf).unwrap();
    assert_eq!(config.libraries.len(), 1);
    assert!(config.groups.is_empty());
    let out = s.run(&strs(&with(&["init", "--force", "--library", "novalue"])));
    assert_eq!(out.status.code(), Some(2), "NAME=PATH is a usage error");

    // A library that went away: library list says which, exit 1, one JSON document.
    let mut config = Config::load(&conf).unwrap();
    config.libraries.push(pkcs11_ha::config::LibraryConfig {
        name: "gone".into(),
        path: PathBuf::from("/nonexistent/libgone.so"),
        environment: Vec::new(),
        concurrency: None,
        instances: None,
    });
    config.save(&conf).unwrap();
    let out = s.run(&strs(&with(&["--json", "library", "list"])));
    assert_eq!(out.status.code(), Some(1));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["ok"], false);
    assert_eq!(list["libraries"][1]["loads"], false);
    let error = list["libraries"][1]["error"].as_str().unwrap();
    assert!(
        error.contains("cannot load /nonexistent/libgone.so"),
        "{error}"
    );

    // A directory that refuses writes is named with what to do.
    let text = s.fails(
        &["--config", "/sys/pkcs11-ha-test.conf", "init"],
        "cannot write the configuration file /sys/pkcs11-ha-test.conf",
    );
    assert!(
        text.contains("give --config FILE in a writable directory"),
        "{text}"
    );
}

#[test]
fn status_exit_codes_prometheus_and_log_figures() {
    let _writer = HA_LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new(&["memberA", "memberB"]);
    let logs = s.hsm.dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    s.ok(&["log", "--enable", "--path", &logs.display().to_string()]);
    s.create("myHAgroup", "memberA");
    let [a, b] = ["memberA", "memberB"].map(|t| s.serial(t));
    let mut add = vec![
        "group",
        "add-standby",
        "--group",
        "myHAgroup",
        "--serial",
        &b,
    ];
    let creds = s.provisioning();
    add.extend(creds.iter().map(String::as_str));
    let text = s.ok(&add);
    assert!(text.contains("as a standby member"), "{text}");
    assert_eq!(s.config().groups[0].standby, std::slice::from_ref(&b));

    // The last active member cannot become standby; the message says what to do.
    let text = s.fails(
        &[
            "group",
            "standby",
            "add",
            "--group",
            "myHAgroup",
            "--serial",
            &a,
        ],
        "only active member",
    );
    assert!(
        text.contains(&format!(
            "`pkcs11-ha group standby remove --group myHAgroup --serial {b}`"
        )),
        "{text}"
    );

    // Every member serving: exit 0.
    let (code, text) = code_and_stdout(&s, &["status"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("Group myHAgroup"), "{text}");
    assert!(text.contains(": serving"), "{text}");

    // A member failure in the HA log, written by the library's own writer.
    pkcs11_ha::halog::open(&logs, 0, pkcs11_ha::config::DEFAULT_HA_LOG_REPEATS)
        .expect("the HA log directory is writable");
    pkcs11_ha::halog::record(
        "myHAgroup",
        "1",
        Some(&a),
        "member failed in C_Sign with CKR_DEVICE_ERROR; calls go to the other members",
    );
    pkcs11_ha::halog::record(
        "myHAgroup",
        "1",
        Some(&a),
        "member recovered; 0 objects replicated or synchronised",
    );
    pkcs11_ha::halog::close();
    let (code, text) = code_and_stdout(&s, &["status", "--format", "prometheus"]);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "pkcs11_ha_config_usable 1".to_owned(),
        format!("pkcs11_ha_group_state{{group=\"myHAgroup\",serial=\"{}\"}} 0", s.config().groups[0].serial.clone().unwrap()),
        format!("pkcs11_ha_member_up{{group=\"myHAgroup\",member=\"{a}\",role=\"active\"}} 1"),
        format!("pkcs11_ha_member_serving{{group=\"myHAgroup\",member=\"{b}\",role=\"standby\"}} 0"),
        format!("pkcs11_ha_member_standby{{group=\"myHAgroup\",member=\"{b}\",role=\"standby\"}} 1"),
        format!("pkcs11_ha_member_pending_changes{{group=\"myHAgroup\",member=\"{b}\",role=\"standby\"}} 0"),
        format!("pkcs11_ha_member_failures_total{{group=\"myHAgroup\",member=\"{a}\",role=\"active\"}} 1"),
        format!("pkcs11_ha_member_failures_total{{group=\"myHAgroup\",member=\"{b}\",role=\"standby\"}} 0"),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
    assert!(
        text.contains("# TYPE pkcs11_ha_member_failures_total counter"),
        "{text}"
    );
    let since = format!(
        "pkcs11_ha_member_seconds_since_state_change{{group=\"myHAgroup\",member=\"{a}\",role=\"active\"}} "
    );
    let age: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&since))
        .unwrap_or_else(|| panic!("no state change age in:\n{text}"))
        .parse()
        .unwrap();
    assert!(age < 600, "{age}");

    // Objects only the primary has: pending changes, degraded (exit 1).
    s.add_objects("memberA", "a");
    let pin = s.file("pin");
    let (code, out) = code_and_stdout(&s, &["status", "--json", "--pin-file", &pin]);
    assert_eq!(code, Some(1), "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "degraded");
    let members = status["groups"][0]["members"].as_array().unwrap();
    assert_eq!(members[1]["serial"], b.as_str());
    assert_eq!(members[1]["pending_changes"], 2, "{out}");
    assert_eq!(members[0]["pending_changes"], 0, "{out}");
    s.ok(&["group", "sync", "--group", "myHAgroup", "--pin-file", &pin]);
    let (code, out) = code_and_stdout(&s, &["status", "--pin-file", &pin]);
    assert_eq!(code, Some(0), "{out}");

    // A member that is nowhere to be found: degraded.
    let mut config = s.config();
    config.groups[0].standby = vec!["feedfacefeedface".into()];
    config.save(&s.conf).unwrap();
    let (code, out) = code_and_stdout(&s, &["status"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("member(s) down: feedfacefeedface"), "{out}");

    // Only the standby member is up: it serves, the group is degraded.
    config.groups[0].members = vec!["feedfacefeedface".into()];
    config.groups[0].standby = vec![b.clone()];
    config.save(&s.conf).unwrap();
    let (code, out) = code_and_stdout(&s, &["status", "--json"]);
    assert_eq!(code, Some(1), "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["groups"][0]["members"][1]["serving"], true, "{out}");
    assert!(out.contains("a standby member serves"), "{out}");

    // No member serves: exit 2.
    config.groups[0].standby = vec!["feedfacefeedfac0".into()];
    config.save(&s.conf).unwrap();
    let (code, out) = code_and_stdout(&s, &["status"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(": down (no member serves"), "{out}");

    // An unusable configuration: exit 2, and the metric says so.
    fs::write(&s.conf, "[VirtualToken]\nVirtualToken00Label = x\n").unwrap();
    let (code, out) = code_and_stdout(&s, &["status", "--format", "prometheus"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.lines().any(|l| l == "pkcs11_ha_config_usable 0"),
        "{out}"
    );
}

#[test]
fn log_reads_rotated_files_filters_and_follows() {
    let _writer = HA_LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new(&[]);
    let logs = s.hsm.dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    s.fails(
        &["log"],
        "enable it with `pkcs11-ha log --enable --path DIR`",
    );
    s.ok(&["log", "--enable", "--path", &logs.display().to_string()]);
    // Small files: every second line (about 64 bytes each) rotates the log.
    pkcs11_ha::halog::open(&logs, 100, pkcs11_ha::config::DEFAULT_HA_LOG_REPEATS)
        .expect("the HA log directory is writable");
    for i in 0..6 {
        let member = if i % 2 == 0 { "m0" } else { "m1" };
        // A rotated file is named by the millisecond: one rotation per millisecond.
        let stamp = pkcs11_ha::halog::utc_timestamp(std::time::SystemTime::now());
        while pkcs11_ha::halog::utc_timestamp(std::time::SystemTime::now()) == stamp {
            std::hint::spin_loop();
        }
        pkcs11_ha::halog::record("g", "1abc", Some(member), &format!("event {i}"));
    }
    pkcs11_ha::halog::close();
    let rotated = fs::read_dir(&logs).unwrap().count();
    assert_eq!(rotated, 3, "the log rotated into three files");

    let text = s.ok(&["log"]);
    let events: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit("  ").next().unwrap())
        .collect();
    assert_eq!(
        events,
        ["event 0", "event 1", "event 2", "event 3", "event 4", "event 5"],
        "{text}"
    );
    let text = s.ok(&["log", "--member", "m1"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains("member m1")), "{text}");
    let out = s.ok(&["log", "--json", "--since", "1h"]);
    let parsed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed.len(), 6);
    assert_eq!(parsed[0]["group"], "g");
    assert_eq!(parsed[0]["member"], "m0");
    assert_eq!(parsed[5]["event"], "event 5");
    assert_eq!(s.ok(&["log", "--since", "2999-01-01"]), "");
    s.fails(&["log", "--since", "yesterday"], "an age such as 90s");
    s.fails(&["log", "--follow", "--disable"], "read the log");

    // --follow prints what is written after it starts.
    let mut child = s
        .command(&["log", "--follow", "--json", "--member", "m1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The six old m1/m0 events come first: three of them are m1.
    let deadline = std::time::Duration::from_secs(20);
    for _ in 0..3 {
        let line = lines_rx
            .recv_timeout(deadline)
            .expect("the existing events");
        assert!(line.contains("\"m1\""), "{line}");
    }
    // New events, through a rotation, until one reaches the follower.
    pkcs11_ha::halog::open(&logs, 100, pkcs11_ha::config::DEFAULT_HA_LOG_REPEATS)
        .expect("the HA log directory is writable");
    let started = std::time::Instant::now();
    let mut followed = None;
    let mut n = 0;
    while followed.is_none() && started.elapsed() < deadline {
        pkcs11_ha::halog::record("g", "1abc", Some("m1"), &format!("later {n}"));
        pkcs11_ha::halog::record("g", "1abc", Some("m0"), "not this member");
        n += 1;
        followed = lines_rx
            .recv_timeout(std::time::Duration::from_millis(500))
            .ok();
    }
    pkcs11_ha::halog::close();
    child.kill().unwrap();
    child.wait().unwrap();
    let line = followed.expect("--follow printed a new event");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["member"], "m1");
    assert!(
        event["event"].as_str().unwrap().starts_with("later "),
        "{line}"
    );
}

#[test]
fn sync_dry_run_finds_the_copies_that_would_fail() {
    let s = Setup::new(&["memberA", "memberB"]);
    s.create("myHAgroup", "memberA");
    let b = s.serial("memberB");
    let mut add = vec![
        "group",
        "add-member",
        "--group",
        "myHAgroup",
        "--serial",
        &b,
    ];
    let creds = s.provisioning();
    add.extend(creds.iter().map(String::as_str));
    s.ok(&add);
    // One key that may move, one that may not (pkcs11-tool's default).
    s.add_objects("memberA", "a");
    s.pkcs11_tool(
        "memberA",
        &[
            "--keygen",
            "--key-type",
            "AES:32",
            "--id",
            "0b",
            "--label",
            "stuck",
        ],
    );
    let pin = s.file("pin");
    let sync = ["group", "sync", "--group", "myHAgroup", "--pin-file", &pin];
    let dry: Vec<&str> = sync.iter().copied().chain(["--dry-run"]).collect();
    let out = s.run(&dry);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("WOULD FAIL to copy secret key \"stuck\" (id 0b)")
            && text.contains("is not extractable"),
        "{text}"
    );
    assert!(
        text.contains("Summary: would copy 2, already present 0, would fail 1."),
        "{text}"
    );
    assert_eq!(s.labels("memberB"), ["pkcs11-ha-domain"]);

    // On a terminal (a pseudo-terminal from script(1)): one progress line,
    // rewritten, and the problems; no line per copy.
    let line = format!("{BIN} {}", dry.join(" "));
    let out = s
        .command(&["--help"])
        .get_envs()
        .fold(Command::new("script"), |mut cmd, (k, v)| {
            if let Some(v) = v {
                cmd.env(k, v);
            }
            cmd
        })
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("checked 3 of 3"), "{text}");
    assert!(
        text.contains("WOULD FAIL to copy secret key \"stuck\""),
        "{text}"
    );
    assert!(!text.contains("Would copy"), "{text}");

    let out = s.run(&sync);
    assert_eq!(out.status.code(), Some(1), "a failed copy fails the sync");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAILED to copy secret key \"stuck\""),
        "{text}"
    );
    assert!(
        text.contains("Summary: copied 2, already present 0, failed 1."),
        "{text}"
    );
    assert_eq!(s.labels("memberB"), ["a-aes", "a-data", "pkcs11-ha-domain"]);
}

#[test]
fn credentials_open_to_others_and_foreign_domain_keys_are_refused() {
    let s = Setup::new(&["memberA", "memberB"]);
    let a = s.serial("memberA");
    let open_pin = s.hsm.dir.path().join("open-pin");
    fs::write(&open_pin, format!("{USER_PIN}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&open_pin, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let text = s.fails(
        &[
            "group",
            "list",
            "--pin-file",
            &open_pin.display().to_string(),
        ],
        "is open to other users (mode 0644)",
    );
    assert!(text.contains("chmod 600"), "{text}");

    // B becomes a group's primary in another configuration.
    let other = s.hsm.dir.path().join("other.conf");
    let other_arg = other.display().to_string();
    s.ok(&[
        "--config",
        &other_arg,
        "init",
        "--library",
        &format!("softhsm={SOFTHSM_LIB}"),
    ]);
    let b = s.serial("memberB");
    let mut create = vec![
        "--config", &other_arg, "group", "create", "--label", "theirs", "--serial", &b,
    ];
    let creds = s.provisioning();
    create.extend(creds.iter().map(String::as_str));
    s.ok(&create);

    // Here it is refused as a new primary, unless --force says that group is gone.
    let pin = s.file("pin");
    let mine = [
        "group",
        "create",
        "--label",
        "mine",
        "--serial",
        &b,
        "--pin-file",
        &pin,
    ];
    let text = s.fails(&mine, "already carries a domain key \"pkcs11-ha-domain\"");
    assert!(text.contains("[FAIL] other group"), "{text}");
    assert!(s.config().groups.is_empty());
    let forced: Vec<&str> = mine.iter().copied().chain(["--force"]).collect();
    let text = s.ok(&forced);
    assert!(text.contains("[SKIP] other group"), "{text}");
    // A fresh token passes the check.
    let text = s.create("fresh", "memberA");
    assert!(text.contains("[pass] other group"), "{text}");
    assert_eq!(s.config().groups.len(), 2);
    assert_eq!(s.config().groups[1].members, [a]);
}

#[test]
fn p11kit_module_file() {
    let s = Setup::new(&[]);
    let text = s.ok(&[
        "p11-kit-module",
        "--module",
        "/opt/pkcs11-ha/libpkcs11_ha.so",
    ]);
    assert!(
        text.lines()
            .any(|l| l == "module: /opt/pkcs11-ha/libpkcs11_ha.so"),
        "{text}"
    );
    let dir = s.hsm.dir.path().join("modules");
    s.fails(
        &[
            "p11-kit-module",
            "--install",
            "--dir",
            &dir.display().to_string(),
            "--module",
            "/opt/x.so",
        ],
        "is not a directory",
    );
    fs::create_dir(&dir).unwrap();
    s.ok(&[
        "p11-kit-module",
        "--install",
        "--dir",
        &dir.display().to_string(),
        "--module",
        "/opt/x.so",
    ]);
    let written = fs::read_to_string(dir.join("pkcs11-ha.module")).unwrap();
    assert!(
        written.lines().any(|l| l == "module: /opt/x.so"),
        "{written}"
    );
}

#[test]
fn sync_copies_a_key_held_by_several_members_once() {
    // A key generated through the group: its copy on the second member was
    // made by unwrapping and has no check value, the original has one.
    let s = Setup::new(&["memberA", "memberB", "memberC"]);
    s.create("myHAgroup", "memberA");
    let creds = s.provisioning();
    let mut args: Vec<String> = ["group", "add-member", "--group", "myHAgroup", "--serial"]
        .map(str::to_owned)
        .to_vec();
    args.push(s.serial("memberB"));
    args.extend(creds.iter().cloned());
    s.ok(&strs(&args));
    let library = release_library_path();
    let out = Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(&library)
        .args(["--slot", "0", "--login", "--pin", USER_PIN])
        .args([
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "shared",
            "--id",
            "5a",
        ])
        .args(["--extractable"])
        .env(SOFTHSM_CONF_ENV, &s.hsm.conf)
        .env(CONF_ENV, &s.conf)
        .output()
        .expect("run pkcs11-tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.labels("memberA").contains(&"shared".to_string()));
    assert!(s.labels("memberB").contains(&"shared".to_string()));
    let mut args: Vec<String> = ["group", "add-member", "--group", "myHAgroup", "--serial"]
        .map(str::to_owned)
        .to_vec();
    args.push(s.serial("memberC"));
    args.extend(creds.iter().cloned());
    args.push("--sync".into());
    let text = s.ok(&strs(&args));
    let copies = s
        .labels("memberC")
        .iter()
        .filter(|l| *l == "shared")
        .count();
    assert_eq!(copies, 1, "the new member holds the key once: {text}");
}
