//! `dsync-e2e cache-load`: the client side of the cache-svc Docker test.
//!
//! Waits until every node is a member of one cache epoch, then runs
//! `--clients` clients, each pinned to ONE node (round robin over
//! `--endpoints`: a client never moves, so the clients of a node that is cut
//! off or killed fail until it is back), every other one (the first
//! included) with its near cache on. For `--seconds`, and at most
//! `--max-ops` operations each, every client loops over `--keys` keys of
//! this run: 60% reads, 20% writes, 10% compare-and-set writes (at the last
//! version it saw) and 10% deletes; every value written is unique.
//!
//! Every operation is recorded in a [`History`] exactly as in cache-svc's
//! cluster tests (`tests/cluster.rs`): a failed read says nothing and is
//! left out; a write or delete refused by the service's own decision
//! (INVALID_ARGUMENT, FAILED_PRECONDITION such as a CAS VERSION_MISMATCH, an
//! UNAVAILABLE with a reason other than OUTCOME_UNKNOWN) did not happen and
//! is left out too; any other failed write or delete (OUTCOME_UNKNOWN, a
//! timeout, a lost connection) may have taken effect and is kept with an
//! unknown outcome.
//!
//! At the end it checks that the history is linearizable per key
//! ([`check`]: one order of the operations, consistent with real time, in
//! which every read returns the last value written, whichever node, peer,
//! store or near cache answered it), and prints `key=value` lines: the
//! operations by kind, the errors per code and reason, which tier answered
//! the reads, near-cache hits, how many operations the check covered, the
//! wall-clock time of every successful operation (`op_times_ms=`) and of
//! every successful write or delete (`write_times_ms=`) for the
//! orchestrator, and `result=pass|fail` (pass: linearizable, and at least
//! `--min-checked` operations checked). Errors (the first few of each kind
//! per client) and, on a violation, the failing key's operations around it
//! go to stderr.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_svc::history::{check, Event, History, Op};
use dsync_client::cache::{CacheClient, CacheOptions, SetOptions, Source};
use rand::{RngExt, SeedableRng};
use serde_json::json;
use tonic::Code;

use crate::{print_times, wall_ms};

/// Errors of one kind printed per client before they are only counted.
const ERRORS_SHOWN: u64 = 5;
/// On a violation, the failing key's operations invoked this close to the
/// one that could not be placed are printed (ns).
const EXPLAIN_WINDOW_NS: u64 = 2_000_000_000;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    #[arg(long, default_value_t = 40)]
    pub seconds: u64,
    /// Clients, pinned to the endpoints round robin; every other one keeps
    /// a near cache.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Keys shared by all clients (few: every operation contends).
    #[arg(long, default_value_t = 4)]
    pub keys: usize,
    /// Operations per client at most (bounds the history to check).
    #[arg(long, default_value_t = 20_000)]
    pub max_ops: usize,
    /// Each client waits up to this long (uniformly random) after each
    /// operation: near-cache hits take no time, and the history must stay
    /// small enough to check.
    #[arg(long, default_value_t = 10)]
    pub think_ms: u64,
    /// Fewest operations the check must cover for a pass.
    #[arg(long, default_value_t = 1_000)]
    pub min_checked: usize,
}

/// A client of one node only. Calls give up after 5 s (as in the cluster
/// tests): a client whose node is cut off or down keeps failing and
/// recording, and comes back soon after its node does.
fn client(endpoint: &str, near: bool) -> Result<CacheClient, String> {
    let mut opts = CacheOptions {
        near_cache: near,
        ..CacheOptions::default()
    };
    opts.conn.request_timeout = Duration::from_secs(5);
    opts.conn.retry_for = Duration::from_secs(5);
    CacheClient::with_options([endpoint.to_owned()], opts).map_err(|e| e.to_string())
}

fn reason(s: &tonic::Status) -> String {
    proto::status::reason(s)
}

/// Whether a failed write may still have happened: OUTCOME_UNKNOWN, or an
/// error that did not come from the service's own decision (as in
/// cache-svc's `tests/cluster.rs`).
fn applied_unknown(e: &tonic::Status) -> bool {
    match e.code() {
        Code::InvalidArgument | Code::FailedPrecondition => false,
        Code::Unavailable => {
            let r = reason(e);
            r.is_empty() || r == "OUTCOME_UNKNOWN"
        }
        _ => true,
    }
}

/// The version a VERSION_MISMATCH says the key is at.
fn current_version(e: &tonic::Status) -> Option<u64> {
    proto::status::error_info(e)?
        .metadata
        .get("current_version")?
        .parse()
        .ok()
}

