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
