use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::{Sink, Stream};

use crate::layers::{Command, Error, ErrorKind, Result, Topic, Up};

/// An in-memory pub/sub broker of raw frames, with faults on command: for testing layers and
/// event targets without a server.
///
/// Each [`connect`](Self::connect) makes a [`BrokerConnection`], a raw transport (`Bytes`
/// frames, messages carry their channel, subscribes are confirmed). Like a socket, a
/// connection sends its publishes when flushed; they then reach every connection subscribed
/// to their channel, in order. Unlike a socket, its subscribes and unsubscribes take effect
/// as they are fed: a publish fed before an unsubscribe, and flushed after it, no longer
/// reaches that connection itself. [`kill_connections`](Self::kill_connections)
/// fails every live connection (their streams yield an unrecoverable error, their sinks refuse);
/// [`set_accepting`](Self::set_accepting)`(false)` makes new connects fail, like a server that
/// is down.
///
/// ```
/// use alkdev_pubsub::testkit::MemoryBroker;
/// use alkdev_pubsub::{Command, Up};
/// use futures::{SinkExt, StreamExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let broker = MemoryBroker::new();
/// let mut connection = broker.connect()?;
/// connection.send(Command::Subscribe("a".into())).await?;
/// assert!(matches!(connection.next().await, Some(Ok(Up::Subscribed(_)))));
/// broker.inject("a", "frame");
/// assert!(matches!(connection.next().await, Some(Ok(Up::Message { .. }))));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
}

#[derive(Default)]
struct BrokerState {
    connections: HashMap<u64, Connection>,
    next_id: u64,
    refusing: bool,
    connects: u64,
    published: Vec<(Topic, Bytes)>,
    max_message: Option<usize>,
    refused: HashSet<Topic>,
}

struct Connection {
    subscribed: HashSet<Topic>,
    outgoing: Vec<(Topic, Bytes)>,
    inbox: VecDeque<Up<Bytes>>,
    reader: Option<Waker>,
    dead: bool,
}

impl Connection {
    fn push(&mut self, up: Up<Bytes>) {
        self.inbox.push_back(up);
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBroker")
            .field("connections", &state.connections.len())
            .field("refusing", &state.refusing)
            .field("connects", &state.connects)
            .finish()
    }
}

impl MemoryBroker {
    /// A broker that accepts connections.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BrokerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection, or an error of kind [`Connect`](ErrorKind::Connect) while the broker
    /// refuses connections.
    pub fn connect(&self) -> Result<BrokerConnection> {
        let mut state = self.lock();
        if state.refusing {
            return Err(Error::new(
                ErrorKind::Connect,
                "the memory broker refuses connections",
            ));
        }
        state.connects += 1;
        let id = state.next_id;
        state.next_id += 1;
        state.connections.insert(
            id,
            Connection {
                subscribed: HashSet::new(),
                outgoing: Vec::new(),
                inbox: VecDeque::new(),
                reader: None,
                dead: false,
            },
        );
        Ok(BrokerConnection {
            broker: self.clone(),
            id,
        })
    }

    /// Whether new connections are accepted.
    pub fn set_accepting(&self, accepting: bool) {
        self.lock().refusing = !accepting;
    }

    /// The largest message a connection takes: a bigger publish is refused by `start_send`
    /// with an error of kind [`TooLarge`](ErrorKind::TooLarge), and the connection goes on
    /// (as the WebSocket transport does). `None`: no limit (the default).
    pub fn set_max_message(&self, bytes: Option<usize>) {
        self.lock().max_message = bytes;
    }

    /// Refuses, from now on, every subscribe to `channel` for good, as a server's access
    /// control would: the connection answers it with [`Up::SubscribeFailed`] (an error of kind
    /// [`Rejected`](ErrorKind::Rejected)). Subscriptions already in effect stay.
    pub fn refuse_channel(&self, channel: impl Into<Topic>) {
        self.lock().refused.insert(channel.into());
    }

    /// Drops every subscription to `channel` for good: each live connection that had one is
    /// told with an [`Up::SubscribeFailed`] that answers no command (what a transport reports
    /// when its server refuses a channel it subscribed again on its own, as the Redis Cluster
    /// transport does after a node comes back), and later subscribes are refused.
    pub fn revoke_channel(&self, channel: impl Into<Topic>) {
        let channel = channel.into();
        let mut state = self.lock();
        state.refused.insert(channel.clone());
        for connection in state.connections.values_mut() {
            if !connection.dead && connection.subscribed.remove(&channel) {
                let error = Error::new(
                    ErrorKind::Rejected,
                    format!("the memory broker revoked channel {channel}"),
                );
                connection.push(Up::SubscribeFailed(channel.clone(), error));
            }
        }
    }

    /// Fails every live connection; what they had not flushed is lost.
    pub fn kill_connections(&self) {
        self.kill_where(|_| true);
    }

