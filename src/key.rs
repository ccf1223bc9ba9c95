//! Idempotency keys: parsing, validation and the caller scope.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::fingerprint::hex;

/// A validated idempotency key, as the client sent it (without the sf-string quotes).
///
/// The layer puts the key of every covered request into the request's extensions, so the
/// service behind can read it without parsing the header again:
///
/// ```
/// use tower_idempotency::IdempotencyKey;
///
/// fn handler(req: http::Request<()>) -> Option<String> {
///     req.extensions().get::<IdempotencyKey>().map(|k| k.as_str().to_owned())
/// }
/// # assert!(handler(http::Request::new(())).is_none());
/// ```
#[derive(Clone)]
pub struct IdempotencyKey(KeyText);

/// A key's text: kept inline up to [`INLINE`] bytes (UUIDs and most keys), so that reading
/// a key from its header allocates nothing.
#[derive(Clone)]
enum KeyText {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

const INLINE: usize = 62;

impl KeyText {
    fn new(text: &str) -> Self {
        match u8::try_from(text.len()) {
            Ok(len) if text.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..text.len()].copy_from_slice(text.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(text.into()),
        }
    }

    /// A key already checked to be printable ASCII, from its bytes: no UTF-8 check again.
    fn from_ascii(text: &[u8]) -> Self {
        match u8::try_from(text.len()) {
            Ok(len) if text.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..text.len()].copy_from_slice(text);
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(String::from_utf8_lossy(text).into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Always whole characters of a `str` (copied from one above).
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Self::Heap(text) => text,
        }
    }

    /// The text's bytes, without the UTF-8 check [`as_str`](Self::as_str) makes.
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(text) => text.as_bytes(),
        }
    }
}

impl PartialEq for IdempotencyKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdempotencyKey {}

impl std::hash::Hash for IdempotencyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl IdempotencyKey {
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    fn new(text: &str) -> Self {
        Self(KeyText::new(text))
    }

