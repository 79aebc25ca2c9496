//! Moving objects between members. Key material leaves a member only
//! wrapped under the group's domain key -- an AES-256 key with the same
//! value on every member, marked `CKA_TRUSTED` -- and is unwrapped on the
//! other members, or cloned by Luna's cloning protocol between partitions
//! of one Luna library instance (`strategy` picks which), before the call
//! that made it returns. Public objects (public keys, certificates, data)
//! are copied by their attributes.
//!
//! A key the application asks to be non-extractable is kept extractable on
//! the members but only under a trusted key (`CKA_WRAP_WITH_TRUSTED`), the
//! domain key being the only one; the application sees it non-extractable
//! and cannot wrap it. See `docs/security-model.md`.

use crate::arguments::{Attribute, Template, TemplateBuilder};
use crate::error::rv_name;
use crate::error::{Error, Result};
use crate::group::Pending;
use crate::identity::{self, Fingerprint};
use crate::mechanism::{BareMechanism, OwnedTemplate};
use crate::member_api::{MemberBackend, MemberSession};
use crate::object::{Era, Presence};
use crate::strategy::{self, Cloning, Side, Strategy};
use crate::virtual_session::{Attempt, MakingAnswer, VirtualSession};
use cryptoki_sys::*;

mod spares;
pub use spares::{SpareImports, IMPORTS_ON_SPARES};

/// Room for a wrapped key on the first try: an RSA-4096 private key in
/// PKCS#8 wraps to about 2.4 KiB.
const FIRST_WRAP_ROOM: usize = 4096;

/// How key material travels: RFC 5649 key wrap with padding, which takes
/// secret keys of any length and PKCS#8-encoded private keys.
pub const WRAP_MECHANISM: CK_MECHANISM_TYPE = CKM_AES_KEY_WRAP_PAD;

/// What a copy of a secret or private key must carry over. Values a member
/// computes itself (`CKA_LOCAL`, `CKA_CHECK_VALUE`, the key material) are
/// left to it. `CKA_MODIFIABLE` comes last in every list: SoftHSM refuses
/// each attribute after a `CKA_MODIFIABLE` FALSE in a `C_UnwrapKey`
/// template with `CKR_ATTRIBUTE_READ_ONLY`.
pub const KEY_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_SUBJECT,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_SIGN_RECOVER,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_ALLOWED_MECHANISMS,
    CKA_MODIFIABLE,
];

/// [`KEY_ATTRIBUTES`] that a secret key has (PKCS#11 2.40 tables 4.x: no
/// subject, recovery or per-use authentication, which are private keys'):
/// asking only these, a member answers every one.
const SECRET_KEY_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_SENSITIVE,
    CKA_EXTRACTABLE,
    CKA_WRAP_WITH_TRUSTED,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_SIGN,
    CKA_VERIFY,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_DERIVE,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_ALLOWED_MECHANISMS,
    CKA_MODIFIABLE,
];

/// What a copy of a public object carries: everything it has that can be
/// read and set.
pub const PUBLIC_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_ID,
    CKA_SUBJECT,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_ENCRYPT,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_WRAP,
    CKA_DERIVE,
    CKA_TRUSTED,
    CKA_COPYABLE,
    CKA_DESTROYABLE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_VALUE,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
    CKA_URL,
    CKA_CERTIFICATE_CATEGORY,
    CKA_JAVA_MIDP_SECURITY_DOMAIN,
    CKA_ALLOWED_MECHANISMS,
    CKA_MODIFIABLE,
];

/// Attributes whose value is a template: a copy carries them as the
/// original has them, so it is no less restricted.
pub const NESTED_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] =
    &[CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE];

/// An object's attributes read from a member, as a template for another;
/// `None` when the object cannot be read (it is gone, or the member
/// failed).
fn read_template(
    library: &dyn MemberBackend,
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
    nested_types: &[CK_ATTRIBUTE_TYPE],
) -> Option<OwnedTemplate> {
    let (values, arrays) =
        match identity::read_in_rooms(library, session, object, types, nested_types) {
            Some(read) => read,
            None => (
                identity::read_attributes(library, session, object, types)?,
                identity::present_arrays(library, session, object, nested_types),
            ),
        };
    // Empty values (no dates, no subject) are the members' defaults, and
    // some members refuse them spelled out.
    let (modifiable, values): (Vec<_>, Vec<_>) = values
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .partition(|(t, _)| *t == CKA_MODIFIABLE);
    let mut template = OwnedTemplate::default();
    for (t, v) in values {
        template.push(t, v);
    }
    for (t, inner) in arrays
        .into_iter()
        .filter_map(|t| identity::read_nested(library, session, object, t).map(|n| (t, n)))
        .filter(|(_, n)| !n.is_empty())
    {
        let mut nested = OwnedTemplate::default();
        for (t, v) in inner {
            nested.push(t, v);
        }
        template.push_nested(t, nested);
    }
    // After the nested templates too (see `KEY_ATTRIBUTES`).
    for (t, v) in modifiable {
        template.push(t, v);
    }
    Some(template)
}

/// Why an object is being copied to a member, which decides what a
/// refusal means: a key the application is making is not made at all,
/// while a copy a member missed only stays missing there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copying {
    /// A create, generate, unwrap, derive or copy the application asked for.
    NewObject,
    /// A copy a returning member missed, or one reconciliation found missing.
    Missed,
}

impl Copying {
    /// The end of an HA log line saying a key cannot move.
    fn outcome(self) -> &'static str {
        match self {
            Copying::NewObject => "the key was not created",
            Copying::Missed => "the member that missed the key stays without it",
        }
    }
}

impl VirtualSession {
    /// The domain key on member `position`, checked against the group's:
    /// every member must hold the same key, or key material would be
    /// unreadable where it lands.
    pub fn domain_key(&self, position: usize) -> Result<CK_OBJECT_HANDLE> {
        let member = &self.group.members[position];
        if let Some(handle) = self.group.domain.cached(position, member.epoch()) {
            return Ok(handle);
        }
        let Some(handle) = self.group.domain_handle(position) else {
            eprintln!(
                "pkcs11-ha: group {}: member {} does not hold exactly one key labelled {:?}, the group's domain key; provision it with `pkcs11-ha group add-member --provision-domain`",
                self.group.label, member.serial, self.group.settings.domain_label
            );
            return Err(Error::new(CKR_FUNCTION_FAILED));
        };
        // A key without a check value reads as an empty one; a read that
        // failed (the token restarted unseen, for one) proves nothing and
        // must not become the group's reference, or every other member's
        // domain key would differ from it for the life of the process.
        let check = self
            .on_member(position, |s| {
                identity::read_attributes(&*s.library, s.handle, handle, &[CKA_CHECK_VALUE])
            })?
            .ok_or(Error::new(CKR_FUNCTION_FAILED))?
            .pop()
            .map(|(_, value)| value)
            .unwrap_or_default();
        if !self
            .group
            .domain
            .agree(position, member.epoch(), handle, check)
        {
            eprintln!(
                "pkcs11-ha: group {}: the domain key {:?} on member {} differs from the other members' (check values differ); key material cannot move to it",
                self.group.label, self.group.settings.domain_label, member.serial
            );
            return Err(Error::new(CKR_FUNCTION_FAILED));
        }
        Ok(handle)
    }

    /// Looks up every serving member's domain key now (once per member
    /// epoch), so that neither the first search nor the first key made
    /// pays for a search of each member's whole token.
    pub fn look_up_domain_keys(&self) {
        for member in self.group.up_members() {
            self.group.domain_handle(member.position);
        }
    }

