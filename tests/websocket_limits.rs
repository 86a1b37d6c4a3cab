//! What a WebSocket peer sends cannot make memory grow without bound: an oversized message is
//! refused from its header (a counting allocator measures the peak while a peer streams 16 MiB
//! at a server that accepts 1 MiB), and the pongs a peer that pings and never reads makes the
//! server answer are bounded. The tests take turns: the allocator counts the whole process.

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

/// Held by each test, so that one's allocations do not count in another's peak.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "current_thread")]
async fn memory_does_not_grow_by_the_size_of_an_oversized_message() {
    let _turn = ONE_AT_A_TIME.lock().await;
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

/// A peer that floods the server with pings and never reads: tungstenite answers each with a
/// pong, which waits in its write buffer for a socket that never drains. The buffer is bounded
/// (past it, only the latest pong is kept): 64 MiB of pings leave memory grown by far less,
/// where every pong stayed (about 62 MiB). A message sent after the flood still arrives.
#[tokio::test(flavor = "current_thread")]
async fn a_ping_flood_from_a_peer_that_never_reads_is_bounded() {
    const FLOOD: usize = 64 << 20;
    let _turn = ONE_AT_A_TIME.lock().await;
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        // A small receive buffer: the server's pongs fill the socket soon.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(address).await.unwrap();
        tokio_tungstenite::client_async(format!("ws://{address}/"), stream)
            .await
            .unwrap()
            .0
    });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut raw = client.await.unwrap();
    let mut subscription = server.subscribe("after:1").await.unwrap();

    let baseline = CountingAllocator::current();
    CountingAllocator::reset_peak();
    // Masked pings with 125-byte payloads (a zero mask key leaves them as they are).
    let mut ping = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    ping.extend_from_slice(&[b'p'; 125]);
    let pings: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 512)
        .collect();
    let envelope = br#"{"type":"after","id":"1","payload":1}"#;
    let mut after = vec![0x81, 0x80 | envelope.len() as u8, 0, 0, 0, 0];
    after.extend_from_slice(envelope);
    let socket = raw.get_mut();
    let writer = async {
        let mut sent = 0;
        while sent < FLOOD {
            socket.write_all(&pings).await.unwrap();
            sent += pings.len();
        }
        socket.write_all(&after).await.unwrap();
    };
    let reader = async { tokio::time::timeout(Duration::from_secs(60), subscription.next()).await };
    let (_, got) = tokio::join!(writer, reader);
    let event = got
        .expect("the message after the flood in time")
        .expect("open")
        .expect("no gap");
    assert_eq!(event.payload, 1);
    let grown = CountingAllocator::peak().saturating_sub(baseline);
    assert!(
        grown < 8 << 20,
        "memory grew by {grown} bytes under {FLOOD} bytes of pings nobody read the pongs of"
    );
    // With the write buffer full of pongs, a publish waits for room (held, not refused), and
    // arrives once the peer reads.
    let pad = "x".repeat(4096);
    server
        .dispatch_event(alkdev_pubsub::Envelope::new(
            "back",
            "1",
            pad.clone().into(),
        ))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match raw.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => break text,
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the publish arrives once the peer reads");
    assert_eq!(
        answer.as_str(),
        format!(r#"{{"type":"back","id":"1","payload":"{pad}"}}"#)
    );
}
