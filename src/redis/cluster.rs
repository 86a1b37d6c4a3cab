//! Redis Cluster sharded pub/sub (feature `redis-cluster`).
//!
//! Classic `PUBLISH` in a cluster is broadcast to every node, so it does not scale with the
//! cluster. Sharded pub/sub (Redis 7) routes each channel to the master that owns its hash
//! slot: [`RedisClusterTransport`] publishes with `SPUBLISH` and subscribes with `SSUBSCRIBE`,
//! one channel per command (channels of different slots are never combined: that would be a
//! `CROSSSLOT` error), each confirmed by the owning node.
//!
//! It rides on redis-rs's cluster connection (RESP3), which follows slot moves (`MOVED`,
//! topology refresh) and reconnects nodes. When a node's connection drops (a restart, a
//! failover), the transport subscribes every active channel again — each on the node that now
//! owns it — and once all are confirmed sends [`Up::Reconnected`], so subscribers learn that
//! events may have been missed. When a slot moves to another master (a reshard), its old owner
//! unsubscribes the slot's channels on its own: those are subscribed again on the new owner,
//! followed by [`Up::Reconnected`] the same way. A channel refused for good then (an ACL, say)
//! is reported with [`Up::SubscribeFailed`]; when a minute of attempts has not brought every
//! channel back, the transport fails with a connection error, so that the reconnect layer
//! builds a new one rather than a notice claiming the channel is back. TLS (`rediss://`
//! seeds) is not supported.
//!
//! **Confirmations.** A subscribe counts once the node's own `ssubscribe` push is read, not
//! on redis-rs's answer alone: during a reshard that moves several slots away from a master,
//! redis-rs 1.8 can take an unprompted `sunsubscribe` from that master for the answer to a
//! pending `SSUBSCRIBE` (and drop the real answer, a `MOVED` redirect). A subscribe answered
//! without its push is sent again, after the response timeout. An unsubscribe is answered with
//! its `sunsubscribe` push, after the channel's messages that came before it, or a response
//! timeout after the node's answer if no push comes.
//!
//! **Liveness.** A node that stops answering without closing its connection (a host that
//! died, a network partition, a paused server) would leave its channels deaf with no error:
//! the transport pings every master every 5 s ([`RedisClusterTransport::ping_interval`]), and
//! a ping unanswered within the response timeout fails it with a connection error, for the
//! reconnect layer to build a new one.
//!
//! **Guarantees.** As with classic pub/sub, a message published while its shard is down or
//! failing over is lost to the subscribers of then; messages of one channel come in the order
//! they were published (one channel lives on one shard), but for those sent again (below: a
//! message sent again may arrive twice, and after ones published later). redis-rs reads the
//! nodes' connections in a task of its own, so a reader that falls behind (an event target
//! waiting for room in a full [`Block`](crate::Overflow::Block) subscription) is not cut off
//! by Redis, as it would be on one node: the transport keeps up to 32 MiB of messages for it,
//! then drops what comes, and tells of the gap with [`Up::Reconnected`] where it is.
//! Publishing to a shard that is down fails with an error of kind
//! [`Busy`](crate::ErrorKind::Busy) (`CLUSTERDOWN`, `TRYAGAIN`) or a connection error; the [retry layer](crate::layers::retry) resends transient ones. The
//! publishes to one slot go in one pipeline, and redis-rs sends a pipeline again whole when a
//! reply in it asks for that (`MOVED`, `TRYAGAIN`, a connection that dropped partway), so a
//! message published before that reply may be delivered twice: at least once, as with the
//! retry layer. Once a pipeline has failed for now or for want of a connection, the publishes
//! fed after it are not sent: the next flush fails, answering all of them, and a layer above
//! that sends them again does so in order (sent, they would have arrived before the failed
//! ones they follow). A flush whose pipeline to one master failed for want of a connection
//! fails whole, its other masters' pipelines delivered: under a reconnect layer, that rebuilds
//! the whole transport, which sends every publish the failed flush covered again (the healthy
//! masters' too), once per rebuild until the master is back or replaced, and every subscriber
//! hears [`Up::Reconnected`].
//!
//! **JavaScript peers.** Sharded and classic pub/sub do not see each other: a `PUBLISH`
//! reaches no `SSUBSCRIBE`, an `SPUBLISH` no `SUBSCRIBE`. The JavaScript design's Redis event
//! target over an ioredis `Cluster` uses classic pub/sub. To talk with it on a cluster, use
//! [`RedisTransport`](super::RedisTransport) on any node instead (a classic `PUBLISH` is
//! broadcast to every node, which is why it does not scale), under a reconnect layer whose
//! factory moves on to the next node when one fails:
//!
//! ```no_run
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
//! use alkdev_pubsub::redis::RedisConfig;
//! use alkdev_pubsub::EventTarget;
//! use tower::ServiceBuilder;
//!
//! let nodes = ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"];
//! let attempt = Arc::new(AtomicUsize::new(0));
//! let events: EventTarget = EventTarget::new(
//!     ServiceBuilder::new()
//!         .layer(ParseErrorLayer::skip())
//!         .layer(CodecLayer::json())
//!         .layer(ReconnectLayer::new(Backoff::default()))
//!         .service(move || {
//!             let node = nodes[attempt.fetch_add(1, Ordering::Relaxed) % nodes.len()];
//!             RedisConfig::new().connect(node)
//!         }),
//! );
//! ```
//!
//! **Prefixes and hash tags.** The prefix layer works unchanged. A prefix holding a hash tag,
//! such as `{alk}:events:`, pins every channel of the application to one slot, hence one
//! shard: ordering across channels and fewer connections, but no scaling at all — one master
//! carries all the traffic. Usually one wants a plain prefix (`alk:events:`) so that channels
//! spread over the shards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Sink, Stream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::redis_error;
use crate::layers::{Command, Error, ErrorKind, Result, Topic, Up};

/// Publishes fed beyond this many, or this many bytes ([`MAX_BATCH_BYTES`]), wait for the
/// batch in flight.
const MAX_BATCH: usize = 4096;
/// The bytes (channels and payloads) of a batch past which the next publish waits for the
/// batch in flight, as on one node. A single larger publish is still taken.
const MAX_BATCH_BYTES: usize = super::MAX_UNSENT_BYTES;
/// How many bytes of messages from the cluster may wait for the transport's reader (an event
/// target whose `Block` subscription is full stops reading). redis-rs reads the sockets in a
/// task of its own, so Redis never sees the backpressure and never cuts the client off (its
/// output buffer limit for pub/sub is 32 MiB by default): past this, messages are dropped,
/// and the reader learns of the gap where it is ([`Up::Reconnected`]).
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// How often the masters are pinged by default ([`RedisClusterTransport::ping_interval`]).
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// The liveness is looked at when no push is ready, and at least once per this many pushes.
const LIVENESS_EVERY: u32 = 1024;
/// How long subscribing channels again (after a node dropped, or a slot moved) is tried, backing
/// off to 1 s between attempts, before the transport fails: long enough for a restart or a
/// failover. An attempt under way when it runs out is waited for (up to the response timeout).
/// A subscribe refused for now (`TRYAGAIN`, `CLUSTERDOWN`) is tried as long before it is
/// answered with the refusal.
const RESUBSCRIBE_FOR: Duration = Duration::from_secs(60);

/// The cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its `{hash tag}` when it
/// has a non-empty one, modulo 16,384.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// What the control side is doing: one (un)subscribe at a time, in order.
enum Control {
    Idle,
    InFlight {
        command: Command<()>,
        reply: BoxFuture<'static, Result<()>>,
    },
    /// An unsubscribe the node answered: told once its `sunsubscribe` push is read (see
    /// `handle_push`), or a response timeout after the answer if none comes.
    Leaving {
        topic: Topic,
        wait: Wait,
    },
    /// A subscribe the node answered: told once its `ssubscribe` push is read (see
    /// [`RedisClusterTransport::confirmed`]); sent again if none came.
    Confirming {
        topic: Topic,
        wait: Wait,
    },
    /// Subscribing channels again after a node's connection dropped or a slot moved.
    Resubscribing {
        reply: BoxFuture<'static, Result<Resubscribed>>,
        /// Channels refused for good by earlier passes.
        refused: Vec<(Topic, Error)>,
        /// When the first pass began (the attempts are bounded by [`RESUBSCRIBE_FOR`]).
        started: tokio::time::Instant,
    },
    /// Subscribed again: [`Up::Reconnected`] is told once every channel's `ssubscribe` push
    /// is read; those that got none are subscribed again.
    ConfirmingAgain {
        waiting: HashSet<Topic>,
        refused: Vec<(Topic, Error)>,
        started: tokio::time::Instant,
        wait: Wait,
    },
}

