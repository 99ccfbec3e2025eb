//! `dsync-e2e load`, `dsync-e2e queue-load` and `dsync-e2e cache-load`:
//! the client side of the Docker end-to-end tests. `queue-load` drives
//! queue-svc (see [`queue`]), `cache-load` cache-svc (see [`cache`]); the
//! rest of this page is about `load`, for lock-svc.
//!
//! Runs inside a container on the cluster's private network while
//! `cargo xtask e2e` cuts the leader off, reconnects it, kills and restarts
//! replicas. It drives:
//! - `--workers` clients looping: acquire `e2e/hot` exclusively (waiting),
//!   write their fencing token to a fenced register (which refuses any token
//!   not larger than the last), hold briefly, release;
//! - one session holding `--markers` shared locks for the whole run.
//!
//! At the end it checks, and prints as `key=value` lines:
//! - no two exclusive holdings overlapped (same process, same clock);
//! - the fenced register never refused a write (tokens only increased);
//! - every marker lock acknowledged at the start is still held (nothing
//!   acknowledged was lost);
//! - the longest gap between two successful grants (`max_gap_ms`), and the
//!   wall-clock time of every grant, so the orchestrator can measure how
//!   soon service resumed after each fault.
//!
//! Exit code 0 only if every check passed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use dsync_client::{LockClient, LockMode, Options};
use parking_lot::Mutex;

mod cache;
mod queue;

#[derive(Parser)]
#[command(name = "dsync-e2e")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Drive load and check safety (see the module docs).
    Load {
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        #[arg(long, default_value_t = 6)]
        workers: usize,
        #[arg(long, default_value_t = 20)]
        markers: usize,
    },
    /// Drive queue-svc and check delivery (see the `queue` module docs).
    QueueLoad(queue::Args),
    /// Drive cache-svc and check linearizability (see the `cache` module
    /// docs).
    CacheLoad(cache::Args),
}

