//! Request fingerprints: what makes two requests with one key "the same request".
//!
//! # The hash, and why it is safe
//!
//! A fingerprint has to tell apart the requests sent under **one key in one scope**. Where
//! keys are scoped per caller (by credential or principal), that is one caller's requests.
//! Two properties matter:
//!
//! - **Accidental collisions** must not happen: two different payloads a client sends under
//!   one key must fingerprint differently, or the second would get the first's answer
//!   instead of `422`. A 128-bit hash makes that a 2⁻¹²⁸ chance per pair.
//! - **Crafted collisions** only fool their maker where the scope is one caller's: a
//!   caller who builds two payloads with one fingerprint gets, under its own key, the
//!   answer of its own first payload. It can reach no one else's keys or answers.
//!
//! So for a scope of one caller a cryptographic hash buys nothing, and its cost is the
//! whole cost of a large body (SHA-256 runs at about 1.7 GB/s with SHA-NI: 38 µs per
//! 64 KiB). The fingerprints of this crate are **XXH3-128** (`xxhash-rust`), several times
//! faster (see BENCHMARKS.md), over the same length-prefixed fields as before.
//!
//! **A scope several callers share** ([`share_keys_across_callers`], or a
//! [`scope_by`] that groups callers, such as a tenant) is another matter. Its callers
//! already reach each other's keys: one who learns another's key and payload can take the
//! key first, and the other gets `422`. With a fast hash it can do worse, and build a
//! payload of its own with the other's fingerprint (XXH3's secret is public, and such a
//! pair takes microseconds): the other is then answered with its result as a replay, not
//! with `422`. Where the callers of a shared scope do not trust each other, use
//! [`Fingerprint::of_request_sha256`], a cryptographic hash, with which no one can build
//! such a pair.
//!
//! [`share_keys_across_callers`]: crate::IdempotencyLayer::share_keys_across_callers
//! [`scope_by`]: crate::IdempotencyLayer::scope_by
//!
//! # Tagged, so that the hash can change
//!
//! A fingerprint is 32 bytes: an algorithm tag (`0x78`, XXH3-128), the 16-byte hash, and
//! 15 zero bytes. Fingerprints stored by earlier versions are bare SHA-256 digests; a
//! digest that happens to look tagged has a 2⁻¹²⁸ chance. When a stored fingerprint is not
//! tagged ([`Fingerprint::is_legacy`]), the layer fingerprints the retry again the old way
//! (SHA-256) before it calls the two different, so records stored before an upgrade replay
//! instead of answering `422`. A fingerprint function of your own
//! ([`IdempotencyLayer::fingerprint_with`](crate::IdempotencyLayer::fingerprint_with)) that
//! builds on [`Fingerprint::of_fields`] or the presets gets this for free.

use std::cell::Cell;
use std::fmt;

use http::request::Parts;
use sha2::{Digest, Sha256};

/// The first byte of a fingerprint made with XXH3-128.
const TAG_XXH3_128: u8 = 0x78;

thread_local! {
    /// Set while the layer fingerprints a request the legacy way (see the module docs).
    static LEGACY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`Fingerprint::of_fields`] (and so every preset) hashing as earlier
/// versions did: bare SHA-256.
pub(crate) fn legacy<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            LEGACY.set(self.0);
        }
    }
    let _reset = Reset(LEGACY.replace(true));
    f()
}

