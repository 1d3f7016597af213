//! Raw config -> checked [`Config`]. Each check reports the key path it is about.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{RawConfig, RawLocation, RawRoute, RawSite, RawUpstream, RawWebSocket};
use super::*;

struct Ctx<'a> {
    source: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            source: self.source.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Check a raw config and build the typed one.
pub fn validate(raw: RawConfig, source: &str) -> Result<Config, ConfigError> {
    let cx = Ctx { source };

    let admin = admin(&cx, &raw.admin)?;

    let d = Timeouts::default();
    let t = &raw.timeouts;
    let timeouts = Timeouts {
        client_hello: positive(&cx, "timeouts.client_hello", t.client_hello, d.client_hello)?,
        tls_handshake: positive(
            &cx,
            "timeouts.tls_handshake",
            t.tls_handshake,
            d.tls_handshake,
        )?,
        upstream_connect: positive(
            &cx,
            "timeouts.upstream_connect",
            t.upstream_connect,
            d.upstream_connect,
        )?,
        idle: positive(&cx, "timeouts.idle", t.idle, d.idle)?,
        request_header: positive(
            &cx,
            "timeouts.request_header",
            t.request_header,
            d.request_header,
        )?,
    };

    let dl = Limits::default();
    let l = &raw.limits;
    let limits = Limits {
        max_connections: nonzero(
            &cx,
            "limits.max_connections",
            l.max_connections,
            dl.max_connections,
        )?,
        max_pending_hellos: nonzero(
            &cx,
            "limits.max_pending_hellos",
            l.max_pending_hellos,
            dl.max_pending_hellos,
        )?,
        max_header_size: nonzero(
            &cx,
            "limits.max_header_size",
            l.max_header_size.map(|b| b.as_u64() as usize),
            dl.max_header_size,
        )?,
        max_headers: nonzero(&cx, "limits.max_headers", l.max_headers, dl.max_headers)?,
        max_h2_streams: nonzero(
            &cx,
            "limits.max_h2_streams",
            l.max_h2_streams.map(|v| v as usize),
            dl.max_h2_streams as usize,
        )? as u32,
        max_uri_length: nonzero(
            &cx,
            "limits.max_uri_length",
            l.max_uri_length,
            dl.max_uri_length,
        )?,
    };
    if limits.max_header_size < 4096 {
        return Err(cx.err("limits.max_header_size", "must be at least 4KiB"));
    }

    let log = Log {
        level: raw.log.level.clone().unwrap_or_else(|| "info".into()),
        format: raw.log.format.unwrap_or(LogFormat::Text),
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(cx.err(
            "log.level",
            format!(
                "{:?} is not a log level or filter (use e.g. \"info\" or \"portico=debug\")",
                log.level
            ),
        ));
    }

    if raw.workers == Some(0) {
        return Err(cx.err("workers", "must be at least 1"));
    }

    // Listeners.
    if raw.listen.is_empty() {
        return Err(cx.err(
            "listen",
            "no [[listen]] socket: portico would accept nothing",
        ));
    }
    let mut listeners = Vec::new();
    let mut seen_addrs: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (i, l) in raw.listen.iter().enumerate() {
        let key = format!("listen[{i}]");
        let addr: SocketAddr = l.addr.parse().map_err(|_| {
            cx.err(
                format!("{key}.addr"),
                format!(
                    "{:?} is not an ip:port address (e.g. \"0.0.0.0:443\" or \"[::]:443\")",
                    l.addr
                ),
            )
        })?;
        if let Some(prev) = seen_addrs.insert(addr, i) {
            return Err(cx.err(
                format!("{key}.addr"),
                format!("duplicate listen address {addr} (also listen[{prev}])"),
            ));
        }
        let trusted_raw = l.trusted.clone().unwrap_or_default();
        if l.trusted.is_some() && !l.accept_proxy {
            return Err(cx.err(
                format!("{key}.trusted"),
                "trusted only applies with accept_proxy = true",
            ));
        }
        let mut trusted = Vec::new();
        for (j, t) in trusted_raw.iter().enumerate() {
            trusted.push(parse_cidr(t).map_err(|r| cx.err(format!("{key}.trusted[{j}]"), r))?);
        }
        if l.accept_proxy && trusted.is_empty() {
            return Err(cx.err(
                format!("{key}.trusted"),
                "accept_proxy = true needs the peers allowed to send PROXY headers (e.g. trusted = [\"127.0.0.1/32\"])",
            ));
        }
        listeners.push(Listen {
            addr,
            accept_proxy: l.accept_proxy,
            trusted,
        });
    }
    // A wildcard address and a specific one on the same port cannot both bind.
    for (j, b) in listeners.iter().enumerate() {
        for a in &listeners[..j] {
            if a.addr.port() == b.addr.port()
                && a.addr.port() != 0
                && a.addr.is_ipv4() == b.addr.is_ipv4()
                && (a.addr.ip().is_unspecified() || b.addr.ip().is_unspecified())
            {
                return Err(cx.err(
                    format!("listen[{j}].addr"),
                    format!("{} overlaps {} on the same port", b.addr, a.addr),
                ));
            }
        }
    }

    // Backends.
    let mut backends = BTreeMap::new();
    for (name, b) in &raw.backend {
        let key = format!("backend.{name}");
        check_name(&cx, &key, name)?;
        let addr = Address::parse(&b.addr).map_err(|r| cx.err(format!("{key}.addr"), r))?;
        let proxy_protocol = b.proxy_protocol.unwrap_or(ProxyVersion::None);
        backends.insert(
            name.clone(),
            Arc::new(Backend {
                name: name.as_str().into(),
                addr,
                proxy_protocol,
            }),
        );
    }

    // Upstreams.
    let mut upstreams = BTreeMap::new();
    for (name, u) in &raw.upstream {
        let key = format!("upstream.{name}");
        check_name(&cx, &key, name)?;
        upstreams.insert(name.clone(), Arc::new(upstream(&cx, &key, name, u)?));
    }

    // Routes.
    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.route.iter().enumerate() {
        routes.push(route(&cx, i, r, &backends, &raw.site)?);
    }
    if routes.is_empty() {
        return Err(cx.err("route", "no [[route]]: every connection would be refused"));
    }
    if routes.iter().filter(|r| r.matcher.take_silent).count() > 1 {
        return Err(cx.err("route", "only one route may set take_silent"));
    }

    for (j, later) in routes.iter().enumerate() {
        if let Some(earlier) = routes[..j]
            .iter()
            .find(|e| covers(&e.matcher, &later.matcher))
        {
            return Err(cx.err(
                format!("route[{j}]"),
                format!(
                    "unreachable: route[{}] above it already matches everything it matches (routes match top to bottom; move the more specific one up)",
                    earlier.index
                ),
            ));
        }
    }
    let acme = if raw.acme.is_some() || raw.site.values().any(|s| s.cert == "acme") {
        let default = super::raw::RawAcme::default();
        let section = raw.acme.as_ref().unwrap_or(&default);
        let acme = super::acme::validate(section, source)?;
        let http_route = routes.iter().any(|r| r.action == Action::Redirect);
        if acme.challenge == super::acme::Challenge::Http01 && !http_route {
            return Err(cx.err(
                "acme.challenge",
                "\"http-01\" is answered on a protocol = \"http\" redirect route (port 80), and there is none; add one or use \"tls-alpn-01\"",
            ));
        }
        Some(Arc::new(acme))
    } else {
        None
    };

    // Sites: names come from the routes that terminate there.
    let mut sites = BTreeMap::new();
    for (name, s) in &raw.site {
        let key = format!("site.{name}");
        check_name(&cx, &key, name)?;
        let terminating: Vec<&Route> = routes
            .iter()
            .filter(|r| matches!(&r.action, Action::Terminate(site) if site == name))
            .collect();
        let mut names = Vec::new();
        let mut any_name = false;
        for r in &terminating {
            if r.matcher.sni.is_empty() {
                any_name = true;
            }
            for p in &r.matcher.sni {
                if !names.contains(p) {
                    names.push(p.clone());
                }
            }
        }
        if s.cert == "acme" {
            acme_names(&cx, &key, name, &terminating)?;
        }
        sites.insert(
            name.clone(),
            Arc::new(site(
                &cx,
                &key,
                name,
                s,
                names,
                any_name,
                &backends,
                &upstreams,
                acme.as_ref(),
            )?),
        );
    }

    Ok(Config {
        source: source.to_string(),
        path: None,
        shutdown_grace: raw.shutdown_grace.unwrap_or(Duration::from_secs(30)),
        workers: raw.workers,
        admin,
        timeouts,
        limits,
        log,
        tunnel: Tunnel {
            splice: raw.tunnel.splice.unwrap_or(true),
        },
        listeners,
        routes,
        backends,
        sites,
        upstreams,
        acme,
    })
}

