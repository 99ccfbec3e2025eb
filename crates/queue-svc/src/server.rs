//! A running queue-svc replica: the chassis replica, the metadata group,
//! the partition groups placed here, and the background loops.
//!
//! - `reconcile_loop` (every replica): runs exactly the partition groups
//!   the metadata places on this node — starting new ones (bootstrapped
//!   with their placement, so every founding replica agrees), removing
//!   deleted ones with their storage — and, for partitions it leads,
//!   brings their consumer groups in line with the metadata and hands
//!   leadership to the preferred replica (the first of the placement) once
//!   that one has caught up, so leaders spread evenly and come back after
//!   a replica returns.
//! - `tick_loop` (partition leaders): proposes a `Tick` when a lease or a
//!   backoff falls due, and moves dead letters to the dead-letter topic.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chassis::{Replica, ReplicaConfig};
use consensus::Node;
use parking_lot::RwLock;
use proto::queue::v1::queue_service_server::QueueServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;

use crate::machine::{encode, MetaMachine, PartitionMachine, Proposal, Shared};
use crate::meta::{MetaState, META_GROUP};
use crate::partition::{Command, NewMessage, Outcome, PartitionConfig};
use crate::service::{now_ms, Partition, Queues};

pub const SERVICE_NAME: &str = "dsync.queue.v1.QueueService";

/// Everything a replica needs to start.
#[derive(Clone)]
pub struct QueueConfig {
    pub replica: ReplicaConfig,
    /// How often partition leaders look for due leases and dead letters.
    pub tick_interval: Duration,
}

impl QueueConfig {
    pub fn new(
        node_id: u64,
        peers: std::collections::HashMap<u64, String>,
        data_dir: impl Into<std::path::PathBuf>,
    ) -> Self {
        Self::from_replica(ReplicaConfig::new("queue-svc", node_id, peers, data_dir))
    }

    pub fn from_replica(mut replica: ReplicaConfig) -> Self {
        // A long poll may last its wait_ms (at most 20 s) plus a proposal.
        replica.long_methods = vec![(
            "/dsync.queue.v1.QueueService/Receive".into(),
            Duration::from_secs(30),
        )];
        Self {
            replica,
            tick_interval: Duration::from_millis(50),
        }
    }
}

pub struct QueueServer {
    pub queues: Queues,
    pub addr: std::net::SocketAddr,
    replica: Replica,
    tasks: Vec<JoinHandle<()>>,
}

impl QueueServer {
    /// Starts a replica serving on `listener`. Needs a multi-threaded
    /// tokio runtime.
    pub fn start(cfg: QueueConfig, listener: tokio::net::TcpListener) -> Result<Self, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut replica = Replica::open(cfg.replica.clone())?;
        let node = replica.node().clone();
        let meta_state = Arc::new(RwLock::new(MetaState::default()));
        let (changed, meta_changed) = watch::channel(0u64);
        let meta = node
            .start_group(
                META_GROUP,
                &cfg.replica.voters(),
                Box::new(MetaMachine {
                    state: meta_state.clone(),
                    changed,
                }),
            )
            .map_err(|e| e.to_string())?;
        let members = {
            let meta = meta.clone();
            Arc::new(move || {
                let mut v = meta.status().voters;
                v.sort_unstable();
                v
            })
        };
        let queues = Queues::new(node.clone(), meta, meta_state, members);
        replica.serve(
            listener,
            Routes::new(
                QueueServiceServer::new(queues.clone())
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
            ),
            &[SERVICE_NAME],
        )?;
        let data_dir = cfg.replica.data_dir.join("partitions");
        let tasks = vec![
            tokio::spawn(reconcile_loop(
                queues.clone(),
                data_dir,
                meta_changed,
                replica.closed(),
            )),
            tokio::spawn(tick_loop(
                queues.clone(),
                cfg.tick_interval,
                replica.closed(),
            )),
        ];
        Ok(Self {
            queues,
            addr,
            replica,
            tasks,
        })
    }

    pub fn node(&self) -> &Node {
        self.replica.node()
    }

    /// Graceful stop: leadership handed away, server and groups stopped.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.replica.shutdown().await;
    }

    /// Abrupt stop (tests).
    pub async fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.replica.kill().await;
    }
}

