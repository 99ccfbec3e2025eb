//! One partition of one topic: the queue's pure, deterministic state.
//!
//! Every replica of a partition applies the same [`Command`]s in the same
//! order and must reach the same state. So nothing here reads a clock, draws
//! a random number or does I/O, and nothing whose iteration order differs
//! between processes (a `HashMap`) decides an outcome or the serialized
//! form. Time is the `now_ms` each command carries (the proposing leader's
//! clock), kept monotone here. Payloads are not here either: the caller
//! stores them keyed by offset and deletes them when [`Effects::removed`]
//! says so.
//!
//! # Model
//!
//! Stored messages get consecutive offsets from `next_offset`, which starts
//! at 0 and never goes back (not even after a purge). Each consumer group
//! consumes the partition independently, from its start position on. For a
//! group, a live message at or after that position is in exactly one of
//! these states:
//!
//! - *fresh*: not delivered to the group since its start (or last reset);
//! - *leased*: in flight to one consumer until a deadline (the visibility
//!   timeout), under the `lease_id` of the `Receive` that delivered it;
//! - *waiting*: an attempt failed (nack or expired lease); redeliverable
//!   from a due time (the backoff);
//! - *dead*: attempts exhausted; never delivered to the group again, and
//!   listed by [`PartitionState::pending_dead_letters`] until the leader has
//!   copied it to the dead-letter topic and proposed `DeadLettered` (if
//!   retention drops it first, it just disappears from that list);
//! - *acked* (or dead-lettered and finalized): the group is done with it.
//!
//! A group *owes* a message while it is fresh, leased, waiting or dead.
//!
//! Delivery order. A shared group hands out the highest priority first,
//! then the lowest offset; fresh messages and due redeliveries compete by
//! that one rule. An ordered group ignores priority: it has at most one
//! message in flight, and the next delivery is always its lowest-offset
//! message that is not acked or dead, so order survives nacks and expired
//! leases (a redelivery that is not due yet holds the group back), while a
//! dead message no longer blocks the ones behind it.
//!
//! Removal. Retention (count, bytes, age) drops the oldest messages
//! whatever the groups think of them, like JetStream's limits policy. Apart
//! from that, a message is removed when the last group owing it stops
//! owing it (an ack, a finalized dead letter, a reset past it, the group's
//! deletion while other groups remain). A message that no group ever owed —
//! produced while the partition had no group, or before every group's start
//! — is kept until retention or a purge drops it, so that a group created
//! later at `Earliest` still sees it; deleting the last group likewise keeps
//! everything. Every stored offset is reported in [`Effects::removed`]
//! exactly once, when it stops being live.
//!
//! # Time-driven work
//!
//! Before each command, with the clock advanced, the state expires leases
//! whose deadline has passed (a failed attempt: redelivery after the
//! backoff counted from the deadline, or dead when `max_attempts` is
//! reached), makes redeliveries whose backoff has passed deliverable, drops
//! messages older than `max_age_ms` and rotates the dedup window. Doing it
//! for every command, not only for `Tick`, makes outcomes independent of
//! when the leader happens to tick: a lease is valid until its deadline,
//! exactly. `Tick` is then just "let time pass"; the leader proposes one at
//! [`PartitionState::next_wake_ms`]. This happens even when the command
//! itself then fails: an error outcome means the command changed nothing,
//! but time still passed.
//!
//! # Receipts
//!
//! A receipt is (offset, lease id). `Ack` accepts it while the message is
//! leased under that lease, and also after that lease expired as long as
//! the message has not been handed to anyone since (it is waiting for its
//! redelivery): the work is done, and refusing would only cause a
//! duplicate. Once redelivered (another lease) or dead, the receipt is
//! `RECEIPT_EXPIRED`; once acked, or for a message never delivered to the
//! group or removed, it is `RECEIPT_NOT_FOUND`. `Nack` and `ExtendLease`
//! are stricter: they need the lease itself, not expired (an expired lease
//! has already been counted as a failed attempt and rescheduled).
//!
//! # Data structures and costs
//!
//! Messages live in a `Store`: fixed chunks of 256 offset-indexed slots in
//! a `BTreeMap` (a dense `MessageMeta` array), and one `BTreeSet` of live
//! offsets per priority ("lanes"). Measured: ~123 bytes per queued message
//! without id, key or headers (a `BTreeMap<u64, MessageMeta>` filled in
//! offset order alone costs ~220); an id adds its length twice (the message
//! and the dedup index) plus ~70 bytes of index. A group keeps, per lane,
//! a cursor: every live message of that priority below the cursor has been
//! delivered to the group (or lies before its start), everything at or
//! above it is fresh. Delivered but unfinished messages are the group's
//! `entries`, with indexes by lease deadline, due time, (priority, offset)
//! for due redeliveries, and dead ones. So finding the next message is a few ordered-set lookups, and
//! receive, ack, nack and expiry are O(log n) per message whatever the
//! backlog. Whether anyone still owes a message is asked of each group
//! (O(groups · log n)), not counted per message, so no counter can drift.
//! Creating, resetting or deleting a group, `StartAt::Time` and purge are
//! O(n): rare administrative commands.
//!
//! Snapshots serialize only the source of truth (messages, groups' cursors
//! and entries, dedup ids); the indexes are rebuilt on deserialization,
//! and [`PartitionState::check_invariants`] checks that the incrementally
//! maintained indexes equal freshly rebuilt ones.
//!
//! # Snapshot captures
//!
//! Serializing the state is O(backlog), too slow for the thread that
//! applies commands. [`PartitionState::capture`] takes instead, in
//! O(chunks + groups' entries + dedup shards), a [`PartitionCapture`]: an
//! owned, immutable copy that serializes to exactly the bytes of the state
//! at that point, and can be serialized on another thread while the state
//! goes on. The store's chunks and the dedup generations' shards are shared
//! with the capture through `Arc`s and copied on write: the first mutation
//! of a shared chunk (or shard) after a capture copies that one chunk (or
//! shard), once; a capture that has been dropped costs nothing. Groups'
//! cursors and entries (proportional to the messages in flight, waiting
//! or dead) are simply cloned; their indexes are not part of the
//! serialized form and are not captured.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The highest priority; priorities are `0..=MAX_PRIORITY`.
pub const MAX_PRIORITY: u8 = 9;
/// The last error recorded when a lease runs out.
pub const EXPIRED_ERROR: &str = "visibility timeout expired";
/// The last error recorded by a nack that gave none.
pub const NACKED_ERROR: &str = "nacked";

const LANES: usize = MAX_PRIORITY as usize + 1;
const CHUNK_BITS: u32 = 8;
const CHUNK: usize = 1 << CHUNK_BITS;

/// Limits of one partition. 0 means unlimited for every field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionConfig {
    /// Retention: live messages beyond this drop the oldest.
    pub max_messages: u64,
    /// Retention: payload bytes beyond this drop the oldest.
    pub max_bytes: u64,
    /// Retention: messages at least this old are dropped.
    pub max_age_ms: u64,
    /// Back-pressure: a produce that would make the live count exceed this
    /// is rejected whole.
    pub max_depth: u64,
    /// A larger payload is rejected (so is one larger than `max_bytes`,
    /// which retention would drop at once).
    pub max_message_bytes: u64,
    /// A message id seen within this window is not stored again.
    pub dedup_window_ms: u64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            max_messages: 0,
            max_bytes: 0,
            max_age_ms: 0,
            max_depth: 0,
            max_message_bytes: 1 << 20,
            dedup_window_ms: 120_000,
        }
    }
}

