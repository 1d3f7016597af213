//! Body wrappers: bytes pass through untouched, frame by frame, while these
//! count them, enforce `max_body`, time the first byte, count SSE events and
//! write the access log line when the response ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::{self as m, GaugeGuard, LocationMetrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was larger than the site's `max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// Shared between the request body (which counts) and the exchange record.
#[derive(Debug, Default)]
pub struct RequestProgress {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
}

/// The client's request body on its way upstream. Boxed, and absent for
/// bodiless requests: hyper's client keeps a block of 32 queued requests per
/// upstream connection, so every byte of this type costs 32 per connection
/// (an open SSE stream holds one); boxed, that block shrinks from 13.8 to
/// 8.5 KiB (heap profile of 2000 open SSE streams). Bodiless requests (most of them) allocate nothing.
pub struct RequestBody(Option<Box<Upload>>);

struct Upload {
    /// A frame already read (and counted) before forwarding; returned first.
    pending: Option<Frame<Bytes>>,
    inner: Option<Incoming>,
    limit: Option<u64>,
    progress: Arc<RequestProgress>,
    counter: metrics::Counter,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        limit: Option<u64>,
        progress: Arc<RequestProgress>,
        counter: metrics::Counter,
    ) -> Self {
        if inner.is_end_stream() {
            return RequestBody::empty();
        }
        RequestBody(Some(Box::new(Upload {
            pending: None,
            inner: Some(inner),
            limit,
            progress,
            counter,
        })))
    }

    pub fn empty() -> Self {
        RequestBody(None)
    }
}

