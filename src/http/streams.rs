//! An h2 connection's streams run on the connection's own task.
//!
//! hyper hands each h2 stream (its request handler, then the pipe of its
//! response body) to the server's executor. Spawned as tasks of their own,
//! a stream and the connection that writes its frames ran on different
//! threads: the connection could write a response's HEADERS before the
//! stream, preempted, had queued the DATA that follows, even with the body
//! in hand. A client that acts on the head at once saw the stream reset
//! before the body: curl stops an upload when an error status arrives and
//! ends the stream short of its Content-Length, which h2 answers with
//! RST_STREAM(PROTOCOL_ERROR) and drops the queued DATA (curl exit 92 on an
//! upstream's early 401, about one run in twenty under load).
//!
//! Here the streams hyper hands over while the connection is polled are
//! kept in a set that the connection's own future polls, on the same
//! thread, between two polls of the connection: whatever a stream queues in
//! one poll (HEADERS and the DATA of a body already read) leaves in the
//! connection's next write, together. It also saves a task, and the
//! wake-ups across threads, per request. Written here because hyper only
//! comes with an executor that spawns (hyper-util's `TokioExecutor`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// True while a [`Streams`] polls its connection on this thread.
    static COLLECTING: Cell<bool> = const { Cell::new(false) };
    /// What hyper handed to [`ConnExecutor`] during that poll.
    static HANDED: RefCell<Vec<StreamFuture>> = const { RefCell::new(Vec::new()) };
}

/// The server's executor: a future handed over while a connection is being
/// polled joins that connection's [`Streams`]; any other (an upgraded h2
/// stream's pipe, handed over by a stream) becomes a task.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnExecutor;

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        if COLLECTING.get() {
            // A panicking stream ends alone (its stream is reset), as it
            // did as a task of its own, not with the whole connection.
            let fut = AssertUnwindSafe(fut).catch_unwind().map(|_| ());
            HANDED.with_borrow_mut(|h| h.push(Box::pin(fut)));
        } else {
            tokio::spawn(fut);
        }
    }
}

/// Marks this thread as collecting for one poll of a connection; cleared
/// on drop, so a panic inside the poll cannot leave it set, nor leave
/// streams behind for another connection to adopt.
struct Collecting;

impl Collecting {
    fn start() -> Self {
        COLLECTING.set(true);
        Collecting
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        COLLECTING.set(false);
        if std::thread::panicking() {
            // Taken out first: dropping a stream must not find the cell borrowed.
            let orphans = HANDED.with_borrow_mut(std::mem::take);
            drop(orphans);
        }
    }
}

/// One connection's streams. Created empty; the set itself is made on the
/// first stream, so HTTP/1.1 connections never allocate one.
#[derive(Default)]
pub struct Streams {
    set: Option<FuturesUnordered<StreamFuture>>,
}

impl Streams {
    /// Run `conn` with its streams until `conn` ends. Streams still running
    /// then are dropped with it: their connection is gone.
    pub fn drive<'a, C>(
        &'a mut self,
        mut conn: Pin<&'a mut C>,
    ) -> impl Future<Output = C::Output> + Send + 'a
    where
        C: Future + Send,
    {
        std::future::poll_fn(move |cx| self.poll(conn.as_mut(), cx))
    }

    fn poll<C: Future>(&mut self, mut conn: Pin<&mut C>, cx: &mut Context<'_>) -> Poll<C::Output> {
        // Streams first: what they queue goes out in the connection's poll.
        self.poll_set(cx);
        loop {
            let polled = {
                let _collecting = Collecting::start();
                conn.as_mut().poll(cx)
            };
            // Taken even when the connection ended in this poll (hyper can
            // hand over a stream and then fail the connection): none may
            // stay on the thread for another connection to adopt. They are
            // dropped with this set.
            let handed = self.take_handed();
            if polled.is_ready() {
                return polled;
            }
            if !handed {
                return Poll::Pending;
            }
            // New streams run to their first wait now; the frames they
            // queue leave in the connection's poll at the top of the loop.
            self.poll_set(cx);
        }
    }

    /// Moves what hyper handed over into the set; false when nothing was.
    fn take_handed(&mut self) -> bool {
        HANDED.with_borrow_mut(|handed| {
            if handed.is_empty() {
                return false;
            }
            let set = self.set.get_or_insert_with(FuturesUnordered::new);
            for fut in handed.drain(..) {
                set.push(fut);
            }
            true
        })
    }

    fn poll_set(&mut self, cx: &mut Context<'_>) {
        if let Some(set) = self.set.as_mut() {
            // Ready(None) is an empty set; Pending covers the rest (the set
            // also yields after polling each of its streams once).
            while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A "connection" that hands `streams` to the executor on its first
    /// poll, and ends once `until` streams have counted themselves in `ran`.
    struct FakeConn {
        streams: Vec<StreamFuture>,
        until: usize,
        ran: Arc<AtomicUsize>,
    }

    impl FakeConn {
        fn new(streams: Vec<StreamFuture>, until: usize, ran: &Arc<AtomicUsize>) -> Self {
            FakeConn {
                streams,
                until,
                ran: ran.clone(),
            }
        }
    }

    impl Future for FakeConn {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            let this = self.get_mut();
            for stream in this.streams.drain(..) {
                ConnExecutor.execute(stream);
            }
            let done = this.ran.load(Ordering::SeqCst);
            if done >= this.until {
                Poll::Ready(done)
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// A stream that waits once, then counts itself in `ran`.
    fn counting(ran: &Arc<AtomicUsize>) -> StreamFuture {
        let ran = ran.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            ran.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[tokio::test]
    async fn handed_streams_run_inside_the_connection_future() {
        let ran = Arc::new(AtomicUsize::new(0));
        let streams = (0..3).map(|_| counting(&ran)).collect();
        let mut conn = std::pin::pin!(FakeConn::new(streams, 3, &ran));
        let done = Streams::default().drive(conn.as_mut()).await;
        assert_eq!(done, 3);
        assert!(!COLLECTING.get(), "the mark is cleared after each poll");
    }

    /// The connection hands over a stream and ends in the same poll, as
    /// hyper's does when it fails right after accepting a stream.
    #[tokio::test]
    async fn streams_of_a_connection_that_ended_stay_with_it() {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut conn = std::pin::pin!(FakeConn::new(vec![counting(&ran)], 0, &ran));
        let mut streams = Streams::default();
        streams.drive(conn.as_mut()).await;
        assert!(
            HANDED.with_borrow(Vec::is_empty),
            "nothing left for another connection on this thread"
        );
        drop(streams);
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "dropped with the connection, not run"
        );
    }

    /// One stream panics; the other still runs and the connection ends
    /// normally.
    #[tokio::test]
    async fn a_panicking_stream_ends_alone() {
        let ran = Arc::new(AtomicUsize::new(0));
        let panics: StreamFuture =
            Box::pin(async { panic!("a stream's handler panicked (expected by this test)") });
        let mut conn = std::pin::pin!(FakeConn::new(vec![panics, counting(&ran)], 1, &ran));
        assert_eq!(Streams::default().drive(conn.as_mut()).await, 1);
    }

    #[tokio::test]
    async fn outside_a_connection_poll_futures_become_tasks() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ConnExecutor.execute(async move {
            let _ = tx.send(7);
        });
        assert_eq!(rx.await.ok(), Some(7));
    }
}
