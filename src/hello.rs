//! TEMPORARY stub until the real ClientHello reader lands.
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
pub const MAX_PEEK: usize = 16 * 1024;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    pub record_version: u16,
    pub hello_len: usize,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    Tls(ClientHello),
    Http,
    Ssh,
    Unknown,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("need more bytes")]
    Incomplete,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("too large")]
    TooLarge,
}
pub fn detect(_buf: &[u8]) -> Result<Peeked, DetectError> {
    Err(DetectError::Incomplete)
}
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("no bytes within {0:?}")]
    Silent(Duration),
    #[error("first bytes incomplete after {0:?} ({1} bytes)")]
    Timeout(Duration, usize),
    #[error("connection closed after {0} bytes")]
    Eof(usize),
    #[error(transparent)]
    Detect(DetectError),
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}
pub async fn peek<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Peeked, PeekError> {
    let _ = io.read_buf(buf).await?;
    let _ = timeout;
    detect(buf).map_err(PeekError::Detect)
}
