//! [`EventTarget`]: the listener map in front of a transport.

pub(crate) mod driver;
pub(crate) mod shared;

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use self::driver::{Direct, Driver, Fed, Outgoing};
use self::shared::{Added, Control, Listener, Registered, Shared};
use crate::layers::{Envelope, Error, ErrorKind, Result, Topic, Transport};
use crate::queue::Queue;
use crate::stats::Stats;
use crate::subscription::{SubscribeOptions, Subscription};

/// The default capacity of the queue between an event target's handles and its driver.
pub const DEFAULT_PUBLISH_CAPACITY: usize = 1024;

/// How long [`EventTarget::close`] waits, by default, for the transport to confirm the final
/// unsubscribes and to close.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Identifies a listener of an [`EventTarget`], for [`EventTarget::remove_event_listener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerId(pub(crate) u64);

/// Publish and listen to [`Envelope`]s by topic, in-process or over any [`Transport`].
///
/// An event target keeps the listener map: the first listener of a topic subscribes on the
/// transport, the last one to leave unsubscribes. Each inbound message is decoded once and
/// shared, as one `Arc`, by every listener of its topic, in arrival order. Listeners are
/// callbacks ([`add_event_listener`](Self::add_event_listener)), called where the event is
/// delivered, or [`Subscription`] streams ([`subscribe`](Self::subscribe)), each with a
/// bounded queue (shared by the subscriptions of a topic that have the same queue settings,
/// each reading at its own pace).
///
/// Handles are cheap to clone. Over a transport, one driver task owns it: it feeds every queued
/// command down and flushes once, and routes what comes up. Two shortcuts skip the hand-off to
/// that task when it is not using the transport: a publishing task feeds its publish itself,
/// and a [`Subscription`] that finds its queue empty routes what the transport has ready
/// itself, and under a burst reads on for the target while it is polled (both only from tasks
/// on the runtime the target was built on). In-process
/// ([`local`](Self::local)), there is no transport and no driver: a dispatch delivers straight
/// from the publishing task into the listeners' queues.
///
/// Dropping the last handle closes the target as [`close`](Self::close) does (subscriptions
/// end after what they have queued), as long as its runtime goes on running the driver task.
/// A runtime that ends drops that task: what was queued and not yet sent is dropped, counted
/// in [`Stats::publish_failed`] (a publish that resolved `Ok` was taken, not sent), and every
/// later call fails with [`ErrorKind::Closed`]. So await `close` before the runtime ends (the
/// end of `main` or of a `#[tokio::test]`). A current-thread runtime runs the driver only
/// while something is blocked on it (`block_on`): held outside of that, the target waits.
///
/// ```
/// use alkdev_pubsub::{Envelope, EventTarget};
/// use futures::StreamExt;
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let events = EventTarget::local();
/// let mut statuses = events.subscribe("session.status:proj_123").await?;
///
/// events
///     .dispatch_event(Envelope::new("session.status", "proj_123", json!({ "state": "running" })))
///     .await?;
///
/// let event = statuses.next().await.unwrap().unwrap();
/// assert_eq!(event.payload["state"], "running");
/// # Ok(())
/// # }
/// ```
pub struct EventTarget<P = serde_json::Value> {
    handle: Arc<Handle<P>>,
}

struct Handle<P> {
    shared: Arc<Shared<P>>,
    /// `None` in-process.
    publish: Option<mpsc::Sender<Outgoing<P>>>,
    /// The driver's transport, for publishes that can skip the queue and subscriptions that
    /// route what it has ready (gone with the driver).
    direct: Option<Weak<dyn Direct<P>>>,
    options: SubscribeOptions,
}

impl<P> Drop for Handle<P> {
    fn drop(&mut self) {
        match self.shared.control() {
            Some(control) => {
                let _ = control.send(Control::Shutdown);
            }
            None => {
                self.shared.end_all(None);
            }
        }
    }
}

impl<P> Clone for EventTarget<P> {
    fn clone(&self) -> Self {
        EventTarget {
            handle: Arc::clone(&self.handle),
        }
    }
}

/// A handle to an [`EventTarget`] that does not keep it open; made by
/// [`EventTarget::downgrade`].
pub struct WeakEventTarget<P = serde_json::Value> {
    handle: Weak<Handle<P>>,
}

impl<P> WeakEventTarget<P> {
    /// The target, while some [`EventTarget`] handle of it is still held.
    pub fn upgrade(&self) -> Option<EventTarget<P>> {
        self.handle.upgrade().map(|handle| EventTarget { handle })
    }
}

