//! Object calls on a virtual slot. An object the application creates from
//! its attributes is created on every member that is up; an object a
//! member computes (key generation, unwrapping, derivation, copying) is
//! made on one member and replicated to the others before the call
//! returns. Handles the application sees are virtual.

use crate::error::{check, Error, Result};
use crate::identity;
use crate::member::member_call;
use crate::member::MemberLibrary;
use crate::object::Presence;
use crate::replication::{OwnedTemplate, Pending};
use crate::virtual_session::{Attempt, Input, OpKind, Preference, Step, VirtualSession};
use cryptoki_sys::*;

/// The `CK_BBOOL` value of `attribute` in a template, if present.
///
/// # Safety
/// `template` must point to `count` readable attributes (or be null with 0).
pub unsafe fn template_bool(
    template: *const CK_ATTRIBUTE,
    count: CK_ULONG,
    attribute: CK_ATTRIBUTE_TYPE,
) -> Option<bool> {
    if template.is_null() {
        return None;
    }
    // SAFETY: the caller vouches for the template.
    let attributes = unsafe { std::slice::from_raw_parts(template, count as usize) };
    attributes
        .iter()
        .find(|a| a.type_ == attribute && !a.pValue.is_null() && a.ulValueLen as usize == 1)
        // SAFETY: a one-byte value was checked above.
        .map(|a| unsafe { *(a.pValue as *const CK_BBOOL) } != CK_FALSE)
}

static TRUE: CK_BBOOL = CK_TRUE;

/// A template as the members get it: where the application asks for a
/// non-extractable key, the members make it extractable under trusted keys
/// only, so the domain key can still carry it to the other members.
pub struct MemberTemplate {
    rewritten: Option<Vec<CK_ATTRIBUTE>>,
    original: (CK_ATTRIBUTE_PTR, CK_ULONG),
}

impl MemberTemplate {
    /// For a template that makes a new key, where a key the template does
    /// not call extractable is not (as on SoftHSM).
    ///
    /// # Safety
    /// `template` must point to `count` readable attributes (or be null).
    pub unsafe fn for_new_key(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { Self::rewrite(template, count, true) }
    }

    /// For a template that changes or copies a key: only an explicit
    /// `CKA_EXTRACTABLE = FALSE` makes it non-extractable.
    ///
    /// # Safety
    /// `template` must point to `count` readable attributes (or be null).
    pub unsafe fn for_change(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { Self::rewrite(template, count, false) }
    }

    unsafe fn rewrite(template: CK_ATTRIBUTE_PTR, count: CK_ULONG, absent_is_false: bool) -> Self {
        let original = (template, count);
        // SAFETY: forwarded from the caller.
        let extractable = unsafe { template_bool(template, count, CKA_EXTRACTABLE) };
        if extractable.unwrap_or(!absent_is_false) {
            return MemberTemplate {
                rewritten: None,
                original,
            };
        }
        let attributes = if template.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(template, count as usize) }
        };
        let truth = CK_ATTRIBUTE {
            type_: CKA_EXTRACTABLE,
            pValue: &TRUE as *const _ as *mut _,
            ulValueLen: 1,
        };
        let mut rewritten: Vec<CK_ATTRIBUTE> = attributes
            .iter()
            .filter(|a| a.type_ != CKA_WRAP_WITH_TRUSTED && a.type_ != CKA_EXTRACTABLE)
            .copied()
            .collect();
        rewritten.push(truth);
        rewritten.push(CK_ATTRIBUTE {
            type_: CKA_WRAP_WITH_TRUSTED,
            ..truth
        });
        MemberTemplate {
            rewritten: Some(rewritten),
            original,
        }
    }

    pub fn ptr(&mut self) -> CK_ATTRIBUTE_PTR {
        match &mut self.rewritten {
            Some(r) => r.as_mut_ptr(),
            None => self.original.0,
        }
    }

    pub fn count(&self) -> CK_ULONG {
        match &self.rewritten {
            Some(r) => r.len() as CK_ULONG,
            None => self.original.1,
        }
    }
}

/// Which session owns an object created with this `CKA_TOKEN` value.
fn owner_for(token: Option<bool>, session: CK_SESSION_HANDLE) -> Option<CK_SESSION_HANDLE> {
    if token.unwrap_or(false) {
        None
    } else {
        Some(session)
    }
}

