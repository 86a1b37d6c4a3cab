//! The tower layers, each alone over an in-memory raw transport, and composed under an
//! EventTarget with faults on command.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alkdev_pubsub::layers::codec::{Codec, CodecLayer, Json, WithCodec};
use alkdev_pubsub::layers::parse_error::ParseErrorLayer;
use alkdev_pubsub::layers::prefix::{Prefix, PrefixLayer};
use alkdev_pubsub::layers::reconnect::{
    Backoff, ConnectionState, MakeTransport, Reconnect, ReconnectLayer,
};
use alkdev_pubsub::testkit::{self, number_of, numbered, BrokerConnection, MemoryBroker};
use alkdev_pubsub::{Command, Envelope, ErrorKind, EventTarget, Gap, SubscribeOptions, Topic, Up};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tower::ServiceBuilder;

mod common;

const WAIT: Duration = Duration::from_secs(20);

async fn next_up<S>(stream: &mut S) -> S::Item
where
    S: futures::Stream + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an item in time")
        .expect("the stream is open")
}

// ---------------------------------------------------------------- codec

#[tokio::test]
async fn codec_encodes_exactly_the_contract_and_decodes_strictly() {
    let broker = MemoryBroker::new();
    let mut transport: WithCodec<_, Json, Value> = WithCodec::new(broker.connect().unwrap(), Json);
    transport
        .send(Command::Subscribe("t:1".into()))
        .await
        .unwrap();
    assert!(matches!(next_up(&mut transport).await, Ok(Up::Subscribed(t)) if t == "t:1"));

    let envelope = Envelope::new("t", "1", json!({ "b": 2, "a": [1.5, "x", null] }));
    transport
        .send(Command::Publish {
            topic: "t:1".into(),
            message: envelope.clone(),
        })
        .await
        .unwrap();
    let (_, wire) = broker.published().pop().unwrap();
    assert_eq!(
        wire,
        Bytes::from_static(br#"{"type":"t","id":"1","payload":{"b":2,"a":[1.5,"x",null]}}"#)
    );
    match next_up(&mut transport).await {
        Ok(Up::Message { channel, message }) => {
            assert_eq!(channel.as_deref(), Some("t:1"));
            assert_eq!(message, envelope);
        }
        other => panic!("expected the envelope back, got {other:?}"),
    }

    let cases: Vec<(&[u8], Option<Envelope>)> = vec![
        (
            br#"{"type":"t","id":"1"}"#,
            Some(Envelope::new("t", "1", Value::Null)),
        ),
        (
            br#"{"extra":true,"id":"1","payload":3,"type":"t"}"#,
            Some(Envelope::new("t", "1", json!(3))),
        ),
        (b"not json", None),
        (b"[1,2]", None),
        (b"\"a string\"", None),
        (br#"{"type":1,"id":"1"}"#, None),
        (br#"{"type":"t","id":null}"#, None),
        (br#"{"type":"t"}"#, None),
        (br#"{"type":"t","id":"1","type":"u"}"#, None),
        (b"{\"type\":\"t\xff\",\"id\":\"1\"}", None),
        (br#"{"type":"t","id":"1"} trailing"#, None),
    ];
    for (frame, expected) in cases {
        broker.inject("t:1", Bytes::copy_from_slice(frame));
        match (next_up(&mut transport).await, expected) {
            (Ok(Up::Message { message, .. }), Some(expected)) => assert_eq!(message, expected),
            (Err(error), None) => {
                assert_eq!(error.kind(), ErrorKind::Decode, "{error}");
                assert_eq!(error.channel().map(Topic::as_str), Some("t:1"));
                assert_eq!(error.frame().map(|f| &f[..]), Some(frame));
                assert!(
                    error.to_string().contains("t:1"),
                    "the error names the channel: {error}"
                );
            }
            (got, expected) => panic!(
                "{:?}: expected {expected:?}, got {got:?}",
                String::from_utf8_lossy(frame)
            ),
        }
    }
}

/// A user's codec: `v1:` and then the JSON envelope.
#[derive(Clone, Debug)]
struct Versioned;

impl Codec<Value> for Versioned {
    type Error = String;
    fn encode(&self, envelope: &Envelope) -> Result<Bytes, String> {
        let mut frame = b"v1:".to_vec();
        serde_json::to_writer(&mut frame, envelope).map_err(|e| e.to_string())?;
        Ok(frame.into())
    }
    fn decode(&self, _: Option<&Topic>, frame: &Bytes) -> Result<Envelope, String> {
        let body = frame.strip_prefix(b"v1:").ok_or("not a v1 frame")?;
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

#[tokio::test]
async fn a_user_codec_plugs_in() {
    let broker = MemoryBroker::new();
    let connection = broker.connect().unwrap();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::new(Versioned))
        .service(connection);
    let events = EventTarget::new(transport);
    let mut subscription = events.subscribe("v:1").await.unwrap();
    events.dispatch_event(numbered("v", "1", 1)).await.unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);
    assert!(broker.published()[0].1.starts_with(b"v1:{\"type\":\"v\""));
    broker.inject("v:1", r#"{"type":"v","id":"1","payload":{"n":2}}"#); // no version: refused
    broker.inject("v:1", r#"v1:{"type":"v","id":"1","payload":{"n":3}}"#);
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 3);
    assert_eq!(events.stats().decode_errors, 1);
}

// ---------------------------------------------------------------- prefix

#[tokio::test]
async fn prefix_adds_strips_and_drops_foreign_channels() {
    let broker = MemoryBroker::new();
    let mut transport = Prefix::new(broker.connect().unwrap(), "alk:events:");
    transport
        .send(Command::Subscribe("a:1".into()))
        .await
        .unwrap();
    assert!(matches!(next_up(&mut transport).await, Ok(Up::Subscribed(t)) if t == "a:1"));
    assert!(broker.channels().contains(&Topic::from("alk:events:a:1")));

    transport
        .send(Command::Publish {
            topic: "a:1".into(),
            message: Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
    assert_eq!(broker.published()[0].0, "alk:events:a:1");
    match next_up(&mut transport).await {
        Ok(Up::Message { channel, .. }) => assert_eq!(channel.as_deref(), Some("a:1")),
        other => panic!("{other:?}"),
    }

    // A channel outside the prefix reaches the raw connection (subscribed underneath).
    transport
        .get_mut()
        .send(Command::Subscribe("other:a:1".into()))
        .await
        .unwrap();
    assert!(matches!(
        next_up(&mut transport).await,
        Ok(Up::Subscribed(_))
    ));
    broker.inject("other:a:1", "y");
    match next_up(&mut transport).await {
        Ok(Up::Skipped(error)) => assert_eq!(error.kind(), ErrorKind::ForeignChannel),
        other => panic!("expected a skipped foreign message, got {other:?}"),
    }
    assert_eq!(transport.foreign().get(), 1);
}

#[tokio::test]
async fn two_prefixes_nest_outer_inside_inner() {
    let broker = MemoryBroker::new();
    let transport = ServiceBuilder::new()
        .layer(CodecLayer::json())
        .layer(PrefixLayer::new("app:"))
        .layer(PrefixLayer::new("tenant7:"))
        .service(broker.connect().unwrap());
    let events = EventTarget::new(transport);
    let mut subscription = events.subscribe("chat:1").await.unwrap();
    assert_eq!(
        broker.channels(),
        [Topic::from("tenant7:app:chat:1")].into_iter().collect()
    );
    events
        .dispatch_event(numbered("chat", "1", 5))
        .await
        .unwrap();
    let event = testkit::next_event(&mut subscription).await;
    assert_eq!(number_of(&event), 5);
    assert_eq!(broker.published()[0].0, "tenant7:app:chat:1");
}

// ---------------------------------------------------------------- parse errors

fn bad_frames() -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"not json at all"),
        Bytes::from_static(br#"{"type":["wrong"],"id":"1"}"#),
        Bytes::from_static(b"{\"type\":\"p\",\"id\":\"\xc3\x28\"}"),
        Bytes::from(vec![b'#'; 1 << 20]),
        Bytes::from_static(b"[]"),
    ]
}

#[tokio::test]
async fn malformed_frames_interleaved_with_good_ones_are_skipped_counted_and_quarantined() {
    let broker = MemoryBroker::new();
    let quarantined = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&quarantined);
    let layer = ParseErrorLayer::quarantine(move |error| {
        seen.lock()
            .unwrap()
            .push((error.channel().cloned(), error.frame().cloned()));
    });
    let skipped = layer.skipped();
    let transport = ServiceBuilder::new()
        .layer(layer)
        .layer(CodecLayer::json())
        .service(broker.connect().unwrap());
    let events = EventTarget::new(transport);
    let mut subscription = events.subscribe("p:1").await.unwrap();
    let bad = bad_frames();
    for (n, frame) in bad.iter().enumerate() {
        broker.inject("p:1", frame.clone());
        broker.inject(
            "p:1",
            serde_json::to_vec(&numbered("p", "1", n as u64)).unwrap(),
        );
    }
    for n in 0..bad.len() as u64 {
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
    }
    assert_eq!(events.stats().decode_errors, bad.len() as u64);
    assert_eq!(skipped.get(), bad.len() as u64);
    let quarantined = quarantined.lock().unwrap();
    assert_eq!(quarantined.len(), bad.len());
    for ((channel, frame), expected) in quarantined.iter().zip(&bad) {
        assert_eq!(channel.as_deref(), Some("p:1"));
        assert_eq!(
            frame.as_ref(),
            Some(expected),
            "the quarantine gets the whole raw frame"
        );
    }
}

#[tokio::test]
async fn surfaced_decode_errors_are_counted_and_the_stream_goes_on() {
    let broker = MemoryBroker::new();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::surface())
        .layer(CodecLayer::json())
        .service(broker.connect().unwrap());
    let events = EventTarget::new(transport);
    let mut subscription = events.subscribe("s:1").await.unwrap();
    broker.inject("s:1", "{");
    broker.inject("s:1", serde_json::to_vec(&numbered("s", "1", 9)).unwrap());
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 9);
    assert_eq!(events.stats().decode_errors, 1);
}

// ---------------------------------------------------------------- reconnect

/// The full stack over the broker, reconnecting fast.
fn full_stack(broker: &MemoryBroker, reconnect: ReconnectLayer) -> EventTarget {
    let broker = broker.clone();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(PrefixLayer::new("alk:events:"))
        .layer(reconnect)
        .service(move || {
            let broker = broker.clone();
            async move { broker.connect() }
        });
    EventTarget::new(transport)
}

fn fast_backoff() -> Backoff {
    Backoff::new()
        .initial(Duration::from_millis(2))
        .max(Duration::from_millis(20))
        .jitter(0.0)
}

/// The reconnect layer alone, over `broker`'s connections.
fn reconnecting(
    broker: &MemoryBroker,
) -> Reconnect<impl MakeTransport<Transport = BrokerConnection>, Bytes> {
    use tower::Layer;
    let broker = broker.clone();
    ReconnectLayer::new(fast_backoff()).layer(move || {
        let broker = broker.clone();
        async move { broker.connect() }
    })
}

/// The transport contract answers commands in their order, also when the connection is lost
/// with both unanswered: a subscribe, then an unsubscribe of the same topic.
#[tokio::test]
async fn after_a_loss_a_subscribe_is_answered_before_the_unsubscribe_that_followed_it() {
    let broker = MemoryBroker::new();
    let mut transport = reconnecting(&broker);
    transport
        .feed(Command::Subscribe(Topic::from("order:1")))
        .await
        .unwrap();
    transport
        .feed(Command::Unsubscribe(Topic::from("order:1")))
        .await
        .unwrap();
    broker.kill_connections();
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match tokio::time::timeout(WAIT, transport.next()).await.unwrap() {
            Some(Ok(Up::Subscribed(topic))) => answers.push(format!("subscribed {topic}")),
            Some(Ok(Up::Unsubscribed(topic))) => answers.push(format!("unsubscribed {topic}")),
            Some(Ok(Up::Reconnected)) => {}
            other => panic!("expected the two answers, got {other:?}"),
        }
    }
    assert_eq!(answers, ["subscribed order:1", "unsubscribed order:1"]);
}

/// A topic left and subscribed again while its replay after a reconnect is unanswered, then
/// refused: the new subscribe gets one answer (its own refusal), not a second one made up for
/// the replay, which would be taken for the answer of the next subscribe.
#[tokio::test]
async fn a_refused_replay_of_a_topic_subscribed_again_meanwhile_answers_once() {
    let broker = MemoryBroker::new();
    let mut transport = reconnecting(&broker);
    transport
        .send(Command::Subscribe(Topic::from("again:1")))
        .await
        .unwrap();
    assert!(matches!(
        next_up(&mut transport).await,
        Ok(Up::Subscribed(_))
    ));
    broker.refuse_channel("again:1");
    broker.kill_connections();
    // The sink notices the loss, reconnects and sends the replay; nothing is read yet.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        transport.flush().await.unwrap();
        if transport.state() == ConnectionState::Connected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconnected in time"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Sent now, while the replay's answer waits unread.
    transport
        .feed(Command::Unsubscribe(Topic::from("again:1")))
        .await
        .unwrap();
    transport
        .feed(Command::Subscribe(Topic::from("again:1")))
        .await
        .unwrap();
    transport
        .send(Command::Subscribe(Topic::from("after:1")))
        .await
        .unwrap();
    let mut answers = Vec::new();
    loop {
        match next_up(&mut transport).await {
            Ok(Up::Subscribed(topic)) if topic == "after:1" => break,
            Ok(Up::Reconnected) => {}
            Ok(Up::Unsubscribed(topic)) => answers.push(format!("unsubscribed {topic}")),
            Ok(Up::SubscribeFailed(topic, _)) => answers.push(format!("refused {topic}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(answers, ["unsubscribed again:1", "refused again:1"]);
}

/// A publish buffered through an outage and refused for good when the layer replays it
/// (too large for the new connection) is reported to the caller waiting for it, not
/// confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_publish_refused_on_replay_is_reported() {
    let broker = MemoryBroker::new();
    broker.set_max_message(Some(200));
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let mut subscription = events.subscribe("replay:1").await.unwrap();
    broker.set_accepting(false);
    broker.kill_connections();
    let big = Envelope::new("replay", "1", json!({ "n": 0, "pad": "x".repeat(500) }));
    let confirming = events.clone();
    let big = tokio::spawn(async move { confirming.dispatch_confirmed(big).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.set_accepting(true);
    let error = tokio::time::timeout(WAIT, big)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    assert_eq!(testkit::next_gap(&mut subscription).await, Gap::Reconnected);
    events
        .dispatch_confirmed(numbered("replay", "1", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 1);
    assert!(
        broker
            .published()
            .iter()
            .all(|(_, frame)| frame.len() <= 200),
        "the refused publish never reached the broker"
    );
}

/// What a [`Faulty`] connection does wrong, shared by the connections a factory makes.
#[derive(Default)]
struct ConnFaults {
    /// Confirmations of subscribes to `slow` wait while this is set.
    gate_shut: bool,
    /// The reading task, woken when the gate opens.
    reader: Option<std::task::Waker>,
    /// Subscribes to these are refused by `start_send` (an error of kind `Rejected`).
    refused: std::collections::HashSet<Topic>,
    /// The next flush finds the connection gone (only the writing side learns of it).
    cut_flush: bool,
}

/// A broker connection with [`ConnFaults`].
struct Faulty {
    inner: BrokerConnection,
    faults: Arc<Mutex<ConnFaults>>,
    stashed: Option<Up<Bytes>>,
}

impl ConnFaults {
    fn open_gate(faults: &Mutex<ConnFaults>) {
        let mut faults = faults.lock().unwrap();
        faults.gate_shut = false;
        faults.reader.take().expect("the reader waits").wake();
    }
}

/// The reconnect layer over [`Faulty`] connections to `broker`.
fn faulty(
    broker: &MemoryBroker,
    faults: &Arc<Mutex<ConnFaults>>,
) -> Reconnect<impl MakeTransport<Transport = Faulty>, Bytes> {
    use tower::Layer;
    let broker = broker.clone();
    let faults = Arc::clone(faults);
    ReconnectLayer::new(fast_backoff()).layer(move || {
        let connection = broker.connect().map(|inner| Faulty {
            inner,
            faults: Arc::clone(&faults),
            stashed: None,
        });
        async move { connection }
    })
}

impl futures::Sink<Command<Bytes>> for Faulty {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::pin::Pin::new(&mut self.inner).poll_ready(cx)
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        command: Command<Bytes>,
    ) -> Result<(), Self::Error> {
        if let Command::Subscribe(topic) = &command {
            if self.faults.lock().unwrap().refused.contains(topic) {
                return Err(alkdev_pubsub::Error::new(
                    ErrorKind::Rejected,
                    format!("refused to send a subscribe to {topic}"),
                ));
            }
        }
        std::pin::Pin::new(&mut self.inner).start_send(command)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if std::mem::take(&mut self.faults.lock().unwrap().cut_flush) {
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::connection_lost(
                "the flush found the connection gone",
            )));
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

impl futures::Stream for Faulty {
    type Item = alkdev_pubsub::Result<Up<Bytes>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        let open = {
            let mut faults = this.faults.lock().unwrap();
            faults.reader = Some(cx.waker().clone());
            !faults.gate_shut
        };
        if open {
            if let Some(up) = this.stashed.take() {
                return Poll::Ready(Some(Ok(up)));
            }
        }
        loop {
            match std::pin::Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(Up::Subscribed(topic)))) if !open && topic == "slow" => {
                    this.stashed = Some(Up::Subscribed(topic));
                }
                other => return other,
            }
        }
    }
}

/// Split between a reading task and a writing one (`StreamExt::split`), the layer goes on when
/// the writing side finds the connection gone: the reader, which waited on the connection the
/// writer replaced (dropped, with its waker), is woken and reads the new one, and hears what is
/// published on it. It heard nothing more.
#[tokio::test]
async fn split_a_connection_the_writer_replaced_is_read_by_the_reader() {
    let tasks = tokio::task::LocalSet::new();
    tasks.run_until(split_a_connection_replaced(&tasks)).await;
}

async fn split_a_connection_replaced(tasks: &tokio::task::LocalSet) {
    let broker = MemoryBroker::new();
    let faults = Arc::new(Mutex::new(ConnFaults::default()));
    let (mut sink, mut stream) = faulty(&broker, &faults).split();
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    tasks.spawn_local(async move {
        while let Some(up) = stream.next().await {
            let up = match up {
                Ok(Up::Message { message, .. }) => {
                    format!("message {}", String::from_utf8_lossy(&message))
                }
                Ok(up) => format!("{up:?}"),
                Err(error) => format!("error {error}"),
            };
            if got_tx.send(up).is_err() {
                break;
            }
        }
    });
    async fn next(got: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(WAIT, got.recv())
            .await
            .expect("the reader hears on")
            .expect("the reader is there")
    }
    sink.send(Command::Subscribe(Topic::from("t:1")))
        .await
        .unwrap();
    assert!(next(&mut got).await.starts_with("Subscribed"));
    faults.lock().unwrap().cut_flush = true;
    // The flush finds the connection gone: the layer connects anew, replays the subscription,
    // and sends the publish on the new connection.
    sink.send(Command::Publish {
        topic: Topic::from("t:1"),
        message: Bytes::from_static(b"after"),
    })
    .await
    .unwrap();
    let mut heard = Vec::new();
    while !heard.iter().any(|up: &String| up.starts_with("message")) {
        heard.push(next(&mut got).await);
    }
    assert!(heard.iter().any(|up| up == "Reconnected"), "{heard:?}");
    assert_eq!(heard.last().unwrap(), "message after", "{heard:?}");
}

/// Subscribes `topics` through `transport`, then kills the broker's connections with the
/// confirmation of `slow` withheld. Once this returns, the layer has reconnected and replayed
/// its `channels` topics: all are in effect, and all but `slow` confirmed again.
async fn replaying_with_slow_unconfirmed<S>(
    transport: &mut S,
    broker: &MemoryBroker,
    faults: &Mutex<ConnFaults>,
    topics: &[&str],
    channels: usize,
) where
    S: futures::Sink<Command<Bytes>, Error = alkdev_pubsub::Error>
        + futures::Stream<Item = alkdev_pubsub::Result<Up<Bytes>>>
        + Unpin,
{
    for topic in topics {
        transport
            .send(Command::Subscribe(Topic::from(*topic)))
            .await
            .unwrap();
        assert!(matches!(next_up(transport).await, Ok(Up::Subscribed(_))));
    }
    faults.lock().unwrap().gate_shut = true;
    broker.kill_connections();
    // Reading drives the reconnect and the replay.
    while broker.channels().len() < channels {
        let nothing = tokio::time::timeout(Duration::from_millis(20), transport.next()).await;
        assert!(nothing.is_err(), "nothing to tell yet: {nothing:?}");
    }
}

/// After a reconnect, a message on a topic whose replay is confirmed, while another topic's is
/// not, waits for the reconnect notice and follows it; past 1,024 such messages (or 32 MiB of
/// them) the notice goes at once, and every message after it in order.
#[tokio::test]
async fn messages_that_come_before_the_replay_is_confirmed_follow_the_reconnect_notice() {
    for (messages, pad) in [(1u64, 0), (1_025, 0), (3, 16 << 20)] {
        let payload = |n: u64| format!("{n}{}", "x".repeat(pad));
        let broker = MemoryBroker::new();
        let faults = Arc::new(Mutex::new(ConnFaults::default()));
        let mut transport = faulty(&broker, &faults);
        replaying_with_slow_unconfirmed(&mut transport, &broker, &faults, &["fast", "slow"], 2)
            .await;
        for n in 0..messages {
            broker.inject("fast", payload(n));
        }
        let early = tokio::time::timeout(Duration::from_millis(100), transport.next()).await;
        if messages == 1 {
            assert!(
                early.is_err(),
                "the message waits for the notice: {early:?}"
            );
            ConnFaults::open_gate(&faults);
        } else {
            assert!(
                matches!(early, Ok(Some(Ok(Up::Reconnected)))),
                "held messages bring the notice forward: {early:?}"
            );
        }
        if messages == 1 {
            assert!(matches!(next_up(&mut transport).await, Ok(Up::Reconnected)));
        }
        for n in 0..messages {
            match next_up(&mut transport).await {
                Ok(Up::Message { message, .. }) => assert!(message == payload(n), "message {n}"),
                other => panic!("message {n}: {other:?}"),
            }
        }
    }
}

/// Reads `transport` until it is quiet for 100 ms or ends: what it told, as debug text.
async fn told_until_quiet<S>(transport: &mut S) -> Vec<String>
where
    S: futures::Stream + Unpin,
    S::Item: std::fmt::Debug,
{
    let mut told = Vec::new();
    while let Ok(item) = tokio::time::timeout(Duration::from_millis(100), transport.next()).await {
        match item {
            Some(item) => told.push(format!("{item:?}")),
            None => {
                told.push("end".to_owned());
                break;
            }
        }
    }
    told
}

/// A held message of a topic comes before that topic's unsubscribe answer, as the transport
/// told them; closing tells what is still held.
#[tokio::test]
async fn held_messages_keep_their_place_before_an_unsubscribe_and_through_a_close() {
    let broker = MemoryBroker::new();
    let faults = Arc::new(Mutex::new(ConnFaults::default()));
    let mut transport = faulty(&broker, &faults);
    replaying_with_slow_unconfirmed(&mut transport, &broker, &faults, &["fast", "slow"], 2).await;
    broker.inject("fast", "1");
    transport
        .send(Command::Unsubscribe(Topic::from("fast")))
        .await
        .unwrap();
    assert_eq!(told_until_quiet(&mut transport).await, Vec::<String>::new());
    ConnFaults::open_gate(&faults);
    assert_eq!(
        told_until_quiet(&mut transport).await,
        [
            "Ok(Reconnected)",
            "Ok(Message { channel: Some(\"fast\"), message: b\"1\" })",
            "Ok(Unsubscribed(\"fast\"))",
        ]
    );

    // Held when the stack is closed: still told, after the notice.
    replaying_with_slow_unconfirmed(&mut transport, &broker, &faults, &["fast"], 2).await;
    broker.inject("fast", "2");
    assert_eq!(told_until_quiet(&mut transport).await, Vec::<String>::new());
    transport.close().await.unwrap();
    assert_eq!(
        told_until_quiet(&mut transport).await,
        [
            "Ok(Reconnected)",
            "Ok(Message { channel: Some(\"fast\"), message: b\"2\" })",
            "end",
        ]
    );
}

/// A subscribe the transport refuses as it is handed over (not a lost connection) is not
/// in effect: it is not replayed after a reconnect, which goes on to its notice. One that
/// passed, and is refused that way when replayed, ends with a `SubscribeFailed` told
/// unprompted, and the notice still comes.
#[tokio::test]
async fn a_subscribe_refused_when_handed_over_is_not_replayed_and_a_refused_replay_is_told() {
    let broker = MemoryBroker::new();
    let faults = Arc::new(Mutex::new(ConnFaults::default()));
    let mut transport = faulty(&broker, &faults);
    transport
        .send(Command::Subscribe(Topic::from("kept")))
        .await
        .unwrap();
    assert!(matches!(
        next_up(&mut transport).await,
        Ok(Up::Subscribed(_))
    ));
    transport
        .send(Command::Subscribe(Topic::from("flaky")))
        .await
        .unwrap();
    assert!(matches!(
        next_up(&mut transport).await,
        Ok(Up::Subscribed(_))
    ));
    faults.lock().unwrap().refused.insert(Topic::from("bad"));
    let refused = transport
        .send(Command::Subscribe(Topic::from("bad")))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Rejected, "{refused}");
    // `flaky` is refused from now on too: its replay fails.
    faults.lock().unwrap().refused.insert(Topic::from("flaky"));
    broker.kill_connections();
    let told = told_until_quiet(&mut transport).await;
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(
        told[0].starts_with("Ok(SubscribeFailed(\"flaky\""),
        "{told:?}"
    );
    assert_eq!(told[1], "Ok(Reconnected)");
    assert_eq!(
        broker.channels(),
        std::collections::HashSet::from([Topic::from("kept")])
    );
}

/// A close that fails (the connection died unnoticed) still closes the layer: its state is
/// `Closed`, its stream ends, and it does not connect again.
#[tokio::test]
async fn a_failed_close_still_closes_the_layer() {
    use tower::Layer;
    let broker = MemoryBroker::new();
    let layer = ReconnectLayer::new(fast_backoff());
    let state = layer.state();
    let mut transport = layer.layer({
        let broker = broker.clone();
        move || {
            let broker = broker.clone();
            async move { broker.connect() }
        }
    });
    transport
        .send(Command::Subscribe(Topic::from("t")))
        .await
        .unwrap();
    assert!(matches!(
        next_up(&mut transport).await,
        Ok(Up::Subscribed(_))
    ));
    broker.kill_connections();
    let closed = transport.close().await;
    assert!(closed.is_err(), "{closed:?}");
    assert_eq!(*state.borrow(), ConnectionState::Closed);
    let end = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    assert_eq!(broker.connects(), 1);
}

/// A subscription that has read the notice of one reconnect, and had no event since, is told
/// of the next one too: what was published during it is lost to it as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconnect_of_a_quiet_topic_is_told_too() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let mut subscription = events.subscribe("quiet:1").await.unwrap();
    for reconnect in 1..=3u64 {
        broker.kill_connections();
        assert_eq!(
            testkit::next_gap(&mut subscription).await,
            Gap::Reconnected,
            "reconnect {reconnect}"
        );
    }
    assert_eq!(events.stats().reconnects, 3);
}

/// A topic the broker refuses when the layer subscribes it again after a reconnect (an access
/// rule changed meanwhile) ends its subscriptions, rather than leave them waiting for events
/// that no longer come. The other topics go on, and subscribing the topic again asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_refused_when_subscribed_again_after_a_reconnect_ends_its_subscriptions() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let mut denied = events.subscribe("acl:denied").await.unwrap();
    let mut kept = events.subscribe("acl:kept").await.unwrap();
    events
        .dispatch_confirmed(numbered("acl", "denied", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut denied).await), 1);

    broker.refuse_channel("alk:events:acl:denied");
    broker.kill_connections();
    testkit::next_end(&mut denied).await;
    assert_eq!(testkit::next_gap(&mut kept).await, Gap::Reconnected);
    events
        .dispatch_confirmed(numbered("acl", "kept", 2))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut kept).await), 2);

    let again = tokio::time::timeout(WAIT, events.subscribe("acl:denied"))
        .await
        .expect("an answer in time");
    let error = again.expect_err("the broker still refuses the topic");
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
}

