//! Publish and listen to `{ "type", "id", "payload" }` envelopes by topic, over pluggable
//! transports: in-process, worker threads, Redis and WebSocket.
//!
//! - [`EventTarget`] keeps the listener map in front of a [`Transport`]: callbacks or
//!   [`Subscription`] streams per topic (`"{type}:{id}"`), bounded queues, one decode per
//!   message shared by every listener.
//! - [`PubSub`] is the typed front: `publish(type, id, payload)` and `subscribe(type, id)`.
//! - [`layers`] holds the transport vocabulary and the tower layers (codec, prefix,
//!   parse-error policy, reconnect) that make a raw transport robust.
//!
//! ```
//! use alkdev_pubsub::PubSub;
//! use futures::StreamExt;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct Status {
//!     state: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), alkdev_pubsub::Error> {
//! let pubsub = PubSub::<Status>::local();
//! let mut statuses = pubsub.subscribe("session.status", "proj_123").await?;
//! pubsub
//!     .publish("session.status", "proj_123", Status { state: "running".into() })
//!     .await?;
//! assert_eq!(statuses.next().await.unwrap().state, "running");
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! - `redis`: [`redis::RedisTransport`], Redis pub/sub.
//! - `redis-cluster`: `redis::cluster::RedisClusterTransport`, sharded pub/sub on a Redis Cluster
//!   (`SPUBLISH` / `SSUBSCRIBE`); implies `redis`.
//! - `websocket`: [`websocket::WebSocketTransport`] (client and server) and
//!   [`websocket::WebSocketListener`].
//! - `websocket-rustls`: `wss://` for the WebSocket client (rustls, the webpki roots, or a
//!   client configuration of your own); implies `websocket`.
//! - `testkit`: the [conformance suite](testkit) every transport must pass, for people who
//!   plug in their own.
//!
//! The worker transport ([`worker`]) and the in-process target need no feature.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use alkdev_pubsub_layers as layers;
pub use alkdev_pubsub_layers::{Command, Envelope, Error, ErrorKind, Result, Topic, Transport, Up};

mod local;
mod pubsub;
mod queue;
mod stats;
mod subscription;
mod target;
mod waker;

/// The instant `duration` from now, or one about thirty years away for a duration past what an
/// instant can hold (a timeout "disabled" with `Duration::MAX`): `Instant + Duration` would
/// panic there.
#[cfg(any(feature = "redis", feature = "websocket"))]
fn deadline_in(duration: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(30 * 365 * 24 * 3600))
}
pub mod worker;

#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "testkit")]
pub mod testkit;

#[cfg(feature = "websocket")]
pub mod websocket;

pub use local::LocalTransport;
pub use pubsub::{PubSub, TypedSubscription};
pub use stats::Stats;
pub use subscription::{Gap, Overflow, SubscribeOptions, Subscription, DEFAULT_CAPACITY};
pub use target::{
    Builder, EventTarget, ListenerId, WeakEventTarget, DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_PUBLISH_CAPACITY,
};

/// The README's Rust examples, compiled (and the first one run) as doc tests, so that they
/// stay true to the API.
#[cfg(all(doctest, feature = "redis", feature = "testkit"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
