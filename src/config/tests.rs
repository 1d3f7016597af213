//! Every message validation can produce, from `load_str` alone: the file,
//! the key path and the reason.

use super::*;

const FILE: &str = "test.toml";

/// A valid config: one listener, one passthrough route, one backend.
const BASE: &str = r#"
[[listen]]
addr = "127.0.0.1:8443"

[[route]]
pass = "b"

[backend.b]
addr = "127.0.0.1:1"
"#;

/// `top` (top-level keys, before any table) + BASE + `tail`.
fn cfg(top: &str, tail: &str) -> String {
    format!("{top}\n{BASE}\n{tail}")
}

#[track_caller]
fn fails(text: &str, key: &str, reason: &str) {
    match load_str(text, FILE) {
        Ok(_) => panic!("expected {key}: {reason}\nconfig accepted:\n{text}"),
        Err(e) => {
            assert_eq!(e.source, FILE);
            assert_eq!(
                (e.key.as_str(), e.reason.as_str()),
                (key, reason),
                "\nconfig:\n{text}"
            );
            assert_eq!(e.to_string(), format!("{FILE}: {key}: {reason}"));
            assert_eq!(e.to_string().lines().count(), 1);
        }
    }
}

#[track_caller]
fn fails_with_prefix(text: &str, key: &str, reason_start: &str) {
    let e = load_str(text, FILE).expect_err("config accepted");
    assert_eq!(e.source, FILE);
    assert_eq!(e.key, key, "{e}");
    assert!(e.reason.starts_with(reason_start), "{e}");
    assert_eq!(e.to_string().lines().count(), 1, "{e}");
}

#[test]
fn base_is_valid() {
    let c = load_str(&cfg("", ""), FILE).unwrap();
    assert_eq!(c.listeners.len(), 1);
}

#[test]
fn admin() {
    fails(
        &cfg("", "[admin]\nmetrics = \"nope\""),
        "admin.metrics",
        r#""nope" is not an ip:port address (or "off")"#,
    );
    let c = load_str(&cfg("", "[admin]\nmetrics = \"off\""), FILE).unwrap();
    assert_eq!(c.admin.metrics, None);
}

#[test]
fn timeouts_must_be_positive() {
    for k in [
        "client_hello",
        "tls_handshake",
        "upstream_connect",
        "idle",
        "request_header",
    ] {
        fails(
            &cfg("", &format!("[timeouts]\n{k} = \"0s\"")),
            &format!("timeouts.{k}"),
            "must be longer than 0s",
        );
    }
}

#[test]
fn limits() {
    for k in [
        "max_connections",
        "max_pending_hellos",
        "max_headers",
        "max_h2_streams",
        "max_uri_length",
    ] {
        fails(
            &cfg("", &format!("[limits]\n{k} = 0")),
            &format!("limits.{k}"),
            "must be at least 1",
        );
    }
    fails(
        &cfg("", "[limits]\nmax_header_size = \"0B\""),
        "limits.max_header_size",
        "must be at least 1",
    );
    fails(
        &cfg("", "[limits]\nmax_header_size = \"1KiB\""),
        "limits.max_header_size",
        "must be at least 4KiB",
    );
}

