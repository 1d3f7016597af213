//! `terminate` routes end to end: the real `portico` binary between a
//! rustls + hyper client (HTTP/1.1 and h2 by ALPN) and an in-process hyper
//! origin (HTTP/1.1, h2c or a Unix socket) that records what it received
//! and when.
//!
//! Timing-sensitive tests (SSE, upload streaming, cancellation, the 256 MiB
//! transfer, the embedded default on fixed ports) take [`SERIAL`] for
//! writing so that nothing else in this binary competes with them for the
//! two cores; the others share it.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{HandshakeKind, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{mpsc, RwLock};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use common::{
    any_port, any_port_v6, api_config, bounded, connect, empty, full, rss_kib, BoxError, DeadPort,
    Portico, TempDir, TestBody,
};

/// Write: this test runs alone in this binary. Read: shares with the others.
/// tokio's lock is runtime-agnostic, so it works across the per-test runtimes.
static SERIAL: RwLock<()> = RwLock::const_new(());

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- bodies

/// A body fed by a channel: each `send` is one frame. Dropping the sender
/// ends the body; the sender's `closed()` tells when the body was dropped.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn channel_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel(1);
    (tx, ChanBody(rx).boxed_unsync())
}

/// Period of the deterministic byte stream: a 1 MiB + 7 block of
/// pseudo-random bytes repeated, so that any lost, duplicated or shifted
/// chunk changes the content at that offset.
const PATTERN_LEN: usize = (1 << 20) + 7;
const CHUNK: usize = 64 * 1024;

fn pattern() -> &'static Bytes {
    static P: OnceLock<Bytes> = OnceLock::new();
    P.get_or_init(|| Bytes::from(common::pseudo_random(PATTERN_LEN, 0x9e37_79b9_7f4a_7c15)))
}

/// `len` bytes of the pattern, generated as they are polled (zero-copy slices).
struct PatternBody {
    pos: u64,
    end: u64,
}

impl PatternBody {
    fn new(len: u64) -> PatternBody {
        PatternBody { pos: 0, end: len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.pos >= self.end {
            return Poll::Ready(None);
        }
        let off = (self.pos % PATTERN_LEN as u64) as usize;
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let n = CHUNK.min(PATTERN_LEN - off).min(left);
        self.pos += n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern().slice(off..off + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

/// Compares a received stream with the pattern, byte for byte, as it arrives.
#[derive(Default)]
struct PatternCheck {
    len: u64,
    first_mismatch: Option<u64>,
}

impl PatternCheck {
    fn feed(&mut self, mut data: &[u8]) {
        let pat = pattern();
        while !data.is_empty() {
            let off = (self.len % PATTERN_LEN as u64) as usize;
            let n = data.len().min(PATTERN_LEN - off);
            let (got, want) = (&data[..n], &pat[off..off + n]);
            if self.first_mismatch.is_none() && got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                self.first_mismatch = Some(self.len + i as u64);
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }

    fn verdict(&self) -> String {
        match self.first_mismatch {
            None => format!("{} ok", self.len),
            Some(at) => format!("{} mismatch at byte {at}", self.len),
        }
    }
}

// ---------------------------------------------------------------- origin

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OriginProto {
    Http1,
    H2c,
}

/// One request as the origin received it.
#[derive(Debug, Clone)]
struct Seen {
    /// Origin-side connection number, from 1.
    conn: u64,
    peer: String,
    method: Method,
    /// Path and query.
    target: String,
    /// The request URI's authority (h2 `:authority`).
    authority: Option<String>,
    version: Version,
    headers: HeaderMap,
    /// Only for the default handler, which reads the whole body first.
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn header_count(&self, name: &str) -> usize {
        self.headers.get_all(name).iter().count()
    }
}

/// Things the origin observed, with the instant it observed them.
#[derive(Debug)]
enum Event {
    /// `/sse` handed event `n` to hyper.
    Sse { n: u32, at: Instant },
    /// A non-empty request body frame arrived.
    Chunk {
        target: String,
        len: usize,
        at: Instant,
    },
    /// A request body ended (or failed) after `total` bytes.
    UploadEnd {
        target: String,
        total: u64,
        error: Option<String>,
    },
    /// A `/hang` response body was dropped: its stream or connection closed.
    Closed { target: String, at: Instant },
}

struct OriginState {
    seen: Mutex<Vec<Seen>>,
    events: mpsc::UnboundedSender<Event>,
    next_conn: AtomicU64,
}

impl OriginState {
    fn record(&self, s: Seen) {
        self.seen.lock().unwrap().push(s);
    }

    fn event(&self, e: Event) {
        let _ = self.events.send(e);
    }
}

/// A hyper origin. Handlers are chosen by the last path segment, so any
/// location prefix works: `/sse`, `/hang`, `/echo`, `/big?n=N`,
/// `/slow-upload`, `/sink`, anything else answers with the headers it got.
struct Origin {
    /// As written in an `[upstream]`'s `url`.
    url: String,
    state: Arc<OriginState>,
    events: mpsc::UnboundedReceiver<Event>,
    task: JoinHandle<()>,
}

impl Origin {
    fn new_state() -> (Arc<OriginState>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(OriginState {
            seen: Mutex::new(Vec::new()),
            events: tx,
            next_conn: AtomicU64::new(0),
        });
        (state, rx)
    }

    async fn tcp(proto: OriginProto) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let (state, events) = Origin::new_state();
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                let conn = st.next_conn.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve_origin(s, conn, peer.to_string(), proto, st.clone()));
            }
        });
        Origin {
            url: format!("http://{addr}"),
            state,
            events,
            task,
        }
    }

