//! Worker pairs across real OS threads.

use std::time::Duration;

use alkdev_pubsub::testkit::{self, number_of, numbered};
use alkdev_pubsub::{worker, EventTarget};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_across_threads() {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (events, join) = worker::spawn(move |events: EventTarget| async move {
        let mut requests = events.subscribe("call.requested:w").await.unwrap();
        ready_tx.send(std::thread::current().id()).unwrap();
        let mut answered = 0;
        while answered < 100 {
            let request = testkit::next_event(&mut requests).await;
            let n = number_of(&request);
            events
                .dispatch_event(numbered("call.responded", &format!("c{n}"), n * 2))
                .await
                .unwrap();
            answered += 1;
        }
        answered
    })
    .unwrap();
    let worker_thread = ready_rx.await.unwrap();
    assert_ne!(
        worker_thread,
        std::thread::current().id(),
        "the worker has its own thread"
    );

    let mut answers = Vec::new();
    for n in 0..100u64 {
        answers.push(
            events
                .subscribe(format!("call.responded:c{n}"))
                .await
                .unwrap(),
        );
    }
    for n in 0..100 {
        events
            .dispatch_event(numbered("call.requested", "w", n))
            .await
            .unwrap();
    }
    for (n, answer) in answers.iter_mut().enumerate() {
        assert_eq!(number_of(&testkit::next_event(answer).await), n as u64 * 2);
    }
    let answered = tokio::task::spawn_blocking(move || join.join().unwrap())
        .await
        .unwrap();
    assert_eq!(answered, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_side_ends_the_other_sides_stream_cleanly() {
    let (a, b) = worker::channel(64);
    let main_side: EventTarget = EventTarget::new(a);
    let mut subscription = main_side.subscribe("gone:1").await.unwrap();
    let thread = std::thread::spawn(move || drop(b));
    thread.join().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), subscription.next())
        .await
        .expect("no hang");
    assert!(end.is_none(), "the stream ends");
    assert!(main_side.is_closed());
    let error = main_side
        .dispatch_event(numbered("gone", "1", 0))
        .await
        .unwrap_err();
    assert!(error.is_closed(), "{error}");
    assert!(
        error.to_string().contains("stream ended"),
        "the error names the cause: {error}"
    );
}
