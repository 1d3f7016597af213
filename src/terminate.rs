//! `terminate` routes: the TLS handshake (over the peeked bytes), then HTTP,
//! or the site's `non_http` backend for decrypted streams that are not HTTP.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::config::{Limits, Timeouts};
use crate::hello::{self, Peeked};
use crate::http::framing::{Framing, Verdict};
use crate::http::site::{ConnContext, SiteRuntime};
use crate::http::{self as h, Negotiated};
use crate::io::Prefixed;
use crate::lifecycle::{ConnSlot, Lifecycle};
use crate::metrics as m;
use crate::proxy_protocol::{ConnInfo, Outbound};
use crate::tunnel;

use crate::http::conformance::{self, H2_PREFACE};

/// A terminated site ready for connections: its TLS acceptor, its compiled
/// HTTP side, and the timeouts and limits of the generation it belongs to.
pub struct TerminatedSite {
    pub name: Arc<str>,
    pub acceptor: TlsAcceptor,
    pub http: Arc<SiteRuntime>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// hyper's server settings, from `limits` and `timeouts`.
    pub http_builder: h::Builder,
    /// `non_http`: where decrypted traffic that is not HTTP goes.
    pub non_http: Option<tunnel::Target>,
}

impl TerminatedSite {
    pub fn new(
        acceptor: TlsAcceptor,
        http: Arc<SiteRuntime>,
        timeouts: Timeouts,
        limits: Limits,
    ) -> TerminatedSite {
        TerminatedSite {
            name: http.name.clone(),
            non_http: http.config.non_http.clone().map(tunnel::Target::new),
            acceptor,
            http,
            http_builder: h::builder(&limits, &timeouts),
            timeouts,
            limits,
        }
    }
}

/// Complete the TLS handshake on a connection routed to `site` and read
/// until it is known what the client speaks. Returns the HTTP connection to
/// run; `None` when there is nothing more to do: the handshake failed, the
/// client stayed silent or spoke the wrong protocol, or the stream was not
/// HTTP and went to the site's `non_http` backend here, to its end.
/// `sni` is the name the ClientHello asked for (for the failure log).
///
/// The caller boxes this future and drops it once the handshake is done:
/// the handshake's state is larger than what a connection needs while it
/// is served, and a streaming response can be open for hours.
pub async fn establish(
    io: Prefixed<TcpStream>,
    entry: &TerminatedSite,
    info: ConnInfo,
    sni: Option<&str>,
    life: &Lifecycle,
    slot: Arc<ConnSlot>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static + use<>> {
    let site = &*entry.name;
    let timeouts = &entry.timeouts;
    let handshake = tokio::select! {
        r = tokio::time::timeout(timeouts.tls_handshake, entry.acceptor.accept(io)) => r,
        // No request can be in progress before the handshake is done.
        _ = life.shutdown.cancelled() => return None,
    };
    let mut tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "site" => entry.name.clone()).increment(1);
            crate::tls_failures::report(site, info.client, sni, &crate::tls_failures::reason(&e));
            return None;
        }
        Err(_) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "site" => entry.name.clone()).increment(1);
            crate::tls_failures::report(site, info.client, sni, "timeout");
            return None;
        }
    };
    let negotiated = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Negotiated::H2,
        Some(b"http/1.1") => Negotiated::Http1,
        _ => Negotiated::Unknown,
    };

    let mut first = BytesMut::new();
    if let Some(target) = &entry.non_http {
        // The first decrypted bytes decide: HTTP goes to the HTTP server,
        // anything else (VLESS, Trojan, ...) to the non_http backend.
        let peeked = tokio::select! {
            p = hello::peek(&mut tls, &mut first, timeouts.request_header) => p,
            _ = life.shutdown.cancelled() => return None,
        };
        match peeked {
            Ok(Peeked::Http) => {}
            Ok(_) | Err(hello::PeekError::Detect(_)) => {
                // Owned: the TLS stream moves into the tunnel below.
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().map(str::to_string);
                let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
                let out = Outbound {
                    source: info.client,
                    destination: info.local,
                    sni: sni.as_deref(),
                    alpn: alpn.as_deref(),
                };
                let job = tunnel::Job::new(target, &out, &first, site, timeouts, false);
                // Boxed so HTTP connections do not reserve the tunnel's space.
                Box::pin(tunnel::serve(
                    tunnel::ClientSide::Stream(tls),
                    job,
                    &life.hard_stop,
                ))
                .await;
                return None;
            }
            Err(e) => {
                debug!(site, client = %info.client, error = %e, "no first bytes after the handshake; closing");
                return None;
            }
        }
    }

    // The first bytes choose HTTP/1.1 or h2 (and must match what ALPN
    // chose), and hyper's header_read_timeout only starts once hyper has the
    // connection. Read them here, within request_header, so a client that
    // completes the handshake and then stays silent, or stops inside the h2
    // preface, does not hold its connection slot forever.
    let version_known = async {
        loop {
            let n = first.len().min(H2_PREFACE.len());
            if n == H2_PREFACE.len() || (n > 0 && first[..n] != H2_PREFACE[..n]) {
                return true;
            }
            match tls.read_buf(&mut first).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    };
    let known = tokio::select! {
        r = tokio::time::timeout(timeouts.request_header, version_known) => matches!(r, Ok(true)),
        _ = life.shutdown.cancelled() => return None,
    };
    if !known {
        debug!(site, client = %info.client, "no request within request_header after the handshake; closing");
        return None;
    }
    // ALPN is binding: what the client negotiated is what it must speak.
    // Past this check HTTP/1.1 or h2 is settled (without ALPN, by whether
    // the first bytes are the h2 preface).
    let served = match conformance::check_first_bytes(negotiated, &first) {
        conformance::Verdict::Serve { h2 } => Ok(h2),
        conformance::Verdict::NotH2 => Err(conformance::GOAWAY_PROTOCOL_ERROR.to_vec()),
        conformance::Verdict::H2OnHttp1 => Err(conformance::preface_on_http1_response()),
    };
    let h2 = match served {
        Ok(h2) => h2,
        Err(bytes) => {
            use tokio::io::AsyncWriteExt;
            debug!(site, client = %info.client, alpn = ?negotiated, "first bytes do not match the negotiated protocol; refusing");
            let _ = tokio::time::timeout(timeouts.request_header, async {
                tls.write_all(&bytes).await?;
                tls.shutdown().await
            })
            .await;
            return None;
        }
    };

    let verdict = Arc::new(Verdict::default());
    let ctx = Arc::new(ConnContext {
        client: info.client.ip(),
        forwarded: crate::http::headers::ClientAddr::new(info.client.ip()),
        verdict: verdict.clone(),
        life: life.clone(),
        slot,
    });
    Some(h::serve(
        Framing::new(
            Prefixed::new(first, tls),
            entry.limits.max_header_size,
            entry.limits.max_headers,
            verdict,
            !h2,
            timeouts.request_header,
        ),
        &entry.http_builder,
        h2,
        entry.http.clone(),
        ctx,
    ))
}
