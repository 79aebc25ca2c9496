//! Cryptographic operations, key management and random numbers. On a
//! virtual slot an operation runs on the member chosen at its `*Init`.

use super::{buffer, cryptoki_fn, required, session};
use crate::arguments::{input as input_bytes, two_call_output, Template};
use crate::error::{check, Error};
use crate::mechanism::Mechanism;
use crate::member_api::{MemberApi, MemberBackend};
use crate::provider;
use crate::session::Target;
use crate::virtual_objects::{made_print, MemberTemplate};
use crate::virtual_session::{Input, OpKind, Step};
use cryptoki_sys::*;

/// `*Init` functions that take a mechanism and a key.
macro_rules! keyed_init {
    ($($name:ident => $kind:ident, $method:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) {
                // SAFETY: the application vouches for the mechanism it passes.
                let mechanism = unsafe { Mechanism::new(mechanism) }?;
                let s = session(handle)?;
                let done = match &s.target {
                    Target::PassThrough(p) => {
                        p.reachable(key, CKR_KEY_HANDLE_INVALID)?;
                        check(p.library.$method(p.handle, mechanism.as_raw(), key))
                            .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
                    }
                    Target::Virtual(v) => {
                        let on_member = |l: &dyn MemberBackend, m, k| l.$method(m, mechanism.as_raw(), k);
                        v.init(OpKind::$kind, Some(&mechanism), Some(key), stringify!($name), on_member)
                            .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
                    }
                };
                s.release();
                done
            }
        }
    )*};
}

/// Calls that take input and write output under the two-call convention.
/// `$finishes` says whether the call ends the operation.
macro_rules! in_out {
    ($($name:ident => $kind:ident, $method:ident, $finishes:expr);* $(;)?) => {$(
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
                let done = match &s.target {
                    Target::PassThrough(p) => {
                        // SAFETY: checked above; the application vouches
                        // for `input_len` bytes at `input` and room for
                        // `*output_len` at `output`.
                        let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                        check(p.library.$method(p.handle, input, output, output_len))
                    }
                    Target::Virtual(v) => v.step(OpKind::$kind, step, Input::None, stringify!($name), |l, m| {
                        // SAFETY: as for a pass-through session; the room
                        // is read again for each member asked.
                        let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                        l.$method(m, input, output, output_len)
                    }),
                };
                s.release();
                done
            }
        }
    )*};
}

/// Updates that take input only.
macro_rules! input_update {
    ($($name:ident => $kind:ident, $method:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, input: *mut CK_BYTE, input_len: CK_ULONG) {
                buffer(input, input_len)?;
                // SAFETY: checked above; the application vouches for
                // `input_len` bytes at `input`.
                let input = unsafe { input_bytes(input, input_len) };
                let s = session(handle)?;
                let done = match &s.target {
                    Target::PassThrough(p) => check(p.library.$method(p.handle, input)),
                    Target::Virtual(v) => {
                        if OpKind::$kind == OpKind::Digest {
                            v.start_pending_digest()?;
                        }
                        v.step(OpKind::$kind, Step::Update, Input::Data(input.unwrap_or_default()), stringify!($name), |l, m| {
                            l.$method(m, input)
                        })
                    }
                };
                s.release();
                done
            }
        }
    )*};
}

/// Finals that write output under the two-call convention.
macro_rules! output_final {
    ($($name:ident => $kind:ident, $method:ident),* $(,)?) => {$(
        cryptoki_fn! {
            fn $name(handle: CK_SESSION_HANDLE, output: *mut CK_BYTE, output_len: CK_ULONG_PTR) {
                required(output_len)?;
                let s = session(handle)?;
                let step = Step::Finish { length_query: output.is_null() };
                let done = match &s.target {
                    Target::PassThrough(p) => {
                        // SAFETY: `output_len` is not null (checked above);
                        // the application vouches for room for `*output_len`
                        // bytes at `output`.
                        let (output, output_len) = unsafe { two_call_output(output, output_len) };
                        check(p.library.$method(p.handle, output, output_len))
                    }
                    Target::Virtual(v) => {
                        if OpKind::$kind == OpKind::Digest {
                            v.start_pending_digest()?;
                        }
                        v.step(OpKind::$kind, step, Input::None, stringify!($name), |l, m| {
                            // SAFETY: as for a pass-through session; the
                            // room is read again for each member asked.
                            let (output, output_len) = unsafe { two_call_output(output, output_len) };
                            l.$method(m, output, output_len)
                        })
                    }
                };
                s.release();
                done
            }
        }
    )*};
}

