//! Moving objects between members. Key material leaves a member only
//! wrapped under the group's domain key -- an AES-256 key with the same
//! value on every member, marked `CKA_TRUSTED` -- and is unwrapped on the
//! other members, before the call that made it returns. Public objects
//! (public keys, certificates, data) are copied by their attributes.
//!
//! A key the application asks to be non-extractable is kept extractable on
//! the members but only under a trusted key (`CKA_WRAP_WITH_TRUSTED`), the
//! domain key being the only one; the application sees it non-extractable
//! and cannot wrap it. See `docs/security-model.md`.

use crate::error::{Error, Result};
use crate::identity::{self, Fingerprint};
use crate::member::member_call;
use crate::object::Presence;
use crate::virtual_session::{Attempt, VirtualSession};
use cryptoki_sys::*;
use std::ptr;

/// How key material travels: RFC 5649 key wrap with padding, which takes
/// secret keys of any length and PKCS#8-encoded private keys.
pub const WRAP_MECHANISM: CK_MECHANISM_TYPE = CKM_AES_KEY_WRAP_PAD;

/// What a copy of a secret or private key must carry over. Values a member
/// computes itself (`CKA_LOCAL`, `CKA_CHECK_VALUE`, the key material) are
/// left to it.
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
    CKA_MODIFIABLE,
    CKA_ALWAYS_AUTHENTICATE,
    CKA_ALLOWED_MECHANISMS,
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
    CKA_MODIFIABLE,
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
];

/// An attribute list read from a member, as a template for another.
struct Template {
    values: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>,
}

