//! The status page and API on the admin listener, against live traffic
//! through the real binary: `/status.json` counts open SSE streams and
//! WebSockets exactly, shows failures and reload results, agrees with
//! `/metrics`; `admin.token` guards it; `admin.listen` and its checks.
//! The page in a real browser is in `tests/status_browser.rs`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{any_port, bounded, insecure_connector, metric_value, DeadPort, Portico};

use fixture::*;

mod fixture {
    use super::*;

    type Tls = tokio_rustls::client::TlsStream<TcpStream>;

    /// Days from the Unix epoch to a civil date (proleptic Gregorian).
    fn civil_from_days(z: i64) -> (i32, u8, u8) {
        // Howard Hinnant's days_from_civil inverse.
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
    }

    /// A certificate for `api.test` that expires at midnight UTC 11 days
    /// from today: `days_left` is 10 whatever the time of day.
    pub const DAYS_LEFT: i64 = 10;

    pub fn write_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let today = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
            / 86_400;
        let (y, m, d) = civil_from_days(today + DAYS_LEFT + 1);
        let mut params =
            rcgen::CertificateParams::new(vec!["api.test".to_string()]).expect("params");
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let cert_path = dir.join("api.crt");
        let key_path = dir.join("api.key");
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// Upstreams: `sse` answers an event stream that stays open, `ws`
    /// accepts WebSockets and echoes, `down` refuses connections, and
    /// `sse` answers `/busy` with 503.
    pub struct Origins {
        pub sse: SocketAddr,
        pub ws: SocketAddr,
        pub down: SocketAddr,
        /// Keeps `down` bound (and refusing) while the origins live.
        _down_port: DeadPort,
    }

    impl Origins {
        pub async fn start() -> Origins {
            let sse = TcpListener::bind("127.0.0.1:0").await.expect("bind sse");
            let ws = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
            let down_port = DeadPort::new();
            let origins = Origins {
                sse: sse.local_addr().expect("addr"),
                ws: ws.local_addr().expect("addr"),
                down: down_port.addr,
                _down_port: down_port,
            };
            tokio::spawn(async move {
                while let Ok((s, _)) = sse.accept().await {
                    tokio::spawn(serve_sse(s));
                }
            });
            tokio::spawn(async move {
                while let Ok((s, _)) = ws.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                            return;
                        };
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_close() || ws.send(m).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            origins
        }
    }

