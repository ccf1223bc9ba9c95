//! tower-idempotency next to the other idempotency middlewares for axum, in one process.
//!
//! One axum `Router` (`POST /orders` answering 201 with a small JSON body, `GET /orders`
//! answering `[]`) is called with `oneshot`, bare and under four layers, and each response
//! body is collected. The run is a grid: every combination of the live records in each
//! store before timing, request headers off or on, and the runtime (current-thread, or
//! two workers driven from two tasks) is one configuration, timed with every wrapper and
//! every case. Every wrapper and case is checked before it is timed; timing runs in
//! interleaved rounds, the wrappers' order rotated every round, and the tables report
//! medians across rounds as ratios to `bare` in the same configuration.
//!
//! Settings (environment, comma-separated lists):
//! - `PEERS_RECORDS` (`1000,100000,1000000`): live records prefilled into each store;
//! - `PEERS_BODIES` (`0,1024,65536`): body sizes of the first-request and replay cases;
//! - `PEERS_HEADERS` (`off,on`): `on` adds a cookie, an `authorization` bearer token and
//!   the headers a browser or SDK sends;
//! - `PEERS_RUNTIMES` (`current,multi`);
//! - `PEERS_ROUNDS` (12), `PEERS_BATCH_MS` (15);
//! - arguments keep only the cases whose name contains one of them
//!   (`cargo run --release -- replay 409`);
//! - `PEERS_PROFILE=<calls>`: no grid; for the first configuration and the first case
//!   kept, each wrapper (or those whose name contains `PEERS_PROFILE_WRAPPERS`) sends
//!   `<calls>` requests inside [`profiled`] and prints the time per call; for an
//!   instruction count by callgrind (`valgrind --tool=callgrind
//!   --toggle-collect='*profiled*' <binary>`; current-thread only, as callgrind counts
//!   the calling thread), or a wall-clock comparison of two builds. It prints the minor
//!   page faults per call beside the time (Linux);
//! - `PEERS_PERF_CTL`, `PEERS_PERF_ACK` (profile mode): the control and acknowledgement
//!   FIFOs of a `perf record -D -1 --control fifo:<ctl>,<ack>` running this binary, turned
//!   on around the calls alone (not the prefill, the building of the requests, the drop).

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

use wrappers::{AXUM_IDEMPOTENT, BARE, CRATESTACK, CREATED, LISTED, NAMES, OURS, SESSION_COOKIE};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const WRAPPERS: usize = NAMES.len();
const DEFAULT_ROUNDS: usize = 12;
const DEFAULT_BATCH_MS: u64 = 15;
/// The shortest calibration probe.
const PROBE_MIN: Duration = Duration::from_millis(5);
/// Calls per wrapper and case in the allocation count.
const ALLOC_CALLS: usize = 1000;
/// Stores holding at most this many prefilled records are built anew every round; larger
/// ones are prefilled once per runtime and record count, used with and without the extra
/// headers, and keep the first requests of every round.
const REBUILD_UP_TO: usize = 10_000;
/// Requests built at a time while prefilling.
const PREFILL_CHUNK: usize = 10_000;

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
    name: String,
    kind: Kind,
    body: Bytes,
}

impl Case {
    fn is_large(&self) -> bool {
        self.body.len() > 16 * 1024
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// A current-thread runtime, calls one after another.
    Current,
    /// Two worker threads, calls driven from two tasks at once.
    Multi,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Self::Current => "current-thread",
            Self::Multi => "2 workers, 2 tasks",
        }
    }

    /// A Tokio runtime of this kind.
    fn build(self) -> tokio::runtime::Runtime {
        match self {
            Self::Current => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Self::Multi => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
        }
        .expect("a Tokio runtime")
    }
}

/// One configuration of the grid.
#[derive(Clone, Copy)]
struct Config {
    records: usize,
    headers: bool,
    runtime: Runtime,
}

