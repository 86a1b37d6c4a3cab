//! Arbitrary bytes into the default (JSON) codec.
//!
//! Never panics; whatever decodes (or is recovered, as a lone surrogate escape is) re-encodes
//! to exactly the contract's shape (`{"type":...,"id":...,"payload":...}`, those three keys in
//! that order), and the re-encoding decodes to the same envelope and encodes to the same bytes
//! again.
#![no_main]

use alkdev_pubsub_layers::codec::{Codec, Json};
use alkdev_pubsub_layers::{Envelope, Topic};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let channel = Topic::from("fuzz:channel");
    // As the codec layer reads it: `decode`, then `recover` what it refused.
    let decoded: Result<Envelope<Value>, _> = Json
        .decode(Some(&channel), &frame)
        .or_else(|error| Json.recover(Some(&channel), &frame, error));
    let Ok(envelope) = decoded else {
        return;
    };
    // The topic of whatever decodes is well formed.
    assert!(envelope.has_topic(&envelope.topic()));

    let encoded = Codec::<Value>::encode(&Json, &envelope).expect("a decoded envelope encodes");
    assert!(
        encoded.starts_with(br#"{"type":"#),
        "encoding does not start with the type: {:?}",
        String::from_utf8_lossy(&encoded)
    );
    let fields: Map<String, Value> =
        serde_json::from_slice(&encoded).expect("the encoding is a JSON object");
    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    assert_eq!(keys, ["type", "id", "payload"], "not the contract's shape");
    assert_eq!(fields["type"], Value::String(envelope.r#type.clone()));
    assert_eq!(fields["id"], Value::String(envelope.id.clone()));
    assert_eq!(fields["payload"], envelope.payload);

    let again: Envelope<Value> = Json
        .decode(None, &encoded)
        .expect("the re-encoding decodes");
    assert_eq!(again, envelope, "the round trip changed the envelope");
    let encoded_again = Codec::<Value>::encode(&Json, &again).expect("encodes again");
    assert_eq!(encoded_again, encoded, "encoding is not stable");
});
