//! WebSocket through portico: HTTP/1.1 Upgrade, and h2 extended CONNECT
//! (RFC 8441) bridged to an HTTP/1.1 Upgrade towards the upstream. After the
//! handshake both sides are joined byte for byte; messages are counted by
//! following frame headers in the copy loop, never by decoding payloads.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::ResponseBody;
use super::error::ProxyError;
use super::exchange::{Exchange, StreamKind, WebSocketSession};
use super::headers::{self, Forwarded};
use super::site::{ConnContext, LocationRuntime, SiteRuntime};
use super::upstream::UpstreamClient;
use super::ws_auto::{self, Direction, TurnClock};
use crate::config::WebSocketMode;

/// How long the other side of a WebSocket may stay open after one side
/// closed its connection (after the close handshake, normally).
const WEBSOCKET_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Is this a WebSocket (or other) upgrade request, in either protocol?
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        return req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some();
    }
    let conn_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    conn_upgrade && req.headers().contains_key(header::UPGRADE)
}

/// A fresh `Sec-WebSocket-Key` for bridged h2 requests: 16 bytes from the
/// crypto provider's secure random, base64 (a nonce; RFC 6455 §4.1).
fn new_key() -> Result<HeaderValue, ProxyError> {
    let mut bytes = [0u8; 16];
    crate::tls::secure_random(&mut bytes)
        .map_err(|_| ProxyError::Internal("no secure random for the WebSocket key"))?;
    let key = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&key).map_err(|_| ProxyError::Internal("WebSocket key"))
}

/// Proxy an upgrade request; returns the response for the client.
pub async fn proxy(
    mut req: Request<()>,
    client: Arc<UpstreamClient>,
    authority: &str,
    conn_ctx: &ConnContext,
    mut ex: Exchange,
    site: &SiteRuntime,
    loc: &LocationRuntime,
) -> Response<ResponseBody> {
    let h2 = req.version() == Version::HTTP_2;
    let protocol_name = if h2 {
        req.extensions()
            .get::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "websocket".into())
    } else {
        req.headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("websocket")
            .to_string()
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let fail = |ex: Exchange, err: ProxyError| {
        client.count_failure(&err);
        tracing::warn!(upstream = %client.config.name, error = %err, "WebSocket upstream failed");
        let mut ex = ex;
        let r = err.answer(&mut ex);
        site.finish(r, ex)
    };
    let reset = |e: hyper::Error| ProxyError::UpstreamReset {
        upstream: client.config.name.clone(),
        detail: e.to_string(),
    };

    // A dedicated HTTP/1.1 connection: upgraded sockets never return to a pool.
    let io = match client.connect_raw().await {
        Ok(io) => io,
        Err(e) => return fail(ex, ProxyError::from_connect(&client.config.name, &e)),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(io)
            .await
        {
            Ok(x) => x,
            Err(e) => return fail(ex, reset(e)),
        };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });

    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers = req.headers().clone();
    headers::to_upstream(
        &mut headers,
        &Forwarded {
            client: &conn_ctx.forwarded,
            host: authority,
        },
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&protocol_name) {
        headers.insert(header::UPGRADE, v);
    }
    if h2 && !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        match new_key() {
            Ok(v) => {
                headers.insert(header::SEC_WEBSOCKET_KEY, v);
            }
            Err(e) => return fail(ex, e),
        }
    }
    if !headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    let mut up_req = Request::new(http_body_util::Empty::new());
    *up_req.method_mut() = Method::GET;
    *up_req.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => {
            return fail(
                ex,
                ProxyError::BadRequest("request target cannot be forwarded"),
            )
        }
    };
    *up_req.headers_mut() = headers;

    let mut up_resp = match sender.send_request(up_req).await {
        Ok(r) => r,
        Err(e) => return fail(ex, reset(e)),
    };
    if up_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        if let WebSocketMode::Auto { recheck } = loc.websocket {
            if ws_auto::is_refusal(up_resp.status()) {
                // A relay without WebSocket: 426 makes the client use plain
                // HTTP at once; remember it so the next ones need no trip.
                loc.ws_refusals.remember(recheck);
                let status = up_resp.status().as_u16();
                tracing::info!(
                    site = %site.name, location = %loc.name, upstream = %client.config.name, status,
                    "upstream refused a WebSocket upgrade; answering 426 to upgrades for {}",
                    humantime::format_duration(recheck)
                );
                // The upstream's body is dropped with its connection.
                drop(up_resp);
                let err = ProxyError::WebSocketUnsupported {
                    upstream: client.config.name.clone(),
                    status,
                };
                let mut r = err.answer(&mut ex);
                ws_auto::mark_upgrade_required(&mut r, h2);
                return site.finish(r, ex);
            }
        }
        if h2 && up_resp.status().is_success() {
            // RFC 8441 §5: on h2 a 2xx means "tunnel open", so a success
            // status that refuses the upgrade cannot be relayed as is (hyper
            // would reset the stream with INTERNAL_ERROR).
            return fail(
                ex,
                ProxyError::UpstreamProtocol {
                    upstream: client.config.name.clone(),
                    detail: format!(
                        "answered the WebSocket upgrade with {} instead of 101",
                        up_resp.status()
                    ),
                },
            );
        }
        // A refused upgrade is relayed as is, body included.
        let mut resp = up_resp.map(ResponseBody::upstream);
        headers::strip_hop_by_hop(resp.headers_mut());
        ex.respond(resp.status().as_u16(), StreamKind::Http);
        return site.finish(resp, ex);
    }
    let upstream_upgrade = hyper::upgrade::on(&mut up_resp);
    loc.ws_refusals.clear();

    let mut resp = Response::new(ResponseBody::empty());
    let mut out_headers = up_resp.headers().clone();
    if h2 {
        // RFC 8441 §5: the h2 side gets 200; connection-specific headers and
        // the HTTP/1.1 handshake's accept token have no meaning there.
        headers::strip_hop_by_hop(&mut out_headers);
        out_headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        *resp.status_mut() = StatusCode::OK;
    } else {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    *resp.headers_mut() = out_headers;
    site.add_headers(resp.headers_mut());
    // The h2 client got 200 (RFC 8441), the HTTP/1.1 client 101.
    ex.respond(if h2 { 200 } else { 101 }, StreamKind::WebSocket);
    let idle = site.idle;
    // Once one side of a WebSocket has closed, nothing the other still
    // sends can be delivered: give it a moment to close too, not `idle`.
    // Other upgrades keep TCP half-close semantics.
    let linger = protocol_name
        .eq_ignore_ascii_case("websocket")
        .then_some(WEBSOCKET_LINGER);
    let hard_stop = conn_ctx.life.hard_stop.clone();
    let slot = conn_ctx.slot.clone();
    conn_ctx.life.tasks.spawn(async move {
        // The client's socket is open until this task ends, whatever
        // happened to the HTTP connection that carried the handshake.
        let _slot = slot;
        let (c, u) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(x) => x,
            Err(e) => {
                ex.error = Some(format!("upgrade: {e}"));
                drop(ex);
                return;
            }
        };
        let to_up = ex.metrics.ws_to_upstream.clone();
        let to_client = ex.metrics.ws_to_client.clone();
        let clock = Arc::new(TurnClock::new(ex.metrics.ws_response.clone()));
        let mut c = Framed::new(TokioIo::new(c), to_up, ex.metrics.body_request.clone())
            .with_clock(clock.clone(), Direction::ClientToUpstream);
        let mut u = Framed::new(TokioIo::new(u), to_client, ex.metrics.body_response.clone())
            .with_clock(clock.clone(), Direction::UpstreamToClient);
        let result = tokio::select! {
            r = crate::io::join_with_idle(&mut c, &mut u, idle, linger) => r.map_err(|e| e.to_string()),
            _ = hard_stop.cancelled() => Err("shutdown".to_string()),
        };
        ex.response_bytes = u.bytes;
        // The client's frames are this exchange's request bytes.
        ex.request
            .bytes
            .fetch_add(c.bytes, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = result {
            ex.error = Some(e);
        }
        ex.websocket = Some(WebSocketSession {
            messages_in: c.tracker.messages,
            messages_out: u.tracker.messages,
            turns: clock.summary(),
        });
        // Dropping the exchange records the stream's duration and logs it.
        drop(ex);
    });
    resp
}

