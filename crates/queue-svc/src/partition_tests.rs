//! Unit tests of the partition state: pure, so each test drives commands by
//! hand with an explicit clock. The harness checks, after every command,
//! that every removed offset had been stored, is reported once and is no
//! longer live, that the live set is exactly "stored minus removed", and
//! (unless turned off for the large test) every internal invariant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::*;

const T0: u64 = 1_000_000;
const VIS: u64 = 10_000;

/// Drives a PartitionState with a settable clock and fresh lease ids.
struct H {
    s: PartitionState,
    now: u64,
    next_lease: u64,
    stored: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    /// Removed offsets of the last command, in order.
    last_removed: Vec<u64>,
    check: bool,
}

impl H {
    fn new(config: PartitionConfig) -> Self {
        Self {
            s: PartitionState::new(config),
            now: T0,
            next_lease: 100,
            stored: BTreeSet::new(),
            removed: BTreeSet::new(),
            last_removed: Vec::new(),
            check: true,
        }
    }

    fn default() -> Self {
        Self::new(PartitionConfig::default())
    }

    fn run(&mut self, cmd: Command) -> Outcome {
        let (outcome, fx) = self.s.apply(cmd);
        if let Outcome::Produced(produced) = &outcome {
            for p in produced.iter().filter(|p| !p.duplicate) {
                assert!(self.stored.insert(p.offset), "offset {} reused", p.offset);
            }
        }
        for &r in &fx.removed {
            assert!(self.stored.contains(&r), "removed {r}, never stored");
            assert!(self.removed.insert(r), "removed {r} twice");
            assert!(self.s.message(r).is_none(), "removed {r} is still live");
        }
        self.last_removed = fx.removed;
        if self.check {
            self.s.check_invariants().unwrap();
            let live: BTreeSet<u64> = self.s.messages().map(|m| m.offset).collect();
            let expected: BTreeSet<u64> = self.stored.difference(&self.removed).copied().collect();
            assert_eq!(live, expected, "live set");
        }
        outcome
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn tick(&mut self) {
        assert_eq!(
            self.run(Command::Tick { now_ms: self.now }),
            Outcome::Ticked
        );
    }

    fn try_produce(&mut self, messages: Vec<NewMessage>) -> Outcome {
        self.run(Command::Produce {
            now_ms: self.now,
            messages,
        })
    }

    fn produce(&mut self, messages: Vec<NewMessage>) -> Vec<Produced> {
        match self.try_produce(messages) {
            Outcome::Produced(p) => p,
            o => panic!("produce: {o:?}"),
        }
    }

    /// Produces `n` plain messages; returns their offsets.
    fn produce_n(&mut self, n: usize) -> Vec<u64> {
        self.produce(vec![msg(); n])
            .into_iter()
            .map(|p| p.offset)
            .collect()
    }

    fn group_at(&mut self, name: &str, config: GroupConfig, start: StartAt) -> Outcome {
        self.run(Command::CreateGroup {
            now_ms: self.now,
            group: name.into(),
            config,
            start,
        })
    }

    fn group(&mut self, name: &str, config: GroupConfig) {
        let o = self.group_at(name, config, StartAt::Earliest);
        assert_eq!(o, Outcome::GroupCreated { created: true });
    }

    fn try_receive(&mut self, group: &str, consumer: &str, max: u32) -> Outcome {
        self.next_lease += 1;
        self.run(Command::Receive {
            now_ms: self.now,
            group: group.into(),
            consumer: consumer.into(),
            max,
            lease_id: self.next_lease,
        })
    }

    fn receive_as(&mut self, group: &str, consumer: &str, max: u32) -> Vec<Delivery> {
        match self.try_receive(group, consumer, max) {
            Outcome::Received(d) => d,
            o => panic!("receive: {o:?}"),
        }
    }

    fn receive(&mut self, group: &str, max: u32) -> Vec<Delivery> {
        self.receive_as(group, "c1", max)
    }

    fn ack(&mut self, group: &str, receipts: &[Receipt]) -> Vec<Result<(), QueueError>> {
        match self.run(Command::Ack {
            now_ms: self.now,
            group: group.into(),
            receipts: receipts.to_vec(),
        }) {
            Outcome::Acked(r) => r,
            o => panic!("ack: {o:?}"),
        }
    }

    fn ack_all(&mut self, group: &str, deliveries: &[Delivery]) {
        let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt).collect();
        let results = self.ack(group, &receipts);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    fn nack(
        &mut self,
        group: &str,
        receipts: &[Receipt],
        delay_ms: Option<u64>,
        error: Option<&str>,
    ) -> Vec<Result<(), QueueError>> {
        match self.run(Command::Nack {
            now_ms: self.now,
            group: group.into(),
            receipts: receipts.to_vec(),
            delay_ms,
            error: error.map(str::to_owned),
        }) {
            Outcome::Nacked(r) => r,
            o => panic!("nack: {o:?}"),
        }
    }

    fn extend(
        &mut self,
        group: &str,
        receipts: &[Receipt],
        visibility_ms: u64,
    ) -> Vec<Result<(), QueueError>> {
        match self.run(Command::ExtendLease {
            now_ms: self.now,
            group: group.into(),
            receipts: receipts.to_vec(),
            visibility_ms,
        }) {
            Outcome::Extended(r) => r,
            o => panic!("extend: {o:?}"),
        }
    }

    fn reset(&mut self, group: &str, to: StartAt) -> u64 {
        match self.run(Command::Reset {
            now_ms: self.now,
            group: group.into(),
            to,
        }) {
            Outcome::Reset { start } => start,
            o => panic!("reset: {o:?}"),
        }
    }

    fn dead_lettered(&mut self, group: &str, offsets: &[u64]) -> u64 {
        match self.run(Command::DeadLettered {
            now_ms: self.now,
            group: group.into(),
            offsets: offsets.to_vec(),
        }) {
            Outcome::DeadLettersFinalized { count } => count,
            o => panic!("dead lettered: {o:?}"),
        }
    }

    fn stats(&self, group: &str) -> GroupStats {
        self.s.group_stats(group).expect("group exists")
    }
}

fn msg() -> NewMessage {
    NewMessage {
        size: 10,
        ..Default::default()
    }
}

fn prio(priority: u8) -> NewMessage {
    NewMessage { priority, ..msg() }
}

fn with_id(id: &str) -> NewMessage {
    NewMessage {
        id: Some(id.into()),
        ..msg()
    }
}

fn sized(size: u64) -> NewMessage {
    NewMessage { size, ..msg() }
}

/// A shared group: 10 s leases, 3 attempts, backoff 1 s doubling to 8 s,
/// no jitter (so due times are exact).
fn shared() -> GroupConfig {
    GroupConfig {
        mode: GroupMode::Shared,
        visibility_timeout_ms: VIS,
        max_attempts: 3,
        backoff_base_ms: 1_000,
        backoff_cap_ms: 8_000,
        backoff_jitter_pct: 0,
    }
}

fn ordered() -> GroupConfig {
    GroupConfig {
        mode: GroupMode::Ordered,
        ..shared()
    }
}

fn offsets(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|d| d.offset).collect()
}

fn receipts(deliveries: &[Delivery]) -> Vec<Receipt> {
    deliveries.iter().map(|d| d.receipt).collect()
}

fn not_found(offset: u64) -> Result<(), QueueError> {
    Err(QueueError::ReceiptNotFound { offset })
}

fn expired(offset: u64) -> Result<(), QueueError> {
    Err(QueueError::ReceiptExpired { offset })
}

fn roundtrip(s: &PartitionState) -> PartitionState {
    let json = serde_json::to_string(s).unwrap();
    serde_json::from_str(&json).unwrap()
}

