//! Session leases in the leader's memory.
//!
//! A keep-alive changes nothing anyone else needs to know until the
//! session would otherwise expire, so it is not a Raft command: the leader
//! answers it from memory (after a quorum confirmed it still leads) and
//! proposes `ExpireSessions` only for sessions whose TTL really passed.
//!
//! Why no session expires while its client was told it is alive (the full
//! argument is in ARCHITECTURE.md, "Session leases"):
//! - Only the leader of term T renews, and only after a read index issued
//!   after the keep-alive arrived was confirmed by a quorum in T: when that
//!   quorum answered, none of them had voted in a later term, so the
//!   keep-alive arrived before any later leader was elected.
//! - A leader's deadlines are valid for its term alone ([`Lessor::term`]).
//!   It starts keeping them only once it has applied everything committed
//!   before its term (its first read index), and then gives every session
//!   a fresh TTL from that moment — later than any keep-alive an earlier
//!   leader answered, so no earlier renewal is cut short.
//! - A session whose deadline passed is marked expiring before its
//!   `ExpireSessions` is proposed; a keep-alive for it answers
//!   SESSION_EXPIRED from then on, so no client is told "alive" about a
//!   session an expiry in flight may end.
//!
//! Deadlines use this process's monotonic clock, so wall-clock steps on the
//! leader change nothing; the argument assumes clock *rates* agree within
//! the margin clients keep (they renew every TTL / 3).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The admin Status feature saying a build leases sessions in memory; a
/// leader enables leases (`EnableLeases`) once every member reports it.
pub const FEATURE: &str = "lock.leases-in-memory";

/// Most sessions one `ExpireSessions` command carries.
pub const EXPIRE_BATCH: usize = 1_000;

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the session's TTL.
    Renewed(Duration),
    /// Its deadline passed and its expiry is proposed (not yet known to
    /// have committed).
    Expiring,
    /// Not a session this leader keeps (closed, expired, never opened).
    Unknown,
    /// This replica keeps no leases for that term (not, or no longer,
    /// the leader that confirmed it).
    NotLeading,
}

#[derive(Default)]
struct Inner {
    /// The term these leases belong to; 0 when this replica keeps none.
    term: u64,
    /// The highest term leases were ever kept for: never again a lower one
    /// (a handler confirmed in an old term may resume late).
    max_term: u64,
    /// Session → (deadline, TTL).
    deadlines: HashMap<u64, (Instant, Duration)>,
    /// The same, ordered by deadline.
    by_deadline: BTreeSet<(Instant, u64)>,
    /// Sessions whose expiry was decided: never renewed again this term.
    expiring: HashSet<u64>,
    /// Expiring sessions whose `ExpireSessions` must be proposed again.
    again: BTreeSet<u64>,
}

impl Inner {
    fn set(&mut self, id: u64, deadline: Instant, ttl: Duration) {
        if let Some((old, _)) = self.deadlines.insert(id, (deadline, ttl)) {
            self.by_deadline.remove(&(old, id));
        }
        self.by_deadline.insert((deadline, id));
    }

    fn unset(&mut self, id: u64) {
        if let Some((old, _)) = self.deadlines.remove(&id) {
            self.by_deadline.remove(&(old, id));
        }
    }
}

/// The leader's session leases (empty and inactive on followers).
#[derive(Default)]
pub struct Lessor {
    inner: Mutex<Inner>,
}

impl Lessor {
    /// The term the leases are kept for (0: none kept).
    pub fn term(&self) -> u64 {
        self.inner.lock().term
    }

    /// Starts keeping leases for `term`, giving each of `sessions`
    /// (id, TTL ms) its whole TTL from now. The caller has applied every
    /// entry committed before `term` and holds the lock table so no
    /// session opens or ends meanwhile. A no-op when already keeping them
    /// for `term`; refused (false) for a term older than one kept before.
    pub fn activate(&self, term: u64, sessions: impl Iterator<Item = (u64, u64)>) -> bool {
        let mut l = self.inner.lock();
        if l.term == term {
            return true;
        }
        if term < l.max_term {
            return false;
        }
        let now = Instant::now();
        *l = Inner {
            term,
            max_term: term,
            ..Default::default()
        };
        for (id, ttl) in sessions {
            let ttl = Duration::from_millis(ttl);
            l.set(id, now + ttl, ttl);
        }
        true
    }

