//! The `group` verbs: create, add-member, remove-member, delete, list,
//! sync, standby and recover.

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;

use cryptoki_sys::*;
use pkcs11_ha::config::{Config, GroupConfig, DEFAULT_DOMAIN_LABEL};
use pkcs11_ha::error::rv_name;
use pkcs11_ha::strategy::{self, Capabilities, Side};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::checks::{self, missing_mechanisms, Check};
use crate::cli::{
    AddMemberArgs, CheckArgs, CreateArgs, ListArgs, MemberArgs, ObjectsChoice, SyncArgs, Target,
};
use crate::creds::Secret;
use crate::output::table;
use crate::p11::{self, Members, Session, TokenRef};
use crate::settings::{membership, warn_failures};
use crate::sync::{self, View};
use crate::{domain, Ctx, Res};

/// Largest group index: keys carry two digits.
const MAX_GROUP_INDEX: u32 = 99;

pub fn find_group<'c>(config: &'c Config, label: &str) -> Res<&'c GroupConfig> {
    config.group(label).ok_or_else(|| no_group(config, label))
}

fn no_group(config: &Config, label: &str) -> String {
    let labels: Vec<&str> = config.groups.iter().map(|g| g.label.as_str()).collect();
    let known = if labels.is_empty() {
        "there are no groups".to_owned()
    } else {
        format!("the groups are {}", labels.join(", "))
    };
    format!("no group is labelled \"{label}\" ({known})")
}

fn group_mut<'c>(config: &'c mut Config, label: &str) -> &'c mut GroupConfig {
    config
        .groups
        .iter_mut()
        .find(|g| g.label.eq_ignore_ascii_case(label))
        .expect("the group was found before")
}

/// The token `target` names.
fn resolve(members: &Members, target: &Target) -> Res<TokenRef> {
    if let Some(serial) = &target.which.serial {
        return members.by_serial(serial).ok_or_else(|| {
            format!(
                "no token with serial {serial} in the configured libraries; `pkcs11-ha slots` \
                 lists the tokens"
            )
        });
    }
    let slot = target.which.slot.expect("clap requires --slot or --serial");
    members.by_slot(slot, target.library.as_deref())
}

/// The serial `target` names, without loading libraries when it is given.
fn resolve_serial(config: &Config, target: &Target) -> Res<String> {
    match &target.which.serial {
        Some(serial) => Ok(serial.clone()),
        None => resolve(&Members::open(config), target).map(|t| t.serial),
    }
}

fn check_new_label(config: &Config, label: &str) -> Res<()> {
    if label.is_empty() {
        return Err("the group label is empty; give the token label applications will see".into());
    }
    if label.len() > 32 {
        return Err(format!(
            "the group label \"{label}\" is {} bytes long; a token label holds at most 32",
            label.len()
        ));
    }
    if label.eq_ignore_ascii_case("HA") {
        return Err(format!(
            "the group label \"{label}\" is reserved (Luna reserves it); choose another label"
        ));
    }
    if label.contains(['=', ';', '[', ']']) || label.trim() != label {
        return Err(format!(
            "the group label \"{label}\" cannot be written to the configuration file; leave \
             out = ; [ ] and leading or trailing blanks"
        ));
    }
    if let Some(other) = config.group(label) {
        return Err(format!(
            "a group labelled \"{}\" exists already (labels ignore case); choose another label",
            other.label
        ));
    }
    Ok(())
}

/// What the checks found out, for the changes that follow them.
struct Prepared {
    checks: Vec<Check>,
    /// Objects on the token besides the domain key.
    objects: usize,
    /// The domain key value to provision, when asked and needed.
    provision: Option<Zeroizing<[u8; 32]>>,
    /// The check value the provisioned key must have.
    trial_check: Vec<u8>,
    so_pin: Option<Secret>,
    pin: Option<Secret>,
}

impl Prepared {
    fn failed(&self) -> bool {
        self.checks.iter().any(Check::failed)
    }
}

/// What the group's reachable members share: the reference for a new one.
#[derive(Default)]
struct Reference {
    flags: Option<CK_FLAGS>,
    mechanisms: Vec<Vec<CK_MECHANISM_TYPE>>,
    domain_check: Option<(String, Vec<u8>)>,
    reachable: Vec<String>,
}

fn reference(members: &Members, group: &GroupConfig) -> Reference {
    let mut reference = Reference::default();
    let serials = group.members.iter().map(|s| (s, true));
    let serials = serials.chain(group.standby.iter().map(|s| (s, false)));
    for (serial, active) in serials {
        let Some(token) = members.by_serial(serial) else {
            continue;
        };
        let library = members.library(token.library);
        reference.reachable.push(serial.clone());
        reference.flags.get_or_insert(token.flags);
        if active {
            if let Ok(list) = p11::mechanisms(library, token.slot) {
                reference.mechanisms.push(list);
            }
        }
        if reference.domain_check.is_none() {
            if let Ok(session) = Session::open(library, token.slot) {
                if let Ok(Some(found)) = domain::find(&session, &group.domain_label) {
                    reference.domain_check = Some((serial.clone(), found.check_value));
                }
            }
        }
    }
    reference
}

