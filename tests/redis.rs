//! The Redis transport against real redis-server processes started on free ports, under
//! faults: SIGKILL and restart, CLIENT KILL, a paused server.

use std::collections::HashSet;
use std::time::Duration;

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, PrefixLayer, ReconnectLayer};
use alkdev_pubsub::redis::{RedisConfig, RedisTransport};
use alkdev_pubsub::testkit::{self, number_of, numbered, Pair, RedisServer};
use alkdev_pubsub::{Envelope, EventTarget, Gap, SubscribeOptions, Topic};
use futures::StreamExt;
use serde_json::json;
use tower::ServiceBuilder;

mod common;

use common::tap_binary;

const WAIT: Duration = Duration::from_secs(20);

/// Tight enough to notice a dead server within seconds, loose enough for a loaded 2-core CI
/// machine (a slow answer there is not a dead server).
fn config() -> RedisConfig {
    RedisConfig::new()
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_millis(200))
        .ping_timeout(Duration::from_secs(2))
}

fn backoff() -> Backoff {
    Backoff::new()
        .initial(Duration::from_millis(20))
        .max(Duration::from_millis(200))
}

/// The full stack over Redis, as an application would build it.
fn stack(url: &str, prefix: &str, buffer: usize) -> EventTarget {
    let url = url.to_owned();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(PrefixLayer::new(prefix.to_owned()))
        .layer(ReconnectLayer::new(backoff()).buffer(buffer))
        .service(move || config().connect(url.clone()));
    EventTarget::new(transport)
}

/// A raw redis-rs subscriber, to see exactly what went over the wire.
async fn raw_subscriber(url: &str, channel: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(channel).await.unwrap();
    pubsub
}

/// `subscription` hears of a reconnect, then gets a confirmed publish of number `n`.
async fn gap_then_delivered(
    events: &EventTarget,
    subscription: &mut alkdev_pubsub::Subscription,
    r#type: &str,
    id: &str,
    n: u64,
) {
    assert_eq!(next_gap_or_event(subscription).await, Err(Gap::Reconnected));
    events
        .dispatch_confirmed(numbered(r#type, id, n))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(subscription).await, Ok(n));
}

async fn next_gap_or_event(subscription: &mut alkdev_pubsub::Subscription) -> Result<u64, Gap> {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(event))) => Ok(number_of(&event)),
        Ok(Some(Err(gap))) => Err(gap),
        Ok(None) => panic!("{:?}: the subscription ended", subscription.topic()),
        Err(_) => panic!("{:?}: nothing within {WAIT:?}", subscription.topic()),
    }
}

