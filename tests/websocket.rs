//! The WebSocket transport over real sockets on loopback.

use std::time::Duration;

use alkdev_pubsub::layers::{Backoff, CodecLayer, ParseErrorLayer, ReconnectLayer};
use alkdev_pubsub::testkit::{self, number_of, numbered};
use alkdev_pubsub::websocket::{self, WebSocketConfig, WebSocketListener, WebSocketTransport};
use alkdev_pubsub::{Command, Envelope, EventTarget, Gap, SubscribeOptions, Topic, Up};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceBuilder;

mod common;

const WAIT: Duration = Duration::from_secs(20);

/// A server that sends every envelope a connection publishes back to that connection. Its
/// connections end with it.
async fn echo_server(listener: WebSocketListener) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((transport, _peer)) = listener.accept().await else {
            return;
        };
        connections.spawn(async move {
            let mut transport = ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .service(transport);
            while let Some(Ok(up)) = transport.next().await {
                if let Up::Message { message, .. } = up {
                    let envelope: Envelope = message;
                    let command = Command::Publish {
                        topic: envelope.topic(),
                        message: envelope,
                    };
                    if transport.send(command).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

async fn start_echo_server() -> String {
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    tokio::spawn(echo_server(listener));
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_and_the_exact_frame_on_the_wire() {
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());

    // A raw tokio-tungstenite client, as a browser or the JavaScript peer would be.
    let raw_client =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 });
    let (server, _peer): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut raw = raw_client.await.unwrap();

    // Peer -> us: the seed's JSON reaches our listeners.
    let mut statuses = server.subscribe("session.status:p1").await.unwrap();
    let json = r#"{"type":"session.status","id":"p1","payload":{"a":1}}"#;
    raw.send(Message::text(json)).await.unwrap();
    assert_eq!(
        *testkit::next_event(&mut statuses).await,
        Envelope::new("session.status", "p1", json!({ "a": 1 }))
    );

    // Us -> peer: one text frame holding exactly the envelope.
    server
        .dispatch_confirmed(Envelope::new("session.status", "p1", json!({ "a": 1 })))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, raw.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        Message::Text(text) => assert_eq!(text.as_str(), json),
        other => panic!("expected one text frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_transport_round_trips_through_a_server() {
    let url = start_echo_server().await;
    let client: EventTarget =
        websocket::event_target(WebSocketTransport::connect(&url).await.unwrap());
    let mut events = client.subscribe("echo:1").await.unwrap();
    for n in 0..50 {
        client
            .dispatch_event(numbered("echo", "1", n))
            .await
            .unwrap();
    }
    for n in 0..50 {
        assert_eq!(number_of(&testkit::next_event(&mut events).await), n);
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_none_lost_none_misdelivered() {
    const CLIENTS: usize = 200;
    const EVENTS: u64 = 100;
    let url = start_echo_server().await;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let events: EventTarget =
                websocket::event_target(WebSocketTransport::connect(&url).await.unwrap());
            let id = format!("c{c}");
            let mut mine = events
                .subscribe_with(
                    Topic::of("load", &id),
                    SubscribeOptions::new().capacity(EVENTS as usize),
                )
                .await
                .unwrap();
            for n in 0..EVENTS {
                events
                    .dispatch_event(numbered("load", &id, n))
                    .await
                    .unwrap();
            }
            for n in 0..EVENTS {
                let event = testkit::next_event(&mut mine).await;
                assert_eq!((event.id.as_str(), number_of(&event)), (id.as_str(), n));
            }
            let stats = events.stats();
            assert_eq!(stats.unrouted, 0, "{id}: got events of another connection");
            events.close().await;
            stats.delivered
        }));
    }
    let mut delivered = 0;
    for client in clients {
        delivered += client.await.unwrap();
    }
    assert_eq!(delivered, CLIENTS as u64 * EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_skipped_and_counted_and_the_connection_stays() {
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let raw_client =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut raw = raw_client.await.unwrap();
    let mut subscription = server.subscribe("m:1").await.unwrap();
    let good = |n: u64| Message::text(serde_json::to_string(&numbered("m", "1", n)).unwrap());
    raw.send(Message::text("{ this is not json")).await.unwrap();
    raw.send(good(1)).await.unwrap();
    raw.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef, 0x00]))
        .await
        .unwrap();
    raw.send(good(2)).await.unwrap();
    raw.send(Message::binary(
        b"{\"type\":\"m\",\"id\":\"\xff\xfe\"}".to_vec(),
    ))
    .await
    .unwrap();
    raw.send(good(3)).await.unwrap();
    for n in 1..=3 {
        assert_eq!(number_of(&testkit::next_event(&mut subscription).await), n);
    }
    assert_eq!(server.stats().decode_errors, 3);
    assert!(!server.is_closed(), "the connection stays");
    // A binary frame holding a good envelope is accepted too.
    raw.send(Message::binary(
        serde_json::to_vec(&numbered("m", "1", 4)).unwrap(),
    ))
    .await
    .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut subscription).await), 4);
}

/// A text message that is not UTF-8 breaks the WebSocket protocol (a binary frame with the
/// same bytes is only undecodable, above): the connection ends, and the peer is told why with
/// code 1007 (it saw the socket drop, 1006 in a browser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_that_is_not_utf8_is_answered_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let (server, mut raw) = server_and_raw_peer(WebSocketConfig::new()).await;
    let mut subscription = server.subscribe("u:1").await.unwrap();
    let bad = Frame::message(
        &b"{\"type\":\"u\",\"id\":\"\xff\"}"[..],
        OpCode::Data(Data::Text),
        true,
    );
    raw.send(Message::Frame(bad)).await.unwrap();
    let close = loop {
        match tokio::time::timeout(WAIT, raw.next())
            .await
            .expect("the server answers")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|frame| frame.code), Some(CloseCode::Invalid));
    // The server's side ends, saying why.
    testkit::next_end(&mut subscription).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_with_1009() {
    let listener = WebSocketListener::from_listener(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        WebSocketConfig::new().max_message_size(64 * 1024),
    );
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let raw_client =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut raw = raw_client.await.unwrap();
    let mut subscription = server.subscribe("big:1").await.unwrap();
    let _ = raw.send(Message::text("x".repeat(100 * 1024))).await;
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match raw.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        u16::from(close.expect("a close frame with a code").code),
        1009
    );
    assert!(tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .is_none());
    assert!(server.is_closed());
    let error = server
        .dispatch_event(numbered("big", "1", 0))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("over the limit of 65536"),
        "{error}"
    );
}

