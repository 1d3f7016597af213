//! Certificates as the ACME code needs them: a chain + key turned into a
//! rustls `CertifiedKey`, its validity and names (x509-parser), the
//! temporary self-signed one, and the TLS-ALPN-01 challenge certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::aws_lc_rs;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where a served certificate came from: the `source` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    File,
    Acme,
    SelfSigned,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Acme => "acme",
            Source::SelfSigned => "self-signed",
        }
    }
}

/// A certificate ready to serve, with what renewal and metrics need.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub source: Source,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lower-cased DNS names of the leaf's subjectAltName.
    pub names: Vec<String>,
}

impl Served {
    /// Whether the certificate is valid now and names every one of `names`.
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.names.contains(n))
    }

    /// Seconds since the epoch of notAfter, for the expiry metric.
    pub fn expiry_seconds(&self) -> f64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.key.cert.first()
    }
}

/// notBefore, notAfter and the DNS names of a DER certificate.
pub fn inspect(der: &[u8]) -> Result<(SystemTime, SystemTime, Vec<String>), String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let at = |t: &ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((at(&validity.not_before), at(&validity.not_after), names))
}

/// A served certificate from PEM text: the chain and its private key.
pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], source: Source) -> Result<Served, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate chain: {e:?}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the chain".into());
    };
    let (not_before, not_after, names) = inspect(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e:?}"))?;
    let signing = aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match()
        .map_err(|_| "the private key does not belong to the certificate".to_string())?;
    Ok(Served {
        key: Arc::new(key),
        source,
        not_before,
        not_after,
        names,
    })
}

/// The temporary certificate a site serves until its first one is issued.
pub fn self_signed(names: &[String]) -> Result<Served, String> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| format!("self-signed certificate: {e}"))?;
    from_pem(
        generated.cert.pem().as_bytes(),
        generated.signing_key.serialize_pem().as_bytes(),
        Source::SelfSigned,
    )
}

/// The RFC 8737 challenge certificate: self-signed, the one name as its
/// only SAN, and the critical acmeIdentifier extension holding the SHA-256
/// digest of the key authorization.
pub fn tls_alpn01(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| format!("challenge certificate for {name}: {e}"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge certificate for {name}: {e}"))?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing =
        aws_lc_rs::sign::any_supported_type(&key_der).map_err(|e| format!("challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// A fresh P-256 key and a CSR for `names`: (CSR DER, key PEM).
pub fn csr(names: &[String]) -> Result<(Vec<u8>, String), String> {
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).map_err(|e| format!("CSR: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let key = rcgen::KeyPair::generate().map_err(|e| format!("certificate key: {e}"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("CSR: {e}"))?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}
