//! [`Subscription`]: a stream of the events of one topic, from a bounded queue.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures::Stream;

use crate::layers::{Envelope, Topic};
use crate::queue::{Queue, Slot};
use crate::target::driver::{Direct, Pulled};
use crate::target::shared::{Control, Shared};
use crate::ListenerId;

/// How many times in a row an in-process subscription that finds its shared queue empty
/// yields before it sleeps (more measured no better: they only burn the reader's thread).
const YIELDS: u8 = 1;

/// The default capacity of a subscription's queue, in events.
pub const DEFAULT_CAPACITY: usize = 1024;

/// A notice, in place of an event, that a subscriber may have missed some.
///
/// A [`Subscription`] yields `Err(Gap)` items between events; the stream goes on after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Gap {
    /// This many events were dropped because the subscriber's queue was full: policy
    /// [`Overflow::DropOldest`] or [`Overflow::DropNewest`], or a full [`Overflow::Block`] queue
    /// that could not wait (an in-process
    /// [`try_dispatch_event`](crate::EventTarget::try_dispatch_event), or a dispatch cancelled
    /// while it waited). It comes where the events went missing: before the events a
    /// drop-oldest queue kept, after those a drop-newest queue kept.
    ///
    /// Also, last before the end, for events published as the subscription ended with its
    /// target (a close, or the transport failing) that it could not take: one that waited for
    /// room in its full `Block` queue, or one dispatched as the close came.
    Lagged(u64),
    /// The transport lost its connection and rebuilt it, or otherwise lost events (see
    /// [`Up::Reconnected`](crate::Up::Reconnected)): events published during the gap may be
    /// missing.
    Reconnected,
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gap::Lagged(n) => write!(f, "subscriber lagged: {n} events dropped"),
            Gap::Reconnected => f.write_str("transport reconnected: events may have been missed"),
        }
    }
}

impl std::error::Error for Gap {}

/// What a full subscription queue does with the next event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop the oldest queued event and tell the subscriber with [`Gap::Lagged`], as
    /// `tokio::sync::broadcast` does. Other subscribers are not slowed (behind a transport, one
    /// reading a burst for its target may hold the others up for a millisecond or two). The
    /// default.
    #[default]
    DropOldest,
    /// Drop the new event and tell the subscriber with [`Gap::Lagged`], once it has read the
    /// events queued before.
    DropNewest,
    /// Wait for room: lossless, but a slow subscriber slows delivery (to every subscription
    /// sharing its queue, too). On the in-process target it slows the publisher of that topic;
    /// behind a transport it pauses the driver's inbound side, and so every topic of the
    /// target. Over Redis (`RedisTransport::connect`), the backlog then waits in the socket
    /// and in Redis, which bounds it per client (`client-output-buffer-limit pubsub`) by
    /// closing the connection: the reconnect layer reconnects, and the subscriber hears of
    /// the gap. (Over a redis-rs `PubSub` given to `RedisTransport::from_clients`, redis-rs
    /// reads messages into an unbounded buffer of its own instead; over Redis Cluster,
    /// redis-rs reads them into the transport's buffer of 32 MiB, past which messages are
    /// dropped and the gap reported as `Reconnected`.) Prefer the dropping policies there.
    ///
    /// While the driver waits for room, it reads nothing from the transport: the answers to
    /// this target's subscribes and unsubscribes wait too (they come up the same stream). So
    /// the task that reads a full `Block` subscription must not wait, before it reads on, for
    /// a [`subscribe`](crate::EventTarget::subscribe) of the same target to a topic it does
    /// not listen to yet: it cannot finish (and a [`close`](crate::EventTarget::close) waits
    /// for its timeout, then drops the waiting event with a lag notice). Subscribe from
    /// another task, or read first.
    /// Likewise two targets that each hold a full `Block` subscription whose reader publishes
    /// to the other (a worker pair's two sides answering each other, say) can each wait for
    /// the other for ever, once both publish queues are full too: give one side a dropping
    /// policy, or publish from another task than the one that reads.
    Block,
}

/// The queue settings of one subscription.
///
/// ```
/// use alkdev_pubsub::{Overflow, SubscribeOptions};
///
/// let options = SubscribeOptions::new().capacity(64).overflow(Overflow::DropNewest);
/// assert_eq!(options.get_capacity(), 64);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscribeOptions {
    capacity: usize,
    overflow: Overflow,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            capacity: DEFAULT_CAPACITY,
            overflow: Overflow::DropOldest,
        }
    }
}

impl SubscribeOptions {
    /// [`DEFAULT_CAPACITY`] events, [`Overflow::DropOldest`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many events may wait in the queue (at least 1).
    ///
    /// It also bounds how many events the queue keeps after its subscribers are done with
    /// them: events read on another thread than the publisher's are freed by the next publish
    /// on the topic, on the publishing thread (where the allocator reuses their memory best),
    /// so up to `capacity` of them (1,024 at most, for a topic of up to 16 subscriptions that
    /// share their queue) stay allocated until then, or until the subscription is dropped. A
    /// payload's `Drop` runs then.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Sets what a full queue does.
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// The capacity.
    pub fn get_capacity(&self) -> usize {
        self.capacity
    }