/// A raw tungstenite peer, connected to an event target served with `config`.
async fn server_and_raw_peer(
    config: WebSocketConfig,
) -> (
    EventTarget,
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) {
    let listener =
        WebSocketListener::from_listener(TcpListener::bind("127.0.0.1:0").await.unwrap(), config);
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let raw_client =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.unwrap().0 });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    (server, raw_client.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_detected_by_keepalive() {
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(100))
        .idle_timeout(Duration::from_millis(500));
    // The peer completes the handshake, then goes silent: it never reads, so never pongs.
    let (server, silent_peer) = server_and_raw_peer(config).await;
    let peer_address = match silent_peer.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap(),
        _ => unreachable!("ws://"),
    };
    let mut subscription = server.subscribe("gone:1").await.unwrap();
    let end = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap();
    assert!(
        end.is_none(),
        "the subscription ends when the peer is declared gone"
    );
    let error = server
        .dispatch_event(numbered("gone", "1", 0))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("sent nothing"), "{error}");
    // It names the peer, as a hub's log needs to.
    assert!(
        error
            .to_string()
            .contains(&format!("peer at {peer_address}")),
        "{error}"
    );
    drop(silent_peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spoke_reconnects_when_the_hub_restarts() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = tcp.local_addr().unwrap();
    let hub = tokio::spawn(echo_server(WebSocketListener::from_listener(
        tcp,
        WebSocketConfig::new(),
    )));

    let url = format!("ws://{address}/");
    let spoke: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(
                Backoff::new()
                    .initial(Duration::from_millis(20))
                    .max(Duration::from_millis(200)),
            ))
            .service(move || WebSocketTransport::connect(url.clone())),
    );
    let mut events = spoke.subscribe("spoke:1").await.unwrap();
    spoke
        .dispatch_event(numbered("spoke", "1", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut events).await), 1);

    // The hub goes away (its listener and every connection), then comes back on the port.
    hub.abort();
    let _ = hub.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tcp = TcpListener::bind(address).await.unwrap();
    tokio::spawn(echo_server(WebSocketListener::from_listener(
        tcp,
        WebSocketConfig::new(),
    )));

    assert_eq!(testkit::next_gap(&mut events).await, Gap::Reconnected);
    spoke
        .dispatch_event(numbered("spoke", "1", 2))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut events).await), 2);
    assert_eq!(spoke.stats().reconnects, 1);
}

/// A publish over the size limit fails alone, before it is sent: the peer would close the
/// connection over it (1009), and behind a reconnect layer it would be sent again on every
/// new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_publish_fails_alone_and_the_connection_goes_on() {
    let url = start_echo_server().await;
    let config = WebSocketConfig::new().max_message_size(1024);
    let factory = move || config.clone().connect(url.clone());
    let client: EventTarget = EventTarget::new(
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .layer(ReconnectLayer::new(Backoff::new()))
            .service(factory),
    );
    let mut events = client.subscribe("size:1").await.unwrap();
    let big = Envelope::new("size", "1", json!({ "n": 0, "pad": "x".repeat(2048) }));
    let error = client.dispatch_confirmed(big).await.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");
    assert!(
        error.to_string().contains("over the limit of 1024"),
        "{error}"
    );
    client
        .dispatch_confirmed(numbered("size", "1", 1))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut events).await), 1);
    assert_eq!(client.stats().reconnects, 0, "the connection went on");
}

/// The first ping goes out in time too: with an idle timeout shorter than the ping interval, a
/// quiet, healthy peer must not be declared gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_healthy_peer_outlives_an_idle_timeout_shorter_than_the_ping_interval() {
    let url = start_echo_server().await;
    // Pings every second (half the idle timeout): the echo server has a second to answer
    // each, however busy the machine; three idle timeouts pass quietly.
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(60))
        .idle_timeout(Duration::from_secs(2));
    let client: EventTarget = websocket::event_target(config.connect(&url).await.unwrap());
    let mut events = client.subscribe("quiet:1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!client.is_closed(), "the quiet peer answered the pings");
    client
        .dispatch_event(numbered("quiet", "1", 7))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut events).await), 7);
}

