//! ACME against a real ACME server: Debian's `pebble` (with
//! `pebble-challtestsrv` as its DNS, resolving the test names to
//! 127.0.0.1), its validation ports pointed at portico's listeners.
//! scripts/test-all installs the `pebble` package.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use common::*;

/// Every wait on pebble or portico in this file is bounded by this.
const ISSUE_WITHIN: Duration = Duration::from_secs(30);

/// A running pebble + pebble-challtestsrv pair, killed on drop.
struct Pebble {
    procs: Vec<Child>,
    dir: TempDir,
    /// The directory URL.
    url: String,
    management: SocketAddr,
    dns_management: SocketAddr,
    /// The root that signs pebble's own HTTPS certificate (portico's `acme.ca`).
    https_root: PathBuf,
    /// The root pebble issues under (from its management endpoint).
    issuing_root: CertificateDer<'static>,
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    assert!(
        found,
        "{tool} is not installed: scripts/test-all installs it (Debian package pebble)"
    );
}

impl Pebble {
    /// Start pebble with its TLS-ALPN-01 validations sent to `tls_port` and
    /// HTTP-01 to `http_port`; certificates valid for `validity` seconds.
    async fn start(tls_port: u16, http_port: u16, validity: u64) -> Pebble {
        need("pebble");
        need("pebble-challtestsrv");
        let dir = TempDir::new();
        // pebble's own HTTPS certificate, signed by a throwaway root.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pebble test root");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let https_root = dir.path().join("https-root.pem");
        std::fs::write(&https_root, ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();

        let listen = free_addr();
        let management = free_addr();
        let dns = free_addr();
        let dns_management = free_addr();
        let config = serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity,
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let challtest = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns.to_string()])
            .args(["-management", &dns_management.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns.to_string()])
            // Validate at once, accept every nonce, validate every order
            // (no reuse of earlier authorizations, so renewals validate too).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("start pebble");
        let mut p = Pebble {
            procs: vec![challtest, pebble],
            dir,
            url: format!("https://{listen}/dir"),
            management,
            dns_management,
            https_root,
            issuing_root: CertificateDer::from(Vec::new()),
        };
        for addr in [listen, management, dns_management] {
            wait_listening(addr).await;
        }
        let pem = p.https_get(management, "/roots/0").await;
        p.issuing_root = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .expect("pebble's /roots/0 is a PEM certificate");
        p
    }

    /// GET over HTTPS from pebble (trusting its HTTPS root): the body.
    async fn https_get(&self, addr: SocketAddr, path: &str) -> String {
        let root: CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_file(&self.https_root).unwrap();
        let connector = client_trusting(&root, &[]);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS to pebble");
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(text)
    }

    /// Make challtestsrv answer A queries for `host` with `ip`.
    async fn set_a(&self, host: &str, ip: &str) {
        let body = serde_json::json!({"host": host, "addresses": [ip]}).to_string();
        let mut s = TcpStream::connect(self.dns_management).await.unwrap();
        s.write_all(
            format!(
                "POST /add-a HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.dns_management,
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "challtestsrv add-a: {out}");
    }

    /// Orders pebble has accepted so far (its log has one line per order).
    fn orders(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("pebble.log"))
            .unwrap_or_default()
            .matches("Added order")
            .count()
    }

    fn client(&self) -> TlsConnector {
        client_trusting(&self.issuing_root, &["http/1.1"])
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        if std::thread::panicking() {
            for f in ["pebble.log", "pebble.err", "challtestsrv.err"] {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                eprintln!("--- {f} ---\n{text}");
            }
        }
    }
}

