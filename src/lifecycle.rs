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

/// What one accepted client connection holds while it is open: its
/// `limits.max_connections` permit and its `portico_connections_active`
/// count. Shared, because an upgraded HTTP/1.1 stream (WebSocket) outlives
/// the HTTP connection that carried its handshake: the bridge task keeps a
/// clone, and both are given back when the last holder ends.
pub struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _active: crate::metrics::GaugeGuard,
}

impl ConnSlot {
    pub fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        active: metrics::Gauge,
    ) -> std::sync::Arc<ConnSlot> {
        std::sync::Arc::new(ConnSlot {
            _permit: permit,
            _active: crate::metrics::GaugeGuard::new(active),
        })
    }
}
