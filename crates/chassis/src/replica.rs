//! A running replica: the consensus node and the one gRPC server that
//! carries the service's API, the Raft transport, `grpc.health.v1`,
//! reflection and the admin API — one port, so the address in a leader hint
//! is the one clients dial.
//!
//! Lifecycle: [`Replica::open`] opens the node (recovering its log); the
//! service starts its groups on [`Replica::node`] and calls
//! [`Replica::serve`] with its routes; [`Replica::shutdown`] hands
//! leadership away, reports NOT_SERVING, stops accepting and stops the node.

use std::sync::Arc;
use std::time::Duration;

use consensus::{GrpcTransport, Inbound, Node, RaftTransportService, Transport};
use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::admin_server::AdminServer;
use proto::admin::v1::AddMemberRequest;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::admin::{healthy, AdminService};
use crate::config::ReplicaConfig;
use crate::layer::{GrpcLayer, Limits};

/// Health-check service name that reports SERVING while the process runs
/// (Kubernetes liveness); "" and the service's own name report readiness.
pub const LIVENESS: &str = "liveness";

pub struct Replica {
    pub cfg: ReplicaConfig,
    node: Node,
    close: watch::Sender<bool>,
    closed: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
}

impl Replica {
    /// Opens the node (log recovery) with the gRPC transport. Needs a
    /// multi-threaded tokio runtime.
    pub fn open(cfg: ReplicaConfig) -> Result<Self, String> {
        let mut ccfg = consensus::Config::new(cfg.node_id, &cfg.data_dir);
        (cfg.raft)(&mut ccfg);
        let mut transport: Arc<dyn Transport> =
            Arc::new(GrpcTransport::new(cfg.node_id, cfg.peers.clone()));
        if let Some(f) = &cfg.faults {
            transport = f.transport(cfg.node_id, transport);
        }
        let node = Node::open(ccfg, transport).map_err(|e| e.to_string())?;
        if let Some(addr) = cfg.metrics_listen {
            crate::metrics::install(addr)?;
        }
        let (close, closed) = watch::channel(false);
        Ok(Self {
            cfg,
            node,
            close,
            closed,
            tasks: Vec::new(),
            server: None,
        })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Turns true when the replica stops; services stop their loops on it.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.clone()
    }

    /// Serves `routes` (the service API) plus Raft, health, reflection and
    /// admin on `listener`, behind the [`GrpcLayer`]. `health_names` are the
    /// gRPC service names reported SERVING once the replica is healthy.
    pub fn serve(
        &mut self,
        listener: tokio::net::TcpListener,
        routes: Routes,
        health_names: &[&'static str],
    ) -> Result<(), String> {
        let mut inbound: Arc<dyn Inbound> = Arc::new(self.node.clone());
        if let Some(f) = &self.cfg.faults {
            inbound = f.inbound(self.cfg.node_id, inbound);
        }
        let raft = RaftTransportService::new(inbound, self.closed.clone());
        let (reporter, health) = tonic_health::server::health_reporter();
        // Liveness answers SERVING whenever the process serves at all: a
        // replica cut off from its quorum is not ready, but restarting it
        // would not help.
        tokio::spawn({
            let r = reporter.clone();
            async move { r.set_service_status(LIVENESS, ServingStatus::Serving).await }
        });
        // grpcurl and other tools speak either reflection version.
        let described = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = described().build_v1().map_err(|e| e.to_string())?;
        let reflection_alpha = described().build_v1alpha().map_err(|e| e.to_string())?;
        let admin = AdminServer::new(AdminService {
            service: self.cfg.service,
            node: self.node.clone(),
            advertise: self.cfg.advertise.clone(),
            features: self.cfg.features.clone(),
            closed: self.closed.clone(),
        });
        let routes = routes
            .add_service(raft.into_server())
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(admin);
        let layer = GrpcLayer::new(Limits {
            max_concurrent: self.cfg.max_concurrent_requests,
            default_timeout: self.cfg.request_timeout,
            long_methods: self.cfg.long_methods.clone(),
        });
        // Every connection reports the frames it writes, so an answer that
        // must reach its client is known to have been sent (see delivery).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                conn.map(|tcp| {
                    let _ = tcp.set_nodelay(true);
                    crate::delivery::Tracked::new(tcp)
                })
            },
        );
        let mut stop = self.closed.clone();
        self.server = Some(tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .layer(layer)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|c| *c).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));
        let names: Vec<&'static str> = std::iter::once("")
            .chain(health_names.iter().copied())
            .collect();
        self.tasks.push(tokio::spawn(health_loop(
            self.node.clone(),
            reporter,
            names,
            self.closed.clone(),
        )));
        self.tasks.push(tokio::spawn(crate::metrics::raft_gauges(
            self.node.clone(),
            self.closed.clone(),
        )));
        if self.cfg.join {
            self.tasks.push(tokio::spawn(join_loop(
                self.node.clone(),
                self.cfg.clone(),
                self.closed.clone(),
            )));
        }
        Ok(())
    }

    /// Graceful stop: hand away leadership, stop serving, stop the node.
    pub async fn shutdown(self) {
        for g in self.node.groups() {
            let Some(h) = self.node.group(g) else {
                continue;
            };
            let st = h.status();
            if !st.is_leader() {
                continue;
            }
            if let Some(&to) = st.voters.iter().find(|&&v| v != st.node) {
                if let Err(e) = h.transfer_leader(to).await {
                    tracing::warn!(group = g, error = %e, "leader transfer before shutdown failed");
                }
            }
        }
        self.kill().await;
    }

    /// Abrupt stop: connections close, groups stop; what was acknowledged
    /// is on disk.
    pub async fn kill(mut self) {
        let _ = self.close.send(true);
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    }
}

/// Reports SERVING while the replica is a member of all its groups and
/// they know a leader; NOT_SERVING otherwise.
async fn health_loop(
    node: Node,
    reporter: tonic_health::server::HealthReporter,
    names: Vec<&'static str>,
    mut closed: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let ok = healthy(&node);
        if last != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for n in &names {
                reporter.set_service_status(*n, status).await;
            }
            last = Some(ok);
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = async { let _ = closed.wait_for(|c| *c).await; } => true,
        };
        if stopping {
            for n in &names {
                reporter
                    .set_service_status(*n, ServingStatus::NotServing)
                    .await;
            }
            return;
        }
    }
}

/// A replica started with `join` asks the cluster to add it (learner, then
/// voter) until it is a voter of every group.
async fn join_loop(node: Node, cfg: ReplicaConfig, mut closed: watch::Receiver<bool>) {
    let me = cfg.node_id;
    let peers: Vec<String> = cfg
        .peers
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(_, a)| a.clone())
        .collect();
    let conn = match dsync_client::Conn::new(peers, dsync_client::Options::default()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot join: no peers");
            return;
        }
    };
    loop {
        let st = node.status();
        if !st.is_empty() && st.iter().all(|s| s.voters.contains(&me)) {
            tracing::info!(node = me, "joined the cluster as a voter");
            return;
        }
        let req = AddMemberRequest {
            node_id: me,
            addr: cfg.advertise.clone(),
            promote: true,
        };
        let res = conn
            .call(|ch| {
                let req = req.clone();
                async move { AdminClient::new(ch).add_member(req).await }
            })
            .await;
        if let Err(e) = res {
            tracing::info!(node = me, error = %e, "join not done yet; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}
