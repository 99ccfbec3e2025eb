//! An in-process cluster for fault tests, shared by every service's tests.
//!
//! [`SimNetwork`] is a [`Transport`] whose links can be cut (partitions,
//! isolation), made lossy (seeded, so a failing run can be replayed) or slow
//! (delivery after a random delay). [`Cluster`] runs N [`Node`]s on it, each
//! with its own data directory, and can crash a node (stop its threads,
//! keeping only what is on disk) and restart it from that directory.
//!
//! Time is real (Raft ticks every 10 ms), so tests wait on conditions with
//! generous bounds rather than counting ticks; the faults themselves are
//! deterministic.
//!
//! For benchmarks and process tests: [`free_port`], [`Procs`] (children
//! killed on drop), [`release_binary`] and [`spawn_replicas`] (three
//! replicas of a service binary configured by `DSYNC_*` variables).

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use raft::eraftpb::Message;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::group::GroupHandle;
use crate::node::Node;
use crate::state_machine::StateMachine;
use crate::transport::{Inbound, Transport};

struct NetState {
    nodes: HashMap<u64, Arc<dyn Inbound>>,
    /// Directed links that deliver nothing.
    cut: HashSet<(u64, u64)>,
    drop_rate: f64,
    delay: Option<(Duration, Duration)>,
    rng: StdRng,
    delivered: u64,
    dropped: u64,
}

struct Delayed {
    due: Instant,
    seq: u64,
    to: u64,
    group: u64,
    msg: Message,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    // Reversed: BinaryHeap is a max-heap and we pop the earliest.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// An in-memory network between simulated nodes.
pub struct SimNetwork {
    state: Mutex<NetState>,
    queue: Mutex<(BinaryHeap<Delayed>, u64)>,
    wake: Condvar,
}

impl SimNetwork {
    /// A network with no faults; `seed` drives drops and delays.
    pub fn new(seed: u64) -> Arc<Self> {
        let net = Arc::new(Self {
            state: Mutex::new(NetState {
                nodes: HashMap::new(),
                cut: HashSet::new(),
                drop_rate: 0.0,
                delay: None,
                rng: StdRng::seed_from_u64(seed),
                delivered: 0,
                dropped: 0,
            }),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            wake: Condvar::new(),
        });
        let weak = Arc::downgrade(&net);
        std::thread::Builder::new()
            .name("sim-net".into())
            .spawn(move || delay_loop(weak))
            .expect("spawn sim-net thread");
        net
    }

    /// The transport node `node` sends through.
    pub fn transport(self: &Arc<Self>, node: u64) -> Arc<dyn Transport> {
        Arc::new(SimTransport {
            from: node,
            net: self.clone(),
        })
    }

    pub fn register(&self, node: u64, inbound: Arc<dyn Inbound>) {
        self.state.lock().nodes.insert(node, inbound);
    }

    pub fn unregister(&self, node: u64) {
        self.state.lock().nodes.remove(&node);
    }

    /// Cuts every link between the two sides, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut s = self.state.lock();
        for &x in a {
            for &y in b {
                s.cut.insert((x, y));
                s.cut.insert((y, x));
            }
        }
    }

    /// Cuts `node` off from every other node (registered or not yet).
    pub fn isolate(&self, node: u64, all: &[u64]) {
        let others: Vec<u64> = all.iter().copied().filter(|&n| n != node).collect();
        self.partition(&[node], &others);
    }

