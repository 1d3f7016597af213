//! Metric names (the contract in the README), their help texts and buckets,
//! the Prometheus recorder, and RAII guards for gauges.
//!
//! Label values are always names from the config or small fixed sets, never
//! client-supplied strings, so no client can grow the number of series.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "portico_connections_total";
pub const CLIENT_HELLO_FAILURES: &str = "portico_client_hello_failures_total";
pub const PROXY_HEADER_FAILURES: &str = "portico_proxy_header_failures_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "portico_tls_handshake_failures_total";
pub const TUNNEL_ACTIVE: &str = "portico_tunnel_active";
pub const TUNNEL_BYTES: &str = "portico_tunnel_bytes_total";
pub const TUNNEL_DURATION: &str = "portico_tunnel_duration_seconds";
pub const BACKEND_CONNECT_FAILURES: &str = "portico_backend_connect_failures_total";
pub const HTTP_REQUESTS: &str = "portico_http_requests_total";
pub const HTTP_FIRST_BYTE: &str = "portico_http_first_byte_seconds";
pub const HTTP_STREAM_DURATION: &str = "portico_http_stream_duration_seconds";
pub const HTTP_STREAMS_ACTIVE: &str = "portico_http_streams_active";
pub const HTTP_BODY_BYTES: &str = "portico_http_body_bytes_total";
pub const SSE_EVENTS: &str = "portico_sse_events_total";
pub const WEBSOCKET_MESSAGES: &str = "portico_websocket_messages_total";
pub const UPSTREAM_FAILURES: &str = "portico_upstream_failures_total";
pub const UPSTREAM_CONNECTIONS: &str = "portico_upstream_connections";
pub const CONFIG_RELOADS: &str = "portico_config_reloads_total";
pub const CONNECTIONS_ACTIVE: &str = "portico_connections_active";
pub const CONNECTIONS_REFUSED: &str = "portico_connections_refused_total";
/// notAfter of the certificate each site serves; `source` is file|acme|self-signed.
pub const CERTIFICATE_EXPIRY: &str = "portico_certificate_expiry_timestamp_seconds";
/// ACME orders per site by result (ok|error).
pub const ACME_ORDERS: &str = "portico_acme_orders_total";
pub const WEBSOCKET_RESPONSE: &str = "portico_websocket_response_seconds";

/// First byte: 1 ms to 60 s, roughly x2.5 per step (LLM first tokens take seconds).
const FIRST_BYTE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Stream and tunnel durations: 10 ms to 4 h.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// Install the global recorder (once per process) and describe every metric.
pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_FIRST_BYTE.into()), FIRST_BYTE_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(HTTP_STREAM_DURATION.into()), DURATION_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(TUNNEL_DURATION.into()), DURATION_BUCKETS)
        })
        .and_then(|b| {
            // A WebSocket turn's time to first token: the HTTP first-byte scale.
            b.set_buckets_for_metric(Matcher::Full(WEBSOCKET_RESPONSE.into()), FIRST_BYTE_BUCKETS)
        })
        .map_err(|e| e.to_string())?;
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(CERTIFICATE_EXPIRY, Unit::Seconds, "Expiry (notAfter, Unix time) of the certificate each site serves, by source (file|acme|self-signed); a source no longer served reads NaN.");
    describe_counter!(
        ACME_ORDERS,
        "ACME certificate orders per site by result (ok|error)."
    );
    describe_counter!(CONNECTIONS, "Accepted connections by listener, matched route and action (pass|terminate|redirect|reject).");
    describe_counter!(
        CLIENT_HELLO_FAILURES,
        "Connections closed before routing, by reason (timeout|malformed|too_large|no_route)."
    );
    describe_counter!(PROXY_HEADER_FAILURES, "Inbound PROXY headers refused, by listener and reason (untrusted|malformed|too_large|timeout|eof|io).");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed on terminated sites."
    );
    describe_gauge!(TUNNEL_ACTIVE, "Open passthrough tunnels per backend.");
    describe_counter!(TUNNEL_BYTES, Unit::Bytes, "Bytes passed through tunnels per backend; direction is upstream (client to backend) or downstream.");
    describe_histogram!(
        TUNNEL_DURATION,
        Unit::Seconds,
        "Lifetime of passthrough tunnels per backend."
    );
    describe_counter!(
        BACKEND_CONNECT_FAILURES,
        "Failed connects to passthrough backends."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by site, location, method, status and protocol (http1|h2)."
    );
    describe_histogram!(
        HTTP_FIRST_BYTE,
        Unit::Seconds,
        "Time from request start to the first response body byte."
    );
    describe_histogram!(
        HTTP_STREAM_DURATION,
        Unit::Seconds,
        "Duration of HTTP responses by kind (http|sse|websocket)."
    );
    describe_gauge!(
        HTTP_STREAMS_ACTIVE,
        "Open HTTP responses by kind (http|sse|websocket)."
    );
    describe_counter!(
        HTTP_BODY_BYTES,
        Unit::Bytes,
        "HTTP body bytes; direction is request or response."
    );
    describe_counter!(
        SSE_EVENTS,
        "Server-sent events relayed to clients, counted at each blank line that ends one; comment-only keepalives (\": ping\") count too."
    );
    describe_counter!(
        WEBSOCKET_MESSAGES,
        "WebSocket messages relayed; direction is client_to_upstream or upstream_to_client."
    );
    describe_counter!(
        UPSTREAM_FAILURES,
        "Failed upstream requests by reason (refused|timeout|reset|protocol)."
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        "Open pooled connections to each upstream, idle or carrying a request (WebSocket connections are not pooled and not counted)."
    );
    describe_counter!(CONFIG_RELOADS, "Config reloads by result (ok|error).");
    describe_gauge!(CONNECTIONS_ACTIVE, "Open client connections per listener.");
    describe_histogram!(
        WEBSOCKET_RESPONSE,
        Unit::Seconds,
        "WebSocket: time from a client-to-upstream data message to the upstream's next data message (a turn's time to first token)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at accept because a limit was reached, by listener and limit."
    );
}