/// The token is not a Luna HA virtual slot, and each kind of key can move
/// between it and every reachable member of `group`, one way or another
/// (`pkcs11_ha::strategy`): the library would refuse to make keys that
/// cannot.
fn key_transport(
    members: &Members,
    group: Option<&GroupConfig>,
    target: &TokenRef,
    force: bool,
) -> Vec<Check> {
    let library = members.library(target.library);
    if let Some(why) = strategy::refusal(library, target.slot) {
        return vec![
            Check::fail(checks::HA_SLOT, why, force),
            Check::not_run(checks::KEY_TRANSPORT, "an HA slot cannot be a member"),
        ];
    }
    let ha_slot = Check::pass(
        checks::HA_SLOT,
        "the slot is a token, not an HA virtual slot",
    );
    let capabilities = match Capabilities::detect(library, target.slot) {
        Ok(capabilities) => capabilities,
        Err(e) => {
            return vec![
                ha_slot,
                Check::fail(
                    checks::KEY_TRANSPORT,
                    format!(
                        "its mechanisms could not be listed ({}): how keys would move is \
                         unknown; try again once the token answers",
                        pkcs11_ha::error::rv_name(e.rv)
                    ),
                    force,
                ),
            ]
        }
    };
    let new = Side {
        serial: &target.serial,
        library,
        capabilities: &capabilities,
    };
    let mut problems: Vec<String> = Vec::new();
    let serials = group
        .into_iter()
        .flat_map(|g| g.members.iter().chain(&g.standby));
    for serial in serials.filter(|s| **s != target.serial) {
        let Some(token) = members.by_serial(serial) else {
            continue;
        };
        let their_library = members.library(token.library);
        let theirs = match Capabilities::detect(their_library, token.slot) {
            Ok(theirs) => theirs,
            Err(e) => {
                problems.push(format!(
                    "member {serial}'s mechanisms could not be listed ({})",
                    pkcs11_ha::error::rv_name(e.rv)
                ));
                continue;
            }
        };
        let other = Side {
            serial,
            library: their_library,
            capabilities: &theirs,
        };
        // A way closed to secret keys is closed to private keys too: one
        // line per direction, the strictest that fails.
        for (from, to) in [(&new, &other), (&other, &new)] {
            let refused = [CKO_SECRET_KEY, CKO_PRIVATE_KEY]
                .into_iter()
                .find_map(|class| strategy::choose(from, to, class).err());
            problems.extend(refused);
        }
    }
    let transport = if problems.is_empty() {
        Check::pass(checks::KEY_TRANSPORT, capabilities.describe())
    } else {
        Check::fail(
            checks::KEY_TRANSPORT,
            format!(
                "{}; such keys could not be created in the group",
                problems.join("; ")
            ),
            force,
        )
    };
    vec![ha_slot, transport]
}

/// Runs every prerequisite check on `target` for joining `group` (None:
/// creating a group with it). Changes nothing on any token.
fn run_checks(
    config: &Config,
    members: &Members,
    group: Option<&GroupConfig>,
    target: &TokenRef,
    domain_label: &str,
    args: &CheckArgs,
) -> Res<Prepared> {
    let force = args.force;
    let mut prepared = Prepared {
        checks: Vec::new(),
        objects: 0,
        provision: None,
        trial_check: Vec::new(),
        so_pin: None,
        pin: None,
    };
    let checks = &mut prepared.checks;
    match membership(config, &target.serial) {
        Some((g, role)) => checks.push(Check::fail(
            checks::MEMBERSHIP,
            format!(
                "token {} is already {} member of group \"{}\"; a token can belong to one group only",
                target.serial,
                if role == "standby" { "a standby" } else { "a" },
                g.label
            ),
            force,
        )),
        None => checks.push(Check::pass(
            checks::MEMBERSHIP,
            format!("token {} is in no group", target.serial),
        )),
    }
    checks.extend(key_transport(members, group, target, force));
    let reference = group.map(|g| reference(members, g)).unwrap_or_default();

    let library = members.library(target.library);
    let not_run = |checks: &mut Vec<Check>, why: &str| {
        for check in [
            checks::DOMAIN,
            checks::FLAGS,
            checks::MECHANISMS,
            checks::OBJECTS,
        ] {
            checks.push(Check::not_run(check, why));
        }
    };
    let mut session = match Session::open(library, target.slot) {
        Ok(session) => session,
        Err(rv) => {
            checks.push(Check::fail(
                checks::LOGIN,
                format!(
                    "cannot open a session on the token: C_OpenSession returned {}",
                    rv_name(rv)
                ),
                force,
            ));
            not_run(checks, "no session");
            return Ok(prepared);
        }
    };
    let pin = args.pin.source().read(
        &format!("Enter the Crypto Officer PIN of token {}: ", target.serial),
        false,
    )?;
    match session.login(CKU_USER, &pin) {
        Ok(()) | Err(CKR_USER_ALREADY_LOGGED_IN) => {
            checks.push(Check::pass(checks::LOGIN, "the Crypto Officer PIN logs in"))
        }
        Err(rv) => {
            let detail = match rv {
                CKR_PIN_INCORRECT => "the Crypto Officer PIN is incorrect (tried once and not \
                                      retried, so the token's retry counter is spent only once)"
                    .to_owned(),
                CKR_PIN_LOCKED => {
                    "the Crypto Officer PIN is locked; the member's SO must unlock it".to_owned()
                }
                rv => format!("C_Login returned {}", rv_name(rv)),
            };
            checks.push(Check::fail(checks::LOGIN, detail, force));
            not_run(checks, "the login failed");
            return Ok(prepared);
        }
    }
    prepared.pin = Some(pin);

    // The domain key.
    let found = domain::find(&session, domain_label);
    let reference_check = reference.domain_check.as_ref();
    let domain_check = match found {
        Err(problem) => Check::fail(checks::DOMAIN, problem, force),
        Ok(found) => {
            let secret_value = if args.provision_domain {
                let secret = args
                    .domain_secret
                    .source()
                    .read("Enter the domain secret: ", group.is_none())?;
                if secret.len() < domain::MIN_SECRET_LEN {
                    return Err(format!(
                        "the domain secret has {} bytes; give at least {} (it is key material, \
                         not a password: e.g. `head -c 32 /dev/urandom | base64`)",
                        secret.len(),
                        domain::MIN_SECRET_LEN
                    ));
                }
                Some(domain::derive(&secret, domain_label))
            } else {
                None
            };
            let trial = match &secret_value {
                Some(value) => match domain::trial_check_value(&session, domain_label, value) {
                    Ok(check) => Some(check.unwrap_or_default()),
                    Err(rv) => {
                        return Err(format!(
                            "cannot work out the domain key's check value on token {}: \
                             C_CreateObject returned {}",
                            target.serial,
                            rv_name(rv)
                        ))
                    }
                },
                None => None,
            };
            domain_check(
                found,
                domain_label,
                group.is_some(),
                reference_check,
                trial.as_deref(),
                force,
            )
            .inspect(|_| {
                if let (Some(value), Some(trial)) = (secret_value, trial) {
                    prepared.provision = Some(value);
                    prepared.trial_check = trial;
                }
            })
            .unwrap_or_else(|check| check)
        }
    };
    let checks = &mut prepared.checks;
    checks.push(domain_check);
    if group.is_none() {
        checks.push(other_group_check(&session, domain_label, force));
    }

    // Token flags and login requirements.
    let problems = checks::flag_problems(target.flags, reference.flags);
    checks.push(if problems.is_empty() {
        Check::pass(
            checks::FLAGS,
            match (group, reference.flags) {
                (None, _) => "initialised, PIN set and usable".to_owned(),
                (Some(_), Some(_)) => "login requirements match the group's members".to_owned(),
                (Some(_), None) => {
                    "initialised and PIN usable (no member reachable to compare)".to_owned()
                }
            },
        )
    } else {
        Check::fail(checks::FLAGS, problems.join("; "), force)
    });

    // Mechanisms.
    let own = p11::mechanisms(library, target.slot).unwrap_or_default();
    checks.push(match group {
        None => Check::pass(
            checks::MECHANISMS,
            format!("{} mechanisms; the group will advertise these", own.len()),
        ),
        Some(_) if reference.mechanisms.is_empty() => Check::fail(
            checks::MECHANISMS,
            "no active member of the group is reachable to compare mechanisms with",
            force,
        ),
        Some(_) => {
            let missing = missing_mechanisms(&reference.mechanisms, &own);
            if missing.is_empty() {
                Check::pass(
                    checks::MECHANISMS,
                    "supports every mechanism the group advertises",
                )
            } else {
                let names: Vec<String> =
                    missing.iter().map(|m| checks::mechanism_name(*m)).collect();
                Check::fail(
                    checks::MECHANISMS,
                    format!(
                        "lacks {} mechanism(s) the group advertises: {}",
                        missing.len(),
                        names.join(", ")
                    ),
                    force,
                )
            }
        }
    });

    checks.push(replication_check(&session, &own));

    // Objects already there.
    let domain_handle = domain::find(&session, domain_label)
        .ok()
        .flatten()
        .map(|f| f.handle);
    match session.objects() {
        Ok(objects) => {
            prepared.objects = objects
                .iter()
                .filter(|h| Some(**h) != domain_handle)
                .count();
            checks.push(Check::pass(
                checks::OBJECTS,
                format!(
                    "the token holds {} object(s) besides the domain key",
                    prepared.objects
                ),
            ));
        }
        Err(rv) => checks.push(Check::fail(
            checks::OBJECTS,
            format!(
                "cannot list the token's objects: C_FindObjects returned {}",
                rv_name(rv)
            ),
            force,
        )),
    }
    session.logout();

    // The SO PIN, needed to create the trusted domain key.
    if prepared.provision.is_some() {
        let so_pin = args.so_pin.source().read(
            &format!("Enter the SO PIN of token {}: ", target.serial),
            false,
        )?;
        let check = match session.login(CKU_SO, &so_pin) {
            Ok(()) => {
                session.logout();
                prepared.so_pin = Some(so_pin);
                Check::pass(
                    checks::SO_LOGIN,
                    "the SO PIN logs in (to create the trusted domain key)",
                )
            }
            Err(CKR_PIN_INCORRECT) => Check::fail(
                checks::SO_LOGIN,
                "the SO PIN is incorrect (tried once and not retried)",
                force,
            ),
            Err(rv) => Check::fail(
                checks::SO_LOGIN,
                format!("the SO cannot log in: C_Login returned {}", rv_name(rv)),
                force,
            ),
        };
        prepared.checks.push(check);
    }
    Ok(prepared)
}

