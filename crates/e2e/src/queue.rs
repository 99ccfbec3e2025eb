//! `dsync-e2e queue-load`: the client side of the queue-svc Docker test.
//!
//! Creates topic `e2e` (3 partitions) with a SHARED group `shared` and an
//! ORDERED group `ordered`, then for `--seconds`:
//! - `--producers` producers send batches of 10, each message with a unique
//!   `message_id` and a payload that carries that id and a checksum; a
//!   failed produce is retried with the same ids until it is acknowledged
//!   (deduplication makes that safe);
//! - `--consumers` consumers per group receive and ack.
//!
//! Then it keeps consuming until every acknowledged message has been
//! delivered to both groups (at most `--settle-seconds`), and checks:
//! - every acknowledged message was delivered to each group at least once;
//! - every payload came back intact (id and checksum);
//! - no message id was stored at two (partition, offset) places (deliveries
//!   and the produce acknowledgement all name the same one);
//! - the ORDERED group's first deliveries are in offset order per
//!   partition;
//! - no message that this driver did not produce came out.
//!
//! It prints `summary=<one JSON object>`, the wall-clock time of every
//! successful produce (`produce_times_ms=`) and non-empty receive
//! (`receive_times_ms=`) for the orchestrator, and `result=pass|fail`.
//! Errors, calls slower than the long poll plus 400 ms and examples of
//! each violation go to stderr.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsync_client::{Conn, QueueClient};
use parking_lot::Mutex;
use proto::queue::v1 as pb;
use serde_json::json;

use crate::{opts, print_times, wall_ms};

pub const TOPIC: &str = "e2e";
const PARTITIONS: u32 = 3;
const BATCH: usize = 10;
/// The groups, each with its mode.
const GROUPS: [(&str, pb::GroupMode); 2] = [
    ("shared", pb::GroupMode::Shared),
    ("ordered", pb::GroupMode::Ordered),
];
/// Receive's long poll. Short: `QueueClient::receive` answers only once
/// every partition leader has, and an ORDERED group gets one message per
/// partition per call, so a partition with nothing deliverable (drained,
/// or its one message in flight with the other consumer) costs each call
/// this long.
const WAIT_MS: u32 = 100;
/// Examples of each kind of violation printed to stderr.
const EXAMPLES: usize = 10;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    #[arg(long, default_value_t = 40)]
    pub seconds: u64,
    #[arg(long, default_value_t = 2)]
    pub producers: usize,
    /// Batches (of 10) per second, per producer.
    #[arg(long, default_value_t = 5)]
    pub rate: u64,
    /// Consumers per group.
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// After the load, wait at most this long for both groups to have been
    /// delivered every acknowledged message.
    #[arg(long, default_value_t = 120)]
    pub settle_seconds: u64,
    /// Produce as soon as the groups are created, not once every partition
    /// knows them (reproduces the queue-svc behaviour described in `setup`).
    #[arg(long)]
    pub produce_early: bool,
}

/// This run's message ids start with this (ids are deduplicated for two
/// minutes: a rerun against the same cluster must not reuse them).
fn run_id() -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| format!("e2e-{:x}", wall_ms())).clone()
}

/// FNV-1a, 64 bits: the payload checksum.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `<id>:<filler derived from the id>:<checksum of what precedes>`.
fn payload(id: &str) -> Vec<u8> {
    let seed = fnv(id.as_bytes());
    let body = format!("{id}:{seed:016x}{:016x}", seed.rotate_left(17));
    format!("{body}:{:016x}", fnv(body.as_bytes())).into_bytes()
}

/// True if `p` is the payload of message `id`, checksum included.
fn intact(id: &str, p: &[u8]) -> bool {
    let Some((body, sum)) = std::str::from_utf8(p).ok().and_then(|s| s.rsplit_once(':')) else {
        return false;
    };
    format!("{:016x}", fnv(body.as_bytes())) == sum
        && body.split_once(':').is_some_and(|(i, _)| i == id)
        && p == payload(id).as_slice()
}

/// What one group was delivered.
#[derive(Default)]
struct GroupLog {
    deliveries: u64,
    /// Ids delivered at least once.
    first: HashSet<String>,
    /// Per partition, offsets in the order of their first delivery.
    order: BTreeMap<u32, Vec<u64>>,
}

