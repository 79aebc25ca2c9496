//! `status`: the monitoring contract. Each member is probed now from this
//! process (its library loaded, a session opened), its pending changes are
//! the objects it lacks that another member has, and its failures and last
//! state change come from the HA log. The exit status sums it up: 0 every
//! member serving, 1 a group degraded, 2 a group without a serving member
//! or no usable configuration. Calls served live only inside each
//! application's process: each running application publishes them in the
//! state directory (`pkcs11_ha::published`), and they are summed here over
//! the applications running now; a member that answers the probe but is
//! out in a running application makes its group degraded.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

use pkcs11_ha::config::GroupConfig;
use pkcs11_ha::published::ProcessStatus;
use serde_json::{json, Value};

use crate::cli::{StatusArgs, StatusFormat};
use crate::groups::{find_group, views};
use crate::logread::{self, Event};
use crate::output::table;
use crate::p11::Members;
use crate::sync;
use crate::{Ctx, Res};

/// What a group's state means to monitoring, and its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Health {
    Serving = 0,
    Degraded = 1,
    Down = 2,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Serving => "serving",
            Health::Degraded => "degraded",
            Health::Down => "down",
        }
    }
}

struct Member {
    serial: String,
    role: &'static str,
    up: bool,
    /// Serves calls now: an active member that is up, or a standby member
    /// while no active member is.
    serving: bool,
    /// Objects it lacks; `None` when it could not be compared.
    pending: Option<usize>,
    note: Option<String>,
    failures: usize,
    /// Seconds since its last failure or recovery in the HA log.
    since_change: Option<u64>,
    /// Running applications that use its group and publish their state.
    applications: usize,
    /// Calls it served, summed over those applications (`None`: none runs).
    calls_served: Option<u64>,
    /// Those applications in which it is out of rotation now.
    out_in: usize,
}

struct Group {
    label: String,
    serial: String,
    health: Health,
    reasons: Vec<String>,
    members: Vec<Member>,
}

/// Seconds from a log timestamp (`2026-12-03T07:15:30.123Z`) to `now`.
fn age(stamp: &str, now: SystemTime) -> Option<u64> {
    let field = |range: std::ops::Range<usize>| stamp.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hh, mm, ss) = (field(11..13)?, field(14..16)?, field(17..19)?);
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let then = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let now = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64;
    u64::try_from(now - then).ok()
}

fn group_health(
    members: &Members,
    group: &GroupConfig,
    pin: Option<&[u8]>,
    log: &[Event],
    applications: &[ProcessStatus],
    now: SystemTime,
) -> Res<Group> {
    let serial = pkcs11_ha::group::virtual_serial(
        group.serial.as_deref(),
        &[group.members.clone(), group.standby.clone()].concat(),
    );
    let seen_by: Vec<&pkcs11_ha::published::GroupStatus> = applications
        .iter()
        .flat_map(|a| &a.groups)
        .filter(|g| g.serial == serial)
        .collect();
    let (views, statuses) = views(members, group, pin)?;
    let plan = sync::plan(&views, &sync::deletions(members, group));
    let any_active_up = statuses
        .iter()
        .any(|s| s.role == "active" && s.token.is_some());
    let mut out = Vec::new();
    for status in statuses {
        let view = views.iter().position(|v| v.serial == status.serial);
        let up = status.token.is_some();
        let events: Vec<&Event> = log
            .iter()
            .filter(|e| e.group.eq_ignore_ascii_case(&group.label))
            .filter(|e| e.member.as_deref() == Some(status.serial.as_str()))
            .collect();
        let seen: Vec<&pkcs11_ha::published::MemberStatus> = seen_by
            .iter()
            .flat_map(|g| &g.members)
            .filter(|m| m.serial == status.serial)
            .collect();
        out.push(Member {
            applications: seen.len(),
            calls_served: (!seen.is_empty()).then(|| seen.iter().map(|m| m.calls_served).sum()),
            out_in: seen.iter().filter(|m| m.state != "up").count(),
            serving: up && (status.role == "active" || !any_active_up),
            pending: view.map(|v| plan.copies.iter().filter(|c| c.to == v).count()),
            failures: events.iter().filter(|e| e.is_failure()).count(),
            since_change: events
                .iter()
                .rev()
                .find(|e| e.is_state_change())
                .and_then(|e| age(&e.time, now)),
            serial: status.serial,
            role: status.role,
            up,
            note: status.note,
        });
    }
    let mut reasons = Vec::new();
    let down: Vec<&str> = out
        .iter()
        .filter(|m| !m.up)
        .map(|m| m.serial.as_str())
        .collect();
    if !down.is_empty() {
        reasons.push(format!("member(s) down: {}", down.join(", ")));
    }
    for member in out.iter().filter(|m| m.up && m.out_in > 0) {
        reasons.push(format!(
            "member {} answers but is out of rotation in {} of {} running application(s); \
             they take it back at their next recovery attempt (see `pkcs11-ha log --member {}`)",
            member.serial, member.out_in, member.applications, member.serial
        ));
    }
    if !any_active_up && out.iter().any(|m| m.serving) {
        reasons.push("no active member is up: a standby member serves".into());
    }
    let pending: usize = out.iter().filter_map(|m| m.pending).sum();
    if pending > 0 {
        reasons.push(format!(
            "{pending} pending change(s): run `pkcs11-ha group sync --group {}`",
            group.label
        ));
    }
    let health = if !out.iter().any(|m| m.serving) {
        reasons.insert(0, "no member serves".into());
        Health::Down
    } else if reasons.is_empty() {
        Health::Serving
    } else {
        Health::Degraded
    };
    Ok(Group {
        label: group.label.clone(),
        serial,
        health,
        reasons,
        members: out,
    })
}

