use crate::{Error, Topic};

/// What flows down a transport: publish a message, subscribe to a topic, unsubscribe.
///
/// `M` is the message: `bytes::Bytes` on a raw transport, an [`Envelope`](crate::Envelope)
/// above the [codec layer](crate::codec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<M> {
    /// Send `message` on `topic`.
    Publish {
        /// The topic (on Redis, the channel) to publish on.
        topic: Topic,
        /// The message.
        message: M,
    },
    /// Start receiving messages on this topic. The transport answers with
    /// [`Up::Subscribed`] once the subscription is in effect.
    Subscribe(Topic),
    /// Stop receiving messages on this topic. The transport answers with [`Up::Unsubscribed`]
    /// once the unsubscription is in effect (at once, if the peer does not confirm it), after
    /// the messages of that topic it already has.
    Unsubscribe(Topic),
}

impl<M> Command<M> {
    /// The topic this command is about.
    pub fn topic(&self) -> &Topic {
        match self {
            Command::Publish { topic, .. }
            | Command::Subscribe(topic)
            | Command::Unsubscribe(topic) => topic,
        }
    }

    /// Maps the message of a publish, keeping the topic; other commands pass unchanged.
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> Command<N> {
        match self {
            Command::Publish { topic, message } => Command::Publish {
                topic,
                message: f(message),
            },
            Command::Subscribe(topic) => Command::Subscribe(topic),
            Command::Unsubscribe(topic) => Command::Unsubscribe(topic),
        }
    }
}

/// What flows up a transport: a message, or a signal about the connection.
#[derive(Clone, Debug)]
pub enum Up<M> {
    /// A message arrived.
    Message {
        /// The channel it came on, where the wire has one (Redis). Frames without one
        /// (WebSocket, worker) carry `None` and the envelope's own topic is used.
        channel: Option<Topic>,
        /// The message.
        message: M,
    },
    /// A [`Command::Subscribe`] is in effect: nothing published on the topic from now on is
    /// missed. Transports confirm every subscribe, in the order they were sent.
    Subscribed(Topic),
    /// A [`Command::Unsubscribe`] is in effect.
    Unsubscribed(Topic),
    /// A [`Command::Subscribe`] was refused for good (for example by an ACL): it answers that
    /// subscribe in place of [`Up::Subscribed`]. The connection goes on.
    SubscribeFailed(Topic, Error),
    /// The connection was rebuilt after a failure and every subscription replayed, or the
    /// transport otherwise knows it lost messages (the Redis Cluster transport, for a slot that
    /// moved, or messages a reader that fell behind could not be kept): messages published
    /// during the gap may have been missed.
    Reconnected,
    /// A layer dropped an inbound frame and reports why (a decode error, a channel outside the
    /// prefix), so counters above it stay exact. The stream goes on.
    Skipped(Error),
}

impl<M> Up<M> {
    /// Maps the message, keeping the channel; signals pass unchanged.
    pub fn map<N>(self, f: impl FnOnce(M) -> N) -> Up<N> {
        match self {
            Up::Message { channel, message } => Up::Message {
                channel,
                message: f(message),
            },
            Up::Subscribed(topic) => Up::Subscribed(topic),
            Up::Unsubscribed(topic) => Up::Unsubscribed(topic),
            Up::SubscribeFailed(topic, error) => Up::SubscribeFailed(topic, error),
            Up::Reconnected => Up::Reconnected,
            Up::Skipped(error) => Up::Skipped(error),
        }
    }
}
