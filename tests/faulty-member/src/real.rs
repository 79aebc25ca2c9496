//! The real library behind this copy, named by the sidecar file
//! `<this .so>.target`, and the serial filter over its slots.
//!
//! Loaded once per copy, on the first `C_Initialize`; never unloaded.

use std::ffi::{c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::{fs, ptr};

use cryptoki_sys::{
    CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD, CKR_GENERAL_ERROR, CKR_MECHANISM_INVALID, CKR_OK,
    CKR_SLOT_ID_INVALID, CK_FUNCTION_LIST, CK_MECHANISM, CK_RV, CK_SLOT_ID, CK_TOKEN_INFO, CK_TRUE,
    CK_ULONG,
};
use libloading::Library;
use once_cell::sync::OnceCell;

pub(crate) struct Real {
    /// The real 2.40 table (SoftHSM reports 3.x but fills only these).
    pub(crate) list: CK_FUNCTION_LIST,
    /// Only the token with this serial is visible, if set.
    serial: Option<String>,
    /// Whether the AES key-wrap mechanisms are refused although listed, as
    /// a client library that cannot carry them refuses them.
    refuse_key_wrap: bool,
    /// Keeps the pointers in `list` valid.
    _lib: Library,
}

static REAL: OnceCell<Result<Real, String>> = OnceCell::new();

/// The real library; `CKR_GENERAL_ERROR` if it cannot be loaded (the reason
/// goes to stderr once: a test-only library has no better place for it).
pub(crate) fn real() -> Result<&'static Real, CK_RV> {
    REAL.get_or_init(|| load().inspect_err(|e| eprintln!("faulty-member: {e}")))
        .as_ref()
        .map_err(|_| CKR_GENERAL_ERROR)
}

fn load() -> Result<Real, String> {
    let mut sidecar = own_path()?.into_os_string();
    sidecar.push(".target");
    let sidecar = PathBuf::from(sidecar);
    let text = fs::read_to_string(&sidecar).map_err(|e| format!("{}: {e}", sidecar.display()))?;
    let (mut library, mut serial, mut refuse_key_wrap) = (None, None, false);
    for line in text.lines().map(str::trim) {
        match line.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            _ if line.is_empty() || line.starts_with('#') => {}
            Some(("library", v)) => library = Some(v.to_owned()),
            Some(("serial", v)) => serial = Some(v.to_owned()),
            Some(("refuse_key_wrap", v)) => refuse_key_wrap = v == "true",
            _ => return Err(format!("{}: unexpected line {line:?}", sidecar.display())),
        }
    }
    let library = library.ok_or_else(|| format!("{}: no `library =` line", sidecar.display()))?;
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
        serial,
        refuse_key_wrap,
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
    /// Whether `slot` is visible through this copy: every slot without a
    /// serial filter, otherwise only the slot whose token has that serial.
    pub(crate) fn visible(&self, slot: CK_SLOT_ID) -> bool {
        let Some(serial) = &self.serial else {
            return true;
        };
        let Some(get_token_info) = self.list.C_GetTokenInfo else {
            return false;
        };
        let mut info = CK_TOKEN_INFO::default();
        // SAFETY: `info` is a valid out-parameter.
        let rv = unsafe { get_token_info(slot, &mut info) };
        rv == CKR_OK && info.serialNumber.trim_ascii_end() == serial.as_bytes()
    }

    /// `CKR_SLOT_ID_INVALID` for a slot this copy hides.
    pub(crate) fn slot(&self, slot: CK_SLOT_ID) -> Result<(), CK_RV> {
        if self.visible(slot) {
            Ok(())
        } else {
            Err(CKR_SLOT_ID_INVALID)
        }
    }

    /// `CKR_MECHANISM_INVALID` for an AES key wrap this copy refuses
    /// (`refuse_key_wrap = true`).
    pub(crate) fn mechanism(&self, mechanism: *mut CK_MECHANISM) -> Result<(), CK_RV> {
        // SAFETY: NULL or the caller's valid mechanism.
        let kind = unsafe { mechanism.as_ref() }.map(|m| m.mechanism);
        if self.refuse_key_wrap && matches!(kind, Some(CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD)) {
            Err(CKR_MECHANISM_INVALID)
        } else {
            Ok(())
        }
    }

    /// Whether a serial filter is set (so slot lists must be filtered).
    pub(crate) fn filtered(&self) -> bool {
        self.serial.is_some()
    }

    /// The visible slots with a token (a slot without one has no serial, so
    /// the filter hides it whatever `tokenPresent` the caller asked for).
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
        slots.retain(|&slot| self.visible(slot));
        Ok(slots)
    }
}
