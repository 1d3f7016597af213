//! Protocol correctness at the edges (issue 16): the metrics the dashboard
//! queries exist from start-up; ALPN decides how a connection is spoken;
//! malformed h2 requests are refused before anything reaches an upstream;
//! h2 early responses reach the client (RST_STREAM NO_ERROR after them);
//! every 426 names the protocol; failed TLS handshakes are logged.
//!
//! The h2 tests speak raw frames (tests/h2raw): the `h2` crate's client
//! cannot send malformed input.

mod common;
mod h2raw;
mod standin;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{
    any_port, any_port_v6, api_config, bounded, insecure_connector, tls_connect, DeadPort, Portico,
    RecordingUpstream,
};
use standin::{Script, Standin, Upgrades};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Metric names in a Prometheus text scrape (histogram series folded into
/// their family name).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(family)
        .collect()
}

fn family(name: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base.to_string();
        }
    }
    name.to_string()
}

/// Every `portico_*` metric name the Grafana dashboard's queries use.
fn dashboard_names() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/portico.json");
    let text = std::fs::read_to_string(path).expect("read grafana/portico.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(!exprs.is_empty(), "no queries found in {path}");
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("portico_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(family(&tail[..end]));
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A config that names one of everything: a passthrough route and backend,
/// a terminated site with an upstream location, a redirect listener, and a
/// listener that accepts PROXY headers.
fn everything_config(
    listen: SocketAddr,
    plain: SocketAddr,
    backend: SocketAddr,
    upstream: SocketAddr,
) -> String {
    api_config(
        listen,
        &format!(
            r#"
[[listen]]
addr = "{plain}"
accept_proxy = true
trusted = ["127.0.0.1/32"]

[[route]]
sni = ["tunnel.test"]
pass = "tunnel"

[[route]]
protocol = "http"
redirect = "https"

[backend.tunnel]
addr = "{backend}"
"#
        ),
        &format!(
            r#"
[[site.api.location]]
name = "responses"
path = "/v1/"
upstream = "relay"

[upstream.relay]
url = "http://{upstream}"
"#
        ),
    )
}

#[tokio::test]
async fn dashboard_metrics_exist_from_start() {
    bounded(60, async {
        let upstream = RecordingUpstream::start().await;
        let listen = any_port();
        // The second listener on [::1]: two `127.0.0.1:0` would be one address.
        let plain = any_port_v6();
        let backend = DeadPort::new();
        let portico =
            Portico::start(&everything_config(listen, plain, backend.addr, upstream.addr)).await;
        let text = portico.metrics_text().await;
        let scraped = scraped_names(&text);
        let wanted = dashboard_names();
        let missing: Vec<_> = wanted.difference(&scraped).collect();
        assert!(
            missing.is_empty(),
            "metrics the dashboard queries but a fresh instance does not expose: {missing:?}\n--- scrape ---\n{text}"
        );
        // And they are zero: nothing happened yet.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if name.ends_with("_total") && !name.starts_with("portico_config_reloads") {
                assert_eq!(value, "0", "{series} is not 0 at start");
            }
        }
    })
    .await;
}

/// Bound on any single step that should be immediate on loopback.
const STEP: Duration = Duration::from_secs(10);

/// portico with one site `api` whose `/` goes to a recording upstream.
async fn recorded_site(extra_site: &str) -> (Portico, SocketAddr, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await;
    let listen = any_port();
    let config = api_config(
        listen,
        "",
        &format!(
            r#"{extra_site}
[[site.api.location]]
path = "/"
upstream = "relay"

[upstream.relay]
url = "http://{}"
"#,
            upstream.addr
        ),
    );
    let portico = Portico::start(&config).await;
    let listen = portico.addr();
    (portico, listen, upstream)
}

fn get_fields<'a>(path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    request_fields("GET", path, extra)
}

/// A request's fields for `api.test`, pseudo-headers first.
fn request_fields<'a>(
    method: &'a str,
    path: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut f = vec![
        (":method", method),
        (":scheme", "https"),
        (":authority", "api.test"),
        (":path", path),
    ];
    f.extend_from_slice(extra);
    f
}

