//! `dsync.cache.v1.CacheService`: validation, then the [`CacheNode`].
//! The only public gRPC code of cache-svc: it turns requests into node
//! calls and node results into answers; it knows nothing of the protocol.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use proto::cache::v1::cache_service_server::CacheService;
use proto::cache::v1::internal::{WriteOp, WriteReply, WriteRequest};
use proto::cache::v1::{
    watch_event, watch_request, BatchGetRequest, BatchGetResponse, BatchSetRequest,
    BatchSetResponse, BatchSetResult, CacheStats, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, InvalidateRequest, InvalidateResponse, SetRequest, SetResponse, StatusRequest,
    StatusResponse, WatchEvent, WatchRequest, Welcome,
};
use proto::status::error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::config::CacheLimits;
use crate::node::{CacheNode, Source};
use crate::store::{now_ms, Entry};

#[derive(Clone)]
pub struct Caches {
    pub node: CacheNode,
}

fn invalid(reason: &str, msg: String, limit: usize) -> Status {
    error(
        Code::InvalidArgument,
        msg,
        reason,
        [("limit", limit.to_string())],
    )
}

fn check_key(l: &CacheLimits, key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(error(
            Code::InvalidArgument,
            "key is empty",
            "EMPTY_KEY",
            [] as [(String, String); 0],
        ));
    }
    if key.len() > l.max_key_bytes {
        return Err(invalid(
            "KEY_TOO_LARGE",
            format!(
                "key has {} bytes; the limit is {}",
                key.len(),
                l.max_key_bytes
            ),
            l.max_key_bytes,
        ));
    }
    Ok(())
}

fn check_batch(l: &CacheLimits, n: usize) -> Result<(), Status> {
    if n > l.max_batch {
        return Err(invalid(
            "BATCH_TOO_LARGE",
            format!("batch has {n} entries; the limit is {}", l.max_batch),
            l.max_batch,
        ));
    }
    Ok(())
}

/// Validates a set and resolves its TTL (0 = the default).
fn check_set(l: &CacheLimits, r: &SetRequest) -> Result<u64, Status> {
    check_key(l, &r.key)?;
    if r.value.len() > l.max_value_bytes {
        return Err(invalid(
            "VALUE_TOO_LARGE",
            format!(
                "value has {} bytes; the limit is {}",
                r.value.len(),
                l.max_value_bytes
            ),
            l.max_value_bytes,
        ));
    }
    let max = l.max_ttl.as_millis() as u64;
    if r.ttl_ms > max {
        return Err(error(
            Code::InvalidArgument,
            format!("ttl_ms {} exceeds the limit of {max} ms", r.ttl_ms),
            "TTL_OUT_OF_RANGE",
            [("max_ttl_ms", max.to_string())],
        ));
    }
    Ok(if r.ttl_ms == 0 {
        l.default_ttl.as_millis() as u64
    } else {
        r.ttl_ms
    })
}

fn get_response(entry: Entry, source: Source, tracked: bool) -> GetResponse {
    let now = now_ms();
    GetResponse {
        found: entry.found,
        ttl_remaining_ms: if entry.expires_at_ms == 0 {
            0
        } else {
            entry.expires_at_ms.saturating_sub(now).max(1)
        },
        value: entry.value.to_vec(),
        version: entry.version,
        source: match source {
            Source::Local => proto::cache::v1::Source::Local,
            Source::Peer => proto::cache::v1::Source::Peer,
            Source::Store => proto::cache::v1::Source::Store,
        } as i32,
        tracked,
    }
}

impl Caches {
    fn limits(&self) -> &CacheLimits {
        &self.node.limits
    }

    async fn set(&self, r: SetRequest, ttl_ms: u64) -> Result<WriteReply, Status> {
        self.node
            .write(WriteRequest {
                key: r.key,
                op: WriteOp::Set as i32,
                value: r.value,
                ttl_ms,
                if_version: r.if_version,
                ..Default::default()
            })
            .await
    }

