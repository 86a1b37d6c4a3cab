//! An arbitrary sequence of raw frames, publishes and subscribes through the typical stack
//! `ParseError(skip) + Codec(Json) + Prefix("app:")` over an in-memory raw loopback.
//!
//! Never panics; every frame is either delivered (decoded exactly as the codec alone decodes
//! or recovers it, its channel stripped of the prefix), skipped as a decode error (carrying the stripped
//! channel and the whole frame), or dropped as foreign; the layers' counters agree with what
//! came up, and `delivered + skipped + foreign == frames fed`.
//!
//! # Input format
//!
//! The input is read by hand-written `Arbitrary` impls so that seeds are easy to write: a
//! sequence of operations, each starting with a tag byte (`tag % 3`):
//!
//! - `0`, a raw frame: a channel byte (`% 6`: none, `app:chat:1`, `app:`, `other:chat:1`,
//!   `ap`, or a string that follows), a little-endian `u16` length, then that many bytes
//!   (fewer if the input ends);
//! - `1`, a publish (which comes back up on its channel): the type and the id as strings,
//!   then the payload: a tag byte (`% 8`: null, bool, i64, u64, f64, string, array, object)
//!   and its contents (an array or object: a count byte `% 4`, then its items, an object's
//!   each a string key and a value);
//! - `2`, a subscribe to a topic given as a string (confirmed, prefix stripped on the way up).
//!
//! A string is a length byte and that many bytes, read as lossy UTF-8; a missing byte reads
//! as zero.
#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use alkdev_pubsub_layers::codec::{Codec, Json};
use alkdev_pubsub_layers::{
    CodecLayer, Command, Envelope, Error, ErrorKind, ParseErrorLayer, PrefixLayer, Topic, Up,
};
use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

const PREFIX: &str = "app:";
/// Past this many operations the rest of the input is ignored.
const MAX_OPS: usize = 256;
/// Payloads nest at most this deep: past [`MAX_NESTING`], so published envelopes that do not
/// decode again are exercised too.
const MAX_DEPTH: usize = 160;
/// serde_json's recursion limit (128) leaves room for this many nested levels: the envelope
/// object and the payload's arrays and objects together.
const MAX_NESTING: usize = 127;

#[derive(Debug)]
enum Channel {
    None,
    Named(&'static str),
    Custom(String),
}

impl Channel {
    fn topic(&self) -> Option<Topic> {
        match self {
            Channel::None => None,
            Channel::Named(name) => Some(Topic::from(*name)),
            Channel::Custom(name) => Some(Topic::from(name.as_str())),
        }
    }
}

impl<'a> Arbitrary<'a> for Channel {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? % 6 {
            0 => Channel::None,
            1 => Channel::Named("app:chat:1"),
            2 => Channel::Named("app:"),
            3 => Channel::Named("other:chat:1"),
            4 => Channel::Named("ap"),
            _ => Channel::Custom(text(u)?),
        })
    }
}

/// A string: a length byte, then that many bytes (fewer if the input ends), as lossy UTF-8.
fn text(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    let len = usize::from(u8::arbitrary(u)?).min(u.len());
    Ok(String::from_utf8_lossy(u.bytes(len)?).into_owned())
}

/// A JSON value nesting at most [`MAX_DEPTH`] containers deep, with finite numbers only.
#[derive(Debug)]
struct Payload(Value);

