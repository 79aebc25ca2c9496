//! The application's arguments as Rust values: templates, attribute
//! requests, mechanisms and output buffers, each checked once where
//! `ffi/` takes it from C and borrowed for that C call. The core reads them
//! through these types alone, and hands them to a member as slices
//! ([`crate::member_api`], the one place that makes C pointers of them
//! again).

use crate::error::{Error, Result};
use cryptoki_sys::*;
use std::borrow::Cow;

/// The most attributes one template may hold; a larger count is a corrupt
/// value, and following it would read far past the application's array.
const MAX_TEMPLATE_COUNT: CK_ULONG = 1 << 12;
/// The longest attribute value accepted in a template, far beyond any
/// token's object size: a longer one is a corrupt length that SoftHSM
/// `exit`s on.
const MAX_ATTRIBUTE_LEN: CK_ULONG = 1 << 24;
/// How deep templates may nest in a template (`CKA_UNWRAP_TEMPLATE` and
/// the like, inside one another).
const MAX_NESTING: u8 = 2;

/// `CKR_ARGUMENTS_BAD` for a null pointer the function cannot do without.
pub fn required<T>(pointer: *const T) -> Result<()> {
    if pointer.is_null() {
        Err(Error::new(CKR_ARGUMENTS_BAD))
    } else {
        Ok(())
    }
}

/// `CKR_ARGUMENTS_BAD` for a null buffer that claims a length.
pub fn buffer<T>(pointer: *const T, len: CK_ULONG) -> Result<()> {
    if pointer.is_null() && len != 0 {
        Err(Error::new(CKR_ARGUMENTS_BAD))
    } else {
        Ok(())
    }
}

/// The application's input bytes as a member call takes them: `None` for
/// its NULL (which [`buffer`] allows with a zero length only).
///
/// # Safety
/// `data`, when not null, must be readable for `len` bytes during `'a`.
#[inline(always)]
pub unsafe fn input<'a>(data: *const CK_BYTE, len: CK_ULONG) -> Option<&'a [u8]> {
    // SAFETY: not null; the caller vouches for `len` bytes.
    (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts(data, len as usize) })
}

/// The application's output under the two-call convention as a member
/// call takes it: its buffer (`None` for NULL, a length query) with room
/// for `*len` bytes as `len` says now, and `len` itself.
///
/// # Safety
/// `len` must be writable and `data`, when not null, writable for `*len`
/// bytes during `'a`.
#[inline(always)]
pub unsafe fn two_call_output<'a>(
    data: *mut CK_BYTE,
    len: *mut CK_ULONG,
) -> (Option<&'a mut [u8]>, &'a mut CK_ULONG) {
    // SAFETY: as the caller vouches.
    let len = unsafe { &mut *len };
    // SAFETY: not null; the caller vouches for `*len` bytes.
    let data =
        (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(data, *len as usize) });
    (data, len)
}

/// An attribute template whose values are read, not written: checked once
/// (see [`Template::giving_values`]), then read safely. Borrowed from the
/// application for its call, or made from one by leaving attributes out or
/// adding fixed ones ([`TemplateBuilder`]).
pub struct Template<'a> {
    attributes: Cow<'a, [CK_ATTRIBUTE]>,
    /// Rewritten nested templates that `attributes` points into.
    _nested: Vec<Template<'a>>,
    /// The application passed a null template (with no attributes): a
    /// member gets null too, as it would have without us.
    absent: bool,
}

// SAFETY: a template only reads the values it points to -- the
// application's, for its call, or its own nested templates' -- which stay
// valid and unchanged for `'a`; nothing writes through it. So threads may
// read one at once (an object made on several members at once).
unsafe impl Sync for Template<'_> {}

/// One attribute of a [`Template`], its value readable for as long as the
/// template is borrowed.
#[derive(Clone, Copy)]
pub struct Attribute<'t>(&'t CK_ATTRIBUTE);

impl<'t> Attribute<'t> {
    pub fn kind(&self) -> CK_ATTRIBUTE_TYPE {
        self.0.type_
    }

