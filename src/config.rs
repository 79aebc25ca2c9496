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
//! [VirtualToken]
//! VirtualToken00Label       = myHAgroup
//! VirtualToken00SN          = 1154438865287      ; optional
//! VirtualToken00Members     = 154438865287,1238700701509   ; member serials, primary first
//! VirtualToken00Standby     = 1238700701510      ; optional, standby member serials
//! VirtualToken00DomainLabel = myHAdomain         ; optional, default pkcs11-ha-domain
//!
//! [HAConfiguration]
//! HAOnly = 0                     ; 1 = show only virtual slots
//! MultipartReplayLimit = 1048576 ; optional, 0 to 1073741824; 0 disables replay
//! ```
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
const VIRTUAL_TOKEN: &str = "VirtualToken";
const HA_CONFIGURATION: &str = "HAConfiguration";
const SECTIONS: [&str; 3] = [LIBRARIES, VIRTUAL_TOKEN, HA_CONFIGURATION];
const HA_ONLY: &str = "HAOnly";
const MULTIPART_REPLAY_LIMIT: &str = "MultipartReplayLimit";

/// `VirtualTokenNNDomainLabel` when the key is not given.
pub const DEFAULT_DOMAIN_LABEL: &str = "pkcs11-ha-domain";
/// `MultipartReplayLimit` when the key is not given: 1 MiB.
pub const DEFAULT_MULTIPART_REPLAY_LIMIT: usize = 1 << 20;
/// Largest accepted `MultipartReplayLimit`: 1 GiB.
const MAX_MULTIPART_REPLAY_LIMIT: usize = 1 << 30;

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
}

/// One `[Libraries]` line: a PKCS#11 library to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryConfig {
    pub name: String,
    pub path: PathBuf,
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
        let [libraries, groups, ha] = read_sections(path, text)?;
        let libraries = parse_libraries(path, libraries.unwrap_or_default())?;
        let groups = parse_groups(path, groups.unwrap_or_default())?;
        let HaSettings {
            ha_only,
            multipart_replay_limit,
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
        })
    }

    /// Serialises back to INI text that [`Config::parse`] reads to an equal
    /// `Config`. Group keys are written with a two-digit index, so indices
    /// above 99 (which `parse` never produces) do not survive. Optional keys at
    /// their default are left out, so older readers still accept the file.
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
fn read_sections(file: &Path, text: &str) -> Result<[Option<Entries>; 3], ConfigError> {
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
    let ini = Ini::load_from_str_opt(&text, options).map_err(|e| {
        let problem = format!(
            "line {}: {}; write sections as [Name] and settings as key = value",
            e.line,
            e.msg.trim_end_matches('.')
        );
        error(file, None, None, problem)
    })?;

    let mut found: [Option<Entries>; 3] = Default::default();
    for (name, properties) in &ini {
        let Some(name) = name else {
            if let Some((key, _)) = properties.iter().next() {
                let problem = format!(
                    "this setting is outside any section; move it under [{LIBRARIES}], \
                     [{VIRTUAL_TOKEN}] or [{HA_CONFIGURATION}]"
                );
                return Err(error(file, None, Some(first_line(key)), problem));
            }
            continue;
        };
        let Some(slot) = SECTIONS.iter().position(|s| s.eq_ignore_ascii_case(name)) else {
            let problem = format!(
                "unknown section; the sections are [{LIBRARIES}], [{VIRTUAL_TOKEN}] and \
                 [{HA_CONFIGURATION}]"
            );
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
            })
        })
        .collect()
}

/// The `[HAConfiguration]` settings.
struct HaSettings {
    ha_only: bool,
    multipart_replay_limit: usize,
}