/// A wait for a push that may never come: over once the deadline has passed and every push
/// handed over by then has been read (the one waited for, had it come, among them).
struct Wait {
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// [`PushQueue::sent`] when the deadline had passed.
    mark: Option<u64>,
}

impl Wait {
    fn new(timeout: Duration) -> Self {
        Wait {
            deadline: Box::pin(tokio::time::sleep(timeout)),
            mark: None,
        }
    }

    /// Whether the wait is over, `read` items having been read from `queue`.
    fn over(&mut self, cx: &mut Context<'_>, queue: &PushQueue, read: u64) -> bool {
        if self.deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        read >= *self.mark.get_or_insert_with(|| queue.sent.load(Acquire))
    }
}

/// What a pass of subscribing channels again did: the channels refused for good (an ACL,
/// say), and those the nodes answered.
struct Resubscribed {
    refused: Vec<(Topic, Error)>,
    answered: Vec<Topic>,
}

/// The Redis Cluster sharded pub/sub transport: see the [module](self).
pub struct RedisClusterTransport {
    /// Subscribes, pings, and the nodes' pushes.
    connection: ClusterConnection,
    /// Publishes: a cluster connection of their own, without redis-rs's response timeout (a
    /// pipeline's time allows for its size: see `pipeline_timeout`).
    publisher: ClusterConnection,
    /// What redis-rs hands over, in order: messages (bounded by [`MAX_QUEUED_BYTES`]), gaps,
    /// and notices (disconnections, unsubscribes: few, never dropped).
    pushes: mpsc::UnboundedReceiver<Pushed>,
    /// Bytes of the messages in `pushes`, and messages dropped not yet reported (shared with
    /// the sender).
    queue: Arc<PushQueue>,
    /// SUNSUBSCRIBE answers still to come, per channel: this transport's own. One that comes
    /// unasked is a node dropping the channel.
    leaving: HashMap<Topic, u32>,
    /// Channels this transport sent an `SSUBSCRIBE` for, not confirmed yet.
    awaiting: HashSet<Topic>,
    /// Those of `awaiting` whose `ssubscribe` push was read since. A subscribe counts once its
    /// push is read, not on redis-rs's answer alone: during a reshard, redis-rs can take a
    /// node's unprompted `sunsubscribe` for the answer to a pending `SSUBSCRIBE` (and drop the
    /// real one, a `MOVED` redirect), and the channel would be reported subscribed on a node
    /// that no longer owns it. A push for a channel not awaited (redis-rs subscribes channels
    /// again on its own after a reconnect or a topology refresh) confirms nothing later. The
    /// push travels apart from the answer (redis-rs relays pushes from a task of its own): one
    /// that has not come a response timeout after the answer, once everything handed over by
    /// then is read, is taken as never coming, and the subscribe is sent again.
    confirmed: HashSet<Topic>,
    /// When the subscribe being confirmed was first sent (attempts are bounded by
    /// [`RESUBSCRIBE_FOR`]).
    confirm_started: Option<tokio::time::Instant>,
    /// Items read from `pushes`. A wait for a push ends (see [`Wait`]) once its deadline has
    /// passed and everything handed over by then is read: a reader behind a steady stream
    /// never finds the queue empty.
    read: u64,
    batch: Vec<(Topic, Bytes)>,
    /// The bytes of `batch`'s channels and payloads.
    batch_bytes: usize,
    in_flight: Option<BoxFuture<'static, Result<()>>>,
    pending: VecDeque<Command<()>>,
    control: Control,
    active: HashSet<Topic>,
    /// Every active channel is to be subscribed again (a node's connection dropped).
    resubscribe: bool,
    /// Active channels a node unsubscribed on its own (their slot moved to another master),
    /// to be subscribed again on their new owner.
    dropped: HashSet<Topic>,
    signals: VecDeque<Up<Bytes>>,
    reader: Option<Waker>,
    response_timeout: Duration,
    /// The largest message payload published or received ([`Self::max_message_size`]).
    max_message_size: usize,
    last_channel: Option<Topic>,
    /// A batch's failure, reported by the next flush.
    deferred: Option<Error>,
    ping_interval: Duration,
    /// Pushes read since the liveness was last looked at.
    read_since_check: u32,
    /// When the masters are pinged next.
    ping: Pin<Box<tokio::time::Sleep>>,
    /// A ping of every master under way.
    ping_reply: Option<BoxFuture<'static, Result<()>>>,
}

impl fmt::Debug for RedisClusterTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterTransport")
            .field("unsent_publishes", &self.batch.len())
            .field("active", &self.active.len())
            .field("pending_subscriptions", &self.pending.len())
            .finish()
    }
}

impl RedisClusterTransport {
    /// Connects to the cluster through `seeds` (`redis://host:port` of any of its nodes).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for seeds redis-rs cannot read or that ask for TLS
    /// (`rediss://`); [`ErrorKind::Rejected`] when a seed refuses the user or password
    /// (retrying cannot mend that: a reconnect layer gives up at once); [`ErrorKind::Connect`]
    /// when no seed leads to a cluster in time. Each names the seeds, without their passwords.
    /// With several seeds, redis-rs reports the failure of the seed that answered last: a
    /// refused password with another seed down may be either.
    pub async fn connect<S: AsRef<str>>(seeds: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::connect_with(seeds, Duration::from_secs(5)).await
    }

