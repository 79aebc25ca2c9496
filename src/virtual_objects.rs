//! Object calls on a virtual slot. An object the application creates from
//! its attributes is created on every member that is up; an object a
//! member computes (key generation, unwrapping, derivation, copying) is
//! made on one member and replicated to the others before the call
//! returns. Handles the application sees are virtual.

use crate::arguments::{
    Attribute, AttributeQuery, AttributeRequest, OutArray, Template, TemplateBuilder,
};
use crate::error::{check, Error, Result};
use crate::group::{Pending, Positions, Waits};
use crate::identity;
use crate::mechanism::{Mechanism, OwnedTemplate};
use crate::member_api::MemberBackend;
use crate::object::{Era, Presence};
use crate::replication::Copying;
use crate::virtual_session::{
    waiting, Attempt, Input, MakingAnswer, OpKind, Preference, Step, VirtualSession,
};
use cryptoki_sys::*;

/// The fingerprint an object made from `template` has as far as the
/// template says, its class `class` unless the template names one: what
/// finds the orphans a call making it may leave (see [`Pending::Orphans`]).
pub fn made_print(template: &Template, class: CK_OBJECT_CLASS) -> Option<identity::Fingerprint> {
    let class = class.to_ne_bytes();
    let default = [(CKA_CLASS, &class[..])];
    let values = template.values().chain(default.iter().copied());
    let mut print = identity::print_of_template(values)?;
    let mut seen = Vec::new();
    print.retain(|(t, _)| {
        let first = !seen.contains(t);
        seen.push(*t);
        first
    });
    Some(print)
}

/// Attributes that hold key material: a key the application made
/// non-extractable never reveals them, sensitive or not (PKCS#11 2.40,
/// `C_GetAttributeValue`), although the members keep it extractable.
const KEY_MATERIAL: [CK_ATTRIBUTE_TYPE; 7] = [
    CKA_VALUE,
    CKA_PRIVATE_EXPONENT,
    CKA_PRIME_1,
    CKA_PRIME_2,
    CKA_EXPONENT_1,
    CKA_EXPONENT_2,
    CKA_COEFFICIENT,
];

/// How many objects a search identifies as it returns them (reads their
/// fingerprints): the few an application looks up to use at once stay
/// usable if their member fails before it uses them. Beyond these -- and
/// in any batch that takes a search beyond them -- an object is identified
/// with its first read, so that an enumeration does not cost a second
/// member call per object, nor a fixed cost per search.
const IDENTIFIED_AT_ONCE: usize = 16;

/// Attributes every copy of an object holds as the original does
/// (`replication.rs` carries them, or they follow from what it carries):
/// a search naming only these finds the same objects on every member that
/// holds every object of the group. Others may differ between a key and
/// its copies -- how it was made (`CKA_LOCAL`, `CKA_KEY_GEN_MECHANISM`,
/// `CKA_ALWAYS_SENSITIVE`), `CKA_DESTROYABLE`, `CKA_COPYABLE`, vendors'
/// attributes -- so a search naming one runs on the primary.
const ALIKE_ON_COPIES: [CK_ATTRIBUTE_TYPE; 34] = [
    CKA_CLASS,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_APPLICATION,
    CKA_VALUE,
    CKA_OBJECT_ID,
    CKA_CERTIFICATE_TYPE,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_CERTIFICATE_CATEGORY,
    CKA_KEY_TYPE,
    CKA_SUBJECT,
    CKA_ID,
    CKA_SENSITIVE,
    CKA_ENCRYPT,
    CKA_DECRYPT,
    CKA_WRAP,
    CKA_UNWRAP,
    CKA_SIGN,
    CKA_SIGN_RECOVER,
    CKA_VERIFY,
    CKA_VERIFY_RECOVER,
    CKA_DERIVE,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_VALUE_LEN,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_WRAP_WITH_TRUSTED,
    CKA_MODIFIABLE,
];

/// Attributes a search cannot ask the members: their copies of a key the
/// application made non-extractable read extractable.
const EMULATED: [CK_ATTRIBUTE_TYPE; 2] = [CKA_EXTRACTABLE, CKA_NEVER_EXTRACTABLE];

/// Attributes holding a template for the keys a key unwraps or derives.
const NESTED_TEMPLATES: [CK_ATTRIBUTE_TYPE; 2] = [CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE];

/// One-way attributes, each with the value it can only leave (PKCS#11 3.1,
/// the storage object, private key and secret key attribute tables): set
/// to it, a member changes nothing, or refuses where the key left it.
const LOOSE_VALUES: [(CK_ATTRIBUTE_TYPE, bool); 4] = [
    (CKA_SENSITIVE, false),
    (CKA_WRAP_WITH_TRUSTED, false),
    (CKA_EXTRACTABLE, true),
    (CKA_COPYABLE, true),
];

/// The attributes of a change that succeeded which a member that missed it
/// must still get: not a one-way attribute set to its loose value, which
/// changed nothing, and given to a copy made since with the value
/// tightened would be refused at every try, holding back the object's
/// later changes (simulation seed 1808740).
fn lasting_changes<'t>(changes: &'t Template) -> Template<'t> {
    let mut lasting = TemplateBuilder::with_capacity(changes.len());
    let loose = |a: &Attribute| {
        (LOOSE_VALUES.iter()).any(|&(kind, value)| a.kind() == kind && a.bool() == Some(value))
    };
    for a in changes.iter().filter(|a| !loose(a)) {
        lasting.push(a);
    }
    lasting.build()
}

/// The attributes of a nested template, if `a` is a well-formed one.
fn nested(a: Attribute<'_>) -> Option<impl Iterator<Item = Attribute<'_>> + Clone> {
    if !NESTED_TEMPLATES.contains(&a.kind()) {
        return None;
    }
    a.nested_attributes()
}

/// A member failed while the objects a search found there were named.
pub(crate) struct MemberFailed;

/// What the application asked of a key's protection, for the HA log.
#[derive(Clone, Copy)]
enum Asked {
    /// `C_SetAttributeValue` on the key.
    Change,
    /// `C_CopyObject` of the key.
    Copy,
}

/// A template as the members get it: where the application asks for a
/// non-extractable key, the members make it extractable under trusted keys
/// only, so the domain key can still carry it to the other members. The
/// templates a key imposes on the keys it unwraps or derives are rewritten
/// the same way, so that the keys the group makes from it agree with them.
pub struct MemberTemplate<'t> {
    template: Template<'t>,
    protects: bool,
}

impl<'t> MemberTemplate<'t> {
    /// For a template that makes a new key, where a key the template does
    /// not call extractable is not (as on SoftHSM).
    pub fn for_new_key(template: &'t Template) -> Self {
        Self::rewrite(template, true)
    }

    /// For a template that copies a key or changes its attributes, where
    /// only an explicit `CKA_EXTRACTABLE = FALSE` makes it non-extractable:
    /// that becomes `CKA_WRAP_WITH_TRUSTED = TRUE` (the members' copy stays
    /// extractable, as it is).
    pub fn for_change(template: &'t Template) -> Self {
        Self::rewrite(template, false)
    }

    fn rewrite(template: &'t Template, new_key: bool) -> Self {
        let extractable = template.bool(CKA_EXTRACTABLE);
        let protects = match extractable {
            Some(e) => !e,
            None => new_key,
        };
        let protecting_nested = |a: Attribute| {
            a.nested()
                .filter(|_| NESTED_TEMPLATES.contains(&a.kind()))
                .is_some_and(|inner| inner.bool(CKA_EXTRACTABLE) == Some(false))
        };
        if !protects && !template.iter().any(protecting_nested) {
            return MemberTemplate {
                template: template.reborrow(),
                protects,
            };
        }
        let mut rewritten = TemplateBuilder::with_capacity(template.len() + 2);
        for a in template.iter() {
            if protects && matches!(a.kind(), CKA_EXTRACTABLE | CKA_WRAP_WITH_TRUSTED) {
                continue;
            }
            if !protecting_nested(a) {
                rewritten.push(a);
                continue;
            }
            let mut protected =
                TemplateBuilder::with_capacity(a.nested().map_or(0, |i| i.len()) + 2);
            for i in nested(a)
                .into_iter()
                .flatten()
                .filter(|i| !matches!(i.kind(), CKA_EXTRACTABLE | CKA_WRAP_WITH_TRUSTED))
            {
                protected.push(i);
            }
            protected.push_bool(CKA_EXTRACTABLE, true);
            protected.push_bool(CKA_WRAP_WITH_TRUSTED, true);
            rewritten.push_nested(a.kind(), protected.build());
        }
        if protects {
            if new_key {
                rewritten.push_bool(CKA_EXTRACTABLE, true);
            }
            rewritten.push_bool(CKA_WRAP_WITH_TRUSTED, true);
        }
        MemberTemplate {
            template: rewritten.build(),
            protects,
        }
    }

    /// Whether the key made or changed with this template is one the
    /// application made non-extractable.
    pub fn protects(&self) -> bool {
        self.protects
    }

    /// The template the members get.
    pub fn template(&self) -> &Template<'t> {
        &self.template
    }
}

/// What decides whether a key looks extractable to the application.
struct Protection {
    /// Known protected from earlier (then nothing was read).
    known: bool,
    class: Option<CK_OBJECT_CLASS>,
    /// The members' `CKA_EXTRACTABLE` and `CKA_WRAP_WITH_TRUSTED`.
    extractable: Option<bool>,
    trusted_only: Option<bool>,
}

impl Protection {
    /// A key the application made non-extractable: the members keep it
    /// extractable under trusted keys only.
    fn protected(&self) -> bool {
        self.known
            || (matches!(self.class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY))
                && self.extractable == Some(true)
                && self.trusted_only == Some(true))
    }
}

/// What [`VirtualSession::change_everywhere`] does to every copy of an
/// object.
enum Change<'a, 't> {
    Destroy,
    /// `C_SetAttributeValue` of these attributes, as the members get them.
    Set(&'a Template<'t>),
}

