use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private `redis-server` process on a free loopback port, for tests and benchmarks that
/// must kill, pause and restart their server. Stopped (SIGKILL) when dropped.
///
/// Panics with a clear message when `redis-server` is not installed.
///
/// ```no_run
/// use alkdev_pubsub::testkit::RedisServer;
///
/// let mut server = RedisServer::start();
/// println!("{}", server.url());
/// server.kill();
/// server.restart(); // same port
/// assert_eq!(server.cli(&["PING"]), "PONG");
/// ```
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    paused: bool,
    args: Vec<String>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.pid())
            .field("paused", &self.paused)
            .finish()
    }
}

/// How long [`RedisServer::cli`] waits for `redis-cli`.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` to its end and returns its trimmed output; panics, naming it as `what`, if
/// it fails or runs past `timeout` (then it is killed: it is our own child).
fn run_with_timeout(mut command: Command, what: &str, timeout: Duration) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("running {what}: {error}"));
    // Read on threads of their own, so that a full pipe cannot stall the child.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out.join().expect("reading stdout");
    let err = err.join().expect("reading stderr");
    assert!(
        status.success(),
        "{what} failed ({status}): {}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding a loopback port to find a free one")
}

/// A port nothing listens on now, and whose cluster bus port (+ 10,000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn require(binary: &str) {
    let found = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{binary}` is not installed or not on PATH: the Redis tests need it \
         (Debian/Ubuntu: `apt-get install -y redis-server`; `.ci/run` does this)"
    );
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (for example
    /// `["--cluster-enabled", "yes"]`).
    pub fn start_with(args: &[&str]) -> Self {
        require("redis-server");
        require("redis-cli");
        let mut last_error = String::new();
        // A cluster node also listens on its port + 10,000 (the cluster bus).
        let cluster = args.windows(2).any(|a| a == ["--cluster-enabled", "yes"]);
        for _ in 0..5 {
            let port = if cluster {
                free_cluster_port()
            } else {
                free_port()
            };
            let mut server = RedisServer {
                child: None,
                port,
                paused: false,
                args: args.iter().map(|a| a.to_string()).collect(),
            };
            // A fresh server: nothing left from an earlier one on this port.
            let _ = std::fs::remove_dir_all(server.dir());
            match server.spawn() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning redis-server: {e}"))?;
        self.child = Some(child);
        self.paused = false;
        let pid = self.child.as_ref().map(Child::id);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Ours, not another test's server on a port that was free a moment ago.
            match self.answering_pid() {
                Some(answering) if Some(answering) == pid => return Ok(()),
                Some(other) => {
                    self.kill();
                    return Err(format!(
                        "port {} is taken by another redis-server (pid {other})",
                        self.port
                    ));
                }
                None => {}
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        Err(format!(
            "redis-server on port {} did not answer within 10 s",
            self.port
        ))
    }

    /// The process id of the server answering on the port, if one answers.
    fn answering_pid(&self) -> Option<u32> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        stream.write_all(b"INFO server\r\n").ok()?;
        // A bulk string: `$<len>\r\n<text>\r\n`.
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&reply);
            let (head, body) = text.strip_prefix('$')?.split_once("\r\n")?;
            let len: usize = head.parse().ok()?;
            if body.len() >= len {
                return body
                    .lines()
                    .find_map(|line| line.strip_prefix("process_id:"))
                    .and_then(|pid| pid.trim().parse().ok());
            }
        }
    }

    /// The server's working directory (where a cluster node keeps its `nodes.conf`).
    pub fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("alkdev-pubsub-redis-{}", self.port))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                self.signal_pid(child.id(), "-CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Starts the server again on the same port, with the same arguments and directory
    /// (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger a moment after the kill.
                Err(error) if Instant::now() > deadline => {
                    panic!("restarting redis-server: {error}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn signal_pid(&self, pid: u32, signal: &str) {
        // The shell's own `kill`: the program (Debian's `procps`) may not be installed.
        let status = Command::new("sh")
            .args(["-c", "kill \"$1\" \"$2\"", "sh", signal, &pid.to_string()])
            .status()
            .expect("running sh -c kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Freezes the server (SIGSTOP): it keeps its connections but answers nothing.
    pub fn pause(&mut self) {
        let pid = self.pid().expect("the server runs");
        self.signal_pid(pid, "-STOP");
        self.paused = true;
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) {
        let pid = self.pid().expect("the server runs");
        self.signal_pid(pid, "-CONT");
        self.paused = false;
    }

    /// Runs `redis-cli` against the server and returns its trimmed output. Panics if it
    /// fails, or has not answered within 30 s (a paused server never answers).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args);
        run_with_timeout(
            command,
            &format!("redis-cli {args:?} (port {})", self.port),
            CLI_TIMEOUT,
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `redis-server` processes on free loopback ports, for tests and
/// benchmarks of sharded pub/sub: N masters (3 or more are created with
/// `redis-cli --cluster create`; fewer get their slots assigned directly). Nodes can be killed
/// and restarted; a restarted master keeps its `nodes.conf` and rejoins with its slots.
///
/// ```no_run
/// use alkdev_pubsub::testkit::RedisCluster;
///
/// let cluster = RedisCluster::start(3);
/// let owner = cluster.owner_of_channel("chat:1");
/// println!("chat:1 lives on {}", cluster.nodes[owner].url());
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    /// The masters, in slot order: node `i` owns the `i`-th share of the 16,384 slots.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes and joins them into a cluster, waiting until it is ready.
    pub fn start(masters: usize) -> Self {
        assert!(masters >= 1, "a cluster needs a master");
        let args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"];
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let cluster = RedisCluster { nodes };
        if masters >= 3 {
            let mut create = Command::new("redis-cli");
            create.arg("--cluster").arg("create");
            for node in &cluster.nodes {
                create.arg(format!("127.0.0.1:{}", node.port()));
            }
            create.args(["--cluster-replicas", "0", "--cluster-yes"]);
            run_with_timeout(create, "redis-cli --cluster create", CLI_TIMEOUT);
        } else {
            for (i, node) in cluster.nodes.iter().enumerate() {
                let first = i * 16384 / masters;
                let last = (i + 1) * 16384 / masters - 1;
                node.cli(&[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ]);
            }
            for node in &cluster.nodes[1..] {
                node.cli(&[
                    "CLUSTER",
                    "MEET",
                    "127.0.0.1",
                    &cluster.nodes[0].port().to_string(),
                ]);
            }
        }
        cluster.wait_ready();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and knows every master.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.nodes.iter().all(|node| {
                node.pid().is_some()
                    && node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && node
                        .cli(&["CLUSTER", "NODES"])
                        .lines()
                        .filter(|line| line.contains("master") && line.contains("connected"))
                        .count()
                        == self.nodes.len()
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://` URLs of every node, as seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The hash slot of `channel` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, channel: &str) -> u16 {
        self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", channel])
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The index in [`nodes`](Self::nodes) of the master that owns `channel`'s slot.
    pub fn owner_of_channel(&self, channel: &str) -> usize {
        let slot = self.keyslot(channel) as usize;
        for (i, node) in self.nodes.iter().enumerate() {
            let myself = node
                .cli(&["CLUSTER", "NODES"])
                .lines()
                .find(|line| line.contains("myself"))
                .map(str::to_owned)
                .unwrap_or_default();
            if myself.split_whitespace().skip(8).any(|range| {
                let mut bounds = range.split('-');
                match (
                    bounds.next().and_then(|a| a.parse::<usize>().ok()),
                    bounds.next(),
                ) {
                    (Some(first), Some(last)) => last
                        .parse::<usize>()
                        .is_ok_and(|last| (first..=last).contains(&slot)),
                    (Some(only), None) => only == slot,
                    _ => false,
                }
            }) {
                return i;
            }
        }
        panic!("no master owns slot {slot}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_gives_its_output_and_one_that_hangs_is_killed_in_time() {
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo ' out '"]);
        assert_eq!(run_with_timeout(echo, "echo", CLI_TIMEOUT), "out");
        let started = Instant::now();
        let hung = std::panic::catch_unwind(|| {
            let mut sleep = Command::new("sleep");
            sleep.arg("60");
            run_with_timeout(sleep, "sleep 60", Duration::from_millis(200))
        });
        let message = hung.expect_err("timed out");
        let message = message
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            message.contains("sleep 60 did not finish within 200ms"),
            "{message}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let mut failing = Command::new("sh");
        failing.args(["-c", "echo nope >&2; exit 3"]);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_with_timeout(failing, "sh", CLI_TIMEOUT)
        }));
        let message = failed.expect_err("failed");
        let message = message.downcast_ref::<String>().expect("a message");
        assert!(message.contains("nope"), "{message}");
    }

    #[test]
    fn a_cluster_port_has_its_bus_port_free() {
        for _ in 0..20 {
            let port = free_cluster_port();
            let bus = port.checked_add(10_000).expect("a bus port in range");
            for port in [port, bus] {
                std::net::TcpListener::bind(("127.0.0.1", port))
                    .unwrap_or_else(|e| panic!("port {port} is taken: {e}"));
            }
        }
    }
}
