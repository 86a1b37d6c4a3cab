use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::Topic;

/// How many bytes of a frame an error message quotes.
const QUOTED_BYTES: usize = 64;

/// The error of every transport, layer and event target of alkdev-pubsub.
///
/// It says what failed and with what input (the topic, the channel, the first bytes of a
/// frame). [`kind`](Error::kind) and the predicates tell a caller what to do about it:
/// [`is_unrecoverable`](Error::is_unrecoverable) errors end a connection (the reconnect layer
/// builds a new one), [`is_transient`](Error::is_transient) ones may succeed if retried, and
/// the rest concern a single message.
///
/// Cloning is cheap (one `Arc`), so one failure can be handed to every caller waiting on it.
///
/// ```
/// use alkdev_pubsub_layers::{Error, ErrorKind};
///
/// let error = Error::decode(Some(&"chat:1".into()), b"{not json", "expected ident at line 1 column 2");
/// assert_eq!(error.kind(), ErrorKind::Decode);
/// assert!(error.is_decode() && !error.is_unrecoverable());
/// assert_eq!(error.channel().map(|c| c.as_str()), Some("chat:1"));
/// assert!(error.to_string().contains("{not json"));
/// ```
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    channel: Option<Topic>,
    frame: Option<Bytes>,
    /// What caused it: shared, so that a copy made to record a channel keeps it.
    cause: Option<Arc<dyn StdError + Send + Sync>>,
}

impl fmt::Display for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(channel) = &self.channel {
            d.field("channel", channel);
        }
        if let Some(frame) = &self.frame {
            d.field("frame_len", &frame.len());
        }
        if let Some(cause) = &self.cause {
            d.field("source", cause);
        }
        d.finish()
    }
}

/// What kind of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A connection could not be established.
    Connect,
    /// An established connection failed or was closed by the peer.
    ConnectionLost,
    /// The peer did not answer in time (a liveness check or a response timeout).
    Timeout,
    /// The peer broke the protocol.
    Protocol,
    /// An inbound frame could not be decoded; only that frame is lost.
    Decode,
    /// An outbound message could not be encoded; only that message is lost.
    Encode,
    /// An inbound message came on a channel outside this application's prefix.
    ForeignChannel,
    /// A frame, topic or message is over a configured limit.
    TooLarge,
    /// The peer refused a command for now (for example Redis `LOADING`, `TRYAGAIN`, `BUSY`);
    /// retrying may succeed.
    Busy,
    /// Refused for good: the peer refused a command (for example a Redis `NOPERM` or `ERR`
    /// reply) or a connection's credentials or handshake, or this side refused a peer's
    /// handshake (a WebSocket server's `check_request`).
    Rejected,
    /// The settings cannot work: an invalid URL or address, or one the transport does not
    /// support. Retrying with the same settings cannot succeed.
    Config,
    /// A publish found no room and no connection: the transport is down and its publish
    /// buffer is full, an event target's publish queue is full, or retries ran out. Also a
    /// WebSocket listener out of resources to accept a connection, or a handshake it dropped
    /// for a newer one: out of room, for now.
    Unavailable,
    /// The event target or transport is closed.
    Closed,
    /// Anything else; the message says what.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connect failed",
            ErrorKind::ConnectionLost => "connection lost",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Decode => "decode failed",
            ErrorKind::Encode => "encode failed",
            ErrorKind::ForeignChannel => "message outside the prefix",
            ErrorKind::TooLarge => "over the size limit",
            ErrorKind::Busy => "peer busy",
            ErrorKind::Rejected => "refused",
            ErrorKind::Config => "invalid settings",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Closed => "closed",
            ErrorKind::Other => "error",
        })
    }
}

