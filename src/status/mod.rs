//! The live status page and its API on the admin listener: `/` (HTML),
//! `/status.json` and `/status/events` (SSE).
//!
//! Nothing here runs per proxied request. A document is built on demand
//! from one rendering of the metrics registry (the text `/metrics` serves,
//! parsed back, so the numbers are the same counters) plus the config
//! generation in force and the ring of recent errors; `/status/events`
//! shares one such document per second among all watchers and computes
//! none when nobody watches.

pub mod auth;
pub mod cert;
pub mod events;
pub mod json;
pub mod prom;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Admin, Config};
use cert::CertInfo;
use events::Hub;
use json::ReloadDoc;

/// Response bodies of the admin listener (whole, or the event stream).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The page: one file, no external resources.
const PAGE: &str = include_str!("page.html");

/// The config generation in force, as the status page describes it.
pub struct Loaded {
    pub config: Arc<Config>,
    /// 1 at start, +1 per successful reload.
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub certs: BTreeMap<String, CertInfo>,
    pub last_reload: Option<ReloadDoc>,
}

impl Loaded {
    fn new(config: Arc<Config>, generation: u64, last_reload: Option<ReloadDoc>) -> Loaded {
        let certs = config
            .sites
            .iter()
            .map(|(name, site)| (name.clone(), cert::certificate_info(site)))
            .collect();
        Loaded {
            config,
            generation,
            loaded_at: SystemTime::now(),
            certs,
            last_reload,
        }
    }
}

/// The status page's state: the metrics handle, the loaded generation and
/// the event producer.
pub struct Status {
    handle: PrometheusHandle,
    started: Instant,
    loaded: Mutex<Arc<Loaded>>,
    hub: Arc<Hub>,
}