    /// Stops keeping leases (this replica no longer leads).
    pub fn deactivate(&self) {
        let mut l = self.inner.lock();
        if l.term != 0 {
            let max_term = l.max_term;
            *l = Inner {
                max_term,
                ..Default::default()
            };
        }
    }

    /// A session was opened (applied), or an OpenSession retry answered
    /// it: its lease starts now — unless its expiry is already decided
    /// (the OpenSession handler then waits that out and opens anew).
    /// Called with the lock table held, so it orders with
    /// [`activate`](Self::activate).
    pub fn opened(&self, id: u64, ttl_ms: u64) {
        let mut l = self.inner.lock();
        if l.term != 0 && !l.expiring.contains(&id) {
            let ttl = Duration::from_millis(ttl_ms);
            l.set(id, Instant::now() + ttl, ttl);
        }
    }

    /// A session ended (closed or expired, applied).
    pub fn ended(&self, id: u64) {
        let mut l = self.inner.lock();
        l.unset(id);
        l.expiring.remove(&id);
        l.again.remove(&id);
    }

    /// Renews session `id` for its TTL from `received` (when its
    /// keep-alive arrived), as the leader of `term` whose leadership was
    /// confirmed after that.
    pub fn renew(&self, term: u64, id: u64, received: Instant) -> Renewal {
        let mut l = self.inner.lock();
        if l.term == 0 || l.term != term {
            return Renewal::NotLeading;
        }
        if l.expiring.contains(&id) {
            return Renewal::Expiring;
        }
        match l.deadlines.get(&id).copied() {
            Some((deadline, ttl)) => {
                if received + ttl > deadline {
                    l.set(id, received + ttl, ttl);
                }
                Renewal::Renewed(ttl)
            }
            None => Renewal::Unknown,
        }
    }

    /// Whether session `id`'s expiry is decided (and maybe in flight).
    pub fn is_expiring(&self, id: u64) -> bool {
        self.inner.lock().expiring.contains(&id)
    }

    /// When each of `ids`' leases ends (None: not kept here); one lock.
    pub fn deadlines(&self, ids: impl Iterator<Item = u64>) -> Vec<Option<Instant>> {
        let l = self.inner.lock();
        let now = Instant::now();
        ids.map(|id| {
            if l.expiring.contains(&id) {
                Some(now)
            } else {
                l.deadlines.get(&id).map(|(d, _)| *d)
            }
        })
        .collect()
    }

    /// Sessions of `term` to expire now (at most [`EXPIRE_BATCH`]): those
    /// whose earlier expiry did not commit, then those whose deadline
    /// passed by `now`, which are marked expiring (renewals of them fail
    /// from now on, this term).
    pub fn due(&self, term: u64, now: Instant) -> Vec<u64> {
        let mut l = self.inner.lock();
        if l.term == 0 || l.term != term {
            return Vec::new();
        }
        let mut due: Vec<u64> = std::mem::take(&mut l.again).into_iter().collect();
        while due.len() < EXPIRE_BATCH {
            let Some(&(deadline, id)) = l.by_deadline.first() else {
                break;
            };
            if deadline > now {
                break;
            }
            l.unset(id);
            l.expiring.insert(id);
            due.push(id);
        }
        due
    }

    /// Expiries of `term` that did not commit (the proposal failed while
    /// still leading): proposed again by the next [`due`](Self::due). The
    /// sessions stay expiring: the failed proposal may still commit.
    pub fn retry(&self, term: u64, ids: &[u64]) {
        let mut l = self.inner.lock();
        if l.term != term {
            return;
        }
        for id in ids {
            if l.expiring.contains(id) {
                l.again.insert(*id);
            }
        }
    }

