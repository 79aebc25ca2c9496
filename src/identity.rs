//! How one object is recognised on another member: member handles differ,
//! so an object is found again by a fingerprint of attributes that are
//! public and bound to its content.
//!
//! Collisions: a fingerprint that matches more than one object on a member
//! identifies none of them; the object is then treated as absent there, and
//! that member does not serve operations on it. We never guess.

use crate::arguments::{AttributeQuery, AttributeRequest, Template};
use crate::member_api::MemberApi;
use cryptoki_sys::*;

/// Attributes that make up the fingerprint, where the object has them and
/// lets them be read. Secret values are never read: a sensitive
/// `CKA_VALUE` is simply unavailable and left out.
const FINGERPRINT: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_TOKEN,
    CKA_ID,
    CKA_LABEL,
    CKA_CHECK_VALUE,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_POINT,
    CKA_EC_PARAMS,
    CKA_SERIAL_NUMBER,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
];

/// The fingerprint without `CKA_CHECK_VALUE`, which costs a member that
/// keeps objects encrypted (SoftHSM) one more decryption per object: what
/// a search reads of every object it returns. It identifies an object
/// unless another has the same label, ID and type; then the full
/// fingerprint is read where the object is known.
const LIGHT_FINGERPRINT: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_CLASS,
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_TOKEN,
    CKA_ID,
    CKA_LABEL,
    CKA_MODULUS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_POINT,
    CKA_EC_PARAMS,
    CKA_SERIAL_NUMBER,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
];

/// Attributes whose value may be read for the fingerprint only when the
/// object is not sensitive (certificates, data objects, public keys).
const PUBLIC_VALUE: CK_ATTRIBUTE_TYPE = CKA_VALUE;

pub type Fingerprint = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

