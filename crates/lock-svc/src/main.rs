//! The lock-svc replica binary.

use clap::Parser;
use lock_svc::{Flags, LockConfig, LockServer};

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let flags = Flags::parse();
    if let Err(e) = run(flags).await {
        eprintln!("lock-svc: {e}");
        std::process::exit(2);
    }
}

async fn run(flags: Flags) -> Result<(), String> {
    let cfg = LockConfig::from_flags(&flags)?;
    let listener = tokio::net::TcpListener::bind(&flags.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", flags.listen))?;
    let server = LockServer::start(cfg, listener)?;
    tracing::info!(node = flags.node_id, addr = %server.addr, "lock-svc serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
