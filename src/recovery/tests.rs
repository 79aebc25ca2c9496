use super::*;
use crate::clock::{Clock, ManualClock};
use crate::group::GroupSettings;

const TIMEOUT: Duration = Duration::from_millis(1500);

#[test]
fn a_request_cut_off_waits_the_whole_time_from_the_cut_even_once_the_member_answers_again() {
    // The member answering again says nothing of the stopped p11-kit
    // worker holding the request: there is no earlier end to the wait.
    let clock = ManualClock::new();
    let wait = InDoubtWait::for_timeout(TIMEOUT);
    let cut = DoubtSince {
        at: clock.now(),
        cut_off: true,
        carried_until: None,
    };
    clock.advance(TIMEOUT * IN_DOUBT_TIMEOUTS - Duration::from_millis(1));
    assert!(!wait.over(cut, clock.now()), "1 ms short");
    clock.advance(Duration::from_millis(1));
    assert!(wait.over(cut, clock.now()));
}

#[test]
fn a_request_whose_call_faulted_uncut_waits_one_member_timeout_from_the_fault() {
    // Its server was answering: it carries the request out within the
    // time any call is given, or was killed with it.
    let clock = ManualClock::new();
    let wait = InDoubtWait::for_timeout(TIMEOUT);
    let fault = DoubtSince {
        at: clock.now(),
        cut_off: false,
        carried_until: None,
    };
    clock.advance(TIMEOUT - Duration::from_millis(1));
    assert!(!wait.over(fault, clock.now()), "1 ms short");
    clock.advance(Duration::from_millis(1));
    assert!(wait.over(fault, clock.now()));
}

#[test]
fn a_faulted_request_waits_many_times_the_members_usual_making_within_member_timeout() {
    let ms = Duration::from_millis;
    let wait = |usual| {
        InDoubtWait::for_timeout(TIMEOUT)
            .with_usual_making(usual)
            .after_fault
    };
    assert_eq!(wait(None), TIMEOUT, "nothing known: one memberTimeout");
    assert_eq!(wait(Some(ms(5))), FAULT_WAIT_FLOOR);
    assert_eq!(wait(Some(ms(60))), ms(60) * FAULT_WAIT_RATIO);
    assert_eq!(wait(Some(TIMEOUT)), TIMEOUT, "never past memberTimeout");
    assert_eq!(
        InDoubtWait::for_timeout(TIMEOUT)
            .with_usual_making(Some(ms(5)))
            .after_cut,
        TIMEOUT * IN_DOUBT_TIMEOUTS,
        "a cut request waits as before"
    );
}

#[test]
fn a_member_owed_more_than_a_handful_of_changes_is_read_rather_than_counted() {
    assert!(counting_pays(0, 1795));
    assert!(counting_pays(QUEUED_FOR_COUNTING, 1795));
    assert!(
        !counting_pays(272, 1795),
        "272 look-ups on 1,795 objects took 38 s where reading took 0.5 s"
    );
    assert!(!counting_pays(0, 0), "nothing seen there before to count");
}

#[test]
fn a_failed_member_is_tried_at_once_then_every_interval_of_clock_time() {
    let clock = ManualClock::new();
    let ms = || clock.elapsed().as_millis() as u64;
    let interval = Duration::from_secs(5);
    clock.advance(Duration::from_secs(100));
    let failed_at = ms();
    assert!(
        due_for_attempt(failed_at, None, ms(), interval),
        "never tried: at once"
    );
    let ended = ms();
    clock.advance(interval - Duration::from_millis(1));
    assert!(!due_for_attempt(failed_at, Some(ended), ms(), interval));
    clock.advance(Duration::from_millis(1));
    assert!(due_for_attempt(failed_at, Some(ended), ms(), interval));
    let ended = ms();
    clock.advance(Duration::from_millis(10));
    assert!(
        due_for_attempt(ms(), Some(ended), ms(), interval),
        "it served again and failed anew since: at once"
    );
}