/// Through postcard too: a format that is not self-describing and needs
/// every sequence's length up front (the service encodes with it).
fn roundtrip_postcard(s: &PartitionState) -> PartitionState {
    let bytes = postcard::to_allocvec(s).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

/// A state's serialized forms: postcard (what snapshots use) and JSON.
fn state_bytes(s: &PartitionState) -> (Vec<u8>, String) {
    (
        postcard::to_allocvec(s).unwrap(),
        serde_json::to_string(s).unwrap(),
    )
}

/// A capture's serialized forms, to compare with [`state_bytes`].
fn capture_bytes(c: &PartitionCapture) -> (Vec<u8>, String) {
    (
        postcard::to_allocvec(c).unwrap(),
        serde_json::to_string(c).unwrap(),
    )
}

// --- producing and ordering ------------------------------------------------

#[test]
fn offsets_are_consecutive_from_zero() {
    let mut h = H::default();
    assert_eq!(h.produce_n(3), vec![0, 1, 2]);
    h.advance(5);
    assert_eq!(h.produce_n(2), vec![3, 4]);
    assert_eq!(h.s.next_offset(), 5);
    assert_eq!(h.s.depth(), 5);
    assert_eq!(h.s.bytes(), 50);
    assert_eq!(h.s.oldest_enqueued_ms(), Some(T0));
    assert_eq!(h.s.message(3).unwrap().enqueued_ms, T0 + 5);
    assert!(h.s.message(5).is_none());
    // An empty batch is fine and stores nothing.
    assert_eq!(h.produce(vec![]), vec![]);
    assert_eq!(h.s.next_offset(), 5);
}

#[test]
fn clock_is_monotone() {
    let mut h = H::default();
    h.produce_n(1);
    // A new leader whose clock is behind.
    h.now = T0 - 500;
    h.produce_n(1);
    assert_eq!(h.s.now_ms(), T0);
    assert_eq!(h.s.message(1).unwrap().enqueued_ms, T0);
}

#[test]
fn metadata_is_kept_and_delivered() {
    let mut h = H::default();
    h.group("g", shared());
    let m = NewMessage {
        id: Some("id-1".into()),
        key: Some(b"k".to_vec()),
        priority: 4,
        headers: vec![("a".into(), "b".into())],
        size: 77,
    };
    h.produce(vec![m.clone()]);
    let d = h.receive("g", 1);
    let meta = &d[0].meta;
    assert_eq!(meta.offset, 0);
    assert_eq!(meta.id, m.id);
    assert_eq!(meta.key, m.key);
    assert_eq!(meta.priority, 4);
    assert_eq!(meta.headers, m.headers);
    assert_eq!(meta.size, 77);
    assert_eq!(meta.enqueued_ms, T0);
    assert_eq!(h.s.message(0), Some(meta));
}

#[test]
fn shared_group_delivers_in_offset_order() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(5);
    let first = h.receive("g", 3);
    assert_eq!(offsets(&first), vec![0, 1, 2]);
    assert!(first.iter().all(|d| d.attempt == 1));
    let second = h.receive("g", 10);
    assert_eq!(offsets(&second), vec![3, 4]);
    assert_ne!(first[0].receipt.lease_id, second[0].receipt.lease_id);
    assert!(h.receive("g", 10).is_empty());
    assert_eq!(h.stats("g").in_flight, 5);
}

#[test]
fn shared_group_delivers_higher_priority_first() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce(vec![prio(0), prio(5), prio(9), prio(5), prio(0), prio(9)]);
    let d = h.receive("g", 10);
    assert_eq!(offsets(&d), vec![2, 5, 1, 3, 0, 4]);
    // A later, more urgent message overtakes the backlog.
    h.produce(vec![prio(0), prio(0), prio(7)]);
    assert_eq!(offsets(&h.receive("g", 1)), vec![8]);
    assert_eq!(offsets(&h.receive("g", 5)), vec![6, 7]);
}

#[test]
fn redeliveries_compete_by_priority_then_offset() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce(vec![prio(1), prio(1), prio(5), prio(5)]);
    let d = h.receive("g", 2);
    assert_eq!(offsets(&d), vec![2, 3]);
    // A due redelivery of priority 5 beats fresh priority-1 messages.
    assert_eq!(h.nack("g", &[d[0].receipt], Some(0), None), vec![Ok(())]);
    let r = h.receive("g", 1);
    assert_eq!((r[0].offset, r[0].attempt), (2, 2));
    // Same priority: the lower offset wins, redelivery or not.
    let d = h.receive("g", 1);
    assert_eq!(offsets(&d), vec![0]);
    h.nack("g", &[d[0].receipt], Some(0), None);
    let d = h.receive("g", 10);
    assert_eq!(offsets(&d), vec![0, 1]);
    assert_eq!(d[0].attempt, 2);
    assert_eq!(d[1].attempt, 1);
}

// --- ordered groups ---------------------------------------------------------

#[test]
fn ordered_group_ignores_priority_and_keeps_one_in_flight() {
    let mut h = H::default();
    h.group("o", ordered());
    h.produce(vec![prio(0), prio(9), prio(5)]);
    let d = h.receive("o", 10);
    assert_eq!(offsets(&d), vec![0]);
    assert!(h.receive("o", 10).is_empty());
    assert!(!h.s.has_deliverable("o"));
    h.ack_all("o", &d);
    assert!(h.s.has_deliverable("o"));
    let d = h.receive("o", 10);
    assert_eq!(offsets(&d), vec![1]);
    h.ack_all("o", &d);
    let d = h.receive("o", 10);
    assert_eq!(offsets(&d), vec![2]);
    h.ack_all("o", &d);
    assert!(h.receive("o", 10).is_empty());
    assert_eq!(h.s.depth(), 0);
}

#[test]
fn ordered_group_order_survives_nack() {
    let mut h = H::default();
    h.group("o", ordered());
    h.produce_n(3);
    let d = h.receive("o", 1);
    assert_eq!(h.nack("o", &receipts(&d), None, Some("e")), vec![Ok(())]);
    // Offset 0 waits for its 1 s backoff and holds offset 1 back.
    assert!(h.receive("o", 1).is_empty());
    assert!(!h.s.has_deliverable("o"));
    assert_eq!(h.s.next_wake_ms(), Some(T0 + 1_000));
    h.advance(999);
    assert!(h.receive("o", 1).is_empty());
    h.advance(1);
    let d = h.receive("o", 1);
    assert_eq!((d[0].offset, d[0].attempt), (0, 2));
    h.ack_all("o", &d);
    assert_eq!(offsets(&h.receive("o", 1)), vec![1]);
}

#[test]
fn ordered_group_order_survives_lease_expiry() {
    let mut h = H::default();
    h.group("o", ordered());
    h.produce_n(2);
    let d = h.receive("o", 1);
    assert_eq!(offsets(&d), vec![0]);
    h.advance(VIS);
    h.tick();
    assert_eq!(h.stats("o").in_flight, 0);
    // Expired at T0+VIS; redeliverable a backoff after that.
    assert!(h.receive("o", 1).is_empty());
    assert_eq!(h.s.next_wake_ms(), Some(T0 + VIS + 1_000));
    h.advance(1_000);
    let d = h.receive("o", 1);
    assert_eq!((d[0].offset, d[0].attempt), (0, 2));
    h.ack_all("o", &d);
    assert_eq!(offsets(&h.receive("o", 1)), vec![1]);
}

#[test]
fn poison_message_does_not_block_ordered_group() {
    let mut h = H::default();
    h.group(
        "o",
        GroupConfig {
            max_attempts: 2,
            ..ordered()
        },
    );
    h.produce_n(3);
    let d = h.receive("o", 1);
    h.nack("o", &receipts(&d), Some(0), Some("bad 1"));
    let d = h.receive("o", 1);
    assert_eq!((d[0].offset, d[0].attempt), (0, 2));
    h.nack("o", &receipts(&d), Some(0), Some("bad 2"));
    // Offset 0 is dead: the next one goes out while it awaits the DLQ copy.
    let d = h.receive("o", 1);
    assert_eq!(offsets(&d), vec![1]);
    let dead = h.s.pending_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].offset,
            dead[0].attempts,
            dead[0].last_error.as_deref()
        ),
        (0, 2, Some("bad 2"))
    );
}

#[test]
fn switching_to_ordered_waits_for_all_leases() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(4);
    let d = h.receive("g", 2);
    assert_eq!(
        h.group_at("g", ordered(), StartAt::Earliest),
        Outcome::GroupCreated { created: false }
    );
    assert!(h.receive("g", 5).is_empty());
    h.ack_all("g", &d[..1]);
    assert!(h.receive("g", 5).is_empty());
    h.ack_all("g", &d[1..]);
    assert_eq!(offsets(&h.receive("g", 5)), vec![2]);
}

// --- leases, expiry, backoff --------------------------------------------------

#[test]
fn lease_expires_at_its_deadline_and_redelivers() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(1);
    let first = h.receive("g", 1);
    assert_eq!(h.s.next_wake_ms(), Some(T0 + VIS));
    h.advance(VIS - 1);
    h.tick();
    assert_eq!(h.stats("g").in_flight, 1);
    assert_eq!(h.stats("g").consumers, vec!["c1".to_string()]);
    h.advance(1);
    h.tick();
    let stats = h.stats("g");
    assert_eq!((stats.in_flight, stats.pending), (0, 1));
    assert!(stats.consumers.is_empty());
    assert_eq!(h.s.next_wake_ms(), Some(T0 + VIS + 1_000));
    assert!(h.receive("g", 1).is_empty());
    h.advance(1_000);
    let second = h.receive_as("g", "c2", 1);
    assert_eq!((second[0].offset, second[0].attempt), (0, 2));
    assert_eq!(h.ack("g", &[first[0].receipt]), vec![expired(0)]);
    assert_eq!(h.ack("g", &[second[0].receipt]), vec![Ok(())]);
    assert_eq!(h.last_removed, vec![0]);
}

