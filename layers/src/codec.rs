//! The codec layer: a raw transport of [`Bytes`] frames becomes a transport of
//! [`Envelope`]s.
//!
//! | way | what it does |
//! |---|---|
//! | down | encodes each published envelope with the [`Codec`] (JSON: exactly `{"type","id","payload"}`); subscribes pass through |
//! | up | decodes each frame once; a frame that does not decode becomes an error item of kind [`Decode`](crate::ErrorKind::Decode) carrying the channel and the frame, and the stream goes on |

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Sink, Stream};
use pin_project_lite::pin_project;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Command, Envelope, Error, ErrorKind, Result, Topic, Up};

/// Turns envelopes into frames and back: the JavaScript package's `serializer`
/// (`{ stringify, parse }`).
///
/// Implement it to plug in another format; [`Json`] is the default. `decode` is handed the
/// whole frame and the channel it came on (`None` for WebSocket and worker frames).
///
/// ```
/// use alkdev_pubsub_layers::codec::Codec;
/// use alkdev_pubsub_layers::{Envelope, Topic};
/// use bytes::Bytes;
///
/// /// `type|id|payload` with a plain-text payload.
/// #[derive(Clone, Debug)]
/// struct Pipes;
///
/// impl Codec<String> for Pipes {
///     type Error = &'static str;
///     fn encode(&self, envelope: &Envelope<String>) -> Result<Bytes, Self::Error> {
///         Ok(format!("{}|{}|{}", envelope.r#type, envelope.id, envelope.payload).into())
///     }
///     fn decode(&self, _channel: Option<&Topic>, frame: &Bytes) -> Result<Envelope<String>, Self::Error> {
///         let text = std::str::from_utf8(frame).map_err(|_| "not UTF-8")?;
///         let mut parts = text.splitn(3, '|');
///         match (parts.next(), parts.next(), parts.next()) {
///             (Some(t), Some(id), Some(payload)) => Ok(Envelope::new(t, id, payload.to_owned())),
///             _ => Err("expected type|id|payload"),
///         }
///     }
/// }
///
/// let frame = Pipes.encode(&Envelope::new("chat", "1", "hi".to_owned())).unwrap();
/// assert_eq!(Pipes.decode(None, &frame).unwrap().payload, "hi");
/// ```
pub trait Codec<P> {
    /// Why a frame could not be decoded or an envelope encoded.
    type Error: fmt::Display;

    /// The frame for `envelope`.
    fn encode(&self, envelope: &Envelope<P>) -> Result<Bytes, Self::Error>;

    /// Appends the frame for `envelope` to `buf`; [`WithCodec`] calls this, into a buffer it
    /// reuses, so that frames share a few large allocations instead of one or two each.
    ///
    /// The default calls [`encode`](Codec::encode) and copies; override it when the format
    /// can write straight into a buffer. On an error, [`WithCodec`] discards what was appended.
    fn encode_into(&self, envelope: &Envelope<P>, buf: &mut BytesMut) -> Result<(), Self::Error> {
        buf.extend_from_slice(&self.encode(envelope)?);
        Ok(())
    }

    /// The envelope in `frame`, which came on `channel` where the wire has one.
    fn decode(&self, channel: Option<&Topic>, frame: &Bytes) -> Result<Envelope<P>, Self::Error>;

    /// A second reading of a frame that [`decode`](Codec::decode) refused with `error`, for a
    /// format that can read some refused frames another way (lossily); [`WithCodec`] calls it
    /// only then, so the first reading stays as fast as it can be. The default gives up:
    /// `Err(error)`. [`Json`] reads lone surrogate escapes as U+FFFD.
    fn recover(
        &self,
        channel: Option<&Topic>,
        frame: &Bytes,
        error: Self::Error,
    ) -> Result<Envelope<P>, Self::Error> {
        let _ = (channel, frame);
        Err(error)
    }
}

