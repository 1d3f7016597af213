//! The converted config as a plan, and its rendering as commented TOML.
//!
//! The TOML is written by hand rather than serialised: every table carries
//! comments saying where it came from, and serialisers drop comments.

use std::fmt::Write as _;

/// Everything the output config will contain, in output order.
#[derive(Debug, Default)]
pub struct Plan {
    /// Input files, as named on the command line.
    pub inputs: Vec<String>,
    /// Things to change outside portico, one per entry (wrapped as comments).
    pub changes: Vec<String>,
    /// `[timeouts]` keys: (key, value, comment).
    pub timeouts: Vec<(String, String, String)>,
    pub listens: Vec<Listen>,
    pub routes: Vec<Route>,
    pub backends: Vec<Backend>,
    pub sites: Vec<Site>,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub addr: String,
    pub comment: String,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub comment: Vec<String>,
    pub sni: Vec<String>,
    pub protocol: Option<&'static str>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pass(String),
    Terminate(String),
    Redirect,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub comment: Vec<String>,
    pub addr: String,
    pub proxy_protocol: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct Site {
    pub name: String,
    pub comment: Vec<String>,
    pub cert: String,
    pub key: Option<String>,
    pub cert_comment: String,
    /// (value, comment)
    pub max_body: Option<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub cors: Option<Cors>,
    pub locations: Vec<Location>,
}

#[derive(Debug, Clone, Default)]
pub struct Cors {
    pub comment: String,
    pub origins: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    pub credentials: bool,
    pub max_age: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Location {
    pub comment: String,
    pub path: String,
    pub exact: bool,
    pub target: Target,
}

#[derive(Debug, Clone)]
pub enum Target {
    Upstream(String),
    Respond { status: u16, body: String },
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub comment: Vec<String>,
    pub url: String,
    pub keepalive: Option<usize>,
}

/// A TOML basic string. Hand-written: the escapes are five lines, and the
/// serialiser would need a value tree for what is one string.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A table key: bare when TOML allows it, else quoted (names may hold dots).
pub fn key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        name.to_string()
    } else {
        quote(name)
    }
}

fn list(items: &[String]) -> String {
    let q: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", q.join(", "))
}

/// A comment line; embedded newlines would end the comment.
fn comment(out: &mut String, text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            let _ = writeln!(out, "# {line}");
        }
    }
}

/// Wrap `text` at about `width` columns for the header comments.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

impl Plan {
    pub fn render(&self) -> String {
        let mut out = String::new();
        comment(
            &mut out,
            &format!(
                "portico config written by `portico import` from {}.",
                self.inputs.join(" and ")
            ),
        );
        comment(
            &mut out,
            "Each table says where it came from (file:line). What was not converted\nwas printed by the import as FILE:LINE: what: why.",
        );
        if !self.changes.is_empty() {
            out.push_str("#\n");
            comment(
                &mut out,
                "Change elsewhere before starting portico (it now owns these ports):",
            );
            for c in &self.changes {
                let mut first = true;
                for l in wrap(c, 74) {
                    if first {
                        let _ = writeln!(out, "#   - {l}");
                        first = false;
                    } else {
                        let _ = writeln!(out, "#     {l}");
                    }
                }
            }
        }
        if !self.timeouts.is_empty() {
            out.push_str("\n[timeouts]\n");
            for (k, v, c) in &self.timeouts {
                let _ = writeln!(out, "{k} = {}    # {c}", quote(v));
            }
        }
        for l in &self.listens {
            out.push('\n');
            comment(&mut out, &l.comment);
            let _ = writeln!(out, "[[listen]]\naddr = {}", quote(&l.addr));
        }
        for r in &self.routes {
            out.push('\n');
            for c in &r.comment {
                comment(&mut out, c);
            }
            out.push_str("[[route]]\n");
            if let Some(p) = r.protocol {
                let _ = writeln!(out, "protocol = {}", quote(p));
            }
            if !r.sni.is_empty() {
                let _ = writeln!(out, "sni = {}", list(&r.sni));
            }
            match &r.action {
                Action::Pass(b) => {
                    let _ = writeln!(out, "pass = {}", quote(b));
                }
                Action::Terminate(s) => {
                    let _ = writeln!(out, "terminate = {}", quote(s));
                }
                Action::Redirect => out.push_str("redirect = \"https\"\n"),
            }
        }
        for b in &self.backends {
            out.push('\n');
            for c in &b.comment {
                comment(&mut out, c);
            }
            let _ = writeln!(
                out,
                "[backend.{}]\naddr = {}\nproxy_protocol = {}",
                key(&b.name),
                quote(&b.addr),
                quote(b.proxy_protocol)
            );
        }
        for s in &self.sites {
            self.render_site(&mut out, s);
        }
        for u in &self.upstreams {
            out.push('\n');
            for c in &u.comment {
                comment(&mut out, c);
            }
            let _ = writeln!(out, "[upstream.{}]\nurl = {}", key(&u.name), quote(&u.url));
            if let Some(k) = u.keepalive {
                let _ = writeln!(out, "keepalive = {k}");
            }
        }
        out
    }

    fn render_site(&self, out: &mut String, s: &Site) {
        out.push('\n');
        for c in &s.comment {
            comment(out, c);
        }
        let _ = writeln!(out, "[site.{}]", key(&s.name));
        if !s.cert_comment.is_empty() {
            comment(out, &s.cert_comment);
        }
        let _ = writeln!(out, "cert = {}", quote(&s.cert));
        if let Some(k) = &s.key {
            let _ = writeln!(out, "key = {}", quote(k));
        }
        if let Some((v, c)) = &s.max_body {
            let _ = writeln!(out, "max_body = {}    # {c}", quote(v));
        }
        if !s.headers.is_empty() {
            let pairs: Vec<String> = s
                .headers
                .iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            let _ = writeln!(out, "headers = {{ {} }}", pairs.join(", "));
        }
        if let Some(c) = &s.cors {
            comment(out, &c.comment);
            let mut parts = vec![format!("origins = {}", list(&c.origins))];
            if let Some(m) = &c.methods {
                parts.push(format!("methods = {}", list(m)));
            }
            if let Some(h) = &c.headers {
                parts.push(format!("headers = {}", list(h)));
            }
            if c.credentials {
                parts.push("credentials = true".into());
            }
            if let Some(a) = &c.max_age {
                parts.push(format!("max_age = {}", quote(a)));
            }
            let _ = writeln!(out, "cors = {{ {} }}", parts.join(", "));
        }
        for l in &s.locations {
            out.push('\n');
            comment(out, &l.comment);
            let _ = writeln!(
                out,
                "[[site.{}.location]]\npath = {}",
                key(&s.name),
                quote(&l.path)
            );
            if l.exact {
                out.push_str("match = \"exact\"\n");
            }
            match &l.target {
                Target::Upstream(u) => {
                    let _ = writeln!(out, "upstream = {}", quote(u));
                }
                Target::Respond { status, body } => {
                    let _ = writeln!(
                        out,
                        "respond = {{ status = {status}, body = {} }}",
                        quote(body)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote("x\u{1}"), "\"x\\u0001\"");
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
    }
}