    /// The value; `None` for a null value (which has no length).
    pub fn value(&self) -> Option<&'t [u8]> {
        if self.0.pValue.is_null() {
            return None;
        }
        // SAFETY: an `Attribute` comes only from a `Template`, whose values
        // are readable for their lengths while it is borrowed.
        Some(unsafe {
            std::slice::from_raw_parts(self.0.pValue as *const u8, self.0.ulValueLen as usize)
        })
    }

    /// The `CK_BBOOL` value, if the value is one.
    pub fn bool(&self) -> Option<bool> {
        self.value().and_then(bool_of)
    }

    /// The template this attribute's value holds, if it is a well-formed
    /// nested one (`CKA_UNWRAP_TEMPLATE` and the like).
    pub fn nested(&self) -> Option<Template<'t>> {
        self.nested_slice().map(Template::from_checked)
    }

    /// The attributes of [`Attribute::nested`], borrowed as long as this one.
    pub fn nested_attributes(&self) -> Option<impl Iterator<Item = Attribute<'t>> + Clone> {
        self.nested_slice().map(|inner| inner.iter().map(Attribute))
    }

    fn nested_slice(&self) -> Option<&'t [CK_ATTRIBUTE]> {
        let size = std::mem::size_of::<CK_ATTRIBUTE>();
        let len = self.0.ulValueLen as usize;
        if !is_nested(self.0.type_) || self.0.pValue.is_null() || len % size != 0 {
            return None;
        }
        // SAFETY: a nested template's values were checked with the
        // template's own (`check_values`), or it was built of checked
        // attributes ([`TemplateBuilder::push_nested`]), and is readable as
        // long as they are.
        Some(unsafe {
            std::slice::from_raw_parts(self.0.pValue as *const CK_ATTRIBUTE, len / size)
        })
    }
}

fn is_nested(kind: CK_ATTRIBUTE_TYPE) -> bool {
    matches!(
        kind,
        CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE | CKA_DERIVE_TEMPLATE
    )
}

static TRUE: CK_BBOOL = CK_TRUE;
static FALSE: CK_BBOOL = CK_FALSE;

impl<'a> Template<'a> {
    /// The application's template of a call that gives values (creates,
    /// sets or searches): a NULL template with a count, or more than 4096
    /// attributes, is `CKR_ARGUMENTS_BAD`; a NULL value with a length, or an
    /// absurd length, is `CKR_ATTRIBUTE_VALUE_INVALID` before any member
    /// reads it; nested templates are checked the same way.
    ///
    /// # Safety
    /// `template`, when not null, must point to `count` attributes whose
    /// values are readable for their lengths during `'a`.
    pub unsafe fn giving_values(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<Self> {
        buffer(template, count)?;
        if count > MAX_TEMPLATE_COUNT {
            return Err(Error::new(CKR_ARGUMENTS_BAD));
        }
        if template.is_null() {
            return Ok(Template::absent());
        }
        // SAFETY: not null; the caller vouches for `count` attributes.
        let attributes = unsafe { std::slice::from_raw_parts(template, count as usize) };
        // SAFETY: the caller vouches for the values.
        unsafe { check_values(attributes, MAX_NESTING) }?;
        Ok(Template::from_checked(attributes))
    }

    /// The application's NULL template (with no attributes).
    pub fn absent() -> Template<'static> {
        Template {
            attributes: Cow::Borrowed(&[]),
            _nested: Vec::new(),
            absent: true,
        }
    }

    fn from_checked(attributes: &'a [CK_ATTRIBUTE]) -> Self {
        Template {
            attributes: Cow::Borrowed(attributes),
            _nested: Vec::new(),
            absent: false,
        }
    }

    /// The same template, borrowed again.
    pub fn reborrow(&self) -> Template<'_> {
        Template {
            attributes: Cow::Borrowed(&self.attributes),
            _nested: Vec::new(),
            absent: self.absent,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Attribute<'_>> + Clone {
        self.attributes.iter().map(Attribute)
    }

    pub fn len(&self) -> usize {
        self.attributes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty()
    }

    /// The attributes with their values, a null value as an empty one.
    pub fn values(&self) -> impl Iterator<Item = (CK_ATTRIBUTE_TYPE, &[u8])> + Clone {
        self.iter()
            .map(|a| (a.kind(), a.value().unwrap_or_default()))
    }

    /// The `CK_BBOOL` value of `attribute`, if present.
    pub fn bool(&self, attribute: CK_ATTRIBUTE_TYPE) -> Option<bool> {
        self.iter()
            .filter(|a| a.kind() == attribute)
            .find_map(|a| a.bool())
    }

    /// The `CK_ULONG` value of `attribute`, if present.
    pub fn ulong(&self, attribute: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        self.iter()
            .filter(|a| a.kind() == attribute)
            .find_map(|a| a.value().and_then(ulong_of))
    }

    /// The attributes but those of the types in `left_out`.
    pub fn without(&self, left_out: &[CK_ATTRIBUTE_TYPE]) -> Template<'_> {
        let mut kept = TemplateBuilder::with_capacity(self.len());
        for a in self.iter().filter(|a| !left_out.contains(&a.kind())) {
            kept.push(a);
        }
        kept.build()
    }

    pub fn count(&self) -> CK_ULONG {
        self.attributes.len() as CK_ULONG
    }

    /// The template as a member call takes it; the application's null
    /// stays `None`.
    pub fn as_slice(&self) -> Option<&[CK_ATTRIBUTE]> {
        (!self.absent).then_some(&self.attributes[..])
    }
}

