//! The floor front: the smallest forwarder built from the crates and settings
//! portico is built from, so `bench/run` can tell what is portico's own cost
//! and what is the crates'. It has no routing table, metrics, logging, limits
//! or error pages:
//!
//! - tokio current-thread runtime, mimalloc, transparent huge pages off;
//! - tokio-rustls with portico's server TLS settings (aws-lc-rs, the same
//!   cipher-suite and key-exchange order, server order preferred, stateless
//!   tickets, one TLS 1.3 ticket, ALPN h2 + http/1.1);
//! - hyper-util's auto server (HTTP/1.1 + h2) with portico's h1/h2 settings;
//! - upstream HTTP/1.1 through hyper-util's pooled client with portico's pool
//!   settings; `/sse` is streamed through as it comes, `/v1/responses`
//!   WebSocket upgrades are spliced with `copy_bidirectional`.
//!
//! `floor --listen ADDR --cert PEM --key PEM --fast ADDR --origin ADDR`:
//! paths `/sse*` and exactly `/v1/responses` go to `--origin`, the rest to
//! `--fast` (the two origins of the benchmark topology).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    cert: String,
    #[arg(long)]
    key: String,
    /// Origin for every path but the two below.
    #[arg(long)]
    fast: String,
    /// Origin for `/sse*` and `/v1/responses`.
    #[arg(long)]
    origin: String,
    /// Idle upstream connections kept per origin (bench/run's KEEPALIVE).
    #[arg(long, default_value_t = 1024)]
    keepalive: usize,
}

type Body = BoxBody<Bytes, hyper::Error>;

struct Floor {
    client: Client<HttpConnector, Incoming>,
    fast: String,
    origin: String,
}

fn main() -> Result<()> {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn tls_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>> {
    use aws_lc_rs::cipher_suite as cs;
    use aws_lc_rs::kx_group as kx;
    let mut p = aws_lc_rs::default_provider();
    // portico's order (src/tls.rs), and its key-exchange order (rustls'
    // prefer-post-quantum feature, on in portico).
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    p.kx_groups = vec![kx::X25519MLKEM768, kx::X25519, kx::SECP256R1, kx::SECP384R1];
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {cert}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {cert}"))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {key}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    cfg.ticketer = aws_lc_rs::Ticketer::new()?;
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

async fn run(args: Args) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&args.cert, &args.key)?);
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(args.keepalive)
        .pool_idle_timeout(Duration::from_secs(4))
        .retry_canceled_requests(true);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let floor = Arc::new(Floor {
        client: b.build(connector),
        fast: args.fast,
        origin: args.origin,
    });
    let listener = TcpListener::bind(&args.listen).await?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let floor = floor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            serve(tls, floor).await;
        });
    }
}

async fn serve(tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>, floor: Arc<Floor>) {
    // portico's settings (src/http/mod.rs) with its default limits.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        .max_headers(100);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(256)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let svc = hyper::service::service_fn(move |req| {
        let floor = floor.clone();
        async move { Ok::<_, Infallible>(forward(req, &floor).await) }
    });
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .await;
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r
}

async fn forward(mut req: Request<Incoming>, floor: &Floor) -> Response<Body> {
    let path = req.uri().path();
    let ws = path == "/v1/responses";
    let authority = if ws || path.starts_with("/sse") {
        &floor.origin
    } else {
        &floor.fast
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = Uri::try_from(format!("http://{authority}{pq}")) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let client_upgrade = ws.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let Ok(mut resp) = floor.client.request(Request::from_parts(parts, body)).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status())
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Empty::new().map_err(|e| match e {}).boxed());
    }
    resp.map(|b| b.boxed())
}
