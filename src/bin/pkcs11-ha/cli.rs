//! The command line: verbs, options and their help texts (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::creds::{DomainSecretArgs, PinArgs, SoPinArgs};

/// Manage pkcs11-ha HA groups: create them from member tokens after
/// checking Luna's prerequisites, add and remove members, synchronise
/// their objects, and set HAOnly, auto-recovery and the HA log.
///
/// Edits the configuration file named by --config, else $PKCS11_HA_CONF,
/// else /etc/pkcs11-ha.conf (written atomically, mode 0600), and talks to
/// the member tokens directly through the libraries in its [Libraries].
/// PINs and the domain secret are read from a prompt without echo, or from
/// a file or environment variable named by a flag -- never from the
/// command line itself.
#[derive(Parser, Debug)]
#[command(name = "pkcs11-ha", version, max_term_width = 100)]
pub struct Cli {
    /// The pkcs11-ha configuration file [default: $PKCS11_HA_CONF, else /etc/pkcs11-ha.conf]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the result as JSON on standard output
    #[arg(long, global = true)]
    pub json: bool,
    /// Milliseconds to wait for a member library to initialise and list its tokens; one that
    /// has not answered by then is shown as not answering
    #[arg(long, global = true, value_name = "MS", default_value_t = 10_000)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a new configuration file (refuses to replace one without --force)
    Init(InitArgs),
    /// Add, remove or check the PKCS#11 libraries of [Libraries]
    #[command(subcommand)]
    Library(LibraryCommand),
    /// List every token of every configured library and the group it is in
    Slots,
    /// Every group's health, for people and monitoring: exit 0 when every
    /// member serves, 1 when a group is degraded, 2 when a group has no
    /// serving member or the configuration is unusable
    Status(StatusArgs),
    /// Create, change, list, synchronise and recover HA groups
    #[command(subcommand)]
    Group(GroupCommand),
    /// Show applications only the virtual slots (HAOnly), or the member slots too
    #[command(subcommand)]
    HaOnly(HaOnlyCommand),
    /// Set or show auto-recovery: reconnAtt, AutoReconnectInterval and
    /// VirtualTokenActiveRecovery
    Recovery(RecoveryArgs),
    /// Read the HA log (rotated files too), or set or show its settings:
    /// haLogStatus, haLogPath and logLen
    Log(LogArgs),
    /// Write the pkcs11-ha configuration equivalent to a Luna client's
    /// Chrystoki.conf or crystoki.ini
    ImportLuna(ImportArgs),
    /// Print the p11-kit module file that loads pkcs11-ha, or install it
    P11KitModule(P11KitModuleArgs),
}

/// A `NAME=VALUE` pair of the command line.
fn name_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() && !value.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("\"{text}\" is not NAME=VALUE")),
    }
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// A member library, as NAME=PATH (repeat for several)
    #[arg(long = "library", value_name = "NAME=PATH", value_parser = name_value)]
    pub libraries: Vec<(String, String)>,
    /// Replace the configuration file if it exists
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum LibraryCommand {
    /// Add a [Libraries] entry after checking that the library loads
    Add(LibraryAddArgs),
    /// Remove a [Libraries] entry that no group member lives in
    Remove(LibraryNameArg),
    /// Check every library: it loads, exports C_GetFunctionList, and its tokens
    List,
}

#[derive(Args, Debug)]
pub struct LibraryAddArgs {
    /// The entry's name ([Libraries] NAME = PATH)
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The PKCS#11 library
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// An environment variable set while the library starts, as VAR=VALUE
    /// ([LibraryEnvironment] NAME.VAR); repeat for several
    #[arg(long = "env", value_name = "VAR=VALUE", value_parser = name_value)]
    pub environment: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct LibraryNameArg {
    /// The entry's name
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// How `status` prints.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFormat {
    /// A table per group
    Text,
    /// One JSON document (as --json)
    Json,
    /// Prometheus text format, for node_exporter's textfile collector
    Prometheus,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this group
    #[arg(long, value_name = "LABEL")]
    pub group: Option<String>,
    /// Output format [default: text, json with --json]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<StatusFormat>,
    /// Log in to compare private objects too (pending changes); without a
    /// PIN only public objects are compared and nothing is asked
    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Args, Debug)]
pub struct P11KitModuleArgs {
    /// Write it to /usr/share/p11-kit/modules/pkcs11-ha.module (or --dir)
    #[arg(long)]
    pub install: bool,
    /// With --install: the p11-kit modules directory
    #[arg(long, value_name = "DIR", requires = "install")]
    pub dir: Option<PathBuf>,
    /// The provider library [default: libpkcs11_ha.so beside this program]
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group with one member, its primary, after checking it
    Create(CreateArgs),
    /// Add a member to a group after checking it
    AddMember(AddMemberArgs),
    /// Add a standby member to a group after checking it (Luna's addStandby)
    AddStandby(AddMemberArgs),
    /// Remove a member (active or standby) from a group; its objects stay
    RemoveMember(MemberArgs),
    /// Delete a group; the objects stay on the members
    Delete(GroupArg),
    /// Show each group, its members' live status and whether it needs a sync
    List(ListArgs),
    /// Copy to each member the objects it lacks
    Sync(SyncArgs),
    /// Make a member standby (serves only when every active member is down), or active again
    #[command(subcommand)]
    Standby(StandbyCommand),
    /// Probe every member now and copy to the reachable ones what they lack
    Recover(SyncArgs),
}