/// A template of values the core holds (a fingerprint to search for, a
/// template read from one member for another), borrowed for as long as
/// the template is used.
impl<'t> FromIterator<(CK_ATTRIBUTE_TYPE, &'t [u8])> for Template<'t> {
    fn from_iter<I: IntoIterator<Item = (CK_ATTRIBUTE_TYPE, &'t [u8])>>(values: I) -> Self {
        let mut built = TemplateBuilder::with_capacity(0);
        for (kind, value) in values {
            built.push_value(kind, value);
        }
        built.build()
    }
}

/// A `CK_BBOOL` value: exactly one byte.
fn bool_of(value: &[u8]) -> Option<bool> {
    match value {
        [byte] => Some(*byte != CK_FALSE),
        _ => None,
    }
}

/// A `CK_ULONG` value: exactly its size.
fn ulong_of(value: &[u8]) -> Option<CK_ULONG> {
    value.try_into().ok().map(CK_ULONG::from_ne_bytes)
}

/// Checks the values of `attributes` for [`Template::giving_values`],
/// nested templates down to `depth` more levels.
///
/// # Safety
/// Each attribute's value must be readable for its length (or be null).
unsafe fn check_values(attributes: &[CK_ATTRIBUTE], depth: u8) -> Result<()> {
    let invalid = Error::new(CKR_ATTRIBUTE_VALUE_INVALID);
    for attribute in attributes {
        let len = attribute.ulValueLen;
        if (attribute.pValue.is_null() && len != 0) || len > MAX_ATTRIBUTE_LEN {
            return Err(invalid);
        }
        if is_nested(attribute.type_) && !attribute.pValue.is_null() {
            let size = std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG;
            if depth == 0 || len % size != 0 {
                return Err(invalid);
            }
            // SAFETY: the value holds `len / size` attributes, as the
            // application vouches for its values.
            let inner = unsafe {
                std::slice::from_raw_parts(
                    attribute.pValue as *const CK_ATTRIBUTE,
                    (len / size) as usize,
                )
            };
            // SAFETY: as for the outer template.
            unsafe { check_values(inner, depth - 1) }?;
        }
    }
    Ok(())
}

/// Makes a template of another's attributes and fixed values, for a member
/// that must get something other than what the application gave.
pub struct TemplateBuilder<'t> {
    attributes: Vec<CK_ATTRIBUTE>,
    nested: Vec<Template<'t>>,
}

impl<'t> TemplateBuilder<'t> {
    pub fn with_capacity(capacity: usize) -> Self {
        TemplateBuilder {
            attributes: Vec::with_capacity(capacity),
            nested: Vec::new(),
        }
    }

    pub fn push(&mut self, attribute: Attribute<'t>) {
        self.attributes.push(*attribute.0);
    }

    pub fn push_bool(&mut self, kind: CK_ATTRIBUTE_TYPE, value: bool) {
        let value: &'static CK_BBOOL = if value { &TRUE } else { &FALSE };
        self.push_value(kind, std::slice::from_ref(value));
    }

    /// Adds an attribute of `value`, which a member reads, never writes.
    pub fn push_value(&mut self, kind: CK_ATTRIBUTE_TYPE, value: &'t [u8]) {
        self.attributes.push(CK_ATTRIBUTE {
            type_: kind,
            pValue: value.as_ptr() as *mut _,
            ulValueLen: value.len() as CK_ULONG,
        });
    }

    /// Adds `inner` as the value of a nested-template attribute.
    pub fn push_nested(&mut self, kind: CK_ATTRIBUTE_TYPE, inner: Template<'t>) {
        // The attributes' buffer stays where it is when `inner` moves.
        self.attributes.push(CK_ATTRIBUTE {
            type_: kind,
            pValue: inner.attributes.as_ptr() as *mut _,
            ulValueLen: std::mem::size_of_val(inner.attributes.as_ref()) as CK_ULONG,
        });
        self.nested.push(inner);
    }

    pub fn build(self) -> Template<'t> {
        Template {
            attributes: Cow::Owned(self.attributes),
            _nested: self.nested,
            absent: false,
        }
    }
}

/// The attributes of a `C_GetAttributeValue`: each names a type and
/// either a buffer for its value or none (asking the value's length). The
/// answers go into the attributes' lengths and buffers.
pub struct AttributeRequest<'a> {
    attributes: &'a mut [CK_ATTRIBUTE],
    absent: bool,
}

