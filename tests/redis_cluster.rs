//! Sharded pub/sub against a real 3-master Redis Cluster started on free loopback ports.

use std::collections::HashSet;
use std::time::Duration;

use alkdev_pubsub::layers::{
    Backoff, CodecLayer, ParseErrorLayer, PrefixLayer, ReconnectLayer, RetryLayer,
};
use alkdev_pubsub::redis::cluster::RedisClusterTransport;
use alkdev_pubsub::testkit::{self, number_of, numbered, RedisCluster};
use alkdev_pubsub::{Command, EventTarget, Gap, SubscribeOptions, Topic, Up};
use futures::{SinkExt, StreamExt};
use tower::ServiceBuilder;

mod common;

const WAIT: Duration = Duration::from_secs(30);
const PREFIX: &str = "alk:events:";

fn stack(cluster: &RedisCluster) -> EventTarget {
    stack_waiting(cluster, Duration::from_secs(2))
}

/// The stack, waiting up to `timeout` for each answer.
fn stack_waiting(cluster: &RedisCluster, timeout: Duration) -> EventTarget {
    let seeds = cluster.urls();
    EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new(PREFIX))
            .layer(RetryLayer::new(20, Duration::from_millis(50)))
            .layer(ReconnectLayer::new(
                Backoff::new().initial(Duration::from_millis(50)),
            ))
            .service(move || RedisClusterTransport::connect_with(seeds.clone(), timeout)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_topics_over_three_masters_each_subscriber_gets_exactly_its_own() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let topics: Vec<Topic> = (0..300)
        .map(|t| Topic::of("shard", &t.to_string()))
        .collect();
    let owners: HashSet<usize> = topics
        .iter()
        .map(|t| cluster.owner_of_channel(&format!("{PREFIX}{t}")))
        .collect();
    assert_eq!(owners.len(), 3, "the topics spread over all three masters");

    let a = stack(&cluster);
    let b = stack(&cluster);
    let publisher = stack(&cluster);
    let mut subscriptions = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        let target = if i % 2 == 0 { &a } else { &b };
        subscriptions.push(
            target
                .subscribe_with(topic.clone(), SubscribeOptions::new().capacity(64))
                .await
                .unwrap(),
        );
    }
    // The publisher reaches every master before the burst (one confirmed publish each, on
    // topics nobody listens to): a master still settling would make the retry layer send a
    // whole pipeline again, and a topic would get some events twice.
    let mut warmed = HashSet::new();
    for i in 0.. {
        if warmed.len() == 3 {
            break;
        }
        let owner = cluster.owner_of_channel(&format!("{PREFIX}warm:{i}"));
        if warmed.insert(owner) {
            publisher
                .dispatch_confirmed(numbered("warm", &i.to_string(), 0))
                .await
                .unwrap();
        }
    }
    for round in 0..5 {
        for t in 0..300 {
            publisher
                .dispatch_event(numbered("shard", &t.to_string(), round))
                .await
                .unwrap();
        }
    }
    for (t, subscription) in subscriptions.iter_mut().enumerate() {
        for round in 0..5 {
            let event = testkit::next_event(subscription).await;
            assert_eq!(
                (event.id.as_str(), number_of(&event)),
                (t.to_string().as_str(), round)
            );
        }
    }
    for target in [&a, &b] {
        let stats = target.stats();
        assert_eq!(stats.delivered, 150 * 5, "{stats:?}");
        assert_eq!(stats.unrouted, 0, "a subscriber got another's topic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_the_last_listener_sunsubscribes_on_the_owning_node() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    let channel = format!("{PREFIX}leave:1");
    let owner = &cluster.nodes[cluster.owner_of_channel(&channel)];
    let subscription = events.subscribe("leave:1").await.unwrap();
    assert_eq!(
        owner.cli(&["PUBSUB", "SHARDNUMSUB", &channel]),
        format!("{channel}\n1")
    );
    drop(subscription);
    let deadline = tokio::time::Instant::now() + WAIT;
    while owner.cli(&["PUBSUB", "SHARDNUMSUB", &channel]) != format!("{channel}\n0") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SUNSUBSCRIBE did not reach the owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_gets_its_subscriptions_back() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    // One topic per master.
    let mut per_master: Vec<Option<Topic>> = vec![None; 3];
    for t in 0.. {
        let topic = Topic::of("fail", &t.to_string());
        let owner = cluster.owner_of_channel(&format!("{PREFIX}{topic}"));
        per_master[owner].get_or_insert(topic);
        if per_master.iter().all(Option::is_some) {
            break;
        }
    }
    let topics: Vec<Topic> = per_master.into_iter().flatten().collect();
    let mut subscriptions = Vec::new();
    for topic in &topics {
        subscriptions.push(events.subscribe(topic.clone()).await.unwrap());
    }
    let victim = cluster.owner_of_channel(&format!("{PREFIX}{}", topics[0]));
    cluster = tokio::task::spawn_blocking(move || {
        cluster.nodes[victim].kill();
        std::thread::sleep(Duration::from_millis(500));
        cluster.nodes[victim].restart();
        cluster.wait_ready();
        cluster
    })
    .await
    .unwrap();

    // The victim's subscriber hears Reconnected, then events again.
    let (type_, id) = topics[0].split_once(':').unwrap();
    assert_eq!(
        testkit::next_gap(&mut subscriptions[0]).await,
        Gap::Reconnected
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        events.dispatch_event(numbered(type_, id, 7)).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(300), subscriptions[0].next()).await {
            Ok(Some(Ok(event))) => {
                assert_eq!(number_of(&event), 7);
                break;
            }
            Ok(Some(Err(Gap::Reconnected))) | Err(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after the restart"
        );
    }
    // The others still work.
    for (topic, subscription) in topics.iter().zip(&mut subscriptions).skip(1) {
        let (type_, id) = topic.split_once(':').unwrap();
        events.dispatch_event(numbered(type_, id, 8)).await.unwrap();
        loop {
            match tokio::time::timeout(WAIT, subscription.next())
                .await
                .unwrap()
            {
                Some(Ok(event)) => {
                    assert_eq!(number_of(&event), 8);
                    break;
                }
                Some(Err(Gap::Reconnected)) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    drop(cluster);
}

/// Many channels on the master that restarts: every one is subscribed again, each
/// subscription hears of the reconnect, then gets events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_master_gets_its_thousand_channels_back() {
    const TOPICS: usize = 1_000;
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    // Node `i` owns the `i`-th share of the slots: these topics all live on node 0.
    let on_victim = |topic: &Topic| {
        let slot = alkdev_pubsub::redis::cluster::hash_slot(format!("{PREFIX}{topic}").as_bytes());
        (slot as usize) < 16384 / 3
    };
    let topics: Vec<Topic> = (0..)
        .map(|t| Topic::of("many", &t.to_string()))
        .filter(on_victim)
        .take(TOPICS)
        .collect();
    assert_eq!(
        cluster.owner_of_channel(&format!("{PREFIX}{}", topics[0])),
        0
    );
    let mut subscriptions = Vec::new();
    for topic in &topics {
        subscriptions.push(events.subscribe(topic.clone()).await.unwrap());
    }
    let restarted = tokio::time::Instant::now();
    cluster = tokio::task::spawn_blocking(move || {
        cluster.nodes[0].kill();
        std::thread::sleep(Duration::from_millis(500));
        cluster.nodes[0].restart();
        cluster.wait_ready();
        cluster
    })
    .await
    .unwrap();
    for subscription in &mut subscriptions {
        assert_eq!(testkit::next_gap(subscription).await, Gap::Reconnected);
    }
    println!(
        "{TOPICS} channels subscribed again {:?} after the kill",
        restarted.elapsed()
    );
    for (n, topic) in topics.iter().enumerate() {
        let (type_, id) = topic.split_once(':').unwrap();
        events
            .dispatch_event(numbered(type_, id, n as u64))
            .await
            .unwrap();
    }
    for (n, subscription) in subscriptions.iter_mut().enumerate() {
        let event = tokio::time::timeout(WAIT, subscription.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(number_of(&event), n as u64);
    }
    drop(cluster);
}

/// An access rule that takes a channel away from the subscriber's user: the node drops the
/// connection, the transport subscribes its channels again, and the node refuses that one
/// (`NOPERM`). Its subscription ends; the other comes back with a reconnect notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_an_acl_takes_away_ends_its_subscription_and_the_others_come_back() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(1))
        .await
        .unwrap();
    let events = stack(&cluster);
    let mut gone = events.subscribe("acl:gone").await.unwrap();
    let mut kept = events.subscribe("acl:kept").await.unwrap();
    cluster.nodes[0].cli(&[
        "ACL",
        "SETUSER",
        "default",
        "resetchannels",
        &format!("&{PREFIX}acl:kept"),
    ]);
    testkit::next_end(&mut gone).await;
    assert_eq!(testkit::next_gap(&mut kept).await, Gap::Reconnected);
    events
        .dispatch_confirmed(numbered("acl", "kept", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut kept).await), 1);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_slots_match_the_server() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    for key in [
        "",
        "a",
        "alk:events:chat:1",
        "{user1000}.following",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "{}x",
        "日本",
    ] {
        assert_eq!(
            alkdev_pubsub::redis::cluster::hash_slot(key.as_bytes()),
            cluster.keyslot(key),
            "slot of {key:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_works_over_the_cluster() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let seeds = cluster.urls().join(",");
    let listen = Command::new(common::tap_binary())
        .args([
            "listen",
            "--redis-cluster",
            &seeds,
            "--prefix",
            PREFIX,
            "--count",
            "2",
            "a:1",
            "b:2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both channels are subscribed on their owners.
    let deadline = tokio::time::Instant::now() + WAIT;
    for channel in ["alk:events:a:1", "alk:events:b:2"] {
        let owner = &cluster.nodes[cluster.owner_of_channel(channel)];
        while owner.cli(&["PUBSUB", "SHARDNUMSUB", channel]) != format!("{channel}\n1") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tap did not subscribe {channel}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut publish = Command::new(common::tap_binary())
        .args(["publish", "--redis-cluster", &seeds, "--prefix", PREFIX])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    publish
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"type\":\"a\",\"id\":\"1\",\"payload\":1}\n{\"type\":\"b\",\"id\":\"2\",\"payload\":2}\n")
        .unwrap();
    let published = common::output_within(publish, "tap publish", WAIT).await;
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let listened = common::output_within(listen, "tap listen", WAIT).await;
    assert!(
        listened.status.success(),
        "{}",
        String::from_utf8_lossy(&listened.stderr)
    );
    let lines: HashSet<String> = String::from_utf8(listened.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: HashSet<String> = [
        r#"{"type":"a","id":"1","payload":1}"#.to_owned(),
        r#"{"type":"b","id":"2","payload":2}"#.to_owned(),
    ]
    .into_iter()
    .collect();
    assert_eq!(lines, expected);
}

/// A slot moved to another master (a reshard): the old owner drops its subscribers of the
/// slot's channels with a `sunsubscribe` push on a connection that stays up. The transport
/// subscribes such a channel again, on its new owner, and tells its listeners that events may
/// have been missed; before, the subscription went deaf without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_keeps_its_subscribers() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    let channel = format!("{PREFIX}moving:1");
    let slot = cluster.keyslot(&channel).to_string();
    let from = cluster.owner_of_channel(&channel);
    let to = (from + 1) % 3;
    let mut subscription = events.subscribe("moving:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("moving", "1", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);

    // The slot holds no key: it can be given to `to` directly, new owner first.
    let to_id = cluster.nodes[to].cli(&["CLUSTER", "MYID"]);
    for node in [to, from, (to + 1) % 3] {
        let answer = cluster.nodes[node].cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        assert_eq!(answer, "OK", "CLUSTER SETSLOT on node {node}");
    }
    assert_eq!(cluster.owner_of_channel(&channel), to);

    assert_eq!(testkit::next_gap(&mut subscription).await, Gap::Reconnected);
    let owner = &cluster.nodes[to];
    let deadline = tokio::time::Instant::now() + WAIT;
    while owner.cli(&["PUBSUB", "SHARDNUMSUB", &channel]) != format!("{channel}\n1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not subscribed on the new owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    events
        .dispatch_confirmed(numbered("moving", "1", 2))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 2);
}

/// A reader that falls behind is not cut off by Redis here (redis-rs reads the sockets in a
/// task of its own): the transport keeps 32 MiB of messages for it, drops what comes past
/// that, and tells of the gap where it is. Before, it kept everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_by_more_than_32_mib_hears_of_the_gap() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    let publisher = stack(&cluster);
    // Room for one event: the driver waits for this subscription, and stops reading.
    let mut subscription = events
        .subscribe_with(
            "behind:1",
            SubscribeOptions::new()
                .capacity(1)
                .overflow(alkdev_pubsub::Overflow::Block),
        )
        .await
        .unwrap();
    let pad = "x".repeat(1 << 20);
    for n in 0..48 {
        let mut envelope = numbered("behind", "1", n);
        envelope.payload["pad"] = serde_json::Value::from(pad.as_str());
        publisher.dispatch_confirmed(envelope).await.unwrap();
    }
    // 48 MiB were published; what the reader gets is the first ones, then a gap (and maybe
    // the last few of the flood, which came once the reader had made room).
    let mut received = Vec::new();
    let gap = loop {
        match tokio::time::timeout(WAIT, subscription.next())
            .await
            .unwrap()
        {
            Some(Ok(event)) => received.push(number_of(&event)),
            Some(Err(gap)) => break gap,
            None => panic!("the subscription ended"),
        }
    };
    assert_eq!(gap, Gap::Reconnected);
    assert!(
        (20..40).contains(&received.len()),
        "before the gap: {received:?}"
    );
    assert_eq!(received, (0..received.len() as u64).collect::<Vec<_>>());
    // The stream goes on after the gap, in order, without what was dropped.
    publisher
        .dispatch_confirmed(numbered("behind", "1", 100))
        .await
        .unwrap();
    let mut after = Vec::new();
    while after.last() != Some(&100) {
        after.push(number_of(&testkit::next_event(&mut subscription).await));
    }
    assert!(
        after[0] > received.len() as u64 && after.windows(2).all(|w| w[0] < w[1]),
        "after the gap: {after:?}"
    );
    assert!(received.len() + after.len() - 1 < 48, "nothing was dropped");
}

/// Leaving a topic and joining it again at once: the node's answer to the SUNSUBSCRIBE is
/// this transport's own, not a slot that moved, so no gap is reported to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_and_joining_again_at_once_is_not_a_gap() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let events = stack(&cluster);
    let mut bystander = events.subscribe("bystander:1").await.unwrap();
    for round in 0..20 {
        drop(events.subscribe("again:1").await.unwrap());
        let mut subscription = events.subscribe("again:1").await.unwrap();
        events
            .dispatch_confirmed(numbered("again", "1", round))
            .await
            .unwrap();
        // The next item is the event, not a gap.
        assert_eq!(
            number_of(&testkit::next_event(&mut subscription).await),
            round
        );
    }
    events
        .dispatch_confirmed(numbered("bystander", "1", 7))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut bystander).await), 7);
    assert_eq!(events.stats().reconnects, 0, "{:?}", events.stats());
}

/// Over the message size limit: a publish is refused alone, and a message received (published
/// by another client) is skipped and counted, and the next one arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_or_skipped_and_the_next_arrives() {
    const LIMIT: usize = 1024;
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let seeds = cluster.urls();
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new(PREFIX))
            .layer(ReconnectLayer::new(
                Backoff::new().initial(Duration::from_millis(50)),
            ))
            .service(move || {
                let seeds = seeds.clone();
                async move {
                    RedisClusterTransport::connect_with(seeds, Duration::from_secs(2))
                        .await
                        .map(|transport| transport.max_message_size(LIMIT))
                }
            }),
    );
    let mut subscription = events.subscribe("big:1").await.unwrap();

    // Ours: refused, alone.
    let big = alkdev_pubsub::Envelope::new("big", "1", serde_json::json!("x".repeat(LIMIT)));
    let error = events.dispatch_confirmed(big).await.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");

    // Another client's: skipped and counted; the next one arrives.
    let channel = format!("{PREFIX}big:1");
    let owner = &cluster.nodes[cluster.owner_of_channel(&channel)];
    let oversized = format!(
        r#"{{"type":"big","id":"1","payload":"{}"}}"#,
        "y".repeat(LIMIT)
    );
    assert_eq!(owner.cli(&["SPUBLISH", &channel, &oversized]), "1");
    events
        .dispatch_confirmed(numbered("big", "1", 2))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 2);
    let stats = events.stats();
    assert_eq!((stats.skipped, stats.publish_failed), (1, 1), "{stats:?}");
}

