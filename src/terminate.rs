//! `terminate` routes: the TLS handshake (over the peeked bytes), then HTTP,
//! or the site's `non_http` backend for decrypted streams that are not HTTP.
//! Also the plain-HTTP `redirect` route.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use bytes::BytesMut;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::config::{Config, ConfigError};
use crate::hello::{self, Peeked};
use crate::http::proxy::{ConnContext, SiteRuntime};
use crate::http::upstream::UpstreamClient;
use crate::http::{self as h, Negotiated, ServeOptions};
use crate::io::Prefixed;
use crate::listener::{ConnInfo, Generation, Shared};
use crate::metrics as m;
use crate::proxy_protocol::Outbound;
use crate::tunnel;

/// What an h2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A terminated site ready for connections.
pub struct SiteEntry {
    pub acceptor: TlsAcceptor,
    pub http: Arc<SiteRuntime>,
}

/// Per-site TLS and HTTP state built from a config.
#[derive(Default)]
pub struct Sites {
    sites: HashMap<String, SiteEntry>,
}

impl Sites {
    /// Load every certificate and compile every site. Errors name the key.
    pub fn build(cfg: &Config) -> Result<Sites, ConfigError> {
        let clients: BTreeMap<String, Arc<UpstreamClient>> = cfg
            .upstreams
            .iter()
            .map(|(name, u)| {
                (
                    name.clone(),
                    Arc::new(UpstreamClient::new(
                        u.clone(),
                        cfg.timeouts.upstream_connect,
                    )),
                )
            })
            .collect();
        let mut sites = HashMap::new();
        for (name, site) in &cfg.sites {
            let tls = crate::tls::server_config(site).map_err(|reason| ConfigError {
                source: cfg.source.clone(),
                key: format!("site.{name}.cert"),
                reason,
            })?;
            sites.insert(
                name.clone(),
                SiteEntry {
                    acceptor: TlsAcceptor::from(tls),
                    http: Arc::new(SiteRuntime::new(
                        site.clone(),
                        &clients,
                        cfg.timeouts.idle,
                        cfg.limits.max_uri_length,
                    )),
                },
            );
        }
        Ok(Sites { sites })
    }

    pub fn get(&self, name: &str) -> Option<&SiteEntry> {
        self.sites.get(name)
    }
}

/// Complete the TLS handshake on a connection routed to `site`, then serve it.
pub async fn serve(
    io: Prefixed<TcpStream>,
    site: &str,
    info: ConnInfo,
    gen: Arc<Generation>,
    shared: Arc<Shared>,
) {
    let Some(entry) = gen.terminate.get(site) else {
        return;
    };
    let cfg = &gen.config;
    let handshake = tokio::select! {
        r = tokio::time::timeout(cfg.timeouts.tls_handshake, entry.acceptor.accept(io)) => r,
        // No request can be in progress before the handshake is done.
        _ = shared.shutdown.cancelled() => return,
    };
    let mut tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "site" => site.to_string()).increment(1);
            debug!(site, client = %info.client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "site" => site.to_string()).increment(1);
            debug!(site, client = %info.client, "TLS handshake timed out");
            return;
        }
    };
    let negotiated = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Negotiated::H2,
        Some(b"http/1.1") => Negotiated::Http1,
        _ => Negotiated::Unknown,
    };

    let mut first = BytesMut::new();
    if let Some(backend) = &entry.http.config.non_http {
        // The first decrypted bytes decide: HTTP goes to the HTTP server,
        // anything else (VLESS, Trojan, ...) to the non_http backend.
        let peeked = tokio::select! {
            p = hello::peek(&mut tls, &mut first, cfg.timeouts.request_header) => p,
            _ = shared.shutdown.cancelled() => return,
        };
        match peeked {
            Ok(Peeked::Http) => {}
            Ok(_) | Err(hello::PeekError::Detect(_)) => {
                // Owned: the TLS stream moves into the tunnel below.
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().map(str::to_string);
                let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                let out = Outbound {
                    source: info.client,
                    destination: info.local,
                    sni: sni.as_deref(),
                    alpn: alpn.as_deref(),
                };
                let job = tunnel::Job::new(backend, &out, &first, site, &cfg.timeouts, false);
                // Boxed so HTTP connections do not reserve the tunnel's space.
                Box::pin(tunnel::serve(
                    tunnel::ClientSide::Stream(tls),
                    job,
                    shared.hard_stop.cancelled(),
                ))
                .await;
                return;
            }
            Err(e) => {
                debug!(site, client = %info.client, error = %e, "no first bytes after the handshake; closing");
                return;
            }
        }
    }

    // hyper-util's auto builder reads the first bytes to choose HTTP/1.1 or
    // h2 with no deadline (its http1_only/http2_only do nothing with
    // serve_connection_with_upgrades), and hyper's header_read_timeout only
    // starts after that. Read them here, within request_header, so a client
    // that completes the handshake and then stays silent, or stops inside
    // the h2 preface, does not hold its connection slot forever.
    let version_known = async {
        loop {
            let n = first.len().min(H2_PREFACE.len());
            if n == H2_PREFACE.len() || (n > 0 && first[..n] != H2_PREFACE[..n]) {
                return true;
            }
            match tls.read_buf(&mut first).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    };
    let known = tokio::select! {
        r = tokio::time::timeout(cfg.timeouts.request_header, version_known) => matches!(r, Ok(true)),
        _ = shared.shutdown.cancelled() => return,
    };
    if !known {
        debug!(site, client = %info.client, "no request within request_header after the handshake; closing");
        return;
    }

    let verdict = Arc::new(crate::http::framing::Verdict::default());
    let ctx = Arc::new(ConnContext {
        client: info.client.ip(),
        verdict: verdict.clone(),
        tasks: shared.tasks.clone(),
        hard_stop: shared.hard_stop.clone(),
    });
    h::serve(
        crate::http::framing::Framing::new(
            Prefixed::new(first, tls),
            cfg.limits.max_header_size,
            verdict,
            negotiated != Negotiated::H2,
            cfg.timeouts.request_header,
        ),
        entry.http.clone(),
        ctx,
        ServeOptions {
            limits: cfg.limits,
            timeouts: cfg.timeouts,
            shutdown: shared.shutdown.clone(),
            hard_stop: shared.hard_stop.clone(),
        },
    )
    .await;
}

/// Answer every request on a plain-HTTP connection with a 308 to https.
pub async fn redirect(
    io: Prefixed<TcpStream>,
    info: ConnInfo,
    gen: Arc<Generation>,
    shared: Arc<Shared>,
) {
    let svc =
        service_fn(
            |req: Request<Incoming>| async move { Ok::<_, Infallible>(redirect_response(&req)) },
        );
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(gen.config.timeouts.request_header)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(client = %info.client, error = %e, "redirect connection error");
            }
        }
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
        }
    }
}

fn redirect_response(req: &Request<Incoming>) -> Response<Full<bytes::Bytes>> {
    // acme wiring: HTTP-01 validation requests are answered before redirecting.
    if let Some(answer) = crate::acme::http01_response(req.uri().path()) {
        return answer;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host.filter(|h| !h.is_empty() && !h.contains(['/', '\\', '@', ' '])) else {
        let mut r = Response::new(Full::from("bad request: missing Host header\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    // Drop the port of the plain listener: https is on its default port.
    let name = if host.starts_with('[') {
        host.split_inclusive(']')
            .next()
            .unwrap_or(&host)
            .to_string()
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            _ => host.clone(),
        }
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{name}{path}");
    let mut r = Response::new(Full::from(format!("moved to {location}\n")));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
