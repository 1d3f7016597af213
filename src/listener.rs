//! Bind, accept, connection limits, and the per-connection flow:
//! inbound PROXY header -> peek -> route -> pass | terminate | redirect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Action, Config, Listen};
use crate::hello::{self, PeekError, Peeked};
use crate::io::Prefixed;
use crate::metrics::{self as m, GaugeGuard};
use crate::proxy_protocol::{self, Outbound};
use crate::route::{self, Seen};
use crate::tunnel;

/// Everything a connection needs, swapped as a whole on reload so that a
/// connection sees one consistent generation from start to end.
pub struct Generation {
    pub config: Arc<Config>,
    pub terminate: crate::terminate::Sites,
}

/// State shared by all listeners for the life of the process.
pub struct Shared {
    pub current: ArcSwap<Generation>,
    /// `limits.max_connections`: one permit per open client connection.
    pub connections: Arc<Semaphore>,
    /// `limits.max_pending_hellos`: connections still in PROXY/ClientHello reading.
    pub pending_hellos: Arc<Semaphore>,
    /// Cancelled when the process begins shutting down.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: open streams are cut.
    pub hard_stop: CancellationToken,
    pub tasks: TaskTracker,
}

impl Shared {
    pub fn new(generation: Generation) -> Arc<Shared> {
        let limits = generation.config.limits;
        Arc::new(Shared {
            current: ArcSwap::from_pointee(generation),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            pending_hellos: Arc::new(Semaphore::new(limits.max_pending_hellos)),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }
}

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

/// Per-connection facts that later stages need.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The real client: from a trusted PROXY header, else the TCP peer.
    pub client: SocketAddr,
    /// The address the client connected to (PROXY destination when present).
    pub local: SocketAddr,
}

/// Accept until shutdown. The listener's settings come from the generation
/// current at each accept, looked up by address.
pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The configured address, as a label for metrics and logs.
    let label: Arc<str> = Arc::from(addr.to_string());
    let active_gauge = metrics::gauge!(m::CONNECTIONS_ACTIVE, "listener" => label.clone());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(listener = %label, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            metrics::counter!(m::CONNECTIONS_REFUSED, "listener" => label.clone(), "limit" => "max_connections").increment(1);
            reject(&label);
            debug!(listener = %label, %peer, "max_connections reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared2 = shared.clone();
        let label2 = label.clone();
        let gauge = active_gauge.clone();
        let span = tracing::debug_span!("conn", listener = %label, %peer);
        shared.tasks.spawn(
            async move {
                let _permit = permit;
                let _active = GaugeGuard::new(gauge);
                handle(stream, peer, addr, label2, shared2).await;
            }
            .instrument(span),
        );
    }
}

/// Count a connection closed before any route took it.
fn reject(listener: &Arc<str>) {
    metrics::counter!(m::CONNECTIONS, "listener" => listener.clone(), "route" => "none", "action" => "reject").increment(1);
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    label: Arc<str>,
    shared: Arc<Shared>,
) {
    let gen = shared.current.load_full();
    let cfg = &gen.config;
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let Some(listen) = cfg.listeners.iter().find(|l| l.addr == addr) else {
        // The listener was removed by a reload while this connection was queued.
        return;
    };
    let started = Instant::now();
    let deadline = cfg.timeouts.client_hello;

    let Ok(pending) = shared.pending_hellos.clone().try_acquire_owned() else {
        metrics::counter!(m::CONNECTIONS_REFUSED, "listener" => label.clone(), "limit" => "max_pending_hellos").increment(1);
        reject(&label);
        debug!("too many connections still sending their first bytes; closing");
        return;
    };
    let mut buf = BytesMut::with_capacity(2048);
    let mut info = ConnInfo {
        client: peer,
        local,
    };
    if listen.accept_proxy {
        let read = tokio::select! {
            r = inbound_proxy(&mut stream, &mut buf, listen, &mut info, cfg) => r,
            // Shutting down: nothing was asked of us yet, so nothing to drain.
            _ = shared.shutdown.cancelled() => return,
        };
        if let Err(reason) = read {
            metrics::counter!(m::PROXY_HEADER_FAILURES, "listener" => label.clone(), "reason" => reason).increment(1);
            reject(&label);
            return;
        }
    }

    let remaining = deadline.saturating_sub(started.elapsed());
    let peeked = tokio::select! {
        p = hello::peek(&mut stream, &mut buf, remaining) => p,
        // Like an idle keep-alive connection: no request yet, close at once.
        _ = shared.shutdown.cancelled() => {
            debug!(client = %info.client, "shutting down before the first bytes; closing");
            return;
        }
    };
    drop(pending);
    let peeked = match peeked {
        Ok(p) => Some(p),
        Err(PeekError::Silent(_)) if cfg.has_silent_route() => None,
        Err(e) => {
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
    // acme wiring: a TLS-ALPN-01 validation handshake for a name with a
    // pending challenge is answered here, before route matching.
    if let Some(Peeked::Tls(h)) = &peeked {
        if let Some(key) = crate::acme::tls_alpn_for(h.sni.as_deref(), &h.alpn) {
            let io = Prefixed::new(buf, stream);
            crate::acme::answer_tls_alpn(io, key, cfg.timeouts.tls_handshake).await;
            return;
        }
    }
    let seen = match &peeked {
        Some(p) => Seen::Peeked(p),
        None => Seen::Silent,
    };
    let Some(route) = route::decide(seen, &cfg.routes) else {
        metrics::counter!(m::CLIENT_HELLO_FAILURES, "reason" => "no_route").increment(1);
        reject(&label);
        debug!(client = %info.client, first = ?peeked, "no route matches; closing");
        return;
    };
    metrics::counter!(m::CONNECTIONS, "listener" => label.clone(), "route" => route.label.clone(), "action" => route.action.kind()).increment(1);

    let hello = match &peeked {
        Some(Peeked::Tls(h)) => Some(h),
        _ => None,
    };
    match &route.action {
        Action::Pass(backend) => {
            let out = Outbound {
                source: info.client,
                destination: info.local,
                sni: hello.and_then(|h| h.sni.as_deref()),
                alpn: hello.and_then(|h| h.alpn.first().map(Vec::as_slice)),
            };
            let job = tunnel::Job::new(
                backend,
                &out,
                &buf,
                &route.label,
                &cfg.timeouts,
                cfg.tunnel.splice,
            );
            drop(buf);
            tunnel::serve(
                tunnel::ClientSide::<TcpStream>::Tcp(stream),
                job,
                shared.hard_stop.cancelled(),
            )
            .await;
        }
        Action::Terminate(site) => {
            let prefixed = Prefixed::new(buf, stream);
            // Boxed: the TLS + HTTP state machine is several KiB; passthrough
            // connections should not carry (and copy) that space.
            Box::pin(crate::terminate::serve(
                prefixed,
                site,
                info,
                gen.clone(),
                shared.clone(),
            ))
            .await;
        }
        Action::Redirect => {
            let prefixed = Prefixed::new(buf, stream);
            Box::pin(crate::terminate::redirect(
                prefixed,
                info,
                gen.clone(),
                shared.clone(),
            ))
            .await;
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
