//! `import-luna`: reads a Thales Luna client configuration -- `Chrystoki.conf`
//! (Linux/UNIX: `Section = { key = value; ... }`) or `crystoki.ini`
//! (Windows: INI) -- and makes the equivalent pkcs11-ha configuration, with
//! Luna's key names kept. What has no equivalent is reported, not guessed.

use std::fmt::Write as _;
use std::path::Path;

use pkcs11_ha::config::{Config, ConfigError};

/// A Luna file as sections of (key, value), in file order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LunaFile {
    pub format: &'static str,
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

impl LunaFile {
    fn section(&self, name: &str) -> Option<&[(String, String)]> {
        self.sections
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, entries)| entries.as_slice())
    }

    fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.section(section)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads either format: a file whose first setting line is `[Section]` is
/// INI, anything else the brace-and-semicolon format.
pub fn parse(text: &str) -> Result<LunaFile, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with(['#', ';']));
    match first {
        Some(line) if line.starts_with('[') => parse_ini(text),
        _ => parse_braces(text),
    }
}

fn parse_ini(text: &str) -> Result<LunaFile, String> {
    let mut file = LunaFile {
        format: "crystoki.ini",
        sections: Vec::new(),
    };
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with([';', '#']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or_else(|| {
                format!("line {}: \"{line}\" does not end with \"]\"", number + 1)
            })?;
            file.sections.push((name.trim().to_owned(), Vec::new()));
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: \"{line}\" is not key=value", number + 1))?;
        let (_, entries) = file
            .sections
            .last_mut()
            .ok_or_else(|| format!("line {}: a setting before the first [Section]", number + 1))?;
        entries.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(file)
}

/// `Name = { key = value; key = value; }`, sections and settings spread
/// over lines as Luna writes them; `#` starts a comment line.
fn parse_braces(text: &str) -> Result<LunaFile, String> {
    let mut file = LunaFile {
        format: "Chrystoki.conf",
        sections: Vec::new(),
    };
    // Drop comment lines, keep line numbers for messages.
    let chars: Vec<(usize, char)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with('#'))
        .flat_map(|(n, l)| l.chars().chain(['\n']).map(move |c| (n + 1, c)))
        .collect();
    let mut i = 0;
    let skip_blank = |i: &mut usize| {
        while *i < chars.len() && chars[*i].1.is_whitespace() {
            *i += 1;
        }
    };
    // Reads up to (not including) one of `ends`; returns the text and the end.
    let read_until = |i: &mut usize, ends: &[char]| -> (String, Option<char>) {
        let mut out = String::new();
        while *i < chars.len() {
            let c = chars[*i].1;
            *i += 1;
            if ends.contains(&c) {
                return (out, Some(c));
            }
            out.push(c);
        }
        (out, None)
    };
    let line_at = |i: usize| {
        chars
            .get(i.min(chars.len().saturating_sub(1)))
            .map_or(0, |c| c.0)
    };
    loop {
        skip_blank(&mut i);
        if i >= chars.len() {
            break;
        }
        let line = line_at(i);
        let (name, end) = read_until(&mut i, &['=', '\n', '{', '}']);
        let name = name.trim().to_owned();
        if end != Some('=') || name.is_empty() {
            return Err(format!(
                "line {line}: expected \"Section = {{\", found \"{}\"",
                name.trim()
            ));
        }
        skip_blank(&mut i);
        if chars.get(i).map(|c| c.1) != Some('{') {
            return Err(format!(
                "line {}: expected \"{{\" after \"{name} =\"",
                line_at(i)
            ));
        }
        i += 1;
        let mut entries = Vec::new();
        loop {
            skip_blank(&mut i);
            match chars.get(i).map(|c| c.1) {
                None => return Err(format!("the section \"{name}\" is not closed with \"}}\"")),
                Some('}') => {
                    i += 1;
                    break;
                }
                Some(_) => {}
            }
            let line = line_at(i);
            let (key, end) = read_until(&mut i, &['=', '\n', ';', '}']);
            if end != Some('=') {
                return Err(format!(
                    "line {line}: \"{}\" in section \"{name}\" is not \"key = value;\"",
                    key.trim()
                ));
            }
            // A value ends at ";" (Luna always writes one) or, leniently, at
            // the end of its line.
            let (value, end) = read_until(&mut i, &[';', '\n']);
            if end.is_none() {
                return Err(format!("the section \"{name}\" is not closed with \"}}\""));
            }
            entries.push((key.trim().to_owned(), value.trim().to_owned()));
        }
        file.sections.push((name, entries));
    }
    Ok(file)
}

