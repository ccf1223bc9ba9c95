//! Property-based fuzzing of everything the layer reads from outside: stored records
//! (`Record::decode`), `Idempotency-Key` headers (`parse_key`) and the store keys built from
//! them. Nothing may panic, whatever the bytes; what is accepted must make sense and survive
//! a round trip.
//!
//! Each property runs 100,000 cases by default (`FUZZ_CASES` sets another number); with
//! `FUZZ_SECONDS`, each runs round after round of that many until the time is up. The long
//! run, in release mode (see README, Testing):
//!
//! ```sh
//! FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture --test-threads 6
//! ```
//!
//! The Redis value layout is fuzzed next to the store (`src/store/redis.rs`, the replies a
//! claim can get, and `tests/redis.rs`, values written straight into a real server).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tower_idempotency::key::parse_key;
use tower_idempotency::store::{Record, StoreKey};
use tower_idempotency::{Fingerprint, KeyError, KeyParsing, Scope};

/// Runs `check` on inputs from `strategy`: 100,000 cases (or `FUZZ_CASES`), and, when
/// `FUZZ_SECONDS` is set, more rounds of that many until so many seconds have passed. Each
/// round starts from a fresh random seed; a failing input is shrunk and printed.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("FUZZ_CASES").unwrap_or(100_000);
    let until =
        env("FUZZ_SECONDS").map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    let started = std::time::Instant::now();
    let mut total = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases: u32::try_from(cases).unwrap_or(u32::MAX),
            // A failing case is printed (and shrunk); keep no files behind.
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(err) = runner.run(&strategy, &check) {
            panic!("{name}: {err}");
        }
        total += cases;
        if until.is_none_or(|until| std::time::Instant::now() >= until) {
            break;
        }
    }
    println!(
        "{name}: {total} cases in {:.1?}, all passed",
        started.elapsed()
    );
}

