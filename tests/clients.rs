//! The clients people use, each against a group of two SoftHSM members:
//! Java's SunPKCS11, NSS (`modutil`, `certutil`), GnuTLS (`p11tool`,
//! `certtool`), OpenSSL with the pkcs11 engine (`s_server` and 100
//! `s_client` handshakes) and p11-kit's proxy (`pkcs11-tool` through
//! `p11-kit-proxy.so` with the module file `pkcs11-ha p11-kit-module`
//! writes). Each drives target/release/libpkcs11_ha.so from its own
//! processes, in its own token directory and configuration. The snippets
//! in the README's "Using it with ..." are these commands.
//! `scripts/lib.sh`'s `ensure_tools` installs the clients.

mod common;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pkcs11-ha");

/// A two-member group whose members share the domain key, so keys made
/// through the group exist on both.
struct Group {
    hsm: SoftHsm,
    config: PathBuf,
    library: PathBuf,
}

impl Group {
    fn new() -> Group {
        let hsm = SoftHsm::new(&["memberA", "memberB"]);
        {
            let _guard = serial_guard();
            provision_domain(&hsm, &DOMAIN_VALUE);
            std::env::remove_var(SOFTHSM_CONF_ENV);
        }
        let config = write_config(
            hsm.dir.path(),
            &[(SOFTHSM_LIB_NAME, SOFTHSM_LIB)],
            &[GroupSpec::new(GROUP_LABEL, &hsm.serials())],
            false,
        );
        Group {
            hsm,
            config,
            library: release_library_path(),
        }
    }

    fn dir(&self) -> &Path {
        self.hsm.dir.path()
    }

    fn path(&self, name: &str) -> String {
        self.dir().join(name).display().to_string()
    }

    /// `program` with the token directory and the configuration in its environment.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(SOFTHSM_CONF_ENV, &self.hsm.conf)
            .env(CONF_ENV, &self.config)
            .stdin(Stdio::null());
        cmd
    }

    /// The pass-through slot of member A.
    fn passthrough_slot(&self) -> u64 {
        passthrough_slot_id(SOFTHSM_LIB_NAME, self.hsm.token("memberA").slot_id)
    }

    /// Labels of the objects of `kind` (`privkey`, `cert`, ...) on member
    /// `token`, read from SoftHSM directly: what replication put there.
    fn member_labels(&self, token: &str, kind: &str) -> Vec<String> {
        let out = run(self
            .command("pkcs11-tool")
            .args(["--module", SOFTHSM_LIB, "--token-label", token])
            .args([
                "--login",
                "--pin",
                USER_PIN,
                "--list-objects",
                "--type",
                kind,
            ]));
        let mut labels: Vec<String> = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(|l| l.trim().to_owned())
            .collect();
        labels.sort();
        labels
    }
}