    /// The key's text as bytes (no UTF-8 check: for the store key made from it, which
    /// checks the whole once).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The key of a call of [`function::Idempotent`](crate::function::Idempotent): any
    /// text of at most `max` characters without control characters.
    pub(crate) fn from_call(text: &str, max: usize) -> Result<Self, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        let len = text.chars().count();
        if len > max {
            return Err(KeyError::TooLong { len, max });
        }
        if text.chars().any(char::is_control) {
            return Err(KeyError::NotPrintable);
        }
        Ok(Self::new(text))
    }

    pub(crate) fn generate() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        Self::new(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
    }

    /// The key as an RFC 9651 sf-string header value (`"…"`).
    pub(crate) fn to_header_value(&self) -> HeaderValue {
        let key = self.as_str();
        let mut out = String::with_capacity(key.len() + 2);
        out.push('"');
        for c in key.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        HeaderValue::try_from(out).expect("a validated key is a valid header value")
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey")
            .field(&self.as_str())
            .finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the key header is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyParsing {
    /// Accept an RFC 9651 sf-string (`"abc"`) or a bare value (`abc`) of printable ASCII
    /// without spaces or quotes. Most clients send bare values. The default.
    #[default]
    Lenient,
    /// Accept only an RFC 9651 sf-string, as the IETF draft specifies.
    Strict,
}

/// Why a key header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is absent.
    #[error("the Idempotency-Key header is missing")]
    Missing,
    /// The header appears more than once.
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
    /// The key is empty.
    #[error("the Idempotency-Key is empty")]
    Empty,
    /// The key is longer than the configured maximum.
    #[error("the Idempotency-Key is {len} characters long, more than the maximum of {max}")]
    TooLong {
        /// The key's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The key holds characters other than printable ASCII.
    #[error("the Idempotency-Key must be printable ASCII")]
    NotPrintable,
    /// The header is not an RFC 9651 sf-string (strict parsing), or is a malformed one.
    #[error("the Idempotency-Key must be a Structured Field String, such as \"8e03978e\"")]
    NotSfString,
}

/// Parses and validates a key header value.
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::{KeyError, KeyParsing};
/// use tower_idempotency::key::parse_key;
///
/// let quoted = HeaderValue::from_static("\"8e03978e-40d5\"");
/// assert_eq!(parse_key(&quoted, KeyParsing::Strict, 255).unwrap().as_str(), "8e03978e-40d5");
/// let bare = HeaderValue::from_static("8e03978e-40d5");
/// assert_eq!(parse_key(&bare, KeyParsing::Lenient, 255).unwrap().as_str(), "8e03978e-40d5");
/// assert_eq!(parse_key(&bare, KeyParsing::Strict, 255), Err(KeyError::NotSfString));
/// ```
pub fn parse_key(
    value: &HeaderValue,
    parsing: KeyParsing,
    max_len: usize,
) -> Result<IdempotencyKey, KeyError> {
    let bytes = value.as_bytes();
    // What the value starts with past any leading space, as an RFC 9651 parser sees it: a
    // quoted key after a space (kept by a value built in code, or sent over HTTP/2) is an
    // sf-string in every mode.
    let first = match bytes.first() {
        Some(b' ' | b'\t') => bytes.iter().copied().find(|b| !matches!(b, b' ' | b'\t')),
        first => first.copied(),
    };
    if first != Some(b'"') && parsing != KeyParsing::Strict {
        // Every byte looked at (no early exit), so that the check runs many bytes at a time.
        let printable = bytes.iter().fold(true, |ok, &b| {
            ok & (b.wrapping_sub(0x21) < 0x5e) & (b != b'"')
        });
        if !printable {
            return Err(KeyError::NotPrintable);
        }
        check_length(bytes.len(), max_len)?;
        // Printable ASCII, checked above: taken as it is, with no UTF-8 check.
        return Ok(IdempotencyKey(KeyText::from_ascii(bytes)));
    }
    let item: sfv::Item = sfv::Parser::new(bytes)
        .parse()
        .map_err(|_| KeyError::NotSfString)?;
    let Some(key) = item.bare_item.as_string() else {
        return Err(KeyError::NotSfString);
    };
    let key = key.as_str();
    check_length(key.len(), max_len)?;
    // An sf-string may hold any character RFC 9651 allows, which is printable ASCII and
    // space, but say so here all the same.
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(KeyError::NotPrintable);
    }
    Ok(IdempotencyKey::new(key))
}

/// A key of `len` bytes is neither empty nor longer than `max`.
fn check_length(len: usize, max: usize) -> Result<(), KeyError> {
    match len {
        0 => Err(KeyError::Empty),
        len if len > max => Err(KeyError::TooLong { len, max }),
        _ => Ok(()),
    }
}

/// Who sent a request: keys are only ever shared within one scope.
///
/// A scope is a SHA-256 digest of who the caller is (a principal, [`Scope::of_principal`]),
/// or an HMAC of a credential ([`Scope::keyed`]), so raw identities never reach the store.
/// The layer derives it from each request as
/// [`IdempotencyLayer::scope_by`](crate::IdempotencyLayer::scope_by) and its siblings say;
/// [`Scope::anonymous`] is the one scope every caller shares under
/// [`share_keys_across_callers`](crate::IdempotencyLayer::share_keys_across_callers).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Scope(std::borrow::Cow<'static, str>);