async fn wait_listening(addr: SocketAddr) {
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing listens on {addr} after 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client_trusting(root: &CertificateDer<'static>, alpn: &[&str]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("add root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

/// The leaf certificate portico serves for `name` (not verified).
async fn served_leaf(addr: SocketAddr, name: &str) -> Vec<u8> {
    let connector = insecure_connector(&[b"http/1.1"]);
    let (tls, _) = tls_connect(addr, &connector, name).await;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates");
    certs[0].to_vec()
}

/// Whether a client trusting only pebble's root accepts portico's certificate for `name`.
async fn trusted_by_pebble_root(
    pebble: &Pebble,
    addr: SocketAddr,
    name: &str,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    match tokio::time::timeout(
        Duration::from_secs(5),
        pebble.client().connect(server_name, tcp),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// An SSE origin: every request gets an endless event stream, one event
/// every 100 ms, numbered from 0.
async fn sse_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0u64.. {
                    let event = format!("data: {i}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if s.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

/// Read from an open SSE response until `n` more events arrived; panics
/// when they do not within `within`.
async fn read_events<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize, within: Duration) {
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the SSE stream ended after {got} of {n} events"),
            Ok(Ok(k)) => got += String::from_utf8_lossy(&buf[..k]).matches("data: ").count(),
            Ok(Err(e)) => panic!("the SSE stream failed after {got} of {n} events: {e}"),
            Err(_) => panic!("only {got} of {n} SSE events within {within:?}"),
        }
    }
}

fn acme_config(
    listen: SocketAddr,
    pebble: &Pebble,
    storage: &Path,
    challenge: &str,
    origin: SocketAddr,
    extra: &str,
) -> String {
    format!(
        r#"
[acme]
email = "ops@example.com"
directory = "{url}"
ca = "{ca}"
storage = "{storage}"
challenge = "{challenge}"
retry = "1s"

[[listen]]
addr = "{listen}"

{extra}

[[route]]
sni = ["api.test"]
terminate = "api"

[site.api]
cert = "acme"

[[site.api.location]]
path = "/"
upstream = "origin"

[upstream.origin]
url = "http://{origin}"
"#,
        url = pebble.url,
        ca = pebble.https_root.display(),
        storage = storage.display(),
    )
}

const API: &[(&str, &str)] = &[("site", "api"), ("result", "ok")];
const API_ERR: &[(&str, &str)] = &[("site", "api"), ("result", "error")];

/// TLS-ALPN-01 end to end: a temporary self-signed certificate first, the
/// issued one with no restart, a tunnel name on the same listener untouched,
/// a restart that reuses the stored certificate, and a renewal (short
/// validity) that new handshakes see while an SSE stream keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_reuses_and_renews() {
    bounded(120, async {
        // Pebble validates TLS-ALPN-01 on a port it is told at start, before
        // portico runs: this one port is picked in advance.
        let listen = free_addr();
        // 20 s certificates: renewal a third before the end, ~13 s after issuance.
        let pebble = Pebble::start(listen.port(), free_addr().port(), 20).await;
        let storage = TempDir::new();
        let origin = sse_origin().await;
        let cert = TestCert::generate();
        let (events, mut accepted) = mpsc::unbounded_channel();
        let echo = TlsEcho::start("tunnel", &cert, &["h2"], Expect::None, events).await;
        let tunnel = format!(
            "[backend.tunnel]\naddr = \"{}\"\n\n[[route]]\nsni = [\"tunnel.test\"]\npass = \"tunnel\"\n",
            echo.addr
        );
        let config = acme_config(listen, &pebble, storage.path(), "tls-alpn-01", origin, &tunnel);

        let started = Instant::now();
        let portico = Portico::start(&config).await;
        // A tunnel opened before issuance, and used through it.
        let tunnel_client = tls_connector(&cert, &["h2"], true);
        let (mut early, _) = tls_connect(listen, &tunnel_client, "tunnel.test").await;
        next_accepted(&mut accepted, Duration::from_secs(5)).await;
        early.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        early.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"before");

        portico
            .wait_metric_at_least("portico_acme_orders_total", API, 1.0, ISSUE_WITHIN)
            .await;
        let first_issue = started.elapsed();
        eprintln!("first certificate issued {first_issue:?} after portico started");
        trusted_by_pebble_root(&pebble, listen, "api.test")
            .await
            .expect("the issued certificate is accepted by a client trusting pebble's root");
        assert!(portico.stderr().contains("temporary self-signed"), "{}", portico.stderr());
        let issued = served_leaf(listen, "api.test").await;
        // The tunnel connection from before is untouched, and new tunnel
        // clients still reach the backend's own certificate.
        early.write_all(b"after!").await.unwrap();
        early.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after!");
        let (_late, _) = tls_connect(listen, &tunnel_client, "tunnel.test").await;
        assert_eq!(
            next_accepted(&mut accepted, Duration::from_secs(5)).await.sni.as_deref(),
            Some("tunnel.test")
        );
        let expiry = portico
            .metric(
                "portico_certificate_expiry_timestamp_seconds",
                &[("site", "api"), ("source", "acme")],
            )
            .await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(expiry > now && expiry < now + 25.0, "expiry {expiry}, now {now}");
        for f in ["account.json", "fullchain.pem", "privkey.pem"] {
            let path = find_file(storage.path(), f).unwrap_or_else(|| panic!("no {f} stored"));
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            let dir_mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(path.parent().unwrap()).unwrap().permissions(),
            );
            assert_eq!(dir_mode & 0o777, 0o700, "{}", path.parent().unwrap().display());
        }
        drop(portico);

        // Restart: the stored certificate is served and no order is placed.
        let orders_before = pebble.orders();
        let portico = Portico::start(&config).await;
        assert_eq!(served_leaf(listen, "api.test").await, issued);
        assert!(portico.stderr().contains("using the stored ACME certificate"));
        assert_eq!(portico.metric("portico_acme_orders_total", API).await, 0.0);
        assert_eq!(pebble.orders(), orders_before, "a restart placed a new order");

        // Renewal while an SSE stream is open.
        let (mut sse, _) = {
            let tcp = TcpStream::connect(listen).await.unwrap();
            let name = ServerName::try_from("api.test").unwrap();
            (pebble.client().connect(name, tcp).await.unwrap(), ())
        };
        sse.write_all(b"GET /events HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        read_events(&mut sse, 1, Duration::from_secs(5)).await;
        let renew_wait = Instant::now();
        portico
            .wait_metric_at_least("portico_acme_orders_total", API, 1.0, ISSUE_WITHIN)
            .await;
        eprintln!(
            "renewed {:?} after the restart ({:?} after the first issuance)",
            renew_wait.elapsed(),
            started.elapsed() - first_issue
        );
        let renewed = served_leaf(listen, "api.test").await;
        assert_ne!(renewed, issued, "new handshakes still get the old certificate");
        trusted_by_pebble_root(&pebble, listen, "api.test").await.unwrap();
        read_events(&mut sse, 5, Duration::from_secs(5)).await;
        assert!(pebble.orders() > orders_before);
    })
    .await;
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(p) = find_file(&path, name) {
                return Some(p);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// HTTP-01 on the plain-HTTP redirect listener; other paths still redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_on_the_redirect_route() {
    bounded(60, async {
        let listen = any_port();
        let plain = free_addr();
        let pebble = Pebble::start(free_addr().port(), plain.port(), 3600).await;
        let storage = TempDir::new();
        let origin = sse_origin().await;
        let extra = format!(
            "[[listen]]\naddr = \"{plain}\"\n\n[[route]]\nprotocol = \"http\"\nredirect = \"https\"\n"
        );
        let config = acme_config(listen, &pebble, storage.path(), "http-01", origin, &extra);
        // Started with a certificate file; SIGHUP switches the site to ACME
        // (a temporary self-signed certificate until the first is issued).
        let (cert, key) = openssl_cert(storage.path(), "file", 30);
        let from_file = format!("cert = \"{}\"\nkey = \"{}\"", cert.display(), key.display());
        let portico = Portico::start(&config.replace("cert = \"acme\"", &from_file)).await;
        let listen = portico.addr();
        let file = &[("site", "api"), ("source", "file")];
        let self_signed = &[("site", "api"), ("source", "self-signed")];
        assert!(portico.metric("portico_certificate_expiry_timestamp_seconds", file).await > 0.0);
        assert_eq!(portico.metric("portico_acme_orders_total", API).await, 0.0);
        portico.rewrite_config(&config);
        portico.signal("HUP");
        portico
            .wait_metric_at_least("portico_acme_orders_total", API, 1.0, ISSUE_WITHIN)
            .await;
        trusted_by_pebble_root(&pebble, listen, "api.test").await.unwrap();
        let (status, _) = http_get(plain, "/.well-known/acme-challenge/unknown").await.unwrap();
        assert_eq!(status, 308, "unknown tokens are redirected like any path");
        assert_eq!(portico.metric("portico_acme_orders_total", API_ERR).await, 0.0);
        // The superseded file and temporary self-signed series read NaN
        // (never alert); the acme one holds the issued certificate's date.
        for superseded in [file, self_signed] {
            let v = portico.metric("portico_certificate_expiry_timestamp_seconds", superseded).await;
            assert!(v.is_nan(), "{superseded:?} reads {v}, not NaN");
        }
        let acme = &[("site", "api"), ("source", "acme")];
        assert!(portico.metric("portico_certificate_expiry_timestamp_seconds", acme).await > 0.0);
    })
    .await;
}

/// A P-256 certificate for `api.test` valid for `days`, made by openssl:
/// `DIR/NAME.crt` and `DIR/NAME.key`.
fn openssl_cert(dir: &Path, name: &str, days: u32) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            &days.to_string(),
            "-subj",
            "/CN=api.test",
            "-addext",
            "subjectAltName=DNS:api.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed by scripts/test-all");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// A certificate file that expires within 14 days: `portico check` and
/// start-up warn, naming the file and the date, and still succeed; its
/// expiry is exported with source="file".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_certificate_expiring_soon_is_a_warning() {
    bounded(30, async {
        let dir = TempDir::new();
        let (cert, key) = openssl_cert(dir.path(), "soon", 5);
        let listen = any_port();
        let config = format!(
            "[[listen]]\naddr = \"{listen}\"\n\n[[route]]\nsni = [\"api.test\"]\nterminate = \"api\"\n\n[site.api]\ncert = \"{}\"\nkey = \"{}\"\n\n[[site.api.location]]\npath = \"/\"\nrespond = {{ status = 200 }}\n",
            cert.display(),
            key.display()
        );
        let path = dir.path().join("p.toml");
        std::fs::write(&path, &config).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let in_5_days = std::time::SystemTime::now() + Duration::from_secs(5 * 86400);
        let date = humantime::format_rfc3339_seconds(in_5_days).to_string();
        let want = format!("portico: warning: certificate {} (site.api.cert) expires on {}", cert.display(), &date[..10]);
        assert!(out.stderr.contains(&want), "{want:?} not in {:?}", out.stderr);

        let portico = Portico::start(&config).await;
        let log = portico.stderr();
        assert!(log.contains(&format!("certificate {} (site.api.cert) expires on {}", cert.display(), &date[..10])), "{log}");
        let expiry = portico
            .metric("portico_certificate_expiry_timestamp_seconds", &[("site", "api"), ("source", "file")])
            .await;
        let want = in_5_days.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((expiry - want).abs() < 86400.0 + 60.0, "expiry {expiry}, expected about {want}");
    })
    .await;
}

