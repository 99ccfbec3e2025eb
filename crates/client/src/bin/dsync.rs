//! `dsync`: the command line for humans.
//!
//! ```text
//! dsync --endpoints 127.0.0.1:7001,127.0.0.1:7002 lock acquire orders/7 --mode exclusive
//! dsync lock status orders/7
//! dsync lock list
//! dsync session open --ttl-ms 30000
//! ```

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dsync_client::{LockClient, LockMode};
use tonic::Status;

#[derive(Parser)]
#[command(name = "dsync", about = "dsync command line")]
struct Cli {
    /// Replicas to talk to (any of them; the leader is found).
    #[arg(
        long,
        env = "DSYNC_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    endpoints: Vec<String>,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Lock commands.
    Lock {
        #[command(subcommand)]
        cmd: LockCmd,
    },
    /// Session commands.
    Session {
        #[command(subcommand)]
        cmd: SessionCmd,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Shared,
    Exclusive,
    Upgradeable,
}

impl From<Mode> for LockMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Shared => LockMode::Shared,
            Mode::Exclusive => LockMode::Exclusive,
            Mode::Upgradeable => LockMode::Upgradeable,
        }
    }
}

#[derive(Subcommand)]
enum LockCmd {
    /// Acquire a lock. Without --session, opens a session, holds the lock
    /// until Ctrl-C (or --hold-ms), then releases it.
    Acquire {
        resource: String,
        #[arg(long, value_enum, default_value = "exclusive")]
        mode: Mode,
        /// Wait at most this long (0 = try-lock; default 30000).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Use an existing session (the lock stays held after exit).
        #[arg(long)]
        session: Option<u64>,
        /// Hold for this long, then release and exit.
        #[arg(long)]
        hold_ms: Option<u64>,
    },
    /// Release a lock by id, or by resource for a session.
    Release {
        #[arg(long)]
        session: u64,
        #[arg(long, default_value_t = 0)]
        lock_id: u64,
        #[arg(long, default_value = "")]
        resource: String,
    },
    /// Show holders and waiters of a resource.
    Status { resource: String },
    /// List held locks.
    List {
        #[arg(long, default_value_t = 0)]
        session: u64,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
}

#[derive(Subcommand)]
enum SessionCmd {
    /// Open a session (not kept alive by this command: use keepalive).
    Open {
        #[arg(long, default_value_t = 30_000)]
        ttl_ms: u64,
        #[arg(long, default_value = "dsync-cli")]
        name: String,
    },
    KeepAlive {
        id: u64,
    },
    Close {
        id: u64,
    },
    List,
}

fn mode_name(m: i32) -> &'static str {
    match LockMode::try_from(m) {
        Ok(LockMode::Shared) => "shared",
        Ok(LockMode::Exclusive) => "exclusive",
        Ok(LockMode::Upgradeable) => "upgradeable",
        _ => "-",
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {} ({:?})", e.message(), e.code());
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Status> {
    let client = LockClient::connect(cli.endpoints)?;
    match cli.cmd {
        Top::Lock { cmd } => lock(&client, cmd).await,
        Top::Session { cmd } => session(&client, cmd).await,
    }
}

async fn lock(client: &LockClient, cmd: LockCmd) -> Result<(), Status> {
    match cmd {
        LockCmd::Acquire {
            resource,
            mode,
            timeout_ms,
            session: Some(sid),
            ..
        } => {
            let r = client
                .acquire(
                    sid,
                    &resource,
                    mode.into(),
                    timeout_ms.map(Duration::from_millis),
                )
                .await?;
            println!(
                "lock_id={} fencing_token={} mode={}",
                r.lock_id,
                r.fencing_token,
                mode_name(r.mode)
            );
        }
        LockCmd::Acquire {
            resource,
            mode,
            timeout_ms,
            session: None,
            hold_ms,
        } => {
            let s = client
                .open_session(Duration::from_secs(10), "dsync-cli")
                .await?;
            let g = s
                .acquire(
                    &resource,
                    mode.into(),
                    timeout_ms.map(Duration::from_millis),
                )
                .await?;
            println!(
                "session={} lock_id={} fencing_token={} mode={}",
                s.id(),
                g.lock_id(),
                g.fencing_token(),
                mode_name(g.mode() as i32)
            );
            match hold_ms {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => {
                    println!("holding; Ctrl-C releases");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            g.release().await?;
            s.close().await?;
            println!("released");
        }
        LockCmd::Release {
            session,
            lock_id,
            resource,
        } => {
            client.release(session, lock_id, &resource).await?;
            println!("released");
        }
        LockCmd::Status { resource } => {
            let st = client.status(&resource).await?;
            println!(
                "{} mode={} (read at index {})",
                st.resource,
                mode_name(st.mode),
                st.read_index
            );
            for h in &st.holders {
                println!(
                    "  holder lock={} session={} ({}) mode={} token={} since_ms={}",
                    h.lock_id,
                    h.session_id,
                    h.client_name,
                    mode_name(h.mode),
                    h.fencing_token,
                    h.since_ms
                );
            }
            for w in &st.waiters {
                println!(
                    "  waiter wait={} session={} mode={} since_ms={} deadline_ms={}{}",
                    w.waiter_id,
                    w.session_id,
                    mode_name(w.mode),
                    w.since_ms,
                    w.deadline_ms,
                    if w.upgrade_of != 0 {
                        format!(" upgrade_of={}", w.upgrade_of)
                    } else {
                        String::new()
                    }
                );
            }
        }
        LockCmd::List { session, page_size } => {
            let mut token = String::new();
            loop {
                let page = client.list_locks(page_size, &token, session).await?;
                for h in &page.locks {
                    println!(
                        "{}\tlock={}\tsession={}\tmode={}\ttoken={}",
                        h.resource,
                        h.lock_id,
                        h.session_id,
                        mode_name(h.mode),
                        h.fencing_token
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
    }
    Ok(())
}

async fn session(client: &LockClient, cmd: SessionCmd) -> Result<(), Status> {
    match cmd {
        SessionCmd::Open { ttl_ms, name } => {
            let s = client
                .open_session_unmanaged(Duration::from_millis(ttl_ms), &name)
                .await?;
            println!("session={} ttl_ms={}", s.session_id, s.ttl_ms);
        }
        SessionCmd::KeepAlive { id } => {
            let r = client.keep_alive(id).await?;
            println!("session={id} ttl_ms={}", r.ttl_ms);
        }
        SessionCmd::Close { id } => {
            let r = client.close_session(id).await?;
            println!(
                "closed; released {} locks, cancelled {} waits",
                r.released, r.cancelled
            );
        }
        SessionCmd::List => {
            for s in client.list_sessions().await?.sessions {
                println!(
                    "session={}\tname={}\tttl_ms={}\texpires_at_ms={}\tlocks={}\twaits={}",
                    s.session_id, s.client_name, s.ttl_ms, s.expires_at_ms, s.locks_held, s.waits
                );
            }
        }
    }
    Ok(())
}
