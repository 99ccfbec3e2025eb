//! The metadata group's state: topics, their partitions' placement, and
//! consumer groups.
//!
//! One Raft group ([`META_GROUP`]) on every replica holds it. It is small
//! (a few hundred bytes a topic), so it is kept whole in memory and
//! snapshotted as JSON. Each replica watches it (`crate::server`'s
//! reconciler) and runs the partition groups placed on it: a topic created
//! here starts its partition groups, a topic deleted here stops them and
//! frees their storage.
//!
//! Placement is computed by the proposer (consistent hashing over the
//! members, `crate::placement`) and carried in the command, so applying
//! it needs no hashing and every replica stores the same placement whatever
//! build it runs. Topic ids are never reused, so a partition's Raft group
//! id (`topic_id << 16 | partition`) names one partition forever.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::partition::{GroupConfig, StartAt};

/// The metadata group's Raft group id.
pub const META_GROUP: u64 = 1;
/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 256;

/// The Raft group id of a topic's partition.
pub fn partition_group(topic_id: u32, partition: u32) -> u64 {
    (u64::from(topic_id) << 16) | u64::from(partition)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Durability {
    /// Acknowledged once fsync'd on a quorum.
    #[default]
    Sync,
    /// Acknowledged once in memory on a quorum, before the fsync.
    Async,
}

/// A topic's configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub partitions: u32,
    pub replication_factor: u32,
    pub max_messages: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
    pub max_delivery_attempts: u32,
    /// `None`: exhausted messages are dropped (a dead-letter topic's own).
    pub dead_letter_topic: Option<String>,
    pub dedup_window_ms: u64,
    pub durability: Durability,
    pub max_depth: u64,
    pub max_message_bytes: u64,
}

/// Where one partition lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub group_id: u64,
    /// Replica node ids; the first is the preferred leader.
    pub replicas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub config: GroupConfig,
    pub start: StartAt,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    pub id: u32,
    pub name: String,
    pub spec: TopicSpec,
    pub partitions: Vec<Placement>,
    pub groups: BTreeMap<String, GroupSpec>,
    pub created_ms: u64,
    /// Set on a dead-letter topic: the topic it collects for.
    pub dead_letter_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates `name` (and its dead-letter topic, if it names one that does
    /// not exist, with `dlq_partitions`' placement).
    CreateTopic {
        now_ms: u64,
        name: String,
        spec: TopicSpec,
        placement: Vec<Vec<u64>>,
        dlq_placement: Vec<Vec<u64>>,
    },
    DeleteTopic {
        name: String,
    },
    CreateGroup {
        now_ms: u64,
        topic: String,
        group: String,
        config: GroupConfig,
        start: StartAt,
    },
    DeleteGroup {
        topic: String,
        group: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("topic {0} does not exist")]
    TopicNotFound(String),
    #[error("topic {0} exists with another configuration")]
    TopicExists(String),
    #[error("topic {topic} is the dead-letter topic of {of}; delete that first")]
    TopicInUse { topic: String, of: String },
    #[error("group {group} does not exist on topic {topic}")]
    GroupNotFound { topic: String, group: String },
    #[error("group {group} exists on topic {topic} with another configuration")]
    GroupExists { topic: String, group: String },
    #[error("{0}")]
    Invalid(String),
}

impl MetaError {
    pub fn reason(&self) -> &'static str {
        match self {
            MetaError::TopicNotFound(_) => "TOPIC_NOT_FOUND",
            MetaError::TopicExists(_) => "TOPIC_EXISTS",
            MetaError::TopicInUse { .. } => "TOPIC_IN_USE",
            MetaError::GroupNotFound { .. } => "GROUP_NOT_FOUND",
            MetaError::GroupExists { .. } => "GROUP_EXISTS",
            MetaError::Invalid(_) => "INVALID_ARGUMENT",
        }
    }
}

/// What the proposer gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    /// The topic as it now is; `created` false if it already existed as asked.
    Topic {
        topic: Box<Topic>,
        created: bool,
    },
    Deleted,
    Group {
        created: bool,
    },
    Error(MetaError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub topics: BTreeMap<String, Topic>,
    pub next_topic_id: u32,
}

impl MetaState {
    pub fn apply(&mut self, cmd: MetaCommand) -> MetaOutcome {
        match self.try_apply(cmd) {
            Ok(o) => o,
            Err(e) => MetaOutcome::Error(e),
        }
    }