/// Reads the fingerprint of `object` through a member session;
/// `None` when the member cannot tell (it failed, or the handle is gone),
/// since an empty fingerprint would match every object.
pub fn fingerprint(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> Option<Fingerprint> {
    read_print(library, session, object, FINGERPRINT)
}

/// [`fingerprint`] of an object made from a template of a public class
/// (certificate, data object, public key) whose `CKA_VALUE` was
/// `value_len` bytes long: the value read in the same call as
/// the rest, in a room of that length -- one member call instead of three
/// (the rest, then the value's length and the value), which on a network
/// member is most of the latency of making such an object. Read as
/// [`fingerprint`] does where that answer is not certain: the value reads
/// unavailable (longer than its room or missing: the member's error for
/// another attribute, which the fingerprint asks of every class, may be
/// the one it returned), or the object is of another class after all (its
/// value is then never kept).
pub fn fingerprint_of_public(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    value_len: usize,
) -> Option<Fingerprint> {
    let read = with_scratch(|store| {
        let mut query = AttributeQuery::in_store(store);
        rooms(&mut query, FINGERPRINT);
        query.room(PUBLIC_VALUE, value_len);
        if !answered(library, session, object, &mut query) {
            return None;
        }
        if query.answered(query.len() - 1) == CK_UNAVAILABLE_INFORMATION {
            return None;
        }
        print_from(&query, 0).filter(holds_public_value)
    });
    read.or_else(|| fingerprint(library, session, object))
}

/// [`fingerprint`] without the check value (see [`LIGHT_FINGERPRINT`]).
pub fn light_fingerprint(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> Option<Fingerprint> {
    read_print(library, session, object, LIGHT_FINGERPRINT)
}

/// Attributes of which a print from a template needs one, besides class,
/// key type and `CKA_TOKEN`, to find one object rather than any of a kind.
const IDENTIFYING: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_ID,
    CKA_LABEL,
    CKA_MODULUS,
    CKA_EC_POINT,
    CKA_SERIAL_NUMBER,
    CKA_APPLICATION,
    CKA_OBJECT_ID,
    PUBLIC_VALUE,
];

/// Whether a fingerprint may name `attribute` by value whatever the
/// object's class: never a value that could be key material (a public
/// object's `CKA_VALUE` is in its fingerprint, a secret key's never).
pub fn in_fingerprint(attribute: CK_ATTRIBUTE_TYPE) -> bool {
    FINGERPRINT.contains(&attribute)
}

/// The fingerprint an object made from these template values has, as far
/// as the template says (the check value a member computes is left out):
/// to find a copy of an object whose making failed. `None` unless the
/// template names the class and identifies one object by ID, label or a
/// public value -- a print of a whole kind would find other objects.
pub fn print_of_template<'a>(
    values: impl Iterator<Item = (CK_ATTRIBUTE_TYPE, &'a [u8])> + Clone,
) -> Option<Fingerprint> {
    let class = values
        .clone()
        .find(|(t, _)| *t == CKA_CLASS)
        .map(|(_, v)| ulong_of(v))?;
    let public = class == CKO_CERTIFICATE || class == CKO_DATA || class == CKO_PUBLIC_KEY;
    let print: Fingerprint = values
        .filter(|(t, v)| {
            !v.is_empty()
                && *t != CKA_CHECK_VALUE
                && (FINGERPRINT.contains(t) || (public && *t == PUBLIC_VALUE))
        })
        .map(|(t, v)| (t, v.to_vec()))
        .collect();
    identifies_one(&print).then_some(print)
}

/// An object as the HA log names it: class, label and ID, from its
/// fingerprint -- never a value, which for a key would be key material.
pub fn describe(print: &Fingerprint) -> String {
    let value = |t: CK_ATTRIBUTE_TYPE| {
        print
            .iter()
            .find(|(a, v)| *a == t && !v.is_empty())
            .map(|(_, v)| v)
    };
    let class = match value(CKA_CLASS).map(|v| ulong_of(v)) {
        Some(CKO_DATA) => "data object".to_string(),
        Some(CKO_CERTIFICATE) => "certificate".to_string(),
        Some(CKO_PUBLIC_KEY) => "public key".to_string(),
        Some(CKO_PRIVATE_KEY) => "private key".to_string(),
        Some(CKO_SECRET_KEY) => "secret key".to_string(),
        Some(other) => format!("object of class 0x{other:X}"),
        None => "object".to_string(),
    };
    let label = value(CKA_LABEL).map_or("no label".to_string(), |l| {
        format!("label {:?}", String::from_utf8_lossy(l))
    });
    let id = value(CKA_ID).map_or("no ID".to_string(), |id| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        format!("ID {hex}")
    });
    format!("{class} ({label}, {id})")
}

/// The fingerprint of an object with fingerprint `print` once
/// `C_SetAttributeValue` has given it `values`: what finds it after the
/// change (a new `CKA_ID` or `CKA_LABEL`), without asking a member.
pub fn changed<'a>(
    print: &Fingerprint,
    values: impl Iterator<Item = (CK_ATTRIBUTE_TYPE, &'a [u8])>,
) -> Fingerprint {
    let mut changed = print.clone();
    let public = holds_public_value(print);
    let printed =
        |kind: CK_ATTRIBUTE_TYPE| FINGERPRINT.contains(&kind) || (public && kind == PUBLIC_VALUE);
    for (kind, value) in values.filter(|(kind, _)| printed(*kind)) {
        match changed.iter_mut().find(|(t, _)| *t == kind) {
            Some((_, kept)) => *kept = value.to_vec(),
            None => changed.push((kind, value.to_vec())),
        }
    }
    changed
}

/// Whether a fingerprint finds one object rather than any of a kind: it
/// holds a check value, or a value of [`IDENTIFYING`] (as a print of a
/// template must, [`print_of_template`]).
pub fn identifies_one(print: &Fingerprint) -> bool {
    has_check_value(print)
        || print
            .iter()
            .any(|(t, v)| IDENTIFYING.contains(t) && !v.is_empty())
}