impl PartitionConfig {
    /// The largest payload accepted, if any limit applies.
    fn message_limit(&self) -> Option<u64> {
        [self.max_message_bytes, self.max_bytes]
            .into_iter()
            .filter(|&l| l > 0)
            .min()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupMode {
    /// Many messages in flight; highest priority first, then offset order.
    Shared,
    /// One message in flight, strictly in offset order; priority ignored.
    Ordered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub mode: GroupMode,
    /// How long a delivery is leased to its consumer (at least 1).
    pub visibility_timeout_ms: u64,
    /// Deliveries before a message is dead-lettered; 0 = never (a poison
    /// message then retries forever, and blocks an ordered group).
    pub max_attempts: u32,
    /// Redelivery delay after attempt n: `min(cap, base · 2^(n-1))` plus
    /// jitter; see [`GroupConfig::backoff_ms`].
    pub backoff_base_ms: u64,
    /// At least `backoff_base_ms`.
    pub backoff_cap_ms: u64,
    /// Jitter, up to this percentage of the delay (0..=100).
    pub backoff_jitter_pct: u32,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            mode: GroupMode::Shared,
            visibility_timeout_ms: 30_000,
            max_attempts: 5,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 60_000,
            backoff_jitter_pct: 20,
        }
    }
}

impl GroupConfig {
    fn validate(&self) -> Result<(), QueueError> {
        if self.visibility_timeout_ms == 0 {
            return Err(invalid("visibility_timeout_ms", "must be at least 1"));
        }
        if self.backoff_jitter_pct > 100 {
            return Err(invalid("backoff_jitter_pct", "must be at most 100"));
        }
        if self.backoff_cap_ms < self.backoff_base_ms {
            return Err(invalid(
                "backoff_cap_ms",
                "must be at least backoff_base_ms",
            ));
        }
        Ok(())
    }

    /// Whether a message delivered `attempts` times may not be retried.
    fn exhausted(&self, attempts: u32) -> bool {
        self.max_attempts > 0 && attempts >= self.max_attempts
    }

    /// The redelivery delay after failed attempt `attempt` (1-based) of the
    /// message at `offset` in `group`: `min(cap, base · 2^(attempt-1))`
    /// plus a jitter of up to `backoff_jitter_pct` percent of that. The
    /// jitter is a hash of (group, offset, attempt), not a random draw, so
    /// every replica computes the same schedule, while retries of different
    /// messages (or groups) still spread out.
    pub fn backoff_ms(&self, group: &str, offset: u64, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1);
        let base = self.backoff_base_ms;
        let doubled = if base == 0 {
            0
        } else if exp > base.leading_zeros() {
            u64::MAX
        } else {
            base << exp
        };
        let delay = doubled.min(self.backoff_cap_ms);
        let pct = u128::from(self.backoff_jitter_pct.min(100));
        // At most `delay`, so it fits in a u64.
        let spread = (u128::from(delay) * pct / 100) as u64;
        if spread == 0 {
            return delay;
        }
        let h = mix(mix(fnv1a(group.as_bytes()) ^ offset) ^ u64::from(attempt));
        delay.saturating_add(h % spread.saturating_add(1))
    }
}

/// Where a new (or reset) group starts consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartAt {
    /// The oldest live message.
    Earliest,
    /// The next message produced.
    Latest,
    /// This offset (which may still be in the future).
    Offset(u64),
    /// The first live message enqueued at or after this time (ms).
    Time(u64),
}

/// A message to produce. The payload stays with the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Deduplication id (non-empty when set).
    pub id: Option<String>,
    pub key: Option<Vec<u8>>,
    /// 0..=9, 9 highest.
    pub priority: u8,
    pub headers: Vec<(String, String)>,
    /// Payload bytes, for byte limits and accounting.
    pub size: u64,
}

/// What the state keeps per live message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    pub offset: u64,
    pub priority: u8,
    pub size: u64,
    pub enqueued_ms: u64,
    pub id: Option<String>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Produced {
    pub offset: u64,
    /// The id was seen within the dedup window: nothing was stored and
    /// `offset` is the original message's.
    pub duplicate: bool,
}

/// Proof of one delivery: the offset and the lease it was delivered under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Receipt {
    pub offset: u64,
    pub lease_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub offset: u64,
    pub receipt: Receipt,
    /// 1 for the first delivery to this group.
    pub attempt: u32,
    pub meta: MessageMeta,
}

/// A message that exhausted its attempts in a group, waiting to be copied
/// to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub group: String,
    pub offset: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub meta: MessageMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    /// Messages the group has not finished: fresh, leased or waiting.
    pub pending: u64,
    pub in_flight: u64,
    /// Dead messages not yet copied to the dead-letter topic.
    pub dead_pending: u64,
    /// Same as `pending`.
    pub lag: u64,
    /// Consumers holding leases, sorted.
    pub consumers: Vec<String>,
}

/// A replicated command. `now_ms` is the proposing leader's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// → `Produced`.
    Produce {
        now_ms: u64,
        messages: Vec<NewMessage>,
    },
    /// → `GroupCreated`. Idempotent; an existing group takes the new config
    /// and keeps its progress (`start` is then ignored).
    CreateGroup {
        now_ms: u64,
        group: String,
        config: GroupConfig,
        start: StartAt,
    },
    /// → `GroupDeleted`.
    DeleteGroup { now_ms: u64, group: String },
    /// → `Received`. `lease_id` must be unique per `Receive` (the Raft log
    /// index of the command).
    Receive {
        now_ms: u64,
        group: String,
        consumer: String,
        max: u32,
        lease_id: u64,
    },
    /// → `Acked`, one result per receipt.
    Ack {
        now_ms: u64,
        group: String,
        receipts: Vec<Receipt>,
    },
    /// → `Nacked`, one result per receipt.
    Nack {
        now_ms: u64,
        group: String,
        receipts: Vec<Receipt>,
        delay_ms: Option<u64>,
        error: Option<String>,
    },
    /// → `Extended`, one result per receipt. The lease then ends at
    /// `now + visibility_ms`; 0 ends it at once, as an expiry.
    ExtendLease {
        now_ms: u64,
        group: String,
        receipts: Vec<Receipt>,
        visibility_ms: u64,
    },
    /// → `Ticked`.
    Tick { now_ms: u64 },
    /// → `DeadLettersFinalized`. Offsets not dead in the group are skipped.
    DeadLettered {
        now_ms: u64,
        group: String,
        offsets: Vec<u64>,
    },
    /// → `Reset`.
    Reset {
        now_ms: u64,
        group: String,
        to: StartAt,
    },
    /// → `Purged`.
    Purge { now_ms: u64 },
}

impl Command {
    pub fn now_ms(&self) -> u64 {
        match self {
            Command::Produce { now_ms, .. }
            | Command::CreateGroup { now_ms, .. }
            | Command::DeleteGroup { now_ms, .. }
            | Command::Receive { now_ms, .. }
            | Command::Ack { now_ms, .. }
            | Command::Nack { now_ms, .. }
            | Command::ExtendLease { now_ms, .. }
            | Command::Tick { now_ms }
            | Command::DeadLettered { now_ms, .. }
            | Command::Reset { now_ms, .. }
            | Command::Purge { now_ms } => *now_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Produced(Vec<Produced>),
    /// `created` is false when the group existed (its config is updated).
    GroupCreated {
        created: bool,
    },
    GroupDeleted {
        existed: bool,
    },
    Received(Vec<Delivery>),
    Acked(Vec<Result<(), QueueError>>),
    Nacked(Vec<Result<(), QueueError>>),
    Extended(Vec<Result<(), QueueError>>),
    Ticked,
    DeadLettersFinalized {
        count: u64,
    },
    /// The offset the group now consumes from.
    Reset {
        start: u64,
    },
    Purged {
        count: u64,
    },
    /// The command changed nothing (time still advanced).
    Error(QueueError),
}

/// Side effects of one command, besides its outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Offsets that stopped being live, whose payloads the caller may now
    /// delete. Each stored offset appears here exactly once, ever.
    pub removed: Vec<u64>,
}

/// Why a command (or one receipt of it) failed. [`QueueError::reason`] is
/// the machine-readable reason a client acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum QueueError {
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    MessageTooLarge { size: u64, limit: u64 },
    #[error(
        "the batch would make the partition {depth} messages deep, above the limit of {limit}"
    )]
    DepthExceeded { depth: u64, limit: u64 },
    #[error("group {group:?} not found")]
    GroupNotFound { group: String },
    #[error("no delivery of offset {offset} is pending for this group (acked, never delivered or removed)")]
    ReceiptNotFound { offset: u64 },
    #[error("the lease on offset {offset} is over (redelivered, expired or dead-lettered)")]
    ReceiptExpired { offset: u64 },
}

