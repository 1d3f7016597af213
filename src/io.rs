//! Stream plumbing shared by the passthrough and HTTP halves: a stream that
//! replays peeked bytes ([`Prefixed`]), a read meter with an activity clock
//! ([`Metered`], [`Activity`]), and the idle-aware byte pump that joins two
//! streams ([`join_with_idle`], used by upgraded HTTP connections).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `AsyncWrite` for a wrapper that only watches the read side: every write
/// call goes to its pinned `inner` field unchanged.
macro_rules! forward_async_write {
    () => {
        fn poll_write(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            self.project().inner.poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            self.project().inner.poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            self.project().inner.poll_flush(cx)
        }

        fn poll_shutdown(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            self.project().inner.poll_shutdown(cx)
        }
    };
}
pub(crate) use forward_async_write;

pin_project_lite::pin_project! {
    /// A stream that first yields `prefix` (bytes already read while peeking),
    /// then reads from `inner`. Writes go straight to `inner`. This is how a
    /// peek never consumes: whoever gets the stream next sees every byte.
    #[derive(Debug)]
    pub struct Prefixed<S> {
        prefix: BytesMut,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Give the memory back: the prefix can be 16 KiB and the stream may live for hours.
                *this.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    forward_async_write!();
}

/// Shared clock of the last byte moved in either direction, read by the idle watchdog.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Resolves once `activity` has seen no byte for `idle`.
/// A plain `fn` returning an `async move` block: an `async fn` would keep a
/// second copy of its arguments, and a tunnel or WebSocket holds this for
/// its whole life.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn idle_watchdog(
    activity: &Activity,
    idle: Duration,
) -> impl std::future::Future<Output = ()> + '_ {
    async move {
        loop {
            let quiet = activity.idle_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts bytes read from `inner` into a live counter and the activity clock.
    pub struct Metered<S> {
        #[pin]
        inner: S,
        counter: metrics::Counter,
        // Bytes read so far, plus the starting count given to `new`.
        pub total: u64,
        activity: Arc<Activity>,
    }
}

impl<S> Metered<S> {
    pub fn new(inner: S, counter: metrics::Counter, total: u64, activity: Arc<Activity>) -> Self {
        Metered {
            inner,
            counter,
            total,
            activity,
        }
    }
}

impl<S: AsyncRead> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        poll_read_seen(this.inner, cx, buf, |new| {
            let n = new.len() as u64;
            this.counter.increment(n);
            *this.total += n;
            this.activity.touch();
        })
    }
}

/// Poll `inner` into `buf` and show `seen` the bytes this read added (it is
/// not called when there are none): the one place the metering readers
/// look at what passes through them.
pub fn poll_read_seen<S: AsyncRead>(
    inner: Pin<&mut S>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    seen: impl FnOnce(&[u8]),
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    let r = inner.poll_read(cx, buf);
    let new = &buf.filled()[before..];
    if !new.is_empty() {
        seen(new);
    }
    r
}

impl<S: AsyncWrite> AsyncWrite for Metered<S> {
    forward_async_write!();
}

/// Why [`join_with_idle`] ended other than by both sides finishing.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("idle timeout")]
    Idle,
    /// A read or write failed; the message is the I/O error's.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Join two streams until both directions end, an error, or `idle` without
/// a byte either way. Used for upgraded HTTP connections. A direction ends
/// at EOF, passed on as a write shutdown; with `linger`, once one direction
/// has ended the other gets at most that long to end as well.
pub async fn join_with_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
    linger: Option<Duration>,
) -> Result<(), PumpError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    // Only the activity clock: callers count their own bytes.
    let a = Metered::new(a, metrics::Counter::noop(), 0, activity.clone());
    let b = Metered::new(b, metrics::Counter::noop(), 0, activity.clone());
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let a_to_b = pump::<WS_STEP, _, _>(&mut ar, &mut bw, TlsEof::Ends);
    let b_to_a = pump::<WS_STEP, _, _>(&mut br, &mut aw, TlsEof::Ends);
    let watchdog = idle_watchdog(&activity, idle);
    tokio::pin!(a_to_b, b_to_a, watchdog);
    let a_done = tokio::select! {
        r = &mut a_to_b => { r?; true }
        r = &mut b_to_a => { r?; false }
        _ = &mut watchdog => return Err(PumpError::Idle),
    };
    let rest = async {
        if a_done {
            b_to_a.as_mut().await
        } else {
            a_to_b.as_mut().await
        }
    };
    let linger = async {
        match linger {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = rest => Ok(r?),
        _ = linger => Ok(()),
        _ = &mut watchdog => Err(PumpError::Idle),
    }
}

/// What a [`pump`] makes of a TLS peer that closed without close_notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEof {
    /// The direction ended: shut the writer down and finish.
    Ends,
    /// Return the `UnexpectedEof` error (the caller ends the whole stream).
    Fails,
}

/// Bytes a WebSocket [`pump`] reads per step: one TLS record's plaintext.
pub const WS_STEP: usize = 16 * 1024;