#[derive(Debug, Clone)]
struct Held {
    #[allow(dead_code)] // printed in violation reports
    worker: usize,
    token: u64,
    from: Instant,
    to: Instant,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn opts() -> Options {
    Options {
        retry_for: Duration::from_secs(30),
        ..Options::default()
    }
}

/// Lock clients also follow the leader through watches on every replica.
fn lock_opts() -> Options {
    Options {
        watch_leader: true,
        ..opts()
    }
}

/// Prints `name=t1,t2,…`: how the orchestrator reads timestamps back.
fn print_times(name: &str, times: &[u64]) {
    let list: Vec<String> = times.iter().map(u64::to_string).collect();
    println!("{name}={}", list.join(","));
}

#[tokio::main]
async fn main() {
    let res = match Cli::parse().cmd {
        Cmd::Load {
            endpoints,
            seconds,
            workers,
            markers,
        } => load(endpoints, seconds, workers, markers).await,
        Cmd::QueueLoad(args) => queue::load(args).await,
        Cmd::CacheLoad(args) => cache::load(args).await,
    };
    match res {
        Ok(true) => println!("result=pass"),
        Ok(false) => {
            println!("result=fail");
            std::process::exit(1);
        }
        Err(e) => {
            println!("result=error {e}");
            std::process::exit(2);
        }
    }
}

async fn load(
    endpoints: Vec<String>,
    seconds: u64,
    workers: usize,
    markers: usize,
) -> Result<bool, String> {
    let client =
        LockClient::with_options(endpoints.clone(), lock_opts()).map_err(|e| e.to_string())?;
    // Wait for the cluster (the orchestrator starts us right after it).
    let deadline = Instant::now() + Duration::from_secs(60);
    let marker_session = loop {
        match client
            .open_session(Duration::from_secs(20), "e2e-markers")
            .await
        {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {}", e.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cluster never answered: {e}")),
        }
    };
    let mut marker_guards = Vec::new();
    for i in 0..markers {
        let g = marker_session
            .acquire(&format!("e2e/marker/{i}"), LockMode::Shared, None)
            .await
            .map_err(|e| format!("marker {i}: {e}"))?;
        marker_guards.push(g);
    }
    println!("markers_acquired={markers}");

    let history: Arc<Mutex<Vec<Held>>> = Arc::default();
    let grants_wall: Arc<Mutex<Vec<u64>>> = Arc::default();
    let register = Arc::new(Mutex::new((0u64, 0u64))); // (last token, refusals)
    let stop = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let c = LockClient::with_options(endpoints.clone(), lock_opts()).expect("endpoints");
            let (history, grants_wall, register, stop) = (
                history.clone(),
                grants_wall.clone(),
                register.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut session = None;
                // Bounded by time and by count.
                for _ in 0..1_000_000 {
                    if Instant::now() >= end || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if session
                        .as_ref()
                        .is_none_or(|s: &dsync_client::Session| s.is_lost())
                    {
                        match c
                            .open_session(Duration::from_secs(10), &format!("e2e-worker-{w}"))
                            .await
                        {
                            Ok(s) => session = Some(s),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                    }
                    let s = session.as_ref().expect("set above");
                    let g = match s
                        .acquire("e2e/hot", LockMode::Exclusive, Some(Duration::from_secs(5)))
                        .await
                    {
                        Ok(g) => g,
                        Err(e) => {
                            eprintln!(
                                "{} worker {w}: acquire: {:?} {}",
                                wall_ms(),
                                e.code(),
                                e.message()
                            );
                            continue;
                        }
                    };
                    let from = Instant::now();
                    grants_wall.lock().push(wall_ms());
                    {
                        let mut r = register.lock();
                        if g.fencing_token() > r.0 {
                            r.0 = g.fencing_token();
                        } else {
                            r.1 += 1;
                        }
                    }
                    // Worker 0 holds longer so others queue behind it.
                    let hold = if w == 0 { 50 } else { 3 };
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    let to = Instant::now();
                    history.lock().push(Held {
                        worker: w,
                        token: g.fencing_token(),
                        from,
                        to,
                    });
                    if let Err(e) = g.release().await {
                        eprintln!(
                            "{} worker {w}: release: {:?} {}",
                            wall_ms(),
                            e.code(),
                            e.message()
                        );
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    stop.store(true, Ordering::Relaxed);

    // Safety checks.
    let mut ok = true;
    let mut h = history.lock().clone();
    h.sort_by_key(|x| x.from);
    let mut overlaps = 0;
    let mut non_increasing = 0;
    for w in h.windows(2) {
        if w[0].to > w[1].from {
            overlaps += 1;
            eprintln!("OVERLAP: {:?} and {:?}", w[0], w[1]);
        }
        if w[1].token <= w[0].token {
            non_increasing += 1;
            eprintln!("TOKEN ORDER: {:?} then {:?}", w[0], w[1]);
        }
    }
    let refusals = register.lock().1;
    println!("grants={}", h.len());
    println!("overlaps={overlaps}");
    println!("token_order_violations={non_increasing}");
    println!("fenced_refusals={refusals}");
    ok &= overlaps == 0 && non_increasing == 0 && refusals == 0 && h.len() > 50;
    let mut walls = grants_wall.lock().clone();
    walls.sort_unstable();
    let max_gap = walls.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!("max_gap_ms={max_gap}");
    print_times("grant_times_ms", &walls);

    // Nothing acknowledged was lost: every marker is still held by its session.
    let mut held = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list_locks(1000, &token, marker_session.id())
            .await
            .map_err(|e| format!("list markers: {e}"))?;
        held += page
            .locks
            .iter()
            .filter(|l| l.resource.starts_with("e2e/marker/"))
            .count();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    println!("markers_held={held}");
    ok &= held == markers;
    drop(marker_guards);
    let _ = marker_session.close().await;
    Ok(ok)
}
