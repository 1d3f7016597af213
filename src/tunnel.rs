//! Passthrough: connect to a backend, send the PROXY header and the peeked
//! bytes, then copy both ways until both sides are done.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::Backend;
use crate::dial::{self, DialError};
use crate::io::{idle_watchdog, pump, Activity, Metered, TlsEof};

/// Most bytes one read takes per direction on the user-space path. 64 KiB
/// moves a bulk transfer in a quarter of the syscalls of tokio's 8 KiB
/// default (measured in the benchmarks). It is read on the stack (see
/// `io::pump`): an open tunnel holds heap only for bytes its peer has not
/// taken yet.
pub const COPY_BUF: usize = 64 * 1024;

/// A backend that could not be reached, named.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to backend {backend} ({addr}): {source}")]
    Io {
        backend: String,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connect to backend {backend} ({addr}): no answer within {timeout:?}")]
    Timeout {
        backend: String,
        addr: String,
        timeout: Duration,
    },
}

/// Connect to `backend` within `timeout` (TCP with TCP_NODELAY, or Unix).
pub async fn connect(backend: &Backend, timeout: Duration) -> Result<dial::Stream, ConnectError> {
    let named = |addr: String| (backend.name.to_string(), addr);
    dial::connect(&backend.addr, timeout)
        .await
        .map_err(|e| match e {
            DialError::Io { addr, source } => {
                let (backend, addr) = named(addr);
                ConnectError::Io {
                    backend,
                    addr,
                    source,
                }
            }
            DialError::Timeout { addr, timeout } => {
                let (backend, addr) = named(addr);
                ConnectError::Timeout {
                    backend,
                    addr,
                    timeout,
                }
            }
        })
}

/// How a tunnel ended, for the access log.
#[derive(Debug, thiserror::Error)]
pub enum CloseCause {
    /// Both sides closed their write halves.
    #[error("eof")]
    Done,
    /// No bytes either way for `timeouts.idle`.
    #[error("idle")]
    Idle,
    /// Writing the PROXY header and first bytes to the backend failed.
    #[error("error: write to backend: {0}")]
    BackendWrite(#[source] io::Error),
    /// A read or write failed (usually a reset).
    #[error("error: {0}")]
    Error(#[source] io::Error),
    /// The process is shutting down.
    #[error("shutdown")]
    Shutdown,
}

/// Byte counts of a finished tunnel.
#[derive(Debug)]
pub struct TunnelStats {
    /// Client to backend, including the replayed first bytes.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
    pub cause: CloseCause,
}

/// A passthrough backend with its tunnel metrics, made once per config
/// generation.
#[derive(Debug)]
pub struct Target {
    pub backend: std::sync::Arc<Backend>,
    metrics: crate::metrics::BackendMetrics,
}

impl Target {
    pub fn new(backend: std::sync::Arc<Backend>) -> Target {
        let metrics = crate::metrics::BackendMetrics::new(&backend.name);
        Target { backend, metrics }
    }
}

/// What to do with one passthrough connection.
pub struct Job<'a> {
    pub target: &'a Target,
    /// PROXY header followed by the bytes peeked from the client.
    pub first: Vec<u8>,
    /// Length of the PROXY header at the start of `first`.
    pub header_len: usize,
    /// Who the client is and which route sent it, for the access log.
    pub client: std::net::SocketAddr,
    pub route: &'a str,
    pub connect_timeout: Duration,
    pub idle: Duration,
    /// Use splice(2) when both sides are plain sockets.
    pub splice: bool,
}

impl<'a> Job<'a> {
    /// A job whose first bytes are the PROXY header `out` calls for (per the
    /// backend's `proxy_protocol`), then the bytes already read from the client.
    pub fn new(
        target: &'a Target,
        out: &crate::proxy_protocol::Outbound<'_>,
        peeked: &[u8],
        route: &'a str,
        timeouts: &crate::config::Timeouts,
        splice: bool,
    ) -> Job<'a> {
        let mut first = crate::proxy_protocol::outbound_header(target.backend.proxy_protocol, out);
        let header_len = first.len();
        first.extend_from_slice(peeked);
        Job {
            target,
            first,
            header_len,
            client: out.source,
            route,
            connect_timeout: timeouts.upstream_connect,
            idle: timeouts.idle,
            splice,
        }
    }
}

/// The client side of a tunnel: a plain socket can be spliced; any other
/// stream (decrypted TLS) is copied through user space.
pub enum ClientSide<C> {
    Tcp(TcpStream),
    Stream(C),
}

