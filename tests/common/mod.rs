//! Helpers shared by the integration tests: requests, a counting handler, response
//! collection and a fault-injecting store.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_idempotency::{
    Claim, Fingerprint, IdempotencyOutcome, IdempotencyStore, KeyState, LeaseToken, Record,
    StoreError, StoreKey,
};

/// A POST to /orders with an optional key and a body.
pub fn post(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/orders").header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

/// What a test looks at in a response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub outcome: Option<IdempotencyOutcome>,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Asserts an RFC 9457 answer of the layer's own: `status`, `application/problem+json`, a
/// `type` ending with `slug`, a title and a detail, and `Retry-After` exactly on 409 and 503.
pub fn assert_problem(answer: &Answer, status: u16, slug: &str) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(
        answer.headers.contains_key("retry-after"),
        matches!(status, 409 | 503),
        "Retry-After on {status}"
    );
    let json = answer.json();
    assert_eq!(json["status"], status);
    assert!(
        json["type"].as_str().unwrap().ends_with(slug),
        "type {} should end with {slug}",
        json["type"]
    );
    assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(json["detail"].as_str().is_some_and(|t| !t.is_empty()));
}

/// A boxed handler, so services built on it have a type a test can name.
pub type Handler = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Counts a handler's runs as they start and as they finish.
#[derive(Clone, Default)]
pub struct Runs {
    pub started: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
}

impl Runs {
    /// A handler that takes `delay` and answers `201` with `run N`, N counting from 0.
    pub fn handler(&self, delay: Duration) -> Handler {
        let runs = self.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Body>| {
            let runs = runs.clone();
            async move {
                let n = runs.started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                runs.finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(format!("run {n}")))
                        .unwrap(),
                )
            }
        }))
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

/// Calls a service once and collects its whole response.
pub async fn call<S, B>(svc: &S, req: Request<Body>) -> Answer
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("service error");
    collect(res).await
}

/// Collects a response.
pub async fn collect<B>(res: Response<B>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let outcome = res.extensions().get::<IdempotencyOutcome>().copied();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("body error");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
        outcome,
    }
}

/// A handler that counts its runs and answers 201 with a fresh id.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// A service answering `201 {"id": <uuid>, "body": <request body>}` after `delay`.
    pub fn service(
        &self,
        delay: Duration,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        let count = Arc::clone(&self.0);
        tower::service_fn(move |req: Request<Body>| {
            let count = Arc::clone(&count);
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let json = serde_json::json!({
                    "id": uuid::Uuid::new_v4().to_string(),
                    "body": String::from_utf8_lossy(&body),
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("content-type", "application/json")
                        .body(Body::from(json.to_string()))
                        .unwrap(),
                )
            }
        })
    }
}

/// Which store operations fail or stall.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail this many of the next claims.
    pub claim_failures: AtomicUsize,
    /// Fail this many of the next completes.
    pub complete_failures: AtomicUsize,
    /// Fail this many of the next releases.
    pub release_failures: AtomicUsize,
    /// Fail this many of the next extends.
    pub extend_failures: AtomicUsize,
    /// Delay every complete by this many milliseconds.
    pub complete_delay_ms: AtomicUsize,
    /// Delay the reply of every complete by this many milliseconds (the record is stored at
    /// once, as when a reply is slow on the wire).
    pub complete_reply_delay_ms: AtomicUsize,
    /// Delay the reply of every claim by this many milliseconds (the claim itself lands at
    /// once, as when a reply is slow on the wire).
    pub claim_reply_delay_ms: AtomicUsize,
    /// Lose the reply of this many of the next claims: the claim lands, the caller gets an
    /// error.
    pub claim_lost_replies: AtomicUsize,
    /// Answer this many of the next claims with a record that cannot be decoded.
    pub claim_unreadable: AtomicUsize,
    /// When each extend was called.
    pub extend_times: std::sync::Mutex<Vec<tokio::time::Instant>>,
    /// The store key of every claim, in order.
    pub claimed_keys: std::sync::Mutex<Vec<String>>,
    /// Counts of calls.
    pub claims: AtomicUsize,
    pub completes: AtomicUsize,
    /// Completes that failed, injected or not.
    pub failed_completes: AtomicUsize,
    pub releases: AtomicUsize,
    /// Releases that freed a key (the others found nothing their token owned).
    pub released: AtomicUsize,
    pub extends: AtomicUsize,
    /// Commit points declared.
    pub commits: AtomicUsize,
    /// Once set, every call after a successful commit fails: the instance is cut off from
    /// the store between its commit point and its answer.
    pub fail_after_commit: std::sync::atomic::AtomicBool,
    /// Set by a successful commit while `fail_after_commit` is on.
    pub cut_off: std::sync::atomic::AtomicBool,
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault")]
pub struct Injected;

