//! The request handler of terminated sites: Host check, location, CORS,
//! direct responses, and the streaming proxy to upstreams.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use super::body::{RequestBody, ResponseBody};
use super::error::ProxyError;
use super::exchange::{Exchange, RequestProgress, StreamKind};
use super::headers::{self, Forwarded};
use super::pool::Reuse;
use super::site::{Action, ConnContext, SiteRuntime};
use super::upstream::UpstreamClient;
use super::websocket;
use crate::config::{Cors, Site};
use crate::metrics as m;

/// Method label from a fixed set, so clients cannot add series.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Serve one request. Never fails: every problem becomes a response.
pub async fn handle(
    req: Request<Incoming>,
    site: Arc<SiteRuntime>,
    conn: Arc<ConnContext>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let method = method_label(req.method());
    let path = req.uri().path().to_string();
    let progress = Arc::new(RequestProgress::default());
    // The body waits in `progress` until forwarded, or until the response
    // has ended when it never is (see RequestProgress::park).
    let (parts, body) = req.into_parts();
    progress.park(body);
    let req = Request::from_parts(parts, ());
    let protocol = if req.version() == Version::HTTP_2 {
        "h2"
    } else {
        "http1"
    };

    let authority = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_string()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string),
    };
    // Every answered request holds the connection's in-flight mark.
    let exchange = |metrics: Arc<m::LocationMetrics>, path: String| {
        let mut ex = Exchange::new(
            metrics,
            method,
            path,
            protocol,
            conn.client,
            started,
            progress.clone(),
        );
        ex.in_flight = Some(conn.verdict.begin());
        ex
    };
    let unmatched = |err: ProxyError| {
        let mut ex = exchange(site.unmatched.clone(), path.clone());
        let resp = err.answer(&mut ex);
        site.finish(resp, ex)
    };
    if let Some(refusal) = conn.verdict.get() {
        return unmatched(ProxyError::BadRequest(refusal.message()));
    }
    // A request refused before its body was looked at: on HTTP/1.x read no
    // further requests from the connection that sent it (as nginx does), so
    // nothing pipelined behind a malformed request reaches an upstream.
    let refuse = |err: ProxyError| {
        let mut resp = unmatched(err);
        if req.version() < Version::HTTP_2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    };
    if let Some(err) = check_request(&req, site.max_uri) {
        return refuse(err);
    }
    let Some(authority) = authority else {
        return refuse(ProxyError::BadRequest("missing Host header"));
    };
    if !site.config.any_name {
        let host = headers::host_name(&authority);
        if !site.admits_host(&host) {
            return unmatched(ProxyError::MisdirectedHost(host));
        }
    }
    let Some(idx) = site.router.find(&path) else {
        return unmatched(ProxyError::NoLocation(path.clone()));
    };
    let loc = &site.locations[idx];
    // The path moves into the exchange record (one copy per request).
    let mut ex = exchange(loc.metrics.clone(), path);

    let origin = req.headers().get(header::ORIGIN).cloned();
    let cors = site.config.cors.as_ref();
    if let (Some(cors), Some(origin)) = (cors, origin.as_ref()) {
        if req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            let mut resp = Response::new(ResponseBody::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            if cors_allows(cors, origin) {
                add_cors_headers(&mut resp, cors, origin);
                for (k, v) in &site.preflight {
                    resp.headers_mut().insert(k.clone(), v.clone());
                }
            }
            ex.respond(204, StreamKind::Http);
            return site.finish(resp, ex);
        }
    }

    let mut resp = match &loc.action {
        Action::Respond {
            status,
            body,
            content_type,
        } => {
            let mut r = Response::new(ResponseBody::full(body.clone()));
            *r.status_mut() = *status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
            ex.respond(r.status().as_u16(), StreamKind::Http);
            r
        }
        Action::Upstream(client) => {
            let client = client.clone();
            if websocket::is_upgrade(&req) {
                if !loc.websocket.forwards() || loc.ws_refusals.active() {
                    // Off, or (auto) the upstream refused recently: 426 at once.
                    let err = if loc.websocket.forwards() {
                        ProxyError::WebSocketUnsupported {
                            upstream: client.config.name.clone(),
                            status: 0,
                        }
                    } else {
                        ProxyError::WebSocketDisabled
                    };
                    let mut r = err.answer(&mut ex);
                    super::ws_auto::mark_upgrade_required(&mut r, req.version() == Version::HTTP_2);
                    return site.finish(r, ex);
                }
                // Boxed: rare next to plain requests, and its state is large.
                return Box::pin(websocket::proxy(
                    req, client, &authority, &conn, ex, &site, loc,
                ))
                .await;
            } else {
                let h2 = req.version() == Version::HTTP_2;
                let forwarded = match forward(
                    req,
                    &client,
                    &site.config,
                    &loc.metrics,
                    &authority,
                    &conn.forwarded,
                    progress,
                )
                .await
                {
                    Ok((r, reuse)) => {
                        let prime = h2 && is_small(r.body());
                        let mut r = r.map(|b| {
                            ResponseBody::from_upstream(b, reuse, client.body_reset_counter())
                        });
                        // h2: a small body's data leaves with its head.
                        if prime {
                            r.body_mut().prime().await.map(|()| r).map_err(|e| {
                                ProxyError::UpstreamReset {
                                    upstream: client.config.name.clone(),
                                    detail: format!("{e} (nothing of the body was sent yet)"),
                                }
                            })
                        } else {
                            Ok(r)
                        }
                    }
                    Err(err) => Err(err),
                };
                match forwarded {
                    Ok(r) => {
                        let kind = if is_event_stream(r.headers()) {
                            StreamKind::Sse
                        } else {
                            StreamKind::Http
                        };
                        ex.respond(r.status().as_u16(), kind);
                        r
                    }
                    Err(err) => {
                        client.count_failure(&err);
                        tracing::warn!(site = %site.name, location = %loc.name, upstream = %client.config.name, error = %err, "upstream request failed");
                        err.answer(&mut ex)
                    }
                }
            }
        }
    };
    if let (Some(cors), Some(origin)) = (cors, origin.as_ref()) {
        if cors_allows(cors, origin) {
            add_cors_headers(&mut resp, cors, origin);
        }
    }
    site.finish(resp, ex)
}

