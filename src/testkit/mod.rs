//! The conformance suite every transport must pass, and helpers for testing with transports.
//!
//! Enabled by the `testkit` feature. The suite works at the [`EventTarget`] level: give it a
//! way to make a [`Pair`] of event targets connected through your transport (for a loopback
//! transport, the same target twice) and it checks what users rely on: round trips, topic
//! isolation, no loss under many topics and listeners, unsubscribe on the last listener,
//! subscribe-then-publish never missing, order per topic, and a close that loses nothing in
//! flight. Transport-specific checks (malformed frames, broker restarts) take a hook that
//! injects raw bytes or restarts the broker.
//!
//! What the suite assumes and what it leaves out: it expects each topic's events in the order
//! they were published (every built-in transport keeps it; a transport that does not, one
//! spreading a topic over several connections say, fails the order checks, and can call the
//! other checks one by one). It checks delivery through the [`EventTarget`], which routes
//! by topic: a transport that ignores `Subscribe` and sends everything everywhere (as the
//! WebSocket transport does by design) passes it, so whether your transport filters is for a
//! test of your own (the subscriber's [`Stats::unrouted`](crate::Stats::unrouted) counts what
//! came for no listener). Nor does it check that your transport answers every `Unsubscribe`
//! with [`Up::Unsubscribed`](crate::Up::Unsubscribed): one that does not passes, but makes
//! every close of a target with listeners wait for its close timeout. The built-in transports
//! all run it: in-process, worker pairs, Redis, Redis Cluster and WebSocket.
//!
//! A check that waits longer than [`WAIT`] for a subscribe to be confirmed, a publish to be
//! taken or an event to arrive fails, rather than hang.
//!
//! [`run_all`] does not restart anything: a transport that reconnects should also pass
//! [`restart_recovers`] (with a hook that restarts its broker), and one that reads frames
//! [`malformed_frames_skipped`]. The checks sample (a few thousand events per check): a
//! transport that loses one event in many thousands can pass. Their topics have fixed names
//! (`order.event:o`, ...): give each run a broker (or a prefix) of its own, or runs at once
//! hear each other.
//!
//! Each check panics with a message that says what went wrong, like an assertion, so call
//! them from `#[tokio::test]` functions:
//!
//! ```
//! use alkdev_pubsub::testkit::{self, Pair};
//! use alkdev_pubsub::{EventTarget, LocalTransport};
//!
//! # #[tokio::main]
//! # async fn main() {
//! // In a test of your own transport, build the pair over it instead.
//! testkit::run_all(|| async { Pair::loopback(EventTarget::new(LocalTransport::new())) }).await;
//! # }
//! ```

mod broker;
mod recorder;
#[cfg(feature = "redis")]
mod redis_server;

pub use broker::{BrokerConnection, MemoryBroker};
pub use recorder::{Log, Recorded, Recorder};
#[cfg(feature = "redis")]
pub use redis_server::{free_port, RedisCluster, RedisServer};

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::layers::{Envelope, Topic};
use crate::{EventTarget, Gap, SubscribeOptions, Subscription};

/// How long a check waits for an event before it fails. Generous: checks assert what
/// arrives, never how fast.
pub const WAIT: Duration = Duration::from_secs(20);

/// Two event targets joined by the transport under test: what `publisher` dispatches must
/// reach the listeners of `subscriber`.
#[derive(Debug, Clone)]
pub struct Pair<P = Value> {
    /// The side that publishes.
    pub publisher: EventTarget<P>,
    /// The side that listens.
    pub subscriber: EventTarget<P>,
}

impl<P> Pair<P> {
    /// Both sides are `events`: for loopback transports (in-process, a broker that echoes to
    /// its own client).
    pub fn loopback(events: EventTarget<P>) -> Self {
        Pair {
            publisher: events.clone(),
            subscriber: events,
        }
    }

