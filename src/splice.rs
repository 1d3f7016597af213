//! Zero-copy passthrough with splice(2): socket -> pipe -> socket, so tunnel
//! bytes never enter user space. Written by hand because no maintained crate
//! drives splice on tokio sockets; `rustix` provides the safe syscall
//! wrappers (no `unsafe` here).
//!
//! Measured on loopback (see the README's benchmarks): splice cuts the CPU
//! per GiB passed to well under half of a 64 KiB userspace copy.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// Bytes moved per splice call; a pipe holds 64 KiB by default.
const CHUNK: usize = 64 * 1024;
/// A direction starts with plain read/write through this small buffer and
/// switches to splice once it has moved `SPLICE_AFTER` bytes: most tunnels
/// are short (a handshake and a few requests), and for them the two pipes
/// (four descriptors, six extra syscalls) would cost more than they save.
const SMALL_BUF: usize = 16 * 1024;
const SPLICE_AFTER: u64 = 256 * 1024;

/// A tokio socket whose fd we can splice, with tokio's readiness loop.
///
/// Poll-based rather than an `async fn` on purpose: a tunnel's two
/// directions sit in these waits for the tunnel's whole life, and a
/// `ready()` future (a waiter node, its arguments and the closure) costs
/// ~250 bytes in the tunnel's state per direction, where `poll_ready` keeps
/// the waker in the socket's own registration. Each (socket, direction)
/// pair is polled by one direction of one tunnel only, which is what
/// `poll_*_ready` requires.
pub trait Socket: AsFd {
    /// Poll until ready for `interest` (READABLE or WRITABLE), run `f`, and
    /// poll again while it answers `WouldBlock`. `f` also says whether it
    /// left the socket drained (a read shorter than asked): then the
    /// readiness is cleared as well, as tokio's own `poll_read` does, so the
    /// next read waits for the next event instead of costing a read(2) that
    /// finds nothing.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        f: &mut impl FnMut() -> io::Result<(R, bool)>,
    ) -> Poll<io::Result<R>>;
}

/// TCP and Unix streams have the same inherent `poll_*_ready` and `try_io`
/// but no common trait for them in tokio. `try_io` clears the readiness
/// only when `f` answers `WouldBlock`; a drained result is handed out
/// through `got` and reported to tokio as `WouldBlock`, so that it clears
/// the readiness too.
macro_rules! impl_socket {
    ($($t:ty),*) => {$(
        impl Socket for $t {
            fn poll_io<R>(
                &self,
                cx: &mut Context<'_>,
                interest: Interest,
                f: &mut impl FnMut() -> io::Result<(R, bool)>,
            ) -> Poll<io::Result<R>> {
                loop {
                    if interest.is_readable() {
                        ready!(self.poll_read_ready(cx))?;
                    } else {
                        ready!(self.poll_write_ready(cx))?;
                    }
                    let mut got = None;
                    let r = self.try_io(interest, || match f()? {
                        (r, true) => {
                            got = Some(r);
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        (r, false) => Ok(r),
                    });
                    match r {
                        Ok(r) => return Poll::Ready(Ok(r)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Some(r) = got {
                                return Poll::Ready(Ok(r));
                            }
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
    )*};
}

impl_socket!(TcpStream, UnixStream);

impl Socket for crate::dial::Stream {
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        f: &mut impl FnMut() -> io::Result<(R, bool)>,
    ) -> Poll<io::Result<R>> {
        match self {
            crate::dial::Stream::Tcp(s) => s.poll_io(cx, interest, f),
            crate::dial::Stream::Unix(s) => s.poll_io(cx, interest, f),
        }
    }
}

/// Wait for `s` to be ready for `interest` and run `f` (see
/// [`Socket::poll_io`]). A plain `fn` returning the `PollFn`: an `async fn`
/// would keep a second copy of its arguments in its state.
fn io<'a, S: Socket, R>(
    s: &'a S,
    interest: Interest,
    mut f: impl FnMut() -> io::Result<(R, bool)> + 'a,
) -> impl std::future::Future<Output = io::Result<R>> + 'a {
    std::future::poll_fn(move |cx| s.poll_io(cx, interest, &mut f))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).map_err(io::Error::from)
}

/// Move bytes from `src` to `dst` until `src` reaches EOF, then shut down
/// `dst`'s write half (propagating the half-close). `on_bytes` sees every
/// transfer (metrics, idle clock, totals). `ended` is shared by the two
/// directions of a tunnel: the direction that ends second skips the
/// shutdown, since both sockets are closed right after it (and `close`
/// sends the same FIN when every byte has been read).
///
/// A plain `fn` returning an `async move` block, like [`io`]: a tunnel's
/// two directions are held for its whole life.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn one_way<'a, S: Socket, D: Socket>(
    src: &'a S,
    dst: &'a D,
    ended: &'a AtomicBool,
    mut on_bytes: impl FnMut(u64) + 'a,
) -> impl std::future::Future<Output = io::Result<()>> + 'a {
    async move {
        let mut moved = 0u64;
        // Held only while data is flowing: an idle tunnel keeps no buffer.
        let mut buf: Vec<u8> = Vec::new();
        while moved < SPLICE_AFTER {
            let n = io(src, Interest::READABLE, || {
                if buf.capacity() == 0 {
                    // Uninitialised: the kernel fills it, no need to zero 16 KiB.
                    buf = Vec::with_capacity(SMALL_BUF);
                }
                buf.clear();
                let read = rustix::io::read(src.as_fd(), rustix::buffer::spare_capacity(&mut buf));
                if read == Err(rustix::io::Errno::AGAIN) {
                    // Nothing to read yet: the wait for readiness can be
                    // long (an idle tunnel), so do not hold 16 KiB over it.
                    buf = Vec::new();
                }
                let n = read.map_err(io::Error::from)?;
                // A short read took all the socket had: drained.
                Ok((n, n > 0 && n < buf.capacity()))
            })
            .await?;
            if n == 0 {
                return end(dst, ended);
            }
            let mut off = 0;
            while off < n {
                let m = io(dst, Interest::WRITABLE, || {
                    let m = rustix::io::write(dst.as_fd(), &buf[off..n])?;
                    Ok((m, false))
                })
                .await?;
                off += m;
                on_bytes(m as u64);
            }
            moved += n as u64;
            if n < SMALL_BUF {
                buf = Vec::new();
            }
        }
        drop(buf);

        let (pipe_r, pipe_w) = pipe()?;
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            // Fill the (empty) pipe from the source. A short splice does not
            // prove the socket drained (the pipe's slots can fill first), so
            // the readiness is left to a read that finds nothing.
            let n = io(src, Interest::READABLE, || {
                Ok((
                    splice(src.as_fd(), None, &pipe_w, None, CHUNK, flags)?,
                    false,
                ))
            })
            .await?;
            if n == 0 {
                return end(dst, ended);
            }
            // Drain the pipe into the destination.
            let mut left = n;
            while left > 0 {
                let m = io(dst, Interest::WRITABLE, || {
                    Ok((
                        splice(&pipe_r, None, dst.as_fd(), None, left, flags)?,
                        false,
                    ))
                })
                .await?;
                left -= m;
                on_bytes(m as u64);
            }
        }
    }
}

/// Propagate EOF: the peer's read side ends, the other direction stays
/// open. Not when the other direction has ended already: the tunnel closes
/// both sockets now.
fn end<D: Socket>(dst: &D, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    rustix::net::shutdown(dst.as_fd(), rustix::net::Shutdown::Write).map_err(io::Error::from)
}
