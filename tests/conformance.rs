//! The testkit's conformance suite against every built-in transport that needs no server.

use alkdev_pubsub::testkit::{self, Pair};
use alkdev_pubsub::{worker, EventTarget, LocalTransport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_target_conforms() {
    testkit::run_all(|| async { Pair::loopback(EventTarget::local()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_transport_under_the_driver_conforms() {
    testkit::run_all(|| async { Pair::loopback(EventTarget::new(LocalTransport::new())) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pair_conforms() {
    testkit::run_all(|| async {
        let (a, b) = worker::channel(1024);
        Pair::new(EventTarget::new(a), EventTarget::new(b))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pair_set_up_as_spawn_does_conforms() {
    // Publishers flush as they go (`into_event_target`), as in `worker::spawn`.
    testkit::run_all(|| async {
        let (a, b) = worker::channel(1024);
        Pair::new(a.into_event_target(), b.into_event_target())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pair_across_threads_conforms() {
    // The subscriber side runs its driver on another thread's runtime.
    testkit::run_all(|| async {
        let (main_side, worker_side) = worker::channel(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let events = EventTarget::new(worker_side);
                let _ = ready_tx.send(events.clone());
                // Keep the runtime alive until the target closes.
                while !events.is_closed() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            });
        });
        let subscriber = ready_rx.await.expect("the worker thread started");
        Pair::new(EventTarget::new(main_side), subscriber)
    })
    .await;
}

/// A broken transport the suite must catch: a subscribe of a topic it subscribed before is
/// answered at once and not sent (it takes the topic for subscribed still), so once the
/// unsubscribe reached the broker the topic hears nothing.
struct ForgetsResubscribes {
    inner: alkdev_pubsub::testkit::BrokerConnection,
    seen: std::collections::HashSet<alkdev_pubsub::Topic>,
    answers: std::collections::VecDeque<alkdev_pubsub::Topic>,
}

impl futures::Sink<alkdev_pubsub::Command<bytes::Bytes>> for ForgetsResubscribes {
    type Error = alkdev_pubsub::Error;
    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_ready(cx)
    }
    fn start_send(
        mut self: std::pin::Pin<&mut Self>,
        command: alkdev_pubsub::Command<bytes::Bytes>,
    ) -> alkdev_pubsub::Result<()> {
        if let alkdev_pubsub::Command::Subscribe(topic) = &command {
            if !self.seen.insert(topic.clone()) {
                self.answers.push_back(topic.clone());
                return Ok(());
            }
        }
        std::pin::Pin::new(&mut self.inner).start_send(command)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<alkdev_pubsub::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

impl futures::Stream for ForgetsResubscribes {
    type Item = alkdev_pubsub::Result<alkdev_pubsub::Up<bytes::Bytes>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(topic) = self.answers.pop_front() {
            return std::task::Poll::Ready(Some(Ok(alkdev_pubsub::Up::Subscribed(topic))));
        }
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "\"leave.event:x\": no event within")]
async fn the_suite_catches_a_transport_that_forgets_resubscribes() {
    let broker = testkit::MemoryBroker::new();
    let target = |broker: &testkit::MemoryBroker| {
        let inner = broker.connect().expect("the broker accepts");
        use tower::Layer;
        let events: EventTarget = EventTarget::new(
            alkdev_pubsub::layers::CodecLayer::json().layer(ForgetsResubscribes {
                inner,
                seen: Default::default(),
                answers: Default::default(),
            }),
        );
        events
    };
    testkit::unsubscribe_on_last_listener(Pair::new(target(&broker), target(&broker))).await;
}
