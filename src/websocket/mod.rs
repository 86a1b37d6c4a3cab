//! WebSocket transport (feature `websocket`): the JavaScript design's per-connection,
//! bidirectional event target, over tokio-tungstenite.
//!
//! [`WebSocketTransport`] is a raw transport (`Bytes` frames with no channel): each publish is
//! one text frame holding the encoded envelope (the codec layer makes it exactly the
//! envelope's JSON), and every text or binary frame that arrives comes up as a message whose
//! topic the codec derives from the envelope. Subscribing is local: the peer sends everything
//! it publishes, and the event target keeps what has listeners; subscribes are confirmed at
//! once.
//!
//! - **Protocol errors**: a frame that breaks the WebSocket protocol, or a text message that
//!   is not UTF-8, ends the connection (an error of kind
//!   [`Protocol`](crate::ErrorKind::Protocol)); the peer is told why, best effort, with code
//!   1002 or 1007. (A binary frame that does not decode is only skipped, by the layers above.)
//! - **Handshakes**: a server can check each request before it answers
//!   ([`check_request`](WebSocketConfig::check_request): its `Origin`, when browsers can reach
//!   it).
//! - **Limits**: a message over [`max_message_size`](WebSocketConfig::max_message_size)
//!   (1 MiB by default) is refused while its header is read, without buffering it (one sent
//!   in fragments is refused at the fragment that takes it over the limit, once that fragment
//!   is read: up to about twice the limit is buffered): the
//!   connection is closed with code 1009 and the stream reports an error of kind
//!   [`TooLarge`](crate::ErrorKind::TooLarge). A publish over the limit is refused before it is
//!   sent, with the same kind of error; the connection goes on. What waits to be sent is
//!   bounded too: the pongs tungstenite answers pings with, which a peer that pings and never
//!   reads would make pile up, stop at about one message past tungstenite's write buffer (then
//!   only the latest is kept), and a publish that finds no room waits for it.
//! - **Liveness**: a ping every [`ping_interval`](WebSocketConfig::ping_interval) (at least
//!   twice per idle timeout; one that falls due while sending waits for the peer goes out as
//!   soon as the socket takes more); a peer silent for
//!   [`idle_timeout`](WebSocketConfig::idle_timeout) (no frame, no pong) is gone, reported as an
//!   [unrecoverable](crate::Error::is_unrecoverable) timeout, unless it is reading a backlog
//!   (sending waited for it and went on within the idle timeout: its pong comes behind what
//!   was sent before the ping); so is a peer that has read nothing for as long while there was
//!   something to send (its pings alone would keep it looking alive while every publish
//!   waited). The checks run whenever the socket has nothing more to read, and at least every
//!   1,024 frames read, so a peer that floods the connection is checked too. (A peer that
//!   needs longer than the idle timeout to read what the socket buffers hold ahead of a ping,
//!   while sending never has to wait for it, is taken for gone: keep the idle timeout above
//!   that.)
//! - **Close**: closing the transport performs the close handshake: it sends its close frame,
//!   then reads (and drops) what the peer still sends until the peer's close frame comes, so
//!   that the socket ends cleanly rather than with a reset that would throw away what was still
//!   on its way to the peer. All of it takes at most 5 s: a peer that does not read our close
//!   frame by then fails the close with an error of kind [`ErrorKind::Timeout`]. (A split
//!   transport's reading half gets nothing more once the writing half closes: what comes
//!   meanwhile is dropped.) A close handshake the peer starts ends the stream cleanly.
//! - **TLS**: with the feature `websocket-rustls`, `connect` takes `wss://` URLs (trusting the
//!   webpki roots) and [`WebSocketConfig::connect_with_tls`] takes a rustls client
//!   configuration of your own; on the server side, hand [`WebSocketTransport::accept`] a TLS
//!   stream (for example from tokio-rustls) or terminate TLS in a proxy.
//!
//! [`WebSocketListener`] accepts connections on a TCP listener and yields one transport (or one
//! event target) per connection, with the peer's address; it runs their handshakes
//! concurrently. Reconnection belongs to the client:
//! stack the [reconnect layer](crate::layers::reconnect) over a [`WebSocketTransport::connect`]
//! factory; after a reconnect, a new connection is a new peer.
//!
//! ```no_run
//! use alkdev_pubsub::websocket::{self, WebSocketTransport};
//! use alkdev_pubsub::{Envelope, EventTarget};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), alkdev_pubsub::Error> {
//! let events: EventTarget = websocket::event_target(WebSocketTransport::connect("ws://127.0.0.1:9000/").await?);
//! events.dispatch_event(Envelope::new("session.status", "p1", "running".into())).await?;
//! # Ok(())
//! # }
//! ```

mod listener;

pub use listener::{WebSocketListener, MAX_PENDING_HANDSHAKES};
/// The TLS library of [`WebSocketConfig::connect_with_tls`], re-exported so that its client
/// configuration can be built at the same version.
#[cfg(feature = "websocket-rustls")]
pub use rustls;
/// The WebSocket implementation this transport is built on, re-exported so that
/// [`WebSocketTransport::from_stream`]'s stream type can be named at the same version.
pub use tokio_tungstenite;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::AcqRel, Ordering::Release};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use futures::{Sink, Stream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig as TungsteniteConfig,
};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::ServiceBuilder;

use crate::layers::{CodecLayer, Command, Error, ErrorKind, ParseErrorLayer, Result, Up};
use crate::EventTarget;

/// The default largest message accepted: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Settings of a [`WebSocketTransport`].
///
/// ```
/// use alkdev_pubsub::websocket::WebSocketConfig;
/// use std::time::Duration;
///
/// let config = WebSocketConfig::new()
///     .max_message_size(64 * 1024)
///     .ping_interval(Duration::from_secs(10))
///     .idle_timeout(Duration::from_secs(30));
/// # drop(config);
/// ```
#[derive(Clone, Debug)]
pub struct WebSocketConfig {
    max_message_size: usize,
    ping_interval: Duration,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    check: Option<RequestCheck>,
}

