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

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Most sessions one `ExpireSessions` command carries.
pub const EXPIRE_BATCH: usize = 1_000;

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the session's TTL.
    Renewed(Duration),
    /// Its deadline passed and its expiry is (being) proposed.
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
    /// Session → (deadline, TTL).
    deadlines: HashMap<u64, (Instant, Duration)>,
    /// Sessions whose expiry was proposed.
    expiring: HashSet<u64>,
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
    /// for `term`.
    pub fn activate(&self, term: u64, sessions: impl Iterator<Item = (u64, u64)>) {
        let mut l = self.inner.lock();
        if l.term == term {
            return;
        }
        let now = Instant::now();
        l.term = term;
        l.expiring.clear();
        l.deadlines = sessions
            .map(|(id, ttl)| {
                let ttl = Duration::from_millis(ttl);
                (id, (now + ttl, ttl))
            })
            .collect();
    }

    /// Stops keeping leases (this replica no longer leads).
    pub fn deactivate(&self) {
        let mut l = self.inner.lock();
        if l.term != 0 {
            *l = Inner::default();
        }
    }

    /// A session was opened (applied): its lease starts now. Called with
    /// the lock table held, so it orders with [`activate`](Self::activate).
    pub fn opened(&self, id: u64, ttl_ms: u64) {
        let mut l = self.inner.lock();
        if l.term != 0 {
            let ttl = Duration::from_millis(ttl_ms);
            l.deadlines.insert(id, (Instant::now() + ttl, ttl));
        }
    }

    /// A session ended (closed or expired, applied).
    pub fn ended(&self, id: u64) {
        let mut l = self.inner.lock();
        l.deadlines.remove(&id);
        l.expiring.remove(&id);
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
        match l.deadlines.get_mut(&id) {
            Some((deadline, ttl)) => {
                *deadline = (*deadline).max(received + *ttl);
                Renewal::Renewed(*ttl)
            }
            None => Renewal::Unknown,
        }
    }

    /// When session `id`'s lease ends, if this replica keeps it.
    pub fn deadline(&self, id: u64) -> Option<Instant> {
        let l = self.inner.lock();
        if l.expiring.contains(&id) {
            return Some(Instant::now());
        }
        l.deadlines.get(&id).map(|(d, _)| *d)
    }

    /// Sessions of `term` whose deadline passed by `now` (at most
    /// [`EXPIRE_BATCH`]), marked expiring: renewals of them fail from now.
    pub fn due(&self, term: u64, now: Instant) -> Vec<u64> {
        let mut l = self.inner.lock();
        if l.term == 0 || l.term != term {
            return Vec::new();
        }
        let mut due: Vec<u64> = l
            .deadlines
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(id, _)| *id)
            .take(EXPIRE_BATCH)
            .collect();
        due.sort_unstable();
        for id in &due {
            l.deadlines.remove(id);
            l.expiring.insert(*id);
        }
        due
    }

    /// Sessions in flight to expire whose expiry did not commit (still
    /// leading `term`): they are proposed again at the next check.
    pub fn retry(&self, term: u64, ids: &[u64]) {
        let mut l = self.inner.lock();
        if l.term != term {
            return;
        }
        let now = Instant::now();
        for id in ids {
            if l.expiring.remove(id) {
                l.deadlines.insert(*id, (now, Duration::ZERO));
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
        // The expiry of 3 did not commit: proposed again next time.
        l.retry(T, &[3]);
        assert_eq!(l.due(T, Instant::now()), vec![3]);
        l.ended(1);
        l.ended(3);
        assert_eq!(l.renew(T, 1, at), Renewal::Unknown);
        assert_eq!(l.len(), 1);
        l.deactivate();
        assert_eq!(l.term(), 0);
        assert_eq!(l.renew(T, 2, at), Renewal::NotLeading);
    }
}
