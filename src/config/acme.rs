//! The `[acme]` section: checked types and their validation. Nothing here
//! contacts the directory; `portico check` relies on that.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawAcme;
use super::ConfigError;

/// Let's Encrypt's production directory (`directory = "letsencrypt"`).
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`directory = "letsencrypt-staging"`).
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// Where account keys and certificates live unless `storage` says otherwise.
pub const DEFAULT_STORAGE: &str = "/var/lib/portico/acme";
/// First retry after a failed order; doubles per failure up to [`MAX_RETRY`].
/// A minute keeps a broken setup well under Let's Encrypt's limit of five
/// failed validations per name per hour once the delay has doubled twice.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(60);
/// Cap of the retry delay: a fixed problem is picked up within this long.
pub const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);

/// Which challenge proves control of the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// RFC 8737: answered on every listener, before routing.
    TlsAlpn01,
    /// RFC 8555 8.3: answered on `protocol = "http"` (redirect) routes.
    Http01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
        }
    }
}

/// The checked `[acme]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// `mailto:` contact for the account, when given.
    pub email: Option<String>,
    /// The directory URL (the named ones resolved).
    pub directory: String,
    pub storage: PathBuf,
    /// Extra root(s) for the directory's HTTPS, besides the system's roots.
    pub ca: Option<PathBuf>,
    pub challenge: Challenge,
    /// First retry delay after a failure (`retry`, default 1m).
    pub retry: Duration,
}

impl Default for Acme {
    fn default() -> Self {
        Acme {
            email: None,
            directory: LETSENCRYPT.into(),
            storage: PathBuf::from(DEFAULT_STORAGE),
            ca: None,
            challenge: Challenge::TlsAlpn01,
            retry: DEFAULT_RETRY,
        }
    }
}

/// Check `[acme]`; an absent section means all defaults.
pub(super) fn validate(raw: &RawAcme, source: &str) -> Result<Acme, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        source: source.to_string(),
        key: format!("acme.{key}"),
        reason,
    };
    let mut acme = Acme::default();
    if let Some(email) = &raw.email {
        let ok = email
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
            && !email.contains([' ', ',', '<', '>', ':']);
        if !ok {
            return Err(err(
                "email",
                format!("{email:?} is not an e-mail address (e.g. \"ops@example.com\")"),
            ));
        }
        acme.email = Some(email.clone());
    }
    if let Some(dir) = &raw.directory {
        acme.directory = match dir.as_str() {
            "letsencrypt" => LETSENCRYPT.into(),
            "letsencrypt-staging" => LETSENCRYPT_STAGING.into(),
            url => {
                let parsed = url.parse::<http::Uri>().ok();
                let https = parsed
                    .as_ref()
                    .is_some_and(|u| u.scheme_str() == Some("https") && u.authority().is_some());
                if !https {
                    return Err(err(
                        "directory",
                        format!("{url:?} is not an ACME directory (use \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL)"),
                    ));
                }
                url.to_string()
            }
        };
    }
    if let Some(storage) = &raw.storage {
        if storage.is_empty() {
            return Err(err("storage", "empty path".into()));
        }
        acme.storage = PathBuf::from(storage);
    }
    if let Some(ca) = &raw.ca {
        if ca.is_empty() {
            return Err(err("ca", "empty path".into()));
        }
        acme.ca = Some(PathBuf::from(ca));
    }
    if let Some(c) = &raw.challenge {
        acme.challenge = match c.as_str() {
            "tls-alpn-01" => Challenge::TlsAlpn01,
            "http-01" => Challenge::Http01,
            "dns-01" => {
                return Err(err(
                    "challenge",
                    "\"dns-01\" is not supported (use \"tls-alpn-01\" or \"http-01\")".into(),
                ))
            }
            other => {
                return Err(err(
                    "challenge",
                    format!(
                        "{other:?} is not a challenge type (use \"tls-alpn-01\" or \"http-01\")"
                    ),
                ))
            }
        };
    }
    if let Some(retry) = raw.retry {
        if retry.is_zero() {
            return Err(err("retry", "must be longer than 0s".into()));
        }
        acme.retry = retry;
    }
    Ok(acme)
}

/// The `ca` file must hold a PEM certificate. Read by `portico check`
/// (offline) and by the ACME task, so both report the same words.
pub fn check_ca(path: &std::path::Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    match CertificateDer::from_pem_file(path) {
        Ok(_) => Ok(()),
        Err(rustls_pki_types::pem::Error::Io(e)) => {
            Err(format!("cannot read ca {}: {e}", path.display()))
        }
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(format!(
            "ca {}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )),
        Err(e) => Err(format!(
            "ca {}: not a PEM certificate: {e:?}",
            path.display()
        )),
    }
}
