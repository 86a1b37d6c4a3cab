//! Side-by-side benchmarks: the raw crates (tokio channels, redis-rs, tokio-tungstenite) and
//! alkdev-pubsub, in the same process run, alternating, with the ratio ours/raw.
//!
//! ```text
//! cargo bench --bench compare --all-features            # full run (3 rounds per scenario)
//! cargo bench --bench compare --all-features -- --quick # smoke test: checks delivery only
//! cargo bench --bench compare --all-features -- redis   # only scenarios whose name matches
//! ```
//!
//! Every scenario sends the ~100-byte envelope
//! `{"type":"bench.event","id":"x","payload":{"n":i,"pad":"<40 chars>"}}`, every receiver
//! decodes it into a typed struct, and every run checks that each message arrived exactly
//! once, in order. See BENCHMARKS.md for results and what bounds each scenario.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, PrefixLayer, ReconnectLayer};
use alkdev_pubsub::{worker, Envelope, EventTarget, Overflow, SubscribeOptions, Topic};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;

// ------------------------------------------------------------------ allocation counting

#[path = "../tests/common/alloc.rs"]
mod alloc;
use alloc::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

// ------------------------------------------------------------------ the message

const PAD: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCD";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Payload {
    n: u64,
    pad: String,
}

fn envelope(n: u64) -> Envelope<Payload> {
    Envelope::new(
        "bench.event",
        "x",
        Payload {
            n,
            pad: PAD.to_owned(),
        },
    )
}

/// The first publish of a run: it waits until the transport is connected.
fn warmup() -> Envelope<Payload> {
    Envelope::new(
        "bench.warmup",
        "x",
        Payload {
            n: 0,
            pad: String::new(),
        },
    )
}

fn frame(n: u64) -> Vec<u8> {
    serde_json::to_vec(&envelope(n)).expect("encoding")
}

/// Checks exactly-once, in-order delivery.
struct Sequence {
    next: u64,
}

impl Sequence {
    fn new() -> Self {
        Sequence { next: 0 }
    }
    fn check(&mut self, n: u64, what: &str) {
        assert_eq!(
            n, self.next,
            "{what}: message {n} arrived when {} was expected (lost, duplicated or reordered)",
            self.next
        );
        self.next += 1;
    }
}

// ------------------------------------------------------------------ measurement

struct Run {
    messages: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// CPU time used so far by every thread of this process (user + system), from
/// `/proc/self/stat` (Linux; `None` elsewhere), counted in clock ticks of 10 ms (Linux's
/// USER_HZ of 100), so only meaningful over runs of a second or so.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn spread(values: &[f64]) -> f64 {
    let max = values.iter().cloned().fold(f64::MIN, f64::max);
    let min = values.iter().cloned().fold(f64::MAX, f64::min);
    let mid = median(values.to_vec());
    if mid == 0.0 {
        0.0
    } else {
        (max - min) / mid * 100.0
    }
}

struct Config {
    quick: bool,
    rounds: usize,
    filter: Option<String>,
}

impl Config {
    fn count(&self, full: u64) -> u64 {
        if self.quick {
            (full / 50).max(200)
        } else {
            full
        }
    }
    fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }
    /// Whether any scenario of `group` (which starts servers) may be wanted.
    fn wants_group(&self, group: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| group.contains(f) || f.contains(group))
    }
}

type Scenario<'a> = Box<dyn FnMut(u64) -> futures::future::BoxFuture<'a, Run> + 'a>;

