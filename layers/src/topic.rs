use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::{Error, ErrorKind};

/// The longest topic accepted, in bytes: publishing to, subscribing to or receiving an
/// envelope on a longer one fails with an error of kind [`TooLarge`](ErrorKind::TooLarge) (a
/// decode error for an inbound envelope).
pub const MAX_TOPIC_LEN: usize = 4096;

/// Checks a topic's length (given as `len` bytes, for `what`) against [`MAX_TOPIC_LEN`].
pub fn check_topic_len(len: usize, what: impl FnOnce() -> String) -> Result<(), Error> {
    if len > MAX_TOPIC_LEN {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "{}: a topic of {len} bytes is over the limit of {MAX_TOPIC_LEN}",
                what()
            ),
        ));
    }
    Ok(())
}

/// The name of a stream of events: `"{type}:{id}"` for envelopes, a channel name on the wire.
///
/// A `Topic` is an `Arc<str>` inside, so cloning one is a reference-count increment: the
/// listener map, the commands sent down a transport and every delivered message share one
/// allocation.
///
/// ```
/// use alkdev_pubsub_layers::Topic;
///
/// let topic = Topic::from("session.status:proj_123");
/// assert_eq!(topic.as_str(), "session.status:proj_123");
/// assert_eq!(topic, Topic::of("session.status", "proj_123"));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Creates a topic from any string.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Topic(name.into())
    }

    /// The topic of an envelope with this `type` and `id`: `"{type}:{id}"`.
    pub fn of(event_type: &str, id: &str) -> Self {
        let mut name = String::with_capacity(event_type.len() + 1 + id.len());
        name.push_str(event_type);
        name.push(':');
        name.push_str(id);
        Topic(name.into())
    }

    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the topic is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<[u8]> for Topic {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Topic {
    fn from(name: &str) -> Self {
        Topic(name.into())
    }
}

impl From<String> for Topic {
    fn from(name: String) -> Self {
        Topic(name.into())
    }
}

impl From<&String> for Topic {
    fn from(name: &String) -> Self {
        Topic(name.as_str().into())
    }
}

impl From<Arc<str>> for Topic {
    fn from(name: Arc<str>) -> Self {
        Topic(name)
    }
}

impl From<&Topic> for Topic {
    fn from(topic: &Topic) -> Self {
        topic.clone()
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
