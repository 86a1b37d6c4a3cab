//! Redis pub/sub transport (feature `redis`).
//!
//! [`RedisTransport`] is a raw transport (`Bytes` frames) over two connections, as the
//! JavaScript adapter had: a multiplexed connection that publishes, pipelined, and a dedicated
//! subscribe connection (a Redis connection in subscribe mode only receives).
//!
//! - `PUBLISH` commands fed between two flushes go out pipelined (one pipeline, unless it
//!   reaches 4,096 commands or 64 MiB, or a subscribe waits for its answer); a flush completes
//!   when Redis has acknowledged every publish fed before it, so a confirmed dispatch means
//!   "Redis has it".
//! - `SUBSCRIBE`/`UNSUBSCRIBE` are sent per topic (consecutive ones batched into one command);
//!   the server's confirmation is surfaced as [`Up::Subscribed`], so
//!   [`EventTarget::subscribe`](crate::EventTarget::subscribe) resolves once Redis has the
//!   subscription. A publish fed after a subscribe or unsubscribe is sent once that is
//!   answered (the two go over different connections; this way a target hears its own
//!   publish on a topic it just joined), and never waits for one fed after it: publishes go on
//!   under steady subscription churn.
//! - The publish connection is redis-rs's. The subscribe connection that
//!   [`connect`](RedisTransport::connect) opens is this transport's own: a TCP or Unix socket
//!   speaking RESP2 (also when the URL asks for RESP3, which then applies to the publish
//!   connection), read by whichever task polls the transport, with no task or channel of its
//!   own, and parsed by hand (a subscribe connection is sent few kinds of frames). That costs
//!   about half the CPU per message of redis-rs's `PubSub` (see BENCHMARKS.md), and a
//!   subscriber that stops reading stops reading the socket, so TCP holds the backlog back
//!   (redis-rs buffers it in memory, without a bound), and Redis bounds it by closing the
//!   connection past its `client-output-buffer-limit pubsub`. (While a `SUBSCRIBE` waits for
//!   its confirmation, the messages Redis sent before it are read and kept for the reading
//!   side, which that same limit bounds.) TLS (`rediss://`) is not supported.
//! - Messages come up as `(channel, frame)`. Over our own connection, a frame is a slice of the
//!   connection's read buffer, uncopied. Over a redis-rs `PubSub` given to
//!   [`from_clients`](RedisTransport::from_clients), a frame of up to 1 KiB is copied into an
//!   8 KiB chunk that the next frames share (an allocation per message costs more than the
//!   copy); a larger one shares redis-rs's buffer, uncopied.
//! - **Limits**: a message over [`max_message_size`](RedisConfig::max_message_size) (8 MiB by
//!   default, below what Redis's default `client-output-buffer-limit` lets a subscriber
//!   receive) is skipped as it arrives, without buffering it: the stream reports an error of
//!   kind [`TooLarge`](crate::ErrorKind::TooLarge) (an event target counts it as skipped) and
//!   goes on with the next message. A publish over the limit is refused before it is sent,
//!   with the same kind of error; the connection goes on.
//! - A frame the subscribe connection cannot parse, a channel name over the limit and over
//!   64 KiB, or a reply to no command fails the transport with a
//!   [protocol](crate::ErrorKind::Protocol) error (the reconnect layer then opens a new one).
//! - The subscribe connection is pinged every [`ping_interval`](RedisConfig::ping_interval)
//!   (while messages keep coming, at their next pause: they show it alive); a ping unanswered
//!   within [`ping_timeout`](RedisConfig::ping_timeout), a command unanswered within
//!   [`response_timeout`](RedisConfig::response_timeout), or a closed
//!   connection fail the transport with an [unrecoverable](crate::Error::is_unrecoverable)
//!   error, so the reconnect layer rebuilds it: a connection cannot stay "connected but deaf".
//!   The publish connection (one it opened) is pinged too when no publish has used it for a
//!   ping interval, so that a server closing idle clients (`timeout`) or a NAT forgetting
//!   idle flows does not take it away between rare publishes (the next publish would fail,
//!   and the rebuilt transport cost the subscriptions a gap); one that does not answer in
//!   time fails the transport the same way.
//!
//! The transport fails loudly and does not recover by itself: stack it under the
//! [reconnect layer](crate::layers::reconnect).
//!
//! ```no_run
//! use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, PrefixLayer, ReconnectLayer};
//! use alkdev_pubsub::redis::RedisTransport;
//! use alkdev_pubsub::EventTarget;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main]
//! # async fn main() {
//! let transport = ServiceBuilder::new()
//!     .layer(ParseErrorLayer::skip())
//!     .layer(CodecLayer::json())
//!     .layer(PrefixLayer::new("alk:events:"))
//!     .layer(ReconnectLayer::new(Backoff::default()))
//!     .service(|| RedisTransport::connect("redis://127.0.0.1:6379/"));
//! let events: EventTarget = EventTarget::new(transport);
//! # }
//! ```

#[cfg(feature = "redis-cluster")]
pub mod cluster;
mod resp;
mod subscriber;

/// The Redis client this transport is built on (redis-rs), re-exported so that the
/// connections [`RedisTransport::from_clients`] takes can be opened at the same version.
pub use ::redis;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Sink, Stream};
use redis::aio::{MultiplexedConnection, PubSub, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, Msg, RedisError};
use tokio::time::Sleep;

use crate::layers::{Command, Error, ErrorKind, Result, Topic, Up};
use resp::Frame;
use subscriber::SubscribeConnection;

/// Publishes fed beyond this many, or this many bytes ([`MAX_UNSENT_BYTES`]), wait for the
/// pipeline in flight to be acknowledged.
const MAX_PIPELINE: usize = 4096;
/// The bytes (channels and payloads) of the publishes not sent yet past which the next one
/// waits (see [`MAX_PIPELINE`]). A single larger publish is still taken.
const MAX_UNSENT_BYTES: usize = 64 << 20;

/// How long a pipeline of publishes carrying `bytes` may take to be sent and answered: the
/// response timeout, and as long again for each whole MiB it carries (a link that moves less
/// than a MiB per response timeout is taken for dead). The time counts from when the pipeline
/// is handed to the connection, its sending included: a fixed timeout would declare a slow
/// link dead under a large pipeline, again after each reconnect, sending it again each time
/// (a pipeline that does time out is sent again by a reconnect layer above, and the old
/// connection may still deliver the first copy: at least once).
fn pipeline_timeout(response_timeout: Duration, bytes: usize) -> Duration {
    let mebibytes = u32::try_from(bytes >> 20).unwrap_or(u32::MAX);
    response_timeout.saturating_add(response_timeout.saturating_mul(mebibytes))
}

/// While a `SUBSCRIBE` or `UNSUBSCRIBE` waits for its confirmation, the messages that come
/// before it are read and kept for the reading side, at most this many frames per call (then
/// the task yields and goes on), and no more once [`MAX_HELD_BYTES`] are kept (the frame
/// that reaches it is kept: at most that and one message of `max_message_size`).
const REPLY_READ_BUDGET: usize = 256;

/// The most message bytes kept for the reading side while a `SUBSCRIBE` or `UNSUBSCRIBE` waits
/// for its confirmation. Past it the transport stops reading: a reading side that does not
/// take them (an event target paused by a full `Block` subscription) leaves them to Redis,
/// which bounds what it holds for the connection, and the confirmation's response timeout
/// then fails the connection (the reconnect layer reconnects and reports the gap), as Redis
/// does past its own limit. Without it, a subscribe now and then while the reading side is
/// paused moved the whole backlog into this process.
const MAX_HELD_BYTES: usize = 32 << 20;

/// What an item held for the reading side counts for beyond its payload (its channel aside):
/// its place in the queue and its frame, so that a flood of small or empty messages is bounded
/// too.
const HELD_OVERHEAD: usize = 64;

/// What `item` counts for against [`MAX_HELD_BYTES`]: a message or an error item for one
/// (skipped over the size limit); not a command's answer (one per command sent).
fn held_size(item: &Result<Up<Bytes>>) -> usize {
    match item {
        Ok(Up::Message { channel, message }) => {
            HELD_OVERHEAD + message.len() + channel.as_ref().map_or(0, |c| c.len())
        }
        // Its message (a few hundred bytes: it quotes the channel's first bytes only) and the
        // error's allocation.
        Err(error) => HELD_OVERHEAD + error.message().len(),
        Ok(_) => 0,
    }
}

/// The publish connection is looked at (see `RedisTransport::publisher_check`) whenever the
/// subscribe connection has nothing more to read, and at least once per this many messages.
const PUBLISHER_CHECK_EVERY: u32 = 1024;

/// The largest message payload published or received by default: 8 MiB
/// ([`RedisConfig::max_message_size`], [`RedisClusterTransport::max_message_size`](cluster::RedisClusterTransport::max_message_size)
/// with the feature `redis-cluster`). Redis's own default for subscribers,
/// `client-output-buffer-limit pubsub 32mb 8mb 60`, disconnects one whose pending output
/// passes 32 MiB, or stays over 8 MiB for 60 s: a message above 8 MiB risks every
/// subscriber's connection, and one above 32 MiB reaches none of them.
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: usize = 8 << 20;

/// Settings of a [`RedisTransport`].
///
/// ```
/// use alkdev_pubsub::redis::RedisConfig;
/// use std::time::Duration;
///
/// let config = RedisConfig::new()
///     .ping_interval(Duration::from_secs(2))
///     .response_timeout(Duration::from_secs(1));
/// # drop(config);
/// ```
#[derive(Clone, Debug)]
pub struct RedisConfig {
    connect_timeout: Duration,
    response_timeout: Duration,
    ping_interval: Duration,
    ping_timeout: Duration,
    max_message_size: usize,
}

impl Default for RedisConfig {
    /// Connect within 5 s, answers within 5 s, a ping every 5 s answered within 3 s, messages
    /// of at most 8 MiB.
    fn default() -> Self {
        RedisConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(3),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl RedisConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long connecting may take.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long Redis may take to answer a command (a pipeline of publishes, a subscribe). On
    /// the subscribe connection, bytes still arriving ahead of the answer (a long message, a
    /// backlog) show the connection alive and give the answer this long again. A pipeline of
    /// publishes, timed from when it is handed to the connection (its sending included), is
    /// given this long again for each whole MiB it carries: a large pipeline on a slow link is
    /// not taken for a dead connection.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How often the subscribe connection is pinged, and how long the publish connection may
    /// stay unused before it is pinged too. While messages keep coming, the ping waits for a
    /// pause in them.
    #[must_use]
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// How long a ping may go unanswered before the connection is declared dead; bytes still
    /// arriving ahead of the answer give it this long again.
    #[must_use]
    pub fn ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }

