//! Near-cache clients watching one node: the L1 side of coherence.
//!
//! Like Redis client-side caching in default (tracking) mode, a node
//! remembers which keys each client read with tracking; when its own line
//! of a key is invalidated it tells those clients and forgets the
//! registrations. Unlike Redis, the node *waits* for each client's ack
//! before it acks the home, so the write is not acknowledged while a near
//! cache may still serve the old value. A client that does not ack within
//! the invalidation timeout is forgotten (its stream closed) and the node
//! waits out its near-cache lease — which it bounded in its pongs — before
//! going on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use proto::cache::v1::{watch_event::Event, Invalidation, Pong, WatchEvent};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

pub type EventSender = mpsc::Sender<Result<WatchEvent, Status>>;

struct Client {
    tx: EventSender,
    tracked: HashSet<Bytes>,
    acks: HashMap<u64, oneshot::Sender<()>>,
    next_seq: u64,
}

/// A client forgotten less than a lease ago: until `until` it may still
/// serve the keys it tracked from its near cache.
struct Tombstone {
    until: Instant,
    tracked: HashSet<Bytes>,
}

#[derive(Default)]
struct Inner {
    clients: HashMap<u64, Client>,
    by_key: HashMap<Bytes, HashSet<u64>>,
    tombstones: VecDeque<Tombstone>,
    /// Keys with an invalidation under way (how many): a second one waits
    /// for it, since the first took the key's registrations.
    inflight: HashMap<Bytes, usize>,
}

impl Inner {
    /// Forgets a client, leaving a tombstone until its lease surely ran
    /// out (the last pong it can have granted is at most `lease` old).
    fn forget(&mut self, id: u64, lease: Duration, extra: Option<&Bytes>) -> Option<Instant> {
        let c = self.clients.remove(&id)?;
        for k in &c.tracked {
            if let Some(set) = self.by_key.get_mut(k) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_key.remove(k);
                }
            }
        }
        let mut tracked = c.tracked;
        if let Some(k) = extra {
            tracked.insert(k.clone());
        }
        let until = Instant::now() + lease;
        self.prune();
        self.tombstones.push_back(Tombstone { until, tracked });
        Some(until)
    }

    fn prune(&mut self) {
        let now = Instant::now();
        while self.tombstones.front().is_some_and(|t| t.until <= now) {
            self.tombstones.pop_front();
        }
    }

    /// When the last forgotten client that tracked `key` stops serving it.
    fn tombstone_until(&mut self, key: &[u8]) -> Option<Instant> {
        self.prune();
        self.tombstones
            .iter()
            .filter(|t| t.tracked.contains(key))
            .map(|t| t.until)
            .max()
    }
}

pub struct Watchers {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    timeout: Duration,
    /// The longest near-cache lease a pong grants.
    lease: Duration,
    max_tracked: usize,
    pub sent: AtomicU64,
}

impl Watchers {
    pub fn new(node: u64, timeout: Duration, lease: Duration, max_tracked: usize) -> Self {
        Self {
            inner: Mutex::default(),
            // Ids carry the node (another node never knows them) and the
            // start time (a restarted node never reissues one).
            next_id: AtomicU64::new((node << 48) | ((crate::store::now_ms() & 0xff_ffff) << 24)),
            timeout,
            lease,
            max_tracked,
            sent: AtomicU64::new(0),
        }
    }

