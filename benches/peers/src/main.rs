//! tower-idempotency next to the other idempotency middlewares for axum, in one process.
//!
//! One axum `Router` (`POST /orders` answering 201 with a small JSON body, `GET /orders`
//! answering `[]`) is called with `oneshot` on a current-thread Tokio runtime, bare and
//! under four layers, and each response body is collected. Every wrapper and case is
//! checked before it is timed; timing runs in interleaved rounds, the wrappers' order
//! rotated every round, and the tables report medians across rounds.
//!
//! `PEERS_ROUNDS` sets the number of rounds (12); arguments keep only the cases whose
//! name contains one of them (`cargo run --release -- replay 409`).

mod alloc;
mod cratestack_store;
mod wrappers;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

use wrappers::{BARE, CREATED, LISTED, NAMES, OURS, SESSION_COOKIE};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const WRAPPERS: usize = NAMES.len();
const DEFAULT_ROUNDS: usize = 12;
/// What one timed batch should take.
const BATCH_TARGET: Duration = Duration::from_millis(30);
/// The shortest calibration probe.
const PROBE_MIN: Duration = Duration::from_millis(5);
/// Calls per wrapper and case in the allocation count.
const ALLOC_CALLS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A fresh key every call.
    First,
    /// The same key and body every call, answered once before.
    Replay,
    /// The key held by a request that never ends.
    InFlight,
    /// `GET /orders`, which no layer covers.
    Get,
}

struct Case {
    name: &'static str,
    kind: Kind,
    body: Bytes,
}

impl Case {
    fn is_large(&self) -> bool {
        self.body.len() > 16 * 1024
    }
}

/// A JSON-ish body of exactly `size` bytes: a list of order lines, padded with spaces.
fn json_body(size: usize) -> Bytes {
    if size == 0 {
        return Bytes::new();
    }
    const LINE: &str = r#"{"sku":"SKU-000042","qty":2,"price":"19.99"},"#;
    let mut body = String::with_capacity(size);
    body.push('[');
    while body.len() + LINE.len() < size {
        body.push_str(LINE);
    }
    if body.ends_with(',') {
        body.pop();
    }
    while body.len() + 1 < size {
        body.push(' ');
    }
    body.push(']');
    body.truncate(size);
    Bytes::from(body)
}

fn all_cases() -> Vec<Case> {
    let case = |name, kind, size| Case {
        name,
        kind,
        body: json_body(size),
    };
    vec![
        case("first 0 B", Kind::First, 0),
        case("first 1 KiB", Kind::First, 1024),
        case("first 64 KiB", Kind::First, 64 * 1024),
        case("replay 1 KiB", Kind::Replay, 1024),
        case("replay 64 KiB", Kind::Replay, 64 * 1024),
        case("409 1 KiB", Kind::InFlight, 1024),
        case("uncovered GET", Kind::Get, 0),
    ]
}

/// A new idempotency key: a UUID, so every key has the same length.
fn new_key() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a header value")
}

/// A new session cookie (axum-idempotent keeps its records in the session; the other
/// wrappers get the same header and ignore it).
fn new_session() -> HeaderValue {
    HeaderValue::from_str(&format!("{SESSION_COOKIE}={}", ruts::Id::default()))
        .expect("a session id is a header value")
}

fn request(case: &Case, key: &HeaderValue, session: &HeaderValue) -> Request<Body> {
    let builder = Request::builder()
        .uri("/orders")
        .header(header::COOKIE, session.clone());
    let request = match case.kind {
        Kind::Get => builder.method(Method::GET).body(Body::empty()),
        _ => builder
            .method(Method::POST)
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key.clone())
            .body(Body::from(case.body.clone())),
    };
    request.expect("a valid request")
}

/// One wrapper freshly built, with the keys its replay and 409 cases use.
struct Subject {
    router: Router,
    /// Per case: the key of a replay or 409 case.
    keys: Vec<HeaderValue>,
    session: HeaderValue,
}

impl Subject {
    /// Builds the wrapper, answers each replay case's request once and starts each 409
    /// case's never-ending request. Call [`settle`] before using it.
    async fn new(wrapper: usize, cases: &[Case]) -> Self {
        let built = wrappers::build(wrapper);
        let session = new_session();
        let mut keys = Vec::with_capacity(cases.len());
        for case in cases {
            let key = new_key();
            match case.kind {
                Kind::Replay => {
                    let (status, _) = call(&built.router, request(case, &key, &session)).await;
                    if status != StatusCode::CREATED {
                        eprintln!(
                            "{} / {}: the priming request answered {status}",
                            NAMES[wrapper], case.name
                        );
                    }
                }
                Kind::InFlight => {
                    if let Some(never_ending) = &built.never_ending {
                        let held = never_ending.clone().oneshot(request(case, &key, &session));
                        tokio::spawn(async move {
                            let _ = held.await;
                        });
                    }
                }
                Kind::First | Kind::Get => {}
            }
            keys.push(key);
        }
        Self {
            router: built.router,
            keys,
            session,
        }
    }

