//! Metrics end to end (issue 5): the real `portico` binary, a known mix of
//! traffic, then exact values from `/metrics`, the exported histogram
//! buckets, HELP/TYPE lines, label cardinality, the Grafana dashboard's
//! metric names, and the JSON access log.
//!
//! The mix runs once per test binary (in its own thread and runtime, see
//! [`mix`]) against one instance:
//!
//! - a passthrough route `tunnel.test` to a raw TCP sink (no PROXY header),
//!   `pp.tunnel.test` to a sink that expects PROXY v2, `dead.tunnel.test`
//!   to a port nobody listens on;
//! - a terminated site `api` (self-signed) with `/plain`, `/sse` (named
//!   `events`), `/v1/responses` (WebSocket), `/fixed` (respond), `/hang`
//!   (clients abort it), `/reset` (the origin cuts it), `/slow` (clients give
//!   up before its head) and `/dead` (an upstream that refuses);
//! - a second listener with `accept_proxy = true` that trusts only 10/8;
//! - `timeouts.client_hello = "300ms"`, `log.format = "json"`.
//!
//! A second instance (`tunnel.splice = false`, `limits.max_connections = 1`)
//! counts a copied tunnel and produces `portico_connections_refused_total`.
//! The tests then only read the recorded scrapes and logs, so one failing
//! check does not hide the others.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use common::{
    any_port, any_port_v6, api_config, bounded, empty, free_addr, full, insecure_client_config,
    insecure_connector, metric_value, pseudo_random, BoxError, DeadPort, Expect, Portico, TestBody,
};

// ---------------------------------------------------------------- the mix, in numbers

/// Plain GETs to `/plain` over HTTP/1.1 (one of them with a query string).
const N_GET_H1: usize = 7;
/// Plain GETs to `/plain` over h2.
const N_GET_H2: usize = 5;
/// POSTs of [`POST_LEN`] bytes to `/plain`: one over HTTP/1.1, one over h2.
const N_POST: usize = 2;
const POST_LEN: usize = 1234;
/// All requests to `/plain`; each gets the 2-byte body "ok".
const N_PLAIN: usize = N_GET_H1 + N_GET_H2 + N_POST;
/// SSE streams to `/sse` (half HTTP/1.1, half h2), each [`K_EVENTS`] events.
const M_SSE: usize = 4;
const K_EVENTS: usize = 6;
/// What the origin writes for one SSE stream, one write per element, 10 ms
/// apart: LF and CRLF endings, an event whose blank line is split between
/// its CR and LF, one split between the line end and the blank line, and a
/// multi-line event. [`K_EVENTS`] events in all.
const SSE_WRITES: &[&str] = &[
    "data: 1\n\n",
    "data: 2\r\n\r",
    "\n",
    "data: 3\r\n\r\n",
    "data: 4\n",
    "\n",
    "id: 5\ndata: 5\n\n",
    "data: 6\r\n\r\n",
];
/// WebSocket text messages each way (plus one ping, which is not a message).
const W_MSGS: usize = 5;
/// Payload bytes each way through the `tunnel.test` passthrough (after the
/// ClientHello), and through `pp.tunnel.test` (PROXY v2 to the backend).
const B_TUNNEL: usize = 100_000;
const B_TUNNEL_PP: usize = 4_096;
/// Requests to paths no location matches.
const N_404: usize = 2;

const FIRST_BYTE_LE: &[&str] = &[
    "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
    "10", "20", "30", "60", "+Inf",
];
const DURATION_LE: &[&str] = &[
    "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "30", "60", "300", "600", "1800", "3600", "7200",
    "14400", "+Inf",
];

/// Every family the README/SPEC names, plus the ones src/metrics.rs adds.
const FAMILIES: &[(&str, &str)] = &[
    ("portico_connections_total", "counter"),
    ("portico_client_hello_failures_total", "counter"),
    ("portico_proxy_header_failures_total", "counter"),
    ("portico_tls_handshake_failures_total", "counter"),
    ("portico_tunnel_active", "gauge"),
    ("portico_tunnel_bytes_total", "counter"),
    ("portico_tunnel_duration_seconds", "histogram"),
    ("portico_backend_connect_failures_total", "counter"),
    ("portico_http_requests_total", "counter"),
    ("portico_http_first_byte_seconds", "histogram"),
    ("portico_http_stream_duration_seconds", "histogram"),
    ("portico_http_streams_active", "gauge"),
    ("portico_http_body_bytes_total", "counter"),
    ("portico_sse_events_total", "counter"),
    ("portico_websocket_messages_total", "counter"),
    ("portico_upstream_failures_total", "counter"),
    ("portico_config_reloads_total", "counter"),
    ("portico_connections_active", "gauge"),
    ("portico_connections_refused_total", "counter"),
    ("portico_certificate_expiry_timestamp_seconds", "gauge"),
    ("portico_acme_orders_total", "counter"),
    ("portico_websocket_response_seconds", "histogram"),
];

// ---------------------------------------------------------------- exposition parsing

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> &str {
        self.labels.get(k).map_or("", String::as_str)
    }

    /// The labels without `le`, as text: identifies a histogram series.
    fn key_without_le(&self) -> String {
        self.labels
            .iter()
            .filter(|(k, _)| k.as_str() != "le")
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Parse `name{k="v",...} value` lines (label values may hold escapes).
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let mut end = r.len();
            loop {
                // key
                let mut key = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == '=' || c == '}' {
                        break;
                    }
                    if c != ',' && c != ' ' {
                        key.push(c);
                    }
                    chars.next();
                }
                match chars.next() {
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    Some((_, '=')) => {}
                    _ => break,
                }
                // value
                let mut value = String::new();
                if chars.next().map(|(_, c)| c) != Some('"') {
                    break;
                }
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => break,
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
            }
            rest = &r[end.min(r.len())..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| match v {
                "+Inf" => Some(f64::INFINITY),
                "-Inf" => Some(f64::NEG_INFINITY),
                v => v.parse().ok(),
            })
            .unwrap_or(f64::NAN);
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The series of `name`, one per line, for failure messages.
fn dump(text: &str, name: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .collect();
    if lines.is_empty() {
        format!("    (no series of {name})")
    } else {
        lines
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `# TYPE name kind` lines.
fn declared_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// `# HELP name text` lines.
fn declared_help(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .map(|l| {
            let (name, help) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_string(), help.trim().to_string())
        })
        .collect()
}

/// The family a sample belongs to (histogram suffixes stripped when the
/// stripped name is declared a histogram).
fn family_of(name: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).map(String::as_str) == Some("histogram") {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

/// Collects failed expectations so that a test reports all of them at once.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn fail(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    /// The series of `name` with exactly these labels (all of them given) is `want`.
    fn series(&mut self, text: &str, name: &str, labels: &[(&str, &str)], want: f64) {
        let found: Vec<Sample> = samples(text)
            .into_iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .collect();
        let got = found.first().map(|s| s.value);
        if found.len() != 1 || got != Some(want) {
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            self.0.push(format!(
                "{name}{{{}}} = {}, want {want}; exported series:\n{}",
                shown.join(","),
                match got {
                    Some(v) if found.len() == 1 => v.to_string(),
                    Some(_) => format!("{} series match", found.len()),
                    None => "absent".into(),
                },
                dump(text, name)
            ));
        }
    }

    /// The sum of the series of `name` whose labels include `labels` is `want`.
    fn sum(&mut self, text: &str, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = metric_value(text, name, labels);
        if got != want {
            self.0.push(format!(
                "sum of {name}{labels:?} = {got}, want {want}; exported series:\n{}",
                dump(text, name)
            ));
        }
    }

    fn finish(self, what: &str) {
        if !self.0.is_empty() {
            panic!(
                "{what}: {} check(s) failed:\n\n{}\n",
                self.0.len(),
                self.0.join("\n\n")
            );
        }
    }
}

/// The labels of a `portico_http_requests_total` series of site `api`.
fn api_request<'a>(
    location: &'a str,
    method: &'a str,
    status: &'a str,
    protocol: &'a str,
) -> [(&'a str, &'a str); 5] {
    [
        ("site", "api"),
        ("location", location),
        ("method", method),
        ("status", status),
        ("protocol", protocol),
    ]
}

