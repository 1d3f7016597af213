//! `portico import`: the fixtures in tests/fixtures/import/ (built from the
//! public Xray + nginx setups portico replaces) convert to their reviewed
//! output, pass `portico check` with generated certificates, and the
//! converted config, run by the real binary, carries the traffic the old
//! chain did: tunnel names pass through with the PROXY version the fallback
//! asked for, API paths reach the upstream the nginx location named, SSE
//! streams arrive event by event and WebSockets work. Bad inputs get one
//! line naming the file and line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::{
    any_port, bounded, free_addr, insecure_connector, next_accepted, portico_check,
    portico_command, tls_connect, Expect, Portico, TempDir, TestCert, TlsEcho,
};

/// One step of a test (a handshake, a response, an event).
const STEP: Duration = Duration::from_secs(5);

const FIXTURES: [&str; 4] = ["cpa", "ollama", "openwebui", "nginx-docs"];

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The import arguments for a fixture, relative to the crate root (the
/// expected stderr names files that way).
fn fixture_args(name: &str) -> Vec<String> {
    let dir = format!("tests/fixtures/import/{name}");
    let mut args = Vec::new();
    if manifest().join(&dir).join("xray.json").exists() {
        args.push("--xray".to_string());
        args.push(format!("{dir}/xray.json"));
    }
    args.push("--nginx".to_string());
    args.push(format!("{dir}/nginx.conf"));
    args
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn import(args: &[String]) -> Run {
    let mut cmd = tokio::process::Command::from(portico_command());
    cmd.arg("import")
        .args(args)
        .current_dir(manifest())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("portico import did not finish within 10s")
        .expect("run portico import");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn import_fixture(name: &str) -> String {
    let run = import(&fixture_args(name)).await;
    assert_eq!(run.code, Some(0), "{name}: {}", run.stderr);
    run.stdout
}

fn assert_same(what: &str, got: &str, want: &str) {
    if got == want {
        return;
    }
    let first = got
        .lines()
        .zip(want.lines())
        .position(|(g, w)| g != w)
        .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
    panic!(
        "{what} differs from the reviewed file at line {}:\n  got:  {:?}\n  want: {:?}\n(IMPORT_BLESS=1 rewrites the expected files; review the diff)",
        first + 1,
        got.lines().nth(first),
        want.lines().nth(first)
    );
}

#[tokio::test]
async fn every_fixture_matches_its_reviewed_output() {
    for name in FIXTURES {
        let run = import(&fixture_args(name)).await;
        assert_eq!(run.code, Some(0), "{name}: {}", run.stderr);
        let dir = manifest().join("tests/fixtures/import").join(name);
        if std::env::var_os("IMPORT_BLESS").is_some() {
            std::fs::write(dir.join("expected.toml"), &run.stdout).expect("bless");
            std::fs::write(dir.join("expected.stderr"), &run.stderr).expect("bless");
            continue;
        }
        let want = std::fs::read_to_string(dir.join("expected.toml")).expect("expected.toml");
        assert_same(&format!("{name}/expected.toml"), &run.stdout, &want);
        let want = std::fs::read_to_string(dir.join("expected.stderr")).expect("expected.stderr");
        assert_same(&format!("{name}/expected.stderr"), &run.stderr, &want);
        // Every report line is `FILE:LINE: what: why` about an input file.
        for line in run.stderr.lines() {
            let mut parts = line.splitn(4, ':');
            let file = parts.next().unwrap_or_default();
            let lineno = parts.next().unwrap_or_default();
            assert!(
                file.starts_with(&format!("tests/fixtures/import/{name}/")),
                "{line}"
            );
            assert!(lineno.parse::<usize>().is_ok(), "{line}");
            assert!(parts.count() == 2, "{line}");
        }
    }
}

// ---------------------------------------------------------------- certificates and addresses

/// A certificate for `names`, written as PEM files under `dir`.
fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (String, String) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (cert.display().to_string(), key.display().to_string())
}

/// The generated config with its host paths and ports replaced by the
/// test's; each replaced text must be in it.
fn localize(config: &str, replace: &[(&str, String)]) -> String {
    let mut out = config.to_string();
    for (from, to) in replace {
        assert!(out.contains(from), "the config has no {from:?}:\n{out}");
        out = out.replace(from, to);
    }
    out
}

/// The certificate paths each fixture names and the names to cover.
fn fixture_certs(name: &str) -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    match name {
        "cpa" => vec![(
            "/etc/ssl/0d000721.xyz/fullchain.pem",
            "/etc/ssl/0d000721.xyz/privkey.pem",
            &["*.0d000721.xyz", "0d000721.xyz"],
        )],
        "openwebui" => vec![(
            "/etc/letsencrypt/live/server.com/fullchain.pem",
            "/etc/letsencrypt/live/server.com/privkey.pem",
            &["server.com"],
        )],
        "nginx-docs" => vec![(
            "/etc/nginx/tls/relay.example.com.crt",
            "/etc/nginx/tls/relay.example.com.key",
            &["relay.example.com", "*.relay.example.com"],
        )],
        _ => Vec::new(),
    }
}

fn with_certs(name: &str, config: &str, dir: &Path) -> String {
    let mut replace = Vec::new();
    for (i, (cert, key, names)) in fixture_certs(name).into_iter().enumerate() {
        let (c, k) = write_cert(dir, &format!("cert{i}"), names);
        replace.push((cert, c));
        replace.push((key, k));
    }
    localize(config, &replace)
}

#[tokio::test]
async fn every_fixture_passes_check_given_its_certificate_files() {
    for name in FIXTURES {
        let dir = TempDir::new();
        let config = with_certs(name, &import_fixture(name).await, dir.path());
        let path = dir.path().join("portico.toml");
        std::fs::write(&path, &config).expect("write config");
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(0), "{name}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains(": ok ("), "{name}: {}", out.stdout);
    }
}

// ---------------------------------------------------------------- an origin for the upstreams

/// An HTTP/1.1 origin standing in for an LLM relay: answers
/// `NAME METHOD PATH`, streams SSE (`Accept: text/event-stream`) with a
/// second event only after [`Origin::release`], and echoes WebSocket text
/// messages as `NAME: TEXT`.
struct Origin {
    /// As the config names it: `http://127.0.0.1:P` or `unix:/path`.
    url: String,
    release: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Origin {
    async fn tcp(name: &'static str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(origin_conn(s, name, r.clone()));
            }
        });
        Origin { url, release, task }
    }

    async fn unix(name: &'static str, path: &Path) -> Origin {
        let listener = UnixListener::bind(path).expect("bind unix origin");
        let url = format!("unix:{}", path.display());
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(origin_conn(s, name, r.clone()));
            }
        });
        Origin { url, release, task }
    }

    /// Let the SSE stream send its second event and finish.
    fn release(&self) {
        self.release.notify_one();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read up to the end of an HTTP head (bounded), returning it and any
/// bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf[end + 4..].to_vec();
            return Some((String::from_utf8_lossy(&buf[..end]).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

async fn origin_conn<S>(mut s: S, name: &'static str, release: Arc<Notify>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((head, rest)) = read_head(&mut s).await else {
        return;
    };
    let mut first = head.lines().next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    if header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        let key = header(&head, "sec-websocket-key").unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                if ws
                    .send(Message::text(format!("{name}: {t}")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        return;
    }
    // Drain a Content-Length request body.
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut have = rest.len();
    let mut chunk = [0u8; 4096];
    while have < len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
    if header(&head, "accept").is_some_and(|a| a.contains("text/event-stream")) {
        let start = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let one = "data: one\n\n";
        let two = format!("data: two from {name}\n\n");
        let first = format!("{start}{:x}\r\n{one}\r\n", one.len());
        if s.write_all(first.as_bytes()).await.is_err() || s.flush().await.is_err() {
            return;
        }
        // The stream stays open until the test has seen the first event.
        if tokio::time::timeout(Duration::from_secs(10), release.notified())
            .await
            .is_err()
        {
            return;
        }
        let end = format!("{:x}\r\n{two}\r\n0\r\n\r\n", two.len());
        let _ = s.write_all(end.as_bytes()).await;
        let _ = s.shutdown().await;
        return;
    }
    let body = format!("{name} {method} {path}");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

// ---------------------------------------------------------------- clients

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls(addr: std::net::SocketAddr, sni: &str) -> Tls {
    tls_connect(addr, &insecure_connector(&[b"http/1.1"]), sni)
        .await
        .0
}

/// One HTTP/1.1 request over TLS with `Connection: close`; the whole response.
async fn request(
    addr: std::net::SocketAddr,
    sni: &str,
    method: &str,
    path: &str,
    extra: &str,
) -> String {
    let mut s = tls(addr, sni).await;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {sni}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| {
            panic!("{method} {path} for {sni}: no complete response within {STEP:?}")
        })
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `path` reaches the origin `upstream` (its body names it).
async fn assert_reaches(addr: std::net::SocketAddr, sni: &str, path: &str, upstream: &str) {
    let resp = request(addr, sni, "GET", path, "").await;
    assert_eq!(status(&resp), 200, "GET {path}: {resp}");
    assert!(
        resp.ends_with(&format!("{upstream} GET {path}")),
        "GET {path} should reach {upstream}: {resp}"
    );
}

/// Over h2 (what Xray's `alpn: "h2"` fallback carried), `path` reaches
/// the origin `upstream` on the same site.
async fn assert_h2_reaches(addr: std::net::SocketAddr, sni: &str, path: &str, upstream: &str) {
    let (tls, _) = tls_connect(addr, &insecure_connector(&[b"h2"]), sni).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut client, conn) = tokio::time::timeout(STEP, h2::client::handshake(tls))
        .await
        .expect("h2 handshake timed out")
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("https://{sni}{path}"))
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(req, true).expect("send h2 request");
    let resp = tokio::time::timeout(STEP, resp)
        .await
        .expect("no h2 response within 5s")
        .expect("h2 response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, body.data())
        .await
        .expect("h2 body stalled")
    {
        let chunk = chunk.expect("h2 body");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("{upstream} GET {path}")
    );
    conn.abort();
}

/// A WebSocket over h2 (RFC 8441 extended CONNECT) on `path`, the way
/// portico replaces the separate "h2" fallback: one masked text frame to
/// the origin `upstream`, its echo back.
async fn assert_h2_websocket(addr: std::net::SocketAddr, sni: &str, path: &str, upstream: &str) {
    let (tls, _) = tls_connect(addr, &insecure_connector(&[b"h2"]), sni).await;
    let (client, conn) = tokio::time::timeout(STEP, h2::client::handshake(tls))
        .await
        .expect("h2 handshake timed out")
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = tokio::time::timeout(STEP, client.ready())
        .await
        .expect("h2 not ready")
        .expect("h2 ready");
    // A first request: its response comes after the server's SETTINGS,
    // which announce extended CONNECT.
    let get = http::Request::get(format!("https://{sni}/v1/models"))
        .body(())
        .expect("request");
    let (resp, _) = client.send_request(get, true).expect("send GET");
    tokio::time::timeout(STEP, resp)
        .await
        .expect("no h2 response within 5s")
        .expect("h2 response");
    assert!(client.is_extended_connect_protocol_enabled());
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{sni}{path}"))
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .body(())
        .expect("request");
    let (resp, mut send) = client.send_request(connect, false).expect("send CONNECT");
    let resp = tokio::time::timeout(STEP, resp)
        .await
        .expect("no answer to the extended CONNECT")
        .expect("extended CONNECT");
    assert_eq!(resp.status(), 200);
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | 5];
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    send.send_data(bytes::Bytes::from(frame), false)
        .expect("send frame");
    let want = format!("{upstream}: hello");
    let mut recv = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 2 + want.len() {
        let chunk = tokio::time::timeout(STEP, recv.data())
            .await
            .expect("no WebSocket echo over h2 within 5s")
            .expect("stream ended")
            .expect("h2 data");
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got[0], 0x81, "a final text frame");
    assert_eq!(usize::from(got[1]), want.len(), "unmasked, short length");
    assert_eq!(&got[2..2 + want.len()], want.as_bytes());
    conn.abort();
}

/// Read from `s` until `buf` holds `want` (bounded by STEP).
async fn read_until<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, want: &str) {
    let mut chunk = [0u8; 4096];
    let found = tokio::time::timeout(STEP, async {
        while !String::from_utf8_lossy(buf).contains(want) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    assert!(
        found,
        "never got {want:?}; got {:?}",
        String::from_utf8_lossy(buf)
    );
}

/// An SSE request: the first event must arrive while the origin still
/// holds the stream open (nothing buffered), the second after release.
async fn assert_sse(
    addr: std::net::SocketAddr,
    sni: &str,
    path: &str,
    origin: &Origin,
    upstream: &str,
) {
    let mut s = tls(addr, sni).await;
    let body = r#"{"stream":true}"#;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {sni}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send SSE request");
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, "data: one").await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("data: two"),
        "the upstream has not finished yet: {text}"
    );
    origin.release();
    read_until(&mut s, &mut buf, &format!("data: two from {upstream}")).await;
}

/// A WebSocket over HTTP/1.1 on `path`: a message goes to the origin
/// `upstream` and its echo comes back.
async fn assert_websocket(addr: std::net::SocketAddr, sni: &str, path: &str, upstream: &str) {
    let stream = tls(addr, sni).await;
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async(format!("wss://{sni}{path}"), stream),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake failed");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.expect("send");
    let msg = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("no WebSocket echo within 5s")
        .expect("WebSocket ended")
        .expect("WebSocket error");
    assert_eq!(msg, Message::text(format!("{upstream}: hello")));
}

/// TLS with SNI `name` passes through to `echo` (a TLS server of its own),
/// which reads a PROXY header of version `version` first.
async fn assert_passes(
    addr: std::net::SocketAddr,
    name: &str,
    events: &mut mpsc::UnboundedReceiver<common::Accepted>,
    version: u8,
) {
    let (mut s, local) = tls_connect(addr, &insecure_connector(&[b"h2"]), name).await;
    s.write_all(b"ping")
        .await
        .expect("write through the tunnel");
    let mut back = [0u8; 4];
    tokio::time::timeout(STEP, s.read_exact(&mut back))
        .await
        .expect("no echo through the tunnel")
        .expect("read echo");
    assert_eq!(&back, b"ping");
    let seen = next_accepted(events, STEP).await;
    assert_eq!(
        seen.sni.as_deref(),
        Some(name),
        "the tunnel server saw the client's own handshake"
    );
    let header = match &seen.proxy {
        Ok(Some(h)) => h.clone(),
        other => panic!("no PROXY header before the tunnel bytes: {other:?}"),
    };
    assert_eq!(header.version, version);
    assert_eq!(
        header.source,
        Some(local),
        "the PROXY header carries the client's address"
    );
}

/// Plain HTTP on the port-80 listener gets the 308 to https.
async fn assert_redirects(addr: std::net::SocketAddr, host: &str) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect :80");
    let req = format!("GET /chat?x=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut out))
        .await
        .expect("no redirect within 5s")
        .ok();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 308"), "{text}");
    assert!(
        text.contains(&format!("location: https://{host}/chat?x=1")),
        "{text}"
    );
}

// ---------------------------------------------------------------- traffic per fixture

#[tokio::test]
async fn cpa_layout_carries_tunnel_api_sse_and_codex_websocket() {
    bounded(60, async {
        let dir = TempDir::new();
        let cpa = Origin::tcp("cpa").await;
        let usage = Origin::tcp("usage").await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let xray = TlsEcho::start(
            "xray",
            &TestCert::generate(),
            &["h2", "http/1.1"],
            Expect::V1,
            tx,
        )
        .await;
        let listen = any_port();
        let config = localize(
            &with_certs("cpa", &import_fixture("cpa").await, dir.path()),
            &[
                ("0.0.0.0:443", listen.to_string()),
                ("127.0.0.1:10443", xray.addr.to_string()),
                ("http://127.0.0.1:8317", cpa.url.clone()),
                ("http://127.0.0.1:18317", usage.url.clone()),
            ],
        );
        let _portico = Portico::start(&config).await;
        let listen = _portico.addr();

        // The tunnel's name, and any name nothing else claims, reach Xray
        // with PROXY v1 as the fallbacks' xver 1 asked.
        assert_passes(listen, "tunnel.0d000721.xyz", &mut events, 1).await;
        assert_passes(listen, "other.0d000721.xyz", &mut events, 1).await;

        let api = "api.0d000721.xyz";
        for (path, upstream) in [
            ("/v1/models", "cpa"),
            ("/v1/chat/completions", "cpa"),
            ("/health", "usage"),
            ("/status", "usage"),
            ("/usage-service/stats", "usage"),
            ("/v0/management/usage-queue", "cpa"),
            ("/v0/management/usage", "usage"),
            ("/v0/management/usage/today", "usage"),
            ("/v0/management/model-prices", "usage"),
            ("/v0/management/model-prices/gpt", "usage"),
            ("/v0/management/config", "cpa"),
            ("/management.html", "cpa"),
        ] {
            assert_reaches(listen, api, path, upstream).await;
        }
        // The "API h2" fallback merged into the same site.
        assert_h2_reaches(listen, api, "/v0/management/usage", "usage").await;
        assert_h2_reaches(listen, api, "/v1/models", "cpa").await;
        assert_sse(listen, api, "/v1/responses", &cpa, "cpa").await;
        assert_websocket(listen, api, "/v1/responses", "cpa").await;
        assert_h2_websocket(listen, api, "/v1/responses", "cpa").await;
    })
    .await;
}

#[tokio::test]
async fn nginx_docs_layout_carries_stream_pass_and_terminated_relay() {
    bounded(60, async {
        let dir = TempDir::new();
        let relay = Origin::tcp("relay").await;
        let embeddings = Origin::unix("embeddings", &dir.path().join("embeddings.sock")).await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let tunnel = TlsEcho::start("tunnel", &TestCert::generate(), &["h2"], Expect::V1, tx).await;
        // The imported file names both ports; it is rewritten to these.
        let (listen, plain) = (free_addr(), free_addr());
        let config = localize(
            &with_certs(
                "nginx-docs",
                &import_fixture("nginx-docs").await,
                dir.path(),
            ),
            &[
                ("0.0.0.0:443", listen.to_string()),
                ("0.0.0.0:80", plain.to_string()),
                ("127.0.0.1:8443", tunnel.addr.to_string()),
                ("http://127.0.0.1:3000", relay.url.clone()),
                ("unix:/run/relay/embeddings.sock", embeddings.url.clone()),
            ],
        );
        let _portico = Portico::start(&config).await;

        // The stream block's `proxy_protocol on` is PROXY v1.
        assert_passes(listen, "tunnel.example.com", &mut events, 1).await;

        let name = "relay.example.com";
        assert_reaches(listen, name, "/v1/chat/completions", "relay").await;
        assert_reaches(listen, name, "/v1/embeddings", "embeddings").await;
        assert_reaches(listen, "eu.relay.example.com", "/anything", "relay").await;
        let health = request(listen, name, "GET", "/healthz", "").await;
        assert_eq!(status(&health), 200, "{health}");
        assert!(health.ends_with("ok"), "{health}");
        assert!(
            health
                .to_ascii_lowercase()
                .contains("strict-transport-security: max-age=31536000"),
            "add_header became a site header: {health}"
        );
        // allow/deny was not converted: the location refuses rather than opens.
        let admin = request(listen, name, "GET", "/admin/users", "").await;
        assert_eq!(status(&admin), 403, "{admin}");
        assert_sse(listen, name, "/v1/stream", &relay, "relay").await;
        assert_websocket(listen, name, "/v1/realtime", "relay").await;
        assert_redirects(plain, name).await;
    })
    .await;
}

#[tokio::test]
async fn ollama_block_carries_sse_and_cors() {
    bounded(60, async {
        let ollama = Origin::tcp("ollama").await;
        let listen = any_port();
        let config = localize(
            &import_fixture("ollama").await,
            &[
                ("0.0.0.0:443", listen.to_string()),
                ("http://host.docker.internal:11434", ollama.url.clone()),
            ],
        );
        let _portico = Portico::start(&config).await;
        let listen = _portico.addr();
        // No server_name: the site takes any name (self-signed certificate).
        assert_reaches(listen, "ollama.test", "/api/tags", "ollama").await;
        let resp = request(
            listen,
            "ollama.test",
            "GET",
            "/api/tags",
            "Origin: https://chat.example\r\n",
        )
        .await;
        assert!(
            resp.to_ascii_lowercase()
                .contains("access-control-allow-origin: https://chat.example"),
            "{resp}"
        );
        let pre = request(
            listen,
            "ollama.test",
            "OPTIONS",
            "/api/chat",
            "Origin: https://chat.example\r\nAccess-Control-Request-Method: POST\r\n",
        )
        .await;
        assert!((200..300).contains(&status(&pre)), "{pre}");
        assert!(
            pre.to_ascii_lowercase()
                .contains("access-control-allow-origin: https://chat.example"),
            "{pre}"
        );
        assert!(
            pre.to_ascii_lowercase()
                .contains("access-control-allow-methods: get, post, put, delete, options"),
            "the methods nginx allowed: {pre}"
        );
        assert_sse(listen, "ollama.test", "/api/generate", &ollama, "ollama").await;
    })
    .await;
}

#[tokio::test]
async fn openwebui_block_carries_sse_websocket_and_redirect() {
    bounded(60, async {
        let dir = TempDir::new();
        let webui = Origin::tcp("webui").await;
        // The imported file names both ports; it is rewritten to these.
        let (listen, plain) = (free_addr(), free_addr());
        let config = localize(
            &with_certs("openwebui", &import_fixture("openwebui").await, dir.path()),
            &[
                ("0.0.0.0:443", listen.to_string()),
                ("0.0.0.0:80", plain.to_string()),
                ("http://localhost:3000", webui.url.clone()),
            ],
        );
        let _portico = Portico::start(&config).await;
        assert_reaches(listen, "server.com", "/api/models", "webui").await;
        assert_sse(
            listen,
            "server.com",
            "/api/chat/completions",
            &webui,
            "webui",
        )
        .await;
        assert_websocket(
            listen,
            "server.com",
            "/ws/socket.io/?EIO=4&transport=websocket",
            "webui",
        )
        .await;
        assert_redirects(plain, "server.com").await;
    })
    .await;
}

// ---------------------------------------------------------------- bad input

/// Exit 1 and exactly one stderr line, starting `FILE:LINE:`.
async fn assert_fails_at(args: &[String], file: &Path, line: usize) -> String {
    let run = import(args).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stdout.is_empty(),
        "no config is written: {}",
        run.stdout
    );
    let text = run.stderr.trim_end();
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let prefix = format!("{}:{line}: ", file.display());
    assert!(text.starts_with(&prefix), "want {prefix:?}...: {text}");
    text.to_string()
}

