//! Worker transport: a bidirectional pair of bounded channels between two sides, usually two
//! threads — what one side dispatches reaches the listeners of the other.
//!
//! The Rust form of the JavaScript package's worker/main-thread event targets. Envelopes move
//! through the channel; nothing is serialized.
//!
//! ```
//! use alkdev_pubsub::{worker, Envelope, EventTarget};
//! use futures::StreamExt;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), alkdev_pubsub::Error> {
//! // A worker thread that answers every `call.requested:w1` with a `call.responded:<call id>`,
//! // until the main side closes the pair.
//! let (events, worker) = worker::spawn(|events: EventTarget| async move {
//!     let mut calls = events.subscribe("call.requested:w1").await?;
//!     while let Some(call) = calls.next().await {
//!         let Ok(call) = call else { continue }; // a gap notice
//!         let call_id = call.payload["call"].as_str().unwrap_or_default().to_owned();
//!         let answer = Envelope::new("call.responded", call_id, 42.into());
//!         if events.dispatch_event(answer).await.is_err() {
//!             break; // the main side closed meanwhile
//!         }
//!     }
//!     Ok::<(), alkdev_pubsub::Error>(())
//! })?;
//!
//! let mut answers = events.subscribe("call.responded:c1").await?;
//! // The worker subscribes on its own thread: call again until it has answered.
//! let answer = loop {
//!     events
//!         .dispatch_event(Envelope::new("call.requested", "w1", serde_json::json!({ "call": "c1" })))
//!         .await?;
//!     if let Ok(Some(answer)) =
//!         tokio::time::timeout(std::time::Duration::from_millis(50), answers.next()).await
//!     {
//!         break answer;
//!     }
//! };
//! assert_eq!(answer.unwrap().payload, 42);
//! events.close().await;
//! worker.join().expect("the worker thread did not panic")?;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use futures::{FutureExt, Sink, Stream};

use crate::layers::{Command, Envelope, Error, ErrorKind, Result, Up};
use crate::EventTarget;

/// How long a reader in the middle of a burst looks for more before it asks to be woken (see
/// [`WorkerTransport`]).
const SPIN: Duration = Duration::from_micros(2);

/// About how long a reader spins in all, from one time it asks to be woken to the next: a writer
/// that trickles envelopes a microsecond or two apart does not keep the reader's thread (and
/// the tasks it would run) busy for long.
const SPIN_BUDGET: Duration = Duration::from_micros(50);

/// A reader that took at least this many envelopes since it last asked to be woken is in a
/// burst, and waits [`SPIN`] for more; a lone envelope's reader asks to be woken at once.
const BURST: usize = 2;

/// A buffer the reader hands back to the writer keeps at most this many slots when the reader
/// last took at most a quarter of that: a burst's buffers do not stay at their largest for the
/// life of the pair.
const KEEP_SLOTS: usize = 1024;

/// The default capacity of a pair made by [`spawn`], in envelopes.
pub const DEFAULT_CAPACITY: usize = 4096;

/// One side of a worker pair, made by [`channel`].
///
/// Publishing sends the envelope to the other side; subscribing is local (the other side sends
/// everything it publishes, and this side's event target keeps what has listeners) and is
/// confirmed at once. When the other side is dropped, this side's stream ends.
///
/// An envelope is the other side's to read as soon as it is sent: a flush has nothing to do.
/// The reader takes everything sent since it last looked in one go, so a burst travels in
/// batches as large as the reader lets it grow, and a lone envelope is not delayed. Event
/// targets over this transport should flush after each publish
/// ([`Builder::flush_each_publish`](crate::Builder::flush_each_publish)):
/// [`into_event_target`](Self::into_event_target) and [`spawn`] set that up.
///
/// A reader that drains a burst looks for more for up to two microseconds, spinning, before it
/// asks to be woken (about 50 µs at most in all between two sleeps): a reader that keeps up with its
/// writer would otherwise go to sleep every few envelopes, and waking a sleeping thread costs
/// both threads a system call (see BENCHMARKS.md, eighth session). It spins in the task that
/// reads the transport, which holds the event target meanwhile. A reader that took a lone
/// envelope does not wait, nor does one on the thread of the last send, nor one in a process
/// that may run only one thread at a time (`std::thread::available_parallelism`).
pub struct WorkerTransport<P = serde_json::Value> {
    /// The direction this side writes, and the one it reads.
    out: Arc<Pipe<P>>,
    input: Arc<Pipe<P>>,
    /// What the writer knows there is room for without looking (the reader only makes more).
    room: usize,
    /// Taken from `input`, not yet yielded.
    incoming: VecDeque<Envelope<P>>,
    /// Answers to this side's commands, each with the count of envelopes to yield before it
    /// (see [`yielded`](Self::yielded)).
    signals: VecDeque<(Up<Envelope<P>>, u64)>,
    /// How many envelopes this side's stream yielded.
    yielded: u64,
    reader: Option<Waker>,
    /// How many envelopes the reader took since it last asked to be woken (see [`BURST`]).
    taken_awake: usize,
    /// How long the reader spun since it last asked to be woken (see [`SPIN_BUDGET`]).
    spun: Duration,
    /// How many times the reader spun, in all.
    spins: u64,
    /// How many envelopes the reader took last time.
    last_taken: usize,
    closed: bool,
}