impl QueueError {
    pub fn reason(&self) -> &'static str {
        match self {
            QueueError::InvalidArgument { .. } => "INVALID_ARGUMENT",
            QueueError::MessageTooLarge { .. } => "MESSAGE_TOO_LARGE",
            QueueError::DepthExceeded { .. } => "DEPTH_EXCEEDED",
            QueueError::GroupNotFound { .. } => "GROUP_NOT_FOUND",
            QueueError::ReceiptNotFound { .. } => "RECEIPT_NOT_FOUND",
            QueueError::ReceiptExpired { .. } => "RECEIPT_EXPIRED",
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> QueueError {
    QueueError::InvalidArgument {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn group_not_found(group: &str) -> QueueError {
    QueueError::GroupNotFound {
        group: group.to_owned(),
    }
}

/// splitmix64's finalizer: a good 64-bit mix, fixed forever (unlike std's
/// hashers, whose algorithm may change between Rust releases and so between
/// replicas built at different times).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// Sort rank of a priority: lower ranks are delivered first.
fn rank(priority: u8) -> u8 {
    MAX_PRIORITY - priority
}

// ---------------------------------------------------------------------------
// Message store
// ---------------------------------------------------------------------------

/// The live messages, by offset and by priority.
///
/// Offsets are dense (consecutive as produced), so messages sit in
/// fixed-size chunks of offset-indexed slots: O(log n) to find a chunk,
/// O(1) within it, no per-message map node, and no reallocation (a chunk
/// is allocated at its final size). A chunk is freed when its last message
/// goes, so holes left by out-of-order acks cost at most one chunk per
/// straggler. Serialized as the sequence of live messages; the chunks and
/// lanes are rebuilt from it.
///
/// Chunks are behind `Arc`s so that a snapshot capture ([`StoreCapture`])
/// can share them in O(chunks) instead of copying every message; every
/// mutation goes through `Arc::make_mut`, which copies a chunk only while a
/// capture still holds it (once per chunk and capture). Cloning a `Store`
/// shares chunks the same way.
#[derive(Debug, Clone, Default)]
struct Store {
    chunks: BTreeMap<u64, Arc<Chunk>>,
    /// Live offsets per priority.
    lanes: [BTreeSet<u64>; LANES],
    len: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Chunk {
    slots: Vec<Option<MessageMeta>>,
    live: u32,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            slots: Vec::with_capacity(CHUNK),
            live: 0,
        }
    }
}

/// A copy (copy-on-write, see [`Store`]) is allocated at the full chunk
/// size like a new chunk: the copied chunk is typically the tail one that
/// produces keep filling, which then never reallocates.
impl Clone for Chunk {
    fn clone(&self) -> Self {
        let mut slots = Vec::with_capacity(CHUNK.max(self.slots.len()));
        slots.extend(self.slots.iter().cloned());
        Chunk {
            slots,
            live: self.live,
        }
    }
}

fn chunk_of(offset: u64) -> (u64, usize) {
    (offset >> CHUNK_BITS, (offset & (CHUNK as u64 - 1)) as usize)
}

impl Store {
    /// Stores a message; false (and nothing changes) if its offset is live.
    fn insert(&mut self, meta: MessageMeta) -> bool {
        let (key, slot) = chunk_of(meta.offset);
        // Copies the chunk if a capture shares it. (An insert that fails
        // only happens while deserializing, where nothing is shared.)
        let chunk = Arc::make_mut(
            self.chunks
                .entry(key)
                .or_insert_with(|| Arc::new(Chunk::new())),
        );
        if slot >= chunk.slots.len() {
            chunk.slots.resize_with(slot + 1, || None);
        }
        if chunk.slots[slot].is_some() {
            return false;
        }
        self.lanes[usize::from(meta.priority)].insert(meta.offset);
        self.len += 1;
        self.bytes += meta.size;
        chunk.live += 1;
        chunk.slots[slot] = Some(meta);
        true
    }

    fn remove(&mut self, offset: u64) -> Option<MessageMeta> {
        let (key, slot) = chunk_of(offset);
        let shared = self.chunks.get(&key)?;
        // Look before `make_mut`: a miss must not copy a shared chunk.
        shared.slots.get(slot)?.as_ref()?;
        let meta = if shared.live == 1 {
            // The chunk's last message: drop the chunk whole. If a capture
            // still holds it, copy just this message, not the chunk.
            match Arc::try_unwrap(self.chunks.remove(&key).expect("found above")) {
                Ok(mut chunk) => chunk.slots[slot].take(),
                Err(shared) => shared.slots[slot].clone(),
            }
        } else {
            let chunk = Arc::make_mut(self.chunks.get_mut(&key).expect("found above"));
            chunk.live -= 1;
            chunk.slots[slot].take()
        }
        .expect("checked above");
        self.lanes[usize::from(meta.priority)].remove(&offset);
        self.len -= 1;
        self.bytes -= meta.size;
        Some(meta)
    }

    fn get(&self, offset: u64) -> Option<&MessageMeta> {
        let (key, slot) = chunk_of(offset);
        self.chunks.get(&key)?.slots.get(slot)?.as_ref()
    }

    /// The oldest live message.
    fn first(&self) -> Option<&MessageMeta> {
        let offset = self.lanes.iter().filter_map(|l| l.first()).min()?;
        self.get(*offset)
    }

    /// The lowest live offset of `priority` at or after `from`.
    fn first_in_lane(&self, priority: usize, from: u64) -> Option<u64> {
        self.lanes[priority].range(from..).next().copied()
    }

    /// Live messages of `priority` at or after `from` (O(their number)).
    fn count_in_lane(&self, priority: usize, from: u64) -> u64 {
        self.lanes[priority].range(from..).count() as u64
    }

    fn iter(&self) -> impl Iterator<Item = &MessageMeta> + '_ {
        self.chunks.values().flat_map(|c| c.slots.iter().flatten())
    }

    /// Removes everything; returns the offsets that were live, ascending.
    fn clear(&mut self) -> Vec<u64> {
        let offsets = self.iter().map(|m| m.offset).collect();
        *self = Store::default();
        offsets
    }
}

/// Equal when the same messages are live (slot layout is an accident of
/// history: a restored store has no trailing holes).
impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.bytes == other.bytes && self.iter().eq(other.iter())
    }
}

impl Eq for Store {}

impl Serialize for Store {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_messages(serializer, self.len, self.chunks.values().map(|c| &**c))
    }
}

/// The serialized form of a [`Store`] (and of a [`StoreCapture`], which
/// must match it byte for byte): the live messages in offset order.
fn serialize_messages<'a, S: Serializer>(
    serializer: S,
    len: u64,
    chunks: impl Iterator<Item = &'a Chunk>,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    // The length up front: formats like postcard need it.
    let mut seq = serializer.serialize_seq(Some(len as usize))?;
    for meta in chunks.flat_map(|c| c.slots.iter().flatten()) {
        seq.serialize_element(meta)?;
    }
    seq.end()
}

/// A [`Store`]'s messages as of a capture: its chunks, shared (not the
/// lanes, which are not serialized). O(chunks) to take.
#[derive(Debug)]
struct StoreCapture {
    len: u64,
    chunks: Vec<Arc<Chunk>>,
}

impl Store {
    fn capture(&self) -> StoreCapture {
        StoreCapture {
            len: self.len,
            chunks: self.chunks.values().cloned().collect(),
        }
    }
}

impl Serialize for StoreCapture {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_messages(serializer, self.len, self.chunks.iter().map(|c| &**c))
    }
}