    /// The largest message payload, in bytes, published or received (at most 512 MiB, Redis's
    /// own limit; 8 MiB by default). Redis disconnects a subscriber whose pending output
    /// passes its `client-output-buffer-limit` for pub/sub clients (by default 32 MiB at once,
    /// or 8 MiB for 60 s), which a message near that size alone can do, and a burst of smaller
    /// ones to a subscriber that reads slowly too (four of 8 MiB): raise that setting on the
    /// server with this one. A bigger publish fails alone with an error of kind
    /// [`ErrorKind::TooLarge`] and is not sent. A bigger message received is skipped as it
    /// arrives, never buffered: the stream reports an error of that kind (an event target
    /// counts it in [`Stats::skipped`](crate::Stats::skipped)) and goes on with the next
    /// message. Over a redis-rs `PubSub` ([`RedisTransport::from_clients_with`]) the message
    /// has been read whole by redis-rs before it is skipped. Channel names are read up to
    /// 64 KiB, or this limit if it is higher.
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.min(resp::MAX_BULK);
        self
    }

    /// Connects to `url` (`redis://[user[:password]@]host[:port][/db]`) with these settings.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a URL redis-rs cannot read or that asks for TLS
    /// (`rediss://`); [`ErrorKind::Rejected`] when Redis refuses the user or password: retrying
    /// cannot help; [`ErrorKind::Connect`] otherwise (no server, the connect timeout, a server
    /// full or still loading): it may succeed later. Each names the URL, without its password.
    pub async fn connect(self, url: impl AsRef<str>) -> Result<RedisTransport> {
        let url = url.as_ref();
        // Before redis-rs reads it: built without TLS, it would say a feature is missing.
        if is_tls(url) {
            return Err(tls_unsupported(url));
        }
        let client = Client::open(url).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("invalid Redis URL {:?}: {e}", redact(url)),
                e,
            )
        })?;
        let where_ = redact(url);
        if let redis::ConnectionAddr::TcpTls { .. } = client.get_connection_info().addr() {
            return Err(tls_unsupported(url));
        }
        // Publishes are timed by the transport, which allows for their size
        // (`pipeline_timeout`).
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        // The subscribe connection first: it reads the server's answer to `AUTH` itself, and
        // tells a refused password (for good) from a server that is full (for now), where
        // redis-rs reports any refusal as an authentication failure.
        let subscriber = tokio::time::timeout(
            self.connect_timeout,
            SubscribeConnection::connect(
                client.get_connection_info(),
                where_.clone(),
                self.max_message_size,
            ),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Connect,
                format!(
                    "opening the subscribe connection to {where_}: no answer within {:?}",
                    self.connect_timeout
                ),
            )
        })??;
        let publisher = client
            .get_multiplexed_async_connection_with_config(&connection_config)
            .await
            .map_err(|e| connect_error(&where_, "the publish connection", e))?;
        let publish_timeout = Some(self.response_timeout);
        let mut transport =
            RedisTransport::new(publisher, Subscriber::Own(Box::new(subscriber)), self);
        transport.publish_timeout = publish_timeout;
        transport.server = Some(where_.into());
        Ok(transport)
    }
}

/// Not part of the API, and only in builds for fuzzing (`cargo fuzz` sets `--cfg fuzzing`):
/// the subscribe connection's parser, for the fuzz target `redis_frames`. Parses `wire` delivered in pieces that end at `cuts` (ascending offsets),
/// with a `max_message_size` of `limit`; returns what was read, as debug text, up to the end
/// or the first protocol error (then that error, last).
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn __fuzz_subscribe_frames(wire: &[u8], cuts: &[usize], limit: usize) -> Vec<String> {
    resp::parse_in_pieces(wire, cuts, limit)
}

/// What a failed pipeline of `publishes` publishes (`bytes` of channels and payloads) was
/// doing: with its first channel, and the server where known.
fn pipeline_failed(
    pipeline: &redis::Pipeline,
    publishes: usize,
    bytes: usize,
    server: Option<&str>,
) -> String {
    let first = first_channel(pipeline);
    let to = server
        .map(|server| format!(" to {server}"))
        .unwrap_or_default();
    if publishes == 1 {
        format!("publishing to {first:?}{to} ({bytes} bytes)")
    } else {
        format!(
            "publishing a pipeline of {publishes} messages{to} ({bytes} bytes; the first to {first:?})"
        )
    }
}

/// The channel of a pipeline's first publish (`PUBLISH` or `SPUBLISH`), for messages.
fn first_channel(pipeline: &redis::Pipeline) -> String {
    pipeline
        .cmd_iter()
        .next()
        .and_then(|publish| publish.args_iter().nth(1))
        .and_then(|channel| match channel {
            redis::Arg::Simple(channel) => Some(String::from_utf8_lossy(channel).into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Whether `url` asks for TLS (`rediss://`, or `valkeys://` as redis-rs reads it).
fn is_tls(url: &str) -> bool {
    ["rediss://", "valkeys://"].iter().any(|scheme| {
        url.get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    })
}

/// The error for a `rediss://` URL.
fn tls_unsupported(url: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "{:?}: TLS (rediss://) is not supported by this crate's Redis transports; connect over a TLS tunnel, or use redis:// on a trusted network",
            redact(url)
        ),
    )
}

/// The start of `value`'s debug form, for an error message about what a server sent: at most
/// [`DEBUG_HEAD`] bytes of it, with `…` when cut, without formatting the rest (a frame's
/// strings can be megabytes long).
fn debug_head(value: &impl fmt::Debug) -> String {
    /// Keeps what is written up to the limit, then stops the formatting.
    struct Head(String);
    impl fmt::Write for Head {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            let room = DEBUG_HEAD - self.0.len();
            if text.len() <= room {
                self.0.push_str(text);
                return Ok(());
            }
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            self.0.push_str(&text[..end]);
            Err(fmt::Error)
        }
    }
    let mut head = Head(String::new());
    if fmt::write(&mut head, format_args!("{value:?}")).is_err() {
        head.0.push('…');
    }
    head.0
}

/// How much of a server's frame an error message shows ([`debug_head`]).
const DEBUG_HEAD: usize = 128;

/// A Redis URL without its password (`user:password@`, or a `pass=` query parameter as in
/// `redis+unix:///path?pass=...`), for messages and logs: what this crate's errors print.
///
/// ```
/// use alkdev_pubsub::redis::redact;
///
/// assert_eq!(redact("redis://app:s3cret@10.0.0.5:6379/0"), "redis://app:***@10.0.0.5:6379/0");
/// assert_eq!(redact("redis+unix:///run/redis.sock?pass=s3cret"), "redis+unix:///run/redis.sock?pass=***");
/// assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
/// ```
pub fn redact(url: &str) -> String {
    // The user info runs from after `://` (or the start, when the scheme is missing or
    // mistyped) to the last `@`.
    let start = url.find("://").map_or(0, |scheme| scheme + 3);
    let mut redacted = match url.rfind('@') {
        Some(at) if at >= start => {
            let userinfo = &url[start..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..start], &userinfo[..colon], &url[at..]),
                // Without a scheme, a lone word may be a password.
                None if start == 0 => format!("***{}", &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some(question) = redacted.find('?') {
        let query: Vec<&str> = redacted[question + 1..]
            .split('&')
            .map(|pair| {
                if pair.starts_with("pass=") {
                    "pass=***"
                } else {
                    pair
                }
            })
            .collect();
        redacted = format!("{}?{}", &redacted[..question], query.join("&"));
    }
    redacted
}

fn connect_error(url: &str, what: &str, error: RedisError) -> Error {
    Error::with_source(
        ErrorKind::Connect,
        format!("opening {what} to {url}: {error}"),
        error,
    )
}

/// Maps a redis-rs error to this crate's, with `what` saying what was being done.
fn redis_error(what: &str, error: RedisError) -> Error {
    let kind = if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_connection_refusal() {
        ErrorKind::Connect
    } else if error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error()
    {
        ErrorKind::ConnectionLost
    } else {
        // The server's refusals: one, or each refused command of a pipeline (publishes go in
        // pipelines; redis-rs gives such an error the kind of its first refusal, and no code
        // when it knows no kind for it, as for `BUSY`). Busy only when every one is.
        let busy = match error.clone().into_server_errors() {
            Some(refused) if !refused.is_empty() => {
                refused.iter().all(|(_, refusal)| is_busy(refusal))
            }
            // An error redis-rs built itself (a cluster's routing): its kind says.
            _ => matches!(error.kind(), redis::ErrorKind::Server(kind) if busy_kind(kind)),
        };
        if busy {
            ErrorKind::Busy
        } else {
            ErrorKind::Rejected
        }
    };
    Error::with_source(kind, format!("{what}: {error}"), error)
}

/// Whether a server's refusal is for now: a cluster between masters (a failover, a slot
/// moving) answers with these for a while, also once redis-rs has run out of redirects to
/// follow; a server loading its dataset or running a long script too.
fn is_busy(refusal: &redis::ServerError) -> bool {
    refusal.kind().is_some_and(busy_kind) || refusal.code() == "BUSY"
}

/// The refusals for now that redis-rs knows a kind for (see [`is_busy`]).
fn busy_kind(kind: redis::ServerErrorKind) -> bool {
    use redis::ServerErrorKind as S;
    matches!(
        kind,
        S::BusyLoading
            | S::TryAgain
            | S::MasterDown
            | S::ClusterDown
            | S::Moved
            | S::Ask
            | S::ReadOnly
    )
}

/// The subscribe connection.
enum Subscriber {
    /// The connection [`RedisConfig::connect`] opens: read and written by this transport's own
    /// polls.
    Own(Box<SubscribeConnection>),
    /// A redis-rs `PubSub` given to [`RedisTransport::from_clients`], with its own task.
    RedisRs {
        sink: PubSubSink,
        messages: PubSubStream,
    },
}

/// What the subscribe connection is doing.
enum Control {
    Idle,
    /// A `SUBSCRIBE` or `UNSUBSCRIBE` of these topics sent over a redis-rs `PubSub`, awaiting
    /// the server's confirmation.
    InFlight {
        subscribe: bool,
        topics: Vec<Topic>,
        reply: BoxFuture<'static, Result<()>>,
    },
    /// A `SUBSCRIBE` or `UNSUBSCRIBE` of these topics sent over our own connection, of which
    /// `confirmed` are confirmed (the server confirms each channel, in order).
    Sent {
        subscribe: bool,
        topics: Vec<Topic>,
        confirmed: usize,
    },
}

/// A command sent over our own subscribe connection and not answered yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    /// The command of [`Control::Sent`].
    Control,
    Ping,
}

/// What a `SUBSCRIBE` or `UNSUBSCRIBE` is, for messages.
fn describe_control(subscribe: bool, topics: &[Topic]) -> String {
    format!(
        "{} {} channel(s) starting with {:?}",
        if subscribe {
            "SUBSCRIBE to"
        } else {
            "UNSUBSCRIBE from"
        },
        topics.len(),
        topics.first().map_or("", |topic| topic.as_str())
    )
}

/// An error reply of the server to `what`, as redis-rs would classify it.
fn server_error(what: &str, reply: &[u8]) -> Error {
    let reply = String::from_utf8_lossy(reply);
    let code = reply.split(' ').next().unwrap_or_default();
    let kind = match code {
        "BUSY" | "LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "MOVED" | "ASK"
        | "READONLY" => ErrorKind::Busy,
        // Written as the server accepted a connection it then closed (with no password,
        // nothing is read before the first command, which takes it for its answer): the
        // connection failed, not the command.
        "ERR" if reply.starts_with("ERR max number of clients reached") => {
            ErrorKind::ConnectionLost
        }
        _ => ErrorKind::Rejected,
    };
    Error::new(kind, format!("{what}: {reply}"))
}

/// A publish not sent yet.
struct Unsent {
    publish: redis::Cmd,
    /// Its channel's and payload's bytes: a pipeline's time allows for sending them (see
    /// [`RedisConfig::response_timeout`]).
    bytes: usize,
    /// It waits for the first so many subscribes and unsubscribes fed to be answered.
    after: u64,
}

/// The Redis pub/sub transport: see the [module](self).
pub struct RedisTransport {
    publisher: MultiplexedConnection,
    /// Publishes not sent yet, in order. Those fed after a subscribe wait for it (see
    /// `control_answered_count`), not for those fed after them; every one that may go then
    /// goes in the next pipeline.
    unsent: VecDeque<Unsent>,
    /// Their bytes.
    unsent_bytes: usize,
    /// How many subscribes and unsubscribes were fed.
    control_fed: u64,
    /// The pipeline sent and not yet acknowledged; it hands the pipeline back, emptied, to be
    /// filled again (its buffers keep their size).
    in_flight: Option<BoxFuture<'static, (redis::Pipeline, Result<()>)>>,
    /// An emptied pipeline, ready to take the place of the one sent next.
    spare: Option<redis::Pipeline>,
    /// How long a pipeline may take (see [`pipeline_timeout`]), on a publish connection this
    /// transport opened; `None` on one the caller opened (it times its requests itself).
    publish_timeout: Option<Duration>,
    /// The server's URL, without a password, for messages (on connections this transport
    /// opened).
    server: Option<std::sync::Arc<str>>,
    subscriber: Subscriber,
    /// Subscribes and unsubscribes not yet sent, in order.
    pending: VecDeque<Command<()>>,
    /// How many of the first pending commands go out one by one (after a refused batch).
    singly: usize,
    control: Control,
    /// Commands sent over our own subscribe connection, not answered yet, in order. Redis
    /// answers in order, so only the first is timed, from when it became the first.
    requests: VecDeque<Request>,
    /// Fires when the first of `requests` is due.
    reply_timer: Pin<Box<Sleep>>,
    /// How many bytes the connection had read when `reply_timer` was armed: if it read more
    /// since, it is alive (the answer is behind a long message or a backlog), and the timer is
    /// armed again rather than fail the connection.
    read_when_armed: u64,
    /// What the reading side is yet to be given: answers to subscribes, messages read while one
    /// waited for its answer, and messages skipped over the size limit (error items).
    signals: VecDeque<Result<Up<Bytes>>>,
    /// The bytes of the messages in `signals` ([`MAX_HELD_BYTES`]).
    held_bytes: usize,
    /// The task reading the stream, and the one feeding the sink (the same in an event
    /// target's driver; two when the transport is split): an answer read by one may concern
    /// the other.
    reader: Option<Waker>,
    writer: Option<Waker>,
    ping: Pin<Box<Sleep>>,
    /// Redis refused a ping to this user (`NOPERM`): told once.
    ping_refused: bool,
    /// A ping over a redis-rs `PubSub`.
    ping_reply: Option<BoxFuture<'static, Result<()>>>,
    /// When the publish connection is next looked at: idle for a ping interval, it is pinged,
    /// so that a server closing idle clients (its `timeout`) or a NAT forgetting idle flows
    /// does not take it away between rare publishes (a publish failing on it fails the whole
    /// transport, subscriptions included). Not for a connection the caller opened
    /// ([`from_clients`](Self::from_clients)): it is theirs, maybe shared and busy.
    publisher_check: Pin<Box<Sleep>>,
    /// When a pipeline last went out on the publish connection.
    last_published: tokio::time::Instant,
    /// Messages read since the publish connection was last looked at: a steady stream of
    /// messages keeps the subscribe connection from pausing, where it is looked at otherwise.
    read_since_check: u32,
    /// The publish connection's ping, while it waits for its answer.
    publisher_ping: Option<BoxFuture<'static, Result<()>>>,
    config: RedisConfig,
    failed: Option<Error>,
    /// Publishes were fed since everything fed was last answered: if the connection fails
    /// now, they are lost, and `poll_close` says so.
    unanswered: bool,
    /// A flush waits for publishes held behind subscribes (see `poll_publishes`): the answer
    /// that frees them wakes it.
    flush_waits: bool,
    /// A pipeline's failure that concerned only its publishes, reported by the next flush.
    deferred: Option<Error>,
    /// The last channel a message came on: traffic mostly repeats channels, and reusing the
    /// topic saves an allocation per message.
    last_channel: Option<Topic>,
    frames: Frames,
}

impl fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTransport")
            .field("unsent_publishes", &self.unsent())
            .field("pipeline_in_flight", &self.in_flight.is_some())
            .field("pending_subscriptions", &self.pending.len())
            .field("failed", &self.failed)
            .field("config", &self.config)
            .finish()
    }
}