/// Set `portico_certificate_expiry_timestamp_seconds{site,source}` to
/// `not_after` (Unix seconds). When the site served a certificate from
/// another source before (a file, then ACME; self-signed, then ACME), that
/// series reads NaN from now on: the exporter cannot drop a series, and
/// NaN never fires an expiry alert.
pub fn set_certificate_expiry(site: &str, source: &'static str, not_after: f64) {
    static LAST: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<String, &'static str>>,
    > = std::sync::LazyLock::new(Default::default);
    if let Ok(mut last) = LAST.lock() {
        match last.insert(site.to_string(), source) {
            Some(old) if old != source => {
                metrics::gauge!(CERTIFICATE_EXPIRY, "site" => site.to_string(), "source" => old)
                    .set(f64::NAN);
            }
            _ => {}
        }
    }
    metrics::gauge!(CERTIFICATE_EXPIRY, "site" => site.to_string(), "source" => source)
        .set(not_after);
}

/// Increments a gauge now and decrements it when dropped, whichever way the
/// owner ends (return, error, panic, cancellation).
#[must_use]
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Handles for one passthrough backend's tunnels, registered once when the
/// config is loaded: `gauge!`/`counter!` build a label vector and look it up
/// in the registry on every call, about 2,600 instructions per tunnel for
/// the five of them (callgrind, short tunnels).
#[derive(Debug)]
pub struct BackendMetrics {
    pub active: metrics::Gauge,
    pub bytes_up: metrics::Counter,
    pub bytes_down: metrics::Counter,
    pub duration: metrics::Histogram,
    pub connect_failures: metrics::Counter,
}

impl BackendMetrics {
    pub fn new(backend: &std::sync::Arc<str>) -> BackendMetrics {
        let b = || backend.clone();
        BackendMetrics {
            active: metrics::gauge!(TUNNEL_ACTIVE, "backend" => b()),
            bytes_up: metrics::counter!(TUNNEL_BYTES, "backend" => b(), "direction" => "upstream"),
            bytes_down: metrics::counter!(TUNNEL_BYTES, "backend" => b(), "direction" => "downstream"),
            duration: metrics::histogram!(TUNNEL_DURATION, "backend" => b()),
            connect_failures: metrics::counter!(BACKEND_CONNECT_FAILURES, "backend" => b()),
        }
    }
}

/// Kinds of HTTP streams, in the order of [`LocationMetrics`]' arrays.
pub const STREAM_KINDS: [&str; 3] = ["http", "sse", "websocket"];

/// Handles for one (site, location), registered once when the config is
/// loaded so that a request touches no registry (and every series exists,
/// at zero, from the start).
pub struct LocationMetrics {
    pub site: std::sync::Arc<str>,
    pub location: std::sync::Arc<str>,
    pub first_byte: metrics::Histogram,
    pub body_request: metrics::Counter,
    pub body_response: metrics::Counter,
    pub sse_events: metrics::Counter,
    pub ws_to_upstream: metrics::Counter,
    pub ws_to_client: metrics::Counter,
    /// `portico_websocket_response_seconds`.
    pub ws_response: metrics::Histogram,
    /// Indexed like [`STREAM_KINDS`].
    pub active: [metrics::Gauge; 3],
    pub duration: [metrics::Histogram; 3],
    /// `portico_http_requests_total` handles, made on first use.
    pub requests: RequestCounters,
}

