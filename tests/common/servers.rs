//! Servers and proxies of a test's own: a TCP proxy that can blackhole or drop traffic, a
//! private `redis-server` (kill, restart, pause) and a private three-node Redis Cluster.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A TCP proxy on 127.0.0.1 in front of a server, which can pass traffic, blackhole it
/// (connections stay open, nothing moves, new ones are accepted and hang) or drop it (every
/// connection is closed, new ones are refused by closing them at once).
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
}

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;
const DROP: u8 = 2;

impl FaultProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (m, c) = (Arc::clone(&mode), Arc::clone(&changed));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == DROP {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (m, c) = (Arc::clone(&m), Arc::clone(&c));
                tokio::spawn(async move {
                    let (client_rd, client_wr) = client.into_split();
                    let (server_rd, server_wr) = server.into_split();
                    let up = pump(client_rd, server_wr, Arc::clone(&m), Arc::clone(&c));
                    let down = pump(server_rd, client_wr, m, c);
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Self {
            port,
            mode,
            changed,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn pass(&self) {
        self.set(PASS);
    }

    pub fn blackhole(&self) {
        self.set(BLACKHOLE);
    }

    pub fn drop_all(&self) {
        self.set(DROP);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.drop_all();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<std::sync::atomic::AtomicU8>,
    changed: Arc<tokio::sync::Notify>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = changed.notified() => {
                if mode.load(Ordering::SeqCst) == DROP { return; }
                continue;
            }
        };
        // Hold the bytes while blackholed; give up on the connection when dropped.
        loop {
            match mode.load(Ordering::SeqCst) {
                PASS => break,
                DROP => return,
                _ => {
                    let notified = changed.notified();
                    if mode.load(Ordering::SeqCst) == BLACKHOLE {
                        notified.await;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A `redis-server` of the test's own on a free port (no persistence unless the test's
/// arguments say so), in a directory of its own, which the test can kill, restart, pause
/// (SIGSTOP) and resume; killed when dropped, panics included, and its directory removed.
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    pub port: u16,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with these arguments after the defaults (a later argument wins), such as
    /// `["--appendonly", "yes"]` or `["--replicaof", "127.0.0.1", "6390"]`.
    ///
    /// A free port found is free only until another test takes it: a server that could not
    /// listen on it (it exits at once) is started again on another, a few times.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-redis-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the private redis-server");
        let mut server = Self {
            child: None,
            port: Self::free_port(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir,
        };
        for _ in 0..4 {
            if server.try_start() {
                return server;
            }
            server.port = Self::free_port();
        }
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(
            self.try_start(),
            "redis-server exited at once on port {}",
            self.port
        );
    }

    /// Starts the server on its port and waits until it accepts connections; false when it
    /// exited at once (its port was taken).
    fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "the server is already running");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = &mut self.child
                && child.try_wait().is_ok_and(|status| status.is_some())
            {
                self.child = None;
                return false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three primaries on loopback ports, started for a test and stopped with
/// it (each node a [`PrivateRedis`]; `redis-cli --cluster create` assigns the slots).
pub struct PrivateCluster {
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    pub fn start() -> Self {
        let nodes: Vec<PrivateRedis> = (0..3)
            .map(|_| {
                PrivateRedis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let status = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        // Every node must agree that the cluster is up before it takes commands.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        for node in &nodes {
            loop {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster did not come up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateRedis::url).collect()
    }

    /// Runs `redis-cli` with `args` on every node and returns each node's output.
    fn on_each(&self, args: &[&str]) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &node.port.to_string()])
                    .args(args)
                    .output()
                    .expect("redis-cli");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.on_each(&["dbsize"])
            .iter()
            .map(|out| out.trim().parse().expect("a key count"))
            .collect()
    }

    /// The sum over the nodes of the `INFO {section}` field starting with `prefix` (up to the
    /// next comma): `("commandstats", "cmdstat_evalsha:calls=")`, `("stats",
    /// "total_error_replies:")`.
    pub fn info_sum(&self, section: &str, prefix: &str) -> u64 {
        self.on_each(&["info", section])
            .iter()
            .map(|out| {
                out.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
            })
            .sum()
    }
}