impl Status {
    pub fn new(handle: PrometheusHandle, config: Arc<Config>) -> Arc<Status> {
        Arc::new(Status {
            handle,
            started: Instant::now(),
            loaded: Mutex::new(Arc::new(Loaded::new(config, 1, None))),
            hub: Arc::new(Hub::new(Duration::from_secs(1))),
        })
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Record a reload: the new config on success, the message on failure
    /// (the old generation stays in force, as in the server).
    pub fn reloaded(&self, result: Result<Arc<Config>, &str>) {
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        *slot = Arc::new(match result {
            Ok(config) => Loaded::new(
                config,
                slot.generation + 1,
                Some(ReloadDoc {
                    ok: true,
                    at,
                    error: None,
                }),
            ),
            Err(e) => Loaded {
                config: slot.config.clone(),
                generation: slot.generation,
                loaded_at: slot.loaded_at,
                certs: slot.certs.clone(),
                last_reload: Some(ReloadDoc {
                    ok: false,
                    at,
                    error: Some(e.to_string()),
                }),
            },
        });
    }

    /// The status document now.
    pub fn document(&self) -> json::Document {
        self.handle.run_upkeep();
        let snap = prom::Snapshot::parse(&self.handle.render());
        json::build(
            &snap,
            &self.loaded(),
            self.started.elapsed().as_secs(),
            crate::recent_errors::snapshot(),
            SystemTime::now(),
        )
    }

    /// Whether a `/metrics` request may be answered: always, unless
    /// `admin.protect_metrics` asks for the token there too.
    pub fn metrics_allowed(&self, headers: &HeaderMap) -> bool {
        let loaded = self.loaded();
        match (
            &loaded.config.admin.token,
            loaded.config.admin.protect_metrics,
        ) {
            (Some(token), true) => auth::allowed(headers, token),
            _ => true,
        }
    }

    /// Answer `/`, `/status.json` and `/status/events`; `None` for other paths.
    pub fn respond(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        stop: &CancellationToken,
    ) -> Option<Response<Body>> {
        let path = uri.path();
        if !matches!(path, "/" | "/status.json" | "/status/events") {
            return None;
        }
        if method != Method::GET && method != Method::HEAD {
            return Some(whole(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD here\n",
            ));
        }
        if let Some(token) = self.loaded().config.admin.token.clone() {
            if path == "/" {
                if let Some(given) = auth::query_token(uri.query()) {
                    if !token.matches(&given) {
                        return Some(unauthorized());
                    }
                    // Keep it in a cookie and drop it from the address bar.
                    let mut r = whole(StatusCode::SEE_OTHER, "text/plain", "");
                    r.headers_mut()
                        .insert(header::LOCATION, HeaderValue::from_static("/"));
                    if let Some(c) = auth::set_cookie(&given) {
                        r.headers_mut().insert(header::SET_COOKIE, c);
                    }
                    return Some(r);
                }
            }
            if !auth::allowed(headers, &token) {
                return Some(unauthorized());
            }
        }
        Some(match path {
            "/" => {
                let mut r = whole(StatusCode::OK, "text/html; charset=utf-8", PAGE);
                // Inline script and style only; data only from this origin.
                r.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
                    ),
                );
                r
            }
            "/status.json" => {
                let mut text = serde_json::to_string_pretty(&self.document())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                text.push('\n');
                whole(StatusCode::OK, "application/json", text)
            }
            _ => self.events(stop.clone()),
        })
    }

    fn events(self: &Arc<Self>, stop: CancellationToken) -> Response<Body> {
        let me = self.clone();
        let rx = self.hub.subscribe(move || {
            serde_json::to_value(me.document()).unwrap_or(serde_json::Value::Null)
        });
        let frames = events::stream(rx, stop).map(|b| Ok(http_body::Frame::data(b)));
        let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// A whole response with a content type (no caching: it is live data).
pub fn whole(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// 401 with `WWW-Authenticate: Bearer`.
pub fn unauthorized() -> Response<Body> {
    let mut r = whole(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        auth::UNAUTHORIZED,
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"portico admin\""),
    );
    r
}

/// What to say at start about who can reach the admin listener: a warning
/// when it listens beyond loopback without a token, a note when the token
/// leaves `/metrics` open there. The token itself is never part of it.
pub fn exposure(addr: SocketAddr, admin: &Admin) -> Option<(tracing::Level, &'static str)> {
    if addr.ip().is_loopback() {
        None
    } else if admin.token.is_none() {
        Some((tracing::Level::WARN, "the admin listener is on a non-loopback address without admin.token: anyone who can reach it sees the status page and /metrics; set admin.token, or bind it to 127.0.0.1 and use SSH port forwarding"))
    } else if !admin.protect_metrics {
        Some((tracing::Level::INFO, "admin.token protects the status page; /metrics stays open (set admin.protect_metrics = true to protect it too)"))
    } else {
        None
    }
}

/// Log [`exposure`]'s message, if any.
pub fn warn_if_exposed(addr: SocketAddr, admin: &Admin) {
    match exposure(addr, admin) {
        Some((tracing::Level::WARN, msg)) => tracing::warn!(%addr, "{msg}"),
        Some((_, msg)) => tracing::info!(%addr, "{msg}"),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn exposure_warns_beyond_loopback_without_a_token() {
        let open = Admin {
            metrics: None,
            token: None,
            protect_metrics: false,
        };
        let with_token = Admin {
            token: Some(Secret::new("t0ken".into())),
            ..open.clone()
        };
        let protected = Admin {
            protect_metrics: true,
            ..with_token.clone()
        };
        let lo: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9100".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9100".parse().unwrap();
        let lan: SocketAddr = "192.168.1.5:9100".parse().unwrap();
        assert_eq!(exposure(lo, &open), None);
        assert_eq!(exposure(lo6, &open), None);
        for a in [any, lan] {
            let (level, msg) = exposure(a, &open).unwrap();
            assert_eq!(level, tracing::Level::WARN);
            assert!(msg.contains("without admin.token"));
            assert_eq!(
                exposure(a, &with_token).map(|e| e.0),
                Some(tracing::Level::INFO)
            );
            assert_eq!(exposure(a, &protected), None);
        }
        // The token never shows in Debug output (and so in no `?` log field).
        assert!(!format!("{with_token:?}").contains("t0ken"));
    }
}