    /// Copies virtual object `object`, present on member `source`, to every
    /// other member that is up, before returning. A member that faults is
    /// taken out and gets the object when it returns; a request error is
    /// returned after removing every copy made, so no member keeps a key
    /// the application was told failed.
    pub fn replicate(&self, object: CK_OBJECT_HANDLE, source: usize) -> Result<()> {
        let entry = self
            .group
            .objects
            .get(object)
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
        if !matches!(entry.on[source], Presence::Present(_)) {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        let targets: Vec<usize> = self
            .group
            .members
            .iter()
            .filter(|m| m.position != source)
            .filter(|m| !matches!(entry.on[m.position], Presence::Present(_)))
            .map(|m| m.position)
            .collect();
        let (up, missed): (Vec<usize>, Vec<usize>) = targets
            .into_iter()
            .partition(|p| self.group.members[*p].is_up());
        let faulted = self.copy_to(object, source, &up, Copying::NewObject)?;
        for position in missed.into_iter().chain(faulted) {
            self.deliver_or_queue(position, Pending::Create(object));
        }
        Ok(())
    }

    /// Copies virtual object `object` from member `source` to `targets`.
    /// Returns the targets that faulted (they are out of service and lack
    /// the object); a request error removes every copy made. A key moves
    /// the way [`strategy::choose`] picks for each target; where no way
    /// exists for some target, nothing is copied and the call fails with
    /// one line naming the member and the reason.
    pub fn copy_to(
        &self,
        object: CK_OBJECT_HANDLE,
        source: usize,
        targets: &[usize],
        copying: Copying,
    ) -> Result<Vec<usize>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let source_era = self.group.objects.era(source);
        let source_handle = self
            .resolve(object, source)?
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
        // A source whose handles were forgotten since (it reconnected)
        // read or wrapped whatever holds `source_handle`'s number now.
        let source_moved = || {
            self.group
                .objects
                .moved_on(source_era)
                .then(|| Error::new(CKR_DEVICE_ERROR))
        };
        let class = self.class_of(object, source, source_handle)?;
        let secret = class == CKO_SECRET_KEY || class == CKO_PRIVATE_KEY;
        let strategies: Vec<Option<Strategy>> = if secret {
            let mut chosen = Vec::with_capacity(targets.len());
            for &position in targets {
                chosen.push(Some(self.strategy(source, position, class, copying)?));
            }
            chosen
        } else {
            vec![None; targets.len()]
        };
        let wraps = strategies
            .iter()
            .any(|s| matches!(s, Some(Strategy::Wrap(_))));
        if wraps
            && std::iter::once(&source)
                .chain(targets)
                .any(|p| !self.carries_keys_now(*p))
        {
            // Said once when the member refused.
            return Err(Error::new(CKR_FUNCTION_FAILED));
        }
        let types = match class {
            CKO_SECRET_KEY => SECRET_KEY_ATTRIBUTES,
            CKO_PRIVATE_KEY => KEY_ATTRIBUTES,
            _ => PUBLIC_ATTRIBUTES,
        };
        let template = if secret && !wraps {
            OwnedTemplate::default()
        } else {
            self.on_member(source, |s| {
                let nested = if secret {
                    NESTED_ATTRIBUTES
                } else {
                    &[CKA_WRAP_TEMPLATE][..]
                };
                read_template(&*s.library, s.handle, source_handle, types, nested)
            })?
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?
        };
        if let Some(moved) = source_moved() {
            return Err(moved);
        }
        // Copied meanwhile by this process's reconciliation
        // (`reconcile.rs`): a second copy would identify neither.
        let copied = |position: usize| {
            matches!(
                self.group.objects.presence(object, position),
                Some(Presence::Present(_))
            )
        };
        // Wrapped once per mechanism, before any target is asked (also for
        // a target copied meanwhile: it may not be by the time it is
        // asked).
        let mut wrapped: Vec<(CK_MECHANISM_TYPE, Vec<u8>)> = Vec::new();
        for strategy in &strategies {
            let Some(Strategy::Wrap(mechanism)) = strategy else {
                continue;
            };
            if wrapped.iter().any(|(m, _)| m == mechanism) {
                continue;
            }
            let blob = self
                .wrap_for_transfer(source, source_handle, *mechanism, copying)
                .and_then(|blob| source_moved().map_or(Ok(blob), Err))?;
            wrapped.push((*mechanism, blob));
        }
        // One target's copy: `None` where it holds the object already.
        let copy_to_one = |(position, strategy): (usize, &Option<Strategy>)| {
            if copied(position) {
                return None;
            }
            let era = self.group.objects.era(position);
            let answer = match strategy {
                Some(Strategy::Clone) => Ok(self.clone_to(object, source, source_handle, position)),
                Some(Strategy::Wrap(mechanism)) => {
                    let blob = wrapped
                        .iter()
                        .find(|(m, _)| m == mechanism)
                        .map(|(_, blob)| blob.as_slice())
                        .expect("wrapped before the targets are asked");
                    self.domain_key(position).map(|domain| {
                        self.unwrap_on(object, era, *mechanism, domain, blob, &template)
                    })
                }
                None => {
                    let attributes = template.template();
                    let mut handle: CK_OBJECT_HANDLE = CK_INVALID_HANDLE;
                    let answer =
                        self.attempt_making(position, None, "replication", object, &mut |l, s| {
                            l.create_object(s, attributes.as_slice(), &mut handle)
                        });
                    Ok((answer, handle))
                }
            };
            Some((position, era, *strategy, answer))
        };
        // Asked at once as an object the application makes (`try_create`),
        // the copies made taken first: a target's refusal undoes them
        // whatever the order, as one after another.
        let copy_at = |position: usize| {
            let at = targets.iter().position(|p| *p == position);
            copy_to_one((position, &strategies[at.expect("a target of the copy")]))
        };
        let answers = self.answers_of(targets, &copy_at, |answer| match answer {
            Some((_, _, _, Ok((attempt, _)))) => MakingAnswer::of(attempt),
            _ => MakingAnswer::Refused,
        });
        let mut made: Vec<(Era, CK_OBJECT_HANDLE)> = Vec::new();
        let mut faulted = Vec::new();
        for (position, era, strategy, answer) in answers.flatten() {
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    self.undo(&made);
                    return Err(e);
                }
            };
            match answer {
                // Made, but the target's handles were forgotten since: it
                // failed, and its return finds the copy by fingerprint.
                (Attempt::Answered(CKR_OK), handle)
                    if !self
                        .group
                        .objects
                        .set_presence(object, era, Presence::Present(handle)) =>
                {
                    faulted.push(position)
                }
                (Attempt::Answered(CKR_OK), handle) => {
                    made.push((era, handle));
                    if matches!(strategy, Some(Strategy::Wrap(_))) {
                        self.group.members[source].carried_a_key();
                        self.group.members[position].carried_a_key();
                    }
                }
                (Attempt::Answered(rv), _) => {
                    self.undo(&made);
                    return Err(match strategy {
                        Some(Strategy::Wrap(_)) => self.transport_error(position, rv, copying),
                        Some(Strategy::Clone) => self.clone_error(source, position, rv, copying),
                        None => Error::new(rv),
                    });
                }
                (Attempt::Faulted, _) => faulted.push(position),
            }
        }
        Ok(faulted)
    }

    /// The class of `object`, whose copy on `source` is `source_handle`:
    /// the kept fingerprint names it; it is read only without one.
    fn class_of(
        &self,
        object: CK_OBJECT_HANDLE,
        source: usize,
        source_handle: CK_OBJECT_HANDLE,
    ) -> Result<CK_OBJECT_CLASS> {
        let kept_class = (self.group.objects.get(object))
            .and_then(|o| identity::class_in(o.fingerprint.as_deref()?));
        match kept_class {
            Some(class) => Ok(class),
            None => self
                .on_member(source, |s| {
                    identity::read_attribute(&*s.library, s.handle, source_handle, CKA_CLASS)
                })?
                .map(|c| identity::ulong_of(&c))
                .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID)),
        }
    }

    /// Whether the copy of a key on member `source` is non-extractable
    /// there -- not one the group keeps extractable under trusted keys --
    /// so that no member can be given it: a key made non-extractable
    /// after it was made, and its copies (`C_CopyObject`). Not known
    /// (unread) counts as not.
    fn sealed(&self, source: usize, source_handle: CK_OBJECT_HANDLE) -> bool {
        let read = self.on_member(source, |s| {
            identity::read_attribute(&*s.library, s.handle, source_handle, CKA_EXTRACTABLE)
        });
        matches!(read, Ok(Some(value)) if value == [CK_FALSE])
    }

    /// Fails, with one line, when a member that lacks one of these new
    /// keys (made on `sources`) is known unable to receive it from any of
    /// them, up or down: its library refused the key-wrap mechanism in
    /// this process, what it can do (read when it was attached) leaves
    /// no way from those members to it, or the key is non-extractable on
    /// the members ([`Self::sealed`]). A member never attached in this
    /// process is not known unable: it is given the key when it joins, or
    /// says it cannot take it then; nor is one whose mechanisms could not
    /// be listed, read again as the key moves.
    pub fn refuse_unreceivable(
        &self,
        objects: &[CK_OBJECT_HANDLE],
        sources: &[usize],
        function: &str,
    ) -> Result<()> {
        let members = &self.group.members;
        for &object in objects {
            let Some(entry) = self.group.objects.get(object) else {
                continue;
            };
            let held = sources.iter().find_map(|&s| match entry.on[s] {
                Presence::Present(h) if members[s].location().is_some() => Some((s, h)),
                _ => None,
            });
            let Some((source, source_handle)) = held else {
                continue;
            };
            let class = self.class_of(object, source, source_handle)?;
            if class != CKO_SECRET_KEY && class != CKO_PRIVATE_KEY {
                continue;
            }
            let mut sealed = None;
            for to in members {
                if sources.contains(&to.position)
                    || matches!(entry.on[to.position], Presence::Present(_))
                {
                    continue;
                }
                // Known unable only when no source has a way to it.
                let reasons: Option<Vec<String>> = (sources.iter())
                    .map(|&s| no_way(&members[s], to, class))
                    .collect();
                let why = match reasons.and_then(|r| r.into_iter().next()) {
                    Some(why) => why,
                    None if *sealed.get_or_insert_with(|| self.sealed(source, source_handle)) => {
                        "the key is non-extractable on the members (made so after it was \
                         made), so no copy of it can leave them"
                            .to_string()
                    }
                    None => continue,
                };
                let event = format!(
                    "{function}: member {} ({}) could never receive the new {}: {why}; the key was not created",
                    to.serial,
                    if to.is_up() { "up" } else { "down now" },
                    self.name_object(object)
                );
                eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
                self.group.log(Some(to.position), &event);
                return Err(Error::new(CKR_FUNCTION_FAILED));
            }
        }
        Ok(())
    }

    /// Whether a new secret or private key made on any serving member
    /// reaches every other member exactly when one made on the primary
    /// would ([`no_way`]): then which member makes it cannot decide
    /// whether the call succeeds (Luna partitions in Cloning mode, for one,
    /// send private keys to no SoftHSM member, while SoftHSM sends them to
    /// a Key Export partition).
    pub fn makers_alike(&self) -> bool {
        let serving = self.group.serving_members();
        let Some(primary) = serving
            .iter()
            .find(|m| m.rotation() == crate::group::Rotation::In)
            .or(serving.first())
        else {
            return true;
        };
        let members = &self.group.members;
        let stuck = |from: &crate::group::Member, class| {
            members
                .iter()
                .any(|to| to.position != from.position && no_way(from, to, class).is_some())
        };
        [CKO_SECRET_KEY, CKO_PRIVATE_KEY].into_iter().all(|class| {
            let on_primary = stuck(primary, class);
            serving.iter().all(|m| stuck(m, class) == on_primary)
        })
    }

    /// The way a key of `class` moves from `source` to `target`; where
    /// there is none, says why in one line (stderr and the HA log) and
    /// fails: a key that cannot reach every member is not made.
    fn strategy(
        &self,
        source: usize,
        target: usize,
        class: CK_OBJECT_CLASS,
        copying: Copying,
    ) -> Result<Strategy> {
        let (from, to) = (&self.group.members[source], &self.group.members[target]);
        for (position, member) in [(source, from), (target, to)] {
            if !self.group.list_again(position) {
                let event = format!(
                    "member {}'s mechanisms could not be listed; {}",
                    member.serial,
                    copying.outcome()
                );
                eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
                self.group.log(Some(target), &event);
                return Err(Error::new(CKR_FUNCTION_FAILED));
            }
        }
        let (Some(from_location), Some(to_location)) = (from.location(), to.location()) else {
            return Err(Error::new(CKR_DEVICE_ERROR));
        };
        let (mut from_can, mut to_can) = (from.capabilities(), to.capabilities());
        let unknown_policies = !(from_can.policies_read && to_can.policies_read);
        if class == CKO_PRIVATE_KEY
            && unknown_policies
            && from_can.cloning.is_some()
            && to_can.cloning.is_some()
            && from_can.private_key_cloning
            && to_can.private_key_cloning
            && std::sync::Arc::ptr_eq(&from_location.library, &to_location.library)
            && !self.probe_clones(source, target)
        {
            from_can.refuses_private_key_cloning();
            to_can.refuses_private_key_cloning();
        }
        let side_from = Side {
            serial: &from.serial,
            library: from_location.library.as_ref(),
            capabilities: &from_can,
        };
        let side_to = Side {
            serial: &to.serial,
            library: to_location.library.as_ref(),
            capabilities: &to_can,
        };
        strategy::choose(&side_from, &side_to, class).map_err(|why| {
            let event = format!("{why}; {}", copying.outcome());
            eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
            self.group.log(Some(target), &event);
            Error::new(CKR_FUNCTION_FAILED)
        })
    }

    /// Whether partitions `source` and `target`, whose policies could not be
    /// read, clone private keys: probed once per pair of member epochs with
    /// a throw-away session key pair, and logged. Only a policy refusal
    /// (`CKR_OPERATION_NOT_ALLOWED`) says no; any other failure leaves the
    /// real clone to fail with its own line.
    fn probe_clones(&self, source: usize, target: usize) -> bool {
        let members = &self.group.members;
        let pair = (
            (source, members[source].epoch()),
            (target, members[target].epoch()),
        );
        if let Some(clones) = self.group.probes.get(pair.0, pair.1) {
            return clones;
        }
        let rv = self.probe_cloning(source, target);
        if crate::group::is_member_fault("CA_CloneObject", rv) {
            return true;
        }
        let clones = rv != crate::error::luna::CKR_OPERATION_NOT_ALLOWED;
        let event = format!(
            "start-up probe: cloning a throw-away private key from member {} to member {} answered {}; {}",
            members[source].serial,
            members[target].serial,
            rv_name(rv),
            if clones {
                "private keys move by cloning"
            } else {
                "the partitions are taken for Key Export mode (private keys are wrapped)"
            }
        );
        self.group.log(Some(target), &event);
        self.group.probes.record(pair.0, pair.1, clones);
        clones
    }

    /// Makes a throw-away EC session key pair on `source`, clones its
    /// private key to `target` and destroys all three; the clone's answer.
    fn probe_cloning(&self, source: usize, target: usize) -> CK_RV {
        let Some(cloning) = self.group.members[source].capabilities().cloning else {
            return CKR_FUNCTION_NOT_SUPPORTED;
        };
        let Ok(from) = self.member_session(source) else {
            return CKR_DEVICE_ERROR;
        };
        const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let mut public_template = TemplateBuilder::with_capacity(2);
        public_template.push_value(CKA_EC_PARAMS, &P256);
        public_template.push_bool(CKA_TOKEN, false);
        let mut private_template = TemplateBuilder::with_capacity(5);
        private_template.push_bool(CKA_TOKEN, false);
        for kind in [
            CKA_PRIVATE,
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_WRAP_WITH_TRUSTED,
        ] {
            private_template.push_bool(kind, true);
        }
        let (public_template, private_template) =
            (public_template.build(), private_template.build());
        let mechanism = BareMechanism::new(CKM_EC_KEY_PAIR_GEN);
        let (mut public, mut private) = (CK_INVALID_HANDLE, CK_INVALID_HANDLE);
        let made = self
            .on_member(source, |s| {
                s.library.generate_key_pair(
                    s.handle,
                    mechanism.as_raw(),
                    public_template.as_slice(),
                    private_template.as_slice(),
                    &mut public,
                    &mut private,
                )
            })
            .unwrap_or_else(|e| e.rv);
        if made != CKR_OK {
            return made;
        }
        let mut cloned = CK_INVALID_HANDLE;
        let rv = self
            .on_member(target, |t| {
                clone_call(
                    &cloning,
                    &*t.library,
                    from.handle,
                    t.handle,
                    private,
                    &mut cloned,
                )
            })
            .unwrap_or_else(|e| e.rv);
        // Session objects: whatever a removal leaves goes with the session.
        let discard = |position: usize, handle| {
            let _ = self.on_member(position, |s| s.library.destroy_object(s.handle, handle));
        };
        if rv == CKR_OK {
            discard(target, cloned);
        }
        discard(source, private);
        discard(source, public);
        rv
    }

    /// Clones the key `source_handle` on member `source` to member `target`
    /// with Luna's `CA_MigrateKeys` (or `CA_CloneObject` where that is all
    /// the library exports), between the two member sessions of this
    /// virtual session on one library instance.
    fn clone_to(
        &self,
        object: CK_OBJECT_HANDLE,
        source: usize,
        source_handle: CK_OBJECT_HANDLE,
        target: usize,
    ) -> (Attempt, CK_OBJECT_HANDLE) {
        let cloning = self.group.members[source].capabilities().cloning;
        let Some(cloning) = cloning else {
            return (Attempt::Answered(CKR_FUNCTION_FAILED), CK_INVALID_HANDLE);
        };
        let source_session = match self.member_session(source) {
            Ok(s) => s.handle,
            Err(e) => return (Attempt::Answered(e.rv), CK_INVALID_HANDLE),
        };
        let mut cloned = CK_INVALID_HANDLE;
        let answer = self.attempt_making(target, None, "CA_CloneObject", object, &mut |l, s| {
            clone_call(&cloning, l, source_session, s, source_handle, &mut cloned)
        });
        (answer, cloned)
    }

    /// Unwraps `blob` under the domain key on the member of `era`, in
    /// which `domain` is its handle.
    fn unwrap_on(
        &self,
        object: CK_OBJECT_HANDLE,
        era: Era,
        mechanism: CK_MECHANISM_TYPE,
        domain: CK_OBJECT_HANDLE,
        blob: &[u8],
        template: &OwnedTemplate,
    ) -> (Attempt, CK_OBJECT_HANDLE) {
        let attributes = template.template();
        let mut handle: CK_OBJECT_HANDLE = CK_INVALID_HANDLE;
        let mechanism = BareMechanism::new(mechanism);
        let position = era.member();
        let answer =
            self.attempt_making(position, Some(era), "replication", object, &mut |l, s| {
                l.unwrap_key(
                    s,
                    mechanism.as_raw(),
                    domain,
                    Some(blob),
                    attributes.as_slice(),
                    &mut handle,
                )
            });
        (answer, handle)
    }

    /// A clone the target refused: the partitions' policies or cloning
    /// domains do not let the key move. Said in one line; the application
    /// gets `CKR_FUNCTION_FAILED`, since its request was not at fault.
    fn clone_error(&self, source: usize, target: usize, rv: CK_RV, copying: Copying) -> Error {
        let event = format!(
            "cloning a key from member {} to member {} failed with {}: both partitions must share a cloning domain and allow cloning; {}",
            self.group.members[source].serial,
            self.group.members[target].serial,
            rv_name(rv),
            copying.outcome()
        );
        eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
        self.group.log(Some(target), &event);
        Error::new(CKR_FUNCTION_FAILED)
    }

    /// The key on `source` wrapped under the domain key.
    fn wrap_for_transfer(
        &self,
        source: usize,
        key: CK_OBJECT_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        copying: Copying,
    ) -> Result<Vec<u8>> {
        let domain = self.domain_key(source)?;
        let mechanism = BareMechanism::new(mechanism);
        let wrap = |s: &MemberSession| {
            // Room for any key but the largest RSA ones in one call; the
            // length the member then names where it is not enough.
            let mut blob = vec![0u8; FIRST_WRAP_ROOM];
            loop {
                let mut len = blob.len() as CK_ULONG;
                let rv = s.library.wrap_key(
                    s.handle,
                    mechanism.as_raw(),
                    domain,
                    key,
                    Some(&mut blob),
                    &mut len,
                );
                match rv {
                    CKR_OK => {
                        blob.truncate(len as usize);
                        return Ok(blob);
                    }
                    CKR_BUFFER_TOO_SMALL if len as usize > blob.len() => {
                        blob.resize(len as usize, 0);
                    }
                    rv => return Err(rv),
                }
            }
        };
        self.on_member(source, wrap)?
            .map_err(|rv| self.transport_error(source, rv, copying))
    }

    /// Whether member `position` carries key material: its library has not
    /// refused the key-wrap mechanism in this epoch, or, asked again, takes
    /// it now. A library that came to refuse mid-run may stop (a server
    /// restarted with another backend, and back), and the keys made before
    /// it refused must move then; a verdict kept for the epoch left them
    /// on one member for the life of the process (simulation seed 129).
    fn carries_keys_now(&self, position: usize) -> bool {
        let member = &self.group.members[position];
        if member.carries_keys() {
            return true;
        }
        let Some(location) = member.location() else {
            return false;
        };
        let refuses = self.on_member(position, |_| {
            strategy::refuses_wrapping(&*location.library, location.slot, &member.capabilities())
        });
        if matches!(refuses, Ok(false)) {
            member.carried_a_key();
            self.group.note_wrapping_resumed();
            return true;
        }
        false
    }

    /// A key made on `source` while a member is down reaches it later, by
    /// wrapping: a library that lists the mechanism but has come to refuse
    /// it is found out now, while the call can still fail and leave no key
    /// that can never leave its member, rather than when the copy is due.
    /// Members that move keys by cloning alone are not asked.
    pub fn probe_wrapping(&self, source: usize) {
        if self.group.up_members().count() < self.group.members.len() {
            self.probe_source(source);
        }
    }

    /// [`Self::probe_wrapping`] whoever serves: a key must leave `source`
    /// by wrapping for a member that serves too (one without the source of
    /// a copy).
    pub fn probe_source(&self, source: usize) {
        let member = &self.group.members[source];
        if member.known_to_refuse_keys() || self.group.all_members_clone() {
            return;
        }
        let Some(location) = member.location() else {
            return;
        };
        let refuses = self.on_member(source, |_| {
            strategy::refuses_wrapping(&*location.library, location.slot, &member.capabilities())
        });
        if matches!(refuses, Ok(true)) {
            self.transport_error(source, CKR_MECHANISM_INVALID, Copying::NewObject);
        }
    }

    /// A member that cannot wrap or unwrap with the domain key (its library
    /// does not carry the mechanism, as p11-kit 0.24's client does not)
    /// cannot hold the group's generated keys: say so, once per member and
    /// epoch, and answer `CKR_FUNCTION_FAILED` rather than a mechanism
    /// error the application did not cause.
    fn transport_error(&self, position: usize, rv: CK_RV, copying: Copying) -> Error {
        if rv == CKR_KEY_NOT_WRAPPABLE {
            // SoftHSM cannot wrap EdDSA private keys, for one: the key
            // cannot reach the other members, so it is not made at all.
            let event = format!(
                "member {} cannot wrap a key of this type (CKR_KEY_NOT_WRAPPABLE), so it cannot replicate; {} (use a key type every member can wrap, e.g. EC P-256 instead of Ed25519 on SoftHSM)",
                self.group.members[position].serial,
                copying.outcome()
            );
            eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
            self.group.log(Some(position), &event);
        }
        if rv != CKR_MECHANISM_INVALID {
            return Error::new(rv);
        }
        let member = &self.group.members[position];
        if member.refuses_keys() {
            let event = format!(
                "member {} cannot carry key material: its library refuses the key-wrap mechanism it lists; keys generated in this group cannot replicate (imported keys can)",
                member.serial
            );
            eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
            self.group.log(Some(position), &event);
        }
        Error::new(CKR_FUNCTION_FAILED)
    }

    /// Removes copies made before a replication had to be abandoned, each
    /// by its handle in the era it was made in; returns the members whose
    /// copy may remain: they did not answer that it is gone (a member that
    /// failed meanwhile, whose handles mean nothing now, or whose removal
    /// faulted -- taken out of service by that). Taken for removed on any
    /// answer, such a copy stayed: a reset connection answered
    /// `CKR_DEVICE_ERROR`, and the member served again holding a key the
    /// application was told was never made (simulation seed 10047347).
    pub fn undo(&self, made: &[(Era, CK_OBJECT_HANDLE)]) -> Vec<usize> {
        made.iter()
            .filter(|(era, handle)| {
                let answer =
                    self.attempt_on(era.member(), Some(*era), "C_DestroyObject", &mut |l, s| {
                        l.destroy_object(s, *handle)
                    });
                !matches!(
                    answer,
                    Attempt::Answered(CKR_OK | CKR_OBJECT_HANDLE_INVALID)
                )
            })
            .map(|(era, _)| era.member())
            .collect()
    }

    /// A call that made `object` failed: the object leaves the group and
    /// every member, so that no copy outlives the error. `made` are the
    /// copies known; members that could not remove theirs now, those that
    /// failed while asked to make it (`faulted`: a server that died may
    /// have made it first), and those a request making it was cut off on
    /// (they may still carry it out) get the removal queued, replayed
    /// before they serve again -- for an in-doubt copy once recovery has
    /// waited for it (`recovery.rs`). `print` finds those copies; without
    /// it, it is read from a copy made, and without either (a template
    /// that identifies no one object) such a copy stays.
    pub fn abandon(
        &self,
        object: CK_OBJECT_HANDLE,
        print: Option<Fingerprint>,
        made: &[(Era, CK_OBJECT_HANDLE)],
        faulted: &[usize],
    ) {
        // Read from a copy whose member kept its handles: after a
        // reconnect the number may name another object.
        let print = print.or_else(|| {
            made.iter()
                .filter(|(era, _)| !self.group.objects.moved_on(*era))
                .find_map(|(era, h)| {
                    self.on_member(era.member(), |s| {
                        identity::fingerprint(&*s.library, s.handle, *h)
                    })
                    .ok()?
                })
        });
        self.group.objects.remove(object);
        let mut left = self.undo(made);
        let in_doubt: Vec<usize> = (0..self.group.members.len())
            .filter(|p| self.group.in_doubt(*p).iter().any(|(o, _)| *o == object))
            .collect();
        let Some(print) = print else {
            return;
        };
        if !in_doubt.is_empty() {
            self.group.record_abandoned(object, print.clone());
        }
        left.extend(in_doubt);
        left.extend(faulted);
        left.sort_unstable();
        left.dedup();
        for position in left {
            self.deliver_or_queue(
                position,
                Pending::Destroy {
                    print: print.clone(),
                    object: Some(object),
                },
            );
        }
    }

    /// Gives a member that missed a change the change: queued while the
    /// member is down or coming back, for its recovery to replay; made on it
    /// now if it serves again by then, since nothing replays the queue of a
    /// member that serves.
    pub fn deliver_or_queue(&self, position: usize, change: Pending) {
        let object = change.made_object();
        self.deliver_behind(position, change, object);
    }

    /// [`Self::deliver_or_queue`] for a change of `object` (a removal
    /// names none itself): for a serving member, kept behind any change of
    /// the object still on its way there ([`crate::group::Group::change_on_its_way`]; a
    /// removal behind those it would miss, [`crate::group::Group::removal_waits`]). Made
    /// at once, a change of attributes was undone by the kept one (808),
    /// and a removal found no copy under the new `CKA_ID` a kept change
    /// was still to set, which then set it on the copy left behind (11729;
    /// simulation seeds).
    pub fn deliver_behind(
        &self,
        position: usize,
        mut change: Pending,
        object: Option<CK_OBJECT_HANDLE>,
    ) {
        loop {
            match self.group.queue_unless_up(position, change) {
                Ok(()) => return,
                Err(back) => change = back,
            }
            let behind = object.is_some_and(|object| match change {
                Pending::Destroy { .. } => self.group.removal_waits(position, object),
                _ => self.group.change_on_its_way(position, object),
            });
            if behind || self.group.catching_up(position) {
                self.group.keep_for_next_round(position, change);
                return;
            }
            // The member may still make the object: made now, an import
            // would make it twice, a removal miss the late copy.
            if self.group.doubt_ahead(position, &change, object).is_some() {
                self.group.defer(position, change);
                return;
            }
            if self.behind_a_removal(&self.group.deferred_removals(position), &change) {
                self.group.defer(position, change);
                return;
            }
            match self.apply(position, &change, None) {
                Ok(_) => return,
                Err(why) if self.group.members[position].is_up() => {
                    self.group.log(
                        Some(position),
                        &format!(
                            "{} could not be made on the member: {why}",
                            self.name_change(&change)
                        ),
                    );
                    return;
                }
                // It failed meanwhile: queue the change after all.
                Err(_) => {}
            }
        }
    }

    /// Whether `change` makes an object that one of `removals` kept for
    /// the member could match (they agree on every attribute both name,
    /// an empty check value agreeing with any, as the removal's look-up
    /// finds it: [`identity::agree`]): it must then wait behind them, in
    /// order. Made first, such a removal
    /// -- of a try a call abandoned before making the object again, kept
    /// until a login shows private objects -- would later remove the
    /// object made (simulation seed 7519).
    pub fn behind_a_removal(&self, removals: &[Fingerprint], change: &Pending) -> bool {
        if removals.is_empty() {
            return false;
        }
        let made: Fingerprint = match change {
            Pending::Import(_, template) => {
                template.values().map(|(t, v)| (t, v.to_vec())).collect()
            }
            // A change of attributes may copy the object (`set_missed`).
            Pending::Create(object) | Pending::Set { object, .. } => {
                // Not an object destroyed since: no copy of it is made
                // (`copy_missed`), a change of it only changes the copy
                // there -- which its own removal waits for
                // (`Group::removal_behind_kept_set`). Kept behind the
                // removals, the change waited for its removal and the
                // removal for it, for good, the copy of the destroyed
                // object left on the member (simulation seed 542635).
                if self.group.objects.get(*object).is_none() {
                    return false;
                }
                match self.fingerprint_of(*object) {
                    Some(print) => (*print).clone(),
                    None => return true,
                }
            }
            Pending::Destroy { .. } | Pending::Orphans(_) => return false,
        };
        removals
            .iter()
            .any(|removal| identity::agree(removal, &made))
    }

    /// An object as the HA log names it (class, label, ID).
    pub fn name_object(&self, object: CK_OBJECT_HANDLE) -> String {
        self.fingerprint_of(object)
            .map_or("an object that can no longer be read".to_string(), |p| {
                identity::describe(&p)
            })
    }

    /// A queued change as the HA log names it.
    pub fn name_change(&self, change: &Pending) -> String {
        match change {
            Pending::Destroy { print, .. } => {
                format!("the removal of {}", identity::describe(print))
            }
            Pending::Orphans(print) => {
                format!("the removal of orphans like {}", identity::describe(print))
            }
            Pending::Create(object) => self.name_object(*object),
            Pending::Set { before, .. } => {
                format!("the change of attributes of {}", identity::describe(before))
            }
            Pending::Import(object, template) => {
                match self.group.objects.get(*object).and_then(|o| o.fingerprint) {
                    Some(print) => identity::describe(&print),
                    None => template
                        .print()
                        .map_or("an imported object".to_string(), |p| identity::describe(&p)),
                }
            }
        }
    }

    /// Makes on member `position` one change it missed; true if the member
    /// needed it. `holdings`, where given, is what the member holds (kept
    /// current here), and spares searching the member for each change.
    pub fn apply(
        &self,
        position: usize,
        change: &Pending,
        holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        let outcome = match change {
            Pending::Destroy { print, object } => {
                self.destroy_copy(position, print, *object, holdings)
            }
            Pending::Orphans(print) => self.remove_orphans(position, print, holdings),
            Pending::Create(object) => self.copy_missed(position, *object, holdings),
            Pending::Import(object, template) => {
                self.import_missed(position, *object, template, holdings)
            }
            Pending::Set {
                object,
                before,
                changes,
            } => self.set_missed(position, *object, before, changes, holdings),
        };
        // Whatever the caller does next (keeps the change, drops it with a
        // line), a member that answers without the object serves without
        // it: ranked so for searches until it holds it.
        if let (Err(_), Some(object)) = (&outcome, change.made_object()) {
            if self.group.members[position].reachable() {
                self.group.note_refused(position, object);
            }
        }
        outcome
    }

    /// Whether `change` failed for want of a source: a copy (or a change
    /// of attributes that found no copy to change) of an object
    /// still the group's that no serving member but `position` holds
    /// (those that do are down, or failed during the copy), or a removal of
    /// orphans that cannot tell an object from the group's copy until such
    /// a member serves.
    pub fn lacks_source(&self, position: usize, change: &Pending) -> bool {
        let object = match change {
            Pending::Create(object) | Pending::Set { object, .. } => object,
            Pending::Orphans(print) => {
                return self
                    .orphans(position, print, None)
                    .is_ok_and(|(_, undecided)| undecided > 0)
            }
            _ => return false,
        };
        self.group
            .objects
            .get(*object)
            .is_some_and(|entry| entry.owner.is_none())
            && self.copy_source(*object, position).is_none()
    }

    /// A serving member other than `position` to copy `object` from: one
    /// holding it with no change of it on its way there
    /// ([`crate::group::Group::change_on_its_way`]). A copy from a member whose copy
    /// still waited for a change of attributes held the object as it was
    /// before, which the removal of the object, by its fingerprint now,
    /// then did not find (simulation seed 20554).
    pub fn copy_source(&self, object: CK_OBJECT_HANDLE, position: usize) -> Option<usize> {
        let holders = (self.group.up_members().map(|m| m.position))
            .filter(|p| *p != position && !self.group.change_on_its_way(*p, object))
            .filter(|p| self.resolve(object, *p).ok().flatten().is_some());
        // A key goes from a holder with a way to the member, where one has
        // it: the first holder's library may refuse the key-wrap mechanism
        // while another's takes it (simulation: a copy made on both, the
        // first chosen, left the member without it for good).
        let key_class = (self.fingerprint_of(object))
            .filter(|p| identity::names_a_key(p))
            .and_then(|p| identity::class_in(&p));
        let Some(class) = key_class else {
            return holders.into_iter().next();
        };
        // Where none has a way, one whose library refused the mechanism
        // only before its last return, and may take it again: tried
        // rather than one that refuses it now, the copy left the member
        // without the key after every holder served again (simulation
        // seed 30967754).
        let to = &self.group.members[position];
        let mut fallback: Option<(usize, bool)> = None;
        for holder in holders {
            let from = &self.group.members[holder];
            if no_way(from, to, class).is_none() {
                return Some(holder);
            }
            let may_take_it_again = !from.refuses_wrapping();
            if fallback.is_none_or(|(_, better)| may_take_it_again && !better) {
                fallback = Some((holder, may_take_it_again));
            }
        }
        fallback.map(|(holder, _)| holder)
    }

    /// Why key `object` cannot reach member `target` from any serving
    /// member, as what the members can do says ([`strategy::choose`]: no
    /// common key-wrap mechanism, a library that refuses the one it lists,
    /// a Luna policy); `None` for an object that is no secret or private
    /// key, or that some serving member could give it. Asks no member but
    /// for the object's class, read once and kept: synchronisation asks it
    /// before it tries a copy, so that a member that can take no key costs
    /// no copy attempt per key and pass (failed copies cost one recovery
    /// 55 s in the long chaos run).
    pub fn unreceivable(&self, object: CK_OBJECT_HANDLE, target: usize) -> Option<String> {
        let print = self.fingerprint_of(object)?;
        if !identity::names_a_key(&print) {
            return None;
        }
        let class = identity::class_in(&print)?;
        let to = &self.group.members[target];
        let to_location = to.location()?;
        let to_can = to.capabilities();
        let target_side = Side {
            serial: &to.serial,
            library: to_location.library.as_ref(),
            capabilities: &to_can,
        };
        let mut why = None;
        for from in self.group.up_members().filter(|m| m.position != target) {
            let Some(from_location) = from.location() else {
                continue;
            };
            let from_can = from.capabilities();
            let source_side = Side {
                serial: &from.serial,
                library: from_location.library.as_ref(),
                capabilities: &from_can,
            };
            match strategy::choose(&source_side, &target_side, class) {
                Ok(_) => return None,
                Err(reason) => why = Some(reason),
            }
        }
        why
    }

    /// Whether `change` is a copy (or a change of attributes, which may
    /// copy) that may fail only because a library
    /// refuses the key-wrap mechanism now: the member's own, or that of a
    /// serving member that could give it the object. Such a copy is kept,
    /// not dropped, and tried again until the library takes the mechanism
    /// again (see [`Self::carries_keys_now`]).
    pub fn waits_for_wrapping(&self, position: usize, change: &Pending) -> bool {
        matches!(change, Pending::Create(_) | Pending::Set { .. })
            && std::iter::once(&self.group.members[position])
                .chain(self.group.up_members())
                .any(|m| m.refuses_wrapping())
    }

    /// Whether the member already holds the object: known there, or
    /// matched by one or more objects (more than one: an earlier copy that
    /// was interrupted -- never copy it again then, or copies would
    /// multiply with every recovery), with the fingerprint it has or one
    /// it had before a change of its attributes: the change, which the
    /// member missed, reaches that copy ([`Pending::Set`]). Made again,
    /// an import cut off on the member before the change was held twice
    /// (simulation seed 25725).
    pub fn holds(
        &self,
        object: CK_OBJECT_HANDLE,
        position: usize,
        holdings: Option<&Holdings>,
    ) -> bool {
        if let Some(Presence::Present(_)) = self.group.objects.presence(object, position) {
            return true;
        }
        let Some(print) = self.fingerprint_of(object) else {
            return false;
        };
        let former = (self.group.objects.get(object)).map_or(Vec::new(), |o| o.former_prints);
        for print in std::iter::once(print).chain(former) {
            let (found, era): (Vec<CK_OBJECT_HANDLE>, Era) = match holdings {
                Some(h) => (h.matching(&print).collect(), h.era),
                None => {
                    let era = self.group.objects.era(position);
                    match self.group.find_on_utility(position, &print) {
                        Ok(found) => (found, era),
                        Err(_) => return false,
                    }
                }
            };
            if let [one] = found[..] {
                self.group
                    .objects
                    .set_presence(object, era, Presence::Present(one));
            }
            if !found.is_empty() {
                return true;
            }
        }
        false
    }

    /// Notes a new copy, whose object has fingerprint `print`, in
    /// `holdings`.
    fn note_made(
        print: Option<std::sync::Arc<Fingerprint>>,
        handle: CK_OBJECT_HANDLE,
        holdings: Option<&mut Holdings>,
    ) {
        if let (Some(h), Some(print)) = (holdings, print) {
            h.objects.push((handle, (*print).clone()));
        }
    }

    /// Creates an imported object on the member from the application's
    /// template.
    fn import_missed(
        &self,
        position: usize,
        object: CK_OBJECT_HANDLE,
        template: &OwnedTemplate,
        holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        if self.group.objects.get(object).is_none()
            || self.holds(object, position, holdings.as_deref())
        {
            return Ok(false);
        }
        // Read before the member is asked: an application thread may
        // destroy the object meanwhile, which takes it out of the group
        // and queues its removal for this member -- a removal that finds
        // the copy only among `holdings` (simulation seed 99). The print
        // the template makes: changes of the object's attributes since
        // come behind the import, and find the copy by it.
        let print = holdings
            .is_some()
            .then(|| self.imported_print(object))
            .flatten();
        let attributes = template.template();
        let mut handle = CK_INVALID_HANDLE;
        let era = self.group.objects.era(position);
        let answer = self.attempt_making(position, None, "C_CreateObject", object, &mut |l, s| {
            l.create_object(s, attributes.as_slice(), &mut handle)
        });
        match answer {
            Attempt::Answered(CKR_OK) => {
                if !self
                    .group
                    .objects
                    .set_presence(object, era, Presence::Present(handle))
                {
                    // Made, under a handle forgotten since (the member
                    // failed, or its handles went stale while it serves):
                    // looked up by its fingerprint like any such copy.
                    // Taken for a failure, the copy stayed unknown there,
                    // and a search named it a second object (simulation
                    // seed 31987150).
                    self.group.made_under_forgotten_handle(position, object);
                    return Ok(true);
                }
                Self::note_made(print, handle, holdings);
                Ok(true)
            }
            Attempt::Answered(rv) => Err(format!("import refused with {}", rv_name(rv))),
            Attempt::Faulted => Err("the member failed again".into()),
        }
    }

    /// The fingerprint of `object` as the application made it, which an
    /// import from its template makes: the first before any change of its
    /// attributes. Noted under the print it has now, a copy the object's
    /// removal came to while the changes were still kept behind the import
    /// was found neither by them nor by the removal, and stayed (simulation
    /// seed 20554).
    fn imported_print(&self, object: CK_OBJECT_HANDLE) -> Option<std::sync::Arc<Fingerprint>> {
        let first = (self.group.objects.get(object)).and_then(|o| o.former_prints.first().cloned());
        first.or_else(|| self.fingerprint_of(object))
    }

    /// Copies a token object the member missed from a member that serves.
    /// Session objects are not replayed: their sessions keep them on the
    /// members that were up.
    fn copy_missed(
        &self,
        position: usize,
        object: CK_OBJECT_HANDLE,
        holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        let Some(entry) = self.group.objects.get(object) else {
            return Ok(false);
        };
        if entry.owner.is_some() || self.holds(object, position, holdings.as_deref()) {
            return Ok(false);
        }
        let mut source = self
            .copy_source(object, position)
            .ok_or_else(|| "no member that serves holds the object as it is".to_string())?;
        // Read before the copy, as for an import (`import_missed`).
        let print = holdings
            .is_some()
            .then(|| self.fingerprint_of(object))
            .flatten();
        let mut era = self.group.objects.era(source);
        let mut copied = self.copy_to(object, source, &[position], Copying::Missed);
        // A source whose library refused the key-wrap mechanism in this
        // very copy (not known before) gives way to another holder, if one
        // has a way: dropped, a copy delivered to a serving member that
        // lacked the source was lost for good (simulation, copies).
        for _ in 1..self.group.members.len() {
            if copied.is_ok() || !self.group.members[source].known_to_refuse_keys() {
                break;
            }
            match self.copy_source(object, position) {
                Some(next) if next != source => source = next,
                _ => break,
            }
            era = self.group.objects.era(source);
            copied = self.copy_to(object, source, &[position], Copying::Missed);
        }
        match copied {
            Ok(faulted) if faulted.is_empty() => {
                match self.group.objects.presence(object, position) {
                    Some(Presence::Present(h)) => Self::note_made(print, h, holdings),
                    // Destroyed meanwhile, its copy's handle went with it:
                    // found by its fingerprint for the removal queued.
                    None => {
                        if let (Some(h), Some(print)) = (holdings, print) {
                            let found = self.group.find_on_utility(position, &print);
                            for copy in found.map_err(|e| rv_name(e.rv))? {
                                h.objects.push((copy, (*print).clone()));
                            }
                        }
                    }
                    Some(_) => {}
                }
                Ok(true)
            }
            Ok(_) => Err("the member failed again".into()),
            Err(e) => {
                // The source may have failed under the copy unseen (its
                // connection lost while no call went there): asked once, it
                // is taken out if it does not answer, so that recovery
                // brings it back and the copy, kept, is made then. Left
                // serving, it failed every copy from it until an
                // application call happened to reach it (simulation seed
                // 30474 with `SIM_RECONNECTS`). So may one whose token
                // restarted unseen: the object's reading on a session from
                // before the restart answers as a handle not found
                // (simulation seed 1006656, a kept key left on one member).
                // One that answers, logged in, numbered its objects anew
                // unseen (its library reconnected, and the token renumbers
                // per connection): its handles are looked up afresh, and
                // the copy, kept, finds the object there at its next try
                // (simulation seed 2449974: every try read the stale
                // handle, and the member never got the copy).
                if crate::group::is_member_fault("C_WrapKey", e.rv)
                    || e.rv == CKR_OBJECT_HANDLE_INVALID
                {
                    let answered = self.answers(source);
                    if answered && e.rv == CKR_OBJECT_HANDLE_INVALID && self.group.holds_login() {
                        self.group.handles_went_stale(source, era);
                    }
                }
                Err(format!("copying an object failed with {}", rv_name(e.rv)))
            }
        }
    }

    /// Sets on the member the attributes of a `C_SetAttributeValue` it
    /// missed (see [`Pending::Set`]), on its copy of `object`: the one
    /// known, else the one with the fingerprint from before the change (a
    /// copy made since from a template older than the change is known,
    /// and noted among `holdings` under the fingerprint the object has
    /// now, simulation seed 4734). Where it holds none, it holds
    /// the object changed already (the change made before its answer was
    /// lost, or a copy made since), or lacks it, and is given it as a
    /// missed copy; where it holds more than one, none is changed (we
    /// never guess).
    fn set_missed(
        &self,
        position: usize,
        object: CK_OBJECT_HANDLE,
        before: &Fingerprint,
        changes: &OwnedTemplate,
        holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        let now = self.group.objects.era(position);
        let (one, era) = match self.group.objects.presence(object, position) {
            Some(Presence::Present(known)) => (known, now),
            _ => {
                let era = holdings.as_deref().map_or(now, |h| h.era);
                let found: Vec<CK_OBJECT_HANDLE> = match &holdings {
                    Some(h) => h.matching(before).collect(),
                    None => self
                        .group
                        .find_on_utility(position, before)
                        .map_err(|e| rv_name(e.rv))?,
                };
                match found[..] {
                    [one] => (one, era),
                    [] => return self.copy_missed(position, object, holdings),
                    _ => return Ok(false),
                }
            }
        };
        let template = changes.template();
        let mut answer =
            self.attempt_on(position, Some(era), "C_SetAttributeValue", &mut |l, s| {
                l.set_attribute_value(s, one, template.as_slice())
            });
        if let Attempt::Answered(refused @ 1..) = answer {
            answer = self.set_what_differs(position, era, one, &template, refused);
        }
        match answer {
            Attempt::Answered(CKR_OK) => {
                self.group.forget_object(position, one);
                self.group
                    .objects
                    .set_presence(object, era, Presence::Present(one));
                if let Some(h) = holdings {
                    for (_, print) in h.objects.iter_mut().filter(|(h, _)| *h == one) {
                        *print = identity::changed(print, changes.values());
                    }
                }
                Ok(true)
            }
            Attempt::Answered(rv) => Err(format!("the change refused with {}", rv_name(rv))),
            Attempt::Faulted => Err("the member failed again".into()),
        }
    }

    /// Sets on copy `one` only those of `changes` it does not hold already,
    /// after the member refused them all with `refused`: a copy made since
    /// the change (from the object as it is now) may hold them, and a
    /// member may refuse an attribute set again to the value it holds
    /// (SoftHSM, any `CKA_SENSITIVE` once true). Nested templates count as
    /// not held. The refusal stands where the copy cannot be read or holds
    /// none of them.
    fn set_what_differs(
        &self,
        position: usize,
        era: Era,
        one: CK_OBJECT_HANDLE,
        changes: &Template,
        refused: CK_RV,
    ) -> Attempt {
        let kinds: Vec<CK_ATTRIBUTE_TYPE> = changes.iter().map(|a| a.kind()).collect();
        let mut held = None;
        let read = self.attempt_on(position, Some(era), "C_GetAttributeValue", &mut |l, s| {
            held = identity::read_attributes(l, s, one, &kinds);
            CKR_OK
        });
        let Some(held) = held else {
            return match read {
                Attempt::Faulted => Attempt::Faulted,
                Attempt::Answered(_) => Attempt::Answered(refused),
            };
        };
        let holds = |a: &Attribute| {
            !NESTED_ATTRIBUTES.contains(&a.kind())
                && (held.iter()).any(|(kind, value)| *kind == a.kind() && a.value() == Some(value))
        };
        let mut differing = TemplateBuilder::with_capacity(changes.len());
        for a in changes.iter().filter(|a| !holds(a)) {
            differing.push(a);
        }
        let differing = differing.build();
        if differing.is_empty() {
            return Attempt::Answered(CKR_OK);
        }
        if differing.len() == changes.len() {
            return Attempt::Answered(refused);
        }
        self.attempt_on(position, Some(era), "C_SetAttributeValue", &mut |l, s| {
            l.set_attribute_value(s, one, differing.as_slice())
        })
    }

    /// Removes from the member every object matching the template print
    /// `print` that no object of the group is (see [`Pending::Orphans`]).
    /// An object with the full fingerprint of one of the group's stays. One
    /// that cannot be told from a group object yet (see [`Kinship`]) stays
    /// too, and the removal fails, to be tried again when a member holding
    /// the group's copy serves (see [`Self::lacks_source`]).
    fn remove_orphans(
        &self,
        position: usize,
        print: &Fingerprint,
        mut holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        let era = holdings
            .as_deref()
            .map_or_else(|| self.group.objects.era(position), |h| h.era);
        let (orphans, undecided) = self.orphans(position, print, holdings.as_deref())?;
        let mut removed = false;
        for handle in orphans {
            let answer = self.attempt_on(position, Some(era), "C_DestroyObject", &mut |l, s| {
                l.destroy_object(s, handle)
            });
            match answer {
                Attempt::Answered(CKR_OK | CKR_OBJECT_HANDLE_INVALID) => {
                    self.group.objects.forget_copy(position, handle);
                    self.group.forget_object(position, handle);
                    if let Some(h) = holdings.as_deref_mut() {
                        h.objects.retain(|(held, _)| *held != handle);
                    }
                    removed = true;
                }
                Attempt::Answered(rv) => {
                    return Err(format!("removal refused with {}", rv_name(rv)))
                }
                Attempt::Faulted => return Err("the member failed again".into()),
            }
        }
        if undecided > 0 {
            return Err(format!(
                "{undecided} objects cannot be told from the group's copies until a member \
                 holding those serves"
            ));
        }
        Ok(removed)
    }

    /// The objects on the member matching the template print `print` that
    /// are orphans, and how many more cannot be told from a group object
    /// yet.
    fn orphans(
        &self,
        position: usize,
        print: &Fingerprint,
        holdings: Option<&Holdings>,
    ) -> std::result::Result<(Vec<CK_OBJECT_HANDLE>, usize), String> {
        let found: Vec<(CK_OBJECT_HANDLE, Fingerprint)> = match holdings {
            Some(h) => h
                .objects
                .iter()
                .filter(|(_, candidate)| identity::matches(print, candidate))
                .cloned()
                .collect(),
            None => {
                let handles = self
                    .group
                    .find_on_utility(position, print)
                    .map_err(|e| rv_name(e.rv))?;
                let mut found = Vec::with_capacity(handles.len());
                for handle in handles {
                    let own = self
                        .on_member(position, |s| {
                            identity::fingerprint(&*s.library, s.handle, handle)
                        })
                        .map_err(|e| rv_name(e.rv))?;
                    if let Some(own) = own {
                        found.push((handle, own));
                    }
                }
                found
            }
        };
        let era = holdings.map_or_else(|| self.group.objects.era(position), |h| h.era);
        // Handles found in the era the group records the member's copies
        // in can be told from those copies.
        let current = !self.group.objects.moved_on(era);
        let mut orphans = Vec::new();
        let mut undecided = 0;
        for (handle, own) in found {
            let known = self.group.objects.known(position, handle);
            if known.is_some_and(|object| self.made_by_group(object, position)) {
                continue;
            }
            match self.kinship(position, &own, current.then_some(handle)) {
                Kinship::Group => {}
                Kinship::Orphan => orphans.push(handle),
                Kinship::Undecided => undecided += 1,
            }
        }
        Ok((orphans, undecided))
    }

    /// Whether a group object known on member `position` is more than a
    /// search's view of that member's copy: it has a copy elsewhere, was
    /// made in a session, or its fingerprint (check value and all) was read
    /// where it was made. A search on a member serving alone names an
    /// orphan there too, and that must not make it the group's.
    fn made_by_group(&self, object: CK_OBJECT_HANDLE, position: usize) -> bool {
        self.group.objects.get(object).is_some_and(|entry| {
            entry.owner.is_some()
                || entry.copies().any(|(m, _)| m != position)
                || entry
                    .fingerprint
                    .is_some_and(|print| identity::has_check_value(&print))
        })
    }

    /// Whether a member object with fingerprint `own` is one of the group's
    /// (and so no orphan): an object whose kept fingerprint it matches,
    /// where that tells values apart. A kept fingerprint without check
    /// value (an object first seen in a search) is completed from a copy on
    /// another serving member, and an object whose check value cannot be
    /// read there is taken to be it; where no other serving member holds a
    /// copy (every other member is out), it cannot be told yet -- taking it
    /// for the group's kept an orphan of a lost answer and let
    /// `[HASynchronize]` spread it (simulation seed 256398).
    ///
    /// `handle`, where given, is the object's handle in the era the group
    /// records the member's copies in: a group object whose copy there is
    /// recorded under another handle is not this one (a member holds one
    /// copy of each). Where the group's private key reached a member
    /// before the removal of the orphan a lost generate left there ran,
    /// the orphan, alike in every attribute its print reads, passed for the
    /// group's and stayed beside it (`tests/recovery.rs`, once in the
    /// suite; which path copied the key first was not traced).
    fn kinship(
        &self,
        position: usize,
        own: &Fingerprint,
        handle: Option<CK_OBJECT_HANDLE>,
    ) -> Kinship {
        let mut matched = self.group.objects.matched_by(own);
        let copy_elsewhere = |object: CK_OBJECT_HANDLE| {
            handle.is_some_and(|handle| {
                matches!(self.group.objects.presence(object, position),
                    Some(Presence::Present(copy)) if copy != handle)
            })
        };
        matched.retain(|(object, _)| {
            !self.group.made_after_orphans(position, *object) && !copy_elsewhere(*object)
        });
        let Some((_, mine)) = own
            .iter()
            .find(|(t, v)| *t == CKA_CHECK_VALUE && !v.is_empty())
        else {
            return if matched.is_empty() {
                Kinship::Orphan
            } else {
                Kinship::Group
            };
        };
        let mut undecided = false;
        for (object, print) in matched {
            if identity::has_check_value(&print) {
                return Kinship::Group;
            }
            let full = self
                .group
                .up_members()
                .map(|m| m.position)
                .filter(|p| *p != position)
                .find_map(|p| {
                    let era = self.group.objects.era(p);
                    let handle = self.resolve(object, p).ok().flatten()?;
                    self.on_member(p, |s| identity::fingerprint(&*s.library, s.handle, handle))
                        .ok()
                        .flatten()
                        .filter(|_| !self.group.objects.moved_on(era))
                });
            let Some(full) = full else {
                undecided = true;
                continue;
            };
            let theirs = full.into_iter().find(|(t, _)| *t == CKA_CHECK_VALUE);
            if theirs.is_none_or(|(_, theirs)| theirs.is_empty() || &theirs == mine) {
                return Kinship::Group;
            }
        }
        if undecided {
            Kinship::Undecided
        } else {
            Kinship::Orphan
        }
    }

    /// Removes from the member the one object with this fingerprint, the
    /// copy of the group's `removed` where this process had it -- unless
    /// it may be another live object's.
    fn destroy_copy(
        &self,
        position: usize,
        print: &Fingerprint,
        removed: Option<CK_OBJECT_HANDLE>,
        holdings: Option<&mut Holdings>,
    ) -> std::result::Result<bool, String> {
        let era = holdings
            .as_deref()
            .map_or_else(|| self.group.objects.era(position), |h| h.era);
        let found: Vec<CK_OBJECT_HANDLE> = match &holdings {
            Some(h) => h.matching(print).collect(),
            None => self
                .group
                .find_on_utility(position, print)
                .map_err(|e| rv_name(e.rv))?,
        };
        let [one] = found[..] else {
            return Ok(false);
        };
        if removed
            .is_some_and(|removed| self.may_be_a_live_copy(position, era, one, print, removed))
        {
            return Ok(false);
        }
        let answer = self.attempt_on(position, Some(era), "C_DestroyObject", &mut |l, s| {
            l.destroy_object(s, one)
        });
        match answer {
            Attempt::Answered(CKR_OK | CKR_OBJECT_HANDLE_INVALID) => {
                self.group.objects.forget_copy(position, one);
                self.group.forget_object(position, one);
                if let Some(h) = holdings {
                    h.objects.retain(|(handle, _)| *handle != one);
                }
                Ok(true)
            }
            Attempt::Answered(rv) => Err(format!("removal refused with {}", rv_name(rv))),
            Attempt::Faulted => Err("the member failed again".into()),
        }
    }

    /// Whether `copy`, the one object on member `position` (handles of
    /// `era`) that the removal of `removed` finds by `print`, may be the
    /// copy of another live object of the group that the removal cannot
    /// tell from it: one whose kept print matches the copy and has every
    /// attribute of `print`, already on the member (where it is on its way,
    /// the one copy can only be the removed object's). The retry of a
    /// call whose first try was abandoned makes such an object: that
    /// try's removal, kept for the member while the application was
    /// logged out, took the retry's copy for its own and removed it
    /// (simulation seed 30406176, `SIM_BROKEN_LOGINS=1`). The copy is read
    /// only where such an object exists -- nearly never, so a removal
    /// costs no more calls than before; a copy that cannot be read is
    /// taken for the removed object's, as before.
    fn may_be_a_live_copy(
        &self,
        position: usize,
        era: Era,
        copy: CK_OBJECT_HANDLE,
        print: &Fingerprint,
        removed: CK_OBJECT_HANDLE,
    ) -> bool {
        if self.group.objects.moved_on(era) {
            return false;
        }
        let rivals: Vec<std::sync::Arc<Fingerprint>> =
            (self.group.objects.including(print).into_iter())
                .filter(|(object, _)| {
                    *object != removed && !self.group.on_its_way(position, *object)
                })
                .map(|(_, kept)| kept)
                .collect();
        if rivals.is_empty() {
            return false;
        }
        let Ok(Some(own)) = self.on_member(position, |s| {
            identity::fingerprint(&*s.library, s.handle, copy)
        }) else {
            return false;
        };
        rivals.iter().any(|kept| identity::matches(kept, &own))
    }
}

