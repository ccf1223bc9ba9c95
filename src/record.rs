//! The stored outcome of an operation and its binary encoding.
//!
//! # Encoding and compatibility
//!
//! An encoded record starts with a magic byte and a version byte (now `1`). The rule
//! between versions:
//!
//! - a reader decodes exactly the versions it knows; any other version is
//!   [`DecodeError::UnsupportedVersion`], never a guess;
//! - a change that an older reader could misread gets a new version number, so an older
//!   reader meeting a newer record (a rolling upgrade) fails cleanly instead;
//! - the layer treats every record it cannot decode (damaged, or of an unknown version) as
//!   proof that the operation ran: the request gets `500 record-unreadable` (gRPC
//!   `INTERNAL`), whatever the store-failure policy, an `error` event is logged, and the
//!   operation never runs again with that key. Once the newer instances serve the key (or
//!   the record's TTL ends), it is answered normally again.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::fingerprint::Fingerprint;

/// The outcome of an operation, as stored and replayed.
///
/// A record keeps the response status, every header value in order (duplicate names and
/// values that are not UTF-8 included), the body as [`Bytes`] and the trailers, together with
/// the fingerprint of the request that produced it.
///
/// Two records are equal when their status, headers (every value, in the order given),
/// body, trailers, fingerprint and tombstone mark are.
///
/// A record whose body was over the layer's response limit is a *tombstone*: it keeps the
/// status and headers but no body, so that a retry learns the operation already ran and is
/// never run twice.
///
/// # Example
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::{Fingerprint};
/// use tower_idempotency::store::Record;
///
/// let mut headers = HeaderMap::new();
/// headers.append("set-cookie", "a=1".parse().unwrap());
/// headers.append("set-cookie", "b=2".parse().unwrap());
/// let record = Record::new(StatusCode::CREATED, headers, Bytes::from_static(b"{}"), None)
///     .with_fingerprint(Fingerprint::from_bytes([7; 32]));
///
/// let decoded = Record::decode(&record.encode()).unwrap();
/// assert_eq!(decoded, record);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    status: StatusCode,
    /// The headers as a record keeps them (see [`Fields`]).
    headers: Fields,
    /// The headers as a map, for [`Record::headers`]: made the first time it is asked for.
    map: HeadersAsMap,
    body: Bytes,
    /// Boxed: rare (gRPC's), and a record is moved through several frames on its way to
    /// the store, each a copy of it.
    trailers: Option<Box<HeaderMap>>,
    fingerprint: Fingerprint,
    tombstone: bool,
    /// The headers a replay of this record carries, made at the first replay and kept
    /// with the record (a record kept in memory is replayed by cloning them).
    replay: ReplayHeaders,
}

/// Something a [`Record`] makes once from its other fields, which never change once a
/// record is made, and keeps: it takes no part in comparing records.
#[derive(Clone)]
struct Cached<T>(std::sync::OnceLock<Box<T>>);

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Self(std::sync::OnceLock::new())
    }
}

impl<T> PartialEq for Cached<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Cached<T> {}

impl<T> std::fmt::Debug for Cached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

/// A record's replay headers, made at its first replay, and beside them the bytes a store
/// counted for them when they were made (0 if none did).
type ReplayHeaders = Cached<(HeaderMap, usize)>;

/// [`Record::headers`]'s map, made from the record's fields when first asked for.
type HeadersAsMap = Cached<HeaderMap>;

/// A record's headers as it keeps them: the (name, value) pairs in their order, duplicate
/// names included, in one allocation of their exact size.
///
/// A `HeaderMap` takes 96 bytes inline and two allocations, one of them 104 bytes per
/// field: a record that held one for as long as its key is kept (a day, by default) took
/// 144–175 bytes more of resident memory with two fields (BENCHMARKS.md), and a first
/// request one allocation more. The crate reads the pairs; [`Record::headers`] makes the
/// map for whoever asks.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Fields(Box<[(HeaderName, HeaderValue)]>);

