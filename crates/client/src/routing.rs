//! Consistent hashing shared by servers and clients: which partition a
//! message goes to, which replicas hold a partition (queue-svc), and which
//! node is a key's home (cache-svc).
//!
//! Both use a [`hashring::HashRing`] (SipHash-2-4 with zero keys, so the
//! same on every build and platform) with [`VNODES`] virtual nodes per
//! member. Adding a partition or a replica moves only about 1/n of the
//! keys, the point of consistent hashing.

use hashring::HashRing;

/// Virtual nodes per member on every ring.
pub const VNODES: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct VNode {
    member: u64,
    vnode: u32,
}

/// A ring over `members` with [`VNODES`] points each.
fn ring(members: impl IntoIterator<Item = u64>) -> HashRing<VNode> {
    let mut r = HashRing::new();
    for member in members {
        for vnode in 0..VNODES {
            r.add(VNode { member, vnode });
        }
    }
    r
}

/// Maps keys to the partitions of a topic.
pub struct PartitionRing {
    ring: HashRing<VNode>,
    partitions: u32,
}

impl PartitionRing {
    pub fn new(partitions: u32) -> Self {
        Self {
            ring: ring((0..partitions.max(1)).map(u64::from)),
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of a key (or, for a message without a key, of its
    /// message id, so that a retried message meets its first copy's dedup
    /// entry).
    pub fn partition(&self, key: &[u8]) -> u32 {
        self.ring.get(&key).map_or(0, |v| v.member as u32)
    }
}

/// Maps keys to their home among the members of a cache (cache-svc's
/// directory placement; clients may use it to see where a key lives).
pub struct MemberRing {
    ring: HashRing<VNode>,
}

impl MemberRing {
    pub fn new(members: impl IntoIterator<Item = u64>) -> Self {
        Self {
            ring: ring(members),
        }
    }

    /// The home of `key`, or None on an empty ring.
    pub fn home(&self, key: &[u8]) -> Option<u64> {
        self.ring.get(&key).map(|v| v.member)
    }
}

/// `rf` distinct replicas for `item` (e.g. "topic/3") among `members`,
/// walking the ring from the item's point.
pub fn replicas_for(item: &str, members: &[u64], rf: usize) -> Vec<u64> {
    let r = ring(members.iter().copied());
    let mut out: Vec<u64> = Vec::with_capacity(rf);
    let mut probe = 0u32;
    while out.len() < rf.min(members.len()) {
        // Successive probes of the item: each lands on a member, and a
        // member already chosen is skipped.
        if let Some(v) = r.get(&(item, probe)) {
            if !out.contains(&v.member) {
                out.push(v.member);
            }
        }
        probe += 1;
        if probe > 10_000 {
            // Unreachable with VNODES points per member; never loop forever.
            for &m in members {
                if out.len() < rf && !out.contains(&m) {
                    out.push(m);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_partitions_and_stay_put() {
        let ring = PartitionRing::new(8);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[ring.partition(format!("key-{i}").as_bytes()) as usize] += 1;
        }
        for c in counts {
            assert!((500..1500).contains(&c), "uneven: {counts:?}");
        }
        assert_eq!(
            ring.partition(b"order-17"),
            PartitionRing::new(8).partition(b"order-17")
        );
        // Growing to 9 partitions moves about a ninth of the keys.
        let bigger = PartitionRing::new(9);
        let moved = (0..9000)
            .filter(|i| {
                let k = format!("key-{i}");
                ring.partition(k.as_bytes()) != bigger.partition(k.as_bytes())
            })
            .count();
        assert!(moved < 2000, "{moved} of 9000 keys moved");
    }

    #[test]
    fn replicas_are_distinct_and_spread() {
        let members = [1, 2, 3, 4, 5];
        let mut first = [0u32; 6];
        for p in 0..200 {
            let r = replicas_for(&format!("t/{p}"), &members, 3);
            assert_eq!(r.len(), 3);
            let mut d = r.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 3, "{r:?}");
            first[r[0] as usize] += 1;
        }
        assert!(first[1..].iter().all(|&c| c > 10), "{first:?}");
        assert_eq!(replicas_for("x", &[1, 2], 3).len(), 2);
    }
}
