//! A small helper shared by the transports and the queue.

use std::task::{Context, Waker};

/// Stores `cx`'s waker in `slot`, unless the one there already wakes the same task (saving a
/// clone, an atomic increment, on every poll of a hot stream).
pub(crate) fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}