impl RedisTransport {
    /// Connects to `url` (`redis://[user[:password]@]host[:port][/db]`) with the default
    /// [`RedisConfig`]: opens the publish connection and the subscribe connection.
    ///
    /// # Errors
    ///
    /// As [`RedisConfig::connect`].
    pub async fn connect(url: impl AsRef<str>) -> Result<Self> {
        RedisConfig::default().connect(url).await
    }

    /// A transport over connections the caller opened: `publish` may be shared with other
    /// users (it is a cheap clone of a multiplexed connection); `subscribe` is this
    /// transport's own. (Messages then come through redis-rs's `PubSub`, its task and its
    /// parser; [`connect`](Self::connect) opens a subscribe connection that this transport
    /// reads itself, which costs about half as much per message.)
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with its timer enabled (the transport arms its timers here).
    pub fn from_clients(publish: MultiplexedConnection, subscribe: PubSub) -> Self {
        Self::from_clients_with(publish, subscribe, RedisConfig::default())
    }

    /// Like [`from_clients`](Self::from_clients), with `config`'s settings where they apply:
    /// the ping interval and ping timeout; the response timeout, for each subscribe and
    /// unsubscribe sent through `subscribe` (no answer in time fails the transport, as on a
    /// connection this transport opens); and the message size limit (a publish over it is
    /// refused; a message over it is skipped, once redis-rs has read it). Publishes wait as
    /// long as `publish` was opened to wait (redis-rs's
    /// `AsyncConnectionConfig::set_response_timeout`); the connect timeout applies only to
    /// connections this transport opens. `publish` is yours, maybe shared and busy: it is not
    /// pinged when idle, as a publish connection this transport opens is (keep it alive
    /// yourself if the server closes idle clients).
    ///
    /// # Panics
    ///
    /// As [`from_clients`](Self::from_clients).
    pub fn from_clients_with(
        publish: MultiplexedConnection,
        subscribe: PubSub,
        config: RedisConfig,
    ) -> Self {
        let (sink, messages) = subscribe.split();
        Self::new(publish, Subscriber::RedisRs { sink, messages }, config)
    }

    fn new(publish: MultiplexedConnection, subscriber: Subscriber, config: RedisConfig) -> Self {
        RedisTransport {
            publisher: publish,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            control_fed: 0,
            spare: None,
            publish_timeout: None,
            server: None,
            in_flight: None,
            subscriber,
            pending: VecDeque::new(),
            singly: 0,
            control: Control::Idle,
            requests: VecDeque::new(),
            reply_timer: Box::pin(tokio::time::sleep(config.response_timeout)),
            read_when_armed: 0,
            signals: VecDeque::new(),
            held_bytes: 0,
            reader: None,
            writer: None,
            ping: Box::pin(tokio::time::sleep(config.ping_interval)),
            ping_refused: false,
            ping_reply: None,
            publisher_check: Box::pin(tokio::time::sleep(config.ping_interval)),
            last_published: tokio::time::Instant::now(),
            read_since_check: 0,
            publisher_ping: None,
            config,
            failed: None,
            unanswered: false,
            flush_waits: false,
            deferred: None,
            last_channel: None,
            frames: Frames::default(),
        }
    }

    fn fail(&mut self, error: Error) -> Error {
        // Either side may be waiting on something the other polled last (the socket, a timer).
        for task in self.reader.iter().chain(&self.writer) {
            task.wake_by_ref();
        }
        self.failed.get_or_insert(error).clone()
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Sends the oldest publishes not sent as one pipeline, if none is in flight and no
    /// subscribe fed before them is still unconfirmed.
    fn send_pipeline(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        if self.deferred.as_ref().is_some_and(Error::is_transient) && !self.unsent.is_empty() {
            // A pipeline since the last flush was refused for now (`BUSY`, `LOADING`): that
            // flush fails, answering everything fed since the one before, which the retry
            // layer sends again in order. Sent now, these would arrive before the refused
            // ones they follow.
            self.unsent.clear();
            self.unsent_bytes = 0;
            return;
        }
        let answered = self.control_answered_count();
        if self
            .unsent
            .front()
            .is_none_or(|first| first.after > answered)
        {
            return;
        }
        let mut pipeline = self.spare.take().unwrap_or_else(redis::pipe);
        let (mut publishes, mut bytes) = (0, 0);
        while let Some(next) = self.unsent.front() {
            if next.after > answered {
                break;
            }
            let next = self.unsent.pop_front().expect("looked at");
            self.unsent_bytes -= next.bytes;
            pipeline.add_command(next.publish);
            publishes += 1;
            bytes += next.bytes;
        }
        self.last_published = tokio::time::Instant::now();
        let mut connection = self.publisher.clone();
        let timeout = self
            .publish_timeout
            .map(|timeout| pipeline_timeout(timeout, bytes));
        let server = self.server.clone();
        self.in_flight = Some(Box::pin(async move {
            let sent = pipeline.exec_async(&mut connection);
            let result = match timeout {
                None => sent.await.map_err(Err),
                Some(timeout) => match tokio::time::timeout(timeout, sent).await {
                    Ok(result) => result.map_err(Err),
                    Err(_) => Err(Ok(timeout)),
                },
            };
            let result = result.map_err(|failure| {
                let what = pipeline_failed(&pipeline, publishes, bytes, server.as_deref());
                match failure {
                    Err(error) => redis_error(&what, error),
                    Ok(timeout) => Error::new(
                        ErrorKind::Timeout,
                        format!("{what}: no answer within {timeout:?}"),
                    ),
                }
            });
            pipeline.clear();
            (pipeline, result)
        }));
    }

    /// How many of the subscribes and unsubscribes fed are answered (they are answered in
    /// order). Publishes fed after one wait for it, so that a target hears its own publishes
    /// on a topic it just joined (the two use different connections).
    fn control_answered_count(&self) -> u64 {
        let sent = match &self.control {
            Control::Idle => 0,
            Control::InFlight { topics, .. } | Control::Sent { topics, .. } => topics.len(),
        };
        self.control_fed - (self.pending.len() + sent) as u64
    }

    /// Publishes not sent yet: held, or in the pipeline being filled.
    fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// Drives the publish pipelines; `Ready(Ok)` once every fed publish is acknowledged.
    fn poll_publishes(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            self.send_pipeline();
            let Some(in_flight) = self.in_flight.as_mut() else {
                if self.unsent() > 0 {
                    // Held behind a subscribe; its answer wakes this task (the writer).
                    self.flush_waits = true;
                    return Poll::Pending;
                }
                // Everything fed so far is answered: report a failure among it now.
                self.unanswered = false;
                return Poll::Ready(self.deferred.take().map_or(Ok(()), Err));
            };
            let done = std::task::ready!(in_flight.as_mut().poll(cx));
            self.pipeline_done(done)?;
        }
    }