/// A store wrapper that injects failures and delays on chosen operations and counts calls.
#[derive(Clone)]
pub struct FaultStore<S> {
    pub inner: S,
    pub faults: Arc<Faults>,
}

impl<S> FaultStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Arc::new(Faults::default()),
        }
    }
}

impl<S> FaultStore<S> {
    fn cut_off(&self) -> Result<(), StoreError> {
        if self.faults.cut_off.load(Ordering::SeqCst) {
            Err(StoreError::backend(Injected))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: IdempotencyStore> IdempotencyStore for FaultStore<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.cut_off()?;
        self.faults.claims.fetch_add(1, Ordering::SeqCst);
        self.faults
            .claimed_keys
            .lock()
            .unwrap()
            .push(key.as_str().to_owned());
        if take(&self.faults.claim_failures) {
            return Err(StoreError::backend(Injected));
        }
        if take(&self.faults.claim_unreadable) {
            let newer = [0u8; 4];
            return Err(StoreError::Decode(
                Record::decode(&newer).expect_err("not a record"),
            ));
        }
        let claim = self.inner.claim(key, fingerprint, token, lease).await;
        let delay = self.faults.claim_reply_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        if take(&self.faults.claim_lost_replies) {
            return Err(StoreError::backend(Injected));
        }
        claim
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.faults.completes.fetch_add(1, Ordering::SeqCst);
        if self.cut_off().is_err() {
            self.faults.failed_completes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::backend(Injected));
        }
        let delay = self.faults.complete_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        let result = if take(&self.faults.complete_failures) {
            Err(StoreError::backend(Injected))
        } else {
            self.inner.complete(key, token, record, ttl).await
        };
        let reply_delay = self.faults.complete_reply_delay_ms.load(Ordering::SeqCst);
        if reply_delay > 0 {
            tokio::time::sleep(Duration::from_millis(reply_delay as u64)).await;
        }
        if result.is_err() {
            self.faults.failed_completes.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.faults.releases.fetch_add(1, Ordering::SeqCst);
        self.cut_off()?;
        if take(&self.faults.release_failures) {
            return Err(StoreError::backend(Injected));
        }
        let result = self.inner.release(key, token).await;
        if result.is_ok() {
            self.faults.released.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        self.cut_off()?;
        self.inner.revoke(key, token).await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.faults.extends.fetch_add(1, Ordering::SeqCst);
        self.faults
            .extend_times
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        self.cut_off()?;
        if take(&self.faults.extend_failures) {
            return Err(StoreError::backend(Injected));
        }
        self.inner.extend(key, token, lease).await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.cut_off()?;
        self.inner.commit(key, token, ttl).await?;
        self.faults.commits.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_after_commit.load(Ordering::SeqCst) {
            self.faults.cut_off.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.cut_off()?;
        self.inner.settle(key, record, ttl).await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        self.inner.inspect(key).await
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.inner.purge(key).await
    }
}

/// Waits until `f` holds, up to five seconds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Serves `svc` over real TCP on 127.0.0.1 (HTTP/1.1 and HTTP/2, as the client asks) until
/// the test ends; hyper's `Incoming` bodies are turned into axum bodies first.
pub async fn serve<S, B>(svc: S) -> std::net::SocketAddr
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: std::error::Error + Send + Sync + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = tower::ServiceBuilder::new()
                .map_request(|req: Request<hyper::body::Incoming>| req.map(Body::new))
                .service(svc.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .await;
            });
        }
    });
    addr
}

/// What a client over real TCP saw.
#[derive(Debug)]
pub struct WireAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The response ended with its headers (`END_STREAM` on the HEADERS frame in HTTP/2).
    pub headers_only: bool,
}

impl WireAnswer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