/// Runs `cmd`; it must succeed. Returns standard output and error.
#[track_caller]
fn run(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A child process killed when dropped (a server).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn java_sunpkcs11_virtual_and_passthrough_slots() {
    let g = Group::new();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/SunPkcs11.java");
    let java = |slot: &str, extra: &[&str]| {
        let config = g.dir().join("sunpkcs11.cfg");
        fs::write(
            &config,
            format!(
                "name = pkcs11-ha\nlibrary = {}\n{slot}\n",
                g.library.display()
            ),
        )
        .unwrap();
        run(g
            .command("java")
            .arg(&source)
            .arg(&config)
            .arg(USER_PIN)
            .args(extra))
    };
    // The group's virtual slot: group 00 is slot 0.
    let text = java("slot = 0", &["aes"]);
    for line in [
        "SHA256withECDSA signed and verified",
        "SHA256withRSA signed and verified",
        "AES-GCM encrypted, decrypted and refused a changed ciphertext",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    // A member's pass-through slot, by its ID: SunPKCS11 reads `slot` as an
    // int, and pass-through slot IDs are below 2^31.
    let text = java(&format!("slot = {}", g.passthrough_slot()), &[]);
    assert!(
        text.contains("SHA256withECDSA signed and verified"),
        "{text}"
    );
}

#[test]
fn nss_modutil_and_certutil_self_signed_on_the_group() {
    let g = Group::new();
    let db = format!("sql:{}", g.path("nssdb"));
    fs::create_dir(g.dir().join("nssdb")).unwrap();
    let password = g.path("token-password");
    fs::write(&password, USER_PIN).unwrap();
    run(g
        .command("certutil")
        .args(["-N", "-d", &db, "--empty-password"]));
    run(g.command("modutil").args([
        "-dbdir",
        &db,
        "-add",
        "pkcs11-ha",
        "-libfile",
        &g.library.display().to_string(),
        "-force",
    ]));
    let list = run(g
        .command("modutil")
        .args(["-dbdir", &db, "-list", "pkcs11-ha"]));
    assert!(list.contains(GROUP_LABEL), "{list}");
    let noise = g.path("noise");
    fs::write(&noise, [7u8; 64]).unwrap();
    run(g.command("certutil").args([
        "-S",
        "-d",
        &db,
        "-h",
        GROUP_LABEL,
        "-f",
        &password,
        "-z",
        &noise,
        "-n",
        "ha-cert",
        "-s",
        "CN=pkcs11-ha NSS test",
        "-x",
        "-t",
        "CT,,",
        "-k",
        "ec",
        "-q",
        "nistp256",
        "-v",
        "12",
    ]));
    let certs =
        run(g
            .command("certutil")
            .args(["-L", "-d", &db, "-h", GROUP_LABEL, "-f", &password]));
    assert!(certs.contains(&format!("{GROUP_LABEL}:ha-cert")), "{certs}");
    let valid = run(g.command("certutil").args([
        "-V",
        "-d",
        &db,
        "-h",
        GROUP_LABEL,
        "-f",
        &password,
        "-n",
        &format!("{GROUP_LABEL}:ha-cert"),
        "-u",
        "V",
        "-e",
    ]));
    assert!(valid.contains("certificate is valid"), "{valid}");
    // The certificate and its key were replicated to both members.
    for member in ["memberA", "memberB"] {
        assert_eq!(g.member_labels(member, "cert"), ["ha-cert"], "{member}");
        assert_eq!(g.member_labels(member, "privkey").len(), 1, "{member}");
    }
}

#[test]
fn gnutls_p11tool_and_certtool_with_a_key_on_the_group() {
    let g = Group::new();
    let provider = g.library.display().to_string();
    let tokens = run(g
        .command("p11tool")
        .args(["--provider", &provider, "--list-tokens"]));
    assert!(
        tokens.contains(&format!("Label: {GROUP_LABEL}")),
        "{tokens}"
    );
    let token = format!("pkcs11:token={GROUP_LABEL}");
    run(g.command("p11tool").env("GNUTLS_PIN", USER_PIN).args([
        "--provider",
        &provider,
        "--login",
        "--generate-privkey",
        "ECDSA",
        "--curve",
        "secp256r1",
        "--label",
        "gnutls-key",
        &token,
    ]));
    let template = g.path("cert.template");
    fs::write(
        &template,
        "cn = pkcs11-ha GnuTLS test\nexpiration_days = 1\nca\ncert_signing_key\nsigning_key\n",
    )
    .unwrap();
    let key = format!("pkcs11:token={GROUP_LABEL};object=gnutls-key;type=private");
    let cert = g.path("gnutls-cert.pem");
    run(g.command("certtool").env("GNUTLS_PIN", USER_PIN).args([
        "--provider",
        &provider,
        "--generate-self-signed",
        "--load-privkey",
        &key,
        "--template",
        &template,
        "--outfile",
        &cert,
    ]));
    let verified = run(g.command("certtool").args([
        "--verify",
        "--load-ca-certificate",
        &cert,
        "--infile",
        &cert,
    ]));
    assert!(verified.contains("Verified"), "{verified}");
    for member in ["memberA", "memberB"] {
        assert_eq!(
            g.member_labels(member, "privkey"),
            ["gnutls-key"],
            "{member}"
        );
    }
}

#[test]
fn openssl_engine_s_server_100_handshakes() {
    let g = Group::new();
    let openssl_conf = g.path("openssl.cnf");
    let engine = multiarch_dir()
        .join("engines-3/pkcs11.so")
        .display()
        .to_string();
    fs::write(
        &openssl_conf,
        format!(
            "openssl_conf = openssl_init\n\
             [openssl_init]\nengines = engine_section\n\
             [engine_section]\npkcs11 = pkcs11_section\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {engine}\n\
             MODULE_PATH = {}\ninit = 0\n",
            g.library.display()
        ),
    )
    .unwrap();
    let openssl = || {
        let mut cmd = g.command("openssl");
        cmd.env("OPENSSL_CONF", &openssl_conf);
        cmd
    };
    run(g.command("pkcs11-tool").args([
        "--module",
        &g.library.display().to_string(),
        "--token-label",
        GROUP_LABEL,
        "--login",
        "--pin",
        USER_PIN,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--id",
        "01",
        "--label",
        "tls-key",
    ]));
    let key = format!("pkcs11:token={GROUP_LABEL};id=%01;type=private;pin-value={USER_PIN}");
    let cert = g.path("tls-cert.pem");
    run(openssl().args([
        "req",
        "-engine",
        "pkcs11",
        "-keyform",
        "engine",
        "-key",
        &key,
        "-new",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-out",
        &cert,
    ]));
    // On a port the server binds itself and prints (`ACCEPT host:port`):
    // a free port chosen beforehand may be taken by another process (a
    // parallel test run) before the server binds it.
    let mut server = Server(
        openssl()
            .args([
                "s_server",
                "-engine",
                "pkcs11",
                "-keyform",
                "engine",
                "-key",
                &key,
                "-cert",
                &cert,
                "-accept",
                "127.0.0.1:0",
                "-www",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = server.0.stdout.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    // Reads the server's output to its end, so that it never blocks on it.
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = line
                .strip_prefix("ACCEPT 127.0.0.1:")
                .and_then(|p| p.trim().parse::<u16>().ok())
            {
                let _ = port_tx.send(port);
            }
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("s_server printed the port it listens on");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "s_server did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut failures = Vec::new();
    for i in 0..100 {
        let out = openssl()
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-CAfile", &cert, "-verify_return_error", "-brief"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() || !text.contains("CONNECTION ESTABLISHED") {
            failures.push(format!("handshake {i}: {text}"));
        }
    }
    drop(server);
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    for member in ["memberA", "memberB"] {
        assert_eq!(g.member_labels(member, "privkey"), ["tls-key"], "{member}");
    }
}

/// The uid and gid of `nobody` on Debian.
const NOBODY: u32 = 65_534;

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), id);
        }
    }
}