/// The labels `site="api"`, `location` and one more, `key="value"`.
fn api_labels<'a>(location: &'a str, key: &'a str, value: &'a str) -> [(&'a str, &'a str); 3] {
    [("site", "api"), ("location", location), (key, value)]
}

/// The labels of a `portico_connections_total` series.
fn conn_labels<'a>(listener: &'a str, route: &'a str, action: &'a str) -> [(&'a str, &'a str); 3] {
    [("listener", listener), ("route", route), ("action", action)]
}

/// `portico_tunnel_bytes_total` of `backend` is `up` upstream and `down`
/// downstream.
fn check_tunnel_bytes(c: &mut Checks, text: &str, backend: &str, up: usize, down: usize) {
    let name = "portico_tunnel_bytes_total";
    let dir = |d| [("backend", backend), ("direction", d)];
    c.series(text, name, &dir("upstream"), up as f64);
    c.series(text, name, &dir("downstream"), down as f64);
}

// ---------------------------------------------------------------- origin (hyper, HTTP/1.1)

/// A body fed by a channel, one frame per message; an `Err` fails the body
/// (hyper then aborts the connection: an upstream reset mid-stream).
struct ChanBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Send `chunk` down a [`ChanBody`]; false once the body is gone.
async fn feed(tx: &mpsc::Sender<Result<Bytes, BoxError>>, chunk: &'static [u8]) -> bool {
    tx.send(Ok(Bytes::from_static(chunk))).await.is_ok()
}

fn event_stream(
    script: impl FnOnce(mpsc::Sender<Result<Bytes, BoxError>>) -> JoinHandle<()>,
) -> Response<TestBody> {
    let (tx, rx) = mpsc::channel(1);
    script(tx);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(ChanBody(rx).boxed_unsync())
        .unwrap()
}

async fn origin_handle(req: Request<Incoming>) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/plain" => {
            let _ = req.into_body().collect().await;
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full("ok"))
                .unwrap()
        }
        "/sse" => event_stream(|tx| {
            tokio::spawn(async move {
                for (i, w) in SSE_WRITES.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if !feed(&tx, w.as_bytes()).await {
                        return;
                    }
                }
            })
        }),
        // One event, then a comment every 50 ms until the body is dropped.
        "/hang" => event_stream(|tx| {
            tokio::spawn(async move {
                if !feed(&tx, b"data: 0\n\n").await {
                    return;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if !feed(&tx, b": ping\n\n").await {
                        return;
                    }
                }
            })
        }),
        // The response head only after 1.5 s: clients give up before it.
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(full("late"))
        }
        // One event, then the body fails: hyper cuts the connection.
        "/reset" => event_stream(|tx| {
            tokio::spawn(async move {
                if !feed(&tx, b"data: 1\n\n").await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err("origin resets mid-stream".into())).await;
            })
        }),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("origin: unknown path\n"))
            .unwrap(),
    }
}

/// A hyper HTTP/1.1 origin on a loopback port.
async fn start_origin() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    service_fn(|req| async move { Ok::<_, Infallible>(origin_handle(req).await) });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A tokio-tungstenite server that echoes every data message.
async fn start_ws_echo() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ws echo");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A raw TCP backend for one passthrough connection: reads the PROXY header
/// `expect`s, then everything until the client's EOF, reports it, answers
/// with `reply` and closes.
async fn start_sink(
    expect: Expect,
    reply: Vec<u8>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<Vec<u8>, String>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                if let Err(e) = common::read_proxy_header(&mut s, expect).await {
                    let _ = tx.send(Err(e));
                    return;
                }
                let mut got = Vec::new();
                if let Err(e) = s.read_to_end(&mut got).await {
                    let _ = tx.send(Err(format!("sink read: {e}")));
                    return;
                }
                let _ = tx.send(Ok(got));
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx, task)
}

// ---------------------------------------------------------------- clients

/// The exact bytes of the first flight of a rustls client for `sni`: a
/// ClientHello, for routes to match on.
fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn =
        rustls::ClientConnection::new(insecure_client_config(alpn), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: SocketAddr, alpn: &[u8], sni: &str) -> Tls {
    let (tls, _) = common::tls_connect(addr, &insecure_connector(&[alpn]), sni).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "ALPN not negotiated as asked"
    );
    tls
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

/// One HTTP/1.1 or h2 connection to portico for `api.test`.
struct Client {
    proto: Proto,
    sender: Sender,
    conn: JoinHandle<()>,
}

impl Client {
    async fn connect(addr: SocketAddr, proto: Proto) -> Client {
        let alpn: &[u8] = match proto {
            Proto::H1 => b"http/1.1",
            Proto::H2 => b"h2",
        };
        let io = TokioIo::new(tls_connect(addr, alpn, "api.test").await);
        let (sender, conn) = match proto {
            Proto::H1 => {
                let (s, c) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("h1 handshake");
                (Sender::H1(s), tokio::spawn(async move { drop(c.await) }))
            }
            Proto::H2 => {
                let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                (Sender::H2(s), tokio::spawn(async move { drop(c.await) }))
            }
        };
        Client {
            proto,
            sender,
            conn,
        }
    }

    fn request(&self, method: Method, path: &str, host: &str, body: TestBody) -> Request<TestBody> {
        match self.proto {
            Proto::H1 => Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host)
                .body(body)
                .unwrap(),
            Proto::H2 => Request::builder()
                .method(method)
                .uri(format!("https://{host}{path}"))
                .version(Version::HTTP_2)
                .body(body)
                .unwrap(),
        }
    }

    async fn send(&mut self, req: Request<TestBody>) -> Response<Incoming> {
        let what = format!("{} {} over {:?}", req.method(), req.uri(), self.proto);
        let fut: Pin<
            Box<dyn std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send>,
        > = match &mut self.sender {
            Sender::H1(s) => {
                s.ready()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: not ready: {e}"));
                Box::pin(s.send_request(req))
            }
            Sender::H2(s) => {
                s.ready()
                    .await
                    .unwrap_or_else(|e| panic!("{what}: not ready: {e}"));
                Box::pin(s.send_request(req))
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{what} failed: {e:?}"),
            Err(_) => panic!("{what}: no response head within 10s"),
        }
    }

    /// Send and read the whole body.
    async fn call(&mut self, method: Method, path: &str, body: TestBody) -> (StatusCode, Bytes) {
        let req = self.request(method, path, "api.test", body);
        let resp = self.send(req).await;
        let status = resp.status();
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{path}: body not complete within 10s"))
            .unwrap_or_else(|e| panic!("{path}: body failed: {e}"))
            .to_bytes();
        (status, body)
    }

    async fn get(&mut self, path: &str) -> (StatusCode, Bytes) {
        self.call(Method::GET, path, empty()).await
    }

    /// `GET path` for `api.test`: the response, its body not read yet.
    async fn get_response(&mut self, path: &str) -> Response<Incoming> {
        let req = self.request(Method::GET, path, "api.test", empty());
        self.send(req).await
    }

    /// Close the connection at once (TCP FIN from this side).
    fn kill(self) {
        self.conn.abort();
    }
}

/// Read and discard until the peer closes (EOF or reset); how many bytes came.
async fn drain_until_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> Result<usize, String> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?} ({total} bytes came)")),
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(_)) => return Ok(total),
        }
    }
}