impl<'a> AttributeRequest<'a> {
    /// `CKR_ARGUMENTS_BAD` for a null template with a count; null values
    /// are allowed (they ask for the length).
    ///
    /// # Safety
    /// `template`, when not null, must point to `count` attributes, each
    /// value (when not null) writable for its length during `'a`.
    pub unsafe fn new(template: CK_ATTRIBUTE_PTR, count: CK_ULONG) -> Result<Self> {
        buffer(template, count)?;
        if template.is_null() {
            return Ok(AttributeRequest {
                attributes: &mut [],
                absent: true,
            });
        }
        Ok(AttributeRequest {
            // SAFETY: not null; the caller vouches for `count` attributes.
            attributes: unsafe { std::slice::from_raw_parts_mut(template, count as usize) },
            absent: false,
        })
    }

    /// The kinds asked, in order.
    pub fn kinds(&self) -> impl Iterator<Item = CK_ATTRIBUTE_TYPE> + '_ {
        self.attributes.iter().map(|a| a.type_)
    }

    /// The room attribute `index` gives its value; `None` for no buffer
    /// (asking the length).
    pub fn room(&self, index: usize) -> Option<CK_ULONG> {
        let attribute = &self.attributes[index];
        (!attribute.pValue.is_null()).then_some(attribute.ulValueLen)
    }

    pub fn set_len(&mut self, index: usize, len: CK_ULONG) {
        self.attributes[index].ulValueLen = len;
    }

    /// Answers one attribute with `value` under the two-call convention: no
    /// buffer gets the length; a short one `CKR_BUFFER_TOO_SMALL` (its
    /// length unavailable, as the specification has it).
    pub fn answer(&mut self, index: usize, value: &[u8]) -> Result<()> {
        let attribute = &mut self.attributes[index];
        if attribute.pValue.is_null() {
            attribute.ulValueLen = value.len() as CK_ULONG;
        } else if (attribute.ulValueLen as usize) < value.len() {
            attribute.ulValueLen = CK_UNAVAILABLE_INFORMATION;
            return Err(Error::new(CKR_BUFFER_TOO_SMALL));
        } else {
            // SAFETY: a buffer of at least `value.len()` bytes, as the
            // application vouched when the request was made.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    value.as_ptr(),
                    attribute.pValue as *mut u8,
                    value.len(),
                )
            };
            attribute.ulValueLen = value.len() as CK_ULONG;
        }
        Ok(())
    }

    /// The attributes as a member call takes them; the application's null
    /// stays `None`.
    pub fn as_mut_slice(&mut self) -> Option<&mut [CK_ATTRIBUTE]> {
        (!self.absent).then_some(&mut self.attributes[..])
    }
}

/// Attributes the core asks of a member's `C_GetAttributeValue`: each
/// with a room of its own for the value ([`AttributeQuery::room`]), with
/// none, asking the length ([`AttributeQuery::length`]), a nested
/// template's, or as the application asked it ([`AttributeQuery::asked`]).
/// The rooms lie in one buffer, the query's or one a caller keeps to reuse
/// ([`AttributeQuery::in_store`]); a member call borrows the attributes as
/// C ones pointing into it ([`AttributeQuery::as_mut_slice`]) and the
/// answers are read back as lengths and slices of it, so the core reads a
/// member's answer without a pointer.
pub struct AttributeQuery<'r> {
    attributes: Vec<CK_ATTRIBUTE>,
    asks: Vec<Ask>,
    store: Store<'r>,
    /// How much of `store` the rooms take.
    used: usize,
}

enum Store<'r> {
    Own(Vec<u8>),
    Kept(&'r mut Vec<u8>),
}

impl Store<'_> {
    fn bytes(&mut self) -> &mut Vec<u8> {
        match self {
            Store::Own(bytes) => bytes,
            Store::Kept(bytes) => bytes,
        }
    }

    fn get(&self) -> &[u8] {
        match self {
            Store::Own(bytes) => bytes,
            Store::Kept(bytes) => bytes,
        }
    }
}

/// What one attribute of an [`AttributeQuery`] asks.
enum Ask {
    /// The length, which reads `unanswered` where the member leaves it.
    Length { unanswered: CK_ULONG },
    /// The value, into `len` bytes of the store from `start`.
    Room { start: usize, len: usize },
    /// A nested template: its attributes, each asking as `asks` says.
    Nested(Vec<CK_ATTRIBUTE>, Vec<Ask>),
    /// As the application asked, into its own buffer.
    Asked(CK_ATTRIBUTE),
}

impl AttributeQuery<'static> {
    /// A query whose rooms are its own.
    pub fn new() -> Self {
        AttributeQuery::in_store_of(Store::Own(Vec::new()))
    }
}

impl Default for AttributeQuery<'static> {
    fn default() -> Self {
        AttributeQuery::new()
    }
}

