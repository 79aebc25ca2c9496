use super::*;
use crate::error::luna;

#[test]
fn a_busy_member_is_asked_again_a_bounded_number_of_times() {
    let mut calls = 0;
    let answers = [luna::CKR_BUSY, CKR_OK];
    let rv = retry_while_busy("C_GenerateRandom", luna::CKR_AGAIN, || {
        calls += 1;
        answers[calls - 1]
    });
    assert_eq!((rv, calls), (CKR_OK, 2), "busy, busy, then answered");
    let mut calls = 0;
    let rv = retry_while_busy("C_GenerateRandom", luna::CKR_BUSY, || {
        calls += 1;
        luna::CKR_BUSY
    });
    assert_eq!(rv, luna::CKR_BUSY);
    assert_eq!(calls, BUSY_RETRIES, "asked again only a few times");
    let mut calls = 0;
    let rv = retry_while_busy("C_GenerateRandom", CKR_DATA_INVALID, || {
        calls += 1;
        CKR_OK
    });
    assert_eq!(
        (rv, calls),
        (CKR_DATA_INVALID, 0),
        "only busy answers are retried"
    );
    let mut calls = 0;
    let opened = retry_result_while_busy("C_OpenSession", || {
        calls += 1;
        if calls < 3 {
            Err(Error::new(luna::CKR_AGAIN))
        } else {
            Ok(calls)
        }
    });
    assert_eq!(opened, Ok(3), "a session opened at the third try");
    let mut calls = 0;
    let opened: Result<()> = retry_result_while_busy("C_OpenSession", || {
        calls += 1;
        Err(Error::new(luna::CKR_BUSY))
    });
    assert_eq!(opened, Err(Error::new(luna::CKR_BUSY)));
    assert_eq!(calls, 1 + BUSY_RETRIES);
}

#[test]
fn group_serial_follows_luna_and_fits_the_field() {
    let serial = |members: &[&str]| {
        let members: Vec<String> = members.iter().map(|s| s.to_string()).collect();
        virtual_serial(None, &members)
    };
    assert_eq!(serial(&["154438865287", "1238700701509"]), "1154438865287");
    assert_eq!(serial(&["0123456789abcdef"]), "1123456789abcdef");
    assert_eq!(
        serial(&["1d50ce428a1455a7"]),
        "2d50ce428a1455a7",
        "never the primary's own serial"
    );
    assert_eq!(
        virtual_serial(Some("77"), &["0123456789abcdef".into()]),
        "77"
    );
}

#[test]
fn finalize_drops_queued_key_values() {
    let group = Group::new(
        0,
        "g",
        "1".into(),
        0,
        &["a".into(), "b".into()],
        &[],
        GroupSettings {
            domain_label: "d".into(),
            replay_limit: 0,
            min_replicas: 1,
            member_timeout: Duration::from_secs(1),
        },
    );
    let value = [9u8; 32];
    let template: crate::arguments::Template = [(CKA_VALUE, &value[..])].into_iter().collect();
    let kept = Arc::new(crate::mechanism::OwnedTemplate::copy(&template));
    let watch = Arc::downgrade(&kept);
    assert!(group.queue_unless_up(1, Pending::Import(7, kept)).is_ok());
    assert_eq!(group.pending_count(1), 1);
    group.drop_pending();
    assert_eq!(group.pending_count(1), 0);
    assert!(
        watch.upgrade().is_none(),
        "the copy of the key value is gone"
    );
}

#[test]
fn limits_take_the_smallest_finite_value() {
    assert_eq!(combine_limit([0, 10, 5].into_iter()), 5);
    assert_eq!(combine_limit([CK_EFFECTIVELY_INFINITE].into_iter()), 0);
    assert_eq!(
        combine_amount([CK_UNAVAILABLE_INFORMATION, 9].into_iter()),
        9
    );
}

