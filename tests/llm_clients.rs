//! Real LLM clients through portico: the OpenAI Codex CLI (`codex exec`,
//! npm `@openai/codex`, installed by scripts/test-all into
//! target/npm-clients) against a stand-in Responses API, over SSE and over a
//! WebSocket on `/v1/responses`.
//!
//! Codex runs isolated: an empty environment plus HOME/CODEX_HOME in a temp
//! directory, the provider's API key, an HTTPS_PROXY/HTTP_PROXY/ALL_PROXY
//! that closes every connection at once (and counts them: the tests assert
//! none came), its network features switched off in its config, and the test
//! CA as its only extra trust (CODEX_CA_CERTIFICATE and SSL_CERT_FILE).
//! It connects to `https://127.0.0.1:PORT/...`: loopback only.

mod common;
mod standin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

use common::{any_port, bounded, Portico, TempDir};
use standin::{Script, Standin, Transport, Upgrades};

/// The Codex CLI installed by scripts/test-all (`npm install --prefix`).
fn codex_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TEST_CODEX_BIN") {
        return PathBuf::from(p);
    }
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/npm-clients/node_modules/.bin/codex");
    assert!(
        p.exists(),
        "the Codex CLI is not installed at {}: run `scripts/test-all --deps-only` (npm install @openai/codex)",
        p.display()
    );
    p
}

/// A test CA and a leaf for 127.0.0.1/localhost signed by it, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portico test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("leaf params");
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("leaf.pem"),
        key: dir.join("leaf.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).expect("write CA");
    std::fs::write(&pki.cert, leaf.pem()).expect("write cert");
    std::fs::write(&pki.key, leaf_key.serialize_pem()).expect("write key");
    pki
}

/// A proxy that refuses every connection: it reads the request line (to
/// name the target in a failure message) and closes. Anything Codex tries
/// to reach outside loopback comes here and fails.
struct RefusingProxy {
    addr: SocketAddr,
    attempts: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingProxy {
    async fn start() -> RefusingProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = l.local_addr().expect("proxy address");
        let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = attempts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 512];
                    let n = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    let line = String::from_utf8_lossy(&buf[..n]);
                    let first = line.lines().next().unwrap_or("(nothing)").to_string();
                    seen.lock().expect("proxy log").push(first);
                });
            }
        });
        RefusingProxy {
            addr,
            attempts,
            task,
        }
    }
}

impl Drop for RefusingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one `codex exec` printed and how long it took.
struct CodexRun {
    ok: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl CodexRun {
    /// The final agent message from `--json` output.
    fn answer(&self) -> Option<String> {
        self.stdout.lines().rev().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["type"] == "item.completed" && v["item"]["type"] == "agent_message")
                .then(|| v["item"]["text"].as_str().map(str::to_string))
                .flatten()
        })
    }

    /// When Codex received each text delta (its own trace log's timestamps).
    fn delta_times(&self) -> Vec<SystemTime> {
        self.stderr
            .lines()
            .filter(|l| l.contains("app-server event: item/agentMessage/delta"))
            .filter_map(|l| parse_rfc3339(l.split_whitespace().next()?))
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "codex exec {} after {:?}\n--- stdout ---\n{}\n--- stderr (last 4000 bytes) ---\n{}",
            if self.ok { "succeeded" } else { "failed" },
            self.elapsed,
            self.stdout,
            tail(&self.stderr, 4000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `2026-11-30T01:21:38.354532Z` -> SystemTime (UTC, as Codex logs).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from the civil date (proleptic Gregorian), as in H. Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let nanos: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(
        UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + hh * 3600 + mm * 60 + ss)
            + Duration::from_nanos(nanos),
    )
}

/// One isolated Codex home: config, CA, proxy.
struct Codex {
    home: TempDir,
    ca: PathBuf,
    proxy: RefusingProxy,
}