/// Whether a fingerprint holds a check value (else it is a light one).
pub fn has_check_value(print: &Fingerprint) -> bool {
    print.iter().any(|(t, _)| *t == CKA_CHECK_VALUE)
}

fn read_print(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Option<Fingerprint> {
    let mut print = match read_in_one_call(library, session, object, types) {
        Some(print) => print,
        None => read_attributes(library, session, object, types)?,
    };
    // Without its class a fingerprint would match objects of any class.
    print.iter().find(|(t, _)| *t == CKA_CLASS)?;
    if holds_public_value(&print) {
        if let Some(value) = read_attribute(library, session, object, PUBLIC_VALUE) {
            print.push((PUBLIC_VALUE, value));
        }
    }
    Some(print)
}

/// Room for each fingerprint attribute in [`read_in_one_call`]: more than
/// any of them holds in practice (an RSA-16384 modulus is 2 KiB).
const ROOM: usize = 4096;

/// Fingerprint attributes an object of each class must have (PKCS#11 2.40
/// tables 4.x): if one of them reads unavailable in [`read_in_one_call`],
/// it may have been too long for its room rather than absent.
fn required(class: CK_OBJECT_CLASS, kind: Option<CK_ULONG>) -> &'static [CK_ATTRIBUTE_TYPE] {
    match (class, kind) {
        (CKO_SECRET_KEY, _) => &[CKA_KEY_TYPE, CKA_ID, CKA_LABEL],
        (CKO_PRIVATE_KEY | CKO_PUBLIC_KEY, Some(CKK_RSA)) => {
            &[CKA_KEY_TYPE, CKA_ID, CKA_LABEL, CKA_MODULUS]
        }
        (CKO_PRIVATE_KEY | CKO_PUBLIC_KEY, Some(CKK_EC)) => {
            &[CKA_KEY_TYPE, CKA_ID, CKA_LABEL, CKA_EC_PARAMS]
        }
        (CKO_PRIVATE_KEY | CKO_PUBLIC_KEY, _) => &[CKA_KEY_TYPE, CKA_ID, CKA_LABEL],
        (CKO_CERTIFICATE, Some(CKC_X_509)) => &[CKA_ID, CKA_LABEL, CKA_SERIAL_NUMBER],
        (CKO_CERTIFICATE, _) => &[CKA_LABEL],
        (CKO_DATA, _) => &[CKA_LABEL, CKA_APPLICATION, CKA_OBJECT_ID],
        _ => &[CKA_LABEL],
    }
}

thread_local! {
    /// Where [`read_in_one_call`] has the member write, reused.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `read` with this thread's [`SCRATCH`] for a query's rooms, or a
/// fresh buffer where a read on this thread holds it already (a member
/// that calls back into us during the call, as the simulation's hooks do).
fn with_scratch<T>(read: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut kept) => read(&mut kept),
        Err(_) => read(&mut Vec::new()),
    })
}