/// JSON, the wire format of `@alkdev/pubsub`: strict decoding (see [`Envelope`]), nesting up
/// to serde_json's recursion limit of 128, and encoding of exactly `{"type","id","payload"}`.
/// A lone surrogate escape (half an emoji, as JavaScript's `JSON.stringify` writes a string cut
/// inside one) is refused by [`decode`](Codec::decode) and read as U+FFFD, the replacement
/// character, by [`recover`](Codec::recover), which the codec layer calls next.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl<P: Serialize + DeserializeOwned> Codec<P> for Json {
    type Error = serde_json::Error;

    fn encode(&self, envelope: &Envelope<P>) -> Result<Bytes, serde_json::Error> {
        let mut buf = BytesMut::with_capacity(128);
        self.encode_into(envelope, &mut buf)?;
        Ok(buf.freeze())
    }

    fn encode_into(
        &self,
        envelope: &Envelope<P>,
        buf: &mut BytesMut,
    ) -> Result<(), serde_json::Error> {
        serde_json::to_writer(buf.writer(), envelope)
    }

    fn decode(
        &self,
        _channel: Option<&Topic>,
        frame: &Bytes,
    ) -> Result<Envelope<P>, serde_json::Error> {
        // JSON text is UTF-8 (RFC 8259). Checking the whole frame once is cheaper than the
        // parser checking each string it reads; a frame that is not UTF-8 goes to the parser
        // as bytes, which refuses it with the position of the bad byte.
        match std::str::from_utf8(frame) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(frame),
        }
    }

    /// JavaScript's `JSON.stringify` writes half a surrogate pair (a string cut inside an
    /// emoji) as a lone `\uD8xx` escape: valid JSON that a Rust string cannot hold. When that
    /// is why `frame` was refused, it is decoded again with each lone surrogate read as U+FFFD,
    /// as a JavaScript `TextEncoder` would, rather than lose the message.
    #[cold]
    #[inline(never)]
    fn recover(
        &self,
        _channel: Option<&Topic>,
        frame: &Bytes,
        error: serde_json::Error,
    ) -> Result<Envelope<P>, serde_json::Error> {
        let message = error.to_string();
        if !(error.is_syntax()
            && (message.contains("surrogate") || message.contains("end of hex escape")))
        {
            return Err(error);
        }
        match without_lone_surrogates(frame) {
            Some(mended) => serde_json::from_slice(&mended),
            None => Err(error),
        }
    }
}

/// `frame` with every lone surrogate escape (`\uD800` to `\uDFFF` not in a pair) replaced
/// by `\uFFFD`; `None` if it has none. Backslashes appear only in strings in valid JSON, so
/// every escape is found by walking them.
fn without_lone_surrogates(frame: &[u8]) -> Option<Vec<u8>> {
    let unit = |at: usize| -> Option<u16> {
        let digits = frame.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let escaped_unit = |at: usize| match frame.get(at..at + 2) {
        Some(b"\\u") => unit(at + 2),
        _ => None,
    };
    let mut mended = Vec::with_capacity(frame.len());
    let mut changed = false;
    let mut at = 0;
    while at < frame.len() {
        if frame[at] != b'\\' {
            mended.push(frame[at]);
            at += 1;
            continue;
        }
        let Some(first) = escaped_unit(at) else {
            // Another escape (or a broken one, left for the parser to refuse): kept whole.
            let end = (at + 2).min(frame.len());
            mended.extend_from_slice(&frame[at..end]);
            at = end;
            continue;
        };
        let pair = (0xD800..=0xDBFF).contains(&first)
            && escaped_unit(at + 6).is_some_and(|second| (0xDC00..=0xDFFF).contains(&second));
        if pair {
            mended.extend_from_slice(&frame[at..at + 12]);
            at += 12;
        } else if (0xD800..=0xDFFF).contains(&first) {
            mended.extend_from_slice(b"\\uFFFD");
            changed = true;
            at += 6;
        } else {
            mended.extend_from_slice(&frame[at..at + 6]);
            at += 6;
        }
    }
    changed.then_some(mended)
}

/// A [`tower::Layer`] that puts a [`Codec`] over a raw transport: see the [module](self).
pub struct CodecLayer<C = Json, P = serde_json::Value> {
    codec: C,
    _payload: PhantomData<fn() -> P>,
}

impl<C: Clone, P> Clone for CodecLayer<C, P> {
    fn clone(&self) -> Self {
        CodecLayer {
            codec: self.codec.clone(),
            _payload: PhantomData,
        }
    }
}

impl<C: fmt::Debug, P> fmt::Debug for CodecLayer<C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodecLayer")
            .field("codec", &self.codec)
            .finish()
    }
}

impl<P> CodecLayer<Json, P> {
    /// The JSON codec, decoding payloads into `P` (by default `serde_json::Value`).
    pub fn json() -> Self {
        CodecLayer::new(Json)
    }
}

impl<C, P> CodecLayer<C, P> {
    /// A layer with `codec`.
    pub fn new(codec: C) -> Self {
        CodecLayer {
            codec,
            _payload: PhantomData,
        }
    }
}

impl<T, C: Clone, P> tower::Layer<T> for CodecLayer<C, P> {
    type Service = WithCodec<T, C, P>;

    fn layer(&self, inner: T) -> Self::Service {
        WithCodec::new(inner, self.codec.clone())
    }
}

pin_project! {
    /// A transport of envelopes over a raw transport of frames; made by [`CodecLayer`].
    pub struct WithCodec<T, C = Json, P = serde_json::Value> {
        #[pin]
        inner: T,
        codec: C,
        // Frames are encoded here and split off: they share its allocation.
        scratch: BytesMut,
        _payload: PhantomData<fn() -> P>,
    }
}

