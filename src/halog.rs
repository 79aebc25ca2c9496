//! The HA log: one line per group event (a member failed, a call failed
//! over, a recovery attempt and its result, objects replicated or
//! synchronised, the group without a serving member and back), in
//! `haErrorLog.txt` under `haLogPath`, rotated by renaming with a timestamp
//! once the file passes `logLen` bytes. A change of state (a member failed
//! or serves again, the group without a serving member or serving again)
//! is always written: an operator reconstructs outages from those lines.
//! Any other event that repeats (the same text but for its numbers, for the
//! same member) is written `logRepeats` times per [`REPEAT_WINDOW`] (three
//! unless configured; 0 writes every one), then once per window with how
//! many like it were left out. It never records a PIN or key material,
//! and a write that fails never fails the application's call.

use crate::fork::PerGeneration;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const FILE_NAME: &str = "haErrorLog.txt";

struct HaLog {
    path: PathBuf,
    max_len: u64,
    file: Mutex<Option<File>>,
    repeats: Mutex<Repeats>,
}

pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// Events remembered for repeats; past this, those whose window has ended
/// are forgotten.
const REPEATS_KEPT: usize = 1024;

/// Recent events by (group, member, text with its numbers taken out).
struct Repeats {
    /// How often an event may repeat within [`REPEAT_WINDOW`] before the
    /// rest are counted instead of written; 0: no limit.
    written_per_window: u32,
    seen: HashMap<(String, String, String), Window>,
}

struct Window {
    started: Instant,
    written: u32,
    left_out: u64,
    /// The group's label and the last event left out, for the summary.
    group_label: String,
    last_left_out: String,
}

impl Repeats {
    fn new(written_per_window: u32) -> Repeats {
        Repeats {
            written_per_window,
            seen: HashMap::new(),
        }
    }

    /// Whether to write an event now, and the note to add: how many like
    /// it were left out since the last one written.
    fn admit(
        &mut self,
        key: (String, String, String),
        group_label: &str,
        event: &str,
        now: Instant,
    ) -> Option<String> {
        if self.written_per_window == 0 {
            return Some(String::new());
        }
        if self.seen.len() >= REPEATS_KEPT {
            self.seen
                .retain(|_, w| now.duration_since(w.started) < REPEAT_WINDOW);
        }
        let window = self.seen.entry(key).or_insert_with(|| Window {
            started: now,
            written: 0,
            left_out: 0,
            group_label: group_label.to_string(),
            last_left_out: String::new(),
        });
        if now.duration_since(window.started) >= REPEAT_WINDOW {
            let note = (window.left_out > 0).then(|| {
                format!(
                    " ({} more like this not written in the {} s before)",
                    window.left_out,
                    now.duration_since(window.started).as_secs()
                )
            });
            window.started = now;
            window.written = 1;
            window.left_out = 0;
            return Some(note.unwrap_or_default());
        }
        if window.written < self.written_per_window {
            window.written += 1;
            Some(String::new())
        } else {
            window.left_out += 1;
            window.last_left_out = event.to_string();
            None
        }
    }

    /// Summary lines for the events left out in windows that have ended
    /// (an event that stopped repeating is not followed by one that would
    /// carry the count), each as (group label, group serial, member, text);
    /// those windows are forgotten.
    fn summaries(&mut self, now: Instant) -> Vec<(String, String, String, String)> {
        let mut lines = Vec::new();
        self.seen.retain(|(serial, member, _), w| {
            let ended = now.duration_since(w.started) >= REPEAT_WINDOW;
            if ended && w.left_out > 0 {
                lines.push((
                    w.group_label.clone(),
                    serial.clone(),
                    member.clone(),
                    format!(
                        "{} more like this not written in the {} s before: {}",
                        w.left_out,
                        now.duration_since(w.started).as_secs(),
                        w.last_left_out
                    ),
                ));
            }
            !ended
        });
        lines
    }
}

