//! nginx `server` blocks -> portico sites: locations, upstreams, body
//! limits, headers, CORS; and the verdict on every other directive
//! (converted, handled by default, or reported as not converted).

use super::emit::{self, Cors, Location, Target};
use super::nginx::{Directive, Server};
use super::{sanitize, Builder, Note, Use};

/// Certificate files named by the tunnel server that terminated TLS for
/// the server block before (Xray's `certificateFile`).
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub origin: String,
}

/// Why portico needs no counterpart of a directive.
const STREAMS: &str = "portico streams request and response bodies unbuffered";
const NO_CACHE: &str = "portico never caches responses";
const FORWARDED: &str = "portico sets X-Real-IP, X-Forwarded-For/-Proto/-Host and Forwarded from the real client address";
const UPGRADE: &str = "portico forwards WebSocket upgrades over HTTP/1.1 and h2";
const TLS_DEFAULTS: &str = "portico uses rustls' safe defaults (TLS 1.2 and 1.3, no weak ciphers)";
const REAL_IP: &str =
    "portico takes the client address from the PROXY header of trusted peers itself";

/// The verdict on a directive the site conversion does not consume, as a
/// note (`None` when it needs no mention).
pub(super) fn classify(d: &Directive, b: &mut Builder) -> Option<Note> {
    let handled = |why: &str| Some(Note::handled(d.at.clone(), d.text(), why));
    let not = |why: &str| Some(Note::unconverted(d.at.clone(), d.text(), why));
    let a0 = d.arg(0);
    match d.name.as_str() {
        "proxy_buffering" | "proxy_request_buffering" if a0 == "off" => handled(STREAMS),
        "proxy_buffering" | "proxy_request_buffering" => not("portico never buffers bodies; nothing to convert"),
        "proxy_buffer_size" | "proxy_buffers" | "proxy_busy_buffers_size" | "proxy_max_temp_file_size" => handled(STREAMS),
        "proxy_cache" if a0 == "off" => handled(NO_CACHE),
        n if n.starts_with("proxy_cache") => not("portico does not cache responses"),
        "proxy_http_version" => handled("portico speaks HTTP/1.1 to upstreams (protocol = \"h2c\" for h2)"),
        "proxy_set_header" => {
            let h = a0.to_ascii_lowercase();
            match h.as_str() {
                "host" if matches!(d.arg(1), "$host" | "$http_host") => handled("portico forwards Host as the client sent it"),
                "x-real-ip" | "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port" | "forwarded" => {
                    handled(FORWARDED)
                }
                "upgrade" | "connection" => handled(UPGRADE),
                _ => not("portico does not add or change request headers"),
            }
        }
        "underscores_in_headers" | "ignore_invalid_headers" => {
            handled("header names with underscores (e.g. session_id) pass untouched")
        }
        "real_ip_header" | "set_real_ip_from" | "real_ip_recursive" => handled(REAL_IP),
        "chunked_transfer_encoding" => handled("portico frames bodies itself"),
        "ssl_protocols" | "ssl_ciphers" | "ssl_prefer_server_ciphers" | "ssl_session_cache" | "ssl_session_timeout"
        | "ssl_session_tickets" | "ssl_ecdh_curve" | "ssl_dhparam" | "ssl_early_data" => handled(TLS_DEFAULTS),
        "ssl_stapling" | "ssl_stapling_verify" | "ssl_trusted_certificate" => not("portico does not staple OCSP responses"),
        "http2" => handled("portico serves h2 and HTTP/1.1 by ALPN"),
        "proxy_redirect" if a0 == "off" => handled("portico does not rewrite Location headers"),
        "tcp_nodelay" => handled("portico sets TCP_NODELAY on every socket"),
        "keepalive_timeout" | "keepalive_requests" | "client_header_timeout" | "client_body_timeout" | "send_timeout" => {
            handled("client connections are bounded by timeouts.request_header and timeouts.idle")
        }
        "sendfile" | "tcp_nopush" | "types" | "default_type" | "types_hash_max_size" | "server_names_hash_bucket_size" => {
            handled("only matters to nginx serving files")
        }
        "events" | "worker_processes" | "worker_connections" | "worker_rlimit_nofile" | "user" | "pid" | "daemon"
        | "load_module" | "multi_accept" => handled("nginx process setting; portico's are workers and limits.*"),
        "proxy_hide_header" | "proxy_ignore_headers" | "proxy_pass_header" => {
            not("portico passes upstream response headers through unchanged")
        }
        "gzip" if a0 == "off" => handled("portico does not compress responses"),
        n if n.starts_with("gzip") => not("portico does not compress responses"),
        "access_log" | "error_log" | "log_format" => {
            not("portico logs to stderr (log.level, log.format); per-location counts are in /metrics")
        }
        "root" | "index" | "try_files" | "alias" | "autoindex" => not("portico serves no files"),
        "auth_basic" | "auth_basic_user_file" | "allow" | "deny" | "auth_request" => {
            not("access control is not converted: portico would let these requests through; restrict access before it")
        }
        n if n.starts_with("limit_") => not("rate and connection limits are not converted"),
        "rewrite" => not("portico forwards paths unchanged"),
        "if" => {
            let cond = d.args.join(" ");
            if cond.contains("$request_method") && cond.contains("OPTIONS") {
                handled("portico answers CORS preflight requests itself (the site's cors)")
            } else {
                not("if blocks are not converted")
            }
        }
        "proxy_read_timeout" | "proxy_send_timeout" | "proxy_connect_timeout" => {
            b.timeout(d);
            None
        }
        "server_name" | "listen" | "ssl_certificate" | "ssl_certificate_key" | "client_max_body_size" | "add_header" => None,
        _ => not("not converted: the importer does not know it"),
    }
}