/// The conformance suite, over a 3-master cluster: one stack publishes, another listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_passes_the_conformance_suite() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    testkit::run_all(|| {
        let pair = testkit::Pair::new(stack(&cluster), stack(&cluster));
        async move { pair }
    })
    .await;
}

/// A master that goes silent without closing its connections (paused here) would leave its
/// channels deaf with no error: the transport's ping finds it, and the stream fails with a
/// connection error (for the reconnect layer to build a new transport).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_master_is_found_by_the_ping() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let mut transport = RedisClusterTransport::connect_with(cluster.urls(), Duration::from_secs(1))
        .await
        .unwrap()
        .ping_interval(Duration::from_millis(200));
    common::subscribe_confirmed(&mut transport, "silent:1").await;
    // Quiet and healthy: no error for a while (pings answered).
    let quiet = tokio::time::timeout(Duration::from_millis(800), transport.next()).await;
    assert!(quiet.is_err(), "{quiet:?}");
    let owner = cluster.owner_of_channel("silent:1");
    cluster.nodes[owner].pause();
    // Found within a few ping intervals and timeouts (10 s leaves room for a busy machine).
    let end = tokio::time::timeout(Duration::from_secs(10), transport.next())
        .await
        .expect("the silence is found in time");
    cluster.nodes[owner].resume();
    let error = end.expect("an item").expect_err("a connection error");
    assert!(error.is_unrecoverable(), "{error}");
    assert!(error.to_string().contains("pinging"), "{error}");
    drop(cluster);
}