#[test]
fn log() {
    fails(
        &cfg("", "[log]\nformat = \"xml\""),
        "log.format",
        r#""xml" is not a log format (use "text" or "json")"#,
    );
    fails(
        &cfg("", "[log]\nlevel = \"portico=loud\""),
        "log.level",
        r#""portico=loud" is not a log level or filter (use e.g. "info" or "portico=debug")"#,
    );
    let c = load_str(&cfg("", "[log]\nformat = \"json\""), FILE).unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn workers() {
    fails(&cfg("workers = 0", ""), "workers", "must be at least 1");
}

#[test]
fn listeners() {
    fails(
        "[[route]]\npass = \"b\"\n[backend.b]\naddr = \"127.0.0.1:1\"\n",
        "listen",
        "no [[listen]] socket: portico would accept nothing",
    );
    fails(
        &cfg("", "[[listen]]\naddr = \"localhost:443\""),
        "listen[1].addr",
        r#""localhost:443" is not an ip:port address (e.g. "0.0.0.0:443" or "[::]:443")"#,
    );
    fails(
        &cfg("", "[[listen]]\naddr = \"127.0.0.1:8443\""),
        "listen[1].addr",
        "duplicate listen address 127.0.0.1:8443 (also listen[0])",
    );
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"127.0.0.1:9000\"\ntrusted = [\"127.0.0.1\"]",
        ),
        "listen[1].trusted",
        "trusted only applies with accept_proxy = true",
    );
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"127.0.0.1:9000\"\naccept_proxy = true",
        ),
        "listen[1].trusted",
        r#"accept_proxy = true needs the peers allowed to send PROXY headers (e.g. trusted = ["127.0.0.1/32"])"#,
    );
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"127.0.0.1:9000\"\naccept_proxy = true\ntrusted = [\"::1\", \"nope\"]",
        ),
        "listen[1].trusted[1]",
        r#""nope" is not a CIDR (e.g. "127.0.0.1/32" or "::1/128")"#,
    );
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"127.0.0.1:9000\"\naccept_proxy = true\ntrusted = [\"10.0.0.1/8\"]",
        ),
        "listen[1].trusted[0]",
        r#""10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#,
    );
}

/// The listener named is the one that overlaps an earlier one, not the last.
#[test]
fn overlapping_listener_names_its_own_index() {
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"0.0.0.0:9000\"\n[[listen]]\naddr = \"127.0.0.1:9000\"\n[[listen]]\naddr = \"127.0.0.1:9100\"",
        ),
        "listen[2].addr",
        "127.0.0.1:9000 overlaps 0.0.0.0:9000 on the same port",
    );
    fails(
        &cfg(
            "",
            "[[listen]]\naddr = \"[::1]:9000\"\n[[listen]]\naddr = \"[::]:9000\"\n[[listen]]\naddr = \"[::1]:9100\"",
        ),
        "listen[2].addr",
        "[::]:9000 overlaps [::1]:9000 on the same port",
    );
    // Port 0 asks the kernel for a free port: never the same port.
    load_str(
        &cfg(
            "",
            "[[listen]]\naddr = \"0.0.0.0:0\"\n[[listen]]\naddr = \"127.0.0.2:0\"",
        ),
        FILE,
    )
    .unwrap();
    // Different families do not overlap (IPV6_V6ONLY).
    load_str(
        &cfg(
            "",
            "[[listen]]\naddr = \"0.0.0.0:9000\"\n[[listen]]\naddr = \"[::]:9000\"",
        ),
        FILE,
    )
    .unwrap();
}

#[test]
fn backends() {
    fails(
        &cfg("", "[backend.\"a b\"]\naddr = \"127.0.0.1:2\""),
        "backend.a b",
        r#""a b" is not a valid name (letters, digits, '_', '-', '.')"#,
    );
    fails(
        &cfg("", "[backend.c]\naddr = \"nowhere\""),
        "backend.c.addr",
        r#""nowhere" is not an address (use "127.0.0.1:8001", "[::1]:8001", "host:port" or "unix:/path")"#,
    );
    fails(
        &cfg("", "[backend.c]\naddr = \"unix:\""),
        "backend.c.addr",
        "empty unix socket path",
    );
    fails(
        &cfg("", "[backend.c]\naddr = \"bad..host:80\""),
        "backend.c.addr",
        r#""bad..host" is not a host name (use "name.example.com" or "*.example.com")"#,
    );
    fails(
        &cfg(
            "",
            "[backend.c]\naddr = \"127.0.0.1:2\"\nproxy_protocol = \"v3\"",
        ),
        "backend.c.proxy_protocol",
        r#""v3" is not a PROXY protocol version (use "none", "v1" or "v2")"#,
    );
}