/// One passthrough transfer: a ClientHello for `sni`, then `payload`, then
/// EOF; the backend must get exactly those bytes (after any PROXY header it
/// expects) and the client exactly `reply`. Returns the ClientHello's length.
async fn tunnel_transfer(
    listen: SocketAddr,
    sni: &str,
    payload: &[u8],
    reply: &[u8],
    backend: &mut mpsc::UnboundedReceiver<Result<Vec<u8>, String>>,
) -> usize {
    let hello = client_hello(sni, &[b"h2", b"http/1.1"]);
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap_or_else(|_| panic!("{sni}: tunnel reply within 10s"))
        .unwrap_or_else(|e| panic!("{sni}: tunnel read: {e}"));
    assert!(
        back == reply,
        "{sni}: the client got {} bytes back, not the backend's {}",
        back.len(),
        reply.len()
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), backend.recv())
        .await
        .unwrap_or_else(|_| panic!("{sni}: no report from the backend"))
        .expect("backend alive")
        .unwrap_or_else(|e| panic!("{sni}: backend: {e}"));
    let mut want = hello.clone();
    want.extend_from_slice(payload);
    assert!(
        seen == want,
        "{sni}: the backend got {} bytes, want ClientHello + payload = {}",
        seen.len(),
        want.len()
    );
    hello.len()
}