#[test]
fn least_busy_first_and_ties_rotate() {
    let settings = GroupSettings {
        domain_label: "d".into(),
        replay_limit: 0,
        min_replicas: 1,
        member_timeout: Duration::from_secs(1),
    };
    let group = Group::new(
        0,
        "g",
        "1".into(),
        0,
        &["a".into(), "b".into()],
        &["c".into()],
        settings,
    );
    for m in &group.members {
        m.set_state(MemberState::Up);
    }
    let busy = group.members[0].counts.enter();
    assert_eq!(
        group.by_preference(0).to_vec(),
        vec![1, 0],
        "standby serves nothing while active are up"
    );
    drop(busy);
    let firsts: Vec<usize> = (0..4).map(|_| group.by_preference(0)[0]).collect();
    assert!(
        firsts.contains(&0) && firsts.contains(&1),
        "ties rotate: {firsts:?}"
    );
    group.members[0].set_state(MemberState::Down);
    group.members[1].set_state(MemberState::Down);
    assert_eq!(
        group.by_preference(0).to_vec(),
        vec![2],
        "standby takes over"
    );
}

fn group_of(active: &[&str]) -> Group {
    let active: Vec<String> = active.iter().map(|s| s.to_string()).collect();
    let group = Group::new(
        0,
        "g",
        "1".into(),
        0,
        &active,
        &[],
        GroupSettings {
            domain_label: "d".into(),
            replay_limit: 0,
            min_replicas: 1,
            member_timeout: Duration::from_secs(1),
        },
    );
    for m in &group.members {
        m.set_state(MemberState::Up);
    }
    group
}

const MS: u64 = 1_000_000;

