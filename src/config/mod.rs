//! Configuration in two stages: [`raw`] serde shapes, then [`validate`] into
//! the checked types below, which the rest of portico uses. Every error names
//! the file, the key path (`route[3].pass`) and the reason, on one line.

pub mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use ipnet::IpNet;

pub use validate::validate;

/// One configuration problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<embedded>`) the config came from.
    pub source: String,
    /// Key path such as `route[3].pass`; empty for whole-file problems.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The embedded default config, used when portico runs without a file.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");
/// Name used for the embedded config in messages.
pub const EMBEDDED_NAME: &str = "<embedded default>";

/// Load a config file (TOML) with `PORTICO_*` environment overrides and validate it.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source: source.clone(),
        key: String::new(),
        reason: format!("cannot read config file: {e}"),
    })?;
    let mut cfg = load_str(&text, &source)?;
    cfg.path = Some(path.to_path_buf());
    Ok(cfg)
}

/// Load config text; `source` names it in error messages.
pub fn load_str(text: &str, source: &str) -> Result<Config, ConfigError> {
    let figment = Figment::new().merge(Toml::string(text)).merge(
        Env::prefixed("PORTICO_")
            .split("__")
            // PORTICO_CONFIG names the file itself; it is not a key.
            .ignore(&["config"]),
    );
    let raw: raw::RawConfig = figment.extract().map_err(|e| figment_error(source, e))?;
    validate(raw, source)
}

fn figment_error(source: &str, err: figment::Error) -> ConfigError {
    let from_env = err
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    let key = key_path(&err.path);
    let mut reason = one_line(&err.kind.to_string());
    if from_env {
        reason.push_str(" (from a PORTICO_ environment variable)");
    }
    ConfigError {
        source: source.to_string(),
        key,
        reason,
    }
}

/// toml's parse errors span several lines (a source excerpt with a caret
/// under the column); keep the position and the explanation on one line, e.g.
/// "TOML parse error at line 6, column 8: invalid table header, expected ..."
fn one_line(reason: &str) -> String {
    let parts: Vec<&str> = reason
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        // The excerpt: "|", "6 | [[route]", "|        ^".
        .filter(|l| {
            !l.starts_with('|')
                && !l.split_once('|').is_some_and(|(n, _)| {
                    let n = n.trim();
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                })
        })
        .collect();
    match parts.split_first() {
        Some((first, rest)) if !rest.is_empty() => format!("{first}: {}", rest.join(", ")),
        Some((first, _)) => (*first).to_string(),
        None => reason.trim().to_string(),
    }
}

/// `["route", "3", "pass"]` -> `route[3].pass`.
pub(crate) fn key_path(parts: &[String]) -> String {
    let mut out = String::new();
    for p in parts {
        if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() {
            out.push('[');
            out.push_str(p);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(p);
        }
    }
    out
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (file path or the embedded name), for messages.
    pub source: String,
    /// The file, when loaded from one (reload re-reads it).
    pub path: Option<PathBuf>,
    pub shutdown_grace: Duration,
    pub workers: Option<usize>,
    pub admin: Admin,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: Log,
    pub tunnel: Tunnel,
    pub listeners: Vec<Listen>,
    pub routes: Vec<Route>,
    pub backends: BTreeMap<String, Arc<Backend>>,
    pub sites: BTreeMap<String, Arc<Site>>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
}

impl Config {
    /// True when some route takes clients that send nothing.
    pub fn has_silent_route(&self) -> bool {
        self.routes.iter().any(|r| r.matcher.take_silent)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub client_hello: Duration,
    pub tls_handshake: Duration,
    pub upstream_connect: Duration,
    pub idle: Duration,
    pub request_header: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_hello: Duration::from_secs(10),
            tls_handshake: Duration::from_secs(10),
            upstream_connect: Duration::from_secs(5),
            idle: Duration::from_secs(3600),
            request_header: Duration::from_secs(30),
        }
    }
}

