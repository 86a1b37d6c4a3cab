//! The state every handle of an event target shares: the listener map and the counters.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::Context;

use tokio::sync::{mpsc, oneshot};

use crate::layers::{Envelope, Error, ErrorKind, Result, Topic};
use crate::queue::Queue;
use crate::stats::Counters;
use crate::subscription::Gap;
use crate::ListenerId;

/// A callback listener.
pub(crate) type Callback<P> = dyn Fn(&Arc<Envelope<P>>) + Send + Sync;

/// A registered callback (`F` is [`Callback`] once registered), and whether it was removed: a
/// delivery that began before its removal, from a copy of the topic's listeners (one waiting
/// for room in a `Block` queue ahead of the callback, say), skips it, as a DOM `EventTarget`
/// skips a listener removed during a dispatch.
pub(crate) struct Registered<F: ?Sized> {
    removed: AtomicBool,
    call: F,
}

impl<F> Registered<F> {
    pub(crate) fn new(call: F) -> Self {
        Registered {
            removed: AtomicBool::new(false),
            call,
        }
    }
}

/// A listener of gap notices.
pub(crate) type GapCallback = dyn Fn(Gap) + Send + Sync;

pub(crate) enum Listener<P> {
    Callback {
        id: ListenerId,
        callback: Arc<Registered<Callback<P>>>,
    },
    /// The queue of one or more subscriptions (its readers).
    Queue { queue: Arc<Queue<P>> },
}

impl<P> Clone for Listener<P> {
    fn clone(&self) -> Self {
        match self {
            Listener::Callback { id, callback } => Listener::Callback {
                id: *id,
                callback: Arc::clone(callback),
            },
            Listener::Queue { queue } => Listener::Queue {
                queue: Arc::clone(queue),
            },
        }
    }
}

impl<P> Listener<P> {
    /// How many listeners this is: one callback, or a queue's subscriptions.
    fn count(&self) -> usize {
        match self {
            Listener::Callback { .. } => 1,
            Listener::Queue { queue } => queue.readers(),
        }
    }
}

/// Messages from handles to the driver. Unbounded on purpose: each is caused by a listener
/// being added or removed (at most one subscribe and one unsubscribe per listener), or by a
/// close, so they come from the application's own calls and do not grow with traffic. (A
/// loop adding and removing a topic's only listener faster than the transport takes commands
/// queues two per turn.)
pub(crate) enum Control {
    Subscribe {
        topic: Topic,
        generation: u64,
    },
    Unsubscribe {
        topic: Topic,
    },
    Close {
        done: oneshot::Sender<()>,
    },
    /// The last handle was dropped.
    Shutdown,
    /// A dropped subscription ended the lease it held while the driver was busy: the driver
    /// reads the transport again (being polled is enough).
    Wake,
}

/// The listeners of one topic.
pub(crate) struct Entry<P> {
    /// Copy-on-write, so delivery clones one `Arc` under the read lock and calls listeners
    /// with no lock held (a callback may add or remove listeners).
    listeners: Arc<[Listener<P>]>,
    /// Which subscribe command this entry waits on; a topic that is left and joined again
    /// gets a new generation, so a late confirmation of the old subscribe is not taken for
    /// the new one.
    generation: u64,
    confirmed: bool,
    /// The transport refused the subscribe: the next listener to join asks again.
    failed: bool,
    waiters: Vec<oneshot::Sender<Result<()>>>,
}

/// The listener map. Every inbound message and every in-process publish looks its topic up
/// here, so it hashes with foldhash (seeded per process) rather than SipHash: the keys are the
/// topics this process subscribed to, so a peer choosing the topics it sends cannot crowd the
/// table, only miss in it.
type Map<P> = HashMap<Topic, Entry<P>, foldhash::fast::RandomState>;

pub(crate) struct Shared<P> {
    map: RwLock<Map<P>>,
    /// Bumped under the write lock at every change of the map: a reader that remembers a
    /// lookup knows it is still good while this has not moved.
    version: AtomicU64,
    pub(crate) counters: Counters,
    closed: AtomicBool,
    close_reason: Mutex<Option<Error>>,
    next_id: AtomicU64,
    gap_listeners: RwLock<Vec<(ListenerId, Arc<GapCallback>)>>,
    /// `None` for the in-process target, which has no driver and no transport.
    control: Option<mpsc::UnboundedSender<Control>>,
    /// The id of the subscription that reads the transport for the driver (its lease), or 0.
    /// Written under the driver's lock; read without it by the holder, when it finds that lock
    /// taken.
    pub(crate) lease_holder: AtomicU64,
}

