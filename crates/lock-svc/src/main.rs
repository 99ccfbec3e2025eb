//! The lock-svc replica binary. `lock-svc` (or `lock-svc serve`) runs a
//! replica; `lock-svc leave` removes this replica from the cluster before a
//! scale-down. Configuration: flags or `DSYNC_*` env vars (see `--help`).

use clap::Parser;
use lock_svc::config::Cmd;
use lock_svc::{Flags, LockConfig, LockServer};
use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::RemoveMemberRequest;

#[tokio::main]
async fn main() {
    chassis::logging::init();
    let flags = Flags::parse();
    let res = match flags.cmd {
        None | Some(Cmd::Serve) => serve(flags).await,
        Some(Cmd::Leave) => leave(flags).await,
    };
    if let Err(e) = res {
        eprintln!("lock-svc: {e}");
        std::process::exit(2);
    }
}

async fn serve(flags: Flags) -> Result<(), String> {
    let cfg = LockConfig::from_flags(&flags)?;
    let listen = flags.common.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let node = cfg.replica.node_id;
    let server = LockServer::start(cfg, listener)?;
    tracing::info!(node, addr = %server.addr, "lock-svc serving");
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

async fn leave(flags: Flags) -> Result<(), String> {
    let cfg = LockConfig::from_flags(&flags)?;
    let me = cfg.replica.node_id;
    let peers: Vec<String> = cfg.replica.peers.values().cloned().collect();
    let conn = dsync_client::Conn::new(peers, dsync_client::Options::default())
        .map_err(|e| e.to_string())?;
    let r = conn
        .call(|ch| async move {
            AdminClient::new(ch)
                .remove_member(RemoveMemberRequest { node_id: me })
                .await
        })
        .await
        .map_err(|e| format!("remove node {me}: {}", e.message()))?;
    let members: Vec<String> = r
        .into_inner()
        .members
        .iter()
        .map(|m| format!("{}={}", m.node_id, m.addr))
        .collect();
    println!("node {me} left; members now {}", members.join(","));
    Ok(())
}