/// Poll `/metrics` until `done` accepts it or `within` passes; returns the
/// last scrape and whether `done` accepted it.
async fn poll_metrics(
    p: &Portico,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> (String, bool) {
    let started = Instant::now();
    loop {
        let text = p.metrics_text().await;
        if done(&text) {
            return (text, true);
        }
        if started.elapsed() > within {
            return (text, false);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Wait until `needle` stands `n` times in `p`'s stderr, or `within` passes.
async fn wait_for_stderr(p: &Portico, needle: &str, n: usize, within: Duration) {
    let started = Instant::now();
    while p.stderr().matches(needle).count() < n && started.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Gauges that must be back to 0 once every client has gone: the non-zero ones.
fn open_gauges(text: &str) -> Vec<String> {
    samples(text)
        .into_iter()
        .filter(|s| {
            matches!(
                s.name.as_str(),
                "portico_http_streams_active"
                    | "portico_tunnel_active"
                    | "portico_connections_active"
            ) && s.value != 0.0
        })
        .map(|s| format!("{}{:?} = {}", s.name, s.labels, s.value))
        .collect()
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".into()
    }
}

// ---------------------------------------------------------------- the mix

/// What the mix recorded for the tests to check.
struct Mix {
    /// `/metrics` of the main instance after every gauge settled.
    scrape: String,
    /// `/metrics` of the `max_connections = 1` instance after its refusal.
    limits_scrape: String,
    /// The main instance's stderr (JSON lines).
    stderr: String,
    listener: String,
    proxy_listener: String,
    limits_listener: String,
    /// Length of the ClientHellos sent to the passthrough routes (the
    /// last one to the limits instance, which copies instead of splicing).
    hello_len: usize,
    pp_hello_len: usize,
    copy_hello_len: usize,
    /// TLS connections made to the `api` route (including the failed handshake).
    terminate_conns: usize,
    /// How the gauges settled: time taken, or the ones still open after 2 s.
    settle: Result<Duration, Vec<String>>,
    /// Per upstream-reset stream: did the client see the cut (not a clean end)?
    reset_seen_by_client: Vec<(Proto, Result<(), String>)>,
}

fn main_config(
    listen: SocketAddr,
    proxy_listen: SocketAddr,
    origin: SocketAddr,
    ws: SocketAddr,
    sink: SocketAddr,
    pp_sink: SocketAddr,
    dead: SocketAddr,
) -> String {
    format!(
        r#"
[timeouts]
client_hello = "300ms"

[log]
level = "info"
format = "json"

[[listen]]
addr = "{listen}"

[[listen]]
addr = "{proxy_listen}"
accept_proxy = true
trusted = ["10.0.0.0/8"]

[[route]]
sni = ["tunnel.test"]
pass = "tun_plain"

[[route]]
sni = ["pp.tunnel.test"]
pass = "tun_pp"

[[route]]
sni = ["dead.tunnel.test"]
pass = "tun_dead"

[[route]]
sni = ["api.test"]
terminate = "api"

[backend.tun_plain]
addr = "{sink}"
proxy_protocol = "none"

[backend.tun_pp]
addr = "{pp_sink}"
proxy_protocol = "v2"

[backend.tun_dead]
addr = "{dead}"
proxy_protocol = "none"

[site.api]
cert = "self-signed"

[[site.api.location]]
path = "/plain"
upstream = "origin"

[[site.api.location]]
name = "events"
path = "/sse"
upstream = "origin"

[[site.api.location]]
path = "/v1/responses"
match = "exact"
upstream = "ws"

[[site.api.location]]
path = "/fixed"
respond = {{ status = 200, body = "fixed" }}

[[site.api.location]]
name = "hang"
path = "/hang"
upstream = "origin"

[[site.api.location]]
name = "reset"
path = "/reset"
upstream = "origin"

[[site.api.location]]
path = "/dead"
upstream = "dead"

[[site.api.location]]
name = "slow"
path = "/slow"
upstream = "origin"

[upstream.origin]
url = "http://{origin}"

[upstream.ws]
url = "http://{ws}"

[upstream.dead]
url = "http://{dead}"
"#
    )
}

async fn run_mix() -> Mix {
    let (origin, _origin_task) = start_origin().await;
    let (ws, _ws_task) = start_ws_echo().await;
    let tunnel_reply = pseudo_random(B_TUNNEL, 0x5eed_0001);
    let tunnel_payload = pseudo_random(B_TUNNEL, 0x5eed_0002);
    let pp_reply = pseudo_random(B_TUNNEL_PP, 0x5eed_0003);
    let pp_payload = pseudo_random(B_TUNNEL_PP, 0x5eed_0004);
    let (sink, mut sink_rx, _sink_task) = start_sink(Expect::None, tunnel_reply.clone()).await;
    let (pp_sink, mut pp_rx, _pp_task) = start_sink(Expect::V2, pp_reply.clone()).await;
    // Bound, never listening: connections are refused.
    let dead_port = DeadPort::new();
    let dead = dead_port.addr;
    let listen = any_port();
    // On [::1]: two `127.0.0.1:0` listeners would be one address.
    let proxy_listen = any_port_v6();
    let p = Portico::start(&main_config(
        listen,
        proxy_listen,
        origin,
        ws,
        sink,
        pp_sink,
        dead,
    ))
    .await;
    let (listen, proxy_listen) = match p.listening()[..] {
        [a, b] => (a, b),
        ref other => panic!("expected two listeners, got {other:?}"),
    };
    let mut terminate_conns = 0;

    // Plain requests, with a reload in the middle: counters survive it.
    let mut h1 = Client::connect(listen, Proto::H1).await;
    terminate_conns += 1;
    assert_eq!(
        h1.get("/plain?secret=s3cr3t").await,
        (StatusCode::OK, Bytes::from("ok"))
    );
    for _ in 1..4 {
        assert_eq!(h1.get("/plain").await.0, StatusCode::OK);
    }
    p.signal("HUP");
    let (_, reloaded) = poll_metrics(&p, Duration::from_secs(5), |t| {
        metric_value(t, "portico_config_reloads_total", &[("result", "ok")]) >= 1.0
    })
    .await;
    assert!(reloaded, "no successful reload counted within 5s of SIGHUP");
    for _ in 4..N_GET_H1 {
        assert_eq!(h1.get("/plain").await.0, StatusCode::OK);
    }
    let (st, body) = h1
        .call(Method::POST, "/plain", full(vec![b'x'; POST_LEN]))
        .await;
    assert_eq!((st, body), (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(
        h1.get("/fixed").await,
        (StatusCode::OK, Bytes::from("fixed"))
    );
    let mut h2 = Client::connect(listen, Proto::H2).await;
    terminate_conns += 1;
    for _ in 0..N_GET_H2 {
        assert_eq!(h2.get("/plain").await, (StatusCode::OK, Bytes::from("ok")));
    }
    let (st, body) = h2
        .call(Method::POST, "/plain", full(vec![b'y'; POST_LEN]))
        .await;
    assert_eq!((st, body), (StatusCode::OK, Bytes::from("ok")));

    // 404 (no location) and 502 (upstream refuses).
    assert_eq!(h1.get("/nothing-here").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        h2.get("/nothing/here/either").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h2.get("/dead").await.0, StatusCode::BAD_GATEWAY);

    // SSE: M streams, each K events, over both protocols, read to the end.
    let want_sse: String = SSE_WRITES.concat();
    for i in 0..M_SSE {
        let c = if i % 2 == 0 { &mut h1 } else { &mut h2 };
        let (st, body) = c.get("/sse").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(String::from_utf8_lossy(&body), want_sse, "SSE stream {i}");
    }

    // SSE streams the client abandons mid-way (h1: connection closed; h2: stream reset).
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(listen, proto).await;
        terminate_conns += 1;
        let mut body = c.get_response("/hang").await.into_body();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("first /hang event within 5s");
        assert!(matches!(first, Some(Ok(_))), "/hang: {first:?}");
        drop(body);
        c.kill();
    }

    // SSE streams the upstream cuts mid-way.
    let mut reset_seen_by_client = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(listen, proto).await;
        terminate_conns += 1;
        let mut body = c.get_response("/reset").await.into_body();
        let mut got = Vec::new();
        let outcome = loop {
            match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
                Err(_) => break Err("no end within 5s".to_string()),
                Ok(None) => {
                    break Err(format!(
                    "the body ended cleanly after {:?}: the client cannot tell the stream was cut",
                    String::from_utf8_lossy(&got)
                ))
                }
                Ok(Some(Err(_))) => break Ok(()),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        got.extend_from_slice(&d);
                    }
                }
            }
        };
        reset_seen_by_client.push((proto, outcome));
        c.kill();
    }

    // Clients that give up before the response head (the origin takes 1.5 s).
    for proto in [Proto::H1, Proto::H2] {
        let mut c = Client::connect(listen, proto).await;
        terminate_conns += 1;
        let pending = c.get_response("/slow");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), pending)
                .await
                .is_err(),
            "/slow answered before 200 ms"
        );
        c.kill();
    }

    // WebSocket: W messages each way, a ping, a clean close.
    {
        let tls = tls_connect(listen, b"http/1.1", "api.test").await;
        terminate_conns += 1;
        let (mut sock, resp) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::client_async("ws://api.test/v1/responses", tls),
        )
        .await
        .expect("WebSocket handshake within 5s")
        .expect("WebSocket handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        for i in 0..W_MSGS {
            let text = format!("message {i}");
            sock.send(Message::text(text.clone()))
                .await
                .expect("ws send");
            let reply = tokio::time::timeout(Duration::from_secs(5), sock.next())
                .await
                .expect("ws echo within 5s");
            match reply {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
                other => panic!("ws echo of {text:?}: {other:?}"),
            }
        }
        sock.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .expect("ws ping");
        match tokio::time::timeout(Duration::from_secs(5), sock.next()).await {
            Ok(Some(Ok(Message::Pong(_)))) => {}
            other => panic!("ws pong: {other:?}"),
        }
        sock.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .expect("ws close");
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(m) = sock.next().await {
                if m.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(
            end.is_ok(),
            "WebSocket not closed within 5s of the close frame"
        );
    }
    drop(h1);
    drop(h2);

    // Passthrough: exactly B bytes each way after the ClientHello.
    let hello_len = tunnel_transfer(
        listen,
        "tunnel.test",
        &tunnel_payload,
        &tunnel_reply,
        &mut sink_rx,
    )
    .await;
    let pp_hello_len =
        tunnel_transfer(listen, "pp.tunnel.test", &pp_payload, &pp_reply, &mut pp_rx).await;

    // A backend nobody listens on.
    {
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.write_all(&client_hello("dead.tunnel.test", &[]))
            .await
            .unwrap();
        drain_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("dead backend: client closed");
    }

    // A TLS handshake that fails: a valid ClientHello for api.test, then garbage.
    {
        let mut s = TcpStream::connect(listen).await.unwrap();
        terminate_conns += 1;
        s.write_all(&client_hello("api.test", &[b"h2"]))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        drain_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("failed handshake: connection closed");
    }

    // A ClientHello that never completes: closed after client_hello = 300ms.
    {
        let mut s = TcpStream::connect(listen).await.unwrap();
        let hello = client_hello("api.test", &[]);
        s.write_all(&hello[..hello.len() / 2]).await.unwrap();
        let started = Instant::now();
        drain_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("partial ClientHello: connection closed");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "closed after {:?}, before the 300ms ClientHello timeout",
            started.elapsed()
        );
    }

    // A PROXY header from an untrusted peer (127.0.0.1 is not in 10.0.0.0/8).
    {
        let mut s = TcpStream::connect(proxy_listen).await.unwrap();
        let _ = s
            .write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 443\r\n")
            .await;
        let _ = s.write_all(&client_hello("api.test", &[])).await;
        drain_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("untrusted PROXY header: connection closed");
    }

    // Every stream, tunnel and connection is over: the gauges go back to 0.
    let started = Instant::now();
    let (_, settled) = poll_metrics(&p, Duration::from_secs(2), |t| {
        open_gauges(t).is_empty()
            && metric_value(t, "portico_tunnel_duration_seconds_count", &[]) >= 2.0
    })
    .await;
    let took = started.elapsed();
    // Tunnel lines are written just after the tunnel histogram is recorded
    // (access lines before the gauges move): wait for both of them.
    wait_for_stderr(&p, "\"kind\":\"tunnel\"", 2, Duration::from_secs(2)).await;
    let scrape = p.metrics_text().await;
    let settle = if settled {
        Ok(took)
    } else {
        Err(open_gauges(&scrape))
    };
    let stderr = p.stderr();

    // A second instance: user-space copies instead of splice(2) (the other
    // byte-counting path) with a PROXY v1 backend, then its only connection
    // slot taken.
    let copy_reply = pseudo_random(B_TUNNEL, 0x5eed_0005);
    let copy_payload = pseudo_random(B_TUNNEL, 0x5eed_0006);
    let (copy_sink, mut copy_rx, _copy_task) = start_sink(Expect::V1, copy_reply.clone()).await;
    let limits_listen = any_port();
    let lp = Portico::start(&api_config(
        limits_listen,
        &format!(
            r#"
[limits]
max_connections = 1

[tunnel]
splice = false

[[route]]
sni = ["tunnel.test"]
pass = "tun_copy"

[backend.tun_copy]
addr = "{copy_sink}"
proxy_protocol = "v1"
"#
        ),
        r#"
[[site.api.location]]
path = "/"
respond = { status = 200, body = "ok" }
"#,
    ))
    .await;
    let limits_listen = lp.addr();
    let copy_hello_len = tunnel_transfer(
        limits_listen,
        "tunnel.test",
        &copy_payload,
        &copy_reply,
        &mut copy_rx,
    )
    .await;
    let (_, closed) = poll_metrics(&lp, Duration::from_secs(5), |t| {
        metric_value(t, "portico_tunnel_duration_seconds_count", &[]) == 1.0
            && metric_value(t, "portico_connections_active", &[]) == 0.0
    })
    .await;
    assert!(closed, "the copied tunnel was not over within 5s");
    let holder = TcpStream::connect(limits_listen).await.unwrap();
    let (_, held) = poll_metrics(&lp, Duration::from_secs(5), |t| {
        metric_value(t, "portico_connections_active", &[]) == 1.0
    })
    .await;
    assert!(
        held,
        "the first connection never showed in portico_connections_active"
    );
    let mut second = TcpStream::connect(limits_listen).await.unwrap();
    drain_until_closed(&mut second, Duration::from_secs(5))
        .await
        .expect("connection over max_connections: closed at once");
    let (limits_scrape, _) = poll_metrics(&lp, Duration::from_secs(2), |t| {
        metric_value(t, "portico_connections_refused_total", &[]) >= 1.0
    })
    .await;
    drop(holder);

    Mix {
        scrape,
        limits_scrape,
        stderr,
        listener: listen.to_string(),
        proxy_listener: proxy_listen.to_string(),
        limits_listener: limits_listen.to_string(),
        hello_len,
        pp_hello_len,
        copy_hello_len,
        terminate_conns,
        settle,
        reset_seen_by_client,
    }
}

