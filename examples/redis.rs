//! The full layer stack over Redis: codec, prefix, parse-error policy and reconnect.
//!
//! ```text
//! cargo run --example redis --features redis -- redis://127.0.0.1:6379/
//! ```
//!
//! Subscribes to `session.status:proj_123`, publishes three statuses, prints what comes back
//! with the counters, and shows the connection state as the reconnect layer sees it.

use std::time::Duration;

use alkdev_pubsub::layers::reconnect::{Backoff, ReconnectLayer};
use alkdev_pubsub::layers::{CodecLayer, ParseErrorLayer, PrefixLayer};
use alkdev_pubsub::redis::{redact, RedisTransport};
use alkdev_pubsub::{Envelope, EventTarget, Gap};
use futures::StreamExt;
use serde_json::json;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());

    let reconnect = ReconnectLayer::new(Backoff::default()).buffer(1024);
    let mut state = reconnect.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            eprintln!("connection: {:?}", *state.borrow_and_update());
        }
    });

    let connect_url = url.clone();
    let transport = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .layer(PrefixLayer::new("alk:events:"))
        .layer(reconnect)
        .service(move || RedisTransport::connect(connect_url.clone()));
    let events: EventTarget = EventTarget::new(transport);

    // The reconnect layer tries for ever (the state changes print on stderr): without a
    // server, say so rather than wait.
    let mut statuses = tokio::time::timeout(
        Duration::from_secs(10),
        events.subscribe("session.status:proj_123"),
    )
    .await
    .map_err(|_| {
        format!(
            "no Redis answered at {} within 10 s: is redis-server running?",
            redact(&url)
        )
    })??;
    // Printed without its password.
    println!(
        "subscribed on {} (channel alk:events:session.status:proj_123)",
        redact(&url)
    );
    for state in ["queued", "running", "done"] {
        events
            .dispatch_event(Envelope::new(
                "session.status",
                "proj_123",
                json!({ "state": state }),
            ))
            .await?;
    }
    let mut heard = 0;
    while heard < 3 {
        match tokio::time::timeout(Duration::from_secs(5), statuses.next()).await {
            Ok(Some(Ok(event))) => {
                println!("{} -> {}", event.topic(), event.payload);
                heard += 1;
            }
            Ok(Some(Err(Gap::Reconnected))) => {
                println!("reconnected: events may have been missed")
            }
            Ok(Some(Err(gap))) => println!("{gap}"),
            Ok(None) => break,
            // Still closed below: what was published is flushed, whatever happened.
            Err(_) => {
                eprintln!("no event within 5 s");
                break;
            }
        }
    }
    println!("{:?}", events.stats());
    events.close().await;
    if heard < 3 {
        return Err(format!("heard {heard} of the 3 statuses").into());
    }
    Ok(())
}