    async fn unix(path: &Path) -> Origin {
        let listener = UnixListener::bind(path).expect("bind unix origin");
        let (state, events) = Origin::new_state();
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = st.next_conn.fetch_add(1, Ordering::SeqCst) + 1;
                let peer = "unix".to_string();
                tokio::spawn(serve_origin(s, conn, peer, OriginProto::Http1, st.clone()));
            }
        });
        Origin {
            url: format!("unix:{}", path.display()),
            state,
            events,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The requests for exactly this path and query.
    fn seen_target(&self, target: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.target == target)
            .collect()
    }

    /// The one request for `target`.
    fn only(&self, target: &str) -> Seen {
        let mut v = self.seen_target(target);
        assert_eq!(v.len(), 1, "origin requests for {target}: {v:#?}");
        v.remove(0)
    }

    /// The first event `pick` accepts (others are dropped) within `within`.
    async fn wait_event<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    if let Some(t) = pick(&ev) {
                        return t;
                    }
                }
                Ok(None) => panic!("origin event channel closed"),
                Err(_) => panic!("origin observed no {what} within {within:?}"),
            }
        }
    }

    async fn sse_written(&mut self, n: u32) -> Instant {
        self.wait_event(
            &format!("SSE event {n}"),
            Duration::from_secs(3),
            |e| match e {
                Event::Sse { n: m, at } if *m == n => Some(*at),
                _ => None,
            },
        )
        .await
    }

    async fn closed(&mut self, target: &str, within: Duration) -> Instant {
        self.wait_event(&format!("close of {target}"), within, |e| match e {
            Event::Closed { target: t, at } if t == target => Some(*at),
            _ => None,
        })
        .await
    }

    async fn upload_end(&mut self, target: &str) -> (u64, Option<String>) {
        self.wait_event(
            &format!("end of the {target} body"),
            Duration::from_secs(5),
            |e| match e {
                Event::UploadEnd {
                    target: t,
                    total,
                    error,
                } if t == target => Some((*total, error.clone())),
                _ => None,
            },
        )
        .await
    }

    /// Events already observed, without waiting.
    fn take_events(&mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_origin<S>(io: S, conn: u64, peer: String, proto: OriginProto, st: Arc<OriginState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer: Arc<str> = peer.into();
    let svc = service_fn(move |req| {
        let st = st.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(origin_handle(req, conn, peer, st).await) }
    });
    let io = TokioIo::new(io);
    let _ = match proto {
        OriginProto::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        }
        OriginProto::H2c => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        }
    };
}

fn event_stream(body: TestBody) -> Response<TestBody> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap()
}

async fn origin_handle(
    req: Request<Incoming>,
    conn: u64,
    peer: Arc<str>,
    st: Arc<OriginState>,
) -> Response<TestBody> {
    let (parts, mut body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut seen = Seen {
        conn,
        peer: peer.to_string(),
        method: parts.method.clone(),
        target: target.clone(),
        authority: parts.uri.authority().map(|a| a.to_string()),
        version: parts.version,
        headers: parts.headers.clone(),
        body: Bytes::new(),
    };
    let last = parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    match last.as_str() {
        "sse" => {
            st.record(seen);
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                for n in 1..=2u32 {
                    if n > 1 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if tx
                        .send(Bytes::from(format!("data: {n}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    st.event(Event::Sse {
                        n,
                        at: Instant::now(),
                    });
                }
            });
            event_stream(body)
        }
        "hang" => {
            st.record(seen);
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: 0\n\n")).await;
                // Never ends: a comment every 100 ms makes a write fail soon
                // after the peer went away even if hyper did not notice the EOF.
                loop {
                    tokio::select! {
                        _ = tx.closed() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if tx.send(Bytes::from_static(b": ping\n\n")).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                st.event(Event::Closed {
                    target,
                    at: Instant::now(),
                });
            });
            event_stream(body)
        }
        "echo" => {
            st.record(seen);
            Response::new(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
        }
        "big" => {
            st.record(seen);
            let n: u64 = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(PatternBody::new(n).boxed_unsync())
                .unwrap()
        }
        "slow-upload" | "sink" => {
            st.record(seen);
            let sink = last == "sink";
            let mut check = PatternCheck::default();
            let mut total = 0u64;
            let mut error = None;
            loop {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            if d.is_empty() {
                                continue;
                            }
                            total += d.len() as u64;
                            if sink {
                                check.feed(&d);
                            } else {
                                st.event(Event::Chunk {
                                    target: target.clone(),
                                    len: d.len(),
                                    at: Instant::now(),
                                });
                            }
                        }
                    }
                    Some(Err(e)) => {
                        error = Some(e.to_string());
                        break;
                    }
                    None => break,
                }
            }
            st.event(Event::UploadEnd {
                target,
                total,
                error,
            });
            let text = if sink {
                check.verdict()
            } else {
                format!("received {total} bytes")
            };
            Response::new(full(format!("{text}\n")))
        }
        _ => {
            seen.body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let mut text = String::new();
            for (k, v) in &parts.headers {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            st.record(seen);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .header("x-origin-conn", conn.to_string())
                .body(full(text))
                .unwrap()
        }
    }
}

// ---------------------------------------------------------------- client

const BOTH_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn client_tls(
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(common::AcceptAny::new(provider))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TCP connect, write `preamble` (e.g. a PROXY header), TLS handshake with `sni`.
async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
    preamble: &[u8],
) -> Tls {
    let mut tcp = connect(addr).await;
    if !preamble.is_empty() {
        tcp.write_all(preamble).await.unwrap();
    }
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .unwrap_or_else(|_| panic!("TLS handshake with {addr} for {sni} timed out"))
    .unwrap_or_else(|e| panic!("TLS handshake with {addr} for {sni} failed: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn alpn(self) -> &'static [u8] {
        match self {
            Proto::H1 => b"http/1.1",
            Proto::H2 => b"h2",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
        }
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

type ResponseFuture = Pin<Box<dyn Future<Output = hyper::Result<Response<Incoming>>> + Send>>;

/// One client connection (HTTP/1.1 or h2) to portico.
struct Client {
    proto: Proto,
    host: String,
    sender: Sender,
    conn: JoinHandle<()>,
}

impl Client {
    /// A connection to `addr` for `api.test`, ALPN `proto`.
    async fn connect(addr: SocketAddr, proto: Proto) -> Client {
        let tls = tls_connect(
            addr,
            client_tls(&[proto.alpn()], BOTH_VERSIONS),
            "api.test",
            b"",
        )
        .await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(proto.alpn()),
            "ALPN not negotiated as asked"
        );
        Client::over(tls, proto, "api.test").await
    }

    async fn over<S>(io: S, proto: Proto, host: &str) -> Client
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let (sender, conn) = match proto {
            Proto::H1 => {
                let (s, c) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("h1 handshake");
                (
                    Sender::H1(s),
                    tokio::spawn(async move {
                        let _ = c.await;
                    }),
                )
            }
            Proto::H2 => {
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                (
                    Sender::H2(s),
                    tokio::spawn(async move {
                        let _ = c.await;
                    }),
                )
            }
        };
        Client {
            proto,
            host: host.to_string(),
            sender,
            conn,
        }
    }

    /// A request for `path` to this client's host.
    fn req(&self, method: Method, path: &str) -> http::request::Builder {
        self.req_host(method, path, &self.host.clone())
    }

    /// `host` goes in `Host` (HTTP/1.1) or `:authority` (h2).
    fn req_host(&self, method: Method, path: &str, host: &str) -> http::request::Builder {
        match self.proto {
            Proto::H1 => Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host),
            Proto::H2 => Request::builder()
                .method(method)
                .uri(format!("https://{host}{path}"))
                .version(Version::HTTP_2),
        }
    }

    /// Wait until the connection takes a request, then start it; the
    /// returned future does not borrow the client.
    async fn start(&mut self, req: Request<TestBody>) -> ResponseFuture {
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.expect("h1 connection not ready");
                Box::pin(s.send_request(req))
            }
            Sender::H2(s) => {
                s.ready().await.expect("h2 connection not ready");
                Box::pin(s.send_request(req))
            }
        }
    }

    async fn send(&mut self, req: Request<TestBody>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = self.start(req).await;
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{what} over {:?} failed: {e:?}", self.proto),
            Err(_) => panic!("{what} over {:?}: no response head within 10s", self.proto),
        }
    }

    async fn get(&mut self, path: &str) -> Response<Incoming> {
        self.request(Method::GET, path, &[]).await
    }

    /// A request without a body, with these extra headers.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut req = self.req(method, path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.send(req.body(empty()).unwrap()).await
    }

    /// A GET with `host` in `Host` (HTTP/1.1) or `:authority` (h2).
    async fn get_host(&mut self, path: &str, host: &str) -> Response<Incoming> {
        let req = self
            .req_host(Method::GET, path, host)
            .body(empty())
            .unwrap();
        self.send(req).await
    }

    /// Drop the connection (TCP close) at once.
    fn kill(self) {
        self.conn.abort();
    }
}

