//! `tap`: watch or feed the events of a deployment from the command line.
//!
//! ```text
//! tap listen  (--redis URL | --redis-cluster URL[,URL...] | --ws URL) [--prefix P] [--count N] TOPIC...
//! tap publish (--redis URL | --redis-cluster URL[,URL...] | --ws URL) [--prefix P] < envelopes.jsonl
//! ```
//!
//! `listen` prints every envelope received on the topics as one compact JSON line on stdout
//! (diagnostics go to stderr), skips malformed messages, and exits 0 after N envelopes with
//! `--count`. `publish` reads one envelope per line on stdin, publishes each on its topic
//! (`type:id`), reports a bad line (not an envelope, not UTF-8, or an envelope refused on its
//! own, such as one whose topic is over the limit) on stderr with its number and skips it, and
//! exits 0 at the end of input once everything is flushed (for Redis: acknowledged). An
//! envelope not published for another reason (refused during an outage, once the reconnect
//! layer's buffer is full) is reported the same way, and makes it exit 1 at the end of input.
//!
//! ```text
//! cargo run --example tap --all-features -- listen --redis redis://127.0.0.1:6379/ --prefix alk:events: session.status:p1
//! ```

use std::io::Write;
use std::process::ExitCode;

use alkdev_pubsub::layers::{
    check_topic_len, Backoff, CodecLayer, ParseErrorLayer, PrefixLayer, ReconnectLayer,
};
use alkdev_pubsub::{Envelope, ErrorKind, EventTarget};
use tokio::io::AsyncBufReadExt;
use tower::ServiceBuilder;

const USAGE: &str = "usage:
  tap listen  TRANSPORT [--prefix P] [--count N] TOPIC...
  tap publish TRANSPORT [--prefix P]   (envelopes as JSON lines on stdin)
TRANSPORT: --redis URL | --redis-cluster URL[,URL...] | --ws URL";