impl<'de> Deserialize<'de> for Store {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut store = Store::default();
        for meta in Vec::<MessageMeta>::deserialize(deserializer)? {
            if meta.priority > MAX_PRIORITY {
                return Err(D::Error::custom(format!(
                    "message {} has priority {}",
                    meta.offset, meta.priority
                )));
            }
            let offset = meta.offset;
            if !store.insert(meta) {
                return Err(D::Error::custom(format!("offset {offset} appears twice")));
            }
        }
        Ok(store)
    }
}

// ---------------------------------------------------------------------------
// Deduplication
// ---------------------------------------------------------------------------

/// Message ids seen recently, in two generations of one window each: ids
/// first seen since `current_since_ms` are in `current`, the window before
/// in `previous`. When a window has passed, `previous` (all older than the
/// window by then) is dropped whole and `current` takes its place. Each id
/// is stored once, and pruning costs nothing per id; the price is keeping
/// up to two windows of ids.
///
/// Cloning it (for a snapshot capture) is O(shards): see [`Generation`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Dedup {
    current: Generation,
    previous: Generation,
    current_since_ms: u64,
}

/// Shards per dedup generation.
const DEDUP_SHARDS: usize = 64;

/// One dedup generation: a map from id to [`Seen`], split by a hash of the
/// id into `Arc`-shared, copy-on-write shards, and serialized exactly as
/// the single `BTreeMap<String, Seen>` it stands for.
///
/// Why shards: a snapshot capture shares the generations rather than
/// copying up to two windows of ids, so the next recorded id has to copy
/// whatever part of `current` it writes to (`Arc::make_mut`). With one map
/// that would be the whole window, on the thread applying commands: the
/// very stall captures avoid. With shards each write after a capture
/// copies 1/`DEDUP_SHARDS` of the generation, each shard at most once per
/// capture; `previous` is never written, so never copied. (Measured with
/// 1M ids: ~3 ms per shard copy, against ~0.1 s to copy one map.) The
/// shard is a fixed hash of the id, but it only decides the layout, never
/// an outcome or the serialized form, which merges the shards back in key
/// order ([`Merged`]): snapshots stay byte for byte what they were.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Generation {
    shards: [Arc<BTreeMap<String, Seen>>; DEDUP_SHARDS],
}

impl Default for Generation {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Arc::default()),
        }
    }
}

impl Generation {
    fn shard(id: &str) -> usize {
        (mix(fnv1a(id.as_bytes())) % DEDUP_SHARDS as u64) as usize
    }

    fn get(&self, id: &str) -> Option<&Seen> {
        self.shards[Self::shard(id)].get(id)
    }

    fn insert(&mut self, id: String, seen: Seen) {
        Arc::make_mut(&mut self.shards[Self::shard(&id)]).insert(id, seen);
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    fn values(&self) -> impl Iterator<Item = &Seen> + '_ {
        self.shards.iter().flat_map(|s| s.values())
    }
}

impl Serialize for Generation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Exactly as `BTreeMap<String, Seen>` serializes: `collect_map`
        // over every entry in key order, with an exact length.
        serializer.collect_map(Merged::new(self))
    }
}

/// A [`Generation`]'s entries in key order: a k-way merge of its shards,
/// each already sorted (an id is in exactly one shard, so no ties). The
/// price of sharding is paid here, by the serializer: for 1M ids ~0.3 s
/// against ~0.08 s for one map (sorting the union instead: ~0.55 s).
struct Merged<'a> {
    /// The next entry of each shard not yet exhausted, least id on top.
    heads: std::collections::BinaryHeap<std::cmp::Reverse<Head<'a>>>,
    left: usize,
}

struct Head<'a> {
    id: &'a String,
    seen: &'a Seen,
    rest: std::collections::btree_map::Iter<'a, String, Seen>,
}

/// Ordered by id alone.
impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Head<'_> {}

impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Head<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.id.cmp(other.id)
    }
}

impl<'a> Merged<'a> {
    fn new(generation: &'a Generation) -> Self {
        let heads = generation
            .shards
            .iter()
            .filter_map(|shard| {
                let mut rest = shard.iter();
                let (id, seen) = rest.next()?;
                Some(std::cmp::Reverse(Head { id, seen, rest }))
            })
            .collect();
        Merged {
            heads,
            left: generation.len(),
        }
    }
}

impl<'a> Iterator for Merged<'a> {
    type Item = (&'a String, &'a Seen);

