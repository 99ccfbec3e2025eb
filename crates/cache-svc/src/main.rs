//! The cache-svc node binary. Configuration: flags or `DSYNC_*` env vars
//! (see `--help`).

use cache_svc::config::{CacheFlags, CacheLimits};
use cache_svc::server::{CacheConfig, CacheServer};
use clap::Parser;

/// Flags of a cache-svc node (each also from a `DSYNC_*` env var).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cache-svc", about = "dsync cache service node")]
struct Flags {
    #[command(flatten)]
    common: chassis::CommonFlags,
    #[command(flatten)]
    cache: CacheFlags,
}

#[tokio::main]
async fn main() {
    chassis::logging::init();
    let flags = Flags::parse();
    if let Err(e) = serve(flags).await {
        eprintln!("cache-svc: {e}");
        std::process::exit(2);
    }
}

async fn serve(flags: Flags) -> Result<(), String> {
    let replica = chassis::ReplicaConfig::from_flags("cache-svc", &flags.common)?;
    let limits = CacheLimits::from_flags(&flags.cache)?;
    let cfg = CacheConfig::from_replica(replica, limits, flags.cache.store.clone());
    let listen = flags.common.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let node = cfg.replica.node_id;
    let server = CacheServer::start(cfg, listener).await?;
    tracing::info!(node, addr = %server.addr, "cache-svc serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: leaving the cache membership, draining");
    server.shutdown().await;
    Ok(())
}
