//! Cryptographic operations, key management and random numbers. On a
//! virtual slot an operation runs on the member chosen at its `*Init`.

use super::{buffer, cryptoki_fn, required, session};
use crate::arguments::Template;
use crate::error::{check, Error};
use crate::mechanism::Mechanism;
use crate::member::{member_call, MemberLibrary};
use crate::session::Target;
use crate::virtual_objects::{made_print, MemberTemplate};
use crate::virtual_session::{Input, OpKind, Step};
use cryptoki_sys::*;

/// `*Init` functions that take a mechanism and a key.
macro_rules! keyed_init {
    ($($name:ident => $kind:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) {
                // SAFETY: the application vouches for the mechanism it passes.
                let mechanism = unsafe { Mechanism::new(mechanism) }?;
                let s = session(handle)?;
                match &s.target {
                    Target::PassThrough(p) => {
                        p.reachable(key, CKR_KEY_HANDLE_INVALID)?;
                        check(member_call!(p.library, $name(p.handle, mechanism.as_ptr(), key)))
                            .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
                    }
                    Target::Virtual(v) => {
                        let on_member = |l: &MemberLibrary, m, k| member_call!(l, $name(m, mechanism.as_ptr(), k));
                        v.init(OpKind::$kind, Some(&mechanism), Some(key), stringify!($name), on_member)
                            .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
                    }
                }
            }
        }
    )*};
}

/// Calls that take input and write output under the two-call convention.
/// `$finishes` says whether the call ends the operation.
macro_rules! in_out {
    ($($name:ident => $kind:ident, $finishes:expr);* $(;)?) => {$(
        cryptoki_fn! {
            fn $name(
                handle: CK_SESSION_HANDLE,
                input: *mut CK_BYTE,
                input_len: CK_ULONG,
                output: *mut CK_BYTE,
                output_len: CK_ULONG_PTR,
            ) {
                buffer(input, input_len)?;
                required(output_len)?;
                let s = session(handle)?;
                let step = if $finishes {
                    Step::Finish { length_query: output.is_null() }
                } else {
                    Step::Update
                };
                match &s.target {
                    Target::PassThrough(p) => {
                        check(member_call!(p.library, $name(p.handle, input, input_len, output, output_len)))
                    }
                    Target::Virtual(v) => v.step(OpKind::$kind, step, Input::None, stringify!($name), |l, m| {
                        member_call!(l, $name(m, input, input_len, output, output_len))
                    }),
                }
            }
        }
    )*};
}

/// Updates that take input only.
macro_rules! input_update {
    ($($name:ident => $kind:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, input: *mut CK_BYTE, input_len: CK_ULONG) {
                buffer(input, input_len)?;
                let s = session(handle)?;
                match &s.target {
                    Target::PassThrough(p) => check(member_call!(p.library, $name(p.handle, input, input_len))),
                    Target::Virtual(v) => {
                        let data = if input.is_null() {
                            &[][..]
                        } else {
                            // SAFETY: not null, and the application vouches
                            // for `input_len` readable bytes.
                            unsafe { std::slice::from_raw_parts(input, input_len as usize) }
                        };
                        v.step(OpKind::$kind, Step::Update, Input::Data(data), stringify!($name), |l, m| {
                            member_call!(l, $name(m, input, input_len))
                        })
                    }
                }
            }
        }
    )*};
}

/// Finals that write output under the two-call convention.
macro_rules! output_final {
    ($($name:ident => $kind:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, output: *mut CK_BYTE, output_len: CK_ULONG_PTR) {
                required(output_len)?;
                let s = session(handle)?;
                let step = Step::Finish { length_query: output.is_null() };
                match &s.target {
                    Target::PassThrough(p) => check(member_call!(p.library, $name(p.handle, output, output_len))),
                    Target::Virtual(v) => v.step(OpKind::$kind, step, Input::None, stringify!($name), |l, m| {
                        member_call!(l, $name(m, output, output_len))
                    }),
                }
            }
        }
    )*};
}

keyed_init!(
    C_EncryptInit => Encrypt,
    C_DecryptInit => Decrypt,
    C_SignInit => Sign,
    C_VerifyInit => Verify,
    C_SignRecoverInit => SignRecover,
    C_VerifyRecoverInit => VerifyRecover,
);