const SOURCES: [(Source, &str); 4] = [
    (Source::Near, "near"),
    (Source::Node, "node"),
    (Source::Peer, "peer"),
    (Source::Store, "store"),
];

fn source_index(s: Source) -> usize {
    SOURCES.iter().position(|(x, _)| *x == s).unwrap_or(0)
}

/// Waits (at most 60 s) until every node answers as a member of one epoch
/// whose members are all of them: nodes join the cache membership only
/// after their Raft groups elected leaders, which is all the orchestrator
/// waited for.
async fn wait_ready(endpoints: &[String]) -> Result<(), String> {
    let c = CacheClient::with_options(
        endpoints.to_vec(),
        CacheOptions {
            near_cache: false,
            ..CacheOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut epochs = Vec::new();
        let mut why = Vec::new();
        for (ep, r) in c.status_all().await {
            match r {
                Ok(s) if s.member && s.members.len() == endpoints.len() => epochs.push(s.epoch),
                Ok(s) => why.push(format!(
                    "{ep}: member {} of epoch {} (members {:?})",
                    s.member, s.epoch, s.members
                )),
                Err(e) => why.push(format!("{ep}: {}", e.message())),
            }
        }
        if epochs.len() == endpoints.len() && epochs.windows(2).all(|w| w[0] == w[1]) {
            println!("ready_epoch={}", epochs[0]);
            return Ok(());
        }
        if why.is_empty() {
            why.push(format!("members of different epochs {epochs:?}"));
        }
        if Instant::now() > deadline {
            return Err(format!("the cache never formed: {}", why.join("; ")));
        }
        eprintln!("waiting for the cache: {}", why.join("; "));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What one client's loop is given.
struct Job {
    id: u64,
    endpoint: String,
    cl: CacheClient,
    keys: Vec<String>,
    max_ops: usize,
    think_ms: u64,
    seed: u64,
    end: Instant,
    h: Arc<History>,
}

/// What one client did.
#[derive(Default)]
struct Tally {
    reads: u64,
    writes: u64,
    cas_writes: u64,
    cas_mismatches: u64,
    deletes: u64,
    /// Writes and deletes recorded with an unknown outcome.
    unknown_outcomes: u64,
    /// Reads answered by each tier (see [`SOURCES`]).
    sources: [u64; 4],
    /// "<code> <reason>" → count.
    errors: BTreeMap<String, u64>,
    near_hits: u64,
    /// Per read (its invocation), the tier that answered it.
    read_sources: HashMap<u64, Source>,
    /// Wall-clock ms of every success, and of every successful write.
    op_times: Vec<u64>,
    write_times: Vec<u64>,
}

impl Tally {
    fn ok(&mut self, write: bool) {
        let now = wall_ms();
        self.op_times.push(now);
        if write {
            self.write_times.push(now);
        }
    }

    fn error(&mut self, job: &Job, what: &str, e: &tonic::Status) {
        let kind = format!("{:?} {}", e.code(), reason(e));
        let n = self.errors.entry(kind.trim_end().to_owned()).or_default();
        *n += 1;
        if *n <= ERRORS_SHOWN || n.is_power_of_two() {
            eprintln!(
                "{} client {} ({}): {what}: {:?} {} {} (#{n} of its kind)",
                wall_ms(),
                job.id,
                job.endpoint,
                e.code(),
                reason(e),
                e.message()
            );
        }
    }
}

/// One client's loop of random reads, writes, CAS and deletes (cache-svc's
/// `client_loop`, bounded by time as well as count), each recorded in the
/// history.
async fn client_loop(job: Job) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(job.seed.wrapping_add(job.id));
    let mut last_version: HashMap<String, u64> = HashMap::new();
    let mut t = Tally::default();
    let h = &job.h;
    for i in 0..job.max_ops {
        if Instant::now() >= job.end {
            break;
        }
        let key = job.keys[rng.random_range(0..job.keys.len())].clone();
        let dice = rng.random_range(0..100);
        let t0 = h.now();
        let record = |op: Op, complete: Option<u64>| {
            h.record(Event {
                client: job.id,
                key: key.clone().into_bytes(),
                op,
                invoke: t0,
                complete,
            })
        };
        if dice < 60 {
            match job.cl.get_with_source(&key).await {
                Ok((e, src)) => {
                    let done = h.now();
                    if let Some(e) = &e {
                        last_version.insert(key.clone(), e.version);
                    }
                    record(
                        Op::Read {
                            observed: e.map(|e| e.value.to_vec()),
                        },
                        Some(done),
                    );
                    t.reads += 1;
                    t.sources[source_index(src)] += 1;
                    t.read_sources.insert(t0, src);
                    t.ok(false);
                }
                Err(e) => t.error(&job, "get", &e),
            }
        } else if dice < 90 {
            let value = format!("c{}-{i}", job.id).into_bytes();
            let cas = dice >= 80;
            let opts = SetOptions {
                if_version: cas.then(|| last_version.get(&key).copied().unwrap_or(0)),
                ..Default::default()
            };
            match job.cl.set_with(&key, value.clone(), opts).await {
                Ok(v) => {
                    let done = h.now();
                    last_version.insert(key.clone(), v);
                    record(Op::Write { value }, Some(done));
                    if cas {
                        t.cas_writes += 1;
                    } else {
                        t.writes += 1;
                    }
                    t.ok(true);
                }
                Err(e) if reason(&e) == "VERSION_MISMATCH" => {
                    // Did not happen; try the version it is at next time.
                    t.cas_mismatches += 1;
                    if let Some(v) = current_version(&e) {
                        last_version.insert(key.clone(), v);
                    }
                }
                Err(e) => {
                    if applied_unknown(&e) {
                        record(Op::Write { value }, None);
                        t.unknown_outcomes += 1;
                    }
                    t.error(&job, if cas { "cas" } else { "set" }, &e);
                }
            }
        } else {
            match job.cl.delete(&key).await {
                Ok(_) => {
                    let done = h.now();
                    last_version.remove(&key);
                    record(Op::Delete, Some(done));
                    t.deletes += 1;
                    t.ok(true);
                }
                Err(e) => {
                    if applied_unknown(&e) {
                        record(Op::Delete, None);
                        t.unknown_outcomes += 1;
                    }
                    t.error(&job, "delete", &e);
                }
            }
        }
        let think = rng.random_range(0..=job.think_ms);
        if think > 0 {
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }
    t.near_hits = job.cl.near_stats().hits;
    t
}

/// Prints the failing key's operations (with the tier that answered each
/// read) invoked around the one the violation names, or all of them if it
/// names none.
fn explain(events: &[Event], key: &[u8], message: &str, sources: &HashMap<(u64, u64), Source>) {
    let around = message
        .split_once("invoked ")
        .and_then(|(_, rest)| rest.split_once("ns"))
        .and_then(|(n, _)| n.parse::<u64>().ok());
    let mut evs: Vec<&Event> = events
        .iter()
        .filter(|e| e.key == key)
        .filter(|e| around.is_none_or(|a| e.invoke.abs_diff(a) <= EXPLAIN_WINDOW_NS))
        .collect();
    evs.sort_by_key(|e| e.invoke);
    eprintln!(
        "operations on the failing key{} (client, invoked .. completed in µs since the start, op, read from):",
        if around.is_some() {
            " invoked within 2 s of the one that could not be placed"
        } else {
            ""
        }
    );
    for e in evs {
        let src = sources
            .get(&(e.client, e.invoke))
            .map_or(String::new(), |s| format!("{s:?}"));
        eprintln!(
            "  c{} {:>12} .. {:>12?} {:?} {src}",
            e.client,
            e.invoke / 1000,
            e.complete.map(|c| c / 1000),
            e.op
        );
    }
}

/// A figure summed over the clients.
fn total(tallies: &[Tally], f: impl Fn(&Tally) -> u64) -> u64 {
    tallies.iter().map(f).sum()
}

pub async fn load(a: Args) -> Result<bool, String> {
    if a.endpoints.is_empty() || a.clients == 0 || a.keys == 0 {
        return Err("need --endpoints, and --clients and --keys above 0".into());
    }
    wait_ready(&a.endpoints).await?;
    // This run's keys: a rerun against the same cluster starts from absent
    // keys too (the check assumes every key starts absent).
    let seed = wall_ms();
    let keys: Vec<String> = (0..a.keys).map(|k| format!("e2e-{seed:x}-{k}")).collect();
    let mut clients = Vec::new();
    for i in 0..a.clients {
        let endpoint = a.endpoints[i % a.endpoints.len()].clone();
        let near = i % 2 == 0;
        let cl = client(&endpoint, near)?;
        println!("client={} endpoint={endpoint} near_cache={near}", i + 1);
        clients.push((i as u64 + 1, endpoint, near, cl));
    }
    // A near cache serves once its Watch stream got a first pong.
    let live_by = Instant::now() + Duration::from_secs(10);
    let live = |cs: &[(u64, String, bool, CacheClient)]| {
        cs.iter()
            .filter(|(_, _, near, c)| *near && c.near_cache_live())
            .count()
    };
    let near_caches = clients.iter().filter(|c| c.2).count();
    while live(&clients[..]) < near_caches && Instant::now() < live_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "clients={} near_caches={near_caches} near_caches_live={} keys={} seed={seed}",
        a.clients,
        live(&clients[..]),
        a.keys
    );

    let h = History::new();
    // Event times are ns since this instant.
    println!("history_start_ms={}", wall_ms());
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(id, endpoint, _, cl)| {
            tokio::spawn(client_loop(Job {
                id,
                endpoint,
                cl,
                keys: keys.clone(),
                max_ops: a.max_ops,
                think_ms: a.think_ms,
                seed,
                end,
                h: h.clone(),
            }))
        })
        .collect();
    let mut tallies = Vec::new();
    for t in tasks {
        tallies.push(t.await.map_err(|e| format!("a client task failed: {e}"))?);
    }
    let ran = start.elapsed();

    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut sources = [0u64; 4];
    let mut read_sources = HashMap::new();
    let mut op_times = Vec::new();
    let mut write_times = Vec::new();
    for (i, t) in tallies.iter().enumerate() {
        for (k, n) in &t.errors {
            *errors.entry(k.clone()).or_default() += n;
        }
        for (s, n) in sources.iter_mut().zip(t.sources) {
            *s += n;
        }
        let client = i as u64 + 1;
        read_sources.extend(t.read_sources.iter().map(|(&at, &s)| ((client, at), s)));
        op_times.extend_from_slice(&t.op_times);
        write_times.extend_from_slice(&t.write_times);
    }
    let by_source: serde_json::Map<String, serde_json::Value> = SOURCES
        .iter()
        .zip(sources)
        .map(|((_, name), n)| ((*name).to_owned(), json!(n)))
        .collect();

    let events = h.events();
    let checking = Instant::now();
    let verdict = check(&events, &None);
    let check_ms = checking.elapsed().as_millis();
    let checked = match &verdict {
        Ok(n) => *n,
        Err(v) => {
            if v.is_budget_exhausted() {
                eprintln!("CHECK INCONCLUSIVE: {v}");
            } else {
                eprintln!("NOT LINEARIZABLE: {v}");
                explain(&events, &v.key, &v.message, &read_sources);
            }
            0
        }
    };

    println!("seconds={:.1}", ran.as_secs_f64());
    println!("ops={}", events.len());
    println!("reads={}", total(&tallies, |t| t.reads));
    println!("writes={}", total(&tallies, |t| t.writes));
    println!("cas_writes={}", total(&tallies, |t| t.cas_writes));
    println!("cas_mismatches={}", total(&tallies, |t| t.cas_mismatches));
    println!("deletes={}", total(&tallies, |t| t.deletes));
    println!(
        "unknown_outcomes={}",
        total(&tallies, |t| t.unknown_outcomes)
    );
    println!("errors={}", json!(errors));
    println!("read_sources={}", serde_json::Value::Object(by_source));
    println!("near_hits={}", total(&tallies, |t| t.near_hits));
    println!("checked={checked}");
    println!("check_ms={check_ms}");
    println!(
        "linearizable={}",
        match &verdict {
            Ok(_) => "true",
            Err(v) if v.is_budget_exhausted() => "unknown",
            Err(_) => "false",
        }
    );
    op_times.sort_unstable();
    op_times.dedup();
    write_times.sort_unstable();
    write_times.dedup();
    let max_gap = |t: &[u64]| t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!("max_op_gap_ms={}", max_gap(&op_times));
    println!("max_write_gap_ms={}", max_gap(&write_times));
    print_times("op_times_ms", &op_times);
    print_times("write_times_ms", &write_times);
    if verdict.is_ok() && checked < a.min_checked {
        eprintln!(
            "only {checked} operations checked (--min-checked {})",
            a.min_checked
        );
    }
    Ok(verdict.is_ok() && checked >= a.min_checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_failures_are_kept_as_unknown_outcomes() {
        let with_reason = |code, reason: &str| {
            proto::status::error(code, "x", reason, [] as [(String, String); 0])
        };
        assert!(applied_unknown(&tonic::Status::unavailable("down")));
        assert!(applied_unknown(&with_reason(
            Code::Unavailable,
            "OUTCOME_UNKNOWN"
        )));
        assert!(applied_unknown(&tonic::Status::deadline_exceeded("slow")));
        assert!(!applied_unknown(&with_reason(
            Code::Unavailable,
            "NOT_MEMBER"
        )));
        assert!(!applied_unknown(&with_reason(
            Code::FailedPrecondition,
            "VERSION_MISMATCH"
        )));
    }
}
