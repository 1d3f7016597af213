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

use futures_util::future::Either;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{Limits, Timeouts};
use crate::lifecycle::Lifecycle;
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

/// hyper's HTTP/1.1 and h2 server settings for a site's connections; h2
/// streams run on their connection's task (see [`streams`]).
///
/// Two builders rather than hyper-util's auto builder: the version is known
/// before hyper sees the connection (ALPN, then the first bytes, read in
/// `terminate`), and the auto builder's connection is an enum with room for
/// both protocols and a copy of both builders. Measured on a release build:
/// an HTTP/1.1 connection's boxed state went from 2,888 to 2,008 bytes, and
/// the RSS per open SSE stream (2000 streams) from 41.8 to 36.7 KiB.
pub struct Builder {
    h1: http1::Builder,
    h2: http2::Builder<ConnExecutor>,
}

/// The server settings for a site, built once per configuration
/// generation; each connection takes its own copy (see [`serve`]).
pub fn builder(limits: &Limits, timeouts: &Timeouts) -> Builder {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(timeouts.request_header)
        .max_buf_size(limits.max_header_size.max(8192))
        .max_headers(limits.max_headers);
    let mut h2 = http2::Builder::new(ConnExecutor);
    h2.timer(TokioTimer::new())
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
    Builder { h1, h2 }
}

/// Serve HTTP on one (decrypted) connection: the returned future runs it
/// until it ends. `ctx.life` ends it: shutdown begins a graceful close
/// (GOAWAY / close after the current response), hard stop drops it.
///
/// Not an `async fn`, for memory: hyper's connection (with `io` in it) is
/// built here and boxed, and the future keeps only the box. An `async fn`
/// would keep `io` a second time (a future keeps its arguments for its
/// whole life) and the builder the connection borrows; measured, the
/// future of that version was 7.7 KiB, this one's box 2.9 KiB (with
/// hyper-util's auto builder; see [`Builder`] for what it is now).
///
/// `h2` says which protocol the client speaks; `terminate` knows it from
/// ALPN and the first bytes.
pub fn serve<I>(
    io: I,
    builder: &Builder,
    h2: bool,
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
    let io = TokioIo::new(io);
    if h2 {
        let conn = Box::pin(builder.h2.serve_connection(io, svc));
        Either::Left(run(conn, life, http2::Connection::graceful_shutdown))
    } else {
        let conn = Box::pin(builder.h1.serve_connection(io, svc).with_upgrades());
        Either::Right(run(
            conn,
            life,
            http1::UpgradeableConnection::graceful_shutdown,
        ))
    }
}

/// Drive one hyper connection and its streams until it ends; `life.shutdown`
/// begins `graceful` (GOAWAY / close after the current response), and
/// `life.hard_stop` drops it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
fn run<C>(
    mut conn: Pin<Box<C>>,
    life: Lifecycle,
    graceful: fn(Pin<&mut C>),
) -> impl Future<Output = ()> + Send + 'static
where
    C: Future<Output = hyper::Result<()>> + Send + 'static,
{
    async move {
        let mut streams = Streams::default();
        let result = tokio::select! {
            r = streams.drive(conn.as_mut()) => r,
            _ = life.shutdown.cancelled() => {
                graceful(conn.as_mut());
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
