//! `cargo xtask bench cache`: three cache-svc nodes as separate processes
//! with a real `redis-server` behind them, against `redis-server` alone
//! under the same client load.
//!
//! Load: `--clients` closed-loop clients in `--apps` client processes
//! (each app one `CacheClient` — one connection to one node, one near
//! cache — or one Redis connection, shared by its clients; apps spread
//! over the three nodes), keys drawn from a Zipf distribution (s = 0.99)
//! over `--keys`, `--read-pct` reads, `--value-bytes` values. Rows:
//! - dsync without near cache (every read is a gRPC call to a node);
//! - dsync with near cache (L1 in the client);
//! - hit ratio with and without refresh-ahead (nodes restarted with a
//!   short line TTL, so lines run out during the phase);
//! - near-cache hit latency (a lookup in the client, no call);
//! - Redis alone: GET/SET through the `redis` crate, same clients.
//!
//! Each row prints throughput, p50/p99 of gets and sets, and the ratio to
//! the Redis row. Figures go to BENCHMARKS.md with the command.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::testkit::{free_port, release_binary, spawn_replicas, Procs};
use dsync_client::cache::{CacheClient, CacheOptions};
use hdrhistogram::Histogram;
use rand::{RngExt, SeedableRng};

#[derive(Clone, Copy)]
struct Args {
    seconds: u64,
    clients: usize,
    /// Client processes ("apps"): each one `CacheClient` (one connection,
    /// one near cache) or one Redis connection, shared by its clients.
    apps: usize,
    keys: usize,
    value_bytes: usize,
    read_pct: u32,
    zipf: f64,
}

fn parse() -> Args {
    let mut a = Args {
        seconds: 10,
        clients: 32,
        apps: 4,
        keys: 100_000,
        value_bytes: 1024,
        read_pct: 90,
        zipf: 0.99,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--clients" => a.clients = v.parse().expect("--clients N"),
            "--apps" => a.apps = v.parse().expect("--apps N"),
            "--keys" => a.keys = v.parse().expect("--keys N"),
            "--value-bytes" => a.value_bytes = v.parse().expect("--value-bytes N"),
            "--read-pct" => a.read_pct = v.parse().expect("--read-pct N"),
            "--zipf" => a.zipf = v.parse().expect("--zipf S"),
            other => panic!(
                "unknown argument {other}; use --seconds --clients --apps --keys --value-bytes --read-pct --zipf"
            ),
        }
        i += 2;
    }
    a
}

