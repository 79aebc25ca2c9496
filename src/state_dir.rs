//! The state directory (`haStateDir`): what processes using the same groups
//! on one host leave for each other. It owns the directory (created 0700,
//! refused when other users may reach it), the per-group lock file that
//! lets one process at a time reconcile a group, and the per-group record of
//! deletions some member missed. It never holds key material or attribute
//! values: a deletion is recorded as hashes of the object's fingerprint.

use crate::identity::Fingerprint;
use cryptoki_sys::*;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where state lives when `haStateDir` is not set: persistent, since a
/// deletion record must outlive a reboot as long as a member can stay down.
/// Root's processes use the system's place; any other user's their own
/// (`$XDG_STATE_HOME`), since the directory is private to its owner.
pub fn default_path() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/lib/pkcs11-ha"));
    }
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").and_then(absolute) {
        return Some(state.join("pkcs11-ha"));
    }
    std::env::var_os("HOME")
        .and_then(absolute)
        .map(|home| home.join(".local/state/pkcs11-ha"))
}

/// An open state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Creates the directory (mode 0700) where it is missing and checks that
    /// it is a directory of this user that no other user may enter; the
    /// error says what is wrong and what to do.
    pub fn open(path: &Path) -> Result<StateDir, String> {
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
        {
            Ok(()) => {}
            Err(e) => return Err(format!("cannot create it ({e})")),
        }
        let meta = fs::metadata(path).map_err(|e| format!("cannot read it ({e})"))?;
        if !meta.is_dir() {
            return Err("it is not a directory".into());
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(format!(
                "it belongs to user {} and this process runs as user {me}; give every process \
                 using the group a directory of its own user, or run them as one user",
                meta.uid()
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "other users may reach it (mode {mode:o}); `chmod 700` it"
            ));
        }
        let probe = path.join(".probe");
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .map_err(|e| format!("cannot write in it ({e})"))?;
        let _ = fs::remove_file(probe);
        Ok(StateDir {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, group_serial: &str, suffix: &str) -> PathBuf {
        self.path.join(format!("group-{group_serial}.{suffix}"))
    }

    fn open_file(&self, group_serial: &str, suffix: &str) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.file(group_serial, suffix))
    }

    /// Takes the group's reconciliation lock (an advisory `flock`), asking
    /// again every `poll` until `give_up` says to stop waiting: `None` then.
    pub fn lock_group(
        &self,
        group_serial: &str,
        poll: Duration,
        mut give_up: impl FnMut(Duration) -> bool,
    ) -> io::Result<Option<GroupLock>> {
        let file = self.open_file(group_serial, "lock")?;
        loop {
            if flock(&file, libc::LOCK_EX | libc::LOCK_NB)? {
                return Ok(Some(GroupLock { _file: file }));
            }
            if give_up(poll) {
                return Ok(None);
            }
        }
    }

    /// Records that the object with fingerprint `print` was deleted while
    /// some member of the group could not be told: a later process then
    /// removes it from that member instead of copying it back.
    pub fn record_deletion(&self, group_serial: &str, print: &Fingerprint) -> io::Result<()> {
        let line = Deletion::of(print, now_secs()).to_line();
        let file = self.open_file(group_serial, "deleted")?;
        let _held = Held::exclusive(&file)?;
        (&file).write_all(line.as_bytes())?;
        file.sync_data()
    }

    /// The group's recorded deletions.
    pub fn deletions(&self, group_serial: &str) -> io::Result<Vec<Deletion>> {
        let file = self.open_file(group_serial, "deleted")?;
        let _held = Held::exclusive(&file)?;
        read_deletions(&file)
    }

    /// Drops the recorded deletions `forget` names: every member is known
    /// to be rid of the object, or it was made again.
    pub fn forget_deletions(
        &self,
        group_serial: &str,
        forget: impl Fn(&Deletion) -> bool,
    ) -> io::Result<()> {
        let file = self.open_file(group_serial, "deleted")?;
        let _held = Held::exclusive(&file)?;
        let all = read_deletions(&file)?;
        let kept: Vec<&Deletion> = all.iter().filter(|d| !forget(d)).collect();
        if kept.len() == all.len() {
            return Ok(());
        }
        let kept: String = kept.into_iter().map(Deletion::to_line).collect();
        // Rewritten in place under the lock: a process appending meanwhile
        // waits for it, and appends to this same file.
        file.set_len(0)?;
        (&file).write_all(kept.as_bytes())?;
        file.sync_data()
    }
}

fn read_deletions(mut file: &File) -> io::Result<Vec<Deletion>> {
    let mut text = String::new();
    file.rewind()?;
    file.read_to_string(&mut text)?;
    Ok(text.lines().filter_map(Deletion::parse).collect())
}

/// `flock`; false where another process holds it and `LOCK_NB` was asked.
fn flock(file: &File, operation: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// The group's reconciliation lock, released when dropped (closing the
/// file releases the `flock`).
pub struct GroupLock {
    _file: File,
}

/// A short exclusive `flock` on the deletion record, for one read or write.
struct Held<'a>(&'a File);

