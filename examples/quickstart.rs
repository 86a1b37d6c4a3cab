//! In-process publish/subscribe: callbacks, a `Subscription` stream, and the typed `PubSub`.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use alkdev_pubsub::{Envelope, EventTarget, Gap, PubSub};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Status {
    state: String,
    progress: u8,
}

#[tokio::main]
async fn main() -> Result<(), alkdev_pubsub::Error> {
    // 1. An in-process event target: no server, envelopes are never serialized.
    let events = EventTarget::local();

    // A callback listener, like the JavaScript `addEventListener`.
    let listener = events.add_event_listener("session.status:proj_123", |event| {
        println!("callback     {} -> {}", event.topic(), event.payload);
    })?;

    // A stream listener: resolves once subscribed, so nothing published after is missed.
    let mut statuses = events.subscribe("session.status:proj_123").await?;

    for state in ["queued", "running", "done"] {
        events
            .dispatch_event(Envelope::new(
                "session.status",
                "proj_123",
                json!({ "state": state }),
            ))
            .await?;
    }
    for _ in 0..3 {
        match statuses.next().await {
            Some(Ok(event)) => println!("subscription {} -> {}", event.topic(), event.payload),
            Some(Err(Gap::Lagged(n))) => println!("subscription missed {n} events"),
            Some(Err(gap)) => println!("subscription: {gap}"),
            None => break,
        }
    }
    events.remove_event_listener("session.status:proj_123", listener);

    // 2. The typed front: payloads are your own types.
    let pubsub: PubSub<Status> = PubSub::local();
    let mut progress = pubsub.subscribe("session.status", "proj_456").await?;
    for step in 1..=3u8 {
        let status = Status {
            state: "running".into(),
            progress: step * 33,
        };
        pubsub.publish("session.status", "proj_456", status).await?;
    }
    for _ in 0..3 {
        if let Some(status) = progress.next().await {
            println!("typed        session.status:proj_456 -> {status:?}");
        }
    }

    events.close().await;
    let typed = pubsub.stats();
    pubsub.close().await;
    let stats = events.stats();
    println!(
        "published {} events, {} deliveries, {} lagged; typed: {} published, {} delivered",
        stats.published, stats.delivered, stats.lagged, typed.published, typed.delivered
    );
    Ok(())
}
