//! The codec layer encodes frames into a shared buffer and splits them off: every frame must
//! still be exactly its envelope's encoding, whatever the sizes, and a failed encoding must
//! leave nothing behind for the next frame.

use alkdev_pubsub_layers::codec::{Codec, Json, WithCodec};
use alkdev_pubsub_layers::{Command, Envelope, Error, ErrorKind, Topic};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde::ser::{Error as _, SerializeMap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A payload that either serializes as a string of `n` bytes, or writes part of an object and
/// then fails.
enum Payload {
    Text(usize),
    FailHalfway,
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Text(n) => serializer.serialize_str(&"x".repeat(*n)),
            Payload::FailHalfway => {
                let mut map = serializer.serialize_map(None)?;
                map.serialize_entry("written", "before the failure")?;
                Err(S::Error::custom("this payload refuses to serialize"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| Payload::Text(text.len()))
    }
}

#[tokio::test]
async fn every_frame_is_exactly_its_encoding_across_buffer_chunks() {
    let (tx, rx) = mpsc::unbounded::<Command<Bytes>>();
    let mut sink = WithCodec::<_, Json, Payload>::new(
        tx.sink_map_err(|_| Error::closed("the test's receiver")),
        Json,
    );
    // Small frames, frames around and far over the 8 KiB chunk, and failures among them.
    let sizes = [
        0, 10, 100, 3_000, 8_000, 8_200, 50, 70_000, 1, 5_000, 5_000, 5_000,
    ];
    let mut expected = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let envelope = Envelope::new("sized", i.to_string(), Payload::Text(size));
        expected.push(Json.encode(&envelope).expect("encodes"));
        sink.send(Command::Publish {
            topic: envelope.topic(),
            message: envelope,
        })
        .await
        .expect("sent");
        if i % 3 == 1 {
            let failing = Envelope::new("failing", i.to_string(), Payload::FailHalfway);
            let error = sink
                .send(Command::Publish {
                    topic: Topic::from("failing:x"),
                    message: failing,
                })
                .await
                .expect_err("the payload fails to serialize");
            assert_eq!(error.kind(), ErrorKind::Encode);
            assert!(error.message().contains("failing:x"), "{error}");
        }
    }
    drop(sink);
    let frames: Vec<Bytes> = rx
        .map(|command| match command {
            Command::Publish { message, .. } => message,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
        .await;
    assert_eq!(frames.len(), expected.len());
    for (i, (frame, expected)) in frames.iter().zip(&expected).enumerate() {
        assert_eq!(frame, expected, "frame {i} differs from its encoding");
    }
}

#[path = "../../tests/common/alloc.rs"]
mod alloc;

#[global_allocator]
static ALLOCATOR: alloc::CountingAllocator = alloc::CountingAllocator;

#[tokio::test]
async fn small_frames_after_a_large_one_do_not_keep_its_allocation_alive() {
    let (tx, mut rx) = mpsc::unbounded::<Command<Bytes>>();
    let mut sink = WithCodec::<_, Json, Payload>::new(
        tx.sink_map_err(|_| Error::closed("the test's receiver")),
        Json,
    );
    let publish = |size: usize| Command::Publish {
        topic: Topic::from("sized:x"),
        message: Envelope::new("sized", "x", Payload::Text(size)),
    };
    sink.send(publish(4 << 20)).await.expect("sent");
    let large = rx.next().await.expect("a frame");
    let before = alloc::CountingAllocator::current();
    // Small frames after it, kept alive, then the large one dropped: what stays allocated must
    // be about the small frames, not the 4 MiB the large one needed.
    let mut small = Vec::new();
    for _ in 0..10 {
        sink.send(publish(100)).await.expect("sent");
        small.push(rx.next().await.expect("a frame"));
    }
    drop(large);
    let after = alloc::CountingAllocator::current();
    assert!(
        after + (1 << 20) < before,
        "the large frame's memory is still held: {before} bytes before, {after} after"
    );
    assert_eq!(small.len(), 10);
}
