//! The sidecar file `<this .so>.conf`, the real library it names, and the
//! partitions (slots) this copy shows with their policies.
//!
//! The real library is loaded once per copy and never unloaded; the
//! partitions are read again at every `C_Initialize`, so a test can change
//! a policy and restart the member, as a Partition SO would.

use std::ffi::{c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::{fs, ptr};

use cryptoki_sys::*;
use libloading::Library;
use once_cell::sync::OnceCell;
use parking_lot::RwLock;

/// Luna's two mutually exclusive partition modes (policy 0 "Allow private
/// key cloning" and policy 1 "Allow private key wrapping").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Private keys may be cloned, never wrapped off (Luna's default).
    Cloning,
    /// Private keys may be wrapped off, never cloned.
    KeyExport,
}

#[derive(Clone, Debug)]
pub(crate) struct Partition {
    pub(crate) serial: String,
    pub(crate) mode: Mode,
    /// The cloning domain: two partitions clone to each other only if
    /// theirs are the same.
    pub(crate) domain: String,
}

#[derive(Default)]
pub(crate) struct Layout {
    pub(crate) partitions: Vec<Partition>,
    /// Every slot describes itself as a Luna HA virtual slot.
    pub(crate) ha_slot: bool,
    /// `CA_GetContainerPolicySetting` answers `CKR_FUNCTION_NOT_SUPPORTED`,
    /// as a client library without the call would leave its caller.
    pub(crate) no_policy_api: bool,
    /// `CA_MigrateKeys` answers `CKR_FUNCTION_NOT_SUPPORTED`, as on
    /// firmware before 7.8.
    pub(crate) no_migrate_keys: bool,
}

pub(crate) struct Real {
    /// The real 2.40 table (SoftHSM reports 3.x but fills only these).
    pub(crate) list: CK_FUNCTION_LIST,
    _lib: Library,
}

static REAL: OnceCell<Result<Real, String>> = OnceCell::new();
static LAYOUT: RwLock<Option<Layout>> = RwLock::new(None);

/// The real library; `CKR_GENERAL_ERROR` if it cannot be loaded (the reason
/// goes to stderr once: a test-only library has no better place for it).
pub(crate) fn real() -> Result<&'static Real, CK_RV> {
    REAL.get_or_init(|| load_real().inspect_err(|e| eprintln!("luna-member: {e}")))
        .as_ref()
        .map_err(|_| CKR_GENERAL_ERROR)
}

/// Reads the partitions from the sidecar again (at `C_Initialize`).
pub(crate) fn reload() -> Result<(), CK_RV> {
    let (_, layout) = read_sidecar().map_err(|e| {
        eprintln!("luna-member: {e}");
        CKR_GENERAL_ERROR
    })?;
    *LAYOUT.write() = Some(layout);
    Ok(())
}

pub(crate) fn ha_slot() -> bool {
    LAYOUT.read().as_ref().is_some_and(|l| l.ha_slot)
}

pub(crate) fn policy_api() -> bool {
    LAYOUT.read().as_ref().is_some_and(|l| !l.no_policy_api)
}

pub(crate) fn migrate_keys() -> bool {
    LAYOUT.read().as_ref().is_some_and(|l| !l.no_migrate_keys)
}

fn sidecar_path() -> Result<PathBuf, String> {
    let mut path = own_path()?.into_os_string();
    path.push(".conf");
    Ok(PathBuf::from(path))
}

