//! [`CacheClient`]: the cache-svc client, with a coherent near cache (L1).
//!
//! Calls go to one node at a time (any node serves any key; on failure the
//! client moves to the next). With the near cache on, the client keeps a
//! `Watch` stream open to that node and reads with its client id, so the
//! node registers each key it answers; a later write anywhere invalidates
//! the key here — acknowledged before the write completes — before it is
//! acknowledged. The near cache serves an entry only:
//! - while its lease holds: until (when the last answered ping was sent) +
//!   the lease the node granted in its pong; a node whose own membership
//!   lapsed stops answering, so a partitioned client stops serving;
//! - if no invalidation of the key arrived while its read was in flight
//!   (the same race rule as the nodes', see cache-svc `fills.rs`);
//! - until the entry's TTL runs out.
//!
//! When the stream ends (node down, membership change) the near cache is
//! emptied and the stream reopened.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use parking_lot::Mutex;
use proto::cache::v1::cache_service_client::CacheServiceClient;
use proto::cache::v1::{
    watch_event, watch_request, Ack, BatchGetRequest, BatchSetRequest, DeleteRequest, GetRequest,
    GetResponse, InvalidateRequest, Ping, SetRequest, StatusRequest, StatusResponse, WatchRequest,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{Conn, Options};

/// A key's value as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub version: u64,
    /// Time left before the entry expires (None: no expiry).
    pub ttl: Option<Duration>,
}

/// Where a read was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This client's near cache.
    Near,
    /// The node's own line.
    Node,
    /// Another node's copy, through the key's home.
    Peer,
    /// The backing store.
    Store,
}

#[derive(Debug, Clone, Default)]
pub struct SetOptions {
    /// Expire the entry after this long (None: the server's default).
    pub ttl: Option<Duration>,
    /// Write only if the key's version is this (0 = only if absent).
    pub if_version: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub conn: Options,
    /// Keep a coherent near cache (L1).
    pub near_cache: bool,
    /// Its bound, in bytes of keys and values.
    pub near_cache_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            conn: Options {
                retry_for: Duration::from_secs(10),
                ..Options::default()
            },
            near_cache: true,
            near_cache_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct NearStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub invalidations: u64,
}

#[derive(Clone)]
struct NearEntry {
    entry: Option<Entry>,
    /// `Instant` after which it must not be served (entry TTL).
    expires: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    active: usize,
    invalidations: u64,
}

struct NearState {
    /// The Watch stream's client id (0: no stream).
    client_id: u64,
    fills: HashMap<Bytes, Slot>,
}

struct Near {
    cache: Cache<Bytes, NearEntry>,
    state: Mutex<NearState>,
    /// Nanoseconds since `base` until which entries may be served (0: none).
    lease_until: AtomicU64,
    base: Instant,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

impl Near {
    fn lease_valid(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until != 0 && (self.base.elapsed().as_nanos() as u64) < until
    }

    fn lookup(&self, key: &[u8]) -> Option<Option<Entry>> {
        if !self.lease_valid() {
            return None;
        }
        let e = self.cache.get(key)?;
        if e.expires.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        Some(e.entry)
    }

    /// Drops everything (the stream ended): nothing is served until a new
    /// stream's pong.
    fn reset(&self) {
        self.lease_until.store(0, Ordering::Release);
        let mut s = self.state.lock();
        s.client_id = 0;
        for slot in s.fills.values_mut() {
            slot.invalidations += 1;
        }
        self.cache.invalidate_all();
    }

    fn invalidate(&self, keys: &[Vec<u8>]) {
        let mut s = self.state.lock();
        for k in keys {
            if let Some(slot) = s.fills.get_mut(k.as_slice()) {
                slot.invalidations += 1;
            }
            self.cache.invalidate(k.as_slice());
        }
        self.invalidations
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
    }
}

/// A read in flight for the near cache; settled even if the read's future
/// is dropped (so its slot does not leak).
struct FillSlot<'a> {
    near: &'a Near,
    key: Bytes,
    start: u64,
    done: bool,
}

impl<'a> FillSlot<'a> {
    fn begin(near: &'a Near, s: &mut NearState, key: Bytes) -> Self {
        let slot = s.fills.entry(key.clone()).or_default();
        slot.active += 1;
        let start = slot.invalidations;
        Self {
            near,
            key,
            start,
            done: false,
        }
    }

    /// Whether no invalidation of the key arrived since `begin`.
    fn finish(mut self, s: &mut NearState) -> bool {
        self.done = true;
        Self::release(s, &self.key, Some(self.start))
    }