impl Error {
    /// Creates an error of `kind` with a message that says what failed.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                channel: None,
                frame: None,
                cause: None,
            }),
        }
    }

    /// Creates an error of `kind` caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        let mut error = Error::new(kind, message);
        Arc::get_mut(&mut error.inner)
            .expect("a new error is not shared")
            .cause = Some(Arc::from(source.into()));
        error
    }

    /// An error of `kind` saying that `context` failed because of `cause`, which is its
    /// [`source()`](StdError::source). The message is `"{context}: {cause}"`, the cause's kind
    /// left out when it is `kind` (no `connect failed: … : connect failed: …`).
    ///
    /// ```
    /// use alkdev_pubsub_layers::{Error, ErrorKind};
    ///
    /// let cause = Error::new(ErrorKind::Connect, "no answer within 5s");
    /// let error = Error::wrap(ErrorKind::Connect, "from 127.0.0.1:9", cause.clone());
    /// assert_eq!(error.to_string(), "connect failed: from 127.0.0.1:9: no answer within 5s");
    /// let error = Error::wrap(ErrorKind::Closed, "publishing", cause);
    /// assert_eq!(
    ///     error.to_string(),
    ///     "closed: publishing: connect failed: no answer within 5s"
    /// );
    /// ```
    pub fn wrap(kind: ErrorKind, context: impl fmt::Display, cause: Error) -> Self {
        let message = if cause.kind() == kind {
            format!("{context}: {}", cause.message())
        } else {
            format!("{context}: {cause}")
        };
        Error::with_source(kind, message, cause)
    }

    /// An inbound `frame` (from `channel`, where the wire has one) that could not be decoded.
    ///
    /// The message quotes the frame's first bytes; [`frame`](Error::frame) gives all of it.
    pub fn decode(channel: Option<&Topic>, frame: &[u8], cause: impl fmt::Display) -> Self {
        Self::decode_frame(channel, Bytes::copy_from_slice(frame), cause)
    }

    /// Like [`Error::decode`], keeping `frame` without copying it.
    pub fn decode_frame(channel: Option<&Topic>, frame: Bytes, cause: impl fmt::Display) -> Self {
        let message = match channel {
            Some(channel) => format!(
                "frame on channel {} ({} bytes, starts {}): {cause}",
                quote(channel.as_bytes()),
                frame.len(),
                quote(&frame)
            ),
            None => format!(
                "frame ({} bytes, starts {}): {cause}",
                frame.len(),
                quote(&frame)
            ),
        };
        Error {
            inner: Arc::new(Inner {
                kind: ErrorKind::Decode,
                message,
                channel: channel.cloned(),
                frame: Some(frame),
                cause: None,
            }),
        }
    }

    /// The transport or target is closed; `what` says which call found it so.
    pub fn closed(what: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, what)
    }

    /// The connection failed or ended.
    pub fn connection_lost(what: impl Into<String>) -> Self {
        Error::new(ErrorKind::ConnectionLost, what)
    }

    /// Returns this error with `channel` recorded (and named in the message if it was not).
    #[must_use]
    pub fn on_channel(self, channel: &Topic) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => Inner {
                kind: shared.kind,
                message: shared.message.clone(),
                channel: shared.channel.clone(),
                frame: shared.frame.clone(),
                cause: shared.cause.clone(),
            },
        };
        if inner.channel.is_none() {
            inner.message = format!("on channel {:?}: {}", channel.as_str(), inner.message);
            inner.channel = Some(channel.clone());
        }
        Error {
            inner: Arc::new(inner),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The channel the failing frame came on, where known.
    pub fn channel(&self) -> Option<&Topic> {
        self.inner.channel.as_ref()
    }

    /// The whole frame that failed to decode, for quarantine or inspection.
    pub fn frame(&self) -> Option<&Bytes> {
        self.inner.frame.as_ref()
    }

    /// Whether the *connection* is gone and must be rebuilt: [`Connect`](ErrorKind::Connect),
    /// [`ConnectionLost`](ErrorKind::ConnectionLost), [`Timeout`](ErrorKind::Timeout) and
    /// [`Protocol`](ErrorKind::Protocol). The reconnect layer recovers from these by
    /// connecting anew; they say nothing about whether a new connection can succeed. For an
    /// error that no retry can mend, see [`is_permanent`](Self::is_permanent).
    pub fn is_unrecoverable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Connect
                | ErrorKind::ConnectionLost
                | ErrorKind::Timeout
                | ErrorKind::Protocol
        )
    }

    /// Whether retrying the same command may succeed ([`Busy`](ErrorKind::Busy)).
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }

    /// Whether an inbound frame failed to decode.
    pub fn is_decode(&self) -> bool {
        self.kind() == ErrorKind::Decode
    }

    /// Whether the target or transport is closed.
    pub fn is_closed(&self) -> bool {
        self.kind() == ErrorKind::Closed
    }

    /// Whether trying the same thing again cannot succeed: the settings are invalid
    /// ([`Config`](ErrorKind::Config)), or the peer refused it for good
    /// ([`Rejected`](ErrorKind::Rejected): a command, or a connection's credentials). The
    /// reconnect layer gives up at once when its first connection fails this way.
    pub fn is_permanent(&self) -> bool {
        matches!(self.kind(), ErrorKind::Config | ErrorKind::Rejected)
    }

    /// Whether a publish was refused for want of room or of a connection
    /// ([`Unavailable`](ErrorKind::Unavailable)): the transport is down and its publish buffer is
    /// full, the event target's publish queue is full, or retries ran out (or, from a WebSocket
    /// listener, a connection it had no room for).
    pub fn is_unavailable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// Whether the error ends the stream it came from: unrecoverable or closed. Any other error
    /// concerns one message or command.
    pub fn is_fatal(&self) -> bool {
        self.is_unrecoverable() || self.is_closed()
    }
}

