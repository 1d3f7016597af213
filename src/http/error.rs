//! Proxy errors and the one place where they become HTTP statuses.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::exchange::{Exchange, RequestProgress};
use crate::dial::DialError;

/// Everything that can stop a request, with whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // Client's fault.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("host {0:?} is not served on this connection")]
    MisdirectedHost(String),
    #[error("no location matches {0}")]
    NoLocation(String),
    #[error("request target longer than {0} bytes")]
    UriTooLong(usize),
    #[error("request body larger than the site's max_body ({0} bytes)")]
    BodyTooLarge(u64),
    #[error("WebSocket is disabled for this location; use plain HTTP")]
    WebSocketDisabled,
    /// `websocket = "auto"`: the upstream answered an upgrade with a 4xx.
    /// `status` is the upstream's answer, 0 when a remembered one.
    #[error("upstream {upstream} does not accept WebSocket here{}; use plain HTTP", upstream_status(*.status))]
    WebSocketUnsupported { upstream: String, status: u16 },
    // Upstream's fault.
    #[error("upstream {upstream} refused the connection: {detail}")]
    UpstreamRefused { upstream: String, detail: String },
    #[error("upstream {upstream} did not accept the connection in time: {detail}")]
    UpstreamTimeout { upstream: String, detail: String },
    #[error("upstream {upstream} closed the connection: {detail}")]
    UpstreamReset { upstream: String, detail: String },
    #[error("upstream {upstream} sent an invalid response: {detail}")]
    UpstreamProtocol { upstream: String, detail: String },
    // Ours.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

fn upstream_status(status: u16) -> String {
    if status == 0 {
        " (remembered refusal)".into()
    } else {
        format!(" (it answered {status})")
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::NoLocation(_) => StatusCode::NOT_FOUND,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // Codex and similar clients fall back to plain HTTP at once on
            // 426; 403/405 make them retry the WebSocket for seconds first.
            ProxyError::WebSocketDisabled | ProxyError::WebSocketUnsupported { .. } => {
                StatusCode::UPGRADE_REQUIRED
            }
            ProxyError::UpstreamRefused { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `reason` label of `portico_upstream_failures_total`, for upstream faults.
    pub fn upstream_reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::UpstreamRefused { .. } => Some("refused"),
            ProxyError::UpstreamTimeout { .. } => Some("timeout"),
            ProxyError::UpstreamReset { .. } => Some("reset"),
            ProxyError::UpstreamProtocol { .. } => Some("protocol"),
            _ => None,
        }
    }

    /// A plain one-line response naming the cause.
    pub fn response(&self) -> Response<ResponseBody> {
        let mut r = Response::new(ResponseBody::full(Bytes::from(format!("{self}\n"))));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self,
            ProxyError::WebSocketDisabled | ProxyError::WebSocketUnsupported { .. }
        ) {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// Answer with this error's one-line response, counted and logged as
    /// the outcome of `ex`'s request.
    pub fn answer(&self, ex: &mut Exchange) -> Response<ResponseBody> {
        let r = self.response();
        ex.failed(r.status().as_u16(), self.to_string());
        r
    }

    /// A failed connect outside the pool.
    pub fn from_connect(upstream: &str, cf: &DialError) -> ProxyError {
        let upstream = upstream.to_string();
        match cf {
            DialError::Timeout { .. } => ProxyError::UpstreamTimeout {
                upstream,
                detail: cf.to_string(),
            },
            DialError::Io { .. } => ProxyError::UpstreamRefused {
                upstream,
                detail: cf.to_string(),
            },
        }
    }

    /// Classify a client error from the upstream pool.
    pub fn from_client(
        upstream: &str,
        e: &(dyn std::error::Error + 'static),
        progress: &RequestProgress,
    ) -> ProxyError {
        if progress.cut() {
            if let Some(limit) = find::<super::body::TooLarge>(e) {
                return ProxyError::BodyTooLarge(limit.0);
            }
        }
        if let Some(cf) = find::<DialError>(e) {
            return ProxyError::from_connect(upstream, cf);
        }
        let detail = chain(e);
        let upstream = upstream.to_string();
        match find::<hyper::Error>(e) {
            Some(h) if h.is_parse() || h.is_parse_status() => {
                ProxyError::UpstreamProtocol { upstream, detail }
            }
            _ => ProxyError::UpstreamReset { upstream, detail },
        }
    }
}

/// The first error of type `T` in `e`'s source chain, `e` included.
pub fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// The innermost useful message, e.g. "connection reset by peer".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::NoLocation("/x".into()).status(), 404);
        assert_eq!(ProxyError::BodyTooLarge(1).status(), 413);
        assert_eq!(ProxyError::MisdirectedHost("a".into()).status(), 421);
        assert_eq!(ProxyError::WebSocketDisabled.status(), 426);
        let u = || "u".to_string();
        assert_eq!(
            ProxyError::UpstreamRefused {
                upstream: u(),
                detail: u()
            }
            .status(),
            502
        );
        assert_eq!(
            ProxyError::UpstreamTimeout {
                upstream: u(),
                detail: u()
            }
            .status(),
            504
        );
    }

    #[test]
    fn body_is_one_line() {
        let e = ProxyError::UpstreamRefused {
            upstream: "cpa".into(),
            detail: "connect to 127.0.0.1:1: Connection refused".into(),
        };
        assert_eq!(e.to_string().lines().count(), 1);
        assert!(e.to_string().contains("cpa"));
    }
}
