//! WebSocket through portico (issue 4), end to end on loopback sockets: the
//! real binary between tokio-tungstenite clients (HTTP/1.1 Upgrade over
//! rustls, and RFC 8441 extended CONNECT over an `h2` client) and upstreams
//! that are a tokio-tungstenite echo server, a raw server that refuses the
//! upgrade with `200 OK`, and a raw server that accepts it and then resets
//! the TCP connection.
//!
//! Timing-sensitive tests (the idle timeout, 1000 concurrent sockets) take
//! [`SERIAL`] for writing so that nothing else in this binary competes with
//! them for the two cores; the others share it.

mod common;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Barrier, RwLock, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use common::{
    api_config, bounded, checksum, insecure_connector, pseudo_random, raise_nofile_limit, Portico,
};

/// Write: this test runs alone in this binary. Read: shares with the others.
static SERIAL: RwLock<()> = RwLock::const_new(());

/// Bound on any single step that should be immediate on loopback.
const STEP: Duration = Duration::from_secs(10);

/// The metrics labels of the WebSocket location.
const SITE: (&str, &str) = ("site", "api");
const LOC: (&str, &str) = ("location", "responses");
const C2U: (&str, &str) = ("direction", "client_to_upstream");
const U2C: (&str, &str) = ("direction", "upstream_to_client");
const KIND_WS: (&str, &str) = ("kind", "websocket");

const WS_MESSAGES: &str = "portico_websocket_messages_total";
const STREAMS_ACTIVE: &str = "portico_http_streams_active";

/// No frame or message limit below the 16 MiB test message.
fn big_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(64 << 20))
        .max_message_size(Some(64 << 20))
}

/// Small buffers, for a thousand sockets at once.
fn small_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

// ---------------------------------------------------------------- upstream: echo

/// The upgrade request as the upstream received it.
#[derive(Debug, Clone)]
struct Handshake {
    method: Method,
    target: String,
    headers: HeaderMap,
}

impl Handshake {
    fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }
}

/// Header `name` as text, if present and visible ASCII.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What happened on one upstream WebSocket.
#[derive(Debug)]
enum UpEvent {
    Upgraded(Handshake),
    /// A Close frame arrived: `(code, reason)`, `None` for an empty one.
    CloseReceived(Option<(u16, String)>),
    /// The socket is done; `Some` when it ended with an error.
    Ended(Option<String>),
}

/// A tokio-tungstenite server that echoes text and binary messages, answers
/// pings (tungstenite does), selects the first offered subprotocol, and
/// on the text message `close-me` sends Close 4001 "bye".
struct WsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    events: mpsc::UnboundedReceiver<UpEvent>,
    task: JoinHandle<()>,
}

/// A loopback listener that counts the connections it accepts and hands
/// each to a task of its own: its address, the count, the accept task.
async fn serve<F, Fut>(what: &str, conn: F) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind {what}: {e:?}"));
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(tcp));
        }
    });
    (addr, accepted, task)
}

impl WsUpstream {
    async fn start(config: WebSocketConfig) -> WsUpstream {
        let (tx, events) = mpsc::unbounded_channel();
        let (addr, accepted, task) =
            serve("echo", move |tcp| ws_echo(tcp, config, tx.clone())).await;
        WsUpstream {
            addr,
            accepted,
            events,
            task,
        }
    }

    async fn next_event(&mut self) -> UpEvent {
        match tokio::time::timeout(STEP, self.events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("echo upstream gone"),
            Err(_) => panic!("echo upstream: no event within {STEP:?}"),
        }
    }

    async fn handshake(&mut self) -> Handshake {
        match self.next_event().await {
            UpEvent::Upgraded(h) => h,
            other => panic!("expected the upstream handshake, got {other:?}"),
        }
    }

    /// Events until the socket ended: the Close frames it received, then
    /// how it ended.
    async fn until_ended(&mut self) -> (Vec<Option<(u16, String)>>, Option<String>) {
        let mut closes = Vec::new();
        loop {
            match self.next_event().await {
                UpEvent::CloseReceived(c) => closes.push(c),
                UpEvent::Ended(e) => return (closes, e),
                UpEvent::Upgraded(h) => panic!("unexpected second upgrade: {h:?}"),
            }
        }
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The handshake callback: reports the request and selects the first
/// offered subprotocol.
struct Record(mpsc::UnboundedSender<UpEvent>);

impl Callback for Record {
    fn on_request(
        self,
        req: &WsRequest,
        mut resp: WsResponse,
    ) -> Result<WsResponse, ErrorResponse> {
        let _ = self.0.send(UpEvent::Upgraded(Handshake {
            method: req.method().clone(),
            target: req.uri().to_string(),
            headers: req.headers().clone(),
        }));
        let first = header_str(req.headers(), "sec-websocket-protocol")
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string());
        if let Some(p) = first {
            resp.headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        Ok(resp)
    }
}

async fn ws_echo(tcp: TcpStream, config: WebSocketConfig, tx: mpsc::UnboundedSender<UpEvent>) {
    let _ = tcp.set_nodelay(true);
    let callback = Record(tx.clone());
    let mut ws =
        match tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await {
            Ok(ws) => ws,
            Err(e) => {
                let _ = tx.send(UpEvent::Ended(Some(format!("handshake: {e}"))));
                return;
            }
        };
    let mut error = None;
    while let Some(msg) = ws.next().await {
        let sent = match msg {
            Ok(Message::Text(t)) if t.as_str() == "close-me" => {
                ws.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::from(4001),
                    reason: "bye".into(),
                })))
                .await
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => ws.send(m).await,
            Ok(Message::Close(f)) => {
                let _ = tx.send(UpEvent::CloseReceived(
                    f.map(|f| (u16::from(f.code), f.reason.to_string())),
                ));
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            error = Some(e.to_string());
            break;
        }
    }
    let _ = tx.send(UpEvent::Ended(error));
}

