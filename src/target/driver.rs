//! The task that owns a transport: it feeds commands down and routes what comes up.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;

use super::shared::{Control, Listener, Shared};
use crate::layers::{Command, Envelope, Error, ErrorKind, Result, Topic, Transport, Up};
use crate::queue::{Queue, Slot};
use crate::ListenerId;

/// How many commands, or inbound items, one poll handles before yielding to other tasks.
const BUDGET: usize = 256;

/// How many inbound items a subscription routes at most when it reads the transport itself
/// (see [`Core::try_pull`]), before it yields them: few, so that what it frees once it has
/// read an event is what decoding the next one allocates. Routing 32 ahead of the reader, the
/// allocator's per-thread caches overflowed: glibc's hold 7 blocks of a size, and an event
/// decodes into 4 blocks or more. With 3, `perf` found its slow paths (`_int_malloc`,
/// `_int_free`) at about half the samples for the WebSocket receiving side; see BENCHMARKS.md.
const PULL_BUDGET: usize = 3;

/// How long a subscription reads the transport for the driver (see [`Lease`]) before the
/// driver checks that it keeps up: this long, up to twice this at the timer's resolution.
const LEASE: Duration = Duration::from_millis(1);

/// How many inbound items the driver routes itself before it hands the rest to a waiting
/// subscription (see [`Lease`]).
const HAND_OFF_AFTER: usize = 8;

/// A lease holder that pulled this often during its lease read at least a driver's budget: it
/// keeps up, and gets a new lease (see [`Lease`]).
const KEEPS_UP: u64 = (BUDGET / PULL_BUDGET) as u64;

/// A direct publish this long after the previous one (that found nothing to flush) is taken for
/// a lone message, and flushed by the publishing task at once.
const LONE_PUBLISH: Duration = Duration::from_micros(50);

/// The same, when the last flush carried a single publish (publishes come one at a time, as in
/// a request and its reply): past this, the driver would flush it alone too, a hand-off later.
/// A burst's publishes come a microsecond or so apart (more in a debug build).
const LONE_AFTER_LONE: Duration = Duration::from_micros(20);

/// How many publishes are fed while a flush is pending, at most, before feeding waits for it
/// (up to [`WINDOW_WAIT`]). A transport that is acknowledged asynchronously (Redis pipelines)
/// completes a flush once everything fed is acknowledged: fed without a pause, it would not
/// complete until the publisher paused. Confirmed dispatches would wait for that pause, and
/// what layers keep until a flush completes (the reconnect and retry layers keep every
/// unflushed publish, to send it again) would grow with the stream.
const FLUSH_WINDOW: u32 = 4096;

/// How long feeding waits for a flush when the window is full. A flush that takes longer is
/// not held up by the stream (an outage the reconnect layer buffers through, whose bounded
/// buffer then refuses publishes at once, or a peer that slow): another window's worth is fed.
const WINDOW_WAIT: Duration = Duration::from_millis(100);

/// How many `poll_ready` calls in a row may fail (with errors that are not fatal) before the
/// transport is taken for broken. Such an error reports an earlier failure, once (a pipeline
/// refused): a transport failing every call would otherwise keep the driver polling it, a core
/// busy for ever and nothing sent.
const READY_FAILURES_MAX: u32 = 64;

/// A publish waiting in the driver's queue.
pub(crate) struct Outgoing<P> {
    pub(crate) topic: Topic,
    pub(crate) envelope: Envelope<P>,
    /// Set by a confirmed dispatch: answered once the transport flushed the publish.
    pub(crate) ack: Option<oneshot::Sender<Result<()>>>,
}

enum Queued<P> {
    Publish(Outgoing<P>),
    Subscribe { topic: Topic, generation: u64 },
    Unsubscribe(Topic),
}

/// An inbound event waiting for room in a `Block` subscription.
struct Stalled<P> {
    listeners: Arc<[Listener<P>]>,
    event: Arc<Envelope<P>>,
    from: usize,
}

enum Phase {
    Running,
    /// Sending what the handles queued before the close.
    DrainingPublishes,
    /// Unsubscribed from every topic; delivering what comes up until each is confirmed.
    Unsubscribing {
        /// The topics whose unsubscribe is not answered yet.
        awaiting: HashSet<Topic>,
        /// The topics the close unsubscribed (a topic whose listeners left after it listed
        /// them is unsubscribed on its own).
        listed: HashSet<Topic>,
    },
    /// Closing the transport.
    Closing,
    Finished,
}

/// The last topic the driver routed: the listener map's version then, the topic, and its
/// listeners (weak: a removed listener, its queue or its callback's captures, is not kept
/// alive here; the map holds the listeners while they are current).
struct Route<P> {
    version: u64,
    topic: Topic,
    listeners: Weak<[Listener<P>]>,
}

/// Reading the transport, left to a subscription.
///
/// Under a burst, decoding events on one thread and freeing them on another is what a driver
/// task costs most over reading the transport in the subscriber's task: the allocator's
/// per-thread caches miss, and a third thread competes for the cores. So when the driver is
/// woken, routes a few items ([`HAND_OFF_AFTER`]) and finds more, and a subscription waits for
/// the transport ([`Core::puller`]), the driver wakes that subscription and leaves the rest to
/// it: the subscription routes it ([`Core::try_pull`]), for every listener, exactly as the
/// driver would, and goes on reading while there is more (a subscription whose queue runs dry
/// takes the lease the same way). A lease lasts a millisecond or two ([`LEASE`]): then the
/// driver checks on its holder. A holder that read at least a driver's budget during it
/// ([`KEEPS_UP`] pulls) keeps up, and the lease is renewed; one that stopped reading (it was
/// dropped, or its task awaits something else) or reads slowly loses it, and gets one again
/// only when its queue runs dry. So such a holder holds the other listeners up for a
/// millisecond or two at a time. One event at a time, the driver routes it: handing it over
/// would cost a wake-up more.
/// Whether it is held, and by whom, is [`Shared::lease_holder`] (the holder reads it without
/// the lock).
#[derive(Default)]
struct Lease {
    /// The number of pulls when it started, or was last renewed.
    started: u64,
    /// Pulls so far ([`Core::try_pull`]).
    pulls: u64,
    /// The end of the lease, armed when one starts.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// The subscription that routes what the transport has ready ([`Core::try_pull`]): while it
/// is the only reader of its queue and nothing waits there for it, an event for that queue
/// alone goes straight into its `batch` ([`Queue::hand_over`]), not in and out of the queue.
struct Taker<'a, P> {
    queue: &'a Arc<Queue<P>>,
    id: ListenerId,
    batch: &'a mut VecDeque<Slot<P>>,
}

