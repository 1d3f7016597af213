//! Raw serde shapes of the TOML config, exactly as users write them.
//!
//! Every struct denies unknown fields: a typo such as `acept_proxy` must be an
//! error, not a silently ignored key. Values stay close to the text here;
//! `validate` turns them into checked types (addresses, CIDRs, route tables).

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port` of the admin listener, or `"off"`.
    pub metrics: Option<String>,
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
    pub format: Option<String>,
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
    pub protocol: Option<String>,
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
    pub proxy_protocol: Option<String>,
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
    pub match_kind: Option<String>,
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
    pub protocol: Option<String>,
}