/// A transport split into a writing and a reading half, each in its own task (as a hub does):
/// a ping the reading half sends while the writing half waits for room must not take the
/// writing half's wake-up, or the writer sleeps for good once the peer reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_from_the_reading_half_does_not_strand_the_writing_half() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    const MESSAGES: usize = 200;
    let (ours, theirs) = tokio::io::duplex(256);
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(10))
        .idle_timeout(Duration::from_secs(30));
    let transport = WebSocketTransport::from_raw_socket(ours, Role::Client, config).await;
    let mut peer =
        tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
    let (mut sink, mut stream) = transport.split();
    let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
    let writer = tokio::spawn(async move {
        for n in 0..MESSAGES {
            let frame = format!(
                r#"{{"type":"w","id":"1","payload":{{"n":{n},"pad":"{}"}}}}"#,
                "x".repeat(100)
            );
            sink.send(Command::Publish {
                topic: Topic::from("w:1"),
                message: bytes::Bytes::from(frame),
            })
            .await
            .unwrap();
        }
    });
    // The pipe fills at once; the reading half pings meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut received = 0;
    tokio::time::timeout(WAIT, async {
        while received < MESSAGES {
            match peer.next().await {
                Some(Ok(Message::Text(_))) => received += 1,
                Some(Ok(_)) => {}
                other => panic!("expected the writer's frames, got {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the writer stalled after {received} of {MESSAGES} frames"));
    tokio::time::timeout(WAIT, writer)
        .await
        .expect("the writer finished")
        .unwrap();
    reader.abort();
}

/// A server that answers every connection's handshake with `status`, then closes it.
async fn refusing_server(status: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            // The whole request is read first: closing with some of it unread would reset
            // the connection, and the client would see that instead of the answer.
            let mut request = Vec::new();
            let mut chunk = [0; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => request.extend_from_slice(&chunk[..read]),
                }
            }
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_or_a_bad_url_is_given_up_at_once_and_a_busy_server_is_retried() {
    for url in ["http://127.0.0.1:1/", "ws:///events", "not a url"] {
        let error = WebSocketTransport::connect(url).await.unwrap_err();
        assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Config, "{error}");
        assert!(error.to_string().contains(url), "{error}");
    }
    // The request itself refused: for good.
    for status in [
        "400 Bad Request",
        "401 Unauthorized",
        "403 Forbidden",
        "405 Method Not Allowed",
        "426 Upgrade Required",
        "301 Moved Permanently",
        "308 Permanent Redirect",
    ] {
        let refusing = refusing_server(status).await;
        let error = WebSocketTransport::connect(&refusing).await.unwrap_err();
        assert_eq!(
            error.kind(),
            alkdev_pubsub::ErrorKind::Rejected,
            "{status}: {error}"
        );
        assert!(error.is_permanent(), "{status}: {error}");
        assert!(error.to_string().contains(&status[..3]), "{error}");
    }
    let forbidden = refusing_server("403 Forbidden").await;
    // A 404 may be a proxy whose backend is not up yet, a 503 one not ready, a 307 a
    // redirect for now: they may pass.
    for status in [
        "404 Not Found",
        "503 Service Unavailable",
        "307 Temporary Redirect",
    ] {
        let missing = refusing_server(status).await;
        let error = WebSocketTransport::connect(&missing).await.unwrap_err();
        assert_eq!(
            error.kind(),
            alkdev_pubsub::ErrorKind::Connect,
            "{status}: {error}"
        );
        assert!(!error.is_permanent(), "{status}: {error}");
    }

    let stack = |url: String, attempts: Option<u32>| -> EventTarget {
        EventTarget::new(
            ServiceBuilder::new()
                .layer(ParseErrorLayer::skip())
                .layer(CodecLayer::json())
                .layer(ReconnectLayer::new(
                    Backoff::new()
                        .initial(Duration::from_millis(2))
                        .max(Duration::from_millis(5))
                        .max_attempts(attempts),
                ))
                .service(move || WebSocketTransport::connect(url.clone())),
        )
    };
    // Refused for good: the first command fails with the server's answer, without retries.
    let events = stack(forbidden, None);
    let error = tokio::time::timeout(WAIT, events.dispatch_confirmed(numbered("w", "1", 0)))
        .await
        .expect("not retried for ever")
        .unwrap_err();
    assert!(error.to_string().contains("403"), "{error}");
    assert!(
        error.to_string().contains("retrying cannot succeed"),
        "{error}"
    );
    // 429 may pass: retried until the layer's attempts run out.
    let busy = refusing_server("429 Too Many Requests").await;
    let events = stack(busy, Some(3));
    let error = tokio::time::timeout(WAIT, events.dispatch_confirmed(numbered("w", "1", 0)))
        .await
        .expect("gives up after 3 attempts")
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("gave up after 3 connection attempts"),
        "{error}"
    );
}

/// A server that checks the handshake's `Origin` refuses a page of another origin (a browser
/// would let it connect): the client gets `403` with the reason, and the server's `accept`
/// fails naming it; the allowed origin and a client that sends none (not a browser) connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_check_refuses_a_foreign_origin() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let config = WebSocketConfig::new().check_request(|request| {
        match request.headers().get("origin").map(|o| o.as_bytes()) {
            None | Some(b"https://app.example") => Ok(()),
            Some(other) => Err(format!(
                "origin {} not allowed",
                String::from_utf8_lossy(other)
            )),
        }
    });
    let listener = WebSocketListener::bind_with("127.0.0.1:0", config)
        .await
        .unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let from = |origin: &'static str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };

    let refused = tokio::spawn(from("https://evil.example"));
    let error = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .map(|(_, peer)| peer)
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");
    assert!(
        error
            .to_string()
            .contains("origin https://evil.example not allowed"),
        "{error}"
    );
    // The kind is said once (it said "refused by the peer: from …: refused by the peer: …",
    // of a refusal this side made).
    assert!(
        error.to_string().starts_with("refused: from 127.0.0.1:"),
        "{error}"
    );
    assert_eq!(error.to_string().matches("refused:").count(), 1, "{error}");
    match refused.await.unwrap() {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert!(body.contains("not allowed"), "{body}");
        }
        other => panic!("the foreign page connected: {:?}", other.map(|_| ())),
    }

    let allowed = tokio::spawn(from("https://app.example"));
    let (_server, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .expect("the allowed origin connects");
    allowed.await.unwrap().expect("the allowed origin connects");
    let no_origin = tokio::spawn(WebSocketTransport::connect(url.clone()));
    let (_server, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .expect("a client without an origin connects");
    no_origin
        .await
        .unwrap()
        .expect("a client without an origin");
}

#[tokio::test]
async fn a_listener_that_cannot_bind_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = taken.local_addr().unwrap();
    let error = WebSocketListener::bind(address).await.unwrap_err();
    assert!(error.to_string().contains(&address.to_string()), "{error}");
    // No port: refused before any lookup (a test sends nothing off this machine).
    let error = WebSocketListener::bind("localhost").await.unwrap_err();
    assert!(error.to_string().contains("did not resolve"), "{error}");
}