#[derive(Default)]
struct Log {
    /// Acknowledged by a produce: id → (partition, offset).
    acked: HashMap<String, (u32, u64)>,
    /// Every place an id was reported at (produce answers, deliveries).
    places: HashMap<String, BTreeSet<(u32, u64)>>,
    groups: [GroupLog; 2],
    corrupt: Vec<String>,
    unknown: Vec<String>,
    produce_times: Vec<u64>,
    receive_times: Vec<u64>,
}

#[derive(Default)]
struct Counters {
    produce_errors: AtomicU64,
    produce_duplicates: AtomicU64,
    abandoned_batches: AtomicU64,
    receive_errors: AtomicU64,
    ack_errors: AtomicU64,
    receipts_refused: AtomicU64,
}

fn client(endpoints: &[String]) -> Result<QueueClient, String> {
    Conn::new(endpoints.to_vec(), opts())
        .map(QueueClient::new)
        .map_err(|e| e.to_string())
}

/// Creates the topic and groups, waiting for the cluster (the orchestrator
/// starts us right after it elected a metadata leader).
async fn setup(q: &QueueClient, produce_early: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let retry = |what: String| async move {
        if Instant::now() > deadline {
            return Err(format!("cluster never answered: {what}"));
        }
        eprintln!("waiting for the cluster: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    };
    let config = pb::TopicConfig {
        partitions: PARTITIONS,
        ..Default::default()
    };
    while let Err(e) = q.create_topic(TOPIC, config.clone()).await {
        retry(format!("create topic: {e}")).await?;
    }
    for (group, mode) in GROUPS {
        let config = pb::GroupConfig {
            mode: mode as i32,
            // A lost Receive answer holds its messages (an ORDERED group's
            // partition) only this long; redeliveries come soon after.
            visibility_timeout_ms: 3_000,
            backoff_base_ms: Some(100),
            backoff_cap_ms: 1_000,
            // Never dead-letter: every message must reach both groups.
            max_attempts: 1_000,
            ..Default::default()
        };
        while let Err(e) = q.create_group(TOPIC, group, Some(config), None).await {
            retry(format!("create group {group}: {e}")).await?;
        }
    }
    if !produce_early {
        // WORKAROUND (queue-svc): a partition learns of a group only from
        // its reconciler or a first Receive for the group there. A message
        // produced before that is owed only to the groups it knew: if they
        // ack it, it is removed, and the late group (EARLIEST = oldest
        // still stored) never sees it. So wait until every partition's
        // leader knows both groups.
        loop {
            let known = match q.describe_everywhere(TOPIC).await {
                Ok(info) => {
                    info.groups.len() == GROUPS.len()
                        && info
                            .groups
                            .iter()
                            .all(|g| g.partitions.len() == PARTITIONS as usize)
                }
                Err(e) => {
                    eprintln!("describe: {e}");
                    false
                }
            };
            if known {
                break;
            }
            retry("groups not yet known to every partition".into()).await?;
        }
    }
    println!("topic={TOPIC} partitions={PARTITIONS} groups=shared,ordered");
    Ok(())
}

/// Notes a call that took long (for the record when a run fails).
fn slow(who: &str, what: &str, since: Instant) {
    let ms = since.elapsed().as_millis();
    if ms > u128::from(WAIT_MS) + 400 {
        eprintln!("{} {who}: {what} took {ms} ms", wall_ms());
    }
}

async fn produce_loop(
    q: QueueClient,
    w: usize,
    rate: u64,
    end: Instant,
    log: Arc<Mutex<Log>>,
    n: Arc<Counters>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let give_up = end + Duration::from_secs(30);
    let run = run_id();
    let mut seq = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let batch: Vec<pb::Message> = (0..BATCH)
            .map(|_| {
                seq += 1;
                let id = format!("{run}-p{w}-{seq:07}");
                pb::Message {
                    payload: payload(&id),
                    message_id: id,
                    ..Default::default()
                }
            })
            .collect();
        // Retried with the same ids until acknowledged: never stored twice.
        loop {
            let t = Instant::now();
            let res = q.produce(TOPIC, batch.clone()).await;
            slow(&format!("producer {w}"), "produce", t);
            match res {
                Ok(res) if res.len() == batch.len() => {
                    let mut l = log.lock();
                    l.produce_times.push(wall_ms());
                    for (m, r) in batch.iter().zip(&res) {
                        if r.duplicate {
                            n.produce_duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        let place = (r.partition, r.offset);
                        l.acked.insert(m.message_id.clone(), place);
                        l.places
                            .entry(m.message_id.clone())
                            .or_default()
                            .insert(place);
                    }
                    break;
                }
                other => {
                    n.produce_errors.fetch_add(1, Ordering::Relaxed);
                    match other {
                        Ok(res) => eprintln!(
                            "{} producer {w}: {} results for {} messages",
                            wall_ms(),
                            res.len(),
                            batch.len()
                        ),
                        Err(e) => eprintln!(
                            "{} producer {w}: produce: {:?} {}",
                            wall_ms(),
                            e.code(),
                            e.message()
                        ),
                    }
                    if Instant::now() > give_up {
                        n.abandoned_batches.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn consume_loop(
    q: QueueClient,
    g: usize,
    consumer: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    n: Arc<Counters>,
) {
    let group = GROUPS[g].0;
    let run = run_id();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let res = q.receive(TOPIC, group, &consumer, 30, WAIT_MS).await;
        slow(&consumer, "receive", t);
        let msgs = match res {
            Ok(m) => m,
            Err(e) => {
                n.receive_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "{} {consumer}: receive: {:?} {}",
                    wall_ms(),
                    e.code(),
                    e.message()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if msgs.is_empty() {
            continue;
        }
        // Recorded before the ack: an ORDERED group's next message cannot
        // be delivered (to anyone) before this one is acked.
        {
            let mut guard = log.lock();
            let l = &mut *guard;
            l.receive_times.push(wall_ms());
            for m in &msgs {
                let id = &m.message_id;
                let place = (m.partition, m.offset);
                if !id.starts_with(&run) {
                    l.unknown.push(format!("{id:?} at {place:?}"));
                    continue;
                }
                if !intact(id, &m.payload) {
                    l.corrupt.push(format!(
                        "{group}: {id} at {place:?}: {:?}",
                        String::from_utf8_lossy(&m.payload)
                    ));
                }
                l.places.entry(id.clone()).or_default().insert(place);
                let gl = &mut l.groups[g];
                gl.deliveries += 1;
                if gl.first.insert(id.clone()) {
                    gl.order.entry(m.partition).or_default().push(m.offset);
                }
            }
        }
        let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
        let t = Instant::now();
        let res = q.ack(TOPIC, group, &receipts).await;
        slow(&consumer, "ack", t);
        match res {
            Ok(results) => {
                let refused = results.iter().filter(|r| !r.ok).count() as u64;
                n.receipts_refused.fetch_add(refused, Ordering::Relaxed);
            }
            Err(e) => {
                // Redelivered once the leases expire.
                n.ack_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "{} {consumer}: ack: {:?} {}",
                    wall_ms(),
                    e.code(),
                    e.message()
                );
            }
        }
    }
}

/// Acknowledged messages not yet delivered to each group.
fn missing(l: &Log) -> [Vec<&String>; 2] {
    [0, 1].map(|g| {
        l.acked
            .keys()
            .filter(|id| !l.groups[g].first.contains(*id))
            .collect()
    })
}

pub async fn load(a: Args) -> Result<bool, String> {
    setup(&client(&a.endpoints)?, a.produce_early).await?;
    let log: Arc<Mutex<Log>> = Arc::default();
    let n: Arc<Counters> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut consumers = Vec::new();
    for (g, (name, _)) in GROUPS.iter().enumerate() {
        for c in 0..a.consumers {
            consumers.push(tokio::spawn(consume_loop(
                client(&a.endpoints)?,
                g,
                format!("{name}-{c}"),
                stop.clone(),
                log.clone(),
                n.clone(),
            )));
        }
    }
    let mut producers = Vec::new();
    for w in 0..a.producers {
        producers.push(tokio::spawn(produce_loop(
            client(&a.endpoints)?,
            w,
            a.rate,
            end,
            log.clone(),
            n.clone(),
        )));
    }
    for p in producers {
        let _ = p.await;
    }
    let produced_in = start.elapsed();
    // Keep consuming until both groups have seen every acknowledged message.
    let settle_from = Instant::now();
    let settle_end = settle_from + Duration::from_secs(a.settle_seconds);
    while Instant::now() < settle_end && missing(&log.lock()).iter().any(|m| !m.is_empty()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_ms = settle_from.elapsed().as_millis() as u64;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        let _ = c.await;
    }

    let mut l = log.lock();
    let missing = missing(&l).map(|m| {
        let mut m: Vec<String> = m.into_iter().cloned().collect();
        m.sort();
        m
    });
    // No id at two places: its deliveries and produce answers agree.
    let mut stored_twice: Vec<String> = l
        .places
        .iter()
        .filter(|(_, p)| p.len() > 1)
        .map(|(id, p)| format!("{id} at {p:?}"))
        .collect();
    stored_twice.sort();
    // Per partition, the ORDERED group's first deliveries in offset order.
    let ordered = GROUPS
        .iter()
        .position(|(_, m)| *m == pb::GroupMode::Ordered)
        .expect("an ordered group");
    let mut order_violations = Vec::new();
    for (p, seq) in &l.groups[ordered].order {
        for w in seq.windows(2) {
            if w[1] <= w[0] {
                order_violations.push(format!("partition {p}: offset {} after {}", w[1], w[0]));
            }
        }
    }
    for (what, list) in [
        ("MISSING (shared)", &missing[0]),
        ("MISSING (ordered)", &missing[1]),
        ("CORRUPT", &l.corrupt),
        ("UNKNOWN", &l.unknown),
        ("STORED TWICE", &stored_twice),
        ("ORDER", &order_violations),
    ] {
        for e in list.iter().take(EXAMPLES) {
            eprintln!("{what}: {e}");
        }
    }
    let groups: serde_json::Map<String, serde_json::Value> = GROUPS
        .iter()
        .enumerate()
        .map(|(g, (name, _))| {
            let gl = &l.groups[g];
            (
                (*name).to_owned(),
                json!({
                    "deliveries": gl.deliveries,
                    "distinct": gl.first.len(),
                    "redeliveries": gl.deliveries - gl.first.len() as u64,
                    "missing": missing[g].len(),
                }),
            )
        })
        .collect();
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let acknowledged = l.acked.len();
    l.produce_times.sort_unstable();
    l.receive_times.sort_unstable();
    let max_gap = |t: &[u64]| t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let summary = json!({
        "seconds": produced_in.as_secs_f64(),
        "acknowledged": acknowledged,
        "produce_calls_ok": l.produce_times.len(),
        "produce_errors": c(&n.produce_errors),
        "produce_duplicates": c(&n.produce_duplicates),
        "abandoned_batches": c(&n.abandoned_batches),
        "receive_errors": c(&n.receive_errors),
        "ack_errors": c(&n.ack_errors),
        "receipts_refused": c(&n.receipts_refused),
        "settle_ms": settle_ms,
        "groups": groups,
        "corrupt": l.corrupt.len(),
        "unknown": l.unknown.len(),
        "stored_twice": stored_twice.len(),
        "order_violations": order_violations.len(),
        "max_produce_gap_ms": max_gap(&l.produce_times),
        "max_receive_gap_ms": max_gap(&l.receive_times),
    });
    println!("summary={summary}");
    print_times("produce_times_ms", &l.produce_times);
    print_times("receive_times_ms", &l.receive_times);
    Ok(missing.iter().all(Vec::is_empty)
        && l.corrupt.is_empty()
        && l.unknown.is_empty()
        && stored_twice.is_empty()
        && order_violations.is_empty()
        && acknowledged >= 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_id_and_checksum() {
        let id = format!("{}-p0-0000001", run_id());
        let p = payload(&id);
        assert!(intact(&id, &p));
        assert!(!intact(&format!("{}-p0-0000002", run_id()), &p));
        for i in 0..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 1;
            assert!(!intact(&id, &bad), "byte {i} flipped");
        }
        assert!(!intact(&id, &p[..p.len() - 1]));
    }
}
