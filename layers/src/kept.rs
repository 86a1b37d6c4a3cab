//! What the reconnect and retry layers keep of the publishes no flush has covered yet, to send
//! them again, and its bound.

use crate::Topic;

/// The most publishes the [reconnect](crate::reconnect) and [retry](crate::retry) layers keep
/// between two completed flushes. A flush completes once everything fed before it is
/// acknowledged (Redis pipelines are), so a publisher that never pauses, over a slow link or
/// to a busy server, would otherwise never see one complete, and the layers would keep the
/// whole stream: past this many (or [`MAX_UNFLUSHED_BYTES`]), each waits for a flush before it
/// takes the next publish.
pub const MAX_UNFLUSHED: usize = 16 * 1024;

/// The bytes (topics and messages) past which the reconnect and retry layers wait for a flush
/// before they take the next publish (see [`MAX_UNFLUSHED`]; the last one taken may pass it). Raw frames are measured by their length; other
/// message types only if the layer is told how to measure them (`weigh`).
pub const MAX_UNFLUSHED_BYTES: usize = 128 << 20;

/// Measures a message, for [`MAX_UNFLUSHED_BYTES`].
pub(crate) type Weigh<M> = fn(&M) -> usize;

/// The length of a raw frame: how the layers measure them by default.
pub(crate) fn frame_len(frame: &bytes::Bytes) -> usize {
    frame.len()
}

/// Publishes kept until a flush covers them, with their size.
pub(crate) struct Kept<M> {
    items: Vec<(Topic, M)>,
    bytes: usize,
    weigh: Option<Weigh<M>>,
}

impl<M> Kept<M> {
    pub(crate) fn new(weigh: Option<Weigh<M>>) -> Self {
        Kept {
            items: Vec::new(),
            bytes: 0,
            weigh,
        }
    }

    fn size(&self, topic: &Topic, message: &M) -> usize {
        self.size_of(Some(topic), message)
    }

    /// What an inbound message on `channel` weighs, measured as a kept publish is.
    pub(crate) fn size_of(&self, channel: Option<&Topic>, message: &M) -> usize {
        channel.map_or(0, Topic::len) + self.weigh.map_or(0, |weigh| weigh(message))
    }

    pub(crate) fn push(&mut self, topic: Topic, message: M) {
        self.bytes += self.size(&topic, &message);
        self.items.push((topic, message));
    }

    /// Forgets the last one kept (refused when it was sent: not to be sent again).
    pub(crate) fn pop(&mut self) {
        if let Some((topic, message)) = self.items.pop() {
            self.bytes -= self.size(&topic, &message);
        }
    }

    /// Forgets them all (a flush covered them).
    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }

    /// Hands them all over, in the order they were kept.
    pub(crate) fn take(&mut self) -> Vec<(Topic, M)> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the bound is reached: the next publish waits for a flush.
    pub(crate) fn full(&self) -> bool {
        self.items.len() >= MAX_UNFLUSHED || self.bytes >= MAX_UNFLUSHED_BYTES
    }
}
