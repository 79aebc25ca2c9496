//! Settings `C_Initialize` accepts but that do not do what they say, found
//! once the members are loaded: a member serial no library has, a domain
//! label no member holds, an HA log directory that cannot be written. Each
//! is one line on stderr naming the file, section and key (and one in the
//! HA log where that is on); the library starts all the same, since each
//! may be a member or directory that is merely not there yet. Errors in the
//! file itself are `config`'s, and stop `C_Initialize`.

use crate::config::{self, Config, ConfigError, HA_CONFIGURATION, HA_LOG_PATH, VIRTUAL_TOKEN};
use crate::group::Group;
use crate::identity::{self, Fingerprint};
use crate::member::MemberLibrary;
use crate::member_api::MemberBackend;
use cryptoki_sys::*;
use std::sync::Arc;

fn warning(config: &Config, section: &str, key: String, problem: String) -> ConfigError {
    ConfigError {
        file: config.path.clone(),
        section: Some(section.to_owned()),
        key: Some(key),
        problem,
    }
}

fn print(warning: &ConfigError) {
    eprintln!("pkcs11-ha: warning: {warning}");
}

/// `haLogStatus = enabled`, but the log file cannot be written.
pub fn ha_log_unwritable(config: &Config, directory: &std::path::Path, why: &std::io::Error) {
    print(&warning(
        config,
        HA_CONFIGURATION,
        HA_LOG_PATH.to_owned(),
        format!(
            "cannot write {} ({why}); nothing is logged until it can be. Create the \
             directory and let this process write to it, or set haLogStatus = disabled",
            directory.join(config::HA_LOG_FILE).display()
        ),
    ));
}

/// The state directory cannot be used: no process reconciles the groups
/// (see `reconcile.rs`) until it can.
pub fn state_dir_unusable(config: &Config, directory: Option<&std::path::Path>, why: &str) {
    let place = directory.map_or(
        "no default state directory (HOME is not set)".to_owned(),
        |d| format!("the state directory {}: {why}", d.display()),
    );
    print(&warning(
        config,
        HA_CONFIGURATION,
        config::HA_STATE_DIR.to_owned(),
        format!(
            "{place}; members are not reconciled across processes (what a member missed \
             reaches it only through this process's recovery or `pkcs11-ha group sync`). Set \
             {} to a directory this process may create or own",
            config::HA_STATE_DIR
        ),
    ));
}

/// Members no configured library has, and groups whose members hold no
/// domain key: checked once the libraries are loaded.
pub fn check_members(config: &Config, groups: &[Arc<Group>], libraries: &[Arc<MemberLibrary>]) {
    let names: Vec<&str> = libraries.iter().map(|l| l.name.as_str()).collect();
    // A library that failed or did not answer may hold the missing tokens:
    // those members are left to recovery, and the HA log says so.
    let all_answered = libraries.iter().all(|l| l.usable());
    for (group, settings) in groups.iter().zip(&config.groups) {
        let missing = group.members.iter().filter(|m| m.location().is_none());
        for member in missing.filter(|_| all_answered) {
            let found = warning(
                config,
                VIRTUAL_TOKEN,
                config::member_list_key(settings.index, member.standby),
                format!(
                    "no slot of the configured libraries ({}) holds token {}; the member is \
                     down until recovery finds it. Check the serial (`pkcs11-ha slots` lists \
                     every token), or add its library under [Libraries]",
                    names.join(", "),
                    member.serial
                ),
            );
            print(&found);
            group.log(
                Some(member.position),
                &format!("config warning: {}", found.problem),
            );
        }
        let present: Vec<_> = group.members.iter().filter_map(|m| m.location()).collect();
        // One member alone has nothing to copy keys to; Luna partitions
        // that clone to each other need no domain key.
        if present.len() < 2 || group.all_members_clone() {
            continue;
        }
        let holds_domain_key = present
            .iter()
            .any(|at| holds_secret_key(&*at.library, at.slot, &settings.domain_label));
        if !holds_domain_key {
            let missing = warning(
                config,
                VIRTUAL_TOKEN,
                config::domain_label_key(settings.index),
                format!(
                    "no member token holds a secret key labelled \"{}\" (the group's domain \
                     key), so keys made on one member cannot reach the others. Provision it \
                     with `pkcs11-ha group add-member --provision-domain`, or give the label \
                     the members' key has",
                    settings.domain_label
                ),
            );
            print(&missing);
            group.log(None, &format!("config warning: {}", missing.problem));
        }
    }
}

/// Whether the token in `slot` holds a public secret key labelled `label`
/// (the domain key is public: it can be found before anyone logs in).
fn holds_secret_key(library: &dyn MemberBackend, slot: CK_SLOT_ID, label: &str) -> bool {
    let mut session: CK_SESSION_HANDLE = 0;
    let opened = library.open_session(slot, CKF_SERIAL_SESSION, &mut session);
    if opened != CKR_OK {
        // Not a configuration problem: the member says why when it is used.
        return true;
    }
    let print: Fingerprint = vec![
        (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
        (CKA_LABEL, label.as_bytes().to_vec()),
    ];
    let found = identity::find(library, session, &print);
    library.close_session(session);
    found.map_or(true, |handles| !handles.is_empty())
}