/// The outcome of an import.
pub struct Imported {
    pub config: Config,
    /// `Section.key` settings with no pkcs11-ha equivalent.
    pub ignored: Vec<String>,
    /// Where settings came from that were renamed or chosen.
    pub notes: Vec<String>,
}

/// HA keys kept under the same section and name.
const HA_CONFIGURATION_KEYS: [&str; 6] = [
    "HAOnly",
    "reconnAtt",
    "AutoReconnectInterval",
    "haLogStatus",
    "haLogPath",
    "logLen",
];

/// Library keys of `Chrystoki2`, best first: 64-bit UNIX, 32-bit UNIX, Windows.
const LIBRARY_KEYS: [&str; 3] = ["LibUNIX64", "LibUNIX", "LibNT"];

/// Group key suffixes kept as they are, and the standby spellings accepted
/// (Luna's own spelling for standby members could not be confirmed from
/// its public documentation).
const GROUP_SUFFIXES: [&str; 3] = ["Label", "SN", "Members"];
const STANDBY_SUFFIXES: [&str; 2] = ["Standby", "StandbyMembers"];

/// Builds the pkcs11-ha configuration for `output` from a Luna file.
/// `library_name` names the `[Libraries]` entry; `library_path` replaces
/// the library path found in `Chrystoki2`.
pub fn import(
    luna: &LunaFile,
    output: &Path,
    library_name: &str,
    library_path: Option<&Path>,
) -> Result<Imported, String> {
    let mut ignored = Vec::new();
    let mut notes = Vec::new();
    let mut text = String::new();

    // [Libraries]
    let found = LIBRARY_KEYS
        .iter()
        .find_map(|key| luna.value("Chrystoki2", key).map(|v| (*key, v)));
    let path = match (library_path, found) {
        (Some(path), _) => {
            notes.push(format!(
                "library path {} given on the command line",
                path.display()
            ));
            path.display().to_string()
        }
        (None, Some((key, value))) => {
            notes.push(format!("library {library_name} from Chrystoki2.{key}"));
            value.to_owned()
        }
        (None, None) => {
            return Err(
                "the file names no Luna library (Chrystoki2 = { LibUNIX64 = ...; }); give the \
                 path with --library-path"
                    .to_owned(),
            )
        }
    };
    writeln!(text, "[Libraries]\n{library_name} = {path}").unwrap();
    if let Some(entries) = luna.section("Chrystoki2") {
        for (key, _) in entries {
            let used = found.is_some_and(|(k, _)| k.eq_ignore_ascii_case(key));
            if !used || library_path.is_some() {
                ignored.push(format!("Chrystoki2.{key}"));
            }
        }
    }

    // [VirtualToken]
    writeln!(text, "\n[VirtualToken]").unwrap();
    for (key, value) in luna.section("VirtualToken").unwrap_or_default() {
        if key.eq_ignore_ascii_case("VirtualTokenActiveRecovery") {
            writeln!(text, "VirtualTokenActiveRecovery = {value}").unwrap();
            continue;
        }
        match group_key(key) {
            Some((index, suffix))
                if GROUP_SUFFIXES
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(suffix)) =>
            {
                writeln!(text, "VirtualToken{index}{suffix} = {value}").unwrap();
            }
            Some((index, suffix))
                if STANDBY_SUFFIXES
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(suffix)) =>
            {
                writeln!(text, "VirtualToken{index}Standby = {value}").unwrap();
                notes.push(format!(
                    "standby members of group {index} from VirtualToken.{key}"
                ));
            }
            _ => ignored.push(format!("VirtualToken.{key}")),
        }
    }

    // [HASynchronize]: group labels, as they are.
    if let Some(entries) = luna.section("HASynchronize") {
        writeln!(text, "\n[HASynchronize]").unwrap();
        for (key, value) in entries {
            writeln!(text, "{key} = {value}").unwrap();
        }
    }

    // [HAConfiguration]
    writeln!(text, "\n[HAConfiguration]").unwrap();
    for (key, value) in luna.section("HAConfiguration").unwrap_or_default() {
        match HA_CONFIGURATION_KEYS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(key))
        {
            Some(known) => writeln!(text, "{known} = {value}").unwrap(),
            None => ignored.push(format!("HAConfiguration.{key}")),
        }
    }
    if let Some(timeout) = luna.value("LunaSA Client", "ReceiveTimeout") {
        writeln!(text, "memberTimeout = {timeout}").unwrap();
        notes.push("memberTimeout from LunaSA Client.ReceiveTimeout".to_owned());
    }

    // Everything else.
    for (section, entries) in &luna.sections {
        let handled = [
            "Chrystoki2",
            "VirtualToken",
            "HASynchronize",
            "HAConfiguration",
        ];
        if handled.iter().any(|h| h.eq_ignore_ascii_case(section)) {
            continue;
        }
        for (key, _) in entries {
            let receive = section.eq_ignore_ascii_case("LunaSA Client")
                && key.eq_ignore_ascii_case("ReceiveTimeout");
            if !receive {
                ignored.push(format!("{section}.{key}"));
            }
        }
    }

    let config = Config::parse(output, &text).map_err(|e: ConfigError| {
        let mut at = String::new();
        if let Some(section) = &e.section {
            write!(at, "[{section}] ").unwrap();
        }
        if let Some(key) = &e.key {
            write!(at, "{key}: ").unwrap();
        }
        format!(
            "the Luna settings do not make a valid pkcs11-ha configuration: {at}{}",
            e.problem
        )
    })?;
    Ok(Imported {
        config,
        ignored,
        notes,
    })
}

