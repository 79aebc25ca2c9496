//! Credentials: the Crypto Officer (user) PIN, the member SO PIN and the
//! domain secret. Each is read from a file (`--...-file`), an environment
//! variable (`--...-env`) or a prompt without echo -- never from a plain
//! command-line argument, which any user can read in `ps`. Values are kept
//! in zeroizing buffers and never printed.

use std::path::{Path, PathBuf};

use clap::Args;
use zeroize::Zeroizing;

/// Where the Crypto Officer PIN comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct PinArgs {
    /// Read the Crypto Officer (user) PIN from FILE (its first line)
    #[arg(long, value_name = "FILE", conflicts_with = "pin_env")]
    pub pin_file: Option<PathBuf>,
    /// Read the Crypto Officer (user) PIN from the environment variable VAR
    #[arg(long, value_name = "VAR")]
    pub pin_env: Option<String>,
}

/// Where the member's Security Officer PIN comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct SoPinArgs {
    /// Read the member's SO PIN (for --provision-domain) from FILE
    #[arg(long, value_name = "FILE", conflicts_with = "so_pin_env")]
    pub so_pin_file: Option<PathBuf>,
    /// Read the member's SO PIN (for --provision-domain) from VAR
    #[arg(long, value_name = "VAR")]
    pub so_pin_env: Option<String>,
}

/// Where the domain secret comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct DomainSecretArgs {
    /// Read the domain secret (for --provision-domain) from FILE
    #[arg(long, value_name = "FILE", conflicts_with = "domain_secret_env")]
    pub domain_secret_file: Option<PathBuf>,
    /// Read the domain secret (for --provision-domain) from VAR
    #[arg(long, value_name = "VAR")]
    pub domain_secret_env: Option<String>,
}

pub type Secret = Zeroizing<Vec<u8>>;

/// One credential's sources.
pub struct Source<'a> {
    /// "the Crypto Officer PIN", for messages and the prompt.
    pub what: &'a str,
    /// The flag names, for messages: ("--pin-file", "--pin-env").
    pub flags: (&'a str, &'a str),
    pub file: Option<&'a PathBuf>,
    pub env: Option<&'a str>,
}

impl PinArgs {
    pub fn source(&self) -> Source<'_> {
        Source {
            what: "the Crypto Officer (user) PIN",
            flags: ("--pin-file", "--pin-env"),
            file: self.pin_file.as_ref(),
            env: self.pin_env.as_deref(),
        }
    }

    pub fn given(&self) -> bool {
        self.pin_file.is_some() || self.pin_env.is_some()
    }
}

impl SoPinArgs {
    pub fn source(&self) -> Source<'_> {
        Source {
            what: "the member's Security Officer PIN",
            flags: ("--so-pin-file", "--so-pin-env"),
            file: self.so_pin_file.as_ref(),
            env: self.so_pin_env.as_deref(),
        }
    }
}

impl DomainSecretArgs {
    pub fn source(&self) -> Source<'_> {
        Source {
            what: "the domain secret",
            flags: ("--domain-secret-file", "--domain-secret-env"),
            file: self.domain_secret_file.as_ref(),
            env: self.domain_secret_env.as_deref(),
        }
    }
}

/// Removes one trailing line end ("\n" or "\r\n").
fn strip_line_end(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

/// Refuses a credential file other users may read or change, as ssh
/// refuses such key files: its mode must give them nothing (`chmod 600`).
fn refuse_open_file(what: &str, flag: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} from {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{flag} {}: the file is open to other users (mode {:04o}), so {what} in it is not \
             secret; make it private with `chmod 600 {}` and change the credential if others \
             may have read it",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

impl Source<'_> {
    /// Reads the credential: file, environment, else a prompt on the
    /// terminal without echo (asked twice when `confirm`).
    pub fn read(&self, prompt: &str, confirm: bool) -> Result<Secret, String> {
        let value = if let Some(path) = self.file {
            refuse_open_file(self.what, self.flags.0, path)?;
            let mut bytes =
                Zeroizing::new(std::fs::read(path).map_err(|e| {
                    format!("cannot read {} from {}: {e}", self.what, path.display())
                })?);
            strip_line_end(&mut bytes);
            bytes
        } else if let Some(var) = self.env {
            let value = std::env::var_os(var).ok_or_else(|| {
                format!(
                    "cannot read {}: the environment variable {var} is not set",
                    self.what
                )
            })?;
            Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(value))
        } else {
            let ask = |prompt: &str| {
                rpassword::prompt_password(prompt).map_err(|e| {
                    format!(
                        "cannot ask for {} ({e}); without a terminal give {} FILE or {} VAR",
                        self.what, self.flags.0, self.flags.1
                    )
                })
            };
            let first = Zeroizing::new(ask(prompt)?);
            if confirm {
                let second = Zeroizing::new(ask("Enter it again: ")?);
                if *first != *second {
                    return Err(format!("the two entries of {} differ", self.what));
                }
            }
            Zeroizing::new(first.as_bytes().to_vec())
        };
        if value.is_empty() {
            return Err(format!("{} is empty", self.what));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends() {
        for (given, expected) in [
            (&b"1234\n"[..], &b"1234"[..]),
            (b"1234\r\n", b"1234"),
            (b"1234", b"1234"),
            (b"12 34\n\n", b"12 34\n"),
        ] {
            let mut v = given.to_vec();
            strip_line_end(&mut v);
            assert_eq!(v, expected);
        }
    }

    #[test]
    fn file_and_env_sources() {
        let dir = std::env::temp_dir().join(format!("pkcs11-ha-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pin");
        std::fs::write(&file, "4321\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let source = Source {
            what: "the PIN",
            flags: ("--pin-file", "--pin-env"),
            file: Some(&file),
            env: None,
        };
        let e = source.read("", false).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let source = Source {
            what: "the PIN",
            flags: ("--pin-file", "--pin-env"),
            file: Some(&file),
            env: None,
        };
        assert_eq!(&source.read("", false).unwrap()[..], b"4321");
        std::fs::write(&file, "\n").unwrap();
        assert!(source.read("", false).unwrap_err().contains("empty"));
        let missing = dir.join("absent");
        let source = Source {
            file: Some(&missing),
            ..source
        };
        assert!(source.read("", false).unwrap_err().contains("absent"));
        let source = Source {
            file: None,
            env: Some("PKCS11_HA_CREDS_TEST_UNSET_VARIABLE"),
            ..source
        };
        let e = source.read("", false).unwrap_err();
        assert!(
            e.contains("PKCS11_HA_CREDS_TEST_UNSET_VARIABLE is not set"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
