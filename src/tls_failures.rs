//! Failed TLS handshakes on terminated sites, logged at `warn` so that a
//! client that does not trust the certificate is visible without debug
//! logging: client address, SNI and a reason in words. Rate-limited: at most
//! one line per client address per minute; the rest are counted and one
//! "N more" line per minute says how many were not logged.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::{AlertDescription, PeerIncompatible};

/// One line per client address per this long.
const WINDOW: Duration = Duration::from_secs(60);
/// Bound on remembered addresses (a flood of distinct addresses cannot grow
/// memory): past it, entries older than the window are dropped first.
const MAX_CLIENTS: usize = 16_384;

/// Why a handshake failed, in words, from the error tokio-rustls returned.
pub fn reason(e: &io::Error) -> String {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_reason(tls);
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "client closed the connection during the handshake".into(),
        io::ErrorKind::ConnectionReset => "client reset the connection during the handshake".into(),
        _ => e.to_string(),
    }
}

fn tls_reason(e: &rustls::Error) -> String {
    use AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(
            a @ (A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => format!("client rejected the certificate: {a:?}"),
        rustls::Error::AlertReceived(a) => format!("client sent alert {a:?}"),
        rustls::Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => {
            "no shared cipher".into()
        }
        rustls::Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => {
            "no shared key exchange group".into()
        }
        rustls::Error::PeerIncompatible(PeerIncompatible::NoSignatureSchemesInCommon) => {
            "no shared signature scheme".into()
        }
        rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::SupportedVersionsExtensionRequired,
        ) => "no shared TLS version".into(),
        rustls::Error::NoApplicationProtocol => "no shared ALPN protocol".into(),
        other => other.to_string(),
    }
}

#[derive(Default)]
struct State {
    last_logged: HashMap<IpAddr, Instant>,
    suppressed: u64,
    /// A task will log the suppressed count when the minute is over.
    summary_pending: bool,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(State::default()))
}

/// Log a failed handshake (rate-limited). Call from within the runtime.
pub fn report(site: &str, client: SocketAddr, sni: Option<&str>, reason: &str) {
    let now = Instant::now();
    let Ok(mut s) = state().lock() else { return };
    let recent = s
        .last_logged
        .get(&client.ip())
        .is_some_and(|t| now.duration_since(*t) < WINDOW);
    if !recent {
        if s.last_logged.len() >= MAX_CLIENTS {
            s.last_logged.retain(|_, t| now.duration_since(*t) < WINDOW);
            if s.last_logged.len() >= MAX_CLIENTS {
                s.last_logged.clear();
            }
        }
        s.last_logged.insert(client.ip(), now);
        drop(s);
        tracing::warn!(
            site,
            client = %client,
            sni = sni.unwrap_or("-"),
            reason,
            "TLS handshake failed"
        );
        return;
    }
    s.suppressed += 1;
    if !s.summary_pending && tokio::runtime::Handle::try_current().is_ok() {
        s.summary_pending = true;
        tokio::spawn(async {
            tokio::time::sleep(WINDOW).await;
            let n = state().lock().map_or(0, |mut s| {
                s.summary_pending = false;
                std::mem::take(&mut s.suppressed)
            });
            if n > 0 {
                tracing::warn!(
                    suppressed = n,
                    "{n} more failed TLS handshakes in the last minute not logged (one line per client address per minute)"
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn reasons_in_words() {
        assert_eq!(
            reason(&wrapped(rustls::Error::AlertReceived(
                AlertDescription::UnknownCA
            ))),
            "client rejected the certificate: UnknownCA"
        );
        assert_eq!(
            reason(&wrapped(rustls::Error::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
            ))),
            "no shared cipher"
        );
        assert_eq!(
            reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "client closed the connection during the handshake"
        );
    }
}