impl Config {
    fn title(&self) -> String {
        format!(
            "{} records, headers {}, {}",
            thousands(self.records),
            if self.headers { "on" } else { "off" },
            self.runtime.name()
        )
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

fn size_name(size: usize) -> String {
    match size {
        0 => "0 B".into(),
        s if s % 1024 == 0 => format!("{} KiB", s / 1024),
        s => format!("{s} B"),
    }
}

fn all_cases(bodies: &[usize]) -> Vec<Case> {
    let case = |name: String, kind, size| Case {
        name,
        kind,
        body: json_body(size),
    };
    let mut cases = Vec::new();
    for &size in bodies {
        cases.push(case(
            format!("first {}", size_name(size)),
            Kind::First,
            size,
        ));
    }
    for &size in bodies {
        cases.push(case(
            format!("replay {}", size_name(size)),
            Kind::Replay,
            size,
        ));
    }
    cases.push(case("409 1 KiB".into(), Kind::InFlight, 1024));
    cases.push(case("uncovered GET".into(), Kind::Get, 0));
    cases
}

/// A new idempotency key: a UUID, so every key has the same length.
fn new_key() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a header value")
}

/// A new session id (axum-idempotent keeps its records in the session).
fn new_session() -> String {
    ruts::Id::default().to_string()
}

/// The headers a browser or an SDK adds to a call, sizes as seen in the field: a bearer
/// token the size of a signed JWT with a few claims, and a cookie header carrying the
/// session next to analytics, CSRF and preference cookies.
struct ExtraHeaders {
    authorization: HeaderValue,
    cookie_tail: String,
    user_agent: HeaderValue,
    accept: HeaderValue,
    accept_encoding: HeaderValue,
    accept_language: HeaderValue,
}

impl ExtraHeaders {
    fn new() -> Self {
        // A JWT's shape: base64url header, claims and a 256-byte RS256 signature.
        let segment = |n: usize, seed: u8| -> String {
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            (0..n)
                .map(|i| ALPHABET[(i * 31 + usize::from(seed) * 7) % 64] as char)
                .collect()
        };
        let token = format!(
            "Bearer {}.{}.{}",
            segment(36, 1),
            segment(300, 2),
            segment(342, 3)
        );
        let cookie_tail = format!(
            "; _ga=GA1.2.1457843214.1764990000; _gid=GA1.2.987654321.1764990000; \
             csrftoken={}; theme=dark; locale=en-GB; consent=necessary%2Canalytics%2Cads; \
             _fbp=fb.1.1764990000123.1234567890",
            segment(64, 4)
        );
        Self {
            authorization: HeaderValue::from_str(&token).expect("a token is a header value"),
            cookie_tail,
            user_agent: HeaderValue::from_static(
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                 Chrome/131.0.0.0 Safari/537.36",
            ),
            accept: HeaderValue::from_static("application/json, text/plain, */*"),
            accept_encoding: HeaderValue::from_static("gzip, deflate, br, zstd"),
            accept_language: HeaderValue::from_static("en-GB,en;q=0.9,fr;q=0.8"),
        }
    }
}

/// How the requests of a configuration are built.
struct Requests {
    extra: Option<ExtraHeaders>,
}

impl Requests {
    fn build(
        &self,
        wrapper: usize,
        case: &Case,
        key: &HeaderValue,
        session: &str,
    ) -> Request<Body> {
        let mut builder = Request::builder().uri("/orders");
        match &self.extra {
            Some(extra) => {
                let cookie = format!("{SESSION_COOKIE}={session}{}", extra.cookie_tail);
                builder = builder
                    .header(
                        header::COOKIE,
                        HeaderValue::from_str(&cookie).expect("a cookie is a header value"),
                    )
                    .header(header::AUTHORIZATION, extra.authorization.clone())
                    .header(header::USER_AGENT, extra.user_agent.clone())
                    .header(header::ACCEPT, extra.accept.clone())
                    .header(header::ACCEPT_ENCODING, extra.accept_encoding.clone())
                    .header(header::ACCEPT_LANGUAGE, extra.accept_language.clone())
                    .header("x-request-id", new_key());
            }
            // Without extra headers, only axum-idempotent gets its session cookie: it
            // records nothing without one.
            None if wrapper == AXUM_IDEMPOTENT => {
                let cookie = format!("{SESSION_COOKIE}={session}");
                builder = builder.header(
                    header::COOKIE,
                    HeaderValue::from_str(&cookie).expect("a cookie is a header value"),
                );
            }
            None => {}
        }
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
}

/// One wrapper freshly built and prefilled, with the keys its replay and 409 cases use.
struct Subject {
    wrapper: usize,
    router: Router,
    /// Per case: the key of a replay or 409 case.
    keys: Vec<HeaderValue>,
    session: String,
    /// The never-ending requests, stopped when the subject goes (they hold its store).
    held: Vec<tokio::task::JoinHandle<()>>,
    /// First requests built since the prefill: records the store gained.
    firsts: std::cell::Cell<usize>,
}

impl Drop for Subject {
    fn drop(&mut self) {
        for task in &self.held {
            task.abort();
        }
    }
}

impl Subject {
    /// Builds the wrapper, prefills its store with `records` first requests of 0 B (bare
    /// has no store), answers each replay case's request once and starts each 409 case's
    /// never-ending request. Call [`settle`] before using it.
    async fn new(
        wrapper: usize,
        cases: &[Case],
        requests: &Requests,
        config: &Config,
    ) -> (Self, usize) {
        // The prefill is the same whatever the configuration's headers: what a store keeps
        // does not depend on them.
        let plain = Requests { extra: None };
        let built = wrappers::build(wrapper);
        let mut subject = Self {
            wrapper,
            router: built.router,
            keys: Vec::with_capacity(cases.len()),
            session: new_session(),
            held: Vec::new(),
            firsts: std::cell::Cell::new(0),
        };
        let mut refused = 0;
        if wrapper != BARE && config.records > 0 {
            let prefill = Case {
                name: "prefill".into(),
                kind: Kind::First,
                body: Bytes::new(),
            };
            let mut left = config.records;
            while left > 0 {
                let n = left.min(PREFILL_CHUNK);
                let batch = subject.batch(&plain, usize::MAX, &prefill, n);
                let (_, unexpected) =
                    run(config.runtime, &subject.router, batch, StatusCode::CREATED).await;
                refused += unexpected;
                left -= n;
            }
            subject.firsts.set(0);
        }
        for case in cases {
            let key = new_key();
            let request = requests.build(wrapper, case, &key, &subject.session);
            match case.kind {
                Kind::Replay => {
                    let (status, _) = call(&subject.router, request).await;
                    if status != StatusCode::CREATED {
                        eprintln!(
                            "{} / {}: the priming request answered {status}",
                            NAMES[wrapper], case.name
                        );
                    }
                }
                Kind::InFlight => {
                    if let Some(never_ending) = &built.never_ending {
                        let held = never_ending.clone().oneshot(request);
                        subject.held.push(tokio::spawn(async move {
                            let _ = held.await;
                        }));
                    }
                }
                Kind::First | Kind::Get => {}
            }
            subject.keys.push(key);
        }
        (subject, refused)
    }