    /// A new watching client: its id and the channel its events go to.
    pub fn register(&self, tx: EventSender) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        inner.prune();
        inner.clients.insert(
            id,
            Client {
                tx,
                tracked: HashSet::new(),
                acks: HashMap::new(),
                next_seq: 1,
            },
        );
        id
    }

    pub fn len(&self) -> usize {
        self.inner.lock().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers `key` for client `id`; false if the client is gone or
    /// tracks too many keys (then it must not cache the answer).
    pub fn track(&self, id: u64, key: &Bytes) -> bool {
        let mut inner = self.inner.lock();
        let Some(c) = inner.clients.get_mut(&id) else {
            return false;
        };
        if c.tracked.len() >= self.max_tracked && !c.tracked.contains(key) {
            return false;
        }
        c.tracked.insert(key.clone());
        inner.by_key.entry(key.clone()).or_default().insert(id);
        true
    }

    /// Whether a client tracks `key`, or was forgotten less than a lease
    /// ago while tracking it (cheap pre-check for `invalidate`).
    pub fn tracks(&self, key: &[u8]) -> bool {
        let mut inner = self.inner.lock();
        inner.by_key.contains_key(key)
            || inner.inflight.contains_key(key)
            || inner.tombstone_until(key).is_some()
    }

    /// Tells every client tracking `key` to drop it and waits for their
    /// acks. Clients that do not ack in time are forgotten. Answers how many
    /// were told, and — if a client forgotten less than a lease ago tracked
    /// the key (just now, or earlier) — until when its near cache may still
    /// serve it: a write must wait that out. An invalidation of the key
    /// already under way is waited for first.
    ///
    /// Callers run it to the end (in a spawned task): dropped half-way, it
    /// would leave slow clients neither acknowledged nor forgotten.
    pub async fn invalidate(&self, key: &Bytes) -> (usize, Option<Instant>) {
        loop {
            {
                let mut inner = self.inner.lock();
                if !inner.inflight.contains_key(key) {
                    inner.inflight.insert(key.clone(), 1);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let waits: Vec<(u64, oneshot::Receiver<()>)> = {
            let mut inner = self.inner.lock();
            let ids = inner.by_key.remove(key).unwrap_or_default();
            let mut waits = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(c) = inner.clients.get_mut(&id) else {
                    continue;
                };
                c.tracked.remove(key);
                let seq = c.next_seq;
                c.next_seq += 1;
                let (tx, rx) = oneshot::channel();
                c.acks.insert(seq, tx);
                let ev = WatchEvent {
                    event: Some(Event::Invalidate(Invalidation {
                        seq,
                        keys: vec![key.to_vec()],
                    })),
                };
                // A full queue counts as a missed ack: the client is slow.
                if c.tx.try_send(Ok(ev)).is_err() {
                    // Dropping the ack sender fails the wait at once.
                    c.acks.remove(&seq);
                }
                waits.push((id, rx));
            }
            waits
        };
        let told = waits.len();
        self.sent.fetch_add(told as u64, Ordering::Relaxed);
        let results = futures::future::join_all(
            waits
                .into_iter()
                .map(|(id, rx)| async move { (id, tokio::time::timeout(self.timeout, rx).await) }),
        )
        .await;
        let until = {
            let mut inner = self.inner.lock();
            for (id, r) in results {
                if !matches!(r, Ok(Ok(()))) {
                    tracing::warn!(
                        client = id,
                        "near-cache client missed an invalidation; dropping it"
                    );
                    inner.forget(id, self.lease, Some(key));
                }
            }
            if let Some(n) = inner.inflight.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    inner.inflight.remove(key);
                }
            }
            inner.tombstone_until(key)
        };
        (told, until)
    }

    pub fn on_ack(&self, id: u64, seq: u64) {
        if let Some(c) = self.inner.lock().clients.get_mut(&id) {
            if let Some(tx) = c.acks.remove(&seq) {
                let _ = tx.send(());
            }
        }
    }

    /// Answers a ping with the near-cache lease left (`remaining`, the
    /// node's own member lease); no answer when there is none.
    pub fn on_ping(&self, id: u64, seq: u64, remaining: Option<Duration>) {
        let Some(remaining) = remaining else {
            return;
        };
        let lease_ms = remaining.min(self.lease).as_millis() as u64;
        if let Some(c) = self.inner.lock().clients.get(&id) {
            let _ = c.tx.try_send(Ok(WatchEvent {
                event: Some(Event::Pong(Pong { seq, lease_ms })),
            }));
        }
    }

    /// Forgets client `id` (its stream ended); closing its channel ends
    /// its stream. Its near cache may serve for up to a lease more: later
    /// invalidations of its keys wait that out.
    pub fn remove(&self, id: u64) {
        self.inner.lock().forget(id, self.lease, None);
    }

    /// Ends every stream (the node's membership changed): clients drop
    /// their near caches and watch again.
    pub fn close_all(&self) {
        let mut inner = self.inner.lock();
        let ids: Vec<u64> = inner.clients.keys().copied().collect();
        for id in ids {
            if let Some(c) = inner.clients.get(&id) {
                let _ = c.tx.try_send(Err(Status::unavailable(
                    "cache membership changed; watch again",
                )));
            }
            inner.forget(id, self.lease, None);
        }
    }
}