// ---------------------------------------------------------------- upstream: raw

#[derive(Debug, Clone, Copy)]
enum RawKind {
    /// Answer any request with `200 OK` (`403 Forbidden` for
    /// `/refused-403`) and the body `no ws here`.
    Refuse,
    /// Complete the upgrade, wait for the first client bytes, then reset
    /// the TCP connection (SO_LINGER 0).
    ResetAfterUpgrade,
}

struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    async fn start(kind: RawKind) -> RawUpstream {
        let (addr, accepted, task) = serve("raw", move |tcp| raw_conn(tcp, kind)).await;
        RawUpstream {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read a request head (through the blank line).
async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The value of header `name` in a raw request head.
fn head_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

async fn raw_conn(mut tcp: TcpStream, kind: RawKind) {
    let _ = tcp.set_nodelay(true);
    let Some(head) = read_head(&mut tcp).await else {
        return;
    };
    match kind {
        RawKind::Refuse => {
            let status = if head.starts_with("GET /refused-403 ") {
                "403 Forbidden"
            } else {
                "200 OK"
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\
                 connection: close\r\n\r\nno ws here"
            );
            let _ = tcp.write_all(resp.as_bytes()).await;
            let _ = tcp.shutdown().await;
            // Let the proxy read to the end before the socket goes away.
            let mut sink = [0u8; 256];
            let _ = tokio::time::timeout(STEP, tcp.read(&mut sink)).await;
        }
        RawKind::ResetAfterUpgrade => {
            let key = head_value(&head, "sec-websocket-key").unwrap_or_default();
            let protocol = head_value(&head, "sec-websocket-protocol")
                .and_then(|v| v.split(',').next().map(|p| p.trim().to_string()))
                .map(|p| format!("sec-websocket-protocol: {p}\r\n"))
                .unwrap_or_default();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-accept: {}\r\n{protocol}\r\n",
                derive_accept_key(key.as_bytes())
            );
            if tcp.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            let _ = tokio::time::timeout(STEP, tcp.read(&mut buf)).await;
            socket2::SockRef::from(&tcp)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER 0");
            drop(tcp);
        }
    }
}

// ---------------------------------------------------------------- portico

/// portico with one site `api` and five locations:
/// `/v1/responses` (name `responses`) and `/nows` (`websocket = false`) to
/// the echo upstream, `/refused`, `/refused-403` and `/reset` to the raw ones.
struct Env {
    portico: Portico,
    addr: SocketAddr,
    echo: WsUpstream,
    refuser: RawUpstream,
    resetter: RawUpstream,
}

impl Env {
    async fn start(extra: &str, echo_config: WebSocketConfig) -> Env {
        let echo = WsUpstream::start(echo_config).await;
        let refuser = RawUpstream::start(RawKind::Refuse).await;
        let resetter = RawUpstream::start(RawKind::ResetAfterUpgrade).await;
        let locations = format!(
            r#"
[[site.api.location]]
name = "responses"
path = "/v1/responses"
match = "exact"
upstream = "echo"

[[site.api.location]]
name = "nows"
path = "/nows"
match = "exact"
upstream = "echo"
websocket = false

[[site.api.location]]
name = "refused"
path = "/refused"
match = "exact"
upstream = "refuser"

[[site.api.location]]
name = "refused-403"
path = "/refused-403"
match = "exact"
upstream = "refuser"
# Pass the upstream's refusal through (the default "auto" makes a 4xx a 426).
websocket = true

[[site.api.location]]
name = "reset"
path = "/reset"
match = "exact"
upstream = "resetter"

[upstream.echo]
url = "http://{}"

[upstream.refuser]
url = "http://{}"

[upstream.resetter]
url = "http://{}"

{extra}
"#,
            echo.addr, refuser.addr, resetter.addr
        );
        // Port 0: portico binds a free port and logs it (no race for a port).
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let portico = Portico::start(&api_config(any, "", &locations)).await;
        let addr = *portico
            .listening()
            .last()
            .expect("portico logged its listener");
        Env {
            portico,
            addr,
            echo,
            refuser,
            resetter,
        }
    }

    /// Poll a metric until it equals `want` (up to `within`); returns the last value.
    async fn metric_eventually(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        within: Duration,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.portico.metric(name, labels).await;
            if v == want || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The WebSocket stream gauge of `responses`, polled as [`Self::metric_eventually`].
    async fn ws_streams(&self, want: f64, within: Duration) -> f64 {
        self.metric_eventually(STREAMS_ACTIVE, &[SITE, LOC, KIND_WS], want, within)
            .await
    }

    /// The messages counted on `responses` (client to upstream, upstream
    /// to client), each polled as [`Self::metric_eventually`].
    async fn messages_each_way(&self, want: f64, within: Duration) -> (f64, f64) {
        let c2u = self
            .metric_eventually(WS_MESSAGES, &[SITE, LOC, C2U], want, within)
            .await;
        let u2c = self
            .metric_eventually(WS_MESSAGES, &[SITE, LOC, U2C], want, within)
            .await;
        (c2u, u2c)
    }

    /// `portico_http_requests_total` for one location, status and protocol.
    async fn requests(&self, location: &str, status: &str, protocol: &str) -> f64 {
        let labels = [
            SITE,
            ("location", location),
            ("status", status),
            ("protocol", protocol),
        ];
        self.portico
            .metric("portico_http_requests_total", &labels)
            .await
    }
}

// ---------------------------------------------------------------- clients

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn try_tls(addr: SocketAddr, connector: TlsConnector) -> io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("api.test").expect("server name");
    connector.connect(name, tcp).await
}

/// TLS to portico for `api.test`, ALPN `alpn` (which must be negotiated).
async fn tls(addr: SocketAddr, alpn: &[u8]) -> Tls {
    let tls = tokio::time::timeout(STEP, try_tls(addr, insecure_connector(&[alpn])))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    tls
}

type WsH1 = WebSocketStream<Tls>;

/// A WebSocket over HTTP/1.1 to `wss://api.test{path}`, offering the
/// subprotocols `chat.v1, chat.v0`; also returns the 101's headers.
async fn ws_h1(addr: SocketAddr, path: &str, config: WebSocketConfig) -> (WsH1, HeaderMap) {
    let stream = tls(addr, b"http/1.1").await;
    let mut req = format!("wss://api.test{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v1, chat.v0".parse().unwrap(),
    );
    let (ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake failed");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    (ws, resp.headers().clone())
}

/// The next message, panicking on timeout, error or end.
async fn next_msg<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Message {
    match tokio::time::timeout(STEP, ws.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => panic!("WebSocket failed: {e}"),
        Ok(None) => panic!("WebSocket ended"),
        Err(_) => panic!("no WebSocket message within {STEP:?}"),
    }
}

/// Send `msg` and expect the same message back.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, msg: Message) {
    tokio::time::timeout(STEP, ws.send(msg.clone()))
        .await
        .expect("send timed out")
        .expect("send failed");
    assert_eq!(next_msg(ws).await, msg);
}

/// Send a Ping with `payload` and expect the Pong with the same payload.
async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, payload: Bytes) {
    ws.send(Message::Ping(payload.clone())).await.expect("ping");
    assert_eq!(next_msg(ws).await, Message::Pong(payload));
}

