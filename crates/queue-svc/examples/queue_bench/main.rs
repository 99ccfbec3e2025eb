//! queue-svc benchmark: three `queue-svc` processes over loopback, driven
//! by `dsync_client::QueueClient`, and — when `nats-server` is installed —
//! the same rows against a three-node JetStream cluster with R3 file
//! streams, in the same run, with the ratio per row.
//!
//! Rows (100-byte messages unless `--size`):
//! - produce, unbatched and in batches of 100, with 1 and 8 producers, for
//!   our `sync` and `async` durabilities (JetStream acknowledges before its
//!   fsync by default, so compare it with both);
//! - end to end: producers (batches of 100) and consumers (receive 100, ack
//!   the batch) at once; throughput of acked messages and the latency from
//!   produce to receive;
//! - backlog: `--backlog` messages of 1 KiB produced and left queued, then
//!   each replica's resident memory (VmRSS).
//!
//! Run with `cargo xtask bench queue` (which builds the release binary).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use consensus::testkit::{free_port, release_binary, spawn_replicas, Procs};
use dsync_client::{Conn, Options, QueueClient};
use hdrhistogram::Histogram;
use proto::queue::v1 as pb;

mod nats;

#[derive(Parser)]
struct Args {
    /// Messages per produce row.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Messages of the end-to-end row.
    #[arg(long, default_value_t = 100_000)]
    e2e_messages: u64,
    /// Messages of 1 KiB left queued for the memory row (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Partitions per topic (JetStream: one stream).
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Skip JetStream even if nats-server is installed.
    #[arg(long)]
    no_nats: bool,
    /// The queue-svc binary (default: the workspace's release build).
    #[arg(long)]
    queue_bin: Option<PathBuf>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Clone, Copy)]
struct Row {
    rate: f64,
    p50: f64,
    p99: f64,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10.0} msg/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.rate, self.p50, self.p99
        )
    }
}

/// What a system under test must do for the rows.
trait Target: Send + Sync {
    /// Produces one batch; resolves when acknowledged.
    fn produce(
        &self,
        topic: &str,
        batch: Vec<Vec<u8>>,
    ) -> futures::future::BoxFuture<'_, Result<(), String>>;
    /// Receives up to `max` and acks them; returns their payloads.
    fn consume(
        &self,
        topic: &str,
        max: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Vec<u8>>, String>>;
}

struct Dsync {
    clients: Vec<QueueClient>,
    next: AtomicU64,
}

impl Dsync {
    fn client(&self) -> &QueueClient {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        &self.clients[i % self.clients.len()]
    }
}

impl Target for Dsync {
    fn produce(
        &self,
        topic: &str,
        batch: Vec<Vec<u8>>,
    ) -> futures::future::BoxFuture<'_, Result<(), String>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            let msgs = batch
                .into_iter()
                .map(|payload| pb::Message {
                    payload,
                    ..Default::default()
                })
                .collect();
            self.client()
                .produce(&topic, msgs)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn consume(
        &self,
        topic: &str,
        max: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            let c = self.client();
            let msgs = c
                .receive(&topic, "bench", "bench", max as u32, 500)
                .await
                .map_err(|e| e.to_string())?;
            if msgs.is_empty() {
                return Ok(Vec::new());
            }
            // Acks are pipelined, as a consumer that is not waiting on them
            // would (JetStream acks are fire-and-forget too); group commit
            // on the leader batches them with the receives.
            let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
            let (c, topic) = (c.clone(), topic.clone());
            tokio::spawn(async move {
                if let Err(e) = c.ack(&topic, "bench", &receipts).await {
                    eprintln!("ack: {e}");
                }
            });
            Ok(msgs.into_iter().map(|m| m.payload).collect())
        })
    }
}

struct JetStream {
    conns: Vec<nats::Nats>,
    next: AtomicU64,
}

impl JetStream {
    fn conn(&self) -> &nats::Nats {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        &self.conns[i % self.conns.len()]
    }
}