const API_KEY_VAR: &str = "STANDIN_API_KEY";

impl Codex {
    async fn new(ca: &Path) -> Codex {
        let home = TempDir::new();
        std::fs::create_dir_all(home.path().join("codex")).expect("CODEX_HOME");
        std::fs::create_dir_all(home.path().join("work")).expect("workdir");
        Codex {
            home,
            ca: ca.to_path_buf(),
            proxy: RefusingProxy::start().await,
        }
    }

    /// Write config.toml for a provider at `base_url`.
    fn configure(&self, base_url: &str, websockets: bool) {
        let config = format!(
            r#"model = "gpt-standin"
model_provider = "standin"
# No network feature may reach outside loopback.
check_for_update_on_startup = false
web_search = "disabled"

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"

[history]
persistence = "none"

# Features that fetch catalogs or updates from the internet.
[features]
plugins = false
remote_plugin = false
plugin_sharing = false
apps = false
in_app_updates = false
tool_suggest = false

[model_providers.standin]
name = "stand-in relay"
base_url = "{base_url}"
env_key = "{API_KEY_VAR}"
wire_api = "responses"
supports_websockets = {websockets}
"#
        );
        std::fs::write(self.home.path().join("codex/config.toml"), config).expect("write config");
    }

    /// `codex exec --json PROMPT` with the isolated environment; bounded.
    async fn exec(&self, prompt: &str) -> CodexRun {
        let proxy = format!("http://{}", self.proxy.addr);
        let home = self.home.path();
        let mut cmd = tokio::process::Command::new(codex_bin());
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home)
            .env("CODEX_HOME", home.join("codex"))
            .env("TMPDIR", home)
            .env(API_KEY_VAR, "sk-standin-test")
            .env("HTTPS_PROXY", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env("ALL_PROXY", &proxy)
            .env("https_proxy", &proxy)
            .env("http_proxy", &proxy)
            .env("all_proxy", &proxy)
            // portico itself is reached directly (loopback).
            .env("NO_PROXY", "127.0.0.1")
            .env("no_proxy", "127.0.0.1")
            .env("CODEX_CA_CERTIFICATE", &self.ca)
            .env("SSL_CERT_FILE", &self.ca)
            // Timestamps of the events as Codex received them.
            .env("RUST_LOG", "codex_app_server::outgoing_message=trace")
            .env("NO_COLOR", "1")
            .current_dir(home.join("work"))
            .args([
                "exec",
                "--json",
                "--strict-config",
                "--skip-git-repo-check",
                "--sandbox",
                "read-only",
                prompt,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().expect("spawn codex");
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("codex exec did not finish within 60 s")
            .expect("codex exec output");
        CodexRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// Request lines of every connection Codex made to the proxy.
    fn proxy_attempts(&self) -> Vec<String> {
        self.proxy.attempts.lock().expect("proxy log").clone()
    }
}

/// portico in front of two stand-ins: `/ws/` goes to one that speaks
/// WebSocket, `/nows/` to one that answers the upgrade with 404.
async fn start_portico(
    pki: &Pki,
    ws: &Standin,
    nows: &Standin,
    websocket: &str,
) -> (Portico, SocketAddr) {
    let listen = any_port();
    let config = format!(
        r#"
[[listen]]
addr = "{listen}"

[[route]]
terminate = "api"

[site.api]
cert = "{cert}"
key = "{key}"

[[site.api.location]]
name = "ws"
path = "/ws/"
upstream = "ws"
{websocket}

[[site.api.location]]
name = "nows"
path = "/nows/"
upstream = "nows"
{websocket}

[upstream.ws]
url = "http://{ws}"

[upstream.nows]
url = "http://{nows}"
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
        ws = ws.addr,
        nows = nows.addr,
    );
    let portico = Portico::start(&config).await;
    let listen = portico.addr();
    (portico, listen)
}

/// Gaps between consecutive times, in ms.
fn gaps(t: &[SystemTime]) -> Vec<f64> {
    t.windows(2)
        .map(|w| {
            w[1].duration_since(w[0])
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(-1.0)
        })
        .collect()
}

/// Codex received every delta, with the stand-in's spacing within 30 ms.
/// Returns the per-delta (received - sent) latencies in ms.
fn check_spacing(run: &CodexRun, sent: &[SystemTime]) -> Vec<f64> {
    let got = run.delta_times();
    assert_eq!(
        got.len(),
        sent.len(),
        "Codex logged {} deltas, the stand-in sent {}\n{}",
        got.len(),
        sent.len(),
        run.describe()
    );
    let (gs, gg) = (gaps(sent), gaps(&got));
    for (i, (s, g)) in gs.iter().zip(&gg).enumerate() {
        assert!(
            (s - g).abs() <= 30.0,
            "delta {} came {g:.1} ms after the previous one, sent {s:.1} ms after it\nsent gaps {gs:?}\nseen gaps {gg:?}",
            i + 1
        );
    }
    got.iter()
        .zip(sent)
        .map(|(g, s)| match g.duration_since(*s) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -(e.duration().as_secs_f64() * 1e3),
        })
        .collect()
}

fn summary(lat: &[f64]) -> String {
    let mut v = lat.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return "none".into();
    }
    format!(
        "median {:.2} ms, max {:.2} ms over {} deltas",
        v[v.len() / 2],
        v[v.len() - 1],
        v.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_over_sse_and_websocket() {
    bounded(240, async {
        let dir = TempDir::new();
        let pki = make_pki(dir.path());
        let script = Script::standard();
        let ws = Standin::start(Upgrades::Accept, script.clone()).await;
        let nows = Standin::start(Upgrades::Refuse(404), script.clone()).await;
        let (portico, listen) = start_portico(&pki, &ws, &nows, "").await;
        let codex = Codex::new(&pki.ca).await;

        // SSE (Codex speaks h2 to portico).
        codex.configure(&format!("https://{listen}/ws/v1"), false);
        let run = codex.exec("say hello").await;
        assert!(run.ok, "{}", run.describe());
        assert_eq!(run.answer().as_deref(), Some(script.text().as_str()), "{}", run.describe());
        let log = ws.log();
        let turn = log.turns.last().expect("a turn");
        assert_eq!(turn.transport, Transport::Sse);
        let sse_lat = check_spacing(&run, &turn.delta_sent);
        let post = log.requests.iter().find(|r| r.method == "POST").expect("a POST");
        assert_eq!(post.path, "/ws/v1/responses");
        assert_eq!(post.header("accept"), Some("text/event-stream"));
        assert_eq!(post.header("authorization"), Some("Bearer sk-standin-test"));
        assert_eq!(turn.request["stream"], true, "{}", turn.request);
        eprintln!("SSE through portico: {}", summary(&sse_lat));

        // WebSocket.
        codex.configure(&format!("https://{listen}/ws/v1"), true);
        let run = codex.exec("say hello").await;
        assert!(run.ok, "{}", run.describe());
        assert_eq!(run.answer().as_deref(), Some(script.text().as_str()), "{}", run.describe());
        let log = ws.log();
        let turn = log.turns.last().expect("a turn");
        assert_eq!(turn.transport, Transport::WebSocket, "{log:?}");
        assert_eq!(turn.request["type"], "response.create", "{}", turn.request);
        // What Codex sends: a prewarm `response.create` with `generate:
        // false` when the socket opens, then one per turn with the input.
        let creates: Vec<_> = log.ws_messages.iter().filter(|m| m["type"] == "response.create").collect();
        assert!(creates.len() >= 2, "{:?}", log.ws_messages);
        assert_eq!(creates[0]["generate"], false, "{}", creates[0]);
        assert_eq!(turn.request["model"], "gpt-standin");
        assert!(turn.request["input"].to_string().contains("say hello"), "{}", turn.request);
        let upgrade = log.requests.iter().find(|r| r.method == "GET").expect("the upgrade request");
        assert_eq!(upgrade.path, "/ws/v1/responses");
        assert_eq!(upgrade.header("authorization"), Some("Bearer sk-standin-test"));
        let ws_lat = check_spacing(&run, &turn.delta_sent);
        // Both of Codex's turns on the socket (prewarm and the prompt) are
        // timed by portico_websocket_response_seconds.
        portico
            .wait_metric_at_least(
                "portico_websocket_response_seconds_count",
                &[("site", "api"), ("location", "ws")],
                2.0,
                Duration::from_secs(10),
            )
            .await;
        eprintln!("WebSocket through portico: {}", summary(&ws_lat));

        // The same two transports straight to the stand-in (plain HTTP): the
        // difference of the medians is what portico adds per event.
        let ws_addr = ws.addr;
        let direct = |ws: bool| {
            codex.configure(&format!("http://{ws_addr}/ws/v1"), ws);
            codex.exec("say hello")
        };
        let run = direct(false).await;
        assert!(run.ok, "{}", run.describe());
        let sse_direct = check_spacing(&run, &ws.log().turns.last().expect("a turn").delta_sent);
        let run = direct(true).await;
        assert!(run.ok, "{}", run.describe());
        let ws_direct = check_spacing(&run, &ws.log().turns.last().expect("a turn").delta_sent);
        eprintln!(
            "Codex delta latency (stand-in write -> Codex event): SSE direct {} / via portico {}; WebSocket direct {} / via portico {}",
            summary(&sse_direct),
            summary(&sse_lat),
            summary(&ws_direct),
            summary(&ws_lat)
        );
        let _ = &portico;

        assert_eq!(codex.proxy_attempts(), Vec::<String>::new(), "Codex tried to reach something outside loopback");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_falls_back_from_a_relay_without_websocket() {
    bounded(240, async {
        let dir = TempDir::new();
        let pki = make_pki(dir.path());
        let script = Script::standard();
        let ws = Standin::start(Upgrades::Accept, script.clone()).await;
        let nows = Standin::start(Upgrades::Refuse(404), script.clone()).await;
        let (_portico, listen) = start_portico(&pki, &ws, &nows, "").await;
        let codex = Codex::new(&pki.ca).await;

        codex.configure(&format!("https://{listen}/ws/v1"), true);
        let with_ws = codex.exec("say hello").await;
        assert!(with_ws.ok, "{}", with_ws.describe());

        codex.configure(&format!("https://{listen}/nows/v1"), true);
        let without = codex.exec("say hello").await;
        assert!(without.ok, "{}", without.describe());
        assert_eq!(without.answer().as_deref(), Some(script.text().as_str()), "{}", without.describe());
        let log = nows.log();
        eprintln!(
            "exec with WebSocket relay {:?}, with a relay answering 404: {:?} ({} upgrades refused)",
            with_ws.elapsed, without.elapsed, log.upgrades_refused
        );
        assert!(
            without.elapsed <= with_ws.elapsed + Duration::from_secs(1),
            "falling back took {:?} longer than a WebSocket exec ({:?} vs {:?}); {} upgrades reached the relay",
            without.elapsed.saturating_sub(with_ws.elapsed),
            without.elapsed,
            with_ws.elapsed,
            log.upgrades_refused
        );
        assert_eq!(log.upgrades_refused, 1, "{log:?}");
        // The next session gets 426 without portico asking the relay.
        let again = codex.exec("say hello").await;
        assert!(again.ok, "{}", again.describe());
        assert_eq!(nows.log().upgrades_refused, 1, "the refusal was not remembered");
        assert_eq!(codex.proxy_attempts(), Vec::<String>::new(), "Codex tried to reach something outside loopback");
    })
    .await;
}