/// The fingerprint attributes read in one call, each into room enough for
/// any value it holds in practice -- half the calls of asking the lengths
/// first, which matters when a search returns thousands of objects. `None`
/// when the answer is not certain (an attribute the object's class must
/// have reads unavailable: it may be longer than its room), so that the
/// caller asks the lengths after all.
fn read_in_one_call(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Option<Fingerprint> {
    with_scratch(|store| {
        let mut query = AttributeQuery::in_store(store);
        rooms(&mut query, types);
        if !answered(library, session, object, &mut query) {
            return None;
        }
        print_from(&query, 0)
    })
}

/// Asks `types` of `query`, each into a room of [`ROOM`] bytes.
fn rooms(query: &mut AttributeQuery, types: &[CK_ATTRIBUTE_TYPE]) {
    for t in types {
        query.room(*t, ROOM);
    }
}

/// The fingerprint a member wrote into the [`rooms`] of `query` from
/// attribute `from` on; `None` when it is not certain (see
/// [`read_in_one_call`]).
fn print_from(query: &AttributeQuery, from: usize) -> Option<Fingerprint> {
    let print: Fingerprint = (from..query.len())
        .filter_map(|i| query.value(i).map(|v| (query.kind(i), v.to_vec())))
        .collect();
    let ulong = |t: CK_ATTRIBUTE_TYPE| {
        print
            .iter()
            .find(|(pt, _)| *pt == t)
            .map(|(_, v)| ulong_of(v))
    };
    let class = ulong(CKA_CLASS)?;
    let kind = ulong(CKA_KEY_TYPE).or(ulong(CKA_CERTIFICATE_TYPE));
    let certain = required(class, kind)
        .iter()
        .all(|t| print.iter().any(|(pt, _)| pt == t));
    certain.then_some(print)
}

/// Answers an application's `C_GetAttributeValue` of `object` and reads
/// the object's light fingerprint in the same member call, so that an
/// application reading each object it found (a keystore load) identifies
/// them at no extra call. Returns the member's answer to the application's
/// attributes alone, and the fingerprint where it is certain and complete
/// (objects whose fingerprint holds their public value are left to
/// [`light_fingerprint`]).
///
/// The specification has a library answer every attribute even when it
/// returns `CKR_ATTRIBUTE_SENSITIVE`, `CKR_ATTRIBUTE_TYPE_INVALID` or
/// `CKR_BUFFER_TOO_SMALL`; which of those the application's attributes
/// alone would have caused cannot be told apart, so where one of them
/// reads unavailable its call is made again alone.
pub fn read_along(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    request: &mut AttributeRequest,
) -> (CK_RV, Option<Fingerprint>) {
    let combined = with_scratch(|store| {
        let mut query = AttributeQuery::in_store(store);
        query.asked(request, |_| true);
        let asked = request.kinds().count();
        rooms(&mut query, LIGHT_FINGERPRINT);
        let rv = library.get_attribute_value(session, object, Some(query.as_mut_slice()));
        let fits = |i: usize| {
            let len = query.answered(i);
            len != CK_UNAVAILABLE_INFORMATION && request.room(i).is_none_or(|room| len <= room)
        };
        match rv {
            CKR_OK => {}
            CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID | CKR_BUFFER_TOO_SMALL
                if (0..asked).all(fits) => {}
            CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID | CKR_BUFFER_TOO_SMALL => {
                return None
            }
            rv => return Some((rv, None, Vec::new())),
        }
        let lengths: Vec<CK_ULONG> = (0..asked).map(|i| query.answered(i)).collect();
        let print = print_from(&query, asked).filter(|print| !holds_public_value(print));
        Some((CKR_OK, print, lengths))
    });
    let combined = combined.map(|(rv, print, lengths)| {
        for (i, len) in lengths.into_iter().enumerate() {
            request.set_len(i, len);
        }
        (rv, print)
    });
    combined.unwrap_or_else(|| {
        let rv = library.get_attribute_value(session, object, request.as_mut_slice());
        (rv, None)
    })
}

/// The class a fingerprint names, if it names one.
pub fn class_in(print: &Fingerprint) -> Option<CK_OBJECT_CLASS> {
    print
        .iter()
        .find(|(t, _)| *t == CKA_CLASS)
        .map(|(_, v)| ulong_of(v))
}

/// Whether a fingerprint names a key class: secret or private.
pub fn names_a_key(print: &Fingerprint) -> bool {
    matches!(class_in(print), Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY))
}

/// Whether an object of this fingerprint's class has its public value in
/// its fingerprint (see [`read_print`]).
fn holds_public_value(print: &Fingerprint) -> bool {
    matches!(
        class_in(print),
        Some(CKO_CERTIFICATE | CKO_DATA | CKO_PUBLIC_KEY)
    )
}

/// One `C_GetAttributeValue` of `query`; true when the library answered
/// each attribute (the specification has it answer all of them even when
/// some are missing or sensitive).
fn answered(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    query: &mut AttributeQuery,
) -> bool {
    let rv = library.get_attribute_value(session, object, Some(query.as_mut_slice()));
    matches!(
        rv,
        CKR_OK | CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID
    )
}

