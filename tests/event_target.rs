//! EventTarget behaviour: the listener map, delivery, overflow, panics, close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alkdev_pubsub::testkit::{self, number_of, numbered, Recorded, Recorder};
use alkdev_pubsub::{
    Envelope, EventTarget, Gap, LocalTransport, Overflow, PubSub, SubscribeOptions, Topic,
};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(20);

async fn settle<F: Fn() -> bool>(what: &str, done: F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn first_listener_subscribes_and_last_unsubscribes_with_exact_commands() {
    let transport = Recorder::new(LocalTransport::new());
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);

    let a1 = events.subscribe("a:1").await.unwrap();
    let a2 = events.subscribe("a:1").await.unwrap();
    let b = events.add_event_listener("b:1", |_| {}).unwrap();
    // A callback's subscribe is not awaited: it reaches the transport shortly.
    settle("the subscribe of b:1", || log.subscriptions().len() == 2).await;
    assert_eq!(
        log.subscriptions(),
        vec![
            Recorded::Subscribe("a:1".into()),
            Recorded::Subscribe("b:1".into())
        ],
        "one subscribe per topic, on its first listener"
    );

    drop(a1);
    assert!(events.remove_event_listener("b:1", b));
    settle("the unsubscribe of b:1", || log.subscriptions().len() == 3).await;
    drop(a2);
    settle("the unsubscribe of a:1", || log.subscriptions().len() == 4).await;
    let _a3 = events.subscribe("a:1").await.unwrap();
    assert_eq!(
        log.subscriptions(),
        vec![
            Recorded::Subscribe("a:1".into()),
            Recorded::Subscribe("b:1".into()),
            Recorded::Unsubscribe("b:1".into()),
            Recorded::Unsubscribe("a:1".into()),
            Recorded::Subscribe("a:1".into()),
        ]
    );
    assert_eq!(events.topic_count(), 1, "no leaked entries in the map");
}

#[tokio::test]
async fn cancelled_subscribe_leaves_the_topic() {
    let transport = Recorder::new(LocalTransport::new());
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    let pending = events.subscribe("c:1");
    drop(pending); // never polled: nothing happened
    let subscribe = events.subscribe("c:1");
    // Poll it once, then cancel it before the confirmation can arrive.
    let _ = futures::FutureExt::now_or_never(subscribe);
    settle("unsubscribe after cancel", || {
        log.subscriptions()
            == vec![
                Recorded::Subscribe("c:1".into()),
                Recorded::Unsubscribe("c:1".into()),
            ]
    })
    .await;
    assert_eq!(events.topic_count(), 0);
}

async fn hundred_topics_ten_listeners_thousand_messages(events: EventTarget) {
    const TOPICS: usize = 100;
    const LISTENERS: usize = 10;
    const MESSAGES: u64 = 1_000;
    let options = SubscribeOptions::new()
        .capacity(MESSAGES as usize)
        .overflow(Overflow::Block);
    let mut readers = Vec::new();
    for t in 0..TOPICS {
        for _ in 0..LISTENERS {
            let mut subscription = events
                .subscribe_with(Topic::of("load", &t.to_string()), options)
                .await
                .unwrap();
            readers.push(tokio::spawn(async move {
                let mut seen = 0u64;
                while seen < MESSAGES {
                    let event = testkit::next_event(&mut subscription).await;
                    assert_eq!(event.id, t.to_string());
                    assert_eq!(
                        number_of(&event),
                        seen,
                        "topic {t}: lost, duplicated or reordered"
                    );
                    seen += 1;
                }
                seen
            }));
        }
    }
    let mut publishers = Vec::new();
    for t in 0..TOPICS {
        let events = events.clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..MESSAGES {
                events
                    .dispatch_event(numbered("load", &t.to_string(), n))
                    .await
                    .unwrap();
            }
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let mut total = 0;
    for reader in readers {
        total += reader.await.unwrap();
    }
    assert_eq!(total, TOPICS as u64 * LISTENERS as u64 * MESSAGES);
    let stats = events.stats();
    assert_eq!(stats.delivered, total);
    assert_eq!(stats.lagged, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_exactly_once_in_order_in_process() {
    hundred_topics_ten_listeners_thousand_messages(EventTarget::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_exactly_once_in_order_through_the_driver() {
    hundred_topics_ten_listeners_thousand_messages(EventTarget::new(LocalTransport::new())).await;
}

async fn slow_subscriber_lags_while_fast_one_gets_everything(events: EventTarget) {
    let mut fast = events
        .subscribe_with("lag:1", SubscribeOptions::new().capacity(1_000))
        .await
        .unwrap();
    let mut slow_oldest = events
        .subscribe_with("lag:1", SubscribeOptions::new().capacity(10))
        .await
        .unwrap();
    let mut slow_newest = events
        .subscribe_with(
            "lag:1",
            SubscribeOptions::new()
                .capacity(10)
                .overflow(Overflow::DropNewest),
        )
        .await
        .unwrap();
    for n in 0..100 {
        events
            .dispatch_event(numbered("lag", "1", n))
            .await
            .unwrap();
    }
    for n in 0..100 {
        assert_eq!(number_of(&testkit::next_event(&mut fast).await), n);
    }
    // Drop-oldest keeps the newest ten and says how many went first.
    assert_eq!(
        slow_oldest.next().await.unwrap().unwrap_err(),
        Gap::Lagged(90)
    );
    for n in 90..100 {
        assert_eq!(number_of(&slow_oldest.next().await.unwrap().unwrap()), n);
    }
    // Drop-newest keeps the first ten, and says how many went after them.
    for n in 0..10 {
        assert_eq!(number_of(&slow_newest.next().await.unwrap().unwrap()), n);
    }
    assert_eq!(
        slow_newest.next().await.unwrap().unwrap_err(),
        Gap::Lagged(90)
    );
    assert_eq!(events.stats().lagged, 180);
    assert!(slow_oldest.is_empty() && slow_newest.is_empty());
}

/// A callback that publishes on its own target through a weak handle: it answers, and does
/// not keep the target open once the application dropped its handles (a strong one would:
/// the target holds the callback).
#[tokio::test]
async fn a_callback_holding_a_weak_handle_answers_and_lets_the_target_close() {
    let events = EventTarget::local();
    let weak = events.downgrade();
    events
        .add_event_listener("ping:1", move |event| {
            if let Some(events) = weak.upgrade() {
                events
                    .try_dispatch_event(numbered("pong", "1", number_of(event)))
                    .unwrap();
            }
        })
        .unwrap();
    let mut pongs = events.subscribe("pong:1").await.unwrap();
    events
        .dispatch_event(numbered("ping", "1", 7))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut pongs).await), 7);
    let weak = events.downgrade();
    drop(events);
    assert!(weak.upgrade().is_none());
    testkit::next_end(&mut pongs).await;
}

/// A callback may use its own target's synchronous API while the event is delivered: add and
/// remove listeners (itself included, and the last listener of a topic, which unsubscribes it),
/// drop a subscription, publish, read the counters. None of it deadlocks or loses an event,
/// in-process (the callback runs in the dispatching task) and through a driver (it runs where
/// inbound messages are routed, under the driver's lock).
async fn a_callback_may_use_its_own_target(events: EventTarget) {
    let weak = events.downgrade();
    let calls = Arc::new(AtomicU64::new(0));
    let held = Arc::new(Mutex::new(Vec::<alkdev_pubsub::Subscription>::new()));
    let own = Arc::new(Mutex::new(None));
    let (counted, dropping, me) = (Arc::clone(&calls), Arc::clone(&held), Arc::clone(&own));
    let mut echoes = events.subscribe("echo:1").await.unwrap();
    let id = events
        .add_event_listener("t:1", move |event| {
            let n = number_of(event);
            counted.fetch_add(1, Ordering::SeqCst);
            let events = weak.upgrade().expect("the test holds the target");
            let other = events.add_event_listener(format!("x:{n}"), |_| {}).unwrap();
            let gap = events.add_gap_listener(|_| {});
            assert!(events.remove_gap_listener(gap));
            let _ = (
                events.stats(),
                events.topic_count(),
                events.listener_count("t:1"),
            );
            events.try_dispatch_event(numbered("echo", "1", n)).unwrap();
            events
                .try_dispatch_event(numbered("x", &n.to_string(), n))
                .unwrap();
            assert!(events.remove_event_listener(&format!("x:{n}"), other));
            // The last subscription of its topic: dropping it unsubscribes the topic.
            dropping.lock().unwrap().clear();
            let twin = events.add_event_listener("t:1", |_| {}).unwrap();
            assert!(events.remove_event_listener("t:1", twin));
            if n == 5 {
                let id = me.lock().unwrap().expect("set before the first event");
                assert!(events.remove_event_listener("t:1", id), "removes itself");
            }
        })
        .unwrap();
    *own.lock().unwrap() = Some(id);
    let mut all = events.subscribe("t:1").await.unwrap();
    for n in 0..10 {
        let subscription = events.subscribe(format!("held:{n}")).await.unwrap();
        held.lock().unwrap().push(subscription);
        events.dispatch_event(numbered("t", "1", n)).await.unwrap();
    }
    for n in 0..10 {
        assert_eq!(number_of(&testkit::next_event(&mut all).await), n);
    }
    for n in 0..=5 {
        assert_eq!(number_of(&testkit::next_event(&mut echoes).await), n);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "called until it removed itself"
    );
    assert_eq!(events.listener_count("t:1"), 1);
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_may_use_its_own_target_in_process() {
    a_callback_may_use_its_own_target(EventTarget::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_may_use_its_own_target_through_the_driver() {
    a_callback_may_use_its_own_target(EventTarget::new(LocalTransport::new())).await;
}

/// A gap listener that holds a strong handle of its own target (to resync after a reconnect,
/// say) is let go by `close`, with what it captured: it stayed, and with it the target, a cycle
/// nothing broke. One added to a closed target is dropped at once.
async fn gap_listeners_are_let_go_at_close(events: EventTarget) {
    let captured = Arc::new(());
    let (held, handle) = (Arc::clone(&captured), events.clone());
    events.add_gap_listener(move |_| {
        let _ = (&held, &handle);
    });
    let weak = events.downgrade();
    events.close().await;
    drop(events);
    settle("the gap listener to be dropped", || {
        Arc::strong_count(&captured) == 1
    })
    .await;
    assert!(weak.upgrade().is_none(), "the target is still referenced");

    let late = Arc::clone(&captured);
    let events: EventTarget = EventTarget::local();
    events.close().await;
    events.add_gap_listener(move |_| {
        let _ = &late;
    });
    assert_eq!(Arc::strong_count(&captured), 1, "kept by a closed target");
}

#[tokio::test]
async fn gap_listeners_are_let_go_at_close_in_process() {
    gap_listeners_are_let_go_at_close(EventTarget::local()).await;
}

#[tokio::test]
async fn gap_listeners_are_let_go_at_close_through_the_driver() {
    gap_listeners_are_let_go_at_close(EventTarget::new(LocalTransport::new())).await;
}

/// A drop-newest subscription hears of each run of dropped events where it was: after the
/// events that came before it, before those that came after.
#[tokio::test]
async fn a_drop_newest_gap_is_told_where_the_events_went_missing() {
    let events = EventTarget::local();
    let mut newest = events
        .subscribe_with(
            "gap:1",
            SubscribeOptions::new()
                .capacity(2)
                .overflow(Overflow::DropNewest),
        )
        .await
        .unwrap();
    let read =
        |subscription: &mut alkdev_pubsub::Subscription| match futures::FutureExt::now_or_never(
            subscription.next(),
        ) {
            Some(Some(Ok(event))) => Ok(number_of(&event)),
            Some(Some(Err(gap))) => Err(gap),
            other => panic!("expected an item at once, got {other:?}"),
        };
    for n in 1..=4 {
        events
            .dispatch_event(numbered("gap", "1", n))
            .await
            .unwrap();
    }
    assert_eq!(read(&mut newest), Ok(1));
    events
        .dispatch_event(numbered("gap", "1", 5))
        .await
        .unwrap();
    // 1 is yielded, 2 waits: room for 5 (released once 2 is read).
    assert_eq!(read(&mut newest), Ok(2));
    assert_eq!(read(&mut newest), Err(Gap::Lagged(2)));
    assert_eq!(read(&mut newest), Ok(5));
    for n in 6..=9 {
        events
            .dispatch_event(numbered("gap", "1", n))
            .await
            .unwrap();
    }
    assert_eq!(read(&mut newest), Ok(6));
    assert_eq!(read(&mut newest), Ok(7));
    assert_eq!(read(&mut newest), Err(Gap::Lagged(2)));
    assert!(futures::FutureExt::now_or_never(newest.next()).is_none());
    assert_eq!(events.stats().lagged, 4);
}

#[tokio::test]
async fn slow_subscriber_lags_in_process() {
    slow_subscriber_lags_while_fast_one_gets_everything(EventTarget::local()).await;
}

#[tokio::test]
async fn slow_subscriber_lags_through_the_driver() {
    let events = EventTarget::new(LocalTransport::new());
    slow_subscriber_lags_while_fast_one_gets_everything(events.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_waits_for_room_and_loses_nothing() {
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let mut blocking = events
            .subscribe_with(
                "block:1",
                SubscribeOptions::new()
                    .capacity(4)
                    .overflow(Overflow::Block),
            )
            .await
            .unwrap();
        let publisher = {
            let events = events.clone();
            tokio::spawn(async move {
                for n in 0..500 {
                    events
                        .dispatch_event(numbered("block", "1", n))
                        .await
                        .unwrap();
                }
            })
        };
        for n in 0..500 {
            let event = testkit::next_event(&mut blocking).await;
            assert_eq!(number_of(&event), n);
            assert!(
                blocking.len() <= 4,
                "queue over its capacity: {}",
                blocking.len()
            );
        }
        publisher.await.unwrap();
        assert_eq!(events.stats().lagged, 0);
    }
}

#[tokio::test]
async fn memory_stays_bounded_when_a_subscriber_never_reads() {
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let never_read = events
            .subscribe_with("flood:1", SubscribeOptions::new().capacity(64))
            .await
            .unwrap();
        let mut fast = events
            .subscribe_with("flood:1", SubscribeOptions::new().capacity(100_000))
            .await
            .unwrap();
        for n in 0..20_000 {
            events
                .dispatch_event(numbered("flood", "1", n))
                .await
                .unwrap();
        }
        for n in 0..20_000 {
            assert_eq!(number_of(&testkit::next_event(&mut fast).await), n);
        }
        // Capped at its capacity: 64 events, and the notice of the ones dropped.
        assert_eq!(never_read.len(), 65, "the queue is capped at its capacity");
        assert_eq!(events.stats().lagged, 20_000 - 64);
    }
}

/// A payload that counts its drops, and those on another thread than the publisher's.
struct Tracked {
    freed: Arc<AtomicU64>,
    freed_elsewhere: Arc<AtomicU64>,
    publisher: std::thread::ThreadId,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.freed.fetch_add(1, Ordering::SeqCst);
        if std::thread::current().id() != self.publisher {
            self.freed_elsewhere.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Reads `count` events (`t:1`) from each subscription.
async fn read_each(subscriptions: &mut [alkdev_pubsub::Subscription<Tracked>], count: usize) {
    for subscription in subscriptions {
        for _ in 0..count {
            let event = tokio::time::timeout(WAIT, subscription.next())
                .await
                .expect("an event in time")
                .expect("open")
                .expect("no gap");
            assert_eq!(event.id, "1");
        }
    }
}

#[tokio::test]
async fn events_read_on_another_thread_are_freed_by_the_next_publish_or_with_the_readers() {
    // One reader and two (a shared queue); on the publisher's thread, and on another one.
    for (readers, elsewhere) in [(1, false), (2, false), (1, true), (2, true)] {
        let case = format!("{readers} reader(s), on another thread: {elsewhere}");
        let freed = Arc::new(AtomicU64::new(0));
        let freed_elsewhere = Arc::new(AtomicU64::new(0));
        let tracked = |id: &str| {
            let payload = Tracked {
                freed: Arc::clone(&freed),
                freed_elsewhere: Arc::clone(&freed_elsewhere),
                publisher: std::thread::current().id(),
            };
            Envelope::new("t", id, payload)
        };
        let events: EventTarget<Tracked> = EventTarget::local();
        let mut subscriptions = Vec::new();
        for _ in 0..readers {
            subscriptions.push(events.subscribe("t:1").await.unwrap());
        }
        let (ask, asked) = std::sync::mpsc::channel::<usize>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let reader_thread = elsewhere.then(|| {
            let mut subscriptions = std::mem::take(&mut subscriptions);
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                for count in asked {
                    runtime.block_on(read_each(&mut subscriptions, count));
                    done.send(()).unwrap();
                }
            })
        });
        let mut published = 0;
        for round in 0..20 {
            for _ in 0..3 {
                events.dispatch_event(tracked("1")).await.unwrap();
                published += 1;
            }
            if elsewhere {
                ask.send(3).unwrap();
                finished
                    .recv_timeout(WAIT)
                    .expect("the readers read the round");
            } else {
                read_each(&mut subscriptions, 3).await;
            }
            // The readers have yielded the round's events and dropped them. At most those wait
            // for the next publish to free them: what came before was freed.
            let allocated = published - freed.load(Ordering::SeqCst);
            assert!(
                allocated <= 3,
                "{case}, round {round}: {allocated} of {published} events still allocated"
            );
        }
        if elsewhere {
            assert_eq!(
                freed_elsewhere.load(Ordering::SeqCst),
                0,
                "{case}: the publisher frees what readers on other threads read"
            );
        }
        // The publisher goes quiet: the last round's events wait until the readers leave
        // (the reader thread drops its subscriptions when it ends).
        drop(ask);
        if let Some(thread) = reader_thread {
            thread.join().unwrap();
        }
        drop(subscriptions);
        assert_eq!(
            freed.load(Ordering::SeqCst),
            published,
            "{case}: everything is freed once the subscriptions are gone"
        );
    }
}

/// A payload whose `Drop` panics when it is armed.
struct PanicsOnDrop(bool);

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if self.0 && !std::thread::panicking() {
            panic!("a payload's bug, in its Drop");
        }
    }
}

#[tokio::test]
async fn a_payload_that_panics_when_freed_by_a_publish_does_not_fail_it() {
    let events: EventTarget<PanicsOnDrop> = EventTarget::local();
    let subscription = events.subscribe("t:1").await.unwrap();
    events
        .dispatch_event(Envelope::new("t", "1", PanicsOnDrop(true)))
        .await
        .unwrap();
    // Read (and dropped) on another thread: the queue leaves the event to the next publish.
    let mut subscription = std::thread::spawn(move || {
        let mut subscription = subscription;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let event = tokio::time::timeout(WAIT, subscription.next()).await;
            assert!(matches!(event, Ok(Some(Ok(_)))));
        });
        subscription
    })
    .join()
    .unwrap();
    // This publish frees the first event, whose payload panics: the publish goes on.
    events
        .dispatch_event(Envelope::new("t", "1", PanicsOnDrop(false)))
        .await
        .unwrap();
    let event = tokio::time::timeout(WAIT, subscription.next()).await;
    assert!(matches!(event, Ok(Some(Ok(_)))), "the second event arrives");
}

/// A payload whose `Drop` panics, evicted by a full `DropOldest` queue or dropped as the
/// newest by a full `DropNewest` one, does not fail the publish that drops it.
#[tokio::test]
async fn a_payload_that_panics_when_a_full_queue_drops_it_does_not_fail_the_publish() {
    for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
        let events: EventTarget<PanicsOnDrop> = EventTarget::local();
        let mut subscription = events
            .subscribe_with(
                "t:1",
                SubscribeOptions::new().capacity(1).overflow(overflow),
            )
            .await
            .unwrap();
        // DropOldest evicts the first (armed); DropNewest drops the second (armed).
        let armed = [
            overflow == Overflow::DropOldest,
            overflow == Overflow::DropNewest,
        ];
        for arm in armed {
            events
                .dispatch_event(Envelope::new("t", "1", PanicsOnDrop(arm)))
                .await
                .unwrap();
        }
        let mut read = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(WAIT, subscription.next())
                .await
                .unwrap()
            {
                Some(Ok(_)) => read.push("event"),
                Some(Err(Gap::Lagged(1))) => read.push("lagged"),
                other => panic!("{overflow:?}: {:?}", other.map(|o| o.map(|_| ()))),
            }
        }
        let expected = match overflow {
            Overflow::DropOldest => ["lagged", "event"],
            _ => ["event", "lagged"],
        };
        assert_eq!(read, expected, "{overflow:?}");
        assert_eq!(events.stats().lagged, 1, "{overflow:?}");
    }
}