/// The longest one side's run of a scenario may take (a full run takes seconds).
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Runs raw and ours alternately, `rounds` times, and prints one table row.
async fn compare<'a>(
    config: &Config,
    name: &str,
    messages: u64,
    mut raw: Scenario<'a>,
    mut ours: Scenario<'a>,
) {
    if !config.wants(name) {
        return;
    }
    let mut raw_rates = Vec::new();
    let mut our_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut raw_latency = Vec::new();
    let mut our_latency = Vec::new();
    let mut raw_cpu = Vec::new();
    let mut our_cpu = Vec::new();
    // CPU microseconds per message, for the whole process, while `run` ran.
    let cpu_per_message = |before: Option<Duration>, after: Option<Duration>| match (before, after)
    {
        (Some(before), Some(after)) => (after - before).as_secs_f64() * 1e6 / messages as f64,
        _ => f64::NAN,
    };
    // For profiling one side alone: `COMPARE_ONLY=raw` or `COMPARE_ONLY=ours` (the other side
    // does not run: its figures, and the ratio, mean nothing then).
    let only = std::env::var("COMPARE_ONLY").ok();
    let skip = |side: &str| only.as_deref().is_some_and(|only| only != side);
    let skipped = || Run {
        messages,
        elapsed: Duration::from_secs(1) * u32::MAX,
        latencies: Vec::new(),
    };
    // A message lost would leave its receiver waiting for ever: each run is given a deadline,
    // and missing it fails the benchmark.
    let deadline = |side: &'static str| {
        move |_| {
            panic!("{name}: the {side} run did not finish in {RUN_DEADLINE:?} (a message lost?)")
        }
    };
    for round in 0..config.rounds {
        // Raw runs first in even rounds, ours first in odd ones: neither side always follows
        // the other (whose connections may still be closing, whose frees may still be due).
        let mut r = None;
        let mut o = None;
        let order = if round % 2 == 0 {
            ["raw", "ours"]
        } else {
            ["ours", "raw"]
        };
        for side in order {
            let (run, cpu, result) = if side == "raw" {
                (&mut raw, &mut raw_cpu, &mut r)
            } else {
                (&mut ours, &mut our_cpu, &mut o)
            };
            let before = process_cpu();
            *result = Some(if skip(side) {
                skipped()
            } else {
                tokio::time::timeout(RUN_DEADLINE, run(messages))
                    .await
                    .unwrap_or_else(deadline(side))
            });
            cpu.push(cpu_per_message(before, process_cpu()));
        }
        // Each scenario checks its own deliveries (every message once, in order).
        let (r, o) = (r.expect("raw ran"), o.expect("ours ran"));
        ratios.push(o.rate() / r.rate());
        raw_rates.push(r.rate());
        our_rates.push(o.rate());
        raw_latency.extend(r.latencies);
        our_latency.extend(o.latencies);
    }
    raw_latency.sort();
    our_latency.sort();
    let latency = |sorted: &[Duration]| {
        if sorted.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{:.1}/{:.1}",
                percentile(sorted, 0.5).as_secs_f64() * 1e6,
                percentile(sorted, 0.99).as_secs_f64() * 1e6
            )
        }
    };
    println!(
        "| {name:<34} | {:>12.0} | {:>12.0} | {:>6.3} (±{:>4.1}%) | {:>15} | {:>15} | {:>5.2}/{:<5.2} |",
        median(raw_rates.clone()),
        median(our_rates.clone()),
        median(ratios.clone()),
        spread(&ratios),
        latency(&raw_latency),
        latency(&our_latency),
        median(raw_cpu),
        median(our_cpu),
    );
}

fn header() {
    println!(
        "| {:<34} | {:>12} | {:>12} | {:>17} | {:>15} | {:>15} | {:>11} |",
        "scenario",
        "raw msg/s",
        "ours msg/s",
        "ours/raw (spread)",
        "raw p50/p99 us",
        "ours p50/p99 us",
        "cpu us/msg"
    );
    println!(
        "|{:-<36}|{:->14}|{:->14}|{:->19}|{:->17}|{:->17}|{:->13}|",
        "", "", "", "", "", "", ""
    );
}

// ------------------------------------------------------------------ in-process

/// The raw baseline: `tokio::sync::broadcast`, bounded and lossless. Its capacity holds the
/// whole run, so the publisher never waits and no receiver lags: the fastest lossless use of
/// it (a smaller buffer needs flow control on top, which only slows it down).
async fn raw_broadcast(receivers: usize, messages: u64) -> Run {
    let capacity = (messages as usize).next_power_of_two();
    let (tx, _) = tokio::sync::broadcast::channel::<Arc<Envelope<Payload>>>(capacity);
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let mut rx = tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut sequence = Sequence::new();
            while sequence.next < messages {
                let event = rx.recv().await.expect("lossless: never lagged");
                sequence.check(event.payload.n, "broadcast");
            }
        }));
    }
    let started = Instant::now();
    for n in 0..messages {
        tx.send(Arc::new(envelope(n))).expect("receivers alive");
    }
    for task in tasks {
        task.await.expect("receiver");
    }
    Run {
        messages,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
    }
}

/// Ours, with `Block` queues of `capacity` events (`None`: as large as the baseline's buffer,
/// the whole run, so neither side ever waits for room).
async fn ours_local_streams(receivers: usize, capacity: Option<usize>, messages: u64) -> Run {
    let events: EventTarget<Payload> = EventTarget::local();
    let capacity = capacity.unwrap_or((messages as usize).next_power_of_two());
    let options = SubscribeOptions::new()
        .capacity(capacity)
        .overflow(Overflow::Block);
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let mut subscription = events
            .subscribe_with("bench.event:x", options)
            .await
            .expect("subscribe");
        tasks.push(tokio::spawn(async move {
            let mut sequence = Sequence::new();
            while sequence.next < messages {
                let event = subscription.next().await.expect("open").expect("no gap");
                sequence.check(event.payload.n, "local subscription");
            }
        }));
    }
    let started = Instant::now();
    for n in 0..messages {
        events.dispatch_event(envelope(n)).await.expect("dispatch");
    }
    for task in tasks {
        task.await.expect("receiver");
    }
    Run {
        messages,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
    }
}