/// Quotes bytes a peer sent, for an error message or a log line: their first 64 bytes as
/// text (invalid UTF-8 replaced), escaped as a Rust string literal, with `…` when cut. A peer
/// chooses what it sends (a channel name megabytes long, control characters): a message that
/// quotes it whole would be as large, and could forge log lines.
///
/// ```
/// let long = "x".repeat(1_000);
/// let quoted = alkdev_pubsub_layers::quote(long.as_bytes());
/// assert_eq!(quoted, format!("{:?}…", "x".repeat(64)));
/// assert_eq!(alkdev_pubsub_layers::quote(b"a\nb"), r#""a\nb""#);
/// ```
pub fn quote(frame: &[u8]) -> String {
    let head = &frame[..frame.len().min(QUOTED_BYTES)];
    let text = String::from_utf8_lossy(head);
    let mut quoted = format!("{text:?}");
    if frame.len() > QUOTED_BYTES {
        quoted.push('…');
    }
    quoted
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // The cause itself, not its `Arc`, so that callers can downcast it.
        let cause: &(dyn StdError + 'static) = self.inner.cause.as_deref()?;
        Some(cause)
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match error.kind() {
            Io::TimedOut => ErrorKind::Timeout,
            Io::ConnectionRefused | Io::AddrNotAvailable => ErrorKind::Connect,
            _ => ErrorKind::ConnectionLost,
        };
        Error::with_source(kind, format!("i/o: {error}"), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_the_channel_keeps_the_source_whether_the_error_is_shared_or_not() {
        let io = std::io::Error::other("the socket's own words");
        let error = Error::with_source(ErrorKind::ConnectionLost, "reading", io);
        let shared = error.clone();
        let topic = Topic::new("t:1");
        for error in [error.on_channel(&topic), shared.on_channel(&topic)] {
            assert_eq!(error.channel(), Some(&topic));
            assert!(error.to_string().contains("t:1"), "{error}");
            let source = StdError::source(&error).expect("the source is kept");
            assert_eq!(source.to_string(), "the socket's own words");
            let io = source
                .downcast_ref::<std::io::Error>()
                .expect("the source is the i/o error itself");
            assert_eq!(io.kind(), std::io::ErrorKind::Other);
        }
    }
}