/// One direction of a pair: what the writer sent and the reader has not taken yet.
struct Pipe<P> {
    state: Mutex<PipeState<P>>,
    capacity: usize,
    /// Set under the lock when envelopes come into an empty pipe or the writer leaves, and
    /// cleared when the reader takes them: a spinning reader looks at this, not at the lock.
    news: AtomicBool,
}

struct PipeState<P> {
    items: Vec<Envelope<P>>,
    /// The reader found nothing and waits.
    reader: Option<Waker>,
    /// The writer found no room and waits.
    writer: Option<Waker>,
    /// The writer closed its side, or was dropped: once `items` is taken, the stream ends.
    writer_gone: bool,
    /// The reader was dropped: sending fails.
    reader_gone: bool,
    /// The thread of the last send (`queue::this_thread`): a reader on that thread is likely
    /// the writer's only task runner too, and would not see more come while it spins.
    writer_thread: usize,
}

impl<P> Pipe<P> {
    fn new(capacity: usize) -> Self {
        Pipe {
            state: Mutex::new(PipeState {
                items: Vec::new(),
                reader: None,
                writer: None,
                writer_gone: false,
                reader_gone: false,
                writer_thread: 0,
            }),
            capacity: capacity.max(1),
            news: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PipeState<P>> {
        // No envelope's `Drop` runs under this lock, and each update under it leaves the state
        // consistent (a push that fails to allocate aborts): a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spins until envelopes come or the writer leaves ([`Pipe::news`]), or for about `spin`;
    /// returns how long it spun.
    fn wait_for_news(&self, spin: Duration) -> Duration {
        let started = Instant::now();
        loop {
            // A look every 32 turns, not at each: what comes meanwhile is taken in the same
            // go (measured: looking at every turn took about 5 % off the worker benchmark).
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            let spun = started.elapsed();
            if self.news.load(Relaxed) || spun >= spin {
                return spun;
            }
        }
    }

    /// Marks the writer gone and wakes a waiting reader.
    fn close_writer(&self) {
        let reader = {
            let mut state = self.lock();
            state.writer_gone = true;
            self.news.store(true, Relaxed);
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl<P> Unpin for WorkerTransport<P> {}

impl<P> fmt::Debug for WorkerTransport<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerTransport")
            .field("unread", &self.incoming.len())
            .field("spins", &self.spins)
            .field("closed", &self.closed)
            .finish()
    }
}

/// A connected pair: what one side publishes comes up the other side's stream.
///
/// Each direction holds up to `capacity` envelopes the reader has not taken (and the reader
/// holds what it took and has not yielded yet); a publisher waits for room beyond that.
pub fn channel<P>(capacity: usize) -> (WorkerTransport<P>, WorkerTransport<P>) {
    let (a_to_b, b_to_a) = (Arc::new(Pipe::new(capacity)), Arc::new(Pipe::new(capacity)));
    (
        WorkerTransport::new(Arc::clone(&a_to_b), Arc::clone(&b_to_a)),
        WorkerTransport::new(b_to_a, a_to_b),
    )
}

impl<P: Send + Sync + 'static> WorkerTransport<P> {
    /// An event target over this side, set up for it: a publishing task flushes as it goes
    /// ([`Builder::flush_each_publish`](crate::Builder::flush_each_publish)), which costs
    /// nothing here and saves waking the driver task. [`EventTarget::new`] works too, only
    /// slower; for other settings, use the builder with that flag.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`Builder::build`](crate::Builder::build): call it on the
    /// runtime that should drive this side (the worker thread's, for the worker's side).
    pub fn into_event_target(self) -> EventTarget<P> {
        EventTarget::builder().flush_each_publish(true).build(self)
    }
}

impl<P> WorkerTransport<P> {
    fn new(out: Arc<Pipe<P>>, input: Arc<Pipe<P>>) -> Self {
        WorkerTransport {
            room: out.capacity,
            out,
            input,
            incoming: VecDeque::new(),
            signals: VecDeque::new(),
            yielded: 0,
            reader: None,
            taken_awake: 0,
            spun: Duration::ZERO,
            spins: 0,
            last_taken: 0,
            closed: false,
        }
    }

    fn peer_gone() -> Error {
        Error::new(
            ErrorKind::ConnectionLost,
            "the other side of the worker channel was dropped",
        )
    }

    fn closed_error() -> Error {
        Error::new(
            ErrorKind::Closed,
            "this side of the worker channel is closed",
        )
    }

    /// Answers a command, once the stream has yielded the first `before` envelopes from now.
    fn signal(&mut self, up: Up<Envelope<P>>, before: u64) {
        self.signals.push_back((up, self.yielded + before));
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl<P> Drop for WorkerTransport<P> {
    fn drop(&mut self) {
        // The other side's stream ends once it has read what was sent...
        self.out.close_writer();
        // ... and a writer waiting for room here learns that there will be none.
        let (writer, unread, own) = {
            let mut state = self.input.lock();
            state.reader_gone = true;
            let items = std::mem::take(&mut state.items);
            (state.writer.take(), items, state.reader.take())
        };
        // This side's own wakers would keep its task alive until the other side is dropped.
        let own_writer = self.out.lock().writer.take();
        drop((unread, own, own_writer));
        if let Some(writer) = writer {
            writer.wake();
        }
    }
}

impl<P> Sink<Command<Envelope<P>>> for WorkerTransport<P> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.room > 0 {
            return Poll::Ready(Ok(()));
        }
        let mut state = this.out.lock();
        if state.reader_gone {
            return Poll::Ready(Err(Self::peer_gone()));
        }
        this.room = this.out.capacity.saturating_sub(state.items.len());
        if this.room > 0 {
            return Poll::Ready(Ok(()));
        }
        crate::waker::remember(&mut state.writer, cx);
        Poll::Pending
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Envelope<P>>) -> Result<()> {
        let this = self.get_mut();
        match command {
            Command::Publish { message, .. } => {
                if this.closed {
                    return Err(Self::closed_error());
                }
                let mut state = this.out.lock();
                if state.reader_gone {
                    drop(state);
                    return Err(Self::peer_gone());
                }
                if state.items.is_empty() {
                    this.out.news.store(true, Relaxed);
                }
                state.items.push(message);
                state.writer_thread = crate::queue::this_thread();
                this.room = this.out.capacity.saturating_sub(state.items.len());
                let reader = state.reader.take();
                drop(state);
                if let Some(reader) = reader {
                    reader.wake();
                }
            }
            // In effect at once: what the other side sends from now on is read.
            Command::Subscribe(topic) => this.signal(Up::Subscribed(topic), 0),
            // In effect once what the other side sent before it is read: the answer comes after
            // it, as a server's would (an event target's close delivers what comes up until
            // its unsubscribes are answered).
            Command::Unsubscribe(topic) => {
                let sent = this.incoming.len() + this.input.lock().items.len();
                this.signal(Up::Unsubscribed(topic), sent as u64)
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        // Sent is readable: nothing to flush. A reader that is gone was reported by the send.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            this.closed = true;
            this.out.close_writer();
        }
        Poll::Ready(Ok(()))
    }
}

impl<P> Stream for WorkerTransport<P> {
    type Item = Result<Up<Envelope<P>>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this
            .signals
            .front()
            .is_some_and(|(_, after)| *after <= this.yielded)
        {
            let (signal, _) = this.signals.pop_front().expect("looked at");
            return Poll::Ready(Some(Ok(signal)));
        }
        if this.incoming.is_empty() {
            // Take everything sent so far, and leave the emptied buffer for the writer (no
            // data moves, and neither side allocates once both buffers have grown).
            let mut drained = Vec::from(std::mem::take(&mut this.incoming));
            if drained.capacity() > KEEP_SLOTS && this.last_taken <= KEEP_SLOTS / 4 {
                // The traffic is small again: a burst's buffer does not stay at its largest
                // (cut down here, not under the lock: no envelope is in it).
                drained.shrink_to(KEEP_SLOTS);
            }
            let mut state = this.input.lock();
            if state.items.is_empty()
                && !state.writer_gone
                && this.taken_awake >= BURST
                && this.spun < SPIN_BUDGET
                && state.writer_thread != crate::queue::this_thread()
                && several_cpus()
            {
                // In a burst: the writer is likely to send more within microseconds.
                drop(state);
                this.spun += this.input.wait_for_news(SPIN);
                this.spins += 1;
                state = this.input.lock();
            }
            if state.items.is_empty() {
                let ended = state.writer_gone;
                if !ended {
                    crate::waker::remember(&mut state.reader, cx);
                }
                drop(state);
                this.incoming = VecDeque::from(drained);
                if ended {
                    return Poll::Ready(None);
                }
                crate::waker::remember(&mut this.reader, cx);
                this.taken_awake = 0;
                this.spun = Duration::ZERO;
                return Poll::Pending;
            }
            this.last_taken = state.items.len();
            this.taken_awake += this.last_taken;
            let batch = std::mem::replace(&mut state.items, drained);
            this.input.news.store(false, Relaxed);
            let writer = state.writer.take();
            drop(state);
            if let Some(writer) = writer {
                writer.wake();
            }
            this.incoming = VecDeque::from(batch);
        }
        let message = this.incoming.pop_front().expect("not empty");
        this.yielded += 1;
        Poll::Ready(Some(Ok(Up::Message {
            channel: None,
            message,
        })))
    }
}

/// Whether this machine runs more than one thread at once: on one CPU, a reader that spins
/// only keeps the writer from running.
fn several_cpus() -> bool {
    static SEVERAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SEVERAL.get_or_init(|| thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// Runs `work` on a new OS thread, with its own single-threaded Tokio runtime and its end of a
/// worker pair as an [`EventTarget`]; returns the main side's event target and the thread's
/// join handle, which yields `work`'s output.
///
/// When `work` returns (or panics), its event target is closed (what it published is flushed
/// first), and the main side's target stops as over a transport that ended: its subscriptions
/// end, and later calls fail with an error of kind [`ErrorKind::Closed`]. Whether `work`
/// returned or panicked, the join handle says.
///
/// Must be called within a Tokio runtime (the main side's driver is spawned on it): outside
/// one, fails with an error of kind [`ErrorKind::Config`], and starts no thread.
///
/// Join the thread once its work is over: after the main side's `close().await`, or once
/// `work` has returned on its own. The worker learns that the main side is gone through the
/// main side's driver, which runs on the caller's runtime: a thread of that runtime blocked
/// in `join` right after dropping the main side's target can keep it from running, and wait
/// for ever.
pub fn spawn<P, F, Fut>(work: F) -> Result<(EventTarget<P>, thread::JoinHandle<Fut::Output>)>
where
    P: Send + Sync + 'static,
    F: FnOnce(EventTarget<P>) -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::new(
            ErrorKind::Config,
            "worker::spawn was called outside a Tokio runtime (the main side's driver runs on the caller's)",
        ));
    }
    let (main_side, worker_side) = channel(DEFAULT_CAPACITY);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::with_source(ErrorKind::Other, "starting a worker's runtime", e))?;
    let mut runtime = Unstarted(Some(runtime));
    let join = thread::Builder::new()
        .name("alkdev-pubsub-worker".into())
        .spawn(move || {
            let runtime = runtime.0.take().expect("the runtime is taken once");
            runtime.block_on(async move {
                let events = worker_side.into_event_target();
                // A panic in `work` still closes its target first, so that what it published
                // goes out (the thread then panics on, for the join handle to say so).
                let working = events.clone();
                let output = std::panic::AssertUnwindSafe(async move { work(working).await })
                    .catch_unwind()
                    .await;
                events.close().await;
                output.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        })
        .map_err(|e| Error::with_source(ErrorKind::Other, "spawning a worker thread", e))?;
    Ok((main_side.into_event_target(), join))
}

/// A worker's runtime on its way to its thread. Should the thread not start, it is dropped
/// here, within the caller's runtime, where dropping a runtime must not block: it shuts down
/// in the background instead (it ran nothing).
struct Unstarted(Option<tokio::runtime::Runtime>);

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Topic;

    type Side = WorkerTransport<u64>;

    fn send(side: &mut Side, n: u64) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert!(Pin::new(&mut *side).poll_ready(&mut cx).is_ready());
        Pin::new(side)
            .start_send(Command::Publish {
                topic: Topic::from("t:1"),
                message: Envelope::new("t", "1", n),
            })
            .unwrap();
    }

    /// Sends `numbers` from another thread.
    fn send_elsewhere(side: Side, numbers: std::ops::Range<u64>) -> Side {
        thread::spawn(move || {
            let mut side = side;
            for n in numbers {
                send(&mut side, n);
            }
            side
        })
        .join()
        .unwrap()
    }

    /// Reads until `Pending`; returns the numbers read.
    fn read(side: &mut Side) -> Vec<u64> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut numbers = Vec::new();
        while let Poll::Ready(Some(Ok(Up::Message { message, .. }))) =
            Pin::new(&mut *side).poll_next(&mut cx)
        {
            numbers.push(message.payload);
        }
        numbers
    }