impl Fields {
    /// The fields of `map`, in its order (each name's values together, in order).
    pub(crate) fn from_map(map: HeaderMap) -> Self {
        let mut fields = Vec::with_capacity(map.len());
        let mut name: Option<HeaderName> = None;
        for (next, value) in map {
            if next.is_some() {
                name = next;
            }
            // A map's first value always comes with its name.
            if let Some(name) = &name {
                fields.push((name.clone(), value));
            }
        }
        Self(fields.into_boxed_slice())
    }

    /// The fields of `map` that `keep` keeps, in its order.
    pub(crate) fn kept_from(map: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> Self {
        let mut fields = Vec::with_capacity(map.len());
        for (name, value) in map {
            if keep(name) {
                fields.push((name.clone(), value.clone()));
            }
        }
        Self(fields.into_boxed_slice())
    }

    /// One field.
    pub(crate) fn one(name: HeaderName, value: HeaderValue) -> Self {
        Self(Box::new([(name, value)]))
    }

    /// The first value under `name` (its lowercase form).
    pub(crate) fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Whether the content type is gRPC's (as [`is_grpc`](crate::problem::is_grpc) tells of
    /// a map).
    pub(crate) fn is_grpc(&self) -> bool {
        self.get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    }

    /// Whether a field is named `name` (its lowercase form).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The fields, in order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = (&HeaderName, &HeaderValue)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    /// How many fields (values) there are.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The fields as a map (`extra` more fields of room).
    ///
    /// Every record's fields fit a map: they come from one, or from an encoding refused if
    /// they would not ([`Record::decode`]). So no field is left out here, and nothing
    /// panics: room is asked for, not demanded (many values under one name need less room
    /// than their count), and each field is offered with `try_append`.
    pub(crate) fn to_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::try_with_capacity(self.0.len() + extra).unwrap_or_default();
        for (name, value) in self.iter() {
            let _fits = map.try_append(name.clone(), value.clone());
        }
        map
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The encoding was written by a newer version of this crate.
    #[error("unsupported record encoding version {0}")]
    UnsupportedVersion(u8),
    /// The bytes end before the record does.
    #[error("record encoding is truncated")]
    Truncated,
    /// The bytes go on after the record ends.
    #[error("record encoding has {0} trailing bytes")]
    TrailingBytes(usize),
    /// A field holds a value that cannot be part of a response.
    #[error("record encoding holds an invalid {0}")]
    Invalid(&'static str),
    /// A record sealed at rest cannot be opened (feature `encryption`): tampered, moved to
    /// another key, sealed under a key the ring does not hold (its id is said), or a
    /// plaintext record where records are sealed.
    #[error("sealed record: {0}")]
    Sealed(String),
}

/// The header that marks a record sealed at rest (feature `encryption`,
/// `store::sealed`) and names its key id. The layer never replays a record that carries it:
/// one its store did not open is unreadable, whether or not this build can seal.
pub const SEALED_HEADER: http::HeaderName = http::HeaderName::from_static("idempotency-sealed");

const MAGIC: u8 = 0xA7;
const VERSION: u8 = 1;
const FLAG_TOMBSTONE: u8 = 1;
const FLAG_TRAILERS: u8 = 2;

impl Record {
    /// A record of a complete response.
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self::of_fields(
            status,
            Fields::from_map(headers),
            body,
            trailers.map(Box::new),
        )
    }

    /// [`Record::new`] with its headers as a record keeps them, and trailers already boxed.
    pub(crate) fn of_fields(
        status: StatusCode,
        headers: Fields,
        body: Bytes,
        trailers: Option<Box<HeaderMap>>,
    ) -> Self {
        Self {
            status,
            headers,
            map: HeadersAsMap::default(),
            body,
            trailers,
            fingerprint: Fingerprint::from_bytes([0; 32]),
            tombstone: false,
            replay: ReplayHeaders::default(),
        }
    }

    /// A tombstone: the operation ran, but its body was too large to keep.
    pub fn tombstone(status: StatusCode, headers: HeaderMap) -> Self {
        Self::tombstone_of(status, Fields::from_map(headers))
    }

    /// [`Record::tombstone`] with its headers as a record keeps them.
    pub(crate) fn tombstone_of(status: StatusCode, headers: Fields) -> Self {
        Self {
            tombstone: true,
            ..Self::of_fields(status, headers, Bytes::new(), None)
        }
    }

    /// Sets the fingerprint of the request that produced this record.
    pub fn with_fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers, in the order they were produced.
    ///
    /// A record keeps its headers in a form smaller than a map (it may be kept for a day):
    /// the map is made the first time it is asked for, and kept with the record.
    pub fn headers(&self) -> &HeaderMap {
        self.map.0.get_or_init(|| Box::new(self.headers.to_map(0)))
    }

    /// The response headers as the record keeps them (no map made).
    pub(crate) fn fields(&self) -> &Fields {
        &self.headers
    }

    /// The response body (empty for a tombstone).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The response trailers, if the body ended with some.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_deref()
    }