/// nginx time: `600s`, `10m`, `1h`, `1800` (seconds), `500ms`.
fn seconds(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    })
}

/// nginx size: `100m`, `1g`, `512k`, `1048576`; `0` means no limit.
fn size(s: &str) -> Option<Option<String>> {
    let lower = s.to_ascii_lowercase();
    let (n, unit) = lower.split_at(
        lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len()),
    );
    let n: u64 = n.parse().ok()?;
    if n == 0 {
        return Some(None);
    }
    let unit = match unit {
        "" => "B",
        "k" => "KiB",
        "m" => "MiB",
        "g" => "GiB",
        _ => return None,
    };
    Some(Some(format!("{n}{unit}")))
}

impl Builder<'_> {
    /// Track the longest proxy timeout: portico has one idle timeout.
    pub(super) fn timeout(&mut self, d: &Directive) {
        let Some(secs) = seconds(d.arg(0)) else {
            self.note(Note::unconverted(
                d.at.clone(),
                d.text(),
                "not a time nginx would accept",
            ));
            return;
        };
        if d.name == "proxy_connect_timeout" {
            if self.connect.as_ref().is_none_or(|(s, _)| secs > *s) {
                self.connect = Some((secs, d.at.clone()));
            }
            return;
        }
        if secs <= 3600 {
            self.note(Note::handled(
                d.at.clone(),
                d.text(),
                "portico has no read timeout on streams; timeouts.idle (1h) closes one only after an hour without bytes either way",
            ));
        }
        if self.idle.as_ref().is_none_or(|(s, _)| secs > *s) {
            self.idle = Some((secs, d.at.clone()));
        }
    }

    /// `http { }`-level directives: reported once here; the inherited ones
    /// (body size, headers, certificates) are read again per server.
    pub(super) fn http_level(&mut self) {
        let model = self.model;
        for d in &model.http_level {
            if let Some(n) = classify(d, self) {
                self.note(n);
            }
        }
    }

    /// The site for server block `i`, building it the first time.
    pub(super) fn site_for_server(&mut self, i: usize, tls: Option<TlsFiles>) -> String {
        if let Use::Site(k) = self.uses[i] {
            return self.plan.sites[k].name.clone();
        }
        let model = self.model;
        let server = &model.servers[i];
        let (names, _) = server.sni_names();
        let base = names
            .first()
            .and_then(|n| n.trim_start_matches("*.").split('.').next())
            .map(sanitize)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let mut name = base.clone();
        let mut k = 2;
        while self.plan.sites.iter().any(|s| s.name == name) {
            name = format!("{base}-{k}");
            k += 1;
        }
        let mut site = emit::Site {
            name: name.clone(),
            comment: vec![format!(
                "{} server {}",
                server.at.short(),
                super::names_text(server)
            )],
            ..Default::default()
        };
        self.certificate(server, tls, &mut site);
        let mut headers: Vec<&Directive> = Vec::new();
        let server_headers: Vec<&Directive> = server
            .block
            .iter()
            .filter(|d| d.name == "add_header")
            .collect();
        if server_headers.is_empty() {
            headers.extend(model.http_level.iter().filter(|d| d.name == "add_header"));
        } else {
            headers.extend(server_headers);
        }
        let body = server
            .block
            .iter()
            .rev()
            .find(|d| d.name == "client_max_body_size")
            .or_else(|| {
                model
                    .http_level
                    .iter()
                    .rev()
                    .find(|d| d.name == "client_max_body_size")
            });
        if let Some(d) = body {
            match size(d.arg(0)) {
                Some(Some(v)) => {
                    site.max_body = Some((v, format!("{} {}", d.at.short(), d.text())))
                }
                Some(None) => {}
                None => self.note(Note::unconverted(
                    d.at.clone(),
                    d.text(),
                    "not a size nginx would accept",
                )),
            }
        }
        for d in &server.block {
            match d.name.as_str() {
                "location" => {
                    if let Some(loc) = self.location(d, &mut headers, &site) {
                        site.locations.push(loc);
                    }
                }
                "return" => self.note(Note::unconverted(
                    d.at.clone(),
                    d.text(),
                    "a server-level return is not converted; the locations are",
                )),
                _ => {
                    if let Some(n) = classify(d, self) {
                        self.note(n);
                    }
                }
            }
        }
        let from_locations: Vec<&Directive> = headers
            .iter()
            .filter(|d| {
                server
                    .block
                    .iter()
                    .chain(&model.http_level)
                    .all(|s| !std::ptr::eq(**d, s))
            })
            .copied()
            .collect();
        if site.locations.len() > 1 {
            for d in from_locations {
                self.note(Note::unconverted(
                    d.at.clone(),
                    d.text(),
                    "set in one location, converted for the whole site: portico's headers and cors are per site",
                ));
            }
        }
        self.headers(&headers, &mut site);
        let k = self.plan.sites.len();
        self.plan.sites.push(site);
        self.uses[i] = Use::Site(k);
        self.plan.changes.push(format!(
            "nginx server {} at {}: portico serves it now (site {name}); stop nginx from serving it.",
            super::names_text(server),
            server.at.short()
        ));
        name
    }

    fn certificate(&mut self, server: &Server, tls: Option<TlsFiles>, site: &mut emit::Site) {
        let find = |name: &str| {
            server
                .block
                .iter()
                .find(|d| d.name == name)
                .or_else(|| self.model.http_level.iter().find(|d| d.name == name))
        };
        if let (Some(c), Some(k)) = (find("ssl_certificate"), find("ssl_certificate_key")) {
            site.cert = c.arg(0).to_string();
            site.key = Some(k.arg(0).to_string());
            site.cert_comment = format!("{} ssl_certificate", c.at.short());
            return;
        }
        if let Some(t) = tls {
            site.cert = t.cert;
            site.key = Some(t.key);
            site.cert_comment = t.origin;
            return;
        }
        site.cert = "self-signed".into();
        site.cert_comment = "no certificate in the inputs: self-signed until you set cert and key (or cert = \"acme\")".into();
        self.note(Note::unconverted(
            server.at.clone(),
            format!("server {}", super::names_text(server)),
            "no ssl_certificate: the site gets cert = \"self-signed\"; set cert and key to your certificate files",
        ));
    }

    /// One `location`: exact and prefix ones become locations; regex and
    /// named ones are reported.
    fn location<'d>(
        &mut self,
        d: &'d Directive,
        headers: &mut Vec<&'d Directive>,
        site: &emit::Site,
    ) -> Option<Location> {
        let (modifier, path) = match d.args.as_slice() {
            [m, p] => (m.as_str(), p.clone()),
            [p] if p.starts_with("^~") => ("^~", p[2..].to_string()),
            [p] if p.starts_with('=') => ("=", p[1..].to_string()),
            [p] => ("", p.clone()),
            _ => ("?", String::new()),
        };
        let what = format!("location {}", d.args.join(" "));
        match modifier {
            "" | "^~" | "=" if path.starts_with('/') => {}
            "~" | "~*" => {
                self.note(Note::unconverted(
                    d.at.clone(),
                    what,
                    "regex locations are not converted: portico matches exact paths and prefixes; add the paths it should serve",
                ));
                return None;
            }
            _ => {
                self.note(Note::unconverted(
                    d.at.clone(),
                    what,
                    "named and unusual locations are not converted",
                ));
                return None;
            }
        }
        // Allow/deny lists and authentication have no portico counterpart;
        // proxying without them would open the location to everyone.
        let restricted = d.children().iter().any(|c| {
            c.name == "deny"
                || c.name == "auth_request"
                || (c.name == "auth_basic" && c.arg(0) != "off")
        });
        let mut target = None;
        // A proxy_pass or return already reported: the location needs no second line.
        let mut reported = false;
        for c in d.children() {
            if restricted
                && matches!(
                    c.name.as_str(),
                    "allow"
                        | "deny"
                        | "auth_basic"
                        | "auth_basic_user_file"
                        | "auth_request"
                        | "proxy_pass"
                )
            {
                continue;
            }
            match c.name.as_str() {
                "proxy_pass" => match self.upstream_for(c, &path) {
                    Ok(u) => target = Some(Target::Upstream(u)),
                    Err(why) => {
                        reported = true;
                        self.note(Note::unconverted(c.at.clone(), c.text(), why))
                    }
                },
                "return" => {
                    let code = c
                        .arg(0)
                        .parse::<u16>()
                        .ok()
                        .filter(|s| (200..=599).contains(s));
                    match code {
                        Some(status) if !(300..400).contains(&status) => {
                            target = Some(Target::Respond {
                                status,
                                body: c.arg(1).to_string(),
                            })
                        }
                        _ => {
                            reported = true;
                            self.note(Note::unconverted(
                                c.at.clone(),
                                c.text(),
                                "only return with a 2xx/4xx/5xx status (and text) is converted, as respond",
                            ))
                        }
                    }
                }
                "add_header" => headers.push(c),
                "location" => self.note(Note::unconverted(
                    c.at.clone(),
                    format!("location {}", c.args.join(" ")),
                    "nested locations are not converted: add it as a location of the site",
                )),
                "client_max_body_size" => {
                    let v = size(c.arg(0)).flatten();
                    if v != site.max_body.as_ref().map(|(v, _)| v.clone()) {
                        self.note(Note::unconverted(
                            c.at.clone(),
                            c.text(),
                            "a per-location body limit is not converted: portico has one max_body per site",
                        ));
                    }
                }
                _ => {
                    if let Some(n) = classify(c, self) {
                        self.note(n);
                    }
                }
            }
        }
        if restricted {
            self.note(Note::unconverted(
                d.at.clone(),
                what.clone(),
                "access control (allow/deny, auth_*) is not converted: the location answers 403 until you restrict access in front of portico or drop the location",
            ));
            target = Some(Target::Respond {
                status: 403,
                body: "forbidden: this location's access control was not converted".into(),
            });
        }
        let Some(target) = target else {
            if reported {
                return None;
            }
            self.note(Note::unconverted(
                d.at.clone(),
                what,
                "no proxy_pass or return in it (static files?): not converted",
            ));
            return None;
        };
        Some(Location {
            comment: format!("{} {what}", d.at.short()),
            path,
            exact: modifier == "=",
            target,
        })
    }

    /// The upstream a `proxy_pass` names, created on first use.
    fn upstream_for(&mut self, d: &Directive, loc_path: &str) -> Result<String, String> {
        let url = d.arg(0);
        if url.contains('$') {
            return Err("proxy_pass with variables is not converted".into());
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(if url.starts_with("https://") {
                "portico's upstreams speak plain HTTP (HTTP/1.1 or h2c); an HTTPS upstream is not converted".into()
            } else {
                "not an http:// URL".into()
            });
        };
        let model = self.model;
        // `http://unix:/run/app.sock:/uri`
        if let Some(path) = rest.strip_prefix("unix:") {
            let (sock, uri) = match path.split_once(":/") {
                Some((s, u)) => (s, Some(format!("/{u}"))),
                None => (path, None),
            };
            check_uri(uri.as_deref(), loc_path)?;
            let key = format!("url:unix:{sock}");
            let stem = std::path::Path::new(sock)
                .file_stem()
                .map(|s| sanitize(&s.to_string_lossy()))
                .unwrap_or_default();
            return Ok(self.upstream_named(
                key,
                &stem,
                format!("unix:{sock}"),
                None,
                vec![format!("{} {}", d.at.short(), d.text())],
            ));
        }
        let (hostport, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        check_uri(uri, loc_path)?;
        if let Some(block) = model.upstream(hostport) {
            let key = format!("block:{}", block.name);
            if let Some(n) = self.upstream_keys.get(&key) {
                return Ok(n.clone());
            }
            let Some(first) = block.servers.first() else {
                return Err(format!(
                    "upstream {} at {} has no server",
                    block.name,
                    block.at.short()
                ));
            };
            if block.servers.len() > 1 {
                self.note(Note::unconverted(
                    block.servers[1].at.clone(),
                    block.servers[1].text(),
                    "load balancing is not converted: a portico upstream has one address; the first server is used",
                ));
            }
            for s in &block.servers {
                if s.args.len() > 1 {
                    self.note(Note::unconverted(
                        s.at.clone(),
                        s.text(),
                        "server parameters (weight, max_fails, ...) are not converted",
                    ));
                }
            }
            for o in &block.other {
                self.note(Note::unconverted(
                    o.at.clone(),
                    o.text(),
                    "not converted in an upstream block",
                ));
            }
            let addr = first.arg(0);
            let url = if addr.starts_with("unix:") {
                addr.to_string()
            } else {
                format!("http://{addr}")
            };
            let mut comment = vec![format!("{} upstream {}", block.at.short(), block.name)];
            if let Some(k) = block.keepalive {
                comment.push(format!("keepalive {k} as in the upstream block"));
            }
            return Ok(self.upstream_named(key, &block.name, url, block.keepalive, comment));
        }
        let key = format!("url:http://{hostport}");
        // `localhost:3000` -> `localhost-3000`; an IP address -> `app-3000`.
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (h, p),
            _ => (hostport, "80"),
        };
        if port.parse::<u16>().map_or(true, |p| p == 0) || host.is_empty() {
            return Err(format!("{hostport:?} is not host:port"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let label = if host.parse::<std::net::IpAddr>().is_ok() {
            "app"
        } else {
            host.split('.').next().unwrap_or("app")
        };
        let base = format!("{label}-{port}");
        Ok(self.upstream_named(
            key,
            &base,
            format!("http://{hostport}"),
            None,
            vec![format!("{} {}", d.at.short(), d.text())],
        ))
    }

    pub(super) fn upstream_named(
        &mut self,
        key: String,
        base: &str,
        url: String,
        keepalive: Option<usize>,
        comment: Vec<String>,
    ) -> String {
        if let Some(n) = self.upstream_keys.get(&key) {
            return n.clone();
        }
        let base = match sanitize(&base.replace(':', "-")) {
            b if b.is_empty() => "app".to_string(),
            b => b,
        };
        let mut name = base.clone();
        let mut k = 2;
        while self.plan.upstreams.iter().any(|u| u.name == name) {
            name = format!("{base}-{k}");
            k += 1;
        }
        self.upstream_keys.insert(key, name.clone());
        self.plan.upstreams.push(emit::Upstream {
            name: name.clone(),
            comment,
            url,
            keepalive,
        });
        name
    }

    /// `add_header`s of the server and its locations: CORS ones become
    /// `cors`, constant others `headers`.
    fn headers(&mut self, list: &[&Directive], site: &mut emit::Site) {
        let mut cors = Cors::default();
        let mut any_cors = false;
        let mut origin_ok = false;
        for d in list {
            let name = d.arg(0);
            let value = d.arg(1);
            let lower = name.to_ascii_lowercase();
            match lower.as_str() {
                "access-control-allow-origin" => {
                    any_cors = true;
                    if value == "*" || (value.starts_with("http") && !value.contains('$')) {
                        if !cors.origins.iter().any(|o| o == value) {
                            cors.origins.push(value.trim_end_matches('/').to_string());
                        }
                        origin_ok = true;
                        cors.comment = format!("{} {}", d.at.short(), d.text());
                    } else if let Some(origins) = self.origin_map(value) {
                        cors.origins.extend(origins);
                        origin_ok = true;
                        cors.comment =
                            format!("{} {} (the map of {value})", d.at.short(), d.text());
                    } else {
                        self.note(Note::unconverted(
                            d.at.clone(),
                            d.text(),
                            "echoes any Origin back: not converted; set cors.origins to the origins allowed",
                        ));
                    }
                }
                "access-control-allow-methods" => {
                    cors.methods = Some(
                        value
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    )
                }
                "access-control-allow-headers" => {
                    cors.headers = Some(
                        value
                            .split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    )
                }
                "access-control-allow-credentials" => cors.credentials = value == "true",
                "access-control-max-age" => cors.max_age = seconds(value).map(|s| format!("{s}s")),
                "access-control-expose-headers" => self.note(Note::unconverted(
                    d.at.clone(),
                    d.text(),
                    "portico's cors has no expose list: not converted",
                )),
                _ if value.contains('$') => self.note(Note::unconverted(
                    d.at.clone(),
                    d.text(),
                    "a header value with variables is not converted",
                )),
                _ => {
                    if !site
                        .headers
                        .iter()
                        .any(|(n, _)| n.eq_ignore_ascii_case(name))
                    {
                        site.headers.push((name.to_string(), value.to_string()));
                    }
                }
            }
        }
        if any_cors && origin_ok {
            if cors.credentials && cors.origins.iter().any(|o| o == "*") {
                cors.credentials = false;
                if let Some(d) = list.iter().find(|d| {
                    d.arg(0)
                        .eq_ignore_ascii_case("access-control-allow-credentials")
                }) {
                    self.note(Note::unconverted(
                        d.at.clone(),
                        d.text(),
                        "credentials cannot be allowed for origin \"*\": dropped",
                    ));
                }
            }
            site.cors = Some(cors);
        }
    }

    /// `map $http_origin $var { ~^https://app\.example\.com$ $http_origin; }`
    /// -> the origins it allows.
    fn origin_map(&mut self, var: &str) -> Option<Vec<String>> {
        let m = self
            .model
            .maps
            .iter()
            .find(|m| m.var == var && m.source == "$http_origin")?;
        let mut out = Vec::new();
        for e in &m.entries {
            if e.name == "default" {
                continue;
            }
            let origin = e
                .name
                .trim_start_matches('~')
                .trim_start_matches('^')
                .trim_end_matches('$')
                .replace("\\.", ".");
            let plain = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.contains(['\\', '(', ')', '[', ']', '*', '+', '?', '|', '^', '$']);
            if plain {
                out.push(origin);
            } else {
                self.note(Note::unconverted(
                    e.at.clone(),
                    e.text(),
                    "an origin pattern that is not one plain origin is not converted: list the origins",
                ));
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// nginx replaces the location prefix with a proxy_pass URI; portico keeps
/// the path, so only a URI that changes nothing converts.
fn check_uri(uri: Option<&str>, loc_path: &str) -> Result<(), String> {
    match uri {
        None => Ok(()),
        Some(u) if u == loc_path || (u == "/" && loc_path == "/") => Ok(()),
        Some(u) => Err(format!(
            "proxy_pass with the URI {u:?} rewrites the path ({loc_path} -> {u}); portico forwards paths unchanged: not converted"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(seconds("600s"), Some(600));
        assert_eq!(seconds("1800"), Some(1800));
        assert_eq!(seconds("2h"), Some(7200));
        assert_eq!(size("100m"), Some(Some("100MiB".into())));
        assert_eq!(size("0"), Some(None));
        assert_eq!(size("1x"), None);
    }
}
