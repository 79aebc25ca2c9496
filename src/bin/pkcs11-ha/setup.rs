//! Starting from nothing: `init` writes a new configuration, `library
//! add|remove|list` edit and check its `[Libraries]`, and `p11-kit-module`
//! prints or installs the p11-kit module file that loads pkcs11-ha.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pkcs11_ha::config::{Config, LibraryConfig};
use pkcs11_ha::member::MemberLibrary;
use serde_json::{json, Value};

use crate::cli::{InitArgs, LibraryAddArgs, P11KitModuleArgs};
use crate::output::table;
use crate::p11::Members;
use crate::settings::membership;
use crate::{Ctx, Res};

/// Where p11-kit looks for module files on Debian and most distributions.
const P11KIT_MODULES_DIR: &str = "/usr/share/p11-kit/modules";
/// The module file's name; p11-kit names the module after it.
const P11KIT_MODULE_FILE: &str = "pkcs11-ha.module";
/// The provider library's file name.
const PROVIDER_FILE: &str = "libpkcs11_ha.so";
/// The `[Libraries]` section, as the error of a file without libraries names it.
const LIBRARIES_SECTION: &str = "Libraries";

/// A library name must survive the INI file and `[LibraryEnvironment]`'s
/// `NAME.VAR` keys.
fn check_library_name(name: &str) -> Res<()> {
    let fits = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if fits {
        Ok(())
    } else {
        Err(format!(
            "the library name \"{name}\" cannot be used; give letters, digits, '-' or '_' only \
             (it becomes the [Libraries] key and the prefix of its [LibraryEnvironment] keys)"
        ))
    }
}

/// Loads `path` as a PKCS#11 library: it must load and export its function
/// list. Returns how many tokens it shows, or why it cannot start.
fn probe(name: &str, path: &Path, environment: &[(String, String)]) -> Res<Result<usize, String>> {
    if !path.is_absolute() {
        return Err(format!(
            "{} is not an absolute path; applications load the library from their own working \
             directory, so give the full path",
            path.display()
        ));
    }
    let library = MemberLibrary::load(name, path, environment)
        .map_err(|why| format!("{why}; check the path, or install the library first"))?;
    let tokens = match library.initialize() {
        Ok(()) => {
            let count = library
                .token_slots()
                .map(|s| s.len())
                .map_err(|e| format!("C_GetSlotList returned {}", pkcs11_ha::error::rv_name(e.rv)));
            library.finalize();
            count
        }
        Err(e) => Err(format!(
            "C_Initialize returned {}",
            pkcs11_ha::error::rv_name(e.rv)
        )),
    };
    Ok(tokens)
}

fn say_probe(ctx: &Ctx, name: &str, tokens: &Result<usize, String>) {
    match tokens {
        Ok(count) => ctx.say(format!("Library {name} loads and shows {count} token(s).")),
        Err(why) => eprintln!(
            "pkcs11-ha: warning: library {name} loads but does not start ({why}); its tokens \
             show as down until it does"
        ),
    }
}

pub fn init(ctx: &Ctx, args: &InitArgs) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    if ctx.config_path.exists() && !args.force {
        return Err(format!(
            "{} exists; pass --force to replace it, or --config FILE to write another file",
            ctx.config_path.display()
        ));
    }
    let mut config = Config::default();
    let mut probes = Vec::new();
    for (name, path) in &args.libraries {
        check_library_name(name)?;
        if config.library(name).is_some() {
            return Err(format!(
                "--library {name}=... is given twice (names ignore case)"
            ));
        }
        let path = PathBuf::from(path);
        probes.push((name.clone(), probe(name, &path, &[])?));
        config.libraries.push(LibraryConfig {
            name: name.clone(),
            path,
            environment: Vec::new(),
            concurrency: None,
            instances: None,
        });
    }
    if config.libraries.is_empty() {
        ctx.write_unchecked(&config)?;
    } else {
        ctx.save(&config)?;
    }
    ctx.say(format!(
        "Wrote {} with {} librar{}.",
        ctx.config_path.display(),
        config.libraries.len(),
        if config.libraries.len() == 1 {
            "y"
        } else {
            "ies"
        }
    ));
    for (name, tokens) in &probes {
        say_probe(ctx, name, tokens);
    }
    if config.libraries.is_empty() {
        ctx.say(
            "Applications cannot use it until it names a library: run `pkcs11-ha library add \
             NAME PATH`.",
        );
    } else {
        ctx.say(
            "Next: `pkcs11-ha slots` lists the tokens, `pkcs11-ha group create` makes a group.",
        );
    }
    ctx.emit(&json!({
        "ok": true,
        "written": ctx.config_path,
        "libraries": probes.iter().map(|(name, tokens)| probe_json(name, tokens)).collect::<Vec<_>>(),
    }));
    Ok(ExitCode::SUCCESS)
}

