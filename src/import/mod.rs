//! `portico import`: an Xray JSON config and/or an nginx config in, a
//! commented portico config out, plus one [`Note`] per thing that was not
//! converted (or that portico does by default).
//!
//! The inputs are read by [`xray`] and [`nginx`]; [`emit`] holds the output
//! model and writes the TOML. This module joins the two inputs: an Xray
//! fallback (or an nginx `stream` SNI map entry) whose destination is an
//! nginx `listen` makes that server block a site portico terminates itself;
//! every other name stays with the tunnel server, passed through raw.
//!
//! It depends on nothing of the proxy runtime: only on [`crate::config`]'s
//! name checks, so what it writes is what `portico check` accepts.

pub mod emit;
mod nginx;
mod sites;
mod xray;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use emit::{Action, Plan, Route};

/// A file as messages (`shown`, as the user named it) and output comments
/// (`short`, relative to the main input's directory) call it.
#[derive(Debug)]
pub struct Origin {
    pub shown: String,
    pub short: String,
}

/// A place in an input file.
#[derive(Debug, Clone)]
pub struct At {
    pub origin: Arc<Origin>,
    pub line: usize,
}

impl At {
    /// `nginx.conf:42`, for comments in the output.
    pub fn short(&self) -> String {
        format!("{}:{}", self.origin.short, self.line)
    }
}

/// One line of the import's report: `FILE:LINE: what: why`.
#[derive(Debug, Clone)]
pub struct Note {
    pub at: At,
    pub what: String,
    pub why: String,
}

/// Long directives are cut in messages; the line number finds the rest.
const WHAT_MAX: usize = 70;

impl Note {
    /// Something portico's config does not express; the reason says what to do.
    pub fn unconverted(at: At, what: impl Into<String>, why: impl Into<String>) -> Note {
        Note {
            at,
            what: clip(what.into()),
            why: why.into(),
        }
    }

    /// Something nginx or Xray needed that portico does without being told.
    pub fn handled(at: At, what: impl Into<String>, why: &str) -> Note {
        Note {
            at,
            what: clip(what.into()),
            why: format!("handled by default: {why}"),
        }
    }

    pub fn is_handled(&self) -> bool {
        self.why.starts_with("handled by default")
    }
}

fn clip(mut s: String) -> String {
    if s.chars().count() > WHAT_MAX {
        s = s.chars().take(WHAT_MAX - 3).collect();
        s.push_str("...");
    }
    s
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.at.origin.shown, self.at.line, self.what, self.why
        )
    }
}

/// Why an input could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("nothing to import: give --xray FILE, --nginx FILE or both")]
    NoInput,
    #[error("{file}: cannot read it: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:1: nothing to convert: no server block, stream server, or Xray inbound on port 443 with tls or reality security")]
    Nothing {
        file: String,
        /// What was found and not converted: printed before the error.
        notes: Vec<Note>,
    },
    #[error("{file}:{line}: {reason}")]
    Parse {
        file: String,
        line: usize,
        reason: String,
    },
}

/// The result: the config text and the report lines.
#[derive(Debug)]
pub struct Imported {
    pub config: String,
    pub notes: Vec<Note>,
    /// Set when the written config would not load (an importer bug).
    pub invalid: Option<String>,
}

/// Where portico asks the tunnel server to listen from now on: loopback,
/// a port near 443 in spirit and rarely taken.
const TUNNEL_PORT: u16 = 10443;