    /// Two targets.
    pub fn new(publisher: EventTarget<P>, subscriber: EventTarget<P>) -> Self {
        Pair {
            publisher,
            subscriber,
        }
    }
}

/// The envelope the checks publish: `{ "type": event_type, "id": id, "payload": { "n": n } }`.
pub fn numbered(event_type: &str, id: &str, n: u64) -> Envelope {
    Envelope::new(event_type, id, json!({ "n": n }))
}

/// The `n` of a [`numbered`] envelope.
pub fn number_of(envelope: &impl std::borrow::Borrow<Envelope>) -> u64 {
    let envelope = envelope.borrow();
    envelope.payload["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("envelope without a numeric payload.n: {envelope:?}"))
}

/// The next event of `subscription`, failing the check on a gap, the end, or after [`WAIT`].
pub async fn next_event(subscription: &mut Subscription) -> std::sync::Arc<Envelope> {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(gap))) => panic!("{:?}: unexpected gap: {gap}", subscription.topic()),
        Ok(None) => panic!("{:?}: the subscription ended", subscription.topic()),
        Err(_) => panic!("{:?}: no event within {WAIT:?}", subscription.topic()),
    }
}

/// The next gap notice of `subscription`, failing the check on an event, the end, or after
/// [`WAIT`].
pub async fn next_gap(subscription: &mut Subscription) -> Gap {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Err(gap))) => gap,
        Ok(Some(Ok(event))) => panic!(
            "{:?}: expected a gap, got an event: {event:?}",
            subscription.topic()
        ),
        Ok(None) => panic!("{:?}: the subscription ended", subscription.topic()),
        Err(_) => panic!("{:?}: no gap within {WAIT:?}", subscription.topic()),
    }
}

/// Waits for `subscription` to end, past reconnect notices, failing the check on an event,
/// another gap, or after [`WAIT`].
pub async fn next_end(subscription: &mut Subscription) {
    loop {
        match tokio::time::timeout(WAIT, subscription.next()).await {
            Ok(None) => return,
            Ok(Some(Err(Gap::Reconnected))) => {}
            Ok(Some(other)) => panic!(
                "{:?}: expected the end, got {other:?}",
                subscription.topic()
            ),
            Err(_) => panic!("{:?}: not ended within {WAIT:?}", subscription.topic()),
        }
    }
}

/// Asserts that nothing arrives on `subscription` within `quiet`.
pub async fn assert_quiet(subscription: &mut Subscription, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("{:?}: expected nothing, got {item:?}", subscription.topic());
    }
}

/// Awaits `future`, failing the check if it takes longer than [`WAIT`] (a transport that never
/// confirms a subscribe, or never takes a publish, fails the check instead of hanging it).
async fn within<T>(what: impl std::fmt::Display, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {WAIT:?}"))
}

/// Dispatches `envelope` on `events`, failing the check if that fails or takes over [`WAIT`].
async fn dispatch(events: &EventTarget, envelope: Envelope) {
    within("dispatching", events.dispatch_event(envelope))
        .await
        .expect("dispatching");
}

/// Runs every transport-independent check, each on a fresh pair from `make` (see the
/// [module](self) for what they assume: per-topic order among others).
pub async fn run_all<F, Fut>(mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Pair>,
{
    round_trip(make().await).await;
    topic_isolation(make().await).await;
    many_topics_many_listeners(make().await, 20, 5, 200).await;
    unsubscribe_on_last_listener(make().await).await;
    subscribe_then_publish_never_misses(make().await, 50).await;
    order_per_topic(make().await, 2_000).await;
    close_loses_nothing_in_flight(make().await, 1_000).await;
}

/// A published envelope arrives whole, on its topic, to a callback and to a subscription.
pub async fn round_trip(pair: Pair) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    pair.subscriber
        .add_event_listener("roundtrip.event:a", move |event| {
            let _ = tx.send(event.clone());
        })
        .expect("adding a listener");
    let mut subscription = within(
        "subscribing",
        pair.subscriber.subscribe("roundtrip.event:a"),
    )
    .await
    .expect("subscribing");
    let sent = Envelope::new(
        "roundtrip.event",
        "a",
        json!({ "text": "héllo ✓", "list": [1, 2.5, null, true], "nested": { "k": "v" } }),
    );
    dispatch(&pair.publisher, sent.clone()).await;
    assert_eq!(
        *next_event(&mut subscription).await,
        sent,
        "subscription got a different envelope"
    );
    let by_callback = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the callback was not called in time")
        .expect("callback channel open");
    assert_eq!(*by_callback, sent, "callback got a different envelope");
}

