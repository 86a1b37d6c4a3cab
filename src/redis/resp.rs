//! The RESP2 frames a subscribe connection exchanges with Redis: the commands it sends
//! (`SUBSCRIBE`, `UNSUBSCRIBE`, `PING`, `AUTH`) and the replies and messages it reads.
//!
//! A connection in subscribe mode is sent few kinds of frames, so they are parsed here by hand,
//! in one pass over the read buffer, and a message's channel and payload are slices of that
//! buffer (no copy, no allocation per message).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// The longest bulk string Redis sends: its own default `proto-max-bulk-len` (512 MiB). A
/// longer length is a protocol error, found before anything is buffered for it; the reader's
/// limit ([`Reader::new`]) is at most this.
pub(crate) const MAX_BULK: usize = 512 * 1024 * 1024;

/// The longest bulk string other than a message's payload (a channel, a pattern, the kind of
/// a frame) always accepted, whatever the reader's limit: a channel of up to this many bytes
/// is never refused for a small `max_message_size`.
pub(crate) const MIN_OTHER_LIMIT: usize = 64 * 1024;

/// The longest line accepted (a simple string, an error, a length): a peer that sends more
/// without a line end is not speaking RESP.
const MAX_LINE: usize = 64 * 1024;

/// The most elements in an array a subscribe connection reads (a `pmessage` has 4).
const MAX_ELEMENTS: usize = 8;

/// The most elements in an array inside a frame (one level deep only).
const MAX_NESTED: usize = 1024 * 1024;

/// What a subscribe connection reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A message published on a subscribed channel (`message`, or `pmessage` for a pattern).
    Message { channel: Bytes, payload: Bytes },
    /// `SUBSCRIBE` confirmed for one channel.
    Subscribed(Bytes),
    /// `UNSUBSCRIBE` confirmed for one channel.
    Unsubscribed(Bytes),
    /// The answer to a `PING` (an array in subscribe mode, `+PONG` outside it).
    Pong,
    /// A simple string other than `PONG` (`+OK`, the answer to `AUTH`).
    Simple(Bytes),
    /// An error reply: `-CODE message`, without the `-`.
    Error(Bytes),
    /// A message whose payload, `len` bytes, is over the reader's limit: it is skipped as it
    /// arrives (never buffered), and the frames after it are read as usual.
    Oversized { channel: Bytes, len: usize },
    /// Something well-formed that a subscribe connection is not sent; described for a message.
    Unexpected(String),
}

/// A peer that does not speak RESP, or sent a frame over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError(pub(crate) String);

/// One element of a frame, as a range of the frame's bytes where it has any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Element {
    Bulk(Range<usize>),
    /// An array inside the frame, kept as its raw bytes (a message whose payload is an array,
    /// as Redis sends on `__redis__:invalidate` to a RESP2 connection).
    Array(Range<usize>),
    #[default]
    Null,
    Integer(i64),
    Simple(Range<usize>),
    Error(Range<usize>),
    /// A bulk string of this many bytes, over the limit; what follows its header is its data.
    Over(usize),
}

/// The element kinds a frame may have at its top.
enum Top {
    Element(Element),
    Array(usize, [Element; MAX_ELEMENTS]),
    /// A message whose payload (its last element, of this many bytes) is over the limit: the
    /// frame's length is up to the payload's data.
    Oversized(usize, [Element; MAX_ELEMENTS], usize),
}

/// Reads the frames a subscribe connection is sent, out of its read buffer, with a limit on
/// what it buffers: a message's payload over the limit is skipped as it arrives (and reported,
/// [`Frame::Oversized`]), and a nested array that grows past it is a protocol error; any other
/// bulk string (a channel) over the limit and over [`MIN_OTHER_LIMIT`] is a protocol error, and
/// so is a frame whose elements other than a payload take more than two such channels (a
/// `pmessage` has a pattern and a channel). A frame thus buffers at most the limit and two
/// channels' worth.
pub(crate) struct Reader {
    limit: usize,
    /// Bytes of an oversized payload still to discard, its CRLF included.
    skipping: usize,
    /// How far the scans of the incomplete frame's nested arrays got (at most one per
    /// element of the frame).
    nested: Vec<Nested>,
    /// How far the scan of the incomplete frame's top-level array got.
    top: Option<Resume>,
}

/// How far the scan of a frame's top-level array got before the frame ran out: its element
/// count, the elements read, and where the next one starts. Without it, each read of a frame
/// whose last element is still coming would read its first ones again: up to seven lines of
/// 64 KiB each, for every piece of a payload of megabytes sent in small pieces.
#[derive(Debug)]
struct Resume {
    count: usize,
    done: usize,
    at: usize,
    elements: [Element; MAX_ELEMENTS],
}