/// In-process, a dispatch waiting for room in a full `Block` subscription when the target
/// closes does not lose its event silently: the subscription yields what it holds, hears of
/// the drop (`Gap::Lagged`, counted), then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_releasing_an_in_process_dispatch_waiting_for_a_full_block_queue_reports_the_drop()
{
    let events: EventTarget = EventTarget::local();
    let mut subscription = block_of_one(&events).await;
    events.dispatch_event(numbered("t", "1", 0)).await.unwrap();
    let waiting = tokio::spawn({
        let events = events.clone();
        async move { events.dispatch_event(numbered("t", "1", 1)).await }
    });
    settle("the second dispatch to wait", || {
        events.stats().published == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "the queue is full: it waits");
    tokio::time::timeout(WAIT, events.close()).await.unwrap();
    tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    event_then_drop_then_end(&mut subscription).await;
    assert!(subscription.next().await.is_none(), "no later notice");
    assert_eq!(events.stats().lagged, 1);
}

/// A subscription of `t:1` whose queue holds one event and makes a publisher wait for room
/// (`Overflow::Block`).
async fn block_of_one(events: &EventTarget) -> alkdev_pubsub::Subscription {
    events
        .subscribe_with(
            "t:1",
            SubscribeOptions::new()
                .capacity(1)
                .overflow(Overflow::Block),
        )
        .await
        .unwrap()
}

/// `subscription` yields event 0, then hears that the event after it was dropped
/// (`Gap::Lagged(1)`), then ends.
async fn event_then_drop_then_end(subscription: &mut alkdev_pubsub::Subscription) {
    let first = subscription.next().await.unwrap().unwrap();
    assert_eq!(number_of(&first), 0);
    match subscription.next().await {
        Some(Err(Gap::Lagged(1))) => {}
        other => panic!("expected the drop to be told, got {other:?}"),
    }
    assert!(subscription.next().await.is_none());
}

#[tokio::test]
async fn a_panicking_callback_does_not_stop_delivery() {
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let calls = Arc::new(AtomicU64::new(0));
        events
            .add_event_listener("panic:1", |_| panic!("a listener's bug"))
            .unwrap();
        let counted = Arc::clone(&calls);
        events
            .add_event_listener("panic:1", move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        let mut subscription = events.subscribe("panic:1").await.unwrap();
        for n in 0..10 {
            events
                .dispatch_event(numbered("panic", "1", n))
                .await
                .unwrap();
        }
        for n in 0..10 {
            assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10);
        assert_eq!(events.stats().callback_panics, 10);
    }
}

#[tokio::test]
async fn listeners_share_one_arc_of_each_event() {
    let events = EventTarget::new(LocalTransport::new());
    let mut a = events.subscribe("share:1").await.unwrap();
    let mut b = events.subscribe("share:1").await.unwrap();
    let seen = Arc::new(Mutex::new(None));
    let by_callback = Arc::clone(&seen);
    events
        .add_event_listener("share:1", move |event| {
            *by_callback.lock().unwrap() = Some(Arc::clone(event));
        })
        .unwrap();
    events
        .dispatch_event(numbered("share", "1", 1))
        .await
        .unwrap();
    let from_a = testkit::next_event(&mut a).await;
    let from_b = testkit::next_event(&mut b).await;
    assert!(Arc::ptr_eq(&from_a, &from_b));
    assert!(Arc::ptr_eq(&from_a, seen.lock().unwrap().as_ref().unwrap()));
}

#[tokio::test]
async fn close_drains_unsubscribes_and_ends_subscriptions() {
    let transport = Recorder::new(LocalTransport::with_capacity(16));
    let log = transport.log();
    let events = EventTarget::new(transport);
    let mut subscription = events
        .subscribe_with("drain:1", SubscribeOptions::new().capacity(5_000))
        .await
        .unwrap();
    for n in 0..5_000 {
        events
            .dispatch_event(numbered("drain", "1", n))
            .await
            .unwrap();
    }
    events.close().await;
    assert!(events.is_closed());
    for n in 0..5_000 {
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
    }
    assert!(
        subscription.next().await.is_none(),
        "the subscription ends after the drain"
    );
    assert_eq!(
        log.subscriptions().last(),
        Some(&Recorded::Unsubscribe("drain:1".into()))
    );
    assert_eq!(events.stats().published, 5_000);

    let error = events.subscribe("drain:2").await.unwrap_err();
    assert!(error.is_closed(), "{error}");
    let error = events.add_event_listener("drain:2", |_| {}).unwrap_err();
    assert!(error.is_closed(), "{error}");
    let error = events
        .try_dispatch_event(numbered("drain", "1", 0))
        .unwrap_err();
    assert!(
        error.is_closed() && error.to_string().contains("drain:1"),
        "{error}"
    );
    events.close().await; // twice is fine
}

#[tokio::test]
async fn dropping_the_last_handle_shuts_the_driver_down() {
    let events = EventTarget::new(LocalTransport::new());
    let mut subscription = events.subscribe("bye:1").await.unwrap();
    let other = events.clone();
    events
        .dispatch_event(numbered("bye", "1", 0))
        .await
        .unwrap();
    drop(events);
    other.dispatch_event(numbered("bye", "1", 1)).await.unwrap();
    drop(other);
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 0);
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);
    let end = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap();
    assert!(
        end.is_none(),
        "the subscription ends when the last handle is gone"
    );

    let local: EventTarget = EventTarget::local();
    let mut subscription = local.subscribe("bye:2").await.unwrap();
    drop(local);
    assert!(subscription.next().await.is_none());
}

#[tokio::test]
async fn confirmed_dispatch_waits_for_the_flush() {
    let events = EventTarget::new(LocalTransport::new());
    let mut subscription = events.subscribe("ack:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("ack", "1", 7))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 7);
    events.close().await;
    assert!(events
        .dispatch_confirmed(numbered("ack", "1", 8))
        .await
        .unwrap_err()
        .is_closed());

    // Over a transport whose flush never completes, a plain dispatch resolves (its publish is
    // taken) and a confirmed one waits for the flush.
    let (_answer, up) = futures::channel::mpsc::unbounded();
    let unflushed: EventTarget = EventTarget::new(Scripted {
        slow_flush: true,
        ..Scripted::new(up)
    });
    tokio::time::timeout(WAIT, unflushed.dispatch_event(numbered("ack", "1", 9)))
        .await
        .expect("a plain dispatch does not wait for the flush")
        .unwrap();
    let confirmed = unflushed.dispatch_confirmed(numbered("ack", "1", 10));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), confirmed)
            .await
            .is_err(),
        "the confirmed dispatch resolved before any flush completed"
    );
}

#[tokio::test]
async fn a_full_publish_queue_says_so() {
    // A transport that never becomes ready: the publish queue fills up.
    let (sink, _rx) = futures::channel::mpsc::channel::<alkdev_pubsub::Command<Envelope>>(0);
    let stalled = Stalled { sink };
    let events: EventTarget = EventTarget::builder().publish_capacity(2).build(stalled);
    let mut refused = None;
    for n in 0..10 {
        if let Err(error) = events.try_dispatch_event(numbered("full", "1", n)) {
            refused = Some(error);
            break;
        }
    }
    let error = refused.expect("the queue filled up");
    assert!(error.is_unavailable(), "{error}");
    assert!(error.to_string().contains("queue is full"), "{error}");
    assert_eq!(
        events.stats().publish_failed,
        1,
        "the refused one is counted"
    );
}