/// Convert the given inputs.
pub fn import(
    xray_path: Option<&Path>,
    nginx_path: Option<&Path>,
) -> Result<Imported, ImportError> {
    if xray_path.is_none() && nginx_path.is_none() {
        return Err(ImportError::NoInput);
    }
    let mut notes = Vec::new();
    let inbounds = match xray_path {
        Some(p) => Some(xray::load(p, &mut notes)?),
        None => None,
    };
    let model = match nginx_path {
        Some(p) => Some(nginx::model(nginx::load(p)?)),
        None => None,
    };
    let empty = nginx::Model::default();
    let mut b = Builder::new(model.as_ref().unwrap_or(&empty), model.is_some(), notes);
    for p in [xray_path, nginx_path].into_iter().flatten() {
        b.plan.inputs.push(
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        );
    }
    b.http_level();
    if let Some(ibs) = &inbounds {
        b.xray(
            ibs,
            xray_path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
    }
    b.stream();
    b.remaining_servers();
    b.loose();
    let (plan, mut notes) = b.finish();
    if plan.routes.is_empty() {
        let file = [xray_path, nginx_path]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .next()
            .unwrap_or_default();
        notes.sort_by(|a, b| (&a.at.origin.shown, a.at.line).cmp(&(&b.at.origin.shown, b.at.line)));
        return Err(ImportError::Nothing { file, notes });
    }
    // File by file, top to bottom, as someone would work through them.
    notes.sort_by(|a, b| (&a.at.origin.shown, a.at.line).cmp(&(&b.at.origin.shown, b.at.line)));
    let config = plan.render();
    // What `portico check` will say about it (certificate files aside): an
    // importer that writes an invalid config must say so, not leave it to
    // the first start.
    let invalid = crate::config::load_str(&config, "the written config")
        .err()
        .map(|e| e.to_string());
    Ok(Imported {
        config,
        notes,
        invalid,
    })
}

/// `portico import`: the config to stdout or `-o`, one report line per
/// unconverted thing on stderr; exit 1 only when an input cannot be read.
pub fn cli(
    xray: Option<&Path>,
    nginx: Option<&Path>,
    output: Option<&Path>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let imported = match import(xray, nginx) {
        Ok(i) => i,
        Err(e) => {
            if let ImportError::Nothing { notes, .. } = &e {
                for note in notes {
                    eprintln!("{note}");
                }
            }
            // `FILE:LINE: reason`, like the report lines.
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for note in &imported.notes {
        eprintln!("{note}");
    }
    if let Some(e) = &imported.invalid {
        eprintln!("portico: warning: the written config does not load: {e}");
    }
    let written = match output {
        Some(p) => std::fs::write(p, &imported.config)
            .map_err(|e| format!("cannot write {}: {e}", p.display())),
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(imported.config.as_bytes())
                .map_err(|e| format!("cannot write the config: {e}"))
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What became of an nginx server block.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Use {
    Free,
    /// Served by this portico site.
    Site(usize),
    /// Reached only through the tunnel server, which keeps it.
    Kept,
}

/// The conversion state: the plan being built and the bookkeeping of names.
struct Builder<'a> {
    model: &'a nginx::Model,
    has_nginx: bool,
    notes: Vec<Note>,
    plan: Plan,
    uses: Vec<Use>,
    sni_routes: Vec<Route>,
    redirect: Option<Route>,
    catch_all: Option<Route>,
    claimed: BTreeMap<String, String>,
    listens: BTreeMap<String, String>,
    /// Upstream names by what they were made from (`block:NAME` or `url:URL`).
    upstream_keys: BTreeMap<String, String>,
    /// Longest proxy read/send timeout seen, seconds, and where.
    idle: Option<(u64, At)>,
    connect: Option<(u64, At)>,
}

impl<'a> Builder<'a> {
    fn new(model: &'a nginx::Model, has_nginx: bool, notes: Vec<Note>) -> Builder<'a> {
        Builder {
            model,
            has_nginx,
            notes,
            plan: Plan::default(),
            uses: vec![Use::Free; model.servers.len()],
            sni_routes: Vec::new(),
            redirect: None,
            catch_all: None,
            claimed: BTreeMap::new(),
            listens: BTreeMap::new(),
            upstream_keys: BTreeMap::new(),
            idle: None,
            connect: None,
        }
    }

    fn note(&mut self, n: Note) {
        self.notes.push(n);
    }

    fn listen(&mut self, addr: String, comment: String) {
        self.listens.entry(addr).or_insert(comment);
    }

    /// Add an SNI route unless another route already has each name.
    fn sni_route(&mut self, names: Vec<String>, at: &At, comment: Vec<String>, action: Action) {
        let target = match &action {
            Action::Pass(b) => format!("pass {b}"),
            Action::Terminate(s) => format!("site {s}"),
            Action::Redirect => "redirect".into(),
        };
        let mut kept = Vec::new();
        for n in names {
            if crate::config::SniPattern::parse(&n).is_err() {
                self.note(Note::unconverted(
                    at.clone(),
                    format!("name {n:?}"),
                    "not a host name portico can match as SNI",
                ));
                continue;
            }
            if let Some(prev) = self.claimed.get(&n) {
                self.note(Note::unconverted(
                    at.clone(),
                    format!("name {n}"),
                    format!("already routed ({prev}); the first one wins"),
                ));
                continue;
            }
            self.claimed.insert(n.clone(), target.clone());
            kept.push(n);
        }
        if kept.is_empty() {
            return;
        }
        self.sni_routes.push(Route {
            comment,
            sni: kept,
            protocol: None,
            action,
        });
    }

    /// The route for names nothing else matched; one is enough.
    fn catch_all(&mut self, at: &At, comment: Vec<String>, action: Action) {
        if let Some(prev) = &self.catch_all {
            let what = match &prev.action {
                Action::Pass(b) => format!("pass {b}"),
                Action::Terminate(s) => format!("site {s}"),
                Action::Redirect => "redirect".into(),
            };
            self.note(Note::unconverted(
                at.clone(),
                "default route",
                format!("connections without a more specific route already go to {what}"),
            ));
            return;
        }
        self.catch_all = Some(Route {
            comment,
            sni: Vec::new(),
            protocol: Some("tls"),
            action,
        });
    }

    fn finish(mut self) -> (Plan, Vec<Note>) {
        if let Some((secs, at)) = self.idle.clone() {
            if secs > 3600 {
                self.plan.timeouts.push((
                    "idle".into(),
                    format!("{secs}s"),
                    format!("{} longest proxy_read/send_timeout", at.short()),
                ));
            }
        }
        if let Some((secs, at)) = self.connect.clone() {
            if secs != 5 {
                self.plan.timeouts.push((
                    "upstream_connect".into(),
                    format!("{secs}s"),
                    format!("{} proxy_connect_timeout", at.short()),
                ));
            }
        }
        if self.listens.is_empty() {
            self.listens.insert(
                "0.0.0.0:443".into(),
                "portico's port: HTTPS and tunnels".into(),
            );
        }
        self.plan.listens = self
            .listens
            .iter()
            .map(|(a, c)| emit::Listen {
                addr: a.clone(),
                comment: c.clone(),
            })
            .collect();
        // Exact names before wildcards, as nginx's map and server_name
        // prefer them: a wildcard above an exact name would shadow it.
        let mut routes = std::mem::take(&mut self.sni_routes);
        routes.sort_by_key(|r| r.sni.iter().any(|n| n.starts_with("*.")));
        routes.extend(self.redirect.take());
        routes.extend(self.catch_all.take());
        self.plan.routes = routes;
        (self.plan, self.notes)
    }

    // ------------------------------------------------------------ Xray

    fn xray(&mut self, inbounds: &[xray::Inbound], file: String) {
        use xray::Security;
        let mut main = None;
        for ib in inbounds {
            let tunnel = matches!(ib.security, Security::Tls | Security::Reality);
            if tunnel && ib.port == Some(443) && main.is_none() {
                main = Some(ib);
                continue;
            }
            let why = if tunnel {
                format!(
                    "on port {}: only the inbound on 443 is converted; this one keeps its port, unchanged",
                    ib.port_text
                )
            } else {
                format!(
                    "on port {} without tls or reality security: not on portico's path, stays with Xray unchanged",
                    ib.port_text
                )
            };
            self.note(Note::unconverted(ib.at.clone(), ib.label(), why));
        }
        let Some(ib) = main else {
            let at = At {
                origin: Arc::new(Origin {
                    shown: file.clone(),
                    short: file,
                }),
                line: 1,
            };
            self.note(Note::unconverted(
                at,
                "inbounds",
                "no inbound on port 443 with tls or reality security: nothing from Xray to convert",
            ));
            return;
        };
        let listen_addr = match ib.listen.as_deref() {
            Some(h) if h.contains(':') => format!("[{h}]:443"),
            Some(h) if !h.is_empty() && h != "0.0.0.0" => format!("{h}:443"),
            _ => "0.0.0.0:443".into(),
        };
        self.listen(
            listen_addr,
            format!("{} {} listened here", ib.at.short(), ib.label()),
        );
        let base = ib
            .tag
            .as_deref()
            .map(sanitize)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "xray".into());
        let mut backends: BTreeMap<u8, String> = BTreeMap::new();
        let new_addr = format!("127.0.0.1:{TUNNEL_PORT}");
        let mut backend = |b: &mut Builder, v: u8, why: String| -> String {
            if let Some(n) = backends.get(&v) {
                return n.clone();
            }
            let name = if backends.is_empty() {
                base.clone()
            } else {
                format!("{base}-v{v}")
            };
            backends.insert(v, name.clone());
            b.plan.backends.push(emit::Backend {
                name: name.clone(),
                comment: vec![format!(
                    "{} {} ({}, {}) moved to {new_addr}; {why}",
                    ib.at.short(),
                    ib.label(),
                    ib.protocol,
                    if ib.security == Security::Reality {
                        "reality"
                    } else {
                        "tls"
                    },
                )],
                addr: new_addr.clone(),
                proxy_protocol: if v == 1 { "v1" } else { "v2" },
            });
            name
        };

        if ib.security == Security::Reality {
            let name = backend(
                self,
                2,
                "REALITY needs the client's own handshake: passed through raw".into(),
            );
            let names = ib.reality_names.clone();
            if !names.is_empty() {
                self.sni_route(
                    names,
                    &ib.at,
                    vec![format!(
                        "{} realitySettings.serverNames: REALITY names always pass through raw",
                        ib.at.short()
                    )],
                    Action::Pass(name.clone()),
                );
            }
            for f in &ib.fallbacks {
                if f.name.is_some() {
                    self.note(Note::unconverted(
                        f.at.clone(),
                        format!("fallback {}", fallback_text(f)),
                        "fallbacks of a REALITY inbound stay with Xray: portico cannot terminate REALITY names",
                    ));
                }
            }
            self.catch_all(
                &ib.at,
                vec![format!(
                    "{} everything else reached {} before, and still does",
                    ib.at.short(),
                    ib.label()
                )],
                Action::Pass(name),
            );
            self.plan.changes.push(format!(
                "Xray {} ({}): listen on 127.0.0.1 port {TUNNEL_PORT} instead of 443, and set \"acceptProxyProtocol\": true in its streamSettings.sockopt: portico passes connections to it with a PROXY v2 header carrying the client address.",
                ib.label(),
                ib.at.short()
            ));
            return;
        }

        // TLS inbound: fallbacks grouped by name, in the order they appear.
        let mut groups: Vec<(Option<String>, Vec<&xray::Fallback>)> = Vec::new();
        for f in &ib.fallbacks {
            match groups.iter_mut().find(|(n, _)| *n == f.name) {
                Some((_, v)) => v.push(f),
                None => groups.push((f.name.clone(), vec![f])),
            }
        }
        let cert = ib.certificates.first().cloned();
        if ib.certificates.len() > 1 {
            let (_, _, at) = &ib.certificates[1];
            self.note(Note::unconverted(
                at.clone(),
                "certificate",
                "only the first certificate of the inbound is used for the sites it fell back to; give each site its own cert/key",
            ));
        }
        let mut versions_used = Vec::new();
        for (name, group) in &groups {
            let first = group[0];
            let Some(name) = name else {
                // A fallback without a name applies to every name not listed;
                // portico cannot tell those from the tunnel's own clients.
                for f in group {
                    if let Some(i) = self.find_server(&f.dest, None) {
                        if self.model.servers[i].serves_requests() {
                            self.note(Note::unconverted(
                                f.at.clone(),
                                format!("fallback {}", fallback_text(f)),
                                format!(
                                    "a fallback without a name stays with Xray: portico cannot tell which names it serves from the tunnel's own (give it a \"name\" to have portico serve {} itself)",
                                    self.model.servers[i].at.short()
                                ),
                            ));
                        }
                        if self.uses[i] == Use::Free {
                            self.uses[i] = Use::Kept;
                        }
                    }
                }
                continue;
            };
            let matches: Vec<(usize, Option<usize>)> = group
                .iter()
                .enumerate()
                .map(|(k, f)| (k, self.find_server(&f.dest, Some(name))))
                .collect();
            let primary = matches
                .iter()
                .find(|(k, s)| s.is_some() && group[*k].alpn.is_none())
                .or_else(|| matches.iter().find(|(_, s)| s.is_some()))
                .and_then(|(_, s)| *s);
            let serving = primary.filter(|i| self.model.servers[*i].serves_requests());
            if let Some(si) = serving {
                // A site portico terminates: the h1 and h2 fallbacks merge.
                let dests: Vec<String> = group
                    .iter()
                    .map(|f| match &f.alpn {
                        Some(a) => format!("alpn {a} -> {}", f.dest_text),
                        None => format!("dest {}", f.dest_text),
                    })
                    .collect();
                for (k, s) in &matches {
                    if let Some(s) = s {
                        if *s != si {
                            self.note(Note::unconverted(
                                group[*k].at.clone(),
                                format!("fallback {}", fallback_text(group[*k])),
                                format!(
                                    "goes to a different server block ({}) than the name's other fallback ({}); portico serves the name from the latter",
                                    self.model.servers[*s].at.short(),
                                    self.model.servers[si].at.short()
                                ),
                            ));
                        }
                    }
                }
                let tls = cert.as_ref().map(|(c, k, at)| sites::TlsFiles {
                    cert: c.clone(),
                    key: k.clone(),
                    origin: format!("{} certificateFile", at.short()),
                });
                let site = self.site_for_server(si, tls);
                for f in group.iter().filter(|f| f.path.is_some()) {
                    self.path_fallback(&site, f);
                }
                let server = &self.model.servers[si];
                let listens: Vec<String> = server.listens.iter().map(|l| l.text.clone()).collect();
                self.sni_route(
                    vec![name.clone()],
                    &first.at,
                    vec![format!(
                        "{} fallback name {name:?} ({}) -> {} server ({}): portico terminates it now",
                        first.at.short(),
                        dests.join(", "),
                        server.at.short(),
                        listens.join("; ")
                    )],
                    Action::Terminate(site),
                );
                let lines: Vec<String> = group.iter().map(|f| f.at.short()).collect();
                self.plan.changes.push(format!(
                    "Xray fallbacks for {name} ({}) are no longer reached: portico terminates {name} itself; delete them.",
                    lines.join(", ")
                ));
                continue;
            }
            // A tunnel name: it stays with Xray.
            for (k, s) in &matches {
                let f = group[*k];
                match s {
                    None if self.has_nginx => self.note(Note::unconverted(
                        f.at.clone(),
                        format!("fallback {}", fallback_text(f)),
                        "dest matches no listen of a server in the nginx config: the name stays with Xray, passed through",
                    )),
                    Some(i) => {
                        if !self.model.servers[*i].serves_requests() {
                            self.note(Note::unconverted(
                                f.at.clone(),
                                format!("fallback {}", fallback_text(f)),
                                format!(
                                    "dest is the server at {}, which proxies nothing (a decoy site?): the name stays with Xray, passed through",
                                    self.model.servers[*i].at.short()
                                ),
                            ));
                        }
                        if self.uses[*i] == Use::Free {
                            self.uses[*i] = Use::Kept;
                        }
                    }
                    None => {}
                }
            }
            let v = group.iter().map(|f| f.xver).max().unwrap_or(0);
            let v = if v == 1 { 1 } else { 2 };
            let why = if group.iter().any(|f| f.xver > 0) {
                format!("PROXY v{v} as its fallbacks' xver asked")
            } else {
                "PROXY v2 (its fallbacks had xver 0; acceptProxyProtocol reads either version)"
                    .into()
            };
            let bname = backend(self, v, why);
            versions_used.push(v);
            let dests: Vec<String> = group
                .iter()
                .map(|f| {
                    let alpn = f
                        .alpn
                        .as_deref()
                        .map(|a| format!("alpn {a} "))
                        .unwrap_or_default();
                    format!("{alpn}dest {} xver {}", f.dest_text, f.xver)
                })
                .collect();
            self.sni_route(
                vec![name.clone()],
                &first.at,
                vec![format!(
                    "{} fallback name {name:?} ({}): the name stays with Xray, passed through raw",
                    first.at.short(),
                    dests.join(", ")
                )],
                Action::Pass(bname),
            );
        }
        if !self.has_nginx && groups.iter().any(|(n, _)| n.is_some()) {
            self.plan.changes.push(
                "Every fallback name stays with Xray: run the import again with --nginx to have portico serve the names whose fallbacks go to nginx itself.".into(),
            );
        }
        let v = versions_used.first().copied().unwrap_or(2);
        let why = "PROXY v2: Xray's acceptProxyProtocol reads either version".to_string();
        let bname = backend(self, v, why);
        self.catch_all(
            &ib.at,
            vec![format!(
                "{} everything else reached {} before, and still does",
                ib.at.short(),
                ib.label()
            )],
            Action::Pass(bname),
        );
        let vs: Vec<String> = backends.keys().map(|v| format!("v{v}")).collect();
        self.plan.changes.insert(0, format!(
            "Xray {} ({}): listen on 127.0.0.1 port {TUNNEL_PORT} instead of 443, and set \"acceptProxyProtocol\": true in its streamSettings.sockopt: portico passes the tunnel's connections to it with a PROXY {} header carrying the client address. Its certificate and other fallbacks stay as they are.",
            ib.label(),
            ib.at.short(),
            vs.join("/")
        ));
    }

    /// A fallback by path (an Xray WebSocket inbound, usually) of a name
    /// portico now terminates: a prefix location proxying to its dest,
    /// which portico reaches over plain HTTP (upgrades included).
    fn path_fallback(&mut self, site: &str, f: &xray::Fallback) {
        let Some(path) = f.path.clone().filter(|p| p.starts_with('/')) else {
            return;
        };
        let url = match &f.dest {
            xray::Dest::Tcp { host, port } if host.contains(':') => {
                format!("http://[{host}]:{port}")
            }
            xray::Dest::Tcp { host, port } => format!("http://{host}:{port}"),
            xray::Dest::Unix(p) if !p.starts_with('@') => format!("unix:{p}"),
            xray::Dest::Unix(_) => {
                self.note(Note::unconverted(
                    f.at.clone(),
                    format!("fallback {}", fallback_text(f)),
                    "abstract Unix sockets are not converted: give the inbound a socket file or a port",
                ));
                return;
            }
        };
        let Some(k) = self.plan.sites.iter().position(|s| s.name == site) else {
            return;
        };
        if self.plan.sites[k]
            .locations
            .iter()
            .any(|l| l.path == path && !l.exact)
        {
            self.note(Note::unconverted(
                f.at.clone(),
                format!("fallback {}", fallback_text(f)),
                "the nginx server already has a location for this path; it wins",
            ));
            return;
        }
        let upstream = self.upstream_named(
            format!("url:{url}"),
            &format!("fallback-{}", dest_label(&f.dest)),
            url,
            None,
            vec![format!("{} fallback {}", f.at.short(), fallback_text(f))],
        );
        self.plan.sites[k].locations.insert(
            0,
            emit::Location {
                comment: format!("{} fallback {}", f.at.short(), fallback_text(f)),
                path,
                exact: false,
                target: emit::Target::Upstream(upstream),
            },
        );
        if f.xver > 0 {
            self.note(Note::unconverted(
                f.at.clone(),
                format!("xver {}", f.xver),
                format!(
                    "portico sends no PROXY header to HTTP upstreams (X-Forwarded-For instead): turn acceptProxyProtocol off on the inbound at {}",
                    f.dest_text
                ),
            ));
        }
    }

    /// The server block a stream destination reaches: one with a matching
    /// `listen`, preferring one that names `name`, then `default_server`.
    fn find_server(&self, dest: &xray::Dest, name: Option<&str>) -> Option<usize> {
        let candidates: Vec<usize> = self
            .model
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.listens.iter().any(|l| listen_reaches(&l.addr, dest)))
            .map(|(i, _)| i)
            .collect();
        if let Some(n) = name {
            if let Some(i) = candidates.iter().find(|i| {
                let (names, _) = self.model.servers[**i].sni_names();
                names.iter().any(|m| {
                    crate::config::SniPattern::parse(m)
                        .is_ok_and(|p| p.matches(&n.to_ascii_lowercase()))
                })
            }) {
                return Some(*i);
            }
        }
        candidates
            .iter()
            .find(|i| {
                self.model.servers[**i]
                    .listens
                    .iter()
                    .any(|l| l.default_server && listen_reaches(&l.addr, dest))
            })
            .or(candidates.first())
            .copied()
    }

    // ------------------------------------------------------------ nginx stream

    fn stream(&mut self) {
        let model = self.model;
        for ss in &model.stream_servers {
            let mut pass_target: Option<&nginx::Directive> = None;
            let mut proxy_protocol = false;
            let mut preread = false;
            for d in &ss.block {
                match d.name.as_str() {
                    "listen" => {}
                    "proxy_pass" => pass_target = Some(d),
                    "proxy_protocol" => proxy_protocol = d.arg(0) == "on",
                    "ssl_preread" => preread = d.arg(0) == "on",
                    "proxy_timeout" | "proxy_connect_timeout" => self.note(Note::handled(
                        d.at.clone(),
                        d.text(),
                        "tunnels close after timeouts.idle (1h) without bytes; connects time out after timeouts.upstream_connect",
                    )),
                    _ => self.note(Note::unconverted(
                        d.at.clone(),
                        d.text(),
                        "not understood in a stream server by the importer",
                    )),
                }
            }
            for l in &ss.listens {
                if let nginx::ListenAddr::Tcp { host, port } = &l.addr {
                    let addr = match host {
                        Some(h) if h.contains(':') => format!("[{h}]:{port}"),
                        Some(h) => format!("{h}:{port}"),
                        None => format!("0.0.0.0:{port}"),
                    };
                    self.listen(addr, format!("{} stream {}", l.at.short(), l.text));
                    if l.proxy_protocol {
                        self.note(Note::unconverted(
                            l.at.clone(),
                            l.text.clone(),
                            "a PROXY header in front of nginx: set accept_proxy and trusted on this [[listen]] if something still sends one",
                        ));
                    }
                }
            }
            let Some(target) = pass_target else {
                self.note(Note::unconverted(
                    ss.at.clone(),
                    "stream server",
                    "no proxy_pass: nothing to convert",
                ));
                continue;
            };
            self.plan.changes.push(format!(
                "nginx stream server at {}: portico owns its port now; stop it (the backends it passed to keep their addresses).",
                ss.at.short()
            ));
            let version: u8 = if proxy_protocol { 1 } else { 0 };
            let arg = target.arg(0).to_string();
            if let Some(map) = model.maps.iter().find(|m| m.var == arg) {
                if map.source != "$ssl_preread_server_name" || !preread {
                    self.note(Note::unconverted(
                        target.at.clone(),
                        target.text(),
                        format!("the map at {} is not keyed by $ssl_preread_server_name with ssl_preread on: not converted", map.at.short()),
                    ));
                    continue;
                }
                for e in &map.entries {
                    let key = e.name.clone();
                    let value = e.arg(0).to_string();
                    match key.as_str() {
                        "hostnames" => continue,
                        "default" => self.stream_target(&value, None, version, e),
                        k if k.starts_with('~') => self.note(Note::unconverted(
                            e.at.clone(),
                            e.text(),
                            "regex server names are not converted: list the names (or *.wildcards) as sni",
                        )),
                        k => {
                            let names = match k.strip_prefix('.') {
                                Some(rest) => vec![rest.to_string(), format!("*.{rest}")],
                                None => vec![k.to_string()],
                            };
                            self.stream_target(&value, Some(names), version, e);
                        }
                    }
                }
            } else if arg.starts_with('$') {
                self.note(Note::unconverted(
                    target.at.clone(),
                    target.text(),
                    "proxy_pass to a variable without a map of it: not converted",
                ));
            } else {
                self.stream_target(&arg, None, version, target);
            }
        }
    }

    /// One SNI map entry (or the stream's only target): a pass route to the
    /// stream upstream's address, or, when that address is an nginx `ssl`
    /// server in this config, a site portico terminates.
    fn stream_target(
        &mut self,
        target: &str,
        names: Option<Vec<String>>,
        version: u8,
        at: &nginx::Directive,
    ) {
        let model = self.model;
        let (addr_text, origin) = match model.stream_upstreams.iter().find(|u| u.name == target) {
            Some(u) => {
                if u.servers.len() > 1 {
                    self.note(Note::unconverted(
                        u.servers[1].at.clone(),
                        u.servers[1].text(),
                        "load balancing is not converted: a backend has one address; the first server is used",
                    ));
                }
                match u.servers.first() {
                    Some(s) => (
                        s.arg(0).to_string(),
                        format!("{} upstream {}", u.at.short(), u.name),
                    ),
                    None => {
                        self.note(Note::unconverted(
                            u.at.clone(),
                            format!("upstream {}", u.name),
                            "no server in it",
                        ));
                        return;
                    }
                }
            }
            None => (target.to_string(), String::new()),
        };
        let dest = xray::parse_dest(addr_text.strip_prefix("unix:").unwrap_or(&addr_text));
        let Some(dest) = dest else {
            self.note(Note::unconverted(
                at.at.clone(),
                at.text(),
                format!("{addr_text:?} is not an address"),
            ));
            return;
        };
        let label = match &names {
            Some(n) => n.join(", "),
            None => "default".into(),
        };
        if let Some(si) = self.find_server(
            &dest,
            names.as_ref().and_then(|n| n.first()).map(String::as_str),
        ) {
            let server = &model.servers[si];
            if server.has_ssl() && server.serves_requests() {
                let site = self.site_for_server(si, None);
                let comment = vec![format!(
                    "{} stream SNI {label} -> {target} ({addr_text}) -> {} server: portico terminates it now",
                    at.at.short(),
                    server.at.short()
                )];
                match names {
                    Some(n) => self.sni_route(n, &at.at, comment, Action::Terminate(site)),
                    None => self.catch_all(&at.at, comment, Action::Terminate(site)),
                }
                return;
            }
        }
        let bname = sanitize(target);
        let bname = if bname.is_empty() {
            "backend".to_string()
        } else {
            bname
        };
        if !self.plan.backends.iter().any(|b| b.name == bname) {
            let mut comment = vec![format!("{} stream upstream for SNI {label}", at.at.short())];
            if !origin.is_empty() {
                comment = vec![origin.clone()];
            }
            self.plan.backends.push(emit::Backend {
                name: bname.clone(),
                comment,
                addr: match &dest {
                    xray::Dest::Tcp { host, port } if host.contains(':') => {
                        format!("[{host}]:{port}")
                    }
                    xray::Dest::Tcp { host, port } => format!("{host}:{port}"),
                    xray::Dest::Unix(p) => format!("unix:{p}"),
                },
                proxy_protocol: if version == 1 { "v1" } else { "none" },
            });
        }
        let comment = vec![format!(
            "{} stream SNI {label} -> {target}{}",
            at.at.short(),
            if version == 1 {
                " (proxy_protocol on)"
            } else {
                ""
            }
        )];
        match names {
            Some(n) => self.sni_route(n, &at.at, comment, Action::Pass(bname)),
            None => self.catch_all(&at.at, comment, Action::Pass(bname)),
        }
    }

    // ------------------------------------------------------------ nginx http

    fn remaining_servers(&mut self) {
        let model = self.model;
        let joined = !self.plan.backends.is_empty() || self.catch_all.is_some();
        for (i, server) in model.servers.iter().enumerate() {
            if self.uses[i] != Use::Free {
                continue;
            }
            if let Some(ret) = server.redirect_target() {
                let plain: Vec<&nginx::Listen> = server.listens.iter().filter(|l| !l.ssl).collect();
                if plain.is_empty() {
                    self.note(Note::unconverted(
                        ret.at.clone(),
                        ret.text(),
                        "a redirect on a TLS listener is not converted",
                    ));
                    continue;
                }
                let url = ret.arg(1);
                let host_part = url
                    .trim_start_matches("https://")
                    .split(['/', '$'])
                    .next()
                    .unwrap_or("");
                let same_host = url.starts_with("https://$host")
                    || url.starts_with("https://$server_name")
                    || url.starts_with("https://$http_host")
                    || server.names.iter().any(|(n, _)| n == host_part);
                if !same_host {
                    self.note(Note::unconverted(
                        ret.at.clone(),
                        ret.text(),
                        "a redirect to another host is not converted: portico redirects to https:// on the same host",
                    ));
                    continue;
                }
                for l in &plain {
                    if let Some(p) = l.addr.port() {
                        self.listen(
                            format!("0.0.0.0:{p}"),
                            format!("{} {}", l.at.short(), l.text),
                        );
                    }
                }
                self.note(Note::handled(
                    ret.at.clone(),
                    ret.text(),
                    "portico's redirect route answers plain HTTP with 308 https://host/path",
                ));
                let c = format!(
                    "{} server {}: {}",
                    server.at.short(),
                    names_text(server),
                    ret.text()
                );
                match &mut self.redirect {
                    Some(r) => r.comment.push(c),
                    None => {
                        self.redirect = Some(Route {
                            comment: vec![c],
                            sni: Vec::new(),
                            protocol: Some("http"),
                            action: Action::Redirect,
                        })
                    }
                }
                self.uses[i] = Use::Kept;
                continue;
            }
            if !server.serves_requests() {
                self.note(Note::unconverted(
                    server.at.clone(),
                    format!("server {}", names_text(server)),
                    "no proxy_pass or redirect in it (static files?): not converted",
                ));
                continue;
            }
            let local =
                !server.listens.is_empty() && server.listens.iter().all(|l| l.addr.is_local());
            if local && joined {
                self.note(Note::unconverted(
                    server.at.clone(),
                    format!("server {}", names_text(server)),
                    "listens on loopback only and no Xray fallback or stream route reaches it: not converted",
                ));
                continue;
            }
            let (names, bad) = server.sni_names();
            for (n, at) in bad {
                self.note(Note::unconverted(
                    at,
                    format!("server_name {n}"),
                    "not a host name portico can match as SNI (regexes and IP addresses are not converted)",
                ));
            }
            let site = self.site_for_server(i, None);
            let mut listens_text = Vec::new();
            for l in &server.listens {
                listens_text.push(l.text.clone());
                if l.ssl {
                    if let Some(p) = l.addr.port() {
                        self.listen(
                            format!("0.0.0.0:{p}"),
                            format!("{} {}", l.at.short(), l.text),
                        );
                    }
                } else {
                    self.listen(
                        "0.0.0.0:443".into(),
                        "portico's port: HTTPS and tunnels".into(),
                    );
                    self.note(Note::unconverted(
                        l.at.clone(),
                        l.text.clone(),
                        "plain-HTTP proxying is not converted: portico serves this site over TLS on port 443 instead",
                    ));
                    self.plan.changes.push(format!(
                        "Clients of the plain-HTTP server at {} ({}) now use https:// on port 443.",
                        server.at.short(),
                        l.text
                    ));
                }
            }
            let comment = vec![format!(
                "{} server {} ({})",
                server.at.short(),
                names_text(server),
                listens_text.join("; ")
            )];
            if names.is_empty() {
                self.catch_all(&server.at, comment, Action::Terminate(site));
            } else {
                self.sni_route(names, &server.at, comment, Action::Terminate(site));
            }
        }
    }

    /// Top-level directives: process settings, unknown blocks.
    fn loose(&mut self) {
        let model = self.model;
        for d in &model.loose {
            let n = sites::classify(d, self);
            if let Some(n) = n {
                self.note(n);
            }
        }
        for m in &model.maps {
            if m.source == "$http_upgrade" {
                self.note(Note::handled(
                    m.at.clone(),
                    format!("map {} {}", m.source, m.var),
                    "portico forwards WebSocket upgrades over HTTP/1.1 and h2",
                ));
            } else if m.source != "$ssl_preread_server_name"
                && !self
                    .plan
                    .sites
                    .iter()
                    .any(|s| s.cors.as_ref().is_some_and(|c| c.comment.contains(&m.var)))
            {
                self.note(Note::unconverted(
                    m.at.clone(),
                    format!("map {} {}", m.source, m.var),
                    "not converted: portico has no variables",
                ));
            }
        }
    }
}

/// Does a `listen` accept what a fallback/stream destination connects to?
fn listen_reaches(listen: &nginx::ListenAddr, dest: &xray::Dest) -> bool {
    fn loopback(h: &str) -> bool {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
    match (listen, dest) {
        (nginx::ListenAddr::Tcp { host, port }, xray::Dest::Tcp { host: dh, port: dp }) => {
            port == dp
                && match host {
                    None => true,
                    Some(h) => h == dh || (loopback(h) && loopback(dh)),
                }
        }
        (nginx::ListenAddr::Unix(p), xray::Dest::Unix(d)) => p == d,
        _ => false,
    }
}

fn dest_label(d: &xray::Dest) -> String {
    match d {
        xray::Dest::Tcp { port, .. } => port.to_string(),
        xray::Dest::Unix(p) => std::path::Path::new(p)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn fallback_text(f: &xray::Fallback) -> String {
    let mut parts = Vec::new();
    if let Some(n) = &f.name {
        parts.push(format!("name {n}"));
    }
    if let Some(a) = &f.alpn {
        parts.push(format!("alpn {a}"));
    }
    if let Some(p) = &f.path {
        parts.push(format!("path {p}"));
    }
    parts.push(format!("dest {}", f.dest_text));
    parts.join(" ")
}

fn names_text(s: &nginx::Server) -> String {
    if s.names.is_empty() {
        "(no server_name)".into()
    } else {
        s.names
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A config name from free text: letters, digits, `_`, `-`, `.`, at most 64.
fn sanitize(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    out.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixture(dir: &str, file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/import")
            .join(dir)
            .join(file)
    }

    /// Every fixture's output loads as a portico config (certificate files
    /// are checked by `prepare`, which the integration tests run).
    #[test]
    fn fixture_outputs_are_valid_configs() {
        let cases: [(&str, Option<&str>, &str); 4] = [
            ("cpa", Some("xray.json"), "nginx.conf"),
            ("ollama", None, "nginx.conf"),
            ("openwebui", None, "nginx.conf"),
            ("nginx-docs", None, "nginx.conf"),
        ];
        for (dir, xray, nginx) in cases {
            let x = xray.map(|f| fixture(dir, f));
            let n = fixture(dir, nginx);
            let out = import(x.as_deref(), Some(&n)).unwrap_or_else(|e| panic!("{dir}: {e}"));
            assert_eq!(out.invalid, None, "{dir}");
            let cfg = crate::config::load_str(&out.config, dir)
                .unwrap_or_else(|e| panic!("{dir}: {e}\n{}", out.config));
            assert!(!cfg.routes.is_empty(), "{dir}");
            for n in &out.notes {
                let line = n.to_string();
                assert!(!line.contains('\n'), "{line}");
            }
        }
    }

    #[test]
    fn cpa_layout_joins_fallback_pairs_into_one_site() {
        let out = import(
            Some(&fixture("cpa", "xray.json")),
            Some(&fixture("cpa", "nginx.conf")),
        )
        .expect("imports");
        let cfg = crate::config::load_str(&out.config, "cpa").expect("valid");
        let api = cfg.sites.get("api").expect("site api");
        assert_eq!(api.names.len(), 1);
        assert_eq!(api.locations.len(), 13);
        let terminating = cfg
            .routes
            .iter()
            .filter(|r| matches!(&r.action, crate::config::Action::Terminate(s) if s == "api"))
            .count();
        assert_eq!(terminating, 1, "the h1 and h2 fallbacks merge");
        let tunnel = cfg.backends.get("vless-in").expect("backend");
        assert_eq!(tunnel.proxy_protocol, crate::config::ProxyVersion::V1);
        assert_eq!(tunnel.addr.to_string(), "127.0.0.1:10443");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A scratch directory, removed when the test ends (pass or panic).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("portico-import-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        Scratch(d)
    }

    const NGINX_API: &str = "http {\n  server {\n    listen 127.0.0.1:8003;\n    server_name api.example.com;\n    location / { proxy_pass http://127.0.0.1:3000; }\n  }\n}\n";

    #[test]
    fn path_fallback_of_a_terminated_name_becomes_a_location() {
        let dir = temp("path");
        let x = write(
            &dir,
            "xray.json",
            r#"{"inbounds": [{"port": 443, "protocol": "vless",
              "settings": {"fallbacks": [
                {"name": "api.example.com", "dest": 8003},
                {"name": "api.example.com", "path": "/vlws", "dest": 1234, "xver": 1}
              ]},
              "streamSettings": {"security": "tls", "tlsSettings": {"certificates": [
                {"certificateFile": "/c.pem", "keyFile": "/k.pem"}]}}}]}"#,
        );
        let n = write(&dir, "nginx.conf", NGINX_API);
        let out = import(Some(&x), Some(&n)).expect("imports");
        let cfg = crate::config::load_str(&out.config, "t").expect("valid");
        let site = cfg.sites.get("api").expect("site");
        let ws = site
            .locations
            .iter()
            .find(|l| l.path == "/vlws")
            .expect("location");
        match &ws.target {
            crate::config::Target::Upstream(u) => assert_eq!(u.addr.to_string(), "127.0.0.1:1234"),
            other => panic!("{other:?}"),
        }
        assert!(
            out.notes
                .iter()
                .any(|n| n.what == "xver 1" && n.at.line == 4),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn reality_names_always_pass_through() {
        let dir = temp("reality");
        let x = write(
            &dir,
            "xray.json",
            r#"{"inbounds": [{"tag": "reality-in", "port": 443, "protocol": "vless",
              "settings": {"fallbacks": [{"name": "api.example.com", "dest": 8003}]},
              "streamSettings": {"security": "reality", "realitySettings": {
                "target": "www.example.org:443",
                "serverNames": ["www.example.org", "cdn.example.org"]}}}]}"#,
        );
        let n = write(&dir, "nginx.conf", NGINX_API);
        let out = import(Some(&x), Some(&n)).expect("imports");
        let cfg = crate::config::load_str(&out.config, "t").expect("valid");
        assert!(
            cfg.sites.is_empty(),
            "REALITY names are never terminated:\n{}",
            out.config
        );
        let first = &cfg.routes[0];
        assert_eq!(first.matcher.sni.len(), 2);
        assert!(
            matches!(&first.action, crate::config::Action::Pass(b) if &*b.name == "reality-in")
        );
        assert!(
            out.notes.iter().any(|n| n.why.contains("REALITY")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn handled_and_unconverted_notes_differ() {
        let dir = temp("notes");
        let n = write(
            &dir,
            "nginx.conf",
            "http {\n  server {\n    listen 443 ssl;\n    server_name a.example.com;\n    proxy_buffering off;\n    location ~ \\.php$ { proxy_pass http://127.0.0.1:9000; }\n    location / { proxy_pass http://127.0.0.1:3000/v2/; }\n    location /x/ { proxy_pass http://127.0.0.1:3000; }\n  }\n}\n",
        );
        let out = import(None, Some(&n)).expect("imports");
        let by_line = |l: usize| {
            out.notes
                .iter()
                .find(|n| n.at.line == l)
                .map(|n| n.to_string())
                .unwrap_or_default()
        };
        assert!(
            by_line(5).contains(": proxy_buffering off: handled by default: "),
            "{}",
            by_line(5)
        );
        assert!(
            by_line(6).contains("regex locations are not converted"),
            "{}",
            by_line(6)
        );
        assert!(by_line(7).contains("rewrites the path"), "{}", by_line(7));
        let handled: Vec<usize> = out
            .notes
            .iter()
            .filter(|n| n.is_handled())
            .map(|n| n.at.line)
            .collect();
        assert_eq!(handled, vec![5]);
        crate::config::load_str(&out.config, "t").expect("valid");
    }

    #[test]
    fn exact_names_route_before_wildcards() {
        let dir = temp("wild");
        let n = write(
            &dir,
            "nginx.conf",
            "stream {\n  map $ssl_preread_server_name $b {\n    .example.com wild;\n    api.example.com exact;\n  }\n  upstream wild { server 127.0.0.1:9001; }\n  upstream exact { server unix:/run/exact.sock; }\n  server { listen 443; ssl_preread on; proxy_pass $b; }\n}\n",
        );
        let out = import(None, Some(&n)).expect("imports");
        assert_eq!(out.invalid, None, "{}", out.config);
        let cfg = crate::config::load_str(&out.config, "t").expect("valid");
        assert_eq!(cfg.routes[0].matcher.sni[0].to_string(), "api.example.com");
        assert_eq!(
            cfg.backends["exact"].addr.to_string(),
            "unix:/run/exact.sock"
        );
    }

    #[test]
    fn unix_proxy_pass_urls() {
        let dir = temp("unix");
        let n = write(
            &dir,
            "nginx.conf",
            "server {\n  listen 443 ssl;\n  server_name a.example.com;\n  location / { proxy_pass http://unix:/run/app.sock:/; }\n}\n",
        );
        let out = import(None, Some(&n)).expect("imports");
        let cfg = crate::config::load_str(&out.config, "t").expect("valid");
        assert_eq!(cfg.upstreams["app"].addr.to_string(), "unix:/run/app.sock");
    }

    #[test]
    fn listen_matching() {
        let dest = xray::Dest::Tcp {
            host: "127.0.0.1".into(),
            port: 8003,
        };
        assert!(listen_reaches(
            &nginx::ListenAddr::Tcp {
                host: None,
                port: 8003
            },
            &dest
        ));
        assert!(listen_reaches(
            &nginx::ListenAddr::Tcp {
                host: Some("localhost".into()),
                port: 8003
            },
            &dest
        ));
        assert!(!listen_reaches(
            &nginx::ListenAddr::Tcp {
                host: None,
                port: 8004
            },
            &dest
        ));
        assert!(listen_reaches(
            &nginx::ListenAddr::Unix("/dev/shm/h1.sock".into()),
            &xray::Dest::Unix("/dev/shm/h1.sock".into())
        ));
    }
}
