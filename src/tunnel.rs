//! Passthrough: connect to a backend, send the PROXY header and the peeked
//! bytes, then copy both ways until both sides are done.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Address, Backend};
use crate::metrics as m;

/// Copy buffer per direction. 64 KiB moves a bulk transfer in a quarter of
/// the syscalls of tokio's 8 KiB default (measured in the benchmarks) at a
/// cost of 128 KiB per open tunnel, allocated only when it first carries data.
pub const COPY_BUF: usize = 64 * 1024;

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

/// A connected backend stream, TCP or Unix.
pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Connect to `backend` within `timeout`, with TCP_NODELAY set.
pub async fn connect(backend: &Backend, timeout: Duration) -> Result<BackendStream, ConnectError> {
    let attempt = async {
        match &backend.addr {
            Address::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(BackendStream::Tcp(s))
            }
            Address::Unix(p) => Ok(BackendStream::Unix(UnixStream::connect(p).await?)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ConnectError::Io {
            backend: backend.name.to_string(),
            addr: backend.addr.to_string(),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout {
            backend: backend.name.to_string(),
            addr: backend.addr.to_string(),
            timeout,
        }),
    }
}

/// How a tunnel ended, for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    /// Both sides closed their write halves.
    Done,
    /// No bytes either way for `timeouts.idle`.
    Idle,
    /// A read or write failed (usually a reset).
    Error(String),
    /// The process is shutting down.
    Shutdown,
}

impl std::fmt::Display for CloseCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseCause::Done => f.write_str("eof"),
            CloseCause::Idle => f.write_str("idle"),
            CloseCause::Error(e) => write!(f, "error: {e}"),
            CloseCause::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// Byte counts of a finished tunnel.
#[derive(Debug, Clone)]
pub struct TunnelStats {
    /// Client to backend, including the replayed first bytes.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
    pub cause: CloseCause,
}

/// Shared clock of the last byte moved in either direction, read by the idle watchdog.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

pin_project_lite::pin_project! {
    /// Counts bytes read from `inner` into a live counter and the activity clock.
    struct Metered<S> {
        #[pin]
        inner: S,
        counter: metrics::Counter,
        total: u64,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.counter.increment(n);
            *this.total += n;
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Metered<S> {
    crate::io::forward_async_write!();
}

/// Join two streams until both directions end, an error, or `idle` without
/// a byte either way. Used for upgraded HTTP connections. A direction ends
/// at EOF, passed on as a write shutdown; with `linger`, once one direction
/// has ended the other gets at most that long to end as well.
pub async fn join_with_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
    linger: Option<Duration>,
) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    // Only the activity clock: callers count their own bytes.
    let a = Metered {
        inner: a,
        counter: metrics::Counter::noop(),
        total: 0,
        activity: activity.clone(),
    };
    let b = Metered {
        inner: b,
        counter: metrics::Counter::noop(),
        total: 0,
        activity: activity.clone(),
    };
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let a_to_b = async move {
        eof_is_end(tokio::io::copy(&mut ar, &mut bw).await)?;
        bw.shutdown().await
    };
    let b_to_a = async move {
        eof_is_end(tokio::io::copy(&mut br, &mut aw).await)?;
        aw.shutdown().await
    };
    let watchdog = idle_watchdog(&activity, idle);
    tokio::pin!(a_to_b, b_to_a, watchdog);
    let a_done = tokio::select! {
        r = &mut a_to_b => { r.map_err(|e| e.to_string())?; true }
        r = &mut b_to_a => { r.map_err(|e| e.to_string())?; false }
        _ = &mut watchdog => return Err("idle timeout".into()),
    };
    let rest = async {
        if a_done {
            b_to_a.as_mut().await
        } else {
            a_to_b.as_mut().await
        }
    };
    let linger = async {
        match linger {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = rest => r.map_err(|e| e.to_string()),
        _ = linger => Ok(()),
        _ = &mut watchdog => Err("idle timeout".into()),
    }
}

/// A TLS peer that closes without close_notify (most WebSocket clients do
/// after the close handshake) has ended its stream, not failed it.
fn eof_is_end(r: io::Result<u64>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
        _ => Ok(()),
    }
}