/// The key of a request whose key is in its JSON body
/// ([`IdempotencyLayer::key_from_json`](crate::IdempotencyLayer::key_from_json)): the string
/// at the layer's JSON pointer. `Err(None)` when there is none and keys are optional;
/// `Err(Some(problem))`, a `400`, when there is none and keys are required, or it is not a
/// string, or not a valid key, or the body is not JSON.
pub(crate) fn from_body(
    pointer: &str,
    optional: bool,
    max_len: usize,
    body: &[u8],
) -> Result<IdempotencyKey, Option<crate::problem::Problem>> {
    use crate::problem::{Problem, ProblemKind};
    let invalid = |detail: String| Some(Problem::new(ProblemKind::InvalidKey, detail));
    #[cfg(feature = "json")]
    let found = match serde_json::from_slice::<serde_json::Value>(body) {
        Err(_) => {
            return Err(invalid(format!(
                "The request body is not JSON, and this endpoint reads its idempotency key \
                 from the body at {pointer}."
            )));
        }
        Ok(doc) => match doc.pointer(pointer) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(text)) => Some(Ok(text.clone())),
            Some(other) => Some(Err(other.to_string())),
        },
    };
    #[cfg(not(feature = "json"))]
    let found: Option<Result<String, String>> = {
        let _ = body;
        None
    };
    match found {
        None if optional => Err(None),
        None => Err(Some(Problem::new(
            ProblemKind::MissingKey,
            format!(
                "This request must carry its idempotency key as a string at {pointer} in its \
                 JSON body."
            ),
        ))),
        Some(Err(value)) => Err(invalid(format!(
            "The idempotency key at {pointer} in the request body must be a string, not {}.",
            if value.len() > 40 {
                "a longer value"
            } else {
                &value
            }
        ))),
        Some(Ok(text)) => IdempotencyKey::from_call(&text, max_len)
            .map_err(|err| invalid(format!("The idempotency key at {pointer}: {err}."))),
    }
}

/// The scope a call of [`function::Idempotent`](crate::function::Idempotent) names for
/// itself, put in its request's extensions: the layer's scope rule does not apply to it.
#[derive(Clone, Debug)]
pub(crate) struct CallScope(pub(crate) Scope);

impl Scope {
    /// The one scope shared by every caller: what
    /// [`share_keys_across_callers`](crate::IdempotencyLayer::share_keys_across_callers) uses.
    /// Returning it from a [`scope_by`](crate::IdempotencyLayer::scope_by) function puts that
    /// caller in with everyone else who gets it.
    pub fn anonymous() -> Self {
        Self(std::borrow::Cow::Borrowed("anon"))
    }

    /// The scope of the given identity (a tenant or user id, …), as its SHA-256. For a
    /// credential use [`Scope::keyed`]: a bare hash of a password or token can be reversed
    /// by trying candidates.
    ///
    /// ```
    /// use tower_idempotency::Scope;
    ///
    /// assert_eq!(Scope::of(b"tenant-1"), Scope::of(b"tenant-1"));
    /// assert_ne!(Scope::of(b"tenant-1"), Scope::of(b"tenant-2"));
    /// assert_ne!(Scope::of(b""), Scope::anonymous());
    /// ```
    pub fn of(identity: &[u8]) -> Self {
        Self(std::borrow::Cow::Owned(hex(&Sha256::digest(identity))))
    }

    /// The scope of an authenticated principal (a user or tenant id), by its `Display` form.
    /// Two principals whose ids display alike share a scope, so make the text unique (for
    /// example `user:42`, `tenant:acme`).
    ///
    /// ```
    /// use tower_idempotency::Scope;
    ///
    /// assert_eq!(Scope::of_principal(&"user:42"), Scope::of(b"user:42"));
    /// ```
    pub fn of_principal(principal: &impl fmt::Display) -> Self {
        Self::of(principal.to_string().as_bytes())
    }

    /// The scope of a credential, as an HMAC-SHA-256 of it keyed with `secret`: unlike
    /// [`Scope::of`], it cannot be turned back into the credential by trying candidates
    /// without the secret.
    ///
    /// ```
    /// use tower_idempotency::Scope;
    ///
    /// let a = Scope::keyed(b"fleet secret", b"Bearer abc");
    /// assert_eq!(a, Scope::keyed(b"fleet secret", b"Bearer abc"));
    /// assert_ne!(a, Scope::keyed(b"other secret", b"Bearer abc"));
    /// assert_ne!(a, Scope::of(b"Bearer abc"));
    /// ```
    pub fn keyed(secret: &[u8], credential: &[u8]) -> Self {
        use hmac::Mac as _;
        // HMAC takes a key of any length.
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        mac.update(credential);
        Self(std::borrow::Cow::Owned(hex(&mac.finalize().into_bytes())))
    }

