//! The prefix layer: one application's channels, apart from the others on a shared broker.
//!
//! | way | what it does |
//! |---|---|
//! | down | prefixes the topic of every publish, subscribe and unsubscribe |
//! | up | strips the prefix from each message's channel and from confirmations; a message on a channel without the prefix is dropped, counted, and reported as [`Up::Skipped`] with an error of kind [`ForeignChannel`](crate::ErrorKind::ForeignChannel); a message with no channel (WebSocket, worker) passes unchanged |
//!
//! # Stacking
//!
//! Two prefix layers compose as nesting: the outer layer's prefix is applied first, so it
//! ends up *inside* the inner one's. With `ServiceBuilder`, where the first `.layer` is the
//! outermost,
//!
//! ```text
//! .layer(PrefixLayer::new("app:")).layer(PrefixLayer::new("tenant7:"))
//! ```
//!
//! publishes the topic `chat:1` on the channel `tenant7:app:chat:1`, and each layer strips
//! its own part on the way up.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Sink, Stream};
use pin_project_lite::pin_project;

use crate::{Command, Error, ErrorKind, Result, Topic, Up};

/// A shared counter, readable while the transport is in use.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    pub(crate) fn increment(&self) -> u64 {
        self.0.fetch_add(1, Relaxed) + 1
    }
}

/// A [`tower::Layer`] that adds a channel prefix: see the [module](self).
///
/// ```
/// use alkdev_pubsub_layers::prefix::PrefixLayer;
///
/// let layer = PrefixLayer::new("alk:events:");
/// let foreign = layer.foreign(); // messages dropped for lacking the prefix
/// assert_eq!(foreign.get(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct PrefixLayer {
    prefix: Arc<str>,
    foreign: Counter,
}

impl PrefixLayer {
    /// A layer with `prefix` (for example `alk:events:`).
    pub fn new(prefix: impl Into<Arc<str>>) -> Self {
        PrefixLayer {
            prefix: prefix.into(),
            foreign: Counter::default(),
        }
    }

    /// The count of inbound messages dropped because their channel lacked the prefix, over
    /// every transport this layer made.
    pub fn foreign(&self) -> Counter {
        self.foreign.clone()
    }
}

impl<T> tower::Layer<T> for PrefixLayer {
    type Service = Prefix<T>;

    fn layer(&self, inner: T) -> Prefix<T> {
        Prefix {
            inner,
            prefix: Arc::clone(&self.prefix),
            foreign: self.foreign.clone(),
            last: None,
            last_sent: None,
        }
    }
}

pin_project! {
    /// A transport whose channels carry a prefix; made by [`PrefixLayer`].
    pub struct Prefix<T> {
        #[pin]
        inner: T,
        prefix: Arc<str>,
        foreign: Counter,
        // The last channel stripped and its topic: traffic mostly repeats channels, and this
        // saves an allocation per message.
        last: Option<(Topic, Topic)>,
        // The same, the other way: the last topic prefixed and its channel.
        last_sent: Option<(Topic, Topic)>,
    }
}

impl<T> Prefix<T> {
    /// Wraps `inner` with `prefix`.
    pub fn new(inner: T, prefix: impl Into<Arc<str>>) -> Self {
        Prefix {
            inner,
            prefix: prefix.into(),
            foreign: Counter::default(),
            last: None,
            last_sent: None,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Inbound messages dropped for lacking the prefix.
    pub fn foreign(&self) -> &Counter {
        &self.foreign
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The wrapped transport, pinned.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut T> {
        self.project().inner
    }

    /// Unwraps the transport.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: fmt::Debug> fmt::Debug for Prefix<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prefix")
            .field("inner", &self.inner)
            .field("prefix", &self.prefix)
            .field("foreign", &self.foreign.get())
            .finish()
    }
}

/// `prefix` + `topic`.
pub fn add_prefix(prefix: &str, topic: &Topic) -> Topic {
    let mut channel = String::with_capacity(prefix.len() + topic.len());
    channel.push_str(prefix);
    channel.push_str(topic);
    Topic::from(channel)
}

/// `channel` without `prefix`, if it has it.
pub fn strip_prefix(prefix: &str, channel: &Topic) -> Option<Topic> {
    channel.strip_prefix(prefix).map(Topic::from)
}

impl<M, T> Sink<Command<M>> for Prefix<T>
where
    T: Sink<Command<M>, Error = Error>,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, command: Command<M>) -> Result<()> {
        let this = self.project();
        let prefix: &str = this.prefix;
        crate::check_topic_len(prefix.len() + command.topic().len(), || {
            let topic = command.topic();
            let shown: String = topic.chars().take(32).collect();
            let cut = if shown.len() < topic.len() { "..." } else { "" };
            format!(
                "prefixing {shown:?}{cut} ({} bytes) with {prefix:?} ({} bytes): the channel is too long",
                topic.len(),
                prefix.len()
            )
        })?;
        let command = match command {
            Command::Publish { topic, message } => {
                let channel = match this.last_sent {
                    Some((last, channel)) if *last == topic => channel.clone(),
                    last => {
                        let channel = add_prefix(prefix, &topic);
                        *last = Some((topic, channel.clone()));
                        channel
                    }
                };
                Command::Publish {
                    topic: channel,
                    message,
                }
            }
            Command::Subscribe(topic) => Command::Subscribe(add_prefix(prefix, &topic)),
            Command::Unsubscribe(topic) => Command::Unsubscribe(add_prefix(prefix, &topic)),
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

impl<M, T> Stream for Prefix<T>
where
    T: Stream<Item = Result<Up<M>>>,
{
    type Item = Result<Up<M>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let up = match this.inner.poll_next(cx) {
            Poll::Ready(Some(Ok(up))) => up,
            other => return other,
        };
        let prefix: &str = this.prefix;
        Poll::Ready(Some(Ok(match up {
            Up::Message {
                channel: Some(channel),
                message,
            } => match this
                .last
                .as_ref()
                .filter(|(last, _)| *last == channel)
                .map(|(_, topic)| topic.clone())
                .or_else(|| {
                    let topic = strip_prefix(prefix, &channel)?;
                    *this.last = Some((channel.clone(), topic.clone()));
                    Some(topic)
                }) {
                Some(topic) => Up::Message {
                    channel: Some(topic),
                    message,
                },
                None => {
                    let count = this.foreign.increment();
                    tracing::debug!(%channel, prefix, count, "dropped a message outside the prefix");
                    Up::Skipped(Error::new(
                        ErrorKind::ForeignChannel,
                        format!(
                            "message on channel {}, outside the prefix {prefix:?}",
                            crate::quote(channel.as_bytes())
                        ),
                    ))
                }
            },
            Up::Subscribed(channel) => {
                Up::Subscribed(strip_prefix(prefix, &channel).unwrap_or(channel))
            }
            Up::Unsubscribed(channel) => {
                Up::Unsubscribed(strip_prefix(prefix, &channel).unwrap_or(channel))
            }
            Up::SubscribeFailed(channel, error) => {
                Up::SubscribeFailed(strip_prefix(prefix, &channel).unwrap_or(channel), error)
            }
            other => other,
        })))
    }
}