async fn idle_watchdog(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// What to do with one passthrough connection.
pub struct Job<'a> {
    pub backend: &'a Backend,
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
        backend: &'a Backend,
        out: &crate::proxy_protocol::Outbound<'_>,
        peeked: &[u8],
        route: &'a str,
        timeouts: &crate::config::Timeouts,
        splice: bool,
    ) -> Job<'a> {
        let mut first = crate::proxy_protocol::outbound_header(backend.proxy_protocol, out);
        let header_len = first.len();
        first.extend_from_slice(peeked);
        Job {
            backend,
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
pub async fn serve<C>(
    client: ClientSide<C>,
    job: Job<'_>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let name = &*job.backend.name;
    let started = Instant::now();
    let conn = match connect(job.backend, job.connect_timeout).await {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!(m::BACKEND_CONNECT_FAILURES, "backend" => job.backend.name.clone())
                .increment(1);
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
    let stats = {
        let _active = crate::metrics::GaugeGuard::new(
            metrics::gauge!(m::TUNNEL_ACTIVE, "backend" => job.backend.name.clone()),
        );
        match (client, conn) {
            (ClientSide::Tcp(c), BackendStream::Tcp(b)) if job.splice => {
                splice_sockets(c, b, &job, shutdown).await
            }
            (ClientSide::Tcp(c), BackendStream::Unix(b)) if job.splice => {
                splice_sockets(c, b, &job, shutdown).await
            }
            (ClientSide::Tcp(c), BackendStream::Tcp(b)) => pipe_streams(c, b, &job, shutdown).await,
            (ClientSide::Tcp(c), BackendStream::Unix(b)) => {
                pipe_streams(c, b, &job, shutdown).await
            }
            (ClientSide::Stream(c), BackendStream::Tcp(b)) => {
                pipe_streams(c, b, &job, shutdown).await
            }
            (ClientSide::Stream(c), BackendStream::Unix(b)) => {
                pipe_streams(c, b, &job, shutdown).await
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    metrics::histogram!(m::TUNNEL_DURATION, "backend" => job.backend.name.clone()).record(secs);
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

/// The start every tunnel shares: live byte counters, the PROXY header and
/// peeked bytes written to the backend, and the activity clock.
struct Opened {
    up: metrics::Counter,
    down: metrics::Counter,
    /// Client bytes already sent (the replayed first bytes).
    client_first: u64,
    activity: Arc<Activity>,
}

async fn open<B: AsyncWrite + Unpin>(
    backend: &mut B,
    job: &Job<'_>,
) -> Result<Opened, TunnelStats> {
    let up = metrics::counter!(m::TUNNEL_BYTES, "backend" => job.backend.name.clone(), "direction" => "upstream");
    let down = metrics::counter!(m::TUNNEL_BYTES, "backend" => job.backend.name.clone(), "direction" => "downstream");
    if let Err(e) = backend.write_all(&job.first).await {
        return Err(TunnelStats {
            up: 0,
            down: 0,
            cause: CloseCause::Error(format!("write to backend: {e}")),
        });
    }
    // The PROXY header is ours, not the client's: count only client bytes.
    let client_first = job.first.len().saturating_sub(job.header_len) as u64;
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
        Err(e) => CloseCause::Error(e.to_string()),
    }
}

/// The splice(2) path for socket-to-socket tunnels.
async fn splice_sockets<B>(
    client: TcpStream,
    mut backend: B,
    job: &Job<'_>,
    shutdown: impl std::future::Future<Output = ()>,
) -> TunnelStats
where
    B: crate::splice::Socket + AsyncWrite + Unpin,
{
    let o = match open(&mut backend, job).await {
        Ok(o) => o,
        Err(stats) => return stats,
    };
    let (mut up, mut down) = (o.client_first, 0u64);
    let copy = async {
        tokio::try_join!(
            crate::splice::one_way(&client, &backend, |n| {
                up += n;
                o.up.increment(n);
                o.activity.touch();
            }),
            crate::splice::one_way(&backend, &client, |n| {
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
        _ = shutdown => CloseCause::Shutdown,
    };
    TunnelStats { up, down, cause }
}

/// The user-space path: any client stream (decrypted TLS), or splice off.
async fn pipe_streams<C, B>(
    client: C,
    mut backend: B,
    job: &Job<'_>,
    shutdown: impl std::future::Future<Output = ()>,
) -> TunnelStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let o = match open(&mut backend, job).await {
        Ok(o) => o,
        Err(stats) => return stats,
    };
    let mut c = Metered {
        inner: client,
        counter: o.up,
        total: o.client_first,
        activity: o.activity.clone(),
    };
    let mut b = Metered {
        inner: backend,
        counter: o.down,
        total: 0,
        activity: o.activity.clone(),
    };
    let cause = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut b, COPY_BUF, COPY_BUF) => end_cause(r.map(|_| ())),
        _ = idle_watchdog(&o.activity, job.idle) => CloseCause::Idle,
        _ = shutdown => CloseCause::Shutdown,
    };
    TunnelStats {
        up: c.total,
        down: b.total,
        cause,
    }
}
