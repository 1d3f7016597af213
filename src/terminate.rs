//! TLS termination and the plain-HTTP redirect (filled in by the HTTP layer).

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::config::Config;
use crate::io::Prefixed;
use crate::listener::{ConnInfo, Generation, Shared};

/// Per-site TLS state built from a config.
#[derive(Default)]
pub struct Sites {}

impl Sites {
    pub fn build(_cfg: &Config) -> Result<Sites, crate::config::ConfigError> {
        Ok(Sites {})
    }
}

pub async fn serve(
    _io: Prefixed<TcpStream>,
    site: &str,
    info: ConnInfo,
    _gen: Arc<Generation>,
    _shared: Arc<Shared>,
) {
    tracing::debug!(site, client = %info.client, "TLS termination not available yet");
}

pub async fn redirect(
    _io: Prefixed<TcpStream>,
    info: ConnInfo,
    _gen: Arc<Generation>,
    _shared: Arc<Shared>,
) {
    tracing::debug!(client = %info.client, "redirect not available yet");
}