/// Events on one topic never reach listeners of another.
pub async fn topic_isolation(pair: Pair) {
    let mut a = within("subscribing a", pair.subscriber.subscribe("iso.event:a"))
        .await
        .expect("subscribing a");
    let mut b = within("subscribing b", pair.subscriber.subscribe("iso.event:b"))
        .await
        .expect("subscribing b");
    for n in 0..10 {
        dispatch(&pair.publisher, numbered("iso.event", "a", n)).await;
    }
    dispatch(&pair.publisher, numbered("iso.event", "b", 100)).await;
    for n in 0..10 {
        let event = next_event(&mut a).await;
        assert_eq!((event.id.as_str(), number_of(&event)), ("a", n));
    }
    let event = next_event(&mut b).await;
    assert_eq!(
        (event.id.as_str(), number_of(&event)),
        ("b", 100),
        "b got another topic's event"
    );
    assert_quiet(&mut a, Duration::from_millis(100)).await;
    assert_quiet(&mut b, Duration::from_millis(100)).await;
}

/// `topics` x `listeners` subscriptions, `messages` per topic, published concurrently per
/// topic: every listener gets every message of its topic exactly once, in order.
pub async fn many_topics_many_listeners(
    pair: Pair,
    topics: usize,
    listeners: usize,
    messages: u64,
) {
    let options = SubscribeOptions::new().capacity(messages as usize + 16);
    let mut readers = Vec::new();
    for t in 0..topics {
        for _ in 0..listeners {
            let mut subscription = within(
                "subscribing",
                pair.subscriber
                    .subscribe_with(Topic::of("many.event", &t.to_string()), options),
            )
            .await
            .expect("subscribing");
            readers.push(tokio::spawn(async move {
                for n in 0..messages {
                    let event = next_event(&mut subscription).await;
                    assert_eq!(event.id, t.to_string(), "an event of another topic arrived");
                    assert_eq!(number_of(&event), n, "topic {t}: out of order or lost");
                }
                assert_quiet(&mut subscription, Duration::from_millis(50)).await;
            }));
        }
    }
    let mut publishers = Vec::new();
    for t in 0..topics {
        let publisher = pair.publisher.clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..messages {
                dispatch(&publisher, numbered("many.event", &t.to_string(), n)).await;
            }
        }));
    }
    for task in publishers.into_iter().chain(readers) {
        task.await.expect("a publisher or reader task failed");
    }
}

/// The first listener of a topic subscribes on the transport, the last to leave unsubscribes,
/// and the map keeps no entry for a topic without listeners.
pub async fn unsubscribe_on_last_listener(pair: Pair) {
    let events = &pair.subscriber;
    let before = events.stats();
    let topics_before = events.topic_count();
    let first = within("subscribing", events.subscribe("leave.event:x"))
        .await
        .expect("subscribing");
    let second = within("subscribing", events.subscribe("leave.event:x"))
        .await
        .expect("subscribing");
    let callback = events
        .add_event_listener("leave.event:x", |_| {})
        .expect("adding a listener");
    assert_eq!(events.listener_count("leave.event:x"), 3);
    drop(first);
    assert!(events.remove_event_listener("leave.event:x", callback));
    assert!(
        !events.remove_event_listener("leave.event:x", callback),
        "removed twice"
    );
    assert_eq!(
        events.topic_count(),
        topics_before + 1,
        "topic left while a listener remains"
    );
    drop(second);
    assert_eq!(
        events.topic_count(),
        topics_before,
        "an empty topic stayed in the map"
    );
    // Join again once the unsubscribe went: a new subscribe, in effect (a transport that took
    // the topic for still subscribed, and answered at once, hears nothing once the server
    // has the unsubscribe).
    settle_counts(events, &before, (1, 1)).await;
    let mut again = within("subscribing again", events.subscribe("leave.event:x"))
        .await
        .expect("subscribing again");
    dispatch(&pair.publisher, numbered("leave.event", "x", 7)).await;
    assert_eq!(
        number_of(&next_event(&mut again).await),
        7,
        "subscribed again, the topic hears"
    );
    drop(again);
    settle_counts(events, &before, (2, 2)).await;
}

