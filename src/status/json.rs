//! The status document (`/status.json`), built from one rendering of the
//! metrics registry plus the config generation in force: every number is
//! read from the same counters `/metrics` shows at that moment.

use std::time::SystemTime;

use serde::Serialize;

use super::cert::{days_left, CertInfo};
use super::prom::Snapshot;
use super::Loaded;
use crate::config::{Address, Config, MatchKind, Target, UpstreamProtocol};
use crate::metrics as m;
use crate::recent_errors::RecentError;

/// The gauge the ACME work publishes per site; preferred when present.
pub const CERT_EXPIRY_GAUGE: &str = "portico_certificate_expiry_timestamp_seconds";

#[derive(Debug, Serialize)]
pub struct Document {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub config: ConfigDoc,
    pub listeners: Vec<ListenerDoc>,
    pub routes: Vec<RouteDoc>,
    pub sites: Vec<SiteDoc>,
    pub backends: Vec<BackendDoc>,
    pub upstreams: Vec<UpstreamDoc>,
    pub recent_errors: Vec<ErrorDoc>,
}

#[derive(Debug, Serialize)]
pub struct ConfigDoc {
    /// The file, or `null` for the embedded default.
    pub path: Option<String>,
    pub loaded_at: String,
    /// 1 at start, +1 per successful reload.
    pub generation: u64,
    /// `null` until the first reload.
    pub last_reload: Option<ReloadDoc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadDoc {
    pub ok: bool,
    pub at: String,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerDoc {
    pub addr: String,
    pub accept_proxy: bool,
    pub connections_active: u64,
}

#[derive(Debug, Serialize)]
pub struct RouteDoc {
    pub index: usize,
    pub sni: Vec<String>,
    pub alpn: Vec<String>,
    pub protocol: &'static str,
    pub take_silent: bool,
    /// As `portico check` prints it, e.g. `terminate api (2 locations)`.
    pub action: String,
}

#[derive(Debug, Serialize)]
pub struct SiteDoc {
    pub name: String,
    pub certificate: CertDoc,
    pub locations: Vec<LocationDoc>,
}

#[derive(Debug, Serialize)]
pub struct CertDoc {
    pub source: &'static str,
    pub path: Option<String>,
    pub names: Vec<String>,
    pub not_after: Option<String>,
    pub days_left: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LocationDoc {
    pub name: String,
    pub path: String,
    #[serde(rename = "match")]
    pub match_kind: &'static str,
    /// The upstream's name; `null` for `respond` locations.
    pub upstream: Option<String>,
    pub requests_total: u64,
    /// Requests answered with a 5xx status.
    pub errors_total: u64,
    pub active: Active,
    pub first_byte_ms: FirstByte,
}

#[derive(Debug, Serialize)]
pub struct Active {
    pub http: u64,
    pub sse: u64,
    pub websocket: u64,
}

/// Since start, from the histogram's buckets (interpolated inside one).
#[derive(Debug, Serialize)]
pub struct FirstByte {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct BackendDoc {
    pub name: String,
    pub addr: String,
    pub proxy_protocol: &'static str,
    pub tunnels_active: u64,
    pub bytes_total: u64,
    pub connect_failures_total: u64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamDoc {
    pub name: String,
    pub url: String,
    pub protocol: &'static str,
    pub keepalive: usize,
    /// Open pooled connections (`portico_upstream_connections`).
    pub connections: u64,
    /// The open ones not carrying a request: `connections` less the HTTP
    /// and SSE responses open on the locations that use this upstream (for
    /// h2c, whose requests share a connection, less one while any is open).
    pub idle_connections: Option<u64>,
    pub failures_total: u64,
}

#[derive(Debug, Serialize)]
pub struct ErrorDoc {
    pub at: String,
    pub kind: &'static str,
    pub site: Option<String>,
    pub location: Option<String>,
    pub status: Option<u16>,
    pub error: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Milliseconds, to 0.1 ms.
fn ms(seconds: Option<f64>) -> Option<f64> {
    seconds.map(|s| (s * 10_000.0).round() / 10.0)
}

/// Build the document from one metrics snapshot and the loaded generation.
pub fn build(
    snap: &Snapshot,
    loaded: &Loaded,
    uptime_seconds: u64,
    errors: Vec<RecentError>,
    now: SystemTime,
) -> Document {
    let cfg = &*loaded.config;
    Document {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds,
        config: ConfigDoc {
            path: cfg.path.as_ref().map(|p| p.display().to_string()),
            loaded_at: rfc3339(loaded.loaded_at),
            generation: loaded.generation,
            last_reload: loaded.last_reload.clone(),
        },
        listeners: cfg
            .listeners
            .iter()
            .map(|l| {
                let addr = l.addr.to_string();
                ListenerDoc {
                    connections_active: count(
                        snap.sum(m::CONNECTIONS_ACTIVE, &[("listener", &addr)]),
                    ),
                    addr,
                    accept_proxy: l.accept_proxy,
                }
            })
            .collect(),
        routes: routes(cfg),
        sites: cfg
            .sites
            .values()
            .map(|site| SiteDoc {
                name: site.name.clone(),
                certificate: certificate(snap, &site.name, loaded.certs.get(&site.name), now),
                locations: site
                    .locations
                    .iter()
                    .map(|l| location(snap, &site.name, l))
                    .collect(),
            })
            .collect(),
        backends: cfg
            .backends
            .values()
            .map(|b| {
                let want = [("backend", &*b.name)];
                BackendDoc {
                    name: b.name.to_string(),
                    addr: b.addr.to_string(),
                    proxy_protocol: b.proxy_protocol.as_str(),
                    tunnels_active: count(snap.sum(m::TUNNEL_ACTIVE, &want)),
                    bytes_total: count(snap.sum(m::TUNNEL_BYTES, &want)),
                    connect_failures_total: count(snap.sum(m::BACKEND_CONNECT_FAILURES, &want)),
                }
            })
            .collect(),
        upstreams: cfg
            .upstreams
            .values()
            .map(|u| UpstreamDoc {
                name: u.name.clone(),
                url: match &u.addr {
                    Address::Tcp(a) => format!("http://{a}"),
                    Address::Unix(p) => format!("unix:{}", p.display()),
                },
                protocol: match u.protocol {
                    UpstreamProtocol::Http1 => "http1",
                    UpstreamProtocol::H2c => "h2c",
                },
                keepalive: u.keepalive,
                connections: count(snap.sum(m::UPSTREAM_CONNECTIONS, &[("upstream", &u.name)])),
                idle_connections: Some(idle_connections(snap, cfg, u)),
                failures_total: count(snap.sum(m::UPSTREAM_FAILURES, &[("upstream", &u.name)])),
            })
            .collect(),
        recent_errors: errors
            .into_iter()
            .map(|e| ErrorDoc {
                at: humantime::format_rfc3339_millis(e.at).to_string(),
                kind: e.kind,
                site: e.site.map(|s| s.to_string()),
                location: e.location.map(|s| s.to_string()),
                status: e.status,
                error: e.error,
            })
            .collect(),
    }
}

/// Pooled connections of `u` that carry no request right now.
fn idle_connections(
    snap: &Snapshot,
    cfg: &crate::config::Config,
    u: &crate::config::Upstream,
) -> u64 {
    let open = snap.sum(m::UPSTREAM_CONNECTIONS, &[("upstream", &u.name)]);
    let mut busy = 0.0;
    for (site, s) in &cfg.sites {
        for l in &s.locations {
            if matches!(&l.target, Target::Upstream(t) if t.name == u.name) {
                for kind in ["http", "sse"] {
                    let want = [
                        ("site", site.as_str()),
                        ("location", l.name.as_str()),
                        ("kind", kind),
                    ];
                    busy += snap.sum(m::HTTP_STREAMS_ACTIVE, &want);
                }
            }
        }
    }
    if u.protocol == UpstreamProtocol::H2c {
        busy = busy.min(1.0);
    }
    count((open - busy).max(0.0))
}

fn location(snap: &Snapshot, site: &str, l: &crate::config::Location) -> LocationDoc {
    let want = [("site", site), ("location", l.name.as_str())];
    let requests = snap.sum(m::HTTP_REQUESTS, &want);
    let errors: f64 = snap
        .series(m::HTTP_REQUESTS, &want)
        .filter(|s| s.label("status").is_some_and(|st| st.starts_with('5')))
        .map(|s| s.value)
        .sum();
    let active = |kind: &str| {
        count(snap.sum(
            m::HTTP_STREAMS_ACTIVE,
            &[
                ("site", site),
                ("location", l.name.as_str()),
                ("kind", kind),
            ],
        ))
    };
    LocationDoc {
        name: l.name.clone(),
        path: l.path.clone(),
        match_kind: match l.match_kind {
            MatchKind::Exact => "exact",
            MatchKind::Prefix => "prefix",
        },
        upstream: match &l.target {
            Target::Upstream(u) => Some(u.name.clone()),
            Target::Respond { .. } => None,
        },
        requests_total: count(requests),
        errors_total: count(errors),
        active: Active {
            http: active("http"),
            sse: active("sse"),
            websocket: active("websocket"),
        },
        first_byte_ms: FirstByte {
            p50: ms(snap.quantile(m::HTTP_FIRST_BYTE, &want, 0.5)),
            p99: ms(snap.quantile(m::HTTP_FIRST_BYTE, &want, 0.99)),
        },
    }
}

fn certificate(snap: &Snapshot, site: &str, info: Option<&CertInfo>, now: SystemTime) -> CertDoc {
    let gauge = snap
        .first(CERT_EXPIRY_GAUGE, &[("site", site)])
        .filter(|v| v.is_finite())
        .map(|v| v as i64);
    let not_after = gauge.or(info.and_then(|i| i.not_after));
    CertDoc {
        source: info.map_or("unknown", |i| i.source),
        path: info.and_then(|i| i.path.clone()),
        names: info.map(|i| i.names.clone()).unwrap_or_default(),
        not_after: not_after.and_then(|t| {
            let t = u64::try_from(t).ok()?;
            Some(rfc3339(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t),
            ))
        }),
        days_left: not_after.map(|t| days_left(t, now)),
        error: info.and_then(|i| i.error.clone()),
    }
}

/// The route table, with actions worded as `portico check` words them.
fn routes(cfg: &Config) -> Vec<RouteDoc> {
    cfg.routes
        .iter()
        .map(|r| RouteDoc {
            index: r.index,
            sni: r.matcher.sni.iter().map(|p| p.to_string()).collect(),
            alpn: r
                .matcher
                .alpn
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
            protocol: r.matcher.protocol.as_str(),
            take_silent: r.matcher.take_silent,
            action: crate::describe::action(cfg, r),
        })
        .collect()
}