/// A subscription in effect that the transport drops for good on its own (as the Redis
/// Cluster transport does when a node refuses a channel it takes back) ends; the others go on,
/// with no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_the_transport_drops_for_good_ends_and_the_others_go_on() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let mut gone = events.subscribe("revoked:gone").await.unwrap();
    let mut kept = events.subscribe("revoked:kept").await.unwrap();
    broker.revoke_channel("alk:events:revoked:gone");
    let end = tokio::time::timeout(WAIT, gone.next())
        .await
        .expect("the dropped subscription ends in time");
    assert!(end.is_none(), "expected the end, got {end:?}");
    events
        .dispatch_confirmed(numbered("revoked", "kept", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut kept).await), 1);
    assert_eq!(events.stats().reconnects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_replayed_after_each_of_five_reconnects() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&gaps);
    events.add_gap_listener(move |gap| seen.lock().unwrap().push(gap));
    let mut subscriptions = Vec::new();
    for t in 0..10 {
        subscriptions.push(
            events
                .subscribe(Topic::of("r", &t.to_string()))
                .await
                .unwrap(),
        );
    }
    for round in 0..5u64 {
        broker.kill_connections();
        for subscription in &mut subscriptions {
            assert_eq!(
                testkit::next_gap(subscription).await,
                Gap::Reconnected,
                "round {round}"
            );
        }
        let expected: std::collections::HashSet<Topic> = (0..10)
            .map(|t| Topic::from(format!("alk:events:r:{t}")))
            .collect();
        assert_eq!(
            broker.channels(),
            expected,
            "round {round}: every subscription replayed"
        );
        for (t, subscription) in subscriptions.iter_mut().enumerate() {
            events
                .dispatch_event(numbered("r", &t.to_string(), round))
                .await
                .unwrap();
            assert_eq!(number_of(&testkit::next_event(subscription).await), round);
        }
    }
    assert_eq!(events.stats().reconnects, 5);
    assert_eq!(broker.connects(), 6);
    assert_eq!(
        *gaps.lock().unwrap(),
        vec![Gap::Reconnected; 5],
        "callbacks learn of it too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_publishes_across_three_outages_arrive_in_order() {
    let broker = MemoryBroker::new();
    // The subscriber has its own connection, which the outages spare.
    let subscriber_connection = broker.connect().unwrap();
    let subscriber_id = subscriber_connection.id();
    let subscriber = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .service(subscriber_connection),
    );
    let mut subscription = subscriber
        .subscribe_with("seq:1", SubscribeOptions::new().capacity(20_000))
        .await
        .unwrap();

    // Room for what the outage catches in flight (the event target's queue of 1,024, what the
    // driver fed and had not flushed, what the last reconnect had not sent yet: on a loaded
    // machine a few thousand) and the 1,000 published during it.
    let reconnect = ReconnectLayer::new(fast_backoff()).buffer(16_384);
    let state = reconnect.state();
    let publisher = full_stack(&broker, reconnect);
    // Connected before the first outage, so that each outage is a reconnect.
    publisher
        .dispatch_confirmed(numbered("seq", "1", 0))
        .await
        .unwrap();
    let mut n = 1u64;
    for _outage in 0..3 {
        while n % 3_000 != 2_000 {
            publisher
                .dispatch_event(numbered("seq", "1", n))
                .await
                .unwrap();
            n += 1;
        }
        // Down: the connection dies, new ones are refused for a while.
        broker.set_accepting(false);
        broker.kill_where(|id| id != subscriber_id);
        let mut watch = state.clone();
        tokio::time::timeout(
            WAIT,
            watch.wait_for(|s| matches!(s, ConnectionState::Waiting { .. })),
        )
        .await
        .expect("the publisher notices the outage")
        .unwrap();
        for _ in 0..1_000 {
            publisher
                .dispatch_event(numbered("seq", "1", n))
                .await
                .unwrap();
            n += 1;
        }
        broker.set_accepting(true);
        tokio::time::timeout(WAIT, watch.wait_for(|s| *s == ConnectionState::Connected))
            .await
            .expect("the publisher reconnects")
            .unwrap();
    }
    for _ in 0..1_000 {
        publisher
            .dispatch_event(numbered("seq", "1", n))
            .await
            .unwrap();
        n += 1;
    }
    assert_eq!(n, 10_000);
    for expected in 0..n {
        let event = testkit::next_event(&mut subscription).await;
        assert_eq!(
            number_of(&event),
            expected,
            "lost or reordered across an outage: {:?}",
            publisher.stats()
        );
    }
    let stats = publisher.stats();
    assert_eq!(stats.publish_failed, 0, "{stats:?}");
    assert_eq!(stats.reconnects, 3, "{stats:?}");
    assert_eq!(subscriber.stats().delivered, 10_000);
}