/// A subscription waiting for the transport (see [`Lease`]): its queue and id, to check that
/// it still waits, and its task's waker.
struct Puller<P> {
    queue: Weak<Queue<P>>,
    id: ListenerId,
    waker: Waker,
}

impl<P> Puller<P> {
    /// Whether it still waits for the transport: it has yielded everything, and is still its
    /// queue's reader.
    fn waits(&self) -> bool {
        self.queue
            .upgrade()
            .is_some_and(|queue| queue.waits(self.id))
    }
}

/// Everything the driver owns. It sits behind a mutex so that, when the driver is not using
/// the transport, a publishing task can feed it ([`Core::try_publish`]) and a subscription with
/// an empty queue can route what it has ready ([`Core::try_pull`]); the driver task does all
/// the rest (flushes, control, close), and what those two leave pending wakes it.
pub(crate) struct Core<T, P> {
    transport: Pin<Box<T>>,
    shared: Arc<Shared<P>>,
    control: mpsc::UnboundedReceiver<Control>,
    publishes: mpsc::Receiver<Outgoing<P>>,
    batch: Vec<Outgoing<P>>,
    outbox: VecDeque<Queued<P>>,
    unflushed: bool,
    acks: Vec<oneshot::Sender<Result<()>>>,
    /// For each topic, the generations of the subscribe commands sent and not yet confirmed,
    /// oldest first: transports confirm in order.
    confirms: HashMap<Topic, VecDeque<u64>>,
    /// For each topic, how many unsubscribe commands were queued (or sent) and not yet
    /// answered: a close waits for the answer to its own, not for an earlier one's (counted
    /// from when it is queued: its topic stays awaited while it waits in the outbox).
    unanswered: HashMap<Topic, u32>,
    stalled: Option<Stalled<P>>,
    phase: Phase,
    close_waiters: Vec<oneshot::Sender<()>>,
    close_timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    key: String,
    route: Option<Route<P>>,
    /// `route`'s listeners, held during one call of [`Self::poll_inbound`] (and only then:
    /// `route` keeps them weakly), so that routing a run of events to one topic does not
    /// upgrade and drop the weak reference for each.
    held: Option<Arc<[Listener<P>]>>,
    /// The driver task's waker: direct publishes and pulls hand it to the transport, so
    /// whatever they leave pending (a flush, room in a buffer, the next inbound item) wakes
    /// the driver, never the publisher or the subscription.
    waker: Option<Waker>,
    /// A direct publish left data unflushed and woke the driver to flush it.
    flush_wanted: bool,
    /// A [`Control::Wake`] was taken: the driver must look at the lease again.
    wake_wanted: bool,
    /// When the last direct publish that found nothing waiting to be flushed was fed.
    last_direct: Instant,
    /// Publishes fed since the last completed flush.
    fed: u32,
    /// `fed` when the flush window last stood aside (see [`Core::window_full`]), else 0.
    window_from: u32,
    /// Armed while the flush window is full: how long feeding still waits for the flush.
    window_wait: Option<Pin<Box<Sleep>>>,
    /// The last flush carried exactly one publish.
    flushed_one: bool,
    /// A direct publish always flushes (see `Builder::flush_each_publish`).
    flush_each_publish: bool,
    /// A subscription that found the transport drained and its queue empty: woken to read
    /// the transport itself when the driver is next woken (see [`Lease`]).
    puller: Option<Puller<P>>,
    /// The puller the driver hands the transport to, woken once the driver lets go of this
    /// core (woken earlier, it would find the core locked).
    hand_to: Option<Waker>,
    lease: Lease,
    /// The transport's stream ended (during a close).
    inbound_ended: bool,
    /// `poll_ready` calls that failed in a row (see [`READY_FAILURES_MAX`]).
    ready_failures: u32,
    /// A queued publish is being fed: a panic there loses it (counted as failed).
    feeding_queued: bool,
    /// A direct publish is in the publishing task's hands, not fed yet: a panic loses it
    /// (once fed, it counts among `fed`, which the stop counts).
    own_in_hand: bool,
    /// The runtime the driver runs on. Transport calls may create runtime resources (a
    /// reconnect's connection or timer): only tasks on this runtime act for the driver.
    runtime: Option<tokio::runtime::Id>,
}