/// `cert = "acme"` needs exact names: wildcards need DNS-01, which portico
/// does not do.
fn acme_names(cx: &Ctx, key: &str, name: &str, terminating: &[&Route]) -> Result<(), ConfigError> {
    let exact = terminating
        .iter()
        .flat_map(|r| &r.matcher.sni)
        .any(|p| matches!(p, SniPattern::Exact(_)));
    if !exact {
        let Some(r) = terminating.first() else {
            return Err(cx.err(
                format!("{key}.cert"),
                format!("cert = \"acme\" needs the exact names of the routes that terminate at site {name:?}, and no route does"),
            ));
        };
        let what = if r.matcher.sni.is_empty() {
            "has no sni"
        } else {
            "has only wildcard names (wildcards need the DNS-01 challenge, which portico does not do)"
        };
        return Err(cx.err(
            format!("route[{}].sni", r.index),
            format!("site {name:?} has cert = \"acme\", which is issued for exact names, and this route {what}; list the exact names (e.g. sni = [\"api.example.com\"])"),
        ));
    }
    Ok(())
}

fn positive(
    cx: &Ctx,
    key: &str,
    v: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(d) if d.is_zero() => Err(cx.err(key, "must be longer than 0s")),
        Some(d) => Ok(d),
    }
}

fn nonzero(cx: &Ctx, key: &str, v: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(cx.err(key, "must be at least 1")),
        Some(n) => Ok(n),
    }
}