/// An event's text with every run of digits replaced by `#`, so that
/// repeats that differ only in counts, sizes or durations are one event.
fn without_numbers(event: &str) -> String {
    let mut text = String::with_capacity(event.len());
    for c in event.chars() {
        if c.is_ascii_digit() {
            if !text.ends_with('#') {
                text.push('#');
            }
        } else {
            text.push(c);
        }
    }
    text
}

/// Per fork generation: a child never waits on a write its parent's
/// threads had under way.
static LOG: PerGeneration<RwLock<Option<HaLog>>> = PerGeneration::new(|| RwLock::new(None));

/// Starts logging to `directory`; `max_len` 0 never rotates; an event
/// that repeats is written `repeats` times a minute (0: every time). The
/// file is opened at once, so that a directory that is missing or not
/// writable is reported now; logging is on all the same, and each event
/// tries the file again until it can be written.
pub fn open(directory: &Path, max_len: u64, repeats: u32) -> std::io::Result<()> {
    let path = directory.join(FILE_NAME);
    let (file, opened) = match open_file(&path) {
        Ok(file) => (Some(file), Ok(())),
        Err(e) => (None, Err(e)),
    };
    *LOG.get().write() = Some(HaLog {
        path,
        max_len,
        file: Mutex::new(file),
        repeats: Mutex::new(Repeats::new(repeats)),
    });
    opened
}

fn open_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Stops logging (at `C_Finalize`).
pub fn close() {
    LOG.get().write().take();
}

/// Appends one line for a change of state of a group, or of a member where
/// there is one, however often it happens.
pub fn record_change(
    group_label: &str,
    group_serial: &str,
    member_serial: Option<&str>,
    event: &str,
) {
    if let Some(log) = LOG.get().read().as_ref() {
        log.write(
            group_label,
            group_serial,
            member_serial.unwrap_or("-"),
            event,
        );
    }
}

/// Appends one event line for a group, and for a member where there is one,
/// unless it is a repeat past `logRepeats` in its window.
pub fn record(group_label: &str, group_serial: &str, member_serial: Option<&str>, event: &str) {
    let guard = LOG.get().read();
    let Some(log) = guard.as_ref() else {
        return;
    };
    let member = member_serial.unwrap_or("-");
    let key = (
        group_serial.to_string(),
        member.to_string(),
        without_numbers(event),
    );
    let Some(note) = log
        .repeats
        .lock()
        .admit(key, group_label, event, crate::clock::now())
    else {
        return;
    };
    log.write(group_label, group_serial, member, &format!("{event}{note}"));
}

/// Writes the periodic summary of events left out as repeats, for those
/// whose window has ended: called by the watchdog, so that an event that
/// stopped repeating still has its count written.
pub fn summarize() {
    let guard = LOG.get().read();
    let Some(log) = guard.as_ref() else {
        return;
    };
    let lines = log.repeats.lock().summaries(crate::clock::now());
    for (label, serial, member, text) in lines {
        log.write(&label, &serial, &member, &text);
    }
}

impl HaLog {
    /// Appends one line, rotating the file once it is full.
    fn write(&self, group_label: &str, group_serial: &str, member: &str, text: &str) {
        let line = format!(
            "{} group={} serial={} member={} {}\n",
            utc_timestamp(SystemTime::now()),
            group_label,
            group_serial,
            member,
            text
        );
        let log = self;
        let mut file = log.file.lock();
        if file.is_none() {
            *file = open_file(&log.path).ok();
        }
        let Some(f) = file.as_mut() else {
            return;
        };
        if f.write_all(line.as_bytes()).is_err() {
            return;
        }
        let full = log.max_len > 0 && f.metadata().is_ok_and(|m| m.len() >= log.max_len);
        if full {
            let stamp = utc_timestamp(SystemTime::now()).replace([':', '-'], "");
            let rotated = log.path.with_file_name(format!("{FILE_NAME}.{stamp}"));
            *file = None;
            let _ = std::fs::rename(&log.path, rotated);
        }
    }
}

