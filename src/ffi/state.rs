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
                *state = state_api::ha_state(&group);
                Ok(())
            }
            Slot::PassThrough(..) => Err(Error::new(CKR_SLOT_ID_INVALID)),
        }
    }

    fn PKCS11HA_GetGroupStatus(slot: CK_SLOT_ID, status: *mut PKCS11HA_GROUP_STATUS) {
        required(status)?;
        match provider::get()?.slot(slot)? {
            Slot::Virtual(group) => {
                *status = state_api::group_status(&group);
                Ok(())
            }
            Slot::PassThrough(..) => Err(Error::new(CKR_SLOT_ID_INVALID)),
        }
    }
}
