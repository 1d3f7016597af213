//! PROXY protocol v1/v2: reading a header from a trusted peer in front of us,
//! and writing one to a backend so it sees the real client. Parsing and
//! building are the `ppp` crate's; this module adds the bounds and timeouts.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyVersion;

/// v1 headers are at most 107 bytes by the spec.
const V1_MAX: usize = 107;
/// The v2 signature, version and length take 16 bytes.
const V2_FIXED: usize = 16;
/// Largest inbound v2 header accepted: addresses (216 bytes for unix) plus
/// room for TLVs. A peer declaring more is refused before anything is
/// buffered, so a hostile length field cannot make us allocate 64 KiB.
pub const V2_MAX: usize = 1024;
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InboundError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed inside the PROXY header")]
    Eof,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY v2 header declares {0} bytes, more than the {V2_MAX} accepted")]
    TooLarge(usize),
    #[error("read: {0}")]
    Io(String),
}

impl InboundError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            InboundError::Timeout(_) => "timeout",
            InboundError::Eof => "eof",
            InboundError::Malformed(_) => "malformed",
            InboundError::TooLarge(_) => "too_large",
            InboundError::Io(_) => "io",
        }
    }
}

/// Addresses carried by an inbound header; `None` for `LOCAL`/`UNKNOWN`
/// (health checks from the peer itself), where the socket addresses stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// The addresses a connection is known by after its inbound PROXY header
/// (if any): what later stages log, route and pass on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The real client: from a trusted PROXY header, else the TCP peer.
    pub client: SocketAddr,
    /// The address the client connected to (PROXY destination when present).
    pub local: SocketAddr,
}

/// Outcome of parsing the bytes read so far.
enum Step {
    NeedMore,
    Done {
        len: usize,
        carried: Option<Carried>,
    },
}

fn parse(buf: &[u8]) -> Result<Step, InboundError> {
    // Decide the version from the first byte so that a v2 length field is
    // checked before buffering: ppp would otherwise wait for all of it.
    if buf.is_empty() {
        return Ok(Step::NeedMore);
    }
    let is_v2 = buf[0] == V2_SIG[0];
    if is_v2 {
        let n = buf.len().min(V2_SIG.len());
        if buf[..n] != V2_SIG[..n] {
            return Err(InboundError::Malformed("bad v2 signature".into()));
        }
        if buf.len() >= V2_FIXED {
            let declared = V2_FIXED + u16::from_be_bytes([buf[14], buf[15]]) as usize;
            if declared > V2_MAX {
                return Err(InboundError::TooLarge(declared));
            }
        }
    } else {
        // v1 is a text line: complete at its CRLF. ppp's partial-input answers
        // for v1 are not reliable at every prefix, so only hand it whole lines.
        let n = buf.len().min(6);
        if buf[..n] != b"PROXY "[..n] {
            return Err(InboundError::Malformed(
                "expected a PROXY header first".into(),
            ));
        }
        match buf.windows(2).position(|w| w == b"\r\n") {
            Some(end) if end + 2 <= V1_MAX => {
                let line = &buf[..end + 2];
                return match v1::Header::try_from(line) {
                    Ok(h) => Ok(Step::Done {
                        len: line.len(),
                        carried: v1_carried(h.addresses),
                    }),
                    Err(e) => Err(InboundError::Malformed(format!("v1: {e}"))),
                };
            }
            Some(_) => {
                return Err(InboundError::Malformed(
                    "v1 header longer than 107 bytes".into(),
                ))
            }
            None if buf.len() >= V1_MAX => {
                return Err(InboundError::Malformed(
                    "v1 header longer than 107 bytes".into(),
                ))
            }
            None => return Ok(Step::NeedMore),
        }
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(Step::NeedMore);
    }
    match result {
        HeaderResult::V1(Ok(h)) => Ok(Step::Done {
            len: h.header.len(),
            carried: v1_carried(h.addresses),
        }),
        HeaderResult::V2(Ok(h)) => {
            let len = h.len();
            let carried = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => Some(Carried {
                    source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                    destination: SocketAddr::new(
                        IpAddr::V4(a.destination_address),
                        a.destination_port,
                    ),
                }),
                (_, v2::Addresses::IPv6(a)) => Some(Carried {
                    source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                    destination: SocketAddr::new(
                        IpAddr::V6(a.destination_address),
                        a.destination_port,
                    ),
                }),
                _ => None,
            };
            Ok(Step::Done { len, carried })
        }
        HeaderResult::V1(Err(e)) => Err(InboundError::Malformed(format!("v1: {e}"))),
        HeaderResult::V2(Err(e)) => Err(InboundError::Malformed(format!("v2: {e}"))),
    }
}

fn v1_carried(a: v1::Addresses) -> Option<Carried> {
    match a {
        v1::Addresses::Tcp4(a) => Some(Carried {
            source: SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        }),
        v1::Addresses::Tcp6(a) => Some(Carried {
            source: SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            destination: SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        }),
        v1::Addresses::Unknown => None,
    }
}

