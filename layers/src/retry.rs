//! The retry layer: publishes the peer refused for now are sent again, a bounded number of
//! times.
//!
//! | way | what it does |
//! |---|---|
//! | down | a publish whose `start_send` fails with a [transient](crate::Error::is_transient) error (for example Redis `LOADING` or `BUSY`), and the publishes of a flush that fails with one, are sent again after a delay that doubles each time, up to the configured attempts; then they are dropped, and the next flush fails with an error of kind [`Unavailable`](crate::ErrorKind::Unavailable) (a flush answers what was fed before it: `start_send` and `poll_ready` do not report what they gave up on). A publish refused for good when sent again fails that flush too. Other errors pass unchanged. A flush that fails for good (or cannot send the retries: the transport below has no room) answers everything it covered, which this layer then neither retries nor sends again (what the transport below took is its own). Publishes are kept until a flush completes, to be sent again: past [`MAX_UNFLUSHED`] kept (or [`MAX_UNFLUSHED_BYTES`]), the layer waits for a flush before it takes the next |
//! | up | nothing |
//!
//! Retried publishes are delivered at least once: a flush that failed may have delivered some
//! of them. Their order is kept only if the transport below sends nothing more once a send
//! was refused, until the flush that reports it: the retried flush sends again every publish
//! since the last flush that completed, in order, after whatever of them got through; over a
//! transport that sends as it goes and does not hold back, a topic may see `4 5 1 2 3 4 5`.
//! The Redis transports hold back what follows a failed pipeline, until that flush; within
//! one pipeline, Redis may still run commands after a refused one (a script that ended
//! meanwhile), so a topic may see `1 2 5 6 1 2 3 4 5 6`. The reconnect layer holds back the
//! same way once what it sent on its own (its outage buffer, once connected again) was refused
//! for now. Where order matters more than riding out a busy server, leave this layer out: the
//! failure then reaches the publisher.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use std::future::Future as _;

use futures::{Sink, Stream};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::kept::{Kept, Weigh};
pub use crate::kept::{MAX_UNFLUSHED, MAX_UNFLUSHED_BYTES};
use crate::prefix::Counter;
use crate::{Command, Error, ErrorKind, Result, Up};

/// A [`tower::Layer`] that retries transient failures: see the [module](self).
///
/// ```
/// use alkdev_pubsub_layers::RetryLayer;
/// use std::time::Duration;
///
/// let layer = RetryLayer::new(3, Duration::from_millis(20));
/// assert_eq!(layer.retried().get(), 0);
/// ```
///
/// `M` is the message type: raw frames by default; see
/// [`with_message_type`](Self::with_message_type).
pub struct RetryLayer<M = bytes::Bytes> {
    attempts: u32,
    delay: Duration,
    weigh: Option<Weigh<M>>,
    retried: Counter,
    _message: PhantomData<fn() -> M>,
}

impl<M> Clone for RetryLayer<M> {
    fn clone(&self) -> Self {
        RetryLayer {
            attempts: self.attempts,
            delay: self.delay,
            weigh: self.weigh,
            retried: self.retried.clone(),
            _message: PhantomData,
        }
    }
}

impl<M> fmt::Debug for RetryLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("attempts", &self.attempts)
            .field("delay", &self.delay)
            .finish()
    }
}

impl Default for RetryLayer {
    /// 3 retries, from 50 ms.
    fn default() -> Self {
        Self::new(3, Duration::from_millis(50))
    }
}

impl RetryLayer {
    /// Retry raw frames up to `attempts` times, waiting `delay` before the first retry and
    /// twice as long before each next one.
    pub fn new(attempts: u32, delay: Duration) -> Self {
        Self::with_message_type(attempts, delay).weigh(crate::kept::frame_len)
    }
}

impl<M> RetryLayer<M> {
    /// Like [`RetryLayer::new`], for transports of `M` messages. What it keeps to send again is
    /// bounded by its count ([`MAX_UNFLUSHED`]), and by its bytes once
    /// [`weigh`](Self::weigh) says how to measure a message.
    pub fn with_message_type(attempts: u32, delay: Duration) -> Self {
        RetryLayer {
            attempts,
            delay,
            weigh: None,
            retried: Counter::default(),
            _message: PhantomData,
        }
    }

    /// How to measure a message, in bytes, for the bound on the publishes kept to send again
    /// ([`MAX_UNFLUSHED_BYTES`]). Raw frames are measured by their length
    /// ([`RetryLayer::new`]).
    #[must_use]
    pub fn weigh(mut self, weigh: fn(&M) -> usize) -> Self {
        self.weigh = Some(weigh);
        self
    }