/// A new group's primary must not carry a domain key already: such a token
/// is most likely a member of a group in another configuration, and two
/// groups writing to one token would fail each other's calls.
fn other_group_check(session: &Session, domain_label: &str, force: bool) -> Check {
    let mut labels = vec![domain_label];
    if domain_label != DEFAULT_DOMAIN_LABEL {
        labels.push(DEFAULT_DOMAIN_LABEL);
    }
    let carried: Vec<&str> = labels
        .into_iter()
        .filter(|label| !matches!(domain::find(session, label), Ok(None)))
        .collect();
    match carried.first() {
        None => Check::pass(
            checks::OTHER_GROUP,
            "the token carries no domain key, so no other configuration uses it",
        ),
        Some(label) => Check::fail(
            checks::OTHER_GROUP,
            format!(
                "the token already carries a domain key \"{label}\", so it is most likely a \
                 member of a group in another configuration; use a fresh token, or pass --force \
                 if that group is gone and this one is to take over its keys"
            ),
            force,
        ),
    }
}

/// The domain key check; `Ok` when it passes (a key is to be provisioned
/// when `trial` is given and the token has none).
fn domain_check(
    found: Option<domain::Found>,
    label: &str,
    joining: bool,
    reference: Option<&(String, Vec<u8>)>,
    trial: Option<&[u8]>,
    force: bool,
) -> Result<Check, Check> {
    let fail = |detail: String| Err(Check::fail(checks::DOMAIN, detail, force));
    let pass = |detail: String| Ok(Check::pass(checks::DOMAIN, detail));
    let hex = domain::hex;
    match (found, trial) {
        (Some(found), trial) => {
            if let Some(trial) = trial {
                if trial != found.check_value {
                    return fail(format!(
                        "the token already holds a domain key \"{label}\" (check value {}) that \
                         differs from the one the secret gives ({}); remove it first or leave \
                         out --provision-domain",
                        hex(&found.check_value),
                        hex(trial)
                    ));
                }
            }
            match reference {
                Some((serial, check)) if *check != found.check_value => fail(format!(
                    "the token's domain key \"{label}\" (check value {}) differs from the \
                     group's (member {serial}: {}); key material could not move to it",
                    hex(&found.check_value),
                    hex(check)
                )),
                Some((serial, _)) => pass(format!(
                    "\"{label}\" present, check value {} matches member {serial}",
                    hex(&found.check_value)
                )),
                None if joining => fail(
                    "no member of the group is reachable to compare the domain key with".into(),
                ),
                None => pass(format!(
                    "\"{label}\" present, check value {}",
                    hex(&found.check_value)
                )),
            }
            .map(|check| {
                if trial.is_some() {
                    Check {
                        detail: format!("{} (already provisioned)", check.detail),
                        ..check
                    }
                } else {
                    check
                }
            })
        }
        (None, None) => fail(format!(
            "the token has no domain key labelled \"{label}\"; provision it with \
             --provision-domain (needs the token's SO PIN and the domain secret)"
        )),
        (None, Some(trial)) => match reference {
            Some((serial, check)) if check.as_slice() != trial => fail(format!(
                "the domain secret gives check value {}, but the group's domain key (member \
                 {serial}) has {}; check the secret",
                hex(trial),
                hex(check)
            )),
            None if joining => {
                fail("no member of the group is reachable to compare the domain key with".into())
            }
            _ => pass(format!(
                "\"{label}\" will be provisioned, check value {}",
                hex(trial)
            )),
        },
    }
}

