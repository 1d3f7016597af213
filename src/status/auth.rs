//! `admin.token`: `Authorization: Bearer <token>`, or the cookie the page
//! sets after one visit to `/?token=<token>` (browsers cannot add headers to
//! an EventSource or a typed URL). The token is never logged or echoed.

use http::{header, HeaderMap, HeaderValue};

use crate::config::Secret;

/// The cookie that carries the token for the page and its event stream.
pub const COOKIE: &str = "portico_admin_token";

/// True when `headers` carry `token` as a Bearer credential or in the cookie.
pub fn allowed(headers: &HeaderMap, token: &Secret) -> bool {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .any(|t| token.matches(t.as_bytes()));
    bearer
        || headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == COOKIE && token.matches(v.as_bytes()))
}

/// The `token` parameter of a query string, percent-decoded.
pub fn query_token(query: Option<&str>) -> Option<Vec<u8>> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| percent_decode(v))
}

/// `%XX` and `+` decoding of one query value. Hand-written: a dozen lines
/// for the one value the admin listener reads from a query string.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// The body of a 401: a one-line hint, never the token.
pub const UNAUTHORIZED: &str = "unauthorized: send Authorization: Bearer <admin.token>, or open /?token=<admin.token> once in a browser\n";

/// The `Set-Cookie` value that keeps `token` for the page: HttpOnly (page
/// scripts cannot read it), SameSite=Strict (other sites cannot use it).
/// Not `Secure`: the admin listener speaks plain HTTP (reach it over SSH).
pub fn set_cookie(token: &[u8]) -> Option<HeaderValue> {
    let mut v = format!("{COOKIE}=").into_bytes();
    v.extend_from_slice(token);
    v.extend_from_slice(b"; Path=/; HttpOnly; SameSite=Strict");
    HeaderValue::from_bytes(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("s3cr%t+x".into())
    }

    #[test]
    fn bearer_and_cookie() {
        let mut h = HeaderMap::new();
        assert!(!allowed(&h, &secret()));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cr%t+x"),
        );
        assert!(allowed(&h, &secret()));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  s3cr%t+x "),
        );
        assert!(allowed(&h, &secret()));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cr%t+"),
        );
        assert!(!allowed(&h, &secret()));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic s3cr%t+x"),
        );
        assert!(!allowed(&h, &secret()));
        let mut c = HeaderMap::new();
        c.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; portico_admin_token=s3cr%t+x"),
        );
        assert!(allowed(&c, &secret()));
        c.insert(
            header::COOKIE,
            HeaderValue::from_static("portico_admin_token=nope"),
        );
        assert!(!allowed(&c, &secret()));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_token(Some("a=1&token=s3cr%25t%2Bx")).as_deref(),
            Some(&b"s3cr%t+x"[..])
        );
        assert_eq!(
            query_token(Some("token=a+b%zz%4")).as_deref(),
            Some(&b"a b%zz%4"[..])
        );
        assert_eq!(query_token(Some("x=1")), None);
        assert_eq!(query_token(None), None);
    }
}
