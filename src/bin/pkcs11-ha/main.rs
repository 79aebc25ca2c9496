//! `pkcs11-ha`: the management CLI of the pkcs11-ha provider (see
//! `docs/cli.md`). It edits the configuration file and talks to the member
//! tokens directly, loading the configured libraries in its own process.
//!
//! Owns: the verbs, the prerequisite checks, group synchronisation and the
//! Luna import. Never: reads a credential from a plain argument, prints a
//! PIN or key material, or leaves the configuration half-written.
#![deny(unsafe_op_in_unsafe_fn)]

mod checks;
mod cli;
mod creds;
mod domain;
mod groups;
mod logread;
mod luna;
mod mechanisms;
mod output;
mod p11;
mod settings;
mod setup;
mod status;
mod sync;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser as _;
use pkcs11_ha::config::Config;

use crate::cli::{
    Cli, Command, GroupCommand, HaOnlyCommand, LibraryCommand, LogArgs, StandbyCommand,
};

/// A failure for the operator: printed as `pkcs11-ha: error: ...`, exit 1.
pub type Res<T> = Result<T, String>;

/// What every verb gets.
pub struct Ctx {
    pub config_path: PathBuf,
    pub json: bool,
}

impl Ctx {
    /// A line for people; nothing in JSON mode.
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.json {
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = writeln!(std::io::stdout(), "{}", line.as_ref());
        }
    }

    /// The result as JSON; nothing in text mode.
    pub fn emit(&self, value: &serde_json::Value) {
        if self.json {
            let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
            let _ = writeln!(std::io::stdout(), "{text}");
        }
    }

    pub fn load(&self) -> Res<Config> {
        Config::load(&self.config_path).map_err(|e| e.to_string())
    }

    /// Checks `config` as the provider will read it, then writes it
    /// atomically (temp file, rename; mode 0600).
    pub fn save(&self, config: &Config) -> Res<()> {
        Config::parse(&self.config_path, &config.to_ini_string())
            .map_err(|e| format!("the change would make the configuration invalid: {e}"))?;
        self.write_unchecked(config)
    }

    /// Writes `config` atomically without the provider's checks: only for
    /// `init` without a library, a file the provider is meant to refuse
    /// until one is added.
    pub fn write_unchecked(&self, config: &Config) -> Res<()> {
        config
            .save(&self.config_path)
            .map_err(|e| self.not_writable(&e).unwrap_or_else(|| e.to_string()))
    }

    /// The directory the configuration file and its lock file live in.
    fn config_dir(&self) -> &Path {
        match self.config_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// What to do when the configuration's directory refuses writes.
    fn not_writable(&self, error: &std::io::Error) -> Option<String> {
        let refused = error.kind() == std::io::ErrorKind::PermissionDenied
            || error.raw_os_error() == Some(libc::EROFS);
        refused.then(|| {
            format!(
                "cannot write the configuration file {}: its directory {} is not writable \
                 ({error}); pkcs11-ha writes a new file and a lock file there and renames the \
                 new file over the old one. Run as a user who may write {}, or give --config \
                 FILE in a writable directory",
                self.config_path.display(),
                self.config_dir().display(),
                self.config_dir().display()
            )
        })
    }

    /// Serialises configuration edits between CLI processes: an exclusive
    /// `flock` on `.<name>.lock` beside the file, held until dropped.
    pub fn lock(&self) -> Res<fs::File> {
        let name = self
            .config_path
            .file_name()
            .ok_or_else(|| format!("{} names no file", self.config_path.display()))?;
        let path = self
            .config_dir()
            .join(format!(".{}.lock", name.to_string_lossy()));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                self.not_writable(&e)
                    .unwrap_or_else(|| format!("cannot open the lock file {}: {e}", path.display()))
            })?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
        Ok(file)
    }
}

fn run(cli: Cli) -> Res<ExitCode> {
    p11::set_timeout(std::time::Duration::from_millis(cli.timeout));
    let ctx = Ctx {
        config_path: cli.config.clone().unwrap_or_else(Config::locate),
        json: cli.json,
    };
    match cli.command {
        Command::Init(args) => setup::init(&ctx, &args),
        Command::Library(LibraryCommand::Add(args)) => setup::library_add(&ctx, &args),
        Command::Library(LibraryCommand::Remove(args)) => setup::library_remove(&ctx, &args.name),
        Command::Library(LibraryCommand::List) => setup::library_list(&ctx),
        Command::Slots => settings::slots(&ctx),
        Command::Status(args) => Ok(status::status(&ctx, &args)),
        Command::Group(command) => match command {
            GroupCommand::Create(args) => groups::create(&ctx, &args),
            GroupCommand::AddMember(args) => groups::add_member(&ctx, &args, false),
            GroupCommand::AddStandby(args) => groups::add_member(&ctx, &args, true),
            GroupCommand::RemoveMember(args) => groups::remove_member(&ctx, &args),
            GroupCommand::Delete(args) => groups::delete(&ctx, &args.group),
            GroupCommand::List(args) => groups::list(&ctx, &args),
            GroupCommand::Sync(args) => groups::sync(&ctx, &args, false),
            GroupCommand::Recover(args) => groups::sync(&ctx, &args, true),
            GroupCommand::Standby(StandbyCommand::Add(args)) => groups::standby(&ctx, &args, true),
            GroupCommand::Standby(StandbyCommand::Remove(args)) => {
                groups::standby(&ctx, &args, false)
            }
        },
        Command::HaOnly(command) => settings::ha_only(
            &ctx,
            match command {
                HaOnlyCommand::Enable => Some(true),
                HaOnlyCommand::Disable => Some(false),
                HaOnlyCommand::Show => None,
            },
        ),
        Command::Recovery(args) => settings::recovery(&ctx, &args),
        Command::Log(args) => log(&ctx, &args),
        Command::ImportLuna(args) => settings::import_luna(&ctx, &args),
        Command::P11KitModule(args) => setup::p11kit_module(&ctx, &args),
    }
}

/// `log` changes or shows the settings when asked to, else reads the log.
fn log(ctx: &Ctx, args: &LogArgs) -> Res<ExitCode> {
    let change = args.enable
        || args.disable
        || args.path.is_some()
        || args.max_size.is_some()
        || args.repeats.is_some();
    let reading = args.follow || args.since.is_some() || args.member.is_some();
    match (change || args.settings, reading) {
        (true, true) => Err(
            "--follow, --since and --member read the log; give them without the settings \
             options (--settings, --enable, --disable, --path, --max-size, --repeats)"
                .into(),
        ),
        (true, false) => settings::log(ctx, args),
        (false, _) => logread::read(ctx, args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("pkcs11-ha: error: {message}");
            if json {
                let value = serde_json::json!({ "ok": false, "error": message });
                println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
            }
            ExitCode::FAILURE
        }
    }
}
