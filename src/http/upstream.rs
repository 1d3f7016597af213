//! Upstream HTTP clients: one keep-alive pool per `[upstream.*]`, over TCP
//! or a Unix socket, HTTP/1.1 (portico's own pool, `pool.rs`) or h2c.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::RequestBody;
use super::error::{find, ProxyError};
use super::pool::{Pool, Reuse};
use crate::config::{Address, Upstream, UpstreamProtocol};
use crate::dial::{self, DialError};
use crate::metrics::GaugeGuard;

/// Connects every request of one upstream to its configured address (TCP
/// or Unix); the request URI only keys the pool.
#[derive(Clone)]
pub struct Connector {
    addr: Arc<Address>,
    timeout: Duration,
    /// `portico_upstream_connections`: the pool's open connections.
    open: metrics::Gauge,
}

/// A pooled upstream connection, counted in `portico_upstream_connections`
/// for as long as the pool keeps it (hyper-util's pool exposes no count).
pub struct PooledIo {
    io: TokioIo<dial::Stream>,
    _open: GaugeGuard,
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for PooledIo {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.inner().connected()
    }
}

impl Connector {
    /// A fresh connection outside the pool.
    pub async fn connect(&self) -> Result<TokioIo<dial::Stream>, DialError> {
        dial::connect(&self.addr, self.timeout)
            .await
            .map(TokioIo::new)
    }
}

impl hyper_util::client::legacy::connect::Connection for dial::Stream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        match self {
            dial::Stream::Tcp(s) => s.connected(),
            dial::Stream::Unix(s) => s.connected(),
        }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<PooledIo, DialError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = PooledIo;
    type Error = DialError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let c = self.clone();
        Box::pin(async move {
            let io = c.connect().await?;
            Ok(PooledIo {
                io,
                _open: GaugeGuard::new(c.open),
            })
        })
    }
}

/// How one upstream's requests travel: HTTP/1.1 through portico's own
/// pool of connections, h2c through hyper-util's client (one multiplexed
/// connection, which its pool keeps and reconnects).
enum Transport {
    H1(Pool<RequestBody>),
    H2c(Box<Client<Connector, RequestBody>>),
}

/// Why an upstream request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("upstream connection")]
    Connect(#[source] DialError),
    #[error("upstream HTTP/1.1 connection")]
    H1(#[source] hyper::Error),
    #[error(transparent)]
    H2c(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// A reused connection the upstream had closed after reading the
    /// request: the request never got an answer, and a new connection may.
    pub fn is_stale_connection(&self) -> bool {
        let h = match self {
            SendError::Connect(_) => return false,
            SendError::H1(h) => Some(h),
            SendError::H2c(e) if e.is_connect() => return false,
            SendError::H2c(e) => std::error::Error::source(e).and_then(find::<hyper::Error>),
        };
        h.is_some_and(|h| h.is_incomplete_message() || h.is_canceled() || h.is_closed())
    }
}

/// The client for one upstream.
pub struct UpstreamClient {
    pub config: Arc<Upstream>,
    transport: Transport,
    connector: Connector,
    /// `portico_upstream_failures_total{reason="reset"}`, registered with the
    /// first streamed response and then shared by all of them.
    body_reset: OnceLock<metrics::Counter>,
}

/// Idle upstream connections are closed after this. Shorter than the usual
/// upstream keep-alive (Go: 90 s, Node: 5 s is the outlier) so we rarely
/// reuse a socket being closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

impl UpstreamClient {
    pub fn new(config: Arc<Upstream>, connect_timeout: Duration) -> UpstreamClient {
        let connector = Connector {
            addr: Arc::new(config.addr.clone()),
            timeout: connect_timeout,
            open: metrics::gauge!(crate::metrics::UPSTREAM_CONNECTIONS,
                "upstream" => config.name.clone()),
        };
        let transport = if config.protocol == UpstreamProtocol::H2c {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_max_idle_per_host(config.keepalive)
                .pool_idle_timeout(IDLE_TIMEOUT)
                .retry_canceled_requests(true)
                .set_host(false)
                .http2_only(true)
                .http2_initial_stream_window_size(1 << 20)
                .http2_initial_connection_window_size(4 << 20)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_timeout(Duration::from_secs(10));
            Transport::H2c(Box::new(b.build(connector.clone())))
        } else {
            Transport::H1(Pool::new(config.keepalive, IDLE_TIMEOUT))
        };
        UpstreamClient {
            config,
            transport,
            connector,
            body_reset: OnceLock::new(),
        }
    }

    /// A fresh connection outside the pool (upgraded streams never go back).
    pub async fn connect_raw(&self) -> Result<TokioIo<dial::Stream>, DialError> {
        self.connector.connect().await
    }

    /// Count a failed request in `portico_upstream_failures_total`, when the
    /// failure is the upstream's.
    pub fn count_failure(&self, err: &ProxyError) {
        if let Some(reason) = err.upstream_reason() {
            metrics::counter!(crate::metrics::UPSTREAM_FAILURES,
                "upstream" => self.config.name.clone(), "reason" => reason)
            .increment(1);
        }
    }

    /// The counter for an upstream body that fails while it streams.
    pub fn body_reset_counter(&self) -> metrics::Counter {
        self.body_reset
            .get_or_init(|| {
                metrics::counter!(crate::metrics::UPSTREAM_FAILURES,
                    "upstream" => self.config.name.clone(), "reason" => "reset")
            })
            .clone()
    }

    /// Whether requests need an absolute URI (h2c: it becomes `:scheme` and
    /// `:authority`); HTTP/1.1 requests carry the origin form and `Host`.
    pub fn wants_absolute_uri(&self) -> bool {
        matches!(self.transport, Transport::H2c(_))
    }

    /// Send a request and return the response head; its body streams on.
    /// An HTTP/1.1 connection comes with a ticket that hands it back to the
    /// pool when the body has ended.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Reuse<RequestBody>>), SendError> {
        let pool = match &self.transport {
            Transport::H2c(client) => return Ok((client.request(req).await?, None)),
            Transport::H1(pool) => pool,
        };
        let mut req = req;
        loop {
            let (mut tx, reused) = match pool.checkout() {
                Some(tx) => (tx, true),
                None => (self.handshake().await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let reuse = pool.reuse(tx);
                    if resp.body().is_end_stream() {
                        // Nothing will poll the body: the exchange is over.
                        reuse.give_back();
                        return Ok((resp, None));
                    }
                    return Ok((resp, Some(reuse)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection had closed. Like
                    // hyper-util's `retry_canceled_requests`, try another.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::H1(e.into_error())),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection; hyper drives it in a task of its own
    /// until the pool or the last exchange lets go of it.
    async fn handshake(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let io = self.connector.connect().await.map_err(SendError::Connect)?;
        let io = PooledIo {
            io,
            _open: GaugeGuard::new(self.connector.open.clone()),
        };
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(SendError::H1)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }
}