#[test]
fn expiry_needs_no_tick_to_take_effect() {
    // Any command applies time's effects first, so outcomes do not depend
    // on when the leader ticks.
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(1);
    let d = h.receive("g", 1);
    h.advance(VIS + 500);
    assert_eq!(h.extend("g", &receipts(&d), 5_000), vec![expired(0)]);
    assert_eq!(h.stats("g").in_flight, 0);
    // The backoff counts from the deadline, not from when it was noticed.
    assert_eq!(h.s.next_wake_ms(), Some(T0 + VIS + 1_000));
}

#[test]
fn backoff_schedule_without_jitter_is_exact() {
    let c = shared();
    let delays: Vec<u64> = (1..=6).map(|a| c.backoff_ms("g", 7, a)).collect();
    assert_eq!(delays, vec![1_000, 2_000, 4_000, 8_000, 8_000, 8_000]);
    // No overflow, however many attempts or however large the base.
    assert_eq!(c.backoff_ms("g", 7, u32::MAX), 8_000);
    let huge = GroupConfig {
        backoff_base_ms: u64::MAX / 2,
        backoff_cap_ms: u64::MAX,
        backoff_jitter_pct: 100,
        ..shared()
    };
    assert_eq!(huge.backoff_ms("g", 1, 3), u64::MAX);
    let none = GroupConfig {
        backoff_base_ms: 0,
        backoff_cap_ms: 0,
        ..shared()
    };
    assert_eq!(none.backoff_ms("g", 1, 3), 0);

    // And the state schedules exactly that after each nack.
    let mut h = H::default();
    h.group(
        "g",
        GroupConfig {
            max_attempts: 0,
            ..shared()
        },
    );
    h.produce_n(1);
    for attempt in 1..=5u32 {
        let d = h.receive("g", 1);
        assert_eq!(d[0].attempt, attempt);
        h.nack("g", &receipts(&d), None, None);
        let delay = c.backoff_ms("g", 0, attempt);
        assert_eq!(h.s.next_wake_ms(), Some(h.now + delay));
        h.advance(delay);
    }
}

#[test]
fn backoff_jitter_is_bounded_and_deterministic() {
    let c = GroupConfig {
        backoff_jitter_pct: 50,
        ..shared()
    };
    let mut distinct = BTreeSet::new();
    let mut differs_by_group = false;
    for offset in 0..500 {
        for attempt in 1..=5 {
            let base = shared().backoff_ms("g", offset, attempt);
            let d = c.backoff_ms("g", offset, attempt);
            assert!(d >= base && d <= base + base / 2, "{d} for {base}");
            assert_eq!(d, c.backoff_ms("g", offset, attempt));
            differs_by_group |= d != c.backoff_ms("other", offset, attempt);
            if attempt == 1 {
                distinct.insert(d);
            }
        }
    }
    // The jitter does spread retries.
    assert!(distinct.len() > 100, "{}", distinct.len());
    assert!(differs_by_group);
    // Pinned values: the schedule must never change between builds, or
    // replicas of different versions would disagree.
    let pinned: Vec<u64> = (1..=3).map(|a| c.backoff_ms("g", 42, a)).collect();
    assert_eq!(pinned, vec![1_083, 2_782, 4_080]);
}

#[test]
fn nack_with_explicit_delay() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(2);
    let d = h.receive("g", 2);
    h.nack("g", &[d[0].receipt], Some(0), None);
    h.nack("g", &[d[1].receipt], Some(5_000), None);
    assert_eq!(offsets(&h.receive("g", 5)), vec![0]);
    assert_eq!(h.s.next_wake_ms(), Some(T0 + 5_000));
    h.advance(5_000);
    h.tick();
    assert!(h.s.has_deliverable("g"));
    assert_eq!(offsets(&h.receive("g", 5)), vec![1]);
}

#[test]
fn extend_lease() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(3);
    let d = h.receive("g", 3);
    h.advance(8_000);
    let results = h.extend(
        "g",
        &[
            d[0].receipt,
            Receipt {
                offset: 1,
                lease_id: 1,
            },
            Receipt {
                offset: 9,
                lease_id: d[0].receipt.lease_id,
            },
        ],
        VIS,
    );
    assert_eq!(results, vec![Ok(()), expired(1), not_found(9)]);
    h.advance(5_000);
    h.tick();
    // Offset 0 is still leased (until T0+18 s); 1 and 2 expired at T0+10 s.
    assert_eq!(h.stats("g").in_flight, 1);
    assert_eq!(h.ack("g", &[d[0].receipt]), vec![Ok(())]);
    // Visibility 0 ends a lease at once.
    h.produce_n(1);
    let d = h.receive("g", 5);
    let fresh = d.iter().find(|d| d.offset == 3).unwrap();
    assert_eq!(h.extend("g", &[fresh.receipt], 0), vec![Ok(())]);
    assert_eq!(h.stats("g").in_flight, d.len() as u64 - 1);
}

// --- dead letters -----------------------------------------------------------

#[test]
fn dead_letter_after_max_attempts() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(2);
    for attempt in 1..=3 {
        let d = h.receive("g", 1);
        assert_eq!((d[0].offset, d[0].attempt), (0, attempt));
        let error = format!("boom {attempt}");
        h.nack("g", &receipts(&d), Some(0), Some(&error));
    }
    let dead = h.s.pending_dead_letters();
    assert_eq!(
        dead,
        vec![DeadLetter {
            group: "g".into(),
            offset: 0,
            attempts: 3,
            last_error: Some("boom 3".into()),
            meta: h.s.message(0).unwrap().clone(),
        }]
    );
    let stats = h.stats("g");
    assert_eq!((stats.dead_pending, stats.pending), (1, 1));
    // Never delivered to the group again.
    assert_eq!(offsets(&h.receive("g", 5)), vec![1]);
    assert!(h.receive("g", 5).is_empty());
    // The leader copied it to the DLQ: finalized and, owed by nobody, removed.
    assert_eq!(h.dead_lettered("g", &[0, 1, 99]), 1);
    assert_eq!(h.last_removed, vec![0]);
    assert!(h.s.pending_dead_letters().is_empty());
    assert_eq!(h.dead_lettered("g", &[0]), 0);
}

#[test]
fn expired_lease_on_last_attempt_dead_letters_with_timeout_error() {
    let mut h = H::default();
    h.group(
        "g",
        GroupConfig {
            max_attempts: 1,
            ..shared()
        },
    );
    h.produce_n(1);
    let d = h.receive("g", 1);
    h.advance(VIS);
    h.tick();
    let dead = h.s.pending_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].last_error.as_deref(), Some(EXPIRED_ERROR));
    // Dead is final: a late ack does not take it back.
    assert_eq!(h.ack("g", &receipts(&d)), vec![expired(0)]);
    assert_eq!(h.s.next_wake_ms(), None);
}

#[test]
fn dead_message_still_owed_by_other_groups_stays() {
    let mut h = H::default();
    h.group(
        "a",
        GroupConfig {
            max_attempts: 1,
            ..shared()
        },
    );
    h.group("b", shared());
    h.produce_n(1);
    let d = h.receive("a", 1);
    h.nack("a", &receipts(&d), None, None);
    assert_eq!(h.dead_lettered("a", &[0]), 1);
    assert!(h.last_removed.is_empty());
    let d = h.receive("b", 1);
    h.ack_all("b", &d);
    assert_eq!(h.last_removed, vec![0]);
}

// --- dedup ------------------------------------------------------------------

#[test]
fn dedup_within_window_and_within_a_batch() {
    let mut h = H::new(PartitionConfig {
        dedup_window_ms: 60_000,
        ..Default::default()
    });
    let p = h.produce(vec![with_id("a"), with_id("b"), with_id("a"), msg()]);
    let got: Vec<(u64, bool)> = p.iter().map(|p| (p.offset, p.duplicate)).collect();
    assert_eq!(got, vec![(0, false), (1, false), (0, true), (2, false)]);
    assert_eq!(h.s.depth(), 3);
    h.advance(59_999);
    assert_eq!(
        h.produce(vec![with_id("a")]),
        vec![Produced {
            offset: 0,
            duplicate: true
        }]
    );
    // Duplicates are answered even after the original was consumed.
    h.group("g", shared());
    let d = h.receive("g", 10);
    h.ack_all("g", &d);
    assert_eq!(h.s.depth(), 0);
    assert!(h.produce(vec![with_id("b")])[0].duplicate);
    // Out of the window: accepted again, as a new message.
    h.advance(1);
    assert_eq!(
        h.produce(vec![with_id("a")]),
        vec![Produced {
            offset: 3,
            duplicate: false
        }]
    );
    assert!(h.produce(vec![with_id("a")])[0].duplicate);
    // Old ids are dropped from memory.
    h.advance(200_000);
    h.tick();
    assert_eq!(h.s.dedup_ids(), 0);
}

