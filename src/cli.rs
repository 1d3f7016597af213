//! The command line: what `portico --help` shows.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `portico --version`: the package version, followed by the git commit when
/// built from a checkout (build.rs sets VERSION_WITH_COMMIT).
pub const VERSION: &str = match option_env!("VERSION_WITH_COMMIT") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// One front for port 443: routes TLS by SNI/ALPN, passes tunnels through with
/// PROXY protocol, and terminates TLS for streaming HTTP APIs.
#[derive(Parser)]
#[command(name = "portico", version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run with a config file.
    Run {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load and validate a config (and its certificates), print the route table.
    Check {
        /// Config file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write a portico config from an Xray JSON config and/or an nginx config.
    Import {
        /// Xray config (JSON, comments allowed).
        #[arg(long, value_name = "FILE")]
        xray: Option<PathBuf>,
        /// nginx config (its includes are read too).
        #[arg(long, value_name = "FILE")]
        nginx: Option<PathBuf>,
        /// Write the config here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}