impl Target for JetStream {
    fn produce(
        &self,
        topic: &str,
        batch: Vec<Vec<u8>>,
    ) -> futures::future::BoxFuture<'_, Result<(), String>> {
        let subject = format!("{topic}.m");
        Box::pin(async move {
            let c = self.conn();
            if batch.len() == 1 {
                c.publish(&subject, &batch[0])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                c.publish_batch(&subject, &batch)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }

    fn consume(
        &self,
        topic: &str,
        max: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Vec<u8>>, String>> {
        let stream = topic.to_uppercase();
        Box::pin(async move {
            let c = self.conn();
            let got = c
                .fetch(&stream, "bench", max, Duration::from_millis(500))
                .await
                .map_err(|e| e.to_string())?;
            let replies: Vec<String> = got.iter().map(|(_, r)| r.clone()).collect();
            c.ack(&replies).await.map_err(|e| e.to_string())?;
            Ok(got.into_iter().map(|(p, _)| p).collect())
        })
    }
}

/// `total` messages in batches of `batch` from `producers` tasks.
async fn produce_row(
    t: Arc<dyn Target>,
    topic: &str,
    total: u64,
    batch: usize,
    producers: usize,
    size: usize,
) -> Row {
    let left = Arc::new(AtomicU64::new(total));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let (t, left, topic) = (t.clone(), left.clone(), topic.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            loop {
                let n = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                        l.checked_sub(batch as u64)
                    })
                    .map(|_| batch)
                    .unwrap_or(0);
                if n == 0 {
                    return h;
                }
                let msgs = vec![vec![7u8; size]; n];
                let t0 = Instant::now();
                if let Err(e) = t.produce(&topic, msgs).await {
                    panic!("produce failed: {e}");
                }
                h.record(t0.elapsed().as_micros().max(1) as u64).unwrap();
            }
        }));
    }
    let mut h = hist();
    for task in tasks {
        h.add(task.await.unwrap()).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    Row {
        rate: (total - total % batch as u64) as f64 / secs,
        p50: ms(&h, 0.5),
        p99: ms(&h, 0.99),
    }
}

