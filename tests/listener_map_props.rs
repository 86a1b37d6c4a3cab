//! The listener map under random sequences of adds and removes: the transport sees a
//! subscribe exactly when a topic's listener count goes 0 -> 1 and an unsubscribe exactly when
//! it goes 1 -> 0, in that order, and nothing else.

use std::time::Duration;

use alkdev_pubsub::testkit::{Recorded, Recorder};
use alkdev_pubsub::{EventTarget, ListenerId, LocalTransport, Subscription, Topic};
use proptest::prelude::*;

const TOPICS: [&str; 3] = ["t:0", "t:1", "t:2"];
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
enum Op {
    /// Adds a listener to `TOPICS[topic]`: a `Subscription` stream, or a callback.
    Add { topic: usize, stream: bool },
    /// Removes the live listener at `pick % live.len()` (nothing if none is live).
    Remove { pick: usize },
    /// Removes again a callback that was already removed: refused, nothing changes.
    RemoveStale { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TOPICS.len(), any::<bool>()).prop_map(|(topic, stream)| Op::Add { topic, stream }),
        4 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => any::<usize>().prop_map(|pick| Op::RemoveStale { pick }),
    ]
}

enum Live {
    Stream(usize, Subscription),
    Callback(usize, ListenerId),
}

impl Live {
    fn topic(&self) -> usize {
        match self {
            Live::Stream(topic, _) | Live::Callback(topic, _) => *topic,
        }
    }
}

fn topic(index: usize) -> Topic {
    Topic::from(TOPICS[index])
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let transport = Recorder::new(LocalTransport::new());
    let log = transport.log();
    let events: EventTarget = EventTarget::new(transport);

    let mut live: Vec<Live> = Vec::new();
    let mut removed: Vec<(usize, ListenerId)> = Vec::new();
    let mut counts = [0usize; TOPICS.len()];
    let mut expected: Vec<Recorded> = Vec::new();

    for op in ops {
        match op {
            Op::Add { topic: t, stream } => {
                if counts[t] == 0 {
                    expected.push(Recorded::Subscribe(topic(t)));
                }
                counts[t] += 1;
                if stream {
                    let subscription = events.subscribe(topic(t)).await.expect("subscribing");
                    live.push(Live::Stream(t, subscription));
                } else {
                    let id = events
                        .add_event_listener(topic(t), |_| {})
                        .expect("adding a listener");
                    live.push(Live::Callback(t, id));
                }
            }
            Op::Remove { pick } => {
                if live.is_empty() {
                    continue;
                }
                let listener = live.swap_remove(pick % live.len());
                let t = listener.topic();
                counts[t] -= 1;
                if counts[t] == 0 {
                    expected.push(Recorded::Unsubscribe(topic(t)));
                }
                match listener {
                    Live::Stream(_, subscription) => drop(subscription),
                    Live::Callback(_, id) => {
                        prop_assert!(
                            events.remove_event_listener(TOPICS[t], id),
                            "a live callback was not removed"
                        );
                        removed.push((t, id));
                    }
                }
            }
            Op::RemoveStale { pick } => {
                if removed.is_empty() {
                    continue;
                }
                let (t, id) = removed[pick % removed.len()];
                prop_assert!(
                    !events.remove_event_listener(TOPICS[t], id),
                    "a removed callback was removed again"
                );
            }
        }
        for (t, count) in counts.iter().enumerate() {
            prop_assert_eq!(
                events.listener_count(TOPICS[t]),
                *count,
                "listeners of {}",
                TOPICS[t]
            );
        }
        prop_assert_eq!(
            events.topic_count(),
            counts.iter().filter(|&&c| c > 0).count(),
            "topics in the map"
        );
    }

    // Commands reach the transport through the driver: wait for as many as the model expects,
    // then compare the whole sequence.
    let deadline = tokio::time::Instant::now() + WAIT;
    while log.subscriptions().len() < expected.len() {
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "expected {:?}, the transport saw {:?}",
            expected,
            log.subscriptions()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    prop_assert_eq!(log.subscriptions(), expected.clone());

    // Closing unsubscribes every topic that still has listeners, once each.
    events.close().await;
    let mut still_live: Vec<Recorded> = (0..TOPICS.len())
        .filter(|&t| counts[t] > 0)
        .map(|t| Recorded::Unsubscribe(topic(t)))
        .collect();
    let mut after_close = log.subscriptions().split_off(expected.len());
    let key = |r: &Recorded| format!("{r:?}");
    still_live.sort_by_key(key);
    after_close.sort_by_key(key);
    prop_assert_eq!(after_close, still_live, "the close unsubscribed otherwise");
    drop(live);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn subscribe_exactly_on_first_listener_and_unsubscribe_exactly_on_last(
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(run(ops))?;
    }
}
