//! What recovery and reconciliation ask of the provider ([`Host`]), for one
//! group over in-memory members: no threads of its own, a `memberTimeout`
//! of one second, and by default replay only (no synchronisation, so that
//! what a returning member gets comes from the queue of what it missed).

use super::token::{DOMAIN_LABEL, FIRST_SLOT};
use super::SimMember;
use cryptoki_sys::CK_SLOT_ID;
use pkcs11_ha::config::{RecoveryMode, DEFAULT_MULTIPART_REPLAY_LIMIT};
use pkcs11_ha::group::{Group, GroupSettings, Location};
use pkcs11_ha::member_api::MemberBackend;
use pkcs11_ha::recovery::{Host, RecoverySettings};
use pkcs11_ha::virtual_session::VirtualSession;
use std::sync::Arc;
use std::time::Duration;

/// The `memberTimeout` an in-memory group's recovery is given.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(1);

/// A group named `label` whose members are the `count` tokens of
/// `library`, in slot order, each attached (found) as it would be at
/// start-up; `memberTimeout` is [`MEMBER_TIMEOUT`].
pub fn group_over(library: &Arc<SimMember>, count: usize, label: &str) -> Arc<Group> {
    let serials: Vec<String> = (0..count)
        .map(|token| library.sim.lock().tokens[token].serial.clone())
        .collect();
    let settings = GroupSettings {
        domain_label: String::from_utf8(DOMAIN_LABEL.to_vec()).unwrap(),
        replay_limit: DEFAULT_MULTIPART_REPLAY_LIMIT,
        min_replicas: 1,
        member_timeout: MEMBER_TIMEOUT,
    };
    let group = Arc::new(Group::new(
        0,
        label,
        label.into(),
        0,
        &serials,
        &[],
        settings,
    ));
    for position in 0..count {
        let location = Location {
            library: Arc::clone(library) as Arc<dyn MemberBackend>,
            slot: FIRST_SLOT + position as CK_SLOT_ID,
        };
        group.attach(position, location);
    }
    group
}

pub struct MemoryHost {
    pub groups: Vec<Arc<Group>>,
    pub libraries: Vec<Arc<dyn MemberBackend>>,
    pub recovery: RecoverySettings,
    pub synchronize: bool,
    /// Whether the application allows threads: recovery then waits in
    /// place and lets a member serve with objects in doubt.
    pub threads_allowed: bool,
    /// `memberTimeout`; [`MEMBER_TIMEOUT`] unless a test sets it.
    pub member_timeout: Duration,
}

impl MemoryHost {
    pub fn new(group: &Arc<Group>, member: &Arc<SimMember>) -> MemoryHost {
        MemoryHost::of(group, std::slice::from_ref(member))
    }

    /// [`MemoryHost::new`] with `[HASynchronize]` on: a returning member is
    /// given what the serving members hold before it serves.
    pub fn synchronizing(group: &Arc<Group>, member: &Arc<SimMember>) -> MemoryHost {
        MemoryHost {
            synchronize: true,
            ..MemoryHost::new(group, member)
        }
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
            threads_allowed: false,
            member_timeout: MEMBER_TIMEOUT,
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
        self.member_timeout
    }
    fn threads_allowed(&self) -> bool {
        self.threads_allowed
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