    /// The fingerprint of the request that produced this record.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Whether this record is a tombstone (the body was too large to keep).
    pub fn is_tombstone(&self) -> bool {
        self.tombstone
    }

    /// The headers a replay of this record carries, if they were made and kept with it
    /// ([`keep_replay_headers`](Self::keep_replay_headers)).
    pub(crate) fn kept_replay_headers(&self) -> Option<&HeaderMap> {
        self.replay.0.get().map(|kept| &kept.0)
    }

    /// What keeping `headers` as a record's replay headers takes (an estimate, as
    /// [`size`](Self::size) is): the map, and a bucket per field it has room for (a name, a
    /// value, the hash and links); the values' bytes are mostly the record's own, shared.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn replay_headers_size(headers: &HeaderMap) -> usize {
        let bucket = std::mem::size_of::<HeaderName>() + std::mem::size_of::<HeaderValue>() + 16;
        std::mem::size_of::<HeaderMap>() + headers.capacity() * bucket
    }

    /// Keeps `headers` with the record as its replay headers, counted as `bytes` (answered
    /// by [`replay_bytes`](Self::replay_bytes) from then on): for a store that keeps the
    /// record and counts its bytes. False, and nothing kept, when it has some already.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn keep_replay_headers(&self, headers: HeaderMap, bytes: usize) -> bool {
        self.replay.0.set(Box::new((headers, bytes))).is_ok()
    }

    /// The bytes counted for this record's replay headers by
    /// [`keep_replay_headers`](Self::keep_replay_headers) (0 if none were kept).
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn replay_bytes(&self) -> usize {
        self.replay.0.get().map_or(0, |cached| cached.1)
    }

    /// An estimate of the bytes this record occupies, used for memory bounds.
    pub fn size(&self) -> usize {
        fn map_size<'a>(fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> usize {
            fields.map(|(n, v)| n.as_str().len() + v.len() + 32).sum()
        }
        std::mem::size_of::<Self>()
            + self.body.len()
            + map_size(self.headers.iter())
            // The trailers' map is boxed, outside the record's own size.
            + self
                .trailers
                .as_deref()
                .map_or(0, |t| std::mem::size_of::<HeaderMap>() + map_size(t.iter()))
    }

    /// Copies the record's body into a buffer of its own, of the body's exact size: a
    /// body sliced from a larger buffer (what tonic's encoder yields) would otherwise keep
    /// all of that buffer alive. For a store that keeps records in memory.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    pub(crate) fn own_body(&mut self) {
        if !self.body.is_empty() {
            self.body = Bytes::copy_from_slice(&self.body);
        }
    }

    /// Encodes the record in the versioned binary format that [`Record::decode`] reads.
    ///
    /// The format is: a magic byte and a version byte; flags; the status; the
    /// fingerprint; the headers as a count (u32) and name/value pairs, each prefixed by its
    /// length (u16 for names, which `http` caps below 64 KiB, u32 for values); the body,
    /// prefixed by its length (u64); the trailers like the headers. All integers are
    /// big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(self.size());
        out.put_u8(MAGIC);
        out.put_u8(VERSION);
        let mut flags = 0;
        if self.tombstone {
            flags |= FLAG_TOMBSTONE;
        }
        if self.trailers.is_some() {
            flags |= FLAG_TRAILERS;
        }
        out.put_u8(flags);
        out.put_u16(self.status.as_u16());
        out.put_slice(self.fingerprint.as_bytes());
        encode_fields(&mut out, self.headers.len(), self.headers.iter());
        out.put_u64(self.body.len() as u64);
        out.put_slice(&self.body);
        if let Some(trailers) = self.trailers.as_deref() {
            encode_fields(&mut out, trailers.len(), trailers.iter());
        }
        out.to_vec()
    }

    /// Decodes a record written by [`Record::encode`].
    pub fn decode(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let buf = &mut bytes;
        let magic = get_u8(buf)?;
        if magic != MAGIC {
            return Err(DecodeError::Invalid("magic byte"));
        }
        let version = get_u8(buf)?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let flags = get_u8(buf)?;
        let status =
            StatusCode::from_u16(get_u16(buf)?).map_err(|_| DecodeError::Invalid("status code"))?;
        let fingerprint: [u8; 32] = take(buf, 32)?
            .try_into()
            .map_err(|_| DecodeError::Truncated)?;
        let headers = decode_fields(buf)?;
        let body_len = usize::try_from(get_u64(buf)?).map_err(|_| DecodeError::Truncated)?;
        let body = Bytes::copy_from_slice(take(buf, body_len)?);
        let trailers = if flags & FLAG_TRAILERS != 0 {
            Some(Box::new(decode_map(buf)?))
        } else {
            None
        };
        if !buf.is_empty() {
            return Err(DecodeError::TrailingBytes(buf.len()));
        }
        Ok(Self {
            status,
            headers,
            map: HeadersAsMap::default(),
            body,
            trailers,
            fingerprint: Fingerprint::from_bytes(fingerprint),
            tombstone: flags & FLAG_TOMBSTONE != 0,
            replay: ReplayHeaders::default(),
        })
    }
}

