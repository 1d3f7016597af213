//! Tests of the ClientHello parser and the peeking reader.

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
    extensions(bytes).into_iter().map(|(t, _)| t).collect()
}

/// The hello's extensions in order: (type, body).
fn extensions(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
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
        let len = be16(i + 2);
        out.push((be16(i) as u16, msg[i + 4..i + 4 + len].to_vec()));
        i += 4 + len;
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
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
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
        // supported_groups (10) offers X25519 only, not X25519MLKEM768
        // (0x11ec). Parsed, not searched for: the random and the key share
        // may hold those two bytes anywhere.
        let groups = extensions(&bytes)
            .into_iter()
            .find(|(t, _)| *t == 10)
            .map(|(_, body)| body)
            .ok_or("no supported_groups")?;
        assert_eq!(groups, [0, 2, 0, 0x1d], "supported_groups");
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