/// `least_busy`'s one-pass choice must be `by_preference`'s first, turn
/// for turn: with members idle and busy, fast and slow, unmeasured,
/// down, and on exploring turns.
#[test]
fn the_fast_choice_is_always_by_preferences_first() {
    for size in 2..=5 {
        let names: Vec<String> = (0..size).map(|i| i.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let group = group_of(&names);
        let mut busy = Vec::new();
        for case in 0..64usize {
            let m = &group.members[case % size];
            match case % 4 {
                0 => m.record_latency(0, (1 + case as u64 % 7) * MS),
                1 => busy.push(m.counts.enter()),
                2 if case % 3 == 0 => busy.clear(),
                _ => m.record_latency(0, 3 * MS),
            }
            let down = (case % 11 == 0).then(|| &group.members[(case / 11) % size]);
            if let Some(d) = down {
                d.set_state(MemberState::Down);
            }
            for _ in 0..EXPLORE_EVERY + 1 {
                let fast = group.least_busy(0);
                group.round_robin[0].fetch_sub(1, Ordering::Relaxed);
                let listed = group.by_preference(0).first().copied();
                assert_eq!(fast, listed, "{size} members, case {case}");
            }
            if let Some(d) = down {
                d.set_state(MemberState::Up);
            }
        }
    }
}

#[test]
fn a_slower_member_gets_calls_only_once_the_faster_one_is_that_much_busier() {
    let group = group_of(&["a", "b"]);
    group.members[0].record_latency(0, MS);
    group.members[1].record_latency(0, 4 * MS);
    assert_eq!(group.by_preference(0).to_vec(), vec![0, 1]);
    let mut busy = Vec::new();
    for in_flight in 1..=2 {
        busy.push(group.members[0].counts.enter());
        for _ in 0..2 {
            assert_eq!(group.least_busy(0), Some(0), "{in_flight} in flight");
        }
    }
    busy.push(group.members[0].counts.enter());
    let firsts: Vec<usize> = (0..4).map(|_| group.by_preference(0)[0]).collect();
    assert!(
        firsts.contains(&0) && firsts.contains(&1),
        "3 in flight on a member 4x faster: a tie, {firsts:?}"
    );
    busy.push(group.members[0].counts.enter());
    assert_eq!(
        group.by_preference(0).to_vec(),
        vec![1, 0],
        "4 in flight on the fast member: the 4x slower one finishes sooner"
    );
    assert_eq!(
        group.by_preference(3)[0],
        1,
        "a lane without latencies of its own goes by calls in flight alone"
    );
    drop(busy);
}

#[test]
fn members_of_about_equal_latency_share_the_calls() {
    let group = group_of(&["a", "b"]);
    group.members[0].record_latency(0, 10 * MS);
    group.members[1].record_latency(0, 12 * MS);
    let firsts: Vec<usize> = (0..4).map(|_| group.by_preference(0)[0]).collect();
    assert!(firsts.contains(&0) && firsts.contains(&1), "{firsts:?}");
}

#[test]
fn searches_and_object_making_skip_a_degraded_primary() {
    let group = group_of(&["primary", "b", "c"]);
    assert_eq!(group.by_position().to_vec(), vec![0, 1, 2]);
    group.members[0]
        .rotation
        .store(Rotation::Degraded as u8, Ordering::Relaxed);
    assert_eq!(
        group.by_position().to_vec(),
        vec![1, 2, 0],
        "the degraded primary comes last"
    );
}

#[test]
fn the_degraded_rule() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(
        judge_latency(2 * MS, Some(2 * MS), false, None, t0),
        Verdict::Serve
    );
    assert_eq!(
        judge_latency(200 * MS, Some(2 * MS), false, None, t0),
        Verdict::SlowSince(t0),
        "slow, but not for long yet"
    );
    assert_eq!(
        judge_latency(200 * MS, Some(2 * MS), false, Some(t0), at(1)),
        Verdict::SlowSince(t0)
    );
    assert_eq!(
        judge_latency(200 * MS, Some(2 * MS), false, Some(t0), at(2)),
        Verdict::Degrade,
        "slow for DEGRADED_AFTER"
    );
    assert_eq!(
        judge_latency(10 * MS, Some(2 * MS), false, Some(t0), at(9)),
        Verdict::Serve,
        "5x slower is not far slower"
    );
    assert_eq!(
        judge_latency(400_000, Some(20_000), false, Some(t0), at(9)),
        Verdict::Serve,
        "20x slower by less than the margin: in-process noise"
    );
    assert_eq!(
        judge_latency(200 * MS, None, false, Some(t0), at(9)),
        Verdict::Serve,
        "no other member to compare with"
    );
    assert_eq!(
        judge_latency(200 * MS, Some(2 * MS), true, None, at(9)),
        Verdict::Probe
    );
    assert_eq!(
        judge_latency(7 * MS, Some(2 * MS), true, None, at(9)),
        Verdict::Recover,
        "a probe within the recovered ratio"
    );
    assert_eq!(
        judge_latency(200 * MS, None, true, None, at(9)),
        Verdict::Recover,
        "the only member left serves"
    );
}

/// One round of calls in lane 0 of a group of three: member 0's take
/// `latency`, the others' 2 ms.
fn calls_with_member_0_taking(group: &Group, latency: u64) {
    group.members[0].record_latency(0, latency);
    group.members[1].record_latency(0, 2 * MS);
    group.members[2].record_latency(0, 2 * MS);
}

