//! The configuration file: which PKCS#11 libraries to load, which member
//! tokens form each HA group, and whether to hide the member slots.
//!
//! Key names follow Thales Luna's `crystoki.ini`, so a Luna HA setup carries
//! over. This module reads, checks and writes the file; it never loads a
//! library or talks to a token, so a library path is not checked here.
//!
//! Key names ignore case, and `;` starts a comment at the start of a line or
//! after whitespace:
//!
//! ```ini
//! [Libraries]
//! softhsm = /usr/lib/softhsm/libsofthsm2.so      ; NAME = path; one or more
//!
//! [LibraryEnvironment]                           ; optional section
//! softhsm.SOFTHSM2_CONF = /etc/softhsm2.conf     ; NAME.VARIABLE = value
//!
//! [LibraryConcurrency]                           ; optional section
//! softhsm = 8                                    ; NAME = most calls in flight at once
//!
//! [VirtualToken]
//! VirtualToken00Label       = myHAgroup
//! VirtualToken00SN          = 1154438865287      ; optional
//! VirtualToken00Members     = 154438865287,1238700701509   ; member serials, primary first
//! VirtualToken00Standby     = 1238700701510      ; optional, standby member serials
//! VirtualToken00DomainLabel = myHAdomain         ; optional, default pkcs11-ha-domain
//! VirtualToken00MinReplicas = 2                  ; optional, default 1: members an object must be on
//! VirtualTokenActiveRecovery = activeEnhanced    ; optional, or activeBasic
//!
//! [HASynchronize]                                ; optional section
//! myHAgroup = 1                  ; 0 = recovery does not copy missing objects
//!
//! [HAConfiguration]
//! HAOnly = 0                     ; 1 = show only virtual slots
//! MultipartReplayLimit = 1048576 ; optional, 0 to 1073741824; 0 disables replay
//! reconnAtt = -1                 ; optional, recovery attempts; -1 forever, 0 off
//! AutoReconnectInterval = 60     ; optional, seconds between recovery attempts
//! memberTimeout = 20000          ; optional, milliseconds a member may take
//! earlyHangDetection = 1         ; optional, 0: a silent network call waits memberTimeout
//! haLogStatus = disabled         ; optional, enabled or disabled
//! haLogPath = /var/log/pkcs11-ha ; directory of haErrorLog.txt; needed if enabled
//! logLen = 10485760              ; optional, bytes before the log rotates; 0 never
//! logRepeats = 3                 ; optional, lines per minute for one repeating event; 0 all
//! haStateDir = /var/lib/pkcs11-ha ; optional, state shared by processes on this host
//! ReconcileInterval = 300        ; optional, seconds between reconciliations; 0 off
//! ```
//!
//! `[LibraryEnvironment]` sets environment variables while a library's
//! function list is obtained, e.g. `P11_KIT_SERVER_ADDRESS` for two entries
//! of `p11-kit-client.so` that reach two servers. `[LibraryInstances]`
//! (optional, `NAME = N`) sets how many instances of p11-kit's client a
//! library entry keeps, each its own connection to its server.
//!
//! `VirtualTokenNNDomainLabel` is the label of the AES wrapping key that the
//! group's members share (their cloning domain). `MultipartReplayLimit` is
//! how many bytes of multi-part digest/sign/verify input are kept per
//! operation so that the operation can be replayed on another member when its
//! member fails; a longer operation fails with its member.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use ini::{Ini, ParseOption};

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "PKCS11_HA_CONF";
/// Where the configuration file is when [`CONFIG_ENV`] is not set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pkcs11-ha.conf";

const LIBRARIES: &str = "Libraries";
const LIBRARY_ENVIRONMENT: &str = "LibraryEnvironment";
const LIBRARY_CONCURRENCY: &str = "LibraryConcurrency";
const LIBRARY_INSTANCES: &str = "LibraryInstances";
pub const VIRTUAL_TOKEN: &str = "VirtualToken";
const HA_SYNCHRONIZE: &str = "HASynchronize";
pub const HA_CONFIGURATION: &str = "HAConfiguration";
const SECTIONS: [&str; 7] = [
    LIBRARIES,
    LIBRARY_ENVIRONMENT,
    LIBRARY_CONCURRENCY,
    LIBRARY_INSTANCES,
    VIRTUAL_TOKEN,
    HA_SYNCHRONIZE,
    HA_CONFIGURATION,
];
const ACTIVE_RECOVERY: &str = "VirtualTokenActiveRecovery";
const HA_ONLY: &str = "HAOnly";
const MULTIPART_REPLAY_LIMIT: &str = "MultipartReplayLimit";
const RECONN_ATT: &str = "reconnAtt";
const AUTO_RECONNECT_INTERVAL: &str = "AutoReconnectInterval";
const MEMBER_TIMEOUT: &str = "memberTimeout";
const EARLY_HANG_DETECTION: &str = "earlyHangDetection";
const HA_LOG_STATUS: &str = "haLogStatus";
pub const HA_LOG_PATH: &str = "haLogPath";
const LOG_LEN: &str = "logLen";
const LOG_REPEATS: &str = "logRepeats";
pub const HA_STATE_DIR: &str = "haStateDir";
const RECONCILE_INTERVAL: &str = "ReconcileInterval";
/// The `[HAConfiguration]` keys, for messages.
const HA_KEYS: [&str; 12] = [
    HA_ONLY,
    MULTIPART_REPLAY_LIMIT,
    RECONN_ATT,
    AUTO_RECONNECT_INTERVAL,
    MEMBER_TIMEOUT,
    EARLY_HANG_DETECTION,
    HA_LOG_STATUS,
    HA_LOG_PATH,
    LOG_LEN,
    LOG_REPEATS,
    HA_STATE_DIR,
    RECONCILE_INTERVAL,
];

/// Most members (active and standby) a group may have: as many as
/// `CA_GetHAState` can report.
pub const MAX_GROUP_MEMBERS: usize = 32;

/// `VirtualTokenNNDomainLabel` when the key is not given.
pub const DEFAULT_DOMAIN_LABEL: &str = "pkcs11-ha-domain";
/// `MultipartReplayLimit` when the key is not given: 1 MiB.
pub const DEFAULT_MULTIPART_REPLAY_LIMIT: usize = 1 << 20;
/// Largest accepted `MultipartReplayLimit`: 1 GiB.
const MAX_MULTIPART_REPLAY_LIMIT: usize = 1 << 30;