/// The mix, run once for the whole test binary in its own thread and runtime.
fn mix() -> &'static Mix {
    static MIX: OnceLock<Result<Mix, String>> = OnceLock::new();
    let result = MIX.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(bounded(90, run_mix()))
        })
        .join()
        .map_err(panic_message)
    });
    match result {
        Ok(m) => m,
        Err(e) => panic!("the traffic mix failed, so this check could not run: {e}"),
    }
}

// ---------------------------------------------------------------- exact values

#[test]
fn exact_http_counters_after_the_mix() {
    let m = mix();
    let t = &m.scrape;
    let mut c = Checks::default();
    let req = "portico_http_requests_total";
    c.series(
        t,
        req,
        &api_request("/plain", "GET", "200", "http1"),
        N_GET_H1 as f64,
    );
    c.series(
        t,
        req,
        &api_request("/plain", "GET", "200", "h2"),
        N_GET_H2 as f64,
    );
    c.series(t, req, &api_request("/plain", "POST", "200", "http1"), 1.0);
    c.series(t, req, &api_request("/plain", "POST", "200", "h2"), 1.0);
    // The location label is the name when one is set.
    c.series(
        t,
        req,
        &api_request("events", "GET", "200", "http1"),
        (M_SSE / 2) as f64,
    );
    c.series(
        t,
        req,
        &api_request("events", "GET", "200", "h2"),
        (M_SSE / 2) as f64,
    );
    c.sum(t, req, &[("location", "/sse")], 0.0);
    // No location: status "404", location "none".
    c.series(t, req, &api_request("none", "GET", "404", "http1"), 1.0);
    c.series(t, req, &api_request("none", "GET", "404", "h2"), 1.0);
    c.sum(t, req, &[("location", "none")], N_404 as f64);
    c.series(t, req, &api_request("/dead", "GET", "502", "h2"), 1.0);
    c.series(
        t,
        req,
        &api_request("/v1/responses", "GET", "101", "http1"),
        1.0,
    );
    c.series(t, req, &api_request("/fixed", "GET", "200", "http1"), 1.0);
    c.sum(t, req, &[("location", "hang")], 2.0);
    c.sum(t, req, &[("location", "reset")], 2.0);
    let total_requests = N_PLAIN + M_SSE + N_404 + 1 /* 502 */ + 1 /* ws */ + 1 /* fixed */ + 2 + 2;
    let got = requests_except_slow(t);
    c.check(got == total_requests as f64, || {
        format!(
            "{got} requests counted in all (but /slow), want {total_requests}:\n{}",
            dump(t, req)
        )
    });

    // Upstream failures: exactly the one refused connect, named by upstream.
    c.series(
        t,
        "portico_upstream_failures_total",
        &[("upstream", "dead"), ("reason", "refused")],
        1.0,
    );
    c.sum(
        t,
        "portico_upstream_failures_total",
        &[("reason", "refused")],
        1.0,
    );

    // Bodies: "ok" per /plain request; the POST bodies upstream.
    let body = "portico_http_body_bytes_total";
    c.series(
        t,
        body,
        &api_labels("/plain", "direction", "response"),
        (N_PLAIN * 2) as f64,
    );
    c.series(
        t,
        body,
        &api_labels("/plain", "direction", "request"),
        (N_POST * POST_LEN) as f64,
    );
    c.series(
        t,
        body,
        &api_labels("events", "direction", "response"),
        (M_SSE * SSE_WRITES.concat().len()) as f64,
    );

    // SSE events: M streams of K, whatever the line endings and splits.
    c.series(
        t,
        "portico_sse_events_total",
        &[("site", "api"), ("location", "events")],
        (M_SSE * K_EVENTS) as f64,
    );

    // WebSocket messages, each way; the ping/pong and close frames are not messages.
    for dir in ["client_to_upstream", "upstream_to_client"] {
        c.series(
            t,
            "portico_websocket_messages_total",
            &api_labels("/v1/responses", "direction", dir),
            W_MSGS as f64,
        );
    }
    c.finish("HTTP counters after the mix");
}

#[test]
fn exact_connection_and_tunnel_counters_after_the_mix() {
    let m = mix();
    let t = &m.scrape;
    let mut c = Checks::default();
    let l = m.listener.as_str();

    // Tunnel bytes: the client's bytes (ClientHello included), never the PROXY header.
    check_tunnel_bytes(&mut c, t, "tun_plain", m.hello_len + B_TUNNEL, B_TUNNEL);
    check_tunnel_bytes(
        &mut c,
        t,
        "tun_pp",
        m.pp_hello_len + B_TUNNEL_PP,
        B_TUNNEL_PP,
    );
    c.sum(
        t,
        "portico_tunnel_bytes_total",
        &[("backend", "tun_dead")],
        0.0,
    );

    // Connections by route and action (route label: index:action:target).
    let conn = "portico_connections_total";
    c.series(t, conn, &conn_labels(l, "0:pass:tun_plain", "pass"), 1.0);
    c.series(t, conn, &conn_labels(l, "1:pass:tun_pp", "pass"), 1.0);
    c.series(t, conn, &conn_labels(l, "2:pass:tun_dead", "pass"), 1.0);
    c.series(
        t,
        conn,
        &conn_labels(l, "3:terminate:api", "terminate"),
        m.terminate_conns as f64,
    );
    // The ClientHello timeout on the main listener, the PROXY refusal on the other.
    c.series(t, conn, &conn_labels(l, "none", "reject"), 1.0);
    let pl = m.proxy_listener.as_str();
    c.series(t, conn, &conn_labels(pl, "none", "reject"), 1.0);
    c.sum(t, conn, &[("action", "redirect")], 0.0);

    c.series(
        t,
        "portico_client_hello_failures_total",
        &[("reason", "timeout")],
        1.0,
    );
    c.sum(t, "portico_client_hello_failures_total", &[], 1.0);
    c.series(
        t,
        "portico_proxy_header_failures_total",
        &[
            ("listener", m.proxy_listener.as_str()),
            ("reason", "untrusted"),
        ],
        1.0,
    );
    c.series(
        t,
        "portico_tls_handshake_failures_total",
        &[("site", "api")],
        1.0,
    );
    c.series(
        t,
        "portico_backend_connect_failures_total",
        &[("backend", "tun_dead")],
        1.0,
    );
    c.sum(t, "portico_backend_connect_failures_total", &[], 1.0);
    c.series(t, "portico_config_reloads_total", &[("result", "ok")], 1.0);
    c.sum(
        t,
        "portico_config_reloads_total",
        &[("result", "error")],
        0.0,
    );

    // The limits instance: the copied tunnel (PROXY v1 header not counted),
    // then one refusal, counted as a reject too.
    let lt = &m.limits_scrape;
    let ll = m.limits_listener.as_str();
    check_tunnel_bytes(
        &mut c,
        lt,
        "tun_copy",
        m.copy_hello_len + B_TUNNEL,
        B_TUNNEL,
    );
    c.series(lt, conn, &conn_labels(ll, "0:pass:tun_copy", "pass"), 1.0);
    c.series(lt, "portico_tunnel_active", &[("backend", "tun_copy")], 0.0);
    c.series(
        lt,
        "portico_connections_refused_total",
        &[("listener", ll), ("limit", "max_connections")],
        1.0,
    );
    c.series(lt, conn, &conn_labels(ll, "none", "reject"), 1.0);
    c.finish("connection and tunnel counters after the mix");
}

