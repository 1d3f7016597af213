//! The running process: listeners, the admin endpoint, reload and shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Readiness};
use crate::config;
use crate::conn::Shared;
use crate::generation::Generation;
use crate::listener;
use crate::metrics as m;

/// Load and fully check a config: syntax, references and certificates
/// (see [`crate::generation::prepare`]).
pub use crate::generation::prepare;

struct Bound {
    stop: CancellationToken,
}

/// A running portico.
pub struct Server {
    shared: Arc<Shared>,
    listeners: BTreeMap<SocketAddr, Bound>,
    ready: Arc<Readiness>,
    /// The status page's view of the config (with the admin listener only).
    status: Option<Arc<crate::status::Status>>,
    /// Stops the ACME tasks of the current generation.
    acme: CancellationToken,
}

/// acme wiring: start a generation's ACME tasks (a child of `shutdown`, so
/// they stop with the process) and log certificate files close to expiry.
fn start_generation_tasks(cfg: &config::Config, shutdown: &CancellationToken) -> CancellationToken {
    for w in crate::tls::expiry_warnings(cfg) {
        warn!("{w}");
    }
    let stop = shutdown.child_token();
    crate::acme::start(cfg, stop.clone());
    stop
}

impl Server {
    /// Bind every listener and the admin socket; fails on the first address
    /// that cannot be bound, naming it.
    pub async fn start(
        generation: Generation,
        metrics: Option<PrometheusHandle>,
    ) -> anyhow::Result<Server> {
        let cfg = generation.config.clone();
        let shared = Shared::new(generation);
        let ready = Arc::new(Readiness::default());
        let mut server = Server {
            shared,
            listeners: BTreeMap::new(),
            ready: ready.clone(),
            status: None,
            acme: CancellationToken::new(),
        };
        for l in &cfg.listeners {
            server.open(l.addr)?;
        }
        // After binding: the CA may validate as soon as an order is placed.
        server.acme = start_generation_tasks(&cfg, &server.shared.life.shutdown);
        if let Some(handle) = metrics.clone() {
            // Histogram samples queue up in the recorder until upkeep folds
            // them into buckets: without it memory grows with every request.
            let stop = server.shared.life.shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => handle.run_upkeep(),
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        if let (Some(addr), Some(handle)) = (cfg.admin.metrics, metrics) {
            let sock =
                admin::bind(addr).with_context(|| format!("cannot bind admin.listen {addr}"))?;
            // The bound address: port 0 in the config gets a free port.
            let addr = sock.local_addr().unwrap_or(addr);
            info!(%addr, "metrics on http://{addr}/metrics, status page on http://{addr}/");
            crate::status::warn_if_exposed(addr, &cfg.admin);
            let status = crate::status::Status::new(handle.clone(), cfg.clone());
            server.status = Some(status.clone());
            tokio::spawn(admin::serve(
                sock,
                handle,
                ready.clone(),
                status,
                server.shared.life.shutdown.clone(),
            ));
        }
        ready.set(true);
        let _ = sd_notify::notify(&[NotifyState::Ready]);
        Ok(server)
    }

    fn open(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let sock =
            listener::bind(addr).with_context(|| format!("cannot bind listen address {addr}"))?;
        let stop = self.shared.life.shutdown.child_token();
        // The bound address (port 0 in the config gets a free port); the
        // configured one stays the listener's key for reloads.
        let bound = sock.local_addr().unwrap_or(addr);
        info!(addr = %bound, "listening");
        tokio::spawn(listener::accept_loop(
            sock,
            addr,
            self.shared.clone(),
            stop.clone(),
        ));
        self.listeners.insert(addr, Bound { stop });
        Ok(())
    }

    /// The generation new connections get.
    pub fn current(&self) -> Arc<Generation> {
        self.shared.current.load_full()
    }

    /// Re-read the config file and certificates. On any problem the old
    /// generation stays in force and the error is returned (and logged).
    pub fn reload(&mut self) -> Result<(), String> {
        let _ = sd_notify::notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
        ]);
        let result = self.try_reload();
        match &result {
            Ok(()) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
                info!("config reloaded");
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "error").increment(1);
                error!("reload failed, keeping the running config: {e}");
            }
        }
        if let Some(status) = &self.status {
            status.reloaded(match &result {
                Ok(()) => Ok(self.current().config.clone()),
                Err(e) => Err(e.as_str()),
            });
        }
        let _ = sd_notify::notify(&[NotifyState::Ready]);
        result
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let old = self.current();
        let Some(path) = old.config.path.clone() else {
            return Err("the embedded default has no file to re-read".into());
        };
        let cfg = config::load_file(&path).map_err(|e| e.to_string())?;
        let generation = prepare(cfg).map_err(|e| e.to_string())?;
        let wanted: Vec<SocketAddr> = generation.config.listeners.iter().map(|l| l.addr).collect();
        // Bind new sockets before publishing, so a bind failure changes nothing.
        let mut opened = Vec::new();
        for addr in &wanted {
            if !self.listeners.contains_key(addr) {
                if let Err(e) = self.open(*addr) {
                    for a in opened {
                        if let Some(b) = self.listeners.remove(&a) {
                            b.stop.cancel();
                        }
                    }
                    return Err(format!("{e:#}"));
                }
                opened.push(*addr);
            }
        }
        if generation.config.limits.max_connections != old.config.limits.max_connections {
            warn!("limits.max_connections changes take effect at restart");
        }
        let acme = start_generation_tasks(&generation.config, &self.shared.life.shutdown);
        std::mem::replace(&mut self.acme, acme).cancel();
        self.shared.current.store(Arc::new(generation));
        let removed: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in removed {
            if let Some(b) = self.listeners.remove(&addr) {
                info!(%addr, "listener closed by reload");
                b.stop.cancel();
            }
        }
        Ok(())
    }

    /// Stop accepting, let open connections finish for up to `grace`, then
    /// cut what is left.
    pub async fn shutdown(self) {
        let grace = self.current().config.shutdown_grace;
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        self.ready.set(false);
        self.shared.life.shutdown.cancel();
        self.shared.life.tasks.close();
        let open = self.shared.life.tasks.len();
        if open > 0 {
            info!(open, ?grace, "draining open connections");
        }
        if tokio::time::timeout(grace, self.shared.life.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.shared.life.tasks.len(),
                "grace period over; closing what is left"
            );
            self.shared.life.hard_stop.cancel();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.shared.life.tasks.wait(),
            )
            .await;
        }
    }
}

/// Run until SIGTERM/SIGINT; SIGHUP reloads.
pub async fn run(generation: Generation, metrics: Option<PrometheusHandle>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut server = Server::start(generation, metrics).await?;
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = server.reload(); }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }
    // A second SIGTERM/SIGINT during the drain cuts it short.
    let hard_stop = server.shared.life.hard_stop.clone();
    let drain = server.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            warn!("second signal: closing open connections now");
            hard_stop.cancel();
            drain.await;
        }
    }
    Ok(())
}