/// Publishes `numbers` on `{event_type}:{id}`, each confirmed by Redis, and checks that
/// `subscription` gets them, in order.
async fn publish_and_receive(
    events: &EventTarget,
    subscription: &mut alkdev_pubsub::Subscription,
    event_type: &str,
    id: &str,
    numbers: std::ops::Range<u64>,
) {
    for n in numbers.clone() {
        events
            .dispatch_confirmed(numbered(event_type, id, n))
            .await
            .unwrap();
    }
    for n in numbers {
        assert_eq!(next_gap_or_event(subscription).await, Ok(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_is_byte_for_byte_the_javascript_contract() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let mut subscription = events.subscribe("session.status:p1").await.unwrap();

    // A JavaScript peer (here redis-cli) publishes the seed's JSON on the prefixed channel.
    let json = r#"{"type":"session.status","id":"p1","payload":{"a":1}}"#;
    assert_eq!(
        server.cli(&["PUBLISH", "alk:events:session.status:p1", json]),
        "1"
    );
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(
        *event,
        Envelope::new("session.status", "p1", json!({ "a": 1 }))
    );

    // What we publish is exactly that JSON on that channel.
    let mut raw = raw_subscriber(&server.url(), "alk:events:session.status:p1").await;
    events
        .dispatch_confirmed(Envelope::new("session.status", "p1", json!({ "a": 1 })))
        .await
        .unwrap();
    let message = tokio::time::timeout(WAIT, raw.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_channel_name(), "alk:events:session.status:p1");
    assert_eq!(message.get_payload_bytes(), json.as_bytes());
    // Our own listener got it too.
    assert_eq!(*testkit::next_event(&mut subscription).await, *event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_on_one_server_never_see_each_other() {
    let server = RedisServer::start();
    let app_a = stack(&server.url(), "app-a:", 1024);
    let app_b = stack(&server.url(), "app-b:", 1024);
    let mut a = app_a.subscribe("chat:1").await.unwrap();
    let mut b = app_b.subscribe("chat:1").await.unwrap();
    for n in 0..20 {
        app_a
            .dispatch_event(numbered("chat", "1", n))
            .await
            .unwrap();
    }
    app_b
        .dispatch_event(numbered("chat", "1", 100))
        .await
        .unwrap();
    for n in 0..20 {
        assert_eq!(number_of(&testkit::next_event(&mut a).await), n);
    }
    assert_eq!(number_of(&testkit::next_event(&mut b).await), 100);
    testkit::assert_quiet(&mut a, Duration::from_millis(200)).await;
    testkit::assert_quiet(&mut b, Duration::from_millis(200)).await;
    assert_eq!(app_a.stats().skipped + app_b.stats().skipped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_unsubscribes_on_the_server_and_a_thousand_topics_leave_nothing() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let first = events.subscribe("leave:1").await.unwrap();
    let second = events.subscribe("leave:1").await.unwrap();
    assert_eq!(
        server.cli(&["PUBSUB", "NUMSUB", "alk:events:leave:1"]),
        "alk:events:leave:1\n1"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.cli(&["PUBSUB", "NUMSUB", "alk:events:leave:1"]),
        "alk:events:leave:1\n1"
    );
    drop(second);
    wait_until(|| {
        server.cli(&["PUBSUB", "NUMSUB", "alk:events:leave:1"]) == "alk:events:leave:1\n0"
    })
    .await;

    let mut subscriptions = Vec::new();
    for t in 0..1_000 {
        subscriptions.push(
            events
                .subscribe(Topic::of("many", &t.to_string()))
                .await
                .unwrap(),
        );
    }
    assert_eq!(server.cli(&["PUBSUB", "NUMPAT"]), "0");
    let channels = server.cli(&["PUBSUB", "CHANNELS"]);
    assert_eq!(channels.lines().count(), 1_000);
    drop(subscriptions);
    wait_until(|| server.cli(&["PUBSUB", "CHANNELS"]).is_empty()).await;
    assert_eq!(events.topic_count(), 0);
}

/// Sets Redis's `client-output-buffer-limit` for pub/sub clients (`"pubsub <hard> <soft>
/// <seconds>"`): what Redis keeps for a client that does not read, before it drops it.
fn set_pubsub_output_limit(server: &RedisServer, limit: &str) {
    assert_eq!(
        server.cli(&["CONFIG", "SET", "client-output-buffer-limit", limit]),
        "OK"
    );
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_skipped_and_counted() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let cli_server = &server;
    testkit::malformed_frames_skipped(Pair::loopback(events), |topic, frame| {
        let channel = format!("alk:events:{topic}");
        let frame = frame.to_vec();
        async move {
            let client = redis::Client::open(cli_server.url()).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let receivers: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(frame)
                .query_async(&mut connection)
                .await
                .unwrap();
            assert_eq!(receivers, 1);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_passes_the_conformance_suite() {
    let server = RedisServer::start();
    let url = server.url();
    testkit::run_all(|| {
        let url = url.clone();
        async move { Pair::new(stack(&url, "conf:", 4096), stack(&url, "conf:", 4096)) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_on_the_same_port_recovers_everything() {
    let mut server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let mut subscriptions = Vec::new();
    for t in 0..10 {
        subscriptions.push(
            events
                .subscribe_with(
                    Topic::of("k", &t.to_string()),
                    SubscribeOptions::new().capacity(4096),
                )
                .await
                .unwrap(),
        );
    }
    // Mid-stream: confirmed publishes before the kill.
    for (t, subscription) in subscriptions.iter_mut().enumerate() {
        events
            .dispatch_confirmed(numbered("k", &t.to_string(), 0))
            .await
            .unwrap();
        assert_eq!(next_gap_or_event(subscription).await, Ok(0));
    }
    server.kill();
    // Publishes issued during the outage wait in the buffer.
    for n in 1..=50 {
        for t in 0..10 {
            events
                .dispatch_event(numbered("k", &t.to_string(), n))
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    for (t, subscription) in subscriptions.iter_mut().enumerate() {
        assert_eq!(
            next_gap_or_event(subscription).await,
            Err(Gap::Reconnected),
            "topic {t}"
        );
        for n in 1..=50 {
            assert_eq!(
                next_gap_or_event(subscription).await,
                Ok(n),
                "topic {t}: lost or reordered"
            );
        }
    }
    // Every subscription is back on the server.
    let channels: HashSet<String> = server
        .cli(&["PUBSUB", "CHANNELS"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(channels.len(), 10);
    let stats = events.stats();
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(stats.publish_failed, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_of_the_pubsub_connection_is_survived() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let mut subscription = events.subscribe("ck:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("ck", "1", 1))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
    let killed: u64 = server
        .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .parse()
        .unwrap();
    assert!(killed >= 1);
    gap_then_delivered(&events, &mut subscription, "ck", "1", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_is_detected_and_survived() {
    use alkdev_pubsub::layers::reconnect::ConnectionState;
    let mut server = RedisServer::start();
    let url = server.url();
    let reconnect = ReconnectLayer::new(backoff());
    let mut state = reconnect.state();
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .layer(reconnect)
            .service(move || config().connect(url.clone())),
    );
    let mut subscription = events.subscribe("pause:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("pause", "1", 1))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
    server.pause();
    // The ping (every 200 ms, 2 s to answer) declares the connection dead; reconnects fail
    // while the server sleeps.
    tokio::time::timeout(
        WAIT,
        state.wait_for(|state| *state != ConnectionState::Connected),
    )
    .await
    .expect("the paused server is found")
    .unwrap();
    server.resume();
    gap_then_delivered(&events, &mut subscription, "pause", "1", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_subscriber_targets_fifty_topics_steady_publisher() {
    const TARGETS: usize = 8;
    const TOPICS: usize = 50;
    const MESSAGES: u64 = 200;
    let server = RedisServer::start();
    let mut readers = Vec::new();
    let mut targets = Vec::new();
    for _ in 0..TARGETS {
        let events = stack(&server.url(), "alk:events:", 1024);
        for t in 0..TOPICS {
            let mut subscription = events
                .subscribe_with(
                    Topic::of("steady", &t.to_string()),
                    SubscribeOptions::new().capacity(1024),
                )
                .await
                .unwrap();
            readers.push(tokio::spawn(async move {
                for n in 0..MESSAGES {
                    assert_eq!(
                        number_of(&testkit::next_event(&mut subscription).await),
                        n,
                        "topic {t}"
                    );
                }
            }));
        }
        targets.push(events);
    }
    // Built just before the burst: the first 1,024 publishes fill the reconnect layer's buffer
    // while its first connection is being made, and the rest wait for that connection.
    let publisher = stack(&server.url(), "alk:events:", 1024);
    for n in 0..MESSAGES {
        for t in 0..TOPICS {
            publisher
                .dispatch_event(numbered("steady", &t.to_string(), n))
                .await
                .unwrap();
        }
    }
    // The last publish was flushed after every other: none of them failed.
    publisher
        .dispatch_confirmed(numbered("steady", "done", 0))
        .await
        .unwrap();
    assert_eq!(publisher.stats().publish_failed, 0);
    for reader in readers {
        reader.await.unwrap();
    }
    for events in &targets {
        assert_eq!(events.stats().delivered, TOPICS as u64 * MESSAGES);
        assert_eq!(events.stats().lagged, 0);
    }
}

#[tokio::test]
async fn a_bad_url_and_a_missing_server_fail_with_clear_errors() {
    let error = RedisTransport::connect("http://nope").await.unwrap_err();
    assert!(error.to_string().contains("invalid Redis URL"), "{error}");
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Config, "{error}");
    for url in ["rediss://127.0.0.1:1/", "valkeys://127.0.0.1:1/"] {
        let error = RedisTransport::connect(url).await.unwrap_err();
        assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Config, "{error}");
        assert!(
            error
                .to_string()
                .contains("TLS (rediss://) is not supported"),
            "{error}"
        );
    }
    let port = testkit::free_port();
    let error = RedisConfig::new()
        .connect_timeout(Duration::from_millis(500))
        .connect(format!("redis://user:secret@127.0.0.1:{port}/2"))
        .await
        .unwrap_err();
    assert!(error.is_unrecoverable(), "{error}");
    assert!(
        error.to_string().contains(&port.to_string()),
        "names the address: {error}"
    );
    assert!(
        !error.to_string().contains("secret"),
        "never prints the password: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_listens_and_publishes() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let server = RedisServer::start();
    let url = server.url();
    let listen = Command::new(tap_binary())
        .args([
            "listen", "--redis", &url, "--prefix", "app:", "--count", "2", "chat:1", "chat:2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(|| server.cli(&["PUBSUB", "NUMSUB", "app:chat:2"]) == "app:chat:2\n1").await;

    let mut publish = Command::new(tap_binary())
        .args(["publish", "--redis", &url, "--prefix", "app:"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bad lines: not JSON, not UTF-8, an envelope whose topic is over the limit. Each is
    // reported and skipped; the good ones around them are published.
    let long = format!(
        "{{\"type\":\"chat\",\"id\":\"{}\"}}\n",
        "x".repeat(alkdev_pubsub::layers::MAX_TOPIC_LEN)
    );
    let mut input =
        b"{\"type\":\"chat\",\"id\":\"1\",\"payload\":{\"m\":\"hi\"}}\nnot json\n".to_vec();
    input.extend_from_slice(b"\xff\xfe\n");
    input.extend_from_slice(long.as_bytes());
    input.extend_from_slice(b"{\"type\":\"chat\",\"id\":\"2\"}\n");
    publish.stdin.take().unwrap().write_all(&input).unwrap();
    let published = common::output_within(publish, "tap publish", WAIT).await;
    let stderr = String::from_utf8_lossy(&published.stderr);
    assert!(published.status.success(), "tap publish failed: {stderr}");
    assert!(
        published.stdout.is_empty(),
        "publish prints nothing on stdout"
    );
    for line in ["line 2:", "line 3:", "line 4:"] {
        assert!(
            stderr.contains(line),
            "each bad line is reported with its number ({line}): {stderr}"
        );
    }
    assert!(
        stderr.contains("published 2 envelope(s), skipped 3 bad line(s)"),
        "{stderr}"
    );

    let listened = common::output_within(listen, "tap listen", WAIT).await;
    assert!(
        listened.status.success(),
        "{}",
        String::from_utf8_lossy(&listened.stderr)
    );
    assert_eq!(
        String::from_utf8(listened.stdout).unwrap(),
        "{\"type\":\"chat\",\"id\":\"1\",\"payload\":{\"m\":\"hi\"}}\n{\"type\":\"chat\",\"id\":\"2\",\"payload\":null}\n",
        "one compact JSON line per envelope, nothing else"
    );
}

/// Lines refused during an outage (the reconnect buffer full) are not published: `tap publish`
/// says so and exits with a failure, though the server came back and the rest went out (it
/// took them for bad lines and exited 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_publish_fails_when_an_outage_refused_lines() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut server = RedisServer::start();
    let url = server.url();
    let mut publish = Command::new(tap_binary())
        .args(["publish", "--redis", &url])
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes: a line per refused envelope fills a pipe.
    let mut stderr = publish.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdin = publish.stdin.take().unwrap();
    let line = |n: usize| format!("{{\"type\":\"chat\",\"id\":\"1\",\"payload\":{n}}}\n");
    stdin.write_all(line(0).as_bytes()).unwrap();
    stdin.flush().unwrap();
    // Connected for longer than the backoff's `stable_after` (5 s): its loss starts the count
    // of attempts (three) anew.
    wait_until(|| server.cli(&["CLIENT", "LIST"]).lines().count() >= 3).await;
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    server.kill();
    // Time to notice the loss (then the layer tries at once, and again after about 100 ms and
    // 300 ms; should the server come back after that, the run fails all the same).
    tokio::time::sleep(Duration::from_millis(100)).await;
    // More than the reconnect layer buffers (1,024) while the server is down.
    let input: String = (1..=3_000).map(line).collect();
    let writer = std::thread::spawn(move || {
        stdin.write_all(input.as_bytes()).unwrap();
        stdin
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    tokio::task::block_in_place(|| server.restart());
    drop(tokio::task::block_in_place(|| writer.join().unwrap()));
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = publish.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = publish.kill();
            panic!("tap publish did not finish within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = tokio::task::block_in_place(|| reader.join().unwrap());
    let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join("\n");
    assert!(
        stderr.contains("not published:"),
        "the refused lines are reported: {tail}"
    );
    assert!(!status.success(), "refused lines fail the run: {tail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_fails_alone_and_the_connection_goes_on() {
    let server = RedisServer::start();
    // A user allowed only the channels under alk:events:allowed.
    assert_eq!(
        server.cli(&[
            "ACL",
            "SETUSER",
            "limited",
            "on",
            ">secret",
            "~*",
            "resetchannels",
            "&alk:events:allowed*",
            "+@all",
        ]),
        "OK"
    );
    let url = format!("redis://limited:secret@127.0.0.1:{}/", server.port());
    let events = stack(&url, "alk:events:", 1024);
    let mut allowed = events.subscribe("allowed:1").await.unwrap();

    let error = events.subscribe("forbidden:1").await.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");
    assert!(
        error.to_string().contains("forbidden:1"),
        "names the channel: {error}"
    );

    // A callback keeps the refused topic in the map; subscribing again asks again (no hang).
    events.add_event_listener("forbidden:2", |_| {}).unwrap();
    let error = tokio::time::timeout(WAIT, events.subscribe("forbidden:2"))
        .await
        .expect("answered, not hung")
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");

    // The connection and the allowed subscription are fine.
    events
        .dispatch_confirmed(numbered("allowed", "1", 5))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut allowed).await, Ok(5));
    assert_eq!(events.stats().reconnects, 0);
}

/// How many calls of `command` the server refused before running them (`INFO commandstats`).
fn rejected_calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find(|line| line.starts_with(&format!("cmdstat_{command}:")))
        .and_then(|line| {
            line.split(',')
                .find_map(|f| f.strip_prefix("rejected_calls="))
        })
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// Redis answers PING with an error to a user not allowed it (`NOPERM`), and to everyone while
/// it loads its dataset (`LOADING`) or runs a long script (`BUSY`): an answer all the same.
/// The connection stays up through many pings, rather than reconnect (and lose what is
/// published meanwhile) at each one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_answered_with_an_error_keeps_the_connection() {
    let server = RedisServer::start();
    assert_eq!(
        server.cli(&["ACL", "SETUSER", "noping", "on", ">secret", "~*", "&*", "+@all", "-ping"]),
        "OK"
    );
    let url = format!("redis://noping:secret@127.0.0.1:{}/", server.port());
    // The transport's own subscribe connection, and one over a redis-rs `PubSub` (no reconnect
    // layer there: a failed connection would end the target).
    let client = redis::Client::open(url.as_str()).unwrap();
    let publish = client.get_multiplexed_async_connection().await.unwrap();
    let subscribe = client.get_async_pubsub().await.unwrap();
    let over_redis_rs: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .service(RedisTransport::from_clients_with(
                publish,
                subscribe,
                config(),
            )),
    );
    for events in [stack(&url, "alk:events:", 1024), over_redis_rs] {
        let refused_before = rejected_calls(&server, "ping");
        let mut subscription = events.subscribe("noping:1").await.unwrap();
        // Five pings (every 200 ms), each refused.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        events
            .dispatch_confirmed(numbered("noping", "1", 1))
            .await
            .unwrap();
        assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
        assert_eq!(events.stats().reconnects, 0);
        // The pings went out, and were refused.
        let refused = rejected_calls(&server, "ping") - refused_before;
        assert!(refused >= 3, "{refused} pings refused");
    }
}

/// Runs a script that loops until it is killed (`SCRIPT KILL`), on a server started with a
/// `--busy-reply-threshold`: returns once Redis answers `BUSY` to other commands. The thread
/// ends with the script.
async fn busy_script(server: &RedisServer) -> std::thread::JoinHandle<std::process::Output> {
    let port = server.port().to_string();
    let script = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(["EVAL", "while true do end", "0"])
            .output()
            .unwrap()
    });
    let deadline = std::time::Instant::now() + WAIT;
    while !server.cli(&["PING"]).starts_with("BUSY") {
        assert!(std::time::Instant::now() < deadline, "the script never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    script
}

/// A server busy with a long script answers `BUSY` to the subscribes that the reconnect layer
/// replays: not a refusal for good. The layer connects again later and replays them then; the
/// subscription lives on, and hears of the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_answered_busy_is_tried_again_not_given_up() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let server = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let url = server.url();
    // Connecting waits while `hold` is set: the reconnect comes once the server is busy.
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&hold);
    let backoff = Backoff::new()
        .initial(Duration::from_millis(100))
        .max(Duration::from_millis(100))
        .jitter(0.0);
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .layer(ReconnectLayer::new(backoff))
            .service(move || {
                let (url, held) = (url.clone(), Arc::clone(&held));
                async move {
                    while held.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    config().connect(url).await
                }
            }),
    );
    let mut subscription = events.subscribe("busy:1").await.unwrap();
    hold.store(true, Ordering::SeqCst);
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let script = busy_script(&server).await;
    // Into the busy server: each replay is refused, and the layer tries again.
    hold.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(server.cli(&["SCRIPT", "KILL"]).starts_with("OK"));
    script.join().unwrap();
    gap_then_delivered(&events, &mut subscription, "busy", "1", 1).await;
    // The replays were refused, more than once.
    let rejected = rejected_calls(&server, "subscribe");
    assert!(rejected >= 2, "{rejected} replays refused");
}

/// A publish refused with `BUSY` (a long script runs) fails with a transient error of kind
/// `Busy`, not a refusal for good: redis-rs gives a pipeline's error no code of its own. The
/// retry layer sends it again, and it arrives once the script has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_busy_is_transient_and_retried() {
    use alkdev_pubsub::layers::RetryLayer;
    let server = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let plain: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .service(config().connect(server.url()).await.unwrap()),
    );
    let retrying: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(RetryLayer::new(10, Duration::from_millis(100)))
            .service(config().connect(server.url()).await.unwrap()),
    );
    let mut subscription = retrying.subscribe("busy:2").await.unwrap();
    let script = busy_script(&server).await;
    let error = plain
        .dispatch_confirmed(numbered("busy", "1", 0))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Busy, "{error}");
    assert!(error.is_transient(), "{error}");
    // It names the channel and the server.
    let text = error.to_string();
    assert!(text.contains("publishing to \"busy:1\""), "{text}");
    assert!(text.contains(&server.url()), "{text}");
    let retried = tokio::spawn(async move {
        let confirmed = retrying.dispatch_confirmed(numbered("busy", "2", 1)).await;
        (retrying, confirmed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!retried.is_finished(), "refused while the script runs");
    assert!(server.cli(&["SCRIPT", "KILL"]).starts_with("OK"));
    script.join().unwrap();
    let (retrying, confirmed) = tokio::time::timeout(WAIT, retried).await.unwrap().unwrap();
    confirmed.unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
    assert!(retrying.stats().publish_failed == 0);
}

/// An access rule that takes a channel away mid-stream: the server drops the connection, the
/// reconnect layer subscribes every topic again, and the server refuses that one (`NOPERM`).
/// Its subscription ends rather than wait for good; the other comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_an_acl_takes_away_mid_stream_ends_its_subscription_only() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let mut gone = events.subscribe("acl:gone").await.unwrap();
    let mut kept = events.subscribe("acl:kept").await.unwrap();
    assert_eq!(
        server.cli(&[
            "ACL",
            "SETUSER",
            "default",
            "resetchannels",
            "&alk:events:acl:kept"
        ]),
        "OK"
    );
    testkit::next_end(&mut gone).await;
    assert_eq!(next_gap_or_event(&mut kept).await, Err(Gap::Reconnected));
    events
        .dispatch_confirmed(numbered("acl", "kept", 1))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut kept).await, Ok(1));
}

/// Payloads are slices of the subscribe connection's read buffer, which a large message grows
/// and which is replaced after it: a run of small and large payloads, in sizes around the read
/// space (16 KiB) and past the buffer's limit (64 KiB), arrives intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_large_payloads_arrive_intact() {
    let server = RedisServer::start();
    let events = stack(&server.url(), "alk:events:", 1024);
    let mut subscription = events.subscribe("sizes:1").await.unwrap();
    let sizes = [
        0usize, 10, 900, 1_000, 1_100, 5_000, 20_000, 30, 8_000, 1, 100_000, 70_000, 3,
    ];
    for (n, size) in sizes.iter().enumerate() {
        let payload = json!({ "n": n, "pad": "x".repeat(*size) });
        events
            .dispatch_event(Envelope::new("sizes", "1", payload))
            .await
            .unwrap();
    }
    for (n, size) in sizes.iter().enumerate() {
        let event = testkit::next_event(&mut subscription).await;
        assert_eq!(event.payload["n"], n, "in order");
        assert_eq!(event.payload["pad"].as_str().unwrap().len(), *size);
        assert!(event.payload["pad"]
            .as_str()
            .unwrap()
            .bytes()
            .all(|b| b == b'x'));
    }
}

/// With a `max_message_size` of 1,000 bytes: a message over it, published by someone else, is
/// skipped and counted, and the next one arrives; a publish over it is refused with an error
/// that names the limit, and nothing is sent. Over our own subscribe connection and over a
/// redis-rs `PubSub`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_skipped_and_a_publish_over_it_refused() {
    let server = RedisServer::start();
    let limited = || config().max_message_size(1_000);
    let url = server.url();
    let own = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(ReconnectLayer::new(backoff()))
        .service(move || limited().connect(url.clone()));
    let client = redis::Client::open(server.url()).unwrap();
    let over_redis_rs = RedisTransport::from_clients_with(
        client.get_multiplexed_async_connection().await.unwrap(),
        client.get_async_pubsub().await.unwrap(),
        limited(),
    );
    let over_redis_rs = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .service(over_redis_rs);
    let targets: [(&str, EventTarget); 2] = [
        ("own", EventTarget::new(own)),
        ("redis-rs", EventTarget::new(over_redis_rs)),
    ];
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    for (id, events) in targets {
        let mut subscription = events.subscribe(format!("big:{id}")).await.unwrap();
        let big = Envelope::new("big", id, json!({ "n": 0, "pad": "x".repeat(5_000) }));
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(format!("big:{id}"))
            .arg(serde_json::to_vec(&big).unwrap())
            .query_async(&mut publisher)
            .await
            .unwrap();
        assert_eq!(receivers, 1, "{id}");
        events
            .dispatch_confirmed(numbered("big", id, 1))
            .await
            .unwrap();
        assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1), "{id}");
        assert_eq!(events.stats().skipped, 1, "{id}");

        let error = events.dispatch_confirmed(big).await.unwrap_err();
        assert_eq!(
            error.kind(),
            alkdev_pubsub::ErrorKind::TooLarge,
            "{id}: {error}"
        );
        assert!(
            error
                .to_string()
                .contains("over the limit of 1000 (RedisConfig::max_message_size)"),
            "{id}: {error}"
        );
        events
            .dispatch_confirmed(numbered("big", id, 2))
            .await
            .unwrap();
        assert_eq!(
            next_gap_or_event(&mut subscription).await,
            Ok(2),
            "{id}: only the small one went out"
        );
        assert_eq!(events.stats().reconnects, 0, "{id}: the connection went on");
    }
}

/// The default size limit (8 MiB) stays under what a redis-server with its default settings
/// delivers to a subscriber (`client-output-buffer-limit pubsub 32mb 8mb 60`: one message of
/// more than 32 MiB gets every subscriber disconnected, and none receives it): a message at
/// the limit arrives, the connection going on; a publish over it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_size_limit_is_one_a_default_server_delivers() {
    const DEFAULT: usize = 8 << 20;
    let server = RedisServer::start();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let limits: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("client-output-buffer-limit")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        limits[1].contains("pubsub 33554432 8388608 60"),
        "the server's defaults: {limits:?}"
    );
    let events = stack(&server.url(), "", 16);
    let mut subscription = events.subscribe("big:1").await.unwrap();
    // The frame is the envelope's JSON: padded to the limit exactly.
    let frame_without_pad = serde_json::to_vec(&Envelope::new("big", "1", json!({ "pad": "" })))
        .unwrap()
        .len();
    let at_limit = Envelope::new(
        "big",
        "1",
        json!({ "pad": "x".repeat(DEFAULT - frame_without_pad) }),
    );
    let over_limit = Envelope::new(
        "big",
        "1",
        json!({ "pad": "x".repeat(DEFAULT - frame_without_pad + 1) }),
    );
    let error = events.dispatch_confirmed(over_limit).await.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");
    events.dispatch_confirmed(at_limit).await.unwrap();
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(
        event.payload["pad"].as_str().unwrap().len(),
        DEFAULT - frame_without_pad
    );
    events
        .dispatch_confirmed(numbered("big", "1", 1))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
    assert_eq!(events.stats().reconnects, 0, "the connection went on");
}

/// Feeds a subscribe of `subscribe`, then a publish of `message` on `topic`, which the
/// transport holds until Redis confirms the subscribe.
async fn feed_behind_a_subscribe(
    transport: &mut RedisTransport,
    subscribe: &str,
    topic: &str,
    message: &'static [u8],
) {
    use futures::SinkExt;
    transport
        .feed(alkdev_pubsub::Command::Subscribe(Topic::from(subscribe)))
        .await
        .unwrap();
    transport
        .feed(alkdev_pubsub::Command::Publish {
            topic: Topic::from(topic),
            message: bytes::Bytes::from_static(message),
        })
        .await
        .unwrap();
}

/// The transport used as a plain sink, nobody reading its stream: publishes fed behind a
/// subscribe go out once the subscribe is answered, and closing waits for them, without a
/// reader to drive the subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_alone_sends_publishes_held_behind_a_subscribe() {
    use futures::SinkExt;
    let server = RedisServer::start();
    let mut raw = raw_subscriber(&server.url(), "held:1").await;
    let mut transport = config().connect(server.url()).await.unwrap();
    feed_behind_a_subscribe(&mut transport, "held:2", "held:1", b"after the subscribe").await;
    tokio::time::timeout(WAIT, transport.close())
        .await
        .expect("the close finishes")
        .unwrap();
    let message = tokio::time::timeout(WAIT, raw.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.get_payload_bytes(), b"after the subscribe");
}

/// Messages that come while a subscribe waits for its answer are read and kept for the reading
/// side, up to 32 MiB: past that the transport stops reading, and a reading side that never
/// takes them (here, nobody reads the stream) fails the connection when the answer is due,
/// as Redis does past its own limit, rather than move the whole backlog into this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_reads_at_most_32_mib_ahead_for_a_reader_that_takes_nothing() {
    let server = RedisServer::start();
    let (mut transport, mut publisher) = subscribed_and_never_read(&server, "big:1").await;
    let megabyte = vec![b'x'; 1 << 20];
    for _ in 0..40 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("big:1")
            .arg(&megabyte)
            .query_async(&mut publisher)
            .await
            .unwrap();
    }
    // A publish held behind a second subscribe: the flush waits for its answer, which comes
    // after the 40 MiB.
    flush_behind_a_subscribe_times_out(&mut transport, "big:2", "big:3").await;
}

/// A transport subscribed to `channel` whose stream nobody reads (Redis keeps whatever it
/// does not read), and a publishing connection.
async fn subscribed_and_never_read(
    server: &RedisServer,
    channel: &str,
) -> (RedisTransport, redis::aio::MultiplexedConnection) {
    use futures::SinkExt;
    set_pubsub_output_limit(server, "pubsub 0 0 0");
    let mut transport = config().connect(server.url()).await.unwrap();
    transport
        .send(alkdev_pubsub::Command::Subscribe(Topic::from(channel)))
        .await
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let publisher = client.get_multiplexed_async_connection().await.unwrap();
    (transport, publisher)
}

/// A publish held behind a subscribe of `first` (then `second`): the flush waits for its
/// answer, which comes after what was published before; the transport stops reading at its
/// bound, and the answer's timeout fails the connection.
async fn flush_behind_a_subscribe_times_out(
    transport: &mut RedisTransport,
    first: &str,
    second: &str,
) {
    use futures::SinkExt;
    feed_behind_a_subscribe(transport, first, second, b"held").await;
    let error = tokio::time::timeout(WAIT, transport.flush())
        .await
        .expect("the flush ends")
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Timeout, "{error}");
    assert!(
        error.to_string().contains("wait for the reading side"),
        "{error}"
    );
}

/// The same bound for a flood of empty messages: each counts for its place in the queue, not
/// only its payload (it counted nothing, and the whole backlog was read in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_reads_a_bounded_count_of_empty_messages_ahead() {
    let server = RedisServer::start();
    let (mut transport, mut publisher) = subscribed_and_never_read(&server, "e:1").await;
    // 600,000 empty messages: about 41 MB at 69 bytes each (the place, the channel).
    for _ in 0..60 {
        let mut pipeline = redis::pipe();
        for _ in 0..10_000 {
            pipeline.cmd("PUBLISH").arg("e:1").arg("").ignore();
        }
        let () = pipeline.query_async(&mut publisher).await.unwrap();
    }
    flush_behind_a_subscribe_times_out(&mut transport, "e:2", "e:3").await;
}

/// A Unix socket and a password without a user name (`AUTH password`): the subscribe
/// connection, which the transport opens itself, uses both as the publish connection does.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_and_a_password_reach_both_connections() {
    let socket = std::env::temp_dir().join(format!(
        "alkdev-pubsub-test-{}-{}.sock",
        std::process::id(),
        testkit::free_port()
    ));
    let server = RedisServer::start_with(&[
        "--unixsocket",
        socket.to_str().unwrap(),
        "--unixsocketperm",
        "700",
    ]);
    assert_eq!(
        server.cli(&["CONFIG", "SET", "requirepass", "s3cret"]),
        "OK"
    );
    let url = format!("redis+unix://{}?pass=s3cret", socket.display());
    let events = stack(&url, "alk:events:", 1024);
    let mut subscription = events.subscribe("unix:1").await.unwrap();
    publish_and_receive(&events, &mut subscription, "unix", "1", 0..3).await;
    events.close().await;

    // A wrong password is refused for good, and the error does not print it.
    let wrong = format!("redis+unix://{}?pass=wrong", socket.display());
    let error = config().connect(&wrong).await.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");
    assert!(error.is_permanent(), "{error}");
    assert!(!error.to_string().contains("wrong"), "{error}");
    // So the reconnect layer gives up at once, with that error, rather than retry for ever.
    let events = stack(&wrong, "alk:events:", 1024);
    let error = tokio::time::timeout(WAIT, events.subscribe("unix:2"))
        .await
        .expect("not retried for ever")
        .unwrap_err();
    assert!(
        error.to_string().contains("retrying cannot succeed"),
        "{error}"
    );
    assert!(!error.to_string().contains("wrong"), "{error}");
    // The target stopped (`Closed`); the refusal is in the error's source chain.
    assert!(error.is_closed(), "{error}");
    let chain = std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source());
    let kinds: Vec<_> = chain
        .filter_map(|e| e.downcast_ref::<alkdev_pubsub::Error>())
        .map(|e| e.kind())
        .collect();
    use alkdev_pubsub::ErrorKind::{Closed, Connect, Rejected};
    assert_eq!(kinds, [Closed, Connect, Rejected], "{error:?}");
    let _ = std::fs::remove_file(&socket);
}

/// A transport over a redis-rs `PubSub` the caller opened (`from_clients`) still subscribes,
/// receives, unsubscribes and pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_over_a_redis_rs_pubsub_still_works() {
    let server = RedisServer::start();
    // Opened with the re-exported redis-rs, as a user without a dependency of their own would.
    let client = alkdev_pubsub::redis::redis::Client::open(server.url()).unwrap();
    let publish = client.get_multiplexed_async_connection().await.unwrap();
    let subscribe = client.get_async_pubsub().await.unwrap();
    let transport = RedisTransport::from_clients_with(publish, subscribe, config());
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .service(transport),
    );
    let mut subscription = events.subscribe("rs:1").await.unwrap();
    publish_and_receive(&events, &mut subscription, "rs", "1", 0..3).await;
    // Quiet for longer than the ping interval: pings go out and are answered, the transport
    // lives.
    let pings = || {
        let stats = server.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = pings();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(pings() > before, "the transport pings");
    events
        .dispatch_confirmed(numbered("rs", "1", 3))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(3));
    drop(subscription);
    wait_until(|| server.cli(&["PUBSUB", "NUMSUB", "rs:1"]).ends_with("\n0")).await;
}

/// Over a redis-rs `PubSub` too, an unsubscribe is answered after the channel's messages that
/// came before it: the answer came first (redis-rs had read them; the transport told its answer
/// before reading them), and an event target then dropped them as unrouted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_redis_rs_pubsub_an_unsubscribe_is_answered_after_the_messages_before_it() {
    use alkdev_pubsub::{Command, Up};
    use futures::SinkExt;
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let publish = client.get_multiplexed_async_connection().await.unwrap();
    let subscribe = client.get_async_pubsub().await.unwrap();
    let mut transport = RedisTransport::from_clients_with(publish, subscribe, config());
    let topic = Topic::from("order:1");
    common::subscribe_confirmed(&mut transport, &topic).await;
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for n in 0..200 {
        pipe.cmd("PUBLISH")
            .arg("order:1")
            .arg(n.to_string())
            .ignore();
    }
    let () = pipe.query_async(&mut publisher).await.unwrap();
    transport
        .send(Command::Unsubscribe(topic.clone()))
        .await
        .unwrap();
    // The reader comes once the answer is in too (a busy event target's driver, say).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut messages = 0;
    loop {
        match tokio::time::timeout(WAIT, transport.next()).await.unwrap() {
            Some(Ok(Up::Message { message, .. })) => {
                assert_eq!(message, messages.to_string().as_bytes());
                messages += 1;
            }
            Some(Ok(Up::Unsubscribed(_))) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        messages, 200,
        "messages read before the unsubscribe's answer"
    );
}

/// The reconnect layer over Redis, split between a reading task and a writing one: publishes
/// fed and not flushed yet (the writer is busy elsewhere) leave the reader asleep. The layer
/// gave the transport a waker of both tasks for the writer's calls, which the transport wakes
/// while publishes wait for a flush, each time the reader polled it: the reader spun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_over_redis_publishes_waiting_for_a_flush_leave_the_reader_asleep() {
    use alkdev_pubsub::{Command, Up};
    use futures::SinkExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tower::Layer;
    let server = RedisServer::start();
    let url = server.url();
    let transport = ReconnectLayer::new(backoff()).layer(move || config().connect(url.clone()));
    let (mut sink, mut stream) = transport.split();
    let polls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&polls);
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::SeqCst);
            stream.poll_next_unpin(cx)
        });
        while let Some(up) = stream.next().await {
            if got_tx
                .send(up.map(|up| matches!(up, Up::Subscribed(_))))
                .is_err()
            {
                break;
            }
        }
    });
    sink.send(Command::Subscribe(Topic::from("quiet:1")))
        .await
        .unwrap();
    let confirmed = tokio::time::timeout(WAIT, got.recv()).await.unwrap();
    assert!(matches!(confirmed, Some(Ok(true))), "{confirmed:?}");
    for n in 0..2 {
        sink.feed(Command::Publish {
            topic: Topic::from("quiet:1"),
            message: bytes::Bytes::from(n.to_string()),
        })
        .await
        .unwrap();
    }
    let before = polls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spun = polls.load(Ordering::SeqCst) - before;
    assert!(
        spun < 20,
        "the reader was polled {spun} times while nothing came"
    );
    sink.flush().await.unwrap();
    reader.abort();
}