impl<T, P> Core<T, P>
where
    T: Transport<Envelope<P>>,
    P: Send + Sync + 'static,
{
    fn new(
        transport: T,
        shared: Arc<Shared<P>>,
        control: mpsc::UnboundedReceiver<Control>,
        publishes: mpsc::Receiver<Outgoing<P>>,
        close_timeout: Duration,
        flush_each_publish: bool,
    ) -> Self {
        Core {
            transport: Box::pin(transport),
            shared,
            control,
            publishes,
            batch: Vec::with_capacity(BUDGET),
            outbox: VecDeque::new(),
            unflushed: false,
            acks: Vec::new(),
            confirms: HashMap::new(),
            unanswered: HashMap::new(),
            stalled: None,
            phase: Phase::Running,
            close_waiters: Vec::new(),
            close_timeout,
            deadline: None,
            key: String::new(),
            route: None,
            held: None,
            waker: None,
            flush_wanted: false,
            wake_wanted: false,
            last_direct: Instant::now(),
            fed: 0,
            window_from: 0,
            window_wait: None,
            flushed_one: false,
            flush_each_publish,
            puller: None,
            hand_to: None,
            lease: Lease::default(),
            inbound_ended: false,
            ready_failures: 0,
            feeding_queued: false,
            own_in_hand: false,
            runtime: current_runtime(),
        }
    }

    fn running(&self) -> bool {
        matches!(self.phase, Phase::Running)
    }

    fn begin_close(&mut self, done: Option<oneshot::Sender<()>>) {
        self.close_waiters.extend(done);
        if !self.running() {
            return;
        }
        self.shared.mark_closed(None);
        self.publishes.close();
        self.phase = Phase::DrainingPublishes;
        self.deadline = Some(Box::pin(tokio::time::sleep(self.close_timeout)));
    }

    /// The transport's `poll_ready`. A fatal error ends the target; another one concerns what
    /// the transport did before (a pipeline it sent), not the command waiting: it is counted
    /// and traced, and the caller goes on, unless [`READY_FAILURES_MAX`] calls in a row failed,
    /// which ends the target too. `Err` once it is reported.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), ()>> {
        let error = match self.transport.as_mut().poll_ready(cx) {
            Poll::Ready(Err(error)) => error,
            ready => {
                self.ready_failures = 0;
                return ready.map(|_| Ok(()));
            }
        };
        self.ready_failures += 1;
        if error.is_fatal() {
            self.terminate(error);
        } else if self.ready_failures >= READY_FAILURES_MAX {
            let failures = self.ready_failures;
            self.terminate(Error::with_source(
                ErrorKind::Protocol,
                format!("the transport failed {failures} calls in a row to take a command (poll_ready), taken for broken; the last: {error}"),
                error,
            ));
        } else {
            self.shared.counters.publish_failed.fetch_add(1, Relaxed);
            tracing::warn!(%error, "the transport reported a failure");
        }
        Poll::Ready(Err(()))
    }

    /// Ends everything: the transport failed for good.
    fn terminate(&mut self, error: Error) {
        if matches!(self.phase, Phase::Finished) {
            return;
        }
        tracing::warn!(%error, "event target stopped: its transport failed");
        self.stop(error);
    }

    fn queue_unsubscribe(&mut self, topic: Topic) {
        *self.unanswered.entry(topic.clone()).or_default() += 1;
        self.outbox.push_back(Queued::Unsubscribe(topic));
    }

    /// One unsubscribe of `topic` will not be answered again (its answer came, or it failed
    /// unsent). The close's own is the last one queued, so its topic is done once none is left.
    fn answered_unsubscribe(&mut self, topic: Topic) {
        let left = self.unanswered.get_mut(&topic).map_or(0, |count| {
            *count = count.saturating_sub(1);
            *count
        });
        if left == 0 {
            self.unanswered.remove(&topic);
            if let Phase::Unsubscribing { awaiting, .. } = &mut self.phase {
                awaiting.remove(&topic);
            }
        }
    }

    fn handle_control(&mut self, control: Control) {
        match control {
            Control::Subscribe { topic, generation } if self.running() => self
                .outbox
                .push_back(Queued::Subscribe { topic, generation }),
            // While a close sends what was published before it, or unsubscribes the topics
            // listened to once that was done: a topic left before the close listed it is
            // unsubscribed on its own.
            Control::Unsubscribe { topic }
                if self.running()
                    || matches!(self.phase, Phase::DrainingPublishes)
                    || matches!(&self.phase, Phase::Unsubscribing { listed, .. } if !listed.contains(&topic)) =>
            {
                self.queue_unsubscribe(topic)
            }
            // A close is under way: it unsubscribes every topic itself.
            Control::Subscribe { .. } | Control::Unsubscribe { .. } => {}
            Control::Close { done } => self.begin_close(Some(done)),
            Control::Shutdown => self.begin_close(None),
            // The driver looks at the lease as it goes on; a publisher or a subscription that
            // took this while acting for it wakes it once the lent waker is back.
            Control::Wake => self.wake_wanted = true,
        }
    }

    /// Takes the handles' control messages (subscribes, unsubscribes, close). Also while the
    /// outbox waits for the transport: a close must start its deadline even then.
    fn take_control(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(control)) = self.control.poll_recv(cx) {
            self.handle_control(control);
        }
    }

    /// Takes more work from the handles into the outbox.
    fn fill_outbox(&mut self, cx: &mut Context<'_>) {
        self.take_control(cx);
        if !self.outbox.is_empty() {
            return;
        }
        match self.phase {
            Phase::Running | Phase::DrainingPublishes => {
                match self.publishes.poll_recv_many(cx, &mut self.batch, BUDGET) {
                    Poll::Ready(0) => {
                        // Closed and empty: only after a close (the handles hold a sender).
                        if matches!(self.phase, Phase::DrainingPublishes) {
                            let topics = self.shared.topics();
                            for topic in &topics {
                                self.queue_unsubscribe(topic.clone());
                            }
                            let listed: HashSet<Topic> = topics.into_iter().collect();
                            self.phase = Phase::Unsubscribing {
                                awaiting: listed.clone(),
                                listed,
                            };
                            // An unsubscribe sent since the last look, for a topic whose
                            // listeners left before the list was made (under the map's lock,
                            // so it is in the channel now): queued before the close can
                            // find nothing left to send.
                            self.take_control(cx);
                        }
                    }
                    Poll::Ready(_) => self
                        .outbox
                        .extend(self.batch.drain(..).map(Queued::Publish)),
                    Poll::Pending => {}
                }
            }
            _ => {}
        }
    }

    /// Feeds queued commands to the transport and flushes once. Returns whether the budget ran
    /// out (more work is waiting).
    fn poll_outgoing(&mut self, cx: &mut Context<'_>) -> bool {
        let mut budget = BUDGET;
        loop {
            if self.outbox.is_empty() {
                self.fill_outbox(cx);
                if self.outbox.is_empty() {
                    break;
                }
            }
            if budget == 0 {
                return true;
            }
            if matches!(self.outbox.front(), Some(Queued::Publish(_))) && self.window_full(cx) {
                // The flush's completion (or the window's wait running out) wakes the driver;
                // or the flush ended the target.
                return false;
            }
            match self.poll_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(())) if matches!(self.phase, Phase::Finished) => return false,
                Poll::Ready(Err(())) => {
                    budget = budget.saturating_sub(1);
                    if budget == 0 {
                        return true;
                    }
                    continue;
                }
                Poll::Ready(Ok(())) => {}
            }
            let queued = self.outbox.pop_front().expect("the outbox is not empty");
            budget -= 1;
            self.send(queued);
            if matches!(self.phase, Phase::Finished) {
                return false;
            }
        }
        self.poll_flush(cx);
        false
    }

    /// Whether publishes must not be fed now: [`FLUSH_WINDOW`] were fed since the last
    /// completed flush (or since the window last stood aside), and the flush of them is still
    /// pending (it is polled here), for less than [`WINDOW_WAIT`]; or that flush ended the
    /// target.
    fn window_full(&mut self, cx: &mut Context<'_>) -> bool {
        let open = |core: &Self| core.fed < core.window_from.saturating_add(FLUSH_WINDOW);
        if open(self) {
            return false;
        }
        self.poll_flush(cx);
        if matches!(self.phase, Phase::Finished) {
            return true;
        }
        if open(self) {
            return false;
        }
        let waited = self
            .window_wait
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WINDOW_WAIT)));
        if waited.as_mut().poll(cx).is_pending() {
            return true;
        }
        // The flush does not come soon: feed another window's worth.
        self.window_wait = None;
        self.window_from = self.fed;
        false
    }

    /// Flushes what was fed, if anything, and answers the confirmed publishes it covered.
    fn poll_flush(&mut self, cx: &mut Context<'_>) {
        if !self.unflushed {
            return;
        }
        let Poll::Ready(flushed) = self.transport.as_mut().poll_flush(cx) else {
            return;
        };
        if flushed.is_err() {
            // Whether the publishes it covered were delivered is not known: they count as
            // failed, as a confirmed dispatch among them is told.
            self.shared
                .counters
                .publish_failed
                .fetch_add(u64::from(self.fed), Relaxed);
        }
        self.unflushed = false;
        self.flushed_one = flushed.is_ok() && self.fed == 1;
        self.fed = 0;
        self.window_from = 0;
        self.window_wait = None;
        for ack in self.acks.drain(..) {
            let _ = ack.send(flushed.clone());
        }
        if let Err(error) = flushed {
            if error.is_fatal() {
                self.terminate(error);
            } else {
                tracing::warn!(%error, "flushing the transport failed");
            }
        }
    }

    fn send(&mut self, queued: Queued<P>) {
        let counters = &self.shared.counters;
        match queued {
            Queued::Publish(outgoing) => {
                // A refusal is answered and counted there.
                self.feeding_queued = true;
                let _ = self.feed(outgoing);
                self.feeding_queued = false;
            }
            Queued::Subscribe { topic, generation } => {
                match self
                    .transport
                    .as_mut()
                    .start_send(Command::Subscribe(topic.clone()))
                {
                    Ok(()) => {
                        counters.subscribes.fetch_add(1, Relaxed);
                        self.unflushed = true;
                        self.confirms
                            .entry(topic)
                            .or_default()
                            .push_back(generation);
                    }
                    Err(error) => self.fail(Queued::Subscribe { topic, generation }, error),
                }
            }
            Queued::Unsubscribe(topic) => {
                match self
                    .transport
                    .as_mut()
                    .start_send(Command::Unsubscribe(topic.clone()))
                {
                    Ok(()) => {
                        counters.unsubscribes.fetch_add(1, Relaxed);
                        self.unflushed = true;
                    }
                    Err(error) => self.fail(Queued::Unsubscribe(topic), error),
                }
            }
        }
    }

    /// Hands a publish to the transport (`poll_ready` said it may). A refusal is failed as
    /// [`fail_publish`](Self::fail_publish) does, and returned.
    fn feed(&mut self, outgoing: Outgoing<P>) -> Result<()> {
        let Outgoing {
            topic,
            envelope,
            ack,
        } = outgoing;
        match self.transport.as_mut().start_send(Command::Publish {
            topic,
            message: envelope,
        }) {
            Ok(()) => {
                self.shared.counters.published.fetch_add(1, Relaxed);
                self.unflushed = true;
                self.fed = self.fed.saturating_add(1);
                self.acks.extend(ack);
                Ok(())
            }
            Err(error) => {
                self.fail_publish(ack, error.clone());
                Err(error)
            }
        }
    }

    fn fail_publish(&mut self, ack: Option<oneshot::Sender<Result<()>>>, error: Error) {
        self.shared.counters.publish_failed.fetch_add(1, Relaxed);
        if error.is_fatal() {
            if let Some(ack) = ack {
                let _ = ack.send(Err(error.clone()));
            }
            self.terminate(error);
            return;
        }
        match ack {
            Some(ack) => {
                let _ = ack.send(Err(error));
            }
            None => tracing::warn!(%error, "a publish failed"),
        }
    }

    fn fail(&mut self, queued: Queued<P>, error: Error) {
        match queued {
            Queued::Publish(outgoing) => self.fail_publish(outgoing.ack, error),
            _ if error.is_fatal() => self.terminate(error),
            Queued::Subscribe { topic, generation } => {
                tracing::warn!(%error, %topic, "subscribing failed");
                self.shared.fail_subscribe(&topic, generation, &error);
            }
            Queued::Unsubscribe(topic) => {
                tracing::warn!(%error, %topic, "unsubscribing failed");
                // Not sent, so never answered.
                self.answered_unsubscribe(topic);
            }
        }
    }

    /// Routes what comes up, at most `budget` items (for `taker`, when a subscription reads).
    /// Returns whether the budget ran out.
    fn poll_inbound(
        &mut self,
        cx: &mut Context<'_>,
        budget: usize,
        taker: Option<&mut Taker<'_, P>>,
    ) -> bool {
        let more = self.route_inbound(cx, budget, taker);
        // Held for this call only: a listener removed since is not kept alive by the driver.
        self.held = None;
        more
    }

    fn route_inbound(
        &mut self,
        cx: &mut Context<'_>,
        budget: usize,
        mut taker: Option<&mut Taker<'_, P>>,
    ) -> bool {
        if let Some(stalled) = self.stalled.take() {
            if let Err((from, event)) =
                self.shared
                    .deliver_from(&stalled.listeners, stalled.event, stalled.from, Some(cx))
            {
                self.stalled = Some(Stalled {
                    listeners: stalled.listeners,
                    event,
                    from,
                });
                return false;
            }
        }
        if self.inbound_ended {
            return false;
        }
        for _ in 0..budget {
            match self.transport.as_mut().poll_next(cx) {
                Poll::Pending => return false,
                Poll::Ready(Some(Ok(up))) => {
                    self.handle_up(up, cx, taker.as_deref_mut());
                    if self.stalled.is_some() {
                        return false;
                    }
                }
                Poll::Ready(Some(Err(error))) if error.is_fatal() => {
                    self.terminate(error);
                    return false;
                }
                Poll::Ready(Some(Err(error))) => self.count_skipped(&error, true),
                Poll::Ready(None) => {
                    if matches!(self.phase, Phase::Closing) {
                        // Ended while the transport closes: not polled again (a stream that
                        // has ended may panic if it is).
                        self.inbound_ended = true;
                        return false;
                    }
                    // The transport may know why (a WebSocket peer's close code and reason):
                    // its sink says so.
                    let reason = match self.transport.as_mut().poll_ready(cx) {
                        Poll::Ready(Err(error)) => error,
                        _ => Error::connection_lost("the transport's stream ended"),
                    };
                    self.terminate(reason);
                    return false;
                }
            }
        }
        true
    }

    fn count_skipped(&self, error: &Error, surfaced: bool) {
        let counters = &self.shared.counters;
        if error.is_decode() {
            counters.decode_errors.fetch_add(1, Relaxed);
        } else {
            counters.skipped.fetch_add(1, Relaxed);
        }
        if surfaced {
            tracing::warn!(%error, "an inbound item failed; the stream goes on");
        }
    }

    /// Finds the listeners of a message's topic (its channel's, where the transport has
    /// channels) and holds them in `held`; `false` if the topic has none. Traffic mostly
    /// repeats a topic: the last lookup is reused while the map is unchanged.
    fn route(&mut self, channel: Option<&Topic>, message: &Envelope<P>) -> bool {
        if let Some(route) = &self.route {
            let same = match channel {
                Some(channel) => *channel == route.topic,
                None => message.has_topic(&route.topic),
            };
            if same && route.version == self.shared.version() {
                // `held`, when set, holds `route`'s listeners.
                if self.held.is_some() {
                    return true;
                }
                if let Some(listeners) = route.listeners.upgrade() {
                    self.held = Some(listeners);
                    return true;
                }
            }
        }
        let (version, found) = match channel {
            Some(channel) => self.shared.listeners_of(channel),
            None => {
                self.key.clear();
                self.key.push_str(&message.r#type);
                self.key.push(':');
                self.key.push_str(&message.id);
                self.shared.listeners_of(&self.key)
            }
        };
        let Some((topic, listeners)) = found else {
            return false;
        };
        self.route = Some(Route {
            version,
            topic,
            listeners: Arc::downgrade(&listeners),
        });
        self.held = Some(listeners);
        true
    }

    fn handle_up(
        &mut self,
        up: Up<Envelope<P>>,
        cx: &mut Context<'_>,
        taker: Option<&mut Taker<'_, P>>,
    ) {
        match up {
            Up::Message { channel, message } => {
                if !self.route(channel.as_ref(), &message) {
                    self.shared.counters.unrouted.fetch_add(1, Relaxed);
                    return;
                }
                let listeners = self.held.as_ref().expect("held by `route`");
                if let (Some(taker), [Listener::Queue { queue }]) = (taker, &listeners[..]) {
                    if Arc::ptr_eq(queue, taker.queue)
                        && queue.hand_over(taker.id, &self.shared.counters)
                    {
                        taker.batch.push_back(Slot::Event(Arc::new(message)));
                        return;
                    }
                }
                let event = Arc::new(message);
                if let Err((from, event)) = self.shared.deliver_from(listeners, event, 0, Some(cx))
                {
                    self.stalled = Some(Stalled {
                        listeners: Arc::clone(listeners),
                        event,
                        from,
                    });
                }
            }
            Up::Subscribed(topic) => {
                let Some(pending) = self.confirms.get_mut(&topic) else {
                    tracing::debug!(%topic, "a subscription was confirmed that this target did not ask for");
                    return;
                };
                let generation = pending.pop_front();
                if pending.is_empty() {
                    self.confirms.remove(&topic);
                }
                if let Some(generation) = generation {
                    self.shared.confirm(&topic, generation);
                }
            }
            Up::SubscribeFailed(topic, error) => {
                let Some(pending) = self.confirms.get_mut(&topic) else {
                    // Answers no subscribe: a subscription in effect that the peer dropped for
                    // good. Its subscribers are told (their streams end).
                    tracing::error!(%topic, %error, "the transport dropped a subscription for good");
                    self.shared.revoke(&topic);
                    return;
                };
                tracing::warn!(%topic, %error, "the transport refused a subscription");
                let generation = pending.pop_front();
                if pending.is_empty() {
                    self.confirms.remove(&topic);
                }
                if let Some(generation) = generation {
                    self.shared.fail_subscribe(&topic, generation, &error);
                }
            }
            // The answer to the oldest unsubscribe of `topic` sent.
            Up::Unsubscribed(topic) => self.answered_unsubscribe(topic),
            Up::Reconnected => self.shared.reconnected(),
            Up::Skipped(error) => self.count_skipped(&error, false),
        }
    }

    /// Moves a close along. Returns `Ready` once the driver is done.
    fn poll_close_steps(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let timed_out = self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        loop {
            match &self.phase {
                Phase::Running => return Poll::Pending,
                Phase::DrainingPublishes if !timed_out => return Poll::Pending,
                Phase::DrainingPublishes => {
                    tracing::warn!(
                        timeout = ?self.close_timeout,
                        "closing: the transport did not take every queued publish in time"
                    );
                    let error =
                        Error::closed("the event target closed before this publish was sent");
                    self.drop_unsent(&error);
                    self.give_up_stalled();
                    self.shared.end_all(None);
                    self.phase = Phase::Closing;
                }
                Phase::Unsubscribing { awaiting, .. } => {
                    let sent = self.outbox.is_empty() && !self.unflushed;
                    if !(timed_out || sent && awaiting.is_empty()) {
                        return Poll::Pending;
                    }
                    if timed_out {
                        tracing::warn!(
                            timeout = ?self.close_timeout,
                            "closing: the transport did not confirm every unsubscribe in time"
                        );
                    }
                    self.give_up_stalled();
                    self.shared.end_all(None);
                    self.phase = Phase::Closing;
                }
                Phase::Closing => {
                    // Closing flushes first: publishes still waiting for a flush's answer are
                    // sent once it succeeds, and count as failed otherwise.
                    let closed = match self.transport.as_mut().poll_close(cx) {
                        Poll::Pending if !timed_out => return Poll::Pending,
                        Poll::Ready(Ok(())) => Ok(()),
                        Poll::Ready(Err(error)) => {
                            tracing::debug!(%error, "closing the transport failed");
                            Err(Error::with_source(
                                ErrorKind::Closed,
                                format!("the event target closed, and closing the transport (which flushes it) failed: {error}"),
                                error,
                            ))
                        }
                        // Out of time: the close did not finish, but what was fed may have
                        // gone (a WebSocket waiting for its peer's close frame has flushed
                        // everything before its own).
                        Poll::Pending => match self.transport.as_mut().poll_flush(cx) {
                            Poll::Ready(Ok(())) => Ok(()),
                            _ => Err(Error::closed(
                                "the event target closed before the transport flushed",
                            )),
                        },
                    };
                    if closed.is_err() && self.fed > 0 {
                        // As a failed flush counts what it covered.
                        self.shared
                            .counters
                            .publish_failed
                            .fetch_add(u64::from(self.fed), Relaxed);
                    }
                    for ack in self.acks.drain(..) {
                        let _ = ack.send(closed.clone());
                    }
                    self.finish();
                }
                Phase::Finished => return Poll::Ready(()),
            }
        }
    }

    /// Counts the publishes a panic in a transport call lost: `own` (the caller's, not fed),
    /// and the queued one being fed, if it was then.
    fn lost_to_panic(&mut self, own: u64) {
        let lost = own + u64::from(std::mem::take(&mut self.feeding_queued));
        self.shared.counters.publish_failed.fetch_add(lost, Relaxed);
    }

    /// Stops the target after the transport panicked (its state is unknown), and returns the
    /// error every waiter gets.
    fn panicked(&mut self, what: &str, panic: &(dyn Any + Send)) -> Error {
        let error = Error::new(
            crate::layers::ErrorKind::Other,
            format!("{what} panicked: {}", panic_message(panic)),
        );
        self.terminate(error.clone());
        // A panic may have skipped the end of `poll_inbound`, which lets go of these.
        self.held = None;
        // Let the driver task see that it is finished, end, and drop the transport. (The direct
        // paths put the waker back before they get here; without one, the control channel
        // wakes the driver.)
        match &self.waker {
            Some(waker) => waker.wake_by_ref(),
            None => {
                if let Some(control) = self.shared.control() {
                    let _ = control.send(Control::Shutdown);
                }
            }
        }
        error
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.phase, Phase::Finished) {
            return Poll::Ready(());
        }
        crate::waker::remember(&mut self.waker, cx);
        self.flush_wanted = false;
        self.take_control(cx);
        let more_out = self.poll_outgoing(cx);
        if matches!(self.phase, Phase::Finished) {
            return Poll::Ready(());
        }
        let more_in = self.poll_inbound_or_lend(cx);
        if self.poll_close_steps(cx).is_ready() {
            return Poll::Ready(());
        }
        if more_out || more_in {
            cx.waker().wake_by_ref();
        }
        // A wake message taken in this poll was heard: the lease was looked at after it.
        self.wake_wanted = false;
        Poll::Pending
    }

    /// Routes what comes up ([`Self::poll_inbound`]), unless a subscription reads the
    /// transport ([`Lease`]) or can be woken to. Returns whether the budget ran out.
    fn poll_inbound_or_lend(&mut self, cx: &mut Context<'_>) -> bool {
        let held = self.leased();
        let lendable = self.lendable();
        let lease = &mut self.lease;
        let fired = lease.armed
            && lease
                .timer
                .as_mut()
                .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if fired {
            lease.armed = false;
        }
        if held {
            if lendable && !fired {
                self.arm_lease(cx);
                return false;
            }
            if lendable && lease.pulls - lease.started >= KEEPS_UP {
                // The holder keeps up: it goes on.
                lease.started = lease.pulls;
                self.arm_lease(cx);
                return false;
            }
            // The holder stopped, reads slowly, or cannot go on: the driver reads again.
            self.end_lease();
            return self.poll_inbound(cx, BUDGET, None);
        }
        if !(lendable && self.puller.is_some()) {
            return self.poll_inbound(cx, BUDGET, None);
        }
        // A subscription waits for the transport. A few items are routed here first: one
        // event at a time (the usual case at low rates) is cheaper to route than to hand over.
        if !self.poll_inbound(cx, HAND_OFF_AFTER, None) {
            return false;
        }
        // A burst: the waiting subscription reads the rest, if it still waits (it has yielded
        // everything, and is still there).
        let puller = self.puller.take().filter(Puller::waits);
        match puller {
            Some(puller) if self.lendable() => {
                self.start_lease(puller.id);
                // Dropped meanwhile (it left its queue before it looked for a lease to give
                // back): the driver reads on. Once the lease is set, a subscription dropped
                // later finds it and gives it back.
                if !puller.waits() {
                    self.end_lease();
                    return true;
                }
                self.hand_to = Some(puller.waker);
                self.arm_lease(cx);
                false
            }
            _ => true,
        }
    }

    /// Whether the driver may leave the reading to a subscription: the target runs, and no
    /// delivery waits for room.
    fn lendable(&self) -> bool {
        self.stalled.is_none() && self.running()
    }

    /// Whether a subscription holds the lease. Written under the core's lock, but for a
    /// dropped holder ending its own lease when it finds the lock taken
    /// ([`Direct::drop_lease`]).
    fn leased(&self) -> bool {
        self.shared.lease_holder.load(Relaxed) != 0
    }

    fn start_lease(&mut self, holder: ListenerId) {
        self.lease.started = self.lease.pulls;
        self.shared.lease_holder.store(holder.0, Relaxed);
    }

    fn end_lease(&mut self) {
        if self.leased() {
            self.shared.lease_holder.store(0, Relaxed);
        }
    }

    fn remember_puller(&mut self, waker: &Waker, queue: &Arc<Queue<P>>, id: ListenerId) {
        if let Some(puller) = &mut self.puller {
            if puller.id == id && puller.queue.as_ptr() == Arc::as_ptr(queue) {
                if !puller.waker.will_wake(waker) {
                    puller.waker = waker.clone();
                }
                return;
            }
        }
        self.puller = Some(Puller {
            queue: Arc::downgrade(queue),
            id,
            waker: waker.clone(),
        });
    }

    /// Starts the timer that ends a held lease, unless it runs (then the lease ends sooner).
    fn arm_lease(&mut self, cx: &mut Context<'_>) {
        let lease = &mut self.lease;
        if lease.armed {
            return;
        }
        let deadline = tokio::time::Instant::now() + LEASE;
        let timer = match &mut lease.timer {
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => lease
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        // Registers the driver's waker; not ready before `LEASE` has passed.
        let _ = timer.as_mut().poll(cx);
        lease.armed = true;
    }

    /// Whether commands wait to be fed: taken from the handles, or still in their channels.
    fn queued(&self) -> bool {
        !self.outbox.is_empty() || !self.publishes.is_empty() || !self.control.is_empty()
    }

    /// Feeds `outgoing` to the transport from the calling task, if that keeps the order: the
    /// target is running, what was queued before it could be fed first, and the transport has
    /// room now.
    fn try_publish(&mut self, outgoing: Outgoing<P>) -> Fed<P> {
        let Some(waker) = self.lend_waker() else {
            return Fed::No(outgoing);
        };
        self.own_in_hand = true;
        match self.act_as_driver(waker, |core, waker| core.publish_with(outgoing, waker)) {
            Ok(fed) => {
                self.own_in_hand = false;
                fed
            }
            Err(panic) => {
                // This publish is lost if it was not fed yet (else the stop counts it), and
                // the queued one being fed, if the panic came then.
                let own = std::mem::take(&mut self.own_in_hand);
                self.lost_to_panic(u64::from(own));
                Fed::Panicked(self.panicked("the transport", panic.as_ref()))
            }
        }
    }

    /// The driver's waker, for a task that acts for the driver ([`Self::act_as_driver`]): only
    /// while the target runs, from a task on the driver's runtime (transport calls may create
    /// runtime resources, a reconnect's connection or timer), and once the driver has run.
    fn lend_waker(&mut self) -> Option<Waker> {
        if !self.running() || self.runtime.is_none() || current_runtime() != self.runtime {
            return None;
        }
        self.waker.take()
    }

    /// Runs `f` with the driver's `waker` (from [`Self::lend_waker`]), so that whatever `f`
    /// leaves pending wakes the driver, never the calling task. The waker is put back first,
    /// also after a panic in `f` (caught and returned); a transport that failed for good is
    /// left for the driver task to end and drop.
    fn act_as_driver<R>(
        &mut self,
        waker: Waker,
        f: impl FnOnce(&mut Self, &Waker) -> R,
    ) -> std::thread::Result<R> {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(self, &waker)));
        self.waker = Some(waker);
        if std::mem::take(&mut self.wake_wanted) || result.is_ok() && !self.running() {
            self.wake_driver();
        }
        result
    }

    fn wake_driver(&self) {
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
    }

    fn publish_with(&mut self, outgoing: Outgoing<P>, waker: &Waker) -> Fed<P> {
        let mut cx = Context::from_waker(waker);
        if self.queued() {
            // What is queued came first: feed it now, as the driver would (this saves waiting
            // for it), then this publish if nothing is left before it.
            if self.poll_outgoing(&mut cx) {
                waker.wake_by_ref();
            }
            if !self.running() || self.queued() {
                return Fed::No(outgoing);
            }
        }
        if self.window_full(&mut cx) {
            // Queued: the flush's completion, or the window's wait running out, wakes the
            // driver, which feeds it (or fails it, if the flush ended the target).
            return Fed::No(outgoing);
        }
        match self.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            // The driver is woken when there is room, and feeds the queue in order.
            Poll::Pending => return Fed::No(outgoing),
            // The transport failed: the driver fails this publish.
            Poll::Ready(Err(())) if matches!(self.phase, Phase::Finished) => {
                return Fed::No(outgoing)
            }
            Poll::Ready(Err(())) => {
                // Reported; the driver sends this publish.
                waker.wake_by_ref();
                return Fed::No(outgoing);
            }
        }
        let fed = self.feed(outgoing);
        self.own_in_hand = false;
        if let Err(error) = fed {
            // Refused while this task fed it (a reconnect layer's buffer full during an
            // outage, or a fatal failure): counted, and the caller learns it at once. A fatal
            // one stopped the target: the caller hears what any later caller hears (and what
            // it would have heard had the driver seen the failure first), `Closed` with the
            // failure as its source.
            if error.is_fatal() {
                return Fed::Refused(self.shared.closed_error("publishing"));
            }
            return Fed::Refused(error);
        }
        if self.unflushed && !self.flush_wanted {
            // The first publish since the driver last flushed. A lone one is flushed here and
            // now: waiting for the driver task would add a hand-off to its latency. In a burst,
            // the driver flushes once for many (and the clock is read once per flush, not per
            // publish), unless flushing costs nothing (`Builder::flush_each_publish`). Lone is
            // `LONE_PUBLISH` after the previous such publish, or only `LONE_AFTER_LONE` when the
            // last flush carried one publish: then the driver would flush this one alone too.
            let lone = self.flush_each_publish || {
                let now = Instant::now();
                let after = if self.flushed_one {
                    LONE_AFTER_LONE
                } else {
                    LONE_PUBLISH
                };
                let lone = now.duration_since(self.last_direct) >= after;
                self.last_direct = now;
                lone
            };
            if lone {
                self.poll_flush(&mut cx);
            }
            if self.unflushed {
                self.flush_wanted = true;
                waker.wake_by_ref();
            }
        }
        Fed::Yes
    }

    /// Routes what the transport has ready (at most [`PULL_BUDGET`] items) from the calling
    /// task, a subscription of this target whose queue is empty: exactly as the driver would,
    /// with the driver's waker, so that whatever is left pending (the transport's next item,
    /// room in a `Block` queue) wakes the driver, never the caller. The caller is reader `id`
    /// of `queue`, woken by `waker`.
    fn try_pull(
        &mut self,
        waker: &Waker,
        queue: &Arc<Queue<P>>,
        id: ListenerId,
        batch: &mut VecDeque<Slot<P>>,
    ) -> Pulled {
        if self.stalled.is_some() {
            return Pulled::Done;
        }
        let Some(driver) = self.lend_waker() else {
            return Pulled::Done;
        };
        self.lease.pulls += 1;
        let mut taker = Taker { queue, id, batch };
        let routed = self.act_as_driver(driver, |core, waker| {
            core.poll_inbound(
                &mut Context::from_waker(waker),
                PULL_BUDGET,
                Some(&mut taker),
            )
        });
        match routed {
            // Items may be left, and the transport wakes no one for those: the caller reads
            // on, and the driver checks that it does.
            Ok(true) if self.running() => {
                if !self.leased() {
                    self.start_lease(id);
                    if !self.lease.armed {
                        self.wake_driver();
                    }
                }
                return Pulled::More;
            }
            Ok(true) => self.wake_driver(),
            Ok(false) => {
                // Drained (or stalled on a full `Block` queue, which wakes the driver when it
                // has room): the driver reads next, or wakes the caller to.
                self.end_lease();
                if self.stalled.is_none() {
                    self.remember_puller(waker, queue, id);
                }
            }
            Err(panic) => {
                // Stops the target: the caller's queue ends, with the others.
                self.panicked(
                    "the event target's transport (read by a subscription)",
                    panic.as_ref(),
                );
            }
        }
        Pulled::Done
    }
}

