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
    /// Version field of the first record header (0x0301..0x0304 are all
    /// accepted). Not used for routing: read by the tests and for debugging.
    pub record_version: u16,
    /// Total bytes of the records that carry the complete ClientHello
    /// (header included). Not used for routing: the tests and the fuzz
    /// target check it against the input.
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
mod tests;
