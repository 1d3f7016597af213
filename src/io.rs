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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

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
pub async fn idle_watchdog(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
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
    let a_to_b = async move {
        eof_is_end(tokio::io::copy(&mut ar, &mut bw).await)?;
        bw.shutdown().await
    };
    let b_to_a = async move {
        eof_is_end(tokio::io::copy(&mut br, &mut aw).await)?;
        aw.shutdown().await
    };
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

/// A TLS peer that closes without close_notify (most WebSocket clients do
/// after the close handshake) has ended its stream, not failed it.
fn eof_is_end(r: io::Result<u64>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
        _ => Ok(()),
    }
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
}
