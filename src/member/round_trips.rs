//! How long a network member's calls usually take on the wire, by
//! function, so that the watchdog can tell a silent connection from a slow
//! call long before `memberTimeout` (Luna's default: 20 s, for which a
//! black-holed path held every call in flight on it).

use parking_lot::Mutex;
use smallvec::SmallVec;
use std::time::{Duration, Instant};

/// How long one bucket of round trips covers; the usual round trip is the
/// longest of the last two, so that one slow spell is remembered for at
/// least this long.
const BUCKET: Duration = Duration::from_secs(10);

/// Round trips of a function the last two buckets must hold before it is
/// judged: fewer say too little about what the member usually takes.
pub const SAMPLES: u32 = 16;

/// A call silent for this many times its function's usual round trip is
/// taken for a silent connection ...
const SILENT_RATIO: u32 = 8;

/// ... and for at least this long: below it, a scheduling delay on a
/// loaded host, lost TCP segments (each retransmitted after 200 ms or more)
/// or a path slowed by a few hundred milliseconds (a member that is slow,
/// not silent, which the degraded rule takes out of rotation) would pass
/// for one.
pub const SILENT_FLOOR: Duration = Duration::from_secs(1);

/// Whether a call to `function` is quick by its nature, its time on the
/// wire that of the path and the member's load rather than of what it was
/// asked: those are judged against their usual round trip. Key generation
/// and derivation, logins (a PIN entry device waits for a person) and
/// initialisation are not, nor is anything not listed (vendor functions).
pub fn judged_by_round_trip(function: &str) -> bool {
    const PREFIXES: [&str; 5] = ["C_Digest", "C_Sign", "C_Verify", "C_Encrypt", "C_Decrypt"];
    const QUICK: [&str; 17] = [
        "C_GenerateRandom",
        "C_CreateObject",
        "C_CopyObject",
        "C_DestroyObject",
        "C_GetAttributeValue",
        "C_SetAttributeValue",
        "C_FindObjectsInit",
        "C_FindObjects",
        "C_FindObjectsFinal",
        "C_OpenSession",
        "C_CloseSession",
        "C_GetSessionInfo",
        "C_GetTokenInfo",
        "C_GetSlotInfo",
        "C_GetSlotList",
        "C_WrapKey",
        "C_UnwrapKey",
    ];
    PREFIXES.iter().any(|p| function.starts_with(p)) || QUICK.contains(&function)
}

/// How long a call may stay silent on the wire before the watchdog cuts
/// its connection, given its function's `usual` round trip: `None` where
/// nothing earlier than `member_timeout` applies.
pub fn silent_limit(usual: Option<Duration>, member_timeout: Duration) -> Option<Duration> {
    let limit = (usual? * SILENT_RATIO).max(SILENT_FLOOR);
    (limit < member_timeout).then_some(limit)
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    count: u32,
    longest: Duration,
}

struct Window {
    started: Instant,
    current: Bucket,
    previous: Bucket,
}

impl Window {
    /// Moves the buckets on to `now`.
    fn roll(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.started);
        if age >= BUCKET * 2 {
            (self.previous, self.current) = (Bucket::default(), Bucket::default());
            self.started = now;
        } else if age >= BUCKET {
            self.previous = std::mem::take(&mut self.current);
            self.started += BUCKET;
        }
    }
}

