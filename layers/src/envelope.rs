use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;

use crate::Topic;

/// The wire contract: `{ "type": ..., "id": ..., "payload": ... }`.
///
/// Its topic is `"{type}:{id}"`. Serialized, it is exactly the three fields in that order, so a
/// JavaScript peer of `@alkdev/pubsub` reads and writes the same bytes.
///
/// Deserializing is strict: the input must be an object whose `type` and `id` are strings;
/// `payload` is any value (a missing payload is `null`, read as `P`); other fields are ignored;
/// a repeated field is an error. A binary format (one that is not
/// [human-readable](serde::Deserializer::is_human_readable), such as MessagePack) may also
/// write the fields in order, as it writes a struct.
///
/// ```
/// use alkdev_pubsub_layers::Envelope;
/// use serde_json::json;
///
/// let envelope = Envelope::new("session.status", "proj_123", json!({ "state": "running" }));
/// assert_eq!(envelope.topic(), "session.status:proj_123");
/// assert_eq!(
///     serde_json::to_string(&envelope).unwrap(),
///     r#"{"type":"session.status","id":"proj_123","payload":{"state":"running"}}"#
/// );
///
/// let read: Envelope = serde_json::from_str(r#"{"id":"p1","type":"t"}"#).unwrap();
/// assert!(read.payload.is_null());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Envelope<P = serde_json::Value> {
    /// The event type, e.g. `session.status`.
    pub r#type: String,
    /// The id of the thing the event is about, e.g. `proj_123`.
    pub id: String,
    /// The event's data.
    pub payload: P,
}

impl<P> Envelope<P> {
    /// Creates an envelope.
    pub fn new(event_type: impl Into<String>, id: impl Into<String>, payload: P) -> Self {
        Envelope {
            r#type: event_type.into(),
            id: id.into(),
            payload,
        }
    }

    /// The envelope's topic, `"{type}:{id}"`.
    pub fn topic(&self) -> Topic {
        Topic::of(&self.r#type, &self.id)
    }

    /// Whether this envelope's topic is `topic`, without allocating.
    pub fn has_topic(&self, topic: &str) -> bool {
        topic.len() == self.r#type.len() + 1 + self.id.len()
            && topic.starts_with(self.r#type.as_str())
            && topic.as_bytes()[self.r#type.len()] == b':'
            && topic.ends_with(self.id.as_str())
    }

    /// Replaces the payload, keeping `type` and `id`.
    pub fn map<Q>(self, f: impl FnOnce(P) -> Q) -> Envelope<Q> {
        Envelope {
            r#type: self.r#type,
            id: self.id,
            payload: f(self.payload),
        }
    }
}

impl<'de, P: Deserialize<'de>> Deserialize<'de> for Envelope<P> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            // JSON and its kind: an object, never an array (`deserialize_struct` would take
            // one).
            deserializer.deserialize_map(EnvelopeVisitor(PhantomData))
        } else {
            // A binary format writes the derived `Serialize` its own way: the fields in order
            // (MessagePack's default, bincode, postcard), or a map keyed by name or index.
            deserializer.deserialize_struct("Envelope", FIELDS, EnvelopeVisitor(PhantomData))
        }
    }
}

/// The envelope's fields, in the order they are written.
const FIELDS: &[&str] = &["type", "id", "payload"];

enum Field {
    Type,
    Id,
    Payload,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
                Ok(match name {
                    "type" => Field::Type,
                    "id" => Field::Id,
                    "payload" => Field::Payload,
                    _ => Field::Other,
                })
            }
            fn visit_u64<E: de::Error>(self, index: u64) -> Result<Field, E> {
                Ok(match index {
                    0 => Field::Type,
                    1 => Field::Id,
                    2 => Field::Payload,
                    _ => Field::Other,
                })
            }
            fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Field, E> {
                Ok(match name {
                    b"type" => Field::Type,
                    b"id" => Field::Id,
                    b"payload" => Field::Payload,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

struct EnvelopeVisitor<P>(PhantomData<P>);

impl<'de, P: Deserialize<'de>> Visitor<'de> for EnvelopeVisitor<P> {
    type Value = Envelope<P>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an envelope object {"type": string, "id": string, "payload": any}"#)
    }

    /// The fields in order, as a binary format writes a struct: `type`, `id`, and `payload`
    /// (which may be left out, as `null`).
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let event_type: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let id: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let payload = seq.next_element()?.map_or_else(missing_payload, Ok)?;
        Ok(Envelope::new(event_type, id, payload))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut event_type: Option<String> = None;
        let mut id: Option<String> = None;
        let mut payload: Option<P> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Type => {
                    if event_type.is_some() {
                        return Err(de::Error::duplicate_field("type"));
                    }
                    event_type = Some(map.next_value()?);
                }
                Field::Id => {
                    if id.is_some() {
                        return Err(de::Error::duplicate_field("id"));
                    }
                    id = Some(map.next_value()?);
                }
                Field::Payload => {
                    if payload.is_some() {
                        return Err(de::Error::duplicate_field("payload"));
                    }
                    payload = Some(map.next_value()?);
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let event_type = event_type.ok_or_else(|| de::Error::missing_field("type"))?;
        let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
        let payload = payload.map_or_else(missing_payload, Ok)?;
        Ok(Envelope::new(event_type, id, payload))
    }
}

/// A missing payload reads as `null`, whatever `P` makes of that: through serde_json's own
/// `null`, which also gives a `Box<serde_json::value::RawValue>` (feature `raw_value`) the
/// text `null`, where a unit value has no text to give it.
fn missing_payload<'de, P: Deserialize<'de>, E: de::Error>() -> Result<P, E> {
    P::deserialize(serde_json::Value::Null).map_err(E::custom)
}