/// A challenge that cannot succeed (pebble resolves the name to 127.0.0.2,
/// where nothing listens): logged with the problem, counted, retried with
/// a doubling delay, and the site keeps its current certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_validation_keeps_the_certificate_and_backs_off() {
    bounded(90, async {
        // Pebble validates TLS-ALPN-01 on a port it is told at start, before
        // portico runs: this one port is picked in advance.
        let listen = free_addr();
        // 9 s certificates: renewal starts ~6 s after issuance.
        let pebble = Pebble::start(listen.port(), free_addr().port(), 9).await;
        let storage = TempDir::new();
        let origin = sse_origin().await;
        let config = acme_config(listen, &pebble, storage.path(), "tls-alpn-01", origin, "");
        let portico = Portico::start(&config).await;
        portico
            .wait_metric_at_least("portico_acme_orders_total", API, 1.0, ISSUE_WITHIN)
            .await;
        let mut issued = served_leaf(listen, "api.test").await;
        pebble.set_a("api.test", "127.0.0.2").await;
        // Pebble makes a new authorization only when rand.Intn(100) >
        // PEBBLE_AUTHZREUSE, so even at 0 it reuses the first issuance's
        // valid one for about 1 order in 100, and that renewal succeeds
        // without a validation. When that happens the check starts over
        // from the certificate it installed.
        let (mut oks, mut errs) = (1.0, 0.0);
        loop {
            portico
                .wait_metric_at_least(
                    "portico_acme_orders_total",
                    API_ERR,
                    errs + 3.0,
                    ISSUE_WITHIN,
                )
                .await;
            let now_ok = portico.metric("portico_acme_orders_total", API).await;
            if now_ok == oks {
                break;
            }
            eprintln!("pebble reused an authorization; checking the next three failures");
            oks = now_ok;
            errs = portico.metric("portico_acme_orders_total", API_ERR).await;
            issued = served_leaf(listen, "api.test").await;
        }
        assert_eq!(served_leaf(listen, "api.test").await, issued);
        assert_eq!(portico.metric("portico_acme_orders_total", API).await, oks);
        let log = portico.stderr();
        // The failures since the certificate now served was issued.
        let since = log.rfind("ACME certificate issued and in use").unwrap_or(0);
        let failures: Vec<&str> = log[since..]
            .lines()
            .filter(|l| l.contains("ACME renewal failed"))
            .collect();
        assert!(failures.len() >= 3, "{log}");
        eprintln!("failure lines:\n{}", failures.join("\n"));
        assert!(
            failures[0].contains("problem_type=urn:ietf:params:acme:error:")
                && failures[0].contains("127.0.0.2"),
            "the problem type and detail are logged: {}",
            failures[0]
        );
        for (line, delay) in failures
            .iter()
            .zip(["retry_in=1s", "retry_in=2s", "retry_in=4s"])
        {
            assert!(line.contains(delay), "expected {delay}: {line}");
        }
    })
    .await;
}

