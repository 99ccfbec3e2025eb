//! Moving Raft messages between nodes.
//!
//! [`Transport`] is what a group's driver sees: a non-blocking `send` and an
//! address book. [`GrpcTransport`] is the real one: per peer, a bounded queue
//! drained by a task that keeps one client-streaming gRPC call open and
//! writes everything queued as one [`RaftBatch`]; it reconnects with
//! exponential backoff. [`RaftTransportService`] is the receiving end.
//! `crate::testkit` has an in-memory one that can drop, delay and partition.
//!
//! Invariant: `send` never blocks. A dead or slow peer fills its own queue
//! and further messages to it are dropped (Raft retransmits), so it never
//! stalls a driver loop or any other peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use proto::raft::v1::raft_transport_client::RaftTransportClient;
use proto::raft::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use proto::raft::v1::{RaftBatch, RaftEnvelope, StreamClosed};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How a driver hands messages to other nodes.
pub trait Transport: Send + Sync + 'static {
    /// Queues messages of `group` for their `to` nodes. Never blocks; may
    /// drop messages (Raft tolerates loss).
    fn send(&self, group: u64, msgs: Vec<Message>);
    /// The address clients and peers use to reach `node`, if known.
    fn peer_addr(&self, node: u64) -> Option<String>;
    /// Learns (or updates) a peer's address, e.g. when it joins a group.
    fn set_peer_addr(&self, node: u64, addr: String);
}

/// Where inbound messages go: implemented by [`crate::Node`].
pub trait Inbound: Send + Sync + 'static {
    fn deliver(&self, group: u64, msg: Message);
}

/// Largest gRPC message accepted on the raft port (snapshots travel inline).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 512 << 20;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 16_384;
/// Envelopes written per stream message.
const MAX_BATCH: usize = 1_024;

/// Counters of the transport, for metrics.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The gRPC transport. Cloning shares the peers and queues.
#[derive(Clone)]
pub struct GrpcTransport {
    inner: Arc<GrpcInner>,
}

struct GrpcInner {
    node_id: u64,
    runtime: tokio::runtime::Handle,
    addrs: RwLock<HashMap<u64, String>>,
    queues: RwLock<HashMap<u64, mpsc::Sender<RaftEnvelope>>>,
    stats: TransportStats,
}