/// A peer that connects and never says a word holds up no one: `accept` returns the next
/// peer's connection while the silent one's handshake waits out its (here long) timeout, and
/// then reports that one's failure, naming the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_does_not_hold_up_the_next_handshake() {
    let listener = WebSocketListener::from_listener(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        WebSocketConfig::new().handshake_timeout(Duration::from_secs(3)),
    );
    let address = listener.local_addr().unwrap();
    let silent = tokio::net::TcpStream::connect(address).await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    // The listener takes the silent connection first, then the real one.
    let url = format!("ws://{address}/");
    let client = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        WebSocketTransport::connect(url).await.unwrap()
    });
    // The first connection out of `accept` is the second peer's, not the silent one's
    // failure three seconds on.
    let (server, peer): (EventTarget, _) =
        tokio::time::timeout(WAIT, listener.accept_event_target())
            .await
            .unwrap()
            .expect("the second peer, whose handshake was done first");
    assert_ne!(peer, silent_address);
    let _client = client.await.unwrap();
    // The silent peer's handshake fails on its own, and says whose it was.
    let error = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the silent handshake times out")
        .map(|(_, peer)| peer)
        .unwrap_err();
    assert!(
        error.to_string().contains(&silent_address.to_string())
            && error.to_string().contains("no handshake within 3s"),
        "{error}"
    );
    drop((server, silent));
}

/// Publishes 32 KiB events on `flood:{id}` until one fails, which must say the peer read
/// nothing (sending stalled) within the test's wait.
async fn publish_until_declared_stalled(server: &EventTarget, id: &str) {
    let payload = json!({ "pad": "x".repeat(32 * 1024) });
    let (n, error) = tokio::time::timeout(WAIT, async {
        for n in 0.. {
            let envelope = Envelope::new("flood", id, payload.clone());
            if let Err(error) = server.dispatch_event(envelope).await {
                return (n, error);
            }
        }
        unreachable!()
    })
    .await
    .expect("publishing fails once the peer is declared gone");
    assert!(
        error.to_string().contains("read nothing"),
        "after {n} publishes: {error}"
    );
}

/// As many silent connections as the listener runs handshakes at once do not keep the next
/// peer out for a handshake timeout: its connection drops the oldest silent handshake, which
/// `accept` reports as that connection's error, and its own handshake goes through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_filling_the_handshakes_do_not_keep_the_next_peer_out() {
    const PENDING: usize = 8;
    let listener = WebSocketListener::from_listener(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        WebSocketConfig::new().handshake_timeout(Duration::from_secs(30)),
    )
    .max_pending_handshakes(PENDING);
    let address = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            let outcome = listener.accept().await.map(|(_, peer)| peer);
            if accepted_tx.send(outcome).is_err() {
                return;
            }
        }
    });
    let mut silent = Vec::new();
    for _ in 0..PENDING {
        silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    // Give the acceptor time to take them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        WebSocketTransport::connect(format!("ws://{address}/")),
    )
    .await
    .expect("the peer is let in before the silent ones time out")
    .unwrap();
    let client_address = client.get_ref().get_ref();
    let client_address = match client_address {
        tokio_tungstenite::MaybeTlsStream::Plain(stream) => stream.local_addr().unwrap(),
        _ => unreachable!("ws://"),
    };
    let mut outcomes = Vec::new();
    while !outcomes
        .iter()
        .any(|outcome| outcome == &Ok(client_address))
    {
        let outcome = tokio::time::timeout(WAIT, accepted.recv())
            .await
            .unwrap()
            .unwrap()
            .map_err(|error| error.to_string());
        outcomes.push(outcome);
    }
    let dropped: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(dropped.len(), 1, "{outcomes:?}");
    assert!(
        dropped[0].contains("dropped for a newer connection (8 handshakes were under way)"),
        "{dropped:?}"
    );
    acceptor.abort();
    drop((client, silent));
}

/// A peer that pings but never reads: once what the server sends fills the socket, sending
/// waits for the peer, and after the idle timeout the peer is declared gone (its pings kept
/// the connection looking alive, and every publish waited for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_pings_but_never_reads_is_declared_gone() {
    // Loose enough that a loaded machine does not take the peer for silent instead.
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(500))
        .idle_timeout(Duration::from_secs(3));
    let (server, peer) = server_and_raw_peer(config).await;
    let (mut pinging, reading) = peer.split();
    // The peer's write half pings every 100 ms; its read half is never polled.
    let pinger = tokio::spawn(async move {
        while pinging.send(Message::Ping(Vec::new().into())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    publish_until_declared_stalled(&server, "1").await;
    assert!(server.is_closed());
    pinger.abort();
    drop(reading);
}

/// A peer that reads slowly but steadily is alive: sending waits for it again and again, each
/// wait shorter than the idle timeout, and the pings that find the sink busy go out with the
/// next frame rather than never. (The wait was timed from the first one, and the connection
/// declared stalled one idle timeout into a steady stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_slowly_but_steadily_is_kept() {
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(400))
        .idle_timeout(Duration::from_secs(2));
    // Socket buffers of 32 KiB on both ends, as over a slow link: what is sent waits for the
    // peer within milliseconds.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(32 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = WebSocketListener::from_listener(socket.listen(16).unwrap(), config);
    let address = listener.local_addr().unwrap();
    let raw_client = tokio::spawn(async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(32 * 1024).unwrap();
        let stream = socket.connect(address).await.unwrap();
        let url = format!("ws://{address}/");
        tokio_tungstenite::client_async(url, stream)
            .await
            .unwrap()
            .0
    });
    let (server, _): (EventTarget, _) = listener.accept_event_target().await.unwrap();
    let mut peer = raw_client.await.unwrap();
    let publishing = tokio::time::Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    // The peer reads a frame per millisecond at most (about 1 MiB/s of 1 KiB frames), and
    // sends nothing but the pongs its reads answer.
    let reader = tokio::spawn(async move {
        let mut frames = 0u64;
        let mut last = started;
        while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, peer.next()).await {
            if message.is_text() {
                frames += 1;
                last = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if last.duration_since(started) > publishing + Duration::from_secs(1) {
                break;
            }
        }
        (frames, last.duration_since(started))
    });
    let payload = json!({ "pad": "x".repeat(1024) });
    let mut n = 0u64;
    while started.elapsed() < publishing {
        server
            .dispatch_event(Envelope::new("slow", "1", payload.clone()))
            .await
            .unwrap_or_else(|error| panic!("publish {n} after {:?}: {error}", started.elapsed()));
        n += 1;
    }
    assert!(!server.is_closed(), "the peer was declared gone");
    server.close().await;
    let (frames, last) = reader.await.unwrap();
    assert!(
        last > publishing,
        "the peer got {frames} frames, the last {last:?} in"
    );
}