/// One task that feeds publishes, does not flush them yet, and reads: the transport does not
/// wake it again and again while they wait for the flush (it woke "the task that flushes",
/// this one, at each poll: a busy loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_waiting_for_a_flush_do_not_keep_their_reader_busy() {
    use alkdev_pubsub::Command;
    use futures::SinkExt;
    let server = RedisServer::start();
    let mut transport = config().connect(server.url()).await.unwrap();
    common::subscribe_confirmed(&mut transport, "quiet:2").await;
    for n in 0..2 {
        transport
            .feed(Command::Publish {
                topic: Topic::from("other:2"),
                message: bytes::Bytes::from(n.to_string()),
            })
            .await
            .unwrap();
    }
    let mut polls = 0;
    let reading = futures::future::poll_fn(|cx| {
        polls += 1;
        transport.poll_next_unpin(cx)
    });
    let read = tokio::time::timeout(Duration::from_millis(300), reading).await;
    assert!(read.is_err(), "nothing was published on quiet:2: {read:?}");
    assert!(
        polls < 20,
        "the reader was polled {polls} times while nothing came"
    );
    transport.flush().await.unwrap();
}

/// A listener that stops reading its `Block` subscription: the target stops reading the
/// subscribe connection, so the backlog waits in the socket and in Redis, which closes the
/// connection once its output buffer for a pub/sub client is over the limit (set low here).
/// Reading again, the listener gets what was on its way, then the gap; the subscription is
/// back, and what is published next arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_stops_reading_is_cut_off_by_redis_and_comes_back() {
    let server = RedisServer::start();
    set_pubsub_output_limit(&server, "pubsub 256kb 128kb 1");
    let events = stack(&server.url(), "alk:events:", 1024);
    let options = SubscribeOptions::new()
        .capacity(4)
        .overflow(alkdev_pubsub::Overflow::Block);
    let mut slow = events.subscribe_with("slow:1", options).await.unwrap();

    // 20 MB from another client, far more than the socket buffers and the limit hold.
    let client = redis::Client::open(server.url()).unwrap();
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    let pad = "x".repeat(1_000);
    for batch in 0..20u64 {
        let mut pipe = redis::pipe();
        for n in batch * 1_000..(batch + 1) * 1_000 {
            let envelope = Envelope::new("slow", "1", json!({ "n": n, "pad": pad }));
            pipe.cmd("PUBLISH")
                .arg("alk:events:slow:1")
                .arg(serde_json::to_vec(&envelope).unwrap())
                .ignore();
        }
        let () = pipe.query_async(&mut publisher).await.unwrap();
    }
    // Redis cut the slow connection off: nobody is subscribed until the target reads again.
    wait_until(|| {
        server
            .cli(&["PUBSUB", "NUMSUB", "alk:events:slow:1"])
            .ends_with("\n0")
    })
    .await;

    let mut received = 0u64;
    let mut last = None;
    loop {
        match next_gap_or_event(&mut slow).await {
            Ok(n) => {
                assert!(
                    last.is_none_or(|last| n > last),
                    "in order: {n} after {last:?}"
                );
                last = Some(n);
                received += 1;
            }
            Err(Gap::Reconnected) => break,
            Err(gap) => panic!("unexpected {gap:?}"),
        }
    }
    assert!(received > 0, "what was on its way arrives before the gap");
    assert!(events.stats().reconnects >= 1);
    events
        .dispatch_confirmed(numbered("slow", "1", 1_000_000))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut slow).await, Ok(1_000_000));
}

