//! `Queues`: the `QueueService` gRPC handlers.
//!
//! Topic and group administration goes through the metadata group (its
//! leader answers; a follower says NOT_LEADER with the hint). Produce,
//! Receive, Ack, Nack and ExtendLease go to the partitions: a replica
//! serves the partitions it leads and answers NOT_LEADER (with that
//! partition group's leader) for the others, so a client routes each
//! partition to its own leader.
//!
//! Every partition write is one Raft proposal carrying the leader's clock
//! (`now_ms`); the state machine decides everything from the command, so
//! replicas agree on leases, backoffs and dedup windows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consensus::grpc_status::to_status;
use consensus::{GroupHandle, Node};
use dsync_client::routing::PartitionRing;
use parking_lot::RwLock;
use proto::queue::v1 as pb;
use proto::queue::v1::queue_service_server::QueueService;
use proto::status::error;
use tonic::{Code, Request, Response, Status};

use crate::machine::{decode, encode, Proposal, Shared};
use crate::meta::{
    Durability, GroupSpec, MetaCommand, MetaError, MetaOutcome, MetaState, Topic, TopicSpec,
    MAX_PARTITIONS, META_GROUP,
};
use crate::partition::{
    Command, GroupConfig, GroupMode, NewMessage, Outcome, QueueError, Receipt, StartAt,
    MAX_PRIORITY,
};

/// Most messages per Produce and per Receive.
pub const MAX_BATCH: usize = 1000;
/// Longest long poll.
pub const MAX_WAIT_MS: u32 = 20_000;
/// Default and largest payload.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 20;
pub const MAX_MESSAGE_BYTES: u64 = 4 << 20;
const MAX_NAME: usize = 200;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A partition replica running on this node.
#[derive(Clone)]
pub struct Partition {
    pub topic: String,
    pub index: u32,
    pub group: GroupHandle,
    pub shared: Arc<Shared>,
}

#[derive(Clone)]
pub struct Queues {
    pub node: Node,
    pub meta: GroupHandle,
    pub meta_state: Arc<RwLock<MetaState>>,
    /// Partition replicas on this node, by Raft group id.
    pub partitions: Arc<RwLock<HashMap<u64, Partition>>>,
    /// Replica node ids of the cluster (the metadata group's voters).
    pub members: Arc<dyn Fn() -> Vec<u64> + Send + Sync>,
    round_robin: Arc<std::sync::atomic::AtomicU32>,
    /// Key rings by partition count (building one hashes 100 points per
    /// partition: too costly per request).
    rings: Arc<RwLock<HashMap<u32, Arc<PartitionRing>>>>,
}

fn bad(field: &str, message: impl Into<String>) -> Status {
    error(
        Code::InvalidArgument,
        format!("{field}: {}", message.into()),
        "INVALID_ARGUMENT",
        [("field", field)],
    )
}

fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad(field, format!("must be 1 to {MAX_NAME} characters")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(bad(field, "may hold only A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

fn meta_status(e: &MetaError) -> Status {
    let code = match e {
        MetaError::TopicNotFound(_) | MetaError::GroupNotFound { .. } => Code::NotFound,
        MetaError::TopicExists(_) | MetaError::GroupExists { .. } => Code::AlreadyExists,
        MetaError::TopicInUse { .. } => Code::FailedPrecondition,
        MetaError::Invalid(_) => Code::InvalidArgument,
    };
    error(
        code,
        e.to_string(),
        e.reason(),
        std::iter::empty::<(&str, &str)>(),
    )
}

pub fn queue_status(e: &QueueError) -> Status {
    let (code, meta): (Code, Vec<(&str, String)>) = match e {
        QueueError::InvalidArgument { field, .. } => {
            (Code::InvalidArgument, vec![("field", field.clone())])
        }
        QueueError::MessageTooLarge { size, limit } => (
            Code::InvalidArgument,
            vec![("size", size.to_string()), ("limit", limit.to_string())],
        ),
        QueueError::DepthExceeded { depth, limit } => (
            Code::ResourceExhausted,
            vec![("depth", depth.to_string()), ("limit", limit.to_string())],
        ),
        QueueError::GroupNotFound { group } => (Code::NotFound, vec![("group", group.clone())]),
        QueueError::ReceiptNotFound { offset } => {
            (Code::NotFound, vec![("offset", offset.to_string())])
        }
        QueueError::ReceiptExpired { offset } => (
            Code::FailedPrecondition,
            vec![("offset", offset.to_string())],
        ),
    };
    error(code, e.to_string(), e.reason(), meta)
}

/// Receipts are `partition:offset:lease`, opaque to clients.
pub fn encode_receipt(partition: u32, r: Receipt) -> String {
    format!("{partition}:{}:{}", r.offset, r.lease_id)
}

fn decode_receipt(s: &str) -> Option<(u32, Receipt)> {
    let mut it = s.split(':');
    let p = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    let lease_id = it.next()?.parse().ok()?;
    it.next()
        .is_none()
        .then_some((p, Receipt { offset, lease_id }))
}

/// Fills in a topic config's defaults and checks it.
pub fn topic_spec(name: &str, c: &pb::TopicConfig, cluster: usize) -> Result<TopicSpec, Status> {
    // Required: a topic of 0 partitions is a mistake, not a default.
    let partitions = c.partitions;
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(bad(
            "config.partitions",
            format!("must be 1 to {MAX_PARTITIONS}"),
        ));
    }
    let rf = if c.replication_factor == 0 {
        3.min(cluster as u32)
    } else {
        c.replication_factor
    };
    if rf as usize > cluster {
        return Err(error(
            Code::FailedPrecondition,
            format!("replication factor {rf} is above the cluster size {cluster}"),
            "REPLICATION_FACTOR_TOO_HIGH",
            [
                ("replication_factor", rf.to_string()),
                ("cluster_size", cluster.to_string()),
            ],
        ));
    }
    if c.retain_acked {
        return Err(bad(
            "config.retain_acked",
            "not supported yet: acked messages are removed",
        ));
    }
    let max_message_bytes = match u64::from(c.max_message_bytes) {
        0 => DEFAULT_MAX_MESSAGE_BYTES,
        n if n > MAX_MESSAGE_BYTES => {
            return Err(bad(
                "config.max_message_bytes",
                format!("at most {MAX_MESSAGE_BYTES}"),
            ))
        }
        n => n,
    };
    let dead_letter_topic = if c.dead_letter_disabled {
        None
    } else if c.dead_letter_topic.is_empty() {
        Some(format!("{name}.dlq"))
    } else {
        check_name("config.dead_letter_topic", &c.dead_letter_topic)?;
        Some(c.dead_letter_topic.clone())
    };
    let durability = match pb::Durability::try_from(c.durability) {
        Ok(pb::Durability::Unspecified | pb::Durability::Sync) => Durability::Sync,
        Ok(pb::Durability::Async) => Durability::Async,
        Err(_) => return Err(bad("config.durability", "unknown value")),
    };
    Ok(TopicSpec {
        partitions,
        replication_factor: rf,
        max_messages: c.max_messages,
        max_bytes: c.max_bytes,
        max_age_ms: c.max_age_ms,
        max_delivery_attempts: if c.max_delivery_attempts == 0 {
            5
        } else {
            c.max_delivery_attempts
        },
        dead_letter_topic,
        dedup_window_ms: if c.dedup_window_ms == 0 {
            120_000
        } else {
            c.dedup_window_ms
        },
        durability,
        max_depth: c.max_depth,
        max_message_bytes,
    })
}

fn spec_to_pb(s: &TopicSpec) -> pb::TopicConfig {
    pb::TopicConfig {
        partitions: s.partitions,
        replication_factor: s.replication_factor,
        max_messages: s.max_messages,
        max_bytes: s.max_bytes,
        max_age_ms: s.max_age_ms,
        retain_acked: false,
        max_delivery_attempts: s.max_delivery_attempts,
        dead_letter_topic: s.dead_letter_topic.clone().unwrap_or_default(),
        dead_letter_disabled: s.dead_letter_topic.is_none(),
        dedup_window_ms: s.dedup_window_ms,
        durability: match s.durability {
            Durability::Sync => pb::Durability::Sync,
            Durability::Async => pb::Durability::Async,
        } as i32,
        max_depth: s.max_depth,
        max_message_bytes: s.max_message_bytes as u32,
    }
}

pub fn group_config(c: Option<&pb::GroupConfig>, topic: &TopicSpec) -> Result<GroupConfig, Status> {
    let d = GroupConfig::default();
    let Some(c) = c else {
        return Ok(GroupConfig {
            max_attempts: topic.max_delivery_attempts,
            ..d
        });
    };
    let mode = match pb::GroupMode::try_from(c.mode) {
        Ok(pb::GroupMode::Unspecified | pb::GroupMode::Shared) => GroupMode::Shared,
        Ok(pb::GroupMode::Ordered) => GroupMode::Ordered,
        Err(_) => return Err(bad("config.mode", "unknown value")),
    };
    let cfg = GroupConfig {
        mode,
        visibility_timeout_ms: if c.visibility_timeout_ms == 0 {
            d.visibility_timeout_ms
        } else {
            c.visibility_timeout_ms
        },
        max_attempts: if c.max_attempts == 0 {
            topic.max_delivery_attempts
        } else {
            c.max_attempts
        },
        backoff_base_ms: c.backoff_base_ms.unwrap_or(d.backoff_base_ms),
        backoff_cap_ms: if c.backoff_cap_ms == 0 {
            d.backoff_cap_ms
        } else {
            c.backoff_cap_ms
        },
        backoff_jitter_pct: c.backoff_jitter_pct.unwrap_or(d.backoff_jitter_pct),
    };
    if cfg.backoff_jitter_pct > 100 {
        return Err(bad("config.backoff_jitter_pct", "at most 100"));
    }
    if cfg.backoff_cap_ms < cfg.backoff_base_ms {
        return Err(bad(
            "config.backoff_cap_ms",
            "must be at least backoff_base_ms",
        ));
    }
    if cfg.visibility_timeout_ms > 12 * 3_600_000 {
        return Err(bad("config.visibility_timeout_ms", "at most 12 h"));
    }
    Ok(cfg)
}

fn group_to_pb(c: &GroupConfig) -> pb::GroupConfig {
    pb::GroupConfig {
        mode: match c.mode {
            GroupMode::Shared => pb::GroupMode::Shared,
            GroupMode::Ordered => pb::GroupMode::Ordered,
        } as i32,
        visibility_timeout_ms: c.visibility_timeout_ms,
        backoff_base_ms: Some(c.backoff_base_ms),
        backoff_cap_ms: c.backoff_cap_ms,
        backoff_jitter_pct: Some(c.backoff_jitter_pct),
        max_attempts: c.max_attempts,
    }
}

fn start_at(p: Option<&pb::StartPosition>) -> Result<StartAt, Status> {
    let Some(p) = p else {
        return Ok(StartAt::Earliest);
    };
    match pb::PositionKind::try_from(p.kind) {
        Ok(pb::PositionKind::Unspecified | pb::PositionKind::Earliest) => Ok(StartAt::Earliest),
        Ok(pb::PositionKind::Latest) => Ok(StartAt::Latest),
        Ok(pb::PositionKind::Timestamp) => Ok(StartAt::Time(p.timestamp_ms)),
        Ok(pb::PositionKind::Offsets) => Err(bad(
            "start.kind",
            "per-partition offsets are not supported yet",
        )),
        Err(_) => Err(bad("start.kind", "unknown value")),
    }
}

impl Queues {
    pub fn new(
        node: Node,
        meta: GroupHandle,
        meta_state: Arc<RwLock<MetaState>>,
        members: Arc<dyn Fn() -> Vec<u64> + Send + Sync>,
    ) -> Self {
        Self {
            node,
            meta,
            meta_state,
            partitions: Arc::default(),
            members,
            round_robin: Arc::default(),
            rings: Arc::default(),
        }
    }

    fn ring(&self, partitions: u32) -> Arc<PartitionRing> {
        if let Some(r) = self.rings.read().get(&partitions) {
            return r.clone();
        }
        self.rings
            .write()
            .entry(partitions)
            .or_insert_with(|| Arc::new(PartitionRing::new(partitions)))
            .clone()
    }

    async fn propose_meta(&self, cmd: MetaCommand) -> Result<MetaOutcome, Status> {
        let out = self
            .meta
            .propose(encode(&cmd))
            .await
            .map_err(|e| to_status(&e, META_GROUP))?;
        match decode::<MetaOutcome>(&out) {
            Ok(MetaOutcome::Error(e)) => Err(meta_status(&e)),
            Ok(o) => Ok(o),
            Err(e) => Err(Status::internal(format!("undecodable outcome: {e}"))),
        }
    }

    /// A linearizable view of the metadata (through the metadata leader).
    async fn read_meta(&self) -> Result<(), Status> {
        self.meta
            .read_index()
            .await
            .map(|_| ())
            .map_err(|e| to_status(&e, META_GROUP))
    }

    fn topic(&self, name: &str) -> Result<Topic, Status> {
        self.meta_state
            .read()
            .topics
            .get(name)
            .cloned()
            .ok_or_else(|| {
                error(
                    Code::NotFound,
                    format!("topic {name} does not exist"),
                    "TOPIC_NOT_FOUND",
                    [("topic", name)],
                )
            })
    }

    /// The partition if this replica leads it, else NOT_LEADER (with the
    /// hint when known) or PARTITION_NOT_READY.
    fn leading(&self, topic: &Topic, p: u32) -> Result<Partition, Status> {
        let gid = topic.partitions[p as usize].group_id;
        let Some(part) = self.partitions.read().get(&gid).cloned() else {
            return Err(self.not_here(topic, p));
        };
        let st = part.group.status();
        if st.is_leader() {
            return Ok(part);
        }
        let leader_addr = st.leader.and_then(|l| self.node.transport().peer_addr(l));
        Err(to_status(
            &consensus::Error::NotLeader {
                leader: st.leader,
                leader_addr,
                term: st.term,
            },
            gid,
        ))
    }

    /// NOT_LEADER for a partition this replica does not host: point at
    /// its preferred replica (which will redirect if it does not lead).
    fn not_here(&self, topic: &Topic, p: u32) -> Status {
        let pl = &topic.partitions[p as usize];
        let leader = pl.replicas.first().copied();
        let leader_addr = leader.and_then(|l| self.node.transport().peer_addr(l));
        match (leader, leader_addr) {
            (Some(l), Some(a)) if l != self.node.id() => to_status(
                &consensus::Error::NotLeader {
                    leader: Some(l),
                    leader_addr: Some(a),
                    term: 0,
                },
                pl.group_id,
            ),
            _ => error(
                Code::Unavailable,
                format!("partition {p} of {} is not running here yet", topic.name),
                "PARTITION_NOT_READY",
                [("partition", p.to_string())],
            ),
        }
    }

    pub(crate) async fn propose(
        &self,
        part: &Partition,
        cmd: Command,
        payloads: Vec<Vec<u8>>,
    ) -> Result<Outcome, Status> {
        let out = part
            .group
            .propose(encode(&Proposal { cmd, payloads }))
            .await
            .map_err(|e| to_status(&e, part.group.id()))?;
        match decode::<Outcome>(&out) {
            Ok(Outcome::Error(e)) => Err(queue_status(&e)),
            Ok(o) => Ok(o),
            Err(e) => Err(Status::internal(format!("undecodable outcome: {e}"))),
        }
    }

    /// Makes sure the partition knows `group` (the reconciler does this
    /// too; a Receive right after CreateGroup may come first).
    pub(crate) async fn ensure_group(
        &self,
        topic: &Topic,
        part: &Partition,
        group: &str,
    ) -> Result<(), Status> {
        let spec = group_spec(topic, group)?;
        if part
            .shared
            .data
            .read()
            .state
            .groups()
            .any(|(g, _)| g == group)
        {
            return Ok(());
        }
        self.propose(
            part,
            Command::CreateGroup {
                now_ms: now_ms(),
                group: group.to_owned(),
                config: spec.config.clone(),
                start: spec.start,
            },
            Vec::new(),
        )
        .await
        .map(|_| ())
    }

    fn received(
        part: &Partition,
        d: crate::partition::Delivery,
        visibility_ms: u64,
    ) -> Result<pb::ReceivedMessage, Status> {
        let payload = {
            let data = part.shared.data.read();
            if let Some(e) = &data.storage_error {
                return Err(error(
                    Code::Internal,
                    format!("payload store failed: {e}"),
                    "STORAGE_FAILURE",
                    [("partition", part.index.to_string())],
                ));
            }
            data.segments.read(d.offset).map_err(|e| {
                error(
                    Code::Internal,
                    format!("reading offset {}: {e}", d.offset),
                    "STORAGE_FAILURE",
                    [("partition", part.index.to_string())],
                )
            })?
        };
        Ok(pb::ReceivedMessage {
            partition: part.index,
            offset: d.offset,
            key: d.meta.key.clone().unwrap_or_default(),
            payload,
            headers: d.meta.headers.iter().cloned().collect(),
            priority: u32::from(d.meta.priority),
            message_id: d.meta.id.clone().unwrap_or_default(),
            attempt: d.attempt,
            enqueued_at_ms: d.meta.enqueued_ms,
            receipt: encode_receipt(part.index, d.receipt),
            lease_expires_at_ms: now_ms() + visibility_ms,
        })
    }

    /// The partitions a request names (all when it names none), checked.
    fn asked(topic: &Topic, partitions: &[u32]) -> Result<Vec<u32>, Status> {
        if partitions.is_empty() {
            return Ok((0..topic.partitions.len() as u32).collect());
        }
        let mut out = partitions.to_vec();
        out.sort_unstable();
        out.dedup();
        if let Some(p) = out.iter().find(|&&p| p as usize >= topic.partitions.len()) {
            return Err(bad(
                "partitions",
                format!(
                    "partition {p}: topic {} has {}",
                    topic.name,
                    topic.partitions.len()
                ),
            ));
        }
        Ok(out)
    }

    /// Groups receipts by partition, keeping each one's request position.
    fn by_partition(
        topic: &Topic,
        receipts: &[String],
    ) -> Result<BTreeMap<u32, Vec<(usize, Receipt)>>, Status> {
        if receipts.is_empty() || receipts.len() > MAX_BATCH {
            return Err(bad("receipts", format!("1 to {MAX_BATCH} receipts")));
        }
        let mut out: BTreeMap<u32, Vec<(usize, Receipt)>> = BTreeMap::new();
        for (i, r) in receipts.iter().enumerate() {
            match decode_receipt(r) {
                Some((p, rc)) if (p as usize) < topic.partitions.len() => {
                    out.entry(p).or_default().push((i, rc))
                }
                _ => {
                    return Err(bad(
                        "receipts",
                        format!("{r:?} is not a receipt of this topic"),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Ack / Nack / ExtendLease: one proposal per partition.
    async fn settle(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        make: impl Fn(Vec<Receipt>) -> Command,
    ) -> Result<Vec<pb::ReceiptResult>, Status> {
        check_name("topic", topic)?;
        check_name("group", group)?;
        let t = self.topic(topic)?;
        let parts = Self::by_partition(&t, receipts)?;
        let mut results: Vec<Option<pb::ReceiptResult>> = vec![None; receipts.len()];
        for (p, items) in parts {
            let part = self.leading(&t, p)?;
            self.ensure_group(&t, &part, group).await?;
            let out = self
                .propose(
                    &part,
                    make(items.iter().map(|(_, r)| *r).collect()),
                    Vec::new(),
                )
                .await?;
            let per = match out {
                Outcome::Acked(v) | Outcome::Nacked(v) | Outcome::Extended(v) => v,
                other => return Err(Status::internal(format!("unexpected outcome {other:?}"))),
            };
            for ((i, _), res) in items.into_iter().zip(per) {
                results[i] = Some(pb::ReceiptResult {
                    receipt: receipts[i].clone(),
                    ok: res.is_ok(),
                    reason: res
                        .as_ref()
                        .err()
                        .map(|e| e.reason().to_owned())
                        .unwrap_or_default(),
                    message: res
                        .as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    partition: Some(p),
                    ..Default::default()
                });
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every receipt answered"))
            .collect())
    }

    /// The partitions of `topic` this replica leads, as (index, partition).
    fn led(&self, t: &Topic) -> Vec<Partition> {
        let parts = self.partitions.read();
        t.partitions
            .iter()
            .filter_map(|pl| parts.get(&pl.group_id))
            .filter(|p| p.group.status().is_leader())
            .cloned()
            .collect()
    }

    fn topic_info(&self, t: &Topic) -> pb::TopicInfo {
        let parts = self.partitions.read();
        let now = now_ms();
        let mut depth = 0;
        let mut bytes = 0;
        let partitions = t
            .partitions
            .iter()
            .enumerate()
            .map(|(i, pl)| {
                let mut info = pb::PartitionInfo {
                    partition: i as u32,
                    group_id: pl.group_id,
                    replica_ids: pl.replicas.clone(),
                    ..Default::default()
                };
                if let Some(p) = parts.get(&pl.group_id) {
                    let st = p.group.status();
                    info.leader_id = st.leader.unwrap_or(0);
                    info.leader_addr = st
                        .leader
                        .and_then(|l| self.node.transport().peer_addr(l))
                        .unwrap_or_default();
                    info.term = st.term;
                    let d = p.shared.data.read();
                    info.stats_available = true;
                    info.depth = d.state.depth();
                    info.bytes = d.state.bytes();
                    info.next_offset = d.state.next_offset();
                    let rates = *p.shared.rates.lock();
                    info.produce_rate = rates.produce;
                    info.consume_rate = rates.consume;
                    info.first_offset = d
                        .state
                        .messages()
                        .next()
                        .map_or(info.next_offset, |m| m.offset);
                    info.oldest_message_age_ms = d
                        .state
                        .oldest_enqueued_ms()
                        .map_or(0, |t| now.saturating_sub(t));
                    info.in_flight = d
                        .state
                        .groups()
                        .filter_map(|(g, _)| d.state.group_stats(g))
                        .map(|s| s.in_flight)
                        .sum();
                    depth += info.depth;
                    bytes += info.bytes;
                }
                info
            })
            .collect();
        let groups = t
            .groups
            .iter()
            .map(|(name, g)| {
                let mut gi = pb::GroupInfo {
                    name: name.clone(),
                    config: Some(group_to_pb(&g.config)),
                    created_at_ms: g.created_ms,
                    ..Default::default()
                };
                let mut consumers: Vec<String> = Vec::new();
                for (i, pl) in t.partitions.iter().enumerate() {
                    let Some(p) = parts.get(&pl.group_id) else {
                        continue;
                    };
                    let d = p.shared.data.read();
                    let Some(s) = d.state.group_stats(name) else {
                        continue;
                    };
                    gi.lag += s.lag;
                    gi.in_flight += s.in_flight;
                    gi.dead_letter_pending += s.dead_pending;
                    consumers.extend(s.consumers.iter().cloned());
                    gi.partitions.push(pb::GroupPartitionInfo {
                        partition: i as u32,
                        lag: s.lag,
                        in_flight: s.in_flight,
                        dead_letter_pending: s.dead_pending,
                        ..Default::default()
                    });
                }
                consumers.sort();
                consumers.dedup();
                gi.consumers = consumers
                    .into_iter()
                    .map(|name| pb::ConsumerInfo {
                        name,
                        ..Default::default()
                    })
                    .collect();
                gi
            })
            .collect();
        pb::TopicInfo {
            name: t.name.clone(),
            state: pb::TopicState::Active as i32,
            config: Some(spec_to_pb(&t.spec)),
            created_at_ms: t.created_ms,
            metadata_group_id: META_GROUP,
            partitions,
            groups,
            dead_letter_for: t.dead_letter_for.iter().cloned().collect(),
            depth,
            bytes,
            read_index: 0,
        }
    }

    /// Placement of `partitions` partitions of `name`: RF replicas each by
    /// consistent hashing, the preferred leader (first) chosen so leaders
    /// spread evenly over the members.
    fn place(&self, name: &str, partitions: u32, rf: u32, members: &[u64]) -> Vec<Vec<u64>> {
        let mut leads: BTreeMap<u64, usize> = members.iter().map(|m| (*m, 0)).collect();
        for t in self.meta_state.read().topics.values() {
            for pl in &t.partitions {
                if let Some(first) = pl.replicas.first() {
                    *leads.entry(*first).or_default() += 1;
                }
            }
        }
        (0..partitions)
            .map(|p| {
                let mut r = dsync_client::routing::replicas_for(
                    &format!("{name}/{p}"),
                    members,
                    rf as usize,
                );
                let best = (0..r.len()).min_by_key(|&i| (leads[&r[i]], i)).unwrap_or(0);
                r.swap(0, best);
                *leads.entry(r[0]).or_default() += 1;
                r
            })
            .collect()
    }
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl QueueService for Queues {
    async fn create_topic(&self, req: Request<pb::CreateTopicRequest>) -> Res<pb::TopicInfo> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        let members = (self.members)();
        if members.is_empty() {
            return Err(error(
                Code::Unavailable,
                "the metadata group has not started yet; retry shortly",
                "NO_LEADER",
                [("group_id", META_GROUP.to_string())],
            ));
        }
        let spec = topic_spec(&r.name, &r.config.unwrap_or_default(), members.len())?;
        let placement = self.place(&r.name, spec.partitions, spec.replication_factor, &members);
        // A dead-letter topic created with its topic shares its placement:
        // partition i of both prefers the same leader, so moving a dead
        // letter is a local proposal.
        let dlq_placement = match &spec.dead_letter_topic {
            Some(_) => placement.clone(),
            None => Vec::new(),
        };
        let out = self
            .propose_meta(MetaCommand::CreateTopic {
                now_ms: now_ms(),
                name: r.name.clone(),
                spec,
                placement,
                dlq_placement,
            })
            .await?;
        let MetaOutcome::Topic { topic, .. } = out else {
            return Err(Status::internal("unexpected outcome"));
        };
        Ok(Response::new(self.topic_info(&topic)))
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Res<pb::DeleteTopicResponse> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        self.propose_meta(MetaCommand::DeleteTopic { name: r.name })
            .await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn purge_topic(
        &self,
        req: Request<pb::PurgeTopicRequest>,
    ) -> Res<pb::PurgeTopicResponse> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        self.read_meta().await?;
        let t = self.topic(&r.name)?;
        let mut resp = pb::PurgeTopicResponse::default();
        // Every partition asked for must be led here; otherwise NOT_LEADER
        // names the first one that is not (clients send each leader its
        // own partitions).
        let parts = Self::asked(&t, &r.partitions)?
            .into_iter()
            .map(|p| self.leading(&t, p))
            .collect::<Result<Vec<_>, _>>()?;
        for part in parts {
            let bytes = part.shared.data.read().state.bytes();
            if let Outcome::Purged { count } = self
                .propose(&part, Command::Purge { now_ms: now_ms() }, Vec::new())
                .await?
            {
                resp.purged_messages += count;
                resp.purged_bytes += bytes;
            }
        }
        Ok(Response::new(resp))
    }

    async fn list_topics(
        &self,
        req: Request<pb::ListTopicsRequest>,
    ) -> Res<pb::ListTopicsResponse> {
        let r = req.into_inner();
        self.read_meta().await?;
        let state = self.meta_state.read();
        let size = if r.page_size == 0 {
            100
        } else {
            r.page_size.min(1000)
        } as usize;
        let mut topics: Vec<pb::TopicSummary> = state
            .topics
            .range(r.page_token.clone()..)
            .filter(|(n, _)| n.starts_with(&r.prefix) && **n != r.page_token)
            .take(size + 1)
            .map(|(_, t)| pb::TopicSummary {
                name: t.name.clone(),
                state: pb::TopicState::Active as i32,
                partitions: t.spec.partitions,
                replication_factor: t.spec.replication_factor,
                durability: spec_to_pb(&t.spec).durability,
                dead_letter_topic: t.spec.dead_letter_topic.clone().unwrap_or_default(),
                groups: t.groups.len() as u32,
                created_at_ms: t.created_ms,
            })
            .collect();
        let next_page_token = if topics.len() > size {
            topics.truncate(size);
            topics.last().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTopicsResponse {
            topics,
            next_page_token,
        }))
    }

    async fn describe_topic(&self, req: Request<pb::DescribeTopicRequest>) -> Res<pb::TopicInfo> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        self.read_meta().await?;
        let t = self.topic(&r.name)?;
        Ok(Response::new(self.topic_info(&t)))
    }

    async fn create_group(
        &self,
        req: Request<pb::CreateGroupRequest>,
    ) -> Res<pb::CreateGroupResponse> {
        let r = req.into_inner();
        check_name("topic", &r.topic)?;
        check_name("group", &r.group)?;
        self.read_meta().await?;
        let t = self.topic(&r.topic)?;
        let config = group_config(r.config.as_ref(), &t.spec)?;
        let start = start_at(r.start.as_ref())?;
        let out = self
            .propose_meta(MetaCommand::CreateGroup {
                now_ms: now_ms(),
                topic: r.topic,
                group: r.group,
                config: config.clone(),
                start,
            })
            .await?;
        let MetaOutcome::Group { created } = out else {
            return Err(Status::internal("unexpected outcome"));
        };
        Ok(Response::new(pb::CreateGroupResponse {
            config: Some(group_to_pb(&config)),
            created,
            positions: Vec::new(),
        }))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Res<pb::DeleteGroupResponse> {
        let r = req.into_inner();
        check_name("topic", &r.topic)?;
        check_name("group", &r.group)?;
        self.propose_meta(MetaCommand::DeleteGroup {
            topic: r.topic,
            group: r.group,
        })
        .await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn reset_group(
        &self,
        req: Request<pb::ResetGroupRequest>,
    ) -> Res<pb::ResetGroupResponse> {
        let r = req.into_inner();
        check_name("topic", &r.topic)?;
        check_name("group", &r.group)?;
        self.read_meta().await?;
        let t = self.topic(&r.topic)?;
        let to = start_at(r.to.as_ref())?;
        let parts = Self::asked(&t, &r.partitions)?
            .into_iter()
            .map(|p| self.leading(&t, p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut positions = Vec::new();
        for part in parts {
            self.ensure_group(&t, &part, &r.group).await?;
            if let Outcome::Reset { start } = self
                .propose(
                    &part,
                    Command::Reset {
                        now_ms: now_ms(),
                        group: r.group.clone(),
                        to,
                    },
                    Vec::new(),
                )
                .await?
            {
                positions.push(pb::PartitionPosition {
                    partition: part.index,
                    offset: start,
                });
            }
        }
        Ok(Response::new(pb::ResetGroupResponse { positions }))
    }

    async fn produce(&self, req: Request<pb::ProduceRequest>) -> Res<pb::ProduceResponse> {
        let r = req.into_inner();
        check_name("topic", &r.topic)?;
        if r.messages.is_empty() || r.messages.len() > MAX_BATCH {
            return Err(bad("messages", format!("1 to {MAX_BATCH} messages")));
        }
        let t = self.topic(&r.topic)?;
        if r.partition.is_some_and(|p| p >= t.spec.partitions) {
            return Err(bad(
                "partition",
                format!("topic {} has {} partitions", t.name, t.spec.partitions),
            ));
        }
        let ring = self.ring(t.spec.partitions);
        // Validate everything and route every message before writing any.
        let mut routed: BTreeMap<u32, Vec<(usize, NewMessage, Vec<u8>)>> = BTreeMap::new();
        // The partitions led here, looked up once per request if needed.
        let mut led: Option<Vec<Partition>> = None;
        let rr = self
            .round_robin
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (i, m) in r.messages.into_iter().enumerate() {
            if m.priority > u32::from(MAX_PRIORITY) {
                return Err(bad(
                    "messages.priority",
                    format!("message {i}: 0 to {MAX_PRIORITY}"),
                ));
            }
            if m.payload.len() as u64 > t.spec.max_message_bytes {
                return Err(queue_status(&QueueError::MessageTooLarge {
                    size: m.payload.len() as u64,
                    limit: t.spec.max_message_bytes,
                }));
            }
            if m.message_id.len() > 128 || m.key.len() > 1024 {
                return Err(bad(
                    "messages",
                    format!("message {i}: message_id at most 128 bytes, key at most 1024"),
                ));
            }
            if m.headers.keys().any(|k| k.starts_with("dsync-")) {
                return Err(bad(
                    "messages.headers",
                    "names starting with dsync- are reserved",
                ));
            }
            let p = if !m.key.is_empty() {
                ring.partition(&m.key)
            } else if !m.message_id.is_empty() {
                ring.partition(m.message_id.as_bytes())
            } else if let Some(p) = r.partition {
                p
            } else {
                // Round robin over the partitions led here, so a keyless
                // batch is served by this replica alone.
                let led = led.get_or_insert_with(|| self.led(&t));
                match led.len() {
                    0 => (rr as usize % t.partitions.len()) as u32,
                    n => led[(rr as usize + i) % n].index,
                }
            };
            let mut headers: Vec<(String, String)> = m.headers.into_iter().collect();
            headers.sort();
            let nm = NewMessage {
                id: (!m.message_id.is_empty()).then_some(m.message_id),
                key: (!m.key.is_empty()).then_some(m.key),
                priority: m.priority as u8,
                headers,
                size: m.payload.len() as u64,
            };
            routed.entry(p).or_default().push((i, nm, m.payload));
        }
        let parts = routed
            .keys()
            .map(|&p| self.leading(&t, p))
            .collect::<Result<Vec<_>, _>>()?;
        // Every group the metadata lists must exist in a partition before
        // a message is appended there: otherwise another group could ack
        // (and so remove) it before a new group learned of the partition.
        for part in &parts {
            let missing: Vec<String> = {
                let d = part.shared.data.read();
                t.groups
                    .keys()
                    .filter(|g| !d.state.groups().any(|(have, _)| have == g.as_str()))
                    .cloned()
                    .collect()
            };
            for g in missing {
                self.ensure_group(&t, part, &g).await?;
            }
        }
        let total: usize = routed.values().map(Vec::len).sum();
        let mut results = vec![pb::Produced::default(); total];
        // Partitions are independent groups: propose to all at once.
        let proposals = parts.into_iter().zip(routed).map(|(part, (p, items))| {
            let ids: Vec<(usize, String)> = items
                .iter()
                .map(|(i, m, _)| (*i, m.id.clone().unwrap_or_default()))
                .collect();
            let (messages, payloads): (Vec<NewMessage>, Vec<Vec<u8>>) =
                items.into_iter().map(|(_, m, pl)| (m, pl)).unzip();
            async move {
                let out = self
                    .propose(
                        &part,
                        Command::Produce {
                            now_ms: now_ms(),
                            messages,
                        },
                        payloads,
                    )
                    .await?;
                Ok::<_, Status>((p, ids, out))
            }
        });
        for res in futures::future::join_all(proposals).await {
            let (p, ids, out) = res?;
            let Outcome::Produced(produced) = out else {
                return Err(Status::internal("unexpected outcome"));
            };
            for ((i, id), pr) in ids.into_iter().zip(produced) {
                results[i] = pb::Produced {
                    partition: p,
                    offset: pr.offset,
                    message_id: id,
                    duplicate: pr.duplicate,
                };
            }
        }
        metrics::counter!("dsync_queue_produced_total", "topic" => t.name.clone())
            .increment(total as u64);
        Ok(Response::new(pb::ProduceResponse { results }))
    }

    async fn receive(&self, req: Request<pb::ReceiveRequest>) -> Res<pb::ReceiveResponse> {
        let r = req.into_inner();
        check_name("topic", &r.topic)?;
        check_name("group", &r.group)?;
        if r.consumer.len() > MAX_NAME {
            return Err(bad("consumer", format!("at most {MAX_NAME} characters")));
        }
        let max = match r.max_messages {
            0 => 1,
            n if n as usize > MAX_BATCH => {
                return Err(bad("max_messages", format!("1 to {MAX_BATCH}")))
            }
            n => n,
        };
        if r.wait_ms > MAX_WAIT_MS {
            return Err(bad("wait_ms", format!("at most {MAX_WAIT_MS}")));
        }
        let t = self.topic(&r.topic)?;
        group_spec(&t, &r.group)?;
        let wanted = Self::asked(&t, &r.partitions)?;
        let wanted = |p: u32| wanted.contains(&p);
        let mut led: Vec<Partition> = self
            .led(&t)
            .into_iter()
            .filter(|p| wanted(p.index))
            .collect();
        let assignment = pb::Assignment {
            serving: led.iter().map(|p| p.index).collect(),
            elsewhere: (0..t.partitions.len() as u32)
                .filter(|&p| wanted(p) && !led.iter().any(|l| l.index == p))
                .map(|p| pb::PartitionRoute {
                    partition: p,
                    // The partition's leader as this replica knows it
                    // (or its preferred replica, when not hosted here).
                    leader: self
                        .leading(&t, p)
                        .err()
                        .and_then(|e| proto::leader_hint(&e)),
                })
                .collect(),
        };
        if led.is_empty() {
            // Nothing to serve here: send the client to a leader.
            let p = (0..t.partitions.len() as u32)
                .find(|&p| wanted(p))
                .unwrap_or(0);
            return Err(match self.leading(&t, p) {
                Err(s) => s,
                Ok(_) => Status::unavailable("partition leadership changed; retry"),
            });
        }
        let rot = self
            .round_robin
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize
            % led.len();
        led.rotate_left(rot);
        let deadline = Instant::now() + Duration::from_millis(u64::from(r.wait_ms));
        let mut messages = Vec::new();
        loop {
            // Register interest before looking, so a produce between the
            // look and the wait still wakes us.
            let notified: Vec<_> = led.iter().map(|p| p.shared.changed.notified()).collect();
            for part in &led {
                if messages.len() >= max as usize {
                    break;
                }
                self.ensure_group(&t, part, &r.group).await?;
                if !part.shared.data.read().state.has_deliverable(&r.group) {
                    continue;
                }
                let vis = t.groups[&r.group].config.visibility_timeout_ms;
                let out = self
                    .propose(
                        part,
                        Command::Receive {
                            now_ms: now_ms(),
                            group: r.group.clone(),
                            consumer: r.consumer.clone(),
                            max: max - messages.len() as u32,
                            lease_id: 0,
                        },
                        Vec::new(),
                    )
                    .await?;
                if let Outcome::Received(ds) = out {
                    for d in ds {
                        messages.push(Self::received(part, d, vis)?);
                    }
                }
            }
            if !messages.is_empty() || Instant::now() >= deadline {
                break;
            }
            let wake = futures::future::select_all(notified.into_iter().map(Box::pin));
            let next_due = led
                .iter()
                .filter_map(|p| p.shared.data.read().state.next_wake_ms())
                .min()
                .map(|ms| Duration::from_millis(ms.saturating_sub(now_ms()).max(1)))
                .unwrap_or(Duration::from_secs(1))
                .min(deadline.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(next_due, wake).await;
        }
        metrics::counter!("dsync_queue_delivered_total", "topic" => t.name.clone())
            .increment(messages.len() as u64);
        Ok(Response::new(pb::ReceiveResponse {
            messages,
            assignment: Some(assignment),
        }))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Res<pb::AckResponse> {
        let r = req.into_inner();
        let group = r.group.clone();
        let results = self
            .settle(&r.topic, &r.group, &r.receipts, |receipts| Command::Ack {
                now_ms: now_ms(),
                group: group.clone(),
                receipts,
            })
            .await?;
        metrics::counter!("dsync_queue_acked_total")
            .increment(results.iter().filter(|r| r.ok).count() as u64);
        Ok(Response::new(pb::AckResponse { results }))
    }

    async fn nack(&self, req: Request<pb::NackRequest>) -> Res<pb::NackResponse> {
        let r = req.into_inner();
        if r.delay_ms.is_some_and(|d| d > 12 * 3_600_000) {
            return Err(bad("delay_ms", "at most 12 h"));
        }
        let group = r.group.clone();
        let mut err = r.error.clone();
        if err.len() > 1024 {
            // At a character boundary: the text is UTF-8.
            let cut = (0..=1024)
                .rev()
                .find(|&i| err.is_char_boundary(i))
                .unwrap_or(0);
            err.truncate(cut);
        }
        let results = self
            .settle(&r.topic, &r.group, &r.receipts, |receipts| Command::Nack {
                now_ms: now_ms(),
                group: group.clone(),
                receipts,
                delay_ms: r.delay_ms,
                error: (!err.is_empty()).then(|| err.clone()),
            })
            .await?;
        Ok(Response::new(pb::NackResponse { results }))
    }

    async fn extend_lease(
        &self,
        req: Request<pb::ExtendLeaseRequest>,
    ) -> Res<pb::ExtendLeaseResponse> {
        let r = req.into_inner();
        if r.visibility_ms == 0 || r.visibility_ms > 12 * 3_600_000 {
            return Err(bad("visibility_ms", "1 ms to 12 h"));
        }
        let group = r.group.clone();
        let mut results = self
            .settle(&r.topic, &r.group, &r.receipts, |receipts| {
                Command::ExtendLease {
                    now_ms: now_ms(),
                    group: group.clone(),
                    receipts,
                    visibility_ms: r.visibility_ms,
                }
            })
            .await?;
        let until = now_ms() + r.visibility_ms;
        for res in results.iter_mut().filter(|r| r.ok) {
            res.lease_expires_at_ms = until;
        }
        Ok(Response::new(pb::ExtendLeaseResponse { results }))
    }

    type SubscribeStream =
        futures::stream::BoxStream<'static, Result<pb::SubscribeResponse, Status>>;

    /// A push consumer with credit-based flow control: every message sent
    /// spends one credit, and nothing is sent without one, so the consumer
    /// never has more messages outstanding than it granted. Two tasks: one
    /// reads the consumer's requests (credits, acks, nacks, extends), one
    /// fetches messages (a long-polling `Receive` as credit allows). A fetch
    /// is never cancelled half-way, so leases it took are always sent.
    async fn subscribe(
        &self,
        req: Request<tonic::Streaming<pb::SubscribeRequest>>,
    ) -> Res<Self::SubscribeStream> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            bad(
                "topic",
                "the first request names the topic, group and consumer",
            )
        })?;
        check_name("topic", &first.topic)?;
        check_name("group", &first.group)?;
        if first.consumer.len() > MAX_NAME {
            return Err(bad("consumer", format!("at most {MAX_NAME} characters")));
        }
        let t = self.topic(&first.topic)?;
        group_spec(&t, &first.group)?;
        const MAX_CREDITS: u64 = 10_000;
        let credits = Arc::new(AtomicU64::new(0));
        let granted = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::SubscribeResponse, Status>>(16);
        let (topic, group, consumer, partitions) = (
            first.topic.clone(),
            first.group.clone(),
            first.consumer.clone(),
            first.partitions.clone(),
        );
        // Requests: credits and settlements.
        {
            let (q, credits, granted, done, tx) = (
                self.clone(),
                credits.clone(),
                granted.clone(),
                done.clone(),
                tx.clone(),
            );
            let (topic, group) = (topic.clone(), group.clone());
            tokio::spawn(async move {
                let mut next = Some(first);
                loop {
                    let Some(m) = next.take() else {
                        match inbound.message().await {
                            Ok(Some(m)) => {
                                next = Some(m);
                                continue;
                            }
                            _ => break,
                        }
                    };
                    if m.credits > 0 {
                        let now = credits.load(Ordering::SeqCst);
                        credits.store(
                            (now + u64::from(m.credits)).min(MAX_CREDITS),
                            Ordering::SeqCst,
                        );
                        granted.notify_one();
                    }
                    let mut resp = pb::SubscribeResponse {
                        credits: credits.load(Ordering::SeqCst),
                        ..Default::default()
                    };
                    let settle = |kind: &'static str, receipts: Vec<String>| {
                        let (q, topic, group) = (q.clone(), topic.clone(), group.clone());
                        async move {
                            if receipts.is_empty() {
                                return Ok(Vec::new());
                            }
                            let now = now_ms();
                            match kind {
                                "ack" => {
                                    q.settle(&topic, &group, &receipts, |r| Command::Ack {
                                        now_ms: now,
                                        group: group.clone(),
                                        receipts: r,
                                    })
                                    .await
                                }
                                _ => {
                                    q.settle(&topic, &group, &receipts, |r| Command::ExtendLease {
                                        now_ms: now,
                                        group: group.clone(),
                                        receipts: r,
                                        visibility_ms: group_visibility(&q, &topic, &group),
                                    })
                                    .await
                                }
                            }
                        }
                    };
                    let outcome = async {
                        resp.ack_results = settle("ack", m.acks.clone()).await?;
                        resp.extend_results = settle("extend", m.extends.clone()).await?;
                        for n in &m.nacks {
                            let (g, e) = (group.clone(), n.error.clone());
                            let r = q
                                .settle(&topic, &group, std::slice::from_ref(&n.receipt), |r| {
                                    Command::Nack {
                                        now_ms: now_ms(),
                                        group: g.clone(),
                                        receipts: r,
                                        delay_ms: n.delay_ms,
                                        error: (!e.is_empty()).then(|| e.clone()),
                                    }
                                })
                                .await?;
                            resp.nack_results.extend(r);
                        }
                        Ok::<_, Status>(())
                    }
                    .await;
                    let settled = !resp.ack_results.is_empty()
                        || !resp.extend_results.is_empty()
                        || !resp.nack_results.is_empty();
                    let sent = match outcome {
                        Err(e) => tx.send(Err(e)).await,
                        Ok(()) if settled => tx.send(Ok(resp)).await,
                        Ok(()) => Ok(()),
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                done.store(true, Ordering::SeqCst);
                granted.notify_one();
            });
        }
        // Deliveries, as credit allows.
        {
            let q = self.clone();
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    let have = credits.load(Ordering::SeqCst);
                    if have == 0 {
                        granted.notified().await;
                        continue;
                    }
                    let req = pb::ReceiveRequest {
                        topic: topic.clone(),
                        group: group.clone(),
                        consumer: consumer.clone(),
                        max_messages: have.min(MAX_BATCH as u64) as u32,
                        wait_ms: 1_000,
                        partitions: partitions.clone(),
                        ..Default::default()
                    };
                    match q.receive(Request::new(req)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.messages.is_empty() {
                                continue;
                            }
                            credits.fetch_sub(r.messages.len() as u64, Ordering::SeqCst);
                            let resp = pb::SubscribeResponse {
                                credits: credits.load(Ordering::SeqCst),
                                messages: r.messages,
                                assignment: r.assignment,
                                ..Default::default()
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            // Not the leader of anything wanted, topic gone…:
                            // the consumer re-subscribes where the hint says.
                            let _ = tx.send(Err(e)).await;
                            break;
                        }
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The visibility a Subscribe's lease extensions get: the group's own.
fn group_visibility(q: &Queues, topic: &str, group: &str) -> u64 {
    q.meta_state
        .read()
        .topics
        .get(topic)
        .and_then(|t| t.groups.get(group))
        .map_or(GroupConfig::default().visibility_timeout_ms, |g| {
            g.config.visibility_timeout_ms
        })
}

/// A group of `topic` as the metadata has it, or GROUP_NOT_FOUND.
fn group_spec<'a>(topic: &'a Topic, group: &str) -> Result<&'a GroupSpec, Status> {
    topic.groups.get(group).ok_or_else(|| {
        error(
            Code::NotFound,
            format!("group {group} does not exist on topic {}", topic.name),
            "GROUP_NOT_FOUND",
            [("topic", topic.name.as_str()), ("group", group)],
        )
    })
}