    /// One HTTP/1.1 request: `/busy` gets a 503, anything else an event
    /// stream whose first event is sent at once and which then stays open
    /// until portico closes it.
    async fn serve_sse(mut s: TcpStream) {
        let mut buf = [0u8; 1024];
        // Requests one after the other on this connection (keep-alive).
        loop {
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                if head.len() > 16 * 1024 {
                    return;
                }
            }
            let text = String::from_utf8_lossy(&head);
            if text.starts_with("GET /busy") {
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n")
                    .await;
                return;
            }
            if text.starts_with("GET /events/once") {
                // A complete answer; the connection stays open for the next.
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            let _ = s.write_all(b"10\r\ndata: hello #1\n\n\r\n").await;
            // Hold the stream until the other side closes it.
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
    }

    /// A config: `api.test` terminates at site `api` (the file certificate
    /// from [`write_cert`]) with locations `events` (SSE), `ws`, `busy`
    /// and `down`; `tunnel.test` passes through to backend `vpn`.
    pub fn config(
        listen: SocketAddr,
        o: &Origins,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> String {
        format!(
            r#"
[[listen]]
addr = "{listen}"

[[route]]
sni = ["api.test"]
terminate = "api"

[[route]]
sni = ["tunnel.test"]
pass = "vpn"

[backend.vpn]
addr = "{down}"
proxy_protocol = "v2"

[site.api]
cert = "{cert}"
key = "{key}"

[[site.api.location]]
name = "events"
path = "/events"
upstream = "sse"

[[site.api.location]]
name = "ws"
path = "/ws"
upstream = "ws"

[[site.api.location]]
name = "busy"
path = "/busy"
upstream = "sse"

[[site.api.location]]
name = "down"
path = "/down"
upstream = "down"

[upstream.sse]
url = "http://{sse}"

[upstream.ws]
url = "http://{ws}"

[upstream.down]
url = "http://{down}"
"#,
            cert = cert.display(),
            key = key.display(),
            sse = o.sse,
            ws = o.ws,
            down = o.down,
        )
    }

    async fn tls(listen: SocketAddr) -> Tls {
        let tcp = TcpStream::connect(listen).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("api.test").expect("name");
        insecure_connector(&[b"http/1.1"])
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    /// An SSE stream through portico, once its first event has arrived.
    pub async fn open_sse(listen: SocketAddr) -> Tls {
        let mut s = tls(listen).await;
        s.write_all(b"GET /events HTTP/1.1\r\nHost: api.test\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .expect("write request");
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        let t0 = Instant::now();
        while !String::from_utf8_lossy(&seen).contains("data: hello #1") {
            assert!(t0.elapsed() < Duration::from_secs(5), "no first event");
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("first event in time")
                .expect("read");
            assert!(n > 0, "closed before the first event: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        s
    }

    pub type Ws = tokio_tungstenite::WebSocketStream<Tls>;

    /// A WebSocket through portico, once one message went both ways.
    pub async fn open_ws(listen: SocketAddr) -> Ws {
        let s = tls(listen).await;
        let (mut ws, resp) = tokio_tungstenite::client_async("wss://api.test/ws", s)
            .await
            .expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
            .await
            .expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("echo")
            .expect("echo ok");
        assert_eq!(echo.into_text().expect("text").as_str(), "ping");
        ws
    }

    /// A raw HTTP/1.1 GET with extra header lines: (status, headers, body).
    pub async fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect admin");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .expect("admin answers in time")
            .expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, head.to_string(), body.to_string())
    }

    pub async fn status_json(p: &Portico, headers: &str) -> Value {
        let (code, _, body) = get(p.metrics, "/status.json", headers).await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status.json is JSON")
    }

    /// Poll `/status.json` until `pred` holds (5 s at most).
    pub async fn wait_status(p: &Portico, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let v = status_json(p, "").await;
            if pred(&v) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{what}: not reached within 5 s; last document:\n{v:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn location<'a>(doc: &'a Value, site: &str, name: &str) -> &'a Value {
        doc["sites"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == site))
            .and_then(|s| s["locations"].as_array())
            .and_then(|l| l.iter().find(|l| l["name"] == name))
            .unwrap_or_else(|| panic!("no location {site}/{name} in {doc:#}"))
    }

    pub fn active(doc: &Value, site: &str, name: &str, kind: &str) -> u64 {
        location(doc, site, name)["active"][kind]
            .as_u64()
            .unwrap_or(u64::MAX)
    }

    /// Portico with the fixture config (and `env`).
    pub async fn start(env: &[(&str, &str)]) -> (Portico, Origins, SocketAddr, common::TempDir) {
        let dir = common::TempDir::new();
        let (cert, key) = write_cert(dir.path());
        let origins = Origins::start().await;
        let listen = any_port();
        let p = Portico::start_with_env(&config(listen, &origins, &cert, &key), env).await;
        let listen = p.addr();
        (p, origins, listen, dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_config_routes_and_certificate() {
    bounded(30, async {
        let (p, _o, _listen, _dir) = start(&[]).await;
        let doc = status_json(&p, "").await;
        assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
        assert!(doc["uptime_seconds"].as_u64().is_some());
        assert_eq!(
            doc["config"]["path"].as_str(),
            Some(p.config_path.display().to_string().as_str())
        );
        assert_eq!(doc["config"]["generation"], 1);
        assert!(doc["config"]["last_reload"].is_null());
        let routes = doc["routes"].as_array().expect("routes");
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0]["index"], 0);
        assert_eq!(routes[0]["sni"][0], "api.test");
        assert_eq!(routes[0]["protocol"], "tls");
        assert_eq!(routes[0]["action"], "terminate api (4 locations)");
        assert!(
            routes[1]["action"].as_str().is_some_and(
                |a| a.starts_with("pass vpn -> 127.0.0.1:") && a.ends_with("(proxy v2)")
            ),
            "{}",
            routes[1]
        );
        let cert = &doc["sites"][0]["certificate"];
        assert_eq!(cert["source"], "file");
        assert_eq!(cert["names"][0], "api.test");
        assert_eq!(cert["days_left"], DAYS_LEFT);
        assert!(cert["not_after"]
            .as_str()
            .is_some_and(|s| s.ends_with("T00:00:00Z")));
        assert_eq!(doc["listeners"][0]["accept_proxy"], false);
        assert_eq!(doc["backends"][0]["name"], "vpn");
        assert_eq!(doc["backends"][0]["tunnels_active"], 0);
        let ups: Vec<&str> = doc["upstreams"]
            .as_array()
            .expect("upstreams")
            .iter()
            .filter_map(|u| u["name"].as_str())
            .collect();
        assert_eq!(ups, ["down", "sse", "ws"]);
        assert_eq!(doc["upstreams"][1]["connections"], 0);
        assert_eq!(doc["upstreams"][1]["idle_connections"], 0);
        // No private key anywhere: only the certificate's path.
        let text = doc.to_string();
        assert!(
            !text.contains("api.key") && !text.contains("PRIVATE"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_streams_are_exact_while_open_and_zero_after() {
    bounded(60, async {
        let (p, _o, listen, _dir) = start(&[]).await;
        let mut sse = Vec::new();
        for _ in 0..3 {
            sse.push(open_sse(listen).await);
        }
        let mut ws = Vec::new();
        for _ in 0..2 {
            ws.push(open_ws(listen).await);
        }
        let doc = wait_status(&p, "3 SSE and 2 WebSocket streams open", |d| {
            active(d, "api", "events", "sse") == 3 && active(d, "api", "ws", "websocket") == 2
        })
        .await;
        // Exactly: nothing counted on the wrong kind or location.
        assert_eq!(active(&doc, "api", "events", "http"), 0);
        assert_eq!(active(&doc, "api", "events", "websocket"), 0);
        assert_eq!(active(&doc, "api", "ws", "sse"), 0);
        assert_eq!(active(&doc, "api", "ws", "http"), 0);
        assert_eq!(location(&doc, "api", "events")["requests_total"], 3);
        assert_eq!(location(&doc, "api", "ws")["requests_total"], 2);
        // Time to first byte was measured for the streams.
        assert!(location(&doc, "api", "events")["first_byte_ms"]["p50"]
            .as_f64()
            .is_some());

        drop(sse);
        for mut w in ws {
            let _ = w.close(None).await;
        }
        wait_status(&p, "all streams closed", |d| {
            active(d, "api", "events", "sse") == 0 && active(d, "api", "ws", "websocket") == 0
        })
        .await;
    })
    .await;
}

/// `upstreams[].connections` and `idle_connections` follow the pool: a
/// finished keep-alive request leaves one idle connection, a stream reuses
/// it (open, not idle), and a stream the client dropped closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pool_connections_and_idle_ones() {
    bounded(30, async {
        let (p, _o, listen, _dir) = start(&[]).await;
        let sse = |d: &Value| d["upstreams"][1].clone();
        let doc = status_json(&p, "").await;
        assert_eq!(sse(&doc)["name"], "sse");
        assert_eq!(
            (
                sse(&doc)["connections"].as_u64(),
                sse(&doc)["idle_connections"].as_u64()
            ),
            (Some(0), Some(0))
        );

        let mut s = open_raw(listen, "/events/once").await;
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let doc = wait_status(&p, "one idle pooled connection", |d| {
            sse(d)["connections"] == 1 && sse(d)["idle_connections"] == 1
        })
        .await;
        let metrics = p.metrics_text().await;
        assert_eq!(
            metric_value(
                &metrics,
                "portico_upstream_connections",
                &[("upstream", "sse")]
            ),
            1.0,
            "/metrics and /status.json disagree: {doc:#}"
        );

        let stream = open_sse(listen).await;
        wait_status(&p, "the stream on the pooled connection", |d| {
            active(d, "api", "events", "sse") == 1
                && sse(d)["connections"] == 1
                && sse(d)["idle_connections"] == 0
        })
        .await;
        drop(stream);
        wait_status(&p, "the dropped stream's connection closed", |d| {
            sse(d)["connections"] == 0 && sse(d)["idle_connections"] == 0
        })
        .await;
        drop(s);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_appear_in_recent_errors_newest_first() {
    bounded(30, async {
        let (p, _o, listen, _dir) = start(&[]).await;
        let doc = status_json(&p, "").await;
        assert_eq!(doc["recent_errors"].as_array().map(Vec::len), Some(0));

        let mut s = open_raw(listen, "/down").await;
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        let doc = wait_status(&p, "the refused upstream in recent_errors", |d| {
            d["recent_errors"].as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
        let e = &doc["recent_errors"][0];
        assert_eq!(e["status"], 502);
        assert_eq!(e["kind"], "upstream");
        assert_eq!(e["site"], "api");
        assert_eq!(e["location"], "down");
        let msg = e["error"].as_str().expect("error text");
        assert!(
            msg.contains("GET /down") && msg.contains("upstream down refused"),
            "{msg}"
        );
        assert!(e["at"].as_str().is_some_and(|t| t.ends_with('Z')));

        // An upstream's own 5xx counts too, and comes first.
        let mut s = open_raw(listen, "/busy").await;
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let doc = wait_status(&p, "the 503 first", |d| {
            d["recent_errors"][0]["status"] == 503
        })
        .await;
        assert_eq!(doc["recent_errors"][0]["location"], "busy");
        assert_eq!(doc["recent_errors"][1]["status"], 502);
        assert_eq!(location(&doc, "api", "down")["errors_total"], 1);
        assert_eq!(location(&doc, "api", "busy")["errors_total"], 1);
        assert_eq!(doc["upstreams"][0]["failures_total"], 1);

        // A passthrough backend that cannot be reached.
        let tcp = TcpStream::connect(listen).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("tunnel.test").expect("name");
        let _ = insecure_connector(&[b"http/1.1"]).connect(name, tcp).await;
        let doc = wait_status(&p, "the backend failure", |d| {
            d["recent_errors"][0]["kind"] == "backend"
        })
        .await;
        assert!(doc["recent_errors"][0]["error"]
            .as_str()
            .is_some_and(|m| m.contains("backend vpn unreachable")));
        assert_eq!(doc["backends"][0]["connect_failures_total"], 1);
    })
    .await;
}

async fn open_raw(listen: SocketAddr, path: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(listen).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("api.test").expect("name");
    let mut s = insecure_connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("TLS");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    s
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_results_show_in_config() {
    bounded(30, async {
        let (p, o, _listen, dir) = start(&[]).await;
        let good = std::fs::read_to_string(&p.config_path).expect("read config");
        p.rewrite_config_raw("[[listen]\naddr = \"127.0.0.1:1\"\n");
        p.signal("HUP");
        let doc = wait_status(&p, "the failed reload", |d| {
            d["config"]["last_reload"]["ok"] == false
        })
        .await;
        let err = doc["config"]["last_reload"]["error"]
            .as_str()
            .expect("message");
        assert!(
            err.contains("portico.toml") && err.contains("TOML parse error"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err:?}");
        // The running config stays: generation 1, routes as before.
        assert_eq!(doc["config"]["generation"], 1);
        assert_eq!(doc["routes"].as_array().map(Vec::len), Some(2));

        // A good file with one route less: generation 2, ok, the new table.
        let (cert, key) = (dir.path().join("api.crt"), dir.path().join("api.key"));
        let fewer = config(any_port(), &o, &cert, &key)
            .replace("[[route]]\nsni = [\"tunnel.test\"]\npass = \"vpn\"\n", "");
        assert_ne!(fewer, config(any_port(), &o, &cert, &key));
        let admin = good.split("[admin]").nth(1).expect("harness admin table");
        p.rewrite_config_raw(&format!("{fewer}\n[admin]{admin}"));
        p.signal("HUP");
        let doc = wait_status(&p, "the good reload", |d| d["config"]["generation"] == 2).await;
        assert_eq!(doc["config"]["last_reload"]["ok"], true);
        assert!(doc["config"]["last_reload"]["error"].is_null());
        assert_eq!(doc["routes"].as_array().map(Vec::len), Some(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_agree_with_metrics() {
    bounded(30, async {
        let (p, _o, listen, _dir) = start(&[]).await;
        for path in ["/down", "/busy", "/down"] {
            let mut s = open_raw(listen, path).await;
            read_head(&mut s).await;
        }
        let s1 = open_sse(listen).await;
        // Quiet now (one stream open, nothing moving): both views must match.
        wait_status(&p, "3 failures", |d| {
            d["recent_errors"].as_array().map(Vec::len) == Some(3)
        })
        .await;
        let doc = status_json(&p, "").await;
        let metrics = p.metrics_text().await;
        for loc in ["down", "busy", "events", "ws"] {
            let want = metric_value(
                &metrics,
                "portico_http_requests_total",
                &[("site", "api"), ("location", loc)],
            );
            assert_eq!(
                location(&doc, "api", loc)["requests_total"].as_f64(),
                Some(want),
                "{loc}"
            );
        }
        assert_eq!(
            active(&doc, "api", "events", "sse") as f64,
            metric_value(
                &metrics,
                "portico_http_streams_active",
                &[("site", "api"), ("location", "events"), ("kind", "sse")]
            )
        );
        assert_eq!(
            doc["upstreams"][0]["failures_total"].as_f64(),
            Some(metric_value(
                &metrics,
                "portico_upstream_failures_total",
                &[("upstream", "down")]
            ))
        );
        drop(s1);
    })
    .await;
}

// ---------------------------------------------------------------- events

/// Read SSE events from the admin listener: (event, data) pairs.
async fn read_events(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    want: usize,
    within: Duration,
) -> Vec<(String, String)> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block).into_owned();
            let mut event = String::new();
            let mut data = String::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = v.to_string();
                }
            }
            if !event.is_empty() {
                out.push((event, data));
            }
            if out.len() == want {
                return out;
            }
        }
        let left = within.saturating_sub(t0.elapsed());
        assert!(
            !left.is_zero(),
            "only {} of {want} events within {within:?}",
            out.len()
        );
        let n = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} events within {within:?}", out.len()))
            .expect("read events");
        assert!(n > 0, "event stream closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn open_events(admin: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(admin).await.expect("connect");
    s.write_all(b"GET /status/events HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("head in time")
            .expect("read");
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("end") + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    // Chunked framing: keep only the payload lines (chunk sizes are hex
    // lines without a colon, which the event parser ignores).
    let rest = buf.split_off(end);
    (s, rest)
}

/// Apply an RFC 7396 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        let t = target.as_object_mut().expect("object");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_send_the_document_then_small_patches_each_second() {
    bounded(30, async {
        let (p, _o, listen, _dir) = start(&[]).await;
        let (mut s, mut buf) = open_events(p.metrics).await;
        let t0 = Instant::now();
        let first = read_events(&mut s, &mut buf, 1, Duration::from_secs(3)).await;
        assert_eq!(first[0].0, "status");
        let mut state = Value::Object(Default::default());
        merge(&mut state, &serde_json::from_str(&first[0].1).expect("JSON"));
        assert!(state["routes"].is_array() && state["sites"].is_array(), "whole document first");
        let full_size = first[0].1.len();

        // Nothing happens: the next events carry only the uptime.
        let quiet = read_events(&mut s, &mut buf, 2, Duration::from_secs(3)).await;
        let quiet_size = quiet.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
        for (_, d) in &quiet {
            let v: Value = serde_json::from_str(d).expect("JSON");
            let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
            assert!(keys.is_empty() || keys == ["uptime_seconds"], "{d}");
        }
        // About one per second (3 events so far).
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1800), "3 events in {took:?}");

        // A stream opens: the next patches bring the location's count.
        let sse = open_sse(listen).await;
        let t1 = Instant::now();
        loop {
            let ev = read_events(&mut s, &mut buf, 1, Duration::from_secs(3)).await;
            let patch: Value = serde_json::from_str(&ev[0].1).expect("JSON");
            merge(&mut state, &patch);
            if active(&state, "api", "events", "sse") == 1 {
                println!(
                    "event sizes: whole document {full_size} B, idle patch {quiet_size} B, patch with a change {} B",
                    ev[0].1.len()
                );
                break;
            }
            assert!(t1.elapsed() < Duration::from_secs(3), "count did not arrive");
        }
        // The merged state equals a fresh document (but for the uptime).
        let mut fresh = status_json(&p, "").await;
        fresh["uptime_seconds"] = state["uptime_seconds"].clone();
        strip_nulls(&mut fresh);
        strip_nulls(&mut state);
        assert_eq!(state["sites"], fresh["sites"]);
        assert_eq!(state["routes"], fresh["routes"]);
        drop(sse);
    })
    .await;
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(m) = v {
        m.retain(|_, v| !v.is_null());
        for v in m.values_mut() {
            strip_nulls(v);
        }
    } else if let Value::Array(a) = v {
        for v in a {
            strip_nulls(v);
        }
    }
}

// ---------------------------------------------------------------- token

const TOKEN: &str = "tok-Zq81-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_the_status_page_and_metrics_but_not_health() {
    bounded(30, async {
        let (p, _o, listen, _dir) = start(&[
            ("PORTICO_ADMIN__TOKEN", TOKEN),
            ("PORTICO_ADMIN__PROTECT_METRICS", "true"),
            ("PORTICO_LOG__LEVEL", "debug"),
        ])
        .await;
        let a = p.metrics;
        let right = format!("Authorization: Bearer {TOKEN}\r\n");
        let wrong = format!("Authorization: Bearer {TOKEN}x\r\n");
        for path in ["/", "/status.json", "/status/events", "/metrics"] {
            let (code, head, body) = get(a, path, "").await;
            assert_eq!(code, 401, "{path} without a token");
            assert!(
                head.contains("WWW-Authenticate: Bearer")
                    || head
                        .to_ascii_lowercase()
                        .contains("www-authenticate: bearer"),
                "{head}"
            );
            assert!(!body.contains(TOKEN));
            assert_eq!(
                get(a, path, &wrong).await.0,
                401,
                "{path} with a wrong token"
            );
        }
        for path in ["/", "/status.json", "/metrics"] {
            assert_eq!(get(a, path, &right).await.0, 200, "{path} with the token");
        }
        for path in ["/healthz", "/readyz"] {
            assert_eq!(get(a, path, "").await.0, 200, "{path} stays open");
        }
        // The page takes it once from the query and keeps it in a cookie.
        let (code, head, _) = get(a, &format!("/?token={TOKEN}"), "").await;
        assert_eq!(code, 303, "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("location: /\r\n"), "{head}");
        let cookie_line = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .expect("Set-Cookie");
        assert!(
            cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"),
            "{cookie_line}"
        );
        let cookie = cookie_line
            .split_once(':')
            .map(|(_, v)| v.trim())
            .and_then(|v| v.split(';').next())
            .expect("cookie value");
        let with_cookie = format!("Cookie: {cookie}\r\n");
        assert_eq!(get(a, "/", &with_cookie).await.0, 200);
        assert_eq!(get(a, "/status.json", &with_cookie).await.0, 200);
        assert_eq!(get(a, &format!("/?token={TOKEN}x"), "").await.0, 401);
        assert_eq!(
            get(a, "/", "Cookie: portico_admin_token=nope\r\n").await.0,
            401
        );
        let doc = status_json(&p, &right).await;
        assert!(
            !doc.to_string().contains(TOKEN),
            "the document never shows the token"
        );

        // Some traffic and a reload, so that there is plenty of log.
        let mut s = open_raw(listen, "/down").await;
        read_head(&mut s).await;
        p.signal("HUP");
        let t0 = Instant::now();
        while !p.stderr().contains("config reloaded") {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no reload; stderr:\n{}",
                p.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = p.stderr();
        assert!(
            log.contains("request") && log.len() > 200,
            "debug log expected:\n{log}"
        );
        assert!(
            !log.contains(TOKEN) && !log.contains("tok-Zq81"),
            "the token leaked into the log:\n{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_open_with_a_token_unless_protected() {
    bounded(30, async {
        let (p, _o, _listen, _dir) = start(&[("PORTICO_ADMIN__TOKEN", TOKEN)]).await;
        assert_eq!(get(p.metrics, "/metrics", "").await.0, 200);
        assert_eq!(get(p.metrics, "/status.json", "").await.0, 401);
    })
    .await;
}

// ---------------------------------------------------------------- config

async fn check(admin: &str) -> common::CheckOutput {
    let dir = common::TempDir::new();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[admin]\n{admin}\n\n[[listen]]\naddr = \"127.0.0.1:8443\"\n\n[[route]]\nredirect = \"https\"\nprotocol = \"http\"\n"),
    )
    .expect("write");
    common::portico_check(&path, &[]).await
}

#[tokio::test]
async fn admin_listen_is_the_new_name_of_admin_metrics() {
    bounded(30, async {
        let out = check("listen = \"127.0.0.1:9911\"").await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(
            out.stdout.contains("admin  http://127.0.0.1:9911/metrics"),
            "{}",
            out.stdout
        );
        let out = check("listen = \"127.0.0.1:9911\"\nmetrics = \"127.0.0.1:9911\"").await;
        assert_eq!(out.code, Some(0), "equal is fine: {}", out.stderr);
        let out = check("listen = \"127.0.0.1:9911\"\nmetrics = \"127.0.0.1:9912\"").await;
        assert_eq!(out.code, Some(1));
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.contains("admin.listen") && out.stderr.contains("older name"),
            "{}",
            out.stderr
        );
        let out = check("listen = \"nowhere\"").await;
        assert_eq!(out.code, Some(1));
        assert!(
            out.stderr
                .contains("admin.listen: \"nowhere\" is not an ip:port"),
            "{}",
            out.stderr
        );
        let out = check("token = \" \"").await;
        assert!(
            out.stderr.contains("admin.token: empty token"),
            "{}",
            out.stderr
        );
        let out = check("token = \"has space\"").await;
        assert!(
            out.stderr.contains("admin.token") && !out.stderr.contains("has space"),
            "{}",
            out.stderr
        );
        // A token that looks like a number is still a token, and a wrong
        // type never echoes the value.
        let out = check("token = 90817263").await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let out = check("token = 1.5e300").await;
        assert_eq!(out.code, Some(1));
        assert!(
            out.stderr.contains("admin.token") && !out.stderr.contains("1.5"),
            "{}",
            out.stderr
        );
        let out = check("protect_metrics = true").await;
        assert!(
            out.stderr
                .contains("admin.protect_metrics: needs admin.token"),
            "{}",
            out.stderr
        );
        let out = check("token = \"abc\"\nprotect_metrics = true").await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(!out.stdout.contains("abc"), "{}", out.stdout);
    })
    .await;
}

// ---------------------------------------------------------------- browser

/// Headless Chromium driven over the DevTools protocol (a WebSocket that
/// takes JSON commands), killed on drop.
struct Browser {
    _process: Chromium,
    _profile: common::TempDir,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    async fn start() -> Browser {
        use std::os::unix::process::CommandExt as _;
        let profile = common::TempDir::new();
        let child = std::process::Command::new("chromium")
            // Its own process group: Debian's `chromium` is a wrapper
            // script, so the browser and its helpers are grandchildren;
            // [`Chromium`] kills the whole group.
            .process_group(0)
            .args([
                "--disable-breakpad",
                "--disable-crash-reporter",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1100,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run chromium (scripts/test-all installs Debian's chromium package)");
        let process = Chromium(child);
        // Chromium writes its port (and browser target path) here once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let t0 = Instant::now();
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromium did not open its DevTools port within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let devtools: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        // The page target chromium opened for about:blank.
        let page_ws = loop {
            let body = devtools_list(devtools).await;
            let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let found = list.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["id"].as_str())
                    // By address: "localhost" in its own URL may resolve to ::1.
                    .map(|id| format!("ws://{devtools}/devtools/page/{id}"))
            });
            if let Some(u) = found {
                break u;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no page target: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(page_ws.as_str())
            .await
            .expect("DevTools WebSocket");
        Browser {
            _process: process,
            _profile: profile,
            ws,
            next_id: 0,
        }
    }

    /// One DevTools command; its `result` (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        use tokio_tungstenite::tungstenite::Message;
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send DevTools command");
        let t0 = Instant::now();
        loop {
            let left = Duration::from_secs(15).saturating_sub(t0.elapsed());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer within 15 s"))
                .expect("DevTools closed")
                .expect("DevTools message");
            let Ok(text) = m.into_text() else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page; its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it yields `want`; how long that took (panics after `within`).
    async fn wait_for(&mut self, expr: &str, want: &Value, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let got = self.eval(expr).await;
            if &got == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "{expr} is {got}, not {want}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn screenshot(&mut self, width: u32, height: u32, mobile: bool, path: &std::path::Path) {
        use base64::Engine as _;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        // Let layout settle on the new size (one frame is enough; 2 events at most).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let shot = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// `GET /json/list` of the DevTools HTTP server, which keeps the
/// connection open: read the head, then Content-Length bytes.
async fn devtools_list(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return String::new();
    };
    if s.write_all(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::new()
}

/// The browser's process group, killed on drop (also when a test fails
/// before the browser is ready).
struct Chromium(std::process::Child);

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = rustix::process::Pid::from_child(&self.0);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_a_real_browser_updates_live() {
    bounded(120, async {
        let (p, _o, listen, _dir) = start(&[("PORTICO_ADMIN__TOKEN", TOKEN)]).await;
        // Something to show: two failures and an open WebSocket.
        for path in ["/down", "/busy"] {
            let mut s = open_raw(listen, path).await;
            read_head(&mut s).await;
        }
        let ws = open_ws(listen).await;

        let mut b = Browser::start().await;
        b.call("Page.enable", serde_json::json!({})).await;
        // The token once in the query: portico sets the cookie and redirects
        // to `/`, whose event stream then carries the cookie.
        b.call(
            "Page.navigate",
            serde_json::json!({"url": format!("http://{}/?token={TOKEN}", p.metrics)}),
        )
        .await;
        let within = Duration::from_secs(10);
        b.wait_for("location.pathname + location.search", &Value::from("/"), within).await;
        b.wait_for("document.getElementById('live').textContent", &Value::from("live"), within)
            .await;
        // A mark that a reload would wipe.
        b.eval("window.__portico_test_mark = 42").await;

        // The route table.
        let routes = b.eval("document.getElementById('routes').innerText").await;
        let routes = routes.as_str().unwrap_or_default().to_string();
        assert!(routes.contains("terminate api (4 locations)"), "{routes}");
        assert!(routes.contains("tunnel.test") && routes.contains("pass vpn -> 127.0.0.1:"), "{routes}");
        // The certificate's days, highlighted (under 14).
        let days = b
            .eval("(e => e.textContent + '|' + e.className)(document.querySelector('[data-days=\"api\"]'))")
            .await;
        assert_eq!(days, Value::from(format!("{DAYS_LEFT} days left|badge warn")));
        let errors = b.eval("document.getElementById('errors').innerText").await;
        let errors = errors.as_str().unwrap_or_default().to_string();
        assert!(errors.contains("503") && errors.contains("502") && errors.contains("upstream down refused"), "{errors}");

        // The live count: 0, then 1 while a stream is open through portico, then 0.
        let cell = "document.querySelector('[data-active=\"api|events|sse\"]').textContent";
        b.wait_for(cell, &Value::from("0"), Duration::from_secs(2)).await;
        let sse = open_sse(listen).await;
        let up = b.wait_for(cell, &Value::from("1"), Duration::from_secs(2)).await;
        let ws_cell = "document.querySelector('[data-active=\"api|ws|websocket\"]').textContent";
        b.wait_for(ws_cell, &Value::from("1"), Duration::from_secs(2)).await;

        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let _ = std::fs::create_dir_all(&target);
        b.screenshot(1100, 900, false, &target.join("status-page.png")).await;
        b.screenshot(390, 844, true, &target.join("status-page-phone.png")).await;

        drop(sse);
        let down = b.wait_for(cell, &Value::from("0"), Duration::from_secs(2)).await;
        assert_eq!(b.eval("window.__portico_test_mark").await, Value::from(42), "the page reloaded");
        println!("browser saw the stream open after {up:?} and closed after {down:?}");
        drop(ws);
    })
    .await;
}
