//! The subscribe connection that [`RedisConfig::connect`](super::RedisConfig::connect) opens:
//! a socket that speaks RESP2 in subscribe mode, read and written from the transport's own
//! polls (no task of its own, so a message is parsed by the task that routes it).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use redis::{ConnectionAddr, ConnectionInfo, RedisConnectionInfo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::resp::{self, Frame};
use crate::layers::{Error, ErrorKind, Result};

/// Read space kept free before each read of the socket.
const READ_SPACE: usize = 16 * 1024;

/// A read buffer grown past this (for a large message) is replaced once that message is
/// parsed, so that the small messages after it, which are slices of the buffer, do not keep
/// the large allocation alive.
const READ_BUFFER_MAX: usize = 4 * READ_SPACE;

/// A socket the connection runs over: TCP or a Unix socket.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send {}

impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

/// A Redis connection in subscribe mode: see the [module](self).
pub(crate) struct SubscribeConnection {
    io: Pin<Box<dyn Io>>,
    /// Parses what was read, skipping payloads over the limit.
    reader: resp::Reader,
    /// What was read and not parsed yet. A message's payload is split off it (see
    /// [`resp`]), so this is a new allocation once the readers of the old one are done.
    read: BytesMut,
    /// Commands not written yet.
    write: BytesMut,
    /// Where it is connected, for messages (the URL without its password).
    peer: String,
    /// Bytes read so far: progress, for the reply timeouts.
    bytes_read: u64,
    /// The read buffer grew past [`READ_BUFFER_MAX`] for a large message: replace it once
    /// little is left in it.
    grown: bool,
}