async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("response body not complete within 10s")
        .expect("response body failed")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Read frames until `needle` has arrived; returns the instant it did.
async fn read_until(body: &mut Incoming, buf: &mut Vec<u8>, needle: &[u8]) -> Instant {
    while !contains(buf, needle) {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => panic!(
                "body failed before {:?} arrived: {e}",
                String::from_utf8_lossy(needle)
            ),
            None => panic!(
                "body ended before {:?} arrived; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(buf)
            ),
        }
    }
    Instant::now()
}

fn header_str<'a>(r: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------- configs

/// One listener and one TLS route for `api.test` terminating at site `api`
/// (self-signed); `site` is the rest of `[site.api]` plus its locations,
/// `rest` goes at the end (upstreams, timeouts, more routes).
fn config(listen: SocketAddr, site: &str, rest: &str) -> String {
    format!("{}\n\n{rest}\n", api_config(listen, "", site))
}

/// Everything under `/` to the origin.
fn proxy_config(listen: SocketAddr, origin_url: &str) -> String {
    config(
        listen,
        "[[site.api.location]]\npath = \"/\"\nupstream = \"origin\"\n",
        &format!("[upstream.origin]\nurl = \"{origin_url}\"\n"),
    )
}

/// An HTTP/1.1 origin, and portico on a free address proxying everything
/// to it ([`proxy_config`]).
async fn proxied_origin() -> (Origin, SocketAddr, Portico) {
    let origin = Origin::tcp(OriginProto::Http1).await;
    let portico = Portico::start(&proxy_config(any_port(), &origin.url)).await;
    let listen = *portico
        .listening()
        .last()
        .expect("portico logged its listener");
    (origin, listen, portico)
}