async fn ours_local_callbacks(receivers: usize, messages: u64) -> Run {
    let events: EventTarget<Payload> = EventTarget::local();
    let mut counters = Vec::new();
    for _ in 0..receivers {
        let sequence = Arc::new(std::sync::Mutex::new(Sequence::new()));
        let seen = Arc::clone(&sequence);
        events
            .add_event_listener("bench.event:x", move |event| {
                seen.lock().unwrap().check(event.payload.n, "callback")
            })
            .expect("listen");
        counters.push(sequence);
    }
    let started = Instant::now();
    for n in 0..messages {
        events.dispatch_event(envelope(n)).await.expect("dispatch");
    }
    let elapsed = started.elapsed();
    for counter in counters {
        assert_eq!(counter.lock().unwrap().next, messages);
    }
    Run {
        messages,
        elapsed,
        latencies: Vec::new(),
    }
}

// ------------------------------------------------------------------ worker

async fn raw_mpsc_threads(messages: u64) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Envelope<Payload>>(4096);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut sequence = Sequence::new();
            while sequence.next < messages {
                let event = rx.recv().await.expect("open");
                sequence.check(event.payload.n, "mpsc");
            }
            let _ = done_tx.send(());
        });
    });
    let started = Instant::now();
    for n in 0..messages {
        tx.send(envelope(n)).await.expect("send");
    }
    done_rx.await.expect("receiver done");
    Run {
        messages,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
    }
}

async fn ours_worker(messages: u64) -> Run {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (events, thread) = worker::spawn(move |events: EventTarget<Payload>| async move {
        let options = SubscribeOptions::new()
            .capacity(4096)
            .overflow(Overflow::Block);
        let mut subscription = events
            .subscribe_with("bench.event:x", options)
            .await
            .expect("subscribe");
        let _ = ready_tx.send(());
        let mut sequence = Sequence::new();
        while sequence.next < messages {
            let event = subscription.next().await.expect("open").expect("no gap");
            sequence.check(event.payload.n, "worker");
        }
    })
    .expect("spawn");
    ready_rx.await.expect("worker ready");
    let started = Instant::now();
    for n in 0..messages {
        events.dispatch_event(envelope(n)).await.expect("dispatch");
    }
    tokio::task::spawn_blocking(move || thread.join().expect("worker"))
        .await
        .expect("join");
    let elapsed = started.elapsed();
    events.close().await;
    Run {
        messages,
        elapsed,
        latencies: Vec::new(),
    }
}

async fn latency_mpsc(messages: u64) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Envelope<Payload>>(16);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::channel::<Envelope<Payload>>(16);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            // The reply our worker sends: a new envelope with the request's payload.
            while let Some(event) = rx.recv().await {
                let reply = Envelope::new("bench.reply", "x", event.payload.clone());
                if back_tx.send(reply).await.is_err() {
                    break;
                }
            }
        });
    });
    let mut latencies = Vec::with_capacity(messages as usize);
    let started = Instant::now();
    for n in 0..messages {
        let sent = Instant::now();
        tx.send(envelope(n)).await.expect("send");
        let reply = back_rx.recv().await.expect("open");
        assert_eq!(reply.payload.n, n);
        latencies.push(sent.elapsed());
    }
    Run {
        messages,
        elapsed: started.elapsed(),
        latencies,
    }
}

async fn latency_worker(messages: u64) -> Run {
    let (events, thread) = worker::spawn(move |events: EventTarget<Payload>| async move {
        let mut requests = events.subscribe("bench.event:x").await.expect("subscribe");
        while let Some(Ok(event)) = requests.next().await {
            let reply = Envelope::new("bench.reply", "x", event.payload.clone());
            if events.dispatch_event(reply).await.is_err() {
                break;
            }
        }
    })
    .expect("spawn");
    let mut replies = events.subscribe("bench.reply:x").await.expect("subscribe");
    // The worker subscribes on its own thread: wait until it answers.
    loop {
        events
            .dispatch_event(envelope(u64::MAX))
            .await
            .expect("dispatch");
        if let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(20), replies.next()).await
        {
            break;
        }
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), replies.next()).await {}
    let mut latencies = Vec::with_capacity(messages as usize);
    let started = Instant::now();
    for n in 0..messages {
        let sent = Instant::now();
        events.dispatch_event(envelope(n)).await.expect("dispatch");
        let reply = replies.next().await.expect("open").expect("no gap");
        assert_eq!(reply.payload.n, n);
        latencies.push(sent.elapsed());
    }
    let elapsed = started.elapsed();
    events.close().await;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Run {
        messages,
        elapsed,
        latencies,
    }
}

// ------------------------------------------------------------------ Redis

#[cfg(feature = "redis")]
mod redis_bench {
    use super::*;
    use alkdev_pubsub::redis::RedisTransport;

    pub const PREFIX: &str = "bench:";
    pub const BATCH: usize = 1000;

