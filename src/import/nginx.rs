//! Reading an nginx configuration: the files (with `include`, globs
//! included), parsed by `nginx-lint-parser` into one tree of directives,
//! each remembering the file and line it came from.
//!
//! `nginx-lint-parser` accepts any directive name (module directives too),
//! keeps line numbers and reports unclosed blocks, which is what an importer
//! needs; `nginx-config` was the other candidate but its typed grammar
//! rejects directives it does not model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nginx_lint_parser::ast::{ArgumentValue, ConfigItem};

use super::{At, ImportError, Origin};

/// How deep `include` may nest: nginx has no limit, but a file including
/// itself must end with an error rather than a stack overflow.
const MAX_INCLUDE_DEPTH: usize = 16;

/// One directive: `name args... ;` or `name args... { block }`.
#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub at: At,
    pub block: Option<Vec<Directive>>,
}

impl Directive {
    pub fn arg(&self, i: usize) -> &str {
        self.args.get(i).map(String::as_str).unwrap_or("")
    }

    /// `name arg1 arg2` as written, for messages and comments.
    pub fn text(&self) -> String {
        let mut out = self.name.clone();
        for a in &self.args {
            out.push(' ');
            if a.is_empty() || a.contains(char::is_whitespace) {
                out.push('\'');
                out.push_str(a);
                out.push('\'');
            } else {
                out.push_str(a);
            }
        }
        out
    }

    pub fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }
}

/// Read `path` and every file it includes.
pub fn load(path: &Path) -> Result<Vec<Directive>, ImportError> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let loader = Loader { base };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let origin = Arc::new(Origin {
        shown: path.display().to_string(),
        short: name,
    });
    loader.file(path, origin, 0)
}

struct Loader {
    /// Its directory: nginx resolves relative includes against the
    /// configuration prefix, which is where the main file lives.
    base: PathBuf,
}

impl Loader {
    fn file(
        &self,
        path: &Path,
        origin: Arc<Origin>,
        depth: usize,
    ) -> Result<Vec<Directive>, ImportError> {
        let text = std::fs::read_to_string(path).map_err(|e| ImportError::Read {
            file: origin.shown.clone(),
            source: e,
        })?;
        let (config, errors) = nginx_lint_parser::parse_string_with_errors(&text);
        if let Some(err) = errors.first() {
            if let Some(open) = unclosed_brace(&text) {
                let line = line_of(&text, open);
                let head = text.lines().nth(line - 1).unwrap_or("").trim();
                return Err(ImportError::Parse {
                    file: origin.shown.clone(),
                    line,
                    reason: format!(
                        "the block opened here ({head}) is not closed: a '}}' is missing"
                    ),
                });
            }
            return Err(ImportError::Parse {
                file: origin.shown.clone(),
                line: line_of(&text, err.offset),
                reason: err.message.trim().to_string(),
            });
        }
        self.items(&config.items, &origin, depth)
    }

    fn items(
        &self,
        items: &[ConfigItem],
        origin: &Arc<Origin>,
        depth: usize,
    ) -> Result<Vec<Directive>, ImportError> {
        let mut out = Vec::new();
        for item in items {
            let ConfigItem::Directive(d) = item else {
                continue;
            };
            let at = At {
                origin: origin.clone(),
                line: d.span.start.line,
            };
            // The parser splits `https://$host$request_uri` at each
            // variable; nginx sees one argument where no space separates them.
            let mut args: Vec<String> = Vec::new();
            let mut prev_end = None;
            for a in &d.args {
                let text = match &a.value {
                    ArgumentValue::QuotedString(s) | ArgumentValue::SingleQuotedString(s) => {
                        s.clone()
                    }
                    _ => a.raw.clone(),
                };
                match args.last_mut() {
                    Some(last) if prev_end == Some(a.span.start.offset) => last.push_str(&text),
                    _ => args.push(text),
                }
                prev_end = Some(a.span.end.offset);
            }
            if d.name == "include" && d.block.is_none() {
                out.extend(self.include(
                    args.first().map(String::as_str).unwrap_or(""),
                    &at,
                    depth,
                )?);
                continue;
            }
            let block = match &d.block {
                Some(b) => Some(self.items(&b.items, origin, depth)?),
                None => None,
            };
            out.push(Directive {
                name: d.name.clone(),
                args,
                at,
                block,
            });
        }
        Ok(out)
    }