    /// Takes the answer to the pipeline in flight: its emptied pipeline is kept for reuse; a
    /// failure of its publishes is kept for the next flush, one of the connection is returned.
    fn pipeline_done(&mut self, (spare, result): (redis::Pipeline, Result<()>)) -> Result<()> {
        self.in_flight = None;
        self.spare = Some(spare);
        match result {
            Err(error) if error.is_unrecoverable() => Err(self.fail(error)),
            Err(error) => {
                self.deferred.get_or_insert(error);
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// The answer to a `SUBSCRIBE` or `UNSUBSCRIBE` of `topics`: signals for the reading side,
    /// or, for a refused batch, its topics sent again one by one. An error only if the
    /// transport failed.
    fn control_answered(
        &mut self,
        subscribe: bool,
        topics: Vec<Topic>,
        result: Result<()>,
    ) -> Result<()> {
        // The answer becomes a signal (or a failure) for the reading side, and may free
        // publishes held behind it for the writing side: either may be another task than the
        // one that read it.
        for task in self.reader.iter().chain(&self.writer) {
            task.wake_by_ref();
        }
        match result {
            Ok(()) => {
                self.signals.extend(topics.into_iter().map(|topic| {
                    Ok(if subscribe {
                        Up::Subscribed(topic)
                    } else {
                        Up::Unsubscribed(topic)
                    })
                }));
            }
            Err(error) if error.is_unrecoverable() => return Err(self.fail(error)),
            Err(error) if topics.len() > 1 => {
                // Refused, but for which channel? Ask for each alone.
                tracing::debug!(%error, "a batched (UN)SUBSCRIBE was refused; retrying one by one");
                self.singly += topics.len();
                for topic in topics.into_iter().rev() {
                    self.pending.push_front(if subscribe {
                        Command::Subscribe(topic)
                    } else {
                        Command::Unsubscribe(topic)
                    });
                }
            }
            Err(error) => {
                // Refused for this channel alone: the connection goes on.
                let topic = topics.into_iter().next().expect("one topic");
                self.signals.push_back(Ok(if subscribe {
                    Up::SubscribeFailed(topic.clone(), error.on_channel(&topic))
                } else {
                    tracing::warn!(%error, %topic, "UNSUBSCRIBE was refused");
                    Up::Unsubscribed(topic)
                }));
            }
        }
        Ok(())
    }

    /// Drives subscribes and unsubscribes, one command at a time, in order.
    fn poll_control(&mut self, cx: &mut Context<'_>) -> Result<()> {
        loop {
            match &mut self.control {
                Control::InFlight { reply, .. } => {
                    let Poll::Ready(result) = reply.as_mut().poll(cx) else {
                        return Ok(());
                    };
                    let Control::InFlight {
                        subscribe, topics, ..
                    } = std::mem::replace(&mut self.control, Control::Idle)
                    else {
                        unreachable!("matched above");
                    };
                    // redis-rs resolves the answer once it has read it, after the messages
                    // that came before it, which wait in its channel: they go first (an
                    // unsubscribed channel's messages would otherwise come after its answer).
                    self.take_messages_read(cx)?;
                    self.control_answered(subscribe, topics, result)?;
                }
                Control::Sent { .. } => {
                    // Answered by what the connection reads: read it from here too, so that
                    // a sink that nobody reads still hears the answer.
                    self.poll_replies(cx)?;
                    if matches!(self.control, Control::Sent { .. }) {
                        return Ok(());
                    }
                }
                Control::Idle => {
                    let Some(first) = self.pending.pop_front() else {
                        if self.flush_waits && self.unsent() > 0 && self.in_flight.is_none() {
                            // Publishes held behind the subscriptions can go now: wake the
                            // flush waiting for them, once (publishes fed and not flushed
                            // yet wait for a flush, not for this: waking at each poll kept
                            // a task that reads, and flushes later, busy).
                            self.flush_waits = false;
                            self.writer.as_ref().unwrap_or(cx.waker()).wake_by_ref();
                        }
                        return Ok(());
                    };
                    let subscribe = matches!(first, Command::Subscribe(_));
                    let mut topics = vec![first.topic().clone()];
                    // Consecutive commands of the same kind go out as one, but for those being
                    // retried one by one after a batch was refused.
                    let alone = self.singly > 0;
                    self.singly = self.singly.saturating_sub(1);
                    while let Some(next) = self.pending.front() {
                        if alone
                            || matches!(next, Command::Subscribe(_)) != subscribe
                            || topics.len() >= 1024
                        {
                            break;
                        }
                        topics.push(self.pending.pop_front().expect("peeked").topic().clone());
                    }
                    self.send_control(subscribe, topics);
                }
            }
        }
    }

    /// Sends a `SUBSCRIBE` or `UNSUBSCRIBE` of `topics`.
    fn send_control(&mut self, subscribe: bool, topics: Vec<Topic>) {
        let verb: &[u8] = if subscribe {
            b"SUBSCRIBE"
        } else {
            b"UNSUBSCRIBE"
        };
        match &mut self.subscriber {
            Subscriber::Own(connection) => {
                let args: Vec<&[u8]> = std::iter::once(verb)
                    .chain(topics.iter().map(|topic| topic.as_bytes()))
                    .collect();
                connection.send(&args);
                self.request(Request::Control);
                self.control = Control::Sent {
                    subscribe,
                    topics,
                    confirmed: 0,
                };
            }
            Subscriber::RedisRs { sink, .. } => {
                let names: Vec<String> = topics.iter().map(|t| t.as_str().to_owned()).collect();
                let mut sink = sink.clone();
                let timeout = self.config.response_timeout;
                let what = describe_control(subscribe, &topics);
                let reply: BoxFuture<'static, Result<()>> = Box::pin(async move {
                    let request = async {
                        if subscribe {
                            sink.subscribe(&names).await
                        } else {
                            sink.unsubscribe(&names).await
                        }
                    };
                    match tokio::time::timeout(timeout, request).await {
                        Ok(result) => result.map_err(|e| redis_error(&what, e)),
                        Err(_) => Err(Error::new(
                            ErrorKind::Timeout,
                            format!("{what}: no answer within {timeout:?}"),
                        )),
                    }
                });
                self.control = Control::InFlight {
                    subscribe,
                    topics,
                    reply,
                };
            }
        }
    }

    /// Notes a command sent over our own connection, answered within `timeout`.
    fn request(&mut self, request: Request) {
        if self.requests.is_empty() {
            self.arm_reply_timer(request);
        }
        self.requests.push_back(request);
    }

    /// The first of `requests` is answered.
    fn answered(&mut self) -> Option<Request> {
        let request = self.requests.pop_front()?;
        if let Some(&next) = self.requests.front() {
            self.arm_reply_timer(next);
        }
        Some(request)
    }

    /// Times the answer to `request`, the first awaited, from now.
    fn arm_reply_timer(&mut self, request: Request) {
        let timeout = match request {
            Request::Control => self.config.response_timeout,
            Request::Ping => self.config.ping_timeout,
        };
        self.reply_timer.as_mut().reset(crate::deadline_in(timeout));
        self.read_when_armed = self.bytes_read();
    }

    /// How many bytes our own subscribe connection has read.
    fn bytes_read(&self) -> u64 {
        match &self.subscriber {
            Subscriber::Own(connection) => connection.bytes_read(),
            Subscriber::RedisRs { .. } => 0,
        }
    }

    /// Reads our own connection for the answers to its commands while a `SUBSCRIBE` or
    /// `UNSUBSCRIBE` waits for one, keeping the messages read meanwhile for the reading side.
    fn poll_replies(&mut self, cx: &mut Context<'_>) -> Result<()> {
        let mut budget = REPLY_READ_BUDGET;
        while matches!(self.control, Control::Sent { .. }) {
            if self.held_bytes >= MAX_HELD_BYTES {
                // The reading side has enough waiting: read on once it took them (it reads
                // the connection itself then), or fail when the answer is due.
                self.poll_reply_timeout(cx)?;
                break;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match self.poll_message(cx) {
                Poll::Ready(Ok(Some(item))) => {
                    self.held_bytes += held_size(&item);
                    self.signals.push_back(item);
                }
                Poll::Ready(Ok(None)) => {}
                Poll::Ready(Err(error)) => return Err(self.fail(error)),
                Poll::Pending => {
                    self.poll_reply_timeout(cx)?;
                    break;
                }
            }
        }
        // The socket now wakes this task: the reading side, if another, must look again.
        if let Some(reader) = &self.reader {
            if !reader.will_wake(cx.waker()) {
                reader.wake_by_ref();
            }
        }
        Ok(())
    }

    /// Keeps for the reading side the messages redis-rs has read and not handed over yet
    /// (over a redis-rs `PubSub`; our own connection's answers are read in order already), up
    /// to [`MAX_HELD_BYTES`] held.
    fn take_messages_read(&mut self, cx: &mut Context<'_>) -> Result<()> {
        if !matches!(self.subscriber, Subscriber::RedisRs { .. }) {
            return Ok(());
        }
        // All of them: tokio's cooperative budget would make the channel say "nothing" part
        // way (after 128 in one turn of the task), and those after would follow the answer.
        let mut take = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
            while self.held_bytes < MAX_HELD_BYTES {
                match self.poll_message(cx) {
                    Poll::Ready(Ok(Some(item))) => {
                        self.held_bytes += held_size(&item);
                        self.signals.push_back(item);
                    }
                    Poll::Ready(Ok(None)) => {}
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(self.fail(error))),
                    Poll::Pending => break,
                }
            }
            Poll::Ready(Ok(()))
        }));
        match Pin::new(&mut take).poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => unreachable!("never pending"),
        }
    }

    /// The next signal kept for the reading side.
    fn take_signal(&mut self) -> Option<Result<Up<Bytes>>> {
        let signal = self.signals.pop_front()?;
        self.held_bytes -= held_size(&signal);
        Some(signal)
    }

    /// The next item of the subscribe connection (a message, or an error for one skipped over
    /// the size limit), `Ok(None)` if what it read was an answer to a command (handled); an
    /// error if the connection failed.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Result<Up<Bytes>>>>> {
        match &mut self.subscriber {
            Subscriber::Own(connection) => {
                if let Poll::Ready(Err(error)) = connection.poll_write(cx) {
                    return Poll::Ready(Err(error));
                }
                let frame = std::task::ready!(connection.poll_frame(cx))?;
                Poll::Ready(self.handle_frame(frame))
            }
            Subscriber::RedisRs { messages, .. } => {
                match std::task::ready!(Pin::new(messages).poll_next(cx)) {
                    Some(message) => {
                        let len = message.get_payload_bytes().len();
                        if len > self.config.max_message_size {
                            let channel = message.get_channel_name().as_bytes();
                            return Poll::Ready(Ok(Some(Err(self.oversized(channel, len)))));
                        }
                        let channel = self.channel(message.get_channel_name().as_bytes());
                        let frame = self.frames.frame(message);
                        Poll::Ready(Ok(Some(Ok(Up::Message {
                            channel: Some(channel),
                            message: frame,
                        }))))
                    }
                    None => Poll::Ready(Err(Error::connection_lost(
                        "the Redis subscribe connection closed",
                    ))),
                }
            }
        }
    }

    /// The server of our own subscribe connection, for messages.
    fn peer(&self) -> &str {
        match &self.subscriber {
            Subscriber::Own(connection) => connection.peer(),
            Subscriber::RedisRs { .. } => "Redis",
        }
    }

    /// The topic of a message's channel.
    fn channel(&mut self, name: &[u8]) -> Topic {
        match &self.last_channel {
            Some(last) if last.as_bytes() == name => last.clone(),
            _ => {
                let channel = Topic::from(String::from_utf8_lossy(name).as_ref());
                self.last_channel = Some(channel.clone());
                channel
            }
        }
    }

    /// The error item for a message of `len` bytes on `channel`, skipped over the size limit.
    fn oversized(&self, channel: &[u8], len: usize) -> Error {
        Error::new(
            ErrorKind::TooLarge,
            format!(
                "a message of {len} bytes on the channel {} from {} is over the limit of {} bytes (RedisConfig::max_message_size): skipped",
                crate::layers::quote(channel),
                self.peer(),
                self.config.max_message_size
            ),
        )
    }

    /// A frame of our own connection: a message (or an error for one skipped over the size
    /// limit), or an answer to a command.
    fn handle_frame(&mut self, frame: Frame) -> Result<Option<Result<Up<Bytes>>>> {
        // Built on the error paths only: a message is the hot path.
        let unexpected = |this: &Self, frame: &Frame| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "the Redis subscribe connection to {} was sent {}, which it did not ask for",
                    this.peer(),
                    debug_head(frame)
                ),
            )
        };
        match frame {
            Frame::Message { channel, payload } => {
                return Ok(Some(Ok(Up::Message {
                    channel: Some(self.channel(&channel)),
                    message: payload,
                })))
            }
            Frame::Oversized { channel, len } => {
                return Ok(Some(Err(self.oversized(&channel, len))));
            }
            Frame::Subscribed(ref channel) | Frame::Unsubscribed(ref channel) => {
                let subscribing = matches!(frame, Frame::Subscribed(_));
                let Control::Sent {
                    subscribe,
                    topics,
                    confirmed,
                } = &mut self.control
                else {
                    return Err(unexpected(self, &frame));
                };
                if *subscribe != subscribing
                    || self.requests.front().copied() != Some(Request::Control)
                    || topics[*confirmed].as_bytes() != &channel[..]
                {
                    return Err(unexpected(self, &frame));
                }
                *confirmed += 1;
                if *confirmed == topics.len() {
                    self.answered();
                    let Control::Sent {
                        subscribe, topics, ..
                    } = std::mem::replace(&mut self.control, Control::Idle)
                    else {
                        unreachable!("matched above");
                    };
                    self.control_answered(subscribe, topics, Ok(()))?;
                }
            }
            Frame::Pong => {
                if self.requests.front().copied() != Some(Request::Ping) {
                    return Err(unexpected(self, &frame));
                }
                self.answered();
                let next = crate::deadline_in(self.config.ping_interval);
                self.ping.as_mut().reset(next);
            }
            Frame::Error(ref reply) => match self.requests.front().copied() {
                Some(Request::Control) => {
                    self.answered();
                    let Control::Sent {
                        subscribe, topics, ..
                    } = std::mem::replace(&mut self.control, Control::Idle)
                    else {
                        return Err(unexpected(self, &frame));
                    };
                    let what = format!(
                        "{} on {}",
                        describe_control(subscribe, &topics),
                        self.peer()
                    );
                    let error = server_error(&what, reply);
                    self.control_answered(subscribe, topics, Err(error))?;
                }
                Some(Request::Ping) => {
                    // An answer all the same: the connection and the server are alive. Redis
                    // refuses PING while it loads its dataset (`LOADING`, which SUBSCRIBE and
                    // PUBLISH are allowed through), while a script runs too long (`BUSY`),
                    // and to a user not allowed it (`NOPERM`): none is a dead connection, and
                    // reconnecting would only lose what is published meanwhile, once per
                    // ping, for as long as it lasts.
                    let reply = String::from_utf8_lossy(reply);
                    if reply.starts_with("NOPERM") && !self.ping_refused {
                        self.ping_refused = true;
                        tracing::warn!(
                            %reply,
                            peer = %self.peer(),
                            "Redis refuses PING to this user: its error answer still shows the subscribe connection alive (allow +ping to silence this)"
                        );
                    } else {
                        tracing::debug!(%reply, peer = %self.peer(), "Redis answered a ping with an error");
                    }
                    self.answered();
                    let next = crate::deadline_in(self.config.ping_interval);
                    self.ping.as_mut().reset(next);
                }
                None => return Err(unexpected(self, &frame)),
            },
            Frame::Simple(_) | Frame::Unexpected(_) => return Err(unexpected(self, &frame)),
        }
        Ok(None)
    }

    /// Fails the transport if the first command of our own connection is not answered in
    /// time; otherwise registers `cx` to be woken when it is due.
    fn poll_reply_timeout(&mut self, cx: &mut Context<'_>) -> Result<()> {
        let Some(&request) = self.requests.front() else {
            return Ok(());
        };
        if self.reply_timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        if self.bytes_read() != self.read_when_armed {
            // Still reading what came before the answer: alive. Give it the time again.
            self.arm_reply_timer(request);
            let _ = self.reply_timer.as_mut().poll(cx);
            return Ok(());
        }
        let error = match (request, &self.control) {
            (
                Request::Control,
                Control::Sent {
                    subscribe, topics, ..
                },
            ) => Error::new(
                ErrorKind::Timeout,
                format!(
                    "{} on {}: no answer within {:?}{}",
                    describe_control(*subscribe, topics),
                    self.peer(),
                    self.config.response_timeout,
                    if self.held_bytes >= MAX_HELD_BYTES {
                        format!(
                            " (not read: {} bytes of messages read before it wait for the reading side)",
                            self.held_bytes
                        )
                    } else {
                        String::new()
                    }
                ),
            ),
            _ => Error::new(
                ErrorKind::Timeout,
                format!(
                    "the subscribe connection to {} did not answer a PING within {:?}",
                    self.peer(),
                    self.config.ping_timeout
                ),
            ),
        };
        Err(self.fail(error))
    }

    /// Pings the publish connection when no pipeline used it for a ping interval (see
    /// `publisher_check`); an error once it is found dead. Any answer, an error reply
    /// included, shows it alive.
    fn poll_publisher(&mut self, cx: &mut Context<'_>) -> Result<()> {
        if self.publish_timeout.is_none() {
            // The caller's connection (see `publisher_check`).
            return Ok(());
        }
        loop {
            if let Some(ping) = &mut self.publisher_ping {
                let Poll::Ready(answered) = ping.as_mut().poll(cx) else {
                    return Ok(());
                };
                self.publisher_ping = None;
                answered.map_err(|error| self.fail(error))?;
            }
            if self.publisher_check.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            // Pinged once unused for a whole interval; in use (a failure shows on its
            // pipelines), looked at again an interval after the last pipeline.
            let next = crate::deadline_in(self.config.ping_interval);
            let idle_at = self.last_published.checked_add(self.config.ping_interval);
            match idle_at {
                _ if self.in_flight.is_some() => {
                    self.publisher_check.as_mut().reset(next);
                    continue;
                }
                Some(due) if due > tokio::time::Instant::now() => {
                    self.publisher_check.as_mut().reset(due);
                    continue;
                }
                // An interval too long to end: never idle.
                None => {
                    self.publisher_check.as_mut().reset(next);
                    continue;
                }
                Some(_) => self.publisher_check.as_mut().reset(next),
            }
            let mut connection = self.publisher.clone();
            let timeout = self.config.ping_timeout;
            let server = self.server.clone();
            self.publisher_ping = Some(Box::pin(async move {
                let at = server
                    .map(|server| format!(" to {server}"))
                    .unwrap_or_default();
                let command = redis::cmd("PING");
                let ping = command.query_async::<redis::Value>(&mut connection);
                match tokio::time::timeout(timeout, ping).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => {
                        let error =
                            redis_error(&format!("pinging the publish connection{at}"), error);
                        if error.is_unrecoverable() {
                            Err(error)
                        } else {
                            // Refused (`NOPERM`, `BUSY`, ...): answered, so alive.
                            Ok(())
                        }
                    }
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the publish connection{at} did not answer a PING within {timeout:?}"
                        ),
                    )),
                }
            }));
            // Polled at once (next turn), so that the request is on its way.
        }
    }

    /// Pings the subscribe connection on schedule; an error once it is declared dead. Also
    /// looks after the publish connection (`poll_publisher`).
    fn poll_liveness(&mut self, cx: &mut Context<'_>) -> Result<()> {
        self.poll_publisher(cx)?;
        if let Subscriber::Own(_) = self.subscriber {
            self.poll_reply_timeout(cx)?;
            if self.requests.contains(&Request::Ping) || self.ping.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let Subscriber::Own(connection) = &mut self.subscriber else {
                unreachable!("matched above");
            };
            connection.send(&[b"PING"]);
            if let Poll::Ready(Err(error)) = connection.poll_write(cx) {
                return Err(self.fail(error));
            }
            self.request(Request::Ping);
            // Registers the timer for the answer, if it is the first awaited.
            return self.poll_reply_timeout(cx);
        }
        if let Some(reply) = &mut self.ping_reply {
            match reply.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => {
                    self.ping_reply = None;
                    let next = crate::deadline_in(self.config.ping_interval);
                    self.ping.as_mut().reset(next);
                }
                Poll::Ready(Err(error)) => return Err(self.fail(error)),
                Poll::Pending => return Ok(()),
            }
        }
        if self.ping.as_mut().poll(cx).is_ready() {
            let Subscriber::RedisRs { sink, .. } = &self.subscriber else {
                unreachable!("our own connection returned above");
            };
            let mut sink = sink.clone();
            let timeout = self.config.ping_timeout;
            let reply: BoxFuture<'static, Result<()>> = Box::pin(async move {
                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                    // An error answer (`NOPERM`, `BUSY`, ...) comes as a `Value` too: an
                    // answer, so alive (see `handle_frame`).
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(redis_error("pinging the subscribe connection", e)),
                    Err(_) => Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the subscribe connection did not answer a PING within {timeout:?}"
                        ),
                    )),
                }
            });
            self.ping_reply = Some(reply);
            // Poll it once now, so the request is on its way and a waker is registered.
            return self.poll_liveness(cx);
        }
        Ok(())
    }
}

