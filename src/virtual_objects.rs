//! Object calls on a virtual slot: objects the application creates exist
//! on every member that is up when the call returns; objects made by a
//! member-side computation (key generation, unwrapping, derivation) are
//! made on one member. Handles the application sees are virtual.

use crate::error::{check, Error, Result};
use crate::group::{is_member_fault, MemberState};
use crate::mechanism;
use crate::member::member_call;
use crate::member::MemberLibrary;
use crate::object::Presence;
use crate::session::{OpKind, Preference, Step, VirtualSession};
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
    /// request errors, a member that faults is taken out of service.
    pub fn create_everywhere(
        &self,
        owner: Option<CK_SESSION_HANDLE>,
        create: impl Fn(
            &MemberLibrary,
            CK_SESSION_HANDLE,
            usize,
        ) -> std::result::Result<CK_OBJECT_HANDLE, CK_RV>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let mut on = vec![Presence::Unknown; self.group.members.len()];
        let mut created: Vec<(usize, CK_OBJECT_HANDLE)> = Vec::new();
        for (position, s) in self.up_member_sessions() {
            let guard = self.group.members[position].begin_call();
            let outcome = create(&s.library, s.handle, position);
            drop(guard);
            match outcome {
                Ok(h) => {
                    on[position] = Presence::Present(h);
                    created.push((position, h));
                }
                Err(rv) if is_member_fault(rv) => {
                    self.group.members[position].set_state(MemberState::Down);
                }
                Err(rv) => {
                    for (p, h) in created {
                        if let Ok(s) = self.member_session(p) {
                            member_call!(s.library, C_DestroyObject(s.handle, h));
                        }
                    }
                    return Err(Error::new(rv));
                }
            }
        }
        if created.is_empty() {
            return Err(Error::new(CKR_DEVICE_ERROR));
        }
        Ok(self.group.objects.insert(on, owner))
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
        let owner = owner_for(
            unsafe { template_bool(template, count, CKA_TOKEN) },
            session,
        );
        self.create_everywhere(owner, |library, member_session, _| {
            let mut handle = 0;
            let rv = member_call!(
                library,
                C_CreateObject(member_session, template, count, &mut handle)
            );
            if rv == CKR_OK {
                Ok(handle)
            } else {
                Err(rv)
            }
        })
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
        self.resolve_everywhere(source)?;
        // SAFETY: forwarded from the caller.
        let token = unsafe { template_bool(template, count, CKA_TOKEN) };
        let token = match token {
            Some(t) => Some(t),
            None => self.read_bool(source, CKA_TOKEN)?,
        };
        let owner = owner_for(token, session);
        self.create_everywhere(owner, |library, member_session, position| {
            let Ok(Some(member_source)) = self.resolve(source, position) else {
                return Err(CKR_OBJECT_HANDLE_INVALID);
            };
            let mut handle = 0;
            let rv = member_call!(
                library,
                C_CopyObject(member_session, member_source, template, count, &mut handle)
            );
            if rv == CKR_OK {
                Ok(handle)
            } else {
                Err(rv)
            }
        })
    }

    fn read_bool(
        &self,
        object: CK_OBJECT_HANDLE,
        attribute: CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<bool>> {
        let mut value: CK_BBOOL = 0;
        let mut query = CK_ATTRIBUTE {
            type_: attribute,
            pValue: &mut value as *mut _ as *mut _,
            ulValueLen: 1,
        };
        self.stateless(&[object], |library, s, h| {
            member_call!(library, C_GetAttributeValue(s, h[0], &mut query, 1))
        })?;
        Ok(Some(value != CK_FALSE))
    }

    /// Looks the object up on every member that is up, so that changes
    /// reach every copy.
    fn resolve_everywhere(
        &self,
        object: CK_OBJECT_HANDLE,
    ) -> Result<Vec<(usize, CK_OBJECT_HANDLE)>> {
        if self.group.objects.get(object).is_none() {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        let mut copies = Vec::new();
        for member in self.group.up_members() {
            if let Some(h) = self.resolve(object, member.position)? {
                copies.push((member.position, h));
            }
        }
        if copies.is_empty() {
            return Err(Error::new(CKR_OBJECT_HANDLE_INVALID));
        }
        Ok(copies)
    }

    /// Applies a change to every copy of an object. The first copy's answer
    /// decides: a request error there changes nothing anywhere.
    fn change_everywhere(
        &self,
        object: CK_OBJECT_HANDLE,
        change: impl Fn(&MemberLibrary, CK_SESSION_HANDLE, CK_OBJECT_HANDLE) -> CK_RV,
    ) -> Result<()> {
        let copies = self.resolve_everywhere(object)?;
        let mut first_answer = None;
        for (position, handle) in copies {
            let s = self.member_session(position)?;
            let guard = self.group.members[position].begin_call();
            let rv = change(&s.library, s.handle, handle);
            drop(guard);
            if is_member_fault(rv) {
                self.group.members[position].set_state(MemberState::Down);
                continue;
            }
            if first_answer.is_none() {
                if rv != CKR_OK {
                    return Err(Error::new(rv));
                }
                first_answer = Some(rv);
            }
        }
        first_answer.map(|_| ()).ok_or(Error::new(CKR_DEVICE_ERROR))
    }

    pub fn destroy_object(&self, object: CK_OBJECT_HANDLE) -> Result<()> {
        self.change_everywhere(object, |library, s, h| {
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
        self.change_everywhere(object, |library, s, h| {
            member_call!(library, C_SetAttributeValue(s, h, template, count))
        })
    }

    /// Starts a search on one member; the primary is preferred, since
    /// objects made by one member live there first.
    ///
    /// # Safety
    /// `template` must point to `count` attributes.
    pub unsafe fn find_init(&self, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<()> {
        self.init(OpKind::Find, &[], |library, s, _| {
            member_call!(library, C_FindObjectsInit(s, template, count))
        })
    }

    /// Continues the search and turns member handles into virtual ones.
    ///
    /// # Safety
    /// `found` must have room for `max` handles; `count` must be writable.
    pub unsafe fn find(
        &self,
        found: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) -> Result<()> {
        let mut member = None;
        self.step(OpKind::Find, Step::Update, |library, s| {
            member = self.bound_member();
            member_call!(library, C_FindObjects(s, found, max, count))
        })?;
        let member = member.ok_or(Error::new(CKR_OPERATION_NOT_INITIALIZED))?;
        // SAFETY: the member wrote `*count` handles into `found`.
        let handles = unsafe { std::slice::from_raw_parts_mut(found, (*count).min(max) as usize) };
        for h in handles {
            *h = self.group.objects.from_member(member, *h);
        }
        Ok(())
    }

    /// Runs a call that makes new objects on one member, where the keys it
    /// needs exist, and gives the application virtual handles for them.
    ///
    /// # Safety
    /// `mechanism` must be a valid mechanism.
    pub unsafe fn make_on_one(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        keys: &[CK_OBJECT_HANDLE],
        owners: &[Option<bool>],
        make: impl FnOnce(
            &MemberLibrary,
            CK_SESSION_HANDLE,
            CK_MECHANISM_PTR,
            &[CK_OBJECT_HANDLE],
            &mut [CK_OBJECT_HANDLE],
        ) -> CK_RV,
    ) -> Result<Vec<CK_OBJECT_HANDLE>> {
        // SAFETY: forwarded from the caller.
        let parameter_keys = unsafe { mechanism::parameter_handles(mechanism)? };
        let all_keys: Vec<CK_OBJECT_HANDLE> = keys.iter().chain(&parameter_keys).copied().collect();
        let (position, s, handles) = self.choose(&all_keys, Preference::Primary)?;
        let (direct, in_parameter) = handles.split_at(keys.len());
        // SAFETY: forwarded from the caller.
        let mut member_mechanism = unsafe { mechanism::for_member(mechanism, in_parameter)? };
        let mut made = vec![0; owners.len()];
        let guard = self.group.members[position].begin_call();
        let rv = make(
            &s.library,
            s.handle,
            member_mechanism.as_ptr(),
            direct,
            &mut made,
        );
        drop(guard);
        check(rv)?;
        Ok(made
            .into_iter()
            .zip(owners)
            .map(|(h, token)| {
                let mut on = vec![Presence::Unknown; self.group.members.len()];
                on[position] = Presence::Present(h);
                self.group.objects.insert(on, owner_for(*token, session))
            })
            .collect())
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
}
