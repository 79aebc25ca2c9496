//! The verbs that list tokens or change one setting: `slots`, `ha-only`,
//! `recovery`, `log` and `import-luna`.

use std::process::ExitCode;

use cryptoki_sys::*;
use pkcs11_ha::config::{Config, GroupConfig, RecoveryMode, HA_LOG_FILE};
use serde_json::json;

use crate::cli::{ImportArgs, LogArgs, ModeArg, RecoveryArgs};
use crate::output::table;
use crate::p11::Members;
use crate::{luna, Ctx, Res};
use pkcs11_ha::member::MemberLibrary;

/// The group a serial belongs to, and its role there.
pub fn membership<'c>(config: &'c Config, serial: &str) -> Option<(&'c GroupConfig, &'static str)> {
    config.groups.iter().find_map(|g| {
        if g.members.iter().any(|m| m == serial) {
            Some((g, "active"))
        } else if g.standby.iter().any(|m| m == serial) {
            Some((g, "standby"))
        } else {
            None
        }
    })
}

/// Short names of the token flags that matter to an operator.
pub fn flag_names(flags: CK_FLAGS) -> Vec<&'static str> {
    [
        (CKF_TOKEN_INITIALIZED, "initialized"),
        (CKF_LOGIN_REQUIRED, "login"),
        (CKF_USER_PIN_INITIALIZED, "pin"),
        (CKF_PROTECTED_AUTHENTICATION_PATH, "pinpad"),
        (CKF_RNG, "rng"),
        (CKF_WRITE_PROTECTED, "write-protected"),
        (CKF_USER_PIN_LOCKED, "pin-locked"),
        (CKF_USER_PIN_TO_BE_CHANGED, "pin-to-change"),
        (CKF_SO_PIN_LOCKED, "so-pin-locked"),
    ]
    .into_iter()
    .filter(|(flag, _)| flags & flag != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Warns about libraries that could not be loaded (their tokens show as down).
pub fn warn_failures(members: &Members) {
    for (name, why) in members.failures() {
        eprintln!("pkcs11-ha: warning: library {name}: {why}");
    }
}

pub fn slots(ctx: &Ctx) -> Res<ExitCode> {
    let config = ctx.load()?;
    let members = Members::open(&config);
    warn_failures(&members);
    let tokens = members.tokens();
    let mut rows = Vec::new();
    let mut list = Vec::new();
    for token in &tokens {
        let group = membership(&config, &token.serial);
        let group_text = match group {
            Some((g, "standby")) => format!("{} (standby)", g.label),
            Some((g, _)) => g.label.clone(),
            None => "-".into(),
        };
        rows.push(vec![
            token.library_name.clone(),
            token.slot.to_string(),
            token.serial.clone(),
            token.label.clone(),
            token.model.clone(),
            flag_names(token.flags).join(","),
            group_text,
        ]);
        list.push(json!({
            "library": token.library_name,
            "slot": token.slot,
            "passthrough_slot": token.passthrough_slot(),
            "serial": token.serial,
            "label": token.label,
            "model": token.model,
            "manufacturer": token.manufacturer,
            "flags": flag_names(token.flags),
            "group": group.map(|(g, _)| g.label.clone()),
            "role": group.map(|(_, role)| role),
        }));
    }
    if tokens.is_empty() {
        ctx.say("No token found in the configured libraries.");
    } else {
        ctx.say(table(
            &[
                "Library", "Slot", "Serial", "Label", "Model", "Flags", "Group",
            ],
            &rows,
        ));
    }
    let errors: Vec<_> = members
        .failures()
        .into_iter()
        .map(|(library, error)| json!({ "library": library, "error": error }))
        .collect();
    ctx.emit(&json!({ "tokens": list, "library_errors": errors }));
    Ok(ExitCode::SUCCESS)
}

pub fn ha_only(ctx: &Ctx, enable: Option<bool>) -> Res<ExitCode> {
    let _lock = enable.map(|_| ctx.lock()).transpose()?;
    let mut config = ctx.load()?;
    if let Some(enable) = enable {
        if enable && config.groups.is_empty() {
            return Err(
                "no group is configured, so HAOnly would hide every slot; create a \
                        group first with `pkcs11-ha group create`"
                    .into(),
            );
        }
        config.ha_only = enable;
        ctx.save(&config)?;
    }
    let state = if config.ha_only {
        "enabled"
    } else {
        "disabled"
    };
    let what = if config.ha_only {
        "applications see only the virtual slots"
    } else {
        "applications see the virtual slots and the member tokens' own slots"
    };
    ctx.say(format!("HA Only mode: {state} ({what})"));
    ctx.emit(&json!({ "ha_only": config.ha_only }));
    Ok(ExitCode::SUCCESS)
}

pub fn recovery(ctx: &Ctx, args: &RecoveryArgs) -> Res<ExitCode> {
    let change = args.retries.is_some() || args.interval.is_some() || args.mode.is_some();
    let _lock = change.then(|| ctx.lock()).transpose()?;
    let mut config = ctx.load()?;
    if let Some(retries) = args.retries {
        if retries < -1 {
            return Err(format!(
                "--retries {retries} is not accepted; give -1 to try forever, 0 to turn \
                 auto-recovery off, or a number of attempts"
            ));
        }
        config.recovery.attempts = retries;
    }
    if let Some(interval) = args.interval {
        config.recovery.interval_secs = interval;
    }
    if let Some(mode) = args.mode {
        config.recovery.mode = match mode {
            ModeArg::ActiveEnhanced => RecoveryMode::ActiveEnhanced,
            ModeArg::ActiveBasic => RecoveryMode::ActiveBasic,
        };
    }
    if change {
        ctx.save(&config)?;
    }
    let r = &config.recovery;
    let retries = match r.attempts {
        -1 => "-1 (forever)".to_owned(),
        0 => "0 (auto-recovery off)".to_owned(),
        n => n.to_string(),
    };
    ctx.say(format!(
        "Recovery attempts (reconnAtt):              {retries}"
    ));
    ctx.say(format!(
        "Interval (AutoReconnectInterval):          {} s",
        r.interval_secs
    ));
    ctx.say(format!(
        "Mode (VirtualTokenActiveRecovery):         {}",
        r.mode
    ));
    ctx.emit(&json!({
        "retries": r.attempts,
        "interval": r.interval_secs,
        "mode": r.mode.as_str(),
    }));
    Ok(ExitCode::SUCCESS)
}

pub fn log(ctx: &Ctx, args: &LogArgs) -> Res<ExitCode> {
    let change = args.enable
        || args.disable
        || args.path.is_some()
        || args.max_size.is_some()
        || args.repeats.is_some();
    let _lock = change.then(|| ctx.lock()).transpose()?;
    let mut config = ctx.load()?;
    if let Some(path) = &args.path {
        let path = std::path::absolute(path)
            .map_err(|e| format!("cannot make {} absolute: {e}", path.display()))?;
        if !path.is_dir() {
            return Err(format!(
                "{} is not a directory; create it first (writable by the applications' user): \
                 the log is {} in it",
                path.display(),
                HA_LOG_FILE
            ));
        }
        config.ha_log.path = Some(path);
    }
    if args.enable {
        if config.ha_log.path.is_none() {
            return Err("the HA log needs a directory; give --path DIR".into());
        }
        config.ha_log.enabled = true;
    }
    if args.disable {
        config.ha_log.enabled = false;
    }
    if let Some(max) = args.max_size {
        config.ha_log.max_len = max;
    }
    if let Some(repeats) = args.repeats {
        config.ha_log.repeats = repeats;
    }
    if change {
        ctx.save(&config)?;
    }
    let log = &config.ha_log;
    let path = log
        .path
        .as_ref()
        .map_or("<not set>".to_owned(), |p| p.display().to_string());
    ctx.say(format!(
        "HA log (haLogStatus):   {}",
        if log.enabled { "enabled" } else { "disabled" }
    ));
    ctx.say(format!("Directory (haLogPath): {path}"));
    ctx.say(format!(
        "Rotate at (logLen):     {}",
        if log.max_len == 0 {
            "never".to_owned()
        } else {
            format!("{} bytes", log.max_len)
        }
    ));
    ctx.say(format!(
        "Repeats (logRepeats):   {}",
        if log.repeats == 0 {
            "every one written".to_owned()
        } else {
            format!("{} a minute per event, then counted", log.repeats)
        }
    ));
    ctx.emit(&json!({
        "enabled": log.enabled,
        "path": log.path,
        "file": log.path.as_ref().map(|p| p.join(HA_LOG_FILE)),
        "max_size": log.max_len,
        "repeats": log.repeats,
    }));
    Ok(ExitCode::SUCCESS)
}

/// What the imported configuration will trip over on this machine: an HA
/// log directory that does not exist, a library that does not load.
fn import_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(path) = config.ha_log.path.as_ref().filter(|p| !p.is_dir()) {
        warnings.push(format!(
            "haLogPath {} does not exist here, so applications cannot write the HA log; create \
             it (writable by the applications' user) or set another with `pkcs11-ha log --path DIR`",
            path.display()
        ));
    }
    for library in &config.libraries {
        if let Err(why) = MemberLibrary::load(&library.name, &library.path, &library.environment) {
            warnings.push(format!(
                "library {}: {why}; install the Luna client there, or import again with \
                 --library-path PATH --force",
                library.name
            ));
        }
    }
    warnings
}

