//! The reconnect layer: a transport that survives its connection.
//!
//! It wraps a factory of transports (`Fn() -> impl Future<Output = Result<T>>`) and:
//!
//! | way | what it does |
//! |---|---|
//! | down | forwards commands to the current connection, remembering the active subscriptions; during an outage, subscribes and unsubscribes only update that set, and publishes wait in a bounded buffer (then fail at once with an error of kind [`Unavailable`](crate::ErrorKind::Unavailable)); while the first connection is being made, publishes past the bound wait for it instead (no outage has begun), and are refused only once that attempt has failed; publishes handed to a connection that failed before they were flushed are sent again on the next one (not those of a flush that failed with an error this layer passed up: that error answered them), so the layer keeps each until a flush completes: past [`MAX_UNFLUSHED`] kept (or [`MAX_UNFLUSHED_BYTES`]), it waits for a flush before it takes the next |
//! | up | passes messages through; when the connection fails (an [unrecoverable](crate::Error::is_unrecoverable) error, or the end of the stream) it reconnects with [`Backoff`], replays every active subscription before anything else (a replay refused for now, with a [transient](crate::Error::is_transient) error, makes it connect again after the backoff, counted as a failed attempt toward [`Backoff::max_attempts`]; subscribes made while it was down wait for that too; a replay refused for good ends that topic), sends the buffered publishes in order, and once the replayed subscriptions are confirmed sends [`Up::Reconnected`]; messages that come on the new connection before then (on topics already confirmed again) are held to follow the notice, up to 1,024 (and 32 MiB), past which the notice goes at once |
//!
//! A first connection that fails in a way no retry can mend ([`Error::is_permanent`]: an
//! invalid URL, a scheme the transport does not support, credentials the server refused) is
//! not retried: the layer gives up at once, and every command fails with an error that says
//! why (of kind [`Connect`](crate::ErrorKind::Connect), with the permanent error as its
//! `source()`), rather than wait through retries that cannot succeed. Once it has been
//! connected, the layer retries whatever the failure (a password may be rotated, a proxy may
//! refuse for a while). Any other failure is retried with [`Backoff`] (for ever, unless
//! [`Backoff::max_attempts`] says otherwise).
//!
//! Delivery through an outage is at-least-once for publishes where a completed flush means
//! the peer acknowledged them (Redis: a publish may be sent twice if the transport failed
//! after the peer got it and before its acknowledgement came back: its publish connection
//! died, its subscribe connection did (the whole transport is replaced, with the pipeline in
//! flight on a publish connection that still delivers it), or the acknowledgement came later
//! than the response timeout); over a transport whose flush only writes
//! (a WebSocket), a publish flushed just before the connection died may be lost with it: only
//! what was not flushed yet is sent again. Inbound messages are at-most-once (what was
//! published while the subscriber was away is gone; `Reconnected` says so). A publish the new
//! connection refuses on its own (too large, say) fails the next flush, and with it every
//! publish that flush covers, for the caller to tell: the layer cannot tell which.
//!
//! Closing delivers what waits first: a close during an outage, with publishes buffered or
//! not yet flushed, waits for a connection to send them on, for as long as [`Backoff`] keeps
//! trying (for ever by default). Bound it with a timeout (`tokio::time::timeout` around
//! `SinkExt::close`) or drop the transport to give them up; an `EventTarget`'s close has a
//! timeout of its own.
//!
//! It can be split (`StreamExt::split`) between a reading task and a writing task: what one
//! side changes under the other (a connection it replaced, answers it queued for the reader, a
//! close) wakes the other, and what both wait on (the connection being made, the backoff)
//! wakes both.
//!
//! The connection's state can be watched without polling the transport:
//! [`ReconnectLayer::state`].
//!
//! ```
//! use alkdev_pubsub_layers::reconnect::{Backoff, ConnectionState, ReconnectLayer};
//! use std::time::Duration;
//!
//! let layer = ReconnectLayer::new(Backoff::new().initial(Duration::from_millis(50)))
//!     .buffer(1024);
//! let state = layer.state();
//! assert_eq!(*state.borrow(), ConnectionState::Idle);
//! ```

mod backoff;

pub use backoff::Backoff;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::{Sink, Stream};
use tokio::sync::watch;
// The runtime's clock, as its timers: a test on a paused clock sees a connection stay up.
use tokio::time::Instant;
use tokio::time::Sleep;

use crate::kept::{Kept, Weigh};
use crate::prefix::Counter;
use crate::{Command, Error, ErrorKind, Result, Topic, Up};

/// The default bound of the publish buffer during an outage.
pub const DEFAULT_BUFFER: usize = 1024;

pub use crate::kept::{MAX_UNFLUSHED, MAX_UNFLUSHED_BYTES};

/// How many messages that come on a new connection before its replayed subscriptions are all
/// confirmed are held back, to follow the [`Up::Reconnected`] notice rather than come before
/// it. Past this, the notice goes at once, the held messages after it.
const HOLD_MAX: usize = 1024;

/// The bytes of held messages past which the notice goes at once too (measured as the
/// layer measures publishes: raw frames by their length, other message types once
/// [`ReconnectLayer::weigh`] says how): a new connection whose replay is slow to be confirmed
/// must not gather up to [`HOLD_MAX`] messages of the largest size a transport reads.
const HOLD_MAX_BYTES: usize = 32 << 20;

/// How many `poll_ready` calls in a row a connection may fail (with errors that are not
/// unrecoverable) before it is taken for lost. Such an error reports an earlier failure, once:
/// a connection failing every call is broken, and a new one may not be.
const READY_FAILURES_MAX: u32 = 64;

/// Makes a new connection: implemented by every `Fn() -> impl Future<Output = Result<T>>`.
pub trait MakeTransport {
    /// The transport made.
    type Transport;
    /// The connecting future.
    type Future: Future<Output = Result<Self::Transport>>;
    /// Starts connecting.
    fn make_transport(&self) -> Self::Future;
}