    pub fn stack(url: &str) -> EventTarget<Payload> {
        let url = url.to_owned();
        EventTarget::new(
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(PrefixLayer::new(PREFIX))
                .layer(ReconnectLayer::new(Backoff::default()))
                .service(move || RedisTransport::connect(url.clone())),
        )
    }

    pub async fn raw(url: &str, subscribers: usize, messages: u64) -> Run {
        let client = redis::Client::open(url).expect("url");
        let channel = format!("{PREFIX}bench.event:x");
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        for _ in 0..subscribers {
            let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
            pubsub.subscribe(&channel).await.expect("subscribe");
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            ready.push(ready_rx);
            tasks.push(tokio::spawn(async move {
                let mut stream = pubsub.into_on_message();
                let _ = ready_tx.send(());
                let mut sequence = Sequence::new();
                while sequence.next < messages {
                    let message = stream.next().await.expect("open");
                    let event: Envelope<Payload> =
                        serde_json::from_slice(message.get_payload_bytes()).expect("decode");
                    sequence.check(event.payload.n, "raw redis");
                }
            }));
        }
        for ready in ready {
            ready.await.expect("ready");
        }
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let started = Instant::now();
        let mut n = 0;
        while n < messages {
            let mut pipe = redis::pipe();
            for _ in 0..BATCH.min((messages - n) as usize) {
                pipe.cmd("PUBLISH").arg(&channel).arg(frame(n)).ignore();
                n += 1;
            }
            pipe.exec_async(&mut connection).await.expect("publish");
        }
        for task in tasks {
            task.await.expect("subscriber");
        }
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        }
    }

    pub async fn ours(url: &str, subscribers: usize, messages: u64) -> Run {
        let options = SubscribeOptions::new()
            .capacity(1 << 16)
            .overflow(Overflow::Block);
        let mut tasks = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..subscribers {
            let events = stack(url);
            let mut subscription = events
                .subscribe_with("bench.event:x", options)
                .await
                .expect("subscribe");
            tasks.push(tokio::spawn(async move {
                let mut sequence = Sequence::new();
                while sequence.next < messages {
                    let event = subscription.next().await.expect("open").expect("no gap");
                    sequence.check(event.payload.n, "ours redis");
                }
            }));
            targets.push(events);
        }
        let publisher = stack(url);
        publisher
            .dispatch_confirmed(warmup())
            .await
            .expect("connect");
        let started = Instant::now();
        for n in 0..messages {
            publisher
                .dispatch_event(envelope(n))
                .await
                .expect("dispatch");
        }
        for task in tasks {
            task.await.expect("subscriber");
        }
        let elapsed = started.elapsed();
        publisher.close().await;
        for events in targets {
            events.close().await;
        }
        Run {
            messages,
            elapsed,
            latencies: Vec::new(),
        }
    }

    pub async fn raw_latency(url: &str, messages: u64) -> Run {
        let client = redis::Client::open(url).expect("url");
        let channel = format!("{PREFIX}bench.event:x");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub.subscribe(&channel).await.expect("subscribe");
        let mut stream = pubsub.into_on_message();
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let mut latencies = Vec::with_capacity(messages as usize);
        let started = Instant::now();
        for n in 0..messages {
            let sent = Instant::now();
            // As ours (which does not wait for the reply): the round trip ends when the
            // message arrives, the reply to PUBLISH awaited alongside.
            let mut command = redis::cmd("PUBLISH");
            command.arg(&channel).arg(frame(n));
            let publish = command.query_async::<i64>(&mut connection);
            let (published, message) = futures::join!(publish, stream.next());
            published.expect("publish");
            let message = message.expect("open");
            let event: Envelope<Payload> =
                serde_json::from_slice(message.get_payload_bytes()).expect("decode");
            assert_eq!(event.payload.n, n);
            latencies.push(sent.elapsed());
        }
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies,
        }
    }

    pub async fn ours_latency(url: &str, messages: u64) -> Run {
        let events = stack(url);
        let mut subscription = events.subscribe("bench.event:x").await.expect("subscribe");
        events.dispatch_confirmed(warmup()).await.expect("connect");
        let mut latencies = Vec::with_capacity(messages as usize);
        let started = Instant::now();
        for n in 0..messages {
            let sent = Instant::now();
            events.dispatch_event(envelope(n)).await.expect("dispatch");
            let event = subscription.next().await.expect("open").expect("no gap");
            assert_eq!(event.payload.n, n);
            latencies.push(sent.elapsed());
        }
        let elapsed = started.elapsed();
        events.close().await;
        Run {
            messages,
            elapsed,
            latencies,
        }
    }
}

// ------------------------------------------------------------------ Redis Cluster

#[cfg(feature = "redis-cluster")]
mod cluster_bench {
    use super::*;
    use alkdev_pubsub::redis::cluster::RedisClusterTransport;
    use std::sync::atomic::Ordering::Relaxed;

