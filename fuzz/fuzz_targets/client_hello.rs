//! `hello::detect` and `hello::parse_client_hello` on arbitrary bytes.
//!
//! Besides "never panics", this checks the property the peeking reader relies
//! on (documented on `detect`): the answer for a prefix is either
//! `Incomplete` or the answer for the whole input, so portico may decide as
//! soon as an answer is not `Incomplete`, however the bytes were cut by TCP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::hello::{detect, parse_client_hello, DetectError, Peeked, MAX_PEEK};

/// Prefix lengths to check: all of them for small inputs, else a spread
/// that still covers every record/handshake header boundary region.
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    let step = if len <= 2048 { 1 } else { len / 1024 };
    (0..len)
        .step_by(step)
        .chain((0..16).map(move |i| len.saturating_sub(i)))
}

fuzz_target!(|data: &[u8]| {
    // detect never reads past MAX_PEEK bytes; longer inputs only cost time.
    let data = &data[..data.len().min(MAX_PEEK + 64)];

    let full = detect(data);
    if let Ok(Peeked::Tls(hello)) = &full {
        assert!(
            hello.hello_len <= data.len(),
            "hello_len {} beyond the input ({} bytes)",
            hello.hello_len,
            data.len()
        );
        assert!(hello.hello_len <= MAX_PEEK, "hello_len beyond MAX_PEEK");
        // The records that carry the hello alone give the same answer.
        assert_eq!(
            detect(&data[..hello.hello_len]).as_ref(),
            full.as_ref(),
            "answer changes when the bytes after the hello are cut off"
        );
    }
    // Also when the whole input is `Incomplete`: then every prefix must be.
    for cut in cuts(data.len()) {
        let part = detect(&data[..cut]);
        if part != Err(DetectError::Incomplete) {
            assert_eq!(
                part,
                full,
                "prefix of {cut} of {} bytes decided differently",
                data.len()
            );
        }
    }

    // The hello parser directly (detect only calls it for 0x16 0x03 ...).
    let hello = parse_client_hello(data);
    for cut in cuts(data.len()) {
        let part = parse_client_hello(&data[..cut]);
        if part != Err(DetectError::Incomplete) {
            assert_eq!(
                part,
                hello,
                "parse_client_hello: prefix of {cut} of {} bytes decided differently",
                data.len()
            );
        }
    }
});