    /// Cuts only the link from `from` to `to`.
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.state.lock().cut.insert((from, to));
    }

    /// Restores every link and removes loss and delay.
    pub fn heal(&self) {
        let mut s = self.state.lock();
        s.cut.clear();
        s.drop_rate = 0.0;
        s.delay = None;
    }

    /// Drops each message with probability `rate` (0.0..=1.0).
    pub fn set_drop_rate(&self, rate: f64) {
        self.state.lock().drop_rate = rate.clamp(0.0, 1.0);
    }

    /// Delivers each message after a uniform delay in `[min, max]`.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.state.lock().delay = Some((min, max.max(min)));
    }

    /// (delivered, dropped) message counts so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.delivered, s.dropped)
    }

    fn route(&self, from: u64, group: u64, msgs: Vec<Message>) {
        let mut now_deliver = Vec::new();
        {
            let mut s = self.state.lock();
            for m in msgs {
                let to = m.to;
                let rate = s.drop_rate;
                let drop = s.cut.contains(&(from, to))
                    || !s.nodes.contains_key(&to)
                    || (rate > 0.0 && s.rng.random_bool(rate));
                if drop {
                    s.dropped += 1;
                    continue;
                }
                s.delivered += 1;
                if let Some((min, max)) = s.delay {
                    let d = s.rng.random_range(min..=max);
                    let mut q = self.queue.lock();
                    q.1 += 1;
                    let seq = q.1;
                    q.0.push(Delayed {
                        due: Instant::now() + d,
                        seq,
                        to,
                        group,
                        msg: m,
                    });
                    self.wake.notify_one();
                } else {
                    now_deliver.push((s.nodes[&to].clone(), m));
                }
            }
        }
        for (inbound, m) in now_deliver {
            inbound.deliver(group, m);
        }
    }
}

fn delay_loop(net: std::sync::Weak<SimNetwork>) {
    loop {
        let Some(net) = net.upgrade() else { return };
        let mut due = Vec::new();
        {
            let mut q = net.queue.lock();
            let now = Instant::now();
            while q.0.peek().is_some_and(|d| d.due <= now) {
                due.push(q.0.pop().expect("peeked"));
            }
            if due.is_empty() {
                let wait =
                    q.0.peek()
                        .map_or(Duration::from_millis(20), |d| d.due - now)
                        .min(Duration::from_millis(20));
                net.wake.wait_for(&mut q, wait);
            }
        }
        for d in due {
            // Links may have been cut while the message was in flight.
            let target = {
                let s = net.state.lock();
                s.nodes.get(&d.to).cloned()
            };
            if let Some(t) = target {
                t.deliver(d.group, d.msg);
            }
        }
    }
}

struct SimTransport {
    from: u64,
    net: Arc<SimNetwork>,
}

impl Transport for SimTransport {
    fn send(&self, group: u64, msgs: Vec<Message>) {
        self.net.route(self.from, group, msgs);
    }

    fn peer_addr(&self, node: u64) -> Option<String> {
        Some(format!("sim-node-{node}"))
    }

    fn set_peer_addr(&self, _node: u64, _addr: String) {}
}

/// Builds a state machine for (node, group).
pub type SmFactory = Arc<dyn Fn(u64, u64) -> Box<dyn StateMachine> + Send + Sync>;