    fn try_apply(&mut self, cmd: MetaCommand) -> Result<MetaOutcome, MetaError> {
        match cmd {
            MetaCommand::CreateTopic {
                now_ms,
                name,
                spec,
                placement,
                dlq_placement,
            } => {
                if placement.len() != spec.partitions as usize {
                    return Err(MetaError::Invalid(
                        "placement does not match partitions".into(),
                    ));
                }
                if let Some(t) = self.topics.get(&name) {
                    return if t.spec == spec {
                        Ok(MetaOutcome::Topic {
                            topic: Box::new(t.clone()),
                            created: false,
                        })
                    } else {
                        Err(MetaError::TopicExists(name))
                    };
                }
                if let Some(dlq) = &spec.dead_letter_topic {
                    if dlq == &name {
                        return Err(MetaError::Invalid(
                            "a topic cannot be its own dead-letter topic".into(),
                        ));
                    }
                    if !self.topics.contains_key(dlq) {
                        if dlq_placement.is_empty() {
                            return Err(MetaError::Invalid(
                                "no placement for the dead-letter topic".into(),
                            ));
                        }
                        let dspec = TopicSpec {
                            partitions: dlq_placement.len() as u32,
                            dead_letter_topic: None,
                            ..spec.clone()
                        };
                        self.insert(
                            now_ms,
                            dlq.clone(),
                            dspec,
                            dlq_placement,
                            Some(name.clone()),
                        );
                    }
                }
                let topic = self.insert(now_ms, name, spec, placement, None);
                Ok(MetaOutcome::Topic {
                    topic: Box::new(topic),
                    created: true,
                })
            }
            MetaCommand::DeleteTopic { name } => {
                if !self.topics.contains_key(&name) {
                    return Err(MetaError::TopicNotFound(name));
                }
                if let Some(of) = self
                    .topics
                    .values()
                    .find(|t| t.name != name && t.spec.dead_letter_topic.as_deref() == Some(&name))
                {
                    return Err(MetaError::TopicInUse {
                        topic: name,
                        of: of.name.clone(),
                    });
                }
                self.topics.remove(&name);
                Ok(MetaOutcome::Deleted)
            }
            MetaCommand::CreateGroup {
                now_ms,
                topic,
                group,
                config,
                start,
            } => {
                let t = self
                    .topics
                    .get_mut(&topic)
                    .ok_or(MetaError::TopicNotFound(topic.clone()))?;
                match t.groups.get(&group) {
                    Some(g) if g.config == config => Ok(MetaOutcome::Group { created: false }),
                    Some(_) => Err(MetaError::GroupExists { topic, group }),
                    None => {
                        t.groups.insert(
                            group,
                            GroupSpec {
                                config,
                                start,
                                created_ms: now_ms,
                            },
                        );
                        Ok(MetaOutcome::Group { created: true })
                    }
                }
            }
            MetaCommand::DeleteGroup { topic, group } => {
                let t = self
                    .topics
                    .get_mut(&topic)
                    .ok_or(MetaError::TopicNotFound(topic.clone()))?;
                if t.groups.remove(&group).is_none() {
                    return Err(MetaError::GroupNotFound { topic, group });
                }
                Ok(MetaOutcome::Deleted)
            }
        }
    }

    fn insert(
        &mut self,
        now_ms: u64,
        name: String,
        spec: TopicSpec,
        placement: Vec<Vec<u64>>,
        dead_letter_for: Option<String>,
    ) -> Topic {
        self.next_topic_id += 1;
        let id = self.next_topic_id;
        let topic = Topic {
            id,
            name: name.clone(),
            partitions: placement
                .into_iter()
                .enumerate()
                .map(|(p, replicas)| Placement {
                    group_id: partition_group(id, p as u32),
                    replicas,
                })
                .collect(),
            spec,
            groups: BTreeMap::new(),
            created_ms: now_ms,
            dead_letter_for,
        };
        self.topics.insert(name, topic.clone());
        topic
    }

    /// Every partition group placed on `node`: (group id, topic, partition).
    pub fn placed_on(&self, node: u64) -> Vec<(u64, String, u32)> {
        let mut out = Vec::new();
        for t in self.topics.values() {
            for (p, pl) in t.partitions.iter().enumerate() {
                if pl.replicas.contains(&node) {
                    out.push((pl.group_id, t.name.clone(), p as u32));
                }
            }
        }
        out
    }