async fn reconcile_loop(
    q: Queues,
    dir: std::path::PathBuf,
    mut meta_changed: watch::Receiver<u64>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = reconcile(&q, &dir).await {
            tracing::warn!(error = %e, "reconciling partitions");
        }
        tokio::select! {
            _ = meta_changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

async fn reconcile(q: &Queues, dir: &std::path::Path) -> Result<(), String> {
    let me = q.node.id();
    let (placed, topics) = {
        let m = q.meta_state.read();
        (m.placed_on(me), m.topics.clone())
    };
    let wanted: HashSet<u64> = placed.iter().map(|(g, _, _)| *g).collect();
    // Stop and delete partitions whose topic is gone.
    let running: Vec<u64> = q.partitions.read().keys().copied().collect();
    for gid in running.into_iter().filter(|g| !wanted.contains(g)) {
        let removed = q.partitions.write().remove(&gid);
        if let Some(p) = removed {
            zero_partition_gauges(&p);
            let labels = [
                ("topic", p.topic.clone()),
                ("partition", p.index.to_string()),
            ];
            metrics::gauge!("dsync_queue_partition_leader", &labels).set(0.0);
        }
        let node = q.node.clone();
        let pdir = dir.join(gid.to_string());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = node.remove_group(gid) {
                tracing::warn!(group = gid, error = %e, "removing a partition group");
            }
            let _ = std::fs::remove_dir_all(pdir);
        })
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(group = gid, "partition removed");
    }
    // Leftovers of partitions deleted while this replica was down. Only
    // once this replica's metadata is known to be current (a read index
    // through the leader): right after a restart it is still replaying,
    // and a partition it has not seen yet is not a deleted one.
    let current = q.meta.read_index().await.is_ok();
    let wanted: HashSet<u64> = q
        .meta_state
        .read()
        .placed_on(me)
        .iter()
        .map(|(g, _, _)| *g)
        .collect();
    for gid in q.node.stored_groups().into_iter().filter(|_| current) {
        if gid != META_GROUP && !wanted.contains(&gid) && q.node.group(gid).is_none() {
            let _ = q.node.remove_group(gid);
            let _ = std::fs::remove_dir_all(dir.join(gid.to_string()));
        }
    }
    for (gid, topic, p) in placed {
        if q.partitions.read().contains_key(&gid) {
            continue;
        }
        let t = &topics[&topic];
        let spec = &t.spec;
        let config = PartitionConfig {
            max_messages: spec.max_messages,
            max_bytes: spec.max_bytes,
            max_age_ms: spec.max_age_ms,
            max_depth: spec.max_depth,
            max_message_bytes: spec.max_message_bytes,
            dedup_window_ms: spec.dedup_window_ms,
        };
        let shared = Shared::new(config, dir.join(gid.to_string())).map_err(|e| e.to_string())?;
        let voters = &t.partitions[p as usize].replicas;
        let sync = spec.durability == crate::meta::Durability::Sync;
        let group = q
            .node
            .start_group_with(
                gid,
                voters,
                Box::new(PartitionMachine {
                    shared: shared.clone(),
                }),
                |c| {
                    // ASYNC: acknowledged once on a quorum in memory; the
                    // fsync follows (votes and terms are always synced).
                    c.sync = sync;
                    // A partition's snapshot carries its live payloads:
                    // take them less often than a small state machine.
                    c.snapshot_entries = c.snapshot_entries.max(50_000);
                },
            )
            .map_err(|e| format!("starting partition group {gid}: {e}"))?;
        q.partitions.write().insert(
            gid,
            Partition {
                topic: topic.clone(),
                index: p,
                group,
                shared,
            },
        );
        tracing::info!(group = gid, %topic, partition = p, "partition started");
    }
    // On partitions led here: consumer groups as the metadata says, and
    // leadership to the preferred replica.
    let parts: Vec<Partition> = q.partitions.read().values().cloned().collect();
    for part in parts {
        let st = part.group.status();
        if !st.is_leader() {
            continue;
        }
        let Some(t) = topics.get(&part.topic) else {
            continue;
        };
        for name in t.groups.keys() {
            if let Err(e) = q.ensure_group(t, &part, name).await {
                tracing::debug!(group = part.group.id(), error = %e, "creating a consumer group");
            }
        }
        let have: Vec<String> = part
            .shared
            .data
            .read()
            .state
            .groups()
            .map(|(g, _)| g.to_owned())
            .collect();
        for name in have.iter().filter(|g| !t.groups.contains_key(*g)) {
            propose(
                q,
                &part,
                Command::DeleteGroup {
                    now_ms: now_ms(),
                    group: name.clone(),
                },
            )
            .await;
        }
        let preferred = t.partitions[part.index as usize].replicas[0];
        let caught_up = st
            .matched
            .iter()
            .any(|(id, m)| *id == preferred && *m >= st.last_index);
        if preferred != me && caught_up {
            if let Err(e) = part.group.transfer_leader(preferred).await {
                tracing::debug!(group = part.group.id(), error = %e, "leader transfer");
            }
        }
    }
    Ok(())
}