impl VirtualSession {
    /// Creates an object on every member that is up; all or nothing for
    /// request errors. A member that faults is taken out and gets the
    /// object when it returns.
    ///
    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn create_everywhere(
        &self,
        owner: Option<CK_SESSION_HANDLE>,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<CK_OBJECT_HANDLE> {
        let create = |library: &MemberLibrary, session, handle: &mut CK_OBJECT_HANDLE| {
            member_call!(library, C_CreateObject(session, template, count, handle))
        };
        // Known before any member is asked, so that a request cut off on
        // the wire leaves it in doubt on that member (attempt_making).
        let object = self
            .group
            .objects
            .insert(vec![Presence::Unknown; self.group.members.len()], owner);
        let mut made: Vec<(usize, CK_OBJECT_HANDLE)> = Vec::new();
        // Until a member holds it: one that came up while those asked
        // failed takes it, as another member takes any other call.
        while made.is_empty() {
            let up: Vec<usize> = self.group.up_members().map(|m| m.position).collect();
            if up.is_empty() {
                self.group.objects.remove(object);
                return Err(Error::new(CKR_DEVICE_ERROR));
            }
            for position in up {
                let mut handle = CK_INVALID_HANDLE;
                let answer =
                    self.attempt_making(position, "C_CreateObject", object, &mut |l, s| {
                        create(l, s, &mut handle)
                    });
                match answer {
                    Attempt::Answered(CKR_OK) => {
                        self.group.objects.set_presence(
                            object,
                            position,
                            Presence::Present(handle),
                        );
                        made.push((position, handle));
                    }
                    Attempt::Answered(rv) => {
                        self.undo(&made);
                        self.group.objects.remove(object);
                        return Err(Error::new(rv));
                    }
                    Attempt::Faulted => {}
                }
            }
        }
        if let Some(&(position, handle)) = made.first() {
            self.remember_fingerprint(object, position, handle);
        }
        let missed: Vec<usize> = (0..self.group.members.len())
            .filter(|p| !made.iter().any(|(m, _)| m == p))
            .collect();
        if !missed.is_empty() && owner.is_none() {
            // SAFETY: forwarded from the caller.
            let kept = std::sync::Arc::new(unsafe { OwnedTemplate::copy(template, count) });
            for position in missed {
                let change = Pending::Import(object, std::sync::Arc::clone(&kept));
                self.deliver_or_queue(position, change);
            }
        }
        Ok(object)
    }

    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn create_object(
        &self,
        session: CK_SESSION_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<CK_OBJECT_HANDLE> {
        // SAFETY: forwarded from the caller.
        unsafe {
            let owner = owner_for(template_bool(template, count, CKA_TOKEN), session);
            self.create_everywhere(owner, template, count)
        }
    }

    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn copy_object(
        &self,
        session: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<CK_OBJECT_HANDLE> {
        // SAFETY: forwarded from the caller.
        let token = match unsafe { template_bool(template, count, CKA_TOKEN) } {
            Some(t) => t,
            None => self.read_bool(source, CKA_TOKEN)?,
        };
        // SAFETY: forwarded from the caller.
        let mut member_template = unsafe { MemberTemplate::for_change(template, count) };
        let (t, n) = (member_template.ptr(), member_template.count());
        let no_mechanism = CK_MECHANISM {
            mechanism: 0,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        let copy = |l: &MemberLibrary,
                    s: CK_SESSION_HANDLE,
                    _: CK_MECHANISM_PTR,
                    keys: &[CK_OBJECT_HANDLE],
                    out: &mut [CK_OBJECT_HANDLE]| {
            member_call!(l, C_CopyObject(s, keys[0], t, n, &mut out[0]))
        };
        // SAFETY: a mechanism without parameter.
        let made = unsafe {
            self.make_on_one(
                session,
                &no_mechanism,
                &[source],
                &[Some(token)],
                "C_CopyObject",
                copy,
            )
        }?;
        Ok(made[0])
    }

    fn read_bool(&self, object: CK_OBJECT_HANDLE, attribute: CK_ATTRIBUTE_TYPE) -> Result<bool> {
        let mut value: CK_BBOOL = 0;
        self.stateless(&[object], "C_GetAttributeValue", |library, s, h| {
            let mut query = CK_ATTRIBUTE {
                type_: attribute,
                pValue: &mut value as *mut _ as *mut _,
                ulValueLen: 1,
            };
            member_call!(library, C_GetAttributeValue(s, h[0], &mut query, 1))
        })?;
        Ok(value != CK_FALSE)
    }

    /// Whether the members keep this key extractable only on the
    /// application's behalf, so that it must look non-extractable.
    fn protected(&self, object: CK_OBJECT_HANDLE) -> Result<bool> {
        let class = self.read_ulong(object, CKA_CLASS)?;
        if class != CKO_SECRET_KEY && class != CKO_PRIVATE_KEY {
            return Ok(false);
        }
        Ok(self.read_bool(object, CKA_WRAP_WITH_TRUSTED)?
            && self.read_bool(object, CKA_EXTRACTABLE)?)
    }

    fn read_ulong(
        &self,
        object: CK_OBJECT_HANDLE,
        attribute: CK_ATTRIBUTE_TYPE,
    ) -> Result<CK_ULONG> {
        let mut value: CK_ULONG = 0;
        self.stateless(&[object], "C_GetAttributeValue", |library, s, h| {
            let mut query = CK_ATTRIBUTE {
                type_: attribute,
                pValue: &mut value as *mut _ as *mut _,
                ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
            };
            member_call!(library, C_GetAttributeValue(s, h[0], &mut query, 1))
        })?;
        Ok(value)
    }

    /// `C_WrapKey` may not take a key the application made non-extractable.
    pub fn refuse_if_protected(&self, key: CK_OBJECT_HANDLE) -> Result<()> {
        if self.protected(key)? {
            Err(Error::new(CKR_KEY_UNEXTRACTABLE))
        } else {
            Ok(())
        }
    }

    /// Reads attributes from one member; a key the application made
    /// non-extractable reads as such on every member.
    ///
    /// # Safety
    /// `template` must point to `count` attributes with valid buffers.
    pub unsafe fn get_attribute_value(
        &self,
        object: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<()> {
        let answer = self.stateless(&[object], "C_GetAttributeValue", |l, s, h| {
            member_call!(l, C_GetAttributeValue(s, h[0], template, count))
        });
        if let Err(e) = answer {
            if !matches!(e.rv, CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID) {
                return Err(e);
            }
        }
        // SAFETY: forwarded from the caller.
        let attributes = unsafe { std::slice::from_raw_parts_mut(template, count as usize) };
        let shown = |a: &CK_ATTRIBUTE| {
            matches!(a.type_, CKA_EXTRACTABLE | CKA_NEVER_EXTRACTABLE)
                && !a.pValue.is_null()
                && a.ulValueLen == 1
        };
        if attributes.iter().any(shown) && self.protected(object)? {
            for a in attributes.iter_mut().filter(|a| shown(a)) {
                let value = if a.type_ == CKA_EXTRACTABLE {
                    CK_FALSE
                } else {
                    CK_TRUE
                };
                // SAFETY: a one-byte buffer the member just filled.
                unsafe { *(a.pValue as *mut CK_BBOOL) = value };
            }
        }
        answer
    }

    /// Looks the object up on every member that is up, so that changes
    /// reach every copy. Also returns the members that were not up, which
    /// get the change when they are.
    #[allow(clippy::type_complexity)]
    fn resolve_everywhere(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Result<(Vec<(usize, CK_OBJECT_HANDLE)>, Vec<usize>)> {
        if self.group.objects.get(object).is_none() {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        let mut copies = Vec::new();
        let mut missed = Vec::new();
        for member in &self.group.members {
            if !member.is_up() {
                missed.push(member.position);
            } else if let Some(h) = self.resolve(object, member.position)? {
                copies.push((member.position, h));
            }
        }
        if copies.is_empty() {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        Ok((copies, missed))
    }

    /// Applies a change to every copy of an object. The first copy's answer
    /// decides: a request error there changes nothing anywhere. Members
    /// that are down get the change when they return.
    fn change_everywhere(
        &self,
        object: CK_OBJECT_HANDLE,
        function: &str,
        destroys: bool,
        change: impl Fn(&MemberLibrary, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let (before, missed) = loop {
            let (copies, mut missed) = self.resolve_everywhere(object)?;
            let before = self.fingerprint_from(copies[0]);
            let mut decided = false;
            for (position, handle) in copies {
                match self.attempt(position, function, &mut |l, s| change(l, s, handle)) {
                    Attempt::Faulted => missed.push(position),
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
            // Every copy asked failed: a member that came up meanwhile
            // decides, as another member takes any other call.
            if self.group.up_members().next().is_none() {
                return Err(Error::new(CKR_DEVICE_ERROR));
            }
        };
        for position in missed {
            if let Some(print) = &before {
                self.deliver_or_queue(position, Pending::Destroy(print.clone()));
            }
            if !destroys {
                self.deliver_or_queue(position, Pending::Create(object));
            }
        }
        Ok(())
    }

    fn fingerprint_from(
        &self,
        (position, handle): (usize, CK_OBJECT_HANDLE),
    ) -> Option<identity::Fingerprint> {
        self.on_member(position, |s| {
            identity::fingerprint(&s.library, s.handle, handle)
        })
        .ok()?
    }

    pub fn destroy_object(&self, object: CK_OBJECT_HANDLE) -> Result<()> {
        self.change_everywhere(object, "C_DestroyObject", true, |library, s, h| {
            member_call!(library, C_DestroyObject(s, h))
        })?;
        self.group.objects.remove(object);
        Ok(())
    }

    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn set_attribute_value(
        &self,
        object: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        let mut member_template = unsafe { MemberTemplate::for_change(template, count) };
        let (t, n) = (member_template.ptr(), member_template.count());
        self.change_everywhere(object, "C_SetAttributeValue", false, |library, s, h| {
            member_call!(library, C_SetAttributeValue(s, h, t, n))
        })
    }

    /// Starts a search on one member; the primary is preferred.
    ///
    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn find_init(&self, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<()> {
        // Known before the search starts (a member session runs one search
        // at a time), so that the search can leave it out.
        for member in self.group.up_members() {
            self.domain_handle(member.position);
        }
        let start = |library: &MemberLibrary, s, _| {
            member_call!(library, C_FindObjectsInit(s, template, count))
        };
        // SAFETY: forwarded from the caller.
        let kept = unsafe { OwnedTemplate::copy(template, count) };
        // SAFETY: a search has no mechanism.
        unsafe {
            self.init(
                OpKind::Find,
                std::ptr::null_mut(),
                None,
                "C_FindObjectsInit",
                start,
            )
        }?;
        self.keep_search(kept);
        Ok(())
    }

    /// Continues the search and turns member handles into virtual ones,
    /// leaving out the domain key.
    ///
    /// # Safety
    /// `found` must have room for `max` handles; `count` must be writable.
    pub unsafe fn find(
        &self,
        found: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) -> Result<()> {
        // A batch that held only the domain key (or objects returned before
        // the search moved to another member) must not read as the end of
        // the search, a count of 0: ask the member again.
        loop {
            let mut member = None;
            self.step(
                OpKind::Find,
                Step::Update,
                Input::None,
                "C_FindObjects",
                |l, s| {
                    member = self.bound_member();
                    member_call!(l, C_FindObjects(s, found, max, count))
                },
            )?;
            let member = member.ok_or(Error::new(CKR_OPERATION_NOT_INITIALIZED))?;
            // SAFETY: the member wrote `*count` handles into `found`.
            let returned = unsafe { (*count).min(max) } as usize;
            // SAFETY: as above.
            let handles = unsafe { std::slice::from_raw_parts_mut(found, returned) };
            let mut kept = 0;
            let epoch = self.group.members[member].epoch();
            for i in 0..handles.len() {
                if self.group.domain.is_domain_key(member, epoch, handles[i]) {
                    continue;
                }
                let object = self.group.objects.from_member(member, handles[i]);
                if !self.first_time_found(object) {
                    continue;
                }
                self.remember_fingerprint(object, member, handles[i]);
                handles[kept] = object;
                kept += 1;
            }
            // SAFETY: as above.
            unsafe { *count = kept as CK_ULONG };
            if kept > 0 || returned == 0 {
                return Ok(());
            }
        }
    }

    /// Runs a call that makes new objects on one member (the primary while
    /// it is up) where the keys it needs exist, replicates them to every
    /// other member, and returns their virtual handles. If the member dies
    /// before its objects are safe elsewhere, the call runs again on
    /// another member and the orphans are removed when it returns.
    ///
    /// # Safety
    /// `mechanism` must be a valid mechanism.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn make_on_one(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        keys: &[CK_OBJECT_HANDLE],
        owners: &[Option<bool>],
        function: &str,
        mut make: impl FnMut(
            &MemberLibrary,
            CK_SESSION_HANDLE,
            CK_MECHANISM_PTR,
            &[CK_OBJECT_HANDLE],
            &mut [CK_OBJECT_HANDLE],
        ) -> CK_RV,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        // SAFETY: forwarded from the caller.
        let parameter_keys = unsafe { crate::mechanism::parameter_handles(mechanism)? };
        let all_keys: Vec<CK_OBJECT_HANDLE> = keys.iter().chain(&parameter_keys).copied().collect();
        loop {
            let (position, handles) = self.choose(&all_keys, Preference::Primary)?;
            let (direct, in_parameter) = handles.split_at(keys.len());
            // SAFETY: forwarded from the caller.
            let mut member_mechanism =
                unsafe { crate::mechanism::for_member(mechanism, in_parameter)? };
            let mut made = vec![CK_INVALID_HANDLE; owners.len()];
            let answer = self.attempt(position, function, &mut |l, s| {
                make(l, s, member_mechanism.as_ptr(), direct, &mut made)
            });
            match answer {
                Attempt::Faulted => continue,
                Attempt::Answered(rv) => check(rv)?,
            }
            let objects: Vec<CK_OBJECT_HANDLE> = made
                .iter()
                .zip(owners)
                .map(|(h, token)| {
                    let mut on = vec![Presence::Unknown; self.group.members.len()];
                    on[position] = Presence::Present(*h);
                    self.group.objects.insert(on, owner_for(*token, session))
                })
                .collect();
            let prints: Vec<_> = made
                .iter()
                .zip(&objects)
                .filter_map(|(h, object)| {
                    let print = self.fingerprint_from((position, *h))?;
                    self.group.objects.set_fingerprint(*object, print.clone());
                    Some(print)
                })
                .collect();
            if self.group.members.len() == 1 {
                return Ok(objects);
            }
            let mut failure = None;
            for object in &objects {
                if let Err(e) = self.replicate(*object, position) {
                    failure = Some(e);
                    break;
                }
            }
            let Some(error) = failure else {
                return Ok(objects);
            };
            for object in &objects {
                if let Some(entry) = self.group.objects.remove(*object) {
                    let copies: Vec<(usize, CK_OBJECT_HANDLE)> = entry
                        .on
                        .iter()
                        .enumerate()
                        .filter_map(|(m, p)| match p {
                            Presence::Present(h) => Some((m, *h)),
                            _ => None,
                        })
                        .collect();
                    self.undo(&copies);
                }
            }
            if self.group.members[position].is_up() {
                return Err(error);
            }
            for print in prints {
                self.deliver_or_queue(position, Pending::Destroy(print));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_bool_reads_one_byte_values_only() {
        let mut yes: CK_BBOOL = CK_TRUE;
        let mut wide: CK_ULONG = 1;
        let template = [
            CK_ATTRIBUTE {
                type_: CKA_PRIVATE,
                pValue: &mut wide as *mut _ as *mut _,
                ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
            },
            CK_ATTRIBUTE {
                type_: CKA_TOKEN,
                pValue: &mut yes as *mut _ as *mut _,
                ulValueLen: 1,
            },
        ];
        // SAFETY: the template is a live local array.
        unsafe {
            assert_eq!(template_bool(template.as_ptr(), 2, CKA_TOKEN), Some(true));
            assert_eq!(template_bool(template.as_ptr(), 2, CKA_PRIVATE), None);
            assert_eq!(template_bool(std::ptr::null(), 0, CKA_TOKEN), None);
        }
    }

    #[test]
    fn non_extractable_becomes_wrap_with_trusted() {
        let mut no: CK_BBOOL = CK_FALSE;
        let mut template = [CK_ATTRIBUTE {
            type_: CKA_EXTRACTABLE,
            pValue: &mut no as *mut _ as *mut _,
            ulValueLen: 1,
        }];
        // SAFETY: the template is a live local array.
        unsafe {
            let mut member = MemberTemplate::for_change(template.as_mut_ptr(), 1);
            assert_eq!(member.count(), 2);
            let p = member.ptr();
            assert_eq!(template_bool(p, 2, CKA_EXTRACTABLE), Some(true));
            assert_eq!(template_bool(p, 2, CKA_WRAP_WITH_TRUSTED), Some(true));
        }
        assert_eq!(no, CK_FALSE, "the application's template is untouched");
    }
}
