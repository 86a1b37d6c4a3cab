//! The hub of the JavaScript design: spokes connect over WebSocket, and the hub bridges each
//! spoke's events to a shared event target (in-process by default, Redis with `--redis`), so
//! that an event published by one spoke reaches listeners on the other spokes and on the
//! shared target — without echo loops.
//!
//! ```text
//! cargo run --example hub --features websocket -- --listen 127.0.0.1:9000 chat:general
//! cargo run --example hub --features websocket -- --allow-origin http://localhost:8080 chat:general
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
//! let it forward every topic of a type, are planned); what a spoke sends on another topic is
//! dropped, and counted.
//!
//! What it guards against, as a service built from it must:
//! - **Browser pages.** A browser lets a page of any origin open a WebSocket to a server on
//!   `127.0.0.1`: the hub refuses a handshake whose `Origin` is not named with
//!   `--allow-origin` (clients that send none, as spokes do, are not browsers).
//! - **Too many connections.** At most [`MAX_SPOKES`] at once; past that, a new one is closed.
//! - **A slow spoke.** Each spoke's queue holds 1,024 events; a spoke that falls that far
//!   behind is disconnected, so that its reconnect layer tells it of the gap
//!   (`Gap::Reconnected`), rather than lose events silently. A gap in the shared target (Redis
//!   reconnected) disconnects every spoke, for the same reason.
//! - **A blocked stdout.** Nothing is printed per event (the shared target's callbacks run in
//!   its driver); a report each second says what was forwarded and dropped.
//! - **Shutdown.** Ctrl-C stops accepting, and closes the shared target (which flushes what the
//!   spokes sent into it).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alkdev_pubsub::layers::{CodecLayer, ParseErrorLayer};
use alkdev_pubsub::websocket::{WebSocketConfig, WebSocketListener};
use alkdev_pubsub::{Command, Envelope, EventTarget, Topic, Up};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceBuilder;

/// How many recent spoke events the hub remembers the origin of.
const REMEMBERED: usize = 65_536;

/// How many spokes may be connected at once.
const MAX_SPOKES: usize = 1024;

/// How many events wait for a spoke's writer before the spoke is taken for too slow.
const SPOKE_QUEUE: usize = 1024;