/// A message's payload, shared with redis-rs's own buffer.
struct Payload(Msg);

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.0.get_payload_bytes()
    }
}

/// Received payloads up to an eighth of this are copied into one chunk of this size and split
/// off it, so that small frames share an allocation instead of taking one each.
const FRAME_CHUNK: usize = 8 * 1024;

/// Where received payloads become frames: small ones are copied into a shared chunk (cheaper
/// than an allocation of their own per message), large ones keep redis-rs's buffer, uncopied.
#[derive(Default)]
struct Frames {
    chunk: BytesMut,
}

impl Frames {
    fn frame(&mut self, message: Msg) -> Bytes {
        let payload = message.get_payload_bytes();
        if payload.len() > FRAME_CHUNK / 8 {
            return Bytes::from_owner(Payload(message));
        }
        if self.chunk.capacity() < payload.len() {
            // What was split off keeps the old chunk alive until it is dropped.
            self.chunk.reserve(FRAME_CHUNK);
        }
        self.chunk.extend_from_slice(payload);
        self.chunk.split().freeze()
    }
}

impl Sink<Command<Bytes>> for RedisTransport {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.check()?;
        crate::waker::remember(&mut this.writer, cx);
        if this.unsent() < MAX_PIPELINE && this.unsent_bytes < MAX_UNSENT_BYTES {
            return Poll::Ready(Ok(()));
        }
        // Full: wait for the pipeline in flight, then send this one. A failure of the one in
        // flight is not the next command's: it is reported by the next flush.
        if let Some(in_flight) = this.in_flight.as_mut() {
            let done = std::task::ready!(in_flight.as_mut().poll(cx));
            this.pipeline_done(done)?;
        }
        // Held behind a subscribe? Driven from here too (whatever task feeds this sink), so
        // that its answer wakes this task.
        this.poll_control(cx)?;
        this.send_pipeline();
        let Some(in_flight) = this.in_flight.as_mut() else {
            if this.unsent() < MAX_PIPELINE && this.unsent_bytes < MAX_UNSENT_BYTES {
                // Room again: what waited was given up (see `send_pipeline`).
                return Poll::Ready(Ok(()));
            }
            // Still held behind a subscribe: its answer wakes this task (the writer) when it is
            // answered.
            return Poll::Pending;
        };
        // Started now (polled once: handed to the connection), not when the next flush comes.
        if let Poll::Ready(done) = in_flight.as_mut().poll(cx) {
            this.pipeline_done(done)?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        let this = self.get_mut();
        this.check()?;
        match command {
            Command::Publish { topic, message } => {
                if message.len() > this.config.max_message_size {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "publishing to {topic}: a message of {} bytes is over the limit of {} (RedisConfig::max_message_size)",
                            message.len(),
                            this.config.max_message_size
                        ),
                    ));
                }
                // Sized up front (`pipeline.cmd(..).arg(..)` grows two vectors from empty,
                // several reallocations per publish). Not `.ignore()`d: the replies are
                // discarded anyway (`exec_async`), and error replies are found either way;
                // ignoring costs a hash-set insert per command.
                let mut publish =
                    redis::Cmd::with_capacity(3, "PUBLISH".len() + topic.len() + message.len());
                publish.arg("PUBLISH").arg(topic.as_str()).arg(&message[..]);
                let bytes = topic.len() + message.len();
                this.unsent_bytes += bytes;
                this.unsent.push_back(Unsent {
                    publish,
                    bytes,
                    after: this.control_fed,
                });
                this.unanswered = true;
            }
            subscription => {
                this.pending.push_back(subscription.map(|_| ()));
                this.control_fed += 1;
                // The reading side drives subscriptions: make sure it looks.
                if let Some(reader) = this.reader.take() {
                    reader.wake();
                }
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        this.check()?;
        crate::waker::remember(&mut this.writer, cx);
        this.poll_control(cx)?;
        this.poll_publishes(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if let Some(error) = &this.failed {
            // Closed after a failure: fine if nothing was lost to it, else the failure (the
            // publishes fed since the last answered flush never went, or went unanswered).
            return Poll::Ready(if this.unanswered {
                Err(error.clone())
            } else {
                Ok(())
            });
        }
        crate::waker::remember(&mut this.writer, cx);
        // Publishes held behind a subscribe go once it is answered: drive it from here.
        this.poll_control(cx)?;
        std::task::ready!(this.poll_publishes(cx))?;
        Poll::Ready(Ok(()))
    }
}

