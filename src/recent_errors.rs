//! The last [`CAPACITY`] failures, newest first, for the status page.
//!
//! Fed only where a failure is already being handled (an HTTP exchange that
//! ends with an error or a 5xx, a passthrough backend that cannot be
//! reached), so requests that succeed never touch it. Like the metrics
//! recorder it is process-wide, and any module may record into it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// How many failures are kept.
pub const CAPACITY: usize = 100;

/// One failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentError {
    pub at: SystemTime,
    /// `upstream`, `internal`, `stream` or `backend`.
    pub kind: &'static str,
    pub site: Option<Arc<str>>,
    pub location: Option<Arc<str>>,
    pub status: Option<u16>,
    pub error: String,
}

static RING: Mutex<VecDeque<RecentError>> = Mutex::new(VecDeque::new());
/// Failures recorded since start; lets a watcher tell whether anything is new.
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Longest message kept, in bytes: request paths come from clients (up to
/// `limits.max_uri_length`), and the ring should stay small.
pub const MAX_MESSAGE: usize = 512;

/// Remember a failure, dropping the oldest beyond [`CAPACITY`].
pub fn record(mut e: RecentError) {
    if e.error.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !e.error.is_char_boundary(cut) {
            cut -= 1;
        }
        e.error.truncate(cut);
        e.error.push_str("...");
    }
    // A poisoned lock only means another thread panicked mid-push; the
    // ring itself is still a valid VecDeque.
    let mut ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    if ring.len() == CAPACITY {
        ring.pop_back();
    }
    ring.push_front(e);
    TOTAL.fetch_add(1, Ordering::Relaxed);
}

/// The kept failures, newest first.
pub fn snapshot() -> Vec<RecentError> {
    let ring = RING.lock().unwrap_or_else(|p| p.into_inner());
    ring.iter().cloned().collect()
}

/// How many failures were recorded since start (kept or not).
pub fn total() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// Whether an HTTP exchange that ended with `status` (and an error message
/// when portico noticed one) is kept, and as which kind. Server-side
/// failures only: 5xx answers (`upstream`, or `internal` for portico's own
/// 500), and streams that broke after a 1xx/2xx/3xx head (`stream`: an
/// upstream body cut mid-way, a WebSocket that ended abnormally). Client errors (4xx, and 499 for a client that left)
/// are counted in the metrics but not kept, so a scanner probing paths
/// cannot push the failures that matter out of the ring.
pub fn http_kind(status: u16, has_error: bool) -> Option<&'static str> {
    match status {
        500 if has_error => Some("internal"),
        s if s >= 500 => Some("upstream"),
        s if s < 400 && has_error => Some("stream"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_hundred_newest_first() {
        let before = total();
        for i in 0..(CAPACITY + 20) {
            record(RecentError {
                at: SystemTime::now(),
                kind: "upstream",
                site: None,
                location: None,
                status: Some(502),
                error: format!("e{i}"),
            });
        }
        let all = snapshot();
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].error, format!("e{}", CAPACITY + 19));
        assert_eq!(all[CAPACITY - 1].error, "e20");
        assert!(total() >= before + CAPACITY as u64 + 20);
        // (One test: the ring is process-wide, parallel tests would race.)
        record(RecentError {
            at: SystemTime::now(),
            kind: "upstream",
            site: None,
            location: None,
            status: Some(502),
            error: format!("GET /{}", "\u{e9}".repeat(2000)),
        });
        let e = &snapshot()[0];
        assert!(
            e.error.len() <= MAX_MESSAGE + 3 && e.error.ends_with("..."),
            "{}",
            e.error.len()
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(http_kind(502, true), Some("upstream"));
        assert_eq!(http_kind(504, true), Some("upstream"));
        assert_eq!(http_kind(503, false), Some("upstream"));
        assert_eq!(http_kind(500, true), Some("internal"));
        assert_eq!(http_kind(500, false), Some("upstream"));
        assert_eq!(http_kind(200, true), Some("stream"));
        assert_eq!(http_kind(101, true), Some("stream"));
        assert_eq!(http_kind(200, false), None);
        assert_eq!(http_kind(499, true), None);
        assert_eq!(http_kind(404, true), None);
    }
}
