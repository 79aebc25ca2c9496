//! Comparing the members' objects and copying to each member what it lacks,
//! by the same rules as the library's replication (`src/replication.rs`):
//! objects are recognised by `identity::fingerprint`; public objects are
//! copied by their attributes; secret and private keys leave a member only
//! wrapped under the group's domain key (`CKM_AES_KEY_WRAP_PAD`) and are
//! unwrapped on the member that lacks them. The domain key itself is never
//! compared or copied, nor is an object that applications recorded as
//! deleted while a member was down (`haStateDir`): they remove it from the
//! members that still hold it (`src/reconcile.rs`).

use cryptoki_sys::*;
use pkcs11_ha::config::GroupConfig;
use pkcs11_ha::error::rv_name;
use pkcs11_ha::identity::Fingerprint;
use pkcs11_ha::index::MemberIndex;
use pkcs11_ha::state_dir::{Deletion, StateDir};
use serde::Serialize;
use std::collections::HashSet;

use crate::domain::{self, Found};
use crate::p11::{Members, Session};

pub use pkcs11_ha::replication::{KEY_ATTRIBUTES, PUBLIC_ATTRIBUTES, WRAP_MECHANISM};

/// An object as people name it: class, label and id.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Description {
    pub class: String,
    pub label: String,
    pub id: String,
}

impl std::fmt::Display for Description {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} \"{}\"", self.class, self.label)?;
        if !self.id.is_empty() {
            write!(f, " (id {})", self.id)?;
        }
        Ok(())
    }
}

pub fn class_name(class: Option<CK_OBJECT_CLASS>) -> String {
    match class {
        Some(CKO_DATA) => "data object".into(),
        Some(CKO_CERTIFICATE) => "certificate".into(),
        Some(CKO_PUBLIC_KEY) => "public key".into(),
        Some(CKO_PRIVATE_KEY) => "private key".into(),
        Some(CKO_SECRET_KEY) => "secret key".into(),
        Some(other) => format!("object of class {other:#x}"),
        None => "object".into(),
    }
}

pub fn describe(session: &Session, object: CK_OBJECT_HANDLE) -> Description {
    let label = session.attribute(object, CKA_LABEL).unwrap_or_default();
    let id = session.attribute(object, CKA_ID).unwrap_or_default();
    Description {
        class: class_name(session.ulong_attribute(object, CKA_CLASS)),
        label: String::from_utf8_lossy(&label).into_owned(),
        id: domain::hex(&id),
    }
}

/// One member as a sync sees it: its open (and, given a PIN, logged-in)
/// session, its domain key and its objects with their fingerprints.
pub struct View<'a> {
    pub serial: String,
    /// The member's slot in its library, for its mechanism information.
    pub slot: CK_SLOT_ID,
    pub session: Session<'a>,
    pub domain: Option<Found>,
    /// Every object the session sees except the domain key.
    pub objects: Vec<(CK_OBJECT_HANDLE, Fingerprint)>,
}

impl<'a> View<'a> {
    /// Reads the member's domain key and objects through `session`.
    pub fn read(
        serial: &str,
        slot: CK_SLOT_ID,
        session: Session<'a>,
        domain_label: &str,
    ) -> Result<View<'a>, String> {
        let domain = domain::find(&session, domain_label).unwrap_or(None);
        let handles = session.objects().map_err(|rv| {
            format!(
                "member {serial}: cannot list its objects: C_FindObjects returned {}",
                rv_name(rv)
            )
        })?;
        let objects = handles
            .into_iter()
            .filter(|h| domain.as_ref().is_none_or(|d| d.handle != *h))
            .filter_map(|h| session.fingerprint(h).map(|print| (h, print)))
            .collect();
        Ok(View {
            serial: serial.to_owned(),
            slot,
            session,
            domain,
            objects,
        })
    }
}

/// One object to copy from one member to another.
#[derive(Debug, Clone)]
pub struct Copy {
    pub from: usize,
    pub object: CK_OBJECT_HANDLE,
    pub to: usize,
    pub description: Description,
}