/// A proposal of the background loops: its failure is logged (they try
/// again on their next round).
async fn propose(q: &Queues, part: &Partition, cmd: Command) -> Option<Outcome> {
    match q.propose(part, cmd, Vec::new()).await {
        Ok(out) => Some(out),
        Err(e) => {
            tracing::debug!(group = part.group.id(), error = %e, "background proposal");
            None
        }
    }
}

/// On partition leaders: time-driven work and dead letters.
async fn tick_loop(q: Queues, interval: Duration, mut closed: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let parts: Vec<Partition> = q.partitions.read().values().cloned().collect();
        for part in parts {
            if !part.group.status().is_leader() {
                continue;
            }
            let (due, dead) = {
                let d = part.shared.data.read();
                let due = d.state.next_wake_ms().is_some_and(|w| w <= now_ms());
                (due, d.state.pending_dead_letters())
            };
            if due {
                propose(&q, &part, Command::Tick { now_ms: now_ms() }).await;
            }
            if !dead.is_empty() {
                move_dead_letters(&q, &part, dead).await;
            }
        }
        publish_gauges(&q);
    }
}

/// Copies dead letters to the topic's dead-letter topic (the partition of
/// the same index, modulo its count), then finalizes them.
///
/// Each copy's message id is derived from its origin, so copying is
/// idempotent (the DLQ partition deduplicates it), and a dead letter is
/// finalized only once this replica's copy of the DLQ partition shows the
/// id stored: proposed directly when this replica leads the DLQ partition,
/// else forwarded to its leader through the local replica (fire and
/// forget) and confirmed on a later tick. A topic without a dead-letter
/// topic drops them.
async fn move_dead_letters(q: &Queues, part: &Partition, dead: Vec<crate::partition::DeadLetter>) {
    let topic = q.meta_state.read().topics.get(&part.topic).cloned();
    let Some(topic) = topic else { return };
    let mut done: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    if let Some(dlq_name) = &topic.spec.dead_letter_topic {
        let Some(dlq) = q.meta_state.read().topics.get(dlq_name).cloned() else {
            return;
        };
        let dp = part.index % dlq.partitions.len() as u32;
        let Some(target) = q
            .partitions
            .read()
            .get(&dlq.partitions[dp as usize].group_id)
            .cloned()
        else {
            // No replica of it here (a user-chosen DLQ placed elsewhere):
            // the dead letters wait, never delivered meanwhile.
            return;
        };
        let mut messages = Vec::new();
        let mut payloads = Vec::new();
        for d in &dead {
            let id = format!("dlq:{}:{}:{}:{}", topic.id, part.index, d.group, d.offset);
            if target.shared.data.read().state.stored_id(&id).is_some() {
                done.entry(d.group.clone()).or_default().push(d.offset);
                continue;
            }
            let payload = match part.shared.data.read().segments.read(d.offset) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(offset = d.offset, error = %e, "dead letter payload unreadable");
                    continue;
                }
            };
            let mut headers = d.meta.headers.clone();
            headers.extend([
                ("dsync-dlq-origin-topic".to_owned(), topic.name.clone()),
                (
                    "dsync-dlq-origin-partition".to_owned(),
                    part.index.to_string(),
                ),
                ("dsync-dlq-origin-offset".to_owned(), d.offset.to_string()),
                ("dsync-dlq-group".to_owned(), d.group.clone()),
                ("dsync-dlq-attempts".to_owned(), d.attempts.to_string()),
                (
                    "dsync-dlq-last-error".to_owned(),
                    d.last_error.clone().unwrap_or_default(),
                ),
                (
                    "dsync-dlq-origin-message-id".to_owned(),
                    d.meta.id.clone().unwrap_or_default(),
                ),
            ]);
            headers.sort();
            messages.push(NewMessage {
                id: Some(id),
                key: d.meta.key.clone(),
                priority: d.meta.priority,
                headers,
                size: payload.len() as u64,
            });
            payloads.push(payload);
        }
        if !messages.is_empty() {
            let copy = encode(&Proposal {
                cmd: Command::Produce {
                    now_ms: now_ms(),
                    messages,
                },
                payloads,
            });
            if target.group.status().is_leader() {
                match target
                    .group
                    .propose(copy)
                    .await
                    .map(|o| crate::machine::decode::<Outcome>(&o))
                {
                    Ok(Ok(Outcome::Produced(_))) => {
                        // Stored: finalize on the next tick, when the
                        // local copy shows the ids (it does already).
                    }
                    other => tracing::warn!(
                        topic = %topic.name,
                        outcome = ?other.map(|o| o.map(|_| ())),
                        "dead letters not moved yet"
                    ),
                }
            } else if let Err(e) = target.group.forward(copy) {
                tracing::debug!(error = %e, "forwarding dead letters");
            }
        }
    } else {
        for d in &dead {
            done.entry(d.group.clone()).or_default().push(d.offset);
        }
    }
    for (group, offsets) in done {
        let n = offsets.len() as u64;
        let finalized = propose(
            q,
            part,
            Command::DeadLettered {
                now_ms: now_ms(),
                group,
                offsets,
            },
        )
        .await;
        if finalized.is_some() {
            metrics::counter!("dsync_queue_dead_lettered_total", "topic" => part.topic.clone())
                .increment(n);
        }
    }
}

