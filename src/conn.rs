//! The per-connection flow, top to bottom: inbound PROXY header -> peek
//! the first bytes -> account failures -> `route::decide` -> dispatch to a
//! tunnel, a terminated site or the redirect server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

use crate::config::{Config, Listen};
use crate::generation::{Dispatch, Generation};
use crate::hello::{self, PeekError, Peeked};
use crate::io::Prefixed;
use crate::lifecycle::{ConnSlot, Lifecycle};
use crate::metrics as m;
use crate::proxy_protocol::{self, ConnInfo, Outbound};
use crate::route::{self, Seen};
use crate::tunnel;

/// State shared by all listeners and connections for the life of the process.
pub struct Shared {
    pub current: ArcSwap<Generation>,
    /// `limits.max_connections`: one permit per open client connection.
    pub connections: Arc<Semaphore>,
    /// `limits.max_pending_hellos`: connections still in PROXY/ClientHello reading.
    pub pending_hellos: Arc<Semaphore>,
    pub life: Lifecycle,
}

impl Shared {
    pub fn new(generation: Generation) -> Arc<Shared> {
        let limits = generation.config.limits;
        Arc::new(Shared {
            current: ArcSwap::from_pointee(generation),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            pending_hellos: Arc::new(Semaphore::new(limits.max_pending_hellos)),
            life: Lifecycle::new(),
        })
    }
}

/// Count a connection closed before any route took it.
pub fn reject(listener: &Arc<str>) {
    metrics::counter!(m::CONNECTIONS, "listener" => listener.clone(), "route" => "none", "action" => "reject").increment(1);
}

/// Serve one accepted connection on listener `addr` (labelled `label`) to its end.
/// `info` holds the TCP peer and the address it connected to.
///
/// This future is the connection's task for its whole life, and a task is
/// as large as its future's largest state, whichever path the connection
/// takes. So it is kept small (352 bytes in a release build): it is a plain
/// `fn` returning an `async move` block (an `async fn` keeps a second copy
/// of its arguments, rust-lang/rust#62958), and every await on a large
/// state (reading the PROXY header and the first bytes, the TLS handshake,
/// a tunnel, an HTTP connection) awaits a box that is freed when that part
/// is done.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its state"
)]
pub fn handle(
    mut stream: TcpStream,
    mut info: ConnInfo,
    addr: SocketAddr,
    label: Arc<str>,
    shared: Arc<Shared>,
    slot: Arc<ConnSlot>,
    // `limits.max_pending_hellos`: given back once the first bytes are read.
    pending: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let gen = shared.current.load_full();
        let cfg = &gen.config;
        let Some(listen) = cfg.listeners.iter().find(|l| l.addr == addr) else {
            // The listener was removed by a reload while this connection was queued.
            return;
        };
        let started = Instant::now();
        let deadline = cfg.timeouts.client_hello;

        let mut buf = BytesMut::with_capacity(2048);
        if listen.accept_proxy {
            let read = Box::pin(async {
                tokio::select! {
                    r = inbound_proxy(&mut stream, &mut buf, listen, &mut info, cfg) => Some(r),
                    // Shutting down: nothing was asked of us yet, so nothing to drain.
                    _ = shared.life.shutdown.cancelled() => None,
                }
            })
            .await;
            let Some(read) = read else { return };
            if let Err(reason) = read {
                metrics::counter!(m::PROXY_HEADER_FAILURES, "listener" => label.clone(), "reason" => reason).increment(1);
                reject(&label);
                return;
            }
        }

        let read = Box::pin(async {
            let remaining = deadline.saturating_sub(started.elapsed());
            tokio::select! {
                p = hello::peek(&mut stream, &mut buf, remaining) => Some(p),
                _ = shared.life.shutdown.cancelled() => None,
            }
        });
        let peeked = match read.await {
            // Like an idle keep-alive connection: no request yet, close at once.
            None => {
                debug!(client = %info.client, "shutting down before the first bytes; closing");
                return;
            }
            Some(Ok(p)) => Some(p),
            Some(Err(PeekError::Silent(_))) if cfg.has_silent_route() => None,
            Some(Err(e)) => {
                let reason = match &e {
                    PeekError::Silent(_) | PeekError::Timeout(..) => "timeout",
                    PeekError::Detect(hello::DetectError::TooLarge) => "too_large",
                    PeekError::Eof(0) | PeekError::Io(_) => {
                        // Port scanners and health checks that connect and leave: not a hello failure.
                        debug!(error = %e, "closed before sending anything");
                        reject(&label);
                        return;
                    }
                    _ => "malformed",
                };
                metrics::counter!(m::CLIENT_HELLO_FAILURES, "reason" => reason).increment(1);
                reject(&label);
                debug!(client = %info.client, error = %e, "closing before routing");
                return;
            }
        };
        drop(pending);
        // A TLS-ALPN-01 validation handshake for a name with a pending ACME
        // challenge is answered here, before route matching.
        if let Some(Peeked::Tls(h)) = &peeked {
            if let Some(key) = crate::acme::tls_alpn_for(h.sni.as_deref(), &h.alpn) {
                let io = Prefixed::new(buf, stream);
                // Boxed, like every path below that holds a large state: this
                // task's future is as large as its largest path, for the whole
                // life of every connection.
                Box::pin(crate::acme::answer_tls_alpn(
                    io,
                    key,
                    cfg.timeouts.tls_handshake,
                ))
                .await;
                return;
            }
        }
        let seen = match &peeked {
            Some(p) => Seen::Peeked(p),
            None => Seen::Silent,
        };
        let Some(routed) = route::decide(seen, &gen.routes) else {
            metrics::counter!(m::CLIENT_HELLO_FAILURES, "reason" => "no_route").increment(1);
            reject(&label);
            debug!(client = %info.client, first = ?peeked, "no route matches; closing");
            return;
        };
        let route = &routed.route;
        routed.connections.increment(&label, || {
            metrics::counter!(m::CONNECTIONS, "listener" => label.clone(), "route" => route.label.clone(), "action" => route.action.kind())
        });

        let hello = match &peeked {
            Some(Peeked::Tls(h)) => Some(h),
            _ => None,
        };
        match &routed.dispatch {
            Dispatch::Pass(target) => {
                // In a block of its own: a local still in scope at the await
                // below would keep its room in the task.
                let job = {
                    let out = Outbound {
                        source: info.client,
                        destination: info.local,
                        sni: hello.and_then(|h| h.sni.as_deref()),
                        alpn: hello.and_then(|h| h.alpn.first().map(Vec::as_slice)),
                    };
                    tunnel::Job::new(
                        target,
                        &out,
                        &buf,
                        &route.label,
                        &cfg.timeouts,
                        cfg.tunnel.splice,
                    )
                };
                // What the job needed from the first bytes is in it now; a
                // tunnel can stay open for hours.
                drop(buf);
                drop(peeked);
                // Boxed (1.2 KiB) so that terminated connections do not carry
                // the tunnel's room.
                Box::pin(tunnel::serve(
                    tunnel::ClientSide::<TcpStream>::Tcp(stream),
                    job,
                    &shared.life.hard_stop,
                ))
                .await;
            }
            Dispatch::Terminate(site) => {
                let prefixed = Prefixed::new(buf, stream);
                // The handshake's state (4.3 KiB) is boxed and freed once it is
                // done; what is served after it (192 bytes and hyper's own box,
                // see http::serve) is boxed too, so that tunnels do not carry
                // its room.
                let sni = hello.and_then(|h| h.sni.as_deref());
                let serving = Box::pin(crate::terminate::establish(
                    prefixed,
                    site,
                    info,
                    sni,
                    &shared.life,
                    slot,
                ))
                .await
                .map(Box::pin);
                if let Some(serving) = serving {
                    serving.await;
                }
            }
            Dispatch::Redirect => {
                let prefixed = Prefixed::new(buf, stream);
                Box::pin(crate::http::redirect::serve(
                    prefixed,
                    info.client,
                    cfg.timeouts.request_header,
                    &shared.life.shutdown,
                ))
                .await;
            }
        }
    }
}

