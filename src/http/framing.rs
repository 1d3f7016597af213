//! Request-smuggling guard for HTTP/1.x connections.
//!
//! hyper follows RFC 9112 for a request that carries both Content-Length and
//! Transfer-Encoding: it drops Content-Length, uses chunked framing and
//! closes the connection afterwards. That is safe for hyper itself, but the
//! handler never learns the request was ambiguous, and a front should refuse
//! it outright (HAProxy and Envoy answer 400). So this wrapper follows the
//! request framing on the decrypted byte stream, checks each request head
//! with `httparse` before hyper sees it, and replaces a refused head with a
//! marker request that the handler answers with 400 and `Connection: close`.
//! Body bytes pass through in place, never copied or buffered.
//!
//! Written by hand because it needs the byte positions of request heads in a
//! live stream, which no HTTP crate exposes; `httparse` does the parsing.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the guard and the handler.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Why a request head was refused ([`Refusal`] as u8; 0 means none).
    refusal: AtomicU8,
    /// How many requests are being answered right now.
    in_flight: AtomicUsize,
}

/// Marks one request as being answered until dropped (end of its response).
pub struct InFlight(Arc<Verdict>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Verdict {
    fn set(&self, reason: Refusal) {
        self.refusal.store(reason as u8, Ordering::Release);
    }

    /// A request is being answered: the guard's head deadline does not run
    /// while any is (an SSE response may last hours).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// The refusal the handler must answer, if any.
    pub fn get(&self) -> Option<Refusal> {
        match self.refusal.load(Ordering::Acquire) {
            1 => Some(Refusal::LengthAndChunked),
            2 => Some(Refusal::RepeatedLength),
            3 => Some(Refusal::BadLength),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    LengthAndChunked = 1,
    RepeatedLength = 2,
    BadLength = 3,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Refusal::RepeatedLength => "more than one Content-Length header",
            Refusal::BadLength => "invalid Content-Length",
        }
    }
}

/// What hyper is given in place of a refused head: it can only be answered
/// with 400 (the handler checks the verdict first), then the connection closes.
const MARKER: &[u8] = b"GET / HTTP/1.1\r\nHost: refused.invalid\r\nConnection: close\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head (held back until complete).
    Head,
    /// Skipping a Content-Length body.
    Fixed { left: u64 },
    /// Reading a chunk-size line; `digits` seen so far, `ext` after ';'.
    ChunkSize {
        size: u64,
        digits: u8,
        ext: bool,
        cr: bool,
    },
    /// Skipping chunk data, then its CRLF (`crlf` bytes left after data).
    ChunkData { left: u64, crlf: u8 },
    /// Trailer lines after the last chunk; `len` of the current line.
    Trailers { len: usize, cr: bool },
    /// Upgrades, h2, refused or unparsable heads: stop following.
    Pass,
    /// After a refused head: deliver the marker, then end of stream.
    Refused,
}

