//! Moving Raft messages between nodes.
//!
//! [`Transport`] is what a group's driver sees: a non-blocking `send` and an
//! address book. [`GrpcTransport`] is the real one: per peer, a bounded queue
//! drained by a task that keeps one client-streaming gRPC call open and
//! writes everything queued as one [`RaftBatch`]; it reconnects with
//! exponential backoff. [`RaftTransportService`] is the receiving end.
//! `crate::testkit` has an in-memory one that can drop, delay and partition.
//!
//! Snapshots whose data is a file (`crate::snapfile`) go on a
//! `SendSnapshot` call of their own, in chunks of [`SNAPSHOT_CHUNK`]
//! bytes, one transfer per (peer, group) at a time; the receiver writes
//! them to its snapshot directory and steps the message once the file is
//! durable. A failed transfer is simply dropped: raft-rs was told it
//! finished, the follower rejects the next append, and the leader sends a
//! snapshot again.
//!
//! Invariant: `send` never blocks. A dead or slow peer fills its own queue
//! and further messages to it are dropped (Raft retransmits), so it never
//! stalls a driver loop or any other peer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use proto::raft::v1::raft_transport_client::RaftTransportClient;
use proto::raft::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use proto::raft::v1::{RaftBatch, RaftEnvelope, SnapshotChunk, StreamClosed};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use crate::snapfile;
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
    /// Where snapshot files received from peers are written; `None` refuses
    /// file snapshots.
    fn snapshot_dir(&self) -> Option<crate::snapfile::SnapDir> {
        None
    }
}

/// Largest gRPC message accepted on the raft port (snapshots travel inline).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 512 << 20;

/// Bytes of a snapshot file per `SnapshotChunk`.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

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
    pub snapshots_sent: AtomicU64,
    pub snapshot_bytes_sent: AtomicU64,
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
    /// (peer, group) pairs with a snapshot transfer under way.
    transfers: parking_lot::Mutex<HashSet<(u64, u64)>>,
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
                transfers: parking_lot::Mutex::new(HashSet::new()),
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

impl GrpcTransport {
    /// Streams a snapshot file to its peer on a call of its own.
    fn send_snapshot_file(&self, group: u64, mut msg: Message, path: std::path::PathBuf) {
        let to = msg.to;
        if !self.inner.transfers.lock().insert((to, group)) {
            // One is under way; raft-rs asks again if the peer still needs it.
            self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        msg.mut_snapshot().data = Default::default();
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let result = stream_snapshot(&inner, to, group, &msg, &path).await;
            inner.transfers.lock().remove(&(to, group));
            match result {
                Ok(bytes) => {
                    inner.stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                    inner
                        .stats
                        .snapshot_bytes_sent
                        .fetch_add(bytes, Ordering::Relaxed);
                    tracing::info!(peer = to, group, bytes, "sent snapshot");
                }
                Err(e) => {
                    inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = to, group, error = %e, "snapshot transfer failed");
                }
            }
        });
    }
}

/// Sends the file at `path` as `msg`'s snapshot; returns the bytes sent.
async fn stream_snapshot(
    inner: &Arc<GrpcInner>,
    to: u64,
    group: u64,
    msg: &Message,
    path: &std::path::Path,
) -> Result<u64, String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let addr = inner
        .addrs
        .read()
        .get(&to)
        .cloned()
        .ok_or_else(|| format!("no address for node {to}"))?;
    let channel = connect(&addr).await?;
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let call = tokio::spawn(async move { client.send_snapshot(ReceiverStream::new(rx)).await });
    let mut first = Some(msg.write_to_bytes().map_err(|e| e.to_string())?);
    let mut sent = 0u64;
    loop {
        let mut data = vec![0u8; SNAPSHOT_CHUNK];
        let mut filled = 0;
        while filled < data.len() {
            match file.read(&mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        data.truncate(filled);
        let last = filled < SNAPSHOT_CHUNK;
        sent += filled as u64;
        let chunk = SnapshotChunk {
            from_node: inner.node_id,
            group_id: group,
            message: first.take().unwrap_or_default(),
            data,
            last,
        };
        if tx.send(chunk).await.is_err() {
            break;
        }
        if last {
            break;
        }
    }
    drop(tx);
    match call.await {
        Ok(Ok(_)) => Ok(sent),
        Ok(Err(status)) => Err(status.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens a channel to a peer's raft address (host:port or `http://…`),
/// resolving names with a bound: the system resolver can take many
/// seconds to give up on the name of a peer that is down, and callers must
/// come back to a restarted peer promptly.
pub async fn connect(addr: &str) -> Result<tonic::transport::Channel, String> {
    let hostport = addr.trim_start_matches("http://").to_owned();
    let sa = match hostport.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa,
        Err(_) => match tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::lookup_host(hostport.clone()),
        )
        .await
        {
            Ok(Ok(mut it)) => it
                .next()
                .ok_or_else(|| format!("resolving {hostport}: no address"))?,
            Ok(Err(e)) => return Err(format!("resolving {hostport}: {e}")),
            Err(_) => return Err(format!("resolving {hostport}: timed out")),
        },
    };
    tonic::transport::Endpoint::from_shared(format!("http://{sa}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

impl Transport for GrpcTransport {
    fn send(&self, group: u64, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == MessageType::MsgSnapshot {
                if let Some(path) = snapfile::file_of(&m.get_snapshot().data) {
                    self.send_snapshot_file(group, m, path);
                    continue;
                }
            }
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
        let channel = connect(&addr).await;
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
    async fn send_snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<tonic::Response<StreamClosed>, tonic::Status> {
        let Some(dir) = self.inbound.snapshot_dir() else {
            return Err(tonic::Status::failed_precondition(
                "this node takes no snapshot files",
            ));
        };
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Ok(tonic::Response::new(StreamClosed {}));
        };
        let (from, group) = (first.from_node, first.group_id);
        let mut msg = Message::parse_from_bytes(&first.message)
            .map_err(|e| tonic::Status::invalid_argument(format!("undecodable message: {e}")))?;
        let meta = msg.get_snapshot().get_metadata();
        let to = dir.file(group, meta.index, meta.term, Some(from));
        let (temp, file) = dir
            .temp(group)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut writer = Some(tokio::fs::File::from_std(file));
        let received = async {
            use tokio::io::AsyncWriteExt;
            let mut chunk = Some(first);
            let mut closed = self.closed.clone();
            while let Some(c) = chunk.take() {
                let w = writer.as_mut().expect("open until the end");
                w.write_all(&c.data).await?;
                if c.last {
                    return Ok(());
                }
                chunk = tokio::select! {
                    m = stream.message() => m.map_err(std::io::Error::other)?,
                    _ = closed.wait_for(|c| *c) => None,
                };
            }
            Err(std::io::Error::other(
                "the transfer ended before its last chunk",
            ))
        }
        .await;
        let committed = match received {
            Ok(()) => {
                let file = writer.take().expect("open").into_std().await;
                let (dir2, temp2, to2) = (dir.clone(), temp.clone(), to.clone());
                tokio::task::spawn_blocking(move || dir2.commit(file, &temp2, &to2))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            drop(writer);
            let _ = std::fs::remove_file(&temp);
            return Err(tonic::Status::aborted(format!("snapshot transfer: {e}")));
        }
        msg.mut_snapshot().data = snapfile::descriptor(&to).into();
        self.inbound.deliver(group, msg);
        Ok(tonic::Response::new(StreamClosed {}))
    }

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