#[test]
fn no_dedup_with_zero_window() {
    let mut h = H::new(PartitionConfig {
        dedup_window_ms: 0,
        ..Default::default()
    });
    let p = h.produce(vec![with_id("a"), with_id("a")]);
    assert!(p.iter().all(|p| !p.duplicate));
    assert_eq!(h.s.dedup_ids(), 0);
}

// --- limits -----------------------------------------------------------------

#[test]
fn retention_by_count_drops_the_oldest_even_if_unacked() {
    let mut h = H::new(PartitionConfig {
        max_messages: 3,
        ..Default::default()
    });
    h.group("g", shared());
    h.produce_n(2);
    let d = h.receive("g", 1);
    h.produce_n(3);
    assert_eq!(h.last_removed, vec![0, 1]);
    assert_eq!(h.s.depth(), 3);
    assert_eq!(h.stats("g").in_flight, 0);
    assert_eq!(h.stats("g").pending, 3);
    // The lease on a dropped message is gone with it.
    assert_eq!(h.ack("g", &receipts(&d)), vec![not_found(0)]);
}

#[test]
fn retention_by_bytes() {
    let mut h = H::new(PartitionConfig {
        max_bytes: 100,
        ..Default::default()
    });
    h.produce(vec![sized(40), sized(40)]);
    h.produce(vec![sized(40)]);
    assert_eq!(h.last_removed, vec![0]);
    assert_eq!(h.s.bytes(), 80);
    // One message larger than the whole budget is refused, not stored and
    // dropped at once.
    assert_eq!(
        h.try_produce(vec![sized(101)]),
        Outcome::Error(QueueError::MessageTooLarge {
            size: 101,
            limit: 100
        })
    );
}

#[test]
fn retention_by_age() {
    let mut h = H::new(PartitionConfig {
        max_age_ms: 1_000,
        ..Default::default()
    });
    h.produce_n(1);
    h.advance(500);
    h.produce_n(1);
    assert_eq!(h.s.next_wake_ms(), Some(T0 + 1_000));
    h.advance(499);
    h.tick();
    assert_eq!(h.s.depth(), 2);
    h.advance(1);
    h.tick();
    assert_eq!(h.last_removed, vec![0]);
    assert_eq!(h.s.oldest_enqueued_ms(), Some(T0 + 500));
    h.advance(500);
    h.produce_n(1);
    assert_eq!(h.last_removed, vec![1]);
    assert_eq!(h.s.depth(), 1);
}

#[test]
fn max_depth_rejects_the_whole_batch() {
    let mut h = H::new(PartitionConfig {
        max_depth: 3,
        ..Default::default()
    });
    h.group("g", shared());
    h.produce(vec![with_id("x"), msg()]);
    let before = h.s.clone();
    assert_eq!(
        h.try_produce(vec![msg(), msg()]),
        Outcome::Error(QueueError::DepthExceeded { depth: 4, limit: 3 })
    );
    assert_eq!(h.s, before, "nothing half-written");
    // Duplicates take no room.
    let p = h.produce(vec![with_id("x"), msg()]);
    assert_eq!((p[0].duplicate, p[1].offset), (true, 2));
    // Consuming makes room again.
    let d = h.receive("g", 1);
    h.ack_all("g", &d);
    h.produce_n(1);
    assert_eq!(h.s.depth(), 3);
}

#[test]
fn invalid_messages_reject_the_whole_batch() {
    let mut h = H::new(PartitionConfig {
        max_message_bytes: 100,
        ..Default::default()
    });
    h.produce_n(1);
    let before = h.s.clone();
    let cases = [
        (
            vec![sized(100), sized(101)],
            "MESSAGE_TOO_LARGE",
            Some(QueueError::MessageTooLarge {
                size: 101,
                limit: 100,
            }),
        ),
        (vec![msg(), prio(10)], "INVALID_ARGUMENT", None),
        (vec![msg(), with_id("")], "INVALID_ARGUMENT", None),
    ];
    for (batch, reason, exact) in cases {
        let Outcome::Error(e) = h.try_produce(batch) else {
            panic!("accepted")
        };
        assert_eq!(e.reason(), reason);
        if let Some(exact) = exact {
            assert_eq!(e, exact);
        }
        assert_eq!(h.s, before);
    }
}

#[test]
fn command_errors() {
    let mut h = H::default();
    h.group("g", shared());
    let reason = |o: Outcome| match o {
        Outcome::Error(e) => e.reason(),
        o => panic!("not an error: {o:?}"),
    };
    assert_eq!(reason(h.try_receive("g", "c", 0)), "INVALID_ARGUMENT");
    assert_eq!(reason(h.try_receive("g", "", 1)), "INVALID_ARGUMENT");
    assert_eq!(reason(h.try_receive("nope", "c", 1)), "GROUP_NOT_FOUND");
    let now = h.now;
    let unknown = [
        Command::Ack {
            now_ms: now,
            group: "nope".into(),
            receipts: vec![],
        },
        Command::Nack {
            now_ms: now,
            group: "nope".into(),
            receipts: vec![],
            delay_ms: None,
            error: None,
        },
        Command::ExtendLease {
            now_ms: now,
            group: "nope".into(),
            receipts: vec![],
            visibility_ms: 1,
        },
        Command::Reset {
            now_ms: now,
            group: "nope".into(),
            to: StartAt::Earliest,
        },
        Command::DeadLettered {
            now_ms: now,
            group: "nope".into(),
            offsets: vec![],
        },
    ];
    for cmd in unknown {
        assert_eq!(reason(h.run(cmd)), "GROUP_NOT_FOUND");
    }
    assert_eq!(
        h.run(Command::DeleteGroup {
            now_ms: now,
            group: "nope".into()
        }),
        Outcome::GroupDeleted { existed: false }
    );
    for bad in [
        GroupConfig {
            visibility_timeout_ms: 0,
            ..shared()
        },
        GroupConfig {
            backoff_jitter_pct: 101,
            ..shared()
        },
        GroupConfig {
            backoff_cap_ms: 999,
            ..shared()
        },
    ] {
        assert_eq!(
            reason(h.group_at("new", bad.clone(), StartAt::Earliest)),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            reason(h.group_at("g", bad, StartAt::Earliest)),
            "INVALID_ARGUMENT"
        );
    }
    assert_eq!(
        reason(h.group_at("", shared(), StartAt::Earliest)),
        "INVALID_ARGUMENT"
    );
    assert_eq!(h.s.groups().count(), 1);
    assert_eq!(h.s.groups().next().unwrap().1, &shared());
}

// --- acks ---------------------------------------------------------------------

#[test]
fn ack_is_batched_with_a_result_per_receipt() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(4);
    let d = h.receive("g", 3);
    let lease = d[0].receipt.lease_id;
    let results = h.ack(
        "g",
        &[
            d[0].receipt,
            d[0].receipt,
            Receipt {
                offset: 3,
                lease_id: lease,
            },
            Receipt {
                offset: 1,
                lease_id: lease + 1000,
            },
            d[2].receipt,
        ],
    );
    assert_eq!(
        results,
        vec![Ok(()), not_found(0), not_found(3), expired(1), Ok(())]
    );
    assert_eq!(h.last_removed, vec![0, 2]);
    // Double ack.
    assert_eq!(h.ack("g", &[d[2].receipt]), vec![not_found(2)]);
    assert_eq!(h.ack("g", &[d[1].receipt]), vec![Ok(())]);
    assert_eq!(h.ack("g", &[]), vec![]);
    assert_eq!(h.stats("g").pending, 1);
}

#[test]
fn ack_after_expiry_is_accepted_until_redelivery() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(2);
    let d = h.receive("g", 2);
    h.advance(VIS);
    h.tick();
    assert_eq!(h.stats("g").in_flight, 0);
    // Expired, not redelivered yet: the ack is taken.
    assert_eq!(h.ack("g", &[d[0].receipt]), vec![Ok(())]);
    assert_eq!(h.last_removed, vec![0]);
    // But nack and extend need a running lease.
    assert_eq!(h.nack("g", &[d[1].receipt], None, None), vec![expired(1)]);
    assert_eq!(h.extend("g", &[d[1].receipt], VIS), vec![expired(1)]);
    // Once redelivered, the old receipt is superseded.
    h.advance(1_000);
    let again = h.receive_as("g", "c2", 5);
    assert_eq!(offsets(&again), vec![1]);
    assert_eq!(h.ack("g", &[d[1].receipt]), vec![expired(1)]);
    assert_eq!(h.nack("g", &[d[1].receipt], None, None), vec![expired(1)]);
    assert_eq!(h.ack("g", &receipts(&again)), vec![Ok(())]);
}