pub fn import_luna(ctx: &Ctx, args: &ImportArgs) -> Res<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let parsed = luna::parse(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let imported = luna::import(
        &parsed,
        &ctx.config_path,
        &args.library_name,
        args.library_path.as_deref(),
    )
    .map_err(|e| format!("{}: {e}", args.file.display()))?;
    let _lock = ctx.lock()?;
    if ctx.config_path.exists() && !args.force {
        return Err(format!(
            "{} exists; pass --force to replace it, or --config to write elsewhere",
            ctx.config_path.display()
        ));
    }
    ctx.save(&imported.config)?;
    let config = &imported.config;
    let warnings = import_warnings(config);
    for warning in &warnings {
        eprintln!("pkcs11-ha: warning: {warning}");
    }
    ctx.say(format!(
        "Imported {} ({}) into {}: {} group(s), HAOnly {}.",
        args.file.display(),
        parsed.format,
        ctx.config_path.display(),
        config.groups.len(),
        u8::from(config.ha_only)
    ));
    for note in &imported.notes {
        ctx.say(format!("  {note}"));
    }
    if !imported.ignored.is_empty() {
        ctx.say("Luna settings with no pkcs11-ha equivalent (not imported):");
        for key in &imported.ignored {
            ctx.say(format!("  {key}"));
        }
    }
    ctx.emit(&json!({
        "ok": true,
        "source": args.file,
        "format": parsed.format,
        "written": ctx.config_path,
        "groups": config.groups.iter().map(|g| &g.label).collect::<Vec<_>>(),
        "notes": imported.notes,
        "ignored": imported.ignored,
        "warnings": warnings,
    }));
    Ok(ExitCode::SUCCESS)
}
