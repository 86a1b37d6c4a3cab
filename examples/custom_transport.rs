//! A transport of your own: envelopes as lines of JSON over TCP between two peers (as a
//! WebSocket joins a hub and a spoke), under this crate's layers, in an event target.
//!
//! ```sh
//! cargo run --example custom_transport
//! ```
//!
//! A transport is any `Sink<Command<Bytes>> + Stream<Item = Result<Up<Bytes>>>`: this one
//! wraps a `tokio_util` `Framed` of lines and keeps the contract of `alkdev_pubsub::Transport`
//! (read its docs first): every subscribe and unsubscribe answered, in order, after the lines
//! already received (with no server, a subscription is in effect at once), the reading task
//! woken when an answer is queued, a lost connection reported as one (`ConnectionLost`: the
//! reconnect layer builds a new one), a line over the limit lost alone (`TooLarge`; one that
//! is not an envelope is the codec layer's to skip and count), and `poll_ready` bounding what
//! is buffered (the `Framed` writes out past its backpressure boundary).
//! `tests/custom_transport.rs` runs the conformance suite (`testkit::run_all`, and the check
//! of malformed frames) over it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use alkdev_pubsub::layers::tower::ServiceBuilder;
use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
use alkdev_pubsub::{Command, Envelope, Error, ErrorKind, EventTarget, Result, Up};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Sink, Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder, Framed};

/// The longest line read or sent, newline aside.
pub const MAX_LINE: usize = 1 << 20;

/// One line read: its bytes (as they came: the codec layer above decodes them, and skips and
/// counts a line that is not an envelope), or the news that one over [`MAX_LINE`] was skipped.
enum Line {
    Whole(Bytes),
    TooLong,
}

/// Lines of bytes, each ended by `\n`. A line over the limit is read as [`Line::TooLong`] and
/// skipped up to its newline, rather than failing: `Framed` ends its stream after a decoding
/// error, and the connection would end with it.
#[derive(Default)]
struct Lines {
    /// Skipping the rest of a line over the limit.
    skipping: bool,
    /// How much of the buffer was searched for a newline already.
    searched: usize,
}

impl Decoder for Lines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Line>> {
        loop {
            let newline = buf[self.searched..]
                .iter()
                .position(|byte| *byte == b'\n')
                .map(|at| self.searched + at);
            self.searched = 0;
            match newline {
                // The end of a line being skipped: on to the next one.
                Some(end) if self.skipping => {
                    buf.advance(end + 1);
                    self.skipping = false;
                }
                Some(end) if end > MAX_LINE => {
                    buf.advance(end + 1);
                    return Ok(Some(Line::TooLong));
                }
                Some(end) => {
                    let line = buf.split_to(end + 1).freeze();
                    return Ok(Some(Line::Whole(line.slice(..end))));
                }
                None if self.skipping => {
                    buf.clear();
                    return Ok(None);
                }
                None if buf.len() > MAX_LINE => {
                    buf.clear();
                    self.skipping = true;
                    return Ok(Some(Line::TooLong));
                }
                None => {
                    self.searched = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Line>> {
        // A last line the peer did not end is lost with the connection.
        let line = self.decode(buf)?;
        if line.is_none() {
            buf.clear();
            *self = Lines::default();
        }
        Ok(line)
    }
}

impl Encoder<Bytes> for Lines {
    type Error = std::io::Error;

    fn encode(&mut self, line: Bytes, buf: &mut BytesMut) -> std::io::Result<()> {
        buf.reserve(line.len() + 1);
        buf.put_slice(&line);
        buf.put_u8(b'\n');
        Ok(())
    }
}

/// Envelopes as lines of JSON over one TCP connection (JSON never has a raw newline).
pub struct LineTransport {
    lines: Framed<TcpStream, Lines>,
    /// Answers to subscribes and unsubscribes, yielded once the lines already received are.
    answers: VecDeque<Up<Bytes>>,
    /// The task that last found nothing to read: woken when an answer is queued (the sink
    /// and the stream may be polled by different tasks).
    reader: Option<Waker>,
}

impl LineTransport {
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        LineTransport {
            lines: Framed::new(stream, Lines::default()),
            answers: VecDeque::new(),
            reader: None,
        }
    }

    /// Connects to a peer listening at `address`.
    pub async fn connect(address: &str) -> Result<Self> {
        let stream = TcpStream::connect(address).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Connect,
                format!("connecting to {address}: {e}"),
                e,
            )
        })?;
        Ok(LineTransport::new(stream))
    }

    fn answer(&mut self, answer: Up<Bytes>) {
        self.answers.push_back(answer);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }

    /// A line already received (in the read buffer), without reading the socket.
    fn buffered_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buffer = std::mem::take(self.lines.read_buffer_mut());
        let line = self.lines.codec_mut().decode(&mut buffer);
        *self.lines.read_buffer_mut() = buffer;
        line
    }

    fn item(line: Line) -> Result<Up<Bytes>> {
        match line {
            // The envelope says its topic (`type:id`), as over a WebSocket.
            Line::Whole(message) => Ok(Up::Message {
                channel: None,
                message,
            }),
            // That line alone is lost: the stream goes on.
            Line::TooLong => Err(Error::new(
                ErrorKind::TooLarge,
                format!("a line over {MAX_LINE} bytes was skipped"),
            )),
        }
    }
}