/// Copy `r` into `w` until `r` ends, then shut `w`'s write side down (the
/// half-close passes on). With [`TlsEof::Ends`], a TLS peer that closes
/// without close_notify (most WebSocket clients do after the close
/// handshake) has ended its stream too; with [`TlsEof::Fails`] the pump
/// returns that error at once. Unlike `tokio::io::copy`, which keeps an 8 KiB
/// buffer per direction for the stream's whole life, a pump holds memory
/// only while bytes are in flight: each read lands in a buffer on the stack
/// of the poll that reads it and is written on at once; only what the
/// writer cannot take yet is copied to the heap, and freed once written.
/// An idle WebSocket or tunnel (most of them, most of the time) holds none,
/// as HAProxy's buffers do. Hand-written because tokio's copy helpers own
/// their buffers. `STEP` is the most one read takes (on the stack).
pub async fn pump<const STEP: usize, R, W>(r: &mut R, w: &mut W, tls_eof: TlsEof) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut held: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut read_done = false;
    let mut unflushed = false;
    std::future::poll_fn(|cx| loop {
        // What the writer refused earlier goes first, in order.
        std::task::ready!(write_from(w, cx, &held, &mut at, &mut unflushed))?;
        if !held.is_empty() {
            held = Vec::new();
            at = 0;
        }
        if read_done {
            std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
            return Poll::Ready(Ok(()));
        }
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STEP];
        let mut step = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *r).poll_read(cx, &mut step) {
            Poll::Pending => {
                // Nothing more to read for now: push out what was written.
                if unflushed {
                    std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    unflushed = false;
                }
                return Poll::Pending;
            }
            Poll::Ready(Err(e))
                if e.kind() == io::ErrorKind::UnexpectedEof && tls_eof == TlsEof::Ends =>
            {
                read_done = true;
                continue;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let data = step.filled();
        if data.is_empty() {
            read_done = true;
            continue;
        }
        let mut off = 0;
        if write_from(w, cx, data, &mut off, &mut unflushed)?.is_pending() {
            // The writer is full: keep the rest until it drains.
            held = data[off..].to_vec();
            return Poll::Pending;
        }
    })
    .await
}

/// Write `data[*at..]` to `w` until all of it is written (ready) or the
/// writer is full (pending, `*at` says how far it got).
fn write_from<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    cx: &mut Context<'_>,
    data: &[u8],
    at: &mut usize,
    unflushed: &mut bool,
) -> Poll<io::Result<()>> {
    while *at < data.len() {
        let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, &data[*at..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *at += n;
        *unflushed = true;
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_prefix_then_inner() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(BytesMut::from(&b"hello"[..]), b);
        let mut out = Vec::new();
        p.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello world");
    }

    #[tokio::test]
    async fn small_reads_drain_prefix_in_order() {
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let mut p = Prefixed::new(BytesMut::from(&b"abcdef"[..]), b);
        let mut one = [0u8; 4];
        let n = p.read(&mut one).await.unwrap();
        assert_eq!(&one[..n], b"abcd");
        let n = p.read(&mut one).await.unwrap();
        assert_eq!(&one[..n], b"ef");
        assert_eq!(p.read(&mut one).await.unwrap(), 0);
    }

    /// A writer that takes at most 7 bytes per call and refuses every other
    /// call, so the pump must keep what it could not write, in order.
    struct Stingy {
        out: Vec<u8>,
        refuse: bool,
        shut: bool,
    }

    impl AsyncWrite for Stingy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.refuse = !self.refuse;
            if self.refuse {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(7);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pump_keeps_order_through_a_refusing_writer_and_passes_the_end_on() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = tokio::io::duplex(1000);
        let feed = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in feed.chunks(333) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut w = Stingy {
            out: Vec::new(),
            refuse: false,
            shut: false,
        };
        pump::<64, _, _>(&mut b, &mut w, TlsEof::Fails)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(w.out.len(), data.len());
        assert!(w.out == data, "bytes reordered or changed");
        assert!(
            w.shut,
            "the end of the source was not passed on as a shutdown"
        );
    }

    /// The pump's read buffer lives on the stack of one poll, not in the
    /// future that an open WebSocket or tunnel keeps for its whole life.
    #[tokio::test]
    async fn an_idle_pump_keeps_no_buffer() {
        let (_a, mut b) = tokio::io::duplex(64);
        let mut sink = tokio::io::sink();
        let fut = pump::<WS_STEP, _, _>(&mut b, &mut sink, TlsEof::Ends);
        assert!(
            std::mem::size_of_val(&fut) < 256,
            "pump future is {} bytes",
            std::mem::size_of_val(&fut)
        );
    }

    struct EofWithoutNotify;

    impl AsyncRead for EofWithoutNotify {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
        }
    }

    #[tokio::test]
    async fn a_peer_gone_without_close_notify_ends_the_direction() {
        let (mut a, mut b) = tokio::io::duplex(64);
        pump::<64, _, _>(&mut EofWithoutNotify, &mut a, TlsEof::Ends)
            .await
            .unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (mut a, _b) = tokio::io::duplex(64);
        let e = pump::<64, _, _>(&mut EofWithoutNotify, &mut a, TlsEof::Fails)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
