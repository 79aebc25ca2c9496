//! Reading the HA log the applications write (`src/halog.rs`):
//! `haErrorLog.txt` under `haLogPath` and its rotated files
//! `haErrorLog.txt.<stamp>`, oldest first, filtered by time and member,
//! and followed as it grows. Also the per-member figures `status` takes
//! from it: failures and the time of the last state change.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use pkcs11_ha::config::HA_LOG_FILE;
use pkcs11_ha::halog::utc_timestamp;
use serde_json::json;

use crate::cli::LogArgs;
use crate::{Ctx, Res};

/// How often `--follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// One event line: `<time> group=<label> serial=<serial> member=<serial> <event>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time: String,
    pub group: String,
    pub serial: String,
    /// `None` for group events ("-" in the file).
    pub member: Option<String>,
    pub event: String,
}

impl Event {
    pub fn parse(line: &str) -> Option<Event> {
        let (time, rest) = line.split_once(' ')?;
        let rest = rest.strip_prefix("group=")?;
        let (group, rest) = rest.split_once(" serial=")?;
        let (serial, rest) = rest.split_once(" member=")?;
        let (member, event) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Event {
            time: time.to_owned(),
            group: group.to_owned(),
            serial: serial.to_owned(),
            member: (member != "-").then(|| member.to_owned()),
            event: event.to_owned(),
        })
    }

    /// The member left the rotation (a fault or a cut-off).
    pub fn is_failure(&self) -> bool {
        self.event.starts_with("member failed") || self.event.starts_with("member answered nothing")
    }

    /// The member changed state: failed, or came back.
    pub fn is_state_change(&self) -> bool {
        self.is_failure() || self.event.starts_with("member recovered")
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "time": self.time,
            "group": self.group,
            "group_serial": self.serial,
            "member": self.member,
            "event": self.event,
        })
    }
}

/// The log files, oldest first: rotated ones by their stamp, the current last.
pub fn files(directory: &Path) -> Vec<PathBuf> {
    let prefix = format!("{HA_LOG_FILE}.");
    let mut rotated: Vec<PathBuf> = fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    rotated.sort();
    let current = directory.join(HA_LOG_FILE);
    if current.is_file() {
        rotated.push(current);
    }
    rotated
}

/// Every event of the log in `directory`, oldest first.
pub fn events(directory: &Path) -> Vec<Event> {
    files(directory)
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .flat_map(|text| text.lines().filter_map(Event::parse).collect::<Vec<_>>())
        .collect()
}

/// `--since` as the log's own timestamp form, which sorts as text: an age
/// (`90s`, `15m`, `2h`, `1d`) or a UTC date and time.
pub fn since_stamp(text: &str, now: SystemTime) -> Res<String> {
    let text = text.trim();
    let age = [('s', 1), ('m', 60), ('h', 3600), ('d', 86_400)]
        .into_iter()
        .find_map(|(unit, seconds)| {
            let count = text.strip_suffix(unit)?.parse::<u64>().ok()?;
            Some(Duration::from_secs(count.saturating_mul(seconds)))
        });
    if let Some(age) = age {
        return Ok(utc_timestamp(
            now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH),
        ));
    }
    let stamp = text.replace(' ', "T");
    let stamp = stamp.trim_end_matches('Z');
    let shape_ok = stamp.len() >= 10
        && stamp.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(format!(
            "--since {text}: give a UTC time as 2026-12-03, 2026-12-03T07:15 or \
             2026-12-03T07:15:30Z, or an age such as 90s, 15m, 2h, 1d"
        ));
    }
    Ok(stamp.to_owned())
}

struct Filter {
    since: Option<String>,
    member: Option<String>,
}

impl Filter {
    fn keeps(&self, event: &Event) -> bool {
        self.since
            .as_deref()
            .is_none_or(|s| event.time.as_str() >= s)
            && self
                .member
                .as_deref()
                .is_none_or(|m| event.member.as_deref() == Some(m))
    }
}

