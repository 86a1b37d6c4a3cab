//! The transport of `examples/custom_transport.rs` keeps the transport contract: the
//! conformance suite over it, malformed lines skipped, and a line over its limit lost alone.

#[allow(dead_code)]
#[path = "../examples/custom_transport.rs"]
mod example;

use std::time::Duration;

use alkdev_pubsub::testkit::{self, number_of, numbered, Pair};
use example::{event_target, LineTransport, MAX_LINE};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// The two ends of one loopback connection: the connecting one, the accepted one.
async fn connection() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Two event targets over the two ends of one connection.
async fn pair() -> Pair {
    let (connected, accepted) = connection().await;
    Pair::new(
        event_target(LineTransport::new(connected)),
        event_target(LineTransport::new(accepted)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_transport_conforms() {
    testkit::run_all(pair).await;
}

/// Lines that are not envelopes (not JSON, not UTF-8, empty) are skipped and counted by the
/// layers above; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_are_skipped() {
    let (connected, accepted) = connection().await;
    let raw = std::sync::Arc::new(tokio::sync::Mutex::new(connected));
    let subscriber = event_target(LineTransport::new(accepted));
    let pair = Pair::new(alkdev_pubsub::EventTarget::local(), subscriber);
    testkit::malformed_frames_skipped(pair, move |_topic, frame| {
        let raw = std::sync::Arc::clone(&raw);
        async move {
            let mut raw = raw.lock().await;
            raw.write_all(&frame).await.unwrap();
            raw.write_all(b"\n").await.unwrap();
        }
    })
    .await;
}

/// A line over the limit is skipped (a `TooLarge` item, counted as skipped), the connection
/// kept: the events around it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_the_limit_is_lost_alone() {
    let (mut raw, accepted) = connection().await;
    let events = event_target(LineTransport::new(accepted));
    let mut subscription = events.subscribe("t:1").await.unwrap();
    let line = |n: u64| {
        format!(
            "{}\n",
            serde_json::to_string(&numbered("t", "1", n)).unwrap()
        )
    };
    raw.write_all(line(1).as_bytes()).await.unwrap();
    raw.write_all(&vec![b'x'; MAX_LINE + 1]).await.unwrap();
    raw.write_all(b"\n").await.unwrap();
    raw.write_all(line(2).as_bytes()).await.unwrap();
    for expected in [1, 2] {
        let event = tokio::time::timeout(WAIT, subscription.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("no gap");
        assert_eq!(number_of(&event), expected);
    }
    let stats = events.stats();
    assert_eq!((stats.skipped, stats.decode_errors), (1, 0));
}