/// Resource limits; defaults and the reason for each are in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_hellos: usize,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_h2_streams: u32,
    pub max_uri_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_pending_hellos: 4_096,
            max_header_size: 64 * 1024,
            max_headers: 100,
            max_h2_streams: 256,
            max_uri_length: 8 * 1024,
        }
    }
}

/// How passthrough bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    pub splice: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub accept_proxy: bool,
    pub trusted: Vec<IpNet>,
}

impl Listen {
    /// Whether `ip` may send a PROXY header to this listener.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) compare as IPv4.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// What the first bytes of a connection must be for a route to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tls,
    Http,
    Ssh,
    Any,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Ssh => "ssh",
            Protocol::Any => "any",
        }
    }
}

/// A server-name pattern: exact, or `*.suffix` matching one or more labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` -> `.example.com`.
    Wildcard(String),
}

impl SniPattern {
    /// Parse a pattern; names are lower-cased and one trailing dot dropped.
    pub fn parse(s: &str) -> Result<SniPattern, String> {
        let name = s.trim_end_matches('.').to_ascii_lowercase();
        if let Some(rest) = name.strip_prefix("*.") {
            check_hostname(rest)?;
            return Ok(SniPattern::Wildcard(format!(".{rest}")));
        }
        check_hostname(&name)?;
        Ok(SniPattern::Exact(name))
    }

    /// Match a normalised server name (lower case, no trailing dot) on label boundaries.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            SniPattern::Exact(e) => e == name,
            SniPattern::Wildcard(suffix) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
        }
    }

    /// True when every name this pattern matches is also matched by `other`.
    pub fn covered_by(&self, other: &SniPattern) -> bool {
        match (self, other) {
            (_, SniPattern::Exact(_)) => self == other,
            (SniPattern::Exact(n), w) => w.matches(n),
            (SniPattern::Wildcard(a), SniPattern::Wildcard(b)) => a.ends_with(b.as_str()),
        }
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniPattern::Exact(e) => f.write_str(e),
            SniPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a host name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!(
                "{name:?} is not a host name (use \"name.example.com\" or \"*.example.com\")"
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub sni: Vec<SniPattern>,
    pub alpn: Vec<Vec<u8>>,
    pub protocol: Protocol,
    pub take_silent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pass(Arc<Backend>),
    Terminate(String),
    Redirect,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Pass(_) => "pass",
            Action::Terminate(_) => "terminate",
            Action::Redirect => "redirect",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Position in the file, 0-based, as in `route[N]` of error messages.
    pub index: usize,
    /// Label for metrics: `N:action:target`, bounded by the config.
    pub label: std::sync::Arc<str>,
    pub matcher: Matcher,
    pub action: Action,
}

/// A stream destination: TCP `host:port` or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty unix socket path".into());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if s.parse::<SocketAddr>().is_ok() {
            return Ok(Address::Tcp(s.to_string()));
        }
        // host:port with a name: resolved at connect time.
        match s.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && !host.contains(':')
                    && port.parse::<u16>().is_ok_and(|p| p != 0) =>
            {
                check_hostname(host)?;
                Ok(Address::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "{s:?} is not an address (use \"127.0.0.1:8001\", \"[::1]:8001\", \"host:port\" or \"unix:/path\")"
            )),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => f.write_str(a),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    None,
    V1,
    V2,
}

impl ProxyVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::None => "none",
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Shared: it labels every tunnel's metrics.
    pub name: std::sync::Arc<str>,
    pub addr: Address,
    pub proxy_protocol: ProxyVersion,
}

/// Where a site's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub credentials: bool,
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Prefix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Upstream(Arc<Upstream>),
    Respond {
        status: u16,
        body: String,
        content_type: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Metrics label: the `name` when set, else the path.
    pub name: String,
    pub path: String,
    pub match_kind: MatchKind,
    pub target: Target,
    pub websocket: WebSocketMode,
}

/// `websocket` of a location: what portico does with an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebSocketMode {
    /// Forward it; an upstream that answers with a 4xx instead of 101 makes
    /// the client get 426 (so it falls back to plain HTTP at once), and
    /// later upgrades get 426 without asking the upstream for `recheck`.
    Auto { recheck: Duration },
    /// Forward it and pass the upstream's answer through unchanged.
    On,
    /// Answer 426 without asking the upstream.
    Off,
}

