//! `SseCounter` (counts server-sent events in a relayed body) on arbitrary
//! bytes: the count must not depend on how the body was cut into frames,
//! and must match a direct reading of the event-stream rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::http::body::SseCounter;

/// Reference: split into lines at CRLF, LF or CR (the event-stream grammar),
/// count blank lines that end a block with at least one non-blank line.
fn reference(data: &[u8]) -> u64 {
    let mut events = 0;
    let mut pending = false; // a non-blank line since the last blank one
    let mut line_has_content = false;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' | b'\n' => {
                if data[i] == b'\r' && data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                if line_has_content {
                    pending = true;
                } else if pending {
                    events += 1;
                    pending = false;
                }
                line_has_content = false;
            }
            _ => line_has_content = true,
        }
        i += 1;
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let (cut_a, cut_b, body) = match data {
        [a, b, rest @ ..] => (*a as usize, *b as usize, rest),
        _ => return,
    };
    let mut whole = SseCounter::default();
    let want = whole.feed(body);

    assert_eq!(want, reference(body), "differs from the reference reading");

    let at = if body.is_empty() {
        0
    } else {
        (cut_a << 8 | cut_b) % (body.len() + 1)
    };
    let mut split = SseCounter::default();
    let got = split.feed(&body[..at]) + split.feed(&body[at..]);
    assert_eq!(got, want, "split at {at} of {}", body.len());
    assert_eq!(split, whole, "state after the split feed differs");

    let size = cut_a % 16 + 1;
    let mut chunks = SseCounter::default();
    let got: u64 = body.chunks(size).map(|c| chunks.feed(c)).sum();
    assert_eq!(got, want, "chunks of {size}");
});
