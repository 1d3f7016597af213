//! Classify the first bytes of an inbound connection (TLS, HTTP/1.x or h2
//! prior knowledge, SSH, anything else) and read SNI + ALPN out of a TLS
//! ClientHello without consuming it, so the bytes can be replayed to a
//! passthrough backend or to our own TLS acceptor.
//!
//! The ClientHello is parsed by hand rather than with rustls because:
//!
//! - Routing needs only SNI and ALPN. Everything else (versions, cipher
//!   suites, groups, key shares, unknown extensions, GREASE) is skipped by
//!   length without being looked at: in passthrough the backend, not us,
//!   decides whether it can accept the hello, so we must not reject what a
//!   stricter parser would (rustls validates the hello as a terminating
//!   rustls server would).
//! - Bytes arrive in pieces. Every prefix of a valid hello must answer
//!   `Incomplete`, never an error, and once an answer other than `Incomplete`
//!   is given, more bytes never change it. So the parser separates "a
//!   declared length overruns its container" (`Malformed`, decided from the
//!   bytes already seen) from "the bytes have not arrived yet"
//!   (`Incomplete`). rustls has no public API that parses a partial
//!   ClientHello in place; its `Acceptor` takes its own copy of the input and
//!   reports errors the rustls way.
//! - Memory is bounded: oversize hellos are refused from their declared
//!   lengths before the bytes arrive, and the only buffer allocated is a copy
//!   of a message that spans several records (at most [`MAX_PEEK`] bytes).
//!
//! Framing is checked strictly (every length must fit its container and fill
//! it exactly, as TLS requires), values leniently.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Upper bound on bytes buffered while classifying a connection (ClientHello incl. record headers).
pub const MAX_PEEK: usize = 16 * 1024;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_SESSION_ID_LEN: u8 = 32;

const SSH_PREFIX: &[u8] = b"SSH-";
const MAX_METHOD_LEN: usize = 16;
const HTTP1_VERSIONS: [&[u8]; 2] = [b"HTTP/1.0", b"HTTP/1.1"];
const H2_PREFACE_VERSION: &[u8] = b"HTTP/2.0";
const HTTP_VERSION_LEN: usize = 8;

/// Grow the buffer in steps so a small hello does not cost a 16 KiB allocation.
const READ_CHUNK: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Lower-cased, trailing dot stripped; `None` when absent.
    pub sni: Option<String>,
    /// Offered ALPN protocols in client order (empty if absent).
    pub alpn: Vec<Vec<u8>>,
    /// Version field of the first record header (0x0301..0x0304 are all accepted).
    pub record_version: u16,
    /// Total bytes of the records that carry the complete ClientHello (header included).
    pub hello_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    Tls(ClientHello),
    Http,
    Ssh,
    Unknown,
}

impl Peeked {
    /// Stable label for logs and metrics.
    pub fn protocol_name(&self) -> &'static str {
        match self {
            Peeked::Tls(_) => "tls",
            Peeked::Http => "http",
            Peeked::Ssh => "ssh",
            Peeked::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("need more bytes")]
    Incomplete,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_PEEK} bytes")]
    TooLarge,
}

#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("no bytes within {0:?}")]
    Silent(Duration),
    #[error("first bytes incomplete after {0:?} ({1} bytes)")]
    Timeout(Duration, usize),
    #[error("connection closed after {0} bytes")]
    Eof(usize),
    /// Only `Malformed` or `TooLarge`: `Incomplete` turns into reading more.
    #[error(transparent)]
    Detect(DetectError),
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