/// One frame of a fragmented message: `data` as `opcode`, final if `fin`.
fn fragment(data: &'static [u8], opcode: OpCode, fin: bool) -> Message {
    Message::Frame(Frame::message(Bytes::from_static(data), opcode, fin))
}

/// After a Close was exchanged: the stream must end cleanly.
async fn expect_end<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    match tokio::time::timeout(STEP, ws.next()).await {
        Ok(None) => {}
        Ok(Some(other)) => panic!("expected the end of the WebSocket, got {other:?}"),
        Err(_) => panic!("WebSocket still open {STEP:?} after the close handshake"),
    }
}

fn close_frame(code: u16, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

/// `(code, reason)` of a received Close message.
fn close_of(m: &Message) -> Option<(u16, String)> {
    match m {
        Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

/// Client-initiated close (1000 "done"): the client gets the echo of its
/// Close, then the end; the upstream received exactly that Close. The
/// WebSocket is left open on the client's side (see [`hang_up`]).
async fn close_from_client<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    echo: &mut WsUpstream,
) {
    tokio::time::timeout(STEP, ws.close(close_frame(1000, "done")))
        .await
        .expect("close timed out")
        .expect("close failed");
    close_completes(ws, echo, 1000, "done").await;
}

/// Upstream-initiated close (4001 "bye" after `close-me`): the client sees
/// it, answers, and the upstream receives the answer.
async fn close_from_upstream<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    echo: &mut WsUpstream,
) {
    ws.send(Message::text("close-me")).await.expect("send");
    close_completes(ws, echo, 4001, "bye").await;
}

/// The rest of a close handshake with Close `code` `reason`: the client
/// receives it, then the end; the upstream received exactly that Close
/// and ended cleanly.
async fn close_completes<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    echo: &mut WsUpstream,
    code: u16,
    reason: &str,
) {
    assert_eq!(close_of(&next_msg(ws).await), Some((code, reason.into())));
    expect_end(ws).await;
    let (closes, err) = echo.until_ended().await;
    assert_eq!(closes, vec![Some((code, reason.to_string()))]);
    assert_eq!(err, None, "upstream ended with an error");
}

/// What a well-behaved client does once the server side ended: close its
/// own side (TLS close_notify + FIN, or h2 END_STREAM) and let go.
async fn hang_up<S: AsyncWrite + Unpin>(ws: WebSocketStream<S>) {
    let mut io = ws.into_inner();
    let _ = tokio::time::timeout(STEP, io.shutdown()).await;
}

/// A plain HTTP/1.1 upgrade request through hyper: (status, headers, body).
async fn h1_upgrade_request(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    let io = TokioIo::new(tls(addr, b"http/1.1").await);
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .expect("h1 handshake");
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "api.test")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(STEP, send.send_request(req))
        .await
        .expect("no response head")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("body timed out")
        .expect("body failed")
        .to_bytes();
    conn.abort();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

// ---------------------------------------------------------------- h2

/// An h2 client connection to portico (ALPN h2) whose SETTINGS arrived.
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    conn: JoinHandle<Result<(), h2::Error>>,
}

