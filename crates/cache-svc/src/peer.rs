//! The node-to-node protocol over gRPC (`dsync.cache.v1.internal.CachePeer`):
//! [`Peers`] calls other nodes, [`PeerApi`] answers them by handing each
//! request to the [`CacheNode`]. Channels are dialled through the chassis.
//!
//! Test partitions (`consensus::testkit::Faults`) cut this traffic too:
//! a cut pair's calls fail on the sending side and are refused on the
//! receiving side, like the Raft transport's.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use consensus::testkit::Faults;
use parking_lot::Mutex;
use proto::cache::v1::internal::cache_peer_client::CachePeerClient;
use proto::cache::v1::internal::cache_peer_server::CachePeer;
use proto::cache::v1::internal::{
    FetchRequest, LineGrant, RecallReply, RecallRequest, ReleaseReply, ReleaseRequest, StoreReply,
    StoreRequest, WriteReply, WriteRequest,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::node::CacheNode;
use crate::store::{EmbeddedStore, Entry, StoreCommand};

/// Prefix of the message of a call that failed before anything was sent
/// (so a write surely did not happen).
pub const NOT_SENT: &str = "not sent";

/// Clients of the other nodes.
pub struct Peers {
    me: u64,
    addrs: HashMap<u64, String>,
    clients: Mutex<HashMap<u64, CachePeerClient<Channel>>>,
    faults: Option<Arc<Faults>>,
    timeout: Duration,
}

impl Peers {
    pub fn new(
        me: u64,
        addrs: HashMap<u64, String>,
        faults: Option<Arc<Faults>>,
        timeout: Duration,
    ) -> Self {
        Self {
            me,
            addrs,
            clients: Mutex::default(),
            faults,
            timeout,
        }
    }

    async fn client(&self, to: u64) -> Result<CachePeerClient<Channel>, Status> {
        if let Some(c) = self.clients.lock().get(&to) {
            return Ok(c.clone());
        }
        let addr = self
            .addrs
            .get(&to)
            .ok_or_else(|| Status::unavailable(format!("{NOT_SENT}: no address for node {to}")))?;
        let ch = chassis::dial(addr)
            .await
            .map_err(|e| Status::unavailable(format!("{NOT_SENT}: node {to} at {addr}: {e}")))?;
        let c = CachePeerClient::new(ch).max_decoding_message_size(64 << 20);
        self.clients.lock().insert(to, c.clone());
        Ok(c)
    }

    async fn call<T, F, Fut>(&self, to: u64, timeout: Duration, f: F) -> Result<T, Status>
    where
        F: FnOnce(CachePeerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        if self.faults.as_ref().is_some_and(|f| f.is_cut(self.me, to)) {
            return Err(Status::unavailable(format!(
                "{NOT_SENT}: node {to} unreachable (partitioned)"
            )));
        }
        let c = self.client(to).await?;
        match tokio::time::timeout(timeout, f(c)).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {to} did not answer within {timeout:?}"
            ))),
        }
    }

    /// Fetch and Write may wait at the home for a recall (a slow near
    /// cache's ack and lease) and the store: `slow` bounds that.
    pub async fn fetch(
        &self,
        to: u64,
        req: FetchRequest,
        slow: Duration,
    ) -> Result<LineGrant, Status> {
        self.call(to, self.timeout + slow, |mut c| async move {
            c.fetch(req).await
        })
        .await
    }

    pub async fn write(
        &self,
        to: u64,
        req: WriteRequest,
        slow: Duration,
    ) -> Result<WriteReply, Status> {
        self.call(to, self.timeout * 2 + slow, |mut c| async move {
            c.write(req).await
        })
        .await
    }

    pub async fn recall(
        &self,
        to: u64,
        req: RecallRequest,
        timeout: Duration,
    ) -> Result<RecallReply, Status> {
        self.call(to, timeout, |mut c| async move { c.recall(req).await })
            .await
    }

    pub async fn release(
        &self,
        to: u64,
        req: ReleaseRequest,
        timeout: Duration,
    ) -> Result<(), Status> {
        self.call(to, timeout, |mut c| async move { c.release(req).await })
            .await
            .map(|_| ())
    }

    pub async fn store(&self, to: u64, cmd: StoreCommand) -> Result<u64, Status> {
        let req = match cmd {
            StoreCommand::Put { key, entry } => StoreRequest {
                key: key.to_vec(),
                op: 1,
                entry: Some(entry.to_proto()),
            },
            StoreCommand::Delete { key } => StoreRequest {
                key: key.to_vec(),
                op: 2,
                entry: None,
            },
            StoreCommand::Purge { .. } => {
                return Err(Status::invalid_argument(
                    "purges are proposed by the leader",
                ))
            }
        };
        self.call(to, self.timeout, |mut c| async move { c.store(req).await })
            .await
            .map(|r| r.entry.map_or(0, |e| e.version))
    }
}

