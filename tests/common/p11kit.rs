//! A `p11-kit server` child process exporting one SoftHSM token on a unix
//! socket: a real out-of-process member, reached through p11-kit's client
//! module the way a network HSM is reached through its vendor library.
//! Include with `#[path = "common/p11kit.rs"] mod p11kit;`.
//!
//! Owns: the server process, in a process group of its own, with the
//! `p11-kit-remote` workers it forks (one per client connection), and its
//! log file. Must never: outlive its test (the whole group is killed on
//! drop), or start on a socket path another server uses (a starting server
//! deletes whatever is at its path, even a live socket).
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The client side of p11-kit remoting (Debian package `p11-kit-modules`),
/// in p11-kit's module directory: the one its pkg-config file names, else
/// the C compiler's multiarch one (`/usr/lib/<triplet>/pkcs11`). Panics,
/// saying what to install, when it is not there.
pub fn client_module() -> String {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|text| !text.is_empty())
    };
    let directory = output("pkg-config", &["--variable=p11_module_path", "p11-kit-1"])
        .or_else(|| {
            output("cc", &["-print-multiarch"]).map(|triplet| format!("/usr/lib/{triplet}/pkcs11"))
        })
        .expect("neither pkg-config p11-kit-1 nor cc -print-multiarch names p11-kit's module directory; install pkg-config and libp11-kit-dev, or gcc");
    let module = Path::new(&directory).join("p11-kit-client.so");
    assert!(
        module.is_file(),
        "{} missing: install p11-kit-modules (scripts/test does)",
        module.display()
    );
    module.display().to_string()
}
/// Read by the client module in `C_GetFunctionList`.
pub const ADDRESS_ENV: &str = "P11_KIT_SERVER_ADDRESS";
/// How long a server may take to create its socket, or a killed process
/// to be gone, before the test gives up.
const PATIENCE: Duration = Duration::from_secs(10);
/// How often those conditions are polled.
const POLL: Duration = Duration::from_millis(5);

/// A running `p11-kit server -f` for one SoftHSM token.
pub struct P11KitServer {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl P11KitServer {
    /// Starts a server exporting the token labelled `token_label` of the
    /// SoftHSM whose config is `softhsm_conf`, on `socket` (which must not
    /// exist), and waits until the server listens there ([`listening`]).
    /// `softhsm` is the SoftHSM module path.
    pub fn start(softhsm: &str, softhsm_conf: &Path, token_label: &str, socket: &Path) -> Self {
        assert!(!socket.exists(), "{} already exists", socket.display());
        let log = socket.with_extension("log");
        let log_file = fs::File::create(&log).expect("create the server log");
        let mut command = Command::new("p11-kit");
        // p11-kit's client, loaded in this process, opens its sockets
        // without close-on-exec: a server started (or restarted) later
        // inherited other members' connections, which then never closed
        // when the client dropped them (seen in the soak: a restarted
        // server holding the socket of a member that never served again).
        // SAFETY: close_range(2) is async-signal-safe and only marks
        // descriptors; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::close_range(
                    3,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
                );
                Ok(())
            })
        };
        let child = command
            .args(["server", "-f", "-n"])
            .arg(socket)
            .args(["--provider", softhsm])
            .arg(format!("pkcs11:token={token_label}"))
            .env("SOFTHSM2_CONF", softhsm_conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .expect("start p11-kit server (is p11-kit installed?)");
        let mut server = P11KitServer {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let started = Instant::now();
        while !listening(&server.socket) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("p11-kit server exited with {status}: {}", server.log_text());
            }
            assert!(
                started.elapsed() < PATIENCE,
                "p11-kit server made no socket at {}: {}",
                server.socket.display(),
                server.log_text()
            );
            thread::sleep(POLL);
        }
        server
    }

    /// The value for `P11_KIT_SERVER_ADDRESS`.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr so far, for failure messages.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The live worker processes: children of the server (`p11-kit-remote`,
    /// one per client connection), zombies left out.
    pub fn workers(&self) -> Vec<u32> {
        children(self.pid())
            .into_iter()
            .filter(|pid| is_alive(*pid))
            .collect()
    }

    /// `SIGSTOP`s the server itself, not its workers: it accepts no new
    /// connection until it is dropped, so a member that lost its workers
    /// cannot reconnect -- a down member that stays down.
    pub fn stop_listening(&self) {
        // SAFETY: kill(2) on the server this struct started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGSTOP) };
    }

    /// `SIGKILL`s every worker -- a crash of the member behind each
    /// connection, while the server itself keeps listening -- and waits
    /// until each is dead. Returns their pids.
    pub fn kill_workers(&self) -> Vec<u32> {
        let workers = self.workers();
        for pid in &workers {
            // SAFETY: kill(2) on a pid that is our server's child.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        let started = Instant::now();
        while workers.iter().any(|pid| is_alive(*pid)) {
            assert!(started.elapsed() < PATIENCE, "killed workers still run");
            thread::sleep(POLL);
        }
        workers
    }
}

impl Drop for P11KitServer {
    fn drop(&mut self) {
        // The server leads its own group: this takes its workers too.
        // SAFETY: kill(2) on the group this struct started.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Whether a unix socket at `path` accepts connections. Its file exists
/// from `bind`, and `p11-kit server` calls `listen` about 2 ms later (under
/// strace): a client connecting in between is refused, and p11-kit's client
/// then starts with no slot, so the member looks down. Read from
/// `/proc/net/unix` (a listening socket has `__SO_ACCEPTCON`, 0x10000, in
/// its flags), so that no connection -- and no worker of the server's -- is
/// made to find out.
pub fn listening(path: &Path) -> bool {
    const ACCEPTING: u32 = 0x10000;
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & ACCEPTING != 0)
    })
}

/// Children of `pid`, from every thread's `children` file in /proc.
fn children(pid: u32) -> Vec<u32> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/<pid>/task");
    let mut found: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": the command may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Bytes a process read so far (`rchar` of /proc/<pid>/io): it grows while
/// a worker serves calls.
pub fn bytes_read(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("rchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