// ---------------------------------------------------------------- 1. SSE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_as_the_origin_writes_them() {
    let _serial = SERIAL.write().await;
    bounded(30, async {
        let (mut origin, listen, _p) = proxied_origin().await;
        for proto in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(listen, proto).await;
            let resp = c.get(&format!("/{}/sse", proto.name())).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                header_str(&resp, "content-type"),
                Some("text/event-stream"),
                "{proto:?}"
            );
            assert_eq!(header_str(&resp, "content-encoding"), None, "{proto:?}");
            assert_eq!(header_str(&resp, "cache-control"), Some("no-cache"));
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let got1 = read_until(&mut body, &mut buf, b"data: 1\n\n").await;
            let sent1 = origin.sse_written(1).await;
            let got2 = read_until(&mut body, &mut buf, b"data: 2\n\n").await;
            let sent2 = origin.sse_written(2).await;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.expect("SSE body").into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            assert_eq!(String::from_utf8_lossy(&buf), "data: 1\n\ndata: 2\n\n");
            let latency = got1.saturating_duration_since(sent1);
            let gap = got2.saturating_duration_since(got1);
            let latency2 = got2.saturating_duration_since(sent2);
            eprintln!(
                "[sse {proto:?}] event 1 reached the client {latency:?} after the origin wrote it; \
                 event 2 {latency2:?}; client-side gap {gap:?}"
            );
            assert!(
                got1 < sent2,
                "{proto:?}: event 1 reached the client only after the origin wrote event 2"
            );
            assert!(
                latency < Duration::from_millis(50),
                "{proto:?}: event 1 took {latency:?} to reach the client"
            );
            assert!(
                latency2 < Duration::from_millis(50),
                "{proto:?}: event 2 took {latency2:?} to reach the client"
            );
            assert!(
                gap >= Duration::from_millis(250),
                "{proto:?}: events arrived only {gap:?} apart (buffered?)"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------- 2. upload streaming

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_stream_to_the_origin() {
    let _serial = SERIAL.write().await;
    bounded(30, async {
        let (mut origin, listen, _p) = proxied_origin().await;
        for proto in [Proto::H1, Proto::H2] {
            let path = format!("/{}/slow-upload", proto.name());
            let mut c = Client::connect(listen, proto).await;
            let (tx, body) = channel_body();
            // No Content-Length: chunked over HTTP/1.1, DATA frames over h2.
            let req = c.req(Method::POST, &path).body(body).unwrap();
            let pending = tokio::spawn(c.start(req).await);
            let chunk1 = Bytes::from(vec![b'a'; 16 * 1024]);
            let chunk2 = Bytes::from(vec![b'b'; 16 * 1024]);
            let sent1 = Instant::now();
            tx.send(chunk1).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent2 = Instant::now();
            tx.send(chunk2).await.unwrap();
            drop(tx);
            let resp = tokio::time::timeout(Duration::from_secs(10), pending)
                .await
                .expect("no response within 10s")
                .unwrap()
                .expect("upload failed");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(body_text(resp).await, "received 32768 bytes\n");
            let seen = origin.only(&path);
            assert_eq!(seen.method, Method::POST);
            assert_eq!(seen.header("content-length"), None);
            let chunks: Vec<(usize, Instant)> = origin
                .take_events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Chunk { target, len, at } if target == path => Some((len, at)),
                    _ => None,
                })
                .collect();
            assert!(!chunks.is_empty(), "{proto:?}: origin saw no body frame");
            let before: usize = chunks
                .iter()
                .filter(|(_, at)| *at < sent2)
                .map(|(n, _)| n)
                .sum();
            let total: usize = chunks.iter().map(|(n, _)| n).sum();
            let first = chunks[0].1.saturating_duration_since(sent1);
            eprintln!(
                "[upload {proto:?}] chunk 1 reached the origin {first:?} after the client sent it \
                 ({} frames in all)",
                chunks.len()
            );
            assert_eq!(total, 32768, "{proto:?}");
            assert_eq!(
                before, 16384,
                "{proto:?}: bytes the origin had before the client sent chunk 2"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------- 3. 256 MiB both ways

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_bounded_memory() {
    let _serial = SERIAL.write().await;
    bounded(120, async {
        let (origin, listen, p) = proxied_origin().await;
        let pid = p.pid();
        let size: u64 = 256 * MIB;
        let idle_rss = rss_kib(pid).expect("read VmRSS");

        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut max, mut samples) = (0u64, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(k) = rss_kib(pid) {
                        max = max.max(k);
                        samples += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (max, samples)
            })
        };

        let mut c = Client::connect(listen, Proto::H1).await;
        let t = Instant::now();
        let req = c
            .req(Method::POST, "/sink")
            .body(PatternBody::new(size).boxed_unsync())
            .unwrap();
        let resp = c.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, format!("{size} ok\n"), "upload");
        let up = t.elapsed();
        let seen = origin.only("/sink");
        assert_eq!(seen.header("content-length"), Some("268435456"));

        let t = Instant::now();
        let resp = c.get(&format!("/big?n={size}")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header_str(&resp, "content-length"), Some("268435456"));
        let mut body = resp.into_body();
        let mut check = PatternCheck::default();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.expect("download body").into_data() {
                check.feed(&d);
            }
        }
        let down = t.elapsed();
        assert_eq!(check.verdict(), format!("{size} ok"), "download");

        stop.store(true, Ordering::Relaxed);
        let (max_rss, samples) = sampler.await.unwrap();
        let mibps = |d: Duration| (size / MIB) as f64 / d.as_secs_f64();
        eprintln!(
            "[256MiB] upload {up:?} ({:.1} MiB/s), download {down:?} ({:.1} MiB/s); \
             portico VmRSS idle {} KiB, max {} KiB over {samples} samples",
            mibps(up),
            mibps(down),
            idle_rss,
            max_rss
        );
        assert!(samples >= 3, "too few RSS samples ({samples})");
        assert!(
            max_rss < 64 * 1024,
            "portico's RSS reached {max_rss} KiB while streaming 256 MiB"
        );
    })
    .await;
}

// ---------------------------------------------------------------- 4. forwarded headers

/// GETs `path` with `headers`, expects 200 and returns what the origin received.
async fn seen_by_origin(
    c: &mut Client,
    origin: &Origin,
    path: &str,
    headers: &[(&str, &str)],
) -> Seen {
    let resp = c.request(Method::GET, path, headers).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = body_text(resp).await;
    origin.only(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_forwarding_headers_and_no_hop_by_hop() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let origin = Origin::tcp(OriginProto::Http1).await;
        let listen = any_port();
        // On [::1]: two `127.0.0.1:0` listeners would be one address.
        let cfg = proxy_config(listen, &origin.url)
            + &format!(
                "\n[[listen]]\naddr = \"{}\"\n\
                 accept_proxy = true\ntrusted = [\"::1/128\"]\n",
                any_port_v6()
            );
        let p = Portico::start(&cfg).await;
        let (listen, proxied) = match p.listening()[..] {
            [a, b] => (a, b),
            ref other => panic!("expected two listeners, got {other:?}"),
        };

        // HTTP/1.1 with everything a client might send.
        let mut c = Client::connect(listen, Proto::H1).await;
        let headers = [
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-for", "1.2.3.4"),
            ("session_id", "abc"),
            ("connection", "x-foo"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
        ];
        let s = seen_by_origin(&mut c, &origin, "/h1/headers", &headers).await;
        assert_eq!(s.version, Version::HTTP_11);
        assert_eq!(s.header("host"), Some("api.test"));
        assert_eq!(s.header_count("x-real-ip"), 1);
        assert_eq!(s.header("x-real-ip"), Some("127.0.0.1"));
        assert_eq!(s.header_count("x-forwarded-for"), 1);
        assert_eq!(s.header("x-forwarded-for"), Some("1.2.3.4, 127.0.0.1"));
        assert_eq!(s.header("x-forwarded-proto"), Some("https"));
        assert_eq!(s.header("x-forwarded-host"), Some("api.test"));
        assert_eq!(
            s.header("forwarded"),
            Some("for=127.0.0.1;host=api.test;proto=https")
        );
        assert_eq!(s.header("session_id"), Some("abc"));
        for gone in [
            "connection",
            "x-foo",
            "keep-alive",
            "te",
            "transfer-encoding",
        ] {
            assert_eq!(s.header(gone), None, "{gone} reached the origin: {s:#?}");
        }

        // h2: `:authority` becomes Host.
        let mut c = Client::connect(listen, Proto::H2).await;
        let headers = [("x-real-ip", "6.6.6.6"), ("session_id", "abc")];
        let s = seen_by_origin(&mut c, &origin, "/h2/headers", &headers).await;
        assert_eq!(s.version, Version::HTTP_11, "h1 upstream");
        assert_eq!(s.header("host"), Some("api.test"));
        assert_eq!(s.header("x-real-ip"), Some("127.0.0.1"));
        assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(s.header("x-forwarded-proto"), Some("https"));
        assert_eq!(s.header("x-forwarded-host"), Some("api.test"));
        assert_eq!(
            s.header("forwarded"),
            Some("for=127.0.0.1;host=api.test;proto=https")
        );
        assert_eq!(s.header("session_id"), Some("abc"));

        // A trusted PROXY header names the real client.
        let tls = tls_connect(
            proxied,
            client_tls(&[b"http/1.1"], BOTH_VERSIONS),
            "api.test",
            b"PROXY TCP4 198.51.100.7 127.0.0.1 5000 443\r\n",
        )
        .await;
        let mut c = Client::over(tls, Proto::H1, "api.test").await;
        let headers = [("x-real-ip", "6.6.6.6")];
        let s = seen_by_origin(&mut c, &origin, "/pp/headers", &headers).await;
        assert_eq!(s.header("x-real-ip"), Some("198.51.100.7"));
        assert_eq!(s.header("x-forwarded-for"), Some("198.51.100.7"));
        assert_eq!(
            s.header("forwarded"),
            Some("for=198.51.100.7;host=api.test;proto=https")
        );
    })
    .await;
}

// ---------------------------------------------------------------- 5. cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_cancels_the_upstream_request() {
    let _serial = SERIAL.write().await;
    bounded(30, async {
        let (mut origin, listen, _p) = proxied_origin().await;

        // (path, client protocol, what the client does)
        let cases = [
            ("/h1-conn/hang", Proto::H1, "closes its connection"),
            ("/h2-conn/hang", Proto::H2, "closes its connection"),
            ("/h2-stream/hang", Proto::H2, "resets the stream"),
        ];
        for (path, proto, how) in cases {
            let mut c = Client::connect(listen, proto).await;
            let resp = c.get(path).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            read_until(&mut body, &mut buf, b"data: 0\n\n").await;
            let gone = Instant::now();
            let keep = if how == "resets the stream" {
                drop(body); // hyper sends RST_STREAM(CANCEL)
                Some(c)
            } else {
                c.kill();
                drop(body);
                None
            };
            let closed = origin.closed(path, Duration::from_secs(2)).await;
            let after = closed.saturating_duration_since(gone);
            eprintln!(
                "[cancel] client {how} ({path}): origin saw its response dropped {after:?} later"
            );
            assert!(
                after < Duration::from_secs(1),
                "{path}: upstream request outlived the client by {after:?}"
            );
            if let Some(mut c) = keep {
                // Only the stream was cancelled: the connection still works.
                let resp = c.get("/h2-stream/after").await;
                assert_eq!(resp.status(), StatusCode::OK);
                let _ = body_text(resp).await;
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------- 6. errors

/// A loopback listener whose accept queue is full, so that further SYNs are
/// dropped and connecting times out. Returns it (keep it alive), the
/// connections that fill it and its address.
fn blackhole() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    s.listen(0).expect("listen(0)");
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..3 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fill.push(c);
        }
    }
    let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(
        probe.is_err(),
        "the full-backlog listener still completed a handshake ({} filler connections); \
         cannot provoke a connect timeout this way",
        fill.len()
    );
    (s, fill, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed_with_one_line_bodies() {
    let _serial = SERIAL.read().await;
    bounded(40, async {
        let mut origin = Origin::tcp(OriginProto::Http1).await;
        let listen = any_port();
        // Bound, never listening: connections are refused.
        let dead_port = DeadPort::new();
        let dead = dead_port.addr;
        let (_hole, _fill, hole) = tokio::task::spawn_blocking(blackhole).await.unwrap();
        let site = r#"max_body = "1MiB"

[[site.api.location]]
path = "/refused"
match = "exact"
upstream = "dead"

[[site.api.location]]
path = "/blackhole"
match = "exact"
upstream = "blackhole"

[[site.api.location]]
path = "/up/"
upstream = "origin"

[[site.api.location]]
path = "/fixed"
match = "exact"
respond = { status = 200, body = "fixed reply" }

[[site.api.location]]
path = "/teapot"
match = "exact"
respond = { status = 418, body = "short and stout" }
"#;
        let rest = format!(
            r#"[upstream.dead]
url = "http://{dead}"

[upstream.blackhole]
url = "http://{hole}"

[upstream.origin]
url = "{}"

[timeouts]
upstream_connect = "300ms"
"#,
            origin.url
        );
        let p = Portico::start(&config(listen, site, &rest)).await;
        let listen = p.addr();
        let mut c = Client::connect(listen, Proto::H1).await;

        // 502: nothing listens.
        let resp = c.get("/refused").await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            header_str(&resp, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        let text = body_text(resp).await;
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(text.ends_with('\n'), "{text:?}");
        assert!(
            text.starts_with(&format!(
                "upstream dead refused the connection: connect to {dead}: "
            )),
            "{text:?}"
        );

        // 504: the connect times out after upstream_connect.
        let t = Instant::now();
        let resp = c.get("/blackhole").await;
        let took = t.elapsed();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let text = body_text(resp).await;
        assert_eq!(
            text,
            format!(
                "upstream blackhole did not accept the connection in time: \
                 connect to {hole} timed out after 300ms\n"
            )
        );
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_secs(2),
            "504 after {took:?}"
        );

        // 404: no location.
        let resp = c.get("/nothing").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_text(resp).await, "no location matches /nothing\n");

        // respond locations.
        let resp = c.get("/fixed").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "fixed reply");
        let resp = c.get("/teapot").await;
        assert_eq!(resp.status().as_u16(), 418);
        assert_eq!(body_text(resp).await, "short and stout");

        // 421: a Host this site is not routed for, over both protocols.
        let resp = c.get_host("/up/headers", "other.test").await;
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(
            body_text(resp).await,
            "host \"other.test\" is not served on this connection\n"
        );
        let mut c2 = Client::connect(listen, Proto::H2).await;
        let resp = c2.get_host("/up/headers", "other.test").await;
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
        let _ = body_text(resp).await;
        // ... while the routed name with a port is fine.
        let resp = c.get_host("/up/headers", "API.test:443").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = body_text(resp).await;
        assert_eq!(origin.seen_target("/up/headers").len(), 1);

        // 413 up front: Content-Length over max_body; nothing is read or sent on.
        let (tx, body) = channel_body();
        let req = c
            .req(Method::POST, "/up/declared/slow-upload")
            .header(header::CONTENT_LENGTH, (2 * MIB).to_string())
            .body(body)
            .unwrap();
        let resp = c.send(req).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body_text(resp).await,
            "request body larger than the site's max_body (1048576 bytes)\n"
        );
        drop(tx);

        // 413 mid-stream: a chunked body that grows past max_body.
        let mut c = Client::connect(listen, Proto::H1).await;
        let (tx, body) = channel_body();
        let req = c
            .req(Method::POST, "/up/chunked/slow-upload")
            .body(body)
            .unwrap();
        let pending = tokio::spawn(c.start(req).await);
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                if tx.send(Bytes::from(vec![b'x'; 512 * 1024])).await.is_err() {
                    return;
                }
            }
            // Keep the body open: the 413 must come from the limit, not the end.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("no response to the oversized chunked upload within 10s")
            .unwrap()
            .expect("oversized chunked upload: no response");
        feeder.abort();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body_text(resp).await,
            "request body larger than the site's max_body (1048576 bytes)\n"
        );
        let (total, error) = origin.upload_end("/up/chunked/slow-upload").await;
        eprintln!("[413] origin got {total} bytes of the oversized chunked body, then {error:?}");
        assert!(total <= MIB, "origin received {total} bytes, over max_body");
        assert!(error.is_some(), "the cut body ended cleanly at the origin");

        // Absence check: the 413 for a declared Content-Length is answered
        // before any upstream request, so one would already have arrived;
        // 200 ms more covers one still in flight on a loaded machine.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            origin.seen_target("/up/declared/slow-upload").is_empty(),
            "the origin saw the request whose Content-Length exceeded max_body"
        );

        let refused = p
            .metric(
                "portico_upstream_failures_total",
                &[("upstream", "dead"), ("reason", "refused")],
            )
            .await;
        let timeout = p
            .metric(
                "portico_upstream_failures_total",
                &[("upstream", "blackhole"), ("reason", "timeout")],
            )
            .await;
        assert_eq!((refused, timeout), (1.0, 1.0));
    })
    .await;
}