fn value(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Value> {
    let leaves_only = depth >= MAX_DEPTH;
    let tag = u8::arbitrary(u)? % if leaves_only { 6 } else { 8 };
    Ok(match tag {
        0 => Value::Null,
        1 => Value::Bool(bool::arbitrary(u)?),
        2 => Value::from(i64::arbitrary(u)?),
        3 => Value::from(u64::arbitrary(u)?),
        4 => Number::from_f64(f64::arbitrary(u)?).map_or(Value::Null, Value::Number),
        5 => Value::String(text(u)?),
        6 => {
            let len = usize::from(u8::arbitrary(u)? % 4);
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(value(u, depth + 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let len = usize::from(u8::arbitrary(u)? % 4);
            let mut fields = Map::new();
            for _ in 0..len {
                fields.insert(text(u)?, value(u, depth + 1)?);
            }
            Value::Object(fields)
        }
    })
}

/// How many containers deep `value` nests (a scalar: 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl<'a> Arbitrary<'a> for Payload {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        value(u, 0).map(Payload)
    }
}

/// Raw frame bytes, shown escaped (`cargo fuzz fmt` prints inputs with `Debug`).
struct Frame(Vec<u8>);

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

#[derive(Debug)]
enum Op {
    Frame { channel: Channel, frame: Frame },
    Publish { envelope: Envelope },
    Subscribe(String),
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? % 3 {
            0 => {
                let channel = Channel::arbitrary(u)?;
                let len = u16::from_le_bytes([u8::arbitrary(u)?, u8::arbitrary(u)?]);
                let len = usize::from(len).min(u.len());
                Op::Frame {
                    channel,
                    frame: Frame(u.bytes(len)?.to_vec()),
                }
            }
            1 => {
                let event_type = text(u)?;
                let id = text(u)?;
                let Payload(payload) = Payload::arbitrary(u)?;
                Op::Publish {
                    envelope: Envelope::new(event_type, id, payload),
                }
            }
            _ => Op::Subscribe(text(u)?),
        })
    }
}

#[derive(Debug)]
struct Input(Vec<Op>);

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            match Op::arbitrary(u) {
                Ok(op) => ops.push(op),
                // A truncated last operation is dropped, not the whole input.
                Err(_) => break,
            }
        }
        Ok(Input(ops))
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }
}

/// A raw loopback: publishes come back up on their channel, subscribes are confirmed, and
/// [`inject`](Loopback::inject) puts a frame on the wire as another client would.
#[derive(Default)]
struct Loopback {
    inbox: VecDeque<Up<Bytes>>,
    reader: Option<Waker>,
}