impl Template {
    fn read(
        library: &crate::member::MemberLibrary,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Template {
        // Empty values (no dates, no subject) are the members' defaults, and
        // some members refuse them spelled out.
        let values = types
            .iter()
            .filter_map(|t| identity::read_attribute(library, session, object, *t).map(|v| (*t, v)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Template { values }
    }

    fn attributes(&mut self) -> Vec<CK_ATTRIBUTE> {
        self.values
            .iter_mut()
            .map(|(t, v)| CK_ATTRIBUTE {
                type_: *t,
                pValue: v.as_mut_ptr() as *mut _,
                ulValueLen: v.len() as CK_ULONG,
            })
            .collect()
    }
}

/// An application's `C_CreateObject` template, kept (zeroized when
/// dropped) until every member that was down has the object: the
/// application handed us the values, and a member behind a client library
/// that carries no key-wrap mechanism can receive them no other way.
pub struct OwnedTemplate {
    values: Vec<(CK_ATTRIBUTE_TYPE, zeroize::Zeroizing<Vec<u8>>)>,
}

impl OwnedTemplate {
    /// # Safety
    /// `template` must point to `count` attributes with readable values.
    pub unsafe fn copy(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> OwnedTemplate {
        let attributes = if template.is_null() {
            &[][..]
        } else {
            // SAFETY: the caller vouches for the template.
            unsafe { std::slice::from_raw_parts(template, count as usize) }
        };
        let values = attributes
            .iter()
            .map(|a| {
                let bytes = if a.pValue.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: as above, each value is readable.
                    unsafe {
                        std::slice::from_raw_parts(a.pValue as *const u8, a.ulValueLen as usize)
                    }
                    .to_vec()
                };
                (a.type_, zeroize::Zeroizing::new(bytes))
            })
            .collect();
        OwnedTemplate { values }
    }

    /// Attributes pointing into this template, for one member call.
    pub fn attributes(&self) -> Vec<CK_ATTRIBUTE> {
        self.values
            .iter()
            .map(|(t, v)| CK_ATTRIBUTE {
                type_: *t,
                pValue: v.as_ptr() as *mut _,
                ulValueLen: v.len() as CK_ULONG,
            })
            .collect()
    }
}

/// A change a member that was down has yet to receive.
#[derive(Clone)]
pub enum Pending {
    /// Copy this virtual object to it.
    Create(CK_OBJECT_HANDLE),
    /// Create this virtual object on it from the application's template.
    Import(CK_OBJECT_HANDLE, std::sync::Arc<OwnedTemplate>),
    /// Remove the object with this fingerprint from it.
    Destroy(Fingerprint),
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
        let Some(handle) = self.domain_handle(position) else {
            eprintln!(
                "pkcs11-ha: group {}: member {} does not hold exactly one key labelled {:?}, the group's domain key; provision it with `pkcs11-ha group add-member --provision-domain`",
                self.group.label, member.serial, self.group.settings.domain_label
            );
            return Err(Error::new(CKR_FUNCTION_FAILED));
        };
        let s = self.member_session(position)?;
        let check = identity::read_attribute(&s.library, s.handle, handle, CKA_CHECK_VALUE)
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

    /// The handle of the member's domain key, looked up by class and label
    /// once per member epoch (so that searches can leave it out); `None`
    /// where the member does not hold exactly one.
    pub fn domain_handle(&self, position: usize) -> Option<CK_OBJECT_HANDLE> {
        let member = &self.group.members[position];
        let epoch = member.epoch();
        if let Some(found) = self.group.domain.found(position, epoch) {
            return found;
        }
        let s = self.member_session(position).ok()?;
        let label = self.group.settings.domain_label.as_bytes().to_vec();
        let print: Fingerprint = vec![
            (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
            (CKA_LABEL, label),
        ];
        let found = identity::find(&s.library, s.handle, &print).ok()?;
        let handle = match found[..] {
            [one] => Some(one),
            _ => None,
        };
        self.group.domain.record_found(position, epoch, handle);
        handle
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
        for position in &targets {
            if !self.group.members[*position].is_up() {
                self.group.add_pending(*position, Pending::Create(object));
            }
        }
        let up: Vec<usize> = targets
            .into_iter()
            .filter(|p| self.group.members[*p].is_up())
            .collect();
        self.copy_to(object, source, &up)
    }

    /// Copies virtual object `object` from member `source` to `targets`.
    pub fn copy_to(
        &self,
        object: CK_OBJECT_HANDLE,
        source: usize,
        targets: &[usize],
    ) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let source_handle = self
            .resolve(object, source)?
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
        let from = self.member_session(source)?;
        let class = identity::read_attribute(&from.library, from.handle, source_handle, CKA_CLASS)
            .map(|c| identity::ulong_of(&c))
            .ok_or(Error::new(CKR_OBJECT_HANDLE_INVALID))?;
        let secret = class == CKO_SECRET_KEY || class == CKO_PRIVATE_KEY;
        let types = if secret {
            KEY_ATTRIBUTES
        } else {
            PUBLIC_ATTRIBUTES
        };
        let mut template = Template::read(&from.library, from.handle, source_handle, types);
        let wrapped = if secret {
            Some(self.wrap_for_transfer(source, source_handle)?)
        } else {
            None
        };
        let mut made: Vec<(usize, CK_OBJECT_HANDLE)> = Vec::new();
        for &position in targets {
            let domain = match &wrapped {
                Some(_) => match self.domain_key(position) {
                    Ok(h) => h,
                    Err(e) => {
                        self.undo(&made);
                        return Err(e);
                    }
                },
                None => CK_INVALID_HANDLE,
            };
            let mut attributes = template.attributes();
            let mut handle: CK_OBJECT_HANDLE = CK_INVALID_HANDLE;
            let mut answer = Attempt::Faulted;
            // A member that only had to be logged in again is still up: try
            // it once more rather than leave the object pending.
            for _ in 0..2 {
                answer = self.attempt(position, "replication", &mut |l, s| match &wrapped {
                    Some(blob) => {
                        let mut mechanism = CK_MECHANISM {
                            mechanism: WRAP_MECHANISM,
                            pParameter: ptr::null_mut(),
                            ulParameterLen: 0,
                        };
                        member_call!(
                            l,
                            C_UnwrapKey(
                                s,
                                &mut mechanism,
                                domain,
                                blob.as_ptr() as *mut _,
                                blob.len() as CK_ULONG,
                                attributes.as_mut_ptr(),
                                attributes.len() as CK_ULONG,
                                &mut handle
                            )
                        )
                    }
                    None => member_call!(
                        l,
                        C_CreateObject(
                            s,
                            attributes.as_mut_ptr(),
                            attributes.len() as CK_ULONG,
                            &mut handle
                        )
                    ),
                });
                if !matches!(answer, Attempt::Faulted) || !self.group.members[position].is_up() {
                    break;
                }
            }
            match answer {
                Attempt::Answered(CKR_OK) => {
                    self.group
                        .objects
                        .set_presence(object, position, Presence::Present(handle));
                    made.push((position, handle));
                }
                Attempt::Answered(rv) => {
                    self.undo(&made);
                    return Err(match &wrapped {
                        Some(_) => self.transport_error(position, rv),
                        None => Error::new(rv),
                    });
                }
                Attempt::Faulted => self.group.add_pending(position, Pending::Create(object)),
            }
        }
        Ok(())
    }

    /// The key on `source` wrapped under the domain key.
    fn wrap_for_transfer(&self, source: usize, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>> {
        let domain = self.domain_key(source)?;
        let s = self.member_session(source)?;
        let mut mechanism = CK_MECHANISM {
            mechanism: WRAP_MECHANISM,
            pParameter: ptr::null_mut(),
            ulParameterLen: 0,
        };
        let mut len: CK_ULONG = 0;
        let rv = member_call!(
            s.library,
            C_WrapKey(
                s.handle,
                &mut mechanism,
                domain,
                key,
                ptr::null_mut(),
                &mut len
            )
        );
        if rv != CKR_OK {
            return Err(self.transport_error(source, rv));
        }
        let mut blob = vec![0u8; len as usize];
        let rv = member_call!(
            s.library,
            C_WrapKey(
                s.handle,
                &mut mechanism,
                domain,
                key,
                blob.as_mut_ptr(),
                &mut len
            )
        );
        if rv != CKR_OK {
            return Err(Error::new(rv));
        }
        blob.truncate(len as usize);
        Ok(blob)
    }

    /// A member that cannot wrap or unwrap with the domain key (its library
    /// does not carry the mechanism, as p11-kit 0.24's client does not)
    /// cannot hold the group's generated keys: say so, and answer
    /// `CKR_FUNCTION_FAILED` rather than a mechanism error the application
    /// did not cause.
    fn transport_error(&self, position: usize, rv: CK_RV) -> Error {
        if rv != CKR_MECHANISM_INVALID {
            return Error::new(rv);
        }
        let event = format!(
            "member {} cannot carry key material: its library refuses CKM_AES_KEY_WRAP_PAD; keys generated in this group cannot replicate (imported keys can)",
            self.group.members[position].serial
        );
        eprintln!("pkcs11-ha: group {}: {event}", self.group.label);
        self.group.log(Some(position), &event);
        Error::new(CKR_FUNCTION_FAILED)
    }

    /// Removes copies made before a replication had to be abandoned.
    pub fn undo(&self, made: &[(usize, CK_OBJECT_HANDLE)]) {
        for (position, handle) in made {
            if let Ok(s) = self.member_session(*position) {
                member_call!(s.library, C_DestroyObject(s.handle, *handle));
            }
        }
    }
}