/// Answers other nodes. The node and embedded store are set once the
/// server has built them (the gRPC routes exist before).
#[derive(Clone)]
pub struct PeerApi {
    pub me: u64,
    pub node: Arc<OnceLock<CacheNode>>,
    pub embedded: Arc<OnceLock<Arc<EmbeddedStore>>>,
    pub faults: Option<Arc<Faults>>,
}

impl PeerApi {
    fn node(&self, from: u64) -> Result<&CacheNode, Status> {
        if self
            .faults
            .as_ref()
            .is_some_and(|f| f.is_cut(from, self.me))
        {
            return Err(Status::unavailable("partitioned (test fault)"));
        }
        self.node
            .get()
            .ok_or_else(|| crate::node::unavailable("NOT_MEMBER", "node starting"))
    }
}

#[tonic::async_trait]
impl CachePeer for PeerApi {
    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<LineGrant>, Status> {
        let req = req.into_inner();
        let node = self.node(req.from)?;
        node.home_fetch(req).await.map(Response::new)
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let req = req.into_inner();
        let node = self.node(req.from)?.clone();
        // Runs to the end even if the caller gives up: a write abandoned
        // half-way would leave the directory unsure of the key.
        tokio::spawn(async move { node.home_write(req).await })
            .await
            .map_err(|e| Status::internal(format!("write task failed: {e}")))?
            .map(Response::new)
    }

    async fn recall(&self, req: Request<RecallRequest>) -> Result<Response<RecallReply>, Status> {
        let req = req.into_inner();
        let node = self.node(req.home)?.clone();
        if node.epoch().incarnation != Some(req.incarnation) {
            // Restarted (or fenced) since the home listed it: an empty
            // answer would hide the old run's near caches.
            return Err(Status::failed_precondition(format!(
                "node {} is not at incarnation {}",
                self.me, req.incarnation
            )));
        }
        let to = req.to();
        // Runs to the end even if the home gives up: a half-done near-cache
        // invalidation must still forget the clients that did not answer.
        let reply = tokio::spawn(async move { node.on_recall(&Bytes::from(req.key), to).await })
            .await
            .map_err(|e| Status::internal(format!("recall task failed: {e}")))?;
        Ok(Response::new(reply))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        let req = req.into_inner();
        let node = self.node(req.from)?;
        node.on_release(req)
            .await
            .map(|_| Response::new(ReleaseReply {}))
    }

    async fn store(&self, req: Request<StoreRequest>) -> Result<Response<StoreReply>, Status> {
        let req = req.into_inner();
        if self.faults.is_some() {
            // Test partitions: the sender is not named; refuse if this node
            // is cut from everyone.
            self.node(0)?;
        }
        let Some(store) = self.embedded.get() else {
            return Err(Status::failed_precondition(
                "this cache has no embedded store",
            ));
        };
        let st = store.group.status();
        if st.leader != Some(st.node) {
            return Err(consensus::grpc_status::to_status(
                &consensus::Error::NotLeader {
                    leader: st.leader,
                    leader_addr: None,
                    term: st.term,
                },
                crate::store::GROUP,
            ));
        }
        let key = Bytes::from(req.key);
        let cmd = match req.op {
            1 => StoreCommand::Put {
                key,
                entry: Entry::from_proto(req.entry),
            },
            2 => StoreCommand::Delete { key },
            op => return Err(Status::invalid_argument(format!("unknown store op {op}"))),
        };
        let bytes = store
            .group
            .propose(postcard::to_stdvec(&cmd).expect("store commands encode"))
            .await
            .map_err(|e| consensus::grpc_status::to_status(&e, crate::store::GROUP))?;
        let n = bytes
            .get(..8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        Ok(Response::new(StoreReply {
            entry: Some(proto::cache::v1::internal::Entry {
                version: n,
                ..Default::default()
            }),
        }))
    }
}