/// Names become metric labels and appear in logs: keep them plain.
fn check_name(cx: &Ctx, key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(cx.err(
            key,
            format!("{name:?} is not a valid name (letters, digits, '_', '-', '.')"),
        ))
    }
}

/// A CIDR like `10.0.0.0/8`, or a bare address meaning exactly that host.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net.network() != net.addr() {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "{s:?} is not a CIDR (e.g. \"127.0.0.1/32\" or \"::1/128\")"
    ))
}

fn route(
    cx: &Ctx,
    i: usize,
    r: &RawRoute,
    backends: &BTreeMap<String, Arc<Backend>>,
    sites: &BTreeMap<String, RawSite>,
) -> Result<Route, ConfigError> {
    let key = format!("route[{i}]");
    let mut sni = Vec::new();
    for (j, s) in r.sni.iter().flatten().enumerate() {
        sni.push(SniPattern::parse(s).map_err(|e| cx.err(format!("{key}.sni[{j}]"), e))?);
    }
    if r.sni.as_ref().is_some_and(|v| v.is_empty()) {
        return Err(cx.err(
            format!("{key}.sni"),
            "empty list: omit the key to match any name",
        ));
    }
    let mut alpn = Vec::new();
    for (j, a) in r.alpn.iter().flatten().enumerate() {
        if a.is_empty() || a.len() > 255 {
            return Err(cx.err(format!("{key}.alpn[{j}]"), "ALPN names are 1 to 255 bytes"));
        }
        alpn.push(a.as_bytes().to_vec());
    }
    if r.alpn.as_ref().is_some_and(|v| v.is_empty()) {
        return Err(cx.err(
            format!("{key}.alpn"),
            "empty list: omit the key to match any ALPN",
        ));
    }
    let tls_matchers = !sni.is_empty() || !alpn.is_empty();
    let protocol = match r.protocol {
        Some(p) => p,
        None if tls_matchers || r.terminate.is_some() => Protocol::Tls,
        None if r.redirect.is_some() => Protocol::Http,
        None => Protocol::Any,
    };
    if tls_matchers && protocol != Protocol::Tls {
        return Err(cx.err(
            format!("{key}.protocol"),
            format!(
                "sni and alpn match TLS ClientHellos only; protocol = {:?} cannot have them",
                protocol.as_str()
            ),
        ));
    }
    if r.take_silent && protocol != Protocol::Ssh {
        return Err(cx.err(
            format!("{key}.take_silent"),
            "only protocol = \"ssh\" routes may take silent clients",
        ));
    }

    let set: Vec<&str> = [
        r.pass.as_ref().map(|_| "pass"),
        r.terminate.as_ref().map(|_| "terminate"),
        r.redirect.as_ref().map(|_| "redirect"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if set.len() > 1 {
        return Err(cx.err(
            key,
            format!(
                "a route has exactly one action; this one has {}",
                set.join(" and ")
            ),
        ));
    }
    let action = if let Some(b) = &r.pass {
        let backend = backends.get(b).ok_or_else(|| {
            cx.err(
                format!("{key}.pass"),
                unknown("backend", b, backends.keys()),
            )
        })?;
        Action::Pass(backend.clone())
    } else if let Some(s) = &r.terminate {
        if !sites.contains_key(s) {
            return Err(cx.err(format!("{key}.terminate"), unknown("site", s, sites.keys())));
        }
        if !matches!(protocol, Protocol::Tls) {
            return Err(cx.err(
                format!("{key}.terminate"),
                "terminate needs a TLS connection (protocol = \"tls\")",
            ));
        }
        Action::Terminate(s.clone())
    } else if let Some(target) = &r.redirect {
        if target != "https" {
            return Err(cx.err(
                format!("{key}.redirect"),
                format!("{target:?} is not supported (use \"https\")"),
            ));
        }
        if protocol != Protocol::Http {
            return Err(cx.err(
                format!("{key}.redirect"),
                "redirect answers plain HTTP: set protocol = \"http\"",
            ));
        }
        Action::Redirect
    } else {
        return Err(cx.err(key, "no action: set one of pass, terminate or redirect"));
    };
    let target = match &action {
        Action::Pass(b) => b.name.to_string(),
        Action::Terminate(s) => s.clone(),
        Action::Redirect => "https".to_string(),
    };
    Ok(Route {
        index: i,
        label: format!("{i}:{}:{target}", action.kind()).into(),
        matcher: Matcher {
            sni,
            alpn,
            protocol,
            take_silent: r.take_silent,
        },
        action,
    })
}

fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = &'a String>) -> String {
    let known: Vec<&str> = known.map(String::as_str).collect();
    if known.is_empty() {
        format!("unknown {what} {name:?} (no [{what}.*] is defined)")
    } else {
        format!("unknown {what} {name:?} (defined: {})", known.join(", "))
    }
}

/// Does `a` (earlier) match every connection that `b` (later) matches?
fn covers(a: &Matcher, b: &Matcher) -> bool {
    if a.take_silent != b.take_silent && b.take_silent {
        return false;
    }
    let proto = a.protocol == Protocol::Any || a.protocol == b.protocol;
    let sni = a.sni.is_empty()
        || (!b.sni.is_empty() && b.sni.iter().all(|p| a.sni.iter().any(|q| p.covered_by(q))));
    let alpn =
        a.alpn.is_empty() || (!b.alpn.is_empty() && b.alpn.iter().all(|p| a.alpn.contains(p)));
    proto && sni && alpn
}

fn upstream(cx: &Ctx, key: &str, name: &str, u: &RawUpstream) -> Result<Upstream, ConfigError> {
    let addr = if u.url.starts_with("unix:") {
        Address::parse(&u.url).map_err(|r| cx.err(format!("{key}.url"), r))?
    } else if u.url.starts_with("http://") {
        let uri: http::Uri = u
            .url
            .parse()
            .map_err(|_| cx.err(format!("{key}.url"), format!("{:?} is not a URL", u.url)))?;
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(cx.err(
                format!("{key}.url"),
                format!("{:?}: a path in the upstream URL is not supported; requests keep their own path", u.url),
            ));
        }
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(80);
        Address::parse(&format!("{host}:{port}")).map_err(|r| cx.err(format!("{key}.url"), r))?
    } else {
        return Err(cx.err(
            format!("{key}.url"),
            format!("{:?} is not an upstream URL (use \"http://127.0.0.1:8317\" or \"unix:/run/app.sock\"; upstreams speak plain HTTP)", u.url),
        ));
    };
    let protocol = u.protocol.unwrap_or(UpstreamProtocol::Http1);
    Ok(Upstream {
        name: name.to_string(),
        addr,
        keepalive: u.keepalive.unwrap_or(32),
        protocol,
    })
}

