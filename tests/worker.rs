//! Worker pairs across real OS threads.

use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use alkdev_pubsub::testkit::{self, number_of, numbered};
use alkdev_pubsub::{worker, Command, EventTarget, Topic, Up};
use futures::{Sink, Stream, StreamExt};

mod common;

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

/// A waker that counts its wake-ups.
struct Count(std::sync::atomic::AtomicUsize);

impl futures::task::ArcWake for Count {
    fn wake_by_ref(arc_self: &std::sync::Arc<Self>) {
        arc_self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Count {
    fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)))
    }

    /// A new count, and a waker that counts into it.
    fn waker() -> (std::sync::Arc<Self>, std::task::Waker) {
        let count = Count::new();
        let waker = futures::task::waker(std::sync::Arc::clone(&count));
        (count, waker)
    }

    fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

type Side = worker::WorkerTransport<serde_json::Value>;

fn send(side: &mut Side, cx: &mut Context<'_>, n: u64) {
    assert!(matches!(
        Pin::new(&mut *side).poll_ready(cx),
        Poll::Ready(Ok(()))
    ));
    Pin::new(side)
        .start_send(Command::Publish {
            topic: Topic::from("t:1"),
            message: numbered("t", "1", n),
        })
        .unwrap();
}

fn flush(side: &mut Side, cx: &mut Context<'_>) -> Poll<alkdev_pubsub::Result<()>> {
    Pin::new(side).poll_flush(cx)
}

/// The numbers of what `side` can read now.
fn read(side: &mut Side) -> Vec<u64> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut numbers = Vec::new();
    while let Poll::Ready(Some(Ok(Up::Message { message, .. }))) =
        Pin::new(&mut *side).poll_next(&mut cx)
    {
        numbers.push(number_of(&message));
    }
    numbers
}

/// Whether `side`'s writer may send now (with `cx` registered if not).
fn ready(side: &mut Side, cx: &mut Context<'_>) -> Poll<alkdev_pubsub::Result<()>> {
    Pin::new(side).poll_ready(cx)
}

/// An unsubscribe is answered after what the other side sent before it (as a server answers
/// in order): an event target's close, which delivers what comes up until its unsubscribes
/// are answered, loses none of it. A subscribe is answered at once.
#[test]
fn an_unsubscribe_is_answered_after_what_was_sent_before_it() {
    let (mut a, mut b) = worker::channel(4096);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    for n in 0..3 {
        send(&mut a, &mut cx, n);
    }
    // One taken into the reader's hands, two still in the pipe.
    match Pin::new(&mut b).poll_next(&mut cx) {
        Poll::Ready(Some(Ok(Up::Message { message, .. }))) => assert_eq!(number_of(&message), 0),
        other => panic!("expected the first event, got {other:?}"),
    }
    for command in [
        Command::Unsubscribe(Topic::from("t:1")),
        Command::Subscribe(Topic::from("u:1")),
    ] {
        Pin::new(&mut b).start_send(command).unwrap();
    }
    send(&mut a, &mut cx, 3);
    let mut seen = Vec::new();
    while let Poll::Ready(Some(Ok(up))) = Pin::new(&mut b).poll_next(&mut cx) {
        seen.push(match up {
            Up::Message { message, .. } => number_of(&message).to_string(),
            Up::Unsubscribed(topic) => format!("unsubscribed {topic}"),
            Up::Subscribed(topic) => format!("subscribed {topic}"),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        seen,
        ["1", "2", "unsubscribed t:1", "subscribed u:1", "3"],
        "answered in order, after what was sent before the unsubscribe"
    );
}

#[test]
fn what_is_sent_is_readable_at_once_and_a_flush_has_nothing_to_wait_for() {
    let (mut a, mut b) = worker::channel(4096);
    let (count, waker) = Count::waker();
    let mut cx = Context::from_waker(&waker);
    // A reader that found nothing waits, and the next send wakes it.
    assert!(Pin::new(&mut b).poll_next(&mut cx).is_pending());
    send(&mut a, &mut cx, 1);
    assert_eq!(count.get(), 1, "the waiting reader was woken by the send");
    assert_eq!(read(&mut b), [1], "readable before any flush");
    // A burst the reader has not looked at yet is taken in one go, in order.
    send(&mut a, &mut cx, 2);
    send(&mut a, &mut cx, 3);
    assert!(matches!(flush(&mut a, &mut cx), Poll::Ready(Ok(()))));
    for n in [2, 3] {
        match Pin::new(&mut b).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(Up::Message { message, .. }))) => {
                assert_eq!(number_of(&message), n)
            }
            other => panic!("expected {n}, got {other:?}"),
        }
    }
    assert!(matches!(flush(&mut a, &mut cx), Poll::Ready(Ok(()))));
    // After a burst the reader may look for more a little longer; then it waits as before.
    assert!(Pin::new(&mut b).poll_next(&mut cx).is_pending());
    assert_eq!(count.get(), 1);
    send(&mut a, &mut cx, 4);
    assert_eq!(count.get(), 2, "the waiting reader was woken by the send");
    assert_eq!(read(&mut b), [4]);
}

