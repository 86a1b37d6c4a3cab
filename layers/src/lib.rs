//! The transport vocabulary of [alkdev-pubsub] and the tower layers that build a transport
//! stack.
//!
//! A transport is a [`Sink`](futures::Sink) of [`Command`]s (publish, subscribe, unsubscribe)
//! and a [`Stream`](futures::Stream) of [`Up`] items (messages and signals). Anything that is
//! both is a [`Transport`]: the trait has a blanket impl, so a user's own type needs no
//! ceremony.
//!
//! [alkdev-pubsub]: https://docs.rs/alkdev-pubsub
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod command;
mod envelope;
mod error;
mod topic;
mod transport;

pub use command::{Command, Up};
pub use envelope::Envelope;
pub use error::{Error, ErrorKind};
pub use topic::Topic;
pub use transport::Transport;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