impl Stream for RedisTransport {
    type Item = Result<Up<Bytes>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(signal) = this.take_signal() {
                return Poll::Ready(Some(signal));
            }
            if this.failed.is_some() {
                // Reported once; then the stream ends.
                return Poll::Ready(None);
            }
            crate::waker::remember(&mut this.reader, cx);
            if let Err(error) = this.poll_control(cx) {
                if this.signals.is_empty() {
                    return Poll::Ready(Some(Err(error)));
                }
                // After the messages read before it (reading for an answer), which go first.
                let error = Err(error);
                this.held_bytes += held_size(&error);
                this.signals.push_back(error);
                continue;
            }
            if let Some(signal) = this.take_signal() {
                return Poll::Ready(Some(signal));
            }
            match this.poll_message(cx) {
                Poll::Ready(Ok(Some(item))) => {
                    this.read_since_check += 1;
                    if this.read_since_check >= PUBLISHER_CHECK_EVERY {
                        this.read_since_check = 0;
                        if let Err(error) = this.poll_publisher(cx) {
                            // After this message, which was read.
                            let error = Err(error);
                            this.held_bytes += held_size(&error);
                            this.signals.push_back(error);
                        }
                    }
                    return Poll::Ready(Some(item));
                }
                // An answer to a command: look again.
                Poll::Ready(Ok(None)) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(this.fail(error)))),
                // Liveness is looked at only when no message is ready: traffic shows the
                // connection is alive, and its ping timer costs a poll per message otherwise.
                // A ping's reply waiting meanwhile is not late for it (its timeout looks at the
                // reply first).
                Poll::Pending => {
                    return match this.poll_liveness(cx) {
                        Ok(()) => Poll::Pending,
                        Err(error) => Poll::Ready(Some(Err(error))),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    /// A transport whose two connections are in-memory pipes: the test plays Redis at their
    /// other ends (the publish end, then the subscribe end).
    async fn over_pipes(config: RedisConfig) -> (RedisTransport, DuplexStream, DuplexStream) {
        let (publish_end, publish_server) = tokio::io::duplex(1 << 16);
        let info = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
        let (publish, driver) = MultiplexedConnection::new_with_config(
            &info,
            publish_end,
            AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap();
        tokio::spawn(driver);
        let (subscribe_end, subscribe_server) = tokio::io::duplex(1 << 16);
        let connection = SubscribeConnection::over(
            Box::pin(subscribe_end),
            "redis://fake/".into(),
            config.max_message_size,
        );
        let subscriber = Subscriber::Own(Box::new(connection));
        // As `connect` makes it: the transport times its pipelines.
        let publish_timeout = Some(config.response_timeout);
        let mut transport = RedisTransport::new(publish, subscriber, config);
        transport.publish_timeout = publish_timeout;
        (transport, publish_server, subscribe_server)
    }

    /// A server busy for now, or a cluster between masters, is a transient refusal; the rest
    /// is for good.
    #[test]
    fn refusals_for_now_are_transient() {
        use redis::{ErrorKind as K, ServerErrorKind as S};
        for kind in [
            S::BusyLoading,
            S::TryAgain,
            S::Moved,
            S::Ask,
            S::ReadOnly,
            S::ClusterDown,
        ] {
            let error = redis_error(
                "SSUBSCRIBE t",
                RedisError::from((K::Server(kind), "refused")),
            );
            assert!(error.is_transient(), "{kind:?}: {error}");
        }
        for code in [
            "MOVED 3999 127.0.0.1:6381",
            "READONLY You can't write",
            "LOADING",
        ] {
            assert!(
                server_error("SUBSCRIBE t", code.as_bytes()).is_transient(),
                "{code}"
            );
        }
        let error = redis_error(
            "SSUBSCRIBE t",
            RedisError::from((K::Server(S::NoPerm), "no")),
        );
        assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
        assert_eq!(
            server_error("SUBSCRIBE t", b"NOPERM no").kind(),
            ErrorKind::Rejected
        );
    }

    /// Settings whose timers stay out of a test's way.
    fn quiet() -> RedisConfig {
        RedisConfig::new()
            .response_timeout(Duration::from_secs(3600))
            .ping_interval(Duration::from_secs(3600))
    }

    /// A publish of `payload` on channel `c`.
    fn publish(payload: &'static str) -> Command<Bytes> {
        Command::Publish {
            topic: Topic::from("c"),
            message: Bytes::from_static(payload.as_bytes()),
        }
    }

    /// `PUBLISH c <payload>` as it goes on the wire.
    fn publish_on_c(payload: &str) -> String {
        format!(
            "*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n${}\r\n{payload}\r\n",
            payload.len()
        )
    }

    /// The publish end reads `PUBLISH c <payload>` within 20 s (it must come: `why`), and
    /// answers it.
    async fn answer_publish(server: &mut DuplexStream, payload: &str, why: &str) {
        tokio::time::timeout(
            Duration::from_secs(20),
            expect(server, &publish_on_c(payload)),
        )
        .await
        .expect(why);
        server.write_all(b":1\r\n").await.unwrap();
    }

    /// The task flushing the sink finishes within 20 s, without panicking.
    async fn flushed(flusher: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(20), flusher)
            .await
            .expect("flushed")
            .unwrap();
    }

    /// `end` (a publish or a subscribe end) answers every PING it is sent, and nothing else
    /// comes, in a task of its own.
    fn answers_pings(mut end: DuplexStream) {
        tokio::spawn(async move {
            let mut ping = [0; 14];
            while end.read_exact(&mut ping).await.is_ok() {
                assert_eq!(&ping, b"*1\r\n$4\r\nPING\r\n");
                if end.write_all(b"+PONG\r\n").await.is_err() {
                    break;
                }
            }
        });
    }

    /// Reads exactly `expected` at the server end.
    async fn expect(server: &mut DuplexStream, expected: &str) {
        let mut bytes = vec![0; expected.len()];
        server.read_exact(&mut bytes).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&bytes), expected);
    }

    /// Splits `transport`: its sink for the test, its stream read by a task that forwards what
    /// comes up (as debug text) until the first error.
    fn split_with_reader(
        transport: RedisTransport,
    ) -> (
        futures::stream::SplitSink<RedisTransport, Command<Bytes>>,
        tokio::sync::mpsc::UnboundedReceiver<Result<String>>,
    ) {
        let (sink, mut stream) = transport.split();
        let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(up) = stream.next().await {
                let failed = up.is_err();
                if got_tx.send(up.map(|up| format!("{up:?}"))).is_err() || failed {
                    break;
                }
            }
        });
        (sink, got)
    }

    /// The server confirms the SUBSCRIBE of `c`, and the reading side hears of it.
    async fn confirm(
        server: &mut DuplexStream,
        got: &mut tokio::sync::mpsc::UnboundedReceiver<Result<String>>,
    ) {
        server
            .write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
            .await
            .unwrap();
        let confirmed = got.recv().await.unwrap().unwrap();
        assert!(confirmed.starts_with("Subscribed"), "{confirmed}");
    }

    fn message(channel: &str, payload: &str) -> String {
        format!(
            "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
            channel.len(),
            payload.len()
        )
    }

    /// The publish connection is pinged a ping interval after its last publish, not up to two
    /// (the check ran on fixed ticks, and skipped the one after a publish).
    #[tokio::test(start_paused = true)]
    async fn the_publish_connection_is_pinged_an_interval_after_its_last_publish() {
        let config = RedisConfig::new()
            .response_timeout(Duration::from_secs(3600))
            .ping_interval(Duration::from_millis(100))
            .ping_timeout(Duration::from_secs(3600));
        let (transport, mut publish_end, server) = over_pipes(config).await;
        let (mut sink, _got) = split_with_reader(transport);
        // The subscribe connection's pings are answered.
        answers_pings(server);
        let start = Instant::now();
        // The first tick of the check finds the connection idle, and pings it.
        expect(&mut publish_end, "*1\r\n$4\r\nPING\r\n").await;
        publish_end.write_all(b"+PONG\r\n").await.unwrap();
        // A publish between two ticks of the check.
        tokio::time::sleep_until(start + Duration::from_millis(150)).await;
        let flusher = tokio::spawn(async move {
            sink.send(publish("p")).await.unwrap();
            sink
        });
        answer_publish(&mut publish_end, "p", "the publish goes").await;
        let published = Instant::now();
        let _sink = flusher.await.unwrap();
        expect(&mut publish_end, "*1\r\n$4\r\nPING\r\n").await;
        let pinged = published.elapsed();
        assert!(
            pinged <= Duration::from_millis(110),
            "pinged {pinged:?} after the last publish"
        );
    }

    /// The publish connection, idle for a ping interval, is pinged (a server closing idle
    /// clients would take it away between rare publishes); one that does not answer within the
    /// ping timeout fails the transport, naming it.
    #[tokio::test(start_paused = true)]
    async fn an_idle_publish_connection_is_pinged_and_found_dead_when_silent() {
        let config = RedisConfig::new()
            .response_timeout(Duration::from_secs(3600))
            .ping_interval(Duration::from_millis(100))
            .ping_timeout(Duration::from_millis(300));
        let (mut transport, mut publish, server) = over_pipes(config).await;
        let reader = tokio::spawn(async move {
            let error = loop {
                match transport.next().await {
                    Some(Err(error)) => break error,
                    Some(Ok(_)) => {}
                    None => panic!("the stream ended without an error"),
                }
            };
            (transport, error)
        });
        // The subscribe connection's pings are answered; the publish connection's is not.
        answers_pings(server);
        tokio::time::timeout(
            Duration::from_secs(5),
            expect(&mut publish, "*1\r\n$4\r\nPING\r\n"),
        )
        .await
        .expect("the idle publish connection is pinged");
        let (_transport, error) = reader.await.unwrap();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
        assert!(
            error
                .to_string()
                .contains("the publish connection did not answer a PING within 300ms"),
            "{error}"
        );
    }

    /// Only the start of a value's debug form is formatted and kept; a short one whole.
    #[test]
    fn debug_head_keeps_the_start_of_a_long_value_only() {
        let long = vec!["é".repeat(1_000_000)];
        let head = debug_head(&long);
        assert!(head.starts_with("[\"ééé"), "{head}");
        assert!(
            head.ends_with('…') && head.len() <= DEBUG_HEAD + '…'.len_utf8(),
            "{head}"
        );
        assert_eq!(debug_head(&Some(3)), "Some(3)");
    }

    /// What a server sends is quoted, not copied whole, in the errors that tell of it: a
    /// message over the limit on a channel 60,000 bytes long, and a frame nobody asked for.
    #[tokio::test]
    async fn errors_quote_what_the_server_sent_without_copying_it_whole() {
        let (mut transport, _publish, mut server) =
            over_pipes(RedisConfig::new().max_message_size(100)).await;
        let channel = "c".repeat(60_000);
        server
            .write_all(message(&channel, &"x".repeat(200)).as_bytes())
            .await
            .unwrap();
        // The next item: an error of `kind`, its message short.
        async fn short_error(transport: &mut RedisTransport, kind: ErrorKind) -> Error {
            let error = match transport.next().await {
                Some(Err(error)) => error,
                other => panic!("expected an error of kind {kind:?}, got {other:?}"),
            };
            assert_eq!(error.kind(), kind, "{error}");
            let len = error.to_string().len();
            assert!(len < 400, "{len} bytes");
            error
        }
        let error = short_error(&mut transport, ErrorKind::TooLarge).await;
        assert!(error
            .to_string()
            .contains("a message of 200 bytes on the channel \"ccc"));
        server
            .write_all(format!("+{}\r\n", "y".repeat(60_000)).as_bytes())
            .await
            .unwrap();
        short_error(&mut transport, ErrorKind::Protocol).await;
    }

    /// A PING whose answer comes behind a second of messages, five times its timeout: the
    /// bytes arriving show the connection alive, and it is not declared dead.
    #[tokio::test(start_paused = true)]
    async fn a_pong_behind_a_backlog_is_waited_for_while_bytes_arrive() {
        let config = RedisConfig::new()
            .ping_interval(Duration::from_millis(100))
            .ping_timeout(Duration::from_millis(200));
        let (mut transport, publish, mut server) = over_pipes(config).await;
        answers_pings(publish);
        let reader = tokio::spawn(async move {
            let mut messages = 0;
            while messages < 20 {
                match transport.next().await {
                    Some(Ok(Up::Message { .. })) => messages += 1,
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error),
                    None => panic!("the stream ended"),
                }
            }
            Ok(transport)
        });
        expect(&mut server, "*1\r\n$4\r\nPING\r\n").await;
        for n in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let frame = message("c", &n.to_string());
            if server.write_all(frame.as_bytes()).await.is_err() {
                break; // The transport is gone: the reader says why.
            }
        }
        let mut transport = reader.await.unwrap().expect("alive: bytes kept coming");
        server
            .write_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
            .await
            .unwrap();
        // Answered: the next PING comes after the interval, and is timed on its own.
        let next = tokio::spawn(async move { transport.next().await.map(|up| up.is_ok()) });
        expect(&mut server, "*1\r\n$4\r\nPING\r\n").await;
        server.write_all(b"+PONG\r\n").await.unwrap();
        server
            .write_all(message("c", "last").as_bytes())
            .await
            .unwrap();
        assert_eq!(next.await.unwrap(), Some(true));
    }

    /// A PING sent while a SUBSCRIBE waits is timed from when the SUBSCRIBE is answered (Redis
    /// answers in order), not from when the PING was sent.
    #[tokio::test(start_paused = true)]
    async fn a_ping_behind_a_slow_subscribe_is_timed_from_the_subscribes_answer() {
        let config = RedisConfig::new()
            .response_timeout(Duration::from_millis(1_000))
            .ping_timeout(Duration::from_millis(1_000))
            .ping_interval(Duration::from_millis(100));
        let start = Instant::now();
        let (transport, publish, mut server) = over_pipes(config).await;
        answers_pings(publish);
        let (mut sink, mut got) = split_with_reader(transport);
        sink.send(Command::Subscribe(Topic::from("c")))
            .await
            .unwrap();
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n").await;
        expect(&mut server, "*1\r\n$4\r\nPING\r\n").await;
        tokio::time::sleep_until(start + Duration::from_millis(900)).await;
        confirm(&mut server, &mut got).await;
        // 1.5 s after the PING was sent, 0.6 s after the SUBSCRIBE's answer.
        tokio::time::sleep_until(start + Duration::from_millis(1_500)).await;
        server
            .write_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
            .await
            .unwrap();
        server
            .write_all(message("c", "after").as_bytes())
            .await
            .unwrap();
        let after = got.recv().await.unwrap().expect("not declared dead");
        assert!(after.contains("after"), "{after}");
    }

    /// A transport split in two tasks: the reading task reads the SUBSCRIBE's confirmation,
    /// and the flushing task, whose publish waits behind it, is woken by it (not by the reply
    /// timer, an hour away).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_confirmation_read_by_the_reading_task_wakes_the_flushing_task() {
        let config = quiet();
        let (transport, mut publish_server, mut server) = over_pipes(config).await;
        let (mut sink, mut got) = split_with_reader(transport);
        let flusher = tokio::spawn(async move {
            sink.feed(Command::Subscribe(Topic::from("c")))
                .await
                .unwrap();
            sink.feed(Command::Publish {
                topic: Topic::from("c"),
                message: Bytes::from_static(b"hi"),
            })
            .await
            .unwrap();
            sink.flush().await.unwrap();
        });
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n").await;
        // A message first: whichever task reads it, the reading task yields it, and is then
        // the one waiting on the socket.
        server
            .write_all(message("c", "first").as_bytes())
            .await
            .unwrap();
        let first = got.recv().await.unwrap().unwrap();
        assert!(first.contains("first"), "{first}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        confirm(&mut server, &mut got).await;
        // The publish held behind the subscribe goes out, and the flush completes.
        answer_publish(&mut publish_server, "hi", "the flushing task was woken").await;
        flushed(flusher).await;
    }

    /// A publish waits for the subscribes fed before it, not for those fed after it: under
    /// steady subscription churn, publishes still go.
    #[tokio::test]
    async fn a_publish_waits_for_earlier_subscribes_only() {
        let config = quiet();
        let (transport, mut publish_server, mut server) = over_pipes(config).await;
        let (mut sink, mut got) = split_with_reader(transport);
        let (sent_c, c_sent) = tokio::sync::oneshot::channel();
        let flusher = tokio::spawn(async move {
            sink.feed(Command::Subscribe(Topic::from("c")))
                .await
                .unwrap();
            sink.feed(publish("1")).await.unwrap();
            // `d` goes out as a command of its own (queued with `c`, it would join it).
            c_sent.await.unwrap();
            sink.feed(Command::Subscribe(Topic::from("d")))
                .await
                .unwrap();
            sink.feed(publish("2")).await.unwrap();
            sink.flush().await.unwrap();
        });
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n").await;
        sent_c.send(()).unwrap();
        let publish_1 = publish_on_c("1");
        // Nothing is published before the first subscribe is answered.
        let mut early = [0u8; 1];
        tokio::time::timeout(
            Duration::from_millis(100),
            publish_server.read_exact(&mut early),
        )
        .await
        .expect_err("the publish waits for the subscribe fed before it");
        confirm(&mut server, &mut got).await;
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nd\r\n").await;
        // `d` is not answered yet: the first publish goes all the same, the second waits.
        tokio::time::timeout(
            Duration::from_secs(20),
            expect(&mut publish_server, &publish_1),
        )
        .await
        .expect("the first publish does not wait for the later subscribe");
        publish_server.write_all(b":1\r\n").await.unwrap();
        tokio::time::timeout(
            Duration::from_millis(100),
            publish_server.read_exact(&mut early),
        )
        .await
        .expect_err("the second publish waits for the subscribe fed before it");
        server
            .write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n")
            .await
            .unwrap();
        answer_publish(
            &mut publish_server,
            "2",
            "the second publish goes once `d` is answered",
        )
        .await;
        flushed(flusher).await;
    }

    /// A pipeline's time allows for sending it: a 3 MiB publish that a slow link takes longer
    /// than the response timeout to carry is answered, not declared dead; one that is never
    /// answered still times out. (On a paused clock: the link's pace and the timeouts are
    /// exact, however busy the machine.)
    #[tokio::test(start_paused = true)]
    async fn a_large_pipeline_on_a_slow_link_is_given_time_to_go() {
        assert_eq!(
            pipeline_timeout(Duration::from_millis(300), 3 << 20),
            Duration::from_millis(1200)
        );
        assert_eq!(pipeline_timeout(Duration::MAX, usize::MAX), Duration::MAX);
        let config = RedisConfig::new()
            .response_timeout(Duration::from_millis(300))
            .ping_interval(Duration::from_secs(3600));
        let (mut transport, mut publish_server, _server) = over_pipes(config).await;
        let large = Bytes::from(vec![b'x'; 3 << 20]);
        transport
            .feed(Command::Publish {
                topic: Topic::from("c"),
                message: large,
            })
            .await
            .unwrap();
        let flushed = tokio::spawn(async move {
            let started = Instant::now();
            let result = transport.flush().await;
            (transport, result, started.elapsed())
        });
        // The link carries 256 KiB every 50 ms: about 600 ms for the whole command.
        let command_len = "*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$3145728\r\n".len() + (3 << 20) + 2;
        let mut read = 0;
        let mut chunk = vec![0; 256 << 10];
        while read < command_len {
            let want = chunk.len().min(command_len - read);
            publish_server.read_exact(&mut chunk[..want]).await.unwrap();
            read += want;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publish_server.write_all(b":1\r\n").await.unwrap();
        let (mut transport, result, took) = flushed.await.unwrap();
        result.expect("answered within the time a 3 MiB pipeline is given");
        assert!(took > Duration::from_millis(300), "{took:?}");
        // Never answered: a small pipeline times out after the response timeout.
        transport
            .feed(Command::Publish {
                topic: Topic::from("c"),
                message: Bytes::from_static(b"x"),
            })
            .await
            .unwrap();
        let started = Instant::now();
        let error = transport.flush().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
        assert!(
            error.to_string().contains("no answer within 300ms"),
            "{error}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    /// A feeder that never flushes: the full pipeline (by count, or by bytes) goes out as the
    /// next publish is fed, not at the next flush.
    #[tokio::test]
    async fn a_full_pipeline_goes_out_without_a_flush() {
        let large = Bytes::from(vec![b'x'; 1 << 20]);
        for (count, message) in [
            (MAX_PIPELINE, Bytes::from_static(b"x")),
            (MAX_UNSENT_BYTES >> 20, large),
        ] {
            let (mut transport, mut publish_server, _server) = over_pipes(quiet()).await;
            for _ in 0..=count {
                transport
                    .feed(Command::Publish {
                        topic: Topic::from("c"),
                        message: message.clone(),
                    })
                    .await
                    .unwrap();
            }
            let start = format!("*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n${}\r\n", message.len());
            tokio::time::timeout(Duration::from_secs(5), expect(&mut publish_server, &start))
                .await
                .unwrap_or_else(|_| panic!("the full pipeline of {count} is sent"));
        }
    }

    /// A full pipeline refused for now (`BUSY`): the publishes fed after it are not sent
    /// before the flush that reports the refusal, which answers them too (a retry layer then
    /// sends everything again, in order). They went out, and arrived before the refused ones.
    #[tokio::test]
    async fn publishes_after_a_pipeline_refused_for_now_wait_for_the_flush() {
        let (mut transport, mut publish_server, _server) = over_pipes(quiet()).await;
        let publish = || Command::Publish {
            topic: Topic::from("c"),
            message: Bytes::from_static(b"x"),
        };
        for _ in 0..=MAX_PIPELINE {
            transport.feed(publish()).await.unwrap();
        }
        // The full pipeline went: refused, its last command with BUSY.
        let one = publish_on_c("x");
        let mut sent = vec![0; one.len() * MAX_PIPELINE];
        tokio::time::timeout(Duration::from_secs(5), publish_server.read_exact(&mut sent))
            .await
            .expect("the full pipeline is sent")
            .unwrap();
        let mut replies = ":1\r\n".repeat(MAX_PIPELINE - 1);
        replies.push_str("-BUSY Redis is busy running a script\r\n");
        publish_server.write_all(replies.as_bytes()).await.unwrap();
        // A second pipeline's worth: it used to go out as the first one's failure came in.
        for _ in 0..MAX_PIPELINE {
            transport.feed(publish()).await.unwrap();
        }
        let mut more = [0; 1];
        let read =
            tokio::time::timeout(Duration::from_millis(300), publish_server.read(&mut more)).await;
        assert!(
            read.is_err(),
            "publishes after the refused pipeline were sent"
        );
        let error = transport.flush().await.unwrap_err();
        assert!(error.is_transient(), "{error}");
    }

    /// Publishes that waited behind different subscribes, all answered by the time a
    /// pipeline can go, go in that one pipeline (not one round trip each).
    #[tokio::test]
    async fn publishes_ready_together_go_in_one_pipeline() {
        let config = quiet();
        let (transport, mut publish_server, mut server) = over_pipes(config).await;
        let (mut sink, mut got) = split_with_reader(transport);
        let (step_tx, mut step) = tokio::sync::mpsc::unbounded_channel::<()>();
        let flusher = tokio::spawn(async move {
            // A first pipeline goes out, and stays unanswered.
            sink.feed(publish("0")).await.unwrap();
            assert!(futures::poll!(sink.flush()).is_pending());
            sink.feed(Command::Subscribe(Topic::from("c")))
                .await
                .unwrap();
            sink.feed(publish("1")).await.unwrap();
            step.recv().await.unwrap();
            sink.feed(Command::Subscribe(Topic::from("d")))
                .await
                .unwrap();
            sink.feed(publish("2")).await.unwrap();
            step.recv().await.unwrap();
            sink.flush().await.unwrap();
        });
        expect(&mut publish_server, &publish_on_c("0")).await;
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n").await;
        confirm(&mut server, &mut got).await;
        step_tx.send(()).unwrap();
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nd\r\n").await;
        server
            .write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nd\r\n:2\r\n")
            .await
            .unwrap();
        let confirmed = got.recv().await.unwrap().unwrap();
        assert!(confirmed.starts_with("Subscribed"), "{confirmed}");
        // The first pipeline is answered; the flush sends both waiting publishes at once.
        publish_server.write_all(b":1\r\n").await.unwrap();
        step_tx.send(()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            expect(
                &mut publish_server,
                &(publish_on_c("1") + &publish_on_c("2")),
            ),
        )
        .await
        .expect("both publishes in one pipeline, before either is answered");
        publish_server.write_all(b":1\r\n:1\r\n").await.unwrap();
        flushed(flusher).await;
    }

    /// The reading side finds the connection gone while a publish waits unflushed: closing the
    /// sink then reports the failure (the publish is lost), where a close with everything
    /// answered before the failure is fine.
    #[tokio::test]
    async fn a_close_after_a_failure_reports_publishes_it_lost() {
        for lost in [true, false] {
            let config = quiet();
            let (mut transport, mut publish_server, server) = over_pipes(config).await;
            transport
                .feed(Command::Publish {
                    topic: Topic::from("c"),
                    message: Bytes::from_static(b"hi"),
                })
                .await
                .unwrap();
            if !lost {
                let flushed = tokio::spawn(async move {
                    transport.flush().await.unwrap();
                    transport
                });
                expect(&mut publish_server, &publish_on_c("hi")).await;
                publish_server.write_all(b":1\r\n").await.unwrap();
                transport = flushed.await.unwrap();
            }
            // The subscribe connection ends: the reading side fails the transport.
            drop(server);
            let failure = transport.next().await.unwrap().unwrap_err();
            let closed = transport.close().await;
            if lost {
                let error = closed.expect_err("a publish was lost");
                assert_eq!(error.kind(), failure.kind(), "{error}");
            } else {
                closed.expect("nothing was lost");
            }
        }
    }

    /// Messages read while a subscribe waited for its answer come before the failure that
    /// ended the connection after them, and nothing comes after it: the error came first, and
    /// the messages after it (a reconnect layer, replacing the connection at the error, lost
    /// them).
    #[tokio::test]
    async fn messages_read_before_a_failure_come_before_it() {
        let (mut transport, _publish_server, mut server) = over_pipes(quiet()).await;
        transport
            .send(Command::Subscribe(Topic::from("a")))
            .await
            .unwrap();
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n").await;
        server
            .write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
            .await
            .unwrap();
        let confirmed = transport.next().await.unwrap().unwrap();
        assert!(matches!(confirmed, Up::Subscribed(_)), "{confirmed:?}");
        // A second subscribe waits for its answer when messages on `a` come, then the end.
        transport
            .send(Command::Subscribe(Topic::from("b")))
            .await
            .unwrap();
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nb\r\n").await;
        for payload in ["1", "2"] {
            server
                .write_all(message("a", payload).as_bytes())
                .await
                .unwrap();
        }
        drop(server);
        let mut got = Vec::new();
        while let Some(up) = transport.next().await {
            got.push(match up {
                Ok(Up::Message { message, .. }) => String::from_utf8_lossy(&message).into_owned(),
                Ok(other) => format!("{other:?}"),
                Err(error) => format!("error: {:?}", error.kind()),
            });
        }
        assert_eq!(got, ["1", "2", "error: ConnectionLost"]);
    }

    /// A server at its client limit writes `-ERR max number of clients reached` as it accepts
    /// the subscribe connection, and closes it; with no password, nothing was read before the
    /// first SUBSCRIBE, which takes that line for its answer. The connection failed, for the
    /// reconnect layer to build a new one: not a refusal of the channel for good.
    #[tokio::test]
    async fn a_server_full_when_it_accepted_fails_the_connection_not_the_channel() {
        let (mut transport, _publish, mut server) = over_pipes(quiet()).await;
        server
            .write_all(b"-ERR max number of clients reached\r\n")
            .await
            .unwrap();
        transport
            .feed(Command::Subscribe(Topic::from("c")))
            .await
            .unwrap();
        let wait = Duration::from_secs(10);
        let flushed = tokio::time::timeout(wait, transport.flush()).await.unwrap();
        let next = tokio::time::timeout(wait, transport.next()).await.unwrap();
        // Reported by the flush or by the stream; not as a refusal of the channel.
        let error = match (flushed, next) {
            (Err(error), _) | (Ok(()), Some(Err(error))) => error,
            other => panic!("expected the connection to fail, got {other:?}"),
        };
        assert!(error.is_unrecoverable(), "{error}");
        assert!(
            error.to_string().contains("max number of clients"),
            "{error}"
        );
    }

    #[test]
    fn a_url_is_printed_without_its_password() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:s3cret@host:1/2", "redis://:***@host:1/2"),
            ("redis://user:s3cret@host/", "redis://user:***@host/"),
            ("redis://user@host/", "redis://user@host/"),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=s3cret&user=u",
                "redis+unix:///tmp/r.sock?db=1&pass=***&user=u",
            ),
            (
                "unix:///tmp/r.sock?pass=s3cret",
                "unix:///tmp/r.sock?pass=***",
            ),
            // The scheme left out or mistyped: still no password.
            ("default:s3cret@host:6379", "default:***@host:6379"),
            ("redis:/:s3cret@host", "redis:***@host"),
            ("s3cret@host", "***@host"),
        ];
        for (url, printed) in cases {
            assert_eq!(redact(url), printed);
        }
    }

    /// Timeouts "disabled" with `Duration::MAX` do not panic when armed (answers, pings).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeouts_of_duration_max_do_not_panic() {
        let config = RedisConfig::new()
            .response_timeout(Duration::MAX)
            .ping_timeout(Duration::MAX)
            .ping_interval(Duration::MAX);
        let (transport, mut publish_server, mut server) = over_pipes(config).await;
        let (mut sink, mut got) = split_with_reader(transport);
        sink.send(Command::Subscribe(Topic::from("c")))
            .await
            .unwrap();
        expect(&mut server, "*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n").await;
        confirm(&mut server, &mut got).await;
        server
            .write_all(message("c", "after").as_bytes())
            .await
            .unwrap();
        let after = got.recv().await.unwrap().expect("still up");
        assert!(after.contains("after"), "{after}");
        // A pipeline's time, the response timeout and more per MiB, saturates too.
        let flushed = tokio::spawn(async move {
            sink.send(Command::Publish {
                topic: Topic::from("c"),
                message: Bytes::from_static(b"hi"),
            })
            .await
        });
        expect(&mut publish_server, &publish_on_c("hi")).await;
        publish_server.write_all(b":1\r\n").await.unwrap();
        flushed.await.unwrap().unwrap();
    }
}
