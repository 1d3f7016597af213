//! Idle upstream HTTP/1.1 connections, kept for reuse.
//!
//! Written here rather than taken from hyper-util's pooled client, which
//! portico used before: that pool serves any number of origins, so every
//! request hashes its scheme and authority (SipHash) twice, checks out
//! through several nested futures and spawns a task per response to hand
//! the connection back. An upstream here has one address, so a list of
//! idle connections, freshest last, does the same job. Measured with
//! callgrind (bench/, README "Benchmarks"): about 5,000 instructions less
//! per proxied request, a tenth of portico's HTTP/1.1 request.
//!
//! A connection is handed back when its response body has ended (see
//! [`Reuse`]); one whose body was dropped early is closed by hyper and never
//! comes back. Idle connections are closed after `idle_timeout` by a reaper
//! task that runs only while the list is not empty.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

/// The idle connections of one upstream.
pub struct Pool<B> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    idle: Mutex<Idle<B>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle<B> {
    /// Oldest first: every connection is pushed at the end when handed back.
    list: Vec<(SendRequest<B>, Instant)>,
    reaping: bool,
}

impl<B: Send + 'static> Pool<B> {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Pool<B> {
        Pool {
            inner: Arc::new(Inner {
                idle: Mutex::new(Idle {
                    list: Vec::new(),
                    reaping: false,
                }),
                max_idle,
                idle_timeout,
            }),
        }
    }

    /// The most recently used connection that can take a request now.
    /// Closed and expired connections met on the way are dropped; one still
    /// finishing its previous exchange stays for later.
    pub fn checkout(&self) -> Option<SendRequest<B>> {
        let mut idle = self.inner.idle.lock().ok()?;
        let now = Instant::now();
        let mut busy = Vec::new();
        let mut found = None;
        while let Some((tx, since)) = idle.list.pop() {
            if since + self.inner.idle_timeout <= now {
                // The list is in age order: everything before it is older.
                idle.list.clear();
                break;
            }
            if tx.is_ready() {
                found = Some(tx);
                break;
            }
            if !tx.is_closed() {
                busy.push((tx, since));
            }
        }
        // Put the busy ones back where they were (they are the freshest).
        idle.list.extend(busy.into_iter().rev());
        found
    }

    /// A ticket that hands `tx` back to this pool.
    pub fn reuse(&self, tx: SendRequest<B>) -> Reuse<B> {
        Reuse {
            tx,
            pool: Arc::downgrade(&self.inner),
        }
    }
}

impl<B: Send + 'static> Inner<B> {
    fn put(self: &Arc<Self>, tx: SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.list.len() >= self.max_idle {
            return; // dropped: hyper closes the connection
        }
        idle.list.push((tx, Instant::now()));
        if !idle.reaping {
            idle.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Close each connection when it has been idle for the timeout; stop when
/// the list is empty (the next `put` starts a new reaper) or the pool is gone.
async fn reap<B>(pool: Weak<Inner<B>>) {
    loop {
        let next = {
            let Some(p) = pool.upgrade() else { return };
            let Ok(mut idle) = p.idle.lock() else { return };
            let now = Instant::now();
            let expired = idle
                .list
                .partition_point(|(_, since)| *since + p.idle_timeout <= now);
            idle.list.drain(..expired);
            idle.list.retain(|(tx, _)| !tx.is_closed());
            match idle.list.first() {
                Some((_, since)) => *since + p.idle_timeout,
                None => {
                    idle.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Hands a connection back to its pool once the response that used it has
/// ended ([`Reuse::give_back`]). Dropped unused, the connection is closed.
pub struct Reuse<B> {
    tx: SendRequest<B>,
    pool: Weak<Inner<B>>,
}

impl<B: Send + 'static> Reuse<B> {
    pub fn give_back(self) {
        if let Some(p) = self.pool.upgrade() {
            p.put(self.tx);
        }
    }
}
