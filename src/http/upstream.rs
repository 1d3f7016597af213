//! Upstream HTTP clients: one keep-alive pool per `[upstream.*]`, over TCP
//! or a Unix socket, HTTP/1.1 or h2c.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};

use super::body::RequestBody;
use crate::config::{Address, Upstream, UpstreamProtocol};

/// Why connecting to an upstream failed: decides 502 vs 504.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("connect to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// Connects every request of one upstream to its configured address; the
/// request URI only keys the pool.
#[derive(Clone)]
pub struct TcpConnector {
    addr: Arc<str>,
    timeout: Duration,
}

#[derive(Clone)]
pub struct UnixConnector {
    path: Arc<PathBuf>,
    timeout: Duration,
}

type ConnectFuture<T> = Pin<Box<dyn Future<Output = Result<T, ConnectFailure>> + Send>>;

impl tower_service::Service<Uri> for TcpConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectFailure;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.addr.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, TcpStream::connect(&*addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    Ok(TokioIo::new(s))
                }
                Ok(Err(source)) => Err(ConnectFailure::Io {
                    addr: addr.to_string(),
                    source,
                }),
                Err(_) => Err(ConnectFailure::Timeout {
                    addr: addr.to_string(),
                    timeout,
                }),
            }
        })
    }
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = ConnectFailure;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.path.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, UnixStream::connect(&*path)).await {
                Ok(Ok(s)) => Ok(TokioIo::new(s)),
                Ok(Err(source)) => Err(ConnectFailure::Io {
                    addr: format!("unix:{}", path.display()),
                    source,
                }),
                Err(_) => Err(ConnectFailure::Timeout {
                    addr: format!("unix:{}", path.display()),
                    timeout,
                }),
            }
        })
    }
}

/// A raw connection to an upstream (for upgrades), TCP or Unix.
pub enum RawConn {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl hyper::rt::Read for RawConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawConn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            RawConn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for RawConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RawConn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            RawConn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawConn::Tcp(s) => Pin::new(s).poll_flush(cx),
            RawConn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawConn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            RawConn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

enum Pool {
    Tcp(Client<TcpConnector, RequestBody>),
    Unix(Client<UnixConnector, RequestBody>),
}

/// How to dial the upstream, for the pool and for upgraded streams.
#[derive(Clone)]
enum Connector {
    Tcp(TcpConnector),
    Unix(UnixConnector),
}

/// The client for one upstream.
pub struct UpstreamClient {
    pub config: Arc<Upstream>,
    pool: Pool,
    connector: Connector,
    /// `portico_upstream_failures_total{reason="reset"}`, registered with the
    /// first streamed response (as before) and then shared by all of them.
    body_reset: OnceLock<metrics::Counter>,
}

impl UpstreamClient {
    pub fn new(config: Arc<Upstream>, connect_timeout: Duration) -> UpstreamClient {
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(config.keepalive)
            // Shorter than the usual upstream keep-alive (Go: 90 s, Node: 5 s
            // is the outlier) so we rarely reuse a socket being closed.
            .pool_idle_timeout(Duration::from_secs(4))
            .retry_canceled_requests(true)
            .set_host(false);
        if config.protocol == UpstreamProtocol::H2c {
            b.http2_only(true)
                .http2_initial_stream_window_size(1 << 20)
                .http2_initial_connection_window_size(4 << 20)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_timeout(Duration::from_secs(10));
        }
        let connector = match &config.addr {
            Address::Tcp(a) => Connector::Tcp(TcpConnector {
                addr: Arc::from(a.as_str()),
                timeout: connect_timeout,
            }),
            Address::Unix(p) => Connector::Unix(UnixConnector {
                path: Arc::new(p.clone()),
                timeout: connect_timeout,
            }),
        };
        let pool = match &connector {
            Connector::Tcp(c) => Pool::Tcp(b.build(c.clone())),
            Connector::Unix(c) => Pool::Unix(b.build(c.clone())),
        };
        UpstreamClient {
            config,
            pool,
            connector,
            body_reset: OnceLock::new(),
        }
    }

    /// A fresh connection outside the pool (upgraded streams never go back).
    pub async fn connect_raw(&self) -> Result<RawConn, ConnectFailure> {
        use tower_service::Service as _;
        match self.connector.clone() {
            Connector::Tcp(mut c) => c.call(Uri::default()).await.map(RawConn::Tcp),
            Connector::Unix(mut c) => c.call(Uri::default()).await.map(RawConn::Unix),
        }
    }

    /// Count a failed request in `portico_upstream_failures_total`, when the
    /// failure is the upstream's.
    pub fn count_failure(&self, err: &super::error::ProxyError) {
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

    /// Send a request whose URI is absolute (`http://authority/path`).
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match &self.pool {
            Pool::Tcp(c) => c.request(req).await,
            Pool::Unix(c) => c.request(req).await,
        }
    }
}