    pub fn stats(&self) -> CacheStats {
        use std::sync::atomic::Ordering::Relaxed;
        let n = &self.node;
        n.run_pending();
        let s = &n.stats;
        let (hits, peer_hits, misses) = (
            s.hits.load(Relaxed),
            s.peer_hits.load(Relaxed),
            s.misses.load(Relaxed),
        );
        let reads = hits + peer_hits + misses;
        let size = n.size_bytes();
        let cap = n.limits.memory_limit_bytes;
        let lines = |i: usize| s.lines[i].load(Relaxed).max(0) as u64;
        CacheStats {
            node_id: n.me,
            entries: n.entries(),
            size_bytes: size,
            capacity_bytes: cap,
            utilization: if cap == 0 {
                0.0
            } else {
                size as f64 / cap as f64
            },
            hits,
            peer_hits,
            misses,
            hit_rate: if reads == 0 {
                0.0
            } else {
                (hits + peer_hits) as f64 / reads as f64
            },
            evictions: s.evictions.load(Relaxed),
            lines_shared: lines(0),
            lines_exclusive: lines(1),
            lines_modified: lines(2),
            invalidations_sent: s.invalidations_sent.load(Relaxed) + n.watchers.sent.load(Relaxed),
            invalidations_received: s.invalidations_received.load(Relaxed),
            refreshes: s.refreshes.load(Relaxed),
            writes: s.writes.load(Relaxed),
            directory_entries: n.directory_entries() as u64,
            watchers: n.watchers.len() as u64,
            fenced: s.fenced.load(Relaxed),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CacheService for Caches {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = req.into_inner();
        check_key(self.limits(), &r.key)?;
        let (e, src, tracked) = self.node.get(&Bytes::from(r.key), r.client_id).await?;
        Ok(Response::new(get_response(e, src, tracked)))
    }

    async fn batch_get(
        &self,
        req: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        let r = req.into_inner();
        check_batch(self.limits(), r.keys.len())?;
        for k in &r.keys {
            check_key(self.limits(), k)?;
        }
        let client = r.client_id;
        let results = futures::future::join_all(
            r.keys
                .into_iter()
                .map(|k| async move { self.node.get(&Bytes::from(k), client).await }),
        )
        .await;
        let mut entries = Vec::with_capacity(results.len());
        for res in results {
            let (e, src, tracked) = res?;
            entries.push(get_response(e, src, tracked));
        }
        Ok(Response::new(BatchGetResponse { entries }))
    }

    async fn set(&self, req: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let r = req.into_inner();
        let ttl = check_set(self.limits(), &r)?;
        let w = Caches::set(self, r, ttl).await?;
        Ok(Response::new(SetResponse {
            version: w.version,
            invalidated: w.invalidated.len() as u32,
        }))
    }

    async fn batch_set(
        &self,
        req: Request<BatchSetRequest>,
    ) -> Result<Response<BatchSetResponse>, Status> {
        let r = req.into_inner();
        check_batch(self.limits(), r.entries.len())?;
        let mut ttls = Vec::with_capacity(r.entries.len());
        for e in &r.entries {
            ttls.push(check_set(self.limits(), e)?);
        }
        let results = futures::future::join_all(
            r.entries
                .into_iter()
                .zip(ttls)
                .map(|(e, ttl)| Caches::set(self, e, ttl)),
        )
        .await;
        let results = results
            .into_iter()
            .map(|res| match res {
                Ok(w) => BatchSetResult {
                    version: w.version,
                    ..Default::default()
                },
                Err(s) => {
                    let info = proto::status::error_info(&s);
                    BatchSetResult {
                        code: s.code() as i32,
                        reason: info.as_ref().map(|i| i.reason.clone()).unwrap_or_default(),
                        message: s.message().to_string(),
                        current_version: info
                            .and_then(|i| i.metadata.get("current_version").cloned())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                        ..Default::default()
                    }
                }
            })
            .collect();
        Ok(Response::new(BatchSetResponse { results }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = req.into_inner();
        check_key(self.limits(), &r.key)?;
        let w = self
            .node
            .write(WriteRequest {
                key: r.key,
                op: WriteOp::Delete as i32,
                if_version: r.if_version,
                ..Default::default()
            })
            .await?;
        Ok(Response::new(DeleteResponse { deleted: w.existed }))
    }

    async fn invalidate(
        &self,
        req: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let r = req.into_inner();
        check_key(self.limits(), &r.key)?;
        let w = self
            .node
            .write(WriteRequest {
                key: r.key,
                op: WriteOp::Invalidate as i32,
                ..Default::default()
            })
            .await?;
        Ok(Response::new(InvalidateResponse {
            nodes: w.invalidated,
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let ep = self.node.epoch();
        Ok(Response::new(StatusResponse {
            stats: Some(self.stats()),
            epoch: ep.view.epoch,
            members: ep.view.members.keys().copied().collect(),
            member: ep.incarnation.is_some(),
            backing_store: self.node.store.describe(),
            write_policy: self.node.limits.write_policy.name().into(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let node = self.node.clone();
        let id = node.watchers.register(tx.clone());
        let welcome = WatchEvent {
            event: Some(watch_event::Event::Welcome(Welcome {
                client_id: id,
                lease_ms: node.limits.lease.as_millis() as u64,
                node_id: node.me,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        drop(tx);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.msg {
                    Some(watch_request::Msg::Ping(p)) => {
                        node.watchers.on_ping(id, p.seq, node.lease_left())
                    }
                    Some(watch_request::Msg::Ack(a)) => node.watchers.on_ack(id, a.seq),
                    None => {}
                }
            }
            node.watchers.remove(id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
