//! The routing decision: a pure function from what was peeked to a route.

use crate::config::{Protocol, Route};
use crate::hello::Peeked;

/// What the first bytes of a connection showed.
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    Peeked(&'a Peeked),
    /// The client sent nothing within `timeouts.client_hello`.
    Silent,
}

/// First route (top to bottom) whose matchers all accept the connection.
/// `routes` is the config's table or any table whose entries carry a route
/// (a generation's, with resolved actions).
pub fn decide<'r, R: std::borrow::Borrow<Route>>(seen: Seen<'_>, routes: &'r [R]) -> Option<&'r R> {
    routes.iter().find(|r| matches(r.borrow(), seen))
}

fn matches(route: &Route, seen: Seen<'_>) -> bool {
    let m = &route.matcher;
    let peeked = match seen {
        Seen::Silent => return m.take_silent,
        Seen::Peeked(p) => p,
    };
    let protocol_ok = matches!(
        (m.protocol, peeked),
        (Protocol::Any, _)
            | (Protocol::Tls, Peeked::Tls(_))
            | (Protocol::Http, Peeked::Http)
            | (Protocol::Ssh, Peeked::Ssh)
    );
    if !protocol_ok {
        return false;
    }
    if m.sni.is_empty() && m.alpn.is_empty() {
        return true;
    }
    let Peeked::Tls(hello) = peeked else {
        return false;
    };
    let sni_ok = m.sni.is_empty()
        || hello
            .sni
            .as_deref()
            .is_some_and(|name| m.sni.iter().any(|p| p.matches(name)));
    let alpn_ok = m.alpn.is_empty() || hello.alpn.iter().any(|a| m.alpn.contains(a));
    sni_ok && alpn_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use crate::hello::ClientHello;

    const CFG: &str = r#"
[[listen]]
addr = "127.0.0.1:0"

[[route]]
sni = ["tunnel.example.com"]
alpn = ["h2"]
pass = "t_h2"

[[route]]
sni = ["tunnel.example.com"]
pass = "t"

[[route]]
sni = ["*.wild.example"]
pass = "w"

[[route]]
protocol = "ssh"
take_silent = true
pass = "ssh"

[[route]]
protocol = "http"
pass = "plain"

[[route]]
pass = "decoy"

[backend.t_h2]
addr = "127.0.0.1:1"
[backend.t]
addr = "127.0.0.1:2"
[backend.w]
addr = "127.0.0.1:3"
[backend.ssh]
addr = "127.0.0.1:4"
[backend.plain]
addr = "127.0.0.1:5"
[backend.decoy]
addr = "127.0.0.1:6"
"#;

    fn tls(sni: Option<&str>, alpn: &[&str]) -> Peeked {
        Peeked::Tls(ClientHello {
            sni: sni.map(String::from),
            alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
            record_version: 0x0301,
            hello_len: 0,
        })
    }

    fn target(p: &Peeked) -> String {
        let cfg = load_str(CFG, "test").unwrap();
        let r = decide(Seen::Peeked(p), &cfg.routes).unwrap();
        r.label.to_string()
    }

    #[test]
    fn alpn_splits_same_sni() {
        assert_eq!(
            target(&tls(Some("tunnel.example.com"), &["h2", "http/1.1"])),
            "0:pass:t_h2"
        );
        assert_eq!(
            target(&tls(Some("tunnel.example.com"), &["http/1.1"])),
            "1:pass:t"
        );
        assert_eq!(target(&tls(Some("tunnel.example.com"), &[])), "1:pass:t");
    }

    #[test]
    fn wildcard_on_label_boundaries_only() {
        assert_eq!(target(&tls(Some("a.wild.example"), &[])), "2:pass:w");
        assert_eq!(target(&tls(Some("a.b.wild.example"), &[])), "2:pass:w");
        assert_eq!(target(&tls(Some("wild.example"), &[])), "5:pass:decoy");
        assert_eq!(target(&tls(Some("xwild.example"), &[])), "5:pass:decoy");
        // Xray's substring match would send this to the tunnel.
        assert_eq!(
            target(&tls(Some("tunnel.example.com.evil.net"), &[])),
            "5:pass:decoy"
        );
    }

    #[test]
    fn no_sni_falls_through() {
        assert_eq!(target(&tls(None, &["h2"])), "5:pass:decoy");
    }

    #[test]
    fn protocols_and_silence() {
        assert_eq!(target(&Peeked::Ssh), "3:pass:ssh");
        assert_eq!(target(&Peeked::Http), "4:pass:plain");
        assert_eq!(target(&Peeked::Unknown), "5:pass:decoy");
        let cfg = load_str(CFG, "test").unwrap();
        assert_eq!(
            &*decide(Seen::Silent, &cfg.routes).unwrap().label,
            "3:pass:ssh"
        );
    }

    #[test]
    fn no_match_is_none() {
        let cfg = load_str(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\nsni = [\"a.example\"]\npass = \"b\"\n[backend.b]\naddr = \"127.0.0.1:1\"\n",
            "test",
        )
        .unwrap();
        assert!(decide(Seen::Peeked(&tls(Some("b.example"), &[])), &cfg.routes).is_none());
        assert!(decide(Seen::Peeked(&Peeked::Http), &cfg.routes).is_none());
        assert!(decide(Seen::Silent, &cfg.routes).is_none());
    }
}