/// A request the upstream must never see: the exact error on the stream
/// (PROTOCOL_ERROR reset or a 400), and nothing forwarded.
async fn assert_h2_refused(fields: &[(&str, &str)], what: &str) {
    let (_p, listen, upstream) = recorded_site("").await;
    let mut c = h2raw::Conn::tls(listen, "api.test", &[b"h2"]).await;
    assert_eq!(c.alpn().as_deref(), Some(&b"h2"[..]));
    c.handshake().await;
    c.send_headers(1, fields, true).await;
    let (f, seen) = c
        .until(STEP, |f| {
            (f.stream == 1 && (f.kind == h2raw::HEADERS || f.kind == h2raw::RST_STREAM))
                || f.kind == h2raw::GOAWAY
        })
        .await;
    match f.kind {
        h2raw::HEADERS => {
            let fields = c.decode(&f);
            assert!(
                fields.iter().any(|(n, v)| n == ":status" && v == "400"),
                "{what}: expected 400, got {fields:?}"
            );
        }
        _ => assert_eq!(
            f.error_code(),
            Some(h2raw::PROTOCOL_ERROR),
            "{what}: expected PROTOCOL_ERROR, got {f:?} after {seen:?}"
        ),
    }
    // A well-formed request on a new connection still works, and proves
    // the upstream was reachable all along.
    let mut ok = h2raw::Conn::tls(listen, "api.test", &[b"h2"]).await;
    ok.handshake().await;
    ok.send_headers(1, &get_fields("/fine", &[]), true).await;
    let (status, _) = ok.response_status(1, STEP).await;
    assert_eq!(status, 200, "{what}: the control request failed");
    let rec = upstream.snapshot();
    let targets: Vec<_> = rec.requests.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/fine"], "{what}: the upstream saw {targets:?}");
}

#[tokio::test]
async fn h2_field_values_with_surrounding_whitespace_are_malformed() {
    bounded(60, async {
        for (name, value) in [
            ("x-padded", " leading"),
            ("x-padded", "trailing "),
            ("x-padded", "\ttab"),
            ("user-agent", "ua\t"),
        ] {
            assert_h2_refused(
                &get_fields("/ws", &[(name, value)]),
                &format!("{name}: {value:?}"),
            )
            .await;
        }
    })
    .await;
}

