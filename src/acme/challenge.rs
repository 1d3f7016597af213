//! Pending challenges and the answers to them.
//!
//! TLS-ALPN-01 (RFC 8737): a ClientHello that offers `acme-tls/1` for a name
//! with a pending challenge gets a handshake with the challenge certificate
//! and nothing else; every other client of that name is routed as usual.
//! HTTP-01: `GET /.well-known/acme-challenge/<token>` on the plain-HTTP
//! redirect route answers the key authorization.
//!
//! The tables are process-wide: a process answers for one host's ports, and
//! an order placed by one config generation may still be validated while a
//! reload publishes the next.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Default)]
struct Tables {
    /// Server name -> challenge certificate.
    tls_alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// Token -> key authorization.
    http01: RwLock<HashMap<String, String>>,
}

static TABLES: LazyLock<Tables> = LazyLock::new(Tables::default);

/// Removes its challenge from the table when dropped, so an order that
/// fails, succeeds or is cancelled (reload, shutdown) leaves nothing behind.
pub struct Pending {
    kind: Kind,
}

enum Kind {
    TlsAlpn(String),
    Http01(String),
}

impl Drop for Pending {
    fn drop(&mut self) {
        match &self.kind {
            Kind::TlsAlpn(name) => {
                if let Ok(mut t) = TABLES.tls_alpn.write() {
                    t.remove(name);
                }
            }
            Kind::Http01(token) => {
                if let Ok(mut t) = TABLES.http01.write() {
                    t.remove(token);
                }
            }
        }
    }
}

/// Publish a TLS-ALPN-01 answer for `name` until the returned guard drops.
pub fn add_tls_alpn(name: &str, key: Arc<CertifiedKey>) -> Pending {
    if let Ok(mut t) = TABLES.tls_alpn.write() {
        t.insert(name.to_string(), key);
    }
    Pending {
        kind: Kind::TlsAlpn(name.to_string()),
    }
}

/// Publish an HTTP-01 answer for `token` until the returned guard drops.
pub fn add_http01(token: &str, key_authorization: &str) -> Pending {
    if let Ok(mut t) = TABLES.http01.write() {
        t.insert(token.to_string(), key_authorization.to_string());
    }
    Pending {
        kind: Kind::Http01(token.to_string()),
    }
}

/// The challenge certificate for a ClientHello that offers `acme-tls/1` for
/// a name with a pending challenge; `None` for every other hello (one
/// comparison per offered protocol, no lock, for ordinary clients).
pub fn tls_alpn_for(sni: Option<&str>, alpn: &[Vec<u8>]) -> Option<Arc<CertifiedKey>> {
    if !alpn.iter().any(|p| p == ACME_TLS_ALPN) {
        return None;
    }
    let name = sni?;
    TABLES.tls_alpn.read().ok()?.get(name).cloned()
}

/// Always the challenge certificate.
#[derive(Debug)]
struct ChallengeCert(Arc<CertifiedKey>);

impl ResolvesServerCert for ChallengeCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Complete a validation handshake with the challenge certificate, then
/// close: RFC 8737 section 3 has the validator abort after the handshake.
/// `io` replays the peeked ClientHello.
pub async fn answer_tls_alpn<S>(io: S, key: Arc<CertifiedKey>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = match ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b,
        Err(e) => {
            debug!(error = %e, "TLS setup for the ACME challenge failed");
            return;
        }
    };
    let mut cfg = cfg
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCert(key)));
    cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    match tokio::time::timeout(within, acceptor.accept(io)).await {
        Ok(Ok(mut tls)) => {
            debug!("answered a TLS-ALPN-01 validation handshake");
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
        Ok(Err(e)) => debug!(error = %e, "TLS-ALPN-01 handshake failed"),
        Err(_) => debug!("TLS-ALPN-01 handshake timed out"),
    }
}

/// The answer to an HTTP-01 validation request, or `None` when `path` is not
/// a pending challenge (the caller then redirects as usual).
pub fn http01_response(path: &str) -> Option<Response<Full<Bytes>>> {
    let token = path.strip_prefix(HTTP01_PREFIX)?;
    let body = TABLES.http01.read().ok()?.get(token).cloned()?;
    let mut r = Response::new(Full::from(body));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pending_names_offering_acme_tls_get_the_challenge() {
        let key = crate::acme::cert::tls_alpn01("a.test", &[7u8; 32]).unwrap();
        let acme = vec![ACME_TLS_ALPN.to_vec()];
        let h2 = vec![b"h2".to_vec()];
        assert!(tls_alpn_for(Some("a.test"), &acme).is_none());
        let guard = add_tls_alpn("a.test", key);
        assert!(tls_alpn_for(Some("a.test"), &acme).is_some());
        assert!(tls_alpn_for(Some("a.test"), &h2).is_none());
        assert!(tls_alpn_for(Some("b.test"), &acme).is_none());
        assert!(tls_alpn_for(None, &acme).is_none());
        drop(guard);
        assert!(tls_alpn_for(Some("a.test"), &acme).is_none());
    }

    #[test]
    fn http01_answers_pending_tokens_only() {
        assert!(http01_response("/.well-known/acme-challenge/tok1").is_none());
        let guard = add_http01("tok1", "tok1.thumb");
        assert!(http01_response("/.well-known/acme-challenge/tok1").is_some());
        assert!(http01_response("/.well-known/acme-challenge/tok2").is_none());
        assert!(http01_response("/tok1").is_none());
        drop(guard);
        assert!(http01_response("/.well-known/acme-challenge/tok1").is_none());
    }
}
