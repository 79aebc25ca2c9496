//! A member PKCS#11 library loaded at run time: its function table and
//! whether we initialised it. Owns the `dlopen` handle; never holds a lock
//! while calling into the library.

use crate::error::{check, rv_name, Error, Result};
use cryptoki_sys::*;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::ptr;

/// Calls one entry of a member's function table; a missing entry is
/// `CKR_FUNCTION_NOT_SUPPORTED`, as the specification says of a NULL slot.
macro_rules! member_call {
    ($lib:expr, $func:ident ( $($arg:expr),* $(,)? )) => {{
        match $lib.functions().$func {
            // SAFETY: the table came from the member's own C_GetFunctionList
            // or C_GetInterface and the library stays loaded while `$lib`
            // lives; the arguments follow the PKCS#11 signature.
            Some(f) => unsafe { f($($arg),*) },
            None => ::cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED,
        }
    }};
}
pub(crate) use member_call;

/// One loaded member library.
pub struct MemberLibrary {
    pub name: String,
    pub path: PathBuf,
    functions: CK_FUNCTION_LIST,
    /// True when our `C_Initialize` succeeded, so ours is the `C_Finalize`.
    initialized_by_us: Mutex<bool>,
    _library: Library,
}

impl MemberLibrary {
    /// Loads the library (`RTLD_LOCAL`) and copies its 2.40 function table.
    ///
    /// `C_GetInterface` is asked first; whatever version a member reports,
    /// only the 2.40 entries are copied, because those are the only ones we
    /// call and SoftHSM reports 3.x while filling only those.
    pub fn load(name: &str, path: &Path) -> std::result::Result<Self, String> {
        // SAFETY: loading a PKCS#11 module runs its constructors; that is
        // what the operator configured us to do.
        let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let table = Self::function_table(&library)
            .map_err(|why| format!("{} is not a usable PKCS#11 library: {why}", path.display()))?;
        Ok(MemberLibrary {
            name: name.to_string(),
            path: path.to_path_buf(),
            functions: table,
            initialized_by_us: Mutex::new(false),
            _library: library,
        })
    }

    fn function_table(library: &Library) -> std::result::Result<CK_FUNCTION_LIST, String> {
        // SAFETY: symbol types are the PKCS#11 signatures of these names.
        unsafe {
            if let Ok(get_interface) = library.get::<CK_C_GetInterface>(b"C_GetInterface\0") {
                if let Some(get_interface) = *get_interface {
                    let mut interface: *mut CK_INTERFACE = ptr::null_mut();
                    let rv = get_interface(ptr::null_mut(), ptr::null_mut(), &mut interface, 0);
                    if rv == CKR_OK && !interface.is_null() && !(*interface).pFunctionList.is_null()
                    {
                        let list = (*interface).pFunctionList as *const CK_FUNCTION_LIST;
                        return Ok(ptr::read(list));
                    }
                }
            }
            let get_list = library
                .get::<CK_C_GetFunctionList>(b"C_GetFunctionList\0")
                .map_err(|_| {
                    "it exports neither C_GetInterface nor C_GetFunctionList".to_string()
                })?;
            let get_list = (*get_list).ok_or("C_GetFunctionList is NULL")?;
            let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
            let rv = get_list(&mut list);
            if rv != CKR_OK || list.is_null() {
                return Err(format!("C_GetFunctionList returned {}", rv_name(rv)));
            }
            Ok(ptr::read(list))
        }
    }

    pub fn functions(&self) -> &CK_FUNCTION_LIST {
        &self.functions
    }

    /// Initialises the library for OS locking. A library the application
    /// (or a parent process before `fork`) already initialised is usable
    /// as it is, and is then not ours to finalise.
    pub fn initialize(&self) -> Result<()> {
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: None,
            DestroyMutex: None,
            LockMutex: None,
            UnlockMutex: None,
            flags: CKF_OS_LOCKING_OK,
            pReserved: ptr::null_mut(),
        };
        let rv = member_call!(
            self,
            C_Initialize(&mut args as *mut _ as *mut std::ffi::c_void)
        );
        let mut ours = self.initialized_by_us.lock();
        match rv {
            CKR_OK => {
                *ours = true;
                Ok(())
            }
            CKR_CRYPTOKI_ALREADY_INITIALIZED => Ok(()),
            rv => Err(Error::new(rv)),
        }
    }

    /// Finalises the library if, and only if, we initialised it.
    pub fn finalize(&self) {
        let mut ours = self.initialized_by_us.lock();
        if std::mem::take(&mut *ours) {
            member_call!(self, C_Finalize(ptr::null_mut()));
        }
    }

    /// Forgets a parent's initialisation after `fork`: the child must not
    /// finalise what the parent still uses.
    pub fn forget_initialization(&self) {
        *self.initialized_by_us.lock() = false;
    }

    /// The library's current slots with a token present.
    pub fn token_slots(&self) -> Result<Vec<CK_SLOT_ID>> {
        self.slot_list(CK_TRUE)
    }

    /// The library's current slots, with or without a token.
    pub fn slot_list(&self, token_present: CK_BBOOL) -> Result<Vec<CK_SLOT_ID>> {
        loop {
            let mut count: CK_ULONG = 0;
            check(member_call!(
                self,
                C_GetSlotList(token_present, ptr::null_mut(), &mut count)
            ))?;
            let mut slots = vec![0; count as usize];
            let rv = member_call!(
                self,
                C_GetSlotList(token_present, slots.as_mut_ptr(), &mut count)
            );
            if rv == CKR_BUFFER_TOO_SMALL {
                continue;
            }
            check(rv)?;
            slots.truncate(count as usize);
            return Ok(slots);
        }
    }

    pub fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO> {
        // SAFETY: CK_TOKEN_INFO is plain data; all-zero is a valid value.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        check(member_call!(self, C_GetTokenInfo(slot, &mut info)))?;
        Ok(info)
    }

    pub fn slot_info(&self, slot: CK_SLOT_ID) -> Result<CK_SLOT_INFO> {
        // SAFETY: CK_SLOT_INFO is plain data; all-zero is a valid value.
        let mut info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
        check(member_call!(self, C_GetSlotInfo(slot, &mut info)))?;
        Ok(info)
    }

    pub fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>> {
        loop {
            let mut count: CK_ULONG = 0;
            check(member_call!(
                self,
                C_GetMechanismList(slot, ptr::null_mut(), &mut count)
            ))?;
            let mut list = vec![0; count as usize];
            let rv = member_call!(
                self,
                C_GetMechanismList(slot, list.as_mut_ptr(), &mut count)
            );
            if rv == CKR_BUFFER_TOO_SMALL {
                continue;
            }
            check(rv)?;
            list.truncate(count as usize);
            return Ok(list);
        }
    }

    pub fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO> {
        let mut info = CK_MECHANISM_INFO {
            ulMinKeySize: 0,
            ulMaxKeySize: 0,
            flags: 0,
        };
        check(member_call!(
            self,
            C_GetMechanismInfo(slot, mechanism, &mut info)
        ))?;
        Ok(info)
    }
}

/// A token's serial number as text, without the padding blanks.
pub fn padded_to_string(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// Writes `text` into a fixed-width blank-padded PKCS#11 field.
pub fn string_to_padded(text: &str, field: &mut [u8]) {
    field.fill(b' ');
    let bytes = text.as_bytes();
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}