/// With no member serving, a member whose attempt failed is tried
/// again in the same run -- not with `reconnAtt` limited, not once a
/// member serves, not while it is recovering -- and it counts as being
/// brought back across the run of attempts (the marks nest), so calls
/// wait for it between them.
#[test]
fn with_no_member_serving_a_failed_attempt_is_followed_by_another_in_the_same_run() {
    let mut provider = OneGroup::new(&["a", "b"]);
    let group = Arc::clone(&provider.groups[0]);
    for m in &group.members {
        m.set_state(MemberState::Down);
    }
    assert!(tries_again_in_the_run(&provider, &group, 0));
    group.members[1].set_state(MemberState::Recovering);
    assert!(
        !tries_again_in_the_run(&provider, &group, 1),
        "it is catching up"
    );
    assert!(
        tries_again_in_the_run(&provider, &group, 0),
        "a recovering member does not serve"
    );
    group.members[1].set_state(MemberState::Up);
    assert!(
        !tries_again_in_the_run(&provider, &group, 0),
        "a member serves: the run ends, and no call waits for it"
    );
    group.members[1].set_state(MemberState::Down);
    provider.recovery.attempts = 3;
    assert!(
        !tries_again_in_the_run(&provider, &group, 0),
        "reconnAtt is limited"
    );

    let member = &group.members[0];
    assert!(!member.expected_back());
    let run = AttemptUnderWay::start(&group, 0);
    let one = AttemptUnderWay::start(&group, 0);
    drop(one);
    assert!(
        member.expected_back(),
        "a mark held across the gap (its token answered) keeps it being brought back"
    );
    drop(run);
    assert!(!member.expected_back());
}

/// When a group's last serving member fails, every failed member is due
/// an attempt at once -- where a recovery thread runs, which is woken --
/// and counts as being brought back until that attempt begins; while
/// another member serves, a member that fails is due none.
#[test]
fn when_the_last_serving_member_fails_every_failed_member_is_due_an_attempt_at_once() {
    let provider = OneGroup::new(&["a", "b", "c"]);
    let group = Arc::clone(&provider.groups[0]);
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&woken);
    group.set_recovery_wake(Box::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let wakes = || woken.load(std::sync::atomic::Ordering::SeqCst);
    group.member_failed(1, "C_Sign", CKR_DEVICE_ERROR);
    group.member_failed(2, "C_Sign", CKR_DEVICE_ERROR);
    assert!(
        group.members.iter().all(|m| !m.expected_back()),
        "a member serves"
    );
    assert_eq!(wakes(), 0);
    group.member_failed(0, "C_Sign", CKR_DEVICE_ERROR);
    assert!(group
        .members
        .iter()
        .all(|m| m.attempt_due() && m.expected_back()));
    assert_eq!(wakes(), 1, "the recovery thread is woken once");
    let attempt = AttemptUnderWay::start(&group, 1);
    assert!(!group.members[1].attempt_due() && group.members[1].expected_back());
    drop(attempt);
    assert!(!group.members[1].expected_back(), "its attempt has ended");
    assert!(
        group.members[2].expected_back(),
        "its attempt has not begun"
    );
}

/// The recovery thread's rounds stepped by hand make its decisions: a
/// failed member never tried is tried at once; with no member serving, a
/// run whose attempt found no token goes on at the next interval, and no
/// call waits for it meanwhile; when the group's last serving member fails
/// again, every failed member -- runs included -- is due at once.
#[test]
fn stepped_rounds_try_members_as_the_recovery_thread_decides() {
    let mut provider = OneGroup::new(&["a", "b"]);
    provider.recovery.interval = Duration::from_secs(3600);
    let group = Arc::clone(&provider.groups[0]);
    let mut stepped = Stepped::start(&provider);
    assert!(!stepped.due(&provider), "every member serves");
    group.member_failed(1, "C_Sign", CKR_DEVICE_ERROR);
    assert!(stepped.due(&provider), "never tried: at once");
    assert_eq!(stepped.round(&provider), [((0, 1), false)]);
    assert!(!stepped.due(&provider), "tried: not before the interval");
    group.member_failed(0, "C_Sign", CKR_DEVICE_ERROR);
    assert!(group.members.iter().all(|m| m.attempt_due()));
    assert_eq!(stepped.round(&provider), [((0, 0), false), ((0, 1), false)]);
    assert!(
        group.members.iter().all(|m| !m.expected_back()),
        "no token found: no call waits between the attempts of the runs"
    );
    assert!(!stepped.due(&provider));
    let next = stepped.next_due(&provider).expect("the runs go on");
    assert!(next > clock::now() + Duration::from_secs(3500));
    group.members[0].set_state(MemberState::Up);
    group.review_serving(clock::now());
    group.member_failed(0, "C_Sign", CKR_DEVICE_ERROR);
    assert!(
        stepped.due(&provider),
        "the last serving member failed again"
    );
    assert_eq!(stepped.round(&provider), [((0, 0), false), ((0, 1), false)]);
}