/// Connect to the job's backend and join it with `client` until both sides
/// are done; counts, times and logs the tunnel. A backend that cannot be
/// reached closes the client at once, counted and logged once.
///
/// Like the two functions below, a plain `fn` returning an `async move`
/// block: an `async fn` keeps a second copy of its arguments in its state
/// (rust-lang/rust#62958), and a tunnel keeps that state for its whole life.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn serve<'a, C>(
    client: ClientSide<C>,
    mut job: Job<'a>,
    shutdown: &'a CancellationToken,
) -> impl std::future::Future<Output = ()> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + 'a,
{
    async move {
        let name = &*job.target.backend.name;
        let started = Instant::now();
        let conn = match connect(&job.target.backend, job.connect_timeout).await {
            Ok(c) => c,
            Err(e) => {
                job.target.metrics.connect_failures.increment(1);
                tracing::warn!(client = %job.client, route = %job.route, backend = %name, error = %e, "backend unreachable; closing client");
                crate::recent_errors::record(crate::recent_errors::RecentError {
                    at: std::time::SystemTime::now(),
                    kind: "backend",
                    site: None,
                    location: None,
                    status: None,
                    error: format!("backend {name} unreachable: {e}"),
                });
                return;
            }
        };
        // Handed to the backend once and freed: the tunnel may stay open for hours.
        let first = std::mem::take(&mut job.first);
        let stats = {
            let _active = crate::metrics::GaugeGuard::new(job.target.metrics.active.clone());
            match client {
                ClientSide::Tcp(c) if job.splice => {
                    splice_sockets(c, conn, &job, first, shutdown).await
                }
                ClientSide::Tcp(c) => pipe_streams(c, conn, &job, first, shutdown).await,
                ClientSide::Stream(c) => pipe_streams(c, conn, &job, first, shutdown).await,
            }
        };
        let secs = started.elapsed().as_secs_f64();
        job.target.metrics.duration.record(secs);
        tracing::info!(
            target: "portico::access",
            kind = "tunnel",
            client = %job.client,
            route = %job.route,
            backend = %name,
            bytes_up = stats.up,
            bytes_down = stats.down,
            duration_ms = (secs * 1000.0) as u64,
            cause = %stats.cause,
            "tunnel closed"
        );
    }
}

/// The start every tunnel shares: live byte counters, the PROXY header and
/// peeked bytes written to the backend, and the activity clock.
struct Opened {
    up: metrics::Counter,
    down: metrics::Counter,
    /// Client bytes already sent (the replayed first bytes).
    client_first: u64,
    activity: std::sync::Arc<Activity>,
}

/// `first` is the job's PROXY header and peeked bytes, taken out of it.
async fn open<B: AsyncWrite + Unpin>(
    backend: &mut B,
    job: &Job<'_>,
    first: Vec<u8>,
) -> Result<Opened, TunnelStats> {
    let up = job.target.metrics.bytes_up.clone();
    let down = job.target.metrics.bytes_down.clone();
    if let Err(e) = backend.write_all(&first).await {
        return Err(TunnelStats {
            up: 0,
            down: 0,
            cause: CloseCause::BackendWrite(e),
        });
    }
    // The PROXY header is ours, not the client's: count only client bytes.
    let client_first = first.len().saturating_sub(job.header_len) as u64;
    up.increment(client_first);
    Ok(Opened {
        up,
        down,
        client_first,
        activity: Activity::new(),
    })
}

fn end_cause(r: io::Result<()>) -> CloseCause {
    match r {
        Ok(()) => CloseCause::Done,
        // A TLS client that closes without close_notify (rustls reports
        // UnexpectedEof) has ended its tunnel like any other client.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => CloseCause::Done,
        Err(e) => CloseCause::Error(e),
    }
}

/// The splice(2) path for socket-to-socket tunnels.
fn splice_sockets<'a, B>(
    client: TcpStream,
    mut backend: B,
    job: &'a Job<'_>,
    first: Vec<u8>,
    shutdown: &'a CancellationToken,
) -> impl std::future::Future<Output = TunnelStats> + 'a
where
    B: crate::splice::Socket + AsyncWrite + Unpin + 'a,
{
    async move {
        let o = match open(&mut backend, job, first).await {
            Ok(o) => o,
            Err(stats) => return stats,
        };
        let (mut up, mut down) = (o.client_first, 0u64);
        let ended = std::sync::atomic::AtomicBool::new(false);
        let copy = async {
            tokio::try_join!(
                crate::splice::one_way(&client, &backend, &ended, |n| {
                    up += n;
                    o.up.increment(n);
                    o.activity.touch();
                }),
                crate::splice::one_way(&backend, &client, &ended, |n| {
                    down += n;
                    o.down.increment(n);
                    o.activity.touch();
                }),
            )
            .map(|_| ())
        };
        let cause = tokio::select! {
            r = copy => end_cause(r),
            _ = idle_watchdog(&o.activity, job.idle) => CloseCause::Idle,
            _ = shutdown.cancelled() => CloseCause::Shutdown,
        };
        TunnelStats { up, down, cause }
    }
}

/// The user-space path: any client stream (decrypted TLS), or splice off.
fn pipe_streams<'a, C, B>(
    client: C,
    mut backend: B,
    job: &'a Job<'_>,
    first: Vec<u8>,
    shutdown: &'a CancellationToken,
) -> impl std::future::Future<Output = TunnelStats> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + 'a,
    B: AsyncRead + AsyncWrite + Unpin + 'a,
{
    async move {
        let o = match open(&mut backend, job, first).await {
            Ok(o) => o,
            Err(stats) => return stats,
        };
        let c = Metered::new(client, o.up, o.client_first, o.activity.clone());
        let b = Metered::new(backend, o.down, 0, o.activity.clone());
        let (mut cr, mut cw) = tokio::io::split(c);
        let (mut br, mut bw) = tokio::io::split(b);
        // Buffers only while bytes are in flight (see `pump`): a terminated
        // tunnel that sits idle holds no copy buffer.
        let both = async {
            tokio::try_join!(
                pump::<COPY_BUF, _, _>(&mut cr, &mut bw, TlsEof::Fails),
                pump::<COPY_BUF, _, _>(&mut br, &mut cw, TlsEof::Fails)
            )
            .map(|_| ())
        };
        let cause = tokio::select! {
            r = both => end_cause(r),
            _ = idle_watchdog(&o.activity, job.idle) => CloseCause::Idle,
            _ = shutdown.cancelled() => CloseCause::Shutdown,
        };
        let (c, b) = (cr.unsplit(cw), br.unsplit(bw));
        TunnelStats {
            up: c.total,
            down: b.total,
            cause,
        }
    }
}