/// The full stack over `broker` through `reconnect`, connected (a confirmed publish of `b:1`
/// number 0 went out), then down: the broker refuses connections, and the layer waits to try
/// again. Also returns the layer's state.
async fn connected_then_down(
    broker: &MemoryBroker,
    reconnect: ReconnectLayer,
) -> (EventTarget, tokio::sync::watch::Receiver<ConnectionState>) {
    let mut state = reconnect.state();
    let events = full_stack(broker, reconnect);
    events
        .dispatch_confirmed(numbered("b", "1", 0))
        .await
        .unwrap();
    broker.set_accepting(false);
    broker.kill_connections();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Waiting { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    (events, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_buffer_bound_publishes_fail_with_unavailable_and_are_counted() {
    let broker = MemoryBroker::new();
    let reconnect = ReconnectLayer::new(fast_backoff()).buffer(100);
    let refused = reconnect.unavailable();
    let (events, mut watch) = connected_then_down(&broker, reconnect).await;
    for n in 0..100 {
        events.dispatch_event(numbered("b", "1", n)).await.unwrap();
    }
    let mut errors = Vec::new();
    for n in 100..110 {
        errors.push(
            events
                .dispatch_confirmed(numbered("b", "1", n))
                .await
                .unwrap_err(),
        );
    }
    for error in &errors {
        assert!(error.is_unavailable(), "{error}");
        assert!(
            error
                .to_string()
                .contains("buffer of 100 publishes is full"),
            "{error}"
        );
        // It says why the transport is down (the connection the broker killed, or an attempt
        // it refused since), and gives that error as its source.
        assert!(error.to_string().contains("; last failure: "), "{error}");
        let source = std::error::Error::source(error).expect("a source");
        assert!(
            source
                .to_string()
                .contains("memory broker connection 0 was killed")
                || source
                    .to_string()
                    .contains("the memory broker refuses connections"),
            "{source}"
        );
    }
    assert_eq!(refused.get(), 10);
    assert_eq!(events.stats().publish_failed, 10);
    // What was buffered still goes out after the outage.
    broker.set_accepting(true);
    tokio::time::timeout(WAIT, watch.wait_for(|s| *s == ConnectionState::Connected))
        .await
        .unwrap()
        .unwrap();
    events
        .dispatch_confirmed(numbered("b", "1", 999))
        .await
        .unwrap();
    let delivered: Vec<u64> = broker
        .published()
        .iter()
        .map(|(_, frame)| number_of(&serde_json::from_slice::<Envelope>(frame).unwrap()))
        .collect();
    let mut expected = vec![0];
    expected.extend(0..100);
    expected.push(999);
    assert_eq!(delivered, expected);
}

/// Connections whose flush can be made to fail with a retryable error, and which can be cut:
/// what a flush delivers goes to `delivered`.
#[derive(Clone, Default)]
struct Faults {
    delivered: Arc<Mutex<Vec<Bytes>>>,
    busy_flush: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// Failures the next flushes report, in order (what they covered is lost).
    failing_flushes: Arc<Mutex<std::collections::VecDeque<alkdev_pubsub::Error>>>,
}

struct FaultyConnection {
    faults: Faults,
    pending: Vec<Bytes>,
}

impl FaultyConnection {
    fn alive(&self) -> alkdev_pubsub::Result<()> {
        use std::sync::atomic::Ordering;
        match self.faults.cut.swap(false, Ordering::SeqCst) {
            true => Err(alkdev_pubsub::Error::connection_lost("cut by the test")),
            false => Ok(()),
        }
    }
}

impl futures::Sink<Command<Bytes>> for FaultyConnection {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(self.alive())
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        command: Command<Bytes>,
    ) -> alkdev_pubsub::Result<()> {
        if let Command::Publish { message, .. } = command {
            self.pending.push(message);
        }
        Ok(())
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        use std::sync::atomic::Ordering;
        if self.faults.busy_flush.swap(false, Ordering::SeqCst) {
            self.pending.clear();
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(
                ErrorKind::Busy,
                "LOADING: the server is loading its dataset",
            )));
        }
        let failing = self.faults.failing_flushes.lock().unwrap().pop_front();
        if let Some(error) = failing {
            self.pending.clear();
            return std::task::Poll::Ready(Err(error));
        }
        let pending = std::mem::take(&mut self.pending);
        self.faults.delivered.lock().unwrap().extend(pending);
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The `Stream` of raw test connections whose stream never yields.
macro_rules! stream_never_yields {
    ($($connection:ty),*) => {$(
        impl futures::Stream for $connection {
            type Item = alkdev_pubsub::Result<Up<Bytes>>;
            fn poll_next(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                std::task::Poll::Pending
            }
        }
    )*};
}

stream_never_yields!(FaultyConnection, SlowAcks);

/// The reconnect layer over connections with `faults`.
fn reconnecting_over_faults(
    faults: &Faults,
) -> Reconnect<impl MakeTransport<Transport = FaultyConnection>, Bytes> {
    use tower::Layer;
    let faults = faults.clone();
    ReconnectLayer::new(fast_backoff()).layer(move || {
        let faults = faults.clone();
        async move {
            Ok::<_, alkdev_pubsub::Error>(FaultyConnection {
                faults,
                pending: Vec::new(),
            })
        }
    })
}

/// A publish of `text` on topic `t`.
fn publish_on_t(text: &'static str) -> Command<Bytes> {
    Command::Publish {
        topic: Topic::from("t"),
        message: Bytes::from(text),
    }
}

/// A publish whose flush failed with an error the layer reported (a retryable one: the caller
/// learnt of the failure, and may publish it again, or a retry layer does) is not sent again
/// on its own by the next connection: it was answered, and sending it again would deliver what
/// was reported failed, once more per retry.
#[tokio::test]
async fn a_publish_whose_flush_failure_was_reported_is_not_sent_again_after_a_reconnect() {
    use std::sync::atomic::Ordering;
    let faults = Faults::default();
    let mut reconnect = reconnecting_over_faults(&faults);
    reconnect.send(publish_on_t("a")).await.unwrap();
    faults.busy_flush.store(true, Ordering::SeqCst);
    let error = reconnect.send(publish_on_t("b")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Busy, "{error}");
    faults.cut.store(true, Ordering::SeqCst);
    reconnect.send(publish_on_t("c")).await.unwrap();
    assert_eq!(
        *faults.delivered.lock().unwrap(),
        vec![Bytes::from("a"), Bytes::from("c")]
    );
}

/// Once a send of the layer's own was refused for now (the replayed backlog's flush, driven by
/// the reading side, answered `BUSY`), publishes fed before the flush that reports it are not
/// sent: sent, they would arrive before the refused ones a retry layer sends again (it resends
/// everything since the last flush, in order), and then again after them.
#[tokio::test]
async fn publishes_after_a_refused_backlog_flush_wait_for_the_flush_that_reports_it() {
    use std::sync::atomic::Ordering;
    let faults = Faults::default();
    let mut reconnect = reconnecting_over_faults(&faults);
    reconnect.send(publish_on_t("a")).await.unwrap();
    reconnect.feed(publish_on_t("b")).await.unwrap();
    // The connection is lost with `b` unflushed: the next connection gets it from the backlog.
    faults.cut.store(true, Ordering::SeqCst);
    // Finds the connection lost (and takes publishes into its buffer while it is down), then,
    // after the backoff, connects again and hands the new connection `b`.
    for wait in [0, 50] {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        futures::future::poll_fn(|cx| {
            futures::Sink::poll_ready(std::pin::Pin::new(&mut reconnect), cx)
        })
        .await
        .unwrap();
    }
    // The reading side flushes the replayed backlog: refused for now.
    faults.busy_flush.store(true, Ordering::SeqCst);
    loop {
        match futures::poll!(reconnect.next()) {
            std::task::Poll::Ready(Some(Ok(Up::Reconnected))) => {}
            std::task::Poll::Pending => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        !faults.busy_flush.load(Ordering::SeqCst),
        "the backlog was flushed"
    );
    reconnect.feed(publish_on_t("c")).await.unwrap();
    let error = reconnect.flush().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Busy, "{error}");
    assert_eq!(
        *faults.delivered.lock().unwrap(),
        vec![Bytes::from("a")],
        "`c` went out before `b` is sent again"
    );
    // Answered by that flush: what comes next goes out.
    reconnect.send(publish_on_t("d")).await.unwrap();
    assert_eq!(
        *faults.delivered.lock().unwrap(),
        vec![Bytes::from("a"), Bytes::from("d")]
    );
}

/// During an outage, a plain `dispatch_event` past the reconnect layer's buffer gets the
/// refusal itself, not `Ok` and a count: it fed the transport from its own task, so the error
/// is known when the call returns. (On one thread the driver never holds the transport when
/// the test publishes; where it does, the publish is queued and a refusal only counted.)
#[tokio::test]
async fn a_plain_dispatch_past_a_full_buffer_returns_the_refusal() {
    let broker = MemoryBroker::new();
    let backoff = Backoff::new()
        .initial(Duration::from_secs(30))
        .max(Duration::from_secs(30))
        .jitter(0.0);
    let reconnect = ReconnectLayer::new(backoff).buffer(10);
    let refused = reconnect.unavailable();
    let (events, _) = connected_then_down(&broker, reconnect).await;
    for n in 1..=10 {
        events.dispatch_event(numbered("b", "1", n)).await.unwrap();
    }
    for n in 11..=15 {
        let error = events
            .dispatch_event(numbered("b", "1", n))
            .await
            .unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        assert!(
            error.to_string().contains("buffer of 10 publishes is full"),
            "{error}"
        );
    }
    assert_eq!(refused.get(), 5);
    assert_eq!(events.stats().publish_failed, 5);
}

/// Publishing starts before the first connection is up: a burst larger than the buffer waits
/// for that connection instead of being refused (nothing has failed yet: there is no outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_before_the_first_connection_waits_for_it_and_loses_nothing() {
    let broker = MemoryBroker::new();
    let reconnect = ReconnectLayer::new(fast_backoff()).buffer(100);
    let refused = reconnect.unavailable();
    let slow = broker.clone();
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .layer(reconnect)
            .service(move || {
                let broker = slow.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    broker.connect()
                }
            }),
    );
    for n in 0..1_000 {
        events.dispatch_event(numbered("b", "1", n)).await.unwrap();
    }
    events
        .dispatch_confirmed(numbered("b", "1", 1_000))
        .await
        .unwrap();
    assert_eq!(refused.get(), 0);
    assert_eq!(events.stats().publish_failed, 0);
    let delivered: Vec<u64> = broker
        .published()
        .iter()
        .map(|(_, frame)| number_of(&serde_json::from_slice::<Envelope>(frame).unwrap()))
        .collect();
    assert_eq!(delivered, (0..=1_000).collect::<Vec<_>>());
}