impl GrpcTransport {
    /// `peers` maps node ids to their raft addresses (host:port; an
    /// `http://` prefix is added). Must be called inside a tokio runtime.
    pub fn new(node_id: u64, peers: HashMap<u64, String>) -> Self {
        Self {
            inner: Arc::new(GrpcInner {
                node_id,
                runtime: tokio::runtime::Handle::current(),
                addrs: RwLock::new(peers),
                queues: RwLock::new(HashMap::new()),
                stats: TransportStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &TransportStats {
        &self.inner.stats
    }

    fn queue(&self, to: u64) -> mpsc::Sender<RaftEnvelope> {
        if let Some(q) = self.inner.queues.read().get(&to) {
            return q.clone();
        }
        let mut queues = self.inner.queues.write();
        queues
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                let inner = self.inner.clone();
                self.inner.runtime.spawn(peer_loop(inner, to, rx));
                tx
            })
            .clone()
    }
}

impl Transport for GrpcTransport {
    fn send(&self, group: u64, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let envelope = match m.write_to_bytes() {
                Ok(bytes) => RaftEnvelope {
                    group_id: group,
                    message: bytes,
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode raft message");
                    continue;
                }
            };
            match self.queue(to).try_send(envelope) {
                Ok(()) => {}
                Err(_) => {
                    self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn peer_addr(&self, node: u64) -> Option<String> {
        self.inner.addrs.read().get(&node).cloned()
    }

    fn set_peer_addr(&self, node: u64, addr: String) {
        if node != self.inner.node_id {
            self.inner.addrs.write().insert(node, addr);
        }
    }
}

/// Keeps one stream open to `to` and drains its queue into it.
async fn peer_loop(inner: Arc<GrpcInner>, to: u64, mut rx: mpsc::Receiver<RaftEnvelope>) {
    let mut backoff = Duration::from_millis(20);
    // An envelope taken from the queue before the stream broke.
    let mut carry: Option<RaftEnvelope> = None;
    loop {
        let Some(addr) = inner.addrs.read().get(&to).cloned() else {
            // Unknown peer: drop what is queued until someone tells us.
            if rx.recv().await.is_none() {
                return;
            }
            inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Resolve with a bound: the system resolver can take many seconds
        // to give up on the name of a peer that is down, and this loop must
        // come back to a restarted peer promptly.
        let hostport = addr.trim_start_matches("http://").to_owned();
        let resolved = match hostport.parse::<std::net::SocketAddr>() {
            Ok(sa) => Ok(sa),
            Err(_) => match tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::lookup_host(hostport.clone()),
            )
            .await
            {
                Ok(Ok(mut it)) => it.next().ok_or_else(|| "no address".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("resolution timed out".to_owned()),
            },
        };
        let channel = match resolved {
            Ok(sa) => match tonic::transport::Endpoint::from_shared(format!("http://{sa}")) {
                Ok(ep) => ep
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .connect()
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(format!("resolving {hostport}: {e}")),
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = to, %addr, error = %e, "connect failed");
                // Messages queued while the peer is down are stale; shed
                // them so the peer gets fresh state when it returns.
                while rx.try_recv().is_ok() {
                    inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let (tx, stream_rx) = mpsc::channel::<RaftBatch>(64);
        let call = tokio::spawn(async move { client.stream(ReceiverStream::new(stream_rx)).await });
        loop {
            let first = match carry.take() {
                Some(e) => e,
                None => match rx.recv().await {
                    Some(e) => e,
                    None => {
                        call.abort();
                        return;
                    }
                },
            };
            let mut envelopes = vec![first];
            while envelopes.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(e) => envelopes.push(e),
                    Err(_) => break,
                }
            }
            let n = envelopes.len() as u64;
            let batch = RaftBatch {
                from_node: inner.node_id,
                envelopes,
            };
            if let Err(mpsc::error::SendError(batch)) = tx.send(batch).await {
                // The call ended (peer gone): keep the newest message and
                // reconnect.
                carry = batch.envelopes.into_iter().last();
                inner.stats.dropped.fetch_add(n - 1, Ordering::Relaxed);
                break;
            }
            inner.stats.sent.fetch_add(n, Ordering::Relaxed);
        }
        if let Ok(Err(status)) = call.await {
            tracing::debug!(peer = to, %status, "raft stream closed");
        }
        inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
    }
}

/// The receiving end of the raft transport, serving `RaftTransport`.
pub struct RaftTransportService {
    inbound: Arc<dyn Inbound>,
    closed: tokio::sync::watch::Receiver<bool>,
}

impl RaftTransportService {
    /// Streams end when `closed` turns true, so a server's graceful
    /// shutdown completes and peers reconnect to whatever replaces it.
    pub fn new(inbound: Arc<dyn Inbound>, closed: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { inbound, closed }
    }

    /// The tonic server for this service, with limits raised for snapshots.
    pub fn into_server(self) -> RaftTransportServer<Self> {
        RaftTransportServer::new(self)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<tonic::Response<StreamClosed>, tonic::Status> {
        let mut stream = request.into_inner();
        let mut closed = self.closed.clone();
        loop {
            let batch = tokio::select! {
                m = stream.message() => match m? {
                    Some(b) => b,
                    None => break,
                },
                _ = closed.wait_for(|c| *c) => {
                    return Err(tonic::Status::unavailable("node is shutting down"));
                }
            };
            for env in batch.envelopes {
                match Message::parse_from_bytes(&env.message) {
                    Ok(msg) => self.inbound.deliver(env.group_id, msg),
                    Err(e) => {
                        tracing::warn!(from = batch.from_node, error = %e, "undecodable raft message");
                    }
                }
            }
        }
        Ok(tonic::Response::new(StreamClosed {}))
    }
}