#[allow(clippy::too_many_arguments)]
fn site(
    cx: &Ctx,
    key: &str,
    name: &str,
    s: &RawSite,
    names: Vec<SniPattern>,
    any_name: bool,
    backends: &BTreeMap<String, Arc<Backend>>,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    acme: Option<&Arc<super::acme::Acme>>,
) -> Result<Site, ConfigError> {
    let cert = if s.cert == "acme" {
        if s.key.is_some() {
            return Err(cx.err(
                format!("{key}.key"),
                "an acme site has no key file (portico keeps the key under acme.storage)",
            ));
        }
        // Always Some here: validate builds it when any site says "acme".
        match acme {
            Some(a) => CertSource::Acme(a.clone()),
            None => return Err(cx.err(format!("{key}.cert"), "cert = \"acme\" needs [acme]")),
        }
    } else if s.cert == "self-signed" {
        if s.key.is_some() {
            return Err(cx.err(format!("{key}.key"), "a self-signed site has no key file"));
        }
        CertSource::SelfSigned
    } else {
        let key_path = s.key.as_ref().ok_or_else(|| {
            cx.err(format!("{key}.key"), "missing: a certificate file needs its private key file (or use cert = \"self-signed\")")
        })?;
        CertSource::Files {
            cert: PathBuf::from(&s.cert),
            key: PathBuf::from(key_path),
        }
    };
    let non_http = match &s.non_http {
        None => None,
        Some(b) => Some(
            backends
                .get(b)
                .ok_or_else(|| {
                    cx.err(
                        format!("{key}.non_http"),
                        unknown("backend", b, backends.keys()),
                    )
                })?
                .clone(),
        ),
    };
    let mut headers = Vec::new();
    for (h, v) in &s.headers {
        let Ok(name) = http::HeaderName::from_bytes(h.as_bytes()) else {
            return Err(cx.err(
                format!("{key}.headers"),
                format!("{h:?} is not a header name"),
            ));
        };
        let Ok(value) = http::HeaderValue::from_str(v) else {
            return Err(cx.err(format!("{key}.headers.{h}"), "not a valid header value"));
        };
        headers.push((name, value));
    }
    let cors = match &s.cors {
        None => None,
        Some(c) => {
            for (j, o) in c.origins.iter().enumerate() {
                let ok = o == "*"
                    || ((o.starts_with("https://") || o.starts_with("http://"))
                        && !o.ends_with('/')
                        && http::HeaderValue::from_str(o).is_ok());
                if !ok {
                    return Err(cx.err(
                        format!("{key}.cors.origins[{j}]"),
                        format!("{o:?} is not an origin (scheme://host[:port], no trailing slash)"),
                    ));
                }
            }
            if c.credentials && c.origins.iter().any(|o| o == "*") {
                return Err(cx.err(
                    format!("{key}.cors.credentials"),
                    "credentials cannot be allowed for origin \"*\"",
                ));
            }
            let methods = c.methods.clone().unwrap_or_else(|| {
                ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
                    .map(String::from)
                    .to_vec()
            });
            let headers = c.headers.clone().unwrap_or_else(|| {
                [
                    "Authorization",
                    "Content-Type",
                    "X-Api-Key",
                    "Anthropic-Version",
                    "OpenAI-Organization",
                ]
                .map(String::from)
                .to_vec()
            });
            for (j, m) in methods.iter().enumerate() {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    return Err(cx.err(
                        format!("{key}.cors.methods[{j}]"),
                        format!("{m:?} is not an HTTP method"),
                    ));
                }
            }
            for (j, h) in headers.iter().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(cx.err(
                        format!("{key}.cors.headers[{j}]"),
                        format!("{h:?} is not a header name"),
                    ));
                }
            }
            // Checked above item by item: method tokens and header names
            // joined by ", " always make a valid header value.
            let joined = |field: &str, v: &[String]| {
                http::HeaderValue::from_str(&v.join(", "))
                    .map_err(|_| cx.err(format!("{key}.cors.{field}"), "not a valid header value"))
            };
            let methods = joined("methods", &methods)?;
            let headers = joined("headers", &headers)?;
            Some(Cors {
                origins: c.origins.clone(),
                methods,
                headers,
                credentials: c.credentials,
                max_age: c.max_age.unwrap_or(Duration::from_secs(86400)),
            })
        }
    };
    let mut locations = Vec::new();
    let mut seen = HashSet::new();
    for (j, l) in s.location.iter().enumerate() {
        let lk = format!("{key}.location[{j}]");
        let loc = location(cx, &lk, l, upstreams)?;
        if !seen.insert((loc.path.clone(), loc.match_kind == MatchKind::Exact)) {
            return Err(cx.err(
                format!("{lk}.path"),
                format!("duplicate location {:?}", loc.path),
            ));
        }
        locations.push(loc);
    }
    Ok(Site {
        name: name.to_string(),
        cert,
        names,
        any_name,
        max_body: s.max_body.map(|b| b.as_u64()),
        non_http,
        headers,
        cors,
        locations,
    })
}

