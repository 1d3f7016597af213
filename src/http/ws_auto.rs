//! WebSocket helpers that sit beside the byte-for-byte bridge:
//!
//! - `websocket = "auto"`: an upstream that answers an upgrade with a 4xx
//!   (a relay without WebSocket support: 404, 405, ...) makes the client get
//!   426 instead, which clients such as the Codex CLI take as "use plain
//!   HTTP" at once (they retry other statuses for seconds). The refusal is
//!   remembered per location (each location has one upstream) for
//!   `websocket_recheck`, so later upgrades get 426 without a round trip; a
//!   101 clears it. A config reload builds new locations and so forgets.
//! - every 426 names the protocol it wants (`Upgrade: websocket`, RFC 9110
//!   section 15.5.22) on HTTP/1.1; h2 has no `Upgrade` header (connection-
//!   specific fields are malformed there, RFC 9113 section 8.2.2).
//! - the response clock behind `portico_websocket_response_seconds`: from a
//!   client-to-upstream data message to the upstream's next data message,
//!   fed by the frame tracker as frame headers pass (no payload is copied).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

/// Process-wide origin for the atomics below (0 means "unset").
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since [`base`], never 0.
fn now_ns() -> u64 {
    (base().elapsed().as_nanos() as u64).max(1)
}

/// A location's memory of its upstream refusing WebSocket upgrades.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Until when (ns since [`base`]) upgrades get 426 at once; 0 = never.
    until: AtomicU64,
}

impl Refusals {
    /// True while a refusal is remembered.
    pub fn active(&self) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        until != 0 && now_ns() < until
    }

    /// Remember a refusal for `recheck`.
    pub fn remember(&self, recheck: Duration) {
        let until = now_ns().saturating_add(recheck.as_nanos().min(u64::MAX as u128) as u64);
        self.until.store(until, Ordering::Relaxed);
    }

    /// The upstream accepted an upgrade: forget any refusal.
    pub fn clear(&self) {
        self.until.store(0, Ordering::Relaxed);
    }
}

/// Does this answer to an upgrade mean "no WebSocket here"? Client errors
/// do (404, 405, 400 ...); 5xx and others are the upstream's trouble and
/// pass through as they are.
pub fn is_refusal(status: StatusCode) -> bool {
    status.is_client_error()
}

/// Make `resp` a proper 426: `Upgrade: websocket` (HTTP/1.1 only) and a
/// closing connection, as the WebSocket-disabled answer always had.
pub fn mark_upgrade_required<B>(resp: &mut Response<B>, h2: bool) {
    *resp.status_mut() = StatusCode::UPGRADE_REQUIRED;
    if !h2 {
        let h = resp.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, close"),
        );
    }
}

/// Which way a bridged WebSocket's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

/// Times WebSocket turns on one connection: from a client data message
/// (when its last frame has passed) to the start of the upstream's next
/// data message. Shared by the two directions of the bridge.
#[derive(Debug)]
pub struct TurnClock {
    /// When the unanswered client message ended (ns since [`base`]); 0 = none.
    pending: AtomicU64,
    histogram: metrics::Histogram,
    /// Every turn's time, for the access log's median and max.
    samples: Mutex<Vec<f32>>,
}

/// What the access log says about a session's turns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnSummary {
    pub turns: usize,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// At most this many samples are kept per connection for the log line's
/// median (the histogram counts every turn).
const MAX_SAMPLES: usize = 65_536;

impl TurnClock {
    pub fn new(histogram: metrics::Histogram) -> TurnClock {
        TurnClock {
            pending: AtomicU64::new(0),
            histogram,
            samples: Mutex::new(Vec::new()),
        }
    }

    /// A client data message has fully passed towards the upstream. The
    /// first unanswered one starts the clock.
    pub fn client_message(&self) {
        let _ = self
            .pending
            .compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The upstream began a data message: a pending turn is answered.
    pub fn upstream_message(&self) {
        let started = self.pending.swap(0, Ordering::Relaxed);
        if started == 0 {
            return;
        }
        let secs = now_ns().saturating_sub(started) as f64 / 1e9;
        self.histogram.record(secs);
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < MAX_SAMPLES {
                s.push(secs as f32);
            }
        }
    }

    pub fn summary(&self) -> Option<TurnSummary> {
        let mut s = self.samples.lock().ok()?.clone();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f32::total_cmp);
        Some(TurnSummary {
            turns: s.len(),
            median_ms: f64::from(s[s.len() / 2]) * 1e3,
            max_ms: f64::from(s[s.len() - 1]) * 1e3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_remembered_until_it_expires_or_clears() {
        let r = Refusals::default();
        assert!(!r.active());
        r.remember(Duration::from_secs(600));
        assert!(r.active());
        r.clear();
        assert!(!r.active());
        r.remember(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!r.active(), "an expired refusal asks the upstream again");
    }

    #[test]
    fn only_client_errors_are_refusals() {
        assert!(is_refusal(StatusCode::NOT_FOUND));
        assert!(is_refusal(StatusCode::METHOD_NOT_ALLOWED));
        assert!(!is_refusal(StatusCode::BAD_GATEWAY));
        assert!(!is_refusal(StatusCode::OK));
    }

    #[test]
    fn upgrade_required_names_websocket_on_http1_only() {
        let mut r = Response::new(());
        mark_upgrade_required(&mut r, false);
        assert_eq!(r.status(), 426);
        assert_eq!(r.headers()[header::UPGRADE], "websocket");
        let mut r = Response::new(());
        mark_upgrade_required(&mut r, true);
        assert_eq!(r.status(), 426);
        assert!(r.headers().get(header::UPGRADE).is_none());
    }

    #[test]
    fn turns_pair_a_client_message_with_the_next_upstream_one() {
        let c = TurnClock::new(metrics::Histogram::noop());
        c.upstream_message(); // unsolicited: not a turn
        assert_eq!(c.summary(), None);
        c.client_message();
        c.client_message(); // still the first one's turn
        std::thread::sleep(Duration::from_millis(2));
        c.upstream_message();
        c.upstream_message(); // a second upstream message is no new turn
        let s = c.summary().expect("one turn");
        assert_eq!(s.turns, 1);
        assert!(s.median_ms >= 2.0 && s.max_ms >= s.median_ms, "{s:?}");
    }
}