#[test]
fn p11kit_proxy_with_the_module_file() {
    let g = Group::new();
    let home = g.dir().join("home");
    let modules = home.join(".config/pkcs11/modules");
    fs::create_dir_all(&modules).unwrap();
    run(g.command(BIN).args([
        "p11-kit-module",
        "--install",
        "--dir",
        &modules.display().to_string(),
        "--module",
        &g.library.display().to_string(),
    ]));
    // p11-kit reads ~/.config/pkcs11 only for users other than root: the
    // clients run as nobody, who then owns the tokens and the home directory.
    chown_tree(g.dir(), NOBODY);
    let as_nobody = |program: &str| {
        let mut cmd = g.command("setpriv");
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(program)
            .env("HOME", &home);
        cmd
    };
    let proxied = |args: &[&str]| {
        run(as_nobody("pkcs11-tool")
            .arg("--module")
            .arg(multiarch_dir().join("p11-kit-proxy.so"))
            .args(args))
    };
    let listed = run(as_nobody("p11-kit").arg("list-modules"));
    assert!(listed.contains("pkcs11-ha"), "{listed}");
    let slots = proxied(&["--list-token-slots"]);
    assert!(slots.contains(GROUP_LABEL), "{slots}");
    let login = ["--token-label", GROUP_LABEL, "--login", "--pin", USER_PIN];
    let with = |extra: &[&str]| -> Vec<String> {
        login.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    let args = with(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--id",
        "02",
        "--label",
        "proxy-key",
    ]);
    proxied(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // SoftHSM has no CKM_ECDSA_SHA256: sign a SHA-256 digest with CKM_ECDSA.
    let digest = g.path("digest");
    fs::write(&digest, [0x5a; 32]).unwrap();
    let signature = g.path("signature");
    let args = with(&[
        "--sign", "-m", "ECDSA", "--id", "02", "-i", &digest, "-o", &signature,
    ]);
    proxied(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = with(&[
        "--verify",
        "-m",
        "ECDSA",
        "--id",
        "02",
        "-i",
        &digest,
        "--signature-file",
        &signature,
    ]);
    let verified = proxied(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(verified.contains("Signature is valid"), "{verified}");
    for member in ["memberA", "memberB"] {
        assert_eq!(
            g.member_labels(member, "privkey"),
            ["proxy-key"],
            "{member}"
        );
    }
}