    /// The overflow policy.
    pub fn get_overflow(&self) -> Overflow {
        self.overflow
    }
}

/// The events of one topic, as a [`Stream`].
///
/// Returned by [`EventTarget::subscribe`](crate::EventTarget::subscribe) once the transport
/// has confirmed the subscription. Items are `Ok(event)` (shared with every other listener of
/// the topic) or `Err(`[`Gap`]`)` notices; the stream ends when the target closes (also when
/// its last [`EventTarget`](crate::EventTarget) handle is dropped: a subscription does not
/// keep its target open), when its
/// transport fails for good, or when the transport drops the topic for good (its server
/// refused it when it was subscribed again after a reconnect: an access rule changed, say;
/// logged as an error). Dropping the subscription leaves the topic: the last listener to
/// leave unsubscribes on the transport.
///
/// Subscriptions of one topic with the same capacity and policy ([`Overflow::DropOldest`] or
/// [`Overflow::Block`]) read one shared queue, each at its own pace, as receivers of
/// `tokio::sync::broadcast` do: an event is stored once however many read it. The queue is
/// full when its slowest reader has `capacity` events it has not yielded: under
/// [`Overflow::DropOldest`] that reader loses its oldest (the others lose nothing); under
/// [`Overflow::Block`] the publisher waits for it, so every reader of the queue waits with it.
/// A subscription takes events from the queue in batches (of up to 64); under `DropOldest`,
/// the events of a batch it took are not dropped (so it may hold up to one batch more than its
/// capacity).
///
/// Over a transport, a subscription that finds its queue empty routes what the transport has
/// ready itself, when the target's driver task is not at it: that saves a hand-off between
/// tasks per batch. Under a burst the driver leaves the reading to a waiting subscription, which
/// goes on reading for the whole target while it is polled (decoding and freeing the events on
/// one thread); if it stops being polled, the driver takes the reading back within a couple of
/// milliseconds. So polling it may run the transport's reading side (and the reconnect
/// layer's work, if it is reconnecting) and the callbacks of other listeners of the target,
/// on the polling task; they run one message at a time, in arrival order, wherever they run.
///
/// ```
/// use alkdev_pubsub::{Envelope, EventTarget, Gap, Overflow, SubscribeOptions};
/// use futures::StreamExt;
/// use serde_json::json;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let events = EventTarget::local();
/// // Room for two events; a third drops the oldest, and the reader is told.
/// let options = SubscribeOptions::new().capacity(2).overflow(Overflow::DropOldest);
/// let mut orders = events.subscribe_with("order.created:eu", options).await?;
/// for n in 0..3 {
///     events.dispatch_event(Envelope::new("order.created", "eu", json!({ "n": n }))).await?;
/// }
/// let mut seen = Vec::new();
/// while let Some(item) = orders.next().await {
///     match item {
///         Ok(event) => seen.push(event.payload["n"].as_u64().unwrap()),
///         // Resynchronise from the source of truth, or just note it.
///         Err(Gap::Lagged(dropped)) => assert_eq!(dropped, 1),
///         Err(gap) => println!("{gap}"), // `Gap::Reconnected`, or a kind to come
///     }
///     if seen.len() == 2 {
///         break;
///     }
/// }
/// assert_eq!(seen, [1, 2]);
/// # Ok(())
/// # }
/// ```
///
/// # Cancellation safety
///
/// `next()` is cancellation safe: an event is taken off the queue only when it is returned.
#[must_use = "dropping a `Subscription` leaves its topic (the last listener to leave unsubscribes it)"]
pub struct Subscription<P = serde_json::Value> {
    /// The queue this subscription reads (as reader `id`), maybe with others of the topic.
    queue: Arc<Queue<P>>,
    /// Slots taken from the queue, or handed over by a pull, and not yet yielded.
    batch: VecDeque<Slot<P>>,
    /// How many times in a row the queue was found empty and the task yielded rather than
    /// sleep (in-process; see [`YIELDS`]).
    yielded: u8,
    /// The queue's version at this subscription's last read.
    seen: u64,
    /// Where this subscription was among its queue's readers at its last read.
    hint: usize,
    topic: Topic,
    id: ListenerId,
    shared: Arc<Shared<P>>,
    /// The target's transport, read from this task when the queue is empty (`None`
    /// in-process).
    direct: Option<Weak<dyn Direct<P>>>,
}

impl<P: Send + Sync + 'static> Subscription<P> {
    pub(crate) fn new(
        queue: Arc<Queue<P>>,
        topic: Topic,
        id: ListenerId,
        shared: Arc<Shared<P>>,
        direct: Option<Weak<dyn Direct<P>>>,
    ) -> Self {
        Subscription {
            queue,
            batch: VecDeque::new(),
            yielded: 0,
            seen: u64::MAX,
            hint: 0,
            topic,
            id,
            shared,
            direct,
        }
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// This subscription's listener id.
    pub fn id(&self) -> ListenerId {
        self.id
    }

    /// How many items wait for this subscription now (events and gap notices it has not
    /// yielded).
    pub fn len(&self) -> usize {
        self.batch.len() + self.queue.untaken(self.id)
    }

    /// Whether nothing waits in the queue now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The queue's overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.queue.overflow()
    }
}