#[test]
fn upstreams() {
    fails(
        &cfg("", "[upstream.\"x/y\"]\nurl = \"http://127.0.0.1:1\""),
        "upstream.x/y",
        r#""x/y" is not a valid name (letters, digits, '_', '-', '.')"#,
    );
    fails(
        &cfg("", "[upstream.u]\nurl = \"ftp://127.0.0.1:1\""),
        "upstream.u.url",
        r#""ftp://127.0.0.1:1" is not an upstream URL (use "http://127.0.0.1:8317" or "unix:/run/app.sock"; upstreams speak plain HTTP)"#,
    );
    fails(
        &cfg("", "[upstream.u]\nurl = \"http://[::1\""),
        "upstream.u.url",
        r#""http://[::1" is not a URL"#,
    );
    fails(
        &cfg("", "[upstream.u]\nurl = \"http://127.0.0.1:1/v1\""),
        "upstream.u.url",
        r#""http://127.0.0.1:1/v1": a path in the upstream URL is not supported; requests keep their own path"#,
    );
    fails(
        &cfg("", "[upstream.u]\nurl = \"unix:\""),
        "upstream.u.url",
        "empty unix socket path",
    );
    fails(
        &cfg("", "[upstream.u]\nurl = \"http://bad_host!:80\""),
        "upstream.u.url",
        r#""bad_host!" is not a host name (use "name.example.com" or "*.example.com")"#,
    );
    fails(
        &cfg(
            "",
            "[upstream.u]\nurl = \"http://127.0.0.1:1\"\nprotocol = \"h3\"",
        ),
        "upstream.u.protocol",
        r#""h3" is not an upstream protocol (use "http1" or "h2c")"#,
    );
    let c = load_str(
        &cfg(
            "",
            "[upstream.u]\nurl = \"http://127.0.0.1:1\"\nprotocol = \"http/1.1\"",
        ),
        FILE,
    )
    .unwrap();
    assert_eq!(c.upstreams["u"].protocol, UpstreamProtocol::Http1);
}

/// BASE with its route replaced by `routes`, plus a site `s` and backend `b`.
fn routes(routes: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:8443\"\n{routes}\n[backend.b]\naddr = \"127.0.0.1:1\"\n[site.s]\ncert = \"self-signed\"\n"
    )
}

#[test]
fn route_table() {
    fails(
        "[[listen]]\naddr = \"127.0.0.1:8443\"\n",
        "route",
        "no [[route]]: every connection would be refused",
    );
    fails(
        &routes("[[route]]\npass = \"b\"\n[[route]]\nsni = [\"a.example\"]\npass = \"b\""),
        "route[1]",
        "unreachable: route[0] above it already matches everything it matches (routes match top to bottom; move the more specific one up)",
    );
    fails(
        &routes(
            "[[route]]\nprotocol = \"ssh\"\ntake_silent = true\npass = \"b\"\n[[route]]\nprotocol = \"ssh\"\ntake_silent = true\npass = \"b\"",
        ),
        "route",
        "only one route may set take_silent",
    );
}

#[test]
fn route_matchers() {
    fails(
        &routes("[[route]]\nsni = [\"a..example\"]\npass = \"b\""),
        "route[0].sni[0]",
        r#""a..example" is not a host name (use "name.example.com" or "*.example.com")"#,
    );
    fails(
        &routes("[[route]]\nsni = []\npass = \"b\""),
        "route[0].sni",
        "empty list: omit the key to match any name",
    );
    fails(
        &routes("[[route]]\nalpn = [\"h2\", \"\"]\npass = \"b\""),
        "route[0].alpn[1]",
        "ALPN names are 1 to 255 bytes",
    );
    fails(
        &routes("[[route]]\nalpn = []\npass = \"b\""),
        "route[0].alpn",
        "empty list: omit the key to match any ALPN",
    );
    fails(
        &routes("[[route]]\nprotocol = \"ftp\"\npass = \"b\""),
        "route[0].protocol",
        r#""ftp" is not a protocol (use "tls", "http", "ssh" or "any")"#,
    );
    fails(
        &routes("[[route]]\nprotocol = \"http\"\nsni = [\"a.example\"]\npass = \"b\""),
        "route[0].protocol",
        r#"sni and alpn match TLS ClientHellos only; protocol = "http" cannot have them"#,
    );
    fails(
        &routes("[[route]]\nprotocol = \"tls\"\ntake_silent = true\npass = \"b\""),
        "route[0].take_silent",
        r#"only protocol = "ssh" routes may take silent clients"#,
    );
}