/// Pure: classify the first bytes of a connection. `Err(Incomplete)` means "read more and call again".
///
/// The answer for a prefix is either `Incomplete` or the answer for any
/// longer input, so callers may decide as soon as it is not `Incomplete`.
pub fn detect(buf: &[u8]) -> Result<Peeked, DetectError> {
    match buf {
        [] | [CONTENT_TYPE_HANDSHAKE] => Err(DetectError::Incomplete),
        [CONTENT_TYPE_HANDSHAKE, 0x03, ..] => parse_client_hello(buf).map(Peeked::Tls),
        // 0x16 is not a tchar and not 'S': nothing else can start this way.
        [CONTENT_TYPE_HANDSHAKE, ..] => Ok(Peeked::Unknown),
        _ if buf.starts_with(SSH_PREFIX) => Ok(Peeked::Ssh),
        // "S", "SS", "SSH" could still become SSH (or an HTTP method).
        _ if SSH_PREFIX.starts_with(buf) => Err(DetectError::Incomplete),
        _ => detect_http(buf),
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Anything but SP and controls: bytes >= 0x80 are left for the HTTP parser
/// to reject with a proper 400 instead of being treated as another protocol.
fn is_target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

/// Request line `method SP target SP version (CRLF | LF)`, decided byte by byte.
fn detect_http(buf: &[u8]) -> Result<Peeked, DetectError> {
    let scan = &buf[..buf.len().min(MAX_PEEK)];
    let need_more = || {
        if scan.len() >= MAX_PEEK {
            Err(DetectError::TooLarge)
        } else {
            Err(DetectError::Incomplete)
        }
    };

    let mut i = 0;
    while scan.get(i).copied().is_some_and(is_tchar) {
        i += 1;
        if i > MAX_METHOD_LEN {
            return Ok(Peeked::Unknown);
        }
    }
    let Some(&after_method) = scan.get(i) else {
        return need_more();
    };
    if i == 0 || after_method != b' ' {
        return Ok(Peeked::Unknown);
    }
    let method = &scan[..i];
    i += 1;

    let target_start = i;
    while scan.get(i).copied().is_some_and(is_target_byte) {
        i += 1;
    }
    let Some(&after_target) = scan.get(i) else {
        return need_more();
    };
    if i == target_start || after_target != b' ' {
        return Ok(Peeked::Unknown);
    }
    let target = &scan[target_start..i];
    i += 1;

    let rest = scan.get(i..).unwrap_or_default();
    let version = &rest[..rest.len().min(HTTP_VERSION_LEN)];
    let h2_preface = method == b"PRI" && target == b"*";
    let version_possible = HTTP1_VERSIONS.iter().any(|v| v.starts_with(version))
        || (h2_preface && H2_PREFACE_VERSION.starts_with(version));
    if !version_possible {
        return Ok(Peeked::Unknown);
    }
    match &rest[version.len()..] {
        [] | [b'\r'] => need_more(),
        [b'\n', ..] | [b'\r', b'\n', ..] => Ok(Peeked::Http),
        _ => Ok(Peeked::Unknown),
    }
}

/// Pure: parse a TLS ClientHello that starts at buf[0] (record header included), reassembled across records.
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHello, DetectError> {
    use DetectError::{Incomplete, Malformed, TooLarge};

    // Errors are reported in byte order (the first broken thing in the
    // stream wins), so the answer does not depend on how reads were cut.
    let mut pos = 0;
    let mut record_version = 0;
    // Handshake bytes promised by the record headers seen so far.
    let mut declared = 0;
    let mut msg_len = None;
    let mut hello_len = None;
    let mut record_error = None;
    // The message is borrowed from `buf` while it sits in one record and
    // copied only once a second record is needed.
    let mut first: &[u8] = &[];
    let mut joined: Option<Vec<u8>> = None;

    loop {
        match next_record(buf, pos) {
            Ok(Some((version, len))) => {
                if pos == 0 {
                    record_version = version;
                }
                let record_end = pos + RECORD_HEADER_LEN + len;
                declared += len;
                let payload = buf
                    .get(pos + RECORD_HEADER_LEN..record_end.min(buf.len()))
                    .unwrap_or_default();
                let record_complete = payload.len() == len;
                if pos == 0 {
                    first = payload;
                } else {
                    joined
                        .get_or_insert_with(|| {
                            let mut v = Vec::with_capacity(buf.len().min(MAX_PEEK));
                            v.extend_from_slice(first);
                            v
                        })
                        .extend_from_slice(payload);
                }
                let stream = joined.as_deref().unwrap_or(first);

                if stream.first().is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO) {
                    return Err(Malformed("first handshake message is not a ClientHello"));
                }
                if let (None, Some(&[_, n0, n1, n2])) =
                    (msg_len, stream.get(..HANDSHAKE_HEADER_LEN))
                {
                    let len = HANDSHAKE_HEADER_LEN
                        + (usize::from(n0) << 16 | usize::from(n1) << 8 | usize::from(n2));
                    // The missing bytes need at least one more record header.
                    if len > declared
                        && record_end + RECORD_HEADER_LEN + (len - declared) > MAX_PEEK
                    {
                        return Err(TooLarge);
                    }
                    msg_len = Some(len);
                }
                if !record_complete {
                    break;
                }
                if msg_len.is_some_and(|len| len <= declared) {
                    hello_len = Some(record_end);
                    break;
                }
                pos = record_end;
            }
            Ok(None) => break,
            Err(e) => {
                record_error = Some(e);
                break;
            }
        }
    }

    if let Some(msg_len) = msg_len {
        // Parsing whatever has arrived lets a broken hello fail before
        // the rest of it comes in.
        let stream = joined.as_deref().unwrap_or(first);
        let body = stream
            .get(HANDSHAKE_HEADER_LEN..msg_len.min(stream.len()))
            .unwrap_or_default();
        match parse_body(body, msg_len - HANDSHAKE_HEADER_LEN) {
            Ok((sni, alpn)) => {
                if let Some(hello_len) = hello_len {
                    return Ok(ClientHello {
                        sni,
                        alpn,
                        record_version,
                        hello_len,
                    });
                }
            }
            Err(Incomplete) => {}
            Err(e) => return Err(e),
        }
    }
    match record_error {
        Some(e) => Err(e),
        None => Err(Incomplete),
    }
}

/// Version and payload length of the record at `pos`; `None` while its
/// header is still partial. Header bytes are judged one by one so a wrong
/// record type is reported without waiting for the rest of the header.
fn next_record(buf: &[u8], pos: usize) -> Result<Option<(u16, usize)>, DetectError> {
    let rest = buf.get(pos..).unwrap_or_default();
    match rest.first() {
        None => return Ok(None),
        Some(&CONTENT_TYPE_HANDSHAKE) => {}
        Some(_) if pos == 0 => return Err(DetectError::Malformed("not a TLS handshake record")),
        Some(_) => {
            return Err(DetectError::Malformed(
                "non-handshake record inside ClientHello",
            ))
        }
    }
    if rest.get(1).is_some_and(|&major| major != 0x03) {
        return Err(DetectError::Malformed("record version is not 3.x"));
    }
    let Some(&[_, v0, v1, l0, l1]) = rest.get(..RECORD_HEADER_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    if len == 0 {
        return Err(DetectError::Malformed("zero-length record"));
    }
    if pos + RECORD_HEADER_LEN + len > MAX_PEEK {
        return Err(DetectError::TooLarge);
    }
    Ok(Some((u16::from_be_bytes([v0, v1]), len)))
}

/// Cursor over a length-delimited container of which only a prefix may
/// have arrived: overrunning `end` is `Malformed`, overrunning the
/// available `data` is `Incomplete`.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], end: usize) -> Self {
        Reader { data, pos: 0, end }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// Claims `n` declared bytes without needing them to have arrived.
    fn skip(&mut self, n: usize, what: &'static str) -> Result<usize, DetectError> {
        if n > self.end.saturating_sub(self.pos) {
            return Err(DetectError::Malformed(what));
        }
        let start = self.pos;
        self.pos += n;
        Ok(start)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DetectError> {
        let start = self.skip(n, what)?;
        self.data
            .get(start..start + n)
            .ok_or(DetectError::Incomplete)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DetectError> {
        let bytes = self.take(N, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| DetectError::Incomplete)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DetectError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DetectError> {
        self.array::<2>(what).map(u16::from_be_bytes)
    }

    /// A nested container of `n` declared bytes, seeing whatever part of them has arrived.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, DetectError> {
        let start = self.skip(n, what)?;
        let avail = self.data.get(start..).unwrap_or_default();
        Ok(Reader::new(&avail[..avail.len().min(n)], n))
    }
}

type Found = (Option<String>, Vec<Vec<u8>>);

/// ClientHello body after the 4-byte handshake header.
fn parse_body(data: &[u8], len: usize) -> Result<Found, DetectError> {
    use DetectError::Malformed;

    let mut r = Reader::new(data, len);
    r.skip(2 + 32, "truncated legacy_version/random")?;
    let sid_len = r.u8("truncated session_id")?;
    if sid_len > MAX_SESSION_ID_LEN {
        return Err(Malformed("session_id longer than 32 bytes"));
    }
    r.skip(sid_len.into(), "session_id overruns ClientHello")?;
    let suites_len = r.u16("truncated cipher_suites")?;
    if suites_len % 2 != 0 {
        return Err(Malformed("odd cipher_suites length"));
    }
    r.skip(suites_len.into(), "cipher_suites overrun ClientHello")?;
    let compression_len = r.u8("truncated compression_methods")?;
    r.skip(
        compression_len.into(),
        "compression_methods overrun ClientHello",
    )?;
    // Pre-extension (TLS 1.0 era) hellos simply stop here.
    if r.is_empty() {
        return Ok((None, Vec::new()));
    }
    let ext_len = r.u16("truncated extensions length")?;
    let mut exts = r.sub(ext_len.into(), "extensions overrun ClientHello")?;
    if !r.is_empty() {
        return Err(Malformed("bytes after extensions"));
    }

    let mut sni = None;
    let mut seen_sni = false;
    let mut alpn = None;
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension header")?;
        let len = exts.u16("truncated extension header")?;
        let body = exts.sub(len.into(), "extension overruns extensions block")?;
        match ext_type {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Err(Malformed("duplicate server_name extension"));
                }
                seen_sni = true;
                sni = parse_server_name(body)?;
            }
            EXT_ALPN => {
                if alpn.is_some() {
                    return Err(Malformed("duplicate ALPN extension"));
                }
                alpn = Some(parse_alpn(body)?);
            }
            _ => {}
        }
    }
    Ok((sni, alpn.unwrap_or_default()))
}

