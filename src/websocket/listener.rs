use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::future::{abortable, AbortHandle, Aborted, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use super::{event_target, WebSocketConfig, WebSocketTransport};
use crate::layers::{Error, ErrorKind, Result};
use crate::EventTarget;

/// How many handshakes [`WebSocketListener::accept`] runs at once by default
/// ([`WebSocketListener::max_pending_handshakes`]); past that, each connection it accepts drops
/// the oldest handshake still under way.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// How long [`WebSocketListener::accept_tcp`] pauses after an accept failed for lack of
/// resources (file descriptors, memory), before it returns the error: a loop that accepts
/// again at once would spin.
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// A handshake under way: its peer's transport, or the error that names the peer.
type Handshake = BoxFuture<'static, Result<(WebSocketTransport<TcpStream>, SocketAddr)>>;

/// The handshakes under way, and how to drop the oldest (in the order they started; those
/// that ended are skipped, and pruned).
#[derive(Default)]
struct Pending {
    running: FuturesUnordered<Handshake>,
    started: VecDeque<(AbortHandle, Arc<AtomicBool>)>,
}

/// Accepts WebSocket connections on a TCP listener: one transport, or one event target, per
/// connection, with the peer's address.
///
/// [`accept`](Self::accept) returns the next connection whose handshake is done. It runs the
/// handshakes of the connections it took concurrently (up to
/// [`max_pending_handshakes`](Self::max_pending_handshakes), each bounded by
/// [`handshake_timeout`](WebSocketConfig::handshake_timeout)), so a peer that connects and stays
/// silent holds up no one else; past that many, a new connection drops the oldest handshake
/// still under way (reported as that connection's error), so that silent connections cannot
/// keep the next ones out for a handshake timeout. Handshakes make progress while an `accept`
/// is awaited (their timeouts run on in between): loop on it, handing each connection to a task
/// of its own, as below. Handshakes started by an `accept` that was cancelled go on with the
/// next call.
///
/// Connections whose handshake is done are not capped: each can hold about 2.3 MiB at the
/// default 1 MiB message limit (tungstenite's 128 KiB read buffer, a message being read, and
/// a write buffer of up to 128 KiB, one message and 64 KiB; a peer sending a message in
/// fragments can make the one being read about twice the limit before it is refused), and one
/// that answers pings stays
/// as long as it likes. With untrusted peers, bound them in the accept loop (a
/// `tokio::sync::Semaphore` permit moved into each connection's task, say).
///
/// ```no_run
/// use alkdev_pubsub::websocket::WebSocketListener;
/// use alkdev_pubsub::EventTarget;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), alkdev_pubsub::Error> {
/// let listener = WebSocketListener::bind("127.0.0.1:9000").await?;
/// loop {
///     match listener.accept_event_target().await {
///         Ok((events, peer)) => {
///             let events: EventTarget = events;
///             println!("{peer} connected");
///             // Serve it in a task of its own, and accept the next at once.
///             tokio::spawn(async move {
///                 let _subscription = events.subscribe("chat:general").await;
///                 // ...
///             });
///         }
///         // One connection's failure (a plain HTTP request, a port scanner, a handshake that
///         // timed out) ends that connection only: the server goes on accepting.
///         Err(error) => eprintln!("a connection failed: {error}"),
///     }
/// }
/// # }
/// ```
pub struct WebSocketListener {
    listener: TcpListener,
    config: WebSocketConfig,
    handshakes: tokio::sync::Mutex<Pending>,
    max_pending: usize,
}

impl fmt::Debug for WebSocketListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketListener")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("config", &self.config)
            .field(
                "pending_handshakes",
                &self
                    .handshakes
                    .try_lock()
                    .map(|pending| pending.running.len())
                    .ok(),
            )
            .finish()
    }
}