impl WebSocketMode {
    /// How long an `auto` location remembers a refused upgrade by default.
    pub const DEFAULT_RECHECK: Duration = Duration::from_secs(600);

    /// Does an upgrade request go to the upstream at all (unless remembered)?
    pub fn forwards(self) -> bool {
        self != WebSocketMode::Off
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub cert: CertSource,
    /// Host names this site serves: the `sni` of the routes that terminate here.
    pub names: Vec<SniPattern>,
    /// True when some route terminating here has no `sni` (admits any Host).
    pub any_name: bool,
    pub max_body: Option<u64>,
    pub non_http: Option<Arc<Backend>>,
    pub headers: Vec<(String, String)>,
    pub cors: Option<Cors>,
    pub locations: Vec<Location>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    H2c,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub addr: Address,
    /// Authority used when the upstream needs one (h2c `:authority` fallback).
    pub authority: String,
    pub keepalive: usize,
    pub protocol: UpstreamProtocol,
}

/// The human summary `portico check` prints: listeners, then the route table.
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: ok ({} listeners, {} routes, {} backends, {} sites, {} upstreams)",
        cfg.source,
        cfg.listeners.len(),
        cfg.routes.len(),
        cfg.backends.len(),
        cfg.sites.len(),
        cfg.upstreams.len()
    );
    for l in &cfg.listeners {
        if l.accept_proxy {
            let trusted: Vec<String> = l.trusted.iter().map(|t| t.to_string()).collect();
            let _ = writeln!(
                out,
                "listen {}  (PROXY header from {})",
                l.addr,
                trusted.join(", ")
            );
        } else {
            let _ = writeln!(out, "listen {}", l.addr);
        }
    }
    if let Some(a) = cfg.admin.metrics {
        let _ = writeln!(out, "admin  http://{a}/metrics");
    }
    let rows: Vec<(String, String)> = cfg
        .routes
        .iter()
        .map(|r| {
            let mut m = vec![r.matcher.protocol.as_str().to_string()];
            if !r.matcher.sni.is_empty() {
                let s: Vec<String> = r.matcher.sni.iter().map(|p| p.to_string()).collect();
                m.push(format!("sni={}", s.join(",")));
            }
            if !r.matcher.alpn.is_empty() {
                let a: Vec<String> = r
                    .matcher
                    .alpn
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                m.push(format!("alpn={}", a.join(",")));
            }
            if r.matcher.take_silent {
                m.push("+silent".into());
            }
            let action = match &r.action {
                Action::Pass(b) => format!(
                    "pass {} -> {} (proxy {})",
                    b.name,
                    b.addr,
                    b.proxy_protocol.as_str()
                ),
                Action::Terminate(s) => {
                    let locs = cfg.sites.get(s).map(|s| s.locations.len()).unwrap_or(0);
                    format!("terminate {s} ({locs} locations)")
                }
                Action::Redirect => "redirect 308 https://host/path".into(),
            };
            (format!("route[{}]  {}", r.index, m.join(" ")), action)
        })
        .collect();
    let width = rows.iter().map(|(a, _)| a.len()).max().unwrap_or(0);
    for (m, a) in rows {
        let _ = writeln!(out, "{m:width$}  -> {a}");
    }
    for site in cfg.sites.values() {
        for l in &site.locations {
            let target = match &l.target {
                Target::Upstream(u) => format!(
                    "upstream {} ({}){}",
                    u.name,
                    u.addr,
                    match l.websocket {
                        WebSocketMode::Auto { .. } => "",
                        WebSocketMode::On => " websocket=true",
                        WebSocketMode::Off => " websocket=false",
                    }
                ),
                Target::Respond { status, .. } => format!("respond {status}"),
            };
            let kind = match l.match_kind {
                MatchKind::Exact => "=",
                MatchKind::Prefix => "^",
            };
            let _ = writeln!(
                out,
                "site {}  {} {}  -> {}",
                site.name, kind, l.path, target
            );
        }
    }
    out
}
