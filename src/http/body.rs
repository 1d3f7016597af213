//! Body wrappers: bytes pass through untouched, frame by frame, while these
//! count them, enforce `max_body`, time the first byte and count SSE events;
//! the attached [`Exchange`] writes the access log line when the response ends.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::exchange::{Exchange, RequestProgress, StreamKind};
use super::pool::Reuse;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body was larger than the site's `max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct TooLarge(pub u64);

/// The client's request body on its way upstream. Boxed, and absent for
/// bodiless requests: hyper's client keeps a block of 32 queued requests per
/// upstream connection, so every byte of this type costs 32 per connection
/// (an open SSE stream holds one); boxed, that block shrinks from 13.8 to
/// 8.5 KiB (heap profile of 2000 open SSE streams). Bodiless requests (most of them) allocate nothing.
pub struct RequestBody(Option<Box<Upload>>);

/// An upload dropped before its body ended (the upstream answered early,
/// or the request failed) leaves the body to the exchange, which drops it
/// once the response has ended.
impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(b) = self.inner.take() {
            if !b.is_end_stream() {
                self.progress.park(b);
            }
        }
    }
}

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
                            // Held until the 413 has been sent (see RequestProgress).
                            if let Some(b) = this.inner.take() {
                                this.progress.park(b);
                            }
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

enum Source {
    Empty,
    Full(Option<Bytes>),
    /// With the ticket that hands its HTTP/1.1 connection back to the pool
    /// once the body has ended.
    Upstream(Incoming, Option<Reuse<RequestBody>>),
}

/// A response body towards the client.
pub struct ResponseBody {
    source: Source,
    exchange: Option<Box<Exchange>>,
    sse: Option<SseCounter>,
    /// `portico_upstream_failures_total{reason="reset"}` of the upstream
    /// this body comes from, for a failure mid-body.
    upstream_reset: Option<metrics::Counter>,
    /// An upstream body's first data, read before the head was sent (see
    /// [`ResponseBody::prime`]); returned first.
    primed: Option<Bytes>,
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Empty,
            exchange: None,
            sse: None,
            upstream_reset: None,
            primed: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        ResponseBody {
            source: Source::Full(Some(b.into())),
            exchange: None,
            sse: None,
            upstream_reset: None,
            primed: None,
        }
    }

    pub fn upstream(b: Incoming) -> Self {
        ResponseBody {
            source: Source::Upstream(b, None),
            exchange: None,
            sse: None,
            upstream_reset: None,
            primed: None,
        }
    }

    /// A body from an upstream: an error while it streams counts on `reset`.
    pub fn from_upstream(
        b: Incoming,
        reuse: Option<Reuse<RequestBody>>,
        reset: metrics::Counter,
    ) -> Self {
        ResponseBody {
            source: Source::Upstream(b, reuse),
            exchange: None,
            sse: None,
            upstream_reset: Some(reset),
            primed: None,
        }
    }

    /// Read an upstream body's first frame now, before the response head is
    /// handed to hyper, so that the head and the data already on its way
    /// leave together (see `streams`: a client may act on a head alone,
    /// and curl ends an h2 upload short when it sees an error status).
    /// Waits for as long as the body would have (a client's reset ends the
    /// wait). An error here comes before any byte was sent: the caller can
    /// still answer 502. Called only for a body with a declared length, so
    /// its first frame is data.
    pub async fn prime(&mut self) -> Result<(), BoxError> {
        use http_body_util::BodyExt as _;
        let Source::Upstream(inc, reuse) = &mut self.source else {
            return Ok(());
        };
        if inc.is_end_stream() {
            return Ok(());
        }
        match inc.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    return Err("trailers before the declared body".into());
                };
                if inc.is_end_stream() {
                    if let Some(r) = reuse.take() {
                        r.give_back();
                    }
                }
                self.primed = Some(data);
                Ok(())
            }
            Some(Err(e)) => Err(Box::new(e)),
            None => Ok(()),
        }
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
            Source::Upstream(_, _) if this.primed.is_some() => {
                Poll::Ready(this.primed.take().map(|d| Ok(Frame::data(d))))
            }
            Source::Upstream(inc, reuse) => match Pin::new(&mut *inc).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = this.exchange.as_mut() {
                        ex.error = Some(format!("upstream body: {e}"));
                    }
                    if let Some(c) = this.upstream_reset.take() {
                        c.increment(1);
                    }
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                other => {
                    // Ended (hyper's server stops polling a body whose
                    // end it can see): the connection may serve another.
                    let ended = matches!(other, Poll::Ready(None))
                        || (other.is_ready() && inc.is_end_stream());
                    if ended {
                        if let Some(r) = reuse.take() {
                            r.give_back();
                        }
                    }
                    other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
                }
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
            Source::Upstream(i, _) => self.primed.is_none() && i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Empty => SizeHint::with_exact(0),
            Source::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Upstream(i, _) => match &self.primed {
                None => i.size_hint(),
                Some(p) => match i.size_hint().exact() {
                    Some(rest) => SizeHint::with_exact(rest + p.len() as u64),
                    None => SizeHint::default(),
                },
            },
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
