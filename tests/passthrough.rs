//! Layer-4 behaviour of the real binary: ClientHello routing, passthrough
//! with PROXY headers, inbound PROXY, timeouts, half-close, failures, and
//! `portico check`. Real sockets on loopback only; every test is bounded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const SEC: Duration = Duration::from_secs(1);

/// A v2 header for 203.0.113.9:40000 -> 127.0.0.1:443 (TCP over IPv4).
fn v2_header_bytes() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1]);
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

/// One round trip through an established tunnel to an echo server.
async fn echo_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) {
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.expect("echo reply");
    assert_eq!(got, msg);
}

/// Assert that the series of `name` with `labels` in the scrape `m` sum to `want`.
fn assert_metric(m: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(metric_value(m, name, labels), want, "{name}{labels:?}\n{m}");
}

/// Start portico with one listener passing `tunnel.test` to a raw TCP
/// backend `b` (no PROXY header). `timeouts` goes first in the config: a
/// `[timeouts]` table, or "" for the defaults.
async fn start_tunnel(timeouts: &str) -> (RawBackend, SocketAddr, Portico) {
    let backend = RawBackend::tcp(Expect::None).await;
    let listen = any_port();
    let p = Portico::start(&format!(
        r#"
{timeouts}
[[listen]]
addr = "{listen}"

[[route]]
sni = ["tunnel.test"]
pass = "b"

[backend.b]
addr = "{}"
"#,
        backend.addr
    ))
    .await;
    let listen = *p.listening().last().expect("portico logged its listener");
    (backend, listen, p)
}

/// Send `hello` on `client` and take the backend's side of the tunnel, with
/// the first `hello.len()` bytes it read.
async fn forward_hello(
    client: &mut TcpStream,
    backend: &mut RawBackend,
    hello: &[u8],
) -> (RawConn, Vec<u8>) {
    client.write_all(hello).await.unwrap();
    let mut conn = backend.next(5 * SEC).await;
    let mut got = vec![0u8; hello.len()];
    conn.stream.read_exact(&mut got).await.unwrap();
    (conn, got)
}

/// Connect, send `bytes` (the write may fail once portico has closed) and
/// return how long portico took to close the connection (at most 2 s).
async fn send_and_wait_close(listen: SocketAddr, bytes: &[u8]) -> Duration {
    let mut c = connect(listen).await;
    let _ = c.write_all(bytes).await;
    expect_closed(&mut c, 2 * SEC).await
}