    /// Like [`connect`](Self::connect), with a timeout for connecting and for each answer (a
    /// slot's pipeline of publishes, timed with its sending, is given as long again for each
    /// whole MiB it carries). Publishes go over a cluster connection of their own.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with<S: AsRef<str>>(
        seeds: impl IntoIterator<Item = S>,
        timeout: Duration,
    ) -> Result<Self> {
        let seeds: Vec<String> = seeds.into_iter().map(|s| s.as_ref().to_owned()).collect();
        // For messages: never a password.
        let printed: Vec<String> = seeds.iter().map(|seed| super::redact(seed)).collect();
        let (pushed, pushes) = mpsc::unbounded_channel();
        let queue = Arc::new(PushQueue::default());
        let push_tx = {
            let queue = Arc::clone(&queue);
            move |push: PushInfo| -> std::result::Result<(), ()> {
                queue.offer(push, &pushed);
                // Never an error: redis-rs would stop handing pushes over.
                Ok(())
            }
        };
        let config_error = |e: redis::RedisError| {
            // redis-rs, built without TLS here, would say a feature is missing. (A user who
            // enables redis-rs's TLS in their own build gets TLS through it.)
            // Only a TLS seed redis-rs cannot read is the reason.
            let refused_tls = seeds.iter().find(|seed| {
                super::is_tls(seed)
                    && redis::IntoConnectionInfo::into_connection_info(seed.as_str()).is_err()
            });
            let message = match refused_tls {
                Some(seed) => super::tls_unsupported(seed).message().to_owned(),
                None => format!("cluster seeds {printed:?}: {e}"),
            };
            Error::with_source(ErrorKind::Config, message, e)
        };
        let client = ClusterClientBuilder::new(seeds.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push_tx)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(config_error)?;
        // Publishes are timed by the transport, which allows for their size.
        let publish_client = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(timeout)
            .build()
            .map_err(config_error)?;
        let connect_error = |e: redis::RedisError| {
            // redis-rs reports a seed's refusal of the password as an I/O error ("Failed to
            // create initial connections"), the refusal in its detail: retrying cannot mend
            // it, so it is `Rejected`, as on one node, not a connection failure.
            let kind = if refused_credentials(&e) {
                ErrorKind::Rejected
            } else {
                ErrorKind::Connect
            };
            Error::with_source(
                kind,
                format!("connecting to the cluster {printed:?}: {e}"),
                e,
            )
        };
        let no_answer = |_| {
            Error::new(
                ErrorKind::Connect,
                format!("connecting to the cluster {printed:?}: no answer within {timeout:?}"),
            )
        };
        let (connection, publisher) = futures::future::join(
            tokio::time::timeout(timeout, client.get_async_connection()),
            tokio::time::timeout(timeout, publish_client.get_async_connection()),
        )
        .await;
        let connection = connection.map_err(no_answer)?.map_err(connect_error)?;
        let publisher = publisher.map_err(no_answer)?.map_err(connect_error)?;
        Ok(RedisClusterTransport {
            connection,
            publisher,
            pushes,
            queue,
            leaving: HashMap::new(),
            awaiting: HashSet::new(),
            confirmed: HashSet::new(),
            confirm_started: None,
            read: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            in_flight: None,
            pending: VecDeque::new(),
            control: Control::Idle,
            active: HashSet::new(),
            resubscribe: false,
            dropped: HashSet::new(),
            signals: VecDeque::new(),
            reader: None,
            response_timeout: timeout,
            max_message_size: super::DEFAULT_MAX_MESSAGE_SIZE,
            last_channel: None,
            deferred: None,
            ping_interval: PING_INTERVAL,
            read_since_check: 0,
            ping: Box::pin(tokio::time::sleep(PING_INTERVAL)),
            ping_reply: None,
        })
    }

    /// How often every master is pinged (5 s by default): a ping unanswered within the
    /// response timeout fails the transport with an error of kind
    /// [`ConnectionLost`](ErrorKind::ConnectionLost), so that a node that went silent without
    /// closing its connection does not leave its channels deaf. `Duration::MAX` turns it off.
    ///
    /// ```no_run
    /// # async fn run() -> alkdev_pubsub::Result<()> {
    /// use alkdev_pubsub::redis::cluster::RedisClusterTransport;
    /// use std::time::Duration;
    ///
    /// let transport = RedisClusterTransport::connect(["redis://127.0.0.1:7000"])
    ///     .await?
    ///     .ping_interval(Duration::from_secs(1));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        self.ping_interval = interval;
        self.ping.as_mut().reset(crate::deadline_in(interval));
        self
    }

    /// Pings every master on schedule; a failed or unanswered ping is the connection's
    /// failure.
    fn poll_liveness(&mut self, cx: &mut Context<'_>) -> Result<()> {
        loop {
            if let Some(reply) = self.ping_reply.as_mut() {
                match reply.as_mut().poll(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(result) => {
                        self.ping_reply = None;
                        result?;
                    }
                }
            }
            // Looked at until it is pending (so that it wakes this task): a ping answered at
            // once is followed by the next wait.
            if self.ping.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let next = crate::deadline_in(self.ping_interval);
            self.ping.as_mut().reset(next);
            let mut connection = self.connection.clone();
            let timeout = self.response_timeout;
            self.ping_reply = Some(Box::pin(async move {
                let ping = connection.route_command(
                    redis::cmd("PING"),
                    redis::cluster_routing::RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                        None,
                    )),
                );
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(_)) => Ok(()),
                    // Silence is what this looks for. A node that refused the ping (an ACL,
                    // loading) answered; one whose connection failed is redis-rs's to
                    // reconnect, and its channels are subscribed again on the `Disconnection`
                    // it reports.
                    Ok(Err(error)) if error.is_timeout() => Err(Error::with_source(
                        ErrorKind::ConnectionLost,
                        format!("pinging the cluster's masters: {error}"),
                        error,
                    )),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "a ping of the cluster's masters failed");
                        Ok(())
                    }
                    Err(_) => Err(Error::connection_lost(format!(
                        "pinging the cluster's masters: no answer within {timeout:?}"
                    ))),
                }
            }));
        }
    }

    /// The largest message payload, in bytes, published or received (at most 512 MiB, Redis's
    /// own limit; 8 MiB by default, as for [`RedisConfig::max_message_size`](super::RedisConfig::max_message_size)).
    /// A bigger publish fails alone with an error of kind [`ErrorKind::TooLarge`] and is not
    /// sent. A bigger message received is skipped: the stream reports an error of that kind
    /// (an event target counts it in [`Stats::skipped`](crate::Stats::skipped)) and goes on
    /// with the next message. redis-rs has read it whole by then (it reads the nodes'
    /// connections itself): the limit keeps it from the layers above, not from memory.
    ///
    /// ```no_run
    /// # async fn run() -> alkdev_pubsub::Result<()> {
    /// use alkdev_pubsub::redis::cluster::RedisClusterTransport;
    ///
    /// let transport = RedisClusterTransport::connect(["redis://127.0.0.1:7000"])
    ///     .await?
    ///     .max_message_size(1 << 20);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.min(super::resp::MAX_BULK);
        self
    }

    fn send_batch(&mut self) {
        if self.in_flight.is_some() || self.batch.is_empty() {
            return;
        }
        if self
            .deferred
            .as_ref()
            .is_some_and(|e| e.is_transient() || e.is_unrecoverable())
        {
            // A batch since the last flush failed in a way a layer above sends it again (the
            // retry layer, the reconnect layer): that flush fails, answering everything fed
            // since the one before, which is then sent again in order. Sent now, these would
            // arrive before the failed ones they follow.
            self.batch.clear();
            self.batch_bytes = 0;
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        // One pipeline per hash slot (a pipeline may not cross slots), in feed order within
        // each: a channel lives in one slot, so its order is kept; slots go out concurrently.
        let mut pipelines: Vec<(u16, redis::Pipeline, usize, usize)> = Vec::new();
        // Each slot's pipeline, found by its slot (a batch of many topics spans thousands of
        // slots: a search of the list for each publish was quadratic), the last one first (a
        // publisher repeats its topics).
        let mut by_slot: HashMap<u16, usize, foldhash::fast::RandomState> = HashMap::default();
        let mut last: Option<(u16, usize)> = None;
        for (channel, frame) in &batch {
            let slot = hash_slot(channel.as_bytes());
            let index = match last {
                Some((last_slot, index)) if last_slot == slot => index,
                _ => {
                    let index = *by_slot.entry(slot).or_insert_with(|| {
                        pipelines.push((slot, redis::pipe(), 0, 0));
                        pipelines.len() - 1
                    });
                    last = Some((slot, index));
                    index
                }
            };
            let (_, pipeline, count, bytes) = &mut pipelines[index];
            *bytes += channel.len() + frame.len();
            // Sized up front, as in the single-node transport.
            let mut publish =
                redis::Cmd::with_capacity(3, "SPUBLISH".len() + channel.len() + frame.len());
            publish
                .arg("SPUBLISH")
                .arg(channel.as_str())
                .arg(&frame[..]);
            pipeline.add_command(publish).ignore();
            *count += 1;
        }
        let connection = self.publisher.clone();
        let response_timeout = self.response_timeout;
        self.in_flight = Some(Box::pin(async move {
            let sends = pipelines.into_iter().map(|(slot, pipeline, count, bytes)| {
                let mut connection = connection.clone();
                let timeout = super::pipeline_timeout(response_timeout, bytes);
                async move {
                    let what = || {
                        let first = super::first_channel(&pipeline);
                        format!(
                            "SPUBLISH of {count} messages to slot {slot} (the first to {first:?})"
                        )
                    };
                    match tokio::time::timeout(timeout, pipeline.exec_async(&mut connection)).await
                    {
                        Ok(result) => result.map_err(|e| redis_error(&what(), e)),
                        Err(_) => Err(Error::new(
                            ErrorKind::Timeout,
                            format!("{}: no answer within {timeout:?}", what()),
                        )),
                    }
                }
            });
            // Every slot's pipeline runs to its end: one shard failing must not cancel the
            // others' (those not yet handed to the connection would never be sent).
            let mut failed = futures::future::join_all(sends)
                .await
                .into_iter()
                .filter_map(Result::err);
            let Some(mut worst) = failed.next() else {
                return Ok(());
            };
            // The one that says most of the connection: unrecoverable, then transient.
            let rank = |e: &Error| (e.is_unrecoverable(), e.is_transient());
            let mut more = 0;
            for error in failed {
                more += 1;
                if rank(&error) > rank(&worst) {
                    worst = error;
                }
            }
            Err(match more {
                0 => worst,
                more => Error::with_source(
                    worst.kind(),
                    format!(
                        "{} (and the pipelines of {more} more slots failed)",
                        worst.message()
                    ),
                    worst,
                ),
            })
        }));
    }

    fn poll_publishes(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            self.send_batch();
            let Some(in_flight) = self.in_flight.as_mut() else {
                return Poll::Ready(self.deferred.take().map_or(Ok(()), Err));
            };
            let result = std::task::ready!(in_flight.as_mut().poll(cx));
            self.in_flight = None;
            if let Err(error) = result {
                self.deferred.get_or_insert(error);
            }
        }
    }

    fn subscribe_future(&self, command: &Command<()>) -> BoxFuture<'static, Result<()>> {
        let mut connection = self.connection.clone();
        let timeout = self.response_timeout;
        let (subscribe, channel) = match command {
            Command::Subscribe(topic) => (true, topic.clone()),
            Command::Unsubscribe(topic) => (false, topic.clone()),
            Command::Publish { topic, .. } => (true, topic.clone()),
        };
        Box::pin(async move {
            let what = format!(
                "{} {channel}",
                if subscribe {
                    "SSUBSCRIBE"
                } else {
                    "SUNSUBSCRIBE"
                }
            );
            // A shard failing over answers TRYAGAIN or CLUSTERDOWN for a while: retry those,
            // backing off, for as long as channels are subscribed again after a node dropped
            // (a failover takes longer than the node timeout, 15 s by default).
            let deadline = tokio::time::Instant::now() + RESUBSCRIBE_FOR;
            let mut delay = Duration::from_millis(50);
            loop {
                let request = async {
                    if subscribe {
                        connection.ssubscribe(channel.as_str()).await
                    } else {
                        connection.sunsubscribe(channel.as_str()).await
                    }
                };
                let result = match tokio::time::timeout(timeout, request).await {
                    Ok(result) => result.map_err(|e| redis_error(&what, e)),
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        format!("{what}: no answer within {timeout:?}"),
                    )),
                };
                match result {
                    Err(error)
                        if error.is_transient()
                            && tokio::time::Instant::now() + delay < deadline =>
                    {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    other => return other,
                }
            }
        })
    }

    /// Subscribes `channels` again, each on its (possibly new) owner. Resolves to the
    /// channels refused for good (an ACL, say) and those answered; an error once a channel
    /// could not be subscribed again within the attempts ([`RESUBSCRIBE_FOR`] from `started`),
    /// for the reconnect layer to rebuild the transport (rather than tell of a reconnect that
    /// left a channel deaf).
    fn resubscribe_future(
        &self,
        channels: Vec<Topic>,
        started: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<Resubscribed>> {
        let connection = self.connection.clone();
        let timeout = self.response_timeout;
        Box::pin(async move {
            let mut refused = Vec::new();
            let mut answered = Vec::new();
            // Until every channel is back on its (possibly new) owner: the node may still be
            // restarting or failing over. One deadline for every pass.
            let deadline = started + RESUBSCRIBE_FOR;
            for channel in channels {
                let mut delay = Duration::from_millis(50);
                for attempt in 1.. {
                    let mut connection = connection.clone();
                    let result =
                        tokio::time::timeout(timeout, connection.ssubscribe(channel.as_str()))
                            .await;
                    match result {
                        Ok(Ok(())) => {
                            answered.push(channel.clone());
                            break;
                        }
                        Ok(Err(error)) => {
                            let error = redis_error(&format!("SSUBSCRIBE {channel}"), error);
                            if !(error.is_transient() || error.is_unrecoverable()) {
                                // Refused for good (an ACL, say): nothing to wait for.
                                tracing::warn!(%error, "re-subscribing after a node dropped failed");
                                refused.push((channel.clone(), error));
                                break;
                            }
                            tracing::debug!(%error, attempt, "re-subscribing after a node dropped");
                        }
                        Err(_) => tracing::debug!(%channel, attempt, "re-subscribing timed out"),
                    }
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(Error::connection_lost(format!(
                            "gave up subscribing to {channel} again after a node dropped or its slot moved ({attempt} attempts in {RESUBSCRIBE_FOR:?})"
                        )));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
            Ok(Resubscribed { refused, answered })
        })
    }

    /// Whether `topic`'s `ssubscribe` push was read since it was awaited; then it is no longer
    /// awaited.
    fn take_confirmation(&mut self, topic: &Topic) -> bool {
        take_confirmation(&mut self.awaiting, &mut self.confirmed, topic)
    }

    /// `channels` are subscribed (again): their pushes are awaited from now on.
    fn await_confirmations<'a>(&mut self, channels: impl IntoIterator<Item = &'a Topic>) {
        for topic in channels {
            self.confirmed.remove(topic);
            self.awaiting.insert(topic.clone());
        }
    }

    /// `topic`'s subscribe ended unconfirmed (refused, or the channel left).
    fn stop_awaiting(&mut self, topic: &Topic) {
        self.awaiting.remove(topic);
        self.confirmed.remove(topic);
    }

    /// Every channel subscribed again is confirmed: the ones refused for good are told, then
    /// [`Up::Reconnected`].
    fn resubscribed(&mut self, refused: Vec<(Topic, Error)>) {
        self.control = Control::Idle;
        for (topic, error) in refused {
            self.stop_awaiting(&topic);
            if !subscribed_again(&self.pending, &topic) {
                self.active.remove(&topic);
            }
            let left = self
                .pending
                .iter()
                .any(|command| matches!(command, Command::Unsubscribe(t) if *t == topic));
            if left {
                // Left since: no subscriber to tell, and the notice would be taken for the
                // answer to a subscribe queued after the unsubscribe.
                continue;
            }
            let error = error.on_channel(&topic);
            self.signals.push_back(Up::SubscribeFailed(topic, error));
        }
        self.signals.push_back(Up::Reconnected);
    }

    fn poll_control(&mut self, cx: &mut Context<'_>) -> Result<()> {
        loop {
            match &mut self.control {
                Control::InFlight { reply, .. } => {
                    let Poll::Ready(result) = reply.as_mut().poll(cx) else {
                        return Ok(());
                    };
                    let Control::InFlight { command, .. } =
                        std::mem::replace(&mut self.control, Control::Idle)
                    else {
                        unreachable!("matched above");
                    };
                    match result {
                        Ok(()) => {}
                        Err(error) if error.is_unrecoverable() => return Err(error),
                        Err(error) => {
                            // Refused for this channel alone: the connection goes on.
                            match command {
                                Command::Unsubscribe(topic) => {
                                    tracing::warn!(%error, %topic, "SUNSUBSCRIBE was refused");
                                    // No answer will come as a push (unless one came
                                    // already: then it was told).
                                    if answered(&mut self.leaving, &topic) {
                                        self.signals.push_back(Up::Unsubscribed(topic));
                                    }
                                }
                                other => {
                                    let topic = other.topic().clone();
                                    self.stop_awaiting(&topic);
                                    if !subscribed_again(&self.pending, &topic) {
                                        self.active.remove(&topic);
                                    }
                                    let error = error.on_channel(&topic);
                                    self.signals.push_back(Up::SubscribeFailed(topic, error));
                                }
                            }
                            continue;
                        }
                    }
                    let wait = Wait::new(self.response_timeout);
                    self.control = match command {
                        // Told when its push comes (see `handle_push`), after the channel's
                        // messages that came before it, which an event target still delivers.
                        Command::Unsubscribe(topic) => Control::Leaving { topic, wait },
                        // Told once its push is read (see `confirmed`).
                        other => Control::Confirming {
                            topic: other.topic().clone(),
                            wait,
                        },
                    };
                }
                Control::Leaving { topic, wait } => {
                    // Answered by its push (see `handle_push`), or, if none came, here: every
                    // unsubscribe is answered.
                    if self.leaving.contains_key(topic) && !wait.over(cx, &self.queue, self.read) {
                        return Ok(());
                    }
                    let topic = topic.clone();
                    self.control = Control::Idle;
                    if answered(&mut self.leaving, &topic) {
                        tracing::warn!(%topic, "SUNSUBSCRIBE was answered but not confirmed by the node");
                        self.signals.push_back(Up::Unsubscribed(topic));
                    }
                }
                Control::Confirming { topic, wait } => {
                    let topic = topic.clone();
                    if take_confirmation(&mut self.awaiting, &mut self.confirmed, &topic) {
                        self.control = Control::Idle;
                        self.signals.push_back(Up::Subscribed(topic));
                        continue;
                    }
                    if !wait.over(cx, &self.queue, self.read) {
                        return Ok(());
                    }
                    if !self.active.contains(&topic) {
                        // Left since (its unsubscribe is queued): nothing to send again. The
                        // node answered; the unsubscribe follows.
                        self.stop_awaiting(&topic);
                        self.control = Control::Idle;
                        self.signals.push_back(Up::Subscribed(topic));
                        continue;
                    }
                    let started = *self
                        .confirm_started
                        .get_or_insert_with(tokio::time::Instant::now);
                    if started.elapsed() >= RESUBSCRIBE_FOR {
                        self.stop_awaiting(&topic);
                        return Err(Error::connection_lost(format!(
                            "SSUBSCRIBE {topic}: answered, but never confirmed by the node within {RESUBSCRIBE_FOR:?}"
                        )));
                    }
                    tracing::warn!(
                        %topic,
                        "SSUBSCRIBE was answered but not confirmed by the node; sending it again"
                    );
                    let command = Command::Subscribe(topic);
                    let reply = self.subscribe_future(&command);
                    self.control = Control::InFlight { command, reply };
                }
                Control::Resubscribing {
                    reply,
                    refused,
                    started,
                } => {
                    let Poll::Ready(result) = reply.as_mut().poll(cx) else {
                        return Ok(());
                    };
                    let mut refused = std::mem::take(refused);
                    let started = *started;
                    self.control = Control::Idle;
                    // Given up on a channel: the transport fails, and the reconnect layer
                    // builds a new one (which subscribes everything again).
                    let Resubscribed {
                        refused: refused_now,
                        answered,
                    } = result?;
                    refused.extend(refused_now);
                    let waiting: HashSet<Topic> = answered
                        .into_iter()
                        .filter(|topic| !self.take_confirmation(topic))
                        .collect();
                    if waiting.is_empty() {
                        self.resubscribed(refused);
                    } else {
                        self.control = Control::ConfirmingAgain {
                            waiting,
                            refused,
                            started,
                            wait: Wait::new(self.response_timeout),
                        };
                    }
                }
                Control::ConfirmingAgain {
                    waiting,
                    refused,
                    started,
                    wait,
                } => {
                    let (awaiting, confirmed) = (&mut self.awaiting, &mut self.confirmed);
                    let active = &self.active;
                    // Confirmed, or left since (nothing to wait for).
                    waiting.retain(|topic| {
                        if !active.contains(topic) {
                            awaiting.remove(topic);
                            confirmed.remove(topic);
                            return false;
                        }
                        !take_confirmation(awaiting, confirmed, topic)
                    });
                    if waiting.is_empty() {
                        let refused = std::mem::take(refused);
                        self.resubscribed(refused);
                        continue;
                    }
                    if !wait.over(cx, &self.queue, self.read) {
                        return Ok(());
                    }
                    if started.elapsed() >= RESUBSCRIBE_FOR {
                        let mut named: Vec<&str> =
                            waiting.iter().take(3).map(Topic::as_str).collect();
                        named.sort_unstable();
                        let more = match waiting.len().saturating_sub(named.len()) {
                            0 => String::new(),
                            more => format!(" and {more} more"),
                        };
                        return Err(Error::connection_lost(format!(
                            "gave up subscribing {} channel(s) again ({}{more}) after a node dropped or a slot moved: answered, but never confirmed by their nodes within {RESUBSCRIBE_FOR:?}",
                            waiting.len(),
                            named.join(", ")
                        )));
                    }
                    tracing::warn!(
                        channels = waiting.len(),
                        "SSUBSCRIBE was answered but not confirmed by the node; sending it again"
                    );
                    let channels: Vec<Topic> = waiting.drain().collect();
                    let started = *started;
                    let refused = std::mem::take(refused);
                    let reply = self.resubscribe_future(channels, started);
                    self.control = Control::Resubscribing {
                        reply,
                        refused,
                        started,
                    };
                }
                Control::Idle => {
                    // Channels dropped while still active: only they, unless every channel
                    // is to be subscribed again anyway.
                    let dropped = std::mem::take(&mut self.dropped);
                    let channels: Vec<Topic> = if std::mem::take(&mut self.resubscribe) {
                        self.active.iter().cloned().collect()
                    } else {
                        dropped
                            .into_iter()
                            .filter(|topic| self.active.contains(topic))
                            .collect()
                    };
                    if !channels.is_empty() {
                        let started = tokio::time::Instant::now();
                        self.await_confirmations(&channels);
                        self.control = Control::Resubscribing {
                            reply: self.resubscribe_future(channels, started),
                            refused: Vec::new(),
                            started,
                        };
                        continue;
                    }
                    let Some(command) = self.pending.pop_front() else {
                        return Ok(());
                    };
                    match &command {
                        Command::Unsubscribe(topic) => {
                            // Its answer comes as a push too (see `own_unsubscribe`).
                            *self.leaving.entry(topic.clone()).or_default() += 1;
                        }
                        other => {
                            let topic = other.topic().clone();
                            self.await_confirmations([&topic]);
                            self.confirm_started = Some(tokio::time::Instant::now());
                        }
                    }
                    let reply = self.subscribe_future(&command);
                    self.control = Control::InFlight { command, reply };
                }
            }
        }
    }

    /// Whose an SUNSUBSCRIBE push for `topic` is: see [`own_unsubscribe`].
    fn own_unsubscribe(&mut self, topic: &Topic) -> Own {
        own_unsubscribe(&mut self.leaving, &self.pending, topic)
    }

    fn handle_push(&mut self, push: PushInfo) -> Option<Result<Up<Bytes>>> {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let (channel, frame) = match message_parts(push.data) {
                    Ok(parts) => parts,
                    Err(error) => return Some(Err(error)),
                };
                let channel = match &self.last_channel {
                    Some(last) if last.as_bytes() == channel.as_slice() => last.clone(),
                    _ => {
                        let topic = Topic::from(String::from_utf8_lossy(&channel).into_owned());
                        self.last_channel = Some(topic.clone());
                        topic
                    }
                };
                Some(Ok(Up::Message {
                    channel: Some(channel),
                    message: frame,
                }))
            }
            PushKind::Disconnection => {
                // The answers that node owed will not come (which node it was is not said):
                // the unsubscribes are answered now, its connection gone.
                for (topic, owed) in self.leaving.drain() {
                    self.signals
                        .extend((0..owed).map(|_| Up::Unsubscribed(topic.clone())));
                }
                // What that node confirmed is gone with it (the channels are subscribed again).
                self.confirmed.clear();
                tracing::warn!(
                    "a cluster node's connection dropped; subscribing every channel again"
                );
                if !self.active.is_empty() {
                    self.resubscribe = true;
                    if let Some(reader) = self.reader.take() {
                        reader.wake();
                    }
                }
                None
            }
            PushKind::SUnsubscribe => {
                // The answer to this transport's own SUNSUBSCRIBE, told here: the channel's
                // messages read before it came before it on the node's connection. For an
                // active channel that is not being left, the node dropped it: its slot moved
                // to another master.
                let Some(Value::BulkString(name)) = push.data.into_iter().next() else {
                    return None;
                };
                let topic = Topic::from(String::from_utf8_lossy(&name).as_ref());
                let own = self.own_unsubscribe(&topic);
                if own == Own::Answer {
                    return Some(Ok(Up::Unsubscribed(topic)));
                }
                if own == Own::No && self.active.contains(&topic) {
                    tracing::warn!(
                        %topic,
                        "a cluster node dropped a subscription (its slot moved); subscribing it again"
                    );
                    self.dropped.insert(topic);
                    if let Some(reader) = self.reader.take() {
                        reader.wake();
                    }
                }
                None
            }
            PushKind::SSubscribe => {
                // Confirms a subscribe this transport awaits (see `confirmed`).
                if let Some(Value::BulkString(name)) = push.data.into_iter().next() {
                    let topic = Topic::from(String::from_utf8_lossy(&name).as_ref());
                    if self.awaiting.contains(&topic) {
                        self.confirmed.insert(topic);
                    }
                }
                None
            }
            _ => None,
        }
    }
}

