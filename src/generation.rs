//! One config generation, prepared: the checked config, every terminated
//! site with its TLS acceptor and compiled HTTP side, every upstream pool,
//! and the route table with each route's action resolved. Connections load
//! the current generation once and see it whole from start to end; reload
//! swaps in a new one.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::{self, Config, ConfigError, Route};
use crate::http::site::SiteRuntime;
use crate::http::upstream::UpstreamClient;
use crate::terminate::TerminatedSite;

/// What a matched route does, with everything it needs already built.
pub enum Dispatch {
    Pass(Arc<crate::tunnel::Target>),
    Terminate(Arc<TerminatedSite>),
    Redirect,
}

/// A route of the table and its resolved action.
pub struct Routed {
    pub route: Route,
    pub dispatch: Dispatch,
    /// `portico_connections_total` for this route, per listener.
    pub connections: crate::metrics::ListenerCounters,
}

impl std::borrow::Borrow<Route> for Routed {
    fn borrow(&self) -> &Route {
        &self.route
    }
}

/// Everything a connection needs, swapped as a whole on reload so that a
/// connection sees one consistent generation from start to end.
pub struct Generation {
    pub config: Arc<Config>,
    /// `config.routes` in order, each with its action resolved.
    pub routes: Vec<Routed>,
}

/// Load every certificate, build every upstream pool and site, and resolve
/// every route. `portico check` and reload use exactly this, so they report
/// the same message. Errors name the key.
pub fn prepare(cfg: Config) -> Result<Generation, ConfigError> {
    let clients: BTreeMap<String, Arc<UpstreamClient>> = cfg
        .upstreams
        .iter()
        .map(|(name, u)| {
            let client = UpstreamClient::new(u.clone(), cfg.timeouts.upstream_connect);
            (name.clone(), Arc::new(client))
        })
        .collect();
    let mut sites: BTreeMap<&str, Arc<TerminatedSite>> = BTreeMap::new();
    for (name, site) in &cfg.sites {
        let tls = crate::tls::server_config(site).map_err(|e| ConfigError {
            source: cfg.source.clone(),
            key: format!("site.{name}.cert"),
            reason: e.to_string(),
        })?;
        let http = SiteRuntime::new(
            site.clone(),
            &clients,
            cfg.timeouts.idle,
            cfg.limits.max_uri_length,
        )
        .map_err(|reason| ConfigError {
            source: cfg.source.clone(),
            key: format!("site.{name}"),
            reason,
        })?;
        let entry = TerminatedSite::new(
            TlsAcceptor::from(tls),
            Arc::new(http),
            cfg.timeouts,
            cfg.limits,
        );
        sites.insert(name, Arc::new(entry));
    }
    let mut routes = Vec::with_capacity(cfg.routes.len());
    for route in &cfg.routes {
        let dispatch = match &route.action {
            config::Action::Pass(backend) => {
                Dispatch::Pass(Arc::new(crate::tunnel::Target::new(backend.clone())))
            }
            config::Action::Terminate(name) => match sites.get(name.as_str()) {
                Some(site) => Dispatch::Terminate(site.clone()),
                None => {
                    return Err(ConfigError {
                        source: cfg.source.clone(),
                        key: format!("route[{}].terminate", route.index),
                        reason: format!("no [site.{name}] is defined"),
                    })
                }
            },
            config::Action::Redirect => Dispatch::Redirect,
        };
        routes.push(Routed {
            route: route.clone(),
            dispatch,
            connections: Default::default(),
        });
    }
    crate::metrics::preregister(&cfg);
    Ok(Generation {
        config: Arc::new(cfg),
        routes,
    })
}
