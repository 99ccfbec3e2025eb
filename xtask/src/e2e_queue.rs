//! The queue-svc Docker scenario of `cargo xtask e2e` (the harness is in
//! `e2e.rs`).
//!
//! `dsync-e2e queue-load` (crates/e2e) creates topic `e2e` (3 partitions,
//! a SHARED and an ORDERED group), produces and consumes both groups, and
//! checks that every acknowledged message reached both groups intact,
//! stored once, the ORDERED group in partition order. Meanwhile:
//! 1. the container hosting the leader of partition 0 is disconnected from
//!    the network for a few seconds: the majority must elect a new leader
//!    of it; the isolated replica must refuse a produce; once reconnected
//!    it must catch up with every group the majority committed to;
//! 2. the leader of partition 1 is `docker kill`ed (SIGKILL) and started
//!    again from its volume, and must catch up likewise.
//!
//! After each fault this side reports the longest pause between
//! successful produces and between non-empty receives (10 s window).

use std::time::Duration;

use crate::e2e::{pauses, sleep_until, wall_ms, Env, LOCAL, PAUSE_BOUND_MS, REPLICAS};
use crate::Result;

/// The driver's topic.
const TOPIC: &str = "e2e";
/// How long partition 0's leader stays cut off.
const CUT_MS: u64 = 5_000;
/// Time from the partition to the kill, so the 10 s after each are apart.
const KILL_AFTER_CUT_MS: u64 = 12_000;

/// Per partition, its leader's node id (0: none known) as replica `via`
/// sees it: `dsync queue describe` run inside it against itself alone (no
/// time lost on replicas that are cut off or down).
fn partition_leaders(env: &Env, via: usize) -> Vec<(u32, u64)> {
    env.dsync_to(
        via,
        LOCAL,
        &["--retry-ms", "2000", "queue", "describe", TOPIC],
    )
    .unwrap_or_default()
    .lines()
    .filter_map(|l| {
        // partition leader address replicas depth … (address is empty
        // when the answering replica leads)
        let mut cols = l.split_whitespace();
        Some((cols.next()?.parse().ok()?, cols.next()?.parse().ok()?))
    })
    .collect()
}

/// The replica (index) leading `partition`, as one of `via` sees it, once
/// one other than `not` leads it.
fn partition_leader(
    env: &Env,
    partition: u32,
    via: &[usize],
    not: Option<usize>,
    within: Duration,
) -> Result<usize> {
    let deadline = std::time::Instant::now() + within;
    loop {
        for &v in via {
            let leader = partition_leaders(env, v)
                .into_iter()
                .find(|&(p, id)| p == partition && id > 0)
                .map(|(_, id)| id as usize - 1);
            if let Some(l) = leader.filter(|&l| Some(l) != not) {
                return Ok(l);
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no leader of partition {partition} found"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn scenario(env: &Env, seconds: u64) -> Result {
    let secs = seconds.to_string();
    env.start_driver(&[
        "queue-load",
        "--endpoints",
        &env.endpoints(),
        "--seconds",
        &secs,
    ])?;
    let started = wall_ms();
    let driver_end = started + seconds * 1000;
    let all = [0, 1, 2];
    // The driver creates the topic; its partitions get leaders.
    partition_leader(env, 0, &all, None, Duration::from_secs(30))?;
    sleep_until(started + seconds * 1000 / 6);

    // 1. Partition 0's leader cut off.
    let old = partition_leader(env, 0, &all, None, Duration::from_secs(10))?;
    let cut_at = wall_ms();
    env.disconnect(old)?;
    env.say(format!(
        "disconnected {} (leader of partition 0) from the network",
        env.pod(old)
    ));
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let new = partition_leader(env, 0, &others, Some(old), Duration::from_secs(10))?;
    env.say(format!("{} leads partition 0", env.pod(new)));
    let refused = env.refuses(
        old,
        &["queue", "produce", TOPIC, "--id", "isolated-probe", "probe"],
    )?;
    env.say(format!("isolated replica refused a produce: {refused}"));
    sleep_until(cut_at + CUT_MS);
    // Every group it hosts (metadata, partitions) catches up; it may lead
    // again (the preferred leader gets its partitions back).
    env.heal(old, &["follower", "leader"])?;

    // 2. Partition 1's leader killed, restarted from its volume.
    sleep_until(cut_at + KILL_AFTER_CUT_MS);
    let victim = partition_leader(env, 1, &all, None, Duration::from_secs(10))?;
    env.say(format!(
        "killing {} (leader of partition 1)",
        env.pod(victim)
    ));
    let kill_at = env.kill_restart(victim, &["follower", "leader"], driver_end)?;

    // The driver finishes (after consuming what is left) and reports.
    let driver = env.finish_driver()?;
    let faults = [
        ("partition 0 leader partitioned", cut_at),
        ("partition 1 leader killed", kill_at),
    ];
    let produced = pauses(env, "produces", &driver.times("produce_times_ms"), &faults);
    let received = pauses(env, "receives", &driver.times("receive_times_ms"), &faults);
    let mut slow = Vec::new();
    for (((what, _), p), r) in faults.iter().zip(produced).zip(received) {
        env.say(format!(
            "{what}: longest pause in the 10 s after: {p} ms between produces, {r} ms between receives"
        ));
        if p.max(r) > PAUSE_BOUND_MS {
            slow.push(format!("{what}: paused {p} ms (produce), {r} ms (receive)"));
        }
    }
    if !slow.is_empty() {
        return Err(slow.join("; "));
    }
    if driver.code != "0" {
        return Err(format!("the e2e driver failed (exit {})", driver.code));
    }
    Ok(())
}