/// Whose an SUNSUBSCRIBE push for `topic` is: the answer to one this transport sent (taken
/// off the count of those expected, `leaving`), a node dropping a channel this transport is
/// about to leave anyway (queued in `pending`: leaving it is what comes next), or a node
/// dropping a channel on its own (its slot moved). The count comes first: an answer to a sent
/// one taken for a queued one would leave the count one too high, and the next drop of the
/// channel by a node (its slot moved) would be taken for an answer, leaving the channel deaf.
fn own_unsubscribe(
    leaving: &mut HashMap<Topic, u32>,
    pending: &VecDeque<Command<()>>,
    topic: &Topic,
) -> Own {
    if answered(leaving, topic) {
        Own::Answer
    } else if pending
        .iter()
        .any(|command| matches!(command, Command::Unsubscribe(left) if left == topic))
    {
        Own::Queued
    } else {
        Own::No
    }
}

/// Whose an SUNSUBSCRIBE push is (see [`own_unsubscribe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Own {
    /// The answer to one this transport sent.
    Answer,
    /// A node dropped the channel, which this transport is about to leave anyway.
    Queued,
    /// A node dropped the channel on its own.
    No,
}

/// Whether a subscribe of `topic` is queued in `pending`: a subscribe of it that failed (or a
/// replay refused) leaves the topic active for that one, which the user asked for since.
fn subscribed_again(pending: &VecDeque<Command<()>>, topic: &Topic) -> bool {
    pending
        .iter()
        .any(|command| matches!(command, Command::Subscribe(joined) if joined == topic))
}

