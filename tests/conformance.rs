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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{api_config, bounded, free_addr, Portico, RecordingUpstream};

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
fn everything_config(listen: SocketAddr, plain: SocketAddr, upstream: SocketAddr) -> String {
    let backend = free_addr();
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
        let listen = free_addr();
        let plain = free_addr();
        let portico = Portico::start(&everything_config(listen, plain, upstream.addr)).await;
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
    let listen = free_addr();
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
    (Portico::start(&config).await, listen, upstream)
}

fn get_fields<'a>(path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut f = vec![
        (":method", "GET"),
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