impl WebSocketListener {
    /// Listens on `address` with the default [`WebSocketConfig`]: see
    /// [`bind_with`](Self::bind_with).
    ///
    /// # Errors
    ///
    /// As [`bind_with`](Self::bind_with).
    pub async fn bind(address: impl ToSocketAddrs) -> Result<Self> {
        Self::bind_with(address, WebSocketConfig::default()).await
    }

    /// Listens on `address`, accepting with `config`: its limits, timeouts and handshake
    /// check ([`WebSocketConfig::check_request`], which a server that browsers can reach needs
    /// to refuse pages of other origins).
    ///
    /// ```no_run
    /// use alkdev_pubsub::websocket::{WebSocketConfig, WebSocketListener};
    ///
    /// # async fn run() -> Result<(), alkdev_pubsub::Error> {
    /// let config = WebSocketConfig::new().check_request(|request| {
    ///     match request.headers().get("origin").map(|o| o.as_bytes()) {
    ///         None | Some(b"https://app.example") => Ok(()),
    ///         Some(_) => Err("origin not allowed".to_owned()),
    ///     }
    /// });
    /// let listener = WebSocketListener::bind_with("127.0.0.1:9000", config).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Connect`](crate::ErrorKind::Connect), naming the address it could not bind (for a
    /// host name, the addresses it resolved to), or saying that the name did not resolve (the
    /// resolver's error is its `source()`).
    pub async fn bind_with(address: impl ToSocketAddrs, config: WebSocketConfig) -> Result<Self> {
        let failed = |on: String, e: std::io::Error| {
            Error::with_source(
                ErrorKind::Connect,
                format!("binding a WebSocket listener on {on}: {e}"),
                e,
            )
        };
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| failed("an address that did not resolve".to_owned(), e))?
            .collect();
        let listener = TcpListener::bind(&addresses[..])
            .await
            .map_err(|e| failed(format!("{addresses:?}"), e))?;
        Ok(Self::from_listener(listener, config))
    }

    /// Accepts on `listener` with `config`.
    pub fn from_listener(listener: TcpListener, config: WebSocketConfig) -> Self {
        WebSocketListener {
            listener,
            config,
            handshakes: tokio::sync::Mutex::new(Pending::default()),
            max_pending: MAX_PENDING_HANDSHAKES,
        }
    }

    /// How many handshakes run at once ([`MAX_PENDING_HANDSHAKES`] by default, at least 1);
    /// past that, each connection accepted drops the oldest handshake still under way.
    #[must_use]
    pub fn max_pending_handshakes(mut self, handshakes: usize) -> Self {
        self.max_pending = handshakes.max(1);
        self
    }

    /// The address listened on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| {
            Error::with_source(
                ErrorKind::Other,
                format!("reading the listener's address: {e}"),
                e,
            )
        })
    }

    /// The next TCP connection, not yet upgraded (to run the handshake yourself, with
    /// [`WebSocketConfig::accept`]).
    ///
    /// An accept that failed for lack of resources (on Unix `EMFILE`, `ENFILE`, `ENOBUFS`,
    /// `ENOMEM`) returns an error of kind [`ErrorKind::Unavailable`] after a pause of 100 ms,
    /// so that a loop that accepts again does not spin; other failures concern the one
    /// connection ([`ErrorKind::ConnectionLost`]).
    pub async fn accept_tcp(&self) -> Result<(TcpStream, SocketAddr)> {
        match self.listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                Ok((stream, peer))
            }
            Err(e) if is_exhaustion(&e) => {
                tokio::time::sleep(EXHAUSTED_PAUSE).await;
                Err(Error::with_source(
                    ErrorKind::Unavailable,
                    format!("accepting a connection: out of resources: {e}"),
                    e,
                ))
            }
            Err(e) => Err(Error::with_source(
                ErrorKind::ConnectionLost,
                format!("accepting a connection: {e}"),
                e,
            )),
        }
    }

    /// The next WebSocket connection whose handshake is done (see the [type](Self)'s
    /// documentation: handshakes run concurrently). An error concerns one connection (a
    /// handshake that failed or timed out, naming the peer) or one accept: the listener goes
    /// on.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: a connection it took whose handshake is under way is returned by a later
    /// call. Calls from several tasks take turns.
    pub async fn accept(&self) -> Result<(WebSocketTransport<TcpStream>, SocketAddr)> {
        let mut pending = self.handshakes.lock().await;
        loop {
            tokio::select! {
                biased;
                Some(done) = pending.running.next(), if !pending.running.is_empty() => return done,
                accepted = self.accept_tcp() => {
                    let (stream, peer) = accepted?;
                    if pending.running.len() >= self.max_pending {
                        pending.drop_oldest();
                    }
                    pending.start(self.config.clone(), stream, peer, self.max_pending);
                }
            }
        }
    }

    /// The next connection as an event target (see [`event_target`]).
    pub async fn accept_event_target<P>(&self) -> Result<(EventTarget<P>, SocketAddr)>
    where
        P: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let (transport, peer) = self.accept().await?;
        Ok((event_target(transport), peer))
    }
}