/// Sends one request on a new connection (HTTP/2 with prior knowledge when `h2`) and reads
/// the whole response, trailers included.
pub async fn send_over_tcp(
    addr: std::net::SocketAddr,
    h2: bool,
    req: Request<http_body_util::Full<Bytes>>,
) -> WireAnswer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let res = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        sender.send_request(req).await.unwrap()
    };
    let (parts, body) = res.into_parts();
    let headers_only = http_body::Body::is_end_stream(&body);
    let collected = body.collect().await.unwrap();
    WireAnswer {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
        headers_only,
    }
}

/// A TCP proxy on 127.0.0.1 in front of a server, which can pass traffic, blackhole it
/// (connections stay open, nothing moves, new ones are accepted and hang) or drop it (every
/// connection is closed, new ones are refused by closing them at once).
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
}

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;
const DROP: u8 = 2;

impl FaultProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (m, c) = (Arc::clone(&mode), Arc::clone(&changed));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == DROP {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (m, c) = (Arc::clone(&m), Arc::clone(&c));
                tokio::spawn(async move {
                    let (client_rd, client_wr) = client.into_split();
                    let (server_rd, server_wr) = server.into_split();
                    let up = pump(client_rd, server_wr, Arc::clone(&m), Arc::clone(&c));
                    let down = pump(server_rd, client_wr, m, c);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Self {
            port,
            mode,
            changed,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn pass(&self) {
        self.set(PASS);
    }

    pub fn blackhole(&self) {
        self.set(BLACKHOLE);
    }

    pub fn drop_all(&self) {
        self.set(DROP);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.drop_all();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<std::sync::atomic::AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = changed.notified() => {
                if mode.load(Ordering::SeqCst) == DROP { return; }
                continue;
            }
        };
        // Hold the bytes while blackholed; give up on the connection when dropped.
        loop {
            match mode.load(Ordering::SeqCst) {
                PASS => break,
                DROP => return,
                _ => {
                    let notified = changed.notified();
                    if mode.load(Ordering::SeqCst) == BLACKHOLE {
                        notified.await;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A `redis-server` of the test's own on a free port (no persistence unless the test's
/// arguments say so), in a directory of its own, which the test can kill, restart, pause
/// (SIGSTOP) and resume; killed when dropped, panics included, and its directory removed.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    pub port: u16,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with these arguments after the defaults (a later argument wins), such as
    /// `["--appendonly", "yes"]` or `["--replicaof", "127.0.0.1", "6390"]`.
    pub fn start_with(args: &[&str]) -> Self {
        let port = Self::free_port();
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-redis-{port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the private redis-server");
        let mut server = Self {
            child: None,
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A handler that declares its commit point, then answers `201`, runs counted in `runs`;
/// its first instance is cut off from `store` right after the commit point (as if it
/// crashed). A second instance on the same store answers the retries: `outcome-unknown`,
/// never a second run.
pub async fn commit_then_cut_off<S: IdempotencyStore + Clone>(store: S) {
    use tower::Layer as _;
    let runs = Arc::new(AtomicUsize::new(0));
    let instance = |store: Box<dyn Fn() -> tower_idempotency::IdempotencyLayer>| {
        let runs = Arc::clone(&runs);
        store().layer(tower::service_fn(move |req: Request<Body>| {
            let runs = Arc::clone(&runs);
            async move {
                let claim = req
                    .extensions()
                    .get::<tower_idempotency::IdempotencyClaim>()
                    .cloned()
                    .expect("a covered request carries its claim");
                claim.commit().await.expect("the commit point");
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from("made"))
                        .unwrap(),
                )
            }
        }))
    };
    let layer = |store: Arc<dyn IdempotencyStore>| {
        tower_idempotency::IdempotencyLayer::new(store)
            .share_keys_across_callers()
            .lease(Duration::from_millis(300))
            .store_timeout(Duration::from_millis(200))
    };
    let cut = FaultStore::new(store.clone());
    cut.faults.fail_after_commit.store(true, Ordering::SeqCst);
    let first = {
        let cut: Arc<dyn IdempotencyStore> = Arc::new(cut.clone());
        instance(Box::new(move || layer(Arc::clone(&cut))))
    };
    let key = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        call(&first, post(Some(&key), "{}")).await.status,
        StatusCode::CREATED
    );
    assert!(cut.faults.cut_off.load(Ordering::SeqCst));
    let second = {
        let store: Arc<dyn IdempotencyStore> = Arc::new(store);
        instance(Box::new(move || layer(Arc::clone(&store))))
    };
    let mut answer = call(&second, post(Some(&key), "{}")).await;
    for _ in 0..200 {
        if answer.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        answer = call(&second, post(Some(&key), "{}")).await;
    }
    assert_problem(&answer, 500, "outcome-unknown");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a committed operation ran again"
    );
}

/// What a [`counting_server`] saw: the key of every attempt, and how often the operation ran.
#[derive(Clone, Default)]
pub struct Seen {
    pub keys: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    pub runs: Arc<AtomicUsize>,
}

/// A server on a loopback port whose `POST /orders` takes `work` and answers `201` with
/// `order {n} for {body}`, behind the layer on a memory store; every attempt's key is
/// recorded in front of the layer (replays and 409s included).
pub async fn counting_server(seen: Seen, work: Duration) -> std::net::SocketAddr {
    use axum::routing::post;
    let runs = Arc::clone(&seen.runs);
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let runs = Arc::clone(&runs);
                async move {
                    tokio::time::sleep(work).await;
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("order {n} for {body}"))
                }
            }),
        )
        .layer(
            tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
                .share_keys_across_callers()
                .lease(Duration::from_secs(5)),
        )
        .layer(axum::middleware::map_request(
            move |req: axum::extract::Request| {
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.keys.lock().unwrap().push(key);
                async move { req }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A Redis Cluster of three primaries on loopback ports, started for a test and stopped with
/// it (each node a [`PrivateRedis`]; `redis-cli --cluster create` assigns the slots).
pub struct PrivateCluster {
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    pub fn start() -> Self {
        let nodes: Vec<PrivateRedis> = (0..3)
            .map(|_| {
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let status = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        // Every node must agree that the cluster is up before it takes commands.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        for node in &nodes {
            loop {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not come up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateRedis::url).collect()
    }

    /// Runs `redis-cli` with `args` on every node and returns each node's output.
    fn on_each(&self, args: &[&str]) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &node.port.to_string()])
                    .args(args)
                    .output()
                    .expect("redis-cli");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.on_each(&["dbsize"])
            .iter()
            .map(|out| out.trim().parse().expect("a key count"))
            .collect()
    }

    /// The sum over the nodes of the `INFO {section}` field starting with `prefix` (up to the
    /// next comma): `("commandstats", "cmdstat_evalsha:calls=")`, `("stats",
    /// "total_error_replies:")`.
    pub fn info_sum(&self, section: &str, prefix: &str) -> u64 {
        self.on_each(&["info", section])
            .iter()
            .map(|out| {
                out.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
            })
            .sum()
    }
}

/// The heartbeat fails for the whole run, so the lease lapses while nobody else claims the
/// key: the owner still stores its outcome, and the retry replays it (one run).
pub async fn uncontested_lapse<S: IdempotencyStore + Clone>(store: S) {
    use tower::Layer;
    let store = FaultStore::new(store);
    store
        .faults
        .extend_failures
        .store(usize::MAX, Ordering::SeqCst);
    let runs = Runs::default();
    let svc = tower_idempotency::IdempotencyLayer::new(store.clone())
        .share_keys_across_callers()
        .lease(Duration::from_millis(200))
        .layer(runs.handler(Duration::from_millis(700)));
    let key = uuid::Uuid::new_v4().to_string();
    let first = call(&svc, post(Some(&key), "{}")).await;
    assert_eq!(first.status, 201);
    assert!(
        store.faults.extends.load(Ordering::SeqCst) >= 2,
        "heartbeats were tried"
    );
    let retry = call(&svc, post(Some(&key), "{}")).await;
    assert_eq!(
        retry.outcome,
        Some(IdempotencyOutcome::Replayed),
        "{}",
        retry.text()
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.started(), 1);
}

/// A response body fed by a channel, so a test decides when each frame is sent; no size
/// hint, so HTTP/1.1 sends it chunked unless a header says otherwise.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<http_body::Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// Two instances (two stores on one shared backend, two layered services): 64 concurrent
/// requests with one key run the handler once, every answer is the same, and a later retry
/// on either instance is a replay.
pub async fn two_instances_run_once<S: IdempotencyStore + Clone>(store_a: S, store_b: S) {
    use tower::Layer;
    use tower_idempotency::IdempotencyLayer;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        tower::service_fn(move |_req: Request<Body>| {
            let runs = Arc::clone(&runs);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                runs.fetch_add(1, Ordering::SeqCst);
                let body = uuid::Uuid::new_v4().to_string();
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Body::from(body))
                        .expect("response"),
                )
            }
        })
    };
    let instances = [
        IdempotencyLayer::new(store_a.clone())
            .share_keys_across_callers()
            .layer(handler.clone()),
        IdempotencyLayer::new(store_b.clone())
            .share_keys_across_callers()
            .layer(handler),
    ];
    let idem_key = uuid::Uuid::new_v4().to_string();
    let request = |key: &str| {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"item":"book","qty":1}"#))
            .expect("request")
    };

    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let svc = instances[i % 2].clone();
            let key = idem_key.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                // Retry until done: 409 means the first request is still running.
                for _ in 0..200 {
                    let res = svc
                        .clone()
                        .oneshot(request(&key))
                        .await
                        .expect("infallible");
                    match res.status() {
                        StatusCode::CREATED => {
                            return res.into_body().collect().await.expect("body").to_bytes();
                        }
                        StatusCode::CONFLICT => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                panic!("the request never completed");
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.expect("task panicked"));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler must run exactly once"
    );
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every 201 must carry the same body"
    );
    for svc in &instances {
        let res = svc
            .clone()
            .oneshot(request(&idem_key))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            res.headers()
                .get(tower_idempotency::REPLAYED_HEADER)
                .map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "a later retry must be a replay"
        );
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, bodies[0]);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A store behind a wire that can be paused, as a paused Redis server is: every call is
/// sent in order to one worker that applies them one by one, and while the wire is paused
/// they wait. A call whose caller gave up (the layer's store timeout) still lands when the
/// wire resumes, in the order it was sent, exactly like a command already written to a
/// socket.
#[derive(Clone)]
pub struct PausedWire<S> {
    inner: S,
    jobs: tokio::sync::mpsc::UnboundedSender<WireJob>,
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    /// Calls by name, in the order they landed.
    pub landed: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

type WireJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl<S: IdempotencyStore + Clone> PausedWire<S> {
    pub fn new(inner: S) -> Self {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<WireJob>();
        let (paused, _) = tokio::sync::watch::channel(false);
        let paused = Arc::new(paused);
        let mut resumed = paused.subscribe();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let _ = resumed.wait_for(|p| !*p).await;
                job.await;
            }
        });
        Self {
            inner,
            jobs,
            paused,
            landed: Arc::default(),
        }
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Sends `call` down the wire and waits for its reply.
    async fn send<T, F>(&self, name: &'static str, call: impl FnOnce(S) -> F) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let fut = call(self.inner.clone());
        let landed = Arc::clone(&self.landed);
        let job: WireJob = Box::pin(async move {
            let out = fut.await;
            landed.lock().unwrap().push(name);
            let _ = tx.send(out);
        });
        self.jobs.send(job).expect("the wire's worker runs");
        rx.await.expect("the wire's worker answers")
    }
}

