//! L3, the backing store: the source of truth behind the cache.
//!
//! [`BackingStore`] is what homes call: `get` on a miss, `put` / `delete`
//! on a write-through write or a write-back. Two implementations:
//! - [`RedisStore`]: Redis through the `redis` crate (a connection manager
//!   that reconnects by itself, or a Redis Cluster connection). A key `k`
//!   is stored at `dsync:k` as an 8-byte big-endian version followed by the
//!   value, with the entry's TTL as the Redis key's expiry.
//! - [`EmbeddedStore`]: a Raft group ([`GROUP`]) on the cache nodes whose
//!   state machine is a map; reads go through `read_index` on any node,
//!   writes are proposed on (or sent to) the group's leader. So a local
//!   cluster needs nothing else, and loses nothing acknowledged when a node
//!   is killed.
//!
//! Errors say whether a write may have happened: [`StoreError::Unavailable`]
//! (it did not) or [`StoreError::Unknown`] (it may have).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// Raft group id of the embedded store.
pub const GROUP: u64 = 2;

/// A key's state in a tier: absent (`found == false`, version 0) or a
/// value with its version and expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub found: bool,
    pub value: Bytes,
    pub version: u64,
    /// Unix ms; 0 = no expiry.
    pub expires_at_ms: u64,
}

impl Entry {
    pub fn absent() -> Self {
        Self::default()
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= now_ms
    }

    /// Weight against the memory limit.
    pub fn weight(&self, key: &[u8]) -> u32 {
        (key.len() + self.value.len() + 96).min(u32::MAX as usize) as u32
    }

    pub fn to_proto(&self) -> proto::cache::v1::internal::Entry {
        proto::cache::v1::internal::Entry {
            found: self.found,
            value: self.value.to_vec(),
            version: self.version,
            expires_at_ms: self.expires_at_ms,
        }
    }

    pub fn from_proto(e: Option<proto::cache::v1::internal::Entry>) -> Self {
        let e = e.unwrap_or_default();
        Self {
            found: e.found,
            value: Bytes::from(e.value),
            version: e.version,
            expires_at_ms: e.expires_at_ms,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached; a write did not happen.
    #[error("backing store unavailable: {0}")]
    Unavailable(String),
    /// A write's answer was lost: it may or may not have happened.
    #[error("backing store outcome unknown: {0}")]
    Unknown(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

pub trait BackingStore: Send + Sync + 'static {
    /// What it is, for status pages ("redis://…", "embedded").
    fn describe(&self) -> String;
    /// The key's current entry (absent if missing or expired).
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<Entry>>;
    /// Stores `entry` (found) under `key`.
    fn put<'a>(&'a self, key: &'a [u8], entry: &'a Entry) -> BoxFuture<'a, StoreResult<()>>;
    /// Removes `key`; answers whether it existed.
    fn delete<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<bool>>;
}

// ---------------------------------------------------------------- Redis

enum RedisConn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Redis (standalone or Cluster) as the backing store.
pub struct RedisStore {
    url: String,
    conn: RedisConn,
    timeout: Duration,
}

fn redis_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + key.len());
    k.extend_from_slice(b"dsync:");
    k.extend_from_slice(key);
    k
}

fn classify(e: redis::RedisError, write: bool) -> StoreError {
    if !write || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Unknown(e.to_string())
    }
}

