//! Arbitrary bytes as what Redis sends a subscribe connection (RESP2), parsed by the
//! connection's own parser, delivered in arbitrary pieces.
//!
//! Never panics and always ends; a declared length is never buffered up front (a bulk string
//! over 512 MiB is a protocol error from its header); what is read does not depend on where
//! the socket's reads end: the frames (and the protocol error that stops them, if any) are the
//! same as when everything arrives at once.
//!
//! # Input format
//!
//! A count byte `n` (`% 16`), then `n` little-endian `u16` offsets where reads end, then the
//! bytes on the wire.
#![no_main]

use alkdev_pubsub::redis::__fuzz_subscribe_frames as frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 16).min(rest.len() / 2);
    let (offsets, wire) = rest.split_at(count * 2);
    let mut cuts: Vec<usize> = offsets
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])))
        .collect();
    cuts.sort_unstable();
    let whole = frames(wire, &[]);
    let pieces = frames(wire, &cuts);
    assert_eq!(whole, pieces, "cut at {cuts:?}");
});