    fn release(s: &mut NearState, key: &Bytes, start: Option<u64>) -> bool {
        let Some(slot) = s.fills.get_mut(key) else {
            return false;
        };
        let clean = start == Some(slot.invalidations);
        slot.active -= 1;
        if slot.active == 0 {
            s.fills.remove(key);
        }
        clean
    }
}

impl Drop for FillSlot<'_> {
    fn drop(&mut self) {
        if !self.done {
            Self::release(&mut self.near.state.lock(), &self.key, None);
        }
    }
}

/// A cache-svc client; cheap to clone.
#[derive(Clone)]
pub struct CacheClient {
    conn: Conn,
    near: Option<Arc<Near>>,
    watcher: Option<Arc<tokio::task::JoinHandle<()>>>,
}

impl Drop for CacheClient {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            // The last clone stops the Watch stream.
            if Arc::strong_count(w) == 1 {
                w.abort();
            }
        }
    }
}

/// Whether a failed write surely did not happen.
fn write_not_applied(s: &Status) -> bool {
    match proto::status::reason(s).as_str() {
        "EPOCH_CHANGING" | "NOT_MEMBER" | "NO_LEASE" | "HOME_UNREACHABLE" | "STORE_UNAVAILABLE" => {
            true
        }
        "" => never_sent(s),
        _ => false,
    }
}

/// A transport error from opening the connection: the request never left.
fn never_sent(s: &Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cause {
        let text = e.to_string();
        if text.contains("Connect")
            || text.contains("connect error")
            || text.contains("Connection refused")
        {
            return true;
        }
        cause = e.source();
    }
    s.message().contains("resolv") || s.message().contains("bad endpoint")
}

fn entry_of(r: &GetResponse) -> Option<Entry> {
    r.found.then(|| Entry {
        value: Bytes::from(r.value.clone()),
        version: r.version,
        ttl: (r.ttl_remaining_ms > 0).then(|| Duration::from_millis(r.ttl_remaining_ms)),
    })
}

fn source_of(r: &GetResponse) -> Source {
    match r.source() {
        proto::cache::v1::Source::Peer => Source::Peer,
        proto::cache::v1::Source::Store => Source::Store,
        _ => Source::Node,
    }
}