/// RFC 6066 ServerNameList; only host_name matters, other name types are skipped.
fn parse_server_name(mut ext: Reader<'_>) -> Result<Option<String>, DetectError> {
    use DetectError::Malformed;

    let list_len = ext.u16("truncated server_name list")?;
    if list_len == 0 {
        return Err(Malformed("empty server_name list"));
    }
    let mut list = ext.sub(list_len.into(), "server_name list overruns extension")?;
    if !ext.is_empty() {
        return Err(Malformed("bytes after server_name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server_name entry")?;
        let len = list.u16("truncated server_name entry")?;
        if name_type != NAME_TYPE_HOST_NAME {
            list.skip(len.into(), "server_name entry overruns list")?;
            continue;
        }
        // Two host names would let us and the backend route differently.
        if host.is_some() {
            return Err(Malformed("duplicate host_name"));
        }
        let name = list.take(len.into(), "host_name overruns server_name list")?;
        host = Some(normalize_host(name)?);
    }
    Ok(host)
}

/// The name is a routing key: refuse what could never be a DNS name or
/// could smuggle a path, and compare names case-insensitively, FQDN or not.
fn normalize_host(name: &[u8]) -> Result<String, DetectError> {
    if !name.iter().all(|&b| b.is_ascii_graphic() && b != b'/') {
        return Err(DetectError::Malformed("invalid byte in SNI host name"));
    }
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(DetectError::Malformed("empty SNI host name"));
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// RFC 7301 ProtocolNameList, kept byte-exact (GREASE values included).
fn parse_alpn(mut ext: Reader<'_>) -> Result<Vec<Vec<u8>>, DetectError> {
    use DetectError::Malformed;

    let list_len = ext.u16("truncated ALPN list")?;
    if list_len == 0 {
        return Err(Malformed("empty ALPN list"));
    }
    let mut list = ext.sub(list_len.into(), "ALPN list overruns extension")?;
    if !ext.is_empty() {
        return Err(Malformed("bytes after ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let len = list.u8("truncated ALPN protocol")?;
        if len == 0 {
            return Err(Malformed("empty ALPN protocol name"));
        }
        protocols.push(
            list.take(len.into(), "ALPN protocol overruns list")?
                .to_vec(),
        );
    }
    Ok(protocols)
}

/// Read from `io` into `buf` (appending; `buf` may already hold bytes, e.g. left over after an inbound PROXY header)
/// until `detect` decides, bounded by MAX_PEEK bytes and by `timeout` for the whole operation.
/// Every byte read stays in `buf`: the caller replays `buf` before the rest of the stream, so nothing is consumed.
pub async fn peek<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Peeked, PeekError> {
    let outcome = tokio::time::timeout(timeout, read_until_decided(io, buf)).await;
    match outcome {
        Ok(result) => result,
        Err(_) if buf.is_empty() => Err(PeekError::Silent(timeout)),
        Err(_) => Err(PeekError::Timeout(timeout, buf.len())),
    }
}

async fn read_until_decided<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<Peeked, PeekError> {
    loop {
        match detect(buf) {
            Err(DetectError::Incomplete) => {}
            Ok(peeked) => return Ok(peeked),
            Err(e) => return Err(PeekError::Detect(e)),
        }
        let room = MAX_PEEK.saturating_sub(buf.len());
        if room == 0 {
            return Err(PeekError::Detect(DetectError::TooLarge));
        }
        buf.reserve(room.min(READ_CHUNK));
        // The limit keeps a fast sender from pushing `buf` past MAX_PEEK.
        let n = io.read_buf(&mut (&mut *buf).limit(room)).await?;
        if n == 0 {
            return Err(PeekError::Eof(buf.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/clienthello/",
                $name,
                ".bin"
            ))
        };
    }

    struct Fixture {
        name: &'static str,
        bytes: &'static [u8],
        len: usize,
        sni: Option<&'static str>,
        alpn: &'static [&'static [u8]],
    }

    const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
    const H1: &[&[u8]] = &[b"http/1.1"];

    /// Expected values from INDEX.md's summary table.
    const FIXTURES: &[Fixture] = &[
        Fixture {
            name: "chromium-default",
            bytes: fixture!("chromium-default"),
            len: 2015,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "chromium-default-b",
            bytes: fixture!("chromium-default-b"),
            len: 1919,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "curl-default",
            bytes: fixture!("curl-default"),
            len: 517,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "curl-http2",
            bytes: fixture!("curl-http2"),
            len: 517,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "curl-http1.1",
            bytes: fixture!("curl-http1.1"),
            len: 517,
            sni: Some("tunnel.test"),
            alpn: H1,
        },
        Fixture {
            name: "curl-api-http2",
            bytes: fixture!("curl-api-http2"),
            len: 517,
            sni: Some("api.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "openssl-s_client-default",
            bytes: fixture!("openssl-s_client-default"),
            len: 335,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "openssl-s_client-nosni",
            bytes: fixture!("openssl-s_client-nosni"),
            len: 315,
            sni: None,
            alpn: H2_H1,
        },
        Fixture {
            name: "openssl-s_client-tls12",
            bytes: fixture!("openssl-s_client-tls12"),
            len: 226,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "python-ssl-default",
            bytes: fixture!("python-ssl-default"),
            len: 517,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
        Fixture {
            name: "chromium-3records",
            bytes: fixture!("chromium-3records"),
            len: 2025,
            sni: Some("tunnel.test"),
            alpn: H2_H1,
        },
    ];

    fn fixture(name: &str) -> &'static [u8] {
        FIXTURES
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.bytes)
            .expect("known fixture")
    }

    fn alpn(list: &[&[u8]]) -> Vec<Vec<u8>> {
        list.iter().map(|p| p.to_vec()).collect()
    }

    fn tls(bytes: &[u8]) -> ClientHello {
        match detect(bytes) {
            Ok(Peeked::Tls(hello)) => hello,
            other => panic!("expected TLS, got {other:?}"),
        }
    }

    fn assert_every_prefix_incomplete(bytes: &[u8]) {
        for n in 0..bytes.len() {
            assert_eq!(
                detect(&bytes[..n]),
                Err(DetectError::Incomplete),
                "prefix {n} of {}",
                bytes.len()
            );
        }
    }

    // ---- test-side TLS framing helpers (well-formed input only) ----

    /// (content type, version, payload) of each record.
    fn records(bytes: &[u8]) -> Vec<(u8, u16, &[u8])> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            out.push((
                rest[0],
                u16::from_be_bytes([rest[1], rest[2]]),
                &rest[5..5 + len],
            ));
            rest = &rest[5 + len..];
        }
        out
    }

    fn handshake_bytes(bytes: &[u8]) -> Vec<u8> {
        records(bytes).iter().flat_map(|r| r.2.to_vec()).collect()
    }

    /// Extension types in order, for a well-formed hello.
    fn ext_types(bytes: &[u8]) -> Vec<u16> {
        let msg = handshake_bytes(bytes);
        let be16 = |i: usize| usize::from(u16::from_be_bytes([msg[i], msg[i + 1]]));
        let mut i = 4 + 2 + 32;
        i += 1 + usize::from(msg[i]);
        i += 2 + be16(i);
        i += 1 + usize::from(msg[i]);
        let end = i + 2 + be16(i);
        i += 2;
        let mut out = Vec::new();
        while i < end {
            out.push(be16(i) as u16);
            i += 4 + be16(i + 2);
        }
        out
    }

    /// RFC 8701 reserved value.
    fn is_grease(v: u16) -> bool {
        v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
    }

    /// Records of `version` whose payloads are `msg` cut at `cuts` (ascending).
    fn frame(msg: &[u8], cuts: &[usize], version: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&msg.len())) {
            let part = &msg[start..end];
            out.push(CONTENT_TYPE_HANDSHAKE);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
            start = end;
        }
        out
    }

    fn record(msg: &[u8]) -> Vec<u8> {
        frame(msg, &[], 0x0301)
    }

    fn u16_prefixed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn ext(ext_type: u16, body: &[u8]) -> Vec<u8> {
        let mut out = ext_type.to_be_bytes().to_vec();
        out.extend(u16_prefixed(body));
        out
    }

    fn sni_body(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend(u16_prefixed(name));
        }
        u16_prefixed(&list)
    }

    fn alpn_body(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        u16_prefixed(&list)
    }

    /// ClientHello body up to and including compression methods.
    fn hello_prefix(session_id: &[u8], suites: &[u8], compression: &[u8]) -> Vec<u8> {
        let mut out = vec![0x03, 0x03];
        out.extend_from_slice(&[0x5a; 32]);
        out.push(session_id.len() as u8);
        out.extend_from_slice(session_id);
        out.extend(u16_prefixed(suites));
        out.push(compression.len() as u8);
        out.extend_from_slice(compression);
        out
    }

    /// Handshake message (type 1) around `body`.
    fn message(body: &[u8]) -> Vec<u8> {
        let len = body.len() as u32;
        let mut out = vec![HANDSHAKE_CLIENT_HELLO];
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(body);
        out
    }

    /// A plain record-framed ClientHello with the given extensions.
    fn hello_with(exts: &[Vec<u8>]) -> Vec<u8> {
        let mut body = hello_prefix(&[7; 32], &[0x13, 0x01, 0x13, 0x02], &[0]);
        body.extend(u16_prefixed(&exts.concat()));
        record(&message(&body))
    }

    fn malformed(bytes: &[u8]) -> &'static str {
        match detect(bytes) {
            Err(DetectError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    // ---- 1. fixtures ----

    #[test]
    fn fixtures_match_index() {
        assert_eq!(FIXTURES.len(), 11);
        for f in FIXTURES {
            assert_eq!(f.bytes.len(), f.len, "{}", f.name);
            let hello = tls(f.bytes);
            assert_eq!(hello.sni.as_deref(), f.sni, "{}", f.name);
            assert_eq!(hello.alpn, alpn(f.alpn), "{}", f.name);
            assert_eq!(hello.hello_len, f.bytes.len(), "{}", f.name);
            assert_eq!(hello.record_version, 0x0301, "{}", f.name);
            assert_eq!(parse_client_hello(f.bytes), Ok(hello), "{}", f.name);
        }
    }

    #[test]
    fn chromium_fixtures_are_post_quantum_with_grease() {
        for name in [
            "chromium-default",
            "chromium-default-b",
            "chromium-3records",
        ] {
            let bytes = fixture(name);
            assert!((1900..=2100).contains(&bytes.len()), "{name}");
            let msg = handshake_bytes(bytes);
            // X25519MLKEM768 key share: group 0x11ec, 1216-byte key.
            assert!(
                msg.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]),
                "{name}"
            );
            // GREASE cipher suite is the first one offered (after the
            // 32-byte session id and the suites length).
            let first_suite = [msg[4 + 2 + 32 + 1 + 32 + 2], msg[4 + 2 + 32 + 1 + 32 + 3]];
            assert!(is_grease(u16::from_be_bytes(first_suite)), "{name}");
            let types = ext_types(bytes);
            assert!(
                types.iter().filter(|&&t| is_grease(t)).count() == 2,
                "{name}"
            );
            assert!(types.contains(&0xfe0d), "{name}: GREASE ECH");
        }
    }

    #[test]
    fn three_record_fixture_splits_sni_across_records() {
        let bytes = fixture("chromium-3records");
        let recs = records(bytes);
        let lens: Vec<usize> = recs.iter().map(|r| r.2.len()).collect();
        assert_eq!(lens, [1000, 669, 341]);
        assert!(recs[1].2.ends_with(b"tunnel"));
        assert!(recs[2].2.starts_with(b".test"));
        assert_eq!(
            handshake_bytes(bytes),
            handshake_bytes(fixture("chromium-default"))
        );
        let one = tls(fixture("chromium-default"));
        let three = tls(bytes);
        assert_eq!(three.sni, one.sni);
        assert_eq!(three.alpn, one.alpn);
        assert_eq!(three.hello_len, 2025);
    }

    // ---- 2. every prefix ----

    #[test]
    fn fixtures_every_prefix_is_incomplete() {
        for f in FIXTURES {
            assert_every_prefix_incomplete(f.bytes);
            assert!(matches!(detect(f.bytes), Ok(Peeked::Tls(_))), "{}", f.name);
        }
    }

    #[test]
    fn bytes_after_the_hello_are_not_counted() {
        for f in FIXTURES {
            let mut bytes = f.bytes.to_vec();
            // The next record (e.g. early data) may already be in the buffer.
            bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x02, 0xaa]);
            let hello = tls(&bytes);
            assert_eq!(hello.hello_len, f.len, "{}", f.name);
            assert_eq!(Ok(hello), parse_client_hello(f.bytes), "{}", f.name);
        }
    }

    // ---- 3. rustls-generated hellos ----

    mod rustls_hellos {
        use super::*;
        use rustls::client::danger::{
            HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
        };
        use rustls::crypto::{aws_lc_rs, CryptoProvider};
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

        /// No handshake completes, so nothing is ever verified.
        #[derive(Debug)]
        struct AcceptAnything;

        impl ServerCertVerifier for AcceptAnything {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, rustls::Error> {
                Ok(ServerCertVerified::assertion())
            }

            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }

            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }

            fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
                aws_lc_rs::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }

        fn client_hello(
            provider: CryptoProvider,
            versions: &[&'static rustls::SupportedProtocolVersion],
            sni: bool,
        ) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(versions)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            cfg.enable_sni = sni;
            let mut conn = ClientConnection::new(Arc::new(cfg), "tunnel.test".try_into()?)?;
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out)?;
            }
            Ok(out)
        }

        fn x25519_only() -> CryptoProvider {
            CryptoProvider {
                kx_groups: vec![aws_lc_rs::kx_group::X25519],
                ..aws_lc_rs::default_provider()
            }
        }

        fn check(bytes: &[u8], sni: Option<&str>) -> ClientHello {
            let hello = tls(bytes);
            assert_eq!(hello.sni.as_deref(), sni);
            assert_eq!(hello.alpn, alpn(H2_H1));
            assert_eq!(hello.hello_len, bytes.len());
            assert_eq!(hello.record_version, 0x0301);
            assert_every_prefix_incomplete(bytes);
            hello
        }

        #[test]
        fn default_provider_prefers_post_quantum() -> TestResult {
            let provider = aws_lc_rs::default_provider();
            assert_eq!(
                provider.kx_groups[0].name(),
                rustls::NamedGroup::X25519MLKEM768
            );
            let bytes = client_hello(provider, rustls::DEFAULT_VERSIONS, true)?;
            assert!(bytes.len() > 1100, "{}", bytes.len());
            // X25519MLKEM768 share: 1184-byte ML-KEM key + 32-byte X25519 key.
            assert!(bytes.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]));
            check(&bytes, Some("tunnel.test"));
            Ok(())
        }

        #[test]
        fn x25519_only_hello_is_small() -> TestResult {
            let bytes = client_hello(x25519_only(), rustls::DEFAULT_VERSIONS, true)?;
            assert!(bytes.len() < 400, "{}", bytes.len());
            assert!(!bytes.windows(2).any(|w| w == [0x11, 0xec]));
            check(&bytes, Some("tunnel.test"));
            Ok(())
        }

        #[test]
        fn sni_disabled() -> TestResult {
            let bytes = client_hello(x25519_only(), rustls::DEFAULT_VERSIONS, false)?;
            check(&bytes, None);
            let bytes = client_hello(
                aws_lc_rs::default_provider(),
                rustls::DEFAULT_VERSIONS,
                false,
            )?;
            check(&bytes, None);
            Ok(())
        }

        #[test]
        fn tls12_only() -> TestResult {
            let bytes = client_hello(x25519_only(), &[&rustls::version::TLS12], true)?;
            check(&bytes, Some("tunnel.test"));
            // A 1.2-only hello carries no key_share (51).
            let types = ext_types(&bytes);
            assert!(types.contains(&EXT_SERVER_NAME) && types.contains(&EXT_ALPN));
            assert!(!types.contains(&51), "{types:?}");
            Ok(())
        }
    }

    // ---- 4. synthetic ----

    #[test]
    fn reframed_at_every_split_point() {
        for name in ["openssl-s_client-default", "chromium-default"] {
            let original = fixture(name);
            let msg = handshake_bytes(original);
            let expected = tls(original);
            for cut in 1..msg.len() {
                let bytes = frame(&msg, &[cut], 0x0301);
                let hello = tls(&bytes);
                assert_eq!(hello.sni, expected.sni, "{name} cut {cut}");
                assert_eq!(hello.alpn, expected.alpn, "{name} cut {cut}");
                assert_eq!(hello.hello_len, original.len() + 5, "{name} cut {cut}");
            }
        }
    }

    #[test]
    fn reframed_into_three_records_everywhere() {
        let original = fixture("openssl-s_client-tls12");
        let msg = handshake_bytes(original);
        let expected = tls(original);
        for a in 1..msg.len() {
            for b in (a + 1..msg.len()).step_by(7) {
                let bytes = frame(&msg, &[a, b], 0x0303);
                let hello = tls(&bytes);
                assert_eq!(hello.sni, expected.sni, "cuts {a},{b}");
                assert_eq!(hello.alpn, expected.alpn, "cuts {a},{b}");
                assert_eq!(hello.hello_len, original.len() + 10, "cuts {a},{b}");
                assert_eq!(hello.record_version, 0x0303);
            }
        }
    }

    #[test]
    fn one_byte_records() {
        let original = fixture("openssl-s_client-default");
        let msg = handshake_bytes(original);
        let cuts: Vec<usize> = (1..msg.len()).collect();
        let bytes = frame(&msg, &cuts, 0x0301);
        assert_eq!(bytes.len(), msg.len() * 6);
        let hello = tls(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("tunnel.test"));
        assert_eq!(hello.alpn, alpn(H2_H1));
        assert_eq!(hello.hello_len, bytes.len());
        assert_every_prefix_incomplete(&bytes);

        // The biggest fixture still fits the bound when every byte is a record.
        let msg = handshake_bytes(fixture("chromium-default"));
        let cuts: Vec<usize> = (1..msg.len()).collect();
        let bytes = frame(&msg, &cuts, 0x0301);
        assert_eq!(bytes.len(), 12060);
        assert_eq!(tls(&bytes).hello_len, 12060);
    }

    #[test]
    fn every_record_version_3_x_parses() {
        let msg = handshake_bytes(fixture("curl-default"));
        for version in [0x0301, 0x0302, 0x0303, 0x0304] {
            let hello = tls(&frame(&msg, &[100], version));
            assert_eq!(hello.record_version, version);
            assert_eq!(hello.sni.as_deref(), Some("tunnel.test"));
        }
        // Only the first record's version is reported.
        let mut bytes = frame(&msg, &[100], 0x0301);
        bytes[105 + 2] = 0x03;
        assert_eq!(tls(&bytes).record_version, 0x0301);
        // SSL 2 style or non-3.x major version is not TLS at all.
        assert_eq!(detect(&frame(&msg, &[], 0x0201)), Ok(Peeked::Unknown));
    }

    #[test]
    fn hello_without_extensions() {
        let bytes = record(&message(&hello_prefix(&[], &[0x00, 0x2f], &[0])));
        let hello = tls(&bytes);
        assert_eq!(
            hello,
            ClientHello {
                sni: None,
                alpn: Vec::new(),
                record_version: 0x0301,
                hello_len: bytes.len(),
            }
        );
        assert_every_prefix_incomplete(&bytes);
        // An empty extensions block is fine too.
        assert_eq!(tls(&hello_with(&[])).sni, None);
    }

    #[test]
    fn grease_and_unknown_values_are_skipped() {
        let mut body = hello_prefix(&[1; 32], &[0x7a, 0x7a, 0x13, 0x01, 0xfe, 0xfe], &[0]);
        let exts = [
            ext(0x0a0a, &[]),
            ext(0x1a1a, &[0]),
            ext(EXT_ALPN, &alpn_body(&[b"\x3a\x3a", b"h2"])),
            ext(0xfe0d, &[0xff; 300]),
            ext(EXT_SERVER_NAME, &sni_body(&[(0, b"grease.test")])),
            ext(0xfafa, &[]),
        ]
        .concat();
        body.extend(u16_prefixed(&exts));
        // Unknown legacy_version must not matter either.
        body[0] = 0x7f;
        body[1] = 0x17;
        let bytes = record(&message(&body));
        let hello = tls(&bytes);
        assert_eq!(hello.sni.as_deref(), Some("grease.test"));
        assert_eq!(hello.alpn, vec![b"\x3a\x3a".to_vec(), b"h2".to_vec()]);
    }

    #[test]
    fn sni_is_normalised() {
        let bytes = hello_with(&[ext(EXT_SERVER_NAME, &sni_body(&[(0, b"Tunnel.TEST.")]))]);
        assert_eq!(tls(&bytes).sni.as_deref(), Some("tunnel.test"));
        // Only one dot is stripped.
        let bytes = hello_with(&[ext(EXT_SERVER_NAME, &sni_body(&[(0, b"a.b..")]))]);
        assert_eq!(tls(&bytes).sni.as_deref(), Some("a.b."));
        // Other name types are skipped, the host_name is still found.
        let bytes = hello_with(&[ext(
            EXT_SERVER_NAME,
            &sni_body(&[(7, b"whatever"), (0, b"X.Test")]),
        )]);
        assert_eq!(tls(&bytes).sni.as_deref(), Some("x.test"));
        // A list with no host_name is no SNI.
        let bytes = hello_with(&[ext(EXT_SERVER_NAME, &sni_body(&[(7, b"x")]))]);
        assert_eq!(tls(&bytes).sni, None);
    }

    #[test]
    fn trailing_bytes_in_the_final_record_are_counted() {
        let msg = handshake_bytes(fixture("curl-default"));
        let mut payload = msg.clone();
        // Next handshake message bytes in the same record.
        payload.extend_from_slice(&[0x14, 0, 0, 1, 0]);
        let bytes = frame(&payload, &[200], 0x0301);
        let hello = tls(&bytes);
        assert_eq!(hello.hello_len, bytes.len());
        assert_eq!(hello.sni.as_deref(), Some("tunnel.test"));
        // Until that record is complete we still need more.
        assert_eq!(
            detect(&bytes[..bytes.len() - 1]),
            Err(DetectError::Incomplete)
        );
    }

    // ---- 5. malformed / truncated ----

    #[test]
    fn bad_handshake_type() {
        let mut bytes = fixture("curl-default").to_vec();
        bytes[5] = 2;
        assert_eq!(
            malformed(&bytes),
            "first handshake message is not a ClientHello"
        );
        // Decided from the first payload byte.
        assert_eq!(
            malformed(&bytes[..6]),
            "first handshake message is not a ClientHello"
        );
        // Also when the handshake header is split over records.
        let mut msg = handshake_bytes(fixture("curl-default"));
        msg[0] = 0x0b;
        assert_eq!(
            malformed(&frame(&msg, &[1, 2], 0x0301)[..6]),
            "first handshake message is not a ClientHello"
        );
    }

    #[test]
    fn record_type_change_mid_hello() {
        let msg = handshake_bytes(fixture("openssl-s_client-default"));
        let mut bytes = frame(&msg, &[100], 0x0301);
        let second = 5 + 100;
        bytes[second] = 0x17;
        assert_eq!(malformed(&bytes), "non-handshake record inside ClientHello");
        // Known as soon as the type byte arrives.
        assert_eq!(
            malformed(&bytes[..second + 1]),
            "non-handshake record inside ClientHello"
        );
        assert_eq!(detect(&bytes[..second]), Err(DetectError::Incomplete));
        bytes[second] = 0x15;
        assert_eq!(malformed(&bytes), "non-handshake record inside ClientHello");
        bytes[second] = CONTENT_TYPE_HANDSHAKE;
        bytes[second + 1] = 0x04;
        assert_eq!(malformed(&bytes), "record version is not 3.x");
    }

    #[test]
    fn first_broken_byte_wins_across_records() {
        // Body error in record 1, foreign record type after it: the body
        // error comes first in the stream, whatever the read sizes.
        let mut body = hello_prefix(&[0; 32], &[0x13, 0x01], &[0]);
        body[34] = 33;
        let mut bytes = frame(&message(&body), &[60], 0x0301);
        bytes[65] = 0x17;
        for n in 5 + 4 + 35..=bytes.len() {
            assert_eq!(malformed(&bytes[..n]), "session_id longer than 32 bytes");
        }
        // Foreign record before the body goes wrong: the record error wins.
        let mut body = hello_prefix(&[0; 32], &[0x13, 0x01], &[0]);
        body[34] = 33;
        let mut bytes = frame(&message(&body), &[20], 0x0301);
        bytes[25] = 0x17;
        for n in 26..=bytes.len() {
            assert_eq!(
                malformed(&bytes[..n]),
                "non-handshake record inside ClientHello"
            );
        }
        assert_eq!(detect(&bytes[..25]), Err(DetectError::Incomplete));
    }

    #[test]
    fn zero_length_record() {
        assert_eq!(malformed(&[0x16, 3, 1, 0, 0]), "zero-length record");
        let msg = handshake_bytes(fixture("openssl-s_client-default"));
        let mut bytes = frame(&msg, &[10], 0x0301);
        bytes.splice(15..15, [0x16, 3, 1, 0, 0]);
        assert_eq!(malformed(&bytes), "zero-length record");
    }

    #[test]
    fn lengths_exceeding_their_container() {
        // Extension length past the extensions block.
        let mut bad_ext = ext(0x1234, &[0; 4]);
        bad_ext[3] = 5;
        assert_eq!(
            malformed(&hello_with(&[bad_ext])),
            "extension overruns extensions block"
        );
        // Half an extension header.
        assert_eq!(
            malformed(&hello_with(&[vec![0x00]])),
            "truncated extension header"
        );
        // Extensions block past the message.
        let mut body = hello_prefix(&[], &[0x13, 0x01], &[0]);
        body.extend_from_slice(&[0x00, 0x10, 0x00, 0x00, 0x00, 0x00]);
        assert_eq!(
            malformed(&record(&message(&body))),
            "extensions overrun ClientHello"
        );
        // Extensions block shorter than the rest of the message.
        let mut body = hello_prefix(&[], &[0x13, 0x01], &[0]);
        body.extend_from_slice(&[0x00, 0x00, 0xaa]);
        assert_eq!(
            malformed(&record(&message(&body))),
            "bytes after extensions"
        );
        // One stray byte where the extensions length would be.
        let mut body = hello_prefix(&[], &[0x13, 0x01], &[0]);
        body.push(0);
        assert_eq!(
            malformed(&record(&message(&body))),
            "truncated extensions length"
        );
        // Cipher suites past the message.
        let mut body = hello_prefix(&[], &[], &[]);
        body.truncate(35);
        body.extend_from_slice(&[0x00, 0x40, 0x13, 0x01]);
        assert_eq!(
            malformed(&record(&message(&body))),
            "cipher_suites overrun ClientHello"
        );
        // Message shorter than random.
        assert_eq!(
            malformed(&record(&message(&[3, 3, 0, 0]))),
            "truncated legacy_version/random"
        );
        // SNI list past the extension; host name past the list.
        let mut sni = sni_body(&[(0, b"a.test")]);
        sni[1] += 1;
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &sni)])),
            "server_name list overruns extension"
        );
        let mut sni = sni_body(&[(0, b"a.test")]);
        sni[4] += 1;
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &sni)])),
            "host_name overruns server_name list"
        );
        let mut sni = sni_body(&[(0, b"a.test")]);
        sni.push(0);
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &sni)])),
            "bytes after server_name list"
        );
        // ALPN name past its list, empty name, empty list.
        let mut a = alpn_body(&[b"h2"]);
        a[2] = 3;
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_ALPN, &a)])),
            "ALPN protocol overruns list"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_ALPN, &alpn_body(&[b""]))])),
            "empty ALPN protocol name"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_ALPN, &[0, 0])])),
            "empty ALPN list"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_ALPN, &[])])),
            "truncated ALPN list"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &[])])),
            "truncated server_name list"
        );
    }

    #[test]
    fn declared_length_too_large_is_known_from_nine_bytes() {
        // One 512-byte record announcing a 17000-byte ClientHello.
        let bytes = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x42, 0x68];
        assert_eq!(detect(&bytes), Err(DetectError::TooLarge));
        assert_eq!(detect(&bytes[..8]), Err(DetectError::Incomplete));
        // A 16379-byte message in one record ends exactly at MAX_PEEK: allowed.
        let fits = [0x16, 0x03, 0x01, 0x3f, 0xfb, 0x01, 0x00, 0x3f, 0xf7];
        assert_eq!(detect(&fits), Err(DetectError::Incomplete));
        // One byte more does not fit.
        let over = [0x16, 0x03, 0x01, 0x3f, 0xfc];
        assert_eq!(detect(&over), Err(DetectError::TooLarge));
        // Message needing a second record whose header cannot fit.
        let split = [0x16, 0x03, 0x01, 0x3f, 0xfb, 0x01, 0x00, 0x3f, 0xf8];
        assert_eq!(detect(&split), Err(DetectError::TooLarge));
    }

    #[test]
    fn session_id_longer_than_32() {
        let mut body = hello_prefix(&[0; 32], &[0x13, 0x01], &[0]);
        body[34] = 33;
        assert_eq!(
            malformed(&record(&message(&body))),
            "session_id longer than 32 bytes"
        );
        // Decided as soon as the length byte is in, before the rest arrives.
        let bytes = record(&message(&body));
        assert_eq!(
            malformed(&bytes[..5 + 4 + 35]),
            "session_id longer than 32 bytes"
        );
        assert_eq!(detect(&bytes[..5 + 4 + 34]), Err(DetectError::Incomplete));
    }

    #[test]
    fn odd_cipher_suite_length() {
        let body = hello_prefix(&[], &[0x13, 0x01, 0x13], &[0]);
        assert_eq!(
            malformed(&record(&message(&body))),
            "odd cipher_suites length"
        );
    }

    #[test]
    fn bad_sni_values() {
        for (name, why) in [
            (&b""[..], "empty SNI host name"),
            (b".", "empty SNI host name"),
            (b"a b.test", "invalid byte in SNI host name"),
            (b"a/b.test", "invalid byte in SNI host name"),
            (b"a\x00.test", "invalid byte in SNI host name"),
            (b"caf\xc3\xa9.test", "invalid byte in SNI host name"),
        ] {
            let bytes = hello_with(&[ext(EXT_SERVER_NAME, &sni_body(&[(0, name)]))]);
            assert_eq!(malformed(&bytes), why, "{name:?}");
        }
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &[0, 0])])),
            "empty server_name list"
        );
    }

    #[test]
    fn duplicates() {
        let sni = ext(EXT_SERVER_NAME, &sni_body(&[(0, b"a.test")]));
        let other = ext(EXT_SERVER_NAME, &sni_body(&[(0, b"b.test")]));
        assert_eq!(
            malformed(&hello_with(&[sni.clone(), other])),
            "duplicate server_name extension"
        );
        let a = ext(EXT_ALPN, &alpn_body(&[b"h2"]));
        assert_eq!(
            malformed(&hello_with(&[a.clone(), sni, a])),
            "duplicate ALPN extension"
        );
        let two_hosts = sni_body(&[(0, b"a.test"), (0, b"b.test")]);
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &two_hosts)])),
            "duplicate host_name"
        );
    }

    #[test]
    fn not_a_handshake_record() {
        assert_eq!(
            parse_client_hello(&[0x17, 3, 3, 0, 1, 0]),
            Err(DetectError::Malformed("not a TLS handshake record"))
        );
        assert_eq!(parse_client_hello(&[]), Err(DetectError::Incomplete));
    }

    /// Deterministic so a failure reproduces.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn mutations_never_panic_and_answers_are_stable() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut seen = [0usize; 6];
        for _ in 0..20_000 {
            let mut v = FIXTURES[rng.below(FIXTURES.len())].bytes.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(v.len().max(1));
                match rng.below(6) {
                    0 => {
                        if let Some(b) = v.get_mut(at) {
                            *b = rng.next() as u8;
                        }
                    }
                    1 => {
                        if let Some(b) = v.get_mut(at) {
                            *b ^= 1 << rng.below(8);
                        }
                    }
                    2 => v.truncate(at),
                    3 => {
                        // Header and length bytes are where bugs hide.
                        let at = rng.below(v.len().clamp(1, 12));
                        if let Some(b) = v.get_mut(at) {
                            *b = rng.next() as u8;
                        }
                    }
                    4 => v.insert(at.min(v.len()), rng.next() as u8),
                    _ => {
                        if !v.is_empty() {
                            v.remove(at);
                        }
                    }
                }
            }
            let result = detect(&v);
            seen[match &result {
                Ok(Peeked::Tls(_)) => 0,
                Ok(Peeked::Http | Peeked::Ssh) => 1,
                Ok(Peeked::Unknown) => 2,
                Err(DetectError::Incomplete) => 3,
                Err(DetectError::Malformed(_)) => 4,
                Err(DetectError::TooLarge) => 5,
            }] += 1;
            if let Ok(Peeked::Tls(hello)) = &result {
                assert!(hello.hello_len <= v.len() && hello.hello_len >= 9);
                assert_eq!(detect(&v[..hello.hello_len]), result);
                assert_eq!(
                    detect(&v[..hello.hello_len - 1]),
                    Err(DetectError::Incomplete)
                );
                if let Some(sni) = &hello.sni {
                    assert!(!sni.is_empty());
                    assert!(sni
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
                }
                assert!(hello.alpn.iter().all(|p| !p.is_empty()));
            }
            // A prefix answers Incomplete or the same thing.
            let p = rng.below(v.len() + 1);
            let prefix = detect(&v[..p]);
            assert!(
                prefix == Err(DetectError::Incomplete) || prefix == result,
                "prefix {p}: {prefix:?} vs {result:?}"
            );
            // More bytes never change a decision.
            if result != Err(DetectError::Incomplete) {
                let mut longer = v.clone();
                longer.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8));
                assert_eq!(detect(&longer), result);
            }
        }
        // The loop exercised every kind of answer it can reach.
        assert!(
            seen[0] > 0 && seen[3] > 0 && seen[4] > 0 && seen[5] > 0,
            "{seen:?}"
        );
    }

    #[test]
    fn mutated_and_reframed_hellos_decide_consistently() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..3_000 {
            let mut msg = handshake_bytes(FIXTURES[rng.below(FIXTURES.len())].bytes);
            for _ in 0..rng.below(3) {
                let at = rng.below(msg.len());
                msg[at] = rng.next() as u8;
            }
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .map(|_| 1 + rng.below(msg.len() - 1))
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut bytes = frame(&msg, &cuts, 0x0301);
            if rng.below(4) == 0 {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            let result = detect(&bytes);
            for _ in 0..8 {
                let p = rng.below(bytes.len() + 1);
                let prefix = detect(&bytes[..p]);
                assert!(
                    prefix == Err(DetectError::Incomplete) || prefix == result,
                    "prefix {p}/{}: {prefix:?} vs {result:?}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn every_prefix_of_the_biggest_one_byte_record_hello() {
        let msg = handshake_bytes(fixture("chromium-default"));
        let cuts: Vec<usize> = (1..msg.len()).collect();
        let bytes = frame(&msg, &cuts, 0x0301);
        assert_every_prefix_incomplete(&bytes);
        assert_eq!(tls(&bytes).hello_len, bytes.len());
    }

    // ---- 6. detect ----

    #[test]
    fn http_request_lines() {
        let get = b"GET / HTTP/1.1\r\n";
        assert_eq!(detect(get), Ok(Peeked::Http));
        assert_every_prefix_incomplete(get);
        assert_eq!(detect(b"POST /v1/chat HTTP/1.0\n"), Ok(Peeked::Http));
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n"), Ok(Peeked::Http));
        assert_every_prefix_incomplete(b"PRI * HTTP/2.0\r\n");
        assert_eq!(
            detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Ok(Peeked::Http)
        );
        assert_eq!(
            detect(b"get /x?y=%20 HTTP/1.1\r\nHost: a\r\n"),
            Ok(Peeked::Http)
        );
        assert_eq!(detect(b"OPTIONS * HTTP/1.1\r\n"), Ok(Peeked::Http));
        assert_eq!(
            detect(b"CONNECT example.test:443 HTTP/1.1\r\n"),
            Ok(Peeked::Http)
        );
        assert_eq!(detect(b"M-SEARCH * HTTP/1.1\r\n"), Ok(Peeked::Http));
        assert_eq!(detect(b"SEARCH / HTTP/1.1\r\n"), Ok(Peeked::Http));
        assert_eq!(detect(b"GET /\xc3\xa9 HTTP/1.1\r\n"), Ok(Peeked::Http));
        assert_eq!(detect(b"SSH / HTTP/1.1\n"), Ok(Peeked::Http));
        assert_eq!(detect(b"SSH"), Err(DetectError::Incomplete));
        assert_eq!(detect(b"SSX"), Err(DetectError::Incomplete));
        assert_eq!(detect(b"ABCDEFGHIJKLMNOP / HTTP/1.1\r\n"), Ok(Peeked::Http));
    }

    #[test]
    fn not_http() {
        for (input, decided_at) in [
            (&b"GET / FOO\r\n"[..], 7),
            (b"GET / HTTP/2.0\r\n", 12),
            (b"GET / HTTP/1.1\rX", 16),
            (b"GET / HTTP/1.1 \r\n", 15),
            (b"GET  / HTTP/1.1\r\n", 5),
            (b"GET /\x01 HTTP/1.1\r\n", 6),
            (b"GET\t/ HTTP/1.1\r\n", 4),
            (b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\n", 17),
            (b" GET / HTTP/1.1\r\n", 1),
            (b"\x00\x01", 1),
            (b"\x16\x01", 2),
            (b"{\"jsonrpc\"", 1),
            (b"\x80\x2e\x01\x03\x01", 1),
        ] {
            assert_eq!(detect(input), Ok(Peeked::Unknown), "{input:?}");
            assert_eq!(
                detect(&input[..decided_at]),
                Ok(Peeked::Unknown),
                "{input:?}"
            );
            assert_eq!(
                detect(&input[..decided_at - 1]),
                Err(DetectError::Incomplete),
                "{input:?}"
            );
        }
    }

    #[test]
    fn ssh() {
        let banner = b"SSH-2.0-OpenSSH_9.2\r\n";
        assert_eq!(detect(banner), Ok(Peeked::Ssh));
        assert_eq!(detect(b"SSH-"), Ok(Peeked::Ssh));
        for n in 0..4 {
            assert_eq!(detect(&banner[..n]), Err(DetectError::Incomplete));
        }
    }

    #[test]
    fn request_line_bounded_by_max_peek() {
        // A method can be 16 characters at most, so a run of 'A' is ruled out early.
        assert_eq!(detect(&[b'A'; MAX_PEEK]), Ok(Peeked::Unknown));
        assert_eq!(detect(&[b'A'; 17]), Ok(Peeked::Unknown));
        assert_eq!(detect(&[b'A'; 16]), Err(DetectError::Incomplete));
        // A long target with no line end hits the bound.
        let mut long = b"GET /".to_vec();
        long.resize(MAX_PEEK - 1, b'a');
        assert_eq!(detect(&long), Err(DetectError::Incomplete));
        long.push(b'a');
        assert_eq!(detect(&long), Err(DetectError::TooLarge));
        long.push(b'a');
        assert_eq!(detect(&long), Err(DetectError::TooLarge));
        // The same length with a line end inside the bound is fine.
        let mut ok = b"GET /".to_vec();
        ok.resize(MAX_PEEK - 10, b'a');
        ok.extend_from_slice(b" HTTP/1.1\n");
        assert_eq!(ok.len(), MAX_PEEK);
        assert_eq!(detect(&ok), Ok(Peeked::Http));
    }

    #[test]
    fn empty_and_names() {
        assert_eq!(detect(b""), Err(DetectError::Incomplete));
        assert_eq!(detect(b"\x16"), Err(DetectError::Incomplete));
        assert_eq!(
            tls(fixture("curl-default")).sni.as_deref(),
            Some("tunnel.test")
        );
        assert_eq!(
            Peeked::Tls(tls(fixture("curl-default"))).protocol_name(),
            "tls"
        );
        assert_eq!(Peeked::Http.protocol_name(), "http");
        assert_eq!(Peeked::Ssh.protocol_name(), "ssh");
        assert_eq!(Peeked::Unknown.protocol_name(), "unknown");
        assert_eq!(
            DetectError::TooLarge.to_string(),
            "ClientHello larger than 16384 bytes"
        );
        assert_eq!(
            DetectError::Malformed("x").to_string(),
            "malformed ClientHello: x"
        );
    }

    // ---- 7. peek ----

    const T: Duration = Duration::from_millis(100);
    const LONG: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn peek_one_byte_at_a_time() -> TestResult {
        let hello = fixture("openssl-s_client-default");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for b in hello {
                client.write_all(&[*b]).await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client.write_all(b"after").await?;
            client.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut buf = BytesMut::new();
        let peeked = peek(&mut server, &mut buf, LONG).await?;
        assert_eq!(peeked, Peeked::Tls(tls(hello)));
        // Nothing beyond the hello was there yet.
        assert_eq!(&buf[..], hello);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut rest).await?;
        assert_eq!(rest, b"after");
        writer.await??;
        Ok(())
    }

    #[tokio::test]
    async fn peek_over_tcp_keeps_every_byte() -> TestResult {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hello = fixture("chromium-3records");
        let mut sent = hello.to_vec();
        sent.extend((0..3000u32).map(|i| i as u8));
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            for chunk in to_send.chunks(333) {
                stream.write_all(chunk).await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stream.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let (mut stream, _) = listener.accept().await?;
        let mut buf = BytesMut::new();
        let peeked = peek(&mut stream, &mut buf, LONG).await?;
        let Peeked::Tls(ch) = peeked else {
            panic!("expected TLS, got {peeked:?}");
        };
        assert_eq!(ch.sni.as_deref(), Some("tunnel.test"));
        assert_eq!(ch.hello_len, hello.len());
        assert!(buf.len() >= hello.len() && buf.len() <= MAX_PEEK);
        let mut all = buf.to_vec();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut all).await?;
        assert_eq!(all, sent);
        writer.await??;
        Ok(())
    }

    #[tokio::test]
    async fn peek_silent_peer() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let start = tokio::time::Instant::now();
        let err = peek(&mut server, &mut buf, T).await;
        assert!(
            matches!(err, Err(PeekError::Silent(d)) if d == T),
            "{err:?}"
        );
        assert!(start.elapsed() >= T);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn peek_partial_then_nothing() -> TestResult {
        let hello = fixture("curl-default");
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&hello[..100]).await?;
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, T).await;
        assert!(
            matches!(err, Err(PeekError::Timeout(d, 100)) if d == T),
            "{err:?}"
        );
        assert_eq!(&buf[..], &hello[..100]);
        drop(client);
        Ok(())
    }

    #[tokio::test]
    async fn peek_eof_mid_hello() -> TestResult {
        let hello = fixture("curl-default");
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&hello[..200]).await?;
        drop(client);
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, LONG).await;
        assert!(matches!(err, Err(PeekError::Eof(200))), "{err:?}");
        assert_eq!(&buf[..], &hello[..200]);
        // Closed before any byte.
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, LONG).await;
        assert!(matches!(err, Err(PeekError::Eof(0))), "{err:?}");
        Ok(())
    }

    #[tokio::test]
    async fn peek_uses_leftover_bytes() -> TestResult {
        let hello = fixture("chromium-default");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&hello[50..]).await?;
        let mut buf = BytesMut::from(&hello[..50]);
        let peeked = peek(&mut server, &mut buf, LONG).await?;
        assert_eq!(peeked, Peeked::Tls(tls(hello)));
        assert_eq!(&buf[..], hello);

        // Already decided: returns at once without reading the silent peer.
        let mut buf = BytesMut::from(hello);
        let peeked = peek(&mut server, &mut buf, T).await?;
        assert_eq!(peeked.protocol_name(), "tls");
        assert_eq!(&buf[..], hello);

        // Leftover counts as "not silent" when the deadline passes.
        let mut buf = BytesMut::from(&hello[..3]);
        let err = peek(&mut server, &mut buf, T).await;
        assert!(matches!(err, Err(PeekError::Timeout(_, 3))), "{err:?}");
        drop(client);
        Ok(())
    }

    #[tokio::test]
    async fn peek_other_protocols_and_errors() -> TestResult {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut buf = BytesMut::new();
        assert_eq!(peek(&mut server, &mut buf, LONG).await?, Peeked::Http);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"SSH-2.0-x\r\n").await?;
        let mut buf = BytesMut::new();
        assert_eq!(peek(&mut server, &mut buf, LONG).await?, Peeked::Ssh);

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&[0x16, 3, 1, 0, 5, 2]).await?;
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, LONG).await;
        assert!(
            matches!(
                err,
                Err(PeekError::Detect(DetectError::Malformed(
                    "first handshake message is not a ClientHello"
                )))
            ),
            "{err:?}"
        );

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x42, 0x68])
            .await?;
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, LONG).await;
        assert!(
            matches!(err, Err(PeekError::Detect(DetectError::TooLarge))),
            "{err:?}"
        );
        assert_eq!(buf.len(), 9);
        Ok(())
    }

    #[tokio::test]
    async fn peek_never_buffers_past_max_peek() -> TestResult {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            client.write_all(b"GET /").await?;
            client.write_all(&[b'a'; 40_000]).await?;
            Ok::<_, std::io::Error>(client)
        });
        let mut buf = BytesMut::new();
        let err = peek(&mut server, &mut buf, LONG).await;
        assert!(
            matches!(err, Err(PeekError::Detect(DetectError::TooLarge))),
            "{err:?}"
        );
        assert_eq!(buf.len(), MAX_PEEK);
        // Leftover just under the bound: the read is capped at the room left,
        // not at whatever the buffer's spare capacity happens to be.
        let (mut client, mut server2) = tokio::io::duplex(64 * 1024);
        client.write_all(&[b'a'; 1000]).await?;
        let mut nearly = BytesMut::from(&buf[..MAX_PEEK - 3]);
        let err = peek(&mut server2, &mut nearly, LONG).await;
        assert!(
            matches!(err, Err(PeekError::Detect(DetectError::TooLarge))),
            "{err:?}"
        );
        assert_eq!(nearly.len(), MAX_PEEK);
        // Leftover already at the bound: no read at all.
        let mut full = BytesMut::from(&buf[..]);
        let err = peek(&mut server, &mut full, LONG).await;
        assert!(
            matches!(err, Err(PeekError::Detect(DetectError::TooLarge))),
            "{err:?}"
        );
        assert_eq!(full.len(), MAX_PEEK);
        drop(server);
        // The writer fails or finishes once the reader is gone; either is fine.
        let _ = writer.await?;
        Ok(())
    }
}
