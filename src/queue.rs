//! The bounded subscription queue, with its overflow policies.
//!
//! One queue can serve several subscriptions of a topic (its *readers*) when they asked for the
//! same capacity and a policy that treats them alike ([`Overflow::DropOldest`] or
//! [`Overflow::Block`]): an event is then stored once, and each reader has a cursor into the
//! queue, as in `tokio::sync::broadcast`. A slot counts against the capacity until every
//! reader has released it (yielded it to its subscriber); the queue is full when its slowest
//! reader holds `capacity` slots, and the policy then applies to that reader (drop its oldest,
//! or wait for it). A reader takes slots in batches (see [`Queue::poll_read`]), so a busy
//! reader takes the lock about once per batch. Slots leave the queue once every reader has
//! released them, or, with a lone reader on the publisher's thread, when it takes them (it
//! moves them out rather than copy them).
//!
//! An event is best freed on the thread that allocated it: its memory goes back to that
//! thread's allocator cache, where the next event is allocated (glibc's `malloc` otherwise
//! goes to its arena for it, measurably slower). The queue knows the thread of the last
//! push, where events come from. A reader on another thread leaves the slots it released to
//! the next push, which drops them on the publishing thread (see `State::garbage`); a lone
//! reader there copies its slots rather than move them out, so that the queue's handle, not
//! the subscriber's, is the last. A lone reader on the publisher's thread (a subscription
//! reading its transport for the target) moves its slots out and frees as it goes.
//!
//! With many readers (more than [`TRIM_BY_READERS_MAX`]), finding the slowest reader costs
//! their number: it is done at each push (and at one release in as many as there are readers,
//! and at each while a producer waits for room), not at each reader's release, so that an
//! event costs about the number of readers, not its square (each reader of a topic with
//! thousands, taking every event as it came, found itself the slowest and looked at all the
//! others). A push to such a topic looks at every reader once.
//!
//! What waits for the next push is bounded in number, not in time: at most the queue's
//! capacity (and, with up to [`TRIM_BY_READERS_MAX`] readers, 1,024) events, kept until the
//! next event is published on the topic, the queue is closed, or its last reader leaves.
//! `tokio::sync::broadcast` keeps more: every value stays until its slot is written again,
//! `capacity` sends later. Freeing it when a reader goes to wait instead (the publisher is
//! quiet then) was measured, and gave back most of the gain: readers that keep up wait after
//! almost every batch.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::layers::Envelope;
use crate::stats::Counters;
use crate::subscription::{Gap, Overflow};
use crate::ListenerId;

/// The most slots a reader takes at once.
const READ_BATCH: usize = 64;

/// The most released slots a queue keeps for its next push to drop (see `State::garbage`).
const GARBAGE_MAX: usize = 1024;

/// Up to this many readers, a reader that was the slowest and releases slots trims the queue
/// at once (see [`State::trim`], which looks at every reader). Past it, that is left to the
/// next push, and to a producer waiting for room: with every reader taking each event as it
/// comes, each of them found itself at the oldest slot and looked at all the others, the
/// square of the readers for each event (a topic with thousands of subscriptions).
const TRIM_BY_READERS_MAX: usize = 16;

/// Identifies the calling thread, cheaply: the address of a thread-local. A thread that
/// exited may leave its address to a new one; that only decides which thread frees an event.
pub(crate) fn this_thread() -> usize {
    thread_local!(static MARK: u8 = const { 0 });
    MARK.with(|mark| mark as *const u8 as usize)
}

/// One entry of a queue: an event, or the notice that the transport reconnected.
pub(crate) enum Slot<P> {
    Event(Arc<Envelope<P>>),
    Reconnected,
}

impl<P> Clone for Slot<P> {
    fn clone(&self) -> Self {
        match self {
            Slot::Event(event) => Slot::Event(Arc::clone(event)),
            Slot::Reconnected => Slot::Reconnected,
        }
    }
}

impl<P> Slot<P> {
    pub(crate) fn into_item(self) -> Result<Arc<Envelope<P>>, Gap> {
        match self {
            Slot::Event(event) => Ok(event),
            Slot::Reconnected => Err(Gap::Reconnected),
        }
    }
}

pub(crate) struct Queue<P> {
    state: Mutex<State<P>>,
    /// Bumped under the lock by every change a reader could act on (a push, a drop, a
    /// notice, the end): a reader that saw it unchanged since it found nothing to take
    /// knows there is still nothing, without the lock.
    version: AtomicU64,
    /// How many readers the queue has (kept under the lock; read without it).
    reader_count: AtomicUsize,
    capacity: usize,
    overflow: Overflow,
}