/// What the hub did since its last report.
#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    slow_spokes: AtomicU64,
    unbridged: AtomicU64,
}

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
    /// The origins whose pages may connect (`Origin` header, as `https://app.example`).
    origins: HashSet<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:9000".into(),
        redis: None,
        topics: Vec::new(),
        origins: HashSet::new(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--listen" => args.listen = argv.next().ok_or("--listen needs ADDR")?,
            "--redis" => args.redis = Some(argv.next().ok_or("--redis needs URL")?),
            "--allow-origin" => {
                args.origins
                    .insert(argv.next().ok_or("--allow-origin needs ORIGIN")?);
            }
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
    let args = parse_args().map_err(|e| {
        format!("{e}\nusage: hub [--listen ADDR] [--redis URL] [--allow-origin ORIGIN]... TOPIC...")
    })?;
    let shared = shared_target(args.redis.as_deref());
    let spokes = Arc::new(Mutex::new(Spokes::default()));
    let counts = Arc::new(Counts::default());

    // Out of the shared target: to every spoke but the event's origin. A spoke whose queue is
    // full is let go (its writer ends, and closes its connection).
    for topic in &args.topics {
        let (spokes, counts) = (Arc::clone(&spokes), Arc::clone(&counts));
        shared.add_event_listener(topic.as_str(), move |event| {
            let key = fingerprint(event);
            let mut spokes = spokes.lock().unwrap_or_else(|p| p.into_inner());
            let origin = spokes.origin_of(key);
            let mut slow = Vec::new();
            for (id, sender) in &spokes.senders {
                if Some(*id) == origin {
                    continue;
                }
                match sender.try_send(Arc::clone(event)) {
                    Ok(()) => {
                        counts.forwarded.fetch_add(1, Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        counts.slow_spokes.fetch_add(1, Relaxed);
                        slow.push(*id);
                    }
                    // Left: its task takes it out.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            for id in slow {
                spokes.senders.remove(&id);
            }
        })?;
        drop(shared.subscribe(topic.as_str()).await?);
    }
    // Events the shared target lost (Redis reconnected): every spoke is let go, to hear of it
    // from its own reconnect layer.
    {
        let spokes = Arc::clone(&spokes);
        shared.add_gap_listener(move |_| {
            spokes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .senders
                .clear();
        });
    }
    tokio::spawn(report(Arc::clone(&counts)));

    let origins = args.origins;
    let config = WebSocketConfig::new().check_request(move |request| {
        match request.headers().get("origin") {
            // Not a browser.
            None => Ok(()),
            Some(origin) if origin.to_str().is_ok_and(|o| origins.contains(o)) => Ok(()),
            Some(origin) => Err(format!(
                "origin {} not allowed (hub --allow-origin ORIGIN)",
                String::from_utf8_lossy(origin.as_bytes())
            )),
        }
    });
    let listener = WebSocketListener::bind_with(args.listen.as_str(), config).await?;
    println!(
        "hub listening on ws://{}/ for {:?}",
        listener.local_addr()?,
        args.topics
    );
    let bridged: Arc<[Topic]> = args
        .topics
        .iter()
        .map(|t| Topic::from(t.as_str()))
        .collect();
    let places = Arc::new(Semaphore::new(MAX_SPOKES));
    loop {
        // `accept` runs the handshakes concurrently: a slow client never holds up the next.
        // An error concerns one connection; the hub goes on.
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (mut transport, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("hub: {error}");
                continue;
            }
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            eprintln!("hub: {MAX_SPOKES} spokes connected; closing the connection from {peer}");
            tokio::spawn(async move { transport.close().await });
            continue;
        };
        let spoke = Spoke {
            shared: shared.clone(),
            spokes: Arc::clone(&spokes),
            bridged: Arc::clone(&bridged),
            counts: Arc::clone(&counts),
        };
        tokio::spawn(async move {
            spoke.serve(transport, peer).await;
            drop(place);
        });
    }
    println!("hub stopping: closing the shared target");
    shared.close().await;
    Ok(())
}

/// Prints, each second something happened, what the hub forwarded and dropped.
async fn report(counts: Arc<Counts>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let forwarded = counts.forwarded.swap(0, Relaxed);
        let slow = counts.slow_spokes.swap(0, Relaxed);
        let unbridged = counts.unbridged.swap(0, Relaxed);
        if forwarded + slow + unbridged > 0 {
            println!(
                "hub: {forwarded} event(s) forwarded to spokes, {slow} spoke(s) let go for falling {SPOKE_QUEUE} events behind, {unbridged} event(s) on topics not bridged dropped"
            );
        }
    }
}

/// What serving one spoke needs.
struct Spoke {
    shared: EventTarget,
    spokes: Arc<Mutex<Spokes>>,
    bridged: Arc<[Topic]>,
    counts: Arc<Counts>,
}

impl Spoke {
    async fn serve(
        self,
        transport: alkdev_pubsub::websocket::WebSocketTransport<tokio::net::TcpStream>,
        peer: SocketAddr,
    ) {
        let Spoke {
            shared,
            spokes,
            bridged,
            counts,
        } = self;
        let (sender, mut outgoing) = mpsc::channel::<Arc<Envelope>>(SPOKE_QUEUE);
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
        // Sends what the shared target gave this spoke. Let go (its queue taken from it: too
        // slow, or a gap), it closes the connection once what was queued is sent.
        let writer = tokio::spawn(async move {
            while let Some(envelope) = outgoing.recv().await {
                let command = Command::Publish {
                    topic: envelope.topic(),
                    message: Arc::unwrap_or_clone(envelope),
                };
                if to_spoke.send(command).await.is_err() {
                    return;
                }
            }
            println!("spoke {id}: let go (too slow, or the shared target lost events); closing");
            let _ = to_spoke.close().await;
        });
        // Into the shared target, remembering the origin.
        while let Some(item) = from_spoke.next().await {
            match item {
                Ok(Up::Message { message, .. }) => {
                    let envelope: Envelope = message;
                    if !bridged.iter().any(|topic| envelope.has_topic(topic)) {
                        counts.unbridged.fetch_add(1, Relaxed);
                        continue;
                    }
                    let key = fingerprint(&envelope);
                    let record = spokes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remember(key, id);
                    // A refusal concerns this event or the moment (Redis down and its buffer
                    // full): the spoke stays; a stopped target ends it.
                    if let Err(error) = shared.dispatch_event(envelope).await {
                        spokes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .forget(record);
                        eprintln!(
                            "hub: the shared target refused an event from spoke {id}: {error}"
                        );
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
        // The writer first: let go now, it would say so.
        writer.abort();
        spokes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .senders
            .remove(&id);
        println!("spoke {id} ({peer}) left");
    }
}