    #[test]
    fn a_reader_spins_after_a_burst_from_another_thread_only() {
        assert_eq!(
            several_cpus(),
            thread::available_parallelism().is_ok_and(|n| n.get() > 1)
        );
        // On one CPU the reader never spins; elsewhere, as below.
        let spins = |n: u64| if several_cpus() { n } else { 0 };
        let (a, mut b) = channel::<u64>(64);
        // A burst from another thread: the reader looks for more once before it sleeps.
        let mut a = send_elsewhere(a, 0..2);
        assert_eq!(read(&mut b), [0, 1]);
        assert_eq!(b.spins, spins(1));
        // A lone envelope: it sleeps at once.
        a = send_elsewhere(a, 2..3);
        assert_eq!(read(&mut b), [2]);
        assert_eq!(b.spins, spins(1));
        // A burst from its own thread: nothing can come while it spins.
        send(&mut a, 3);
        send(&mut a, 4);
        assert_eq!(read(&mut b), [3, 4]);
        assert_eq!(b.spins, spins(1));
        // With its budget spent, it sleeps at once; with a nanosecond left, it spins; after a
        // sleep, the budget is whole again.
        a = send_elsewhere(a, 5..7);
        b.spun = SPIN_BUDGET;
        assert_eq!(read(&mut b), [5, 6]);
        assert_eq!(b.spins, spins(1));
        assert_eq!(b.spun, Duration::ZERO);
        a = send_elsewhere(a, 7..9);
        b.spun = SPIN_BUDGET - Duration::from_nanos(1);
        assert_eq!(read(&mut b), [7, 8]);
        assert_eq!(b.spins, spins(2));
        let _a = send_elsewhere(a, 9..11);
        assert_eq!(read(&mut b), [9, 10]);
        assert_eq!(b.spins, spins(3));
    }

