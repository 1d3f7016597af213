//! `/status/events`: one `status` event per second for every watcher, from
//! one shared producer that runs only while someone watches.
//!
//! Each event's data is a JSON merge patch (RFC 7396) against the previous
//! event, and the first event of a stream is the whole document (a patch
//! against `{}`): with nothing happening an event is
//! `{"uptime_seconds":N}`, about 25 bytes, instead of the whole document.
//! Arrays change as a whole. A watcher that misses a tick (slow reader)
//! gets the whole document again, so it never applies a patch to the
//! wrong base.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One second's document: whole, and as a patch against the previous second's.
#[derive(Debug)]
pub struct Tick {
    pub seq: u64,
    pub full: Arc<str>,
    pub patch: Arc<str>,
}

/// The shared producer's channel.
pub struct Hub {
    tx: watch::Sender<Option<Arc<Tick>>>,
    running: Mutex<bool>,
    period: Duration,
}

impl Hub {
    pub fn new(period: Duration) -> Hub {
        Hub {
            tx: watch::Sender::new(None),
            running: Mutex::new(false),
            period,
        }
    }

    /// Watch the ticks; starts the producer (with `make` computing each
    /// document) when it is not running.
    pub fn subscribe<F>(self: &Arc<Self>, make: F) -> watch::Receiver<Option<Arc<Tick>>>
    where
        F: Fn() -> Value + Send + Sync + 'static,
    {
        let rx = self.tx.subscribe();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !*running {
            *running = true;
            // A new run starts from scratch: no patch against an old document.
            self.tx.send_replace(None);
            let hub = self.clone();
            tokio::spawn(async move { hub.produce(make).await });
        }
        rx
    }

    /// Compute a document every period while anyone watches.
    async fn produce<F: Fn() -> Value>(self: Arc<Self>, make: F) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prev: Option<Value> = None;
        let mut seq = 0u64;
        loop {
            tick.tick().await;
            {
                // Decided under the lock, so a subscriber either sees the
                // producer running or starts a new one.
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                if self.tx.receiver_count() == 0 {
                    *running = false;
                    return;
                }
            }
            let doc = make();
            let patch = match &prev {
                Some(p) => diff(p, &doc).unwrap_or_else(|| Value::Object(Map::new())),
                None => doc.clone(),
            };
            seq += 1;
            let full: Arc<str> = Arc::from(doc.to_string());
            let patch: Arc<str> = Arc::from(patch.to_string());
            self.tx
                .send_replace(Some(Arc::new(Tick { seq, full, patch })));
            prev = Some(doc);
        }
    }
}

/// One SSE event.
pub fn event(seq: u64, data: &str) -> Bytes {
    Bytes::from(format!("event: status\nid: {seq}\ndata: {data}\n\n"))
}

/// The events of one watcher: the whole document first, then patches;
/// ends when `stop` is cancelled.
pub fn stream(
    rx: watch::Receiver<Option<Arc<Tick>>>,
    stop: CancellationToken,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    // `last`: the sequence number of the last tick sent.
    futures_util::stream::unfold(
        (rx, None::<u64>, stop, true),
        |(mut rx, last, stop, first)| async move {
            if first {
                // Tell EventSource to retry after 1 s if the connection drops.
                return Some((
                    Bytes::from_static(b"retry: 1000\n\n"),
                    (rx, last, stop, false),
                ));
            }
            loop {
                let current = rx.borrow_and_update().clone();
                if let Some(t) = current {
                    if last != Some(t.seq) {
                        let data = if last.is_some_and(|l| l + 1 == t.seq) {
                            &t.patch
                        } else {
                            &t.full
                        };
                        return Some((event(t.seq, data), (rx, Some(t.seq), stop, false)));
                    }
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return None },
                    _ = stop.cancelled() => return None,
                }
            }
        },
    )
}

/// The JSON merge patch (RFC 7396) that turns `old` into `new`; `None`
/// when they are equal. A key whose new value is `null` or that is gone
/// appears as `null` (merge patch cannot tell the two apart; readers
/// treat a missing key as `null`).
pub fn diff(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut patch = Map::new();
            for (k, v) in b {
                match a.get(k) {
                    Some(av) => {
                        if let Some(d) = diff(av, v) {
                            patch.insert(k.clone(), d);
                        }
                    }
                    None => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in a.keys() {
                if !b.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        // A new object over a scalar must replace it whole; a merge patch
        // object would merge into nothing, which is the same thing.
        _ if old == new => None,
        _ => Some(new.clone()),
    }
}

/// Apply a merge patch (for the tests and as the reference for the page's script).
pub fn apply(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        apply(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strip_nulls(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), strip_nulls(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    #[test]
    fn patch_roundtrips() {
        let a = json!({"uptime_seconds": 1, "config": {"generation": 1, "last_reload": null},
            "sites": [{"name": "api", "active": 0}], "gone": 5});
        let b = json!({"uptime_seconds": 2, "config": {"generation": 2, "last_reload": {"ok": false, "error": "x"}},
            "sites": [{"name": "api", "active": 1}]});
        let p = diff(&a, &b).unwrap();
        assert_eq!(
            p,
            json!({"uptime_seconds": 2, "config": {"generation": 2, "last_reload": {"ok": false, "error": "x"}},
                "sites": [{"name": "api", "active": 1}], "gone": null})
        );
        let mut t = a.clone();
        apply(&mut t, &p);
        assert_eq!(t, b);
        // And back, where a value becomes null.
        let p2 = diff(&b, &a).unwrap();
        let mut t2 = b.clone();
        apply(&mut t2, &p2);
        assert_eq!(strip_nulls(&t2), strip_nulls(&a));
        assert_eq!(diff(&a, &a), None);
    }

    #[test]
    fn unchanged_document_gives_only_uptime() {
        let a = json!({"uptime_seconds": 1, "routes": [{"index": 0}]});
        let b = json!({"uptime_seconds": 2, "routes": [{"index": 0}]});
        assert_eq!(diff(&a, &b).unwrap().to_string(), r#"{"uptime_seconds":2}"#);
    }

    #[tokio::test]
    async fn one_producer_while_watched_and_none_after() {
        let hub = Arc::new(Hub::new(Duration::from_millis(20)));
        let made = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = made.clone();
        let make = move || {
            let n = m.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            json!({"n": n})
        };
        let mut a = hub.subscribe(make.clone());
        let b = hub.subscribe(make.clone());
        // Two watchers share one producer: one document per tick.
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                a.changed().await.unwrap();
                if a.borrow().as_ref().is_some_and(|t| t.seq >= 5) {
                    break;
                }
            }
        })
        .await
        .expect("ticks");
        let seq = a.borrow().as_ref().map(|t| t.seq).unwrap();
        let n = made.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n <= seq + 1, "{n} documents for {seq} ticks");
        drop(a);
        drop(b);
        // The producer notices within a tick and stops computing.
        tokio::time::timeout(Duration::from_secs(2), async {
            while *hub.running.lock().unwrap() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("producer stops");
        let stopped_at = made.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), stopped_at);
        // A new watcher starts it again.
        let mut c = hub.subscribe(make);
        tokio::time::timeout(Duration::from_secs(2), c.changed())
            .await
            .expect("restarted")
            .unwrap();
    }
}