impl<P> Default for WeakEventTarget<P> {
    /// A handle of no target: [`upgrade`](WeakEventTarget::upgrade) always gives `None` (as
    /// `std::sync::Weak::new`), for a field set once a target exists.
    fn default() -> Self {
        WeakEventTarget {
            handle: Weak::new(),
        }
    }
}

impl<P> Clone for WeakEventTarget<P> {
    fn clone(&self) -> Self {
        WeakEventTarget {
            handle: Weak::clone(&self.handle),
        }
    }
}

impl<P> fmt::Debug for WeakEventTarget<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakEventTarget")
            .field("alive", &(self.handle.strong_count() > 0))
            .finish()
    }
}

impl<P: Send + Sync + 'static> Default for EventTarget<P> {
    fn default() -> Self {
        Self::local()
    }
}

impl<P> fmt::Debug for EventTarget<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventTarget")
            .field("in_process", &self.handle.publish.is_none())
            .field("topics", &self.handle.shared.topic_count())
            .field("closed", &self.handle.shared.is_closed())
            .finish()
    }
}

/// Refuses an envelope whose topic is over [`MAX_TOPIC_LEN`](crate::layers::MAX_TOPIC_LEN).
fn check_envelope<P>(envelope: &Envelope<P>) -> Result<()> {
    crate::layers::check_topic_len(envelope.r#type.len() + 1 + envelope.id.len(), || {
        let head: String = envelope.r#type.chars().take(32).collect();
        format!("publishing an envelope of type {head:?}…")
    })
}