    const CHANNELS: u64 = 64;

    fn stack(seeds: &[String]) -> EventTarget<Payload> {
        let seeds = seeds.to_vec();
        EventTarget::new(
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(PrefixLayer::new("bench:"))
                .layer(ReconnectLayer::new(Backoff::default()))
                .service(move || RedisClusterTransport::connect(seeds.clone())),
        )
    }

    /// Sharded publish throughput over 64 channels spread across the slots, full stack,
    /// acknowledged by the cluster, while a second target listens on every channel (a
    /// callback each; it shares the two cores with the publisher, so the row measures
    /// publishing under a concurrent receive) and checks, once the clock has stopped, that
    /// every message arrived once and in its channel's order.
    pub async fn publish(seeds: &[String], messages: u64) -> Run {
        let events = stack(seeds);
        let listener = stack(seeds);
        let mistakes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut expected = Vec::new();
        for channel in 0..CHANNELS {
            // Channel `c{i}` carries the messages `n` with `n % 64 == i`, in order.
            let next = Arc::new(std::sync::atomic::AtomicU64::new(channel));
            let (check, mistakes) = (Arc::clone(&next), Arc::clone(&mistakes));
            let topic = format!("bench.event:c{channel}");
            listener
                .add_event_listener(topic.as_str(), move |event| {
                    // One message of a topic at a time: no race between the load and the store.
                    let want = check.load(Relaxed);
                    if event.payload.n == want {
                        check.store(want + CHANNELS, Relaxed);
                    } else {
                        mistakes.fetch_add(1, Relaxed);
                    }
                })
                .expect("listen");
            // Resolves once the cluster has confirmed the topic (the callback keeps it).
            drop(listener.subscribe(topic).await.expect("subscribe"));
            let sent = messages.saturating_sub(channel).div_ceil(CHANNELS);
            expected.push((next, channel + sent * CHANNELS));
        }
        events
            .dispatch_confirmed(envelope(0))
            .await
            .expect("connect");
        let ids: Vec<String> = (0..CHANNELS).map(|i| format!("c{i}")).collect();
        let started = Instant::now();
        for n in 0..messages {
            let id = &ids[(n % CHANNELS) as usize];
            events
                .dispatch_event(Envelope::new(
                    "bench.event",
                    id.as_str(),
                    Payload {
                        n,
                        pad: PAD.to_owned(),
                    },
                ))
                .await
                .expect("dispatch");
        }
        events
            .dispatch_confirmed(envelope(messages))
            .await
            .expect("flush");
        let elapsed = started.elapsed();
        while expected
            .iter()
            .any(|(next, end)| next.load(Relaxed) < *end && mistakes.load(Relaxed) == 0)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            mistakes.load(Relaxed),
            0,
            "cluster: a message missing, repeated or out of order"
        );
        assert_eq!(
            listener.stats().reconnects,
            0,
            "cluster: the listener missed a gap"
        );
        events.close().await;
        listener.close().await;
        Run {
            messages,
            elapsed,
            latencies: Vec::new(),
        }
    }
}

// ------------------------------------------------------------------ WebSocket

#[cfg(feature = "websocket")]
mod ws_bench {
    use super::*;
    use alkdev_pubsub::websocket::{WebSocketListener, WebSocketTransport};
    use tokio_tungstenite::tungstenite::Message;

    pub const FLUSH_EVERY: u64 = 64;

