//! The installed `idempotency-gateway` binary in front of a tiny upstream that counts its
//! executions: one execution per key over HTTP/1.1 and HTTP/2, on the memory store and on
//! PostgreSQL (`DATABASE_URL`; skipped, saying so, without it); its command line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

const BIN: &str = env!("CARGO_BIN_EXE_idempotency-gateway");

/// Every environment variable the gateway reads, found in its source: the calls
/// `var("…")`, `flag("…")` and `millis("…")` of `Settings::from_vars`.
fn variables_read() -> Vec<String> {
    let source = include_str!("../src/gateway.rs");
    let mut names = Vec::new();
    for call in ["var(\"", "flag(\"", "millis(\""] {
        for (i, _) in source.match_indices(call) {
            let rest = &source[i + call.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if rest[name.len()..].starts_with('"') && !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// An upstream that counts the requests it runs and answers `201 run N`.
async fn upstream(runs: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let runs = Arc::clone(&runs);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let runs = Arc::clone(&runs);
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        let text = format!("run {n} of {}", String::from_utf8_lossy(&body));
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::CREATED)
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The gateway process, killed when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` and `env` (and nothing of the test's own environment that
/// the gateway reads), and waits until it listens.
async fn start(args: &[&str], env: &[(&str, String)], port: u16) -> Gateway {
    let mut cmd = Command::new(BIN);
    for name in variables_read() {
        cmd.env_remove(name);
    }
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the gateway exited: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gateway did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Gateway { child, addr }
}

/// Posts `body` with `key` twice, over HTTP/2 (prior knowledge) or HTTP/1.1: answers both
/// responses' status, replay header and body.
async fn post_twice(
    gw: SocketAddr,
    key: &str,
    http2: bool,
) -> Vec<(StatusCode, Option<String>, String)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let req = Request::post(format!("http://{gw}/payments"))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"amount\":12}")))
            .unwrap();
        let res = client.request(req).await.expect("the gateway answers");
        if http2 {
            assert_eq!(res.version(), hyper::Version::HTTP_2);
        }
        let status = res.status();
        let replayed = res
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = res.into_body().collect().await.unwrap().to_bytes();
        answers.push((
            status,
            replayed,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    answers
}

/// Over HTTP/1.1 and HTTP/2: one upstream run per key, the retry replayed.
async fn one_run_per_key(gw: SocketAddr, runs: &AtomicUsize) {
    let before = runs.load(Ordering::SeqCst);
    for (i, http2) in [false, true].into_iter().enumerate() {
        let key = format!("pay-{}-{i}", uuid_ish());
        let answers = post_twice(gw, &key, http2).await;
        assert_eq!(answers[0].0, StatusCode::CREATED, "{answers:?}");
        assert_eq!(answers[0].1, None, "the first answer ran: {answers:?}");
        assert_eq!(answers[1].0, StatusCode::CREATED);
        assert_eq!(
            answers[1].1.as_deref(),
            Some("true"),
            "the retry is a replay"
        );
        assert_eq!(answers[0].2, answers[1].2, "the same body");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            before + i + 1,
            "one upstream run per key (http2: {http2})"
        );
    }
}

fn uuid_ish() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn one_upstream_run_per_key_on_the_memory_store_configured_by_environment() {
    let runs = Arc::new(AtomicUsize::new(0));
    let up = upstream(Arc::clone(&runs)).await;
    let port = free_port();
    // IDEMPOTENCY_STORE unset: the memory store.
    let gw = start(
        &[],
        &[
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("UPSTREAM_URL", format!("http://{up}")),
            ("IDEMPOTENCY_SHARED_SCOPE", "1".into()),
        ],
        port,
    )
    .await;
    one_run_per_key(gw.addr, &runs).await;
}

#[tokio::test]
async fn one_upstream_run_per_key_on_postgres_configured_by_flags() {
    let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        println!("skipped: DATABASE_URL not set");
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let up = upstream(Arc::clone(&runs)).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream_url = format!("http://{up}");
    let gw = start(
        &[
            "--listen",
            &listen,
            "--upstream",
            &upstream_url,
            "--store",
            &url,
            "--shared-scope",
        ],
        &[],
        port,
    )
    .await;
    one_run_per_key(gw.addr, &runs).await;
    // A second gateway on the same store replays what the first stored.
    let port2 = free_port();
    let listen2 = format!("127.0.0.1:{port2}");
    let gw2 = start(
        &[
            "--listen",
            &listen2,
            "--upstream",
            &upstream_url,
            "--shared-scope",
        ],
        &[("IDEMPOTENCY_STORE", url.clone())],
        port2,
    )
    .await;
    let key = format!("shared-{}", uuid_ish());
    let first = post_twice(gw.addr, &key, false).await;
    let runs_after = runs.load(Ordering::SeqCst);
    let other = post_twice(gw2.addr, &key, true).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_after,
        "no run on the second gateway"
    );
    assert_eq!(other[0].1.as_deref(), Some("true"));
    assert_eq!(other[0].2, first[0].2);
}

#[test]
fn help_lists_every_environment_variable_and_exits_0() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    let names = variables_read();
    assert!(
        names.len() >= 11,
        "found the variables the gateway reads: {names:?}"
    );
    for name in &names {
        assert!(help.contains(name.as_str()), "--help lists {name}");
    }
    assert!(help.contains("Exit status"));
    // The secret's value never shows in the help.
    let out = Command::new(BIN)
        .arg("--help")
        .env("IDEMPOTENCY_SCOPE_SECRET", "hunter2-secret")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2-secret"));
}

#[test]
fn bad_flags_and_settings_exit_2_without_serving() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    for (args, env, what) in [
        (&["--bogus"][..], &[][..], "unknown flag"),
        (&["--listen", &listen, "--shared-scope"], &[], "no upstream"),
        (
            &["--listen", &listen, "--upstream", "http://127.0.0.1:1"],
            &[],
            "no caller scope",
        ),
        (
            &[
                "--listen",
                "nowhere",
                "--upstream",
                "http://127.0.0.1:1",
                "--shared-scope",
            ],
            &[],
            "bad listen address",
        ),
        (
            &[
                "--listen",
                &listen,
                "--upstream",
                "ftp://x",
                "--shared-scope",
            ],
            &[],
            "bad upstream",
        ),
        (
            &[
                "--listen",
                &listen,
                "--upstream",
                "http://127.0.0.1:1",
                "--shared-scope",
                "maybe",
            ],
            &[],
            "bad flag value",
        ),
        (
            &[
                "--listen",
                &listen,
                "--upstream",
                "http://127.0.0.1:1",
                "--shared-scope",
                "--lease-ms",
                "0",
            ],
            &[],
            "zero lease",
        ),
        (
            &["--listen", &listen, "--upstream", "http://127.0.0.1:1"],
            &[
                ("IDEMPOTENCY_SHARED_SCOPE", "1"),
                ("IDEMPOTENCY_SCOPE_HEADER", "authorization"),
                ("IDEMPOTENCY_SCOPE_SECRET", "s"),
            ][..],
            "two scopes at once",
        ),
        (
            &["--listen", &listen, "--shared-scope"],
            &[
                ("UPSTREAM_URL", "http://127.0.0.1:1"),
                ("UPSTREAM_TIMEOUT_MS", "100"),
                ("UPSTREAM_CONNECT_TIMEOUT_MS", "200"),
            ][..],
            "connect timeout longer than the upstream timeout",
        ),
        (
            &["--listen", &listen, "--shared-scope"],
            &[
                ("UPSTREAM_URL", "http://127.0.0.1:1"),
                ("IDEMPOTENCY_PROBLEM_PROFILE", "stripe-ish"),
            ][..],
            "unknown problem profile",
        ),
    ] {
        let mut cmd = Command::new(BIN);
        for name in variables_read() {
            cmd.env_remove(name);
        }
        let out = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{what}: says why");
    }
}

#[test]
fn an_unreachable_store_exits_1() {
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            "http://127.0.0.1:1",
            "--shared-scope",
            "--store",
            &format!("redis://127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("IDEMPOTENCY_STORE"));
}

/// The gateway's own refusals in the profile it is told, by flag or environment: a request
/// without a key is Stripe's `400` error object, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn the_problem_profile_shapes_the_gateways_own_refusals() {
    let runs = Arc::new(AtomicUsize::new(0));
    let up = upstream(Arc::clone(&runs)).await;
    for by_flag in [false, true] {
        let port = free_port();
        let mut args = vec!["--shared-scope"];
        let mut env = vec![
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("UPSTREAM_URL", format!("http://{up}")),
        ];
        if by_flag {
            args.extend(["--problem-profile", "stripe"]);
        } else {
            env.push(("IDEMPOTENCY_PROBLEM_PROFILE", "stripe".into()));
        }
        let gw = start(&args, &env, port).await;
        for http2 in [false, true] {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .http2_only(http2)
                .build_http();
            let req = Request::post(format!("http://{}/payments", gw.addr))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let res = client.request(req).await.expect("the gateway answers");
            assert_eq!(res.status(), StatusCode::BAD_REQUEST);
            assert_eq!(res.headers()["content-type"], "application/json");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let error: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
            assert!(error["error"]["message"].is_string(), "{error}");
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );
}
