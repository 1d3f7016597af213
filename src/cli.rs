//! The command line: what `portico --help` shows.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// One front for port 443: routes TLS by SNI/ALPN, passes tunnels through with
/// PROXY protocol, and terminates TLS for streaming HTTP APIs.
#[derive(Parser)]
#[command(name = "portico", version, about, long_about = None)]
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
}