impl<T, P> Core<T, P> {
    /// The close is ending (or the target stopping) with an event waiting for room in a full
    /// `Block` queue: that queue drops it (its readers hear of it as
    /// [`Gap::Lagged`](crate::Gap::Lagged) after what they hold, and it counts as lagged), and
    /// the listeners after it get it, before every subscription ends. What the transport had
    /// not yielded yet is not read.
    fn give_up_stalled(&mut self) {
        if let Some(stalled) = self.stalled.take() {
            let _ = self
                .shared
                .deliver_from(&stalled.listeners, stalled.event, stalled.from, None);
        }
    }

    /// Ends everything with `error`: calls fail with it, publishes not sent yet are dropped
    /// (and counted), and every subscription ends.
    fn stop(&mut self, error: Error) {
        // During a close its user asked for, the target is closed, not stopped: later calls
        // say so (the calls waiting now get `error`).
        let reason = matches!(self.phase, Phase::Running).then(|| error.clone());
        self.shared.mark_closed(reason.clone());
        self.publishes.close();
        // Fed since the last flush: lost with the transport.
        if self.fed > 0 {
            self.shared
                .counters
                .publish_failed
                .fetch_add(u64::from(std::mem::take(&mut self.fed)), Relaxed);
        }
        self.drop_unsent(&error);
        for ack in self.acks.drain(..) {
            let _ = ack.send(Err(error.clone()));
        }
        // An event waiting for room in a full `Block` queue is dropped there, and its readers
        // hear of it, rather than lose it silently with the driver.
        self.give_up_stalled();
        self.shared.end_all(reason);
        self.finish();
    }

