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
//! // A worker thread that answers every `call.requested:w1` with a `call.responded:<call id>`.
//! let (events, worker) = worker::spawn(|events: EventTarget| async move {
//!     let mut calls = events.subscribe("call.requested:w1").await?;
//!     let call = calls.next().await.expect("a call").expect("no gap");
//!     let call_id = call.payload["call"].as_str().unwrap_or_default().to_owned();
//!     events
//!         .dispatch_event(Envelope::new("call.responded", call_id, 42.into()))
//!         .await
//! })?;
//!
//! let mut answers = events.subscribe("call.responded:c1").await?;
//! // The worker subscribes on its own thread: retry until it has.
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
//! worker.join().expect("the worker thread did not panic")?;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread;

use futures::channel::mpsc;
use futures::task::AtomicWaker;
use futures::{Sink, Stream};

use crate::layers::{Command, Envelope, Error, ErrorKind, Result, Up};
use crate::EventTarget;

/// Envelopes travel in batches of up to this many: one channel operation per batch.
const MAX_BATCH: usize = 64;

/// The default capacity of a pair made by [`spawn`], in envelopes.
pub const DEFAULT_CAPACITY: usize = 4096;

/// One side of a worker pair, made by [`channel`].
///
/// Publishing sends the envelope to the other side; subscribing is local (the other side sends
/// everything it publishes, and this side's event target keeps what has listeners) and is
/// confirmed at once. When the other side is dropped, this side's stream ends.
///
/// Envelopes travel in batches. A flush hands a partial batch over at once when the other side
/// has taken everything sent before it (so a lone envelope is not delayed); otherwise it
/// completes when the other side takes the batch ahead of it, and what was published
/// meanwhile goes in the same batch. Closing hands everything over at once.
pub struct WorkerTransport<P = serde_json::Value> {
    tx: mpsc::Sender<Vec<Envelope<P>>>,
    rx: mpsc::Receiver<Vec<Envelope<P>>>,
    outgoing: Vec<Envelope<P>>,
    incoming: VecDeque<Envelope<P>>,
    signals: VecDeque<Up<Envelope<P>>>,
    reader: Option<Waker>,
    /// Emptied batches, shared by the two sides: a reader hands back what it drained, so a
    /// writer rarely allocates one (and the allocation is not freed on the other thread).
    spare: Arc<Mutex<Vec<Vec<Envelope<P>>>>>,
    /// The direction this side writes, and the one it reads.
    out_link: Arc<Link>,
    in_link: Arc<Link>,
}

/// What the two ends of one direction share beyond the channel: how many batches the reader
/// has not taken yet, and the writer's flush waiting for it to take one (the flush rule is in
/// [`WorkerTransport`]'s docs).
#[derive(Default)]
struct Link {
    in_flight: AtomicUsize,
    flusher: AtomicWaker,
}

/// How many emptied batches wait for reuse, at most.
const SPARE_BATCHES: usize = 4;

impl<P> Unpin for WorkerTransport<P> {}

impl<P> fmt::Debug for WorkerTransport<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerTransport")
            .field("unsent", &self.outgoing.len())
            .field("unread", &self.incoming.len())
            .finish()
    }
}

/// A connected pair: what one side publishes comes up the other side's stream.
///
/// Each direction holds about `capacity` envelopes in flight (in batches of up to 64); a
/// publisher waits for room beyond that.
pub fn channel<P>(capacity: usize) -> (WorkerTransport<P>, WorkerTransport<P>) {
    // A futures channel holds `buffer + 1` items per sender.
    let batches = (capacity / MAX_BATCH).max(1);
    let (a_tx, b_rx) = mpsc::channel(batches - 1);
    let (b_tx, a_rx) = mpsc::channel(batches - 1);
    let spare = Arc::default();
    let (a_to_b, b_to_a) = (Arc::new(Link::default()), Arc::new(Link::default()));
    (
        WorkerTransport::new(
            a_tx,
            a_rx,
            Arc::clone(&spare),
            Arc::clone(&a_to_b),
            Arc::clone(&b_to_a),
        ),
        WorkerTransport::new(b_tx, b_rx, spare, b_to_a, a_to_b),
    )
}