    /// `n` requests for `case`, built before any of them is sent.
    fn batch(&self, case_index: usize, case: &Case, n: usize) -> Vec<Request<Body>> {
        (0..n)
            .map(|_| match case.kind {
                Kind::First => request(case, &new_key(), &new_session()),
                _ => request(case, &self.keys[case_index], &self.session),
            })
            .collect()
    }
}

/// Lets the never-ending requests claim their keys.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn subjects(cases: &[Case]) -> Vec<Subject> {
    let mut subjects = Vec::with_capacity(WRAPPERS);
    for wrapper in 0..WRAPPERS {
        subjects.push(Subject::new(wrapper, cases).await);
    }
    settle().await;
    subjects
}

async fn call(router: &Router, request: Request<Body>) -> (StatusCode, Bytes) {
    let Ok(response) = router.clone().oneshot(request).await;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a response body")
        .to_bytes();
    (status, body)
}

/// Sends every request; returns the time taken and how many answers had another status
/// than `expected`.
async fn run(
    router: &Router,
    requests: Vec<Request<Body>>,
    expected: StatusCode,
) -> (Duration, usize) {
    let start = Instant::now();
    let mut unexpected = 0;
    for request in requests {
        let (status, body) = call(router, request).await;
        unexpected += usize::from(status != expected);
        std::hint::black_box(body);
    }
    (start.elapsed(), unexpected)
}

/// What a wrapper should do in a case: its status, and whether the handler runs.
fn expected(wrapper: usize, kind: Kind) -> (StatusCode, bool) {
    match (wrapper, kind) {
        (_, Kind::Get) => (StatusCode::OK, false),
        (BARE, _) | (_, Kind::First) => (StatusCode::CREATED, true),
        (_, Kind::Replay) => (StatusCode::CREATED, false),
        (_, Kind::InFlight) => (StatusCode::CONFLICT, false),
    }
}