    pub async fn raw(messages: u64) -> Run {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}/", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            stream.set_nodelay(true).expect("nodelay");
            let mut ws = tokio_tungstenite::accept_async(stream)
                .await
                .expect("handshake");
            let mut sequence = Sequence::new();
            while sequence.next < messages {
                match ws.next().await.expect("open").expect("frame") {
                    Message::Text(text) => {
                        let event: Envelope<Payload> = serde_json::from_str(&text).expect("decode");
                        sequence.check(event.payload.n, "raw websocket");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let started = raw_client(url, async {}, messages).await;
        server.await.expect("server");
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        }
    }

    /// The raw client: connects, waits for `ready`, then sends `messages` envelopes as text
    /// frames (`feed`, and `flush` every `FLUSH_EVERY`). Returns when it started sending.
    async fn raw_client(
        url: String,
        ready: impl std::future::Future<Output = ()>,
        messages: u64,
    ) -> Instant {
        let (mut client, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .expect("connect");
        ready.await;
        let started = Instant::now();
        for n in 0..messages {
            let text = serde_json::to_string(&envelope(n)).expect("encode");
            client.feed(Message::text(text)).await.expect("feed");
            if n % FLUSH_EVERY == FLUSH_EVERY - 1 {
                client.flush().await.expect("flush");
            }
        }
        client.flush().await.expect("flush");
        started
    }

    fn client_stack(url: String) -> EventTarget<Payload> {
        EventTarget::new(
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(ReconnectLayer::new(Backoff::default()))
                .service(move || WebSocketTransport::connect(url.clone())),
        )
    }

    /// Our server: an accepted event target that checks every event, with a `Block`
    /// subscription or (`callback`) a callback listener. Returns its URL, a signal that it is
    /// subscribed, and the task that ends once it has seen `messages` events.
    async fn our_server(
        messages: u64,
        callback: bool,
    ) -> (
        String,
        tokio::sync::oneshot::Receiver<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = WebSocketListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/", listener.local_addr().expect("addr"));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (server, _): (EventTarget<Payload>, _) =
                listener.accept_event_target().await.expect("accept");
            if callback {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                let done = std::sync::Mutex::new((Sequence::new(), Some(done_tx)));
                server
                    .add_event_listener("bench.event:x", move |event| {
                        let mut done = done.lock().expect("not poisoned");
                        done.0
                            .check(event.payload.n, "our websocket server's callback");
                        if done.0.next == messages {
                            if let Some(tx) = done.1.take() {
                                let _ = tx.send(());
                            }
                        }
                    })
                    .expect("listen");
                drop(server.subscribe("bench.event:x").await.expect("confirmed"));
                let _ = ready_tx.send(());
                done_rx.await.expect("all received");
                return;
            }
            let options = SubscribeOptions::new()
                .capacity(1 << 16)
                .overflow(Overflow::Block);
            let mut subscription = server
                .subscribe_with("bench.event:x", options)
                .await
                .expect("subscribe");
            let _ = ready_tx.send(());
            let mut sequence = Sequence::new();
            while sequence.next < messages {
                let event = subscription.next().await.expect("open").expect("no gap");
                sequence.check(event.payload.n, "our websocket server");
            }
        });
        (url, ready_rx, server)
    }

    /// Diagnostic: the client's layer stack fed directly by the publishing task (no event
    /// target, so no driver task), flushed every `FLUSH_EVERY`; the server is ours.
    pub async fn stack_only(messages: u64) -> Run {
        let (url, ready_rx, server) = our_server(messages, false).await;
        let mut client = Box::pin(
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(ReconnectLayer::new(Backoff::default()))
                .service(move || WebSocketTransport::connect(url.clone())),
        );
        // The stack connects when first used: a warm-up publish lets the server accept.
        client
            .send(alkdev_pubsub::layers::Command::Publish {
                topic: Topic::from("bench.warmup:x"),
                message: warmup(),
            })
            .await
            .expect("connect");
        ready_rx.await.expect("server ready");
        let topic = Topic::from("bench.event:x");
        let started = Instant::now();
        for n in 0..messages {
            client
                .feed(alkdev_pubsub::layers::Command::Publish {
                    topic: topic.clone(),
                    message: envelope(n),
                })
                .await
                .expect("feed");
            if n % FLUSH_EVERY == FLUSH_EVERY - 1 {
                client.flush().await.expect("flush");
            }
        }
        client.flush().await.expect("flush");
        server.await.expect("server");
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        }
    }

    /// Diagnostic: the raw client of [`raw`] against our server, so the row says what the
    /// receiving side costs alone.
    pub async fn raw_client_our_server(messages: u64) -> Run {
        let (url, ready_rx, server) = our_server(messages, false).await;
        let ready = async { ready_rx.await.expect("server ready") };
        let started = raw_client(url, ready, messages).await;
        server.await.expect("server");
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        }
    }

    /// The server listens with a callback (`callback`) or a `Subscription` stream.
    pub async fn ours(messages: u64, callback: bool) -> Run {
        let (url, ready_rx, server) = our_server(messages, callback).await;
        let client = client_stack(url);
        client.dispatch_confirmed(warmup()).await.expect("connect");
        ready_rx.await.expect("server ready");
        let started = Instant::now();
        for n in 0..messages {
            client.dispatch_event(envelope(n)).await.expect("dispatch");
        }
        server.await.expect("server");
        let elapsed = started.elapsed();
        client.close().await;
        Run {
            messages,
            elapsed,
            latencies: Vec::new(),
        }
    }

    pub async fn raw_latency(messages: u64) -> Run {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            stream.set_nodelay(true).expect("nodelay");
            let mut ws = tokio_tungstenite::accept_async(stream)
                .await
                .expect("handshake");
            // As our server: the request decoded, a reply envelope encoded.
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let event: Envelope<Payload> = serde_json::from_str(&text).expect("decode");
                let reply = Envelope::new("bench.reply", "x", event.payload);
                let reply = serde_json::to_string(&reply).expect("encode");
                if ws.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
        });
        let (mut client, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .expect("connect");
        let mut latencies = Vec::with_capacity(messages as usize);
        let started = Instant::now();
        for n in 0..messages {
            let sent = Instant::now();
            client
                .send(Message::text(
                    serde_json::to_string(&envelope(n)).expect("encode"),
                ))
                .await
                .expect("send");
            let Message::Text(text) = client.next().await.expect("open").expect("frame") else {
                panic!("text")
            };
            let event: Envelope<Payload> = serde_json::from_str(&text).expect("decode");
            assert_eq!(event.payload.n, n);
            latencies.push(sent.elapsed());
        }
        Run {
            messages,
            elapsed: started.elapsed(),
            latencies,
        }
    }

    pub async fn ours_latency(messages: u64) -> Run {
        let listener = WebSocketListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (server, _): (EventTarget<Payload>, _) =
                listener.accept_event_target().await.expect("accept");
            let mut requests = server.subscribe("bench.event:x").await.expect("subscribe");
            while let Some(Ok(event)) = requests.next().await {
                let reply = Envelope::new("bench.reply", "x", event.payload.clone());
                if server.dispatch_event(reply).await.is_err() {
                    break;
                }
            }
        });
        let client = client_stack(url);
        let mut replies = client.subscribe("bench.reply:x").await.expect("subscribe");
        client.dispatch_confirmed(warmup()).await.expect("connect");
        let mut latencies = Vec::with_capacity(messages as usize);
        let started = Instant::now();
        for n in 0..messages {
            let sent = Instant::now();
            client.dispatch_event(envelope(n)).await.expect("dispatch");
            let reply = loop {
                // The server may still be subscribing for the first message: resend until heard.
                match tokio::time::timeout(Duration::from_millis(200), replies.next()).await {
                    Ok(reply) => break reply.expect("open").expect("no gap"),
                    Err(_) => client.dispatch_event(envelope(n)).await.expect("dispatch"),
                }
            };
            assert_eq!(reply.payload.n, n);
            latencies.push(sent.elapsed());
        }
        let elapsed = started.elapsed();
        client.close().await;
        Run {
            messages,
            elapsed,
            latencies,
        }
    }
}