/// What a member object matching a group object's template is, told
/// apart by its check value (see [`VirtualSession::kinship`]).
enum Kinship {
    /// One of the group's objects: it stays.
    Group,
    /// Made by a call whose answer was lost: it goes.
    Orphan,
    /// It cannot be told yet: no other serving member holds a copy of the
    /// group object it may be.
    Undecided,
}

/// Why a new key of `class` made on `from` could never reach `to`, both
/// attached in this process, if it could not: no way between them (what
/// each can do, read when it was attached), or a library found to refuse
/// the key-wrap mechanism. A member never attached is not known unable.
fn no_way(
    from: &crate::group::Member,
    to: &crate::group::Member,
    class: CK_OBJECT_CLASS,
) -> Option<String> {
    let (Some(from_location), Some(to_location)) = (from.location(), to.location()) else {
        return None;
    };
    let (from_can, to_can) = (from.capabilities(), to.capabilities());
    // Not known unable: read again before the key moves.
    if from_can.unlisted || to_can.unlisted {
        return None;
    }
    let source_side = Side {
        serial: &from.serial,
        library: from_location.library.as_ref(),
        capabilities: &from_can,
    };
    let target_side = Side {
        serial: &to.serial,
        library: to_location.library.as_ref(),
        capabilities: &to_can,
    };
    match strategy::choose(&source_side, &target_side, class) {
        Err(why) => Some(why),
        Ok(Strategy::Wrap(_)) if to.known_to_refuse_keys() || to_can.wrap_refused => Some(format!(
            "member {}'s library refused the key-wrap mechanism",
            to.serial
        )),
        Ok(Strategy::Wrap(_)) if from.known_to_refuse_keys() => Some(format!(
            "member {}'s library refused the key-wrap mechanism, so the key cannot leave it",
            from.serial
        )),
        Ok(_) => None,
    }
}