/// A publisher that never pauses must not keep the transport's flush pending for ever: a
/// confirmed dispatch among its publishes is answered within a bounded number of later
/// publishes, so the publishes the reconnect layer keeps for a replay (those since the last
/// completed flush) stay as bounded. The bound here is loose (sixteen of the driver's windows
/// of 4,096; `tests/event_target.rs` checks the window itself): before the window, a debug
/// build answered after seconds of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_dispatch_is_answered_while_a_publisher_never_pauses() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;

    let server = RedisServer::start();
    let events = stack(&server.url(), "steady:", 1024);
    events
        .dispatch_confirmed(numbered("warm", "up", 0))
        .await
        .expect("connected");
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn({
        let (events, stop, published) = (events.clone(), Arc::clone(&stop), Arc::clone(&published));
        async move {
            let mut n = 0;
            while !stop.load(Relaxed) {
                events
                    .dispatch_event(numbered("steady", "x", n))
                    .await
                    .expect("published");
                n += 1;
                published.store(n, Relaxed);
            }
        }
    });
    for attempt in 0..5 {
        // Well into the stream.
        let from = published.load(Relaxed);
        wait_until(|| published.load(Relaxed) >= from + 1_000).await;
        let before = published.load(Relaxed);
        let confirmed = tokio::time::timeout(
            WAIT,
            events.dispatch_confirmed(numbered("steady", "confirmed", attempt)),
        )
        .await;
        let meanwhile = published.load(Relaxed) - before;
        assert!(
            matches!(confirmed, Ok(Ok(()))),
            "confirmation {attempt} among a steady stream: {confirmed:?}"
        );
        assert!(
            meanwhile <= 16 * 4096,
            "confirmation {attempt} was answered after {meanwhile} later publishes"
        );
    }
    stop.store(true, Relaxed);
    publisher.await.expect("publisher");
    events.close().await;
}

