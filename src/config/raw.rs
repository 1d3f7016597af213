//! Raw serde shapes of the TOML config, exactly as users write them.
//!
//! Every struct denies unknown fields: a typo such as `acept_proxy` must be an
//! error, not a silently ignored key. Keyword values (protocols, formats,
//! versions) are read into their enums here; `validate` turns the rest into
//! checked types (addresses, CIDRs, headers, route tables).

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{LogFormat, MatchKind, Protocol, ProxyVersion, UpstreamProtocol};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// Runtime worker threads; `TOKIO_WORKER_THREADS` wins when set.
    pub workers: Option<usize>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub tunnel: RawTunnel,
    #[serde(default)]
    pub listen: Vec<RawListen>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    #[serde(default)]
    pub backend: BTreeMap<String, RawBackend>,
    #[serde(default)]
    pub site: BTreeMap<String, RawSite>,
    #[serde(default)]
    pub upstream: BTreeMap<String, RawUpstream>,
    pub acme: Option<RawAcme>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub email: Option<String>,
    pub directory: Option<String>,
    pub storage: Option<String>,
    pub ca: Option<String>,
    pub challenge: Option<String>,
    /// First retry delay after a failed order (doubles per failure, capped).
    #[serde(default, with = "humantime_serde")]
    pub retry: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port` of the admin listener, or `"off"` (the older name of `listen`).
    pub metrics: Option<String>,
    /// `host:port` of the admin listener, or `"off"`.
    pub listen: Option<String>,
    /// Bearer token for the status page and API (and `/metrics` with `protect_metrics`).
    #[serde(default, deserialize_with = "token")]
    pub token: Option<String>,
    /// Require the token for `/metrics` too (default false: scrapers keep working).
    #[serde(default)]
    pub protect_metrics: bool,
}

/// A token as text, also when it looks like a number (`PORTICO_ADMIN__TOKEN=123456`
/// reads as one). Other types are refused without echoing the value, which
/// serde's own type errors would do: it is a secret.
fn token<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Token;
    const EXPECTED: &str = "must be a string (its value is not shown)";
    impl<'de> serde::de::Visitor<'de> for Token {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a token string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom(EXPECTED))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom(EXPECTED))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(Token)
        }
    }
    d.deserialize_option(Token)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default, with = "humantime_serde")]
    pub client_hello: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub tls_handshake: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_connect: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_header: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_pending_hellos: Option<usize>,
    pub max_header_size: Option<ByteSize>,
    pub max_headers: Option<usize>,
    pub max_h2_streams: Option<u32>,
    pub max_uri_length: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnel {
    /// Move passthrough bytes with splice(2) (default) instead of user-space buffers.
    pub splice: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub addr: String,
    #[serde(default)]
    pub accept_proxy: bool,
    pub trusted: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub sni: Option<Vec<String>>,
    pub alpn: Option<Vec<String>>,
    pub protocol: Option<Protocol>,
    pub pass: Option<String>,
    pub terminate: Option<String>,
    pub redirect: Option<String>,
    /// Only for `protocol = "ssh"` routes: also take clients that send nothing
    /// within `timeouts.client_hello` (server-speaks-first protocols, as sslh does).
    #[serde(default)]
    pub take_silent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub addr: String,
    pub proxy_protocol: Option<ProxyVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub cert: String,
    pub key: Option<String>,
    pub max_body: Option<ByteSize>,
    pub non_http: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub cors: Option<RawCors>,
    #[serde(default)]
    pub location: Vec<RawLocation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub origins: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    #[serde(default)]
    pub credentials: bool,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocation {
    pub name: Option<String>,
    pub path: String,
    #[serde(rename = "match")]
    pub match_kind: Option<MatchKind>,
    pub upstream: Option<String>,
    pub respond: Option<RawRespond>,
    pub websocket: Option<RawWebSocket>,
    /// With `websocket = "auto"`: how long a refused upgrade is remembered.
    #[serde(default, with = "humantime_serde")]
    pub websocket_recheck: Option<Duration>,
}

/// `websocket = true | false | "auto"` (and the strings "true"/"false",
/// which is what an environment override gives).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawWebSocket {
    Bool(bool),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    pub status: Option<u16>,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: String,
    pub keepalive: Option<usize>,
    pub protocol: Option<UpstreamProtocol>,
}
