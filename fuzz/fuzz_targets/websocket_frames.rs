//! `FrameTracker` (counts WebSocket messages in a relayed byte stream) on
//! arbitrary bytes: the count must not depend on how reads cut the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico::http::websocket::FrameTracker;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the cut points; the rest is the stream.
    let (cut_a, cut_b, stream) = match data {
        [a, b, rest @ ..] => (*a as usize, *b as usize, rest),
        _ => return,
    };
    let mut whole = FrameTracker::default();
    let want = whole.feed(stream);
    assert_eq!(whole.messages, want);

    // One cut at a fuzzer-chosen point.
    let at = if stream.is_empty() {
        0
    } else {
        (cut_a << 8 | cut_b) % (stream.len() + 1)
    };
    let mut split = FrameTracker::default();
    let got = split.feed(&stream[..at]) + split.feed(&stream[at..]);
    assert_eq!(got, want, "split at {at} of {}", stream.len());
    assert_eq!(split.messages, want);

    // Reads of a fuzzer-chosen small size (1..=16 bytes), as a slow peer gives them.
    let size = cut_a % 16 + 1;
    let mut chunks = FrameTracker::default();
    let got: u64 = stream.chunks(size).map(|c| chunks.feed(c)).sum();
    assert_eq!(got, want, "chunks of {size}");
});