/// Read the PROXY header a trusted front sends; `Err` holds the metric reason.
async fn inbound_proxy(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    listen: &Listen,
    info: &mut ConnInfo,
    cfg: &Config,
) -> Result<(), &'static str> {
    if !listen.is_trusted(info.client.ip()) {
        info!(peer = %info.client, "PROXY header expected from an untrusted peer; closing");
        return Err("untrusted");
    }
    match proxy_protocol::read_inbound(stream, buf, cfg.timeouts.client_hello).await {
        Ok(Some(carried)) => {
            info.client = carried.source;
            info.local = carried.destination;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            info!(peer = %info.client, error = %e, "bad PROXY header; closing");
            Err(e.reason())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Dispatch;
    use tokio::net::TcpListener;

    const PASS: &str = r#"
[[listen]]
addr = "127.0.0.1:9"
[[route]]
sni = ["tunnel.test"]
pass = "tunnel"
[backend.tunnel]
addr = "127.0.0.1:9"
proxy_protocol = "v2"
"#;

    /// A connected pair of sockets on loopback: (accepted, client).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    /// What an idle tunnel costs is mostly two states held for its whole
    /// life: the connection's task (as large as `handle`'s future) and the
    /// boxed tunnel. Both once carried copies of their arguments and the
    /// room of states they had left (1,208 and 2,040 bytes in a release
    /// build); M7 (bench/) measures the whole per tunnel. The bounds hold
    /// for test and release builds.
    #[tokio::test]
    async fn a_connection_task_and_an_idle_tunnel_keep_small_states() {
        let cfg = crate::config::load_str(PASS, "test.toml").unwrap();
        let shared = Shared::new(crate::generation::prepare(cfg).unwrap());
        let (stream, _client) = pair().await;
        let addr = stream.local_addr().unwrap();
        let peer = stream.peer_addr().unwrap();
        let info = ConnInfo {
            client: peer,
            local: addr,
        };
        let slot = ConnSlot::new(
            shared.connections.clone().try_acquire_owned().unwrap(),
            metrics::gauge!("test_active"),
        );
        let pending = shared.pending_hellos.clone().try_acquire_owned().unwrap();
        let conn = handle(
            stream,
            info,
            addr,
            "l".into(),
            shared.clone(),
            slot,
            pending,
        );
        let conn_size = std::mem::size_of_val(&conn);
        assert!(
            conn_size <= 512,
            "a connection's task holds {conn_size} bytes"
        );

        let gen = shared.current.load_full();
        let Dispatch::Pass(target) = &gen.routes[0].dispatch else {
            panic!("the route is not a pass route");
        };
        let out = Outbound {
            source: peer,
            destination: addr,
            sni: Some("tunnel.test"),
            alpn: None,
        };
        let job = tunnel::Job::new(target, &out, b"hello", "r", &gen.config.timeouts, true);
        let (stream, _client) = pair().await;
        let tunnel = tunnel::serve(
            tunnel::ClientSide::<TcpStream>::Tcp(stream),
            job,
            &shared.life.hard_stop,
        );
        let tunnel_size = std::mem::size_of_val(&tunnel);
        assert!(
            tunnel_size <= 1400,
            "an idle tunnel holds {tunnel_size} bytes"
        );
    }
}