// 1.
#[tokio::test]
async fn tls_passes_end_to_end_with_v2_and_echoes_a_mebibyte() {
    bounded(30, async {
        let cert = TestCert::generate();
        let (tx, mut events) = mpsc::unbounded_channel();
        let echo = TlsEcho::start("echo", &cert, &["h2", "http/1.1"], Expect::V2, tx).await;
        let listen = any_port();
        let p = Portico::start(&format!(
            r#"
[[listen]]
addr = "{listen}"

[[route]]
sni = ["tunnel.test"]
pass = "echo"

[backend.echo]
addr = "{}"
proxy_protocol = "v2"
"#,
            echo.addr
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");

        let connector = tls_connector(&cert, &["h2", "http/1.1"], true);
        let (tls, local) = tls_connect(listen, &connector, "tunnel.test").await;
        let acc = next_accepted(&mut events, 5 * SEC).await;
        assert_eq!(acc.server, "echo");
        assert_eq!(acc.handshake, Ok(()));
        assert_eq!(acc.sni.as_deref(), Some("tunnel.test"));
        assert_eq!(acc.alpn.as_deref(), Some(&b"h2"[..]));
        let header = acc.proxy.clone().unwrap().expect("v2 header");
        assert_eq!(header.version, 2);
        assert_eq!(header.source, Some(local));
        assert_eq!(header.destination, Some(listen));

        // The client verified the backend's own certificate: portico did not terminate.
        let (_, client_conn) = tls.get_ref();
        let peer = client_conn.peer_certificates().expect("server certificate");
        assert_eq!(peer.len(), 1);
        assert_eq!(peer[0], cert.cert);
        assert_eq!(client_conn.alpn_protocol(), Some(&b"h2"[..]));

        let data = pseudo_random(1 << 20, 0x5eed);
        let (mut r, mut w) = tokio::io::split(tls);
        let send = async {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
        };
        let recv = async {
            let mut got = vec![0u8; data.len()];
            r.read_exact(&mut got).await.expect("1 MiB echoed back");
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert!(
            got == data,
            "echo differs: sent {} bytes fnv {:016x}, got {} bytes fnv {:016x}",
            data.len(),
            checksum(&data),
            got.len(),
            checksum(&got)
        );

        let m = p.metrics_text().await;
        let lst = listen.to_string();
        let pass = [("listener", lst.as_str()), ("action", "pass")];
        assert_metric(&m, "portico_connections_total", &pass, 1.0);
        assert_metric(&m, "portico_tunnel_active", &[("backend", "echo")], 1.0);
        for direction in ["upstream", "downstream"] {
            let bytes = metric_value(
                &m,
                "portico_tunnel_bytes_total",
                &[("backend", "echo"), ("direction", direction)],
            );
            assert!(bytes >= (1 << 20) as f64, "{direction} {bytes}\n{m}");
        }

        // Closing the client ends the tunnel; the gauge drops back to 0.
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "unexpected trailing bytes: {}", rest.len());
        let deadline = Instant::now() + 3 * SEC;
        loop {
            let active = p
                .metric("portico_tunnel_active", &[("backend", "echo")])
                .await;
            if active == 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "tunnel still active: {active}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// 2.
#[tokio::test]
async fn alpn_splits_one_sni_between_two_backends() {
    bounded(20, async {
        let cert = TestCert::generate();
        let (tx, mut events) = mpsc::unbounded_channel();
        let alpn = ["h2", "http/1.1"];
        let a = TlsEcho::start("A", &cert, &alpn, Expect::None, tx.clone()).await;
        let b = TlsEcho::start("B", &cert, &alpn, Expect::None, tx).await;
        let listen = any_port();
        let p = Portico::start(&format!(
            r#"
[[listen]]
addr = "{listen}"

[[route]]
sni = ["tunnel.test"]
alpn = ["h2"]
pass = "a"

[[route]]
sni = ["tunnel.test"]
pass = "b"

[backend.a]
addr = "{}"

[backend.b]
addr = "{}"
"#,
            a.addr, b.addr
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");

        let cases: [(&[&str], &str, &[u8]); 2] = [
            (&["h2", "http/1.1"], "A", b"h2"),
            (&["http/1.1"], "B", b"http/1.1"),
        ];
        for (offer, server, negotiated) in cases {
            let (mut tls, _) =
                tls_connect(listen, &tls_connector(&cert, offer, true), "tunnel.test").await;
            let acc = next_accepted(&mut events, 5 * SEC).await;
            assert_eq!(acc.server, server, "client offering {offer:?}");
            assert_eq!(acc.handshake, Ok(()));
            assert_eq!(acc.alpn.as_deref(), Some(negotiated), "offer {offer:?}");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(negotiated));
            echo_round_trip(&mut tls, b"ping").await;
        }
        assert!(events.try_recv().is_err(), "an extra backend connection");
    })
    .await
}

// 3.
#[tokio::test]
async fn wildcard_sni_and_catch_all_decoy() {
    bounded(20, async {
        let cert = TestCert::generate();
        let (tx, mut events) = mpsc::unbounded_channel();
        let a = TlsEcho::start("A", &cert, &["h2"], Expect::None, tx.clone()).await;
        let decoy = TlsEcho::start("decoy", &cert, &["h2"], Expect::None, tx).await;
        let listen = any_port();
        let p = Portico::start(&format!(
            r#"
[[listen]]
addr = "{listen}"

[[route]]
sni = ["*.tunnel.test"]
pass = "a"

[[route]]
pass = "decoy"

[backend.a]
addr = "{}"

[backend.decoy]
addr = "{}"
"#,
            a.addr, decoy.addr
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");

        // (name verified by the client, send SNI?, expected server, SNI the server saw)
        let cases = [
            ("x.tunnel.test", true, "A", Some("x.tunnel.test")),
            ("a.b.tunnel.test", true, "A", Some("a.b.tunnel.test")),
            ("tunnel.test", true, "decoy", Some("tunnel.test")),
            (
                "tunnel.test.evil.net",
                true,
                "decoy",
                Some("tunnel.test.evil.net"),
            ),
            ("tunnel.test", false, "decoy", None),
        ];
        for (name, sni, server, seen) in cases {
            let connector = tls_connector(&cert, &["h2"], sni);
            let (mut tls, _) = tls_connect(listen, &connector, name).await;
            let acc = next_accepted(&mut events, 5 * SEC).await;
            assert_eq!(
                (acc.server, acc.sni.as_deref()),
                (server, seen),
                "{name} (sni sent: {sni})"
            );
            echo_round_trip(&mut tls, name.as_bytes()).await;
        }
        assert!(events.try_recv().is_err(), "an extra backend connection");
    })
    .await
}

// 4.
#[tokio::test]
async fn unix_socket_backend_gets_the_exact_hello_bytes_first() {
    bounded(20, async {
        let dir = TempDir::new();
        let mut backend = RawBackend::unix(&dir.path().join("b.sock"), Expect::None).await;
        let listen = any_port();
        let p = Portico::start(&format!(
            r#"
[[listen]]
addr = "{listen}"

[[route]]
sni = ["tunnel.test"]
pass = "sock"

[backend.sock]
addr = "{}"
proxy_protocol = "none"
"#,
            backend.addr
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");

        let mut sent = fixture("curl-default.bin");
        let hello_len = sent.len();
        sent.extend_from_slice(&pseudo_random(64 * 1024, 4));
        let mut client = connect(listen).await;
        // One write: the peek buffer holds the hello and more; none may be lost.
        let (mut conn, got) = forward_hello(&mut client, &mut backend, &sent).await;
        assert_eq!(
            &got[..hello_len],
            &sent[..hello_len],
            "the first bytes are the ClientHello record exactly"
        );
        assert!(got == sent, "payload after the hello differs");

        conn.stream.write_all(&got).await.unwrap();
        let mut back = vec![0u8; sent.len()];
        client.read_exact(&mut back).await.expect("echo");
        assert!(back == sent, "echo differs");
    })
    .await
}

// 5.
#[tokio::test]
async fn proxy_headers_to_backends_carry_addresses_and_tlvs() {
    bounded(30, async {
        let cert = TestCert::generate();
        let (tx, mut events) = mpsc::unbounded_channel();
        let alpn = ["h2", "http/1.1"];
        let v1 = TlsEcho::start("v1", &cert, &alpn, Expect::V1, tx.clone()).await;
        let v2 = TlsEcho::start("v2", &cert, &alpn, Expect::V2, tx).await;
        let (any4, any6) = (any_port(), any_port_v6());
        let p = Portico::start(&format!(
            r#"
[[listen]]
addr = "{any4}"

[[listen]]
addr = "{any6}"

[[route]]
sni = ["v1.tunnel.test"]
pass = "v1"

[[route]]
sni = ["tunnel.test"]
pass = "v2"

[backend.v1]
addr = "{}"
proxy_protocol = "v1"

[backend.v2]
addr = "{}"
proxy_protocol = "v2"
"#,
            v1.addr, v2.addr
        ))
        .await;
        let (listen4, listen6) = match p.listening()[..] {
            [a, b] => (a, b),
            ref other => panic!("expected two listeners, got {other:?}"),
        };

        // v1 over IPv4 and IPv6: the exact header line.
        for (listen, family) in [(listen4, "TCP4"), (listen6, "TCP6")] {
            let connector = tls_connector(&cert, &["h2"], true);
            let (mut tls, local) = tls_connect(listen, &connector, "v1.tunnel.test").await;
            let acc = next_accepted(&mut events, 5 * SEC).await;
            assert_eq!(acc.server, "v1");
            assert_eq!(acc.handshake, Ok(()));
            let h = acc.proxy.unwrap().expect("v1 header");
            let expected = format!(
                "PROXY {family} {} {} {} {}\r\n",
                local.ip(),
                listen.ip(),
                local.port(),
                listen.port()
            );
            assert_eq!(String::from_utf8_lossy(&h.raw), expected);
            assert_eq!(h.source, Some(local));
            assert_eq!(h.destination, Some(listen));
            echo_round_trip(&mut tls, b"v1").await;
        }
        // v2: addresses plus AUTHORITY = SNI and ALPN = the first ALPN offered.
        let cases: [(SocketAddr, &[&str], &[u8]); 3] = [
            (listen4, &["h2", "http/1.1"], b"h2"),
            (listen4, &["http/1.1", "h2"], b"http/1.1"),
            (listen6, &["h2", "http/1.1"], b"h2"),
        ];
        for (listen, offer, first) in cases {
            let connector = tls_connector(&cert, offer, true);
            let (mut tls, local) = tls_connect(listen, &connector, "tunnel.test").await;
            let acc = next_accepted(&mut events, 5 * SEC).await;
            assert_eq!(acc.server, "v2");
            assert_eq!(acc.handshake, Ok(()));
            let h = acc.proxy.unwrap().expect("v2 header");
            assert_eq!(h.version, 2);
            assert_eq!(h.source, Some(local), "via {listen}");
            assert_eq!(h.destination, Some(listen), "via {listen}");
            assert_eq!(h.authority.as_deref(), Some("tunnel.test"));
            assert_eq!(h.alpn.as_deref(), Some(first), "offer {offer:?}");
            echo_round_trip(&mut tls, b"v2").await;
        }
    })
    .await
}

/// Start portico with a listener that accepts PROXY headers from `trusted`
/// and passes `tunnel.test` to a raw backend expecting a v1 header.
async fn start_inbound(trusted: &str) -> (RawBackend, SocketAddr, Portico) {
    let backend = RawBackend::tcp(Expect::V1).await;
    let listen = any_port();
    let p = Portico::start(&format!(
        r#"
[timeouts]
client_hello = "1s"

[[listen]]
addr = "{listen}"
accept_proxy = true
trusted = ["{trusted}"]

[[route]]
sni = ["tunnel.test"]
pass = "b"

[backend.b]
addr = "{}"
proxy_protocol = "v1"
"#,
        backend.addr
    ))
    .await;
    let listen = *p.listening().last().expect("portico logged its listener");
    (backend, listen, p)
}

// 6a.
#[tokio::test]
async fn inbound_proxy_from_a_trusted_peer_sets_the_client_address() {
    bounded(20, async {
        let (mut backend, listen, p) = start_inbound("127.0.0.1/32").await;
        let hello = fixture("curl-default.bin");
        let inbound = "PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n";

        let mut client = connect(listen).await;
        client.write_all(inbound.as_bytes()).await.unwrap();
        let (conn, got) = forward_hello(&mut client, &mut backend, &hello).await;
        let h = conn.header();
        assert_eq!(String::from_utf8_lossy(&h.raw), inbound);
        assert_eq!(h.source, Some("203.0.113.9:40000".parse().unwrap()));
        assert_eq!(got, hello, "the hello follows the header, unchanged");

        // Same through a v2 inbound header.
        let mut client2 = connect(listen).await;
        client2.write_all(&v2_header_bytes()).await.unwrap();
        let (conn2, got) = forward_hello(&mut client2, &mut backend, &hello).await;
        assert_eq!(
            String::from_utf8_lossy(&conn2.header().raw),
            "PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n"
        );
        assert_eq!(got, hello);
        assert_eq!(
            p.metric("portico_proxy_header_failures_total", &[]).await,
            0.0
        );
        drop((client, client2));
    })
    .await
}

// 6b.
#[tokio::test]
async fn inbound_proxy_from_an_untrusted_peer_is_closed() {
    bounded(20, async {
        let (mut backend, listen, p) = start_inbound("10.0.0.0/8").await;
        let mut client = connect(listen).await;
        let started = Instant::now();
        // Writes may fail once portico has closed: the close is what is tested.
        let _ = client
            .write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n")
            .await;
        let _ = client.write_all(&fixture("curl-default.bin")).await;
        expect_closed(&mut client, SEC).await;
        assert!(
            started.elapsed() < SEC,
            "closed after {:?}",
            started.elapsed()
        );
        backend.expect_none(Duration::from_millis(200)).await;
        let lst = listen.to_string();
        let m = p.metrics_text().await;
        let untrusted = [("listener", lst.as_str()), ("reason", "untrusted")];
        assert_metric(&m, "portico_proxy_header_failures_total", &untrusted, 1.0);
        assert_metric(&m, "portico_proxy_header_failures_total", &[], 1.0);
    })
    .await
}

// 6c.
#[tokio::test]
async fn inbound_proxy_truncated_times_out_and_oversized_closes_at_once() {
    bounded(20, async {
        let (mut backend, listen, p) = start_inbound("127.0.0.1/32").await;

        let truncated = async {
            let mut c = connect(listen).await;
            c.write_all(&v2_header_bytes()[..20]).await.unwrap();
            let took = expect_closed(&mut c, 4 * SEC).await;
            assert!(
                took >= Duration::from_millis(800) && took <= 3 * SEC,
                "truncated header closed after {took:?}, expected ~1s (timeouts.client_hello)"
            );
        };
        let oversized = async {
            let mut c = connect(listen).await;
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
            c.write_all(&h).await.unwrap();
            let took = expect_closed(&mut c, 4 * SEC).await;
            assert!(
                took < Duration::from_millis(500),
                "oversized header closed after {took:?}, expected at once"
            );
        };
        tokio::join!(truncated, oversized);
        backend.expect_none(Duration::from_millis(100)).await;

        let lst = listen.to_string();
        let m = p.metrics_text().await;
        for reason in ["timeout", "too_large"] {
            let labels = [("listener", lst.as_str()), ("reason", reason)];
            assert_metric(&m, "portico_proxy_header_failures_total", &labels, 1.0);
        }
    })
    .await
}

// 7.
#[tokio::test]
async fn slow_hello_one_byte_at_a_time_still_routes_by_sni() {
    bounded(30, async {
        let mut tunnel = RawBackend::tcp(Expect::None).await;
        let mut decoy = RawBackend::tcp(Expect::None).await;
        let listen = any_port();
        let p = Portico::start(&format!(
            r#"
[timeouts]
client_hello = "10s"

[[listen]]
addr = "{listen}"

[[route]]
sni = ["tunnel.test"]
pass = "tunnel"

[[route]]
pass = "decoy"

[backend.tunnel]
addr = "{}"

[backend.decoy]
addr = "{}"
"#,
            tunnel.addr, decoy.addr
        ))
        .await;
        let listen = *p.listening().last().expect("portico logged its listener");

        let hello = fixture("chromium-default.bin");
        assert_eq!(hello.len(), 2015);
        let bytes = hello.clone();
        // Blocking writes with a real pause between them: each byte leaves in
        // its own segment, so the parser must reassemble ~2000 reads.
        let writer = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(listen).expect("connect");
            s.set_nodelay(true).unwrap();
            let started = Instant::now();
            for b in &bytes {
                s.write_all(std::slice::from_ref(b))
                    .expect("write one byte");
                std::thread::sleep(Duration::from_millis(1));
            }
            (s, started.elapsed())
        });
        let mut conn = tunnel.next(20 * SEC).await;
        let mut got = vec![0u8; hello.len()];
        conn.stream.read_exact(&mut got).await.unwrap();
        assert!(got == hello, "backend got different bytes");
        let (s, took) = writer.await.unwrap();
        assert!(took >= Duration::from_secs(2), "hello sent in {took:?}");

        s.set_nonblocking(true).unwrap();
        let mut client = TcpStream::from_std(s).unwrap();
        conn.stream.write_all(b"server first flight").await.unwrap();
        let mut reply = [0u8; 19];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"server first flight");
        decoy.expect_none(Duration::ZERO).await;
    })
    .await
}

// 8.
#[tokio::test]
async fn client_hello_timeout_closes_silent_and_stalled_clients() {
    bounded(20, async {
        let (mut backend, listen, p) = start_tunnel("[timeouts]\nclient_hello = \"500ms\"\n").await;

        let window = Duration::from_millis(400)..=Duration::from_secs(2);
        let silent = async {
            let mut c = connect(listen).await;
            let took = expect_closed(&mut c, 3 * SEC).await;
            assert!(
                window.contains(&took),
                "silent client closed after {took:?}"
            );
        };
        let stalled = async {
            let mut c = connect(listen).await;
            c.write_all(&fixture("curl-default.bin")[..200])
                .await
                .unwrap();
            let took = expect_closed(&mut c, 3 * SEC).await;
            assert!(
                window.contains(&took),
                "stalled client closed after {took:?}"
            );
        };
        tokio::join!(silent, stalled);
        backend.expect_none(Duration::from_millis(100)).await;
        assert_eq!(
            p.metric(
                "portico_client_hello_failures_total",
                &[("reason", "timeout")]
            )
            .await,
            2.0
        );
    })
    .await
}

// 9.
#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    bounded(20, async {
        let (mut backend, listen, _p) = start_tunnel("").await;
        let hello = fixture("curl-default.bin");

        // Client finishes first: the backend sees EOF, then still answers.
        let mut sent = hello.clone();
        sent.extend_from_slice(&pseudo_random(100 * 1024, 9));
        let mut client = connect(listen).await;
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut conn = backend.next(5 * SEC).await;
        let mut got = Vec::new();
        conn.stream
            .read_to_end(&mut got)
            .await
            .expect("backend reads to EOF");
        assert!(
            got == sent,
            "backend got {} of {} bytes",
            got.len(),
            sent.len()
        );
        let reply = pseudo_random(256 * 1024, 10);
        conn.stream.write_all(&reply).await.unwrap();
        conn.stream.shutdown().await.unwrap();
        drop(conn);
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .expect("client reads the reply");
        assert!(
            back == reply,
            "client got {} of {} reply bytes",
            back.len(),
            reply.len()
        );

        // Backend finishes first: the client sees EOF, then can still send.
        let mut client = connect(listen).await;
        let (mut conn, _) = forward_hello(&mut client, &mut backend, &hello).await;
        conn.stream.write_all(b"bye").await.unwrap();
        conn.stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        client.write_all(b"late words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut late = Vec::new();
        conn.stream.read_to_end(&mut late).await.unwrap();
        assert_eq!(late, b"late words");
    })
    .await
}

// 9b. Timing is the subject here: the sleeps are the traffic pattern.
#[tokio::test]
async fn idle_tunnel_is_closed_on_both_sides_and_traffic_keeps_it_open() {
    bounded(20, async {
        let (mut backend, listen, _p) = start_tunnel("[timeouts]\nidle = \"400ms\"\n").await;
        let hello = fixture("curl-default.bin");
        let mut client = connect(listen).await;
        let (mut conn, _) = forward_hello(&mut client, &mut backend, &hello).await;

        // A byte every 150 ms, alternating directions, for 1.2 s: never idle.
        for i in 0..8u8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let mut one = [0u8; 1];
            if i % 2 == 0 {
                client.write_all(&[i]).await.unwrap();
                conn.stream.read_exact(&mut one).await.expect("tunnel open");
            } else {
                conn.stream.write_all(&[i]).await.unwrap();
                client.read_exact(&mut one).await.expect("tunnel open");
            }
            assert_eq!(one, [i]);
        }

        // Then silence: both sides are closed after ~400 ms.
        let window = Duration::from_millis(300)..=Duration::from_secs(2);
        let (to_client, to_backend) = tokio::join!(
            expect_closed(&mut client, 3 * SEC),
            expect_closed(&mut conn.stream, 3 * SEC)
        );
        assert!(
            window.contains(&to_client),
            "client closed after {to_client:?}"
        );
        assert!(
            window.contains(&to_backend),
            "backend closed after {to_backend:?}"
        );
    })
    .await
}

/// One listener whose catch-all route passes to backend `gone` at `addr`.
fn unreachable_config(listen: SocketAddr, addr: SocketAddr) -> String {
    format!(
        r#"
[[listen]]
addr = "{listen}"

[[route]]
pass = "gone"

[backend.gone]
addr = "{addr}"
"#
    )
}

// 10.
#[tokio::test]
async fn unreachable_backend_closes_the_client_and_is_counted() {
    bounded(20, async {
        // Bound, never listening: connections are refused.
        let gone_port = DeadPort::new();
        let gone = gone_port.addr;
        let listen = any_port();
        let p = Portico::start(&unreachable_config(listen, gone)).await;
        let listen = *p.listening().last().expect("portico logged its listener");
        let mut client = connect(listen).await;
        client
            .write_all(&fixture("curl-default.bin"))
            .await
            .unwrap();
        let took = expect_closed(&mut client, 2 * SEC).await;
        assert!(took < SEC, "closed after {took:?}");
        assert_eq!(
            p.metric(
                "portico_backend_connect_failures_total",
                &[("backend", "gone")]
            )
            .await,
            1.0
        );
        let stderr = p.stderr();
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("Connection refused"))
            .collect();
        assert_eq!(lines.len(), 1, "stderr:\n{stderr}");
        assert!(lines[0].contains("gone"), "line: {}", lines[0]);
        assert!(lines[0].contains(&gone.to_string()), "line: {}", lines[0]);
    })
    .await
}

// 10b. Under systemd stderr is the journal, not a terminal: colour codes
// there are noise in every line (and break grep for `backend=NAME`).
#[tokio::test]
async fn log_lines_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    bounded(20, async {
        let listen = any_port();
        // Bound, never listening: connections are refused.
        let gone_port = DeadPort::new();
        let gone = gone_port.addr;
        let p = Portico::start(&unreachable_config(listen, gone)).await;
        let listen = p.addr();
        send_and_wait_close(listen, &fixture("curl-default.bin")).await;
        let stderr = p.stderr();
        assert!(stderr.contains("listening"), "stderr:\n{stderr}");
        assert!(!stderr.contains('\x1b'), "ANSI escapes in {stderr:?}");
        assert!(
            stderr.contains("backend=gone"),
            "fields as key=value: {stderr:?}"
        );
    })
    .await
}

// 11.
#[tokio::test]
async fn malformed_oversized_and_unrouted_hellos_are_closed_and_counted() {
    bounded(20, async {
        let (mut backend, listen, p) = start_tunnel("").await;

        // A handshake record whose message is a ServerHello (type 2).
        let malformed = [
            0x16, 0x03, 0x01, 0x00, 0x08, 0x02, 0x00, 0x00, 0x04, 0x03, 0x03, 0x00, 0x00,
        ];
        send_and_wait_close(listen, &malformed).await;
        assert_eq!(
            p.metric(
                "portico_client_hello_failures_total",
                &[("reason", "malformed")]
            )
            .await,
            1.0
        );

        send_and_wait_close(listen, &fixture("curl-api-http2.bin")).await;
        let m = p.metrics_text().await;
        let no_route = [("reason", "no_route")];
        assert_metric(&m, "portico_client_hello_failures_total", &no_route, 1.0);

        // A record declaring more than the 16 KiB a hello may take: refused
        // from its header, without waiting for the body.
        let huge = [0x16, 0x03, 0x01, 0x48, 0x00, 0x01, 0x00, 0x47, 0xfc];
        let took = send_and_wait_close(listen, &huge).await;
        assert!(took < SEC, "too large hello closed after {took:?}");

        let m = p.metrics_text().await;
        let too_large = [("reason", "too_large")];
        assert_metric(&m, "portico_client_hello_failures_total", &too_large, 1.0);
        assert_metric(&m, "portico_client_hello_failures_total", &[], 3.0);
        let lst = listen.to_string();
        let reject = [("listener", lst.as_str()), ("action", "reject")];
        assert_metric(&m, "portico_connections_total", &reject, 3.0);
        backend.expect_none(Duration::from_millis(100)).await;
    })
    .await
}

// 12.
const VALID: &str = r#"
[[listen]]
addr = "127.0.0.1:8443"

[[listen]]
addr = "[::1]:8443"
accept_proxy = true
trusted = ["::1/128"]

[[route]]
sni = ["tunnel.test"]
alpn = ["h2"]
pass = "a"

[[route]]
sni = ["*.tunnel.test"]
pass = "b"

[backend.a]
addr = "127.0.0.1:8001"
proxy_protocol = "v2"

[backend.b]
addr = "unix:/run/b.sock"
"#;

#[tokio::test]
async fn check_prints_the_route_table() {
    bounded(20, async {
        let dir = TempDir::new();
        let path = dir.path().join("ok.toml");
        std::fs::write(&path, VALID).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert_eq!(out.stderr, "", "{out:?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(
            lines[0].contains(&path.display().to_string())
                && lines[0].contains("2 listeners, 2 routes, 2 backends"),
            "{}",
            out.stdout
        );
        let has = |parts: &[&str]| lines.iter().any(|l| parts.iter().all(|p| l.contains(p)));
        assert!(has(&["listen", "127.0.0.1:8443"]), "{}", out.stdout);
        assert!(has(&["listen", "[::1]:8443", "::1/128"]), "{}", out.stdout);
        assert!(
            has(&[
                "route[0]",
                "sni=tunnel.test",
                "alpn=h2",
                "pass a",
                "127.0.0.1:8001",
                "v2"
            ]),
            "{}",
            out.stdout
        );
        assert!(
            has(&[
                "route[1]",
                "sni=*.tunnel.test",
                "pass b",
                "unix:/run/b.sock",
                "none"
            ]),
            "{}",
            out.stdout
        );
        assert!(!out.stdout.contains("admin"), "{}", out.stdout);

        // An env override shows up as the admin line.
        let out = portico_check(&path, &[("PORTICO_ADMIN__METRICS", "127.0.0.1:9999")]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("admin") && l.contains("127.0.0.1:9999")),
            "{}",
            out.stdout
        );
    })
    .await
}

/// Assert `portico check` fails with exactly one stderr line naming the
/// file, the key path and (a fragment of) the reason.
async fn assert_check_fails(
    dir: &TempDir,
    name: &str,
    text: &str,
    env: &[(&str, &str)],
    key: &str,
    reason: &str,
) {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = portico_check(&path, env).await;
    assert_eq!(out.code, Some(1), "{name}: {out:?}");
    assert_eq!(out.stdout, "", "{name}: nothing on stdout: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line: {:?}", out.stderr);
    let expected = format!("{}: {key}: ", path.display());
    assert!(
        lines[0].contains(&expected),
        "{name}: expected {expected:?} in {:?}",
        lines[0]
    );
    let after = &lines[0][lines[0].find(&expected).unwrap() + expected.len()..];
    assert!(
        after.contains(reason),
        "{name}: reason {after:?} should mention {reason:?}"
    );
}

#[tokio::test]
async fn check_names_file_key_and_reason() {
    bounded(30, async {
        let dir = TempDir::new();
        let base = "[[listen]]\naddr = \"127.0.0.1:8443\"\n";
        let backend = "[backend.a]\naddr = \"127.0.0.1:8001\"\n";

        let unknown_backend = format!(
            "{base}[[route]]\nsni = [\"a.test\"]\npass = \"a\"\n[[route]]\npass = \"nope\"\n{backend}"
        );
        assert_check_fails(
            &dir,
            "a.toml",
            &unknown_backend,
            &[],
            "route[1].pass",
            "unknown backend \"nope\"",
        )
        .await;

        let duplicate = format!("{base}{base}[[route]]\npass = \"a\"\n{backend}");
        assert_check_fails(
            &dir,
            "b.toml",
            &duplicate,
            &[],
            "listen[1].addr",
            "duplicate",
        )
        .await;

        let two_actions = format!(
            "{base}[[route]]\npass = \"a\"\nterminate = \"s\"\n{backend}[site.s]\ncert = \"self-signed\"\n"
        );
        assert_check_fails(
            &dir,
            "c.toml",
            &two_actions,
            &[],
            "route[0]",
            "pass and terminate",
        )
        .await;

        let after_catch_all = format!(
            "{base}[[route]]\nsni = [\"a.test\"]\npass = \"a\"\n[[route]]\npass = \"a\"\n[[route]]\nsni = [\"b.test\"]\npass = \"a\"\n{backend}"
        );
        assert_check_fails(
            &dir,
            "d.toml",
            &after_catch_all,
            &[],
            "route[2]",
            "unreachable",
        )
        .await;

        let bad_cidr = format!(
            "{base}accept_proxy = true\ntrusted = [\"10.0.0.0/33\"]\n[[route]]\npass = \"a\"\n{backend}"
        );
        assert_check_fails(
            &dir,
            "e.toml",
            &bad_cidr,
            &[],
            "listen[0].trusted[0]",
            "10.0.0.0/33",
        )
        .await;

        let typo = format!("{base}acept_proxy = true\n[[route]]\npass = \"a\"\n{backend}");
        // The path names the unknown key itself, one level below `listen[0]`.
        assert_check_fails(
            &dir,
            "f.toml",
            &typo,
            &[],
            "listen[0].acept_proxy",
            "unknown field",
        )
        .await;

        let valid = format!("{base}[[route]]\npass = \"a\"\n{backend}");
        assert_check_fails(
            &dir,
            "g.toml",
            &valid,
            &[("PORTICO_TIMEOUTS__CLIENT_HELLO", "bogus")],
            "timeouts.client_hello",
            "\"bogus\"",
        )
        .await;
    })
    .await
}