/// How far the scan of a nested array got before the frame ran out (all of it, when a later
/// element is what is missing), to go on from there once more has been read: a frame's bytes
/// stay where they are until it is complete, and without this a nested array of many small
/// elements sent in many small reads would be scanned again from its start at each
/// (quadratic in its length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Nested {
    /// Where the nested array starts in the frame (its `*` byte).
    start: usize,
    /// How many of its elements were read.
    done: usize,
    /// Where the next of them starts.
    at: usize,
}

impl Reader {
    /// A reader that buffers no bulk string over `limit` bytes (at most [`MAX_BULK`]).
    pub(crate) fn new(limit: usize) -> Self {
        Reader {
            limit: limit.min(MAX_BULK),
            skipping: 0,
            nested: Vec::new(),
            top: None,
        }
    }

    /// Parses the frame at the start of `buffer` and removes it: `Ok(None)` while it is
    /// incomplete (call again once more has been read). What an oversized payload sends is
    /// removed as it comes.
    pub(crate) fn parse(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        if self.skipping > 0 {
            self.skip(buffer)?;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        let scanned = scan(buffer, self.limit, &mut self.nested, &mut self.top);
        let Some((len, top)) = scanned? else {
            return Ok(None);
        };
        self.nested.clear();
        self.top = None;
        if let Top::Oversized(_, _, payload) = top {
            self.skipping = payload + 2;
        }
        let frame = buffer.split_to(len).freeze();
        Ok(Some(classify(&frame, top)))
    }

    /// Discards what `buffer` holds of the oversized payload being skipped; its last two
    /// bytes must be CRLF.
    fn skip(&mut self, buffer: &mut BytesMut) -> Result<(), ProtocolError> {
        let n = self.skipping.min(buffer.len());
        for (i, &byte) in buffer[..n]
            .iter()
            .enumerate()
            .skip(self.skipping.saturating_sub(2))
        {
            // `skipping - i` is 2 at the CR, 1 at the LF.
            if byte != b"\r\n"[2 - (self.skipping - i)] {
                return Err(ProtocolError(
                    "a skipped bulk string not followed by CRLF".into(),
                ));
            }
        }
        let _ = buffer.split_to(n);
        self.skipping -= n;
        Ok(())
    }
}

/// Finds the frame at the start of `bytes`: its length and its elements. No bulk string over
/// `limit` is waited for.
/// `nested` is how far earlier scans of the same bytes got in its nested arrays, and `top` in
/// its top-level array; this one updates them.
fn scan(
    bytes: &[u8],
    limit: usize,
    nested: &mut Vec<Nested>,
    top: &mut Option<Resume>,
) -> Result<Option<(usize, Top)>, ProtocolError> {
    let mut at = 0;
    let Some(&kind) = bytes.first() else {
        return Ok(None);
    };
    // Anything but a message's payload may be longer than a small limit (a channel), and all
    // of it together as long as two of them and their headers.
    let other = limit.max(MIN_OTHER_LIMIT);
    let others = 2 * other + 1024;
    if kind == b'*' || kind == b'>' {
        let (count, first, mut elements) = match top.take() {
            Some(resume) => {
                at = resume.at;
                (resume.count, resume.done, resume.elements)
            }
            None => {
                let Some(line) = line(bytes, &mut at)? else {
                    return Ok(None);
                };
                let count = length(
                    &bytes[line],
                    MAX_ELEMENTS,
                    "an array of {} elements, where a subscribe connection reads at most {}",
                )?
                .ok_or_else(|| {
                    ProtocolError("a null array, where a subscribe connection reads a frame".into())
                })?;
                (count, 0, Default::default())
            }
        };
        for i in first..count {
            // The payload is the last element of a `message` or `pmessage` (whose first
            // element, its kind, is read by then).
            let payload = i + 1 == count && is_message(bytes, &elements[0], count);
            let limit = if payload {
                limit
            } else {
                other.min(others.saturating_sub(at))
            };
            let start = at;
            match element(bytes, &mut at, Some(&mut *nested), limit)? {
                // Skipped as it arrives.
                Some(Element::Over(len)) if payload => {
                    return Ok(Some((at, Top::Oversized(count, elements, len))));
                }
                Some(Element::Over(len)) => return Err(over_the_limit(len, limit)),
                Some(element) => elements[i] = element,
                None => {
                    *top = Some(Resume {
                        count,
                        done: i,
                        at: start,
                        elements,
                    });
                    return Ok(None);
                }
            }
        }
        return Ok(Some((at, Top::Array(count, elements))));
    }
    match element(bytes, &mut at, None, other)? {
        Some(Element::Over(len)) => Err(over_the_limit(len, other)),
        element => Ok(element.map(|element| (at, Top::Element(element)))),
    }
}

/// Whether a frame of `count` elements whose first is `first` is a message (`message`, or
/// `pmessage` for a pattern), whose last element is its payload.
fn is_message(bytes: &[u8], first: &Element, count: usize) -> bool {
    let Element::Bulk(kind) = first else {
        return false;
    };
    matches!(
        (&bytes[kind.clone()], count),
        (b"message", 3) | (b"pmessage", 4)
    )
}

fn over_the_limit(len: usize, limit: usize) -> ProtocolError {
    ProtocolError(format!(
        "a bulk string of {len} bytes, over the limit of {limit}, and not a message's payload"
    ))
}

/// The element at `*at`, which moves past it; `None` if it is incomplete. An array is an
/// element only when `nested` is given (one level deep): how far earlier scans got in the
/// frame's nested arrays, which this one updates. A bulk string over `limit` is [`Element::Over`], and `*at`
/// is where its data starts.
fn element(
    bytes: &[u8],
    at: &mut usize,
    nested: Option<&mut Vec<Nested>>,
    limit: usize,
) -> Result<Option<Element>, ProtocolError> {
    #[cfg(test)]
    tests::ELEMENTS_READ.with(|read| read.set(read.get() + 1));
    let Some(&kind) = bytes.get(*at) else {
        return Ok(None);
    };
    let start = *at;
    let Some(line) = line(bytes, at)? else {
        return Ok(None);
    };
    Ok(Some(match kind {
        b'$' => {
            let Some(len) = length(
                &bytes[line],
                MAX_BULK,
                "a bulk string of {} bytes (at most {} are accepted)",
            )?
            else {
                return Ok(Some(Element::Null));
            };
            if len > limit {
                return Ok(Some(Element::Over(len)));
            }
            let data = *at..*at + len;
            if bytes.len() < data.end + 2 {
                *at = start;
                return Ok(None);
            }
            if &bytes[data.end..data.end + 2] != b"\r\n" {
                return Err(ProtocolError(format!(
                    "a bulk string of {len} bytes not followed by CRLF"
                )));
            }
            *at = data.end + 2;
            Element::Bulk(data)
        }
        b'*' if nested.is_some() => {
            let resume = nested.expect("checked by the guard");
            let Some(count) = length(
                &bytes[line],
                MAX_NESTED,
                "a nested array of {} elements (at most {} are accepted)",
            )?
            else {
                return Ok(Some(Element::Null));
            };
            let mut done = 0;
            if let Some(earlier) = resume.iter().find(|earlier| earlier.start == start) {
                done = earlier.done;
                *at = earlier.at;
            }
            // How far this scan got, for the next one if the frame is still incomplete.
            let mut got_to = |done: usize, at: usize| match resume
                .iter_mut()
                .find(|earlier| earlier.start == start)
            {
                Some(earlier) => *earlier = Nested { start, done, at },
                None => resume.push(Nested { start, done, at }),
            };
            while done < count {
                let next = *at;
                match element(bytes, at, None, limit)? {
                    None => {
                        got_to(done, next);
                        *at = start;
                        return Ok(None);
                    }
                    Some(Element::Over(len)) => return Err(over_the_limit(len, limit)),
                    Some(_) if *at - start > limit => {
                        return Err(ProtocolError(format!(
                            "a nested array of more than {limit} bytes (max_message_size)"
                        )))
                    }
                    Some(_) => {}
                }
                done += 1;
            }
            // Complete: a scan that stops at a later element of the frame starts past it.
            got_to(count, *at);
            Element::Array(start..*at)
        }
        b':' => Element::Integer(integer(&bytes[line])?),
        b'+' => Element::Simple(line),
        b'-' => Element::Error(line),
        b'_' => Element::Null,
        other => {
            return Err(ProtocolError(format!(
                "a frame starting with {:?}, which is not RESP2",
                char::from(other)
            )))
        }
    }))
}

/// The line at `*at`, after its type byte and without its CRLF; `*at` moves past the CRLF.
/// `None` if the line is incomplete.
fn line(bytes: &[u8], at: &mut usize) -> Result<Option<Range<usize>>, ProtocolError> {
    let from = *at + 1;
    let window = &bytes[from.min(bytes.len())..bytes.len().min(from + MAX_LINE + 2)];
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => {
            *at = from + end + 2;
            Ok(Some(from..from + end))
        }
        None if window.len() >= MAX_LINE + 2 => Err(ProtocolError(format!(
            "a line of more than {MAX_LINE} bytes"
        ))),
        None => Ok(None),
    }
}

