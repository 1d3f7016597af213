//! Which headers cross the proxy, and the ones portico adds. Pure functions.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// RFC 9110 §7.6.1 hop-by-hop headers, plus the non-standard ones proxies
/// and old clients still send. They describe one connection, not the message.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as an enum tag; the two others by their bytes.
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Names listed in `Connection` headers: hop-by-hop for this message only.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Remove hop-by-hop headers (the fixed set and those named in `Connection`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at each name present; most messages carry none of them, and
    // a removal by name costs a hash and a probe even when it finds nothing.
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    if found.contains(&header::CONNECTION) {
        found.extend(connection_listed(headers));
    }
    for name in found {
        headers.remove(&name);
    }
}

/// The client's address as portico forwards it, formatted once per
/// connection rather than once per request.
#[derive(Debug)]
pub struct ClientAddr {
    ip: IpAddr,
    text: String,
    value: HeaderValue,
    /// The `Forwarded` element for the first Host the connection sent;
    /// reused while it keeps sending that Host (nearly always).
    element: OnceLock<Element>,
}

#[derive(Debug)]
struct Element {
    host: String,
    text: String,
    value: HeaderValue,
}

impl ClientAddr {
    pub fn new(client: IpAddr) -> ClientAddr {
        let ip = crate::config::canonical_ip(client);
        let text = ip.to_string();
        ClientAddr {
            ip,
            value: header_value(text.clone()),
            text,
            element: OnceLock::new(),
        }
    }

    /// RFC 7239 `for=…;host=…;proto=https` for a request to `host`.
    /// The kept value comes with it when `host` is the connection's first.
    fn element(&self, host: &str) -> (Cow<'_, str>, Option<HeaderValue>) {
        let e = self.element.get_or_init(|| {
            let text = self.format_element(host);
            Element {
                host: host.to_string(),
                value: header_value(text.clone()),
                text,
            }
        });
        if e.host == host {
            (Cow::Borrowed(&e.text), Some(e.value.clone()))
        } else {
            (Cow::Owned(self.format_element(host)), None)
        }
    }

    fn format_element(&self, host: &str) -> String {
        let mut element = String::with_capacity(40 + self.text.len() + host.len());
        // RFC 7239: IPv6 nodes are quoted and bracketed.
        match self.ip {
            IpAddr::V4(_) => {
                element.push_str("for=");
                element.push_str(&self.text);
            }
            IpAddr::V6(_) => {
                element.push_str("for=\"[");
                element.push_str(&self.text);
                element.push_str("]\"");
            }
        }
        element.push_str(";host=");
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            element.push_str(host);
        } else {
            element.push('"');
            element.extend(host.chars().filter(|c| *c != '"'));
            element.push('"');
        }
        element.push_str(";proto=https");
        element
    }
}

/// What the upstream should learn about the client and the original request.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    pub client: &'a ClientAddr,
    /// Host as the client sent it (Host or `:authority`), port included.
    pub host: &'a str,
}

/// Turn a client request's headers into the upstream request's, in place.
/// `Host` is set from `fwd.host` (so `:authority` becomes `Host` for an
/// HTTP/1.1 upstream); client-sent `X-Real-IP`, `X-Forwarded-Proto` and
/// `X-Forwarded-Host` are replaced; `X-Forwarded-For` and `Forwarded` are
/// appended to, so only their last element is vouched for by portico.
pub fn to_upstream(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    strip_hop_by_hop(headers);
    let client = fwd.client;
    // The client's own Host header, when it is the host, is kept as it is
    // (no copy); h2's `:authority` becomes a new Host value.
    let host = match headers.get(header::HOST) {
        Some(v) if v.as_bytes() == fwd.host.as_bytes() => Some(v.clone()),
        _ => HeaderValue::from_str(fwd.host).ok(),
    };
    if let Some(v) = host {
        headers.insert(header::HOST, v.clone());
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
    headers.insert(X_REAL_IP.clone(), client.value.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    let xff =
        join_prior(headers, &X_FORWARDED_FOR, &client.text).unwrap_or_else(|| client.value.clone());
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    let (text, value) = client.element(fwd.host);
    if let Some(v) = join_prior(headers, &header::FORWARDED, &text)
        .or(value)
        .or_else(|| HeaderValue::from_str(&text).ok())
    {
        headers.insert(header::FORWARDED, v);
    }
}

/// A header value that owns `s` (no copy). `s` must be visible ASCII.
fn header_value(s: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// `name`'s values (joined with ", ") then `last`, as one value; `None`
/// when the message has no `name` (the caller has `last` ready as a value).
fn join_prior(headers: &HeaderMap, name: &HeaderName, last: &str) -> Option<HeaderValue> {
    let mut prior = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    prior.peek()?;
    let mut out = String::new();
    for p in prior {
        out.push_str(p);
        out.push_str(", ");
    }
    out.push_str(last);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
}

/// Host without port, lower-cased, for matching against site names.
pub fn host_name(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn forwarding_headers() {
        let mut m = h(&[
            ("host", "ignored.example"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("session_id", "abc"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("authorization", "Bearer k"),
        ]);
        to_upstream(
            &mut m,
            &Forwarded {
                client: &ClientAddr::new("203.0.113.5".parse().unwrap()),
                host: "api.example.com",
            },
        );
        assert_eq!(m["host"], "api.example.com");
        assert_eq!(m["x-forwarded-host"], "api.example.com");
        assert_eq!(m["x-real-ip"], "203.0.113.5");
        assert_eq!(m["x-forwarded-for"], "10.0.0.1, 203.0.113.5");
        assert_eq!(m["x-forwarded-proto"], "https");
        assert_eq!(
            m["forwarded"],
            "for=203.0.113.5;host=api.example.com;proto=https"
        );
        assert_eq!(m["session_id"], "abc");
        assert_eq!(m["authorization"], "Bearer k");
        for gone in ["connection", "x-drop-me", "keep-alive", "te"] {
            assert!(m.get(gone).is_none(), "{gone} should be stripped");
        }
    }

    #[test]
    fn ipv6_and_mapped_clients() {
        let mut m = HeaderMap::new();
        to_upstream(
            &mut m,
            &Forwarded {
                client: &ClientAddr::new("2001:db8::7".parse().unwrap()),
                host: "a.example:8443",
            },
        );
        assert_eq!(
            m["forwarded"],
            "for=\"[2001:db8::7]\";host=\"a.example:8443\";proto=https"
        );
        let mut m = HeaderMap::new();
        to_upstream(
            &mut m,
            &Forwarded {
                client: &ClientAddr::new("::ffff:192.0.2.1".parse().unwrap()),
                host: "a",
            },
        );
        assert_eq!(m["x-real-ip"], "192.0.2.1");
    }

    #[test]
    fn forwarded_element_per_host_on_one_connection() {
        let client = ClientAddr::new("203.0.113.5".parse().unwrap());
        for host in ["a.example", "b.example", "a.example"] {
            let mut m = HeaderMap::new();
            to_upstream(
                &mut m,
                &Forwarded {
                    client: &client,
                    host,
                },
            );
            assert_eq!(
                m["forwarded"],
                format!("for=203.0.113.5;host={host};proto=https")
            );
        }
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("API.Example.com:443"), "api.example.com");
        assert_eq!(host_name("api.example.com."), "api.example.com");
        assert_eq!(host_name("[::1]:8443"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
    }
}
