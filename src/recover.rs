//! The recovery hook's types: what it is given of a committed operation with no stored
//! outcome ([`Unsettled`]) and what it answers ([`Recovery`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, Uri};

use crate::key::StoreKey;

/// A committed operation with no stored outcome, as a recovery hook
/// ([`IdempotencyLayer::recover_with`](crate::IdempotencyLayer::recover_with)) is given
/// it: the key and the retry that found it so.
///
/// Its `Debug` shows the retry's header names, not their values: a hook that logs it
/// (`?unsettled`) never writes a credential (`Authorization`, `Cookie`) to the logs.
#[derive(Clone)]
pub struct Unsettled {
    key: StoreKey,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl std::fmt::Debug for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsettled")
            .field("key", &self.key)
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("header_names", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Unsettled {
    pub(crate) fn new(key: StoreKey, method: &Method, uri: &Uri, headers: &HeaderMap) -> Self {
        Self {
            key,
            method: method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
        }
    }

    /// The client's key (as [`IdempotencyClaim::key`](crate::IdempotencyClaim::key) gave it to the operation).
    pub fn key(&self) -> &str {
        self.key.client_key()
    }

    /// The caller's scope (as [`IdempotencyClaim::scope`](crate::IdempotencyClaim::scope) gave it to the operation).
    pub fn scope(&self) -> &str {
        let s = self.key.as_str();
        s.split_once(':').map_or(s, |(scope, _)| scope)
    }

    /// The key as the store keeps it.
    pub fn store_key(&self) -> &StoreKey {
        &self.key
    }

    /// The retry's method (the same as the operation's: the fingerprint matched).
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The retry's URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The retry's headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// An error a recovery hook returns.
pub type RecoveryError = Box<dyn std::error::Error + Send + Sync>;

/// What a recovery hook ([`IdempotencyLayer::recover_with`](crate::IdempotencyLayer::recover_with))
/// found of a committed operation with no stored outcome.
///
/// A hook may also return `Option<Response<Bytes>>`: `Some` is [`Recovery::Answer`], `None`
/// is [`Recovery::Unknown`].
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::Recovery;
///
/// let found: Recovery = Some(http::Response::new(Bytes::from_static(b"order 7"))).into();
/// assert!(matches!(found, Recovery::Answer(_)));
/// let nothing: Recovery = None.into();
/// assert!(matches!(nothing, Recovery::Unknown));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Recovery {
    /// The operation's answer, rebuilt from what it left: stored under the key and
    /// replayed, to this retry and every later one.
    Answer(Response<Bytes>),
    /// Nothing can be said yet: the retry gets `500 outcome-unknown`, and the hook is asked
    /// again on the next retry.
    Unknown,
    /// The operation certainly made none of its effects (for instance it committed, then
    /// crashed before the step the commit protected, and the hook's own records prove the
    /// step never happened): the commit is withdrawn, fenced by the token that made it
    /// ([`IdempotencyStore::revoke`](crate::store::IdempotencyStore::revoke)), and this
    /// retry runs the operation. Should another retry have withdrawn it first and be
    /// running it already, this one is told it is in flight. Only answer this when the
    /// effects provably never happened **and can no longer happen**: it runs the operation
    /// again. An owner whose lease lapsed may be alive but cut off (a paused process), and
    /// could still make its effect after the hook looked; so answer `NeverRan` only when
    /// the owner is known to be gone, or when the effect itself is fenced by the key (for
    /// instance written under a unique constraint on scope and key, so that a late owner's
    /// write fails).
    NeverRan,
}

impl From<Option<Response<Bytes>>> for Recovery {
    fn from(found: Option<Response<Bytes>>) -> Self {
        found.map_or(Self::Unknown, Self::Answer)
    }
}

type RecoveryFuture = Pin<Box<dyn Future<Output = Result<Recovery, RecoveryError>> + Send>>;

/// A recovery hook, boxed.
pub(crate) type RecoverFn = dyn Fn(Unsettled) -> RecoveryFuture + Send + Sync;

pub(crate) fn boxed_recovery<F, Fut, R>(f: F) -> Arc<RecoverFn>
where
    F: Fn(Unsettled) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RecoveryError>> + Send + 'static,
    R: Into<Recovery> + 'static,
{
    Arc::new(move |unsettled| {
        let fut = f(unsettled);
        Box::pin(async move { fut.await.map(Into::into) }) as RecoveryFuture
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Scope;

    /// A hook that logs what it was given (`?unsettled`) writes no credential: the
    /// headers' names show, not their values, and the key shows without its scope.
    /// (Found by review: the derived `Debug` printed `Authorization` and `Cookie` whole.)
    #[test]
    fn logging_an_unsettled_operation_writes_no_credential() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer s3cr3t-token".parse().unwrap());
        headers.insert("cookie", "session=hunter2".parse().unwrap());
        let key = StoreKey::new(&Scope::of(b"alice"), "order-1");
        let unsettled = Unsettled::new(key, &Method::POST, &"/orders".parse().unwrap(), &headers);
        let logged = format!("{unsettled:?}");
        assert!(
            logged.contains("authorization") && logged.contains("order-1"),
            "{logged}"
        );
        assert!(
            !logged.contains("s3cr3t") && !logged.contains("hunter2"),
            "{logged}"
        );
        assert!(!logged.contains(Scope::of(b"alice").as_str()), "{logged}");
    }
}