keyed_init!(
    C_EncryptInit => Encrypt, encrypt_init,
    C_DecryptInit => Decrypt, decrypt_init,
    C_SignInit => Sign, sign_init,
    C_VerifyInit => Verify, verify_init,
    C_SignRecoverInit => SignRecover, sign_recover_init,
    C_VerifyRecoverInit => VerifyRecover, verify_recover_init,
);

in_out!(
    C_Encrypt => Encrypt, encrypt, true;
    C_Decrypt => Decrypt, decrypt, true;
    C_Sign => Sign, sign, true;
    C_SignRecover => SignRecover, sign_recover, true;
    C_VerifyRecover => VerifyRecover, verify_recover, true;
    C_EncryptUpdate => Encrypt, encrypt_update, false;
    C_DecryptUpdate => Decrypt, decrypt_update, false;
);

/// Dual-function updates: `$kind` is the operation that writes the
/// output; `$other` is fed through the same call, and its input is not
/// kept for replay.
macro_rules! dual_update {
    ($($name:ident => $kind:ident + $other:ident, $method:ident),* $(,)?) => {$(
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
                        // SAFETY: checked above; the application vouches
                        // for `input_len` bytes at `input` and room for
                        // `*output_len` at `output`.
                        let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                        check(p.library.$method(p.handle, input, output, output_len))
                    }
                    Target::Virtual(v) => {
                        if OpKind::$other == OpKind::Digest {
                            v.start_pending_digest()?;
                        }
                        let answer = v.step(OpKind::$kind, Step::Update, Input::None, stringify!($name), |l, m| {
                            // SAFETY: as for a pass-through session; the
                            // room is read again for each member asked.
                            let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                            l.$method(m, input, output, output_len)
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
    C_DigestEncryptUpdate => Encrypt + Digest, digest_encrypt_update,
    C_DecryptDigestUpdate => Decrypt + Digest, decrypt_digest_update,
    C_SignEncryptUpdate => Encrypt + Sign, sign_encrypt_update,
    C_DecryptVerifyUpdate => Decrypt + Verify, decrypt_verify_update,
);

input_update!(
    C_DigestUpdate => Digest, digest_update,
    C_SignUpdate => Sign, sign_update,
    C_VerifyUpdate => Verify, verify_update,
);

output_final!(
    C_EncryptFinal => Encrypt, encrypt_final,
    C_DecryptFinal => Decrypt, decrypt_final,
    C_DigestFinal => Digest, digest_final,
    C_SignFinal => Sign, sign_final,
);

cryptoki_fn! {
    fn C_DigestInit(handle: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR) {
        // A digest noted lazily reaches no member: the session from the
        // thread's cache, without its gate.
        // SAFETY: the application vouches for the mechanism it passes.
        if let Some(raw) = unsafe { mechanism.as_ref() } {
            let noted = provider::with_cached_session(handle, |s| match &s.target {
                Target::Virtual(v) => v.digest_init_lazily(raw),
                Target::PassThrough(_) => None,
            });
            if let Some(Some(done)) = noted {
                return done;
            }
        }
        // SAFETY: the application vouches for the mechanism it passes.
        let mechanism = unsafe { Mechanism::new(mechanism) }?;
        let s = session(handle)?;
        let done = match &s.target {
            Target::PassThrough(p) => check(p.library.digest_init(p.handle, mechanism.as_raw())),
            Target::Virtual(v) => match v.digest_init_lazily(mechanism.as_raw()) {
                Some(noted) => noted,
                None => {
                    let on_member = |l: &dyn MemberBackend, m, _| l.digest_init(m, mechanism.as_raw());
                    let started = v.init(OpKind::Digest, Some(&mechanism), None, "C_DigestInit", on_member);
                    if started.is_ok() {
                        v.digest_accepted(&mechanism);
                    }
                    started
                }
            },
        };
        s.release();
        done
    }

    fn C_Digest(
        handle: CK_SESSION_HANDLE,
        input: *mut CK_BYTE,
        input_len: CK_ULONG,
        output: *mut CK_BYTE,
        output_len: CK_ULONG_PTR,
    ) {
        buffer(input, input_len)?;
        required(output_len)?;
        let s = session(handle)?;
        let length_query = output.is_null();
        let done = match &s.target {
            Target::PassThrough(p) => {
                // SAFETY: checked above; the application vouches for
                // `input_len` bytes at `input` and room for `*output_len`
                // at `output`.
                let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                check(p.library.digest(p.handle, input, output, output_len))
            }
            Target::Virtual(v) => {
                let call = |l: &dyn MemberBackend, m| {
                    // SAFETY: as for a pass-through session; the room is
                    // read again for each member asked.
                    let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                    l.digest(m, input, output, output_len)
                };
                match v.take_pending_digest() {
                    Some(mechanism) => v.digest_at_once(mechanism, length_query, |l, m, mechanism, started| {
                        // SAFETY: as for a pass-through session; the room
                        // is read again for each member asked.
                        let (input, (output, output_len)) = unsafe { (input_bytes(input, input_len), two_call_output(output, output_len)) };
                        l.digest_init_and_digest(m, mechanism, started, input, output, output_len)
                    }),
                    None => v.step(OpKind::Digest, Step::Finish { length_query }, Input::None, "C_Digest", call),
                }
            }
        };
        s.release();
        done
    }

    fn C_DigestKey(handle: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) {
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(key, CKR_KEY_HANDLE_INVALID)?;
                check(p.library.digest_key(p.handle, key)).map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                v.start_pending_digest()?;
                v.digest_key(key).map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
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
        // SAFETY: checked above; the application vouches for the lengths.
        let (data, signature) = unsafe { (input_bytes(data, data_len), input_bytes(signature, signature_len)) };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.verify(p.handle, data, signature)),
            Target::Virtual(v) => v.step(OpKind::Verify, Step::Finish { length_query: false }, Input::None, "C_Verify", |l, m| {
                l.verify(m, data, signature)
            }),
        }
    }

    fn C_VerifyFinal(handle: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG) {
        buffer(signature, signature_len)?;
        // SAFETY: checked above; the application vouches for the length.
        let signature = unsafe { input_bytes(signature, signature_len) };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.verify_final(p.handle, signature)),
            Target::Virtual(v) => v.step(OpKind::Verify, Step::Finish { length_query: false }, Input::None, "C_VerifyFinal", |l, m| {
                l.verify_final(m, signature)
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
                // SAFETY: `key` is not null (checked above) and writable.
                let key = unsafe { &mut *key };
                check(p.library.generate_key(p.handle, mechanism.as_raw(), template.as_slice(), key))
            }
            Target::Virtual(v) => {
                let (token, member_template) = (template.bool(CKA_TOKEN), MemberTemplate::for_new_key(&template));
                let generate = |l: &dyn MemberBackend, m: CK_SESSION_HANDLE, mech: &CK_MECHANISM, _: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    l.generate_key(m, mech, member_template.template().as_slice(), &mut out[0])
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
                // SAFETY: both output pointers are not null (checked above)
                // and writable.
                let (public_key, private_key) = unsafe { (&mut *public_key, &mut *private_key) };
                check(p.library.generate_key_pair(
                    p.handle, mechanism.as_raw(), public_template.as_slice(), private_template.as_slice(), public_key, private_key,
                ))
            }
            Target::Virtual(v) => {
                let owners = [public_template.bool(CKA_TOKEN), private_template.bool(CKA_TOKEN)];
                let member_private = MemberTemplate::for_new_key(&private_template);
                let generate = |l: &dyn MemberBackend, m: CK_SESSION_HANDLE, mech: &CK_MECHANISM, _: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    let (public, private) = out.split_at_mut(1);
                    l.generate_key_pair(
                        m, mech, public_template.as_slice(), member_private.template().as_slice(), &mut public[0], &mut private[0],
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
                // SAFETY: `wrapped_len` is not null (checked above); the
                // application vouches for room for `*wrapped_len` bytes.
                let (wrapped, wrapped_len) = unsafe { two_call_output(wrapped, wrapped_len) };
                check(p.library.wrap_key(p.handle, mechanism.as_raw(), wrapping_key, key, wrapped, wrapped_len))
                .map_err(|e| e.as_key(CKR_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                if v.group.objects.get(wrapping_key).is_none() {
                    return Err(Error::new(CKR_WRAPPING_KEY_HANDLE_INVALID));
                }
                v.refuse_if_protected(key)?;
                v.stateless(&[wrapping_key, key], "C_WrapKey", |l, m, h| {
                    // SAFETY: as for a pass-through session; the room is
                    // read again for each member asked.
                    let (wrapped, wrapped_len) = unsafe { two_call_output(wrapped, wrapped_len) };
                    l.wrap_key(m, mechanism.as_raw(), h[0], h[1], wrapped, wrapped_len)
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
        // SAFETY: checked above; the application vouches for the length.
        let wrapped = unsafe { input_bytes(wrapped, wrapped_len) };
        // SAFETY: the application vouches for `count` attributes, their
        // values readable during its call.
        let template = unsafe { Template::giving_values(template, count) }?;
        required(key)?;
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => {
                p.reachable(unwrapping_key, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
                p.refuse_reserved_label(&template)?;
                // SAFETY: `key` is not null (checked above) and writable.
                let key = unsafe { &mut *key };
                check(p.library.unwrap_key(p.handle, mechanism.as_raw(), unwrapping_key, wrapped, template.as_slice(), key))
                .map_err(|e| e.as_key(CKR_UNWRAPPING_KEY_HANDLE_INVALID))
            }
            Target::Virtual(v) => {
                let (token, member_template) = (template.bool(CKA_TOKEN), MemberTemplate::for_new_key(&template));
                let unwrap = |l: &dyn MemberBackend, m: CK_SESSION_HANDLE, mech: &CK_MECHANISM, h: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    l.unwrap_key(m, mech, h[0], wrapped, member_template.template().as_slice(), &mut out[0])
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
                // SAFETY: the application vouches that `key`, when not
                // null, is writable.
                let key = unsafe { key.as_mut() };
                check(p.library.derive_key(p.handle, mechanism.as_raw(), base_key, template.as_slice(), key))
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
                let derive = |l: &dyn MemberBackend, m: CK_SESSION_HANDLE, mech: &CK_MECHANISM, h: &[CK_OBJECT_HANDLE], out: &mut [CK_OBJECT_HANDLE]| {
                    l.derive_key(m, mech, h[0], member_template.template().as_slice(), out.first_mut())
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
        // SAFETY: checked above; the application vouches for the length.
        let seed = unsafe { input_bytes(seed, seed_len) };
        let s = session(handle)?;
        match &s.target {
            Target::PassThrough(p) => check(p.library.seed_random(p.handle, seed)),
            Target::Virtual(v) => v.stateless(&[], "C_SeedRandom", |l, m, _| l.seed_random(m, seed)),
        }
    }

    fn C_GenerateRandom(handle: CK_SESSION_HANDLE, random: *mut CK_BYTE, random_len: CK_ULONG) {
        buffer(random, random_len)?;
        // SAFETY: checked above; the application vouches for `random_len`
        // writable bytes at `random`.
        let mut random = (!random.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(random, random_len as usize) });
        let s = session(handle)?;
        let done = match &s.target {
            Target::PassThrough(p) => check(p.library.generate_random(p.handle, random)),
            Target::Virtual(v) => v.stateless(&[], "C_GenerateRandom", |l, m, _| {
                l.generate_random(m, random.as_deref_mut())
            }),
        };
        s.release();
        done
    }
}