impl CacheClient {
    /// A client of the cache at `endpoints` (any nodes), near cache on.
    /// Must be called inside a tokio runtime.
    pub fn connect(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Self, Status> {
        Self::with_options(endpoints, CacheOptions::default())
    }

    pub fn with_options(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        opts: CacheOptions,
    ) -> Result<Self, Status> {
        let conn = Conn::new(endpoints, opts.conn.clone())?;
        if !opts.near_cache {
            return Ok(Self {
                conn,
                near: None,
                watcher: None,
            });
        }
        let near = Arc::new(Near {
            cache: Cache::builder()
                .max_capacity(opts.near_cache_bytes)
                .weigher(|k: &Bytes, v: &NearEntry| {
                    (k.len() + v.entry.as_ref().map_or(0, |e| e.value.len()) + 64) as u32
                })
                .build(),
            state: Mutex::new(NearState {
                client_id: 0,
                fills: HashMap::new(),
            }),
            lease_until: AtomicU64::new(0),
            base: Instant::now(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        });
        let watcher = tokio::spawn(watch_loop(conn.clone(), Arc::downgrade(&near)));
        Ok(Self {
            conn,
            near: Some(near),
            watcher: Some(Arc::new(watcher)),
        })
    }

    /// The node calls currently go to.
    pub fn current(&self) -> String {
        self.conn.current()
    }

    /// Reads `key` (None: absent).
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>, Status> {
        self.get_with_source(key).await.map(|(e, _)| e)
    }

    /// The near cache's answer alone, without a call (None: not there or
    /// not servable now; Some(None): cached as absent).
    pub fn near_get(&self, key: &[u8]) -> Option<Option<Entry>> {
        let near = self.near.as_ref()?;
        let r = near.lookup(key);
        if r.is_some() {
            near.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Reads `key` and says which tier answered.
    pub async fn get_with_source(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<(Option<Entry>, Source), Status> {
        let key = key.as_ref();
        if let Some(e) = self.near_get(key) {
            return Ok((e, Source::Near));
        }
        let Some(near) = &self.near else {
            let r = self.call_get(key, 0).await?;
            return Ok((entry_of(&r), source_of(&r)));
        };
        near.misses.fetch_add(1, Ordering::Relaxed);
        let k = Bytes::copy_from_slice(key);
        let (client_id, slot) = {
            let mut s = near.state.lock();
            (s.client_id, FillSlot::begin(near, &mut s, k.clone()))
        };
        let res = self.call_get(key, client_id).await;
        let mut s = near.state.lock();
        let clean = slot.finish(&mut s);
        let r = res?;
        let entry = entry_of(&r);
        if clean && r.tracked && client_id != 0 && s.client_id == client_id {
            near.cache.insert(
                k,
                NearEntry {
                    entry: entry.clone(),
                    expires: entry
                        .as_ref()
                        .and_then(|e| e.ttl)
                        .map(|t| Instant::now() + t),
                },
            );
        }
        Ok((entry, source_of(&r)))
    }

    async fn call_get(&self, key: &[u8], client_id: u64) -> Result<GetResponse, Status> {
        let timeout = self.conn.options().request_timeout;
        self.conn
            .call(|ch| {
                let key = key.to_vec();
                async move {
                    let mut req = tonic::Request::new(GetRequest { key, client_id });
                    req.set_timeout(timeout);
                    CacheServiceClient::new(ch)
                        .get(req)
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await
    }

    /// Retries a write only when it surely had no effect: refused by a
    /// node for a documented reason (EPOCH_CHANGING, NOT_MEMBER, NO_LEASE,
    /// HOME_UNREACHABLE, STORE_UNAVAILABLE) or never sent (no connection).
    /// Anything else — OUTCOME_UNKNOWN, a connection lost mid-call, a
    /// timeout — is returned: the write may have happened, and a retry
    /// could apply it twice or fail its own CAS.
    async fn write_call<T, F, Fut>(&self, key: &[u8], mut f: F) -> Result<T, Status>
    where
        F: FnMut(CacheServiceClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        if let Some(near) = &self.near {
            near.invalidate(&[key.to_vec()]);
            near.invalidations.fetch_sub(1, Ordering::Relaxed);
        }
        let r = self
            .conn
            .call(|ch| {
                let fut = f(CacheServiceClient::new(ch));
                async move {
                    match fut.await {
                        Err(s) if crate::replica_failed(&s) && !write_not_applied(&s) => Ok(Err(s)),
                        other => other.map(Ok),
                    }
                }
            })
            .await?;
        r
    }

    /// Writes `key` (no TTL beyond the server's default, unconditionally);
    /// answers the new version.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<u64, Status> {
        self.set_with(key, value, SetOptions::default()).await
    }

    /// Writes `key` with options; a failed `if_version` check is
    /// FAILED_PRECONDITION (VERSION_MISMATCH, with "current_version").
    pub async fn set_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        opts: SetOptions,
    ) -> Result<u64, Status> {
        let key = key.as_ref();
        let value: Bytes = value.into();
        let timeout = self.conn.options().request_timeout;
        self.write_call(key, |mut c| {
            let mut req = tonic::Request::new(SetRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ttl_ms: opts.ttl.map_or(0, |t| t.as_millis().max(1) as u64),
                if_version: opts.if_version,
            });
            req.set_timeout(timeout);
            async move { c.set(req).await.map(|r| r.into_inner().version) }
        })
        .await
    }

    /// Deletes `key`; answers whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool, Status> {
        self.delete_if(key, None).await
    }

    /// Deletes `key` if its version is `if_version` (when given).
    pub async fn delete_if(
        &self,
        key: impl AsRef<[u8]>,
        if_version: Option<u64>,
    ) -> Result<bool, Status> {
        let key = key.as_ref();
        self.write_call(key, |mut c| {
            let req = DeleteRequest {
                key: key.to_vec(),
                if_version,
            };
            async move { c.delete(req).await.map(|r| r.into_inner().deleted) }
        })
        .await
    }

    /// Drops every cached copy of `key`; answers the nodes that held one.
    pub async fn invalidate(&self, key: impl AsRef<[u8]>) -> Result<Vec<u64>, Status> {
        let key = key.as_ref();
        self.write_call(key, |mut c| {
            let req = InvalidateRequest { key: key.to_vec() };
            async move { c.invalidate(req).await.map(|r| r.into_inner().nodes) }
        })
        .await
    }

    /// Reads many keys in one call (not through the near cache).
    pub async fn batch_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Entry>>, Status> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        let r = self
            .conn
            .call(|ch| {
                let keys = keys.clone();
                async move {
                    CacheServiceClient::new(ch)
                        .batch_get(BatchGetRequest { keys, client_id: 0 })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.entries.iter().map(entry_of).collect())
    }

    /// Writes many keys in one call; each entry succeeds or fails alone.
    pub async fn batch_set(
        &self,
        entries: Vec<(Vec<u8>, Bytes, SetOptions)>,
    ) -> Result<Vec<Result<u64, Status>>, Status> {
        if let Some(near) = &self.near {
            let keys: Vec<Vec<u8>> = entries.iter().map(|e| e.0.clone()).collect();
            near.invalidate(&keys);
        }
        let reqs: Vec<SetRequest> = entries
            .into_iter()
            .map(|(key, value, o)| SetRequest {
                key,
                value: value.to_vec(),
                ttl_ms: o.ttl.map_or(0, |t| t.as_millis().max(1) as u64),
                if_version: o.if_version,
            })
            .collect();
        let r = self
            .conn
            .call(|ch| {
                let entries = reqs.clone();
                async move {
                    CacheServiceClient::new(ch)
                        .batch_set(BatchSetRequest { entries })
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await?;
        Ok(r.results
            .into_iter()
            .map(|r| {
                if r.code == 0 {
                    Ok(r.version)
                } else {
                    let mut meta = vec![];
                    if r.reason == "VERSION_MISMATCH" {
                        meta.push(("current_version".to_string(), r.current_version.to_string()));
                    }
                    Err(proto::status::error(
                        tonic::Code::from(r.code),
                        r.message,
                        &r.reason,
                        meta,
                    ))
                }
            })
            .collect())
    }

    /// Status of the node calls go to.
    pub async fn status(&self) -> Result<StatusResponse, Status> {
        self.conn
            .call(|ch| async move {
                CacheServiceClient::new(ch)
                    .status(StatusRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await
    }

    /// Status of every known node, each asked directly.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Status>)> {
        let mut out = Vec::new();
        for ep in self.conn.endpoints() {
            let r = match self.conn.channel(&ep).await {
                Ok(ch) => {
                    let mut req = tonic::Request::new(StatusRequest {});
                    req.set_timeout(Duration::from_secs(2));
                    CacheServiceClient::new(ch)
                        .status(req)
                        .await
                        .map(|r| r.into_inner())
                }
                Err(e) => Err(e),
            };
            out.push((ep, r));
        }
        out
    }

    pub fn near_stats(&self) -> NearStats {
        match &self.near {
            Some(n) => NearStats {
                hits: n.hits.load(Ordering::Relaxed),
                misses: n.misses.load(Ordering::Relaxed),
                entries: n.cache.entry_count(),
                invalidations: n.invalidations.load(Ordering::Relaxed),
            },
            None => NearStats::default(),
        }
    }

    /// Whether the near cache may serve now (its lease holds).
    pub fn near_cache_live(&self) -> bool {
        self.near.as_ref().is_some_and(|n| n.lease_valid())
    }
}

/// Keeps a Watch stream open to the node calls go to; answers its
/// invalidations and renews the near-cache lease with pings.
async fn watch_loop(conn: Conn, near: std::sync::Weak<Near>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if near.strong_count() == 0 {
            return;
        }
        let addr = conn.current();
        if let Ok(ch) = conn.channel(&addr).await {
            if watch_once(ch, &near).await {
                backoff = Duration::from_millis(50);
            }
        }
        if let Some(n) = near.upgrade() {
            n.reset();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One stream's life; true if it got as far as a welcome.
async fn watch_once(ch: tonic::transport::Channel, near: &std::sync::Weak<Near>) -> bool {
    let (tx, rx) = mpsc::channel::<WatchRequest>(1024);
    let mut stream = match CacheServiceClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(_) => return false,
    };
    let pings: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut pinger: Option<tokio::task::JoinHandle<()>> = None;
    let mut welcomed = false;
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(m))) => m,
            _ => break,
        };
        let Some(n) = near.upgrade() else { break };
        match msg.event {
            Some(watch_event::Event::Welcome(w)) => {
                welcomed = true;
                n.state.lock().client_id = w.client_id;
                let every = Duration::from_millis((w.lease_ms / 4).max(10));
                let tx = tx.clone();
                let pings = pings.clone();
                pinger = Some(tokio::spawn(async move {
                    let mut seq = 0u64;
                    loop {
                        seq += 1;
                        pings.lock().insert(seq, Instant::now());
                        let ping = WatchRequest {
                            msg: Some(watch_request::Msg::Ping(Ping { seq })),
                        };
                        if tx.send(ping).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(every).await;
                        pings.lock().retain(|s, _| *s + 16 > seq);
                    }
                }));
            }
            Some(watch_event::Event::Pong(p)) => {
                if let Some(sent) = pings.lock().get(&p.seq).copied() {
                    let until = sent + Duration::from_millis(p.lease_ms);
                    let nanos = until.saturating_duration_since(n.base).as_nanos() as u64;
                    n.lease_until.fetch_max(nanos, Ordering::AcqRel);
                }
            }
            Some(watch_event::Event::Invalidate(inv)) => {
                n.invalidate(&inv.keys);
                let ack = WatchRequest {
                    msg: Some(watch_request::Msg::Ack(Ack { seq: inv.seq })),
                };
                if tx.send(ack).await.is_err() {
                    break;
                }
            }
            None => {}
        }
    }
    if let Some(p) = pinger {
        p.abort();
    }
    welcomed
}