/// Sends envelopes on `flood:in` as fast as the socket takes them, 64 to a flush, until the
/// connection fails.
async fn flood<S>(mut flooding: S)
where
    S: futures::Sink<Message> + Unpin,
{
    let frame = serde_json::to_string(&numbered("flood", "in", 0)).unwrap();
    loop {
        for _ in 0..64 {
            if flooding.feed(Message::text(frame.clone())).await.is_err() {
                return;
            }
        }
        if flooding.flush().await.is_err() {
            return;
        }
    }
}

/// A peer that floods the connection and never reads: the reading side never finds the socket
/// empty, and the liveness checks still run, so the peer is declared gone after the idle
/// timeout rather than every publish waiting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_floods_and_never_reads_is_declared_gone() {
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(200))
        .idle_timeout(Duration::from_secs(1));
    let (server, peer) = server_and_raw_peer(config).await;
    // A listener slower than the flood: the socket always has more to read.
    server
        .add_event_listener("flood:in", |_| {
            std::thread::sleep(Duration::from_micros(20))
        })
        .unwrap();
    let (flooding, reading) = peer.split();
    let flooder = tokio::spawn(flood(flooding));
    publish_until_declared_stalled(&server, "out").await;
    flooder.abort();
    drop(reading);
}

/// Closing waits for the peer's close frame (the close handshake), reading what the peer still
/// sends meanwhile: the socket is then dropped with nothing unread, so the kernel ends it with
/// a FIN, not a reset that would throw away what was still on its way to the peer, the close
/// frame included. The peer here sends steadily and reads slowly; it gets every frame
/// published before the close, then the close frame, and no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_waits_for_the_peers_close_frame_and_resets_nothing() {
    for round in 0..3 {
        let config = WebSocketConfig::new().max_message_size(4 << 20);
        let (server, peer) = server_and_raw_peer(config).await;
        let (mut sending, mut reading) = peer.split();
        let chatter = serde_json::to_string(&numbered("chatter", "1", 0)).unwrap();
        let sender = tokio::spawn(async move {
            while sending.send(Message::text(chatter.clone())).await.is_ok() {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
        // The peer reads a frame a millisecond at most.
        let reader = tokio::spawn(async move {
            let mut texts = 0;
            let end = loop {
                match tokio::time::timeout(WAIT, reading.next())
                    .await
                    .expect("the peer hears the end")
                {
                    Some(Ok(Message::Text(_))) => {
                        texts += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Some(Ok(Message::Close(frame))) => break Ok(frame),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break Err(error.to_string()),
                    None => break Err("the stream ended without a close frame".to_owned()),
                }
            };
            (texts, end)
        });
        // Enough to be still on its way when the close starts.
        let pad = json!({ "pad": "x".repeat(32 << 10) });
        for _ in 0..200 {
            server
                .dispatch_event(Envelope::new("big", "1", pad.clone()))
                .await
                .unwrap();
        }
        server.close().await;
        let (texts, end) = reader.await.unwrap();
        let frame = end.unwrap_or_else(|end| panic!("round {round}: after {texts} frames: {end}"));
        // A normal closure, as a browser would report it (1000, not 1005 "no status").
        assert_eq!(
            frame.map(|frame| frame.code),
            Some(tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal),
            "round {round}"
        );
        assert_eq!(texts, 200, "round {round}");
        sender.abort();
    }
}

/// A transport split into a writing and a reading half, each in its own task: the writing half
/// closes while the reading half waits for the next frame. The close reads the peer's answer
/// on the socket both halves share; the reading half must not lose its wake-up to it, and its
/// stream ends cleanly once the close is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_writing_half_ends_the_reading_half_cleanly() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    // No ping before the test's wait is over: only the close can wake the reading half.
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(60));
    let transport = WebSocketTransport::from_raw_socket(ours, Role::Client, config).await;
    let peer =
        tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
    // The peer reads (and so answers the close frame), and sends nothing.
    let peer = tokio::spawn(async move {
        let mut peer = peer;
        while let Some(Ok(_)) = peer.next().await {}
    });
    let (mut sink, mut stream) = transport.split();
    let reader = tokio::spawn(async move {
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(format!("{item:?}"));
        }
        items
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(3), sink.close())
        .await
        .expect("the close is answered")
        .unwrap();
    let items = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .expect("the reading half ends with the close")
        .unwrap();
    assert!(items.is_empty(), "a clean end, not {items:?}");
    tokio::time::timeout(WAIT, peer).await.unwrap().unwrap();
}

/// The connection ends while a publish waits unflushed: closing the sink then reports the
/// failure (the publish is lost); a close with everything flushed before the end is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_after_the_connection_ended_reports_publishes_it_lost() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    for lost in [true, false] {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let config = WebSocketConfig::new()
            .ping_interval(Duration::from_secs(30))
            .idle_timeout(Duration::from_secs(60));
        let mut transport = WebSocketTransport::from_raw_socket(ours, Role::Client, config).await;
        let mut peer =
            tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
        transport
            .feed(Command::Publish {
                topic: Topic::from("t:1"),
                message: "{}".into(),
            })
            .await
            .unwrap();
        if !lost {
            transport.flush().await.unwrap();
            let frame = tokio::time::timeout(WAIT, peer.next()).await.unwrap();
            assert_eq!(frame.unwrap().unwrap(), Message::text("{}"));
        }
        // The peer vanishes: the reading side finds the connection over.
        drop(peer);
        let failure = tokio::time::timeout(WAIT, transport.next())
            .await
            .unwrap()
            .expect("the end is reported")
            .unwrap_err();
        let closed = tokio::time::timeout(WAIT, transport.close()).await.unwrap();
        if lost {
            let error = closed.expect_err("a publish was lost");
            assert_eq!(error.kind(), failure.kind(), "{error}");
        } else {
            closed.expect("nothing was lost");
        }
    }
}

