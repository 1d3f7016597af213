//! The HTTP/1.x framing guard's verdict on one request head
//! (`framing::check_head`) against httparse, the parser hyper uses, reading
//! the same bytes with the same header limit: a head hyper would accept
//! with both Content-Length and Transfer-Encoding, or with an ambiguous
//! length, is always refused; a followed body has exactly the framing the
//! headers declare; a head httparse does not accept is left to hyper.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::http::framing::{check_head, HeadCheck, Refusal};

fuzz_target!(|data: &[u8]| {
    let (limit, head) = match data {
        [l, rest @ ..] => (usize::from(*l) % 160 + 1, rest),
        _ => return,
    };
    let verdict = check_head(head, limit);

    let mut headers = vec![httparse::EMPTY_HEADER; limit];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // Partial, malformed or over the header limit: hyper answers it.
        _ => {
            assert_eq!(verdict, HeadCheck::Stop, "a head httparse refuses");
            return;
        }
    }
    let named = |name: &str| -> Vec<&[u8]> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    let lengths = named("content-length");
    let codings = named("transfer-encoding");
    let upgrade = !named("upgrade").is_empty();
    let tunnel = matches!(req.method, Some("PRI") | Some("CONNECT"));
    let length = |v: &[u8]| -> Option<u64> {
        let t = std::str::from_utf8(v).ok()?.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let last_is_chunked = |v: &[u8]| {
        std::str::from_utf8(v).is_ok_and(|s| {
            s.rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
        })
    };

    // hyper reads the last Transfer-Encoding header's last coding.
    let chunked = codings.last().is_some_and(|v| last_is_chunked(v));
    let ambiguous = (!lengths.is_empty() && !codings.is_empty())
        || lengths.len() > 1
        || lengths.first().is_some_and(|v| length(v).is_none());

    match verdict {
        HeadCheck::Refuse(Refusal::LengthAndChunked) => {
            assert!(!tunnel && !lengths.is_empty() && !codings.is_empty())
        }
        HeadCheck::Refuse(Refusal::RepeatedLength) => {
            assert!(!tunnel && codings.is_empty() && lengths.len() > 1)
        }
        HeadCheck::Refuse(Refusal::BadLength) => {
            assert!(!tunnel && codings.is_empty() && lengths.len() == 1 && ambiguous)
        }
        HeadCheck::Stop => {
            // Only heads the guard may leave to hyper: tunnels, upgrades, and
            // a final coding other than chunked (hyper's 400).
            assert!(
                tunnel || (!ambiguous && (upgrade || (!codings.is_empty() && !chunked))),
                "stopped following a head hyper accepts"
            )
        }
        HeadCheck::NoBody => {
            assert!(!tunnel && !upgrade && !ambiguous && codings.is_empty());
            assert!(lengths.first().is_none_or(|v| length(v) == Some(0)));
        }
        HeadCheck::Length(n) => {
            assert!(!tunnel && !upgrade && !ambiguous && codings.is_empty());
            assert_eq!(lengths.first().and_then(|v| length(v)), Some(n));
        }
        HeadCheck::Chunked => {
            assert!(!tunnel && !upgrade && !ambiguous && chunked);
        }
    }
});
