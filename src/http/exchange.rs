//! The exchange record: everything known about one request/response, counted
//! in the location's metrics and written as one access log line when the
//! response ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{self as m, GaugeGuard, LocationMetrics};

/// Shared between the request body (which counts) and the exchange record.
#[derive(Debug, Default)]
pub struct RequestProgress {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
    /// The client's request body while no upload holds it: kept until the
    /// response has ended (the exchange drops it then), so that an h2
    /// answer given before the whole body arrived (413, 421, an upstream's
    /// early 401) ends with RST_STREAM(NO_ERROR) after the response instead
    /// of CANCEL before it (RFC 9113 section 8.1; h2 picks the code by
    /// whether our side of the stream is closed when the body is dropped).
    parked: std::sync::Mutex<Option<hyper::body::Incoming>>,
}

impl RequestProgress {
    /// Hold the request body until the exchange ends.
    pub fn park(&self, body: hyper::body::Incoming) {
        if let Ok(mut p) = self.parked.lock() {
            *p = Some(body);
        }
    }

    /// Take the held request body (to forward it).
    pub fn take_parked(&self) -> Option<hyper::body::Incoming> {
        self.parked.lock().ok()?.take()
    }

    /// True when the held body has nothing (more) to send.
    pub fn parked_is_end_stream(&self) -> bool {
        use http_body::Body as _;
        self.parked
            .lock()
            .map_or(true, |p| p.as_ref().is_none_or(|b| b.is_end_stream()))
    }

    /// True when the body limit cut the request.
    pub fn cut(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }
}

/// How much of an h2 request body that portico answered early (413, 421,
/// an upstream's 401) is still read and thrown away after the response.
const DISCARD_LIMIT: u64 = 16 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Read and drop the rest of an h2 request body whose response has been
/// sent, up to [`DISCARD_LIMIT`] bytes or [`DISCARD_TIME`], then let it go
/// (RST_STREAM(NO_ERROR) if the client is still sending). A client that is
/// mid-upload when the stream is reset may report the reset instead of the
/// answer: curl 7.88 (nghttp2) exits with "(92) Stream error in the HTTP/2
/// framing layer" and never shows the 413. nginx reads and discards the
/// body the same way. Reading releases flow-control credit, so the client
/// can finish.
fn discard(mut body: hyper::body::Incoming) {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut read = 0u64;
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > DISCARD_LIMIT {
                    break;
                }
            }
        })
        .await;
    });
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
    /// A bridged WebSocket session: messages each way and turn times.
    pub websocket: Option<WebSocketSession>,
}

/// What the access log line of a WebSocket session adds.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebSocketSession {
    /// Data messages client to upstream / upstream to client.
    pub messages_in: u64,
    pub messages_out: u64,
    pub turns: Option<super::ws_auto::TurnSummary>,
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
            websocket: None,
        }
    }

    /// The response head is known: count the request, open the stream gauge.
    pub fn respond(&mut self, status: u16, kind: StreamKind) {
        self.status = status;
        self.kind = kind;
        self.metrics
            .requests
            .increment(&(status, self.method, self.protocol), || {
                self.request_counter(status_label(status))
            });
        self._active = Some(GaugeGuard::new(self.metrics.active[kind.index()].clone()));
    }

    /// The request failed with `error`, answered with `status`: counted and
    /// logged as this request's outcome.
    pub fn failed(&mut self, status: u16, error: String) {
        self.error = Some(error);
        self.respond(status, StreamKind::Http);
    }

    /// `portico_http_requests_total` for this request (the labels share the
    /// location's strings, so counting allocates nothing for common statuses).
    fn count_request(&self, status: metrics::SharedString) {
        self.request_counter(status).increment(1);
    }

    fn request_counter(&self, status: metrics::SharedString) -> metrics::Counter {
        metrics::counter!(m::HTTP_REQUESTS,
            "site" => self.metrics.site.clone(), "location" => self.metrics.location.clone(),
            "method" => self.method, "status" => status, "protocol" => self.protocol)
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

    pub(super) fn mark_first_byte(&mut self) {
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
        // The response has ended: the request body may go now. An h2
        // client still uploading is let finish (bounded), see `discard`.
        if let Some(body) = self.request.take_parked() {
            if self.protocol == "h2" {
                discard(body);
            }
        }
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
        let round = |v: f64| (v * 10.0).round() / 10.0;
        // A WebSocket session's line has its message counts and turn times
        // instead of the time to first byte (absent fields are left out).
        let ws = self.websocket;
        let turns = ws.and_then(|w| w.turns);
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
            first_byte_ms = first_byte_ms.filter(|_| ws.is_none()).map(round),
            ws_messages_in = ws.map(|w| w.messages_in),
            ws_messages_out = ws.map(|w| w.messages_out),
            ws_turns = ws.map(|_| turns.map_or(0, |t| t.turns)),
            ws_response_median_ms = turns.map(|t| round(t.median_ms)),
            ws_response_max_ms = turns.map(|t| round(t.max_ms)),
            duration_ms = (elapsed.as_secs_f64() * 10_000.0).round() / 10.0,
            client = %self.client,
            error = self.error.as_deref(),
            "request"
        );
    }
}
