//! Reading an Xray JSON config: the inbounds, their fallbacks, certificate
//! files and REALITY server names, each with the line it is on.
//!
//! Xray allows comments in its JSON; `jsonc-parser` reads them and keeps
//! byte ranges on every node, so messages can name the line of a fallback.

use std::path::Path;
use std::sync::Arc;

use jsonc_parser::ast::{Object, Value};
use jsonc_parser::common::Ranged;

use super::{At, ImportError, Note, Origin};

/// An Xray inbound, reduced to what the importer uses.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub at: At,
    pub tag: Option<String>,
    pub protocol: String,
    pub listen: Option<String>,
    /// `None` when the port is not a single number (a range or an env reference).
    pub port: Option<u16>,
    pub port_text: String,
    pub security: Security,
    pub fallbacks: Vec<Fallback>,
    /// `(certificateFile, keyFile, line)` of `tlsSettings.certificates`.
    pub certificates: Vec<(String, String, At)>,
    pub reality_names: Vec<String>,
}

impl Inbound {
    /// How messages name it: the tag, else protocol and port.
    pub fn label(&self) -> String {
        match &self.tag {
            Some(t) => format!("inbound {t:?}"),
            None => format!("{} inbound on port {}", self.protocol, self.port_text),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    None,
    Tls,
    Reality,
    Other,
}

/// One entry of `settings.fallbacks`.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub at: At,
    pub name: Option<String>,
    pub alpn: Option<String>,
    pub path: Option<String>,
    pub dest: Dest,
    pub dest_text: String,
    pub xver: u8,
}

/// Where a fallback sends the decrypted stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Tcp { host: String, port: u16 },
    Unix(String),
}

pub fn load(path: &Path, notes: &mut Vec<Note>) -> Result<Vec<Inbound>, ImportError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ImportError::Read {
        file: shown.clone(),
        source: e,
    })?;
    let short = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone());
    let origin = Arc::new(Origin { shown, short });
    parse(&text, origin, notes)
}

/// Xray's reader takes comments and otherwise strict JSON.
fn options() -> jsonc_parser::ParseOptions {
    jsonc_parser::ParseOptions {
        allow_comments: true,
        allow_loose_object_property_names: false,
        allow_trailing_commas: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    }
}

pub fn parse(
    text: &str,
    origin: Arc<Origin>,
    notes: &mut Vec<Note>,
) -> Result<Vec<Inbound>, ImportError> {
    let parsed =
        jsonc_parser::parse_to_ast(text, &Default::default(), &options()).map_err(|e| {
            ImportError::Parse {
                file: origin.shown.clone(),
                line: e.line_display(),
                reason: format!("{} (column {})", e.kind(), e.column_display()),
            }
        })?;
    let at = |offset: usize| At {
        origin: origin.clone(),
        line: line_of(text, offset),
    };
    let Some(Value::Object(root)) = parsed.value else {
        return Err(ImportError::Parse {
            file: origin.shown.clone(),
            line: 1,
            reason: "not an Xray config: the top level must be a JSON object".into(),
        });
    };
    let Some(inbounds) = root.get_array("inbounds") else {
        return Err(ImportError::Parse {
            file: origin.shown.clone(),
            line: line_of(text, root.range.start),
            reason: "no \"inbounds\" array: nothing to import".into(),
        });
    };
    let mut out = Vec::new();
    for v in &inbounds.elements {
        let Value::Object(ib) = v else {
            notes.push(Note::unconverted(
                at(v.start()),
                "inbound",
                "not a JSON object",
            ));
            continue;
        };
        out.push(inbound(ib, &at, notes));
    }
    Ok(out)
}

fn string(o: &Object, key: &str) -> Option<String> {
    o.get_string(key).map(|s| s.value.to_string())
}

/// A number or a numeric string, as Xray accepts both for ports and xver.
fn number_text(o: &Object, key: &str) -> Option<String> {
    match o.get(key).map(|p| &p.value) {
        Some(Value::NumberLit(n)) => Some(n.value.to_string()),
        Some(Value::StringLit(s)) => Some(s.value.to_string()),
        _ => None,
    }
}