fn arg(flag: &str, path: &Path) -> Vec<String> {
    vec![flag.to_string(), path.display().to_string()]
}

#[tokio::test]
async fn truncated_xray_json_is_one_line_with_file_and_line() {
    let dir = TempDir::new();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        "{\n  // comments are fine\n  \"inbounds\": [\n    {\"port\": 443, \"protocol\": \"vless\",\n",
    )
    .expect("write");
    assert_fails_at(&arg("--xray", &path), &path, 4).await;
}

#[tokio::test]
async fn unclosed_nginx_block_names_the_line_that_opened_it() {
    let dir = TempDir::new();
    let path = dir.path().join("nginx.conf");
    std::fs::write(
        &path,
        "http {\n    server {\n        listen 443 ssl;\n        location / {\n            proxy_pass http://127.0.0.1:3000;\n        }\n    }\n",
    )
    .expect("write");
    let msg = assert_fails_at(&arg("--nginx", &path), &path, 1).await;
    assert!(msg.contains("not closed"), "{msg}");
}

#[tokio::test]
async fn missing_include_names_the_include_line() {
    let dir = TempDir::new();
    let path = dir.path().join("nginx.conf");
    std::fs::write(
        &path,
        "http {\n    include conf.d/*.conf;\n    include sites-enabled/api;\n}\n",
    )
    .expect("write");
    let msg = assert_fails_at(&arg("--nginx", &path), &path, 3).await;
    assert!(msg.contains("sites-enabled/api"), "{msg}");
}