/// A `rediss://` seed is refused with an error that says TLS is not supported (redis-rs,
/// built without TLS, would say a feature is missing).
#[tokio::test]
async fn a_tls_seed_is_refused_with_a_clear_error() {
    let error = RedisClusterTransport::connect(["redis://127.0.0.1:1", "REDISS://127.0.0.1:2"])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Config, "{error}");
    assert!(
        error
            .to_string()
            .contains("TLS (rediss://) is not supported"),
        "{error}"
    );
}

/// JavaScript peers on a cluster (the JavaScript design's Redis event target over an ioredis
/// `Cluster`) use classic pub/sub, which sharded pub/sub does not reach. `RedisTransport`
/// speaks it to any node (a classic `PUBLISH` is broadcast to every node), under a reconnect
/// layer whose factory moves on to the next node when one fails, as the cluster module's docs
/// show: a peer's classic publish on another node arrives, ours reaches a classic subscriber
/// on a third, and when our node dies the next one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_pub_sub_over_a_cluster_reaches_every_node_and_moves_on_when_its_node_dies() {
    use alkdev_pubsub::redis::RedisConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let seeds = cluster.urls();
    let attempt = Arc::new(AtomicUsize::new(0));
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(
                Backoff::new().initial(Duration::from_millis(50)),
            ))
            .service(move || {
                // The first attempt goes to the first node, each next one to the next node.
                let seed = &seeds[attempt.fetch_add(1, Ordering::Relaxed) % seeds.len()];
                RedisConfig::new()
                    .connect_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .ping_interval(Duration::from_millis(200))
                    .ping_timeout(Duration::from_secs(2))
                    .connect(seed.clone())
            }),
    );
    let mut subscription = events.subscribe("chat:1").await.unwrap();
    // A JavaScript peer's publish, as ioredis sends it, on another node.
    let peer_publishes = |cluster: &RedisCluster, node: usize, n: u64| {
        let frame = serde_json::to_string(&numbered("chat", "1", n)).unwrap();
        cluster.nodes[node].cli(&["PUBLISH", "chat:1", &frame]);
    };
    peer_publishes(&cluster, 2, 1);
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(number_of(&event), 1);
    // A classic subscriber on the second node hears our publishes.
    let mut peer = redis::Client::open(cluster.nodes[1].url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    peer.subscribe("chat:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("chat", "1", 2))
        .await
        .unwrap();
    let message = tokio::time::timeout(WAIT, peer.on_message().next())
        .await
        .expect("our publish in time")
        .unwrap();
    let envelope: alkdev_pubsub::Envelope =
        serde_json::from_slice(message.get_payload_bytes()).unwrap();
    assert_eq!(number_of(&envelope), 2);
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(number_of(&event), 2, "ours too");
    // Our node dies: the next one takes over, the subscription with it.
    cluster.nodes[0].kill();
    assert_eq!(testkit::next_gap(&mut subscription).await, Gap::Reconnected);
    peer_publishes(&cluster, 2, 3);
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(number_of(&event), 3);
}

/// Publishes waiting for a batch in flight are bounded by their bytes too, as on one node: with
/// the owning master paused, 1 MiB publishes are taken until about two batches of 64 MiB wait
/// (the one in flight and the next), where 8,192 of them were (8 GiB at a size 1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_waiting_on_a_paused_master_are_bounded_by_their_bytes() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let mut transport = RedisClusterTransport::connect_with(cluster.urls(), Duration::from_secs(5))
        .await
        .unwrap();
    // Reaches the owner before it is paused.
    transport
        .send(Command::Publish {
            topic: Topic::from("bulk:1"),
            message: bytes::Bytes::from_static(b"first"),
        })
        .await
        .unwrap();
    let owner = cluster.owner_of_channel("bulk:1");
    cluster.nodes[owner].pause();
    // One buffer shared by every publish: the count is what is checked, not this test's memory.
    let megabyte = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let taken = common::feed_while_ready(&mut transport, 1_000, || Command::Publish {
        topic: Topic::from("bulk:1"),
        message: megabyte.clone(),
    })
    .await;
    cluster.nodes[owner].resume();
    assert!(
        (64..=130).contains(&taken),
        "{taken} publishes of 1 MiB taken before the transport pushed back"
    );
    drop(cluster);
}