#[test]
fn nack_results_per_receipt() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(3);
    let d = h.receive("g", 2);
    let results = h.nack(
        "g",
        &[
            d[0].receipt,
            d[0].receipt,
            Receipt {
                offset: 2,
                lease_id: 1,
            },
        ],
        Some(0),
        Some("oops"),
    );
    assert_eq!(results, vec![Ok(()), expired(0), not_found(2)]);
    assert_eq!(
        h.s.groups["g"].entries[&0].last_error.as_deref(),
        Some("oops")
    );
}

// --- several groups -------------------------------------------------------------

#[test]
fn two_groups_consume_independently() {
    let mut h = H::default();
    h.group("a", shared());
    h.group("b", ordered());
    h.produce_n(3);
    let a = h.receive("a", 10);
    assert_eq!(offsets(&a), vec![0, 1, 2]);
    h.ack_all("a", &a);
    assert!(h.last_removed.is_empty());
    assert_eq!(h.s.depth(), 3);
    assert_eq!(h.stats("a").pending, 0);
    assert_eq!(h.stats("b").pending, 3);
    for offset in 0..3 {
        let b = h.receive("b", 10);
        assert_eq!(offsets(&b), vec![offset]);
        h.ack_all("b", &b);
        assert_eq!(h.last_removed, vec![offset]);
    }
    assert_eq!(h.s.depth(), 0);
}

#[test]
fn messages_wait_for_a_group_and_later_groups_pick_their_start() {
    let mut h = H::default();
    h.produce_n(3);
    h.advance(1_000);
    h.produce_n(2);
    // No group: everything is kept.
    assert_eq!(h.s.depth(), 5);
    h.group_at("e", shared(), StartAt::Earliest);
    h.group_at("l", shared(), StartAt::Latest);
    h.group_at("o", shared(), StartAt::Offset(2));
    h.group_at("t", shared(), StartAt::Time(T0 + 1_000));
    h.group_at("f", shared(), StartAt::Offset(6));
    let pending = |h: &H| {
        ["e", "l", "o", "t", "f"]
            .map(|g| h.stats(g).pending)
            .to_vec()
    };
    assert_eq!(pending(&h), vec![5, 0, 3, 2, 0]);
    assert_eq!(offsets(&h.receive("e", 1)), vec![0]);
    assert_eq!(offsets(&h.receive("o", 1)), vec![2]);
    assert_eq!(offsets(&h.receive("t", 1)), vec![3]);
    assert!(h.receive("l", 1).is_empty());
    h.produce_n(2);
    assert_eq!(pending(&h), vec![7, 2, 5, 4, 1]);
    assert_eq!(offsets(&h.receive("l", 5)), vec![5, 6]);
    assert_eq!(offsets(&h.receive("f", 5)), vec![6]);
}

#[test]
fn a_message_no_group_owes_is_kept_until_retention() {
    let mut h = H::new(PartitionConfig {
        max_messages: 4,
        ..Default::default()
    });
    h.produce_n(2);
    h.group_at("l", shared(), StartAt::Latest);
    h.produce_n(1);
    let d = h.receive("l", 5);
    h.ack_all("l", &d);
    assert_eq!(h.last_removed, vec![2]);
    // 0 and 1 were never owed: kept for a later Earliest group...
    assert_eq!(h.s.depth(), 2);
    h.group_at("e", shared(), StartAt::Earliest);
    assert_eq!(offsets(&h.receive("e", 5)), vec![0, 1]);
    // ...and still subject to retention.
    h.produce_n(3);
    assert_eq!(h.last_removed, vec![0]);
}

#[test]
fn create_group_is_idempotent_and_updates_config() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce_n(3);
    let d = h.receive("g", 1);
    assert_eq!(
        h.group_at("g", shared(), StartAt::Latest),
        Outcome::GroupCreated { created: false }
    );
    // Progress kept: `start` is ignored for an existing group.
    assert_eq!(offsets(&h.receive("g", 1)), vec![1]);
    let longer = GroupConfig {
        visibility_timeout_ms: 60_000,
        ..shared()
    };
    assert_eq!(
        h.group_at("g", longer.clone(), StartAt::Earliest),
        Outcome::GroupCreated { created: false }
    );
    assert_eq!(h.s.groups().collect::<Vec<_>>(), vec![("g", &longer)]);
    // Existing leases keep their deadline; new ones get the new timeout.
    let d2 = h.receive("g", 1);
    h.advance(VIS);
    h.tick();
    assert_eq!(h.stats("g").in_flight, 1);
    assert_eq!(h.ack("g", &receipts(&d)), vec![Ok(())]);
    assert_eq!(h.extend("g", &receipts(&d2), 1), vec![Ok(())]);
}

#[test]
fn delete_group_releases_what_it_owed() {
    let mut h = H::default();
    h.group("a", shared());
    h.group("b", shared());
    h.produce_n(3);
    let d = h.receive("a", 1);
    h.ack_all("a", &d);
    let b = h.receive("b", 1);
    assert_eq!(
        h.run(Command::DeleteGroup {
            now_ms: h.now,
            group: "b".into()
        }),
        Outcome::GroupDeleted { existed: true }
    );
    // Offset 0 was owed (leased) by b alone.
    assert_eq!(h.last_removed, vec![0]);
    let gone = h.run(Command::Ack {
        now_ms: h.now,
        group: "b".into(),
        receipts: receipts(&b),
    });
    assert_eq!(gone, Outcome::Error(group_not_found("b")));
    // Deleting the last group keeps everything.
    h.run(Command::DeleteGroup {
        now_ms: h.now,
        group: "a".into(),
    });
    assert!(h.last_removed.is_empty());
    assert_eq!(h.s.depth(), 2);
    h.group("c", shared());
    assert_eq!(offsets(&h.receive("c", 5)), vec![1, 2]);
}

#[test]
fn reset_replays_from_a_position() {
    let mut h = H::default();
    h.group("a", shared());
    h.group("b", shared());
    h.produce_n(3);
    h.advance(1_000);
    h.produce_n(2);
    let d = h.receive("a", 10);
    h.ack_all("a", &d[..3]);
    h.nack("a", &[d[3].receipt], None, None);
    assert_eq!(h.stats("a").pending, 2);
    // Replay everything still retained (b keeps it all).
    assert_eq!(h.reset("a", StartAt::Earliest), 0);
    assert_eq!(h.stats("a").pending, 5);
    assert_eq!(h.stats("a").in_flight, 0);
    // Forgotten: old receipts are unknown, attempts start over.
    assert_eq!(h.ack("a", &[d[4].receipt]), vec![not_found(4)]);
    let again = h.receive("a", 10);
    assert_eq!(offsets(&again), vec![0, 1, 2, 3, 4]);
    assert!(again.iter().all(|d| d.attempt == 1));
    assert_eq!(h.reset("a", StartAt::Time(T0 + 1_000)), 3);
    assert_eq!(h.stats("a").pending, 2);
    assert!(h.last_removed.is_empty(), "b still owes them");
    // b skips to the end: what only b still owed goes.
    assert_eq!(h.reset("b", StartAt::Latest), 5);
    assert_eq!(h.last_removed, vec![0, 1, 2]);
    assert_eq!(h.reset("a", StartAt::Offset(4)), 4);
    assert_eq!(h.last_removed, vec![3]);
    assert_eq!(offsets(&h.receive("a", 10)), vec![4]);
}

#[test]
fn purge_removes_everything_and_offsets_keep_growing() {
    let mut h = H::default();
    h.group("g", shared());
    h.produce(vec![sized(5), sized(6), sized(7)]);
    let d = h.receive("g", 1);
    assert_eq!(
        h.run(Command::Purge { now_ms: h.now }),
        Outcome::Purged { count: 3 }
    );
    assert_eq!(h.last_removed, vec![0, 1, 2]);
    assert_eq!((h.s.depth(), h.s.bytes()), (0, 0));
    let stats = h.stats("g");
    assert_eq!((stats.pending, stats.in_flight), (0, 0));
    assert_eq!(h.ack("g", &receipts(&d)), vec![not_found(0)]);
    assert_eq!(h.produce_n(1), vec![3]);
    assert_eq!(offsets(&h.receive("g", 5)), vec![3]);
}

// --- views ----------------------------------------------------------------------

#[test]
fn stats_wake_and_deliverable() {
    let mut h = H::default();
    assert!(!h.s.has_deliverable("g"));
    assert_eq!(h.s.next_wake_ms(), None);
    h.group("g", shared());
    assert!(!h.s.has_deliverable("g"));
    h.produce_n(4);
    assert!(h.s.has_deliverable("g"));
    let a = h.receive_as("g", "zed", 1);
    h.advance(100);
    let b = h.receive_as("g", "amy", 2);
    h.nack("g", &[b[1].receipt], Some(50), None);
    let stats = h.stats("g");
    assert_eq!(
        stats,
        GroupStats {
            pending: 4,
            in_flight: 2,
            dead_pending: 0,
            lag: 4,
            consumers: vec!["amy".into(), "zed".into()],
        }
    );
    assert_eq!(h.s.next_wake_ms(), Some(T0 + 150));
    h.ack_all("g", &a);
    assert_eq!(h.stats("g").pending, 3);
    let rest = h.receive("g", 5);
    assert_eq!(offsets(&rest), vec![3]);
    assert!(!h.s.has_deliverable("g"));
    h.advance(50);
    h.tick();
    assert!(h.s.has_deliverable("g"));
}