/// Follows WebSocket frame headers in a byte stream to count messages,
/// whatever the read boundaries (a header may be split across reads).
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    /// Header bytes collected so far (at most 14).
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    /// Completed data messages.
    pub messages: u64,
    /// Data messages whose first frame header has passed.
    pub started: u64,
    /// Data messages whose last frame has fully passed (payload included).
    pub finished: u64,
    /// The frame being skipped ends a data message.
    ends_message: bool,
}

impl FrameTracker {
    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let masked = self.head[1] & 0x80 != 0;
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if masked { 4 } else { 0 }
    }

    /// The current frame's payload has passed.
    fn end_frame(&mut self) {
        if std::mem::take(&mut self.ends_message) {
            self.finished += 1;
        }
    }

    /// Feed bytes; returns messages completed within them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let before = self.messages;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(bytes.len() as u64)) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                if self.skip == 0 {
                    self.end_frame();
                }
                continue;
            }
            let need = self.header_len();
            let take = (need - self.have).min(bytes.len());
            self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have < 2 || self.have < self.header_len() {
                continue;
            }
            let fin = self.head[0] & 0x80 != 0;
            let opcode = self.head[0] & 0x0f;
            let len = match self.head[1] & 0x7f {
                126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
                127 => u64::from_be_bytes([
                    self.head[2],
                    self.head[3],
                    self.head[4],
                    self.head[5],
                    self.head[6],
                    self.head[7],
                    self.head[8],
                    self.head[9],
                ]),
                n => n as u64,
            };
            // Control frames (close, ping, pong) are not messages; a data
            // message ends with the frame that has FIN set.
            if fin && opcode < 0x8 {
                self.messages += 1;
            }
            // Text or binary (not continuation) opens a data message.
            if opcode == 0x1 || opcode == 0x2 {
                self.started += 1;
            }
            self.ends_message = fin && opcode < 0x8;
            self.skip = len;
            self.have = 0;
            if len == 0 {
                self.end_frame();
            }
            continue;
        }
        self.messages - before
    }
}