#[test]
fn route_actions() {
    fails(
        &routes("[[route]]\npass = \"b\"\nterminate = \"s\""),
        "route[0]",
        "a route has exactly one action; this one has pass and terminate",
    );
    fails(
        &routes("[[route]]\nsni = [\"a.example\"]"),
        "route[0]",
        "no action: set one of pass, terminate or redirect",
    );
    fails(
        &routes("[[route]]\npass = \"zz\""),
        "route[0].pass",
        r#"unknown backend "zz" (defined: b)"#,
    );
    fails(
        "[[listen]]\naddr = \"127.0.0.1:8443\"\n[[route]]\npass = \"zz\"\n",
        "route[0].pass",
        r#"unknown backend "zz" (no [backend.*] is defined)"#,
    );
    fails(
        &routes("[[route]]\nterminate = \"t\""),
        "route[0].terminate",
        r#"unknown site "t" (defined: s)"#,
    );
    fails(
        &routes("[[route]]\nprotocol = \"http\"\nterminate = \"s\""),
        "route[0].terminate",
        r#"terminate needs a TLS connection (protocol = "tls")"#,
    );
    fails(
        &routes("[[route]]\nredirect = \"http\""),
        "route[0].redirect",
        r#""http" is not supported (use "https")"#,
    );
    fails(
        &routes("[[route]]\nprotocol = \"tls\"\nredirect = \"https\""),
        "route[0].redirect",
        r#"redirect answers plain HTTP: set protocol = "http""#,
    );
}

/// A config whose one route terminates at site `s`, defined by `site`
/// (the body of `[site.s]` and anything after it).
fn site(site: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:8443\"\n[[route]]\nsni = [\"api.example\"]\nterminate = \"s\"\n[backend.b]\naddr = \"127.0.0.1:1\"\n[upstream.u]\nurl = \"http://127.0.0.1:2\"\n[site.s]\n{site}\n"
    )
}

#[test]
fn sites() {
    fails(
        "[[listen]]\naddr = \"127.0.0.1:8443\"\n[[route]]\nterminate = \"a+b\"\n[site.\"a+b\"]\ncert = \"self-signed\"\n",
        "site.a+b",
        r#""a+b" is not a valid name (letters, digits, '_', '-', '.')"#,
    );
    fails(
        &site("cert = \"self-signed\"\nkey = \"k.pem\""),
        "site.s.key",
        "a self-signed site has no key file",
    );
    fails(
        &site("cert = \"c.pem\""),
        "site.s.key",
        r#"missing: a certificate file needs its private key file (or use cert = "self-signed")"#,
    );
    fails(
        &site("cert = \"self-signed\"\nnon_http = \"x\""),
        "site.s.non_http",
        r#"unknown backend "x" (defined: b)"#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.headers]\n\"bad name\" = \"v\""),
        "site.s.headers",
        r#""bad name" is not a header name"#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.headers]\nX-A = \"a\\nb\""),
        "site.s.headers.X-A",
        "not a valid header value",
    );
}

#[test]
fn site_headers_are_parsed_at_load() {
    let c = load_str(
        &site("cert = \"self-signed\"\n[site.s.headers]\nStrict-Transport-Security = \"max-age=63072000\""),
        FILE,
    )
    .unwrap();
    let (name, value) = &c.sites["s"].headers[0];
    assert_eq!(name, http::header::STRICT_TRANSPORT_SECURITY);
    assert_eq!(value, "max-age=63072000");
}

#[test]
fn cors() {
    fails(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"https://a.example\", \"b.example\"]"),
        "site.s.cors.origins[1]",
        r#""b.example" is not an origin (scheme://host[:port], no trailing slash)"#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"https://a.example/\"]"),
        "site.s.cors.origins[0]",
        r#""https://a.example/" is not an origin (scheme://host[:port], no trailing slash)"#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"*\"]\ncredentials = true"),
        "site.s.cors.credentials",
        r#"credentials cannot be allowed for origin "*""#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"*\"]\nmethods = [\"GET\", \"PO ST\"]"),
        "site.s.cors.methods[1]",
        r#""PO ST" is not an HTTP method"#,
    );
    fails(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"*\"]\nheaders = [\"X-Ok\", \"Bad:Header\"]"),
        "site.s.cors.headers[1]",
        r#""Bad:Header" is not a header name"#,
    );
    let c = load_str(
        &site("cert = \"self-signed\"\n[site.s.cors]\norigins = [\"*\"]\nmethods = [\"GET\", \"POST\"]"),
        FILE,
    )
    .unwrap();
    let cors = c.sites["s"].cors.as_ref().unwrap();
    assert_eq!(cors.methods, "GET, POST");
    assert_eq!(
        cors.headers,
        "Authorization, Content-Type, X-Api-Key, Anthropic-Version, OpenAI-Organization"
    );
}