    /// Commands retried so far.
    pub fn retried(&self) -> Counter {
        self.retried.clone()
    }
}

impl<T, M> tower::Layer<T> for RetryLayer<M> {
    type Service = Retry<T, M>;

    fn layer(&self, inner: T) -> Retry<T, M> {
        Retry {
            inner,
            attempts: self.attempts,
            delay: self.delay,
            retried: self.retried.clone(),
            state: RetryState::new(self.weigh),
        }
    }
}

struct RetryState<M> {
    /// Commands to send again, in order.
    queue: VecDeque<Command<M>>,
    /// Publishes sent since the last successful flush.
    unflushed: Kept<M>,
    /// Retries of the current failure so far.
    attempt: u32,
    /// The current failure is a flush's: only a flush that succeeds ends it (its publishes
    /// sent again prove nothing until then). A refused send's ends once what was refused is
    /// sent again.
    from_flush: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Why publishes this layer had taken were given up on (retries ran out, or a resend was
    /// refused for good): the next flush fails with it, as it answers them.
    failed: Option<Error>,
    /// A close's flush is done, and failed with this if it did: the transport below is closed
    /// all the same, then the close reports it.
    closing: Option<Result<()>>,
}

impl<M> RetryState<M> {
    fn new(weigh: Option<Weigh<M>>) -> Self {
        RetryState {
            queue: VecDeque::new(),
            unflushed: Kept::new(weigh),
            attempt: 0,
            from_flush: false,
            sleep: None,
            failed: None,
            closing: None,
        }
    }
}

pin_project! {
    /// A transport that retries transient failures; made by [`RetryLayer`].
    pub struct Retry<T, M = bytes::Bytes> {
        #[pin]
        inner: T,
        attempts: u32,
        delay: Duration,
        retried: Counter,
        state: RetryState<M>,
    }
}

impl<T, M> Retry<T, M> {
    /// Commands retried so far.
    pub fn retried(&self) -> &Counter {
        &self.retried
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Unwraps the transport.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: fmt::Debug, M> fmt::Debug for Retry<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("attempts", &self.attempts)
            .field("retrying", &self.state.queue.len())
            .finish()
    }
}

impl<M> RetryState<M> {
    /// A flush succeeded: what it covered went through, and the current failure is over.
    fn flushed(&mut self) {
        self.unflushed.clear();
        self.attempt = 0;
        self.from_flush = false;
    }

    /// Drops what waits to be sent again, what was sent since the last flush, and why the layer
    /// gave up: a failed flush answered all of it.
    fn forget(&mut self) {
        self.queue.clear();
        self.unflushed.clear();
        self.sleep = None;
        self.attempt = 0;
        self.from_flush = false;
        self.failed = None;
    }
}

impl<M: Clone> RetryState<M> {
    /// Plans another try of what is queued, or gives up and keeps why for the next flush.
    fn retry_later(&mut self, error: Error, attempts: u32, delay: Duration) {
        if let Err(gave_up) = self.schedule(error, attempts, delay) {
            self.failed.get_or_insert(gave_up);
        }
    }

    /// A flush failed: a transient failure sends its publishes again later (`None`); else, or
    /// once the retries ran out, the error that answers everything it covered, which is then
    /// neither retried nor kept.
    fn flush_failed(&mut self, error: Error, attempts: u32, delay: Duration) -> Option<Error> {
        if !error.is_transient() || self.unflushed.is_empty() {
            self.forget();
            return Some(error);
        }
        let unflushed = self.unflushed.take();
        self.from_flush = true;
        self.queue.extend(
            unflushed
                .into_iter()
                .map(|(topic, message)| Command::Publish { topic, message }),
        );
        match self.schedule(error, attempts, delay) {
            Ok(()) => None,
            Err(gave_up) => {
                self.failed = None;
                Some(gave_up)
            }
        }
    }