/// The round trips of a library and its spare instances, by function,
/// and when any of their calls last answered.
#[derive(Default)]
pub struct RoundTrips {
    by_function: Mutex<SmallVec<[(&'static str, Window); 16]>>,
    last_answer: Mutex<Option<Instant>>,
}

impl RoundTrips {
    /// Notes that a call answered at `now`: a call slower than usual is
    /// no sign of a silent connection while others answer beside it.
    pub fn answered(&self, now: Instant) {
        let mut last = self.last_answer.lock();
        *last = Some(last.map_or(now, |l| l.max(now)));
    }

    /// Whether any call answered after `since`.
    pub fn answered_since(&self, since: Instant) -> bool {
        self.last_answer.lock().is_some_and(|last| last > since)
    }

    /// Notes that a call to `function` succeeded after `took` on the wire.
    pub fn record(&self, function: &'static str, took: Duration, now: Instant) {
        let mut by_function = self.by_function.lock();
        let window = match by_function.iter().position(|(f, _)| *f == function) {
            Some(i) => &mut by_function[i].1,
            None => {
                by_function.push((
                    function,
                    Window {
                        started: now,
                        current: Bucket::default(),
                        previous: Bucket::default(),
                    },
                ));
                &mut by_function.last_mut().expect("just pushed").1
            }
        };
        window.roll(now);
        window.current.count += 1;
        window.current.longest = window.current.longest.max(took);
    }

    /// The longest round trip of `function` in the last two buckets, if
    /// they hold at least [`SAMPLES`].
    pub fn usual(&self, function: &str, now: Instant) -> Option<Duration> {
        let mut by_function = self.by_function.lock();
        let (_, window) = by_function.iter_mut().find(|(f, _)| *f == function)?;
        window.roll(now);
        let (current, previous) = (window.current, window.previous);
        (current.count + previous.count >= SAMPLES).then_some(current.longest.max(previous.longest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn recorded(function: &'static str, count: u32, took: Duration, at: Instant) -> RoundTrips {
        let trips = RoundTrips::default();
        for _ in 0..count {
            trips.record(function, took, at);
        }
        trips
    }

    #[test]
    fn a_function_is_judged_only_after_enough_round_trips() {
        let now = Instant::now();
        let few = recorded("C_Sign", SAMPLES - 1, 2 * MS, now);
        assert_eq!(few.usual("C_Sign", now), None);
        few.record("C_Sign", 5 * MS, now);
        assert_eq!(few.usual("C_Sign", now), Some(5 * MS), "the longest");
        assert_eq!(few.usual("C_Digest", now), None, "another function");
    }

    #[test]
    fn round_trips_older_than_two_buckets_are_forgotten() {
        let start = Instant::now();
        let trips = recorded("C_Sign", SAMPLES, 40 * MS, start);
        trips.record("C_Sign", MS, start + BUCKET);
        assert_eq!(
            trips.usual("C_Sign", start + BUCKET),
            Some(40 * MS),
            "the bucket before is still counted"
        );
        assert_eq!(trips.usual("C_Sign", start + BUCKET * 2), None);
        assert_eq!(trips.usual("C_Sign", start + BUCKET * 3), None);
    }

    #[test]
    fn the_limit_is_many_round_trips_at_least_the_floor_and_below_member_timeout() {
        let timeout = Duration::from_secs(20);
        assert_eq!(silent_limit(None, timeout), None);
        assert_eq!(silent_limit(Some(MS), timeout), Some(SILENT_FLOOR));
        assert_eq!(silent_limit(Some(500 * MS), timeout), Some(4000 * MS));
        assert_eq!(silent_limit(Some(500 * MS), 4000 * MS), None);
        assert_eq!(silent_limit(Some(MS), SILENT_FLOOR), None);
    }

    #[test]
    fn an_answer_is_seen_after_the_calls_that_went_out_before_it() {
        let start = Instant::now();
        let trips = RoundTrips::default();
        assert!(!trips.answered_since(start));
        trips.answered(start + MS);
        assert!(trips.answered_since(start));
        assert!(!trips.answered_since(start + MS));
    }

    #[test]
    fn only_calls_quick_by_nature_are_judged() {
        for quick in ["C_Sign", "C_SignFinal", "C_DecryptUpdate", "C_CreateObject"] {
            assert!(judged_by_round_trip(quick), "{quick}");
        }
        for slow in [
            "C_GenerateKeyPair",
            "C_Login",
            "C_Initialize",
            "CA_CloneObject",
        ] {
            assert!(!judged_by_round_trip(slow), "{slow}");
        }
    }
}