impl RequestBody {
    /// Read the first frame now (so a malformed chunked body is refused
    /// before the upstream sees the request); it is replayed first.
    pub async fn prime(&mut self) -> Result<(), BoxError> {
        use http_body_util::BodyExt as _;
        match self.frame().await {
            Some(Ok(f)) => {
                if let Some(up) = self.0.as_mut() {
                    up.pending = Some(f);
                }
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(this) = self.0.as_deref_mut() else {
            return Poll::Ready(None);
        };
        if let Some(f) = this.pending.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let total = this.progress.bytes.fetch_add(n, Ordering::Relaxed) + n;
                    this.counter.increment(n);
                    if let Some(limit) = this.limit {
                        if total > limit {
                            this.progress.too_large.store(true, Ordering::Relaxed);
                            this.inner = None;
                            return Poll::Ready(Some(Err(Box::new(TooLarge(limit)))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|up| {
            up.pending.is_none() && up.inner.as_ref().is_none_or(|b| b.is_end_stream())
        })
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.as_deref() {
            None => SizeHint::with_exact(0),
            Some(up) => match (&up.pending, &up.inner) {
                // A primed frame is not in the inner body's hint any more.
                (Some(_), _) => SizeHint::default(),
                (None, Some(b)) => b.size_hint(),
                (None, None) => SizeHint::with_exact(0),
            },
        }
    }
}

/// Counts SSE events by finding blank lines (`\n\n`, `\r\n\r\n`, `\r\r`) as
/// bytes pass, carrying state across chunks, without copying them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseCounter {
    state: SseState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SseState {
    /// Inside a line that has content.
    InLine,
    /// Just after a line end; `cr` when that end was a CR (an LF may follow).
    LineStart { cr: bool },
    /// After a blank line (or at the start): more blank lines are no event.
    Blank { cr: bool },
}

impl Default for SseCounter {
    fn default() -> Self {
        SseCounter {
            state: SseState::Blank { cr: false },
        }
    }
}

impl SseCounter {
    /// Feed the next bytes; returns how many events ended inside them.
    pub fn feed(&mut self, bytes: &[u8]) -> u64 {
        let mut events = 0;
        let mut st = self.state;
        for &b in bytes {
            st = match (st, b) {
                (SseState::LineStart { cr: true }, b'\n') => SseState::LineStart { cr: false },
                (SseState::Blank { cr: true }, b'\n') => SseState::Blank { cr: false },
                (SseState::LineStart { .. }, b'\r') => {
                    events += 1;
                    SseState::Blank { cr: true }
                }
                (SseState::LineStart { .. }, b'\n') => {
                    events += 1;
                    SseState::Blank { cr: false }
                }
                (SseState::Blank { .. }, b'\r') => SseState::Blank { cr: true },
                (SseState::Blank { .. }, b'\n') => SseState::Blank { cr: false },
                (SseState::InLine, b'\r') => SseState::LineStart { cr: true },
                (SseState::InLine, b'\n') => SseState::LineStart { cr: false },
                _ => SseState::InLine,
            };
        }
        self.state = st;
        events
    }
}

/// Kinds of HTTP streams, for `portico_http_streams_active` and durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Http,
    Sse,
    WebSocket,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Http => "http",
            StreamKind::Sse => "sse",
            StreamKind::WebSocket => "websocket",
        }
    }
}

/// Everything known about one request/response, logged once when the
/// response ends (completed, aborted by the client, or failed).
pub struct Exchange {
    pub metrics: Arc<LocationMetrics>,
    pub method: &'static str,
    pub path: String,
    pub status: u16,
    pub protocol: &'static str,
    pub client: std::net::IpAddr,
    pub started: Instant,
    pub first_byte: Option<Instant>,
    pub request: Arc<RequestProgress>,
    pub response_bytes: u64,
    pub kind: StreamKind,
    pub error: Option<String>,
    _active: Option<GaugeGuard>,
    /// Keeps the connection's "answering a request" mark while the response lives.
    pub in_flight: Option<super::framing::InFlight>,
}

impl StreamKind {
    fn index(self) -> usize {
        match self {
            StreamKind::Http => 0,
            StreamKind::Sse => 1,
            StreamKind::WebSocket => 2,
        }
    }
}

impl Exchange {
    pub fn new(
        metrics: Arc<LocationMetrics>,
        method: &'static str,
        path: String,
        protocol: &'static str,
        client: std::net::IpAddr,
        started: Instant,
        request: Arc<RequestProgress>,
    ) -> Exchange {
        Exchange {
            metrics,
            method,
            path,
            status: 0,
            protocol,
            client,
            started,
            first_byte: None,
            request,
            response_bytes: 0,
            kind: StreamKind::Http,
            error: None,
            _active: None,
            in_flight: None,
        }
    }

    /// The response head is known: count the request, open the stream gauge.
    pub fn respond(&mut self, status: u16, kind: StreamKind) {
        self.status = status;
        self.kind = kind;
        self.count_request(status_label(status));
        self._active = Some(GaugeGuard::new(self.metrics.active[kind.index()].clone()));
    }

    /// Answer with `err`'s one-line response, counted and logged as this
    /// request's outcome.
    pub fn fail(&mut self, err: &super::error::ProxyError) -> http::Response<ResponseBody> {
        let r = err.response();
        self.error = Some(err.to_string());
        self.respond(r.status().as_u16(), StreamKind::Http);
        r
    }

    /// `portico_http_requests_total` for this request (the labels share the
    /// location's strings, so counting allocates nothing for common statuses).
    fn count_request(&self, status: metrics::SharedString) {
        metrics::counter!(m::HTTP_REQUESTS,
            "site" => self.metrics.site.clone(), "location" => self.metrics.location.clone(),
            "method" => self.method, "status" => status, "protocol" => self.protocol)
        .increment(1);
    }

    /// Keep this exchange in the status page's recent errors, if it is a
    /// server-side failure (see [`crate::recent_errors::http_kind`]).
    #[cold]
    fn note_failure(&self) {
        let Some(kind) = crate::recent_errors::http_kind(self.status, self.error.is_some()) else {
            return;
        };
        crate::recent_errors::record(crate::recent_errors::RecentError {
            at: std::time::SystemTime::now(),
            kind,
            site: Some(self.metrics.site.clone()),
            location: Some(self.metrics.location.clone()),
            status: Some(self.status),
            error: match &self.error {
                Some(e) => format!("{} {}: {e}", self.method, self.path),
                None => format!(
                    "{} {}: upstream answered {}",
                    self.method, self.path, self.status
                ),
            },
        });
    }

    fn mark_first_byte(&mut self) {
        if self.first_byte.is_none() {
            let now = Instant::now();
            self.first_byte = Some(now);
            self.metrics
                .first_byte
                .record(now.duration_since(self.started).as_secs_f64());
        }
    }
}

/// Status as a label without allocating for the common ones.
fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        101 => "101".into(),
        204 => "204".into(),
        304 => "304".into(),
        404 => "404".into(),
        502 => "502".into(),
        other => other.to_string().into(),
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        if self.status == 0 {
            // Dropped before any response head: the client went away (connection
            // closed, h2 stream reset) while the upstream had not answered yet.
            // Count it like nginx's 499 so cancelled requests reach dashboards.
            self.status = 499;
            self.error
                .get_or_insert_with(|| "client closed the request before the response head".into());
            self.count_request("499".into());
        }
        if self._active.is_some() {
            self.metrics.duration[self.kind.index()].record(elapsed.as_secs_f64());
        }
        // Failures only (a branch on two fields for the others).
        if self.status >= 500 || self.error.is_some() {
            self.note_failure();
        }
        let first_byte_ms = self
            .first_byte
            .map(|t| t.duration_since(self.started).as_secs_f64() * 1000.0);
        tracing::info!(
            target: "portico::access",
            kind = "http",
            site = %self.metrics.site,
            location = %self.metrics.location,
            method = self.method,
            path = %self.path,
            status = self.status,
            protocol = self.protocol,
            stream = self.kind.as_str(),
            bytes_in = self.request.bytes.load(Ordering::Relaxed),
            bytes_out = self.response_bytes,
            first_byte_ms = first_byte_ms.map(|v| (v * 10.0).round() / 10.0),
            duration_ms = (elapsed.as_secs_f64() * 10_000.0).round() / 10.0,
            client = %self.client,
            error = self.error.as_deref(),
            "request"
        );
    }
}