    /// Plans another try of what is queued, or gives up with `error`.
    fn schedule(&mut self, error: Error, attempts: u32, delay: Duration) -> Result<()> {
        if self.attempt >= attempts {
            let commands = self.queue.len();
            self.queue.clear();
            self.attempt = 0;
            self.from_flush = false;
            return Err(Error::with_source(
                ErrorKind::Unavailable,
                format!("gave up on {commands} commands after {attempts} retries: {error}"),
                error,
            ));
        }
        self.attempt += 1;
        let wait = delay.saturating_mul(1 << (self.attempt - 1).min(16));
        tracing::debug!(%error, attempt = self.attempt, ?wait, "retrying after a transient error");
        self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
        Ok(())
    }
}

impl<M, T> Retry<T, M>
where
    M: Clone,
    T: Sink<Command<M>, Error = Error>,
{
    /// Sends the retry queue; `Ready(Ok)` once it is empty. What fails is kept for the next
    /// flush; only the inner transport's `poll_ready` errors come back here.
    fn poll_retries(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut this = self.project();
        loop {
            if let Some(sleep) = this.state.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.state.sleep = None;
            }
            let Some(command) = this.state.queue.front().cloned() else {
                return Poll::Ready(Ok(()));
            };
            ready!(this.inner.as_mut().poll_ready(cx))?;
            // Counted as it is sent again (a command refused again and its followers are not
            // counted twice for one attempt).
            this.retried.increment();
            let kept = match &command {
                Command::Publish { topic, message } => Some((topic.clone(), message.clone())),
                _ => None,
            };
            match this.inner.as_mut().start_send(command) {
                Ok(()) => {
                    this.state.queue.pop_front();
                    if let Some((topic, message)) = kept {
                        this.state.unflushed.push(topic, message);
                    }
                    if this.state.queue.is_empty() && !this.state.from_flush {
                        // The refused sends went through: the next refusal is a new failure,
                        // with retries of its own.
                        this.state.attempt = 0;
                    }
                }
                Err(error) if error.is_transient() => {
                    this.state.retry_later(error, *this.attempts, *this.delay)
                }
                Err(error) => {
                    this.state.queue.pop_front();
                    this.state.failed.get_or_insert(error);
                }
            }
        }
    }
}

impl<M, T> Sink<Command<M>> for Retry<T, M>
where
    M: Clone,
    T: Sink<Command<M>, Error = Error>,
{
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            ready!(self.as_mut().poll_retries(cx))?;
            let this = self.as_mut().project();
            if !this.state.unflushed.full() {
                return this.inner.poll_ready(cx);
            }
            // Kept to be sent again: wait for a flush before keeping more (see
            // `MAX_UNFLUSHED`). With nothing more fed, it completes. Its failure is reported
            // by the next flush from above, which covers what it covered.
            match ready!(this.inner.poll_flush(cx)) {
                Ok(()) => this.state.flushed(),
                Err(error) => {
                    let (attempts, delay) = (*this.attempts, *this.delay);
                    if let Some(answer) = this.state.flush_failed(error, attempts, delay) {
                        this.state.failed = Some(answer);
                    }
                }
            }
        }
    }

    fn start_send(self: Pin<&mut Self>, command: Command<M>) -> Result<()> {
        let this = self.project();
        let kept = command.clone();
        match this.inner.start_send(command) {
            Ok(()) => {
                if let Command::Publish { topic, message } = kept {
                    this.state.unflushed.push(topic, message);
                }
                Ok(())
            }
            // Only publishes are retried: a refused subscribe is its caller's to handle.
            // Taken: sent again later, or given up on and reported by the next flush.
            Err(error) if error.is_transient() && matches!(kept, Command::Publish { .. }) => {
                this.state.queue.push_back(kept);
                this.state.retry_later(error, *this.attempts, *this.delay);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            if let Err(error) = ready!(self.as_mut().poll_retries(cx)) {
                // This flush's failure answers what it covered: the given up ones, and those
                // it could not send again (not to be sent by a later call, as though never
                // reported).
                self.as_mut().project().state.forget();
                return Poll::Ready(Err(error));
            }
            let this = self.as_mut().project();
            match ready!(this.inner.poll_flush(cx)) {
                Ok(()) => {
                    // Only a flush proves the retried commands went through.
                    this.state.flushed();
                    return Poll::Ready(match this.state.failed.take() {
                        Some(error) => Err(error),
                        None => Ok(()),
                    });
                }
                Err(error) => {
                    // A failure for good answers what it covered, the given up ones too.
                    let (attempts, delay) = (*this.attempts, *this.delay);
                    if let Some(answer) = this.state.flush_failed(error, attempts, delay) {
                        return Poll::Ready(Err(answer));
                    }
                }
            }
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.state.closing.is_none() {
            let flushed = ready!(self.as_mut().poll_flush(cx));
            self.as_mut().project().state.closing = Some(flushed);
        }
        // Closed even when the flush failed (a WebSocket still sends its close frame, a
        // reconnect layer stops): the flush's failure is what the close reports first.
        let closed = ready!(self.as_mut().project().inner.poll_close(cx));
        let flushed = self
            .project()
            .state
            .closing
            .replace(Ok(()))
            .unwrap_or(Ok(()));
        Poll::Ready(flushed.and(closed))
    }
}

impl<M, T> Stream for Retry<T, M>
where
    T: Stream<Item = Result<Up<M>>>,
{
    type Item = Result<Up<M>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().inner.poll_next(cx)
    }
}
