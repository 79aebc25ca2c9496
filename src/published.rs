//! What a running application tells the operator's tools: its groups'
//! member counters (state, calls served, failures), in one small JSON file
//! per process in the state directory, rewritten every
//! [`PUBLISH_INTERVAL`] and removed at `C_Finalize`. Calls served exist
//! only inside each process; this is how `pkcs11-ha status` sees them. The
//! file holds serials, counters and return-value names: no PIN, handle,
//! label of an object or key material.

use crate::error::rv_name;
use crate::group::{Group, MemberState};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// How often a process rewrites its file; a file not rewritten for three
/// of these belongs to a process that is gone or stuck.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

/// The subdirectory of the state directory that holds the files.
const PROCESSES: &str = "processes";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessStatus {
    pub pid: u32,
    /// The configuration file the process loaded.
    pub config: PathBuf,
    pub written_unix_ms: u64,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    pub label: String,
    /// The virtual token's serial.
    pub serial: String,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberStatus {
    pub serial: String,
    pub standby: bool,
    /// `up`, `down` or `recovering`, as this process sees the member.
    pub state: String,
    pub calls_served: u64,
    pub consecutive_failures: u64,
    /// The fault that last took it out (`CKR_OK`: none).
    pub last_fault: String,
    pub ms_since_state_change: u64,
    pub pending_changes: u64,
}

fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Up => "up",
        MemberState::Down => "down",
        MemberState::Recovering => "recovering",
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This process's groups as they are now.
pub fn snapshot(config: &Path, groups: &[Arc<Group>]) -> ProcessStatus {
    ProcessStatus {
        pid: std::process::id(),
        config: config.to_path_buf(),
        written_unix_ms: unix_ms(SystemTime::now()),
        groups: groups
            .iter()
            .map(|group| GroupStatus {
                label: group.label.clone(),
                serial: group.serial.clone(),
                members: group
                    .members
                    .iter()
                    .map(|member| MemberStatus {
                        serial: member.serial.clone(),
                        standby: member.standby,
                        state: state_name(member.state()).to_owned(),
                        calls_served: member.calls_served(),
                        consecutive_failures: member.consecutive_failures(),
                        last_fault: rv_name(member.last_fault()),
                        ms_since_state_change: member.ms_since_state_change(),
                        pending_changes: group.undelivered_count(member.position) as u64,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn processes_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(PROCESSES)
}

/// Writes `status` where [`read_live`] finds it: whole or not at all (a
/// temporary file renamed over the old one), readable by the owner only.
pub fn write(state_dir: &Path, status: &ProcessStatus) -> std::io::Result<()> {
    let dir = processes_dir(state_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = dir.join(format!("{}.json", status.pid));
    let temporary = dir.join(format!("{}.json.new", status.pid));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&serde_json::to_vec(status).map_err(std::io::Error::other)?)?;
    drop(file);
    fs::rename(&temporary, &path)
}

fn remove(state_dir: &Path, pid: u32) {
    // Gone already (a cleaner ran, or it was never written) is fine.
    let _ = fs::remove_file(processes_dir(state_dir).join(format!("{pid}.json")));
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let answered = unsafe { libc::kill(pid, 0) } == 0;
    answered || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The files of processes that are running and wrote within three
/// intervals of `now`. Files of processes that have exited are removed
/// (where the directory lets us); unreadable ones are skipped.
pub fn read_live(state_dir: &Path, now: SystemTime) -> Vec<ProcessStatus> {
    let Ok(entries) = fs::read_dir(processes_dir(state_dir)) else {
        return Vec::new();
    };
    let oldest = unix_ms(now).saturating_sub(3 * PUBLISH_INTERVAL.as_millis() as u64);
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(status) = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<ProcessStatus>(&bytes).ok())
        else {
            continue;
        };
        if !alive(status.pid) {
            let _ = fs::remove_file(&path);
        } else if status.written_unix_ms >= oldest {
            live.push(status);
        }
    }
    live.sort_by_key(|s| s.pid);
    live
}

/// The thread that keeps this process's file current.
pub struct Publisher {
    state_dir: PathBuf,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Writes the file now and then every [`PUBLISH_INTERVAL`]. A state
    /// directory that cannot be written costs one line on stderr, never
    /// the application's calls.
    pub fn start(state_dir: &Path, config: &Path, groups: Vec<Arc<Group>>) -> Publisher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (state_dir, config, stop) = (
                state_dir.to_path_buf(),
                config.to_path_buf(),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name("pkcs11-ha-status".into())
                .spawn(move || publish_until_stopped(&state_dir, &config, &groups, &stop))
                .ok()
        };
        Publisher {
            state_dir: state_dir.to_path_buf(),
            stop,
            thread,
        }
    }

    /// Stops the thread and removes the file: the process no longer serves.
    pub fn stop(mut self) {
        let (stopped, wake) = &*self.stop;
        *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        remove(&self.state_dir, std::process::id());
    }
}

fn publish_until_stopped(
    state_dir: &Path,
    config: &Path,
    groups: &[Arc<Group>],
    stop: &(Mutex<bool>, Condvar),
) {
    let (stopped, wake) = stop;
    let mut warned = false;
    let mut stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        if let Err(why) = write(state_dir, &snapshot(config, groups)) {
            if !warned {
                eprintln!(
                    "pkcs11-ha: cannot write this process's status under {} ({why}); \
                     `pkcs11-ha status` will not show its calls served: make the \
                     directory writable by this user or set haStateDir",
                    state_dir.display()
                );
                warned = true;
            }
        }
        stopped = wake
            .wait_timeout(stopped, PUBLISH_INTERVAL)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pid: u32, written: SystemTime) -> ProcessStatus {
        ProcessStatus {
            pid,
            config: PathBuf::from("/etc/pkcs11-ha.conf"),
            written_unix_ms: unix_ms(written),
            groups: vec![GroupStatus {
                label: "payments".into(),
                serial: "11001".into(),
                members: vec![MemberStatus {
                    serial: "1001".into(),
                    standby: false,
                    state: "up".into(),
                    calls_served: 42,
                    consecutive_failures: 0,
                    last_fault: "CKR_OK".into(),
                    ms_since_state_change: 7,
                    pending_changes: 0,
                }],
            }],
        }
    }

    #[test]
    fn a_live_process_is_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mine = status(std::process::id(), now);
        write(dir.path(), &mine).unwrap();
        assert_eq!(read_live(dir.path(), now), vec![mine]);
        let mode = fs::metadata(processes_dir(dir.path()))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
    }

    #[test]
    fn files_of_exited_processes_are_removed_and_stale_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let exited = child.id();
        child.wait().unwrap();
        write(dir.path(), &status(exited, now)).unwrap();
        let stale = now - 4 * PUBLISH_INTERVAL;
        write(dir.path(), &status(std::process::id(), stale)).unwrap();
        assert!(read_live(dir.path(), now).is_empty());
        let left: Vec<_> = fs::read_dir(processes_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from(format!(
                "{}.json",
                std::process::id()
            ))]
        );
    }
}