/// The characters of a header name (RFC 9110 `tchar`, lower case).
const TCHAR: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+.^_`|~-";

fn header_name() -> impl Strategy<Value = HeaderName> {
    // Plain byte vectors mapped into the alphabet: much cheaper to generate than a
    // strategy per character.
    prop_oneof![
        Just(HeaderName::from_static("set-cookie")),
        Just(HeaderName::from_static("content-type")),
        Just(HeaderName::from_static("grpc-status")),
        proptest::collection::vec(any::<u8>(), 1..24).prop_map(|raw| {
            let name: Vec<u8> = raw
                .iter()
                .map(|b| TCHAR[*b as usize % TCHAR.len()])
                .collect();
            HeaderName::from_bytes(&name).unwrap()
        }),
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    // Every byte a header value may hold: HTAB, visible ASCII, space and obs-text; the
    // control characters are moved up into that range.
    proptest::collection::vec(any::<u8>(), 0..48).prop_map(|raw| {
        let value: Vec<u8> = raw
            .into_iter()
            .map(|b| {
                if (b < 0x20 && b != b'\t') || b == 0x7f {
                    b + 0x20
                } else {
                    b
                }
            })
            .collect();
        HeaderValue::from_bytes(&value).unwrap()
    })
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((header_name(), header_value()), 0..12).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, value);
        }
        map
    })
}

fn record() -> impl Strategy<Value = Record> {
    (
        100u16..1000,
        header_map(),
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::option::of(header_map()),
        any::<[u8; 32]>(),
        any::<bool>(),
    )
        .prop_map(|(status, headers, body, trailers, fp, tombstone)| {
            let status = StatusCode::from_u16(status).unwrap();
            let record = if tombstone {
                Record::tombstone(status, headers)
            } else {
                Record::new(status, headers, Bytes::from(body), trailers)
            };
            record.with_fingerprint(Fingerprint::from_bytes(fp))
        })
}

/// A change to a valid encoding: what a damaged value, a foreign writer or a crafted
/// record looks like.
#[derive(Debug, Clone)]
enum Damage {
    /// Cut it at a point (a fraction of its length).
    Truncate(f64),
    /// Flip some bits of one byte.
    Flip(f64, u8),
    /// Write a 32-bit number (a count or a length) over four bytes.
    Overwrite(f64, u32),
    /// Put bytes in at a point.
    Insert(f64, Vec<u8>),
    /// Add bytes at the end.
    Append(Vec<u8>),
    /// Claim this many headers and put in as many small entries, named from that many
    /// distinct names: more values than a map can reserve, or more names than it holds.
    Crowd { entries: u32, names: u32 },
}

fn damage() -> impl Strategy<Value = Damage> {
    let at = 0.0f64..1.0;
    let big = prop_oneof![
        Just(0u32),
        Just(1),
        Just(24_577),
        Just(32_769),
        Just(u32::MAX),
        Just(u32::MAX / 6),
        any::<u32>()
    ];
    let crowd = (
        prop_oneof![Just(24_577u32), Just(32_769), 1u32..2000],
        prop_oneof![Just(1u32), Just(3), Just(u32::MAX)],
    )
        .prop_map(|(entries, names)| Damage::Crowd { entries, names });
    prop_oneof![
        // Rare: each is a few hundred kilobytes.
        1 => crowd,
        100 => at.clone().prop_map(Damage::Truncate),
        100 => (at.clone(), 1u8..=255).prop_map(|(a, m)| Damage::Flip(a, m)),
        100 => (at.clone(), big).prop_map(|(a, n)| Damage::Overwrite(a, n)),
        100 => (at, proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Damage::Insert(a, b)),
        100 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
    ]
}

fn apply(mut bytes: Vec<u8>, damage: &Damage) -> Vec<u8> {
    let at = |fraction: f64, len: usize| ((fraction * len as f64) as usize).min(len);
    match damage {
        Damage::Truncate(f) => bytes.truncate(at(*f, bytes.len())),
        Damage::Flip(f, mask) => {
            let i = at(*f, bytes.len().saturating_sub(1));
            if let Some(b) = bytes.get_mut(i) {
                *b ^= mask;
            }
        }
        Damage::Overwrite(f, n) => {
            let i = at(*f, bytes.len().saturating_sub(4));
            for (k, b) in n.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = b;
                }
            }
        }
        Damage::Insert(f, extra) => {
            let i = at(*f, bytes.len());
            bytes.splice(i..i, extra.iter().copied());
        }
        Damage::Append(extra) => bytes.extend_from_slice(extra),
        Damage::Crowd { entries, names } => {
            // The header count sits after magic, version, flags, status and fingerprint.
            const COUNT_AT: usize = 1 + 1 + 1 + 2 + 32;
            if bytes.len() >= COUNT_AT + 4 {
                bytes[COUNT_AT..COUNT_AT + 4].copy_from_slice(&entries.to_be_bytes());
                let mut crowd = Vec::with_capacity(*entries as usize * 12);
                for i in 0..*entries {
                    let name = format!("h{}", i % names);
                    crowd.extend_from_slice(&(name.len() as u16).to_be_bytes());
                    crowd.extend_from_slice(name.as_bytes());
                    crowd.extend_from_slice(&0u32.to_be_bytes());
                }
                let at = COUNT_AT + 4;
                bytes.splice(at..at, crowd);
            }
        }
    }
    bytes
}

/// What decoding may do with any input: fail, or give a record that encodes back to a
/// value that decodes to the same record.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(record) = Record::decode(bytes) {
        let again = Record::decode(&record.encode());
        prop_assert_eq!(again.as_ref(), Ok(&record));
    }
    Ok(())
}

/// Any bytes at all: decoding never panics.
#[test]
fn fuzz_decode_arbitrary_bytes() {
    fuzz(
        "arbitrary bytes",
        proptest::collection::vec(any::<u8>(), 0..512),
        |bytes| check_decode(&bytes),
    );
}

/// Bytes that start like a record of this version: the decoder gets past the header and
/// into the counts and lengths.
#[test]
fn fuzz_decode_after_a_valid_header() {
    fuzz(
        "after a valid header",
        proptest::collection::vec(any::<u8>(), 0..512),
        |tail| {
            let mut bytes = vec![0xA7, 1];
            bytes.extend_from_slice(&tail);
            check_decode(&bytes)
        },
    );
}

/// Every record the crate can make comes back exactly.
#[test]
fn fuzz_record_round_trip() {
    fuzz("record round trip", record(), |record| {
        let decoded = Record::decode(&record.encode());
        prop_assert_eq!(decoded.as_ref(), Ok(&record));
        Ok(())
    });
}

/// A valid encoding, damaged: truncated, bits flipped, a count or length replaced by a huge
/// or crafted number, bytes put in or added, a crowd of headers. Decoding never panics.
#[test]
fn fuzz_decode_damaged_records() {
    fuzz(
        "damaged records",
        (record(), proptest::collection::vec(damage(), 1..4)),
        |(record, damages)| {
            let mut bytes = record.encode();
            for d in &damages {
                bytes = apply(bytes, d);
            }
            check_decode(&bytes)
        },
    );
}

/// Any header value, either parsing mode, any limit: `parse_key` never panics, and a key it
/// accepts is 1..=max printable ASCII characters that survive the store key.
#[test]
fn fuzz_parse_key() {
    let input = (
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
        0usize..300,
    );
    fuzz("parse_key", input, |(raw, strict, max_len)| {
        let Ok(value) = HeaderValue::from_bytes(&raw) else {
            return Ok(());
        };
        let parsing = if strict {
            KeyParsing::Strict
        } else {
            KeyParsing::Lenient
        };
        match parse_key(&value, parsing, max_len) {
            Ok(key) => {
                let k = key.as_str();
                prop_assert!(!k.is_empty() && k.len() <= max_len, "{k:?} max {max_len}");
                prop_assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{k:?}");
                let store_key = StoreKey::new(&Scope::of(&raw), k);
                prop_assert_eq!(store_key.client_key(), k);
                let anonymous = StoreKey::new(&Scope::anonymous(), k);
                prop_assert_eq!(anonymous.client_key(), k);
            }
            Err(KeyError::TooLong { len, max }) => {
                prop_assert_eq!(max, max_len);
                prop_assert!(len > max_len);
            }
            Err(_) => {}
        }
        Ok(())
    });
}

/// A key sent as a Structured Field String comes back exactly, in either mode, and the same
/// key sent bare is read the same way in lenient mode.
#[test]
fn fuzz_sf_string_keys_round_trip() {
    fuzz("sf-string keys", "[ -~]{1,64}", |key| {
        let mut quoted = String::from("\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        let value = HeaderValue::from_str(&quoted).unwrap();
        for parsing in [KeyParsing::Strict, KeyParsing::Lenient] {
            let parsed = parse_key(&value, parsing, 255).map(|k| k.as_str().to_owned());
            prop_assert_eq!(parsed, Ok(key.clone()));
        }
        if !key.starts_with('"') && !key.contains([' ', '"']) {
            let bare = parse_key(
                &HeaderValue::from_str(&key).unwrap(),
                KeyParsing::Lenient,
                255,
            );
            prop_assert_eq!(bare.map(|k| k.as_str().to_owned()), Ok(key.clone()));
        }
        Ok(())
    });
}

/// Records with more header values than `HeaderMap::with_capacity` takes (it panics past
/// 24,576): 25,000 values under one name, encoded by the crate itself, come back; 40,000
/// distinct names (more than a header map holds), written by hand, fail cleanly.
#[test]
fn records_with_many_header_values_decode_or_fail_cleanly() {
    let mut headers = HeaderMap::new();
    for i in 0..25_000 {
        headers.append("x-many", HeaderValue::from(i));
    }
    let record = Record::new(StatusCode::OK, headers, Bytes::new(), None);
    assert_eq!(Record::decode(&record.encode()).as_ref(), Ok(&record));

    let mut bytes = vec![0xA7, 1, 0];
    bytes.extend_from_slice(&200u16.to_be_bytes());
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&40_000u32.to_be_bytes());
    for i in 0..40_000 {
        let name = format!("x{i:05}");
        bytes.extend_from_slice(&(name.len() as u16).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&1u32.to_be_bytes());
        bytes.push(b'1');
    }
    bytes.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(
        Record::decode(&bytes),
        Err(tower_idempotency::record::DecodeError::Invalid(
            "more header values than a header map holds"
        ))
    );
}