struct State<P> {
    /// `items[0]` has the sequence number `head`.
    items: VecDeque<Slot<P>>,
    head: u64,
    /// The oldest slot a reader holds: the smallest `next` of the readers. The queue is full
    /// when `capacity` slots from there on are held. Slots before `head` are held in a lone
    /// reader's batch, which took them out of the queue rather than copy them.
    oldest: u64,
    readers: Vec<Reader>,
    /// How many readers wait with a waker.
    waiting: usize,
    closed: bool,
    /// The last slot pushed was a reconnect notice (it may have left the queue already, in a
    /// lone reader's batch).
    reconnect_last: bool,
    /// Producers waiting for room (policy `Block` only).
    producers: Vec<Waker>,
    /// The thread of the last push ([`this_thread`]).
    publisher: usize,
    /// Slots every reader has released, the last of them on another thread than the
    /// publisher's: left for the next push to drop (outside the lock, on the publishing
    /// thread). At most `capacity` (and [`GARBAGE_MAX`]) of them, no more than the queue could
    /// hold anyway; past that, the reader that released them drops them. Also dropped by a
    /// reconnect notice, by [`Queue::close`], and when the last reader leaves.
    garbage: Vec<Slot<P>>,
    /// Releases since the last trim, with more readers than [`TRIM_BY_READERS_MAX`]: one
    /// every as many releases as there are readers (see [`State::hold_from`]).
    releases: usize,
}

struct Reader {
    id: ListenerId,
    /// The sequence number of the oldest slot this reader holds (not yet yielded: in its
    /// batch, or not taken yet). What it holds counts against the capacity.
    next: u64,
    /// The sequence number of the next slot this reader takes (`next..taken` is its batch).
    taken: u64,
    /// Events dropped before this reader took them, since it last heard of it (its oldest
    /// ones, [`Overflow::DropOldest`]: the notice comes before what it still holds).
    lagged: u64,
    /// New events dropped when the queue was full ([`Overflow::DropNewest`], or a `Block`
    /// queue that could not wait): where they would have been (a sequence number) and how
    /// many, oldest first. The reader hears of each once it has taken what came before it.
    gaps: VecDeque<(u64, u64)>,
    /// A reconnect notice was dropped before this reader took it.
    missed_reconnect: bool,
    /// This reader was told the queue ended.
    ended: bool,
    waker: Option<Waker>,
}

impl<P> State<P> {
    fn tail(&self) -> u64 {
        self.head + self.items.len() as u64
    }

    fn reader(&mut self, id: ListenerId) -> Option<&mut Reader> {
        self.readers.iter_mut().find(|r| r.id == id)
    }

    /// The index of reader `id`: `*hint` if it is still there (readers move only when one
    /// leaves), else found and remembered in `hint`. A subscription keeps its hint, so that a
    /// queue of many readers is not searched at each read.
    fn index_of(&self, id: ListenerId, hint: &mut usize) -> Option<usize> {
        if self.readers.get(*hint).is_some_and(|r| r.id == id) {
            return Some(*hint);
        }
        let index = self.readers.iter().position(|r| r.id == id)?;
        #[cfg(test)]
        tests::READERS_VISITED.with(|v| v.set(v.get() + index + 1));
        *hint = index;
        Some(index)
    }

    fn is_full(&self, capacity: usize) -> bool {
        self.tail() - self.oldest >= capacity as u64
    }

    /// Moves `oldest` up to the slowest reader, and removes the slots every reader has
    /// released. On the publisher's thread, or when the garbage is full, they are returned, to
    /// be dropped once the lock is released (dropping the last handle of an event frees it,
    /// which should not keep the publisher waiting); else they go to the garbage. Also returns
    /// the producers to wake if that made room.
    fn trim(&mut self, capacity: usize) -> (Vec<Slot<P>>, Vec<Waker>) {
        #[cfg(test)]
        tests::READERS_VISITED.with(|v| v.set(v.get() + self.readers.len()));
        let Some(oldest) = self.readers.iter().map(|r| r.next).min() else {
            return (Vec::new(), Vec::new());
        };
        if oldest <= self.oldest {
            return (Vec::new(), Vec::new());
        }
        self.oldest = oldest;
        let released = oldest.saturating_sub(self.head) as usize;
        let slots = if released == 0 {
            Vec::new()
        } else {
            self.head = oldest;
            if self.publisher != this_thread()
                && self.garbage.len() + released <= capacity.min(GARBAGE_MAX)
            {
                self.garbage.extend(self.items.drain(..released));
                Vec::new()
            } else {
                self.items.drain(..released).collect()
            }
        };
        (slots, std::mem::take(&mut self.producers))
    }