thread_local! {
    /// Reused to look a topic up without allocating.
    static TOPIC_KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

thread_local! {
    /// The route of this thread's last in-process dispatch (a [`LocalRoute`]): a publishing
    /// loop mostly repeats its topic, and a remembered route skips the map's lock and hash.
    static LOCAL_ROUTE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// A remembered lookup of the listener map: good while the map's version has not moved.
/// Weak handles, so it keeps neither the listeners nor the target alive; the target's
/// allocation stays reserved, so its address names it.
struct LocalRoute<P> {
    shared: Weak<Shared<P>>,
    version: u64,
    topic: Topic,
    listeners: Weak<[Listener<P>]>,
}

/// What an in-process dispatch has left to deliver, from a full `Block` queue on. Dropped
/// before it is done (the dispatch was cancelled), it delivers the rest without waiting: the
/// full queue counts the event as lagged (its readers hear of it), and the listeners after it
/// still get the event.
struct Undelivered<P> {
    shared: Arc<Shared<P>>,
    listeners: Arc<[Listener<P>]>,
    from: usize,
    event: Option<Arc<Envelope<P>>>,
    /// The waker the full queue at `from` keeps for this dispatch, to take back if it is
    /// cancelled (else a queue whose reader is stuck would keep one per cancelled dispatch,
    /// each holding its task's memory, until the reader reads).
    waiting: Option<Waker>,
}

impl<P> Undelivered<P> {
    fn poll_deliver(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(event) = self.event.take() else {
            return Poll::Ready(());
        };
        match self
            .shared
            .deliver_from(&self.listeners, event, self.from, Some(cx))
        {
            Ok(()) => Poll::Ready(()),
            Err((blocked, back)) => {
                self.from = blocked;
                self.event = Some(back);
                if !self
                    .waiting
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    // Polled with another waker (the future moved to another task): the
                    // queue keeps both; the old one is taken back.
                    if let (Some(old), Some(Listener::Queue { queue })) =
                        (self.waiting.take(), self.listeners.get(blocked))
                    {
                        if queue.forget_producer(&old) {
                            old.wake();
                        }
                    }
                    self.waiting = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl<P> Drop for Undelivered<P> {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            if let (Some(waker), Some(Listener::Queue { queue })) =
                (self.waiting.take(), self.listeners.get(self.from))
            {
                // Another dispatch of the same task may wait on this queue with the same
                // waker: it is woken to register again.
                if queue.forget_producer(&waker) {
                    waker.wake();
                }
            }
            let _ = self
                .shared
                .deliver_from(&self.listeners, event, self.from, None);
        }
    }
}

thread_local! {
    // The topic this thread published to last: a publisher loop mostly repeats its topics, and
    // reusing the `Arc` saves an allocation per publish.
    static LAST_TOPIC: RefCell<Option<Topic>> = const { RefCell::new(None) };
}

/// `envelope`'s topic, reusing this thread's last one when it is the same. (The thread-local
/// caches here are skipped when they are gone: a publish from another thread-local's `Drop`,
/// as the thread ends.)
fn topic_of<P>(envelope: &Envelope<P>) -> Topic {
    LAST_TOPIC
        .try_with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some(topic) if envelope.has_topic(topic) => topic.clone(),
                _ => {
                    let topic = envelope.topic();
                    *last = Some(topic.clone());
                    topic
                }
            }
        })
        .unwrap_or_else(|_| envelope.topic())
}

impl EventTarget {
    /// A builder, to set queue sizes and timeouts; it builds targets of any payload type
    /// (`EventTarget::builder().local::<MyPayload>()`).
    pub fn builder() -> Builder {
        Builder::new()
    }
}

impl<P: Send + Sync + 'static> EventTarget<P> {
    /// An in-process event target: what it dispatches reaches its own listeners, in every task
    /// and thread that holds a handle. Envelopes are never serialized.
    ///
    /// Name the payload type where nothing else fixes it (a side that only subscribes, say):
    /// Rust does not fall back to the default `serde_json::Value` in an expression.
    ///
    /// ```
    /// use alkdev_pubsub::EventTarget;
    ///
    /// let events: EventTarget = EventTarget::local(); // payloads are `serde_json::Value`
    /// # drop(events);
    /// ```
    pub fn local() -> Self {
        Builder::new().local()
    }

    /// An event target over `transport`, with default settings.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: the driver task is spawned on the current one. The runtime needs
    /// its timer (`enable_time`, which `enable_all` and `#[tokio::main]` include): the driver
    /// uses it under bursts and at close, and without it the target stops with an error.
    #[track_caller]
    pub fn new<T>(transport: T) -> Self
    where
        T: Transport<Envelope<P>> + Send + 'static,
    {
        Builder::new().build(transport)
    }

    fn shared(&self) -> &Arc<Shared<P>> {
        &self.handle.shared
    }

    /// Calls `callback` with every event on `topic`, until removed.
    ///
    /// Over a transport, callbacks run where inbound messages are routed, one message at a
    /// time, in arrival order: on the driver task, or on the task of a [`Subscription`] of
    /// this target that found its queue empty and routed what was ready; in-process, on the
    /// dispatching task. A callback must not block: it would hold up every other listener of
    /// the target, and the task it runs on. A panic in it is caught, counted in
    /// [`Stats::callback_panics`] and traced; the callback stays registered and the other
    /// listeners still get the event.
    ///
    /// The first listener of a topic subscribes on the transport. The subscription may not be
    /// in effect yet when this returns; [`subscribe`](Self::subscribe) waits for it. If the
    /// transport drops the topic for good later (its server refuses it when it is subscribed
    /// again after a reconnect), the error is logged, the topic's [`Subscription`]s end, and a
    /// callback stays registered but hears nothing until a listener is added to the topic
    /// again, which subscribes it again. The same holds when the transport refuses the
    /// topic's first subscribe (an ACL, say): this has returned `Ok` by then, and only a
    /// [`subscribe`](Self::subscribe) waiting on the topic gets the refusal.
    ///
    /// The target holds its callbacks: a callback that holds an [`EventTarget`] of its own
    /// target keeps it open after every other handle is dropped (until
    /// [`close`](Self::close)). To publish from a callback, give it a
    /// [`WeakEventTarget`] ([`downgrade`](Self::downgrade)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::TooLarge`] for a topic over
    /// [`MAX_TOPIC_LEN`](crate::layers::MAX_TOPIC_LEN) bytes; [`ErrorKind::Closed`] once the
    /// target is closed or stopped (its `source()` says why it stopped).
    pub fn add_event_listener<F>(&self, topic: impl Into<Topic>, callback: F) -> Result<ListenerId>
    where
        F: Fn(&Arc<Envelope<P>>) + Send + Sync + 'static,
    {
        let id = self.shared().next_id();
        let listener = Listener::Callback {
            id,
            callback: Arc::new(Registered::new(callback)),
        };
        self.shared()
            .add_listener(topic.into(), listener, None, false)?;
        Ok(id)
    }

    /// Calls `callback` with every gap notice that concerns the whole target: today
    /// [`Gap::Reconnected`](crate::Gap::Reconnected), when the transport rebuilt its
    /// connection (events published meanwhile may be missing). Subscriptions get it in their
    /// stream; callback listeners learn of it here. Runs where inbound messages are routed
    /// (see [`add_event_listener`](Self::add_event_listener)); must not block.
    ///
    /// The target holds the callback until it is removed or the target closes (a callback
    /// added to a closed target is dropped at once, never called). As with event listeners, a
    /// callback that holds an [`EventTarget`] of its own target keeps it open after every other
    /// handle is dropped (until [`close`](Self::close)): give it a [`WeakEventTarget`] instead.
    pub fn add_gap_listener<F>(&self, callback: F) -> ListenerId
    where
        F: Fn(crate::Gap) + Send + Sync + 'static,
    {
        self.shared().add_gap_listener(Arc::new(callback))
    }

    /// Removes a listener added by [`add_gap_listener`](Self::add_gap_listener).
    pub fn remove_gap_listener(&self, id: ListenerId) -> bool {
        self.shared().remove_gap_listener(id)
    }

    /// Removes a listener added by [`add_event_listener`](Self::add_event_listener) (or, given
    /// a [`Subscription::id`], that subscription, whose stream then ends). The last listener of
    /// a topic to leave unsubscribes on the transport. Returns whether it was there.
    ///
    /// A dispatch already under way when this returned `true` (one waiting for room in a full
    /// [`Overflow::Block`](crate::Overflow::Block) subscription of the topic, say) skips the
    /// callback, as a DOM `EventTarget` skips a listener removed during a dispatch. A call
    /// another thread is making, or starting, at that very moment may still run.
    pub fn remove_event_listener(&self, topic: &str, id: ListenerId) -> bool {
        self.shared().remove_listener(topic, id)
    }

    /// Subscribes to `topic` with the default queue settings. Resolves once the transport has
    /// confirmed the subscription: nothing published after that is missed. Made during an
    /// outage a reconnect layer rides out, it resolves once the layer has connected again
    /// (for as long as its [`Backoff`](crate::layers::Backoff) tries: for ever by default;
    /// bound it with a timeout), and the subscription's first item may then be the
    /// reconnect's [`Gap::Reconnected`](crate::Gap::Reconnected).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::TooLarge`] for a topic over
    /// [`MAX_TOPIC_LEN`](crate::layers::MAX_TOPIC_LEN) bytes; the transport's refusal of the
    /// subscribe ([`ErrorKind::Rejected`] for a Redis `NOPERM`, say); [`ErrorKind::Closed`]
    /// when the target is closed or stops before the subscription is confirmed.
    ///
    /// # Cancellation safety
    ///
    /// Cancelling the future leaves the topic as if the subscription had been dropped.
    pub async fn subscribe(&self, topic: impl Into<Topic>) -> Result<Subscription<P>> {
        self.subscribe_with(topic, self.handle.options).await
    }

    /// Subscribes to `topic` with its own queue capacity and overflow policy. Errors and
    /// cancellation: as [`subscribe`](Self::subscribe).
    pub async fn subscribe_with(
        &self,
        topic: impl Into<Topic>,
        options: SubscribeOptions,
    ) -> Result<Subscription<P>> {
        let topic = topic.into();
        let id = self.shared().next_id();
        let listener = Listener::Queue {
            queue: Arc::new(Queue::new(
                options.get_capacity(),
                options.get_overflow(),
                id,
            )),
        };
        let (added, queue) = self
            .shared()
            .add_listener(topic.clone(), listener, Some(id), true)?;
        let queue = queue.expect("a queue listener has a queue to read");
        // From here, dropping the subscription (also by cancellation) removes the listener.
        let subscription = Subscription::new(
            queue,
            topic,
            id,
            Arc::clone(self.shared()),
            self.handle.direct.clone(),
        );
        if let Added::Pending(confirmed) = added {
            match confirmed.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    return Err(self
                        .shared()
                        .closed_error(&format!("subscribing to {:?}", subscription.topic())))
                }
            }
        }
        Ok(subscription)
    }

    /// Publishes `envelope` on its topic, `"{type}:{id}"`.
    ///
    /// Over a transport, this resolves once the transport has taken the envelope, or once the
    /// envelope is in the driver's bounded queue (waiting for room when it is full). The
    /// transport takes it from this task when this task runs on the runtime the target was
    /// built on and the driver is not using the transport at that moment (what was queued
    /// before is fed first, so the order holds); otherwise the driver takes it from the queue.
    /// Either way a loop of awaited dispatches is pipelined: what was fed is flushed once per
    /// batch, not once per envelope (a lone envelope is flushed at once). A transport that
    /// refuses the envelope as this task feeds it (the reconnect layer past its buffer during
    /// an outage, with [`ErrorKind::Unavailable`]) makes this return that error; a failure
    /// after that, or of an envelope the driver fed from its queue, is counted in
    /// [`Stats::publish_failed`] and traced. Behind the reconnect layer, the publish waits in
    /// its buffer through an outage. To learn the outcome, use
    /// [`dispatch_confirmed`](Self::dispatch_confirmed).
    ///
    /// In-process, the envelope is delivered to the topic's listeners before this resolves.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::TooLarge`] for a topic over
    /// [`MAX_TOPIC_LEN`](crate::layers::MAX_TOPIC_LEN) bytes; [`ErrorKind::Closed`] once the
    /// target is closed or stopped (its `source()` says why it stopped), also when this
    /// publish is what found the transport's connection gone; the transport's other
    /// refusals of the envelope as this task fed it ([`ErrorKind::Unavailable`] from the
    /// reconnect layer during an outage, [`ErrorKind::TooLarge`] for a message over a
    /// transport's size limit, [`ErrorKind::Encode`] for a payload the codec cannot encode).
    ///
    /// # Cancellation safety
    ///
    /// Through a transport: cancelled before it resolves, the envelope was neither fed nor
    /// queued. In-process, where only a full [`Overflow::Block`](crate::Overflow::Block)
    /// subscription makes it wait: cancelled there, the envelope is delivered to the listeners
    /// left without waiting, and that subscription counts it as lagged (its reader gets a
    /// [`Gap::Lagged`](crate::Gap::Lagged)).
    pub async fn dispatch_event(&self, envelope: Envelope<P>) -> Result<()> {
        check_envelope(&envelope)?;
        match &self.handle.publish {
            None => self.dispatch_local(envelope).await,
            Some(publish) => {
                if self.shared().is_closed() {
                    return Err(self.closed_error_for(&envelope));
                }
                let outgoing = Outgoing {
                    topic: topic_of(&envelope),
                    envelope,
                    ack: None,
                };
                // Fed here, this waits on nothing: it spends the task's cooperative budget, and
                // yields first when that is spent, so a publishing loop lets other tasks run
                // (and a cancelled yield has fed nothing).
                let mut outgoing = Some(outgoing);
                let direct = poll_fn(|cx| {
                    let budget = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                    let offered = outgoing.take().expect("polled once more after Ready");
                    let fed = self.try_direct(offered);
                    if matches!(fed, Fed::Yes) {
                        budget.made_progress();
                    }
                    Poll::Ready(fed)
                });
                let outgoing = match direct.await {
                    Fed::Yes => return Ok(()),
                    Fed::No(outgoing) => outgoing,
                    Fed::Refused(error) | Fed::Panicked(error) => return Err(error),
                };
                publish
                    .send(outgoing)
                    .await
                    .map_err(|rejected| self.closed_error_for(&rejected.0.envelope))
            }
        }
    }

    /// Like [`dispatch_event`](Self::dispatch_event), without waiting: when the driver's
    /// queue is full, fails at once with an error of kind [`ErrorKind::Unavailable`] that says
    /// so. In-process, a full `Block` subscription drops the event (counted as lagged), for
    /// every subscription sharing its queue.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`] when the driver's queue is full; otherwise as
    /// [`dispatch_event`](Self::dispatch_event): [`ErrorKind::TooLarge`] for a topic over
    /// [`MAX_TOPIC_LEN`](crate::layers::MAX_TOPIC_LEN) bytes, [`ErrorKind::Closed`] once the
    /// target is closed or stopped, and the transport's refusals of the envelope when this call
    /// fed it itself.
    pub fn try_dispatch_event(&self, envelope: Envelope<P>) -> Result<()> {
        check_envelope(&envelope)?;
        match &self.handle.publish {
            None => {
                if self.shared().is_closed() {
                    return Err(self.closed_error_for(&envelope));
                }
                self.deliver_local(envelope, false);
                Ok(())
            }
            Some(publish) => {
                if self.shared().is_closed() {
                    return Err(self.closed_error_for(&envelope));
                }
                let outgoing = Outgoing {
                    topic: topic_of(&envelope),
                    envelope,
                    ack: None,
                };
                let outgoing = match self.try_direct(outgoing) {
                    Fed::Yes => return Ok(()),
                    Fed::No(outgoing) => outgoing,
                    Fed::Refused(error) | Fed::Panicked(error) => return Err(error),
                };
                publish.try_send(outgoing).map_err(|error| match error {
                    mpsc::error::TrySendError::Full(rejected) => {
                        self.shared().counters.publish_failed.fetch_add(1, Relaxed);
                        Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "publishing to {}: the event target's queue is full ({} envelopes wait for the transport)",
                                rejected.topic,
                                publish.max_capacity()
                            ),
                        )
                    }
                    mpsc::error::TrySendError::Closed(rejected) => {
                        self.closed_error_for(&rejected.envelope)
                    }
                })
            }
        }
    }

    /// Publishes `envelope` and waits until the transport has flushed it (for Redis: until the
    /// server acknowledged it), returning the transport's error if it failed.
    ///
    /// Among publishes that never pause, this is answered all the same: once 4,096 publishes
    /// were fed since the last completed flush, the next ones wait for that flush (which a
    /// transport answered asynchronously, as Redis is, would otherwise complete only once the
    /// publishers paused), for up to 100 ms: a flush slower than that (a slow peer, an outage
    /// the reconnect layer buffers through) lets another 4,096 go, and is waited for again.
    ///
    /// In-process, the same as [`dispatch_event`](Self::dispatch_event).
    ///
    /// # Errors
    ///
    /// Those of [`dispatch_event`](Self::dispatch_event), and the transport's failure to
    /// send or flush it (or one of the publishes the same flush covered): a connection error,
    /// a [`Timeout`](ErrorKind::Timeout), a Redis refusal ([`Busy`](ErrorKind::Busy) for
    /// `BUSY`, `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `MOVED` and the like behind no
    /// [retry layer](crate::layers::retry), [`Unavailable`](ErrorKind::Unavailable) once a
    /// retry layer gave up, [`Rejected`](ErrorKind::Rejected) otherwise).
    ///
    /// # Cancellation safety
    ///
    /// Cancelled before the envelope is queued, nothing is published; cancelled after that
    /// (while it waits for the flush), the envelope is still published: only its outcome is
    /// no longer reported to this call.
    pub async fn dispatch_confirmed(&self, envelope: Envelope<P>) -> Result<()> {
        check_envelope(&envelope)?;
        let Some(publish) = &self.handle.publish else {
            return self.dispatch_local(envelope).await;
        };
        if self.shared().is_closed() {
            return Err(self.closed_error_for(&envelope));
        }
        let topic = topic_of(&envelope);
        let (ack, acked) = oneshot::channel();
        let outgoing = Outgoing {
            topic: topic.clone(),
            envelope,
            ack: Some(ack),
        };
        publish
            .send(outgoing)
            .await
            .map_err(|rejected| self.closed_error_for(&rejected.0.envelope))?;
        acked.await.unwrap_or_else(|_| {
            Err(self
                .shared()
                .closed_error(&format!("publishing to {topic}")))
        })
    }

    /// Feeds `outgoing` to the transport from this task when nothing is queued before it and
    /// the driver is not using the transport; otherwise hands it back for the queue. This
    /// saves the hand-off to the driver task on the common path; the driver still flushes.
    fn try_direct(&self, outgoing: Outgoing<P>) -> Fed<P> {
        match self.handle.direct.as_ref().and_then(Weak::upgrade) {
            Some(direct) => direct.try_publish(outgoing),
            None => Fed::No(outgoing),
        }
    }

    fn closed_error_for(&self, envelope: &Envelope<P>) -> Error {
        self.shared().closed_error(&format!(
            "publishing to {}:{}",
            envelope.r#type, envelope.id
        ))
    }

    async fn dispatch_local(&self, envelope: Envelope<P>) -> Result<()> {
        if self.shared().is_closed() {
            return Err(self.closed_error_for(&envelope));
        }
        let Some((listeners, event)) = self.deliver_local(envelope, true) else {
            return Ok(());
        };
        // A `Block` subscription is full: wait for room, then go on with the rest.
        let mut rest = Undelivered {
            shared: Arc::clone(self.shared()),
            listeners,
            from: 0,
            event: Some(event),
            waiting: None,
        };
        poll_fn(|cx| rest.poll_deliver(cx)).await;
        Ok(())
    }

    /// Delivers in-process. With `may_block`, returns what is left for a full `Block` queue.
    #[allow(clippy::type_complexity)]
    fn deliver_local(
        &self,
        envelope: Envelope<P>,
        may_block: bool,
    ) -> Option<(Arc<[Listener<P>]>, Arc<Envelope<P>>)> {
        let shared = self.shared();
        shared.counters.published.fetch_add(1, Relaxed);
        let version = shared.version();
        let remembered = LOCAL_ROUTE
            .try_with(|route| {
                let route = route.try_borrow().ok()?;
                let route = route.as_ref()?.downcast_ref::<LocalRoute<P>>()?;
                if route.version == version
                    && std::ptr::eq(route.shared.as_ptr(), Arc::as_ptr(shared))
                    && envelope.has_topic(&route.topic)
                {
                    route.listeners.upgrade()
                } else {
                    None
                }
            })
            .ok()
            .flatten();
        let listeners = remembered.or_else(|| {
            let (version, found) = TOPIC_KEY
                .try_with(|key| {
                    let mut key = key.borrow_mut();
                    key.clear();
                    key.push_str(&envelope.r#type);
                    key.push(':');
                    key.push_str(&envelope.id);
                    shared.listeners_of(&key)
                })
                .unwrap_or_else(|_| shared.listeners_of(&envelope.topic()));
            let (topic, listeners) = found?;
            let _ = LOCAL_ROUTE.try_with(|route| {
                if let Ok(mut route) = route.try_borrow_mut() {
                    *route = Some(Box::new(LocalRoute {
                        shared: Arc::downgrade(shared),
                        version,
                        topic,
                        listeners: Arc::downgrade(&listeners),
                    }));
                }
            });
            Some(listeners)
        });
        let Some(listeners) = listeners else {
            shared.counters.unrouted.fetch_add(1, Relaxed);
            return None;
        };
        let event = Arc::new(envelope);
        if !may_block {
            let _ = shared.deliver_from(&listeners, event, 0, None);
            return None;
        }
        // A first pass without a waker: only a full `Block` queue needs the slow path.
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match shared.deliver_from(&listeners, event, 0, Some(&mut cx)) {
            Ok(()) => None,
            Err((from, event)) => {
                let rest: Arc<[Listener<P>]> = listeners[from..].iter().cloned().collect();
                Some((rest, event))
            }
        }
    }

    /// A handle that does not keep the target open, for what the target itself holds (a
    /// callback that answers events by publishing, for one).
    ///
    /// ```
    /// use alkdev_pubsub::{Envelope, EventTarget};
    /// use serde_json::json;
    ///
    /// let events = EventTarget::local();
    /// let weak = events.downgrade();
    /// events.add_event_listener("ping:1", move |_| {
    ///     if let Some(events) = weak.upgrade() {
    ///         let _ = events.try_dispatch_event(Envelope::new("pong", "1", json!({})));
    ///     }
    /// })?;
    /// // Dropping `events` closes the target: the callback does not keep it open.
    /// let watcher = events.downgrade();
    /// drop(events);
    /// assert!(watcher.upgrade().is_none());
    /// # Ok::<(), alkdev_pubsub::Error>(())
    /// ```
    pub fn downgrade(&self) -> WeakEventTarget<P> {
        WeakEventTarget {
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// Closes the target and drains it: publishes already queued are sent and flushed, every
    /// topic is unsubscribed, and every subscription ends once it has yielded what it had
    /// queued. Later calls fail with an error of kind [`ErrorKind::Closed`]. Closing twice is
    /// harmless. A transport that has not taken and flushed every queued publish by the close
    /// timeout ([`Builder::close_timeout`]) is given up on (a reconnect layer in an outage
    /// holds what it took until it connects again): the publishes left count in
    /// [`Stats::publish_failed`].
    pub async fn close(&self) {
        match self.shared().control() {
            None => {
                self.shared().end_all(None);
            }
            Some(control) => {
                let (done, closed) = oneshot::channel();
                if control.send(Control::Close { done }).is_ok() {
                    // An error means the driver is gone: nothing left to wait for.
                    let _ = closed.await;
                }
            }
        }
    }

    /// Whether the target is closed (by [`close`](Self::close), or because its transport
    /// failed for good).
    pub fn is_closed(&self) -> bool {
        self.shared().is_closed()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.shared().counters.snapshot()
    }

    /// How many topics have at least one listener.
    pub fn topic_count(&self) -> usize {
        self.shared().topic_count()
    }

    /// How many listeners `topic` has.
    pub fn listener_count(&self, topic: &str) -> usize {
        self.shared().listener_count(topic)
    }
}

/// Settings of an [`EventTarget`].
///
/// ```
/// use alkdev_pubsub::{EventTarget, Overflow, SubscribeOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let events: EventTarget = EventTarget::builder()
///     .subscribe_options(SubscribeOptions::new().capacity(256).overflow(Overflow::DropNewest))
///     .local();
/// let subscription = events.subscribe("session.status:p1").await?;
/// assert_eq!(subscription.capacity(), 256);
/// assert_eq!(subscription.overflow(), Overflow::DropNewest);
/// # Ok(())
/// # }
/// ```
///
/// Targets of another payload type: `EventTarget::builder().local::<MyPayload>()`, or
/// `.build::<MyPayload, _>(transport)`.
#[derive(Clone, Debug)]
pub struct Builder {
    publish_capacity: usize,
    options: SubscribeOptions,
    close_timeout: Duration,
    flush_each_publish: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            publish_capacity: DEFAULT_PUBLISH_CAPACITY,
            options: SubscribeOptions::default(),
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            flush_each_publish: false,
        }
    }
}