#[test]
fn a_dropped_reader_drops_what_it_did_not_read() {
    let (mut a, b) = worker::channel::<std::sync::Arc<()>>(64);
    let payload = std::sync::Arc::new(());
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    for _ in 0..3 {
        assert!(matches!(
            Pin::new(&mut a).poll_ready(&mut cx),
            Poll::Ready(Ok(()))
        ));
        Pin::new(&mut a)
            .start_send(Command::Publish {
                topic: Topic::from("t:1"),
                message: alkdev_pubsub::Envelope::new("t", "1", std::sync::Arc::clone(&payload)),
            })
            .unwrap();
    }
    assert_eq!(std::sync::Arc::strong_count(&payload), 4);
    drop(b);
    assert_eq!(
        std::sync::Arc::strong_count(&payload),
        1,
        "freed with the reader"
    );
}

/// A reader racing a writer on another thread (so that it may look for more after each burst,
/// and sleep between them) gets everything, in order. Whether it spins is checked in the
/// transport's own tests; what the spin is for is measured by the benchmark.
#[test]
fn a_reader_racing_a_writer_on_another_thread_gets_everything_in_order() {
    let (mut a, mut b) = worker::channel(4096);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    send(&mut a, &mut cx, 1);
    send(&mut a, &mut cx, 2);
    assert_eq!(read(&mut b), [1, 2]);
    let writer = std::thread::spawn(move || {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        for n in 3..=2_000 {
            while ready(&mut a, &mut cx).is_pending() {
                std::thread::yield_now();
            }
            send(&mut a, &mut cx, n);
        }
        a
    });
    let mut next = 3;
    while next <= 2_000 {
        match Pin::new(&mut b).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(Up::Message { message, .. }))) => {
                assert_eq!(number_of(&message), next);
                next += 1;
            }
            Poll::Ready(other) => panic!("unexpected {other:?}"),
            Poll::Pending => std::thread::yield_now(),
        }
    }
    drop(writer.join().unwrap());
    assert!(matches!(
        Pin::new(&mut b).poll_next(&mut cx),
        Poll::Ready(None)
    ));
}

#[test]
fn a_full_direction_makes_the_writer_wait_until_the_reader_takes_what_is_there() {
    let (mut a, mut b) = worker::channel(2);
    let (count, waker) = Count::waker();
    let mut cx = Context::from_waker(&waker);
    send(&mut a, &mut cx, 1);
    send(&mut a, &mut cx, 2);
    assert!(ready(&mut a, &mut cx).is_pending(), "two is the capacity");
    assert_eq!(count.get(), 0);
    assert_eq!(read(&mut b), [1, 2]);
    assert_eq!(count.get(), 1, "the waiting writer was woken");
    assert!(matches!(ready(&mut a, &mut cx), Poll::Ready(Ok(()))));
    send(&mut a, &mut cx, 3);
    assert_eq!(read(&mut b), [3]);
}