/// A peer that keeps sending and never answers the close frame: closing gives up waiting for
/// its answer after 5 s, though the socket never runs dry meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_gives_up_on_a_peer_that_floods_and_never_answers() {
    let (server, peer) = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            tokio_tungstenite::connect_async(format!("ws://{address}/"))
                .await
                .unwrap()
                .0
        });
        let (stream, _) = listener.accept().await.unwrap();
        let server = WebSocketTransport::accept(stream).await.unwrap();
        (server, peer.await.unwrap())
    };
    let (flooding, reading) = peer.split();
    let flooder = tokio::spawn(flood(flooding));
    let mut server = server;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(15), server.close())
        .await
        .expect("closing gives up on the peer")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(4), "closed after {took:?}");
    flooder.abort();
    drop(reading);
}

/// The conformance suite, over a WebSocket: a client target publishes, the target its
/// connection was accepted as listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_passes_the_conformance_suite() {
    testkit::run_all(|| async {
        let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let accepting = tokio::spawn(async move { listener.accept_event_target().await });
        let client: EventTarget =
            websocket::event_target(WebSocketTransport::connect(&url).await.unwrap());
        let (server, _) = accepting.await.unwrap().unwrap();
        testkit::Pair::new(client, server)
    })
    .await;
}

/// Our transport (`role`) and a raw tungstenite peer over an in-memory pipe that holds
/// `buffer` bytes each way.
async fn over_a_pipe(
    role: tokio_tungstenite::tungstenite::protocol::Role,
    buffer: usize,
    config: WebSocketConfig,
) -> (
    WebSocketTransport<tokio::io::DuplexStream>,
    tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
) {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (ours, theirs) = tokio::io::duplex(buffer);
    let theirs_role = match role {
        Role::Client => Role::Server,
        Role::Server => Role::Client,
    };
    let transport = WebSocketTransport::from_raw_socket(ours, role, config).await;
    let peer = tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, theirs_role, None).await;
    (transport, peer)
}

/// [`over_a_pipe`] of 4 KiB each way, with an 8 KiB publish fed: the socket is full (the
/// flush waits for a peer that never reads).
async fn over_a_full_pipe(
    role: tokio_tungstenite::tungstenite::protocol::Role,
    config: WebSocketConfig,
) -> (
    WebSocketTransport<tokio::io::DuplexStream>,
    tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
) {
    let (mut transport, peer) = over_a_pipe(role, 4096, config).await;
    transport
        .feed(Command::Publish {
            topic: Topic::from("t:1"),
            message: vec![b'x'; 8192].into(),
        })
        .await
        .unwrap();
    (transport, peer)
}

fn publish(n: u64) -> Command<bytes::Bytes> {
    Command::Publish {
        topic: Topic::from("t:1"),
        message: serde_json::to_vec(&numbered("t", "1", n)).unwrap().into(),
    }
}

/// A peer that hangs once the socket is full (it neither reads nor answers pings): small
/// publishes now and then, each flushed (which waits), each of which finds tungstenite's buffer
/// with room, do not count as the peer reading. It is declared gone after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_peer_is_declared_gone_though_small_publishes_find_room() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_millis(100))
        .idle_timeout(Duration::from_millis(500));
    let (transport, hung) = over_a_pipe(Role::Server, 4096, config).await;
    let (mut sink, mut stream) = transport.split();
    let reader = tokio::spawn(async move { stream.next().await });
    // Fills the pipe: the flush waits for a peer that never reads.
    sink.feed(Command::Publish {
        topic: Topic::from("t:1"),
        message: vec![b'x'; 8192].into(),
    })
    .await
    .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sink.flush())
            .await
            .is_err(),
        "the pipe is full"
    );
    let started = tokio::time::Instant::now();
    let mut n = 0;
    let end = loop {
        if reader.is_finished() {
            break reader.await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still taken for alive after {n} small publishes"
        );
        if sink.feed(publish(n)).await.is_err() {
            break tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
        }
        n += 1;
        // As an event target's driver does: flush after each publish (it waits, as the
        // first did).
        let _ = tokio::time::timeout(Duration::from_millis(50), sink.flush()).await;
    };
    let error = end.expect("an error ends the stream").unwrap_err();
    assert!(
        error.to_string().contains("read nothing") || error.to_string().contains("sent nothing"),
        "{error}"
    );
    drop(hung);
}

/// A peer that never reads our close frame does not keep the close waiting for ever: it fails
/// with a timeout once the close has taken 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_peer_never_reads_gives_up_in_time() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(60));
    let (mut transport, silent) = over_a_full_pipe(Role::Client, config).await;
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(WAIT, transport.close())
        .await
        .expect("the close gives up in time");
    let error = closed.unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Timeout, "{error}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// A close handshake the server starts ends the client's stream cleanly, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_server_starts_ends_the_clients_stream_cleanly() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(60));
    let (mut transport, mut server) = over_a_pipe(Role::Client, 64 * 1024, config).await;
    let server = tokio::spawn(async move {
        server.close(None).await.unwrap();
        // Reads the client's answer, then drops the connection.
        while let Some(Ok(_)) = server.next().await {}
    });
    let end = tokio::time::timeout(WAIT, transport.next()).await.unwrap();
    assert!(end.is_none(), "a clean end, not {end:?}");
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    // The sink says why it is done.
    let error = transport.send(publish(1)).await.unwrap_err();
    assert!(error.to_string().contains("peer closed"), "{error}");
}

