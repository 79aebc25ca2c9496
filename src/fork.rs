//! Fork generations, as p11-kit has them: a counter that the
//! `pthread_atfork` child handler bumps, and process-wide values of which
//! each generation has its own. A child after `fork` runs only the thread
//! that forked; a lock any other parent thread held at that moment -- one
//! inside a member call, say -- stays held in the child for ever. So a
//! child never touches its parent's locks or the objects behind them
//! (loaded members, the provider, the HA log): it starts with fresh ones.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Starts a new generation: called in the child right after `fork`, so it
/// only does what is async-signal-safe (one atomic add).
pub fn new_generation() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// A value each fork generation makes afresh on first use. The values of
/// older generations (the parent's, in a child) are never touched again and
/// never freed: the parent's threads, which do not exist here, may have
/// been using them.
pub struct PerGeneration<T> {
    current: AtomicPtr<Entry<T>>,
    make: fn() -> T,
}

struct Entry<T> {
    generation: u64,
    value: T,
}

// SAFETY: a `PerGeneration` hands out only shared references to values it
// owns, as a `static` of `T` would.
unsafe impl<T: Send + Sync> Sync for PerGeneration<T> {}

impl<T> PerGeneration<T> {
    pub const fn new(make: fn() -> T) -> Self {
        PerGeneration {
            current: AtomicPtr::new(std::ptr::null_mut()),
            make,
        }
    }

    /// This generation's value.
    #[inline]
    pub fn get(&self) -> &T {
        let generation = GENERATION.load(Ordering::Acquire);
        let current = self.current.load(Ordering::Acquire);
        // SAFETY: a published entry is never freed (see the type's doc).
        match unsafe { current.as_ref() } {
            Some(entry) if entry.generation == generation => &entry.value,
            _ => self.start(current, generation),
        }
    }

    /// Makes and publishes the value of `generation`, which `current`
    /// (the value last seen) is not of.
    #[cold]
    fn start(&self, current: *mut Entry<T>, generation: u64) -> &T {
        let fresh = Box::into_raw(Box::new(Entry {
            generation,
            value: (self.make)(),
        }));
        match self
            .current
            .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: just published, and from now on never freed.
            Ok(_) => unsafe { &(*fresh).value },
            Err(_) => {
                // SAFETY: `fresh` was never published; another thread's
                // value won.
                drop(unsafe { Box::from_raw(fresh) });
                self.get()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// In a child whose parent held the value's lock at `fork`, the child's
    /// value is a fresh one, free to take. (Bumping the generation in the
    /// test process itself would start a new one under other tests.)
    #[test]
    fn a_child_gets_a_fresh_value_and_leaves_the_parents_alone() {
        static VALUE: PerGeneration<Mutex<u32>> = PerGeneration::new(|| Mutex::new(0));
        let parent = VALUE.get();
        let mut held = parent.lock().unwrap();
        *held = 7;
        // SAFETY: the child only touches atomics, its own allocation and
        // `_exit`.
        let child = unsafe { libc::fork() };
        if child == 0 {
            new_generation();
            let fresh = VALUE.get();
            let ok = !std::ptr::eq(parent, fresh)
                && fresh.try_lock().is_ok_and(|value| *value == 0)
                && std::ptr::eq(fresh, VALUE.get());
            // SAFETY: ends the child without running the parent's atexit
            // handlers or the test harness.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        assert!(child > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(*held, 7);
        assert!(std::ptr::eq(parent, VALUE.get()));
    }
}