/// A 32-byte digest identifying a request's payload (see the [module docs](self) for the
/// hash and its tag).
///
/// A retry must carry the same fingerprint as the request that first used its key;
/// a different one is refused with `422 Unprocessable Content`.
///
/// The default ([`Fingerprint::of_request`]) hashes, each prefixed by its length: the method,
/// the path and query, the `Content-Type` header and the body. A layer can use another
/// function through
/// [`IdempotencyLayer::fingerprint_with`](crate::IdempotencyLayer::fingerprint_with).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// A fingerprint from its 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The XXH3-128 hash of the given fields, each prefixed by its length (so that no two
    /// lists of fields can produce the same input), tagged with its algorithm.
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let a = Fingerprint::of_fields([b"ab".as_slice(), b"c"]);
    /// let b = Fingerprint::of_fields([b"a".as_slice(), b"bc"]);
    /// assert_ne!(a, b);
    /// assert!(!a.is_legacy());
    /// ```
    pub fn of_fields<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Self {
        if LEGACY.get() {
            let mut hasher = Sha256::new();
            for field in fields {
                hasher.update((field.len() as u64).to_be_bytes());
                hasher.update(field);
            }
            return Self(hasher.finalize().into());
        }
        // Small requests (most, up to about 2 KiB) are laid out on the stack and hashed in
        // one call, cheaper than the streaming hasher's setup and updates; the streaming
        // hasher, which gives the same digest for the same bytes, takes over past the
        // buffer. The buffer comes in two sizes, so that a request without a body, or
        // with a short one, zeroes 256 bytes of stack rather than 2 KiB (about 120
        // instructions a call).
        let mut fields = fields.into_iter();
        let mut small = [0u8; SMALL];
        let mut len = 0;
        let digest = match lay_out(&mut small, &mut len, None, &mut fields) {
            None => xxhash_rust::xxh3::xxh3_128(&small[..len]),
            Some(past) => {
                let mut large = [0u8; LARGE];
                large[..len].copy_from_slice(&small[..len]);
                match lay_out(&mut large, &mut len, Some(past), &mut fields) {
                    None => xxhash_rust::xxh3::xxh3_128(&large[..len]),
                    Some(past) => {
                        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
                        hasher.update(&large[..len]);
                        for field in std::iter::once(past).chain(fields) {
                            hasher.update(&(field.len() as u64).to_be_bytes());
                            hasher.update(field);
                        }
                        hasher.digest128()
                    }
                }
            }
        };
        let mut out = [0u8; 32];
        out[0] = TAG_XXH3_128;
        out[1..17].copy_from_slice(&digest.to_be_bytes());
        Self(out)
    }

    /// Whether this fingerprint was made by an earlier version (a bare SHA-256 digest, not
    /// tagged with its algorithm), or by a function of your own that does not build on
    /// [`of_fields`](Self::of_fields).
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// assert!(Fingerprint::from_bytes([7; 32]).is_legacy());
    /// assert!(!Fingerprint::of_fields([b"x".as_slice()]).is_legacy());
    /// ```
    pub fn is_legacy(&self) -> bool {
        !(self.0[0] == TAG_XXH3_128 && self.0[17..].iter().all(|b| *b == 0))
    }

    /// The default fingerprint: method, path and query, content type and body.
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let (parts, ()) = http::Request::post("/orders?x=1").body(()).unwrap().into_parts();
    /// let one = Fingerprint::of_request(&parts, b"{\"amount\":1}");
    /// let two = Fingerprint::of_request(&parts, b"{\"amount\":2}");
    /// assert_ne!(one, two);
    /// ```
    pub fn of_request(parts: &Parts, body: &[u8]) -> Self {
        let path = parts
            .uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map_or(&[][..], |v| v.as_bytes());
        Self::of_fields([parts.method.as_str().as_bytes(), path, content_type, body])
    }

    /// The fields of [`of_request`](Self::of_request) hashed with SHA-256, a cryptographic
    /// hash, for a scope several callers share who do not trust each other: no one can
    /// build a payload with another's fingerprint (see [the module docs](self)). Slower on
    /// large bodies (about 38 µs per 64 KiB with SHA-NI). Its digests are untagged, as
    /// those of earlier versions were ([`is_legacy`](Self::is_legacy) is true).
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let (parts, ()) = http::Request::post("/orders").body(()).unwrap().into_parts();
    /// assert_ne!(
    ///     Fingerprint::of_request_sha256(&parts, b"{\"amount\":1}"),
    ///     Fingerprint::of_request_sha256(&parts, b"{\"amount\":2}"),
    /// );
    /// let tenants = tower_idempotency::IdempotencyLayer::default()
    ///     .share_keys_across_callers()
    ///     .fingerprint_with(|parts, body| Fingerprint::of_request_sha256(parts, body));
    /// ```
    pub fn of_request_sha256(parts: &Parts, body: &[u8]) -> Self {
        legacy(|| Self::of_request(parts, body))
    }

    /// A preset that ignores the parameters of the media type: `application/json;
    /// charset=utf-8` and `Application/JSON` fingerprint as `application/json`. Method,
    /// path and query, and body count as in [`of_request`](Self::of_request). Use it when
    /// clients differ in how they label the same payload; a parameter that changes how the
    /// body reads (a `charset` other than the one the body is in) is then not told apart.
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let req = |ct: &str| {
    ///     http::Request::post("/orders").header("content-type", ct).body(()).unwrap().into_parts().0
    /// };
    /// assert_eq!(
    ///     Fingerprint::of_request_ignoring_media_type_parameters(&req("application/json; charset=utf-8"), b"{}"),
    ///     Fingerprint::of_request_ignoring_media_type_parameters(&req("application/json"), b"{}"),
    /// );
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .fingerprint_with(|parts, body| Fingerprint::of_request_ignoring_media_type_parameters(parts, body));
    /// ```
    pub fn of_request_ignoring_media_type_parameters(parts: &Parts, body: &[u8]) -> Self {
        let media_type = media_type(parts);
        Self::of_fields([
            parts.method.as_str().as_bytes(),
            path_and_query(parts),
            media_type.as_bytes(),
            body,
        ])
    }

    /// A preset over the body alone: the same bytes sent to another path, with another
    /// method or content type, count as the same request. Use it only where one key can
    /// only ever reach one endpoint (a key minted per operation by the client).
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .fingerprint_with(|parts, body| Fingerprint::of_body(parts, body));
    /// ```
    pub fn of_body(_parts: &Parts, body: &[u8]) -> Self {
        Self::of_fields([body])
    }

    /// A preset for JSON APIs (feature `json`): method, path and query, the media type
    /// without parameters, and the body as canonical JSON (object keys sorted, no
    /// whitespace), so that a client that serialises the same document differently (key
    /// order, spacing, escapes) is not refused with `422`. A body that is not JSON counts
    /// by its bytes. Numbers count as written: `1` and `1.0` differ. A body with a number
    /// that a parse would change (more digits than a 64-bit float holds, as in
    /// `1.000000000000000001`; an exponent; a trailing zero) counts by its bytes too, so
    /// that two different amounts never count as one.
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let (parts, ()) = http::Request::post("/orders").body(()).unwrap().into_parts();
    /// assert_eq!(
    ///     Fingerprint::of_canonical_json(&parts, br#"{"a": 1, "b": [true, null]}"#),
    ///     Fingerprint::of_canonical_json(&parts, br#"{"b":[true,null],"a":1}"#),
    /// );
    /// let layer = tower_idempotency::IdempotencyLayer::default()
    ///     .fingerprint_with(|parts, body| Fingerprint::of_canonical_json(parts, body));
    /// ```
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn of_canonical_json(parts: &Parts, body: &[u8]) -> Self {
        let canonical = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .filter(|_| numbers_survive_parsing(body))
            .map(canonical_json);
        let media_type = media_type(parts);
        Self::of_fields([
            parts.method.as_str().as_bytes(),
            path_and_query(parts),
            media_type.as_bytes(),
            canonical.as_deref().unwrap_or(body),
        ])
    }

    /// The digest as lowercase hexadecimal.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

/// Whether every number in `json` (valid JSON) is written as its parsed value is written
/// again: then its canonical form loses nothing. A number a parse would change (more
/// digits than an `f64` holds, an integer past 64 bits, `1e2`, `1.50`) could make two
/// different documents one.
#[cfg(feature = "json")]
fn numbers_survive_parsing(json: &[u8]) -> bool {
    let (mut i, mut in_string) = (0, false);
    while i < json.len() {
        let b = json[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let text = std::str::from_utf8(&json[start..i]).unwrap_or("");
                match serde_json::from_str::<serde_json::Number>(text) {
                    Ok(number) if number.to_string() == text => {}
                    _ => return false,
                }
            }
            _ => i += 1,
        }
    }
    true
}