/// `reconnAtt` when the key is not given: try forever.
pub const DEFAULT_RECONNECT_ATTEMPTS: i64 = -1;
/// `AutoReconnectInterval` when the key is not given, in seconds (Luna's).
pub const DEFAULT_RECONNECT_INTERVAL_SECS: u64 = 60;
/// Largest accepted `AutoReconnectInterval`: one day, in seconds.
pub const MAX_RECONNECT_INTERVAL_SECS: u64 = 86_400;
/// `memberTimeout` when the key is not given, in milliseconds (Luna's
/// receive timeout).
pub const DEFAULT_MEMBER_TIMEOUT_MS: u64 = 20_000;
/// Largest accepted `memberTimeout`: one hour, in milliseconds.
pub const MAX_MEMBER_TIMEOUT_MS: u64 = 3_600_000;
/// `logLen` when the key is not given: 10 MiB.
pub const DEFAULT_HA_LOG_MAX_LEN: u64 = 10 * 1024 * 1024;
/// `logRepeats` when the key is not given: an event that repeats is
/// written three times a minute, then counted.
pub const DEFAULT_HA_LOG_REPEATS: u32 = 3;
/// The HA log's file name inside `haLogPath`.
pub const HA_LOG_FILE: &str = "haErrorLog.txt";
/// `ReconcileInterval` when the key is not given, in seconds: often enough
/// that a member rarely lacks an object for long where no process starts
/// or sees a member return, rarely enough that each process's read of every
/// member (one enumeration each) costs the members little.
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 300;
/// Largest accepted `ReconcileInterval`: one day, in seconds.
pub const MAX_RECONCILE_INTERVAL_SECS: u64 = 86_400;

/// Size of `CK_TOKEN_INFO.label`, which shows the group label.
const MAX_LABEL_BYTES: usize = 32;
/// Size of `CK_TOKEN_INFO.serialNumber`.
const MAX_SERIAL_CHARS: usize = 16;

/// The whole configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, for messages.
    pub path: PathBuf,
    /// In file order.
    pub libraries: Vec<LibraryConfig>,
    /// Sorted by index.
    pub groups: Vec<GroupConfig>,
    /// Show only the virtual slots, not the member tokens' own slots.
    pub ha_only: bool,
    /// Bytes of multi-part digest/sign/verify input buffered per operation so
    /// it can be replayed on another member; 0 disables replay.
    pub multipart_replay_limit: usize,
    /// Auto-recovery of failed members.
    pub recovery: RecoveryConfig,
    /// `memberTimeout`: milliseconds an application call waits on a member
    /// before the member counts as failed; at least 1.
    pub member_timeout_ms: u64,
    /// `earlyHangDetection`: a network member's call silent far longer than
    /// its kind usually takes is cut before `memberTimeout`
    /// (`recovery::cut_silent_calls`).
    pub early_hang_detection: bool,
    /// The HA event log.
    pub ha_log: HaLogConfig,
    /// `haStateDir`, absolute, where given; else [`crate::state_dir::default_path`].
    pub state_dir: Option<PathBuf>,
    /// `ReconcileInterval`: seconds between reconciliations of each group
    /// besides those at start, login and a member's return; 0: none.
    pub reconcile_interval_secs: u64,
}

/// An empty configuration with every setting at its default. It has no
/// library, so [`Config::parse`] would reject its text until one is added.
impl Default for Config {
    fn default() -> Config {
        Config {
            path: PathBuf::new(),
            libraries: Vec::new(),
            groups: Vec::new(),
            ha_only: false,
            multipart_replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
            recovery: RecoveryConfig::default(),
            member_timeout_ms: DEFAULT_MEMBER_TIMEOUT_MS,
            early_hang_detection: true,
            ha_log: HaLogConfig::default(),
            state_dir: None,
            reconcile_interval_secs: DEFAULT_RECONCILE_INTERVAL_SECS,
        }
    }
}

/// One `[Libraries]` line: a PKCS#11 library to load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibraryConfig {
    pub name: String,
    pub path: PathBuf,
    /// `[LibraryEnvironment]` lines `NAME.VARIABLE = value` of this library,
    /// in file order, as (variable, value): set while the library's function
    /// list is obtained.
    pub environment: Vec<(String, String)>,
    /// `[LibraryConcurrency] NAME = N`: the most calls in flight at once
    /// into the library; `None`, as many as the application makes.
    pub concurrency: Option<std::num::NonZeroUsize>,
    /// `[LibraryInstances] NAME = N`: the client instances (each its own
    /// connection) of p11-kit's client; `None`, its default.
    pub instances: Option<std::num::NonZeroUsize>,
}

/// Auto-recovery settings (`reconnAtt`, `AutoReconnectInterval`,
/// `VirtualTokenActiveRecovery`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// `reconnAtt`: attempts per failure; -1 forever, 0 no auto-recovery.
    pub attempts: i64,
    /// `AutoReconnectInterval`: seconds between attempts, at least 1.
    pub interval_secs: u64,
    /// `[VirtualToken] VirtualTokenActiveRecovery`.
    pub mode: RecoveryMode,
}

impl Default for RecoveryConfig {
    fn default() -> RecoveryConfig {
        RecoveryConfig {
            attempts: DEFAULT_RECONNECT_ATTEMPTS,
            interval_secs: DEFAULT_RECONNECT_INTERVAL_SECS,
            mode: RecoveryMode::default(),
        }
    }
}

/// What recovery restores before a member rejoins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RecoveryMode {
    /// `activeEnhanced`: reopen member sessions behind every open virtual
    /// session and log them in, at recovery.
    #[default]
    ActiveEnhanced,
    /// `activeBasic`: reopen member sessions only when a call needs them.
    ActiveBasic,
}