impl RedisStore {
    /// Connects to `url`: `redis://…` or `redis+cluster://h1:p1,h2:p2`.
    /// The connection manager keeps reconnecting if Redis goes away, so
    /// connecting succeeds only once Redis answered at least once.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, String> {
        let conn = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest.split(',').map(|n| format!("redis://{n}")).collect();
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(|e| format!("redis cluster {url}: {e}"))?;
            RedisConn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| format!("redis cluster {url}: {e}"))?,
            )
        } else {
            let client = redis::Client::open(url).map_err(|e| format!("redis {url}: {e}"))?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1);
            RedisConn::Single(
                redis::aio::ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map_err(|e| format!("redis {url}: {e}"))?,
            )
        };
        Ok(Self {
            url: url.to_string(),
            conn,
            timeout,
        })
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Pipeline,
        write: bool,
    ) -> StoreResult<T> {
        let fut = async {
            match &self.conn {
                RedisConn::Single(c) => cmd.query_async::<T>(&mut c.clone()).await,
                RedisConn::Cluster(c) => cmd.query_async::<T>(&mut c.clone()).await,
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| classify(e, write)),
            Err(_) if write => Err(StoreError::Unknown("redis timed out".into())),
            Err(_) => Err(StoreError::Unavailable("redis timed out".into())),
        }
    }
}

impl BackingStore for RedisStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<Entry>> {
        Box::pin(async move {
            let k = redis_key(key);
            let mut p = redis::pipe();
            p.atomic().cmd("GET").arg(&k).cmd("PTTL").arg(&k);
            let (raw, pttl): (Option<Vec<u8>>, i64) = self.query(&p, false).await?;
            let Some(raw) = raw else {
                return Ok(Entry::absent());
            };
            if raw.len() < 8 {
                return Err(StoreError::Unavailable(format!(
                    "redis key {} holds {} bytes, not a dsync entry",
                    String::from_utf8_lossy(&k),
                    raw.len()
                )));
            }
            let version = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
            Ok(Entry {
                found: true,
                value: Bytes::copy_from_slice(&raw[8..]),
                version,
                expires_at_ms: if pttl > 0 { now_ms() + pttl as u64 } else { 0 },
            })
        })
    }

    fn put<'a>(&'a self, key: &'a [u8], entry: &'a Entry) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            let k = redis_key(key);
            let mut raw = Vec::with_capacity(8 + entry.value.len());
            raw.extend_from_slice(&entry.version.to_be_bytes());
            raw.extend_from_slice(&entry.value);
            let mut p = redis::pipe();
            if entry.expires_at_ms != 0 {
                let ms = entry.expires_at_ms.saturating_sub(now_ms()).max(1);
                p.cmd("SET").arg(&k).arg(raw).arg("PX").arg(ms);
            } else {
                p.cmd("SET").arg(&k).arg(raw);
            }
            let _: (String,) = self.query(&p, true).await?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            let mut p = redis::pipe();
            p.cmd("DEL").arg(redis_key(key));
            let (n,): (i64,) = self.query(&p, true).await?;
            Ok(n > 0)
        })
    }
}

// ------------------------------------------------------------- embedded

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreCommand {
    Put {
        key: Bytes,
        entry: Entry,
    },
    Delete {
        key: Bytes,
    },
    /// Drops entries expired at `now_ms` (the leader's clock, carried in
    /// the command so every replica drops the same ones).
    Purge {
        now_ms: u64,
    },
}

/// The embedded store's replicated map.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StoreState {
    pub map: HashMap<Bytes, Entry>,
}

impl StoreState {
    /// Applies a command; answers whether the key existed (Put, Delete) or
    /// how many entries went (Purge).
    pub fn apply(&mut self, cmd: StoreCommand) -> u64 {
        match cmd {
            StoreCommand::Put { key, entry } => self.map.insert(key, entry).is_some() as u64,
            StoreCommand::Delete { key } => self.map.remove(&key).is_some() as u64,
            StoreCommand::Purge { now_ms } => {
                let before = self.map.len();
                self.map.retain(|_, e| !e.expired(now_ms));
                (before - self.map.len()) as u64
            }
        }
    }

    pub fn get(&self, key: &[u8], now_ms: u64) -> Entry {
        match self.map.get(key) {
            Some(e) if !e.expired(now_ms) => e.clone(),
            _ => Entry::absent(),
        }
    }
}

/// The `StateMachine` of the embedded store group.
pub struct StoreMachine {
    pub state: Arc<RwLock<StoreState>>,
}