/// `2026-11-28T04:41:03.123Z`, without pulling in a date crate for one line.
pub fn utc_timestamp(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// Tests that open the one process-wide log take turns.
    static LOG_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_840_863_123);
        assert_eq!(utc_timestamp(t), "2026-11-28T04:41:03.123Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn repeats_are_written_a_few_times_per_window_then_counted() {
        let mut repeats = Repeats::new(3);
        let key = |text: &str| ("1abc".to_string(), "abc".to_string(), without_numbers(text));
        let start = Instant::now();
        let written: Vec<Option<String>> = (1..=5)
            .map(|i| {
                let event = format!("recovery attempt {i}");
                repeats.admit(key(&event), "g", &event, start)
            })
            .collect();
        assert_eq!(
            written,
            [Some(""), Some(""), Some(""), None, None].map(|w| w.map(String::from))
        );
        assert_eq!(
            repeats.admit(key("member recovered"), "g", "member recovered", start),
            Some(String::new()),
            "another event is written"
        );
        let later = start + REPEAT_WINDOW;
        assert_eq!(
            repeats
                .admit(key("recovery attempt 6"), "g", "recovery attempt 6", later)
                .as_deref(),
            Some(" (2 more like this not written in the 60 s before)")
        );
        // An event that stops repeating has its count written by the
        // periodic summary once its window ends.
        for i in 7..=10 {
            let event = format!("recovery attempt {i}");
            repeats.admit(key(&event), "g", &event, later);
        }
        assert!(repeats.summaries(later).is_empty(), "its window runs on");
        assert_eq!(
            repeats.summaries(later + REPEAT_WINDOW),
            [(
                "g".to_string(),
                "1abc".to_string(),
                "abc".to_string(),
                "2 more like this not written in the 60 s before: recovery attempt 10".to_string()
            )]
        );
        assert!(
            repeats.summaries(later + REPEAT_WINDOW * 2).is_empty(),
            "said once"
        );
        assert_eq!(
            without_numbers("token 8ca077b5 not found after 12 s"),
            "token #ca#b# not found after # s"
        );
    }

    #[test]
    fn records_are_private_and_rotate_after_a_complete_line() {
        let _serial = LOG_TESTS.lock();
        let dir = std::env::temp_dir().join(format!("halog-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        open(&dir, 100, 3).unwrap();
        record(
            "g",
            "1abc",
            Some("abc"),
            "member failed in C_Sign with CKR_DEVICE_ERROR",
        );
        record("g", "1abc", Some("abc"), "member recovered");
        close();
        record("g", "1abc", None, "not written: the log is closed");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[1].starts_with("haErrorLog.txt."), "{names:?}");
        let rotated = std::fs::read_to_string(dir.join(&names[1])).unwrap();
        assert!(rotated.ends_with('\n') && rotated.contains("C_Sign with CKR_DEVICE_ERROR"));
        let current = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert_eq!(current.lines().count(), 1);
        assert!(current.contains("member recovered"));
        let mode = std::fs::metadata(dir.join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Five state changes and five repeats of one event, written with
    /// `repeats`; how many lines of each the log holds.
    fn five_of_each(repeats: u32) -> (usize, usize) {
        let _serial = LOG_TESTS.lock();
        let dir = std::env::temp_dir().join(format!("halog-changes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        open(&dir, 0, repeats).unwrap();
        for _ in 0..5 {
            record_change("g", "1abc", Some("abc"), "member failed in C_Sign");
            record(
                "g",
                "1abc",
                Some("abc"),
                "recovery failed: token abc not found",
            );
        }
        close();
        let written = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        let count = |text: &str| written.lines().filter(|l| l.contains(text)).count();
        std::fs::remove_dir_all(&dir).unwrap();
        (count("member failed in C_Sign"), count("recovery failed"))
    }

    #[test]
    fn state_changes_are_written_however_often_they_repeat() {
        assert_eq!(five_of_each(3), (5, 3));
    }

    #[test]
    fn with_no_repeat_limit_every_event_is_written() {
        assert_eq!(five_of_each(0), (5, 5));
    }
}
