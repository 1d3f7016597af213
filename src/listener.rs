//! Bind, accept and connection limits; each accepted connection goes to
//! [`conn::handle`](crate::conn::handle) in a task of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::conn::{self, Shared};
use crate::lifecycle::ConnSlot;
use crate::metrics as m;
use crate::proxy_protocol::ConnInfo;

/// Bind one listen socket: SO_REUSEADDR so restarts don't wait for TIME_WAIT,
/// IPV6_V6ONLY so `0.0.0.0:443` and `[::]:443` can both be listed.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs bursts of handshakes on a small machine.
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// After a failed accept (EMFILE and friends): log it and back off briefly
/// instead of spinning on a listener that stays readable.
pub async fn accept_failed(listener: &str, e: &std::io::Error) {
    warn!(listener, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Close a connection at accept because `limit` is reached, and count it.
fn refuse(stream: TcpStream, label: &Arc<str>, peer: SocketAddr, limit: &'static str) {
    metrics::counter!(m::CONNECTIONS_REFUSED, "listener" => label.clone(), "limit" => limit)
        .increment(1);
    conn::reject(label);
    debug!(listener = %label, %peer, limit, "connection limit reached; closing");
    drop(stream);
}

/// Accept until shutdown. The listener's settings come from the generation
/// current at each accept, looked up by address.
pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The bound address, as a label for metrics and logs (the configured
    // one, unless it asked for port 0).
    let bound = listener.local_addr().unwrap_or(addr);
    let label: Arc<str> = Arc::from(bound.to_string());
    // A connection accepted on a specific address has that address as its
    // local one: no getsockname(2) per connection (nginx skips it the same
    // way). Only a wildcard listener has to ask the kernel.
    let fixed_local = (!bound.ip().is_unspecified()).then_some(bound);
    let active_gauge = metrics::gauge!(m::CONNECTIONS_ACTIVE, "listener" => label.clone());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                accept_failed(&label, &e).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            refuse(stream, &label, peer, "max_connections");
            continue;
        };
        // Taken here, before the connection's task exists, so that a
        // connection counted in `portico_connections_active` always holds
        // its pending-hello permit already (no window between the two).
        let Ok(pending) = shared.pending_hellos.clone().try_acquire_owned() else {
            refuse(stream, &label, peer, "max_pending_hellos");
            continue;
        };
        let local = match fixed_local {
            Some(a) => a,
            None => match stream.local_addr() {
                Ok(a) => a,
                // The client is already gone.
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let shared2 = shared.clone();
        let label2 = label.clone();
        let gauge = active_gauge.clone();
        let span = tracing::debug_span!("conn", listener = %label, %peer);
        // Not wrapped in an `async` block: one would keep its own copy of
        // every argument for the connection's whole life.
        let slot = ConnSlot::new(permit, gauge);
        let info = ConnInfo {
            client: peer,
            local,
        };
        let conn = conn::handle(stream, info, addr, label2, shared2, slot, pending);
        shared.life.tasks.spawn(conn.instrument(span));
    }
}