/// Waits until `events` has sent `expected` (subscribes, unsubscribes) to its transport since
/// `before` (commands reach the driver asynchronously).
async fn settle_counts(events: &EventTarget, before: &crate::Stats, expected: (u64, u64)) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let after = events.stats();
        let subscribes = after.subscribes - before.subscribes;
        let unsubscribes = after.unsubscribes - before.unsubscribes;
        if (subscribes, unsubscribes) == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {} subscribes and {} unsubscribes on the transport, saw {subscribes} and {unsubscribes}",
            expected.0,
            expected.1
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An event published right after `subscribe` resolved is never missed, `rounds` times on
/// fresh topics.
pub async fn subscribe_then_publish_never_misses(pair: Pair, rounds: u64) {
    for round in 0..rounds {
        let id = format!("r{round}");
        let mut subscription = within(
            "subscribing",
            pair.subscriber.subscribe(Topic::of("race.event", &id)),
        )
        .await
        .expect("subscribing");
        dispatch(&pair.publisher, numbered("race.event", &id, round)).await;
        let event = next_event(&mut subscription).await;
        assert_eq!(number_of(&event), round);
    }
}

/// `messages` events on one topic arrive in the order they were dispatched.
pub async fn order_per_topic(pair: Pair, messages: u64) {
    let options = SubscribeOptions::new().capacity(messages as usize);
    let mut subscription = within(
        "subscribing",
        pair.subscriber.subscribe_with("order.event:o", options),
    )
    .await
    .expect("subscribing");
    for n in 0..messages {
        dispatch(&pair.publisher, numbered("order.event", "o", n)).await;
    }
    for n in 0..messages {
        assert_eq!(
            number_of(&next_event(&mut subscription).await),
            n,
            "out of order"
        );
    }
    no_more_events(&mut subscription, "order").await;
}

/// Nothing more comes on `subscription` for 100 ms but its end or a reconnect notice: a
/// transport that sent its last events twice fails here.
async fn no_more_events(subscription: &mut Subscription, check: &str) {
    match tokio::time::timeout(Duration::from_millis(100), subscription.next()).await {
        Err(_) | Ok(None) | Ok(Some(Err(Gap::Reconnected))) => {}
        Ok(Some(other)) => panic!(
            "{check}: {:?} after every event came: {other:?}",
            subscription.topic()
        ),
    }
}

/// Events dispatched before `close()` all arrive; after it, calls fail with `Closed`.
pub async fn close_loses_nothing_in_flight(pair: Pair, messages: u64) {
    let options = SubscribeOptions::new().capacity(messages as usize + 16);
    let mut subscription = within(
        "subscribing",
        pair.subscriber.subscribe_with("close.event:c", options),
    )
    .await
    .expect("subscribing");
    for n in 0..messages {
        dispatch(&pair.publisher, numbered("close.event", "c", n)).await;
    }
    pair.publisher.close().await;
    let error = pair
        .publisher
        .dispatch_event(numbered("close.event", "c", messages))
        .await
        .expect_err("dispatching after close");
    assert!(error.is_closed(), "expected a Closed error, got {error}");
    let mut received = Vec::new();
    while received.len() < messages as usize {
        match tokio::time::timeout(WAIT, subscription.next()).await {
            Ok(Some(Ok(event))) => received.push(number_of(&event)),
            Ok(Some(Err(Gap::Reconnected))) => {}
            Ok(Some(Err(gap))) => panic!("gap while draining: {gap}"),
            Ok(None) => break,
            Err(_) => panic!("close: only {} of {messages} arrived", received.len()),
        }
    }
    assert_eq!(
        received,
        (0..messages).collect::<Vec<_>>(),
        "close lost or reordered events"
    );
    // The publisher is closed: nothing more.
    no_more_events(&mut subscription, "close").await;
}

