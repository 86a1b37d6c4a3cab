//! [`LocalTransport`]: an in-memory loopback transport.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{Sink, Stream};

use crate::layers::{Command, Envelope, Error, Result, Topic, Up};

/// An in-memory loopback: what is published on a topic comes back up if the topic is
/// subscribed, like a broker with one client.
///
/// [`EventTarget::local`](crate::EventTarget::local) does not need it (it delivers with no
/// transport at all); this is the same behaviour as a real [`Transport`](crate::Transport), for
/// testing layers and the driver, and as a model for writing one.
///
/// At most `capacity` messages wait to be read; `poll_ready` waits for room beyond that.
///
/// ```
/// use alkdev_pubsub::{Envelope, EventTarget, LocalTransport};
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let events = EventTarget::new(LocalTransport::new());
/// let mut pings = events.subscribe("ping:1").await?;
/// events.dispatch_event(Envelope::new("ping", "1", 7.into())).await?;
/// assert_eq!(pings.next().await.unwrap().unwrap().payload, 7);
/// # Ok(())
/// # }
/// ```
pub struct LocalTransport<P = serde_json::Value> {
    queue: VecDeque<Up<Envelope<P>>>,
    capacity: usize,
    subscribed: HashSet<Topic>,
    reader: Option<Waker>,
    writer: Option<Waker>,
    closed: bool,
}

impl LocalTransport {
    /// A loopback of JSON-valued envelopes holding up to 1,024 unread messages. For another
    /// payload type, use `LocalTransport::<P>::default()` or
    /// [`with_capacity`](Self::with_capacity).
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }
}

impl<P> LocalTransport<P> {
    /// A loopback holding up to `capacity` unread messages.
    pub fn with_capacity(capacity: usize) -> Self {
        LocalTransport {
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            subscribed: HashSet::new(),
            reader: None,
            writer: None,
            closed: false,
        }
    }

    fn push(&mut self, up: Up<Envelope<P>>) {
        self.queue.push_back(up);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl<P> Default for LocalTransport<P> {
    /// A loopback holding up to 1,024 unread messages.
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl<P> Unpin for LocalTransport<P> {}

impl<P> fmt::Debug for LocalTransport<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalTransport")
            .field("queued", &self.queue.len())
            .field("capacity", &self.capacity)
            .field("subscribed", &self.subscribed.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl<P> Sink<Command<Envelope<P>>> for LocalTransport<P> {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.closed {
            return Poll::Ready(Err(Error::closed("the local transport is closed")));
        }
        if self.queue.len() < self.capacity {
            Poll::Ready(Ok(()))
        } else {
            self.writer = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn start_send(mut self: Pin<&mut Self>, command: Command<Envelope<P>>) -> Result<()> {
        if self.closed {
            return Err(Error::closed("the local transport is closed"));
        }
        match command {
            Command::Publish { topic, message } => {
                if self.subscribed.contains(&topic) {
                    self.push(Up::Message {
                        channel: Some(topic),
                        message,
                    });
                }
            }
            Command::Subscribe(topic) => {
                self.subscribed.insert(topic.clone());
                self.push(Up::Subscribed(topic));
            }
            Command::Unsubscribe(topic) => {
                self.subscribed.remove(&topic);
                self.push(Up::Unsubscribed(topic));
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        self.closed = true;
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl<P> Stream for LocalTransport<P> {
    type Item = Result<Up<Envelope<P>>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.queue.pop_front() {
            Some(up) => {
                if let Some(writer) = self.writer.take() {
                    writer.wake();
                }
                Poll::Ready(Some(Ok(up)))
            }
            None if self.closed => Poll::Ready(None),
            None => {
                self.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