fn print_checks(ctx: &Ctx, target: &TokenRef, prepared: &Prepared) {
    ctx.say(format!(
        "Checking token {} (\"{}\", library {}, slot {}):",
        target.serial, target.label, target.library_name, target.slot
    ));
    for check in &prepared.checks {
        ctx.say(check.line());
    }
    let skipped: Vec<&str> = prepared
        .checks
        .iter()
        .filter(|c| c.result == checks::Outcome::Skipped)
        .map(|c| c.check)
        .collect();
    if !skipped.is_empty() {
        ctx.say(format!(
            "--force skipped: {} (the group then advertises only what every member has)",
            skipped.join(", ")
        ));
    }
}

fn checks_json(prepared: &Prepared) -> Value {
    serde_json::to_value(&prepared.checks).expect("checks serialise")
}

/// Creates the domain key on `target` as its SO.
fn provision(
    ctx: &Ctx,
    members: &Members,
    target: &TokenRef,
    label: &str,
    prepared: &Prepared,
) -> Res<()> {
    let (Some(value), Some(so_pin)) = (&prepared.provision, &prepared.so_pin) else {
        return Ok(());
    };
    let mut session =
        Session::open(members.library(target.library), target.slot).map_err(|rv| {
            format!(
                "cannot open a session on {}: {}",
                target.serial,
                rv_name(rv)
            )
        })?;
    session
        .login(CKU_SO, so_pin)
        .map_err(|rv| format!("the SO login on {} failed: {}", target.serial, rv_name(rv)))?;
    let found = domain::provision(&session, label, value).map_err(|rv| {
        format!(
            "cannot create the domain key on {}: C_CreateObject returned {}",
            target.serial,
            rv_name(rv)
        )
    })?;
    session.logout();
    if found.check_value != prepared.trial_check {
        return Err(format!(
            "the domain key created on {} has check value {} where {} was expected",
            target.serial,
            domain::hex(&found.check_value),
            domain::hex(&prepared.trial_check)
        ));
    }
    ctx.say(format!(
        "Provisioned the domain key \"{label}\" on {} (check value {}).",
        target.serial,
        domain::hex(&found.check_value)
    ));
    Ok(())
}

pub fn create(ctx: &Ctx, args: &CreateArgs) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let config = ctx.load()?;
    check_new_label(&config, &args.label)?;
    let index = (0..=MAX_GROUP_INDEX)
        .find(|i| config.groups.iter().all(|g| g.index != *i))
        .ok_or("the configuration holds 100 groups already")?;
    let domain_label = args
        .domain_label
        .clone()
        .unwrap_or_else(|| DEFAULT_DOMAIN_LABEL.to_owned());
    let members = Members::open(&config);
    warn_failures(&members);
    let target = resolve(&members, &args.target)?;
    let prepared = run_checks(
        &config,
        &members,
        None,
        &target,
        &domain_label,
        &args.checks,
    )?;
    print_checks(ctx, &target, &prepared);
    if prepared.failed() {
        ctx.emit(&json!({ "ok": false, "checks": checks_json(&prepared) }));
        return Err(format!(
            "group \"{}\" not created: a prerequisite check failed; nothing was changed",
            args.label
        ));
    }
    provision(ctx, &members, &target, &domain_label, &prepared)?;
    let serial = group_number(&config, &members, &target.serial);
    let mut new = config.clone();
    new.groups.push(GroupConfig {
        index,
        label: args.label.clone(),
        serial: Some(serial.clone()),
        members: vec![target.serial.clone()],
        standby: Vec::new(),
        domain_label,
        synchronize: true,
        min_replicas: 1,
    });
    new.groups.sort_by_key(|g| g.index);
    ctx.save(&new)?;
    ctx.say(format!(
        "New group with label \"{}\" created with group number {serial}.",
        args.label
    ));
    let status = group_status(
        &members,
        find_group(&new, &args.label)?,
        prepared.pin.as_deref().map(|p| &p[..]),
    );
    ctx.say("Group configuration is:");
    print_status(ctx, &status);
    ctx.emit(&json!({
        "ok": true,
        "checks": checks_json(&prepared),
        "group": status.json(),
    }));
    Ok(ExitCode::SUCCESS)
}

