//! The negotiated protocol is binding, and h2 requests are checked for what
//! RFC 9113 calls malformed before anything is forwarded.
//!
//! - ALPN `h2`: the client must send the HTTP/2 connection preface; anything
//!   else (HTTP/1.1 included) gets GOAWAY(PROTOCOL_ERROR) and a close
//!   (RFC 9113 section 3.4).
//! - ALPN `http/1.1`: the h2 preface is answered with 400 and a close.
//! - no ALPN: the first bytes decide, as before.
//!
//! The two refusals are written here as bytes: nothing has been parsed by
//! then, and neither hyper nor the `h2` crate can emit a GOAWAY for a
//! connection whose preface they never accepted.

use http::{header, Request, Version};

/// What an h2 client sends first (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame (the server preface, which must come first)
/// then GOAWAY(last stream 0, PROTOCOL_ERROR).
pub const GOAWAY_PROTOCOL_ERROR: &[u8] = &[
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, empty
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes, stream 0
    0, 0, 0, 0, // last stream id 0: nothing was processed
    0, 0, 0, 1, // PROTOCOL_ERROR
];

const PREFACE_ON_HTTP1_BODY: &str = "bad request: HTTP/2 preface on an http/1.1 connection\n";

/// The answer to an h2 preface on a connection that negotiated `http/1.1`.
pub fn preface_on_http1_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        PREFACE_ON_HTTP1_BODY.len(),
        PREFACE_ON_HTTP1_BODY
    )
    .into_bytes()
}

/// How the first bytes of a terminated connection fit what ALPN chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it, as h2 (the first bytes are its preface) or HTTP/1.1.
    Serve { h2: bool },
    /// `h2` negotiated but no h2 preface: GOAWAY and close.
    NotH2,
    /// `http/1.1` negotiated but the h2 preface came: 400 and close.
    H2OnHttp1,
}

/// `first` holds at least the preface's length of bytes, or fewer when they
/// already differ from it (see the reader in `terminate`).
pub fn check_first_bytes(negotiated: super::Negotiated, first: &[u8]) -> Verdict {
    let preface = first.starts_with(H2_PREFACE);
    match negotiated {
        super::Negotiated::H2 if !preface => Verdict::NotH2,
        super::Negotiated::Http1 if preface => Verdict::H2OnHttp1,
        _ => Verdict::Serve { h2: preface },
    }
}

/// RFC 9113 checks hyper leaves to us, for h2 requests: a field value with
/// leading or trailing whitespace is malformed (section 8.2.1), and a `host`
/// that differs from `:authority` is refused (section 8.3.1). Returns what
/// is wrong, for a one-line 400.
pub fn h2_request_problem<B>(req: &Request<B>) -> Option<&'static str> {
    if req.version() != Version::HTTP_2 {
        return None;
    }
    let padded = |v: &[u8]| {
        matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'))
    };
    if req.headers().values().any(|v| padded(v.as_bytes())) {
        return Some("header value with leading or trailing whitespace");
    }
    if let (Some(host), Some(authority)) = (req.headers().get(header::HOST), req.uri().authority())
    {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Some("host header differs from :authority");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::Negotiated;
    use super::*;

    #[test]
    fn alpn_decides() {
        let h1 = b"GET / HTTP/1.1\r\n";
        assert_eq!(
            check_first_bytes(Negotiated::H2, H2_PREFACE),
            Verdict::Serve { h2: true }
        );
        assert_eq!(check_first_bytes(Negotiated::H2, h1), Verdict::NotH2);
        assert_eq!(
            check_first_bytes(Negotiated::H2, b"PRI * HTTP/2.0\r\n\r\nXX"),
            Verdict::NotH2
        );
        assert_eq!(
            check_first_bytes(Negotiated::Http1, H2_PREFACE),
            Verdict::H2OnHttp1
        );
        assert_eq!(
            check_first_bytes(Negotiated::Http1, h1),
            Verdict::Serve { h2: false }
        );
        assert_eq!(
            check_first_bytes(Negotiated::Unknown, H2_PREFACE),
            Verdict::Serve { h2: true }
        );
        assert_eq!(
            check_first_bytes(Negotiated::Unknown, h1),
            Verdict::Serve { h2: false }
        );
    }

    #[test]
    fn goaway_frames_are_well_formed() {
        let g = GOAWAY_PROTOCOL_ERROR;
        assert_eq!(g.len(), 9 + 9 + 8);
        assert_eq!((g[3], g[12]), (0x4, 0x7));
        assert_eq!(u32::from_be_bytes([g[22], g[23], g[24], g[25]]), 1);
        let r = String::from_utf8(preface_on_http1_response()).expect("utf-8");
        let (head, body) = r.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 400 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }

    fn h2(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(Version::HTTP_2).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn h2_requests_are_checked() {
        assert_eq!(
            h2_request_problem(&h2("https://a.test/", &[("x", "ok")])),
            None
        );
        assert!(h2_request_problem(&h2("https://a.test/", &[("x", " pad")])).is_some());
        assert!(h2_request_problem(&h2("https://a.test/", &[("x", "pad\t")])).is_some());
        assert_eq!(
            h2_request_problem(&h2("https://a.test/", &[("host", "A.test")])),
            None
        );
        assert!(h2_request_problem(&h2("https://a.test/", &[("host", "b.test")])).is_some());
        let mut h1 = h2("https://a.test/", &[("x", " pad")]);
        *h1.version_mut() = Version::HTTP_11;
        assert_eq!(
            h2_request_problem(&h1),
            None,
            "HTTP/1.1 values are trimmed by the parser"
        );
    }
}