fn encode_fields<'a>(
    out: &mut BytesMut,
    len: usize,
    fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    out.put_u32(len as u32);
    for (name, value) in fields {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
}

/// The headers of an encoded record, as a record keeps them. Refused, as the trailers' map
/// is, when no map could hold them ([`Record::headers`] makes one).
fn decode_fields(buf: &mut &[u8]) -> Result<Fields, DecodeError> {
    let count = get_u32(buf)? as usize;
    // Every entry takes at least six bytes: do not trust a huge count.
    if count > buf.len() / 6 {
        return Err(DecodeError::Truncated);
    }
    // Room for a few: a crafted count may ask for far more than its bytes could hold
    // once decoded (a pair takes 72 bytes, its encoding as few as six).
    let mut fields = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name_len = get_u16(buf)? as usize;
        let name = HeaderName::from_bytes(take(buf, name_len)?)
            .map_err(|_| DecodeError::Invalid("header name"))?;
        let value_len = get_u32(buf)? as usize;
        let value = HeaderValue::from_bytes(take(buf, value_len)?)
            .map_err(|_| DecodeError::Invalid("header value"))?;
        fields.push((name, value));
    }
    let fields = Fields(fields.into_boxed_slice());
    // A map holds at most 32,768 names and panics past that; fewer values than that are
    // fewer names. More are rare: checked the way a map would take them.
    if fields.len() > 1 << 15 {
        let too_many = |_| DecodeError::Invalid("more header values than a header map holds");
        let mut map = HeaderMap::new();
        for (name, value) in fields.iter() {
            map.try_append(name.clone(), value.clone())
                .map_err(too_many)?;
        }
    }
    Ok(fields)
}