#[derive(Subcommand, Debug)]
pub enum StandbyCommand {
    /// Make an active member standby
    Add(MemberArgs),
    /// Make a standby member active again
    Remove(MemberArgs),
}

#[derive(Subcommand, Debug)]
pub enum HaOnlyCommand {
    /// Show only the virtual slots (HAOnly = 1)
    Enable,
    /// Show the member slots too (HAOnly = 0)
    Disable,
    /// Show the setting
    Show,
}

/// A member token, by slot or serial.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Selector {
    /// The token's slot: its library's slot ID, as `pkcs11-ha slots` shows it
    #[arg(long, value_name = "N")]
    pub slot: Option<u64>,
    /// The token's serial number
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    #[command(flatten)]
    pub which: Selector,
    /// With --slot: the [Libraries] entry, when several libraries have that slot
    #[arg(long, value_name = "NAME", requires = "slot")]
    pub library: Option<String>,
}

/// The options of the prerequisite checks.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Create the group's domain key on the token (needs the member's SO PIN and the domain secret)
    #[arg(long)]
    pub provision_domain: bool,
    /// Skip the checks that are safe to skip (token flags, mechanisms); the others still apply
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub pin: PinArgs,
    #[command(flatten)]
    pub so_pin: SoPinArgs,
    #[command(flatten)]
    pub domain_secret: DomainSecretArgs,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The group label applications will see as the token label (not "HA")
    #[arg(long, value_name = "LABEL")]
    pub label: String,
    #[command(flatten)]
    pub target: Target,
    /// Label of the group's domain key [default: pkcs11-ha-domain]
    #[arg(long, value_name = "LABEL")]
    pub domain_label: Option<String>,
    #[command(flatten)]
    pub checks: CheckArgs,
}

/// What to do with objects already on a new member.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectsChoice {
    /// Keep them; `group sync` copies them to the other members
    Copy,
    /// Destroy them before the token joins
    Remove,
    /// Do not add the member
    Quit,
}

#[derive(Args, Debug)]
pub struct AddMemberArgs {
    /// The group's label
    #[arg(long, value_name = "LABEL")]
    pub group: String,
    #[command(flatten)]
    pub target: Target,
    /// What to do when the new member holds objects [default: ask]
    #[arg(long, value_enum, value_name = "CHOICE")]
    pub objects: Option<ObjectsChoice>,
    /// Synchronise the group right after adding the member
    #[arg(long)]
    pub sync: bool,
    #[command(flatten)]
    pub checks: CheckArgs,
}

#[derive(Args, Debug)]
pub struct MemberArgs {
    /// The group's label
    #[arg(long, value_name = "LABEL")]
    pub group: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct GroupArg {
    /// The group's label
    #[arg(long, value_name = "LABEL")]
    pub group: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this group
    #[arg(long, value_name = "LABEL")]
    pub group: Option<String>,
    /// Do not log in: compare only public objects for "needs sync"
    #[arg(long)]
    pub no_login: bool,
    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The group's label
    #[arg(long, value_name = "LABEL")]
    pub group: String,
    /// Run every check of the copy (domain keys, extractability, wrap
    /// support) and say which copies would fail; copy nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub pin: PinArgs,
}

/// `VirtualTokenActiveRecovery`, in Luna's spelling.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeArg {
    /// Reopen member sessions and log in at recovery (the default)
    #[value(name = "activeEnhanced")]
    ActiveEnhanced,
    /// Reopen member sessions only when a call needs them
    #[value(name = "activeBasic")]
    ActiveBasic,
}

#[derive(Args, Debug)]
pub struct RecoveryArgs {
    /// reconnAtt: recovery attempts after a member fails; -1 forever, 0 no auto-recovery
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub retries: Option<i64>,
    /// AutoReconnectInterval: seconds between attempts (1 to 86400)
    #[arg(long, value_name = "SECONDS")]
    pub interval: Option<u64>,
    /// VirtualTokenActiveRecovery
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<ModeArg>,
}

/// `log` reads the log unless a setting is given or --settings asks for them.
#[derive(Args, Debug)]
pub struct LogArgs {
    /// Keep printing events as they are written (until interrupted)
    #[arg(long)]
    pub follow: bool,
    /// Only events at or after TIME: UTC as 2026-12-03, 2026-12-03T07:15,
    /// 2026-12-03T07:15:30Z, or an age such as 90s, 15m, 2h, 1d
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only events of the member with this serial
    #[arg(long, value_name = "SERIAL")]
    pub member: Option<String>,
    /// Show the settings instead of the events
    #[arg(long)]
    pub settings: bool,
    /// haLogStatus = enabled (needs a directory: --path, or one set before)
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// haLogStatus = disabled
    #[arg(long)]
    pub disable: bool,
    /// haLogPath: the directory of haErrorLog.txt (must exist)
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// logLen: rotate the log at this many bytes; 0 never rotates
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,
    /// logRepeats: write one repeating event this many times a minute,
    /// then count the rest; 0 writes every one
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Luna's Chrystoki.conf or crystoki.ini
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Name of the [Libraries] entry for Luna's library
    #[arg(long, value_name = "NAME", default_value = "luna")]
    pub library_name: String,
    /// Use this library path instead of Chrystoki2's LibUNIX64 / LibUNIX / LibNT
    #[arg(long, value_name = "PATH")]
    pub library_path: Option<PathBuf>,
    /// Replace the configuration file if it exists
    #[arg(long)]
    pub force: bool,
}