pin_project_lite::pin_project! {
    /// Follows HTTP/1.x request framing on `inner`'s read side.
    pub struct Framing<S> {
        #[pin]
        inner: S,
        state: State,
        head: Vec<u8>,
        // Bytes to hand out before reading `inner` again.
        pending: Vec<u8>,
        max_head: usize,
        // `limits.max_headers`, as hyper is given it.
        max_headers: usize,
        verdict: Arc<Verdict>,
        // While a head is held back hyper sees no bytes, so its
        // header_read_timeout cannot run (and hyper-util's version
        // detection has no deadline at all): the guard keeps its own.
        head_timeout: Duration,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<S> Framing<S> {
    /// `follow = false` (h2) passes everything through untouched.
    /// `max_head` and `max_headers` are the limits hyper applies
    /// (`limits.max_header_size`, `limits.max_headers`).
    pub fn new(
        inner: S,
        max_head: usize,
        max_headers: usize,
        verdict: Arc<Verdict>,
        follow: bool,
        head_timeout: Duration,
    ) -> Self {
        Framing {
            inner,
            state: if follow { State::Head } else { State::Pass },
            head: Vec::new(),
            pending: Vec::new(),
            max_head,
            max_headers,
            verdict,
            head_timeout,
            deadline: None,
        }
    }
}

/// The guard's verdict on one complete request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadCheck {
    /// Refused: the handler answers 400 and the connection closes.
    Refuse(Refusal),
    /// Not followed further (upgrades, h2 preface, CONNECT, heads hyper
    /// itself refuses): the rest of the stream passes untouched.
    Stop,
    /// A request without a body; the next head follows.
    NoBody,
    /// A Content-Length body of this many bytes.
    Length(u64),
    /// A chunked body.
    Chunked,
}

/// Heads with up to this many headers are parsed into a stack array.
const STACK_HEADERS: usize = 128;

/// Check one complete head the way hyper will read it: `max_headers` is
/// hyper's limit too, so a head with more headers is one hyper refuses
/// (431) and the guard never stops following a head hyper accepts.
pub fn check_head(head: &[u8], max_headers: usize) -> HeadCheck {
    if max_headers <= STACK_HEADERS {
        let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
        judge(head, &mut headers[..max_headers])
    } else {
        let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
        judge(head, &mut headers)
    }
}

fn judge<'h>(head: &'h [u8], headers: &mut [httparse::Header<'h>]) -> HeadCheck {
    let mut req = httparse::Request::new(headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // Malformed heads (obs-fold, bad tokens) go to hyper unchanged: it
        // answers 400 before anything is proxied.
        _ => return HeadCheck::Stop,
    }
    if req.method == Some("PRI") || req.method == Some("CONNECT") {
        return HeadCheck::Stop;
    }
    let mut lengths = 0;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    let mut chunked = false;
    let mut te = false;
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            match v.parse::<u64>() {
                Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => length = Some(n),
                _ => bad_length = true,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            let v = std::str::from_utf8(h.value).unwrap_or("");
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te && lengths > 0 {
        return HeadCheck::Refuse(Refusal::LengthAndChunked);
    }
    if lengths > 1 {
        return HeadCheck::Refuse(Refusal::RepeatedLength);
    }
    if bad_length {
        return HeadCheck::Refuse(Refusal::BadLength);
    }
    if upgrade {
        return HeadCheck::Stop;
    }
    if te {
        // A non-chunked final coding is hyper's 400; stop following.
        return if chunked {
            HeadCheck::Chunked
        } else {
            HeadCheck::Stop
        };
    }
    match length {
        Some(n) if n > 0 => HeadCheck::Length(n),
        _ => HeadCheck::NoBody,
    }
}

/// Advance the body states over `data`; returns how many bytes belong to
/// the current message (the rest starts the next head).
fn advance(state: &mut State, data: &[u8]) -> usize {
    let mut i = 0;
    while i < data.len() {
        match *state {
            State::Head | State::Pass | State::Refused => return i,
            State::Fixed { left } => {
                let take = (left.min((data.len() - i) as u64)) as usize;
                i += take;
                *state = if left == take as u64 {
                    State::Head
                } else {
                    State::Fixed {
                        left: left - take as u64,
                    }
                };
            }
            State::ChunkData { left, crlf } => {
                if left > 0 {
                    let take = (left.min((data.len() - i) as u64)) as usize;
                    i += take;
                    *state = State::ChunkData {
                        left: left - take as u64,
                        crlf,
                    };
                } else if crlf > 0 {
                    i += 1;
                    *state = if crlf == 1 {
                        State::ChunkSize {
                            size: 0,
                            digits: 0,
                            ext: false,
                            cr: false,
                        }
                    } else {
                        State::ChunkData {
                            left: 0,
                            crlf: crlf - 1,
                        }
                    };
                }
            }
            State::ChunkSize {
                size,
                digits,
                ext,
                cr,
            } => {
                let b = data[i];
                i += 1;
                *state = match b {
                    b'\n' if digits == 0 => State::Pass,
                    b'\n' if size == 0 => State::Trailers { len: 0, cr: false },
                    b'\n' => State::ChunkData {
                        left: size,
                        crlf: 2,
                    },
                    b'\r' => State::ChunkSize {
                        size,
                        digits,
                        ext,
                        cr: true,
                    },
                    _ if cr => State::Pass,
                    b';' => State::ChunkSize {
                        size,
                        digits,
                        ext: true,
                        cr,
                    },
                    _ if ext => State::ChunkSize {
                        size,
                        digits,
                        ext,
                        cr,
                    },
                    _ => match (b as char).to_digit(16) {
                        Some(d) if digits < 15 => State::ChunkSize {
                            size: size * 16 + d as u64,
                            digits: digits + 1,
                            ext,
                            cr,
                        },
                        // Invalid or absurd sizes: hyper refuses them; stop following.
                        _ => State::Pass,
                    },
                };
            }
            State::Trailers { len, cr } => {
                let b = data[i];
                i += 1;
                *state = match b {
                    b'\n' if len == 0 => State::Head,
                    b'\n' => State::Trailers { len: 0, cr: false },
                    b'\r' => State::Trailers { len, cr: true },
                    _ => State::Trailers {
                        len: len + 1 + usize::from(cr),
                        cr: false,
                    },
                };
            }
        }
    }
    i
}

impl<S: AsyncRead> AsyncRead for Framing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                return Poll::Ready(Ok(()));
            }
            match *this.state {
                State::Refused => {
                    // hyper must still write the 400 for the marker (which
                    // asks to close): an EOF now makes it drop the
                    // connection without answering. Swallow what the client
                    // sends and report EOF only when it closes.
                    let mut sink = [MaybeUninit::<u8>::uninit(); 4096];
                    let mut rb = ReadBuf::uninit(&mut sink);
                    match this.inner.as_mut().poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            return Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Ok(())) => continue,
                        other => return other,
                    }
                }
                State::Pass => return this.inner.as_mut().poll_read(cx, buf),
                State::Head => {
                    // Hold the head back until it is complete.
                    let Some(end) = find_head_end(this.head) else {
                        if this.head.len() > *this.max_head {
                            // Too large: hyper answers 431.
                            *this.pending = std::mem::take(this.head);
                            *this.state = State::Pass;
                            continue;
                        }
                        // Uninitialised: zeroing 4 KiB on every poll (hyper
                        // polls several times per request, also while a
                        // response streams) was a fifth of the instructions
                        // of an HTTP/1.1 request. The reader fills it.
                        let mut chunk = [MaybeUninit::<u8>::uninit(); 4096];
                        let mut rb = ReadBuf::uninit(&mut chunk);
                        match this.inner.as_mut().poll_read(cx, &mut rb) {
                            Poll::Pending => {
                                // hyper also reads while a response streams:
                                // no deadline then, unless a new head began.
                                if this.head.is_empty() && this.verdict.busy() {
                                    *this.deadline = None;
                                    return Poll::Pending;
                                }
                                let timeout = *this.head_timeout;
                                let deadline = this
                                    .deadline
                                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                                if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                                    return Poll::Ready(Err(io::Error::new(
                                        io::ErrorKind::TimedOut,
                                        "request head not complete within request_header",
                                    )));
                                }
                                return Poll::Pending;
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Ready(Ok(())) => {}
                        }
                        if rb.filled().is_empty() {
                            // EOF: give hyper what there is (a partial head) and end.
                            *this.pending = std::mem::take(this.head);
                            *this.state = State::Pass;
                            if this.pending.is_empty() {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            this.head.extend_from_slice(rb.filled());
                        }
                        continue;
                    };
                    *this.deadline = None;
                    let rest = this.head.split_off(end);
                    let check = check_head(this.head, *this.max_headers);
                    let next = match check {
                        HeadCheck::Refuse(_) | HeadCheck::Stop => None,
                        HeadCheck::NoBody => Some(State::Head),
                        HeadCheck::Length(left) => Some(State::Fixed { left }),
                        HeadCheck::Chunked => Some(State::ChunkSize {
                            size: 0,
                            digits: 0,
                            ext: false,
                            cr: false,
                        }),
                    };
                    match (check, next) {
                        (HeadCheck::Refuse(reason), _) => {
                            this.verdict.set(reason);
                            *this.pending = MARKER.to_vec();
                            this.head.clear();
                            *this.state = State::Refused;
                        }
                        (_, None) => {
                            let mut out = std::mem::take(this.head);
                            out.extend_from_slice(&rest);
                            *this.pending = out;
                            *this.state = State::Pass;
                        }
                        (_, Some(next)) => {
                            let mut out = std::mem::take(this.head);
                            *this.state = next;
                            let used = advance(this.state, &rest);
                            out.extend_from_slice(&rest[..used]);
                            // Bytes after the body (pipelined requests) start the next head.
                            this.head.extend_from_slice(&rest[used..]);
                            *this.pending = out;
                        }
                    }
                }
                _ => {
                    // Body bytes: read in place, follow the framing.
                    let before = buf.filled().len();
                    match this.inner.as_mut().poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {}
                        other => return other,
                    }
                    let filled = buf.filled().len();
                    if filled == before {
                        return Poll::Ready(Ok(()));
                    }
                    let used = advance(this.state, &buf.filled()[before..filled]);
                    if before + used < filled {
                        // The next request's head started in this read: keep it back.
                        this.head
                            .extend_from_slice(&buf.filled()[before + used..filled]);
                        buf.set_filled(before + used);
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

impl<S: AsyncWrite> AsyncWrite for Framing<S> {
    crate::io::forward_async_write!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smuggling attempt behind `n` filler headers.
    fn head_with(n: usize) -> Vec<u8> {
        let mut h = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..n {
            h.extend_from_slice(format!("X-Filler-{i}: x\r\n").as_bytes());
        }
        h.extend_from_slice(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        h
    }

    #[test]
    fn guard_follows_max_headers_not_a_fixed_array() {
        // More headers than the stack array: still judged when hyper would
        // accept them (max_headers = 300).
        assert_eq!(
            check_head(&head_with(200), 300),
            HeadCheck::Refuse(Refusal::LengthAndChunked)
        );
        // More than max_headers: hyper answers 431 itself; not followed.
        assert_eq!(check_head(&head_with(200), 100), HeadCheck::Stop);
        assert_eq!(
            check_head(&head_with(10), 100),
            HeadCheck::Refuse(Refusal::LengthAndChunked)
        );
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 100),
            HeadCheck::NoBody
        );
        assert_eq!(
            check_head(b"POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n", 100),
            HeadCheck::Length(7)
        );
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn run(input: &[u8], split: usize) -> (Vec<u8>, Option<Refusal>) {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let verdict = Arc::new(Verdict::default());
        let mut f = Framing::new(
            b,
            64 * 1024,
            100,
            verdict.clone(),
            true,
            Duration::from_secs(30),
        );
        let (x, y) = input.split_at(split.min(input.len()));
        a.write_all(x).await.unwrap();
        a.write_all(y).await.unwrap();
        drop(a);
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        (out, verdict.get())
    }

    const PIPELINED: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn passes_valid_pipelined_requests_unchanged_at_every_split() {
        for split in 0..=PIPELINED.len() {
            let (out, verdict) = run(PIPELINED, split).await;
            assert_eq!(out, PIPELINED, "split at {split}");
            assert_eq!(verdict, None);
        }
    }

    #[tokio::test]
    async fn refuses_length_with_chunked_in_either_order() {
        for req in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"[..],
        ] {
            let (out, verdict) = run(req, 7).await;
            assert_eq!(out, MARKER);
            assert_eq!(verdict, Some(Refusal::LengthAndChunked));
        }
    }

    #[tokio::test]
    async fn refuses_repeated_and_bad_lengths_after_a_good_request() {
        let good = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut req = good.clone();
        req.extend_from_slice(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n");
        let (out, verdict) = run(&req, 3).await;
        let mut want = good.clone();
        want.extend_from_slice(MARKER);
        assert_eq!(out, want);
        assert_eq!(verdict, Some(Refusal::RepeatedLength));

        let (_, verdict) = run(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
            0,
        )
        .await;
        assert_eq!(verdict, Some(Refusal::BadLength));
    }

    #[tokio::test]
    async fn stops_following_upgrades_and_malformed_heads() {
        let ws = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        assert_eq!(run(ws, 10).await, (ws.to_vec(), None));
        let fold = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n";
        assert_eq!(run(fold, 5).await, (fold.to_vec(), None));
    }
}
