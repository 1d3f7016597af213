//! Site and connection state of terminated HTTP: a site compiled from its
//! config (router, locations, headers, upstream clients) and what the
//! handler knows about the connection a request came on.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::ResponseBody;
use super::exchange::Exchange;
use super::router::Router;
use super::upstream::UpstreamClient;
use crate::config::{Cors, MatchKind, Site, Target};
use crate::lifecycle::{ConnSlot, Lifecycle};

/// A location ready to serve.
pub struct LocationRuntime {
    pub name: Arc<str>,
    pub metrics: Arc<crate::metrics::LocationMetrics>,
    pub action: Action,
    pub websocket: crate::config::WebSocketMode,
    /// `websocket = "auto"`: the upstream's remembered refusal.
    pub ws_refusals: super::ws_auto::Refusals,
}

/// What a location does with a request, prepared at config load.
pub enum Action {
    /// A fixed answer (`respond = {..}`).
    Respond {
        status: StatusCode,
        body: Bytes,
        content_type: HeaderValue,
    },
    /// Proxy to the upstream's pool.
    Upstream(Arc<UpstreamClient>),
}

/// A site ready to serve: compiled router, headers, upstream clients.
pub struct SiteRuntime {
    pub name: Arc<str>,
    pub config: Arc<Site>,
    pub router: Router,
    pub locations: Vec<LocationRuntime>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// CORS preflight answer headers (methods, headers, max-age).
    pub preflight: Vec<(HeaderName, HeaderValue)>,
    pub idle: std::time::Duration,
    /// `limits.max_uri_length`: longer request targets get 414.
    pub max_uri: usize,
    /// Metrics of requests no location takes (404, 421, 400): `location="none"`.
    pub unmatched: Arc<crate::metrics::LocationMetrics>,
}

impl SiteRuntime {
    pub fn new(
        site: Arc<Site>,
        clients: &BTreeMap<String, Arc<UpstreamClient>>,
        idle: std::time::Duration,
        max_uri: usize,
    ) -> Result<SiteRuntime, String> {
        let router = Router::new(
            site.locations
                .iter()
                .map(|l| (l.path.as_str(), l.match_kind == MatchKind::Exact)),
        );
        let mut locations = Vec::with_capacity(site.locations.len());
        for l in &site.locations {
            locations.push(LocationRuntime {
                name: Arc::from(l.name.as_str()),
                metrics: Arc::new(crate::metrics::LocationMetrics::new(&site.name, &l.name)),
                action: match &l.target {
                    Target::Upstream(u) => match clients.get(&u.name) {
                        Some(c) => Action::Upstream(c.clone()),
                        None => return Err(format!("no pool for upstream {:?}", u.name)),
                    },
                    Target::Respond {
                        status,
                        body,
                        content_type,
                    } => Action::Respond {
                        status: *status,
                        body: body.clone(),
                        content_type: content_type.clone(),
                    },
                },
                websocket: l.websocket,
                ws_refusals: Default::default(),
            });
        }
        let headers = site.headers.clone();
        let unmatched = Arc::new(crate::metrics::LocationMetrics::new(&site.name, "none"));
        let preflight = site
            .cors
            .as_ref()
            .map(preflight_headers)
            .unwrap_or_default();
        Ok(SiteRuntime {
            name: Arc::from(site.name.as_str()),
            config: site,
            router,
            locations,
            headers,
            preflight,
            idle,
            max_uri,
            unmatched,
        })
    }

    pub fn admits_host(&self, host: &str) -> bool {
        self.config.any_name || self.config.names.iter().any(|p| p.matches(host))
    }

    /// The site's configured response headers (`headers = {..}`).
    pub fn add_headers(&self, h: &mut http::HeaderMap) {
        for (k, v) in &self.headers {
            h.insert(k.clone(), v.clone());
        }
    }

    /// Site headers, then attach the exchange (metrics + access log) to the body.
    pub fn finish(&self, mut resp: Response<ResponseBody>, ex: Exchange) -> Response<ResponseBody> {
        self.add_headers(resp.headers_mut());
        resp.map(|b| b.with_exchange(ex))
    }
}

/// Per-connection facts the handler needs.
pub struct ConnContext {
    pub client: IpAddr,
    /// The client's address as forwarding headers carry it.
    pub forwarded: super::headers::ClientAddr,
    /// Set by the HTTP/1.x framing guard when it refused a request head.
    pub verdict: Arc<super::framing::Verdict>,
    /// Upgraded streams outlive their request: tracked for shutdown drains
    /// and cut when the grace period is over.
    pub life: Lifecycle,
    /// The connection's permit and active count; an upgraded stream keeps a
    /// clone so the connection counts until its socket closes.
    pub slot: Arc<ConnSlot>,
}

/// The headers a preflight answer adds besides the allowed origin; built
/// once per site from values checked at config load.
fn preflight_headers(cors: &Cors) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (header::ACCESS_CONTROL_ALLOW_METHODS, cors.methods.clone()),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, cors.headers.clone()),
        (
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(cors.max_age.as_secs()),
        ),
    ]
}