/// The group number: "1" + the primary's serial (cut to fit 16
/// characters), as Luna makes it. A 16-character serial that starts with
/// "1" would give the primary's own serial, so then the leading digit is
/// raised until the number clashes with no token and no other group.
fn group_number(config: &Config, members: &Members, primary: &str) -> String {
    let rule = pkcs11_ha::group::virtual_serial(None, &[primary.to_owned()]);
    let tokens: Vec<String> = members.tokens().into_iter().map(|t| t.serial).collect();
    let taken = |serial: &str| {
        serial == primary
            || tokens.iter().any(|t| t == serial)
            || config.groups.iter().any(|g| {
                g.serial.as_deref() == Some(serial)
                    || g.members.iter().chain(&g.standby).any(|m| m == serial)
            })
    };
    if !taken(&rule) {
        return rule;
    }
    let rest = &rule[1..];
    ('2'..='9')
        .map(|lead| format!("{lead}{rest}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or(rule)
}

/// Luna's question for a new member that holds objects, asked on the
/// terminal (or read from standard input).
fn ask_objects(count: usize) -> Res<ObjectsChoice> {
    eprintln!(
        "Warning: There are {count} object(s) currently on the new member. Do you wish to \
         propagate these objects within the HA group, or remove them?\nType 'copy' to keep and \
         propagate the existing objects, 'remove' to remove them before continuing, or 'quit' \
         to stop adding this new group member."
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let read = stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if read == 0 {
            return Err(format!(
                "the new member holds {count} object(s) and no answer came; say what to do with \
                 --objects copy|remove|quit"
            ));
        }
        match line.trim().to_ascii_lowercase().as_str() {
            "copy" => return Ok(ObjectsChoice::Copy),
            "remove" => return Ok(ObjectsChoice::Remove),
            "quit" => return Ok(ObjectsChoice::Quit),
            other => eprintln!("\"{other}\" is not an answer; type copy, remove or quit."),
        }
    }
}

fn remove_objects(
    members: &Members,
    target: &TokenRef,
    domain_label: &str,
    pin: &[u8],
) -> Res<usize> {
    let mut session =
        Session::open(members.library(target.library), target.slot).map_err(|rv| {
            format!(
                "cannot open a session on {}: {}",
                target.serial,
                rv_name(rv)
            )
        })?;
    session
        .login(CKU_USER, pin)
        .map_err(|rv| format!("the login on {} failed: {}", target.serial, rv_name(rv)))?;
    let domain_handle = domain::find(&session, domain_label)?.map(|f| f.handle);
    let objects = session.objects().map_err(|rv| {
        format!(
            "cannot list the objects on {}: {}",
            target.serial,
            rv_name(rv)
        )
    })?;
    let mut removed = 0;
    for object in objects.into_iter().filter(|h| Some(*h) != domain_handle) {
        let description = sync::describe(&session, object);
        session.destroy(object).map_err(|rv| {
            format!(
                "cannot remove {description} from {}: C_DestroyObject returned {}; {removed} \
                 object(s) were removed, the member was not added",
                target.serial,
                rv_name(rv)
            )
        })?;
        removed += 1;
    }
    Ok(removed)
}

/// `group add-member`, and with `standby` `group add-standby`: the same
/// checks, then the token joins as an active or a standby member.
pub fn add_member(ctx: &Ctx, args: &AddMemberArgs, standby: bool) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let config = ctx.load()?;
    let group = find_group(&config, &args.group)?.clone();
    let members = Members::open(&config);
    warn_failures(&members);
    let target = resolve(&members, &args.target)?;
    let prepared = run_checks(
        &config,
        &members,
        Some(&group),
        &target,
        &group.domain_label,
        &args.checks,
    )?;
    print_checks(ctx, &target, &prepared);
    let refuse = |why: String| {
        ctx.emit(&json!({ "ok": false, "checks": checks_json(&prepared) }));
        Err(why)
    };
    if prepared.failed() {
        return refuse(format!(
            "{} not added to group \"{}\": a prerequisite check failed; nothing was changed",
            target.serial, group.label
        ));
    }
    let choice = match (prepared.objects, args.objects) {
        (0, _) => None,
        (_, Some(choice)) => Some(choice),
        (count, None) => Some(ask_objects(count)?),
    };
    if choice == Some(ObjectsChoice::Quit) {
        return refuse(format!(
            "{} not added to group \"{}\" (quit); nothing was changed",
            target.serial, group.label
        ));
    }
    provision(ctx, &members, &target, &group.domain_label, &prepared)?;
    let pin = prepared
        .pin
        .as_deref()
        .map(|p| &p[..])
        .expect("the login check passed");
    if choice == Some(ObjectsChoice::Remove) {
        let removed = remove_objects(&members, &target, &group.domain_label, pin)?;
        ctx.say(format!(
            "Removed {removed} object(s) from {}.",
            target.serial
        ));
    }
    let mut new = config.clone();
    let changed = group_mut(&mut new, &group.label);
    if standby {
        changed.standby.push(target.serial.clone());
    } else {
        changed.members.push(target.serial.clone());
    }
    ctx.save(&new)?;
    ctx.say(format!(
        "Member {} successfully added to group {}{}.",
        target.serial,
        group.label,
        if standby { " as a standby member" } else { "" }
    ));
    let new_group = find_group(&new, &group.label)?;
    let mut status = group_status(&members, new_group, Some(pin));
    let mut copied = None;
    if args.sync {
        let (_, report) = synchronise(ctx, &members, new_group, pin, false)?;
        copied = Some(report);
        status = group_status(&members, new_group, Some(pin));
    }
    ctx.say("New group configuration is:");
    print_status(ctx, &status);
    if status.needs_sync == Some(true) {
        ctx.say(format!(
            "Please use `pkcs11-ha group sync --group {}` when you are ready to replicate data \
             between all members of the group (if you have more members to add, add them first).",
            group.label
        ));
    }
    ctx.emit(&json!({
        "ok": true,
        "checks": checks_json(&prepared),
        "objects": choice.map(|c| format!("{c:?}").to_lowercase()),
        "sync": copied,
        "group": status.json(),
    }));
    Ok(ExitCode::SUCCESS)
}

pub fn remove_member(ctx: &Ctx, args: &MemberArgs) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let mut config = ctx.load()?;
    let label = find_group(&config, &args.group)?.label.clone();
    let serial = resolve_serial(&config, &args.target)?;
    let group = group_mut(&mut config, &label);
    let was_primary = group.members.first() == Some(&serial);
    if let Some(at) = group.members.iter().position(|s| *s == serial) {
        if group.members.len() == 1 {
            return Err(format!(
                "{serial} is the only active member of group \"{label}\"; add another member \
                 first, or delete the group with `pkcs11-ha group delete --group {label}`"
            ));
        }
        group.members.remove(at);
    } else if let Some(at) = group.standby.iter().position(|s| *s == serial) {
        group.standby.remove(at);
    } else {
        return Err(format!(
            "{serial} is not a member of group \"{label}\" (members: {}{})",
            group.members.join(", "),
            if group.standby.is_empty() {
                String::new()
            } else {
                format!("; standby: {}", group.standby.join(", "))
            }
        ));
    }
    let primary = group.members[0].clone();
    ctx.save(&config)?;
    ctx.say(format!(
        "Member {serial} removed from group {label}; its objects stay on the token."
    ));
    if was_primary {
        ctx.say(format!(
            "The primary is now {primary}; the group keeps its number."
        ));
    }
    ctx.emit(&json!({ "ok": true, "group": label, "removed": serial, "primary": primary }));
    Ok(ExitCode::SUCCESS)
}