    /// The scope of the credential a request carries in header `name`, as
    /// [`scope_by_credential`](crate::IdempotencyLayer::scope_by_credential) derives it:
    /// every field of the header, in order, goes into one HMAC keyed with `secret`.
    ///
    /// - Fields that are empty or blank (spaces and tabs only) carry nothing; with no other
    ///   field the caller is unknown: `None`, as when the header is missing.
    /// - One field: [`Scope::keyed`] of its bytes (the scope earlier versions derived).
    /// - `Cookie` in several fields (what HTTP/2 clients send, RFC 9113 §8.2.3): the fields
    ///   joined with `"; "`, the cookie as HTTP/1.1 carries it in one field, so a caller has
    ///   the same scope over either protocol.
    /// - Any other header in several fields: each field prefixed by its length (8 bytes,
    ///   big-endian), so no bytes can be moved from one field to the next without changing
    ///   the scope, and no list of fields has the scope of a single one (a field value never
    ///   holds the NUL byte such a length starts with).
    ///
    /// ```
    /// use http::{HeaderMap, header::COOKIE};
    /// use tower_idempotency::Scope;
    ///
    /// let of = |fields: &[&str]| {
    ///     let mut headers = HeaderMap::new();
    ///     for field in fields {
    ///         headers.append(COOKIE, field.parse().unwrap());
    ///     }
    ///     Scope::of_credential(b"fleet secret", &headers, &COOKIE)
    /// };
    /// let a = of(&["theme=dark", "session=a"]);
    /// assert_ne!(a, of(&["theme=dark", "session=b"]));
    /// assert_eq!(a, of(&["theme=dark; session=a"]));
    /// assert_eq!(of(&["session=a"]), Some(Scope::keyed(b"fleet secret", b"session=a")));
    /// assert_eq!(of(&[" ", ""]), None);
    /// ```
    pub fn of_credential(
        secret: &[u8],
        headers: &http::HeaderMap,
        name: &http::HeaderName,
    ) -> Option<Self> {
        use hmac::Mac as _;
        fn blank(value: &HeaderValue) -> bool {
            value.as_bytes().iter().all(|&b| b == b' ' || b == b'\t')
        }
        let mut fields = headers.get_all(name).iter().filter(|v| !blank(v));
        let first = fields.next()?;
        let mut rest = fields.peekable();
        if rest.peek().is_none() {
            return Some(Self::keyed(secret, first.as_bytes()));
        }
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        if name == http::header::COOKIE {
            mac.update(first.as_bytes());
            for field in rest {
                mac.update(b"; ");
                mac.update(field.as_bytes());
            }
        } else {
            for field in std::iter::once(first).chain(rest) {
                mac.update(&(field.len() as u64).to_be_bytes());
                mac.update(field.as_bytes());
            }
        }
        Some(Self(std::borrow::Cow::Owned(hex(&mac
            .finalize()
            .into_bytes()))))
    }

    /// The scope as text: `anon` or 64 hexadecimal digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&self.0).finish()
    }
}

/// The key under which a store keeps an operation: the caller's scope and the client's key.
///
/// Its text form is `scope:key`: the scope (`anon`, or 64 hexadecimal digits) and the key,
/// text without control characters (a header's key is printable ASCII; a key read from a
/// JSON body, a function's or a message's may hold any other character). At most 64 + 1 +
/// the key limit characters long.
///
/// Cloning one is a reference count: the layer, the store and the lease keeper share one
/// copy of the text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey(Arc<str>);

impl StoreKey {
    /// The store key for a client's key in a scope.
    ///
    /// ```
    /// use tower_idempotency::{Scope};
    /// use tower_idempotency::store::StoreKey;
    ///
    /// let a = StoreKey::new(&Scope::of(b"alice"), "k1");
    /// let b = StoreKey::new(&Scope::of(b"bob"), "k1");
    /// assert_ne!(a, b);
    /// assert!(a.as_str().ends_with(":k1"));
    /// ```
    pub fn new(scope: &Scope, key: &str) -> Self {
        Self::joined(scope, key.as_bytes())
    }

