//! Object management and search.

use super::{buffer, cryptoki_fn, required, session};
use crate::arguments::Template;
use crate::error::{check, Error};
use crate::member::member_call;
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
                check(member_call!(p.library, C_CreateObject(p.handle, template.as_ptr(), template.count(), object)))
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
                check(member_call!(p.library, C_CopyObject(p.handle, source, template.as_ptr(), template.count(), object)))
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
                check(member_call!(p.library, C_DestroyObject(p.handle, object)))
            }
            Target::Virtual(v) => v.destroy_object(object).map_err(Error::as_object),
        }
    }

    fn C_GetObjectSize(handle: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, size: CK_ULONG_PTR) {
        required(size)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                check(member_call!(p.library, C_GetObjectSize(p.handle, object, size)))
            }
            Target::Virtual(v) => v
                .stateless(&[object], "C_GetObjectSize", |l, m, h| {
                    member_call!(l, C_GetObjectSize(m, h[0], size))
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
        buffer(template, count)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(object, CKR_OBJECT_HANDLE_INVALID)?;
                check(member_call!(p.library, C_GetAttributeValue(p.handle, object, template, count)))
            }
            // SAFETY: `template` is null only with a zero count (checked
            // above); the application vouches for `count` attributes with
            // buffers of the lengths they give.
            Target::Virtual(v) => unsafe { v.get_attribute_value(object, template, count) }.map_err(Error::as_object),
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
                check(member_call!(p.library, C_SetAttributeValue(p.handle, object, template.as_ptr(), template.count())))
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
            Target::PassThrough(p) => check(member_call!(p.library, C_FindObjectsInit(p.handle, template.as_ptr(), template.count()))),
            Target::Virtual(v) => v.find_init(&template),
        }
    }

    fn C_FindObjects(
        handle: CK_SESSION_HANDLE,
        objects: CK_OBJECT_HANDLE_PTR,
        max: CK_ULONG,
        count: CK_ULONG_PTR,
    ) {
        buffer(objects, max)?;
        required(count)?;
        let s = session(handle)?;
        match &s.target {
            // SAFETY: `count` is not null and `objects` is null only with a
            // zero `max` (checked above); the application vouches for room
            // for `max` handles.
            Target::PassThrough(p) => unsafe { p.find(objects, max, count) },
            // SAFETY: as for the pass-through search above.
            Target::Virtual(v) => unsafe { v.find(objects, max, count) },
        }
    }

    fn C_FindObjectsFinal(handle: CK_SESSION_HANDLE) {
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(member_call!(p.library, C_FindObjectsFinal(p.handle))),
            Target::Virtual(v) => v.step(
                OpKind::Find,
                Step::Finish { length_query: false },
                Input::None,
                "C_FindObjectsFinal",
                |l, m| member_call!(l, C_FindObjectsFinal(m)),
            ),
        }
    }
}
