//! Fault tests on the in-process cluster (`consensus::testkit`): elections,
//! replication, crashes and restarts from disk, partitions, snapshots,
//! membership and many groups per node.

use std::time::Duration;

use consensus::testkit::{Cluster, Recorders};
use consensus::{Error, Role};

const G: u64 = 1;
const SEC: Duration = Duration::from_secs(1);

fn cmd(i: u64) -> Vec<u8> {
    format!("cmd-{i}").into_bytes()
}

fn three() -> (Cluster, Recorders) {
    let rec = Recorders::default();
    let c = Cluster::new(3, &[G], rec.factory());
    (c, rec)
}

/// Every running node applied exactly `expected`, in order.
fn assert_logs(c: &Cluster, rec: &Recorders, expected: &[Vec<u8>]) {
    for n in c.running() {
        assert_eq!(rec.get(n, G).commands(), expected, "node {n} diverged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_exactly_one_leader() {
    let (c, _) = three();
    let leader = c.wait_leader(G).await;
    let statuses: Vec<_> = (1..=3).map(|n| c.handle(n, G).status()).collect();
    assert_eq!(
        statuses.iter().filter(|s| s.role == Role::Leader).count(),
        1
    );
    for s in &statuses {
        assert_eq!(s.leader, Some(leader));
        assert_eq!(s.voters, vec![1, 2, 3]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_in_order_and_answers_with_the_apply_index() {
    let (c, rec) = three();
    let leader = c.wait_leader(G).await;
    let h = c.handle(leader, G);
    let mut last = 0;
    for i in 0..50 {
        let resp = h.propose(cmd(i)).await.expect("propose");
        let index = u64::from_be_bytes(resp.try_into().unwrap());
        assert!(index > last, "indexes increase");
        last = index;
    }
    c.wait_applied(G, last, 5 * SEC).await;
    let expected: Vec<_> = (0..50).map(cmd).collect();
    assert_logs(&c, &rec, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_are_group_committed() {
    let (c, rec) = three();
    let leader = c.wait_leader(G).await;
    let h = c.handle(leader, G);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.propose(cmd(i)).await })
        })
        .collect();
    let mut max = 0;
    for t in tasks {
        let idx = u64::from_be_bytes(t.await.unwrap().expect("propose").try_into().unwrap());
        max = max.max(idx);
    }
    c.wait_applied(G, max, 5 * SEC).await;
    let log = rec.get(leader, G).commands();
    assert_eq!(log.len(), 200);
    let mut sorted = log.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 200, "each command applied exactly once");
    assert_logs(&c, &rec, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_returns_leader_hint() {
    let (c, _) = three();
    let leader = c.wait_leader(G).await;
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    match c.handle(follower, G).propose(cmd(1)).await {
        Err(Error::NotLeader {
            leader: Some(l),
            leader_addr: Some(addr),
            ..
        }) => {
            assert_eq!(l, leader);
            assert_eq!(addr, format!("sim-node-{leader}"));
        }
        other => panic!("expected NotLeader with a hint, got {other:?}"),
    }
    // Bad input is rejected before it reaches Raft.
    assert!(matches!(
        c.handle(leader, G).propose(Vec::new()).await,
        Err(Error::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_the_cluster_commits() {
    let (mut c, rec) = three();
    let old = c.wait_leader(G).await;
    for i in 0..10 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    c.crash(old);
    let survivors: Vec<u64> = c.running();
    let new = c.wait_leader_among(G, &survivors, 5 * SEC).await;
    assert_ne!(new, old);
    for i in 10..20 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    // The old leader comes back from disk and catches up.
    c.restart(old).unwrap();
    let last = c.handle(new, G).status().commit;
    c.wait_applied(G, last, 10 * SEC).await;
    let expected: Vec<_> = (0..20).map(cmd).collect();
    assert_logs(&c, &rec, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_leader_steps_down_and_cannot_commit() {
    let (c, rec) = three();
    let old = c.wait_leader(G).await;
    c.propose(G, cmd(0), 5 * SEC).await.unwrap();
    let majority: Vec<u64> = (1..=3).filter(|&n| n != old).collect();
    c.net.isolate(old, &[1, 2, 3]);

    // A write to the isolated leader never commits (it is answered
    // "unknown" as soon as check-quorum deposes the leader).
    let stuck = c.handle(old, G).propose(cmd(999)).await;
    assert!(
        matches!(
            stuck,
            Err(Error::Timeout)
                | Err(Error::NotLeader { .. })
                | Err(Error::Dropped(_))
                | Err(Error::Unknown(_))
        ),
        "minority write must not succeed: {stuck:?}"
    );
    // Check-quorum: it stepped down.
    assert_ne!(c.handle(old, G).status().role, Role::Leader);
    // The majority elected a leader and commits.
    let new = c.wait_leader_among(G, &majority, 5 * SEC).await;
    for i in 1..10 {
        c.handle(new, G).propose(cmd(i)).await.unwrap();
    }
    // Reads on the minority side fail rather than return stale data.
    assert!(c.handle(old, G).read_index().await.is_err());

    c.net.heal();
    let commit = c.handle(new, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    let expected: Vec<_> = (0..10).map(cmd).collect();
    assert_logs(&c, &rec, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healed_partition_converges_without_losing_committed_entries() {
    let (c, rec) = three();
    c.wait_leader(G).await;
    let mut acked = Vec::new();
    for round in 0..4u64 {
        // Cut a different node off each round, under some message loss.
        let cut = round % 3 + 1;
        c.net.isolate(cut, &[1, 2, 3]);
        c.net.set_drop_rate(0.05);
        let majority: Vec<u64> = (1..=3).filter(|&n| n != cut).collect();
        let leader = c.wait_leader_among(G, &majority, 10 * SEC).await;
        for i in 0..10 {
            let k = round * 100 + i;
            if c.handle(leader, G).propose(cmd(k)).await.is_ok() {
                acked.push(cmd(k));
            }
        }
        c.net.heal();
    }
    let leader = c.wait_leader(G).await;
    // A final write through the settled leader commits everything before it.
    c.propose(G, cmd(9999), 5 * SEC).await.unwrap();
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    let log = rec.get(leader, G).commands();
    for a in &acked {
        assert!(log.contains(a), "acknowledged {a:?} lost");
    }
    assert!(
        acked.len() >= 30,
        "most writes went through: {}",
        acked.len()
    );
    assert_logs(&c, &rec, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_every_acknowledged_entry() {
    let (mut c, rec) = three();
    c.wait_leader(G).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
        acked.push(cmd(i));
    }
    // Crash every node, then bring all back from their directories.
    for n in 1..=3 {
        c.crash(n);
    }
    for n in 1..=3 {
        c.restart(n).unwrap();
    }
    let leader = c.wait_leader(G).await;
    c.propose(G, cmd(30), 5 * SEC).await.unwrap();
    acked.push(cmd(30));
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    assert_logs(&c, &rec, &acked);
}

/// A large state is rewritten only once the commands since its last
/// snapshot add up to a quarter of that snapshot (here "large" is > 1 KiB:
/// the recorder's snapshot holds every command, so it keeps growing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshots_are_amortized_over_the_log() {
    let rec = Recorders::default();
    let c = Cluster::with_config(1, &[G], rec.factory(), |cfg| {
        cfg.snapshot_entries = 10;
        cfg.snapshot_large_bytes = 1024;
    });
    let leader = c.wait_leader(G).await;
    let big = |i: u64| {
        let mut v = cmd(i);
        v.resize(100, b'.');
        v
    };
    let mut taken = Vec::new();
    for i in 0..400 {
        c.propose(G, big(i), 5 * SEC).await.unwrap();
        // Let a background snapshot land before the next is considered.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let st = c.handle(leader, G).status();
        if taken.last() != Some(&st.snapshot_index) {
            taken.push(st.snapshot_index);
        }
    }
    let taken: Vec<u64> = taken.into_iter().filter(|i| *i > 0).collect();
    assert!(taken.len() >= 3, "snapshots still taken: {taken:?}");
    // Every 10 entries while small; then the gap grows with the state
    // (each snapshot holds every command so far, ~100 bytes each): the
    // gaps end well above 10 and never shrink back.
    let gaps: Vec<u64> = taken.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        *gaps.last().unwrap() >= 40,
        "later snapshots amortized: {taken:?}"
    );
    assert!(taken.len() < 20, "not one every 10 entries: {taken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_compaction_is_caught_up_by_snapshot() {
    let rec = Recorders::default();
    let mut c = Cluster::with_config(3, &[G], rec.factory(), |cfg| {
        cfg.snapshot_entries = 20;
        cfg.compact_lag = 5;
    });
    let leader = c.wait_leader(G).await;
    let lagging = (1..=3).find(|&n| n != leader).unwrap();
    c.crash(lagging);
    for i in 0..100 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    // Snapshots are written in the background: wait for one to land.
    let deadline = std::time::Instant::now() + 10 * SEC;
    let st = loop {
        let st = c.handle(leader, G).status();
        if st.snapshot_index >= 80 {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leader never snapshotted: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.restart(lagging).unwrap();
    c.wait_applied(G, st.commit, 10 * SEC).await;
    let s = c.handle(lagging, G).status();
    assert!(s.snapshots_installed >= 1, "caught up by snapshot: {s:?}");
    let expected: Vec<_> = (0..100).map(cmd).collect();
    assert_logs(&c, &rec, &expected);

    // And it survives a restart from its own snapshot + log.
    c.crash(lagging);
    c.restart(lagging).unwrap();
    c.propose(G, cmd(100), 5 * SEC).await.unwrap();
    let commit = c.handle(c.wait_leader(G).await, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    let expected: Vec<_> = (0..=100).map(cmd).collect();
    assert_logs(&c, &rec, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_is_added_caught_up_promoted_and_removed() {
    init_log();
    let rec = Recorders::default();
    let mut c = Cluster::with_config(3, &[G], rec.factory(), |cfg| {
        cfg.snapshot_entries = 30;
        cfg.compact_lag = 0;
    });
    let leader = c.wait_leader(G).await;
    for i in 0..50 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    // Node 4 starts empty and is added as a learner.
    c.start_node(4, &[G], &[]).unwrap();
    c.handle(leader, G)
        .add_learner(4, "sim-node-4")
        .await
        .unwrap();
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    let st = c.handle(4, G).status();
    assert_eq!(st.learners, vec![4]);
    assert_eq!(st.voters, vec![1, 2, 3]);
    assert!(
        st.snapshots_installed >= 1,
        "caught up via snapshot: {st:?}"
    );

    c.handle(leader, G).promote(4).await.unwrap();
    let st = c.handle(leader, G).status();
    assert_eq!(st.voters, vec![1, 2, 3, 4]);
    assert!(st.learners.is_empty());

    // Four voters: a quorum is three, so one crash still commits.
    let victim = (1..=3).find(|&n| n != leader).unwrap();
    c.crash(victim);
    c.propose(G, cmd(50), 5 * SEC).await.unwrap();
    c.restart(victim).unwrap();

    c.handle(c.wait_leader(G).await, G)
        .remove(victim)
        .await
        .unwrap();
    let leader = c.wait_leader(G).await;
    let st = c.handle(leader, G).status();
    assert!(!st.voters.contains(&victim));
    assert_eq!(st.voters.len(), 3);
    c.propose(G, cmd(51), 5 * SEC).await.unwrap();
    let expected: Vec<_> = (0..52).map(cmd).collect();
    let commit = c.handle(leader, G).status().commit;
    for n in st.voters {
        let h = c.handle(n, G);
        let deadline = std::time::Instant::now() + 10 * SEC;
        while h.status().applied < commit {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rec.get(n, G).commands(), expected, "node {n}");
    }
    // Invalid membership input is refused.
    assert!(matches!(
        c.handle(leader, G).promote(0).await,
        Err(Error::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_moves_leadership() {
    let (c, _) = three();
    let leader = c.wait_leader(G).await;
    let target = (1..=3).find(|&n| n != leader).unwrap();
    c.handle(leader, G).transfer_leader(target).await.unwrap();
    assert_eq!(c.wait_leader(G).await, target);
    c.handle(target, G).propose(cmd(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_index_sees_acknowledged_writes_on_any_replica() {
    let (c, rec) = three();
    let leader = c.wait_leader(G).await;
    for i in 0..5 {
        c.handle(leader, G).propose(cmd(i)).await.unwrap();
    }
    for n in 1..=3 {
        let idx = c.handle(n, G).read_index().await.expect("read_index");
        assert!(c.handle(n, G).status().applied >= idx);
        assert_eq!(
            rec.get(n, G).commands().len(),
            5,
            "node {n} saw every write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_groups_progress_independently() {
    let rec = Recorders::default();
    let groups: Vec<u64> = (1..=8).collect();
    let c = Cluster::new(3, &groups, rec.factory());
    for &g in &groups {
        c.wait_leader(g).await;
    }
    // Spread leaders over nodes to show groups elect independently.
    for &g in &groups {
        let l = c.wait_leader(g).await;
        let want = (g % 3) + 1;
        if l != want {
            c.handle(l, g).transfer_leader(want).await.unwrap();
        }
    }
    let mut leaders: Vec<u64> = Vec::new();
    for &g in &groups {
        leaders.push(c.wait_leader(g).await);
    }
    leaders.sort();
    leaders.dedup();
    assert_eq!(leaders, vec![1, 2, 3], "leaders spread over nodes");

    // Stall group 1 by isolating its leader; others keep committing.
    let l1 = c.wait_leader(1).await;
    let before: Vec<u64> = groups
        .iter()
        .map(|&g| c.handle(l1, g).status().term)
        .collect();
    c.net.isolate(l1, &[1, 2, 3]);
    let others: Vec<u64> = (1..=3).filter(|&n| n != l1).collect();
    for &g in &groups {
        let l = c.wait_leader_among(g, &others, 10 * SEC).await;
        for i in 0..5 {
            c.handle(l, g).propose(cmd(g * 1000 + i)).await.unwrap();
        }
    }
    c.net.heal();
    for &g in &groups {
        let l = c.wait_leader(g).await;
        let commit = c.handle(l, g).status().commit;
        c.wait_applied(g, commit, 10 * SEC).await;
        let expected: Vec<_> = (0..5).map(|i| cmd(g * 1000 + i)).collect();
        for n in 1..=3 {
            assert_eq!(rec.get(n, g).commands(), expected, "group {g} node {n}");
        }
    }
    assert_eq!(before.len(), groups.len());
}

#[allow(dead_code)]
fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_learns_the_founding_members_even_without_compaction() {
    // Regression: the founding conf state exists only in the bootstrap
    // snapshot; a node caught up from log entries alone would believe it
    // is the only voter once promoted.
    let rec = Recorders::default();
    let mut c = Cluster::new(3, &[G], rec.factory());
    let leader = c.wait_leader(G).await;
    for i in 0..5 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    assert_eq!(
        c.handle(leader, G).status().snapshot_index,
        5,
        "no compaction yet"
    );
    c.start_node(4, &[G], &[]).unwrap();
    c.handle(leader, G)
        .add_learner(4, "sim-node-4")
        .await
        .unwrap();
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    let st = c.handle(4, G).status();
    assert_eq!(st.voters, vec![1, 2, 3], "{st:?}");
    assert_eq!(st.learners, vec![4]);
    c.handle(leader, G).promote(4).await.unwrap();
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    assert_eq!(c.handle(4, G).status().voters, vec![1, 2, 3, 4]);
    let expected: Vec<_> = (0..5).map(cmd).collect();
    assert_eq!(rec.get(4, G).commands(), expected);
}

/// A state machine whose snapshot job blocks until the test lets it go.
struct GatedSnapshots {
    inner: consensus::testkit::RecordingSm,
    gate: std::sync::Arc<std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    started: std::sync::mpsc::SyncSender<()>,
}

impl consensus::StateMachine for GatedSnapshots {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.inner.apply(index, command)
    }
    fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }
    fn snapshot_job(&self) -> consensus::SnapshotJob {
        let data = self.inner.snapshot();
        let gate = self.gate.lock().unwrap().take();
        let started = self.started.clone();
        Box::new(move |out: &mut dyn std::io::Write| {
            if let Some(gate) = gate {
                let _ = started.send(());
                let _ = gate.recv();
            }
            out.write_all(&data)
        })
    }
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        self.inner.restore(index, data)
    }
}

/// A snapshot being written does not hold up the group: proposals are
/// committed and applied while the job is blocked, and the snapshot lands
/// (and compacts the log) once it is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_snapshot_does_not_stall_the_group() {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Arc::new(std::sync::Mutex::new(Some(gate)));
    let (started_tx, started) = std::sync::mpsc::sync_channel::<()>(8);
    let rec = Recorders::default();
    let factory: consensus::testkit::SmFactory = {
        let gate = gate.clone();
        let rec = rec.clone();
        let rec_factory = rec.factory();
        std::sync::Arc::new(move |node, group| {
            // Keep the recorder bookkeeping of `rec`, wrap its state machine.
            let _ = rec_factory(node, group);
            let inner = rec.get(node, group);
            Box::new(GatedSnapshots {
                inner,
                // Only the first snapshot job anywhere is gated.
                gate: gate.clone(),
                started: started_tx.clone(),
            })
        })
    };
    let c = Cluster::with_config(3, &[G], factory, |cfg| {
        cfg.snapshot_entries = 10;
        cfg.compact_lag = 0;
    });
    let leader = c.wait_leader(G).await;
    let mut n = 0;
    while started.try_recv().is_err() {
        c.propose(G, cmd(n), 5 * SEC).await.unwrap();
        n += 1;
        assert!(n < 1000, "no snapshot was started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let blocked = n;
    // With the job blocked, the group goes on committing and applying.
    for i in blocked..blocked + 200 {
        c.propose(G, cmd(i), 5 * SEC).await.unwrap();
    }
    let gated_node = (1..=3)
        .find(|&node| {
            let s = c.handle(node, G).status();
            s.applied >= s.snapshot_index + 200 && s.snapshots_taken == 0
        })
        .expect("the node with the blocked job applied past it without a snapshot");
    release.send(()).unwrap();
    let deadline = std::time::Instant::now() + 10 * SEC;
    loop {
        let s = c.handle(gated_node, G).status();
        if s.snapshots_taken >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot never landed: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected: Vec<_> = (0..blocked + 200).map(cmd).collect();
    let commit = c.handle(leader, G).status().commit;
    c.wait_applied(G, commit, 10 * SEC).await;
    assert_logs(&c, &rec, &expected);
}

/// Removing a group stops it and deletes its log, hard state and snapshot
/// files on every node; other groups carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_group_leaves_nothing_behind() {
    const G2: u64 = 2;
    let rec = Recorders::default();
    let c = Cluster::new(3, &[G, G2], rec.factory());
    c.wait_leader(G2).await;
    for i in 0..20 {
        c.propose(G2, cmd(i), 5 * SEC).await.unwrap();
    }
    let leader = c.wait_leader(G2).await;
    let snap = c.handle(leader, G2).snapshot().await.unwrap();
    assert!(snap >= 20, "snapshot at {snap}");
    for n in 1..=3 {
        let node = c.node(n);
        node.remove_group(G2).unwrap();
        assert!(node.group(G2).is_none());
        assert!(!node.stored_groups().contains(&G2), "node {n}");
        let left = std::fs::read_dir(c.data_dir(n).join("snapshots"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("g2-"))
            .count();
        assert_eq!(left, 0, "snapshot files of the group left on node {n}");
    }
    c.propose(G, cmd(0), 5 * SEC).await.unwrap();
}