fn probe_json(name: &str, tokens: &Result<usize, String>) -> Value {
    match tokens {
        Ok(count) => json!({ "name": name, "tokens": count }),
        Err(why) => json!({ "name": name, "error": why }),
    }
}

/// The configuration, also when it names no library yet (as `init` without
/// `--library` writes it): then it is read as if it had one, which is
/// dropped again.
fn load_for_library_add(ctx: &Ctx) -> Res<Config> {
    let error = match Config::load(&ctx.config_path) {
        Ok(config) => return Ok(config),
        Err(error) => error,
    };
    let no_library = error
        .section
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case(LIBRARIES_SECTION))
        && error.key.is_none();
    if !no_library {
        return Err(error.to_string());
    }
    let text = std::fs::read_to_string(&ctx.config_path).map_err(|e| e.to_string())?;
    let placeholder = "placeholder = /placeholder";
    let header = text.lines().position(|l| {
        l.trim()
            .eq_ignore_ascii_case(&format!("[{LIBRARIES_SECTION}]"))
    });
    let patched = match header {
        Some(at) => {
            let mut lines: Vec<&str> = text.lines().collect();
            lines.insert(at + 1, placeholder);
            lines.join("\n")
        }
        None => format!("[{LIBRARIES_SECTION}]\n{placeholder}\n{text}"),
    };
    let mut config = Config::parse(&ctx.config_path, &patched).map_err(|_| error.to_string())?;
    config.libraries.clear();
    Ok(config)
}

pub fn library_add(ctx: &Ctx, args: &LibraryAddArgs) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let mut config = load_for_library_add(ctx)?;
    check_library_name(&args.name)?;
    if let Some(existing) = config.library(&args.name) {
        return Err(format!(
            "a library named {} exists already ({}); remove it first with `pkcs11-ha library \
             remove {}`, or choose another name",
            existing.name,
            existing.path.display(),
            existing.name
        ));
    }
    for (variable, _) in &args.environment {
        if variable.contains([' ', '.', ';', '[', ']']) {
            return Err(format!(
                "--env {variable}=...: an environment variable name has no blanks, dots, ';' or \
                 brackets"
            ));
        }
    }
    let tokens = probe(&args.name, &args.path, &args.environment)?;
    config.libraries.push(LibraryConfig {
        name: args.name.clone(),
        path: args.path.clone(),
        environment: args.environment.clone(),
        concurrency: None,
        instances: None,
    });
    ctx.save(&config)?;
    ctx.say(format!(
        "Added library {} = {}.",
        args.name,
        args.path.display()
    ));
    say_probe(ctx, &args.name, &tokens);
    let mut out = probe_json(&args.name, &tokens);
    out["ok"] = json!(true);
    out["path"] = json!(args.path);
    ctx.emit(&out);
    Ok(ExitCode::SUCCESS)
}

pub fn library_remove(ctx: &Ctx, name: &str) -> Res<ExitCode> {
    let _lock = ctx.lock()?;
    let mut config = ctx.load()?;
    let Some(at) = config
        .libraries
        .iter()
        .position(|l| l.name.eq_ignore_ascii_case(name))
    else {
        let names: Vec<&str> = config.libraries.iter().map(|l| l.name.as_str()).collect();
        return Err(format!(
            "no library is named {name} (the libraries are {})",
            names.join(", ")
        ));
    };
    if config.libraries.len() == 1 {
        return Err(format!(
            "{} is the only library, and the configuration needs one; add the new one first \
             with `pkcs11-ha library add`",
            config.libraries[at].name
        ));
    }
    {
        let members = Members::open(&config);
        let in_use: Vec<String> = members
            .tokens()
            .into_iter()
            .filter(|t| t.library == at)
            .filter_map(|t| {
                membership(&config, &t.serial)
                    .map(|(g, _)| format!("{} (group {})", t.serial, g.label))
            })
            .collect();
        if !in_use.is_empty() {
            return Err(format!(
                "library {} holds group members {}; remove them from their groups first with \
                 `pkcs11-ha group remove-member`",
                config.libraries[at].name,
                in_use.join(", ")
            ));
        }
    }
    let removed = config.libraries.remove(at);
    ctx.save(&config)?;
    ctx.say(format!(
        "Removed library {} ({}).",
        removed.name,
        removed.path.display()
    ));
    ctx.emit(&json!({ "ok": true, "removed": removed.name }));
    Ok(ExitCode::SUCCESS)
}