#[test]
fn a_waiting_writer_learns_that_the_reader_is_gone() {
    let (mut a, b) = worker::channel(1);
    let (count, waker) = Count::waker();
    let mut cx = Context::from_waker(&waker);
    send(&mut a, &mut cx, 1);
    assert!(ready(&mut a, &mut cx).is_pending());
    drop(b);
    assert_eq!(count.get(), 1, "the waiting writer was woken");
    match ready(&mut a, &mut cx) {
        Poll::Ready(Err(error)) => assert!(error.to_string().contains("dropped"), "{error}"),
        other => panic!("expected the peer's loss, got {other:?}"),
    }
    let error = Pin::new(&mut a)
        .start_send(Command::Publish {
            topic: Topic::from("t:1"),
            message: numbered("t", "1", 2),
        })
        .unwrap_err();
    assert!(error.to_string().contains("dropped"), "{error}");
}

#[test]
fn close_ends_the_other_sides_stream_after_what_was_sent() {
    let (mut a, mut b) = worker::channel(4096);
    let (count, waker) = Count::waker();
    let mut cx = Context::from_waker(&waker);
    send(&mut a, &mut cx, 1);
    send(&mut a, &mut cx, 2);
    assert!(matches!(
        Pin::new(&mut a).poll_close(&mut cx),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(read(&mut b), [1, 2]);
    assert!(matches!(
        Pin::new(&mut b).poll_next(&mut cx),
        Poll::Ready(None)
    ));
    // A reader waiting when the writer closes is woken to find the end.
    let (mut c, mut d) = worker::channel::<serde_json::Value>(4096);
    assert!(Pin::new(&mut d).poll_next(&mut cx).is_pending());
    let before = count.get();
    assert!(matches!(
        Pin::new(&mut c).poll_close(&mut cx),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(count.get(), before + 1);
    assert!(matches!(
        Pin::new(&mut d).poll_next(&mut cx),
        Poll::Ready(None)
    ));
}

/// Outside a Tokio runtime, `spawn` says so, and starts no thread (it used to start the
/// worker, then panic).
#[test]
fn spawn_outside_a_runtime_is_an_error_and_starts_nothing() {
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ran = std::sync::Arc::clone(&started);
    let error = worker::spawn(move |_events: EventTarget| async move {
        ran.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .map(|_| ())
    .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Config, "{error}");
    assert!(
        error.to_string().contains("outside a Tokio runtime"),
        "{error}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
}

/// The worker-pool example (`examples/worker.rs`), run as a user would: every call is
/// answered, by all four workers.
#[tokio::test]
async fn the_worker_pool_example_answers_every_call() {
    let example = std::process::Command::new(common::example_binary("worker"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output =
        common::output_within(example, "the worker example", Duration::from_secs(60)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1000 calls answered by 4 workers"),
        "{stdout}"
    );
}

/// A worker that panics right after publishing still delivers what it published (its target
/// is closed, and flushed, before the panic goes on), and the join handle reports the panic.
/// The publish is queued (the worker's driver has not run yet when it is made): it was
/// dropped unsent when the panic dropped the worker's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_panicking_worker_published_is_delivered() {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (events, join) = worker::spawn(move |events: EventTarget| async move {
        // Blocks the worker's thread before its driver has ever run.
        go_rx.recv().unwrap();
        events
            .dispatch_event(numbered("last", "1", 7))
            .await
            .unwrap();
        panic!("the worker failed after its last words");
    })
    .unwrap();
    let mut last = events.subscribe("last:1").await.unwrap();
    go_tx.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), last.next())
        .await
        .expect("an item in time");
    assert_eq!(number_of(&got.expect("delivered").expect("no gap")), 7);
    let joined = tokio::task::spawn_blocking(move || join.join())
        .await
        .unwrap();
    assert!(joined.is_err(), "the join handle reports the panic");
}