impl<F, Fut, T> MakeTransport for F
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    type Transport = T;
    type Future = Fut;

    fn make_transport(&self) -> Fut {
        self()
    }
}

/// Where a [`Reconnect`] transport's connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not connected yet: the first poll connects.
    Idle,
    /// Connecting; `attempt` counts from 1 since the last connection that stayed up.
    Connecting {
        /// Which attempt this is.
        attempt: u32,
    },
    /// Connected.
    Connected,
    /// Waiting before the next attempt.
    Waiting {
        /// The attempt that failed.
        attempt: u32,
        /// How long until the next one.
        delay: Duration,
    },
    /// Gave up: after the configured number of attempts, or at once when the first connection
    /// failed in a way no retry can mend ([`Error::is_permanent`]: an invalid setting, refused
    /// credentials).
    GaveUp,
    /// Closed.
    Closed,
}

/// A [`tower::Layer`] that makes a [`Reconnect`] transport from a factory: see the
/// [module](self).
///
/// `M` is the message type of the transports made: raw frames ([`Bytes`](bytes::Bytes)) by
/// default, since the layer usually sits right above the raw transport; use
/// [`with_message_type`](Self::with_message_type) for another.
pub struct ReconnectLayer<M = bytes::Bytes> {
    backoff: Backoff,
    buffer: usize,
    weigh: Option<Weigh<M>>,
    state: Arc<watch::Sender<ConnectionState>>,
    unavailable: Counter,
    _message: PhantomData<fn() -> M>,
}

impl<M> Clone for ReconnectLayer<M> {
    fn clone(&self) -> Self {
        ReconnectLayer {
            backoff: self.backoff.clone(),
            buffer: self.buffer,
            weigh: self.weigh,
            state: Arc::clone(&self.state),
            unavailable: self.unavailable.clone(),
            _message: PhantomData,
        }
    }
}

impl<M> fmt::Debug for ReconnectLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectLayer")
            .field("backoff", &self.backoff)
            .field("buffer", &self.buffer)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Default for ReconnectLayer {
    fn default() -> Self {
        Self::new(Backoff::default())
    }
}

impl ReconnectLayer {
    /// A layer over raw transports that retries with `backoff` and buffers up to
    /// [`DEFAULT_BUFFER`] publishes.
    pub fn new(backoff: Backoff) -> Self {
        Self::with_message_type(backoff).weigh(crate::kept::frame_len)
    }
}

impl<M> ReconnectLayer<M> {
    /// A layer over transports of `M` messages (for example envelopes, over a worker or
    /// in-memory transport). What it keeps to send again is bounded by its count
    /// ([`MAX_UNFLUSHED`]), and by its bytes once [`weigh`](Self::weigh) says how to measure
    /// a message.
    pub fn with_message_type(backoff: Backoff) -> Self {
        ReconnectLayer {
            backoff,
            buffer: DEFAULT_BUFFER,
            weigh: None,
            state: Arc::new(watch::Sender::new(ConnectionState::Idle)),
            unavailable: Counter::default(),
            _message: PhantomData,
        }
    }

    /// How many publishes may wait during an outage. While the first connection is being
    /// made, more wait for it (the publisher is held back, nothing is refused) until that
    /// attempt fails. The publishes the lost connection had not acknowledged (up to
    /// [`MAX_UNFLUSHED`]) are sent again on top of these: right after a connection is lost, the
    /// buffer may hold more than this, and refuse new publishes at once.
    #[must_use]
    pub fn buffer(mut self, publishes: usize) -> Self {
        self.buffer = publishes;
        self
    }

    /// How to measure a message, in bytes, for the bound on the publishes kept to send again
    /// ([`MAX_UNFLUSHED_BYTES`]). Raw frames are measured by their length
    /// ([`ReconnectLayer::new`]).
    #[must_use]
    pub fn weigh(mut self, weigh: fn(&M) -> usize) -> Self {
        self.weigh = Some(weigh);
        self
    }

    /// Watches the connection state of the transports this layer makes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// Publishes refused because the buffer was full during an outage.
    pub fn unavailable(&self) -> Counter {
        self.unavailable.clone()
    }
}

impl<F: MakeTransport, M> tower::Layer<F> for ReconnectLayer<M> {
    type Service = Reconnect<F, M>;

    fn layer(&self, factory: F) -> Reconnect<F, M> {
        Reconnect {
            factory,
            conn: Conn::Idle,
            backoff: self.backoff.clone(),
            attempt: 0,
            up_since: None,
            last_failure: None,
            ever_connected: false,
            announce: false,
            held: VecDeque::new(),
            held_bytes: 0,
            active: HashSet::new(),
            pending_up: HashMap::new(),
            replaying: HashMap::new(),
            unsubscribing: HashMap::new(),
            backlog: VecDeque::new(),
            buffered: 0,
            buffer: self.buffer,
            unacked: Kept::new(self.weigh),
            signals: VecDeque::new(),
            state: Arc::clone(&self.state),
            unavailable: self.unavailable.clone(),
            closed: false,
            closing: false,
            flush_backlog: false,
            ready_failures: 0,
            failed_on_its_own: None,
            tasks: Tasks::default(),
        }
    }
}

enum Conn<F: MakeTransport> {
    Idle,
    Connecting(Pin<Box<F::Future>>),
    Waiting(Pin<Box<Sleep>>),
    Up(Pin<Box<F::Transport>>),
    GaveUp(Error),
}

/// The tasks that use a [`Reconnect`]: one (an event target's driver, say), or, when it is
/// split (`StreamExt::split`), a reading task and a writing one. Both wait on what the layer
/// shares: the connection being made, the backoff's sleep, the sending of the backlog and the
/// flush of a replayed backlog (which either side may poll) wake both, whichever side polled
/// them; and what one side changes for the other (a connection replaced or ended, answers for
/// the reader, a close) wakes the other. Each side's other calls on the connection use its own
/// waker, the writer's too but while a replayed backlog's flush is under way.
#[derive(Default)]
struct Tasks {
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The last waker made to wake both, with the two it wakes.
    both: Option<Arc<Both>>,
}