impl Pending {
    /// Starts the handshake of `stream`, from `peer`.
    fn start(&mut self, config: WebSocketConfig, stream: TcpStream, peer: SocketAddr, max: usize) {
        let finished = Arc::new(AtomicBool::new(false));
        let (handshake, abort) = abortable(async move {
            let mut transport = config
                .accept(stream)
                .await
                .map_err(|e| Error::wrap(e.kind(), format_args!("from {peer}"), e))?;
            transport.peer = Some(peer);
            Ok((transport, peer))
        });
        let done = Arc::clone(&finished);
        self.running.push(Box::pin(async move {
            let outcome = handshake.await;
            done.store(true, Relaxed);
            outcome.unwrap_or_else(|Aborted| {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("from {peer}: the handshake was dropped for a newer connection ({max} handshakes were under way)"),
                ))
            })
        }));
        self.started.push_back((abort, finished));
        // Handshakes that ended are forgotten now and then: the list stays within about twice
        // the ones under way (whatever the cap, `usize::MAX` included).
        if self.started.len() > self.running.len().saturating_mul(2) + 64 {
            self.started.retain(|(_, finished)| !finished.load(Relaxed));
        }
    }

    /// Drops the oldest handshake still under way: it ends with an error.
    fn drop_oldest(&mut self) {
        while let Some((abort, finished)) = self.started.pop_front() {
            if !finished.load(Relaxed) {
                abort.abort();
                return;
            }
        }
    }
}

/// Whether an accept failed for lack of resources, which a retry at once would meet again.
fn is_exhaustion(error: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOMEM and ENOBUFS, which `io::ErrorKind` does not tell apart.
    #[cfg(unix)]
    const EXHAUSTED: [i32; 4] = [24, 23, 12, if cfg!(target_os = "linux") { 105 } else { 55 }];
    #[cfg(not(unix))]
    const EXHAUSTED: [i32; 0] = [];
    error
        .raw_os_error()
        .is_some_and(|code| EXHAUSTED.contains(&code))
        || error.kind() == std::io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no cap on handshakes (`usize::MAX`), those that ended are still forgotten: one
    /// entry per connection ever accepted stayed.
    #[tokio::test]
    async fn ended_handshakes_are_forgotten_without_a_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut pending = Pending {
            running: FuturesUnordered::new(),
            started: VecDeque::new(),
        };
        for _ in 0..300 {
            // A peer that connects and leaves at once: its handshake fails.
            drop(TcpStream::connect(address).await.unwrap());
            let (stream, peer) = listener.accept().await.unwrap();
            pending.start(WebSocketConfig::new(), stream, peer, usize::MAX);
            let ended = pending.running.next().await.expect("a handshake");
            assert!(ended.is_err());
        }
        assert!(
            pending.started.len() <= 65,
            "{} handshakes remembered, none under way",
            pending.started.len()
        );
    }
}