fn location(
    cx: &Ctx,
    key: &str,
    l: &RawLocation,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
) -> Result<Location, ConfigError> {
    if !l.path.starts_with('/') {
        return Err(cx.err(
            format!("{key}.path"),
            format!("{:?} must start with '/'", l.path),
        ));
    }
    let match_kind = l.match_kind.unwrap_or(MatchKind::Prefix);
    let target = match (&l.upstream, &l.respond) {
        (Some(_), Some(_)) => {
            return Err(cx.err(
                key.to_string(),
                "a location has either upstream or respond, not both",
            ))
        }
        (None, None) => return Err(cx.err(key.to_string(), "no target: set upstream or respond")),
        (Some(u), None) => Target::Upstream(
            upstreams
                .get(u)
                .ok_or_else(|| {
                    cx.err(
                        format!("{key}.upstream"),
                        unknown("upstream", u, upstreams.keys()),
                    )
                })?
                .clone(),
        ),
        (None, Some(r)) => {
            let status = r.status.unwrap_or(200);
            let status = http::StatusCode::from_u16(status)
                .ok()
                .filter(|_| (200..=599).contains(&status))
                .ok_or_else(|| {
                    cx.err(
                        format!("{key}.respond.status"),
                        format!("{status} is not a response status (200-599)"),
                    )
                })?;
            let content_type = match &r.content_type {
                None => http::HeaderValue::from_static("text/plain; charset=utf-8"),
                Some(v) => http::HeaderValue::from_str(v).map_err(|_| {
                    cx.err(
                        format!("{key}.respond.content_type"),
                        "not a valid header value",
                    )
                })?,
            };
            Target::Respond {
                status,
                body: bytes::Bytes::from(r.body.clone()),
                content_type,
            }
        }
    };
    let websocket = websocket_mode(cx, key, l)?;
    if l.websocket.is_some() && websocket.forwards() && !matches!(target, Target::Upstream(_)) {
        return Err(cx.err(format!("{key}.websocket"), "WebSocket needs an upstream"));
    }
    let name = match &l.name {
        Some(n) => {
            check_name(cx, &format!("{key}.name"), n)?;
            n.clone()
        }
        None => l.path.clone(),
    };
    Ok(Location {
        name,
        path: l.path.clone(),
        match_kind,
        target,
        websocket,
    })
}

