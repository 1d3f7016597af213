//! Load clients and origins for the side-by-side benchmarks (`bench/run`).
//! Every mode is bounded by a count and a deadline and exits by itself.

mod hold;
mod http_side;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Tunnel backend: skips a PROXY header, reads until EOF; replies one byte
    /// after `reply_after` bytes (for connection-rate runs).
    Sink {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value_t = 0)]
        reply_after: usize,
    },
    /// Send a ClientHello then `bytes` bytes through the front; print MB/s.
    Blast {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        hello: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 60)]
        deadline_secs: u64,
    },
    /// Open `count` short passthrough connections (`parallel` at a time).
    Conns {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        hello: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        parallel: usize,
        #[arg(long, default_value_t = 60)]
        deadline_secs: u64,
    },
    /// HTTP origin: `/` small body, `/sse` timestamped events, `/v1/responses` WebSocket echo.
    Origin {
        #[arg(long)]
        listen: String,
    },
    /// Minimal keep-alive HTTP/1.1 origin: one fixed small response per
    /// request head, so the origin never limits the fronts in M1/M2.
    FastOrigin {
        #[arg(long)]
        listen: String,
    },
    /// SSE client: `streams` streams, reports per-event added latency percentiles.
    Sse(http_side::SseArgs),
    /// WebSocket echo client: round-trip percentiles.
    Ws(http_side::WsArgs),
    /// M7: hold many idle connections of one kind open.
    Hold(hold::HoldArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Sink {
                listen,
                reply_after,
            } => sink(&listen, reply_after).await,
            Mode::Blast {
                connect,
                hello,
                bytes,
                deadline_secs,
            } => tokio::time::timeout(
                Duration::from_secs(deadline_secs),
                blast(&connect, &hello, bytes),
            )
            .await
            .context("deadline")?,
            Mode::Conns {
                connect,
                hello,
                count,
                parallel,
                deadline_secs,
            } => tokio::time::timeout(
                Duration::from_secs(deadline_secs),
                conns(&connect, &hello, count, parallel),
            )
            .await
            .context("deadline")?,
            Mode::Origin { listen } => http_side::origin(&listen).await,
            Mode::FastOrigin { listen } => fast_origin(&listen).await,
            Mode::Sse(a) => http_side::sse(a).await,
            Mode::Ws(a) => http_side::ws(a).await,
            Mode::Hold(a) => hold::hold(a).await,
        }
    })
}

/// Length of a PROXY header at the start of `buf`, if one is complete.
fn proxy_header_len(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"PROXY ") {
        return buf.windows(2).position(|w| w == b"\r\n").map(|p| p + 2);
    }
    if buf.starts_with(b"\r\n\r\n\0\r\nQUIT\n") && buf.len() >= 16 {
        let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
        return (buf.len() >= len).then_some(len);
    }
    Some(0)
}

async fn sink(listen: &str, reply_after: usize) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut head = Vec::new();
            let mut skipped = false;
            let mut total = 0usize;
            let mut replied = reply_after == 0;
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut data = &buf[..n];
                if !skipped {
                    head.extend_from_slice(data);
                    match proxy_header_len(&head) {
                        Some(h) => {
                            skipped = true;
                            total += head.len() - h;
                            head = Vec::new();
                            data = &[];
                        }
                        None => continue,
                    }
                }
                total += data.len();
                if !replied && total >= reply_after {
                    replied = true;
                    if s.write_all(b"k").await.is_err() {
                        break;
                    }
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

async fn fast_origin(listen: &str) -> Result<()> {
    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 18\r\n\r\nhello from origin\n";
    let l = TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut have = 0usize;
            let mut out = Vec::with_capacity(RESPONSE.len() * 16);
            loop {
                let n = match s.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                have += n;
                // Answer every complete head (requests to `/` carry no body).
                let mut start = 0;
                while let Some(end) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    start += end + 4;
                    out.extend_from_slice(RESPONSE);
                }
                buf.copy_within(start..have, 0);
                have -= start;
                if have == buf.len() {
                    return;
                }
                if !out.is_empty() {
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
        });
    }
}

async fn blast(connect: &str, hello: &str, bytes: u64) -> Result<()> {
    let hello = std::fs::read(hello).with_context(|| format!("read {hello}"))?;
    let mut s = TcpStream::connect(connect).await?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    s.write_all(&hello).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\":{sent},\"seconds\":{secs:.4},\"mb_per_s\":{:.1}}}",
        sent as f64 / secs / 1e6
    );
    Ok(())
}

async fn conns(connect: &str, hello: &str, count: usize, parallel: usize) -> Result<()> {
    let hello = std::sync::Arc::new(std::fs::read(hello).with_context(|| format!("read {hello}"))?);
    let start = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = sem.clone().acquire_owned().await?;
        let hello = hello.clone();
        let addr = connect.to_string();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut s = TcpStream::connect(&addr).await?;
            s.set_nodelay(true)?;
            s.write_all(&hello).await?;
            let mut one = [0u8; 1];
            s.read_exact(&mut one).await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if failed > 0 {
        bail!("{failed} of {count} connections failed");
    }
    println!(
        "{{\"connections\":{count},\"seconds\":{secs:.4},\"per_s\":{:.1}}}",
        count as f64 / secs
    );
    Ok(())
}