/// Gauges of the partitions this replica leads (a follower's copy would
/// double-count), labelled by topic and partition; group lag by topic,
/// group and partition.
fn publish_gauges(q: &Queues) {
    let parts: Vec<Partition> = q.partitions.read().values().cloned().collect();
    let now = now_ms();
    let mut led = 0u64;
    for p in &parts {
        let labels = [
            ("topic", p.topic.clone()),
            ("partition", p.index.to_string()),
        ];
        let leader = p.group.status().is_leader();
        metrics::gauge!("dsync_queue_partition_leader", &labels).set(if leader {
            1.0
        } else {
            0.0
        });
        if !leader {
            // Figures come from the leader only; a former leader reports
            // zeros, so sums over replicas stay right.
            zero_partition_gauges(p);
            continue;
        }
        led += 1;
        let next_offset = p.shared.data.read().state.next_offset();
        p.shared.rates.lock().update(
            next_offset,
            p.shared.acked.load(std::sync::atomic::Ordering::Relaxed),
        );
        let d = p.shared.data.read();
        let st = &d.state;
        metrics::gauge!("dsync_queue_partition_depth", &labels).set(st.depth() as f64);
        metrics::gauge!("dsync_queue_partition_bytes", &labels).set(st.bytes() as f64);
        metrics::gauge!("dsync_queue_partition_next_offset", &labels).set(st.next_offset() as f64);
        metrics::gauge!("dsync_queue_partition_oldest_age_seconds", &labels).set(
            st.oldest_enqueued_ms()
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
        );
        let mut in_flight = 0;
        for (group, _) in st.groups() {
            let Some(gs) = st.group_stats(group) else {
                continue;
            };
            in_flight += gs.in_flight;
            let gl = [
                ("topic", p.topic.clone()),
                ("partition", p.index.to_string()),
                ("group", group.to_owned()),
            ];
            metrics::gauge!("dsync_queue_group_lag", &gl).set(gs.lag as f64);
            metrics::gauge!("dsync_queue_group_in_flight", &gl).set(gs.in_flight as f64);
            metrics::gauge!("dsync_queue_group_dead_letter_pending", &gl)
                .set(gs.dead_pending as f64);
        }
        metrics::gauge!("dsync_queue_partition_in_flight", &labels).set(in_flight as f64);
    }
    metrics::gauge!("dsync_queue_partitions").set(parts.len() as f64);
    metrics::gauge!("dsync_queue_partitions_led").set(led as f64);
}

/// Zeros a partition's gauges (not its leader any more, or removed).
fn zero_partition_gauges(p: &Partition) {
    let labels = [
        ("topic", p.topic.clone()),
        ("partition", p.index.to_string()),
    ];
    for name in [
        "dsync_queue_partition_depth",
        "dsync_queue_partition_bytes",
        "dsync_queue_partition_oldest_age_seconds",
        "dsync_queue_partition_in_flight",
    ] {
        metrics::gauge!(name, &labels).set(0.0);
    }
    let groups: Vec<String> = p
        .shared
        .data
        .read()
        .state
        .groups()
        .map(|(g, _)| g.to_owned())
        .collect();
    for group in groups {
        let gl = [
            ("topic", p.topic.clone()),
            ("partition", p.index.to_string()),
            ("group", group),
        ];
        for name in [
            "dsync_queue_group_lag",
            "dsync_queue_group_in_flight",
            "dsync_queue_group_dead_letter_pending",
        ] {
            metrics::gauge!(name, &gl).set(0.0);
        }
    }
}