/// Attribute values, and the types of array attributes that hold a
/// non-empty value.
pub type ValuesAndArrays = (Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>, Vec<CK_ATTRIBUTE_TYPE>);

/// [`read_attributes`] of `types` and [`present_arrays`] of `arrays` in one
/// call, each value into a room of [`ROOM`] bytes: a quarter of the calls
/// when a replica's template is read for every key made. An attribute that
/// reads unavailable may also be one longer than its room (a library
/// reports one error of several), so those are asked their lengths again.
/// `None` when the answer is not certain (one of those has a length, or a
/// length fills its room: an attribute the library may have left
/// untouched); the caller then asks the slow way.
pub fn read_in_rooms(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
    arrays: &[CK_ATTRIBUTE_TYPE],
) -> Option<ValuesAndArrays> {
    let (values, present, unavailable) = with_scratch(|store| {
        let mut query = AttributeQuery::in_store(store);
        rooms(&mut query, types);
        for t in arrays {
            query.length(*t, UNANSWERED);
        }
        let rv = library.get_attribute_value(session, object, Some(query.as_mut_slice()));
        if !matches!(
            rv,
            CKR_OK | CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID
        ) {
            return None;
        }
        let mut present = Vec::new();
        for i in types.len()..query.len() {
            match query.answered(i) {
                UNANSWERED => return None,
                0 | CK_UNAVAILABLE_INFORMATION => {}
                _ => present.push(query.kind(i)),
            }
        }
        let mut values = Vec::with_capacity(types.len());
        let mut unavailable = Vec::new();
        for i in 0..types.len() {
            match (query.answered(i), query.value(i)) {
                (CK_UNAVAILABLE_INFORMATION, _) => unavailable.push(query.kind(i)),
                (len, Some(value)) if (len as usize) < ROOM => {
                    values.push((query.kind(i), value.to_vec()))
                }
                _ => return None,
            }
        }
        Some((values, present, unavailable))
    })?;
    if unavailable.is_empty() {
        return Some((values, present));
    }
    let mut lengths = AttributeQuery::new();
    for t in &unavailable {
        lengths.length(*t, UNANSWERED);
    }
    if !answered(library, session, object, &mut lengths) {
        return None;
    }
    if (0..lengths.len()).all(|i| lengths.answered(i) == CK_UNAVAILABLE_INFORMATION) {
        return Some((values, present));
    }
    // Longer than its room, or left unanswered: the slow way keeps order.
    None
}

/// Marks an attribute the library left untouched in a batched read.
const UNANSWERED: CK_ULONG = CK_UNAVAILABLE_INFORMATION - 1;

/// The values of `types` the object has and lets be read, in that order:
/// first in one call, each into room enough for any value it holds in
/// practice (see [`read_in_rooms`]); where that is not certain, asked in one
/// call for the lengths and one for the values (the specification has a
/// library answer every attribute even when some are missing or
/// sensitive). Attributes a library leaves unanswered are read one by one.
/// `None` when the object cannot be read at all.
pub fn read_attributes(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Option<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    if let Some((values, _)) = read_in_rooms(library, session, object, types, &[]) {
        return Some(values);
    }
    let mut query = AttributeQuery::new();
    for t in types {
        query.length(*t, UNANSWERED);
    }
    if !answered(library, session, object, &mut query) {
        return None;
    }
    let mut values: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> = Vec::with_capacity(types.len());
    let mut wanted = AttributeQuery::new();
    for i in 0..query.len() {
        let t = query.kind(i);
        match query.answered(i) {
            CK_UNAVAILABLE_INFORMATION => {}
            UNANSWERED => {
                if let Some(v) = read_attribute(library, session, object, t) {
                    values.push((t, v));
                }
            }
            len => values.push((t, vec![0u8; len as usize])),
        }
    }
    for (t, v) in values.iter().filter(|(_, v)| !v.is_empty()) {
        wanted.room(*t, v.len());
    }
    if !wanted.is_empty() {
        let rv = library.get_attribute_value(session, object, Some(wanted.as_mut_slice()));
        let complete = rv == CKR_OK && (0..wanted.len()).all(|i| wanted.value(i).is_some());
        if !complete {
            // Changed between the two calls: ask each attribute on its own.
            return Some(
                types
                    .iter()
                    .filter_map(|t| read_attribute(library, session, object, *t).map(|v| (*t, v)))
                    .collect(),
            );
        }
        let answers = (0..wanted.len()).filter_map(|i| wanted.value(i));
        for ((_, v), answer) in values
            .iter_mut()
            .filter(|(_, v)| !v.is_empty())
            .zip(answers)
        {
            *v = answer.to_vec();
        }
    }
    let order = |t: &CK_ATTRIBUTE_TYPE| types.iter().position(|x| x == t);
    values.sort_by_key(|(t, _)| order(t));
    Some(values)
}

