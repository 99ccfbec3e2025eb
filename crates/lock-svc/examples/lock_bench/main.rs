//! lock-svc benchmark: three replicas in this process serving real gRPC on
//! 127.0.0.1 with fsync on, driven by `dsync_client` over loopback.
//!
//! 1. Uncontended latency: one client, acquire + release of distinct
//!    resources, p50/p99 of each call.
//! 2. Throughput: N clients (each its own session) looping acquire +
//!    release (exclusive), on distinct resources and on 10 hot ones.
//! 3. The same rows against a three-member etcd cluster on loopback (fsync
//!    on, its own data directories) through etcd's lock API — a lease per
//!    client, then Lock + Unlock — when `etcd` is installed (Debian
//!    `etcd-server`; `cargo xtask bench lock` installs it), with the ratio.
//!
//! Run with `cargo xtask bench lock`.

mod keepalive;

use std::time::{Duration, Instant};

use clap::Parser;
use consensus::testkit::{free_port, release_binary, spawn_replicas, Procs};
use dsync_client::{LockClient, LockMode};
use hdrhistogram::Histogram;
use proto::etcd::etcdserverpb::lease_client::LeaseClient;
use proto::etcd::etcdserverpb::LeaseGrantRequest;
use proto::etcd::v3lockpb::lock_client::LockClient as EtcdLockClient;
use proto::etcd::v3lockpb::{LockRequest, UnlockRequest};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 2000)]
    latency_rounds: usize,
    /// gRPC connections shared by the clients (each system gets as many);
    /// 0 = one per client.
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Before the rows, 64 clients acquire this many distinct locks in
    /// all and keep them (state size: fill rate, RSS and disk per replica,
    /// then the rows on top).
    #[arg(long, default_value_t = 0)]
    held: usize,
    /// Instead of the rows: this many sessions (and as many etcd leases)
    /// kept alive for `--seconds`; keep-alives/s, Raft entries/s, CPU.
    #[arg(long, default_value_t = 0)]
    keepalive: usize,
    /// The TTL of those sessions and leases (a keep-alive every TTL / 3).
    #[arg(long, default_value_t = 9000)]
    keepalive_ttl_ms: u64,
    /// Also run every dsync row with each client's operations on one
    /// session stream (the Session rpc) instead of unary calls.
    #[arg(long)]
    stream: bool,
    /// With `--stream`: only the stream rows (for profiling one of them).
    #[arg(long)]
    stream_only: bool,
    /// Which rows: both, distinct (each client its own resources) or hot
    /// (all clients on 10 resources).
    #[arg(long, default_value = "both", value_parser = ["both", "distinct", "hot"])]
    resources: String,
    /// Run the rows against etcd too: auto (if `etcd` is installed), off.
    #[arg(long, default_value = "auto")]
    etcd: String,
}

/// One throughput row's figures.
struct Row {
    pairs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    pairs: u64,
    /// CPU (user + system) the three server processes spent per pair, µs.
    cpu_us_per_pair: f64,
    /// CPU this load generator (the clients) spent per pair, µs.
    client_us_per_pair: f64,
}

impl Row {
    fn of(all: &Histogram<u64>, secs: f64, errors: u64) -> Self {
        Self {
            pairs_per_s: all.len() as f64 / secs,
            p50_ms: ms(all, 0.5),
            p99_ms: ms(all, 0.99),
            errors,
            pairs: all.len(),
            cpu_us_per_pair: 0.0,
            client_us_per_pair: 0.0,
        }
    }

    /// `row`, with the CPU the server processes `procs` and this load
    /// generator spent on it.
    async fn measured(procs: &Procs, row: impl std::future::Future<Output = Row>) -> Row {
        let used = || -> Duration { procs.0.iter().map(|p| keepalive::cpu(p.id())).sum() };
        let own = || keepalive::cpu(std::process::id());
        let (before, own_before) = (used(), own());
        let mut r = row.await;
        let per_pair = |d: Duration| d.as_micros() as f64 / r.pairs.max(1) as f64;
        r.cpu_us_per_pair = per_pair(used() - before);
        r.client_us_per_pair = per_pair(own() - own_before);
        r
    }
}