    fn finish(&mut self) {
        self.phase = Phase::Finished;
        for done in self.close_waiters.drain(..) {
            let _ = done.send(());
        }
    }

    /// Drops the publishes not fed yet (the outbox's and the queue's, which must be closed),
    /// answering each confirmed one with `error` and counting each as failed.
    fn drop_unsent(&mut self, error: &Error) {
        let mut dropped = 0;
        let queued = self.outbox.drain(..).filter_map(|queued| match queued {
            Queued::Publish(outgoing) => Some(outgoing),
            _ => None,
        });
        let waiting = std::iter::from_fn(|| self.publishes.try_recv().ok());
        for outgoing in queued.chain(waiting) {
            dropped += 1;
            if let Some(ack) = outgoing.ack {
                let _ = ack.send(Err(error.clone()));
            }
        }
        if dropped > 0 {
            self.shared
                .counters
                .publish_failed
                .fetch_add(dropped, Relaxed);
            tracing::warn!(%error, dropped, "publishes not sent");
        }
    }
}

/// The driver task dropped before it finished (its runtime shut down, or the task was
/// aborted): the target is stopped as if its transport had failed, so that its subscriptions
/// end, its calls fail at once and `close()` returns, rather than wait for a driver that is
/// gone.
impl<T, P> Drop for Core<T, P> {
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Finished) {
            // A publish that had its place in the queue as the target stopped and went in
            // once the queue had been emptied: failed and counted, not lost silently.
            if !self.publishes.is_empty() {
                let error = self.shared.closed_error("publishing");
                self.drop_unsent(&error);
            }
            return;
        }
        let error = Error::closed(
            "the event target's driver task was dropped before the target closed (its runtime shut down?)",
        );
        tracing::warn!("event target stopped: its driver task was dropped");
        self.stop(error);
    }
}