impl Sink<Command<Bytes>> for LineTransport {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        // `Framed` is ready while its write buffer is under its boundary (8 KiB), and writes
        // it out first otherwise: what it buffers stays bounded. An I/O error ends the
        // connection (`ConnectionLost` and the like, which the reconnect layer answers with a
        // new one).
        Sink::<Bytes>::poll_ready(Pin::new(&mut self.lines), cx).map_err(Error::from)
    }

    fn start_send(mut self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        match command {
            Command::Publish { topic, message } => {
                // Refused alone (the connection goes on): what could not be read back whole.
                if message.len() > MAX_LINE {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "a {}-byte message on {topic} (at most {MAX_LINE})",
                            message.len()
                        ),
                    ));
                }
                if message.contains(&b'\n') {
                    return Err(Error::new(
                        ErrorKind::Encode,
                        format!("a message on {topic} with a newline (the frames are lines)"),
                    ));
                }
                Pin::new(&mut self.lines)
                    .start_send(message)
                    .map_err(Error::from)
            }
            // No server to ask: the other peer sends everything, and the event target routes
            // by topic. In effect at once, so answered at once, in order.
            Command::Subscribe(topic) => {
                self.answer(Up::Subscribed(topic));
                Ok(())
            }
            Command::Unsubscribe(topic) => {
                self.answer(Up::Unsubscribed(topic));
                Ok(())
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Sink::<Bytes>::poll_flush(Pin::new(&mut self.lines), cx).map_err(Error::from)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Sink::<Bytes>::poll_close(Pin::new(&mut self.lines), cx).map_err(Error::from)
    }
}

impl Stream for LineTransport {
    type Item = Result<Up<Bytes>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.answers.is_empty() {
            // An answer comes after the lines the transport already has: an unsubscribe's
            // after the messages of its topic received before it.
            return Poll::Ready(Some(match self.buffered_line() {
                Ok(Some(line)) => Self::item(line),
                Ok(None) => Ok(self.answers.pop_front().expect("not empty")),
                Err(error) => Err(Error::from(error)),
            }));
        }
        match self.lines.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(line))) => Poll::Ready(Some(Self::item(line))),
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Error::from(error)))),
            // The peer closed the connection: the end of the stream says so.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                self.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// An event target over `transport`: bytes to envelopes and back, a bad line skipped and
/// counted.
pub fn event_target<T>(transport: T) -> EventTarget
where
    T: Sink<Command<Bytes>, Error = Error> + Stream<Item = Result<Up<Bytes>>> + Send + 'static,
{
    EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .service(transport),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::with_source(ErrorKind::Connect, format!("binding: {e}"), e))?;
    let address = listener.local_addr().map_err(Error::from)?.to_string();

    // One peer accepts and listens...
    let accepted = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.map_err(Error::from)?;
        println!("accepted {peer}");
        Ok::<_, Error>(event_target(LineTransport::new(stream)))
    });
    // ...the other connects, under a reconnect layer that dials again if the line drops.
    let connect = address.clone();
    let client: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(Backoff::default()))
            .service(move || {
                let address = connect.clone();
                async move { LineTransport::connect(&address).await }
            }),
    );
    // The reconnect layer connects on first use.
    client
        .dispatch_confirmed(Envelope::new("hello", "1", serde_json::json!({})))
        .await?;
    let server = accepted.await.expect("the accepting task")?;

    let mut greetings = server.subscribe("greeting:world").await?;
    client
        .dispatch_event(Envelope::new(
            "greeting",
            "world",
            serde_json::json!({ "text": "hello over a transport of our own" }),
        ))
        .await?;
    let greeting = tokio::time::timeout(Duration::from_secs(5), greetings.next())
        .await
        .expect("the greeting arrives")
        .expect("the subscription is open")
        .expect("no gap");
    println!("{}: {}", greeting.topic(), greeting.payload["text"]);
    client.close().await;
    server.close().await;
    Ok(())
}
