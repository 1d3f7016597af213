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
        };
        for l in &cfg.listeners {
            server.open(l.addr)?;
        }
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
                admin::bind(addr).with_context(|| format!("cannot bind admin.metrics {addr}"))?;
            info!(%addr, "metrics on http://{addr}/metrics");
            tokio::spawn(admin::serve(
                sock,
                handle,
                ready.clone(),
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
        info!(%addr, "listening");
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