fn resource(hot: bool, i: usize, k: u64) -> String {
    if hot {
        format!("hot-{}", (i as u64 + k) % 10)
    } else {
        format!("c{i}-{}", k % 16)
    }
}

/// RSS of each process and disk used by each data directory
/// (`<dir>/<prefix>N`), for the held-state row.
fn footprint(procs: &[std::process::Child], dir: &std::path::Path, prefix: &str) -> String {
    let rss: Vec<String> = procs
        .iter()
        .map(|c| {
            std::fs::read_to_string(format!("/proc/{}/status", c.id()))
                .ok()
                .and_then(|st| {
                    st.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1).map(|kb| kb.to_string()))
                })
                .map_or("?".into(), |kb| {
                    format!("{} MB", kb.parse::<u64>().unwrap_or(0) / 1024)
                })
        })
        .collect();
    let disk: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            let mut v: Vec<(String, u64)> = rd
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| (e.file_name().to_string_lossy().into_owned(), du(&e.path())))
                .collect();
            v.sort();
            v.into_iter()
                .map(|(_, b)| format!("{} MB", b >> 20))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "RSS per replica [{}], disk per replica [{}]",
        rss.join(", "),
        disk.join(", ")
    )
}

fn du(path: &std::path::Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// 64 sessions acquire `held` distinct locks in all and keep them; answers
/// the sessions (dropping them releases everything), the fill rate and the
/// slowest acquire.
async fn dsync_hold(conns: &[LockClient], held: usize) -> (Vec<dsync_client::Session>, f64, f64) {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let c = conns[i % conns.len()].clone();
            tokio::spawn(async move {
                let s = c
                    .open_session(Duration::from_secs(120), "held")
                    .await
                    .unwrap();
                let mut max = Duration::ZERO;
                for k in (i..held).step_by(64) {
                    let t = Instant::now();
                    c.acquire(
                        s.id(),
                        &format!("held-{k}"),
                        LockMode::Exclusive,
                        Some(Duration::ZERO),
                    )
                    .await
                    .unwrap();
                    max = max.max(t.elapsed());
                }
                (s, max)
            })
        })
        .collect();
    let (mut sessions, mut max) = (Vec::new(), Duration::ZERO);
    for t in tasks {
        let (s, m) = t.await.unwrap();
        sessions.push(s);
        max = max.max(m);
    }
    (
        sessions,
        held as f64 / t0.elapsed().as_secs_f64(),
        max.as_secs_f64() * 1000.0,
    )
}

/// The same against etcd: 64 leases (kept by their 600 s TTL), `held`
/// distinct locks.
async fn etcd_hold(chans: &[tonic::transport::Channel], held: usize) -> (f64, f64) {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let ch = chans[i % chans.len()].clone();
            tokio::spawn(async move {
                let lease = etcd_lease(&ch, 600).await;
                let mut locks = EtcdLockClient::new(ch);
                let mut max = Duration::ZERO;
                for k in (i..held).step_by(64) {
                    let t = Instant::now();
                    locks
                        .lock(LockRequest {
                            name: format!("held-{k}").into_bytes(),
                            lease,
                        })
                        .await
                        .unwrap();
                    max = max.max(t.elapsed());
                }
                max
            })
        })
        .collect();
    let mut max = Duration::ZERO;
    for t in tasks {
        max = max.max(t.await.unwrap());
    }
    (
        held as f64 / t0.elapsed().as_secs_f64(),
        max.as_secs_f64() * 1000.0,
    )
}