    fn next(&mut self) -> Option<Self::Item> {
        let mut top = self.heads.peek_mut()?;
        let head = &mut top.0;
        let item = (head.id, head.seen);
        match head.rest.next() {
            // Replaced in place: one sift-down when `top` drops.
            Some((id, seen)) => (head.id, head.seen) = (id, seen),
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        self.left -= 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Merged<'_> {}

impl<'de> Deserialize<'de> for Generation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut generation = Generation::default();
        for (id, seen) in BTreeMap::<String, Seen>::deserialize(deserializer)? {
            generation.insert(id, seen);
        }
        Ok(generation)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    offset: u64,
    at_ms: u64,
}

impl Dedup {
    /// The offset stored for `id` less than `window_ms` ago.
    fn lookup(&self, id: &str, now_ms: u64, window_ms: u64) -> Option<u64> {
        self.current
            .get(id)
            .or_else(|| self.previous.get(id))
            .filter(|s| now_ms.saturating_sub(s.at_ms) < window_ms)
            .map(|s| s.offset)
    }

    fn record(&mut self, id: String, offset: u64, now_ms: u64) {
        self.current.insert(
            id,
            Seen {
                offset,
                at_ms: now_ms,
            },
        );
    }

    fn rotate(&mut self, now_ms: u64, window_ms: u64) {
        // With no window nothing is recorded, so there is nothing to drop.
        if window_ms == 0 || now_ms < self.current_since_ms.saturating_add(window_ms) {
            return;
        }
        if now_ms
            >= self
                .current_since_ms
                .saturating_add(window_ms.saturating_mul(2))
        {
            self.current = Generation::default();
            self.previous = Generation::default();
        } else {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current_since_ms = now_ms;
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

// ---------------------------------------------------------------------------
// Consumer groups
// ---------------------------------------------------------------------------

/// A message delivered to a group and not finished yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    priority: u8,
    /// Deliveries so far.
    attempts: u32,
    /// The lease of the latest delivery.
    lease_id: u64,
    last_error: Option<String>,
    state: EntryState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum EntryState {
    Leased { consumer: String, deadline_ms: u64 },
    Waiting { due_ms: u64 },
    Dead,
}

/// Indexes over a group's entries, rebuilt from them after a restore.
/// Invariant (after every command): `delayed` holds the waiting entries
/// due after now, `ready` those due at or before now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct GroupIndex {
    /// (deadline, offset) of leased entries.
    leases: BTreeSet<(u64, u64)>,
    /// (due, offset) of waiting entries not due yet.
    delayed: BTreeSet<(u64, u64)>,
    /// (rank, offset) of waiting entries that are due.
    ready: BTreeSet<(u8, u64)>,
    /// Offsets of all waiting entries (ordered groups go by offset).
    waiting: BTreeSet<u64>,
    dead: BTreeSet<u64>,
    /// Live fresh messages (at or above their lane's cursor).
    fresh: u64,
}

/// Serialized without its index. [`GroupCapture`] mirrors the serialized
/// fields: keep the two in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Group {
    config: GroupConfig,
    /// Per priority: every live message of that priority below the cursor
    /// was delivered to the group since its start or lies before it; every
    /// one at or above it is fresh. Only ever moves forward, except by a
    /// reset.
    cursor: [u64; LANES],
    entries: BTreeMap<u64, Entry>,
    #[serde(skip)]
    idx: GroupIndex,
}

/// What a [`Group`] serializes, owned: the same fields, names and order
/// (and the same struct name, for formats that write it), so it
/// serializes to the same bytes. O(entries) to take: only delivered,
/// unfinished messages, not the backlog.
#[derive(Debug, Serialize)]
#[serde(rename = "Group")]
struct GroupCapture {
    config: GroupConfig,
    cursor: [u64; LANES],
    entries: BTreeMap<u64, Entry>,
}

/// The next message a group should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    Fresh { priority: usize, offset: u64 },
    Retry { offset: u64 },
}

impl Group {
    fn new(config: GroupConfig, start: u64, store: &Store) -> Self {
        let mut group = Group {
            config,
            cursor: [start; LANES],
            entries: BTreeMap::new(),
            idx: GroupIndex::default(),
        };
        group.idx.fresh = group.count_fresh(store);
        group
    }

    fn count_fresh(&self, store: &Store) -> u64 {
        (0..LANES)
            .map(|p| store.count_in_lane(p, self.cursor[p]))
            .sum()
    }

    fn is_fresh(&self, offset: u64, priority: u8) -> bool {
        offset >= self.cursor[usize::from(priority)]
    }

    fn owes(&self, offset: u64, priority: u8) -> bool {
        self.is_fresh(offset, priority) || self.entries.contains_key(&offset)
    }

    fn index(&mut self, offset: u64, entry: &Entry, now_ms: u64) {
        match entry.state {
            EntryState::Leased { deadline_ms, .. } => {
                self.idx.leases.insert((deadline_ms, offset));
            }
            EntryState::Waiting { due_ms } => {
                self.idx.waiting.insert(offset);
                if due_ms <= now_ms {
                    self.idx.ready.insert((rank(entry.priority), offset));
                } else {
                    self.idx.delayed.insert((due_ms, offset));
                }
            }
            EntryState::Dead => {
                self.idx.dead.insert(offset);
            }
        }
    }

    fn unindex(&mut self, offset: u64, entry: &Entry) {
        match entry.state {
            EntryState::Leased { deadline_ms, .. } => {
                self.idx.leases.remove(&(deadline_ms, offset));
            }
            EntryState::Waiting { due_ms } => {
                self.idx.waiting.remove(&offset);
                self.idx.ready.remove(&(rank(entry.priority), offset));
                self.idx.delayed.remove(&(due_ms, offset));
            }
            EntryState::Dead => {
                self.idx.dead.remove(&offset);
            }
        }
    }

    fn put(&mut self, offset: u64, entry: Entry, now_ms: u64) {
        self.index(offset, &entry, now_ms);
        self.entries.insert(offset, entry);
    }

    fn take(&mut self, offset: u64) -> Option<Entry> {
        let entry = self.entries.remove(&offset)?;
        self.unindex(offset, &entry);
        Some(entry)
    }

    fn rebuild_index(&mut self, store: &Store, now_ms: u64) {
        self.idx = GroupIndex::default();
        let entries = std::mem::take(&mut self.entries);
        for (&offset, entry) in &entries {
            self.index(offset, entry, now_ms);
        }
        self.entries = entries;
        self.idx.fresh = self.count_fresh(store);
    }

    /// Moves redeliveries whose backoff has passed to `ready`.
    fn promote(&mut self, now_ms: u64) {
        while let Some(&(due, offset)) = self.idx.delayed.first() {
            if due > now_ms {
                break;
            }
            self.idx.delayed.pop_first();
            let priority = self.entries[&offset].priority;
            self.idx.ready.insert((rank(priority), offset));
        }
    }

    /// Expires leases with deadline ≤ now: each is a failed attempt.
    fn expire(&mut self, name: &str, now_ms: u64) {
        while let Some(&(deadline, offset)) = self.idx.leases.first() {
            if deadline > now_ms {
                break;
            }
            let mut entry = self.take(offset).expect("a lease has an entry");
            entry.last_error = Some(EXPIRED_ERROR.to_owned());
            entry.state = if self.config.exhausted(entry.attempts) {
                EntryState::Dead
            } else {
                // Counted from the deadline, so a late tick delays nothing.
                let backoff = self.config.backoff_ms(name, offset, entry.attempts);
                EntryState::Waiting {
                    due_ms: deadline.saturating_add(backoff),
                }
            };
            self.put(offset, entry, now_ms);
        }
    }

    /// The lowest fresh offset over all lanes, with its priority.
    fn first_fresh_by_offset(&self, store: &Store) -> Option<(u64, usize)> {
        (0..LANES)
            .filter_map(|p| store.first_in_lane(p, self.cursor[p]).map(|o| (o, p)))
            .min()
    }

    /// The fresh message with the highest priority, then lowest offset.
    fn first_fresh_by_priority(&self, store: &Store) -> Option<(usize, u64)> {
        (0..LANES)
            .rev()
            .find_map(|p| store.first_in_lane(p, self.cursor[p]).map(|o| (p, o)))
    }

    fn next_deliverable(&self, store: &Store, now_ms: u64) -> Option<Pick> {
        match self.config.mode {
            GroupMode::Shared => {
                let retry = self.idx.ready.first().copied();
                let fresh = self.first_fresh_by_priority(store);
                match (retry, fresh) {
                    (None, None) => None,
                    (Some((_, offset)), None) => Some(Pick::Retry { offset }),
                    (None, Some((priority, offset))) => Some(Pick::Fresh { priority, offset }),
                    (Some((r, retry_offset)), Some((priority, offset))) => {
                        if (r, retry_offset) < (rank(priority as u8), offset) {
                            Some(Pick::Retry {
                                offset: retry_offset,
                            })
                        } else {
                            Some(Pick::Fresh { priority, offset })
                        }
                    }
                }
            }
            GroupMode::Ordered => {
                if !self.idx.leases.is_empty() {
                    return None;
                }
                let head = self.idx.waiting.first().copied();
                let fresh = self.first_fresh_by_offset(store);
                let retry_first = match (head, fresh) {
                    (Some(head), Some((offset, _))) => head < offset,
                    (head, _) => head.is_some(),
                };
                if retry_first {
                    // The oldest unfinished message goes first, even if that
                    // means waiting for its backoff.
                    let head = head.expect("retry_first");
                    match self.entries[&head].state {
                        EntryState::Waiting { due_ms } if due_ms <= now_ms => {
                            Some(Pick::Retry { offset: head })
                        }
                        _ => None,
                    }
                } else {
                    fresh.map(|(offset, priority)| Pick::Fresh { priority, offset })
                }
            }
        }
    }

    fn deliver(
        &mut self,
        pick: Pick,
        store: &Store,
        now_ms: u64,
        consumer: &str,
        lease_id: u64,
    ) -> Delivery {
        let lease = EntryState::Leased {
            consumer: consumer.to_owned(),
            deadline_ms: now_ms.saturating_add(self.config.visibility_timeout_ms),
        };
        let (offset, entry) = match pick {
            Pick::Fresh { priority, offset } => {
                self.cursor[priority] = offset + 1;
                self.idx.fresh -= 1;
                let entry = Entry {
                    priority: priority as u8,
                    attempts: 1,
                    lease_id,
                    last_error: None,
                    state: lease,
                };
                (offset, entry)
            }
            Pick::Retry { offset } => {
                let retry = self.take(offset).expect("a retry has an entry");
                let entry = Entry {
                    attempts: retry.attempts + 1,
                    lease_id,
                    state: lease,
                    ..retry
                };
                (offset, entry)
            }
        };
        let attempt = entry.attempts;
        self.put(offset, entry, now_ms);
        Delivery {
            offset,
            receipt: Receipt { offset, lease_id },
            attempt,
            meta: store
                .get(offset)
                .expect("a deliverable message is live")
                .clone(),
        }
    }

    /// The entry a receipt names, if that delivery is its latest one.
    fn entry_for(&self, receipt: Receipt) -> Result<&Entry, QueueError> {
        match self.entries.get(&receipt.offset) {
            None => Err(QueueError::ReceiptNotFound {
                offset: receipt.offset,
            }),
            Some(entry) if entry.lease_id != receipt.lease_id => Err(QueueError::ReceiptExpired {
                offset: receipt.offset,
            }),
            Some(entry) => Ok(entry),
        }
    }

    /// Checks a receipt holds a lease that is still running.
    fn check_lease(&self, receipt: Receipt) -> Result<(), QueueError> {
        match self.entry_for(receipt)?.state {
            EntryState::Leased { .. } => Ok(()),
            _ => Err(QueueError::ReceiptExpired {
                offset: receipt.offset,
            }),
        }
    }

    fn stats(&self) -> GroupStats {
        let unfinished = (self.entries.len() - self.idx.dead.len()) as u64;
        let pending = self.idx.fresh + unfinished;
        let consumers: BTreeSet<&str> = self
            .entries
            .values()
            .filter_map(|e| match &e.state {
                EntryState::Leased { consumer, .. } => Some(consumer.as_str()),
                _ => None,
            })
            .collect();
        GroupStats {
            pending,
            in_flight: self.idx.leases.len() as u64,
            dead_pending: self.idx.dead.len() as u64,
            lag: pending,
            consumers: consumers.into_iter().map(str::to_owned).collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// The partition
// ---------------------------------------------------------------------------

/// One partition's replicated state. See the module documentation.
///
/// Serializes (for snapshots) without its indexes, which deserialization
/// rebuilds: `restore(snapshot(s)) == s`. [`PartitionCapture`] mirrors the
/// serialized fields: keep the two in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Snapshot")]
pub struct PartitionState {
    config: PartitionConfig,
    now_ms: u64,
    next_offset: u64,
    messages: Store,
    groups: BTreeMap<String, Group>,
    dedup: Dedup,
}

/// The serialized form of [`PartitionState`]: the same fields, with the
/// group indexes still to be rebuilt.
#[derive(Deserialize)]
struct Snapshot {
    config: PartitionConfig,
    now_ms: u64,
    next_offset: u64,
    messages: Store,
    groups: BTreeMap<String, Group>,
    dedup: Dedup,
}

/// A [`PartitionState`] as of [`PartitionState::capture`], for a snapshot:
/// owned and immutable (later commands on the state do not reach it), and
/// serializing to exactly the bytes the state serialized to at that point,
/// so it deserializes as a `PartitionState`. Cheap to take, so a snapshot
/// can capture on the thread applying commands and serialize on another
/// (see the module docs).
#[derive(Debug, Serialize)]
#[serde(rename = "PartitionState")]
pub struct PartitionCapture {
    config: PartitionConfig,
    now_ms: u64,
    next_offset: u64,
    messages: StoreCapture,
    groups: BTreeMap<String, GroupCapture>,
    dedup: Dedup,
}

impl From<Snapshot> for PartitionState {
    fn from(s: Snapshot) -> Self {
        let mut state = PartitionState {
            config: s.config,
            now_ms: s.now_ms,
            next_offset: s.next_offset,
            messages: s.messages,
            groups: s.groups,
            dedup: s.dedup,
        };
        state.rebuild_indexes();
        state
    }
}

impl PartitionState {
    pub fn new(config: PartitionConfig) -> Self {
        Self {
            config,
            now_ms: 0,
            next_offset: 0,
            messages: Store::default(),
            groups: BTreeMap::new(),
            dedup: Dedup::default(),
        }
    }

    /// A copy of the state to serialize later, elsewhere: see
    /// [`PartitionCapture`]. O(chunks of 256 offsets + the groups' leased,
    /// waiting and dead entries + dedup shards), not O(messages): chunks
    /// and dedup shards are shared, copy-on-write (the first change to
    /// each afterwards copies it, while the capture lives).
    pub fn capture(&self) -> PartitionCapture {
        PartitionCapture {
            config: self.config.clone(),
            now_ms: self.now_ms,
            next_offset: self.next_offset,
            messages: self.messages.capture(),
            groups: self
                .groups
                .iter()
                .map(|(name, g)| {
                    let group = GroupCapture {
                        config: g.config.clone(),
                        cursor: g.cursor,
                        entries: g.entries.clone(),
                    };
                    (name.clone(), group)
                })
                .collect(),
            dedup: self.dedup.clone(),
        }
    }

    /// Applies one committed command: the outcome for its proposer, plus
    /// the offsets it removed (for the caller's payload store).
    pub fn apply(&mut self, cmd: Command) -> (Outcome, Effects) {
        // The leader's clock may step back after a failover; keep time monotone.
        self.now_ms = self.now_ms.max(cmd.now_ms());
        let mut fx = Effects::default();
        self.advance_time(&mut fx.removed);
        let removed = &mut fx.removed;
        let result = match cmd {
            Command::Produce { messages, .. } => {
                self.produce(messages, removed).map(Outcome::Produced)
            }
            Command::CreateGroup {
                group,
                config,
                start,
                ..
            } => self.create_group(group, config, start),
            Command::DeleteGroup { group, .. } => Ok(self.delete_group(&group, removed)),
            Command::Receive {
                group,
                consumer,
                max,
                lease_id,
                ..
            } => self
                .receive(&group, &consumer, max, lease_id)
                .map(Outcome::Received),
            Command::Ack {
                group, receipts, ..
            } => self.ack(&group, &receipts, removed).map(Outcome::Acked),
            Command::Nack {
                group,
                receipts,
                delay_ms,
                error,
                ..
            } => self
                .nack(&group, &receipts, delay_ms, error)
                .map(Outcome::Nacked),
            Command::ExtendLease {
                group,
                receipts,
                visibility_ms,
                ..
            } => self
                .extend(&group, &receipts, visibility_ms)
                .map(Outcome::Extended),
            Command::Tick { .. } => Ok(Outcome::Ticked),
            Command::DeadLettered { group, offsets, .. } => self
                .finalize_dead(&group, &offsets, removed)
                .map(|count| Outcome::DeadLettersFinalized { count }),
            Command::Reset { group, to, .. } => self
                .reset(&group, to, removed)
                .map(|start| Outcome::Reset { start }),
            Command::Purge { .. } => {
                let count = self.purge(removed);
                Ok(Outcome::Purged { count })
            }
        };
        (result.unwrap_or_else(Outcome::Error), fx)
    }

    /// The time-driven work, done before every command (module docs).
    fn advance_time(&mut self, removed: &mut Vec<u64>) {
        let now = self.now_ms;
        if self.config.max_age_ms > 0 {
            while let Some(oldest) = self.messages.first() {
                if oldest.enqueued_ms.saturating_add(self.config.max_age_ms) > now {
                    break;
                }
                let offset = oldest.offset;
                self.remove_message(offset, removed);
            }
        }
        for (name, group) in &mut self.groups {
            group.expire(name, now);
            group.promote(now);
        }
        self.dedup.rotate(now, self.config.dedup_window_ms);
    }

    fn produce(
        &mut self,
        messages: Vec<NewMessage>,
        removed: &mut Vec<u64>,
    ) -> Result<Vec<Produced>, QueueError> {
        let now = self.now_ms;
        let window = self.config.dedup_window_ms;
        // Validate the whole batch first: an error must change nothing.
        let mut batch_ids = BTreeSet::new();
        let mut stored = 0u64;
        for (i, m) in messages.iter().enumerate() {
            if m.priority > MAX_PRIORITY {
                return Err(invalid(
                    "priority",
                    format!(
                        "message {i} has priority {}, above {MAX_PRIORITY}",
                        m.priority
                    ),
                ));
            }
            if let Some(limit) = self.config.message_limit() {
                if m.size > limit {
                    return Err(QueueError::MessageTooLarge {
                        size: m.size,
                        limit,
                    });
                }
            }
            let duplicate = match &m.id {
                Some(id) if id.is_empty() => {
                    return Err(invalid(
                        "id",
                        format!("message {i} has an empty id (leave it unset instead)"),
                    ))
                }
                Some(id) if window > 0 => {
                    self.dedup.lookup(id, now, window).is_some() || !batch_ids.insert(id.as_str())
                }
                _ => false,
            };
            if !duplicate {
                stored += 1;
            }
        }
        if self.config.max_depth > 0 {
            let depth = self.messages.len + stored;
            if depth > self.config.max_depth {
                return Err(QueueError::DepthExceeded {
                    depth,
                    limit: self.config.max_depth,
                });
            }
        }

        let mut produced = Vec::with_capacity(messages.len());
        for m in messages {
            if window > 0 {
                if let Some(id) = &m.id {
                    if let Some(offset) = self.dedup.lookup(id, now, window) {
                        produced.push(Produced {
                            offset,
                            duplicate: true,
                        });
                        continue;
                    }
                }
            }
            let offset = self.next_offset;
            self.next_offset += 1;
            if window > 0 {
                if let Some(id) = &m.id {
                    self.dedup.record(id.clone(), offset, now);
                }
            }
            for group in self.groups.values_mut() {
                if group.is_fresh(offset, m.priority) {
                    group.idx.fresh += 1;
                }
            }
            self.messages.insert(MessageMeta {
                offset,
                priority: m.priority,
                size: m.size,
                enqueued_ms: now,
                id: m.id,
                key: m.key,
                headers: m.headers,
            });
            produced.push(Produced {
                offset,
                duplicate: false,
            });
        }

        let PartitionConfig {
            max_messages,
            max_bytes,
            ..
        } = self.config;
        while (max_messages > 0 && self.messages.len > max_messages)
            || (max_bytes > 0 && self.messages.bytes > max_bytes)
        {
            let oldest = self
                .messages
                .first()
                .expect("over a limit, so not empty")
                .offset;
            self.remove_message(oldest, removed);
        }
        Ok(produced)
    }

    /// Removes a live message from the store and from every group.
    fn remove_message(&mut self, offset: u64, removed: &mut Vec<u64>) {
        let Some(meta) = self.messages.remove(offset) else {
            return;
        };
        for group in self.groups.values_mut() {
            if group.is_fresh(offset, meta.priority) {
                group.idx.fresh -= 1;
            } else {
                group.take(offset);
            }
        }
        removed.push(offset);
    }

    /// Called when some group stopped owing `offset`: removes the message
    /// if no group owes it any more.
    fn release(&mut self, offset: u64, removed: &mut Vec<u64>) {
        let Some(priority) = self.messages.get(offset).map(|m| m.priority) else {
            return;
        };
        if !self.groups.values().any(|g| g.owes(offset, priority)) {
            self.remove_message(offset, removed);
        }
    }

    fn resolve(&self, start: StartAt) -> u64 {
        match start {
            StartAt::Earliest => self.messages.first().map_or(self.next_offset, |m| m.offset),
            StartAt::Latest => self.next_offset,
            StartAt::Offset(offset) => offset,
            // A scan, but a rare one. Enqueue times never decrease with
            // the offset (the clock is monotone), so the first match is it.
            StartAt::Time(ms) => self
                .messages
                .iter()
                .find(|m| m.enqueued_ms >= ms)
                .map_or(self.next_offset, |m| m.offset),
        }
    }

    fn create_group(
        &mut self,
        name: String,
        config: GroupConfig,
        start: StartAt,
    ) -> Result<Outcome, QueueError> {
        if name.is_empty() {
            return Err(invalid("group", "must not be empty"));
        }
        config.validate()?;
        if let Some(group) = self.groups.get_mut(&name) {
            // Leases already granted keep their deadlines; the new
            // timeouts, attempts and mode apply from now on.
            group.config = config;
            return Ok(Outcome::GroupCreated { created: false });
        }
        let start = self.resolve(start);
        let group = Group::new(config, start, &self.messages);
        self.groups.insert(name, group);
        Ok(Outcome::GroupCreated { created: true })
    }

    fn delete_group(&mut self, name: &str, removed: &mut Vec<u64>) -> Outcome {
        let Some(group) = self.groups.remove(name) else {
            return Outcome::GroupDeleted { existed: false };
        };
        // With no group left, nothing is removed (no groups: keep all).
        if !self.groups.is_empty() {
            for offset in self.owed_by(&group) {
                self.release(offset, removed);
            }
        }
        Outcome::GroupDeleted { existed: true }
    }

    /// The live offsets `group` owes, ascending (O(n)).
    fn owed_by(&self, group: &Group) -> Vec<u64> {
        let mut owed: Vec<u64> = group.entries.keys().copied().collect();
        for p in 0..LANES {
            owed.extend(self.messages.lanes[p].range(group.cursor[p]..));
        }
        owed.sort_unstable();
        owed
    }

    fn receive(
        &mut self,
        name: &str,
        consumer: &str,
        max: u32,
        lease_id: u64,
    ) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Err(invalid("max", "must be at least 1"));
        }
        if consumer.is_empty() {
            return Err(invalid("consumer", "must not be empty"));
        }
        let now = self.now_ms;
        let group = self
            .groups
            .get_mut(name)
            .ok_or_else(|| group_not_found(name))?;
        let mut deliveries = Vec::new();
        while deliveries.len() < max as usize {
            let Some(pick) = group.next_deliverable(&self.messages, now) else {
                break;
            };
            deliveries.push(group.deliver(pick, &self.messages, now, consumer, lease_id));
        }
        Ok(deliveries)
    }

    fn ack(
        &mut self,
        name: &str,
        receipts: &[Receipt],
        removed: &mut Vec<u64>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        if !self.groups.contains_key(name) {
            return Err(group_not_found(name));
        }
        let mut results = Vec::with_capacity(receipts.len());
        for &receipt in receipts {
            let group = self.groups.get_mut(name).expect("checked above");
            let result = group
                .entry_for(receipt)
                .and_then(|entry| match entry.state {
                    // Waiting: the lease expired but nobody else has the
                    // message yet; the work is done, so take it (module docs).
                    EntryState::Leased { .. } | EntryState::Waiting { .. } => Ok(()),
                    EntryState::Dead => Err(QueueError::ReceiptExpired {
                        offset: receipt.offset,
                    }),
                });
            if result.is_ok() {
                group.take(receipt.offset);
                self.release(receipt.offset, removed);
            }
            results.push(result);
        }
        Ok(results)
    }

    fn nack(
        &mut self,
        name: &str,
        receipts: &[Receipt],
        delay_ms: Option<u64>,
        error: Option<String>,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let now = self.now_ms;
        let group = self
            .groups
            .get_mut(name)
            .ok_or_else(|| group_not_found(name))?;
        let last_error = error.unwrap_or_else(|| NACKED_ERROR.to_owned());
        let mut results = Vec::with_capacity(receipts.len());
        for &receipt in receipts {
            let result = group.check_lease(receipt);
            if result.is_ok() {
                let offset = receipt.offset;
                let mut entry = group.take(offset).expect("checked");
                entry.last_error = Some(last_error.clone());
                entry.state = if group.config.exhausted(entry.attempts) {
                    EntryState::Dead
                } else {
                    let delay = delay_ms
                        .unwrap_or_else(|| group.config.backoff_ms(name, offset, entry.attempts));
                    EntryState::Waiting {
                        due_ms: now.saturating_add(delay),
                    }
                };
                group.put(offset, entry, now);
            }
            results.push(result);
        }
        Ok(results)
    }

    fn extend(
        &mut self,
        name: &str,
        receipts: &[Receipt],
        visibility_ms: u64,
    ) -> Result<Vec<Result<(), QueueError>>, QueueError> {
        let now = self.now_ms;
        let group = self
            .groups
            .get_mut(name)
            .ok_or_else(|| group_not_found(name))?;
        let mut results = Vec::with_capacity(receipts.len());
        for &receipt in receipts {
            let result = group.check_lease(receipt);
            if result.is_ok() {
                let mut entry = group.take(receipt.offset).expect("checked");
                if let EntryState::Leased { deadline_ms, .. } = &mut entry.state {
                    *deadline_ms = now.saturating_add(visibility_ms);
                }
                group.put(receipt.offset, entry, now);
            }
            results.push(result);
        }
        // Visibility 0 ends the lease now, as an expiry (a failed attempt,
        // backoff applies; to retry at once, nack with delay 0). Expiring it
        // here keeps "no lease outlives its deadline" true between commands.
        group.expire(name, now);
        Ok(results)
    }

    fn finalize_dead(
        &mut self,
        name: &str,
        offsets: &[u64],
        removed: &mut Vec<u64>,
    ) -> Result<u64, QueueError> {
        if !self.groups.contains_key(name) {
            return Err(group_not_found(name));
        }
        let mut count = 0;
        for &offset in offsets {
            let group = self.groups.get_mut(name).expect("checked above");
            // Anything else (a repeated proposal, a reset or retention in
            // between) is already settled: skip it, so the leader may retry.
            if matches!(
                group.entries.get(&offset),
                Some(Entry {
                    state: EntryState::Dead,
                    ..
                })
            ) {
                group.take(offset);
                count += 1;
                self.release(offset, removed);
            }
        }
        Ok(count)
    }

    fn reset(
        &mut self,
        name: &str,
        to: StartAt,
        removed: &mut Vec<u64>,
    ) -> Result<u64, QueueError> {
        let start = self.resolve(to);
        let group = self.groups.get(name).ok_or_else(|| group_not_found(name))?;
        let released: Vec<u64> = self
            .owed_by(group)
            .into_iter()
            .take_while(|&o| o < start)
            .collect();
        let group = self.groups.get_mut(name).expect("checked above");
        // Forget leases, redeliveries and dead letters: from `start` on
        // everything is fresh again, before it nothing is owed.
        group.entries.clear();
        group.cursor = [start; LANES];
        group.rebuild_index(&self.messages, self.now_ms);
        for offset in released {
            self.release(offset, removed);
        }
        Ok(start)
    }

    fn purge(&mut self, removed: &mut Vec<u64>) -> u64 {
        let offsets = self.messages.clear();
        for group in self.groups.values_mut() {
            group.entries.clear();
            group.idx = GroupIndex::default();
        }
        let count = offsets.len() as u64;
        removed.extend(offsets);
        count
    }

    fn rebuild_indexes(&mut self) {
        for group in self.groups.values_mut() {
            group.rebuild_index(&self.messages, self.now_ms);
        }
    }

    // --- read-only views -----------------------------------------------

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// The state's clock: the latest `now_ms` applied.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Live messages.
    pub fn depth(&self) -> u64 {
        self.messages.len
    }

    /// Payload bytes of the live messages.
    pub fn bytes(&self) -> u64 {
        self.messages.bytes
    }

    /// The offset the next stored message gets.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn oldest_enqueued_ms(&self) -> Option<u64> {
        self.messages.first().map(|m| m.enqueued_ms)
    }

    pub fn message(&self, offset: u64) -> Option<&MessageMeta> {
        self.messages.get(offset)
    }

    /// Live messages in offset order (e.g. to reconcile the payload store
    /// after installing a snapshot).
    pub fn messages(&self) -> impl Iterator<Item = &MessageMeta> + '_ {
        self.messages.iter()
    }

    /// Groups and their configs, by name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &GroupConfig)> + '_ {
        self.groups.iter().map(|(n, g)| (n.as_str(), &g.config))
    }