/// The trailers of an encoded record, as a map: its fields, checked as the headers are.
fn decode_map(buf: &mut &[u8]) -> Result<HeaderMap, DecodeError> {
    Ok(decode_fields(buf)?.to_map(0))
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn get_u8(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    if buf.remaining() < 1 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut &[u8]) -> Result<u16, DecodeError> {
    if buf.remaining() < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u16())
}

fn get_u64(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    if buf.remaining() < 8 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u64())
}

fn get_u32(buf: &mut &[u8]) -> Result<u32, DecodeError> {
    if buf.remaining() < 4 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Duplicate names, a value that is not UTF-8, in an order that is not the names'.
    fn tricky_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append(
            "x-bytes",
            HeaderValue::from_bytes(&[0xff, 0xfe, b'a']).unwrap(),
        );
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers
    }

    fn tricky() -> Record {
        let headers = tricky_headers();
        let mut trailers = HeaderMap::new();
        trailers.append("grpc-status", HeaderValue::from_static("3"));
        trailers.append("grpc-message", HeaderValue::from_static("bad%20thing"));
        Record::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(&[0, 1, 2, 255, 254]),
            Some(trailers),
        )
        .with_fingerprint(Fingerprint::from_bytes([9; 32]))
    }

    #[test]
    fn round_trips_tricky_records() {
        let record = tricky();
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded, record);
        let order: Vec<_> = decoded.headers().get_all("x-multi").iter().collect();
        assert_eq!(order, ["one", "two"]);
    }

    /// The memory store's cap counts a record's trailers, map and all, though the record
    /// keeps them boxed outside its own size.
    #[test]
    fn a_records_size_counts_its_boxed_trailers() {
        let with = tricky();
        let trailers = with.trailers().unwrap().clone();
        let without = Record::new(
            with.status(),
            with.headers().clone(),
            with.body().clone(),
            None,
        );
        let entries: usize = trailers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        assert_eq!(
            with.size() - without.size(),
            std::mem::size_of::<HeaderMap>() + entries
        );
    }

    /// A record keeps its headers as pairs in one allocation, not as a map: 128 bytes of
    /// record where a map made it 192, and one allocation for two fields where a map takes
    /// two (its index and its buckets of 104 bytes each).
    #[test]
    fn a_record_keeps_its_headers_small() {
        assert!(
            std::mem::size_of::<Record>() <= 128,
            "a record is {} bytes",
            std::mem::size_of::<Record>()
        );
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("location", HeaderValue::from_static("/orders/1"));
        let record = Record::new(StatusCode::CREATED, headers.clone(), Bytes::new(), None);
        assert_eq!(
            std::mem::size_of_val(&*record.fields().0),
            2 * std::mem::size_of::<(HeaderName, HeaderValue)>()
        );
        // The map, for whoever asks, is the map the record was made from.
        assert_eq!(record.headers(), &headers);
    }

    /// The map a record makes of its fields is the one it was made from: every value in
    /// order, duplicate names, bytes that are not UTF-8, whatever the record went through
    /// (made, encoded, decoded, cloned); and asking twice makes it once.
    #[test]
    fn a_records_headers_come_back_as_they_were_given() {
        let record = tricky();
        let given = tricky_headers();
        for copy in [
            record.clone(),
            Record::decode(&record.encode()).unwrap(),
            Record::new(
                record.status(),
                record.headers().clone(),
                record.body().clone(),
                None,
            ),
        ] {
            assert_eq!(copy.headers(), &given);
            let order: Vec<_> = copy
                .headers()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            let kept: Vec<_> = copy
                .fields()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            assert_eq!(order, kept, "the map's order is the record's");
            assert!(std::ptr::eq(copy.headers(), copy.headers()), "made once");
        }
        // Equal records hold the same values in the same order, across names too (as
        // the type's documentation says).
        let mut reordered = HeaderMap::new();
        reordered.append("content-type", HeaderValue::from_static("application/json"));
        for (name, value) in &given {
            if name != "content-type" {
                reordered.append(name.clone(), value.clone());
            }
        }
        assert_eq!(reordered, given, "the same map, to http");
        let other = Record::new(record.status(), reordered, record.body().clone(), None)
            .with_fingerprint(*record.fingerprint());
        let same = Record::new(record.status(), given.clone(), record.body().clone(), None)
            .with_fingerprint(*record.fingerprint());
        assert_ne!(other, same, "another order is another record");
        assert_eq!(same.clone(), same);
        assert_eq!(record.fields().get("x-multi").unwrap(), "one");
        assert!(record.fields().contains("content-type"));
        assert!(!record.fields().contains("x-absent"));
    }

    #[test]
    fn round_trips_tombstones_and_empty_bodies() {
        let t = Record::tombstone(StatusCode::OK, HeaderMap::new());
        assert!(Record::decode(&t.encode()).unwrap().is_tombstone());
        let e = Record::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new(), None);
        let d = Record::decode(&e.encode()).unwrap();
        assert_eq!(d, e);
        assert!(d.trailers().is_none());
    }

    #[test]
    fn rejects_damaged_encodings() {
        let bytes = tricky().encode();
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Record::decode(&longer), Err(DecodeError::TrailingBytes(1)));
        let mut newer = bytes;
        newer[1] = 99;
        assert_eq!(
            Record::decode(&newer),
            Err(DecodeError::UnsupportedVersion(99))
        );
    }

    #[test]
    fn many_header_values_round_trip_and_too_many_are_refused() {
        // 25,000 values under one name: a record the crate can make must read back.
        let mut headers = HeaderMap::new();
        for i in 0..25_000u32 {
            headers.append("x-many", HeaderValue::from(i));
        }
        let record = Record::new(StatusCode::OK, headers, Bytes::new(), None);
        let decoded = Record::decode(&record.encode()).expect("decodes");
        assert_eq!(decoded.headers().get_all("x-many").iter().count(), 25_000);

        // A crafted record with 40,000 more header names than that (a map holds 32,768
        // names): an error, not a panic.
        let mut crafted = record.encode().to_vec();
        let mut extra = Vec::new();
        for i in 0..40_000u32 {
            let name = format!("x-{i}");
            extra.extend_from_slice(&(name.len() as u16).to_be_bytes());
            extra.extend_from_slice(name.as_bytes());
            extra.extend_from_slice(&1u32.to_be_bytes());
            extra.push(b'1');
        }
        // Rewrite the header count (right after magic, version and flags, and the status).
        let at = crafted
            .windows(4)
            .position(|w| w == 25_000u32.to_be_bytes())
            .expect("the header count");
        crafted[at..at + 4].copy_from_slice(&65_000u32.to_be_bytes());
        let tail = crafted.split_off(at + 4);
        let (entries, rest) = tail.split_at(
            25_000 * (2 + 6 + 4) + (0..25_000u32).map(|i| i.to_string().len()).sum::<usize>(),
        );
        crafted.extend_from_slice(entries);
        crafted.extend_from_slice(&extra);
        crafted.extend_from_slice(rest);
        assert!(Record::decode(&crafted).is_err());
    }

    #[test]
    fn a_newer_version_is_refused_not_guessed() {
        let mut encoded = tricky().encode().to_vec();
        encoded[1] = VERSION + 1;
        assert_eq!(
            Record::decode(&encoded),
            Err(DecodeError::UnsupportedVersion(VERSION + 1))
        );
    }
}