#[tokio::test]
async fn fallback_dest_matching_no_server_is_a_warning_and_stays_with_xray() {
    let dir = TempDir::new();
    let xray = dir.path().join("xray.json");
    let nginx = dir.path().join("nginx.conf");
    std::fs::write(
        &xray,
        r#"{
  "inbounds": [{
    "port": 443, "protocol": "vless",
    "settings": {"fallbacks": [
      {"name": "api.example.com", "dest": 8003, "xver": 2},
      {"name": "old.example.com", "dest": 9999, "xver": 2}
    ]},
    "streamSettings": {"security": "tls", "tlsSettings": {"certificates": [
      {"certificateFile": "/etc/ssl/example.pem", "keyFile": "/etc/ssl/example.key"}
    ]}}
  }]
}
"#,
    )
    .expect("write");
    std::fs::write(
        &nginx,
        "http {\n  server {\n    listen 8003;\n    server_name api.example.com;\n    location / { proxy_pass http://127.0.0.1:3000; }\n  }\n}\n",
    )
    .expect("write");
    let mut args = arg("--xray", &xray);
    args.extend(arg("--nginx", &nginx));
    let run = import(&args).await;
    assert_eq!(run.code, Some(0), "a warning, not an error: {}", run.stderr);
    let warning = format!(
        "{}:6: fallback name old.example.com dest 9999: dest matches no listen",
        xray.display()
    );
    assert!(
        run.stderr.lines().any(|l| l.starts_with(&warning)),
        "want a line starting {warning:?}:\n{}",
        run.stderr
    );
    let cfg: toml::Table = toml::from_str(&run.stdout).expect("TOML");
    let routes = cfg["route"].as_array().expect("routes");
    let pass_old = routes.iter().any(|r| {
        r.get("sni")
            .and_then(|s| s.as_array())
            .is_some_and(|s| s[0].as_str() == Some("old.example.com"))
            && r.get("pass").is_some()
    });
    assert!(pass_old, "old.example.com stays with Xray: {}", run.stdout);
    let terminate_api = routes.iter().any(|r| {
        r.get("sni")
            .and_then(|s| s.as_array())
            .is_some_and(|s| s[0].as_str() == Some("api.example.com"))
            && r.get("terminate").is_some()
    });
    assert!(
        terminate_api,
        "api.example.com becomes a site: {}",
        run.stdout
    );
    let backend = &cfg["backend"]["xray"];
    assert_eq!(backend["proxy_protocol"].as_str(), Some("v2"), "xver 2");
}

#[tokio::test]
async fn no_input_is_an_error() {
    let run = import(&[]).await;
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("nothing to import"), "{}", run.stderr);
}

#[tokio::test]
async fn output_file_gets_the_config_and_stdout_stays_empty() {
    let dir = TempDir::new();
    let out = dir.path().join("portico.toml");
    let mut args = fixture_args("openwebui");
    args.push("-o".into());
    args.push(out.display().to_string());
    let run = import(&args).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let written = std::fs::read_to_string(&out).expect("written");
    assert_eq!(written, import_fixture("openwebui").await);
}

#[tokio::test]
async fn an_input_with_nothing_to_convert_is_an_error() {
    let dir = TempDir::new();
    let path = dir.path().join("nginx.conf");
    std::fs::write(
        &path,
        "events {}\nhttp {\n    server {\n        listen 80;\n        root /srv/www;\n    }\n}\n",
    )
    .expect("write");
    let run = import(&arg("--nginx", &path)).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("{}:1: nothing to convert", path.display())),
        "{}",
        run.stderr
    );
    // What was found is still reported, line by line.
    assert!(
        run.stderr
            .contains(&format!("{}:3: server (no server_name)", path.display())),
        "{}",
        run.stderr
    );
}