impl consensus::StateMachine for StoreMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        match postcard::from_bytes::<StoreCommand>(command) {
            Ok(cmd) => self.state.write().apply(cmd).to_be_bytes().to_vec(),
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable store command skipped");
                Vec::new()
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        postcard::to_stdvec(&*self.state.read()).expect("store state encodes")
    }

    fn restore(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        *self.state.write() = postcard::from_bytes(data).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Sends a store command to another node (the group's leader) and answers
/// what its proposal returned. Provided by the peer layer.
pub type Forward =
    Arc<dyn Fn(u64, StoreCommand) -> BoxFuture<'static, Result<u64, tonic::Status>> + Send + Sync>;

/// The embedded store as seen by one node.
pub struct EmbeddedStore {
    pub group: consensus::GroupHandle,
    pub state: Arc<RwLock<StoreState>>,
    pub forward: Forward,
}

impl EmbeddedStore {
    /// Proposes `cmd` here if this node leads the group, else on the
    /// leader. `Unavailable` only when it surely did not apply.
    pub async fn propose(&self, cmd: StoreCommand) -> StoreResult<u64> {
        let st = self.group.status();
        let outcome = match st.leader {
            Some(l) if l == st.node => self
                .group
                .propose(postcard::to_stdvec(&cmd).expect("store commands encode"))
                .await
                .map_err(|e| consensus::grpc_status::to_status(&e, GROUP)),
            Some(l) => (self.forward)(l, cmd)
                .await
                .map(|n| n.to_be_bytes().to_vec()),
            None => {
                return Err(StoreError::Unavailable(
                    "embedded store has no leader".into(),
                ))
            }
        };
        match outcome {
            Ok(bytes) => Ok(bytes
                .get(..8)
                .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))),
            Err(s) => {
                let reason = proto::status::reason(&s);
                if matches!(reason.as_str(), "NOT_LEADER" | "NO_LEADER" | "NOT_APPLIED") {
                    Err(StoreError::Unavailable(s.message().to_string()))
                } else {
                    Err(StoreError::Unknown(s.message().to_string()))
                }
            }
        }
    }
}

impl BackingStore for EmbeddedStore {
    fn describe(&self) -> String {
        "embedded".into()
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<Entry>> {
        Box::pin(async move {
            let t = std::time::Instant::now();
            let r = self.group.read_index().await;
            if t.elapsed() > std::time::Duration::from_secs(1) {
                tracing::warn!(took = ?t.elapsed(), ok = r.is_ok(), status = ?self.group.status().leader, "slow embedded read_index");
            }
            r.map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(self.state.read().get(key, now_ms()))
        })
    }

    fn put<'a>(&'a self, key: &'a [u8], entry: &'a Entry) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.propose(StoreCommand::Put {
                key: Bytes::copy_from_slice(key),
                entry: entry.clone(),
            })
            .await
            .map(|_| ())
        })
    }

    fn delete<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            self.propose(StoreCommand::Delete {
                key: Bytes::copy_from_slice(key),
            })
            .await
            .map(|n| n > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_state_expires_and_purges() {
        let mut s = StoreState::default();
        let e = Entry {
            found: true,
            value: Bytes::from_static(b"v"),
            version: 1,
            expires_at_ms: 1000,
        };
        assert_eq!(
            s.apply(StoreCommand::Put {
                key: Bytes::from_static(b"k"),
                entry: e.clone()
            }),
            0
        );
        assert_eq!(s.get(b"k", 999), e);
        assert_eq!(s.get(b"k", 1000), Entry::absent());
        assert_eq!(s.apply(StoreCommand::Purge { now_ms: 1000 }), 1);
        assert!(s.map.is_empty());
        assert_eq!(
            s.apply(StoreCommand::Delete {
                key: Bytes::from_static(b"k")
            }),
            0
        );
    }
}