// --- snapshots ----------------------------------------------------------------------

#[test]
fn snapshot_roundtrip_mid_stream() {
    let mut h = H::new(PartitionConfig {
        max_messages: 1_000,
        dedup_window_ms: 10_000,
        ..Default::default()
    });
    h.group(
        "s",
        GroupConfig {
            max_attempts: 2,
            backoff_jitter_pct: 30,
            ..shared()
        },
    );
    h.group("o", ordered());
    let mut batch = vec![prio(3), prio(9), with_id("x"), with_id("y")];
    batch.extend((0..600).map(|i| prio((i % 10) as u8)));
    h.produce(batch);
    let s = h.receive("s", 20);
    h.nack("s", &receipts(&s[..3]), None, Some("later")); // delayed
    h.nack("s", &receipts(&s[3..5]), Some(0), None); // ready
    let again = h.receive("s", 1);
    h.nack("s", &receipts(&again), None, Some("dead")); // dead (2 attempts)
    h.ack_all("s", &s[6..10]);
    let o = h.receive("o", 1);
    h.reset("o", StartAt::Offset(2));
    h.receive("o", 1);
    h.advance(500);
    h.tick();
    assert!(!h.s.pending_dead_letters().is_empty());
    let idx = &h.s.groups["s"].idx;
    assert!(!idx.delayed.is_empty() && !idx.ready.is_empty() && !idx.leases.is_empty());

    let restored = roundtrip(&h.s);
    assert_eq!(restored, h.s);
    restored.check_invariants().unwrap();
    assert_eq!(roundtrip_postcard(&h.s), h.s);

    // Both copies go on identically.
    let mut twin = restored;
    let next = [
        Command::Receive {
            now_ms: h.now,
            group: "s".into(),
            consumer: "c".into(),
            max: 50,
            lease_id: 9_999,
        },
        Command::Ack {
            now_ms: h.now + 1,
            group: "o".into(),
            receipts: receipts(&o),
        },
        Command::Tick {
            now_ms: h.now + 60_000,
        },
        Command::Produce {
            now_ms: h.now + 60_001,
            messages: vec![with_id("x"), msg()],
        },
    ];
    for cmd in next {
        let mine = h.s.apply(cmd.clone());
        let theirs = twin.apply(cmd);
        assert_eq!(mine, theirs);
    }
    assert_eq!(twin, h.s);
}

#[test]
fn corrupt_snapshots_are_refused() {
    let mut s = PartitionState::new(PartitionConfig::default());
    s.apply(Command::Produce {
        now_ms: 1,
        messages: vec![msg(), msg()],
    });
    let json = serde_json::to_string(&s).unwrap();
    let twice = json.replace("\"offset\":1,", "\"offset\":0,");
    assert!(serde_json::from_str::<PartitionState>(&twice).is_err());
}

// --- randomized model test ------------------------------------------------------------

/// xorshift64*: a tiny deterministic PRNG for the model test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Runs `steps` random commands; returns the final state and a digest of
/// every outcome (to compare runs).
fn random_run(seed: u64, steps: usize) -> (PartitionState, Vec<(Outcome, Vec<u64>)>) {
    let mut rng = Rng(seed);
    let mut h = H::new(PartitionConfig {
        max_messages: 150,
        max_bytes: 25_000,
        max_age_ms: 60_000,
        max_depth: 130,
        max_message_bytes: 400,
        dedup_window_ms: 5_000,
    });
    let names = ["a", "b", "c"];
    let config = |name: &str, rng: &mut Rng| GroupConfig {
        mode: if name == "b" {
            GroupMode::Ordered
        } else {
            GroupMode::Shared
        },
        visibility_timeout_ms: 1_000 + rng.below(15_000),
        max_attempts: rng.below(4) as u32,
        backoff_base_ms: 100,
        backoff_cap_ms: 1_000,
        backoff_jitter_pct: rng.below(101) as u32,
    };
    // Receipts handed out, per group (some go stale: that is the point).
    let mut held: BTreeMap<&str, Vec<Receipt>> = BTreeMap::new();
    // The latest snapshot capture and the state's bytes when it was taken:
    // it must keep serializing to them while the next 500 commands (acks,
    // produces with ids, purges, ...) change the state it shares with.
    let mut captured: Option<(PartitionCapture, (Vec<u8>, String))> = None;
    let mut log = Vec::new();
    for step in 0..steps {
        h.advance(rng.below(150));
        let group = names[rng.below(3) as usize];
        let now = h.now;
        let pick = rng.below(100);
        let cmd = match pick {
            0..=24 => Command::Produce {
                now_ms: now,
                messages: (0..1 + rng.below(4))
                    .map(|_| NewMessage {
                        id: rng.chance(30).then(|| format!("id{}", rng.below(40))),
                        priority: rng.below(10) as u8,
                        size: rng.below(405),
                        ..Default::default()
                    })
                    .collect(),
            },
            25..=29 => Command::CreateGroup {
                now_ms: now,
                group: group.into(),
                config: config(group, &mut rng),
                start: match rng.below(4) {
                    0 => StartAt::Earliest,
                    1 => StartAt::Latest,
                    2 => StartAt::Offset(h.s.next_offset().saturating_sub(rng.below(50))),
                    _ => StartAt::Time(now.saturating_sub(rng.below(20_000))),
                },
            },
            30 if rng.chance(50) => Command::DeleteGroup {
                now_ms: now,
                group: group.into(),
            },
            31..=52 => Command::Receive {
                now_ms: now,
                group: group.into(),
                consumer: format!("c{}", rng.below(3)),
                max: 1 + rng.below(5) as u32,
                lease_id: 1_000_000 + step as u64,
            },
            53..=87 => {
                let pool = held.entry(group).or_default();
                let mut chosen = Vec::new();
                for _ in 0..rng.below(4) {
                    if !pool.is_empty() && rng.chance(90) {
                        let i = rng.below(pool.len() as u64) as usize;
                        chosen.push(pool.swap_remove(i));
                    } else if rng.chance(15) {
                        chosen.push(Receipt {
                            offset: rng.below(h.s.next_offset() + 1),
                            lease_id: rng.below(1_000),
                        });
                    }
                }
                match pick {
                    53..=74 => Command::Ack {
                        now_ms: now,
                        group: group.into(),
                        receipts: chosen,
                    },
                    75..=82 => Command::Nack {
                        now_ms: now,
                        group: group.into(),
                        receipts: chosen,
                        delay_ms: rng.chance(50).then(|| rng.below(1_000)),
                        error: rng.chance(50).then(|| "err".to_owned()),
                    },
                    _ => {
                        // Keep extended receipts usable.
                        pool.extend(chosen.iter().copied());
                        Command::ExtendLease {
                            now_ms: now,
                            group: group.into(),
                            receipts: chosen,
                            visibility_ms: rng.below(3_000),
                        }
                    }
                }
            }
            88..=91 => Command::Tick {
                now_ms: now + rng.below(3_000),
            },
            92..=95 => {
                let mut offsets: Vec<u64> =
                    h.s.pending_dead_letters()
                        .into_iter()
                        .filter(|d| d.group == group)
                        .map(|d| d.offset)
                        .collect();
                offsets.push(rng.below(h.s.next_offset() + 1));
                Command::DeadLettered {
                    now_ms: now,
                    group: group.into(),
                    offsets,
                }
            }
            96 => Command::Reset {
                now_ms: now,
                group: group.into(),
                to: match rng.below(3) {
                    0 => StartAt::Earliest,
                    1 => StartAt::Latest,
                    _ => StartAt::Offset(h.s.next_offset().saturating_sub(rng.below(30))),
                },
            },
            98 if rng.chance(20) => Command::Purge { now_ms: now },
            _ => Command::Tick { now_ms: now },
        };
        let receive_group = match &cmd {
            Command::Receive { group, .. } => Some(group.clone()),
            _ => None,
        };
        let outcome = h.run(cmd);
        if let (Some(g), Outcome::Received(deliveries)) = (receive_group, &outcome) {
            let group = &h.s.groups[&g];
            if group.config.mode == GroupMode::Ordered {
                // One in flight, and nothing unfinished before it but dead
                // letters: order holds.
                assert!(deliveries.len() <= 1);
                assert!(group.idx.leases.len() <= 1);
                if let Some(d) = deliveries.first() {
                    assert!(group
                        .entries
                        .range(..d.offset)
                        .all(|(_, e)| e.state == EntryState::Dead));
                    if let Some((fresh, _)) = group.first_fresh_by_offset(&h.s.messages) {
                        assert!(fresh > d.offset);
                    }
                }
            }
            let name = names.iter().find(|n| **n == g).unwrap();
            held.entry(name)
                .or_default()
                .extend(deliveries.iter().map(|d| d.receipt));
        }
        if step % 500 == 0 {
            assert_eq!(roundtrip(&h.s), h.s, "snapshot at step {step}");
            assert_eq!(roundtrip_postcard(&h.s), h.s, "snapshot at step {step}");
            let capture = h.s.capture();
            let bytes = state_bytes(&h.s);
            assert_eq!(capture_bytes(&capture), bytes, "capture at step {step}");
            if let Some((old, then)) = captured.replace((capture, bytes)) {
                assert_eq!(capture_bytes(&old), then, "capture before step {step}");
            }
        }
        log.push((outcome, h.last_removed.clone()));
    }
    // Every offset ever stored is removed exactly once by the end.
    h.run(Command::Purge { now_ms: h.now });
    assert_eq!(h.stored, h.removed);
    if let Some((old, then)) = captured {
        assert_eq!(capture_bytes(&old), then, "capture before the purge");
    }
    (h.s, log)
}