/// Requests refused before routing: too long, ambiguous framing or Host.
fn check_request<B>(req: &Request<B>, max_uri: usize) -> Option<ProxyError> {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > max_uri {
        return Some(ProxyError::UriTooLong(max_uri));
    }
    // RFC 9113 sections 8.2.1 and 8.3.1: hyper does not check these.
    if let Some(problem) = super::conformance::h2_request_problem(req) {
        return Some(ProxyError::BadRequest(problem));
    }
    let h = req.headers();
    if h.get_all(header::HOST).iter().count() > 1 {
        return Some(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(host) = h.get(header::HOST) {
        let valid = host
            .to_str()
            .ok()
            .and_then(|s| s.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| !a.as_str().contains('@'));
        if !valid {
            return Some(ProxyError::BadRequest("invalid Host header"));
        }
    }
    // HTTP/1.x framing (Content-Length with Transfer-Encoding, repeated or
    // bad Content-Length) is refused by the framing guard before hyper parses
    // the head, and h2 forbids Transfer-Encoding; repeated Content-Length
    // values on h2 are refused here.
    if h.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        return Some(ProxyError::BadRequest(
            "more than one Content-Length header",
        ));
    }
    None
}

/// Bodies up to this size are read before their head is sent on h2 (see
/// `ResponseBody::prime`): one TLS record's worth.
const PRIME_MAX: u64 = 16 << 10;

/// A body with a declared length of 1 byte to [`PRIME_MAX`].
fn is_small(b: &Incoming) -> bool {
    use http_body::Body as _;
    b.size_hint()
        .exact()
        .is_some_and(|n| (1..=PRIME_MAX).contains(&n))
}

fn is_event_stream(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start().as_bytes();
            v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
        })
}

fn cors_allows(cors: &Cors, origin: &HeaderValue) -> bool {
    let Ok(o) = origin.to_str() else { return false };
    cors.origins
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
}

