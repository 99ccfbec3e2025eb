//! `dsync`: the command line for humans.
//!
//! ```text
//! dsync --endpoints 127.0.0.1:7001,127.0.0.1:7002 lock acquire orders/7 --mode exclusive
//! dsync lock status orders/7
//! dsync lock list
//! dsync session open --ttl-ms 30000
//! dsync queue create-topic orders --partitions 3
//! dsync queue produce orders --key customer-7 'hello'
//! dsync queue consume orders workers --max 10
//! dsync cache set user:7 '{"name":"Ada"}' --ttl-ms 60000
//! dsync cache get user:7
//! dsync cache status
//! ```

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use dsync_client::{LockClient, LockMode};
use tonic::Status;

#[derive(Parser)]
#[command(
    name = "dsync",
    about = "dsync command line",
    after_help = "Exit status: 0 on success, 2 when a lock was not obtained (busy try-lock or wait timed out), 1 on any other error; errors print the server's reason (e.g. LOCK_BUSY)."
)]
struct Cli {
    /// Replicas to talk to (any of them; the leader is found). Default:
    /// 127.0.0.1:7001-7003 (lock-svc), 127.0.0.1:7011-7013 for `queue`,
    /// 127.0.0.1:7021-7023 for `cache` (what `cargo xtask up` starts).
    #[arg(long, env = "DSYNC_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Keep retrying across elections and unreachable replicas this long.
    #[arg(long, env = "DSYNC_RETRY_MS", default_value_t = 10_000)]
    retry_ms: u64,
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
    /// Cluster status and membership (any service).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Queue commands (queue-svc).
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Cache commands (cache-svc).
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Print a key's value (exit 1 with KEY_NOT_FOUND if absent).
    Get {
        key: String,
        /// Also print version, TTL left and which tier answered.
        #[arg(long)]
        verbose: bool,
    },
    /// Write a key; prints its new version.
    Set {
        key: String,
        value: String,
        /// Expire after this many ms (0: the server's default).
        #[arg(long, default_value_t = 0)]
        ttl_ms: u64,
        /// Only if the key's version is this (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete a key (optionally only at a version).
    Delete {
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Drop every cached copy of a key (the store keeps it); prints the
    /// nodes that held one.
    Invalidate { key: String },
    /// Every node's figures and the membership it sees.
    Status,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Create a topic (and its dead-letter topic `<name>.dlq`).
    CreateTopic {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition (0: min(3, cluster size)).
        #[arg(long, default_value_t = 0)]
        replication_factor: u32,
        #[arg(long, default_value_t = 0)]
        max_depth: u64,
        #[arg(long, default_value_t = 0)]
        max_delivery_attempts: u32,
    },
    DeleteTopic {
        name: String,
    },
    /// List topics.
    List {
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Partitions (leader, replicas, depth, in flight, oldest age) and groups.
    Describe {
        name: String,
    },
    /// Create a consumer group.
    CreateGroup {
        topic: String,
        group: String,
        /// One message in flight per partition, in order.
        #[arg(long)]
        ordered: bool,
        #[arg(long, default_value_t = 30_000)]
        visibility_ms: u64,
        /// Start at the next message produced instead of the oldest.
        #[arg(long)]
        latest: bool,
    },
    DeleteGroup {
        topic: String,
        group: String,
    },
    /// Remove every stored message of a topic.
    Purge {
        topic: String,
    },
    /// Move a group to the earliest stored message (replay) or past the
    /// last (skip), or to a time (--at-ms).
    Reset {
        topic: String,
        group: String,
        #[arg(long)]
        latest: bool,
        /// First message enqueued at or after this time (ms since epoch).
        #[arg(long)]
        at_ms: Option<u64>,
    },
    /// Produce messages (each argument one payload; none: one per stdin line).
    Produce {
        topic: String,
        payloads: Vec<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// Message id (deduplicated within the topic's window); with
        /// several payloads, `-N` is appended to each.
        #[arg(long)]
        id: Option<String>,
    },
    /// Receive messages, print them and ack them (unless --no-ack).
    Consume {
        topic: String,
        group: String,
        #[arg(long, default_value_t = 10)]
        max: u32,
        #[arg(long, default_value_t = 1000)]
        wait_ms: u32,
        #[arg(long)]
        no_ack: bool,
        #[arg(long, default_value = "dsync-cli")]
        consumer: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Every replica's view: role, term, leader, indexes, members, health.
    Status,
    /// Add a replica (learner, promoted to voter once caught up).
    AddMember {
        node_id: u64,
        addr: String,
        /// Leave it a learner (hot standby).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a replica from every group.
    RemoveMember { node_id: u64 },
    /// Move leadership to a replica.
    TransferLeader { node_id: u64 },
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
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            let reason = proto::status::reason(&e);
            if reason.is_empty() {
                eprintln!("error: {} ({:?})", e.message(), e.code());
            } else {
                eprintln!("error: {} ({:?}, {reason})", e.message(), e.code());
            }
            // Scripts tell "the lock was not obtained" from failures.
            if matches!(reason.as_str(), "LOCK_BUSY" | "WAIT_TIMEOUT") {
                2
            } else {
                1
            }
        }
    };
    // Exit now rather than wait for a name lookup still running in the
    // background (an unreachable replica's name can take seconds to fail).
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<(), Status> {
    let opts = dsync_client::Options {
        retry_for: Duration::from_millis(cli.retry_ms),
        ..Default::default()
    };
    let endpoints = |ports: [u16; 3]| {
        if cli.endpoints.is_empty() {
            ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
        } else {
            cli.endpoints.clone()
        }
    };
    match cli.cmd {
        Top::Cluster { cmd } => cluster(&endpoints([7001, 7002, 7003]), opts, cmd).await,
        Top::Queue { cmd } => {
            let conn = dsync_client::Conn::new(endpoints([7011, 7012, 7013]), opts)?;
            queue(&dsync_client::QueueClient::new(conn), cmd).await
        }
        Top::Cache { cmd } => {
            let copts = dsync_client::cache::CacheOptions {
                conn: opts,
                near_cache: false,
                ..Default::default()
            };
            let client =
                dsync_client::CacheClient::with_options(endpoints([7021, 7022, 7023]), copts)?;
            cache(&client, cmd).await
        }
        Top::Lock { cmd } => {
            let opts = dsync_client::Options {
                watch_leader: true,
                ..opts
            };
            let client = LockClient::with_options(endpoints([7001, 7002, 7003]), opts)?;
            lock(&client, cmd).await
        }
        Top::Session { cmd } => {
            let opts = dsync_client::Options {
                watch_leader: true,
                ..opts
            };
            let client = LockClient::with_options(endpoints([7001, 7002, 7003]), opts)?;
            session(&client, cmd).await
        }
    }
}

fn role_name(r: i32) -> &'static str {
    use proto::common::v1::RaftRole;
    match RaftRole::try_from(r) {
        Ok(RaftRole::Leader) => "leader",
        Ok(RaftRole::Follower) => "follower",
        Ok(RaftRole::Candidate) => "candidate",
        Ok(RaftRole::PreCandidate) => "pre-candidate",
        _ => "?",
    }
}

async fn cluster(
    endpoints: &[String],
    opts: dsync_client::Options,
    cmd: ClusterCmd,
) -> Result<(), Status> {
    use proto::admin::v1::admin_client::AdminClient;
    use proto::admin::v1::*;
    match cmd {
        ClusterCmd::Status => {
            println!(
                "{:<22} {:>4} {:<10} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9}  {:<8} members",
                "replica",
                "node",
                "role",
                "group",
                "term",
                "leader",
                "commit",
                "applied",
                "last",
                "health"
            );
            // Ask every replica at once, each bounded (an unreachable
            // replica must not hold up the report).
            let asks = endpoints.iter().map(|ep| async move {
                let ask = async {
                    let ch = tonic::transport::Endpoint::from_shared(format!("http://{ep}"))
                        .map_err(|e| Status::invalid_argument(e.to_string()))?
                        .connect_timeout(Duration::from_millis(500))
                        .timeout(Duration::from_secs(2))
                        .connect()
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    AdminClient::new(ch).status(StatusRequest {}).await
                };
                let res = tokio::time::timeout(Duration::from_secs(3), ask)
                    .await
                    .unwrap_or_else(|_| Err(Status::unavailable("no answer within 3 s")));
                (ep, res)
            });
            let answers = futures::future::join_all(asks).await;
            let mut reachable = 0;
            for (ep, res) in answers {
                match res {
                    Ok(r) => {
                        reachable += 1;
                        let r = r.into_inner();
                        let members: Vec<String> = r
                            .members
                            .iter()
                            .map(|m| {
                                format!(
                                    "{}{}={}",
                                    m.node_id,
                                    if m.voter { "" } else { "(learner)" },
                                    m.addr
                                )
                            })
                            .collect();
                        for g in &r.groups {
                            println!(
                                "{:<22} {:>4} {:<10} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9}  {:<8} {}",
                                ep,
                                r.node_id,
                                role_name(g.role),
                                g.group_id,
                                g.term,
                                g.leader_id,
                                g.commit_index,
                                g.applied_index,
                                g.last_index,
                                if r.healthy { "serving" } else { "NOT" },
                                members.join(",")
                            );
                        }
                    }
                    Err(e) => println!("{ep:<22} unreachable: {}", e.message()),
                }
            }
            if reachable == 0 {
                return Err(Status::unavailable("no replica answered"));
            }
        }
        ClusterCmd::AddMember {
            node_id,
            addr,
            learner,
        } => {
            let conn = dsync_client::Conn::new(endpoints.to_vec(), opts.clone())?;
            let r = conn
                .call(|ch| {
                    let req = AddMemberRequest {
                        node_id,
                        addr: addr.clone(),
                        promote: !learner,
                    };
                    async move { AdminClient::new(ch).add_member(req).await }
                })
                .await?;
            println!(
                "added; members: {:?}",
                r.into_inner()
                    .members
                    .iter()
                    .map(|m| m.node_id)
                    .collect::<Vec<_>>()
            );
        }
        ClusterCmd::RemoveMember { node_id } => {
            let conn = dsync_client::Conn::new(endpoints.to_vec(), opts.clone())?;
            let r = conn
                .call(|ch| async move {
                    AdminClient::new(ch)
                        .remove_member(RemoveMemberRequest { node_id })
                        .await
                })
                .await?;
            println!(
                "removed; members: {:?}",
                r.into_inner()
                    .members
                    .iter()
                    .map(|m| m.node_id)
                    .collect::<Vec<_>>()
            );
        }
        ClusterCmd::TransferLeader { node_id } => {
            let conn = dsync_client::Conn::new(endpoints.to_vec(), opts.clone())?;
            conn.call(|ch| async move {
                AdminClient::new(ch)
                    .transfer_leader(TransferLeaderRequest {
                        to_node_id: node_id,
                    })
                    .await
            })
            .await?;
            println!("leadership moved to node {node_id}");
        }
    }
    Ok(())
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

async fn cache(c: &dsync_client::CacheClient, cmd: CacheCmd) -> Result<(), Status> {
    use dsync_client::cache::SetOptions;
    match cmd {
        CacheCmd::Get { key, verbose } => {
            let (e, src) = c.get_with_source(&key).await?;
            let Some(e) = e else {
                return Err(proto::status::error(
                    tonic::Code::NotFound,
                    format!("{key} is not set"),
                    "KEY_NOT_FOUND",
                    [] as [(String, String); 0],
                ));
            };
            println!("{}", String::from_utf8_lossy(&e.value));
            if verbose {
                let ttl = e
                    .ttl
                    .map_or("none".to_string(), |t| format!("{} ms", t.as_millis()));
                eprintln!("version {}  ttl {ttl}  from {src:?}", e.version);
            }
        }
        CacheCmd::Set {
            key,
            value,
            ttl_ms,
            if_version,
        } => {
            let opts = SetOptions {
                ttl: (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms)),
                if_version,
            };
            let v = c.set_with(&key, value.into_bytes(), opts).await?;
            println!("version {v}");
        }
        CacheCmd::Delete { key, if_version } => {
            let existed = c.delete_if(&key, if_version).await?;
            println!("{}", if existed { "deleted" } else { "absent" });
        }
        CacheCmd::Invalidate { key } => {
            let nodes = c.invalidate(&key).await?;
            let names: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
            println!("dropped on nodes: [{}]", names.join(", "));
        }
        CacheCmd::Status => {
            let mut answered = 0;
            println!(
                "{:<22} {:>4} {:>6} {:>7} {:>9} {:>10} {:>8} {:>9} {:>7} {:>5} {:>5} {:>5} {:>9}",
                "endpoint",
                "node",
                "epoch",
                "member",
                "entries",
                "size",
                "util",
                "hit_rate",
                "evict",
                "M",
                "E",
                "S",
                "members"
            );
            for (ep, r) in c.status_all().await {
                match r {
                    Ok(s) => {
                        answered += 1;
                        let st = s.stats.unwrap_or_default();
                        let members: Vec<String> =
                            s.members.iter().map(|m| m.to_string()).collect();
                        println!(
                            "{ep:<22} {:>4} {:>6} {:>7} {:>9} {:>10} {:>7.1}% {:>8.1}% {:>7} {:>5} {:>5} {:>5} {:>9}",
                            st.node_id,
                            s.epoch,
                            s.member,
                            st.entries,
                            st.size_bytes,
                            st.utilization * 100.0,
                            st.hit_rate * 100.0,
                            st.evictions,
                            st.lines_modified,
                            st.lines_exclusive,
                            st.lines_shared,
                            members.join(",")
                        );
                    }
                    Err(e) => println!("{ep:<22} unreachable: {}", e.message()),
                }
            }
            if answered == 0 {
                return Err(Status::unavailable("no cache node answered"));
            }
        }
    }
    Ok(())
}

async fn queue(q: &dsync_client::QueueClient, cmd: QueueCmd) -> Result<(), Status> {
    use proto::queue::v1 as pb;
    match cmd {
        QueueCmd::CreateTopic {
            name,
            partitions,
            replication_factor,
            max_depth,
            max_delivery_attempts,
        } => {
            let info = q
                .create_topic(
                    &name,
                    pb::TopicConfig {
                        partitions,
                        replication_factor,
                        max_depth,
                        max_delivery_attempts,
                        ..Default::default()
                    },
                )
                .await?;
            let c = info.config.unwrap_or_default();
            println!(
                "topic {} ({} partitions, rf {}, dead letters to {})",
                info.name,
                c.partitions,
                c.replication_factor,
                if c.dead_letter_topic.is_empty() {
                    "-"
                } else {
                    &c.dead_letter_topic
                }
            );
        }
        QueueCmd::DeleteTopic { name } => {
            q.delete_topic(&name).await?;
            println!("deleted {name}");
        }
        QueueCmd::List { prefix } => {
            println!(
                "{:<32} {:>10} {:>3} {:>6}  dead letters",
                "topic", "partitions", "rf", "groups"
            );
            for t in q.list_topics(&prefix).await? {
                println!(
                    "{:<32} {:>10} {:>3} {:>6}  {}",
                    t.name, t.partitions, t.replication_factor, t.groups, t.dead_letter_topic
                );
            }
        }
        QueueCmd::Describe { name } => {
            let info = q.describe_everywhere(&name).await?;
            println!(
                "topic {} depth {} bytes {}",
                info.name, info.depth, info.bytes
            );
            println!(
                "{:>9} {:>8} {:<22} {:<10} {:>8} {:>9} {:>12} {:>11} {:>8} {:>8}",
                "partition",
                "leader",
                "address",
                "replicas",
                "depth",
                "in-flight",
                "oldest age",
                "next offset",
                "in/s",
                "acked/s"
            );
            for p in &info.partitions {
                let replicas: Vec<String> = p.replica_ids.iter().map(u64::to_string).collect();
                println!(
                    "{:>9} {:>8} {:<22} {:<10} {:>8} {:>9} {:>10}ms {:>11} {:>8.1} {:>8.1}",
                    p.partition,
                    p.leader_id,
                    p.leader_addr,
                    replicas.join(","),
                    p.depth,
                    p.in_flight,
                    p.oldest_message_age_ms,
                    p.next_offset,
                    p.produce_rate,
                    p.consume_rate
                );
            }
            for g in &info.groups {
                let consumers: Vec<&str> = g.consumers.iter().map(|c| c.name.as_str()).collect();
                println!(
                    "group {}: lag {} in-flight {} dead-letter-pending {} consumers [{}]",
                    g.name,
                    g.lag,
                    g.in_flight,
                    g.dead_letter_pending,
                    consumers.join(",")
                );
            }
        }
        QueueCmd::CreateGroup {
            topic,
            group,
            ordered,
            visibility_ms,
            latest,
        } => {
            let mode = if ordered {
                pb::GroupMode::Ordered
            } else {
                pb::GroupMode::Shared
            };
            let start = pb::StartPosition {
                kind: if latest {
                    pb::PositionKind::Latest
                } else {
                    pb::PositionKind::Earliest
                } as i32,
                ..Default::default()
            };
            let r = q
                .create_group(
                    &topic,
                    &group,
                    Some(pb::GroupConfig {
                        mode: mode as i32,
                        visibility_timeout_ms: visibility_ms,
                        ..Default::default()
                    }),
                    Some(start),
                )
                .await?;
            println!(
                "group {group} on {topic}: {}",
                if r.created { "created" } else { "exists" }
            );
        }
        QueueCmd::Purge { topic } => {
            let (n, bytes) = q.purge_topic(&topic).await?;
            println!("purged {n} messages ({bytes} bytes) from {topic}");
        }
        QueueCmd::Reset {
            topic,
            group,
            latest,
            at_ms,
        } => {
            let to = match (latest, at_ms) {
                (_, Some(t)) => pb::StartPosition {
                    kind: pb::PositionKind::Timestamp as i32,
                    timestamp_ms: t,
                    ..Default::default()
                },
                (true, None) => pb::StartPosition {
                    kind: pb::PositionKind::Latest as i32,
                    ..Default::default()
                },
                (false, None) => pb::StartPosition {
                    kind: pb::PositionKind::Earliest as i32,
                    ..Default::default()
                },
            };
            for p in q.reset_group(&topic, &group, to).await? {
                println!("partition {} from offset {}", p.partition, p.offset);
            }
        }
        QueueCmd::DeleteGroup { topic, group } => {
            q.delete_group(&topic, &group).await?;
            println!("deleted group {group} of {topic}");
        }
        QueueCmd::Produce {
            topic,
            payloads,
            key,
            priority,
            id,
        } => {
            let payloads = if payloads.is_empty() {
                use std::io::BufRead;
                std::io::stdin()
                    .lock()
                    .lines()
                    .map_while(Result::ok)
                    .collect()
            } else {
                payloads
            };
            let many = payloads.len() > 1;
            let messages: Vec<pb::Message> = payloads
                .into_iter()
                .enumerate()
                .map(|(i, p)| pb::Message {
                    key: key.clone().unwrap_or_default().into_bytes(),
                    payload: p.into_bytes(),
                    priority,
                    message_id: match &id {
                        Some(id) if many => format!("{id}-{i}"),
                        Some(id) => id.clone(),
                        None => String::new(),
                    },
                    ..Default::default()
                })
                .collect();
            for chunk in messages.chunks(1000) {
                for r in q.produce(&topic, chunk.to_vec()).await? {
                    println!(
                        "partition {} offset {}{}",
                        r.partition,
                        r.offset,
                        if r.duplicate { " (duplicate)" } else { "" }
                    );
                }
            }
        }
        QueueCmd::Consume {
            topic,
            group,
            max,
            wait_ms,
            no_ack,
            consumer,
        } => {
            let msgs = q.receive(&topic, &group, &consumer, max, wait_ms).await?;
            for m in &msgs {
                println!(
                    "p{} o{} attempt {} priority {} key {:?}: {}",
                    m.partition,
                    m.offset,
                    m.attempt,
                    m.priority,
                    String::from_utf8_lossy(&m.key),
                    String::from_utf8_lossy(&m.payload)
                );
            }
            if !no_ack && !msgs.is_empty() {
                let receipts: Vec<String> = msgs.iter().map(|m| m.receipt.clone()).collect();
                let results = q.ack(&topic, &group, &receipts).await?;
                let failed: Vec<_> = results.iter().filter(|r| !r.ok).collect();
                if !failed.is_empty() {
                    for r in failed {
                        eprintln!("ack {}: {} {}", r.receipt, r.reason, r.message);
                    }
                    return Err(Status::failed_precondition("some acks failed"));
                }
            } else if msgs.is_empty() {
                eprintln!("no messages");
            }
        }
    }
    Ok(())
}
