//! Finding tokens and objects through a raw function table, for the
//! benches that work on token objects (`object_scale`, `reconcile`);
//! included after `support`, whose `ck!` macros it uses.

use cryptoki_sys::*;
use std::ptr;

/// The slot whose token has `label`.
pub fn find_slot(fns: &CK_FUNCTION_LIST, label: &str) -> CK_SLOT_ID {
    let mut count: CK_ULONG = 0;
    ck!(fns, C_GetSlotList(CK_TRUE, ptr::null_mut(), &mut count));
    let mut slots = vec![0; count as usize];
    ck!(fns, C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut count));
    slots
        .into_iter()
        .find(|slot| {
            // SAFETY: CK_TOKEN_INFO is plain data; the library fills it.
            let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
            ck_raw!(fns, C_GetTokenInfo(*slot, &mut info)) == CKR_OK
                && String::from_utf8_lossy(&info.label).trim_end() == label
        })
        .unwrap_or_else(|| panic!("no token labelled {label}"))
}

/// Every object `template` matches, in batches of 64.
pub fn find(
    fns: &CK_FUNCTION_LIST,
    session: CK_SESSION_HANDLE,
    template: &mut [CK_ATTRIBUTE],
) -> Vec<CK_OBJECT_HANDLE> {
    ck!(
        fns,
        C_FindObjectsInit(session, template.as_mut_ptr(), template.len() as CK_ULONG)
    );
    let mut all = Vec::new();
    let mut batch = [0; 64];
    loop {
        let mut count: CK_ULONG = 0;
        ck!(
            fns,
            C_FindObjects(
                session,
                batch.as_mut_ptr(),
                batch.len() as CK_ULONG,
                &mut count
            )
        );
        all.extend_from_slice(&batch[..count as usize]);
        if (count as usize) < batch.len() {
            break;
        }
    }
    ck!(fns, C_FindObjectsFinal(session));
    all
}
