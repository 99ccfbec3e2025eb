//! A running lock-svc replica: the consensus node, the lock group, the gRPC
//! server (lock API and Raft transport on one port, so the address in a
//! leader hint is the one clients dial) and the leader's ticker.

use std::sync::Arc;
use std::time::Duration;

use consensus::{GrpcTransport, Inbound, Node, RaftTransportService, Transport};
use parking_lot::RwLock;
use proto::lock::v1::internal::{command::Cmd, Tick};
use proto::lock::v1::lock_service_server::LockServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::LockConfig;
use crate::machine::{LockMachine, Waits};
use crate::service::{Locks, GROUP};
use crate::state::LockState;

pub struct LockServer {
    pub node: Node,
    pub locks: Locks,
    pub addr: std::net::SocketAddr,
    close: watch::Sender<bool>,
    server: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl LockServer {
    /// Starts a replica serving on `listener`. Needs a multi-threaded
    /// tokio runtime.
    pub fn start(cfg: LockConfig, listener: tokio::net::TcpListener) -> Result<Self, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut ccfg = consensus::Config::new(cfg.node_id, &cfg.data_dir);
        (cfg.raft)(&mut ccfg);
        let mut transport: Arc<dyn Transport> =
            Arc::new(GrpcTransport::new(cfg.node_id, cfg.peers.clone()));
        if let Some(f) = &cfg.faults {
            transport = f.transport(cfg.node_id, transport);
        }
        let node = Node::open(ccfg, transport).map_err(|e| e.to_string())?;
        let state = Arc::new(RwLock::new(LockState::new(cfg.limits)));
        let waits = Arc::new(Waits::default());
        let mut voters: Vec<u64> = cfg.peers.keys().copied().collect();
        voters.sort_unstable();
        let voters = if cfg.bootstrap { voters } else { Vec::new() };
        let group = node
            .start_group(
                GROUP,
                &voters,
                Box::new(LockMachine {
                    state: state.clone(),
                    waits: waits.clone(),
                }),
            )
            .map_err(|e| e.to_string())?;
        let locks = Locks {
            group,
            state,
            waits,
            limits: cfg.limits,
        };
        let (close, closed) = watch::channel(false);
        let mut inbound: Arc<dyn Inbound> = Arc::new(node.clone());
        if let Some(f) = &cfg.faults {
            inbound = f.inbound(cfg.node_id, inbound);
        }
        let raft = RaftTransportService::new(inbound, closed.clone());
        let api = LockServiceServer::new(locks.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut stop = closed.clone();
        let server = tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(raft.into_server())
                .add_service(api)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|c| *c).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "lock-svc gRPC server failed");
            }
        });
        let ticker = tokio::spawn(tick_loop(locks.clone(), cfg.tick_interval, closed));
        Ok(Self {
            node,
            locks,
            addr,
            close,
            server,
            ticker,
        })
    }

    /// Graceful stop: hand leadership to a peer if this replica leads, stop
    /// serving, stop the group (everything acknowledged is already on disk).
    pub async fn shutdown(self) {
        let st = self.locks.group.status();
        if st.is_leader() {
            if let Some(&to) = st.voters.iter().find(|&&v| v != st.node) {
                if let Err(e) = self.locks.group.transfer_leader(to).await {
                    tracing::warn!(error = %e, "leader transfer before shutdown failed");
                }
            }
        }
        self.kill().await;
    }

    /// Abrupt stop (tests): connections drop, the group stops.
    pub async fn kill(self) {
        self.locks.waits.close();
        let _ = self.close.send(true);
        self.ticker.abort();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        let node = self.node;
        let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    }
}

/// On the leader, proposes a `Tick` every `interval` while there are
/// sessions, and once per new term with `refresh_sessions` so an election
/// does not expire sessions whose keep-alives could not get through.
async fn tick_loop(locks: Locks, interval: Duration, mut closed: watch::Receiver<bool>) {
    let mut ticked_term = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let st = locks.group.status();
        if !st.is_leader() {
            ticked_term = 0;
            continue;
        }
        let refresh = st.term != ticked_term;
        if !refresh && locks.state.read().sessions.is_empty() {
            continue;
        }
        match locks
            .propose(Cmd::Tick(Tick {
                refresh_sessions: refresh,
            }))
            .await
        {
            Ok(_) => ticked_term = st.term,
            Err(e) => tracing::debug!(error = %e, "tick not committed"),
        }
    }
}
