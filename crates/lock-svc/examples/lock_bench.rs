//! lock-svc benchmark: three replicas in this process serving real gRPC on
//! 127.0.0.1 with fsync on, driven by `dsync_client` over loopback.
//!
//! 1. Uncontended latency: one client, acquire + release of distinct
//!    resources, p50/p99 of each call.
//! 2. Throughput: N clients (each its own session) looping acquire +
//!    release (exclusive), on distinct resources and on 10 hot ones.
//!
//! Run with `cargo xtask bench lock`.

use std::time::{Duration, Instant};

use clap::Parser;
use consensus::testkit::bind_local;
use dsync_client::{LockClient, LockMode};
use hdrhistogram::Histogram;
use lock_svc::{LockConfig, LockServer};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 2000)]
    latency_rounds: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let (listeners, addrs) = bind_local(3).await.unwrap();
    let mut servers = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let cfg = LockConfig::new(id, addrs.clone(), dir.path().join(format!("n{id}")));
        servers.push(LockServer::start(cfg, l).unwrap());
    }
    // Clients start at the leader (they would find it anyway).
    let leader = loop {
        if let Some(s) = servers.iter().find(|s| s.locks.group.status().is_leader()) {
            break s.addr.to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut endpoints = vec![leader];
    let mut rest: Vec<String> = addrs.values().cloned().collect();
    rest.sort();
    endpoints.extend(rest);
    let conns: Vec<LockClient> = (0..args.connections)
        .map(|_| LockClient::connect(endpoints.clone()).unwrap())
        .collect();

    println!("lock bench: 3 replicas, loopback gRPC, fsync on, exclusive locks");
    // 1. Uncontended latency.
    let s = conns[0]
        .open_session(Duration::from_secs(30), "lat")
        .await
        .unwrap();
    let (mut acq, mut rel) = (hist(), hist());
    for i in 0..args.latency_rounds {
        let t = Instant::now();
        let r = conns[0]
            .acquire(
                s.id(),
                &format!("lat-{}", i % 64),
                LockMode::Exclusive,
                Some(Duration::ZERO),
            )
            .await
            .unwrap();
        acq.record(t.elapsed().as_micros().max(1) as u64).unwrap();
        let t = Instant::now();
        conns[0].release(s.id(), r.lock_id, "").await.unwrap();
        rel.record(t.elapsed().as_micros().max(1) as u64).unwrap();
    }
    println!(
        "uncontended, {} rounds: acquire p50 {:.2} ms p99 {:.2} ms; release p50 {:.2} ms p99 {:.2} ms",
        args.latency_rounds,
        ms(&acq, 0.5),
        ms(&acq, 0.99),
        ms(&rel, 0.5),
        ms(&rel, 0.99)
    );
    drop(s);

    println!(
        "| clients | resources | acquire+release pairs/s | pair p50 ms | pair p99 ms | errors |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for hot in [false, true] {
        for &n in &args.clients {
            let end = Instant::now() + Duration::from_secs(args.seconds);
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let c = conns[i % conns.len()].clone();
                    tokio::spawn(async move {
                        let s = c
                            .open_session(Duration::from_secs(30), "bench")
                            .await
                            .unwrap();
                        let mut h = hist();
                        let mut errors = 0u64;
                        let mut k = 0u64;
                        while Instant::now() < end {
                            k += 1;
                            let res = if hot {
                                format!("hot-{}", (i as u64 + k) % 10)
                            } else {
                                format!("c{i}-{}", k % 16)
                            };
                            let t = Instant::now();
                            match c
                                .acquire(
                                    s.id(),
                                    &res,
                                    LockMode::Exclusive,
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                            {
                                Ok(r) => {
                                    if c.release(s.id(), r.lock_id, "").await.is_ok() {
                                        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                                    } else {
                                        errors += 1;
                                    }
                                }
                                Err(_) => errors += 1,
                            }
                        }
                        let _ = s.close().await;
                        (h, errors)
                    })
                })
                .collect();
            let t0 = Instant::now();
            let mut all = hist();
            let mut errors = 0;
            for t in tasks {
                let (h, e) = t.await.unwrap();
                all.add(h).unwrap();
                errors += e;
            }
            let secs = t0.elapsed().as_secs_f64().max(args.seconds as f64);
            println!(
                "| {n} | {} | {:.0} | {:.2} | {:.2} | {errors} |",
                if hot { "10 hot" } else { "distinct" },
                all.len() as f64 / secs,
                ms(&all, 0.5),
                ms(&all, 0.99)
            );
        }
    }
    for s in servers {
        s.kill().await;
    }
}