impl<P> Stream for Subscription<P> {
    type Item = Result<Arc<Envelope<P>>, Gap>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(item) = this.pop_batch() {
            return Poll::Ready(Some(item));
        }
        if this.direct.is_some() {
            if let Poll::Ready(item) = this.read_now() {
                this.yielded = 0;
                return Poll::Ready(item);
            }
            // Empty: rather than wait for the driver task to route what the transport has
            // ready and wake this task, route it from here (unless the driver is at it).
            let pulled =
                this.direct.as_ref().and_then(Weak::upgrade).map(|direct| {
                    direct.try_pull(cx.waker(), &this.queue, this.id, &mut this.batch)
                });
            // The pull's events for this subscription alone came straight to it, ahead of
            // whatever it left in the queue.
            if let Some(item) = this.pop_batch() {
                this.yielded = 0;
                return Poll::Ready(Some(item));
            }
            match pulled {
                // More is ready, and this task reads it for the target: once it has yielded
                // what it routed to itself, or at once if that was nothing.
                Some(Pulled::More) => {
                    if let Poll::Ready(item) = this.read_now() {
                        return Poll::Ready(item);
                    }
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // The transport is this subscription's to read, and the lock was held a moment
                // (by a publisher, or by the driver waking this task to read): try again soon.
                // (Another subscription holding it reads for this one too: this one sleeps.)
                Some(Pulled::Busy) if this.shared.lease_holder.load(Relaxed) == this.id.0 => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                _ => {}
            }
        }
        // In-process, a reader of a shared queue that finds it empty yields (once) before it
        // sleeps. The publisher is often a step ahead, and taking its next events then costs
        // less than being woken for them: a publisher pays a wake-up for every sleeping
        // reader. A lone reader sleeps at once (measured: yielding only made it read smaller
        // batches, taking the lock from the publisher more often). Behind a transport, the
        // pull above was that look.
        let sleep = this.yielded >= YIELDS || this.direct.is_some() || this.queue.readers() < 2;
        if !sleep && this.queue.version() == this.seen {
            // Nothing changed since this subscription's last read, which took everything.
            this.yielded += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let item = this.queue.poll_read(
            this.id,
            &mut this.hint,
            &mut this.batch,
            sleep.then_some(&mut *cx),
            &mut this.seen,
        );
        match (&item, sleep) {
            (Poll::Pending, false) => {
                this.yielded += 1;
                cx.waker().wake_by_ref();
            }
            _ => this.yielded = 0,
        }
        item
    }
}

impl<P> Subscription<P> {
    /// Reads the queue without registering to be woken (see [`Queue::poll_read`]).
    fn read_now(&mut self) -> Poll<Option<Result<Arc<Envelope<P>>, Gap>>> {
        self.queue.poll_read(
            self.id,
            &mut self.hint,
            &mut self.batch,
            None,
            &mut self.seen,
        )
    }

    /// The next item of the batch, if any.
    fn pop_batch(&mut self) -> Option<Result<Arc<Envelope<P>>, Gap>> {
        let slot = self.batch.pop_front()?;
        // Yielded in full: what the batch held no longer counts against the capacity.
        if self.batch.is_empty() {
            self.queue.release(self.id, &mut self.hint);
        }
        Some(slot.into_item())
    }
}

impl<P> Drop for Subscription<P> {
    fn drop(&mut self) {
        if !self.shared.remove_listener(&self.topic, self.id) {
            // Not in the map (the target ended, or the subscription was removed by its id):
            // leave the queue all the same, which frees what this reader held.
            drop(self.queue.remove_reader(self.id));
        }
        // No longer its queue's reader, it is not handed the reading from now on (the driver
        // hands it only to a subscription whose queue waits for it, and looks again once it
        // has). If it holds it, the driver reads again at once: told under the core's lock
        // when that is free, else by a message once the lease is ended here. (Done before
        // leaving the queue, the driver could hand it the reading in between, and every topic
        // waited for the lease's timer.)
        if self.direct.is_some() && self.shared.lease_holder.load(Relaxed) == self.id.0 {
            if let Some(direct) = self.direct.as_ref().and_then(Weak::upgrade) {
                direct.drop_lease(self.id);
            }
            let ended_here = self
                .shared
                .lease_holder
                .compare_exchange(self.id.0, 0, Relaxed, Relaxed)
                .is_ok();
            if ended_here {
                if let Some(control) = self.shared.control() {
                    let _ = control.send(Control::Wake);
                }
            }
        }
    }
}

impl<P> fmt::Debug for Subscription<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("id", &self.id)
            .field("queued", &(self.batch.len() + self.queue.untaken(self.id)))
            .field("capacity", &self.queue.capacity())
            .field("overflow", &self.queue.overflow())
            .finish()
    }
}