/// `value` as JSON text with every object's keys sorted: the same text for the same value,
/// whatever order its maps had. Keys are sorted here, not left to `serde_json`'s map, whose
/// order depends on a feature (`preserve_order`) any crate in the build may turn on.
#[cfg(feature = "json")]
pub(crate) fn canonical_json(value: serde_json::Value) -> Vec<u8> {
    // The parser limits nesting (128 levels), so the recursion is bounded for parsed
    // values; a value built in memory is as deep as its author made it.
    fn sorted(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    serde_json::to_vec(&sorted(value)).unwrap_or_default()
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

/// The stack buffer a fingerprint's fields are first laid out in.
const SMALL: usize = 256;
/// The stack buffer fields move to when they do not fit in [`SMALL`]; past it, the
/// streaming hasher.
const LARGE: usize = 2048;

/// Lays `first` (if any), then `rest`, out in `buf` from `len`, each field after its
/// length; returns the first field that does not fit, none of it written.
fn lay_out<'a>(
    buf: &mut [u8],
    len: &mut usize,
    first: Option<&'a [u8]>,
    rest: &mut impl Iterator<Item = &'a [u8]>,
) -> Option<&'a [u8]> {
    for field in first.into_iter().chain(rest) {
        let end = *len + 8 + field.len();
        if end > buf.len() {
            return Some(field);
        }
        buf[*len..*len + 8].copy_from_slice(&(field.len() as u64).to_be_bytes());
        buf[*len + 8..end].copy_from_slice(field);
        *len = end;
    }
    None
}