/// The opening handshake's HTTP request, as a [`WebSocketConfig::check_request`] hook sees it:
/// method, URI (path and query), headers.
pub type HandshakeRequest = tungstenite::handshake::server::Request;

/// A [`WebSocketConfig::check_request`] hook.
#[derive(Clone)]
struct RequestCheck(Arc<CheckFn>);

type CheckFn = dyn Fn(&HandshakeRequest) -> std::result::Result<(), String> + Send + Sync;

impl fmt::Debug for RequestCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestCheck(..)")
    }
}

impl Default for WebSocketConfig {
    /// 1 MiB messages, a ping every 15 s, a peer silent for 45 s is gone, 10 s to handshake.
    fn default() -> Self {
        WebSocketConfig {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            handshake_timeout: Duration::from_secs(10),
            check: None,
        }
    }
}

impl WebSocketConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest message (and frame) accepted, in bytes. Also the largest one sent: a
    /// bigger publish fails alone with an error of kind [`ErrorKind::TooLarge`], and the
    /// connection goes on.
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How often to ping the peer; at least twice per [`idle_timeout`](Self::idle_timeout),
    /// and at most once a millisecond.
    #[must_use]
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// How long the peer may stay silent (no frame, no pong) before it is declared gone; also
    /// how long sending may wait for the peer to read (a peer that pings but reads nothing
    /// would otherwise hold every publish up for good). There is no "never": a zero timeout
    /// declares the peer gone at the first quiet moment; for a very long one, give a very
    /// long duration (`Duration::MAX` works). Liveness is judged by whole messages received
    /// and flushes completed, so a peer that reads, or uploads one message, slower than about
    /// 128 KiB (or that message's size) per timeout counts as silent.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long the opening handshake may take.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Checks each opening handshake this side accepts ([`accept`](Self::accept), and so a
    /// [`WebSocketListener`] given this config: [`WebSocketListener::bind_with`]) before
    /// answering it: `Err(reason)` refuses the connection with
    /// `403 Forbidden` and the reason as the response body, and `accept` fails with an error
    /// of kind [`ErrorKind::Rejected`] that gives the reason. Runs on the accepting task (for a
    /// [`WebSocketListener`], the one calling `accept`): it must not block, and a panic in it
    /// unwinds there. Clients ([`connect`](Self::connect)) ignore it.
    ///
    /// A browser tells the origin of the page that opens a WebSocket in the `Origin` header,
    /// and does not stop a page of any origin from connecting: a server that browsers can
    /// reach (also one on `127.0.0.1`) should check it, or any page its users open can read
    /// and publish its events (cross-site WebSocket hijacking). Clients other than browsers
    /// usually send no `Origin`.
    ///
    /// ```
    /// use alkdev_pubsub::websocket::WebSocketConfig;
    ///
    /// let config = WebSocketConfig::new().check_request(|request| {
    ///     match request.headers().get("origin").map(|origin| origin.as_bytes()) {
    ///         None | Some(b"https://app.example.com") => Ok(()),
    ///         Some(other) => Err(format!("origin {} not allowed", String::from_utf8_lossy(other))),
    ///     }
    /// });
    /// # drop(config);
    /// ```
    #[must_use]
    pub fn check_request<F>(mut self, check: F) -> Self
    where
        F: Fn(&HandshakeRequest) -> std::result::Result<(), String> + Send + Sync + 'static,
    {
        self.check = Some(RequestCheck(Arc::new(check)));
        self
    }

    /// The largest message accepted.
    pub fn get_max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// How often pings go out: the interval, but at least twice per idle timeout, so that a
    /// quiet, healthy peer answers one in time (also the first).
    fn ping_every(&self) -> Duration {
        self.ping_interval
            .min(self.idle_timeout / 2)
            .max(Duration::from_millis(1))
    }

    fn tungstenite(&self) -> TungsteniteConfig {
        let config = TungsteniteConfig::default();
        // What tungstenite buffers to send: a message, and the pongs it answers pings with.
        // A peer that pings and never reads would make those pile up without end; past this,
        // tungstenite keeps only the latest pong, and a message waits (see `held`).
        let max_write = config
            .write_buffer_size
            .saturating_add(self.max_message_size)
            .saturating_add(WRITE_SLACK);
        config
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
            .max_write_buffer_size(max_write)
    }

    /// Connects to `url` (`ws://host:port/path`) with these settings.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a URL that is not `ws://` (or `wss://` with the feature
    /// `websocket-rustls`) or a TLS setting that cannot work; [`ErrorKind::Rejected`] when
    /// the server answers the handshake with a refusal (400, 401, 403, 405 or 426) or a
    /// permanent redirect (301, 308: redirects are not followed; the error names where to), or
    /// refuses the TLS handshake: retrying cannot help; [`ErrorKind::Connect`] otherwise (no server,
    /// a timeout, another status): it may succeed later. Each names the URL.
    pub async fn connect(self, url: impl AsRef<str>) -> Result<WebSocketTransport> {
        let url = url.as_ref();
        check_url(url)?;
        let connecting =
            tokio_tungstenite::connect_async_with_config(url, Some(self.tungstenite()), true);
        self.handshake(url, connecting).await
    }

    /// Connects to a `wss://` `url` with a TLS configuration of the caller's (for example one
    /// that trusts a private CA); plain [`connect`](Self::connect) trusts the webpki roots.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    #[cfg(feature = "websocket-rustls")]
    pub async fn connect_with_tls(
        self,
        url: impl AsRef<str>,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<WebSocketTransport> {
        let url = url.as_ref();
        check_url(url)?;
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(self.tungstenite()),
            true,
            Some(tokio_tungstenite::Connector::Rustls(tls)),
        );
        self.handshake(url, connecting).await
    }

    /// Waits for a client handshake, within the handshake timeout.
    async fn handshake<R>(
        self,
        url: &str,
        connecting: impl Future<
            Output = std::result::Result<
                (WebSocketStream<MaybeTlsStream<TcpStream>>, R),
                tungstenite::Error,
            >,
        >,
    ) -> Result<WebSocketTransport> {
        let (stream, _response) = tokio::time::timeout(self.handshake_timeout, connecting)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Connect,
                    format!(
                        "connecting to {url}: no handshake within {:?}",
                        self.handshake_timeout
                    ),
                )
            })?
            .map_err(|e| handshake_error(format!("connecting to {url}"), e))?;
        let peer = match stream.get_ref() {
            MaybeTlsStream::Plain(tcp) => tcp.peer_addr().ok(),
            #[cfg(feature = "websocket-rustls")]
            MaybeTlsStream::Rustls(tls) => tls.get_ref().0.peer_addr().ok(),
            _ => None,
        };
        let mut transport = WebSocketTransport::from_stream(stream, self);
        transport.peer = peer;
        Ok(transport)
    }

    /// Performs the server side of the handshake on `stream` with these settings.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Rejected`] when [`check_request`](Self::check_request) refused the request
    /// (the error gives its reason; the client got `403`); [`ErrorKind::Connect`] when the
    /// client sent no valid handshake within the [handshake
    /// timeout](Self::handshake_timeout), or the connection failed during it. Each concerns
    /// this one connection.
    pub async fn accept<S>(self, stream: S) -> Result<WebSocketTransport<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Why the check refused the request, for the error.
        let refused = std::sync::Mutex::new(None);
        // tungstenite's `Callback` answers with an `ErrorResponse`, whatever its size.
        #[allow(clippy::result_large_err)]
        let check = |request: &HandshakeRequest, response| {
            let Some(RequestCheck(check)) = &self.check else {
                return Ok(response);
            };
            check(request).map(|()| response).map_err(|reason| {
                *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                let mut refusal = tungstenite::handshake::server::ErrorResponse::new(Some(reason));
                *refusal.status_mut() = tungstenite::http::StatusCode::FORBIDDEN;
                refusal
            })
        };
        let accepting = tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            check,
            Some(self.tungstenite()),
        );
        let stream = tokio::time::timeout(self.handshake_timeout, accepting)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Connect,
                    format!(
                        "accepting a WebSocket: no handshake within {:?}",
                        self.handshake_timeout
                    ),
                )
            })?
            .map_err(|e| {
                let what = match refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(reason) => format!("accepting a WebSocket: refused ({reason})"),
                    None => "accepting a WebSocket".to_owned(),
                };
                handshake_error(what, e)
            })?;
        Ok(WebSocketTransport::from_stream(stream, self))
    }
}