in_out!(
    C_Encrypt => Encrypt, true;
    C_Decrypt => Decrypt, true;
    C_Digest => Digest, true;
    C_Sign => Sign, true;
    C_SignRecover => SignRecover, true;
    C_VerifyRecover => VerifyRecover, true;
    C_EncryptUpdate => Encrypt, false;
    C_DecryptUpdate => Decrypt, false;
);

/// Dual-function updates: `$kind` is the operation that writes the
/// output; `$other` is fed through the same call, and its input is not
/// kept for replay.
macro_rules! dual_update {
    ($($name:ident => $kind:ident + $other:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(
                handle: CK_SESSION_HANDLE,
                input: *mut CK_BYTE,
                input_len: CK_ULONG,
                output: *mut CK_BYTE,
                output_len: CK_ULONG_PTR,
            ) {
                buffer(input, input_len)?;
                required(output_len)?;
                let s = session(handle)?;
                match &s.target {
                    Target::PassThrough(p) => {
                        check(member_call!(p.library, $name(p.handle, input, input_len, output, output_len)))
                    }
                    Target::Virtual(v) => {
                        let answer = v.step(OpKind::$kind, Step::Update, Input::None, stringify!($name), |l, m| {
                            member_call!(l, $name(m, input, input_len, output, output_len))
                        });
                        if answer.is_ok() && !output.is_null() {
                            v.stop_replaying(OpKind::$other);
                        }
                        answer
                    }
                }
            }
        }
    )*};
}

dual_update!(
    C_DigestEncryptUpdate => Encrypt + Digest,
    C_DecryptDigestUpdate => Decrypt + Digest,
    C_SignEncryptUpdate => Encrypt + Sign,
    C_DecryptVerifyUpdate => Decrypt + Verify,
);

input_update!(C_DigestUpdate => Digest, C_SignUpdate => Sign, C_VerifyUpdate => Verify);

output_final!(
    C_EncryptFinal => Encrypt,
    C_DecryptFinal => Decrypt,
    C_DigestFinal => Digest,
    C_SignFinal => Sign,
);