    fn include(&self, pattern: &str, at: &At, depth: usize) -> Result<Vec<Directive>, ImportError> {
        let fail = |reason: String| ImportError::Parse {
            file: at.origin.shown.clone(),
            line: at.line,
            reason,
        };
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(fail(format!(
                "include {pattern}: includes nest deeper than {MAX_INCLUDE_DEPTH} files (does a file include itself?)"
            )));
        }
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            self.base.join(pattern)
        };
        let is_glob = pattern.contains(['*', '?', '[']);
        let mut files: Vec<PathBuf> = if is_glob {
            let text = full.to_string_lossy().into_owned();
            let paths = glob::glob(&text)
                .map_err(|e| fail(format!("include {pattern}: bad pattern: {e}")))?;
            // nginx includes glob matches in sorted order; unreadable entries are errors there too.
            let mut v = Vec::new();
            for p in paths {
                v.push(p.map_err(|e| fail(format!("include {pattern}: {e}")))?);
            }
            v
        } else {
            if !full.exists() {
                return Err(fail(format!(
                    "include {pattern}: no such file ({})",
                    full.display()
                )));
            }
            vec![full]
        };
        files.sort();
        let mut out = Vec::new();
        for f in files {
            let short = match f.strip_prefix(&self.base) {
                Ok(rel) => rel.display().to_string(),
                Err(_) => f.display().to_string(),
            };
            let origin = Arc::new(Origin {
                shown: f.display().to_string(),
                short,
            });
            out.extend(self.file(&f, origin, depth + 1)?);
        }
        Ok(out)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The offset of the outermost `{` that no `}` closes. The parser reports
/// an unclosed block at the end of the file; the line that opened it is
/// what a person needs. Its lexer skips braces in comments and strings.
fn unclosed_brace(text: &str) -> Option<usize> {
    use nginx_lint_parser::syntax_kind::SyntaxKind;
    let mut open = Vec::new();
    let mut offset = 0;
    for (kind, tok) in nginx_lint_parser::lexer_rowan::tokenize(text) {
        match kind {
            SyntaxKind::L_BRACE => open.push(offset),
            SyntaxKind::R_BRACE => {
                open.pop();
            }
            _ => {}
        }
        offset += tok.len();
    }
    open.first().copied()
}

/// One `listen` of a server block.
#[derive(Debug, Clone)]
pub struct Listen {
    pub at: At,
    pub addr: ListenAddr,
    pub ssl: bool,
    pub proxy_protocol: bool,
    pub default_server: bool,
    /// The directive as written, for comments.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host` is `None` for a bare port, `*` or a wildcard address.
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Unix(String),
}

impl ListenAddr {
    /// True for an address only this host can reach (loopback or a socket file).
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Unix(_) => true,
            ListenAddr::Tcp { host: Some(h), .. } => {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            ListenAddr::Tcp { host: None, .. } => false,
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            ListenAddr::Tcp { port, .. } => Some(*port),
            ListenAddr::Unix(_) => None,
        }
    }
}

