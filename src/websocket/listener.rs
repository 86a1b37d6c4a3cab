use std::fmt;
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

use super::{event_target, WebSocketConfig, WebSocketTransport};
use crate::layers::{Error, ErrorKind, Result};
use crate::EventTarget;

/// Accepts WebSocket connections on a TCP listener: one transport, or one event target, per
/// connection, with the peer's address.
///
/// `accept` performs the handshake before returning (bounded by
/// [`handshake_timeout`](WebSocketConfig::handshake_timeout)); to keep slow handshakes from
/// holding up the next connection, use [`accept_tcp`](Self::accept_tcp) and run
/// [`WebSocketConfig::accept`] in a task of its own.
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
///             # drop(events);
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
}

impl fmt::Debug for WebSocketListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketListener")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("config", &self.config)
            .finish()
    }
}

impl WebSocketListener {
    /// Listens on `address` with the default [`WebSocketConfig`]. An error names the
    /// address (or, for a host name, the addresses it resolved to).
    pub async fn bind(address: impl ToSocketAddrs) -> Result<Self> {
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
        Ok(Self::from_listener(listener, WebSocketConfig::default()))
    }

    /// Accepts on `listener` with `config`.
    pub fn from_listener(listener: TcpListener, config: WebSocketConfig) -> Self {
        WebSocketListener { listener, config }
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

    /// The next TCP connection, not yet upgraded.
    pub async fn accept_tcp(&self) -> Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.listener.accept().await.map_err(|e| {
            Error::with_source(
                ErrorKind::ConnectionLost,
                format!("accepting a connection: {e}"),
                e,
            )
        })?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }

    /// The next WebSocket connection, handshake done.
    pub async fn accept(&self) -> Result<(WebSocketTransport<TcpStream>, SocketAddr)> {
        let (stream, peer) = self.accept_tcp().await?;
        let transport = self
            .config
            .clone()
            .accept(stream)
            .await
            .map_err(|e| Error::with_source(e.kind(), format!("from {peer}: {e}"), e))?;
        Ok((transport, peer))
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