/// Bad ACME input: an unreachable directory, a URL that is not an ACME
/// directory, a `ca` file that is not PEM. Each is one clear log line and
/// the other site keeps serving; `portico check` reports the `ca` problem
/// and config errors offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_acme_input_is_one_line_and_other_sites_serve() {
    bounded(60, async {
        let listen = any_port();
        let pebble = Pebble::start(free_addr().port(), free_addr().port(), 3600).await;
        let storage = TempDir::new();
        let not_pem = storage.path().join("not.pem");
        std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
        let config = |directory: &str, ca: &Path| {
            format!(
                r#"
[acme]
directory = "{directory}"
ca = "{ca}"
storage = "{storage}"
retry = "30s"

[[listen]]
addr = "{listen}"

[[route]]
sni = ["api.test"]
terminate = "api"

[[route]]
sni = ["other.test"]
terminate = "other"

[site.api]
cert = "acme"

[[site.api.location]]
path = "/"
respond = {{ status = 200, body = "api" }}

[site.other]
cert = "self-signed"

[[site.other.location]]
path = "/"
respond = {{ status = 200, body = "other" }}
"#,
                ca = ca.display(),
                storage = storage.path().display(),
            )
        };
        let dead = DeadPort::new();
        let unreachable = format!("https://{}/dir", dead.addr);
        let not_acme = format!("https://{}/roots/0", pebble.management);
        let cases = [
            (
                unreachable.clone(),
                pebble.https_root.clone(),
                "is unreachable",
            ),
            (
                not_acme.clone(),
                pebble.https_root.clone(),
                "is not an ACME directory",
            ),
            (pebble.url.clone(), not_pem.clone(), "not a PEM certificate"),
        ];
        for (directory, ca, expect) in cases {
            let portico = Portico::start(&config(&directory, &ca)).await;
            let listen = portico.addr();
            portico
                .wait_metric_at_least("portico_acme_orders_total", API_ERR, 1.0, ISSUE_WITHIN)
                .await;
            let log = portico.stderr();
            let line = log
                .lines()
                .find(|l| l.contains("ACME issuance failed"))
                .unwrap_or_else(|| panic!("no failure line: {log}"));
            assert!(line.contains(expect), "{expect:?} not in {line}");
            eprintln!("{line}");
            // Other sites serve; the acme site keeps its temporary certificate.
            let connector = insecure_connector(&[b"http/1.1"]);
            for (name, body) in [("other.test", "other"), ("api.test", "api")] {
                let (mut tls, _) = tls_connect(listen, &connector, name).await;
                tls.write_all(
                    format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut out = String::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut out))
                    .await;
                assert!(
                    out.starts_with("HTTP/1.1 200") && out.ends_with(body),
                    "{name}: {out}"
                );
            }
        }

        // portico check: the ca file, and config errors, without a directory.
        let dir = TempDir::new();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, config(&unreachable, &not_pem)).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(
            out.stderr.contains("acme.ca") && out.stderr.contains("not a PEM certificate"),
            "{out:?}"
        );

        std::fs::write(&path, config(&unreachable, &pebble.https_root)).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(0), "{out:?}");

        let wildcard =
            config(&unreachable, &pebble.https_root).replace("[\"api.test\"]", "[\"*.api.test\"]");
        std::fs::write(&path, wildcard).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(
            out.stderr.contains("route[0].sni") && out.stderr.contains("DNS-01"),
            "{out:?}"
        );

        let bad = config(&unreachable, &pebble.https_root)
            .replace("retry = \"30s\"", "challenge = \"dns-01\"");
        std::fs::write(&path, bad).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("acme.challenge"), "{out:?}");

        let http01 = config(&unreachable, &pebble.https_root)
            .replace("retry = \"30s\"", "challenge = \"http-01\"");
        std::fs::write(&path, http01).unwrap();
        let out = portico_check(&path, &[]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("redirect route"), "{out:?}");
    })
    .await;
}