fn gather(ctx: &Ctx, args: &StatusArgs) -> Res<Vec<Group>> {
    let config = ctx.load()?;
    let groups: Vec<&GroupConfig> = match &args.group {
        Some(label) => vec![find_group(&config, label)?],
        None => config.groups.iter().collect(),
    };
    if groups.is_empty() {
        return Err(
            "no HA group is configured, so nothing can serve; create one with `pkcs11-ha group \
             create`"
                .into(),
        );
    }
    let pin = if args.pin.given() {
        Some(args.pin.source().read("", false)?)
    } else {
        None
    };
    let log = config
        .ha_log
        .path
        .as_deref()
        .map(logread::events)
        .unwrap_or_default();
    let members = Members::open(&config);
    let now = SystemTime::now();
    let applications = config
        .state_dir
        .clone()
        .or_else(pkcs11_ha::state_dir::default_path)
        .map(|dir| pkcs11_ha::published::read_live(&dir, now))
        .unwrap_or_default();
    let groups = groups
        .into_iter()
        .map(|g| {
            let pin = pin.as_deref().map(|p| &p[..]);
            group_health(&members, g, pin, &log, &applications, now)
        })
        .collect::<Res<Vec<_>>>()?;
    Ok(groups)
}

pub fn status(ctx: &Ctx, args: &StatusArgs) -> ExitCode {
    let format = match (args.format, ctx.json) {
        (Some(format), _) => format,
        (None, true) => StatusFormat::Json,
        (None, false) => StatusFormat::Text,
    };
    match gather(ctx, args) {
        Ok(groups) => {
            match format {
                StatusFormat::Text => print_text(&groups),
                StatusFormat::Json => print!("{}", json_text(&groups)),
                StatusFormat::Prometheus => print!("{}", prometheus(Some(&groups))),
            }
            let worst = groups
                .iter()
                .map(|g| g.health)
                .max()
                .unwrap_or(Health::Down);
            ExitCode::from(worst as u8)
        }
        Err(problem) => {
            eprintln!("pkcs11-ha: error: {problem}");
            match format {
                StatusFormat::Text => {}
                StatusFormat::Json => {
                    let value = json!({ "ok": false, "state": "down", "error": problem });
                    println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
                }
                StatusFormat::Prometheus => print!("{}", prometheus(None)),
            }
            ExitCode::from(Health::Down as u8)
        }
    }
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or("-".to_owned(), |v| v.to_string())
}

fn print_text(groups: &[Group]) {
    for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let why = if group.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", group.reasons.join("; "))
        };
        println!(
            "Group {} ({}): {}{why}",
            group.label,
            group.serial,
            group.health.name()
        );
        let rows: Vec<Vec<String>> = group
            .members
            .iter()
            .map(|m| {
                let mut state = match (m.up, m.serving) {
                    (true, true) => "serving",
                    (true, false) => "up",
                    (false, _) => "down",
                }
                .to_owned();
                if let Some(note) = &m.note {
                    state = format!("{state} ({note})");
                }
                vec![
                    m.serial.clone(),
                    m.role.to_owned(),
                    state,
                    or_dash(m.pending),
                    m.failures.to_string(),
                    or_dash(m.since_change.map(|s| format!("{s} s ago"))),
                    or_dash(m.calls_served),
                ]
            })
            .collect();
        println!(
            "{}",
            table(
                &[
                    "Member S/N",
                    "Role",
                    "State",
                    "Pending",
                    "Failures",
                    "Last change",
                    "Calls served"
                ],
                &rows
            )
        );
    }
}

fn group_json(group: &Group) -> Value {
    json!({
        "label": group.label,
        "serial": group.serial,
        "state": group.health.name(),
        "reasons": group.reasons,
        "members": group.members.iter().map(|m| json!({
            "serial": m.serial,
            "role": m.role,
            "up": m.up,
            "serving": m.serving,
            "pending_changes": m.pending,
            "failures": m.failures,
            "seconds_since_state_change": m.since_change,
            "applications": m.applications,
            "calls_served": m.calls_served,
            "out_of_rotation_in_applications": m.out_in,
            "note": m.note,
        })).collect::<Vec<_>>(),
    })
}