/// A listener with no cap on its handshakes accepts (the cap's arithmetic overflowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_a_handshake_cap_accepts() {
    let listener = WebSocketListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .max_pending_handshakes(usize::MAX);
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let client = tokio::spawn(async move { WebSocketTransport::connect(url).await.unwrap() });
    let (transport, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    drop((transport, client.await.unwrap()));
}

/// A server that closes cleanly, saying why: the client's event target stops, and its calls
/// fail with that reason (not a bare "the stream ended").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_by_the_server_is_the_targets_reason() {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(60));
    let (transport, mut server) = over_a_pipe(Role::Client, 64 * 1024, config).await;
    let events: EventTarget = websocket::event_target(transport);
    let server = tokio::spawn(async move {
        server
            .close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "shutting down".into(),
            }))
            .await
            .unwrap();
        while let Some(Ok(_)) = server.next().await {}
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while !events.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "the target stopped");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let error = events
        .dispatch_event(numbered("t", "1", 0))
        .await
        .unwrap_err();
    // The peer's reason is quoted (escaped: it is the peer's text).
    assert!(
        error.to_string().contains("(code 1001: \"shutting down\")"),
        "{error}"
    );
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
}

/// The hub example (`examples/hub.rs`), run as a user would: an event one spoke sends reaches
/// the other spoke, and never comes back to the one that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_forwards_a_spokes_event_to_the_other_spokes_only() {
    use std::io::BufRead;
    use std::process::{Command as Process, Stdio};

    /// The hub's process, killed (by its handle) when the test ends.
    struct Hub(std::process::Child);
    impl Drop for Hub {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let address = format!("127.0.0.1:{}", testkit::free_port());
    let mut hub = Hub(Process::new(common::example_binary("hub"))
        .args([
            "--listen",
            &address,
            "--allow-origin",
            "http://localhost:8080",
            "chat:general",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    // Its lines, as it prints them.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = hub.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    /// Waits for a line that has `text` in it.
    async fn wait_for_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, text: &str) {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.recv().await {
                if line.contains(text) {
                    return;
                }
            }
            panic!("the hub ended before printing {text:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("the hub did not print {text:?} in time"));
    }
    wait_for_line(&mut lines, "hub listening").await;
    let url = format!("ws://{address}/");
    let spoke = |transport| {
        ServiceBuilder::new()
            .layer(ParseErrorLayer::skip())
            .layer(CodecLayer::json())
            .service(transport)
    };
    let mut alice = spoke(WebSocketTransport::connect(&url).await.unwrap());
    wait_for_line(&mut lines, "spoke 1 connected").await;
    let mut bob = spoke(WebSocketTransport::connect(&url).await.unwrap());
    wait_for_line(&mut lines, "spoke 2 connected").await;

    let next_message = |up: Option<alkdev_pubsub::layers::Result<Up<Envelope>>>| match up {
        Some(Ok(Up::Message { message, .. })) => message,
        other => panic!("expected an event, got {other:?}"),
    };
    let from_alice = Envelope::new("chat", "general", json!({ "from": "alice" }));
    alice
        .send(Command::Publish {
            topic: from_alice.topic(),
            message: from_alice.clone(),
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, bob.next()).await.unwrap();
    assert_eq!(next_message(got), from_alice);
    let from_bob = Envelope::new("chat", "general", json!({ "from": "bob" }));
    bob.send(Command::Publish {
        topic: from_bob.topic(),
        message: from_bob.clone(),
    })
    .await
    .unwrap();
    // Alice's first event is Bob's: her own did not come back to her.
    let got = tokio::time::timeout(WAIT, alice.next()).await.unwrap();
    assert_eq!(next_message(got), from_bob);

    // A topic the hub does not bridge goes nowhere: Bob hears Alice's next bridged event
    // first.
    let unbridged = Envelope::new("call.requested", "w0", json!({ "input": 1 }));
    let bridged = Envelope::new("chat", "general", json!({ "from": "alice", "n": 2 }));
    for envelope in [&unbridged, &bridged] {
        alice
            .send(Command::Publish {
                topic: envelope.topic(),
                message: envelope.clone(),
            })
            .await
            .unwrap();
    }
    let got = tokio::time::timeout(WAIT, bob.next()).await.unwrap();
    assert_eq!(next_message(got), bridged);
    // Counted, and reported.
    wait_for_line(&mut lines, "1 event(s) on topics not bridged dropped").await;

    // A browser page of an origin not allowed is refused; one allowed connects.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let page = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    match page("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign page connected: {:?}", other.map(|_| ())),
    }
    page("http://localhost:8080")
        .await
        .expect("the allowed origin connects");
    drop(hub);
}

/// A peer that never reads is found by the sending side alone: a flush waiting on it fails
/// after the idle timeout though nothing polls the stream (an event target paused by a full
/// `Block` subscription reads nothing), rather than wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waiting_on_a_peer_that_never_reads_fails_though_nobody_reads() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(3600))
        .idle_timeout(Duration::from_millis(300));
    let (mut transport, hung) = over_a_full_pipe(Role::Server, config).await;
    let error = tokio::time::timeout(WAIT, transport.flush())
        .await
        .expect("the stall is found by the flush")
        .unwrap_err();
    assert!(error.to_string().contains("read nothing"), "{error}");
    drop(hung);
}

/// The peer closes while what we sent fills the socket: tungstenite's answer to its close
/// frame waits behind that, and the stream goes on driving it out before it ends (the peer
/// sees a clean close, not a connection that just ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_peer_starts_is_answered_though_the_socket_is_full() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (transport, peer) = over_a_pipe(Role::Server, 4096, WebSocketConfig::new()).await;
    let (mut sink, mut stream) = transport.split();
    let writer = tokio::spawn(async move {
        for n in 0..500 {
            if sink.feed(publish(n)).await.is_err() {
                return;
            }
        }
        let _ = sink.flush().await;
    });
    let (mut peer_sink, mut peer_stream) = peer.split();
    peer_sink.send(Message::Close(None)).await.unwrap();
    // Our side reads the close while the socket is full (the peer reads nothing yet), and
    // ends its stream once the answer is out.
    let reader = tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            assert!(
                matches!(item, Ok(Up::Message { .. })),
                "a clean end: {item:?}"
            );
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut saw_close = false;
    while let Some(Ok(message)) = tokio::time::timeout(WAIT, peer_stream.next())
        .await
        .unwrap()
    {
        if let Message::Close(_) = message {
            saw_close = true;
        }
    }
    assert!(saw_close, "the peer got our answer to its close");
    tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
}

/// Timeouts "disabled" with `Duration::MAX` do not panic when armed (the ping timer, the idle
/// check): the connection works as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_do_not_panic() {
    let url = start_echo_server().await;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::MAX)
        .idle_timeout(Duration::MAX);
    let client: EventTarget = websocket::event_target(config.connect(&url).await.unwrap());
    let mut events = client.subscribe("max:1").await.unwrap();
    for n in 0..3 {
        client
            .dispatch_confirmed(numbered("max", "1", n))
            .await
            .unwrap();
        assert_eq!(number_of(&testkit::next_event(&mut events).await), n);
    }
    tokio::time::timeout(WAIT, client.close()).await.unwrap();
}