/// The task that owns a transport: it feeds what is queued, flushes, routes what comes up, and
/// closes. Dropping it drops the transport.
pub(crate) struct Driver<T, P> {
    core: Arc<Mutex<Core<T, P>>>,
}

impl<T, P> Driver<T, P>
where
    T: Transport<Envelope<P>> + Send + 'static,
    P: Send + Sync + 'static,
{
    /// The driver, and the handle through which publishers may feed its transport directly.
    pub(crate) fn new(
        transport: T,
        shared: Arc<Shared<P>>,
        control: mpsc::UnboundedReceiver<Control>,
        publishes: mpsc::Receiver<Outgoing<P>>,
        close_timeout: Duration,
        flush_each_publish: bool,
    ) -> (Self, Weak<dyn Direct<P>>) {
        let core = Arc::new(Mutex::new(Core::new(
            transport,
            shared,
            control,
            publishes,
            close_timeout,
            flush_each_publish,
        )));
        let direct: Weak<Mutex<Core<T, P>>> = Arc::downgrade(&core);
        (Driver { core }, direct)
    }
}

/// What became of a publish offered to [`Direct::try_publish`].
pub(crate) enum Fed<P> {
    /// The transport took it.
    Yes,
    /// It must be queued for the driver, as before.
    No(Outgoing<P>),
    /// The transport refused it (counted in `publish_failed`): the caller gets this error.
    Refused(Error),
    /// The transport panicked taking it: the target is stopped.
    Panicked(Error),
}