fn json_text(groups: &[Group]) -> String {
    let worst = groups
        .iter()
        .map(|g| g.health)
        .max()
        .unwrap_or(Health::Down);
    let value = json!({
        "ok": worst == Health::Serving,
        "state": worst.name(),
        "groups": groups.iter().map(group_json).collect::<Vec<_>>(),
    });
    format!("{}\n", serde_json::to_string_pretty(&value).expect("JSON"))
}

/// A Prometheus label value: backslash, quote and line end escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition format; `None` when the configuration
/// is unusable (only `pkcs11_ha_config_usable 0` then).
fn prometheus(groups: Option<&[Group]>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "pkcs11_ha_config_usable",
        "gauge",
        "1 when the configuration could be read and has a group to report.",
        vec![(String::new(), u8::from(groups.is_some()).to_string())],
    );
    let Some(groups) = groups else {
        return out;
    };
    let group_labels = |g: &Group| {
        format!(
            "{{group=\"{}\",serial=\"{}\"}}",
            label(&g.label),
            label(&g.serial)
        )
    };
    let member_samples = |value: &dyn Fn(&Member) -> Option<String>| {
        groups
            .iter()
            .flat_map(|g| {
                g.members.iter().filter_map(move |m| {
                    value(m).map(|v| {
                        (
                            format!(
                                "{{group=\"{}\",member=\"{}\",role=\"{}\"}}",
                                label(&g.label),
                                label(&m.serial),
                                m.role
                            ),
                            v,
                        )
                    })
                })
            })
            .collect::<Vec<_>>()
    };
    metric(
        "pkcs11_ha_group_state",
        "gauge",
        "0 every member serving, 1 degraded (member down, standby serving, pending changes), 2 no member serves.",
        groups
            .iter()
            .map(|g| (group_labels(g), (g.health as u8).to_string()))
            .collect(),
    );
    metric(
        "pkcs11_ha_member_up",
        "gauge",
        "1 when the member answered a probe from pkcs11-ha status.",
        member_samples(&|m| Some(u8::from(m.up).to_string())),
    );
    metric(
        "pkcs11_ha_member_serving",
        "gauge",
        "1 when the member takes calls: an active member that is up, or a standby member while no active member is.",
        member_samples(&|m| Some(u8::from(m.serving).to_string())),
    );
    metric(
        "pkcs11_ha_member_standby",
        "gauge",
        "1 for a standby member, 0 for an active one.",
        member_samples(&|m| Some(u8::from(m.role == "standby").to_string())),
    );
    metric(
        "pkcs11_ha_member_pending_changes",
        "gauge",
        "Objects another member has that this member lacks (absent while it is down).",
        member_samples(&|m| m.pending.map(|p| p.to_string())),
    );
    metric(
        "pkcs11_ha_member_failures_total",
        "counter",
        "Times the member left the rotation, from the HA log (0 without one).",
        member_samples(&|m| Some(m.failures.to_string())),
    );
    metric(
        "pkcs11_ha_member_seconds_since_state_change",
        "gauge",
        "Seconds since the member's last failure or recovery in the HA log (absent without one).",
        member_samples(&|m| m.since_change.map(|s| s.to_string())),
    );
    metric(
        "pkcs11_ha_member_calls_served_total",
        "counter",
        "Calls the member served, summed over the running applications that publish their state (absent when none runs); it falls when one of them exits.",
        member_samples(&|m| m.calls_served.map(|c| c.to_string())),
    );
    metric(
        "pkcs11_ha_member_applications",
        "gauge",
        "Running applications using the member's group that publish their state.",
        member_samples(&|m| Some(m.applications.to_string())),
    );
    metric(
        "pkcs11_ha_member_out_in_applications",
        "gauge",
        "Running applications in which the member is out of rotation now.",
        member_samples(&|m| Some(m.out_in.to_string())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ages_invert_the_log_timestamps() {
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let stamp = pkcs11_ha::halog::utc_timestamp(then);
        assert_eq!(age(&stamp, then + Duration::from_secs(42)), Some(42));
        assert_eq!(
            age(
                "2000-02-29T00:00:00.000Z",
                SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)
            ),
            Some(0)
        );
        assert_eq!(age("garbage", then), None);
    }

    #[test]
    fn prometheus_labels_are_escaped_and_unusable_configs_say_so() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let text = prometheus(None);
        assert!(text.contains("\npkcs11_ha_config_usable 0\n"), "{text}");
        assert!(!text.contains("pkcs11_ha_member_up"));
    }
}
