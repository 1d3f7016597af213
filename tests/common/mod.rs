//! Harness for the integration tests: runs the real `portico` binary on free
//! loopback ports and provides the servers and clients around it (a rustls
//! echo server that records what it saw, a raw TCP/Unix backend, a rustls
//! client connector, a PROXY header reader and a /metrics scraper).
//!
//! Every wait in here is bounded; a test that hangs fails with a message.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long the binary may take to bind its sockets.
const STARTUP: Duration = Duration::from_secs(10);

/// Run `f`, failing the test if it takes longer than `secs` seconds.
pub async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {secs}s"),
    }
}

/// A loopback address with a port nobody is listening on (bound, then
/// released). Only for ports that must be known before the process that
/// binds them starts: Pebble's, a listener a reload adds and removes, or a
/// config with more listeners than loopback families. Everything else binds
/// port 0 ([`any_port`]) or holds a [`DeadPort`].
pub fn free_addr() -> SocketAddr {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// `127.0.0.1:0` for a `[[listen]]`: portico binds a free port and logs it
/// (read it back with [`Portico::listening`]); nothing races for the port.
pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// `[::1]:0`: as [`any_port`], on IPv6 loopback.
pub fn any_port_v6() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
}

/// A loopback port that refuses connections for as long as this value
/// lives: the socket is bound (so nothing else can take the port) but never
/// listens, so the kernel answers every SYN with a reset.
pub struct DeadPort {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let addr = socket.local_addr().expect("local_addr");
        DeadPort {
            _socket: socket,
            addr,
        }
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "portico-it-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `portico` command with a clean environment: no inherited `PORTICO_*`
/// overrides or `RUST_LOG`, so the config file alone decides.
pub fn portico_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portico"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PORTICO_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A running `portico run -c FILE`, killed on drop.
pub struct Portico {
    child: Child,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The admin listener (always configured by the harness). Until the
    /// process has logged the port it bound (see [`Portico::wait_ready`]),
    /// the configured `127.0.0.1:0`.
    pub metrics: SocketAddr,
}

/// The admin address the harness configures: port 0, so portico binds a free
/// port itself and no test races another for it; the bound address is read
/// from its "metrics on http://ADDR/metrics" log line.
const ADMIN_ANY_PORT: &str = "127.0.0.1:0";

/// Addresses in portico's log lines whose message contains `message`: the
/// `addr` field of text (`addr=ADDR`) or JSON (`"addr":"ADDR"`) lines.
pub fn logged_addrs(stderr: &str, message: &str) -> Vec<SocketAddr> {
    stderr
        .lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            let rest = if let Some(i) = l.find("\"addr\":\"") {
                &l[i + 8..]
            } else {
                &l[l.find("addr=")? + 5..]
            };
            let end = rest
                .find(|c: char| c == '"' || c.is_whitespace())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

impl Portico {
    /// Write `config` (which must not have an `[admin]` table: one is added)
    /// and start the binary; returns once `/readyz` answers 200, which the
    /// server does only after every listener is bound. Readiness is probed on
    /// the admin port so that no probe connection shows up on the listeners
    /// or in their metrics.
    pub async fn start(config: &str) -> Portico {
        let dir = TempDir::new();
        let metrics: SocketAddr = ADMIN_ANY_PORT.parse().expect("admin address");
        let text = with_admin(config, metrics);
        let config_path = dir.path().join("portico.toml");
        std::fs::write(&config_path, text).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let child = portico_command()
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn portico");
        let mut p = Portico {
            child,
            dir,
            config_path,
            stderr_path,
            metrics,
        };
        p.wait_ready().await;
        p
    }

    /// Learn the admin port portico bound (when the harness asked for port
    /// 0), then poll `/readyz` until it answers 200; bounded by STARTUP.
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        while self.metrics.port() == 0 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "portico exited with {status} before it was ready; stderr:\n{}",
                    self.stderr()
                );
            }
            if let Some(addr) = logged_addrs(&self.stderr(), "metrics on http://").first() {
                self.metrics = *addr;
                break;
            }
            if started.elapsed() > STARTUP {
                panic!(
                    "portico did not log its admin address within {STARTUP:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "portico exited with {status} before it was ready; stderr:\n{}",
                    self.stderr()
                );
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(1), http_get(self.metrics, "/readyz"))
                    .await
            {
                return;
            }
            if started.elapsed() > STARTUP {
                panic!(
                    "portico not ready within {STARTUP:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The addresses of the listeners portico bound, in config order (a
    /// `[[listen]]` with port 0 gets a free port: read it here).
    pub fn listening(&self) -> Vec<SocketAddr> {
        logged_addrs(&self.stderr(), "listening")
    }

    /// The first listener's bound address (its `[[listen]]` may ask for port 0).
    pub fn addr(&self) -> SocketAddr {
        *self
            .listening()
            .first()
            .expect("portico logged no listening address")
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics_text(&self) -> String {
        match tokio::time::timeout(Duration::from_secs(5), http_get(self.metrics, "/metrics")).await
        {
            Ok(Ok((200, body))) => body,
            other => panic!("GET /metrics failed: {other:?}"),
        }
    }

    /// Sum of the series of `name` whose labels include all of `labels`
    /// (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics_text().await, name, labels)
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- portico stderr ({}) ---\n{}--- end ---",
                self.config_path.display(),
                self.stderr()
            );
        }
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, body.to_string()))
}