impl Loopback {
    fn push(&mut self, up: Up<Bytes>) {
        self.inbox.push_back(up);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl Sink<Command<Bytes>> for Loopback {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, command: Command<Bytes>) -> Result<(), Error> {
        let up = match command {
            Command::Publish { topic, message } => Up::Message {
                channel: Some(topic),
                message,
            },
            Command::Subscribe(topic) => Up::Subscribed(topic),
            Command::Unsubscribe(topic) => Up::Unsubscribed(topic),
        };
        self.push(up);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }
}

impl Stream for Loopback {
    type Item = Result<Up<Bytes>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inbox.pop_front() {
            Some(up) => Poll::Ready(Some(Ok(up))),
            None => {
                self.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// What must come up for one frame.
#[derive(Debug)]
enum Expected {
    Delivered {
        channel: Option<Topic>,
        envelope: Envelope,
    },
    Skipped {
        channel: Option<Topic>,
        frame: Bytes,
    },
    Foreign,
    Subscribed(Topic),
}

/// What the codec alone makes of `frame` on `channel`, once past the prefix layer: `decode`,
/// then `recover` what it refused (as the codec layer does).
fn expect_frame(channel: Option<Topic>, frame: Bytes) -> Expected {
    let channel = match channel {
        Some(channel) => match channel.strip_prefix(PREFIX) {
            Some(topic) => Some(Topic::from(topic)),
            None => return Expected::Foreign,
        },
        None => None,
    };
    let decoded = Codec::<Value>::decode(&Json, channel.as_ref(), &frame)
        .or_else(|error| Codec::<Value>::recover(&Json, channel.as_ref(), &frame, error));
    match decoded {
        Ok(envelope) => Expected::Delivered { channel, envelope },
        Err(_) => Expected::Skipped { channel, frame },
    }
}

#[derive(Default)]
struct Tally {
    frames: u64,
    delivered: u64,
    skipped: u64,
    foreign: u64,
}

fn check(expected: Expected, got: Up<Envelope>, tally: &mut Tally) {
    match (expected, got) {
        (
            Expected::Delivered { channel, envelope },
            Up::Message {
                channel: got_channel,
                message,
            },
        ) => {
            assert_eq!(got_channel, channel, "delivered on the wrong channel");
            assert_eq!(
                message, envelope,
                "the stack decoded otherwise than the codec"
            );
            tally.delivered += 1;
        }
        (Expected::Skipped { channel, frame }, Up::Skipped(error)) => {
            assert_eq!(
                error.kind(),
                ErrorKind::Decode,
                "skipped for another reason: {error}"
            );
            assert_eq!(
                error.channel(),
                channel.as_ref(),
                "the error lost the channel"
            );
            assert_eq!(error.frame(), Some(&frame), "the error lost the frame");
            tally.skipped += 1;
        }
        (Expected::Foreign, Up::Skipped(error)) => {
            assert_eq!(
                error.kind(),
                ErrorKind::ForeignChannel,
                "skipped for another reason: {error}"
            );
            tally.foreign += 1;
        }
        (Expected::Subscribed(topic), Up::Subscribed(got)) => {
            assert_eq!(got, topic, "the confirmation kept the prefix");
        }
        (expected, got) => panic!("expected {expected:?}, got {got:?}"),
    }
}

fuzz_target!(|input: Input| {
    let parse_errors = ParseErrorLayer::skip();
    let prefix = PrefixLayer::new(PREFIX);
    let skipped = parse_errors.skipped();
    let foreign = prefix.foreign();
    let mut stack = tower::ServiceBuilder::new()
        .layer(parse_errors)
        .layer(CodecLayer::<_, Value>::json())
        .layer(prefix)
        .service(Loopback::default());

    let mut tally = Tally::default();
    for op in input.0 {
        let expected = match op {
            Op::Frame { channel, frame } => {
                let frame = Bytes::from(frame.0);
                let channel = channel.topic();
                // The raw side of the stack, as a broker would deliver it.
                stack.get_mut().get_mut().get_mut().push(Up::Message {
                    channel: channel.clone(),
                    message: frame.clone(),
                });
                tally.frames += 1;
                expect_frame(channel, frame)
            }
            Op::Publish { envelope } => {
                let topic = envelope.topic();
                let command = Command::Publish {
                    topic: topic.clone(),
                    message: envelope.clone(),
                };
                futures::executor::block_on(stack.send(command)).expect("publishing");
                tally.frames += 1;
                // The envelope object is one level; its payload may take the rest.
                if depth(&envelope.payload) < MAX_NESTING {
                    Expected::Delivered {
                        channel: Some(topic),
                        envelope,
                    }
                } else {
                    let frame = Bytes::from(serde_json::to_vec(&envelope).expect("encoding"));
                    Expected::Skipped {
                        channel: Some(topic),
                        frame,
                    }
                }
            }
            Op::Subscribe(topic) => {
                let topic = Topic::from(topic);
                futures::executor::block_on(stack.send(Command::Subscribe(topic.clone())))
                    .expect("subscribing");
                Expected::Subscribed(topic)
            }
        };
        let got = stack
            .next()
            .now_or_never()
            .expect("the stack is ready: the frame is waiting")
            .expect("the stack ended")
            .expect("an error item under the skip policy");
        check(expected, got, &mut tally);
        assert!(
            stack.next().now_or_never().is_none(),
            "one frame came up as more than one item"
        );
    }

    assert_eq!(
        skipped.get(),
        tally.skipped,
        "the parse-error counter disagrees"
    );
    assert_eq!(foreign.get(), tally.foreign, "the prefix counter disagrees");
    assert_eq!(
        tally.delivered + tally.skipped + tally.foreign,
        tally.frames,
        "a frame was neither delivered nor counted"
    );
});
