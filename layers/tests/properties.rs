//! Properties of the prefix and codec layers under generated input, beside the fuzz targets
//! in `fuzz/`: prefix round trips, codec round trips for arbitrary payloads, and the nesting
//! limit of the JSON decoder.

use alkdev_pubsub_layers::codec::{Codec, Json, WithCodec};
use alkdev_pubsub_layers::prefix::{add_prefix, strip_prefix};
use alkdev_pubsub_layers::{Envelope, ErrorKind, Topic, Up};
use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

/// serde_json's recursion limit: the envelope object and its payload's arrays and objects
/// together may nest this many levels deep, no deeper.
const MAX_NESTING: usize = 127;

// ---------------------------------------------------------------- strategies

/// Finite floats of every class (infinities and NaN have no JSON form).
fn finite_f64() -> impl Strategy<Value = f64> {
    use proptest::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    (POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO).prop_filter("finite", |f| f.is_finite())
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite_f64().prop_map(|f| Value::Number(Number::from_f64(f).expect("finite"))),
        // Any unicode scalar values, control characters and NUL included.
        any::<String>().prop_map(Value::String),
    ]
}

/// Payloads of every shape, a few levels deep.
fn payload() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// `value` inside `depth` arrays and objects, alternating by `shape`'s bits.
fn nest(value: Value, depth: usize, shape: u128) -> Value {
    (0..depth).fold(value, |inner, level| {
        if shape >> (level % 128) & 1 == 0 {
            Value::Array(vec![inner])
        } else {
            let mut fields = Map::new();
            fields.insert(format!("k{level}"), inner);
            Value::Object(fields)
        }
    })
}

/// Payloads nesting up to `max_depth` containers deep.
fn deep_payload(max_depth: usize) -> impl Strategy<Value = (Value, usize)> {
    (leaf(), 0..=max_depth, any::<u128>())
        .prop_map(|(leaf, depth, shape)| (nest(leaf, depth, shape), depth))
}

fn envelope_with(payload: impl Strategy<Value = Value>) -> impl Strategy<Value = Envelope> {
    (any::<String>(), any::<String>(), payload)
        .prop_map(|(event_type, id, payload)| Envelope::new(event_type, id, payload))
}

fn encode(envelope: &Envelope) -> Bytes {
    Codec::<Value>::encode(&Json, envelope).expect("a JSON value always encodes")
}

/// As the codec layer reads a frame: `decode`, then `recover` what it refused.
fn decode(frame: &[u8]) -> Result<Envelope, serde_json::Error> {
    let frame = Bytes::copy_from_slice(frame);
    Json.decode(None, &frame)
        .or_else(|error| Json.recover(None, &frame, error))
}