fn path_and_query(parts: &Parts) -> &[u8] {
    parts
        .uri
        .path_and_query()
        .map_or("", |p| p.as_str())
        .as_bytes()
}

/// The media type of the request, lowercase, without parameters.
fn media_type(parts: &Parts) -> String {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| {
            let bytes = v.as_bytes();
            let essence = bytes.split(|b| *b == b';').next().unwrap_or_default();
            String::from_utf8_lossy(essence).trim().to_ascii_lowercase()
        })
        .unwrap_or_default()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    /// Two documents whose numbers differ only past what a 64-bit float holds (or past 64
    /// bits) fingerprint apart: their canonical forms would be one, so they count by their
    /// bytes. Documents whose numbers survive parsing still count by their canonical form.
    /// (Found by review: `1.000000000000000001` and `1.000000000000000002` were one
    /// amount, and the second request got the first's answer instead of `422`.)
    #[cfg(feature = "json")]
    #[test]
    fn canonical_json_never_makes_two_amounts_one() {
        let (parts, ()) = http::Request::post("/pay").body(()).unwrap().into_parts();
        let of = |body: &str| Fingerprint::of_canonical_json(&parts, body.as_bytes());
        for (a, b) in [
            (
                r#"{"amount":1.000000000000000001}"#,
                r#"{"amount":1.000000000000000002}"#,
            ),
            (
                r#"{"amount":100000000000000000001}"#,
                r#"{"amount":100000000000000000002}"#,
            ),
            (r#"{"amount":1e2}"#, r#"{"amount":100.0}"#),
            (r#"{"amount":1.50}"#, r#"{"amount":1.5}"#),
        ] {
            assert_ne!(of(a), of(b), "{a} and {b}");
        }
        // Numbers that survive parsing: key order and spacing still do not count.
        assert_eq!(
            of(r#"{"amount": 12.5, "n": -3, "tags": ["a\"1", 7]}"#),
            of(r#"{"tags":["a\"1",7],"n":-3,"amount":12.5}"#)
        );
    }

    use super::*;

    /// The digest the streaming hasher gives for the fields, as every fingerprint was made
    /// before small requests were hashed in one call: both must agree, or stored
    /// fingerprints would stop matching their retries.
    fn streamed(fields: &[&[u8]]) -> Fingerprint {
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        for field in fields {
            hasher.update(&(field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        let mut out = [0u8; 32];
        out[0] = TAG_XXH3_128;
        out[1..17].copy_from_slice(&hasher.digest128().to_be_bytes());
        Fingerprint(out)
    }

    /// Fingerprints are stored: a retry after an upgrade must fingerprint as its first
    /// request did before it. Pinned to digests made apart from this crate (Python's
    /// `xxhash.xxh3_128` over the length-prefixed fields), laid out and streamed.
    #[test]
    fn fingerprints_stay_the_digests_stored_records_hold() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let small: [&[u8]; 4] = [
            b"POST",
            b"/orders?x=1",
            b"application/json",
            b"{\"amount\":12}",
        ];
        let large: [&[u8]; 4] = [b"POST", b"/orders", b"application/json", &body];
        assert_eq!(
            Fingerprint::of_fields(small).to_hex()[2..34],
            *"c8dc79d7968c2980d4507cdd9dbfff13"
        );
        assert_eq!(
            Fingerprint::of_fields(large).to_hex()[2..34],
            *"9d331a89f6e75c1cbf81ab5f7a903b55"
        );
        assert_eq!(Fingerprint::of_fields(small), streamed(&small));
        assert_eq!(Fingerprint::of_fields(large), streamed(&large));
    }

    #[test]
    fn small_and_large_requests_hash_as_the_stream_does() {
        let body: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Around the stack buffers' ends: the method, path and type take 8 + 4, 8 + 7 and
        // 8 + 16 bytes, and the body's length 8, so a body of 197 bytes fills the small
        // buffer's 256 exactly, and one of 1,989 bytes the large one's 2,048.
        for size in [
            0, 1, 100, 195, 196, 197, 198, 199, 256, 400, 461, 512, 1024, 1987, 1988, 1989, 1990,
            1991, 2048, 4096, 70_000,
        ] {
            let fields: [&[u8]; 4] = [b"POST", b"/orders", b"application/json", &body[..size]];
            assert_eq!(
                Fingerprint::of_fields(fields),
                streamed(&fields),
                "body of {size}"
            );
        }
        // A large first field, then small ones; one past the buffer, then small ones.
        let fields: [&[u8]; 3] = [&body[..600], b"x", b""];
        assert_eq!(Fingerprint::of_fields(fields), streamed(&fields));
        let fields: [&[u8]; 3] = [&body[..3000], b"x", b"yz"];
        assert_eq!(Fingerprint::of_fields(fields), streamed(&fields));
        // Fields that fill the small buffer one by one, then the large one.
        let fields: Vec<&[u8]> = (0..300).map(|i| &body[..i % 13]).collect();
        assert_eq!(
            Fingerprint::of_fields(fields.iter().copied()),
            streamed(&fields)
        );
        // A field that fits neither buffer right after the small one overflows.
        let fields: [&[u8]; 3] = [&body[..240], &body[..2100], b"z"];
        assert_eq!(Fingerprint::of_fields(fields), streamed(&fields));
        let none: [&[u8]; 0] = [];
        assert_eq!(Fingerprint::of_fields(none), streamed(&none));
    }

    fn parts(method: &str, uri: &str, ct: Option<&str>) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn every_field_counts() {
        let base = Fingerprint::of_request(&parts("POST", "/a?x=1", Some("a/b")), b"body");
        for other in [
            Fingerprint::of_request(&parts("PATCH", "/a?x=1", Some("a/b")), b"body"),
            Fingerprint::of_request(&parts("POST", "/a?x=2", Some("a/b")), b"body"),
            Fingerprint::of_request(&parts("POST", "/b?x=1", Some("a/b")), b"body"),
            Fingerprint::of_request(&parts("POST", "/a?x=1", None), b"body"),
            Fingerprint::of_request(&parts("POST", "/a?x=1", Some("a/b")), b"bod"),
        ] {
            assert_ne!(base, other);
        }
        let again = Fingerprint::of_request(&parts("POST", "/a?x=1", Some("a/b")), b"body");
        assert_eq!(base, again);
    }

    #[test]
    fn legacy_mode_is_the_old_sha256_and_ends_with_its_scope() {
        let p = parts("POST", "/a", Some("a/b"));
        let old = legacy(|| Fingerprint::of_request(&p, b"body"));
        let mut sha = Sha256::new();
        for field in [&b"POST"[..], b"/a", b"a/b", b"body"] {
            sha.update((field.len() as u64).to_be_bytes());
            sha.update(field);
        }
        assert_eq!(old.as_bytes(), &<[u8; 32]>::from(sha.finalize()));
        assert!(old.is_legacy());
        let new = Fingerprint::of_request(&p, b"body");
        assert!(!new.is_legacy());
        assert_ne!(old, new);
        // Nested and panicking scopes restore the mode.
        let _ = std::panic::catch_unwind(|| legacy(|| panic!("inside")));
        assert!(!Fingerprint::of_request(&p, b"body").is_legacy());
    }

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0, 15, 16, 255]), "000f10ff");
        assert_eq!(Fingerprint::from_bytes([0xab; 32]).to_hex().len(), 64);
    }
}
