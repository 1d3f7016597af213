//! Server TLS for terminated sites: certificates from PEM files or generated
//! self-signed, one rustls config per site.
//!
//! The route already chose the site by SNI before the handshake starts, so
//! each site's config carries just its own certificate: any number of sites
//! and wildcard certificates share one port, with no wildcard certificate
//! needed to cover them all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertSource, Config, Site, SniPattern};

/// Always answers with the site's one certificate chain.
#[derive(Debug)]
struct SiteCert(Arc<CertifiedKey>);

impl ResolvesServerCert for SiteCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// aws-lc's defaults, with the SHA-256 AES-128 suites first and our order
/// preferred over the client's: the TLS 1.3 key schedule runs ~30 HMACs
/// per handshake, and SHA-384's cost a measured ~20 us more per full
/// handshake than SHA-256's on this class of CPU, for no practical gain in
/// strength (AES-128-GCM is the browsers' and Go's first choice too).
fn provider() -> rustls::crypto::CryptoProvider {
    use aws_lc_rs::cipher_suite as cs;
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    p
}

/// Fill `buf` from the crypto provider's secure random generator (the one
/// rustls uses for its own nonces).
pub fn secure_random(buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
    static PROVIDER: std::sync::LazyLock<rustls::crypto::CryptoProvider> =
        std::sync::LazyLock::new(provider);
    PROVIDER.secure_random.fill(buf)
}

/// Why a site's TLS config could not be built; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {}: {}", path.display(), pem_detail(source))]
    ReadCert {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("certificate {}: {}", path.display(), pem_detail(source))]
    BadCert {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("certificate {}: no PEM certificate in the file", path.display())]
    NoCert { path: PathBuf },
    #[error("key {}: no private key (PKCS#8, RSA or EC PEM) in the file", path.display())]
    NoKey { path: PathBuf },
    #[error("cannot read key {}: {}", path.display(), pem_detail(source))]
    ReadKey {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("key {}: unsupported private key: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("key {} does not belong to certificate {} (wrong file pair?)", key.display(), cert.display())]
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("self-signed certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("self-signed key: {0}")]
    GeneratedKey(#[source] rustls::Error),
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
    #[error("TLS ticketer: {0}")]
    Ticketer(#[source] rustls::Error),
    /// The ACME certificate slot could not be set up (its message names the site).
    #[error("{0}")]
    Acme(String),
}

/// Build the site's TLS config; the error says which file and what is wrong.
pub fn server_config(site: &Site) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver: Arc<dyn ResolvesServerCert> = match &site.cert {
        CertSource::Files { cert, key } => {
            let pair = load_pair(cert, key)?;
            publish_expiry(site, &pair, crate::acme::Source::File);
            Arc::new(SiteCert(Arc::new(pair)))
        }
        CertSource::SelfSigned => {
            let pair = self_signed(&site.names)?;
            publish_expiry(site, &pair, crate::acme::Source::SelfSigned);
            Arc::new(SiteCert(Arc::new(pair)))
        }
        // acme wiring: the site's certificate slot, which issuance and
        // renewal swap under running listeners.
        CertSource::Acme(acme) => crate::acme::resolver(site, acme).map_err(TlsError::Acme)?,
    };
    let provider = Arc::new(provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    // Stateless resumption; rotation every 6 h is the ticketer's default.
    cfg.ticketer = aws_lc_rs::Ticketer::new().map_err(TlsError::Ticketer)?;
    // One ticket is enough for a proxy client; each costs an encryption.
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// `portico_certificate_expiry_timestamp_seconds` of a file or self-signed site.
fn publish_expiry(site: &Site, pair: &CertifiedKey, source: crate::acme::Source) {
    let Some(leaf) = pair.cert.first() else {
        return;
    };
    if let Ok((_, not_after, _)) = crate::acme::cert::inspect(leaf) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        crate::metrics::set_certificate_expiry(&site.name, source.as_str(), secs);
    }
}

/// Certificate files of `cfg` that expire within [`EXPIRY_WARNING`]: one
/// line each, naming the file and the date. `portico check` prints them and
/// start-up and reload log them; they never fail the config.
pub fn expiry_warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let soon = std::time::SystemTime::now() + EXPIRY_WARNING;
    for site in cfg.sites.values() {
        let CertSource::Files { cert, .. } = &site.cert else {
            continue;
        };
        let Some(Ok(leaf)) = CertificateDer::pem_file_iter(cert)
            .ok()
            .and_then(|mut i| i.next())
        else {
            continue;
        };
        let Ok((_, not_after, _)) = crate::acme::cert::inspect(&leaf) else {
            continue;
        };
        if not_after < soon {
            let date = humantime::format_rfc3339_seconds(not_after);
            let verb = if not_after < std::time::SystemTime::now() {
                "expired"
            } else {
                "expires"
            };
            out.push(format!(
                "certificate {} (site.{}.cert) {verb} on {date}",
                cert.display(),
                site.name
            ));
        }
    }
    out
}

/// Warn this long before a certificate file expires (certbot renews 30
/// days ahead, so a file this close to its end means renewal is broken).
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(14 * 86400);

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|source| TlsError::ReadCert {
            path: cert.to_path_buf(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::BadCert {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_path_buf(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_path_buf(),
        },
        source => TlsError::ReadKey {
            path: key.to_path_buf(),
            source,
        },
    })?;
    let signing =
        aws_lc_rs::sign::any_supported_type(&der).map_err(|source| TlsError::UnsupportedKey {
            path: key.to_path_buf(),
            source,
        })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|source| TlsError::Mismatch {
        key: key.to_path_buf(),
        cert: cert.to_path_buf(),
        source,
    })?;
    Ok(ck)
}

/// The useful part of a PEM error: the I/O error's text, else its kind.
fn pem_detail(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) => io.to_string(),
        other => format!("{other:?}"),
    }
}

/// A self-signed ECDSA P-256 certificate for the site's names
/// (`localhost` when the site takes any name).
fn self_signed(names: &[SniPattern]) -> Result<CertifiedKey, TlsError> {
    let mut sans: Vec<String> = names.iter().map(|p| p.to_string()).collect();
    if sans.is_empty() {
        sans.push("localhost".into());
    }
    let generated = rcgen::generate_simple_self_signed(sans).map_err(TlsError::Generate)?;
    let key_der = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let signing = aws_lc_rs::sign::any_supported_type(&key_der).map_err(TlsError::GeneratedKey)?;
    Ok(CertifiedKey::new(
        vec![generated.cert.der().clone()],
        signing,
    ))
}