/// `VirtualToken<NN><suffix>` -> (NN, suffix).
fn group_key(key: &str) -> Option<(&str, &str)> {
    let prefix = key.get(..12)?;
    if !prefix.eq_ignore_ascii_case("VirtualToken") {
        return None;
    }
    let rest = &key[12..];
    let digits = rest.get(..2)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| (digits, &rest[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs11_ha::config::RecoveryMode;

    const CONF: &str = "\
Chrystoki2 = {
   LibUNIX = /usr/safenet/lunaclient/lib/libCryptoki2.so;
   LibUNIX64 = /usr/safenet/lunaclient/lib/libCryptoki2_64.so;
}
# a comment
LunaSA Client = {
   ReceiveTimeout = 20000;
   ServerName00 = 192.0.2.10;
}
VirtualToken = {
   VirtualToken00Label = myHAgroup;
   VirtualToken00SN = 1154438865287;
   VirtualToken00Members = 154438865287,1238700701509;
   VirtualTokenActiveRecovery = activeBasic;
}
HASynchronize = { myHAgroup = 0; }
HAConfiguration = {
   HAOnly = 1;
   reconnAtt = 10;
   AutoReconnectInterval = 120;
   haLogStatus = enabled;
   haLogPath = /var/log/luna;
   logLen = 1000000;
   someFutureKey = 3;
}
";

    #[test]
    fn braces() {
        let file = parse(CONF).unwrap();
        assert_eq!(file.format, "Chrystoki.conf");
        assert_eq!(
            file.value("virtualtoken", "VIRTUALTOKEN00LABEL"),
            Some("myHAgroup")
        );
        assert_eq!(file.value("HASynchronize", "myHAgroup"), Some("0"));
        assert_eq!(
            file.value("LunaSA Client", "ServerName00"),
            Some("192.0.2.10")
        );
        let imported = import(&file, Path::new("/x.conf"), "luna", None).unwrap();
        let config = imported.config;
        assert_eq!(
            config.libraries[0].path,
            Path::new("/usr/safenet/lunaclient/lib/libCryptoki2_64.so")
        );
        let group = &config.groups[0];
        assert_eq!(group.label, "myHAgroup");
        assert_eq!(group.serial.as_deref(), Some("1154438865287"));
        assert_eq!(group.members, ["154438865287", "1238700701509"]);
        assert!(!group.synchronize);
        assert!(config.ha_only);
        assert_eq!(config.recovery.attempts, 10);
        assert_eq!(config.recovery.interval_secs, 120);
        assert_eq!(config.recovery.mode, RecoveryMode::ActiveBasic);
        assert!(config.ha_log.enabled);
        assert_eq!(config.ha_log.max_len, 1_000_000);
        assert_eq!(config.member_timeout_ms, 20_000);
        assert_eq!(
            imported.ignored,
            [
                "Chrystoki2.LibUNIX",
                "HAConfiguration.someFutureKey",
                "LunaSA Client.ServerName00"
            ]
        );
    }

    #[test]
    fn ini() {
        let text = "\
[Chrystoki2]\r
LibNT=C:\\Program Files\\SafeNet\\LunaClient\\cryptoki.dll\r
[VirtualToken]\r
VirtualToken00Label=par1\r
VirtualToken00Members=888800001,888800002\r
VirtualToken00StandbyMembers=888800003\r
[HAConfiguration]\r
HAOnly=1\r
reconnAtt=-1\r
";
        let file = parse(text).unwrap();
        assert_eq!(file.format, "crystoki.ini");
        let imported = import(
            &file,
            Path::new("/x.conf"),
            "luna",
            Some(Path::new("/l.so")),
        )
        .unwrap();
        assert_eq!(imported.config.libraries[0].path, Path::new("/l.so"));
        assert_eq!(imported.config.groups[0].standby, ["888800003"]);
        assert_eq!(imported.ignored, ["Chrystoki2.LibNT"]);
        let without = import(&file, Path::new("/x.conf"), "luna", None).unwrap();
        assert!(without.config.libraries[0]
            .path
            .to_string_lossy()
            .ends_with("cryptoki.dll"));
    }

    #[test]
    fn errors() {
        for (text, part) in [
            ("Chrystoki2 = {\n LibUNIX64 = /a.so;\n", "not closed"),
            ("Chrystoki2 {\n}\n", "expected \"Section = {\""),
            ("Chrystoki2 = \n LibUNIX64 = /a.so;\n}\n", "expected \"{\""),
            ("A = {\n junk;\n}\n", "line 2: \"junk\" in section \"A\""),
            ("[A\nx=1\n", "line 1"),
            ("[A]\njunk\n", "line 2"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(part), "{e} -- from:\n{text}");
        }
        let no_library = parse("VirtualToken = {\n}\n").unwrap();
        let e = import(&no_library, Path::new("/x"), "luna", None)
            .err()
            .unwrap();
        assert!(e.contains("--library-path"), "{e}");
        let bad = parse("Chrystoki2 = { LibUNIX64 = /a.so; }\nHAConfiguration = { HAOnly = 1; }\n")
            .unwrap();
        let e = import(&bad, Path::new("/x"), "luna", None).err().unwrap();
        assert!(e.contains("[HAConfiguration] HAOnly: "), "{e}");
    }
}