#[test]
fn a_member_degraded_again_soon_after_its_return_is_held_out_longer_each_time() {
    let t0 = Instant::now();
    let mut hold = DegradedHold::default();
    let mut at = t0;
    let mut holds = Vec::new();
    for _ in 0..8 {
        let held = hold.degrade(at);
        assert!(!held.is_zero() || hold.may_return(at));
        assert!(held.is_zero() || !hold.may_return(at + held - Duration::from_millis(1)));
        assert!(hold.may_return(at + held));
        holds.push(held.as_secs());
        at += held + Duration::from_secs(3);
        hold.returned(at);
        at += Duration::from_secs(3);
    }
    assert_eq!(holds, [0, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(
        hold.degrade(at + DEGRADED_AGAIN_WITHIN),
        Duration::ZERO,
        "degraded again long after its return: as the first time"
    );
}

#[test]
fn the_watchdog_holds_a_member_degraded_again_soon_after_its_return_out_of_rotation() {
    let group = group_of(&["slow under load", "b", "c"]);
    let review = |at: Instant, latency: u64| {
        calls_with_member_0_taking(&group, latency);
        group.review_latency(at);
        group.members[0].rotation()
    };
    let t0 = Instant::now();
    let second = |s: u64| t0 + Duration::from_secs(s);
    // Slow in rotation for DEGRADED_AFTER, fast on its first probe.
    assert_eq!(review(second(0), 200 * MS), Rotation::In);
    assert_eq!(review(second(2), 200 * MS), Rotation::Degraded);
    assert_eq!(review(second(3), 3 * MS), Rotation::In, "back at once");
    // Slow again as soon as it is back: held out for DEGRADED_AFTER.
    assert_eq!(review(second(4), 200 * MS), Rotation::In);
    assert_eq!(review(second(6), 200 * MS), Rotation::Degraded);
    assert_eq!(
        review(second(7), 3 * MS),
        Rotation::Degraded,
        "a fast probe within its hold"
    );
    assert_eq!(
        review(second(8), 3 * MS),
        Rotation::In,
        "back once held 2 s"
    );
    // Again: held twice as long.
    assert_eq!(review(second(9), 200 * MS), Rotation::In);
    assert_eq!(review(second(11), 200 * MS), Rotation::Degraded);
    assert_eq!(review(second(14), 3 * MS), Rotation::Degraded);
    assert_eq!(
        review(second(15), 3 * MS),
        Rotation::In,
        "back once held 4 s"
    );
}

#[test]
fn a_degraded_member_leaves_the_rotation_is_probed_and_returns() {
    let group = group_of(&["slow", "b", "c"]);
    // Calls keep coming: each review sees new samples.
    let calls = |slow: u64| calls_with_member_0_taking(&group, slow);
    let t0 = Instant::now();
    for second in 0..2 {
        calls(200 * MS);
        group.review_latency(t0 + Duration::from_secs(second));
    }
    assert_eq!(group.members[0].rotation(), Rotation::In, "not yet");
    group.review_latency(t0 + DEGRADED_AFTER);
    assert_eq!(
        group.members[0].rotation(),
        Rotation::In,
        "no new figures: not judged"
    );
    calls(200 * MS);
    group.review_latency(t0 + DEGRADED_AFTER);
    assert_eq!(group.members[0].rotation(), Rotation::Degraded);
    let mut busy = Vec::new();
    for _ in 0..8 {
        busy.push(group.members[1].counts.enter());
        busy.push(group.members[2].counts.enter());
    }
    assert_eq!(
        group.by_preference(0).last(),
        Some(&0),
        "however busy the others are, a degraded member comes last"
    );
    calls(200 * MS);
    group.review_latency(t0 + DEGRADED_AFTER + Duration::from_secs(1));
    assert_eq!(
        group.members[0].rotation(),
        Rotation::Degraded,
        "a probe as slow as before"
    );
    drop(busy);
    calls(3 * MS);
    group.review_latency(t0 + DEGRADED_AFTER + Duration::from_secs(2));
    assert_eq!(
        group.members[0].rotation(),
        Rotation::In,
        "the probe found it close to the others"
    );
    for m in &group.members[1..] {
        m.set_state(MemberState::Down);
    }
    for second in 10..20 {
        calls(200 * MS);
        group.review_latency(t0 + Duration::from_secs(second));
    }
    assert_eq!(
        group.by_preference(0).to_vec(),
        vec![0],
        "the only serving member is never degraded"
    );
}

#[test]
fn a_member_slow_once_is_measured_again_in_turn() {
    let group = group_of(&["hiccup", "b"]);
    group.members[0].record_latency(0, 50 * MS);
    group.members[1].record_latency(0, MS);
    let firsts: Vec<usize> = (0..2 * EXPLORE_EVERY)
        .map(|_| group.by_preference(0)[0])
        .collect();
    assert_eq!(
        firsts.iter().filter(|&&p| p == 0).count(),
        1,
        "one choice in {EXPLORE_EVERY} per member in turn: {firsts:?}"
    );
    let stalled = group.members[0].counts.enter();
    let firsts: Vec<usize> = (0..2 * EXPLORE_EVERY)
        .map(|_| group.by_preference(0)[0])
        .collect();
    assert!(
        !firsts.contains(&0),
        "a member with a call in flight is not explored: {firsts:?}"
    );
    drop(stalled);
}

#[test]
fn a_member_found_slow_then_busy_only_with_searches_is_degraded_on_its_latest_figures() {
    let group = group_of(&["slow primary", "b", "c"]);
    let t0 = Instant::now() + Duration::from_secs(1);
    // Figures of another kind from before it slowed down, as fast as
    // the others': old, they say nothing about now.
    for member in &group.members {
        member.record_latency(3, MS / 100);
    }
    group.review_latency(t0 - Duration::from_secs(1));
    group.members[0].record_latency(0, 200 * MS);
    group.members[1].record_latency(0, 2 * MS);
    group.members[2].record_latency(0, 2 * MS);
    group.review_latency(t0);
    // From now on the chooser sends it searches only, which are not
    // compared, while the others keep answering in lane 0.
    for second in 1..=2 {
        group.members[0].record_latency(MAKING_LANE, 400 * MS);
        group.members[1].record_latency(0, 2 * MS);
        group.review_latency(t0 + Duration::from_secs(second));
    }
    assert_eq!(
        group.members[0].rotation(),
        Rotation::Degraded,
        "slow for {DEGRADED_AFTER:?} with nothing newer to say otherwise"
    );
}

#[test]
fn a_member_busy_only_with_searches_and_never_found_slow_stays_in_rotation() {
    let group = group_of(&["primary", "b"]);
    let t0 = Instant::now();
    group.members[0].record_latency(0, 2 * MS);
    group.members[1].record_latency(0, 2 * MS);
    group.review_latency(t0);
    for second in 1..=5 {
        group.members[0].record_latency(MAKING_LANE, 400 * MS);
        group.review_latency(t0 + Duration::from_secs(second));
    }
    assert_eq!(group.members[0].rotation(), Rotation::In);
}

#[test]
fn figures_with_nothing_to_compare_leave_the_slow_timer_running() {
    let group = group_of(&["slow", "b"]);
    let t0 = Instant::now();
    group.members[0].record_latency(0, 200 * MS);
    group.members[1].record_latency(0, 2 * MS);
    group.review_latency(t0);
    group.members[0].record_latency(MAKING_LANE, 200 * MS);
    group.review_latency(t0 + Duration::from_secs(1));
    group.members[0].record_latency(0, 200 * MS);
    group.review_latency(t0 + DEGRADED_AFTER);
    assert_eq!(
        group.members[0].rotation(),
        Rotation::Degraded,
        "a search's figure (object-making lane, not compared) did not restart the timer"
    );
}

/// Changes kept for a serving member are tried again unasked one second
/// after they are first seen, then after two, four... up to 30 s; not
/// while the application is logged out (its login replays them), and
/// from one second again once a replay made some.
/// A search with every serving member lacking something runs where
/// nothing this process made is missing: a member only not yet compared
/// with the group comes before a primary still owed kept changes (the
/// soak's search went to that primary and found 1 of 2 objects).
#[test]
fn a_search_prefers_a_member_owed_nothing_over_a_primary_catching_up() {
    let group = group_of(&["primary", "b", "c"]);
    assert_eq!(
        group.complete_first(group.by_position()).to_vec(),
        vec![0, 1, 2]
    );
    group.defer(
        0,
        Pending::Destroy {
            print: vec![(CKA_LABEL, b"x".to_vec())],
            object: None,
        },
    );
    group.set_compared(1, false);
    assert_eq!(
        group.complete_first(group.by_position()).to_vec(),
        vec![2, 1, 0],
        "complete, then only not compared, then owed changes"
    );
    group.set_compared(2, false);
    assert_eq!(
        group.complete_first(group.by_position()).to_vec(),
        vec![1, 2, 0],
        "both only not compared: configured order"
    );
    assert_eq!(group.search_home(), Some(1));
}

#[test]
fn changes_kept_for_serving_members_are_retried_unasked_less_and_less_often() {
    let group = group_of(&["a", "b"]);
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    assert!(!group.kept_retry_due(at(0)), "nothing kept");
    group.defer(
        1,
        Pending::Destroy {
            print: vec![(CKA_LABEL, b"x".to_vec())],
            object: None,
        },
    );
    assert!(
        !group.kept_retry_due(at(0)),
        "logged out: the login replays it"
    );
    group.cache_login(CKU_USER, None);
    assert!(!group.kept_retry_due(at(0)), "first seen: due in a second");
    assert!(!group.kept_retry_due(at(999)));
    assert!(group.kept_retry_due(at(1000)));
    assert!(!group.kept_retry_due(at(1000)), "then due in two seconds");
    assert!(!group.kept_retry_due(at(2999)));
    assert!(group.kept_retry_due(at(3000)));
    let mut now = 3000;
    for wait in [4000, 8000, 16000, 30000, 30000] {
        assert!(!group.kept_retry_due(at(now)), "armed at {now} ms");
        assert!(!group.kept_retry_due(at(now + wait - 1)));
        now += wait;
        assert!(group.kept_retry_due(at(now)), "due {wait} ms later");
    }
    group.kept_changes_made();
    assert!(!group.kept_retry_due(at(now)));
    assert!(
        group.kept_retry_due(at(now + 1000)),
        "a replay made some: a second again"
    );
    let replaying = group.replaying_deferred();
    assert!(
        group.replaying_deferred_if_idle().is_none(),
        "an unasked retry does not queue behind a replay"
    );
    assert!(
        !group.kept_retry_due(at(now + 60_000)),
        "a replay runs: the wait counts from its end"
    );
    drop(replaying);
    assert!(!group.kept_retry_due(at(now + 61_999)));
    assert!(group.kept_retry_due(at(now + 62_000)), "two seconds after");
    group.members[1].set_state(MemberState::Down);
    assert!(
        !group.kept_retry_due(at(now + 120_000)),
        "kept for a member that is out: its return replays them"
    );
}

/// A change kept again goes behind what is kept for its member with every
/// later change of its object, in their order, those in the replay's share
/// taken out of it: moved alone behind a newer change of attributes, an
/// older one undid it (simulation seeds 1016443, 2011372).
#[test]
fn a_change_kept_again_takes_the_later_changes_of_its_object_behind_it() {
    let group = group_of(&["a", "b"]);
    let set = |object, id: &[u8]| {
        let template: crate::arguments::Template = [(CKA_ID, id)].into_iter().collect();
        Pending::Set {
            object,
            before: Vec::new(),
            changes: Arc::new(crate::mechanism::OwnedTemplate::copy(&template)),
        }
    };
    let id_of = |change: &Pending| match change {
        Pending::Set { changes, .. } => {
            changes.template().as_slice().map_or(0, |a| a[0].ulValueLen)
        }
        _ => 0,
    };
    for change in [
        Pending::Create(1),
        set(1, b"a"),
        Pending::Create(2),
        set(1, b"bb"),
    ] {
        group.defer(1, change);
    }
    let mut left = 3;
    let first = group.next_deferred(1, &mut left, &[]).expect("a change");
    assert_eq!(first.made_object(), Some(1));
    group.deferred_handled(1, 1);
    assert_eq!(
        group.defer_again(1, first, &mut left),
        3,
        "it and two later"
    );
    assert_eq!(left, 1, "the share keeps the other object's copy alone");
    let mut order = Vec::new();
    let mut all = usize::MAX;
    while let Some(change) = group.next_deferred(1, &mut all, &[]) {
        order.push((change.made_object(), id_of(&change)));
        group.deferred_handled(1, 1);
    }
    assert_eq!(
        order,
        [(Some(2), 0), (Some(1), 0), (Some(1), 1), (Some(1), 2)],
        "the other object's copy, then the object's copy and changes in order"
    );
}