impl<P> WorkerTransport<P> {
    fn new(
        tx: mpsc::Sender<Vec<Envelope<P>>>,
        rx: mpsc::Receiver<Vec<Envelope<P>>>,
        spare: Arc<Mutex<Vec<Vec<Envelope<P>>>>>,
        out_link: Arc<Link>,
        in_link: Arc<Link>,
    ) -> Self {
        WorkerTransport {
            tx,
            rx,
            outgoing: Vec::new(),
            incoming: VecDeque::new(),
            signals: VecDeque::new(),
            reader: None,
            spare,
            out_link,
            in_link,
        }
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Envelope<P>>>> {
        // Only empty vectors are ever stored: a poisoned lock holds nothing inconsistent.
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn peer_gone() -> Error {
        Error::new(
            ErrorKind::ConnectionLost,
            "the other side of the worker channel was dropped",
        )
    }

    /// Hands the current batch to the channel, if there is room.
    fn poll_send_batch(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.outgoing.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match self.tx.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(Self::peer_gone())),
            Poll::Pending => return Poll::Pending,
        }
        let next = self
            .spare()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_BATCH));
        let batch = std::mem::replace(&mut self.outgoing, next);
        // Counted before the reader can see it, so the count never goes below zero.
        self.out_link.in_flight.fetch_add(1, SeqCst);
        self.tx
            .start_send(batch)
            .map_err(|_| Self::peer_gone())
            .into()
    }

    /// Whether a partial batch may wait: the reader has not taken the batch ahead of it yet
    /// (and will wake this task when it does). Never when the reader is gone, nor when nothing
    /// waits to be sent.
    fn may_wait(&self, cx: &mut Context<'_>) -> bool {
        let link = &self.out_link;
        if self.outgoing.is_empty()
            || self.outgoing.len() >= MAX_BATCH
            || link.in_flight.load(SeqCst) == 0
        {
            return false;
        }
        link.flusher.register(cx.waker());
        // Looked at again after registering: a batch taken in between has woken no one.
        link.in_flight.load(SeqCst) > 0 && !self.tx.is_closed()
    }

    /// Sends what is unsent and flushes the channel.
    fn poll_send_now(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.poll_send_batch(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tx)
            .poll_flush(cx)
            .map_err(|_| Self::peer_gone())
    }

    fn signal(&mut self, up: Up<Envelope<P>>) {
        self.signals.push_back(up);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl<P> Drop for WorkerTransport<P> {
    fn drop(&mut self) {
        // A writer waiting for this side to take a batch must learn that it never will.
        self.rx.close();
        self.in_link.flusher.wake();
    }
}

impl<P> Sink<Command<Envelope<P>>> for WorkerTransport<P> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.outgoing.len() < MAX_BATCH {
            return Poll::Ready(Ok(()));
        }
        this.poll_send_batch(cx)
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Envelope<P>>) -> Result<()> {
        let this = self.get_mut();
        match command {
            Command::Publish { message, .. } => this.outgoing.push(message),
            Command::Subscribe(topic) => this.signal(Up::Subscribed(topic)),
            Command::Unsubscribe(topic) => this.signal(Up::Unsubscribed(topic)),
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.may_wait(cx) {
            return Poll::Pending;
        }
        this.poll_send_now(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        // Everything goes now: a reader that never reads again must not hold up the close.
        match self.poll_send_now(cx) {
            Poll::Pending => return Poll::Pending,
            // The peer is gone: nothing left to close.
            Poll::Ready(_) => {}
        }
        self.tx.close_channel();
        Poll::Ready(Ok(()))
    }
}

impl<P> Stream for WorkerTransport<P> {
    type Item = Result<Up<Envelope<P>>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(signal) = this.signals.pop_front() {
            return Poll::Ready(Some(Ok(signal)));
        }
        loop {
            if let Some(message) = this.incoming.pop_front() {
                return Poll::Ready(Some(Ok(Up::Message {
                    channel: None,
                    message,
                })));
            }
            match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Ready(Some(batch)) => {
                    this.in_link.in_flight.fetch_sub(1, SeqCst);
                    this.in_link.flusher.wake();
                    // The drained one goes back for the writer (no data moves: it is empty).
                    let drained = std::mem::replace(&mut this.incoming, VecDeque::from(batch));
                    let mut spare = this.spare();
                    if spare.len() < SPARE_BATCHES && drained.capacity() > 0 {
                        spare.push(Vec::from(drained));
                    }
                }
                // The other side is gone: the stream ends cleanly.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    this.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Runs `work` on a new OS thread, with its own single-threaded Tokio runtime and its end of a
/// worker pair as an [`EventTarget`]; returns the main side's event target and the thread's
/// join handle, which yields `work`'s output.
///
/// When `work` returns, its event target is closed (what it published is flushed first), and
/// the main side's subscriptions end.
///
/// Must be called within a Tokio runtime (the main side's driver is spawned on it).
pub fn spawn<P, F, Fut>(work: F) -> Result<(EventTarget<P>, thread::JoinHandle<Fut::Output>)>
where
    P: Send + Sync + 'static,
    F: FnOnce(EventTarget<P>) -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let (main_side, worker_side) = channel(DEFAULT_CAPACITY);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::with_source(ErrorKind::Other, "starting a worker's runtime", e))?;
    let join = thread::Builder::new()
        .name("alkdev-pubsub-worker".into())
        .spawn(move || {
            runtime.block_on(async move {
                let events = EventTarget::new(worker_side);
                let output = work(events.clone()).await;
                events.close().await;
                output
            })
        })
        .map_err(|e| Error::with_source(ErrorKind::Other, "spawning a worker thread", e))?;
    Ok((EventTarget::new(main_side), join))
}