/// Without a recovery thread (recovery off, or threads forbidden) no
/// attempt is due when the last serving member fails: no call waits for
/// one that would never begin.
#[test]
fn without_a_recovery_thread_no_attempt_is_due() {
    let provider = OneGroup::new(&["a", "b"]);
    let group = &provider.groups[0];
    group.member_failed(0, "C_Sign", CKR_DEVICE_ERROR);
    group.member_failed(1, "C_Sign", CKR_DEVICE_ERROR);
    assert!(group.members.iter().all(|m| !m.expected_back()));
}

/// Between the attempts of a run (no member serving, `reconnAtt` -1), a
/// member whose token was not found is not being brought back, so calls
/// fail at once instead of waiting for its next attempt an
/// `AutoReconnectInterval` later; a member due an attempt at once (the
/// group's last serving member failed) is tried without waiting for it.
#[test]
fn between_attempts_a_member_whose_token_was_not_found_is_not_waited_for_and_one_due_is_tried_at_once(
) {
    let mut provider = OneGroup::new(&["a", "b"]);
    provider.recovery.interval = Duration::from_secs(3600);
    let group = Arc::clone(&provider.groups[0]);
    let shared = Arc::new(Shared::default());
    let wake = Arc::clone(&shared);
    group.set_recovery_wake(Box::new(move || {
        wake.flags().prompt = true;
        wake.wake.notify_all();
    }));
    let attempts = |i: usize| {
        group.members[i]
            .recovery_attempts
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let poll = |what: &str, condition: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !condition() {
            assert!(Instant::now() < deadline, "{what}: not within a minute");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    group.member_failed(0, "C_Sign", CKR_DEVICE_ERROR);
    group.member_failed(1, "C_Sign", CKR_DEVICE_ERROR);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..2)
            .map(|i| {
                let (provider, group, shared) = (&provider, &group, &shared);
                scope.spawn(move || {
                    attempts_while_none_serves(
                        provider,
                        group,
                        i,
                        shared,
                        provider.recovery.interval,
                    )
                })
            })
            .collect();
        // What a call finding no member serving looks at: it fails at once.
        poll("both out of the first attempts, not waited for", &|| {
            (0..2).all(|i| attempts(i) >= 1 && !group.members[i].expected_back())
        });
        let before = attempts(0);
        group.members[1].set_state(MemberState::Up);
        group.review_serving(clock::now());
        group.member_failed(1, "C_Sign", CKR_DEVICE_ERROR);
        poll("the attempt due at once", &|| attempts(0) > before);
        shared.flags().stop_recovery = true;
        shared.wake.notify_all();
        for run in runs {
            assert!(!run.join().expect("the run ends"), "no member serves");
        }
    });
}

/// A provider of one group and no libraries: what the watchdog looks at.
struct OneGroup {
    groups: Vec<Arc<Group>>,
    recovery: RecoverySettings,
}

impl OneGroup {
    fn new(members: &[&str]) -> OneGroup {
        let active: Vec<String> = members.iter().map(|s| s.to_string()).collect();
        let settings = GroupSettings {
            domain_label: "d".into(),
            replay_limit: 0,
            min_replicas: 1,
            member_timeout: Duration::from_secs(1),
        };
        let group = Group::new(0, "g", "1".into(), 0, &active, &[], settings);
        for m in &group.members {
            m.set_state(MemberState::Up);
        }
        OneGroup {
            groups: vec![Arc::new(group)],
            recovery: RecoverySettings {
                attempts: -1,
                interval: Duration::from_secs(1),
                mode: RecoveryMode::default(),
            },
        }
    }
}

