//! The cache-svc Docker scenario of `cargo xtask e2e` (the harness is in
//! `e2e.rs`).
//!
//! The replicas use the default embedded store (a Raft group inside the
//! nodes), besides the membership group that decides the cache's epochs.
//! `dsync-e2e cache-load` (crates/e2e) runs six clients, two pinned to each
//! node (one of them with a near cache), reading, writing,
//! compare-and-setting and deleting four shared keys, and checks that the
//! whole history is linearizable per key, whichever node, peer, store or
//! near cache answered. Meanwhile:
//! 1. the container leading the membership group is disconnected from the
//!    network for 5 s: the two others must fence it out (a new epoch
//!    without it) and keep serving; the isolated node must refuse a write;
//!    once reconnected, its Raft groups must catch up with what the others
//!    committed, and it must rejoin the cache (`dsync cache status`
//!    through it shows all three nodes members of one epoch);
//! 2. another node (the embedded store's leader, unless that is the one
//!    just cut off) is `docker kill`ed (SIGKILL) and started again from its
//!    volume, and must catch up and rejoin likewise.
//!
//! After each fault this side reports the longest pause between successful
//! operations and between successful writes (10 s window, all clients
//! together: those of the faulty node fail meanwhile, the others must
//! carry on).

use std::time::{Duration, Instant};

use crate::e2e::{pauses, sleep_until, wall_ms, Env, PAUSE_BOUND_MS, PORT, REPLICAS};
use crate::Result;

/// How long the membership leader stays cut off.
const CUT_MS: u64 = 5_000;
/// Time from the partition to the kill, so the 10 s after each are apart.
const KILL_AFTER_CUT_MS: u64 = 12_000;
/// The Raft groups of a cache-svc node (cache-svc `membership::GROUP`,
/// `store::GROUP`).
const MEMBERSHIP_GROUP: u64 = 1;
const STORE_GROUP: u64 = 2;

/// One node's line of `dsync cache status`.
#[derive(Debug)]
struct Member {
    node: u64,
    epoch: u64,
    member: bool,
    members: Vec<u64>,
}