/// Sum the values of the series of `name` whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let pairs: Vec<(&str, &str)> = label_text
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        if labels.iter().all(|l| pairs.contains(l)) {
            total += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    total
}

/// A fixture ClientHello from `tests/fixtures/clienthello/`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clienthello")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Deterministic pseudo-random bytes (xorshift64*), enough to defeat any
/// accidental pattern match without a dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, to report mismatches of large buffers briefly.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Read until the peer closes: returns how long that took. Panics if data
/// arrives instead or the connection is still open after `within`.
pub async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {within:?}"),
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => panic!("expected the connection to close; got {n} bytes instead"),
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ) => {}
        Ok(Err(e)) => panic!("unexpected read error: {e}"),
    }
    started.elapsed()
}

// ---------------------------------------------------------------- TLS

/// A self-signed certificate for `tunnel.test` and the other names the
/// tests use as SNI.
pub struct TestCert {
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCert {
    pub fn generate() -> TestCert {
        let names = [
            "tunnel.test",
            "*.tunnel.test",
            "a.b.tunnel.test",
            "tunnel.test.evil.net",
        ]
        .map(String::from)
        .to_vec();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
        TestCert {
            cert: ck.cert.der().clone(),
            key_der: ck.signing_key.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client that trusts only `cert` and offers `alpn` in that order.
/// With `sni = false` it sends no server_name (but still verifies the
/// certificate for the name passed to [`tls_connect`]).
pub fn tls_connector(cert: &TestCert, alpn: &[&str], sni: bool) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.clone()).expect("add root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cfg.enable_sni = sni;
    TlsConnector::from(Arc::new(cfg))
}

/// A TCP connection to `addr` with Nagle off.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect to portico");
    s.set_nodelay(true).unwrap();
    s
}

/// TCP connect to `addr` and complete a TLS handshake for `name`.
/// Returns the stream and the client socket's local address.
pub async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
    name: &str,
) -> (tokio_rustls::client::TlsStream<TcpStream>, SocketAddr) {
    let tcp = connect(addr).await;
    let local = tcp.local_addr().unwrap();
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .unwrap_or_else(|_| panic!("TLS handshake for {name} via {addr} timed out"))
        .unwrap_or_else(|e| panic!("TLS handshake for {name} via {addr} failed: {e}"));
    (tls, local)
}

// ---------------------------------------------------------------- HTTP bodies

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of the tests' hyper origins and clients.
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> TestBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

// ---------------------------------------------------------------- PROXY headers

/// Which PROXY header a test backend expects before the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    None,
    V1,
    V2,
}

/// A PROXY header a backend received, parsed with `ppp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    pub raw: Vec<u8>,
    pub version: u8,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// v2 TLV 0x02.
    pub authority: Option<String>,
    /// v2 TLV 0x01.
    pub alpn: Option<Vec<u8>>,
    /// Kinds of all v2 TLVs in order.
    pub tlv_kinds: Vec<u8>,
}