impl H2 {
    async fn connect(addr: SocketAddr) -> H2 {
        let io = tls(addr, b"h2").await;
        let (send, conn) = h2::client::Builder::new()
            .handshake::<_, Bytes>(io)
            .await
            .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        // The flag comes with the server's SETTINGS, read by the connection task.
        let started = Instant::now();
        while !send.is_extended_connect_protocol_enabled() {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "SETTINGS_ENABLE_CONNECT_PROTOCOL not received within 2s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        H2 { send, conn }
    }

    /// An extended CONNECT (`:protocol websocket`) for `path`.
    async fn connect_ws(
        &mut self,
        path: &str,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), h2::Error> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://api.test{path}"))
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat.v1")
            .extension(h2::ext::Protocol::from_static("websocket"))
            .body(())
            .unwrap();
        let mut send = tokio::time::timeout(STEP, self.send.clone().ready())
            .await
            .expect("h2 connection not ready in time")?;
        let (resp, stream) = send.send_request(req, false)?;
        let resp = tokio::time::timeout(STEP, resp)
            .await
            .expect("no response to the extended CONNECT")?;
        Ok((resp, stream))
    }

    /// An extended CONNECT that must succeed with 200; the WebSocket over it.
    async fn ws(
        &mut self,
        path: &str,
        config: WebSocketConfig,
    ) -> (WebSocketStream<H2Io>, HeaderMap) {
        let (resp, send) = self.connect_ws(path).await.expect("extended CONNECT");
        assert_eq!(resp.status(), StatusCode::OK, "extended CONNECT status");
        let headers = resp.headers().clone();
        let io = H2Io::new(send, resp.into_body());
        (
            WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await,
            headers,
        )
    }

    /// An extended CONNECT that must be answered with `status` (no tunnel):
    /// the whole body, and the request's stream, left open.
    async fn refused(&mut self, path: &str, status: StatusCode) -> (String, h2::SendStream<Bytes>) {
        let (resp, send) = self
            .connect_ws(path)
            .await
            .expect("extended CONNECT answered");
        assert_eq!(resp.status(), status, "extended CONNECT status");
        (h2_body(resp.into_body()).await, send)
    }
}

impl Drop for H2 {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The whole body of an h2 response.
async fn h2_body(mut recv: h2::RecvStream) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, recv.data())
        .await
        .expect("h2 body timed out")
    {
        let chunk = chunk.expect("h2 body failed");
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error body of exactly one line, ending in a newline.
fn assert_one_line(body: &str) {
    assert!(
        body.ends_with('\n') && body.matches('\n').count() == 1,
        "{body:?}"
    );
}

/// AsyncRead + AsyncWrite over one h2 stream: DATA frames both ways,
/// releasing receive capacity as bytes are read.
struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    pending: Bytes,
    shut: bool,
}

impl H2Io {
    fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> H2Io {
        H2Io {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io_error(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(n))) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io_error(e))),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------- fd limit

/// The soft RLIMIT_NOFILE of process `pid`, from `/proc/PID/limits`.
fn child_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

// ================================================================ tests

// ---------------------------------------------------------------- 1. h1 relay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_websocket_relays_messages_pings_and_closes_both_ways() {
    let _serial = SERIAL.read().await;
    bounded(40, async {
        let mut env = Env::start("", big_config()).await;
        let (mut ws, resp_headers) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        // The upstream's choice of subprotocol reaches the client.
        assert_eq!(
            header_str(&resp_headers, "sec-websocket-protocol"),
            Some("chat.v1")
        );

        let hs = env.echo.handshake().await;
        assert_eq!(hs.method, Method::GET);
        assert_eq!(hs.target, "/v1/responses");
        assert_eq!(hs.header("host"), Some("api.test"));
        assert_eq!(hs.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(hs.header("x-real-ip"), Some("127.0.0.1"));
        assert_eq!(hs.header("x-forwarded-proto"), Some("https"));
        assert_eq!(
            hs.header("sec-websocket-protocol"),
            Some("chat.v1, chat.v0")
        );
        assert_eq!(hs.header("sec-websocket-version"), Some("13"));
        assert!(
            hs.header("upgrade")
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
            "{hs:?}"
        );
        assert!(
            hs.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
            "{hs:?}"
        );
        assert!(hs.header("sec-websocket-key").is_some(), "{hs:?}");

        echo(&mut ws, Message::text("hello, upstream")).await;
        echo(&mut ws, Message::binary(vec![0u8, 1, 2, 0x7f, 0x80, 0xff])).await;
        echo(&mut ws, Message::text("")).await;

        // 16 MiB in one binary message, byte for byte.
        let big = pseudo_random(16 << 20, 0x5eed_0004);
        let started = Instant::now();
        ws.send(Message::binary(big.clone()))
            .await
            .expect("send 16 MiB");
        match next_msg(&mut ws).await {
            Message::Binary(got) => {
                assert_eq!(got.len(), big.len(), "16 MiB echo length");
                assert!(
                    got[..] == big[..],
                    "16 MiB echo differs: checksum {:x} != {:x}",
                    checksum(&got),
                    checksum(&big)
                );
            }
            other => panic!("expected the 16 MiB binary echo, got {:?}", other.len()),
        }
        eprintln!("16 MiB echo took {:?}", started.elapsed());

        // A message the client fragments into three frames comes back whole.
        for (data, opcode, fin) in [
            (&b"frag"[..], OpCode::Data(Data::Text), false),
            (b"men", OpCode::Data(Data::Continue), false),
            (b"ted", OpCode::Data(Data::Continue), true),
        ] {
            ws.send(fragment(data, opcode, fin))
                .await
                .expect("send fragment");
        }
        assert_eq!(next_msg(&mut ws).await, Message::text("fragmented"));

        // Ping -> pong with the same payload.
        ping_pong(&mut ws, Bytes::from_static(b"are you there")).await;

        // Client closes 1000 "done": the upstream receives exactly that.
        close_from_client(&mut ws, &mut env.echo).await;
        hang_up(ws).await;

        // Upstream closes 4001 "bye": the client receives exactly that.
        let (mut ws, _) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        echo(&mut ws, Message::text("second")).await;
        close_from_upstream(&mut ws, &mut env.echo).await;
        hang_up(ws).await;
        assert_eq!(env.echo.accepted.load(Ordering::SeqCst), 2);
    })
    .await;
}