impl Host for OneGroup {
    fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }
    fn libraries(&self) -> &[Arc<dyn MemberBackend>] {
        &[]
    }
    fn recovery(&self) -> &RecoverySettings {
        &self.recovery
    }
    fn member_timeout(&self) -> Duration {
        TIMEOUT
    }
    fn threads_allowed(&self) -> bool {
        false
    }
    fn synchronize(&self, _: &Group) -> bool {
        false
    }
    fn reconcile_soon(&self) {}
    fn uses_member_slot(&self, _: &Arc<dyn MemberBackend>, _: CK_SLOT_ID) -> bool {
        false
    }
    fn each_virtual_session(
        &self,
        _: &Arc<Group>,
        _: &mut dyn FnMut(&VirtualSession) -> Result<(), Error>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

#[test]
fn the_watchdog_takes_out_a_member_that_completes_no_call_for_member_timeout() {
    let host = OneGroup::new(&["hung", "b"]);
    let group = &host.groups[0];
    let (clock, mut watchdog) = (ManualClock::new(), Watchdog::default());
    let tick = watchdog_tick(TIMEOUT);
    let stuck = group.members[0].counts.enter();
    let answering = group.members[1].counts.enter();
    watchdog.look(&host, clock.now());
    drop(answering);
    let mut waited = Duration::ZERO;
    while group.members[0].state() == MemberState::Up {
        assert!(
            waited <= TIMEOUT,
            "still up {waited:?} after its call started"
        );
        clock.advance(tick);
        waited += tick;
        drop(group.members[1].counts.enter());
        watchdog.look(&host, clock.now());
    }
    assert_eq!(
        waited, TIMEOUT,
        "taken out one memberTimeout after its call"
    );
    assert_eq!(group.members[0].state(), MemberState::Down);
    assert_eq!(
        group.members[1].state(),
        MemberState::Up,
        "a member that completes its calls stays"
    );
    drop(stuck);
}

#[test]
fn the_watchdog_degrades_a_member_slow_for_a_sustained_period_of_clock_time() {
    use crate::group::{Rotation, DEGRADED_AFTER};
    const MS: u64 = 1_000_000;
    let host = OneGroup::new(&["slow", "b", "c"]);
    let group = &host.groups[0];
    let (clock, mut watchdog) = (ManualClock::new(), Watchdog::default());
    let tick = watchdog_tick(TIMEOUT);
    let slow_since = clock.now();
    while group.members[0].rotation() == Rotation::In {
        assert!(
            clock.now() - slow_since < DEGRADED_AFTER + tick,
            "still in rotation after a sustained slow period"
        );
        group.members[0].record_latency(0, 200 * MS);
        group.members[1].record_latency(0, 2 * MS);
        group.members[2].record_latency(0, 2 * MS);
        watchdog.look(&host, clock.now());
        if group.members[0].rotation() == Rotation::In {
            clock.advance(tick);
        }
    }
    assert!(
        clock.now() - slow_since >= DEGRADED_AFTER,
        "degraded after {:?} slow only",
        clock.now() - slow_since
    );
    assert_eq!(group.members[0].rotation(), Rotation::Degraded);
    assert_eq!(
        group.members[0].state(),
        MemberState::Up,
        "degraded, not down"
    );
}

#[test]
fn the_watchdog_degrades_a_slow_primary_busy_with_searches_within_seconds() {
    use crate::group::{Rotation, DEGRADED_AFTER, MAKING_LANE};
    const MS: u64 = 1_000_000;
    let host = OneGroup::new(&["slow primary", "b", "c"]);
    let group = &host.groups[0];
    let (clock, mut watchdog) = (ManualClock::new(), Watchdog::default());
    let tick = watchdog_tick(TIMEOUT);
    // Digests before it slowed down, as fast as the others'.
    for member in &group.members {
        member.record_latency(3, MS / 100);
        drop(member.counts.enter());
    }
    watchdog.look(&host, clock.now());
    clock.advance(tick);
    // Its first random numbers after it slowed down take 400 ms; from
    // then on the chooser sends it only the searches pinned to the
    // primary (not compared), always in flight, so it is never
    // measured again in turn, while the others answer in 2 ms.
    group.members[0].record_latency(0, 400 * MS);
    let slow_since = clock.now();
    let searching = group.members[0].counts.enter();
    while group.members[0].rotation() == Rotation::In {
        assert!(
            clock.now() - slow_since <= DEGRADED_AFTER + tick,
            "still in rotation {:?} after it was found slow",
            clock.now() - slow_since
        );
        group.members[0].record_latency(MAKING_LANE, 400 * MS);
        drop(group.members[0].counts.enter());
        for other in &group.members[1..] {
            other.record_latency(0, 2 * MS);
            drop(other.counts.enter());
        }
        watchdog.look(&host, clock.now());
        if group.members[0].rotation() == Rotation::In {
            clock.advance(tick);
        }
    }
    assert!(clock.now() - slow_since >= DEGRADED_AFTER);
    assert_eq!(
        group.members[0].state(),
        MemberState::Up,
        "degraded, not down"
    );
    drop(searching);
}