// ------------------------------------------------------------------ memory

/// The memory figures, as lines to print. Runs first, while the allocator counts.
fn memory(config: &Config, runtime: &tokio::runtime::Runtime) -> Vec<String> {
    let mut lines = Vec::new();
    if !config.wants("memory") {
        return lines;
    }
    let sizes: &[usize] = if config.quick {
        &[1_000]
    } else {
        &[10_000, 100_000]
    };
    for &topics in sizes {
        let per = runtime.block_on(async {
            let events: EventTarget<Payload> = EventTarget::local();
            let before = CountingAllocator::current();
            let mut subscriptions = Vec::with_capacity(topics);
            for t in 0..topics {
                subscriptions.push(
                    events
                        .subscribe(Topic::of("idle", &t.to_string()))
                        .await
                        .expect("subscribe"),
                );
            }
            let after = CountingAllocator::current();
            assert_eq!(events.topic_count(), topics);
            (after - before) as f64 / topics as f64
        });
        lines.push(format!(
            "memory: {per:.0} bytes per idle subscription at {topics} topics (local target)"
        ));
    }
    let flood: u64 = if config.quick { 20_000 } else { 1_000_000 };
    let (peak, capacity) = runtime.block_on(async {
        let events: EventTarget<Payload> = EventTarget::local();
        let never_read = events.subscribe("flood:x").await.expect("subscribe");
        let baseline = CountingAllocator::current();
        CountingAllocator::reset_peak();
        for n in 0..flood {
            events
                .dispatch_event(Envelope::new(
                    "flood",
                    "x",
                    Payload {
                        n,
                        pad: PAD.to_owned(),
                    },
                ))
                .await
                .expect("dispatch");
        }
        // Capped: its capacity in events, and the notice of the ones dropped.
        assert_eq!(never_read.len(), never_read.capacity() + 1);
        assert_eq!(events.stats().lagged, flood - never_read.capacity() as u64);
        (CountingAllocator::peak() - baseline, never_read.capacity())
    });
    lines.push(format!("memory: peak +{peak} bytes for a subscriber that never reads, under a {flood}-message flood (queue capped at {capacity})"));
    lines
}