enum Source {
    Empty,
    Full(Option<Bytes>),
    Upstream(Incoming),
}

/// A response body towards the client.
pub struct ResponseBody {
    source: Source,
    exchange: Option<Box<Exchange>>,
    sse: Option<SseCounter>,
    /// `portico_upstream_failures_total{reason="reset"}` of the upstream
    /// this body comes from, for a failure mid-body.
    upstream_reset: Option<metrics::Counter>,
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Empty,
            exchange: None,
            sse: None,
            upstream_reset: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        ResponseBody {
            source: Source::Full(Some(b.into())),
            exchange: None,
            sse: None,
            upstream_reset: None,
        }
    }

    pub fn upstream(b: Incoming) -> Self {
        ResponseBody {
            source: Source::Upstream(b),
            exchange: None,
            sse: None,
            upstream_reset: None,
        }
    }

    /// A body from an upstream: an error while it streams counts on `reset`.
    pub fn from_upstream(b: Incoming, reset: metrics::Counter) -> Self {
        let mut body = ResponseBody::upstream(b);
        body.upstream_reset = Some(reset);
        body
    }

    /// Attach the exchange: from now on bytes are counted and the access log
    /// line is written when this body is dropped.
    pub fn with_exchange(mut self, ex: Exchange) -> Self {
        if ex.kind == StreamKind::Sse {
            self.sse = Some(SseCounter::default());
        }
        self.exchange = Some(Box::new(ex));
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Empty => Poll::Ready(None),
            Source::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream(inc) => match Pin::new(inc).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = this.exchange.as_mut() {
                        ex.error = Some(format!("upstream body: {e}"));
                    }
                    if let Some(c) = this.upstream_reset.take() {
                        c.increment(1);
                    }
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(ex)) = (frame.data_ref(), this.exchange.as_mut()) {
                if !data.is_empty() {
                    ex.mark_first_byte();
                    ex.response_bytes += data.len() as u64;
                    ex.metrics.body_response.increment(data.len() as u64);
                    if let Some(sse) = this.sse.as_mut() {
                        let n = sse.feed(data);
                        if n > 0 {
                            ex.metrics.sse_events.increment(n);
                        }
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Empty => true,
            Source::Full(b) => b.is_none(),
            Source::Upstream(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Empty => SizeHint::with_exact(0),
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Upstream(i) => i.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_split_everywhere(stream: &[u8]) -> u64 {
        let whole = SseCounter::default().feed(stream);
        for cut in 0..=stream.len() {
            let mut c = SseCounter::default();
            let n = c.feed(&stream[..cut]) + c.feed(&stream[cut..]);
            assert_eq!(n, whole, "split at {cut}");
        }
        whole
    }

    #[test]
    fn sse_boundaries_lf_crlf_cr() {
        assert_eq!(count_split_everywhere(b"data: a\n\ndata: b\n\n"), 2);
        assert_eq!(count_split_everywhere(b"data: a\r\n\r\ndata: b\r\n\r\n"), 2);
        assert_eq!(count_split_everywhere(b"data: a\r\rdata: b\r\r"), 2);
        assert_eq!(count_split_everywhere(b"event: x\ndata: 1\ndata: 2\n\n"), 1);
        assert_eq!(count_split_everywhere(b"data: a\n\n\n\n\ndata: b\n"), 1);
        assert_eq!(count_split_everywhere(b"\n\n\r\n"), 0);
        assert_eq!(count_split_everywhere(b"data: a\r\n"), 0);
    }

    #[test]
    fn sse_byte_by_byte() {
        let s = b"id: 1\r\ndata: {\"x\":1}\r\n\r\n: keepalive\n\ndata: [DONE]\n\n";
        let mut c = SseCounter::default();
        let n: u64 = s.iter().map(|b| c.feed(std::slice::from_ref(b))).sum();
        assert_eq!(n, 3);
    }
}
