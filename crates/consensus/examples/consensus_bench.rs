//! Consensus benchmark: three nodes in one process talking real gRPC over
//! loopback, raft-engine with fsync on, one group, 100-byte proposals.
//!
//! For each concurrency level it runs N proposers for a fixed time against
//! the leader's `propose` and reports committed proposals/s and commit
//! latency percentiles (HDR histogram). Then it kills the leader several
//! times and reports the time from the kill to the next committed proposal.
//!
//! Run with `cargo xtask bench consensus` (release build).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use consensus::testkit::{bind_local, GrpcNode, SmFactory};
use consensus::{Config, StateMachine};
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent proposer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    proposers: Vec<usize>,
    /// Measured seconds per level (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Proposal payload size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Leader kills for the failover measurement.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Turn fsync off (for comparison only).
    #[arg(long)]
    no_fsync: bool,
}

/// Counts applied commands; snapshot is the count.
#[derive(Default)]
struct CountingSm {
    applied: u64,
}

impl StateMachine for CountingSm {
    fn apply(&mut self, _index: u64, _command: &[u8]) -> Vec<u8> {
        self.applied += 1;
        Vec::new()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.applied.to_be_bytes().to_vec()
    }
    fn restore(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        self.applied = u64::from_be_bytes(data.try_into().map_err(|_| "bad snapshot")?);
        Ok(())
    }
}

const G: u64 = 1;

struct Bench {
    dir: tempfile::TempDir,
    peers: HashMap<u64, String>,
    nodes: HashMap<u64, GrpcNode>,
    factory: SmFactory,
    sync: bool,
}

impl Bench {
    fn config(&self, id: u64) -> Config {
        let mut cfg = Config::new(id, self.dir.path().join(format!("n{id}")));
        cfg.sync = self.sync;
        cfg.snapshot_entries = 100_000;
        cfg.compact_lag = 10_000;
        cfg
    }

    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (id, n) in &self.nodes {
                if n.node.group(G).is_some_and(|g| g.status().is_leader()) {
                    return *id;
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn restart(&mut self, id: u64) {
        let l = tokio::net::TcpListener::bind(&self.peers[&id])
            .await
            .unwrap();
        let n = GrpcNode::start(
            self.config(id),
            l,
            self.peers.clone(),
            &[G],
            &[],
            &self.factory,
        )
        .unwrap();
        self.nodes.insert(id, n);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let factory: SmFactory = Arc::new(|_, _| Box::new(CountingSm::default()));
    let (listeners, peers) = bind_local(3).await.unwrap();
    let mut bench = Bench {
        dir: tempfile::tempdir().unwrap(),
        peers: peers.clone(),
        nodes: HashMap::new(),
        factory,
        sync: !args.no_fsync,
    };
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let n = GrpcNode::start(
            bench.config(id),
            l,
            peers.clone(),
            &[G],
            &[1, 2, 3],
            &bench.factory,
        )
        .unwrap();
        bench.nodes.insert(id, n);
    }
    println!(
        "consensus bench: 3 nodes, loopback gRPC, fsync {}, {}-byte proposals, {} s per level",
        if bench.sync { "on" } else { "off" },
        args.size,
        args.seconds
    );
    println!("| proposers | committed/s | p50 ms | p99 ms | p99.9 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in &args.proposers {
        let leader = bench.leader().await;
        let h = bench.nodes[&leader].node.group(G).unwrap();
        let warm = Instant::now() + Duration::from_secs(1);
        let end = warm + Duration::from_secs(args.seconds);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let h = h.clone();
                let payload = vec![7u8; args.size];
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                    let mut errors = 0u64;
                    loop {
                        let t = Instant::now();
                        if t >= end {
                            break;
                        }
                        let ok = h.propose(payload.clone()).await.is_ok();
                        if t >= warm {
                            if ok {
                                hist.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                            } else {
                                errors += 1;
                            }
                        }
                    }
                    (hist, errors)
                })
            })
            .collect();
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.unwrap();
            hist.add(h).unwrap();
            errors += e;
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {n} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |{}",
            hist.len() as f64 / args.seconds as f64,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            hist.max() as f64 / 1000.0,
            if errors > 0 {
                format!(" ({errors} errors)")
            } else {
                String::new()
            }
        );
    }

    // Failover: kill the leader, then propose against the survivors until
    // one commits; the figure is kill → first commit.
    let mut times = Vec::new();
    for _ in 0..args.failovers {
        let old = bench.leader().await;
        let survivors: Vec<u64> = (1..=3).filter(|&n| n != old).collect();
        let handles: Vec<_> = survivors
            .iter()
            .map(|id| bench.nodes[id].node.group(G).unwrap())
            .collect();
        let killed = bench.nodes.remove(&old).unwrap();
        let t0 = Instant::now();
        // Stop the leader's transport first: from here on it is gone for
        // the others; the rest of its teardown is not on the clock.
        let kill = tokio::spawn(killed.kill());
        'outer: loop {
            for h in &handles {
                if h.status().is_leader() && h.propose(vec![1; args.size]).await.is_ok() {
                    break 'outer;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no commit after failover"
            );
        }
        let took = t0.elapsed();
        times.push(took);
        kill.await.unwrap();
        bench.restart(old).await;
        // Let the restarted node catch up before the next round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    times.sort();
    let fmt: Vec<String> = times
        .iter()
        .map(|t| format!("{:.0}", t.as_secs_f64() * 1000.0))
        .collect();
    println!(
        "failover (leader killed → next commit): median {:.0} ms, max {:.0} ms over {} kills [{}] ms",
        times[times.len() / 2].as_secs_f64() * 1000.0,
        times.last().unwrap().as_secs_f64() * 1000.0,
        times.len(),
        fmt.join(", ")
    );
    for (_, n) in bench.nodes {
        n.kill().await;
    }
}