// ---------------------------------------------------------------- 2. refused / disabled

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_is_relayed_and_disabled_websocket_gets_426() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let env = Env::start("", big_config()).await;

        // The upstream answers the upgrade with 200 + body: relayed as is.
        let (status, headers, body) = h1_upgrade_request(env.addr, "/refused").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "no ws here");
        assert_eq!(header_str(&headers, "content-type"), Some("text/plain"));
        assert!(headers.get("upgrade").is_none(), "{headers:?}");
        assert_eq!(env.refuser.accepted.load(Ordering::SeqCst), 1);

        // The same through tungstenite: the handshake fails with that response.
        let stream = tls(env.addr, b"http/1.1").await;
        match tokio_tungstenite::client_async("wss://api.test/refused", stream).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::OK);
            }
            Err(e) => panic!("expected an HTTP error from the handshake, got {e}"),
            Ok(_) => panic!("a refused upgrade must not become a WebSocket"),
        }

        // With websocket = true a 403 refusal is relayed as is over h1 and
        // over h2 (tests/conformance.rs covers the default, "auto").
        let (status, _, body) = h1_upgrade_request(env.addr, "/refused-403").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "no ws here")
        );
        let mut h2 = H2::connect(env.addr).await;
        let (h2_text, _send) = h2.refused("/refused-403", StatusCode::FORBIDDEN).await;
        assert_eq!(h2_text, "no ws here");
        assert_eq!(env.refuser.accepted.load(Ordering::SeqCst), 4);

        // websocket = false: 426 with a one-line plain body, over h1 and h2,
        // and the upstream never sees a connection.
        let (status, headers, body) = h1_upgrade_request(env.addr, "/nows").await;
        assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
        // RFC 9110 section 15.5.22: a 426 names the protocol to switch to.
        assert_eq!(header_str(&headers, "upgrade"), Some("websocket"));
        assert_eq!(
            header_str(&headers, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_one_line(&body);
        assert!(body.contains("WebSocket"), "{body:?}");

        let (h2_text, _send) = h2.refused("/nows", StatusCode::UPGRADE_REQUIRED).await;
        assert_eq!(h2_text, body, "same one-line body over h2");

        // Absence check: the 426 is answered before any upstream connect,
        // so a connection would already be there; 200 ms more covers one
        // still in flight on a loaded machine.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            env.echo.accepted.load(Ordering::SeqCst),
            0,
            "the upstream of a websocket = false location got a connection"
        );
        for proto in ["http1", "h2"] {
            assert_eq!(
                env.requests("nows", "426", proto).await,
                1.0,
                "426 counted once over {proto}"
            );
        }
    })
    .await;
}

/// Over h2 a 2xx answer to an extended CONNECT means "tunnel open"
/// (RFC 8441 §5), so an upstream's `200 OK` refusal cannot be relayed as
/// is: it must become a 502 naming the cause. Today hyper drops the
/// response and resets the stream with INTERNAL_ERROR (a 2xx to CONNECT
/// with a body), while portico counts and logs a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_refused_upgrade_with_200_becomes_502() {
    let _serial = SERIAL.read().await;
    bounded(20, async {
        let env = Env::start("", big_config()).await;
        let mut h2 = H2::connect(env.addr).await;
        let (body, _send) = h2.refused("/refused", StatusCode::BAD_GATEWAY).await;
        assert_one_line(&body);
        assert_eq!(env.requests("refused", "502", "h2").await, 1.0);
    })
    .await;
}

