//! The `portico` command: arguments, config, runtime, logging. The work is in the library.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

/// mimalloc: per-request allocations (headers, bodies, futures) cost a third
/// of glibc malloc's time here, and freed memory returns to the OS sooner.
#[cfg(not(feature = "count-alloc"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
/// `--features count-alloc` (benchmarks only): the same allocator, counted.
#[cfg(feature = "count-alloc")]
mod alloc_count;
#[cfg(feature = "count-alloc")]
#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;
use portico::config::{self, Config, LogFormat};
use portico::server;

use cli::{Cli, Command};

fn main() -> ExitCode {
    // Transparent huge pages off for this process: mimalloc's eagerly
    // committed arena is otherwise backed by 2 MiB pages where the kernel
    // allows it, and every open stream's buffers then cost whole huge-page
    // fragments. Measured with 2000 open SSE streams: 78 KiB of RSS per
    // stream with THP, 51 KiB without, and no difference in CPU per request.
    // Best effort: kernels without the prctl keep the default.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Run { config }) => run(load(Some(&config))),
        Some(Command::Import {
            xray,
            nginx,
            output,
        }) => portico::import::cli(xray.as_deref(), nginx.as_deref(), output.as_deref()),
        None => {
            let from_env = std::env::var_os("PORTICO_CONFIG").map(PathBuf::from);
            run(load(from_env.as_deref()))
        }
    }
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => config::load_file(p).map_err(|e| e.to_string()),
        None => config::load_str(config::EMBEDDED_DEFAULT, config::EMBEDDED_NAME)
            .map_err(|e| e.to_string()),
    }
}

fn check(path: &Path) -> ExitCode {
    let generation = match config::load_file(path).and_then(server::prepare) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::FAILURE;
        }
    };
    // acme wiring: the `ca` file is checked offline; run reports the same
    // problem from the ACME task and keeps serving the other sites.
    if let Some(ca) = generation.config.acme.as_ref().and_then(|a| a.ca.as_ref()) {
        if let Err(e) = config::acme::check_ca(ca) {
            eprintln!("portico: {}: acme.ca: {e}", generation.config.source);
            return ExitCode::FAILURE;
        }
    }
    for w in portico::tls::expiry_warnings(&generation.config) {
        eprintln!("portico: warning: {w}");
    }
    print!("{}", portico::describe::describe(&generation.config));
    ExitCode::SUCCESS
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set, wins over log.level.
    // rustls warns for every client that sends an IP address as SNI
    // (scanners, load tools): keep its noise at error unless asked for.
    let level = if cfg.log.level.contains("rustls") {
        cfg.log.level.clone()
    } else {
        format!("{},rustls=error", cfg.log.level)
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; journald and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(cfg: Result<Config, String>) -> ExitCode {
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&cfg);
    // TOKIO_WORKER_THREADS wins over `workers`; one worker means a
    // current-thread runtime, which skips the work-stealing machinery.
    let from_env = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    let workers = from_env.or(cfg.workers);
    let mut rt = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers {
            b.worker_threads(n);
        }
        b
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let embedded = cfg.path.is_none();
    let first_listen = cfg.listeners.first().map(|l| l.addr);
    let metrics = match portico::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("portico: metrics disabled: {e}");
            None
        }
    };
    // The recorder must exist before `prepare` registers per-location handles.
    let generation = match server::prepare(cfg) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("portico: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        if embedded {
            if let Some(addr) = first_listen {
                eprintln!(
                    "portico: running the embedded default config; try:\n  curl -k https://localhost:{}/",
                    addr.port()
                );
            }
        }
        #[cfg(feature = "count-alloc")]
        tokio::spawn(alloc_count::report_on_sigusr1());
        server::run(generation, metrics).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico: {e:#}");
            ExitCode::FAILURE
        }
    }
}
