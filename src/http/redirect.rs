//! The plain-HTTP `redirect` route: every request on the connection gets a
//! 308 to the same host and path over https.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Answer every request on a plain-HTTP connection with a 308 to https,
/// until the client closes or `shutdown` (then finish the current answer).
pub async fn serve<I>(
    io: I,
    client: SocketAddr,
    request_header: Duration,
    shutdown: &CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let svc =
        service_fn(
            |req: Request<Incoming>| async move { Ok::<_, Infallible>(redirect_response(&req)) },
        );
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(request_header)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%client, error = %e, "redirect connection error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

fn redirect_response(req: &Request<Incoming>) -> Response<Full<bytes::Bytes>> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host.filter(|h| !h.is_empty() && !h.contains(['/', '\\', '@', ' '])) else {
        let mut r = Response::new(Full::from("bad request: missing Host header\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    // Drop the port of the plain listener: https is on its default port.
    let name = if host.starts_with('[') {
        host.split_inclusive(']')
            .next()
            .unwrap_or(&host)
            .to_string()
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            _ => host.clone(),
        }
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{name}{path}");
    let mut r = Response::new(Full::from(format!("moved to {location}\n")));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