impl<'r> AttributeQuery<'r> {
    /// A query whose rooms lie in `store`, which keeps its bytes (and their
    /// allocation) for the next query: a member writes each answer before
    /// it is read.
    pub fn in_store(store: &'r mut Vec<u8>) -> Self {
        AttributeQuery::in_store_of(Store::Kept(store))
    }

    fn in_store_of(store: Store<'r>) -> Self {
        AttributeQuery {
            attributes: Vec::new(),
            asks: Vec::new(),
            store,
            used: 0,
        }
    }

    /// Asks `kind`'s length; where the member leaves it unanswered it reads
    /// `unanswered`.
    pub fn length(&mut self, kind: CK_ATTRIBUTE_TYPE, unanswered: CK_ULONG) {
        self.push(kind, Ask::Length { unanswered });
    }

    /// Asks `kind`'s value, with room for `len` bytes.
    pub fn room(&mut self, kind: CK_ATTRIBUTE_TYPE, len: usize) {
        let ask = self.take_room(len);
        self.push(kind, ask);
    }

    /// Asks the attributes of `kind`'s nested template: for each, its
    /// length (a kind of 0 to learn the kinds as well) or, with a length
    /// given, its value.
    pub fn nested(
        &mut self,
        kind: CK_ATTRIBUTE_TYPE,
        inner: &[(CK_ATTRIBUTE_TYPE, Option<usize>)],
    ) {
        let asks = inner
            .iter()
            .map(|(_, len)| match len {
                Some(len) => self.take_room(*len),
                None => Ask::Length { unanswered: 0 },
            })
            .collect();
        let attributes = inner.iter().map(|(kind, _)| blank(*kind)).collect();
        self.push(kind, Ask::Nested(attributes, asks));
    }

    /// Asks the attributes of the application's `request` whose kind is
    /// `kept` as it asked them, into its own buffers, which are never read
    /// here.
    pub fn asked(
        &mut self,
        request: &'r AttributeRequest,
        kept: impl Fn(CK_ATTRIBUTE_TYPE) -> bool,
    ) {
        for attribute in request.attributes.iter().filter(|a| kept(a.type_)) {
            self.push(attribute.type_, Ask::Asked(*attribute));
        }
    }

    fn take_room(&mut self, len: usize) -> Ask {
        let start = self.used;
        self.used += len;
        let bytes = self.store.bytes();
        if bytes.len() < self.used {
            bytes.resize(self.used, 0);
        }
        Ask::Room { start, len }
    }

    fn push(&mut self, kind: CK_ATTRIBUTE_TYPE, ask: Ask) {
        self.attributes.push(blank(kind));
        self.asks.push(ask);
    }

    /// The attributes as a member call takes them, each asking afresh:
    /// pointing at its room with the room's length, or with no buffer and
    /// the length it reads unanswered.
    pub fn as_mut_slice(&mut self) -> &mut [CK_ATTRIBUTE] {
        // One pointer for all rooms: taking it makes no reference to the
        // bytes, so the rooms' pointers stay valid beside one another.
        let base = self.store.bytes().as_mut_ptr();
        let lend = |attribute: &mut CK_ATTRIBUTE, ask: &mut Ask| match ask {
            Ask::Length { unanswered } => {
                attribute.pValue = std::ptr::null_mut();
                attribute.ulValueLen = *unanswered;
            }
            Ask::Room { start, len } => {
                attribute.pValue = base.wrapping_add(*start).cast();
                attribute.ulValueLen = *len as CK_ULONG;
            }
            Ask::Nested(..) => {}
            Ask::Asked(asked) => *attribute = *asked,
        };
        for (attribute, ask) in self.attributes.iter_mut().zip(self.asks.iter_mut()) {
            lend(attribute, ask);
            if let Ask::Nested(inner, asks) = ask {
                for (attribute, ask) in inner.iter_mut().zip(asks.iter_mut()) {
                    lend(attribute, ask);
                }
                attribute.pValue = inner.as_mut_ptr().cast();
                attribute.ulValueLen = std::mem::size_of_val(inner.as_slice()) as CK_ULONG;
            }
        }
        &mut self.attributes
    }

    pub fn len(&self) -> usize {
        self.attributes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty()
    }

    pub fn kind(&self, index: usize) -> CK_ATTRIBUTE_TYPE {
        self.attributes[index].type_
    }

    /// The length the member answered for attribute `index`
    /// (`CK_UNAVAILABLE_INFORMATION` where it has none to give).
    pub fn answered(&self, index: usize) -> CK_ULONG {
        self.attributes[index].ulValueLen
    }

    /// The value the member wrote into attribute `index`'s room; `None`
    /// where it gave none, or a length beyond the room.
    pub fn value(&self, index: usize) -> Option<&[u8]> {
        self.value_of(&self.attributes[index], &self.asks[index])
    }

