//! Object management and search.

use super::{cryptoki_fn, required, session};
use crate::arguments::{AttributeRequest, OutArray, Template};
use crate::error::{check, Error};
use crate::member_api::MemberApi;
use crate::session::Target;
use crate::virtual_session::{Input, OpKind, Step};
use cryptoki_sys::*;

cryptoki_fn! {
    fn C_CreateObject(
        handle: CK_SESSION_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        object: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        required(object)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.refuse_reserved_label(&template)?;
                // SAFETY: `object` is not null (checked above) and writable.
                let object = unsafe { &mut *object };
                check(p.library.create_object(p.handle, template.as_slice(), object))
            }
            Target::Virtual(v) => {
                let made = v.create_object(handle, &template)?;
                // SAFETY: `object` is not null (checked above) and writable.
                unsafe { *object = made };
                Ok(())
            }
        }
    }

    fn C_CopyObject(
        handle: CK_SESSION_HANDLE,
        source: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        object: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        required(object)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(source, CKR_OBJECT_HANDLE_INVALID)?;
                p.refuse_reserved_label(&template)?;
                // SAFETY: `object` is not null (checked above) and writable.
                let object = unsafe { &mut *object };
                check(p.library.copy_object(p.handle, source, template.as_slice(), object))
            }
            Target::Virtual(v) => {
                let made = v.copy_object(handle, source, &template).map_err(Error::as_object)?;
                // SAFETY: `object` is not null (checked above) and writable.
                unsafe { *object = made };
                Ok(())
            }
        }
    }

    fn C_DestroyObject(handle: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) {
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                check(p.library.destroy_object(p.handle, object))
            }
            Target::Virtual(v) => v.destroy_object(object).map_err(Error::as_object),
        }
    }

    fn C_GetObjectSize(handle: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, size: CK_ULONG_PTR) {
        required(size)?;
        // SAFETY: not null (checked above) and writable.
        let size = unsafe { &mut *size };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                check(p.library.get_object_size(p.handle, object, size))
            }
            Target::Virtual(v) => v
                .stateless(&[object], "C_GetObjectSize", |l, m, h| {
                    l.get_object_size(m, h[0], size)
                })
                .map_err(Error::as_object),
        }
    }

    fn C_GetAttributeValue(
        handle: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) {
        // SAFETY: the application vouches for `count` attributes with
        // buffers of the lengths they give.
        let mut request = unsafe { AttributeRequest::new(template, count) }?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                check(p.library.get_attribute_value(p.handle, object, request.as_mut_slice()))
            }
            Target::Virtual(v) => v.get_attribute_value(object, &mut request).map_err(Error::as_object),
        }
    }

    fn C_SetAttributeValue(
        handle: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
    ) {
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                p.refuse_reserved_label(&template)?;
                check(p.library.set_attribute_value(p.handle, object, template.as_slice()))
            }
            Target::Virtual(v) => v.set_attribute_value(object, &template).map_err(Error::as_object),
        }
    }

    fn C_FindObjectsInit(handle: CK_SESSION_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG) {
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.find_objects_init(p.handle, template.as_slice())),
            Target::Virtual(v) => v.find_init(&template),
        }
    }

    fn C_FindObjects(
        handle: CK_SESSION_HANDLE,
        objects: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) {
        // SAFETY: the application vouches for room for `max` handles.
        let mut found = unsafe { OutArray::new(objects, max) }?;
        required(count)?;
        // SAFETY: not null (checked above) and writable.
        let count = unsafe { &mut *count };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => p.find(&mut found, count),
            Target::Virtual(v) => v.find(&mut found, count),
        }
    }

    fn C_FindObjectsFinal(handle: CK_SESSION_HANDLE) {
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.find_objects_final(p.handle)),
            Target::Virtual(v) => v.step(
                OpKind::Find,
                Step::Finish { length_query: false },
                Input::None,
                "C_FindObjectsFinal",
                |l, m| l.find_objects_final(m),
            ),
        }
    }
}