pin_project_lite::pin_project! {
    /// Counts messages read from `inner` as they pass.
    pub struct Framed<S> {
        #[pin]
        inner: S,
        pub tracker: FrameTracker,
        counter: metrics::Counter,
        bytes_counter: metrics::Counter,
        pub bytes: u64,
        clock: Option<(std::sync::Arc<super::ws_auto::TurnClock>, super::ws_auto::Direction)>,
    }
}

impl<S> Framed<S> {
    /// `counter` counts messages; `bytes_counter` the raw frame bytes
    /// (`portico_http_body_bytes_total`, so WebSocket traffic shows as throughput).
    pub fn new(inner: S, counter: metrics::Counter, bytes_counter: metrics::Counter) -> Self {
        Framed {
            inner,
            tracker: FrameTracker::default(),
            counter,
            bytes_counter,
            bytes: 0,
            clock: None,
        }
    }

    /// Time turns on this direction with `clock` (both directions share it).
    pub fn with_clock(
        mut self,
        clock: std::sync::Arc<super::ws_auto::TurnClock>,
        direction: super::ws_auto::Direction,
    ) -> Self {
        self.clock = Some((clock, direction));
        self
    }
}

impl<S: AsyncRead> AsyncRead for Framed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        crate::io::poll_read_seen(this.inner, cx, buf, |new| {
            *this.bytes += new.len() as u64;
            this.bytes_counter.increment(new.len() as u64);
            let (started, finished) = (this.tracker.started, this.tracker.finished);
            let n = this.tracker.feed(new);
            if n > 0 {
                this.counter.increment(n);
            }
            if let Some((clock, direction)) = this.clock.as_ref() {
                use super::ws_auto::Direction;
                match direction {
                    Direction::ClientToUpstream if this.tracker.finished > finished => {
                        clock.client_message()
                    }
                    Direction::UpstreamToClient if this.tracker.started > started => {
                        clock.upstream_message()
                    }
                    _ => {}
                }
            }
        })
    }
}

impl<S: AsyncWrite> AsyncWrite for Framed<S> {
    crate::io::forward_async_write!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_16_random_bytes() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.as_bytes())
            .unwrap();
        assert_eq!(raw.len(), 16);
    }

    fn frame(fin: bool, opcode: u8, masked: bool, len: usize) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len <= 0xffff {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x7e, len));
        f
    }

    fn stream() -> (Vec<u8>, u64) {
        let mut s = Vec::new();
        s.extend(frame(true, 1, true, 5)); // text: 1
        s.extend(frame(true, 9, true, 0)); // ping: 0
        s.extend(frame(false, 2, true, 200)); // binary start
        s.extend(frame(true, 10, true, 3)); // pong inside a fragmented message
        s.extend(frame(false, 0, true, 70000)); // continuation, 64-bit length
        s.extend(frame(true, 0, true, 1)); // final continuation: 2
        s.extend(frame(true, 2, false, 126)); // unmasked binary, 16-bit length: 3
        s.extend(frame(true, 8, false, 2)); // close: not a message
        (s, 3)
    }

    #[test]
    fn counts_messages_not_control_frames() {
        let (s, want) = stream();
        let mut t = FrameTracker::default();
        assert_eq!(t.feed(&s), want);
    }

    #[test]
    fn split_at_every_offset() {
        let (s, want) = stream();
        for cut in 0..=s.len() {
            let mut t = FrameTracker::default();
            assert_eq!(t.feed(&s[..cut]) + t.feed(&s[cut..]), want, "cut at {cut}");
        }
    }

    #[test]
    fn starts_and_ends_of_data_messages() {
        let (s, _) = stream();
        for cut in 0..=s.len() {
            let mut t = FrameTracker::default();
            t.feed(&s[..cut]);
            t.feed(&s[cut..]);
            // text, binary (fragmented), unmasked binary.
            assert_eq!((t.started, t.finished), (3, 3), "cut at {cut}");
        }
        let mut t = FrameTracker::default();
        let text = frame(true, 1, true, 10);
        t.feed(&text[..8]);
        assert_eq!((t.started, t.finished), (1, 0), "payload still to come");
        t.feed(&text[8..]);
        assert_eq!((t.started, t.finished), (1, 1));
    }

    #[test]
    fn byte_by_byte_headers() {
        let (s, want) = stream();
        let mut t = FrameTracker::default();
        let n: u64 = s.chunks(1).map(|c| t.feed(c)).sum();
        assert_eq!(n, want);
    }
}
