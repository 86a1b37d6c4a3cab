use futures::{Sink, Stream};

use crate::{Command, Error, Up};

/// A transport: a [`Sink`] of [`Command`]s and a [`Stream`] of [`Up`] items.
///
/// There is nothing to implement: any type that is both is a transport, by the blanket impl.
/// That includes every layer of this crate wrapped around a transport, and a user's own type.
///
/// # Contract
///
/// - every [`Command::Subscribe`] is answered, in order, with [`Up::Subscribed`] once the
///   subscription is in effect (a transport with no server answers at once), or with
///   [`Up::SubscribeFailed`] if the peer refused it for good; every [`Command::Unsubscribe`]
///   with [`Up::Unsubscribed`] (at once, if the peer does not confirm it), after the messages
///   of that topic the transport already has: an event target's close waits for those answers
///   and ends its subscriptions then, so a message yielded after the answer is not delivered,
///   and an unsubscribe never answered makes every close wait for its timeout;
/// - a subscription in effect that the peer drops for good (it refused it when it was
///   subscribed again after a reconnect: an access rule changed, say) is told with an
///   [`Up::SubscribeFailed`] that answers no command;
/// - a successful `poll_flush` means every command fed before it was handed to the peer (a
///   transport with acknowledgements, such as Redis, waits for them);
/// - an error for which [`Error::is_unrecoverable`] holds, or the end of the stream, means the
///   connection is gone; the [reconnect layer](crate::reconnect) builds a new one. Report a
///   connection the peer closed that way (for example [`Error::connection_lost`]), not with
///   [`Error::closed`]: an error of kind [`Closed`](crate::ErrorKind::Closed) says the
///   transport itself was closed (a call after `poll_close`), and ends an event target's use
///   of it, with no reconnect. Other errors concern one message, and the stream goes on;
/// - a `poll_ready` error that is not unrecoverable reports an earlier failure (a pipeline the
///   peer refused), once: the next call goes on. A connection that fails 64 calls in a row is
///   taken for broken (the reconnect layer replaces it; an event target without one stops).
///   `poll_ready` is also where a transport keeps its own buffers bounded: an event target
///   feeds as fast as it says `Ready`.
///
/// What the bullets above imply, spelled out for a transport of your own:
///
/// - answers are matched to commands per topic, in order: every command gets its own answer,
///   also when one topic is subscribed, unsubscribed and subscribed again in one batch (one
///   `Subscribed` for two subscribes leaves the second waiting for ever), and an unsubscribe
///   of a topic the transport does not know (one the peer refused or dropped) is answered
///   too. A `start_send` error is the answer to that command: a subscribe refused (for a
///   topic the wire cannot carry, say), an unsubscribe done with; no `Up` may follow for it;
/// - a peer that does not acknowledge subscribes (NATS, say) is answered once a round trip
///   sent after the subscribe has come back (a `PING` and its `PONG`), not at once: `Subscribed`
///   promises that nothing published from then on is missed. An event target's `subscribe`
///   waits for the answer with no timeout of its own;
/// - an [`Up::Message`]'s `channel`, when given, is the topic exactly as it was subscribed (a
///   transport that escapes topic names on its wire maps them back); a message for a topic
///   with no listener is dropped and counted as unrouted;
/// - a transport that rebuilds its connection itself (rather than under the reconnect layer)
///   yields [`Up::Reconnected`] once its subscriptions are in effect again: every
///   subscription hears that events may be missing;
/// - a `poll_flush` error that is not unrecoverable fails every publish that flush covered
///   (which of them arrived is not known); a `start_send` error fails that one message;
/// - it may be dropped without `poll_close` (after a fatal error, or a close that timed out):
///   release what it holds in `Drop`. Its stream may still be polled while it closes (an
///   event target reads on until the close is done), and is not polled once it has ended.
///
/// `testkit::run_all` (feature `testkit` of `alkdev-pubsub`) checks a transport against
/// these through an event target. `examples/custom_transport.rs` in the `alkdev-pubsub`
/// repository is a whole transport of bytes to copy (lines of JSON over TCP), and
/// `testkit::BrokerConnection` another, with a broker's subscribe answers.
///
/// A user's own transport, here an in-memory loopback that echoes what is published:
///
/// ```
/// use std::collections::VecDeque;
/// use std::pin::Pin;
/// use std::task::{Context, Poll, Waker};
///
/// use alkdev_pubsub_layers::{Command, Envelope, Error, Transport, Up};
/// use futures::{Sink, Stream};
///
/// #[derive(Default)]
/// struct Echo {
///     queue: VecDeque<Up<Envelope>>,
///     waker: Option<Waker>,
/// }
///
/// impl Sink<Command<Envelope>> for Echo {
///     type Error = Error;
///     fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
///         Poll::Ready(Ok(()))
///     }
///     fn start_send(mut self: Pin<&mut Self>, command: Command<Envelope>) -> Result<(), Error> {
///         let up = match command {
///             Command::Publish { topic, message } => Up::Message { channel: Some(topic), message },
///             Command::Subscribe(topic) => Up::Subscribed(topic),
///             Command::Unsubscribe(topic) => Up::Unsubscribed(topic),
///         };
///         self.queue.push_back(up);
///         if let Some(waker) = self.waker.take() {
///             waker.wake();
///         }
///         Ok(())
///     }
///     fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
///         Poll::Ready(Ok(()))
///     }
///     fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
///         Poll::Ready(Ok(()))
///     }
/// }
///
/// impl Stream for Echo {
///     type Item = Result<Up<Envelope>, Error>;
///     fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
///         match self.queue.pop_front() {
///             Some(up) => Poll::Ready(Some(Ok(up))),
///             None => {
///                 self.waker = Some(cx.waker().clone());
///                 Poll::Pending
///             }
///         }
///     }
/// }
///
/// fn assert_transport<T: Transport<Envelope>>(_: &T) {}
/// assert_transport(&Echo::default());
/// ```
pub trait Transport<M>:
    Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>, Error>>
{
}

impl<M, T> Transport<M> for T where
    T: Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>, Error>>
{
}