    /// Reader `index` now holds from `next` on (it yielded what came before). If it was the
    /// slowest reader, that may make room: see [`trim`](Self::trim).
    fn hold_from(
        &mut self,
        index: usize,
        next: u64,
        capacity: usize,
    ) -> (Vec<Slot<P>>, Vec<Waker>) {
        let reader = &mut self.readers[index];
        let was = std::mem::replace(&mut reader.next, next);
        if next <= was {
            return (Vec::new(), Vec::new());
        }
        if self.readers.len() <= TRIM_BY_READERS_MAX || !self.producers.is_empty() {
            return if was == self.oldest {
                self.trim(capacity)
            } else {
                (Vec::new(), Vec::new())
            };
        }
        // Many readers: once every as many releases as there are readers (about once per
        // event when each takes every event as it comes, once per batch when they take
        // batches), so that what they all released leaves the queue without waiting for the
        // next push, at a cost of about one release each.
        self.releases += 1;
        if self.releases < self.readers.len() {
            return (Vec::new(), Vec::new());
        }
        self.releases = 0;
        self.trim(capacity)
    }

    /// With more readers than [`TRIM_BY_READERS_MAX`], `oldest` is brought up to date here, by
    /// a push (their reads leave it behind): the slots every reader released leave the queue,
    /// and the queue is full only if its slowest reader holds `capacity` slots. `None` with
    /// fewer readers (they trim as they release).
    #[inline]
    fn trim_for_push(&mut self, capacity: usize) -> Option<(Vec<Slot<P>>, Vec<Waker>)> {
        (self.readers.len() > TRIM_BY_READERS_MAX).then(|| self.trim(capacity))
    }

    /// Makes room in a full [`Overflow::DropOldest`] queue: the slowest readers lose their
    /// oldest slot (out of the queue if it is still there, else it is in their batch already
    /// and they keep it), and are told (a lag, or the reconnect notice they missed). Returns
    /// the slot that left the queue, to be dropped once the lock is released.
    fn drop_oldest(&mut self, counters: &Counters) -> Option<Slot<P>> {
        let oldest = self.oldest;
        let mut dropped = None;
        if self.head == oldest {
            dropped = self.items.pop_front();
            self.head += 1;
        }
        let mut lagging = 0;
        for reader in self.readers.iter_mut().filter(|r| r.next == oldest) {
            reader.next = oldest + 1;
            if reader.taken == oldest {
                reader.taken = oldest + 1;
                match dropped {
                    Some(Slot::Event(_)) => {
                        reader.lagged += 1;
                        lagging += 1;
                    }
                    Some(Slot::Reconnected) => reader.missed_reconnect = true,
                    None => unreachable!("an untaken slot is in the queue"),
                }
            }
        }
        self.oldest = oldest + 1;
        counters.lagged.fetch_add(lagging, Relaxed);
        dropped
    }

    /// The wakers of every waiting reader.
    fn take_readers(&mut self) -> Vec<Waker> {
        if self.waiting == 0 {
            return Vec::new();
        }
        self.waiting = 0;
        self.readers
            .iter_mut()
            .filter_map(|r| r.waker.take())
            .collect()
    }
}

/// Drops released slots for a publisher: the last handle of an event runs its payload's
/// `Drop`, which is the subscribers' code, and a panic there must not fail the publish (nor,
/// in a driver, the whole target).
fn drop_released<P>(slots: Vec<Slot<P>>) {
    // A `Vec` whose element panics in `drop` still drops the others.
    drop_guarded(slots);
}

/// Drops what holds events (see [`drop_released`]), a panic in a payload's `Drop` caught.
fn drop_guarded<T>(events: T) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(events))).is_err() {
        tracing::error!("an event's payload panicked when it was dropped; delivery goes on");
    }
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