/// Read one PROXY header from `io`. Bytes after the header stay in `buf` for
/// the next stage (they are the client's first bytes).
pub async fn read_inbound<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Option<Carried>, InboundError> {
    let work = async {
        loop {
            match parse(buf)? {
                Step::Done { len, carried } => {
                    buf.advance(len);
                    return Ok(carried);
                }
                Step::NeedMore => {
                    // Read only what could still be header, never a whole buffer's worth.
                    let want = if buf.first() == Some(&V2_SIG[0]) {
                        V2_MAX
                    } else {
                        V1_MAX
                    };
                    buf.reserve(want.saturating_sub(buf.len()).max(1));
                    let n = io
                        .read_buf(buf)
                        .await
                        .map_err(|e| InboundError::Io(e.to_string()))?;
                    if n == 0 {
                        return Err(InboundError::Eof);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(InboundError::Timeout(timeout)),
    }
}

/// What a backend should learn about the client.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub sni: Option<&'a str>,
    /// The ALPN protocol the client is most likely to get (its first offered).
    pub alpn: Option<&'a [u8]>,
}

/// Make both addresses the same family, as both header versions require:
/// a dual-stack socket reports IPv4 clients as `::ffff:a.b.c.d`.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |s: SocketAddr| SocketAddr::new(crate::config::canonical_ip(s.ip()), s.port());
    let (a, b) = (canon(a), canon(b));
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (to_v6(a), b),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (a, to_v6(b)),
        _ => (a, b),
    }
}

fn to_v6(s: SocketAddr) -> SocketAddr {
    match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    }
}

/// Build the header to send first to a backend (empty for `none`).
pub fn outbound_header(version: ProxyVersion, info: &Outbound<'_>) -> Vec<u8> {
    let (src, dst) = same_family(info.source, info.destination);
    match version {
        ProxyVersion::None => Vec::new(),
        ProxyVersion::V1 => v1::Addresses::from((src, dst)).to_string().into_bytes(),
        ProxyVersion::V2 => {
            let mut builder = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (src, dst),
            );
            // TLV writes into a Vec cannot fail; the values are bounded
            // (SNI <= 255, ALPN <= 255) well below the u16 length.
            if let Some(alpn) = info.alpn {
                builder = match builder.write_tlv(v2::Type::ALPN, alpn) {
                    Ok(b) => b,
                    Err(_) => return Vec::new(),
                };
            }
            if let Some(sni) = info.sni {
                builder = match builder.write_tlv(v2::Type::Authority, sni.as_bytes()) {
                    Ok(b) => b,
                    Err(_) => return Vec::new(),
                };
            }
            builder.build().unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_roundtrip_ipv4_and_mapped() {
        let out = Outbound {
            source: sa("[::ffff:192.0.2.7]:5555"),
            destination: sa("[::ffff:127.0.0.1]:443"),
            sni: None,
            alpn: None,
        };
        let h = outbound_header(ProxyVersion::V1, &out);
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n");
        match parse(&h).unwrap() {
            Step::Done { len, carried } => {
                assert_eq!(len, h.len());
                assert_eq!(carried.unwrap().source, sa("192.0.2.7:5555"));
            }
            Step::NeedMore => panic!("complete header reported incomplete"),
        }
    }

    #[test]
    fn v1_mixed_families_become_v6() {
        let out = Outbound {
            source: sa("[2001:db8::1]:5555"),
            destination: sa("127.0.0.1:443"),
            sni: None,
            alpn: None,
        };
        let h = String::from_utf8(outbound_header(ProxyVersion::V1, &out)).unwrap();
        assert_eq!(h, "PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 5555 443\r\n");
    }

    #[test]
    fn v2_carries_tlvs() {
        let out = Outbound {
            source: sa("10.1.2.3:4000"),
            destination: sa("10.9.9.9:443"),
            sni: Some("tunnel.example.com"),
            alpn: Some(b"h2"),
        };
        let h = outbound_header(ProxyVersion::V2, &out);
        let parsed = v2::Header::try_from(&h[..]).unwrap();
        let tlvs: Vec<_> = parsed.tlvs().map(|t| t.unwrap()).collect();
        assert!(tlvs
            .iter()
            .any(|t| t.kind == 0x02 && &t.value[..] == b"tunnel.example.com"));
        assert!(tlvs.iter().any(|t| t.kind == 0x01 && &t.value[..] == b"h2"));
        match parse(&h).unwrap() {
            Step::Done { len, carried } => {
                assert_eq!(len, h.len());
                assert_eq!(carried.unwrap().destination, sa("10.9.9.9:443"));
            }
            Step::NeedMore => panic!("complete header reported incomplete"),
        }
    }

    #[test]
    fn every_prefix_needs_more() {
        let out = Outbound {
            source: sa("10.1.2.3:4000"),
            destination: sa("10.9.9.9:443"),
            sni: Some("a.example"),
            alpn: Some(b"http/1.1"),
        };
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let h = outbound_header(v, &out);
            for n in 0..h.len() {
                assert!(
                    matches!(parse(&h[..n]), Ok(Step::NeedMore)),
                    "{v:?} prefix {n}"
                );
            }
        }
    }

    #[test]
    fn huge_v2_length_refused_from_16_bytes() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(
            parse(&h).err(),
            Some(InboundError::TooLarge(V2_FIXED + 0xffff))
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(InboundError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 nope\r\n"),
            Err(InboundError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"\r\n\r\n\0\r\nQUIX\n"),
            Err(InboundError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn leftover_bytes_stay_in_buffer() {
        let (mut a, mut b) = tokio::io::duplex(256);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1111 443\r\n\x16\x03\x01")
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let c = read_inbound(&mut b, &mut buf, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.source, sa("192.0.2.1:1111"));
        assert_eq!(&buf[..], b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn truncated_header_times_out() {
        let (mut a, mut b) = tokio::io::duplex(256);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        let mut buf = BytesMut::new();
        let r = read_inbound(&mut b, &mut buf, Duration::from_millis(100)).await;
        assert_eq!(r, Err(InboundError::Timeout(Duration::from_millis(100))));
    }
}