/// N nodes, each hosting the same groups, on a [`SimNetwork`].
pub struct Cluster {
    pub net: Arc<SimNetwork>,
    pub node_ids: Vec<u64>,
    base: tempfile::TempDir,
    nodes: HashMap<u64, Node>,
    factory: SmFactory,
    tweak: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl Cluster {
    /// Starts nodes 1..=n with `groups`, all founding voters.
    pub fn new(n: u64, groups: &[u64], factory: SmFactory) -> Self {
        Self::with_config(n, groups, factory, |_| {})
    }

    /// Like `new`, letting the test adjust each node's [`Config`].
    pub fn with_config(
        n: u64,
        groups: &[u64],
        factory: SmFactory,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Self {
        let mut c = Self {
            net: SimNetwork::new(0x5eed),
            node_ids: (1..=n).collect(),
            base: tempfile::tempdir().expect("tempdir"),
            nodes: HashMap::new(),
            factory,
            tweak: Arc::new(tweak),
        };
        let voters = c.node_ids.clone();
        for id in voters.clone() {
            c.start_node(id, groups, &voters).expect("start node");
        }
        c
    }

    pub fn data_dir(&self, node: u64) -> PathBuf {
        self.base.path().join(format!("node-{node}"))
    }

    /// Starts (or restarts from its directory) `node` with `groups`.
    /// `voters` bootstraps groups that have no state yet; pass `&[]` for a
    /// node joining existing groups.
    pub fn start_node(&mut self, node: u64, groups: &[u64], voters: &[u64]) -> Result<Node> {
        let mut cfg = Config::new(node, self.data_dir(node));
        (self.tweak)(&mut cfg);
        let n = Node::open(cfg, self.net.transport(node))?;
        for &g in groups {
            n.start_group(g, voters, (self.factory)(node, g))?;
        }
        self.net.register(node, Arc::new(n.clone()));
        if !self.node_ids.contains(&node) {
            self.node_ids.push(node);
        }
        self.nodes.insert(node, n.clone());
        Ok(n)
    }

    /// Restarts a crashed node with the groups it has on disk.
    pub fn restart(&mut self, node: u64) -> Result<Node> {
        let store = crate::storage::LogStore::open(&self.data_dir(node))?;
        let groups = store.groups();
        drop(store);
        self.start_node(node, &groups, &[])
    }

    /// Stops `node` abruptly: its threads end, in-flight requests fail,
    /// only what it had fsync'd survives.
    pub fn crash(&mut self, node: u64) {
        self.net.unregister(node);
        if let Some(n) = self.nodes.remove(&node) {
            n.shutdown();
        }
    }

    pub fn node(&self, node: u64) -> &Node {
        &self.nodes[&node]
    }

    pub fn is_running(&self, node: u64) -> bool {
        self.nodes.contains_key(&node)
    }

    pub fn running(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.nodes.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn handle(&self, node: u64, group: u64) -> GroupHandle {
        self.nodes[&node].group(group).expect("group running")
    }

    /// The running node that leads `group` in the highest term, if one
    /// does among `among`.
    pub fn leader_among(&self, group: u64, among: &[u64]) -> Option<u64> {
        among
            .iter()
            .filter_map(|n| self.nodes.get(n)?.group(group).map(|g| g.status()))
            .filter(|s| s.is_leader())
            .max_by_key(|s| s.term)
            .map(|s| s.node)
    }

    /// Waits until one of `among` leads `group` and the others that are
    /// running agree on it.
    pub async fn wait_leader_among(&self, group: u64, among: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader_among(group, among) {
                let agree = among
                    .iter()
                    .filter_map(|n| self.nodes.get(n))
                    .all(|n| n.group(group).is_some_and(|g| g.status().leader == Some(l)));
                if agree {
                    return l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader for group {group} among {among:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_leader(&self, group: u64) -> u64 {
        let all = self.running();
        self.wait_leader_among(group, &all, Duration::from_secs(10))
            .await
    }

    /// Proposes through whichever node leads, following NotLeader hints and
    /// retrying Dropped/Timeout until `within` passes.
    pub async fn propose(&self, group: u64, cmd: Vec<u8>, within: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut last = Error::Timeout;
        while Instant::now() < deadline {
            let target = self
                .leader_among(group, &self.running())
                .or_else(|| self.running().first().copied());
            if let Some(t) = target {
                match self.handle(t, group).propose(cmd.clone()).await {
                    Ok(r) => return Ok(r),
                    Err(e) => last = e,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last)
    }

    /// Waits until every running node applied at least `index` in `group`.
    pub async fn wait_applied(&self, group: u64, index: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let behind: Vec<(u64, u64)> = self
                .running()
                .into_iter()
                .map(|n| (n, self.handle(n, group).status().applied))
                .filter(|(_, a)| *a < index)
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {group}: nodes {behind:?} did not apply {index} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, n) in self.nodes.drain() {
            n.shutdown();
        }
    }
}

/// A state machine that records every command it applies, in order. Its
/// response to a command is the index it was applied at (big-endian u64).
#[derive(Clone, Default)]
pub struct RecordingSm {
    pub log: Arc<Mutex<Vec<Applied>>>,
}

/// (index, command) as applied.
pub type Applied = (u64, Vec<u8>);

impl RecordingSm {
    pub fn entries(&self) -> Vec<Applied> {
        self.log.lock().clone()
    }

    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.log.lock().iter().map(|(_, c)| c.clone()).collect()
    }
}

impl StateMachine for RecordingSm {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.log.lock().push((index, command.to_vec()));
        index.to_be_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        let log = self.log.lock();
        let mut out = Vec::new();
        for (i, c) in log.iter() {
            out.extend_from_slice(&i.to_be_bytes());
            out.extend_from_slice(&(c.len() as u32).to_be_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    fn restore(&mut self, _index: u64, mut data: &[u8]) -> std::result::Result<(), String> {
        let mut log = Vec::new();
        while !data.is_empty() {
            if data.len() < 12 {
                return Err("truncated snapshot".into());
            }
            let i = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
            let n = u32::from_be_bytes(data[8..12].try_into().expect("4 bytes")) as usize;
            if data.len() < 12 + n {
                return Err("truncated snapshot".into());
            }
            log.push((i, data[12..12 + n].to_vec()));
            data = &data[12 + n..];
        }
        *self.log.lock() = log;
        Ok(())
    }
}

/// A factory of [`RecordingSm`]s that keeps each (node, group)'s log where
/// the test can read it, across restarts (a restart gets a fresh log, as a
/// real process would, refilled by snapshot restore and replay).
#[derive(Clone, Default)]
pub struct Recorders {
    map: Arc<Mutex<HashMap<(u64, u64), RecordingSm>>>,
}

impl Recorders {
    pub fn factory(&self) -> SmFactory {
        let map = self.map.clone();
        Arc::new(move |node, group| {
            let sm = RecordingSm::default();
            map.lock().insert((node, group), sm.clone());
            Box::new(sm)
        })
    }

    pub fn get(&self, node: u64, group: u64) -> RecordingSm {
        self.map.lock()[&(node, group)].clone()
    }
}

/// A node served over real gRPC on 127.0.0.1, for socket-level tests and
/// benchmarks.
pub struct GrpcNode {
    pub node: Node,
    pub addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    close: tokio::sync::watch::Sender<bool>,
}

/// Binds `n` listeners on 127.0.0.1 ephemeral ports, for nodes 1..=n, and
/// returns them with the address map (node id → host:port) peers use.
pub async fn bind_local(
    n: usize,
) -> std::io::Result<(Vec<tokio::net::TcpListener>, HashMap<u64, String>)> {
    let mut listeners = Vec::with_capacity(n);
    let mut addrs = HashMap::with_capacity(n);
    for id in 1..=n as u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.insert(id, l.local_addr()?.to_string());
        listeners.push(l);
    }
    Ok((listeners, addrs))
}

/// A free TCP port on 127.0.0.1 (bound, read and released, for a process
/// that binds it itself; another may take it meanwhile).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Child processes, killed and reaped when this is dropped (benchmarks and
/// process tests never leave replicas behind, even when they panic).
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The release build of binary `bin` in the workspace's target directory
/// (`$CARGO_TARGET_DIR`, else `<workspace>/target`).
pub fn release_binary(bin: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("release")
        .join(bin)
}

/// Starts three replicas of the service binary `bin` on free 127.0.0.1
/// ports, configured only by `DSYNC_*` variables (node id, listen address,
/// peers, data directory `<dir>/n<id>`; `RUST_LOG=warn`) plus `env`.
/// Answers the processes and their addresses (node 1 first).
pub fn spawn_replicas(
    bin: &std::path::Path,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> (Procs, Vec<String>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, p) in ports.iter().enumerate() {
        let mut cmd = std::process::Command::new(bin);
        cmd.env("DSYNC_NODE_ID", (i + 1).to_string())
            .env("DSYNC_LISTEN", format!("127.0.0.1:{p}"))
            .env("DSYNC_PEERS", peers.join(","))
            .env("DSYNC_DATA_DIR", dir.join(format!("n{}", i + 1)))
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        procs.0.push(child);
    }
    (
        procs,
        ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
    )
}

impl GrpcNode {
    /// Opens a node on `listener` with `peers` (id → host:port), starts
    /// `groups` (bootstrapped with `voters` when new) and serves the raft
    /// transport. Must run inside a multi-threaded tokio runtime.
    pub fn start(
        cfg: Config,
        listener: tokio::net::TcpListener,
        peers: HashMap<u64, String>,
        groups: &[u64],
        voters: &[u64],
        factory: &SmFactory,
    ) -> Result<Self> {
        let id = cfg.node_id;
        let addr = listener.local_addr()?;
        let transport = crate::transport::GrpcTransport::new(id, peers);
        let node = Node::open(cfg, Arc::new(transport))?;
        for &g in groups {
            node.start_group(g, voters, factory(id, g))?;
        }
        let (close, closed) = tokio::sync::watch::channel(false);
        let svc =
            crate::transport::RaftTransportService::new(Arc::new(node.clone()), closed.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tokio::spawn(async move {
            let mut closed = closed;
            let res = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(svc.into_server())
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = closed.wait_for(|c| *c).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "raft server failed");
            }
        });
        Ok(Self {
            node,
            addr,
            server,
            close,
        })
    }

    /// Stops abruptly: connections drop mid-stream, groups stop; only what
    /// was fsync'd remains.
    pub async fn kill(self) {
        let _ = self.close.send(true);
        // Streams end at once; bound the wait for hyper to close anyway.
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            tracing::warn!("raft server did not stop within 2s; aborting it");
            server.abort();
        }
        let node = self.node;
        let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    }
}

/// Link faults for nodes on real sockets: a wrapper around any transport
/// (outbound) and inbound handler that drops messages on cut links. Gives
/// partitions over real gRPC without touching the network.
#[derive(Default)]
pub struct Faults {
    cut: Mutex<HashSet<(u64, u64)>>,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Cuts `node` off from every node in `others`, both ways.
    pub fn isolate(&self, node: u64, others: &[u64]) {
        let mut cut = self.cut.lock();
        for &o in others.iter().filter(|&&o| o != node) {
            cut.insert((node, o));
            cut.insert((o, node));
        }
    }

    pub fn heal(&self) {
        self.cut.lock().clear();
    }

    pub fn is_cut(&self, from: u64, to: u64) -> bool {
        self.cut.lock().contains(&(from, to))
    }

    /// Wraps `node`'s outbound transport.
    pub fn transport(self: &Arc<Self>, node: u64, inner: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(FaultyTransport {
            node,
            inner,
            faults: self.clone(),
        })
    }

    /// Wraps `node`'s inbound handler.
    pub fn inbound(self: &Arc<Self>, node: u64, inner: Arc<dyn Inbound>) -> Arc<dyn Inbound> {
        Arc::new(FaultyInbound {
            node,
            inner,
            faults: self.clone(),
        })
    }
}

struct FaultyTransport {
    node: u64,
    inner: Arc<dyn Transport>,
    faults: Arc<Faults>,
}

impl Transport for FaultyTransport {
    fn send(&self, group: u64, mut msgs: Vec<Message>) {
        msgs.retain(|m| !self.faults.is_cut(self.node, m.to));
        self.inner.send(group, msgs);
    }
    fn peer_addr(&self, node: u64) -> Option<String> {
        self.inner.peer_addr(node)
    }
    fn set_peer_addr(&self, node: u64, addr: String) {
        self.inner.set_peer_addr(node, addr)
    }
}

struct FaultyInbound {
    node: u64,
    inner: Arc<dyn Inbound>,
    faults: Arc<Faults>,
}

impl Inbound for FaultyInbound {
    fn deliver(&self, group: u64, msg: Message) {
        if !self.faults.is_cut(msg.from, self.node) {
            self.inner.deliver(group, msg);
        }
    }
}