pub fn delete(ctx: &Ctx, label: &str) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let mut config = ctx.load()?;
    let group = find_group(&config, label)?.clone();
    if config.ha_only && config.groups.len() == 1 {
        return Err(format!(
            "\"{}\" is the last group and HAOnly is enabled, so no slot would be left; run \
             `pkcs11-ha ha-only disable` first",
            group.label
        ));
    }
    config.groups.retain(|g| g.index != group.index);
    ctx.save(&config)?;
    ctx.say(format!(
        "Group {} deleted; the objects stay on its members ({}).",
        group.label,
        group
            .members
            .iter()
            .chain(&group.standby)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    ));
    ctx.emit(&json!({ "ok": true, "deleted": group.label }));
    Ok(ExitCode::SUCCESS)
}

pub fn standby(ctx: &Ctx, args: &MemberArgs, make_standby: bool) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let mut config = ctx.load()?;
    let label = find_group(&config, &args.group)?.label.clone();
    let serial = resolve_serial(&config, &args.target)?;
    let group = group_mut(&mut config, &label);
    if make_standby {
        let Some(at) = group.members.iter().position(|s| *s == serial) else {
            return Err(if group.standby.contains(&serial) {
                format!("{serial} is already a standby member of group \"{label}\"")
            } else {
                format!(
                    "{serial} is not a member of group \"{label}\"; add it first with \
                     `pkcs11-ha group add-member`"
                )
            });
        };
        if group.members.len() == 1 {
            return Err(format!(
                "{serial} is the only active member of group \"{label}\", and a group needs one \
                 active member to serve; first add another with `pkcs11-ha group add-member \
                 --group {label} --serial SERIAL`{}, then make {serial} standby",
                match group.standby.first() {
                    Some(other) => format!(
                        " or make a standby member active with `pkcs11-ha group standby remove \
                         --group {label} --serial {other}`"
                    ),
                    None => String::new(),
                }
            ));
        }
        group.members.remove(at);
        group.standby.push(serial.clone());
    } else {
        let Some(at) = group.standby.iter().position(|s| *s == serial) else {
            return Err(format!(
                "{serial} is not a standby member of group \"{label}\""
            ));
        };
        group.standby.remove(at);
        group.members.push(serial.clone());
    }
    let (active, standby) = (group.members.clone(), group.standby.clone());
    ctx.save(&config)?;
    ctx.say(format!(
        "Member {serial} of group {label} is now {}.",
        if make_standby { "standby" } else { "active" }
    ));
    ctx.say(format!("Group Members:   {}", active.join(", ")));
    ctx.say(format!(
        "Standby Members: {}",
        if standby.is_empty() {
            "<none>".to_owned()
        } else {
            standby.join(", ")
        }
    ));
    ctx.emit(&json!({ "ok": true, "group": label, "members": active, "standby": standby }));
    Ok(ExitCode::SUCCESS)
}

/// One member's live status.
pub struct MemberStatus {
    pub serial: String,
    pub role: &'static str,
    pub token: Option<TokenRef>,
    /// Why it is down, or why it was not compared.
    pub note: Option<String>,
}

/// A group's live status.
struct GroupStatus {
    group: GroupConfig,
    members: Vec<MemberStatus>,
    needs_sync: Option<bool>,
    /// "all objects" or "public objects only".
    compared: &'static str,
    error: Option<String>,
}

