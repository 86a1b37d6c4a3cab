//! A transport of your own: envelopes as lines of JSON over TCP between two peers (as a
//! WebSocket joins a hub and a spoke), under this crate's layers, in an event target.
//!
//! ```sh
//! cargo run --example custom_transport
//! ```
//!
//! A transport is any `Sink<Command<Bytes>> + Stream<Item = Result<Up<Bytes>>>`: this one
//! wraps a `tokio_util` `Framed` of lines and keeps the contract of `alkdev_pubsub::Transport`
//! (read its docs first): every subscribe and unsubscribe answered, in order (with no server,
//! a subscription is in effect at once), the reading task woken when an answer is queued, a
//! lost connection reported as one (`ConnectionLost`: the reconnect layer builds a new one),
//! a line over the limit refused alone (`TooLarge`), and `poll_ready` bounding what is
//! buffered (the `Framed` writes out past its backpressure boundary). `tests/custom_transport.rs`
//! runs the conformance suite (`testkit::run_all`) over it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
use alkdev_pubsub::{Command, Envelope, Error, ErrorKind, EventTarget, Result, Up};
use bytes::Bytes;
use bytes::BytesMut;
use futures::{Sink, Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder, Framed, LinesCodec, LinesCodecError};
use tower::ServiceBuilder;

/// The longest line read or sent.
pub const MAX_LINE: usize = 1 << 20;

/// Lines, with a line over the limit read as `Err(())` (skipped up to its newline) rather
/// than as a decode error: `Framed` ends its stream after one, and the connection would end
/// with it.
struct Lines(LinesCodec);

impl Decoder for Lines {
    type Item = std::result::Result<String, ()>;
    type Error = LinesCodecError;

    fn decode(
        &mut self,
        buf: &mut BytesMut,
    ) -> std::result::Result<Option<Self::Item>, Self::Error> {
        match self.0.decode(buf) {
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Err(()))),
            other => other.map(|line| line.map(Ok)),
        }
    }

    fn decode_eof(
        &mut self,
        buf: &mut BytesMut,
    ) -> std::result::Result<Option<Self::Item>, Self::Error> {
        match self.0.decode_eof(buf) {
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Err(()))),
            other => other.map(|line| line.map(Ok)),
        }
    }
}

impl Encoder<String> for Lines {
    type Error = LinesCodecError;

    fn encode(&mut self, line: String, buf: &mut BytesMut) -> std::result::Result<(), Self::Error> {
        self.0.encode(line, buf)
    }
}

/// Envelopes as lines of JSON over one TCP connection (JSON never has a raw newline).
pub struct LineTransport {
    lines: Framed<TcpStream, Lines>,
    /// Answers to subscribes and unsubscribes, yielded before the next line read.
    answers: VecDeque<Up<Bytes>>,
    /// The task that last found nothing to read: woken when an answer is queued (the sink
    /// and the stream may be polled by different tasks).
    reader: Option<Waker>,
}

impl LineTransport {
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        LineTransport {
            lines: Framed::new(stream, Lines(LinesCodec::new_with_max_length(MAX_LINE))),
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
}

/// A failure of the connection: an I/O error ends it (`ConnectionLost` and the like, which
/// the reconnect layer answers with a new connection).
fn lost(error: LinesCodecError) -> Error {
    match error {
        LinesCodecError::Io(io) => Error::from(io),
        LinesCodecError::MaxLineLengthExceeded => {
            Error::new(ErrorKind::TooLarge, "a line over the limit")
        }
    }
}

impl Sink<Command<Bytes>> for LineTransport {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        // `Framed` is ready while its write buffer is under its boundary (8 KiB), and writes
        // it out first otherwise: what it buffers stays bounded.
        Sink::<String>::poll_ready(Pin::new(&mut self.lines), cx).map_err(lost)
    }

    fn start_send(mut self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        match command {
            Command::Publish { topic, message } => {
                if message.len() > MAX_LINE {
                    // This message alone is refused: the connection goes on.
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "a {}-byte message on {topic} (at most {MAX_LINE})",
                            message.len()
                        ),
                    ));
                }
                let line = String::from_utf8(message.to_vec())
                    .map_err(|_| Error::new(ErrorKind::Encode, "a message that is not UTF-8"))?;
                Pin::new(&mut self.lines).start_send(line).map_err(lost)
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
        Sink::<String>::poll_flush(Pin::new(&mut self.lines), cx).map_err(lost)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Sink::<String>::poll_close(Pin::new(&mut self.lines), cx).map_err(lost)
    }
}

impl Stream for LineTransport {
    type Item = Result<Up<Bytes>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(answer) = self.answers.pop_front() {
            return Poll::Ready(Some(Ok(answer)));
        }
        match self.lines.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(Ok(line)))) => Poll::Ready(Some(Ok(Up::Message {
                // The envelope says its topic (`type:id`), as over a WebSocket.
                channel: None,
                message: Bytes::from(line),
            }))),
            // Skipped up to its newline: that line alone is lost, the stream goes on.
            Poll::Ready(Some(Ok(Err(())))) => Poll::Ready(Some(Err(Error::new(
                ErrorKind::TooLarge,
                format!("a line over {MAX_LINE} bytes was skipped"),
            )))),
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(lost(error)))),
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