/// Which session owns an object created with this `CKA_TOKEN` value.
fn owner_for(token: Option<bool>, session: CK_SESSION_HANDLE) -> Option<CK_SESSION_HANDLE> {
    if token.unwrap_or(false) {
        None
    } else {
        Some(session)
    }
}

/// How often a member that answered `C_CreateObject` with
/// `CKR_GENERAL_ERROR` is asked again, and the first pause (doubling: 5,
/// 10, 20, 40 ms). SoftHSM answers it when writing a new object's first
/// attributes fails ("Could not initialize the attribute" in its log),
/// which a failover test met once in about twenty runs, failing an import
/// while the member was healthy. Read in its source, not traced: a thread
/// of the same process reading the token's objects meanwhile can take the
/// half-written file for a bad one, its file locks not excluding threads
/// of one process. A key only where the member is found to hold nothing
/// its template identifies ([`VirtualSession::holds_nothing_like`]):
/// SoftHSM writes a key whole before it sets `CKA_LOCAL`, which can fail
/// the same way, so asked again regardless it would hold the key twice.
/// (Never asked again, 60 key imports failed in 185 ms in a long chaos
/// run, the member that answered them the only one serving.) A key still
/// refused goes to the next member, and the member that refused is given
/// it at the next recovery round ([`VirtualSession::keep_refused`]),
/// which looks the member up first.
const TROUBLED_RETRIES: u32 = 4;
const FIRST_TROUBLED_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// One member's answer to a call making an object on each member: the
/// copy's handle where it made one, in the `era` its handles were then,
/// and whether it refused a key while holding something like it
/// (`troubled`: it may have made the key before answering).
struct MemberMade {
    position: usize,
    era: Era,
    handle: CK_OBJECT_HANDLE,
    answer: Attempt,
    troubled: bool,
}

impl VirtualSession {
    /// The answers of the members at `positions` to `ask`, for a call that
    /// makes objects: asked at once where the group asks them so
    /// ([`crate::group::Group::asks_at_once`]), each in a thread inside the
    /// caller's write, taken in the order `kind` gives them -- those that
    /// made a copy first, then those of members that failed, then
    /// refusals, so that a refusal that ends the call knows every member
    /// that may hold a copy; else one after another as the caller takes
    /// them, so that a caller that stops at an answer asks no further
    /// member.
    pub(crate) fn answers_of<'a, T: Send + 'a>(
        &self,
        positions: &'a [usize],
        ask: &'a (dyn Fn(usize) -> T + Sync),
        kind: impl Fn(&T) -> MakingAnswer,
    ) -> Box<dyn Iterator<Item = T> + 'a> {
        if !self.group.asks_at_once(positions) {
            return Box::new(positions.iter().map(move |p| ask(*p)));
        }
        let mut answers = self.group.on_each_at_once(positions, |position| {
            let _inside = waiting::part_of_a_write();
            ask(position)
        });
        answers.sort_by_key(|answer| kind(answer));
        Box::new(answers.into_iter())
    }
}

/// Whether `template` makes a key: a public, private or secret key.
fn is_key(template: &Template) -> bool {
    matches!(
        template.ulong(CKA_CLASS),
        Some(CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY)
    )
}

impl VirtualSession {
    /// Creates an object on every member that is up; all or nothing for
    /// request errors. A member that faults is taken out and gets the
    /// object when it returns. When every member asked failed and none
    /// serves, the try is abandoned (its copies, made or in doubt, are
    /// removed from the members as they return) and, while a member is
    /// being brought back, the call waits for it outside its write and
    /// tries again as a new object, within one `memberTimeout` of waiting
    /// in all ([`Waits`]).
    pub fn create_everywhere(
        &self,
        owner: Option<CK_SESSION_HANDLE>,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        self.make_waiting(|| self.try_create(owner, template))
    }

    /// Runs the tries of a call that makes objects: each inside the write
    /// ([`Self::wait_before_writing`]); one that answers `None` -- every
    /// member it asked failed and none served, its objects abandoned --
    /// is followed, outside the write, by another try as soon as a member
    /// serves, waiting for a returning one if none does (all the call's
    /// waits within one `memberTimeout`, [`Waits`]); `CKR_DEVICE_ERROR`
    /// when none serves by then.
    fn make_waiting<T>(&self, mut try_once: impl FnMut() -> Result<Option<T>>) -> Result<T> {
        let mut waits = Waits::default();
        loop {
            let writing = self.wait_before_writing(&mut waits);
            let made = try_once()?;
            drop(writing);
            match made {
                Some(made) => return Ok(made),
                None if self.serving_again(&mut waits) => continue,
                None => return Err(Error::new(CKR_DEVICE_ERROR)),
            }
        }
    }

    /// One try of [`Self::create_everywhere`]: `None` when every member
    /// asked failed and none serves any more (the object abandoned).
    fn try_create(
        &self,
        owner: Option<CK_SESSION_HANDLE>,
        template: &Template,
    ) -> Result<Option<CK_OBJECT_HANDLE>> {
        let _making = self.group.making_objects();
        let _write = self.group.enter_write();
        let create = |library: &dyn MemberBackend, session, handle: &mut CK_OBJECT_HANDLE| {
            library.create_object(session, template.as_slice(), handle)
        };
        // Known before any member is asked, so that a request cut off on
        // the wire leaves it in doubt on that member (attempt_making).
        let object = self
            .group
            .objects
            .insert(vec![Presence::Unknown; self.group.members.len()], owner);
        let _unfinished = self.group.making_object(object);
        // What finds a copy of a token object whose making failed.
        let print = || {
            owner
                .is_none()
                .then(|| OwnedTemplate::copy(template).print())
                .flatten()
        };
        // Where changes are kept for a member, a kept removal of a like
        // object waits for this call (`Group::importing_like`).
        let _importing = (self.group.has_deferred())
            .then(print)
            .flatten()
            .map(|p| self.group.importing(object, p));
        let mut made: Vec<(Era, CK_OBJECT_HANDLE)> = Vec::new();
        let mut faulted: Vec<usize> = Vec::new();
        let mut refused: Vec<(Era, CK_RV)> = Vec::new();
        // Members that answered `CKR_GENERAL_ERROR` for a key while holding
        // something like it: they may have made it before answering.
        let mut troubled: Vec<usize> = Vec::new();
        let make_on = |position: usize| {
            let mut handle = CK_INVALID_HANDLE;
            let era = self.group.objects.era(position);
            let mut attempt = || {
                self.attempt_making(position, None, "C_CreateObject", object, &mut |l, s| {
                    create(l, s, &mut handle)
                })
            };
            let mut answer = attempt();
            let mut troubled = false;
            let mut pause = FIRST_TROUBLED_PAUSE;
            for _ in 0..TROUBLED_RETRIES {
                if !matches!(answer, Attempt::Answered(CKR_GENERAL_ERROR)) {
                    break;
                }
                if is_key(template) && !self.holds_nothing_like(era, print()) {
                    troubled = true;
                    break;
                }
                crate::clock::sleep(pause);
                pause *= 2;
                answer = attempt();
            }
            MemberMade {
                position,
                era,
                handle,
                answer,
                troubled,
            }
        };
        // Until a member holds it: one that came up while those asked
        // failed takes it, as another member takes any other call.
        while made.is_empty() {
            let up = self.making_order();
            if up.is_empty() {
                self.abandon(object, print(), &made, &faulted);
                self.remove_leftovers(&troubled, print());
                return Ok(None);
            }
            // One after another, a member's refusal of a request ends the
            // call before the next is asked. Asked at once, a copy any of
            // them made makes the object, whatever the order: the answers
            // that made it are taken first, and a member refusing it then
            // serves without it, as after it refused behind another.
            let answers = self.answers_of(&up, &make_on, |a| MakingAnswer::of(&a.answer));
            for MemberMade {
                position,
                era,
                handle,
                answer,
                troubled: troubled_here,
            } in answers
            {
                if troubled_here {
                    troubled.push(position);
                }
                if let Attempt::Answered(rv) = answer {
                    if rv != CKR_OK && (!made.is_empty() || rv == CKR_GENERAL_ERROR) {
                        refused.push((era, rv));
                        continue;
                    }
                }
                match self.note_copy(object, era, handle, answer, &mut made) {
                    Ok(true) => faulted.push(position),
                    Ok(false) => {}
                    Err(e) => {
                        self.abandon(object, print(), &made, &faulted);
                        self.remove_leftovers(&troubled, print());
                        return Err(e);
                    }
                }
            }
            if let (true, Some(&(_, rv))) = (made.is_empty(), refused.first()) {
                self.abandon(object, print(), &made, &faulted);
                self.remove_leftovers(&troubled, print());
                return Err(Error::new(rv));
            }
        }
        if let Err(e) = self.check_replicas(&[object], "C_CreateObject") {
            self.abandon(object, print(), &made, &faulted);
            self.remove_leftovers(&troubled, print());
            return Err(e);
        }
        if let Some(&(era, handle)) = made.first() {
            let public_value = matches!(
                template.ulong(CKA_CLASS),
                Some(CKO_CERTIFICATE | CKO_DATA | CKO_PUBLIC_KEY)
            )
            .then(|| template.values().find(|(t, _)| *t == CKA_VALUE))
            .flatten()
            .map(|(_, value)| value.len());
            self.remember_fingerprint(object, era.member(), handle, public_value);
        }
        if !self.group.objects.has_fingerprint(object) {
            // The member failed before its copy could be read: without a
            // fingerprint the object could not be found again once that
            // member's handles are forgotten.
            if let Some(print) = print() {
                self.group.objects.set_fingerprint(object, print);
            }
        }
        let missed: Vec<usize> = (0..self.group.members.len())
            .filter(|p| !made.iter().any(|(era, _)| era.member() == *p))
            .collect();
        if !missed.is_empty() && owner.is_none() {
            let kept = std::sync::Arc::new(OwnedTemplate::copy(template));
            for position in missed {
                let change = Pending::Import(object, std::sync::Arc::clone(&kept));
                match refused.iter().find(|(era, _)| era.member() == position) {
                    Some(&(era, rv)) => self.keep_refused(object, era, rv, change),
                    None => self.deliver_or_queue(position, change),
                }
            }
        }
        Ok(Some(object))
    }