// ---------------------------------------------------------------- 3. metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_counted_per_direction_and_the_stream_gauge_returns_to_zero() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let mut env = Env::start("", big_config()).await;
        const K: usize = 7;
        let (mut ws, _) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        assert_eq!(
            env.ws_streams(1.0, STEP).await,
            1.0,
            "one WebSocket stream open"
        );
        for i in 0..K {
            echo(&mut ws, Message::text(format!("message {i}"))).await;
            if i % 3 == 0 {
                ping_pong(&mut ws, Bytes::from_static(b"p")).await;
            }
        }
        // One fragmented message (3 frames, one with a ping between them)
        // is one message; its echo is one frame.
        ws.send(fragment(b"a", OpCode::Data(Data::Binary), false))
            .await
            .unwrap();
        ws.send(Message::Ping(Bytes::from_static(b"mid")))
            .await
            .unwrap();
        ws.send(fragment(b"b", OpCode::Data(Data::Continue), false))
            .await
            .unwrap();
        ws.send(fragment(b"c", OpCode::Data(Data::Continue), true))
            .await
            .unwrap();
        assert_eq!(
            next_msg(&mut ws).await,
            Message::Pong(Bytes::from_static(b"mid"))
        );
        assert_eq!(next_msg(&mut ws).await, Message::binary(b"abc".to_vec()));
        close_from_client(&mut ws, &mut env.echo).await;
        hang_up(ws).await;

        let want = (K + 1) as f64;
        let (c2u, u2c) = env.messages_each_way(want, Duration::from_secs(2)).await;
        assert_eq!(
            (c2u, u2c),
            (want, want),
            "messages client->upstream, upstream->client"
        );
        assert_eq!(
            env.ws_streams(0.0, Duration::from_secs(2)).await,
            0.0,
            "the WebSocket stream gauge did not return to 0 within 2s of the close"
        );
        let text = env.portico.metrics_text().await;
        assert_eq!(
            common::metric_value(
                &text,
                "portico_http_stream_duration_seconds_count",
                &[SITE, LOC, KIND_WS]
            ),
            1.0,
            "one WebSocket stream duration recorded"
        );
        assert_eq!(
            common::metric_value(
                &text,
                "portico_http_requests_total",
                &[SITE, LOC, ("protocol", "http1")]
            ),
            1.0,
            "one upgrade request counted"
        );
    })
    .await;
}

/// An upgraded HTTP/1.1 connection is still a client connection: it counts
/// in `portico_connections_active` and holds its `limits.max_connections`
/// permit until the socket closes, although the HTTP connection that carried
/// the handshake has ended inside portico.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_keeps_its_connection_slot_until_it_closes() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let mut env = Env::start("[limits]\nmax_connections = 1", big_config()).await;
        let listener = env.addr.to_string();
        let active = [("listener", listener.as_str())];
        let refused = [
            ("listener", listener.as_str()),
            ("limit", "max_connections"),
        ];
        let (mut ws, _) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        // A round trip: the bridge runs, so the handshake's HTTP connection
        // inside portico has ended by now.
        echo(&mut ws, Message::text("still here")).await;
        assert_eq!(
            env.portico
                .metric("portico_connections_active", &active)
                .await,
            1.0,
            "an open WebSocket is an open connection"
        );
        // The one permit is the WebSocket's: a second client is refused.
        let mut second = common::connect(env.addr).await;
        common::expect_closed(&mut second, Duration::from_secs(2)).await;
        assert_eq!(
            env.metric_eventually(
                "portico_connections_refused_total",
                &refused,
                1.0,
                Duration::from_secs(2)
            )
            .await,
            1.0,
            "the second connection was not refused while the WebSocket held the only permit"
        );
        echo(&mut ws, Message::text("unharmed")).await;

        close_from_client(&mut ws, &mut env.echo).await;
        hang_up(ws).await;
        assert_eq!(
            env.metric_eventually(
                "portico_connections_active",
                &active,
                0.0,
                Duration::from_secs(2)
            )
            .await,
            0.0,
            "the connection gauge did not return to 0 within 2s of the close"
        );
        // The permit is back: a new WebSocket opens.
        let (mut again, _) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        echo(&mut again, Message::text("after")).await;
    })
    .await;
}

// ---------------------------------------------------------------- 3b. lingering client

/// After the close handshake the upstream closed its TCP connection and
/// portico passed that on (TLS close_notify, or END_STREAM over h2); a
/// client that then keeps its own side open must not pin the stream (a
/// task, two sockets, the gauge) until `timeouts.idle`, 1 h by default.
/// nginx ends both sides as soon as either one has closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_released_when_the_upstream_closed_and_the_client_lingers() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let mut env = Env::start("", big_config()).await;
        let (mut ws1, _) = ws_h1(env.addr, "/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        close_from_client(&mut ws1, &mut env.echo).await;
        let mut h2 = H2::connect(env.addr).await;
        let (mut ws2, _) = h2.ws("/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        close_from_upstream(&mut ws2, &mut env.echo).await;
        // Both clients keep their socket / stream open from here on.
        let open = env.ws_streams(0.0, Duration::from_secs(3)).await;
        assert_eq!(
            open, 0.0,
            "streams still held 3s after the upstream closed (h1 + h2 clients lingering)"
        );
        drop((ws1, ws2, h2));
    })
    .await;
}

