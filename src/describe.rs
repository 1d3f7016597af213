//! The human summary `portico check` prints: listeners, then the route
//! table and each site's locations. Reads the checked config; not part of it.

use crate::config::{Action, Config, MatchKind, Route, Target, WebSocketMode};

/// What a route does, as `portico check` and the status page word it.
pub fn action(cfg: &Config, r: &Route) -> String {
    match &r.action {
        Action::Pass(b) => format!(
            "pass {} -> {} (proxy {})",
            b.name,
            b.addr,
            b.proxy_protocol.as_str()
        ),
        Action::Terminate(s) => {
            let locs = cfg.sites.get(s).map_or(0, |s| s.locations.len());
            format!("terminate {s} ({locs} locations)")
        }
        Action::Redirect => "redirect 308 https://host/path".into(),
    }
}

/// The human summary `portico check` prints: listeners, then the route table.
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: ok ({} listeners, {} routes, {} backends, {} sites, {} upstreams)",
        cfg.source,
        cfg.listeners.len(),
        cfg.routes.len(),
        cfg.backends.len(),
        cfg.sites.len(),
        cfg.upstreams.len()
    );
    for l in &cfg.listeners {
        if l.accept_proxy {
            let trusted: Vec<String> = l.trusted.iter().map(|t| t.to_string()).collect();
            let _ = writeln!(
                out,
                "listen {}  (PROXY header from {})",
                l.addr,
                trusted.join(", ")
            );
        } else {
            let _ = writeln!(out, "listen {}", l.addr);
        }
    }
    if let Some(a) = cfg.admin.metrics {
        let _ = writeln!(out, "admin  http://{a}/metrics");
    }
    let rows: Vec<(String, String)> = cfg
        .routes
        .iter()
        .map(|r| {
            let mut m = vec![r.matcher.protocol.as_str().to_string()];
            if !r.matcher.sni.is_empty() {
                let s: Vec<String> = r.matcher.sni.iter().map(|p| p.to_string()).collect();
                m.push(format!("sni={}", s.join(",")));
            }
            if !r.matcher.alpn.is_empty() {
                let a: Vec<String> = r
                    .matcher
                    .alpn
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                m.push(format!("alpn={}", a.join(",")));
            }
            if r.matcher.take_silent {
                m.push("+silent".into());
            }
            (
                format!("route[{}]  {}", r.index, m.join(" ")),
                action(cfg, r),
            )
        })
        .collect();
    let width = rows.iter().map(|(a, _)| a.len()).max().unwrap_or(0);
    for (m, a) in rows {
        let _ = writeln!(out, "{m:width$}  -> {a}");
    }
    for site in cfg.sites.values() {
        for l in &site.locations {
            let target = match &l.target {
                Target::Upstream(u) => format!(
                    "upstream {} ({}){}",
                    u.name,
                    u.addr,
                    match l.websocket {
                        WebSocketMode::Auto { .. } => "",
                        WebSocketMode::On => " websocket=true",
                        WebSocketMode::Off => " websocket=false",
                    }
                ),
                Target::Respond { status, .. } => format!("respond {}", status.as_u16()),
            };
            let kind = match l.match_kind {
                MatchKind::Exact => "=",
                MatchKind::Prefix => "^",
            };
            let _ = writeln!(
                out,
                "site {}  {} {}  -> {}",
                site.name, kind, l.path, target
            );
        }
    }
    out
}