/// A stream given to `from_stream` whose write buffer cannot hold one message: that publish
/// is refused alone with `TooLarge` as it is fed (it was held for room and retried for ever,
/// spinning in one poll: the test runs on a thread of its own so that such a spin fails it
/// rather than hang the run), and the next, smaller one goes.
#[test]
fn a_publish_that_never_fits_a_streams_write_buffer_fails_alone() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(publish_that_never_fits());
        let _ = done.send(());
    });
    finished
        .recv_timeout(WAIT)
        .expect("the publish answered, not held for ever");
}

async fn publish_that_never_fits() {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig as Tungstenite};
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let small = Tungstenite::default()
        .write_buffer_size(1024)
        .max_write_buffer_size(4096);
    let stream =
        tokio_tungstenite::WebSocketStream::from_raw_socket(ours, Role::Client, Some(small)).await;
    let mut transport = WebSocketTransport::from_stream(stream, WebSocketConfig::new());
    let mut peer =
        tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
    let publish = |text: String| Command::Publish {
        topic: Topic::from("w:1"),
        message: bytes::Bytes::from(text),
    };
    futures::future::poll_fn(|cx| transport.poll_ready_unpin(cx))
        .await
        .unwrap();
    let error = transport
        .start_send_unpin(publish("x".repeat(8192)))
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::TooLarge, "{error}");
    assert!(
        error.to_string().contains("max_write_buffer_size"),
        "{error}"
    );
    transport.send(publish("small".into())).await.unwrap();
    let got = tokio::time::timeout(WAIT, peer.next()).await.unwrap();
    assert_eq!(got.unwrap().unwrap(), Message::text("small"));
}

/// A pipe end that counts how often it is read (`poll_read` calls).
struct CountedReads {
    inner: tokio::io::DuplexStream,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for CountedReads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedReads {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A task polled for other reasons (a driver woken to flush) does not read the socket again
/// once it found nothing: tungstenite zeroes its 128 KiB read buffer before every read. Once
/// the peer sends, the wake-up lets the frame through, and a ping is answered.
#[tokio::test]
async fn the_socket_is_read_again_only_after_a_wake_up() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::task::Poll;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ours = CountedReads {
        inner: ours,
        reads: reads.clone(),
    };
    let mut transport =
        WebSocketTransport::from_raw_socket(ours, Role::Client, WebSocketConfig::new()).await;
    let mut peer =
        tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Server, None).await;
    let before = reads.load(Relaxed);
    for _ in 0..100 {
        let polled =
            futures::future::poll_fn(|cx| Poll::Ready(transport.poll_next_unpin(cx))).await;
        assert!(polled.is_pending(), "nothing was sent: {polled:?}");
    }
    assert_eq!(
        reads.load(Relaxed) - before,
        1,
        "read once, then not again before a wake-up"
    );
    peer.send(Message::Ping(bytes::Bytes::from_static(b"hi")))
        .await
        .unwrap();
    peer.send(Message::text(r#"{"type":"a","id":"1","payload":null}"#))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, transport.next())
        .await
        .expect("the frame arrives")
        .unwrap()
        .unwrap();
    assert!(
        matches!(&got, Up::Message { message, .. } if message.starts_with(b"{\"type\":\"a\"")),
        "{got:?}"
    );
    let pong = tokio::time::timeout(WAIT, peer.next()).await.unwrap();
    assert_eq!(
        pong.unwrap().unwrap(),
        Message::Pong(bytes::Bytes::from_static(b"hi"))
    );
}

/// A ping read while the socket is full: tungstenite's answer waits for room, and goes out
/// once the peer reads, though the peer sends nothing more and nothing flushes the sink (the
/// reading side is woken by the room, and reads again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pong_owed_while_the_socket_is_full_goes_out_once_the_peer_reads() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let config = WebSocketConfig::new()
        .ping_interval(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(60));
    let (transport, mut peer) = over_a_full_pipe(Role::Client, config).await;
    let (_sink, mut stream) = transport.split();
    peer.send(Message::Ping(bytes::Bytes::from_static(b"owed")))
        .await
        .unwrap();
    // The reading side takes the ping and tries to answer: the pipe is full.
    let polled =
        futures::future::poll_fn(|cx| std::task::Poll::Ready(stream.poll_next_unpin(cx))).await;
    assert!(polled.is_pending(), "{polled:?}");
    // Its next poll finds nothing new; then only the room the peer makes wakes it.
    let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
    let mut frames = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match peer.next().await {
                Some(Ok(Message::Pong(payload))) => {
                    assert_eq!(&payload[..], b"owed");
                    break;
                }
                Some(Ok(other)) => frames.push(other),
                other => panic!("expected the pong, got {other:?}"),
            }
        }
    })
    .await
    .expect("the pong goes out once the peer reads");
    assert_eq!(frames.len(), 1, "the publish, then the pong");
    reader.abort();
}
