//! The prerequisite checks of `group create` and `group add-member`, after
//! Luna's list: the Crypto Officer PIN logs in, the domain key is there with
//! the group's check value (or will be provisioned), token flags and login
//! requirements match, the mechanisms the group advertises are all there,
//! the token is in no group yet, is not a Luna HA virtual slot, and keys
//! can move between it and every member. Each check is reported pass or fail
//! with its reason before anything changes.

use cryptoki_sys::*;
use serde::Serialize;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// Failed, but skipped with `--force` because it is safe to skip.
    Skipped,
    /// Not run because an earlier check failed.
    #[serde(rename = "not run")]
    NotRun,
    /// Worth knowing, but no reason to refuse.
    Warn,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub result: Outcome,
    pub detail: String,
}

/// The checks `--force` may skip: a group works with such a member, it
/// only advertises less (the virtual token's flags and mechanism list
/// combine the members': capabilities ANDed, the list intersected); and a
/// new primary that carries an old group's domain key, when the operator
/// says that group is gone.
/// A member with no way to move keys to some member still serves
/// imported keys and public objects; only making keys fails (with a line
/// saying why).
pub const SKIPPABLE: [&str; 4] = [FLAGS, MECHANISMS, OTHER_GROUP, KEY_TRANSPORT];

pub const MEMBERSHIP: &str = "membership";
pub const LOGIN: &str = "login";
pub const DOMAIN: &str = "domain key";
pub const SO_LOGIN: &str = "SO login";
pub const FLAGS: &str = "token flags";
pub const MECHANISMS: &str = "mechanisms";
pub const OBJECTS: &str = "objects";
pub const OTHER_GROUP: &str = "other group";
pub const HA_SLOT: &str = "not an HA slot";
pub const KEY_TRANSPORT: &str = "key transport";
pub const REPLICATION: &str = "replication";

impl Check {
    pub fn pass(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Pass,
            detail: detail.into(),
        }
    }

    /// A failure; skipped instead when `force` and the check may be skipped.
    pub fn fail(check: &'static str, detail: impl Into<String>, force: bool) -> Check {
        let mut detail = detail.into();
        let result = if force && SKIPPABLE.contains(&check) {
            detail.push_str(" -- skipped with --force");
            Outcome::Skipped
        } else {
            Outcome::Fail
        };
        Check {
            check,
            result,
            detail,
        }
    }

    pub fn warn(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            result: Outcome::Warn,
            detail: detail.into(),
        }
    }

    pub fn not_run(check: &'static str, why: &str) -> Check {
        Check {
            check,
            result: Outcome::NotRun,
            detail: why.to_owned(),
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.result, Outcome::Fail | Outcome::NotRun)
    }

    /// `[pass] login: ...` for the terminal.
    pub fn line(&self) -> String {
        let tag = match self.result {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skipped => "SKIP",
            Outcome::NotRun => "----",
            Outcome::Warn => "WARN",
        };
        format!("  [{tag}] {}: {}", self.check, self.detail)
    }
}

