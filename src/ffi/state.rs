//! The HA state API exports (not part of the PKCS#11 function table;
//! applications find them with `dlsym`).

use super::{cryptoki_fn, required};
use crate::error::Error;
use crate::provider::{self, Slot};
use crate::state_api::{self, CK_HA_STATUS, PKCS11HA_GROUP_STATUS};
use cryptoki_sys::*;

cryptoki_fn! {
    fn CA_GetHAState(slot: CK_SLOT_ID, state: *mut CK_HA_STATUS) {
        required(state)?;
        match provider::get()?.slot(slot)? {
            Slot::Virtual(group) => {
                let ha_state = state_api::ha_state(&group);
                // SAFETY: `state` is not null (checked above) and writable.
                unsafe { *state = ha_state };
                Ok(())
            }
            Slot::PassThrough(..) => Err(Error::new(CKR_SLOT_ID_INVALID)),
        }
    }

    fn PKCS11HA_GetGroupStatus(slot: CK_SLOT_ID, status: *mut PKCS11HA_GROUP_STATUS) {
        required(status)?;
        match provider::get()?.slot(slot)? {
            Slot::Virtual(group) => {
                let group_status = state_api::group_status(&group);
                // SAFETY: `status` is not null (checked above) and writable.
                unsafe { *status = group_status };
                Ok(())
            }
            Slot::PassThrough(..) => Err(Error::new(CKR_SLOT_ID_INVALID)),
        }
    }
}
