//! The HTTPS listener: accept loop, TLS, HTTP/1.1, and every per-connection bound.
//!
//! One task accepts; each connection gets its own task, so a slow client only ever holds its
//! own task. Bounds (all from `[api.limits]`):
//!
//! - at most `max_connections` connections are served at once: the accept loop takes a
//!   permit before it accepts, so extra clients wait in the kernel's backlog instead of
//!   costing memory;
//! - the TLS handshake and each request head must complete within `header_read_timeout`
//!   (hyper's timer starts when it begins waiting for a head, so this also closes idle
//!   keep-alive connections); heads are capped at 64 KiB and 100 headers (431), the read buffer at 128 KiB;
//! - a connection with no request in progress and no byte moving for `idle_timeout` is
//!   dropped (a client that stopped reading its response);
//! - a request declaring a body over `max_body_bytes` is refused at once (413), and every
//!   body is wrapped in a limit so a chunked one cannot exceed it either;
//! - each request gets `request_timeout`, body included (503 `timeout` after it, which also
//!   ends a stalled upload).
//!
//! Shutdown: when the `shutdown` future resolves the listener is closed, every connection is
//! told to finish its in-flight request and close (hyper's graceful shutdown), and `serve`
//! waits up to `shutdown_grace` before dropping what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::ApiError;
use crate::config::Limits;

/// Largest request head (request line and headers), bytes.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The SHA-256 of the client certificate a connection's TLS handshake verified (against the
/// appliance CA), put in every request's extensions; who it is, is the API's question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the DER certificate.
    pub sha256: [u8; 32],
}

/// How the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeReport {
    /// Connections served in total.
    pub connections: u64,
    /// Connections still open when the grace period ended (dropped).
    pub dropped_at_shutdown: usize,
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then drains (see the module
/// docs).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> ServeReport {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut served = 0u64;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    eprintln!("ferryd: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        served += 1;
        conns.spawn(connection(
            tcp,
            acceptor.clone(),
            app.clone(),
            limits,
            stop_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace(), async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let dropped = if drained { 0 } else { conns.len() };
    conns.shutdown().await;
    ServeReport {
        connections: served,
        dropped_at_shutdown: dropped,
    }
}

/// Last I/O time and requests in progress on one connection.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Counts a request in progress while alive.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        a.touch();
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An I/O stream that records when bytes last moved.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(limits.header_read_timeout(), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        // A failed or too slow handshake is the client's problem; nothing to log per client.
        _ => return,
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| ClientCert {
            sha256: Sha256::digest(c.as_ref()).into(),
        });
    let activity = Arc::new(Activity::new());
    activity.touch();
    let io = TokioIo::new(Tracked {
        inner: tls,
        activity: activity.clone(),
    });
    let a = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        if let Some(c) = client_cert {
            req.extensions_mut().insert(c);
        }
        let app = app.clone();
        let guard = InFlight::new(&a);
        async move {
            let r = handle(app, req, limits).await;
            drop(guard);
            Ok::<_, Infallible>(r)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(2 * MAX_HEAD_BYTES);
    // Upgrades (the data port's replication sessions) hand the connection to their handler.
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    let idle = limits.idle_timeout();
    let mut shutting = false;
    if *stop.borrow() {
        shutting = true;
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            _ = conn.as_mut() => break,
            r = stop.changed(), if !shutting => {
                let _ = r;
                shutting = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline) => {
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.last() + idle <= Instant::now()
                {
                    // Idle: drop the connection (and its TLS stream) without ceremony.
                    break;
                }
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    activity.touch();
                }
            }
        }
    }
}