/// The answer to an unsubscribe comes after the channel's messages that arrived before it:
/// an event target delivers those (a close drains until its unsubscribes are answered), and
/// drops what comes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_is_answered_after_the_messages_that_came_before_it() {
    const MESSAGES: usize = 200;
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    let mut transport = RedisClusterTransport::connect_with(cluster.urls(), Duration::from_secs(2))
        .await
        .unwrap();
    let topic = Topic::from("order:1");
    common::subscribe_confirmed(&mut transport, &topic).await;
    for n in 0..MESSAGES {
        transport
            .feed(Command::Publish {
                topic: topic.clone(),
                message: bytes::Bytes::from(n.to_string()),
            })
            .await
            .unwrap();
    }
    transport.flush().await.unwrap();
    transport
        .send(Command::Unsubscribe(topic.clone()))
        .await
        .unwrap();
    // The node has answered by now; nothing was read yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match transport.next().await {
                Some(Ok(Up::Message { message, .. })) => {
                    received.push(String::from_utf8(message.to_vec()).unwrap())
                }
                Some(Ok(Up::Unsubscribed(t))) if t == topic => break,
                other => panic!("expected messages, then the answer: {other:?}"),
            }
        }
    })
    .await
    .expect("the unsubscribe is answered");
    let expected: Vec<String> = (0..MESSAGES).map(|n| n.to_string()).collect();
    assert_eq!(received, expected, "every message, before the answer");
}