// ---------------------------------------------------------------- 7. CORS and site headers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_site_headers() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let origin = Origin::tcp(OriginProto::Http1).await;
        let listen = any_port();
        let site = r#"headers = { "Strict-Transport-Security" = "max-age=31536000", "X-Site" = "api" }
cors = { origins = ["https://app.test"] }

[[site.api.location]]
path = "/fixed"
match = "exact"
respond = { status = 200, body = "fixed" }

[[site.api.location]]
path = "/"
upstream = "origin"
"#;
        let p = Portico::start(&config(
            listen,
            site,
            &format!("[upstream.origin]\nurl = \"{}\"\n", origin.url),
        ))
        .await;
        let listen = p.addr();
        let site_headers = |r: &Response<Incoming>| {
            assert_eq!(
                header_str(r, "strict-transport-security"),
                Some("max-age=31536000")
            );
            assert_eq!(header_str(r, "x-site"), Some("api"));
        };
        let varies_on_origin = |r: &Response<Incoming>| {
            r.headers()
                .get_all(header::VARY)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|v| v.trim().eq_ignore_ascii_case("origin"))
        };

        for proto in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(listen, proto).await;
            let path = format!("/{}/allowed", proto.name());
            let resp = c
                .request(Method::GET, &path, &[("origin", "https://app.test")])
                .await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                header_str(&resp, "access-control-allow-origin"),
                Some("https://app.test")
            );
            assert!(varies_on_origin(&resp), "{:?}", resp.headers());
            site_headers(&resp);
            let _ = body_text(resp).await;
            assert_eq!(
                origin.only(&path).header("origin"),
                Some("https://app.test")
            );
        }

        let mut c = Client::connect(listen, Proto::H1).await;
        let resp = c
            .request(Method::GET, "/denied", &[("origin", "https://evil.test")])
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        for h in [
            "access-control-allow-origin",
            "access-control-allow-methods",
            "access-control-allow-credentials",
        ] {
            assert_eq!(header_str(&resp, h), None, "{h} for a disallowed origin");
        }
        assert!(!varies_on_origin(&resp));
        site_headers(&resp);
        let _ = body_text(resp).await;

        // Preflight: answered by portico, never forwarded.
        let preflight = [
            ("origin", "https://app.test"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ];
        let resp = c.request(Method::OPTIONS, "/v1/chat", &preflight).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            header_str(&resp, "access-control-allow-origin"),
            Some("https://app.test")
        );
        assert_eq!(
            header_str(&resp, "access-control-allow-methods"),
            Some("GET, POST, PUT, PATCH, DELETE, OPTIONS")
        );
        assert_eq!(
            header_str(&resp, "access-control-allow-headers"),
            Some("Authorization, Content-Type, X-Api-Key, Anthropic-Version, OpenAI-Organization")
        );
        assert_eq!(header_str(&resp, "access-control-max-age"), Some("86400"));
        assert!(varies_on_origin(&resp));
        site_headers(&resp);
        assert_eq!(body_text(resp).await, "");

        // A disallowed preflight gets no CORS headers (observed: 204, empty).
        let preflight = [
            ("origin", "https://evil.test"),
            ("access-control-request-method", "POST"),
        ];
        let resp = c.request(Method::OPTIONS, "/v1/chat", &preflight).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(header_str(&resp, "access-control-allow-origin"), None);
        assert_eq!(header_str(&resp, "access-control-allow-methods"), None);
        let _ = body_text(resp).await;
        assert!(
            origin.seen().iter().all(|s| s.method != Method::OPTIONS),
            "a preflight reached the origin"
        );

        // Site headers on direct responses too.
        let resp = c.get("/fixed").await;
        site_headers(&resp);
        assert_eq!(body_text(resp).await, "fixed");
    })
    .await;
}