/// `[admin]`: `listen` is the clearer name of `metrics`; both may be given
/// only when they agree.
fn admin(cx: &Ctx<'_>, raw: &super::raw::RawAdmin) -> Result<Admin, ConfigError> {
    let parse = |key: &str, v: Option<&str>| -> Result<Option<SocketAddr>, ConfigError> {
        match v {
            None | Some("off") | Some("") => Ok(None),
            Some(s) => s
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| cx.err(key, format!("{s:?} is not an ip:port address (or \"off\")"))),
        }
    };
    let listen = parse("admin.listen", raw.listen.as_deref())?;
    let metrics = parse("admin.metrics", raw.metrics.as_deref())?;
    let addr = match (&raw.listen, &raw.metrics) {
        (Some(l), Some(m)) if listen != metrics => {
            return Err(cx.err(
                "admin.listen",
                format!("{l:?} disagrees with admin.metrics = {m:?}; admin.metrics is the older name of admin.listen, set only one"),
            ))
        }
        (Some(_), _) => listen,
        (None, _) => metrics,
    };
    let token = match raw.token.as_deref() {
        None => None,
        Some(t) if t.trim().is_empty() => {
            return Err(cx.err(
                "admin.token",
                "empty token; remove the key to run without one",
            ))
        }
        Some(t) if t.bytes().any(|b| !(0x21..=0x7e).contains(&b)) => {
            // The value is not echoed: it is meant to be a secret.
            return Err(cx.err(
                "admin.token",
                "the token must be printable ASCII without spaces (it travels in an HTTP header)",
            ));
        }
        Some(t) => Some(Secret::new(t.to_string())),
    };
    if raw.protect_metrics && token.is_none() {
        return Err(cx.err(
            "admin.protect_metrics",
            "needs admin.token (the token that /metrics would require)",
        ));
    }
    Ok(Admin {
        metrics: addr,
        token,
        protect_metrics: raw.protect_metrics,
    })
}

