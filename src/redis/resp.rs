//! The RESP2 frames a subscribe connection exchanges with Redis: the commands it sends
//! (`SUBSCRIBE`, `UNSUBSCRIBE`, `PING`, `AUTH`) and the replies and messages it reads.
//!
//! A connection in subscribe mode is sent few kinds of frames, so they are parsed here by hand,
//! in one pass over the read buffer, and a message's channel and payload are slices of that
//! buffer (no copy, no allocation per message).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// The longest bulk string accepted: Redis's own default `proto-max-bulk-len` (512 MiB). A
/// longer length is a protocol error, found before anything is buffered for it.
const MAX_BULK: usize = 512 * 1024 * 1024;

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
}

/// The element kinds a frame may have at its top.
enum Top {
    Element(Element),
    Array(usize, [Element; MAX_ELEMENTS]),
}

/// Parses the frame at the start of `buffer` and removes it: `Ok(None)` while it is incomplete
/// (nothing is removed; call again once more has been read).
pub(crate) fn parse(buffer: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let Some((len, top)) = scan(buffer)? else {
        return Ok(None);
    };
    let frame = buffer.split_to(len).freeze();
    Ok(Some(classify(&frame, top)))
}

/// Finds the frame at the start of `bytes`: its length and its elements.
fn scan(bytes: &[u8]) -> Result<Option<(usize, Top)>, ProtocolError> {
    let mut at = 0;
    let Some(&kind) = bytes.first() else {
        return Ok(None);
    };
    if kind == b'*' || kind == b'>' {
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
        let mut elements: [Element; MAX_ELEMENTS] = Default::default();
        for slot in elements.iter_mut().take(count) {
            match element(bytes, &mut at, true)? {
                Some(element) => *slot = element,
                None => return Ok(None),
            }
        }
        return Ok(Some((at, Top::Array(count, elements))));
    }
    Ok(element(bytes, &mut at, false)?.map(|element| (at, Top::Element(element))))
}

/// The element at `*at`, which moves past it; `None` if it is incomplete. An array is an
/// element only when `nested` (one level deep).
fn element(bytes: &[u8], at: &mut usize, nested: bool) -> Result<Option<Element>, ProtocolError> {
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
        b'*' if nested => {
            let Some(count) = length(
                &bytes[line],
                MAX_NESTED,
                "a nested array of {} elements (at most {} are accepted)",
            )?
            else {
                return Ok(Some(Element::Null));
            };
            for _ in 0..count {
                if element(bytes, at, false)?.is_none() {
                    *at = start;
                    return Ok(None);
                }
            }
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

/// Parses `wire` as a connection reads it, delivered in pieces that end at `cuts` (ascending
/// offsets; the rest comes last): what it reads, in order, as debug text, up to the end or the
/// first protocol error (then that error, last). For the tests and the fuzz target: the frames
/// must not depend on where the reads end.
pub(crate) fn parse_in_pieces(wire: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut read = Vec::new();
    let mut buffer = BytesMut::new();
    let mut from = 0;
    for end in cuts.iter().copied().chain([wire.len()]) {
        let end = end.clamp(from, wire.len());
        buffer.extend_from_slice(&wire[from..end]);
        from = end;
        loop {
            match parse(&mut buffer) {
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
                prop_assert_eq!(parse_in_pieces(&wire, &cuts), expected);
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
                prop_assert_eq!(parse_in_pieces(&wire, &cuts), parse_in_pieces(&wire, &[]));
            }
        }
    }
}
