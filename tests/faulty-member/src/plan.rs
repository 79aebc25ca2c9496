//! The fault plan of this copy (what the test asked for) and the counters the
//! test reads back, with the `faulty_*` control exports.
//!
//! Owns the crate's only lock, [`PLAN`]; it is never held across a call into
//! the real library, and waiters sleep on [`CHANGED`], never in a loop.

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::thread;
use std::time::{Duration, Instant};

use cryptoki_sys::{CKR_DEVICE_ERROR, CKR_OK, CK_RV};
use parking_lot::{Condvar, Mutex};

/// What calls that pass the gate get instead of the real library's answer.
enum Fault {
    None,
    Always(CK_RV),
    /// `remaining` more calls are forwarded, then every call returns `rv`.
    After {
        remaining: u64,
        rv: CK_RV,
    },
}

struct Plan {
    latency: Duration,
    /// Most calls served at once; 0 = unlimited.
    capacity: u32,
    fault: Fault,
    /// Entry points that return this instead of forwarding, where `fault`
    /// lets them through.
    call_faults: BTreeMap<String, CK_RV>,
    /// The entry point whose next call is carried out and then fails with
    /// `CKR_DEVICE_ERROR`, every call after it failing so too: a member
    /// whose connection drops right after it carried a request out.
    dies_after: Option<String>,
    hung: bool,
    /// Bumped by every release, so the calls it freed go even if the test
    /// hangs the member again before they wake.
    releases: u64,
    /// Calls waiting for a release.
    blocked: u32,
    /// Calls holding a capacity slot (including blocked ones).
    in_flight: u32,
    max_in_flight: u32,
    calls: BTreeMap<&'static str, u64>,
}

static PLAN: Mutex<Plan> = Mutex::new(Plan {
    latency: Duration::ZERO,
    capacity: 0,
    fault: Fault::None,
    call_faults: BTreeMap::new(),
    dies_after: None,
    hung: false,
    releases: 0,
    blocked: 0,
    in_flight: 0,
    max_in_flight: 0,
    calls: BTreeMap::new(),
});

/// Signalled on every change a waiter may be waiting for: a freed capacity
/// slot, a release, a newly blocked call.
static CHANGED: Condvar = Condvar::new();

/// Count one call of `name`; every entry point counts, faulted or not.
pub(crate) fn count(name: &'static str) {
    *PLAN.lock().calls.entry(name).or_default() += 1;
}

/// A call holding a capacity slot; frees it on drop.
pub(crate) struct Admission(());

impl Drop for Admission {
    fn drop(&mut self) {
        PLAN.lock().in_flight -= 1;
        CHANGED.notify_all();
    }
}

/// Run the plan for one call: take a capacity slot, wait out a hang, sleep
/// the latency, then admit the call or fail it with the planned fault.
/// A hung call keeps its slot, as a stalled HSM connection would.
pub(crate) fn admit(name: &str) -> Result<Admission, CK_RV> {
    let mut plan = PLAN.lock();
    while plan.capacity != 0 && plan.in_flight >= plan.capacity {
        CHANGED.wait(&mut plan);
    }
    plan.in_flight += 1;
    plan.max_in_flight = plan.max_in_flight.max(plan.in_flight);
    let admission = Admission(());
    if plan.hung {
        let epoch = plan.releases;
        plan.blocked += 1;
        CHANGED.notify_all();
        while plan.hung && plan.releases == epoch {
            CHANGED.wait(&mut plan);
        }
        plan.blocked -= 1;
    }
    let fault = match &mut plan.fault {
        Fault::None => None,
        Fault::Always(rv) => Some(*rv),
        Fault::After { remaining: 0, rv } => Some(*rv),
        Fault::After { remaining, .. } => {
            *remaining -= 1;
            None
        }
    }
    .or_else(|| plan.call_faults.get(name).copied());
    let latency = plan.latency;
    drop(plan);
    thread::sleep(latency);
    match fault {
        Some(rv) => Err(rv),
        None => Ok(admission),
    }
}

/// The answer the caller gets for a forwarded call of `name` that
/// returned `rv`: `CKR_DEVICE_ERROR` where the member dies after this call
/// ([`faulty_die_after_call`]), which also fails every call after it.
pub(crate) fn answer(name: &str, rv: CK_RV) -> CK_RV {
    let mut plan = PLAN.lock();
    if plan.dies_after.as_deref() != Some(name) {
        return rv;
    }
    plan.dies_after = None;
    plan.fault = Fault::Always(CKR_DEVICE_ERROR);
    CKR_DEVICE_ERROR
}

