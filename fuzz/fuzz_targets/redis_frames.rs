//! Arbitrary bytes as what Redis sends a subscribe connection (RESP2), parsed by the
//! connection's own parser, delivered in arbitrary pieces.
//!
//! Never panics and always ends; a declared length is never buffered up front (a bulk string
//! over 512 MiB is a protocol error from its header, and a message's payload over the size
//! limit is skipped as it arrives); what is read does not depend on where the socket's reads
//! end: the frames (and the protocol error that stops them, if any) are the same as when
//! everything arrives at once.
//!
//! # Input format
//!
//! A count byte `n`: `n % 16` little-endian `u16` offsets where reads end follow it, and the
//! size limit is `n / 16` bytes (0: Redis's own, 512 MiB); then the bytes on the wire.
#![no_main]

use alkdev_pubsub::redis::__fuzz_subscribe_frames as frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let limit = match usize::from(count / 16) {
        0 => usize::MAX,
        limit => limit,
    };
    let count = usize::from(count % 16).min(rest.len() / 2);
    let (offsets, wire) = rest.split_at(count * 2);
    let mut cuts: Vec<usize> = offsets
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])))
        .collect();
    cuts.sort_unstable();
    let whole = frames(wire, &[], limit);
    let pieces = frames(wire, &cuts, limit);
    assert_eq!(whole, pieces, "cut at {cuts:?}");
});