    #[test]
    fn the_news_flag_follows_what_waits_and_ends_a_spin_at_once() {
        let (mut a, mut b) = channel::<u64>(64);
        assert!(!b.input.news.load(Relaxed));
        send(&mut a, 0);
        assert!(
            b.input.news.load(Relaxed),
            "set by a send into an empty pipe"
        );
        send(&mut a, 1);
        assert_eq!(read(&mut b), [0, 1]);
        assert!(!b.input.news.load(Relaxed), "cleared by the take");
        // Set: a spin ends at once, however long it may last.
        send(&mut a, 2);
        assert!(b.input.wait_for_news(Duration::from_secs(60)) < Duration::from_secs(1));
        assert_eq!(read(&mut b), [2]);
        // Unset: it lasts about as long as asked.
        assert!(b.input.wait_for_news(Duration::from_millis(2)) >= Duration::from_millis(2));
        drop(a);
        assert!(b.input.news.load(Relaxed), "set when the writer leaves");
    }

    #[test]
    fn the_buffers_shrink_back_after_a_large_burst() {
        let (mut a, mut b) = channel::<u64>(4096);
        for n in 0..3000 {
            send(&mut a, n);
        }
        assert_eq!(read(&mut b).len(), 3000);
        // A large take keeps its buffer: the next burst may be as large.
        assert!(b.incoming.capacity() >= 3000 || a.out.lock().items.capacity() >= 3000);
        // Once the traffic is small, each buffer is cut down as it passes the reader.
        for n in 3000..3004 {
            send(&mut a, n);
            assert_eq!(read(&mut b), [n]);
        }
        assert!(a.out.lock().items.capacity() <= KEEP_SLOTS);
        assert!(b.incoming.capacity() <= KEEP_SLOTS);
    }
}