impl RecoveryMode {
    /// Luna's spelling, as in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryMode::ActiveEnhanced => "activeEnhanced",
            RecoveryMode::ActiveBasic => "activeBasic",
        }
    }

    /// Luna's spelling, any case.
    pub fn from_name(name: &str) -> Option<RecoveryMode> {
        [RecoveryMode::ActiveEnhanced, RecoveryMode::ActiveBasic]
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for RecoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HA log (`haLogStatus`, `haLogPath`, `logLen`, `logRepeats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaLogConfig {
    /// `haLogStatus = enabled`.
    pub enabled: bool,
    /// `haLogPath`: the directory of [`HA_LOG_FILE`], absolute; always
    /// `Some` when `enabled`.
    pub path: Option<PathBuf>,
    /// `logLen`: bytes after which the log is rotated; 0 never rotates.
    pub max_len: u64,
    /// `logRepeats`: how often one event that repeats (the same text but
    /// for its numbers, for the same member) is written per minute before
    /// the rest are counted; 0 writes every one, for diagnosis.
    pub repeats: u32,
}

impl Default for HaLogConfig {
    fn default() -> HaLogConfig {
        HaLogConfig {
            enabled: false,
            path: None,
            max_len: DEFAULT_HA_LOG_MAX_LEN,
            repeats: DEFAULT_HA_LOG_REPEATS,
        }
    }
}

/// One HA group (`VirtualTokenNN...` keys): member tokens shown as one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The `NN` of `VirtualTokenNN`.
    pub index: u32,
    pub label: String,
    /// `VirtualTokenNNSN`: the serial number the virtual token reports.
    pub serial: Option<String>,
    /// Active member serials, primary first.
    pub members: Vec<String>,
    /// Standby member serials.
    pub standby: Vec<String>,
    /// `VirtualTokenNNDomainLabel`: label of the AES wrapping key the members
    /// share (their cloning domain); [`DEFAULT_DOMAIN_LABEL`] if not given.
    pub domain_label: String,
    /// `[HASynchronize] <label> = 1` (the default): a recovered member gets
    /// the objects it lacks before it rejoins.
    pub synchronize: bool,
    /// `VirtualTokenNNMinReplicas`: on how many members an object must be
    /// before a call that makes it returns OK (1, Luna's behaviour, by
    /// default).
    pub min_replicas: usize,
}

/// Group 00 without label or members, every option at its default.
impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig {
            index: 0,
            label: String::new(),
            serial: None,
            members: Vec::new(),
            standby: Vec::new(),
            domain_label: DEFAULT_DOMAIN_LABEL.to_owned(),
            synchronize: true,
            min_replicas: 1,
        }
    }
}

/// A problem in the configuration file, located as closely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub section: Option<String>,
    pub key: Option<String>,
    /// What is wrong and what to do about it.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(section) = &self.section {
            write!(f, "[{section}] ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn error(file: &Path, section: Option<&str>, key: Option<&str>, problem: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        section: section.map(str::to_owned),
        key: key.map(str::to_owned),
        problem,
    }
}

/// Settings of one section as written, key spelling kept for messages.
type Entries = Vec<(String, String)>;

impl Config {
    /// Path from [`CONFIG_ENV`] or the default.
    pub fn locate() -> PathBuf {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|e| {
            let problem = format!(
                "cannot read the configuration file ({e}); check that it exists and is \
                 readable, or set {CONFIG_ENV} to the right file"
            );
            error(path, None, None, problem)
        })?;
        Config::parse(path, &text)
    }

    /// Parses and checks `text`; `path` is used only in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let [libraries, environment, concurrency, instances, groups, synchronize, ha] =
            read_sections(path, text)?;
        let mut libraries = parse_libraries(path, libraries.unwrap_or_default())?;
        parse_environment(path, environment.unwrap_or_default(), &mut libraries)?;
        parse_concurrency(path, concurrency.unwrap_or_default(), &mut libraries)?;
        parse_instances(path, instances.unwrap_or_default(), &mut libraries)?;
        let (mut groups, mode) = parse_groups(path, groups.unwrap_or_default())?;
        parse_synchronize(path, synchronize.unwrap_or_default(), &mut groups)?;
        let HaSettings {
            ha_only,
            multipart_replay_limit,
            attempts,
            interval_secs,
            member_timeout_ms,
            early_hang_detection,
            ha_log,
            state_dir,
            reconcile_interval_secs,
        } = parse_ha_configuration(path, ha.unwrap_or_default())?;
        if ha_only && groups.is_empty() {
            let problem = format!(
                "{HA_ONLY} hides the member slots but no group is configured, so no slot \
                 would be left; add a group under [{VIRTUAL_TOKEN}] or set {HA_ONLY} = 0"
            );
            return Err(error(path, Some(HA_CONFIGURATION), Some(HA_ONLY), problem));
        }
        Ok(Config {
            path: path.to_owned(),
            libraries,
            groups,
            ha_only,
            multipart_replay_limit,
            recovery: RecoveryConfig {
                attempts,
                interval_secs,
                mode,
            },
            member_timeout_ms,
            early_hang_detection,
            ha_log,
            state_dir,
            reconcile_interval_secs,
        })
    }

    /// The library entry named `name` (names ignore case).
    pub fn library(&self, name: &str) -> Option<&LibraryConfig> {
        self.libraries
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(name))
    }

    /// The group labelled `label` (labels ignore case).
    pub fn group(&self, label: &str) -> Option<&GroupConfig> {
        self.groups
            .iter()
            .find(|g| g.label.eq_ignore_ascii_case(label))
    }

    /// Serialises back to INI text that [`Config::parse`] reads to an equal
    /// `Config`. Group keys are written with a two-digit index, so indices
    /// above 99 (which `parse` never produces) do not survive; nor do values
    /// that INI cannot hold (a `" ;"` in a value, a `=` in a group label
    /// whose synchronisation is off, leading or trailing blanks). Optional
    /// keys and sections at their default are left out, so older readers
    /// still accept the file.
    pub fn to_ini_string(&self) -> String {
        let mut out = String::new();
        self.write_ini(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_ini(&self, out: &mut impl fmt::Write) -> fmt::Result {
        writeln!(out, "[{LIBRARIES}]")?;
        for library in &self.libraries {
            writeln!(out, "{} = {}", library.name, library.path.display())?;
        }
        if self.libraries.iter().any(|l| !l.environment.is_empty()) {
            writeln!(out, "\n[{LIBRARY_ENVIRONMENT}]")?;
            for library in &self.libraries {
                for (variable, value) in &library.environment {
                    writeln!(out, "{}.{variable} = {value}", library.name)?;
                }
            }
        }
        if self.libraries.iter().any(|l| l.concurrency.is_some()) {
            writeln!(out, "\n[{LIBRARY_CONCURRENCY}]")?;
            for library in &self.libraries {
                if let Some(limit) = library.concurrency {
                    writeln!(out, "{} = {limit}", library.name)?;
                }
            }
        }
        if self.libraries.iter().any(|l| l.instances.is_some()) {
            writeln!(out, "\n[{LIBRARY_INSTANCES}]")?;
            for library in &self.libraries {
                if let Some(instances) = library.instances {
                    writeln!(out, "{} = {instances}", library.name)?;
                }
            }
        }
        writeln!(out, "\n[{VIRTUAL_TOKEN}]")?;
        for group in &self.groups {
            let key = |field: Field| group_key(group.index, field);
            writeln!(out, "{} = {}", key(Field::Label), group.label)?;
            if let Some(serial) = &group.serial {
                writeln!(out, "{} = {serial}", key(Field::Sn))?;
            }
            writeln!(out, "{} = {}", key(Field::Members), group.members.join(","))?;
            if !group.standby.is_empty() {
                writeln!(out, "{} = {}", key(Field::Standby), group.standby.join(","))?;
            }
            if group.domain_label != DEFAULT_DOMAIN_LABEL {
                writeln!(out, "{} = {}", key(Field::DomainLabel), group.domain_label)?;
            }
            if group.min_replicas != 1 {
                writeln!(out, "{} = {}", key(Field::MinReplicas), group.min_replicas)?;
            }
        }
        if self.recovery.mode != RecoveryMode::default() {
            writeln!(out, "{ACTIVE_RECOVERY} = {}", self.recovery.mode)?;
        }
        if self.groups.iter().any(|g| !g.synchronize) {
            writeln!(out, "\n[{HA_SYNCHRONIZE}]")?;
            for group in self.groups.iter().filter(|g| !g.synchronize) {
                writeln!(out, "{} = 0", group.label)?;
            }
        }
        writeln!(out, "\n[{HA_CONFIGURATION}]")?;
        writeln!(out, "{HA_ONLY} = {}", u8::from(self.ha_only))?;
        if self.multipart_replay_limit != DEFAULT_MULTIPART_REPLAY_LIMIT {
            writeln!(
                out,
                "{MULTIPART_REPLAY_LIMIT} = {}",
                self.multipart_replay_limit
            )?;
        }
        if self.recovery.attempts != DEFAULT_RECONNECT_ATTEMPTS {
            writeln!(out, "{RECONN_ATT} = {}", self.recovery.attempts)?;
        }
        if self.recovery.interval_secs != DEFAULT_RECONNECT_INTERVAL_SECS {
            writeln!(
                out,
                "{AUTO_RECONNECT_INTERVAL} = {}",
                self.recovery.interval_secs
            )?;
        }
        if self.member_timeout_ms != DEFAULT_MEMBER_TIMEOUT_MS {
            writeln!(out, "{MEMBER_TIMEOUT} = {}", self.member_timeout_ms)?;
        }
        if !self.early_hang_detection {
            writeln!(out, "{EARLY_HANG_DETECTION} = 0")?;
        }
        if self.ha_log.enabled {
            writeln!(out, "{HA_LOG_STATUS} = enabled")?;
        }
        if let Some(path) = &self.ha_log.path {
            writeln!(out, "{HA_LOG_PATH} = {}", path.display())?;
        }
        if self.ha_log.max_len != DEFAULT_HA_LOG_MAX_LEN {
            writeln!(out, "{LOG_LEN} = {}", self.ha_log.max_len)?;
        }
        if self.ha_log.repeats != DEFAULT_HA_LOG_REPEATS {
            writeln!(out, "{LOG_REPEATS} = {}", self.ha_log.repeats)?;
        }
        if let Some(path) = &self.state_dir {
            writeln!(out, "{HA_STATE_DIR} = {}", path.display())?;
        }
        if self.reconcile_interval_secs != DEFAULT_RECONCILE_INTERVAL_SECS {
            writeln!(
                out,
                "{RECONCILE_INTERVAL} = {}",
                self.reconcile_interval_secs
            )?;
        }
        Ok(())
    }

    /// Writes atomically: temp file in the same directory, fsync, rename, so a
    /// reader sees the old file or the new one, never half of one. The file
    /// gets mode 0600.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        static NEXT_TEMP: AtomicU32 = AtomicU32::new(0);
        let context = |e: io::Error| {
            let message = format!("cannot save the configuration to {}: {e}", path.display());
            io::Error::new(e.kind(), message)
        };
        let name = path.file_name().ok_or_else(|| {
            context(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path names no file",
            ))
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let temp = dir.join(format!(
            ".{}.{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_synced(&temp, self.to_ini_string().as_bytes())
            .and_then(|()| fs::rename(&temp, path));
        if let Err(e) = written {
            // The write or rename error is what matters; the cleanup is best effort.
            let _ = fs::remove_file(&temp);
            return Err(context(e));
        }
        // The rename is durable only once the directory is synced.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(context)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask can clear bits of the mode above; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Luna puts `;` comments after values, and comment lines may be indented;
/// rust-ini accepts neither, so remove them first. A `;` starts a comment only
/// at the start of a line or after whitespace, so `/opt/a;b/lib.so` keeps its
/// `;`. Lines are kept (emptied) so rust-ini's line numbers match the file.
fn strip_comments(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim();
        let code = if line.starts_with([';', '#']) {
            ""
        } else {
            line.char_indices()
                .find(|&(i, c)| c == ';' && line[..i].ends_with([' ', '\t']))
                .map_or(line, |(i, _)| line[..i].trim_end())
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Splits the file into the known sections, in [`SECTIONS`] order, rejecting
/// unknown or repeated sections and repeated keys (case-insensitive, as Luna's
/// parser is).
fn read_sections(
    file: &Path,
    text: &str,
) -> Result<[Option<Entries>; SECTIONS.len()], ConfigError> {
    // Quotes and backslashes are literal, as in Luna's files and in paths.
    let options = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: false,
        enabled_preserve_key_leading_whitespace: false,
    };
    let text = strip_comments(text);
    // rust-ini would read on to the next "]" anywhere in the file.
    let unclosed = text
        .lines()
        .enumerate()
        .find(|(_, line)| line.starts_with('[') && !line.ends_with(']'));
    if let Some((number, line)) = unclosed {
        let problem = format!(
            "line {}: the section header \"{line}\" does not end with \"]\"; write it as [Name]",
            number + 1
        );
        return Err(error(file, None, None, problem));
    }
    // rust-ini reads a line without "=" as the start of the next key, or
    // fails at the end of the file without naming the line.
    let mut current: Option<&str> = None;
    for (number, line) in text.lines().enumerate() {
        if let Some(name) = line.strip_prefix('[') {
            let name = name.trim_end_matches(']').trim();
            current = SECTIONS
                .iter()
                .find(|s| s.eq_ignore_ascii_case(name))
                .copied();
        } else if !line.is_empty() && !line.contains('=') {
            let problem = format!(
                "line {}: the line \"{line}\" is not key = value; add the \"=\" or comment it \
                 out with \";\"",
                number + 1
            );
            return Err(error(file, current, None, problem));
        }
    }
    let ini = Ini::load_from_str_opt(&text, options).map_err(|e| {
        let problem = format!(
            "line {}: {}; write sections as [Name] and settings as key = value",
            e.line,
            e.msg.trim_end_matches('.')
        );
        error(file, None, None, problem)
    })?;

    let mut found: [Option<Entries>; SECTIONS.len()] = Default::default();
    for (name, properties) in &ini {
        let Some(name) = name else {
            if let Some((key, _)) = properties.iter().next() {
                let problem = format!(
                    "this setting is outside any section; move it under one of {}",
                    section_list("or")
                );
                return Err(error(file, None, Some(first_line(key)), problem));
            }
            continue;
        };
        let Some(slot) = SECTIONS.iter().position(|s| s.eq_ignore_ascii_case(name)) else {
            let problem = format!("unknown section; the sections are {}", section_list("and"));
            return Err(error(file, Some(name), None, problem));
        };
        let section = SECTIONS[slot];
        if found[slot].is_some() {
            let problem = "the section appears more than once; merge it into one".to_owned();
            return Err(error(file, Some(section), None, problem));
        }
        let mut entries = Entries::new();
        for (key, value) in properties.iter() {
            if key.contains('\n') {
                // rust-ini reads a line without "=" as the start of the next key.
                let problem = format!(
                    "the line \"{}\" is not key = value; add the \"=\" or comment it out \
                     with \";\"",
                    first_line(key)
                );
                return Err(error(file, Some(section), None, problem));
            }
            if entries.iter().any(|(k, _)| k.eq_ignore_ascii_case(key)) {
                let problem =
                    "the key is given twice (key names ignore case); keep only one".to_owned();
                return Err(error(file, Some(section), Some(key), problem));
            }
            entries.push((key.to_owned(), value.to_owned()));
        }
        found[slot] = Some(entries);
    }
    Ok(found)
}

/// "\[A\], \[B\] and \[C\]", with `last` before the last one.
fn section_list(last: &str) -> String {
    let names: Vec<String> = SECTIONS.iter().map(|s| format!("[{s}]")).collect();
    let (tail, head) = names.split_last().expect("SECTIONS is not empty");
    format!("{} {last} {tail}", head.join(", "))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default().trim()
}

fn parse_libraries(file: &Path, entries: Entries) -> Result<Vec<LibraryConfig>, ConfigError> {
    if entries.is_empty() {
        let problem = "no PKCS#11 library is configured; add one line per library, such as \
                       softhsm = /usr/lib/softhsm/libsofthsm2.so"
            .to_owned();
        return Err(error(file, Some(LIBRARIES), None, problem));
    }
    entries
        .into_iter()
        .map(|(name, path)| {
            if path.is_empty() {
                let problem = "no library path given; write the path to the PKCS#11 library \
                               after the \"=\""
                    .to_owned();
                return Err(error(file, Some(LIBRARIES), Some(&name), problem));
            }
            Ok(LibraryConfig {
                name,
                path: PathBuf::from(path),
                environment: Vec::new(),
                concurrency: None,
                instances: None,
            })
        })
        .collect()
}

/// `[LibraryEnvironment]`: `<library name>.<VARIABLE> = value`, into the
/// libraries' `environment`.
fn parse_environment(
    file: &Path,
    entries: Entries,
    libraries: &mut [LibraryConfig],
) -> Result<(), ConfigError> {
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(LIBRARY_ENVIRONMENT), Some(&key), problem);
        // A variable name has no ".", so the last one ends the library name.
        let Some((name, variable)) = key.rsplit_once('.') else {
            return Err(err(
                "the key is not <library name>.<VARIABLE>; write it as, e.g., \
                 hsmA.P11_KIT_SERVER_ADDRESS = unix:path=/run/hsmA.sock"
                    .to_owned(),
            ));
        };
        let library = library_named(libraries, name)
            .map_err(|known| err(format!("{known}; use one of their names before the \".\"")))?;
        if !is_variable_name(variable) {
            return Err(err(format!(
                "\"{variable}\" is not an environment variable name; use letters, digits \
                 and \"_\", not starting with a digit"
            )));
        }
        library.environment.push((variable.to_owned(), value));
    }
    Ok(())
}

/// The library of `[Libraries]` called `name` (in any case); else the
/// start of an error saying which names there are.
fn library_named<'a>(
    libraries: &'a mut [LibraryConfig],
    name: &str,
) -> Result<&'a mut LibraryConfig, String> {
    let known: Vec<String> = libraries.iter().map(|l| l.name.clone()).collect();
    libraries
        .iter_mut()
        .find(|l| l.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            format!(
                "there is no library \"{name}\" in [{LIBRARIES}] (the libraries are {})",
                known.join(", ")
            )
        })
}

/// The largest `[LibraryConcurrency]` value: far above what any library
/// or application needs, low enough to catch a typo.
const MAX_CONCURRENCY: usize = 4096;

/// `[LibraryConcurrency]`: `<library name> = N`, into the libraries'
/// `concurrency`.
fn parse_concurrency(
    file: &Path,
    entries: Entries,
    libraries: &mut [LibraryConfig],
) -> Result<(), ConfigError> {
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(LIBRARY_CONCURRENCY), Some(&key), problem);
        let library = library_named(libraries, &key)
            .map_err(|known| err(format!("{known}; the keys here are library names")))?;
        library.concurrency = Some(
            value
                .parse::<std::num::NonZeroUsize>()
                .ok()
                .filter(|n| n.get() <= MAX_CONCURRENCY)
                .ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not a number of calls from 1 to {MAX_CONCURRENCY}; \
                         give the most calls the library may have in flight at once, or \
                         leave the key out for no limit"
                    ))
                })?,
        );
    }
    Ok(())
}

/// The most `[LibraryInstances]` of one library: each is a connection and,
/// behind `p11-kit server`, a process of its own on the server's host.
pub const MAX_INSTANCES: usize = 64;

/// `[LibraryInstances]`: `<library name> = N`, into the libraries'
/// `instances`. Only p11-kit's client makes an independent instance, with
/// a connection of its own, each time its function list is asked for.
fn parse_instances(
    file: &Path,
    entries: Entries,
    libraries: &mut [LibraryConfig],
) -> Result<(), ConfigError> {
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(LIBRARY_INSTANCES), Some(&key), problem);
        let library = library_named(libraries, &key)
            .map_err(|known| err(format!("{known}; the keys here are library names")))?;
        if !is_p11_kit_client(&library.path) {
            return Err(err(format!(
                "{} is not p11-kit's client (p11-kit-client.so), the only library that gives \
                 an instance with a connection of its own per C_GetFunctionList; leave the key \
                 out (other libraries take concurrent calls on one instance, see \
                 [{LIBRARY_CONCURRENCY}])",
                library.path.display()
            )));
        }
        library.instances = Some(
            value
                .parse::<std::num::NonZeroUsize>()
                .ok()
                .filter(|n| n.get() <= MAX_INSTANCES)
                .ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not a number of instances from 1 to {MAX_INSTANCES}; \
                         give how many connections to keep to the library's server, or leave \
                         the key out for the default"
                    ))
                })?,
        );
    }
    Ok(())
}

/// Whether `path` names p11-kit's remoting client (its file name starts
/// with `p11-kit-client`).
pub fn is_p11_kit_client(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("p11-kit-client"))
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b == b'_' || b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric())
}

/// `[HASynchronize]`: `<group label> = 0|1`, into the groups' `synchronize`.
fn parse_synchronize(
    file: &Path,
    entries: Entries,
    groups: &mut [GroupConfig],
) -> Result<(), ConfigError> {
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(HA_SYNCHRONIZE), Some(&key), problem);
        let Some(group) = groups
            .iter_mut()
            .find(|g| g.label.eq_ignore_ascii_case(&key))
        else {
            let known: Vec<&str> = groups.iter().map(|g| g.label.as_str()).collect();
            let known = if known.is_empty() {
                "none is configured".to_owned()
            } else {
                format!("the labels are {}", known.join(", "))
            };
            return Err(err(format!(
                "no group has this label ({known}); the keys here are group labels from \
                 [{VIRTUAL_TOKEN}]"
            )));
        };
        group.synchronize = parse_bool(&value).ok_or_else(|| {
            err(format!(
                "\"{value}\" is not accepted; use 1 to copy missing objects to a recovered \
                 member or 0 not to (yes/no and true/false also work)"
            ))
        })?;
    }
    Ok(())
}

/// 1/0, yes/no, true/false in any case.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" => Some(true),
        "0" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// The `[HAConfiguration]` settings.
struct HaSettings {
    ha_only: bool,
    multipart_replay_limit: usize,
    attempts: i64,
    interval_secs: u64,
    member_timeout_ms: u64,
    early_hang_detection: bool,
    ha_log: HaLogConfig,
    state_dir: Option<PathBuf>,
    reconcile_interval_secs: u64,
}

fn parse_ha_configuration(file: &Path, entries: Entries) -> Result<HaSettings, ConfigError> {
    let mut settings = HaSettings {
        ha_only: false,
        multipart_replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
        attempts: DEFAULT_RECONNECT_ATTEMPTS,
        interval_secs: DEFAULT_RECONNECT_INTERVAL_SECS,
        member_timeout_ms: DEFAULT_MEMBER_TIMEOUT_MS,
        early_hang_detection: true,
        ha_log: HaLogConfig::default(),
        state_dir: None,
        reconcile_interval_secs: DEFAULT_RECONCILE_INTERVAL_SECS,
    };
    let mut status_key = None;
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(HA_CONFIGURATION), Some(&key), problem);
        let Some(known) = HA_KEYS.into_iter().find(|k| k.eq_ignore_ascii_case(&key)) else {
            let (last, first) = HA_KEYS.split_last().expect("HA_KEYS is not empty");
            return Err(err(format!(
                "unknown key; the keys here are {} and {last}",
                first.join(", ")
            )));
        };
        match known {
            HA_ONLY => {
                settings.ha_only = parse_bool(&value).ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not accepted; use 1 to show only the virtual slots or \
                         0 to show the member slots too (yes/no and true/false also work)"
                    ))
                })?;
            }
            MULTIPART_REPLAY_LIMIT => {
                settings.multipart_replay_limit = parse_replay_limit(&value).map_err(err)?;
            }
            RECONN_ATT => {
                settings.attempts = Some(value.as_str())
                    .filter(|v| *v == "-1" || is_digits(v))
                    .and_then(|v| v.parse::<i64>().ok())
                    .ok_or_else(|| {
                        err(format!(
                            "\"{value}\" is not accepted; give the number of recovery attempts \
                             after a member fails, -1 to try forever (the default) or 0 to \
                             turn auto-recovery off"
                        ))
                    })?;
            }
            AUTO_RECONNECT_INTERVAL => {
                settings.interval_secs = parse_bounded(&value, 1, MAX_RECONNECT_INTERVAL_SECS)
                    .ok_or_else(|| {
                        err(format!(
                            "\"{value}\" is not accepted; give the seconds between recovery \
                             attempts, from 1 to {MAX_RECONNECT_INTERVAL_SECS}, as decimal \
                             digits; the default is {DEFAULT_RECONNECT_INTERVAL_SECS}"
                        ))
                    })?;
            }
            MEMBER_TIMEOUT => {
                settings.member_timeout_ms = parse_bounded(&value, 1, MAX_MEMBER_TIMEOUT_MS)
                    .ok_or_else(|| {
                        err(format!(
                            "\"{value}\" is not accepted; give the milliseconds a member may \
                             take to answer, from 1 to {MAX_MEMBER_TIMEOUT_MS}, as decimal \
                             digits; the default is {DEFAULT_MEMBER_TIMEOUT_MS}"
                        ))
                    })?;
            }
            EARLY_HANG_DETECTION => {
                settings.early_hang_detection = parse_bool(&value).ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not accepted; use 1 to cut a network member's call \
                         silent far longer than usual before {MEMBER_TIMEOUT} (the default) or \
                         0 to wait {MEMBER_TIMEOUT} for it (yes/no and true/false also work)"
                    ))
                })?;
            }
            HA_LOG_STATUS => {
                settings.ha_log.enabled = match value.to_ascii_lowercase().as_str() {
                    "enabled" => true,
                    "disabled" => false,
                    _ => {
                        return Err(err(format!(
                            "\"{value}\" is not accepted; use enabled or disabled"
                        )))
                    }
                };
                status_key = Some(key.clone());
            }
            HA_LOG_PATH => {
                let path = PathBuf::from(&value);
                if !path.is_absolute() {
                    return Err(err(format!(
                        "\"{value}\" is not an absolute path; give the directory for \
                         {HA_LOG_FILE} starting with \"/\""
                    )));
                }
                settings.ha_log.path = Some(path);
            }
            LOG_LEN => {
                settings.ha_log.max_len = parse_bounded(&value, 0, u64::MAX).ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not accepted; give the size in bytes at which the HA \
                         log is rotated, as decimal digits, or 0 never to rotate it; the \
                         default is {DEFAULT_HA_LOG_MAX_LEN}"
                    ))
                })?;
            }
            LOG_REPEATS => {
                let repeats = parse_bounded(&value, 0, u64::from(u32::MAX))
                    .and_then(|n| u32::try_from(n).ok());
                settings.ha_log.repeats = repeats.ok_or_else(|| {
                    err(format!(
                        "\"{value}\" is not accepted; give how many times a minute one \
                             repeating event is written before the rest are counted, as \
                             decimal digits, or 0 to write every one; the default is \
                             {DEFAULT_HA_LOG_REPEATS}"
                    ))
                })?;
            }
            HA_STATE_DIR => {
                let path = PathBuf::from(&value);
                if !path.is_absolute() {
                    return Err(err(format!(
                        "\"{value}\" is not an absolute path; give the directory where \
                         processes on this host share reconciliation state (lock files and \
                         deletion records), starting with \"/\""
                    )));
                }
                settings.state_dir = Some(path);
            }
            RECONCILE_INTERVAL => {
                settings.reconcile_interval_secs =
                    parse_bounded(&value, 0, MAX_RECONCILE_INTERVAL_SECS).ok_or_else(|| {
                        err(format!(
                            "\"{value}\" is not accepted; give the seconds between \
                             reconciliations of each group, from 0 (only at start, login and \
                             a member's return) to {MAX_RECONCILE_INTERVAL_SECS}, as decimal \
                             digits; the default is {DEFAULT_RECONCILE_INTERVAL_SECS}"
                        ))
                    })?;
            }
            _ => unreachable!("every key of HA_KEYS is handled"),
        }
    }
    if settings.ha_log.enabled && settings.ha_log.path.is_none() {
        let key = status_key.unwrap_or_else(|| HA_LOG_STATUS.to_owned());
        let problem = format!(
            "the HA log is enabled but {HA_LOG_PATH} is not set; add {HA_LOG_PATH} = <directory \
             for {HA_LOG_FILE}> or set {HA_LOG_STATUS} = disabled"
        );
        return Err(error(file, Some(HA_CONFIGURATION), Some(&key), problem));
    }
    Ok(settings)
}

fn is_digits(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit())
}

/// Decimal digits only (`str::parse` would also take "+5"), in `min..=max`.
fn parse_bounded(value: &str, min: u64, max: u64) -> Option<u64> {
    Some(value)
        .filter(|v| is_digits(v))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| (min..=max).contains(n))
}

/// A decimal byte count in `0..=MAX_MULTIPART_REPLAY_LIMIT`.
fn parse_replay_limit(value: &str) -> Result<usize, String> {
    let limit = parse_bounded(value, 0, MAX_MULTIPART_REPLAY_LIMIT as u64).map(|n| n as usize);
    limit.ok_or_else(|| {
        format!(
            "\"{value}\" is not accepted; give a whole number of bytes from 0 to \
             {MAX_MULTIPART_REPLAY_LIMIT} (1 GiB) as decimal digits, or 0 to disable replaying \
             multi-part operations on another member; the default is \
             {DEFAULT_MULTIPART_REPLAY_LIMIT}"
        )
    })
}

/// The part of a `VirtualToken<NN><Field>` key after the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Label,
    Sn,
    Members,
    Standby,
    DomainLabel,
    MinReplicas,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::Label,
        Field::Sn,
        Field::Members,
        Field::Standby,
        Field::DomainLabel,
        Field::MinReplicas,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Field::Label => "Label",
            Field::Sn => "SN",
            Field::Members => "Members",
            Field::Standby => "Standby",
            Field::DomainLabel => "DomainLabel",
            Field::MinReplicas => "MinReplicas",
        }
    }
}

fn group_key(index: u32, field: Field) -> String {
    format!("{VIRTUAL_TOKEN}{index:02}{}", field.suffix())
}

/// The key that lists group `index`'s active or standby members, for
/// messages.
pub fn member_list_key(index: u32, standby: bool) -> String {
    group_key(
        index,
        if standby {
            Field::Standby
        } else {
            Field::Members
        },
    )
}

/// The key naming group `index`'s domain key, for messages.
pub fn domain_label_key(index: u32) -> String {
    group_key(index, Field::DomainLabel)
}

/// Splits `VirtualToken<NN><Field>` (any case), NN exactly two digits.
fn parse_group_key(key: &str) -> Option<(u32, Field)> {
    let prefix = key.get(..VIRTUAL_TOKEN.len())?;
    if !prefix.eq_ignore_ascii_case(VIRTUAL_TOKEN) {
        return None;
    }
    let (digits, suffix) = key[VIRTUAL_TOKEN.len()..].split_at_checked(2)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = Field::ALL
        .into_iter()
        .find(|f| f.suffix().eq_ignore_ascii_case(suffix))?;
    Some((digits.parse().ok()?, field))
}

/// The groups, and `VirtualTokenActiveRecovery`.
fn parse_groups(
    file: &Path,
    entries: Entries,
) -> Result<(Vec<GroupConfig>, RecoveryMode), ConfigError> {
    let err = |key: &str, problem: String| error(file, Some(VIRTUAL_TOKEN), Some(key), problem);

    // Index -> (key as written, value) per field.
    let mut raw: BTreeMap<u32, [Option<(String, String)>; Field::ALL.len()]> = BTreeMap::new();
    let mut mode = RecoveryMode::default();
    for (key, value) in entries {
        if key.eq_ignore_ascii_case(ACTIVE_RECOVERY) {
            mode = RecoveryMode::from_name(&value).ok_or_else(|| {
                let problem = format!(
                    "\"{value}\" is not accepted; use activeEnhanced (reopen sessions and log \
                     in at recovery, the default) or activeBasic (reopen sessions when a call \
                     needs them)"
                );
                err(&key, problem)
            })?;
            continue;
        }
        let Some((index, field)) = parse_group_key(&key) else {
            let problem = format!(
                "unknown key; group keys are {VIRTUAL_TOKEN}<NN>Label, ...SN, ...Members, \
                 ...Standby and ...DomainLabel, where <NN> is two digits such as 00, and \
                 {ACTIVE_RECOVERY}"
            );
            return Err(err(&key, problem));
        };
        raw.entry(index).or_default()[field as usize] = Some((key, value));
    }

    let mut groups = Vec::with_capacity(raw.len());
    let mut labels: HashMap<String, u32> = HashMap::new();
    let mut owners: HashMap<String, u32> = HashMap::new();
    for (index, fields) in raw {
        let key = |field: Field| {
            fields[field as usize]
                .as_ref()
                .map_or_else(|| group_key(index, field), |(k, _)| k.clone())
        };
        let value = |field: Field| fields[field as usize].as_ref().map(|(_, v)| v.as_str());

        let Some(label) = value(Field::Label) else {
            let problem = format!(
                "group {index:02} has no label; add {} = <the token label applications will see>",
                key(Field::Label)
            );
            return Err(err(&key(Field::Label), problem));
        };
        check_label(label).map_err(|p| err(&key(Field::Label), p))?;
        if let Some(other) = labels.insert(label.to_lowercase(), index) {
            let problem = format!(
                "the label \"{label}\" is already used by group {other:02} (labels ignore \
                 case); give each group its own label"
            );
            return Err(err(&key(Field::Label), problem));
        }

        let serial = value(Field::Sn)
            .map(|sn| check_serial(sn).map(|()| sn.to_owned()))
            .transpose()
            .map_err(|p| err(&key(Field::Sn), p))?;

        let Some(members) = value(Field::Members) else {
            let problem = format!(
                "group {index:02} has no active members (standby members alone cannot serve); \
                 add {} = <member token serials, primary first>",
                key(Field::Members)
            );
            return Err(err(&key(Field::Members), problem));
        };
        let members = parse_serials(members).map_err(|p| err(&key(Field::Members), p))?;
        let standby = match value(Field::Standby) {
            Some(list) if !list.is_empty() => {
                parse_serials(list).map_err(|p| err(&key(Field::Standby), p))?
            }
            _ => Vec::new(),
        };
        let domain_label = match value(Field::DomainLabel) {
            Some(domain) => {
                check_domain_label(domain).map_err(|p| err(&key(Field::DomainLabel), p))?;
                domain.to_owned()
            }
            None => DEFAULT_DOMAIN_LABEL.to_owned(),
        };

        let count = members.len() + standby.len();
        let min_replicas = match value(Field::MinReplicas) {
            None => 1,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=count).contains(&n) => n,
                _ => {
                    let problem = format!(
                        "{text:?} is not a number of members from 1 to {count} (the group's \
                         members and standbys); it says on how many members an object must be \
                         before the call that makes it succeeds"
                    );
                    return Err(err(&key(Field::MinReplicas), problem));
                }
            },
        };
        if count > MAX_GROUP_MEMBERS {
            let field = if members.len() > MAX_GROUP_MEMBERS {
                Field::Members
            } else {
                Field::Standby
            };
            let problem = format!(
                "group {index:02} has {count} members and standbys, more than the \
                 {MAX_GROUP_MEMBERS} CA_GetHAState can report; split it into groups of at \
                 most {MAX_GROUP_MEMBERS}"
            );
            return Err(err(&key(field), problem));
        }

        let listed = members
            .iter()
            .map(|s| (Field::Members, s))
            .chain(standby.iter().map(|s| (Field::Standby, s)));
        for (field, serial) in listed {
            if let Some(other) = owners.insert(serial.clone(), index) {
                let problem = if other == index {
                    format!("the serial {serial} appears twice in this group; list it once")
                } else {
                    format!(
                        "the serial {serial} is already in group {other:02}; a token can \
                         belong to one group only"
                    )
                };
                return Err(err(&key(field), problem));
            }
        }

        groups.push(GroupConfig {
            index,
            label: label.to_owned(),
            serial,
            members,
            standby,
            domain_label,
            synchronize: true,
            min_replicas,
        });
    }

    // Applications pick a token by serial, so a virtual serial must be unique.
    let mut serials: HashMap<&str, u32> = HashMap::new();
    for group in &groups {
        let Some(serial) = group.serial.as_deref() else {
            continue;
        };
        let clash = serials
            .insert(serial, group.index)
            .map(|other| format!("group {other:02} has the same serial"))
            .or_else(|| {
                owners
                    .get(serial)
                    .map(|owner| format!("a member token of group {owner:02} has this serial"))
            });
        if let Some(clash) = clash {
            let problem = format!(
                "{clash}, so applications could not tell the tokens apart; choose another \
                 serial or remove the key"
            );
            return Err(err(&group_key(group.index, Field::Sn), problem));
        }
    }
    Ok((groups, mode))
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        Err("the label is empty; give the group the token label applications will see".into())
    } else if label.len() > MAX_LABEL_BYTES {
        Err(format!(
            "the label \"{label}\" is {} bytes long; shorten it to at most {MAX_LABEL_BYTES} \
             bytes, the size of a PKCS#11 token label",
            label.len()
        ))
    } else if label.eq_ignore_ascii_case("HA") {
        Err(format!(
            "the label \"{label}\" is reserved (Luna reserves it); choose another group label"
        ))
    } else {
        Ok(())
    }
}

/// The domain label names a key object, so it is held to the token label
/// size, and kept to printable ASCII so it reads the same in every tool.
fn check_domain_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        Err(format!(
            "the domain label is empty; name the wrapping key the group's members share, or \
             remove the key to use \"{DEFAULT_DOMAIN_LABEL}\""
        ))
    } else if label.len() > MAX_LABEL_BYTES {
        Err(format!(
            "the domain label \"{label}\" is {} bytes long; shorten it to at most \
             {MAX_LABEL_BYTES} bytes, the size of a PKCS#11 label",
            label.len()
        ))
    } else if !label.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        Err(format!(
            "the domain label {label:?} has a character that is not printable ASCII; use \
             letters, digits, spaces and punctuation only"
        ))
    } else {
        Ok(())
    }
}

fn check_serial(serial: &str) -> Result<(), String> {
    if (1..=MAX_SERIAL_CHARS).contains(&serial.len())
        && serial.bytes().all(|b| b.is_ascii_graphic())
    {
        Ok(())
    } else {
        Err(format!(
            "\"{serial}\" is not a token serial number; use 1 to {MAX_SERIAL_CHARS} printable \
             ASCII characters without spaces, as the token reports it"
        ))
    }
}

/// Splits a comma-separated serial list, e.g. `123, 456`.
fn parse_serials(list: &str) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err("no serial given; list token serial numbers separated by commas".into());
    }
    list.split(',')
        .map(str::trim)
        .map(|serial| {
            if serial.is_empty() {
                return Err(format!(
                    "\"{list}\" has an empty item; remove the extra comma"
                ));
            }
            check_serial(serial)?;
            Ok(serial.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests;
