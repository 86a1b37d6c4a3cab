//! The hub of the JavaScript design: spokes connect over WebSocket, and the hub bridges each
//! spoke's events to a shared event target (in-process by default, Redis with `--redis`), so
//! that an event published by one spoke reaches listeners on the other spokes and on the
//! shared target — without echo loops.
//!
//! ```text
//! cargo run --example hub --features websocket -- --listen 127.0.0.1:9000 chat:general
//! cargo run --example hub --all-features -- --listen 127.0.0.1:9000 --redis redis://127.0.0.1:6379/ chat:general
//! ```
//!
//! How it avoids echoes: the envelope is never changed (JavaScript spokes must keep working).
//! When a spoke's event goes into the shared target, the hub remembers which spoke it came
//! from (by the event's content, briefly); when the event comes back out of the shared target
//! to the hub's own listener, it is forwarded to every spoke but that one. Through Redis, the
//! same event reaches the other hubs, which forward it to all their spokes, and no hub puts
//! what it heard from Redis back into Redis.
//!
//! The hub forwards the topics named on its command line (pattern subscriptions, which would
//! let it forward every topic of a type, are planned).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use alkdev_pubsub::layers::{CodecLayer, ParseErrorLayer};
use alkdev_pubsub::websocket::WebSocketListener;
use alkdev_pubsub::{Command, Envelope, EventTarget, Up};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tower::ServiceBuilder;

/// How many recent spoke events the hub remembers the origin of.
const REMEMBERED: usize = 65_536;

/// What the hub shares between its connections.
#[derive(Default)]
struct Spokes {
    next_id: u64,
    /// Each spoke's queue holds the shared event (one copy, however many spokes wait for it);
    /// its writer copies one at a time, as it sends it.
    senders: HashMap<u64, mpsc::Sender<Arc<Envelope>>>,
    /// The origin of recent events, by content fingerprint: for each, a multiset of
    /// `(remembered as, spoke)`, oldest first.
    origins: HashMap<u64, VecDeque<(u64, u64)>>,
    /// What was remembered, oldest first: `(fingerprint, remembered as)`.
    order: VecDeque<(u64, u64)>,
    remembered: u64,
}

fn fingerprint(envelope: &Envelope) -> u64 {
    let mut hasher = DefaultHasher::new();
    envelope.r#type.hash(&mut hasher);
    envelope.id.hash(&mut hasher);
    envelope.payload.to_string().hash(&mut hasher);
    hasher.finish()
}

impl Spokes {
    /// Remembers that `spoke` sent the event of fingerprint `key` (computed before the lock
    /// is taken: it serializes the payload); returns the record (the fingerprint and its
    /// number), for [`Self::forget`].
    fn remember(&mut self, key: u64, spoke: u64) -> (u64, u64) {
        self.remembered += 1;
        let seq = self.remembered;
        self.origins.entry(key).or_default().push_back((seq, spoke));
        self.order.push_back((key, seq));
        if self.order.len() > REMEMBERED {
            // The oldest is forgotten, unless its echo came back already (each fingerprint's
            // origins are taken oldest first, so it is at the front if it is still there).
            if let Some((old, seq)) = self.order.pop_front() {
                if let Some(origins) = self.origins.get_mut(&old) {
                    if origins.front().is_some_and(|(s, _)| *s == seq) {
                        origins.pop_front();
                    }
                    if origins.is_empty() {
                        self.origins.remove(&old);
                    }
                }
            }
        }
        (key, seq)
    }

    /// Forgets a record (its dispatch failed: no echo will come to take it, and the next such
    /// event, from elsewhere, would be withheld from that spoke).
    fn forget(&mut self, (key, seq): (u64, u64)) {
        if let Some(origins) = self.origins.get_mut(&key) {
            origins.retain(|(s, _)| *s != seq);
            if origins.is_empty() {
                self.origins.remove(&key);
            }
        }
    }

    /// Which spoke sent the event of fingerprint `key`, if one did (taking that record).
    fn origin_of(&mut self, key: u64) -> Option<u64> {
        let origins = self.origins.get_mut(&key)?;
        let (_, origin) = origins.pop_front()?;
        if origins.is_empty() {
            self.origins.remove(&key);
        }
        Some(origin)
    }
}

struct Args {
    listen: String,
    redis: Option<String>,
    topics: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:9000".into(),
        redis: None,
        topics: Vec::new(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--listen" => args.listen = argv.next().ok_or("--listen needs ADDR")?,
            "--redis" => args.redis = Some(argv.next().ok_or("--redis needs URL")?),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            // Once each: a second listener on a topic would forward its events twice.
            topic if args.topics.iter().any(|t| t == topic) => {}
            topic => args.topics.push(topic.to_owned()),
        }
    }
    if args.topics.is_empty() {
        return Err("name at least one TOPIC to bridge, e.g. chat:general".into());
    }
    Ok(args)
}