/// In-process, a close ends every topic's subscription: each counts as an unsubscribe, as a
/// driver's close counts the unsubscribes it sends.
#[tokio::test]
async fn an_in_process_close_counts_an_unsubscribe_per_topic() {
    let events: EventTarget = EventTarget::local();
    let _a = events.subscribe("a:1").await.unwrap();
    let _b = events.subscribe("a:1").await.unwrap();
    events.add_event_listener("b:1", |_| {}).unwrap();
    events.close().await;
    let stats = events.stats();
    assert_eq!((stats.subscribes, stats.unsubscribes), (2, 2), "{stats:?}");
}

/// The `Stream` of test transports whose stream never yields.
macro_rules! stream_never_yields {
    ($($transport:ty),*) => {$(
        impl futures::Stream for $transport {
            type Item = alkdev_pubsub::Result<alkdev_pubsub::Up<Envelope>>;
            fn poll_next(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                std::task::Poll::Pending
            }
        }
    )*};
}

stream_never_yields!(Stalled, FlushRefused, AckedAfter);

/// A transport whose sink accepts one command and then never has room, and whose stream
/// never yields.
struct Stalled {
    sink: futures::channel::mpsc::Sender<alkdev_pubsub::Command<Envelope>>,
}

impl futures::Sink<alkdev_pubsub::Command<Envelope>> for Stalled {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.sink
            .poll_ready(cx)
            .map_err(|e| alkdev_pubsub::Error::closed(e.to_string()))
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        item: alkdev_pubsub::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        self.sink
            .start_send(item)
            .map_err(|e| alkdev_pubsub::Error::closed(e.to_string()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A transport whose stream ends once its close has begun, and which counts the polls of its
/// stream after that end (a stream need not survive them); its close takes three polls.
struct EndsOnClose {
    close_polls: u32,
    ended: bool,
    polled_after_end: Arc<AtomicU64>,
}

impl futures::Sink<alkdev_pubsub::Command<Envelope>> for EndsOnClose {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        self: std::pin::Pin<&mut Self>,
        _: alkdev_pubsub::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.close_polls += 1;
        if self.close_polls < 3 {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl futures::Stream for EndsOnClose {
    type Item = alkdev_pubsub::Result<alkdev_pubsub::Up<Envelope>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            self.polled_after_end.fetch_add(1, Ordering::SeqCst);
            return std::task::Poll::Ready(None);
        }
        if self.close_polls > 0 {
            self.ended = true;
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    }
}

#[tokio::test]
async fn a_stream_that_ends_while_the_transport_closes_is_not_polled_again() {
    let polled_after_end = Arc::new(AtomicU64::new(0));
    let events: EventTarget = EventTarget::new(EndsOnClose {
        close_polls: 0,
        ended: false,
        polled_after_end: Arc::clone(&polled_after_end),
    });
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("the close finishes");
    assert_eq!(polled_after_end.load(Ordering::SeqCst), 0);
}

/// A typed subscription passes over gap notices and counts them, and the events they stand for.
#[tokio::test]
async fn typed_subscription_counts_the_events_its_gaps_dropped() {
    let pubsub: PubSub<u64> = PubSub::local();
    let mut numbers = pubsub.subscribe("n", "1").await.unwrap();
    let capacity = alkdev_pubsub::DEFAULT_CAPACITY as u64;
    for n in 0..capacity + 6 {
        pubsub.publish("n", "1", n).await.unwrap();
    }
    assert_eq!(numbers.next().await, Some(6), "the six oldest were dropped");
    assert_eq!((numbers.gaps(), numbers.lagged()), (1, 6));
    for n in 7..capacity + 6 {
        assert_eq!(numbers.next().await, Some(n));
    }
    assert_eq!((numbers.gaps(), numbers.lagged()), (1, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_pubsub_round_trip() {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Status {
        state: String,
    }
    let pubsub: PubSub<Status> = PubSub::local();
    let mut statuses = pubsub.subscribe("session.status", "p1").await.unwrap();
    let mut other = pubsub.subscribe("session.status", "p2").await.unwrap();
    pubsub
        .publish(
            "session.status",
            "p1",
            Status {
                state: "running".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        statuses.next().await.unwrap(),
        Status {
            state: "running".into()
        }
    );
    testkit_quiet(&mut other).await;
    let stats = pubsub.stats();
    assert_eq!((stats.published, stats.delivered), (1, 1));
    pubsub.close().await;
    assert_eq!(
        statuses.next().await,
        None,
        "closing ends the subscriptions"
    );
    assert!(pubsub
        .publish(
            "s",
            "1",
            Status {
                state: "late".into()
            }
        )
        .await
        .is_err());
}

async fn testkit_quiet<S: futures::Stream + Unpin>(stream: &mut S)
where
    S::Item: std::fmt::Debug,
{
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
        panic!("expected nothing, got {item:?}");
    }
}

#[tokio::test]
async fn topics_over_the_limit_are_refused_with_a_clear_error() {
    use alkdev_pubsub::layers::MAX_TOPIC_LEN;
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let long_id = "x".repeat(MAX_TOPIC_LEN);
        let error = events
            .dispatch_event(numbered("long", &long_id, 0))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");
        assert!(
            error.to_string().contains("over the limit of 4096"),
            "{error}"
        );
        let error = events
            .subscribe(Topic::of("long", &long_id))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");
        // Right at the limit is fine.
        let at_limit = "y".repeat(MAX_TOPIC_LEN - "long:".len());
        let mut subscription = events
            .subscribe(Topic::of("long", &at_limit))
            .await
            .unwrap();
        events
            .dispatch_event(numbered("long", &at_limit, 1))
            .await
            .unwrap();
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);
    }
}

#[tokio::test]
async fn close_gives_up_on_a_stuck_transport_after_the_close_timeout() {
    let (sink, _rx) = futures::channel::mpsc::channel::<alkdev_pubsub::Command<Envelope>>(0);
    let events: EventTarget = EventTarget::builder()
        .close_timeout(Duration::from_millis(100))
        .build(Stalled { sink });
    let mut subscription = Box::pin(events.subscribe_with("stuck:1", SubscribeOptions::new()));
    // The subscribe can never be confirmed by this transport: close must still finish.
    assert!(futures::FutureExt::now_or_never(&mut subscription).is_none());
    for n in 0..5 {
        events
            .try_dispatch_event(numbered("stuck", "1", n))
            .unwrap();
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("close finishes after its timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(95),
        "the close gave up after {:?}, before its timeout",
        started.elapsed()
    );
    let error = tokio::time::timeout(WAIT, subscription)
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
}

/// The same, with the driver already waiting for the transport with publishes in hand when
/// the close comes: it must still hear of the close, and give up after its timeout. The
/// publishes it never sent count as failed.
#[tokio::test]
async fn close_gives_up_on_a_transport_stuck_with_publishes_in_hand() {
    let (sink, _rx) = futures::channel::mpsc::channel::<alkdev_pubsub::Command<Envelope>>(0);
    let events: EventTarget = EventTarget::builder()
        .close_timeout(Duration::from_millis(100))
        .build(Stalled { sink });
    for n in 0..5 {
        events
            .try_dispatch_event(numbered("stuck", "1", n))
            .unwrap();
    }
    // The driver runs: the transport takes one publish, and the driver waits with the rest.
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("close finishes after its timeout");
    assert_eq!(events.stats().published, 1);
    assert_eq!(events.stats().publish_failed, 4);
}

#[tokio::test]
async fn a_cancelled_in_process_dispatch_still_reaches_the_listeners_after_a_full_block_queue() {
    let events: EventTarget = EventTarget::local();
    let options = SubscribeOptions::new()
        .capacity(1)
        .overflow(Overflow::Block);
    let mut full = events.subscribe_with("c:1", options).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    events
        .add_event_listener("c:1", move |event| {
            record.lock().unwrap().push(number_of(event))
        })
        .unwrap();
    events.dispatch_event(numbered("c", "1", 0)).await.unwrap();
    let waiting = events.dispatch_event(numbered("c", "1", 1));
    assert!(
        tokio::time::timeout(Duration::from_millis(20), waiting)
            .await
            .is_err(),
        "the dispatch waits for room in the full queue"
    );
    // Cancelled: the callback after the full queue still gets the event, and the full
    // queue's reader hears that it missed one.
    assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
    let mut read = Vec::new();
    for _ in 0..2 {
        read.push(
            match tokio::time::timeout(WAIT, full.next()).await.unwrap() {
                Some(Ok(event)) => format!("event {}", number_of(&event)),
                Some(Err(gap)) => format!("{gap:?}"),
                None => "end".to_owned(),
            },
        );
    }
    read.sort();
    assert_eq!(read, ["Lagged(1)", "event 0"]);
}

#[tokio::test]
async fn removing_a_callback_that_holds_a_subscription_of_its_own_target_does_not_deadlock() {
    let events: EventTarget = EventTarget::local();
    let held = Mutex::new(Some(events.subscribe("held:1").await.unwrap()));
    let id = events
        .add_event_listener("holder:1", move |_| {
            let _ = held.lock().unwrap().is_some();
        })
        .unwrap();
    // The callback, and the subscription it holds, are dropped by the removal: that
    // subscription leaves its topic, which takes the listener map's lock again.
    let remover = events.clone();
    let (done, removed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(remover.remove_event_listener("holder:1", id));
    });
    assert_eq!(removed.recv_timeout(WAIT), Ok(true), "the removal finished");
    assert_eq!(events.listener_count("held:1"), 0);
}

/// A transport wrapper that records which tasks feed it, and, as asked: is not ready on every
/// fifth `poll_ready` (it asks to be polled again at once), so that publishes alternate
/// between being fed by the publishing task and being queued for the driver; panics on every
/// publish; says when it is dropped.
struct Probe<T> {
    inner: T,
    stutter: bool,
    panic_on_publish: bool,
    /// Once set, every publish fails as the connection being gone would (`ConnectionLost`).
    lose_on_publish: Arc<std::sync::atomic::AtomicBool>,
    /// Flushes panic once this is set.
    panic_on_flush: Arc<std::sync::atomic::AtomicBool>,
    /// Once set, every `poll_ready` fails (with an error that is not fatal), counted in
    /// `failed_readies`.
    fail_ready: Arc<std::sync::atomic::AtomicBool>,
    failed_readies: Arc<AtomicU64>,
    polls: u64,
    /// The tasks that fed it: the driver's, and publishers' when they feed it directly.
    feeders: Arc<Mutex<std::collections::HashSet<tokio::task::Id>>>,
    /// Publishes fed from outside any runtime (a transport may need one).
    outside_runtime: Arc<AtomicU64>,
    /// The task of each flush (none outside a task).
    flushers: Arc<Mutex<Vec<Option<tokio::task::Id>>>>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Probe<T> {
    fn new(inner: T) -> Self {
        Probe {
            inner,
            stutter: false,
            panic_on_publish: false,
            lose_on_publish: Arc::default(),
            panic_on_flush: Arc::default(),
            fail_ready: Arc::default(),
            failed_readies: Arc::default(),
            polls: 0,
            feeders: Arc::default(),
            outside_runtime: Arc::default(),
            flushers: Arc::default(),
            dropped: Arc::default(),
        }
    }
}

impl<T> Drop for Probe<T> {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl<T, M> futures::Sink<alkdev_pubsub::layers::Command<M>> for Probe<T>
where
    T: futures::Sink<alkdev_pubsub::layers::Command<M>, Error = alkdev_pubsub::Error> + Unpin,
{
    type Error = T::Error;

    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.polls += 1;
        if self.fail_ready.load(Ordering::SeqCst) {
            self.failed_readies.fetch_add(1, Ordering::SeqCst);
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(
                alkdev_pubsub::ErrorKind::Rejected,
                "NOPERM this user has no permissions to publish",
            )));
        }
        if self.stutter && self.polls % 5 == 0 {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        item: alkdev_pubsub::layers::Command<M>,
    ) -> Result<(), Self::Error> {
        if let Some(task) = tokio::task::try_id() {
            self.feeders.lock().unwrap().insert(task);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.outside_runtime.fetch_add(1, Ordering::SeqCst);
        }
        let publish = matches!(item, alkdev_pubsub::layers::Command::Publish { .. });
        if self.panic_on_publish && publish {
            panic!("this transport cannot publish");
        }
        if publish && self.lose_on_publish.load(Ordering::SeqCst) {
            return Err(alkdev_pubsub::Error::connection_lost(
                "the other side of the channel was dropped",
            ));
        }
        std::pin::Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.flushers.lock().unwrap().push(tokio::task::try_id());
        if self.panic_on_flush.load(Ordering::SeqCst) {
            panic!("this transport cannot flush");
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl<T: futures::Stream + Unpin> futures::Stream for Probe<T> {
    type Item = T::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// A publish the transport refuses because its connection is gone stops the target, and its
/// caller hears what every later caller hears: `Closed`, the transport's failure as its source
/// (it got the transport's own `ConnectionLost`, so that the kind depended on who fed it).
#[tokio::test]
async fn a_publish_that_finds_the_connection_gone_fails_as_closed() {
    let probe = Probe::new(LocalTransport::new());
    let lose = Arc::clone(&probe.lose_on_publish);
    let events: EventTarget = EventTarget::new(probe);
    // A publish that goes, and the driver at rest: the next publish is fed by its caller.
    events
        .dispatch_event(Envelope::new("t", "1", serde_json::json!(0)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    lose.store(true, Ordering::SeqCst);
    let first = events
        .dispatch_event(Envelope::new("t", "1", serde_json::json!(1)))
        .await
        .expect_err("fed at once, and refused");
    assert!(first.is_closed(), "{first}");
    let source = std::error::Error::source(&first).expect("why it stopped");
    assert!(
        source
            .to_string()
            .contains("the other side of the channel was dropped"),
        "{first}"
    );
    let later = events
        .dispatch_event(Envelope::new("t", "1", serde_json::json!(2)))
        .await
        .unwrap_err();
    assert!(later.is_closed(), "{later}");
    assert_eq!(events.stats().publish_failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_keep_each_publishers_order_whether_fed_directly_or_queued() {
    const PUBLISHERS: usize = 4;
    const EACH: u64 = 5_000;
    let mut probe = Probe::new(LocalTransport::new());
    probe.stutter = true;
    let feeders = Arc::clone(&probe.feeders);
    let transport = Recorder::new(probe);
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    // Publishers on both worker threads at once; half of them also use try_dispatch_event.
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let events = events.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    let envelope = Envelope::new(format!("p{p}"), n.to_string(), n.into());
                    if p % 2 == 1 && n % 3 == 0 {
                        // Retry on a full queue: the order must hold all the same.
                        let mut envelope = Some(envelope);
                        while let Some(next) = envelope.take() {
                            if events.try_dispatch_event(next.clone()).is_err() {
                                envelope = Some(next);
                                tokio::task::yield_now().await;
                            }
                        }
                    } else {
                        events.dispatch_event(envelope).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let total = PUBLISHERS as u64 * EACH;
    settle("every publish fed to the transport", || {
        events.stats().published == total
    })
    .await;
    let mut next = [0u64; PUBLISHERS];
    for recorded in log.take() {
        let Recorded::Publish(topic) = recorded else {
            continue;
        };
        let (publisher, n) = topic.split_once(':').unwrap();
        let p: usize = publisher[1..].parse().unwrap();
        let n: u64 = n.parse().unwrap();
        assert_eq!(
            n, next[p],
            "publisher {p}: {n} fed when {} was due",
            next[p]
        );
        next[p] += 1;
    }
    assert_eq!(next, [EACH; PUBLISHERS], "every publish fed exactly once");
    // Both ways were taken: the driver fed some, publishers fed others themselves.
    let feeders = feeders.lock().unwrap().len();
    assert!(feeders >= 2, "only {feeders} task(s) fed the transport");
}

#[tokio::test(flavor = "current_thread")]
async fn with_flush_each_publish_a_publisher_flushes_each_publish_it_feeds() {
    const BURST: usize = 50;
    for each in [false, true] {
        let probe = Probe::new(LocalTransport::new());
        let flushers = Arc::clone(&probe.flushers);
        let events: EventTarget = EventTarget::builder().flush_each_publish(each).build(probe);
        let mut subscription = events.subscribe("burst:1").await.unwrap();
        // One thread: the driver cannot run before the publishing task is done.
        let publisher = {
            let events = events.clone();
            tokio::spawn(async move {
                for n in 0..BURST as u64 {
                    events
                        .dispatch_event(numbered("burst", "1", n))
                        .await
                        .unwrap();
                }
                tokio::task::id()
            })
        };
        let publisher = publisher.await.unwrap();
        for n in 0..BURST as u64 {
            let event = subscription.next().await.unwrap().unwrap();
            assert_eq!(number_of(&event), n);
        }
        let by_publisher = flushers
            .lock()
            .unwrap()
            .iter()
            .filter(|task| **task == Some(publisher))
            .count();
        if each {
            assert_eq!(by_publisher, BURST, "the publisher flushed each publish");
        } else {
            // A burst is the driver's to flush (a publish after a pause is flushed at once).
            assert!(
                by_publisher < BURST / 2,
                "the publisher flushed {by_publisher} times"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn publishes_one_at_a_time_are_flushed_by_their_publisher_without_a_hand_off() {
    const EACH: usize = 20;
    let probe = Probe::new(LocalTransport::new());
    let flushers = Arc::clone(&probe.flushers);
    let events: EventTarget = EventTarget::builder().build(probe);
    let mut subscription = events.subscribe("pace:1").await.unwrap();
    let publisher = {
        let events = events.clone();
        tokio::spawn(async move {
            for n in 0..EACH as u64 {
                // A request and its reply's worth apart: just over the 20 µs that suffice
                // after a lone publish, under the 50 µs after which any publish counts as lone
                // (on a machine fast enough that the loop's own work takes under 29 µs), and far
                // over a burst's spacing. (A spin: a thread's sleep lasts 50 µs more than asked,
                // the kernel's default timer slack.)
                let paused = std::time::Instant::now();
                while paused.elapsed() < Duration::from_micros(21) {
                    std::hint::spin_loop();
                }
                events
                    .dispatch_event(numbered("pace", "1", n))
                    .await
                    .unwrap();
                // The driver may run (and would flush what the publisher left).
                tokio::task::yield_now().await;
            }
            tokio::task::id()
        })
    };
    let publisher = publisher.await.unwrap();
    for n in 0..EACH as u64 {
        assert_eq!(number_of(&subscription.next().await.unwrap().unwrap()), n);
    }
    let flushers = flushers.lock().unwrap();
    let by_publisher = flushers
        .iter()
        .filter(|task| **task == Some(publisher))
        .count();
    // The first may be left to the driver (it came less than 50 µs after the target began);
    // once a flush carried a single publish, each is flushed where it was fed.
    assert!(
        by_publisher >= EACH - 1,
        "the publisher flushed {by_publisher} of {EACH} ({} flushes)",
        flushers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_from_outside_the_runtime_are_fed_by_the_driver() {
    let mut probe = Probe::new(LocalTransport::new());
    probe.stutter = true;
    let outside = Arc::clone(&probe.outside_runtime);
    let transport = Recorder::new(probe);
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    // Let the driver run once, so that direct feeding would be possible.
    drop(events.subscribe("warm:up").await.unwrap());
    let publisher = {
        let events = events.clone();
        std::thread::spawn(move || {
            for n in 0..1_000u64 {
                let envelope = Envelope::new("plain", "thread", n.into());
                while events.try_dispatch_event(envelope.clone()).is_err() {
                    std::thread::yield_now();
                }
            }
        })
    };
    tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    settle("every publish fed", || {
        log.snapshot()
            .iter()
            .filter(|r| matches!(r, Recorded::Publish(_)))
            .count()
            == 1_000
    })
    .await;
    assert_eq!(outside.load(Ordering::SeqCst), 0, "fed from a plain thread");
    assert!(!events.is_closed());
}

#[tokio::test]
async fn a_transport_that_panics_on_publish_stops_the_target_with_a_clear_error() {
    // Fed by the publishing task (the driver has run), or queued (it has not run yet).
    for queued in [false, true] {
        let mut probe = Probe::new(LocalTransport::new());
        probe.panic_on_publish = true;
        let dropped = Arc::clone(&probe.dropped);
        let events: EventTarget = EventTarget::new(probe);
        events.add_event_listener("a:1", |_| {}).unwrap();
        if !queued {
            settle("the driver to run", || events.stats().subscribes == 1).await;
        }
        let published = events
            .dispatch_event(Envelope::new("a", "1", 1.into()))
            .await;
        // Caught where the publish was fed: the publisher gets the error, or the driver.
        match (queued, published) {
            (true, Ok(())) => {}
            (false, Err(error)) => assert!(
                error
                    .to_string()
                    .contains("the transport panicked: this transport cannot publish"),
                "{error}"
            ),
            (queued, other) => panic!("queued: {queued}, the publish returned {other:?}"),
        }
        settle("the target to stop", || events.is_closed()).await;
        let error = events
            .dispatch_event(Envelope::new("a", "1", 2.into()))
            .await
            .unwrap_err();
        assert!(error.is_closed(), "{error}");
        assert!(error.to_string().contains("panicked"), "{error}");
        assert_eq!(events.stats().publish_failed, 1, "queued: {queued}");
        // The driver ended and dropped the transport, though a handle is still alive.
        settle("the transport to be dropped", || {
            dropped.load(Ordering::SeqCst)
        })
        .await;
    }
}

/// A publish the publishing task fed itself, whose flush (a lone publish is flushed at once)
/// panics in the transport, counts once as failed (the stop counts what was fed; it counted
/// twice, once more as lost in the publisher's hands).
#[tokio::test]
async fn a_publish_whose_flush_panics_counts_once_as_failed() {
    let probe = Probe::new(LocalTransport::new());
    let panic_on_flush = Arc::clone(&probe.panic_on_flush);
    let events: EventTarget = EventTarget::new(probe);
    events.add_event_listener("a:1", |_| {}).unwrap();
    settle("the driver to run", || events.stats().subscribes == 1).await;
    panic_on_flush.store(true, Ordering::SeqCst);
    let error = events
        .dispatch_event(Envelope::new("a", "1", 1.into()))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("this transport cannot flush"),
        "{error}"
    );
    settle("the target to stop", || events.is_closed()).await;
    let stats = events.stats();
    assert_eq!((stats.published, stats.publish_failed), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn listeners_added_and_removed_between_messages_of_one_topic_are_honoured_at_once() {
    // Through a driver (LocalTransport), which remembers the last topic it routed.
    let events: EventTarget = EventTarget::new(LocalTransport::new());
    let next = |n: u64| numbered("t", "1", n);
    let mut a = events.subscribe("t:1").await.unwrap();
    events.dispatch_event(next(0)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);

    let mut b = events.subscribe("t:1").await.unwrap();
    events.dispatch_event(next(1)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 1);
    assert_eq!(number_of(&testkit::next_event(&mut b).await), 1);

    // A callback's captures are released when it is removed, not kept by the remembered route.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let id = events
        .add_event_listener("t:1", move |event| {
            let _ = seen_tx.send(number_of(event));
        })
        .unwrap();
    events.dispatch_event(next(2)).await.unwrap();
    assert_eq!(seen_rx.recv().await, Some(2));
    drop(a);
    assert!(events.remove_event_listener("t:1", id));
    events.dispatch_event(next(3)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut b).await), 2);
    assert_eq!(number_of(&testkit::next_event(&mut b).await), 3);
    let closed = tokio::time::timeout(WAIT, seen_rx.recv()).await;
    assert_eq!(
        closed,
        Ok(None),
        "the removed callback got an event or was kept alive"
    );
}

#[tokio::test]
async fn a_removed_callback_is_released_though_no_event_follows() {
    // The driver holds the listeners of what it routes while it routes a run of events: once
    // that run is over, a removed callback's captures must go, without waiting for the topic's
    // next event to replace what the driver last looked up.
    let events: EventTarget = EventTarget::new(LocalTransport::new());
    let mut keeps_the_topic = events.subscribe("t:1").await.unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let id = events
        .add_event_listener("t:1", move |event| {
            let _ = seen_tx.send(number_of(event));
        })
        .unwrap();
    events.dispatch_event(numbered("t", "1", 0)).await.unwrap();
    assert_eq!(seen_rx.recv().await, Some(0));
    assert_eq!(
        number_of(&testkit::next_event(&mut keeps_the_topic).await),
        0
    );
    assert!(events.remove_event_listener("t:1", id));
    let closed = tokio::time::timeout(WAIT, seen_rx.recv()).await;
    assert_eq!(closed, Ok(None), "the removed callback was kept alive");
}

/// A transport whose inbound items are put in by the test and which wakes no one for them
/// unless told to ([`Silent::wake`]): only a poll finds them. Subscribes
/// are confirmed at once; publishes are dropped. An item with payload `"panic"` makes
/// `poll_next` panic.
#[derive(Clone, Default)]
struct Silent {
    inbound: Arc<Mutex<std::collections::VecDeque<alkdev_pubsub::Up<Envelope>>>>,
    /// The waker of the last `poll_next` that found nothing.
    waker: Arc<Mutex<Option<std::task::Waker>>>,
    /// The tasks that took items out of it, and how many each.
    readers: Arc<Mutex<std::collections::HashMap<Option<tokio::task::Id>, usize>>>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Silent {
    fn put(&self, topic: &str, n: u64) {
        let (kind, id) = topic.split_once(':').unwrap();
        self.inbound
            .lock()
            .unwrap()
            .push_back(alkdev_pubsub::Up::Message {
                channel: None,
                message: numbered(kind, id, n),
            });
    }

    /// Wakes whoever last found nothing, as a real transport would when items arrive.
    fn wake(&self) {
        // Under the queue's lock, as `poll_next` leaves its waker: no wake-up is lost.
        let inbound = self.inbound.lock().unwrap();
        let waker = self.waker.lock().unwrap().take();
        drop(inbound);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl futures::Sink<alkdev_pubsub::Command<Envelope>> for Silent {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        self: std::pin::Pin<&mut Self>,
        item: alkdev_pubsub::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        if let alkdev_pubsub::Command::Subscribe(topic) = item {
            let mut inbound = self.inbound.lock().unwrap();
            inbound.push_back(alkdev_pubsub::Up::Subscribed(topic));
        }
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl futures::Stream for Silent {
    type Item = alkdev_pubsub::Result<alkdev_pubsub::Up<Envelope>>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let mut inbound = self.inbound.lock().unwrap();
        let Some(up) = inbound.pop_front() else {
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        };
        drop(inbound);
        if matches!(&up, alkdev_pubsub::Up::Message { message, .. } if message.payload == "panic") {
            panic!("this transport cannot read that");
        }
        *self
            .readers
            .lock()
            .unwrap()
            .entry(tokio::task::try_id())
            .or_default() += 1;
        std::task::Poll::Ready(Some(Ok(up)))
    }
}

/// A callback of `b:1` (a listener that is not a subscription), subscribed: the numbers of
/// its events, in the order it saw them.
async fn b_callback(events: &EventTarget) -> tokio::sync::mpsc::UnboundedReceiver<u64> {
    let subscribed = events.stats().subscribes;
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    events
        .add_event_listener("b:1", move |event| {
            let _ = seen_tx.send(number_of(event));
        })
        .unwrap();
    settle("the callback's subscribe", || {
        events.stats().subscribes == subscribed + 1
    })
    .await;
    seen_rx
}

/// (On one thread with the clock paused, as the lease tests below: the driver's lease timer
/// cannot fire before the reading task has run, however busy the machine.)
#[tokio::test(start_paused = true)]
async fn a_subscription_with_an_empty_queue_routes_what_the_transport_has_ready() {
    let silent = Silent::default();
    let events: EventTarget = EventTarget::new(silent.clone());
    let mut a = events.subscribe("a:1").await.unwrap();
    let mut idle = events.subscribe("c:1").await.unwrap();
    let mut seen_rx = b_callback(&events).await;
    // The driver has read everything and waits to be woken.
    settle("the driver to wait", || {
        silent.inbound.lock().unwrap().is_empty() && silent.waker.lock().unwrap().is_some()
    })
    .await;
    // Nothing wakes the driver for these: only a subscription that reads finds them.
    for n in 0..100 {
        silent.put("a:1", n);
        silent.put("b:1", n);
        silent.put("c:1", n);
    }
    let reader = tokio::spawn(async move {
        for n in 0..100 {
            assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
        }
        tokio::task::id()
    });
    let reader = reader.await.unwrap();
    assert!(silent.readers.lock().unwrap().contains_key(&Some(reader)));
    // Routed on the way, in order: the callback's topic, and a subscription nobody read yet.
    for n in 0..100 {
        assert_eq!(seen_rx.recv().await, Some(n));
        assert_eq!(number_of(&testkit::next_event(&mut idle).await), n);
    }
}

// The lease tests run on one thread with the clock paused: time moves only when every task
// waits, so a subscription that reads is never overtaken by the end of its lease, and one that
// does not read loses it after the lease's millisecond or two of (virtual) time.

/// A target over a fresh [`Silent`] transport, and its subscription of `a:1`.
async fn silent_target() -> (Silent, EventTarget, alkdev_pubsub::Subscription) {
    silent_target_with(SubscribeOptions::new()).await
}

/// [`silent_target`], its subscription with `options`.
async fn silent_target_with(
    options: SubscribeOptions,
) -> (Silent, EventTarget, alkdev_pubsub::Subscription) {
    let silent = Silent::default();
    let events: EventTarget = EventTarget::new(silent.clone());
    let a = events.subscribe_with("a:1", options).await.unwrap();
    (silent, events, a)
}

/// Once a reader has found `silent` drained and waits (and with the record of who read
/// cleared), puts `count` items of each topic in `burst`, in order, and wakes the driver.
async fn burst_once_the_reader_waits(silent: &Silent, burst: &[(&str, u64)]) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    silent.readers.lock().unwrap().clear();
    for &(topic, count) in burst {
        for n in 0..count {
            silent.put(topic, n);
        }
    }
    silent.wake();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_subscription_reads_what_arrives_itself() {
    let (silent, _events, mut a) = silent_target().await;
    let reader = tokio::spawn(async move {
        for n in 0..100 {
            assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
        }
        tokio::task::id()
    });
    // The burst starts with items of a topic nobody listens to: what the driver routes first
    // wakes no reader, so only its hand-over can.
    burst_once_the_reader_waits(&silent, &[("b:1", 8), ("a:1", 100)]).await;
    let reader = reader.await.unwrap();
    // The driver, woken by the transport, routed the first few and left the rest of the burst
    // to the waiting subscription: decoded and routed in the task that consumed them.
    let readers = silent.readers.lock().unwrap().clone();
    assert!(readers.get(&Some(reader)) >= Some(&90), "{readers:?}");
}

#[tokio::test(start_paused = true)]
async fn what_a_subscription_reads_for_itself_keeps_its_order_with_what_it_queues() {
    let (silent, events, mut a) = silent_target().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // One read of the transport finds an event, a reconnect and an event. The first event goes
    // straight to the subscription that reads; the notice goes through its queue, and the
    // second event must not overtake it.
    silent.put("a:1", 0);
    silent
        .inbound
        .lock()
        .unwrap()
        .push_back(alkdev_pubsub::Up::Reconnected);
    silent.put("a:1", 1);
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);
    assert_eq!(a.len(), 2, "the notice and the second event wait");
    assert_eq!(testkit::next_gap(&mut a).await, Gap::Reconnected);
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 1);
    assert!(silent.inbound.lock().unwrap().is_empty());
    let stats = events.stats();
    assert_eq!((stats.delivered, stats.reconnects), (2, 1));
}

/// [`silent_target`] with a queue of one event under `overflow`.
async fn silent_target_of_one(
    overflow: Overflow,
) -> (Silent, EventTarget, alkdev_pubsub::Subscription) {
    silent_target_with(SubscribeOptions::new().capacity(1).overflow(overflow)).await
}

#[tokio::test(start_paused = true)]
async fn what_a_subscription_reads_for_itself_counts_against_its_capacity() {
    let (silent, events, mut a) = silent_target_of_one(Overflow::DropNewest).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 0..3 {
        silent.put("a:1", n);
    }
    // The first fills the queue of one while the subscription holds it; the next two are
    // dropped, as if the driver had routed them.
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);
    assert_eq!(testkit::next_gap(&mut a).await, Gap::Lagged(2));
    assert!(futures::poll!(a.next()).is_pending());
    let stats = events.stats();
    assert_eq!((stats.delivered, stats.lagged), (1, 2));

    // Lossless: the rest waits for room, and comes in order.
    let (silent, _events, mut a) = silent_target_of_one(Overflow::Block).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 0..3 {
        silent.put("a:1", n);
    }
    for n in 0..3 {
        assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
        assert!(a.len() <= 1, "{} held by a queue of one", a.len());
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscription_that_reads_for_itself_leaves_a_shared_queue_to_both_readers() {
    let (silent, events, mut a) = silent_target().await;
    let mut also = events.subscribe("a:1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 0..10 {
        silent.put("a:1", n);
    }
    for n in 0..10 {
        assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
    }
    for n in 0..10 {
        assert_eq!(number_of(&testkit::next_event(&mut also).await), n);
    }
}

/// Expects `0..numbers` from `seen`, within a few (paused) milliseconds: a lease lasts two at
/// most.
async fn expect_numbers_soon(seen: &mut tokio::sync::mpsc::UnboundedReceiver<u64>, numbers: u64) {
    let started = tokio::time::Instant::now();
    for n in 0..numbers {
        let next = tokio::time::timeout(WAIT, seen.recv()).await;
        assert_eq!(next, Ok(Some(n)), "the callback is held up");
    }
    let took = started.elapsed();
    assert!(took <= Duration::from_millis(5), "held up for {took:?}");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_subscription_that_is_not_polled_does_not_hold_up_the_others() {
    let (silent, events, mut a) = silent_target().await;
    let mut seen = b_callback(&events).await;
    // Polled once: it finds the transport drained and waits, then is never polled again (its
    // task awaits something else). The driver, woken for a burst, hands the transport to it,
    // and must take it back.
    assert!(futures::poll!(a.next()).is_pending());
    for n in 0..100 {
        silent.put("b:1", n);
    }
    silent.wake();
    expect_numbers_soon(&mut seen, 100).await;
    drop(a);
}

#[tokio::test(start_paused = true)]
async fn a_subscription_that_stops_reading_the_transport_midway_does_not_hold_up_the_others() {
    let (silent, events, mut a) = silent_target().await;
    let mut seen = b_callback(&events).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 0..100 {
        silent.put("a:1", n);
        silent.put("b:1", n);
    }
    // More is ready than one read of the transport takes: this subscription reads on for the
    // target, as long as it is polled. It stops after its first event.
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);
    expect_numbers_soon(&mut seen, 100).await;
    assert!(silent.inbound.lock().unwrap().is_empty());
    // Nothing of its own was lost meanwhile.
    for n in 1..100 {
        assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscription_that_reads_slowly_does_not_hold_up_the_others() {
    let (silent, events, mut a) = silent_target().await;
    let mut seen = b_callback(&events).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // One event in 32 is the slow subscription's; it takes half a millisecond over each, and
    // reads the transport for the target whenever its queue runs dry.
    for n in 0..3_200 {
        if n % 32 == 0 {
            silent.put("a:1", n / 32);
        } else {
            silent.put("b:1", n - n / 32 - 1);
        }
    }
    let slow = tokio::spawn(async move {
        for n in 0..100 {
            assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    // Its lease is taken back: the callback does not wait for it (50 ms in all).
    expect_numbers_soon(&mut seen, 3_100).await;
    slow.await.unwrap();
}

#[tokio::test]
async fn a_transport_that_panics_when_a_subscription_reads_it_stops_the_target() {
    let silent = Silent::default();
    let dropped = Arc::clone(&silent.dropped);
    let events: EventTarget = EventTarget::new(silent.clone());
    let mut a = events.subscribe("a:1").await.unwrap();
    silent.put("a:1", 0);
    assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);
    silent
        .inbound
        .lock()
        .unwrap()
        .push_back(alkdev_pubsub::Up::Message {
            channel: None,
            message: Envelope::new("a", "1", "panic".into()),
        });
    // This read of the transport, from the subscription's task, panics: the stream ends and
    // the target stops.
    let end = tokio::time::timeout(WAIT, a.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "{end:?}");
    assert!(events.is_closed());
    let error = events
        .dispatch_event(Envelope::new("a", "1", 1.into()))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("read by a subscription) panicked"),
        "{error}"
    );
    settle("the transport to be dropped", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
}

// ------------------------------------------------ subscriptions sharing one queue
//
// Subscriptions of a topic with the same capacity and a `DropOldest` or `Block` policy read one
// queue, each with its own cursor. These pin that each still behaves as if it had its own.

async fn publish_numbers(events: &EventTarget, topic_id: &str, numbers: std::ops::Range<u64>) {
    for n in numbers {
        events
            .dispatch_event(numbered("shared", topic_id, n))
            .await
            .unwrap();
    }
}

async fn shared_drop_oldest_lags_the_slow_reader_only(events: EventTarget) {
    let options = SubscribeOptions::new().capacity(10);
    let mut fast = events.subscribe_with("shared:1", options).await.unwrap();
    let mut slow = events.subscribe_with("shared:1", options).await.unwrap();
    assert_eq!(events.listener_count("shared:1"), 2);
    for n in 0..100 {
        publish_numbers(&events, "1", n..n + 1).await;
        // The fast reader keeps up: it never lags.
        assert_eq!(number_of(&testkit::next_event(&mut fast).await), n);
    }
    // Ten events and the lag notice wait.
    assert_eq!(slow.len(), 11);
    assert_eq!(slow.next().await.unwrap().unwrap_err(), Gap::Lagged(90));
    for n in 90..100 {
        assert_eq!(number_of(&slow.next().await.unwrap().unwrap()), n);
    }
    assert!(slow.is_empty() && fast.is_empty());
    let stats = events.stats();
    assert_eq!((stats.delivered, stats.lagged), (200, 90));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_drop_oldest_queue_lags_the_slow_reader_only_in_process() {
    shared_drop_oldest_lags_the_slow_reader_only(EventTarget::local()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_drop_oldest_queue_lags_the_slow_reader_only_through_the_driver() {
    shared_drop_oldest_lags_the_slow_reader_only(EventTarget::new(LocalTransport::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_block_queue_waits_for_its_slowest_reader_and_loses_nothing() {
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let options = SubscribeOptions::new()
            .capacity(4)
            .overflow(Overflow::Block);
        let mut readers = Vec::new();
        for _ in 0..3 {
            readers.push(events.subscribe_with("shared:2", options).await.unwrap());
        }
        let publisher = {
            let events = events.clone();
            tokio::spawn(async move { publish_numbers(&events, "2", 0..300).await })
        };
        let tasks: Vec<_> = readers
            .into_iter()
            .enumerate()
            .map(|(reader, mut subscription)| {
                tokio::spawn(async move {
                    for n in 0..300 {
                        let event = testkit::next_event(&mut subscription).await;
                        assert_eq!(number_of(&event), n, "reader {reader}");
                        assert!(subscription.len() <= 4, "over capacity");
                        // Reader 0 is slow.
                        if reader == 0 && n % 50 == 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        publisher.await.unwrap();
        let stats = events.stats();
        assert_eq!((stats.delivered, stats.lagged), (900, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_reader_a_block_queue_waits_for_lets_the_publisher_go_on() {
    let events = EventTarget::local();
    let options = SubscribeOptions::new()
        .capacity(4)
        .overflow(Overflow::Block);
    let mut reading = events.subscribe_with("shared:3", options).await.unwrap();
    let stuck = events.subscribe_with("shared:3", options).await.unwrap();
    let publisher = {
        let events = events.clone();
        tokio::spawn(async move { publish_numbers(&events, "3", 0..100).await })
    };
    for n in 0..4 {
        assert_eq!(number_of(&testkit::next_event(&mut reading).await), n);
    }
    // The queue is full for `stuck`: nothing more arrives while it stays.
    testkit_quiet(&mut reading).await;
    assert!(!publisher.is_finished());
    drop(stuck);
    for n in 4..100 {
        assert_eq!(number_of(&testkit::next_event(&mut reading).await), n);
    }
    tokio::time::timeout(WAIT, publisher)
        .await
        .expect("the publisher went on")
        .unwrap();
}

#[tokio::test]
async fn a_reader_joining_a_shared_queue_starts_at_the_next_event_and_leaves_alone() {
    let events = EventTarget::local();
    let mut first = events.subscribe("shared:4").await.unwrap();
    publish_numbers(&events, "4", 0..5).await;
    let mut second = events.subscribe("shared:4").await.unwrap();
    // Different settings: a queue of its own, never shared.
    let newest = SubscribeOptions::new().overflow(Overflow::DropNewest);
    let mut third = events.subscribe_with("shared:4", newest).await.unwrap();
    let fourth = events.subscribe_with("shared:4", newest).await.unwrap();
    assert_eq!(events.listener_count("shared:4"), 4);
    publish_numbers(&events, "4", 5..10).await;
    assert_eq!((first.len(), second.len(), third.len()), (10, 5, 5));
    for n in 0..10 {
        assert_eq!(number_of(&testkit::next_event(&mut first).await), n);
    }
    for n in 5..10 {
        assert_eq!(number_of(&testkit::next_event(&mut second).await), n);
        assert_eq!(number_of(&testkit::next_event(&mut third).await), n);
    }
    // Removing one reader by its id ends that subscription only.
    assert!(events.remove_event_listener("shared:4", first.id()));
    assert!(first.next().await.is_none());
    assert!(!events.remove_event_listener("shared:4", first.id()));
    drop(fourth);
    assert_eq!(events.listener_count("shared:4"), 2);
    publish_numbers(&events, "4", 10..11).await;
    assert_eq!(number_of(&testkit::next_event(&mut second).await), 10);
    assert_eq!(number_of(&testkit::next_event(&mut third).await), 10);
    drop((first, second, third));
    assert_eq!(events.topic_count(), 0);
    let stats = events.stats();
    assert_eq!((stats.subscribes, stats.unsubscribes), (1, 1));
}

#[tokio::test]
async fn a_reader_keeps_the_batch_it_took_when_a_drop_oldest_queue_overflows() {
    let events = EventTarget::local();
    let options = SubscribeOptions::new().capacity(4);
    let mut lone = events.subscribe_with("shared:5", options).await.unwrap();
    publish_numbers(&events, "5", 0..10).await;
    assert_eq!(lone.next().await.unwrap().unwrap_err(), Gap::Lagged(6));
    // Takes 6..=9: yields 6, holds 7..=9.
    assert_eq!(number_of(&testkit::next_event(&mut lone).await), 6);
    // The queue overflows while they wait in the batch: they are not lost (nor counted
    // lost), and a reader joining now shares the queue from the next event.
    publish_numbers(&events, "5", 10..12).await;
    let mut joined = events.subscribe_with("shared:5", options).await.unwrap();
    publish_numbers(&events, "5", 12..13).await;
    for n in 7..13 {
        assert_eq!(number_of(&testkit::next_event(&mut lone).await), n);
    }
    assert_eq!(number_of(&testkit::next_event(&mut joined).await), 12);
    assert!(lone.is_empty() && joined.is_empty());
    let stats = events.stats();
    assert_eq!((stats.delivered, stats.lagged), (14, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_removed_by_its_id_while_it_waits_ends() {
    for events in [
        EventTarget::local(),
        EventTarget::new(LocalTransport::new()),
    ] {
        let options = SubscribeOptions::new().capacity(8);
        let mut removed = events.subscribe_with("shared:6", options).await.unwrap();
        let mut other = events.subscribe_with("shared:6", options).await.unwrap();
        let id = removed.id();
        let waiting = tokio::spawn(async move { removed.next().await.is_none() });
        // Let it register its waker and sleep.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(events.remove_event_listener("shared:6", id));
        let ended = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the waiting task was woken")
            .unwrap();
        assert!(ended, "the stream ended");
        publish_numbers(&events, "6", 0..1).await;
        assert_eq!(number_of(&testkit::next_event(&mut other).await), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_subscription_has_yielded_no_longer_hold_a_block_publisher() {
    let events = EventTarget::local();
    let options = SubscribeOptions::new()
        .capacity(2)
        .overflow(Overflow::Block);
    let mut subscription = events.subscribe_with("shared:7", options).await.unwrap();
    publish_numbers(&events, "7", 0..2).await;
    // Both are taken in one batch and yielded.
    for n in 0..2 {
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
    }
    // A lockstep protocol: the subscriber waits for a signal the publisher gives only once
    // two more events are in, without polling the subscription meanwhile.
    let (signal, signalled) = tokio::sync::oneshot::channel();
    let publisher = {
        let events = events.clone();
        tokio::spawn(async move {
            publish_numbers(&events, "7", 2..4).await;
            signal.send(()).unwrap();
        })
    };
    tokio::time::timeout(WAIT, signalled)
        .await
        .expect("the publisher found room")
        .unwrap();
    for n in 2..4 {
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
    }
    publisher.await.unwrap();
}

/// A transport that takes every command and whose flushes fail (a peer that refused the
/// publishes, as Redis answers a pipeline with `NOPERM`), not for good.
struct FlushRefused;

impl futures::Sink<alkdev_pubsub::Command<Envelope>> for FlushRefused {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        self: std::pin::Pin<&mut Self>,
        _: alkdev_pubsub::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(
            alkdev_pubsub::ErrorKind::Rejected,
            "NOPERM this user has no permissions to access one of the channels",
        )))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Publishes whose flush failed count in `Stats::publish_failed`, as `dispatch_event` says,
/// and not only the confirmed ones, which are told.
#[tokio::test]
async fn publishes_whose_flush_failed_are_counted() {
    let events: EventTarget = EventTarget::new(FlushRefused);
    for n in 0..10 {
        events
            .dispatch_event(numbered("refused", "x", n))
            .await
            .expect("taken");
    }
    let confirmed = events
        .dispatch_confirmed(numbered("refused", "x", 10))
        .await
        .expect_err("the flush failed");
    assert!(confirmed.to_string().contains("NOPERM"), "{confirmed}");
    let stats = events.stats();
    assert_eq!(stats.published, 11, "{stats:?}");
    assert_eq!(stats.publish_failed, 11, "{stats:?}");
    events.close().await;
}

/// A transport acknowledged as Redis is: a flush completes once everything fed was
/// acknowledged, `rtt` after it was fed (never, with `None`: an outage the flush waits
/// through). Counts the publishes fed.
struct AckedAfter {
    rtt: Option<Duration>,
    fed: Arc<AtomicU64>,
    last_fed: Option<tokio::time::Instant>,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl AckedAfter {
    fn new(rtt: Option<Duration>, fed: &Arc<AtomicU64>) -> Self {
        AckedAfter {
            rtt,
            fed: Arc::clone(fed),
            last_fed: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }
}

impl futures::Sink<alkdev_pubsub::Command<Envelope>> for AckedAfter {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        command: alkdev_pubsub::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        if let alkdev_pubsub::Command::Publish { .. } = command {
            self.fed.fetch_add(1, Ordering::SeqCst);
        }
        self.last_fed = Some(tokio::time::Instant::now());
        Ok(())
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        let (Some(last), Some(rtt)) = (self.last_fed, self.rtt) else {
            // Nothing fed, or an outage: acknowledged at once, or never.
            return match self.last_fed {
                None => std::task::Poll::Ready(Ok(())),
                Some(_) => std::task::Poll::Pending,
            };
        };
        self.timer.as_mut().reset(last + rtt);
        std::task::ready!(std::future::Future::poll(self.timer.as_mut(), cx));
        self.last_fed = None;
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Over a transport acknowledged 50 ms after what was fed last (as a Redis pipeline is, one
/// round trip on), a publisher that never pauses left the flush pending for as long as it
/// published: a confirmed dispatch among its publishes was never answered, and layers that
/// keep what is unflushed grew. Publishes now wait for the flush once 4,096 were fed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_dispatch_is_answered_among_publishes_that_never_pause() {
    let fed = Arc::new(AtomicU64::new(0));
    let events: EventTarget =
        EventTarget::new(AckedAfter::new(Some(Duration::from_millis(50)), &fed));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (events, stop) = (events.clone(), Arc::clone(&stop));
        async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                events
                    .dispatch_event(numbered("steady", "x", n))
                    .await
                    .unwrap();
                n += 1;
            }
        }
    });
    for attempt in 0..3 {
        let asked_at = fed.load(Ordering::SeqCst);
        tokio::time::timeout(
            WAIT,
            events.dispatch_confirmed(numbered("steady", "c", attempt)),
        )
        .await
        .expect("answered while the publisher goes on")
        .unwrap();
        // Answered by a flush that covered at most a window, and the driver's queue, more.
        let meanwhile = fed.load(Ordering::SeqCst) - asked_at;
        assert!(
            meanwhile <= 4 * (4096 + 1024),
            "{meanwhile} publishes fed meanwhile"
        );
    }
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
}

/// A close that finds more queued than a flush window sends all of it and does not wait for
/// its deadline: the completed flush lets the next window go while the target drains, as it
/// does while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_drains_more_than_a_flush_window_without_waiting_for_its_deadline() {
    let fed = Arc::new(AtomicU64::new(0));
    let events: EventTarget = EventTarget::builder()
        .publish_capacity(16_384)
        .close_timeout(Duration::from_secs(600))
        .build(AckedAfter::new(Some(Duration::from_millis(50)), &fed));
    // Queued from a thread outside the runtime, so that nothing is fed directly: the driver
    // feeds a window, then waits for its flush while the rest waits in the queue.
    let count = 3 * 4096;
    std::thread::spawn({
        let events = events.clone();
        move || {
            for n in 0..count {
                events
                    .try_dispatch_event(numbered("drain", "x", n))
                    .unwrap();
            }
        }
    })
    .join()
    .unwrap();
    // A close that waited for its deadline would take ten minutes.
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("the close did not wait for its deadline");
    assert_eq!(fed.load(Ordering::SeqCst), count);
}

/// A flush that does not come (an outage the transport's layers buffer through) holds
/// publishes up for 100 ms per window, not for the outage: they go on being fed, and the
/// layers' own bounds apply (the reconnect layer refuses publishes at once past its buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_go_on_while_a_flush_does_not_come() {
    let fed = Arc::new(AtomicU64::new(0));
    let events: EventTarget = EventTarget::new(AckedAfter::new(None, &fed));
    let count = 3 * 4096 + 100;
    tokio::time::timeout(WAIT, async {
        for n in 0..count {
            events
                .dispatch_event(numbered("outage", "x", n))
                .await
                .unwrap();
        }
    })
    .await
    .expect("every publish is taken");
    settle("every publish fed", || fed.load(Ordering::SeqCst) == count).await;
    assert_eq!(events.stats().published, count);
}

/// A callback removed while a dispatch waits for room in a `Block` queue ahead of it is not
/// called by that dispatch, as a DOM `EventTarget` skips a listener removed during a dispatch.
#[tokio::test]
async fn a_callback_removed_while_a_dispatch_waits_ahead_of_it_is_not_called() {
    let events: EventTarget = EventTarget::local();
    let mut subscription = block_of_one(&events).await;
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let callback = events
        .add_event_listener("t:1", move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    events.dispatch_event(numbered("t", "1", 0)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The queue is full: the next dispatch waits there, before the callback.
    let mut waiting = Box::pin(events.dispatch_event(numbered("t", "1", 1)));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    assert!(events.remove_event_listener("t:1", callback));
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 0);
    waiting.await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "called after its removal");
}

/// A publish capacity past Tokio's channel limit (`usize::MAX` for "unbounded", say) is taken
/// as that limit, rather than panic when the target is built.
#[tokio::test]
async fn a_publish_capacity_past_the_channel_limit_is_taken_as_that_limit() {
    let events: EventTarget = EventTarget::builder()
        .publish_capacity(usize::MAX)
        .build(LocalTransport::new());
    let mut subscription = events.subscribe("t:1").await.unwrap();
    events.dispatch_event(numbered("t", "1", 7)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 7);
    events.close().await;
}

/// A target whose driver task is gone with its runtime (a target built on a runtime that shut
/// down: a test's, a temporary one) is stopped, not left looking open: its subscriptions end,
/// its calls fail at once, and `close()` returns.
#[test]
fn a_target_whose_runtime_shut_down_is_stopped_and_its_subscriptions_end() {
    let first = tokio::runtime::Runtime::new().unwrap();
    let (events, mut subscription) = first.block_on(async {
        let events: EventTarget = EventTarget::new(LocalTransport::new());
        let subscription = events.subscribe("a:1").await.unwrap();
        (events, subscription)
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        assert!(events.is_closed());
        let ended = tokio::time::timeout(WAIT, subscription.next()).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
        let error = events
            .dispatch_event(numbered("a", "1", 0))
            .await
            .unwrap_err();
        assert!(error.is_closed(), "{error}");
        assert!(error.to_string().contains("driver task"), "{error}");
        let error = events.subscribe("b:1").await.unwrap_err();
        assert!(error.is_closed(), "{error}");
        tokio::time::timeout(WAIT, events.close()).await.unwrap();
    });
}

/// A transport the test answers by hand: it takes every command (wrap it in a [`Recorder`] to
/// see them) and yields what the test pushes. With `slow_flush`, a flush never completes (a
/// close still does: it flushes and closes in one go). With `hang_close`, a close begins (a
/// flush then completes) and never ends, as a WebSocket's that flushed everything and waits
/// for its peer's close frame. While `gate` is shut, it takes no command.
struct Scripted {
    up: futures::channel::mpsc::UnboundedReceiver<alkdev_pubsub::layers::Up<Envelope>>,
    slow_flush: bool,
    hang_close: bool,
    closing: bool,
    gate: Arc<Gate>,
    /// How many items the target took from it.
    taken: Arc<AtomicU64>,
}

impl Scripted {
    /// A transport that yields what is sent to `up`: flushes and closes at once, its gate
    /// open.
    fn new(
        up: futures::channel::mpsc::UnboundedReceiver<alkdev_pubsub::layers::Up<Envelope>>,
    ) -> Self {
        Scripted {
            up,
            slow_flush: false,
            hang_close: false,
            closing: false,
            gate: Arc::default(),
            taken: Arc::default(),
        }
    }
}

/// Shuts a [`Scripted`] transport's `poll_ready` until opened.
#[derive(Default)]
struct Gate {
    /// Shut, and the task waiting for it to open.
    state: Mutex<(bool, Option<std::task::Waker>)>,
}

impl Gate {
    fn shut(&self) {
        self.state.lock().unwrap().0 = true;
    }

    fn open(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 = false;
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }
}

impl futures::Sink<alkdev_pubsub::layers::Command<Envelope>> for Scripted {
    type Error = alkdev_pubsub::Error;

    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        let mut gate = self.gate.state.lock().unwrap();
        if gate.0 {
            gate.1 = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn start_send(
        self: std::pin::Pin<&mut Self>,
        _: alkdev_pubsub::layers::Command<Envelope>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.slow_flush && !self.closing {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.hang_close {
            self.closing = true;
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl futures::Stream for Scripted {
    type Item = Result<alkdev_pubsub::layers::Up<Envelope>, alkdev_pubsub::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let up = self.up.poll_next_unpin(cx);
        if let std::task::Poll::Ready(Some(_)) = &up {
            self.taken.fetch_add(1, Ordering::SeqCst);
        }
        up.map(|up| up.map(Ok))
    }
}

/// Subscribes to `topic` over a [`Scripted`] transport fed by `answer`: once `sent()` says
/// the subscribe went out, the transport confirms it.
async fn subscribe_confirmed(
    events: &EventTarget,
    answer: &futures::channel::mpsc::UnboundedSender<alkdev_pubsub::layers::Up<Envelope>>,
    topic: &str,
    options: SubscribeOptions,
    sent: impl Fn() -> bool,
) -> alkdev_pubsub::Subscription {
    let subscribing = tokio::spawn({
        let (events, topic) = (events.clone(), topic.to_owned());
        async move { events.subscribe_with(topic, options).await }
    });
    settle("the subscribe", sent).await;
    answer
        .unbounded_send(alkdev_pubsub::layers::Up::Subscribed(topic.into()))
        .unwrap();
    tokio::time::timeout(WAIT, subscribing)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// A close waits for the answer to its own unsubscribe of a topic, not for the answer to an
/// earlier one still on its way: events the topic's listeners get in between are delivered.
/// With `shut`, the transport takes no command when the earlier answer comes (the close's
/// unsubscribe still waits to be sent).
async fn close_waits_for_its_own_unsubscribe(shut: bool) {
    use alkdev_pubsub::layers::Up;
    let gate = Arc::new(Gate::default());
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Recorder::new(Scripted {
        gate: Arc::clone(&gate),
        ..Scripted::new(up)
    });
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    let sent_count = |what: Recorded| {
        let log = log.clone();
        move || log.snapshot().iter().filter(|r| **r == what).count()
    };
    let first = events.add_event_listener("t:1", |_| {}).unwrap();
    settle("the subscribe", || {
        sent_count(Recorded::Subscribe("t:1".into()))() == 1
    })
    .await;
    answer.unbounded_send(Up::Subscribed("t:1".into())).unwrap();
    // The last listener leaves (an unsubscribe goes out), then the topic gets one again.
    assert!(events.remove_event_listener("t:1", first));
    settle("the unsubscribe", || {
        sent_count(Recorded::Unsubscribe("t:1".into()))() == 1
    })
    .await;
    let got = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&got);
    events
        .add_event_listener("t:1", move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    settle("the second subscribe", || {
        sent_count(Recorded::Subscribe("t:1".into()))() == 2
    })
    .await;
    if shut {
        gate.shut();
    }
    let closing = tokio::spawn({
        let events = events.clone();
        async move { events.close().await }
    });
    if !shut {
        settle("the close's unsubscribe", || {
            sent_count(Recorded::Unsubscribe("t:1".into()))() == 2
        })
        .await;
    }

    // The answer to the first unsubscribe does not end the close.
    answer
        .unbounded_send(Up::Unsubscribed("t:1".into()))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if shut {
        gate.open();
        settle("the close's unsubscribe", || {
            sent_count(Recorded::Unsubscribe("t:1".into()))() == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !closing.is_finished(),
        "closed on an earlier unsubscribe's answer"
    );
    answer.unbounded_send(Up::Subscribed("t:1".into())).unwrap();
    answer
        .unbounded_send(Up::Message {
            channel: Some("t:1".into()),
            message: numbered("t", "1", 0),
        })
        .unwrap();
    answer
        .unbounded_send(Up::Unsubscribed("t:1".into()))
        .unwrap();
    tokio::time::timeout(WAIT, closing).await.unwrap().unwrap();
    assert_eq!(
        got.load(Ordering::SeqCst),
        1,
        "the event in flight was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_waits_for_its_own_unsubscribe_not_an_earlier_ones_answer() {
    close_waits_for_its_own_unsubscribe(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_waits_for_its_own_unsubscribe_even_before_it_is_sent() {
    close_waits_for_its_own_unsubscribe(true).await;
}

/// A close that times out while an event waits for room in a full `Block` subscription does
/// not lose it silently: the subscription yields what it holds, then hears of the drop
/// (`Gap::Lagged`, counted), then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_times_out_on_a_full_block_subscription_reports_the_drop() {
    let events: EventTarget = EventTarget::builder()
        .close_timeout(Duration::from_millis(100))
        .build(LocalTransport::new());
    let mut subscription = block_of_one(&events).await;
    for n in 0..2 {
        events.dispatch_event(numbered("t", "1", n)).await.unwrap();
    }
    // The first fills the queue; the second waits for room.
    settle("the second event to wait", || {
        events.stats().delivered == 1 && events.stats().published == 2
    })
    .await;
    // (The driver reads the second one back from the transport and finds the queue full.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(WAIT, events.close()).await.unwrap();
    event_then_drop_then_end(&mut subscription).await;
    assert_eq!(events.stats().lagged, 1);
}

/// A confirmed dispatch still waiting for its flush when the close gives up waiting is
/// answered by the transport's close, which flushes: `Ok` when it succeeds. Also when the
/// close runs out of time with the transport's own close still under way (`hang_close`),
/// having flushed (it was told `Err`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_dispatch_is_answered_by_the_close_that_flushed_it() {
    for hang_close in [false, true] {
        let (_answer, up) = futures::channel::mpsc::unbounded();
        let events: EventTarget = EventTarget::builder()
            .close_timeout(Duration::from_millis(100))
            .build(Scripted {
                slow_flush: true,
                hang_close,
                ..Scripted::new(up)
            });
        let confirmed = tokio::spawn({
            let events = events.clone();
            async move { events.dispatch_confirmed(numbered("t", "1", 0)).await }
        });
        settle("the publish", || events.stats().published == 1).await;
        tokio::time::timeout(WAIT, events.close()).await.unwrap();
        let answer = tokio::time::timeout(WAIT, confirmed)
            .await
            .unwrap()
            .unwrap();
        assert!(answer.is_ok(), "hang_close {hang_close}: {answer:?}");
        assert_eq!(events.stats().publish_failed, 0);
    }
}

/// Publishes fed to a transport whose flush never completed are lost when its stream ends:
/// counted in `publish_failed` (they were counted as published only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_fed_and_never_flushed_count_as_failed_when_the_transport_ends() {
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Scripted {
        slow_flush: true,
        ..Scripted::new(up)
    };
    let events: EventTarget = EventTarget::new(transport);
    for n in 0..3 {
        events
            .dispatch_event(numbered("lost", "1", n))
            .await
            .unwrap();
    }
    settle("the publishes fed", || events.stats().published == 3).await;
    // The stream ends: the target stops, and the three publishes went nowhere.
    drop(answer);
    settle("the target stopped", || events.is_closed()).await;
    assert_eq!(events.stats().publish_failed, 3);
}

/// The transport's stream ends while a close its user asked for waits for an unsubscribe's
/// answer: the close ends, and later calls say the target is closed (not that it stopped on a
/// transport failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_ending_during_a_close_leaves_the_target_closed_not_stopped() {
    use alkdev_pubsub::layers::Up;
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Recorder::new(Scripted::new(up));
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    events.add_event_listener("t:1", |_| {}).unwrap();
    settle("the subscribe", || {
        log.snapshot().contains(&Recorded::Subscribe("t:1".into()))
    })
    .await;
    answer.unbounded_send(Up::Subscribed("t:1".into())).unwrap();
    let closing = tokio::spawn({
        let events = events.clone();
        async move { events.close().await }
    });
    settle("the close's unsubscribe", || {
        log.snapshot()
            .contains(&Recorded::Unsubscribe("t:1".into()))
    })
    .await;
    drop(answer);
    tokio::time::timeout(WAIT, closing).await.unwrap().unwrap();
    let error = events
        .dispatch_event(numbered("t", "1", 0))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("is closed"), "{error}");
}

/// The driver task is dropped (its runtime shut down) while an event the transport yielded
/// waits for room in a full `Block` subscription: that event is not lost silently. The
/// subscription yields what it holds, hears of the drop (`Gap::Lagged`, counted), then ends.
#[test]
fn a_driver_dropped_with_an_event_waiting_for_a_full_block_subscription_reports_the_drop() {
    use alkdev_pubsub::layers::Up;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Scripted::new(up);
    let taken = Arc::clone(&transport.taken);
    let (events, mut subscription) = runtime.block_on(async {
        let events: EventTarget = EventTarget::new(transport);
        let options = SubscribeOptions::new()
            .capacity(1)
            .overflow(Overflow::Block);
        let subscription = subscribe_confirmed(&events, &answer, "t:1", options, || {
            events.stats().subscribes == 1
        })
        .await;
        for n in 0..2 {
            answer
                .unbounded_send(Up::Message {
                    channel: None,
                    message: numbered("t", "1", n),
                })
                .unwrap();
        }
        // The first fills the queue; the second, taken too, waits for room.
        settle("both events taken", || {
            events.stats().delivered == 1 && taken.load(Ordering::SeqCst) == 3
        })
        .await;
        (events, subscription)
    });
    drop(runtime);
    assert!(events.is_closed());
    // Read on a runtime of its own: the target's is gone.
    let reader = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    reader.block_on(event_then_drop_then_end(&mut subscription));
    assert_eq!(events.stats().lagged, 1);
    drop(answer);
}

/// A topic whose last listener leaves while a close is still sending the publishes queued
/// before it is unsubscribed all the same (the close's own unsubscribes cover only the topics
/// left when the publishes are out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_left_while_a_close_sends_its_publishes_is_unsubscribed() {
    use alkdev_pubsub::layers::Up;
    let gate = Arc::new(Gate::default());
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Recorder::new(Scripted {
        gate: Arc::clone(&gate),
        ..Scripted::new(up)
    });
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    let listener = events.add_event_listener("t:1", |_| {}).unwrap();
    settle("the subscribe", || {
        log.snapshot().contains(&Recorded::Subscribe("t:1".into()))
    })
    .await;
    answer.unbounded_send(Up::Subscribed("t:1".into())).unwrap();
    // The transport takes nothing for now: the publish waits, and so does the close.
    gate.shut();
    events.dispatch_event(numbered("t", "2", 0)).await.unwrap();
    let closing = tokio::spawn({
        let events = events.clone();
        async move { events.close().await }
    });
    settle("the close to begin", || events.is_closed()).await;
    assert!(events.remove_event_listener("t:1", listener));
    gate.open();
    answer
        .unbounded_send(Up::Unsubscribed("t:1".into()))
        .unwrap();
    tokio::time::timeout(WAIT, closing).await.unwrap().unwrap();
    assert!(
        log.snapshot()
            .contains(&Recorded::Unsubscribe("t:1".into())),
        "{:?}",
        log.snapshot()
    );
    assert_eq!(events.stats().unsubscribes, events.stats().subscribes);
}

/// A subscription whose topic the transport dropped for good (refused when subscribed again
/// after a reconnect) ends, and what is published on the topic once a new subscription has
/// subscribed it again is not reported to the ended one as drops (nor counted as lagged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_subscription_is_not_told_of_events_after_its_end() {
    use alkdev_pubsub::layers::Up;
    let (answer, up) = futures::channel::mpsc::unbounded();
    let transport = Recorder::new(Scripted::new(up));
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);
    let subscribes = || {
        log.snapshot()
            .iter()
            .filter(|r| **r == Recorded::Subscribe("t:1".into()))
            .count()
    };
    let options = SubscribeOptions::new();
    let mut first =
        subscribe_confirmed(&events, &answer, "t:1", options, || subscribes() == 1).await;
    // Dropped for good, unprompted; the first subscription is not read for now.
    answer
        .unbounded_send(Up::SubscribeFailed(
            "t:1".into(),
            alkdev_pubsub::Error::new(alkdev_pubsub::ErrorKind::Rejected, "NOPERM"),
        ))
        .unwrap();
    settle("the topic revoked", || events.listener_count("t:1") == 0).await;
    let mut second =
        subscribe_confirmed(&events, &answer, "t:1", options, || subscribes() == 2).await;
    for n in 0..3 {
        answer
            .unbounded_send(Up::Message {
                channel: Some("t:1".into()),
                message: numbered("t", "1", n),
            })
            .unwrap();
    }
    for n in 0..3 {
        assert_eq!(number_of(&testkit::next_event(&mut second).await), n);
    }
    assert_eq!(events.stats().lagged, 0);
    match tokio::time::timeout(WAIT, first.next()).await.unwrap() {
        None => {}
        other => panic!("the revoked subscription ends, got {other:?}"),
    }
}

/// A subscription dropped as its target closes is unsubscribed on the transport once,
/// whichever comes first: the drop, or the close's list of topics to unsubscribe (many rounds
/// on two threads, the two racing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_as_its_target_closes_is_unsubscribed_once() {
    for round in 0..200 {
        let transport = Recorder::new(LocalTransport::new());
        let log = transport.log();
        let events: EventTarget = EventTarget::new(transport);
        let subscription = events.subscribe("t:1").await.unwrap();
        let dropping = tokio::spawn(async move { drop(subscription) });
        tokio::time::timeout(WAIT, events.close()).await.unwrap();
        dropping.await.unwrap();
        let log = log.snapshot();
        let count = |what: Recorded| log.iter().filter(|r| **r == what).count();
        assert_eq!(
            (
                count(Recorded::Subscribe("t:1".into())),
                count(Recorded::Unsubscribe("t:1".into()))
            ),
            (1, 1),
            "round {round}: {log:?}"
        );
    }
}

/// An error from `poll_ready` that is not fatal reports an earlier failure once; a transport
/// that fails every call is taken for broken: the target stops with an error that says so,
/// where the driver polled it for ever (a core busy, `publish_failed` counting up, nothing
/// sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_failing_every_poll_ready_stops_the_target_rather_than_spin() {
    let probe = Probe::new(LocalTransport::new());
    let (failing, calls) = (
        Arc::clone(&probe.fail_ready),
        Arc::clone(&probe.failed_readies),
    );
    let events: EventTarget = EventTarget::new(probe);
    let mut subscription = events.subscribe("t:1").await.unwrap();
    events.dispatch_event(numbered("t", "1", 0)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 0);
    failing.store(true, Ordering::SeqCst);
    let _ = events.try_dispatch_event(numbered("t", "1", 1));
    settle("the target stopped", || events.is_closed()).await;
    testkit::next_end(&mut subscription).await;
    let error = events
        .dispatch_event(numbered("t", "1", 2))
        .await
        .unwrap_err();
    let reason = std::error::Error::source(&error).expect("the reason the target stopped");
    assert!(
        reason.to_string().contains("failed 64 calls in a row")
            && reason.to_string().contains("NOPERM"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 64, "no call after it stopped");
    // 63 failures reported (the 64th stopped the target), and the publish never sent.
    assert_eq!(events.stats().publish_failed, 64);
}

/// Events nobody listens to count as unrouted: an in-process dispatch to a topic without
/// listeners, and a message a transport brings up for one.
#[tokio::test]
async fn events_for_no_listener_count_as_unrouted() {
    let local: EventTarget = EventTarget::local();
    let _other = local.subscribe("other:1").await.unwrap();
    local
        .dispatch_event(numbered("nobody", "1", 0))
        .await
        .unwrap();
    assert_eq!(local.stats().unrouted, 1);
    assert_eq!(local.stats().delivered, 0);

    let (up, transport_up) = futures::channel::mpsc::unbounded();
    let events: EventTarget = EventTarget::new(Scripted::new(transport_up));
    up.unbounded_send(alkdev_pubsub::Up::Message {
        channel: Some(Topic::from("nobody:1")),
        message: numbered("nobody", "1", 0),
    })
    .unwrap();
    settle("the message routed", || events.stats().unrouted == 1).await;
    assert_eq!(events.stats().delivered, 0);
}

/// A publish from a thread-local's `Drop` as its thread ends, after the targets' own
/// thread-local caches are gone (they were made later, so they go first): delivered, in
/// process and through a driver, where it panicked (and a panic in a thread-local's
/// destructor aborts the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_from_a_thread_locals_drop_as_the_thread_ends_is_delivered() {
    struct Goodbye(Vec<EventTarget>);
    impl Drop for Goodbye {
        fn drop(&mut self) {
            for events in self.0.drain(..) {
                events
                    .try_dispatch_event(numbered("bye", "1", 2))
                    .expect("delivered");
            }
        }
    }
    thread_local! {
        static GOODBYE: std::cell::RefCell<Goodbye> =
            const { std::cell::RefCell::new(Goodbye(Vec::new())) };
    }
    let local: EventTarget = EventTarget::local();
    let driven: EventTarget = EventTarget::new(LocalTransport::new());
    let mut subscriptions = Vec::new();
    for events in [&local, &driven] {
        subscriptions.push(events.subscribe("bye:1").await.unwrap());
    }
    let publishers = vec![local.clone(), driven.clone()];
    std::thread::spawn(move || {
        // Made first, so destroyed last.
        GOODBYE.with(|goodbye| goodbye.borrow_mut().0 = publishers.clone());
        for events in &publishers {
            events.try_dispatch_event(numbered("bye", "1", 1)).unwrap();
        }
    })
    .join()
    .expect("the thread ended cleanly");
    for subscription in &mut subscriptions {
        for expected in [1, 2] {
            let event = tokio::time::timeout(WAIT, subscription.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(number_of(&event), expected);
        }
    }
}

/// A subscriber that never reads stays bounded through reconnects: each notice used to take a
/// slot beyond a full `DropOldest` queue's capacity and keep it, one more per reconnect (and
/// the event it held), for as long as the subscriber did not read. (A `Block` queue that is
/// not read holds the driver back instead.)
#[tokio::test(start_paused = true)]
async fn reconnect_notices_keep_a_full_queue_within_its_capacity() {
    for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
        let (silent, events, mut a) =
            silent_target_with(SubscribeOptions::new().capacity(4).overflow(overflow)).await;
        for n in 0..100 {
            silent
                .inbound
                .lock()
                .unwrap()
                .push_back(alkdev_pubsub::Up::Reconnected);
            silent.put("a:1", n);
        }
        silent.wake();
        settle("the driver routed everything", || {
            silent.inbound.lock().unwrap().is_empty() && events.stats().reconnects == 100
        })
        .await;
        // Up to its capacity of slots (events, or a notice), and the lag notice and a
        // reconnect notice it does not hold a slot for.
        assert!(a.len() <= 4 + 2, "{overflow:?}: {} held", a.len());
        // What it holds still reads: the newest under DropOldest, the oldest otherwise, and
        // the gaps are told.
        let mut read = Vec::new();
        let mut gaps = 0;
        while !a.is_empty() {
            match a.next().await.unwrap() {
                Ok(event) => read.push(number_of(&event)),
                Err(_) => gaps += 1,
            }
        }
        assert!(gaps >= 1, "{overflow:?}: the gaps are told");
        // Four slots: a notice and an event, twice; the newest ones, or the oldest.
        match overflow {
            Overflow::DropOldest => assert_eq!(read, [98, 99]),
            _ => assert_eq!(read, [0, 1]),
        }
    }
}

/// A waker that counts nothing: its handle count says who keeps it.
struct Unwoken;

impl std::task::Wake for Unwoken {
    fn wake(self: Arc<Self>) {}
}

/// In-process dispatches cancelled while they wait for room in a full `Block` queue leave no
/// waker there: each kept its task's memory until the reader read, one more per cancelled
/// dispatch (a `timeout` around each, and a reader stuck). A dispatch of the same task still
/// waiting there is woken to register again.
#[tokio::test]
async fn a_cancelled_dispatch_takes_its_waker_back_from_a_full_queue() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let events: EventTarget = EventTarget::local();
    let mut stuck = block_of_one(&events).await;
    events.dispatch_event(numbered("t", "1", 0)).await.unwrap();
    for n in 1..=100 {
        let probe = Arc::new(Unwoken);
        let waker = Waker::from(Arc::clone(&probe));
        let mut dispatch = Box::pin(events.dispatch_event(numbered("t", "1", n)));
        assert!(dispatch
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(dispatch);
        drop(waker);
        assert_eq!(
            Arc::strong_count(&probe),
            1,
            "the queue kept dispatch {n}'s waker"
        );
    }
    // Polled with one waker, then another (moved to another task), then cancelled: neither
    // is kept.
    let (a, b) = (Arc::new(Unwoken), Arc::new(Unwoken));
    let mut dispatch = Box::pin(events.dispatch_event(numbered("t", "1", 101)));
    for probe in [&a, &b] {
        let waker = Waker::from(Arc::clone(probe));
        assert!(dispatch
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
    }
    drop(dispatch);
    assert_eq!(
        (Arc::strong_count(&a), Arc::strong_count(&b)),
        (1, 1),
        "the queue kept a waker"
    );
    // Each cancelled one was counted as dropped for the reader, which goes on.
    assert_eq!(events.stats().lagged, 101);
    assert_eq!(number_of(&stuck.next().await.unwrap().unwrap()), 0);
    assert!(matches!(stuck.next().await, Some(Err(Gap::Lagged(101)))));

    // Two dispatches of one task wait with one waker; one cancelled, the other is woken, and
    // delivered once there is room.
    let (woken_tx, woken) = std::sync::mpsc::channel();
    struct Tells(std::sync::mpsc::Sender<()>);
    impl std::task::Wake for Tells {
        fn wake(self: Arc<Self>) {
            let _ = self.0.send(());
        }
    }
    let waker = Waker::from(Arc::new(Tells(woken_tx)));
    let mut cx = Context::from_waker(&waker);
    events
        .dispatch_event(numbered("t", "1", 201))
        .await
        .unwrap();
    let mut first = Box::pin(events.dispatch_event(numbered("t", "1", 202)));
    let mut second = Box::pin(events.dispatch_event(numbered("t", "1", 203)));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    drop(first);
    woken
        .try_recv()
        .expect("the task is woken for the other dispatch");
    assert!(second.as_mut().poll(&mut cx).is_pending(), "still full");
    assert_eq!(number_of(&stuck.next().await.unwrap().unwrap()), 201);
    woken.try_recv().expect("room wakes the one still waiting");
    assert!(second.as_mut().poll(&mut cx).is_ready());
}

/// A subscription dropped while it reads the transport for the driver (it was handed a burst)
/// gives the reading back at once: the other topics' delivery waited for the end of its
/// lease, a millisecond or two, each time (a request and reply that drops its reply's
/// subscription after one event, under a burst).
#[tokio::test(start_paused = true)]
async fn a_subscription_dropped_while_it_reads_for_the_driver_hands_the_reading_back() {
    let (silent, events, mut a) = silent_target().await;
    // A callback has no task to read the transport for it: the driver routes its events.
    let heard = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&heard);
    events
        .add_event_listener("b:1", move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let reader = tokio::spawn(async move {
        assert_eq!(number_of(&testkit::next_event(&mut a).await), 0);
        // Dropped with the rest of its burst unread.
        drop(a);
        tokio::task::id()
    });
    // Items of a topic nobody listens to first: the driver routes a few itself, then hands the
    // burst to the waiting subscription.
    burst_once_the_reader_waits(&silent, &[("x:1", 8), ("a:1", 100), ("b:1", 10)]).await;
    let reader = reader.await.unwrap();
    let readers = silent.readers.lock().unwrap().clone();
    assert!(
        readers.get(&Some(reader)) >= Some(&1),
        "the burst was handed over: {readers:?}"
    );
    let dropped = tokio::time::Instant::now();
    settle("the callback heard b:1's events", || {
        heard.load(Ordering::SeqCst) == 10
    })
    .await;
    assert!(
        dropped.elapsed() < Duration::from_micros(500),
        "waited {:?} for the lease to end",
        dropped.elapsed()
    );
}

/// A topic with thousands of subscriptions sharing its queue, each taking every event as it
/// comes, gets every event to each in order. (Its queue trims at its pushes past a few readers:
/// see `queue::tests` for what an event costs there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_two_thousand_subscriptions_in_step_gets_every_event_to_each() {
    const READERS: usize = 2_000;
    const EVENTS: u64 = 100;
    let events: EventTarget = EventTarget::local();
    let read = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut subscription = events.subscribe("wide:1").await.unwrap();
        let read = Arc::clone(&read);
        readers.push(tokio::spawn(async move {
            for n in 0..EVENTS {
                assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
                read.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for n in 0..EVENTS {
        events
            .dispatch_event(numbered("wide", "1", n))
            .await
            .unwrap();
        // In step: every reader takes each event before the next (the costly case: all of
        // them at the oldest slot, each releasing one).
        settle("every reader to take the event", || {
            read.load(Ordering::SeqCst) >= READERS as u64 * (n + 1)
        })
        .await;
    }
    for reader in readers {
        tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    }
    assert_eq!(events.stats().delivered, READERS as u64 * EVENTS);
}

/// A transport the test scripts: what it is sent is answered at once (subscribes confirmed,
/// publishes looped back), and the test puts in items of its own ([`Echoing::up`]).
struct Echoing<P> {
    up: futures::channel::mpsc::UnboundedSender<alkdev_pubsub::Up<Envelope<P>>>,
    items: futures::channel::mpsc::UnboundedReceiver<alkdev_pubsub::Up<Envelope<P>>>,
}

impl<P> Echoing<P> {
    fn new() -> Self {
        let (up, items) = futures::channel::mpsc::unbounded();
        Echoing { up, items }
    }
}

impl<P> futures::Sink<alkdev_pubsub::Command<Envelope<P>>> for Echoing<P> {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        self: std::pin::Pin<&mut Self>,
        command: alkdev_pubsub::Command<Envelope<P>>,
    ) -> alkdev_pubsub::Result<()> {
        use alkdev_pubsub::{Command, Up};
        let _ = self.up.unbounded_send(match command {
            Command::Publish { message, .. } => Up::Message {
                channel: None,
                message,
            },
            Command::Subscribe(topic) => Up::Subscribed(topic),
            Command::Unsubscribe(topic) => Up::Unsubscribed(topic),
        });
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl<P> futures::Stream for Echoing<P> {
    type Item = alkdev_pubsub::Result<alkdev_pubsub::Up<Envelope<P>>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.items.poll_next_unpin(cx).map(|item| item.map(Ok))
    }
}

/// A payload that holds a subscription of its own target, dropped with it.
struct Holder {
    _held: alkdev_pubsub::Subscription<Holder>,
}

/// A reconnect notice that makes a full queue drop an event runs that event's `Drop` (the
/// application's code) without holding the listener map's lock: a payload that held a
/// subscription of the target, and dropped it (which takes the map's write lock), deadlocked
/// the routing task, and with it the whole target. Run on a runtime of its own, on a thread
/// of its own: a deadlocked worker would hang the runtime's drop, and this test with it.
#[test]
fn a_payload_dropped_by_a_reconnect_notice_may_use_its_target() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let transport = Echoing::new();
            let up = transport.up.clone();
            let events: EventTarget<Holder> = EventTarget::new(transport);
            let held = events.subscribe("held:1").await.unwrap();
            let options = SubscribeOptions::new()
                .capacity(1)
                .overflow(Overflow::DropOldest);
            let mut full = events.subscribe_with("t:1", options).await.unwrap();
            up.unbounded_send(alkdev_pubsub::Up::Message {
                channel: None,
                message: Envelope::new("t", "1", Holder { _held: held }),
            })
            .unwrap();
            settle("the event queued", || full.len() == 1).await;
            // The queue is full: the notice takes the event's place, and drops its last
            // handle, which drops the subscription it holds.
            up.unbounded_send(alkdev_pubsub::Up::Reconnected).unwrap();
            settle("the notice routed", || events.stats().reconnects == 1).await;
            for expected in [Gap::Lagged(1), Gap::Reconnected] {
                let item = tokio::time::timeout(WAIT, full.next()).await.unwrap();
                assert_eq!(item.unwrap().err(), Some(expected));
            }
            settle("the held subscription to leave", || {
                events.listener_count("held:1") == 0
            })
            .await;
            let _after = tokio::time::timeout(WAIT, events.subscribe("after:1"))
                .await
                .expect("the target still answers")
                .unwrap();
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(WAIT)
        .expect("the target answered (its routing task did not deadlock)");
}

/// Outside a Tokio runtime, a target over a transport cannot spawn its driver: the panic says
/// so (it was tokio's "no reactor running", after a warning that the target had stopped).
#[test]
#[should_panic(expected = "an EventTarget over a transport must be built on a Tokio runtime")]
fn a_target_over_a_transport_built_outside_a_runtime_says_why_it_cannot() {
    let _events: EventTarget = EventTarget::new(LocalTransport::new());
}