/// One request: body bounds, the timeout, common headers.
async fn handle(app: Router, req: Request<Incoming>, limits: Limits) -> Response {
    let max = usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut resp = if declared.is_some_and(|n| n > limits.max_body_bytes) {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max} bytes"),
        )
        .into_response()
    } else {
        let method = req.method().clone();
        let path: String = req.uri().path().chars().take(200).collect();
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, max)));
        let r = match tokio::time::timeout(limits.request_timeout(), app.oneshot(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(never)) => match never {},
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request took longer than {} s",
                    limits.request_timeout_secs
                ),
            )
            .into_response(),
        };
        if r.status().is_server_error() {
            eprintln!("ferryd: {method} {path} -> {}", r.status().as_u16());
        }
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct TestServer {
        addr: SocketAddr,
        connector: tokio_rustls::TlsConnector,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        done: tokio::task::JoinHandle<ServeReport>,
        _dir: tempfile::TempDir,
    }

    async fn start(limits: Limits) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let id =
            crate::tls::load_or_create(dir.path(), &crate::config::TlsConfig::default()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(id.ca_cert.as_ref().unwrap()).unwrap();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let app = Router::new()
            .route("/fast", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    "slow ok"
                }),
            )
            .route(
                "/echo",
                post(|b: axum::body::Bytes| async move { b.len().to_string() }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(serve(listener, id.server_config, app, limits, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            stop: Some(tx),
            done,
            _dir: dir,
        }
    }

    impl TestServer {
        async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
            let tcp = TcpStream::connect(self.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            self.connector.connect(name, tcp).await.unwrap()
        }

        /// Sends one request on a new connection and returns the whole response text.
        async fn request(&self, raw: &str) -> String {
            let mut s = self.tls().await;
            s.write_all(raw.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        }

        async fn stop(mut self) -> ServeReport {
            let _ = self.stop.take().unwrap().send(());
            self.done.await.unwrap()
        }
    }

    fn get_req(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    }

    fn limits() -> Limits {
        Limits {
            header_read_timeout_secs: 1,
            idle_timeout_secs: 2,
            request_timeout_secs: 2,
            max_body_bytes: 1024,
            shutdown_grace_secs: 5,
            ..Limits::default()
        }
    }

    /// Reads until EOF or error; returns how long that took.
    async fn until_closed(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Duration {
        let t = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return t.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("the server never closed the connection"),
            }
        }
    }

    #[tokio::test]
    async fn slowloris_is_cut_after_the_header_timeout_and_blocks_nobody() {
        let srv = start(limits()).await;
        let mut slow = srv.tls().await;
        slow.write_all(b"GET /fast HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        // Others are served meanwhile.
        let t = Instant::now();
        let r = srv.request(&get_req("/fast")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("cache-control: no-store"), "{r}");
        assert!(t.elapsed() < Duration::from_millis(500));
        // The slow one is closed around the 1 s header timeout.
        let waited = until_closed(&mut slow).await;
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        // A silent client that never even finishes the TLS handshake is cut too.
        let mut raw = TcpStream::connect(srv.addr).await.unwrap();
        let t = Instant::now();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut b))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(t.elapsed() < Duration::from_secs(3));
        srv.stop().await;
    }

    /// With a long header timeout, the idle watchdog is what closes a silent connection, and
    /// a keep-alive connection once its request is answered.
    #[tokio::test]
    async fn idle_connections_are_closed() {
        let srv = start(Limits {
            header_read_timeout_secs: 30,
            request_timeout_secs: 1,
            idle_timeout_secs: 1,
            ..limits()
        })
        .await;
        let mut silent = srv.tls().await;
        let waited = until_closed(&mut silent).await;
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
        let mut kept = srv.tls().await;
        kept.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let waited = until_closed(&mut kept).await;
        assert!(waited < Duration::from_secs(4), "{waited:?}");
        // A handler busy for 0.8 s with no byte moving is not idle: it is answered.
        let r = srv.request(&get_req("/slow")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        srv.stop().await;
    }

    #[tokio::test]
    async fn body_limits() {
        let srv = start(limits()).await;
        let ok = srv
            .request("POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
            .await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("5"), "{ok}");
        let big = srv
            .request("POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99999\r\n\r\n")
            .await;
        assert!(
            big.starts_with("HTTP/1.1 413") && big.contains("payload_too_large"),
            "{big}"
        );
        // Chunked bodies are bounded too (axum's own extractor sees the limit).
        let chunk = "x".repeat(1000);
        let raw = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len(),
            chunk.len()
        );
        let r = srv.request(&raw).await;
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        // Oversized heads are refused by hyper.
        let r = srv
            .request(&format!(
                "GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(MAX_HEAD_BYTES + 10)
            ))
            .await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        srv.stop().await;
    }

    #[tokio::test]
    async fn connection_limit_queues_extra_clients() {
        let srv = start(Limits {
            max_connections: 2,
            ..limits()
        })
        .await;
        let a = srv.tls().await;
        let b = srv.tls().await;
        // The third connection is accepted by the kernel but not served: its handshake
        // does not complete while two are open.
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut third = Box::pin(srv.connector.connect(name, tcp));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut third)
                .await
                .is_err()
        );
        drop(a);
        let mut c = tokio::time::timeout(Duration::from_secs(3), third)
            .await
            .expect("served once a slot frees")
            .unwrap();
        c.write_all(get_req("/fast").as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        drop(b);
        srv.stop().await;
    }

    #[tokio::test]
    async fn shutdown_finishes_in_flight_requests() {
        let srv = start(limits()).await;
        let mut s = srv.tls().await;
        s.write_all(get_req("/slow").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let addr = srv.addr;
        let report = srv.stop();
        let (report, out) = tokio::join!(report, async {
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        });
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("slow ok"),
            "{out}"
        );
        assert_eq!(report.dropped_at_shutdown, 0);
        // The listener is closed.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