/// Starts three `lock-svc` processes (the release binary `cargo xtask
/// bench lock` builds) on loopback; answers their addresses once a session
/// can be opened.
async fn start_dsync(dir: &std::path::Path) -> (Procs, Vec<String>) {
    let (procs, endpoints) = spawn_replicas(&release_binary("lock-svc"), dir, &[]);
    let probe = LockClient::connect(endpoints.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = probe.open_session(Duration::from_secs(5), "ready").await {
            let _ = s.close().await;
            break;
        }
        assert!(Instant::now() < deadline, "lock-svc did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (procs, endpoints)
}

/// Starts a three-member etcd cluster on loopback; answers its client
/// addresses once a lease can be granted.
async fn start_etcd(dir: &std::path::Path) -> (Procs, Vec<String>) {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster: Vec<String> = peer
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{i}=http://127.0.0.1:{p}"))
        .collect();
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let child = std::process::Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("e{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bench",
            ])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start etcd");
        procs.0.push(child);
    }
    let endpoints: Vec<String> = client.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = match etcd_channel(&endpoints[0]).await {
            Ok(ch) => LeaseClient::new(ch)
                .lease_grant(LeaseGrantRequest { ttl: 5, id: 0 })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "etcd did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (procs, endpoints)
}

/// A new etcd lease of `ttl` seconds.
async fn etcd_lease(ch: &tonic::transport::Channel, ttl: i64) -> i64 {
    LeaseClient::new(ch.clone())
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn etcd_channel(addr: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
}

/// The throughput row against etcd: per client a 30 s lease, then Lock +
/// Unlock pairs (etcd's Lock blocks until granted, FIFO by revision).
async fn etcd_row(chans: &[tonic::transport::Channel], n: usize, hot: bool, seconds: u64) -> Row {
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ch = chans[i % chans.len()].clone();
            tokio::spawn(async move {
                let lease = etcd_lease(&ch, 30).await;
                let mut locks = EtcdLockClient::new(ch);
                let (mut h, mut errors, mut k) = (hist(), 0u64, 0u64);
                while Instant::now() < end {
                    k += 1;
                    let name = resource(hot, i, k).into_bytes();
                    let t = Instant::now();
                    match locks.lock(LockRequest { name, lease }).await {
                        Ok(r) => {
                            let key = r.into_inner().key;
                            if locks.unlock(UnlockRequest { key }).await.is_ok() {
                                h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                (h, errors)
            })
        })
        .collect();
    gather(tasks, seconds).await
}

/// Waits for a row's clients (each answering its pair latencies and
/// errors) and sums them into the row.
async fn gather(tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>, seconds: u64) -> Row {
    let t0 = Instant::now();
    let (mut all, mut errors) = (hist(), 0);
    for t in tasks {
        let (h, e) = t.await.unwrap();
        all.add(h).unwrap();
        errors += e;
    }
    Row::of(&all, t0.elapsed().as_secs_f64().max(seconds as f64), errors)
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
    let (_replicas, endpoints) = start_dsync(dir.path()).await;
    // One connection per client (`--connections 0`), or that many shared.
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let n_conns = if args.connections == 0 {
        max_clients
    } else {
        args.connections
    };
    let conns: Vec<LockClient> = (0..n_conns)
        .map(|_| LockClient::connect(endpoints.clone()).unwrap())
        .collect();

    if args.keepalive > 0 {
        keepalives(&args, &conns, &endpoints, &_replicas, dir.path(), n_conns).await;
        return;
    }
    println!(
        "lock bench: 3 lock-svc processes, loopback gRPC, fsync on, exclusive locks, {}",
        if args.connections == 0 {
            "one connection per client".to_string()
        } else {
            format!("{} shared connections", args.connections)
        }
    );
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

    let _holders = if args.held > 0 {
        println!(
            "dsync before the fill: {}",
            footprint(&_replicas.0, dir.path(), "n")
        );
        let (sessions, rate, max_ms) = dsync_hold(&conns, args.held).await;
        println!(
            "dsync: {} locks held by 64 sessions, filled at {rate:.0} acquires/s (max {max_ms:.0} ms); {}",
            args.held,
            footprint(&_replicas.0, dir.path(), "n")
        );
        sessions
    } else {
        Vec::new()
    };
    let hots: &[bool] = match args.resources.as_str() {
        "distinct" => &[false],
        "hot" => &[true],
        _ => &[false, true],
    };
    let mut rows = Vec::new();
    for &hot in hots {
        for &n in &args.clients {
            if !(args.stream && args.stream_only) {
                let row = dsync_row(&conns, n, hot, args.seconds, false);
                rows.push((n, hot, false, Row::measured(&_replicas, row).await));
            }
            if args.stream {
                let row = dsync_row(&conns, n, hot, args.seconds, true);
                rows.push((n, hot, true, Row::measured(&_replicas, row).await));
            }
        }
    }
    drop(_replicas);
    if args.held > 0 {
        restart_all(dir.path(), args.held).await;
    }

    let mut etcd_rows = Vec::new();
    if args.etcd != "off" && etcd_present() {
        let (_etcd, endpoints) = start_etcd(dir.path()).await;
        let mut chans = Vec::new();
        for i in 0..n_conns {
            chans.push(etcd_channel(&endpoints[i % endpoints.len()]).await.unwrap());
        }
        if args.held > 0 {
            let (rate, max_ms) = etcd_hold(&chans, args.held).await;
            println!(
                "etcd: {} locks held under 64 leases, filled at {rate:.0} locks/s (max {max_ms:.0} ms); {}",
                args.held,
                footprint(&_etcd.0, dir.path(), "e")
            );
        }
        for &hot in hots {
            for &n in &args.clients {
                let row = etcd_row(&chans, n, hot, args.seconds);
                etcd_rows.push(Row::measured(&_etcd, row).await);
            }
        }
    } else if args.etcd != "off" {
        println!("(etcd not installed: no etcd rows; `apt-get install etcd-server`)");
    }
    println!(
        "| clients | resources | dsync pairs/s (p50, p99 ms) | errors | etcd pairs/s (p50, p99 ms) | errors | ratio | server CPU per pair, dsync / etcd | client CPU per pair, dsync / etcd |"
    );
    println!("|---:|---|---|---:|---|---:|---:|---|---|");
    let mut etcd_of = std::collections::HashMap::new();
    let mut k = 0;
    for &hot in hots {
        for &n in &args.clients {
            if let Some(e) = etcd_rows.get(k) {
                etcd_of.insert((n, hot), e);
            }
            k += 1;
        }
    }
    for (n, hot, stream, d) in rows.iter() {
        let e_row = etcd_of.get(&(*n, *hot));
        let (e, ratio) = match e_row {
            Some(e) => (
                format!("{:.0} ({:.1}, {:.1})", e.pairs_per_s, e.p50_ms, e.p99_ms),
                format!("{:.1}×", d.pairs_per_s / e.pairs_per_s.max(1e-9)),
            ),
            None => ("—".into(), "—".into()),
        };
        let e_cpu = e_row.map_or("—".into(), |e| format!("{:.0} µs", e.cpu_us_per_pair));
        let e_client = e_row.map_or("—".into(), |e| format!("{:.0} µs", e.client_us_per_pair));
        println!(
            "| {n} | {}{} | {:.0} ({:.1}, {:.1}) | {} | {e} | {} | {ratio} | {:.0} µs / {e_cpu} | {:.0} µs / {e_client} |",
            if *hot { "10 hot" } else { "distinct" },
            if *stream { ", stream" } else { "" },
            d.pairs_per_s,
            d.p50_ms,
            d.p99_ms,
            d.errors,
            e_row.map_or(0, |e| e.errors),
            d.cpu_us_per_pair,
            d.client_us_per_pair,
        );
    }
}

/// The throughput row against dsync: N clients, each its own session,
/// acquire + release pairs.
async fn dsync_row(conns: &[LockClient], n: usize, hot: bool, seconds: u64, stream: bool) -> Row {
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = conns[i % conns.len()].clone();
            tokio::spawn(async move {
                let s = c
                    .open_session(Duration::from_secs(30), "bench")
                    .await
                    .unwrap();
                let (mut h, mut errors, mut k) = (hist(), 0u64, 0u64);
                if stream {
                    let st = c.stream(s.id()).await.unwrap();
                    while Instant::now() < end {
                        k += 1;
                        let res = resource(hot, i, k);
                        let t = Instant::now();
                        let wait = Some(Duration::from_secs(10));
                        match st.acquire(&res, LockMode::Exclusive, wait).await {
                            Ok(r) if st.release(r.lock_id, "").await.is_ok() => {
                                h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                            }
                            _ => errors += 1,
                        }
                    }
                    drop(st);
                    let _ = s.close().await;
                    return (h, errors);
                }
                while Instant::now() < end {
                    k += 1;
                    let res = resource(hot, i, k);
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
    gather(tasks, seconds).await
}

fn etcd_present() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `--keepalive` measurement, against dsync and then etcd.
async fn keepalives(
    args: &Args,
    conns: &[LockClient],
    endpoints: &[String],
    replicas: &Procs,
    dir: &std::path::Path,
    n_conns: usize,
) {
    let ttl = Duration::from_millis(args.keepalive_ttl_ms);
    println!(
        "keep-alive bench: {} sessions, TTL {} ms (a keep-alive every {} ms), {} s, {n_conns} connections",
        args.keepalive,
        ttl.as_millis(),
        (ttl / 3).as_millis(),
        args.seconds
    );
    let pids: Vec<u32> = replicas.0.iter().map(|c| c.id()).collect();
    let d = keepalive::dsync(
        conns,
        endpoints,
        &pids,
        args.keepalive,
        ttl,
        args.seconds,
        false,
    )
    .await;
    println!("dsync, one KeepAlive per session:        {d}");
    let d = keepalive::dsync(
        conns,
        endpoints,
        &pids,
        args.keepalive,
        ttl,
        args.seconds,
        true,
    )
    .await;
    println!("dsync, one KeepAlive per connection:     {d}");
    if args.etcd != "off" && etcd_present() {
        let (etcd, endpoints) = start_etcd(dir).await;
        let mut chans = Vec::new();
        for i in 0..n_conns {
            chans.push(etcd_channel(&endpoints[i % endpoints.len()]).await.unwrap());
        }
        let pids: Vec<u32> = etcd.0.iter().map(|c| c.id()).collect();
        let e = keepalive::etcd(&chans, &pids, args.keepalive, ttl, args.seconds).await;
        println!("etcd, one LeaseKeepAlive stream per connection: {e}");
    }
}

/// After `kill -9` of all three replicas (holding `held` locks): starts
/// them again on the same directories and times until the cluster serves
/// (a session opens and a held lock shows as held), then the footprint.
async fn restart_all(dir: &std::path::Path, held: usize) {
    let t0 = Instant::now();
    // Their restore and replay times (consensus logs them) go to stderr.
    let logs = [("RUST_LOG", "warn,consensus=info".to_owned())];
    let (procs, endpoints) = spawn_replicas(&release_binary("lock-svc"), dir, &logs);
    let client = LockClient::connect(endpoints).unwrap();
    let probe = format!("held-{}", held - 1);
    loop {
        let opened = client.open_session(Duration::from_secs(5), "restart").await;
        if let (Ok(s), Ok(st)) = (opened, client.status(&probe).await) {
            let served = t0.elapsed();
            assert_eq!(st.holders.len(), 1, "the held lock survived: {st:?}");
            let _ = s.close().await;
            println!(
                "dsync: all three replicas killed (SIGKILL) and restarted: serving again after {:.2} s; {}",
                served.as_secs_f64(),
                footprint(&procs.0, dir, "n")
            );
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "did not serve after a restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
