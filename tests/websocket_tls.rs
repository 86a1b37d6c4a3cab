//! wss:// with rustls: a client over TLS to a server that accepts a tokio-rustls stream.

use std::sync::Arc;

use alkdev_pubsub::testkit::{self, number_of, numbered};
use alkdev_pubsub::websocket::{self, WebSocketConfig, WebSocketTransport};
use alkdev_pubsub::EventTarget;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A self-signed certificate for `localhost`, and a server config that presents it.
fn tls_server() -> (CertificateDer<'static>, Arc<rustls::ServerConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    (cert, Arc::new(config))
}

fn client_trusting(cert: CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_round_trip_with_a_private_certificate() {
    let (cert, server_config) = tls_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(server_config);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let events: EventTarget =
            websocket::event_target(WebSocketTransport::accept(tls).await.unwrap());
        let mut requests = events.subscribe("tls:1").await.unwrap();
        let request = testkit::next_event(&mut requests).await;
        events
            .dispatch_confirmed(numbered("tls", "2", number_of(&request) + 1))
            .await
            .unwrap();
        // Stay up until the client has the answer.
        let _ = requests.next_event_or_end().await;
    });

    let client: EventTarget = websocket::event_target(
        WebSocketConfig::new()
            .connect_with_tls(format!("wss://localhost:{port}/"), client_trusting(cert))
            .await
            .unwrap(),
    );
    let mut answers = client.subscribe("tls:2").await.unwrap();
    client
        .dispatch_event(numbered("tls", "1", 41))
        .await
        .unwrap();
    assert_eq!(number_of(&testkit::next_event(&mut answers).await), 42);
    client.close().await;
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_with_a_clear_error() {
    let (_cert, server_config) = tls_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(server_config);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    // The webpki roots do not include a self-signed certificate: refused for good, as no retry
    // can mend it (a reconnect layer gives up at once on a first connection that fails so).
    let error = WebSocketTransport::connect(format!("wss://localhost:{port}/"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), alkdev_pubsub::ErrorKind::Rejected, "{error}");
    assert!(error.is_permanent(), "{error}");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
}

/// Waits for the next item or the end, whichever comes.
trait NextOrEnd {
    async fn next_event_or_end(&mut self) -> Option<()>;
}

impl NextOrEnd for alkdev_pubsub::Subscription {
    async fn next_event_or_end(&mut self) -> Option<()> {
        use futures::StreamExt;
        tokio::time::timeout(std::time::Duration::from_secs(5), self.next())
            .await
            .ok()
            .flatten()
            .map(|_| ())
    }
}