// ------------------------------------------------------------------ main

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    let config = Config {
        quick,
        rounds: if quick { 1 } else { 3 },
        filter,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Memory first, while the allocator counts; then it stops counting (two atomic operations
    // per allocation on counters shared by every thread would weigh on the throughput rows,
    // the more so for the side that allocates more, on more threads).
    let memory = memory(&config, &runtime);
    CountingAllocator::stop_counting();
    println!(
        "alkdev-pubsub benchmarks ({} mode, {} round(s) per scenario, medians)",
        if quick { "quick" } else { "full" },
        config.rounds
    );
    header();
    runtime.block_on(async {
        let n = config.count(1_000_000);
        compare(
            &config,
            "in-process 1 sub vs broadcast",
            n,
            Box::new(|m| Box::pin(raw_broadcast(1, m))),
            Box::new(|m| Box::pin(ours_local_streams(1, Some(1024), m))),
        )
        .await;
        compare(
            &config,
            "in-process 1 sub, queue = run",
            n,
            Box::new(|m| Box::pin(raw_broadcast(1, m))),
            Box::new(|m| Box::pin(ours_local_streams(1, None, m))),
        )
        .await;
        compare(
            &config,
            "in-process 8 subs vs broadcast",
            n / 4,
            Box::new(|m| Box::pin(raw_broadcast(8, m))),
            Box::new(|m| Box::pin(ours_local_streams(8, Some(1024), m))),
        )
        .await;
        compare(
            &config,
            "in-process 8 subs, queues = run",
            n / 4,
            Box::new(|m| Box::pin(raw_broadcast(8, m))),
            Box::new(|m| Box::pin(ours_local_streams(8, None, m))),
        )
        .await;
        compare(
            &config,
            "in-process 8 callbacks vs broadcast",
            n / 4,
            Box::new(|m| Box::pin(raw_broadcast(8, m))),
            Box::new(|m| Box::pin(ours_local_callbacks(8, m))),
        )
        .await;
        compare(
            &config,
            "worker pair vs mpsc (2 threads)",
            n,
            Box::new(|m| Box::pin(raw_mpsc_threads(m))),
            Box::new(|m| Box::pin(ours_worker(m))),
        )
        .await;
        let l = config.count(20_000);
        compare(
            &config,
            "latency worker vs mpsc",
            l,
            Box::new(|m| Box::pin(latency_mpsc(m))),
            Box::new(|m| Box::pin(latency_worker(m))),
        )
        .await;
    });
    #[cfg(feature = "redis")]
    {
        if config.wants_group("redis") {
            let server = alkdev_pubsub::testkit::RedisServer::start();
            let url = server.url();
            runtime.block_on(async {
                let n = config.count(500_000);
                compare(
                    &config,
                    "redis 1->1 full stack vs redis-rs",
                    n,
                    Box::new(|m| Box::pin(redis_bench::raw(&url, 1, m))),
                    Box::new(|m| Box::pin(redis_bench::ours(&url, 1, m))),
                )
                .await;
                compare(
                    &config,
                    "redis 1->8 full stack vs redis-rs",
                    n / 4,
                    Box::new(|m| Box::pin(redis_bench::raw(&url, 8, m))),
                    Box::new(|m| Box::pin(redis_bench::ours(&url, 8, m))),
                )
                .await;
                let l = config.count(10_000);
                compare(
                    &config,
                    "latency redis",
                    l,
                    Box::new(|m| Box::pin(redis_bench::raw_latency(&url, m))),
                    Box::new(|m| Box::pin(redis_bench::ours_latency(&url, m))),
                )
                .await;
            });
        }
    }
    #[cfg(feature = "redis-cluster")]
    {
        if config.wants_group("cluster") {
            let one = alkdev_pubsub::testkit::RedisCluster::start(1);
            let three = alkdev_pubsub::testkit::RedisCluster::start(3);
            let (one_urls, three_urls) = (one.urls(), three.urls());
            println!("(cluster row: 'raw' = 1 master, 'ours' = 3 masters, both our full stack, SPUBLISH acknowledged)");
            runtime.block_on(async {
                let n = config.count(300_000);
                compare(
                    &config,
                    "cluster sharded publish 1 vs 3",
                    n,
                    Box::new(|m| Box::pin(cluster_bench::publish(&one_urls, m))),
                    Box::new(|m| Box::pin(cluster_bench::publish(&three_urls, m))),
                )
                .await;
            });
        }
    }
    #[cfg(feature = "websocket")]
    runtime.block_on(async {
        let n = config.count(1_000_000);
        compare(
            &config,
            "websocket client->server",
            n,
            Box::new(|m| Box::pin(ws_bench::raw(m))),
            Box::new(|m| Box::pin(ws_bench::ours(m, false))),
        )
        .await;
        compare(
            &config,
            "websocket client->server, callback",
            n,
            Box::new(|m| Box::pin(ws_bench::raw(m))),
            Box::new(|m| Box::pin(ws_bench::ours(m, true))),
        )
        .await;
        compare(
            &config,
            "websocket layer stack, no target",
            n,
            Box::new(|m| Box::pin(ws_bench::raw(m))),
            Box::new(|m| Box::pin(ws_bench::stack_only(m))),
        )
        .await;
        compare(
            &config,
            "websocket raw client, our server",
            n,
            Box::new(|m| Box::pin(ws_bench::raw(m))),
            Box::new(|m| Box::pin(ws_bench::raw_client_our_server(m))),
        )
        .await;
        let l = config.count(10_000);
        compare(
            &config,
            "latency websocket",
            l,
            Box::new(|m| Box::pin(ws_bench::raw_latency(m))),
            Box::new(|m| Box::pin(ws_bench::ours_latency(m))),
        )
        .await;
    });
    for line in memory {
        println!("{line}");
    }
}