/// Whether two fingerprints may be of one object: they agree on every
/// attribute both name (a check value where both have one). Two reads of
/// one object's fingerprint -- from its template, from one copy or
/// another -- always do.
pub fn agree(a: &Fingerprint, b: &Fingerprint) -> bool {
    a.iter().all(|(t, v)| {
        b.iter().find(|(u, _)| u == t).is_none_or(|(_, w)| {
            w == v || (*t == CKA_CHECK_VALUE && (v.is_empty() || w.is_empty()))
        })
    })
}

/// Whether a search for `print` (as [`find`] makes it) finds an object
/// whose own fingerprint is `candidate`: the object has every attribute of
/// `print` with the same value, and a check value counts only where both
/// have a non-empty one.
pub fn matches(print: &Fingerprint, candidate: &Fingerprint) -> bool {
    print.iter().all(|(t, v)| {
        let theirs = candidate.iter().find(|(ct, _)| ct == t).map(|(_, cv)| cv);
        if *t == CKA_CHECK_VALUE {
            v.is_empty() || theirs.is_none_or(|cv| cv.is_empty() || cv == v)
        } else {
            theirs == Some(v)
        }
    })
}

/// The objects on a member whose attributes match `fingerprint`. A check
/// value matches where both sides have one: SoftHSM computes none for a
/// key it unwrapped, so a copy may lack what its original has.
pub fn find(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    fingerprint: &Fingerprint,
) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
    let check_value = fingerprint
        .iter()
        .find(|(t, v)| *t == CKA_CHECK_VALUE && !v.is_empty())
        .map(|(_, v)| v);
    let found = find_matching(library, session, fingerprint)?;
    Ok(match check_value {
        None => found,
        Some(expected) => found
            .into_iter()
            .filter(|h| {
                read_attribute(library, session, *h, CKA_CHECK_VALUE)
                    .is_none_or(|v| v.is_empty() || v == *expected)
            })
            .collect(),
    })
}

fn find_matching(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    fingerprint: &Fingerprint,
) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
    let template: Template = fingerprint
        .iter()
        .filter(|(t, _)| *t != CKA_CHECK_VALUE)
        .map(|(t, v)| (*t, v.as_slice()))
        .collect();
    let rv = library.find_objects_init(session, template.as_slice());
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut found = Vec::new();
    let mut batch = [0 as CK_OBJECT_HANDLE; 128];
    let outcome = loop {
        let mut count: CK_ULONG = 0;
        let rv = library.find_objects(session, Some(&mut batch), &mut count);
        if rv != CKR_OK {
            break Err(rv);
        }
        if count == 0 {
            break Ok(());
        }
        found.extend_from_slice(&batch[..count as usize]);
    };
    library.find_objects_final(session);
    outcome.map(|()| found)
}