/// Counter handles kept once made, by their varying labels: `counter!`
/// with labels builds a label vector and looks it up in the registry on
/// every call (an allocation and a hash). Bounded: at most
/// [`KeptCounters::MAX`] keys are kept, the rest go through `make` on every
/// call.
#[derive(Debug)]
pub struct KeptCounters<K> {
    known: std::sync::Mutex<Vec<(K, metrics::Counter)>>,
}

impl<K> Default for KeptCounters<K> {
    fn default() -> Self {
        KeptCounters {
            known: Default::default(),
        }
    }
}

impl<K: PartialEq + Clone> KeptCounters<K> {
    pub const MAX: usize = 64;

    /// Add one to `key`'s counter; `make` registers it the first time.
    pub fn increment(&self, key: &K, make: impl FnOnce() -> metrics::Counter) {
        let Ok(mut known) = self.known.lock() else {
            return make().increment(1);
        };
        if let Some((_, c)) = known.iter().find(|(k, _)| k == key) {
            return c.increment(1);
        }
        let counter = make();
        counter.increment(1);
        if known.len() < Self::MAX {
            known.push((key.clone(), counter));
        }
    }
}

/// A location's `portico_http_requests_total` handles, by (status, method,
/// protocol).
pub type RequestCounters = KeptCounters<(u16, &'static str, &'static str)>;

/// A route's `portico_connections_total` handles, by listener: the lookup
/// with three labels cost about 1,200 instructions per connection.
pub type ListenerCounters = KeptCounters<std::sync::Arc<str>>;

impl LocationMetrics {
    pub fn new(site: &str, location: &str) -> LocationMetrics {
        let (s, l) = (site.to_string(), location.to_string());
        let lab = |extra: (&'static str, &'static str)| {
            vec![
                metrics::Label::new("site", s.clone()),
                metrics::Label::new("location", l.clone()),
                metrics::Label::new(extra.0, extra.1),
            ]
        };
        let two = vec![
            metrics::Label::new("site", s.clone()),
            metrics::Label::new("location", l.clone()),
        ];
        LocationMetrics {
            site: std::sync::Arc::from(site),
            location: std::sync::Arc::from(location),
            first_byte: metrics::histogram!(HTTP_FIRST_BYTE, two.clone()),
            body_request: metrics::counter!(HTTP_BODY_BYTES, lab(("direction", "request"))),
            body_response: metrics::counter!(HTTP_BODY_BYTES, lab(("direction", "response"))),
            sse_events: metrics::counter!(SSE_EVENTS, two.clone()),
            ws_response: metrics::histogram!(WEBSOCKET_RESPONSE, two),
            ws_to_upstream: metrics::counter!(
                WEBSOCKET_MESSAGES,
                lab(("direction", "client_to_upstream"))
            ),
            ws_to_client: metrics::counter!(
                WEBSOCKET_MESSAGES,
                lab(("direction", "upstream_to_client"))
            ),
            active: STREAM_KINDS.map(|k| metrics::gauge!(HTTP_STREAMS_ACTIVE, lab(("kind", k)))),
            duration: STREAM_KINDS
                .map(|k| metrics::histogram!(HTTP_STREAM_DURATION, lab(("kind", k)))),
            requests: RequestCounters::default(),
        }
    }
}

/// `reason` values of `portico_client_hello_failures_total`.
pub const CLIENT_HELLO_REASONS: [&str; 4] = ["timeout", "malformed", "too_large", "no_route"];
/// `reason` values of `portico_proxy_header_failures_total`.
pub const PROXY_HEADER_REASONS: [&str; 6] = [
    "untrusted",
    "malformed",
    "too_large",
    "timeout",
    "eof",
    "io",
];
/// `limit` values of `portico_connections_refused_total`.
pub const REFUSAL_LIMITS: [&str; 2] = ["max_connections", "max_pending_hellos"];
/// `reason` values of `portico_upstream_failures_total`.
pub const UPSTREAM_REASONS: [&str; 4] = ["refused", "timeout", "reset", "protocol"];