pub type SharedWatchers = Arc<Watchers>;

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(50);
    const LEASE: Duration = Duration::from_millis(200);

    fn key() -> Bytes {
        Bytes::from_static(b"k")
    }

    /// A client that answers every invalidation (if `acks`), as the
    /// near cache does.
    fn client(w: &Arc<Watchers>, acks: bool) -> u64 {
        let (tx, mut rx) = mpsc::channel(16);
        let id = w.register(tx);
        let w = w.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = rx.recv().await {
                if let Some(Event::Invalidate(inv)) = ev.event {
                    if acks {
                        w.on_ack(id, inv.seq);
                    }
                }
            }
        });
        id
    }

    #[tokio::test]
    async fn an_invalidation_waits_for_the_ack() {
        let w = Arc::new(Watchers::new(7, TIMEOUT, LEASE, 10));
        let id = client(&w, true);
        assert_eq!(id >> 48, 7, "ids carry the node");
        assert!(w.track(id, &key()));
        assert_eq!(w.invalidate(&key()).await, (1, None));
        assert_eq!(w.len(), 1, "it acked: still watching");
        // Registrations are one-shot (like Redis tracking).
        assert!(!w.tracks(b"k"));
        assert_eq!(w.invalidate(&key()).await, (0, None));
    }

    #[tokio::test]
    async fn a_silent_client_is_forgotten_and_its_lease_waited_out() {
        let w = Arc::new(Watchers::new(1, TIMEOUT, LEASE, 10));
        let id = client(&w, false);
        assert!(w.track(id, &key()));
        let t = Instant::now();
        let (told, until) = w.invalidate(&key()).await;
        assert_eq!(told, 1);
        assert!(t.elapsed() >= TIMEOUT, "{:?}", t.elapsed());
        // Its lease may run until a lease after it was forgotten.
        assert!(until.unwrap() >= t + TIMEOUT + LEASE);
        assert_eq!(w.len(), 0);
        assert!(!w.track(id, &key()), "a forgotten client cannot register");
    }

    #[tokio::test]
    async fn a_client_gone_less_than_a_lease_ago_is_waited_for() {
        let w = Arc::new(Watchers::new(1, TIMEOUT, LEASE, 10));
        let id = client(&w, true);
        assert!(w.track(id, &key()));
        // Its stream ends (network cut): it may serve until its lease ends.
        w.remove(id);
        assert!(w.tracks(b"k"), "the tombstone keeps the key");
        let t = Instant::now();
        let (told, until) = w.invalidate(&key()).await;
        assert_eq!(told, 0);
        assert!(until.unwrap() + Duration::from_millis(20) >= t + LEASE);
        // Other keys have no tombstone.
        assert!(!w.tracks(b"other"));
    }

    #[tokio::test]
    async fn tracking_is_bounded_per_client() {
        let w = Arc::new(Watchers::new(1, TIMEOUT, LEASE, 2));
        let id = client(&w, true);
        assert!(w.track(id, &Bytes::from_static(b"a")));
        assert!(w.track(id, &Bytes::from_static(b"b")));
        assert!(
            !w.track(id, &Bytes::from_static(b"c")),
            "over the limit: not cacheable"
        );
        assert!(w.track(id, &Bytes::from_static(b"a")), "already tracked");
    }
}