/// What adding a listener needs from the caller.
pub(crate) enum Added {
    /// The topic's subscription is in effect.
    Ready,
    /// It will be once this resolves.
    Pending(oneshot::Receiver<Result<()>>),
}

impl<P> Shared<P> {
    pub(crate) fn new(control: Option<mpsc::UnboundedSender<Control>>) -> Self {
        Shared {
            map: RwLock::new(Map::default()),
            version: AtomicU64::new(0),
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            next_id: AtomicU64::new(1),
            lease_holder: AtomicU64::new(0),
            gap_listeners: RwLock::new(Vec::new()),
            control,
        }
    }

    // Listener callbacks run outside the lock and every update below is done in full before
    // the guard drops, so a poisoned lock still holds a consistent map.
    fn read(&self) -> RwLockReadGuard<'_, Map<P>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Map<P>> {
        let guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.version.fetch_add(1, Release);
        guard
    }

    /// The map's version: see [`Shared::listeners_of`].
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Acquire)
    }

    pub(crate) fn next_id(&self) -> ListenerId {
        ListenerId(self.next_id.fetch_add(1, Relaxed))
    }

    pub(crate) fn control(&self) -> Option<&mpsc::UnboundedSender<Control>> {
        self.control.as_ref()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// The error for a call (named by `what`) made after the target closed: of kind
    /// `Closed`, with the transport's failure that stopped the target, if one did, as its
    /// `source()` (a caller can tell a refused password from a close by walking the chain).
    pub(crate) fn closed_error(&self, what: &str) -> Error {
        let reason = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
        match &*reason {
            Some(reason) => Error::wrap(
                ErrorKind::Closed,
                format_args!("{what}: the event target stopped"),
                reason.clone(),
            ),
            None => Error::closed(format!("{what}: the event target is closed")),
        }
    }

    pub(crate) fn topic_count(&self) -> usize {
        self.read().len()
    }

    pub(crate) fn listener_count(&self, topic: &str) -> usize {
        self.read()
            .get(topic)
            .map_or(0, |e| e.listeners.iter().map(Listener::count).sum())
    }

    /// Adds a listener; the first one of a topic sends the subscribe command. A
    /// [`Listener::Queue`] whose one reader is `reader` may instead join a queue the topic
    /// already has with the same settings: the returned queue is the one to read.
    pub(crate) fn add_listener(
        &self,
        topic: Topic,
        listener: Listener<P>,
        reader: Option<ListenerId>,
        wait: bool,
    ) -> Result<(Added, Option<Arc<Queue<P>>>)> {
        crate::layers::check_topic_len(topic.len(), || {
            let head: String = topic.chars().take(32).collect();
            format!("subscribing to {head:?}…")
        })?;
        let mut map = self.write();
        if self.is_closed() {
            return Err(self.closed_error(&format!("adding a listener to {topic:?}")));
        }
        let mut read = match &listener {
            Listener::Queue { queue } => Some(Arc::clone(queue)),
            Listener::Callback { .. } => None,
        };
        if let Some(entry) = map.get_mut(&topic) {
            let joined = match (&read, reader) {
                (Some(new), Some(reader)) => entry.listeners.iter().find_map(|l| match l {
                    Listener::Queue { queue }
                        if queue.shareable(new.capacity(), new.overflow())
                            && queue.add_reader(reader) =>
                    {
                        Some(Arc::clone(queue))
                    }
                    _ => None,
                }),
                _ => None,
            };
            match joined {
                Some(queue) => read = Some(queue),
                None => {
                    let mut listeners = Vec::with_capacity(entry.listeners.len() + 1);
                    listeners.extend(entry.listeners.iter().cloned());
                    listeners.push(listener);
                    entry.listeners = listeners.into();
                }
            }
            if entry.failed {
                if let Some(control) = &self.control {
                    entry.failed = false;
                    entry.generation = self.next_id.fetch_add(1, Relaxed);
                    let _ = control.send(Control::Subscribe {
                        topic: topic.clone(),
                        generation: entry.generation,
                    });
                }
            }
            if entry.confirmed || !wait {
                return Ok((Added::Ready, read));
            }
            if entry.waiters.len() == entry.waiters.capacity() {
                // Before the list grows: a subscribe cancelled while it waited (a timeout
                // around it, retried through an outage) left its waiter here. Pruned when
                // the list would grow, so it stays within twice the most that ever waited
                // at once.
                entry.waiters.retain(|waiter| !waiter.is_closed());
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            return Ok((Added::Pending(rx), read));
        }

        let generation = self.next_id.fetch_add(1, Relaxed);
        let mut entry = Entry {
            listeners: Arc::from([listener]),
            generation,
            confirmed: self.control.is_none(),
            failed: false,
            waiters: Vec::new(),
        };
        let added = if entry.confirmed || !wait {
            Added::Ready
        } else {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            Added::Pending(rx)
        };
        if let Some(control) = &self.control {
            // Sent under the lock, so subscribe and unsubscribe commands leave in the order
            // of the map's transitions.
            if control
                .send(Control::Subscribe {
                    topic: topic.clone(),
                    generation,
                })
                .is_err()
            {
                return Err(self.closed_error(&format!("subscribing to {topic:?}")));
            }
        } else {
            // In-process, the topic's first listener is the subscription.
            self.counters.subscribes.fetch_add(1, Relaxed);
        }
        map.insert(topic, entry);
        Ok((added, read))
    }

    /// Removes a listener: a callback, or a subscription (a reader of a queue, which ends
    /// the subscription). The last one of a topic sends the unsubscribe command.
    pub(crate) fn remove_listener(&self, topic: &str, id: ListenerId) -> bool {
        // Events a removed reader released, and the removed listener, are dropped after the
        // map's lock (declared before the guard, so dropped after it): a callback's captures
        // may hold a subscription of this target, whose drop takes the lock again.
        let mut _released = Vec::new();
        let mut _removed = None;
        let mut _removed_entry = None;
        let mut map = self.write();
        let Some(entry) = map.get_mut(topic) else {
            return false;
        };
        let mut found = None;
        for (position, listener) in entry.listeners.iter().enumerate() {
            match listener {
                Listener::Callback { id: callback, .. } if *callback == id => {
                    found = Some(position);
                    break;
                }
                Listener::Callback { .. } => {}
                Listener::Queue { queue } => match queue.remove_reader(id) {
                    None => {}
                    Some((left, slots)) => {
                        _released = slots;
                        if left {
                            // The queue still serves other subscriptions.
                            return true;
                        }
                        found = Some(position);
                        break;
                    }
                },
            }
        }
        let Some(position) = found else {
            return false;
        };
        if let Listener::Callback { callback, .. } = &entry.listeners[position] {
            callback.removed.store(true, Release);
        }
        if entry.listeners.len() > 1 {
            let mut listeners = Vec::with_capacity(entry.listeners.len() - 1);
            listeners.extend(entry.listeners[..position].iter().cloned());
            listeners.extend(entry.listeners[position + 1..].iter().cloned());
            _removed = Some(std::mem::replace(&mut entry.listeners, listeners.into()));
            return true;
        }
        let (topic, entry) = map.remove_entry(topic).expect("the entry was just found");
        _removed_entry = Some(entry);
        match &self.control {
            Some(control) => {
                // Also while a close sends the publishes queued before it: the close
                // unsubscribes only the topics left after them. (Once the driver is gone, the
                // send fails: there is nothing left to unsubscribe from.)
                let _ = control.send(Control::Unsubscribe { topic });
            }
            None => {
                self.counters.unsubscribes.fetch_add(1, Relaxed);
            }
        }
        true
    }

    /// The transport confirmed the subscribe command of `generation`.
    pub(crate) fn confirm(&self, topic: &str, generation: u64) {
        let mut map = self.write();
        if let Some(entry) = map.get_mut(topic) {
            if entry.generation == generation && !entry.confirmed {
                entry.confirmed = true;
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Ok(()));
                }
            }
        }
    }

    /// The subscribe command of `generation` failed.
    pub(crate) fn fail_subscribe(&self, topic: &str, generation: u64, error: &Error) {
        let mut map = self.write();
        if let Some(entry) = map.get_mut(topic) {
            if entry.generation == generation {
                entry.failed = true;
                entry.confirmed = false;
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
        }
    }

    /// The transport dropped `topic`'s subscription for good, unprompted (it refused it when
    /// it subscribed it again after a reconnect, say). The topic's subscriptions end, once they
    /// have yielded what they hold, and leave the map (what is published on the topic later
    /// is not theirs: it must not reach their ended queues as drops); callbacks stay
    /// registered but hear nothing. The next listener added subscribes the topic again.
    pub(crate) fn revoke(&self, topic: &str) {
        let (queues, _removed) = {
            let mut map = self.write();
            // Only a subscription in effect: a notice about one the listeners left since is
            // not about the topic's new subscribe, which gets its own answer.
            let Some(entry) = map.get_mut(topic).filter(|entry| entry.confirmed) else {
                return;
            };
            entry.failed = true;
            entry.confirmed = false;
            let mut queues = Vec::new();
            let mut callbacks = Vec::new();
            for listener in entry.listeners.iter() {
                match listener {
                    Listener::Queue { queue } => queues.push(Arc::clone(queue)),
                    callback @ Listener::Callback { .. } => callbacks.push(callback.clone()),
                }
            }
            // The entry, if removed, is dropped after the map's lock (see `remove_listener`);
            // the listener list replaced holds only handles that `queues` and `callbacks` keep.
            let removed = if callbacks.is_empty() {
                // Nobody left: the topic leaves the map (the transport refused it, so there is
                // nothing to unsubscribe).
                map.remove(topic)
            } else {
                entry.listeners = callbacks.into();
                None
            };
            (queues, removed)
        };
        for queue in queues {
            queue.close();
        }
    }

    /// The topic's listeners and its key in the map, with the map's version read before the
    /// lookup (so a change during it makes the remembered result look stale, never fresh).
    #[allow(clippy::type_complexity)]
    pub(crate) fn listeners_of(&self, topic: &str) -> (u64, Option<(Topic, Arc<[Listener<P>]>)>) {
        let version = self.version();
        let found = self
            .read()
            .get_key_value(topic)
            .map(|(key, e)| (key.clone(), Arc::clone(&e.listeners)));
        (version, found)
    }

    /// The topics with listeners now.
    pub(crate) fn topics(&self) -> Vec<Topic> {
        self.read().keys().cloned().collect()
    }

    /// Registers a gap listener; on a closed target, the callback is dropped at once (it
    /// would never be called, and it may hold a handle of the target).
    pub(crate) fn add_gap_listener(&self, callback: Arc<GapCallback>) -> ListenerId {
        let id = self.next_id();
        let mut listeners = self
            .gap_listeners
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // `end_all` marks the target closed before it empties the list under this lock.
        if !self.is_closed() {
            listeners.push((id, callback));
        }
        id
    }

    pub(crate) fn remove_gap_listener(&self, id: ListenerId) -> bool {
        let mut listeners = self
            .gap_listeners
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let before = listeners.len();
        listeners.retain(|(listener, _)| *listener != id);
        listeners.len() != before
    }

    /// Tells every subscription and gap listener that the transport reconnected.
    pub(crate) fn reconnected(&self) {
        self.counters.reconnects.fetch_add(1, Relaxed);
        let callbacks: Vec<Arc<GapCallback>> = self
            .gap_listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, callback)| Arc::clone(callback))
            .collect();
        for callback in callbacks {
            if catch_unwind(AssertUnwindSafe(|| callback(Gap::Reconnected))).is_err() {
                self.counters.callback_panics.fetch_add(1, Relaxed);
                tracing::error!("a gap listener panicked");
            }
        }
        // The queues are pushed to once the map's lock is released: a notice can make a full
        // queue drop an event, whose payload's `Drop` (the application's code) may use the
        // target, and a subscription it drops takes the map's write lock.
        let queues: Vec<Arc<Queue<P>>> = self
            .read()
            .values()
            .flat_map(|entry| entry.listeners.iter())
            .filter_map(|listener| match listener {
                Listener::Queue { queue } => Some(Arc::clone(queue)),
                Listener::Callback { .. } => None,
            })
            .collect();
        for queue in queues {
            queue.push_reconnected(&self.counters);
        }
    }

    /// Marks the target closed; later calls fail with `Closed`.
    pub(crate) fn mark_closed(&self, reason: Option<Error>) {
        if let Some(reason) = reason {
            let mut slot = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(reason);
        }
        self.closed.store(true, Relaxed);
    }

    /// Empties the map and ends every subscription (after what is queued), returning the
    /// topics that had listeners.
    pub(crate) fn end_all(&self, reason: Option<Error>) -> Vec<Topic> {
        self.mark_closed(reason);
        // Gap listeners are dropped with the event listeners: one may hold a handle of this
        // target, a cycle that would keep both alive for ever.
        let gap_listeners = std::mem::take(
            &mut *self
                .gap_listeners
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        drop(gap_listeners);
        let map = std::mem::take(&mut *self.write());
        let mut topics = Vec::with_capacity(map.len());
        for (topic, entry) in map {
            for listener in entry.listeners.iter() {
                if let Listener::Queue { queue } = listener {
                    queue.close();
                }
            }
            if !entry.waiters.is_empty() {
                let error = self.closed_error(&format!("subscribing to {topic:?}"));
                for waiter in entry.waiters {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
            topics.push(topic);
        }
        if self.control.is_none() {
            // In-process, a topic's subscription ends with its last listener: here, all of them
            // (a driver counts the unsubscribes its close sends).
            self.counters
                .unsubscribes
                .fetch_add(topics.len() as u64, Relaxed);
        }
        topics
    }

    /// Delivers `event` to `listeners[from..]` (the last queue takes this handle of it rather
    /// than a copy). Stops at a full `Block` queue with `Err` of its index and the event, and
    /// that queue will wake `cx` when it has room; without `cx`, such a queue drops the event
    /// instead (and counts it as lagged).
    #[allow(clippy::type_complexity)]
    pub(crate) fn deliver_from(
        &self,
        listeners: &[Listener<P>],
        event: Arc<Envelope<P>>,
        from: usize,
        mut cx: Option<&mut Context<'_>>,
    ) -> Result<(), (usize, Arc<Envelope<P>>)> {
        let mut delivered = 0;
        let mut result = Ok(());
        let last = listeners.len().saturating_sub(1);
        let mut event = Some(event);
        for (index, listener) in listeners.iter().enumerate().skip(from) {
            let current = event.as_ref().expect("held until the last listener");
            match listener {
                Listener::Callback { callback, .. } => {
                    if callback.removed.load(Acquire) {
                        continue;
                    }
                    if catch_unwind(AssertUnwindSafe(|| (callback.call)(current))).is_ok() {
                        delivered += 1;
                    } else {
                        self.counters.callback_panics.fetch_add(1, Relaxed);
                        tracing::error!(
                            topic = %current.topic(),
                            "a listener callback panicked; it stays registered and delivery goes on"
                        );
                    }
                }
                // Counted by the queue, under its lock.
                Listener::Queue { queue } => {
                    let handle = if index == last {
                        event.take().expect("held until the last listener")
                    } else {
                        Arc::clone(current)
                    };
                    if let Err(back) = queue.push(cx.as_deref_mut(), handle, &self.counters) {
                        let event = event.unwrap_or(back);
                        result = Err((index, event));
                        break;
                    }
                }
            }
        }
        if delivered > 0 {
            self.counters.delivered.fetch_add(delivered, Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subscribes to a topic whose subscribe is not confirmed yet, cancelled while they wait
    /// (another listener keeps the topic), leave no waiter behind beyond the list's growth:
    /// one each stayed until the transport answered.
    #[test]
    fn cancelled_waits_on_an_unconfirmed_topic_are_pruned() {
        let (control, _commands) = mpsc::unbounded_channel();
        let shared: Shared<()> = Shared::new(Some(control));
        let topic = Topic::from("t:1");
        let callback = |shared: &Shared<()>| Listener::Callback {
            id: shared.next_id(),
            callback: Arc::new(Registered::new(|_: &Arc<Envelope<()>>| {})),
        };
        // The listener that keeps the topic, its subscribe unanswered.
        let (added, _) = shared
            .add_listener(topic.clone(), callback(&shared), None, false)
            .unwrap();
        assert!(matches!(added, Added::Ready));
        for _ in 0..10_000 {
            let listener = callback(&shared);
            let Listener::Callback { id, .. } = &listener else {
                unreachable!()
            };
            let id = *id;
            let (added, _) = shared
                .add_listener(topic.clone(), listener, None, true)
                .unwrap();
            let Added::Pending(waiting) = added else {
                panic!("the topic is not confirmed yet")
            };
            // Cancelled: the wait is dropped, and its listener removed.
            drop(waiting);
            assert!(shared.remove_listener(&topic, id));
        }
        let waiters = shared.read().get(&topic).unwrap().waiters.len();
        assert!(waiters <= 4, "{waiters} waiters left for one live listener");
    }
}