    fn value_of(&self, attribute: &CK_ATTRIBUTE, ask: &Ask) -> Option<&[u8]> {
        let Ask::Room { start, len } = ask else {
            return None;
        };
        let answered = attribute.ulValueLen;
        if answered == CK_UNAVAILABLE_INFORMATION || answered as usize > *len {
            return None;
        }
        Some(&self.store.get()[*start..*start + answered as usize])
    }

    /// Attribute `index`'s `CK_BBOOL` value, if it has one.
    pub fn bool(&self, index: usize) -> Option<bool> {
        self.value(index).and_then(bool_of)
    }

    /// Attribute `index`'s `CK_ULONG` value, if it has one.
    pub fn ulong(&self, index: usize) -> Option<CK_ULONG> {
        self.value(index).and_then(ulong_of)
    }

    /// The kinds and lengths the member answered inside attribute
    /// `index`'s nested template.
    pub fn nested_lengths(&self, index: usize) -> Vec<(CK_ATTRIBUTE_TYPE, CK_ULONG)> {
        match &self.asks[index] {
            Ask::Nested(inner, _) => inner.iter().map(|a| (a.type_, a.ulValueLen)).collect(),
            _ => Vec::new(),
        }
    }

    /// The values the member wrote inside attribute `index`'s nested
    /// template; `None` unless it wrote every one.
    pub fn nested_values(&self, index: usize) -> Option<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
        let Ask::Nested(inner, asks) = &self.asks[index] else {
            return None;
        };
        inner
            .iter()
            .zip(asks)
            .map(|(a, ask)| self.value_of(a, ask).map(|v| (a.type_, v.to_vec())))
            .collect()
    }
}

/// An attribute of `kind` with no value yet.
fn blank(kind: CK_ATTRIBUTE_TYPE) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: kind,
        pValue: std::ptr::null_mut(),
        ulValueLen: 0,
    }
}

/// An array the application gave a call to fill (`C_FindObjects`' handles).
pub struct OutArray<'a, T> {
    items: &'a mut [T],
    absent: bool,
}

impl<'a, T> OutArray<'a, T> {
    /// `CKR_ARGUMENTS_BAD` for a null array with room.
    ///
    /// # Safety
    /// `items`, when not null, must have room for `room` items, writable
    /// during `'a`.
    pub unsafe fn new(items: *mut T, room: CK_ULONG) -> Result<Self> {
        buffer(items, room)?;
        if items.is_null() {
            return Ok(OutArray {
                items: &mut [],
                absent: true,
            });
        }
        Ok(OutArray {
            // SAFETY: not null; the caller vouches for the room.
            items: unsafe { std::slice::from_raw_parts_mut(items, room as usize) },
            absent: false,
        })
    }

    pub fn items(&mut self) -> &mut [T] {
        self.items
    }

    /// The array as a member call takes it; the application's null stays
    /// `None`.
    pub fn as_mut_slice(&mut self) -> Option<&mut [T]> {
        (!self.absent).then_some(&mut self.items[..])
    }
}

/// Where a call writes a list or bytes under the two-call convention: no
/// buffer asks for the length; a short one gets `CKR_BUFFER_TOO_SMALL` and
/// the length needed; otherwise the items are written and their number.
pub struct Output<'a, T> {
    buffer: *mut T,
    len: &'a mut CK_ULONG,
}

impl<'a, T: Copy> Output<'a, T> {
    /// `CKR_ARGUMENTS_BAD` for a null length.
    ///
    /// # Safety
    /// `len`, when not null, must be writable during `'a`; `buffer`, when
    /// not null, must have room for `*len` items, writable as long.
    pub unsafe fn new(buffer: *mut T, len: *mut CK_ULONG) -> Result<Self> {
        required(len)?;
        Ok(Output {
            buffer,
            // SAFETY: not null, writable as the caller vouches.
            len: unsafe { &mut *len },
        })
    }

    /// Writes `items`.
    pub fn fill(self, items: &[T]) -> Result<()> {
        let needed = items.len() as CK_ULONG;
        self.fill_with(needed, |room| {
            room.copy_from_slice(items);
            (needed, Ok(()))
        })
    }

    /// Has `write` fill `needed` items where the buffer has room for them;
    /// `write` says how many it wrote, and whether it succeeded.
    pub fn fill_with(
        self,
        needed: CK_ULONG,
        write: impl FnOnce(&mut [T]) -> (CK_ULONG, Result<()>),
    ) -> Result<()> {
        if self.buffer.is_null() {
            *self.len = needed;
            return Ok(());
        }
        if *self.len < needed {
            *self.len = needed;
            return Err(Error::new(CKR_BUFFER_TOO_SMALL));
        }
        // SAFETY: not null, with room for `*len` items (at least `needed`),
        // as the caller of `new` vouches.
        let room = unsafe { std::slice::from_raw_parts_mut(self.buffer, needed as usize) };
        let (written, result) = write(room);
        *self.len = written;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute<T>(kind: CK_ATTRIBUTE_TYPE, value: &T) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE {
            type_: kind,
            pValue: value as *const T as *mut _,
            ulValueLen: std::mem::size_of::<T>() as CK_ULONG,
        }
    }