/// At the cap, the jitter still spreads the delays: they do not pile up at exactly `max` (half
/// of them did, so clients of a restarted server came back in lockstep), and none exceeds it.
#[test]
fn jittered_delays_at_the_cap_do_not_pile_up_at_max() {
    let max = Duration::from_secs(1);
    let backoff = Backoff::new()
        .initial(Duration::from_millis(100))
        .max(max)
        .jitter(0.2);
    let delays: Vec<Duration> = (0..1_000).map(|_| backoff.delay(30)).collect();
    assert!(delays.iter().all(|d| *d <= max), "none over max");
    assert!(
        delays.iter().all(|d| *d >= max.mul_f64(0.8)),
        "within the jitter below max"
    );
    let at_max = delays.iter().filter(|d| **d == max).count();
    assert!(at_max < 10, "{at_max} of 1,000 delays were exactly max");
    let below_middle = delays.iter().filter(|d| **d < max.mul_f64(0.9)).count();
    assert!(
        (350..650).contains(&below_middle),
        "spread evenly: {below_middle} of 1,000 under 0.9 max"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_delays_grow_then_reset_after_a_stable_connection() {
    let broker = MemoryBroker::new();
    // On the runtime's paused clock: the state is a `watch`, and a state not seen before the
    // next replaced it would be missed; the clock moves on only once every task waits, this
    // one included, so it sees each (on real time, a busy machine could starve it past one).
    let backoff = Backoff::new()
        .initial(Duration::from_millis(100))
        .max(Duration::from_millis(800))
        .multiplier(2.0)
        .jitter(0.0)
        .stable_after(Duration::from_millis(300));
    let reconnect = ReconnectLayer::new(backoff);
    let mut state = reconnect.state();
    let events = full_stack(&broker, reconnect);
    events
        .dispatch_confirmed(numbered("k", "1", 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // stable

    broker.set_accepting(false);
    broker.kill_connections();
    let mut waits = Vec::new();
    while waits.len() < 5 {
        tokio::time::timeout(WAIT, state.changed())
            .await
            .unwrap()
            .unwrap();
        if let ConnectionState::Waiting { attempt, delay } = state.borrow_and_update().clone() {
            if waits.last().map(|(a, _)| *a) != Some(attempt) {
                waits.push((attempt, delay));
            }
        }
    }
    let delays: Vec<u64> = waits.iter().map(|(_, d)| d.as_millis() as u64).collect();
    assert_eq!(
        waits.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        delays,
        vec![100, 200, 400, 800, 800],
        "doubling, capped at the max"
    );

    broker.set_accepting(true);
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == ConnectionState::Connected))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // stable again
    broker.set_accepting(false);
    broker.kill_connections();
    let first = tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Waiting { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(
        first,
        ConnectionState::Waiting {
            attempt: 1,
            delay: Duration::from_millis(100)
        },
        "the count starts over after a connection that stayed up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_during_an_outage_is_confirmed_after_it() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let _first = events.subscribe("o:1").await.unwrap();
    broker.set_accepting(false);
    broker.kill_connections();
    let pending = {
        let events = events.clone();
        tokio::spawn(async move { events.subscribe("o:2").await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        !pending.is_finished(),
        "not confirmed while the broker is down"
    );
    broker.set_accepting(true);
    let mut second = tokio::time::timeout(WAIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    events.dispatch_event(numbered("o", "2", 1)).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, second.next()).await.unwrap() {
            Some(Ok(event)) => {
                assert_eq!(number_of(&event), 1);
                break;
            }
            Some(Err(Gap::Reconnected)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_ends_the_event_target_with_a_clear_error() {
    let broker = MemoryBroker::new();
    broker.set_accepting(false);
    let events = full_stack(
        &broker,
        ReconnectLayer::new(fast_backoff().max_attempts(Some(3))),
    );
    let error = events.subscribe("g:1").await.unwrap_err();
    assert!(error.is_closed(), "{error}");
    assert!(
        error
            .to_string()
            .contains("gave up after 3 connection attempts"),
        "{error}"
    );
    assert_eq!(broker.connects(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_for_good_is_not_retried_and_a_failed_one_is() {
    use alkdev_pubsub::Error;
    use std::sync::atomic::{AtomicU64, Ordering};
    for (kind, retried) in [
        (ErrorKind::Config, false),
        (ErrorKind::Rejected, false),
        (ErrorKind::Connect, true),
    ] {
        let attempts = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&attempts);
        let transport =
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(ReconnectLayer::new(fast_backoff().max_attempts(Some(4))))
                .service(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Err::<BrokerConnection, _>(Error::new(kind, "the factory's own words"))
                    }
                });
        let events: EventTarget = EventTarget::new(transport);
        let error = events.subscribe("r:1").await.unwrap_err();
        assert!(
            error.to_string().contains("the factory's own words"),
            "{error}"
        );
        let expected = if retried { 4 } else { 1 };
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            expected,
            "{kind:?}: {error}"
        );
        let why = if retried {
            "gave up after 4 connection attempts"
        } else {
            "retrying cannot succeed"
        };
        assert!(error.to_string().contains(why), "{kind:?}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_connected_even_a_refusal_is_retried() {
    use alkdev_pubsub::Error;
    use std::sync::atomic::{AtomicU64, Ordering};
    let broker = MemoryBroker::new();
    let attempts = Arc::new(AtomicU64::new(0));
    let (factory_broker, counted) = (broker.clone(), Arc::clone(&attempts));
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(ReconnectLayer::new(fast_backoff()))
        .service(move || {
            // The first connection works; the next two attempts are refused (a rotated
            // password, say), then the peer takes it again.
            let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let broker = factory_broker.clone();
            async move {
                match attempt {
                    2 | 3 => Err(Error::new(ErrorKind::Rejected, "refused for now")),
                    _ => broker.connect(),
                }
            }
        });
    let events: EventTarget = EventTarget::new(transport);
    let mut subscription = events.subscribe("o:1").await.unwrap();
    broker.kill_connections();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "not reconnected within {WAIT:?} ({} attempts)",
            attempts.load(Ordering::SeqCst)
        );
        events.dispatch_event(numbered("o", "1", 7)).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(100), subscription.next()).await {
            Ok(Some(Ok(event))) => {
                assert_eq!(number_of(&event), 7);
                break;
            }
            Ok(Some(Err(Gap::Reconnected))) | Err(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 4, "two refusals retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_stack_passes_the_conformance_suite() {
    let broker = MemoryBroker::new();
    testkit::run_all(|| {
        let broker = broker.clone();
        async move {
            Pair::new(
                full_stack(&broker, ReconnectLayer::new(fast_backoff())),
                full_stack(&broker, ReconnectLayer::new(fast_backoff())),
            )
        }
    })
    .await;
    let restart_broker = broker.clone();
    testkit::restart_recovers(
        Pair::new(
            full_stack(&broker, ReconnectLayer::new(fast_backoff())),
            full_stack(&broker, ReconnectLayer::new(fast_backoff())),
        ),
        20,
        || async move {
            restart_broker.set_accepting(false);
            restart_broker.kill_connections();
            tokio::time::sleep(Duration::from_millis(50)).await;
            restart_broker.set_accepting(true);
        },
    )
    .await;
    let inject_broker = broker.clone();
    testkit::malformed_frames_skipped(
        Pair::loopback(full_stack(&broker, ReconnectLayer::new(fast_backoff()))),
        move |topic, frame| {
            inject_broker.inject(format!("alk:events:{topic}"), frame);
            async {}
        },
    )
    .await;
}

use alkdev_pubsub::testkit::Pair;

// ---------------------------------------------------------------- retry

/// Wraps a broker connection: its first `refuse_sends` sends and `failures` flushes fail with
/// a transient error, as a server answering `LOADING` or `BUSY` would; its next
/// `refuse_ready` `poll_ready`s fail as a reconnect layer's does during an outage, and its
/// next `reject_flushes` flushes fail for good (before `failures` are counted).
struct Flaky {
    inner: alkdev_pubsub::testkit::BrokerConnection,
    failures: u32,
    refuse_sends: u32,
    refuse_ready: u32,
    reject_flushes: u32,
    /// Closes that end the connection (its stream ends) but take one more poll to report it,
    /// as a WebSocket's waits for its peer's close frame.
    slow_closes: u32,
    /// A slow close ended the connection: the next poll reports it done.
    closed: bool,
}

impl Flaky {
    /// A connection to `broker` with no fault yet.
    fn new(broker: &MemoryBroker) -> Self {
        Flaky {
            inner: broker.connect().unwrap(),
            failures: 0,
            refuse_sends: 0,
            refuse_ready: 0,
            reject_flushes: 0,
            slow_closes: 0,
            closed: false,
        }
    }
}

impl futures::Sink<Command<Bytes>> for Flaky {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.refuse_ready > 0 {
            self.refuse_ready -= 1;
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(
                ErrorKind::Unavailable,
                "the connection is down and the buffer is full",
            )));
        }
        std::pin::Pin::new(&mut self.inner).poll_ready(cx)
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        item: Command<Bytes>,
    ) -> Result<(), Self::Error> {
        if self.refuse_sends > 0 {
            self.refuse_sends -= 1;
            return Err(alkdev_pubsub::Error::new(
                ErrorKind::Busy,
                "LOADING the dataset",
            ));
        }
        std::pin::Pin::new(&mut self.inner).start_send(item)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.reject_flushes > 0 {
            self.reject_flushes -= 1;
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(
                ErrorKind::Rejected,
                "NOPERM",
            )));
        }
        if self.failures > 0 {
            self.failures -= 1;
            return std::task::Poll::Ready(Err(alkdev_pubsub::Error::new(ErrorKind::Busy, "BUSY")));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        if self.closed {
            return std::task::Poll::Ready(Ok(()));
        }
        let closed = std::pin::Pin::new(&mut self.inner).poll_close(cx);
        if self.slow_closes > 0 {
            self.slow_closes -= 1;
            self.closed = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        closed
    }
}

impl futures::Stream for Flaky {
    type Item = alkdev_pubsub::Result<Up<Bytes>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_resends_after_transient_errors_and_gives_up_past_the_bound() {
    use alkdev_pubsub::layers::RetryLayer;
    let broker = MemoryBroker::new();
    let retry = RetryLayer::new(3, Duration::from_millis(1));
    let retried = retry.retried();
    let flaky = Flaky {
        failures: 2,
        refuse_sends: 1,
        ..Flaky::new(&broker)
    };
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(retry)
            .service(flaky),
    );
    // The first send is refused once, then two flushes fail: it still goes out, once the
    // flush succeeds (at least once: a failed flush may have delivered some).
    events
        .dispatch_confirmed(numbered("q", "1", 1))
        .await
        .unwrap();
    let published: Vec<u64> = broker
        .published()
        .iter()
        .map(|(_, f)| number_of(&serde_json::from_slice::<Envelope>(f).unwrap()))
        .collect();
    // The flaky flushes here fail after writing, so each retry sends the publish again.
    assert_eq!(
        published,
        vec![1, 1, 1],
        "delivered at least once, nothing else"
    );
    // Each resend counted once: the refused send, and the publish after each failed flush.
    assert_eq!(retried.get(), 3);

    let flaky = Flaky {
        failures: 10,
        ..Flaky::new(&broker)
    };
    let events = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(RetryLayer::new(2, Duration::from_millis(1)))
            .service(flaky),
    );
    let error = events
        .dispatch_confirmed(numbered("q", "1", 2))
        .await
        .unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(error.to_string().contains("after 2 retries"), "{error}");
}

/// A retry layer (two retries, 1 ms apart) over a broker connection whose first `refuse_sends`
/// sends are refused for now.
fn retry_over_flaky(
    broker: &MemoryBroker,
    refuse_sends: u32,
) -> alkdev_pubsub::layers::retry::Retry<Flaky, Bytes> {
    use tower::Layer;
    alkdev_pubsub::layers::RetryLayer::new(2, Duration::from_millis(1)).layer(Flaky {
        refuse_sends,
        ..Flaky::new(broker)
    })
}

/// A publish of `text` on `q:1`.
fn publish(text: &'static str) -> Command<Bytes> {
    Command::Publish {
        topic: Topic::from("q:1"),
        message: Bytes::from(text),
    }
}

/// Retries that run out while the next publish is being fed (in `poll_ready`) are reported by
/// the next flush, which answers the publish given up on; `poll_ready` is about the publish
/// waiting to be fed, which goes out. (An event target took a `poll_ready` error for an
/// earlier pipeline's, counted one failure, and answered the given up publish's confirmed
/// dispatch with the next successful flush: `Ok`.)
#[tokio::test]
async fn retries_that_run_out_fail_the_next_flush_not_the_next_publish() {
    let broker = MemoryBroker::new();
    let mut retry = retry_over_flaky(&broker, 3);
    // Refused, and kept to be sent again.
    retry.feed(publish("first")).await.unwrap();
    // Its two retries are refused as this one is fed: the layer gives up on the first.
    retry.feed(publish("second")).await.unwrap();
    let error = retry.flush().await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(
        error
            .to_string()
            .contains("gave up on 1 commands after 2 retries"),
        "{error}"
    );
    assert_eq!(
        broker.published(),
        vec![(Topic::from("q:1"), Bytes::from("second"))]
    );
    // Reported once: the next flush succeeds.
    retry.send(publish("third")).await.unwrap();
}

/// Each command sent again counts once in `retried`: a failed flush covering three publishes,
/// then the first one's resend refused once, make four resends (the layer counted the whole
/// queue at each attempt it planned: six).
#[tokio::test]
async fn each_resend_counts_once_in_retried() {
    let broker = MemoryBroker::new();
    let mut retry = retry_over_flaky(&broker, 0);
    let retried = retry.retried().clone();
    for text in ["a", "b", "c"] {
        retry.feed(publish(text)).await.unwrap();
    }
    retry.get_mut().failures = 1;
    retry.get_mut().refuse_sends = 1;
    retry.flush().await.unwrap();
    assert_eq!(retried.get(), 4);
    let sent: Vec<Bytes> = broker.published().into_iter().map(|(_, m)| m).collect();
    assert_eq!(sent, ["a", "b", "c", "a", "b", "c"]);
}

/// Each refused publish gets its own retries: three publishes, each refused once and sent
/// again before the next is fed, within one flush window (the layer's count of retries ran on
/// from one to the next, and gave up on the third at once).
#[tokio::test]
async fn each_refused_publish_gets_its_own_retries_within_a_flush() {
    let broker = MemoryBroker::new();
    let mut retry = retry_over_flaky(&broker, 0);
    for text in ["a", "b", "c"] {
        // Refused once as it is fed, then sent again (in `poll_ready`, as the next is fed).
        retry.get_mut().refuse_sends = 1;
        retry.feed(publish(text)).await.unwrap();
        futures::future::poll_fn(|cx| {
            futures::Sink::poll_ready(std::pin::Pin::new(&mut retry), cx)
        })
        .await
        .unwrap();
        assert_eq!(retry.get_mut().refuse_sends, 0, "{text} was refused once");
    }
    retry.flush().await.unwrap();
    let sent: Vec<Bytes> = broker.published().into_iter().map(|(_, m)| m).collect();
    assert_eq!(sent, ["a", "b", "c"]);
}

/// A failed flush answers what it covered: none of it is sent again by a later call, as though
/// never reported. Publishes waiting to be retried that the flush could not send (the
/// transport below refuses them room), and publishes sent before a flush that failed for good
/// (a later transient failure resends what was sent since the last flush).
#[tokio::test]
async fn a_failed_flush_answers_what_it_covered_and_none_of_it_is_sent_again() {
    let broker = MemoryBroker::new();
    let mut retry = retry_over_flaky(&broker, 1);
    // Refused for now, and kept to be sent again; then no room below when it would be.
    retry.feed(publish("first")).await.unwrap();
    retry.get_mut().refuse_ready = 1;
    let error = retry.flush().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("the buffer is full"), "{error}");
    // Recovered: what comes next goes out, and nothing that the failed flush answered.
    retry.send(publish("second")).await.unwrap();
    assert_eq!(
        broker.published(),
        vec![(Topic::from("q:1"), Bytes::from("second"))]
    );

    retry.feed(publish("third")).await.unwrap();
    retry.get_mut().reject_flushes = 1;
    let error = retry.flush().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    // The next flush fails for now once: it sends again what it covered, the fourth alone.
    retry.get_mut().failures = 1;
    retry.send(publish("fourth")).await.unwrap();
    let sent: Vec<Bytes> = broker.published().into_iter().map(|(_, m)| m).collect();
    assert_eq!(sent, ["second", "third", "fourth", "fourth"]);
}

/// The codec layer reads what a JavaScript peer's `JSON.stringify` writes for a string cut
/// inside an emoji (a lone surrogate escape) as U+FFFD, rather than skip the message; a frame
/// that is not JSON is still a decode error.
#[tokio::test]
async fn the_codec_layer_reads_a_lone_surrogate_from_javascript() {
    let broker = MemoryBroker::new();
    let mut transport: WithCodec<_, Json, Value> = WithCodec::new(broker.connect().unwrap(), Json);
    transport
        .send(Command::Subscribe("chat.msg:1".into()))
        .await
        .unwrap();
    let _ = next_up(&mut transport).await;
    broker.inject(
        "chat.msg:1",
        r#"{"type":"chat.msg","id":"1","payload":"cut \ud83d"}"#,
    );
    broker.inject(
        "chat.msg:1",
        r#"{"type":"chat.msg","id":"1","payload":"\ud83d"#,
    );
    match next_up(&mut transport).await {
        Ok(Up::Message { message, .. }) => {
            assert_eq!(message.payload, Value::String("cut \u{FFFD}".into()))
        }
        other => panic!("expected the message, got {other:?}"),
    }
    match next_up(&mut transport).await {
        Err(error) => assert!(error.is_decode(), "{error}"),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_inbound_envelope_with_a_topic_over_the_limit_is_a_decode_error() {
    let broker = MemoryBroker::new();
    let mut transport: WithCodec<_, Json, Value> = WithCodec::new(broker.connect().unwrap(), Json);
    transport
        .send(Command::Subscribe("t:1".into()))
        .await
        .unwrap();
    let _ = next_up(&mut transport).await;
    let long = format!(
        r#"{{"type":"t","id":"{}"}}"#,
        "x".repeat(alkdev_pubsub::layers::MAX_TOPIC_LEN)
    );
    broker.inject("t:1", long);
    match next_up(&mut transport).await {
        Err(error) => {
            assert!(error.is_decode(), "{error}");
            assert!(error.to_string().contains("over the limit"), "{error}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let mut prefixed = Prefix::new(broker.connect().unwrap(), "p:".repeat(10));
    let long_topic = Topic::from("y".repeat(alkdev_pubsub::layers::MAX_TOPIC_LEN - 5));
    let error = prefixed
        .send(Command::Subscribe(long_topic))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    // It says what the caller passed and what the prefix adds, and quotes the topic's start
    // only (it quoted the whole topic, however long).
    let message = error.to_string();
    assert!(
        message.contains("(4091 bytes) with") && message.contains("(20 bytes)"),
        "{message}"
    );
    assert!(message.len() < 300, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_events_never_the_reconnect_notice() {
    let broker = MemoryBroker::new();
    let events = full_stack(&broker, ReconnectLayer::new(fast_backoff()));
    let mut slow = events
        .subscribe_with("slow:1", SubscribeOptions::new().capacity(3))
        .await
        .unwrap();
    broker.kill_connections();
    // Wait until the notice is queued, then overflow the queue behind it.
    while events.stats().reconnects == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for n in 0..10 {
        events
            .dispatch_confirmed(numbered("slow", "1", n))
            .await
            .unwrap();
    }
    while events.stats().delivered < 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut items = Vec::new();
    for _ in 0..5 {
        items.push(match slow.next().await.unwrap() {
            Ok(event) => format!("event {}", number_of(&event)),
            Err(gap) => format!("{gap:?}"),
        });
    }
    // The notice held a slot until the overflow pushed it out; the subscriber still hears of
    // it, after the count of the events dropped with it.
    assert_eq!(
        items,
        ["Lagged(7)", "Reconnected", "event 7", "event 8", "event 9"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_the_connection_died_does_not_wait_for_its_timeout() {
    let broker = MemoryBroker::new();
    let connect = broker.clone();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(PrefixLayer::new("alk:events:"))
        .layer(ReconnectLayer::new(fast_backoff()))
        .service(move || {
            let broker = connect.clone();
            async move { broker.connect() }
        });
    // A close timeout far longer than the test's wait: only the unsubscribes being answered
    // lets close finish in time.
    let events: EventTarget = EventTarget::builder()
        .close_timeout(Duration::from_secs(600))
        .build(transport);
    let _a = events.subscribe("gone:1").await.unwrap();
    let _b = events.subscribe("gone:2").await.unwrap();
    broker.set_accepting(false);
    broker.kill_connections();
    tokio::time::timeout(WAIT, events.close())
        .await
        .expect("the lost connection answers the unsubscribes");
}

/// A close whose flush failed still closes the transport below (a WebSocket still sends its
/// close frame, a reconnect layer stops), then reports the flush's failure.
#[tokio::test]
async fn a_retry_close_closes_the_transport_below_though_its_flush_failed() {
    use alkdev_pubsub::layers::RetryLayer;
    use tower::Layer;
    let broker = MemoryBroker::new();
    let mut retry = RetryLayer::new(2, Duration::from_millis(1)).layer(Flaky {
        reject_flushes: 1,
        ..Flaky::new(&broker)
    });
    retry
        .feed(Command::Publish {
            topic: Topic::from("t:1"),
            message: Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
    let error = retry.close().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    // The connection below was closed: its stream has ended.
    let next = tokio::time::timeout(WAIT, retry.get_mut().inner.next()).await;
    assert!(matches!(next, Ok(None)), "{next:?}");
}

/// A connection that ends while the reconnect layer closes it (its stream ends before its
/// close reports done, as a WebSocket's does when the peer answers the close frame) is the
/// close, not a loss: no new connection, no reconnect notice, and the state goes to Closed.
#[tokio::test]
async fn a_connection_ending_during_a_close_is_not_reconnected() {
    use tower::Layer;
    let broker = MemoryBroker::new();
    let stable = Backoff::new()
        .initial(Duration::from_millis(1))
        .jitter(0.0)
        .stable_after(Duration::ZERO);
    let layer = ReconnectLayer::new(stable);
    let state = layer.state();
    let mut transport = layer.layer({
        let broker = broker.clone();
        move || {
            let connection = Flaky {
                slow_closes: 1,
                ..Flaky::new(&broker)
            };
            async move { Ok(connection) }
        }
    });
    transport
        .send(Command::Subscribe(Topic::from("t:1")))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, transport.next()).await.unwrap(),
        Some(Ok(Up::Subscribed(_)))
    ));
    assert_eq!(broker.connects(), 1);
    // The close ends the connection and is pending once; the stream, polled meanwhile, ends.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(futures::Sink::poll_close(std::pin::Pin::new(&mut transport), &mut cx).is_pending());
    let ended = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
    assert!(ended.is_none(), "{ended:?}");
    tokio::time::timeout(WAIT, transport.close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(broker.connects(), 1, "no connection made during the close");
    assert_eq!(*state.borrow(), ConnectionState::Closed);
}

/// A closed reconnect layer used again refuses with a `Closed` error, and does not connect
/// anew (it made a connection nobody would close, and said it was connected).
#[tokio::test]
async fn a_closed_reconnect_layer_refuses_and_does_not_connect_again() {
    let broker = MemoryBroker::new();
    let mut transport = reconnecting(&broker);
    transport
        .send(Command::Subscribe(Topic::from("t:1")))
        .await
        .unwrap();
    assert_eq!(broker.connects(), 1);
    tokio::time::timeout(WAIT, transport.close())
        .await
        .unwrap()
        .unwrap();
    let flushed = tokio::time::timeout(WAIT, transport.flush()).await.unwrap();
    assert_eq!(
        flushed.unwrap_err().kind(),
        alkdev_pubsub::ErrorKind::Closed
    );
    let sent = tokio::time::timeout(
        WAIT,
        transport.send(Command::Publish {
            topic: Topic::from("t:1"),
            message: bytes::Bytes::from_static(b"{}"),
        }),
    )
    .await
    .unwrap();
    assert_eq!(sent.unwrap_err().kind(), alkdev_pubsub::ErrorKind::Closed);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(broker.connects(), 1, "no connection after the close");
    assert_eq!(transport.state(), ConnectionState::Closed);
    // Closing again is fine.
    tokio::time::timeout(WAIT, transport.close())
        .await
        .unwrap()
        .unwrap();
}

/// A reconnect layer dropped without a close (an event target's close that ran out of time
/// during an outage) says it is closed.
#[tokio::test]
async fn a_reconnect_layer_dropped_without_a_close_says_closed() {
    let broker = MemoryBroker::new();
    broker.set_accepting(false);
    let layer = ReconnectLayer::new(fast_backoff());
    let mut state = layer.state();
    // The close runs out of time at once (the publish waits for a connection): the target
    // drops its transport.
    let events: EventTarget = EventTarget::builder()
        .close_timeout(Duration::from_millis(50))
        .build(
            ServiceBuilder::new()
                .layer(CodecLayer::json())
                .layer(layer)
                .service(move || {
                    let broker = broker.clone();
                    async move { broker.connect() }
                }),
        );
    events.try_dispatch_event(numbered("t", "1", 0)).unwrap();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|state| matches!(state, ConnectionState::Waiting { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    drop(events);
    tokio::time::timeout(
        WAIT,
        state.wait_for(|state| *state == ConnectionState::Closed),
    )
    .await
    .expect("closed once dropped")
    .unwrap();
}

// ------------------------------------------------ what the layers keep between flushes

/// What a [`SlowAcks`] connection saw.
#[derive(Clone, Default)]
struct AckLog {
    fed: Arc<std::sync::atomic::AtomicUsize>,
    /// The most publishes fed between two completed flushes: what the layers above kept.
    most_between_flushes: Arc<std::sync::atomic::AtomicUsize>,
}

impl AckLog {
    fn fed(&self) -> usize {
        self.fed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn most_between_flushes(&self) -> usize {
        self.most_between_flushes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A factory of connections that log here.
    fn connections(
        &self,
    ) -> impl Fn() -> futures::future::Ready<alkdev_pubsub::Result<SlowAcks>> + Clone {
        let log = self.clone();
        move || {
            futures::future::ready(Ok(SlowAcks {
                log: log.clone(),
                since_flush: 0,
                last_fed: tokio::time::Instant::now(),
                timer: None,
            }))
        }
    }
}

/// A raw connection acknowledged as a distant or busy Redis is: always ready for more, and a
/// flush completes (everything fed is acknowledged) only once nothing has been fed for 150 ms.
struct SlowAcks {
    log: AckLog,
    since_flush: usize,
    last_fed: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl futures::Sink<Command<Bytes>> for SlowAcks {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        command: Command<Bytes>,
    ) -> alkdev_pubsub::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Command::Publish { .. } = command {
            self.log.fed.fetch_add(1, SeqCst);
            self.since_flush += 1;
            self.log
                .most_between_flushes
                .fetch_max(self.since_flush, SeqCst);
            self.last_fed = tokio::time::Instant::now();
        }
        Ok(())
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        use std::future::Future;
        let due = self.last_fed + Duration::from_millis(150);
        if tokio::time::Instant::now() >= due {
            self.since_flush = 0;
            self.timer = None;
            return std::task::Poll::Ready(Ok(()));
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        timer.as_mut().reset(due);
        match timer.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.since_flush = 0;
                self.timer = None;
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Feeds publishes of `x` on `q:1` while `sink` is ready, up to `most`: how many it took.
async fn feed_while_ready<S>(sink: &mut S, most: usize) -> usize
where
    S: futures::Sink<Command<Bytes>, Error = alkdev_pubsub::Error> + Unpin,
{
    common::feed_while_ready(sink, most, || publish("x")).await
}

/// Takes `MAX_UNFLUSHED` publishes over a connection of `log`'s whose flushes complete only
/// once the publisher pauses, then waits for a flush before it takes more: with nothing more
/// fed, it completes (150 ms later), and the next publish goes.
async fn takes_max_unflushed_then_waits_for_a_flush<S>(mut sink: S, log: &AckLog)
where
    S: futures::Sink<Command<Bytes>, Error = alkdev_pubsub::Error> + Unpin,
{
    use alkdev_pubsub::layers::reconnect::MAX_UNFLUSHED;
    assert_eq!(
        feed_while_ready(&mut sink, 3 * MAX_UNFLUSHED).await,
        MAX_UNFLUSHED
    );
    sink.send(publish("after")).await.unwrap();
    assert_eq!(log.fed(), MAX_UNFLUSHED + 1);
}

/// The reconnect layer keeps every publish until a flush completes (to send it again on the
/// next connection): it keeps at most `MAX_UNFLUSHED`, then waits for a flush (it kept the
/// whole stream).
#[tokio::test(start_paused = true)]
async fn the_reconnect_layer_waits_for_a_flush_past_max_unflushed() {
    use tower::Layer;
    let log = AckLog::default();
    let reconnect = ReconnectLayer::new(fast_backoff()).layer(log.connections());
    takes_max_unflushed_then_waits_for_a_flush(reconnect, &log).await;
}

/// The retry layer, likewise (it keeps every publish until a flush completes, to send it again
/// should the flush fail for now).
#[tokio::test(start_paused = true)]
async fn the_retry_layer_waits_for_a_flush_past_max_unflushed() {
    use tower::Layer;
    let log = AckLog::default();
    let connection = log.connections()().await.unwrap();
    let retry =
        alkdev_pubsub::layers::RetryLayer::new(2, Duration::from_millis(1)).layer(connection);
    takes_max_unflushed_then_waits_for_a_flush(retry, &log).await;
}

/// A steady stream of dispatches to a connection acknowledged slowly (its flushes complete
/// only once the publisher pauses 150 ms, longer than the driver waits for one before it feeds
/// more), through the reconnect layer alone and under a retry layer: every publish goes out,
/// and the layers keep at most their bound of them at any time, where they kept the whole
/// stream.
#[tokio::test(start_paused = true)]
async fn a_stream_to_a_slowly_acknowledged_connection_is_kept_only_up_to_the_bound() {
    use alkdev_pubsub::layers::reconnect::MAX_UNFLUSHED;
    for retry in [false, true] {
        let log = AckLog::default();
        let reconnect = ReconnectLayer::new(fast_backoff());
        let events: EventTarget = if retry {
            EventTarget::new(
                ServiceBuilder::new()
                    .layer(CodecLayer::json())
                    .layer(alkdev_pubsub::layers::RetryLayer::new(
                        2,
                        Duration::from_millis(1),
                    ))
                    .layer(reconnect)
                    .service(log.connections()),
            )
        } else {
            EventTarget::new(
                ServiceBuilder::new()
                    .layer(CodecLayer::json())
                    .layer(reconnect)
                    .service(log.connections()),
            )
        };
        let messages = 2 * MAX_UNFLUSHED + 100;
        for n in 0..messages {
            events
                .dispatch_event(numbered("t", "1", n as u64))
                .await
                .unwrap();
        }
        events.close().await;
        assert_eq!(log.fed(), messages, "retry {retry}");
        let kept = log.most_between_flushes();
        assert!(
            kept <= MAX_UNFLUSHED,
            "retry {retry}: {kept} publishes kept at once"
        );
    }
}

/// The bound counts bytes too: 1 MiB frames wait for a flush once 128 MiB are kept.
#[tokio::test(start_paused = true)]
async fn the_layers_wait_for_a_flush_past_max_unflushed_bytes() {
    use alkdev_pubsub::layers::reconnect::MAX_UNFLUSHED_BYTES;
    use tower::Layer;
    let megabyte = Bytes::from(vec![b'x'; 1 << 20]);
    let topic = Topic::from("q:1");
    let per_publish = topic.len() + megabyte.len();
    let bound = MAX_UNFLUSHED_BYTES.div_ceil(per_publish);
    let log = AckLog::default();
    let mut reconnect = ReconnectLayer::new(fast_backoff()).layer(log.connections());
    let mut retry = alkdev_pubsub::layers::RetryLayer::new(2, Duration::from_millis(1))
        .layer(log.connections()().await.unwrap());
    let frame = || Command::Publish {
        topic: topic.clone(),
        message: megabyte.clone(),
    };
    let reconnect_took = common::feed_while_ready(&mut reconnect, 1_000, frame).await;
    let retry_took = common::feed_while_ready(&mut retry, 1_000, frame).await;
    assert_eq!((reconnect_took, retry_took), (bound, bound));
}

/// A connection whose `poll_ready` fails on every call (with an error that is not
/// unrecoverable) is taken for lost after 64 calls in a row, and the layer connects again,
/// where it reported the error for ever: under an event target, the target stopped (it takes
/// a transport failing every call for broken), its subscriptions ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_failing_every_poll_ready_is_replaced() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let broker = MemoryBroker::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let made = Arc::clone(&attempts);
    let factory_broker = broker.clone();
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(fast_backoff()))
            .service(move || {
                // The first connection fails every call; the next ones work.
                let refuse_ready = match made.fetch_add(1, Ordering::SeqCst) {
                    0 => u32::MAX,
                    _ => 0,
                };
                let connection = Flaky {
                    refuse_ready,
                    ..Flaky::new(&factory_broker)
                };
                async move { Ok::<_, alkdev_pubsub::Error>(connection) }
            }),
    );
    let mut subscription = tokio::time::timeout(WAIT, events.subscribe("t:1"))
        .await
        .expect("subscribed in time")
        .unwrap();
    events
        .dispatch_confirmed(numbered("t", "1", 7))
        .await
        .unwrap();
    assert_eq!(number_of(&next_up_event(&mut subscription).await), 7);
    assert!(!events.is_closed());
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "connected again once");
}

/// The next event, past a reconnect notice (the connection was lost).
async fn next_up_event(subscription: &mut alkdev_pubsub::Subscription) -> Arc<Envelope> {
    loop {
        match tokio::time::timeout(WAIT, subscription.next())
            .await
            .expect("an event in time")
            .expect("open")
        {
            Ok(event) => return event,
            Err(gap) => assert_eq!(gap, Gap::Reconnected),
        }
    }
}

/// The flush the reconnect layer makes on its own at its bound fails (kept for the next flush
/// from above); that next flush fails with an error of its own, which answers everything it
/// covered: the flush after it, of a publish that went through, succeeds (it failed again
/// with the first error).
#[tokio::test]
async fn a_failed_flush_answers_the_failure_of_the_layers_own_flush_too() {
    use alkdev_pubsub::layers::reconnect::MAX_UNFLUSHED;
    let faults = Faults::default();
    faults.failing_flushes.lock().unwrap().extend([
        alkdev_pubsub::Error::new(ErrorKind::Busy, "BUSY"),
        alkdev_pubsub::Error::new(ErrorKind::Rejected, "NOPERM"),
    ]);
    let mut reconnect = reconnecting_over_faults(&faults);
    // The bound is reached: taking one more flushes first (and that flush fails).
    assert_eq!(
        feed_while_ready(&mut reconnect, MAX_UNFLUSHED + 1).await,
        MAX_UNFLUSHED + 1
    );
    let error = reconnect.flush().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    reconnect.send(publish("after")).await.unwrap();
    assert_eq!(
        *faults.delivered.lock().unwrap(),
        vec![Bytes::from("after")]
    );
}
