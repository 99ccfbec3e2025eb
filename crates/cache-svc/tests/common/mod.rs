//! What the cache-svc integration tests share: a real `redis-server` on a
//! free port, and an in-process cluster of cache nodes on real sockets.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_svc::config::{CacheLimits, WritePolicy};
use cache_svc::server::{CacheConfig, CacheServer};
use consensus::testkit::{bind_local, free_port, Faults};
use dsync_client::cache::{CacheClient, CacheOptions};

/// A `redis-server` process (Debian package) on a free 127.0.0.1 port,
/// appending every write to its AOF with fsync, so a restart keeps them.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Self {
        let port = free_port();
        let mut r = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let bin = which("redis-server")
            .expect("redis-server not found: install the Debian package (cargo xtask test does)");
        let child = Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 7];
                    if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs a command with redis-cli-like framing; answers the raw reply.
    pub fn raw(&self, args: &[&[u8]]) -> Vec<u8> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        s.write_all(&cmd).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.ends_with(b"\r\n") {
                break;
            }
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .chain([std::path::PathBuf::from("/usr/bin").join(bin)])
        .find(|p| p.exists())
}

/// Limits for tests: short leases and timeouts so faults resolve fast.
pub fn test_limits() -> CacheLimits {
    CacheLimits {
        lease: Duration::from_millis(800),
        invalidation_timeout: Duration::from_millis(400),
        fence_after: Duration::from_millis(800),
        peer_timeout: Duration::from_millis(1000),
        ..CacheLimits::default()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: HashMap<u64, String>,
    pub servers: HashMap<u64, CacheServer>,
    pub faults: Arc<Faults>,
    pub limits: CacheLimits,
    pub store: String,
}

impl Cluster {
    /// `store`: a Redis URL or "embedded".
    pub async fn start(n: usize, store: &str, limits: CacheLimits) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (listeners, addrs) = bind_local(n).await.unwrap();
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            addrs,
            servers: HashMap::new(),
            faults: Faults::new(),
            limits,
            store: store.to_string(),
        };
        for (i, l) in listeners.into_iter().enumerate() {
            c.start_on(i as u64 + 1, l).await;
        }
        c.wait_ready(&[]).await;
        c
    }

    pub async fn start_on(&mut self, id: u64, l: tokio::net::TcpListener) {
        let mut cfg = CacheConfig::new(
            id,
            self.addrs.clone(),
            self.dir.path().join(format!("n{id}")),
        );
        cfg.limits = self.limits.clone();
        cfg.store = self.store.clone();
        cfg.replica.faults = Some(self.faults.clone());
        self.servers
            .insert(id, CacheServer::start(cfg, l).await.unwrap());
    }

    pub async fn restart(&mut self, id: u64) {
        let l = tokio::net::TcpListener::bind(&self.addrs[&id])
            .await
            .unwrap();
        self.start_on(id, l).await;
    }

    pub async fn kill(&mut self, id: u64) {
        if let Some(s) = self.servers.remove(&id) {
            s.kill().await;
        }
    }

    /// Waits (≤ 30 s) until every running node except `except` is a member
    /// of one common epoch with all of them and serves.
    pub async fn wait_ready(&self, except: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want: Vec<u64> = {
            let mut v: Vec<u64> = self
                .servers
                .keys()
                .copied()
                .filter(|i| !except.contains(i))
                .collect();
            v.sort();
            v
        };
        loop {
            let mut ok = true;
            let mut epochs = Vec::new();
            for id in &want {
                let n = self.servers[id].cache();
                let ep = n.epoch();
                let members: Vec<u64> = ep.view.members.keys().copied().collect();
                epochs.push(ep.view.epoch);
                if ep.incarnation.is_none() || members != want || n.lease_left().is_none() {
                    ok = false;
                }
            }
            if ok && epochs.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready: want members {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn client(&self, id: u64, near: bool) -> CacheClient {
        let mut opts = CacheOptions {
            near_cache: near,
            ..CacheOptions::default()
        };
        opts.conn.request_timeout = Duration::from_secs(5);
        opts.conn.retry_for = Duration::from_secs(5);
        CacheClient::with_options([self.addrs[&id].clone()], opts).unwrap()
    }

    pub fn node(&self, id: u64) -> &cache_svc::node::CacheNode {
        self.servers[&id].cache()
    }
}

pub fn write_back_limits() -> CacheLimits {
    CacheLimits {
        write_policy: WritePolicy::Back,
        ..test_limits()
    }
}

/// Waits until a client's near cache may serve (its first pong came).
pub async fn near_live(c: &CacheClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.near_cache_live() {
        assert!(Instant::now() < deadline, "near cache never went live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A three-master Redis Cluster (Debian's redis-server and redis-cli) on
/// free 127.0.0.1 ports.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new(which("redis-server").expect("redis-server"))
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--dir",
                    dir.path().to_str().unwrap(),
                    "--protected-mode",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            nodes.push(Redis {
                port,
                dir,
                child: Some(child),
            });
        }
        let mut create = Command::new(which("redis-cli").expect("redis-cli"));
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                String::from_utf8_lossy(&n.raw(&[b"CLUSTER", b"INFO"])).contains("cluster_state:ok")
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "redis cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