#[tokio::test]
async fn h2_host_that_differs_from_authority_is_400() {
    bounded(60, async {
        assert_h2_refused(
            &get_fields("/host", &[("host", "other.test")]),
            "host != :authority",
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn h2_connection_with_a_bad_preface_gets_goaway() {
    bounded(60, async {
        let (_p, listen, upstream) = recorded_site("").await;
        let mut c = h2raw::Conn::tls(listen, "api.test", &[b"h2"]).await;
        c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").await;
        let (f, _) = c.until(STEP, |f| f.kind == h2raw::GOAWAY).await;
        assert_eq!(f.error_code(), Some(h2raw::PROTOCOL_ERROR), "{f:?}");
        assert!(
            c.next(STEP).await.is_none(),
            "connection stayed open after GOAWAY"
        );
        assert_eq!(upstream.snapshot().connections, 0);
    })
    .await;
}

#[tokio::test]
async fn alpn_h2_then_http1_gets_goaway_and_nothing_is_forwarded() {
    bounded(60, async {
        let (_p, listen, upstream) = recorded_site("").await;
        let mut c = h2raw::Conn::tls(listen, "api.test", &[b"h2"]).await;
        assert_eq!(c.alpn().as_deref(), Some(&b"h2"[..]));
        // Content-Length with Transfer-Encoding: refused on http/1.1 too.
        c.send(
            b"POST /smuggle HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await;
        let (f, _) = c.until(STEP, |f| f.kind == h2raw::GOAWAY).await;
        assert_eq!(f.error_code(), Some(h2raw::PROTOCOL_ERROR), "{f:?}");
        assert!(c.next(STEP).await.is_none(), "connection stayed open after GOAWAY");
        assert_eq!(upstream.snapshot().connections, 0, "something was forwarded");
    })
    .await;
}

#[tokio::test]
async fn alpn_http1_then_h2_preface_is_400() {
    bounded(60, async {
        let (_p, listen, upstream) = recorded_site("").await;
        let mut c = h2raw::Conn::tls(listen, "api.test", &[b"http/1.1"]).await;
        assert_eq!(c.alpn().as_deref(), Some(&b"http/1.1"[..]));
        c.handshake().await;
        let mut get = c.headers_frame(1, &get_fields("/h2", &[]), true);
        c.send(&std::mem::take(&mut get)).await;
        let rest = c.read_rest(STEP).await;
        let text = String::from_utf8_lossy(&rest);
        assert!(text.starts_with("HTTP/1.1 400 "), "got {text:?}");
        assert_eq!(
            upstream.snapshot().connections,
            0,
            "something was forwarded"
        );
    })
    .await;
}

#[tokio::test]
async fn no_alpn_still_detects_both() {
    bounded(60, async {
        let (_p, listen, upstream) = recorded_site("").await;
        let mut c = h2raw::Conn::tls(listen, "api.test", &[]).await;
        assert_eq!(c.alpn(), None);
        c.handshake().await;
        c.send_headers(1, &get_fields("/prior-knowledge", &[]), true)
            .await;
        let (status, _) = c.response_status(1, STEP).await;
        assert_eq!(status, 200);
        let mut c = h2raw::Conn::tls(listen, "api.test", &[]).await;
        c.send(b"GET /h1 HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
            .await;
        let text = String::from_utf8_lossy(&c.read_rest(STEP).await).into_owned();
        assert!(text.starts_with("HTTP/1.1 200 "), "got {text:?}");
        let rec = upstream.snapshot();
        let targets: Vec<_> = rec.requests.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["/prior-knowledge", "/h1"]);
    })
    .await;
}

// ---------------------------------------------------------------- WebSocket: auto, 426

/// portico with `/v1/` to a stand-in, the location's websocket setting as given.
async fn ws_site(standin: &Standin, websocket: &str) -> (Portico, SocketAddr) {
    let listen = any_port();
    let config = api_config(
        listen,
        "",
        &format!(
            r#"
[[site.api.location]]
name = "responses"
path = "/v1/"
upstream = "relay"
{websocket}

[upstream.relay]
url = "http://{}"
"#,
            standin.addr
        ),
    );
    let portico = Portico::start(&config).await;
    let listen = portico.addr();
    (portico, listen)
}

/// An HTTP/1.1 WebSocket upgrade over TLS; returns the response head and
/// what followed it until the connection closed (or 2 s passed).
async fn upgrade(listen: SocketAddr) -> (String, String) {
    let (mut tls, _) = tls_connect(listen, &insecure_connector(&[b"http/1.1"]), "api.test").await;
    tls.write_all(
        b"GET /v1/responses HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("send upgrade");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if head.starts_with("HTTP/1.1 101") {
                return (head, String::new());
            }
        }
        match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// An HTTP/1.1 POST over TLS with `Connection: close`; returns the status.
async fn post_status(listen: SocketAddr, path: &str, body: &[u8]) -> u16 {
    let (mut tls, _) = tls_connect(listen, &insecure_connector(&[b"http/1.1"]), "api.test").await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: api.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("send head");
    tls.write_all(body).await.expect("send body");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[tokio::test]
async fn auto_answers_426_for_a_relay_without_websocket_and_remembers() {
    bounded(60, async {
        let relay = Standin::start(Upgrades::Refuse(404), Script::standard()).await;
        let (portico, listen) = ws_site(&relay, "").await;
        let (head, body) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert_eq!(header(&head, "upgrade"), Some("websocket"), "{head}");
        assert!(
            !body.contains("not supported here"),
            "the upstream's body was relayed: {body}"
        );
        assert_eq!(relay.log().upgrades_refused, 1);
        // Remembered: the next upgrades get 426 without asking the relay.
        for _ in 0..3 {
            let (head, _) = upgrade(listen).await;
            assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
            assert_eq!(header(&head, "upgrade"), Some("websocket"), "{head}");
        }
        assert_eq!(relay.log().upgrades_refused, 1, "the relay was asked again");
        // Plain HTTP to the same location still works.
        let status = post_status(listen, "/v1/responses", br#"{"stream":true,"input":"hi"}"#).await;
        assert_eq!(status, 200);
        // A reload forgets.
        portico.signal("HUP");
        portico
            .wait_metric_at_least(
                "portico_config_reloads_total",
                &[("result", "ok")],
                1.0,
                STEP,
            )
            .await;
        let (head, _) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert_eq!(relay.log().upgrades_refused, 2, "a reload keeps the memory");
    })
    .await;
}

#[tokio::test]
async fn auto_asks_again_after_websocket_recheck_and_a_101_clears() {
    bounded(60, async {
        let relay = Standin::start(Upgrades::Refuse(405), Script::standard()).await;
        let (_portico, listen) = ws_site(&relay, r#"websocket_recheck = "300ms""#).await;
        let (head, _) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        relay.set_upgrades(Upgrades::Accept);
        let (head, _) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "remembered: {head}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (head, _) = upgrade(listen).await;
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "asked again after the recheck time: {head}"
        );
        relay.set_upgrades(Upgrades::Refuse(405));
        // The 101 cleared the memory: the relay is asked (and refuses).
        let before = relay.log().upgrades_refused;
        let (head, _) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert_eq!(relay.log().upgrades_refused, before + 1);
    })
    .await;
}

#[tokio::test]
async fn websocket_true_passes_the_refusal_through_and_false_is_426() {
    bounded(60, async {
        let relay = Standin::start(Upgrades::Refuse(404), Script::standard()).await;
        let (_p, listen) = ws_site(&relay, "websocket = true").await;
        for n in 1..=2 {
            let (head, body) = upgrade(listen).await;
            assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
            assert!(body.contains("not supported here"), "{body}");
            assert_eq!(relay.log().upgrades_refused, n);
        }
        let (_p, listen) = ws_site(&relay, "websocket = false").await;
        let (head, _) = upgrade(listen).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert_eq!(header(&head, "upgrade"), Some("websocket"), "{head}");
        assert_eq!(
            relay.log().upgrades_refused,
            2,
            "websocket = false asked the relay"
        );
    })
    .await;
}

#[tokio::test]
async fn websocket_turns_are_timed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    bounded(60, async {
        let script = Script::standard();
        let relay = Standin::start(Upgrades::Accept, script.clone()).await;
        let (portico, listen) = ws_site(&relay, "").await;
        let (tls, _) = tls_connect(listen, &insecure_connector(&[b"http/1.1"]), "api.test").await;
        let (mut ws, _) = tokio_tungstenite::client_async("wss://api.test/v1/responses", tls)
            .await
            .expect("WebSocket handshake");
        for turn in 0..2 {
            let sent = std::time::Instant::now();
            ws.send(Message::text(
                r#"{"type":"response.create","model":"m","input":[]}"#,
            ))
            .await
            .expect("send");
            let mut first = None;
            loop {
                let msg = tokio::time::timeout(STEP, ws.next())
                    .await
                    .expect("event")
                    .expect("open")
                    .expect("message");
                first.get_or_insert(sent.elapsed());
                if msg.to_text().unwrap_or("").contains("response.completed") {
                    break;
                }
            }
            eprintln!("turn {turn}: first event after {:?}", first);
        }
        ws.close(None).await.expect("close");
        let labels = [("site", "api"), ("location", "responses")];
        portico
            .wait_metric_at_least(
                "portico_websocket_response_seconds_count",
                &labels,
                2.0,
                STEP,
            )
            .await;
        // Each turn's first event comes at once (the deltas pause, not the
        // first event), so every turn is under 1 s.
        let under = portico
            .metric(
                "portico_websocket_response_seconds_bucket",
                &[labels[0], labels[1], ("le", "1")],
            )
            .await;
        assert_eq!(under, 2.0);
        // The session's access log line: messages each way, turn times.
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let log = portico.stderr();
            if let Some(line) = log.lines().find(|l| l.contains("status=101")) {
                for want in [
                    "ws_messages_in=2",
                    "ws_messages_out=",
                    "ws_turns=2",
                    "ws_response_median_ms=",
                    "ws_response_max_ms=",
                ] {
                    assert!(line.contains(want), "{want} missing in {line}");
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no access log line for the session:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------- TLS handshake failure logs

#[tokio::test]
async fn failed_handshakes_are_logged_once_per_client_per_minute() {
    bounded(60, async {
        let (portico, listen, _up) = recorded_site("").await;
        // A client that trusts only another CA (with a name of its own)
        // rejects portico's certificate.
        let strict = other_ca_connector();
        for _ in 0..3 {
            let tcp = common::connect(listen).await;
            let name = rustls::pki_types::ServerName::try_from("api.test").expect("name");
            let r = tokio::time::timeout(STEP, strict.connect(name, tcp))
                .await
                .expect("handshake ends");
            assert!(
                r.is_err(),
                "the client accepted a certificate it does not trust"
            );
        }
        portico
            .wait_metric_at_least(
                "portico_tls_handshake_failures_total",
                &[("site", "api")],
                3.0,
                STEP,
            )
            .await;
        let log = portico.stderr();
        let lines: Vec<_> = log
            .lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .collect();
        assert_eq!(lines.len(), 1, "one line per client per minute:\n{log}");
        let line = lines[0];
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("client rejected the certificate: UnknownCA"),
            "{line}"
        );
        assert!(line.contains("sni=\"api.test\""), "{line}");
        assert!(line.contains("client=127.0.0.1:"), "{line}");
    })
    .await;
}

/// A TLS client whose only root is a fresh CA named "another CA".
fn other_ca_connector() -> tokio_rustls::TlsConnector {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "another CA");
    let ca = params.self_signed(&key).expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

// ---------------------------------------------------------------- h2 early responses

/// `curl --http2` uploading `size` bytes; returns (exit code, status, stderr).
fn curl_upload(listen: SocketAddr, path: &str, size: usize) -> (i32, String, String) {
    curl_upload_as(listen, path, size, false)
}

/// [`curl_upload`]; `from_stdin` streams the body from stdin (`-T -`), so the
/// request declares no length and the limit cuts it while it streams.
fn curl_upload_as(
    listen: SocketAddr,
    path: &str,
    size: usize,
    from_stdin: bool,
) -> (i32, String, String) {
    let dir = common::TempDir::new();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, common::pseudo_random(size, 7)).expect("write upload");
    let mut cmd = std::process::Command::new("curl");
    if from_stdin {
        cmd.arg("-T")
            .arg("-")
            .stdin(std::fs::File::open(&file).expect("open upload"));
    } else {
        cmd.arg("--data-binary").arg(format!("@{}", file.display()));
    }
    let out = cmd
        .args([
            "--http2",
            "-sS",
            "-k",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("api.test:{}:127.0.0.1", listen.port()))
        .arg(format!("https://api.test:{}{path}", listen.port()))
        .output()
        .expect("run curl (installed by scripts/test-all)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An upstream that answers every request with 401 without reading its body.
async fn unauthorized_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    unauthorized_upstream_after(Duration::ZERO).await
}

const UNAUTHORIZED_HEAD: &str =
    "HTTP/1.1 401 Unauthorized\r\ncontent-length: 13\r\nconnection: close\r\n\r\n";

/// As [`unauthorized_upstream`], with the 13-byte body `body_after` the head.
async fn unauthorized_upstream_after(
    body_after: Duration,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    canned_upstream(UNAUTHORIZED_HEAD, Some(("unauthorized\n", body_after))).await
}

/// An upstream that answers every request with `head` once the request's
/// head is in, without reading its body. `body` follows after its delay,
/// and the socket stays open a moment, unread, as a relay's would; without
/// one the connection closes right after the head.
async fn canned_upstream(
    head: &'static str,
    body: Option<(&'static str, Duration)>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                match body {
                    Some((body, after)) if after.is_zero() => {
                        let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
                    }
                    Some((body, after)) => {
                        let _ = s.write_all(head.as_bytes()).await;
                        tokio::time::sleep(after).await;
                        let _ = s.write_all(body.as_bytes()).await;
                    }
                    None => {
                        let _ = s.write_all(head.as_bytes()).await;
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn h2_early_401_from_the_upstream_reaches_curl() {
    bounded(60, async {
        let (addr, task) = unauthorized_upstream().await;
        let listen = any_port();
        let config = api_config(
            listen,
            "",
            &format!(
                r#"
[[site.api.location]]
path = "/"
upstream = "relay"

[upstream.relay]
url = "http://{addr}"
"#
            ),
        );
        let p = Portico::start(&config).await;
        let listen = p.addr();
        let (code, status, err) =
            tokio::task::spawn_blocking(move || curl_upload(listen, "/v1/responses", 2 << 20))
                .await
                .expect("curl");
        assert_eq!((code, status.as_str()), (0, "401"), "curl: {err}");
        task.abort();
    })
    .await;
}

/// portico with one site whose location forwards to the upstream at `addr`,
/// and a raw h2 client connected to it (handshake done).
async fn h2_to_relay(addr: SocketAddr) -> (Portico, h2raw::Conn) {
    let config = api_config(
        any_port(),
        "",
        &format!(
            "[[site.api.location]]\npath = \"/\"\nupstream = \"relay\"\n\n[upstream.relay]\nurl = \"http://{addr}\"\n"
        ),
    );
    let p = Portico::start(&config).await;
    let mut c = h2raw::Conn::tls(p.addr(), "api.test", &[b"h2"]).await;
    c.handshake().await;
    (p, c)
}

/// What curl does on an early error status, made deterministic: the client
/// ends its upload short of its Content-Length as soon as it sees the
/// response head (h2 then resets the stream as malformed). The head must
/// therefore not go out ahead of a small body the upstream is still
/// sending: here the upstream's body follows its head by 300 ms, and the
/// client must still get the body before any reset.
#[tokio::test]
async fn h2_client_ending_its_upload_at_an_early_head_still_gets_the_body() {
    bounded(60, async {
        let (addr, task) = unauthorized_upstream_after(Duration::from_millis(300)).await;
        let (_p, mut c) = h2_to_relay(addr).await;
        let fields = request_fields("POST", "/v1/responses", &[("content-length", "100000")]);
        c.send_headers(1, &fields, false).await;
        c.send(&h2raw::frame(h2raw::DATA, 0, 1, &[b'x'; 1000]))
            .await;
        let (status, _) = c.response_status(1, STEP).await;
        assert_eq!(status, 401);
        // As curl does: stop sending, and end the stream where it is.
        c.send(&h2raw::frame(h2raw::DATA, h2raw::END_STREAM, 1, &[]))
            .await;
        let body = c.body(1, STEP).await.unwrap_or_else(|(rst, seen)| {
            panic!(
                "stream reset (error {:?}) before the body; frames before: {seen:?}",
                rst.error_code()
            )
        });
        assert_eq!(String::from_utf8_lossy(&body), "unauthorized\n");
        task.abort();
    })
    .await;
}

/// The other side of reading a small body before its head: an upstream
/// that sends a head and closes before any byte of its declared body is
/// answered 502 on h2 (nothing was sent yet), naming the cause.
#[tokio::test]
async fn h2_upstream_closing_before_a_small_body_is_a_502() {
    bounded(60, async {
        // Closes with none of the 13 bytes sent.
        let (addr, task) =
            canned_upstream("HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n", None).await;
        let (_p, mut c) = h2_to_relay(addr).await;
        let fields = get_fields("/v1/models", &[]);
        c.send_headers(1, &fields, true).await;
        let (status, _) = c.response_status(1, STEP).await;
        assert_eq!(status, 502);
        let body = c
            .body(1, STEP)
            .await
            .unwrap_or_else(|(rst, _)| panic!("502 reset: {rst:?}"));
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("upstream relay closed the connection"),
            "{body}"
        );
        task.abort();
    })
    .await;
}

/// curl (nghttp2) uploading more than `max_body` over h2 sees portico's
/// 413 and exits cleanly, with or without a Content-Length up front.
#[tokio::test]
async fn h2_upload_over_max_body_shows_curl_the_413() {
    bounded(60, async {
        // The recording upstream reads whole bodies: only the limit answers.
        let (_p, listen, _up) = recorded_site(r#"max_body = "1MiB""#).await;
        for from_stdin in [false, true] {
            let (code, status, err) = tokio::task::spawn_blocking(move || {
                curl_upload_as(listen, "/v1/responses", 2 << 20, from_stdin)
            })
            .await
            .expect("curl");
            assert_eq!(
                (code, status.as_str()),
                (0, "413"),
                "curl (length declared: {}): {err}",
                !from_stdin
            );
        }
    })
    .await;
}

#[tokio::test]
async fn h2_early_response_is_followed_by_no_error_reset() {
    bounded(60, async {
        let (_p, listen, _up) = recorded_site(r#"max_body = "1KiB""#).await;
        let mut c = h2raw::Conn::tls(listen, "api.test", &[b"h2"]).await;
        c.handshake().await;
        let len = "100000";
        let fields = request_fields("POST", "/upload", &[("content-length", len)]);
        c.send_headers(1, &fields, false).await;
        c.send(&h2raw::frame(h2raw::DATA, 0, 1, &[b'x'; 1000]))
            .await;
        let (status, _) = c.response_status(1, STEP).await;
        assert_eq!(status, 413);
        // The response ends first; any reset after it says NO_ERROR.
        if let Err((f, seen)) = c.body(1, STEP).await {
            panic!("stream reset before the response ended: {f:?} after {seen:?}");
        }
        if let Some(rst) = c
            .next(Duration::from_millis(500))
            .await
            .filter(|f| f.kind == h2raw::RST_STREAM)
        {
            assert_eq!(rst.error_code(), Some(h2raw::NO_ERROR), "{rst:?}");
        }
    })
    .await;
}

// ---------------------------------------------------------------- tunnels: close without close_notify

#[tokio::test]
async fn tls_client_closing_without_close_notify_ends_its_tunnel_cleanly() {
    bounded(60, async {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend_addr = backend.local_addr().expect("addr");
        let listen = any_port();
        let config = api_config(
            listen,
            &format!("[backend.vless]\naddr = \"{backend_addr}\"\n"),
            "non_http = \"vless\"\n[[site.api.location]]\npath = \"/\"\nrespond = { status = 200, body = \"ok\" }\n",
        );
        let portico = Portico::start(&config).await;
        let listen = portico.addr();
        let (mut tls, _) = tls_connect(listen, &insecure_connector(&[b"http/1.1"]), "api.test").await;
        tls.write_all(b"\x00\x01vless-bytes").await.expect("send");
        let (mut up, _) = tokio::time::timeout(STEP, backend.accept())
            .await
            .expect("backend got no connection")
            .expect("accept");
        let mut got = [0u8; 13];
        up.read_exact(&mut got).await.expect("backend read");
        // End the TCP stream (FIN) without a TLS close_notify.
        let (mut tcp, _) = tls.into_inner();
        tcp.shutdown().await.expect("shutdown");
        let deadline = std::time::Instant::now() + STEP;
        let line = loop {
            let log = portico.stderr();
            if let Some(l) = log.lines().find(|l| l.contains("tunnel closed")) {
                break l.to_string();
            }
            assert!(std::time::Instant::now() < deadline, "no tunnel access line:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(line.contains("cause=eof"), "{line}");
        assert!(!line.contains("error"), "{line}");
        drop(tcp);
    })
    .await;
}
