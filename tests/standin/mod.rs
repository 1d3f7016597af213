//! A stand-in for an LLM relay's OpenAI Responses API (`POST .../responses`
//! streaming Server-Sent Events, and the same events as WebSocket text
//! messages after a `GET .../responses` Upgrade), for running real clients
//! (the Codex CLI) through portico on loopback.
//!
//! The wire shapes follow what the Codex CLI sends and expects: over SSE one
//! `event: <type>` + `data: <json>` block per event; over the WebSocket the
//! client sends one `{"type":"response.create", ...request...}` text message
//! per turn and gets each event's JSON as one text message. Every request and
//! client message is recorded, with the wall-clock time each delta was
//! written, so a test can compare the spacing the client saw with the one
//! sent.
#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// What the stand-in does with a WebSocket upgrade on `.../responses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrades {
    /// 101, then the Responses API over WebSocket.
    Accept,
    /// Answer with this status and a JSON error body (a relay without
    /// WebSocket support).
    Refuse(u16),
}

/// One answer: text deltas and the pause before each.
#[derive(Debug, Clone)]
pub struct Script {
    pub deltas: Vec<(Duration, String)>,
}

impl Script {
    /// The answer every test uses: six deltas at irregular spacing, so a
    /// client that bunched or delayed events would not match it.
    pub fn standard() -> Script {
        let ms = [30u64, 80, 20, 60, 40, 70];
        let words = ["Hello", " from", " the", " stand", "-in", " relay."];
        Script {
            deltas: ms
                .iter()
                .zip(words)
                .map(|(m, w)| (Duration::from_millis(*m), w.to_string()))
                .collect(),
        }
    }

    pub fn text(&self) -> String {
        self.deltas.iter().map(|(_, t)| t.as_str()).collect()
    }
}

/// How a request reached the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    WebSocket,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// The JSON body (SSE) or nothing (upgrade requests).
    pub body: Option<Value>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One answered turn: how, and when each delta was written (wall clock).
#[derive(Debug, Clone)]
pub struct Turn {
    pub transport: Transport,
    pub request: Value,
    pub delta_sent: Vec<SystemTime>,
}

#[derive(Debug, Default, Clone)]
pub struct Log {
    pub requests: Vec<Seen>,
    /// Upgrades answered with 101 / refused.
    pub upgrades_accepted: usize,
    pub upgrades_refused: usize,
    /// Every WebSocket text message the client sent, parsed.
    pub ws_messages: Vec<Value>,
    pub turns: Vec<Turn>,
}