fn parse_ha_configuration(file: &Path, entries: Entries) -> Result<HaSettings, ConfigError> {
    let mut settings = HaSettings {
        ha_only: false,
        multipart_replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
    };
    for (key, value) in entries {
        let err = |problem: String| error(file, Some(HA_CONFIGURATION), Some(&key), problem);
        if key.eq_ignore_ascii_case(MULTIPART_REPLAY_LIMIT) {
            settings.multipart_replay_limit = parse_replay_limit(&value).map_err(err)?;
            continue;
        }
        if !key.eq_ignore_ascii_case(HA_ONLY) {
            return Err(err(format!(
                "unknown key; the keys here are {HA_ONLY} and {MULTIPART_REPLAY_LIMIT}"
            )));
        }
        settings.ha_only = match value.to_ascii_lowercase().as_str() {
            "1" | "yes" | "true" => true,
            "0" | "no" | "false" => false,
            _ => {
                return Err(err(format!(
                    "\"{value}\" is not accepted; use 1 to show only the virtual slots or 0 \
                     to show the member slots too (yes/no and true/false also work)"
                )))
            }
        };
    }
    Ok(settings)
}

/// A decimal byte count in `0..=MAX_MULTIPART_REPLAY_LIMIT`.
fn parse_replay_limit(value: &str) -> Result<usize, String> {
    // Digits only: `str::parse` would also take "+5".
    let limit = Some(value)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&limit| limit <= MAX_MULTIPART_REPLAY_LIMIT);
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
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Label,
        Field::Sn,
        Field::Members,
        Field::Standby,
        Field::DomainLabel,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Field::Label => "Label",
            Field::Sn => "SN",
            Field::Members => "Members",
            Field::Standby => "Standby",
            Field::DomainLabel => "DomainLabel",
        }
    }
}

