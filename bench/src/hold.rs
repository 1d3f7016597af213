//! M7: hold many idle connections of one kind open through a front, so
//! `bench/run` can read the front's memory and idle CPU per connection.
//!
//! Opens `count` connections (`parallel` at a time), each brought to its
//! idle state (an SSE stream that delivered its first event, a WebSocket
//! that echoed one message, a passthrough tunnel that got the sink's first
//! byte), prints `{"open":N,"seconds":S}` and then holds them all until its
//! standard input closes or `hold_secs` pass; exits by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::http_side::{dial, Io};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Sse,
    Ws,
    Tunnel,
}

#[derive(clap::Args)]
pub struct HoldArgs {
    #[arg(long, value_enum)]
    kind: Kind,
    #[arg(long)]
    connect: String,
    /// TLS with this SNI (SSE and WebSocket).
    #[arg(long)]
    sni: Option<String>,
    /// ClientHello to send first (tunnels).
    #[arg(long)]
    hello: Option<String>,
    #[arg(long)]
    count: usize,
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Upper bound on opening them all.
    #[arg(long, default_value_t = 120)]
    open_secs: u64,
    /// Upper bound on holding them after they are open.
    #[arg(long, default_value_t = 120)]
    hold_secs: u64,
}

/// A connection brought to its idle state; dropping it closes it.
type Held = Box<dyn Io>;

async fn open_sse(connect: &str, sni: Option<&str>) -> Result<Held> {
    let io = dial(connect, sni).await?;
    let mut rd = BufReader::new(io);
    // Two events 10 minutes apart: the first as soon as the origin has the
    // request, then the stream is idle.
    let req = "GET /sse?n=2&interval_ms=600000&first_ms=0 HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n";
    rd.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            bail!("SSE stream closed before its first event");
        }
        if line.starts_with("data: ") {
            return Ok(Box::new(rd.into_inner()));
        }
    }
}

async fn open_ws(connect: &str, sni: Option<&str>) -> Result<Held> {
    let io = dial(connect, sni).await?;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost/v1/responses", io).await?;
    ws.send(Message::text("x".repeat(64))).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("WebSocket closed before its echo"),
        }
    }
    // Keep the raw stream: the WebSocket stays open, nothing more is sent.
    Ok(Box::new(ws.into_inner()))
}

async fn open_tunnel(connect: &str, hello: &[u8]) -> Result<Held> {
    let mut s = tokio::net::TcpStream::connect(connect)
        .await
        .with_context(|| format!("connect {connect}"))?;
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await?;
    Ok(Box::new(s))
}

pub async fn hold(a: HoldArgs) -> Result<()> {
    let hello = match (&a.kind, &a.hello) {
        (Kind::Tunnel, Some(h)) => Arc::new(std::fs::read(h).with_context(|| format!("read {h}"))?),
        (Kind::Tunnel, None) => bail!("--kind tunnel needs --hello"),
        _ => Arc::new(Vec::new()),
    };
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.parallel.max(1)));
    let mut tasks = Vec::with_capacity(a.count);
    for _ in 0..a.count {
        let permit = sem.clone().acquire_owned().await?;
        let (connect, sni, hello, kind) = (a.connect.clone(), a.sni.clone(), hello.clone(), a.kind);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match kind {
                Kind::Sse => open_sse(&connect, sni.as_deref()).await,
                Kind::Ws => open_ws(&connect, sni.as_deref()).await,
                Kind::Tunnel => open_tunnel(&connect, &hello).await,
            }
        }));
    }
    let opening = async {
        let mut held = Vec::with_capacity(tasks.len());
        for t in tasks {
            held.push(t.await??);
        }
        Ok::<_, anyhow::Error>(held)
    };
    let held = tokio::time::timeout(Duration::from_secs(a.open_secs), opening)
        .await
        .context("connections did not all open in time")??;
    println!(
        "{{\"open\":{},\"seconds\":{:.4}}}",
        held.len(),
        start.elapsed().as_secs_f64()
    );
    // Hold until stdin closes (the caller is done sampling) or the deadline.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(a.hold_secs), async {
        while !matches!(stdin.read(&mut sink).await, Ok(0) | Err(_)) {}
    })
    .await;
    drop(held);
    Ok(())
}