/// `80`, `*:80`, `127.0.0.1:8003`, `[::]:443`, `unix:/run/nginx.sock`, `localhost`.
pub fn parse_listen_addr(s: &str) -> Option<ListenAddr> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Some(ListenAddr::Unix(p.to_string()));
    }
    if let Ok(port) = s.parse::<u16>() {
        return Some(ListenAddr::Tcp { host: None, port });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (h, p.parse::<u16>().ok()?),
        _ => (s, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let wildcard = host == "*"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
    Some(ListenAddr::Tcp {
        host: (!wildcard).then(|| host.to_string()),
        port,
    })
}

/// A `server { }` in `http { }`.
#[derive(Debug, Clone)]
pub struct Server {
    pub at: At,
    pub listens: Vec<Listen>,
    /// `server_name` values as written (may hold `_`, regexes, IPs).
    pub names: Vec<(String, At)>,
    pub block: Vec<Directive>,
}

impl Server {
    pub fn has_ssl(&self) -> bool {
        self.listens.iter().any(|l| l.ssl)
    }

    /// Does some location (or the server itself) proxy or answer requests?
    pub fn serves_requests(&self) -> bool {
        fn walk(ds: &[Directive]) -> bool {
            ds.iter()
                .any(|d| d.name == "proxy_pass" || (d.name == "location" && walk(d.children())))
        }
        walk(&self.block)
    }

    /// A server that only answers `return 301/302/307/308 https://...`.
    pub fn redirect_target(&self) -> Option<&Directive> {
        if self.block.iter().any(|d| d.name == "location") {
            return None;
        }
        self.block.iter().find(|d| {
            d.name == "return"
                && matches!(d.arg(0), "301" | "302" | "307" | "308")
                && d.arg(1).starts_with("https://")
        })
    }

    /// The names a TLS client would send as SNI for this server: exact
    /// names and `*.` wildcards (`.example.com` is both).
    pub fn sni_names(&self) -> (Vec<String>, Vec<(String, At)>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (n, at) in &self.names {
            if n == "_" || n.is_empty() || n == "\"\"" {
                continue;
            }
            if n.starts_with('~') || n.contains('$') {
                bad.push((n.clone(), at.clone()));
                continue;
            }
            let candidates: Vec<String> = match n.strip_prefix('.') {
                Some(rest) => vec![rest.to_string(), format!("*.{rest}")],
                None => vec![n.clone()],
            };
            for c in candidates {
                if crate::config::SniPattern::parse(&c).is_ok()
                    && c.parse::<std::net::IpAddr>().is_err()
                {
                    if !ok.contains(&c) {
                        ok.push(c);
                    }
                } else {
                    bad.push((n.clone(), at.clone()));
                }
            }
        }
        (ok, bad)
    }
}

/// An `upstream name { server ...; }` block.
#[derive(Debug, Clone)]
pub struct UpstreamBlock {
    pub at: At,
    pub name: String,
    pub servers: Vec<Directive>,
    pub keepalive: Option<usize>,
    pub other: Vec<Directive>,
}

/// `map $source $var { key value; ... }`.
#[derive(Debug, Clone)]
pub struct MapBlock {
    pub at: At,
    pub source: String,
    pub var: String,
    pub entries: Vec<Directive>,
}

/// A `server { }` in `stream { }`.
#[derive(Debug, Clone)]
pub struct StreamServer {
    pub at: At,
    pub listens: Vec<Listen>,
    pub block: Vec<Directive>,
}

/// The parts of an nginx config the importer converts; everything else
/// stays in `loose` (with its context) for the importer to report.
#[derive(Debug, Default)]
pub struct Model {
    pub servers: Vec<Server>,
    pub upstreams: Vec<UpstreamBlock>,
    pub maps: Vec<MapBlock>,
    pub stream_servers: Vec<StreamServer>,
    pub stream_upstreams: Vec<UpstreamBlock>,
    /// `http { }`-level directives servers inherit.
    pub http_level: Vec<Directive>,
    /// Directives outside `http`/`stream` blocks, and unknown blocks.
    pub loose: Vec<Directive>,
}

impl Model {
    pub fn upstream(&self, name: &str) -> Option<&UpstreamBlock> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

pub fn model(tree: Vec<Directive>) -> Model {
    let mut m = Model::default();
    for d in tree {
        match d.name.as_str() {
            "http" => {
                for c in d.block.unwrap_or_default() {
                    match c.name.as_str() {
                        "server" => m.servers.push(server(c)),
                        "upstream" => m.upstreams.push(upstream(c)),
                        "map" => m.maps.push(map(c)),
                        _ => m.http_level.push(c),
                    }
                }
            }
            "stream" => {
                for c in d.block.unwrap_or_default() {
                    match c.name.as_str() {
                        "server" => m.stream_servers.push(StreamServer {
                            at: c.at.clone(),
                            listens: listens(c.children()),
                            block: c.block.unwrap_or_default(),
                        }),
                        "upstream" => m.stream_upstreams.push(upstream(c)),
                        "map" => m.maps.push(map(c)),
                        _ => m.loose.push(c),
                    }
                }
            }
            // A file with bare server blocks (a conf.d snippet given directly).
            "server" => m.servers.push(server(d)),
            "upstream" => m.upstreams.push(upstream(d)),
            "map" => m.maps.push(map(d)),
            _ => m.loose.push(d),
        }
    }
    m
}

fn listens(block: &[Directive]) -> Vec<Listen> {
    block
        .iter()
        .filter(|d| d.name == "listen")
        .filter_map(|d| {
            let addr = parse_listen_addr(d.arg(0))?;
            let flags = &d.args[1..];
            Some(Listen {
                at: d.at.clone(),
                addr,
                ssl: flags.iter().any(|f| f == "ssl"),
                proxy_protocol: flags.iter().any(|f| f == "proxy_protocol"),
                default_server: flags
                    .iter()
                    .any(|f| f == "default_server" || f == "default"),
                text: d.text(),
            })
        })
        .collect()
}

fn server(d: Directive) -> Server {
    let block = d.block.unwrap_or_default();
    let names = block
        .iter()
        .filter(|c| c.name == "server_name")
        .flat_map(|c| c.args.iter().map(move |a| (a.clone(), c.at.clone())))
        .collect();
    Server {
        at: d.at,
        listens: listens(&block),
        names,
        block,
    }
}

fn upstream(d: Directive) -> UpstreamBlock {
    let name = d.arg(0).to_string();
    let mut u = UpstreamBlock {
        at: d.at.clone(),
        name,
        servers: Vec::new(),
        keepalive: None,
        other: Vec::new(),
    };
    for c in d.block.unwrap_or_default() {
        match c.name.as_str() {
            "server" => u.servers.push(c),
            "keepalive" => match c.arg(0).parse() {
                Ok(n) => u.keepalive = Some(n),
                Err(_) => u.other.push(c),
            },
            _ => u.other.push(c),
        }
    }
    u
}

fn map(d: Directive) -> MapBlock {
    MapBlock {
        at: d.at.clone(),
        source: d.arg(0).to_string(),
        var: d.arg(1).to_string(),
        entries: d.block.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr("80"),
            Some(ListenAddr::Tcp {
                host: None,
                port: 80
            })
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:8003"),
            Some(ListenAddr::Tcp {
                host: Some("127.0.0.1".into()),
                port: 8003
            })
        );
        assert_eq!(
            parse_listen_addr("[::]:443"),
            Some(ListenAddr::Tcp {
                host: None,
                port: 443
            })
        );
        assert_eq!(
            parse_listen_addr("*:443"),
            Some(ListenAddr::Tcp {
                host: None,
                port: 443
            })
        );
        assert_eq!(
            parse_listen_addr("unix:/run/a.sock"),
            Some(ListenAddr::Unix("/run/a.sock".into()))
        );
    }

    #[test]
    fn parses_maps_quoted_keys_and_unclosed_blocks() {
        let dir = std::env::temp_dir().join(format!("portico-import-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.conf");
        std::fs::write(
            &good,
            "http {\n  map $http_upgrade $connection_upgrade {\n    default upgrade;\n    \"\" close;\n  }\n  server { listen 80; }\n}\n",
        )
        .expect("write");
        let tree = load(&good).expect("parses");
        let m = model(tree);
        assert_eq!(m.maps.len(), 1);
        assert_eq!(m.maps[0].entries.len(), 2);
        assert_eq!(m.servers[0].at.line, 6);
        let bad = dir.join("bad.conf");
        std::fs::write(&bad, "http {\n  server {\n    listen 80;\n}\n").expect("write");
        let err = load(&bad).expect_err("unclosed").to_string();
        assert!(err.starts_with(&format!("{}:", bad.display())), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
