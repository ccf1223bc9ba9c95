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