// ---------------------------------------------------------------- 8. redirect

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https() {
    let _serial = SERIAL.read().await;
    bounded(20, async {
        let listen = any_port();
        let rest = "[[route]]\nprotocol = \"http\"\nredirect = \"https\"\n";
        let site =
            "[[site.api.location]]\npath = \"/\"\nrespond = { status = 200, body = \"tls\" }\n";
        let p = Portico::start(&config(listen, site, rest)).await;
        let listen = p.addr();
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.write_all(b"GET /a?b=1 HTTP/1.1\r\nHost: api.test:8080\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let (head, body) = loop {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("no redirect response within 5s")
                .unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break (head.to_string(), body.to_string());
                }
            }
        };
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 308 Permanent Redirect"));
        let location: Vec<&str> = lines
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(location, ["https://api.test/a?b=1"], "{head}");
        assert_eq!(body, "moved to https://api.test/a?b=1\n");
        let redirects = p
            .metric("portico_connections_total", &[("action", "redirect")])
            .await;
        assert_eq!(redirects, 1.0);
    })
    .await;
}

// ---------------------------------------------------------------- 9. pooling and h2c

/// How many origin-side connections these requests came over.
fn distinct_conns(seen: &[Seen]) -> usize {
    let mut conns: Vec<u64> = seen.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    conns.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_h2c_works() {
    let _serial = SERIAL.read().await;
    bounded(40, async {
        let pooled = Origin::tcp(OriginProto::Http1).await;
        let h2c = Origin::tcp(OriginProto::H2c).await;
        let listen = any_port();
        let site = "[[site.api.location]]\npath = \"/ka/\"\nupstream = \"pooled\"\n\n\
                    [[site.api.location]]\npath = \"/h2c/\"\nupstream = \"h2\"\n";
        let rest = format!(
            "[upstream.pooled]\nurl = \"{}\"\nkeepalive = 4\n\n\
             [upstream.h2]\nurl = \"{}\"\nprotocol = \"h2c\"\n",
            pooled.url, h2c.url
        );
        let p = Portico::start(&config(listen, site, &rest)).await;
        let listen = p.addr();

        let mut c = Client::connect(listen, Proto::H1).await;
        for i in 0..20 {
            // Every third is a HEAD: its response ends with the head, so
            // the connection goes back to the pool without a body read.
            let method = if i % 3 == 2 {
                Method::HEAD
            } else {
                Method::GET
            };
            let req = c
                .req(method.clone(), &format!("/ka/{i}"))
                .body(empty())
                .unwrap();
            let resp = c.send(req).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let body = body_text(resp).await;
            assert_eq!(method == Method::HEAD, body.is_empty(), "{method} /ka/{i}");
        }
        let seen = pooled.seen();
        assert_eq!(seen.len(), 20);
        let conns = distinct_conns(&seen);
        eprintln!("[keepalive] 20 sequential requests used {conns} upstream connection(s)");
        assert!(
            conns < 20,
            "every request opened its own upstream connection"
        );
        assert!(
            conns <= 2,
            "20 sequential requests used {conns} upstream connections"
        );
        // An idle upstream connection is closed after 4 s (the pool's idle
        // timeout), not kept for ever; none is closed much earlier.
        let pooled_open = || p.metric("portico_upstream_connections", &[("upstream", "pooled")]);
        let idle_since = Instant::now();
        assert!(pooled_open().await >= 1.0, "the idle connection is counted");
        while pooled_open().await > 0.0 {
            assert!(
                idle_since.elapsed() < Duration::from_secs(10),
                "an idle upstream connection stayed open for 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let idle_for = idle_since.elapsed();
        eprintln!("[keepalive] idle upstream connection closed after {idle_for:?}");
        assert!(
            idle_for >= Duration::from_millis(3500),
            "idle upstream connection closed after {idle_for:?}, before the 4 s timeout"
        );

        for proto in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(listen, proto).await;
            for i in 0..5 {
                let path = format!("/h2c/{}/{i}", proto.name());
                let req = c
                    .req(Method::POST, &path)
                    .body(full(format!("body {i}")))
                    .unwrap();
                let resp = c.send(req).await;
                assert_eq!(resp.status(), StatusCode::OK, "{path}");
                let _ = body_text(resp).await;
            }
        }
        let seen = h2c.seen();
        assert_eq!(seen.len(), 10);
        for s in &seen {
            assert_eq!(s.version, Version::HTTP_2, "{}", s.target);
            assert_eq!(s.authority.as_deref(), Some("api.test"), "{}", s.target);
            assert_eq!(s.header("x-forwarded-host"), Some("api.test"));
            assert_eq!(s.header("x-real-ip"), Some("127.0.0.1"));
            let i = s.target.rsplit('/').next().unwrap();
            assert_eq!(s.body, format!("body {i}").as_bytes());
        }
        eprintln!(
            "[h2c] 10 requests used {} upstream connection(s)",
            distinct_conns(&seen)
        );
    })
    .await;
}

// ---------------------------------------------------------------- 10. Unix socket upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_upstream() {
    let _serial = SERIAL.read().await;
    bounded(20, async {
        let dir = TempDir::new();
        let origin = Origin::unix(&dir.path().join("o.sock")).await;
        let listen = any_port();
        let p = Portico::start(&proxy_config(listen, &origin.url)).await;
        let listen = *p.listening().last().expect("portico logged its listener");
        for proto in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(listen, proto).await;
            let path = format!("/unix/{}", proto.name());
            let resp = c.get(&path).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(body_text(resp).await.contains("x-real-ip: 127.0.0.1\n"));
            let s = origin.only(&path);
            assert_eq!(s.peer, "unix");
            assert_eq!(s.header("host"), Some("api.test"));
        }
    })
    .await;
}

