//! Time as supervision sees it: the one clock every time-based decision of
//! the HA policy reads (the watchdog's memberTimeout cut-off,
//! `AutoReconnectInterval` retries, the in-doubt wait, degraded detection,
//! rate-limited HA log repeats, bounded calls), so that a test can run that
//! policy on time it moves itself. The process uses the system's monotonic
//! clock unless a [`ManualClock`] was installed before pkcs11-ha first read
//! the time ([`install_manual`], what the deterministic simulation does).
//! Policy code that tests drive directly takes the time as an argument
//! (`now: Instant`), so that unit tests running side by side each keep a
//! [`ManualClock`] of their own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// A source of time: what a thread that waits or sleeps asks.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    /// Lets `pause` pass for the calling thread.
    fn sleep(&self, pause: Duration);
    /// How long a thread waiting for `deadline` (or for a wake-up) may
    /// block before it looks at this clock again; zero once it has passed.
    fn block_for(&self, deadline: Instant) -> Duration;
}

/// The system's monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, pause: Duration) {
        std::thread::sleep(pause);
    }

    fn block_for(&self, deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now())
    }
}

/// A clock that moves only when told ([`ManualClock::advance`]). A thread
/// that sleeps on it lets the time pass (the simulation has one thread, and
/// a call that pauses is a call that takes that long); one that waits for a
/// deadline looks at it again every [`MANUAL_POLL`] of real time.
pub struct ManualClock {
    start: Instant,
    elapsed_ns: AtomicU64,
    /// See [`ManualClock::on_block`].
    on_block: Mutex<Option<fn(Instant)>>,
}

/// How often a thread waiting on a [`ManualClock`] looks whether its
/// deadline has come.
const MANUAL_POLL: Duration = Duration::from_millis(1);

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock {
            start: Instant::now(),
            elapsed_ns: AtomicU64::new(0),
            on_block: Mutex::new(None),
        }
    }

    /// Has `hook` run, with the deadline, each time a thread is about to
    /// block until a deadline that has not come ([`Clock::block_for`]):
    /// the simulation, whose one thread is the one blocking, runs there
    /// what other threads would do meanwhile (the recovery thread's
    /// rounds), and moves the clock. Callers of [`block_for`] on paths the
    /// simulation runs hold no lock that work may take.
    pub fn on_block(&self, hook: fn(Instant)) {
        *self.on_block.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Moves the clock `by` forward.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_ns.fetch_add(nanos, Ordering::SeqCst);
    }

    /// How far the clock has been moved since it was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst))
    }
}

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn sleep(&self, pause: Duration) {
        self.advance(pause);
    }

    fn block_for(&self, deadline: Instant) -> Duration {
        if self.now() < deadline {
            let hook = *self.on_block.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(hook) = hook {
                hook(deadline);
            }
        }
        if self.now() >= deadline {
            Duration::ZERO
        } else {
            MANUAL_POLL
        }
    }
}

static MANUAL: OnceLock<ManualClock> = OnceLock::new();

/// Makes a [`ManualClock`] the clock of the whole process from now on (the
/// same one on every call), for a test that runs pkcs11-ha on simulated
/// time. Install it before pkcs11-ha first reads the time.
pub fn install_manual() -> &'static ManualClock {
    MANUAL.get_or_init(ManualClock::new)
}

/// The process's clock.
#[inline]
pub fn get() -> &'static dyn Clock {
    match MANUAL.get() {
        Some(manual) => manual,
        None => &SystemClock,
    }
}

/// The time now, on the process's clock.
#[inline]
pub fn now() -> Instant {
    match MANUAL.get() {
        Some(manual) => manual.now(),
        None => Instant::now(),
    }
}

/// How long ago `then` was, on the process's clock.
#[inline]
pub fn since(then: Instant) -> Duration {
    now().saturating_duration_since(then)
}

/// Lets `pause` pass, on the process's clock.
pub fn sleep(pause: Duration) {
    get().sleep(pause);
}

/// See [`Clock::block_for`], on the process's clock.
pub fn block_for(deadline: Instant) -> Duration {
    get().block_for(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_or_slept_on() {
        let clock = ManualClock::new();
        let start = clock.now();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now() - start, Duration::from_secs(3));
        clock.sleep(Duration::from_millis(250));
        assert_eq!(clock.now() - start, Duration::from_millis(3250));
    }

    #[test]
    fn a_wait_on_a_manual_clock_ends_when_the_clock_reaches_its_deadline() {
        let clock = ManualClock::new();
        let deadline = clock.now() + Duration::from_secs(1);
        assert_eq!(clock.block_for(deadline), MANUAL_POLL);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.block_for(deadline), Duration::ZERO);
    }
}
