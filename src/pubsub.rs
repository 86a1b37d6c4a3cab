//! [`PubSub`]: the typed front, like `createPubSub` of the JavaScript package.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;

use crate::layers::{Envelope, Result, Topic};
use crate::{EventTarget, Stats, Subscription};

/// Publish and subscribe to typed payloads by `type` and `id`.
///
/// A thin front over an [`EventTarget<P>`](EventTarget): the payload type `P` is the
/// envelope's, so over a transport the codec decodes each frame straight into `P`, once. A
/// frame whose payload does not decode into `P` is not delivered and is no gap for the
/// subscriber: it is counted in [`Stats::decode_errors`](crate::Stats::decode_errors) (and
/// handed to a quarantine, with [`ParseErrorLayer::quarantine`](crate::layers::ParseErrorLayer::quarantine)),
/// so a peer sending another shape goes unseen by the subscriber; watch the counter.
///
/// ```
/// use alkdev_pubsub::PubSub;
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let pubsub: PubSub<u64> = PubSub::local();
/// let mut answers = pubsub.subscribe("call.responded", "c1").await?;
/// pubsub.publish("call.responded", "c1", 42).await?;
/// assert_eq!(answers.next().await, Some(42));
/// # Ok(())
/// # }
/// ```
pub struct PubSub<P = serde_json::Value> {
    events: EventTarget<P>,
}

impl<P> Clone for PubSub<P> {
    fn clone(&self) -> Self {
        PubSub {
            events: self.events.clone(),
        }
    }
}

impl<P: Send + Sync + 'static> Default for PubSub<P> {
    /// A typed front over a new in-process target, as [`PubSub::local`].
    fn default() -> Self {
        PubSub::local()
    }
}

impl<P> fmt::Debug for PubSub<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSub")
            .field("events", &self.events)
            .finish()
    }
}

impl<P: Send + Sync + 'static> PubSub<P> {
    /// A typed front over `events`.
    pub fn new(events: EventTarget<P>) -> Self {
        PubSub { events }
    }

    /// A typed front over a new in-process [`EventTarget`].
    pub fn local() -> Self {
        PubSub::new(EventTarget::local())
    }

    /// The event target underneath.
    pub fn event_target(&self) -> &EventTarget<P> {
        &self.events
    }

    /// Closes the event target underneath: see [`EventTarget::close`].
    pub async fn close(&self) {
        self.events.close().await;
    }

    /// The event target's counters: see [`EventTarget::stats`].
    pub fn stats(&self) -> Stats {
        self.events.stats()
    }

    /// Publishes `payload` as the envelope `{ type, id, payload }`; see
    /// [`EventTarget::dispatch_event`].
    ///
    /// # Errors
    ///
    /// As [`EventTarget::dispatch_event`].
    pub async fn publish(&self, event_type: &str, id: &str, payload: P) -> Result<()> {
        self.events
            .dispatch_event(Envelope::new(event_type, id, payload))
            .await
    }

    /// The payloads published on `"{type}:{id}"` from now on; see [`EventTarget::subscribe`].
    ///
    /// # Errors
    ///
    /// As [`EventTarget::subscribe`].
    pub async fn subscribe(&self, event_type: &str, id: &str) -> Result<TypedSubscription<P>> {
        let subscription = self.events.subscribe(Topic::of(event_type, id)).await?;
        Ok(TypedSubscription {
            subscription,
            gaps: 0,
            lagged: 0,
        })
    }
}

/// The payloads of one topic, from [`PubSub::subscribe`].
///
/// Gap notices ([`Gap`](crate::Gap)) are not items here: they are counted
/// ([`gaps`](Self::gaps), and the events they say were dropped, [`lagged`](Self::lagged));
/// use [`EventTarget::subscribe`] to see them in place. It is a stream when `P: Clone`: a
/// payload is moved out of its envelope when this subscription holds the envelope's last
/// handle (a lone listener reading on the publishing thread), and cloned otherwise (other
/// listeners share the envelope, or the queue keeps a handle to free it on the thread that
/// allocated it).
#[must_use = "dropping a `TypedSubscription` leaves its topic (the last listener to leave unsubscribes it)"]
pub struct TypedSubscription<P> {
    subscription: Subscription<P>,
    gaps: u64,
    lagged: u64,
}

impl<P: Send + Sync + 'static> TypedSubscription<P> {
    /// How many gap notices (lagged, reconnected) were passed over so far: notices, not
    /// events (one [`Gap::Lagged`](crate::Gap::Lagged) notice may stand for many events).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// How many events this subscription's queue dropped before it read them, so far: the sum
    /// of the [`Gap::Lagged`](crate::Gap::Lagged) notices passed over. What a reconnect lost
    /// is not known, and not counted here (see [`gaps`](Self::gaps)).
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// The subscription underneath.
    pub fn get_ref(&self) -> &Subscription<P> {
        &self.subscription
    }

    /// The subscription underneath, with its envelopes and gap notices.
    pub fn into_inner(self) -> Subscription<P> {
        self.subscription
    }
}

impl<P: Clone> Stream for TypedSubscription<P> {
    type Item = P;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<P>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.subscription).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    let payload = match Arc::try_unwrap(event) {
                        Ok(envelope) => envelope.payload,
                        Err(shared) => shared.payload.clone(),
                    };
                    return Poll::Ready(Some(payload));
                }
                Poll::Ready(Some(Err(gap))) => {
                    this.gaps += 1;
                    if let crate::Gap::Lagged(dropped) = &gap {
                        this.lagged += dropped;
                    }
                    tracing::debug!(%gap, "typed subscription passed over a gap");
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<P> fmt::Debug for TypedSubscription<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSubscription")
            .field("subscription", &self.subscription)
            .field("gaps", &self.gaps)
            .field("lagged", &self.lagged)
            .finish()
    }
}