pub struct Standin {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standin {
    pub async fn start(upgrades: Upgrades, script: Script) -> Standin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let log = Arc::new(Mutex::new(Log::default()));
        let state = Arc::new(State {
            upgrades: Mutex::new(upgrades),
            script,
            log: log.clone(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Standin {
            addr,
            log,
            state: shared,
            task,
        }
    }

    pub fn log(&self) -> Log {
        self.log.lock().expect("stand-in log").clone()
    }

    /// Change how later upgrades are answered.
    pub fn set_upgrades(&self, upgrades: Upgrades) {
        *self.state.upgrades.lock().expect("stand-in mode") = upgrades;
    }
}

struct State {
    upgrades: Mutex<Upgrades>,
    script: Script,
    log: Arc<Mutex<Log>>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type).expect("content type"),
    );
    r
}

/// The Responses API stream events for one answer, as JSON values, with the
/// pause before each (only deltas pause). A request with `generate: false`
/// (Codex's prewarm of a new WebSocket) gets a response with no output.
fn events(script: &Script, n: usize, generate: bool) -> Vec<(Duration, Value, bool)> {
    let resp_id = format!("resp_standin_{n}");
    let item_id = format!("msg_standin_{n}");
    let created = json!({"type": "response.created", "response": {"id": resp_id}});
    let completed = |output_tokens: u64| {
        json!({"type": "response.completed", "response": {"id": resp_id, "usage": {
            "input_tokens": 12, "input_tokens_details": null, "output_tokens": output_tokens,
            "output_tokens_details": null, "total_tokens": 12 + output_tokens}}})
    };
    if !generate {
        return vec![
            (Duration::ZERO, created, false),
            (Duration::ZERO, completed(0), false),
        ];
    }
    let mut out = vec![(Duration::ZERO, created, false)];
    out.push((
        Duration::ZERO,
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"type": "message", "role": "assistant", "id": item_id, "content": []}}),
        false,
    ));
    for (pause, text) in &script.deltas {
        out.push((
            *pause,
            json!({"type": "response.output_text.delta", "delta": text, "item_id": item_id,
                   "output_index": 0, "content_index": 0}),
            true,
        ));
    }
    out.push((
        Duration::ZERO,
        json!({"type": "response.output_item.done", "output_index": 0,
               "item": {"type": "message", "role": "assistant", "id": item_id,
                        "content": [{"type": "output_text", "text": script.text()}]}}),
        false,
    ));
    out.push((Duration::ZERO, completed(script.deltas.len() as u64), false));
    out
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl State {
    fn record(&self, head: &http::request::Parts, body: Option<Value>) {
        let seen = Seen {
            method: head.method.to_string(),
            path: head.uri.path().to_string(),
            version: format!("{:?}", head.version),
            headers: head
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect(),
            body,
        };
        self.log.lock().expect("stand-in log").requests.push(seen);
    }

    fn next_turn(&self) -> usize {
        self.log.lock().expect("stand-in log").turns.len()
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let responses = req.uri().path().ends_with("/responses");
        if is_upgrade(&req) {
            let (parts, body) = req.into_parts();
            self.record(&parts, None);
            let mut req = Request::from_parts(parts, body);
            if !responses {
                return full(StatusCode::NOT_FOUND, "text/plain", "not found\n");
            }
            let mode = *self.upgrades.lock().expect("stand-in mode");
            if let Upgrades::Refuse(status) = mode {
                self.log.lock().expect("stand-in log").upgrades_refused += 1;
                let status = StatusCode::from_u16(status).expect("status");
                return full(
                    status,
                    "application/json",
                    r#"{"error":{"message":"websocket is not supported here","type":"invalid_request_error"}}"#,
                );
            }
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                return full(StatusCode::BAD_REQUEST, "text/plain", "no key\n");
            };
            self.log.lock().expect("stand-in log").upgrades_accepted += 1;
            let upgrade = hyper::upgrade::on(&mut req);
            let state = self.clone();
            tokio::spawn(async move {
                if let Ok(io) = upgrade.await {
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None)
                        .await;
                    state.websocket(ws).await;
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("upgrade"),
            );
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            if let Ok(v) = header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            return r;
        }
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        self.record(&parts, json.clone());
        if parts.method != http::Method::POST || !responses {
            return full(StatusCode::NOT_FOUND, "text/plain", "not found\n");
        }
        let Some(request) = json else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "body is not JSON\n");
        };
        let n = self.next_turn();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let state = self.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            let generate = request["generate"] != false;
            for (pause, ev, is_delta) in events(&state.script, n, generate) {
                tokio::time::sleep(pause).await;
                let kind = ev["type"].as_str().unwrap_or("message").to_string();
                let block = format!("event: {kind}\ndata: {ev}\n\n");
                if tx.send(Bytes::from(block)).await.is_err() {
                    return;
                }
                if is_delta {
                    sent.push(SystemTime::now());
                }
            }
            state.log.lock().expect("stand-in log").turns.push(Turn {
                transport: Transport::Sse,
                request,
                delta_sent: sent,
            });
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        r
    }

    async fn websocket<S>(&self, mut ws: WebSocketStream<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        while let Some(Ok(msg)) = ws.next().await {
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                let _ = ws
                    .send(Message::text(
                        json!({"type": "error", "error": {"message": "not JSON"}}).to_string(),
                    ))
                    .await;
                continue;
            };
            self.log
                .lock()
                .expect("stand-in log")
                .ws_messages
                .push(v.clone());
            if v["type"] != "response.create" {
                continue;
            }
            let n = self.next_turn();
            let mut sent = Vec::new();
            let generate = v["generate"] != false;
            for (pause, ev, is_delta) in events(&self.script, n, generate) {
                tokio::time::sleep(pause).await;
                if ws.send(Message::text(ev.to_string())).await.is_err() {
                    return;
                }
                if is_delta {
                    sent.push(SystemTime::now());
                }
            }
            self.log.lock().expect("stand-in log").turns.push(Turn {
                transport: Transport::WebSocket,
                request: v,
                delta_sent: sent,
            });
        }
    }
}
