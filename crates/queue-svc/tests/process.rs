//! Three `queue-svc` processes on 127.0.0.1, configured only by `DSYNC_*`
//! variables. Producers run while a replica is SIGKILLed and restarted,
//! then every replica is SIGKILLed at once and restarted: under `sync`
//! durability every acknowledged message is still there, once, with its
//! payload. The `dsync queue` CLI then reads the topic.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsync_client::{Conn, Options, QueueClient};
use parking_lot::Mutex;
use proto::queue::v1 as pb;

struct Replicas {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    procs: Vec<Option<Child>>,
}

impl Replicas {
    fn start() -> Self {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let mut r = Self {
            dir: tempfile::tempdir().unwrap(),
            ports,
            procs: vec![None, None, None],
        };
        for i in 0..3 {
            r.spawn(i);
        }
        r
    }

    fn endpoints(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let peers: Vec<String> = self
            .ports
            .iter()
            .enumerate()
            .map(|(j, p)| format!("{}=127.0.0.1:{p}", j + 1))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_queue-svc"))
            .env("DSYNC_NODE_ID", (i + 1).to_string())
            .env("DSYNC_LISTEN", format!("127.0.0.1:{}", self.ports[i]))
            .env("DSYNC_PEERS", peers.join(","))
            .env(
                "DSYNC_DATA_DIR",
                self.dir.path().join(format!("n{}", i + 1)),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.procs[i] = Some(child);
    }

    /// SIGKILL: no shutdown, only what was fsync'd survives.
    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill9(i);
        }
    }
}

fn client(r: &Replicas) -> QueueClient {
    let opts = Options {
        retry_for: Duration::from_secs(20),
        ..Default::default()
    };
    QueueClient::new(Conn::new(r.endpoints(), opts).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged_under_sync() {
    let mut r = Replicas::start();
    let q = client(&r);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = q
            .create_topic(
                "ledger",
                pb::TopicConfig {
                    partitions: 3,
                    ..Default::default()
                },
            )
            .await;
        match res {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no cluster: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    q.create_group("ledger", "audit", None, None).await.unwrap();

    // Two producers; every acknowledged message is recorded with its payload.
    let acked: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for w in 0..2 {
        let (q, acked, stop) = (client(&r), acked.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 3000 {
                let batch: Vec<pb::Message> = (0..10)
                    .map(|k| pb::Message {
                        key: format!("acct-{}", (i + k) % 23).into_bytes(),
                        payload: format!("w{w}-m{}-{}", i + k, "x".repeat(40)).into_bytes(),
                        message_id: format!("w{w}-m{}", i + k),
                        ..Default::default()
                    })
                    .collect();
                if q.produce("ledger", batch.clone()).await.is_ok() {
                    let mut a = acked.lock();
                    for m in batch {
                        a.insert(m.message_id, m.payload);
                    }
                }
                i += 10;
            }
        }));
    }
    let wait_for = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.lock().len() < n {
                assert!(
                    Instant::now() < deadline,
                    "producers stalled at {}",
                    acked.lock().len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(500).await;
    r.kill9(0);
    wait_for(1500).await;
    r.spawn(0);
    wait_for(2500).await;
    // Everything at once, mid-stream.
    for i in 0..3 {
        r.kill9(i);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    let acknowledged = acked.lock().clone();
    for i in 0..3 {
        r.spawn(i);
    }

    // Every acknowledged message comes back, intact, once.
    let q = client(&r);
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while acknowledged.keys().any(|k| !seen.contains_key(k)) {
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages missing",
            acknowledged
                .keys()
                .filter(|k| !seen.contains_key(*k))
                .count()
        );
        let Ok(msgs) = q.receive("ledger", "audit", "checker", 500, 500).await else {
            continue;
        };
        for m in &msgs {
            if let Some(p) = acknowledged.get(&m.message_id) {
                assert_eq!(p, &m.payload, "payload of {} corrupted", m.message_id);
            }
            *seen.entry(m.message_id.clone()).or_default() += 1;
        }
        let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
        if !receipts.is_empty() {
            let _ = q.ack("ledger", "audit", &receipts).await;
        }
    }
    let dups: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "{} acknowledged, {} delivered (incl. unacknowledged that made it), {dups} redeliveries",
        acknowledged.len(),
        seen.len()
    );

    // The CLI reads the same cluster.
    let dsync = std::path::PathBuf::from(env!("CARGO_BIN_EXE_queue-svc")).with_file_name("dsync");
    if dsync.exists() {
        let out = Command::new(&dsync)
            .arg("--endpoints")
            .arg(r.endpoints().join(","))
            .args(["queue", "describe", "ledger"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("topic ledger"), "{text}");
        assert!(text.contains("group audit"), "{text}");
    }
}