#[test]
fn random_commands_keep_every_invariant() {
    for seed in [1, 7, 42, 2024] {
        let (state, log) = random_run(seed, 3_000);
        // Something did happen: deliveries, dead letters, removals.
        let delivered: usize = log
            .iter()
            .map(|(o, _)| match o {
                Outcome::Received(d) => d.len(),
                _ => 0,
            })
            .sum();
        let removed: usize = log.iter().map(|(_, r)| r.len()).sum();
        assert!(delivered > 500, "seed {seed}: {delivered} deliveries");
        assert!(removed > 500, "seed {seed}: {removed} removals");
        assert!(
            log.iter()
                .any(|(o, _)| matches!(o, Outcome::DeadLettersFinalized { count } if *count > 0)),
            "seed {seed}: no dead letters"
        );
        assert_eq!(state.depth(), 0);
    }
}

#[test]
fn replicas_applying_the_same_commands_agree() {
    let (a, log_a) = random_run(99, 1_500);
    let (b, log_b) = random_run(99, 1_500);
    assert_eq!(a, b);
    assert_eq!(log_a, log_b);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
}

// --- snapshot captures ------------------------------------------------------------

/// The commands of [`a_capture_stays_as_taken_while_the_state_goes_on`],
/// optionally with a capture alive from the middle on: the capture must
/// keep serializing to the bytes the state had then, restore to the state
/// as it was then, and make no difference to the state or its outcomes.
/// Returns the state before the final purge and the removals.
fn capture_scenario(capture_alive: bool) -> (PartitionState, BTreeSet<u64>) {
    let mut h = H::new(PartitionConfig {
        dedup_window_ms: 10_000,
        ..Default::default()
    });
    h.group(
        "s",
        GroupConfig {
            max_attempts: 2,
            ..shared()
        },
    );
    // Owes only the tail, so acks in "s" remove messages.
    h.group_at("o", ordered(), StartAt::Offset(900));
    // Four chunks; a third of the messages with ids.
    h.produce(
        (0..1_000)
            .map(|i| NewMessage {
                id: (i % 3 == 0).then(|| format!("m{i}")),
                ..prio((i % 10) as u8)
            })
            .collect(),
    );
    let s = h.receive("s", 300);
    h.nack("s", &receipts(&s[..10]), None, Some("later"));
    let o = h.receive("o", 1);

    let then = h.s.clone();
    let taken = capture_alive.then(|| (h.s.capture(), state_bytes(&h.s)));
    if let Some((capture, bytes)) = &taken {
        assert_eq!(&capture_bytes(capture), bytes);
    }

    // Acks across every chunk (priority 9 first: offsets 9, 19, ...).
    h.ack_all("s", &s[10..]);
    h.ack_all("o", &o);
    // The tail chunk, new chunks, and most dedup shards.
    h.produce((0..300).map(|i| with_id(&format!("n{i}"))).collect());
    // The nacked ones come back, fail again, die, are dead-lettered.
    h.advance(VIS);
    let retried = h.receive("s", 10);
    assert_eq!(offsets(&retried), offsets(&s[..10]));
    h.nack("s", &receipts(&retried), None, None);
    assert_eq!(h.s.pending_dead_letters().len(), 10);
    assert_eq!(h.dead_lettered("s", &offsets(&retried)), 10);
    h.reset("o", StartAt::Latest);
    // Leases expire, the dedup window rotates (twice).
    h.advance(15_000);
    h.tick();
    h.produce(vec![with_id("m0"), with_id("n0"), msg()]);
    h.advance(15_000);
    h.tick();
    h.produce(vec![with_id("n1"), msg()]);
    let before_purge = h.s.clone();
    if let Some((capture, bytes)) = &taken {
        assert_eq!(&capture_bytes(capture), bytes);
    }
    h.run(Command::Purge { now_ms: h.now });
    assert_eq!(h.s.depth(), 0);

    if let Some((capture, bytes)) = taken {
        assert_eq!(capture_bytes(&capture), bytes);
        let restored: PartitionState = postcard::from_bytes(&bytes.0).unwrap();
        restored.check_invariants().unwrap();
        assert_eq!(restored, then);
        assert_eq!(
            serde_json::from_str::<PartitionState>(&bytes.1).unwrap(),
            then
        );
    }
    (before_purge, h.removed)
}

#[test]
fn a_capture_stays_as_taken_while_the_state_goes_on() {
    // The harness checks every invariant after every command; and the
    // state does not notice whether a capture shares its chunks.
    let with = capture_scenario(true);
    let without = capture_scenario(false);
    assert_eq!(with, without);
}

#[test]
fn a_capture_serializes_as_the_state() {
    // Also checked along every random run (`random_run`); here the edge
    // cases: empty, no groups, and a group of each kind on one message.
    let mut s = PartitionState::new(PartitionConfig::default());
    assert_eq!(capture_bytes(&s.capture()), state_bytes(&s));
    s.apply(Command::Produce {
        now_ms: 5,
        messages: vec![with_id("a")],
    });
    assert_eq!(capture_bytes(&s.capture()), state_bytes(&s));
    for (name, config) in [("x", shared()), ("y", ordered())] {
        s.apply(Command::CreateGroup {
            now_ms: 6,
            group: name.into(),
            config,
            start: StartAt::Earliest,
        });
    }
    s.apply(Command::Receive {
        now_ms: 7,
        group: "y".into(),
        consumer: "c".into(),
        max: 1,
        lease_id: 3,
    });
    assert_eq!(capture_bytes(&s.capture()), state_bytes(&s));
}

/// The dedup generations are sharded in memory but serialize, byte for
/// byte, as the two plain maps they used to be (so snapshots written
/// before and after the change are the same and read the same).
#[test]
fn dedup_serializes_as_two_plain_maps() {
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    #[serde(rename = "Dedup")]
    struct PlainDedup {
        current: BTreeMap<String, Seen>,
        previous: BTreeMap<String, Seen>,
        current_since_ms: u64,
    }
    let mut rng = Rng(5);
    let mut dedup = Dedup::default();
    let mut plain = PlainDedup {
        current: BTreeMap::new(),
        previous: BTreeMap::new(),
        current_since_ms: 0,
    };
    let check = |dedup: &Dedup, plain: &PlainDedup| {
        assert_eq!(
            postcard::to_allocvec(dedup).unwrap(),
            postcard::to_allocvec(plain).unwrap()
        );
        let json = serde_json::to_string(plain).unwrap();
        assert_eq!(serde_json::to_string(dedup).unwrap(), json);
        assert_eq!(&serde_json::from_str::<Dedup>(&json).unwrap(), dedup);
        let back: PlainDedup =
            postcard::from_bytes(&postcard::to_allocvec(dedup).unwrap()).unwrap();
        assert_eq!(&back, plain);
    };
    check(&dedup, &plain);
    for now in 1..3_000u64 {
        // Ids of every length and shared prefixes ("a" < "a\0" < "ab"),
        // and non-ASCII, so the merge order is byte order.
        let alphabet = ["a", "b", "\0", "é", "zz", "9"];
        let id: String = (0..rng.below(6))
            .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
            .collect();
        if !id.is_empty() && dedup.lookup(&id, now, 400).is_none() {
            dedup.record(id.clone(), now, now);
            plain.current.insert(
                id,
                Seen {
                    offset: now,
                    at_ms: now,
                },
            );
        }
        dedup.rotate(now, 400);
        if plain.current_since_ms != dedup.current_since_ms {
            plain.previous = if now >= plain.current_since_ms + 800 {
                BTreeMap::new()
            } else {
                std::mem::take(&mut plain.current)
            };
            plain.current.clear();
            plain.current_since_ms = dedup.current_since_ms;
        }
        if now % 97 == 0 {
            check(&dedup, &plain);
        }
    }
    assert!(dedup.len() > 50);
    check(&dedup, &plain);
}

