//! A raw HTTP/2 frame client for tests that must send what a conforming
//! client never would (malformed headers, a bad preface, HTTP/1.1 on an `h2`
//! connection): the `h2` crate's client validates its input and cannot.
//! Frames (RFC 9113 section 4) are written by hand: a 9-byte header and a
//! payload. Header blocks are HPACK-coded with `loona-hpack`, whose encoder
//! writes what it is given, whitespace and all.
#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::{insecure_connector, tls_connect};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const CANCEL: u32 = 0x8;

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A frame's bytes: length, type, flags, stream id, payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HTTP/2 connection over TLS (ALPN as given), frame by frame.
pub struct Conn {
    pub io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Conn {
    /// TLS to `addr` for `sni`, offering `alpn`; nothing sent yet.
    pub async fn tls(addr: std::net::SocketAddr, sni: &str, alpn: &[&[u8]]) -> Conn {
        let (io, _) = tls_connect(addr, &insecure_connector(alpn), sni).await;
        Conn {
            io,
            buf: Vec::new(),
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
        }
    }

    /// The ALPN protocol the server chose.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.io.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write to portico");
        self.io.flush().await.expect("flush");
    }

    /// Client preface and an empty SETTINGS frame.
    pub async fn handshake(&mut self) {
        let mut b = PREFACE.to_vec();
        b.extend(frame(SETTINGS, 0, 0, &[]));
        self.send(&b).await;
    }

    /// A HEADERS frame (END_HEADERS) with `fields` in order, exactly as given.
    pub fn headers_frame(
        &mut self,
        stream: u32,
        fields: &[(&str, &str)],
        end_stream: bool,
    ) -> Vec<u8> {
        let block = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        frame(HEADERS, flags, stream, &block)
    }

    pub async fn send_headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) {
        let f = self.headers_frame(stream, fields, end_stream);
        self.send(&f).await;
    }

    /// The next frame, or `None` when the connection ended (EOF, reset, or
    /// nothing within `within`).
    pub async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Raw bytes the server sent until EOF (or `within`), after any frames
    /// already buffered.
    pub async fn read_rest(&mut self, within: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 16384];
        loop {
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until one matches `pred` (acknowledging SETTINGS on the way);
    /// panics with what came when the connection ends first.
    pub async fn until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Frame) -> bool,
    ) -> (Frame, Vec<Frame>) {
        let mut seen = Vec::new();
        loop {
            let Some(f) = self.next(within).await else {
                panic!("connection ended before the expected frame; frames: {seen:?}");
            };
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                self.send(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            if pred(&f) {
                return (f, seen);
            }
            seen.push(f);
        }
    }

    /// The response body of `stream` (its DATA frames) up to the one that
    /// ends the stream. `Err` holds the RST_STREAM when the stream is reset
    /// first, with the frames before it.
    pub async fn body(
        &mut self,
        stream: u32,
        within: Duration,
    ) -> Result<Vec<u8>, (Frame, Vec<Frame>)> {
        let mut body = Vec::new();
        let (f, seen) = self
            .until(within, |f| {
                if f.stream == stream && f.kind == DATA {
                    body.extend_from_slice(&f.payload);
                }
                f.stream == stream
                    && (f.kind == RST_STREAM || (f.kind == DATA && f.flags & END_STREAM != 0))
            })
            .await;
        if f.kind == DATA {
            Ok(body)
        } else {
            Err((f, seen))
        }
    }

    /// Decode a HEADERS frame's block (END_HEADERS, no padding/priority).
    pub fn decode(&mut self, f: &Frame) -> Vec<(String, String)> {
        assert_eq!(f.kind, HEADERS, "not a HEADERS frame: {f:?}");
        let mut block = f.payload.as_slice();
        if f.flags & 0x8 != 0 {
            let pad = block[0] as usize;
            block = &block[1..block.len() - pad];
        }
        if f.flags & 0x20 != 0 {
            block = &block[5..];
        }
        self.decoder
            .decode(block)
            .expect("HPACK block from portico")
            .into_iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect()
    }

    /// Read frames until the response HEADERS on `stream`; returns its status.
    pub async fn response_status(&mut self, stream: u32, within: Duration) -> (u16, Vec<Frame>) {
        let (f, seen) = self
            .until(within, |f| {
                (f.stream == stream && (f.kind == HEADERS || f.kind == RST_STREAM))
                    || f.kind == GOAWAY
            })
            .await;
        if f.kind != HEADERS {
            panic!(
                "stream {stream} got {f:?} instead of a response (error {:?}); before: {seen:?}",
                f.error_code()
            );
        }
        let fields = self.decode(&f);
        let status = fields
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no :status in {fields:?}"));
        (status, seen)
    }
}