/// The Redis example (`examples/redis.rs`), run as a user would against a server: its three
/// statuses come back through the full stack. Its URL's password is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_example_gets_its_statuses_back() {
    let server = RedisServer::start();
    assert_eq!(
        server.cli(&["CONFIG", "SET", "requirepass", "s3cret"]),
        "OK"
    );
    let url = format!("redis://:s3cret@127.0.0.1:{}/", server.port());
    let example = std::process::Command::new(common::example_binary("redis"))
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = common::output_within(example, "the redis example", WAIT).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for state in ["queued", "running", "done"] {
        assert!(
            stdout.contains(&format!(
                "session.status:proj_123 -> {{\"state\":\"{state}\"}}"
            )),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("subscribed on redis://:***@127.0.0.1:"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stdout.contains("s3cret") && !stderr.contains("s3cret"),
        "{stdout}{stderr}"
    );
}

/// A server that closes idle clients (`timeout 1`; subscribers are exempt) does not close the
/// publish connection of a target that publishes rarely: it is pinged when idle. The next
/// publish goes out on it, with no reconnect and no gap for the subscribers (the publish
/// failed, the whole transport was rebuilt, and its subscribers heard of a gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_publish_connection_is_kept_alive_on_a_server_that_closes_idle_clients() {
    let server = RedisServer::start_with(&["--timeout", "1"]);
    let events = stack(&server.url(), "", 16);
    let mut subscription = events.subscribe("idle:1").await.unwrap();
    events
        .dispatch_confirmed(numbered("idle", "1", 0))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(0));
    // Idle for longer than the server lets a client be (it checks about ten times a second).
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    events
        .dispatch_confirmed(numbered("idle", "1", 1))
        .await
        .unwrap();
    assert_eq!(next_gap_or_event(&mut subscription).await, Ok(1));
    assert_eq!(events.stats().reconnects, 0, "{:?}", events.stats());
}
