//! portico: one front for port 443.
//!
//! A connection flows one way through the modules, and each module uses only
//! what lies below it in this picture:
//!
//! ```text
//! server       the process: listeners, admin, reload (-> generation), shutdown
//!   listener   bind, accept, connection limits
//!   conn       per connection: proxy_protocol (inbound header) -> hello (peek)
//!              -> route::decide -> dispatch:
//!     tunnel       pass: dial the backend, PROXY header out, splice/copy
//!     terminate    TLS handshake, then non_http -> tunnel, or:
//!       http       hyper server -> proxy (site, locations) -> upstream pools,
//!                  websocket; http::redirect for plain-HTTP redirect routes
//! generation   a prepared config: sites, upstream pools, resolved routes
//! ```
//!
//! Below them all: `config` (the checked model), `lifecycle` (shutdown, hard
//! stop, task tracker), `dial` (the one way to connect, TCP or Unix), `io`
//! (peek replay, meters, the idle-aware pump), `splice`, `tls`, `metrics`.
//! `acme` obtains and renews certificates: `conn` asks it for TLS-ALPN-01
//! answers before routing, `http::redirect` for HTTP-01, `tls` reads its
//! certificate slots. `admin` serves /metrics, and `status` the status page
//! and API, beside the flow; `recent_errors` keeps the last failures for
//! them. `describe` prints the route table for `portico check`.
//! `tests/module_graph.rs` (run first by `.ci/run`) fails when an import
//! cycle comes back.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod config;
pub mod conn;
pub mod describe;
pub mod dial;
pub mod generation;
pub mod hello;
pub mod http;
pub mod import;
pub mod io;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod proxy_protocol;
pub mod recent_errors;
pub mod route;
pub mod server;
pub mod splice;
pub mod status;
pub mod terminate;
pub mod tls;
pub mod tls_failures;
pub mod tunnel;