cryptoki_fn! {
    fn C_DigestInit(handle: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(member_call!(p.library, C_DigestInit(p.handle, mechanism.as_ptr()))),
            Target::Virtual(v) => {
                let on_member = |l: &MemberLibrary, m, _| member_call!(l, C_DigestInit(m, mechanism.as_ptr()));
                v.init(OpKind::Digest, Some(&mechanism), None, "C_DigestInit", on_member)
            }
        }
    }

    fn C_DigestKey(handle: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(key, CKR_KEY_HANDLE_INVALID)?;
                check(member_call!(p.library, C_DigestKey(p.handle, key))).map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => v.digest_key(key).map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID)),
        }
    }

    fn C_Verify(
        handle: CK_SESSION_HANDLE,
        data: *mut CK_BYTE,
        data_len: CK_ULONG,
        signature: *mut CK_BYTE,
        signature_len: CK_ULONG,
    ) {
        buffer(data, data_len)?;
        buffer(signature, signature_len)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                check(member_call!(p.library, C_Verify(p.handle, data, data_len, signature, signature_len)))
            }
            Target::Virtual(v) => v.step(OpKind::Verify, Step::Finish { length_query: false }, Input::None, "C_Verify", |l, m| {
                member_call!(l, C_Verify(m, data, data_len, signature, signature_len))
            }),
        }
    }

    fn C_VerifyFinal(handle: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG) {
        buffer(signature, signature_len)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(member_call!(p.library, C_VerifyFinal(p.handle, signature, signature_len))),
            Target::Virtual(v) => v.step(OpKind::Verify, Step::Finish { length_query: false }, Input::None, "C_VerifyFinal", |l, m| {
                member_call!(l, C_VerifyFinal(m, signature, signature_len))
            }),
        }
    }

    fn C_GenerateKey(
        handle: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_PTR,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        key: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        required(key)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.refuse_reserved_label(&template)?;
                check(member_call!(p.library, C_GenerateKey(p.handle, mechanism.as_ptr(), template.as_ptr(), template.count(), key)))
            }
            Target::Virtual(v) => {
                let (token, member_template) = (template.bool(CKA_TOKEN), MemberTemplate::for_new_key(&template));
                let (t, n) = (member_template.template().as_ptr(), member_template.template().count());
                let generate = |l: &MemberLibrary, m: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, _: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    member_call!(l, C_GenerateKey(m, mech, t, n, &mut out[0]))
                };
                let prints = [made_print(&template, CKO_SECRET_KEY)];
                let made = v.make_on_one(handle, &mechanism, &[], &[token], &prints, "C_GenerateKey", generate)?;
                if member_template.protects() {
                    v.group.objects.mark_protected(made[0], true);
                }
                // SAFETY: `key` is not null (checked above) and writable.
                unsafe { *key = made[0] };
                Ok(())
            }
        }
    }

    fn C_GenerateKeyPair(
        handle: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_PTR,
        public_template: CK_ATTRIBUTE_PTR,
        public_count: CK_ULONG,
        private_template: CK_ATTRIBUTE_PTR,
        private_count: CK_ULONG,
        public_key: CK_OBJECT_HANDLE_PTR,
        private_key: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        // SAFETY: the application vouches for each template's count, their
        // values readable during its call.
        let public_template = unsafe { Template::giving_values(public_template, public_count) }?;
        // SAFETY: as above.
        let private_template = unsafe { Template::giving_values(private_template, private_count) }?;
        required(public_key)?;
        required(private_key)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.refuse_reserved_label(&public_template)?;
                p.refuse_reserved_label(&private_template)?;
                check(member_call!(
                p.library,
                C_GenerateKeyPair(
                    p.handle, mechanism.as_ptr(), public_template.as_ptr(), public_template.count(), private_template.as_ptr(), private_template.count(),
                    public_key, private_key
                )
            ))
            }
            Target::Virtual(v) => {
                let owners = [public_template.bool(CKA_TOKEN), private_template.bool(CKA_TOKEN)];
                let member_private = MemberTemplate::for_new_key(&private_template);
                let (t, n) = (member_private.template().as_ptr(), member_private.template().count());
                let (public_t, public_n) = (public_template.as_ptr(), public_template.count());
                let generate = |l: &MemberLibrary, m: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, _: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    let (public, private) = out.split_at_mut(1);
                    member_call!(
                        l,
                        C_GenerateKeyPair(m, mech, public_t, public_n, t, n, &mut public[0], &mut private[0])
                    )
                };
                let prints = [
                    made_print(&public_template, CKO_PUBLIC_KEY),
                    made_print(&private_template, CKO_PRIVATE_KEY),
                ];
                let made = v.make_on_one(handle, &mechanism, &[], &owners, &prints, "C_GenerateKeyPair", generate)?;
                if member_private.protects() {
                    v.group.objects.mark_protected(made[1], true);
                }
                // SAFETY: both output pointers are not null (checked above)
                // and writable.
                unsafe {
                    *public_key = made[0];
                    *private_key = made[1];
                }
                Ok(())
            }
        }
    }

    fn C_WrapKey(
        handle: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_PTR,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        wrapped: *mut CK_BYTE,
        wrapped_len: CK_ULONG_PTR,
    ) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        required(wrapped_len)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(wrapping_key, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
                p.reachable(key, CKR_KEY_HANDLE_INVALID)?;
                check(member_call!(
                    p.library,
                    C_WrapKey(p.handle, mechanism.as_ptr(), wrapping_key, key, wrapped, wrapped_len)
                ))
                .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                if v.group.objects.get(wrapping_key).is_none() {
                    return Err(Error::new(CKR_WRAPPING_KEY_HANDLE_INVALID));
                }
                v.refuse_if_protected(key)?;
                v.stateless(&[wrapping_key, key], "C_WrapKey", |l, m, h| {
                    member_call!(l, C_WrapKey(m, mechanism.as_ptr(), h[0], h[1], wrapped, wrapped_len))
                })
                .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
        }
    }

    fn C_UnwrapKey(
        handle: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_PTR,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: *mut CK_BYTE,
        wrapped_len: CK_ULONG,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        key: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        buffer(wrapped, wrapped_len)?;
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        required(key)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(unwrapping_key, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
                p.refuse_reserved_label(&template)?;
                check(member_call!(
                    p.library,
                    C_UnwrapKey(p.handle, mechanism.as_ptr(), unwrapping_key, wrapped, wrapped_len, template.as_ptr(), template.count(), key)
                ))
                .map_err(|e| e.as_key(CKR_UNWRAPPING_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                let (token, member_template) = (template.bool(CKA_TOKEN), MemberTemplate::for_new_key(&template));
                let (t, n) = (member_template.template().as_ptr(), member_template.template().count());
                let unwrap = |l: &MemberLibrary, m: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, h: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    member_call!(l, C_UnwrapKey(m, mech, h[0], wrapped, wrapped_len, t, n, &mut out[0]))
                };
                let prints = [made_print(&template, CKO_SECRET_KEY)];
                let made = v.make_on_one(handle, &mechanism, &[unwrapping_key], &[token], &prints, "C_UnwrapKey", unwrap)
                    .map_err(|e| e.as_key(CKR_UNWRAPPING_KEY_HANDLE_INVALID))?;
                // Imported material: never "never extractable".
                if member_template.protects() {
                    v.group.objects.mark_protected(made[0], false);
                }
                // SAFETY: `key` is not null (checked above) and writable.
                unsafe { *key = made[0] };
                Ok(())
            }
        }
    }

    fn C_DeriveKey(
        handle: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_PTR,
        base_key: CK_OBJECT_HANDLE,
        template: CK_ATTRIBUTE_PTR,
        count: CK_ULONG,
        key: CK_OBJECT_HANDLE_PTR,
    ) {
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(base_key, CKR_KEY_HANDLE_INVALID)?;
                for in_parameter in crate::mechanism::parameter_handles(&mechanism)? {
                    p.reachable(in_parameter, CKR_KEY_HANDLE_INVALID)?;
                }
                p.refuse_reserved_label(&template)?;
                check(member_call!(
                    p.library,
                    C_DeriveKey(p.handle, mechanism.as_ptr(), base_key, template.as_ptr(), template.count(), key)
                ))
                .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                // Some mechanisms (TLS key-and-MAC derivation) return their
                // keys inside the parameter and take no output handle.
                let owners: Vec<Option<bool>> = if key.is_null() {
                    Vec::new()
                } else {
                    vec![template.bool(CKA_TOKEN)]
                };
                let member_template = MemberTemplate::for_new_key(&template);
                let (t, n) = (member_template.template().as_ptr(), member_template.template().count());
                let derive = |l: &MemberLibrary, m: CK_SESSION_HANDLE, mech: CK_MECHANISM_PTR, h: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    let out_ptr = out.first_mut().map_or(std::ptr::null_mut(), |o| o as *mut _);
                    member_call!(l, C_DeriveKey(m, mech, h[0], t, n, out_ptr))
                };
                let prints: Vec<_> = owners.iter().map(|_| made_print(&template, CKO_SECRET_KEY)).collect();
                let made = v.make_on_one(handle, &mechanism, &[base_key], &owners, &prints, "C_DeriveKey", derive)
                    .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))?;
                if let Some(made) = made.first() {
                    if member_template.protects() {
                        v.group.objects.mark_protected(*made, false);
                    }
                    // SAFETY: a key was made only when `key` is not null
                    // (`owners` is empty otherwise); it is writable.
                    unsafe { *key = *made };
                }
                Ok(())
            }
        }
    }

    fn C_SeedRandom(handle: CK_SESSION_HANDLE, seed: *mut CK_BYTE, seed_len: CK_ULONG) {
        buffer(seed, seed_len)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(member_call!(p.library, C_SeedRandom(p.handle, seed, seed_len))),
            Target::Virtual(v) => v.stateless(&[], "C_SeedRandom", |l, m, _| member_call!(l, C_SeedRandom(m, seed, seed_len))),
        }
    }

    fn C_GenerateRandom(handle: CK_SESSION_HANDLE, random: *mut CK_BYTE, random_len: CK_ULONG) {
        buffer(random, random_len)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(member_call!(p.library, C_GenerateRandom(p.handle, random, random_len))),
            Target::Virtual(v) => v.stateless(&[], "C_GenerateRandom", |l, m, _| {
                member_call!(l, C_GenerateRandom(m, random, random_len))
            }),
        }
    }
}
