//! The queue-svc replica binary. Configuration: flags or `DSYNC_*` env
//! vars (see `--help`).

use clap::Parser;
use queue_svc::server::{QueueConfig, QueueServer};

/// Flags of a queue-svc replica (each also from a `DSYNC_*` env var).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "queue-svc", about = "dsync queue service replica")]
struct Flags {
    #[command(flatten)]
    common: chassis::CommonFlags,
}

#[tokio::main]
async fn main() {
    chassis::logging::init();
    let flags = Flags::parse();
    if let Err(e) = serve(flags).await {
        eprintln!("queue-svc: {e}");
        std::process::exit(2);
    }
}

async fn serve(flags: Flags) -> Result<(), String> {
    let replica = chassis::ReplicaConfig::from_flags("queue-svc", &flags.common)?;
    let cfg = QueueConfig::from_replica(replica);
    let listen = flags.common.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let node = cfg.replica.node_id;
    let server = QueueServer::start(cfg, listener)?;
    tracing::info!(node, addr = %server.addr, "queue-svc serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: handing over leadership, draining");
    server.shutdown().await;
    Ok(())
}