/// Prints one event; false once the reader has gone (a closed pipe).
fn print(ctx: &Ctx, event: &Event) -> bool {
    let line = if ctx.json {
        event.json().to_string()
    } else {
        let member = event.member.as_deref().unwrap_or("-");
        format!(
            "{}  {} ({})  member {member}  {}",
            event.time, event.group, event.serial, event.event
        )
    };
    let mut out = std::io::stdout();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

pub fn read(ctx: &Ctx, args: &LogArgs) -> Res<ExitCode> {
    let config = ctx.load()?;
    let Some(directory) = config.ha_log.path.clone() else {
        return Err(
            "the HA log has no directory (haLogPath); enable it with `pkcs11-ha log --enable \
             --path DIR`"
                .into(),
        );
    };
    if !config.ha_log.enabled {
        eprintln!(
            "pkcs11-ha: warning: the HA log is disabled (haLogStatus), so applications add \
             nothing to it; `pkcs11-ha log --enable` turns it on"
        );
    }
    let filter = Filter {
        since: args
            .since
            .as_deref()
            .map(|s| since_stamp(s, SystemTime::now()))
            .transpose()?,
        member: args.member.clone(),
    };
    let mut shown = 0usize;
    for path in files(&directory) {
        let text = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the HA log {}: {e}", path.display()))?;
        for event in text.lines().filter_map(Event::parse) {
            if filter.keeps(&event) {
                if !print(ctx, &event) {
                    return Ok(ExitCode::SUCCESS);
                }
                shown += 1;
            }
        }
    }
    if !args.follow {
        if shown == 0 && !ctx.json {
            eprintln!(
                "pkcs11-ha: no event in the HA log under {}{}",
                directory.display(),
                if filter.since.is_some() || filter.member.is_some() {
                    " that matches the filter"
                } else {
                    ""
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(ctx, &directory, &filter)
}

/// A log file being read: where it is on disk and how far it was read.
struct Reading {
    file: fs::File,
    identity: (u64, u64),
    partial: String,
}

fn identity(metadata: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (metadata.dev(), metadata.ino())
}

impl Reading {
    fn open(path: &Path, from_end: bool) -> Option<Reading> {
        let mut file = fs::File::open(path).ok()?;
        let identity = identity(&file.metadata().ok()?);
        if from_end {
            file.seek(SeekFrom::End(0)).ok()?;
        }
        Some(Reading {
            file,
            identity,
            partial: String::new(),
        })
    }

    /// Prints the complete lines added since the last call; false once the
    /// reader has gone.
    fn drain(&mut self, ctx: &Ctx, filter: &Filter) -> Res<bool> {
        let mut chunk = String::new();
        self.file
            .read_to_string(&mut chunk)
            .map_err(|e| format!("cannot read the HA log: {e}"))?;
        self.partial.push_str(&chunk);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            if let Some(event) = Event::parse(line.trim_end()) {
                if filter.keeps(&event) && !print(ctx, &event) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Prints what is written to the log after now, across rotations: the
/// file being read is finished after it is renamed, rotated files that
/// appear meanwhile are read whole, then the new current file.
fn follow(ctx: &Ctx, directory: &Path, filter: &Filter) -> Res<ExitCode> {
    let current = directory.join(HA_LOG_FILE);
    let mut known: Vec<PathBuf> = files(directory);
    let mut reading = Reading::open(&current, true);
    loop {
        if let Some(r) = reading.as_mut() {
            if !r.drain(ctx, filter)? {
                return Ok(ExitCode::SUCCESS);
            }
        }
        for path in files(directory) {
            if path == current || known.contains(&path) {
                continue;
            }
            known.push(path.clone());
            let same = fs::metadata(&path)
                .ok()
                .is_some_and(|m| reading.as_ref().is_some_and(|r| r.identity == identity(&m)));
            if same {
                continue;
            }
            if let Some(mut rotated) = Reading::open(&path, false) {
                if !rotated.drain(ctx, filter)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        let now = fs::metadata(&current).ok().map(|m| identity(&m));
        if now.is_some() && now != reading.as_ref().map(|r| r.identity) {
            // What was written to the old file just before it was renamed.
            if let Some(r) = reading.as_mut() {
                if !r.drain(ctx, filter)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            reading = Reading::open(&current, false);
            continue;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lines_halog_writes() {
        let e = Event::parse(
            "2026-12-03T07:15:30.123Z group=my group serial=1abc member=abc member failed in \
             C_Sign with CKR_DEVICE_ERROR; calls go to the other members",
        )
        .unwrap();
        assert_eq!(e.time, "2026-12-03T07:15:30.123Z");
        assert_eq!(e.group, "my group");
        assert_eq!(e.serial, "1abc");
        assert_eq!(e.member.as_deref(), Some("abc"));
        assert!(e.is_failure() && e.is_state_change());
        let g = Event::parse("2026-12-03T07:15:30.123Z group=g serial=1 member=- started").unwrap();
        assert_eq!(g.member, None);
        assert!(!g.is_state_change());
        assert_eq!(Event::parse("not a log line"), None);
    }

    #[test]
    fn since_accepts_dates_times_and_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(
            since_stamp("2026-12-03", now).unwrap(),
            "2026-12-03".to_owned()
        );
        assert_eq!(
            since_stamp("2026-12-03 07:15:30Z", now).unwrap(),
            "2026-12-03T07:15:30"
        );
        assert_eq!(
            since_stamp("90s", now).unwrap(),
            utc_timestamp(now - Duration::from_secs(90))
        );
        assert_eq!(
            since_stamp("2h", now).unwrap(),
            utc_timestamp(now - Duration::from_secs(7200))
        );
        let e = since_stamp("yesterday", now).unwrap_err();
        assert!(e.contains("2026-12-03T07:15"), "{e}");
        for odd in ["", "5ä", "ä", "m", "-5m"] {
            assert!(since_stamp(odd, now).is_err(), "{odd:?}");
        }
        assert!(since_stamp("2026-1-3", now).is_err());
    }
}