/// An attribute whose value is itself a template (`CKA_WRAP_TEMPLATE`,
/// `CKA_UNWRAP_TEMPLATE`, `CKA_DERIVE_TEMPLATE`), read in the three calls
/// PKCS#11 2.40 prescribes for arrays: the count, each value's length, the
/// values. `None` where the object has none.
pub fn read_nested(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    attribute: CK_ATTRIBUTE_TYPE,
) -> Option<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
    let size = std::mem::size_of::<CK_ATTRIBUTE>();
    let mut outer = AttributeQuery::new();
    outer.length(attribute, 0);
    let rv = library.get_attribute_value(session, object, Some(outer.as_mut_slice()));
    let len = outer.answered(0) as usize;
    if rv != CKR_OK || outer.answered(0) == CK_UNAVAILABLE_INFORMATION || len % size != 0 {
        return None;
    }
    if len == 0 {
        return Some(Vec::new());
    }
    let mut kinds = AttributeQuery::new();
    kinds.nested(attribute, &vec![(0, None); len / size]);
    let rv = library.get_attribute_value(session, object, Some(kinds.as_mut_slice()));
    if rv != CKR_OK {
        return None;
    }
    let lengths = kinds.nested_lengths(0);
    if lengths
        .iter()
        .any(|(_, len)| *len == CK_UNAVAILABLE_INFORMATION)
    {
        return None;
    }
    let rooms: Vec<_> = lengths
        .into_iter()
        .map(|(t, len)| (t, Some(len as usize)))
        .collect();
    let mut values = AttributeQuery::new();
    values.nested(attribute, &rooms);
    let rv = library.get_attribute_value(session, object, Some(values.as_mut_slice()));
    if rv != CKR_OK {
        return None;
    }
    values.nested_values(0)
}

/// Which of `types` (array attributes) the object has with a non-empty
/// value, asked in one call.
pub fn present_arrays(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    types: &[CK_ATTRIBUTE_TYPE],
) -> Vec<CK_ATTRIBUTE_TYPE> {
    let mut query = AttributeQuery::new();
    for t in types {
        query.length(*t, 0);
    }
    if !answered(library, session, object, &mut query) {
        return types.to_vec();
    }
    (0..query.len())
        .filter(|i| !matches!(query.answered(*i), 0 | CK_UNAVAILABLE_INFORMATION))
        .map(|i| query.kind(i))
        .collect()
}

/// One attribute's value, or `None` where the object lacks it or hides it.
pub fn read_attribute(
    library: &(impl MemberApi + ?Sized),
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    attribute: CK_ATTRIBUTE_TYPE,
) -> Option<Vec<u8>> {
    let mut length = AttributeQuery::new();
    length.length(attribute, 0);
    let rv = library.get_attribute_value(session, object, Some(length.as_mut_slice()));
    if rv != CKR_OK || length.answered(0) == CK_UNAVAILABLE_INFORMATION {
        return None;
    }
    let mut value = AttributeQuery::new();
    value.room(attribute, length.answered(0) as usize);
    let rv = library.get_attribute_value(session, object, Some(value.as_mut_slice()));
    if rv != CKR_OK {
        return None;
    }
    value.value(0).map(<[u8]>::to_vec)
}