impl<P> Queue<P> {
    /// A queue with one reader.
    pub(crate) fn new(capacity: usize, overflow: Overflow, reader: ListenerId) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                head: 0,
                oldest: 0,
                readers: vec![Reader {
                    id: reader,
                    next: 0,
                    taken: 0,
                    lagged: 0,
                    gaps: VecDeque::new(),
                    missed_reconnect: false,
                    ended: false,
                    waker: None,
                }],
                waiting: 0,
                closed: false,
                reconnect_last: false,
                producers: Vec::new(),
                publisher: 0,
                garbage: Vec::new(),
                releases: 0,
            }),
            version: AtomicU64::new(0),
            reader_count: AtomicUsize::new(1),
            capacity: capacity.max(1),
            overflow,
        }
    }

    /// The queue's version (see the field); [`poll_read`](Self::poll_read) reports the one it
    /// read under.
    pub(crate) fn version(&self) -> u64 {
        self.version.load(Acquire)
    }

    /// Called under the lock: a store, not a read-modify-write.
    fn changed(&self) {
        self.version
            .store(self.version.load(Relaxed).wrapping_add(1), Release);
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // A panic while holding this lock cannot leave the state half-updated (no user code
        // runs under it, and nothing below panics between related updates), so a poisoned lock
        // is still consistent.
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

    /// Whether a new subscription with these settings may read this queue rather than get
    /// its own. `DropNewest` queues are never shared: the newest event is dropped for a full
    /// reader only, so readers of one queue would need different contents.
    pub(crate) fn shareable(&self, capacity: usize, overflow: Overflow) -> bool {
        overflow != Overflow::DropNewest
            && overflow == self.overflow
            && capacity.max(1) == self.capacity
    }

    /// Adds a reader, which takes what is published from now on. False if the queue is
    /// closed (or has no reader left, which closes it).
    pub(crate) fn add_reader(&self, id: ListenerId) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        let next = state.tail();
        state.readers.push(Reader {
            id,
            next,
            taken: next,
            lagged: 0,
            gaps: VecDeque::new(),
            missed_reconnect: false,
            ended: false,
            waker: None,
        });
        self.reader_count.store(state.readers.len(), Relaxed);
        true
    }

    /// Removes a reader: what it held is released (room for the others), and a task waiting
    /// on it is woken to find its stream ended. Returns `None` if it was not a reader, else
    /// whether the queue has readers left (without, it is closed and empty) and the slots that
    /// left the queue, for the caller to drop once it holds no lock (an event's last handle may
    /// run a payload's `Drop`).
    pub(crate) fn remove_reader(&self, id: ListenerId) -> Option<(bool, Vec<Slot<P>>)> {
        let mut state = self.lock();
        let index = state.readers.iter().position(|r| r.id == id)?;
        let reader = state.readers.swap_remove(index);
        if reader.waker.is_some() {
            state.waiting -= 1;
        }
        self.reader_count.store(state.readers.len(), Relaxed);
        self.changed();
        let (slots, producers) = if state.readers.is_empty() {
            state.closed = true;
            let mut slots: Vec<_> = std::mem::take(&mut state.items).into();
            slots.append(&mut state.garbage);
            (slots, std::mem::take(&mut state.producers))
        } else {
            state.trim(self.capacity)
        };
        let left = !state.readers.is_empty();
        drop(state);
        if let Some(waker) = reader.waker {
            waker.wake();
        }
        wake_all(producers);
        Some((left, slots))
    }

    /// How many readers the queue has.
    pub(crate) fn readers(&self) -> usize {
        self.reader_count.load(Relaxed)
    }

    /// Whether `reader` is there and has yielded everything it took, with nothing left to
    /// take: it waits for the next event (or its task is busy with the last one).
    pub(crate) fn waits(&self, reader: ListenerId) -> bool {
        let mut state = self.lock();
        let tail = state.tail();
        state.reader(reader).is_some_and(|r| {
            r.next == tail
                && r.taken == tail
                && r.lagged == 0
                && r.gaps.is_empty()
                && !r.missed_reconnect
        })
    }

    /// How many items wait for `reader` to take them (its batch aside): slots, and a lag or
    /// reconnect notice.
    pub(crate) fn untaken(&self, reader: ListenerId) -> usize {
        let mut state = self.lock();
        let tail = state.tail();
        state.reader(reader).map_or(0, |r| {
            tail.saturating_sub(r.taken) as usize
                + usize::from(r.lagged > 0)
                + r.gaps.len()
                + usize::from(r.missed_reconnect)
        })
    }

    /// Pushes without waiting. A `Block` queue that is full gives the event back and
    /// registers `cx` to be woken when there is room; without `cx` it drops the newest (for
    /// every reader).
    ///
    /// The target's counters (one delivery per reader) are updated under the queue's lock,
    /// before a reader can see the event: whoever has read an event also sees it counted.
    pub(crate) fn push(
        &self,
        cx: Option<&mut Context<'_>>,
        event: Arc<Envelope<P>>,
        counters: &Counters,
    ) -> Result<(), Arc<Envelope<P>>> {
        let mut state = self.lock();
        if state.closed {
            // Published as the queue closed (a `Block` publisher the close released, or a
            // dispatch that found its listeners before the close): not delivered, and not lost
            // silently. Readers that have not seen the end yet hear of it after what they
            // hold, and it counts as lagged for them.
            let at = state.tail();
            let mut told = 0;
            for reader in state.readers.iter_mut().filter(|r| !r.ended) {
                match reader.gaps.back_mut() {
                    Some((last, dropped)) if *last == at => *dropped += 1,
                    _ => reader.gaps.push_back((at, 1)),
                }
                told += 1;
            }
            let wake = if told > 0 {
                counters.lagged.fetch_add(told, Relaxed);
                self.changed();
                state.take_readers()
            } else {
                Vec::new()
            };
            drop(state);
            wake_all(wake);
            drop_guarded(event);
            return Ok(());
        }
        state.publisher = this_thread();
        let trimmed = state.trim_for_push(self.capacity);
        let readers = state.readers.len() as u64;
        let mut dropped = None;
        let mut event = Some(event);
        if !state.is_full(self.capacity) {
            state
                .items
                .push_back(Slot::Event(event.take().expect("not pushed yet")));
            state.reconnect_last = false;
            counters.delivered.fetch_add(readers, Relaxed);
        } else {
            match (self.overflow, cx) {
                (Overflow::DropOldest, _) => {
                    dropped = state.drop_oldest(counters);
                    state
                        .items
                        .push_back(Slot::Event(event.take().expect("not pushed yet")));
                    state.reconnect_last = false;
                    counters.delivered.fetch_add(readers, Relaxed);
                }
                (Overflow::Block, Some(cx)) => {
                    if !state.producers.iter().any(|w| w.will_wake(cx.waker())) {
                        state.producers.push(cx.waker().clone());
                    }
                    drop(state);
                    // Others waiting for room (the trim made some): they try again.
                    if let Some((slots, room)) = trimmed {
                        wake_all(room);
                        drop_released(slots);
                    }
                    return Err(event.take().expect("not pushed yet"));
                }
                (Overflow::DropNewest | Overflow::Block, _) => {
                    let at = state.tail();
                    for reader in &mut state.readers {
                        match reader.gaps.back_mut() {
                            Some((last, dropped)) if *last == at => *dropped += 1,
                            _ => reader.gaps.push_back((at, 1)),
                        }
                    }
                    counters.lagged.fetch_add(readers, Relaxed);
                }
            }
        }
        self.changed();
        let wake = state.take_readers();
        let garbage = std::mem::take(&mut state.garbage);
        drop(state);
        wake_all(wake);
        // What was dropped, and what readers on other threads released since the last push,
        // is freed with the lock released and the readers woken.
        if dropped.is_some() || event.is_some() {
            drop_guarded((dropped, event));
        }
        drop_released(garbage);
        if let Some((slots, room)) = trimmed {
            wake_all(room);
            drop_released(slots);
        }
        Ok(())
    }

    /// Takes back the waker a producer left waiting for room ([`push`](Self::push)), its wait
    /// cancelled. True if it was there.
    pub(crate) fn forget_producer(&self, waker: &Waker) -> bool {
        let mut state = self.lock();
        let before = state.producers.len();
        state.producers.retain(|w| !w.will_wake(waker));
        state.producers.len() != before
    }

    /// Tells the readers that the transport reconnected. Never blocks; two notices in a row
    /// are one while no reader has taken the first (a reader that has must hear of the second
    /// reconnect: what was published during it is lost to it too). The notice takes a slot:
    /// a full [`Overflow::DropOldest`] queue drops its oldest for it, as for an event (else
    /// each reconnect would leave the queue a slot larger, for as long as a reader does not
    /// read); a full queue of another policy holds it beyond its capacity, one notice at most
    /// (new events are dropped or wait there, so the next notice is the same one).
    pub(crate) fn push_reconnected(&self, counters: &Counters) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        let tail = state.tail();
        if state.reconnect_last && state.readers.iter().all(|reader| reader.taken < tail) {
            return;
        }
        let trimmed = state.trim_for_push(self.capacity);
        let dropped = if self.overflow == Overflow::DropOldest && state.is_full(self.capacity) {
            state.drop_oldest(counters)
        } else {
            None
        };
        state.items.push_back(Slot::Reconnected);
        state.reconnect_last = true;
        self.changed();
        let wake = state.take_readers();
        let garbage = std::mem::take(&mut state.garbage);
        drop(state);
        wake_all(wake);
        if dropped.is_some() {
            drop_guarded(dropped);
        }
        drop_released(garbage);
        if let Some((slots, room)) = trimmed {
            wake_all(room);
            drop_released(slots);
        }
    }

    /// Gives an event to `reader` directly (the caller puts it in the reader's batch) rather
    /// than through the queue: only while it is the queue's one reader, the queue is open and
    /// not full, and nothing waits for it there (it has taken every slot, and has no lag or
    /// reconnect notice), so that the event keeps its order. The event is accounted for as a
    /// slot a lone reader took out of the queue (see [`poll_read`](Self::poll_read)): it
    /// counts against the capacity until the reader [releases](Self::release) its batch.
    /// Counted as a push would count it. False, and nothing done, otherwise: push it.
    pub(crate) fn hand_over(&self, reader: ListenerId, counters: &Counters) -> bool {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.closed || !state.items.is_empty() || state.is_full(self.capacity) {
            return false;
        }
        let [me] = &mut state.readers[..] else {
            return false;
        };
        if me.id != reader
            || me.taken != state.head
            || me.lagged > 0
            || !me.gaps.is_empty()
            || me.missed_reconnect
        {
            return false;
        }
        state.head += 1;
        me.taken = state.head;
        state.reconnect_last = false;
        state.publisher = this_thread();
        counters.delivered.fetch_add(1, Relaxed);
        // As a push does: what readers released on other threads is freed here.
        let garbage = std::mem::take(&mut state.garbage);
        drop(guard);
        if !garbage.is_empty() {
            drop_released(garbage);
        }
        true
    }

    /// `reader` takes its next item: a lag notice first if events were dropped before it took
    /// them, then its oldest slot, and up to [`READ_BATCH`]` - 1` more slots into `batch`,
    /// which the caller yields before it reads again. What the reader yielded before is
    /// released; so is the slot returned now when `batch` stays empty; the slots left in
    /// `batch` are held (they count against the capacity) until [`release`](Self::release).
    /// `Ready(None)` once the queue is closed and the reader has taken everything, or the
    /// reader was removed. `Pending` when nothing waits: with `cx`, the reader is woken by the
    /// next push; without, it is not (and any waker it left before is forgotten). `seen` is
    /// set to the [`version`](Self::version) this read saw if it left nothing for the reader
    /// to take, else to `u64::MAX`.
    pub(crate) fn poll_read(
        &self,
        reader: ListenerId,
        hint: &mut usize,
        batch: &mut VecDeque<Slot<P>>,
        cx: Option<&mut Context<'_>>,
        seen: &mut u64,
    ) -> Poll<Option<Result<Arc<Envelope<P>>, Gap>>> {
        debug_assert!(
            batch.is_empty(),
            "a reader reads once it has yielded its batch"
        );
        let mut guard = self.lock();
        *seen = self.version.load(Relaxed);
        let state = &mut *guard;
        let Some(index) = state.index_of(reader, hint) else {
            return Poll::Ready(None);
        };
        let head = state.head;
        let tail = state.tail();
        // A lone reader on the publisher's thread moves its slots out (see the module doc).
        let alone = state.readers.len() == 1 && state.publisher == this_thread();
        let me = &mut state.readers[index];
        // Dropped new events are told where they would have been: what came before is taken
        // first.
        let gap_at = me.gaps.front().map(|&(at, _)| at);
        let item = if me.lagged > 0 {
            Some(Err(Gap::Lagged(std::mem::take(&mut me.lagged))))
        } else if gap_at.is_some_and(|at| at <= me.taken) {
            let (_, dropped) = me.gaps.pop_front().expect("a gap is there");
            Some(Err(Gap::Lagged(dropped)))
        } else if std::mem::take(&mut me.missed_reconnect) {
            Some(Err(Gap::Reconnected))
        } else if me.taken < tail {
            let from = me.taken;
            let until = gap_at.map_or(tail, |at| at.min(tail));
            let count = ((until - from) as usize).min(READ_BATCH);
            me.taken = from + count as u64;
            let first = if alone && from == head {
                // The only reader, on the publisher's thread: take the slots out rather than
                // copy them (they still count against the capacity until released, through
                // `oldest`).
                let mut slots = state.items.drain(..count);
                let first = slots.next().expect("count > 0");
                batch.extend(slots);
                state.head += count as u64;
                first
            } else {
                let start = (from - head) as usize;
                let mut slots = state.items.range(start..start + count).cloned();
                let first = slots.next().expect("count > 0");
                batch.extend(slots);
                first
            };
            Some(first.into_item())
        } else {
            None
        };
        // Everything taken before is yielded; what is taken now is held while it waits in
        // the batch.
        let held_from = state.readers[index].taken - batch.len() as u64;
        let (released, producers) = state.hold_from(index, held_from, self.capacity);
        let me = &mut state.readers[index];
        if me.taken < tail || me.lagged > 0 || !me.gaps.is_empty() || me.missed_reconnect {
            // More to take: `seen` must not say otherwise.
            *seen = u64::MAX;
        }
        let ended = item.is_none() && state.closed;
        me.ended |= ended;
        if item.is_none() && !ended {
            match cx {
                Some(cx) => {
                    if me.waker.is_none() {
                        state.waiting += 1;
                    }
                    crate::waker::remember(&mut me.waker, cx);
                }
                // The reader is about to look elsewhere first (a subscription routing what
                // its transport has ready, or yielding once before it sleeps): a waker left
                // from an earlier wait would only wake it for nothing. It registers again
                // before it waits.
                None => {
                    if me.waker.take().is_some() {
                        state.waiting -= 1;
                    }
                }
            }
        }
        drop(guard);
        drop(released);
        wake_all(producers);
        match item {
            Some(item) => Poll::Ready(Some(item)),
            None if ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// `reader` has yielded its whole batch: what it held is released.
    pub(crate) fn release(&self, reader: ListenerId, hint: &mut usize) {
        let mut state = self.lock();
        let Some(index) = state.index_of(reader, hint) else {
            return;
        };
        let taken = state.readers[index].taken;
        let (released, producers) = state.hold_from(index, taken, self.capacity);
        drop(state);
        drop(released);
        wake_all(producers);
    }

    /// Ends the queue: each reader takes what is left for it, then the end; blocked
    /// producers are released.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.changed();
        let mut wake = state.take_readers();
        wake.append(&mut state.producers);
        let garbage = std::mem::take(&mut state.garbage);
        drop(state);
        wake_all(wake);
        drop_released(garbage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    thread_local! {
        /// Readers looked at on this thread, to find one or the slowest.
        pub(super) static READERS_VISITED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Many readers of one queue, each taking every event as it comes: each event costs about
    /// the number of readers, not its square (each reader looked itself up among all of them,
    /// and each one at the oldest slot looked at all of them to find the new oldest: 2,000
    /// readers, about 4 million visits per event).
    #[test]
    fn many_readers_taking_each_event_cost_each_event_about_their_number() {
        const READERS: u64 = 2_000;
        let counters = Counters::default();
        let queue: Queue<serde_json::Value> = Queue::new(1024, Overflow::Block, ListenerId(0));
        for id in 1..READERS {
            assert!(queue.add_reader(ListenerId(id)));
        }
        let mut hints = vec![0; READERS as usize];
        let mut batch = VecDeque::new();
        let mut seen = 0;
        READERS_VISITED.with(|v| v.set(0));
        for n in 0..20 {
            let event = Arc::new(Envelope::new("t", "1", json!(n)));
            assert!(queue.push(None, event, &counters).is_ok());
            for (id, hint) in (0..READERS).zip(&mut hints) {
                match queue.poll_read(ListenerId(id), hint, &mut batch, None, &mut seen) {
                    Poll::Ready(Some(Ok(event))) => assert_eq!(event.payload, json!(n)),
                    other => panic!("reader {id}, event {n}: {other:?}"),
                }
                assert!(batch.is_empty());
                queue.release(ListenerId(id), hint);
            }
        }
        let visited = READERS_VISITED.with(|v| v.get());
        // Each reader is found once (its hint holds after that), and each push and one release
        // in as many as there are readers find the oldest.
        assert!(
            visited <= 20 * 3 * READERS as usize + READERS as usize * READERS as usize / 2,
            "{visited} readers visited for 20 events"
        );
        assert_eq!(
            counters.delivered.load(Relaxed),
            20 * READERS,
            "every reader counted"
        );
        // What every reader released has left the queue.
        assert!(queue.lock().items.is_empty());
    }

    fn event(n: u64) -> Arc<Envelope<serde_json::Value>> {
        Arc::new(Envelope::new("t", "1", json!(n)))
    }

    /// A queue of more readers than trim as they release: one each of its readers.
    fn wide(capacity: usize, overflow: Overflow) -> (Queue<serde_json::Value>, Vec<ListenerId>) {
        let ids: Vec<ListenerId> = (0..=TRIM_BY_READERS_MAX as u64 + 4)
            .map(ListenerId)
            .collect();
        let queue = Queue::new(capacity, overflow, ids[0]);
        for &id in &ids[1..] {
            assert!(queue.add_reader(id));
        }
        (queue, ids)
    }

    /// What `id` reads now: events' numbers, and lags as negative counts.
    fn read_all(queue: &Queue<serde_json::Value>, id: ListenerId) -> Vec<i64> {
        let (mut hint, mut batch, mut seen) = (0, VecDeque::new(), 0);
        let mut read = Vec::new();
        loop {
            let item = match batch.pop_front() {
                Some(slot) => Slot::into_item(slot),
                None => {
                    queue.release(id, &mut hint);
                    match queue.poll_read(id, &mut hint, &mut batch, None, &mut seen) {
                        Poll::Ready(Some(item)) => item,
                        _ => return read,
                    }
                }
            };
            read.push(match item {
                Ok(event) => event.payload.as_i64().unwrap(),
                Err(Gap::Lagged(n)) => -(n as i64),
                Err(Gap::Reconnected) => i64::MIN,
            });
        }
    }

    /// A `Block` producer waiting on a queue of many readers is woken once the slowest has
    /// read, and then has room.
    #[test]
    fn a_producer_waiting_on_many_readers_is_woken_when_the_last_one_reads() {
        struct Woken(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Relaxed);
            }
        }
        let counters = Counters::default();
        let (queue, ids) = wide(4, Overflow::Block);
        for n in 0..4 {
            assert!(queue.push(None, event(n), &counters).is_ok());
        }
        let woken = Arc::new(Woken(false.into()));
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let back = queue.push(Some(&mut cx), event(4), &counters).unwrap_err();
        // All but the first read everything: the first still holds the oldest.
        for (i, &id) in ids.iter().enumerate().skip(1) {
            assert_eq!(read_all(&queue, id), [0, 1, 2, 3]);
            assert!(
                !woken.0.load(Relaxed),
                "woken with reader 0 behind, after reader {i}"
            );
        }
        // It takes the oldest (and holds the rest in its batch): one slot of room.
        let (mut hint, mut batch, mut seen) = (0, VecDeque::new(), 0);
        match queue.poll_read(ids[0], &mut hint, &mut batch, None, &mut seen) {
            Poll::Ready(Some(Ok(event))) => assert_eq!(event.payload, json!(0)),
            other => panic!("{other:?}"),
        }
        assert!(
            woken.0.load(Relaxed),
            "room, and the producer was told at once"
        );
        batch.clear();
        assert!(queue.push(Some(&mut cx), back, &counters).is_ok());
        for &id in &ids[1..] {
            assert_eq!(read_all(&queue, id), [4]);
        }
    }

    /// A full `DropOldest` queue of many readers drops the oldest for each: each hears of the
    /// lag, then reads the newest; a reconnect notice takes a slot as an event does.
    #[test]
    fn a_full_drop_oldest_queue_of_many_readers_lags_each_alike() {
        let counters = Counters::default();
        let (queue, ids) = wide(4, Overflow::DropOldest);
        for n in 0..10 {
            assert!(queue.push(None, event(n), &counters).is_ok());
        }
        queue.push_reconnected(&counters);
        let readers = ids.len() as u64;
        assert_eq!(counters.lagged.load(Relaxed), 7 * readers);
        for &id in &ids {
            assert_eq!(read_all(&queue, id), [-7, 7, 8, 9, i64::MIN]);
        }
        assert_eq!(counters.delivered.load(Relaxed), 10 * readers);
        assert!(queue.lock().items.len() <= 1);
    }
}