/// A password the cluster refuses is refused for good (kind `Rejected`, as on one node), the
/// error not printing it: a reconnect layer gives up at once rather than retry for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_permanent_and_not_printed() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(1))
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    assert_eq!(node.cli(&["CONFIG", "SET", "requirepass", "s3cret"]), "OK");
    let seed = |password: &str| format!("redis://:{password}@127.0.0.1:{}/", node.port());

    let error = RedisClusterTransport::connect([seed("wrong")])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");
    assert!(error.is_permanent(), "{error}");
    assert!(!error.to_string().contains("wrong"), "{error}");

    // So the reconnect layer gives up at once, with that error.
    let wrong = vec![seed("wrong")];
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(Backoff::default()))
            .service(move || RedisClusterTransport::connect(wrong.clone())),
    );
    let error = tokio::time::timeout(WAIT, events.subscribe("auth:1"))
        .await
        .expect("not retried for ever")
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
    assert!(!error.to_string().contains("wrong"), "{error}");

    // The right password connects.
    let mut transport = RedisClusterTransport::connect([seed("s3cret")])
        .await
        .unwrap();
    transport
        .send(Command::Subscribe(Topic::from("auth:2")))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, transport.next()).await.unwrap(),
        Some(Ok(Up::Subscribed(_)))
    ));
}
