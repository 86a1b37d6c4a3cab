use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::{Sink, Stream};
use pin_project_lite::pin_project;

use crate::layers::{Command, Result, Topic, Up};

/// A command a [`Recorder`] saw, without the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A publish on this topic.
    Publish(Topic),
    /// A subscribe.
    Subscribe(Topic),
    /// An unsubscribe.
    Unsubscribe(Topic),
}

pin_project! {
    /// Wraps a transport and records every command it passes on, in order (one the inner
    /// transport refuses in `start_send` is not recorded).
    ///
    /// ```
    /// use alkdev_pubsub::testkit::{Recorded, Recorder};
    /// use alkdev_pubsub::{EventTarget, LocalTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), alkdev_pubsub::Error> {
    /// let transport = Recorder::new(LocalTransport::new());
    /// let log = transport.log();
    /// let events = EventTarget::new(transport);
    /// drop(events.subscribe("a:1").await?);
    /// events.close().await;
    /// assert_eq!(log.take()[0], Recorded::Subscribe("a:1".into()));
    /// # Ok(())
    /// # }
    /// ```
    pub struct Recorder<T> {
        #[pin]
        inner: T,
        log: Log,
    }
}

/// The shared log of a [`Recorder`].
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Recorded>>>);

impl Log {
    /// A copy of what was recorded so far.
    pub fn snapshot(&self) -> Vec<Recorded> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes what was recorded so far, leaving the log empty.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Only the subscribes and unsubscribes, in order.
    pub fn subscriptions(&self) -> Vec<Recorded> {
        self.snapshot()
            .into_iter()
            .filter(|r| !matches!(r, Recorded::Publish(_)))
            .collect()
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

impl<T> Recorder<T> {
    /// Records the commands sent to `inner`.
    pub fn new(inner: T) -> Self {
        Recorder {
            inner,
            log: Log::default(),
        }
    }

    /// The log, shared: read it while the transport is in use.
    pub fn log(&self) -> Log {
        self.log.clone()
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

impl<T: fmt::Debug> fmt::Debug for Recorder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("inner", &self.inner)
            .field("log", &self.log)
            .finish()
    }
}

impl<M, T: Sink<Command<M>>> Sink<Command<M>> for Recorder<T> {
    type Error = T::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, command: Command<M>) -> Result<(), T::Error> {
        let this = self.project();
        let recorded = match &command {
            Command::Publish { topic, .. } => Recorded::Publish(topic.clone()),
            Command::Subscribe(topic) => Recorded::Subscribe(topic.clone()),
            Command::Unsubscribe(topic) => Recorded::Unsubscribe(topic.clone()),
        };
        this.inner.start_send(command)?;
        this.log
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(recorded);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_close(cx)
    }
}

impl<M, T: Stream<Item = Result<Up<M>>>> Stream for Recorder<T> {
    type Item = T::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T::Item>> {
        self.project().inner.poll_next(cx)
    }
}
