//! The HTTP half: one hyper connection (HTTP/1.1 or h2) per terminated TLS
//! stream, the location router, the upstream pools and the streaming proxy;
//! also the plain-HTTP redirect server.
//!
//! Inside, each module uses only those listed before it:
//! `framing`, `headers`, `router` -> `exchange` (access log + metrics) ->
//! `body` -> `error` (error-to-response) -> `upstream` -> `site` (site and
//! connection state) -> `websocket` -> `proxy` (the request handler) ->
//! `streams` (h2 streams on the connection's task) -> [`serve`].
//! `redirect` stands alone.

pub mod body;
pub mod conformance;
pub mod error;
pub mod exchange;
pub mod framing;
pub mod headers;
pub mod pool;
pub mod proxy;
pub mod redirect;
pub mod router;
pub mod site;
pub mod streams;
pub mod upstream;
pub mod websocket;
pub mod ws_auto;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{Limits, Timeouts};
use site::{ConnContext, SiteRuntime};
use streams::{ConnExecutor, Streams};

/// h2 receive windows: 1 MiB per stream lets one upload run at full speed on
/// a 10 ms path; 4 MiB per connection bounds what one client can make us hold.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONN_WINDOW: u32 = 4 << 20;

/// How the connection should be spoken, when ALPN already said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    H2,
    Http1,
    /// No ALPN: detect from the first bytes (h2 prior knowledge or HTTP/1.x).
    Unknown,
}

/// hyper's HTTP/1.1 + h2 server settings for a site's connections; h2
/// streams run on their connection's task (see [`streams`]).
pub type Builder = auto::Builder<ConnExecutor>;

/// The server settings for a site, built once per configuration
/// generation; each connection takes its own copy (see [`serve`]).
pub fn builder(limits: &Limits, timeouts: &Timeouts) -> Builder {
    let mut builder = auto::Builder::new(ConnExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(timeouts.request_header)
        .max_buf_size(limits.max_header_size.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(limits.max_h2_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_header_list_size(limits.max_header_size as u32)
        // Rapid reset (CVE-2023-44487): cap streams a client may open and
        // cancel before we close the connection.
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    builder
}

/// Serve HTTP on one (decrypted) connection: the returned future runs it
/// until it ends. `ctx.life` ends it: shutdown begins a graceful close
/// (GOAWAY / close after the current response), hard stop drops it.
///
/// Not an `async fn`, for memory: hyper's connection (with `io` in it) is
/// built here and boxed, and the future keeps only the box. An `async fn`
/// would keep `io` a second time (a future keeps its arguments for its
/// whole life) and the builder the connection borrows; measured, the
/// future of that version was 7.7 KiB, this one's box 2.9 KiB.
pub fn serve<I>(
    io: I,
    builder: &Builder,
    site: Arc<SiteRuntime>,
    ctx: Arc<ConnContext>,
) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let life = ctx.life.clone();
    // Boxed: hyper keeps room for the service's future for as long as the
    // connection lives (HTTP/1.1), or in each stream's task (h2). The
    // future is several KiB and done once the response head is out, so a
    // box freed then costs one allocation per request and saves that room
    // on every streaming response (SSE, long completions) while it streams.
    let svc = service_fn(move |req| -> Pin<Box<dyn Future<Output = _> + Send>> {
        let site = site.clone();
        let ctx = ctx.clone();
        Box::pin(async move { Ok::<_, Infallible>(proxy::handle(req, site, ctx).await) })
    });
    // `into_owned`: the connection keeps its own copy of the builder (until
    // it knows the version), so nothing outside the box is borrowed.
    let mut conn = Box::pin(
        builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned(),
    );
    async move {
        let mut streams = Streams::default();
        let result = tokio::select! {
            r = streams.drive(conn.as_mut()) => r,
            _ = life.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = streams.drive(conn.as_mut()) => r,
                    _ = life.hard_stop.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }
}
