//! Certificates for `cert = "acme"` sites: issuance and renewal through an
//! ACME server (instant-acme), with no restart and no dropped connection.
//!
//! - Each acme site has a [`Slot`]: the certificate its handshakes get, read
//!   by a rustls resolver on every handshake and swapped whole (ArcSwap) when
//!   a certificate is issued. Slots outlive config generations, so a reload
//!   keeps the issued certificate and the retry state.
//! - Until the first certificate exists (none stored under `acme.storage`),
//!   a slot serves a temporary self-signed one.
//! - [`start`] runs one task per acme site for a config generation; the
//!   server cancels them when the next generation is published or on
//!   shutdown. A task orders when the slot has no usable ACME certificate,
//!   renews when a third of the lifetime is left (or inside the server's
//!   ACME Renewal Information window) with jitter, and retries failures with
//!   a doubling, capped delay while the slot keeps its certificate.
//! - Challenges are answered by the listeners through [`tls_alpn_for`] +
//!   [`answer_tls_alpn`] and [`http01_response`].

pub mod cert;
mod challenge;
mod issue;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use instant_acme::Account;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::acme::{Acme, MAX_RETRY};
use crate::config::{CertSource, Config, Site, SniPattern};
use crate::metrics as m;

pub use cert::{Served, Source};
pub use challenge::{answer_tls_alpn, http01_response, tls_alpn_for, ACME_TLS_ALPN};
pub use issue::one_line;

/// Renewal starts this early before a third of the lifetime is left, at
/// most: a fleet restarted together does not renew in the same second.
const JITTER_FRACTION: u32 = 30;
/// A valid certificate is looked at again at least this often (ARI windows
/// move; a clock jump should not leave a certificate unrenewed).
const RECHECK: Duration = Duration::from_secs(6 * 3600);

/// The certificate one acme site serves, and its retry state.
pub struct Slot {
    site: String,
    served: ArcSwap<Served>,
    /// Consecutive failed orders and when the next may start.
    retry: Mutex<(u32, Option<Instant>)>,
}

impl Slot {
    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<Served> {
        self.served.load_full()
    }

    fn install(&self, served: Served) {
        let served = Arc::new(served);
        m::set_certificate_expiry(&self.site, served.source.as_str(), served.expiry_seconds());
        self.served.store(served);
    }
}

static SLOTS: LazyLock<Mutex<HashMap<String, Arc<Slot>>>> = LazyLock::new(Default::default);

/// The exact names an acme site's certificate is issued for.
pub fn exact_names(site: &Site) -> Vec<String> {
    site.names
        .iter()
        .filter_map(|p| match p {
            SniPattern::Exact(n) => Some(n.clone()),
            SniPattern::Wildcard(_) => None,
        })
        .collect()
}

/// The slot of an acme site, created on first use from the stored
/// certificate or, when there is none, a temporary self-signed one.
pub fn slot(site: &Site, acme: &Acme) -> Result<Arc<Slot>, String> {
    let mut slots = SLOTS.lock().map_err(|_| "certificate slots poisoned")?;
    if let Some(s) = slots.get(&site.name) {
        return Ok(s.clone());
    }
    let names = exact_names(site);
    let stored = store::Store::new(acme)
        .load(&site.name)
        .filter(|s| s.covers(&names) && s.not_after > SystemTime::now());
    let served = match stored {
        Some(s) => {
            info!(site = %site.name, "using the stored ACME certificate");
            s
        }
        None => {
            info!(site = %site.name, names = ?names, "no ACME certificate yet: serving a temporary self-signed one until it is issued");
            cert::self_signed(&names)?
        }
    };
    m::set_certificate_expiry(&site.name, served.source.as_str(), served.expiry_seconds());
    let slot = Arc::new(Slot {
        site: site.name.clone(),
        served: ArcSwap::from_pointee(served),
        retry: Mutex::new((0, None)),
    });
    slots.insert(site.name.clone(), slot.clone());
    Ok(slot)
}

/// Serves whatever the slot holds at the moment of each handshake.
#[derive(Clone)]
pub struct SlotResolver(pub Arc<Slot>);

impl std::fmt::Debug for SlotResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SlotResolver").field(&self.0.site).finish()
    }
}

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.served.load().key.clone())
    }
}