// ---------------------------------------------------------------- 11. PEM certificates

struct Generated {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn generate(name: &str, alg: &'static rcgen::SignatureAlgorithm) -> Generated {
    let key = rcgen::KeyPair::generate_for(alg).expect("generate key");
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    Generated {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_pem_files() {
    let _serial = SERIAL.read().await;
    bounded(40, async {
        let dir = TempDir::new();
        let ec = generate("ec.test", &rcgen::PKCS_ECDSA_P256_SHA256);
        let rsa = generate("rsa.test", &rcgen::PKCS_RSA_SHA256);
        let d = dir.path();
        for (name, g) in [("ec", &ec), ("rsa", &rsa)] {
            std::fs::write(d.join(format!("{name}.crt")), &g.cert_pem).unwrap();
            std::fs::write(d.join(format!("{name}.key")), &g.key_pem).unwrap();
        }
        let listen = any_port();
        let mut cfg = format!("[[listen]]\naddr = \"{listen}\"\n");
        for name in ["ec", "rsa"] {
            cfg.push_str(&format!(
                "\n[[route]]\nsni = [\"{name}.test\"]\nterminate = \"{name}\"\n"
            ));
        }
        for name in ["ec", "rsa"] {
            cfg.push_str(&format!(
                "\n[site.{name}]\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n\n\
                 [[site.{name}.location]]\npath = \"/\"\nrespond = {{ status = 200, body = \"{name}\" }}\n",
                dir = d.display()
            ));
        }
        let p = Portico::start(&cfg).await;
        let listen = p.addr();
        for (name, g) in [("ec", &ec), ("rsa", &rsa)] {
            for version in BOTH_VERSIONS {
                let sni = format!("{name}.test");
                let tls = tls_connect(listen, client_tls(&[b"http/1.1"], &[version]), &sni, b"").await;
                let chain = tls.get_ref().1.peer_certificates().expect("no certificate");
                assert_eq!(chain.len(), 1);
                assert_eq!(chain[0], g.der, "{name} over {version:?}: not the file's certificate");
                let mut c = Client::over(tls, Proto::H1, &sni).await;
                let resp = c.get("/").await;
                assert_eq!(body_text(resp).await, name);
            }
        }

        // `portico check`: the good pair passes, a mismatched pair names the key path.
        let ok = common::portico_check(&p.config_path, &[]).await;
        assert_eq!(ok.code, Some(0), "{ok:?}");
        let bad = d.join("bad.toml");
        std::fs::write(
            &bad,
            format!(
                "[[listen]]\naddr = \"{listen}\"\n\n[[route]]\nsni = [\"api.test\"]\nterminate = \"api\"\n\n\
                 [site.api]\ncert = \"{dir}/ec.crt\"\nkey = \"{dir}/rsa.key\"\n\n\
                 [[site.api.location]]\npath = \"/\"\nrespond = {{ status = 200 }}\n",
                dir = d.display()
            ),
        )
        .unwrap();
        let out = common::portico_check(&bad, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("site.api.cert"), "{out:?}");
        assert!(out.stderr.contains("does not belong"), "{out:?}");
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out:?}");
    })
    .await;
}

// ---------------------------------------------------------------- 12. TLS resumption

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_over_1_2_and_1_3() {
    let _serial = SERIAL.read().await;
    bounded(20, async {
        let listen = any_port();
        let site = "[[site.api.location]]\npath = \"/\"\nrespond = { status = 200, body = \"fixed reply\" }\n";
        let p = Portico::start(&config(listen, site, "")).await;
        let listen = p.addr();
        for version in BOTH_VERSIONS {
            // One ClientConfig, so both connections share its session store.
            let cfg = client_tls(&[b"http/1.1"], &[version]);
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let mut tls = tls_connect(listen, cfg.clone(), "api.test", b"").await;
                let conn = tls.get_ref().1;
                assert_eq!(conn.protocol_version(), Some(version.version));
                kinds.push(conn.handshake_kind());
                // A request, so that the client reads the TLS 1.3 ticket.
                tls.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut raw = Vec::new();
                let mut buf = [0u8; 2048];
                while !raw.ends_with(b"fixed reply") {
                    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
                        Err(_) => panic!("no response within 5s"),
                    }
                }
                let text = String::from_utf8_lossy(&raw);
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                assert!(text.ends_with("fixed reply"), "{text}");
            }
            assert_eq!(
                kinds,
                [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)],
                "{:?}",
                version.version
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------- 13. embedded default

/// Kills the child on drop, printing its stderr when the test failed.
struct Child(std::process::Child, std::path::PathBuf);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- portico stderr ---\n{}--- end ---",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_without_arguments() {
    // The embedded default binds the fixed ports 127.0.0.1:8443 and :9100.
    let _serial = SERIAL.write().await;
    bounded(30, async {
        let dir = TempDir::new();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = common::portico_command() // no PORTICO_CONFIG, no arguments
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn portico");
        let mut child = Child(child, stderr_path.clone());
        let admin: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!("portico exited with {status}");
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(1), common::http_get(admin, "/readyz"))
                    .await
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not ready within 10s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let tls = tls_connect(
            addr,
            client_tls(&[b"http/1.1"], BOTH_VERSIONS),
            "localhost",
            b"",
        )
        .await;
        let mut c = Client::over(tls, Proto::H1, "localhost:8443").await;
        let resp = c.get("/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header_str(&resp, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(body_text(resp)
            .await
            .contains("<h1>portico is running</h1>"));
        let resp = c.get("/healthz").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "ok\n");
        let (status, _) = common::http_get(admin, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let err = std::fs::read_to_string(&stderr_path).unwrap();
        assert!(
            err.lines()
                .any(|l| l.trim() == "curl -k https://localhost:8443/"),
            "stderr: {err}"
        );
        let _ = child.0.kill();
    })
    .await;
}

// ------------------------------------------------- non_http and replays

/// A site with `non_http`: decrypted bytes that are not HTTP (VLESS, Trojan)
/// go to that backend after a PROXY v2 header; HTTP still reaches the site.
#[tokio::test]
async fn non_http_streams_go_to_their_backend() {
    let _guard = SERIAL.read().await;
    bounded(30, async {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let listen = any_port();
        let cfg = config(
            listen,
            "non_http = \"vless\"\n[[site.api.location]]\npath = \"/\"\nrespond = { status = 200, body = \"http-here\" }\n",
            &format!("[backend.vless]\naddr = \"{backend_addr}\"\nproxy_protocol = \"v2\"\n"),
        );
        let portico = Portico::start(&cfg).await;
        let listen = portico.addr();

        // Not HTTP: a binary first byte, like VLESS's version byte.
        let mut tls = tls_connect(listen, client_tls(&[b"h2", b"http/1.1"], BOTH_VERSIONS), "api.test", b"").await;
        let client_local = tls.get_ref().0.local_addr().unwrap();
        let payload = b"\x00\x01\x02vless-request-bytes";
        tls.write_all(payload).await.unwrap();
        let (mut up, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
            .await
            .expect("non_http backend got no connection")
            .unwrap();
        let info = common::read_proxy_header(&mut up, common::Expect::V2)
            .await
            .expect("a PROXY v2 header")
            .expect("with addresses");
        assert_eq!(info.source, Some(client_local), "PROXY source is the TLS client");
        assert_eq!(info.authority.as_deref(), Some("api.test"), "PROXY v2 authority TLV");
        let mut got = vec![0u8; payload.len()];
        up.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, payload, "the backend gets the decrypted bytes, unchanged");
        up.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");

        // HTTP on the same site is served by the site.
        let mut c = Client::connect(listen, Proto::H1).await;
        let r = c.get("/").await;
        assert_eq!(r.status(), 200);
        assert_eq!(body_text(r).await, "http-here");
        drop(portico);
    })
    .await;
}

/// An origin that answers the first request on each connection, then reads
/// the next request and closes without answering: the race of a pooled
/// connection the upstream closed under us.
async fn one_answer_origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in [true, false] {
                    // Read one request head (and any small body that came with it).
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let line = head.lines().next().unwrap_or_default().to_string();
                    log.lock().unwrap().push(line);
                    buf.drain(..head_end);
                    if answered {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                            .await;
                    }
                }
                // Second request read, never answered: close.
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_closed_pooled_connection_is_retried_only_for_safe_requests() {
    let _guard = SERIAL.read().await;
    bounded(30, async {
        let (origin, seen) = one_answer_origin().await;
        let listen = any_port();
        let portico = Portico::start(&proxy_config(listen, &format!("http://{origin}"))).await;
        let listen = *portico
            .listening()
            .last()
            .expect("portico logged its listener");
        let mut c = Client::connect(listen, Proto::H1).await;

        // GET, GET: the second goes out on the pooled connection, which the
        // origin closes after reading it; portico replays it on a new one.
        let r = c.get("/a").await;
        assert_eq!(r.status(), 200);
        assert_eq!(body_text(r).await, "first");
        let r = c.get("/b").await;
        assert_eq!(r.status(), 200, "a safe request is replayed once");
        assert_eq!(body_text(r).await, "first");
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /b HTTP/1.1"],
            "the GET was sent twice: once on the stale connection, once on a fresh one"
        );

        // A POST with a body is not replayed: the client gets 502.
        seen.lock().unwrap().clear();
        let r = c.get("/c").await; // fresh connection answered: pool it
        assert_eq!(r.status(), 200);
        let _ = body_text(r).await;
        let req = c
            .req(Method::POST, "/d")
            .header(header::CONTENT_LENGTH, "4")
            .body(full("data"))
            .unwrap();
        let r = c.send(req).await;
        assert_eq!(r.status(), 502, "an unsafe request is not replayed");
        let posts = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("POST"))
            .count();
        assert_eq!(posts, 1, "the POST reached the origin exactly once");
        drop(portico);
    })
    .await;
}

/// A response that outlives `timeouts.request_header` is not cut: the head
/// deadline only runs while portico waits for a request, not while it answers.
#[tokio::test]
async fn long_sse_outlives_the_request_header_timeout() {
    let _guard = SERIAL.read().await;
    bounded(30, async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    for i in 0..6 {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        let ev = format!("data: {i}\n\n");
                        let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
                        if s.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        let listen = any_port();
        let cfg = proxy_config(listen, &format!("http://{origin}"))
            + "\n[timeouts]\nrequest_header = \"1s\"\n";
        let portico = Portico::start(&cfg).await;
        let listen = portico.addr();
        for proto in [Proto::H1, Proto::H2] {
            let mut c = Client::connect(listen, proto).await;
            let started = Instant::now();
            let r = c.get("/events").await;
            assert_eq!(r.status(), 200);
            let body = body_text(r).await;
            let elapsed = started.elapsed();
            assert_eq!(
                body.matches("data: ").count(),
                6,
                "{proto:?}: the 2.4 s stream was cut: {body:?}"
            );
            assert!(elapsed >= Duration::from_millis(2300), "{proto:?}: {elapsed:?}");
        }
        drop(portico);
    })
    .await;
}
