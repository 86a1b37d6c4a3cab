//! The bounded per-subscription queue, with its overflow policies.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::layers::Envelope;
use crate::stats::Counters;
use crate::subscription::{Gap, Overflow};

/// One entry of a queue: an event, or the notice that the transport reconnected.
pub(crate) enum Slot<P> {
    Event(Arc<Envelope<P>>),
    Reconnected,
}

/// What became of a pushed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued.
    Queued,
    /// Queued, and the oldest queued event was dropped to make room.
    DroppedOldest,
    /// Not queued: the queue is full and its policy drops the newest.
    DroppedNewest,
    /// The subscription is gone.
    Closed,
}

pub(crate) struct Queue<P> {
    state: Mutex<State<P>>,
    capacity: usize,
    overflow: Overflow,
}

struct State<P> {
    items: VecDeque<Slot<P>>,
    /// Events dropped since the consumer last heard of it.
    lagged: u64,
    closed: bool,
    consumer: Option<Waker>,
    /// Producers waiting for room (policy `Block` only).
    producers: Vec<Waker>,
}

impl<P> Queue<P> {
    pub(crate) fn new(capacity: usize, overflow: Overflow) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                lagged: 0,
                closed: false,
                consumer: None,
                producers: Vec::new(),
            }),
            capacity: capacity.max(1),
            overflow,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A panic while holding this lock cannot leave the state half-updated (every update is
        // a single VecDeque operation), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn overflow(&self) -> Overflow {
        self.overflow
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Pushes without waiting. A `Block` queue that is full returns `Poll::Pending` and
    /// registers `cx` to be woken when there is room; without `cx` it drops the newest.
    ///
    /// The target's counters are updated under the queue's lock, before the consumer can see
    /// the event: whoever has read an event also sees it counted.
    pub(crate) fn poll_push(
        &self,
        cx: Option<&mut Context<'_>>,
        event: &Arc<Envelope<P>>,
        counters: &Counters,
    ) -> Poll<Pushed> {
        let mut state = self.lock();
        if state.closed {
            return Poll::Ready(Pushed::Closed);
        }
        let outcome = if state.items.len() < self.capacity {
            state.items.push_back(Slot::Event(Arc::clone(event)));
            Pushed::Queued
        } else {
            match self.overflow {
                Overflow::DropOldest => {
                    // The oldest event, never a reconnect notice.
                    match state
                        .items
                        .iter()
                        .position(|slot| matches!(slot, Slot::Event(_)))
                    {
                        Some(oldest) => {
                            state.items.remove(oldest);
                        }
                        None => {
                            state.items.pop_front();
                        }
                    }
                    state.items.push_back(Slot::Event(Arc::clone(event)));
                    state.lagged += 1;
                    Pushed::DroppedOldest
                }
                Overflow::DropNewest => {
                    state.lagged += 1;
                    Pushed::DroppedNewest
                }
                Overflow::Block => match cx {
                    Some(cx) => {
                        if !state.producers.iter().any(|w| w.will_wake(cx.waker())) {
                            state.producers.push(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    None => {
                        state.lagged += 1;
                        Pushed::DroppedNewest
                    }
                },
            }
        };
        match outcome {
            Pushed::Queued => {
                counters.delivered.fetch_add(1, Relaxed);
            }
            Pushed::DroppedOldest => {
                counters.delivered.fetch_add(1, Relaxed);
                counters.lagged.fetch_add(1, Relaxed);
            }
            Pushed::DroppedNewest => {
                counters.lagged.fetch_add(1, Relaxed);
            }
            Pushed::Closed => {}
        }
        let consumer = state.consumer.take();
        drop(state);
        if let Some(waker) = consumer {
            waker.wake();
        }
        Poll::Ready(outcome)
    }

    /// Tells the consumer that the transport reconnected. Never blocks; two notices in a row
    /// are one.
    pub(crate) fn push_reconnected(&self) {
        let mut state = self.lock();
        if state.closed || matches!(state.items.back(), Some(Slot::Reconnected)) {
            return;
        }
        state.items.push_back(Slot::Reconnected);
        let consumer = state.consumer.take();
        drop(state);
        if let Some(waker) = consumer {
            waker.wake();
        }
    }

    /// Takes the next item: a lag notice first if events were dropped, then the oldest slot.
    /// `Ready(None)` once the queue is closed and empty. `Pending` when it is empty: with `cx`,
    /// the consumer is woken by the next push; without, it is not (and any waker it left
    /// before is forgotten).
    pub(crate) fn poll_pop(
        &self,
        cx: Option<&mut Context<'_>>,
    ) -> Poll<Option<Result<Arc<Envelope<P>>, Gap>>> {
        let mut state = self.lock();
        if state.lagged > 0 {
            let lagged = std::mem::take(&mut state.lagged);
            return Poll::Ready(Some(Err(Gap::Lagged(lagged))));
        }
        match state.items.pop_front() {
            Some(slot) => {
                let producers = if state.producers.is_empty() {
                    Vec::new()
                } else {
                    std::mem::take(&mut state.producers)
                };
                drop(state);
                for waker in producers {
                    waker.wake();
                }
                Poll::Ready(Some(match slot {
                    Slot::Event(event) => Ok(event),
                    Slot::Reconnected => Err(Gap::Reconnected),
                }))
            }
            None if state.closed => Poll::Ready(None),
            None => {
                match cx {
                    Some(cx) => crate::waker::remember(&mut state.consumer, cx),
                    // The consumer is about to fill the queue itself (a subscription routing
                    // what its transport has ready): a waker left from an earlier wait would
                    // only wake it for its own push. It registers again before it waits.
                    None => state.consumer = None,
                }
                Poll::Pending
            }
        }
    }

    /// Ends the queue: the consumer reads what is left, then the end; blocked producers are
    /// released. With `discard`, what is left is dropped too (the consumer went away).
    pub(crate) fn close(&self, discard: bool) {
        let mut state = self.lock();
        state.closed = true;
        if discard {
            state.items.clear();
        }
        let consumer = state.consumer.take();
        let producers = std::mem::take(&mut state.producers);
        drop(state);
        if let Some(waker) = consumer {
            waker.wake();
        }
        for waker in producers {
            waker.wake();
        }
    }
}