#[test]
fn gauges_return_to_zero_after_aborted_and_reset_streams() {
    let m = mix();
    let t = &m.scrape;
    let mut c = Checks::default();
    if let Err(open) = &m.settle {
        c.fail(format!(
            "gauges still non-zero 2 s after every client left:\n    {}",
            open.join("\n    ")
        ));
    }
    // Every kind and every location that streamed has a series, and it is 0.
    for (location, kind) in [
        ("/plain", "http"),
        ("events", "sse"),
        ("/v1/responses", "websocket"),
        ("hang", "sse"),
        ("reset", "sse"),
        ("none", "http"),
        ("/dead", "http"),
        ("/fixed", "http"),
    ] {
        c.series(
            t,
            "portico_http_streams_active",
            &api_labels(location, "kind", kind),
            0.0,
        );
    }
    for backend in ["tun_plain", "tun_pp"] {
        c.series(t, "portico_tunnel_active", &[("backend", backend)], 0.0);
    }
    for l in [&m.listener, &m.proxy_listener] {
        c.series(
            t,
            "portico_connections_active",
            &[("listener", l.as_str())],
            0.0,
        );
    }
    c.finish("gauges at the end of the mix");
}

#[test]
fn upstream_reset_mid_stream_is_visible_to_the_client() {
    let m = mix();
    let mut c = Checks::default();
    for (proto, outcome) in &m.reset_seen_by_client {
        if let Err(e) = outcome {
            c.fail(format!("{proto:?}: {e}"));
        }
    }
    c.finish("an upstream that resets mid-stream");
}

/// Sum of `portico_http_requests_total` but the `slow` location's series.
fn requests_except_slow(text: &str) -> f64 {
    samples(text)
        .iter()
        .filter(|s| s.name == "portico_http_requests_total" && s.label("location") != "slow")
        .map(|s| s.value)
        .sum()
}

/// Two clients (HTTP/1.1: connection closed; h2: stream reset) give up on
/// `/slow` before its response head. They are requests all the same: the
/// counter must have them (nginx says 499), and the access log line must
/// say what happened instead of `status: 0`.
#[test]
fn requests_cancelled_before_the_response_head_are_counted() {
    let m = mix();
    let mut c = Checks::default();
    let counted = metric_value(
        &m.scrape,
        "portico_http_requests_total",
        &[("location", "slow")],
    );
    c.check(counted == 2.0, || {
        format!(
            "portico_http_requests_total{{location=\"slow\"}} sums to {counted}, want 2 (the two cancelled requests):\n{}",
            dump(&m.scrape, "portico_http_requests_total")
        )
    });
    let mut lines = Checks::default();
    let logged: Vec<serde_json::Value> = json_lines(&m.stderr, &mut lines)
        .into_iter()
        .filter(|v| v["target"] == "portico::access" && v["location"] == "slow")
        .collect();
    c.check(logged.len() == 2, || {
        format!("{} access lines for /slow, want 2", logged.len())
    });
    for v in &logged {
        c.check(v["status"] != 0 && v["status"].is_u64(), || {
            format!("access line for a cancelled request has no real status: {v}")
        });
        c.check(v["error"].is_string(), || {
            format!("access line for a cancelled request does not say why it ended: {v}")
        });
    }
    c.finish("requests the client cancels before the response head");
}

/// The WebSocket's access line counts its frames both ways: `bytes_out`
/// already has the upstream's, `bytes_in` must have the client's (at least
/// the W masked text frames: 2 header + 4 mask + payload bytes each).
#[test]
fn websocket_access_line_counts_bytes_both_ways() {
    let m = mix();
    let mut c = Checks::default();
    let lines = json_lines(&m.stderr, &mut c);
    let ws: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["target"] == "portico::access" && v["stream"] == "websocket")
        .collect();
    c.check(ws.len() == 1, || {
        format!("{} WebSocket access lines, want 1", ws.len())
    });
    let min_in: usize = (0..W_MSGS).map(|i| 6 + format!("message {i}").len()).sum();
    let min_out: usize = (0..W_MSGS).map(|i| 2 + format!("message {i}").len()).sum();
    for v in ws {
        let (bin, bout) = (
            v["bytes_in"].as_u64().unwrap_or(0),
            v["bytes_out"].as_u64().unwrap_or(0),
        );
        c.check(bin >= min_in as u64, || {
            format!("bytes_in {bin}, want at least the client's {min_in} frame bytes: {v}")
        });
        c.check(bout >= min_out as u64, || {
            format!("bytes_out {bout}, want at least the upstream's {min_out} frame bytes: {v}")
        });
    }
    c.finish("WebSocket access line");
}

/// The two `/reset` streams broke because the upstream cut them after the
/// response head: that is an upstream failure with reason `reset`, the one
/// a dashboard of "upstream failures" exists to show for streaming APIs.
#[test]
fn upstream_reset_mid_stream_is_counted_as_an_upstream_failure() {
    let m = mix();
    let mut c = Checks::default();
    c.series(
        &m.scrape,
        "portico_upstream_failures_total",
        &[("upstream", "origin"), ("reason", "reset")],
        2.0,
    );
    c.finish("an upstream that resets mid-stream");
}

// ---------------------------------------------------------------- histograms

/// Checks one histogram family: exact `le` sets per series, cumulative
/// buckets, `+Inf` equal to `_count`, and `_count`s as given.
fn check_histogram(
    c: &mut Checks,
    text: &str,
    family: &str,
    les: &[&str],
    counts: &[(&[(&str, &str)], f64)],
) {
    let all = samples(text);
    let bucket = format!("{family}_bucket");
    let count = format!("{family}_count");
    let mut series: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
    for s in all.iter().filter(|s| s.name == bucket) {
        series.entry(s.key_without_le()).or_default().push(s);
    }
    c.check(!series.is_empty(), || format!("no {bucket} series at all"));
    for (key, buckets) in &series {
        let got: Vec<&str> = buckets.iter().map(|s| s.label("le")).collect();
        c.check(got == les, || {
            format!("{bucket}{{{key}}}: le = {got:?}\n    want {les:?}")
        });
        let values: Vec<f64> = buckets.iter().map(|s| s.value).collect();
        c.check(values.windows(2).all(|w| w[0] <= w[1]), || {
            format!("{bucket}{{{key}}}: buckets not cumulative: {values:?}")
        });
        let n = all
            .iter()
            .find(|s| s.name == count && s.key_without_le() == *key)
            .map(|s| s.value);
        c.check(n.is_some() && values.last().copied() == n, || {
            format!(
                "{bucket}{{{key}}}: +Inf bucket {:?} != {count} {n:?}",
                values.last()
            )
        });
        c.check(
            all.iter()
                .any(|s| s.name == format!("{family}_sum") && s.key_without_le() == *key),
            || format!("{family}_sum{{{key}}} missing"),
        );
    }
    for (labels, want) in counts {
        c.sum(text, &count, labels, *want);
    }
}