    /// A member refused (`rv`, in `era`) an object another member took: a
    /// refusal by one member does not fail the application's call (the
    /// soak: imports failed with `CKR_GENERAL_ERROR` while one member's
    /// SoftHSM refused every import). The member serves without the
    /// object -- searches prefer members that lack none -- and it is tried
    /// again at the next recovery round (no member need return: the long
    /// chaos run, every member serving at its end, waited for it for
    /// good); the HA log says so.
    #[cold]
    fn keep_refused(&self, object: CK_OBJECT_HANDLE, era: Era, rv: CK_RV, change: Pending) {
        let position = era.member();
        self.group
            .objects
            .set_presence(object, era, Presence::Absent);
        self.group.log(
            Some(position),
            &format!(
                "{} refused with {} while another member took it; the member serves \
                 without it, tried again at the next recovery round",
                self.name_change(&change),
                crate::error::rv_name(rv)
            ),
        );
        self.group.keep_for_next_round(position, change);
    }

    /// The members that are up in the order a call that makes an object
    /// on each of them asks them: the serving ones by expected completion
    /// in the object-making lane (degraded ones last), then the rest
    /// (standby members). The first copy made is the one whose fingerprint
    /// is read (two or three more calls), so it is on the member expected
    /// to answer first rather than on a slow primary.
    fn making_order(&self) -> Vec<usize> {
        let members = &self.group.members;
        let mut order: Vec<usize> = (self.group)
            .by_preference(crate::group::MAKING_LANE)
            .into_iter()
            .filter(|p| members[*p].is_up())
            .collect();
        for member in self.group.up_members() {
            if !order.contains(&member.position) {
                order.push(member.position);
            }
        }
        // Members catching up are given the object behind what is kept
        // for them (`deliver_or_queue`), unless the others are too few.
        let (catching_up, current): (Vec<usize>, Vec<usize>) =
            order.iter().partition(|p| self.group.catching_up(**p));
        if !catching_up.is_empty()
            && !current.is_empty()
            && current.len() >= self.group.settings.min_replicas
        {
            return current;
        }
        order
    }

    /// `VirtualTokenNNMinReplicas`: each new object must be on that many
    /// members before the call that made it succeeds; otherwise the caller
    /// removes it everywhere and the call fails, with one line saying why.
    fn check_replicas(&self, objects: &[CK_OBJECT_HANDLE], function: &str) -> Result<()> {
        let wanted = self.group.settings.min_replicas;
        if wanted <= 1 {
            return Ok(());
        }
        for object in objects {
            let held = self.group.objects.get(*object).map_or(0, |o| {
                o.on.iter()
                    .filter(|p| matches!(p, Presence::Present(_)))
                    .count()
            });
            if held < wanted {
                let event = format!(
                    "{function} made {} on {held} member(s), fewer than \
                     VirtualToken{:02}MinReplicas = {wanted} (members are down); it was removed \
                     again and the call failed",
                    self.name_object(*object),
                    self.group.index
                );
                eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
                self.group.log(None, &event);
                return Err(Error::new(CKR_FUNCTION_FAILED));
            }
        }
        Ok(())
    }

    /// New virtual objects for the handles `made` returned on the member
    /// of `era` (their owners as `owners` say); `None`, with none left,
    /// when the member's handles were forgotten since `era`.
    fn record_made(
        &self,
        era: Era,
        made: &[CK_OBJECT_HANDLE],
        owners: &[Option<bool>],
        session: CK_SESSION_HANDLE,
    ) -> Option<Vec<CK_OBJECT_HANDLE>> {
        let objects = &self.group.objects;
        let mut recorded = Vec::with_capacity(made.len());
        for (h, token) in made.iter().zip(owners) {
            let unknown = vec![Presence::Unknown; self.group.members.len()];
            let object = objects.insert(unknown, owner_for(*token, session));
            recorded.push(object);
            if !objects.set_presence(object, era, Presence::Present(*h)) {
                for object in recorded {
                    objects.remove(object);
                }
                return None;
            }
        }
        Some(recorded)
    }

    /// Removes from the `troubled` members the copy a key import whose
    /// call failed may have left: each answered `CKR_GENERAL_ERROR` while
    /// holding something like the key, which SoftHSM does having made it
    /// (its `CKA_LOCAL` could not be set), so no handle names it. Only an
    /// object no object of the group is goes ([`Pending::Orphans`]): the
    /// like object may be the application's own. Left, the key the
    /// application was told failed stayed on the member.
    fn remove_leftovers(&self, troubled: &[usize], print: Option<identity::Fingerprint>) {
        let Some(print) = print else {
            return;
        };
        for position in troubled {
            self.deliver_or_queue(*position, Pending::Orphans(print.clone()));
        }
    }

    /// Whether the member of `era` holds, by a lookup now, no object that
    /// `print` (a template's identifying print) matches; false where that
    /// cannot be told: no print, its handles forgotten since, or the
    /// lookup failing.
    fn holds_nothing_like(&self, era: Era, print: Option<identity::Fingerprint>) -> bool {
        let Some(print) = print else {
            return false;
        };
        let found = self.on_member(era.member(), |s| {
            self.group.find_on(era.member(), s, &print)
        });
        !self.group.objects.moved_on(era) && matches!(found, Ok(Ok(f)) if f.is_empty())
    }

    /// Records one member's answer to a call that makes `object` on every
    /// member: a copy made is kept in `made`; a request error is the
    /// call's, which abandons the object with every member that may hold
    /// a copy ([`VirtualSession::abandon`]: those faulted too -- a member
    /// taken out while its request went on may have made one), so no
    /// member keeps what the application was told failed; true for a
    /// member that faulted, to be given the object when it returns -- as
    /// one whose handles were forgotten after it answered (`era`, taken
    /// before the call, is over), whose `handle` may name another object
    /// now: that return finds the copy by its fingerprint.
    fn note_copy(
        &self,
        object: CK_OBJECT_HANDLE,
        era: Era,
        handle: CK_OBJECT_HANDLE,
        answer: Attempt,
        made: &mut Vec<(Era, CK_OBJECT_HANDLE)>,
    ) -> Result<bool> {
        match answer {
            Attempt::Answered(CKR_OK) => {
                let recorded =
                    self.group
                        .objects
                        .set_presence(object, era, Presence::Present(handle));
                if recorded {
                    made.push((era, handle));
                }
                Ok(!recorded)
            }
            Attempt::Answered(rv) => Err(Error::new(rv)),
            Attempt::Faulted => Ok(true),
        }
    }