fn inbound(ib: &Object, at: &impl Fn(usize) -> At, notes: &mut Vec<Note>) -> Inbound {
    let here = at(ib.range.start);
    let port_text = number_text(ib, "port").unwrap_or_default();
    let stream = ib.get_object("streamSettings");
    let security = match stream.and_then(|s| string(s, "security")).as_deref() {
        None | Some("none") | Some("") => Security::None,
        Some("tls") => Security::Tls,
        Some("reality") => Security::Reality,
        Some(_) => Security::Other,
    };
    let mut certificates = Vec::new();
    let mut reality_names = Vec::new();
    if let Some(s) = stream {
        if let Some(certs) = s
            .get_object("tlsSettings")
            .and_then(|t| t.get_array("certificates"))
        {
            for c in &certs.elements {
                let Value::Object(c) = c else { continue };
                match (string(c, "certificateFile"), string(c, "keyFile")) {
                    (Some(cert), Some(key)) => certificates.push((cert, key, at(c.range.start))),
                    _ => notes.push(Note::unconverted(
                        at(c.range.start),
                        "certificate",
                        "inline certificates are not converted: portico reads certificate files (write it to a file and name it in cert/key)",
                    )),
                }
            }
        }
        if let Some(names) = s
            .get_object("realitySettings")
            .and_then(|r| r.get_array("serverNames"))
        {
            for n in &names.elements {
                if let Value::StringLit(n) = n {
                    if !n.value.is_empty() {
                        reality_names.push(n.value.to_string());
                    }
                }
            }
        }
    }
    let mut fallbacks = Vec::new();
    if let Some(fbs) = ib
        .get_object("settings")
        .and_then(|s| s.get_array("fallbacks"))
    {
        for f in &fbs.elements {
            let Value::Object(f) = f else { continue };
            let fat = at(f.range.start);
            let dest_text = number_text(f, "dest").unwrap_or_default();
            let Some(dest) = parse_dest(&dest_text) else {
                notes.push(Note::unconverted(
                    fat,
                    format!("fallback dest {dest_text:?}"),
                    "not a port, address or Unix socket path",
                ));
                continue;
            };
            let xver = number_text(f, "xver")
                .and_then(|x| x.parse::<u8>().ok())
                .unwrap_or(0);
            fallbacks.push(Fallback {
                at: fat,
                name: string(f, "name").filter(|n| !n.is_empty()),
                alpn: string(f, "alpn").filter(|n| !n.is_empty()),
                path: string(f, "path").filter(|n| !n.is_empty()),
                dest,
                dest_text,
                xver,
            });
        }
    }
    Inbound {
        at: here,
        tag: string(ib, "tag"),
        protocol: string(ib, "protocol").unwrap_or_default(),
        listen: string(ib, "listen"),
        port: port_text.parse().ok(),
        port_text,
        security,
        fallbacks,
        certificates,
        reality_names,
    }
}

/// `80`, `"80"`, `"127.0.0.1:8003"`, `"[::1]:8003"`, `"/dev/shm/h1.sock"`, `"@abstract"`.
pub fn parse_dest(s: &str) -> Option<Dest> {
    if let Ok(port) = s.parse::<u16>() {
        return Some(Dest::Tcp {
            host: "127.0.0.1".into(),
            port,
        });
    }
    if s.starts_with('/') || s.starts_with('@') {
        return Some(Dest::Unix(s.to_string()));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(Dest::Tcp {
        host: host.to_string(),
        port,
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            shown: "x.json".into(),
            short: "x.json".into(),
        })
    }

    #[test]
    fn comments_and_lines() {
        let text = "// top\n{\n \"inbounds\": [\n  /* one */ {\n   \"port\": 443, \"protocol\": \"vless\",\n   \"settings\": {\"fallbacks\": [\n     {\"name\": \"a.example\", \"dest\": 8003, \"xver\": 1}\n   ]},\n   \"streamSettings\": {\"security\": \"tls\"}\n  }\n ]\n}\n";
        let mut notes = Vec::new();
        let ibs = parse(text, origin(), &mut notes).expect("parses");
        assert_eq!(ibs.len(), 1);
        assert_eq!(ibs[0].at.line, 4);
        assert_eq!(ibs[0].port, Some(443));
        assert_eq!(ibs[0].security, Security::Tls);
        let f = &ibs[0].fallbacks[0];
        assert_eq!(f.at.line, 7);
        assert_eq!(f.xver, 1);
        assert_eq!(
            f.dest,
            Dest::Tcp {
                host: "127.0.0.1".into(),
                port: 8003
            }
        );
    }

    #[test]
    fn truncated_json_names_the_line() {
        let text = "{\n \"inbounds\": [\n  {\"port\": 443\n";
        let err = parse(text, origin(), &mut Vec::new()).expect_err("truncated");
        let msg = err.to_string();
        assert!(msg.starts_with("x.json:"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn dests() {
        assert_eq!(
            parse_dest("/dev/shm/a.sock"),
            Some(Dest::Unix("/dev/shm/a.sock".into()))
        );
        assert_eq!(
            parse_dest("[::1]:80"),
            Some(Dest::Tcp {
                host: "::1".into(),
                port: 80
            })
        );
        assert_eq!(parse_dest("nope"), None);
    }
}
