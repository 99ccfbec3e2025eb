//! `raft-demo`: a replicated append-only log on the consensus core, served
//! over gRPC (`dsync.demo.v1.ReplicatedLog`) on the same port as the raft
//! transport.
//!
//! ```text
//! raft-demo node --id 1 --listen 127.0.0.1:7101 \
//!     --peers 1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103 --data-dir data/n1
//! raft-demo up [--base-port 7101] [--data-dir data/demo]   # three local nodes
//! ```
//!
//! Flags may also come from `DSYNC_NODE_ID`, `DSYNC_LISTEN`, `DSYNC_PEERS`
//! and `DSYNC_DATA_DIR`.

use std::process::{Child, Command};
use std::sync::Arc;

use consensus::config::parse_peers;
use consensus::grpc_status::to_status;
use consensus::testkit::RecordingSm;
use consensus::{Config, GroupHandle, GrpcTransport, Node, RaftTransportService};
use proto::demo::v1::replicated_log_server::{ReplicatedLog, ReplicatedLogServer};
use proto::demo::v1::{
    AppendRequest, AppendResponse, ReadRequest, ReadResponse, Record, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

const GROUP: u64 = 1;

/// The state machine is `testkit::RecordingSm`: it records (index, data)
/// in commit order, which is exactly a replicated log.
struct LogService {
    group: GroupHandle,
    log: RecordingSm,
}

#[tonic::async_trait]
impl ReplicatedLog for LogService {
    async fn append(
        &self,
        req: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let data = req.into_inner().data;
        if data.is_empty() {
            return Err(Status::invalid_argument("data must not be empty"));
        }
        let resp = self
            .group
            .propose(data)
            .await
            .map_err(|e| to_status(&e, GROUP))?;
        let index = u64::from_be_bytes(
            resp.try_into()
                .map_err(|_| Status::internal("malformed apply response"))?,
        );
        Ok(Response::new(AppendResponse { index }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let from = req.into_inner().from_index;
        let read_index = self
            .group
            .read_index()
            .await
            .map_err(|e| to_status(&e, GROUP))?;
        let records = self
            .log
            .entries()
            .into_iter()
            .filter(|(index, _)| *index >= from)
            .map(|(index, data)| Record { index, data })
            .collect();
        Ok(Response::new(ReadResponse {
            records,
            read_index,
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            group: Some(self.group.status().to_proto()),
        }))
    }
}

/// `--flag value` or `DSYNC_FLAG`.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == &format!("--{name}"))
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(format!("DSYNC_{}", name.to_uppercase().replace('-', "_"))).ok())
}

async fn run_node(args: &[String]) -> Result<(), String> {
    let id: u64 = flag(args, "id")
        .ok_or("--id is required")?
        .parse()
        .map_err(|e| format!("--id: {e}"))?;
    let listen = flag(args, "listen").ok_or("--listen is required")?;
    let peers = parse_peers(&flag(args, "peers").ok_or("--peers is required")?)?;
    let data_dir = flag(args, "data-dir").ok_or("--data-dir is required")?;
    let mut voters: Vec<u64> = peers.keys().copied().collect();
    voters.sort_unstable();

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let transport = GrpcTransport::new(id, peers);
    let node =
        Node::open(Config::new(id, &data_dir), Arc::new(transport)).map_err(|e| e.to_string())?;
    let log = RecordingSm::default();
    let group = node
        .start_group(GROUP, &voters, Box::new(log.clone()))
        .map_err(|e| e.to_string())?;
    let (close, closed) = tokio::sync::watch::channel(false);
    let raft = RaftTransportService::new(Arc::new(node.clone()), closed.clone());
    let log = LogService { group, log };
    tracing::info!(id, %listen, %data_dir, "raft-demo node serving");
    let mut stop = closed;
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(raft.into_server())
        .add_service(ReplicatedLogServer::new(log))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = stop.wait_for(|c| *c).await;
            },
        );
    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let _ = close.send(true);
    };
    let (res, ()) = tokio::join!(server, signal);
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .map_err(|e| e.to_string())?;
    res.map_err(|e| e.to_string())
}

/// Starts three nodes as child processes and waits for Ctrl-C.
fn run_up(args: &[String]) -> Result<(), String> {
    let base: u16 = flag(args, "base-port")
        .unwrap_or_else(|| "7101".into())
        .parse()
        .map_err(|e| format!("--base-port: {e}"))?;
    let dir = flag(args, "data-dir").unwrap_or_else(|| "data/demo".into());
    let peers: Vec<String> = (1..=3)
        .map(|i| format!("{i}=127.0.0.1:{}", base + i - 1))
        .collect();
    let peers = peers.join(",");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children: Vec<Child> = Vec::new();
    for i in 1..=3u16 {
        let child = Command::new(&exe)
            .args(["node", "--id", &i.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", base + i - 1)])
            .args(["--peers", &peers])
            .args(["--data-dir", &format!("{dir}/n{i}")])
            .spawn()
            .map_err(|e| format!("spawn node {i}: {e}"))?;
        children.push(child);
    }
    println!(
        "three raft-demo replicas on 127.0.0.1:{base}..{} (data in {dir}).\n\
         Talk to any of them with grpcurl, e.g.:\n  \
         grpcurl -plaintext -import-path proto -proto dsync/demo/v1/log.proto \
         -d '{{\"data\":\"aGVsbG8=\"}}' 127.0.0.1:{base} dsync.demo.v1.ReplicatedLog/Append\n\
         Ctrl-C stops them.",
        base + 2
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    for mut c in children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    Ok(())
}

fn main() {
    tracing_subscriber_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("node") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(run_node(&args[1..]))),
        Some("up") => run_up(&args[1..]),
        _ => Err("usage: raft-demo node --id N --listen ADDR --peers 1=ADDR,.. --data-dir DIR | raft-demo up".into()),
    };
    if let Err(e) = res {
        eprintln!("raft-demo: {e}");
        std::process::exit(2);
    }
}

/// Logs to stderr at `RUST_LOG` (default: info, raft-rs at warn).
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