/// A length (of a bulk string or an array): `None` for `-1` (null), an error past `max` or
/// below -1, described by `over` (whose two `{}` are the length and `max`).
fn length(digits: &[u8], max: usize, over: &str) -> Result<Option<usize>, ProtocolError> {
    let len = integer(digits)?;
    if len == -1 {
        return Ok(None);
    }
    match usize::try_from(len) {
        Ok(len) if len <= max => Ok(Some(len)),
        _ => Err(ProtocolError(
            over.replacen("{}", &len.to_string(), 1)
                .replacen("{}", &max.to_string(), 1),
        )),
    }
}

fn integer(digits: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            ProtocolError(format!(
                "{:?} where an integer was expected",
                String::from_utf8_lossy(&digits[..digits.len().min(32)])
            ))
        })
}

/// What a complete frame is.
fn classify(frame: &Bytes, top: Top) -> Frame {
    let (count, elements) = match top {
        Top::Element(Element::Simple(line)) => {
            return if &frame[line.clone()] == b"PONG" {
                Frame::Pong
            } else {
                Frame::Simple(frame.slice(line))
            };
        }
        Top::Element(Element::Error(line)) => return Frame::Error(frame.slice(line)),
        Top::Element(other) => {
            return Frame::Unexpected(format!("a lone {}", describe(frame, &other)));
        }
        Top::Array(count, elements) => (count, elements),
        Top::Oversized(count, elements, len) => {
            let channel = match &elements[count - 2] {
                Element::Bulk(range) => frame.slice(range.clone()),
                other => {
                    return Frame::Unexpected(format!(
                        "a message of {len} bytes on the channel {}",
                        describe(frame, other)
                    ))
                }
            };
            return Frame::Oversized { channel, len };
        }
    };
    let bulk = |element: &Element| match element {
        Element::Bulk(range) => Some(frame.slice(range.clone())),
        _ => None,
    };
    // A payload may also be an array (RESP2 client-side-caching invalidations: the keys) or
    // null (the invalidation of everything), delivered as their raw bytes, or empty.
    let payload = |element: &Element| match element {
        Element::Bulk(range) | Element::Array(range) => Some(frame.slice(range.clone())),
        Element::Null => Some(Bytes::new()),
        _ => None,
    };
    let kind = elements.first().and_then(|e| match e {
        Element::Bulk(range) => Some(&frame[range.clone()]),
        _ => None,
    });
    let message = match (kind, count) {
        (Some(b"message"), 3) => bulk(&elements[1]).zip(payload(&elements[2])),
        (Some(b"pmessage"), 4) => bulk(&elements[2]).zip(payload(&elements[3])),
        // A null channel (the answer to an `UNSUBSCRIBE` of nothing, never sent here) is
        // unexpected: described below.
        (Some(b"subscribe"), 3) => match bulk(&elements[1]) {
            Some(channel) => return Frame::Subscribed(channel),
            None => None,
        },
        (Some(b"unsubscribe"), 3) => match bulk(&elements[1]) {
            Some(channel) => return Frame::Unsubscribed(channel),
            None => None,
        },
        (Some(b"pong"), 2) => return Frame::Pong,
        _ => None,
    };
    match message {
        Some((channel, payload)) => Frame::Message { channel, payload },
        None => Frame::Unexpected(format!(
            "an array of {count}: [{}]",
            elements[..count]
                .iter()
                .map(|element| describe(frame, element))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn describe(frame: &Bytes, element: &Element) -> String {
    let text = |range: &Range<usize>| {
        let bytes = &frame[range.clone()];
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into_owned();
        if bytes.len() > 32 {
            format!("{head:?}…")
        } else {
            format!("{head:?}")
        }
    };
    match element {
        Element::Bulk(range) => text(range),
        Element::Array(range) => format!("an array {}", text(range)),
        Element::Null => "null".to_owned(),
        Element::Integer(n) => n.to_string(),
        Element::Simple(range) => format!("+{}", text(range)),
        Element::Error(range) => format!("-{}", text(range)),
        Element::Over(len) => format!("a bulk string of {len} bytes"),
    }
}

/// Appends a command (an array of bulk strings) to `out`.
pub(crate) fn command(out: &mut BytesMut, args: &[&[u8]]) {
    out.put_u8(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.put_u8(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses `wire` as a connection with a `limit` ([`Reader::new`]) reads it, delivered in pieces
/// that end at `cuts` (ascending offsets; the rest comes last): what it reads, in order, as
/// debug text, up to the end or the first protocol error (then that error, last). For the
/// tests and the fuzz target: the frames must not depend on where the reads end.
#[cfg(any(test, fuzzing))]
pub(crate) fn parse_in_pieces(wire: &[u8], cuts: &[usize], limit: usize) -> Vec<String> {
    let mut reader = Reader::new(limit);
    let mut read = Vec::new();
    let mut buffer = BytesMut::new();
    let mut from = 0;
    for end in cuts.iter().copied().chain([wire.len()]) {
        let end = end.clamp(from, wire.len());
        buffer.extend_from_slice(&wire[from..end]);
        from = end;
        loop {
            match reader.parse(&mut buffer) {
                Ok(Some(frame)) => read.push(format!("{frame:?}")),
                Ok(None) => break,
                Err(error) => {
                    read.push(format!("{error:?}"));
                    return read;
                }
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Elements [`element`] has read on this thread, the same one again counting again.
        pub(super) static ELEMENTS_READ: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Nested arrays of many small elements sent in many small reads are scanned from where
    /// the last read left them, not from their start at each: the elements read stay about
    /// the arrays' length, not its square (in 7-byte reads of a message whose payload is an
    /// array of 10,000 elements, about 25,000 against 29 million before). Also for a frame of
    /// two such arrays, the first complete while the second is not.
    #[test]
    fn nested_arrays_read_in_small_pieces_are_scanned_once() {
        let nested = |elements: usize| {
            let mut wire = format!("*{elements}\r\n").into_bytes();
            for n in 0..elements {
                wire.extend_from_slice(format!(":{}\r\n", n % 10).as_bytes());
            }
            wire
        };
        let mut message = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n".to_vec();
        message.extend_from_slice(&nested(10_000));
        let mut two = b"*2\r\n".to_vec();
        two.extend_from_slice(&nested(5_000));
        two.extend_from_slice(&nested(5_000));
        for (wire, kind, elements) in [(message, "Message", 10_000), (two, "Unexpected", 10_000)] {
            let cuts: Vec<usize> = (7..wire.len()).step_by(7).collect();
            ELEMENTS_READ.with(|read| read.set(0));
            let read = parse_in_pieces(&wire, &cuts, MAX_BULK);
            let scanned = ELEMENTS_READ.with(|read| read.get());
            assert_eq!(read.len(), 1, "{:?}", &read[0][..200.min(read[0].len())]);
            assert!(read[0].starts_with(kind), "{:?}", &read[0][..100]);
            assert_eq!(read, parse_in_pieces(&wire, &[], MAX_BULK));
            let reads = cuts.len() + 1;
            assert!(
                scanned <= elements + 4 * reads,
                "{kind}: {scanned} elements read for nested arrays of {elements} in {reads} reads"
            );
        }
    }

    /// A frame whose last element is still coming is not read again from its start at each
    /// read: its first elements (long lines here) are read once, not once per read.
    #[test]
    fn a_frames_first_elements_are_read_once_while_its_last_one_comes() {
        let mut wire = b"*3\r\n".to_vec();
        for _ in 0..2 {
            wire.extend_from_slice(format!("+{}\r\n", "x".repeat(60_000)).as_bytes());
        }
        wire.extend_from_slice(format!("${}\r\n{}\r\n", 100_000, "y".repeat(100_000)).as_bytes());
        let cuts: Vec<usize> = (1_000..wire.len()).step_by(1_000).collect();
        ELEMENTS_READ.with(|read| read.set(0));
        let read = parse_in_pieces(&wire, &cuts, MAX_BULK);
        let scanned = ELEMENTS_READ.with(|read| read.get());
        assert_eq!(read, parse_in_pieces(&wire, &[], MAX_BULK));
        let reads = cuts.len() + 1;
        assert!(
            scanned <= 3 + reads,
            "{scanned} elements read for a frame of 3 in {reads} reads"
        );
    }

    /// One frame, read with Redis's own limit.
    fn parse(buffer: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        Reader::new(MAX_BULK).parse(buffer)
    }

    fn parse_all(input: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
        let mut buffer = BytesMut::from(input);
        let mut frames = Vec::new();
        while let Some(frame) = parse(&mut buffer)? {
            frames.push(frame);
        }
        assert!(buffer.is_empty(), "left unparsed: {buffer:?}");
        Ok(frames)
    }

    fn message(channel: &'static str, payload: &'static str) -> Frame {
        Frame::Message {
            channel: Bytes::from_static(channel.as_bytes()),
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    const STREAM: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nch:1\r\n:1\r\n\
        *3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n$10\r\n{\"a\":\"\r\n\"}\r\n\
        *4\r\n$8\r\npmessage\r\n$3\r\nch*\r\n$4\r\nch:2\r\n$0\r\n\r\n\
        *2\r\n$4\r\npong\r\n$0\r\n\r\n+PONG\r\n+OK\r\n\
        -NOPERM no permissions to access a channel\r\n\
        *3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n\
        *3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n\
        *3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*-1\r\n";

    fn stream_frames() -> Vec<Frame> {
        vec![
            Frame::Subscribed(Bytes::from_static(b"ch:1")),
            message("ch:1", "{\"a\":\"\r\n\"}"),
            message("ch:2", ""),
            Frame::Pong,
            Frame::Pong,
            Frame::Simple(Bytes::from_static(b"OK")),
            Frame::Error(Bytes::from_static(
                b"NOPERM no permissions to access a channel",
            )),
            Frame::Unexpected("an array of 3: [\"unsubscribe\", null, 0]".into()),
            message("__redis__:invalidate", "*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            message("__redis__:invalidate", ""),
        ]
    }

    #[test]
    fn every_frame_of_a_subscribe_connection_is_read() {
        assert_eq!(parse_all(STREAM).unwrap(), stream_frames());
    }

    #[test]
    fn a_stream_read_in_pieces_gives_the_same_frames_at_every_cut() {
        // Every split point, including inside lengths, CRLFs and payloads.
        for cut in 0..=STREAM.len() {
            let mut buffer = BytesMut::from(&STREAM[..cut]);
            let mut frames = Vec::new();
            while let Some(frame) = parse(&mut buffer).unwrap() {
                frames.push(frame);
            }
            buffer.extend_from_slice(&STREAM[cut..]);
            while let Some(frame) = parse(&mut buffer).unwrap() {
                frames.push(frame);
            }
            assert!(buffer.is_empty(), "cut at {cut}");
            assert_eq!(frames, stream_frames(), "cut at {cut}");
        }
    }

    #[test]
    fn a_payload_is_a_slice_of_the_read_buffer() {
        let mut buffer = BytesMut::from(&b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nhello\r\n"[..]);
        let start = buffer.as_ptr() as usize;
        let Some(Frame::Message { payload, .. }) = parse(&mut buffer).unwrap() else {
            panic!("a message");
        };
        assert_eq!(payload, "hello");
        assert_eq!(payload.as_ptr() as usize, start + 28, "not copied");
    }

    #[test]
    fn frames_that_are_not_pub_sub_are_described() {
        let frames =
            parse_all(b":5\r\n*2\r\n$3\r\nfoo\r\n:7\r\n*3\r\n$7\r\nmessage\r\n:1\r\n$1\r\nx\r\n")
                .unwrap();
        assert_eq!(
            frames,
            vec![
                Frame::Unexpected("a lone 5".into()),
                Frame::Unexpected("an array of 2: [\"foo\", 7]".into()),
                Frame::Unexpected("an array of 3: [\"message\", 1, \"x\"]".into()),
            ]
        );
    }

    #[test]
    fn what_is_not_resp_or_over_a_limit_is_a_protocol_error() {
        let cases: [(&[u8], &str); 8] = [
            (b"HTTP/1.1 400\r\n", "not RESP2"),
            (b"*3\r\n$7\r\nmessage\r\n*1\r\n*1\r\n", "not RESP2"),
            (b"*x\r\n", "integer was expected"),
            (b"*9\r\n", "an array of 9 elements"),
            (b"*-1\r\n", "a null array"),
            (b"*-2\r\n", "an array of -2 elements"),
            (b"$536870913\r\n", "a bulk string of 536870913 bytes"),
            (b"$3\r\nabcd\r\n", "not followed by CRLF"),
        ];
        for (input, expected) in cases {
            let error = parse(&mut BytesMut::from(input)).unwrap_err();
            assert!(error.0.contains(expected), "{input:?}: {}", error.0);
        }
        let long_line = [&b"+"[..], &vec![b'a'; MAX_LINE + 2]].concat();
        let error = parse(&mut BytesMut::from(&long_line[..])).unwrap_err();
        assert!(error.0.contains("a line of more than"), "{}", error.0);
    }

    #[test]
    fn a_bulk_string_is_waited_for_not_buffered_up_front() {
        // A large declared length: incomplete, nothing allocated for it here.
        let mut buffer = BytesMut::from(&b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$100000000\r\nab"[..]);
        assert_eq!(parse(&mut buffer).unwrap(), None);
        assert_eq!(buffer.len(), 38, "left as it was");
    }

    #[test]
    fn a_payload_over_the_limit_is_skipped_as_it_arrives() {
        let mut wire = BytesMut::new();
        command(&mut wire, &[b"message", b"ch:1", &[b'x'; 1000]]);
        command(&mut wire, &[b"pmessage", b"ch:*", b"ch:2", &[b'y'; 101]]);
        command(&mut wire, &[b"message", b"ch:1", &[b'z'; 100]]);
        let mut reader = Reader::new(100);
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        for piece in wire.chunks(7) {
            buffer.extend_from_slice(piece);
            while let Some(frame) = reader.parse(&mut buffer).unwrap() {
                frames.push(frame);
            }
            // Nothing of a skipped payload is kept; a frame within the limit (the third, 134
            // bytes) is buffered whole.
            assert!(buffer.len() < 150, "{} bytes buffered", buffer.len());
        }
        assert!(buffer.is_empty());
        assert_eq!(
            frames,
            [
                Frame::Oversized {
                    channel: Bytes::from_static(b"ch:1"),
                    len: 1000
                },
                Frame::Oversized {
                    channel: Bytes::from_static(b"ch:2"),
                    len: 101
                },
                Frame::Message {
                    channel: Bytes::from_static(b"ch:1"),
                    payload: Bytes::from(vec![b'z'; 100])
                },
            ]
        );
    }

    #[test]
    fn over_the_limit_elsewhere_than_a_payload_is_a_protocol_error() {
        let long = vec![b'c'; MIN_OTHER_LIMIT + 1];
        let mut cases = Vec::new();
        for args in [
            &[&b"message"[..], &long, b"p"][..],
            &[b"pmessage", &long, b"ch", b"p"],
            &[b"subscribe", &long],
            &[&long[..]],
        ] {
            let mut wire = BytesMut::new();
            command(&mut wire, args);
            cases.push((wire, "not a message's payload"));
        }
        cases.push((
            BytesMut::from(format!("${}\r\n", MIN_OTHER_LIMIT + 1).as_bytes()),
            "not a message's payload",
        ));
        cases.push((
            BytesMut::from(&b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n*3\r\n$4\r\nabcd\r\n$4\r\nefgh\r\n$4\r\nijkl\r\n"[..]),
            "a nested array of more than 10 bytes",
        ));
        let mut unterminated = BytesMut::new();
        command(&mut unterminated, &[b"message", b"ch", &[b'x'; 11]]);
        unterminated[41] = b'!';
        cases.push((unterminated, "not followed by CRLF"));
        for (wire, expected) in cases {
            let mut reader = Reader::new(10);
            let wire_text = String::from_utf8_lossy(&wire[..wire.len().min(40)]).into_owned();
            let mut buffer = wire.clone();
            let error = loop {
                match reader.parse(&mut buffer) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{wire_text:?}: no error"),
                    Err(error) => break error,
                }
            };
            assert!(error.0.contains(expected), "{wire_text:?}: {}", error.0);
        }
    }

    /// A frame's elements other than a payload take at most two channels' worth together:
    /// under a limit of a MiB, a third bulk string of a MiB after two is refused from its
    /// header, not buffered (eight of them were, 8 MiB for a frame refused at its end). A
    /// `pmessage` with a pattern and a channel at the limit is still read.
    #[test]
    fn what_is_not_a_payload_is_bounded_in_all() {
        let limit = 1 << 20;
        let big = vec![b'c'; limit];
        let mut wire = BytesMut::from(&b"*8\r\n"[..]);
        for _ in 0..2 {
            wire.extend_from_slice(format!("${limit}\r\n").as_bytes());
            wire.extend_from_slice(&big);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(format!("${limit}\r\n").as_bytes());
        let error = Reader::new(limit)
            .parse(&mut wire.clone())
            .expect_err("refused from the third one's header");
        assert!(error.0.contains("not a message's payload"), "{}", error.0);

        let mut pmessage = BytesMut::new();
        command(&mut pmessage, &[b"pmessage", &big, &big, b"payload"]);
        match Reader::new(limit).parse(&mut pmessage) {
            Ok(Some(Frame::Message { channel, payload })) => {
                assert_eq!((channel.len(), &payload[..]), (limit, &b"payload"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    /// However small the limit, the frames that are not a message's payload (confirmations,
    /// channels) are read; an empty payload is within any limit.
    #[test]
    fn a_small_limit_still_reads_confirmations_and_channels() {
        let channel = vec![b'c'; 4096];
        let mut wire =
            BytesMut::from(format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", channel.len()).as_bytes());
        wire.extend_from_slice(&channel);
        wire.extend_from_slice(b"\r\n:1\r\n");
        command(&mut wire, &[b"message", &channel, b""]);
        command(&mut wire, &[b"message", &channel, b"x"]);
        let mut reader = Reader::new(0);
        let mut buffer = wire;
        let mut frames = Vec::new();
        while let Some(frame) = reader.parse(&mut buffer).unwrap() {
            frames.push(frame);
        }
        let channel = Bytes::from(channel);
        assert_eq!(
            frames,
            [
                Frame::Subscribed(channel.clone()),
                Frame::Message {
                    channel: channel.clone(),
                    payload: Bytes::new()
                },
                Frame::Oversized { channel, len: 1 },
            ]
        );
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        command(&mut out, &[b"SUBSCRIBE", b"alk:events:a:1", b""]);
        assert_eq!(
            &out[..],
            b"*3\r\n$9\r\nSUBSCRIBE\r\n$14\r\nalk:events:a:1\r\n$0\r\n\r\n"
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A frame as Redis would send it, and what it parses to.
        fn frame() -> impl Strategy<Value = (Vec<u8>, Frame)> {
            let bytes = || proptest::collection::vec(any::<u8>(), 0..300);
            prop_oneof![
                (bytes(), bytes()).prop_map(|(channel, payload)| {
                    let mut wire = BytesMut::new();
                    command(&mut wire, &[b"message", &channel, &payload]);
                    let frame = Frame::Message {
                        channel: channel.into(),
                        payload: payload.into(),
                    };
                    (wire.to_vec(), frame)
                }),
                bytes().prop_map(|channel| {
                    let mut wire =
                        format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", channel.len()).into_bytes();
                    wire.extend_from_slice(&channel);
                    // The count of subscriptions is an integer.
                    wire.extend_from_slice(b"\r\n:12\r\n");
                    (wire, Frame::Subscribed(channel.into()))
                }),
                "[a-zA-Z ]{0,40}".prop_map(|text| {
                    let wire = format!("-ERR {text}\r\n").into_bytes();
                    (wire, Frame::Error(format!("ERR {text}").into()))
                }),
                Just((b"*2\r\n$4\r\npong\r\n$0\r\n\r\n".to_vec(), Frame::Pong)),
            ]
        }

        proptest! {
            #[test]
            fn frames_read_in_any_pieces_are_the_frames_sent(
                frames in proptest::collection::vec(frame(), 0..8),
                mut cuts in proptest::collection::vec(0usize..4000, 0..12),
            ) {
                let wire: Vec<u8> = frames.iter().flat_map(|(wire, _)| wire.clone()).collect();
                cuts.sort_unstable();
                let expected: Vec<String> =
                    frames.iter().map(|(_, frame)| format!("{frame:?}")).collect();
                prop_assert_eq!(parse_in_pieces(&wire, &cuts, MAX_BULK), expected);
            }

            #[test]
            fn payloads_over_the_limit_are_skipped_in_any_pieces(
                messages in proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..20), 0usize..300),
                    0..8,
                ),
                mut cuts in proptest::collection::vec(0usize..3000, 0..12),
            ) {
                let mut wire = BytesMut::new();
                let mut expected = Vec::new();
                for (channel, len) in &messages {
                    let payload = vec![b'p'; *len];
                    command(&mut wire, &[b"message", channel, &payload]);
                    expected.push(format!("{:?}", if *len > 100 {
                        Frame::Oversized { channel: channel.clone().into(), len: *len }
                    } else {
                        Frame::Message { channel: channel.clone().into(), payload: payload.into() }
                    }));
                }
                cuts.sort_unstable();
                prop_assert_eq!(parse_in_pieces(&wire, &cuts, 100), expected);
            }

            #[test]
            fn any_bytes_read_in_any_pieces_read_the_same(
                wire in proptest::collection::vec(
                    prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(b'*'), Just(b'$'), Just(b'3')],
                    0..200,
                ),
                mut cuts in proptest::collection::vec(0usize..200, 0..12),
            ) {
                cuts.sort_unstable();
                prop_assert_eq!(
                    parse_in_pieces(&wire, &cuts, MAX_BULK),
                    parse_in_pieces(&wire, &[], MAX_BULK)
                );
                prop_assert_eq!(parse_in_pieces(&wire, &cuts, 2), parse_in_pieces(&wire, &[], 2));
            }
        }
    }
}