pub fn library_list(ctx: &Ctx) -> Res<ExitCode> {
    let config = ctx.load()?;
    let members = Members::open(&config);
    let tokens = members.tokens();
    let mut rows = Vec::new();
    let mut list = Vec::new();
    for (index, (entry, loaded)) in config.libraries.iter().zip(&members.libraries).enumerate() {
        let own: Vec<_> = tokens.iter().filter(|t| t.library == index).collect();
        let (state, version) = match &loaded.library {
            Ok(library) => {
                let v = library.version();
                ("ok".to_owned(), format!("{}.{}", v.major, v.minor))
            }
            Err(why) => (format!("FAILED: {why}"), "-".to_owned()),
        };
        let serials: Vec<String> = own
            .iter()
            .map(|t| {
                if t.serial.is_empty() {
                    format!("slot {}: no initialised token", t.slot)
                } else {
                    format!("{} \"{}\"", t.serial, t.label)
                }
            })
            .collect();
        rows.push(vec![
            entry.name.clone(),
            entry.path.display().to_string(),
            version.clone(),
            if serials.is_empty() {
                "-".to_owned()
            } else {
                serials.join(", ")
            },
            state.clone(),
        ]);
        list.push(json!({
            "name": entry.name,
            "path": entry.path,
            "environment": entry.environment.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "loads": loaded.library.is_ok(),
            "error": loaded.library.as_ref().err(),
            "cryptoki_version": (version != "-").then_some(version),
            "tokens": own.iter().map(|t| json!({
                "slot": t.slot, "serial": t.serial, "label": t.label, "model": t.model,
            })).collect::<Vec<_>>(),
        }));
    }
    ctx.say(table(
        &["Library", "Path", "Cryptoki", "Tokens", "Status"],
        &rows,
    ));
    let failed = members.failures().len();
    ctx.emit(&json!({ "ok": failed == 0, "libraries": list }));
    if failed > 0 {
        // The listing above is the answer, also in JSON: one document only.
        eprintln!(
            "pkcs11-ha: error: {failed} librar{} cannot be used; fix the path (or the \
             [LibraryEnvironment]) with `pkcs11-ha library remove` and `library add`",
            if failed == 1 { "y" } else { "ies" }
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The provider library: `--module`, else beside this program (as cargo
/// and packages install them), else the system library directory.
fn provider_path(args: &P11KitModuleArgs) -> Res<PathBuf> {
    if let Some(path) = &args.module {
        return std::path::absolute(path)
            .map_err(|e| format!("cannot make {} absolute: {e}", path.display()));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(PROVIDER_FILE)));
    let candidates = beside
        .into_iter()
        .chain([PathBuf::from("/usr/lib/x86_64-linux-gnu/pkcs11").join(PROVIDER_FILE)]);
    let candidates: Vec<PathBuf> = candidates.collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "{PROVIDER_FILE} is not at {}; give its path with --module",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// The module file: p11-kit loads the provider with the configuration
/// named here, so applications of the proxy need no environment variable.
fn module_text(provider: &Path, config: &Path) -> String {
    format!(
        "# pkcs11-ha: HA groups over member tokens, written by `pkcs11-ha p11-kit-module`.\n\
         module: {}\n\
         # Applications loading p11-kit-proxy.so see the groups' virtual slots.\n\
         critical: no\n\
         # The configuration is read from PKCS11_HA_CONF, else {}.\n",
        provider.display(),
        config.display()
    )
}

pub fn p11kit_module(ctx: &Ctx, args: &P11KitModuleArgs) -> Res<ExitCode> {
    let provider = provider_path(args)?;
    let text = module_text(&provider, &ctx.config_path);
    if !args.install {
        if ctx.json {
            ctx.emit(&json!({ "module": provider, "text": text }));
        } else {
            print!("{text}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(P11KIT_MODULES_DIR));
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory; is p11-kit installed? Give its modules directory with --dir",
            dir.display()
        ));
    }
    let path = dir.join(P11KIT_MODULE_FILE);
    std::fs::write(&path, &text).map_err(|e| {
        format!(
            "cannot write {}: {e}; run as root, or give --dir",
            path.display()
        )
    })?;
    ctx.say(format!(
        "Installed {} (module {}). `p11-kit list-modules` shows it as pkcs11-ha.",
        path.display(),
        provider.display()
    ));
    ctx.emit(&json!({ "ok": true, "installed": path, "module": provider }));
    Ok(ExitCode::SUCCESS)
}
