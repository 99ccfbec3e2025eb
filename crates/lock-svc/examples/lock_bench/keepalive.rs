//! `--keepalive N`: N sessions kept alive by their clients (a keep-alive
//! every TTL / 3, as `dsync_client::Session` does), and the same number of
//! etcd leases kept alive through etcd's LeaseKeepAlive streams. Reports
//! keep-alives per second, the Raft entries per second they cost, and the
//! CPU each replica process spent.

use std::time::{Duration, Instant};

use dsync_client::LockClient;
use proto::admin::v1::admin_client::AdminClient;
use proto::admin::v1::StatusRequest;
use proto::etcd::etcdserverpb::lease_client::LeaseClient;
use proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use proto::etcd::etcdserverpb::LeaseKeepAliveRequest;
use tokio::sync::mpsc;

/// CPU time (user + system) a process has used so far.
pub fn cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// What one keep-alive measurement found.
pub struct Measured {
    pub keepalives_per_s: f64,
    pub errors: u64,
    pub entries_per_s: f64,
    /// CPU per replica process, as % of one core.
    pub cpu: Vec<f64>,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpu: Vec<String> = self.cpu.iter().map(|c| format!("{c:.0}%")).collect();
        write!(
            f,
            "{:.0} keep-alives/s ({} errors), {:.0} Raft entries/s, CPU per replica [{}]",
            self.keepalives_per_s,
            self.errors,
            self.entries_per_s,
            cpu.join(", ")
        )
    }
}

/// CPU used by each process and a Raft index, at one moment.
struct Sample {
    at: Instant,
    cpu: Vec<Duration>,
    index: u64,
}

impl Sample {
    fn take(pids: &[u32], index: u64) -> Self {
        Self {
            at: Instant::now(),
            cpu: pids.iter().map(|p| cpu(*p)).collect(),
            index,
        }
    }

    /// What happened between `self` and `end`, given the keep-alives.
    fn until(self, end: Sample, ok: u64, errors: u64) -> Measured {
        let s = end.at.duration_since(self.at).as_secs_f64();
        Measured {
            keepalives_per_s: ok as f64 / s,
            errors,
            entries_per_s: end.index.saturating_sub(self.index) as f64 / s,
            cpu: end
                .cpu
                .iter()
                .zip(&self.cpu)
                .map(|(e, b)| 100.0 * e.saturating_sub(*b).as_secs_f64() / s)
                .collect(),
        }
    }
}

/// Waits for tasks that each answer (keep-alives answered, errors) and
/// adds them up.
async fn sum(tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap();
        ok += o;
        errors += e;
    }
    (ok, errors)
}

/// The highest commit index any replica reports for the lock group.
async fn dsync_index(endpoints: &[String]) -> u64 {
    let mut best = 0;
    for e in endpoints {
        if let Ok(mut a) = AdminClient::connect(format!("http://{e}")).await {
            if let Ok(st) = a.status(StatusRequest {}).await {
                for g in st.into_inner().groups {
                    best = best.max(g.commit_index);
                }
            }
        }
    }
    best
}

