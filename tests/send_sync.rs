//! The public handles are `Send + Sync`, and the futures of the public async API are `Send`
//! for any payload `P: Send + Sync` (and `Clone`, which a typed subscription's stream needs), so that applications can spawn them on a multi-threaded
//! runtime. Checked by the compiler: a future that held a non-`Send` guard across an await
//! would fail to build this file.

use alkdev_pubsub::{
    Envelope, EventTarget, PubSub, SubscribeOptions, Subscription, TypedSubscription,
    WeakEventTarget,
};
use futures::StreamExt;

fn send<T: Send>(value: T) -> T {
    value
}

fn send_sync<T: Send + Sync>() {}

/// Builds (and drops, unpolled) every public future of the event target for any `P`.
fn event_target_futures_are_send<P: Clone + Send + Sync + 'static>(
    events: &EventTarget<P>,
    typed: &PubSub<P>,
    subscription: &mut Subscription<P>,
    typed_subscription: &mut TypedSubscription<P>,
    envelope: impl Fn() -> Envelope<P>,
    payload: impl Fn() -> P,
) {
    send_sync::<EventTarget<P>>();
    send_sync::<WeakEventTarget<P>>();
    send_sync::<PubSub<P>>();
    send_sync::<Subscription<P>>();
    send_sync::<TypedSubscription<P>>();
    drop(send(events.subscribe("t:1")));
    drop(send(events.subscribe_with("t:1", SubscribeOptions::new())));
    drop(send(events.dispatch_event(envelope())));
    drop(send(events.dispatch_confirmed(envelope())));
    drop(send(events.close()));
    drop(send(typed.publish("t", "1", payload())));
    drop(send(typed.subscribe("t", "1")));
    drop(send(typed.close()));
    drop(send(subscription.next()));
    drop(send(typed_subscription.next()));
}

#[tokio::test]
async fn the_public_futures_are_send() {
    let events: EventTarget<u64> = EventTarget::local();
    let typed = PubSub::new(events.clone());
    let mut subscription = events.subscribe("t:1").await.unwrap();
    let mut typed_subscription = typed.subscribe("t", "1").await.unwrap();
    event_target_futures_are_send(
        &events,
        &typed,
        &mut subscription,
        &mut typed_subscription,
        || Envelope::new("t", "1", 7),
        || 7,
    );
    // Nothing was published: the futures were dropped unpolled.
    assert_eq!(events.stats().published, 0);
}

#[cfg(feature = "redis")]
#[test]
fn the_redis_futures_are_send() {
    use alkdev_pubsub::redis::{RedisConfig, RedisTransport};
    // A transport is used through `&mut` (a sink and a stream), by one task at a time: it
    // needs to be `Send`, not `Sync`.
    send::<Option<RedisTransport>>(None);
    drop(send(RedisConfig::new().connect("redis://127.0.0.1:1")));
    drop(send(RedisTransport::connect("redis://127.0.0.1:1")));
}

#[cfg(feature = "redis-cluster")]
#[test]
fn the_redis_cluster_futures_are_send() {
    use alkdev_pubsub::redis::cluster::RedisClusterTransport;
    send::<Option<RedisClusterTransport>>(None);
    drop(send(RedisClusterTransport::connect([
        "redis://127.0.0.1:1",
    ])));
}

#[cfg(feature = "websocket")]
#[test]
fn the_websocket_futures_are_send() {
    use alkdev_pubsub::websocket::{WebSocketConfig, WebSocketListener, WebSocketTransport};
    send::<Option<WebSocketTransport>>(None);
    send_sync::<WebSocketListener>();
    drop(send(WebSocketTransport::connect("ws://127.0.0.1:1/")));
    drop(send(WebSocketConfig::new().connect("ws://127.0.0.1:1/")));
    drop(send(WebSocketListener::bind("127.0.0.1:0")));
    drop(send(WebSocketListener::bind_with(
        "127.0.0.1:0",
        WebSocketConfig::new(),
    )));
}

/// The listener's accept futures borrow it: they are `Send` when spawned with it.
#[cfg(feature = "websocket")]
#[tokio::test]
async fn the_websocket_listener_futures_are_send() {
    use alkdev_pubsub::websocket::WebSocketListener;
    let listener = WebSocketListener::bind("127.0.0.1:0").await.unwrap();
    drop(send(listener.accept()));
    drop(send(listener.accept_tcp()));
    drop(send(listener.accept_event_target::<u64>()));
    assert!(listener.local_addr().unwrap().ip().is_loopback());
}