/// Refuses, before connecting, a URL that cannot be a WebSocket server's, with an error of kind
/// [`ErrorKind::Config`].
fn check_url(url: &str) -> Result<()> {
    let invalid =
        |why: String| Error::new(ErrorKind::Config, format!("connecting to {url}: {why}"));
    let uri: tungstenite::http::Uri = url
        .parse()
        .map_err(|e| invalid(format!("not a URL ({e})")))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return Err(invalid("not a ws:// or wss:// URL".to_owned()));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host".to_owned()));
    }
    Ok(())
}

/// A failed handshake as this crate's error: an invalid URL is [`ErrorKind::Config`]; a server
/// that refused the request itself (400, 401, 403, 405, 426) or moved it for good (301, 308),
/// or a TLS handshake that failed
/// on a certificate or on what the two sides support, is [`ErrorKind::Rejected`]; anything
/// else, a 404 or a 503 from a proxy whose backend is not up yet included, is
/// [`ErrorKind::Connect`]. `what` says what was being done.
fn handshake_error(what: String, error: tungstenite::Error) -> Error {
    let kind = match &error {
        tungstenite::Error::Url(_) => ErrorKind::Config,
        // Refused, or moved for good (301, 308: this client does not follow redirects, and
        // the same URL will be redirected again).
        tungstenite::Error::Http(response)
            if matches!(
                response.status().as_u16(),
                301 | 308 | 400 | 401 | 403 | 405 | 426
            ) =>
        {
            ErrorKind::Rejected
        }
        #[cfg(feature = "websocket-rustls")]
        tungstenite::Error::Tls(_) => ErrorKind::Config,
        #[cfg(feature = "websocket-rustls")]
        tungstenite::Error::Io(io) if tls_refused(io) => ErrorKind::Rejected,
        _ => ErrorKind::Connect,
    };
    let moved = match &error {
        tungstenite::Error::Http(response) if response.status().is_redirection() => response
            .headers()
            .get("location")
            .and_then(|to| to.to_str().ok())
            .map(|to| format!(" (redirected to {to:?}; redirects are not followed)"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    Error::with_source(kind, format!("{what}: {error}{moved}"), error)
}

/// Whether a TLS handshake failed for good: the certificate (untrusted, for another name,
/// revoked), none presented, nothing in common between the two sides, or the peer's alert
/// saying one of these. A retry with the same settings meets the same; the reconnect layer
/// gives up at once on a first connection that fails so. A certificate out of its validity
/// period is not among them (the clock may be wrong, say at boot, and set right later), nor is
/// an alert that may be passing (`internal_error`, `handshake_failure` from a proxy that is
/// starting).
#[cfg(feature = "websocket-rustls")]
fn tls_refused(io: &std::io::Error) -> bool {
    // The `*Context` variants are rustls 0.23.24's (the minimum this crate asks for).
    use rustls::{AlertDescription as A, CertificateError as C};
    io.get_ref()
        .and_then(|cause| cause.downcast_ref::<rustls::Error>())
        .is_some_and(|cause| match cause {
            rustls::Error::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => false,
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::PeerIncompatible(_)
            | rustls::Error::UnsupportedNameType => true,
            rustls::Error::AlertReceived(alert) => matches!(
                alert,
                A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::ProtocolVersion
                    | A::InsufficientSecurity
                    | A::CertificateRequired
            ),
            _ => false,
        })
}

/// The liveness is checked when the socket has nothing more to read, and at least once per
/// this many items read.
const LIVENESS_EVERY: u32 = 1024;

/// How long closing may take: sending our close frame, then waiting for the peer's.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The most frames closing reads (and drops) per poll while it waits for the peer's close
/// frame.
const CLOSE_READ_BUDGET: usize = 256;

/// Room in tungstenite's write buffer beyond its flush threshold and one message: frame
/// headers, a ping, a close frame, some pongs.
const WRITE_SLACK: usize = 64 * 1024;

/// The longest frame header: 2 bytes, a 64-bit length, a mask key.
const MAX_FRAME_HEADER: usize = 14;

/// The WebSocket transport: see the [module](self).
pub struct WebSocketTransport<S = MaybeTlsStream<TcpStream>> {
    stream: WebSocketStream<S>,
    config: WebSocketConfig,
    signals: VecDeque<Up<Bytes>>,
    reader: Option<Waker>,
    /// The task that last used the sink: a ping sent from the reading side must not take its
    /// wake-up (the WebSocket keeps one waker for writing).
    writer: Option<Waker>,
    ping: Pin<Box<Sleep>>,
    last_heard: Instant,
    /// Something arrived since `last_heard` was last set (cheaper than reading the clock per
    /// frame).
    heard: bool,
    /// Since when sending has waited for the peer to read (the sink was not ready, or not
    /// flushed), if it waits: cleared each time what waited went out.
    stalled_since: Option<Instant>,
    /// Fires when sending has waited for the idle timeout: the sending side checks the stall
    /// itself (see [`poll_stall`](Self::poll_stall)). Made at the first wait.
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// When sending last stopped waiting for the peer to read: it read. A peer reading a
    /// backlog answers a ping once it reaches it, behind what was sent before: its silence
    /// does not count while it reads.
    drained_at: Option<Instant>,
    /// A ping fell due while the sink was busy: it goes out as soon as the sink has room.
    ping_owed: bool,
    /// Items read since the liveness was last checked: a peer that floods the connection
    /// keeps the socket from ever being found empty, where the check otherwise runs.
    read_since_check: u32,
    /// Closing has begun: when it gives up (see [`CLOSE_WAIT`]).
    closing: Option<Pin<Box<Sleep>>>,
    /// Our close frame is sent (flushed).
    close_sent: bool,
    /// Our close frame is queued (see [`poll_close`](Sink::poll_close)).
    close_fed: bool,
    /// The peer's close frame came, and tungstenite's answer to it may still wait for the
    /// socket: the stream goes on driving it (see [`poll_close_reply`](Self::poll_close_reply)).
    answering_close: bool,
    /// The peer's address, where known (a connection this crate made or accepted): errors
    /// name it.
    peer: Option<std::net::SocketAddr>,
    /// tungstenite's sink said it was not ready (what it buffered waits for the socket): its
    /// next readiness means that went out. (Ready otherwise says nothing of the peer.)
    blocked: bool,
    /// A frame tungstenite refused because its write buffer was full (of pongs, which a peer
    /// that pings and does not read makes it queue): it goes out first once the buffer has
    /// drained (see [`poll_held`](Self::poll_held)).
    held: Option<Message>,
    /// Set once the connection is over; reported once, then the stream ends.
    failed: Option<Error>,
    reported: bool,
    /// Publishes were fed since the last flush: if the connection ends now, they are lost,
    /// and `poll_close` says so.
    unflushed: bool,
    /// The waker the WebSocket reads with (see [`poll_frame`](Self::poll_frame)), and what it
    /// wakes.
    read_waker: Waker,
    read_wake: Arc<ReadWake>,
    /// Reading found nothing: the socket is not read again before a wake-up says it may have
    /// something.
    read_idle: bool,
}

/// Wakes the reading task, and notes that it did: see [`WebSocketTransport::poll_frame`].
#[derive(Default)]
struct ReadWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Release);
        self.task.wake();
    }
}