    /// How many leases are kept.
    pub fn len(&self) -> usize {
        let l = self.inner.lock();
        l.deadlines.len() + l.expiring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Lessor {
        fn deadline(&self, id: u64) -> Option<Instant> {
            self.deadlines(std::iter::once(id))[0]
        }
    }

    const T: u64 = 7;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn inactive_lessor_renews_nothing_and_ignores_opens() {
        let l = Lessor::default();
        l.opened(1, 1000);
        assert!(l.is_empty());
        assert_eq!(l.renew(T, 1, Instant::now()), Renewal::NotLeading);
        assert!(l.due(T, Instant::now() + ms(5000)).is_empty());
    }

    #[test]
    fn activation_gives_every_session_a_fresh_ttl() {
        let l = Lessor::default();
        let before = Instant::now();
        l.activate(T, [(1, 1000), (2, 5000)].into_iter());
        assert!(l.deadline(1).unwrap() >= before + ms(1000));
        assert!(l.deadline(2).unwrap() >= before + ms(5000));
        // A second activation for the same term changes nothing.
        l.activate(T, std::iter::empty());
        assert_eq!(l.len(), 2);
        // Another term's renewal is refused.
        assert_eq!(l.renew(T + 1, 1, Instant::now()), Renewal::NotLeading);
    }

    #[test]
    fn renewals_extend_and_never_shorten() {
        let l = Lessor::default();
        l.activate(T, [(1, 1000)].into_iter());
        let d0 = l.deadline(1).unwrap();
        // A keep-alive received earlier than the current deadline allows
        // does not pull the deadline back.
        let old = Instant::now() - ms(900);
        assert_eq!(l.renew(T, 1, old), Renewal::Renewed(ms(1000)));
        assert_eq!(l.deadline(1).unwrap(), d0);
        let later = Instant::now() + ms(300);
        l.renew(T, 1, later);
        assert_eq!(l.deadline(1).unwrap(), later + ms(1000));
        assert_eq!(l.renew(T, 9, later), Renewal::Unknown);
    }

    #[test]
    fn due_sessions_are_expiring_until_they_end_or_are_retried() {
        let l = Lessor::default();
        l.activate(T, [(1, 1000), (2, 3000)].into_iter());
        l.opened(3, 1000);
        let at = Instant::now() + ms(1500);
        assert_eq!(l.due(T, at), vec![1, 3]);
        assert!(l.due(T, at).is_empty(), "marked once");
        assert_eq!(l.renew(T, 1, at), Renewal::Expiring);
        // The expiry of 3 did not commit: proposed again next time, and
        // still expiring meanwhile (the failed proposal may yet commit),
        // even if an OpenSession retry answers it.
        l.retry(T, &[3]);
        l.opened(3, 1000);
        assert_eq!(l.renew(T, 3, at), Renewal::Expiring);
        assert!(l.is_expiring(3));
        assert_eq!(l.due(T, Instant::now()), vec![3]);
        l.ended(1);
        l.ended(3);
        assert_eq!(l.renew(T, 1, at), Renewal::Unknown);
        assert_eq!(l.len(), 1);
        l.deactivate();
        assert_eq!(l.term(), 0);
        assert_eq!(l.renew(T, 2, at), Renewal::NotLeading);
    }

    #[test]
    fn an_older_term_is_never_kept_again() {
        let l = Lessor::default();
        assert!(l.activate(T + 2, [(1, 1000)].into_iter()));
        l.deactivate();
        // A handler confirmed in term T resumes after T + 2 was kept.
        assert!(!l.activate(T, [(1, 1000)].into_iter()));
        assert_eq!(l.renew(T, 1, Instant::now()), Renewal::NotLeading);
        assert!(l.activate(T + 3, [(1, 1000)].into_iter()));
    }

    #[test]
    fn due_takes_the_earliest_deadlines_in_batches() {
        let l = Lessor::default();
        l.activate(T, (1..=2500).map(|id| (id, 1000 + id % 7)));
        let late = Instant::now() + ms(2000);
        let mut all = Vec::new();
        loop {
            let batch = l.due(T, late);
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= EXPIRE_BATCH);
            all.extend(batch);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=2500).collect::<Vec<_>>());
        assert!(l.due(T, late).is_empty());
    }
}
