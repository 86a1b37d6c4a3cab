//! An oversized WebSocket message is refused from its header: memory does not grow by its
//! size. A counting allocator measures the peak while a peer streams 16 MiB at a server that
//! accepts 1 MiB.

use std::time::Duration;

use alkdev_pubsub::websocket::WebSocketListener;
use alkdev_pubsub::EventTarget;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

#[path = "common/alloc.rs"]
mod alloc;
use alloc::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[tokio::test(flavor = "current_thread")]
async fn memory_does_not_grow_by_the_size_of_an_oversized_message() {
    const DECLARED: u64 = 16 << 20;
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let client =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut raw = client.await.unwrap();
    let mut subscription = server.subscribe("big:1").await.unwrap();

    let baseline = CountingAllocator::current();
    CountingAllocator::reset_peak();
    // One masked text frame declaring 16 MiB, streamed in 64 KiB chunks from one buffer.
    let socket = match raw.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(socket) => socket,
        _ => unreachable!("ws:// is plain TCP"),
    };
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&DECLARED.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // mask key: zeros leave the payload as is
    socket.write_all(&header).await.unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let writer = async {
        let mut sent = 0;
        while sent < DECLARED {
            if socket.write_all(&chunk).await.is_err() {
                break; // the server closed on us: refused
            }
            sent += chunk.len() as u64;
        }
    };
    let reader = async { tokio::time::timeout(Duration::from_secs(20), subscription.next()).await };
    let (_, end) = tokio::join!(writer, reader);
    assert!(end.expect("the subscription ended in time").is_none());
    let error = server
        .dispatch_event(alkdev_pubsub::Envelope::new("big", "1", 0.into()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("over the limit"), "{error}");

    let grown = CountingAllocator::peak().saturating_sub(baseline);
    assert!(
        grown < 4 << 20,
        "memory grew by {grown} bytes while refusing a {DECLARED}-byte message (limit 1 MiB)"
    );
}