struct Both(Waker, Waker);

impl Wake for Both {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake_by_ref();
        self.1.wake_by_ref();
    }
}

impl Tasks {
    /// Remembers `cx`'s task as the reader (or the writer), and returns a waker that also
    /// wakes the other side, when that is another task (`None`: `cx`'s waker does).
    #[inline]
    fn joint(&mut self, cx: &Context<'_>, reading: bool) -> Option<Waker> {
        // One task (an event target's driver): remembered already, and no other to wake.
        let (mine, other) = if reading {
            (&self.reader, &self.writer)
        } else {
            (&self.writer, &self.reader)
        };
        let me = cx.waker();
        if mine.as_ref().is_some_and(|w| w.will_wake(me))
            && other.as_ref().is_none_or(|w| w.will_wake(me))
        {
            return None;
        }
        self.joint_slow(cx, reading)
    }

    #[cold]
    fn joint_slow(&mut self, cx: &Context<'_>, reading: bool) -> Option<Waker> {
        self.remember(cx, reading);
        let other = if reading { &self.writer } else { &self.reader };
        let other = other
            .as_ref()
            .filter(|other| !other.will_wake(cx.waker()))?;
        let fits = self.both.as_ref().is_some_and(|both| {
            let (a, b) = (&both.0, &both.1);
            (a.will_wake(cx.waker()) && b.will_wake(other))
                || (b.will_wake(cx.waker()) && a.will_wake(other))
        });
        if !fits {
            self.both = Some(Arc::new(Both(cx.waker().clone(), other.clone())));
        }
        self.both.clone().map(Waker::from)
    }

    /// Remembers `cx`'s task as the reader (or the writer).
    #[inline]
    fn remember(&mut self, cx: &Context<'_>, reading: bool) {
        let mine = if reading {
            &mut self.reader
        } else {
            &mut self.writer
        };
        if !mine.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *mine = Some(cx.waker().clone());
        }
    }

    /// Wakes the reading side, if it is another task than the writer.
    fn wake_reader(&self) {
        if let Some(reader) = &self.reader {
            if !self.writer.as_ref().is_some_and(|w| reader.will_wake(w)) {
                reader.wake_by_ref();
            }
        }
    }

    /// Wakes both sides (what they waited on is gone), when they are two tasks: one task
    /// is the caller, which goes on.
    fn wake_all(&self) {
        if let (Some(reader), Some(writer)) = (&self.reader, &self.writer) {
            if !reader.will_wake(writer) {
                reader.wake_by_ref();
                writer.wake_by_ref();
            }
        }
    }
}

/// Runs `f` with `cx`, or with a context of `joint`'s waker when there is one.
fn with_joint<R>(
    cx: &mut Context<'_>,
    joint: Option<Waker>,
    f: impl FnOnce(&mut Context<'_>) -> R,
) -> R {
    match joint {
        Some(waker) => f(&mut Context::from_waker(&waker)),
        None => f(cx),
    }
}

/// A transport that reconnects; made by [`ReconnectLayer`] from a factory.
pub struct Reconnect<F: MakeTransport, M = bytes::Bytes> {
    factory: F,
    conn: Conn<F>,
    backoff: Backoff,
    /// Failed attempts in a row.
    attempt: u32,
    up_since: Option<Instant>,
    /// Why the last attempt failed (or the last connection was lost), until one succeeds: the
    /// publishes refused meanwhile say it (a password changed, say, refused at each attempt).
    last_failure: Option<Error>,
    ever_connected: bool,
    /// Send `Reconnected` once the replay is confirmed.
    announce: bool,
    /// Messages that came before that (on topics whose replay is confirmed): they follow it
    /// (see [`HOLD_MAX`]).
    held: VecDeque<Up<M>>,
    /// The bytes of the messages in `held` (see [`HOLD_MAX_BYTES`]).
    held_bytes: usize,
    /// Topics subscribed from above and not unsubscribed.
    active: HashSet<Topic>,
    /// Subscribes from above sent on the current connection and not yet confirmed.
    pending_up: HashMap<Topic, u32>,
    /// Replayed subscriptions not yet confirmed, with how many subscribes from above each
    /// one answers.
    replaying: HashMap<Topic, u32>,
    /// Unsubscribes sent on the current connection and not yet confirmed: a lost connection
    /// answers them (the subscription is gone with it).
    unsubscribing: HashMap<Topic, u32>,
    /// Commands for the current (or next) connection, in order.
    backlog: VecDeque<Command<M>>,
    /// Publishes in `backlog`.
    buffered: usize,
    buffer: usize,
    /// Publishes handed to the current connection since its last successful flush.
    unacked: Kept<M>,
    /// A failure of a publish this layer sent on its own (from the backlog), or of flushing
    /// them: the next flush from above reports it, so that it is not lost.
    failed_on_its_own: Option<Error>,
    /// The tasks that read and write, when they are two (see [`Tasks`]).
    tasks: Tasks,
    signals: VecDeque<Up<M>>,
    state: Arc<watch::Sender<ConnectionState>>,
    unavailable: Counter,
    closed: bool,
    /// A close began: the connection ending now is the close, not a loss to reconnect from.
    closing: bool,
    /// The backlog was sent on this layer's own initiative: flush it without waiting for a
    /// flush from above (which only comes after new commands).
    flush_backlog: bool,
    /// The connection's `poll_ready` calls that failed in a row (see [`READY_FAILURES_MAX`]).
    ready_failures: u32,
}

// Nothing is pinned in place: the connection and its futures are boxed.
impl<F: MakeTransport, M> Unpin for Reconnect<F, M> {}

/// Dropped without a close (an event target's close that ran out of time, say): the state
/// says so, for whoever waits for [`ConnectionState::Closed`].
impl<F: MakeTransport, M> Drop for Reconnect<F, M> {
    fn drop(&mut self) {
        if !self.closed {
            self.state.send_replace(ConnectionState::Closed);
        }
    }
}

impl<F: MakeTransport, M> fmt::Debug for Reconnect<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conn = match &self.conn {
            Conn::Idle => "idle",
            Conn::Connecting(_) => "connecting",
            Conn::Waiting(_) => "waiting",
            Conn::Up(_) => "connected",
            Conn::GaveUp(_) if self.closed => "closed",
            Conn::GaveUp(_) => "gave up",
        };
        f.debug_struct("Reconnect")
            .field("conn", &conn)
            .field("attempt", &self.attempt)
            .field("active", &self.active.len())
            .field("buffered", &self.buffered)
            .field("unacked", &self.unacked.len())
            .finish()
    }
}