/// Register, at zero, every series whose labels the config names, so each
/// metric exists in `/metrics` from start-up (Prometheus' instrumentation
/// practice: a series that appears only with its first event makes rate()
/// and dashboards show "No data" instead of 0). Called for each new
/// generation; registering an existing series again changes nothing.
/// Location metrics register themselves (see [`LocationMetrics::new`]).
pub fn preregister(cfg: &crate::config::Config) {
    use metrics::{counter, gauge, histogram};
    for l in &cfg.listeners {
        let listener = l.addr.to_string();
        gauge!(CONNECTIONS_ACTIVE, "listener" => listener.clone()).increment(0.0);
        for r in &cfg.routes {
            counter!(CONNECTIONS, "listener" => listener.clone(), "route" => r.label.to_string(), "action" => r.action.kind()).increment(0);
        }
        counter!(CONNECTIONS, "listener" => listener.clone(), "route" => "none", "action" => "reject").increment(0);
        for limit in REFUSAL_LIMITS {
            counter!(CONNECTIONS_REFUSED, "listener" => listener.clone(), "limit" => limit)
                .increment(0);
        }
        if l.accept_proxy {
            for reason in PROXY_HEADER_REASONS {
                counter!(PROXY_HEADER_FAILURES, "listener" => listener.clone(), "reason" => reason)
                    .increment(0);
            }
        }
    }
    for reason in CLIENT_HELLO_REASONS {
        counter!(CLIENT_HELLO_FAILURES, "reason" => reason).increment(0);
    }
    for b in cfg.backends.values() {
        let backend = b.name.to_string();
        gauge!(TUNNEL_ACTIVE, "backend" => backend.clone()).increment(0.0);
        let _ = histogram!(TUNNEL_DURATION, "backend" => backend.clone());
        counter!(BACKEND_CONNECT_FAILURES, "backend" => backend.clone()).increment(0);
        for direction in ["upstream", "downstream"] {
            counter!(TUNNEL_BYTES, "backend" => backend.clone(), "direction" => direction)
                .increment(0);
        }
    }
    for (name, site) in &cfg.sites {
        counter!(TLS_HANDSHAKE_FAILURES, "site" => name.clone()).increment(0);
        // Method and status come from requests; the most common pair
        // stands for them at zero, once per protocol.
        for l in &site.locations {
            for protocol in ["http1", "h2"] {
                counter!(HTTP_REQUESTS, "site" => name.clone(), "location" => l.name.clone(),
                    "method" => "GET", "status" => "200", "protocol" => protocol)
                .increment(0);
            }
        }
    }
    for name in cfg.upstreams.keys() {
        gauge!(UPSTREAM_CONNECTIONS, "upstream" => name.clone()).increment(0.0);
        for reason in UPSTREAM_REASONS {
            counter!(UPSTREAM_FAILURES, "upstream" => name.clone(), "reason" => reason)
                .increment(0);
        }
    }
    for result in ["ok", "error"] {
        counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::Arc;

    #[test]
    fn listener_counters_count_per_listener_and_register_once() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = ListenerCounters::default();
        let made = Cell::new(0);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("127.0.0.1:1"), Arc::from("[::1]:2"));
        // The same text in another Arc is the same listener.
        let a2: Arc<str> = Arc::from("127.0.0.1:1");
        metrics::with_local_recorder(&recorder, || {
            for l in [&a, &b, &a, &a2, &b] {
                counters.increment(l, || {
                    made.set(made.get() + 1);
                    metrics::counter!(CONNECTIONS, "listener" => l.clone(), "route" => "0:pass:t", "action" => "pass")
                });
            }
        });
        assert_eq!(made.get(), 2, "one registration per listener");
        let text = handle.render();
        for (listener, n) in [("127.0.0.1:1", 3), ("[::1]:2", 2)] {
            let line = format!(
                "portico_connections_total{{listener=\"{listener}\",route=\"0:pass:t\",action=\"pass\"}} {n}"
            );
            assert!(text.contains(&line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn listener_counters_keep_at_most_max_listeners() {
        let counters = ListenerCounters::default();
        let made = Cell::new(0);
        let listeners: Vec<Arc<str>> = (0..ListenerCounters::MAX + 3)
            .map(|i| Arc::from(format!("127.0.0.1:{i}")))
            .collect();
        for _ in 0..2 {
            for l in &listeners {
                counters.increment(l, || {
                    made.set(made.get() + 1);
                    metrics::Counter::noop()
                });
            }
        }
        // The first MAX are kept; the 3 beyond are made on every call.
        assert_eq!(made.get(), ListenerCounters::MAX + 3 * 2);
    }
}