/// Clones `object` from `source_session` to `target_session`, two sessions
/// of one Luna library instance: `CA_MigrateKeys` where the library has it
/// and the partitions take it (firmware before 7.8 does not), else
/// `CA_CloneObject`.
fn clone_call(
    cloning: &Cloning,
    library: &dyn MemberBackend,
    source_session: CK_SESSION_HANDLE,
    target_session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    cloned: &mut CK_OBJECT_HANDLE,
) -> CK_RV {
    if cloning.migrate {
        let (mut migrated, mut object_rv) = (CK_INVALID_HANDLE, CKR_OK);
        let rv = library.migrate_key(
            source_session,
            target_session,
            object,
            &mut migrated,
            &mut object_rv,
        );
        if rv != CKR_FUNCTION_NOT_SUPPORTED || !cloning.clone {
            *cloned = migrated;
            return if rv == CKR_OK { object_rv } else { rv };
        }
    }
    if cloning.clone {
        library.clone_object(target_session, source_session, object, cloned)
    } else {
        CKR_FUNCTION_NOT_SUPPORTED
    }
}

/// A member's token objects with their fingerprints, read once, so that a
/// recovery asks the member about each object once instead of searching it
/// for each object it might lack.
pub struct Holdings {
    objects: Vec<(CK_OBJECT_HANDLE, Fingerprint)>,
    /// The era of the member's handles they were read in: each is
    /// recorded only in that era.
    era: Era,
}