fn shared_target(redis: Option<&str>) -> EventTarget {
    match redis {
        None => EventTarget::local(),
        Some(url) => redis_target(url),
    }
}

#[cfg(feature = "redis")]
fn redis_target(url: &str) -> EventTarget {
    use alkdev_pubsub::layers::{Backoff, PrefixLayer, ReconnectLayer};
    use alkdev_pubsub::redis::RedisTransport;
    let url = url.to_owned();
    EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new("alk:events:"))
            .layer(ReconnectLayer::new(Backoff::default()))
            .service(move || RedisTransport::connect(url.clone())),
    )
}

#[cfg(not(feature = "redis"))]
fn redis_target(_: &str) -> EventTarget {
    eprintln!("hub: built without the `redis` feature: cargo run --example hub --all-features");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()
        .map_err(|e| format!("{e}\nusage: hub [--listen ADDR] [--redis URL] TOPIC..."))?;
    let shared = shared_target(args.redis.as_deref());
    let spokes = Arc::new(Mutex::new(Spokes::default()));

    // Out of the shared target: to every spoke but the event's origin.
    for topic in &args.topics {
        let spokes = Arc::clone(&spokes);
        shared.add_event_listener(topic.as_str(), move |event| {
            let key = fingerprint(event);
            let mut spokes = spokes.lock().unwrap_or_else(|p| p.into_inner());
            let origin = spokes.origin_of(key);
            let (mut sent, mut dropped) = (0, Vec::new());
            for (id, sender) in &spokes.senders {
                if Some(*id) == origin {
                    continue;
                }
                if sender.try_send(Arc::clone(event)).is_ok() {
                    sent += 1;
                } else {
                    dropped.push(*id);
                }
            }
            // Printed with the lock released: every spoke's reader takes it.
            drop(spokes);
            for id in dropped {
                eprintln!("hub: spoke {id} is too slow or gone; an event to it was dropped");
            }
            println!("{} -> {sent} spoke(s) (from {origin:?})", event.topic());
        })?;
        drop(shared.subscribe(topic.as_str()).await?);
    }

    let listener = WebSocketListener::bind(args.listen.as_str()).await?;
    println!(
        "hub listening on ws://{}/ for {:?}",
        listener.local_addr()?,
        args.topics
    );
    loop {
        // `accept` runs the handshakes concurrently: a slow client never holds up the next.
        // An error concerns one connection; the hub goes on.
        let (transport, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("hub: {error}");
                continue;
            }
        };
        let (shared, spokes) = (shared.clone(), Arc::clone(&spokes));
        tokio::spawn(serve_spoke(transport, peer, shared, spokes));
    }
}

async fn serve_spoke(
    transport: alkdev_pubsub::websocket::WebSocketTransport<tokio::net::TcpStream>,
    peer: SocketAddr,
    shared: EventTarget,
    spokes: Arc<Mutex<Spokes>>,
) {
    let (sender, mut outgoing) = mpsc::channel::<Arc<Envelope>>(1024);
    let id = {
        let mut spokes = spokes.lock().unwrap_or_else(|p| p.into_inner());
        spokes.next_id += 1;
        let id = spokes.next_id;
        spokes.senders.insert(id, sender);
        id
    };
    println!("spoke {id} connected from {peer}");
    let (mut to_spoke, mut from_spoke) = ServiceBuilder::new()
        .layer(ParseErrorLayer::skip())
        .layer(CodecLayer::json())
        .service(transport)
        .split();
    let writer = tokio::spawn(async move {
        while let Some(envelope) = outgoing.recv().await {
            let command = Command::Publish {
                topic: envelope.topic(),
                message: Arc::unwrap_or_clone(envelope),
            };
            if to_spoke.send(command).await.is_err() {
                break;
            }
        }
    });
    // Into the shared target, remembering the origin.
    while let Some(item) = from_spoke.next().await {
        match item {
            Ok(Up::Message { message, .. }) => {
                let envelope: Envelope = message;
                let key = fingerprint(&envelope);
                let record = spokes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remember(key, id);
                // A refusal concerns this event (a topic over the limit) or the moment (Redis
                // down and its buffer full): the spoke stays; a stopped target ends it.
                if let Err(error) = shared.dispatch_event(envelope).await {
                    spokes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(record);
                    eprintln!("hub: the shared target refused an event from spoke {id}: {error}");
                    if error.is_closed() {
                        break;
                    }
                }
            }
            Ok(_) => {}
            Err(error) if error.is_fatal() => break,
            Err(error) => eprintln!("spoke {id}: {error}"),
        }
    }
    spokes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .senders
        .remove(&id);
    writer.abort();
    println!("spoke {id} ({peer}) left");
}