    /// The store key for a request's key in a scope (its text taken as bytes: the whole is
    /// checked once, here).
    pub(crate) fn of(scope: &Scope, key: &IdempotencyKey) -> Self {
        Self::joined(scope, key.as_bytes())
    }

    /// `scope:key`, where `key` is the bytes of a `str`.
    fn joined(scope: &Scope, key: &[u8]) -> Self {
        let (scope, len) = (&*scope.0, scope.0.len() + 1 + key.len());
        // Written on the stack and copied once into its shared allocation.
        let mut buf = [0u8; 384];
        if let Some(out) = buf.get_mut(..len) {
            out[..scope.len()].copy_from_slice(scope.as_bytes());
            out[scope.len()] = b':';
            out[scope.len() + 1..].copy_from_slice(key);
            // Both halves are `str`s and `:` is ASCII.
            let text = std::str::from_utf8(out).unwrap_or_default();
            return Self(Arc::from(text));
        }
        let mut s = Vec::with_capacity(len);
        s.extend_from_slice(scope.as_bytes());
        s.push(b':');
        s.extend_from_slice(key);
        Self(Arc::from(String::from_utf8_lossy(&s)))
    }

    /// The key a store holds as `text` (a store's own keys, already validated when stored).
    #[allow(dead_code)]
    pub(crate) fn from_shared(text: Arc<str>) -> Self {
        Self(text)
    }