/// Zipf(s) over 0..n by inverse CDF (binary search in a precomputed table).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf }
    }

    fn sample(&self, rng: &mut impl rand::Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

fn start_redis(dir: &std::path::Path) -> (Procs, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server (apt-get install redis-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Procs(vec![child]), port)
}

async fn start_dsync(
    dir: &std::path::Path,
    store: &str,
    extra: &[(&str, String)],
) -> (Procs, Vec<String>) {
    let mut env = vec![
        ("DSYNC_STORE", store.to_string()),
        ("DSYNC_MEMORY_LIMIT_MB", "512".to_string()),
    ];
    env.extend(extra.iter().cloned());
    let (procs, endpoints) = spawn_replicas(&release_binary("cache-svc"), dir, &env);
    // Ready: every node a member of one epoch with all three.
    let probe = CacheClient::with_options(
        endpoints.clone(),
        CacheOptions {
            near_cache: false,
            ..Default::default()
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = probe.status_all().await;
        let ok = all
            .iter()
            .all(|(_, r)| r.as_ref().is_ok_and(|s| s.member && s.members.len() == 3));
        let epochs: Vec<u64> = all
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|s| s.epoch))
            .collect();
        if ok && epochs.windows(2).all(|w| w[0] == w[1]) && probe.get("ready").await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "cache-svc nodes not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (procs, endpoints)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

struct Row {
    name: String,
    ops: f64,
    get_p50: f64,
    get_p99: f64,
    set_p50: f64,
    set_p99: f64,
    extra: String,
}

fn print_row(r: &Row, base: Option<&Row>) {
    let ratio = base.map_or(String::new(), |b| format!("{:.2}×", r.ops / b.ops));
    let p50r = base.map_or(String::new(), |b| format!("{:.2}×", r.get_p50 / b.get_p50));
    println!(
        "{:<34} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8} {:>8}  {}",
        r.name, r.ops, r.get_p50, r.get_p99, r.set_p50, r.set_p99, ratio, p50r, r.extra
    );
}

/// Runs `clients` closed loops of 90/10 (by `read_pct`) gets/sets for
/// `secs`; `op(client, key, is_read)` does one operation.
async fn drive<F, Fut>(
    a: &Args,
    zipf: &Arc<Zipf>,
    secs: u64,
    op: F,
) -> (f64, Histogram<u64>, Histogram<u64>)
where
    F: Fn(usize, String, bool) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (op, zipf, stop, done) = (op.clone(), zipf.clone(), stop.clone(), done.clone());
        let read_pct = a.read_pct;
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64 + 7);
            let (mut gets, mut sets) = (hist(), hist());
            // Bounded in count as well as time.
            for _ in 0..50_000_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("key-{}", zipf.sample(&mut rng));
                let read = rng.random_range(0..100) < read_pct;
                let t = Instant::now();
                if op(c, key, read).await {
                    let ns = t.elapsed().as_nanos() as u64;
                    let _ = if read {
                        gets.record(ns.max(1))
                    } else {
                        sets.record(ns.max(1))
                    };
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            (gets, sets)
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let (mut gets, mut sets) = (hist(), hist());
    for t in tasks {
        let (g, s) = t.await.unwrap();
        gets.add(g).unwrap();
        sets.add(s).unwrap();
    }
    (n as f64 / elapsed, gets, sets)
}

/// Sum of hits, peer hits, misses and refreshes over the nodes.
async fn node_counters(c: &CacheClient) -> [u64; 4] {
    let mut t = [0u64; 4];
    for (_, r) in c.status_all().await {
        if let Some(s) = r.ok().and_then(|s| s.stats) {
            t[0] += s.hits;
            t[1] += s.peer_hits;
            t[2] += s.misses;
            t[3] += s.refreshes;
        }
    }
    t
}

fn hit_ratio(before: [u64; 4], after: [u64; 4]) -> (f64, f64) {
    let h = (after[0] - before[0]) as f64;
    let p = (after[1] - before[1]) as f64;
    let m = (after[2] - before[2]) as f64;
    let total = (h + p + m).max(1.0);
    ((h + p) / total, h / total)
}

async fn dsync_phase(
    a: &Args,
    zipf: &Arc<Zipf>,
    endpoints: &[String],
    near: bool,
    warm: bool,
    name: &str,
) -> Row {
    let value = bytes::Bytes::from(vec![b'x'; a.value_bytes]);
    let apps: Vec<CacheClient> = (0..a.apps.max(1))
        .map(|i| {
            CacheClient::with_options(
                [endpoints[i % endpoints.len()].clone()],
                CacheOptions {
                    near_cache: near,
                    ..Default::default()
                },
            )
            .unwrap()
        })
        .collect();
    let clients: Arc<Vec<CacheClient>> = Arc::new(
        (0..a.clients)
            .map(|i| apps[i % apps.len()].clone())
            .collect(),
    );
    if near {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !apps.iter().all(|c| c.near_cache_live()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Warm: every key read once through each node, so the rows measure a
    // steady state rather than first touches.
    if warm {
        for ep in endpoints {
            let c = CacheClient::with_options(
                [ep.clone()],
                CacheOptions {
                    near_cache: false,
                    ..Default::default()
                },
            )
            .unwrap();
            let keys: Vec<Vec<u8>> = (0..a.keys)
                .map(|k| format!("key-{k}").into_bytes())
                .collect();
            for chunk in keys.chunks(500) {
                let refs: Vec<&[u8]> = chunk.iter().map(|k| k.as_slice()).collect();
                let _ = c.batch_get(&refs).await;
            }
        }
    }
    let before = node_counters(&clients[0]).await;
    let cl = clients.clone();
    let errors = Arc::new(AtomicU64::new(0));
    let errs = errors.clone();
    let (ops, gets, sets) = drive(a, zipf, a.seconds, move |c, key, read| {
        let cl = cl.clone();
        let value = value.clone();
        let errs = errs.clone();
        async move {
            let r = if read {
                cl[c].get(&key).await.map(|_| ())
            } else {
                cl[c].set(&key, value).await.map(|_| ())
            };
            if r.is_err() {
                errs.fetch_add(1, Ordering::Relaxed);
            }
            r.is_ok()
        }
    })
    .await;
    let after = node_counters(&clients[0]).await;
    let (ratio, local) = hit_ratio(before, after);
    let (mut nh, mut nm) = (0, 0);
    for c in apps.iter() {
        let s = c.near_stats();
        nh += s.hits;
        nm += s.misses;
    }
    let near_part = if near {
        format!(
            " near hit {:.1}%,",
            100.0 * nh as f64 / (nh + nm).max(1) as f64
        )
    } else {
        String::new()
    };
    Row {
        name: name.into(),
        ops,
        get_p50: us(&gets, 0.5),
        get_p99: us(&gets, 0.99),
        set_p50: us(&sets, 0.5),
        set_p99: us(&sets, 0.99),
        extra: format!(
            "node hit ratio {:.1}% (own lines {:.1}%),{near_part} errors {}",
            ratio * 100.0,
            local * 100.0,
            errors.load(Ordering::Relaxed)
        ),
    }
}

async fn redis_phase(a: &Args, zipf: &Arc<Zipf>, port: u16) -> Row {
    let value = vec![b'x'; a.value_bytes];
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut apps = Vec::new();
    for _ in 0..a.apps.max(1) {
        apps.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    let conns: Arc<Vec<_>> = Arc::new(
        (0..a.clients)
            .map(|i| apps[i % apps.len()].clone())
            .collect(),
    );
    let (ops, gets, sets) = drive(a, zipf, a.seconds, move |c, key, read| {
        let mut conn = conns[c].clone();
        let value = value.clone();
        async move {
            if read {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .is_ok()
            } else {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
            }
        }
    })
    .await;
    Row {
        name: "redis-server alone (redis crate)".into(),
        ops,
        get_p50: us(&gets, 0.5),
        get_p99: us(&gets, 0.99),
        set_p50: us(&sets, 0.5),
        set_p99: us(&sets, 0.99),
        extra: String::new(),
    }
}

/// Preloads every key, so reads find values and misses mean "not cached".
async fn preload_redis(port: u16, keys: usize, value_bytes: usize, dsync_layout: bool) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        let mut p = redis::pipe();
        for k in chunk {
            if dsync_layout {
                let mut v = 1u64.to_be_bytes().to_vec();
                v.extend(std::iter::repeat_n(b'x', value_bytes));
                p.cmd("SET").arg(format!("dsync:key-{k}")).arg(v);
            } else {
                p.cmd("SET")
                    .arg(format!("key-{k}"))
                    .arg(vec![b'x'; value_bytes]);
            }
        }
        p.query_async::<()>(&mut conn).await.unwrap();
    }
}

/// Near-cache hit latency: lookups of hot keys held in one client's L1.
async fn near_latency(endpoints: &[String], zipf: &Zipf) -> (f64, f64, usize) {
    let c = CacheClient::connect([endpoints[0].clone()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.near_cache_live() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hot: Vec<String> = (0..100).map(|k| format!("key-{k}")).collect();
    for k in &hot {
        let _ = c.get(k).await;
        let _ = c.get(k).await;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut hits = 0;
    for _ in 0..200_000 {
        let k = &hot[zipf.sample(&mut rng) % hot.len()];
        let t = Instant::now();
        let r = c.near_get(k.as_bytes());
        let ns = t.elapsed().as_nanos() as u64;
        if r.is_some() {
            hits += 1;
            let _ = h.record(ns.max(1));
        }
    }
    (
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        hits,
    )
}

#[tokio::main]
async fn main() {
    let a = parse();
    let zipf = Arc::new(Zipf::new(a.keys, a.zipf));
    let dir = tempfile::tempdir().unwrap();
    println!(
        "cache bench: {} clients in {} apps, {} keys Zipf(s={}), {}% reads, {} B values, {} s per row; 3 cache-svc nodes (processes) with redis-server behind them",
        a.clients, a.apps, a.keys, a.zipf, a.read_pct, a.value_bytes, a.seconds
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "row", "ops/s", "get p50", "get p99", "set p50", "set p99", "vs redis", "p50 ×"
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "", "", "µs", "µs", "µs", "µs"
    );

    // Redis alone first: the baselines the rows are compared with.
    let one = Args {
        clients: 1,
        apps: 1,
        ..a
    };
    let (redis_alone, rport) = start_redis(&dir.path().join("redis-alone"));
    preload_redis(rport, a.keys, a.value_bytes, false).await;
    let mut base1 = redis_phase(&one, &zipf, rport).await;
    base1.name = "redis-server alone, 1 client".into();
    print_row(&base1, None);
    let base = redis_phase(&a, &zipf, rport).await;
    drop(redis_alone);
    print_row(&base, None);

    let (_redis, port) = start_redis(&dir.path().join("redis"));
    preload_redis(port, a.keys, a.value_bytes, true).await;
    let url = format!("redis://127.0.0.1:{port}");
    {
        let (_nodes, eps) = start_dsync(&dir.path().join("d1"), &url, &[]).await;
        let r = dsync_phase(&one, &zipf, &eps, false, true, "dsync via gRPC, 1 client").await;
        print_row(&r, Some(&base1));
        let r = dsync_phase(
            &a,
            &zipf,
            &eps,
            false,
            false,
            "dsync via gRPC (no near cache)",
        )
        .await;
        print_row(&r, Some(&base));
        let r = dsync_phase(&a, &zipf, &eps, true, false, "dsync with near cache (L1)").await;
        print_row(&r, Some(&base));
        let (p50, p99, hits) = near_latency(&eps, &zipf).await;
        println!(
            "{:<34} near-cache hit latency: p50 {p50:.0} ns, p99 {p99:.0} ns ({hits} hits)",
            "dsync near cache lookup"
        );
    }
    // Refresh-ahead: lines live 2 s; with refresh-ahead hot lines are
    // reloaded in their last 20 %, without it they miss when they run out.
    // Read-only load, so lines end by their TTL rather than by writes.
    let ro = Args { read_pct: 100, ..a };
    for (refresh, name) in [
        ("0.2", "reads only, line TTL 2 s, refresh on"),
        ("0", "reads only, line TTL 2 s, refresh off"),
    ] {
        let extra = [
            ("DSYNC_LINE_TTL_MS", "2000".to_string()),
            ("DSYNC_REFRESH_AHEAD", refresh.to_string()),
        ];
        let (_nodes, eps) =
            start_dsync(&dir.path().join(format!("rf{refresh}")), &url, &extra).await;
        let r = dsync_phase(&ro, &zipf, &eps, false, true, name).await;
        print_row(&r, Some(&base));
    }
}