/// Opens `n` sessions (TTL `ttl`) and keeps them alive for `seconds`:
/// each with its own KeepAlive calls, or (`batched`) all of a
/// connection's sessions in one call.
pub async fn dsync(
    conns: &[LockClient],
    endpoints: &[String],
    pids: &[u32],
    n: usize,
    ttl: Duration,
    seconds: u64,
    batched: bool,
) -> Measured {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let opens: Vec<_> = chunk
            .iter()
            .map(|i| {
                let c = conns[i % conns.len()].clone();
                tokio::spawn(async move { c.open_session_unmanaged(ttl, "keepalive").await })
            })
            .collect();
        for o in opens {
            ids.push(o.await.unwrap().unwrap().session_id);
        }
    }
    let run = async {
        let end = Instant::now() + Duration::from_secs(seconds);
        if batched {
            let tasks: Vec<_> = conns
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let mine: Vec<u64> = ids
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % conns.len() == k)
                        .map(|(_, id)| *id)
                        .collect();
                    let c = c.clone();
                    let first = ttl / 3 * (k as u32 % 1000) / conns.len().max(1) as u32;
                    tokio::spawn(async move {
                        let (mut ok, mut errors) = (0u64, 0u64);
                        tokio::time::sleep(first).await;
                        while Instant::now() < end && !mine.is_empty() {
                            match c.keep_alive_many(&mine).await {
                                Ok(r) => {
                                    for x in r.results {
                                        if x.reason.is_empty() {
                                            ok += 1;
                                        } else {
                                            errors += 1;
                                        }
                                    }
                                }
                                Err(_) => errors += mine.len() as u64,
                            }
                            tokio::time::sleep(ttl / 3).await;
                        }
                        (ok, errors)
                    })
                })
                .collect();
            return sum(tasks).await;
        }
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (c, id) = (conns[i % conns.len()].clone(), *id);
                // Spread the first keep-alives over one period.
                let first = ttl / 3 * (i as u32 % 1000) / 1000;
                tokio::spawn(async move {
                    let (mut ok, mut errors) = (0u64, 0u64);
                    tokio::time::sleep(first).await;
                    while Instant::now() < end {
                        match c.keep_alive(id).await {
                            Ok(_) => ok += 1,
                            Err(_) => errors += 1,
                        }
                        tokio::time::sleep(ttl / 3).await;
                    }
                    (ok, errors)
                })
            })
            .collect();
        sum(tasks).await
    };
    let start = Sample::take(pids, dsync_index(endpoints).await);
    let (ok, errors) = run.await;
    let end = Sample::take(pids, dsync_index(endpoints).await);
    for chunk in ids.chunks(256) {
        let closes: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (c, id) = (conns[i % conns.len()].clone(), *id);
                tokio::spawn(async move { c.close_session(id).await })
            })
            .collect();
        for c in closes {
            let _ = c.await;
        }
    }
    start.until(end, ok, errors)
}

/// The highest Raft index any etcd member reports.
async fn etcd_index(chans: &[tonic::transport::Channel]) -> u64 {
    let mut best = 0;
    for ch in chans.iter().take(3) {
        if let Ok(st) = MaintenanceClient::new(ch.clone())
            .status(proto::etcd::etcdserverpb::StatusRequest {})
            .await
        {
            best = best.max(st.into_inner().raft_index);
        }
    }
    best
}

/// The same against etcd: `n` leases, kept alive on one LeaseKeepAlive
/// stream per connection (as etcd's clients multiplex them).
pub async fn etcd(
    chans: &[tonic::transport::Channel],
    pids: &[u32],
    n: usize,
    ttl: Duration,
    seconds: u64,
) -> Measured {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
        let grants: Vec<_> = chunk
            .iter()
            .map(|i| {
                let ch = chans[i % chans.len()].clone();
                tokio::spawn(
                    async move { super::etcd_lease(&ch, ttl.as_secs().max(1) as i64).await },
                )
            })
            .collect();
        for g in grants {
            ids.push(g.await.unwrap());
        }
    }
    let run = async {
        let end = Instant::now() + Duration::from_secs(seconds);
        // One stream per connection; each lease's task feeds its stream.
        let mut senders = Vec::new();
        let mut readers = Vec::new();
        for ch in chans.iter().take(ids.len().max(1)) {
            let (tx, rx) = mpsc::channel::<LeaseKeepAliveRequest>(1024);
            let ch = ch.clone();
            senders.push(tx);
            // etcd answers the stream's headers with its first response,
            // so the stream is opened where its responses are read.
            readers.push(tokio::spawn(async move {
                let mut stream = LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let (mut ok, mut errors) = (0u64, 0u64);
                loop {
                    match tokio::time::timeout_at(
                        (end + Duration::from_secs(2)).into(),
                        stream.message(),
                    )
                    .await
                    {
                        Ok(Ok(Some(r))) if r.ttl > 0 => ok += 1,
                        Ok(Ok(Some(_))) => errors += 1,
                        _ => break,
                    }
                }
                (ok, errors)
            }));
        }
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (tx, id) = (senders[i % senders.len()].clone(), *id);
                let first = ttl / 3 * (i as u32 % 1000) / 1000;
                tokio::spawn(async move {
                    tokio::time::sleep(first).await;
                    while Instant::now() < end {
                        if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(ttl / 3).await;
                    }
                })
            })
            .collect();
        drop(senders);
        for t in tasks {
            let _ = t.await;
        }
        sum(readers).await
    };
    let start = Sample::take(pids, etcd_index(chans).await);
    let (ok, errors) = run.await;
    let end = Sample::take(pids, etcd_index(chans).await);
    start.until(end, ok, errors)
}