/// An object that cannot be matched safely: its fingerprint names more than
/// one object on a member, so it is not copied there (we never guess).
#[derive(Debug, Clone, Serialize)]
pub struct Ambiguous {
    pub member: String,
    pub object: Description,
    pub matches: usize,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub copies: Vec<Copy>,
    /// Objects a member already has, counted once per object and member
    /// besides the one it is copied from.
    pub present: usize,
    pub ambiguous: Vec<Ambiguous>,
    /// Objects some member lacks that were deleted through the group while
    /// that member was down: not copied.
    pub deleted: Vec<Description>,
}

/// The deletions applications recorded for `group` in the state
/// directory; none where it cannot be read.
pub fn deletions(members: &Members, group: &GroupConfig) -> Vec<Deletion> {
    let serial = pkcs11_ha::group::virtual_serial(
        group.serial.as_deref(),
        &[group.members.clone(), group.standby.clone()].concat(),
    );
    members
        .state_dir
        .as_deref()
        .filter(|dir| dir.is_dir())
        .and_then(|dir| StateDir::open(dir).ok())
        .and_then(|state| state.deletions(&serial).ok())
        .unwrap_or_default()
}

/// What each member lacks, and where to copy it from; objects `deletions`
/// name are not copied. Each member's objects were read once (its
/// [`View`]); they are matched in memory by the library's member index,
/// never by a search per object, which would cost each member's whole
/// token once per object.
pub fn plan(views: &[View], deletions: &[Deletion]) -> Plan {
    let indexes: Vec<MemberIndex> = views
        .iter()
        .map(|view| {
            let mut index = MemberIndex::default();
            for (handle, print) in &view.objects {
                index.insert(*handle, print.clone());
            }
            index
        })
        .collect();
    let mut plan = Plan::default();
    // Per member, the objects already planned for as some object's match.
    let mut done: Vec<HashSet<CK_OBJECT_HANDLE>> = vec![HashSet::new(); views.len()];
    for (from, source) in views.iter().enumerate() {
        for (object, print) in &source.objects {
            if done[from].contains(object) {
                continue;
            }
            let found: Vec<Vec<CK_OBJECT_HANDLE>> =
                indexes.iter().map(|index| index.matching(print)).collect();
            done[from].insert(*object);
            for (member, handles) in found.iter().enumerate() {
                done[member].extend(handles.iter().copied());
            }
            if found[from].len() > 1 {
                note_ambiguous(&mut plan, source, *object, found[from].len());
                continue;
            }
            if deletions.iter().any(|d| d.matches(print)) {
                let description = describe(&source.session, *object);
                if !plan.deleted.contains(&description) {
                    plan.deleted.push(description);
                }
                continue;
            }
            for (to, target) in views.iter().enumerate() {
                if to == from {
                    continue;
                }
                match found[to].as_slice() {
                    [] => plan.copies.push(Copy {
                        from,
                        object: *object,
                        to,
                        description: describe(&source.session, *object),
                    }),
                    [_] => plan.present += 1,
                    more => note_ambiguous(&mut plan, target, more[0], more.len()),
                }
            }
        }
    }
    plan
}

fn note_ambiguous(plan: &mut Plan, view: &View, object: CK_OBJECT_HANDLE, matches: usize) {
    let description = describe(&view.session, object);
    if !plan
        .ambiguous
        .iter()
        .any(|a| a.member == view.serial && a.object == description)
    {
        plan.ambiguous.push(Ambiguous {
            member: view.serial.clone(),
            object: description,
            matches,
        });
    }
}

/// Whether `mechanism` is offered on `view`'s slot with `flag` (`CKF_WRAP`
/// or `CKF_UNWRAP`); the error says what is missing.
fn offers(view: &View, mechanism: CK_MECHANISM_TYPE, flag: CK_FLAGS) -> Result<(), String> {
    let what = if flag == CKF_WRAP { "wrap" } else { "unwrap" };
    match view.session.library.mechanism_info(view.slot, mechanism) {
        Ok(info) if info.flags & flag != 0 => Ok(()),
        Ok(_) => Err(format!(
            "member {} offers {} but not to {what} keys, so key material cannot move {}",
            view.serial,
            crate::checks::mechanism_name(mechanism),
            if flag == CKF_WRAP { "from it" } else { "to it" }
        )),
        Err(e) => Err(format!(
            "member {} does not offer {} ({}), so key material cannot move {} (p11-kit 0.24 \
             remoting carries no AES key wrap)",
            view.serial,
            crate::checks::mechanism_name(mechanism),
            rv_name(e.rv),
            if flag == CKF_WRAP { "from it" } else { "to it" }
        )),
    }
}