    /// The topic and partition a group id belongs to.
    pub fn partition_of(&self, group_id: u64) -> Option<(&Topic, u32)> {
        let id = (group_id >> 16) as u32;
        let p = (group_id & 0xffff) as u32;
        self.topics
            .values()
            .find(|t| t.id == id)
            .filter(|t| (p as usize) < t.partitions.len())
            .map(|t| (t, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(partitions: u32) -> TopicSpec {
        TopicSpec {
            partitions,
            replication_factor: 3,
            max_messages: 0,
            max_bytes: 0,
            max_age_ms: 0,
            max_delivery_attempts: 5,
            dead_letter_topic: Some("orders.dlq".into()),
            dedup_window_ms: 120_000,
            durability: Durability::Sync,
            max_depth: 0,
            max_message_bytes: 1 << 20,
        }
    }

    fn create(s: &mut MetaState, name: &str, sp: TopicSpec) -> MetaOutcome {
        let n = sp.partitions as usize;
        s.apply(MetaCommand::CreateTopic {
            now_ms: 1,
            name: name.into(),
            spec: sp,
            placement: vec![vec![1, 2, 3]; n],
            dlq_placement: vec![vec![2, 3, 1]; n],
        })
    }

    #[test]
    fn topics_get_their_dead_letter_topic_and_distinct_group_ids() {
        let mut s = MetaState::default();
        let MetaOutcome::Topic { topic, created } = create(&mut s, "orders", spec(2)) else {
            panic!()
        };
        assert!(created);
        let dlq = &s.topics["orders.dlq"];
        assert_eq!(dlq.spec.dead_letter_topic, None);
        assert_eq!(dlq.dead_letter_for.as_deref(), Some("orders"));
        assert_ne!(dlq.partitions[0].group_id, topic.partitions[0].group_id);
        assert_eq!(s.placed_on(1).len(), 4);
        assert_eq!(s.partition_of(topic.partitions[1].group_id).unwrap().1, 1);
        // Idempotent with the same spec, refused with another.
        assert!(matches!(
            create(&mut s, "orders", spec(2)),
            MetaOutcome::Topic { created: false, .. }
        ));
        assert!(matches!(
            create(&mut s, "orders", spec(3)),
            MetaOutcome::Error(MetaError::TopicExists(_))
        ));
        // The DLQ cannot go while its topic uses it; ids are never reused.
        let del = |s: &mut MetaState, n: &str| s.apply(MetaCommand::DeleteTopic { name: n.into() });
        assert!(matches!(
            del(&mut s, "orders.dlq"),
            MetaOutcome::Error(MetaError::TopicInUse { .. })
        ));
        assert_eq!(del(&mut s, "orders"), MetaOutcome::Deleted);
        assert_eq!(del(&mut s, "orders.dlq"), MetaOutcome::Deleted);
        create(&mut s, "orders", spec(1));
        assert!(s.topics["orders"].id > topic.id);
    }

    #[test]
    fn groups_are_created_idempotently_and_deleted() {
        let mut s = MetaState::default();
        create(&mut s, "t", spec(1));
        let cg = |config: GroupConfig| MetaCommand::CreateGroup {
            now_ms: 2,
            topic: "t".into(),
            group: "g".into(),
            config,
            start: StartAt::Earliest,
        };
        assert_eq!(
            s.apply(cg(GroupConfig::default())),
            MetaOutcome::Group { created: true }
        );
        assert_eq!(
            s.apply(cg(GroupConfig::default())),
            MetaOutcome::Group { created: false }
        );
        let other = GroupConfig {
            visibility_timeout_ms: 1,
            ..GroupConfig::default()
        };
        assert!(matches!(
            s.apply(cg(other)),
            MetaOutcome::Error(MetaError::GroupExists { .. })
        ));
        let dg = MetaCommand::DeleteGroup {
            topic: "t".into(),
            group: "g".into(),
        };
        assert_eq!(s.apply(dg.clone()), MetaOutcome::Deleted);
        assert!(matches!(
            s.apply(dg),
            MetaOutcome::Error(MetaError::GroupNotFound { .. })
        ));
    }
}