    /// The shared text, for a store that keeps the key (no copy).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn shared(&self) -> &Arc<str> {
        &self.0
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key as a store keeps it (`scope:key`, as [`as_str`](Self::as_str) writes it and as
    /// it shows in a Redis key name or a PostgreSQL row), for operators' tools. `None` when
    /// the scope is not `anon` or 64 lowercase hexadecimal digits, or the key is empty or
    /// holds a control character.
    ///
    /// ```
    /// use tower_idempotency::{Scope};
    /// use tower_idempotency::store::StoreKey;
    ///
    /// let key = StoreKey::new(&Scope::of_principal(&"user:42"), "order-1");
    /// assert_eq!(StoreKey::from_stored(key.as_str()), Some(key));
    /// assert_eq!(StoreKey::from_stored("anon:k").unwrap().client_key(), "k");
    /// assert_eq!(StoreKey::from_stored("alice:k"), None);
    /// ```
    pub fn from_stored(text: &str) -> Option<Self> {
        let (scope, key) = text.split_once(':')?;
        let scope_ok = scope == "anon"
            || (scope.len() == 64
                && scope
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // Every key the layer stores: a header's printable ASCII, and the text without
        // control characters of a body's, a function's or a message's key.
        let key_ok = !key.is_empty() && !key.chars().any(char::is_control);
        (scope_ok && key_ok).then(|| Self(Arc::from(text)))
    }

    /// A handle on the same key (a reference count; the text is shared, not copied).
    pub(crate) fn take(&mut self) -> Self {
        self.clone()
    }

    /// The client's key, without the scope: what the layer's log events show, so that
    /// nothing derived from a credential reaches the logs.
    ///
    /// ```
    /// use tower_idempotency::{Scope};
    /// use tower_idempotency::store::StoreKey;
    ///
    /// assert_eq!(StoreKey::new(&Scope::of(b"alice"), "k:1").client_key(), "k:1");
    /// ```
    pub fn client_key(&self) -> &str {
        // A scope is `anon` or hexadecimal digits: the first colon ends it.
        self.0.split_once(':').map_or(&self.0, |(_, key)| key)
    }
}

/// The scope is left out: it may be derived from a credential
/// ([`IdempotencyLayer::scope_by_credential`](crate::IdempotencyLayer::scope_by_credential)),
/// and a `Debug` value easily ends up in a log or a panic message.
impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreKey")
            .field("scope", &format_args!("…"))
            .field("key", &self.client_key())
            .finish()
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    /// Every key the layer stores is one a store's listing reads back: keys read from a
    /// JSON body, a function's or a message's may hold any character but a control one.
    /// (Found by review: `from_stored` took printable ASCII alone, so the listings of Redis,
    /// PostgreSQL and MySQL skipped `évt_1` without a word, and the keys tool could not
    /// name it.)
    #[test]
    fn every_key_the_layer_stores_is_read_back_from_the_store() {
        for id in [
            "évt_1",
            "tab\u{a0}nbsp",
            "emoji-🙂",
            "plain-1",
            "with space",
        ] {
            let key = IdempotencyKey::from_call(id, 255).unwrap();
            let stored = StoreKey::new(&Scope::anonymous(), key.as_str());
            assert_eq!(
                StoreKey::from_stored(stored.as_str()),
                Some(stored.clone()),
                "{id}"
            );
        }
        assert_eq!(StoreKey::from_stored("anon:bell\u{7}"), None);
        assert_eq!(StoreKey::from_stored("anon:"), None);
    }

    /// Lenient parsing takes every key strict parsing takes: a quoted key after spaces
    /// or tabs (kept by a value built in code, or sent over HTTP/2) included. (Found by
    /// review: lenient looked at the first byte alone and refused it as not printable.)
    #[test]
    fn lenient_takes_every_key_strict_takes_spaces_before_the_quote_included() {
        for raw in [&b" \"abc\""[..], b"\t\"abc\"", b"  \"abc\"  ", b"\"abc\""] {
            let value = HeaderValue::from_bytes(raw).unwrap();
            let strict = parse_key(&value, KeyParsing::Strict, 255);
            let lenient = parse_key(&value, KeyParsing::Lenient, 255);
            if strict.is_ok() {
                assert_eq!(lenient, strict, "{raw:?}");
            }
        }
        let spaced = HeaderValue::from_static("  \"abc\"");
        assert_eq!(
            parse_key(&spaced, KeyParsing::Lenient, 255).map(|k| k.as_str().to_owned()),
            Ok("abc".to_owned())
        );
        // A bare key after a space is still refused, in both modes.
        let spaced = HeaderValue::from_static(" abc");
        assert!(parse_key(&spaced, KeyParsing::Lenient, 255).is_err());
        assert!(parse_key(&spaced, KeyParsing::Strict, 255).is_err());
    }

    use super::*;

    /// A bare key takes exactly the visible ASCII characters but `"`, whatever byte stands
    /// where (the check looks at every byte, by arithmetic, not by a range test).
    #[test]
    fn a_bare_key_takes_every_visible_ascii_byte_but_a_quote_and_no_other() {
        for b in 0..=255u8 {
            let bytes = [b'k', b, b'y'];
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            let parsed = parse_key(&value, KeyParsing::default(), 64);
            let expected = (0x21..=0x7e).contains(&b) && b != b'"';
            assert_eq!(parsed.is_ok(), expected, "byte {b:#04x}: {parsed:?}");
        }
    }

    #[test]
    fn store_key_debug_never_shows_the_scope() {
        let scope = Scope::keyed(b"0123456789abcdef0123456789abcdef", b"Bearer secret");
        let key = StoreKey::new(&scope, "order-1");
        let shown = format!("{key:?}");
        assert!(shown.contains("order-1"), "{shown}");
        assert!(
            !shown.contains(scope.as_str()),
            "the scope reached Debug: {shown}"
        );
    }

    fn parse(v: &[u8], p: KeyParsing) -> Result<IdempotencyKey, KeyError> {
        parse_key(&HeaderValue::from_bytes(v).unwrap(), p, 255)
    }

    #[test]
    fn lenient_accepts_quoted_and_bare() {
        assert_eq!(
            parse(b"\"abc\"", KeyParsing::Lenient).unwrap().as_str(),
            "abc"
        );
        assert_eq!(
            parse(b"abc-1_2.3", KeyParsing::Lenient).unwrap().as_str(),
            "abc-1_2.3"
        );
        assert_eq!(
            parse(b"\"a \\\"q\\\" b\"", KeyParsing::Lenient)
                .unwrap()
                .as_str(),
            "a \"q\" b"
        );
        // sf-string parameters are allowed and ignored.
        assert_eq!(
            parse(b"\"abc\";v=1", KeyParsing::Lenient).unwrap().as_str(),
            "abc"
        );
    }

    #[test]
    fn strict_accepts_only_sf_strings() {
        assert_eq!(
            parse(b"\"abc\"", KeyParsing::Strict).unwrap().as_str(),
            "abc"
        );
        assert_eq!(
            parse(b"abc", KeyParsing::Strict),
            Err(KeyError::NotSfString)
        );
        assert_eq!(parse(b"42", KeyParsing::Strict), Err(KeyError::NotSfString));
    }

    #[test]
    fn refuses_malformed_keys() {
        for p in [KeyParsing::Lenient, KeyParsing::Strict] {
            assert_eq!(parse(b"\"\"", p), Err(KeyError::Empty));
            assert_eq!(parse(b"\"abc", p), Err(KeyError::NotSfString));
            assert_eq!(parse(b"\"a\"b", p), Err(KeyError::NotSfString));
        }
        assert_eq!(parse(b"", KeyParsing::Lenient), Err(KeyError::Empty));
        assert_eq!(
            parse(b"a b", KeyParsing::Lenient),
            Err(KeyError::NotPrintable)
        );
        assert_eq!(
            parse(b"a\tb", KeyParsing::Lenient),
            Err(KeyError::NotPrintable)
        );
        assert_eq!(
            parse(&[b'a', 0xff], KeyParsing::Lenient),
            Err(KeyError::NotPrintable)
        );
        let long = "x".repeat(256);
        assert_eq!(
            parse(long.as_bytes(), KeyParsing::Lenient),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        assert!(parse("x".repeat(255).as_bytes(), KeyParsing::Lenient).is_ok());
        // Kept inline up to 62 bytes, on the heap past them: the same text either way, and
        // the store key made from its bytes is the one made from its text.
        for len in [1, 61, 62, 63, 200, 255] {
            let text: String = (0..len).map(|i| (b'!' + (i % 90) as u8) as char).collect();
            let text = text.replace('"', "#");
            let key = parse(text.as_bytes(), KeyParsing::Lenient).unwrap();
            assert_eq!(key.as_str(), text);
            assert_eq!(key.as_bytes(), text.as_bytes());
            let scope = Scope::of(b"alice");
            assert_eq!(StoreKey::of(&scope, &key), StoreKey::new(&scope, &text));
        }
    }

    #[test]
    fn generated_keys_round_trip_as_sf_strings() {
        let key = IdempotencyKey::generate();
        let value = key.to_header_value();
        assert_eq!(parse_key(&value, KeyParsing::Strict, 255).unwrap(), key);
        let tricky = IdempotencyKey::new("a\"b\\c");
        let value = tricky.to_header_value();
        assert_eq!(parse_key(&value, KeyParsing::Strict, 255).unwrap(), tricky);
    }

    #[test]
    fn keys_short_and_long_keep_their_text() {
        for len in [1, 36, INLINE - 1, INLINE, INLINE + 1, 255] {
            let text: String = (0..len)
                .map(|i| char::from(b'!' + (i % 90) as u8))
                .collect();
            let text = text.replace('"', "#");
            let key = parse(text.as_bytes(), KeyParsing::Lenient).unwrap();
            assert_eq!(key.as_str(), text, "{len}");
            assert_eq!(key.to_string(), text);
            assert_eq!(key, IdempotencyKey::new(&text));
            assert_ne!(key, IdempotencyKey::new(&text[1..]));
            let quoted = key.to_header_value();
            assert_eq!(parse_key(&quoted, KeyParsing::Strict, 255).unwrap(), key);
        }
        assert_eq!(IdempotencyKey::generate().as_str().len(), 36);
    }
}