fn read_sidecar() -> Result<(String, Layout), String> {
    let path = sidecar_path()?;
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut library = None;
    let mut layout = Layout::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{}: unexpected line {line:?}", path.display());
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        match (key.trim(), value.trim()) {
            ("library", v) => library = Some(v.to_owned()),
            ("ha_slot", v) => layout.ha_slot = v == "yes",
            ("policy_api", v) => layout.no_policy_api = v == "no",
            ("migrate_keys", v) => layout.no_migrate_keys = v == "no",
            ("partition", v) => {
                let fields: Vec<&str> = v.split_whitespace().collect();
                let [serial, mode, domain] = fields[..] else {
                    return Err(bad());
                };
                let mode = match mode {
                    "cloning" => Mode::Cloning,
                    "key-export" => Mode::KeyExport,
                    _ => return Err(bad()),
                };
                layout.partitions.push(Partition {
                    serial: serial.to_owned(),
                    mode,
                    domain: domain.to_owned(),
                });
            }
            _ => return Err(bad()),
        }
    }
    let library = library.ok_or_else(|| format!("{}: no `library =` line", path.display()))?;
    Ok((library, layout))
}

fn load_real() -> Result<Real, String> {
    let (library, _) = read_sidecar()?;
    // SAFETY: loading a PKCS#11 module runs its initialisers, as any loader does.
    let lib = unsafe { Library::new(&library) }.map_err(|e| format!("load {library}: {e}"))?;
    let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
    let rv = unsafe {
        let get = lib
            .get::<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV>(b"C_GetFunctionList")
            .map_err(|e| format!("{library}: {e}"))?;
        get(&mut list)
    };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("{library}: C_GetFunctionList returned {rv:#x}"));
    }
    Ok(Real {
        // SAFETY: a non-NULL table from C_GetFunctionList holds at least the 2.40 entries.
        list: unsafe { *list },
        _lib: lib,
    })
}

/// The path this copy was loaded from (each copy has its own sidecar).
fn own_path() -> Result<PathBuf, String> {
    // SAFETY: Dl_info is plain data; dladdr fills it for an address in this image.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::dladdr(own_path as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return Err("dladdr cannot name this library".into());
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Ok(PathBuf::from(OsStr::from_bytes(name.to_bytes())))
}

impl Real {
    /// The partition behind a slot; `None` for a slot this copy does not show.
    pub(crate) fn partition(&self, slot: CK_SLOT_ID) -> Option<Partition> {
        let get_token_info = self.list.C_GetTokenInfo?;
        let mut info = CK_TOKEN_INFO::default();
        // SAFETY: `info` is a valid out-parameter.
        if unsafe { get_token_info(slot, &mut info) } != CKR_OK {
            return None;
        }
        let serial = info.serialNumber.trim_ascii_end();
        LAYOUT
            .read()
            .as_ref()?
            .partitions
            .iter()
            .find(|p| p.serial.as_bytes() == serial)
            .cloned()
    }

    /// The partition a session is open on.
    pub(crate) fn session_partition(
        &self,
        session: CK_SESSION_HANDLE,
    ) -> Result<(CK_SLOT_ID, Partition, CK_STATE), CK_RV> {
        let get_session_info = self.list.C_GetSessionInfo.ok_or(CKR_GENERAL_ERROR)?;
        let mut info = CK_SESSION_INFO::default();
        // SAFETY: `info` is a valid out-parameter.
        let rv = unsafe { get_session_info(session, &mut info) };
        if rv != CKR_OK {
            return Err(rv);
        }
        let partition = self
            .partition(info.slotID)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        Ok((info.slotID, partition, info.state))
    }

    /// The slots with a token this copy shows, in the real library's order.
    pub(crate) fn visible_slots(&self) -> Result<Vec<CK_SLOT_ID>, CK_RV> {
        let get_slot_list = self.list.C_GetSlotList.ok_or(CKR_GENERAL_ERROR)?;
        let mut count: CK_ULONG = 0;
        // SAFETY: a NULL list asks only for the count.
        let rv = unsafe { get_slot_list(CK_TRUE, ptr::null_mut(), &mut count) };
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut slots = vec![0; count as usize];
        // SAFETY: `slots` holds `count` entries.
        let rv = unsafe { get_slot_list(CK_TRUE, slots.as_mut_ptr(), &mut count) };
        if rv != CKR_OK {
            return Err(rv);
        }
        slots.truncate(count as usize);
        slots.retain(|&slot| self.partition(slot).is_some());
        Ok(slots)
    }
}