/// Every check the copy makes before it changes anything: for a key, both
/// members hold the same domain key and offer the wrap mechanism, and the
/// key may leave its member. `--dry-run` runs exactly these. For a key,
/// returns the domain keys to wrap and unwrap it with.
pub fn precheck(
    views: &[View],
    copy: &Copy,
) -> Result<Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)>, String> {
    let source = &views[copy.from];
    let target = &views[copy.to];
    let class = source.session.ulong_attribute(copy.object, CKA_CLASS);
    if !matches!(class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY)) {
        return Ok(None);
    }
    let (Some(from_domain), Some(to_domain)) = (&source.domain, &target.domain) else {
        let missing = if source.domain.is_none() {
            &source.serial
        } else {
            &target.serial
        };
        return Err(format!(
            "member {missing} has no domain key, so key material cannot move; provision it \
             with `pkcs11-ha group add-member --provision-domain` on a fresh member"
        ));
    };
    if from_domain.check_value != to_domain.check_value {
        return Err(format!(
            "the domain keys of {} and {} differ (check values {} and {}); key material \
             wrapped on one cannot be unwrapped on the other",
            source.serial,
            target.serial,
            domain::hex(&from_domain.check_value),
            domain::hex(&to_domain.check_value)
        ));
    }
    let flag = |t| {
        source
            .session
            .attribute(copy.object, t)
            .is_some_and(|v| v.first() == Some(&CK_TRUE))
    };
    if !flag(CKA_EXTRACTABLE) {
        return Err(format!(
            "{} on {} is not extractable on the member itself (made outside pkcs11-ha, imported \
             before pkcs11-ha kept imported keys movable, or made non-extractable after it was \
             created), so it can never leave that member; re-import or re-create it through the \
             group to have it on every member",
            copy.description, source.serial
        ));
    }
    if flag(CKA_WRAP_WITH_TRUSTED)
        && source
            .session
            .attribute(from_domain.handle, CKA_TRUSTED)
            .is_none_or(|v| v.first() != Some(&CK_TRUE))
    {
        return Err(format!(
            "{} on {} may be wrapped only by a trusted key, and the domain key there is not \
             trusted; provision the domain key as the member's SO (`--provision-domain`)",
            copy.description, source.serial
        ));
    }
    offers(source, WRAP_MECHANISM, CKF_WRAP)?;
    offers(target, WRAP_MECHANISM, CKF_UNWRAP)?;
    Ok(Some((from_domain.handle, to_domain.handle)))
}

/// Copies one object; the error says why it could not.
pub fn copy(views: &[View], copy: &Copy) -> Result<(), String> {
    let domains = precheck(views, copy)?;
    let source = &views[copy.from];
    let target = &views[copy.to];
    let Some((wrapping, unwrapping)) = domains else {
        let mut template = source.session.template(copy.object, PUBLIC_ATTRIBUTES);
        return target
            .session
            .create(&mut template)
            .map(drop)
            .map_err(|rv| {
                format!(
                    "C_CreateObject on {} returned {}",
                    target.serial,
                    rv_name(rv)
                )
            });
    };
    let blob = source
        .session
        .wrap(WRAP_MECHANISM, wrapping, copy.object)
        .map_err(|rv| match rv {
            CKR_KEY_UNEXTRACTABLE | CKR_KEY_NOT_WRAPPABLE => format!(
                "{} on {} cannot be wrapped ({}): the member keeps it non-extractable or \
                 cannot wrap its type, so it can never leave that member",
                copy.description,
                source.serial,
                rv_name(rv)
            ),
            rv => format!("C_WrapKey on {} returned {}", source.serial, rv_name(rv)),
        })?;
    let mut template = source.session.template(copy.object, KEY_ATTRIBUTES);
    target
        .session
        .unwrap_key(WRAP_MECHANISM, unwrapping, &blob, &mut template)
        .map(drop)
        .map_err(|rv| format!("C_UnwrapKey on {} returned {}", target.serial, rv_name(rv)))
}