/// Read exactly one PROXY header of the expected version (never a byte
/// more), so that the bytes after it stay in the stream.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    s: &mut S,
    expect: Expect,
) -> Result<Option<ProxyInfo>, String> {
    match expect {
        Expect::None => Ok(None),
        Expect::V1 => {
            let mut raw = Vec::new();
            while !raw.ends_with(b"\r\n") {
                if raw.len() >= 107 {
                    return Err(format!("no CRLF in the first 107 bytes: {raw:?}"));
                }
                let b = s.read_u8().await.map_err(|e| format!("read v1: {e}"))?;
                raw.push(b);
            }
            let h = ppp::v1::Header::try_from(&raw[..])
                .map_err(|e| format!("v1 parse {:?}: {e:?}", String::from_utf8_lossy(&raw)))?;
            let (source, destination) = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Unknown => (None, None),
            };
            Ok(Some(ProxyInfo {
                raw,
                version: 1,
                source,
                destination,
                authority: None,
                alpn: None,
                tlv_kinds: Vec::new(),
            }))
        }
        Expect::V2 => {
            let mut raw = vec![0u8; 16];
            s.read_exact(&mut raw)
                .await
                .map_err(|e| format!("read v2 fixed part: {e}"))?;
            if &raw[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
                return Err(format!("not a v2 signature: {:?}", &raw[..12]));
            }
            let len = u16::from_be_bytes([raw[14], raw[15]]) as usize;
            raw.resize(16 + len, 0);
            s.read_exact(&mut raw[16..])
                .await
                .map_err(|e| format!("read v2 body: {e}"))?;
            let h = ppp::v2::Header::try_from(&raw[..]).map_err(|e| format!("v2 parse: {e:?}"))?;
            let (source, destination) = match h.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                _ => (None, None),
            };
            let mut info = ProxyInfo {
                raw: raw.clone(),
                version: 2,
                source,
                destination,
                authority: None,
                alpn: None,
                tlv_kinds: Vec::new(),
            };
            for tlv in h.tlvs() {
                let tlv = tlv.map_err(|e| format!("v2 TLV: {e:?}"))?;
                info.tlv_kinds.push(tlv.kind);
                match tlv.kind {
                    0x01 => info.alpn = Some(tlv.value.to_vec()),
                    0x02 => info.authority = Some(String::from_utf8_lossy(&tlv.value).into_owned()),
                    _ => {}
                }
            }
            Ok(Some(info))
        }
    }
}

// ---------------------------------------------------------------- TLS echo server

/// What a [`TlsEcho`] server saw on one connection.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Which server (the name given to [`TlsEcho::start`]).
    pub server: &'static str,
    pub proxy: Result<Option<ProxyInfo>, String>,
    /// SNI the server's rustls saw; `None` when the client sent none.
    pub sni: Option<String>,
    /// ALPN negotiated by the server.
    pub alpn: Option<Vec<u8>>,
    /// `Err` when the handshake failed.
    pub handshake: Result<(), String>,
}

/// A rustls server on a loopback port that reads the expected PROXY header,
/// completes a handshake with the test certificate, reports an [`Accepted`]
/// on `events`, then echoes every byte until the client closes.
pub struct TlsEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsEcho {
    pub async fn start(
        name: &'static str,
        cert: &TestCert,
        alpn: &[&str],
        expect: Expect,
        events: mpsc::UnboundedSender<Accepted>,
    ) -> TlsEcho {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.clone()], cert.key())
            .expect("server cert");
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    let proxy = read_proxy_header(&mut tcp, expect).await;
                    if proxy.is_err() {
                        let _ = events.send(Accepted {
                            server: name,
                            proxy,
                            sni: None,
                            alpn: None,
                            handshake: Err("PROXY header unreadable".into()),
                        });
                        return;
                    }
                    let tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = events.send(Accepted {
                                server: name,
                                proxy,
                                sni: None,
                                alpn: None,
                                handshake: Err(e.to_string()),
                            });
                            return;
                        }
                    };
                    let conn = tls.get_ref().1;
                    let _ = events.send(Accepted {
                        server: name,
                        proxy,
                        sni: conn.server_name().map(str::to_string),
                        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                        handshake: Ok(()),
                    });
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TlsEcho { addr, task }
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next [`Accepted`] within `within`, or a panic naming what was awaited.
pub async fn next_accepted(
    events: &mut mpsc::UnboundedReceiver<Accepted>,
    within: Duration,
) -> Accepted {
    match tokio::time::timeout(within, events.recv()).await {
        Ok(Some(a)) => a,
        Ok(None) => panic!("echo servers gone"),
        Err(_) => panic!("no backend accepted a connection within {within:?}"),
    }
}

// ---------------------------------------------------------------- raw backend

/// Any byte stream a raw backend hands out.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// One connection to a [`RawBackend`], its PROXY header already read.
pub struct RawConn {
    pub proxy: Result<Option<ProxyInfo>, String>,
    pub stream: Box<dyn Duplex>,
}

impl RawConn {
    /// The header, panicking with the read error when there was none.
    pub fn header(&self) -> ProxyInfo {
        match &self.proxy {
            Ok(Some(h)) => h.clone(),
            Ok(None) => panic!("no PROXY header was expected"),
            Err(e) => panic!("backend could not read the PROXY header: {e}"),
        }
    }
}

