//! The transport vocabulary of [alkdev-pubsub] and the tower layers that build a transport
//! stack.
//!
//! A transport is a [`Sink`](futures::Sink) of [`Command`]s (publish, subscribe, unsubscribe)
//! and a [`Stream`](futures::Stream) of [`Up`] items (messages and signals). Anything that is
//! both is a [`Transport`]: the trait has a blanket impl, so a user's own type needs no
//! ceremony. Raw transports carry [`Bytes`](bytes::Bytes) frames; the [codec layer](codec)
//! turns them into [`Envelope`]s.
//!
//! # Layers
//!
//! Each layer is a [`tower::Layer`] whose product is itself a transport, so
//! [`tower::ServiceBuilder`] stacks them (the first `.layer` is the outermost):
//!
//! | layer | down (commands) | up (messages, signals) |
//! |---|---|---|
//! | [`ParseErrorLayer`] | unchanged | a decode error is skipped and counted, quarantined, or surfaced, by policy; the stream goes on |
//! | [`CodecLayer`] | envelopes encoded to frames (JSON: exactly `{"type","id","payload"}`) | frames decoded once; failures become decode errors with the channel and the frame |
//! | [`PrefixLayer`] | the prefix added to every topic | the prefix stripped; messages on foreign channels dropped and counted |
//! | [`RetryLayer`] | publishes (and the publishes of a flush) failing with a transient error sent again, bounded | unchanged |
//! | [`ReconnectLayer`] | during an outage, subscriptions remembered and publishes buffered (bounded) | on failure: reconnect with backoff, replay subscriptions, send the buffer, then [`Up::Reconnected`] |
//!
//! The typical stack over a raw transport factory:
//!
//! ```
//! use alkdev_pubsub_layers::reconnect::{Backoff, ReconnectLayer};
//! use alkdev_pubsub_layers::{CodecLayer, Command, Envelope, ParseErrorLayer, PrefixLayer, Up};
//! use futures::{SinkExt, StreamExt};
//! use serde_json::json;
//! use tower::ServiceBuilder;
//! # use std::collections::VecDeque;
//! # use std::pin::Pin;
//! # use std::task::{Context, Poll};
//! # use alkdev_pubsub_layers::Error;
//! # use bytes::Bytes;
//! # /// A raw loopback: what is published comes back on its channel.
//! # #[derive(Default)]
//! # struct Loopback(VecDeque<Up<Bytes>>);
//! # impl futures::Sink<Command<Bytes>> for Loopback {
//! #     type Error = Error;
//! #     fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> { Poll::Ready(Ok(())) }
//! #     fn start_send(mut self: Pin<&mut Self>, c: Command<Bytes>) -> Result<(), Error> {
//! #         let up = match c {
//! #             Command::Publish { topic, message } => Up::Message { channel: Some(topic), message },
//! #             Command::Subscribe(t) => Up::Subscribed(t),
//! #             Command::Unsubscribe(t) => Up::Unsubscribed(t),
//! #         };
//! #         self.0.push_back(up);
//! #         Ok(())
//! #     }
//! #     fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> { Poll::Ready(Ok(())) }
//! #     fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Error>> { Poll::Ready(Ok(())) }
//! # }
//! # impl futures::Stream for Loopback {
//! #     type Item = Result<Up<Bytes>, Error>;
//! #     fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
//! #         match self.0.pop_front() { Some(up) => Poll::Ready(Some(Ok(up))), None => Poll::Pending }
//! #     }
//! # }
//! # async fn connect() -> Result<Loopback, Error> { Ok(Loopback::default()) }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let mut transport = ServiceBuilder::new()
//!     .layer(ParseErrorLayer::skip())
//!     .layer(CodecLayer::json())
//!     .layer(PrefixLayer::new("alk:events:"))
//!     .layer(ReconnectLayer::new(Backoff::default()))
//!     .service(connect); // any `Fn() -> impl Future<Output = Result<RawTransport>>`
//!
//! transport.send(Command::Subscribe("session.status:p1".into())).await?;
//! let envelope = Envelope::new("session.status", "p1", json!({ "state": "running" }));
//! transport
//!     .send(Command::Publish { topic: envelope.topic(), message: envelope.clone() })
//!     .await?;
//! assert!(matches!(transport.next().await, Some(Ok(Up::Subscribed(t))) if t == "session.status:p1"));
//! match transport.next().await {
//!     Some(Ok(Up::Message { channel, message })) => {
//!         assert_eq!(channel.as_deref(), Some("session.status:p1")); // prefix stripped
//!         assert_eq!(message, envelope);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! In an application, hand the stack to `alkdev_pubsub::EventTarget::new`.
//!
//! [alkdev-pubsub]: https://docs.rs/alkdev-pubsub
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod codec;
pub mod parse_error;
pub mod prefix;
pub mod reconnect;
pub mod retry;

mod command;
mod envelope;
mod error;
mod kept;
mod topic;
mod transport;

pub use command::{Command, Up};
pub use envelope::Envelope;
pub use error::{quote, Error, ErrorKind};
pub use topic::{check_topic_len, Topic, MAX_TOPIC_LEN};
pub use transport::Transport;

pub use codec::{Codec, CodecLayer, Json};
pub use parse_error::ParseErrorLayer;
pub use prefix::{Counter, PrefixLayer};
pub use reconnect::{Backoff, ReconnectLayer};
pub use retry::RetryLayer;

/// The `tower` these layers implement [`tower::Layer`] for: stack them with its
/// `ServiceBuilder` at this version (`alkdev_pubsub::layers::tower::ServiceBuilder`), whatever
/// `tower` the application itself depends on.
pub use tower;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