#[test]
fn histograms_export_the_documented_buckets_and_counts() {
    let m = mix();
    let t = &m.scrape;
    let mut c = Checks::default();
    check_histogram(
        &mut c,
        t,
        "portico_http_first_byte_seconds",
        FIRST_BYTE_LE,
        &[
            (&[("site", "api"), ("location", "/plain")], N_PLAIN as f64),
            (&[("site", "api"), ("location", "events")], M_SSE as f64),
            (&[("site", "api"), ("location", "none")], N_404 as f64),
            (&[("site", "api"), ("location", "/fixed")], 1.0),
            (&[("site", "api"), ("location", "/dead")], 1.0),
            (&[("site", "api"), ("location", "hang")], 2.0),
            (&[("site", "api"), ("location", "reset")], 2.0),
        ],
    );
    check_histogram(
        &mut c,
        t,
        "portico_http_stream_duration_seconds",
        DURATION_LE,
        &[
            (&api_labels("/plain", "kind", "http"), N_PLAIN as f64),
            (&api_labels("events", "kind", "sse"), M_SSE as f64),
            (&api_labels("/v1/responses", "kind", "websocket"), 1.0),
            (&api_labels("hang", "kind", "sse"), 2.0),
            (&api_labels("reset", "kind", "sse"), 2.0),
            (&api_labels("none", "kind", "http"), N_404 as f64),
        ],
    );
    check_histogram(
        &mut c,
        t,
        "portico_tunnel_duration_seconds",
        DURATION_LE,
        &[
            (&[("backend", "tun_plain")], 1.0),
            (&[("backend", "tun_pp")], 1.0),
            (&[("backend", "tun_dead")], 0.0),
        ],
    );
    c.finish("histograms after the mix");
}

// ---------------------------------------------------------------- HELP / TYPE

#[test]
fn every_family_has_help_and_type() {
    let m = mix();
    let mut c = Checks::default();
    for (which, text) in [("main", &m.scrape), ("limits", &m.limits_scrape)] {
        let types = declared_types(text);
        let help = declared_help(text);
        let mut families = BTreeSet::new();
        for s in samples(text) {
            if s.name.starts_with("portico_") {
                families.insert(family_of(&s.name, &types));
            }
        }
        for f in &families {
            c.check(help.get(f).is_some_and(|h| !h.is_empty()), || {
                format!("{which}: no (or an empty) `# HELP {f}` line")
            });
            c.check(types.contains_key(f), || {
                format!("{which}: no `# TYPE {f}` line")
            });
        }
    }
    let types = declared_types(&m.scrape);
    let limits_types = declared_types(&m.limits_scrape);
    for (family, kind) in FAMILIES {
        let got = types.get(*family).or_else(|| limits_types.get(*family));
        c.check(got.map(String::as_str) == Some(*kind), || {
            format!("`# TYPE {family} {kind}` expected, got {got:?}")
        });
    }
    c.finish("HELP and TYPE lines");
}

// ---------------------------------------------------------------- Grafana

/// `portico_...` names in every `expr` and every string `query` (panel
/// targets and template variables) of the dashboard.
fn dashboard_metric_names() -> BTreeSet<String> {
    fn names_in(s: &str, out: &mut BTreeSet<String>) {
        let mut rest = s;
        while let Some(i) = rest.find("portico_") {
            let tail = &rest[i..];
            let end = tail
                .find(|ch: char| !(ch.is_ascii_lowercase() || ch == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            names_in(s, out)
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/portico.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut out = BTreeSet::new();
    walk(&json, &mut out);
    out
}

#[test]
fn every_metric_the_dashboard_uses_is_exported() {
    let names = dashboard_metric_names();
    assert!(
        names.len() >= 10,
        "only {names:?} found in grafana/portico.json"
    );
    let m = mix();
    let mut types = declared_types(&m.scrape);
    types.extend(declared_types(&m.limits_scrape));
    let mut live = BTreeSet::new();
    for s in samples(&m.scrape)
        .into_iter()
        .chain(samples(&m.limits_scrape))
    {
        live.insert(family_of(&s.name, &types));
    }
    let mut c = Checks::default();
    for name in &names {
        let family = family_of(name, &types);
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf))
            .filter(|b| FAMILIES.iter().any(|(f, k)| f == b && *k == "histogram"));
        let family = base.map(str::to_string).unwrap_or(family);
        c.check(live.contains(&family), || {
            format!("the dashboard queries {name} (family {family}), which the scrape after the mix does not export")
        });
        c.check(FAMILIES.iter().any(|(f, _)| *f == family), || {
            format!("the dashboard queries {name}, which is not a documented portico metric")
        });
    }
    c.finish(&format!("dashboard metrics ({} names)", names.len()));
}

// ---------------------------------------------------------------- JSON logs

fn json_lines(stderr: &str, c: &mut Checks) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => out.push(v),
            _ => c.fail(format!("not a JSON object: {line}")),
        }
    }
    out
}

#[test]
fn json_access_log_lines_carry_every_field() {
    let m = mix();
    let mut c = Checks::default();
    let lines = json_lines(&m.stderr, &mut c);
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["target"] == "portico::access")
        .collect();
    let http: Vec<&serde_json::Value> = access
        .iter()
        .copied()
        .filter(|v| v["kind"] == "http")
        .collect();
    let tunnel: Vec<&serde_json::Value> = access
        .iter()
        .copied()
        .filter(|v| v["kind"] == "tunnel")
        .collect();

    // One line per request, each with the documented fields and types.
    // (Requests cancelled before the response head: see
    // `requests_cancelled_before_the_response_head_are_counted`.)
    let http: Vec<&serde_json::Value> = http
        .into_iter()
        .filter(|v| v["location"] != "slow")
        .collect();
    let requests = requests_except_slow(&m.scrape);
    c.check(http.len() as f64 == requests, || {
        format!(
            "{} HTTP access lines, but {requests} requests counted",
            http.len()
        )
    });
    for v in &http {
        for (field, is_ok) in [
            (
                "site",
                serde_json::Value::is_string as fn(&serde_json::Value) -> bool,
            ),
            ("location", serde_json::Value::is_string),
            ("method", serde_json::Value::is_string),
            ("path", serde_json::Value::is_string),
            ("status", serde_json::Value::is_u64),
            ("protocol", serde_json::Value::is_string),
            ("bytes_in", serde_json::Value::is_u64),
            ("bytes_out", serde_json::Value::is_u64),
            ("duration_ms", serde_json::Value::is_number),
            ("client", serde_json::Value::is_string),
        ] {
            c.check(is_ok(&v[field]), || {
                format!("access line without a valid {field:?}: {v}")
            });
        }
        c.check(v["client"] == "127.0.0.1", || {
            format!("client is not 127.0.0.1: {v}")
        });
        // Responses with a body byte have first_byte_ms (a WebSocket's 101
        // has no body: its bytes_out are frames, and it has no first byte).
        if v["bytes_out"].as_u64().unwrap_or(0) > 0 && v["stream"] != "websocket" {
            c.check(v["first_byte_ms"].is_number(), || {
                format!("no first_byte_ms: {v}")
            });
        }
    }
    // The query string never reaches the log.
    c.check(!m.stderr.contains("s3cr3t"), || {
        "the query string (?secret=s3cr3t) shows up in the logs".to_string()
    });
    let count = |pred: &dyn Fn(&serde_json::Value) -> bool| http.iter().filter(|v| pred(v)).count();
    let plain_get_h1 = count(&|v| {
        v["site"] == "api"
            && v["location"] == "/plain"
            && v["method"] == "GET"
            && v["path"] == "/plain"
            && v["status"] == 200
            && v["protocol"] == "http1"
            && v["bytes_in"] == 0
            && v["bytes_out"] == 2
    });
    c.check(plain_get_h1 == N_GET_H1, || {
        format!("{plain_get_h1} access lines for GET /plain over http1 (path without query), want {N_GET_H1}")
    });
    let posts = count(&|v| {
        v["method"] == "POST" && v["bytes_in"] == POST_LEN as u64 && v["bytes_out"] == 2
    });
    c.check(posts == N_POST, || {
        format!("{posts} POST lines with bytes_in {POST_LEN}, want {N_POST}")
    });
    let sse_len = SSE_WRITES.concat().len() as u64;
    let sse =
        count(&|v| v["location"] == "events" && v["path"] == "/sse" && v["bytes_out"] == sse_len);
    c.check(sse == M_SSE, || {
        format!("{sse} SSE lines with bytes_out {sse_len}, want {M_SSE}")
    });
    let not_found = count(&|v| v["location"] == "none" && v["status"] == 404);
    c.check(not_found == N_404, || {
        format!("{not_found} 404 lines, want {N_404}")
    });
    let h2 = count(&|v| v["protocol"] == "h2" && v["location"] == "/plain");
    c.check(h2 == N_GET_H2 + 1, || {
        format!("{h2} h2 lines for /plain, want {}", N_GET_H2 + 1)
    });

    // Tunnel lines: one per tunnel that reached its backend.
    for (backend, up, down) in [
        ("tun_plain", m.hello_len + B_TUNNEL, B_TUNNEL),
        ("tun_pp", m.pp_hello_len + B_TUNNEL_PP, B_TUNNEL_PP),
    ] {
        let found: Vec<&&serde_json::Value> =
            tunnel.iter().filter(|v| v["backend"] == backend).collect();
        c.check(found.len() == 1, || {
            format!("{} tunnel lines for {backend}, want 1", found.len())
        });
        if let Some(v) = found.first() {
            c.check(v["route"].is_string(), || {
                format!("tunnel line without route: {v}")
            });
            c.check(v["bytes_up"] == up as u64, || {
                format!("bytes_up, want {up}: {v}")
            });
            c.check(v["bytes_down"] == down as u64, || {
                format!("bytes_down, want {down}: {v}")
            });
            c.check(v["duration_ms"].is_number(), || {
                format!("tunnel line without duration_ms: {v}")
            });
            c.check(v["cause"] == "eof", || format!("cause, want \"eof\": {v}"));
        }
    }
    c.finish("JSON access log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_overrides_log_level() {
    bounded(30, async {
        // RUST_LOG=warn hides the info line that names a port-0 listener's
        // port: this test picks its port in advance.
        let listen = free_addr();
        // Bound, never listening: connections are refused.
        let dead_port = DeadPort::new();
        let dead = dead_port.addr;
        let locations = format!(
            r#"
[[site.api.location]]
path = "/fixed"
respond = {{ status = 200, body = "fixed" }}

[[site.api.location]]
path = "/dead"
upstream = "dead"

[upstream.dead]
url = "http://{dead}"
"#
        );
        let log = "[log]\nlevel = \"info\"\nformat = \"json\"";
        let p = Portico::start_with_env(
            &api_config(listen, log, &locations),
            &[("RUST_LOG", "warn")],
        )
        .await;
        // One connection, one request after the other: a 502 logs a warning
        // while it is handled, so the warning of the last request shows that
        // the access lines of the requests before it would be written by then.
        let mut h = Client::connect(listen, Proto::H1).await;
        assert_eq!(h.get("/fixed").await.0, StatusCode::OK);
        assert_eq!(h.get("/dead").await.0, StatusCode::BAD_GATEWAY);
        assert_eq!(h.get("/dead").await.0, StatusCode::BAD_GATEWAY);
        drop(h);
        wait_for_stderr(&p, "\"WARN\"", 2, Duration::from_secs(3)).await;
        let stderr = p.stderr();
        let mut c = Checks::default();
        let lines = json_lines(&stderr, &mut c);
        c.check(
            lines.iter().filter(|v| v["level"] == "WARN").count() >= 2,
            || format!("no WARN line for each 502 with RUST_LOG=warn:\n{stderr}"),
        );
        for v in &lines {
            c.check(v["level"] == "WARN" || v["level"] == "ERROR", || {
                format!(
                    "RUST_LOG=warn, log.level=info: a {} line was written: {v}",
                    v["level"]
                )
            });
            c.check(v["target"] != "portico::access", || {
                format!("access line at RUST_LOG=warn: {v}")
            });
        }
        c.finish("RUST_LOG=warn over log.level = \"info\"");
    })
    .await;
}