/// The mechanisms every one of `group` has (the group advertises their
/// intersection) that `new` lacks, sorted.
pub fn missing_mechanisms(
    group: &[Vec<CK_MECHANISM_TYPE>],
    new: &[CK_MECHANISM_TYPE],
) -> Vec<CK_MECHANISM_TYPE> {
    let Some((first, rest)) = group.split_first() else {
        return Vec::new();
    };
    let mut missing: Vec<CK_MECHANISM_TYPE> = first
        .iter()
        .copied()
        .filter(|m| rest.iter().all(|other| other.contains(m)))
        .filter(|m| !new.contains(m))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// Flags that say how a token is logged in to: they must be the same on
/// every member, or one login cannot serve the group.
const LOGIN_FLAGS: [(CK_FLAGS, &str); 2] = [
    (CKF_LOGIN_REQUIRED, "CKF_LOGIN_REQUIRED"),
    (
        CKF_PROTECTED_AUTHENTICATION_PATH,
        "CKF_PROTECTED_AUTHENTICATION_PATH (PIN pad / PED)",
    ),
];

/// What is wrong with a would-be member's token flags, given the group's
/// (`None` for the first member). Empty when all is well.
pub fn flag_problems(new: CK_FLAGS, group: Option<CK_FLAGS>) -> Vec<String> {
    let mut problems = Vec::new();
    let need = [
        (CKF_TOKEN_INITIALIZED, "the token is not initialised"),
        (
            CKF_USER_PIN_INITIALIZED,
            "the Crypto Officer (user) PIN is not initialised",
        ),
    ];
    for (flag, problem) in need {
        if new & flag == 0 {
            problems.push(problem.to_owned());
        }
    }
    let refuse = [
        (CKF_WRITE_PROTECTED, "the token is write-protected"),
        (CKF_USER_PIN_LOCKED, "the Crypto Officer PIN is locked"),
        (
            CKF_USER_PIN_TO_BE_CHANGED,
            "the Crypto Officer PIN must be changed first",
        ),
    ];
    for (flag, problem) in refuse {
        if new & flag != 0 {
            problems.push(problem.to_owned());
        }
    }
    if let Some(group) = group {
        for (flag, name) in LOGIN_FLAGS {
            if new & flag != group & flag {
                let (has, lacks) = if new & flag != 0 {
                    ("has", "lack it")
                } else {
                    ("lacks", "have it")
                };
                problems.push(format!(
                    "the token {has} {name} while the group's members {lacks}"
                ));
            }
        }
    }
    problems
}

/// A mechanism's name, or its number for ones cryptoki-sys does not name.
pub fn mechanism_name(mechanism: CK_MECHANISM_TYPE) -> String {
    crate::mechanisms::NAMES
        .iter()
        .find(|(m, _)| *m == mechanism)
        .map_or_else(
            || format!("mechanism {mechanism:#x}"),
            |(_, name)| (*name).to_owned(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_what_all_share_and_the_new_lacks() {
        let a = vec![CKM_AES_GCM, CKM_ECDSA, CKM_SHA256, CKM_AES_CBC];
        let b = vec![CKM_SHA256, CKM_ECDSA, CKM_AES_GCM];
        // CBC is not shared, so the group does not advertise it.
        assert_eq!(
            missing_mechanisms(&[a.clone(), b.clone()], &[CKM_ECDSA]),
            [CKM_SHA256, CKM_AES_GCM]
        );
        assert!(
            missing_mechanisms(&[a.clone(), b], &[CKM_ECDSA, CKM_SHA256, CKM_AES_GCM]).is_empty()
        );
        assert_eq!(missing_mechanisms(std::slice::from_ref(&a), &[]).len(), 4);
        // The first member sets the group's list.
        assert!(missing_mechanisms(&[], &[CKM_ECDSA]).is_empty());
        // More mechanisms than the group is fine.
        assert!(missing_mechanisms(&[vec![CKM_ECDSA]], &a).is_empty());
    }

    #[test]
    fn flags() {
        let good = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_LOGIN_REQUIRED | CKF_RNG;
        assert!(flag_problems(good, None).is_empty());
        assert!(flag_problems(good, Some(good & !CKF_RNG)).is_empty());
        let ped = flag_problems(good | CKF_PROTECTED_AUTHENTICATION_PATH, Some(good));
        assert_eq!(ped.len(), 1);
        assert!(
            ped[0].contains("has CKF_PROTECTED_AUTHENTICATION_PATH"),
            "{ped:?}"
        );
        let no_login = flag_problems(good & !CKF_LOGIN_REQUIRED, Some(good));
        assert!(
            no_login[0].contains("lacks CKF_LOGIN_REQUIRED"),
            "{no_login:?}"
        );
        let bad = flag_problems(CKF_WRITE_PROTECTED | CKF_USER_PIN_LOCKED, None);
        assert_eq!(bad.len(), 4, "{bad:?}");
    }

    #[test]
    fn force_skips_only_the_safe_checks() {
        assert_eq!(Check::fail(MECHANISMS, "x", true).result, Outcome::Skipped);
        assert_eq!(Check::fail(FLAGS, "x", true).result, Outcome::Skipped);
        assert_eq!(
            Check::fail(KEY_TRANSPORT, "x", true).result,
            Outcome::Skipped
        );
        for check in [MEMBERSHIP, LOGIN, DOMAIN, SO_LOGIN, HA_SLOT] {
            assert_eq!(Check::fail(check, "x", true).result, Outcome::Fail);
        }
        assert_eq!(Check::fail(FLAGS, "x", false).result, Outcome::Fail);
        assert!(mechanism_name(CKM_AES_GCM).contains("AES_GCM"));
        assert_eq!(mechanism_name(0x8000_1234), "mechanism 0x80001234");
    }
}