/// `dsync cache status` run inside replica `via`, asking `endpoints`: a
/// line per node that answered.
fn cache_status(env: &Env, via: usize, endpoints: &str) -> Vec<Member> {
    env.dsync_to(via, endpoints, &["--retry-ms", "1000", "cache", "status"])
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            // endpoint node epoch member entries size util hit_rate evict
            // M E S members (members: "1,2,3", missing when there are none;
            // an unreachable node's line does not parse)
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some(Member {
                node: cols.get(1)?.parse().ok()?,
                epoch: cols.get(2)?.parse().ok()?,
                member: cols.get(3)?.parse().ok()?,
                members: cols
                    .get(12)
                    .map(|m| m.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn endpoints_of(env: &Env, nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|&i| format!("{}:{PORT}", env.pod(i)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until every one of `nodes`, asked from inside the first of them,
/// is a member of one epoch whose members are exactly `nodes`. Returns
/// that epoch.
fn wait_members(env: &Env, nodes: &[usize], within: Duration) -> Result<u64> {
    let mut want: Vec<u64> = nodes.iter().map(|&i| i as u64 + 1).collect();
    want.sort_unstable();
    let endpoints = endpoints_of(env, nodes);
    let deadline = Instant::now() + within;
    loop {
        let seen = cache_status(env, nodes[0], &endpoints);
        let mut answered: Vec<u64> = seen.iter().map(|m| m.node).collect();
        answered.sort_unstable();
        let agreed = answered == want
            && seen.iter().all(|m| {
                let mut members = m.members.clone();
                members.sort_unstable();
                m.member && members == want && m.epoch == seen[0].epoch
            });
        if agreed {
            return Ok(seen[0].epoch);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nodes {want:?} did not become the members of one epoch: {seen:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The replica (index) leading Raft group `group`, as one of `via` sees it.
fn group_leader(env: &Env, group: u64, via: &[usize], within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        for &v in via {
            if let Some(r) = env
                .status(v)
                .into_iter()
                .find(|r| r.group == group && r.role == "leader")
            {
                return Ok(r.node - 1);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no leader of group {group} found"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn scenario(env: &Env, seconds: u64) -> Result {
    let secs = seconds.to_string();
    env.start_driver(&[
        "cache-load",
        "--endpoints",
        &env.endpoints(),
        "--seconds",
        &secs,
    ])?;
    let started = wall_ms();
    let driver_end = started + seconds * 1000;
    let all = [0, 1, 2];
    // The nodes join the cache once their Raft groups have leaders (all
    // that `up` waited for).
    let epoch = wait_members(env, &all, Duration::from_secs(30))?;
    env.say(format!("all three nodes are members of epoch {epoch}"));
    sleep_until(started + seconds * 1000 / 6);

    // 1. The membership leader cut off.
    let old = group_leader(env, MEMBERSHIP_GROUP, &all, Duration::from_secs(10))?;
    let cut_at = wall_ms();
    env.disconnect(old)?;
    env.say(format!(
        "disconnected {} (membership leader) from the network",
        env.pod(old)
    ));
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let epoch = wait_members(env, &others, Duration::from_secs(15))?;
    env.say(format!(
        "{} fenced out: the others serve epoch {epoch} without it",
        env.pod(old)
    ));
    let refused = env.refuses(old, &["cache", "set", "e2e-isolated-probe", "probe"])?;
    env.say(format!("isolated node refused a write: {refused}"));
    sleep_until(cut_at + CUT_MS);
    // Its Raft groups catch up (it may lead again), then it rejoins.
    env.heal(old, &["follower", "leader"])?;
    let epoch = wait_members(env, &[old, others[0], others[1]], Duration::from_secs(30))?;
    env.say(format!(
        "{} rejoined the cache: all three are members of epoch {epoch}",
        env.pod(old)
    ));

    // 2. Another node killed, restarted from its volume.
    sleep_until(cut_at + KILL_AFTER_CUT_MS);
    let store_leader = group_leader(env, STORE_GROUP, &all, Duration::from_secs(10))?;
    let victim = if store_leader == old {
        others[0]
    } else {
        store_leader
    };
    let killed = if victim == store_leader {
        "embedded store leader killed"
    } else {
        "node killed"
    };
    env.say(format!("killing {} ({killed})", env.pod(victim)));
    let kill_at = env.kill_restart(victim, &["follower", "leader"], driver_end)?;
    let epoch = wait_members(
        env,
        &[victim, (victim + 1) % REPLICAS, (victim + 2) % REPLICAS],
        Duration::from_secs(30),
    )?;
    env.say(format!(
        "{} rejoined the cache: all three are members of epoch {epoch}",
        env.pod(victim)
    ));

    // The driver finishes, checks its history and reports.
    let driver = env.finish_driver()?;
    let faults = [("membership leader partitioned", cut_at), (killed, kill_at)];
    let ops = pauses(env, "operations", &driver.times("op_times_ms"), &faults);
    let writes = pauses(env, "writes", &driver.times("write_times_ms"), &faults);
    let mut slow = Vec::new();
    for (((what, _), o), w) in faults.iter().zip(ops).zip(writes) {
        env.say(format!(
            "{what}: longest pause in the 10 s after: {o} ms between operations, {w} ms between writes"
        ));
        if o.max(w) > PAUSE_BOUND_MS {
            slow.push(format!(
                "{what}: paused {o} ms (operations), {w} ms (writes)"
            ));
        }
    }
    if driver.code != "0" {
        return Err(format!(
            "the e2e driver failed (exit {}): {}",
            driver.code,
            if driver.out.contains("linearizable=false") {
                "the history is not linearizable"
            } else {
                "see its report"
            }
        ));
    }
    if !slow.is_empty() {
        return Err(slow.join("; "));
    }
    Ok(())
}