// ---------------------------------------------------------------- cardinality

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_strings_never_become_label_values() {
    bounded(60, async {
        let listen = any_port();
        let p = Portico::start(&api_config(
            listen,
            "",
            r#"
[[site.api.location]]
path = "/fixed"
match = "exact"
respond = { status = 200, body = "fixed" }

[[site.api.location]]
path = "/pre/"
respond = { status = 200, body = "prefix" }
"#,
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");
        let rnd = pseudo_random(8 * 200, 0xca4d_1a11);
        let token = |i: usize| {
            let b = &rnd[i * 8..i * 8 + 8];
            format!("{:016x}", u64::from_le_bytes(b.try_into().unwrap()))
        };
        let mut sent_strings = Vec::new();
        let mut h1 = Client::connect(listen, Proto::H1).await;
        let mut h2 = Client::connect(listen, Proto::H2).await;
        // 50 extension methods (and wrong-case standard ones, which are different methods).
        for i in 0..50 {
            let method = match i {
                0 => "FOO".to_string(),
                1 => "BAR1".to_string(),
                2 => "get".to_string(),
                3 => "Post".to_string(),
                _ => format!("M{}", token(i).to_uppercase()),
            };
            sent_strings.push(method.clone());
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let c = if i % 2 == 0 { &mut h1 } else { &mut h2 };
            assert_eq!(
                c.call(m, "/fixed", empty()).await.0,
                StatusCode::OK,
                "{method}"
            );
        }
        // 50 paths no location matches, 20 under a prefix location.
        for i in 50..100 {
            let path = format!("/u{}/{}", token(i), token(i + 100));
            sent_strings.push(token(i));
            let c = if i % 2 == 0 { &mut h1 } else { &mut h2 };
            assert_eq!(c.get(&path).await.0, StatusCode::NOT_FOUND, "{path}");
        }
        for i in 0..20 {
            let path = format!("/pre/{}", token(150 + i));
            sent_strings.push(token(150 + i));
            let c = if i % 2 == 0 { &mut h1 } else { &mut h2 };
            assert_eq!(c.get(&path).await.0, StatusCode::OK, "{path}");
        }
        // 10 Host names the site does not serve (421).
        for i in 0..10 {
            let host = format!("h{}.example", token(170 + i));
            sent_strings.push(host.clone());
            let req = h1.request(Method::GET, "/fixed", &host, empty());
            let resp = h1.send(req).await;
            assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST, "{host}");
            let _ = resp.into_body().collect().await;
        }
        drop((h1, h2));
        let (text, _) =
            poll_metrics(&p, Duration::from_secs(2), |t| open_gauges(t).is_empty()).await;

        let mut c = Checks::default();
        let req = "portico_http_requests_total";
        let reqs: Vec<Sample> = samples(&text)
            .into_iter()
            .filter(|s| s.name == req)
            .collect();
        let methods: BTreeSet<&str> = reqs.iter().map(|s| s.label("method")).collect();
        let locations: BTreeSet<&str> = reqs.iter().map(|s| s.label("location")).collect();
        c.check(methods == BTreeSet::from(["GET", "OTHER"]), || {
            format!("method label values {methods:?}, want only GET and OTHER")
        });
        c.check(
            locations == BTreeSet::from(["/fixed", "/pre/", "none"]),
            || format!("location label values {locations:?}, want only /fixed, /pre/, none"),
        );
        c.sum(&text, req, &[("method", "OTHER")], 50.0);
        c.sum(&text, req, &[("location", "none"), ("status", "404")], 50.0);
        c.sum(&text, req, &[("location", "none"), ("status", "421")], 10.0);
        c.sum(&text, req, &[("location", "/pre/")], 20.0);
        // 2 locations + none, 2 methods, 3 statuses, 2 protocols at most.
        c.check(reqs.len() <= 10, || {
            format!(
                "{} series of portico_http_requests_total:\n{}",
                reqs.len(),
                dump(&text, req)
            )
        });
        for s in &sent_strings {
            c.check(!text.contains(s.as_str()), || {
                format!("the client's string {s:?} is in the scrape")
            });
        }
        let total_series = samples(&text).len();
        c.check(total_series < 400, || {
            format!("{total_series} series after 130 requests")
        });
        c.finish("label cardinality");
    })
    .await;
}
