//! The HTTP half of the benchmark tools: an origin, an SSE latency client and
//! a WebSocket echo client. Latencies are measured on this host's clock: the
//! origin stamps each event with the wall-clock time it wrote it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub async fn origin(listen: &str) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(serve_origin);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn query_param_opt(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    })
}

fn query_param(req: &Request<Incoming>, name: &str, default: u64) -> u64 {
    query_param_opt(req, name).unwrap_or(default)
}

async fn serve_origin(mut req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    match req.uri().path() {
        "/sse" => {
            let n = query_param(&req, "n", 20);
            let interval = Duration::from_millis(query_param(&req, "interval_ms", 50));
            // Ticks at a fixed phase of the wall clock (`phase_us` into each
            // interval), not relative to when the request arrived: requests
            // that reach the origin together (handshakes queued behind each
            // other) would otherwise tick together, and the p99 would measure
            // that burst instead of the front.
            // `first_ms` instead fires the first event that long after the
            // request arrives (M7 holds streams open: their first event must
            // not wait for a phase a slow front has just missed).
            let first = match query_param_opt(&req, "first_ms") {
                Some(ms) => tokio::time::Instant::now() + Duration::from_millis(ms),
                None => {
                    let phase = query_param(&req, "phase_us", 0) as u128 * 1000;
                    let period = interval.as_nanos().max(1);
                    let wait = (phase + period - (now_ns() % period)) % period;
                    tokio::time::Instant::now() + Duration::from_nanos(wait as u64)
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(first, interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                for _ in 0..n {
                    tick.tick().await;
                    let ev = format!("data: {}\n\n", now_ns());
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                }
            });
            let body = StreamBody::new(tokio_stream_from(rx));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok(r)
        }
        "/v1/responses" => {
            let key = req.headers().get("sec-websocket-key").map(|k| {
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes())
            });
            let Some(accept) = key else {
                let mut r =
                    Response::new(Full::new(Bytes::from_static(b"websocket only\n")).boxed());
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Close(_)) {
                        return;
                    }
                    let echo = matches!(m, Message::Text(_) | Message::Binary(_));
                    if echo && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            h.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("Upgrade"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&accept) {
                h.insert("sec-websocket-accept", v);
            }
            Ok(r)
        }
        _ => {
            let mut r =
                Response::new(Full::new(Bytes::from_static(b"hello from origin\n")).boxed());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            Ok(r)
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Accepts any certificate: the fronts under test use throwaway ones.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) async fn dial(addr: &str, sni: Option<&str>) -> Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    match sni {
        None => Ok(Box::new(tcp)),
        Some(name) => {
            let server = rustls::pki_types::ServerName::try_from(name.to_string())?;
            Ok(Box::new(tls_connector().connect(server, tcp).await?))
        }
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

#[derive(clap::Args)]
pub struct SseArgs {
    #[arg(long)]
    connect: String,
    /// Speak TLS with this SNI (omit for the direct, plain-HTTP floor).
    #[arg(long)]
    sni: Option<String>,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 200)]
    streams: usize,
    #[arg(long, default_value_t = 40)]
    events: u64,
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Print `{"open":N}` once every stream has its first event, then keep
    /// reading: the caller samples the front's memory at that moment.
    #[arg(long)]
    announce_open: bool,
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Also write every measured event as `stream sent_ns latency_ms` here,
    /// to see whether slow events cluster in time or in streams.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

pub async fn sse(a: SseArgs) -> Result<()> {
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_open = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for i in 0..a.streams {
        let connect = a.connect.clone();
        let sni = a.sni.clone();
        let host = a.host.clone();
        let (opened, all_open, streams) = (opened.clone(), all_open.clone(), a.streams);
        let (events, interval) = (a.events, a.interval_ms);
        // Spread the streams over one interval, as independent streams
        // would be: otherwise every event of every stream fires in the same
        // instant and the p99 measures the burst, not the front.
        let phase_us = interval * 1000 * i as u64 / a.streams.max(1) as u64;
        let offset = Duration::from_micros(phase_us);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut lat = Vec::with_capacity(events as usize);
            let io = dial(&connect, sni.as_deref()).await?;
            let mut rd = BufReader::new(io);
            let req = format!(
                "GET /sse?n={events}&interval_ms={interval}&phase_us={phase_us} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
            );
            rd.get_mut().write_all(req.as_bytes()).await?;
            let mut line = String::new();
            let mut first = true;
            let mut seen = 0u64;
            while seen < events {
                line.clear();
                if rd.read_line(&mut line).await? == 0 {
                    break;
                }
                // Chunked framing lines are not `data:` lines; skip them.
                if let Some(ts) = line.trim().strip_prefix("data: ") {
                    if let Ok(sent) = ts.parse::<u128>() {
                        seen += 1;
                        // Steady state only: while streams are still opening,
                        // their TLS handshakes compete with the events.
                        if opened.load(std::sync::atomic::Ordering::SeqCst) >= streams {
                            lat.push((sent, now_ns().saturating_sub(sent) as f64 / 1e6));
                        }
                        if first {
                            first = false;
                            if opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == streams {
                                all_open.notify_one();
                            }
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((i, lat))
        }));
    }
    if a.announce_open {
        tokio::time::timeout(Duration::from_secs(a.deadline_secs), all_open.notified())
            .await
            .context("streams did not all open")?;
        println!("{{\"open\":{}}}", a.streams);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    let all = tokio::time::timeout(Duration::from_secs(a.deadline_secs), async {
        let mut all = Vec::new();
        let mut dump = String::new();
        for t in tasks {
            let (stream, lat) = t.await??;
            for (sent, ms) in lat {
                if a.dump.is_some() {
                    dump.push_str(&format!("{stream} {sent} {ms:.3}\n"));
                }
                all.push(ms);
            }
        }
        if let Some(path) = &a.dump {
            std::fs::write(path, dump).with_context(|| format!("write {}", path.display()))?;
        }
        Ok::<_, anyhow::Error>(all)
    })
    .await
    .context("deadline")??;
    let count = all.len();
    let (p50, p99, max) = percentiles(all);
    println!("{{\"events\":{count},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3}}}");
    Ok(())
}

#[derive(clap::Args)]
pub struct WsArgs {
    #[arg(long)]
    connect: String,
    #[arg(long)]
    sni: Option<String>,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    #[arg(long, default_value_t = 200)]
    messages: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Each connection sends one message per interval (phases spread over
    /// the interval), once all connections are open. 0: back to back, which
    /// measures the load core's queue more than the front.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
}

pub async fn ws(a: WsArgs) -> Result<()> {
    let mut tasks = Vec::new();
    let payload = "x".repeat(a.size);
    let all_open = Arc::new(tokio::sync::Barrier::new(a.connections));
    let interval = Duration::from_millis(a.interval_ms);
    for i in 0..a.connections {
        let connect = a.connect.clone();
        let sni = a.sni.clone();
        let url = format!("ws://{}/v1/responses", a.host);
        let payload = payload.clone();
        let n = a.messages;
        let all_open = all_open.clone();
        let phase = interval.mul_f64(i as f64 / a.connections.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            let io = dial(&connect, sni.as_deref()).await?;
            let (mut ws, _) = tokio_tungstenite::client_async(url, io).await?;
            let mut rtt = Vec::with_capacity(n);
            all_open.wait().await;
            let mut tick = (!interval.is_zero()).then(|| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            for _ in 0..n {
                if let Some(tick) = tick.as_mut() {
                    tick.tick().await;
                }
                let t = Instant::now();
                ws.send(Message::text(payload.clone())).await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => break,
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.into()),
                        None => anyhow::bail!("closed"),
                    }
                }
                rtt.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = ws.close(None).await;
            Ok::<_, anyhow::Error>(rtt)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(a.deadline_secs), async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok::<_, anyhow::Error>(all)
    })
    .await
    .context("deadline")??;
    let count = all.len();
    let (p50, p99, max) = percentiles(all);
    println!(
        "{{\"messages\":{count},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3}}}"
    );
    Ok(())
}
