//! The parse-error layer: a frame that does not decode never ends the stream.
//!
//! | way | what it does |
//! |---|---|
//! | down | nothing |
//! | up | acts on each error item of kind [`Decode`](crate::ErrorKind::Decode) by its [`Policy`]: skip it (counted, traced at most once a second, reported as [`Up::Skipped`] so an event target counts it), hand it to a quarantine callback and skip it, or pass it up as an error item; other items pass unchanged |
//!
//! The error handed to a quarantine callback carries the channel and the whole raw frame
//! ([`Error::channel`], [`Error::frame`]).
//!
//! It acts on what the [codec layer](crate::codec) reports, so it goes above (outside) it, as
//! in the usual stack: below the codec, nothing it sees is a decode error, and it does nothing.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Sink, Stream};
use pin_project_lite::pin_project;

use crate::prefix::Counter;
use crate::{Command, Error, Result, Up};

/// How often, at most, a skipped frame is traced at `warn` level.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// What to do with a frame that does not decode.
#[derive(Clone)]
#[non_exhaustive]
pub enum Policy {
    /// Skip it: count it, trace it (rate-limited), report it as [`Up::Skipped`].
    Skip,
    /// Skip it as [`Skip`](Policy::Skip) does, and hand the error (with the raw frame) to a
    /// callback: a quarantine. The callback runs on the task that reads the transport and must
    /// not block.
    Quarantine(Arc<dyn Fn(&Error) + Send + Sync>),
    /// Pass the error item up; an event target counts it and goes on.
    Surface,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Skip => f.write_str("Skip"),
            Policy::Quarantine(_) => f.write_str("Quarantine(..)"),
            Policy::Surface => f.write_str("Surface"),
        }
    }
}

/// A [`tower::Layer`] that applies a [`Policy`] to decode errors: see the [module](self).
///
/// ```
/// use alkdev_pubsub_layers::parse_error::ParseErrorLayer;
/// use std::sync::{Arc, Mutex};
///
/// let quarantined = Arc::new(Mutex::new(Vec::new()));
/// let sink = Arc::clone(&quarantined);
/// let layer = ParseErrorLayer::quarantine(move |error| {
///     sink.lock().unwrap().push(error.frame().cloned());
/// });
/// assert_eq!(layer.skipped().get(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct ParseErrorLayer {
    policy: Policy,
    skipped: Counter,
}

impl Default for ParseErrorLayer {
    fn default() -> Self {
        Self::skip()
    }
}

impl ParseErrorLayer {
    /// Skip and report (the default).
    pub fn skip() -> Self {
        Self::with_policy(Policy::Skip)
    }

    /// Skip, and hand each error to `quarantine`.
    pub fn quarantine(quarantine: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        Self::with_policy(Policy::Quarantine(Arc::new(quarantine)))
    }

    /// Pass decode errors up as error items.
    pub fn surface() -> Self {
        Self::with_policy(Policy::Surface)
    }

    /// A layer with `policy`.
    pub fn with_policy(policy: Policy) -> Self {
        ParseErrorLayer {
            policy,
            skipped: Counter::default(),
        }
    }

    /// Frames skipped so far (not counting surfaced ones), over every transport this layer made.
    pub fn skipped(&self) -> Counter {
        self.skipped.clone()
    }
}

impl<T> tower::Layer<T> for ParseErrorLayer {
    type Service = ParseError<T>;

    fn layer(&self, inner: T) -> ParseError<T> {
        ParseError {
            inner,
            policy: self.policy.clone(),
            skipped: self.skipped.clone(),
            warned: Arc::new(Mutex::new(WarnState::default())),
        }
    }
}

#[derive(Default)]
struct WarnState {
    last: Option<Instant>,
    suppressed: u64,
}

pin_project! {
    /// A transport whose decode errors follow a [`Policy`]; made by [`ParseErrorLayer`].
    pub struct ParseError<T> {
        #[pin]
        inner: T,
        policy: Policy,
        skipped: Counter,
        warned: Arc<Mutex<WarnState>>,
    }
}

impl<T> ParseError<T> {
    /// Frames skipped so far.
    pub fn skipped(&self) -> &Counter {
        &self.skipped
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
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

impl<T: fmt::Debug> fmt::Debug for ParseError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParseError")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .field("skipped", &self.skipped.get())
            .finish()
    }
}

fn warn_rate_limited(state: &Mutex<WarnState>, error: &Error, total: u64) {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if state
        .last
        .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
    {
        state.suppressed += 1;
        return;
    }
    let suppressed = std::mem::take(&mut state.suppressed);
    state.last = Some(now);
    tracing::warn!(%error, total, suppressed, "skipped a frame that does not decode");
}

impl<M, T> Sink<Command<M>> for ParseError<T>
where
    T: Sink<Command<M>, Error = Error>,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, command: Command<M>) -> Result<()> {
        self.project().inner.start_send(command)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.project().inner.poll_close(cx)
    }
}

impl<M, T> Stream for ParseError<T>
where
    T: Stream<Item = Result<Up<M>>>,
{
    type Item = Result<Up<M>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        match this.inner.poll_next(cx) {
            Poll::Ready(Some(Err(error))) if error.is_decode() => {
                if let Policy::Surface = this.policy {
                    return Poll::Ready(Some(Err(error)));
                }
                let total = this.skipped.increment();
                warn_rate_limited(this.warned, &error, total);
                if let Policy::Quarantine(quarantine) = this.policy {
                    // A bug in the quarantine must not take the transport down with it.
                    let call = std::panic::AssertUnwindSafe(|| quarantine(&error));
                    if std::panic::catch_unwind(call).is_err() {
                        tracing::error!(%error, "the quarantine callback panicked");
                    }
                }
                Poll::Ready(Some(Ok(Up::Skipped(error))))
            }
            other => other,
        }
    }
}
