//! A pool of 4 worker threads answering calls over worker event targets.
//!
//! Each worker listens on `call.requested:<worker>` and answers on `call.responded:<call id>`;
//! the main side spreads 1,000 calls over them and collects every answer.
//!
//! ```text
//! cargo run --example worker
//! ```

use std::collections::HashSet;
use std::time::Duration;

use alkdev_pubsub::{worker, Envelope, EventTarget, Subscription};
use futures::StreamExt;
use serde_json::json;

const WORKERS: usize = 4;
const CALLS: u64 = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut pool = Vec::new();
    let mut ready = Vec::new();
    for w in 0..WORKERS {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (events, thread) = worker::spawn(move |events: EventTarget| async move {
            let mut calls = events
                .subscribe(format!("call.requested:w{w}"))
                .await
                .expect("subscribing in the worker");
            let _ = ready_tx.send(());
            let mut answered = 0u64;
            // Runs until the main side closes its end (a gap notice, calls lost to a full
            // queue, is no reason to stop answering the others: those callers time out).
            while let Some(next) = calls.next().await {
                let Ok(call) = next else { continue };
                let call_id = call.payload["call"].as_str().unwrap_or_default().to_owned();
                let input = call.payload["input"].as_u64().unwrap_or_default();
                // The input is the caller's: one too large to square is answered with an error,
                // not a panic that would end this worker.
                let answer = match input.checked_mul(input) {
                    Some(output) => json!({ "output": output, "worker": w }),
                    None => json!({ "error": format!("{input} squared is over u64"), "worker": w }),
                };
                if events
                    .dispatch_event(Envelope::new("call.responded", call_id, answer))
                    .await
                    .is_err()
                {
                    break;
                }
                answered += 1;
            }
            answered
        })?;
        pool.push((events, thread));
        ready.push(ready_rx);
    }
    for ready in ready {
        ready.await?;
    }

    // Subscribe to every answer first, then send the calls round-robin.
    let mut answers: Vec<(u64, Subscription)> = Vec::new();
    for call in 0..CALLS {
        let (events, _) = &pool[call as usize % WORKERS];
        answers.push((
            call,
            events
                .subscribe(format!("call.responded:call-{call}"))
                .await?,
        ));
    }
    for call in 0..CALLS {
        let (events, _) = &pool[call as usize % WORKERS];
        let request = json!({ "call": format!("call-{call}"), "input": call });
        events
            .dispatch_event(Envelope::new(
                "call.requested",
                format!("w{}", call as usize % WORKERS),
                request,
            ))
            .await?;
    }

    let mut workers_seen = HashSet::new();
    for (call, subscription) in &mut answers {
        let answer = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await?
            .ok_or("the worker went away")??;
        assert_eq!(answer.payload["output"], *call * *call);
        workers_seen.insert(answer.payload["worker"].as_u64().unwrap_or_default());
    }
    drop(answers);

    let mut per_worker = Vec::new();
    for (events, thread) in pool {
        events.close().await;
        per_worker.push(
            tokio::task::spawn_blocking(move || thread.join())
                .await?
                .map_err(|_| "a worker panicked")?,
        );
    }
    println!(
        "{CALLS} calls answered by {} workers (per worker: {per_worker:?})",
        workers_seen.len()
    );
    Ok(())
}
