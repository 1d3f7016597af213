//! What the status page says about a site's certificate: where it comes
//! from, the names it covers and when it expires. Nothing about the key.
//!
//! Computed once per config generation from the certificate file the
//! generation loaded. When a `portico_certificate_expiry_timestamp_seconds`
//! gauge exists for the site, the status document prefers it (see
//! `json::certificate`), so both report one number.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::{CertSource, Site};

/// A site's certificate as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// `file` or `self-signed`.
    pub source: &'static str,
    /// The certificate file, for `file`.
    pub path: Option<String>,
    /// DNS names (subject alternative names; the common name when none).
    pub names: Vec<String>,
    /// End of validity, in seconds since the Unix epoch; `None` when unknown
    /// (self-signed certificates are generated at load and not re-read).
    pub not_after: Option<i64>,
    /// Why `not_after` is unknown for a file that could not be read again.
    pub error: Option<String>,
}

/// The certificate of `site`.
pub fn certificate_info(site: &Site) -> CertInfo {
    match &site.cert {
        CertSource::Files { cert, .. } => {
            let path = cert.display().to_string();
            match leaf_expiry(cert) {
                Ok((names, not_after)) => CertInfo {
                    source: "file",
                    path: Some(path),
                    names,
                    not_after: Some(not_after),
                    error: None,
                },
                Err(e) => CertInfo {
                    source: "file",
                    path: Some(path),
                    names: site.names.iter().map(|n| n.to_string()).collect(),
                    not_after: None,
                    error: Some(e),
                },
            }
        }
        // The ACME slot's expiry comes from its
        // portico_certificate_expiry_timestamp_seconds series.
        CertSource::Acme(_) => CertInfo {
            source: "acme",
            path: None,
            names: site.names.iter().map(|n| n.to_string()).collect(),
            not_after: None,
            error: None,
        },
        CertSource::SelfSigned => CertInfo {
            source: "self-signed",
            path: None,
            names: if site.names.is_empty() {
                vec!["localhost".into()]
            } else {
                site.names.iter().map(|n| n.to_string()).collect()
            },
            not_after: None,
            error: None,
        },
    }
}

/// Whole days from `now` until `not_after` (negative once expired).
pub fn days_left(not_after: i64, now: SystemTime) -> i64 {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    (not_after - now).div_euclid(86_400)
}

/// The names and notAfter of the first certificate in a PEM file.
fn leaf_expiry(path: &std::path::Path) -> Result<(Vec<String>, i64), String> {
    let first = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e:?}", path.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate", path.display()))?
        .map_err(|e| format!("{}: {e:?}", path.display()))?;
    parse_leaf(&first).map_err(|e| format!("{}: {e}", path.display()))
}

/// Names and notAfter of a DER certificate.
pub fn parse_leaf(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_string),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_expiry_of_a_generated_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["a.test".to_string(), "*.b.test".to_string()])
                .expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (names, not_after) = parse_leaf(cert.der()).expect("parse");
        assert_eq!(names, vec!["a.test", "*.b.test"]);
        // 2031-05-17T00:00:00Z
        assert_eq!(not_after, 1_936_742_400);
        let day = UNIX_EPOCH + Duration::from_secs(1_936_742_400 - 10 * 86_400 - 5);
        assert_eq!(days_left(not_after, day), 10);
        assert_eq!(
            days_left(not_after, UNIX_EPOCH + Duration::from_secs(1_936_742_401)),
            -1
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_leaf(b"not a certificate").is_err());
    }
}
