//! portico: one front for port 443.
//!
//! Data flows one way through the modules: `listener` accepts, `proxy_protocol`
//! reads an inbound PROXY header, `hello` peeks the first bytes, `route`
//! decides, then `tunnel` passes bytes through or `terminate` + `http`
//! terminate TLS and proxy HTTP. `server` owns the process; `metrics` and
//! `config` are used by all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod hello;
pub mod http;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod proxy_protocol;
pub mod route;
pub mod server;
pub mod splice;
pub mod terminate;
pub mod tls;
pub mod tls_failures;
pub mod tunnel;
