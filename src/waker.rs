//! Small waker helpers shared by the transports and the queue.

#[cfg(any(feature = "websocket", feature = "redis-cluster"))]
use std::sync::Arc;
#[cfg(any(feature = "websocket", feature = "redis-cluster"))]
use std::task::Wake;
use std::task::{Context, Waker};

/// Stores `cx`'s waker in `slot`, unless the one there already wakes the same task (saving a
/// clone, an atomic increment, on every poll of a hot stream).
pub(crate) fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// `cx`'s waker, or, when `other` is another task's, one that wakes both tasks: for a task
/// that uses a resource on the other's behalf (the reading half of a split transport sending
/// a ping through the writing half's sink), so that the other does not lose the wake-up it
/// registered there.
#[cfg(any(feature = "websocket", feature = "redis-cluster"))]
pub(crate) fn also_waking(cx: &Context<'_>, other: Option<&Waker>) -> Waker {
    match other {
        Some(other) if !other.will_wake(cx.waker()) => {
            Waker::from(Arc::new(Both(cx.waker().clone(), other.clone())))
        }
        _ => cx.waker().clone(),
    }
}

#[cfg(any(feature = "websocket", feature = "redis-cluster"))]
struct Both(Waker, Waker);

#[cfg(any(feature = "websocket", feature = "redis-cluster"))]
impl Wake for Both {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake_by_ref();
        self.1.wake_by_ref();
    }
}
