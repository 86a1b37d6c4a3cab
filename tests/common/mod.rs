//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

/// The `tap` example binary: see [`example_binary`].
pub fn tap_binary() -> std::path::PathBuf {
    example_binary("tap")
}

/// An example's binary: `cargo test` builds examples beside the test executables (as
/// `examples/<name>-<hash>`; `cargo build --example <name>` as `examples/<name>`). The newest
/// wins.
pub fn example_binary(example: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let newest = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = name
                .strip_suffix(std::env::consts::EXE_SUFFIX)
                .unwrap_or(&name)
                .to_owned();
            (name == example || name.starts_with(&format!("{example}-"))) && !name.contains('.')
        })
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok());
    newest.map(|entry| entry.path()).unwrap_or_else(|| {
        panic!(
            "no {example} binary in {}: cargo build --example {example} --all-features",
            dir.display()
        )
    })
}

/// Waits up to `within` for `child` to exit and returns what it printed; past that, kills it
/// (by its handle) and fails, naming `what`: a lost event must fail the test, not hang it.
pub async fn output_within(
    mut child: std::process::Child,
    what: &str,
    within: std::time::Duration,
) -> std::process::Output {
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("the child's status").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("the killed child's output");
            panic!(
                "{what} did not finish within {within:?}; it printed {:?}, and on stderr {:?}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the waiting task")
        .expect("the child's output")
}

/// Feeds the commands `command` makes to `sink` while it is ready, up to `most`: how many it
/// took before it pushed back (`Pending`). Panics if it fails.
pub async fn feed_while_ready<S, M>(
    sink: &mut S,
    most: usize,
    mut command: impl FnMut() -> alkdev_pubsub::Command<M>,
) -> usize
where
    S: futures::Sink<alkdev_pubsub::Command<M>, Error = alkdev_pubsub::Error> + Unpin,
{
    futures::future::poll_fn(|cx| {
        let mut taken = 0;
        while taken < most {
            match std::pin::Pin::new(&mut *sink).poll_ready(cx) {
                std::task::Poll::Ready(Ok(())) => {
                    std::pin::Pin::new(&mut *sink)
                        .start_send(command())
                        .unwrap();
                    taken += 1;
                }
                std::task::Poll::Ready(Err(error)) => panic!("not ready: {error}"),
                std::task::Poll::Pending => break,
            }
        }
        std::task::Poll::Ready(taken)
    })
    .await
}

/// Subscribes `topic` through a raw transport and waits (20 s at most) for the next item,
/// which must be its answer, `Up::Subscribed(topic)`.
pub async fn subscribe_confirmed<T>(transport: &mut T, topic: &str)
where
    T: futures::Sink<alkdev_pubsub::Command<bytes::Bytes>, Error = alkdev_pubsub::Error>
        + futures::Stream<Item = alkdev_pubsub::Result<alkdev_pubsub::Up<bytes::Bytes>>>
        + Unpin,
{
    use futures::{SinkExt, StreamExt};
    transport
        .send(alkdev_pubsub::Command::Subscribe(topic.into()))
        .await
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), transport.next())
        .await
        .unwrap_or_else(|_| panic!("no answer to the subscribe of {topic}"));
    assert!(
        matches!(&answer, Some(Ok(alkdev_pubsub::Up::Subscribed(t))) if t.as_str() == topic),
        "{answer:?}"
    );
}