/// The resolver an acme site's TLS config uses.
pub fn resolver(site: &Site, acme: &Acme) -> Result<Arc<dyn ResolvesServerCert>, String> {
    Ok(Arc::new(SlotResolver(slot(site, acme)?)))
}

/// Start the issuance/renewal tasks of a config generation; they stop when
/// `stop` is cancelled (next generation published, or shutdown).
pub fn start(cfg: &Config, stop: CancellationToken) {
    let mut jobs = Vec::new();
    for site in cfg.sites.values() {
        // Every site has the series (0 without ACME), so the dashboard's
        // queries find them from start-up.
        for result in ["ok", "error"] {
            metrics::counter!(m::ACME_ORDERS, "site" => site.name.clone(), "result" => result)
                .increment(0);
        }
        if let CertSource::Acme(acme) = &site.cert {
            let slot = match slot(site, acme) {
                Ok(s) => s,
                Err(e) => {
                    warn!(site = %site.name, error = %e, "no certificate slot; not ordering");
                    continue;
                }
            };
            jobs.push((slot, exact_names(site), acme.clone()));
        }
    }
    if jobs.is_empty() {
        return;
    }
    // One account per generation, created by whichever site needs it first.
    let account: Arc<tokio::sync::Mutex<Option<Account>>> = Default::default();
    for (slot, names, acme) in jobs {
        let stop = stop.clone();
        let account = account.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = site_loop(slot, names, acme, account) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn get_account(
    cell: &tokio::sync::Mutex<Option<Account>>,
    acme: &Acme,
    store: &store::Store,
) -> Result<Account, issue::AcmeError> {
    let mut guard = cell.lock().await;
    if let Some(a) = guard.as_ref() {
        return Ok(a.clone());
    }
    let a = issue::account(acme, store).await?;
    *guard = Some(a.clone());
    Ok(a)
}

async fn site_loop(
    slot: Arc<Slot>,
    names: Vec<String>,
    acme: Arc<Acme>,
    account: Arc<tokio::sync::Mutex<Option<Account>>>,
) {
    let store = store::Store::new(&acme);
    let site = slot.site.clone();
    loop {
        // A certificate stored by an earlier generation (other storage or
        // directory) or by a previous run replaces a worse one in the slot.
        let current = slot.current();
        if let Some(stored) = store.load(&site) {
            let better = current.source != Source::Acme
                || !current.covers(&names)
                || stored.not_after > current.not_after;
            if better && stored.covers(&names) && stored.not_after > SystemTime::now() {
                info!(site, "using the stored ACME certificate");
                slot.install(stored);
            }
        }
        let current = slot.current();
        let usable = current.source == Source::Acme && current.covers(&names);
        let mut due = if usable {
            renewal_due(&current, &acme, &store, &account).await
        } else {
            Instant::now()
        };
        let retry_at = slot.retry.lock().ok().and_then(|r| r.1);
        if let Some(at) = retry_at {
            due = due.max(at);
        }
        let now = Instant::now();
        if due > now {
            let wait = due - now;
            debug!(site, wait = ?wait, "next certificate check");
            tokio::time::sleep(wait.min(RECHECK)).await;
            if wait > RECHECK {
                continue;
            }
        }
        let kind = if usable { "renewal" } else { "issuance" };
        info!(site, names = ?names, challenge = acme.challenge.as_str(), "ACME {kind}: placing an order");
        let started = Instant::now();
        match attempt(&slot, &names, &acme, &store, &account).await {
            Ok(not_after) => {
                metrics::counter!(m::ACME_ORDERS, "site" => site.clone(), "result" => "ok")
                    .increment(1);
                if let Ok(mut r) = slot.retry.lock() {
                    *r = (0, None);
                }
                info!(site, took = ?started.elapsed(), not_after = %humantime::format_rfc3339_seconds(not_after), "ACME certificate issued and in use");
            }
            Err(e) => {
                metrics::counter!(m::ACME_ORDERS, "site" => site.clone(), "result" => "error")
                    .increment(1);
                let failures = slot.retry.lock().map(|r| r.0 + 1).unwrap_or(1);
                let delay = backoff(acme.retry, failures);
                if let Ok(mut r) = slot.retry.lock() {
                    *r = (failures, Some(Instant::now() + delay));
                }
                let problem = e.problem();
                let unknown_account = problem
                    .and_then(|p| p.r#type.as_deref())
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist"));
                if unknown_account {
                    // The server forgot the stored account (a test CA reset,
                    // a deactivated account): the next attempt creates one.
                    let _ = std::fs::remove_file(store.account());
                }
                if unknown_account
                    || matches!(
                        e,
                        issue::AcmeError::Unreachable { .. }
                            | issue::AcmeError::NotAcme { .. }
                            | issue::AcmeError::Ca(_)
                    )
                {
                    // The account is fetched again on the next attempt.
                    *account.lock().await = None;
                }
                warn!(
                    site,
                    failures,
                    retry_in = %humantime::format_duration(delay),
                    problem_type = %problem.and_then(|p| p.r#type.as_deref()).unwrap_or("-"),
                    detail = problem.and_then(|p| p.detail.as_deref()).unwrap_or("-"),
                    "ACME {kind} failed, keeping the current certificate: {}",
                    one_line(&e)
                );
            }
        }
    }
}

/// Order, store, and install a certificate; returns its notAfter.
async fn attempt(
    slot: &Slot,
    names: &[String],
    acme: &Acme,
    store: &store::Store,
    account: &tokio::sync::Mutex<Option<Account>>,
) -> Result<SystemTime, issue::AcmeError> {
    let account = get_account(account, acme, store).await?;
    let issued = issue::order(&account, names, acme.challenge).await?;
    let served = cert::from_pem(
        issued.chain_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        Source::Acme,
    )
    .map_err(|e| issue::AcmeError::Local(format!("the issued certificate: {e}")))?;
    store
        .save(&slot.site, &issued.chain_pem, &issued.key_pem)
        .map_err(|e| issue::AcmeError::Store {
            dir: acme.storage.display().to_string(),
            source: e,
        })?;
    let not_after = served.not_after;
    slot.install(served);
    Ok(not_after)
}

/// `retry`, doubled per failure after the first, capped at [`MAX_RETRY`].
fn backoff(first: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(MAX_RETRY.max(first))
}

/// When to renew: inside the ARI window when the server publishes one,
/// else when a third of the lifetime is left; minus up to 1/30 of the
/// lifetime of jitter.
async fn renewal_due(
    current: &Served,
    acme: &Acme,
    store: &store::Store,
    account: &tokio::sync::Mutex<Option<Account>>,
) -> Instant {
    let lifetime = current
        .not_after
        .duration_since(current.not_before)
        .unwrap_or_default();
    let jitter = lifetime / JITTER_FRACTION;
    let jitter = jitter.mul_f64(random_fraction());
    let third = current.not_after - lifetime / 3 - jitter;
    let mut at = third;
    if let Some(window) = ari_window(current, acme, store, account).await {
        let (start, end) = window;
        let span = end.duration_since(start).unwrap_or_default();
        at = start + span.mul_f64(random_fraction());
    }
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    Instant::now() + wait
}

/// The server's suggested renewal window (RFC 9773), when it has one.
async fn ari_window(
    current: &Served,
    acme: &Acme,
    store: &store::Store,
    account: &tokio::sync::Mutex<Option<Account>>,
) -> Option<(SystemTime, SystemTime)> {
    let leaf = current.leaf()?;
    let id = instant_acme::CertificateIdentifier::try_from(leaf).ok()?;
    let account = match get_account(account, acme, store).await {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %one_line(&e), "no renewal information: the account is not available");
            return None;
        }
    };
    match account.renewal_info(&id).await {
        Ok((info, _)) => {
            let start = SystemTime::from(info.suggested_window.start);
            let end = SystemTime::from(info.suggested_window.end);
            (end >= start).then_some((start, end))
        }
        Err(instant_acme::Error::Unsupported(_)) => None,
        Err(e) => {
            debug!(error = %one_line(&e), "renewal information unavailable");
            None
        }
    }
}

/// A uniform fraction in [0, 1) from the system's secure random source.
fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    let rng = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    if rng.fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 1), s);
        assert_eq!(backoff(s, 2), 2 * s);
        assert_eq!(backoff(s, 4), 8 * s);
        assert_eq!(backoff(s, 40), MAX_RETRY);
    }
}