#[test]
fn locations() {
    let loc = |body: &str| {
        site(&format!(
            "cert = \"self-signed\"\n[[site.s.location]]\n{body}"
        ))
    };
    fails(
        &loc("path = \"api\"\nupstream = \"u\""),
        "site.s.location[0].path",
        r#""api" must start with '/'"#,
    );
    fails(
        &loc("path = \"/\"\nmatch = \"regex\"\nupstream = \"u\""),
        "site.s.location[0].match",
        r#""regex" is not a match kind (use "exact" or "prefix")"#,
    );
    fails(
        &loc("path = \"/\"\nupstream = \"u\"\nrespond = { status = 204 }"),
        "site.s.location[0]",
        "a location has either upstream or respond, not both",
    );
    fails(
        &loc("path = \"/\""),
        "site.s.location[0]",
        "no target: set upstream or respond",
    );
    fails(
        &loc("path = \"/\"\nupstream = \"v\""),
        "site.s.location[0].upstream",
        r#"unknown upstream "v" (defined: u)"#,
    );
    fails(
        &loc("path = \"/\"\nrespond = { status = 199 }"),
        "site.s.location[0].respond.status",
        "199 is not a response status (200-599)",
    );
    fails(
        &loc("path = \"/\"\nrespond = { status = 600 }"),
        "site.s.location[0].respond.status",
        "600 is not a response status (200-599)",
    );
    fails(
        &loc("path = \"/\"\nrespond = { content_type = \"text/plain\\u0001\" }"),
        "site.s.location[0].respond.content_type",
        "not a valid header value",
    );
    fails(
        &loc("path = \"/\"\nrespond = { status = 204 }\nwebsocket = true"),
        "site.s.location[0].websocket",
        "WebSocket needs an upstream",
    );
    fails(
        &loc("name = \"a b\"\npath = \"/\"\nupstream = \"u\""),
        "site.s.location[0].name",
        r#""a b" is not a valid name (letters, digits, '_', '-', '.')"#,
    );
    fails(
        &loc("path = \"/a\"\nupstream = \"u\"\n[[site.s.location]]\npath = \"/a\"\nrespond = {}"),
        "site.s.location[1].path",
        r#"duplicate location "/a""#,
    );
}

#[test]
fn respond_is_parsed_at_load() {
    let c = load_str(
        &site("cert = \"self-signed\"\n[[site.s.location]]\npath = \"/\"\nrespond = { status = 418, body = \"tea\", content_type = \"text/x-tea\" }"),
        FILE,
    )
    .unwrap();
    match &c.sites["s"].locations[0].target {
        Target::Respond {
            status,
            body,
            content_type,
        } => {
            assert_eq!(*status, http::StatusCode::IM_A_TEAPOT);
            assert_eq!(&body[..], b"tea");
            assert_eq!(content_type, "text/x-tea");
        }
        other => panic!("{other:?}"),
    }
}

/// Errors found while reading the TOML into its shapes (figment).
#[test]
fn shapes() {
    fails_with_prefix(
        &cfg(
            "",
            "[[listen]]\naddr = \"127.0.0.1:9000\"\nacept_proxy = true",
        ),
        "listen[1].acept_proxy",
        "unknown field: found `acept_proxy`",
    );
    fails_with_prefix(
        &cfg("workers = \"x\"", ""),
        "workers",
        "invalid type: found string \"x\"",
    );
    fails_with_prefix("[[route]\npass = 1\n", "", "TOML parse error at line 1");
}

#[test]
fn unreadable_file() {
    let e = load_file(std::path::Path::new("/nonexistent/portico.toml")).unwrap_err();
    assert_eq!(e.source, "/nonexistent/portico.toml");
    assert_eq!(e.key, "");
    assert!(e.reason.starts_with("cannot read config file: "), "{e}");
}