/// Frames injected raw by `inject` (each a malformed frame, then a good envelope) are
/// skipped and counted as decode errors on the subscriber, and the stream goes on.
///
/// `inject(topic, frame)` must put `frame` on the wire to the subscriber as a message on
/// `topic` (for Redis, a raw `PUBLISH` of the prefixed channel).
pub async fn malformed_frames_skipped<F, Fut>(pair: Pair, mut inject: F)
where
    F: FnMut(Topic, bytes::Bytes) -> Fut,
    Fut: Future<Output = ()>,
{
    let topic = Topic::from("bad.event:m");
    let mut subscription = within("subscribing", pair.subscriber.subscribe(topic.clone()))
        .await
        .expect("subscribing");
    let before = pair.subscriber.stats().decode_errors;
    let bad: Vec<&[u8]> = vec![
        b"not json",
        b"[1,2,3]",
        br#"{"type":1,"id":"m"}"#,
        br#"{"id":"m"}"#,
        b"\xff\xfe{\"type\":\"bad.event\"",
        b"",
    ];
    let count = bad.len() as u64;
    for (n, frame) in bad.into_iter().enumerate() {
        inject(topic.clone(), bytes::Bytes::copy_from_slice(frame)).await;
        let good = serde_json::to_vec(&numbered("bad.event", "m", n as u64)).expect("encoding");
        inject(topic.clone(), good.into()).await;
    }
    for n in 0..count {
        assert_eq!(number_of(&next_event(&mut subscription).await), n);
    }
    assert_eq!(
        pair.subscriber.stats().decode_errors - before,
        count,
        "decode errors not counted"
    );
}

/// After `restart` (the broker goes down and comes back), every subscription works again and
/// saw [`Gap::Reconnected`].
pub async fn restart_recovers<F, Fut>(pair: Pair, topics: usize, restart: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut subscriptions = HashMap::new();
    for t in 0..topics {
        let id = t.to_string();
        let subscription = within(
            "subscribing",
            pair.subscriber.subscribe(Topic::of("restart.event", &id)),
        )
        .await
        .expect("subscribing");
        subscriptions.insert(id, subscription);
    }
    restart().await;
    for (id, subscription) in &mut subscriptions {
        assert_eq!(
            next_gap(subscription).await,
            Gap::Reconnected,
            "restart.event:{id}: first"
        );
    }
    // Publish until every topic hears again: the publisher's own connection may still be
    // reconnecting (and refuse a publish for now, `Unavailable`, if its buffer is small).
    for (id, subscription) in &mut subscriptions {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Err(error) = within(
                "dispatching after the restart",
                pair.publisher
                    .dispatch_event(numbered("restart.event", id, 1)),
            )
            .await
            {
                assert!(
                    error.is_unavailable(),
                    "restart.event:{id}: dispatching after the restart: {error}"
                );
            }
            match tokio::time::timeout(Duration::from_millis(200), subscription.next()).await {
                Ok(Some(Ok(event))) => {
                    assert_eq!(event.id, *id);
                    break;
                }
                Ok(Some(Err(Gap::Reconnected))) | Err(_) => {}
                Ok(other) => panic!("restart.event:{id}: {other:?}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "restart.event:{id}: no delivery after the restart"
            );
        }
    }
}