/// Offsets of the state's chunks that the capture does not share (copied
/// since, or new).
fn unshared_chunks(s: &PartitionState, c: &PartitionCapture) -> Vec<u64> {
    let held: BTreeSet<*const Chunk> = c.messages.chunks.iter().map(Arc::as_ptr).collect();
    s.messages
        .chunks
        .iter()
        .filter(|(_, chunk)| !held.contains(&Arc::as_ptr(chunk)))
        .map(|(&key, _)| key)
        .collect()
}

/// Dedup shards of the state that the capture does not share.
fn unshared_shards(s: &Dedup, c: &Dedup) -> usize {
    let pairs = s.current.shards.iter().zip(&c.current.shards);
    let pairs = pairs.chain(s.previous.shards.iter().zip(&c.previous.shards));
    pairs.filter(|(a, b)| !Arc::ptr_eq(a, b)).count()
}

/// What a capture costs, counted rather than timed: it shares the store's
/// chunks (one `Arc` per 256 offsets) and the dedup shards instead of
/// copying any message or id, and copies the groups' entries only. After
/// it, each chunk or shard the state changes is copied once; once the
/// capture is dropped, nothing is.
#[test]
fn a_capture_shares_chunks_and_copies_on_write() {
    const N: u64 = 200_000;
    let mut h = H::new(PartitionConfig {
        max_message_bytes: 0,
        dedup_window_ms: 60_000,
        ..Default::default()
    });
    h.check = false;
    h.group("s", shared());
    for batch in 0..N / 1_000 {
        h.produce(
            (0..1_000)
                .map(|i| NewMessage {
                    id: (i % 7 == 0).then(|| format!("m{batch}-{i}")),
                    priority: (i % 3) as u8,
                    size: 100,
                    ..Default::default()
                })
                .collect(),
        );
    }
    let delivered = h.receive("s", 100);
    let chunks = N.div_ceil(CHUNK as u64) as usize;
    assert_eq!(h.s.messages.chunks.len(), chunks);

    let capture = h.s.capture();
    let bytes = postcard::to_allocvec(&h.s).unwrap();
    // O(chunks): the same chunks, each now held by both.
    assert_eq!(capture.messages.chunks.len(), chunks);
    assert_eq!(unshared_chunks(&h.s, &capture), Vec::<u64>::new());
    assert!(h
        .s
        .messages
        .chunks
        .values()
        .all(|c| Arc::strong_count(c) == 2));
    assert_eq!(unshared_shards(&h.s.dedup, &capture.dedup), 0);
    // O(entries) for groups: the 100 in flight, not the 200,000 behind.
    assert_eq!(capture.groups["s"].entries.len(), 100);

    // Acking the 100 (priority 2: offsets 2, 5, ..., 299) copies the two
    // chunks they were in; a produce copies the (partial) tail chunk, and
    // its id the one dedup shard it goes to.
    h.ack_all("s", &delivered);
    h.produce(vec![with_id("new")]);
    assert_eq!(
        unshared_chunks(&h.s, &capture),
        vec![0, 1, N / CHUNK as u64]
    );
    assert_eq!(unshared_shards(&h.s.dedup, &capture.dedup), 1);
    // More changes to the same chunks and shard copy nothing more.
    let delivered = h.receive("s", 10);
    h.ack_all("s", &delivered);
    h.produce(vec![with_id("new"), msg()]);
    assert_eq!(
        unshared_chunks(&h.s, &capture),
        vec![0, 1, N / CHUNK as u64]
    );
    assert_eq!(unshared_shards(&h.s.dedup, &capture.dedup), 1);
    assert_eq!(postcard::to_allocvec(&capture).unwrap(), bytes);

    // With the capture gone, changes are made in place again.
    drop(capture);
    let chunk_ptrs = |s: &PartitionState| -> Vec<*const Chunk> {
        s.messages.chunks.values().map(Arc::as_ptr).collect()
    };
    let shard_ptrs = |s: &PartitionState| -> Vec<*const BTreeMap<String, Seen>> {
        s.dedup.current.shards.iter().map(Arc::as_ptr).collect()
    };
    let (chunks_before, shards_before) = (chunk_ptrs(&h.s), shard_ptrs(&h.s));
    let delivered = h.receive("s", 10);
    h.ack_all("s", &delivered);
    h.produce((0..100).map(|i| with_id(&format!("after{i}"))).collect());
    assert_eq!(chunk_ptrs(&h.s), chunks_before);
    assert_eq!(shard_ptrs(&h.s), shards_before);
    h.s.check_invariants().unwrap();
}

/// Not a test: prints how long a capture takes next to a full serialize,
/// for a 1M-message state. Run with
/// `cargo test --release -p queue-svc --lib capture_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn capture_cost() {
    use std::time::Instant;
    const N: u64 = 1_000_000;
    let mut s = PartitionState::new(PartitionConfig {
        max_message_bytes: 0,
        dedup_window_ms: 600_000,
        ..Default::default()
    });
    s.apply(Command::CreateGroup {
        now_ms: 1,
        group: "s".into(),
        config: shared(),
        start: StartAt::Earliest,
    });
    for batch in 0..N / 1_000 {
        s.apply(Command::Produce {
            now_ms: 2 + batch,
            messages: (0..1_000)
                .map(|i| NewMessage {
                    // Every message with an id: the worst case for dedup.
                    id: Some(format!("m{batch}-{i}")),
                    priority: (i % 3) as u8,
                    size: 100,
                    ..Default::default()
                })
                .collect(),
        });
    }
    s.apply(Command::Receive {
        now_ms: 5_000,
        group: "s".into(),
        consumer: "c".into(),
        max: 1_000,
        lease_id: 1,
    });
    let now = s.now_ms();
    let produce = |s: &mut PartitionState, id: &str| {
        let t = Instant::now();
        s.apply(Command::Produce {
            now_ms: now,
            messages: vec![with_id(id)],
        });
        t.elapsed()
    };
    println!("depth {}, dedup ids {}", s.depth(), s.dedup_ids());
    for round in 0..3 {
        let t = Instant::now();
        let capture = s.capture();
        let took_capture = t.elapsed();
        let first = produce(&mut s, &format!("x{round}"));
        let second = produce(&mut s, &format!("y{round}"));
        let t = Instant::now();
        let bytes = postcard::to_allocvec(&capture).unwrap();
        let took_encode_capture = t.elapsed();
        drop(capture);
        let t = Instant::now();
        let state_bytes = postcard::to_allocvec(&s).unwrap();
        let took_encode_state = t.elapsed();
        let unshared = produce(&mut s, &format!("z{round}"));
        println!(
            "capture {took_capture:?}; produces after it {first:?}, {second:?} \
             (without a capture {unshared:?}); serialize: capture {took_encode_capture:?}, \
             state {took_encode_state:?} ({} bytes)",
            bytes.len().max(state_bytes.len())
        );
    }
}

// --- scale ------------------------------------------------------------------------

/// 200,000 messages through a backlog: each operation must cost O(log n),
/// or this takes minutes instead of a second or two.
#[test]
fn large_backlog_stays_fast() {
    const N: u64 = 200_000;
    let mut h = H::new(PartitionConfig {
        max_message_bytes: 0,
        dedup_window_ms: 1_000,
        ..Default::default()
    });
    h.check = false;
    h.group("s", shared());
    h.group("o", ordered());
    for batch in 0..N / 1_000 {
        let messages = (0..1_000)
            .map(|i| NewMessage {
                id: (i % 7 == 0).then(|| format!("m{batch}-{i}")),
                priority: (i % 3) as u8,
                size: 100,
                ..Default::default()
            })
            .collect();
        h.produce(messages);
        h.advance(1);
    }
    assert_eq!(h.s.depth(), N);
    // The shared group drains the whole backlog, highest priority first.
    let mut seen = 0;
    let mut last_priority = MAX_PRIORITY;
    while seen < N {
        let d = h.receive("s", 500);
        assert!(!d.is_empty());
        assert!(d[0].meta.priority <= last_priority);
        last_priority = d.last().unwrap().meta.priority;
        seen += d.len() as u64;
        h.ack_all("s", &d);
        h.advance(1);
    }
    assert_eq!(h.stats("s").pending, 0);
    assert_eq!(h.s.depth(), N, "the ordered group still owes everything");
    // The ordered group consumes one at a time, in offset order.
    for offset in 0..N {
        let d = h.receive("o", 10);
        assert_eq!(d[0].offset, offset);
        h.ack_all("o", &d);
    }
    assert_eq!(h.s.depth(), 0);
    assert_eq!(h.removed.len() as u64, N);
    h.s.check_invariants().unwrap();
}