/// One SUNSUBSCRIBE answer for `topic` fewer to expect; whether one was expected.
fn answered(leaving: &mut HashMap<Topic, u32>, topic: &Topic) -> bool {
    take_one(leaving, topic)
}

/// Whether `topic`'s `ssubscribe` push was read since it was awaited; then it is no longer
/// awaited.
fn take_confirmation(
    awaiting: &mut HashSet<Topic>,
    confirmed: &mut HashSet<Topic>,
    topic: &Topic,
) -> bool {
    if confirmed.remove(topic) {
        awaiting.remove(topic);
        true
    } else {
        false
    }
}

/// Takes one off `topic`'s count, if it has one.
fn take_one(counts: &mut HashMap<Topic, u32>, topic: &Topic) -> bool {
    match counts.get_mut(topic) {
        Some(count) => {
            *count -= 1;
            if *count == 0 {
                counts.remove(topic);
            }
            true
        }
        None => false,
    }
}

/// What the cluster connection hands the reading side, in order: a message (with the bytes it
/// counts for), the news that `count` messages were dropped there, or another push (a notice).
enum Pushed {
    Message(PushInfo, usize),
    Dropped(u64),
    Notice(PushInfo),
}

/// What a queued message counts for beyond its bytes (the push, its values, the queue's
/// node), so that a flood of small messages is bounded too.
const QUEUED_OVERHEAD: usize = 128;