/// Carry out the next call of entry point `name`, then fail it and every
/// call after it with `CKR_DEVICE_ERROR` (until `faulty_set_fault(CKR_OK)`):
/// the member dies with that call's answer lost.
///
/// # Safety
/// `name` is NULL (ignored) or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn faulty_die_after_call(name: *const c_char) {
    if name.is_null() {
        return;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    PLAN.lock().dies_after = Some(name.into_owned());
}

/// Sleep this long in every call before it is forwarded (or faulted).
#[no_mangle]
pub extern "C" fn faulty_set_latency_us(us: u64) {
    PLAN.lock().latency = Duration::from_micros(us);
}

/// Serve at most `n` calls at once (0 = unlimited); the others wait in turn.
#[no_mangle]
pub extern "C" fn faulty_set_capacity(n: u32) {
    PLAN.lock().capacity = n;
    CHANGED.notify_all();
}

/// Make every call return `rv` without forwarding; `CKR_OK` clears any fault
/// (including those set by [`faulty_fail_after`] and
/// [`faulty_set_call_fault`]).
#[no_mangle]
pub extern "C" fn faulty_set_fault(rv: CK_RV) {
    let mut plan = PLAN.lock();
    if rv == CKR_OK {
        plan.fault = Fault::None;
        plan.call_faults.clear();
        plan.dies_after = None;
    } else {
        plan.fault = Fault::Always(rv);
    }
}

/// Make the entry point `name` (e.g. `"C_Login"`) return `rv` without
/// forwarding while the others answer; `CKR_OK` clears it.
///
/// # Safety
/// `name` is NULL (ignored) or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn faulty_set_call_fault(name: *const c_char, rv: CK_RV) {
    if name.is_null() {
        return;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let mut plan = PLAN.lock();
    if rv == CKR_OK {
        plan.call_faults.remove(&name);
    } else {
        plan.call_faults.insert(name, rv);
    }
}

/// Forward the next `n` calls, then make every call return `rv`.
#[no_mangle]
pub extern "C" fn faulty_fail_after(n: u64, rv: CK_RV) {
    PLAN.lock().fault = Fault::After { remaining: n, rv };
}

/// Block every call that reaches the gate from now on until
/// [`faulty_release`]; calls already past it are unaffected.
#[no_mangle]
pub extern "C" fn faulty_hang() {
    PLAN.lock().hung = true;
}

/// Let every blocked call continue (with the plan as it is then) and stop
/// blocking new ones.
#[no_mangle]
pub extern "C" fn faulty_release() {
    let mut plan = PLAN.lock();
    plan.hung = false;
    plan.releases += 1;
    CHANGED.notify_all();
}

/// Wait up to `timeout_ms` until at least `n` calls are blocked by
/// [`faulty_hang`]; whether they are.
#[no_mangle]
pub extern "C" fn faulty_wait_for_blocked(n: u32, timeout_ms: u64) -> bool {
    let deadline = Instant::now().checked_add(Duration::from_millis(timeout_ms));
    let mut plan = PLAN.lock();
    while plan.blocked < n {
        match deadline {
            Some(deadline) => {
                if CHANGED.wait_until(&mut plan, deadline).timed_out() {
                    return plan.blocked >= n;
                }
            }
            None => CHANGED.wait(&mut plan),
        }
    }
    true
}

/// How many times the entry point `name` (e.g. `"C_Login"`) was called since
/// the last [`faulty_reset_counts`]; 0 for unknown names.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn faulty_call_count(name: *const c_char) -> u64 {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) };
    name.to_str()
        .ok()
        .and_then(|name| PLAN.lock().calls.get(name).copied())
        .unwrap_or(0)
}

/// The most calls served at once since the last [`faulty_reset_counts`].
#[no_mangle]
pub extern "C" fn faulty_max_concurrent() -> u32 {
    PLAN.lock().max_in_flight
}

/// Zero the call counts and restart [`faulty_max_concurrent`] from the calls
/// being served now.
#[no_mangle]
pub extern "C" fn faulty_reset_counts() {
    let mut plan = PLAN.lock();
    plan.calls.clear();
    plan.max_in_flight = plan.in_flight;
}