/// The size of each allocation `WithCodec` encodes frames into. A frame holds on to its chunk
/// until dropped, so this also bounds what a long-lived small frame keeps alive (a frame larger
/// than this gets an allocation of its own, which nothing after it shares).
const SCRATCH_CHUNK: usize = 8 * 1024;

impl<T, C, P> WithCodec<T, C, P> {
    /// Wraps `inner` with `codec`.
    pub fn new(inner: T, codec: C) -> Self {
        WithCodec {
            inner,
            codec,
            scratch: BytesMut::new(),
            _payload: PhantomData,
        }
    }

    /// The codec.
    pub fn codec(&self) -> &C {
        &self.codec
    }

    /// The raw transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The raw transport, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The raw transport, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut T> {
        self.project().inner
    }

    /// Unwraps the raw transport.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: fmt::Debug, C: fmt::Debug, P> fmt::Debug for WithCodec<T, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithCodec")
            .field("inner", &self.inner)
            .field("codec", &self.codec)
            .finish()
    }
}

impl<T, C, P> Sink<Command<Envelope<P>>> for WithCodec<T, C, P>
where
    T: Sink<Command<Bytes>, Error = Error>,
    C: Codec<P>,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Envelope<P>>) -> Result<()> {
        let this = self.project();
        let command = match command {
            Command::Publish { topic, message } => {
                let scratch = this.scratch;
                // Room left over from the last chunk, or a new chunk (what was split off keeps
                // the old one alive; nothing is copied).
                if scratch.capacity() < SCRATCH_CHUNK / 8 {
                    scratch.reserve(SCRATCH_CHUNK);
                }
                match this.codec.encode_into(&message, scratch) {
                    Ok(()) => {
                        let frame = scratch.split().freeze();
                        if frame.len() > SCRATCH_CHUNK || scratch.capacity() > SCRATCH_CHUNK {
                            // Grown for a large frame: do not cut later frames from it (each
                            // would keep it alive); the next one starts a chunk of its own.
                            *scratch = BytesMut::new();
                        }
                        Command::Publish {
                            topic,
                            message: frame,
                        }
                    }
                    Err(cause) => {
                        scratch.clear();
                        return Err(Error::new(
                            ErrorKind::Encode,
                            format!("encoding an envelope for {topic}: {cause}"),
                        ));
                    }
                }
            }
            Command::Subscribe(topic) => Command::Subscribe(topic),
            Command::Unsubscribe(topic) => Command::Unsubscribe(topic),
        };
        this.inner.start_send(command)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_close(cx)
    }
}

impl<T, C, P> Stream for WithCodec<T, C, P>
where
    T: Stream<Item = Result<Up<Bytes>>>,
    C: Codec<P>,
{
    type Item = Result<Up<Envelope<P>>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let up = match this.inner.poll_next(cx) {
            Poll::Ready(Some(Ok(up))) => up,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(Some(match up {
            Up::Message { channel, message } => {
                match this.codec.decode(channel.as_ref(), &message) {
                    Ok(envelope) => checked(channel, message, envelope),
                    // Out of line: a second reading inside `decode` slowed the decoding that
                    // succeeds (the WebSocket receiving side by 4 %, measured).
                    Err(cause) => recovered(this.codec, channel, message, cause),
                }
            }
            Up::Subscribed(topic) => Ok(Up::Subscribed(topic)),
            Up::Unsubscribed(topic) => Ok(Up::Unsubscribed(topic)),
            Up::SubscribeFailed(topic, error) => Ok(Up::SubscribeFailed(topic, error)),
            Up::Reconnected => Ok(Up::Reconnected),
            Up::Skipped(error) => Ok(Up::Skipped(error)),
        }))
    }
}

/// A decoded message, unless its topic is over the limit.
#[inline(always)]
fn checked<P>(
    channel: Option<Topic>,
    message: Bytes,
    envelope: Envelope<P>,
) -> Result<Up<Envelope<P>>> {
    let topic_len = envelope.r#type.len() + 1 + envelope.id.len();
    if topic_len > crate::MAX_TOPIC_LEN {
        let cause = format!(
            "its topic of {topic_len} bytes is over the limit of {}",
            crate::MAX_TOPIC_LEN
        );
        return Err(Error::decode_frame(channel.as_ref(), message, cause));
    }
    Ok(Up::Message {
        channel,
        message: envelope,
    })
}

/// A message `decode` refused with `cause`: what the codec's [`recover`](Codec::recover)
/// makes of it, or the decode error.
#[cold]
#[inline(never)]
fn recovered<C: Codec<P>, P>(
    codec: &C,
    channel: Option<Topic>,
    message: Bytes,
    cause: C::Error,
) -> Result<Up<Envelope<P>>> {
    match codec.recover(channel.as_ref(), &message, cause) {
        Ok(envelope) => checked(channel, message, envelope),
        Err(cause) => Err(Error::decode_frame(channel.as_ref(), message, cause)),
    }
}