/// Producers and consumers at once; latency from produce to receive.
async fn e2e_row(t: Arc<dyn Target>, topic: &str, total: u64, size: usize) -> Row {
    let epoch = Instant::now();
    let left = Arc::new(AtomicU64::new(total));
    let done = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for _ in 0..4 {
        let (t, left, topic) = (t.clone(), left.clone(), topic.to_owned());
        producers.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(100))
                .is_ok()
            {
                let stamp = (epoch.elapsed().as_micros() as u64).to_le_bytes();
                let msgs: Vec<Vec<u8>> = (0..100)
                    .map(|_| {
                        let mut m = vec![7u8; size.max(8)];
                        m[..8].copy_from_slice(&stamp);
                        m
                    })
                    .collect();
                if let Err(e) = t.produce(&topic, msgs).await {
                    panic!("produce failed: {e}");
                }
            }
        }));
    }
    let mut consumers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    for _ in 0..4 {
        let (t, done, topic) = (t.clone(), done.clone(), topic.to_owned());
        consumers.push(tokio::spawn(async move {
            let mut h = hist();
            while done.load(Ordering::SeqCst) < total && Instant::now() < deadline {
                match t.consume(&topic, 100).await {
                    Ok(got) => {
                        let now = epoch.elapsed().as_micros() as u64;
                        for p in &got {
                            let sent = u64::from_le_bytes(p[..8].try_into().unwrap());
                            h.record(now.saturating_sub(sent).max(1)).unwrap();
                        }
                        done.fetch_add(got.len() as u64, Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("consume: {e}"),
                }
            }
            h
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut h = hist();
    for c in consumers {
        h.add(c.await.unwrap()).unwrap();
    }
    let got = done.load(Ordering::SeqCst);
    Row {
        rate: got as f64 / epoch.elapsed().as_secs_f64(),
        p50: ms(&h, 0.5),
        p99: ms(&h, 0.99),
    }
}

async fn dsync_topic(c: &QueueClient, name: &str, partitions: u32, durability: pb::Durability) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .create_topic(
                name,
                pb::TopicConfig {
                    partitions,
                    durability: durability as i32,
                    dead_letter_disabled: true,
                    ..Default::default()
                },
            )
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create topic {name}: {e}"),
        }
    }
    c.create_group(name, "bench", None, None).await.unwrap();
    // Wait until every partition has a leader and a produce goes through.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.describe_topic(name).await.unwrap();
        if info.partitions.iter().all(|p| p.leader_id != 0) {
            break;
        }
        assert!(Instant::now() < deadline, "partitions of {name} not led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let leadership settle on the preferred replicas before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn nats_available() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let bin = args
        .queue_bin
        .clone()
        .unwrap_or_else(|| release_binary("queue-svc"));
    let dir = tempfile::tempdir().unwrap();
    let (dsync_procs, endpoints) = spawn_replicas(&bin, &dir.path().join("dsync"), &[]);
    let mk = || QueueClient::new(Conn::new(endpoints.clone(), Options::default()).unwrap());
    let admin = mk();
    let dsync: Arc<dyn Target> = Arc::new(Dsync {
        clients: (0..8).map(|_| mk()).collect(),
        next: AtomicU64::new(0),
    });

    let with_nats = !args.no_nats && nats_available();
    let mut nats_procs = Procs(Vec::new());
    let js: Option<Arc<JetStream>> = if with_nats {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster_ports: [u16; 3] = [free_port(), free_port(), free_port()];
        for (i, &client_port) in client_ports.iter().enumerate() {
            let store = dir.path().join(format!("nats{}", i + 1));
            std::fs::create_dir_all(&store).unwrap();
            let child = Command::new("nats-server")
                .args(nats::server_args(
                    i + 1,
                    client_port,
                    &cluster_ports,
                    &store,
                ))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start nats-server");
            nats_procs.0.push(child);
        }
        let mut conns = Vec::new();
        for i in 0..8 {
            let addr = format!("127.0.0.1:{}", client_ports[i % 3]);
            let deadline = Instant::now() + Duration::from_secs(20);
            let c = loop {
                match nats::Nats::connect(&addr).await {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("connect to nats {addr}: {e}"),
                }
            };
            conns.push(c);
        }
        Some(Arc::new(JetStream {
            conns,
            next: AtomicU64::new(0),
        }))
    } else {
        println!("nats-server not installed (apt-get install nats-server): dsync rows only\n");
        None
    };
    println!(
        "queue bench: 3 replicas as processes over loopback, {} B messages, {} partition(s)\n",
        args.size, args.partitions
    );
    let mut table: Vec<(String, Row, Option<Row>)> = Vec::new();
    let mut n = 0;
    for durability in [pb::Durability::Sync, pb::Durability::Async] {
        let dname = if durability == pb::Durability::Sync {
            "sync"
        } else {
            "async"
        };
        for (batch, producers) in [(1usize, 1usize), (1, 8), (100, 1), (100, 8)] {
            n += 1;
            let topic = format!("p{n}");
            dsync_topic(&admin, &topic, args.partitions, durability).await;
            let total = if batch == 1 && producers == 1 {
                args.messages / 4
            } else {
                args.messages * if batch == 100 { 5 } else { 1 }
            };
            let ours = produce_row(dsync.clone(), &topic, total, batch, producers, args.size).await;
            let theirs = match (&js, durability) {
                (Some(js), pb::Durability::Sync) => {
                    js_stream(js, &topic).await;
                    let t: Arc<dyn Target> = js.clone();
                    Some(produce_row(t, &topic, total, batch, producers, args.size).await)
                }
                _ => None,
            };
            // Rows leave their messages queued: free them before the next.
            admin.delete_topic(&topic).await.unwrap();
            let label = format!("produce {dname:<5} batch {batch:>3} × {producers} producer(s)");
            println!("{label:<44} dsync {ours}");
            if let Some(t) = theirs {
                println!("{:<44} js    {t}   ratio {:.2}", "", ours.rate / t.rate);
            }
            table.push((label, ours, theirs));
        }
    }
    // JetStream rows vs our async rows reuse the sync run's JetStream figures.
    for i in 0..4 {
        let js_row = table[i].2;
        if let Some(t) = js_row {
            let ours = table[i + 4].1;
            println!(
                "{:<44} async vs js ratio {:.2}",
                table[i + 4].0,
                ours.rate / t.rate
            );
        }
    }

    let topic = "e2e";
    dsync_topic(&admin, topic, args.partitions, pb::Durability::Sync).await;
    let ours = e2e_row(dsync.clone(), topic, args.e2e_messages, args.size).await;
    println!(
        "{:<44} dsync {ours}",
        "end to end (4 producers ×100, 4 consumers)"
    );
    if let Some(js) = &js {
        js_stream(js, topic).await;
        let t: Arc<dyn Target> = js.clone();
        let theirs = e2e_row(t, topic, args.e2e_messages, args.size).await;
        println!(
            "{:<44} js    {theirs}   ratio {:.2}",
            "",
            ours.rate / theirs.rate
        );
    }

    admin.delete_topic(topic).await.unwrap();
    if args.backlog > 0 {
        // Let the replicas drop the deleted topics' partitions.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let topic = "backlog";
        dsync_topic(&admin, topic, args.partitions, pb::Durability::Sync).await;
        let before: Vec<f64> = dsync_procs.0.iter().map(|c| rss_mb(c.id())).collect();
        let row = produce_row(dsync.clone(), topic, args.backlog, 100, 8, 1024).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after: Vec<f64> = dsync_procs.0.iter().map(|c| rss_mb(c.id())).collect();
        println!(
            "backlog {} × 1 KiB queued ({:.0} msg/s): RSS per replica {:?} MB (before {:?} MB)",
            args.backlog,
            row.rate,
            after.iter().map(|m| m.round() as u64).collect::<Vec<_>>(),
            before.iter().map(|m| m.round() as u64).collect::<Vec<_>>()
        );
    }
    drop(nats_procs);
    drop(dsync_procs);
}

/// Creates the R3 file stream `<NAME>` on `<name>.>` and its pull consumer.
async fn js_stream(t: &JetStream, name: &str) {
    let (stream, subject) = (name.to_uppercase(), format!("{name}.>"));
    let c = &t.conns[0];
    c.create_stream_retrying(&stream, &[subject.as_str()], 3, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("create stream {stream}: {e}"));
    c.create_pull_consumer(&stream, "bench").await.unwrap();
}