/// The encoding is exactly `{"type":...,"id":...,"payload":...}` with these values.
fn assert_contract_shape(frame: &[u8], envelope: &Envelope) -> Result<(), TestCaseError> {
    prop_assert!(
        frame.starts_with(br#"{"type":"#),
        "the encoding does not start with the type"
    );
    let fields: Map<String, Value> = serde_json::from_slice(frame).expect("an object");
    let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    prop_assert_eq!(keys, ["type", "id", "payload"]);
    prop_assert_eq!(&fields["type"], &Value::String(envelope.r#type.clone()));
    prop_assert_eq!(&fields["id"], &Value::String(envelope.id.clone()));
    prop_assert_eq!(&fields["payload"], &envelope.payload);
    Ok(())
}

// ---------------------------------------------------------------- prefix

proptest! {
    #[test]
    fn prefix_add_then_strip_gives_the_topic_back(prefix in any::<String>(), topic in any::<String>()) {
        let topic = Topic::from(topic);
        let channel = add_prefix(&prefix, &topic);
        prop_assert_eq!(channel.len(), prefix.len() + topic.len());
        prop_assert!(channel.starts_with(prefix.as_str()));
        prop_assert_eq!(strip_prefix(&prefix, &channel), Some(topic));
    }

    #[test]
    fn prefix_strip_then_add_gives_the_channel_back(prefix in any::<String>(), channel in any::<String>()) {
        let channel = Topic::from(channel);
        match strip_prefix(&prefix, &channel) {
            Some(topic) => prop_assert_eq!(add_prefix(&prefix, &topic), channel),
            None => prop_assert!(!channel.starts_with(prefix.as_str())),
        }
    }

    #[test]
    fn prefix_strip_refuses_channels_of_other_prefixes(
        prefix in "[a-z]{1,8}:",
        other in "[A-Z]{1,8}:",
        topic in any::<String>(),
    ) {
        let channel = add_prefix(&other, &Topic::from(topic));
        prop_assert_eq!(strip_prefix(&prefix, &channel), None);
    }
}

// ---------------------------------------------------------------- codec

proptest! {
    #[test]
    fn codec_round_trips_arbitrary_payloads(envelope in envelope_with(payload())) {
        let frame = encode(&envelope);
        assert_contract_shape(&frame, &envelope)?;
        let decoded = decode(&frame).expect("an encoded envelope decodes");
        prop_assert_eq!(&decoded, &envelope);
        prop_assert_eq!(encode(&decoded), frame, "encoding is not stable");
    }

    #[test]
    fn codec_round_trips_payloads_nested_up_to_the_limit(
        envelope_and_depth in (any::<String>(), deep_payload(MAX_NESTING - 1)),
    ) {
        let (id, (payload, depth)) = envelope_and_depth;
        let envelope = Envelope::new("deep", id, payload);
        let frame = encode(&envelope);
        assert_contract_shape(&frame, &envelope)?;
        match decode(&frame) {
            Ok(decoded) => prop_assert_eq!(decoded, envelope),
            Err(error) => prop_assert!(false, "depth {} refused: {}", depth, error),
        }
    }

    #[test]
    fn codec_round_trips_finite_floats_exactly(f in finite_f64()) {
        let envelope = Envelope::new("float", "f", Value::from(f));
        let decoded = decode(&encode(&envelope)).expect("decodes");
        let back = decoded.payload.as_f64().expect("a number");
        // Bit for bit, but -0.0 and 0.0 may meet as equals.
        prop_assert!(back == f && (back.to_bits() == f.to_bits() || f == 0.0), "{} came back as {}", f, back);
    }

    /// A binary format writes the derived `Serialize` its own way: MessagePack writes the
    /// fields in order (an array) by default, or a map keyed by name; both read back.
    #[test]
    fn envelope_round_trips_through_messagepack(envelope in envelope_with(payload())) {
        let in_order = rmp_serde::to_vec(&envelope).expect("encodes");
        prop_assert_eq!(rmp_serde::from_slice::<Envelope>(&in_order).expect("decodes"), envelope.clone());
        let named = rmp_serde::to_vec_named(&envelope).expect("encodes");
        prop_assert_eq!(rmp_serde::from_slice::<Envelope>(&named).expect("decodes"), envelope);
    }

    #[test]
    fn codec_decode_never_panics_on_arbitrary_bytes(frame in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&frame);
    }
}

// ---------------------------------------------------------------- nesting limit

/// `depth` nested arrays around `null`, as JSON text.
fn nested_arrays(depth: usize) -> String {
    format!("{}null{}", "[".repeat(depth), "]".repeat(depth))
}

fn envelope_text(payload: &str) -> String {
    format!(r#"{{"type":"deep","id":"x","payload":{payload}}}"#)
}

#[test]
fn nesting_is_accepted_up_to_the_limit_and_refused_past_it() {
    let deepest = envelope_text(&nested_arrays(MAX_NESTING - 1));
    let envelope = decode(deepest.as_bytes()).expect("the deepest accepted payload decodes");
    assert_eq!(encode(&envelope), deepest.as_bytes());

    let error = decode(envelope_text(&nested_arrays(MAX_NESTING)).as_bytes())
        .expect_err("one level past the limit");
    assert!(
        error.to_string().contains("recursion limit exceeded"),
        "{error}"
    );
}

#[test]
fn nesting_200_deep_is_refused_with_a_decode_error() {
    let frame = envelope_text(&nested_arrays(200));
    let error = decode(frame.as_bytes()).expect_err("200 levels are past the limit");
    assert!(
        error.to_string().contains("recursion limit exceeded"),
        "{error}"
    );
}

#[tokio::test]
async fn nesting_200_deep_through_the_codec_layer_is_a_decode_error_item() {
    let channel = Topic::from("deep:x");
    let frame = Bytes::from(envelope_text(&nested_arrays(200)));
    let raw = futures::stream::iter(vec![
        Ok(Up::Message {
            channel: Some(channel.clone()),
            message: frame.clone(),
        }),
        Ok(Up::Message {
            channel: Some(channel.clone()),
            message: Bytes::from(envelope_text("1")),
        }),
    ]);
    let mut transport: WithCodec<_, Json, Value> = WithCodec::new(raw, Json);
    let error = match transport.next().await {
        Some(Err(error)) => error,
        other => panic!("expected a decode error item, got {other:?}"),
    };
    assert_eq!(error.kind(), ErrorKind::Decode);
    assert_eq!(error.channel(), Some(&channel));
    assert_eq!(error.frame(), Some(&frame));
    assert!(
        error.to_string().contains("recursion limit exceeded"),
        "{error}"
    );
    // The stream goes on.
    match transport.next().await {
        Some(Ok(Up::Message { message, .. })) => assert_eq!(message.payload, 1),
        other => panic!("expected the next envelope, got {other:?}"),
    }
}

#[test]
fn nesting_a_million_deep_is_refused_without_overflowing_the_stack() {
    let deep = nested_arrays(1_000_000);
    let error = decode(envelope_text(&deep).as_bytes()).expect_err("far past the limit");
    assert!(
        error.to_string().contains("recursion limit exceeded"),
        "{error}"
    );
    // Where a string is expected, an array is refused before it is read.
    let frame = format!(r#"{{"type":{deep},"id":"x"}}"#);
    let error = decode(frame.as_bytes()).expect_err("an array is not a string");
    assert!(error.to_string().contains("invalid type"), "{error}");
}

#[test]
fn an_ignored_field_a_million_deep_is_skipped_without_overflowing_the_stack() {
    // serde_json skips an ignored value iteratively (no recursion, one byte of scratch per
    // level): the limit is on what is kept, and the frame size bounds the rest.
    let deep = nested_arrays(1_000_000);
    let frame = format!(r#"{{"type":"deep","id":"x","extra":{deep}}}"#);
    let envelope = decode(frame.as_bytes()).expect("an unknown field is ignored");
    assert_eq!(envelope, Envelope::new("deep", "x", Value::Null));
}

#[test]
fn out_of_range_numbers_and_invalid_utf8_are_refused() {
    for (frame, why) in [
        (
            &br#"{"type":"a","id":"b","payload":1e400}"#[..],
            "out of range",
        ),
        (
            &br#"{"type":"a","id":"b","payload":-1e400}"#[..],
            "out of range",
        ),
        (&b"{\"type\":\"\xff\xfe\",\"id\":\"b\"}"[..], "unicode"),
        (&br#"{"type":"\ud800\u12","id":"b"}"#[..], "escape"),
        (&br#"{"type":"\ud800\x","id":"b"}"#[..], "escape"),
    ] {
        let error = decode(frame).expect_err("refused");
        assert!(
            error.to_string().contains(why),
            "{}: {error}",
            String::from_utf8_lossy(frame)
        );
    }
    // Integers past u64 and i64 are read as floats, not refused.
    let envelope = decode(br#"{"type":"a","id":"b","payload":18446744073709551616}"#)
        .expect("a large integer is a float");
    assert_eq!(envelope.payload.as_f64(), Some(18446744073709551616.0));
}

/// In a binary format the payload may be left out, as in JSON; JSON itself still takes only an
/// object.
#[test]
fn a_binary_envelope_without_payload_reads_null_and_json_takes_no_array() {
    let in_order = rmp_serde::to_vec(&("t", "1")).unwrap();
    let envelope: Envelope = rmp_serde::from_slice(&in_order).unwrap();
    assert_eq!(envelope, Envelope::new("t", "1", Value::Null));
    let too_short = rmp_serde::to_vec(&("t",)).unwrap();
    assert!(rmp_serde::from_slice::<Envelope>(&too_short).is_err());
    let error = decode(br#"["t","1",null]"#).expect_err("an array is not an envelope");
    assert!(error.to_string().contains("envelope object"), "{error}");
}

/// A payload kept as raw JSON text (`Box<RawValue>`, to route without parsing it) reads a
/// missing payload as the text `null`, as other payload types read it as `null`.
#[test]
fn a_raw_payload_reads_a_missing_payload_as_null() {
    use serde_json::value::RawValue;
    let json = Json;
    let read = |frame: &str| -> Envelope<Box<RawValue>> {
        Codec::<Box<RawValue>>::decode(&json, None, &Bytes::copy_from_slice(frame.as_bytes()))
            .unwrap_or_else(|e| panic!("{frame}: {e}"))
    };
    assert_eq!(read(r#"{"type":"t","id":"1"}"#).payload.get(), "null");
    assert_eq!(
        read(r#"{"type":"t","id":"1","payload": {"a" : [1, 2]} }"#)
            .payload
            .get(),
        r#"{"a" : [1, 2]}"#
    );
    let in_order = rmp_serde::to_vec(&("t", "1")).unwrap();
    let envelope: Envelope<Option<u8>> = rmp_serde::from_slice(&in_order).unwrap();
    assert_eq!(envelope.payload, None);
}

/// JavaScript's `JSON.stringify` writes half a surrogate pair (a string cut inside an emoji) as
/// a lone escape: valid JSON, read by every JavaScript peer. It reads as U+FFFD here, rather
/// than the message being lost; pairs and other escapes are kept.
#[test]
fn lone_surrogates_from_javascript_read_as_the_replacement_character() {
    for (payload, expected) in [
        (r#""x\ud83d""#, "x\u{FFFD}"),
        (r#""\udc00y""#, "\u{FFFD}y"),
        (r#""\ud800\n""#, "\u{FFFD}\n"),
        (r#""\ud800\ud83d\ude00""#, "\u{FFFD}\u{1F600}"),
        (r#""\\ud800 \"\ude00""#, "\\ud800 \"\u{FFFD}"),
        (r#"{"k\udfff":"\u00e9"}"#, ""),
    ] {
        let frame = format!(r#"{{"type":"chat.msg","id":"1","payload":{payload}}}"#);
        let envelope = decode(frame.as_bytes()).unwrap_or_else(|e| panic!("{frame}: {e}"));
        if expected.is_empty() {
            assert_eq!(
                envelope.payload,
                serde_json::json!({ "k\u{FFFD}": "é" }),
                "{frame}"
            );
        } else {
            assert_eq!(envelope.payload, Value::String(expected.into()), "{frame}");
        }
    }
    let envelope = decode(br#"{"type":"a\ud800","id":"b"}"#).unwrap();
    assert_eq!(envelope.topic(), "a\u{FFFD}:b");
}