/// Sends one request of each case to each wrapper: `None` when it behaves as expected,
/// else what it does instead.
async fn verify(cases: &[Case]) -> Vec<Vec<Option<String>>> {
    let subjects = subjects(cases).await;
    let mut verdicts = vec![vec![None; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        for (w, subject) in subjects.iter().enumerate() {
            let (status, runs) = expected(w, case.kind);
            let before = wrappers::handler_runs(w);
            let request = subject.batch(c, case, 1).pop().expect("one request");
            let (got, body) = call(&subject.router, request).await;
            let ran = wrappers::handler_runs(w) != before;
            let body_ok = match status {
                StatusCode::CREATED => body == CREATED.as_bytes(),
                StatusCode::OK => body == LISTED.as_bytes(),
                _ => true,
            };
            if got != status || (case.kind != Kind::Get && ran != runs) || !body_ok {
                let mut answer = format!("answers {got}");
                if case.kind != Kind::Get {
                    answer.push_str(if ran {
                        ", handler ran"
                    } else {
                        ", handler did not run"
                    });
                }
                if !body_ok {
                    answer.push_str(", other body");
                }
                let want = format!(
                    "{status}{}",
                    match (case.kind, runs) {
                        (Kind::Get, _) => "",
                        (_, true) => ", handler runs",
                        (_, false) => ", handler does not run",
                    }
                );
                println!(
                    "- {} / {}: {answer} (expected {want}): not timed",
                    NAMES[w], case.name
                );
                verdicts[w][c] = Some(format!("{got}"));
            }
        }
    }
    verdicts
}

/// Calls per batch for each wrapper and case, from a warm-up and a probe.
async fn calibrate(cases: &[Case], verdicts: &[Vec<Option<String>>]) -> Vec<Vec<usize>> {
    let subjects = subjects(cases).await;
    let mut sizes = vec![vec![0; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        let warm = if case.is_large() { 10 } else { 100 };
        for (w, subject) in subjects.iter().enumerate() {
            if verdicts[w][c].is_some() {
                continue;
            }
            let (status, _) = expected(w, case.kind);
            run(&subject.router, subject.batch(c, case, warm), status).await;
            // Three probes of at least PROBE_MIN each; the fastest counts, so that a probe
            // slowed down by the machine's other work does not shrink the batches.
            let mut probe = warm;
            let mut per_call = f64::INFINITY;
            for _ in 0..3 {
                loop {
                    let requests = subject.batch(c, case, probe);
                    let (took, _) = run(&subject.router, requests, status).await;
                    if took >= PROBE_MIN || probe >= 100_000 {
                        per_call = per_call.min(took.as_secs_f64() / probe as f64);
                        break;
                    }
                    probe *= 2;
                }
            }
            sizes[w][c] = ((BATCH_TARGET.as_secs_f64() / per_call) as usize).clamp(10, 200_000);
        }
    }
    sizes
}

/// Allocations per call for each wrapper and case, over [`ALLOC_CALLS`] calls.
async fn count_allocations(cases: &[Case], verdicts: &[Vec<Option<String>>]) -> Vec<Vec<f64>> {
    let subjects = subjects(cases).await;
    let mut counts = vec![vec![f64::NAN; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        for (w, subject) in subjects.iter().enumerate() {
            if verdicts[w][c].is_some() {
                continue;
            }
            let (status, _) = expected(w, case.kind);
            run(&subject.router, subject.batch(c, case, 10), status).await;
            let requests = subject.batch(c, case, ALLOC_CALLS);
            let before = alloc::count();
            run(&subject.router, requests, status).await;
            counts[w][c] = (alloc::count() - before) as f64 / ALLOC_CALLS as f64;
        }
    }
    counts
}

fn median(samples: &mut [f64]) -> f64 {
    quantile(samples, 0.5)
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let at = q * (samples.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    samples[low] + (samples[high] - samples[low]) * (at - low as f64)
}

fn main() {
    let rounds = std::env::var("PEERS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r: &usize| r > 0)
        .unwrap_or(DEFAULT_ROUNDS);
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    if cases.is_empty() {
        eprintln!("no case matches {filters:?}");
        std::process::exit(2);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(bench(&cases, rounds));
}

async fn bench(cases: &[Case], rounds: usize) {
    let started = Instant::now();
    println!(
        "# tower-idempotency and its peers: {rounds} interleaved rounds, batches of ~{} ms",
        BATCH_TARGET.as_millis()
    );
    println!();
    println!("Checks before timing (a wrapper listed here is reported by its answer, not timed):");
    let verdicts = verify(cases).await;
    if verdicts.iter().flatten().all(Option::is_none) {
        println!("- every wrapper behaves as expected in every case");
    }
    println!();

    let sizes = calibrate(cases, &verdicts).await;
    let mut samples = vec![vec![Vec::with_capacity(rounds); cases.len()]; WRAPPERS];
    let mut problems = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let subjects = subjects(cases).await;
        for (c, case) in cases.iter().enumerate() {
            for turn in 0..WRAPPERS {
                let w = (turn + round) % WRAPPERS;
                if verdicts[w][c].is_some() {
                    continue;
                }
                let subject = &subjects[w];
                let (status, runs) = expected(w, case.kind);
                let requests = subject.batch(c, case, sizes[w][c]);
                let before = wrappers::handler_runs(w);
                let (took, unexpected) = run(&subject.router, requests, status).await;
                let ran = wrappers::handler_runs(w) - before;
                if unexpected > 0 {
                    problems.push(format!(
                        "- {} / {} round {}: {unexpected} of {} answers were not {status}",
                        NAMES[w],
                        case.name,
                        round + 1,
                        sizes[w][c]
                    ));
                }
                if !runs && case.kind != Kind::Get && ran > 0 {
                    problems.push(format!(
                        "- {} / {} round {}: the handler ran {ran} times during timing",
                        NAMES[w],
                        case.name,
                        round + 1
                    ));
                }
                samples[w][c].push(took.as_nanos() as f64 / sizes[w][c] as f64);
            }
        }
    }
    if !problems.is_empty() {
        println!("Problems during timing:");
        for problem in &problems {
            println!("{problem}");
        }
        println!();
    }

    let allocations = count_allocations(cases, &verdicts).await;

    let medians: Vec<Vec<f64>> = samples
        .iter()
        .map(|per_case| per_case.iter().map(|s| median(&mut s.clone())).collect())
        .collect();
    print!("{}", time_table(cases, &verdicts, &medians));
    println!();
    print!("{}", ours_vs_peers(cases, &verdicts, &medians));
    println!();
    print!("{}", allocation_table(cases, &verdicts, &allocations));
    println!();
    print!("{}", raw_table(cases, &verdicts, &mut samples, &sizes));
    println!();
    println!("Total run time: {:.1} s", started.elapsed().as_secs_f64());
}

fn header_row(first: &str, columns: &[String]) -> String {
    let mut out = format!("| {first} |");
    for column in columns {
        let _ = write!(out, " {column} |");
    }
    out.push('\n');
    out.push('|');
    for _ in 0..=columns.len() {
        out.push_str(" --- |");
    }
    out.push('\n');
    out
}

fn time_table(cases: &[Case], verdicts: &[Vec<Option<String>>], medians: &[Vec<f64>]) -> String {
    let mut columns = vec![format!("{} (ns)", NAMES[BARE])];
    columns.extend(NAMES[1..].iter().map(|n| format!("{n} (× bare)")));
    columns.push("fastest layer".into());
    let mut out = String::from("## Time per call: median across rounds\n\n");
    out.push_str(&header_row("case", &columns));
    for (c, case) in cases.iter().enumerate() {
        let bare = medians[BARE][c];
        let _ = write!(out, "| {} | {bare:.0} |", case.name);
        let mut fastest: Option<(usize, f64)> = None;
        for w in 1..WRAPPERS {
            match &verdicts[w][c] {
                Some(answer) => {
                    let _ = write!(out, " answers {answer} |");
                }
                None => {
                    let ratio = medians[w][c] / bare;
                    let _ = write!(out, " {ratio:.2}× |");
                    if fastest.is_none_or(|(_, best)| ratio < best) {
                        fastest = Some((w, ratio));
                    }
                }
            }
        }
        let _ = writeln!(out, " {} |", fastest.map_or("—", |(w, _)| NAMES[w]));
    }
    out
}

fn ours_vs_peers(cases: &[Case], verdicts: &[Vec<Option<String>>], medians: &[Vec<f64>]) -> String {
    let columns: Vec<String> = NAMES[2..].iter().map(|n| format!("ours / {n}")).collect();
    let mut out = String::from("## ours / peer (below 1: ours is faster)\n\n");
    out.push_str(&header_row("case", &columns));
    for (c, case) in cases.iter().enumerate() {
        let _ = write!(out, "| {} |", case.name);
        for peer in 2..WRAPPERS {
            match (&verdicts[OURS][c], &verdicts[peer][c]) {
                (None, None) => {
                    let _ = write!(out, " {:.2} |", medians[OURS][c] / medians[peer][c]);
                }
                (_, Some(answer)) => {
                    let _ = write!(out, " — (peer answers {answer}) |");
                }
                (Some(_), None) => out.push_str(" — |"),
            }
        }
        out.push('\n');
    }
    out
}

fn allocation_table(
    cases: &[Case],
    verdicts: &[Vec<Option<String>>],
    counts: &[Vec<f64>],
) -> String {
    let columns: Vec<String> = NAMES.iter().map(|n| (*n).to_string()).collect();
    let mut out = format!("## Allocations per call (over {ALLOC_CALLS} calls)\n\n");
    out.push_str(&header_row("case", &columns));
    for (c, case) in cases.iter().enumerate() {
        let _ = write!(out, "| {} |", case.name);
        for w in 0..WRAPPERS {
            match &verdicts[w][c] {
                Some(answer) => {
                    let _ = write!(out, " answers {answer} |");
                }
                None => {
                    let _ = write!(out, " {:.1} |", counts[w][c]);
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Median ns per call with the interquartile spread, and the batch size.
fn raw_table(
    cases: &[Case],
    verdicts: &[Vec<Option<String>>],
    samples: &mut [Vec<Vec<f64>>],
    sizes: &[Vec<usize>],
) -> String {
    let columns: Vec<String> = NAMES.iter().map(|n| (*n).to_string()).collect();
    let mut out =
        String::from("## ns per call: median [25th–75th percentile] × calls per batch\n\n");
    out.push_str(&header_row("case", &columns));
    for (c, case) in cases.iter().enumerate() {
        let _ = write!(out, "| {} |", case.name);
        for w in 0..WRAPPERS {
            if verdicts[w][c].is_some() {
                out.push_str(" — |");
                continue;
            }
            let s = &mut samples[w][c];
            let _ = write!(
                out,
                " {:.0} [{:.0}–{:.0}] ×{} |",
                median(s),
                quantile(s, 0.25),
                quantile(s, 0.75),
                sizes[w][c]
            );
        }
        out.push('\n');
    }
    out
}
