//! The process lifecycle every connection follows: one value, cloned into
//! whatever needs to stop, drain or be drained.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shutdown signal, hard stop and the tracker of open connections and
/// upgraded streams.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled when the process begins shutting down: stop accepting,
    /// finish what is in progress (GOAWAY, close after the response).
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: open streams are cut.
    pub hard_stop: CancellationToken,
    /// Every connection task and upgraded stream, waited for by the drain.
    pub tasks: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }
}