    /// Fails the live connections whose [`id`](BrokerConnection::id) passes `filter`.
    pub fn kill_where(&self, filter: impl Fn(u64) -> bool) {
        let mut state = self.lock();
        for (id, connection) in state.connections.iter_mut() {
            if filter(*id) {
                connection.dead = true;
                connection.outgoing.clear();
                if let Some(reader) = connection.reader.take() {
                    reader.wake();
                }
            }
        }
    }

    /// Publishes a raw `frame` on `channel`, as another client would.
    pub fn inject(&self, channel: impl Into<Topic>, frame: impl Into<Bytes>) {
        self.publish(channel.into(), frame.into());
    }

    fn publish(&self, channel: Topic, frame: Bytes) {
        Self::deliver(&mut self.lock(), channel, frame);
    }

    fn deliver(state: &mut BrokerState, channel: Topic, frame: Bytes) {
        state.published.push((channel.clone(), frame.clone()));
        for connection in state.connections.values_mut() {
            if !connection.dead && connection.subscribed.contains(&channel) {
                connection.push(Up::Message {
                    channel: Some(channel.clone()),
                    message: frame.clone(),
                });
            }
        }
    }

    /// How many connections were made so far.
    pub fn connects(&self) -> u64 {
        self.lock().connects
    }

    /// The channels some live connection is subscribed to.
    pub fn channels(&self) -> HashSet<Topic> {
        self.lock()
            .connections
            .values()
            .filter(|c| !c.dead)
            .flat_map(|c| c.subscribed.iter().cloned())
            .collect()
    }

    /// Every frame published so far, with its channel, in order.
    pub fn published(&self) -> Vec<(Topic, Bytes)> {
        self.lock().published.clone()
    }
}

/// One connection to a [`MemoryBroker`]: a raw transport.
pub struct BrokerConnection {
    broker: MemoryBroker,
    id: u64,
}

impl fmt::Debug for BrokerConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConnection")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for BrokerConnection {
    fn drop(&mut self) {
        self.broker.lock().connections.remove(&self.id);
    }
}

impl BrokerConnection {
    /// This connection's id, for [`MemoryBroker::kill_where`].
    pub fn id(&self) -> u64 {
        self.id
    }

    fn lost(&self) -> Error {
        Error::connection_lost(format!("memory broker connection {} was killed", self.id))
    }

    fn alive(&self) -> Result<()> {
        match self.broker.lock().connections.get(&self.id) {
            Some(connection) if !connection.dead => Ok(()),
            _ => Err(self.lost()),
        }
    }
}

impl Sink<Command<Bytes>> for BrokerConnection {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(self.alive())
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        self.alive()?;
        match command {
            Command::Publish { topic, message } => {
                let mut state = self.broker.lock();
                if let Some(max) = state.max_message.filter(|max| message.len() > *max) {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "publishing to {topic}: a message of {} bytes is over the memory broker's limit of {max}",
                            message.len()
                        ),
                    ));
                }
                if let Some(connection) = state.connections.get_mut(&self.id) {
                    connection.outgoing.push((topic, message));
                }
            }
            Command::Subscribe(topic) => {
                let mut state = self.broker.lock();
                let refused = state.refused.contains(&topic);
                if let Some(connection) = state.connections.get_mut(&self.id) {
                    if refused {
                        let error = Error::new(
                            ErrorKind::Rejected,
                            format!("the memory broker refuses channel {topic}"),
                        );
                        connection.push(Up::SubscribeFailed(topic, error));
                    } else {
                        connection.subscribed.insert(topic.clone());
                        connection.push(Up::Subscribed(topic));
                    }
                }
            }
            Command::Unsubscribe(topic) => {
                let mut state = self.broker.lock();
                if let Some(connection) = state.connections.get_mut(&self.id) {
                    connection.subscribed.remove(&topic);
                    connection.push(Up::Unsubscribed(topic));
                }
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<()>> {
        let mut state = self.broker.lock();
        let outgoing = match state.connections.get_mut(&self.id) {
            Some(connection) if !connection.dead => std::mem::take(&mut connection.outgoing),
            _ => return Poll::Ready(Err(self.lost())),
        };
        for (channel, frame) in outgoing {
            MemoryBroker::deliver(&mut state, channel, frame);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let flushed = self.as_mut().poll_flush(cx);
        self.broker.lock().connections.remove(&self.id);
        flushed
    }
}

impl Stream for BrokerConnection {
    type Item = Result<Up<Bytes>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let lost = self.lost();
        let mut state = self.broker.lock();
        let Some(connection) = state.connections.get_mut(&self.id) else {
            return Poll::Ready(None);
        };
        if connection.dead {
            return Poll::Ready(Some(Err(lost)));
        }
        match connection.inbox.pop_front() {
            Some(up) => Poll::Ready(Some(Ok(up))),
            None => {
                connection.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
