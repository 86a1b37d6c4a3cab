//! Interoperability on the wire with the JavaScript design (`@alkdev/pubsub`): a Node.js peer
//! (`tests/js/`, no npm package) runs the JavaScript event targets against ours, over Redis and
//! over a WebSocket, and both sides check what the other wrote, JavaScript's own JSON included
//! (`-0`, `1e+21`, a string cut inside an emoji).
//!
//! Needs `node` (Node.js 18 or later) on PATH; `.ci/run` installs it when missing.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
use alkdev_pubsub::redis::RedisConfig;
use alkdev_pubsub::testkit::RedisServer;
use alkdev_pubsub::websocket::WebSocketListener;
use alkdev_pubsub::{Envelope, EventTarget, Subscription};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tower::ServiceBuilder;

const WAIT: Duration = Duration::from_secs(30);

/// What the peer publishes first (`FROM_JAVASCRIPT` in `tests/js/adapters.mjs`), as we must
/// read it: `-0` is written `0`, and the lone surrogate left by cutting an emoji (`"\ud83d"`)
/// is read as U+FFFD.
fn from_javascript() -> Value {
    json!({
        "text": "héllo wörld — ✓ 😀",
        "cut": "\u{FFFD}",
        "big": 1e21,
        "tiny": 5e-324,
        "negativeZero": 0,
        "sum": 0.1 + 0.2,
        "safe": 9_007_199_254_740_991_u64,
        "nested": { "list": [1, "two", null, true, { "k": [] }] },
        "escapes": "quote\" back\\ nl\n tab\t ctl\u{1} ls\u{2028} ps\u{2029}",
        "empty": "",
    })
}

/// What we publish to the peer, which sends it back as it read it.
fn from_rust() -> Value {
    json!({
        "text": "héllo 😀 \u{2028}",
        "float": 1.5e300,
        "negative": -42,
        "tiny": 5e-324,
        "fraction": 0.1,
        "list": [1, "two", null, true, { "k": "v" }],
        "control": "\u{1}\u{7f}\t\"\\/",
        "empty": {},
    })
}

/// This machine's Node.js, and whether it has a WebSocket client of its own (with the flag
/// [`node`] adds where one is needed).
fn node_version() -> (String, bool) {
    let output = std::process::Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!("`node` not found ({e}): these tests need Node.js 18 or later on PATH")
        });
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        major >= 18,
        "Node.js {version:?} is too old: these tests need 18 or later"
    );
    (version, major >= 21 || (major == 20 && minor >= 10))
}

fn node() -> tokio::process::Command {
    let (version, has_websocket) = node_version();
    let mut command = tokio::process::Command::new("node");
    // Node 20.10 to 21 have their WebSocket client behind a flag (22 and later by default).
    if has_websocket && (version.starts_with("v20.") || version.starts_with("v21.")) {
        command.arg("--experimental-websocket");
    }
    command
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/js")
        .join(name)
}

/// A running JavaScript peer, and what it writes.
struct Peer {
    child: tokio::process::Child,
    stdout: tokio::task::JoinHandle<String>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Peer {
    /// Starts the peer `name` with `args` (and `env`).
    fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Peer {
        let mut child = node()
            .arg(script(name))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let read = |mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>| {
            tokio::spawn(async move {
                let mut text = String::new();
                let _ = from.read_to_string(&mut text).await;
                text
            })
        };
        Peer {
            stdout: read(Box::new(child.stdout.take().unwrap())),
            stderr: read(Box::new(child.stderr.take().unwrap())),
            child,
        }
    }

    /// The next event of `subscription`; fails with what the peer said if it fails first (or
    /// the subscription ends because it did).
    async fn next_event(&mut self, subscription: &mut Subscription) -> Arc<Envelope> {
        let item = tokio::select! {
            biased;
            item = tokio::time::timeout(WAIT, subscription.next()) => item,
            status = self.child.wait() => {
                if !status.as_ref().is_ok_and(|status| status.success()) {
                    self.exited(status).await
                }
                // Done on its side: what it sent is on its way.
                tokio::time::timeout(WAIT, subscription.next()).await
            }
        };
        match item {
            Ok(Some(Ok(event))) => event,
            other => {
                if let Ok(status) = tokio::time::timeout(WAIT, self.child.wait()).await {
                    if !status.as_ref().is_ok_and(|status| status.success()) {
                        self.exited(status).await
                    }
                }
                panic!("{:?}: {other:?}", subscription.topic())
            }
        }
    }

    async fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) -> ! {
        let stderr = (&mut self.stderr).await.unwrap();
        panic!("the JavaScript peer exited ({status:?}) first: {stderr}")
    }