    /// `n` requests for `case`, built before any of them is sent.
    fn batch(
        &self,
        requests: &Requests,
        case_index: usize,
        case: &Case,
        n: usize,
    ) -> Vec<Request<Body>> {
        if case.kind == Kind::First {
            self.firsts.set(self.firsts.get() + n);
        }
        (0..n)
            .map(|_| match case.kind {
                Kind::First => requests.build(self.wrapper, case, &new_key(), &new_session()),
                _ => requests.build(self.wrapper, case, &self.keys[case_index], &self.session),
            })
            .collect()
    }
}

/// Lets the never-ending requests claim their keys.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Every wrapper, built and prefilled, in the order of [`NAMES`].
async fn subjects(cases: &[Case], requests: &Requests, config: &Config) -> Vec<Subject> {
    let all: Vec<usize> = (0..WRAPPERS).collect();
    subjects_of(&all, cases, requests, config).await
}

/// The wrappers `wrappers` (indexes into [`NAMES`]), built and prefilled, in that order.
async fn subjects_of(
    wrappers: &[usize],
    cases: &[Case],
    requests: &Requests,
    config: &Config,
) -> Vec<Subject> {
    let mut subjects = Vec::with_capacity(wrappers.len());
    for &wrapper in wrappers {
        let name = NAMES[wrapper];
        let started = Instant::now();
        let (subject, refused) = Subject::new(wrapper, cases, requests, config).await;
        if refused > 0 {
            println!(
                "- {name}: {refused} of {} prefill requests were not answered 201",
                config.records
            );
        }
        if config.records > REBUILD_UP_TO {
            eprintln!(
                "  {name} prefilled with {} records in {:.1} s",
                thousands(config.records),
                started.elapsed().as_secs_f64()
            );
        }
        subjects.push(subject);
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

/// Sends the requests one after another; returns how many answers had another status
/// than `expected`.
async fn send_all(router: Router, requests: Vec<Request<Body>>, expected: StatusCode) -> usize {
    let mut unexpected = 0;
    for request in requests {
        let (status, body) = call(&router, request).await;
        unexpected += usize::from(status != expected);
        std::hint::black_box(body);
    }
    unexpected
}

/// Sends every request (one task on a current-thread runtime, two tasks with half each on
/// the multi-thread one); returns the time taken and how many answers had another status
/// than `expected`.
async fn run(
    runtime: Runtime,
    router: &Router,
    mut requests: Vec<Request<Body>>,
    expected: StatusCode,
) -> (Duration, usize) {
    match runtime {
        Runtime::Current => {
            let start = Instant::now();
            let unexpected = send_all(router.clone(), requests, expected).await;
            (start.elapsed(), unexpected)
        }
        Runtime::Multi => {
            let second = requests.split_off(requests.len() / 2);
            let start = Instant::now();
            let a = tokio::spawn(send_all(router.clone(), requests, expected));
            let b = tokio::spawn(send_all(router.clone(), second, expected));
            let unexpected = a.await.expect("a sending task") + b.await.expect("a sending task");
            (start.elapsed(), unexpected)
        }
    }
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
async fn verify(subjects: &[Subject], cases: &[Case], requests: &Requests) -> Verdicts {
    let mut verdicts = vec![vec![None; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        for (w, subject) in subjects.iter().enumerate() {
            let (status, runs) = expected(w, case.kind);
            let before = wrappers::handler_runs(w);
            let request = subject
                .batch(requests, c, case, 1)
                .pop()
                .expect("one request");
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

type Verdicts = Vec<Vec<Option<String>>>;

/// Calls per batch for each wrapper and case, from a warm-up and a probe.
async fn calibrate(
    subjects: &[Subject],
    cases: &[Case],
    requests: &Requests,
    verdicts: &Verdicts,
    config: &Config,
    target: Duration,
) -> Vec<Vec<usize>> {
    let mut sizes = vec![vec![0; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        let warm = if case.is_large() { 10 } else { 100 };
        for (w, subject) in subjects.iter().enumerate() {
            if verdicts[w][c].is_some() {
                continue;
            }
            let (status, _) = expected(w, case.kind);
            let batch = subject.batch(requests, c, case, warm);
            run(config.runtime, &subject.router, batch, status).await;
            // Three probes of at least PROBE_MIN each; the fastest counts, so that a probe
            // slowed down by the machine's other work does not shrink the batches.
            let mut probe = warm;
            let mut per_call = f64::INFINITY;
            for _ in 0..3 {
                loop {
                    let batch = subject.batch(requests, c, case, probe);
                    let (took, _) = run(config.runtime, &subject.router, batch, status).await;
                    if took >= PROBE_MIN || probe >= 100_000 {
                        per_call = per_call.min(took.as_secs_f64() / probe as f64);
                        break;
                    }
                    probe *= 2;
                }
            }
            let size = ((target.as_secs_f64() / per_call) as usize).clamp(10, 200_000);
            sizes[w][c] = size & !1;
        }
    }
    sizes
}

/// Allocations per call for each wrapper and case, over [`ALLOC_CALLS`] calls.
async fn count_allocations(
    subjects: &[Subject],
    cases: &[Case],
    requests: &Requests,
    verdicts: &Verdicts,
    config: &Config,
) -> Vec<Vec<f64>> {
    let mut counts = vec![vec![f64::NAN; cases.len()]; WRAPPERS];
    for (c, case) in cases.iter().enumerate() {
        for (w, subject) in subjects.iter().enumerate() {
            if verdicts[w][c].is_some() {
                continue;
            }
            let (status, _) = expected(w, case.kind);
            let warm = subject.batch(requests, c, case, 10);
            run(config.runtime, &subject.router, warm, status).await;
            let batch = subject.batch(requests, c, case, ALLOC_CALLS);
            let before = alloc::count();
            run(config.runtime, &subject.router, batch, status).await;
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

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A comma-separated list from the environment, or the default.
fn list<T>(name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            parse(s).unwrap_or_else(|| {
                eprintln!("{name}: cannot read {s:?} (expected like {default:?})");
                std::process::exit(2);
            })
        })
        .collect()
}

/// Sends `calls` requests of one case to each wrapper (or those named in
/// `PEERS_PROFILE_WRAPPERS`), each inside [`profiled`], and prints what was sent.
fn profile(calls: usize, case: &Case, records: usize, headers: bool, runtime: Runtime) {
    let rt = runtime.build();
    let config = Config {
        records,
        headers,
        runtime,
    };
    let requests = Requests {
        extra: headers.then(ExtraHeaders::new),
    };
    let only = std::env::var("PEERS_PROFILE_WRAPPERS").unwrap_or_default();
    let wanted: Vec<usize> = (0..WRAPPERS)
        .filter(|&w| {
            only.is_empty()
                || only
                    .split(',')
                    .map(str::trim)
                    .any(|part| !part.is_empty() && NAMES[w].contains(part))
        })
        .collect();
    if wanted.is_empty() {
        eprintln!("PEERS_PROFILE_WRAPPERS: {only:?} names none of {NAMES:?}");
        std::process::exit(2);
    }
    let cases = std::slice::from_ref(case);
    // Only the wrappers profiled are built and prefilled (under callgrind, a prefill of
    // 100,000 records takes minutes).
    let subjects = rt.block_on(subjects_of(&wanted, cases, &requests, &config));
    for subject in &subjects {
        let name = NAMES[subject.wrapper];
        let (status, _) = expected(subject.wrapper, case.kind);
        let warm = subject.batch(&requests, 0, case, 100);
        rt.block_on(run(runtime, &subject.router, warm, status));
        let batch = subject.batch(&requests, 0, case, calls);
        let faults = minor_faults();
        perf_control("enable");
        let started = Instant::now();
        let unexpected = profiled(&rt, runtime, &subject.router, batch, status);
        let took = started.elapsed();
        perf_control("disable");
        let faults = minor_faults()
            .zip(faults)
            .map(|(after, before)| after - before);
        println!(
            "{name} / {} ({}): {calls} calls, {unexpected} not {status}, {:.0} ns per call{}",
            case.name,
            config.title(),
            took.as_nanos() as f64 / calls as f64,
            faults.map_or(String::new(), |f| format!(
                ", {:.3} page faults per call",
                f as f64 / calls as f64
            ))
        );
    }
}

/// Turns `perf record` on or off around the calls, when `PEERS_PERF_CTL` names the control
/// FIFO of a `perf record -D -1 --control fifo:<ctl>,<ack>` that runs this process (and
/// `PEERS_PERF_ACK` its acknowledgement FIFO, awaited): the profile then holds the calls
/// alone, not the prefill, the building of the requests or the store's drop.
fn perf_control(command: &str) {
    use std::io::{Read, Write};
    let Ok(ctl) = std::env::var("PEERS_PERF_CTL") else {
        return;
    };
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(&ctl)
        .and_then(|mut fifo| fifo.write_all(format!("{command}\n").as_bytes()));
    if let Err(err) = sent {
        eprintln!("PEERS_PERF_CTL: cannot write {command:?} to {ctl:?}: {err}");
        std::process::exit(2);
    }
    if let Ok(ack) = std::env::var("PEERS_PERF_ACK") {
        let mut answer = [0u8; 4];
        if let Err(err) =
            std::fs::File::open(&ack).and_then(|mut fifo| fifo.read_exact(&mut answer))
        {
            eprintln!("PEERS_PERF_ACK: no acknowledgement on {ack:?}: {err}");
            std::process::exit(2);
        }
    }
}

/// The process's minor page faults so far (Linux: `/proc/self/stat`), `None` elsewhere.
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command's name, which is in parentheses and may hold spaces:
    // `minflt` is the 10th field of the line, the 8th after the name.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(7)?
        .parse()
        .ok()
}

/// The calls callgrind counts (`--toggle-collect='*profiled*'`).
#[inline(never)]
fn profiled(
    rt: &tokio::runtime::Runtime,
    runtime: Runtime,
    router: &Router,
    batch: Vec<Request<Body>>,
    status: StatusCode,
) -> usize {
    rt.block_on(run(runtime, router, batch, status)).1
}

/// What one configuration measured.
struct Outcome {
    config: Config,
    verdicts: Verdicts,
    /// Per wrapper and case: ns per call, one sample per round.
    samples: Vec<Vec<Vec<f64>>>,
    allocations: Vec<Vec<f64>>,
    sizes: Vec<Vec<usize>>,
    problems: Vec<String>,
    /// Records each layer's store held at most while timing, over the prefill.
    grown: usize,
}

impl Outcome {
    fn median(&self, wrapper: usize, case: usize) -> f64 {
        median(&mut self.samples[wrapper][case].clone())
    }
}

fn main() {
    let rounds = std::env::var("PEERS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r: &usize| r > 0)
        .unwrap_or(DEFAULT_ROUNDS);
    let batch = Duration::from_millis(
        std::env::var("PEERS_BATCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&ms: &u64| ms > 0)
            .unwrap_or(DEFAULT_BATCH_MS),
    );
    let records = list("PEERS_RECORDS", "1000,100000,1000000", |s| {
        s.replace('_', "").parse::<usize>().ok()
    });
    let bodies = list("PEERS_BODIES", "0,1024,65536", |s| s.parse::<usize>().ok());
    let headers = list("PEERS_HEADERS", "off,on", |s| match s {
        "off" => Some(false),
        "on" => Some(true),
        _ => None,
    });
    let runtimes = list("PEERS_RUNTIMES", "current,multi", |s| match s {
        "current" => Some(Runtime::Current),
        "multi" => Some(Runtime::Multi),
        _ => None,
    });
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: Vec<Case> = all_cases(&bodies)
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    if cases.is_empty() {
        eprintln!("no case matches {filters:?}");
        std::process::exit(2);
    }

    if let Ok(raw) = std::env::var("PEERS_PROFILE") {
        let Some(calls) = raw.trim().parse::<usize>().ok().filter(|&n| n > 0) else {
            eprintln!(
                "PEERS_PROFILE: cannot read {raw:?} (expected a number of calls, like \"2000\")"
            );
            std::process::exit(2);
        };
        profile(calls, &cases[0], records[0], headers[0], runtimes[0]);
        return;
    }

    let started = Instant::now();
    println!(
        "# tower-idempotency and its peers: {rounds} interleaved rounds, batches of ~{} ms",
        batch.as_millis()
    );
    println!();
    println!("{NOTES}");
    println!();
    println!(
        "Load before the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    let mut outcomes = Vec::new();
    for &runtime in &runtimes {
        let rt = runtime.build();
        for &records in &records {
            // Large stores are prefilled once for both header settings.
            let pool = (records > REBUILD_UP_TO).then(|| {
                let config = Config {
                    records,
                    headers: false,
                    runtime,
                };
                eprintln!("== prefilling {} records", thousands(records));
                rt.block_on(subjects(&cases, &Requests { extra: None }, &config))
            });
            for &headers in &headers {
                let config = Config {
                    records,
                    headers,
                    runtime,
                };
                eprintln!("== {}", config.title());
                println!("## {}", config.title());
                println!();
                let outcome = rt.block_on(bench(config, &cases, rounds, batch, pool.as_deref()));
                print!("{}", config_table(&cases, &outcome));
                println!();
                outcomes.push(outcome);
            }
            drop(pool);
        }
        drop(rt);
    }
    print!("{}", losses(&cases, &outcomes));
    println!();
    println!(
        "Load after the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("Total run time: {:.1} s", started.elapsed().as_secs_f64());
}

/// Times one configuration, on `pool` (prefilled subjects kept across rounds) or on
/// subjects built anew every round.
async fn bench(
    config: Config,
    cases: &[Case],
    rounds: usize,
    batch: Duration,
    pool: Option<&[Subject]>,
) -> Outcome {
    let requests = Requests {
        extra: config.headers.then(ExtraHeaders::new),
    };
    println!("Checks (a wrapper listed here is reported by its answer, not timed):");
    let mut owned = match pool {
        Some(_) => Vec::new(),
        None => subjects(cases, &requests, &config).await,
    };
    let current = pool.unwrap_or(&owned[..]);
    let verdicts = verify(current, cases, &requests).await;
    if verdicts.iter().flatten().all(Option::is_none) {
        println!("- every wrapper behaves as expected in every case");
    }
    let sizes = calibrate(current, cases, &requests, &verdicts, &config, batch).await;

    let mut samples = vec![vec![Vec::with_capacity(rounds); cases.len()]; WRAPPERS];
    let mut problems = Vec::new();
    // First requests sent to one layer since its store was prefilled: the largest count
    // over the layers and rounds.
    let mut grown = 0;
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        if pool.is_none() {
            owned.clear();
            owned = subjects(cases, &requests, &config).await;
        }
        let current = pool.unwrap_or(&owned[..]);
        for (c, case) in cases.iter().enumerate() {
            for turn in 0..WRAPPERS {
                let w = (turn + round) % WRAPPERS;
                if verdicts[w][c].is_some() {
                    continue;
                }
                let subject = &current[w];
                let (status, runs) = expected(w, case.kind);
                let batch = subject.batch(&requests, c, case, sizes[w][c]);
                let before = wrappers::handler_runs(w);
                let (took, unexpected) = run(config.runtime, &subject.router, batch, status).await;
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
        let added = current[1..].iter().map(|s| s.firsts.get()).max();
        grown = grown.max(added.unwrap_or(0));
    }
    let current = pool.unwrap_or(&owned[..]);
    let allocations = count_allocations(current, cases, &requests, &verdicts, &config).await;
    drop(owned);
    Outcome {
        config,
        verdicts,
        samples,
        allocations,
        sizes,
        problems,
        grown,
    }
}

/// What the marks beside a peer's numbers say (facts from the peers' code).
const NOTES: &str = "Marks beside a number: ᵃ axum-idempotent (key-header mode) does not \
read the request body (no fingerprint: a key reused with another body replays the first \
answer) and has no in-flight lock (a duplicate while the first runs executes the handler \
again), so it does not do the same work. ᶜ cratestack-axum reads the whole body, \
fingerprints it (SHA-256) and locks the key in flight like ours, but holds no lease (a \
first request whose caller goes away leaves its key answering 409 until the record's TTL, \
24 h here) and finishes nothing after the caller leaves; its store is the fastest this \
harness could write for it (a `DashMap` read-locked first, tokens from a counter; no cap, \
no byte accounting, no eviction queue). idempotent reads and \
fingerprints the body (XXH3-128) and locks in flight, and runs every keyed request in a \
task of its own. Ours also accounts every record's bytes against a cap (raised here), \
keeps a lease alive while the handler runs and finishes a first request in a task when \
its caller goes away.";

/// What a peer does not do that the layer does, beside its numbers (facts from its code).
fn peer_note(wrapper: usize, kind: Kind) -> &'static str {
    match (wrapper, kind) {
        (AXUM_IDEMPOTENT, Kind::First | Kind::Replay) => " ᵃ",
        (CRATESTACK, Kind::First | Kind::Replay | Kind::InFlight) => " ᶜ",
        _ => "",
    }
}

fn config_table(cases: &[Case], outcome: &Outcome) -> String {
    let mut out = String::new();
    if !outcome.problems.is_empty() {
        out.push_str("Problems during timing:\n");
        for problem in &outcome.problems {
            let _ = writeln!(out, "{problem}");
        }
        out.push('\n');
    }
    let records = outcome.config.records;
    let _ = writeln!(
        out,
        "Live records in each layer's store while timing: {} to {} ({}).\n",
        thousands(records),
        thousands(records + outcome.grown),
        if records <= REBUILD_UP_TO {
            "stores built and prefilled anew every round"
        } else {
            "stores prefilled once for both header settings; the first requests sent since stay"
        }
    );
    let mut columns = vec![format!("{} ns (allocs)", NAMES[BARE])];
    columns.extend(NAMES[1..].iter().map(|n| format!("{n} × bare (allocs)")));
    columns.push("fastest layer".into());
    out.push_str(&header_row("case", &columns));
    for (c, case) in cases.iter().enumerate() {
        let bare = outcome.median(BARE, c);
        let _ = write!(
            out,
            "| {} | {bare:.0} ({:.1}) |",
            case.name, outcome.allocations[BARE][c]
        );
        let mut fastest: Option<(usize, f64)> = None;
        for w in 1..WRAPPERS {
            match &outcome.verdicts[w][c] {
                Some(answer) => {
                    let _ = write!(out, " answers {answer} |");
                }
                None => {
                    let ratio = outcome.median(w, c) / bare;
                    let bold = if w == OURS { "**" } else { "" };
                    let _ = write!(
                        out,
                        " {bold}{ratio:.2}{bold} ({:.1}){} |",
                        outcome.allocations[w][c],
                        peer_note(w, case.kind)
                    );
                    if fastest.is_none_or(|(_, best)| ratio < best) {
                        fastest = Some((w, ratio));
                    }
                }
            }
        }
        let _ = writeln!(out, " {} |", fastest.map_or("—", |(w, _)| NAMES[w]));
    }
    out.push('\n');
    // The spread and batch sizes, for ours and the bare router.
    let _ = writeln!(
        out,
        "Spread (ns per call, median [25th–75th percentile] × calls per batch): {}",
        cases
            .iter()
            .enumerate()
            .map(|(c, case)| {
                let spread = |w: usize| {
                    let s = &mut outcome.samples[w][c].clone();
                    format!(
                        "{:.0} [{:.0}–{:.0}] ×{}",
                        median(s),
                        quantile(s, 0.25),
                        quantile(s, 0.75),
                        outcome.sizes[w][c]
                    )
                };
                format!(
                    "{}: bare {}, ours {}",
                    case.name,
                    spread(BARE),
                    spread(OURS)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    out
}

/// Every cell where a peer is faster than ours: by how much, with the spread of both.
fn losses(cases: &[Case], outcomes: &[Outcome]) -> String {
    let mut out = String::from("## Cells where a peer is faster than ours\n\n");
    let mut rows = Vec::new();
    for outcome in outcomes {
        for (c, case) in cases.iter().enumerate() {
            if outcome.verdicts[OURS][c].is_some() {
                continue;
            }
            let ours = outcome.median(OURS, c);
            for (peer, name) in NAMES.iter().enumerate().skip(2) {
                if outcome.verdicts[peer][c].is_some() {
                    continue;
                }
                let theirs = outcome.median(peer, c);
                if theirs < ours {
                    let iqr = |w: usize| {
                        let s = &mut outcome.samples[w][c].clone();
                        format!("{:.0}–{:.0}", quantile(s, 0.25), quantile(s, 0.75))
                    };
                    rows.push(format!(
                        "| {} | {} | {}{} | {:.2} | {ours:.0} [{}] | {theirs:.0} [{}] |",
                        outcome.config.title(),
                        case.name,
                        name,
                        peer_note(peer, case.kind),
                        ours / theirs,
                        iqr(OURS),
                        iqr(peer)
                    ));
                }
            }
        }
    }
    if rows.is_empty() {
        out.push_str("None: ours is the fastest layer in every cell.\n");
        return out;
    }
    out.push_str(&header_row(
        "configuration",
        &[
            "case".into(),
            "peer".into(),
            "ours / peer".into(),
            "ours ns [IQR]".into(),
            "peer ns [IQR]".into(),
        ],
    ));
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    out
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