/// The bound on messages waiting for the reader ([`MAX_QUEUED_BYTES`]), kept by the sender
/// (redis-rs's task) and the reader together.
#[derive(Default)]
struct PushQueue {
    /// Bytes of the messages queued.
    bytes: AtomicUsize,
    /// Messages dropped and not yet reported.
    dropped: AtomicU64,
    /// Items handed to the reader so far (see [`RedisClusterTransport::read`]).
    sent: AtomicU64,
}

impl PushQueue {
    /// Queues `push`: a notice always; a message if it fits (or nothing waits: a message
    /// larger than the bound alone is kept), after a report of what was dropped before it;
    /// else drops it.
    fn offer(&self, push: PushInfo, queue: &mpsc::UnboundedSender<Pushed>) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {}
            PushKind::Disconnection | PushKind::SSubscribe | PushKind::SUnsubscribe => {
                self.sent.fetch_add(1, Release);
                let _ = queue.send(Pushed::Notice(push));
                return;
            }
            // Nothing this transport asked for or acts on (a pattern's message, say): not
            // queued, so that a node sending such pushes cannot grow the queue.
            _ => return,
        }
        let size = QUEUED_OVERHEAD + push.data.iter().map(value_size).sum::<usize>();
        let queued = self.bytes.load(Relaxed);
        if queued > 0 && queued + size > MAX_QUEUED_BYTES {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let dropped = self.dropped.swap(0, Relaxed);
        if dropped > 0 {
            self.sent.fetch_add(1, Release);
            let _ = queue.send(Pushed::Dropped(dropped));
        }
        self.bytes.fetch_add(size, Relaxed);
        self.sent.fetch_add(1, Release);
        let _ = queue.send(Pushed::Message(push, size));
    }
}

/// About what `value` holds, in bytes (its strings, and a little for each value), for the
/// bound on queued messages: a malformed message may nest anything.
fn value_size(value: &Value) -> usize {
    const VALUE: usize = 16;
    let pairs = |pairs: &[(Value, Value)]| -> usize {
        pairs
            .iter()
            .map(|(key, value)| value_size(key) + value_size(value))
            .sum()
    };
    VALUE
        + match value {
            Value::BulkString(bytes) => bytes.len(),
            Value::SimpleString(text) | Value::VerbatimString { text, .. } => text.len(),
            Value::Array(values) | Value::Set(values) | Value::Push { data: values, .. } => {
                values.iter().map(value_size).sum()
            }
            Value::Map(map) => pairs(map),
            Value::Attribute { data, attributes } => value_size(data) + pairs(attributes),
            Value::Nil | Value::Int(_) | Value::Okay | Value::Double(_) | Value::Boolean(_) => 0,
            // A server error's text, a big number's digits, or a kind added since: what it
            // prints as, measured only for such (malformed) pushes.
            other => format!("{other:?}").len(),
        }
}

/// The error item for a message whose payload is over `limit`, skipped; `None` for any other
/// push.
fn oversized(push: &PushInfo, limit: usize) -> Option<Error> {
    let [Value::BulkString(channel), Value::BulkString(payload)] = &push.data[..] else {
        return None;
    };
    (payload.len() > limit).then(|| {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "a message of {} bytes on the channel {} is over the limit of {limit} bytes (RedisClusterTransport::max_message_size): skipped",
                payload.len(),
                crate::layers::quote(channel),
            ),
        )
    })
}

/// The notice of `count` messages dropped because the reader fell behind: a gap, as after a
/// reconnect.
fn dropped(count: u64) -> Up<Bytes> {
    tracing::warn!(
        count,
        "dropped messages from the cluster: the event target did not read them in time ({} MiB waited)",
        MAX_QUEUED_BYTES >> 20
    );
    Up::Reconnected
}

