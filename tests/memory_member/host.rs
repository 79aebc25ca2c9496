//! What recovery and reconciliation ask of the provider ([`Host`]), for one
//! group over in-memory members: no threads of its own, a `memberTimeout`
//! of one second, and by default replay only (no synchronisation, so that
//! what a returning member gets comes from the queue of what it missed).

use super::SimMember;
use cryptoki_sys::CK_SLOT_ID;
use pkcs11_ha::config::RecoveryMode;
use pkcs11_ha::group::Group;
use pkcs11_ha::member_api::MemberBackend;
use pkcs11_ha::recovery::{Host, RecoverySettings};
use pkcs11_ha::virtual_session::VirtualSession;
use std::sync::Arc;
use std::time::Duration;

/// The `memberTimeout` an in-memory group's recovery is given.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(1);

pub struct MemoryHost {
    pub groups: Vec<Arc<Group>>,
    pub libraries: Vec<Arc<dyn MemberBackend>>,
    pub recovery: RecoverySettings,
    pub synchronize: bool,
}

impl MemoryHost {
    pub fn new(group: &Arc<Group>, member: &Arc<SimMember>) -> MemoryHost {
        MemoryHost::of(group, std::slice::from_ref(member))
    }

    pub fn of(group: &Arc<Group>, libraries: &[Arc<SimMember>]) -> MemoryHost {
        MemoryHost {
            groups: vec![Arc::clone(group)],
            libraries: libraries
                .iter()
                .map(|l| Arc::clone(l) as Arc<dyn MemberBackend>)
                .collect(),
            recovery: RecoverySettings {
                attempts: -1,
                interval: Duration::from_secs(1),
                mode: RecoveryMode::ActiveBasic,
            },
            synchronize: false,
        }
    }
}

impl Host for MemoryHost {
    fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }
    fn libraries(&self) -> &[Arc<dyn MemberBackend>] {
        &self.libraries
    }
    fn recovery(&self) -> &RecoverySettings {
        &self.recovery
    }
    fn member_timeout(&self) -> Duration {
        MEMBER_TIMEOUT
    }
    fn threads_allowed(&self) -> bool {
        false
    }
    fn synchronize(&self, _: &Group) -> bool {
        self.synchronize
    }
    fn reconcile_soon(&self) {}
    fn uses_member_slot(&self, _: &Arc<dyn MemberBackend>, _: CK_SLOT_ID) -> bool {
        false
    }
    fn each_virtual_session(
        &self,
        _: &Arc<Group>,
        _: &mut dyn FnMut(&VirtualSession) -> pkcs11_ha::error::Result<()>,
    ) -> pkcs11_ha::error::Result<()> {
        Ok(())
    }
}