/// A `CK_ULONG` attribute value from its bytes.
pub fn ulong_of(bytes: &[u8]) -> CK_ULONG {
    let mut raw = [0u8; std::mem::size_of::<CK_ULONG>()];
    let n = bytes.len().min(raw.len());
    raw[..n].copy_from_slice(&bytes[..n]);
    CK_ULONG::from_ne_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_by_class_label_and_id_only() {
        let print: Fingerprint = vec![
            (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec()),
            (CKA_LABEL, b"db key".to_vec()),
            (CKA_ID, vec![0x6b, 0x01]),
            (CKA_CHECK_VALUE, vec![0xaa, 0xbb, 0xcc]),
        ];
        assert_eq!(describe(&print), "secret key (label \"db key\", ID 6b01)");
        let bare: Fingerprint = vec![
            (CKA_CLASS, CKO_DATA.to_ne_bytes().to_vec()),
            (CKA_LABEL, Vec::new()),
        ];
        assert_eq!(describe(&bare), "data object (no label, no ID)");
    }

    #[test]
    fn a_changed_print_takes_the_new_values_of_its_own_attributes_only() {
        let print: Fingerprint = vec![
            (CKA_CLASS, CKO_DATA.to_ne_bytes().to_vec()),
            (CKA_LABEL, b"d".to_vec()),
            (CKA_ID, b"old".to_vec()),
            (CKA_VALUE, b"v1".to_vec()),
        ];
        let yes = [CK_TRUE];
        let values = [
            (CKA_ID, b"new".as_slice()),
            (CKA_VALUE, b"v2".as_slice()),
            (CKA_APPLICATION, b"app".as_slice()),
            (CKA_MODIFIABLE, yes.as_slice()),
        ];
        assert_eq!(
            changed(&print, values.into_iter()),
            vec![
                (CKA_CLASS, CKO_DATA.to_ne_bytes().to_vec()),
                (CKA_LABEL, b"d".to_vec()),
                (CKA_ID, b"new".to_vec()),
                (CKA_VALUE, b"v2".to_vec()),
                (CKA_APPLICATION, b"app".to_vec()),
            ]
        );
        let key: Fingerprint = vec![(CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec())];
        let secret = [(CKA_VALUE, b"never".as_slice())];
        assert_eq!(changed(&key, secret.into_iter()), key);
    }

    #[test]
    fn a_template_print_identifies_one_object_and_never_holds_a_secret() {
        let ulong = |v: CK_ULONG| v.to_ne_bytes().to_vec();
        let (secret, key_type, yes) = (ulong(CKO_SECRET_KEY), ulong(CKK_AES), vec![CK_TRUE]);
        let value = vec![7u8; 16];
        let id = b"k1".to_vec();
        let mut template = vec![
            (CKA_CLASS, secret.as_slice()),
            (CKA_KEY_TYPE, key_type.as_slice()),
            (CKA_TOKEN, yes.as_slice()),
            (CKA_VALUE, value.as_slice()),
        ];
        assert_eq!(
            print_of_template(template.iter().copied()),
            None,
            "a kind, not one object"
        );
        template.push((CKA_ID, id.as_slice()));
        let print = print_of_template(template.iter().copied()).unwrap();
        assert_eq!(
            print,
            vec![
                (CKA_CLASS, secret.clone()),
                (CKA_KEY_TYPE, key_type),
                (CKA_TOKEN, yes),
                (CKA_ID, id),
            ],
            "a secret key's value stays out"
        );
        let data = ulong(CKO_DATA);
        let public = [(CKA_CLASS, data.as_slice()), (CKA_VALUE, value.as_slice())];
        assert_eq!(
            print_of_template(public.iter().copied()),
            Some(vec![(CKA_CLASS, data.clone()), (CKA_VALUE, value.clone())]),
            "a public value identifies"
        );
    }

    #[test]
    fn matching_follows_find() {
        let print: Fingerprint = vec![
            (CKA_CLASS, vec![4]),
            (CKA_ID, b"k1".to_vec()),
            (CKA_CHECK_VALUE, vec![1, 2, 3]),
        ];
        let same = print.clone();
        let more = [print.clone(), vec![(CKA_LABEL, b"x".to_vec())]].concat();
        let unwrapped: Fingerprint = print[..2].to_vec();
        let other_check: Fingerprint =
            [print[..2].to_vec(), vec![(CKA_CHECK_VALUE, vec![9])]].concat();
        let other_id: Fingerprint = vec![(CKA_CLASS, vec![4]), (CKA_ID, b"k2".to_vec())];
        assert!(matches(&print, &same));
        assert!(matches(&print, &more), "extra attributes do not matter");
        assert!(matches(&print, &unwrapped), "a copy without a check value");
        assert!(!matches(&print, &other_check));
        assert!(!matches(&print, &other_id));
        assert!(!matches(&more, &print), "a missing attribute does");
    }
}