// ---------------------------------------------------------------- 4. h2 extended CONNECT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_extended_connect_is_bridged_to_an_http1_upgrade() {
    let _serial = SERIAL.read().await;
    bounded(40, async {
        let mut env = Env::start("", big_config()).await;
        let mut h2 = H2::connect(env.addr).await;
        let (mut ws, headers) = h2.ws("/v1/responses", big_config()).await;
        // RFC 8441: no HTTP/1.1 handshake headers on the h2 side.
        for h in ["sec-websocket-accept", "upgrade", "connection"] {
            assert!(
                headers.get(h).is_none(),
                "{h} in the h2 response: {headers:?}"
            );
        }
        assert_eq!(
            header_str(&headers, "sec-websocket-protocol"),
            Some("chat.v1")
        );

        let hs = env.echo.handshake().await;
        assert_eq!(hs.method, Method::GET);
        assert_eq!(hs.target, "/v1/responses");
        assert_eq!(hs.header("host"), Some("api.test"));
        assert_eq!(hs.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(hs.header("sec-websocket-version"), Some("13"));
        assert_eq!(hs.header("sec-websocket-protocol"), Some("chat.v1"));
        let key = hs.header("sec-websocket-key").expect("portico adds a key");
        assert_eq!(
            base64_len(key),
            Some(16),
            "Sec-WebSocket-Key must be 16 bytes base64: {key:?}"
        );

        echo(&mut ws, Message::text("hello over h2")).await;
        echo(&mut ws, Message::binary(vec![9u8, 8, 7, 0, 255])).await;
        // Larger than both h2 windows (64 KiB client, 1 MiB portico).
        let big = pseudo_random(3 << 20, 0x5eed_0042);
        ws.send(Message::binary(big.clone()))
            .await
            .expect("send 3 MiB");
        match next_msg(&mut ws).await {
            Message::Binary(got) => assert!(
                got[..] == big[..],
                "3 MiB echo over h2 differs: {} bytes, checksum {:x} != {:x}",
                got.len(),
                checksum(&got),
                checksum(&big)
            ),
            other => panic!("expected the 3 MiB echo, got {:?}", other.len()),
        }
        ping_pong(&mut ws, Bytes::from_static(b"h2 ping")).await;
        close_from_client(&mut ws, &mut env.echo).await;
        hang_up(ws).await;

        // A second stream on the same connection; the upstream closes it.
        let (mut ws, _) = h2.ws("/v1/responses", big_config()).await;
        let _ = env.echo.handshake().await;
        echo(&mut ws, Message::text("second stream")).await;
        close_from_upstream(&mut ws, &mut env.echo).await;
        hang_up(ws).await;

        let p = &env.portico;
        assert_eq!(env.ws_streams(0.0, Duration::from_secs(2)).await, 0.0);
        // Text, binary, 3 MiB on the first stream; one text (+ close-me) on the second.
        assert_eq!(p.metric(WS_MESSAGES, &[SITE, LOC, C2U]).await, 5.0);
        assert_eq!(p.metric(WS_MESSAGES, &[SITE, LOC, U2C]).await, 4.0);
        assert_eq!(
            p.metric(
                "portico_http_requests_total",
                &[SITE, LOC, ("method", "CONNECT"), ("protocol", "h2")]
            )
            .await,
            2.0
        );
    })
    .await;
}

/// Decoded length of a standard base64 string, if it is one.
fn base64_len(s: &str) -> Option<usize> {
    let body = s.trim_end_matches('=');
    let valid = body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    (valid && s.len() % 4 == 0).then_some(body.len() * 3 / 4)
}

// ---------------------------------------------------------------- 5. upstream reset

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_upstream_reset_ends_the_client_side_quickly() {
    let _serial = SERIAL.read().await;
    bounded(30, async {
        let env = Env::start("", big_config()).await;

        // h1: within 1 s the client's WebSocket fails (no clean close: the
        // upstream never sent a Close frame).
        let (mut ws, _) = ws_h1(env.addr, "/reset", big_config()).await;
        fails_within_1s(&mut ws, "h1").await;

        // h2: within 1 s the WebSocket over the stream fails the same way.
        let mut h2 = H2::connect(env.addr).await;
        let (mut ws, _) = h2.ws("/reset", big_config()).await;
        fails_within_1s(&mut ws, "h2").await;
        let reset = tokio::time::timeout(
            Duration::from_secs(1),
            futures_util::future::poll_fn(|cx| ws.get_mut().send.poll_reset(cx)),
        )
        .await;
        eprintln!("h2: RST_STREAM after the end: {reset:?}");
        // hyper ends an upgraded h2 stream with END_STREAM and then resets
        // it (NO_ERROR today; RFC 9113 §8.5 would say CONNECT_ERROR).
        assert!(
            matches!(reset, Ok(Ok(_))),
            "h2: the stream was not reset: {reset:?}"
        );
        // The connection still carries new streams.
        assert!(
            !h2.conn.is_finished(),
            "the h2 connection died with the stream"
        );
        let (mut ws, _) = h2.ws("/v1/responses", big_config()).await;
        echo(&mut ws, Message::text("still works")).await;
        assert_eq!(env.resetter.accepted.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// Send `hello` towards the resetting upstream: within 1 s the WebSocket
/// must end with an error (`proto` names it in the messages).
async fn fails_within_1s<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    proto: &str,
) {
    let sent = Instant::now();
    ws.send(Message::text("hello")).await.expect("send");
    let outcome = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .unwrap_or_else(|_| panic!("{proto} WebSocket still open 1s after the upstream reset"));
    eprintln!(
        "{proto}: ended {:?} after the send: {outcome:?}",
        sent.elapsed()
    );
    assert!(
        matches!(outcome, Some(Err(_))),
        "{proto}: expected an abnormal end, got {outcome:?}"
    );
}

// ---------------------------------------------------------------- 6. idle

/// Echo one message, then stay silent: how long until the WebSocket ended
/// (its end, an error or a Close), which must be within 3 s.
async fn silent_until_closed<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    proto: &str,
) -> Duration {
    echo(ws, Message::text("once")).await;
    let quiet_since = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(3), ws.next())
        .await
        .unwrap_or_else(|_| panic!("silent {proto} WebSocket still open after 3s"));
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{end:?}"
    );
    quiet_since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_ends_silent_websockets_but_not_pinging_ones() {
    let _serial = SERIAL.write().await;
    bounded(30, async {
        let env = Env::start("[timeouts]\nidle = \"500ms\"\n", big_config()).await;
        let addr = env.addr;

        // Silent over h1.
        let silent_h1 = tokio::spawn(async move {
            let (mut ws, _) = ws_h1(addr, "/v1/responses", big_config()).await;
            silent_until_closed(&mut ws, "h1").await
        });
        // Silent over h2.
        let silent_h2 = tokio::spawn(async move {
            let mut h2 = H2::connect(addr).await;
            let (mut ws, _) = h2.ws("/v1/responses", big_config()).await;
            let elapsed = silent_until_closed(&mut ws, "h2").await;
            // Only the stream ended: the connection takes another.
            let (mut ws, _) = h2.ws("/v1/responses", big_config()).await;
            echo(&mut ws, Message::text("again")).await;
            elapsed
        });
        // Pinging every 150 ms for 1.5 s keeps it open.
        let pinging = tokio::spawn(async move {
            let (mut ws, _) = ws_h1(addr, "/v1/responses", big_config()).await;
            let started = Instant::now();
            let mut n = 0u32;
            while started.elapsed() < Duration::from_millis(1500) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                ping_pong(&mut ws, Bytes::from(format!("ping {n}"))).await;
                n += 1;
            }
            echo(&mut ws, Message::text("still open")).await;
            n
        });
        let h1_idle = silent_h1.await.expect("silent h1 task");
        let h2_idle = silent_h2.await.expect("silent h2 task");
        let pings = pinging.await.expect("pinging task");
        eprintln!("idle close after {h1_idle:?} (h1), {h2_idle:?} (h2); {pings} pings answered");
        for (proto, t) in [("h1", h1_idle), ("h2", h2_idle)] {
            assert!(
                t >= Duration::from_millis(400) && t <= Duration::from_secs(2),
                "silent {proto} WebSocket closed after {t:?}, expected 0.4-2 s"
            );
        }
        // Each ping was answered (checked above); the count only guards against a stalled loop.
        assert!(pings >= 5, "only {pings} pings in 1.5 s");
    })
    .await;
}