fn group_key(index: u32, field: Field) -> String {
    format!("{VIRTUAL_TOKEN}{index:02}{}", field.suffix())
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

fn parse_groups(file: &Path, entries: Entries) -> Result<Vec<GroupConfig>, ConfigError> {
    let err = |key: &str, problem: String| error(file, Some(VIRTUAL_TOKEN), Some(key), problem);

    // Index -> (key as written, value) per field.
    let mut raw: BTreeMap<u32, [Option<(String, String)>; Field::ALL.len()]> = BTreeMap::new();
    for (key, value) in entries {
        let Some((index, field)) = parse_group_key(&key) else {
            let problem = format!(
                "unknown key; group keys are {VIRTUAL_TOKEN}<NN>Label, ...SN, ...Members, \
                 ...Standby and ...DomainLabel, where <NN> is two digits such as 00"
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
    Ok(groups)
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
mod tests {
    use super::*;

    const FILE: &str = "/test/pkcs11-ha.conf";

    const EXAMPLE: &str = "\
[Libraries]
softhsm = /usr/lib/softhsm/libsofthsm2.so      ; NAME = path; one or more

[VirtualToken]
VirtualToken00Label   = myHAgroup
VirtualToken00SN      = 1154438865287          ; optional
VirtualToken00Members = 154438865287,1238700701509   ; member token serials, primary first
VirtualToken00Standby = 1238700701510          ; optional, standby member serials
VirtualToken00DomainLabel = myHAdomain         ; optional wrapping key label

[HAConfiguration]
HAOnly = 0                                     ; 1 = show only virtual slots
MultipartReplayLimit = 4096                    ; optional, bytes; 0 = no replay
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new(FILE), text)
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(config) => panic!("expected an error, parsed {config:?}\n--- from ---\n{text}"),
            Err(e) => e,
        }
    }

    /// Libraries section plus `rest`.
    fn with_library(rest: &str) -> String {
        format!("[Libraries]\nsofthsm = /usr/lib/libsofthsm2.so\n{rest}")
    }

    fn group(members: &str) -> GroupConfig {
        GroupConfig {
            index: 0,
            label: "g".into(),
            serial: None,
            members: members.split(',').map(str::to_owned).collect(),
            standby: Vec::new(),
            domain_label: DEFAULT_DOMAIN_LABEL.into(),
        }
    }

    /// One group `g` with member `1`, plus `[HAConfiguration]` with `ha`.
    fn with_ha(ha: &str) -> String {
        with_library(&format!(
            "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
             [HAConfiguration]\n{ha}"
        ))
    }

    #[test]
    fn example_parses() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(
            config,
            Config {
                path: PathBuf::from(FILE),
                libraries: vec![LibraryConfig {
                    name: "softhsm".into(),
                    path: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                }],
                groups: vec![GroupConfig {
                    index: 0,
                    label: "myHAgroup".into(),
                    serial: Some("1154438865287".into()),
                    members: vec!["154438865287".into(), "1238700701509".into()],
                    standby: vec!["1238700701510".into()],
                    domain_label: "myHAdomain".into(),
                }],
                ha_only: false,
                multipart_replay_limit: 4096,
            }
        );
    }

    /// The example in the module documentation stays valid.
    #[test]
    fn doc_example_parses() {
        let doc: String = include_str!("config.rs")
            .lines()
            .map_while(|line| line.strip_prefix("//!"))
            .map(|line| format!("{}\n", line.strip_prefix(' ').unwrap_or(line)))
            .collect();
        let (_, example) = doc.split_once("```ini\n").expect("an ini example");
        let (example, _) = example.split_once("```").expect("the example's end");
        let config = parse(example).unwrap();
        assert_eq!(config.groups[0].domain_label, "myHAdomain");
        assert_eq!(
            config.multipart_replay_limit,
            DEFAULT_MULTIPART_REPLAY_LIMIT
        );
        let mut expected = parse(EXAMPLE).unwrap();
        expected.multipart_replay_limit = DEFAULT_MULTIPART_REPLAY_LIMIT;
        assert_eq!(config, expected);
    }

    #[test]
    fn domain_label() {
        let config = parse(&with_ha("")).unwrap();
        assert_eq!(config.groups[0].domain_label, DEFAULT_DOMAIN_LABEL);
        assert_eq!(DEFAULT_DOMAIN_LABEL, "pkcs11-ha-domain");
        let longest = "d".repeat(MAX_LABEL_BYTES);
        for domain in ["x", "Shared domain #1", "a=b", longest.as_str()] {
            let text = with_library(&format!(
                "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
                 virtualtoken00DOMAINLABEL = {domain}\n\
                 VirtualToken01Label = h\nVirtualToken01Members = 2\n\
                 VirtualToken01DomainLabel = {domain}\n"
            ));
            let config = parse(&text).unwrap();
            // Groups may share a domain; its members are still disjoint.
            for group in &config.groups {
                assert_eq!(group.domain_label, domain, "{text}");
            }
        }
    }

    #[test]
    fn multipart_replay_limit() {
        assert_eq!(DEFAULT_MULTIPART_REPLAY_LIMIT, 1_048_576);
        let config = parse(&with_library("")).unwrap();
        assert_eq!(
            config.multipart_replay_limit,
            DEFAULT_MULTIPART_REPLAY_LIMIT
        );
        for (value, expected) in [
            ("0", 0),
            ("1", 1),
            ("0064", 64),
            ("1048576", 1 << 20),
            ("1073741824", 1 << 30),
        ] {
            let text = with_ha(&format!("multipartREPLAYlimit = {value}\n"));
            let config = parse(&text).unwrap();
            assert_eq!(config.multipart_replay_limit, expected, "{text}");
        }
        // Valid without a group or HAOnly.
        let text = with_library("[HAConfiguration]\nMultipartReplayLimit = 0\n");
        assert_eq!(parse(&text).unwrap().multipart_replay_limit, 0);

        for value in [
            "",
            "-1",
            "+5",
            "1073741825",
            "99999999999999999999999",
            "1e6",
            "1_000",
            "0x10",
            "1 MiB",
            "1.5",
        ] {
            let text = with_ha(&format!("MultipartReplayLimit = {value}\n"));
            let e = parse_err(&text);
            let context = format!("{e}\n--- from ---\n{text}");
            assert_eq!(e.section.as_deref(), Some("HAConfiguration"), "{context}");
            assert_eq!(e.key.as_deref(), Some("MultipartReplayLimit"), "{context}");
            assert!(e.problem.contains("from 0 to 1073741824"), "{context}");
            assert!(e.problem.contains(&format!("\"{value}\"")), "{context}");
        }
    }

    #[test]
    fn comments_case_and_order() {
        let text = "\
# whole-line comment
   ; indented comment
[libraries]
b = /opt/b;v2/lib.so
a\t= /opt/a.so\t; tab comment
[VIRTUALTOKEN]
virtualtoken07label = seven
VirtualToken02LABEL = two
VirtualToken02Members = 1, 2
VIRTUALTOKEN07MEMBERS = 3
[haconfiguration]
haonly = Yes
";
        let config = parse(text).unwrap();
        let names: Vec<_> = config.libraries.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(config.libraries[0].path, Path::new("/opt/b;v2/lib.so"));
        assert_eq!(config.libraries[1].path, Path::new("/opt/a.so"));
        let indices: Vec<_> = config.groups.iter().map(|g| g.index).collect();
        assert_eq!(indices, [2, 7]);
        assert_eq!(config.groups[0].members, ["1", "2"]);
        assert!(config.ha_only);
    }

    #[test]
    fn optional_sections_default() {
        let config = parse(&with_library("")).unwrap();
        assert!(config.groups.is_empty());
        assert!(!config.ha_only);
        for (value, expected) in [("1", true), ("TRUE", true), ("no", false), ("False", false)] {
            let text = with_library(&format!(
                "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1\n\
                 [HAConfiguration]\nHAOnly = {value}\n"
            ));
            assert_eq!(parse(&text).unwrap().ha_only, expected, "HAOnly = {value}");
        }
    }

    #[test]
    fn round_trip() {
        let mut second = group("a-1,b_2");
        second.index = 3;
        second.label = "Second group".into();
        second.serial = Some("99".into());
        second.standby = vec!["c".into(), "d".into()];
        second.domain_label = "Second domain".into();
        let mut defaults = parse(EXAMPLE).unwrap();
        defaults.groups[0].domain_label = DEFAULT_DOMAIN_LABEL.into();
        defaults.multipart_replay_limit = DEFAULT_MULTIPART_REPLAY_LIMIT;
        let text = defaults.to_ini_string();
        assert!(!text.contains("DomainLabel"), "{text}");
        assert!(!text.contains("MultipartReplayLimit"), "{text}");
        let configs = [
            parse(EXAMPLE).unwrap(),
            defaults,
            Config {
                path: PathBuf::from(FILE),
                libraries: vec![
                    LibraryConfig {
                        name: "one".into(),
                        path: PathBuf::from("/opt/x;y/lib one.so"),
                    },
                    LibraryConfig {
                        name: "two".into(),
                        path: PathBuf::from("C:\\hsm\\lib.dll"),
                    },
                ],
                groups: vec![group("1"), second],
                ha_only: true,
                multipart_replay_limit: 0,
            },
        ];
        for config in configs {
            let text = config.to_ini_string();
            assert_eq!(parse(&text).unwrap(), config, "from:\n{text}");
        }
    }

    #[test]
    fn errors_name_file_section_and_key() {
        let members = |rest: &str| {
            with_library(&format!(
                "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1,2\n{rest}"
            ))
        };
        let long_label = format!("[VirtualToken]\nVirtualToken00Label = {}\n", "x".repeat(33));
        // (text, section, key, part of the problem)
        let cases: Vec<(String, &str, &str, &str)> = vec![
            ("[Libraries]\n[Foo]\n".into(), "Foo", "", "unknown section"),
            (
                "[VirtualToken]\n".into(),
                "Libraries",
                "",
                "no PKCS#11 library",
            ),
            (
                "[Libraries]\n".into(),
                "Libraries",
                "",
                "no PKCS#11 library",
            ),
            (
                with_library("[Libraries]\n"),
                "Libraries",
                "",
                "more than once",
            ),
            (
                with_library("Softhsm = /x.so\n"),
                "Libraries",
                "Softhsm",
                "twice",
            ),
            (
                with_library("empty =\n"),
                "Libraries",
                "empty",
                "no library path",
            ),
            (
                with_library("junk\nb = /b.so\n"),
                "Libraries",
                "",
                "\"junk\" is not key = value",
            ),
            (
                with_library("[HAConfiguration]\nFoo = 1\n"),
                "HAConfiguration",
                "Foo",
                "the keys here are HAOnly and MultipartReplayLimit",
            ),
            (
                with_library("[HAConfiguration]\nHAOnly = 2\n"),
                "HAConfiguration",
                "HAOnly",
                "use 1",
            ),
            (
                with_library("[HAConfiguration]\nHAOnly = 1\n"),
                "HAConfiguration",
                "HAOnly",
                "no group",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Lable = g\n"),
                "VirtualToken",
                "VirtualToken00Lable",
                "unknown key",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken0Label = g\n"),
                "VirtualToken",
                "VirtualToken0Label",
                "two digits",
            ),
            (
                members("virtualtoken00LABEL = h\n"),
                "VirtualToken",
                "virtualtoken00LABEL",
                "twice",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Members = 1\n"),
                "VirtualToken",
                "VirtualToken00Label",
                "no label",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Label = g\n"),
                "VirtualToken",
                "VirtualToken00Members",
                "no active members",
            ),
            (
                with_library(
                    "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Standby = 1\n",
                ),
                "VirtualToken",
                "VirtualToken00Members",
                "no active members",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members =\n"),
                "VirtualToken",
                "VirtualToken00Members",
                "no serial",
            ),
            (
                with_library(
                    "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1,,2\n",
                ),
                "VirtualToken",
                "VirtualToken00Members",
                "empty item",
            ),
            (
                with_library(
                    "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = 1 2\n",
                ),
                "VirtualToken",
                "VirtualToken00Members",
                "not a token serial",
            ),
            (
                with_library(&format!(
                    "[VirtualToken]\nVirtualToken00Label = g\nVirtualToken00Members = {}\n",
                    "1".repeat(17)
                )),
                "VirtualToken",
                "VirtualToken00Members",
                "not a token serial",
            ),
            (
                members("VirtualToken00Standby = 2\n"),
                "VirtualToken",
                "VirtualToken00Standby",
                "twice",
            ),
            (
                members("VirtualToken01Label = h\nVirtualToken01Members = 3,1\n"),
                "VirtualToken",
                "VirtualToken01Members",
                "already in group 00",
            ),
            (
                members("VirtualToken01Label = G\nVirtualToken01Members = 3\n"),
                "VirtualToken",
                "VirtualToken01Label",
                "already used by group 00",
            ),
            (
                with_library(&long_label),
                "VirtualToken",
                "VirtualToken00Label",
                "at most 32 bytes",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Label = ha\n"),
                "VirtualToken",
                "VirtualToken00Label",
                "reserved",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00Label =\n"),
                "VirtualToken",
                "VirtualToken00Label",
                "label is empty",
            ),
            (
                with_library("[HAConfiguration]\nMultipartReplayLimit = 1073741825\n"),
                "HAConfiguration",
                "MultipartReplayLimit",
                "from 0 to 1073741824",
            ),
            (
                with_library(
                    "[HAConfiguration]\nMultipartReplayLimit = 1\nmultipartreplaylimit = 2\n",
                ),
                "HAConfiguration",
                "multipartreplaylimit",
                "twice",
            ),
            (
                members("VirtualToken00DomainLabel =\n"),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "domain label is empty",
            ),
            (
                members(&format!("VirtualToken00DomainLabel = {}\n", "d".repeat(33))),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "at most 32 bytes",
            ),
            (
                members(&format!("VirtualToken00DomainLabel = {}\n", "é".repeat(17))),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "at most 32 bytes",
            ),
            (
                members("VirtualToken00DomainLabel = caf\u{e9}\n"),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "not printable ASCII",
            ),
            (
                members("VirtualToken00DomainLabel = a\u{7}b\n"),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "not printable ASCII",
            ),
            (
                members("VirtualToken00DomainLabel = a\tb\n"),
                "VirtualToken",
                "VirtualToken00DomainLabel",
                "not printable ASCII",
            ),
            (
                members("VirtualToken00DomainLabel = d\nvirtualtoken00domainlabel = e\n"),
                "VirtualToken",
                "virtualtoken00domainlabel",
                "twice",
            ),
            (
                members("VirtualToken00Domain = d\n"),
                "VirtualToken",
                "VirtualToken00Domain",
                "...DomainLabel",
            ),
            (
                with_library("[VirtualToken]\nVirtualToken00DomainLabel = d\n"),
                "VirtualToken",
                "VirtualToken00Label",
                "no label",
            ),
            (
                members("VirtualToken00SN = 1 2\n"),
                "VirtualToken",
                "VirtualToken00SN",
                "not a token serial",
            ),
            (
                members("VirtualToken00SN = 2\n"),
                "VirtualToken",
                "VirtualToken00SN",
                "member token",
            ),
            (
                members(
                    "VirtualToken00SN = 9\nVirtualToken01Label = h\n\
                     VirtualToken01Members = 3\nVirtualToken01SN = 9\n",
                ),
                "VirtualToken",
                "VirtualToken01SN",
                "same serial",
            ),
        ];
        for (text, section, key, problem) in cases {
            let e = parse_err(&text);
            let shown = e.to_string();
            let context = format!("{shown}\n--- from ---\n{text}");
            assert!(shown.starts_with(FILE), "{context}");
            assert_eq!(e.section.as_deref(), Some(section), "{context}");
            assert!(shown.contains(&format!("[{section}]")), "{context}");
            if key.is_empty() {
                assert_eq!(e.key, None, "{context}");
            } else {
                assert_eq!(e.key.as_deref(), Some(key), "{context}");
                assert!(shown.contains(&format!("] {key}: ")), "{context}");
            }
            assert!(e.problem.contains(problem), "{context}");
        }
    }

    #[test]
    fn syntax_error_gives_line() {
        let e = parse_err("[Libraries]\na = /a.so\n= /b.so\n");
        assert_eq!((e.section, e.key), (None, None));
        assert!(e.problem.starts_with("line 3: "), "{}", e.problem);

        let e = parse_err("[Libraries]\na = /a.so\n[VirtualToken\n");
        assert!(e.problem.starts_with("line 3: "), "{}", e.problem);

        let e = parse_err("x = 1\n[Libraries]\na = /a.so\n");
        assert_eq!(e.key.as_deref(), Some("x"));
        assert!(e.problem.contains("outside any section"), "{}", e.problem);
    }

    #[test]
    fn unreadable_file_names_os_error() {
        let path =
            std::env::temp_dir().join(format!("pkcs11-ha-missing-{}.conf", std::process::id()));
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.file, path);
        assert_eq!((e.section.as_deref(), e.key.as_deref()), (None, None));
        let os = io::Error::from(io::ErrorKind::NotFound).to_string();
        assert!(
            e.problem.contains("No such file") || e.problem.contains(&os),
            "{e}"
        );
    }

    #[test]
    fn save_is_private_and_atomic() {
        let dir =
            std::env::temp_dir().join(format!("pkcs11-ha-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pkcs11-ha.conf");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

        let mut config = parse(EXAMPLE).unwrap();
        config.path = path.clone();
        config.save(&path).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Config::load(&path).unwrap(), config);
        let files: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(files, [path.file_name().unwrap()]);

        let missing_dir = dir.join("absent").join("pkcs11-ha.conf");
        let e = config.save(&missing_dir).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
