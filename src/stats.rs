//! Counters of an event target, readable at any time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_failed: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) lagged: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) subscribes: AtomicU64,
    pub(crate) unsubscribes: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            published: self.published.load(Relaxed),
            publish_failed: self.publish_failed.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            lagged: self.lagged.load(Relaxed),
            unrouted: self.unrouted.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            callback_panics: self.callback_panics.load(Relaxed),
            subscribes: self.subscribes.load(Relaxed),
            unsubscribes: self.unsubscribes.load(Relaxed),
        }
    }
}

/// A snapshot of an event target's counters, from [`EventTarget::stats`](crate::EventTarget::stats).
///
/// Each counter only grows, from the target's creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Stats {
    /// Events handed to the transport (in-process: dispatched to the listener map).
    pub published: u64,
    /// Events whose publish failed (the error went to the dispatching call, or was traced),
    /// or that the target dropped unsent when it stopped; a publish `try_dispatch_event`
    /// refused because the target's queue was full counts too, a call made after the target
    /// closed does not. When a flush fails, every publish it covered counts: which of them
    /// were delivered is not known. A failure the transport reports late (from `poll_ready`,
    /// for a pipeline it sent) counts once per report: a connection that fails every call
    /// counts each, up to 63 (the 64th in a row ends the target or, under a reconnect layer,
    /// replaces the connection). So `published - publish_failed` is not the
    /// number delivered: refused publishes were never counted as published.
    pub publish_failed: u64,
    /// Deliveries to listeners: one event delivered to three listeners counts three. An event
    /// counts when it is queued for a subscription (or handed to a callback that returns
    /// without panicking): one that a full
    /// [`DropOldest`](crate::Overflow::DropOldest) queue later drops for a newer one counts
    /// here and in `lagged`; one a full queue refuses on arrival counts in `lagged` only.
    pub delivered: u64,
    /// Events a subscription queue dropped, full or ending as they came (each one reported
    /// to its reader as [`Gap::Lagged`](crate::Gap)).
    pub lagged: u64,
    /// Events that found no listener on their topic: inbound messages that arrived after the
    /// last one left, and, in-process, every dispatch to a topic nobody listens to.
    pub unrouted: u64,
    /// Inbound frames that could not be decoded, skipped by the parse-error layer or surfaced
    /// as error items.
    pub decode_errors: u64,
    /// Other inbound frames a layer dropped (for example on a channel outside the prefix).
    pub skipped: u64,
    /// Times the transport reported a gap ([`Up::Reconnected`](crate::Up::Reconnected)): it
    /// reconnected, or otherwise lost events.
    pub reconnects: u64,
    /// Listener callbacks that panicked.
    pub callback_panics: u64,
    /// Subscribe commands sent to the transport (in-process: topics that got their first
    /// listener).
    pub subscribes: u64,
    /// Unsubscribe commands sent to the transport (in-process: topics whose last listener
    /// left).
    pub unsubscribes: u64,
}