/// `websocket` (default "auto") and `websocket_recheck` of a location.
fn websocket_mode(cx: &Ctx, key: &str, l: &RawLocation) -> Result<WebSocketMode, ConfigError> {
    let mode = match &l.websocket {
        None => "auto",
        Some(RawWebSocket::Bool(true)) => "true",
        Some(RawWebSocket::Bool(false)) => "false",
        Some(RawWebSocket::Text(t)) => t.as_str(),
    };
    let recheck = l.websocket_recheck;
    match (mode, recheck) {
        ("auto", r) => match r {
            Some(d) if d.is_zero() => {
                Err(cx.err(format!("{key}.websocket_recheck"), "must be longer than 0s"))
            }
            r => Ok(WebSocketMode::Auto {
                recheck: r.unwrap_or(WebSocketMode::DEFAULT_RECHECK),
            }),
        },
        ("true" | "false", Some(_)) => Err(cx.err(
            format!("{key}.websocket_recheck"),
            "only applies with websocket = \"auto\"",
        )),
        ("true", None) => Ok(WebSocketMode::On),
        ("false", None) => Ok(WebSocketMode::Off),
        (other, _) => Err(cx.err(
            format!("{key}.websocket"),
            format!("{other:?} is not one of true, false, \"auto\""),
        )),
    }
}

#[cfg(test)]
mod websocket_mode_tests {
    use super::super::{load_str, Target, WebSocketMode};
    use std::time::Duration;

    fn location(extra: &str) -> Result<WebSocketMode, String> {
        let text = format!(
            r#"
[[listen]]
addr = "127.0.0.1:8443"
[[route]]
terminate = "api"
[site.api]
cert = "self-signed"
[[site.api.location]]
path = "/"
upstream = "u"
{extra}
[upstream.u]
url = "http://127.0.0.1:9"
"#
        );
        let cfg = load_str(&text, "test.toml").map_err(|e| e.to_string())?;
        let loc = &cfg.sites["api"].locations[0];
        assert!(matches!(loc.target, Target::Upstream(_)));
        Ok(loc.websocket)
    }

    #[test]
    fn auto_is_the_default_and_true_false_stay() {
        assert_eq!(
            location(""),
            Ok(WebSocketMode::Auto {
                recheck: Duration::from_secs(600)
            })
        );
        assert_eq!(
            location("websocket = \"auto\"\nwebsocket_recheck = \"30s\""),
            Ok(WebSocketMode::Auto {
                recheck: Duration::from_secs(30)
            })
        );
        assert_eq!(location("websocket = true"), Ok(WebSocketMode::On));
        assert_eq!(location("websocket = false"), Ok(WebSocketMode::Off));
        assert_eq!(location("websocket = \"false\""), Ok(WebSocketMode::Off));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = location("websocket = \"sometimes\"").unwrap_err();
        assert!(
            e.contains("site.api.location[0].websocket") && e.contains("\"sometimes\""),
            "{e}"
        );
        let e = location("websocket = true\nwebsocket_recheck = \"1m\"").unwrap_err();
        assert!(
            e.contains("websocket_recheck") && e.contains("only applies"),
            "{e}"
        );
        let e = location("websocket_recheck = \"0s\"").unwrap_err();
        assert!(e.contains("longer than 0s"), "{e}");
    }
}
