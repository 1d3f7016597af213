//! Streams that replay peeked bytes, and a meter for tunnel traffic.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

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
