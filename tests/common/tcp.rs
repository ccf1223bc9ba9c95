//! A service served over real TCP on a loopback port, and a client that reads the whole
//! answer off the wire (HTTP/1.1 or HTTP/2, trailers included).

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::Service;

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