// ---------------------------------------------------------------- 7. 1000 at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_websockets() {
    const N: usize = 1000;
    const MESSAGES: usize = 10;
    let _serial = SERIAL.write().await;
    // Each socket costs 2 descriptors here (client, upstream side) and 2 in portico.
    let nofile = raise_nofile_limit(8192);
    assert!(
        nofile >= (2 * N + 256) as u64,
        "RLIMIT_NOFILE is {nofile}, too low for {N} WebSockets"
    );
    bounded(60, async {
        let env = Env::start("", small_config()).await;
        // portico inherits the limit; check that it got it.
        let child = child_nofile(env.portico.pid()).expect("portico's RLIMIT_NOFILE");
        assert!(
            child >= (2 * N + 256) as u64,
            "portico's RLIMIT_NOFILE is {child}, too low for {N} WebSockets"
        );
        let started = Instant::now();
        let cfg = insecure_connector(&[b"http/1.1"]);
        let connecting = Arc::new(Semaphore::new(64));
        let opened = Arc::new(Barrier::new(N + 1));
        let go = Arc::new(Barrier::new(N + 1));
        let mut tasks = Vec::with_capacity(N);
        for i in 0..N {
            let (cfg, connecting, opened, go) =
                (cfg.clone(), connecting.clone(), opened.clone(), go.clone());
            let addr = env.addr;
            tasks.push(tokio::spawn(async move {
                let ws = async {
                    let _permit = connecting.acquire().await.unwrap();
                    let tls = try_tls(addr, cfg).await.map_err(|e| format!("TLS: {e}"))?;
                    let (ws, _) = tokio_tungstenite::client_async_with_config(
                        "wss://api.test/v1/responses",
                        tls,
                        Some(small_config()),
                    )
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                    Ok::<_, String>(ws)
                }
                .await;
                // Every task reaches the barriers, failed or not.
                opened.wait().await;
                go.wait().await;
                let mut ws = ws?;
                for j in 0..MESSAGES {
                    let msg = Message::text(format!("socket {i} message {j}"));
                    ws.send(msg.clone())
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    match ws.next().await {
                        Some(Ok(m)) if m == msg => {}
                        other => return Err(format!("echo {j}: {other:?}")),
                    }
                }
                ws.close(None).await.map_err(|e| format!("close: {e}"))?;
                while let Some(m) = ws.next().await {
                    m.map_err(|e| format!("after close: {e}"))?;
                }
                Ok(())
            }));
        }
        opened.wait().await;
        let connected = started.elapsed();
        let open = env
            .portico
            .metric(STREAMS_ACTIVE, &[SITE, LOC, KIND_WS])
            .await;
        go.wait().await;
        let mut errors = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("socket {i}: {e}")),
                Err(e) => errors.push(format!("socket {i}: task {e}")),
            }
        }
        let done = started.elapsed();
        eprintln!(
            "{N} WebSockets: all open after {connected:?}, all done after {done:?}; \
             RLIMIT_NOFILE {nofile} (portico {child})"
        );
        assert!(
            errors.is_empty(),
            "{} of {N} failed, first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        assert_eq!(open, N as f64, "all {N} streams open at once");
        assert_eq!(env.echo.accepted.load(Ordering::SeqCst), N);
        let want = (N * MESSAGES) as f64;
        let (c2u, u2c) = env.messages_each_way(want, Duration::from_secs(5)).await;
        assert_eq!((c2u, u2c), (want, want));
        assert_eq!(env.ws_streams(0.0, Duration::from_secs(5)).await, 0.0);
    })
    .await;
}
