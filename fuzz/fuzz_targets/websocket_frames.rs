//! Arbitrary raw WebSocket frames from a client, into the server side of
//! [`WebSocketTransport`] under the parse-error and codec layers, as a hub would read a spoke;
//! or (a flag of the first frame) from a server into the client side, as a spoke reads its hub.
//!
//! Never panics and always ends: text, binary, control, continuation and reserved frames,
//! masked or not, with lengths that lie (oversized declarations, truncated bodies), invalid
//! UTF-8, garbage payloads. A message over the limit (4 KiB here) is refused from its header
//! (`TooLarge`, then the connection ends) without buffering it; every message that comes up is
//! a whole envelope that decodes; the transport's stream ends at the end of the input.
//!
//! # Input format
//!
//! A sequence of frames, each: a header byte (FIN, RSV and opcode bits as on the wire), a mask
//! flag byte (`& 1`: masked; `& 2`: with a key that is not zero, the body masked with it;
//! `& 4` in the first frame: the transport is the client, not the server), a length kind byte
//! (`% 4`: the true length, a lie that is smaller, a lie that is larger, a huge 64-bit length),
//! a little-endian `u16` body length, then the body.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use alkdev_pubsub::layers::{CodecLayer, Command, ParseErrorLayer, Up};
use alkdev_pubsub::websocket::{WebSocketConfig, WebSocketTransport};
use alkdev_pubsub::{Envelope, ErrorKind};
use bytes::Bytes;
use futures::{Sink, Stream, StreamExt};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::Role;
use tower::ServiceBuilder;

const LIMIT: usize = 4096;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// The transport, checking that every message it brings up is within the limit, as it came
/// (the codec's re-encoding of a decoded envelope is another size: `1e15` prints longer).
struct WithinLimit<T>(T);

impl<T: Stream<Item = alkdev_pubsub::Result<Up<Bytes>>> + Unpin> Stream for WithinLimit<T> {
    type Item = T::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.0).poll_next(cx);
        if let Poll::Ready(Some(Ok(Up::Message { message, .. }))) = &item {
            assert!(message.len() <= LIMIT, "a message over the limit came up");
        }
        item
    }
}

impl<T: Sink<Command<Bytes>, Error = alkdev_pubsub::Error> + Unpin> Sink<Command<Bytes>>
    for WithinLimit<T>
{
    type Error = alkdev_pubsub::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Command<Bytes>) -> Result<(), Self::Error> {
        Pin::new(&mut self.0).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// A mask key that changes the body it masks.
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The raw bytes of the frames described by `data`, and which side reads them.
fn frames(mut data: &[u8]) -> (Vec<u8>, Role) {
    let mut wire = Vec::new();
    let role = match data.get(1) {
        Some(flags) if flags & 4 != 0 => Role::Client,
        _ => Role::Server,
    };
    let take = |n: usize, data: &mut &[u8]| {
        let (head, rest) = data.split_at(n.min(data.len()));
        *data = rest;
        head.to_vec()
    };
    for _ in 0..64 {
        if data.is_empty() {
            break;
        }
        let header = take(1, &mut data).first().copied().unwrap_or(0x81);
        let flags = take(1, &mut data).first().copied().unwrap_or(1);
        let masked = flags & 1 == 1;
        let key = if flags & 2 != 0 { KEY } else { [0; 4] };
        let kind = take(1, &mut data).first().copied().unwrap_or(0) % 4;
        let len_bytes = take(2, &mut data);
        let len = u16::from_le_bytes([
            len_bytes.first().copied().unwrap_or(0),
            len_bytes.get(1).copied().unwrap_or(0),
        ]) as usize;
        let body = take(len, &mut data);
        let declared: u64 = match kind {
            0 => body.len() as u64,
            1 => (body.len() / 2) as u64,
            2 => body.len() as u64 + 17,
            _ => 1 << 40,
        };
        wire.push(header);
        let mask_bit = if masked { 0x80 } else { 0 };
        if declared < 126 {
            wire.push(mask_bit | declared as u8);
        } else if declared <= u16::MAX as u64 {
            wire.push(mask_bit | 126);
            wire.extend_from_slice(&(declared as u16).to_be_bytes());
        } else {
            wire.push(mask_bit | 127);
            wire.extend_from_slice(&declared.to_be_bytes());
        }
        if masked {
            // Masked with the key, so that unmasking gives the body back (a zero key leaves
            // it as it is).
            wire.extend_from_slice(&key);
            wire.extend(body.iter().enumerate().map(|(i, byte)| byte ^ key[i % 4]));
        } else {
            wire.extend_from_slice(&body);
        }
    }
    (wire, role)
}

fuzz_target!(|data: &[u8]| {
    let (wire, role) = frames(data);
    // A frame takes at least 2 bytes on the wire (a length that lies turns one described frame
    // into several): at most one item per frame, plus the end of the connection.
    let max_items = wire.len() / 2 + 2;
    runtime().block_on(async move {
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        let config = WebSocketConfig::new()
            .max_message_size(LIMIT)
            .ping_interval(Duration::from_secs(3600))
            .idle_timeout(Duration::from_secs(3600));
        let transport = WebSocketTransport::from_raw_socket(ours, role, config).await;
        let mut stack = ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::<_, serde_json::Value>::json())
            .service(WithinLimit(transport));
        let writer = async move {
            let _ = peer.write_all(&wire).await;
            let _ = peer.shutdown().await;
            // Keep the peer's end open until our side is done reading, so its own writes
            // (pongs, a close frame) have somewhere to go.
            peer
        };
        let reader = async {
            let mut items = 0usize;
            while let Some(item) = stack.next().await {
                items += 1;
                assert!(
                    items <= max_items,
                    "more items ({items}) than frames on the wire"
                );
                match item {
                    // Within the limit as it came: checked below the codec (`WithinLimit`).
                    Ok(Up::Message { channel, message }) => {
                        let _: Envelope = message;
                        assert!(channel.is_none(), "WebSocket frames carry no channel");
                    }
                    Ok(Up::Skipped(error)) => assert!(error.is_decode(), "{error}"),
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(error) => {
                        assert!(
                            matches!(
                                error.kind(),
                                ErrorKind::TooLarge
                                    | ErrorKind::Protocol
                                    | ErrorKind::ConnectionLost
                                    | ErrorKind::Timeout
                            ),
                            "unexpected error {error}"
                        );
                    }
                }
            }
        };
        let (peer, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("the transport's stream ends once the input is consumed");
        drop(peer);
    });
});