#[derive(Debug, Default)]
struct Args {
    command: String,
    redis: Option<String>,
    cluster: Option<String>,
    ws: Option<String>,
    prefix: String,
    count: Option<u64>,
    topics: Vec<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        command: args.next().ok_or("missing command: listen or publish")?,
        ..Args::default()
    };
    if parsed.command != "listen" && parsed.command != "publish" {
        return Err(format!(
            "unknown command {:?}: listen or publish",
            parsed.command
        ));
    }
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--redis" => parsed.redis = Some(value("--redis")?),
            "--ws" => parsed.ws = Some(value("--ws")?),
            "--redis-cluster" => parsed.cluster = Some(value("--redis-cluster")?),
            "--prefix" => parsed.prefix = value("--prefix")?,
            "--count" => {
                let count = value("--count")?;
                parsed.count = Some(
                    count
                        .parse()
                        .map_err(|_| format!("--count: not a number: {count:?}"))?,
                );
            }
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            topic => parsed.topics.push(topic.to_owned()),
        }
    }
    let transports = [
        parsed.redis.is_some(),
        parsed.cluster.is_some(),
        parsed.ws.is_some(),
    ];
    if transports.iter().filter(|given| **given).count() != 1 {
        return Err(
            "one transport is required: --redis URL, --redis-cluster URL[,URL...] or --ws URL"
                .into(),
        );
    }
    if parsed.command == "listen" && parsed.topics.is_empty() {
        return Err("listen needs at least one TOPIC".into());
    }
    if parsed.command == "publish" && !parsed.topics.is_empty() {
        return Err("publish takes no TOPIC: each envelope's topic is type:id".into());
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("tap: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "listen" => listen(&args).await,
        _ => publish(&args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tap: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The full stack over any raw transport made by `connect`. `attempts` caps connection
/// attempts in a row (`None`: retry forever, for `listen`; publishing gives up rather than
/// wait for a server that is gone).
fn full_stack<F, Fut, T>(prefix: &str, attempts: Option<u32>, connect: F) -> EventTarget
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = alkdev_pubsub::Result<T>> + Send + 'static,
    T: alkdev_pubsub::Transport<bytes::Bytes> + Send + 'static,
{
    EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(PrefixLayer::new(prefix.to_owned()))
            // Transient refusals (a cluster shard failing over, a server loading) are retried.
            .layer(alkdev_pubsub::layers::RetryLayer::default())
            .layer(ReconnectLayer::new(
                Backoff::default().max_attempts(attempts),
            ))
            .service(connect),
    )
}

fn target(args: &Args, attempts: Option<u32>) -> Result<EventTarget, String> {
    use alkdev_pubsub::redis::cluster::RedisClusterTransport;
    use alkdev_pubsub::redis::RedisTransport;
    use alkdev_pubsub::websocket::WebSocketTransport;
    let prefix = args.prefix.as_str();
    if let Some(url) = args.redis.clone() {
        return Ok(full_stack(prefix, attempts, move || {
            RedisTransport::connect(url.clone())
        }));
    }
    if let Some(seeds) = args.cluster.clone() {
        let seeds: Vec<String> = seeds.split(',').map(str::to_owned).collect();
        return Ok(full_stack(prefix, attempts, move || {
            RedisClusterTransport::connect(seeds.clone())
        }));
    }
    if let Some(url) = args.ws.clone() {
        return Ok(full_stack(prefix, attempts, move || {
            WebSocketTransport::connect(url.clone())
        }));
    }
    Err("a transport is required".into())
}

async fn listen(args: &Args) -> Result<(), String> {
    let events = target(args, None)?;
    // Callbacks run in arrival order on the event target's driver, so the output keeps the
    // order in which events came, across topics. The driver never waits on stdout: what a
    // reader of the output too slow to keep up would let pile up past `BACKLOG` events is
    // dropped, and counted.
    const BACKLOG: usize = 65_536;
    let (tx, mut rx) = tokio::sync::mpsc::channel(BACKLOG);
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for topic in &args.topics {
        let tx = tx.clone();
        let dropped = std::sync::Arc::clone(&dropped);
        events
            .add_event_listener(topic.as_str(), move |event| {
                if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) =
                    tx.try_send(event.clone())
                {
                    dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .map_err(|e| format!("listening on {topic}: {e}"))?;
        // A subscription resolves once Redis confirmed the topic: then nothing is missed.
        drop(
            events
                .subscribe(topic.as_str())
                .await
                .map_err(|e| format!("subscribing to {topic}: {e}"))?,
        );
    }
    drop(tx);
    // A reconnect may have lost events: said on stderr, where it does not mix with the output.
    events.add_gap_listener(|gap| eprintln!("tap: {gap}"));
    eprintln!("tap: listening on {} topic(s)", args.topics.len());
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0u64;
    while let Some(event) = rx.recv().await {
        let line =
            serde_json::to_string(&*event).map_err(|e| format!("encoding an envelope: {e}"))?;
        writeln!(stdout, "{line}")
            .and_then(|_| stdout.flush())
            .map_err(|e| format!("writing stdout: {e}"))?;
        printed += 1;
        if args.count.is_some_and(|count| printed >= count) {
            break;
        }
    }
    drop(stdout);
    let stats = events.stats();
    if stats.decode_errors > 0 {
        eprintln!("tap: skipped {} malformed message(s)", stats.decode_errors);
    }
    let dropped = dropped.load(std::sync::atomic::Ordering::Relaxed);
    if dropped > 0 {
        eprintln!("tap: dropped {dropped} event(s): the output was read too slowly");
    }
    events.close().await;
    Ok(())
}

async fn publish(args: &Args) -> Result<(), String> {
    let events = target(args, Some(3))?;
    let result = publish_lines(&events).await;
    // Also after an error: what was dispatched before it is flushed.
    events.close().await;
    let tally = result?;
    // Failures past those already reported (a refusal may count as a failed publish): what
    // failed once dispatched (a flush the server never acknowledged).
    let later = events
        .stats()
        .publish_failed
        .saturating_sub(tally.refused + tally.failed);
    let failed = tally.failed + later;
    if failed > 0 {
        return Err(format!(
            "{failed} of {} envelope(s) not published",
            tally.sent + tally.failed + tally.refused
        ));
    }
    eprintln!(
        "tap: published {} envelope(s), skipped {} bad line(s)",
        tally.sent,
        tally.unread + tally.refused
    );
    Ok(())
}

/// What [`publish_lines`] did with the lines: published, not an envelope, an envelope
/// refused on its own (too large, say), or not published for another reason (the target's
/// buffer full during an outage, say).
struct Tally {
    sent: u64,
    unread: u64,
    refused: u64,
    failed: u64,
}

/// Publishes each line of stdin that is an envelope. Lines are read as bytes: one that is not
/// UTF-8 is a bad line like any other, not the end of the input.
async fn publish_lines(events: &EventTarget) -> Result<Tally, String> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).split(b'\n');
    let mut number = 0u64;
    let mut tally = Tally {
        sent: 0,
        unread: 0,
        refused: 0,
        failed: 0,
    };
    let mut last: Option<(u64, Envelope)> = None;
    // A publish refused for what it is (a topic over the limit, say) is a bad line; one that
    // failed otherwise (the target's buffer full during an outage) fails the run, which goes
    // on with the next lines; a target that stopped ends the run.
    let outcome = |tally: &mut Tally, line: u64, result: alkdev_pubsub::Result<()>| {
        match result {
            Ok(()) => tally.sent += 1,
            Err(error) if error.is_closed() => return Err(format!("line {line}: {error}")),
            Err(error) if matches!(error.kind(), ErrorKind::TooLarge | ErrorKind::Encode) => {
                eprintln!("tap: line {line}: not published, skipped: {error}");
                tally.refused += 1;
            }
            Err(error) => {
                eprintln!("tap: line {line}: not published: {error}");
                tally.failed += 1;
            }
        }
        Ok(())
    };
    let mut read_error = None;
    loop {
        let line = match lines.next_segment().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            // What was read before is still published.
            Err(error) => {
                read_error = Some(format!("reading stdin after line {number}: {error}"));
                break;
            }
        };
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let envelope: Envelope = match serde_json::from_slice(&line) {
            Ok(envelope) => envelope,
            Err(error) => {
                eprintln!("tap: line {number}: not an envelope, skipped: {error}");
                tally.unread += 1;
                continue;
            }
        };
        // Checked here: the target refuses such a topic before it counts a publish, and the
        // tally of what failed once dispatched (below, in `publish`) rests on those counts.
        let topic_len = envelope.r#type.len() + 1 + envelope.id.len();
        if let Err(error) = check_topic_len(topic_len, || format!("line {number}")) {
            eprintln!("tap: not an envelope this tool publishes, skipped: {error}");
            tally.unread += 1;
            continue;
        }
        // Each line is published once the next is read (the last one is confirmed), so an
        // error names the line of the envelope that failed.
        if let Some((line, previous)) = last.replace((number, envelope)) {
            outcome(&mut tally, line, events.dispatch_event(previous).await)?;
        }
    }
    // Confirming the last one confirms them all: flushes complete in order.
    if let Some((line, envelope)) = last {
        outcome(&mut tally, line, events.dispatch_confirmed(envelope).await)?;
    }
    match read_error {
        Some(error) => Err(error),
        None => Ok(tally),
    }
}