#[async_trait]
impl<S: IdempotencyStore + Clone> IdempotencyStore for PausedWire<S> {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (key, fingerprint) = (key.clone(), *fingerprint);
        self.send("claim", move |s| async move {
            s.claim(&key, &fingerprint, token, lease).await
        })
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("complete", move |s| async move {
            s.complete(&key, token, record, ttl).await
        })
        .await
    }

    async fn release(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.send(
            "release",
            move |s| async move { s.release(&key, token).await },
        )
        .await
    }

    async fn revoke(&self, key: &StoreKey, token: LeaseToken) -> Result<(), StoreError> {
        let key = key.clone();
        self.send(
            "revoke",
            move |s| async move { s.revoke(&key, token).await },
        )
        .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("extend", move |s| async move {
            s.extend(&key, token, lease).await
        })
        .await
    }

    async fn commit(
        &self,
        key: &StoreKey,
        token: LeaseToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = key.clone();
        self.send("commit", move |s| async move {
            s.commit(&key, token, ttl).await
        })
        .await
    }

    async fn settle(
        &self,
        key: &StoreKey,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = key.clone();
        self.send("settle", move |s| async move {
            s.settle(&key, record, ttl).await
        })
        .await
    }

    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let key = key.clone();
        self.send("inspect", move |s| async move { s.inspect(&key).await })
            .await
    }

    async fn purge(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.send("purge", move |s| async move { s.purge(&key).await })
            .await
    }
}