impl SubscribeConnection {
    /// Connects to `info`'s address and authenticates with its credentials. `peer` names the
    /// server in errors; a message's payload over `limit` bytes is skipped.
    pub(crate) async fn connect(info: &ConnectionInfo, peer: String, limit: usize) -> Result<Self> {
        let failed = |error: std::io::Error| {
            Error::with_source(
                ErrorKind::Connect,
                format!("opening the subscribe connection to {peer}: {error}"),
                error,
            )
        };
        let io: Pin<Box<dyn Io>> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                Box::pin(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => {
                Box::pin(tokio::net::UnixStream::connect(path).await.map_err(failed)?)
            }
            other => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("opening the subscribe connection to {peer}: {other} is not supported (TCP and Unix sockets are)"),
                ))
            }
        };
        let mut connection = Self::over(io, peer, limit);
        connection.authenticate(info.redis_settings()).await?;
        Ok(connection)
    }

    pub(crate) fn over(io: Pin<Box<dyn Io>>, peer: String, limit: usize) -> Self {
        SubscribeConnection {
            io,
            reader: resp::Reader::new(limit),
            read: BytesMut::new(),
            write: BytesMut::new(),
            peer,
            bytes_read: 0,
            grown: false,
        }
    }

    /// Authenticates with `settings`' credentials, if it has a password.
    async fn authenticate(&mut self, settings: &RedisConnectionInfo) -> Result<()> {
        if let Some(password) = settings.password() {
            let password = password.as_bytes();
            let mut refused = match settings.username() {
                Some(user) => self.auth(&[b"AUTH", user.as_bytes(), password]).await?,
                None => self.auth(&[b"AUTH", password]).await?,
            };
            if settings.username().is_some()
                && refused
                    .as_deref()
                    .is_some_and(|reply| reply.contains("wrong number of arguments"))
            {
                // Redis before 6 has no users: `AUTH password` alone, as redis-rs does.
                refused = self.auth(&[b"AUTH", password]).await?;
            }
            if let Some(reply) = refused {
                // The password itself refused is for good; anything else (a server that is
                // full, or loading) may pass.
                let kind = if [
                    "WRONGPASS",
                    "ERR invalid password",
                    "ERR AUTH",
                    "ERR Client sent AUTH",
                ]
                .iter()
                .any(|refusal| reply.starts_with(refusal))
                {
                    ErrorKind::Rejected
                } else {
                    ErrorKind::Connect
                };
                return Err(Error::new(
                    kind,
                    format!(
                        "authenticating the subscribe connection to {}: {reply}",
                        self.peer
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sends an `AUTH` command and reads its answer: `None` if accepted, else the server's
    /// reply.
    async fn auth(&mut self, command: &[&[u8]]) -> Result<Option<String>> {
        self.send(command);
        std::future::poll_fn(|cx| self.poll_write(cx)).await?;
        match std::future::poll_fn(|cx| self.poll_frame(cx)).await? {
            Frame::Simple(ok) if ok == "OK" => Ok(None),
            Frame::Error(reply) => Ok(Some(String::from_utf8_lossy(&reply).into_owned())),
            other => Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "the subscribe connection to {} answered AUTH with {}",
                    self.peer,
                    super::debug_head(&other)
                ),
            )),
        }
    }

    /// How many bytes the connection has read so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The server, for messages (its URL without a password).
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    /// Queues a command; [`poll_write`](Self::poll_write) sends it.
    pub(crate) fn send(&mut self, args: &[&[u8]]) {
        resp::command(&mut self.write, args);
    }

    /// Writes the queued commands; `Ready(Ok)` once all are written.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.write.is_empty() {
            // Nothing was queued since the last write (a socket's flush does nothing).
            return Poll::Ready(Ok(()));
        }
        while !self.write.is_empty() {
            match std::task::ready!(self.io.as_mut().poll_write(cx, &self.write)) {
                Ok(0) => return Poll::Ready(Err(self.lost("writing a command", None))),
                Ok(written) => {
                    let _ = self.write.split_to(written);
                }
                Err(error) => return Poll::Ready(Err(self.lost("writing a command", Some(error)))),
            }
        }
        std::task::ready!(self.io.as_mut().poll_flush(cx))
            .map_err(|error| self.lost("writing a command", Some(error)))?;
        Poll::Ready(Ok(()))
    }

    /// The next frame: from what was read, or once more is read.
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        loop {
            match self.reader.parse(&mut self.read) {
                Ok(Some(frame)) => {
                    if self.grown && self.read.len() < READ_SPACE {
                        // What follows a large message goes to a buffer of the usual size
                        // (copied once, and little: the large one goes with its readers).
                        self.read = BytesMut::from(&self.read[..]);
                        self.grown = false;
                    }
                    return Poll::Ready(Ok(frame));
                }
                Ok(None) => {}
                Err(error) => {
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::Protocol,
                        format!(
                            "reading the subscribe connection to {}: {}",
                            self.peer, error.0
                        ),
                    )))
                }
            }
            if self.read.capacity() - self.read.len() < READ_SPACE {
                self.read.reserve(READ_SPACE);
                self.grown |= self.read.capacity() > READ_BUFFER_MAX;
            }
            match std::task::ready!(tokio_util::io::poll_read_buf(
                self.io.as_mut(),
                cx,
                &mut self.read
            )) {
                Ok(0) => {
                    return Poll::Ready(Err(self.lost("reading", None)));
                }
                Ok(read) => self.bytes_read += read as u64,
                Err(error) => return Poll::Ready(Err(self.lost("reading", Some(error)))),
            }
        }
    }

    fn lost(&self, what: &str, error: Option<std::io::Error>) -> Error {
        match error {
            Some(error) => Error::with_source(
                ErrorKind::ConnectionLost,
                format!(
                    "the Redis subscribe connection to {} failed {what}: {error}",
                    self.peer
                ),
                error,
            ),
            None => Error::connection_lost(format!(
                "the Redis subscribe connection to {} closed",
                self.peer
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::IntoConnectionInfo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A connection over an in-memory pipe, and the server's end of it.
    fn pair() -> (SubscribeConnection, DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let connection =
            SubscribeConnection::over(Box::pin(client), "redis://fake/".into(), resp::MAX_BULK);
        (connection, server)
    }

    fn settings(url: &str) -> RedisConnectionInfo {
        url.into_connection_info().unwrap().redis_settings().clone()
    }

    async fn frame(connection: &mut SubscribeConnection) -> Frame {
        std::future::poll_fn(|cx| connection.poll_frame(cx))
            .await
            .unwrap()
    }

    /// What the server end reads, as text, once `expected` bytes came.
    async fn received(server: &mut DuplexStream, expected: &str) -> String {
        let mut bytes = vec![0; expected.len()];
        server.read_exact(&mut bytes).await.unwrap();
        String::from_utf8(bytes).unwrap()
    }

    /// The error of authenticating as `u:s3cret` to a server that answers `reply`, and the
    /// server's end, to read what was sent.
    async fn refused_with(reply: &[u8]) -> (Error, DuplexStream) {
        let (mut connection, mut server) = pair();
        server.write_all(reply).await.unwrap();
        let error = connection
            .authenticate(&settings("redis://u:s3cret@fake/"))
            .await
            .unwrap_err();
        (error, server)
    }

    #[tokio::test]
    async fn a_refused_password_is_a_rejection_with_the_servers_words_only() {
        let (error, mut server) =
            refused_with(b"-WRONGPASS invalid username-password pair\r\n").await;
        let auth = "*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$6\r\ns3cret\r\n";
        assert_eq!(received(&mut server, auth).await, auth);
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert_eq!(
            error.to_string(),
            "refused: authenticating the subscribe connection to redis://fake/: WRONGPASS invalid username-password pair"
        );
    }

    #[tokio::test]
    async fn a_full_server_refusing_auth_is_a_connect_error_that_may_pass() {
        let (error, _) = refused_with(b"-ERR max number of clients reached\r\n").await;
        assert_eq!(error.kind(), ErrorKind::Connect, "{error}");
        assert!(!error.is_permanent(), "{error}");
        assert!(
            error.to_string().contains("max number of clients"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_server_without_users_is_sent_the_password_alone() {
        let (mut connection, mut server) = pair();
        server
            .write_all(b"-ERR wrong number of arguments for 'auth' command\r\n+OK\r\n")
            .await
            .unwrap();
        connection
            .authenticate(&settings("redis://u:s3cret@fake/"))
            .await
            .unwrap();
        let both =
            "*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$6\r\ns3cret\r\n*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n";
        assert_eq!(received(&mut server, both).await, both);
    }

    #[tokio::test]
    async fn after_a_large_message_small_ones_do_not_keep_its_buffer() {
        let (mut connection, mut server) = pair();
        let large = "x".repeat(300_000);
        let mut wire = format!(
            "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n${}\r\n{large}\r\n",
            large.len()
        );
        for n in 0..50 {
            wire.push_str(&format!(
                "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\n{n:02}\r\n"
            ));
        }
        server.write_all(wire.as_bytes()).await.unwrap();
        let Frame::Message { payload: first, .. } = frame(&mut connection).await else {
            panic!("a message");
        };
        assert_eq!(first.len(), large.len());
        let span = first.as_ptr() as usize..first.as_ptr() as usize + first.len() + READ_SPACE;
        for n in 0..50 {
            let Frame::Message { payload, .. } = frame(&mut connection).await else {
                panic!("a message");
            };
            assert_eq!(payload, format!("{n:02}").as_bytes());
            assert!(
                !span.contains(&(payload.as_ptr() as usize)),
                "message {n} is a slice of the large message's buffer"
            );
        }
        assert!(connection.read.capacity() <= READ_BUFFER_MAX);
    }
}
