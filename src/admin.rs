//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//! It is a separate socket so metrics never show on the public ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Set once every listener is bound and the config is loaded.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Serve the admin endpoints on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    crate::listener::accept_failed("admin", &e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let handle = handle.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let handle = handle.clone();
                let ready = ready.clone();
                async move {
                    let resp = match req.uri().path() {
                        "/metrics" => {
                            handle.run_upkeep();
                            text(
                                StatusCode::OK,
                                "text/plain; version=0.0.4; charset=utf-8",
                                handle.render(),
                            )
                        }
                        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
                        "/readyz" if ready.get() => text(StatusCode::OK, "text/plain", "ready\n"),
                        "/readyz" => {
                            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                        }
                        _ => text(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found: try /metrics, /healthz or /readyz\n",
                        ),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Bind the admin socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::listener::bind(addr)
}