impl GroupStatus {
    fn json(&self) -> Value {
        let g = &self.group;
        json!({
            "label": g.label,
            "number": pkcs11_ha::group::virtual_serial(g.serial.as_deref(), &[g.members.clone(), g.standby.clone()].concat()),
            "slot_id": g.index,
            "synchronization": g.synchronize,
            "domain_label": g.domain_label,
            "members": g.members,
            "standby": g.standby,
            "needs_sync": self.needs_sync,
            "compared": self.compared,
            "error": self.error,
            "status": self.members.iter().map(|m| json!({
                "serial": m.serial,
                "role": m.role,
                "status": if m.token.is_some() { "alive" } else { "down" },
                "library": m.token.as_ref().map(|t| &t.library_name),
                "slot": m.token.as_ref().map(|t| t.slot),
                "label": m.token.as_ref().map(|t| &t.label),
                "note": m.note,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Opens a session on every reachable member of `group` and, given a PIN,
/// logs it in: the PIN is tried on the first member, and a wrong one is
/// never tried on the others.
pub fn views<'m>(
    members: &'m Members,
    group: &GroupConfig,
    pin: Option<&[u8]>,
) -> Res<(Vec<View<'m>>, Vec<MemberStatus>)> {
    let mut views = Vec::new();
    let mut statuses = Vec::new();
    let listed = group.members.iter().map(|s| (s, "active"));
    for (serial, role) in listed.chain(group.standby.iter().map(|s| (s, "standby"))) {
        let mut status = MemberStatus {
            serial: serial.clone(),
            role,
            token: None,
            note: None,
        };
        let Some(token) = members.by_serial(serial) else {
            status.note = Some(members.not_found_note());
            statuses.push(status);
            continue;
        };
        let mut session = match Session::open(members.library(token.library), token.slot) {
            Ok(session) => session,
            Err(rv) => {
                status.note = Some(format!("C_OpenSession returned {}", rv_name(rv)));
                statuses.push(status);
                continue;
            }
        };
        let slot = token.slot;
        status.token = Some(token);
        if let Some(pin) = pin {
            match session.login(CKU_USER, pin) {
                Ok(()) | Err(CKR_USER_ALREADY_LOGGED_IN) => {}
                Err(CKR_PIN_INCORRECT) => {
                    return Err(format!(
                        "the Crypto Officer PIN is incorrect on member {serial} (tried once; not \
                         tried on the other members)"
                    ))
                }
                Err(rv) => {
                    status.note = Some(format!(
                        "alive, but the login failed ({}); not compared",
                        rv_name(rv)
                    ));
                    statuses.push(status);
                    continue;
                }
            }
        }
        match View::read(serial, slot, session, &group.domain_label) {
            Ok(view) => views.push(view),
            Err(problem) => status.note = Some(problem),
        }
        statuses.push(status);
    }
    Ok((views, statuses))
}

fn group_status(members: &Members, group: &GroupConfig, pin: Option<&[u8]>) -> GroupStatus {
    let compared = if pin.is_some() {
        "all objects"
    } else {
        "public objects only"
    };
    match views(members, group, pin) {
        Ok((views, statuses)) => {
            let plan = sync::plan(&views, &sync::deletions(members, group));
            GroupStatus {
                group: group.clone(),
                members: statuses,
                needs_sync: Some(!plan.copies.is_empty()),
                compared,
                error: None,
            }
        }
        Err(problem) => GroupStatus {
            group: group.clone(),
            members: Vec::new(),
            needs_sync: None,
            compared,
            error: Some(problem),
        },
    }
}

fn print_status(ctx: &Ctx, status: &GroupStatus) {
    let g = &status.group;
    let list = |serials: &[String]| {
        if serials.is_empty() {
            "<none>".to_owned()
        } else {
            serials.join(", ")
        }
    };
    ctx.say(format!("HA Group Label:   {}", g.label));
    ctx.say(format!(
        "HA Group Number:  {}",
        pkcs11_ha::group::virtual_serial(
            g.serial.as_deref(),
            &[g.members.clone(), g.standby.clone()].concat()
        )
    ));
    ctx.say(format!("HA Group Slot ID: {}", g.index));
    ctx.say(format!(
        "Synchronization:  {}",
        if g.synchronize { "enabled" } else { "disabled" }
    ));
    ctx.say(format!("Group Members:    {}", list(&g.members)));
    let needs = match (status.needs_sync, &status.error) {
        (Some(true), _) => "yes".to_owned(),
        (Some(false), _) => "no".to_owned(),
        (None, Some(e)) => format!("unknown ({e})"),
        (None, None) => "unknown".to_owned(),
    };
    let partial = if status.compared == "all objects" || status.needs_sync.is_none() {
        ""
    } else {
        " (public objects only: give a PIN to compare private objects too)"
    };
    ctx.say(format!("Needs sync:       {needs}{partial}"));
    ctx.say(format!("Standby Members:  {}", list(&g.standby)));
    ctx.say("");
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            let (slot, label, library) = match &m.token {
                Some(t) => (t.slot.to_string(), t.label.clone(), t.library_name.clone()),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let mut state = if m.token.is_some() { "alive" } else { "down" }.to_owned();
            if let Some(note) = &m.note {
                state = format!("{state} ({note})");
            }
            vec![
                slot,
                m.serial.clone(),
                label,
                library,
                m.role.to_owned(),
                state,
            ]
        })
        .collect();
    ctx.say(table(
        &[
            "Slot #",
            "Member S/N",
            "Member Label",
            "Library",
            "Role",
            "Status",
        ],
        &rows,
    ));
}

/// The PIN for a verb that logs in: the flag's source, else a prompt.
fn read_pin(args: &crate::creds::PinArgs, what: &str) -> Res<Secret> {
    args.source()
        .read(&format!("Enter the Crypto Officer PIN of {what}: "), false)
}

pub fn list(ctx: &Ctx, args: &ListArgs) -> Res<ExitCode> {
    use std::io::IsTerminal as _;
    let config = ctx.load()?;
    let groups: Vec<&GroupConfig> = match &args.group {
        Some(label) => vec![find_group(&config, label)?],
        None => config.groups.iter().collect(),
    };
    let pin = if args.no_login || (!args.pin.given() && !std::io::stdin().is_terminal()) {
        None
    } else {
        Some(read_pin(&args.pin, "the groups' members")?)
    };
    let members = Members::open(&config);
    warn_failures(&members);
    if groups.is_empty() {
        ctx.say("No HA group is configured; create one with `pkcs11-ha group create`.");
    }
    let mut out = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let status = group_status(&members, group, pin.as_deref().map(|p| &p[..]));
        if i > 0 {
            ctx.say("");
        }
        print_status(ctx, &status);
        out.push(status.json());
    }
    ctx.say(format!(
        "\nHA Only mode: {}",
        if config.ha_only {
            "enabled"
        } else {
            "disabled"
        }
    ));
    ctx.emit(&json!({ "ha_only": config.ha_only, "groups": out }));
    Ok(ExitCode::SUCCESS)
}

/// Copies to each reachable member what it lacks (or, with `dry_run`,
/// reports it); returns whether everything went well, and the report.
fn synchronise(
    ctx: &Ctx,
    members: &Members,
    group: &GroupConfig,
    pin: &[u8],
    dry_run: bool,
) -> Res<(bool, Value)> {
    let (views, statuses) = views(members, group, Some(pin))?;
    let plan = sync::plan(&views, &sync::deletions(members, group));
    let mut ok = true;
    let mut copies = Vec::new();
    for status in statuses
        .iter()
        .filter(|s| s.token.is_none() || s.note.is_some())
    {
        ctx.say(format!(
            "Member {} is not synchronised: {}",
            status.serial,
            status.note.as_deref().unwrap_or("down")
        ));
    }
    for ambiguous in &plan.ambiguous {
        ctx.say(format!(
            "Warning: {} matches {} objects on member {}, so it is not copied (give objects \
             distinct CKA_ID or labels)",
            ambiguous.object, ambiguous.matches, ambiguous.member
        ));
    }
    for deleted in &plan.deleted {
        ctx.say(format!(
            "Not copied: {deleted} was deleted through the group while a member was down \
             (recorded in haStateDir); applications using the group remove it from the members \
             that still hold it"
        ));
    }
    let progress = Progress::new(ctx, plan.copies.len());
    let (mut copied, mut failed) = (0usize, 0usize);
    for copy in &plan.copies {
        let (from, to) = (&views[copy.from].serial, &views[copy.to].serial);
        let outcome = if dry_run {
            sync::precheck(&views, copy).map(drop)
        } else {
            sync::copy(&views, copy)
        };
        let result = match outcome {
            Ok(()) => {
                copied += 1;
                let verb = if dry_run { "Would copy" } else { "Copied" };
                progress.line(format!("{verb} {} from {from} to {to}", copy.description));
                if dry_run { "would copy" } else { "copied" }.to_owned()
            }
            Err(problem) => {
                failed += 1;
                let verb = if dry_run {
                    "WOULD FAIL to copy"
                } else {
                    "FAILED to copy"
                };
                progress.problem(format!(
                    "{verb} {} from {from} to {to}: {problem}",
                    copy.description
                ));
                format!(
                    "{}: {problem}",
                    if dry_run { "would fail" } else { "failed" }
                )
            }
        };
        progress.advance(copied + failed, dry_run);
        copies.push(json!({
            "object": copy.description,
            "from": from,
            "to": to,
            "result": result,
        }));
    }
    progress.finish();
    ok &= failed == 0;
    if plan.copies.is_empty() {
        ctx.say(format!(
            "Nothing to copy: every reachable member of {} has every object.",
            group.label
        ));
    }
    ctx.say(if dry_run {
        format!(
            "Summary: would copy {copied}, already present {}, would fail {failed}.",
            plan.present
        )
    } else {
        format!(
            "Summary: copied {copied}, already present {}, failed {failed}.",
            plan.present
        )
    });
    let down: Vec<&str> = statuses
        .iter()
        .filter(|s| s.token.is_none())
        .map(|s| s.serial.as_str())
        .collect();
    let report = json!({
        "group": group.label,
        "dry_run": dry_run,
        "summary": {
            "copied": if dry_run { 0 } else { copied },
            "would_copy": if dry_run { copied } else { 0 },
            "already_present": plan.present,
            "failed": failed,
        },
        "copies": copies,
        "ambiguous": plan.ambiguous,
        "deleted": plan.deleted,
        "down": down,
    });
    Ok((ok, report))
}

/// How a sync shows its copies: on a terminal one progress line that is
/// rewritten ("copied 120 of 500") and the problems; elsewhere one line per
/// copy, for logs and scripts.
struct Progress {
    terminal: bool,
    json: bool,
    total: usize,
}

impl Progress {
    fn new(ctx: &Ctx, total: usize) -> Progress {
        use std::io::IsTerminal as _;
        Progress {
            terminal: !ctx.json && std::io::stdout().is_terminal(),
            json: ctx.json,
            total,
        }
    }

    fn say(&self, line: &str) {
        if !self.json {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }

    /// A copy that went well: its own line only off a terminal.
    fn line(&self, line: String) {
        if !self.terminal {
            self.say(&line);
        }
    }

    /// A copy that failed: always its own line.
    fn problem(&self, line: String) {
        if self.terminal {
            print!("\r\x1b[K");
        }
        self.say(&line);
    }

    fn advance(&self, done: usize, dry_run: bool) {
        if self.terminal {
            let verb = if dry_run { "checked" } else { "copied" };
            print!("\r\x1b[K{verb} {done} of {}", self.total);
            let _ = std::io::stdout().flush();
        }
    }

    fn finish(&self) {
        if self.terminal && self.total > 0 {
            println!();
        }
    }
}

/// `group sync` and, with `recover`, `group recover`: the same copy, and
/// for recover a non-zero exit while a member stays down.
pub fn sync(ctx: &Ctx, args: &SyncArgs, recover: bool) -> Res<ExitCode> {
    let config = ctx.load()?;
    let group = find_group(&config, &args.group)?;
    let pin = read_pin(&args.pin, &format!("group {}", group.label))?;
    let members = Members::open(&config);
    warn_failures(&members);
    let (ok, report) = synchronise(ctx, &members, group, &pin, args.dry_run)?;
    let down = report["down"].as_array().map_or(0, Vec::len);
    let mut result = json!({ "ok": ok && !(recover && down > 0) });
    if recover {
        let status = group_status(&members, group, Some(&pin));
        ctx.say("");
        print_status(ctx, &status);
        result["group"] = status.json();
        if down > 0 {
            ctx.say(format!(
                "{down} member(s) still down. Applications recover members on their own every \
                 AutoReconnectInterval ({} s).",
                config.recovery.interval_secs
            ));
        }
    }
    result["sync"] = report;
    ctx.emit(&result);
    Ok(if result["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// DER of the curve names PKCS#11 3.0 gives Edwards curves.
const EDWARDS_CURVES: [(&str, &[u8]); 2] = [
    ("Ed25519", b"\x13\x0cedwards25519"),
    ("Ed448", b"\x13\x0aedwards448"),
];

/// Which kinds of key the token can make but the group could not hand to
/// its other members: the group then refuses to make them (fail closed),
/// and the operator hears it here first.
fn replication_check(session: &Session, own: &[CK_MECHANISM_TYPE]) -> Check {
    if !own.contains(&CKM_AES_KEY_WRAP_PAD) {
        let detail = if own.contains(&strategy::CKM_AES_KWP) {
            "the token wraps with Luna's CKM_AES_KWP only: generated keys move by Luna \
             cloning or with CKM_AES_KWP (see key transport)"
        } else {
            "the token offers no key-wrap mechanism (CKM_AES_KEY_WRAP_PAD or Luna's \
             CKM_AES_KWP): keys generated in the group can move to or from it only by Luna \
             cloning (see key transport); imported keys and public objects always can"
        };
        return Check::warn(checks::REPLICATION, detail);
    }
    let unwrappable: Vec<&str> = EDWARDS_CURVES
        .iter()
        .filter(|_| own.contains(&CKM_EC_EDWARDS_KEY_PAIR_GEN))
        .filter(|(_, params)| {
            session.probe_wrap(CKM_EC_EDWARDS_KEY_PAIR_GEN, params) == Err(CKR_KEY_NOT_WRAPPABLE)
        })
        .map(|(name, _)| *name)
        .collect();
    if unwrappable.is_empty() {
        Check::pass(
            checks::REPLICATION,
            "every key type it generates that was probed can move with CKM_AES_KEY_WRAP_PAD",
        )
    } else {
        Check::warn(
            checks::REPLICATION,
            format!(
                "the token generates {} keys but cannot wrap them (CKR_KEY_NOT_WRAPPABLE): the \
                 group refuses to create such keys; use another key type (e.g. EC P-256)",
                unwrappable.join(" and ")
            ),
        )
    }
}
