//! Configuration in two stages: [`raw`] serde shapes, then [`validate`] into
//! the checked types below, which the rest of portico uses. Every error names
//! the file, the key path (`route[3].pass`) and the reason, on one line.

pub mod acme;
pub mod raw;
mod validate;

#[cfg(test)]
mod tests;

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

/// A config enum read from its TOML string: `TryFrom<String>` gives the
/// one-line "is not a ... (use ...)" message, which figment reports at the
/// key's path.
macro_rules! config_enum {
    ($ty:ident, $what:literal, $use:literal, { $($text:literal => $variant:ident),+ $(,)? }) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(format!(concat!("{:?} is not ", $what, " (use ", $use, ")"), s)),
                }
            }
        }
    };
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
    /// `[acme]`: present when the section is, or when a site has `cert = "acme"`.
    pub acme: Option<Arc<acme::Acme>>,
}

impl Config {
    /// True when some route takes clients that send nothing.
    pub fn has_silent_route(&self) -> bool {
        self.routes.iter().any(|r| r.matcher.take_silent)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The admin listener's address (`admin.listen`, or its older name `admin.metrics`).
    pub metrics: Option<SocketAddr>,
    /// `admin.token`: required for `/`, `/status*` (and `/metrics` with `protect_metrics`).
    pub token: Option<Secret>,
    pub protect_metrics: bool,
}

/// A secret string: compared in constant time and never printed (its
/// `Debug` shows `"<redacted>"`), so it cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// True when `given` equals the secret. Hand-written rather than a
    /// crate for one loop: it looks at every byte whatever the first
    /// difference, so the time taken does not tell how much of a guess was right.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        if want.len() != given.len() {
            return false;
        }
        want.iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    Text,
    Json,
}

config_enum!(LogFormat, "a log format", r#""text" or "json""#, {
    "text" => Text,
    "json" => Json,
});

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Protocol {
    Tls,
    Http,
    Ssh,
    Any,
}

config_enum!(Protocol, "a protocol", r#""tls", "http", "ssh" or "any""#, {
    "tls" => Tls,
    "http" => Http,
    "ssh" => Ssh,
    "any" => Any,
});

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ProxyVersion {
    None,
    V1,
    V2,
}

config_enum!(ProxyVersion, "a PROXY protocol version", r#""none", "v1" or "v2""#, {
    "none" => None,
    "v1" => V1,
    "v2" => V2,
});

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
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    SelfSigned,
    /// `cert = "acme"`: issued and renewed for the site's exact names.
    Acme(Arc<acme::Acme>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    pub origins: Vec<String>,
    /// `Access-Control-Allow-Methods` of preflight answers.
    pub methods: http::HeaderValue,
    /// `Access-Control-Allow-Headers` of preflight answers.
    pub headers: http::HeaderValue,
    pub credentials: bool,
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum MatchKind {
    Exact,
    Prefix,
}

config_enum!(MatchKind, "a match kind", r#""exact" or "prefix""#, {
    "exact" => Exact,
    "prefix" => Prefix,
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Upstream(Arc<Upstream>),
    Respond {
        status: http::StatusCode,
        body: bytes::Bytes,
        content_type: http::HeaderValue,
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
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub cors: Option<Cors>,
    pub locations: Vec<Location>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum UpstreamProtocol {
    Http1,
    H2c,
}

config_enum!(UpstreamProtocol, "an upstream protocol", r#""http1" or "h2c""#, {
    "http1" => Http1,
    "http/1.1" => Http1,
    "h2c" => H2c,
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub addr: Address,
    pub keepalive: usize,
    pub protocol: UpstreamProtocol,
}
