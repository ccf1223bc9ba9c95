//! Request fingerprints: what makes two requests with one key "the same request".

use std::fmt;

use http::request::Parts;
use sha2::{Digest, Sha256};

/// A SHA-256 digest identifying a request's payload.
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

    /// The SHA-256 of the given fields, each prefixed by its length (so that no two lists of
    /// fields can produce the same input).
    ///
    /// ```
    /// use tower_idempotency::Fingerprint;
    ///
    /// let a = Fingerprint::of_fields([b"ab".as_slice(), b"c"]);
    /// let b = Fingerprint::of_fields([b"a".as_slice(), b"bc"]);
    /// assert_ne!(a, b);
    /// ```
    pub fn of_fields<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        for field in fields {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        Self(hasher.finalize().into())
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
    /// by its bytes. Numbers count as written: `1` and `1.0` differ.
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
        // Keys are sorted here, not left to `serde_json`'s map, whose order depends on a
        // feature (`preserve_order`) any crate in the build may turn on. The parser limits
        // nesting (128 levels), so the recursion is bounded.
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
        let canonical = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|value| serde_json::to_vec(&sorted(value)).ok());
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

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
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
    use super::*;

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
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0, 15, 16, 255]), "000f10ff");
        assert_eq!(Fingerprint::from_bytes([0xab; 32]).to_hex().len(), 64);
    }
}