    /// Waits for the peer to exit, successfully; returns what it printed.
    async fn finish(mut self) -> String {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the JavaScript peer exits")
            .unwrap();
        let stdout = self.stdout.await.unwrap();
        let stderr = self.stderr.await.unwrap();
        assert!(
            status.success(),
            "the JavaScript peer failed ({status}): {stdout}{stderr}"
        );
        stdout
    }
}

/// Listens for what the peer sends (before it starts, where its connection does not come
/// first).
struct Listening {
    ready: Subscription,
    reply: Subscription,
    hello: Subscription,
}

async fn listen(target: &EventTarget) -> Listening {
    Listening {
        ready: target.subscribe("js.ready:1").await.unwrap(),
        reply: target.subscribe("js.reply:1").await.unwrap(),
        hello: target.subscribe("js.hello:1").await.unwrap(),
    }
}

/// The exchange, from our side, once the peer says it listens (it says so until it hears from
/// us): we publish on `rust.event:1`, the peer answers with what it read and says hello with
/// JavaScript's own JSON. Returns what the peer printed once it exited.
async fn exchange(target: &EventTarget, mut peer: Peer, listening: Listening) -> String {
    let Listening {
        mut ready,
        mut reply,
        mut hello,
    } = listening;
    peer.next_event(&mut ready).await;

    // Ours, read by JavaScript.
    target
        .dispatch_confirmed(Envelope::new("rust.event", "1", from_rust()))
        .await
        .unwrap();
    let event = peer.next_event(&mut reply).await;
    assert_eq!(
        event.payload,
        json!({ "topic": "rust.event:1", "type": "rust.event", "id": "1", "got": from_rust() }),
        "what the JavaScript peer read"
    );

    // JavaScript's JSON, read by us.
    let event = peer.next_event(&mut hello).await;
    assert_eq!(
        *event,
        Envelope::new("js.hello", "1", from_javascript()),
        "what the JavaScript peer published"
    );

    let said = peer.finish().await;
    // (Over a WebSocket, the peer's first `js.ready` may come before we listen: unrouted.)
    let stats = target.stats();
    assert_eq!((stats.skipped, stats.decode_errors), (0, 0), "{stats:?}");
    drop(ready);
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_redis_peer_and_ours_read_each_other() {
    let server = RedisServer::start();
    let url = server.url();
    // The JavaScript design has no channel prefix: the topic is the channel.
    let events: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(Backoff::default()))
            .service(move || RedisConfig::new().connect(url.clone())),
    );
    let listening = listen(&events).await;
    let peer = Peer::start("redis_peer.mjs", &[&server.port().to_string()], &[]);
    exchange(&events, peer, listening).await;
    events.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_websocket_peer_and_our_listener_read_each_other() {
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    // Node's own WebSocket client where this Node has one, then the small one in
    // `adapters.mjs` (which an older Node uses both times).
    for mini in ["0", "1"] {
        let peer = Peer::start("websocket_peer.mjs", &[&url], &[("MINI_WEBSOCKET", mini)]);
        let (server, _): (EventTarget, _) =
            tokio::time::timeout(WAIT, listener.accept_event_target())
                .await
                .expect("the JavaScript peer connects")
                .unwrap();
        let listening = listen(&server).await;
        let said = exchange(&server, peer, listening).await;
        println!("MINI_WEBSOCKET={mini}: {}", said.trim());
        let (version, has_websocket) = node_version();
        let expected = if mini == "0" && has_websocket {
            "websocket: node"
        } else {
            "websocket: mini"
        };
        assert_eq!(said.trim(), expected, "Node.js {version}");
        server.close().await;
    }
}