impl Sink<Command<Bytes>> for RedisClusterTransport {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.batch.len() < MAX_BATCH && this.batch_bytes < MAX_BATCH_BYTES {
            return Poll::Ready(Ok(()));
        }
        if let Some(in_flight) = this.in_flight.as_mut() {
            let result = std::task::ready!(in_flight.as_mut().poll(cx));
            this.in_flight = None;
            if let Err(error) = result {
                // Not the next command's failure: the next flush reports it.
                this.deferred.get_or_insert(error);
            }
        }
        this.send_batch();
        // Started now (polled once), not when the next flush comes.
        if let Some(in_flight) = this.in_flight.as_mut() {
            if let Poll::Ready(result) = in_flight.as_mut().poll(cx) {
                this.in_flight = None;
                if let Err(error) = result {
                    this.deferred.get_or_insert(error);
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        let this = self.get_mut();
        match command {
            Command::Publish { topic, message } => {
                // Every subscriber with the same limit would skip it: refused here, alone.
                if message.len() > this.max_message_size {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "publishing to {topic}: a message of {} bytes is over the limit of {} (RedisClusterTransport::max_message_size)",
                            message.len(),
                            this.max_message_size
                        ),
                    ));
                }
                this.batch_bytes += topic.len() + message.len();
                this.batch.push((topic, message))
            }
            Command::Subscribe(topic) => {
                this.active.insert(topic.clone());
                this.pending.push_back(Command::Subscribe(topic));
            }
            Command::Unsubscribe(topic) => {
                this.active.remove(&topic);
                this.pending.push_back(Command::Unsubscribe(topic));
            }
        }
        if !this.pending.is_empty() {
            if let Some(reader) = this.reader.take() {
                reader.wake();
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        // What the control side answers is for the reading side, which may be another task
        // (a split transport): the answer wakes it too, whoever polled last. (Nothing to
        // answer: no waker to make.)
        let idle = matches!(this.control, Control::Idle)
            && this.pending.is_empty()
            && !this.resubscribe
            && this.dropped.is_empty();
        let before = this.signals.len();
        let controlled = if idle {
            this.poll_control(cx)
        } else {
            let waker = crate::waker::also_waking(cx, this.reader.as_ref());
            this.poll_control(&mut Context::from_waker(&waker))
        };
        if this.signals.len() > before || controlled.is_err() {
            if let Some(reader) = &this.reader {
                if !reader.will_wake(cx.waker()) {
                    reader.wake_by_ref();
                }
            }
        }
        controlled?;
        this.poll_publishes(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().poll_publishes(cx)
    }
}

impl Stream for RedisClusterTransport {
    type Item = Result<Up<Bytes>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(signal) = this.signals.pop_front() {
                return Poll::Ready(Some(Ok(signal)));
            }
            crate::waker::remember(&mut this.reader, cx);
            if let Err(error) = this.poll_control(cx) {
                return Poll::Ready(Some(Err(error)));
            }
            if !this.signals.is_empty() {
                continue;
            }
            // Liveness is looked at when no push is ready, and every so many pushes (a flood
            // from the other nodes must not hide a silent one).
            this.read_since_check += 1;
            if this.read_since_check >= LIVENESS_EVERY {
                this.read_since_check = 0;
                if let Err(error) = this.poll_liveness(cx) {
                    return Poll::Ready(Some(Err(error)));
                }
            }
            let pushed = this.pushes.poll_recv(cx);
            if let Poll::Ready(Some(_)) = &pushed {
                this.read += 1;
            }
            match pushed {
                Poll::Ready(Some(Pushed::Message(push, size))) => {
                    this.queue.bytes.fetch_sub(size, Relaxed);
                    if let Some(error) = oversized(&push, this.max_message_size) {
                        return Poll::Ready(Some(Err(error)));
                    }
                    if let Some(up) = this.handle_push(push) {
                        return Poll::Ready(Some(up));
                    }
                }
                Poll::Ready(Some(Pushed::Notice(push))) => {
                    if let Some(up) = this.handle_push(push) {
                        return Poll::Ready(Some(up));
                    }
                }
                Poll::Ready(Some(Pushed::Dropped(count))) => {
                    return Poll::Ready(Some(Ok(dropped(count))));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(Err(Error::connection_lost(
                        "the cluster connection's push channel closed",
                    ))))
                }
                Poll::Pending => {
                    // Dropped after everything that is queued: the gap is here.
                    let count = this.queue.dropped.swap(0, Relaxed);
                    if count > 0 {
                        return Poll::Ready(Some(Ok(dropped(count))));
                    }
                    this.read_since_check = 0;
                    if let Err(error) = this.poll_liveness(cx) {
                        return Poll::Ready(Some(Err(error)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Whether `error` is a server's refusal of the user or password (`WRONGPASS`, `NOAUTH`,
/// `NOPERM`), however redis-rs wrapped it.
fn refused_credentials(error: &redis::RedisError) -> bool {
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
    let text = error.to_string();
    ["WRONGPASS", "NOAUTH", "NOPERM"]
        .iter()
        .any(|code| text.contains(code))
}

/// The channel and the payload of a message push. Anything else is skipped, and told as a
/// decode error (counted by an event target), not lost silently.
fn message_parts(data: Vec<Value>) -> Result<(Vec<u8>, Bytes)> {
    let mut data = data.into_iter();
    match (data.next(), data.next()) {
        (Some(Value::BulkString(channel)), Some(Value::BulkString(frame))) => {
            Ok((channel, Bytes::from(frame)))
        }
        found => {
            // Named by kinds: a value's own text may be megabytes.
            let kind = |value: &Option<Value>| match value {
                None => "nothing",
                Some(Value::BulkString(_)) => "a bulk string",
                Some(Value::Array(_)) => "an array",
                Some(Value::Int(_)) => "an integer",
                Some(Value::Nil) => "nil",
                Some(_) => "another value",
            };
            Err(Error::decode(
                None,
                &[],
                format!(
                    "a message from the cluster that is not a channel and a payload ({} and {})",
                    kind(&found.0),
                    kind(&found.1)
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long the tests over a real cluster wait for what must come.
    #[cfg(feature = "testkit")]
    const WAIT: Duration = Duration::from_secs(30);

    fn message(bytes: usize) -> PushInfo {
        PushInfo {
            kind: PushKind::SMessage,
            data: vec![
                Value::BulkString(b"t:1".to_vec()),
                Value::BulkString(vec![b'x'; bytes]),
            ],
        }
    }

    fn take(pushes: &mut mpsc::UnboundedReceiver<Pushed>, queue: &PushQueue) -> Vec<String> {
        let mut taken = Vec::new();
        while let Ok(pushed) = pushes.try_recv() {
            taken.push(match pushed {
                Pushed::Message(push, size) => {
                    queue.bytes.fetch_sub(size, Relaxed);
                    let len = match &push.data[1] {
                        Value::BulkString(bytes) => bytes.len(),
                        _ => 0,
                    };
                    format!("message {len}")
                }
                Pushed::Dropped(count) => format!("dropped {count}"),
                Pushed::Notice(push) => format!("notice {:?}", push.kind),
            });
        }
        taken
    }

    /// A subscribe redis-rs answered but whose `ssubscribe` push never came is not taken for
    /// done: it is sent again. (During a reshard, redis-rs can take a node's unprompted
    /// `sunsubscribe` for the answer to a pending `SSUBSCRIBE`, whose own answer, a `MOVED`,
    /// it then drops.) Simulated: the push is kept from the transport, and the channel is
    /// left on the server behind its back before it reads the answer.
    #[cfg(feature = "testkit")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribe_answered_without_its_push_is_sent_again() {
        subscribe_whose_push_is_hidden(false).await;
    }

    /// The same, after redis-rs subscribed the channel on its own (as it does after a
    /// reconnect or a topology refresh): that push, which nobody awaited, confirms nothing
    /// later.
    #[cfg(feature = "testkit")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_nobody_awaited_confirms_no_later_subscribe() {
        subscribe_whose_push_is_hidden(true).await;
    }

    /// A 3-master cluster and a transport over it (a response timeout of 2 s), whose pushes
    /// pass through `keep` first: those it refuses never reach the transport (as if redis-rs
    /// never handed them over).
    #[cfg(feature = "testkit")]
    async fn with_pushes_filtered(
        mut keep: impl FnMut(&Pushed) -> bool + Send + 'static,
    ) -> (crate::testkit::RedisCluster, RedisClusterTransport) {
        let cluster = tokio::task::spawn_blocking(|| crate::testkit::RedisCluster::start(3))
            .await
            .unwrap();
        let mut transport =
            RedisClusterTransport::connect_with(cluster.urls(), Duration::from_secs(2))
                .await
                .unwrap();
        let (forward, filtered) = mpsc::unbounded_channel();
        let mut original = std::mem::replace(&mut transport.pushes, filtered);
        let queue = Arc::clone(&transport.queue);
        tokio::spawn(async move {
            while let Some(pushed) = original.recv().await {
                if !keep(&pushed) {
                    queue.sent.fetch_sub(1, Release);
                    continue;
                }
                if forward.send(pushed).is_err() {
                    return;
                }
            }
        });
        (cluster, transport)
    }

    /// An unsubscribe whose `sunsubscribe` push never comes (redis-rs took another for its
    /// answer, say) is answered all the same, a response timeout after the node's answer:
    /// every unsubscribe is answered.
    #[cfg(feature = "testkit")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unsubscribe_whose_push_never_comes_is_answered() {
        use futures::{SinkExt, StreamExt};
        let (_cluster, mut transport) = with_pushes_filtered(
            |pushed| !matches!(pushed, Pushed::Notice(push) if push.kind == PushKind::SUnsubscribe),
        )
        .await;
        let topic = Topic::from("left:1");
        transport
            .send(Command::Subscribe(topic.clone()))
            .await
            .unwrap();
        let subscribed = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
        assert!(
            matches!(&subscribed, Some(Ok(Up::Subscribed(t))) if *t == topic),
            "{subscribed:?}"
        );
        transport
            .send(Command::Unsubscribe(topic.clone()))
            .await
            .unwrap();
        let answered = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
        assert!(
            matches!(&answered, Some(Ok(Up::Unsubscribed(t))) if *t == topic),
            "{answered:?}"
        );
    }

    /// Subscribes a channel whose `ssubscribe` push is kept from the transport, the channel
    /// then left behind its back: it must be sent again, and heard. With `unawaited`, redis-rs
    /// subscribed it first, on its own (that push reaches the transport).
    #[cfg(feature = "testkit")]
    async fn subscribe_whose_push_is_hidden(unawaited: bool) {
        use futures::{SinkExt, StreamExt};
        let channel = "hidden:1";
        // Keeps the transport's first `ssubscribe` push of the channel (the second, when
        // redis-rs subscribes it first) and the first `sunsubscribe` push from it.
        let hide_subscribe = if unawaited { 2 } else { 1 };
        let subscribes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&subscribes);
        let mut hid_unsubscribe = false;
        let (cluster, mut transport) = with_pushes_filtered(move |pushed| {
            let Pushed::Notice(push) = pushed else {
                return true;
            };
            let ours = matches!(
                push.data.first(),
                Some(Value::BulkString(name)) if name == channel.as_bytes()
            );
            if ours && push.kind == PushKind::SSubscribe {
                return counted.fetch_add(1, Relaxed) + 1 != hide_subscribe;
            }
            if ours && push.kind == PushKind::SUnsubscribe && !hid_unsubscribe {
                hid_unsubscribe = true;
                return false;
            }
            true
        })
        .await;
        let owner = &cluster.nodes[cluster.owner_of_channel(channel)];
        let numsub = |n: u32| format!("{channel}\n{n}");
        let until = |n: u32| {
            let deadline = std::time::Instant::now() + WAIT;
            while owner.cli(&["PUBSUB", "SHARDNUMSUB", channel]) != numsub(n) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never {n} subscribers"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let mut connection = transport.connection.clone();
        if unawaited {
            connection.ssubscribe(channel).await.unwrap();
            // Its push is read (and tells nothing).
            let nothing = tokio::time::timeout(Duration::from_millis(300), transport.next()).await;
            assert!(nothing.is_err(), "{nothing:?}");
        }
        // Sent (the flush starts the command), answered by the node (its push, kept from the
        // transport, came); not read yet.
        transport
            .send(Command::Subscribe(Topic::from(channel)))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while subscribes.load(Relaxed) < hide_subscribe {
            assert!(std::time::Instant::now() < deadline, "never answered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::task::block_in_place(|| until(1));
        // Left behind the transport's back: as if the answer it gets were another's.
        connection.sunsubscribe(channel).await.unwrap();
        tokio::task::block_in_place(|| until(0));
        let confirmed = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
        assert!(
            matches!(&confirmed, Some(Ok(Up::Subscribed(t))) if t.as_str() == channel),
            "{confirmed:?}"
        );
        tokio::task::block_in_place(|| until(1));
        owner.cli(&["SPUBLISH", channel, "heard"]);
        let heard = tokio::time::timeout(WAIT, transport.next()).await;
        assert!(
            matches!(&heard, Ok(Some(Ok(Up::Message { message, .. }))) if &message[..] == b"heard"),
            "{heard:?}"
        );
    }

    /// A wait for a push ends once its deadline has passed and what was handed over by then is
    /// read, though more keeps coming (a reader behind a steady stream never finds the queue
    /// empty).
    #[tokio::test]
    async fn a_wait_for_a_push_ends_behind_a_steady_stream() {
        let queue = PushQueue::default();
        queue.sent.store(5, Relaxed);
        let mut wait = Wait::new(Duration::ZERO);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            !wait.over(&mut cx, &queue, 3),
            "two handed over before are unread"
        );
        queue.sent.store(1_000, Relaxed);
        assert!(
            wait.over(&mut cx, &queue, 5),
            "what came after does not count"
        );
        let mut early = Wait::new(Duration::from_secs(60));
        assert!(
            !early.over(&mut cx, &queue, 1_000),
            "the deadline has not passed"
        );
    }

    /// The answer to a sent SUNSUBSCRIBE that comes while another of the channel is queued
    /// counts for the sent one: a node that drops the channel later (its slot moved) is not
    /// taken for an answer, and the channel is subscribed again rather than left deaf.
    #[test]
    fn an_unsubscribe_answer_counts_for_the_one_sent_before_one_queued() {
        let t = Topic::from("t:1");
        let mut leaving = HashMap::from([(t.clone(), 1)]);
        let mut pending = VecDeque::from([Command::Unsubscribe(t.clone())]);
        // The first one's answer, the second queued.
        assert_eq!(own_unsubscribe(&mut leaving, &pending, &t), Own::Answer);
        // The second is sent, and answered.
        pending.clear();
        *leaving.entry(t.clone()).or_default() += 1;
        assert_eq!(own_unsubscribe(&mut leaving, &pending, &t), Own::Answer);
        assert!(leaving.is_empty());
        // Subscribed again; a node drops the channel: not an answer.
        assert_eq!(own_unsubscribe(&mut leaving, &pending, &t), Own::No);
        // Dropped while leaving it is queued: not to be subscribed again (leaving comes
        // next), and not the answer either.
        pending.push_back(Command::Unsubscribe(t.clone()));
        assert_eq!(own_unsubscribe(&mut leaving, &pending, &t), Own::Queued);
    }

    /// A failed subscribe leaves its topic active when the user subscribed again since.
    #[test]
    fn a_subscribe_queued_again_keeps_its_topic() {
        let t = Topic::from("t:1");
        let mut pending = VecDeque::from([Command::Unsubscribe(t.clone())]);
        assert!(!subscribed_again(&pending, &t));
        pending.push_back(Command::Subscribe(Topic::from("t:2")));
        assert!(!subscribed_again(&pending, &t));
        pending.push_back(Command::Subscribe(t.clone()));
        assert!(subscribed_again(&pending, &t));
    }

    /// The queue keeps messages up to the bound, drops and counts past it (never a notice),
    /// reports the drop before the next message it keeps, and keeps a message larger than
    /// the bound when nothing waits.
    #[test]
    fn the_push_queue_is_bounded_in_bytes_and_tells_where_it_dropped() {
        let queue = PushQueue::default();
        let (sender, mut pushes) = mpsc::unbounded_channel();
        queue.offer(message(MAX_QUEUED_BYTES + 1), &sender);
        assert_eq!(
            take(&mut pushes, &queue),
            [format!("message {}", MAX_QUEUED_BYTES + 1)]
        );
        let half = MAX_QUEUED_BYTES / 2;
        queue.offer(message(half), &sender);
        queue.offer(message(half), &sender);
        assert_eq!(queue.dropped.load(Relaxed), 1, "the second half");
        queue.offer(message(1), &sender);
        queue.offer(
            PushInfo {
                kind: PushKind::Disconnection,
                data: Vec::new(),
            },
            &sender,
        );
        assert_eq!(
            take(&mut pushes, &queue),
            [
                format!("message {half}"),
                "dropped 1".to_owned(),
                "message 1".to_owned(),
                "notice Disconnection".to_owned()
            ]
        );
        // Dropped with nothing after it: left for the reader to report once it has taken
        // what waits (see `poll_next`).
        queue.offer(message(half), &sender);
        queue.offer(message(half), &sender);
        assert_eq!(take(&mut pushes, &queue), [format!("message {half}")]);
        assert_eq!(queue.dropped.load(Relaxed), 1);
        assert_eq!(queue.bytes.load(Relaxed), 0);
    }

    /// What a node pushes that the transport never asked for is not queued; a malformed
    /// message counts for what it nests (it counted for nothing past its overhead).
    #[test]
    fn pushes_nobody_asked_for_are_not_queued_and_malformed_ones_count_their_bytes() {
        let queue = PushQueue::default();
        let (sender, mut pushes) = mpsc::unbounded_channel();
        let big = || Value::BulkString(vec![b'x'; 1 << 20]);
        for kind in [
            PushKind::PMessage,
            PushKind::Invalidate,
            PushKind::Subscribe,
        ] {
            queue.offer(
                PushInfo {
                    kind,
                    data: vec![big(), big(), big()],
                },
                &sender,
            );
        }
        assert!(take(&mut pushes, &queue).is_empty());
        let malformed = PushInfo {
            kind: PushKind::SMessage,
            data: vec![Value::Array(vec![big(), big()]), big()],
        };
        for _ in 0..(MAX_QUEUED_BYTES >> 20) {
            queue.offer(malformed.clone(), &sender);
        }
        let queued = take(&mut pushes, &queue);
        assert_eq!(queued.len(), MAX_QUEUED_BYTES / (3 << 20), "{queued:?}");
        assert!(queue.dropped.load(Relaxed) > 0);
    }

    #[test]
    fn a_message_over_the_limit_is_an_error_item_naming_it() {
        assert!(oversized(&message(100), 100).is_none());
        let error = oversized(&message(101), 100).expect("over the limit");
        assert_eq!(error.kind(), ErrorKind::TooLarge);
        assert!(
            error
                .to_string()
                .contains("101 bytes on the channel \"t:1\""),
            "{error}"
        );
        // Not a message: never over a limit.
        let notice = PushInfo {
            kind: PushKind::Disconnection,
            data: Vec::new(),
        };
        assert!(oversized(&notice, 0).is_none());
    }

    /// A message push that is not a channel and a payload in bulk strings is a decode error
    /// (skipped and counted), where it vanished.
    #[test]
    fn a_malformed_message_push_is_a_decode_error() {
        let (channel, frame) = message_parts(message(3).data).unwrap();
        assert_eq!((channel.as_slice(), &frame[..]), (&b"t:1"[..], &b"xxx"[..]));
        for data in [
            vec![Value::Int(1), Value::BulkString(b"x".to_vec())],
            vec![Value::BulkString(b"t:1".to_vec())],
            Vec::new(),
        ] {
            let error = message_parts(data).unwrap_err();
            assert!(error.is_decode(), "{error}");
            assert!(
                error.to_string().contains("not a channel and a payload"),
                "{error}"
            );
        }
    }
}