fn add_cors_headers<B>(resp: &mut Response<B>, cors: &Cors, origin: &HeaderValue) {
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if cors.credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// Idempotent methods may be replayed when nothing of the body was sent.
fn replayable(req: &Request<()>, progress: &RequestProgress) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::PUT
    ) && progress.parked_is_end_stream()
}

/// Proxy a (non-upgrade) request and return the upstream's response head
/// with its body still streaming.
async fn forward(
    req: Request<()>,
    client: &UpstreamClient,
    site: &Site,
    location: &crate::metrics::LocationMetrics,
    authority: &str,
    client_addr: &headers::ClientAddr,
    progress: Arc<RequestProgress>,
) -> Result<(Response<Incoming>, Option<Reuse<RequestBody>>), ProxyError> {
    if let Some(limit) = site.max_body {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge(limit));
        }
    }
    let replay = replayable(&req, &progress);
    let (parts, ()) = req.into_parts();
    let body = progress.take_parked();
    let h2c = client.wants_absolute_uri();
    // HTTP/1.1 upstreams get the origin form (the client's path and query
    // as they are); h2c takes scheme and authority from an absolute URI,
    // and its authority is the client's.
    let uri = if h2c {
        authority
            .parse()
            .ok()
            .and_then(|a| upstream_uri(a, parts.uri.path_and_query()))
    } else {
        origin_form(parts.uri.path_and_query())
    }
    .ok_or(ProxyError::BadRequest("request target cannot be forwarded"))?;
    let chunked = parts.version == Version::HTTP_11
        && parts
            .headers
            .get(header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let mut headers = parts.headers;
    headers::to_upstream(
        &mut headers,
        &Forwarded {
            client: client_addr,
            host: authority,
        },
    );
    if h2c {
        headers.remove(header::HOST);
    }
    let counter = location.body_request.clone();
    let build = |method: Method, uri: Uri, headers: http::HeaderMap, body: RequestBody| {
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = uri;
        *r.version_mut() = if h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *r.headers_mut() = headers;
        r
    };
    let mut body = match body {
        Some(b) => RequestBody::new(b, site.max_body, progress.clone(), counter),
        None => RequestBody::empty(),
    };
    if chunked {
        if let Err(e) = body.prime().await {
            if progress.cut() {
                return Err(ProxyError::BodyTooLarge(site.max_body.unwrap_or(0)));
            }
            tracing::debug!(error = %e, "malformed chunked request body");
            return Err(ProxyError::BadRequest("malformed chunked request body"));
        }
    }
    // Only a replayable request keeps a copy of its head for the retry.
    let retry = replay.then(|| (parts.method.clone(), uri.clone(), headers.clone()));
    match (
        client.send(build(parts.method, uri, headers, body)).await,
        retry,
    ) {
        (Ok((mut resp, reuse)), _) => {
            headers::strip_hop_by_hop(resp.headers_mut());
            Ok((resp, reuse))
        }
        (Err(e), Some((method, uri, headers))) if e.is_stale_connection() => {
            tracing::debug!(error = %e, "pooled connection closed under us; retrying once");
            let (mut resp, reuse) = client
                .send(build(method, uri, headers, RequestBody::empty()))
                .await
                .map_err(|e| ProxyError::from_client(&client.config.name, &e, &progress))?;
            headers::strip_hop_by_hop(resp.headers_mut());
            Ok((resp, reuse))
        }
        (Err(e), _) => Err(ProxyError::from_client(&client.config.name, &e, &progress)),
    }
}

/// The origin form of a request target: its path and query (`/` when the
/// request had none; `*` stays `*`).
fn origin_form(path: Option<&http::uri::PathAndQuery>) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        path.cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

/// `http://{authority}{path_and_query}` (`/` when the request had none).
fn upstream_uri(
    authority: http::uri::Authority,
    path: Option<&http::uri::PathAndQuery>,
) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.path_and_query = Some(match path {
        Some(p) if p.as_str().starts_with('/') => p.clone(),
        // Anything else (`*`, absolute forms) is checked as before: as text.
        Some(p) => return format!("http://{authority}{p}").parse().ok(),
        None => http::uri::PathAndQuery::from_static("/"),
    });
    parts.authority = Some(authority);
    Uri::from_parts(parts).ok()
}