impl Holdings {
    /// Reads every token object of member `position` but the domain key.
    pub fn read(session: &VirtualSession, position: usize) -> Result<Holdings> {
        Ok(Holdings::read_unless(session, position, &|| false)?
            .expect("a reading that nothing stops ends"))
    }

    /// [`Holdings::read`], stopped (`None`) as soon as `stop` says so
    /// before an object is read.
    pub fn read_unless(
        session: &VirtualSession,
        position: usize,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Holdings>> {
        let era = session.group.objects.era(position);
        let domain = session.group.domain_handle(position);
        let everything: Fingerprint = vec![(CKA_TOKEN, vec![CK_TRUE])];
        let handles = session.group.find_on_utility(position, &everything)?;
        let mut objects = Vec::with_capacity(handles.len());
        let mut unread = false;
        for handle in handles.into_iter().filter(|h| Some(*h) != domain) {
            if stop() {
                return Ok(None);
            }
            match session.on_member(position, |s| {
                identity::fingerprint(&*s.library, s.handle, handle)
            })? {
                Some(print) => objects.push((handle, print)),
                None => unread = true,
            }
        }
        // An object removed since the search is simply not held; a member
        // that stopped answering must not pass for one that lacks objects.
        if unread && !session.answers(position) {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        Ok(Some(Holdings { objects, era }))
    }

    /// Holdings that list nothing yet, for a member that recovery takes to
    /// hold what it held before (see `recovery.rs`): the copies made on it
    /// are noted in them, from its handles' `era` now.
    pub fn none_read(era: Era) -> Holdings {
        Holdings {
            objects: Vec::new(),
            era,
        }
    }

    /// Whether the member's handles were forgotten since they were read
    /// (it returned, or lost its login): the handles they name mean
    /// nothing now, and a call naming one faults without reaching it.
    pub fn outdated(&self, objects: &crate::object::ObjectTable) -> bool {
        objects.moved_on(self.era)
    }

    /// How many objects they list.
    pub fn count(&self) -> usize {
        self.objects.len()
    }

    /// The member's objects a search for `print` finds.
    pub fn matching<'a>(
        &'a self,
        print: &'a Fingerprint,
    ) -> impl Iterator<Item = CK_OBJECT_HANDLE> + 'a {
        self.objects
            .iter()
            .filter(move |(_, candidate)| identity::matches(print, candidate))
            .map(|(h, _)| *h)
    }
}