impl Builder {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many envelopes may wait for the driver ([`DEFAULT_PUBLISH_CAPACITY`]); a dispatch
    /// waits for room beyond that. At least 1, and at most `usize::MAX >> 3` (Tokio's
    /// channel limit, [`tokio::sync::Semaphore::MAX_PERMITS`]): a larger value is taken as
    /// that, rather than panic.
    #[must_use]
    pub fn publish_capacity(mut self, capacity: usize) -> Self {
        self.publish_capacity = capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// The queue settings of subscriptions made with [`EventTarget::subscribe`].
    #[must_use]
    pub fn subscribe_options(mut self, options: SubscribeOptions) -> Self {
        self.options = options;
        self
    }

    /// How long a close waits for the transport ([`DEFAULT_CLOSE_TIMEOUT`]).
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Whether a publishing task that feeds the transport itself also flushes it after each
    /// publish (default: `false`).
    ///
    /// By default a publish that follows the previous one closely is left for the driver
    /// task to flush, once for the whole burst: over a socket, a flush is a system call. For a
    /// transport whose flush costs nothing, such as [`WorkerTransport`](crate::worker::WorkerTransport)
    /// (what is sent is readable at once), that only wakes the driver task for nothing: set
    /// this, and a publisher flushes as it goes ([`worker::spawn`](crate::worker::spawn)
    /// and [`WorkerTransport::into_event_target`](crate::worker::WorkerTransport::into_event_target)
    /// do). A flush that cannot complete at once is still left to the driver. No effect on
    /// [`local`](Self::local) targets, which have no transport.
    #[must_use]
    pub fn flush_each_publish(mut self, yes: bool) -> Self {
        self.flush_each_publish = yes;
        self
    }

    /// An in-process event target.
    pub fn local<P: Send + Sync + 'static>(self) -> EventTarget<P> {
        EventTarget {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared::new(None)),
                publish: None,
                direct: None,
                options: self.options,
            }),
        }
    }

    /// An event target over `transport`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: the driver task is spawned on the current one. The runtime needs
    /// its timer (`enable_time`, which `enable_all` and `#[tokio::main]` include): the driver
    /// uses it under bursts and at close, and without it the target stops with an error.
    #[track_caller]
    pub fn build<P, T>(self, transport: T) -> EventTarget<P>
    where
        P: Send + Sync + 'static,
        T: Transport<Envelope<P>> + Send + 'static,
    {
        // Before the driver exists: dropped unspawned, it would log that the target stopped.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            panic!(
                "an EventTarget over a transport must be built on a Tokio runtime (it spawns its driver task there)"
            )
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (publish_tx, publish_rx) = mpsc::channel(self.publish_capacity);
        let shared = Arc::new(Shared::new(Some(control_tx)));
        let (driver, direct) = Driver::new(
            transport,
            Arc::clone(&shared),
            control_rx,
            publish_rx,
            self.close_timeout,
            self.flush_each_publish,
        );
        runtime.spawn(driver);
        EventTarget {
            handle: Arc::new(Handle {
                shared,
                publish: Some(publish_tx),
                direct: Some(direct),
                options: self.options,
            }),
        }
    }
}