impl<F, M> Reconnect<F, M>
where
    F: MakeTransport,
    F::Transport: Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>>>,
    M: Clone,
{
    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// The topics that will be replayed on the next connection.
    pub fn active(&self) -> impl Iterator<Item = &Topic> {
        self.active.iter()
    }

    /// The current connection, if there is one.
    pub fn get_ref(&self) -> Option<&F::Transport> {
        match &self.conn {
            Conn::Up(transport) => Some(transport),
            _ => None,
        }
    }

    fn set_state(&self, state: ConnectionState) {
        self.state.send_replace(state);
    }

    /// The connection ended: during a close, that is the close (the stream ends after what
    /// waits); otherwise it was lost (see [`lost`](Self::lost)).
    fn ended_or_lost(&mut self, error: Error) {
        if self.closing {
            self.closed = true;
            // A writer closing waits on the connection that ended.
            self.tasks.wake_all();
        } else {
            self.lost(error);
        }
    }

    /// The connection's `poll_ready` failed with `error`, which is not unrecoverable: it is
    /// the caller's to handle (`Some`), unless [`READY_FAILURES_MAX`] calls in a row failed:
    /// then the connection is taken for lost (`None`).
    fn ready_failed(&mut self, error: Error) -> Option<Error> {
        self.ready_failures += 1;
        if self.ready_failures < READY_FAILURES_MAX {
            return Some(error);
        }
        let failures = self.ready_failures;
        self.lost(Error::with_source(
            ErrorKind::ConnectionLost,
            format!("the connection failed {failures} calls in a row to take a command (poll_ready), taken for lost; the last: {error}"),
            error,
        ));
        None
    }

    /// The current connection failed: keep what it had not flushed, and plan the next one.
    fn lost(&mut self, error: Error) {
        let stable = self
            .up_since
            .is_some_and(|since| since.elapsed() >= self.backoff.get_stable_after());
        if stable {
            self.attempt = 0;
        }
        tracing::warn!(%error, "transport connection lost; reconnecting");
        // A side waiting on the connection lost (its stream, its sink) is woken to see the
        // next one.
        self.tasks.wake_all();
        if !self.held.is_empty() {
            // Messages of the connection now lost, which were waiting for its replay: they go
            // after the notice of that reconnect (the next one is told again).
            self.announce_now();
        }
        // Publishes the failed connection may not have delivered go first, then the backlog's.
        let mut backlog = VecDeque::with_capacity(self.unacked.len() + self.backlog.len());
        let mut buffered = 0;
        for (topic, message) in self.unacked.take() {
            backlog.push_back(Command::Publish { topic, message });
            buffered += 1;
        }
        // Never sent: the topic is no longer active, so it is not replayed.
        let mut never_sent = Vec::new();
        for command in self.backlog.drain(..) {
            match command {
                publish @ Command::Publish { .. } => {
                    backlog.push_back(publish);
                    buffered += 1;
                }
                // The replay on the next connection covers it.
                Command::Subscribe(_) => {}
                Command::Unsubscribe(topic) => never_sent.push(topic),
            }
        }
        self.backlog = backlog;
        self.buffered = buffered;
        // Unconfirmed replays go back to waiting on the next one.
        for (topic, covered) in self.replaying.drain() {
            if covered > 0 {
                *self.pending_up.entry(topic).or_default() += covered;
            }
        }
        // Subscribes for topics left since will never be confirmed: answer them now, before
        // the unsubscribes that came after them (answers go in the order of the commands).
        let active = &self.active;
        let signals = &mut self.signals;
        self.pending_up.retain(|topic, count| {
            if active.contains(topic) {
                return true;
            }
            signals.extend((0..*count).map(|_| Up::Subscribed(topic.clone())));
            false
        });
        // Unsubscribes the dead connection never confirmed: done, with the connection; then
        // those it was never sent.
        for (topic, count) in self.unsubscribing.drain() {
            self.signals
                .extend((0..count).map(|_| Up::Unsubscribed(topic.clone())));
        }
        self.signals
            .extend(never_sent.into_iter().map(Up::Unsubscribed));
        self.up_since = None;
        self.announce = self.ever_connected;
        if stable {
            self.last_failure = Some(error);
            self.conn = Conn::Idle;
        } else {
            self.retry_later(error);
        }
    }

    /// Stops reconnecting: every command fails from now on with `why` and the last failure.
    fn give_up(&mut self, why: String, error: Error) {
        tracing::error!(%error, attempts = self.attempt, "giving up reconnecting: {why}");
        self.tasks.wake_all();
        self.set_state(ConnectionState::GaveUp);
        self.conn = Conn::GaveUp(Error::wrap(ErrorKind::Connect, why, error));
    }

    fn retry_later(&mut self, error: Error) {
        self.last_failure = Some(error.clone());
        if self
            .backoff
            .get_max_attempts()
            .is_some_and(|max| self.attempt >= max)
        {
            let why = format!("gave up after {} connection attempts", self.attempt);
            self.give_up(why, error);
            return;
        }
        let delay = self.backoff.delay(self.attempt.max(1));
        self.set_state(ConnectionState::Waiting {
            attempt: self.attempt,
            delay,
        });
        self.conn = Conn::Waiting(Box::pin(tokio::time::sleep(delay)));
    }

    fn connected(&mut self, transport: F::Transport) {
        self.conn = Conn::Up(Box::pin(transport));
        self.last_failure = None;
        self.ready_failures = 0;
        self.up_since = Some(Instant::now());
        self.set_state(ConnectionState::Connected);
        // Replay every subscription before anything else.
        let mut replay = VecDeque::with_capacity(self.active.len() + self.backlog.len());
        for topic in &self.active {
            let covered = self.pending_up.remove(topic).unwrap_or(0);
            self.replaying.insert(topic.clone(), covered);
            replay.push_back(Command::Subscribe(topic.clone()));
        }
        replay.append(&mut self.backlog);
        self.backlog = replay;
        if self.ever_connected {
            tracing::info!(
                replayed = self.replaying.len(),
                buffered = self.buffered,
                "transport reconnected"
            );
        }
        self.ever_connected = true;
        self.maybe_announce();
    }

    /// The first connection attempt has not ended yet (no connection was ever up, and none
    /// failed).
    fn first_attempt_in_flight(&self) -> bool {
        !self.ever_connected && self.attempt <= 1 && matches!(self.conn, Conn::Connecting(_))
    }

    fn maybe_announce(&mut self) {
        if self.announce && self.replaying.is_empty() {
            self.announce_now();
        }
    }

    /// Tells of the reconnect, and then of the messages held until it was told.
    fn announce_now(&mut self) {
        self.announce = false;
        self.signals.push_back(Up::Reconnected);
        self.signals.extend(self.held.drain(..));
        self.held_bytes = 0;
    }

    /// A message that came on a new connection before its replay was confirmed: it waits for
    /// the reconnect notice, or it brings the notice forward once [`HOLD_MAX`] wait, or
    /// [`HOLD_MAX_BYTES`].
    fn hold(&mut self, message: Up<M>) {
        let size = match &message {
            Up::Message { channel, message } => self.unacked.size_of(channel.as_ref(), message),
            _ => 0,
        };
        if self.held.len() < HOLD_MAX && self.held_bytes + size <= HOLD_MAX_BYTES {
            self.held_bytes += size;
            self.held.push_back(message);
        } else {
            self.announce_now();
            self.signals.push_back(message);
        }
    }

    /// [`poll_drained`](Self::poll_drained) for the reading (or writing) side: what it polls
    /// there (the connection being made, the backoff, the backlog's sending) wakes the other
    /// side too, if that is another task (see [`Tasks`]).
    #[inline]
    fn poll_drained_shared(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<Result<()>> {
        if matches!(self.conn, Conn::Up(_)) && self.backlog.is_empty() {
            // Drained: nothing to poll (every publish of a steady stream).
            return Poll::Ready(Ok(()));
        }
        let joint = self.tasks.joint(cx, reading);
        with_joint(cx, joint, |cx| self.poll_drained(cx))
    }

    /// The waker for the writer's own calls on the connection: its own, but while the reader
    /// flushes a replayed backlog, one that wakes the reader too (the writer's poll replaces
    /// the reader's wake-up there, and may be dropped before it is done).
    fn writer_joint(&mut self, cx: &Context<'_>) -> Option<Waker> {
        if self.flush_backlog {
            self.tasks.joint(cx, false)
        } else {
            None
        }
    }

    /// [`poll_connected`](Self::poll_connected), as [`poll_drained_shared`](Self::poll_drained_shared).
    fn poll_connected_shared(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<Result<()>> {
        let joint = self.tasks.joint(cx, reading);
        with_joint(cx, joint, |cx| self.poll_connected(cx))
    }

    /// Drives the connection until it is up (`Ready(Ok)`), or has given up (`Ready(Err)`).
    fn poll_connected(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            match &mut self.conn {
                Conn::Up(_) => return Poll::Ready(Ok(())),
                Conn::GaveUp(error) => return Poll::Ready(Err(error.clone())),
                Conn::Idle => {
                    self.attempt += 1;
                    self.set_state(ConnectionState::Connecting {
                        attempt: self.attempt,
                    });
                    self.conn = Conn::Connecting(Box::pin(self.factory.make_transport()));
                }
                Conn::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Ok(transport) => self.connected(transport),
                    // The first connection failed in a way no retry can mend (see
                    // `Error::is_permanent`): an invalid setting, or credentials refused.
                    Err(error) if error.is_permanent() && !self.ever_connected => {
                        let why = "gave up connecting, as retrying cannot succeed";
                        self.give_up(why.to_owned(), error)
                    }
                    Err(error) => {
                        tracing::warn!(%error, attempt = self.attempt, "connecting failed");
                        self.retry_later(error);
                    }
                },
                Conn::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.conn = Conn::Idle;
                }
            }
        }
    }

    /// Drives the connection and sends the backlog; `Ready(Ok)` once it is all handed over.
    fn poll_drained(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            ready!(self.poll_connected(cx))?;
            let Conn::Up(transport) = &mut self.conn else {
                continue;
            };
            if self.backlog.is_empty() {
                return Poll::Ready(Ok(()));
            }
            match transport.as_mut().poll_ready(cx) {
                Poll::Pending => {
                    self.ready_failures = 0;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => self.ready_failures = 0,
                Poll::Ready(Err(error)) if error.is_unrecoverable() => {
                    self.lost(error);
                    continue;
                }
                Poll::Ready(Err(error)) => {
                    let Some(error) = self.ready_failed(error) else {
                        // Replaced: see `poll_ready`.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    };
                    // A failure the transport reports late (an earlier command's): not this
                    // command's, reported by the next flush from above. Try again, after
                    // letting other tasks run (a transport that keeps saying so must not
                    // hold the thread).
                    tracing::warn!(%error, "the transport reported an error while the backlog was sent");
                    self.failed_on_its_own.get_or_insert(error);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let command = self.backlog.pop_front().expect("the backlog is not empty");
            self.flush_backlog = true;
            let published = matches!(command, Command::Publish { .. });
            if let Command::Publish { topic, message } = &command {
                self.buffered -= 1;
                self.unacked.push(topic.clone(), message.clone());
            }
            let unsubscribed = match &command {
                Command::Unsubscribe(topic) => Some(topic.clone()),
                _ => None,
            };
            let subscribed = match &command {
                Command::Subscribe(topic) => Some(topic.clone()),
                _ => None,
            };
            match transport.as_mut().start_send(command) {
                Ok(()) => {
                    if let Some(topic) = unsubscribed {
                        *self.unsubscribing.entry(topic).or_default() += 1;
                    }
                }
                Err(error) if error.is_unrecoverable() => {
                    self.lost(error);
                    if let Some(topic) = unsubscribed {
                        self.signals.push_back(Up::Unsubscribed(topic));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the transport refused a buffered command");
                    if let Some(topic) = unsubscribed {
                        self.signals.push_back(Up::Unsubscribed(topic));
                    }
                    if let Some(topic) = subscribed {
                        // Answered as the peer's refusal would be: a replay refused for now
                        // connects again later, anything else ends the topic.
                        self.subscribe_refused(topic, error);
                        continue;
                    }
                    if published {
                        // Refused for good: not to be sent again after a reconnect.
                        self.unacked.pop();
                        self.failed_on_its_own.get_or_insert(error);
                    }
                }
            }
        }
    }

    /// The peer refused a subscribe for good: answer whoever waits for it, and stop replaying
    /// the topic. A topic that was in effect and answers no subscribe from above (refused
    /// when it was subscribed again after a reconnect, or dropped by the transport itself) is
    /// told unprompted, so that its subscribers do not wait for events that no longer come.
    fn answer_failed(&mut self, topic: Topic, error: Error) {
        tracing::warn!(%topic, %error, "a subscription was refused");
        // A subscribe from above sent since the connection came up waits for its own answer,
        // and keeps the topic active until then.
        let fresh = self.pending_up.contains_key(&topic);
        if let Some(covered) = self.replaying.remove(&topic) {
            if !fresh {
                self.active.remove(&topic);
            }
            // The answers of the subscribes from above that the replay covers. Covering none,
            // it was of a topic in effect: told unprompted, unless the topic was left and
            // subscribed again since (that subscribe is answered on its own).
            let answers = if covered == 0 && !fresh { 1 } else { covered };
            self.signals
                .extend((0..answers).map(|_| Up::SubscribeFailed(topic.clone(), error.clone())));
            self.maybe_announce();
            return;
        }
        if let Some(count) = self.pending_up.get_mut(&topic) {
            *count -= 1;
            if *count == 0 {
                self.pending_up.remove(&topic);
                self.active.remove(&topic);
            }
            self.signals.push_back(Up::SubscribeFailed(topic, error));
            return;
        }
        if self.active.remove(&topic) {
            self.signals.push_back(Up::SubscribeFailed(topic, error));
        }
    }

    /// A subscribe was refused. A replay refused for now (a server busy with a script, a
    /// cluster between masters) is not refused for good: connect again after the backoff
    /// (never at once: the connection is not stable, whatever `stable_after` says) and replay
    /// then, rather than drop a subscription its listeners still hold. It counts as a failed
    /// attempt. Anything else is answered (see [`answer_failed`](Self::answer_failed)).
    fn subscribe_refused(&mut self, topic: Topic, error: Error) {
        if error.is_transient() && self.replaying.contains_key(&topic) {
            self.up_since = None;
            self.lost(Error::with_source(
                ErrorKind::ConnectionLost,
                format!("subscribing to {topic} again was refused for now ({error}): connecting again later"),
                error,
            ));
        } else {
            let before = self.signals.len();
            self.answer_failed(topic, error);
            self.hold_signals_from(before);
        }
    }

    /// While messages are held, what was added to the signals from `from` on waits behind
    /// them, in order (a topic's messages come before its end).
    fn hold_signals_from(&mut self, from: usize) {
        if !self.held.is_empty() && from < self.signals.len() {
            self.held.extend(self.signals.drain(from..));
        }
    }

    fn answer_subscribed(&mut self, topic: Topic) {
        if let Some(covered) = self.replaying.remove(&topic) {
            self.signals
                .extend((0..covered).map(|_| Up::Subscribed(topic.clone())));
            self.maybe_announce();
            return;
        }
        match self.pending_up.get_mut(&topic) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.pending_up.remove(&topic);
                }
                // Behind held messages, as the other answers (in the order of the commands).
                if self.held.is_empty() {
                    self.signals.push_back(Up::Subscribed(topic));
                } else {
                    self.held.push_back(Up::Subscribed(topic));
                }
            }
            None => tracing::debug!(%topic, "swallowed a confirmation nobody waits for"),
        }
    }
}

