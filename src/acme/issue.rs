//! One ACME order through instant-acme: the account (created once, stored),
//! the challenges published for the listeners to answer, the CSR, and the
//! issued chain. No retry here; the caller schedules.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, Problem, RetryPolicy,
};

use crate::config::acme::{check_ca, Acme, Challenge};

use super::cert;
use super::challenge::{self, Pending};
use super::store::Store;

/// How long one order may wait for validation and issuance. Validators
/// retry from several vantage points; a minute is generous.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an order did not produce a certificate. Messages are one line;
/// `problem()` gives the ACME problem document when the server sent one.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}")]
    Ca(String),
    #[error("ACME directory {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("{url} is not an ACME directory (its answer is not a directory object)")]
    NotAcme {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME account")]
    Account(#[source] instant_acme::Error),
    #[error("ACME order for {names}")]
    Order {
        names: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("validation of {name} failed: {}", describe(.problem))]
    Challenge { name: String, problem: Problem },
    #[error("the ACME server offers no {kind} challenge for {name}")]
    NoChallenge { name: String, kind: &'static str },
    #[error("{0}")]
    Local(String),
    #[error("cannot store the ACME state under {dir}")]
    Store {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl AcmeError {
    /// The ACME problem document, when the server sent one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            AcmeError::Challenge { problem, .. } => Some(problem),
            AcmeError::Account(e)
            | AcmeError::Order { source: e, .. }
            | AcmeError::Unreachable { source: e, .. }
            | AcmeError::NotAcme { source: e, .. } => match e {
                instant_acme::Error::Api(p) => Some(p),
                _ => None,
            },
            _ => None,
        }
    }
}

fn describe(p: &Problem) -> String {
    let mut s = format!(
        "{}: {}",
        p.r#type.as_deref().unwrap_or("(no problem type)"),
        p.detail.as_deref().unwrap_or("(no detail)")
    );
    for sub in &p.subproblems {
        s.push_str(&format!("; {sub}"));
    }
    s
}

/// The error and its sources on one line: "a: b: c".
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        let part = src.to_string();
        if !s.ends_with(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        next = src.source();
    }
    s.replace('\n', " ")
}

/// The account for this directory: restored from `account.json`, or
/// created (and stored) on first use.
pub async fn account(acme: &Acme, store: &Store) -> Result<Account, AcmeError> {
    let builder = || match &acme.ca {
        Some(ca) => Ok(Account::builder_with_http(client_with_extra_root(ca)?)),
        None => Account::builder().map_err(|e| AcmeError::Local(format!("HTTPS client: {e}"))),
    };
    let directory_error = |e: instant_acme::Error| match e {
        instant_acme::Error::Json(_) | instant_acme::Error::Api(_) => AcmeError::NotAcme {
            url: acme.directory.clone(),
            source: e,
        },
        other => AcmeError::Unreachable {
            url: acme.directory.clone(),
            source: other,
        },
    };
    if let Ok(text) = std::fs::read(store.account()) {
        if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&text) {
            return builder()?
                .from_credentials(creds)
                .await
                .map_err(directory_error);
        }
        tracing::warn!(file = %store.account().display(), "unreadable ACME account file; creating a new account");
    }
    let contact = acme.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, creds) = match builder()?.create(&new, acme.directory.clone(), None).await {
        Ok(x) => x,
        // Fetching the directory failed, or the server refused the account.
        Err(
            e @ (instant_acme::Error::Json(_)
            | instant_acme::Error::Hyper(_)
            | instant_acme::Error::Other(_)),
        ) => return Err(directory_error(e)),
        Err(e) => return Err(AcmeError::Account(e)),
    };
    let json = serde_json::to_vec(&creds)
        .map_err(|e| AcmeError::Local(format!("account credentials: {e}")))?;
    store.save_account(&json).map_err(|e| AcmeError::Store {
        dir: store.account().display().to_string(),
        source: e,
    })?;
    tracing::info!(directory = %acme.directory, id = account.id(), "ACME account created");
    Ok(account)
}

/// The directory's HTTPS client when `acme.ca` is set: the system's roots
/// plus every certificate in that file.
fn client_with_extra_root(
    ca: &std::path::Path,
) -> Result<Box<dyn instant_acme::HttpClient>, AcmeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    check_ca(ca).map_err(AcmeError::Ca)?;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system roots are not fatal: the extra root may be all
    // a private ACME server needs.
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let extra = CertificateDer::pem_file_iter(ca)
        .map_err(|e| AcmeError::Ca(format!("cannot read ca {}: {e:?}", ca.display())))?;
    for c in extra {
        let c = c.map_err(|e| AcmeError::Ca(format!("ca {}: {e:?}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| AcmeError::Ca(format!("ca {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Local(format!("HTTPS client: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    Ok(Box::new(client))
}

/// An issued certificate: the chain and its key, PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Order a certificate for `names`, answering `challenge`.
pub async fn order(
    account: &Account,
    names: &[String],
    challenge: Challenge,
) -> Result<Issued, AcmeError> {
    let order_err = |e| AcmeError::Order {
        names: names.join(","),
        source: e,
    };
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(order_err)?;
    // Answers stay published until this function returns, whatever the outcome.
    let mut pending: Vec<Pending> = Vec::new();
    let kind = match challenge {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    };
    {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(order_err)?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Reused from an earlier order.
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Local(format!(
                        "authorization for {} is {other:?}",
                        authz.identifier()
                    )))
                }
            }
            let name = authz.identifier().to_string();
            let Some(mut ch) = authz.challenge(kind.clone()) else {
                return Err(AcmeError::NoChallenge {
                    name,
                    kind: challenge.as_str(),
                });
            };
            let ka = ch.key_authorization();
            pending.push(match challenge {
                Challenge::TlsAlpn01 => {
                    let key =
                        cert::tls_alpn01(&name, ka.digest().as_ref()).map_err(AcmeError::Local)?;
                    challenge::add_tls_alpn(&name, key)
                }
                Challenge::Http01 => challenge::add_http01(&ch.token, ka.as_str()),
            });
            ch.set_ready().await.map_err(order_err)?;
        }
    }
    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(ORDER_TIMEOUT);
    let status = order.poll_ready(&policy).await.map_err(order_err)?;
    if status != OrderStatus::Ready {
        return Err(validation_problem(&mut order, names).await);
    }
    drop(pending);
    let (csr, key_pem) = cert::csr(names).map_err(AcmeError::Local)?;
    order.finalize_csr(&csr).await.map_err(order_err)?;
    let chain_pem = order.poll_certificate(&policy).await.map_err(order_err)?;
    Ok(Issued { chain_pem, key_pem })
}

/// The problem document of the first failed challenge (refreshed from the
/// server), else the order's own.
async fn validation_problem(order: &mut instant_acme::Order, names: &[String]) -> AcmeError {
    let order_problem = order.state().error.clone();
    let mut authzs = order.authorizations();
    while let Some(Ok(mut authz)) = authzs.next().await {
        if authz.refresh().await.is_err() {
            continue;
        }
        let name = authz.identifier().to_string();
        if let Some(problem) = authz.challenges.iter().find_map(|c| c.error.clone()) {
            return AcmeError::Challenge { name, problem };
        }
    }
    match order_problem {
        Some(problem) => AcmeError::Challenge {
            name: names.join(","),
            problem,
        },
        None => AcmeError::Local(format!(
            "the order for {} became invalid with no problem document",
            names.join(",")
        )),
    }
}