impl<S> fmt::Debug for WebSocketTransport<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketTransport")
            .field("config", &self.config)
            .field("failed", &self.failed)
            .finish()
    }
}

impl WebSocketTransport {
    /// Connects to `url` (`ws://host:port/path`) with the default [`WebSocketConfig`].
    ///
    /// # Errors
    ///
    /// As [`WebSocketConfig::connect`].
    pub async fn connect(url: impl AsRef<str>) -> Result<Self> {
        WebSocketConfig::default().connect(url).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketTransport<S> {
    /// Performs the server side of the handshake on an accepted stream (for example a
    /// `TcpStream`), with the default [`WebSocketConfig`].
    ///
    /// # Errors
    ///
    /// As [`WebSocketConfig::accept`].
    pub async fn accept(stream: S) -> Result<Self> {
        WebSocketConfig::default().accept(stream).await
    }

    /// A transport over a WebSocket that is already open: a [`tokio_tungstenite`] stream (this
    /// module re-exports the crate, so that its types are the same version as this one's),
    /// for example one a hyper-based server upgraded (`hyper::upgrade::on`, then
    /// `WebSocketStream::from_raw_socket(io, Role::Server, None)`). axum's own `WebSocket` is
    /// another type. Its own limits stay as they were configured, and bound what it reads and
    /// buffers (give it a `max_write_buffer_size`, in the config passed where it is made rather
    /// than `None`: tungstenite's default has none, and a peer that pings without reading
    /// would make its pongs pile up; make it at least tungstenite's `write_buffer_size`,
    /// 128 KiB, plus the largest message sent, plus some room, as this crate's own connections
    /// do with 64 KiB: a publish that cannot fit fails with [`ErrorKind::TooLarge`]);
    /// `config` sets the ping interval and idle timeout, and the largest message this transport
    /// sends ([`max_message_size`](WebSocketConfig::max_message_size): a publish over it is
    /// refused, so give the stream's limit there too).
    ///
    /// The stream is read again only once it woke the task after it last had nothing to read
    /// (as the `AsyncRead` contract has it): a stream that returns `Pending` without arranging a
    /// wake-up, or makes data readable without waking its reader, stalls the reading side.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with its timer enabled (the transport arms its ping timer
    /// here).
    pub fn from_stream(stream: WebSocketStream<S>, config: WebSocketConfig) -> Self {
        let read_wake = Arc::new(ReadWake::default());
        WebSocketTransport {
            stream,
            ping: Box::pin(tokio::time::sleep(config.ping_every())),
            config,
            signals: VecDeque::new(),
            reader: None,
            writer: None,
            last_heard: Instant::now(),
            heard: false,
            stalled_since: None,
            stall_timer: None,
            drained_at: None,
            ping_owed: false,
            read_since_check: 0,
            closing: None,
            close_sent: false,
            close_fed: false,
            answering_close: false,
            peer: None,
            blocked: false,
            held: None,
            failed: None,
            reported: false,
            unflushed: false,
            read_waker: Waker::from(Arc::clone(&read_wake)),
            read_wake,
            read_idle: false,
        }
    }

    /// A transport over a raw, already upgraded socket (`role`: which side this is), with
    /// `config`'s limits.
    pub async fn from_raw_socket(stream: S, role: Role, config: WebSocketConfig) -> Self {
        let stream =
            WebSocketStream::from_raw_socket(stream, role, Some(config.tungstenite())).await;
        Self::from_stream(stream, config)
    }

    /// The WebSocket underneath.
    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.stream
    }

    /// The WebSocket underneath, mutably.
    pub fn get_mut(&mut self) -> &mut WebSocketStream<S> {
        // Whatever is done with it, the next read looks at the socket again.
        self.read_idle = false;
        &mut self.stream
    }

    fn fail(&mut self, error: Error) -> Error {
        if self.failed.is_none() {
            // Either side of a split transport may be waiting on something the other polled
            // last (the socket's one read or write waker, a close).
            for task in self.reader.iter().chain(&self.writer) {
                task.wake_by_ref();
            }
        }
        self.failed.get_or_insert(error).clone()
    }

    /// The close is over: the sink is closed, and the stream ends (cleanly: the reading side,
    /// if another task, is told).
    fn closed(&mut self) {
        self.fail(Error::closed("the WebSocket is closed"));
        self.reported = true;
    }

    /// " (peer ADDRESS)" where the peer is known, for messages.
    fn peer_label(&self) -> String {
        self.peer
            .map(|peer| format!(" (peer {peer})"))
            .unwrap_or_default()
    }

    /// " at ADDRESS" where the peer is known, for messages about the peer.
    fn peer_at(&self) -> String {
        self.peer
            .map(|peer| format!(" at {peer}"))
            .unwrap_or_default()
    }

    /// What the sending side reports once the connection is over: its failure if that ends
    /// connections, else (a message over the limit ended it) a lost connection for that
    /// reason, so that every call says the connection is gone, not that one message failed.
    fn gone(&self) -> Option<Error> {
        let error = self.failed.as_ref()?;
        Some(if error.is_fatal() {
            error.clone()
        } else {
            Error::with_source(
                ErrorKind::ConnectionLost,
                format!(
                    "the WebSocket connection{} is over: {error}",
                    self.peer_label()
                ),
                error.clone(),
            )
        })
    }

    /// Hands `frame` to tungstenite; one its full buffer refuses is held, to go out first once
    /// the buffer drains.
    fn send_frame(&mut self, frame: Message) -> Result<()> {
        match Pin::new(&mut self.stream).start_send(frame) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::WriteBufferFull(frame)) => {
                self.held = Some(*frame);
                Ok(())
            }
            Err(error) => Err(self.ws_error("sending", error)),
        }
    }

    /// Sends the held frame, if there is one, once tungstenite's buffer has drained:
    /// `Ready(Ok)` when nothing is held any more.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        while let Some(frame) = self.held.take() {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Pending => {
                    self.held = Some(frame);
                    self.stalled();
                    self.poll_stall(cx)?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Err(self.ws_error("sending", error)))
                }
                Poll::Ready(Ok(())) => self.flushed(),
            }
            self.send_frame(frame)?;
            if let Some(frame) = self.held.take() {
                // Refused by an empty buffer: it never fits (a stream given to `from_stream`
                // with a `max_write_buffer_size` below one message). That publish fails alone.
                return Poll::Ready(Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "sending{}: a frame of {} bytes does not fit the WebSocket's write buffer (its max_write_buffer_size)",
                        self.peer_label(),
                        frame.len()
                    ),
                )));
            }
            // Sent, and not flushed yet.
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }

    fn ws_error(&mut self, what: &str, error: tungstenite::Error) -> Error {
        let what = &format!("{what}{}", self.peer_label());
        use tungstenite::error::CapacityError;
        use tungstenite::Error as E;
        let error = match error {
            E::Capacity(CapacityError::MessageTooLong { size, max_size }) => Error::new(
                ErrorKind::TooLarge,
                format!("{what}: a message of {size} bytes is over the limit of {max_size}; the connection was closed with code 1009"),
            ),
            E::ConnectionClosed | E::AlreadyClosed => Error::connection_lost(format!("{what}: the WebSocket is closed")),
            E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
                Error::connection_lost(format!("{what}: the peer dropped the connection without closing the WebSocket"))
            }
            E::Io(io) => {
                let kind = if io.kind() == std::io::ErrorKind::TimedOut { ErrorKind::Timeout } else { ErrorKind::ConnectionLost };
                Error::with_source(kind, format!("{what}: {io}"), io)
            }
            other => Error::with_source(ErrorKind::Protocol, format!("{what}: {other}"), other),
        };
        self.fail(error)
    }

    /// Tells the peer why the connection ends (1009 for a message over the limit, 1002 for a
    /// frame that breaks the protocol, 1007 for a text message that is not UTF-8), best
    /// effort: without waiting on a peer that is likely still sending.
    fn close_with(&mut self, cx: &mut Context<'_>, code: CloseCode, reason: &'static str) {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let waker = crate::waker::also_waking(cx, self.writer.as_ref());
        let cx = &mut Context::from_waker(&waker);
        if let Poll::Ready(Ok(())) = Pin::new(&mut self.stream).poll_ready(cx) {
            if Pin::new(&mut self.stream).start_send(close).is_ok() {
                let _ = Pin::new(&mut self.stream).poll_flush(cx);
            }
        }
    }

    /// Sending waits for the peer to read, since now if it did not already; a completed flush
    /// ends the wait. The reading side checks how long, with the liveness.
    fn stalled(&mut self) {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
    }

    /// A flush completed: everything fed went out.
    fn flushed(&mut self) {
        self.drained();
        self.blocked = false;
        // A publish held for room has not gone out with what was flushed.
        self.unflushed = self.held.is_some();
    }

    /// What waited to be sent went out: the peer read.
    fn drained(&mut self) {
        if self.stalled_since.take().is_some() {
            self.drained_at = Some(Instant::now());
        }
    }

    /// Whether what waits to be sent goes out now: the peer read after all (the task that sent
    /// may have stopped polling the sink).
    fn flushes_now(&mut self, cx: &mut Context<'_>) -> bool {
        let waker = crate::waker::also_waking(cx, self.writer.as_ref());
        let mut cx = Context::from_waker(&waker);
        match Pin::new(&mut self.stream).poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => {
                self.flushed();
                true
            }
            Poll::Ready(Err(error)) => {
                // The connection failed: that is its failure, not a stall (the first failure
                // recorded is the one reported).
                self.ws_error("flushing", error);
                false
            }
            Poll::Pending => false,
        }
    }

    fn stall_error(&mut self) -> Error {
        let error = Error::new(
            ErrorKind::Timeout,
            format!(
                "the WebSocket peer{} read nothing for {:?}: sending is stalled",
                self.peer_at(),
                self.config.idle_timeout
            ),
        );
        self.fail(error)
    }

    /// The sending side's own check of a stall (the reading side checks it with the
    /// liveness, but it may not be polled: an event target paused by a full `Block`
    /// subscription reads nothing, and a publish waiting on a peer that never reads must not
    /// wait for ever). Polled only while sending waits; the timer is set for when the wait
    /// reaches the idle timeout.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Result<()> {
        let Some(due) = self
            .stalled_since
            .and_then(|since| since.checked_add(self.config.idle_timeout))
        else {
            return Ok(());
        };
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_pending() || self.flushes_now(cx) {
            return Ok(());
        }
        Err(self.stall_error())
    }

    /// Pings on schedule; declares the peer gone after the idle timeout, of silence or of
    /// sending that waits for the peer to read.
    fn poll_liveness(&mut self, cx: &mut Context<'_>) -> Result<()> {
        self.read_since_check = 0;
        if std::mem::take(&mut self.heard) {
            self.last_heard = Instant::now();
        }
        let reading = self
            .drained_at
            .is_some_and(|at| at.elapsed() < self.config.idle_timeout);
        if self.last_heard.elapsed() >= self.config.idle_timeout && !reading {
            let error = Error::new(
                ErrorKind::Timeout,
                format!(
                    "the WebSocket peer{} sent nothing, not even a pong, for {:?}",
                    self.peer_at(),
                    self.config.idle_timeout
                ),
            );
            return Err(self.fail(error));
        }
        if self
            .stalled_since
            .is_some_and(|since| since.elapsed() >= self.config.idle_timeout)
            && !self.flushes_now(cx)
        {
            // The sending side waits on the socket: it learns of it too (`fail` wakes it).
            return Err(self.stall_error());
        }
        while self.ping.as_mut().poll(cx).is_ready() {
            let next = crate::deadline_in(self.config.ping_every());
            self.ping.as_mut().reset(next);
            self.ping_owed = true;
        }
        if self.ping_owed {
            // Through the sink, which may be another task's (a split transport): whatever
            // this leaves pending wakes that task too. Busy, the sink sends it once it has
            // room (`poll_ready`), ahead of the next publish.
            let waker = crate::waker::also_waking(cx, self.writer.as_ref());
            let mut cx = Context::from_waker(&waker);
            if let Poll::Ready(Ok(())) = Pin::new(&mut self.stream).poll_ready(&mut cx) {
                self.ping_owed = false;
                if Pin::new(&mut self.stream)
                    .start_send(Message::Ping(Bytes::new()))
                    .is_ok()
                {
                    match Pin::new(&mut self.stream).poll_flush(&mut cx) {
                        Poll::Ready(Ok(())) => self.flushed(),
                        Poll::Pending => self.stalled(),
                        Poll::Ready(Err(_)) => {}
                    }
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Command<Bytes>> for WebSocketTransport<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.gone() {
            return Poll::Ready(Err(error));
        }
        crate::waker::remember(&mut this.writer, cx);
        ready!(this.poll_held(cx))?;
        loop {
            match Pin::new(&mut this.stream).poll_ready(cx) {
                Poll::Pending => {
                    this.stalled();
                    this.blocked = true;
                    this.poll_stall(cx)?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Err(this.ws_error("sending", error)))
                }
                Poll::Ready(Ok(())) => {
                    // After a wait, what waited went out (tungstenite flushed it): the peer
                    // reads. Without one, readiness only says tungstenite's buffer has room,
                    // and a sending stalled since a flush is still stalled.
                    if this.blocked {
                        this.flushed();
                    }
                    if !std::mem::take(&mut this.ping_owed) {
                        return Poll::Ready(Ok(()));
                    }
                    Pin::new(&mut this.stream)
                        .start_send(Message::Ping(Bytes::new()))
                        .map_err(|error| this.ws_error("sending a ping", error))?;
                }
            }
        }
    }

    fn start_send(self: Pin<&mut Self>, command: Command<Bytes>) -> Result<()> {
        let this = self.get_mut();
        if let Some(error) = this.gone() {
            return Err(error);
        }
        // `poll_ready` is pending while a frame is held: one fed anyway would overtake it.
        debug_assert!(
            this.held.is_none(),
            "start_send while a frame waits for room"
        );
        match command {
            Command::Publish { topic, message } => {
                // The peer would close the connection over it (1009), and a reconnect layer
                // would send it again on the next one: refused here, for this publish alone.
                if message.len() > this.config.max_message_size {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "publishing to {topic}: a message of {} bytes is over the limit of {} (WebSocketConfig::max_message_size)",
                            message.len(),
                            this.config.max_message_size
                        ),
                    ));
                }
                // A frame tungstenite's write buffer could never hold (a stream given to
                // `from_stream` with a small `max_write_buffer_size`): refused here, alone.
                let limit = this.stream.get_config().max_write_buffer_size;
                if message.len().saturating_add(MAX_FRAME_HEADER) > limit {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "publishing to {topic}: a message of {} bytes does not fit the WebSocket's write buffer (its max_write_buffer_size, {limit} bytes)",
                            message.len()
                        ),
                    ));
                }
                // The contract is text frames; a codec that writes something else goes binary.
                let binary = message.clone();
                let frame = match Utf8Bytes::try_from(message) {
                    Ok(text) => Message::Text(text),
                    Err(_) => Message::Binary(binary),
                };
                this.send_frame(frame)?;
                this.unflushed = true;
                Ok(())
            }
            Command::Subscribe(topic) => {
                this.signals.push_back(Up::Subscribed(topic));
                if let Some(reader) = this.reader.take() {
                    reader.wake();
                }
                Ok(())
            }
            Command::Unsubscribe(topic) => {
                this.signals.push_back(Up::Unsubscribed(topic));
                if let Some(reader) = this.reader.take() {
                    reader.wake();
                }
                Ok(())
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.gone() {
            return Poll::Ready(Err(error));
        }
        crate::waker::remember(&mut this.writer, cx);
        ready!(this.poll_held(cx))?;
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => {
                this.stalled();
                this.poll_stall(cx)?;
                Poll::Pending
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(this.ws_error("flushing", error))),
            Poll::Ready(Ok(())) => {
                this.flushed();
                Poll::Ready(Ok(()))
            }
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        if this.failed.is_none() {
            crate::waker::remember(&mut this.writer, cx);
            // The whole close is timed from here: a peer that does not even read our close
            // frame must not keep it waiting for ever.
            let deadline = this
                .closing
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_WAIT)));
            let late = deadline.as_mut().poll(cx).is_ready();
            if !this.close_sent {
                // A publish held for room goes before the close frame; one still held when
                // time is up is lost, and the close says so.
                match this.poll_held(cx) {
                    Poll::Pending if late => {
                        this.held = None;
                        this.closed();
                        return Poll::Ready(Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "closing: the WebSocket peer{} did not read within {CLOSE_WAIT:?}: a publish waiting for room was not sent",
                                this.peer_at()
                            ),
                        )));
                    }
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) => {}
                }
            }
            if !this.close_fed {
                // Our close frame says "normal closure" (1000), which a browser reports as
                // such (one without a code reads 1005 there). Queued once what was sent
                // before is flushed, so that it finds room.
                match Pin::new(&mut this.stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        this.flushed();
                        let normal = Message::Close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: Utf8Bytes::default(),
                        }));
                        // A failure shows again in the close below, which reports it.
                        let _ = Pin::new(&mut this.stream).start_send(normal);
                        this.close_fed = true;
                    }
                    // Reported by the close below (or its time is up there).
                    Poll::Ready(Err(_)) => this.close_fed = true,
                    Poll::Pending if late => this.close_fed = true,
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !this.close_sent {
                match Pin::new(&mut this.stream).poll_close(cx) {
                    Poll::Ready(Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    )) => this.closed(),
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Err(this.ws_error("closing", error)))
                    }
                    Poll::Ready(Ok(())) => {
                        // Flushed, our close frame with it.
                        this.flushed();
                        this.close_sent = true;
                    }
                    Poll::Pending if late => {
                        let error = Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "closing: the WebSocket peer{} did not read our close frame within {CLOSE_WAIT:?}",
                                this.peer_at()
                            ),
                        );
                        this.closed();
                        return Poll::Ready(Err(error));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        if let Some(error) = &this.failed {
            // Closed after the connection ended: fine if nothing was lost to it, else the
            // failure (the publishes fed since the last flush never went).
            return Poll::Ready(if this.unflushed {
                Err(error.clone())
            } else {
                Ok(())
            });
        }
        // Our close frame is sent. The peer answers with its own, after what it sent before:
        // read that (and drop it: nobody listens any more) until the answer comes or the
        // connection ends. The socket is then dropped with nothing unread, which ends it with
        // a FIN: dropped with unread bytes, it would be reset, and what was still on its way
        // to the peer (the end of the last publishes, the close frame) thrown away. A peer
        // that does not answer in time, or keeps sending, is closed all the same.
        let waited = this.closing.as_mut().expect("set above");
        if waited.as_mut().poll(cx).is_ready() {
            this.closed();
            return Poll::Ready(Ok(()));
        }
        // Read as the reading side reads, through its own `poll_next` (the peer's close frame
        // ends the stream there as usual). The socket has one read wake-up: what this reads
        // concerns the reading side too, if another task, which must not lose it to this one.
        // The reading side's own waker is put back afterwards (`poll_next` keeps the one it is
        // given, which would otherwise wrap it again on each poll of the close).
        let reader = this.reader.clone();
        let waker = crate::waker::also_waking(cx, reader.as_ref());
        let mut read_cx = Context::from_waker(&waker);
        let mut read = || {
            for _ in 0..CLOSE_READ_BUDGET {
                match Pin::new(&mut *this).poll_next(&mut read_cx) {
                    // The peer's close frame ends the stream; so does a failure.
                    Poll::Ready(Some(Err(_)) | None) => {
                        this.closed();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Pending => return Poll::Pending,
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        };
        let result = read();
        this.reader = reader;
        result
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketTransport<S> {
    /// After the peer's close frame: drives tungstenite until its answer has gone out behind
    /// what was buffered before it (the peer then sees a clean close, not a connection that
    /// just ends), for at most [`CLOSE_WAIT`]; then the stream ends, cleanly.
    fn poll_close_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Up<Bytes>>>> {
        self.closing
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_WAIT)));
        loop {
            match self.poll_frame(cx) {
                // After the close frame, nothing more is delivered.
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_)) | None) => break,
                Poll::Pending => {
                    let deadline = self.closing.as_mut().expect("set above");
                    if deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        self.answering_close = false;
        Poll::Ready(None)
    }

    /// The next frame from tungstenite, which it reads from the socket: polled again only
    /// once something woke the reading side since it last found nothing. (tungstenite zeroes
    /// its whole read buffer, 128 KiB, before each read of the socket, also one that finds
    /// nothing: a task polled for other reasons, such as a driver woken to flush, would pay
    /// that each time.) tungstenite arranges a wake-up for whatever lets its reading go on
    /// (the socket readable, or writable for an answer it owes the peer); what the sending
    /// side does changes nothing it would read (a connection reset or closed under it makes
    /// the socket readable, which wakes the reading side too).
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Message, tungstenite::Error>>> {
        self.read_wake.task.register(cx.waker());
        let woken = self.read_wake.woken.swap(false, AcqRel);
        if self.read_idle && !woken {
            return Poll::Pending;
        }
        let mut read_cx = Context::from_waker(&self.read_waker);
        let frame = Pin::new(&mut self.stream).poll_next(&mut read_cx);
        self.read_idle = frame.is_pending();
        frame
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WebSocketTransport<S> {
    type Item = Result<Up<Bytes>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(signal) = this.signals.pop_front() {
            return Poll::Ready(Some(Ok(signal)));
        }
        if let Some(error) = &this.failed {
            if this.answering_close {
                return this.poll_close_reply(cx);
            }
            if this.reported {
                return Poll::Ready(None);
            }
            this.reported = true;
            return Poll::Ready(Some(Err(error.clone())));
        }
        crate::waker::remember(&mut this.reader, cx);
        loop {
            this.read_since_check += 1;
            if this.read_since_check >= LIVENESS_EVERY {
                if let Err(error) = this.poll_liveness(cx) {
                    this.reported = true;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            match this.poll_frame(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    this.heard = true;
                    let frame = match message {
                        Message::Text(text) => Bytes::from(text),
                        Message::Binary(binary) => binary,
                        // Pings are answered by tungstenite; pongs only prove liveness.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                        Message::Close(frame) => {
                            let at = this.peer_at();
                            let why = match frame {
                                Some(frame) if frame.reason.is_empty() => format!(
                                    "the peer closed the WebSocket{at} (code {})",
                                    u16::from(frame.code)
                                ),
                                // The reason is the peer's text: quoted (escaped).
                                Some(frame) => format!(
                                    "the peer closed the WebSocket{at} (code {}: {})",
                                    u16::from(frame.code),
                                    crate::layers::quote(frame.reason.as_bytes())
                                ),
                                None => format!("the peer closed the WebSocket{at}"),
                            };
                            // A clean end: the stream ends without an error (the sink's
                            // calls fail with this one), once tungstenite's answer has gone.
                            this.fail(Error::connection_lost(why));
                            this.reported = true;
                            this.answering_close = true;
                            return this.poll_close_reply(cx);
                        }
                    };
                    return Poll::Ready(Some(Ok(Up::Message {
                        channel: None,
                        message: frame,
                    })));
                }
                Poll::Ready(Some(Err(error))) => {
                    let oversized = matches!(
                        error,
                        tungstenite::Error::Capacity(
                            tungstenite::error::CapacityError::MessageTooLong { .. }
                        )
                    );
                    // The peer is told why, when it broke the protocol (a browser then reports
                    // the code rather than 1006).
                    let told = match &error {
                        tungstenite::Error::Utf8(_) => {
                            Some((CloseCode::Invalid, "text message is not UTF-8"))
                        }
                        tungstenite::Error::Protocol(
                            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                        ) => None,
                        tungstenite::Error::Protocol(_) => {
                            Some((CloseCode::Protocol, "protocol error"))
                        }
                        _ => None,
                    };
                    let error = this.ws_error("receiving", error);
                    if let Some((code, reason)) = told {
                        this.close_with(cx, code, reason);
                    }
                    if oversized {
                        this.close_with(cx, CloseCode::Size, "message too big");
                        // Report the refused message, then the end of the connection.
                        this.failed = Some(Error::connection_lost(format!(
                            "the WebSocket was closed with code 1009: {}",
                            error.message()
                        )));
                        return Poll::Ready(Some(Err(error)));
                    }
                    this.reported = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    if this.failed.is_none() {
                        let why = format!("the WebSocket connection{} ended", this.peer_label());
                        this.fail(Error::connection_lost(why));
                    }
                    this.reported = true;
                    return Poll::Ready(match &this.failed {
                        // A close handshake started by the peer ends the stream cleanly.
                        Some(error) if error.message().starts_with("the peer closed") => None,
                        Some(error) => Some(Err(error.clone())),
                        None => None,
                    });
                }
                Poll::Pending => break,
            }
        }
        if let Err(error) = this.poll_liveness(cx) {
            this.reported = true;
            return Poll::Ready(Some(Err(error)));
        }
        Poll::Pending
    }
}

/// An event target over `transport`, with the parse-error (skip) and JSON codec layers: the
/// usual way to use a WebSocket.
///
/// # Panics
///
/// Outside a Tokio runtime.
pub fn event_target<P, S>(transport: WebSocketTransport<S>) -> EventTarget<P>
where
    P: Serialize + DeserializeOwned + Send + Sync + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .service(transport),
    )
}