/// What came of a subscription's [`Direct::try_pull`].
pub(crate) enum Pulled {
    /// More may be ready: the caller holds the [`Lease`] and should pull again soon.
    More,
    /// The transport is drained, or was not the caller's to read (the target is stopping, a
    /// delivery waits for room, another runtime), or failed.
    Done,
    /// The driver, a publisher or another subscription was using the transport.
    Busy,
}

/// A way to the transport past the driver task, for publishers ([`Core::try_publish`]) and
/// for subscriptions that find their queue empty ([`Core::try_pull`]).
pub(crate) trait Direct<P>: Send + Sync {
    /// Feeds `outgoing` now, or hands it back to be queued.
    fn try_publish(&self, outgoing: Outgoing<P>) -> Fed<P>;

    /// Routes what the transport has ready now, from the calling task (reader `id` of `queue`,
    /// woken by `waker`), if the driver is not using the transport. Events for that reader
    /// alone may be put straight into its `batch` (see [`Taker`]), ahead of anything the
    /// pull leaves in the queue.
    fn try_pull(
        &self,
        waker: &Waker,
        queue: &Arc<Queue<P>>,
        id: ListenerId,
        batch: &mut VecDeque<Slot<P>>,
    ) -> Pulled;

    /// Subscription `id` is dropped: if it holds the [`Lease`], the driver reads again now
    /// (it would wait for the lease's end, a millisecond or two with every topic's delivery
    /// held up). Only if the core's lock is free: else the caller ends the lease without it,
    /// and tells the driver with [`Control::Wake`].
    fn drop_lease(&self, id: ListenerId);
}