impl<F, M> Reconnect<F, M>
where
    F: MakeTransport,
    F::Transport: Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>>>,
    M: Clone,
{
    fn poll_ready_now(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self;
        loop {
            match this.poll_drained_shared(cx, false) {
                // The first connection is still being made and the buffer is full: wait for
                // it (woken by the attempt). No outage has begun, so refusing would only lose
                // the start of a burst published right after the transport was built.
                Poll::Pending if this.first_attempt_in_flight() && this.buffered >= this.buffer => {
                    return Poll::Pending
                }
                // Down: accept into the buffer (or refuse in `start_send`).
                Poll::Pending if !matches!(this.conn, Conn::Up(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {}
            }
            let joint = this.writer_joint(cx);
            let Conn::Up(transport) = &mut this.conn else {
                continue;
            };
            if this.unacked.full() {
                // Kept to be sent again: wait for a flush before keeping more (see
                // `MAX_UNFLUSHED`). With nothing more fed, it completes.
                match ready!(with_joint(cx, joint, |cx| transport
                    .as_mut()
                    .poll_flush(cx)))
                {
                    Ok(()) => {
                        this.unacked.clear();
                        this.flush_backlog = false;
                    }
                    Err(error) if error.is_unrecoverable() => this.lost(error),
                    Err(error) => {
                        // Reported by the next flush from above, which covers them.
                        tracing::warn!(%error, "flushing to make room for more publishes failed");
                        this.unacked.clear();
                        this.failed_on_its_own.get_or_insert(error);
                    }
                }
                continue;
            }
            match with_joint(cx, joint, |cx| transport.as_mut().poll_ready(cx)) {
                Poll::Pending => {
                    this.ready_failures = 0;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {
                    this.ready_failures = 0;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(error)) if error.is_unrecoverable() => this.lost(error),
                Poll::Ready(Err(error)) => match this.ready_failed(error) {
                    Some(error) => return Poll::Ready(Err(error)),
                    // Replaced: the caller sees it wait once, not a run of failures that
                    // goes on from the old connection to the new one.
                    None => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                },
            }
        }
    }

    fn poll_flush_now(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self;
        loop {
            if !matches!(this.conn, Conn::Up(_)) && this.buffered == 0 && this.unacked.is_empty() {
                // Nothing waits to be delivered; keep the connection moving.
                if let Poll::Ready(Err(error)) = this.poll_connected_shared(cx, false) {
                    return Poll::Ready(Err(error));
                }
                if !matches!(this.conn, Conn::Up(_)) {
                    return Poll::Ready(Ok(()));
                }
            }
            ready!(this.poll_drained_shared(cx, false))?;
            let joint = this.writer_joint(cx);
            let Conn::Up(transport) = &mut this.conn else {
                continue;
            };
            match ready!(with_joint(cx, joint, |cx| transport
                .as_mut()
                .poll_flush(cx)))
            {
                Ok(()) => {
                    this.unacked.clear();
                    this.flush_backlog = false;
                    if let Some(error) = this.failed_on_its_own.take() {
                        return Poll::Ready(Err(error));
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.is_unrecoverable() => this.lost(error),
                Err(error) => {
                    // Reported above, which owns the outcome now (a retry layer sends them
                    // again, a confirmed dispatch learns of it): not to be sent again by the
                    // next connection too. It answers everything since the last flush, what
                    // failed on the layer's own initiative included.
                    this.unacked.clear();
                    this.failed_on_its_own = None;
                    return Poll::Ready(Err(error));
                }
            }
        }
    }

    fn poll_close_now(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self;
        this.closing = true;
        // Deliver what waits first, then close the connection. Closed either way: a failure is
        // reported, and the layer does not connect again.
        let mut result = Ok(());
        if this.buffered > 0 || !this.unacked.is_empty() {
            result = ready!(this.poll_flush_now(cx));
        }
        if let (Ok(()), Conn::Up(transport)) = (&result, &mut this.conn) {
            result = ready!(transport.as_mut().poll_close(cx));
        }
        if !this.held.is_empty() {
            // Messages already read, held for a reconnect notice: they are still told.
            this.announce_now();
        }
        this.closed = true;
        // Used again, the layer refuses (and does not connect anew).
        this.conn = Conn::GaveUp(Error::closed("the reconnecting transport is closed"));
        this.set_state(ConnectionState::Closed);
        Poll::Ready(result)
    }

    fn start_send_now(&mut self, command: Command<M>) -> Result<()> {
        let this = self;
        if let Conn::GaveUp(error) = &this.conn {
            return Err(error.clone());
        }
        let up = matches!(this.conn, Conn::Up(_)) && this.backlog.is_empty();
        // A subscribe the transport refuses is undone (see below): whether it made the topic
        // active.
        let mut activated = false;
        match &command {
            Command::Subscribe(topic) => {
                activated = this.active.insert(topic.clone());
                *this.pending_up.entry(topic.clone()).or_default() += 1;
                if !up {
                    if matches!(this.conn, Conn::Up(_)) {
                        // Connected, still sending the backlog: queue behind it.
                        this.backlog.push_back(command);
                    }
                    // Down: the replay on the next connection sends and confirms it.
                    return Ok(());
                }
            }
            Command::Unsubscribe(topic) => {
                this.active.remove(topic);
                if !matches!(this.conn, Conn::Up(_)) {
                    if let Some(count) = this.pending_up.remove(topic) {
                        this.signals
                            .extend((0..count).map(|_| Up::Subscribed(topic.clone())));
                    }
                    this.signals.push_back(Up::Unsubscribed(topic.clone()));
                    return Ok(());
                }
                if !up {
                    this.backlog.push_back(command);
                    return Ok(());
                }
            }
            Command::Publish { topic, .. } => {
                if !up {
                    if this.buffered >= this.buffer && !matches!(this.conn, Conn::Up(_)) {
                        let refused = this.unavailable.increment();
                        let message = format!(
                            "publishing to {topic}: the transport is {} (attempt {}) and its buffer of {} publishes is full ({refused} refused so far)",
                            if this.ever_connected { "reconnecting" } else { "connecting" },
                            this.attempt, this.buffer
                        );
                        // Why it is down, as its source too.
                        return Err(match &this.last_failure {
                            Some(cause) => Error::with_source(
                                ErrorKind::Unavailable,
                                format!("{message}; last failure: {cause}"),
                                cause.clone(),
                            ),
                            None => Error::new(ErrorKind::Unavailable, message),
                        });
                    }
                    this.buffered += 1;
                    this.backlog.push_back(command);
                    return Ok(());
                }
                if this
                    .failed_on_its_own
                    .as_ref()
                    .is_some_and(Error::is_transient)
                {
                    // A send of this layer's own was refused for now (the replayed backlog):
                    // the next flush from above reports it, answering everything fed since
                    // the last one, this publish too. Sent now, it would arrive before the
                    // refused ones a retry layer sends again, and again after them: as the
                    // Redis transports do after a refused pipeline, it is not sent.
                    return Ok(());
                }
            }
        }
        let Conn::Up(transport) = &mut this.conn else {
            unreachable!("checked above");
        };
        let kept = match &command {
            Command::Publish { topic, message } => Some((topic.clone(), message.clone())),
            _ => None,
        };
        let published = kept.is_some();
        let unsubscribed = match &command {
            Command::Unsubscribe(topic) => Some(topic.clone()),
            _ => None,
        };
        let subscribed = match &command {
            Command::Subscribe(topic) => Some(topic.clone()),
            _ => None,
        };
        if let Some((topic, message)) = kept {
            this.unacked.push(topic, message);
        }
        match transport.as_mut().start_send(command) {
            Ok(()) => {
                if let Some(topic) = unsubscribed {
                    *this.unsubscribing.entry(topic).or_default() += 1;
                }
                Ok(())
            }
            Err(error) if error.is_unrecoverable() => {
                // Kept in `unacked` (a publish) or in `active` (a subscribe): the next
                // connection sends it. An unsubscribe is done with the connection.
                this.lost(error);
                if let Some(topic) = unsubscribed {
                    this.signals.push_back(Up::Unsubscribed(topic));
                }
                Ok(())
            }
            Err(error) => {
                if published {
                    this.unacked.pop();
                }
                if let Some(topic) = subscribed {
                    // Refused, and answered by this error: not in effect, not to be replayed,
                    // and no answer is owed.
                    if let Some(count) = this.pending_up.get_mut(&topic) {
                        *count -= 1;
                        if *count == 0 {
                            this.pending_up.remove(&topic);
                        }
                    }
                    if activated {
                        this.active.remove(&topic);
                    }
                }
                Err(error)
            }
        }
    }

    /// After a writing call: the reading side learns what it has to tell (answers queued
    /// for it), or that the layer closed, if it is another task.
    fn told_reader(&self) {
        if !self.signals.is_empty() || self.closed {
            self.tasks.wake_reader();
        }
    }
}

impl<F, M> Sink<Command<M>> for Reconnect<F, M>
where
    F: MakeTransport,
    F::Transport: Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>>>,
    M: Clone,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.tasks.remember(cx, false);
        let result = this.poll_ready_now(cx);
        this.told_reader();
        result
    }

    fn start_send(self: Pin<&mut Self>, command: Command<M>) -> Result<()> {
        let this = self.get_mut();
        let result = this.start_send_now(command);
        this.told_reader();
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.tasks.remember(cx, false);
        let result = this.poll_flush_now(cx);
        this.told_reader();
        result
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.tasks.remember(cx, false);
        let result = this.poll_close_now(cx);
        this.told_reader();
        result
    }
}

impl<F, M> Stream for Reconnect<F, M>
where
    F: MakeTransport,
    F::Transport: Sink<Command<M>, Error = Error> + Stream<Item = Result<Up<M>>>,
    M: Clone,
{
    type Item = Result<Up<M>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Remembered for the writing side (see `Tasks`); what only this side waits on (the
        // connection's stream) is polled with this task's waker alone.
        this.tasks.remember(cx, true);
        loop {
            if let Some(signal) = this.signals.pop_front() {
                return Poll::Ready(Some(Ok(signal)));
            }
            if this.closed {
                return Poll::Ready(None);
            }
            // Sending the backlog may be pending while reading goes on. Connected with no
            // backlog (every message of a steady stream), there is nothing to drive.
            if !(matches!(this.conn, Conn::Up(_)) && this.backlog.is_empty()) {
                match this.poll_drained_shared(cx, true) {
                    Poll::Ready(Err(error)) => {
                        this.closed = true;
                        return Poll::Ready(Some(Err(error)));
                    }
                    // What that told (answers, a reconnect) goes before what the transport
                    // says next.
                    _ if !this.signals.is_empty() => continue,
                    Poll::Pending if !matches!(this.conn, Conn::Up(_)) => return Poll::Pending,
                    _ => {}
                }
            }
            if this.flush_backlog && this.backlog.is_empty() {
                // With a waker of both tasks: a writer waiting on the connection (for room, or
                // for its own flush), whose wake-up this poll replaces, is woken with it. (Over
                // Redis, which wakes "the reader, if another" when another waker reads for an
                // answer, this task is woken again at each poll until the replayed subscribes
                // are answered: a round trip of busy polling, in split use only.)
                let joint = this.tasks.joint(cx, true);
                let Conn::Up(transport) = &mut this.conn else {
                    continue;
                };
                match with_joint(cx, joint, |cx| transport.as_mut().poll_flush(cx)) {
                    Poll::Ready(Ok(())) => {
                        this.unacked.clear();
                        this.flush_backlog = false;
                    }
                    Poll::Ready(Err(error)) if error.is_unrecoverable() => {
                        this.ended_or_lost(error);
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        // Reported by the next flush from above (see `poll_flush`).
                        this.unacked.clear();
                        this.flush_backlog = false;
                        tracing::warn!(%error, "flushing the replayed backlog failed");
                        this.failed_on_its_own.get_or_insert(error);
                    }
                    Poll::Pending => {}
                }
            }
            let Conn::Up(transport) = &mut this.conn else {
                continue;
            };
            match ready!(transport.as_mut().poll_next(cx)) {
                Some(Ok(Up::Subscribed(topic))) => this.answer_subscribed(topic),
                // A replay refused for now connects again later (see `subscribe_refused`).
                Some(Ok(Up::SubscribeFailed(topic, error))) => this.subscribe_refused(topic, error),
                Some(Ok(Up::Unsubscribed(topic))) => {
                    if let Some(count) = this.unsubscribing.get_mut(&topic) {
                        *count -= 1;
                        if *count == 0 {
                            this.unsubscribing.remove(&topic);
                        }
                    }
                    if this.held.is_empty() {
                        return Poll::Ready(Some(Ok(Up::Unsubscribed(topic))));
                    }
                    this.held.push_back(Up::Unsubscribed(topic));
                }
                Some(Ok(message @ Up::Message { .. })) if this.announce => {
                    this.hold(message);
                }
                // Behind held messages, whatever comes waits its turn (and counts toward the
                // bound).
                Some(Ok(up)) if !this.held.is_empty() => this.hold(up),
                Some(Ok(up)) => return Poll::Ready(Some(Ok(up))),
                Some(Err(error)) if error.is_unrecoverable() => {
                    if this.closing {
                        this.closed = true;
                        // A writer closing waits on the connection that failed.
                        this.tasks.wake_all();
                        return Poll::Ready(Some(Err(error)));
                    }
                    this.lost(error);
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.ended_or_lost(Error::connection_lost("the transport's stream ended")),
            }
        }
    }
}