    pub fn group_stats(&self, group: &str) -> Option<GroupStats> {
        self.groups.get(group).map(Group::stats)
    }

    /// Dead messages of every group not yet finalized by `DeadLettered`,
    /// by group then offset.
    pub fn pending_dead_letters(&self) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        for (name, group) in &self.groups {
            for &offset in &group.idx.dead {
                let entry = &group.entries[&offset];
                out.push(DeadLetter {
                    group: name.clone(),
                    offset,
                    attempts: entry.attempts,
                    last_error: entry.last_error.clone(),
                    meta: self
                        .messages
                        .get(offset)
                        .expect("a dead letter is live")
                        .clone(),
                });
            }
        }
        out
    }

    /// When time alone next changes something (a lease expires, a
    /// redelivery becomes due, the oldest message ages out): the leader
    /// should apply a `Tick` then.
    pub fn next_wake_ms(&self) -> Option<u64> {
        let leases = self.groups.values().filter_map(|g| {
            let lease = g.idx.leases.first().map(|&(t, _)| t);
            let due = g.idx.delayed.first().map(|&(t, _)| t);
            lease.into_iter().chain(due).min()
        });
        let age = (self.config.max_age_ms > 0)
            .then(|| self.oldest_enqueued_ms())
            .flatten()
            .map(|t| t.saturating_add(self.config.max_age_ms));
        leases.chain(age).min()
    }

    /// Whether a `Receive` for `group` applied now would deliver something
    /// (for waking long polls).
    pub fn has_deliverable(&self, group: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.next_deliverable(&self.messages, self.now_ms).is_some())
    }

    /// Checks every internal invariant, in O(n): the indexes equal ones
    /// rebuilt from scratch, groups only reference live messages, counters
    /// add up. For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut count = 0u64;
        let mut bytes = 0u64;
        let mut lanes: [BTreeSet<u64>; LANES] = Default::default();
        let mut previous: Option<&MessageMeta> = None;
        for m in self.messages.iter() {
            if m.offset >= self.next_offset {
                return Err(format!("offset {} ≥ next offset", m.offset));
            }
            if m.priority > MAX_PRIORITY {
                return Err(format!("offset {} has priority {}", m.offset, m.priority));
            }
            if let Some(p) = previous {
                if p.offset >= m.offset || p.enqueued_ms > m.enqueued_ms {
                    return Err(format!(
                        "messages {} and {} out of order",
                        p.offset, m.offset
                    ));
                }
            }
            previous = Some(m);
            count += 1;
            bytes += m.size;
            lanes[usize::from(m.priority)].insert(m.offset);
        }
        if count != self.messages.len || bytes != self.messages.bytes {
            return Err(format!(
                "store counts {}/{} but holds {count}/{bytes}",
                self.messages.len, self.messages.bytes
            ));
        }
        if lanes != self.messages.lanes {
            return Err("priority lanes differ from the messages".into());
        }
        for (key, chunk) in &self.messages.chunks {
            let live = chunk.slots.iter().flatten().count() as u32;
            if live == 0 || live != chunk.live || chunk.slots.len() > CHUNK {
                return Err(format!("chunk {key} miscounted"));
            }
            for (i, m) in chunk.slots.iter().enumerate() {
                if m.as_ref().is_some_and(|m| chunk_of(m.offset) != (*key, i)) {
                    return Err(format!("chunk {key} slot {i} misplaced"));
                }
            }
        }
        for (name, group) in &self.groups {
            let mut rebuilt = group.clone();
            rebuilt.rebuild_index(&self.messages, self.now_ms);
            if rebuilt.idx != group.idx {
                return Err(format!(
                    "group {name}: indexes {:?} differ from rebuilt {:?}",
                    group.idx, rebuilt.idx
                ));
            }
            for (&offset, entry) in &group.entries {
                let Some(m) = self.messages.get(offset) else {
                    return Err(format!("group {name} holds removed offset {offset}"));
                };
                if m.priority != entry.priority || group.is_fresh(offset, m.priority) {
                    return Err(format!("group {name}: entry {offset} inconsistent"));
                }
                if entry.attempts == 0 {
                    return Err(format!("group {name}: entry {offset} never delivered"));
                }
                if let EntryState::Leased { deadline_ms, .. } = entry.state {
                    if deadline_ms <= self.now_ms {
                        return Err(format!("group {name}: lease on {offset} outlived"));
                    }
                }
            }
        }
        for seen in self
            .dedup
            .current
            .values()
            .chain(self.dedup.previous.values())
        {
            if seen.offset >= self.next_offset || seen.at_ms > self.now_ms {
                return Err(format!("dedup entry {seen:?} from the future"));
            }
        }
        Ok(())
    }

    /// Ids held by the deduplication window (for tests and metrics).
    /// The offset a message id was stored at, if it is still within the
    /// dedup window (as of this state's clock).
    pub fn stored_id(&self, id: &str) -> Option<u64> {
        self.dedup
            .lookup(id, self.now_ms, self.config.dedup_window_ms)
    }

    pub fn dedup_ids(&self) -> usize {
        self.dedup.len()
    }
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