impl<'a> Held<'a> {
    fn exclusive(file: &'a File) -> io::Result<Held<'a>> {
        flock(file, libc::LOCK_EX)?;
        Ok(Held(file))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, libc::LOCK_UN);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A recorded deletion: when, the object's class, and hashes of its
/// fingerprint -- of everything but the check value, and of the check value
/// (empty when it has none), matched as [`crate::identity::matches`] would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub when_secs: u64,
    pub class: Option<CK_OBJECT_CLASS>,
    identity: [u8; 32],
    check: Option<[u8; 32]>,
}

impl Deletion {
    pub fn of(print: &Fingerprint, when_secs: u64) -> Deletion {
        let (identity, check) = hashes(print);
        let class = print
            .iter()
            .find(|(t, _)| *t == CKA_CLASS)
            .map(|(_, v)| crate::identity::ulong_of(v));
        Deletion {
            when_secs,
            class,
            identity,
            check,
        }
    }

    /// Whether `print` names the deleted object.
    pub fn matches(&self, print: &Fingerprint) -> bool {
        let (identity, check) = hashes(print);
        identity == self.identity
            && match (check, self.check) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    fn to_line(&self) -> String {
        let class = self.class.map_or("-".to_owned(), |c| format!("{c:x}"));
        let check = self.check.map_or("-".to_owned(), |c| hex(&c));
        format!(
            "{} {class} {} {check}\n",
            self.when_secs,
            hex(&self.identity)
        )
    }

    fn parse(line: &str) -> Option<Deletion> {
        let mut fields = line.split_whitespace();
        let when_secs = fields.next()?.parse().ok()?;
        let class = match fields.next()? {
            "-" => None,
            c => Some(CK_OBJECT_CLASS::from_str_radix(c, 16).ok()?),
        };
        let identity = unhex(fields.next()?)?;
        let check = match fields.next()? {
            "-" => None,
            c => Some(unhex(c)?),
        };
        Some(Deletion {
            when_secs,
            class,
            identity,
            check,
        })
    }
}

/// SHA-256 of the fingerprint without its check value (attributes in type
/// order, each as type, length and value), and of a non-empty check value.
fn hashes(print: &Fingerprint) -> ([u8; 32], Option<[u8; 32]>) {
    let mut rest: Vec<&(CK_ATTRIBUTE_TYPE, Vec<u8>)> = print
        .iter()
        .filter(|(t, _)| *t != CKA_CHECK_VALUE)
        .collect();
    rest.sort_by_key(|(t, _)| *t);
    let mut identity = Sha256::new();
    for (t, v) in rest {
        identity.update(t.to_le_bytes());
        identity.update((v.len() as u64).to_le_bytes());
        identity.update(v);
    }
    let check = print
        .iter()
        .find(|(t, v)| *t == CKA_CHECK_VALUE && !v.is_empty())
        .map(|(_, v)| Sha256::digest(v).into());
    (identity.finalize().into(), check)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(label: &str, check: &[u8]) -> Fingerprint {
        vec![
            (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
            (CKA_LABEL, label.as_bytes().to_vec()),
            (CKA_CHECK_VALUE, check.to_vec()),
        ]
    }

    #[test]
    fn deletions_match_as_fingerprints_do_and_keep_no_values() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let mode = fs::metadata(state.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        state
            .record_deletion("1234", &print("gone", b"abc"))
            .unwrap();
        state
            .record_deletion("1234", &print("also-gone", b""))
            .unwrap();
        let text = fs::read_to_string(state.path().join("group-1234.deleted")).unwrap();
        assert!(!text.contains("gone") && !text.contains("616263"), "{text}");
        let deletions = state.deletions("1234").unwrap();
        assert_eq!(deletions.len(), 2);
        assert_eq!(deletions[0].class, Some(CKO_SECRET_KEY));
        assert!(deletions[0].matches(&print("gone", b"abc")));
        assert!(
            deletions[0].matches(&print("gone", b"")),
            "an unwrapped copy"
        );
        assert!(!deletions[0].matches(&print("gone", b"xyz")));
        assert!(!deletions[0].matches(&print("kept", b"abc")));
        assert!(deletions[1].matches(&print("also-gone", b"123")));
        state
            .forget_deletions("1234", |d| d.matches(&print("gone", b"abc")))
            .unwrap();
        assert_eq!(state.deletions("1234").unwrap(), vec![deletions[1].clone()]);
        assert!(state.deletions("other").unwrap().is_empty());
    }

    #[test]
    fn a_directory_other_users_reach_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        let why = StateDir::open(&open).unwrap_err();
        assert!(
            why.contains("mode 755") && why.contains("chmod 700"),
            "{why}"
        );
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(StateDir::open(&file).is_err());
    }

    #[test]
    fn one_holder_of_a_group_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let poll = Duration::from_millis(1);
        let held = state.lock_group("g", poll, |_| true).unwrap();
        assert!(held.is_some());
        // flock locks belong to the open file: a second open is a second holder.
        assert!(state.lock_group("g", poll, |_| true).unwrap().is_none());
        assert!(state.lock_group("other", poll, |_| true).unwrap().is_some());
        drop(held);
        assert!(state.lock_group("g", poll, |_| true).unwrap().is_some());
    }
}
