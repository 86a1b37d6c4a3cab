//! A spoke: connects to the hub over WebSocket through the reconnect layer, listens on a topic,
//! publishes on it, and prints what it hears — including the `Reconnected` gap when the hub
//! restarts.
//!
//! ```text
//! cargo run --example spoke --features websocket -- --hub ws://127.0.0.1:9000/ --name alice chat:general
//! ```
//!
//! `--count N` exits after hearing N events from other spokes (it runs until stopped
//! otherwise).

use std::time::Duration;

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
use alkdev_pubsub::websocket::WebSocketTransport;
use alkdev_pubsub::{Envelope, EventTarget, Gap, Topic};
use futures::StreamExt;
use serde_json::json;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut hub = "ws://127.0.0.1:9000/".to_owned();
    // Unique by default: a spoke skips what carries its own name (the hub never echoes, but
    // two spokes of one name would not hear each other).
    let mut name = format!("spoke-{}", std::process::id());
    let mut count: Option<u64> = None;
    let mut topic = None;
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--hub" => hub = argv.next().ok_or("--hub needs URL")?,
            "--name" => name = argv.next().ok_or("--name needs NAME")?,
            "--count" => count = Some(argv.next().ok_or("--count needs N")?.parse()?),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}").into()),
            other => topic = Some(Topic::from(other)),
        }
    }
    let topic = topic.ok_or("usage: spoke [--hub URL] [--name NAME] [--count N] TOPIC")?;
    let (event_type, id) = topic.split_once(':').ok_or("TOPIC is type:id")?;
    let (event_type, id) = (event_type.to_owned(), id.to_owned());

    let url = hub.clone();
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(
                Backoff::new().max(Duration::from_secs(2)),
            ))
            .service(move || WebSocketTransport::connect(url.clone())),
    );
    let mut heard = events.subscribe(topic.clone()).await?;
    println!("{name}: connected to {hub}, listening on {topic}");

    let publisher = events.clone();
    let me = name.clone();
    tokio::spawn(async move {
        for n in 0u64.. {
            let envelope = Envelope::new(
                event_type.as_str(),
                id.as_str(),
                json!({ "from": me, "n": n }),
            );
            match publisher.dispatch_event(envelope).await {
                Ok(()) => {}
                // The hub has been away long enough to fill the reconnect layer's buffer:
                // this one is dropped, and publishing goes on once the hub is back.
                Err(error) if error.is_unavailable() => eprintln!("{me}: not sent: {error}"),
                Err(error) => {
                    eprintln!("{me}: publishing stopped: {error}");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    let mut received = 0;
    while let Some(item) = heard.next().await {
        match item {
            Ok(event) if event.payload["from"] != name.as_str() => {
                println!("{name}: {} {}", event.topic(), event.payload);
                received += 1;
                if count.is_some_and(|count| received >= count) {
                    break;
                }
            }
            Ok(_) => {}
            Err(Gap::Reconnected) => {
                println!("{name}: reconnected to the hub; events may have been missed")
            }
            Err(gap) => println!("{name}: {gap}"),
        }
    }
    events.close().await;
    Ok(())
}