    pub fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        let owner = owner_for(template.bool(CKA_TOKEN), session);
        let class = template.ulong(CKA_CLASS);
        if !matches!(class, Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY)) {
            return self.create_everywhere(owner, template);
        }
        // An imported key the application does not call extractable
        // must still reach members that join later.
        let member_template = MemberTemplate::for_new_key(template);
        let object = self.create_everywhere(owner, member_template.template())?;
        if member_template.protects() {
            self.group.objects.mark_protected(object, false);
        }
        Ok(object)
    }

    /// `C_CopyObject`, tried again on a returning member when every
    /// member asked failed ([`Self::make_waiting`]).
    pub fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<CK_OBJECT_HANDLE> {
        self.make_waiting(|| self.try_copy(session, source, template))
    }

    /// One try of [`Self::copy_object`]: `None` when every member asked
    /// failed and none serves any more (the copy abandoned).
    fn try_copy(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: &Template,
    ) -> Result<Option<CK_OBJECT_HANDLE>> {
        let _making = self.group.making_objects();
        let token = match template.bool(CKA_TOKEN) {
            Some(t) => t,
            None => self.read_bool(source, CKA_TOKEN)?,
        };
        let (changes, protects) = self.extractability_change(source, template, Asked::Copy)?;
        let owner = owner_for(Some(token), session);
        let _write = self.group.enter_write();
        let object = self
            .group
            .objects
            .insert(vec![Presence::Unknown; self.group.members.len()], owner);
        let _unfinished = self.group.making_object(object);
        // Undone, the copies go, and so do those of members that failed
        // while asked (`faulted`, an answer lost): found on their return
        // by the copy's print, read from a copy made, else the print it
        // would have -- the source's, changed as asked. Without one, a copy
        // whose only member lost its answer stayed, the application told
        // it failed (simulation, copies).
        let undo = |faulted: &[usize]| {
            let made = self.group.objects.copies(object);
            let print = (made.is_empty())
                .then(|| self.fingerprint_of(source))
                .flatten()
                .map(|print| identity::changed(&print, changes.values()));
            self.abandon(object, print, &made, faulted);
        };
        // Each member that holds the source copies it itself: no key
        // material moves, so even keys the members cannot wrap are copied.
        // Members that failed while asked, in any round: the source may be
        // on none that serves by the next (a member that refused it), and
        // the copy made on one whose answer was lost stayed. Every undo
        // takes them with the members that `missed` (this round's): one
        // that lost its answer in an earlier round is none of those.
        let mut failed_while_asked: Vec<usize> = Vec::new();
        let with_earlier = |missed: &[usize], earlier: &[usize]| -> Vec<usize> {
            missed.iter().chain(earlier).copied().collect()
        };
        let (made, missed) = loop {
            let (copies, mut missed) = match self.resolve_everywhere(source) {
                Ok(found) => found,
                Err(e) => {
                    undo(&failed_while_asked);
                    return Err(e);
                }
            };
            let mut made: Vec<(Era, CK_OBJECT_HANDLE)> = Vec::new();
            let order = self.making_order();
            let rank = |p: &usize| order.iter().position(|o| o == p).unwrap_or(order.len());
            let mut copies = copies;
            copies.sort_by_key(|(p, _, _)| rank(p));
            let copy_on = |&(position, source_handle, era): &(usize, CK_OBJECT_HANDLE, Era)| {
                let mut handle = CK_INVALID_HANDLE;
                let answer = self.attempt_making(
                    position,
                    Some(era),
                    "C_CopyObject",
                    object,
                    &mut |l, s| l.copy_object(s, source_handle, changes.as_slice(), &mut handle),
                );
                (position, era, handle, answer)
            };
            // The copies made are taken first, so that a refusal undoes
            // them whatever the order, as one after another.
            let positions: Vec<usize> = copies.iter().map(|(p, _, _)| *p).collect();
            let copy_at = |position: usize| {
                let copy = copies.iter().find(|(p, _, _)| *p == position);
                copy_on(copy.expect("a copy for each position"))
            };
            let answers = self.answers_of(&positions, &copy_at, |(_, _, _, a)| MakingAnswer::of(a));
            for (position, era, handle, answer) in answers {
                match self.note_copy(object, era, handle, answer, &mut made) {
                    Ok(true) => {
                        missed.push(position);
                        failed_while_asked.push(position);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        undo(&with_earlier(&missed, &failed_while_asked));
                        return Err(e);
                    }
                }
            }
            if !made.is_empty() {
                break (made, missed);
            }
            if self.group.up_members().next().is_none() {
                undo(&with_earlier(&missed, &failed_while_asked));
                return Ok(None);
            }
        };
        // Every member that made no copy -- down, failed while asked,
        // without the source (it refused it, or cannot take keys), a change
        // of the source on its way there -- is given the copy: one that
        // serves now, as a generated key's other members are, a refusal
        // there failing the call with the copies undone; the others when
        // they return. Left out, a serving member without the source served
        // without the copy and no line said so; given it once the call had
        // returned, a member whose library came to refuse the key-wrap
        // mechanism never got it (simulation, copies).
        let lacking: Vec<usize> = (0..self.group.members.len())
            .filter(|p| !missed.contains(p) && made.iter().all(|(era, _)| era.member() != *p))
            .collect();
        self.remember_fingerprint(object, made[0].0.member(), made[0].1, None);
        // A key reaches those members only by wrapping: the members that
        // made it are asked first whether their library takes the
        // mechanism, so that the copy comes from one that does, and one
        // known unable to receive it from any of them fails the call, as
        // for a generated key, rather than report a key that member lacks
        // for good.
        let sources: Vec<usize> = made.iter().map(|(era, _)| era.member()).collect();
        if !missed.is_empty() || !lacking.is_empty() {
            for source in &sources {
                self.probe_source(*source);
            }
        }
        let (serving, mut later): (Vec<usize>, Vec<usize>) = (missed.iter().chain(&lacking))
            .copied()
            .partition(|p| self.group.members[*p].is_up());
        if let Some(&first) = serving.first() {
            let source = self
                .copy_source(object, first)
                .unwrap_or(made[0].0.member());
            match self.copy_to(object, source, &serving, Copying::NewObject) {
                Ok(faulted) => later.extend(faulted),
                Err(e) => {
                    undo(&with_earlier(&missed, &failed_while_asked));
                    return Err(e);
                }
            }
        }
        let checked = (self.refuse_unreceivable(&[object], &sources, "C_CopyObject"))
            .and_then(|()| self.check_replicas(&[object], "C_CopyObject"));
        if let Err(e) = checked {
            undo(&with_earlier(&later, &failed_while_asked));
            return Err(e);
        }
        if owner.is_none() {
            for position in later {
                self.deliver_or_queue(position, Pending::Create(object));
            }
        }
        if protects {
            let never = self
                .group
                .objects
                .get(source)
                .is_some_and(|o| o.never_extractable);
            self.group.objects.mark_protected(object, never);
        }
        Ok(Some(object))
    }

    /// The template of a copy or change of `object` as the members get
    /// it, and whether the object is (or becomes) one the application made
    /// non-extractable. `CKA_EXTRACTABLE` only goes from TRUE to FALSE
    /// (PKCS#11 2.40, table 4.9 footnote 11): TRUE on such a key is
    /// `CKR_ATTRIBUTE_READ_ONLY`; FALSE on an extractable one goes to the
    /// members as it is.
    fn extractability_change<'t>(
        &self,
        object: CK_OBJECT_HANDLE,
        template: &'t Template,
        asked: Asked,
    ) -> Result<(Template<'t>, bool)> {
        let unchanged = || template.without(&[]);
        let Some(extractable) = template.bool(CKA_EXTRACTABLE) else {
            return Ok((unchanged(), self.protected(object)?));
        };
        let view = self.read_protection(object)?;
        if view.protected() {
            if extractable {
                return Err(Error::new(CKR_ATTRIBUTE_READ_ONLY));
            }
            // Already non-extractable: nothing to change on the members.
            let rest = template.without(&[CKA_EXTRACTABLE]);
            return Ok((rest, true));
        }
        // The members decide, as for any key they keep as it looks.
        // SoftHSM lets no one set `CKA_WRAP_WITH_TRUSTED` on a key that
        // exists, nor on a copy, so a key (or copy) made non-extractable
        // after the fact is so on the members too: it is on every member
        // that holds it now, and members that join later cannot receive it.
        if !extractable {
            self.refuse_while_owed(object, asked)?;
        }
        Ok((unchanged(), false))
    }

    /// Fails, with one line, a change that would make `object`
    /// non-extractable on the members while a member is still owed its
    /// copy (down since it was made, or the copy on its way): that member
    /// could never receive it, and the key would live on fewer members
    /// than the application was told, as a new key that cannot reach a
    /// member is refused ([`Self::refuse_unreceivable`]). The change
    /// succeeds once every member holds the key.
    fn refuse_while_owed(&self, object: CK_OBJECT_HANDLE, asked: Asked) -> Result<()> {
        let members = &self.group.members;
        let Some(owed) = members
            .iter()
            .find(|m| self.group.on_its_way(m.position, object))
        else {
            return Ok(());
        };
        let what = match asked {
            Asked::Change => format!(
                "C_SetAttributeValue: {} is not made non-extractable",
                self.name_object(object)
            ),
            Asked::Copy => format!(
                "C_CopyObject: no non-extractable copy of {} is made",
                self.name_object(object)
            ),
        };
        let event = format!(
            "{what}: member {} ({}) is still owed the key and could never receive it then; \
             this succeeds once the member holds it",
            owed.serial,
            if owed.is_up() { "up" } else { "down now" },
        );
        eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
        self.group.log(Some(owed.position), &event);
        Err(Error::new(CKR_FUNCTION_FAILED))
    }

    fn read_bool(&self, object: CK_OBJECT_HANDLE, attribute: CK_ATTRIBUTE_TYPE) -> Result<bool> {
        let mut query = AttributeQuery::new();
        query.room(attribute, 1);
        self.stateless(&[object], "C_GetAttributeValue", |library, s, h| {
            library.get_attribute_value(s, h[0], Some(query.as_mut_slice()))
        })?;
        Ok(query.bool(0) == Some(true))
    }

    /// Whether the members keep this key extractable only on the
    /// application's behalf, so that it must look non-extractable.
    fn protected(&self, object: CK_OBJECT_HANDLE) -> Result<bool> {
        Ok(self.read_protection(object)?.protected())
    }

    /// What decides whether `object` looks extractable, read in one call
    /// unless it is known already.
    fn read_protection(&self, object: CK_OBJECT_HANDLE) -> Result<Protection> {
        let entry = self
            .group
            .objects
            .get(object)
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
        if entry.protected {
            return Ok(Protection {
                known: true,
                class: None,
                extractable: Some(true),
                trusted_only: Some(true),
            });
        }
        let mut query = AttributeQuery::new();
        query.room(CKA_CLASS, std::mem::size_of::<CK_ULONG>());
        query.room(CKA_EXTRACTABLE, 1);
        query.room(CKA_WRAP_WITH_TRUSTED, 1);
        let answer = self.stateless(&[object], "C_GetAttributeValue", |library, s, h| {
            library.get_attribute_value(s, h[0], Some(query.as_mut_slice()))
        });
        if let Err(e) = answer {
            if e.rv != CKR_ATTRIBUTE_TYPE_INVALID {
                return Err(e);
            }
        }
        let protection = Protection {
            known: false,
            class: query.ulong(0),
            extractable: query.bool(1),
            trusted_only: query.bool(2),
        };
        if protection.protected() {
            self.group.objects.mark_protected(object, false);
        }
        Ok(protection)
    }

    /// `C_WrapKey` may not take a key the application made non-extractable.
    pub fn refuse_if_protected(&self, key: CK_OBJECT_HANDLE) -> Result<()> {
        match self.protected(key) {
            Ok(true) => Err(Error::new(CKR_KEY_UNEXTRACTABLE)),
            Ok(false) => Ok(()),
            Err(e) if e.rv == CKR_OBJECT_HANDLE_INVALID => Err(Error::new(CKR_KEY_HANDLE_INVALID)),
            Err(e) => Err(e),
        }
    }

    /// The application's view of a key's `CKA_EXTRACTABLE` or
    /// `CKA_NEVER_EXTRACTABLE`; `None` where the object has no such
    /// attribute.
    fn extractability_view(
        &self,
        object: CK_OBJECT_HANDLE,
        attribute: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<bool>> {
        if self.protected(object)? {
            return Ok(Some(match attribute {
                CKA_EXTRACTABLE => false,
                _ => self
                    .group
                    .objects
                    .get(object)
                    .is_some_and(|o| o.never_extractable),
            }));
        }
        match self.read_bool(object, attribute) {
            Ok(value) => Ok(Some(value)),
            Err(e) if matches!(e.rv, CKR_ATTRIBUTE_TYPE_INVALID | CKR_ATTRIBUTE_SENSITIVE) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads attributes from one member; a key the application made
    /// non-extractable reads as such on every member, and never reveals
    /// its key material.
    pub fn get_attribute_value(
        &self,
        object: CK_OBJECT_HANDLE,
        request: &mut AttributeRequest,
    ) -> Result<()> {
        let emulated = |t: CK_ATTRIBUTE_TYPE| EMULATED.contains(&t);
        let material = |t: CK_ATTRIBUTE_TYPE| KEY_MATERIAL.contains(&t);
        let protected = if request.kinds().any(|t| emulated(t) || material(t)) {
            self.protected(object)?
        } else {
            false
        };
        if !protected && self.group.objects.has_fingerprint(object) {
            return self.stateless(&[object], "C_GetAttributeValue", |l, s, h| {
                l.get_attribute_value(s, h[0], request.as_mut_slice())
            });
        }
        if !protected {
            // Found but not yet identified (see `IDENTIFIED_AT_ONCE`): the
            // same member call identifies it.
            let mut learned = None;
            let answer = self.stateless(&[object], "C_GetAttributeValue", |l, s, h| {
                let (rv, print) = identity::read_along(l, s, h[0], request);
                learned = print;
                rv
            });
            if let Some(print) = learned {
                self.group.objects.set_fingerprint(object, print);
            }
            return answer;
        }
        // The members are asked only what they may answer: key material is
        // withheld before it could reach the application's buffers.
        let mut asked = AttributeQuery::new();
        asked.asked(request, |t| !material(t) && !emulated(t));
        let mut answer = Ok(());
        if !asked.is_empty() {
            answer = self.stateless(&[object], "C_GetAttributeValue", |l, s, h| {
                l.get_attribute_value(s, h[0], Some(asked.as_mut_slice()))
            });
            if let Err(e) = &answer {
                if !matches!(
                    e.rv,
                    CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID | CKR_BUFFER_TOO_SMALL
                ) {
                    return answer;
                }
            }
        }
        let never = self
            .group
            .objects
            .get(object)
            .is_some_and(|o| o.never_extractable);
        let answers: Vec<CK_ULONG> = (0..asked.len()).map(|j| asked.answered(j)).collect();
        let mut answers = answers.into_iter();
        let mut withheld = false;
        let kinds: Vec<CK_ATTRIBUTE_TYPE> = request.kinds().collect();
        for (i, t) in kinds.into_iter().enumerate() {
            if material(t) {
                request.set_len(i, CK_UNAVAILABLE_INFORMATION);
                withheld = true;
            } else if emulated(t) {
                let value = if t == CKA_EXTRACTABLE {
                    CK_FALSE
                } else {
                    CK_BBOOL::from(never)
                };
                if let Err(e) = request.answer(i, &[value]) {
                    answer = Err(e);
                }
            } else if let Some(len) = answers.next() {
                request.set_len(i, len);
            }
        }
        if withheld {
            return Err(Error::new(CKR_ATTRIBUTE_SENSITIVE));
        }
        answer
    }

    /// Looks the object up on every member that is up, so that changes
    /// reach every copy (each with the era its handle was looked up in).
    /// Also returns the members that were not up, those that hold no copy
    /// while one is on its way to them, and those with any change of the
    /// object still on their way (queued, kept, or being made by the
    /// replay of kept changes, [`crate::group::Group::change_on_its_way`]): they get the
    /// change behind it -- made at once on such a member's copy, it was
    /// undone by the earlier change (simulation seed 808). Where only such
    /// members hold a copy, those copies answer too (the change is made
    /// at once there, and again behind the earlier one). With no member
    /// up, `CKR_DEVICE_ERROR` (as any call when none serves): the object
    /// is no less the application's.
    #[allow(clippy::type_complexity)]
    fn resolve_everywhere(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Result<(Vec<(usize, CK_OBJECT_HANDLE, Era)>, Vec<usize>)> {
        if self.group.objects.get(object).is_none() {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        let mut copies = Vec::new();
        let mut missed = Vec::new();
        let mut behind = Vec::new();
        for member in &self.group.members {
            let era = self.group.objects.era(member.position);
            if !member.is_up() {
                missed.push(member.position);
            } else if self.group.change_on_its_way(member.position, object) {
                behind.push(member.position);
            } else if let Some(h) = self.resolve(object, member.position)? {
                copies.push((member.position, h, era));
            } else if !member.is_up() || self.group.on_its_way(member.position, object) {
                // It failed while its copy was looked up: it gets the
                // change when it returns, as if it had been down before.
                missed.push(member.position);
            }
        }
        if copies.is_empty() {
            for position in &behind {
                let era = self.group.objects.era(*position);
                if let Some(h) = self.resolve(object, *position)? {
                    copies.push((*position, h, era));
                }
            }
        }
        missed.extend(behind);
        if copies.is_empty() {
            let none_up = self.group.up_members().next().is_none();
            return Err(Error::new(if none_up {
                CKR_DEVICE_ERROR
            } else {
                CKR_OBJECT_HANDLE_INVALID
            }));
        }
        Ok((copies, missed))
    }

    /// Applies a change to every copy of an object. The first copy's answer
    /// decides: a request error there changes nothing anywhere. Members
    /// that are down get the change when they return
    /// ([`Self::give_missed`]).
    fn change_everywhere(&self, object: CK_OBJECT_HANDLE, change: &Change) -> Result<()> {
        let _writing = self.wait_before_writing(&mut Waits::default());
        let _write = self.group.enter_write();
        let function = match change {
            Change::Destroy => "C_DestroyObject",
            Change::Set(_) => "C_SetAttributeValue",
        };
        let call = |library: &dyn MemberBackend, s, h| match change {
            Change::Destroy => library.destroy_object(s, h),
            Change::Set(template) => library.set_attribute_value(s, h, template.as_slice()),
        };
        // Whether a member failed under the change: it may have carried
        // it out before its answer was lost.
        let mut faulted = false;
        let mut earlier_print = None;
        let (before, missed) = loop {
            let (copies, mut missed) = match self.resolve_everywhere(object) {
                Ok(found) => found,
                // Every copy on a serving member failed under the change
                // and the members serving now hold none (their copy was
                // still to come, or none serves): as when every member
                // failed, not "no such object", which would leave the
                // change half made (seed 23075).
                Err(e)
                    if faulted && matches!(e.rv, CKR_OBJECT_HANDLE_INVALID | CKR_DEVICE_ERROR) =>
                {
                    self.finish_later(object, change, earlier_print, &self.owed_changes(object));
                    return Err(Error::new(CKR_DEVICE_ERROR));
                }
                // A destroy of the group's object that no serving member
                // holds yet -- its copies are on members out now, and on
                // their way to every member serving, waiting for a source:
                // the object is the application's, and nothing answered
                // for it, so nothing is in doubt. Each member gets the
                // removal, behind what is on its way. Answered "no such
                // object", the application was told its object is not one
                // (simulation seed 30967754). Not while the application
                // is logged out: a private object is none to it then, and
                // a serving member that shows no copy may hold one unseen.
                Err(e)
                    if e.rv == CKR_OBJECT_HANDLE_INVALID
                        && matches!(change, Change::Destroy)
                        && self.group.objects.get(object).is_some()
                        && self.group.holds_login()
                        && (self.group.up_members())
                            .all(|m| self.group.change_on_its_way(m.position, object)) =>
                {
                    let missed = self.owed_changes(object);
                    let before = earlier_print.or_else(|| {
                        (self.group.objects.get(object))
                            .and_then(|o| o.fingerprint)
                            .map(|p| (*p).clone())
                    });
                    if let Some(print) = &before {
                        self.group.record_deletion(print);
                    }
                    self.give_missed(object, change, before, &missed);
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            // From the first copy that answers: a member failing here must
            // not leave the members that missed the change without it.
            // Not from a copy still waiting for an earlier change.
            let before = (copies.iter())
                .filter(|(p, _, _)| !missed.contains(p))
                .find_map(|(_, handle, era)| self.fingerprint_from(*era, *handle))
                .or(earlier_print.take());
            let mut decided = false;
            for (position, mut handle, mut era) in copies {
                let mut answer =
                    self.attempt_keyed(position, era, function, &mut |l, s| call(l, s, handle));
                // Its copy not under that handle after all: looked up
                // afresh and asked again. (A member whose handles went
                // stale unseen answers as faulted, its handles forgotten,
                // `Group::handles_went_stale`: the loop's next look-up
                // finds its copy afresh, or, where another member decided,
                // it is given the change as one that missed it -- at once
                // while it serves, `give_missed`.)
                if matches!(answer, Attempt::Answered(CKR_OBJECT_HANDLE_INVALID)) {
                    match self.copy_named_afresh(object, era, handle)? {
                        Some((fresh, fresh_era)) => {
                            (handle, era) = (fresh, fresh_era);
                            answer = self.attempt_keyed(position, era, function, &mut |l, s| {
                                call(l, s, handle)
                            });
                        }
                        // It failed while looked up: it gets the change
                        // when it returns.
                        None if !self.group.members[position].is_up() => {
                            answer = Attempt::Faulted;
                        }
                        // No copy there after all: the others decide.
                        None => continue,
                    }
                }
                if matches!(answer, Attempt::Answered(CKR_OK)) {
                    // Gone, or its fingerprint may have changed.
                    self.group.forget_object(position, handle);
                }
                match answer {
                    Attempt::Faulted => {
                        faulted = true;
                        if !missed.contains(&position) {
                            missed.push(position);
                        }
                    }
                    Attempt::Answered(rv) if !decided => {
                        check(rv)?;
                        decided = true;
                    }
                    Attempt::Answered(_) => {}
                }
            }
            if decided {
                break (before, missed);
            }
            earlier_print = before.clone();
            // Every copy asked failed: a member that came up meanwhile
            // decides, as another member takes any other call.
            if self.group.up_members().next().is_none() {
                self.finish_later(object, change, before, &missed);
                return Err(Error::new(CKR_DEVICE_ERROR));
            }
        };
        if matches!(change, Change::Destroy) && !missed.is_empty() {
            if let Some(print) = &before {
                self.group.record_deletion(print);
            }
        }
        self.give_missed(object, change, before, &missed);
        Ok(())
    }

    /// The members a change of `object` must reach later: those out now,
    /// and those with a change of it still on its way
    /// ([`crate::group::Group::change_on_its_way`]).
    fn owed_changes(&self, object: CK_OBJECT_HANDLE) -> Vec<usize> {
        (self.group.members.iter())
            .filter(|m| !m.is_up() || self.group.change_on_its_way(m.position, object))
            .map(|m| m.position)
            .collect()
    }

    /// The copy of `object` on a member whose handle for it (`handle`, of
    /// `era`) named nothing there, looked up afresh. Where its token
    /// numbered its objects anew unseen, the attempt's verdict forgot all
    /// the member's handles (`Group::handles_went_stale`); otherwise the
    /// copy is not under that handle after all, and that one is forgotten.
    /// Taken at its word, a destroy left the copy under its new handle, an
    /// object the application destroyed (simulation seed 19020903).
    /// `None` where the member holds no copy.
    fn copy_named_afresh(
        &self,
        object: CK_OBJECT_HANDLE,
        era: Era,
        handle: CK_OBJECT_HANDLE,
    ) -> Result<Option<(CK_OBJECT_HANDLE, Era)>> {
        let position = era.member();
        if !self.group.objects.moved_on(era) {
            self.group.objects.forget_copy(position, handle);
        }
        let fresh_era = self.group.objects.era(position);
        Ok(self.resolve(object, position)?.map(|h| (h, fresh_era)))
    }

    /// A change every member holding a copy failed in: one may have
    /// carried it out before its answer was lost, so the members would
    /// disagree. The change is finished on each when it returns (the
    /// application, told `CKR_DEVICE_ERROR`, cannot count on it either
    /// way), and a destroyed object leaves the slot now.
    fn finish_later(
        &self,
        object: CK_OBJECT_HANDLE,
        change: &Change,
        before: Option<identity::Fingerprint>,
        missed: &[usize],
    ) {
        self.give_missed(object, change, before, missed);
        if matches!(change, Change::Destroy) {
            self.group.forget_destroyed(object);
        }
    }

    /// Gives the members in `missed` a change they missed (queued, kept
    /// or made now, [`Self::deliver_or_queue`]): the removal of the
    /// object's copy there, or the change of its attributes on that copy
    /// ([`Pending::Set`]), the copy found by the object's fingerprint from
    /// before the change (`before`, else the one kept). A change of
    /// attributes changes the kept fingerprint too, first: it finds the
    /// object from now on (kept as it was, a member returning with its
    /// handles forgotten was given a second copy of an object whose
    /// `CKA_ID` had changed, simulation seed 3242).
    fn give_missed(
        &self,
        object: CK_OBJECT_HANDLE,
        change: &Change,
        before: Option<identity::Fingerprint>,
        missed: &[usize],
    ) {
        let kept = || {
            self.group
                .objects
                .get(object)
                .and_then(|o| o.fingerprint)
                .map(|p| (*p).clone())
        };
        let Some(before) = before.or_else(kept) else {
            return;
        };
        match change {
            Change::Destroy => {
                for position in missed {
                    let removal = Pending::Destroy {
                        print: before.clone(),
                        object: Some(object),
                    };
                    self.deliver_behind(*position, removal, Some(object));
                }
            }
            Change::Set(template) => {
                let lasting = lasting_changes(template);
                if lasting.is_empty() {
                    return;
                }
                let changes = std::sync::Arc::new(OwnedTemplate::copy(&lasting));
                let after = identity::changed(&before, changes.values());
                (self.group.objects).change_fingerprint(object, before.clone(), after);
                for position in missed {
                    let set = Pending::Set {
                        object,
                        before: before.clone(),
                        changes: std::sync::Arc::clone(&changes),
                    };
                    self.deliver_behind(*position, set, Some(object));
                }
            }
        }
    }

    fn fingerprint_from(
        &self,
        era: Era,
        handle: CK_OBJECT_HANDLE,
    ) -> Option<identity::Fingerprint> {
        let print = self
            .on_member(era.member(), |s| {
                identity::fingerprint(&*s.library, s.handle, handle)
            })
            .ok()??;
        // Read after the member's handles were forgotten, `handle` named
        // whatever holds its number now.
        (!self.group.objects.moved_on(era)).then_some(print)
    }

    pub fn destroy_object(&self, object: CK_OBJECT_HANDLE) -> Result<()> {
        self.change_everywhere(object, &Change::Destroy)?;
        self.group.forget_destroyed(object);
        Ok(())
    }

    pub fn set_attribute_value(&self, object: CK_OBJECT_HANDLE, template: &Template) -> Result<()> {
        let (changes, protects) = self.extractability_change(object, template, Asked::Change)?;
        if changes.count() > 0 {
            self.change_everywhere(object, &Change::Set(&changes))?;
        }
        if protects {
            self.group.objects.mark_protected(object, false);
        }
        Ok(())
    }

    /// Starts a search on one member: chosen by expected completion, as an
    /// operation is, where every serving member answers it alike
    /// ([`Self::answered_alike`]); otherwise on the primary.
    pub fn find_init(&self, template: &Template) -> Result<()> {
        // Known before the search starts (a member session runs one search
        // at a time), so that the search can leave it out.
        for member in self.group.up_members() {
            self.group.domain_handle(member.position);
        }
        let asked = template.without(&EMULATED);
        let filter: crate::virtual_session::SearchFilter = EMULATED
            .iter()
            .filter_map(|t| template.bool(*t).map(|v| (*t, v)))
            .collect();
        let searched = if filter.is_empty() {
            template.reborrow()
        } else {
            asked
        };
        let start =
            |library: &dyn MemberBackend, s, _| library.find_objects_init(s, searched.as_slice());
        let kept = OwnedTemplate::copy(&searched);
        // A spare instance's session sees token objects only: the search
        // runs there when it asks for nothing else or the group holds no
        // session object.
        let on_spare =
            template.bool(CKA_TOKEN) == Some(true) || !self.group.objects.has_session_objects();
        // Decided again when a member fails under a try: the search may
        // then have to go to a member serving first, and wait there for
        // the kept objects it may find.
        let preference = || {
            if self.answered_alike(&searched) {
                Preference::Spread(OpKind::Find as usize)
            } else {
                self.wait_for_kept_matches(&searched)
                    .map_or(Preference::Complete, Preference::WaitedOn)
            }
        };
        let logins_again = self.group.logins_again();
        self.init_where(
            OpKind::Find,
            preference,
            None,
            None,
            "C_FindObjectsInit",
            on_spare,
            start,
        )?;
        self.keep_search(kept, filter, logins_again);
        Ok(())
    }

    /// Whether a search for `searched` (what the members are asked) finds
    /// the same objects on every serving member: it names only attributes
    /// copies hold alike ([`ALIKE_ON_COPIES`]), and no serving member
    /// serves without some object of the group (changes queued or kept
    /// for it, keys that cannot reach it). What such a search finds off
    /// the primary is named as the primary names it
    /// ([`Self::found_off_home`]).
    fn answered_alike(&self, searched: &Template) -> bool {
        searched.iter().all(|a| ALIKE_ON_COPIES.contains(&a.kind()))
            && self
                .group
                .serving_members()
                .iter()
                .all(|m| !self.group.lacks_objects(m.position))
    }

    /// The virtual handle of the object a search on `member`, other than
    /// the primary `home`, found as `handle`: the one the group knows it by
    /// there, else the one a search on `home` names it by -- `home`'s copy
    /// found by fingerprint (from `member`'s index, else read there) --
    /// which is then known on `member` too. So the search answers as one on
    /// `home` would, whichever member ran it. `None` where a search on
    /// `home` would not show it: the domain key, an object `home` does not
    /// hold, one gone meanwhile. Where `home` cannot tell (its look-up
    /// fails, or the fingerprint matches more than one object there: a
    /// collision, "Identity across members"), `member`'s copy names it, as
    /// on a search moved by a failure. `Err` where `member` failed while
    /// its copy was read ([`Self::unread`]).
    fn found_off_home(
        &self,
        era: Era,
        home: usize,
        handle: CK_OBJECT_HANDLE,
        identify: bool,
    ) -> std::result::Result<Option<CK_OBJECT_HANDLE>, MemberFailed> {
        let member = era.member();
        let objects = &self.group.objects;
        if let Some(object) = objects.known_in(era, handle) {
            return Ok(Some(object));
        }
        let read = |full: bool| {
            self.on_member(member, |s| {
                if full {
                    identity::fingerprint(&*s.library, s.handle, handle)
                } else {
                    identity::light_fingerprint(&*s.library, s.handle, handle)
                }
            })
            .ok()
            .flatten()
        };
        let mut print = match self.group.indexed_fingerprint(member, handle) {
            Some(print) => (*print).clone(),
            None => match read(false) {
                Some(print) => print,
                None => return self.unread(era, handle).map(|()| None),
            },
        };
        if !self.names_an_object(era, &print)? {
            return Ok(None);
        }
        let home_era = objects.era(home);
        let mut found = self.group.look_up(home, &print);
        if found.as_ref().is_ok_and(|f| f.len() > 1) && !identity::has_check_value(&print) {
            print = match read(true) {
                Some(print) => print,
                None => return self.unread(era, handle).map(|()| None),
            };
            if objects.moved_on(era) {
                return Err(MemberFailed);
            }
            found = self.group.look_up(home, &print);
        }
        let there = match found.as_deref() {
            Ok([]) => return Ok(None),
            Ok([one]) => *one,
            _ => return self.virtual_handle_of(era, handle, identify),
        };
        let object = match objects.known_in(home_era, there) {
            Some(object) => object,
            None if self.renumbered_unseen(home_era, &print) => {
                return self.virtual_handle_of(era, handle, identify)
            }
            None => objects
                .from_member_identified(home_era, there, print)
                .ok_or(MemberFailed)?,
        };
        if objects.presence(object, member) == Some(Presence::Unknown) {
            objects.set_presence(object, era, Presence::Present(handle));
        }
        Ok(Some(object))
    }

    /// Why the fingerprint of the object a search found on `member` as
    /// `handle` could not be read: `Err` where the member failed (the read
    /// is asked again through [`Self::attempt`], which takes a member that
    /// faults out of service) -- the search then moves and finds the
    /// object elsewhere -- `Ok` where the object is gone or its attributes
    /// cannot be read, so that no search shows it.
    fn unread(&self, era: Era, handle: CK_OBJECT_HANDLE) -> std::result::Result<(), MemberFailed> {
        let member = era.member();
        if self.group.objects.moved_on(era) {
            return Err(MemberFailed);
        }
        let mut class: CK_OBJECT_CLASS = 0;
        let mut read = |l: &dyn MemberBackend, s| {
            let mut attribute = [CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: &mut class as *mut CK_OBJECT_CLASS as *mut _,
                ulValueLen: std::mem::size_of::<CK_OBJECT_CLASS>() as CK_ULONG,
            }];
            l.get_attribute_value(s, handle, Some(&mut attribute))
        };
        match self.attempt(member, "C_GetAttributeValue", &mut read) {
            Attempt::Faulted => Err(MemberFailed),
            Attempt::Answered(_) => Ok(()),
        }
    }

    /// Whether `print`, read by a member handle learned in `era`, names an
    /// object a search shows (not the domain key); `Err` once the member's
    /// handles were forgotten since: the handle named whatever holds its
    /// number now.
    pub(crate) fn names_an_object(
        &self,
        era: Era,
        print: &identity::Fingerprint,
    ) -> std::result::Result<bool, MemberFailed> {
        if self.group.objects.moved_on(era) {
            return Err(MemberFailed);
        }
        // On a member with objects in doubt, one the group does not know
        // may be a late copy under a former fingerprint, or one of an
        // object in doubt there: not shown until the doubt is settled
        // (`Group::carries_doubt`). Shown, a late copy of an import the
        // member's replay was cut off making was named a second object, a
        // phantom that outlived the object's destroy (simulation seed
        // 31067919).
        let member = era.member();
        if self.group.carries_doubt(member)
            && (!self.group.objects.any_matched_by(print) || self.doubted_print(member, print))
        {
            return Ok(false);
        }
        // One no live object of the group matches, that a removal kept for
        // the member finds (or would, once the changes kept ahead of it
        // are made): the copy of an object the application destroyed,
        // gone once the member is given the removal -- kept while the
        // application is logged out, a destroyed public object showed
        // through searches meanwhile (simulation seed 22522,
        // `SIM_BROKEN_LOGINS=1`). Kept removals are asked first: the
        // table is read whole only where one finds the object.
        if self.group.kept_removal_finds(member, print) && !self.group.objects.any_matched_by(print)
        {
            return Ok(false);
        }
        Ok(!self.group.is_domain_print(print))
    }

    /// Whether `print` is that of an object in doubt on member `position`.
    fn doubted_print(&self, position: usize, print: &identity::Fingerprint) -> bool {
        (self.group.doubted(position).iter())
            .filter_map(|object| self.fingerprint_of(*object))
            .any(|doubted| identity::matches(&doubted, print))
    }

    /// Continues the search and turns member handles into virtual ones,
    /// leaving out the domain key.
    pub fn find(&self, found: &mut OutArray<CK_OBJECT_HANDLE>, count: &mut CK_ULONG) -> Result<()> {
        // What is left out (the domain key, objects returned before the
        // search moved, objects the filter rejects) is made up for from the
        // member, so the batch is as full as the member would have made it:
        // many clients (the `cryptoki` crate among them) take a short batch
        // for the end of the search.
        let filter = self.search_filter();
        // Which member answered the last fetch, in the era of its handles
        // the fetch began in: `keep` reads its handles.
        let member = std::cell::Cell::new(None);
        let mut fetch = |at: &mut [CK_OBJECT_HANDLE]| {
            let mut returned: CK_ULONG = 0;
            self.step(
                OpKind::Find,
                Step::Update,
                Input::None,
                "C_FindObjects",
                |l, s| {
                    member.set(self.bound_member().map(|m| self.group.objects.era(m)));
                    l.find_objects(s, Some(&mut *at), &mut returned)
                },
            )?;
            Ok(returned as usize)
        };
        // Whether the search moved from a lane in the last batch.
        let moved = std::cell::Cell::new(false);
        let mut keep = |handles: &mut [CK_OBJECT_HANDLE]| {
            let era = member
                .get()
                .ok_or(Error::new(CKR_OPERATION_NOT_INITIALIZED))?;
            let member = era.member();
            // A batch that takes the search past the few identified at
            // once is an enumeration's: none of it is identified before
            // the application reads it.
            let small = self.returned_so_far() + handles.len() <= IDENTIFIED_AT_ONCE;
            let mut show =
                |object| Ok(self.first_time_found(object) && self.shows(object, &filter)?);
            if let Some((shown, settled)) =
                self.keep_found_on_lane(member, handles, !small, &mut show)?
            {
                if settled {
                    moved.set(true);
                }
                return Ok(shown);
            }
            let epoch = self.group.members[member].epoch();
            // Where the member's domain keys are known by handle, they are
            // left out by handle alone -- unless objects of the group may be
            // there under handles not recorded yet, or what it holds is
            // unsettled (`Group::holds_unsettled`): each is identified. A
            // copy of an object destroyed while the member was out, its
            // removal kept for the next login, named unidentified, showed
            // as an object of its own (simulation seed 32654815).
            let domain_known = self.group.domain.found(member, epoch).is_some();
            let identify = !domain_known
                || small
                || self.group.holds_unrecorded(member)
                || self.group.holds_unsettled(member);
            let home = self.group.search_home().filter(|home| *home != member);
            let mut shown = 0;
            for i in 0..handles.len() {
                if self.group.domain.is_domain_key(member, epoch, handles[i]) {
                    continue;
                }
                let object = match home {
                    Some(home) => self.found_off_home(era, home, handles[i], identify),
                    None => self.virtual_handle_of(era, handles[i], identify),
                };
                let Ok(object) = object else {
                    // The member failed while naming what it found: the
                    // search moves (`Self::unread` took the member out),
                    // and finds there what is not shown yet. Its handles
                    // forgotten while it serves on, the search starts
                    // again there or elsewhere.
                    if self.group.members[member].is_up() {
                        self.restart_search_from(member);
                    } else {
                        self.move_search_from(member);
                    }
                    moved.set(true);
                    break;
                };
                let Some(object) = object else {
                    continue;
                };
                if !self.first_time_found(object) || !self.shows(object, &filter)? {
                    continue;
                }
                handles[shown] = object;
                shown += 1;
            }
            Ok(shown)
        };
        let items = found.items();
        let mut kept = crate::object::fill_batch(items, &mut fetch, &mut keep)?;
        // The members whose login a miss had checked, once each (a group
        // has at most `MAX_GROUP_MEMBERS`, 32).
        let mut login_checked: u64 = 0;
        loop {
            // A search that left its lane mid-batch goes on where it moved:
            // the batch may have ended short only because of the move.
            while moved.replace(false) && kept < items.len() {
                kept += crate::object::fill_batch(&mut items[kept..], &mut fetch, &mut keep)?;
            }
            // Ended where it missed what its member holds: started again
            // if the member had lost its login.
            let unchecked = member
                .get()
                .filter(|e| login_checked & (1 << e.member()) == 0);
            if kept == items.len() || !self.search_missed_for_login(unchecked) {
                break;
            }
            login_checked |= unchecked.map_or(0, |e| 1 << e.member());
            kept += crate::object::fill_batch(&mut items[kept..], &mut fetch, &mut keep)?;
        }
        *count = kept as CK_ULONG;
        Ok(())
    }

    /// The virtual handle of an object a search found on `member`, made on
    /// first sight. With `identify`, its fingerprint is read now, while the
    /// member that found the object answers (if it fails before the object
    /// is used, the other members find it by that fingerprint), and shows
    /// it is not the domain key. Without, the fingerprint is read with the
    /// application's first read of the object, or when another member
    /// needs it. `None` for the domain key, which the application never
    /// sees, or an object that went away meanwhile; `Err` where `member`
    /// failed while it was read ([`Self::unread`]).
    fn virtual_handle_of(
        &self,
        era: Era,
        handle: CK_OBJECT_HANDLE,
        identify: bool,
    ) -> std::result::Result<Option<CK_OBJECT_HANDLE>, MemberFailed> {
        let member = era.member();
        let objects = &self.group.objects;
        if let Some(object) = objects.known_in(era, handle) {
            return Ok(Some(object));
        }
        let print = match self.group.indexed_fingerprint(member, handle) {
            Some(print) => (*print).clone(),
            None if !identify => {
                return objects
                    .from_member(era, handle)
                    .map(Some)
                    .ok_or(MemberFailed)
            }
            None => match self
                .on_member(member, |s| {
                    identity::light_fingerprint(&*s.library, s.handle, handle)
                })
                .ok()
                .flatten()
            {
                Some(print) => print,
                None => return self.unread(era, handle).map(|()| None),
            },
        };
        if !self.names_an_object(era, &print)? {
            return Ok(None);
        }
        if self.renumbered_unseen(era, &print) {
            return Err(MemberFailed);
        }
        objects
            .from_member_identified(era, handle, print)
            .map(Some)
            .ok_or(MemberFailed)
    }

    /// For a handle the group does not know on the member, whose object has
    /// fingerprint `print`: whether the member's handles went stale unseen
    /// -- an object of the group it matches is recorded there under a
    /// handle that no longer names such an object -- and are forgotten, to
    /// be looked up afresh ([`crate::group::Group::handles_went_stale`]). A
    /// token that restarted numbers its objects anew, and a session opened
    /// since answers as if nothing happened: named at its word, an object
    /// found by a search was made a second object of the group
    /// (simulation seed 1208915, a member's token restarted and healed
    /// before any session of ours there was used). Only where a search
    /// finds an unknown object like a recorded one: one read per recorded
    /// like object, until one shows stale. A recorded handle that cannot
    /// be read counts as stale only while the group is logged in: logged
    /// out, a private object's handle cannot be read either (the light
    /// fingerprint names no `CKA_PRIVATE`, so a public object may be like
    /// a private one).
    pub(crate) fn renumbered_unseen(&self, era: Era, print: &identity::Fingerprint) -> bool {
        let member = era.member();
        let recorded = self.group.objects.recorded_matched_by(era, print);
        let logged_in = self.group.holds_login();
        let stale = recorded.iter().any(|(handle, kept)| {
            let now = self.on_member(member, |s| {
                identity::light_fingerprint(&*s.library, s.handle, *handle)
            });
            match now {
                Ok(Some(now)) => !identity::matches(kept, &now),
                Ok(None) => logged_in,
                Err(_) => false,
            }
        });
        stale && self.group.handles_went_stale(member, era)
    }

    /// Whether `object` has the values a search's filter wants, as the
    /// application sees them.
    fn shows(
        &self,
        object: CK_OBJECT_HANDLE,
        filter: &[(CK_ATTRIBUTE_TYPE, bool)],
    ) -> Result<bool> {
        for (attribute, wanted) in filter {
            if self.extractability_view(object, *attribute)? != Some(*wanted) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs a call that makes new objects on one member where the keys it
    /// needs exist, replicates them to every other member, and returns
    /// their virtual handles. The member is the one expected to finish
    /// first in the object-making lane, as for an operation, where the
    /// members are alike as makers ([`Self::makers_alike`]); otherwise the
    /// primary (the next member in configured order while it is
    /// degraded). If the member dies before its objects are safe
    /// elsewhere, the call runs again on another member and the orphans
    /// are removed when it returns.
    #[allow(clippy::too_many_arguments)]
    pub fn make_on_one(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        keys: &[CK_OBJECT_HANDLE],
        owners: &[Option<bool>],
        prints: &[Option<identity::Fingerprint>],
        function: &str,
        mut make: impl FnMut(
            &dyn MemberBackend,
            CK_SESSION_HANDLE,
            &CK_MECHANISM,
            &[CK_OBJECT_HANDLE],
            &mut [CK_OBJECT_HANDLE],
        ) -> CK_RV,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        // Members an attempt lost its answer on, orphans queued for them:
        // kept across tries, as the objects a later try makes come after
        // those orphans too (forgotten with the try that left them, the
        // orphan pair's private key passed there for the group's, another
        // key under its name: simulation seed 727033).
        let mut left_orphans_on = Vec::new();
        self.make_waiting(|| {
            self.try_make_on_one(
                session,
                mechanism,
                keys,
                owners,
                prints,
                function,
                &mut make,
                &mut left_orphans_on,
            )
        })
    }

    /// One try of [`Self::make_on_one`]: `None` when the members it ran
    /// on failed and none serves any more (what they may have made
    /// queued for removal). `left_orphans_on`: the members this call's
    /// attempts lost an answer on, in this try or an earlier one.
    #[allow(clippy::too_many_arguments)]
    fn try_make_on_one(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &Mechanism,
        keys: &[CK_OBJECT_HANDLE],
        owners: &[Option<bool>],
        prints: &[Option<identity::Fingerprint>],
        function: &str,
        make: &mut impl FnMut(
            &dyn MemberBackend,
            CK_SESSION_HANDLE,
            &CK_MECHANISM,
            &[CK_OBJECT_HANDLE],
            &mut [CK_OBJECT_HANDLE],
        ) -> CK_RV,
        left_orphans_on: &mut Vec<usize>,
    ) -> Result<Option<Vec<CK_OBJECT_HANDLE>>> {
        let _making = self.group.making_objects();
        let parameter_keys = crate::mechanism::parameter_handles(mechanism)?;
        let all_keys: Vec<CK_OBJECT_HANDLE> = keys.iter().chain(&parameter_keys).copied().collect();
        let _write = self.group.enter_write();
        let mut refused = Positions::new();
        loop {
            let preference = if self.makers_alike() {
                Preference::LeastBusy(crate::group::MAKING_LANE)
            } else {
                Preference::Primary
            };
            let chosen = if refused.is_empty() {
                self.choose(&all_keys, preference)
            } else {
                self.choose_besides(&all_keys, preference, &refused)
            };
            let (position, handles, era) = match chosen {
                Ok(chosen) => chosen,
                Err(_) if self.group.up_members().next().is_none() => return Ok(None),
                Err(e) => return Err(e),
            };
            let (direct, in_parameter) = handles.split_at(keys.len());
            let member_mechanism = crate::mechanism::for_member(mechanism, in_parameter)?;
            let mut made = vec![CK_INVALID_HANDLE; owners.len()];
            let answer = self.attempt_keyed(position, era, function, &mut |l, s| {
                make(l, s, member_mechanism.as_raw(), direct, &mut made)
            });
            let objects = match answer {
                Attempt::Faulted => None,
                // Nothing made: the member's refusal, while another may
                // take the mechanism (`choose_besides`).
                Attempt::Answered(CKR_MECHANISM_INVALID) => {
                    refused.push(position);
                    continue;
                }
                Attempt::Answered(rv) => {
                    check(rv)?;
                    self.record_made(era, &made, owners, session)
                }
            };
            let Some(objects) = objects else {
                // It may have made them before its answer was lost, or
                // before its handles were forgotten (they may name other
                // objects now).
                for print in prints.iter().flatten() {
                    self.deliver_or_queue(position, Pending::Orphans(print.clone()));
                }
                left_orphans_on.push(position);
                continue;
            };
            // Before their fingerprints are kept: an orphans' removal that
            // recovery replays meanwhile matches nothing of them yet.
            for position in left_orphans_on.iter() {
                self.group.note_made_after_orphans(*position, &objects);
            }
            let _unfinished: Vec<_> = objects
                .iter()
                .map(|o| self.group.making_object(*o))
                .collect();
            for (h, object) in made.iter().zip(&objects) {
                if let Some(print) = self.fingerprint_from(era, *h) {
                    self.group.objects.set_fingerprint(*object, print);
                }
            }
            if self.group.members.len() == 1 {
                return Ok(Some(objects));
            }
            let mut failure = None;
            for object in &objects {
                if let Err(e) = self.replicate(*object, position) {
                    failure = Some(e);
                    break;
                }
            }
            if failure.is_none() {
                self.probe_wrapping(position);
                failure = self
                    .refuse_unreceivable(&objects, &[position], function)
                    .err();
            }
            if failure.is_none() {
                failure = self.check_replicas(&objects, function).err();
            }
            let Some(error) = failure else {
                return Ok(Some(objects));
            };
            // Copies on members that failed meanwhile, the one that made
            // them included, are removed when those return.
            for object in &objects {
                if let Some(entry) = self.group.objects.get(*object) {
                    let copies = self.group.objects.copies(*object);
                    let print = entry.fingerprint.map(|p| (*p).clone());
                    // A member that failed while given a copy may hold it
                    // (its answer lost); a print that identifies one object
                    // finds it, as an import's template print does. Not
                    // only a key's check value: a key pair's public key
                    // copied to a member that then failed was left there
                    // (simulation seed 6128, with key pairs).
                    let faulted: Vec<usize> = match &print {
                        Some(p) if identity::identifies_one(p) => self
                            .group
                            .members
                            .iter()
                            .filter(|m| {
                                !m.is_up() && copies.iter().all(|(c, _)| c.member() != m.position)
                            })
                            .map(|m| m.position)
                            .collect(),
                        _ => Vec::new(),
                    };
                    self.abandon(*object, print, &copies, &faulted);
                }
            }
            if self.group.members[position].is_up() {
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_extractable_becomes_wrap_with_trusted() {
        let no = [CK_FALSE];
        let given: Template = [(CKA_EXTRACTABLE, &no[..])].into_iter().collect();
        let member = MemberTemplate::for_new_key(&given);
        assert!(member.protects());
        assert_eq!(member.template().count(), 2);
        assert_eq!(member.template().bool(CKA_EXTRACTABLE), Some(true));
        assert_eq!(member.template().bool(CKA_WRAP_WITH_TRUSTED), Some(true));
        let empty = Template::absent();
        let none = MemberTemplate::for_new_key(&empty);
        assert!(
            none.protects(),
            "absent means non-extractable for a new key"
        );
        assert_eq!(none.template().bool(CKA_EXTRACTABLE), Some(true));
        let change = MemberTemplate::for_change(&empty);
        assert!(!change.protects(), "absent changes nothing");
        assert_eq!(no, [CK_FALSE], "the application's template is untouched");
    }

    #[test]
    fn a_one_way_attribute_set_to_its_loose_value_is_no_lasting_change() {
        let (no, yes, id) = ([CK_FALSE], [CK_TRUE], *b"id");
        let given: Template = [
            (CKA_SENSITIVE, &no[..]),
            (CKA_EXTRACTABLE, &yes[..]),
            (CKA_WRAP_WITH_TRUSTED, &no[..]),
            (CKA_COPYABLE, &yes[..]),
            (CKA_ID, &id[..]),
            (CKA_SENSITIVE, &yes[..]),
            (CKA_COPYABLE, &no[..]),
        ]
        .into_iter()
        .collect();
        let lasting: Vec<_> = (lasting_changes(&given).values())
            .map(|(kind, value)| (kind, value.to_vec()))
            .collect();
        assert_eq!(
            lasting,
            [
                (CKA_ID, id.to_vec()),
                (CKA_SENSITIVE, yes.to_vec()),
                (CKA_COPYABLE, no.to_vec())
            ]
        );
    }

    #[test]
    fn a_nested_unwrap_template_is_rewritten_too() {
        let (no, yes) = ([CK_FALSE], [CK_TRUE]);
        let inner: Template = [(CKA_EXTRACTABLE, &no[..])].into_iter().collect();
        let mut raw = TemplateBuilder::with_capacity(2);
        raw.push_value(CKA_EXTRACTABLE, &yes);
        raw.push_nested(CKA_UNWRAP_TEMPLATE, inner);
        let given = raw.build();
        let member = MemberTemplate::for_new_key(&given);
        assert!(!member.protects(), "the key itself is extractable");
        let outer = member.template().iter().nth(1).expect("two attributes");
        let nested = outer.nested().expect("a nested template");
        assert_eq!(nested.bool(CKA_EXTRACTABLE), Some(true));
        assert_eq!(nested.bool(CKA_WRAP_WITH_TRUSTED), Some(true));
    }
}