/// A backend on TCP or a Unix socket that hands each connection to the test.
pub struct RawBackend {
    /// Address as written in the config (`127.0.0.1:P` or `unix:/path`).
    pub addr: String,
    conns: mpsc::UnboundedReceiver<RawConn>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn tcp(expect: Expect) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let proxy = read_proxy_header(&mut s, expect).await;
                let _ = tx.send(RawConn {
                    proxy,
                    stream: Box::new(s),
                });
            }
        });
        RawBackend { addr, conns, task }
    }

    pub async fn unix(path: &Path, expect: Expect) -> RawBackend {
        let listener = UnixListener::bind(path).expect("bind unix backend");
        let addr = format!("unix:{}", path.display());
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let proxy = read_proxy_header(&mut s, expect).await;
                let _ = tx.send(RawConn {
                    proxy,
                    stream: Box::new(s),
                });
            }
        });
        RawBackend { addr, conns, task }
    }

    /// The next connection within `within`.
    pub async fn next(&mut self, within: Duration) -> RawConn {
        match tokio::time::timeout(within, self.conns.recv()).await {
            Ok(Some(c)) => c,
            Ok(None) => panic!("backend task ended"),
            Err(_) => panic!("backend {} got no connection within {within:?}", self.addr),
        }
    }

    /// Assert that no connection arrived (waiting up to `grace` for a late one).
    pub async fn expect_none(&mut self, grace: Duration) {
        if let Ok(Some(c)) = tokio::time::timeout(grace, self.conns.recv()).await {
            panic!(
                "backend {} got a connection it should not have (header {:?})",
                self.addr, c.proxy
            );
        }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- portico check

/// Output of one `portico check -c FILE` run.
#[derive(Debug)]
pub struct CheckOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `portico check -c path` with extra environment variables.
pub async fn portico_check(path: &Path, env: &[(&str, &str)]) -> CheckOutput {
    let mut cmd = tokio::process::Command::from(portico_command());
    cmd.arg("check").arg("-c").arg(path).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("portico check did not finish within 10s")
        .expect("run portico check");
    CheckOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------- process

impl Portico {
    /// The child's process id, e.g. to sample its memory in `/proc/PID/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

// ---------------------------------------------------------------- operations: env, signals, reload, exit

impl Portico {
    /// Write `config` (plus the harness's `[admin]` table) and spawn
    /// `portico run -c FILE` with extra environment variables, without
    /// waiting for readiness (see [`Portico::wait_until_ready`]).
    pub fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Portico {
        let dir = TempDir::new();
        // The bound admin port is read from an info log line; with RUST_LOG
        // set that line may be filtered out, so pick a free port instead.
        let metrics = if env.iter().any(|(k, _)| *k == "RUST_LOG") {
            free_addr()
        } else {
            ADMIN_ANY_PORT.parse().expect("admin address")
        };
        let config_path = dir.path().join("portico.toml");
        std::fs::write(&config_path, with_admin(config, metrics)).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let mut cmd = portico_command();
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn portico");
        Portico {
            child,
            dir,
            config_path,
            stderr_path,
            metrics,
        }
    }

    /// [`Portico::spawn_with_env`], then wait until `/readyz` answers 200.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Portico {
        let mut p = Portico::spawn_with_env(config, env);
        p.wait_ready().await;
        p
    }

    /// Wait until `/readyz` answers 200 (panics if the process exits first).
    pub async fn wait_until_ready(&mut self) {
        self.wait_ready().await;
    }

    /// Replace the config file atomically (write a temp file, then rename),
    /// keeping the harness's `[admin]` table. Does not signal.
    pub fn rewrite_config(&self, config: &str) {
        self.rewrite_config_raw(&with_admin(config, self.metrics));
    }

    /// Replace the config file atomically with exactly `text`.
    pub fn rewrite_config_raw(&self, text: &str) {
        let tmp = self.dir.path().join(".portico.toml.tmp");
        std::fs::write(&tmp, text).expect("write temp config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config into place");
    }

    /// Send a signal by name (`HUP`, `TERM`, `INT`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .stdin(Stdio::null())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{sig} {} failed", self.child.id());
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Wait up to `within` for the process to exit; `None` if still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if started.elapsed() >= within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Poll `/metrics` until `name{labels}` reaches at least `want`;
    /// returns the value seen, or panics after `within`.
    pub async fn wait_metric_at_least(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        within: Duration,
    ) -> f64 {
        let started = Instant::now();
        loop {
            let v = self.metric(name, labels).await;
            if v >= want {
                return v;
            }
            if started.elapsed() > within {
                panic!(
                    "{name}{labels:?} is {v}, not >= {want}, after {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A config: `extra` first (tables, and routes to match before `api.test`),
/// one listener on `listen`, the route `api.test` to the self-signed site
/// `api`, then `locations` (the site's locations and their upstreams).
pub fn api_config(listen: SocketAddr, extra: &str, locations: &str) -> String {
    format!(
        r#"
{extra}

[[listen]]
addr = "{listen}"

[[route]]
sni = ["api.test"]
terminate = "api"

[site.api]
cert = "self-signed"
{locations}"#
    )
}

/// `config` with the harness's `[admin]` table appended.
pub fn with_admin(config: &str, metrics: SocketAddr) -> String {
    format!("{config}\n[admin]\nmetrics = \"{metrics}\"\n")
}

// ---------------------------------------------------------------- hardening helpers

/// A TLS client config that trusts any certificate and offers `alpn`.
pub fn insecure_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(AcceptAny::new(provider))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS client that trusts any certificate and offers `alpn`.
pub fn insecure_connector(alpn: &[&[u8]]) -> TlsConnector {
    TlsConnector::from(insecure_client_config(alpn))
}

/// Resident set size of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raise this process's soft RLIMIT_NOFILE towards `want` (never above the
/// hard limit); a portico spawned afterwards inherits it. Returns the limit now.
pub fn raise_nofile_limit(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let target = cur.maximum.map_or(want, |hard| hard.min(want));
    if target > soft {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: cur.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// One request as a strict HTTP/1.1 origin framed it (RFC 9112 section 6:
/// chunked wins over Content-Length).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    /// Header lines as received, in order (names lower-cased).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// All values of header `name` (lower case).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Everything a [`RecordingUpstream`] received.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Every byte of every connection, in arrival order per connection.
    pub raw: Vec<u8>,
    pub connections: usize,
    pub requests: Vec<SeenRequest>,
    /// Bytes a connection ended with that did not frame as a request.
    pub leftovers: Vec<Vec<u8>>,
}

/// A raw TCP HTTP/1.1 origin that records every byte and answers each
/// complete request with `200 ok` (keep-alive), so what reached it can be
/// checked byte for byte, independently of hyper's parser.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Arc<std::sync::Mutex<Recorded>>,
    task: JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Recorded::default()));
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                log2.lock().unwrap().connections += 1;
                tokio::spawn(record_conn(s, log2.clone()));
            }
        });
        RecordingUpstream { addr, log, task }
    }

    pub fn snapshot(&self) -> Recorded {
        self.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        *self.log.lock().unwrap() = Recorded::default();
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_conn(mut s: TcpStream, log: Arc<std::sync::Mutex<Recorded>>) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        log.lock().unwrap().raw.extend_from_slice(&chunk[..n]);
        loop {
            match frame_request(&buf) {
                Framed::Complete(req, used) => {
                    buf.drain(..used);
                    log.lock().unwrap().requests.push(req);
                    let resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                }
                Framed::Incomplete => break,
                Framed::Invalid => {
                    log.lock().unwrap().leftovers.push(std::mem::take(&mut buf));
                    return;
                }
            }
        }
    }
    if !buf.is_empty() {
        log.lock().unwrap().leftovers.push(buf);
    }
}

enum Framed {
    Complete(SeenRequest, usize),
    Incomplete,
    Invalid,
}

fn frame_request(buf: &[u8]) -> Framed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Framed::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target)) = (first.next(), first.next()) else {
        return Framed::Invalid;
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut req = SeenRequest {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    };
    let body_start = head_end + 4;
    let chunked = req
        .all("transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut pos = body_start;
        loop {
            let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                return Framed::Incomplete;
            };
            let line = String::from_utf8_lossy(&buf[pos..pos + eol]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let Ok(size) = usize::from_str_radix(size_text, 16) else {
                return Framed::Invalid;
            };
            pos += eol + 2;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                        return Framed::Incomplete;
                    };
                    pos += eol + 2;
                    if eol == 0 {
                        return Framed::Complete(req, pos);
                    }
                }
            }
            if buf.len() < pos + size + 2 {
                return Framed::Incomplete;
            }
            req.body.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
        }
    }
    let len = req
        .all("content-length")
        .first()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if buf.len() < body_start + len {
        return Framed::Incomplete;
    }
    req.body = buf[body_start..body_start + len].to_vec();
    Framed::Complete(req, body_start + len)
}

/// Accepts any server certificate: tests check what portico relays, not PKI
/// (portico's self-signed certificates are generated at start).
#[derive(Debug)]
pub struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAny {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Arc<AcceptAny> {
        Arc::new(AcceptAny(provider))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