impl<T, P> Direct<P> for Mutex<Core<T, P>>
where
    T: Transport<Envelope<P>> + Send,
    P: Send + Sync + 'static,
{
    fn try_publish(&self, outgoing: Outgoing<P>) -> Fed<P> {
        // Busy (the driver, a publisher or a reading subscription): queue it.
        match self.try_lock() {
            Ok(mut core) => core.try_publish(outgoing),
            Err(_) => Fed::No(outgoing),
        }
    }

    fn try_pull(
        &self,
        waker: &Waker,
        queue: &Arc<Queue<P>>,
        id: ListenerId,
        batch: &mut VecDeque<Slot<P>>,
    ) -> Pulled {
        match self.try_lock() {
            Ok(mut core) => core.try_pull(waker, queue, id, batch),
            Err(_) => Pulled::Busy,
        }
    }

    fn drop_lease(&self, id: ListenerId) {
        // Never waits for the lock: the subscription may be dropped where it is held (in a
        // callback the driver runs, say). Then the caller ends the lease without the lock,
        // and wakes the driver with a message (it finds the lease ended when it looks).
        if let Ok(mut core) = self.try_lock() {
            // Not handed the reading again while it goes.
            if core.puller.as_ref().is_some_and(|puller| puller.id == id) {
                core.puller = None;
            }
            if core.shared.lease_holder.load(Relaxed) == id.0 {
                core.end_lease();
                core.wake_driver();
            }
        }
    }
}

/// The runtime the calling task runs on, if any.
fn current_runtime() -> Option<tokio::runtime::Id> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|runtime| runtime.id())
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

impl<T, P> Future for Driver<T, P>
where
    T: Transport<Envelope<P>>,
    P: Send + Sync + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Blocking: a publisher or a subscription holding the lock is doing the driver's work
        // (a batch of publishes, or up to `PULL_BUDGET` inbound items) and lets go soon. A
        // driver that yields and retries instead measured slower (it spins through the
        // scheduler), and so did one woken by whoever lets go.
        //
        // Only a panic in a transport call while locked poisons the lock, and every place that
        // locks it catches those: a poisoned lock cannot be seen here, but would only mean "stop".
        let Ok(mut core) = self.core.lock() else {
            return Poll::Ready(());
        };
        let poll = match std::panic::catch_unwind(AssertUnwindSafe(|| core.poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                core.lost_to_panic(0);
                core.panicked(
                    "the event target's driver (in its transport or layers)",
                    panic.as_ref(),
                );
                Poll::Ready(())
            }
        };
        let hand_to = core.hand_to.take();
        drop(core);
        if let Some(puller) = hand_to {
            puller.wake();
        }
        poll
    }
}