    #[test]
    fn bool_and_ulong_read_values_of_their_size_only() {
        let yes: CK_BBOOL = CK_TRUE;
        let wide: CK_ULONG = 1;
        let class: CK_ULONG = CKO_SECRET_KEY;
        let raw = [
            attribute(CKA_PRIVATE, &wide),
            attribute(CKA_TOKEN, &yes),
            attribute(CKA_CLASS, &class),
        ];
        // SAFETY: a live local template.
        let template = unsafe { Template::giving_values(raw.as_ptr() as *mut _, 3) }.unwrap();
        assert_eq!(template.bool(CKA_TOKEN), Some(true));
        assert_eq!(template.bool(CKA_PRIVATE), None);
        assert_eq!(template.ulong(CKA_CLASS), Some(CKO_SECRET_KEY));
        assert_eq!(template.ulong(CKA_TOKEN), None);
        let rest = template.without(&[CKA_TOKEN]);
        assert_eq!(rest.count(), 2);
        assert_eq!(rest.bool(CKA_TOKEN), None);
    }

    #[test]
    fn malformed_templates_get_the_codes_they_always_got() {
        let bad = |t, n| unsafe { Template::giving_values(t, n) }.err().map(|e| e.rv);
        assert_eq!(bad(std::ptr::null_mut(), 1), Some(CKR_ARGUMENTS_BAD));
        let null_value = [CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: std::ptr::null_mut(),
            ulValueLen: 4,
        }];
        assert_eq!(
            bad(null_value.as_ptr() as *mut _, 1),
            Some(CKR_ATTRIBUTE_VALUE_INVALID)
        );
        assert_eq!(
            bad(null_value.as_ptr() as *mut _, MAX_TEMPLATE_COUNT + 1),
            Some(CKR_ARGUMENTS_BAD)
        );
        // SAFETY: null with no attributes.
        let absent = unsafe { Template::giving_values(std::ptr::null_mut(), 0) }.unwrap();
        assert!(absent.as_slice().is_none(), "a member sees null as given");
    }

    #[test]
    fn a_built_template_holds_its_nested_template() {
        let no: CK_BBOOL = CK_FALSE;
        let raw = [attribute(CKA_EXTRACTABLE, &no)];
        // SAFETY: a live local template.
        let template = unsafe { Template::giving_values(raw.as_ptr() as *mut _, 1) }.unwrap();
        let mut inner = TemplateBuilder::with_capacity(2);
        inner.push(template.iter().next().unwrap());
        inner.push_bool(CKA_WRAP_WITH_TRUSTED, true);
        let mut outer = TemplateBuilder::with_capacity(1);
        outer.push_nested(CKA_UNWRAP_TEMPLATE, inner.build());
        let outer = outer.build();
        let nested = outer.iter().next().unwrap().nested().unwrap();
        assert_eq!(nested.bool(CKA_EXTRACTABLE), Some(false));
        assert_eq!(nested.bool(CKA_WRAP_WITH_TRUSTED), Some(true));
    }

    /// Answers `attributes` as a member would: each value that has a
    /// buffer gets `value`'s bytes that fit and its full length.
    fn member_answers(attributes: &mut [CK_ATTRIBUTE], value: &[u8]) {
        for a in attributes {
            if !a.pValue.is_null() {
                let n = value.len().min(a.ulValueLen as usize);
                // SAFETY: the query's room holds `ulValueLen` bytes.
                unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), a.pValue.cast(), n) };
            }
            a.ulValueLen = value.len() as CK_ULONG;
        }
    }

    #[test]
    fn a_query_reads_back_what_fits_its_rooms_and_asks_afresh() {
        let mut store = Vec::new();
        let mut query = AttributeQuery::in_store(&mut store);
        query.room(CKA_LABEL, 8);
        query.length(CKA_ID, 7);
        query.room(CKA_VALUE, 2);
        member_answers(query.as_mut_slice(), b"abc");
        assert_eq!(query.value(0), Some(&b"abc"[..]));
        assert_eq!((query.answered(1), query.value(1)), (3, None));
        assert_eq!(query.answered(2), 3);
        assert_eq!(query.value(2), None, "a length beyond the room");
        let lent = query.as_mut_slice();
        let lengths: Vec<CK_ULONG> = lent.iter().map(|a| a.ulValueLen).collect();
        assert_eq!(lengths, [8, 7, 2], "each lending asks afresh");
        assert!(lent[1].pValue.is_null(), "a length query has no buffer");
        lent[0].ulValueLen = CK_UNAVAILABLE_INFORMATION;
        assert_eq!(query.value(0), None);
        assert!(store.len() >= 10, "the rooms stay for the next query");
    }

    #[test]
    fn a_query_reads_a_nested_template_in_two_steps() {
        let size = std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG;
        let mut kinds = AttributeQuery::new();
        kinds.nested(CKA_UNWRAP_TEMPLATE, &[(0, None), (0, None)]);
        let outer = &mut kinds.as_mut_slice()[0];
        assert_eq!(outer.ulValueLen, 2 * size);
        // SAFETY: the outer room holds two attributes.
        let inner = unsafe { std::slice::from_raw_parts_mut(outer.pValue.cast(), 2) };
        let answers = [(CKA_EXTRACTABLE, 1), (CKA_LABEL, 3)];
        for (a, (kind, len)) in inner.iter_mut().zip(answers) {
            *a = CK_ATTRIBUTE {
                type_: kind,
                pValue: std::ptr::null_mut(),
                ulValueLen: len,
            };
        }
        assert_eq!(kinds.nested_lengths(0), answers);
        let mut values = AttributeQuery::new();
        values.nested(
            CKA_UNWRAP_TEMPLATE,
            &[(CKA_EXTRACTABLE, Some(1)), (CKA_LABEL, Some(3))],
        );
        let outer = &mut values.as_mut_slice()[0];
        // SAFETY: as above.
        let inner = unsafe { std::slice::from_raw_parts_mut(outer.pValue.cast(), 2) };
        member_answers(&mut inner[..1], &[CK_FALSE]);
        member_answers(&mut inner[1..], b"key");
        assert_eq!(
            values.nested_values(0),
            Some(vec![
                (CKA_EXTRACTABLE, vec![CK_FALSE]),
                (CKA_LABEL, b"key".to_vec())
            ])
        );
    }

    #[test]
    fn output_follows_the_two_call_convention() {
        let items = [7u64, 8, 9];
        let mut len: CK_ULONG = 0;
        // SAFETY: a live length, no buffer.
        let asked = unsafe { Output::new(std::ptr::null_mut::<u64>(), &mut len) };
        asked.unwrap().fill(&items).unwrap();
        assert_eq!(len, 3, "no buffer asks for the length");
        let mut room = [0u64; 3];
        len = 2;
        // SAFETY: `room` has at least `len` items.
        let short = unsafe { Output::new(room.as_mut_ptr(), &mut len) }.unwrap();
        assert_eq!(short.fill(&items).unwrap_err().rv, CKR_BUFFER_TOO_SMALL);
        assert_eq!(len, 3, "a short buffer learns the length needed");
        // SAFETY: as above.
        let enough = unsafe { Output::new(room.as_mut_ptr(), &mut len) }.unwrap();
        enough.fill(&items).unwrap();
        assert_eq!((room, len), (items, 3));
        // SAFETY: a null length is refused before anything is written.
        let no_len = unsafe { Output::new(room.as_mut_ptr(), std::ptr::null_mut()) };
        assert_eq!(no_len.err().map(|e| e.rv), Some(CKR_ARGUMENTS_BAD));
    }

    #[test]
    fn an_attribute_answer_follows_the_two_call_convention() {
        let mut byte: CK_BBOOL = 9;
        let mut raw = [
            CK_ATTRIBUTE {
                type_: CKA_EXTRACTABLE,
                pValue: std::ptr::null_mut(),
                ulValueLen: 0,
            },
            CK_ATTRIBUTE {
                type_: CKA_EXTRACTABLE,
                pValue: &mut byte as *mut _ as *mut _,
                ulValueLen: 0,
            },
            CK_ATTRIBUTE {
                type_: CKA_EXTRACTABLE,
                pValue: &mut byte as *mut _ as *mut _,
                ulValueLen: 1,
            },
        ];
        // SAFETY: live local attributes and buffers.
        let mut request = unsafe { AttributeRequest::new(raw.as_mut_ptr(), 3) }.unwrap();
        assert!(request.answer(0, &[CK_FALSE]).is_ok());
        let short = request.answer(1, &[CK_FALSE]);
        assert_eq!(short.unwrap_err().rv, CKR_BUFFER_TOO_SMALL);
        assert!(request.answer(2, &[CK_FALSE]).is_ok());
        assert_eq!(raw[0].ulValueLen, 1);
        assert_eq!(raw[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
        assert_eq!((raw[2].ulValueLen, byte), (1, CK_FALSE));
    }
}
